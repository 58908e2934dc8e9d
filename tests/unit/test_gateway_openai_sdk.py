"""Agents change only their base URL: the official OpenAI Python SDK against the gateway.

A real gateway process in front of the stand-in, and the ``openai`` package as an agent uses
it: plain and streamed completions, tool calls, the usage chunk, an SLM-served stream, a
stream that breaks off, and the errors an SDK turns into its exception types. What the SDK
parses and raises is what an agent sees; nothing here reads the gateway's bytes itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from slm_e2e import llm_standin
from slm_gateway.testing import GatewayProcess, start_gateway

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Lyon?"}]


@pytest.fixture(autouse=True)
def reset(standin: llm_standin.StandIn) -> None:
    standin.control(**llm_standin.SETTINGS, reset_stats=True)


@pytest.fixture(scope="module")
def gateway(
    standin: llm_standin.StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    d: Path = tmp_path_factory.mktemp("sdk")
    llm = {"llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}
    tasks = {
        "weather": {"mode": "llm", **llm},
        "extract": {"mode": "slm", "slmEndpoint": standin.slm_endpoint, **llm},
    }
    routes = d / "routes.yaml"
    routes.write_text(yaml.safe_dump({"tasks": tasks}))
    with start_gateway(["--routes", str(routes)], log_path=d / "gw.log") as gw:
        yield gw


@pytest.fixture
def sdk(gateway: GatewayProcess) -> Any:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="agent-key", max_retries=0)


def streamed_message(stream: Any) -> tuple[str, list[tuple[str, str]], Any]:
    """(content, [(tool name, arguments)], usage) accumulated from the SDK's chunks."""
    content = ""
    calls: dict[int, list[str]] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, ["", ""])
                slot[0] += (call.function and call.function.name) or ""
                slot[1] += (call.function and call.function.arguments) or ""
    return content, [(n, a) for _, (n, a) in sorted(calls.items())], usage


@pytest.mark.parametrize("task", ["weather", "extract"])  # LLM-relayed, SLM-written
def test_the_sdk_reads_plain_and_streamed_tool_calls_alike(sdk: Any, task: str) -> None:
    plain = sdk.chat.completions.create(model=task, messages=ASK, tools=TOOLS)
    call = plain.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    stream = sdk.chat.completions.create(
        model=task, messages=ASK, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    content, calls, usage = streamed_message(stream)
    assert calls == [(call.function.name, call.function.arguments)]
    assert content == ""
    assert usage is not None and usage.completion_tokens > 0


def test_the_sdks_stream_helper_builds_the_final_completion(sdk: Any) -> None:
    with sdk.chat.completions.stream(model="weather", messages=ASK) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "echo: What is the weather in Lyon?"
    assert final.choices[0].finish_reason == "stop"


def test_a_stream_that_breaks_off_raises_in_the_agent(
    sdk: Any, standin: llm_standin.StandIn
) -> None:
    standin.control(llm_stream_cut_after=2)
    stream = sdk.chat.completions.create(model="weather", messages=ASK, stream=True)
    with pytest.raises(openai.APIError, match="broke off"):
        for _ in stream:
            pass


def test_gateway_errors_are_the_sdks_exception_types(
    sdk: Any, standin: llm_standin.StandIn
) -> None:
    with pytest.raises(openai.NotFoundError, match="no AgentTask of that name"):
        sdk.chat.completions.create(model="nope", messages=ASK)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        sdk.chat.completions.create(
            model="weather", messages=ASK, stream_options={"include_usage": True}
        )
    standin.control(llm_error_every=1, llm_error_status=500)
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="weather", messages=ASK, stream=True)


def test_the_sdk_retrieves_a_listed_model_and_only_those(sdk: Any) -> None:
    """``client.models.retrieve`` (GET /v1/models/{model}) was an "Unknown path" 404 though
    /v1/models listed the task: it gets the entry the list has, and an unknown name the
    model_not_found 404 a chat completion gets."""
    listed = {m.id: m for m in sdk.models.list()}
    for task in ("weather", "extract"):
        got = sdk.models.retrieve(task)
        assert got.model_dump() == listed[task].model_dump()
    with pytest.raises(openai.NotFoundError, match="no AgentTask of that name") as caught:
        sdk.models.retrieve("nope")
    assert caught.value.code == "model_not_found"


def sa_token(namespace: str) -> str:
    """A token shaped like a ServiceAccount's, for the fake review of :func:`authed_sdk`."""
    import base64

    import orjson

    claims = {
        "aud": ["slm-fleet-gateway"],
        "exp": 4_000_000_000,
        "sub": f"system:serviceaccount:{namespace}:agent",
    }

    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(d)).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_an_agent_retrieves_only_the_models_its_list_shows(
    standin: llm_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --agent-auth serviceaccount, retrieve follows /v1/models: an agent gets its own
    namespace's tasks and the routes file's, by the id its list shows them under, and
    another namespace's task is not found (not a 403 that would tell it exists); no token
    is a 401 as for the list."""
    from starlette.testclient import TestClient

    from slm_gateway import app as app_module
    from slm_gateway.app import create_app
    from slm_gateway.auth import TokenReviewer, token_claims
    from slm_gateway.config import GatewayConfig
    from slm_gateway.routes import Route, RouteTable

    def review(api: Any, token: str, audience: str) -> dict[str, Any]:
        username = (token_claims(token) or {})["sub"]
        return {"authenticated": True, "audiences": [audience], "user": {"username": username}}

    monkeypatch.setattr(
        app_module,
        "token_reviewer",
        lambda kubeconfig, audience, ttl_s, **kw: TokenReviewer(None, audience, review=review),
    )
    llm = {"mode": "llm", "llm_base_url": standin.llm_base_url, "llm_model": "gpt-4o"}
    table = RouteTable()
    table.replace_all(
        [
            Route(task="weather", namespace="team-a", **llm),
            Route(task="weather", namespace="team-b", **llm),
            Route(task="payroll", namespace="team-b", **llm),
            Route(task="search", **llm),  # from a routes file: any agent's
        ]
    )
    app = create_app(GatewayConfig(agent_auth="serviceaccount"), table)
    with TestClient(app) as http:
        sdk = openai.OpenAI(
            base_url="http://testserver/v1",
            api_key=sa_token("team-a"),
            http_client=http,
            max_retries=0,
        )
        listed = {m.id: m.model_dump() for m in sdk.models.list()}
        assert sorted(listed) == ["search", "weather"]
        for name, shown in (("weather", "weather"), ("team-a/weather", "weather")):
            assert sdk.models.retrieve(name).model_dump() == listed[shown]
        assert sdk.models.retrieve("search").model_dump() == listed["search"]
        for name in ("payroll", "team-b/payroll", "team-b/weather", "nope"):
            with pytest.raises(openai.NotFoundError) as caught:
                sdk.models.retrieve(name)
            assert caught.value.code == "model_not_found"
            if "/" not in name:  # a bare name: whether another namespace has it stays unsaid
                assert "team-b" not in caught.value.message
        anonymous = http.get("/v1/models/weather")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
