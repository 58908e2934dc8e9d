"""Every answer of a chat completion names its request id, errors included.

OpenAI sends ``x-request-id`` on every answer and its SDKs show it as ``exc.request_id``, the
one thing an agent developer can hand to whoever runs the gateway to find the call. The
gateway sent it on answers only: every error (an unknown model, a bad request, an LLM's 4xx
passed on, a 502, streamed or not) came without it, and an ``X-Request-ID`` the agent sent
was not echoed. Here the real ``openai`` SDK reads them from a real gateway process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from slm_e2e import llm_standin
from slm_gateway.testing import GatewayProcess, start_gateway

ASK = [{"role": "user", "content": "What is the weather in Lyon?"}]
#: The gateway's own ids: a per-process prefix and a counter, 24 hex digits.
GATEWAY_ID = re.compile(r"[0-9a-f]{24}")


@pytest.fixture(autouse=True)
def reset(standin: llm_standin.StandIn) -> None:
    standin.control(**llm_standin.SETTINGS, reset_stats=True)


@pytest.fixture(scope="module")
def gateway(
    standin: llm_standin.StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    d: Path = tmp_path_factory.mktemp("rid")
    task = {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}
    routes = d / "routes.yaml"
    routes.write_text(yaml.safe_dump({"tasks": {"weather": task}}))
    with start_gateway(["--routes", str(routes)], log_path=d / "gw.log") as gw:
        yield gw


@pytest.fixture
def sdk(gateway: GatewayProcess) -> Any:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="agent-key", max_retries=0)


#: name: (the request's fields, the stand-in's settings, the error the SDK raises)
ERRORS: dict[str, tuple[dict[str, Any], dict[str, Any], type[openai.APIStatusError]]] = {
    "unknown model": ({"model": "nope"}, {}, openai.NotFoundError),
    "bad request": (
        {"model": "weather", "stream_options": {"include_usage": True}},
        {},
        openai.BadRequestError,
    ),
    **{
        f"llm {status}{' streamed' if stream else ''}": (
            {"model": "weather", "stream": stream},
            {"llm_error_every": 1, "llm_error_status": status, "llm_error_retry_after": "2"},
            error,
        )
        for status, error in (
            (429, openai.RateLimitError),  # the LLM's 4xx, passed on
            (500, openai.InternalServerError),  # a 502
        )
        for stream in (False, True)
    },
}


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("sent", [None, "agent-trace-7f3a"], ids=["gateway-id", "agent-id"])
def test_an_error_answer_names_its_request_id(
    sdk: Any, standin: llm_standin.StandIn, case: str, sent: str | None
) -> None:
    fields, settings, error = ERRORS[case]
    standin.control(**settings)
    headers = {"X-Request-ID": sent} if sent else {}
    with pytest.raises(error) as caught:
        sdk.chat.completions.create(messages=ASK, extra_headers=headers, **fields)
    if sent:
        assert caught.value.request_id == sent
    else:
        assert caught.value.request_id is not None
        assert GATEWAY_ID.fullmatch(caught.value.request_id)


def test_an_answer_and_an_error_have_ids_of_one_kind(
    sdk: Any, standin: llm_standin.StandIn
) -> None:
    """The id an agent sent is echoed on an answer as on an error; one too long to be an id
    is replaced by the gateway's own on both, never echoed on one and dropped on the other."""
    ok = sdk.chat.completions.with_raw_response.create(
        model="weather", messages=ASK, extra_headers={"X-Request-ID": "agent-trace-1"}
    )
    assert ok.headers["x-request-id"] == "agent-trace-1"
    too_long = "x" * 200
    ok = sdk.chat.completions.with_raw_response.create(
        model="weather", messages=ASK, extra_headers={"X-Request-ID": too_long}
    )
    assert GATEWAY_ID.fullmatch(ok.headers["x-request-id"])
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(
            model="nope", messages=ASK, extra_headers={"X-Request-ID": too_long}
        )
    assert caught.value.request_id is not None
    assert GATEWAY_ID.fullmatch(caught.value.request_id)
