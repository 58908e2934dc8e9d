"""The closed-label selector: pure helpers, learning, determinism, preemption and the CLI.

The training tests use the real all-MiniLM-L6-v2 (offline, from its PyPI package) on a
small slice of real BFCL traffic plus a synthetic support agent, on 2 CPU threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_contract import CallRecord, TrainerResult
from slm_trainer import finetune, metrics
from slm_trainer.triton_model import chatformat

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SUPPORT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    }
    for name, desc in [
        ("search_orders", "Find a customer's orders by id or date."),
        ("refund_order", "Refund an order that was paid."),
        ("update_address", "Change the delivery address of an order."),
        ("escalate_to_human", "Hand the conversation to a human support agent."),
    ]
]
SUPPORT_PROMPTS = {
    "search_orders": ["where is my order {n}", "show me order {n}", "find my orders from May {n}"],
    "refund_order": ["I want my money back for order {n}", "refund order {n} please"],
    "update_address": ["ship order {n} to 5 Elm Street instead", "change my address for {n}"],
    "escalate_to_human": ["let me talk to a real person about {n}", "I need a human now {n}"],
    None: ["tell me a joke {n}", "what is the capital of France {n}", "thanks, that's all {n}"],
}


def support_records(per_prompt: int = 4) -> list[CallRecord]:
    out = []
    for tool, prompts in SUPPORT_PROMPTS.items():
        for p in prompts:
            for n in range(per_prompt):
                response: dict[str, Any] = (
                    {"role": "assistant", "content": "Happy to help with that directly."}
                    if tool is None
                    else {
                        "role": "assistant",
                        "tool_calls": [
                            {"type": "function", "function": {"name": tool, "arguments": "{}"}}
                        ],
                    }
                )
                out.append(
                    CallRecord(
                        task="support",
                        backend="llm",
                        messages=[{"role": "user", "content": p.format(n=100 + 7 * n)}],
                        tools=SUPPORT_TOOLS,
                        response=response,
                        request_id=f"support-{tool}-{n}",
                    )
                )
    return out


def bfcl_slice(per_set: int = 12, irrelevant: int = 70) -> list[CallRecord]:
    pytest.importorskip("bfcl_eval")
    import bfcl_data

    wanted = {"164", "145", "161", "191", "178", "132", "141"}
    seen: dict[str, int] = {}
    out = []
    for r in bfcl_data.records(["live_multiple"]):
        fs = r.request_id.split("-")[1]
        if fs in wanted and seen.get(fs, 0) < per_set:
            seen[fs] = seen.get(fs, 0) + 1
            out.append(r)
    out += list(bfcl_data.records(["live_irrelevance"]))[:irrelevant]
    return out


def write_split(records: list[CallRecord], folder: Path, eval_every: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w") as tr, (folder / "eval.jsonl").open("w") as ev:
        for r in records:
            h = int(hashlib.sha256(r.to_json().encode()).hexdigest(), 16)
            (ev if h % eval_every == 0 else tr).write(r.to_json() + "\n")
    return folder


def fine_args(data: Path, out: Path, **kw: Any) -> finetune.Args:
    base = {
        "candidate": "minilm",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "data": data,
        "output": out / "artifact",
        "checkpoint_dir": out / "ckpt",
        "metric": "label-accuracy",
        "learning_rate": 5e-4,
        "num_threads": 2,
        "latency_samples": 4,
        "bundle_base": False,
    }
    base.update(kw)
    return finetune.Args(**base)


# ------------------------------------------------------------------ pure helpers


def test_text_views_of_tools_and_prompts() -> None:
    from slm_trainer.finetune import split_identifier

    assert split_identifier("ChaDri.change_drink") == "Cha Dri change drink"
    assert split_identifier("Flights_4_SearchOnewayFlight") == "Flights 4 Search Oneway Flight"
    assert split_identifier("getHTTPResponse") == "get HTTP Response"
    sel = pytest.importorskip("slm_trainer.selector")
    text = sel.option_text(SUPPORT_TOOLS[1])
    assert text == "refund order: Refund an order that was paid. Parameters: order id"
    msgs = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    assert sel.query_text(msgs) == "second\nfirst"


def test_examples_index_none_first_and_skip_unknown_labels() -> None:
    sel = pytest.importorskip("slm_trainer.selector")
    recs = support_records(1)
    by_tool = {metrics.tool_label(r.response): r for r in recs}
    ex = sel.examples_from_records([by_tool["refund_order"], by_tool[None]], "tool-call")
    assert ex[0].labels[ex[0].target - 1] == "refund_order"  # type: ignore[operator]
    assert ex[1].target == 0 and ex[1].ref_label is None
    stray = CallRecord(
        task="t",
        backend="llm",
        messages=[{"role": "user", "content": "x"}],
        tools=SUPPORT_TOOLS,
        response={"tool_calls": [{"function": {"name": "not_offered", "arguments": "{}"}}]},
    )
    assert sel.examples_from_records([stray], "tool-call")[0].target is None
    cls = sel.example_for(
        [{"role": "user", "content": "card declined"}],
        [],
        "classification",
        ["billing", "shipping"],
        response={"content": "Billing"},
    )
    assert cls.labels == ("billing", "shipping") and cls.target == 1


def test_the_eval_report_counts_a_confident_deferral_of_a_call_needing_no_tool_as_right() -> None:
    """The confidence a selector serves is that of its choice, a tool or *defer*. One that is
    90 % sure and right 90 % of the time, deferring half of the calls correctly, is calibrated:
    its report must say so, not count each right deferral as a confident mistake."""
    sel = pytest.importorskip("slm_trainer.selector")
    by_tool = {metrics.tool_label(r.response): r for r in support_records(1)}
    refund, none = (
        sel.examples_from_records([by_tool[t]], "tool-call")[0] for t in ("refund_order", None)
    )
    examples = [refund] * 10 + [none] * 10
    # 9 of 10 right on each side, all at confidence 0.9.
    preds = [("refund_order", 0.9)] * 9 + [("search_orders", 0.9)]
    preds += [(None, 0.9)] * 9 + [("escalate_to_human", 0.9)]
    report = sel.evaluate_predictions(examples, preds, threshold=0.5, target_precision=0.97)
    assert report["decision_accuracy"] == pytest.approx(0.9)
    assert report["ece"] == pytest.approx(0.0, abs=1e-9)
    # Every choice right at 0.6: under-confident by 0.4, deferrals included.
    report = sel.evaluate_predictions(
        examples, [("refund_order", 0.6)] * 10 + [(None, 0.6)] * 10, 0.5, 0.97
    )
    assert report["ece"] == pytest.approx(0.4)


def with_odd_schemas(records: list[CallRecord]) -> list[CallRecord]:
    """The same calls, each tool's schema bent out of JSON Schema's shape in another way
    (``required`` a number, ``parameters`` a list or a string...), as agents have logged."""
    odd: list[Any] = [
        {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": 5},
        ["order_id"],
        "order id",
        {"type": "object", "properties": ["order_id"], "required": [{"name": "order_id"}]},
    ]
    tools = [
        {**t, "function": {**t["function"], "parameters": schema}}
        for t, schema in zip(SUPPORT_TOOLS, odd, strict=True)
    ]
    return [dataclasses.replace(r, tools=tools) for r in records]


def test_a_tool_with_an_odd_schema_is_still_an_option() -> None:
    """``required: 5`` crashed the finetune stage in ``option_text`` (TypeError): curate keeps
    such a record, since it checks only that tools are objects."""
    sel = pytest.importorskip("slm_trainer.selector")
    recs = with_odd_schemas(support_records(1))
    examples = sel.examples_from_records(recs, "tool-call")
    assert len(examples) == len(recs)
    assert examples[0].labels == tuple(t["function"]["name"] for t in SUPPORT_TOOLS)
    assert examples[0].texts[1] == "refund order: Refund an order that was paid."
    by_tool = {metrics.tool_label(r.response): ex for r, ex in zip(recs, examples, strict=True)}
    assert by_tool["refund_order"].labels[by_tool["refund_order"].target - 1] == "refund_order"


@pytest.mark.slow
def test_the_finetune_stage_trains_and_scores_calls_with_odd_tool_schemas(
    tmp_path: Path,
) -> None:
    """The whole stage, gated on tool-call-ast so the served answers are scored against those
    tools too: it crashed before writing a result."""
    data = write_split(with_odd_schemas(support_records(2)), tmp_path / "data")
    args = fine_args(data, tmp_path, metric="tool-call-ast", epochs=1, batch_size=8, max_steps=2)
    result = finetune.run(args, lambda event: None)
    assert result.ok, result.message
    assert result.eval_examples and result.score is not None


def test_calibration_split_is_stratified_and_deterministic() -> None:
    sel = pytest.importorskip("slm_trainer.selector")
    ex = sel.examples_from_records(support_records(4), "tool-call")
    fit, calib = sel.calibration_split(ex, 0.25, seed=0)
    assert sorted(fit + calib) == list(range(len(ex)))
    assert (fit, calib) == sel.calibration_split(ex, 0.25, seed=0)
    assert calib != sel.calibration_split(ex, 0.25, seed=1)[1]
    deferred = [i for i in range(len(ex)) if ex[i].ref_label is None]
    in_calib = [i for i in calib if ex[i].ref_label is None]
    assert len(in_calib) == round(len(deferred) * 0.25)  # the training mix is kept
    assert len(calib) - len(in_calib) == round((len(ex) - len(deferred)) * 0.25)


def test_in_batch_negatives_add_the_batch_s_other_tools_once_and_never_a_call_s_own() -> None:
    """Each call keeps its own options first (its target index is unchanged); the other
    calls' tools follow, each once, except one the call offers itself under the same name or
    with the same text: that is its own tool, not a negative."""
    sel = pytest.importorskip("slm_trainer.selector")
    import torch

    def ex(*tools: tuple[str, str]) -> Any:
        names, texts = zip(*tools, strict=True)
        return sel.Example("q", names, texts, names[0], 1, "k")

    batch = [
        ex(("a", "A"), ("b", "B")),
        ex(("b", "B"), ("c", "C")),  # b: a's own tool, not a negative for it
        ex(("d", "A"), ("e", "E")),  # d: another name with a's text: the same tool for a
        ex(("c", "C")),
    ]
    vectors = {t: torch.full((2,), float(ord(t))) for t in "ABCE"}
    options = [torch.stack([vectors[t] for t in e.texts]) for e in batch]
    wide = sel.in_batch_options(batch, options)

    def texts(rows: torch.Tensor) -> list[str]:
        return [chr(int(r[0])) for r in rows]

    # a: c once though two calls offer it, d left out (a's own text under another name)
    assert texts(wide[0]) == ["A", "B", "C", "E"]
    assert texts(wide[1]) == ["B", "C", "A", "E"]  # d's text was added with a
    assert texts(wide[2]) == ["A", "E", "B", "C"]  # a left out: d's own text
    assert texts(wide[3]) == ["C", "A", "B", "E"]
    assert all(torch.equal(w[: len(o)], o) for w, o in zip(wide, options, strict=True))
    alone = sel.in_batch_options(batch[:1], options[:1])
    assert torch.equal(alone[0], options[0])


def test_batch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    sel = pytest.importorskip("slm_trainer.selector")
    lengths = [(i * 37) % 23 for i in range(101)]
    a = sel.batch_order(lengths, 8, seed=3, epoch=1, group=4)
    assert a == sel.batch_order(lengths, 8, seed=3, epoch=1, group=4)
    assert a != sel.batch_order(lengths, 8, seed=3, epoch=2, group=4)
    assert sorted(i for b in a for i in b) == list(range(101))
    assert len(a) == 13 and all(len(b) <= 8 for b in a)
    assert sel.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert sel.lr_factor(100, 100, 10) == 0.0


def test_dispatch_sends_encoders_and_classification_to_the_selector(tmp_path: Path) -> None:
    llama = tmp_path / "tiny-llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def args(model: str, task: str = "tool-call") -> finetune.Args:
        return finetune.Args(
            candidate="c", model=model, data=tmp_path, output=tmp_path, task_type=task
        )  # type: ignore[arg-type]

    assert finetune.uses_selector(args("sentence-transformers/all-MiniLM-L6-v2"))
    assert finetune.uses_selector(args(finetune.minilm_path() or "all-MiniLM-L6-v2"))
    assert not finetune.uses_selector(args(str(llama)))
    assert not finetune.uses_selector(args("HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert finetune.uses_selector(args(str(llama), "classification"))


def cache_model(cache: Path, repo_id: str, files: dict[str, Any]) -> None:
    """Put ``files`` (name -> JSON) of hub model ``repo_id`` in a Hugging Face cache laid out
    as huggingface_hub writes it: a ref to a snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_text(json.dumps(content))


def test_dispatch_reads_a_hub_models_config_from_the_cache_before_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoders whose names lack "bert", "minilm" and the like went to the causal-LM path,
    trained as a BertLMHeadModel and crashed at evaluation; offline, the cache has their
    config. The name decides only for a model with no config to read."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    bert = {"model_type": "bert", "architectures": ["BertModel"]}
    cache_model(cache, "thenlper/gte-small", {"config.json": bert})
    # a sentence-transformers model is an encoder whatever its config says
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    ]
    cache_model(cache, "Snowflake/snowflake-arctic-embed-s", {"modules.json": modules})
    # an encoder of a model_type of its own (gte-base-en-v1.5's "new"), known by its class
    new = {"model_type": "new", "architectures": ["NewModel"]}
    cache_model(cache, "Alibaba-NLP/gte-base-en-v1.5", {"config.json": new})
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    cache_model(cache, "acme/tinybert-chat", {"config.json": llama})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def selector(model: str) -> bool:
        return finetune.uses_selector(
            finetune.Args(candidate="c", model=model, data=tmp_path, output=tmp_path)
        )

    assert selector("thenlper/gte-small")
    assert selector("Snowflake/snowflake-arctic-embed-s")
    assert selector("Alibaba-NLP/gte-base-en-v1.5")
    assert not selector("acme/tinybert-chat")  # "bert" in its name, a Llama in its config
    assert selector("BAAI/bge-small-en-v1.5")  # not in the cache: its name decides
    assert not selector("HuggingFaceTB/SmolLM2-135M-Instruct")


class HubCalls:
    """Stands in for every way the dispatch could reach the hub, recording each call: a
    decision with the hub unreachable took 46 to 70 s when files were downloaded with
    retries."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, infos: dict[str, Any]) -> None:
        import huggingface_hub
        from huggingface_hub import constants, file_download

        self.calls: list[tuple[str, Any]] = []
        self.infos = infos
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", self.model_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.download)
        monkeypatch.setattr(file_download, "hf_hub_download", self.download)

    def model_info(self, repo_id: str, **kwargs: Any) -> Any:
        self.calls.append(("model_info", repo_id))
        assert 0 < kwargs.get("timeout", 0) <= 10, "the hub is asked with a short timeout"
        info = self.infos.get(repo_id)
        if info is None:
            raise OSError("the hub is unreachable")
        return info

    def download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        self.calls.append(("hf_hub_download", repo_id))
        raise OSError("the hub is unreachable")


def test_a_cached_config_decides_without_asking_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HF_HUB_OFFLINE unset and the hub unreachable, a causal LM whose config.json is
    in the cache waited 46 s for downloads of its sentence-transformers files, retried 5
    times each, before the cached config decided. An encoder's cached config decides with
    no request; a causal LM's asks the hub once, briefly, whether the model is a
    sentence-transformers one after all (next test), and the config decides without it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    cache_model(cache, "acme/tiny-llm", {"config.json": llama})
    cache_model(cache, "acme/tinybert-chat", {"config.json": llama})
    cache_model(cache, "thenlper/gte-small", {"config.json": {"model_type": "bert"}})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hub = HubCalls(monkeypatch, {})

    assert finetune.is_encoder_model("thenlper/gte-small")
    assert hub.calls == []
    assert not finetune.is_encoder_model("acme/tiny-llm")
    assert not finetune.is_encoder_model("acme/tinybert-chat")
    assert hub.calls == [("model_info", "acme/tiny-llm"), ("model_info", "acme/tinybert-chat")]


def test_a_sentence_transformers_model_stays_an_encoder_once_its_config_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading a selector's base caches its config.json but not modules.json: a
    sentence-transformers model whose config names a generating head was a selector on its
    first run and a causal LM on the next (a Job's retry, a retraining)."""
    from types import SimpleNamespace

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    qwen = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    info = SimpleNamespace(library_name="sentence-transformers", tags=[], config=qwen)
    HubCalls(monkeypatch, {"acme/st-embedder": info})
    assert finetune.is_encoder_model("acme/st-embedder")  # nothing cached: the hub says
    cache_model(cache, "acme/st-embedder", {"config.json": qwen})
    assert finetune.is_encoder_model("acme/st-embedder")  # its config cached since


def test_an_uncached_model_is_judged_by_one_short_hub_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the cache, a model is described by the hub in one request, no retries; with
    no answer its name decides."""
    from types import SimpleNamespace

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub = HubCalls(
        monkeypatch,
        {
            "Snowflake/snowflake-arctic-embed-s": SimpleNamespace(
                library_name="sentence-transformers", tags=["bert"], config={}
            ),
            "acme/embedder": SimpleNamespace(
                library_name=None, tags=["sentence-transformers"], config=None
            ),
            "acme/tinybert-chat": SimpleNamespace(
                library_name="transformers",
                tags=["text-generation"],
                config={"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
            ),
            "Alibaba-NLP/gte-base-en-v1.5": SimpleNamespace(
                library_name="transformers",
                tags=[],
                config={"model_type": "new", "architectures": ["NewModel"]},
            ),
        },
    )
    expected = {
        "Snowflake/snowflake-arctic-embed-s": True,
        "acme/embedder": True,
        "acme/tinybert-chat": False,  # "bert" in its name, a Llama by the hub's config
        "Alibaba-NLP/gte-base-en-v1.5": True,
        "BAAI/bge-small-en-v1.5": True,  # the hub does not answer: its name decides
        "HuggingFaceTB/SmolLM2-135M-Instruct": False,
    }
    for model, encoder in expected.items():
        hub.calls.clear()
        assert finetune.is_encoder_model(model) is encoder, model
        assert hub.calls == [("model_info", model)], model
    # offline, the hub is not asked at all
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.calls.clear()
    assert not finetune.is_encoder_model("acme/embedder")
    assert hub.calls == []


def test_selector_refuses_qlora_without_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = fine_args(tmp_path / "data", tmp_path, method="qlora")
    result = finetune.run(args, lambda event: None)
    assert not result.ok and result.candidate == "minilm"
    assert "qlora needs a GPU" in result.message and "method lora" in result.message
    assert not args.output.exists()


def test_an_encoder_saved_in_half_precision_trains_in_fp32(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from slm_trainer import selector

    src, enc = finetune.minilm_path(), tmp_path / "fp16-encoder"
    assert src
    AutoModel.from_pretrained(src).half().save_pretrained(enc)
    AutoTokenizer.from_pretrained(src).save_pretrained(enc)
    net, tok = selector.build_net(selector.SelectorConfig(base_model=str(enc)), torch.device("cpu"))
    batch = tok(["refund order 7", "where is my order"], padding=True, return_tensors="pt")
    q = net.embed({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    logits = net.logits(q, [q[1:].detach(), q[:1].detach()])
    assert logits.dtype == torch.float32 and torch.isfinite(logits[:, :2]).all()


def tiny_bin_encoder(folder: Path) -> Path:
    """A MiniLM-shaped BERT encoder (MiniLM's tokenizer, one small layer) whose weights are
    only a ``pytorch_model.bin``, as older hub models and many local copies are saved."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    src = finetune.minilm_path()
    assert src
    tokenizer = AutoTokenizer.from_pretrained(src)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(BertModel(config).state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_base_with_only_pytorch_model_bin_is_bundled_with_its_weights(
    small_data: Path, tmp_path: Path
) -> None:
    """The bundled base left every ``*.bin`` out: a base whose weights are a
    ``pytorch_model.bin`` trained and passed the gate, and its artifact failed to load in
    Triton ("no file named model.safetensors, or pytorch_model.bin")."""
    from slm_trainer import selector as sel

    encoder = tiny_bin_encoder(tmp_path / "my-encoder")
    assert finetune.missing_base_model(str(encoder)) is None  # a valid base model
    args = fine_args(small_data, tmp_path, model=str(encoder), max_steps=1, bundle_base=True)
    result = finetune.run(args, lambda e: None)
    assert result.ok, result.message
    assert (args.output / "base" / "pytorch_model.bin").is_file()
    loaded = sel.load_selector(args.output, device="cpu", num_threads=2)
    assert loaded.threshold == result.threshold
    _, confidence = loaded.predict([{"role": "user", "content": "refund order 7"}], SUPPORT_TOOLS)
    assert 0.0 <= confidence <= 1.0


# ------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = support_records(3) + bfcl_slice()
    return write_split(records, tmp_path_factory.mktemp("mixed"))


@pytest.mark.slow
def test_selector_learns_and_beats_zero_shot(mixed_data: Path, tmp_path: Path) -> None:
    """On held-out calls the tuned selector's decision (a tool, or hand back) beats the
    untuned encoder even when the untuned one gets its best similarity threshold."""
    sel = pytest.importorskip("slm_trainer.selector")
    events: list[dict[str, Any]] = []
    result = finetune.run(fine_args(mixed_data, tmp_path, epochs=3), events.append)
    assert result.ok, result.message
    assert 0.0 <= result.threshold <= 1.0  # type: ignore[operator]
    progress = [e for e in events if e.get("event") == "progress" and "step" in e]
    assert progress and {"step", "loss", "percent", "eta_seconds"} <= set(progress[-1])
    assert progress[-1]["percent"] == 100.0

    records = sel.read_records(mixed_data / "eval.jsonl")
    examples = sel.examples_from_records(records, "tool-call")
    preds = [json.loads(line) for line in (tmp_path / "artifact" / sel.PREDICTIONS).open()]
    tuned = sum(p["label"] == ex.ref_label for p, ex in zip(preds, examples, strict=True))

    zero = sel.zero_shot_predictions(examples)
    refs = [ex.ref_label for ex in examples]
    best_zero = max(
        sum(
            (lab if conf >= t else None) == ref for (lab, conf), ref in zip(zero, refs, strict=True)
        )
        for t in sorted({c for _, c in zero} | {2.0})
    )
    assert tuned > best_zero, (tuned, best_zero, len(examples))
    assert tuned / len(examples) >= 0.8

    # Confidences and the threshold are exactly what Triton's FP32 output carries, so the
    # gateway's "confidence >= threshold" accepts exactly the calls the curve counted.
    import numpy as np

    th = float(result.threshold)  # type: ignore[arg-type]
    assert float(np.float32(th)) == th  # one of the calibration calls' served confidences
    for p in preds:
        served = float(np.float32(p["confidence"]))
        assert (
            served == p["confidence"] and (p["label"] is not None and served >= th) is p["accepted"]
        )

    # The artifact loads on its own and answers like the run that wrote it.
    loaded = sel.load_selector(tmp_path / "artifact", num_threads=2)
    for r, p in list(zip(records, preds, strict=True))[:8]:
        label, conf = loaded.predict(r.messages, r.tools)
        assert label == p["label"] and conf == pytest.approx(p["confidence"], abs=1e-5)
    assert loaded.predict([{"role": "user", "content": "hi"}], []) == (None, 1.0)

    # The default defer score is a learned constant: whether a call is handed back depends
    # on how well its best tool fits, not on the question alone.
    assert loaded.config.defer_head == "constant"
    asks = ["What is the weather in Paris?", "Book a table for two at eight."]
    views = [
        sel.example_for([{"role": "user", "content": a}], records[0].tools, "tool-call")
        for a in asks
    ]
    none_a, none_b = (row[0] for row in loaded.raw_logits(views))
    assert none_a == pytest.approx(none_b) and none_a != 0.0


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_split(support_records(3), tmp_path_factory.mktemp("small"))


def _run(data: Path, out: Path, hook: Any = None) -> tuple[TrainerResult, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    # Two epochs so that max_steps (8) is reached whatever the calibration split keeps back.
    args = fine_args(data, out, epochs=2, batch_size=8, max_steps=8, checkpoint_every=3)
    return finetune.run(args, events.append, step_hook=hook), events


@pytest.mark.slow
def test_sigterm_saves_and_a_rerun_resumes_to_the_same_result(
    small_data: Path, tmp_path: Path
) -> None:
    straight, _ = _run(small_data, tmp_path / "straight")
    assert straight.ok, straight.message

    def preempt(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends on preemption

    stopped, events = _run(small_data, tmp_path / "resumed", preempt)
    assert not stopped.ok and stopped.message.startswith("preempted by SIGTERM at step 5/")
    assert not (tmp_path / "resumed" / "artifact" / "selector.json").exists()
    state = (tmp_path / "resumed" / "ckpt" / "selector-state.pt").stat()
    assert state.st_size > 0

    resumed, events = _run(small_data, tmp_path / "resumed")
    assert resumed.ok, resumed.message
    assert any(e.get("phase") == "resume" and e.get("step") == 5 for e in events)
    assert "resumed at step 5" in resumed.message
    for field in ("score", "threshold", "parameters", "trainable_parameters"):
        assert getattr(resumed, field) == getattr(straight, field), field
    a = (tmp_path / "straight" / "artifact" / "predictions.jsonl").read_text()
    b = (tmp_path / "resumed" / "artifact" / "predictions.jsonl").read_text()
    assert a == b
    ma = json.loads((tmp_path / "straight" / "artifact" / "selector.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "artifact" / "selector.json").read_text())
    assert ma["temperature"] == mb["temperature"] and ma["final_loss"] == mb["final_loss"]


def test_a_resumed_run_reports_its_percent_before_its_next_step_and_100_at_the_end(
    small_data: Path, tmp_path: Path
) -> None:
    """A resumed pod said no percent until its next logged step, and one resumed at its
    last step (killed while calibrating, evaluating or saving) never said one: the AgentTask
    showed no progress for that candidate."""

    def percents(events: list[dict[str, Any]]) -> list[tuple[int, float]]:
        return [(e["step"], e["percent"]) for e in events if e.get("percent") is not None]

    def run(hook: Any = None) -> tuple[TrainerResult, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        args = fine_args(small_data, tmp_path, epochs=2, batch_size=8, max_steps=4)
        return finetune.run(args, events.append, step_hook=hook), events

    def preempt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped, _ = run(preempt)
    assert not stopped.ok
    resumed, events = run()
    assert resumed.ok, resumed.message
    assert percents(events)[0] == (2, 50.0)  # where it stands, before step 3
    # the checkpoint of the last step is still there: a rerun (the pod was killed after
    # training) goes straight to calibration, and says it is done training
    again, events = run()
    assert again.ok and "resumed at step 4" in again.message, again.message
    assert percents(events) == [(4, 100.0)]


def test_a_sigterm_result_gives_the_advice_the_operator_drops_past_a_jobs_deadline(
    small_data: Path, tmp_path: Path
) -> None:
    """A fine-tune Job past activeDeadlineSeconds gets SIGTERM too, and nothing reruns it:
    the operator cuts the trainer's rerun advice from its failure, but only in the generative
    path's words, so a selector's Job still said "preempted; resumable" in its condition."""
    from slm_operator.observe import failure_message

    def preempt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped, _ = _run(small_data, tmp_path / "stopped", preempt)
    assert not stopped.ok
    deadline = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
    said = failure_message(
        deadline, {"exitCode": 143, "reason": "Error", "message": stopped.to_json()}
    )
    assert said == "DeadlineExceeded: last pod Error (exit 143): preempted by SIGTERM at step 2/8"
    # A preempted pod's own result keeps it: its Job starts another pod, which resumes.
    from slm_trainer.generative import RERUN_TO_RESUME

    assert stopped.message == f"preempted by SIGTERM at step 2/8; {RERUN_TO_RESUME}"


@pytest.mark.parametrize(
    ("old", "kept"),
    [
        ("preempted; resumable (preempted at step 130/400; resumable)", "at step 130/400)"),
        ("preempted; resumable (preempted after fold 2/4; resumable)", "after fold 2/4)"),
    ],
)
def test_a_selector_image_of_before_drops_its_resume_advice_past_a_jobs_deadline_too(
    old: str, kept: str
) -> None:
    """The operator also runs trainer images older than the shared words (a pinned
    training.image), whose selector said "resumable" twice."""
    from slm_operator.observe import failure_message

    result = TrainerResult(stage="finetune", ok=False, candidate="c", message=old).to_json()
    deadline = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
    said = failure_message(deadline, {"exitCode": 143, "reason": "Error", "message": result})
    assert "resum" not in said and said.endswith(kept)
    preempted = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
    assert failure_message(preempted, {"exitCode": 143, "message": result}).endswith(old)


def test_an_unreadable_checkpoint_or_fold_cache_is_set_aside_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold's logits cache torn by a hard stop crashed every retried pod on torch.load; a
    torn training checkpoint was silently left in place."""
    from types import SimpleNamespace

    from slm_trainer import selector

    events: list[dict[str, Any]] = []
    (tmp_path / selector.CHECKPOINT).write_bytes(b"PK\x03\x04 torn")
    assert selector._load_checkpoint(tmp_path, "fp") is None
    assert not (tmp_path / selector.CHECKPOINT).exists()
    assert len(list(tmp_path.glob(selector.CHECKPOINT + ".corrupt-*"))) == 1

    ex = selector.examples_from_records(support_records(1), "tool-call")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "fold0-logits.pt").write_bytes(b"PK\x03\x04 torn")
    trained: list[str] = []

    def train_selector(config: Any, examples: Any, directory: Any, *a: Any, **k: Any) -> Any:
        trained.append(Path(directory).name)
        rows = SimpleNamespace(raw_logits=lambda part: [[0.0, 0.0] for _ in part], config=None)
        return SimpleNamespace(selector=rows, train_seconds=0.0)

    monkeypatch.setattr(selector, "train_selector", train_selector)
    monkeypatch.setattr(selector, "calibrate", lambda *a, **k: None)
    config = selector.SelectorConfig(base_model="none", calibration_folds=2)
    selector.train_crossfit(config, ex, ckpt, "digest", emit=events.append)
    assert trained == ["fold0", "fold1", "final"]  # the torn fold is trained again
    assert torch_load(ckpt / "fold0-logits.pt")["rows"]  # and its cache rewritten
    assert len(list(ckpt.glob("fold0-logits.pt.corrupt-*"))) == 1
    warnings = [e["message"] for e in events if e.get("event") == "warning"]
    assert len(warnings) == 1 and "unreadable checkpoint" in warnings[0]


def torch_load(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=True)


def test_crossfit_folds_are_stratified_balanced_and_deterministic() -> None:
    from slm_trainer import selector

    ex = selector.examples_from_records(support_records(3), "tool-call")
    folds = selector.crossfit_folds(ex, 3, seed=0)
    assert folds == selector.crossfit_folds(ex, 3, seed=0)
    assert folds != selector.crossfit_folds(ex, 3, seed=1)
    for deferred in (True, False):
        sizes = [
            sum(
                1
                for e, f in zip(ex, folds, strict=True)
                if f == k and (e.ref_label is None) == deferred
            )
            for k in range(3)
        ]
        assert max(sizes) - min(sizes) <= 1, sizes


def with_order_ids(records: list[CallRecord]) -> list[CallRecord]:
    """The support calls with the arguments a real agent's calls carry."""
    out = []
    for r in records:
        response = json.loads(json.dumps(r.response))
        for call in response.get("tool_calls") or []:
            order = r.messages[0]["content"].split()[-1]
            call["function"]["arguments"] = json.dumps({"order_id": order})
        out.append(dataclasses.replace(r, response=response))
    return out


@pytest.mark.slow
def test_a_selector_gated_on_tool_call_ast_is_scored_on_the_call_it_serves(
    tmp_path: Path,
) -> None:
    """The operator's gate reads the finetune stage's score. A selector serves the tool it
    picks with "{}" arguments; scored on the tool name it reported 1.0 under tool-call-ast,
    and was promoted to serve calls without their order id."""
    data = write_split(with_order_ids(support_records(3)), tmp_path / "data")
    args = fine_args(data, tmp_path, metric="tool-call-ast", epochs=2, batch_size=8, max_steps=8)
    result = finetune.run(args, lambda event: None)
    assert result.ok, result.message
    assert result.score == 0.0  # every call it answers lacks its order_id
    assert "precision of the answers it serves" in result.message
    assert "need arguments" in result.message and "label-accuracy" in result.message
    report = json.loads((args.output / "eval_report.json").read_text())
    assert report["at_threshold"]["precision"] == 1.0  # the tools it picks are right
    assert report["at_threshold_served"]["correct"] == 0


def test_served_point_judges_the_served_call_by_the_metric() -> None:
    from slm_trainer import selector

    recs = with_order_ids(support_records(1))
    calls = [r for r in recs if r.response.get("tool_calls")][:2]
    calls[1] = support_records(1)[0]  # the same tool, called without arguments
    preds = [(metrics.tool_label(r.response), 0.9) for r in calls]
    for metric in ("tool-call-ast", "exact-match"):
        point = selector.served_point(calls, preds, 0.5, "tool-call", metric)
        assert point["accepted"] == 2 and point["correct"] == 1 and point["precision"] == 0.5
    point = selector.served_point(calls, preds, 0.5, "tool-call", "label-accuracy")
    assert point["correct"] == 2


def test_the_option_cache_is_bounded_and_changes_no_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tool texts that vary per request (an id in a description) grew the cache of a
    long-running Triton instance without bound."""
    import torch

    from slm_trainer import selector

    config = selector.SelectorConfig(base_model=finetune.minilm_path() or "")
    net, tok = selector.build_net(config, torch.device("cpu"))
    net.eval()
    monkeypatch.setattr(selector, "OPTION_CACHE_SIZE", 6)
    bounded = selector.Selector(net, tok, config)
    monkeypatch.setattr(selector, "OPTION_CACHE_SIZE", 10_000)
    unbounded = selector.Selector(net, tok, config)
    ask = [{"role": "user", "content": "where is my order 42"}]
    for i in range(12):
        tools = [
            *SUPPORT_TOOLS[:2],
            {"type": "function", "function": {"name": "lookup", "description": f"Request {i}"}},
        ]
        assert bounded.predict(ask, tools) == unbounded.predict(ask, tools)
        assert len(bounded._cache) <= 6
    assert len(unbounded._cache) == 14
    # the tools every request sends stayed cached (recently used), the per-request ones went
    assert {selector.option_text(t) for t in SUPPORT_TOOLS[:2]} <= set(bounded._cache)


@pytest.mark.slow
def test_training_is_the_same_whatever_the_option_cache_bound(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training keeps every training option's embedding (computed once, in eval mode): one
    evicted and recomputed in train mode would differ, and training would depend on it."""
    from slm_trainer import selector

    straight, _ = _run(small_data, tmp_path / "straight")
    monkeypatch.setattr(selector, "OPTION_CACHE_SIZE", 1)
    bounded, _ = _run(small_data, tmp_path / "bounded")
    assert straight.ok and bounded.ok, bounded.message
    a = (tmp_path / "straight" / "artifact" / "predictions.jsonl").read_text()
    b = (tmp_path / "bounded" / "artifact" / "predictions.jsonl").read_text()
    assert a == b
    ma = json.loads((tmp_path / "straight" / "artifact" / "selector.json").read_text())
    mb = json.loads((tmp_path / "bounded" / "artifact" / "selector.json").read_text())
    assert ma["final_loss"] == mb["final_loss"] and ma["temperature"] == mb["temperature"]


@pytest.mark.slow
def test_crossfit_calibrates_on_every_training_call_and_resumes_fold_by_fold(
    small_data: Path, tmp_path: Path
) -> None:
    """--calibration-folds 2: two fold models score the calls they did not see, the final
    model trains on all; SIGTERM in the second fold, and the rerun redoes only that fold."""

    def run(out: Path, hook: Any = None) -> tuple[TrainerResult, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        args = fine_args(
            small_data,
            out,
            epochs=2,
            batch_size=8,
            max_steps=4,
            checkpoint_every=2,
            calibration_folds=2,
        )
        return finetune.run(args, events.append, step_hook=hook), events

    straight, _ = run(tmp_path / "straight")
    assert straight.ok, straight.message
    calls = [0]

    def preempt(step: int) -> None:
        calls[0] += 1
        if calls[0] == 6:  # fold 0 took 4 steps; this is step 2 of fold 1
            os.kill(os.getpid(), signal.SIGTERM)

    stopped, _ = run(tmp_path / "resumed", preempt)
    assert not stopped.ok and stopped.message.startswith("preempted by SIGTERM at step 2/4")
    ckpt = tmp_path / "resumed" / "ckpt"
    assert (ckpt / "fold0-logits.pt").is_file() and not (ckpt / "fold1-logits.pt").exists()

    calls[0] = 0
    resumed, events = run(tmp_path / "resumed", lambda step: calls.__setitem__(0, calls[0] + 1))
    assert resumed.ok, resumed.message
    assert calls[0] == 2 + 4  # the rest of fold 1, then the final model; fold 0 not redone
    assert any(e.get("phase") == "resume" and e.get("step") == 2 for e in events)
    for field in ("score", "threshold"):
        assert getattr(resumed, field) == getattr(straight, field), field

    from slm_trainer import selector

    train = selector.read_records(small_data / "train.jsonl")
    known = [e for e in selector.examples_from_records(train, "tool-call") if e.target is not None]
    import torch

    scored = sum(
        len(torch.load(ckpt / f"fold{k}-logits.pt", weights_only=True)["rows"]) for k in range(2)
    )
    assert scored == len(known)  # every training call calibrated on, none held out of training
    manifest = json.loads((tmp_path / "straight" / "artifact" / "selector.json").read_text())
    assert manifest["config"]["calibration_folds"] == 2
    assert manifest["train_examples"] == len(train)


# ------------------------------------------------------------------ the CLI


def operator_finetune_args(workspace: Path) -> list[str]:
    """The exact flags the operator's Job passes, with the workspace moved to tmp."""
    builders = pytest.importorskip("slm_operator.builders")
    task = yaml.safe_load((REPO / "examples" / "tool-selection.yaml").read_text())
    task["metadata"].update({"namespace": "default", "uid": "u-1"})
    candidate = {
        "name": "minilm",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "method": "lora",
        "lora": {"r": 8, "alpha": 16},
        "epochs": 2,  # with 16 per batch, 2 epochs reach --max-steps=4
        "learningRate": 0.0005,
        "maxSeqLength": 128,
    }
    job = builders.finetune_job(task, "r1", candidate)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "finetune"
    return [a.replace("/workspace", str(workspace)) for a in container["args"]]


def test_cli_finetune_with_the_operators_flags_writes_a_result_it_can_read(
    small_data: Path, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    argv = operator_finetune_args(workspace)
    data_flag = next(a for a in argv if a.startswith("--data="))
    data_dir = Path(data_flag.split("=", 1)[1])
    data_dir.mkdir(parents=True)
    for name in ("train.jsonl", "eval.jsonl"):
        (data_dir / name).write_text((small_data / name).read_text())
    result_path = tmp_path / "termination-log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slm_trainer",
            "finetune",
            *argv,
            "--max-steps=4",
            "--num-threads=2",
            "--latency-samples=2",
            "--no-bundle-base",
            f"--result-path={result_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = TrainerResult.from_json(result_path.read_text())
    assert result.stage == "finetune" and result.ok and result.candidate == "minilm"
    for field in (
        "score",
        "llm_score",
        "parameters",
        "trainable_parameters",
        "artifact_uri",
        "threshold",
        "train_seconds",
        "eval_seconds",
    ):
        assert getattr(result, field) is not None, field
    assert result.artifact_uri.startswith("pvc://slm-fleet-artifacts/tool-selection/r1/")  # type: ignore[union-attr]
    assert 0 < result.trainable_parameters < result.parameters  # type: ignore[operator]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "progress" and e.get("step") == 4 for e in lines)
    out = Path(next(a for a in argv if a.startswith("--output=")).split("=", 1)[1])
    assert {"selector.json", "head.safetensors", "predictions.jsonl", "adapter"} <= {
        p.name for p in out.iterdir()
    }

    # The evaluate stage reads that candidate (predictions.jsonl) and applies a gate.
    from slm_trainer import evaluate

    ev = evaluate.run(
        evaluate.Args(
            data=data_dir,
            output=tmp_path / "report",
            candidates_dir=out.parent,
            task_type="tool-call",
            metric="label-accuracy",
            min_score=0.0,
        )
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["candidates"][0]["name"] == "minilm"
    assert (tmp_path / "report" / "report.png").stat().st_size > 1000
    assert ev.candidate in (None, "minilm")


def test_causal_lms_go_to_the_generative_trainer_and_evaluate_reads_them(
    small_data: Path, tmp_path: Path
) -> None:
    """The dispatch end to end with a tiny Llama built from a config (no download)."""
    generative = pytest.importorskip("slm_trainer.generative")
    model = generative.build_tiny_causal_lm(tmp_path / "tiny-llama")
    args = fine_args(small_data, tmp_path, model=str(model), max_steps=2, max_eval_examples=3)
    assert not finetune.uses_selector(args)
    result = finetune.run(args, lambda e: None)
    assert result.ok and result.stage == "finetune", result.message
    saved = TrainerResult.from_json((tmp_path / "artifact" / "result.json").read_text())
    assert saved == result

    from slm_trainer import evaluate

    # one row per eval call: those beyond --max-eval-examples are deferrals
    eval_records = evaluate.read_eval(small_data)
    scored = evaluate.score_candidate(
        "tiny",
        eval_records,
        evaluate.read_predictions(tmp_path / "artifact" / "predictions.jsonl", eval_records),
        "tool-call",
        "tool-call-ast",
        0.97,
    )
    assert scored.kind == "generative" and scored.metrics["tool_call_ast"] is not None


# ------------------------------------------------------------------ twins, progress, SIGTERM


def _todays_strata(examples: list[Any], seed: int) -> list[list[int]]:
    """``_ranked_strata`` as it was before twins were kept together (the reference)."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.target is not None:
            groups.setdefault("none" if ex.ref_label is None else "tool", []).append(i)
    return [
        sorted(m, key=lambda i: hashlib.sha256(f"{seed}:{examples[i].key}:{i}".encode()).digest())
        for _, m in sorted(groups.items())
    ]


def _todays_folds(examples: list[Any], k: int, seed: int) -> list[int]:
    fold = [-1] * len(examples)
    for ranked in _todays_strata(examples, seed):
        for j, i in enumerate(ranked):
            fold[i] = j % k
    return fold


def _todays_split(examples: list[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    calib: set[int] = set()
    for ranked in _todays_strata(examples, seed):
        if len(ranked) >= 2:
            calib.update(ranked[: min(len(ranked) - 1, int(len(ranked) * fraction + 0.5))])
    fit = [i for i, ex in enumerate(examples) if ex.target is not None and i not in calib]
    return fit, sorted(calib)


def test_folds_and_calibration_split_do_not_move_for_calls_without_twins() -> None:
    """Keeping twins together must not reshuffle anything else: the benchmark's (BFCL) folds,
    calibration split and so its threshold and figures stay as they were on data without
    identical selector inputs, and a single-turn call's input is what it was."""
    from slm_trainer import selector

    records = support_records(3)
    try:
        import bfcl_data

        records += list(bfcl_data.records(["live_multiple", "live_irrelevance"]))
    except ImportError:  # bfcl_eval not installed: the support calls alone
        pass
    for r in records:  # no turn after the last user turn: read as today's query_text did
        users = [m["content"] for m in r.messages if m.get("role") == "user"]
        today = "\n".join(reversed([u for u in users if u.strip()])).strip()
        assert selector.example_for(r.messages, r.tools, "tool-call").query == today
    ex = selector.examples_from_records(records, "tool-call")
    seen: dict[Any, int] = {}
    for e in ex:
        seen[(e.query, e.texts)] = seen.get((e.query, e.texts), 0) + 1
    ex = [e for e in ex if seen[(e.query, e.texts)] == 1]  # BFCL itself has 6 twin pairs
    assert len(ex) > 100
    for seed in (0, 1, 7):
        for k in (2, 4, 5):
            assert selector.crossfit_folds(ex, k, seed) == _todays_folds(ex, k, seed)
        for fraction in (0.0, 0.15, 0.3):
            assert selector.calibration_split(ex, fraction, seed) == _todays_split(
                ex, fraction, seed
            )


def agent_log() -> list[CallRecord]:
    """leak2.py's log: a conversation per city, step 1 searches one order, step 2 (after the
    tool's result) the other; the agent sent step 1 twice (a retry: the same input)."""
    cities = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo"]
    cities += ["Delhi", "Quito", "Seoul", "Dublin", "Vienna", "Prague", "Lisbon", "Athens"]

    def call(order: int) -> dict[str, Any]:
        arguments = json.dumps({"order_id": str(order)})
        return {
            "id": "c1",
            "type": "function",
            "function": {"name": "search_orders", "arguments": arguments},
        }

    out = []
    for n, city in enumerate(cities):
        user = {
            "role": "user",
            "content": f"Find order {1000 + n} shipped to {city} and {2000 + n}",
        }
        first = {"role": "assistant", "tool_calls": [call(1000 + n)]}
        result = {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"city": city})}
        for retry in range(2):
            out.append(
                CallRecord(
                    task="t",
                    backend="llm",
                    messages=[user],
                    tools=SUPPORT_TOOLS,
                    response=first,
                    request_id=f"s1-{n}-{retry}",
                )
            )
        out.append(
            CallRecord(
                task="t",
                backend="llm",
                messages=[user, first, result],
                tools=SUPPORT_TOOLS,
                response={"role": "assistant", "tool_calls": [call(2000 + n)]},
                request_id=f"s2-{n}",
            )
        )
    return out


def test_a_step_after_a_tool_result_is_its_own_selector_input() -> None:
    """Every step of a conversation read as its first (the user turns only): search and then
    the next search were one input with two answers, which no selector can tell apart."""
    from slm_trainer import selector

    ex = selector.examples_from_records(agent_log(), "tool-call")
    steps = ex[::3], ex[2::3]  # step 1 (first copy) and step 2 of each conversation
    for one, two in zip(*steps, strict=True):
        assert one.query != two.query and two.query.startswith(one.query + "\n")
        assert "called search orders" in two.query and "tool:" in two.query


def test_identical_selector_inputs_share_a_fold_and_a_calibration_side() -> None:
    """Each twin scored by a fold model trained on the other made the out-of-fold
    confidences too high (leak2.py: 12 of 19 twin pairs split across 5 folds)."""
    from slm_trainer import selector

    ex = selector.examples_from_records(agent_log(), "tool-call")
    views = [(e.query, e.texts) for e in ex]
    twins = [[i for i, v in enumerate(views) if v == w] for w in dict.fromkeys(views)]
    twins = [g for g in twins if len(g) > 1]
    assert len(twins) >= 17  # the retried first steps
    for seed in range(4):
        folds = selector.crossfit_folds(ex, 5, seed)
        assert all(len({folds[i] for i in g}) == 1 for g in twins)
        assert sorted(set(folds)) == list(range(5))
        fit, calib = selector.calibration_split(ex, 0.15, seed)
        assert calib and all(len({i in calib for i in g}) == 1 for g in twins)
        assert sorted(fit + calib) == list(range(len(ex)))
    # every call one input: calibration leaves the stratum something to fit on
    same = [ex[0]] * 6
    fit, calib = selector.calibration_split(same, 0.5, 0)
    assert fit == list(range(6)) and calib == []


def _tiny_config(**kw: Any) -> Any:
    from slm_trainer import selector

    base = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "batch_size": 4, "epochs": 1}
    return selector.SelectorConfig(**{**base, **kw})


def test_crossfit_progress_rises_once_to_100_and_names_the_fold() -> None:
    """With --calibration-folds K each fold's last step sent 100 %, and the operator showed a
    finished training after the first of K+1."""
    import torch

    from slm_trainer import selector

    torch.set_num_threads(1)
    ex = selector.examples_from_records(support_records(1), "tool-call")
    events: list[dict[str, Any]] = []
    config = _tiny_config(calibration_folds=2, max_steps=3)
    selector.train_crossfit(
        config, ex, None, "d", emit=events.append, progress_fields={"candidate": "c"}
    )
    lines = [e for e in events if e.get("event") == "progress" and "percent" in e]
    percents = [e["percent"] for e in lines]
    assert percents == sorted(percents) and percents[-1] == 100.0 and 100.0 not in percents[:-1]
    # each fold fits half the 13 calls (2 batches of 4), the final model all of them (3 steps)
    assert [e["fold"] for e in lines] == ["1/2"] * 2 + ["2/2"] * 2 + ["final"] * 3
    assert lines[-1]["overall_step"] == lines[-1]["overall_total_steps"] == 7


def test_sigterm_in_a_fold_s_last_step_stops_the_crossfit_run(tmp_path: Path) -> None:
    """A fold's loop raises Preempted only before its last step: a SIGTERM in that step was
    swallowed and the next fold trained on until the kubelet's SIGKILL (sigterm_fold.py)."""
    import torch

    from slm_trainer import selector

    torch.set_num_threads(1)
    ex = selector.examples_from_records(support_records(1), "tool-call")
    steps: list[int] = []

    def hook(step: int) -> None:
        steps.append(step)
        if len(steps) == 2:  # the last step of fold 1
            os.kill(os.getpid(), signal.SIGTERM)

    config = _tiny_config(calibration_folds=2, max_steps=2)
    with pytest.raises(selector.Preempted, match="after fold 1/2"):
        selector.train_crossfit(config, ex, tmp_path, "d", emit=lambda e: None, step_hook=hook)
    assert steps == [1, 2]  # nothing trained after the signal
    assert (tmp_path / "fold0-logits.pt").is_file()  # and fold 1 is kept for the rerun
    assert not (tmp_path / "fold1").exists()


def test_sigterm_while_a_fold_is_set_up_stops_that_fold_after_one_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM while fold 2's model was built (taken by the cross-fitting's own handler)
    was not seen by the fold's loop, whose flag started lowered: the fold trained all its
    steps while the grace period ran out (crossfit_sigterm_setup.py)."""
    import torch

    from slm_trainer import selector

    torch.set_num_threads(1)
    ex = selector.examples_from_records(support_records(1), "tool-call")
    builds: list[int] = []
    real_build = selector.build_net

    def build_net(config: Any, device: Any) -> Any:
        builds.append(1)
        if len(builds) == 2:  # fold 2/2 is being set up
            os.kill(os.getpid(), signal.SIGTERM)
        return real_build(config, device)

    monkeypatch.setattr(selector, "build_net", build_net)
    steps: list[tuple[int, int]] = []
    config = _tiny_config(calibration_folds=2, epochs=3, max_steps=6)
    with pytest.raises(selector.Preempted, match="at step 1/6"):
        selector.train_crossfit(
            config,
            ex,
            tmp_path,
            "d",
            emit=lambda e: None,
            step_hook=lambda step: steps.append((len(builds), step)),
        )
    assert [s for fold, s in steps if fold == 2] == [1]  # and its checkpoint saved there
    assert torch_load(tmp_path / "fold1" / selector.CHECKPOINT)["step"] == 1


def test_with_no_calibration_call_the_selector_answers_nothing_and_says_so(
    small_data: Path, tmp_path: Path
) -> None:
    """No calibration call used to serve threshold 0.5 at temperature 1.0 without a word:
    a precision nobody measured."""
    args = fine_args(small_data, tmp_path, epochs=1, max_steps=2, calibration_fraction=0.0)
    result = finetune.run(args, lambda e: None)
    assert result.ok, result.message
    assert result.threshold == 1.0 and "no calibration calls" in result.message
    manifest = json.loads((tmp_path / "artifact" / "selector.json").read_text())
    assert manifest["threshold"] == 1.0 and manifest["temperature"] == 1.0


def test_a_malformed_line_in_a_split_is_skipped_and_counted_not_a_crash(
    small_data: Path, tmp_path: Path
) -> None:
    """One hand-edited or non-UTF-8 line in train.jsonl or eval.jsonl crashed finetune
    (exit 1, retried in vain, naming neither file nor line)."""
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    n_train = len((data / "train.jsonl").read_text().splitlines())
    with (data / "train.jsonl").open("ab") as fh:
        fh.write(b"{broken\n")
    with (data / "eval.jsonl").open("ab") as fh:
        fh.write(b'{"task": "\xff"}\n')
    events: list[dict[str, Any]] = []
    result = finetune.run(fine_args(data, tmp_path, epochs=1, max_steps=1), events.append)
    assert result.ok, result.message
    assert result.train_examples == n_train
    note = (
        f"2 malformed lines skipped (1 invalid_json, 1 invalid_utf8; first: train.jsonl line "
        f"{n_train + 1})"
    )
    assert note in result.message
    assert any(note in e.get("message", "") for e in events if e["event"] == "warning")


def test_without_eval_calls_the_selector_reports_no_score(small_data: Path, tmp_path: Path) -> None:
    """With no eval.jsonl the result said ok with score 0.0 and "answers 0.0% of eval calls
    ... precision 0.0%": figures nobody measured. The generative path reports None."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_data / "train.jsonl", data / "train.jsonl")
    result = finetune.run(fine_args(data, tmp_path, epochs=1, max_steps=1), lambda e: None)
    assert result.ok, result.message
    assert result.score is None and result.eval_examples == 0
    assert f"no eval calls in {data / 'eval.jsonl'}, no score" in result.message
    assert "% of eval calls" not in result.message and "precision" not in result.message


def test_class_label_texts_keep_the_llms_most_frequent_spelling() -> None:
    sel = pytest.importorskip("slm_trainer.selector")

    def said(text: str) -> CallRecord:
        return CallRecord(
            task="t",
            backend="llm",
            messages=[{"role": "user", "content": "which queue?"}],
            response={"role": "assistant", "content": text},
        )

    records = [said(t) for t in ("REFUND_REQUEST", "refund_request\n", "REFUND_REQUEST")]
    records += [said(t) for t in ("Tech  Support", "tech support", " Billing ")]
    assert sel.class_label_texts(records) == {
        "billing": "Billing",
        "refund_request": "REFUND_REQUEST",
        "tech support": "Tech  Support",  # a tie: the smallest text, so a rerun agrees
    }
    assert sel.class_labels_of(records) == ["billing", "refund_request", "tech support"]


@pytest.mark.slow
def labelled_calls(asks: dict[str, list[str]], repeats: int) -> list[CallRecord]:
    """Classification calls: each ask of each label ``repeats`` times, the LLM answering with
    the label."""
    return [
        CallRecord(
            task="t",
            backend="llm",
            messages=[{"role": "user", "content": f"{ask} ({n})"}],
            response={"role": "assistant", "content": label},
        )
        for label, texts in asks.items()
        for ask in texts
        for n in range(repeats)
    ]


def test_a_classification_selector_serves_the_llms_spelling_of_its_label(tmp_path: Path) -> None:
    """Labels are compared normalised, so the artifact's labels are case folded; served as
    such, an agent that matched the LLM's "REFUND_REQUEST" got "refund_request" while the
    evaluation, comparing normalised texts, scored it as an exact match."""
    sel = pytest.importorskip("slm_trainer.selector")
    asks = {
        "REFUND_REQUEST": ["I want my money back", "refund my order please"],
        "Billing": ["my card was charged twice", "the invoice amount is wrong"],
    }
    records = labelled_calls(asks, 4)
    data = write_split(records, tmp_path / "data")
    args = fine_args(data, tmp_path, task_type="classification", epochs=1, max_steps=2)
    result = finetune.run(args, lambda e: None)
    assert result.ok, result.message
    loaded = sel.load_selector(tmp_path / "artifact", num_threads=2)
    assert loaded.labels == ["billing", "refund_request"]
    # export's metadata.json says what the score measures (it read null for a selector)
    assert loaded.manifest["metric"] == "label-accuracy"
    assert loaded.answer_text("refund_request") == "REFUND_REQUEST"
    assert loaded.answer_text("billing") == "Billing"
    answer = chatformat.selector_answer(
        "refund_request", 0.9, "classification", loaded.answer_text("refund_request")
    )
    assert answer["content"] == "REFUND_REQUEST" and answer["label"] == "refund_request"


def test_a_classification_selectors_result_speaks_of_labels_not_tools(tmp_path: Path) -> None:
    """Gated on exact-match, a classification selector's result explained its score as
    that of "the chosen tool with '{}' arguments": a task with no tools at all."""
    records = labelled_calls({"refund": ["I want my money back"], "billing": ["charged twice"]}, 6)
    data = write_split(records, tmp_path / "data")
    args = fine_args(
        data, tmp_path, task_type="classification", metric="exact-match", epochs=1, max_steps=2
    )
    result = finetune.run(args, lambda e: None)
    assert result.ok, result.message
    assert "the chosen label's text" in result.message
    assert "tool" not in result.message and "'{}'" not in result.message


def test_a_result_claims_no_figure_of_calls_the_eval_split_lacks() -> None:
    """A selector that answered nothing read "precision 100.0%", and an eval split without
    no-tool calls "100.0% of no-tool calls deferred": percentages of empty sets, as if
    measured."""
    from types import SimpleNamespace

    sel = pytest.importorskip("slm_trainer.selector")
    needs_tool = [SimpleNamespace(ref_label="get_time")] * 3
    nothing = {
        "accepted": 0,
        "coverage": 0.0,
        "precision": 1.0,
        "relevant_coverage": 0.0,
        "irrelevant_deferral": 1.0,
    }
    assert sel._measured(nothing, needs_tool, "tool-call", 0.9) == (
        "answers 0.0% of eval calls, 0.0% of calls that need a tool, no no-tool calls in "
        "the eval split; no call answered at threshold 0.900"
    )
    mixed = [*needs_tool, SimpleNamespace(ref_label=None)]
    answered = {**nothing, "accepted": 2, "coverage": 0.5, "relevant_coverage": 2 / 3}
    assert sel._measured(answered, mixed, "tool-call", 0.9) == (
        "answers 50.0% of eval calls, 66.7% of calls that need a tool, 100.0% of no-tool "
        "calls deferred; precision 100.0% at threshold 0.900"
    )
    assert sel._measured(answered, mixed, "classification", 0.9) == (
        "answers 50.0% of eval calls; precision 100.0% at threshold 0.900"
    )


def test_a_diverged_loss_leaves_strict_json_behind(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN loss was written as ``NaN`` into selector.json, which is not JSON: strict
    readers (jq, Go, a dashboard) refused the whole manifest. It is null there."""
    from slm_trainer import selector as sel

    loss = sel.Selector.training_loss
    monkeypatch.setattr(sel.Selector, "training_loss", lambda s, b: loss(s, b) * float("nan"))
    args = fine_args(small_data, tmp_path, epochs=1, max_steps=1)
    result = finetune.run(args, lambda e: None)

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    manifest = strict((Path(args.output) / "selector.json").read_text())
    assert manifest["final_loss"] is None, result
    strict((Path(args.output) / "eval_report.json").read_text())


def test_a_selector_adapter_is_read_onto_the_cpu_beside_its_base(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base is read onto the CPU and moved with the head; peft, untold, reads the adapter
    onto the first GPU whenever one is visible, so a Triton CPU instance on a GPU node made a
    CUDA context (hundreds of MiB of GPU memory per instance) to load it."""
    import peft

    from slm_trainer import selector as sel

    args = fine_args(small_data, tmp_path, epochs=1, max_steps=1)
    assert finetune.run(args, lambda e: None).ok
    asked: list[dict[str, Any]] = []
    original = peft.PeftModel.from_pretrained

    def spy(model: Any, path: str, **kwargs: Any) -> Any:
        asked.append(kwargs)
        return original(model, path, **kwargs)

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", spy)
    loaded = sel.load_selector(Path(args.output), num_threads=2, device="cpu")
    assert [a.get("torch_device") for a in asked] == ["cpu"]
    assert str(loaded.device) == "cpu"
