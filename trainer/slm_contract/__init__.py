"""The operator <-> trainer <-> gateway contract, in the standard library only.

Why a separate package: the operator must never import torch, transformers or peft, yet it has
to read what a trainer pod reports, and the gateway has to write call-log records that the
trainer reads. Both records are defined once here and imported by every side.

- :class:`TrainerResult` is what a finished trainer container writes to its termination message
  path (``/dev/termination-log``). The kubelet copies that file, at most 4096 bytes, into
  ``pod.status.containerStatuses[].state.terminated.message``, where the operator reads it.
- :class:`CallRecord` is one captured agent call (S1 of the conversion loop): a JSON line in a
  call-log shard.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlsplit

#: An AgentTask's spec.taskType, as every trainer stage takes it (``--task-type``).
TaskType = Literal["tool-call", "classification", "extraction", "generation"]

#: The kubelet truncates termination messages above this many bytes.
TERMINATION_MESSAGE_LIMIT = 4096

RESULT_SCHEMA = "slmfleet.dev/trainer-result/v1"
CALL_RECORD_SCHEMA = "slmfleet.dev/call-record/v1"

#: How a trainer container exits; the operator's Jobs act on it (a podFailurePolicy). A stage
#: that raised may have met something transient, so its Job may retry it; one stopped by
#: SIGTERM checkpointed, and a new pod resumes it (the code SIGTERM itself would give).
EXIT_CRASHED = 1
#: argparse's code for bad arguments: another pod would be refused the same way.
EXIT_BAD_ARGUMENTS = 2
#: The stage ran and reported a failure (too few examples, nothing passing): a retry repeats it.
EXIT_REPORTED = 3
EXIT_PREEMPTED = 143
#: Exit codes no retry changes: a trainer Job fails at once on them.
DEFINITE_EXIT_CODES = (EXIT_BAD_ARGUMENTS, EXIT_REPORTED)

#: The most curated examples curate keeps when not told (``spec.dataset.maxExamples`` unset).
#: The trainer's own default, so the operator passes ``--max-examples`` only when a task sets
#: it: a trainer image older than the flag (a task that pins one) refused the whole command
#: line, and every data-prep Job failed at once after an operator upgrade.
DEFAULT_MAX_EXAMPLES = 100_000

#: What `slm-trainer <stage>` reports: prepare is curate (S2), then discover (S3), finetune
#: (S5), evaluate and export; prune removes a task's superseded revisions from the claim.
STAGES = ("prepare", "discover", "finetune", "evaluate", "export", "prune")


class ContractError(ValueError):
    """A record does not follow the contract; the message says which field and why."""


# ---- URIs in messages ----------------------------------------------------------------------
# A dataset, call-log or capture URI may carry credentials: ``https://user:pw@host/...``,
# ``webdav://user:pw@...``, a presigned ``s3://...?X-Amz-Signature=...``, an
# ``az://...?sas=...``. Trainer messages reach the pod's log and termination message, and from
# there the operator's conditions and Events, all read by far more people than the Secret the
# URI came from. So every message names a URI by scheme, host, port and path only.
# What no URI part here runs across: white space, quotes, angle brackets, and a backslash (a
# JSON escape: a URI quoted in a JSON line ends before ``\"``, which must stay intact).
# A ``'`` is legal in user info and in a query, though, and what followed it (the rest of a
# password, of a signature) was shown as prose: so a quote stays in the user info and host
# when an ``@`` follows before any white space, other quote or comma, and in a query or
# fragment unless only trailing punctuation comes between it and the URI's end
# (``'https://h/p?s=1'.``). The look for the ``@`` stops at the next quote or comma: run on
# to any later ``@``, the quote closing ``'https://h:9090',user='bob@corp.com'`` was read as
# user info (the URI became ``https://corp.com`` and the text between was lost), and each
# quote of a text looked to its end, so redacting took time in the square of its length.
_NOT = r"\s'\"<>\\"
_AUTH_QUOTE = r"'(?=[^\s\"'<>\\,]*@)"
_TAIL_QUOTE = rf"'(?![.,;:)\]}}]*(?:[{_NOT}]|$))"


def _uri_pattern(stop: str, authority_quote: str, tail_quote: str) -> re.Pattern[str]:
    """A URI's parts, none running across a character of ``stop``, or across a quote unless
    ``authority_quote`` (user info, host) or ``tail_quote`` (query, fragment) allows it."""
    end = rf"[^{stop}.,;:)\]#]"  # a query or fragment does not end on trailing punctuation
    anything = rf"[^{stop}]" if stop else r"[\s\S]"
    return re.compile(
        # scheme: at most 32 characters (real ones are far shorter); unbounded, it was read to
        # the end of the text from every word of "a.a.a.…", in time quadratic in the text
        r"(?i)\b([a-z][a-z0-9+.-]{0,31}://)"
        rf"(?:(?:[^{stop}/?#]|{authority_quote})*@)?"  # user info, dropped
        rf"((?:[^{stop}/?#]|{authority_quote})*)"  # host[:port], kept
        rf"([^{stop}?#]*)"  # path, kept
        rf"(?:\?(?:(?:[^{stop}#]|{tail_quote})*{end})?)?"  # query, dropped
        rf"(?:#(?:(?:{anything}|{tail_quote})*{end})?)?"  # fragment, dropped
    )


#: Every URI in free text, where a quote or a space may end one.
_URI = _uri_pattern(_NOT, _AUTH_QUOTE, _TAIL_QUOTE)
#: One URI, all of it: nothing in it ends it early (``(?!)`` never matches).
_ONE_URI = _uri_pattern("", "(?!)", "(?!)")


def _kept(m: re.Match[str]) -> str:
    scheme, host, path = m.groups()
    tail = ""
    if not path and host.endswith(":"):
        # "at http://prometheus:9090: refused": the colon after a path-less URI is the
        # sentence's, not a port's (taken for one, the real port was dropped with it)
        host, tail = host[:-1], ":"
    # A "port" that is not digits is no port: most likely the password of user info that an
    # unencoded '/', '?' or '#' cut short (``https://u:p#w@h``), so it is dropped as well.
    if host.startswith("["):  # an IPv6 literal: its colons are not the port's
        name, bracket, rest = host.partition("]")
        name, port = name + bracket, rest
    else:
        name, colon, port = host.partition(":")
        port = colon + port
    if port and not (port[:1] == ":" and port[1:].isdigit()):
        host = name
    return scheme + host + path + tail


def _secret_parts(uri: str) -> list[str]:
    """The user info (and its password alone), query and fragment of ``uri``, as typed."""
    if "://" not in uri:
        return []
    rest = uri.split("://", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    parts = []
    if "@" in authority:
        userinfo = authority.rpartition("@")[0]
        parts += [userinfo, userinfo.partition(":")[2]]
    rest, _, fragment = rest.partition("#")
    parts += [rest.partition("?")[2], fragment]
    # Longest first, so that a password inside the user info is not replaced on its own
    # first, leaving the user name and a marker to find; very short parts (``?a``) are left:
    # replacing them everywhere would mangle the message and they hide nothing.
    return sorted({p for p in parts if len(p) >= 4}, key=len, reverse=True)


def redact_uris(text: str, *uris: str) -> str:
    """``text`` with every ``scheme://`` URI in it cut to ``scheme://host[:port]/path``, and
    the user info, query and fragment of each of ``uris`` replaced by ``***`` wherever they
    appear.

    Why on free text: exception messages (fsspec's, aiohttp's) quote the URI they failed on,
    and a stage's message quotes such an exception; why ``uris``: a filesystem's error may
    quote the path it made of the URI, without the scheme (``alice:pw@host/calls``), which
    no pattern can tell from prose. Local paths (no ``://``) are left as they are. Stdlib
    ``re`` only, so the operator and both trainer stages can use it cheaply; never raises.
    """
    for part in (p for uri in uris for p in _secret_parts(uri)):
        text = text.replace(part, "***")
    return _URI.sub(_kept, text)


def redact_uri(uri: str) -> str:
    """One URI as a message may show it (see :func:`redact_uris`): no user info, no query.

    Read as one URI throughout: a quote or space in its password or query (legal, or typed)
    is part of it, where in free text it could end it. Cut at one, the rest of the secret
    was shown, and a later :func:`redact_uris` with the full URI no longer found it.
    """
    return _ONE_URI.sub(_kept, uri)


#: What Go's net/url (the CRD's CEL ``isURL``) accepts in a host, port included: letters,
#: digits, the unreserved ``-._~``, the sub-delims, ``:`` before a port, the brackets of an
#: IPv6 literal and ``<>"``. Python's urlsplit takes more (``\\ { } | ^ ```), so a URL
#: the operator accepted could fail admission, or discover propose a manifest ``kubectl apply``
#: refuses.
_HOST_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]<>\""
)


def http_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an endpoint the gateway calls over HTTP, or None when it can.

    Why here: the gateway refuses such a URL when it builds a route (an LLM's ``baseURL``,
    a Triton endpoint), and the operator must refuse the same URLs in a task's spec before it
    starts GPU work on a task whose calls would all fail: one definition for both. The
    CRD's CEL rules on ``fallback.llm.baseURL`` say the same at admission.

    A port outside 1..65535, user info (``user:password@``, which belongs in a Secret), a
    fragment (HTTP never sends it, so whatever it meant would silently not happen), a
    space, control or non-ASCII character (a trailing space pasted with the URL, a line break
    that would inject a header) and a host character the CRD's ``isURL`` refuses (a
    backslash, a brace, a ``%`` escape) are refused. Every message names the problem, never
    a part of the URL: callers log it, and the URL's user info or query may hold a key.
    """
    if any(c.isspace() or not " " < c < "\x7f" for c in url):
        return "the URL contains a space, a control character or a non-ASCII character"
    try:
        parts = urlsplit(url)
    except ValueError:  # its text quotes the netloc, which may hold a password
        return "the URL cannot be parsed (a bracket in its host part?)"
    if parts.scheme.lower() not in ("http", "https"):
        return "the URL must start with http:// or https://"
    if "@" in parts.netloc:
        return "user info in the URL is not supported; use a Secret"
    if "#" in url:
        return "a fragment (#...) in the URL is not supported"
    if not parts.hostname:
        return "the URL has no host"
    if "%" in parts.netloc:
        return "a %-escape in the URL's host is not supported"
    if not _HOST_CHARS.issuperset(parts.netloc):
        return "the URL's host contains a character a host name may not hold (such as \\ { } | ^ `)"
    try:
        port = parts.port
    except ValueError:  # its text quotes the port part, which is not ours to show
        return "the URL's port is out of range or not a number"
    if port is not None and not 0 < port < 65536:
        return f"port {port} is out of range"
    return None


#: A JSON ``\uXXXX`` escape of a UTF-16 surrogate (paired or not), or a raw surrogate character:
#: the cheap test that decides whether a decoded line must be searched for lone surrogates.
_SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|[\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _has_lone_surrogate(data: Any) -> bool:
    """True if a string (value or key) anywhere in ``data`` holds a surrogate code point.

    ``json.loads`` joins an escaped surrogate pair into one character but keeps a lone one,
    which no UTF-8 writer can encode: every later ``.encode()`` or ``write`` would raise.
    Iterative, because a decoded document may be nested deeper than Python recursion allows.
    """
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _finite_or_none(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)  # an int past a double's range (10**400) raises OverflowError
    except OverflowError:  # (str() of it may be refused too: Python caps int digits)
        raise ContractError(
            f"{name} must be finite, got an integer of {int(value).bit_length()} bits"
        ) from None
    if not math.isfinite(number):
        raise ContractError(f"{name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class TrainerResult:
    """What one trainer stage reports when it ends, successfully or not.

    ``score`` and ``llm_score`` are in [0, 1] on the held-out split, measured with the
    AgentTask's evaluation metric against the same references; the operator applies the gate.
    """

    stage: str
    ok: bool
    candidate: str | None = None
    score: float | None = None
    llm_score: float | None = None
    parameters: int | None = None
    trainable_parameters: int | None = None
    artifact_uri: str | None = None
    threshold: float | None = None
    examples: int | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    message: str = ""
    schema: str = field(default=RESULT_SCHEMA)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ContractError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        # The operator quotes the message and names the candidate and artifact in conditions,
        # Events and status: a number or an object there crashed its reading of the Job.
        for name in ("message", "candidate", "artifact_uri"):
            v = getattr(self, name)
            if not isinstance(v, str) and not (v is None and name != "message"):
                raise ContractError(f"{name} must be a string, got {type(v).__name__}")
        for name in ("score", "llm_score", "threshold"):
            v = _finite_or_none(getattr(self, name), name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ContractError(f"{name} must be within [0, 1], got {v}")
        for name in ("train_seconds", "eval_seconds"):
            v = _finite_or_none(getattr(self, name), name)
            if v is not None and v < 0:
                raise ContractError(f"{name} must be >= 0, got {v}")
        for name in (
            "parameters",
            "trainable_parameters",
            "examples",
            "train_examples",
            "eval_examples",
        ):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ContractError(f"{name} must be a non-negative integer, got {_kind(v)}")
            if v is not None and v >= MAX_COUNT:  # the operator's float() and status writes
                raise ContractError(f"{name} must be below 2**63, got {v.bit_length()} bits")

    def to_json(self) -> str:
        """Compact JSON that always fits the kubelet's 4 KiB limit (the message is cut first)."""
        data = {k: v for k, v in asdict(self).items() if v is not None and v != ""}
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
            return text

        def with_message(chars: int) -> str:
            data["message"] = self.message[:chars] + " [truncated]"
            return json.dumps(data, separators=(",", ":"), sort_keys=True)

        # JSON escapes make a character cost 1 to 12 bytes (quotes, newlines, non-ASCII as
        # \uXXXX), so search for the longest prefix that fits instead of estimating it.
        lo, hi = 0, min(len(self.message), TERMINATION_MESSAGE_LIMIT)
        if len(with_message(lo).encode()) > TERMINATION_MESSAGE_LIMIT:
            raise ContractError("result does not fit the 4096-byte termination message")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(with_message(mid).encode()) <= TERMINATION_MESSAGE_LIMIT:
                lo = mid
            else:
                hi = mid - 1
        return with_message(lo)

    @classmethod
    def from_json(cls, text: str) -> TrainerResult:
        """Parse a termination message; raises ContractError with a readable reason."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"termination message is not JSON: {exc}") from exc
        except RecursionError:  # "[[[[..." past the decoder's depth
            raise ContractError("termination message is not JSON: nested too deep") from None
        if not isinstance(data, dict):
            raise ContractError("termination message must be a JSON object")
        schema = data.get("schema", RESULT_SCHEMA)
        if schema != RESULT_SCHEMA:
            raise ContractError(f"unsupported result schema, expected {RESULT_SCHEMA}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"unknown result fields: {', '.join(unknown)}")
        if "stage" not in data or "ok" not in data:
            raise ContractError("result needs 'stage' and 'ok'")
        if not isinstance(data["ok"], bool):
            raise ContractError("'ok' must be true or false")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ContractError(str(exc)) from exc

    def write(self, path: str) -> None:
        """Write to the container's termination message path (serialized first: a result
        that cannot be leaves the file as it was, not emptied)."""
        text = self.to_json()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)


@dataclass(frozen=True)
class CallRecord:
    """One captured agent call, as the gateway appends it to a task's call log (JSON lines).

    ``messages`` and ``tools`` are the OpenAI chat-completions request fields; ``response`` is
    the assistant message that was returned (``content`` and/or ``tool_calls``). ``backend`` is
    ``slm`` or ``llm``. The gateway drops auth headers and redacts PII and secrets in the
    messages and the response before writing; ``tools`` (the agent's own tool schemas, which
    a model must see verbatim to call them) are written as sent, so an agent must not put a
    secret in a tool's description or defaults.

    ``llm_only`` is true when the gateway would never send the call to an SLM for a reason
    the other fields do not show (``n`` > 1, ``logprobs``, a ``response_format`` other than
    text, ``tool_choice: "none"`` or ``allowed_tools``): curate leaves such a call out, as
    it does one whose tools or messages are the LLM's alone (:func:`llm_only_request`). It
    is written only when true, so an ordinary call's line is what it was before the field
    existed; a record without it (an older gateway's) reads as false, and a reader that
    predates it ignores it as it ignores every field it does not know.
    """

    task: str
    messages: list[dict[str, Any]]
    response: dict[str, Any]
    backend: str
    model: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timestamp: float = 0.0
    request_id: str = ""
    fallback_reason: str = ""
    redactions: dict[str, int] = field(default_factory=dict)
    llm_only: bool = False
    schema: str = field(default=CALL_RECORD_SCHEMA)

    def to_json(self) -> str:
        doc = asdict(self)
        if not self.llm_only:
            del doc["llm_only"]  # written only when true (see the class docstring)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any) -> CallRecord:
        """Validate one decoded JSON line; raises ContractError naming the bad field."""
        if not isinstance(data, dict):
            raise ContractError("a call record must be a JSON object")
        schema = data.get("schema", CALL_RECORD_SCHEMA)
        if schema != CALL_RECORD_SCHEMA:
            raise ContractError(f"unsupported call record schema, expected {CALL_RECORD_SCHEMA}")
        for name in ("task", "backend"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ContractError(f"{name} must be a non-empty string")
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ContractError("messages must be a non-empty list of objects")
        # A role is looked up in sets of roles downstream: a list or an object there would
        # crash a whole stage on one line instead of counting it.
        if not all(isinstance(m.get("role", ""), str) for m in msgs):
            raise ContractError("messages must have string roles")
        if not isinstance(data.get("response"), dict):
            raise ContractError("response must be an object")
        if not isinstance(data["response"].get("role", ""), str):
            raise ContractError("response role must be a string")
        tools = data.get("tools", [])
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ContractError("tools must be a list of objects")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        # Scalars are checked here, not where they are used: a wrong type would otherwise
        # pass this check and crash a later stage (redaction adds up ``redactions``) on one
        # odd line, failing the whole Job instead of skipping that line.
        for name in ("model", "request_id", "fallback_reason"):
            if name in values and not isinstance(values[name], str):
                raise ContractError(f"{name} must be a string, got {type(values[name]).__name__}")
        if not isinstance(values.get("llm_only", False), bool):
            raise ContractError(
                f"llm_only must be true or false, got {type(values['llm_only']).__name__}"
            )
        for name in ("latency_ms", "timestamp"):
            if name in values:
                number = _finite_or_none(values[name], name)
                if number is None:
                    raise ContractError(f"{name} must be a number, got null")
                if name == "latency_ms" and number < 0:
                    raise ContractError(f"{name} must be >= 0, got {number}")
                values[name] = number
        for name in ("prompt_tokens", "completion_tokens"):
            if name in values:
                values[name] = _count(values[name], name)
        if "redactions" in values:
            redactions = values["redactions"]
            if not isinstance(redactions, dict):
                raise ContractError(
                    f"redactions must be an object of counts, got {type(redactions).__name__}"
                )
            counts: dict[str, int] = {}
            for kind, n in redactions.items():
                if not isinstance(kind, str):
                    raise ContractError(f"redactions kinds must be strings, got {_kind(kind)}")
                counts[kind] = _count(n, "redactions", " for every kind")
            values["redactions"] = counts
        try:
            return cls(**values)
        except TypeError as exc:
            raise ContractError(str(exc)) from exc

    @classmethod
    def from_json(cls, line: str) -> CallRecord:
        """Parse one call-log line; raises ContractError naming the bad field.

        A line whose text holds a lone UTF-16 surrogate (``"\\ud800"`` escaped, as some JSON
        encoders write a broken string) is refused as ``invalid Unicode``: it decodes, but no
        stage could write it back as UTF-8.
        """
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise ContractError(f"not JSON: {exc}") from exc
        # Searching the decoded document costs a walk; the regex on the raw line almost never
        # matches, so a log without such escapes pays one scan per line.
        if _SURROGATE_HINT.search(line) and _has_lone_surrogate(data):
            raise ContractError(
                "invalid Unicode: a string holds a lone surrogate (e.g. \\ud800), "
                "which cannot be encoded as UTF-8"
            )
        return cls.from_dict(data)


#: Counts (tokens, examples) past this cannot be written back as JSON by the encoders the
#: gateway and the trainer use, nor mean anything.
MAX_COUNT = 2**63


def _kind(value: Any) -> str:
    """What a refused value is, never what it holds: the message reaches discover's report
    and the operator's conditions, and a malformed line may hold a key pasted into a count."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        return "a negative number"
    return type(value).__name__


def _count(value: Any, name: str, what: str = "") -> int:
    """A non-negative whole number; JSON has one number type, so 3.0 counts as 3.

    The message starts with ``name`` so that readers can count the line by field.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ContractError(f"{name} must be a non-negative integer{what}, got {_kind(value)}")
    if value >= MAX_COUNT:  # JSON encoders (orjson, msgspec) stop at 64 bits
        raise ContractError(f"{name} must be below 2**63{what}, got {value.bit_length()} bits")
    return value


# ---- calls only the LLM answers -----------------------------------------------------------
# The gateway never sends some requests to an SLM, and curate must leave exactly those out of
# training and evaluation: a model trained or gated on calls it is never asked learns (and is
# scored on) the wrong thing. One definition here keeps the two sides from drifting apart.


def _not_a_function(item: Any) -> bool:
    """A tool or tool call of another type than a function's (OpenAI's custom, free-form
    tools); a tool call without a type is a function's, as the API reads it."""
    return isinstance(item, dict) and item.get("type", "function") != "function"


def _llm_only_tool(tool: Any) -> bool:
    """A tool other than a function, or a strict function (see :func:`llm_only_request`)."""
    if _not_a_function(tool):
        return True
    fn = tool.get("function") if isinstance(tool, dict) else None
    return isinstance(fn, dict) and fn.get("strict") is True


def holds_custom_call(message: Any) -> bool:
    """Whether a message (of the history, or an answer) holds a tool call other than a
    function's."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    return isinstance(calls, list) and any(_not_a_function(c) for c in calls)


#: The content parts a text-only SLM reads (a refusal is an assistant's text too).
_TEXT_PARTS = frozenset({"text", "refusal"})


def holds_non_text_part(message: Any) -> bool:
    """Whether a message's ``content`` holds a part other than text: an image, audio, a
    file."""
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(part, dict)
        and isinstance(part.get("type"), str)
        and part["type"] not in _TEXT_PARTS
        for part in content
    )


def llm_only_request(tools: Any, messages: Any) -> bool:
    """Whether a chat request's ``tools`` or ``messages`` make it the LLM's alone.

    A custom (free-form input) tool offered, or a custom call earlier in the conversation:
    the SLM is trained on function tools only, could neither call one nor tell when it
    should, and its chat format would show an earlier custom call as a call without a name.
    A ``strict`` function: strict function calling is structured output (the arguments
    follow the schema exactly), which the SLM does not guarantee. A content part other than
    text anywhere in the conversation (``image_url``, ``input_audio``, ``file``): the SLM
    reads text only, so it answered a question about a photo from the words alone, a shadow
    copy counted that as agreement and curate trained on it. Values of the wrong type count
    as nothing here; validating them is the reader's job.
    """
    if isinstance(tools, list) and any(_llm_only_tool(t) for t in tools):
        return True
    return isinstance(messages, list) and any(
        holds_custom_call(m) or holds_non_text_part(m) for m in messages
    )


# ---- the served model's interface --------------------------------------------------------
# The export stage writes a Triton model with exactly these tensors, and the gateway calls it
# with them. Both are BYTES tensors of shape [1] holding UTF-8 JSON, plus an FP32 confidence.
#: Input: ``{"messages": [...], "tools": [...]}`` as in an OpenAI chat-completions request,
#: with ``"max_tokens"`` when the agent set a limit (a model that predates it ignores it).
TRITON_INPUT = "REQUEST"
#: Output: the assistant message ``{"role": "assistant", "content": ..., "tool_calls": [...]}``
#: (a generated one with ``usage.completion_tokens``); ``{"defer": true}`` when the model
#: hands the call back to the LLM.
TRITON_OUTPUT = "RESPONSE"
#: Output: calibrated confidence in [0, 1]; below the task's threshold the gateway falls back.
TRITON_CONFIDENCE = "CONFIDENCE"
