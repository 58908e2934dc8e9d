"""The gateway's settings, from flags with environment-variable defaults (``SLM_GATEWAY_*``).

Why environment defaults: in a Deployment the chart sets env vars, on a laptop people type
flags, and the two must mean the same thing. Secrets are never settings: the LLM key comes
from the task's Secret (cluster), or from the env var / file *named* here (local use), and is
read once, never printed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slm_gateway.auth import AUTH_MODES, AUTH_NONE, DEFAULT_AUDIENCE, DEFAULT_REVIEWS_PER_S
from slm_gateway.capture import CaptureConfig
from slm_gateway.decide import DEFAULT_PRICES
from slm_gateway.httpclient import header_value_problem
from slm_gateway.metrics import REMOVED_TASK_GRACE_S
from slm_gateway.routes import DEFAULT_LLM_TIMEOUT_S, DEFAULT_SLM_TIMEOUT_S, Price

ENV_PREFIX = "SLM_GATEWAY_"
DEFAULT_MAX_BODY = 1024 * 1024
#: The smallest --max-body-bytes: the chart's own minimum (values.schema.json). Below it even
#: a one-message call is a 413; 0 or a negative number refused every call.
MIN_MAX_BODY = 1024
DEFAULT_HOST = "127.0.0.1"
DEFAULT_KEY_ENV = "SLM_GATEWAY_LLM_API_KEY"

#: The levels ``--log-level`` takes. Not uvicorn's ``trace``: it logs every request's headers,
#: the agents' ``Authorization`` among them, and the project never logs a secret; anything
#: else (a typo) used to end the start in a ``ValueError: Unknown level`` traceback.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: The layouts ``--log-format`` takes: ``text`` (time, level, logger, message) or ``json`` (one
#: object a line, for log shippers); uvicorn's lines and the capture workers' follow it too.
LOG_FORMATS = ("text", "json")

#: A bad variable's value is shown only when it looks like a mistyped number: at most 24
#: characters, a digit among them, nothing but digits, sign, dot, comma, ``e``, ``_`` and
#: spaces, and maybe a unit (``30s``, ``500ms``, ``64MB``). Anything else may be a key pasted
#: into the wrong variable, and a key that short or that shape is no key anyone uses.
_SHOWABLE = re.compile(r"(?=[^\d]*\d)[-+0-9., _eE]{1,24}(?:ms|s|m|h|[kmg]i?b?)?", re.IGNORECASE)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the app needs; built by :func:`parse_args` or directly in tests."""

    routes_file: str = ""
    namespace: str | None = None
    #: Several namespaces (``--namespace a,b``): AgentTasks are listed and watched in all
    #: namespaces, and only these namespaces' tasks are routed.
    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    kubeconfig: str | None = None
    resync_s: int = 300
    #: How often the LLM keys' Secrets are read again (they cannot be watched); 0 turns it off.
    secret_refresh_s: float = 10.0
    routes_reload_s: float = 1.0
    capture: CaptureConfig | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    #: How long a request's body may take to arrive once its headers did: a client that
    #: promises a Content-Length and stalls (or trickles) gets a 408 instead of holding a
    #: connection and its buffers forever.
    body_timeout_s: float = 30.0
    slm_timeout_s: float = DEFAULT_SLM_TIMEOUT_S
    llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S
    breaker_failures: int = 5
    breaker_cooldown_s: float = 5.0
    max_shadow_inflight: int = 64
    prices: Mapping[str, Price] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    llm_api_key: str = field(default="", repr=False)
    #: Where ``llm_api_key`` was read from, if a file: a routes file's reload reads it again
    #: when it changes (a mounted Secret that rotated), not only at start.
    llm_api_key_file: str = ""
    host: str = DEFAULT_HOST
    port: int = 8080
    port_file: str = ""
    log_level: str = "info"
    log_format: str = "text"
    graceful_timeout_s: float = 30.0
    #: Connections per upstream origin (scheme, host, port), shared by every task whose LLM or
    #: SLM is there; calls past it wait for a free one, then get a 503 ``gateway_busy``.
    pool_size: int = 1024
    # how long a removed task's metric series are still exported (slm_gateway.metrics)
    removed_task_metrics_s: float = REMOVED_TASK_GRACE_S
    #: ``none`` (any caller) or ``serviceaccount`` (see :mod:`slm_gateway.auth`).
    agent_auth: str = AUTH_NONE
    agent_auth_audience: str = DEFAULT_AUDIENCE
    agent_auth_cache_s: float = 60.0
    #: TokenReviews a second for tokens never found valid (a burst of five times that); past
    #: it a 429. Tokens found valid before are not limited (see slm_gateway.auth).
    agent_auth_reviews_per_s: float = DEFAULT_REVIEWS_PER_S


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


@dataclass(frozen=True)
class BadEnv:
    """A numeric or on/off ``SLM_GATEWAY_*`` variable whose value is not what it must be.

    Why a value rather than an error raised at once: the variables are the flags' defaults and
    are read whenever the parser is built (for ``--help`` and for every ``parser.error()`` too),
    and a flag on the command line replaces its variable; only after parsing is it known
    whether the bad value would be used. :func:`config_from_args` then refuses it the way
    argparse refuses a bad flag (one line, exit 2), instead of the traceback a bare ``int()``
    or ``float()`` at build time ended in.
    """

    var: str
    text: str
    expected: str

    def __str__(self) -> str:  # what ``%(default)s`` in a flag's help shows
        return f"(bad {self.var})"

    def shown(self) -> str:
        """The value as a message may show it: as typed only if it looks like a mistyped
        number (see :data:`_SHOWABLE`), else only its length. Why: a value in the wrong
        variable may be a key, even a short one (``sk-ant-...``), and this message goes to a
        terminal or a pod's log."""
        if len(self.text) <= 24 and _SHOWABLE.fullmatch(self.text):
            return repr(self.text)
        return f"a {len(self.text)}-character value, not shown"

    def message(self, flag: str) -> str:
        return f"{self.var} must be {self.expected} (got {self.shown()}; it sets {flag}'s default)"


_SWITCH_ON = frozenset({"1", "true", "yes", "on"})
_SWITCH_OFF = frozenset({"", "0", "false", "no", "off"})


def _env_int(name: str, default: int) -> int | BadEnv:
    """The flag's default from ``SLM_GATEWAY_<name>``, or a :class:`BadEnv` if not an integer."""
    text = os.environ.get(ENV_PREFIX + name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        return BadEnv(ENV_PREFIX + name, text, "an integer")


def _env_float(name: str, default: float) -> float | BadEnv:
    """The flag's default from ``SLM_GATEWAY_<name>``, or a :class:`BadEnv` if not a number.

    ``nan`` and ``inf`` parse here as they do for the flag itself: what is done with them is
    the range checks' business, the same for both.
    """
    text = os.environ.get(ENV_PREFIX + name)
    if text is None:
        return float(default)
    try:
        return float(text)
    except ValueError:
        return BadEnv(ENV_PREFIX + name, text, "a number")


def _env_switch(name: str) -> bool | BadEnv:
    """An on/off variable: 1/true/yes/on or 0/false/no/off (any case; empty or unset is off).

    Why not only ``"1"``: any other value used to mean off without a word, so
    ``SLM_GATEWAY_ALL_NAMESPACES=true`` silently did nothing; a value that is neither is now
    refused.
    """
    text = os.environ.get(ENV_PREFIX + name, "")
    word = text.strip().lower()
    if word in _SWITCH_ON:
        return True
    if word in _SWITCH_OFF:
        return False
    return BadEnv(ENV_PREFIX + name, text, "one of 1, true, yes, on, 0, false, no, off")


def parse_price(text: str) -> tuple[str, Price]:
    """``llm=0.0025:0.01`` → ("llm", Price(0.0025, 0.01)); USD per 1k prompt:completion tokens.

    A negative, ``nan`` or infinite price is refused, as a task's own ``llmPrice`` is: the
    cost counters it feeds went backwards or became ``NaN`` for good, and so did every savings
    figure computed from them.
    """
    backend, sep, value = text.partition("=")
    prompt, sep2, completion = value.partition(":")
    if not sep or backend not in ("llm", "slm"):
        raise argparse.ArgumentTypeError(f"--price {text!r}: expected llm=P:C or slm=P:C")
    try:
        price = Price(float(prompt), float(completion if sep2 else prompt))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--price {text!r}: prices must be numbers") from None
    if not all(math.isfinite(x) and x >= 0 for x in (price.prompt, price.completion)):
        raise argparse.ArgumentTypeError(
            f"--price {text!r}: prices must be finite and not negative"
        )
    return backend, price


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slm-gateway",
        description=(
            "OpenAI-compatible agent gateway: routes each AgentTask's calls to its SLM "
            "(Triton) or its LLM, falls back per request, captures every call (PII-redacted)."
        ),
    )
    src = p.add_argument_group("routes (one source)")
    src.add_argument("--routes", default=_env("ROUTES", ""), help="static YAML/JSON routes file")
    src.add_argument(
        "--namespace",
        default=_env("NAMESPACE", ""),
        help="watch AgentTasks here; a comma-separated list routes the tasks of each",
    )
    src.add_argument(
        "--all-namespaces",
        action="store_true",
        default=_env_switch("ALL_NAMESPACES"),
        help="watch AgentTasks in every namespace",
    )
    src.add_argument("--kubeconfig", default=_env("KUBECONFIG", "") or None)
    src.add_argument("--resync-seconds", type=int, default=_env_int("RESYNC_SECONDS", 300))
    src.add_argument(
        "--secret-refresh-seconds",
        type=float,
        default=_env_float("SECRET_REFRESH_SECONDS", 10),
        help="read the tasks' LLM-key Secrets again this often, for rotation (0: at resync only)",
    )

    cap = p.add_argument_group("capture")
    cap.add_argument(
        "--capture",
        default=_env("CAPTURE", ""),
        help="call-log directory or fsspec URI; empty disables capture",
    )
    cap.add_argument("--capture-spool", default=_env("CAPTURE_SPOOL", "/tmp/slm-capture-spool"))
    cap.add_argument("--capture-shard-mb", type=float, default=_env_float("CAPTURE_SHARD_MB", 64))
    cap.add_argument(
        "--capture-shard-seconds", type=float, default=_env_float("CAPTURE_SHARD_SECONDS", 300)
    )
    cap.add_argument(
        "--capture-queue",
        type=int,
        default=_env_int("CAPTURE_QUEUE", 50000),
        help="records waiting for the redaction workers, at most (more are dropped, counted)",
    )
    cap.add_argument(
        "--capture-queue-mb",
        type=float,
        default=_env_float("CAPTURE_QUEUE_MB", 256),
        help="MiB of request and response bodies waiting for the redaction workers, at most "
        "(more are dropped and counted as queue_full; keep it well under the memory limit)",
    )
    cap.add_argument(
        "--capture-spool-mb",
        type=float,
        default=_env_float("CAPTURE_SPOOL_MB", 1024),
        help="MiB of shards a URI target's spool holds, open or waiting for upload, at most "
        "(more records are dropped and counted as spool_full; keep it under the spool's disk)",
    )
    cap.add_argument("--capture-workers", type=int, default=_env_int("CAPTURE_WORKERS", 1))
    cap.add_argument(
        "--capture-linger-ms",
        type=float,
        default=_env_float("CAPTURE_LINGER_MS", 2),
        help="how long records gather before a batch goes to the redaction workers",
    )

    up = p.add_argument_group("upstreams")
    up.add_argument(
        "--slm-timeout-ms",
        type=float,
        default=_env_float("SLM_TIMEOUT_MS", DEFAULT_SLM_TIMEOUT_S * 1000),
        help="SLM budget per call unless the task sets one (default 2000)",
    )
    up.add_argument(
        "--llm-timeout-s",
        type=float,
        default=_env_float("LLM_TIMEOUT_S", DEFAULT_LLM_TIMEOUT_S),
    )
    up.add_argument("--breaker-failures", type=int, default=_env_int("BREAKER_FAILURES", 5))
    up.add_argument("--breaker-cooldown-s", type=float, default=_env_float("BREAKER_COOLDOWN_S", 5))
    up.add_argument("--max-shadow-inflight", type=int, default=_env_int("MAX_SHADOW_INFLIGHT", 64))
    up.add_argument(
        "--upstream-pool-size",
        type=int,
        default=_env_int("UPSTREAM_POOL_SIZE", 1024),
        help="connections per upstream origin, shared by all tasks; calls past it wait (up to "
        "their timeout), then 503 gateway_busy (default %(default)s)",
    )
    up.add_argument(
        "--llm-api-key-env",
        default=_env("LLM_API_KEY_ENV", DEFAULT_KEY_ENV),
        help="name of the env var holding the LLM key for routes without a Secret",
    )
    up.add_argument("--llm-api-key-file", default=_env("LLM_API_KEY_FILE", ""))
    up.add_argument(
        "--price",
        action="append",
        type=parse_price,
        default=[],
        help="USD per 1k tokens, BACKEND=PROMPT:COMPLETION (repeatable); defaults "
        "llm=0.0025:0.01, slm=0.0001:0.0004",
    )

    auth = p.add_argument_group("agent authentication")
    auth.add_argument(
        "--agent-auth",
        default=_env("AGENT_AUTH", AUTH_NONE),
        help="none: any caller; serviceaccount: agents send a Kubernetes ServiceAccount token "
        "as their API key and call their own namespace's tasks only (a TokenReview per token "
        "and cache period; the gateway needs `create` on tokenreviews)",
    )
    auth.add_argument(
        "--agent-auth-audience",
        default=_env("AGENT_AUTH_AUDIENCE", DEFAULT_AUDIENCE),
        help="the audience agent tokens must be minted for (default %(default)s)",
    )
    auth.add_argument(
        "--agent-auth-cache-seconds",
        type=float,
        default=_env_float("AGENT_AUTH_CACHE_SECONDS", 60),
        help="how long a reviewed token is trusted before it is reviewed again (default "
        "%(default)s; never past the token's own expiry)",
    )
    auth.add_argument(
        "--agent-auth-reviews-per-second",
        type=float,
        default=_env_float("AGENT_AUTH_REVIEWS_PER_SECOND", DEFAULT_REVIEWS_PER_S),
        help="TokenReviews a second, at most, for tokens never found valid, after a burst of "
        "five times as many (default %(default)s): past it a call gets a 429 without a review, "
        "so that made-up tokens cannot flood the API server; tokens the API server found valid "
        "before are reviewed again without limit",
    )

    srv = p.add_argument_group("server")
    # An empty SLM_GATEWAY_HOST is taken as unset (as Kubernetes manifests write "not set"):
    # it used to reach bind() as "", which listens on every interface.
    srv.add_argument(
        "--host",
        default=_env("HOST", "") or DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 or :: for every interface)",
    )
    srv.add_argument("--port", type=int, default=_env_int("PORT", 8080), help="0 picks one")
    srv.add_argument("--port-file", default="", help="write the bound port here once listening")
    srv.add_argument(
        "--max-body-bytes", type=int, default=_env_int("MAX_BODY_BYTES", DEFAULT_MAX_BODY)
    )
    srv.add_argument(
        "--body-timeout-s",
        type=float,
        default=_env_float("BODY_TIMEOUT_S", 30),
        help="seconds a request body may take to arrive; then 408 (default %(default)s)",
    )
    srv.add_argument(
        "--log-level", default=_env("LOG_LEVEL", "info"), help=f"one of {', '.join(LOG_LEVELS)}"
    )
    srv.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        help="text (time, level, logger, message) or json (one object a line: timestamp, "
        "level, logger, message, exception); uvicorn's and the capture workers' lines too",
    )
    srv.add_argument(
        "--graceful-timeout-s", type=float, default=_env_float("GRACEFUL_TIMEOUT_S", 30)
    )
    srv.add_argument(
        "--removed-task-metrics-s",
        type=float,
        default=_env_float("REMOVED_TASK_METRICS_S", REMOVED_TASK_GRACE_S),
        help="seconds a removed task's metric series are still exported, so every scraper "
        "reads their final values (default %(default)s)",
    )
    return p


#: flag, argparse's name for it, lowest value allowed, whether that value itself is allowed.
_LOWER_BOUNDS: tuple[tuple[str, str, float, bool], ...] = (
    ("--slm-timeout-ms", "slm_timeout_ms", 0.0, False),
    ("--llm-timeout-s", "llm_timeout_s", 0.0, False),
    ("--breaker-failures", "breaker_failures", 1, True),
    ("--breaker-cooldown-s", "breaker_cooldown_s", 0.0, True),
    ("--resync-seconds", "resync_seconds", 1, True),
    ("--secret-refresh-seconds", "secret_refresh_seconds", 0.0, True),
    ("--capture-shard-mb", "capture_shard_mb", 0.0, False),
    ("--capture-shard-seconds", "capture_shard_seconds", 0.0, False),
    ("--capture-queue-mb", "capture_queue_mb", 0.0, False),
    ("--capture-spool-mb", "capture_spool_mb", 0.0, False),
    ("--graceful-timeout-s", "graceful_timeout_s", 0.0, True),
    ("--body-timeout-s", "body_timeout_s", 0.0, False),
    ("--removed-task-metrics-s", "removed_task_metrics_s", 0.0, True),
    ("--agent-auth-cache-seconds", "agent_auth_cache_seconds", 0.0, True),
    # 0 would refuse every token not yet cached.
    ("--agent-auth-reviews-per-second", "agent_auth_reviews_per_second", 0.0, False),
    # 0 or less made every call a 413.
    ("--max-body-bytes", "max_body_bytes", MIN_MAX_BODY, True),
    # 0 skipped every shadow comparison: a shadow task never gathered the agreement its
    # promotion needs, without a word.
    ("--max-shadow-inflight", "max_shadow_inflight", 1, True),
    # 0 would leave every call waiting for a connection that can never be opened.
    ("--upstream-pool-size", "upstream_pool_size", 1, True),
)


def _check_upstream_limits(args: argparse.Namespace) -> None:
    """Refuse the timeouts, breaker settings and resync period that would break every task.

    Why at start: each of these used to be accepted and fail only per request or per task: a
    zero or negative SLM budget made every task unroutable (404 ``model_not_found``), a zero
    LLM timeout or breaker threshold failed every call (500), and a resync under 1 s made the
    watch fail over and over. The environment variables (``SLM_GATEWAY_SLM_TIMEOUT_MS``, ...)
    are the flags' defaults, so they are checked here too, and named in the message. Every
    other number of seconds or MiB is held to a finite value in its range too: ``nan`` passes
    any ``<=`` test, and the capture sizes, converted to bytes with ``int()``, crashed the
    start with a traceback ("cannot convert float NaN to integer").
    """
    for flag, name, low, inclusive in _LOWER_BOUNDS:
        value = getattr(args, name)
        ok = value >= low if inclusive else value > low
        if ok and math.isfinite(value):
            continue
        bound = f"at least {low:g}" if inclusive else f"above {low:g}"
        if not math.isfinite(value):
            bound = f"a finite number {bound}"
        env = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
        build_parser().error(f"{flag} must be {bound} (got {value:g}; {env} sets its default)")


def _check_env_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, in one line and with exit 2 like a bad flag, every bad variable still in use.

    A :class:`BadEnv` left in ``args`` is one whose flag was not given; one whose flag was given
    is overridden and harmless, as any other default is.
    """
    bad = [
        value.message(action.option_strings[0])
        for action in parser._actions
        if isinstance(value := getattr(args, action.dest, None), BadEnv)
    ]
    if bad:
        parser.error("; ".join(bad))


def _check_server(args: argparse.Namespace) -> None:
    """Refuse a port outside 0..65535 and an empty host, in one line like any bad flag.

    Why: argparse only checks that the port is an integer, and ``bind()`` then ended the start
    in an ``OverflowError`` traceback; an empty ``--host`` listened on every interface, where
    the default is loopback only.
    """
    if not 0 <= args.port <= 65535:
        build_parser().error(
            f"--port must be within 0..65535, 0 picks a free one (got {args.port}; "
            f"{ENV_PREFIX}PORT sets its default)"
        )
    if not args.host.strip():
        build_parser().error(
            "--host must not be empty (0.0.0.0 or :: listens on every interface; "
            f"an empty {ENV_PREFIX}HOST means {DEFAULT_HOST})"
        )


def _read_key_file(path: str) -> str:
    """The LLM key in ``path``, or a one-line error naming the flag (exit 2).

    Why: a missing or unreadable file ended the start in a traceback. The path is not shown:
    it may come from ``SLM_GATEWAY_LLM_API_KEY_FILE``, and a key pasted into the wrong
    variable must not reach a log; nor is a decode error's text, which quotes the file's bytes.
    """
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        build_parser().error(
            f"--llm-api-key-file cannot be read: {why} "
            f"({ENV_PREFIX}LLM_API_KEY_FILE sets its default)"
        )


def config_from_args(argv: Sequence[str] | None = None) -> GatewayConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_env_values(parser, args)
    sources = sum(bool(x) for x in (args.routes, args.namespace, args.all_namespaces))
    if sources != 1:
        build_parser().error("give exactly one of --routes, --namespace, --all-namespaces")
    if not 0.0 < args.capture_linger_ms <= 10_000:
        build_parser().error("--capture-linger-ms must be above 0 and at most 10000")
    if args.capture_queue <= 0:
        build_parser().error("--capture-queue must be above 0")
    _check_upstream_limits(args)
    if args.log_level.lower() not in LOG_LEVELS:
        # The value is not shown: it may come from SLM_GATEWAY_LOG_LEVEL, a misplaced key.
        build_parser().error(
            f"--log-level must be one of {', '.join(LOG_LEVELS)} "
            f"({ENV_PREFIX}LOG_LEVEL sets its default)"
        )
    if args.log_format.lower() not in LOG_FORMATS:
        # The value is not shown, as for --log-level.
        build_parser().error(
            f"--log-format must be one of {', '.join(LOG_FORMATS)} "
            f"({ENV_PREFIX}LOG_FORMAT sets its default)"
        )
    if args.agent_auth not in AUTH_MODES:
        # The value is not shown: it may come from SLM_GATEWAY_AGENT_AUTH, a misplaced key.
        build_parser().error(
            f"--agent-auth must be one of {', '.join(AUTH_MODES)} "
            f"({ENV_PREFIX}AGENT_AUTH sets its default)"
        )
    if not args.agent_auth_audience.strip():
        build_parser().error("--agent-auth-audience must not be empty")
    _check_server(args)
    key = ""
    if args.llm_api_key_file:
        key = _read_key_file(args.llm_api_key_file)
    elif args.llm_api_key_env:
        # Stripped as the file's is: a variable set from a Secret made of a file ends in one.
        key = os.environ.get(args.llm_api_key_env, "").strip()
    problem = header_value_problem(key) if args.routes else ""
    if problem:  # every route of the routes file would be refused for it
        source = "--llm-api-key-file" if args.llm_api_key_file else f"${args.llm_api_key_env}"
        build_parser().error(f"the LLM key in {source} is unusable: {problem}")
    capture = None
    if args.capture:
        capture = CaptureConfig(
            target=args.capture,
            max_shard_bytes=int(args.capture_shard_mb * 1024 * 1024),
            max_shard_seconds=args.capture_shard_seconds,
            queue_size=args.capture_queue,
            queue_bytes=int(args.capture_queue_mb * 1024 * 1024),
            max_spool_bytes=int(args.capture_spool_mb * 1024 * 1024),
            workers=args.capture_workers,
            linger_s=args.capture_linger_ms / 1000.0,
            spool=args.capture_spool,
            log_level=args.log_level.lower(),
            log_format=args.log_format.lower(),
        )
    prices = dict(DEFAULT_PRICES)
    prices.update(dict(args.price))
    namespaces = tuple(dict.fromkeys(x.strip() for x in args.namespace.split(",") if x.strip()))
    if args.namespace and not namespaces:
        build_parser().error("--namespace names no namespace")
    return GatewayConfig(
        routes_file=args.routes,
        namespace=namespaces[0] if len(namespaces) == 1 else None,
        namespaces=namespaces if len(namespaces) > 1 else (),
        all_namespaces=args.all_namespaces,
        kubeconfig=args.kubeconfig,
        resync_s=args.resync_seconds,
        secret_refresh_s=args.secret_refresh_seconds,
        capture=capture,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
        slm_timeout_s=args.slm_timeout_ms / 1000.0,
        llm_timeout_s=args.llm_timeout_s,
        breaker_failures=args.breaker_failures,
        breaker_cooldown_s=args.breaker_cooldown_s,
        max_shadow_inflight=args.max_shadow_inflight,
        prices=prices,
        llm_api_key=key,
        llm_api_key_file=args.llm_api_key_file,
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        log_level=args.log_level.lower(),
        log_format=args.log_format.lower(),
        graceful_timeout_s=args.graceful_timeout_s,
        pool_size=args.upstream_pool_size,
        removed_task_metrics_s=args.removed_task_metrics_s,
        agent_auth=args.agent_auth,
        agent_auth_audience=args.agent_auth_audience.strip(),
        agent_auth_cache_s=args.agent_auth_cache_seconds,
        agent_auth_reviews_per_s=args.agent_auth_reviews_per_second,
    )
