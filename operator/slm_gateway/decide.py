"""Per-request decisions as pure functions: which backend, whether to fall back, do they agree.

Why pure: these few lines decide whether an agent gets a fast SLM answer, a slower LLM answer
or an error, so every branch is unit-tested on plain values with no server, clock or network.
The HTTP layer (:mod:`slm_gateway.app`) asks, then acts.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from slm_contract import MAX_COUNT, llm_only_request
from slm_gateway.routes import MODE_CANARY, MODE_LLM, MODE_SHADOW, MODE_SLM, Price
from slm_trainer import metrics

SLM = "slm"
LLM = "llm"

# Why a call that was meant for the SLM went to the LLM (the ``fallback_reason`` of a call
# record and the ``reason`` label of the fallback counter).
REASON_ERROR = "slm_error"
REASON_TIMEOUT = "slm_timeout"
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_DEFER = "defer"
REASON_BAD_OUTPUT = "slm_bad_output"
REASON_CIRCUIT_OPEN = "circuit_open"
FALLBACK_REASONS = (
    REASON_ERROR,
    REASON_TIMEOUT,
    REASON_LOW_CONFIDENCE,
    REASON_DEFER,
    REASON_BAD_OUTPUT,
    REASON_CIRCUIT_OPEN,
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one request.

    ``primary`` answers first; when it is the SLM, ``fallback`` says the LLM takes over if the
    SLM fails or is unsure. ``shadow`` asks for an asynchronous SLM copy whose answer is only
    compared. ``reason`` is set when the route wanted the SLM but it was skipped.
    """

    primary: str
    fallback: bool = False
    shadow: bool = False
    reason: str = ""


PLAN_LLM = Plan(LLM)
PLAN_SLM = Plan(SLM, fallback=True)
PLAN_SHADOW = Plan(LLM, shadow=True)
PLAN_SKIPPED = Plan(LLM, reason=REASON_CIRCUIT_OPEN)


def canary_bucket(request_id: str) -> int:
    """A stable bucket in 0..99 for a request id: the same id always lands in the same bucket,
    so a retried request takes the same path and a canary split is reproducible."""
    return zlib.crc32(request_id.encode()) % 100


def plan_request(
    mode: str,
    canary_percent: int,
    bucket: int,
    *,
    has_slm: bool,
    slm_allowed: bool,
    llm_allowed: bool = True,
) -> Plan:
    """Choose the backend for one request from the route and the breakers' states.

    - ``llm``: the LLM, always.
    - ``shadow``: the LLM answers; the SLM gets a copy if its breaker lets it.
    - ``canary``: buckets below ``canary_percent`` go to the SLM; the others are answered by
      the LLM with a copy to the SLM, as in shadow, so that agreement is still measured: the
      operator promotes a canary only on windows with live agreement, and without copies the
      agreement series ran dry once the shadow phase left the query's lookback, which held
      every canary at "measuring" for good. While the LLM's breaker is open and the SLM's is
      not, every request goes to the SLM, which beats failing fast.
    - ``slm``: the SLM with per-request fallback, or straight to the LLM while the SLM's
      breaker is open (reason ``circuit_open``).
    """
    if mode == MODE_LLM or not has_slm:
        return PLAN_LLM
    if mode == MODE_SHADOW:
        return PLAN_SHADOW if slm_allowed else PLAN_LLM
    if mode == MODE_CANARY:
        wants_slm = bucket < canary_percent or not llm_allowed
        if not wants_slm:
            return PLAN_SHADOW if slm_allowed else PLAN_LLM
        return PLAN_SLM if slm_allowed else PLAN_SKIPPED
    if mode == MODE_SLM:
        return PLAN_SLM if slm_allowed else PLAN_SKIPPED
    return PLAN_LLM


def _object_arguments(args: Any) -> bool:
    """Whether a tool call's ``arguments`` are a JSON object (or its text), as the API says:
    an agent's SDK hands them to the tool as keyword arguments, and ``"Paris"`` or ``null``
    fails there, after the gateway has served it as a good answer.

    An object must also be one the gateway can write as the arguments' text
    (:func:`normalize_message`): orjson reads JSON nested 1024 levels deep but writes only
    254, and an SLM that nested deeper made the call a 500 instead of a fallback."""
    if isinstance(args, dict):
        try:
            orjson.dumps(args)
        except orjson.JSONEncodeError:
            return False
        return True
    if not isinstance(args, str):
        return False
    text = args.strip()
    if not text:
        return True  # no arguments: normalize_message serves them as "{}"
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def slm_verdict(answer: Any, confidence: Any, threshold: float, limit: int | None = None) -> str:
    """Empty when the SLM's answer may be served, else the fallback reason.

    A ``{"defer": true}`` answer is the model handing the call back; a confidence that is
    missing or outside [0, 1] (the contract's calibrated probability: a model exporting
    logits would pass any threshold) is bad output, one below the threshold is not trusted,
    and an answer the model was cut off in (``finish_reason: "length"``) is bad output; an
    answer that is not an assistant message with content or tool calls cannot be served,
    nor one whose ``content`` next to tool calls is neither text nor null (agents' SDKs
    reject the whole completion), nor a tool call whose ``arguments`` are not a JSON object
    (or one too deep to write).

    Except an answer cut at the request's own ``limit`` (:func:`answer_limit`; the model
    reports as many tokens as the limit): the agent's budget stopped it, not the SLM's
    failing, so it is a hand-back (``defer``), whatever its confidence (the model serves a
    cut answer with 0). As bad output it counted in the SLM's error rate, which rolls a
    canary back, and against its circuit, shared by every agent of the model.
    """
    if not isinstance(answer, dict):
        return REASON_BAD_OUTPUT
    if answer.get("defer") is True:
        return REASON_DEFER
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not 0.0 <= confidence <= 1.0  # not a probability (logits?), NaN included
    ):
        return REASON_BAD_OUTPUT
    if (
        limit is not None
        and answer.get("finish_reason") == "length"
        and reported_usage(answer.get("usage"))[1] >= limit
    ):
        return REASON_DEFER  # cut at the agent's own limit
    if confidence < threshold:
        return REASON_LOW_CONFIDENCE
    if answer.get("finish_reason") == "length":
        return REASON_BAD_OUTPUT  # cut at max_new_tokens: half an answer
    calls = answer.get("tool_calls")
    content = answer.get("content")
    if calls:
        if not isinstance(calls, list):
            return REASON_BAD_OUTPUT
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return REASON_BAD_OUTPUT
            if not _object_arguments(fn.get("arguments", "{}")):
                return REASON_BAD_OUTPUT
        return "" if content is None or isinstance(content, str) else REASON_BAD_OUTPUT
    if isinstance(content, str):
        return ""
    return REASON_BAD_OUTPUT


def answer_limit(body: Mapping[str, Any]) -> int | None:
    """The most tokens the request lets its answer have: the smaller of ``max_tokens`` and
    ``max_completion_tokens`` where both are set (validation took only integers >= 1), None
    where neither is. The SLM is sent it (:func:`slm_gateway.backends.infer_body`) and its
    answer is held to it (:func:`slm_verdict`, :func:`over_limit`), as the LLM's is."""
    limits = [
        v
        for v in (body.get("max_tokens"), body.get("max_completion_tokens"))
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1
    ]
    return min(limits) if limits else None


def slm_completion_tokens(answer: Mapping[str, Any], limit: int | None = None) -> int:
    """The completion tokens of a usable SLM answer, as the agent is served them.

    The count the model reported (``usage.completion_tokens``: a generated answer of a
    repository exported with the token limit), else an estimate of the text it wrote: its
    content and each call's name and arguments, served no higher than the request's
    ``limit`` (a selector's label, which comes with no count, is held to no limit by
    :func:`over_limit`; the agent must not read more tokens than it allowed). An answer of
    an older repository has no count either. Why the text and not the message's JSON, as
    before: the wrapping (role, ids, keys) was counted as about ten tokens more, and a
    classification agent's ``max_tokens`` of 3 would have sent a one-word label to the LLM
    (:func:`over_limit`).
    """
    reported = reported_usage(answer.get("usage"))[1]
    if reported:
        return reported
    content = answer.get("content")
    size = len(content.encode()) if isinstance(content, str) else 0
    for call in answer.get("tool_calls") or []:
        fn = call["function"]
        args = fn.get("arguments", "{}")
        text = args if isinstance(args, str) else orjson.dumps(args).decode()
        size += len(str(fn["name"]).encode()) + len(text.encode())
    estimate = estimate_tokens(size)
    return estimate if limit is None else min(estimate, limit)


def over_limit(answer: Mapping[str, Any], limit: int | None) -> bool:
    """Whether a usable SLM answer has more tokens than the request allows: the count the
    model reported (``usage.completion_tokens``) above ``limit``, or, for an answer with
    neither a count nor a ``label``, the estimate of its text
    (:func:`slm_completion_tokens`) above it. Why: a repository exported before the limit
    was sent ignores it and answers in full, so its answer comes back finished and longer
    than the agent allowed; it is handed back as one cut there would be (``defer``).

    A selector's answer (a classification label or a tool choice, with its ``label``) is
    never held to the limit by the estimate: a label is what the LLM would name in a token
    or two, and ~4 bytes a token is too coarse to judge one by ("positive" came out 2
    tokens, so every classification call with ``max_tokens: 1`` went to the LLM). The
    estimate still stands for the usage it is served with (:func:`slm_completion_tokens`).
    """
    if limit is None:
        return False
    reported = reported_usage(answer.get("usage"))[1]
    if reported:
        return reported > limit
    return "label" not in answer and slm_completion_tokens(answer) > limit


def slm_can_serve(body: Mapping[str, Any]) -> bool:
    """Whether an SLM answer could satisfy this request at all.

    An exported SLM gives one choice, no log-probabilities and no structured-output
    guarantee, writes text only, searches nothing, and it answers with a tool call whenever
    it picks one. So a request for several choices (``n`` > 1), for ``logprobs``, for a
    ``response_format`` other than text, for ``modalities`` other than text or ``audio``
    output, with ``web_search_options``, with ``tool_choice: "none"`` or a ``tool_choice``
    object other than one function (such as ``allowed_tools``), or in the legacy
    ``functions``/``function_call`` form (the SLM is served ``tools`` only, and answers with
    ``tool_calls``) goes to the LLM: the agent gets what it asked for, and no fallback is
    counted against the SLM. So does a request with a ``strict`` tool: strict function
    calling is structured output too (the arguments follow the schema exactly), which the
    SLM does not guarantee. And so does a request with a custom (free-form input) tool, in
    ``tools``, named by ``tool_choice`` or called earlier in the conversation: the SLM is
    trained on function tools only, could neither call one nor tell when it should, and its
    chat format would show an earlier custom call as a call without a name; and one with an
    image, audio or file content part anywhere in the conversation: the SLM reads text only,
    and answered a photo's question from the words alone. Those checks of ``tools`` and
    ``messages`` are
    :func:`slm_contract.llm_only_request`, which curate shares: a call the SLM is never asked
    must not be one it is trained or gated on. The other checks read fields a call record
    does not hold, so capture writes their verdict as the record's ``llm_only``
    (:func:`slm_gateway.capture.llm_only_call`), the legacy form aside: capture records it
    in the ``tools`` form for training on purpose.
    """
    n = body.get("n")
    if n is not None and n != 1:
        return False
    choice = body.get("tool_choice")
    if body.get("logprobs") is True or choice == "none":
        return False
    if isinstance(choice, dict) and choice.get("type") != "function":
        return False
    if body.get("functions") is not None or body.get("function_call") is not None:
        return False
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return False
    if body.get("audio") is not None or body.get("web_search_options") is not None:
        return False
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        return False
    return not llm_only_request(body.get("tools"), body.get("messages"))


def cut_at_stop(text: str, stop: Any) -> str:
    """``text`` up to the first of the request's ``stop`` sequences, as OpenAI serves it.

    Why: agents (ReAct loops) set ``stop: ["Observation:"]`` and act on everything they get;
    an SLM that writes past it made the agent read an observation it never made.
    """
    sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cuts = [text.find(s) for s in sequences if isinstance(s, str) and s]
    found = [c for c in cuts if c >= 0]
    return text[: min(found)] if found else text


def stop_cut(answer: Any, stop: Any) -> Any:
    """An SLM answer with its text cut at the request's ``stop`` sequences
    (:func:`cut_at_stop`); the answer itself when nothing is cut.

    A cut answer is a finished one (``finish_reason: "stop"``), as OpenAI serves a stop
    sequence: whatever the model wrote past it, even up to a limit that cut it, is none
    of the answer. Its usage is then the cut text's: the estimate of what is left
    (:func:`slm_completion_tokens`), no more than the count the model reported for the
    whole; uncut, the model's count stands.
    """
    if not stop or not isinstance(answer, dict) or answer.get("defer") is True:
        return answer
    content = answer.get("content")
    if not isinstance(content, str):
        return answer
    text = cut_at_stop(content, stop)
    if len(text) == len(content):
        return answer
    served = {k: v for k, v in answer.items() if k != "usage"}
    served["content"] = text
    served["finish_reason"] = "stop"
    reported = reported_usage(answer.get("usage"))[1]
    if reported:
        try:
            estimate = slm_completion_tokens(served)
        except (KeyError, TypeError, AttributeError):  # malformed calls: judged bad next
            return served
        served["usage"] = {"completion_tokens": min(reported, estimate)}
    return served


@dataclass(frozen=True, slots=True)
class _Schema:
    """What :func:`_fits` judges of one JSON Schema, the rest of it dropped: ``types`` (None:
    any), ``enum`` (None: any value), ``properties``, ``required``, ``closed``
    (``additionalProperties: false``), ``items`` (one schema, or the tuple form's list) and
    ``never`` (the ``false`` schema)."""

    types: frozenset[str] | None = None
    enum: tuple[Any, ...] | None = None
    properties: Mapping[str, _Schema] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    closed: bool = False
    items: _Schema | tuple[_Schema, ...] | None = None
    never: bool = False


_ANY = _Schema()
_NEVER = _Schema(never=True)
#: Deeper than a validated schema nests (:func:`slm_gateway.validate._validate_schema`
#: refuses past 32); below it nothing is judged.
_MAX_SCHEMA_DEPTH = 40


def _compile(schema: Any, depth: int = 0) -> _Schema:
    """A tool's ``parameters`` as :class:`_Schema`; what is not a schema the gateway reads
    (a keyword it does not judge, a value of the wrong shape) accepts anything."""
    if schema is False:
        return _NEVER
    if not isinstance(schema, dict) or depth > _MAX_SCHEMA_DEPTH:
        return _ANY
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else None
    types = frozenset(k for k in kinds if isinstance(k, str)) if kinds is not None else None
    if types is not None and schema.get("nullable") is True:
        types |= {"null"}  # OpenAPI's spelling of ["string", "null"]: not refused here
    enum = schema.get("enum")
    props = schema.get("properties")
    properties = (
        {k: _compile(v, depth + 1) for k, v in props.items() if isinstance(k, str)}
        if isinstance(props, dict)
        else {}
    )
    required = schema.get("required")
    items = schema.get("items")
    compiled_items: _Schema | tuple[_Schema, ...] | None = None
    if isinstance(items, list):
        compiled_items = tuple(_compile(v, depth + 1) for v in items)
    elif items is not None:
        compiled_items = _compile(items, depth + 1)
    return _Schema(
        types=types,
        enum=tuple(enum) if isinstance(enum, list) else None,
        properties=properties,
        required=tuple(r for r in required if isinstance(r, str))
        if isinstance(required, list)
        else (),
        # with patternProperties, which keys they admit is not judged: no key is refused
        closed=schema.get("additionalProperties") is False and "patternProperties" not in schema,
        items=compiled_items,
    )


def _is_type(value: Any, kind: str) -> bool:
    """Whether ``value`` (decoded JSON) is of the JSON Schema type ``kind``; an unknown type
    name (validation refuses those in a request) accepts anything."""
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":  # 3.0 is an integer in JSON Schema; a boolean is none
        if isinstance(value, float):
            return value.is_integer()
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "null":
        return value is None
    return True


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality, as ``enum`` compares: 1 and 1.0 are equal, ``true`` and 1 are not
    (Python says ``True == 1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    return type(a) is type(b) and a == b


def _fits(schema: _Schema, value: Any, *, required: bool = True) -> bool:
    """Whether ``value`` keeps ``schema``: its type, enum, required and (when closed) only
    known keys, each property and item in turn. ``required=False`` leaves out this level's
    required keys (a selector's ``{}``, see :func:`arguments_fit`)."""
    if schema.never:
        return False
    if schema.types is not None and not any(_is_type(value, k) for k in schema.types):
        return False
    if schema.enum is not None and not any(_same_json(value, e) for e in schema.enum):
        return False
    if isinstance(value, dict):
        if required and not all(key in value for key in schema.required):
            return False
        if schema.closed and not value.keys() <= schema.properties.keys():
            return False
        return all(_fits(sub, value[key]) for key, sub in schema.properties.items() if key in value)
    if isinstance(value, list) and schema.items is not None:
        if isinstance(schema.items, tuple):  # the tuple form: item i against schema i
            return all(_fits(sub, v) for sub, v in zip(schema.items, value, strict=False))
        items = schema.items
        return all(_fits(items, v) for v in value)
    return True


#: Compiled ``parameters`` schemas of the tools SLM answers called, by a digest of the
#: schema's JSON (as :data:`slm_gateway.validate._TOOLS_SEEN` keeps tool lists): an agent
#: sends the same tools on every call, and compiling a schema again on every answer cost
#: several times what finding and hashing it does. Only called tools' schemas are hashed,
#: not the whole list with its descriptions, and only they are held, compiled.
_SCHEMAS_SEEN: dict[bytes, _Schema] = {}
_SCHEMAS_SEEN_MAX = 1024


def _parameters(tools: Any, name: str) -> Any:
    """The ``parameters`` of the function tool ``name`` in ``tools``; None (any arguments)
    when it has none or there is no such function."""
    if not isinstance(tools, list):
        return None
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name and tool.get("type") == "function":
            return fn.get("parameters")
    return None


def _argument_schema(tools: Any, name: str) -> _Schema:
    """The compiled ``parameters`` of the tool ``name``, from the cache."""
    params = _parameters(tools, name)
    if not isinstance(params, dict):
        return _compile(params)  # none, or true or false: nothing to compile
    try:
        key = hashlib.blake2b(orjson.dumps(params), digest_size=16).digest()
    except orjson.JSONEncodeError:  # validation refuses such tools; nothing to cache by
        return _compile(params)
    schema = _SCHEMAS_SEEN.get(key)
    if schema is None:
        if len(_SCHEMAS_SEEN) >= _SCHEMAS_SEEN_MAX:
            _SCHEMAS_SEEN.clear()
        schema = _SCHEMAS_SEEN[key] = _compile(params)
    return schema


def _decoded_arguments(args: Any) -> Any:
    """A call's arguments as decoded JSON (no arguments: ``{}``); None when unreadable."""
    if not isinstance(args, str):
        return args
    text = args.strip()
    if not text:
        return {}
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def arguments_fit(answer: Mapping[str, Any], tools: Any) -> bool:
    """Whether each tool call of an SLM answer keeps its tool's ``parameters`` schema in the
    request's ``tools``, so that the agent's tool can run it.

    Judged: the arguments are an object; the ``required`` keys are present; no key outside
    ``properties`` where ``additionalProperties`` is false; ``enum`` membership (JSON
    equality: ``true`` is not 1); the JSON ``type`` (``string``, ``integer``: an integer or a
    float such as 3.0, never a boolean, ``number``, ``boolean``, ``array``, ``object``,
    ``null``, or a list of them); all of it in nested ``properties`` of objects and ``items``
    of arrays. Not judged, and so accepted: every other keyword (``anyOf``, ``oneOf``,
    ``allOf``, ``$ref``, ``pattern``, ``format``, ``minimum``, ``const``,
    ``patternProperties``...): a half-understood check would send good answers to the LLM,
    and the LLM's own answers are not checked either. OpenAPI's ``nullable: true`` lets a
    null through.

    A selector (a closed-label model) chooses the tool, not its arguments: by design it
    answers the chosen tool with ``{}`` and its ``label``
    (``slm_trainer.triton_model.chatformat.selector_answer``). Such an answer, exactly
    ``{}`` with a ``label``, is not held to ``required``; anything else is.
    """
    selector = "label" in answer
    for call in answer.get("tool_calls") or []:
        fn = call["function"]
        args = _decoded_arguments(fn.get("arguments", "{}"))
        if not isinstance(args, dict):
            return False
        schema = _argument_schema(tools, fn["name"])
        if not _fits(schema, args, required=not (selector and args == {})):
            return False
    return True


def tool_contract_verdict(
    answer: Mapping[str, Any], body: Mapping[str, Any], tool_names: frozenset[str]
) -> str:
    """Empty when a usable SLM answer keeps the request's tool contract, else the fallback
    reason.

    Every call must name one of the request's tools (an agent cannot run any other), with
    arguments that tool's schema accepts (:func:`arguments_fit`: the agent's tool would fail
    on others); an answer that breaks that is bad output: no request lets the SLM call a
    tool the agent cannot run.

    ``tool_choice: "required"`` needs at least one call, a named ``tool_choice`` needs
    every call to name that function, and ``parallel_tool_calls: false`` allows at most
    one call. An answer right but for those is a hand-back (``defer``), as one cut at the
    agent's own token limit: the exported model is told of them
    (:func:`slm_gateway.backends.infer_body`) but reads neither, so such an answer is the
    request's demand, not the SLM failing. As bad output five of them opened the SLM's
    circuit for every agent of the task and raised its error rate.
    """
    calls = answer.get("tool_calls") or []
    names = [c["function"]["name"] for c in calls]
    if names and not tool_names.issuperset(names):
        return REASON_BAD_OUTPUT
    if names and not arguments_fit(answer, body.get("tools")):
        return REASON_BAD_OUTPUT
    if len(names) > 1 and body.get("parallel_tool_calls") is False:
        return REASON_DEFER  # the agent asked for at most one call per turn
    choice = body.get("tool_choice")
    if choice == "required" and not names:
        return REASON_DEFER
    if isinstance(choice, dict):
        want = (choice.get("function") or {}).get("name")
        if not names or any(name != want for name in names):
            return REASON_DEFER
    return ""


def fits_request(
    answer: Mapping[str, Any], body: Mapping[str, Any], tool_names: frozenset[str]
) -> bool:
    """Whether a usable SLM answer keeps the request's tool contract, ``tool_choice`` and
    ``parallel_tool_calls`` included (:func:`tool_contract_verdict`)."""
    return not tool_contract_verdict(answer, body, tool_names)


def judge_answer(
    answer: Any,
    confidence: Any,
    threshold: float,
    body: Mapping[str, Any],
    tool_names: frozenset[str],
) -> tuple[Any, str]:
    """(the SLM's answer as the agent would get it, the fallback reason: "" to serve it).

    The answer is cut at the request's ``stop`` sequences first (:func:`stop_cut`), then
    judged: :func:`slm_verdict`, :func:`tool_contract_verdict`, :func:`over_limit`. Why
    that order: the agent gets only the text before the stop, so that text is what must be
    within its limit. Judged whole, an answer whose stop fell within the limit but whose
    text ran on past it went to the LLM, and a served one counted the cut-away text as its
    usage.

    One exception: an answer the model cut at the agent's own limit, with the stop inside,
    and a confidence below ``threshold`` stays a hand-back (``defer``) rather than
    ``low_confidence``: the exported model serves every answer its limit cut with
    confidence 0, a mark of the cut, not its judgement of the text.
    """
    limit = answer_limit(body)
    served = stop_cut(answer, body.get("stop"))
    verdict = slm_verdict(served, confidence, threshold, limit)
    if (
        verdict == REASON_LOW_CONFIDENCE
        and served is not answer
        and slm_verdict(answer, confidence, threshold, limit) == REASON_DEFER
    ):
        verdict = REASON_DEFER  # its 0 marks the cut at the agent's limit
    if not verdict:
        verdict = tool_contract_verdict(served, body, tool_names)
    if not verdict and over_limit(served, limit):  # a model that ignores the limit
        verdict = REASON_DEFER
    return served, verdict


def normalize_message(answer: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    """An SLM answer as an OpenAI assistant message: ids on tool calls, arguments as JSON text.

    Models emit ``arguments`` as an object more often than as the string the API specifies;
    agents' SDKs need a string. Every tool call gets the id ``call_<call_id>_<i>``, whatever
    id the model gave: models emit none, numbers, or the same ``call_0`` on every answer, and
    an agent keeps all its turns' calls in one conversation, matching each result to its
    call by ``tool_call_id``; ids repeated across turns attach results to the wrong call, and
    some LLM APIs refuse such a history when a later turn falls back to them. ``call_id``
    must be unique per answer.
    """
    calls = answer.get("tool_calls")
    msg: dict[str, Any] = {"role": "assistant", "content": answer.get("content")}
    if calls:
        out = []
        for i, call in enumerate(calls):
            fn = call["function"]
            args = fn.get("arguments", "{}")
            if not isinstance(args, str):
                args = orjson.dumps(args).decode()
            elif not args.strip():
                args = "{}"  # agents json.loads() the arguments: "" would raise there
            out.append(
                {
                    "id": f"call_{call_id}_{i}",
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": args},
                }
            )
        msg["tool_calls"] = out
    return msg


def _canonical_args(args: Any) -> bytes:
    """Arguments in one form for comparison; as their text when they cannot be parsed, or
    are nested deeper than orjson writes (the shadow comparison must not raise on them)."""
    text = args.strip() if isinstance(args, str) else ""
    if isinstance(args, str):
        try:
            args = orjson.loads(text) if text else {}
        except orjson.JSONDecodeError:
            return text.encode()
    try:
        return orjson.dumps(args, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return text.encode() if text else repr(args).encode()


def _calls(message: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """(name, canonical arguments) of each call, sorted; the LLM's message is not validated,
    so ``tool_calls`` that is not a list counts as no calls rather than raising."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return []
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out.append((str(fn.get("name")), _canonical_args(fn.get("arguments", "{}"))))
    return sorted(out)


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return " ".join(str(content or "").split())


def agree(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    metric: str = "",
    tools: Sequence[Mapping[str, Any]] = (),
    task_type: str = "",
) -> bool:
    """Does the SLM's message ``a`` say what the LLM's ``b`` says, under the task's metric?

    The gate's own verdict (:func:`slm_trainer.metrics.answer_correct`, the selector's), so that
    live agreement, which moves the rollout, measures what the gate measured:
    ``tool-call-ast`` is BFCL's AST match against the request's ``tools`` (1 and 1.0 alike,
    an optional argument left at its default, strings compared as BFCL does, parallel calls
    in any order), ``exact-match`` the same calls in order and the same normalised text, and
    ``label-accuracy`` the label as the task's ``task_type`` has it: a tool-call task's is the
    first tool called (two answers in words, neither calling a tool, agree, as the gate
    scores them), a classification task's the tool called, else the normalised text, which is
    also the rule without a task type (a routes file that names none): a classification task
    may offer tools too, and two different labels would have agreed. Compared by their own
    rules before, 1 against 1.0 or "Paris" against "paris" disagreed live though the gate had
    scored them right, and a canary the gate passed could not be promoted.

    BFCL's own checker is not loaded here (the gateway's image does not ship bfcl-eval):
    the trainer's built-in port of it decides, as it does wherever that package is absent.
    Without a metric (a routes file that names none): the same calls as a multiset,
    arguments as parsed JSON, or the same text up to whitespace.
    """
    if metric in ("tool-call-ast", "exact-match", "label-accuracy"):
        if metric == "tool-call-ast":
            task_type = "tool-call"
        elif not task_type:
            task_type = "classification"
        return bool(metrics.answer_correct(metric, a, b, tools, task_type, use_bfcl=False))
    ca, cb = _calls(a), _calls(b)
    if ca or cb:
        return ca == cb
    return _text(a) == _text(b)


#: Documented defaults, overridable with ``--price``. LLM: GPT-4o's list price (USD 2.50 and
#: 10.00 per million input and output tokens). SLM: a rough self-hosted 7B figure, about 25x
#: cheaper as the paper estimates (10-30x); set your own GPU cost per token.
DEFAULT_PRICES: Mapping[str, Price] = {
    LLM: Price(prompt=0.0025, completion=0.01),
    SLM: Price(prompt=0.0001, completion=0.0004),
}


def reported_usage(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens as the LLM reported them in ``usage``; each 0 (unknown)
    unless it is a count the call record takes: a whole number below ``MAX_COUNT``.

    Why: the counts go into the counters and the captured record. A negative one made the
    counters go down and the record unreadable to curate (lost for training); one past 64
    bits (1e20 as an integer) could not be encoded, and the served call was not captured.
    """
    if not isinstance(usage, dict):
        return 0, 0

    def count(value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return 0
        return value if 0 <= value < MAX_COUNT else 0

    return count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))


def estimate_tokens(n_bytes: int) -> int:
    """Tokens of a text of ``n_bytes`` UTF-8 bytes, at the usual ~4 bytes per token, for
    backends that report no usage (the Triton SLM does not)."""
    return max(1, (n_bytes + 3) // 4)
