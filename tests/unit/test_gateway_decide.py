"""Per-request decisions of the gateway: backend choice, canary split, SLM verdict, agreement."""

from __future__ import annotations

import math
from typing import Any

import pytest

from slm_gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from slm_gateway.decide import (
    LLM,
    REASON_BAD_OUTPUT,
    REASON_CIRCUIT_OPEN,
    REASON_DEFER,
    REASON_LOW_CONFIDENCE,
    SLM,
    Plan,
    Price,
    agree,
    answer_limit,
    canary_bucket,
    cut_at_stop,
    estimate_tokens,
    fits_request,
    judge_answer,
    normalize_message,
    over_limit,
    plan_request,
    slm_can_serve,
    slm_completion_tokens,
    slm_verdict,
    stop_cut,
    tool_contract_verdict,
)


def plan(
    mode: str,
    pct: int = 0,
    bucket: int = 0,
    *,
    has_slm: bool = True,
    slm_allowed: bool = True,
    llm_allowed: bool = True,
) -> Plan:
    return plan_request(
        mode, pct, bucket, has_slm=has_slm, slm_allowed=slm_allowed, llm_allowed=llm_allowed
    )


class TestPlan:
    def test_llm_mode_never_touches_the_slm(self) -> None:
        p = plan("llm")
        assert (p.primary, p.fallback, p.shadow) == (LLM, False, False)

    def test_slm_mode_uses_the_slm_with_llm_fallback(self) -> None:
        p = plan("slm")
        assert (p.primary, p.fallback, p.reason) == (SLM, True, "")

    def test_slm_mode_with_open_breaker_goes_to_llm_and_says_why(self) -> None:
        p = plan("slm", slm_allowed=False)
        assert (p.primary, p.reason) == (LLM, REASON_CIRCUIT_OPEN)

    def test_modes_without_an_slm_endpoint_degrade_to_llm(self) -> None:
        for mode in ("shadow", "canary", "slm"):
            p = plan(mode, 100, has_slm=False)
            assert (p.primary, p.shadow, p.reason) == (LLM, False, "")

    def test_shadow_answers_from_llm_and_copies_to_slm(self) -> None:
        p = plan("shadow")
        assert (p.primary, p.shadow) == (LLM, True)
        assert plan("shadow", slm_allowed=False).shadow is False

    @pytest.mark.parametrize(
        ("pct", "bucket", "primary"),
        [(0, 0, LLM), (10, 9, SLM), (10, 10, LLM), (100, 99, SLM), (50, 49, SLM), (50, 50, LLM)],
    )
    def test_canary_split_by_bucket(self, pct: int, bucket: int, primary: str) -> None:
        assert plan("canary", pct, bucket).primary == primary

    def test_canary_calls_the_llm_answers_are_copied_to_the_slm(self) -> None:
        """The operator promotes a canary only on windows that measured agreement; the calls
        the LLM answers during the canary are what it is measured on."""
        p = plan("canary", 10, 50)
        assert (p.primary, p.shadow) == (LLM, True)
        assert plan("canary", 10, 50, slm_allowed=False).shadow is False
        assert plan("canary", 10, 5).shadow is False  # the SLM answers this one itself

    def test_canary_prefers_slm_while_llm_circuit_is_open(self) -> None:
        assert plan("canary", 0, 99, llm_allowed=False).primary == SLM

    def test_canary_slm_bucket_with_open_slm_breaker_goes_to_llm(self) -> None:
        p = plan("canary", 100, 0, slm_allowed=False)
        assert (p.primary, p.reason) == (LLM, REASON_CIRCUIT_OPEN)


class TestCanaryBucket:
    def test_same_request_id_same_bucket(self) -> None:
        assert canary_bucket("req-42") == canary_bucket("req-42")
        assert 0 <= canary_bucket("req-42") < 100

    def test_split_is_close_to_the_percentage(self) -> None:
        ids = [f"{i:08x}-agent" for i in range(20000)]
        share = sum(canary_bucket(i) < 20 for i in ids) / len(ids)
        assert 0.18 < share < 0.22


class TestVerdict:
    msg = {"role": "assistant", "content": "ok"}
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
    }

    def test_confident_answers_are_served(self) -> None:
        assert slm_verdict(self.msg, 0.9, 0.5) == ""
        assert slm_verdict(self.call, 0.5, 0.5) == ""

    def test_low_confidence_falls_back(self) -> None:
        assert slm_verdict(self.msg, 0.49, 0.5) == REASON_LOW_CONFIDENCE

    def test_defer_falls_back_even_when_confident(self) -> None:
        assert slm_verdict({"defer": True}, 1.0, 0.0) == REASON_DEFER

    @pytest.mark.parametrize(
        ("answer", "confidence"),
        [
            ("text", 0.9),
            ({"role": "assistant"}, 0.9),
            ({"content": 5}, 0.9),
            ({"tool_calls": "f()"}, 0.9),
            ({"tool_calls": [{"function": {"arguments": "{}"}}]}, 0.9),
            ({"content": "ok"}, None),
            ({"content": "ok"}, math.nan),
            ({"content": "ok"}, True),
        ],
    )
    def test_unusable_outputs_are_bad_output(self, answer: object, confidence: object) -> None:
        assert slm_verdict(answer, confidence, 0.0) == REASON_BAD_OUTPUT

    @pytest.mark.parametrize("content", [{"text": "hi"}, 5, ["hi"], True])
    def test_tool_calls_with_content_that_is_not_text_are_bad_output(self, content: object) -> None:
        """OpenAI's ``content`` is a string or null; served as anything else, an agent's SDK
        fails to parse the whole completion, which the LLM could have answered."""
        assert slm_verdict({**self.call, "content": content}, 0.9, 0.0) == REASON_BAD_OUTPUT
        assert slm_verdict({**self.call, "content": ""}, 0.9, 0.0) == ""


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        ({"city": "Paris"}, True),
        ('{"city": "Paris"}', True),
        ("", True),
        ('"Paris"', False),
        ("null", False),
        ("[1, 2]", False),
        ("{not json", False),
        (7, False),
    ],
)
def test_tool_call_arguments_must_be_a_json_object(args: object, ok: bool) -> None:
    """An agent's SDK passes the arguments to its tool as keyword arguments: a string, a
    list or broken JSON would fail there, after the gateway served it as a good answer."""
    answer = {"tool_calls": [{"function": {"name": "get_weather", "arguments": args}}]}
    assert slm_verdict(answer, 0.9, 0.5) == ("" if ok else REASON_BAD_OUTPUT)


def test_arguments_nested_deeper_than_the_gateway_writes_are_bad_output() -> None:
    """orjson reads 1024 levels but writes 254: arguments the gateway could not write as
    text are a fallback to the LLM, not a 500; and a shadow comparison with arguments that
    deep (as text) compares them as text instead of raising."""
    nested: Any = {}
    for _ in range(300):
        nested = {"a": nested}
    answer = {"tool_calls": [{"function": {"name": "f", "arguments": nested}}]}
    assert slm_verdict(answer, 0.9, 0.5) == REASON_BAD_OUTPUT
    text = '{"a":' * 300 + "{}" + "}" * 300
    deep_call = {"tool_calls": [{"function": {"name": "f", "arguments": text}}]}
    assert agree(deep_call, deep_call)
    assert not agree(deep_call, {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]})


class TestNormalize:
    def test_tool_calls_get_ids_and_string_arguments(self) -> None:
        out = normalize_message(
            {"tool_calls": [{"function": {"name": "get", "arguments": {"b": 1, "a": 2}}}]},
            "abcdef",
        )
        call = out["tool_calls"][0]
        assert call["id"] == "call_abcdef_0"
        bare = normalize_message(
            {"tool_calls": [{"function": {"name": "f", "arguments": " "}}]}, "x"
        )
        assert bare["tool_calls"][0]["function"]["arguments"] == "{}"
        assert call["type"] == "function"
        assert call["function"] == {"name": "get", "arguments": '{"b":1,"a":2}'}
        assert out["role"] == "assistant" and out["content"] is None

    @pytest.mark.parametrize("cid", [7, "", None, {"x": 1}, "call_0"])
    def test_the_gateway_names_every_call(self, cid: object) -> None:
        """Whatever id the model gave (none, a number, or the ``call_0`` it gives on every
        answer), each call gets the answer's own id: an agent matches tool results to calls
        by id across all its turns."""
        calls = [{"id": cid, "function": {"name": "f"}}, {"id": cid, "function": {"name": "g"}}]
        out = normalize_message({"tool_calls": calls}, "a1")
        assert [c["id"] for c in out["tool_calls"]] == ["call_a1_0", "call_a1_1"]


class TestAgree:
    def call(self, name: str, args: object) -> dict[str, object]:
        return {"tool_calls": [{"function": {"name": name, "arguments": args}}]}

    def test_same_call_with_reordered_or_respaced_arguments(self) -> None:
        assert agree(self.call("f", '{"a": 1, "b": [1,2]}'), self.call("f", '{"b":[1, 2],"a":1}'))
        assert agree(self.call("f", {"a": 1}), self.call("f", '{"a": 1}'))

    def test_different_arguments_or_names_disagree(self) -> None:
        assert not agree(self.call("f", '{"a": 1}'), self.call("f", '{"a": 2}'))
        assert not agree(self.call("f", "{}"), self.call("g", "{}"))

    def test_call_against_text_disagrees(self) -> None:
        assert not agree(self.call("f", "{}"), {"content": "f()"})

    def test_text_up_to_whitespace(self) -> None:
        assert agree({"content": " Paris,  France\n"}, {"content": "Paris, France"})
        assert not agree({"content": "Paris"}, {"content": "Lyon"})

    def test_parallel_calls_compare_as_a_multiset(self) -> None:
        f = {"function": {"name": "f", "arguments": "{}"}}
        g = {"function": {"name": "g", "arguments": '{"x": 1}'}}
        assert agree({"tool_calls": [f, g]}, {"tool_calls": [g, f]})
        assert not agree({"tool_calls": [f, g]}, {"tool_calls": [f]})

    @pytest.mark.parametrize("calls", [5, True, 1.5])
    def test_tool_calls_that_are_not_a_list_count_as_none(self, calls: object) -> None:
        """The LLM's message is not validated before the shadow compares it; a scalar
        ``tool_calls`` raised TypeError inside the shadow task, which was then never counted."""
        llm = {"role": "assistant", "content": "Paris", "tool_calls": calls}
        assert agree({"role": "assistant", "content": "Paris"}, llm)
        assert not agree(self.call("f", "{}"), llm)


class TestCost:
    def test_price_per_thousand_tokens(self) -> None:
        assert Price(0.0025, 0.01).cost(1000, 500) == pytest.approx(0.0075)

    def test_token_estimate(self) -> None:
        assert estimate_tokens(0) == 1
        assert estimate_tokens(400) == 100


class TestBreaker:
    def test_opens_after_consecutive_failures_only(self) -> None:
        b = CircuitBreaker(failure_threshold=3, cooldown_s=10)
        b.failure(0)
        b.failure(0)
        b.success(0)
        b.failure(0)
        b.failure(0)
        assert b.state == CLOSED
        b.failure(1)
        assert b.state == OPEN
        assert not b.allow(5)

    def test_half_open_lets_one_probe_through_after_cooldown(self) -> None:
        b = CircuitBreaker(failure_threshold=1, cooldown_s=10)
        b.failure(0)
        assert not b.available(9.9)
        assert b.available(10)
        assert b.allow(10)
        assert b.state == HALF_OPEN
        assert not b.allow(10.5)  # the probe is in flight
        b.success(11)
        assert b.state == CLOSED and b.allow(11)

    def test_failed_probe_reopens_for_another_cooldown(self) -> None:
        b = CircuitBreaker(failure_threshold=1, cooldown_s=10)
        b.failure(0)
        assert b.allow(10)
        b.failure(12)
        assert b.state == OPEN
        assert not b.allow(21)
        assert b.allow(22)

    def test_lost_probe_expires(self) -> None:
        b = CircuitBreaker(failure_threshold=1, cooldown_s=10)
        b.failure(0)
        assert b.allow(10)
        assert not b.allow(19)
        assert b.allow(20)

    def test_a_call_let_through_before_the_circuit_opened_does_not_close_it(self) -> None:
        """A long call (a stream) admitted before the outage that ends well during the
        cooldown closed the open circuit at once, with no probe: the agents got the failing
        backend's 502s again instead of fast 503s, and the circuit flapped."""
        b = CircuitBreaker(failure_threshold=2, cooldown_s=30)
        assert b.allow(0)  # the slow call
        b.failure(1, admitted_at=1)
        b.failure(2, admitted_at=2)
        assert b.state == OPEN
        b.success(5, admitted_at=0)  # the slow call ends while open: ignored
        assert b.state == OPEN and not b.allow(6)
        assert b.allow(32) and b.state == HALF_OPEN  # the probe, at 32
        b.success(33, admitted_at=0)  # another old call: still not the probe
        b.failure(33, admitted_at=1)
        assert b.state == HALF_OPEN
        b.success(34, admitted_at=32)  # the probe decides
        assert b.state == CLOSED
        b.failure(40, admitted_at=3)  # once closed, every outcome counts again
        b.failure(41, admitted_at=40)
        assert b.state == OPEN

    def test_rejects_bad_settings(self) -> None:
        with pytest.raises(ValueError):
            CircuitBreaker(failure_threshold=0)


def test_label_accuracy_agreement_compares_only_the_selected_tool() -> None:
    from slm_gateway.decide import agree

    def call(name: str, args: str) -> dict:
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": name, "arguments": args}}
            ],
        }

    slm, llm = call("get_weather", "{}"), call("get_weather", '{"city": "Paris"}')
    assert not agree(slm, llm)  # full comparison: arguments differ
    assert agree(slm, llm, "label-accuracy")  # tool selection: same tool
    assert not agree(call("get_time", "{}"), llm, "label-accuracy")
    assert not agree({"role": "assistant", "content": "no tool"}, llm, "label-accuracy")


class TestToolContract:
    TOOLS = frozenset({"a", "b"})

    @staticmethod
    def answer(*names: str) -> dict[str, Any]:
        calls = [{"function": {"name": n, "arguments": "{}"}} for n in names]
        return {"role": "assistant", "content": None if calls else "text", "tool_calls": calls}

    def test_a_call_to_a_tool_the_request_did_not_offer_breaks_it(self) -> None:
        assert fits_request(self.answer("a"), {}, self.TOOLS)
        assert not fits_request(self.answer("a", "c"), {}, self.TOOLS)
        assert not fits_request(self.answer("a"), {}, frozenset())

    def test_parallel_tool_calls_false_allows_one_call(self) -> None:
        """An agent that turned parallel calls off runs one call per turn: an SLM answer with
        two does not keep the request, and the LLM answers instead."""
        off = {"parallel_tool_calls": False}
        assert fits_request(self.answer("a"), off, self.TOOLS)
        assert not fits_request(self.answer("a", "b"), off, self.TOOLS)
        assert fits_request(self.answer("a", "b"), {"parallel_tool_calls": True}, self.TOOLS)
        assert fits_request(self.answer("a", "b"), {}, self.TOOLS)

    def test_tool_choice_required_and_named(self) -> None:
        named = {"tool_choice": {"type": "function", "function": {"name": "b"}}}
        assert fits_request(self.answer("b"), named, self.TOOLS)
        assert not fits_request(self.answer("a"), named, self.TOOLS)
        assert not fits_request(self.answer("b", "a"), named, self.TOOLS)
        assert not fits_request(self.answer(), named, self.TOOLS)
        assert not fits_request(self.answer(), {"tool_choice": "required"}, self.TOOLS)
        assert fits_request(self.answer("a"), {"tool_choice": "required"}, self.TOOLS)
        assert fits_request(self.answer(), {"tool_choice": "auto"}, self.TOOLS)

    def test_breaking_only_tool_choice_or_parallel_calls_is_a_hand_back(self) -> None:
        """The exported model reads neither field: an answer right but for them is handed
        back (defer), not bad output, which counted against the SLM's circuit for every
        agent of the task and in its error rate."""
        named = {"tool_choice": {"type": "function", "function": {"name": "b"}}}
        off = {"parallel_tool_calls": False}
        for answer, body in (
            (self.answer("a"), named),
            (self.answer(), named),
            (self.answer("b", "a"), named),
            (self.answer(), {"tool_choice": "required"}),
            (self.answer("a", "b"), off),
        ):
            assert tool_contract_verdict(answer, body, self.TOOLS) == REASON_DEFER, body
        assert tool_contract_verdict(self.answer("b"), {**named, **off}, self.TOOLS) == ""

    def test_an_unoffered_tool_or_bad_arguments_stay_bad_output_whatever_tool_choice(
        self,
    ) -> None:
        body = {"tool_choice": "required", "parallel_tool_calls": False}
        verdict = tool_contract_verdict(self.answer("a", "c"), body, self.TOOLS)
        assert verdict == REASON_BAD_OUTPUT
        tools = [
            {
                "type": "function",
                "function": {"name": "a", "parameters": {"type": "object", "required": ["x"]}},
            }
        ]
        two_bad = self.answer("a", "a")  # two calls, each without its required "x"
        verdict = tool_contract_verdict(two_bad, {**body, "tools": tools}, self.TOOLS)
        assert verdict == REASON_BAD_OUTPUT

    @pytest.mark.parametrize(
        ("body", "ok"),
        [
            ({}, True),
            ({"n": 1, "logprobs": False, "response_format": {"type": "text"}}, True),
            ({"tool_choice": "auto"}, True),
            ({"n": 3}, False),
            ({"logprobs": True}, False),
            ({"response_format": {"type": "json_schema", "json_schema": {}}}, False),
            ({"tool_choice": "none"}, False),
            ({"tool_choice": {"type": "function", "function": {"name": "a"}}}, True),
            # a subset of the tools this turn: the SLM was trained on the whole list
            ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, False),
            # a custom (free-form) tool: the SLM is trained on function tools only
            ({"tools": [{"type": "custom", "custom": {"name": "apply_patch"}}]}, False),
            ({"tool_choice": {"type": "custom", "custom": {"name": "apply_patch"}}}, False),
            # a custom call earlier in the conversation, function tools only now
            (
                {
                    "messages": [
                        {"role": "user", "content": "fix it"},
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "type": "custom",
                                    "custom": {"name": "apply_patch", "input": "x"},
                                }
                            ],
                        },
                        {"role": "tool", "tool_call_id": "c1", "content": "done"},
                    ],
                    "tools": [{"type": "function", "function": {"name": "run_tests"}}],
                },
                False,
            ),
            # legacy function calling: the SLM is served tools and answers with tool_calls
            ({"functions": [{"name": "a"}]}, False),
            ({"function_call": "auto"}, False),
        ],
    )
    def test_what_an_slm_can_serve(self, body: dict[str, Any], ok: bool) -> None:
        assert slm_can_serve(body) is ok


BOOK = [
    {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "price": {"type": "number"},
                    "unit": {"type": "string", "default": "c"},
                },
                "required": ["city", "price"],
            },
        },
    }
]


def _tc(*calls: tuple[str, str]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ],
    }


def _txt(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("metric", "task_type", "slm", "llm"),
    [
        ("tool-call-ast", "tool-call", _tc(("book", '{"city":"Paris","price":1}')),
         _tc(("book", '{"city":"Paris","price":1.0}'))),
        ("tool-call-ast", "tool-call", _tc(("book", '{"city":"paris","price":2}')),
         _tc(("book", '{"city":"Paris","price":2}'))),
        ("tool-call-ast", "tool-call", _tc(("book", '{"city":"Paris","price":2}')),
         _tc(("book", '{"city":"Paris","price":2,"unit":"c"}'))),
        ("tool-call-ast", "tool-call", _txt("No tool fits."), _txt("I cannot help with that.")),
        ("tool-call-ast", "tool-call",
         _tc(("book", '{"city":"A","price":1}'), ("book", '{"city":"B","price":1}')),
         _tc(("book", '{"city":"B","price":1}'), ("book", '{"city":"A","price":1}'))),
        ("exact-match", "tool-call", _tc(("book", '{"city":"Paris","price":1}')),
         _tc(("book", '{"city":"Paris","price":1.0}'))),
        ("exact-match", "classification", _txt("positive"), _txt("Positive")),
        ("exact-match", "tool-call",
         _tc(("book", '{"city":"A","price":1}'), ("book", '{"city":"B","price":1}')),
         _tc(("book", '{"city":"B","price":1}'), ("book", '{"city":"A","price":1}'))),
        ("exact-match", "tool-call", {**_tc(("book", '{"city":"A","price":1}')), "content": "Ok."},
         _tc(("book", '{"city":"A","price":1}'))),
        ("label-accuracy", "classification", _txt("positive"), _txt("Positive")),
        ("label-accuracy", "tool-call", _tc(("book", "{}")), _tc(("book", "{}"), ("book", "{}"))),
        ("label-accuracy", "tool-call", _tc(("other", "{}")), _tc(("book", "{}"))),
        ("label-accuracy", "tool-call", _txt("No tool fits."), _txt("I cannot help with that.")),
        ("label-accuracy", "classification", _txt("positive"), _txt("negative")),
    ],
)  # fmt: skip
def test_live_agreement_is_the_gates_verdict(
    metric: str, task_type: str, slm: dict[str, Any], llm: dict[str, Any]
) -> None:
    """Shadow agreement moves the rollout, so it must measure what the gate measured: by
    their own rules, 1 against 1.0, "paris" against "Paris", an optional argument left at
    its default or two calls in another order disagreed live (a canary the gate passed was
    held back), while exact-match took swapped calls or added text for agreement."""
    from slm_trainer.generative import score_answer

    gate = score_answer(metric, slm, llm, BOOK, task_type) == 1.0
    assert agree(slm, llm, metric, BOOK, task_type) == gate
    if task_type == "classification":  # a routes file that names no task type
        assert agree(slm, llm, metric, BOOK) == gate


@pytest.mark.parametrize("confidence", [5.0, -3.0, 1.0000001])
def test_a_confidence_that_is_no_probability_is_bad_output(confidence: float) -> None:
    """The contract's confidence is a calibrated probability: a model exporting logits
    passed every threshold (5.0), or read as merely unsure (-3.0) and never tripped the
    breaker."""
    answer = {"role": "assistant", "content": "Paris"}
    assert slm_verdict(answer, confidence, 0.5) == REASON_BAD_OUTPUT
    assert slm_verdict(answer, 1.0, 0.5) == "" and slm_verdict(answer, 0.0, 0.0) == ""


def test_an_answer_cut_at_the_models_token_limit_is_bad_output() -> None:
    """A generative model stopped at max_new_tokens answers half a sentence; served as a
    finished "stop" answer (with a threshold of 0, a routes file's default) the agent had no
    way to tell."""
    cut = {"role": "assistant", "content": "The weather in Par", "finish_reason": "length"}
    assert slm_verdict(cut, 0.9, 0.0) == REASON_BAD_OUTPUT
    assert slm_verdict({**cut, "finish_reason": "stop"}, 0.9, 0.0) == ""


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({}, None),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 40}, 40),
        ({"max_tokens": 50, "max_completion_tokens": 20}, 20),
        ({"max_tokens": 20, "max_completion_tokens": 50}, 20),
        ({"max_tokens": None, "max_completion_tokens": 7}, 7),
    ],
)
def test_the_answers_limit_is_the_smaller_of_the_requests_two_fields(
    body: dict[str, Any], limit: int | None
) -> None:
    assert answer_limit(body) == limit


def test_an_answer_cut_at_the_requests_own_limit_is_a_hand_back_not_bad_output() -> None:
    """The agent's max_tokens stopped it, not the SLM failing: counted as bad output, an
    agent with a small limit rolled the SLM's canary back and opened its circuit."""
    cut = {
        "role": "assistant",
        "content": "The weather in Par",
        "finish_reason": "length",
        "usage": {"completion_tokens": 5},
    }
    for confidence in (0.0, 0.9):  # the model serves a cut answer with 0
        assert slm_verdict(cut, confidence, 0.5, limit=5) == REASON_DEFER
    # cut at the model's own max_new_tokens, below the request's limit: the model's doing
    assert slm_verdict(cut, 0.9, 0.0, limit=6) == REASON_BAD_OUTPUT
    assert slm_verdict(cut, 0.9, 0.0) == REASON_BAD_OUTPUT
    # an older model reports no count: its cut is judged as before
    no_count = {k: v for k, v in cut.items() if k != "usage"}
    assert slm_verdict(no_count, 0.9, 0.0, limit=5) == REASON_BAD_OUTPUT
    assert slm_verdict({"defer": True}, 0.0, 0.5, limit=5) == REASON_DEFER
    assert slm_verdict({**cut, "finish_reason": "length"}, 5.0, 0.0, limit=5) == REASON_BAD_OUTPUT


def test_an_slm_answers_tokens_are_its_own_count_else_its_texts_estimate() -> None:
    sunny = {"role": "assistant", "content": "Sunny.", "usage": {"completion_tokens": 3}}
    assert slm_completion_tokens(sunny) == 3
    for bad in (-1, 1e20, "3", True, None):  # not a count: estimated
        assert slm_completion_tokens({**sunny, "usage": {"completion_tokens": bad}}) == 2
    label = {"role": "assistant", "content": "billing", "label": "billing"}
    assert slm_completion_tokens(label) == 2  # 7 bytes, not the message's JSON around them
    # an estimate is served no higher than the agent's limit; a reported count is the count
    assert slm_completion_tokens(label, 1) == 1 and slm_completion_tokens(label, 5) == 2
    assert slm_completion_tokens(sunny, 1) == 3
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "now"}}]}
    assert slm_completion_tokens(call) == estimate_tokens(len("now{}"))
    args = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert slm_completion_tokens({"tool_calls": [args]}) == estimate_tokens(
        len('get_weather{"city":"Paris"}')
    )


def test_an_answer_longer_than_the_requests_limit_is_over_it() -> None:
    """A repository exported before the limit was sent answers in full: held to the limit
    by the gateway's count."""
    long = {"role": "assistant", "content": "Paris is lovely. " * 30}
    assert over_limit(long, 5) and not over_limit(long, 1000) and not over_limit(long, None)
    counted = {**long, "usage": {"completion_tokens": 5}}  # the model's own count decides
    assert not over_limit(counted, 5) and over_limit(counted, 4)


@pytest.mark.parametrize(
    "answer",
    [
        {"role": "assistant", "content": "positive", "label": "positive"},
        {"role": "assistant", "content": "Billing and invoices", "label": "billing"},
        {
            "role": "assistant",
            "content": None,
            "label": "get_weather_forecast",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather_forecast", "arguments": "{}"},
                }
            ],
        },
    ],
)
def test_a_selectors_answer_is_never_over_the_limit_by_the_estimate(
    answer: dict[str, Any],
) -> None:
    """A selector's label or tool choice comes with no count, and ~4 bytes a token made
    "positive" 2 tokens: every classification call with max_tokens 1 went to the LLM. A
    label is what the LLM would name in a token or two; only a reported count holds it."""
    for limit in (1, 2, 3):
        assert not over_limit(answer, limit)
    assert over_limit({**answer, "usage": {"completion_tokens": 2}}, 1)


def test_a_request_with_a_strict_tool_goes_to_the_llm() -> None:
    """Strict function calling promises arguments that follow the schema exactly, which the
    SLM does not: it served {"city": "Paris"} for a strict tool requiring days too."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    strict = {"type": "function", "function": {**tool["function"], "strict": True}}
    assert slm_can_serve({"tools": [tool]})
    assert not slm_can_serve({"tools": [tool, strict]})


@pytest.mark.parametrize(
    ("stop", "served"),
    [
        ("Observation:", "Thought: look it up\n"),
        (["\nFinal", "Observation:"], "Thought: look it up\n"),
        (["never"], "Thought: look it up\nObservation: sunny\nFinal Answer: sunny"),
        (None, "Thought: look it up\nObservation: sunny\nFinal Answer: sunny"),
    ],
)
def test_an_slm_answer_ends_before_the_first_stop_sequence(stop: Any, served: str) -> None:
    """A ReAct agent sets stop ["Observation:"] and acts on all it gets: the SLM's text past
    it was served, and the agent read an observation no tool made."""
    text = "Thought: look it up\nObservation: sunny\nFinal Answer: sunny"
    assert cut_at_stop(text, stop) == served


REACT = "Thought: call the tool\nAction: lookup\nObservation: the tool said"
CUT = "Thought: call the tool\nAction: lookup\n"  # 38 bytes: 10 tokens by the estimate


def test_a_stop_cut_answer_is_finished_and_counts_only_its_text() -> None:
    """What follows the stop sequence is none of the answer: cut, it is finished ("stop")
    even where the limit cut the model, and its usage is the cut text's (no more than the
    model's count), not the model's count of everything it wrote."""
    cut_at_limit = {"content": REACT, "finish_reason": "length", "usage": {"completion_tokens": 16}}
    served = stop_cut(cut_at_limit, ["Observation:"])
    assert served == {"content": CUT, "finish_reason": "stop", "usage": {"completion_tokens": 10}}
    assert cut_at_limit["content"] == REACT  # the model's answer itself is left alone
    few = {"content": REACT, "usage": {"completion_tokens": 4}}  # a dense tokenizer's count
    assert stop_cut(few, "Observation:")["usage"] == {"completion_tokens": 4}
    assert stop_cut({"content": REACT}, "Observation:") == {"content": CUT, "finish_reason": "stop"}
    for unchanged, stop in (
        ({"content": CUT, "usage": {"completion_tokens": 9}}, "Observation:"),  # nothing cut
        ({"content": REACT}, None),
        ({"defer": True, "content": REACT}, "Observation:"),
        ({"content": None, "tool_calls": []}, "Observation:"),
        ("not a message", "Observation:"),
    ):
        assert stop_cut(unchanged, stop) is unchanged


@pytest.mark.parametrize(
    ("answer", "confidence", "body", "verdict"),
    [
        # over the limit whole, within it up to the stop sequence: served
        ({"content": REACT}, 0.9, {"max_tokens": 12, "stop": ["Observation:"]}, ""),
        ({"content": REACT}, 0.9, {"max_tokens": 12}, REASON_DEFER),
        ({"content": REACT}, 0.9, {"max_tokens": 9, "stop": ["Observation:"]}, REASON_DEFER),
        # the model cut at the agent's limit after the stop: a finished answer
        (
            {"content": REACT, "finish_reason": "length", "usage": {"completion_tokens": 16}},
            0.9,
            {"max_tokens": 16, "stop": "Observation:"},
            "",
        ),
        # ... but served with confidence 0, the exported model's mark of the cut: a hand-back
        (
            {"content": REACT, "finish_reason": "length", "usage": {"completion_tokens": 16}},
            0.0,
            {"max_tokens": 16, "stop": "Observation:"},
            REASON_DEFER,
        ),
        # a finished answer the model is unsure of stays low confidence
        ({"content": REACT}, 0.1, {"stop": "Observation:"}, REASON_LOW_CONFIDENCE),
        # cut at the model's own max_new_tokens after the stop: finished, judged on its own
        ({"content": REACT, "finish_reason": "length"}, 0.9, {"stop": "Observation:"}, ""),
        ({"content": REACT, "finish_reason": "length"}, 0.9, {}, REASON_BAD_OUTPUT),
    ],
)
def test_an_slm_answer_is_judged_as_cut_at_its_stop_sequence(
    answer: dict[str, Any], confidence: float, body: dict[str, Any], verdict: str
) -> None:
    served, got = judge_answer(answer, confidence, 0.5, body, frozenset())
    assert got == verdict
    if body.get("stop"):
        assert served["content"] == CUT


def test_judging_an_answer_applies_its_tool_contract() -> None:
    names = frozenset({"get_weather"})
    calls = [{"function": {"name": "get_weather", "arguments": "{}"}}] * 2
    two = {"role": "assistant", "content": None, "tool_calls": calls}
    assert judge_answer(two, 0.9, 0.5, {}, names) == (two, "")
    assert judge_answer(two, 0.9, 0.5, {"parallel_tool_calls": False}, names)[1] == REASON_DEFER
    assert judge_answer(two, 0.9, 0.5, {}, frozenset({"other"}))[1] == REASON_BAD_OUTPUT


def test_identical_answers_with_an_empty_string_argument_agree() -> None:
    """BFCL's possible answer writes "may be omitted" as ``""``, and the built-in checker
    dropped every ``""`` it accepted: an SLM answer identical to the LLM's, passing
    ``"promo_code": ""``, disagreed live, and the canary was held back for it."""
    promo = {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "promo_code": {"type": "string"},
                    "channel": {"enum": ["", "web", "app"]},
                },
                "required": ["city"],
            },
        },
    }
    llm = _tc(("book", '{"city": "Paris", "promo_code": "", "channel": ""}'))
    assert agree(llm, llm, "tool-call-ast", [promo])
    assert agree(_tc(("book", '{"city": "Paris"}')), llm, "tool-call-ast", [promo])
    assert not agree(
        _tc(("book", '{"city": "Paris", "promo_code": "X1"}')), llm, "tool-call-ast", [promo]
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "hourly": {"type": "boolean"},
                "at": {"type": ["string", "null"]},
                "spots": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"lat": {"type": "number"}},
                        "required": ["lat"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def _weather(args: Any, **extra: Any) -> dict[str, Any]:
    call = {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    return {"role": "assistant", "content": None, "tool_calls": [call], **extra}


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        ('{"city": "Paris"}', True),
        ({"city": "Paris", "days": 3, "unit": "f", "hourly": True, "at": None}, True),
        ({"city": "Paris", "days": 3.0}, True),  # JSON Schema: 3.0 is an integer
        ({"city": "Paris", "spots": [{"lat": 1}, {"lat": 2.5}]}, True),
        ({"city": "Paris", "at": "noon"}, True),
        ("{}", False),  # required city missing
        ("", False),  # no arguments at all: city is still missing
        ({"days": 3}, False),
        ({"city": 7}, False),
        ({"city": "Paris", "days": "3"}, False),
        ({"city": "Paris", "days": 2.5}, False),
        ({"city": "Paris", "days": True}, False),  # a boolean is no integer
        ({"city": "Paris", "unit": "kelvin"}, False),
        ({"city": "Paris", "hourly": "yes"}, False),
        ({"city": "Paris", "at": 12}, False),
        ({"city": "Paris", "country": "FR"}, False),  # additionalProperties: false
        ({"city": "Paris", "spots": {"lat": 1}}, False),
        ({"city": "Paris", "spots": [{"lat": "north"}]}, False),
        ({"city": "Paris", "spots": [{}]}, False),
        ({"city": "Paris", "spots": [{"lat": 1, "lon": 2}]}, False),
    ],
)
def test_an_slm_call_the_requests_schema_rejects_is_bad_output(args: Any, ok: bool) -> None:
    """The agent runs the call it is served: arguments its own tool schema rejects (a
    required one missing, a string for an integer, a value outside an enum, a key the tool
    does not take) fail in its tool, after the gateway served them as a good answer."""
    body = {"tools": [WEATHER]}
    assert fits_request(_weather(args), body, frozenset({"get_weather"})) is ok


def test_a_selectors_choice_is_served_with_empty_arguments() -> None:
    """A closed-label selector chooses the tool, not its arguments: it answers with the tool
    and ``{}``, marked with its label, by design; only the required keys are not asked of it.
    Any other check still holds for it, and a generated ``{}`` still lacks the required city."""
    body = {"tools": [WEATHER]}
    names = frozenset({"get_weather"})
    assert fits_request(_weather("{}", label="get_weather"), body, names)
    assert not fits_request(_weather("{}"), body, names)
    assert not fits_request(_weather('{"country": "FR"}', label="get_weather"), body, names)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"anyOf": [{"type": "integer"}]}}},
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/x"}}},
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "^[0-9]+$"}}},
        {"type": "object", "properties": {"x": {"type": "string", "format": "date"}}},
        {"type": "object", "patternProperties": {"^y": {}}, "additionalProperties": False},
        {"type": "object"},
        {},
    ],
)
def test_schema_keywords_the_gateway_does_not_judge_accept(schema: dict[str, Any]) -> None:
    """anyOf, $ref, pattern, format and the like are left to the agent's tool: a check that
    half-understood them would send good SLM answers to the LLM."""
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    call = {"function": {"name": "f", "arguments": '{"x": "abc", "y": 1}'}}
    answer = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert fits_request(answer, {"tools": [tool]}, frozenset({"f"}))
    bare = {"type": "function", "function": {"name": "f"}}  # no parameters at all
    assert fits_request(answer, {"tools": [bare]}, frozenset({"f"}))


def test_an_enum_tells_a_boolean_from_a_number() -> None:
    """Python says True == 1; JSON Schema does not: a true for an enum of [0, 1] is refused."""
    schema = {"type": "object", "properties": {"x": {"enum": [0, 1]}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}

    def fits(args: str) -> bool:
        answer = {"tool_calls": [{"function": {"name": "f", "arguments": args}}]}
        return fits_request(answer, {"tools": [tool]}, frozenset({"f"}))

    assert fits('{"x": 1}') and fits('{"x": 1.0}')
    assert not fits('{"x": true}') and not fits('{"x": 2}')


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ],
)
def test_a_request_with_an_image_audio_or_file_part_goes_to_the_llm(part: dict[str, Any]) -> None:
    """The SLM reads text only: asked about a photo, it answered from the words alone, a
    shadow copy counted that as agreement, and curate trained on it."""
    text = {"type": "text", "text": "What is the weather in the city in this photo?"}
    tools = [WEATHER]
    assert slm_can_serve({"messages": [{"role": "user", "content": [text]}], "tools": tools})
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}
    assert slm_can_serve({"messages": [refusal, {"role": "user", "content": "Paris?"}]})
    assert not slm_can_serve({"messages": [{"role": "user", "content": [text, part]}]})
    earlier = [{"role": "user", "content": [part]}, {"role": "user", "content": "And Paris?"}]
    assert not slm_can_serve({"messages": earlier, "tools": tools})


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"modalities": ["text"]}, True),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, False),
        ({"modalities": ["audio"]}, False),
        ({"audio": {"voice": "alloy", "format": "wav"}}, False),
        ({"web_search_options": {}}, False),
        ({"audio": None, "web_search_options": None}, True),
    ],
)
def test_a_request_for_audio_or_web_search_goes_to_the_llm(body: dict[str, Any], ok: bool) -> None:
    """An SLM writes text and searches nothing: an agent that asked for a spoken answer or a
    web search got plain text from it, without being told."""
    assert slm_can_serve(body) is ok


def test_the_argument_schema_cache_follows_the_schema_not_the_tool_name() -> None:
    """Compiled schemas are cached by their JSON's digest: a tool of the same name whose
    schema changed (another agent, a new version) is judged by its new schema."""
    from slm_gateway import decide

    names = frozenset({"get_weather"})
    loose = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    assert fits_request(_weather('{"country": "FR"}'), {"tools": [WEATHER]}, names) is False
    assert fits_request(_weather('{"country": "FR"}'), {"tools": [loose]}, names) is True
    assert fits_request(_weather('{"country": "FR"}'), {"tools": [WEATHER]}, names) is False
    assert all(len(key) == 16 for key in decide._SCHEMAS_SEEN)
