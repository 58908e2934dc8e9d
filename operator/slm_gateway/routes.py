"""Where each task's calls go: routes built from AgentTask objects or a static file.

Why a route is derived here rather than read verbatim from ``status.route``: a task that has
no status yet (just applied, nothing trained) must already be served by its LLM and captured,
since capture is what produces its training data. So the spec's ``fallback.llm`` is the
default, and ``status.route`` (written by the operator) overrides it as the task progresses.

:func:`route_from_task` is pure: the Kubernetes adapter (:mod:`slm_gateway.kube`) feeds it
watched objects and the API key it read from the task's Secret. :class:`RouteTable` is the
live map the request path reads; it is replaced copy-on-write so the event loop never takes a
lock.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import yaml

from slm_contract import TaskType
from slm_gateway.httpclient import JSON_HEADERS, Target, safe_url, with_path

MODE_LLM = "llm"
MODE_SHADOW = "shadow"
MODE_CANARY = "canary"
MODE_SLM = "slm"
MODES = (MODE_LLM, MODE_SHADOW, MODE_CANARY, MODE_SLM)

#: The SLM's time budget per call when neither the route nor the task says otherwise.
DEFAULT_SLM_TIMEOUT_S = 2.0
#: A slow LLM is still the last resort, so its budget is generous.
DEFAULT_LLM_TIMEOUT_S = 120.0
#: Annotation that sets a task's SLM budget when spec.serving.slo.slmTimeoutMs (copied by the
#: operator to status.route.slmTimeoutMs, which wins) is unset.
SLM_TIMEOUT_ANNOTATION = "slmfleet.dev/slm-timeout-ms"
#: Annotation on an LLM key Secret: where its key may be sent, ``host`` or ``host:port``,
#: comma-separated (see :func:`parse_llm_hosts`). Set by the Secret's owner, who alone decides
#: where the key goes; a Secret without it lets its key go nowhere.
LLM_HOSTS_ANNOTATION = "slmfleet.dev/llm-hosts"
#: One entry of that annotation: a host (``*.`` in front for any subdomain) and its port, or
#: None for https on 443 only (see :func:`key_may_go_to`).
LLMHost = tuple[str, int | None]
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: What an entry without a port allows: the key goes encrypted, whatever the task's URL says.
_HTTPS_DEFAULT = ("https", 443)


class RouteError(ValueError):
    """A route cannot be built from what was given; the message says which field."""


#: What a task's and its namespace's names may not hold (see :meth:`Route.__post_init__`).
_NOT_ONE_COMPONENT = re.compile(r"[/\\\x00]")


def _http_url(url: str) -> bool:
    """Whether ``url`` names the http or https scheme, in any case: URL schemes are
    case-insensitive, and admission (the CRD's ``isURL``), the operator and the HTTP client
    take ``HTTPS://...``; refused here, such a task's route was dropped and every call for it
    failed while the operator trained its model."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https")


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per 1,000 tokens for one backend."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1000.0


def price_from(value: Any, task: str) -> Price | None:
    """``{"prompt": P, "completion": C}`` (USD per 1,000 tokens) as a Price; None when unset."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RouteError(f"task {task}: llmPrice must be an object with prompt and completion")
    prompt = _num(value.get("prompt"), "llmPrice.prompt", task)
    completion = _num(value.get("completion"), "llmPrice.completion", task)
    if not (math.isfinite(prompt) and math.isfinite(completion)) or min(prompt, completion) < 0:
        raise RouteError(f"task {task}: llmPrice must be finite and not negative")
    return Price(prompt, completion)


@dataclass(frozen=True, slots=True)
class Route:
    """How one task's calls are served. Derived request constants are precomputed once here,
    when the route changes, so the request path allocates nothing to build URLs or headers."""

    task: str
    mode: str
    #: Out of ``repr``, as the URLs built from them: their user info or query may hold a key
    #: (``llm_log_url`` and ``slm_log_url`` are shown instead).
    llm_base_url: str = field(repr=False)
    llm_model: str
    namespace: str = ""
    slm_endpoint: str = field(default="", repr=False)
    slm_model: str = ""
    canary_percent: int = 0
    confidence_threshold: float = 0.0
    #: The task's evaluation metric; shadow agreement is measured with it.
    metric: str = ""
    #: The task's ``spec.taskType``, which decides what label-accuracy compares; "" (a routes
    #: file that names none): compared as a classification task's labels.
    task_type: str = ""
    slm_timeout_s: float = DEFAULT_SLM_TIMEOUT_S
    llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S
    reason: str = ""
    #: What this task's LLM costs (spec.fallback.llm.price); None: the gateway's --price llm.
    llm_price: Price | None = None
    llm_api_key: str = field(default="", repr=False)
    #: Why the task's LLM must not be called ("" when it may): its key's Secret does not let
    #: the key go to this LLM's host (:func:`key_withheld`). The key is then left out of the
    #: route, and every LLM call answered with a 502 carrying this message, without calling
    #: the LLM at all: unauthenticated, it would only answer 401, and the call would tell
    #: whoever runs that server what the agent asked.
    llm_blocked: str = ""
    llm_url: str = field(init=False, default="", repr=False)
    slm_url: str = field(init=False, default="", repr=False)
    #: ``llm_url`` and ``slm_url`` as logs and the circuit gauge's ``endpoint`` label show
    #: them (:func:`safe_url`: no user info, no query): a query may hold a provider's key.
    llm_log_url: str = field(init=False, default="")
    slm_log_url: str = field(init=False, default="")
    llm_headers: Mapping[str, str] = field(init=False, repr=False, default_factory=dict)
    llm_target: Target = field(init=False, repr=False, compare=False)
    slm_target: Target = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The task and its namespace name its capture folder: one path component each, or
        # a routes file's "../x" wrote calls outside --capture. (Kubernetes names are.)
        for part in filter(None, (self.task, self.namespace)):
            if part in (".", "..") or _NOT_ONE_COMPONENT.search(part):
                raise RouteError(
                    f"task {self.task!r}: a name must not be '.' or '..' nor hold '/', '\\' "
                    "or NUL (it names the task's capture folder)"
                )
        if self.mode not in MODES:
            raise RouteError(f"task {self.task}: mode must be one of {', '.join(MODES)}")
        if not _http_url(self.llm_base_url):
            raise RouteError(f"task {self.task}: llmBaseURL must be an http(s) URL")
        if self.slm_endpoint and not _http_url(self.slm_endpoint):
            raise RouteError(f"task {self.task}: slmEndpoint must be an http(s) URL")
        if not 0 <= self.canary_percent <= 100:
            raise RouteError(f"task {self.task}: canaryPercent must be within 0..100")
        # The gateway serves an SLM answer unless its confidence (in [0, 1]) is below the
        # threshold: a NaN or negative one turned that gate off, serving every answer, and one
        # above 1 answers nothing. The trainer reports thresholds in [0, 1] only.
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise RouteError(f"task {self.task}: confidenceThreshold must be within 0..1")
        # A budget of 0 or less (or NaN) would never expire: a hung SLM would then hold every
        # call instead of costing it its budget and falling back.
        for name, value in (
            ("slmTimeoutMs", self.slm_timeout_s),
            ("llm timeout", self.llm_timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise RouteError(f"task {self.task}: {name} must be a positive number")
        s = object.__setattr__
        model = self.slm_model or self.task
        s(self, "slm_model", model)
        # Parsed once, with the request head precomputed (the JSON headers and the task's own
        # Authorization), so a call only appends its Content-Length and body. A URL the CRD's
        # isURL() lets through but HTTP cannot use (a port above 65535), or an API key with a
        # line break, fails this one task with a RouteError; callers skip the task, the other
        # tasks keep routing. The error says what is wrong and where the URL points, never
        # the URL itself (its user info or query may hold a key): Target.parse's messages
        # quote nothing, and safe_url drops both.
        s(
            self,
            "llm_headers",
            {"Authorization": f"Bearer {self.llm_api_key}"} if self.llm_api_key else {},
        )
        try:
            # The path gets the suffix; a query (Azure's ?api-version=) stays after it.
            s(self, "llm_url", with_path(self.llm_base_url, "/chat/completions"))
            s(
                self,
                "llm_target",
                Target.parse(self.llm_url, (*JSON_HEADERS, *self.llm_headers.items())),
            )
        except ValueError as exc:
            raise RouteError(
                f"task {self.task}: unusable LLM URL {safe_url(self.llm_base_url)} or API key "
                f"({exc})"
            ) from None
        s(self, "llm_log_url", safe_url(self.llm_url))
        try:
            if self.slm_endpoint:
                s(self, "slm_url", with_path(self.slm_endpoint, f"/v2/models/{model}/infer"))
            s(self, "slm_target", Target.parse(self.slm_url or "http://unset.invalid/"))
        except ValueError as exc:
            raise RouteError(
                f"task {self.task}: unusable slmEndpoint {safe_url(self.slm_endpoint)} ({exc})"
            ) from None
        s(self, "slm_log_url", safe_url(self.slm_url) if self.slm_url else "")

    @property
    def key(self) -> str:
        """``namespace/task`` when the task came from a namespace, else the task name."""
        return f"{self.namespace}/{self.task}" if self.namespace else self.task

    @property
    def has_slm(self) -> bool:
        return bool(self.slm_url)

    def public(self) -> dict[str, Any]:
        """What ``/v1/models`` shows: never the key."""
        out: dict[str, Any] = {"mode": self.mode, "llm_model": self.llm_model}
        if self.slm_endpoint:
            # Agents read this: the endpoint's user info or query (a key?) is not theirs.
            out["slm_endpoint"] = safe_url(self.slm_endpoint)
        if self.mode == MODE_CANARY:
            out["canary_percent"] = self.canary_percent
        if self.reason:
            out["reason"] = self.reason
        return out


def _num(value: Any, name: str, task: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RouteError(f"task {task}: {name} must be a number")
    return float(value)


def _canary_percent(value: Any, task: str) -> int:
    """``canaryPercent`` as the whole percent :class:`Route` checks: int() of .inf or .nan
    raised a bare OverflowError or ValueError, which the callers (catching RouteError per
    task) did not expect."""
    percent = _num(value, "canaryPercent", task)
    if not math.isfinite(percent):
        raise RouteError(f"task {task}: canaryPercent must be within 0..100")
    return int(percent)


def _annotated_timeout_s(value: Any, task: str) -> float:
    """The SLM budget in seconds from the task's :data:`SLM_TIMEOUT_ANNOTATION`. A value that
    is not a positive number of milliseconds is refused naming the annotation: refused later
    by :class:`Route`, it named ``slmTimeoutMs``, a field the task does not set."""
    try:
        seconds = float(value) / 1000.0
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise RouteError(
            f"task {task}: annotation {SLM_TIMEOUT_ANNOTATION} must be a positive number of "
            "milliseconds"
        )
    return seconds


def secret_ref(task: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(namespace, secret name, key) of the task's LLM API key, or None when it needs none."""
    ref = (((task.get("spec") or {}).get("fallback") or {}).get("llm") or {}).get("apiKeySecretRef")
    if not isinstance(ref, Mapping) or not ref.get("name"):
        return None
    ns = (task.get("metadata") or {}).get("namespace", "")
    return ns, str(ref["name"]), str(ref.get("key") or "api-key")


def parse_llm_hosts(value: object) -> frozenset[LLMHost]:
    """The hosts a Secret's :data:`LLM_HOSTS_ANNOTATION` lets its key go to.

    Each entry, separated by commas or white space (a YAML block of one host per line
    reads as such), is ``host`` or ``host:port`` (an IPv6 literal in brackets,
    ``[::1]:8000``); a leading ``*.`` matches any subdomain (``*.openai.azure.com``: not
    ``openai.azure.com`` itself). Hosts are compared without case and without a trailing dot,
    IP literals in their canonical form. An entry without a port allows https on 443 only; one
    with a port allows that port with either scheme (``127.0.0.1:8000`` for a local server
    over http; ``llm.local:80`` for http on its default port): who lists a bare host means the
    public API, and an AgentTask editor must not be able to make the key go unencrypted by
    writing ``http://`` in the task's URL. An entry that is none of these (a port that is not
    a number, a bare ``*``, a scheme) allows nothing: a typo must never widen the list.
    """
    if not isinstance(value, str):
        return frozenset()
    hosts = set()
    for entry in _host_entries(value):
        parsed = _host_entry(entry)
        if parsed is not None:
            hosts.add(parsed)
    return frozenset(hosts)


def unread_llm_hosts(value: object) -> list[str]:
    """The entries of a :data:`LLM_HOSTS_ANNOTATION` value that :func:`parse_llm_hosts`
    cannot read and so ignores (``https://api.openai.com``, ``api.openai.com/v1``), in order.

    Why: such an entry allows nothing, by design, and the only sign was a 502 naming the host
    to add, which the Secret's owner believed they had added. The gateway logs these once.
    """
    if not isinstance(value, str):
        return []
    return [entry for entry in _host_entries(value) if _host_entry(entry) is None]


def unread_host_hint(entry: str) -> tuple[str, str]:
    """An entry of :func:`unread_llm_hosts` as a log may show it, and the host entry its
    owner probably meant ("" when none reads as one): ``https://user:pw@api.example.com/v1``
    is ``("https://api.example.com/v1", "api.example.com")``.

    Why: an owner who pasted the provider's whole URL may have pasted its credentials with it
    (user info, a ``?key=`` in the query), and the log is read by more people than the
    Secret. Shown without user info, query or fragment: through :func:`safe_url` when it
    splits with a host part; else (no ``//``: ``urlsplit`` would read ``user:pw@host`` as a
    scheme and a path) cut after the last ``@`` and before the first ``?`` or ``#``.
    """
    try:
        split = bool(urlsplit(entry).netloc)
    except ValueError:
        split = False
    if split:
        shown = safe_url(entry)
        meant = llm_host(shown)
    else:
        shown = re.split(r"[?#]", entry.rpartition("@")[2], maxsplit=1)[0]
        meant = "" if "//" in shown else llm_host("https://" + shown)
    return shown, (meant if meant and _host_entry(meant) is not None else "")


def _host_entries(value: str) -> list[str]:
    return [entry for entry in re.split(r"[,\s]+", value) if entry]


def _host_entry(entry: str) -> LLMHost | None:
    """One entry of :func:`parse_llm_hosts`, or None when it is not a host[:port]."""
    port: int | None = None
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        host, bracket, rest = entry[1:].partition("]")
        if not bracket:
            return None
        if rest:
            if not rest.startswith(":"):
                return None
            port = _port(rest[1:])
            if port is None:
                return None
    elif entry.count(":") == 1:
        host, _, text = entry.partition(":")
        port = _port(text)
        if port is None:
            return None
    else:  # a name, an IPv4 address, or a bare IPv6 literal (no port)
        host = entry
    wildcard = host.startswith("*.")
    name = _host_name(host[2:] if wildcard else host)
    if not name or "*" in name or (wildcard and ":" in name):
        return None
    return ("*." + name if wildcard else name), port


def _port(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()):
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def _host_name(host: str) -> str:
    """``host`` as compared: lower case, no trailing dot, an IP literal in canonical form;
    "" for one that holds what no host name may (a space, a slash, a bracket, user info)."""
    host = host.lower().rstrip(".")
    if not host or any(c in host for c in " \t\r\n/\\@[]?#%") or not host.isascii():
        return ""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def llm_origin(url: str) -> tuple[str, int] | None:
    """(host, port) that a call to ``url`` connects to, as :func:`parse_llm_hosts` compares
    hosts; None for a URL the gateway cannot call (no http(s) scheme, no host, a bad port).

    The host is what ``urlsplit`` reads, as the gateway's HTTP client does: user info is not
    the host (``http://api.openai.com@evil.example/`` connects to ``evil.example``). A
    backslash in the authority is refused outright: other URL parsers read it as a slash.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if default is None or "\\" in parts.netloc:
        return None
    host = _host_name(parts.hostname or "")
    if not host:
        return None
    return host, port or default


def llm_host(url: str) -> str:
    """The ``host`` or ``host:port`` to add to a Secret's :data:`LLM_HOSTS_ANNOTATION` so its
    key may go to ``url`` ("" for a URL the gateway cannot call): the bare host only for https
    on 443, which is all a bare host allows (http on port 80 is ``host:80``)."""
    origin = llm_origin(url)
    if origin is None:
        return ""
    host, port = origin
    shown = f"[{host}]" if ":" in host else host
    return shown if (urlsplit(url).scheme.lower(), port) == _HTTPS_DEFAULT else f"{shown}:{port}"


def key_may_go_to(url: str, hosts: Iterable[LLMHost]) -> bool:
    """Whether a Secret that allows ``hosts`` (:func:`parse_llm_hosts`) lets its key go with a
    call to ``url``. Pure; no hosts allow nothing.

    Why: a task's LLM URL is written by whoever may create or patch the AgentTask (its spec,
    or the status the operator copies), while the key belongs to the Secret's owner. Without
    this check anyone allowed to edit tasks, but not to read Secrets, pointed a task at a
    server of theirs and received the platform's key in its Authorization header. An entry
    without a port allows https on 443 only: with the URL's default port it also allowed
    ``http://`` on 80, and so an AgentTask editor could have the key sent unencrypted.
    """
    origin = llm_origin(url)
    if origin is None:
        return False
    host, port = origin
    scheme = urlsplit(url).scheme.lower()
    for allowed, allowed_port in hosts:
        if allowed_port is None:
            if (scheme, port) != _HTTPS_DEFAULT:
                continue
        elif allowed_port != port:
            continue
        if allowed.startswith("*."):
            if host.endswith(allowed[1:]) and len(host) > len(allowed) - 1:
                return True
        elif host == allowed:
            return True
    return False


def key_withheld(task: str, secret: str, url: str) -> str:
    """What an agent is told (and the log says) when the task's key from ``secret``
    (``namespace/name``) may not go to ``url``: the Secret, the host and the exact fix. Never
    the key, nor the URL beyond its host (its query may hold a key)."""
    host = llm_host(url) or safe_url(url)
    return (
        f"The gateway did not call the LLM of task {task!r}: its LLM key (Secret {secret}) may "
        f"not be sent to {host}, which the Secret's {LLM_HOSTS_ANNOTATION} annotation does not "
        f"list. The Secret's owner must add {host} to the Secret's {LLM_HOSTS_ANNOTATION} "
        f"annotation, as host or host:port without a scheme or path (or the task must use an "
        "LLM URL the Secret allows)."
    )


def route_from_task(
    task: Mapping[str, Any],
    *,
    api_key: str = "",
    key_hosts: frozenset[LLMHost] | None = None,
    default_slm_timeout_s: float = DEFAULT_SLM_TIMEOUT_S,
    llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S,
) -> Route:
    """The route of one AgentTask: ``status.route`` over the spec's LLM, pure.

    A mode other than ``llm`` without an SLM endpoint cannot be served as asked, so it degrades
    to ``llm`` (and says so in ``reason``) rather than failing every call.

    ``key_hosts``: where the Secret that ``api_key`` came from lets it go
    (:func:`parse_llm_hosts`); None for a key the gateway's own configuration gave (a routes
    file), which goes to any LLM. A key that may not go to the task's LLM URL is left out of
    the route, whose LLM calls are then refused with :attr:`Route.llm_blocked`.
    """
    meta = task.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise RouteError("AgentTask has no metadata.name")
    spec = task.get("spec") or {}
    llm = (spec.get("fallback") or {}).get("llm") or {}
    status = task.get("status") or {}
    route = status.get("route") or {}
    mode = route.get("mode") or MODE_LLM
    base = route.get("llmBaseURL") or llm.get("baseURL")
    model = route.get("llmModel") or llm.get("model")
    if not isinstance(base, str) or not isinstance(model, str) or not model:
        raise RouteError(f"task {name}: no LLM (spec.fallback.llm.baseURL and model)")
    endpoint = route.get("slmEndpoint") or ""
    reason = str(route.get("reason") or "")
    if mode not in MODES:
        raise RouteError(f"task {name}: mode must be one of {', '.join(MODES)}")
    if mode != MODE_LLM and not endpoint:
        mode, reason = MODE_LLM, f"mode {route.get('mode')} has no slmEndpoint yet"
    threshold = route.get("confidenceThreshold")
    if threshold is None:
        threshold = (status.get("selectedModel") or {}).get("threshold", 0.0)
    timeout_s = default_slm_timeout_s
    if route.get("slmTimeoutMs") is not None:
        timeout_s = _num(route["slmTimeoutMs"], "slmTimeoutMs", name) / 1000.0
    else:
        annotated = (meta.get("annotations") or {}).get(SLM_TIMEOUT_ANNOTATION)
        if annotated:
            timeout_s = _annotated_timeout_s(annotated, name)
    blocked = ""
    if api_key and key_hosts is not None and not key_may_go_to(base, key_hosts):
        ref = secret_ref(task)
        secret = "/".join(filter(None, ref[:2])) if ref else "(none named)"
        api_key, blocked = "", key_withheld(name, secret, base)
    return Route(
        task=name,
        namespace=str(meta.get("namespace") or ""),
        mode=str(mode),
        llm_base_url=base,
        llm_model=model,
        slm_endpoint=str(endpoint),
        canary_percent=_canary_percent(route.get("canaryPercent", 0), name),
        confidence_threshold=_num(threshold, "confidenceThreshold", name),
        metric=str(route.get("metric") or (spec.get("evaluation") or {}).get("metric") or ""),
        task_type=str(spec.get("taskType") or "tool-call"),  # the CRD's default
        slm_timeout_s=timeout_s,
        llm_timeout_s=llm_timeout_s,
        reason=reason,
        llm_price=price_from(route.get("llmPrice", llm.get("price")), name),
        llm_api_key=api_key,
        llm_blocked=blocked,
    )


#: The CRD's ``spec.taskType`` values, which a routes file's ``taskType`` may name.
TASK_TYPES: tuple[str, ...] = get_args(TaskType)


def _task_type(value: Any, name: str) -> str:
    """A routes file's ``taskType``: one of :data:`TASK_TYPES`, or "" when it names none. A
    misspelt one is refused, as a wrong ``mode`` is: taken as given, it changed silently what
    live agreement compares."""
    if value is None or value == "":
        return ""
    if value not in TASK_TYPES:
        raise RouteError(f"task {name}: taskType must be one of {', '.join(TASK_TYPES)}")
    return str(value)


def route_from_entry(
    name: str,
    entry: Mapping[str, Any],
    *,
    default_api_key: str = "",
    default_slm_timeout_s: float = DEFAULT_SLM_TIMEOUT_S,
    llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> Route:
    """A route from a static file's ``tasks.<name>`` entry (same keys as ``status.route``,
    plus ``slmModel``, ``slmTimeoutMs``, ``taskType``, and ``apiKeyEnv`` / ``apiKeyFile`` for
    the key)."""
    env = os.environ if environ is None else environ
    key = default_api_key
    if entry.get("apiKeyEnv"):
        key = env.get(str(entry["apiKeyEnv"]), "")
    elif entry.get("apiKeyFile"):
        key = Path(str(entry["apiKeyFile"])).read_text().strip()
    timeout_s = default_slm_timeout_s
    if entry.get("slmTimeoutMs") is not None:
        timeout_s = _num(entry["slmTimeoutMs"], "slmTimeoutMs", name) / 1000.0
    mode = str(entry.get("mode") or MODE_LLM)
    endpoint = str(entry.get("slmEndpoint") or "")
    reason = str(entry.get("reason") or "")
    if mode not in MODES:
        raise RouteError(f"task {name}: mode must be one of {', '.join(MODES)}")
    if mode != MODE_LLM and not endpoint:
        mode, reason = MODE_LLM, f"mode {entry.get('mode')} has no slmEndpoint"
    base, model = entry.get("llmBaseURL"), entry.get("llmModel")
    if not isinstance(base, str) or not isinstance(model, str) or not model:
        raise RouteError(f"task {name}: llmBaseURL and llmModel are required")
    return Route(
        task=name,
        mode=mode,
        llm_base_url=base,
        llm_model=model,
        slm_endpoint=endpoint,
        slm_model=str(entry.get("slmModel") or ""),
        canary_percent=_canary_percent(entry.get("canaryPercent", 0), name),
        confidence_threshold=_num(
            entry.get("confidenceThreshold", 0.0), "confidenceThreshold", name
        ),
        slm_timeout_s=timeout_s,
        llm_timeout_s=llm_timeout_s,
        reason=reason,
        llm_price=price_from(entry.get("llmPrice"), name),
        llm_api_key=key,
        metric=str(entry.get("metric") or ""),
        task_type=_task_type(entry.get("taskType"), name),
    )


def load_routes_file(
    path: str | Path,
    *,
    default_api_key: str = "",
    default_slm_timeout_s: float = DEFAULT_SLM_TIMEOUT_S,
    llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
    key_files: list[Path] | None = None,
) -> list[Route]:
    """Routes from a YAML or JSON file, for local use without a cluster.

    Two shapes are accepted: ``{"tasks": {name: {mode, llmBaseURL, llmModel, ...}}}``, or
    AgentTask manifests (one or more YAML documents, or a ``List``), whose spec and status
    are read exactly as the cluster watch reads them. In the second shape the API key comes
    from ``default_api_key`` (the gateway's ``--llm-api-key-env`` / ``--llm-api-key-file``).

    ``key_files``, when given, gets each ``apiKeyFile`` the file names, even one that fails
    to read: the gateway reloads when one of them changes, so a rotated key (a mounted
    Secret) is in use without a restart and without touching the routes file.
    """
    routes: list[Route] = []
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except yaml.MarkedYAMLError as exc:
        # PyYAML's own text quotes the lines around the error, and the line being edited may
        # hold a URL with a key in it: name the place and the problem only.
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise RouteError(f"{path}: not valid YAML at {where}: {exc.problem}") from None
    for doc in docs:
        if not isinstance(doc, dict):
            raise RouteError(f"{path}: every document must be a mapping")
        if doc.get("kind") == "List":
            items = doc.get("items") or []
        elif doc.get("kind") == "AgentTask":
            items = [doc]
        else:
            items = []
        for item in items:
            routes.append(
                route_from_task(
                    item,
                    api_key=default_api_key,
                    default_slm_timeout_s=default_slm_timeout_s,
                    llm_timeout_s=llm_timeout_s,
                )
            )
        tasks = doc.get("tasks")
        if tasks is not None:
            if not isinstance(tasks, dict):
                raise RouteError(f"{path}: 'tasks' must map task names to routes")
            for name, entry in tasks.items():
                if not isinstance(entry, dict):
                    raise RouteError(f"{path}: tasks.{name} must be a mapping")
                if key_files is not None and not entry.get("apiKeyEnv") and entry.get("apiKeyFile"):
                    key_files.append(Path(str(entry["apiKeyFile"])))
                routes.append(
                    route_from_entry(
                        str(name),
                        entry,
                        default_api_key=default_api_key,
                        default_slm_timeout_s=default_slm_timeout_s,
                        llm_timeout_s=llm_timeout_s,
                        environ=environ,
                    )
                )
    return routes


class RouteTable:
    """The live routes, looked up by task name (or ``namespace/name``) on every request.

    Writers (the watch thread, the file reloader) build a new index and swap it in; readers
    on the event loop do one dict lookup and never block. A bare task name resolves to a
    route without a namespace of that name (a routes file's), else to the one task of that
    name when it is unique across the watched namespaces; a name several namespaces use
    resolves only as ``namespace/name`` (:meth:`keys_named` lists them).

    A watch event re-indexes only the name it changes: rebuilding the whole index on every
    event cost 2 ms per event with 10,000 tasks, so an operator rewriting every task's status
    kept the watch thread (and, through the GIL, the request path) busy for 20 s. The dicts
    are still copied, so that a reader never sees an index half-updated: a copy in C, it
    costs a tenth of the rebuild (0.2 ms per event with 10,000 tasks).
    """

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._index: dict[str, Route] = {}
        #: Bare task name -> the keys of the routes of that name, sorted.
        self._named: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self.ready = False
        self.version = 0

    def get(self, name: str) -> Route | None:
        return self._index.get(name)

    def keys_named(self, task: str) -> tuple[str, ...]:
        """The keys (``namespace/task``) of every route of task name ``task``, sorted."""
        return self._named.get(task, ())

    def routes(self) -> list[Route]:
        return sorted(self._routes.values(), key=lambda r: r.key)

    def __len__(self) -> int:
        return len(self._routes)

    def replace_all(self, routes: Iterable[Route]) -> None:
        """Set the whole table (a list, a resync, a file load) and mark it ready."""
        with self._lock:
            by_key = {r.key: r for r in routes}
            grouped: dict[str, list[str]] = {}
            for key, route in by_key.items():
                grouped.setdefault(route.task, []).append(key)
            named = {task: tuple(sorted(keys)) for task, keys in grouped.items()}
            index = dict(by_key)
            for task in named:
                _index_name(index, by_key, named, task)
            self._swap(by_key, index, named)
            self.ready = True

    def upsert(self, route: Route) -> None:
        with self._lock:
            if self._routes.get(route.key) == route:
                return
            routes = dict(self._routes)
            routes[route.key] = route
            self._changed(routes, route.key, route.task)

    def remove(self, key: str) -> None:
        with self._lock:
            old = self._routes.get(key)
            if old is None:
                return
            routes = dict(self._routes)
            del routes[key]
            self._changed(routes, key, old.task)

    def _changed(self, routes: dict[str, Route], key: str, task: str) -> None:
        """Swap in ``routes``, in which only ``key`` (of task name ``task``) changed."""
        named = dict(self._named)
        keys = set(named.get(task, ())) - {key}
        if key in routes:
            keys.add(key)
        if keys:
            named[task] = tuple(sorted(keys))
        else:
            del named[task]
        index = dict(self._index)
        if key in routes:
            index[key] = routes[key]
        else:
            index.pop(key, None)
        _index_name(index, routes, named, task)
        self._swap(routes, index, named)

    def _swap(
        self, routes: dict[str, Route], index: dict[str, Route], named: dict[str, tuple[str, ...]]
    ) -> None:
        self._routes, self._index, self._named = routes, index, named
        self.version += 1


def _index_name(
    index: dict[str, Route],
    routes: Mapping[str, Route],
    named: Mapping[str, tuple[str, ...]],
    task: str,
) -> None:
    """Set what the bare name ``task`` resolves to in ``index``: the route without a
    namespace of that name (its key is its name), else the one route of that name, else
    nothing (no route, or several namespaces' routes: ambiguous)."""
    keys = named.get(task, ())
    if task in routes:
        index[task] = routes[task]
    elif len(keys) == 1:
        index[task] = routes[keys[0]]
    else:
        index.pop(task, None)
