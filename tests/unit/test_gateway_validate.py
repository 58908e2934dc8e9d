"""Request validation and OpenAI-style error bodies."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from slm_gateway.errors import GatewayError, error_body
from slm_gateway.validate import parse_chat_request

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": ["integer", "null"]}},
            "required": ["city"],
        },
    },
}


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "model": "weather",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [TOOL],
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def test_a_valid_request_keeps_every_field() -> None:
    raw = body(
        temperature=0.2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        vendor_extension={"x": 1},
    )
    req = parse_chat_request(raw)
    assert req.model == "weather"
    assert req.tools == [TOOL]
    assert req.body["vendor_extension"] == {"x": 1}


def test_openais_allowed_tools_choice_is_valid() -> None:
    """OpenAI's current Chat Completions lets a turn restrict the tools it may call; an agent
    that used it got a 400 before reaching the LLM, which answers it."""
    choice = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        },
    }
    assert parse_chat_request(body(tool_choice=choice)).body["tool_choice"] == choice


CUSTOM = {
    "type": "custom",
    "custom": {
        "name": "apply_patch",
        "description": "Apply a patch",
        "format": {"type": "grammar", "grammar": {"definition": "start: /.+/", "syntax": "lark"}},
    },
}


def test_openais_custom_tools_are_valid_wherever_the_sdk_sends_them() -> None:
    """GPT-5's custom (free-form input) tools, as openai-python types them: in ``tools``, as
    a named ``tool_choice``, in ``allowed_tools`` and as an earlier turn's tool call. An agent
    using one got a 400 before the LLM, which answers it, ever saw the request."""
    call = {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** P"}}
    history = [
        {"role": "user", "content": "Patch it."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    named = {"type": "custom", "custom": {"name": "apply_patch"}}
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "auto", "tools": [named, TOOL]},
    }
    for choice in (named, allowed):
        req = parse_chat_request(body(messages=history, tools=[TOOL, CUSTOM], tool_choice=choice))
        assert req.tool_names == frozenset({"get_weather", "apply_patch"})
        assert req.body["tool_choice"] == choice and req.tools == [TOOL, CUSTOM]


def test_a_function_result_may_be_null() -> None:
    """openai-python types a legacy ``function`` message's content as Optional."""
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "function", "name": "get_weather", "content": None},
    ]
    assert len(parse_chat_request(body(messages=messages)).messages) == 2


def test_a_full_tool_conversation_is_valid() -> None:
    messages = [
        {"role": "system", "content": "Pick tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    ]
    assert len(parse_chat_request(body(messages=messages)).messages) == 4


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b'{"model": "weather", "messages": [', None, "invalid_json"),
        (b"[1, 2]", None, "invalid_type"),
        (body(messages=...), "messages", "missing_required_parameter"),
        (body(messages="hi"), "messages", "invalid_type"),
        (body(messages=[]), "messages", "invalid_value"),
        (body(messages=[5]), "messages[0]", "invalid_type"),
        (body(messages=[{"content": "x"}]), "messages[0].role", "missing_required_parameter"),
        (body(messages=[{"role": "boss", "content": "x"}]), "messages[0].role", "invalid_value"),
        (body(messages=[{"role": "user", "content": 7}]), "messages[0].content", "invalid_type"),
        (body(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter"),
        (
            body(messages=[{"role": "tool", "content": "x"}]),
            "messages[0].tool_call_id",
            "missing_required_parameter",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
            "messages[0].content[0].text",
            "invalid_type",
        ),
        (body(model=5), "model", "invalid_type"),
        (body(tools={"a": 1}), "tools", "invalid_type"),
        (body(tools=["get_weather"]), "tools[0]", "invalid_type"),
        (body(tools=[{"type": "retrieval"}]), "tools[0].type", "invalid_value"),
        (body(tools=[{"type": "function"}]), "tools[0].function", "missing_required_parameter"),
        (
            body(tools=[{"type": "function", "function": {"name": "get weather"}}]),
            "tools[0].function.name",
            "invalid_value",
        ),
        (
            body(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
            "tools[0].function.parameters",
            "invalid_type",
        ),
        (
            body(
                tools=[
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "map"}}}
                ]
            ),
            "tools[0].function.parameters.type",
            "invalid_value",
        ),
        (
            body(
                tools=[
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"properties": {"a": "string"}}},
                    }
                ]
            ),
            "tools[0].function.parameters.properties.a",
            "invalid_type",
        ),
        (
            body(
                tools=[
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"required": "a"}},
                    }
                ]
            ),
            "tools[0].function.parameters.required",
            "invalid_type",
        ),
        (body(tools=[TOOL, TOOL]), "tools[1].function.name", "invalid_value"),
        (body(tool_choice="always"), "tool_choice", "invalid_value"),
        (
            body(tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice.function.name",
            "invalid_value",
        ),
        (
            body(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "any"}}),
            "tool_choice.allowed_tools.mode",
            "invalid_value",
        ),
        (
            body(
                tool_choice={
                    "type": "allowed_tools",
                    "allowed_tools": {"mode": "auto", "tools": [{"function": {"name": "x"}}]},
                }
            ),
            "tool_choice.allowed_tools.tools[0]",
            "invalid_value",
        ),
        (
            body(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto"}}),
            "tool_choice.allowed_tools.tools",
            "invalid_type",
        ),
        (
            body(tools=[{"type": "custom", "custom": {"description": "x"}}]),
            "tools[0].custom.name",
            "missing_required_parameter",
        ),
        (body(tools=[{"type": "custom", "custom": "x"}]), "tools[0].custom", "invalid_type"),
        (
            body(tools=[{"type": "custom", "custom": {"name": "p", "format": {"type": "xml"}}}]),
            "tools[0].custom.format.type",
            "invalid_value",
        ),
        (
            body(tools=[TOOL, {"type": "custom", "custom": {"name": "get_weather"}}]),
            "tools[1].custom.name",
            "invalid_value",
        ),
        (
            body(tool_choice={"type": "custom", "custom": {"name": "nope"}}),
            "tool_choice.custom.name",
            "invalid_value",
        ),
        (
            body(tool_choice={"type": "custom", "custom": {"name": ""}}),
            "tool_choice.custom.name",
            "invalid_type",
        ),
        (
            body(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "p"}}],
                    }
                ]
            ),
            "messages[0].tool_calls[0].custom.input",
            "invalid_type",
        ),
        (body(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
        (body(stream=True, stream_options=[]), "stream_options", "invalid_type"),
        (body(stream="yes"), "stream", "invalid_type"),
        (body(temperature="hot"), "temperature", "invalid_type"),
        (body(temperature=3), "temperature", "invalid_value"),
        (body(max_tokens=0), "max_tokens", "invalid_value"),
        (body(max_tokens=True), "max_tokens", "invalid_type"),
        (body(n=1.5), "n", "invalid_type"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
        (body(response_format="json"), "response_format", "invalid_type"),
    ],
)
def test_bad_requests_name_the_parameter(raw: bytes, param: str | None, code: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_chat_request(raw)
    err = info.value
    assert err.status == 400
    assert (err.param, err.code) == (param, code)
    doc = orjson.loads(err.body())
    assert doc == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


def test_tool_names_with_a_trailing_newline_are_refused() -> None:
    """``$`` also matches before a final newline: the name would reach the SLM's prompt and
    the captured call logs as ``get_weather\\n``."""
    tool = {"type": "function", "function": {"name": "get_weather\n"}}
    with pytest.raises(GatewayError) as info:
        parse_chat_request(body(tools=[tool]))
    assert info.value.param == "tools[0].function.name"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"anything": True, "nothing": False}},
        {
            "type": "object",
            "properties": {
                "pair": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}
            },
        },
        {"type": "object", "properties": {"x": {"anyOf": [True, {"type": "string"}]}}},
    ],
)
def test_valid_json_schemas_an_llm_accepts_pass(schema: dict[str, Any]) -> None:
    """Boolean subschemas and the tuple form of ``items`` (pydantic v1's ``Tuple[str,
    int]``) are JSON Schema: refusing them would fail calls the LLM answers."""
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    assert parse_chat_request(body(tools=[tool])).tool_names == frozenset({"f"})


def test_a_broken_subschema_inside_tuple_items_is_still_refused() -> None:
    schema = {"type": "array", "items": [{"type": "string"}, {"type": "date"}]}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    with pytest.raises(GatewayError) as info:
        parse_chat_request(body(tools=[tool]))
    assert info.value.param == "tools[0].function.parameters.items[1].type"


def deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_tools_nested_deeper_than_the_gateway_writes_are_a_400() -> None:
    """orjson reads 1024 levels but writes 254; the tools are written again (the cache key),
    so such a body is the agent's error, not the gateway's 500."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"default": deep(300)}}}
    raw = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    )
    with pytest.raises(GatewayError) as info:
        parse_chat_request(raw.encode())
    assert (info.value.status, info.value.param, info.value.code) == (400, "tools", "invalid_json")
    tool["function"]["parameters"] = {"default": deep(200)}  # type: ignore[index]
    assert parse_chat_request(body(tools=[tool])).tool_names == frozenset({"f"})


def test_error_body_shape() -> None:
    doc = orjson.loads(error_body("boom", type="server_error", code="upstream_error"))
    assert doc == {
        "error": {
            "message": "boom",
            "type": "server_error",
            "param": None,
            "code": "upstream_error",
        }
    }


def test_every_optional_field_is_checked_when_present() -> None:
    from slm_gateway.validate import _OPTIONAL_FIELDS

    for name in sorted(_OPTIONAL_FIELDS):
        with pytest.raises(GatewayError) as err:
            parse_chat_request(body(**{name: [[1]]}))
        assert err.value.status == 400
        assert (err.value.param or "").startswith(name), name


def test_the_validated_tools_cache_holds_digests_not_tool_lists() -> None:
    """Keyed by the tools' JSON, 1024 entries of tool lists near the 1 MiB body limit held
    about a GiB (requests for unknown models are validated first and filled it too)."""
    from slm_gateway import validate

    big = "x" * 50_000
    for i in range(20):
        tool = {"type": "function", "function": {"name": f"f{i}", "description": big}}
        assert parse_chat_request(body(tools=[tool])).tools == [tool]
    assert sum(len(k) for k in validate._TOOLS_SEEN) <= 32 * len(validate._TOOLS_SEEN)
    # a cached list is still told apart from another: a changed tool is validated again
    bad = {"type": "function", "function": {"name": "f0", "description": big, "parameters": 1}}
    with pytest.raises(GatewayError):
        parse_chat_request(body(tools=[bad]))


@pytest.mark.parametrize("logprobs", [..., False, None])
def test_top_logprobs_without_logprobs_is_refused_as_openai_refuses_it(logprobs: Any) -> None:
    """OpenAI answers a 400 naming ``top_logprobs`` when ``logprobs`` is not true; the gateway
    passed it on (and an SLM answered it, without the log-probabilities asked for)."""
    with pytest.raises(GatewayError) as info:
        parse_chat_request(body(top_logprobs=2, logprobs=logprobs))
    err = info.value
    assert (err.status, err.param, err.code) == (400, "top_logprobs", "invalid_value")
    assert "'top_logprobs'" in err.message and "'logprobs'" in err.message
    assert orjson.loads(err.body())["error"]["type"] == "invalid_request_error"
    assert parse_chat_request(body(top_logprobs=2, logprobs=True)).body["top_logprobs"] == 2
    assert parse_chat_request(body(top_logprobs=None)).body["top_logprobs"] is None
