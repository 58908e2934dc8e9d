"""What the SLM is told of a request beyond its messages and tools (``tool_choice``,
``parallel_tool_calls``, ``stop``), and how its answer is judged against them.

Against the scripted upstream of :mod:`test_gateway_upstream_faults` (the LLM and Triton on
one raw HTTP server): each test states what an agent or an operator would notice, who
answered, why it fell back, the usage served, the SLM's circuit and error counts.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from test_gateway_upstream_faults import (
    COMPLETION,
    Upstream,
    ask,
    gateway,
    infer_answer,
    infer_request,
    metric,
    respond,
    slm_route,
    upstream,
)

from slm_gateway.backends import infer_body
from slm_gateway.decide import estimate_tokens
from slm_trainer.triton_model import chatformat

__all__ = ["upstream"]  # the fixture, imported for the tests below

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    for name in ("get_weather", "get_forecast")
]


def call(*names: str) -> str:
    """An SLM answer calling each of ``names`` with ``{"city": "Lyon"}``."""
    calls = [{"function": {"name": n, "arguments": {"city": "Lyon"}}} for n in names]
    return orjson.dumps({"role": "assistant", "content": None, "tool_calls": calls}).decode()


def text(content: str | None, **extra: Any) -> str:
    return orjson.dumps({"role": "assistant", "content": content, **extra}).decode()


# ------------------------------------------------------ what the SLM is sent


def test_the_slm_is_sent_tool_choice_parallel_tool_calls_and_stop(upstream: Upstream) -> None:
    """The SLM was asked with messages, tools and max_tokens only, and then held to a
    tool_choice, a parallel_tool_calls and a stop it was never told of."""
    upstream.script.append(infer_answer(call("get_weather")))
    named = {"type": "function", "function": {"name": "get_weather"}}
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, stop=["\n\n"])
    assert r.headers["x-slm-backend"] == "slm"
    inner = infer_request(upstream)
    assert inner["tool_choice"] == named
    assert inner["parallel_tool_calls"] is False
    assert inner["stop"] == ["\n\n"]


def test_a_request_without_them_sends_none_of_them(upstream: Upstream) -> None:
    upstream.script.append(infer_answer(text("Sunny.")))
    c, _ = gateway(slm_route(upstream))
    with c:
        assert ask(c).headers["x-slm-backend"] == "slm"
    assert sorted(infer_request(upstream)) == ["messages", "tools"]


def test_the_exported_model_reads_the_request_and_ignores_the_new_fields() -> None:
    """The exported Triton model (``chatformat.parse_request``) reads messages, tools and
    the limit and ignores any other key: the new fields fail no repository, old or new."""
    ask_ = [{"role": "user", "content": "Weather in Paris?"}]
    body = infer_body(
        ask_, TOOLS, 5.0, 7, tool_choice="required", parallel_tool_calls=False, stop="\n"
    )
    raw = orjson.loads(body)["inputs"][0]["data"][0]
    assert chatformat.parse_request(raw) == (ask_, TOOLS, 7)


# ------------------------------------------ an answer that breaks only tool_choice

FORECAST = {"name": "get_forecast"}


@pytest.mark.parametrize(
    ("answer", "extra"),
    [
        (text("It is sunny in Lyon."), {"tool_choice": "required"}),
        (call("get_weather"), {"tool_choice": {"type": "function", "function": FORECAST}}),
        (call("get_weather", "get_forecast"), {"parallel_tool_calls": False}),
    ],
    ids=["required-but-text", "named-other-offered-tool", "two-calls-parallel-false"],
)
def test_an_answer_breaking_only_tool_choice_is_a_hand_back_not_an_slm_failure(
    upstream: Upstream, answer: str, extra: dict[str, Any]
) -> None:
    """The exported model is not held to tool_choice or parallel_tool_calls (it reads
    neither): an answer that is right but for them was bad output, five such calls opened
    the SLM's circuit for every agent of the task and raised its error rate (SLO fallback).
    The LLM answers it as a hand-back (``defer``), as an answer cut at the agent's limit."""
    for _ in range(4):  # one more than breaker_failures
        upstream.script.extend([infer_answer(answer), respond(200, orjson.dumps(COMPLETION))])
    c, _ = gateway(slm_route(upstream))
    with c:
        for _ in range(4):
            r = ask(c, tools=TOOLS, **extra)
            assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm"
            assert r.headers["x-slm-fallback-reason"] == "defer"
        assert metric(c, "slm_gateway_backend_calls_total", backend="slm", result="defer") == 4
        assert metric(c, "slm_gateway_backend_calls_total", backend="slm", result="bad_output") == 0
        assert metric(c, "slm_gateway_circuit_state", backend="slm") == 0


@pytest.mark.parametrize(
    "answer",
    [
        call("get_time"),  # no such tool offered
        # arguments the tool's schema refuses (city is a string)
        text(None, tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": 3}}}]),
    ],
    ids=["unoffered-tool", "bad-arguments"],
)
def test_a_wrong_tool_or_bad_arguments_stay_bad_output_whatever_tool_choice(
    upstream: Upstream, answer: str
) -> None:
    upstream.script.extend([infer_answer(answer), respond(200, orjson.dumps(COMPLETION))])
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
        assert r.headers["x-slm-fallback-reason"] == "slm_bad_output"


# ------------------------------------------------------------- stop before judging

REACT = "Thought: call the tool\nAction: lookup\nObservation: the tool said"
CUT = "Thought: call the tool\nAction: lookup\n"  # 38 bytes: about 10 tokens


def test_an_answer_within_the_limit_up_to_its_stop_sequence_is_served(upstream: Upstream) -> None:
    """Whole, the model's text is over the agent's max_tokens (about 17 tokens for 12); up
    to the stop sequence, which is all the agent gets, it is within it. It was handed to
    the LLM; it is served, finished at the stop, counted as the text the agent got."""
    upstream.script.append(infer_answer(text(REACT)))
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, max_tokens=12, stop=["Observation:"])
    assert r.headers["x-slm-backend"] == "slm", r.headers.get("x-slm-fallback-reason")
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (CUT, "stop")
    assert r.json()["usage"]["completion_tokens"] == estimate_tokens(len(CUT)) == 10


def test_a_model_cut_at_the_limit_after_its_stop_sequence_is_served(upstream: Upstream) -> None:
    """The model wrote past the stop sequence until the agent's limit cut it
    (``finish_reason: "length"``): what the agent gets, the text before the stop, is a
    finished answer, served with the tokens of that text, not the 16 the model wrote."""
    cut_at_limit = text(REACT, finish_reason="length", usage={"completion_tokens": 16})
    upstream.script.append(infer_answer(cut_at_limit, 0.9))
    c, _ = gateway(slm_route(upstream, confidence_threshold=0.5))
    with c:
        r = ask(c, max_tokens=16, stop="Observation:")
    assert r.headers["x-slm-backend"] == "slm", r.headers.get("x-slm-fallback-reason")
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] == 10


def test_an_exported_models_cut_answer_keeps_its_hand_back_with_a_stop_inside(
    upstream: Upstream,
) -> None:
    """The exported model serves an answer its limit cut with confidence 0, a mark of the
    cut, not its judgement of the text: with the stop sequence inside it is still handed
    back as cut at the agent's limit (``defer``), not as ``low_confidence``."""
    cut_at_limit = text(REACT, finish_reason="length", usage={"completion_tokens": 16})
    upstream.script.extend(
        [infer_answer(cut_at_limit, 0.0), respond(200, orjson.dumps(COMPLETION))]
    )
    c, _ = gateway(slm_route(upstream, confidence_threshold=0.5))
    with c:
        r = ask(c, max_tokens=16, stop=["Observation:"])
    assert r.headers["x-slm-fallback-reason"] == "defer"


@pytest.mark.parametrize(
    ("answer", "served"),
    [
        (text(REACT, usage={"completion_tokens": 17}), 10),  # the cut text's, not the model's
        (text(REACT), 10),  # no count: the estimate of the cut text
        (text(CUT, usage={"completion_tokens": 9}), 9),  # nothing cut: the model's count
    ],
    ids=["counted-and-cut", "estimated-and-cut", "counted-not-cut"],
)
def test_a_stop_cut_answers_usage_counts_the_text_served(
    upstream: Upstream, answer: str, served: int
) -> None:
    """A served answer cut at the stop sequence counted the cut-away text as completion
    tokens: the agent's usage and the task's SLM cost read more than was served."""
    upstream.script.append(infer_answer(answer))
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, stop=["Observation:"])
    assert r.headers["x-slm-backend"] == "slm"
    assert r.json()["choices"][0]["message"]["content"] == CUT
    assert r.json()["usage"]["completion_tokens"] == served
