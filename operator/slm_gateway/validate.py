"""Validation of OpenAI chat-completions requests, before anything is sent upstream.

Why validate at all, when the LLM would reject a bad request anyway: the SLM would not. A
request with a broken tool schema must not reach Triton (where it becomes a 500, a timeout, or
worse a confident wrong answer), nor the call log (where it becomes training data). And an agent
deserves the same 400 with the same explanation whichever backend its task is routed to today.

The checks are the ones OpenAI's API applies to the fields it documents, kept cheap because
they run on every request; fields the gateway does not know are passed through untouched
(LLM servers have extensions). Every failure is a :class:`~slm_gateway.errors.GatewayError`
with status 400 and the offending parameter's path in ``param``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from slm_gateway.errors import (
    CODE_INVALID_JSON,
    CODE_INVALID_TYPE,
    CODE_MISSING,
    GatewayError,
    invalid,
)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_MESSAGES = 4096
MAX_TOOLS = 128
MAX_STOP = 4
# OpenAI allows [a-zA-Z0-9_-]{1,64}; BFCL and vLLM use dotted names (``math.factorial``), so
# dots and colons are accepted too. Whitespace and quotes never are: they break tool parsers.
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # used with fullmatch: no trailing "\n"
# orjson reads JSON nested up to 1024 levels deep but writes at most 254, and the gateway
# writes a request again (the LLM's model name, the SLM's infer request, the tools' cache key):
# a deeper body is refused with a 400 where it is written (:func:`encode`).
MAX_NESTING = 254
JSON_SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_CONTENT_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})


@dataclass(slots=True)
class ChatRequest:
    """A validated request: the decoded body plus the fields the gateway acts on."""

    body: dict[str, Any]
    model: str | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    #: The names in ``tools``, as validation found them (an SLM may call only these).
    tool_names: frozenset[str] = frozenset()
    #: ``"stream": true``: the answer goes back as server-sent events.
    stream: bool = False
    #: ``stream_options.include_usage``: the agent wants the final usage chunk.
    include_usage: bool = False


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _wrong_type(param: str, expected: str, value: Any) -> GatewayError:
    return invalid(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)}.",
        param,
        CODE_INVALID_TYPE,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise _wrong_type(name, "a number", value)
    if not lo <= value <= hi:
        raise invalid(f"'{name}' must be between {lo:g} and {hi:g}, got {value}.", name)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_int(value):
        raise _wrong_type(name, "an integer", value)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise invalid(f"'{name}' must be {bound}, got {value}.", name)


def _boolean(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _wrong_type(name, "a boolean", value)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Decode and validate a request body; raises GatewayError (400) naming the bad field."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(
            f"We could not parse the JSON body of your request: {exc}.",
            None,
            CODE_INVALID_JSON,
        ) from None
    if not isinstance(body, dict):
        raise invalid(
            f"The request body must be a JSON object, got {_type_name(body)}.",
            None,
            CODE_INVALID_TYPE,
        )
    return validate_body(body)


def too_deep(param: str | None = None) -> GatewayError:
    """The 400 for a body nested deeper than the gateway can write it again."""
    return invalid(
        f"The request nests arrays and objects more than {MAX_NESTING} levels deep.",
        param,
        CODE_INVALID_JSON,
    )


def encode(value: Any, param: str | None = None) -> bytes:
    """``orjson.dumps`` for request data: a 400 (:func:`too_deep`), not a 500, for a value
    nested deeper than orjson writes. Checked where the gateway writes the request again,
    so the common path pays nothing for it."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise too_deep(param) from None


def validate_body(body: dict[str, Any]) -> ChatRequest:
    """Validate a decoded request body (see :func:`parse_chat_request`)."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        if isinstance(model, str):
            raise invalid("'model' must not be empty.", "model")
        raise _wrong_type("model", "a string", model)

    if "messages" not in body:
        raise invalid("Missing required parameter: 'messages'.", "messages", CODE_MISSING)
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise invalid("'messages' must contain at least one message.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"'messages' has more than {MAX_MESSAGES} entries.", "messages")
    tool_call_ids: set[str] = set()
    for i, message in enumerate(messages):
        _validate_message(message, i, tool_call_ids)

    tools = body.get("tools")
    names: frozenset[str] = frozenset()
    if tools is None:
        tools = []
    elif not isinstance(tools, list):
        raise _wrong_type("tools", "an array", tools)
    elif tools:
        names = _validated_tools(tools)

    _validate_tool_choice(body.get("tool_choice"), names)
    if body.keys() & _OPTIONAL_FIELDS:
        _validate_options(body)
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage") is True
            return ChatRequest(body, model, messages, tools, names, True, usage)
    return ChatRequest(body, model, messages, tools, names)


#: The optional fields :func:`_validate_options` checks; most agent requests carry none of
#: them, and one set intersection is cheaper than looking each of them up.
_OPTIONAL_FIELDS = frozenset(
    {
        "stream",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "top_logprobs",
        "parallel_tool_calls",
        "logprobs",
        "store",
        "user",
        "stop",
        "response_format",
        "metadata",
        "logit_bias",
        "stream_options",
    }
)


def _validate_options(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _wrong_type("stream_options", "an object", options)
        if not stream:
            raise invalid(
                "'stream_options' is only allowed when 'stream' is true.", "stream_options"
            )
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise _wrong_type("stream_options.include_usage", "a boolean", usage)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _integer(body, "n", 1, 128)
    _integer(body, "max_tokens", 1)
    _integer(body, "max_completion_tokens", 1)
    _integer(body, "seed", -(2**63), 2**63 - 1)
    _integer(body, "top_logprobs", 0, 20)
    for flag in ("parallel_tool_calls", "logprobs", "store"):
        _boolean(body, flag)
    if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        # OpenAI's own 400: passed on, an LLM server may ignore it and an SLM answered it,
        # without the log-probabilities the agent asked for
        raise invalid(
            "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
            "top_logprobs",
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _wrong_type("user", "a string", user)
    _validate_stop(body.get("stop"))
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise _wrong_type("response_format", "an object", fmt)
        if not isinstance(fmt.get("type"), str):
            raise _wrong_type("response_format.type", "a string", fmt.get("type"))
    for name in ("metadata", "logit_bias"):
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise _wrong_type(name, "an object", value)


def _validate_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP:
        raise invalid(f"'stop' may hold at most {MAX_STOP} sequences.", "stop")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise _wrong_type(f"stop[{i}]", "a string", s)


def _validate_content(content: Any, param: str | int, *, required: bool) -> None:
    """``param`` is the parameter's path, or the index of the message whose ``content`` this
    is (the path is only built when there is something to report)."""
    if isinstance(content, str):
        return
    if isinstance(param, int):
        param = f"messages[{param}].content"
    if content is None:
        if required:
            raise invalid(f"Missing required parameter: '{param}'.", param, CODE_MISSING)
        return
    if not isinstance(content, list):
        raise _wrong_type(param, "a string or an array of content parts", content)
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _wrong_type(p, "an object", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise _wrong_type(f"{p}.type", "a string", kind)
        if kind not in _CONTENT_PART_TYPES:
            raise invalid(f"Invalid value for '{p}.type': {kind!r}.", f"{p}.type")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise _wrong_type(f"{p}.text", "a string", part.get("text"))


def _validate_message(message: Any, i: int, tool_call_ids: set[str]) -> None:
    if not isinstance(message, dict):
        raise _wrong_type(f"messages[{i}]", "an object", message)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        p = f"messages[{i}]"
        if role is None:
            raise invalid(f"Missing required parameter: '{p}.role'.", f"{p}.role", CODE_MISSING)
        if not isinstance(role, str):
            raise _wrong_type(f"{p}.role", "a string", role)
        raise invalid(
            f"Invalid value for '{p}.role': {role!r}; supported roles are "
            f"{', '.join(sorted(ROLES))}.",
            f"{p}.role",
        )
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise _wrong_type(f"messages[{i}].name", "a string", name)
    content = message.get("content")
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls is not None:
            _validate_tool_calls(calls, f"messages[{i}].tool_calls", tool_call_ids)
        has_call = bool(calls) or message.get("function_call") is not None
        _validate_content(content, i, required=not has_call)
    elif role == "tool":
        _validate_content(content, i, required=True)
        tcid = message.get("tool_call_id")
        if not isinstance(tcid, str):
            p = f"messages[{i}].tool_call_id"
            if tcid is None:
                raise invalid(f"Missing required parameter: '{p}'.", p, CODE_MISSING)
            raise _wrong_type(p, "a string", tcid)
    else:
        # A legacy function result may be null (openai-python types its content Optional).
        _validate_content(content, i, required=role != "function")


def _validate_tool_calls(calls: Any, p: str, ids: set[str]) -> None:
    if not isinstance(calls, list):
        raise _wrong_type(p, "an array", calls)
    for k, call in enumerate(calls):
        q = f"{p}[{k}]"
        if not isinstance(call, dict):
            raise _wrong_type(q, "an object", call)
        cid = call.get("id")
        if not isinstance(cid, str):
            raise _wrong_type(f"{q}.id", "a string", cid)
        ids.add(cid)
        kind = call.get("type", "function")
        if kind == "custom":
            custom = _custom(call, q)
            if not isinstance(custom.get("input"), str):
                raise _wrong_type(f"{q}.custom.input", "a string", custom.get("input"))
            continue
        if kind != "function":
            raise invalid(
                f"Invalid value for '{q}.type': {kind!r}; use 'function' or 'custom'.", f"{q}.type"
            )
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _wrong_type(f"{q}.function", "an object", fn)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _wrong_type(f"{q}.function.name", "a non-empty string", fn.get("name"))
        if not isinstance(fn.get("arguments"), str):
            raise _wrong_type(f"{q}.function.arguments", "a string", fn.get("arguments"))


#: Tool lists already validated, by a digest of their exact JSON: an agent sends the same
#: tools on every call, and walking their schemas was the largest part of validating a BFCL
#: request. Keyed by the JSON itself, 1024 tool lists of up to the body limit each could
#: hold about a GiB, and requests for unknown models (validated first) filled it too.
_TOOLS_SEEN: dict[bytes, frozenset[str]] = {}
_TOOLS_SEEN_MAX = 1024


def _validated_tools(tools: list[Any]) -> frozenset[str]:
    """The tool names of a valid tool list; raises GatewayError for the first broken tool."""
    if len(tools) > MAX_TOOLS:
        raise invalid(f"'tools' has more than {MAX_TOOLS} entries.", "tools")
    key = hashlib.blake2b(encode(tools, "tools"), digest_size=16).digest()
    found = _TOOLS_SEEN.get(key)
    if found is not None:
        return found
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        seen.add(_validate_tool(tool, i, seen))
    names = frozenset(seen)
    if len(_TOOLS_SEEN) >= _TOOLS_SEEN_MAX:
        _TOOLS_SEEN.clear()
    _TOOLS_SEEN[key] = names
    return names


def _validate_tool(tool: Any, i: int, seen: set[str]) -> str:
    p = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise _wrong_type(p, "an object", tool)
    kind = tool.get("type")
    if kind == "custom":
        return _validate_custom_tool(tool, p, seen)
    if kind != "function":
        if kind is None:
            raise invalid(f"Missing required parameter: '{p}.type'.", f"{p}.type", CODE_MISSING)
        raise invalid(
            f"Invalid value for '{p}.type': {kind!r}; only 'function' and 'custom' are supported.",
            f"{p}.type",
        )
    fn = tool.get("function")
    if not isinstance(fn, dict):
        if fn is None:
            raise invalid(
                f"Missing required parameter: '{p}.function'.", f"{p}.function", CODE_MISSING
            )
        raise _wrong_type(f"{p}.function", "an object", fn)
    name = fn.get("name")
    if not isinstance(name, str):
        if name is None:
            raise invalid(
                f"Missing required parameter: '{p}.function.name'.",
                f"{p}.function.name",
                CODE_MISSING,
            )
        raise _wrong_type(f"{p}.function.name", "a string", name)
    if not TOOL_NAME_RE.fullmatch(name):
        raise invalid(
            f"Invalid '{p}.function.name': {name[:80]!r} must be 1-64 letters, digits, "
            "underscores, dashes, dots or colons.",
            f"{p}.function.name",
        )
    _validate_named(fn, name, p, "function", seen)
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _wrong_type(f"{p}.function.strict", "a boolean", strict)
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise _wrong_type(f"{p}.function.parameters", "a JSON Schema object", params)
        _validate_schema(params, f"{p}.function.parameters", depth=0)
    return name


def _validate_named(entry: dict[str, Any], name: str, p: str, kind: str, seen: set[str]) -> None:
    """What a function and a custom tool (``kind``) share: a name no other tool has, and an
    optional string description."""
    if name in seen:
        raise invalid(f"Duplicate tool name {name[:80]!r} in '{p}'.", f"{p}.{kind}.name")
    desc = entry.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _wrong_type(f"{p}.{kind}.description", "a string", desc)


def _custom(obj: dict[str, Any], p: str) -> dict[str, Any]:
    """The ``custom`` object of a custom tool, tool call or tool choice at ``p``, checked to
    name the tool with a non-empty string."""
    custom = obj.get("custom")
    if not isinstance(custom, dict):
        if custom is None:
            raise invalid(f"Missing required parameter: '{p}.custom'.", f"{p}.custom", CODE_MISSING)
        raise _wrong_type(f"{p}.custom", "an object", custom)
    name = custom.get("name")
    if not isinstance(name, str) or not name:
        if name is None:
            raise invalid(
                f"Missing required parameter: '{p}.custom.name'.", f"{p}.custom.name", CODE_MISSING
            )
        raise _wrong_type(f"{p}.custom.name", "a non-empty string", name)
    return custom


def _validate_custom_tool(tool: dict[str, Any], p: str, seen: set[str]) -> str:
    """A custom (free-form input) tool, as openai-python types it: ``{"type": "custom",
    "custom": {"name", "description"?, "format"?}}``, with ``format`` ``{"type": "text"}`` or
    ``{"type": "grammar", "grammar": {...}}``. Only the LLM answers a request that has one
    (:func:`slm_gateway.decide.slm_can_serve`): the SLM knows function tools only."""
    custom = _custom(tool, p)
    name: str = custom["name"]
    _validate_named(custom, name, p, "custom", seen)
    fmt = custom.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise _wrong_type(f"{p}.custom.format", "an object", fmt)
        kind = fmt.get("type")
        if kind not in ("text", "grammar"):
            raise invalid(
                f"Invalid value for '{p}.custom.format.type': {str(kind)[:40]!r}; use text or "
                "grammar.",
                f"{p}.custom.format.type",
            )
        if kind == "grammar" and not isinstance(fmt.get("grammar"), dict):
            raise _wrong_type(f"{p}.custom.format.grammar", "an object", fmt.get("grammar"))
    return name


def _validate_schema(schema: Any, p: str, depth: int) -> None:
    """The structural sanity of a JSON Schema: not a full meta-schema check, only what breaks
    tool-call parsers and constrained decoding (wrong container types, unknown type names)."""
    if depth > 32:
        raise invalid(f"'{p}' is nested too deeply.", p)
    if isinstance(schema, bool):
        return  # true (anything) and false (nothing) are JSON Schemas too
    if not isinstance(schema, dict):
        raise _wrong_type(p, "a JSON Schema object", schema)
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        for k in kinds:
            if not isinstance(k, str):
                raise _wrong_type(f"{p}.type", "a string or an array of strings", k)
            if k not in JSON_SCHEMA_TYPES:
                raise invalid(f"Invalid JSON Schema type {k!r} in '{p}.type'.", f"{p}.type")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise _wrong_type(f"{p}.properties", "an object", props)
        for key, sub in props.items():
            _validate_schema(sub, f"{p}.properties.{key}", depth + 1)
    required = schema.get("required")
    if required is not None and (
        not isinstance(required, list) or not all(isinstance(r, str) for r in required)
    ):
        raise _wrong_type(f"{p}.required", "an array of strings", required)
    items = schema.get("items")
    if isinstance(items, list):  # the tuple form (draft 4-7; pydantic v1's Tuple[str, int])
        for j, sub in enumerate(items):
            _validate_schema(sub, f"{p}.items[{j}]", depth + 1)
    elif items is not None:
        _validate_schema(items, f"{p}.items", depth + 1)
    enum = schema.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise _wrong_type(f"{p}.enum", "an array", enum)
    for key in ("anyOf", "oneOf", "allOf"):
        subs = schema.get(key)
        if subs is not None:
            if not isinstance(subs, list):
                raise _wrong_type(f"{p}.{key}", "an array", subs)
            for j, sub in enumerate(subs):
                _validate_schema(sub, f"{p}.{key}[{j}]", depth + 1)


def _validate_tool_choice(choice: Any, names: frozenset[str]) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise invalid(
                f"Invalid value for 'tool_choice': {choice!r}; use none, auto, required or "
                "an object naming a function.",
                "tool_choice",
            )
        if choice == "required" and not names:
            raise invalid("'tool_choice' is 'required' but no 'tools' were given.", "tool_choice")
        return
    if not isinstance(choice, dict):
        raise _wrong_type("tool_choice", "a string or an object", choice)
    kind = choice.get("type")
    if kind == "allowed_tools":
        _validate_allowed_tools(choice.get("allowed_tools"), names)
        return
    if kind == "custom":
        name = _custom(choice, "tool_choice")["name"]
        param = "tool_choice.custom.name"
    else:
        fn = choice.get("function")
        if kind != "function" or not isinstance(fn, dict):
            raise invalid(f"'tool_choice' must be {_NAMED_TOOL}.", "tool_choice")
        name = fn.get("name")
        if not isinstance(name, str):
            raise _wrong_type("tool_choice.function.name", "a string", name)
        param = "tool_choice.function.name"
    if name not in names:
        raise invalid(f"'tool_choice' names {name[:80]!r}, which is not among 'tools'.", param)


#: The shapes of a tool named in ``tool_choice``, for the messages of the 400s.
_NAMED_TOOL = (
    "{'type': 'function', 'function': {'name': ...}} or {'type': 'custom', 'custom': {'name': ...}}"
)


def _named_tool(entry: Any) -> str | None:
    """The name an ``allowed_tools`` entry gives (a function or a custom tool), else None."""
    if not isinstance(entry, dict):
        return None
    inner = entry.get("custom") if entry.get("type") == "custom" else entry.get("function")
    name = inner.get("name") if isinstance(inner, dict) else None
    return name if isinstance(name, str) else None


def _validate_allowed_tools(allowed: Any, names: frozenset[str]) -> None:
    """OpenAI's ``{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}``: a subset of
    ``tools`` the model may call this turn (``mode`` auto or required). The LLM answers it
    (:func:`slm_gateway.decide.slm_can_serve`); refused, an agent using it got a 400."""
    if not isinstance(allowed, dict):
        raise _wrong_type("tool_choice.allowed_tools", "an object", allowed)
    mode = allowed.get("mode")
    if mode not in ("auto", "required"):
        raise invalid(
            f"Invalid value for 'tool_choice.allowed_tools.mode': {str(mode)[:40]!r}; use auto "
            "or required.",
            "tool_choice.allowed_tools.mode",
        )
    tools = allowed.get("tools")
    if not isinstance(tools, list) or not tools:
        raise _wrong_type("tool_choice.allowed_tools.tools", "a non-empty array", tools)
    for i, tool in enumerate(tools):
        name = _named_tool(tool)
        if name is None:
            raise invalid(
                f"'tool_choice.allowed_tools.tools[{i}]' must be {_NAMED_TOOL}.",
                f"tool_choice.allowed_tools.tools[{i}]",
            )
        if name not in names:
            raise invalid(
                f"'tool_choice.allowed_tools.tools[{i}]' names {name[:80]!r}, which is not "
                "among 'tools'.",
                f"tool_choice.allowed_tools.tools[{i}]",
            )


__all__ = ["ChatRequest", "GatewayError", "parse_chat_request", "validate_body"]
