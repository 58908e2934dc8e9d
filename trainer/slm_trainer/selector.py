"""The closed-label selector: a small encoder that picks one option or hands the call back.

Why: most agent calls that repeat are choices from a closed set, such as which tool to call
or which label a ticket gets. Such a choice needs no generative model. A 22M-parameter
sentence encoder (all-MiniLM-L6-v2) with LoRA and a scoring head, distilled from the LLM's
logged answers, makes it in milliseconds on a CPU. It also gives a calibrated confidence, so
the gateway can send the calls it is unsure of back to the LLM.

How it scores: every request brings its own options (each BFCL question has its own tool
list), so the model scores (prompt, option) pairs instead of a fixed output layer:

- the **query tower** embeds the user's prompt with the LoRA-adapted encoder (mean pooling,
  L2-normalised, as sentence-transformers does for MiniLM);
- the **option tower** embeds ``"<name split into words>: <description> Parameters: ..."``
  with the *frozen* base encoder (the adapter switched off), followed by a learned linear map
  that starts as the identity. Because the tower is frozen, option embeddings are computed
  once and cached: training encodes each distinct tool once, and serving pays for the query
  only, since an agent sends the same tools again and again. ``tool_tower="shared"`` runs
  options through the adapted encoder too: on BFCL it trained about 20 times slower on CPU,
  answered 5 times slower and was not clearly better, so it is not the default;
- option ``i`` scores ``s * cos(q, W t_i)``. A learned **defer/none** option scores
  ``s * b`` (``defer_head="constant"``, the default) or ``s * (w . q + b)``
  (``defer_head="query"``), and a softmax runs over ``[none, options...]``. With a constant,
  deferring depends only on how well the best tool fits. A query-dependent defer score can
  also learn "this kind of question goes to the LLM" from the query alone, and on BFCL it
  over-learned that: the held-out selector at 97 % precision kept 52.7 % of relevant calls
  with the constant against 51.9 % with the query head, and 61.8 % against 56.0 % at the best
  threshold (``bench/selector_quality.py --defer-head``). The training target
  is the LLM's choice: the first tool call's function name, or *none* when the LLM answered
  without a tool (BFCL's ``live_irrelevance``). For classification the options are the labels
  seen in training, and *none* is never a target;
- **missing-tool augmentation** (tool calls, weight ``missing_tool_weight``): each training
  call that has two or more tools is also scored with its chosen tool removed, with target
  *none*. The argument is that when the right tool is absent the call belongs to the LLM, not
  to a merely related tool. Most real no-tool calls look like that: the tools are on topic,
  but none of them does what was asked. The batch's query embeddings are reused, so this
  costs no encoder pass;
- **in-batch negatives** (tool calls, weight ``in_batch_weight``): each training call is
  scored a second time against its own tools followed by every other tool in its batch (see
  :func:`in_batch_options`), with the same target. A call brings only its own 3-5 tools, so
  without them a query learns to beat those few; with them it must also beat a few dozen
  unrelated ones, and a call the LLM answered without a tool learns to stay below *none*
  against all of them. The embeddings are the batch's own, so it costs no encoder pass. On
  BFCL with held-out calibration (training seed 0) it kept 61.0 % of relevant calls at 97 %
  precision against 51.9 % without (``bench/selector_quality.py --in-batch-weight 0|1``; the
  README has the other seeds). A call whose batch adds no tool counts its loss twice;
- **calibration**: a seeded ``calibration_fraction`` of the training split (stratified by
  tool vs. no tool) is held out. Temperature scaling is fitted on it
  (:func:`slm_trainer.metrics.fit_temperature`), and the confidence is the top softmax
  probability at that temperature. The serving threshold is the lowest one at which the
  calibration calls reach ``target_precision`` (:func:`slm_trainer.metrics.pick_threshold`).
  A call is answered only when the top option is not *none* and its confidence is at least
  the threshold. With ``calibration_folds`` K >= 2 (:func:`train_crossfit`) nothing is held
  out: K fold models score the calls they did not train on, temperature and threshold are
  fitted on all of those, and the served model trains on every call. It costs K more
  trainings and removes most of the threshold's sampling noise.

Training is deterministic for a given seed, data and thread count. Batches are
length-grouped: within each block of 50 batches, examples are sorted by length, and the order
comes from ``random.Random(f"{seed}:{epoch}")``, so the batch of any step can be recomputed.
Every ``checkpoint_every`` steps, and on SIGTERM, the trainable weights, the optimizer,
the scheduler and the torch RNG state are saved to ``checkpoint_dir``. A restarted run with
the same fingerprint (arguments and data) resumes there and ends with the same weights.

Artifact layout (``--output``), which the export stage loads through :func:`load_selector`::

    selector.json        manifest: format, task_type, base_model, method, tool_tower,
                         max tokens, temperature, threshold, target_precision, labels
                         (classification: normalised; config.label_texts has each one's
                         text as served, the LLM's most frequent spelling), parameter
                         counts, eval metrics, file names
    base/                copy of the base encoder (config, tokenizer, weights), so the
                         artifact loads offline on its own (absent with bundle_base=False:
                         then base_model is loaded by name)
    adapter/             peft LoRA adapter (adapter_config.json, adapter_model.safetensors)
                         for method lora; ``encoder/`` (a full model) for method full
    head.safetensors     proj.weight [D, D], none.weight [1, D], none.bias [1], log_scale []
    predictions.jsonl    the eval split's predictions, which the evaluate stage reads
    eval_report.json     the finetune stage's own evaluation (curve, latency, ECE)
    result.json          the stage's TrainerResult (written by slm_trainer.finetune)

Method ``qlora`` is refused without a GPU; with one, a 22M encoder gains nothing from 4-bit
weights, so it trains as ``lora``. This module imports torch at the top; the finetune and
evaluate stages import it lazily, so ``--help`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slm_contract import CallRecord, TrainerResult
from slm_trainer import metrics, preemption
from slm_trainer.cli import finite
from slm_trainer.curate import ParseStats, read_split
from slm_trainer.finetune import (
    BaseModelNotFound,
    loading_base_model,
    resolve_model_path,
    split_identifier,
)
from slm_trainer.preemption import (
    RERUN_TO_RESUME,
    SigtermFlag,
    load_or_set_aside,
    save_atomically,
)
from slm_trainer.progress import Progress
from slm_trainer.triton_model import chatformat, runtime

FORMAT = "slmfleet.dev/selector/v1"
MANIFEST = "selector.json"
HEAD_FILE = "head.safetensors"
PREDICTIONS = "predictions.jsonl"
CHECKPOINT = "selector-state.pt"
#: Bump when a change to this module changes what a checkpoint means.
CODE_VERSION = 8
#: Tool texts whose option embeddings a :class:`Selector` keeps (least recently used out).
OPTION_CACHE_SIZE = 4096
_NEG = -1.0e4  # logit of padded option slots: large but finite, so softmax stays NaN-free

Emit = Callable[[dict[str, Any]], None]


# ============================================================================ pure helpers


#: Roles of the turns after the last user message that a selector reads (:func:`query_text`).
_STEP_ROLES = ("assistant", "tool", "function")


def _step_text(message: Mapping[str, Any]) -> str:
    """One agent step after the user's last turn, as text: what the assistant said and
    called (``called <name> <arguments>``), or what a tool returned."""
    parts = [metrics.text_of(message.get("content")).strip()]
    for name, arguments in metrics.tool_calls(message):
        args = json.dumps(arguments, sort_keys=True, ensure_ascii=False)
        parts.append(f"called {split_identifier(name)} {args}")
    text = " ".join(p for p in parts if p)
    return f"{message.get('role')}: {text}" if text else ""


def query_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt a selector reads: the latest user turn, then the agent's steps since it (its
    tool calls and their results, in order), then the earlier user turns, latest first.

    Why the steps: every step of a multi-step agent conversation repeats the same user turns,
    and with only those the steps were one input with different answers (search, then
    refund), which the selector cannot tell apart; they also sat on both sides of a
    calibration split, so out-of-fold confidences were too high. A single-turn call (system
    and user turns, BFCL's) has no assistant or tool turn after its last user turn and reads
    exactly as before. Serving reads through this same function (:meth:`Selector.predict`,
    which the Triton model calls), so it sees what training saw. The user's request comes
    first because truncation (``max_query_tokens``) keeps the start: with a long request the
    steps are cut, and the input is what it used to be.
    """
    users = [metrics.text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    users = [u for u in users if u.strip()]
    if not users:
        users = [metrics.text_of(m.get("content")) for m in messages]
        return "\n".join(reversed(users)).strip()
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    steps = [_step_text(m) for m in messages[last + 1 :] if m.get("role") in _STEP_ROLES]
    steps = [t for t in steps if t]
    ordered = [*users[-1:], *steps, *reversed(users[:-1])]
    return "\n".join(ordered).strip()


def option_text(tool: Mapping[str, Any]) -> str:
    """How a tool is shown to the option tower: name in words, description, parameter names.

    A schema that is not JSON Schema's shape (``parameters`` not an object, ``required`` not
    a list of names) counts as unknown parameters: the tool is still a choice. Curate keeps
    such records (it checks only that tools are objects), and one of them crashed the whole
    finetune stage here.
    """
    function = tool.get("function", tool)
    if not isinstance(function, Mapping):
        return ""
    text = f"{split_identifier(str(function.get('name', '')))}: {function.get('description', '')}"
    params = function.get("parameters")
    params = params if isinstance(params, Mapping) else {}
    props = params.get("properties")
    listed = params.get("required")
    required = {r for r in listed if isinstance(r, str)} if isinstance(listed, list) else set()
    if isinstance(props, Mapping) and props:
        text += " Parameters: " + ", ".join(
            split_identifier(str(p)) + (" (required)" if p in required else "") for p in props
        )
    return text.strip()


@dataclass(frozen=True)
class Example:
    """One call as the selector sees it. ``target`` indexes ``[none, *labels]``; None when the
    logged label is not among the options (such a call is evaluated but never trained on)."""

    query: str
    labels: tuple[str, ...]
    texts: tuple[str, ...]
    ref_label: str | None
    target: int | None
    key: str
    request_id: str = ""


def record_key(record: CallRecord) -> str:
    """Content hash of a record's request: stable across runs and processes."""
    blob = json.dumps([record.messages, record.tools], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def example_for(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    task_type: str,
    class_labels: Sequence[str] = (),
    response: Mapping[str, Any] | None = None,
    key: str = "",
    request_id: str = "",
) -> Example:
    """Build the selector's view of one request (and its logged answer, when given)."""
    if task_type == "classification":
        labels = tuple(class_labels)
        texts = tuple(split_identifier(lab) if lab else lab for lab in labels)
    else:
        seen: set[str] = set()
        pairs = []
        for tool in tools:
            name = metrics.tool_name(tool)
            if name and name not in seen:
                seen.add(name)
                pairs.append((name, option_text(tool)))
        labels = tuple(p[0] for p in pairs)
        texts = tuple(p[1] for p in pairs)
    ref = metrics.label_of(response, task_type) if response is not None else None
    if response is None:
        target = None
    elif ref is None:
        target = 0
    else:
        target = labels.index(ref) + 1 if ref in labels else None
    return Example(query_text(messages), labels, texts, ref, target, key, request_id)


def class_labels_of(records: Iterable[CallRecord]) -> list[str]:
    """The closed label set of a classification task: every answer seen, sorted."""
    return sorted({lab for r in records if (lab := metrics.label_of(r.response, "classification"))})


def class_label_texts(records: Iterable[CallRecord]) -> dict[str, str]:
    """Each label's text as the LLM wrote it most often (stripped; ties: the smallest).

    Why: labels are compared normalised (case folded, whitespace collapsed), so
    ``REFUND_REQUEST`` and ``refund_request`` are one class. Served as the normalised form, an
    agent that matched the LLM's ``REFUND_REQUEST`` got ``refund_request``, and evaluation,
    comparing normalised texts, could not see it.
    """
    seen: dict[str, Counter[str]] = {}
    for r in records:
        label = metrics.label_of(r.response, "classification")
        if label:
            text = metrics.text_of((r.response or {}).get("content")).strip()
            seen.setdefault(label, Counter())[text] += 1
    return {
        label: min(texts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        for label, texts in sorted(seen.items())
    }


def examples_from_records(
    records: Sequence[CallRecord], task_type: str, class_labels: Sequence[str] = ()
) -> list[Example]:
    return [
        example_for(
            r.messages,
            r.tools,
            task_type,
            class_labels,
            response=r.response,
            key=record_key(r),
            request_id=r.request_id,
        )
        for r in records
    ]


def without_choice(example: Example) -> Example:
    """The same call with the chosen option removed: it now has to be deferred."""
    assert example.target is not None and example.target > 0
    keep = [i for i in range(len(example.labels)) if i != example.target - 1]
    return Example(
        query=example.query,
        labels=tuple(example.labels[i] for i in keep),
        texts=tuple(example.texts[i] for i in keep),
        ref_label=None,
        target=0,
        key=example.key,
        request_id=example.request_id,
    )


def _same_input_alike(
    examples: Sequence[Example], ranked: Sequence[Sequence[int]], assigned: list[Any]
) -> list[Any]:
    """``assigned`` (by index) with every call given the assignment of the first call with
    the same selector input (query and option texts), in ``ranked`` order (the strata of
    :func:`_ranked_strata` one after the other).

    Why: the steps of an agent conversation, or a call the agent repeats, are one input,
    often with one label. Split across folds or across fit and calibration, the model that
    scores one has trained on its twin, and the out-of-fold confidences the threshold is
    picked on are too high. Taking the first member's assignment leaves data without such
    twins exactly as it was (the benchmark's folds, split and threshold do not move).
    """
    first: dict[tuple[str, tuple[str, ...]], Any] = {}
    for members in ranked:
        for i in members:
            first.setdefault((examples[i].query, examples[i].texts), assigned[i])
    out = list(assigned)
    for members in ranked:
        for i in members:
            out[i] = first[(examples[i].query, examples[i].texts)]
    return out


def _ranked_strata(examples: Sequence[Example], seed: int) -> list[list[int]]:
    """Indices of the calls with a known label, as two strata ("deferred", then "tool"), each
    in seeded hash order: a pure function of the data and the seed."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.target is not None:
            groups.setdefault("none" if ex.ref_label is None else "tool", []).append(i)
    return [
        sorted(
            members,
            key=lambda i: hashlib.sha256(f"{seed}:{examples[i].key}:{i}".encode()).digest(),
        )
        for _, members in sorted(groups.items())
    ]


def calibration_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(fit, calibration) indices: the smallest seeded hashes of each stratum calibrate.

    The strata are "answered with a tool" and "deferred" (no tool). Their mix decides how
    many accepted calls are wrong at a threshold, so the calibration set keeps the training
    mix. Calls whose label is not among their options are left out of both.

    Calls with the same selector input are on the same side, the side of the first of them
    (:func:`_same_input_alike`); a stratum whose calls all end up calibrating gets its last
    one's group back to fit on, as every stratum of two or more calls kept one before.
    """
    strata = _ranked_strata(examples, seed)
    in_calib = [False] * len(examples)
    if fraction > 0:
        for ranked in strata:
            if len(ranked) < 2:
                continue
            n = min(len(ranked) - 1, math.floor(len(ranked) * fraction + 0.5))
            for i in ranked[:n]:
                in_calib[i] = True
    in_calib = _same_input_alike(examples, strata, in_calib)
    for ranked in strata:
        if ranked and all(in_calib[i] for i in ranked):
            view = (examples[ranked[-1]].query, examples[ranked[-1]].texts)
            for members in strata:
                for i in members:
                    if (examples[i].query, examples[i].texts) == view:
                        in_calib[i] = False
    calib = [i for i, flag in enumerate(in_calib) if flag]
    fit = [i for i, ex in enumerate(examples) if ex.target is not None and not in_calib[i]]
    return fit, calib


def in_batch_options(
    batch: Sequence[Example], options: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each call's own option embeddings, then those of the batch's other tools.

    A tool is added once per call, and never when the call already offers it: a tool of
    another call with the same name or the same text is the call's own tool, not a negative.
    The call's own options stay first, so its target index does not change.
    """
    out = []
    for i, ex in enumerate(batch):
        names, texts = set(ex.labels), set(ex.texts)
        extra = []
        for j, other in enumerate(batch):
            if j == i:
                continue
            for k, (name, text) in enumerate(zip(other.labels, other.texts, strict=True)):
                if name in names or text in texts:
                    continue
                names.add(name)
                texts.add(text)
                extra.append(options[j][k])
        out.append(torch.cat([options[i], torch.stack(extra)]) if extra else options[i])
    return out


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: int = 50
) -> list[list[int]]:
    """Length-grouped batches of one epoch, a pure function of (seed, epoch).

    Shuffle, sort each block of ``group`` batches by length (little padding), then shuffle
    the batches. Any step's batch can be recomputed on resume.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    block = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), block):
        chunk = sorted(order[start : start + block], key=lambda i: (-lengths[i], i))
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


# ============================================================================ the model


@dataclass
class SelectorConfig:
    """Everything that decides the trained weights (the checkpoint fingerprint hashes it)."""

    base_model: str
    task_type: str = "tool-call"
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    epochs: int = 3
    learning_rate: float = 5e-4
    head_learning_rate: float = 1e-3
    batch_size: int = 16
    max_query_tokens: int = 128
    max_option_tokens: int = 64
    tool_tower: str = "frozen"
    seed: int = 0
    max_steps: int = 0
    calibration_fraction: float = 0.15
    calibration_folds: int = 0
    target_precision: float = 0.97
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    missing_tool_weight: float = 0.5
    in_batch_weight: float = 1.0
    defer_head: str = "constant"
    class_labels: list[str] = field(default_factory=list)
    #: classification: each label's text as served (:func:`class_label_texts`)
    label_texts: dict[str, str] = field(default_factory=dict)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-6), dim=-1)


class SelectorNet(nn.Module):
    """Query tower (adapted encoder), option projection, defer head and logit scale."""

    def __init__(
        self,
        encoder: nn.Module,
        dim: int,
        frozen_options: nn.Module | None,
        tool_tower: str,
        defer_head: str = "query",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        # A separate frozen copy only for method "full"; with LoRA the base is the encoder
        # with its adapter disabled.
        self.frozen_options = frozen_options
        self.tool_tower = tool_tower
        self.proj = nn.Linear(dim, dim, bias=False)
        self.none = nn.Linear(dim, 1)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.none.weight.zero_()
            self.none.bias.zero_()
        if defer_head == "constant":
            # w stays zero: the defer score is the learned bias alone.
            self.none.weight.requires_grad_(False)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return _mean_pool(out.last_hidden_state, batch["attention_mask"])

    def embed_options_base(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Option embeddings from the frozen base encoder (no gradient)."""
        with torch.no_grad():
            if self.frozen_options is not None:
                out = self.frozen_options(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                )
                return _mean_pool(out.last_hidden_state, batch["attention_mask"])
            disable = getattr(self.encoder, "disable_adapter", None)
            if disable is None:
                return self.embed(batch)
            with disable():
                return self.embed(batch)

    def logits(self, q: torch.Tensor, options: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, 1 + max options]`` logits; column 0 is *none*, padding is very negative."""
        width = 1 + max((len(o) for o in options), default=0)
        scale = self.log_scale.exp()
        none = scale * self.none(q).squeeze(-1)
        rows = []
        for i, opts in enumerate(options):
            row = [none[i : i + 1]]
            if len(opts):
                t = F.normalize(self.proj(opts), dim=-1)
                row.append(scale * (t @ q[i]))
            pad = width - 1 - len(opts)
            if pad:
                row.append(q.new_full((pad,), _NEG))
            rows.append(torch.cat(row))
        return torch.stack(rows)


def head_state(net: SelectorNet) -> dict[str, torch.Tensor]:
    """The head's tensors (everything but the encoders), as saved in head.safetensors."""
    return {
        k: v
        for k, v in net.state_dict().items()
        if not k.startswith(("encoder.", "frozen_options."))
    }


def _lora_targets(model: nn.Module) -> list[str]:
    """Every linear layer of the encoder except a pooler/classifier head, by full name."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not any(part in name for part in ("pooler", "classifier", "lm_head"))
    ]


def build_net(config: SelectorConfig, device: torch.device) -> tuple[SelectorNet, Any]:
    """Base encoder + LoRA (or full fine-tuning) + head, seeded for reproducibility."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(config.base_model)
    # a base model that does not exist raises BaseModelNotFound: a reported failure, not a
    # crash the Job would retry
    with loading_base_model(config.base_model):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    torch.manual_seed(config.seed)
    # fp32 whatever the checkpoint holds (transformers 5 loads its dtype by default): the head
    # is fp32 and an fp16/bf16 encoder output would not multiply with it
    with loading_base_model(config.base_model):
        base = AutoModel.from_pretrained(path, dtype=torch.float32)
    dim = int(getattr(base.config, "hidden_size", 0) or base.config.d_model)
    frozen = None
    if config.method == "full":
        import copy

        frozen = copy.deepcopy(base).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        encoder: nn.Module = base
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_lora_targets(base),
            bias="none",
        )
        encoder = get_peft_model(base, lora)
    net = SelectorNet(encoder, dim, frozen, config.tool_tower, config.defer_head).to(device)
    return net, tokenizer


# ============================================================================ runtime


class Selector:
    """A trained selector ready to answer: ``predict(messages, tools) -> (label, confidence)``.

    Tool embeddings from the frozen option tower are cached by text, so a request with tools
    seen before pays for its query encoding only. The cache keeps the ``cache_size`` most
    recently used texts (:data:`OPTION_CACHE_SIZE`): in a long-running server, tool texts that
    vary per request (an id or a date in a description) must not grow memory without bound.
    Training raises the bound to hold every training option (computed once, in eval mode).
    """

    def __init__(
        self,
        net: SelectorNet,
        tokenizer: Any,
        config: SelectorConfig,
        temperature: float = 1.0,
        threshold: float = 0.5,
        device: torch.device | None = None,
    ) -> None:
        self.net = net
        self.tokenizer = tokenizer
        self.config = config
        self.temperature = temperature
        self.threshold = threshold
        self.device = device or torch.device("cpu")
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = OPTION_CACHE_SIZE
        self.manifest: dict[str, Any] = {}

    @property
    def task_type(self) -> str:
        return self.config.task_type

    @property
    def labels(self) -> list[str]:
        return list(self.config.class_labels)

    def answer_text(self, label: str) -> str:
        """The text served for a classification ``label``: the LLM's own spelling of it
        (an artifact written before the spellings were kept serves the label itself)."""
        return self.config.label_texts.get(label, label)

    def _tokenize(self, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=max_tokens,
            padding=True,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items() if k != "token_type_ids"}

    def base_option_embeddings(
        self, texts: Iterable[str], batch_size: int = 64
    ) -> dict[str, torch.Tensor]:
        """The frozen tower's embedding of each text, from the cache or computed (texts not
        yet cached in a deterministic order: by length, then text), and cached. The least
        recently used texts beyond ``cache_size`` are dropped from the cache."""
        wanted = set(texts)
        out = {t: self._cache[t] for t in wanted if t in self._cache}
        todo = sorted(wanted - out.keys())
        todo.sort(key=len)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            emb = self.net.embed_options_base(self._tokenize(chunk, self.config.max_option_tokens))
            for text, e in zip(chunk, emb, strict=True):
                out[text] = self._cache[text] = e.detach()
        for text in sorted(wanted):  # the texts just used become the most recent
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def option_tensors(self, examples: Sequence[Example], grad: bool) -> list[torch.Tensor]:
        dim = self.net.proj.in_features
        if self.net.tool_tower == "shared":
            unique = sorted({t for ex in examples for t in ex.texts})
            if not unique:
                return [torch.zeros(0, dim, device=self.device) for _ in examples]
            with torch.set_grad_enabled(grad):
                emb = self.net.embed(self._tokenize(unique, self.config.max_option_tokens))
            index = {t: i for i, t in enumerate(unique)}
            return [
                emb[[index[t] for t in ex.texts]]
                if ex.texts
                else torch.zeros(0, dim, device=self.device)
                for ex in examples
            ]
        cached = self.base_option_embeddings(t for ex in examples for t in ex.texts)
        return [
            torch.stack([cached[t] for t in ex.texts])
            if ex.texts
            else torch.zeros(0, dim, device=self.device)
            for ex in examples
        ]

    def forward_logits(self, examples: Sequence[Example], grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            q = self.net.embed(
                self._tokenize([ex.query for ex in examples], self.config.max_query_tokens)
            )
            return self.net.logits(q, self.option_tensors(examples, grad))

    def training_loss(self, batch: Sequence[Example]) -> torch.Tensor:
        """Cross-entropy on the LLM's choices, again with the batch's other tools as more
        options (in-batch negatives, module docstring), plus the missing-tool augmentation.

        Augmentation: a call whose chosen tool is taken out of its tool list must go back to
        the LLM (target *none*). It reuses the batch's query embeddings, so it costs no
        encoder pass, and it teaches the defer option to beat tools that are merely related,
        which is what most real no-tool calls look like.
        """
        q = self.net.embed(self._tokenize([ex.query for ex in batch], self.config.max_query_tokens))
        options = self.option_tensors(batch, True)
        logits = self.net.logits(q, options)
        targets = torch.tensor([ex.target for ex in batch], device=self.device)
        loss = F.cross_entropy(logits, targets)
        if self.config.in_batch_weight > 0 and self.task_type == "tool-call":
            wide = self.net.logits(q, in_batch_options(batch, options))
            loss = loss + self.config.in_batch_weight * F.cross_entropy(wide, targets)
        weight = self.config.missing_tool_weight
        picks = [
            i
            for i, ex in enumerate(batch)
            if weight > 0 and ex.target is not None and ex.target > 0 and len(ex.labels) >= 2
        ]
        if picks:
            reduced = [without_choice(batch[i]) for i in picks]
            aug = self.net.logits(q[picks], self.option_tensors(reduced, True))
            zeros = torch.zeros(len(picks), dtype=torch.long, device=self.device)
            loss = loss + weight * F.cross_entropy(aug, zeros) * len(picks) / len(batch)
        return loss

    def raw_logits(self, examples: Sequence[Example], batch_size: int = 32) -> list[list[float]]:
        """Unpadded logits ``[none, options...]`` per example, in eval mode."""
        was_training = self.net.training
        self.net.eval()
        out: list[list[float]] = []
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].query))
        rows: dict[int, list[float]] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = [examples[i] for i in idx]
            logits = self.forward_logits(batch).float().cpu()
            for i, ex, row in zip(idx, batch, logits, strict=True):
                rows[i] = row[: 1 + len(ex.labels)].tolist()
        out = [rows[i] for i in range(len(examples))]
        self.net.train(was_training)
        return out

    def decide(self, example: Example, logits: Sequence[float]) -> tuple[str | None, float]:
        """(label or None for *none*, calibrated confidence of that choice)."""
        if not example.labels:
            return None, 1.0
        probs = metrics.softmax(list(logits), self.temperature)
        best = max(range(len(probs)), key=lambda i: (probs[i], -i))
        label = None if best == 0 else example.labels[best - 1]
        return label, runtime.served_confidence(probs[best])

    def predict_examples(
        self, examples: Sequence[Example], batch_size: int = 32
    ) -> list[tuple[str | None, float]]:
        rows = self.raw_logits(examples, batch_size)
        return [self.decide(ex, row) for ex, row in zip(examples, rows, strict=True)]

    def predict(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[str | None, float]:
        """The label (tool name or class) and its confidence; None means hand it to the LLM.

        The caller answers only when the label is not None and the confidence is at least
        :attr:`threshold`.
        """
        ex = example_for(messages, tools, self.task_type, self.config.class_labels)
        return self.predict_examples([ex])[0]

    def accepts(self, label: str | None, confidence: float) -> bool:
        return label is not None and confidence >= self.threshold


def load_selector(
    path: str | os.PathLike[str], device: str | None = None, num_threads: int = 0
) -> Selector:
    """Load an artifact written by the finetune stage (layout in the module docstring)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    root = Path(path)
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{root / MANIFEST} is not a {FORMAT} manifest")
    known = set(SelectorConfig.__dataclass_fields__)
    config = SelectorConfig(**{k: v for k, v in manifest["config"].items() if k in known})
    base_path = (
        str(root / "base") if (root / "base").is_dir() else resolve_model_path(config.base_model)
    )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    base = AutoModel.from_pretrained(base_path, dtype=torch.float32)  # as build_net
    dim = int(getattr(base.config, "hidden_size", 0) or base.config.d_model)
    frozen = None
    if config.method == "full":
        frozen = base.eval()
        encoder: nn.Module = AutoModel.from_pretrained(str(root / "encoder"), dtype=torch.float32)
    else:
        # read beside the base, on the CPU, then moved with it: peft reads an adapter onto the
        # first GPU whenever one is visible, which gave a CPU instance a CUDA context
        encoder = PeftModel.from_pretrained(base, str(root / "adapter"), torch_device="cpu")
    net = SelectorNet(encoder, dim, frozen, config.tool_tower, config.defer_head)
    head = load_file(str(root / HEAD_FILE))
    expected = set(head_state(net))
    if set(head) != expected:
        raise ValueError(f"{root / HEAD_FILE} holds {sorted(head)}, expected {sorted(expected)}")
    net.load_state_dict(head, strict=False)
    net.to(dev).eval()
    selector = Selector(
        net,
        tokenizer,
        config,
        temperature=float(manifest["temperature"]),
        threshold=float(manifest["threshold"]),
        device=dev,
    )
    selector.manifest = manifest
    return selector


# ============================================================================ zero-shot baseline


def zero_shot_predictions(
    examples: Sequence[Example], base_model: str = "all-MiniLM-L6-v2", max_tokens: int = 128
) -> list[tuple[str | None, float]]:
    """Untuned cosine ranking: (best option, its cosine similarity) per example.

    The baseline a fine-tuned selector must beat: the same texts, the same encoder without
    an adapter or head, and a similarity threshold instead of a learned *none*.
    """
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(base_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def embed(texts: list[str], limit: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        uniq = sorted(set(texts), key=lambda t: (len(t), t))
        for i in range(0, len(uniq), 64):
            chunk = uniq[i : i + 64]
            enc = tokenizer(
                chunk, truncation=True, max_length=limit, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                hidden = model(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                ).last_hidden_state
            for t, e in zip(chunk, _mean_pool(hidden, enc["attention_mask"]), strict=True):
                out[t] = e
        return out

    queries = embed([ex.query for ex in examples], max_tokens)
    options = embed([t for ex in examples for t in ex.texts], 64)
    preds: list[tuple[str | None, float]] = []
    for ex in examples:
        if not ex.labels:
            preds.append((None, 0.0))
            continue
        sims = [float(options[t] @ queries[ex.query]) for t in ex.texts]
        best = max(range(len(sims)), key=lambda i: (sims[i], -i))
        preds.append((ex.labels[best], sims[best]))
    return preds


# ============================================================================ training


class Preempted(Exception):
    """SIGTERM arrived; the state was saved and the run can resume."""


@dataclass
class TrainOutcome:
    selector: Selector
    steps: int
    resumed_from: int
    losses: list[float]
    train_seconds: float
    trainable_parameters: int
    parameters: int
    #: What the result's message must say about how the threshold came out.
    notes: list[str] = field(default_factory=list)


def fingerprint(config: SelectorConfig, data_digest: str) -> str:
    doc = {"config": asdict(config), "data": data_digest, "code": CODE_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(
    path: Path,
    net: SelectorNet,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    fp: str,
    losses: list[float],
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "fingerprint": fp,
        "step": step,
        "trainable": {
            n: p.detach().cpu().clone() for n, p in net.named_parameters() if p.requires_grad
        },
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        # dropout on a GPU draws from the CUDA generator: without it a resumed run diverges
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "losses": losses,
    }
    save_atomically(state, path / CHECKPOINT)


def _load_checkpoint(path: Path, fp: str, emit: Emit | None = None) -> dict[str, Any] | None:
    """The state to resume from, or None: none saved, another run's, or unreadable (a torn
    or foreign file is set aside with a warning, and the run starts over)."""
    state = _load_saved(path / CHECKPOINT, emit, weights_only=False)
    return state if state is not None and state.get("fingerprint") == fp else None


def _load_saved(file: Path, emit: Emit | None, **load_kwargs: Any) -> dict[str, Any] | None:
    """What ``file`` holds when it is a readable dict; otherwise None, the file set aside
    (:func:`slm_trainer.preemption.load_or_set_aside`) and a warning emitted."""
    state, problem = load_or_set_aside(file, **load_kwargs)
    if problem is None and state is not None and not isinstance(state, dict):
        problem = f"unexpected checkpoint content in {file}"
        state = None
    if problem is not None and emit is not None:
        emit({"event": "warning", "stage": "finetune", "message": f"{problem}; starting over"})
    return state


class NoTrainableExamples(ValueError):
    """No training call can teach a selector: none offers options (tools, or the task's
    labels) with an answer among them. The data decides it, so a rerun gives the same
    answer: :func:`run_selector` reports it instead of crashing."""


def trainable_count(examples: Sequence[Example]) -> tuple[int, int, int]:
    """(trainable, without options, answer not among options) of ``examples``: what the
    selector could learn from, and why the others teach nothing."""
    no_options = sum(1 for ex in examples if not ex.labels)
    unknown = sum(1 for ex in examples if ex.labels and ex.target is None)
    return len(examples) - no_options - unknown, no_options, unknown


def _untrainable_message(examples: Sequence[Example], task_type: str, where: Path) -> str:
    """The result's message for data a selector cannot learn from, with the counts and the
    fix: the operator copies it into the candidate's condition."""
    trainable, no_options, unknown = trainable_count(examples)
    if trainable:
        return (
            f"no trainable examples in {where}: all {trainable} calls a selector could learn "
            "from were held out for calibration; add calls or lower calibration_fraction"
        )
    options = "tools" if task_type == "tool-call" else "labels"
    return (
        f"no trainable examples in {where}: of {len(examples)} training calls, "
        f"{no_options} offer no {options} to choose from and {unknown} answer with one not "
        f"among their {options}; a selector learns to pick one of a call's {options} (or "
        "defer), so it needs calls that list them"
        + (
            ": for answers without tools, train a causal LM candidate (path generative)"
            if task_type == "tool-call"
            else ""
        )
    )


def train_selector(
    config: SelectorConfig,
    train_examples: Sequence[Example],
    checkpoint_dir: Path | None,
    data_digest: str,
    emit: Emit | None = None,
    checkpoint_every: int = 50,
    step_hook: Callable[[int], None] | None = None,
    device: torch.device | None = None,
    progress_fields: Mapping[str, Any] | None = None,
    progress_offset: int = 0,
    progress_total: int | None = None,
) -> TrainOutcome:
    """Fit, checkpoint, calibrate. Raises :class:`Preempted` after saving on SIGTERM.

    ``progress_offset`` and ``progress_total`` place this training in a longer run
    (:func:`train_crossfit`), so the reported percent is of the whole run."""
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
    net, tokenizer = build_net(config, dev)
    selector = Selector(net, tokenizer, config, device=dev)
    fit, calib = _fit_and_calibration(config, train_examples)
    if not fit:
        raise NoTrainableExamples(
            "no trainable examples: every call lacks options or a known label"
        )
    lengths = [
        len(tokenizer(ex.query, truncation=True, max_length=config.max_query_tokens)["input_ids"])
        for ex in fit
    ]
    per_epoch = math.ceil(len(fit) / config.batch_size)
    total = planned_steps(config, len(fit))
    warmup = int(config.warmup_fraction * total)

    head_params = [
        p for n, p in net.named_parameters() if not n.startswith(("encoder.", "frozen_options."))
    ]
    enc_params = [p for p in net.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": enc_params, "lr": config.learning_rate},
            {"params": head_params, "lr": config.head_learning_rate, "weight_decay": 0.0},
        ],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    fp = fingerprint(config, data_digest)
    start = 0
    losses: list[float] = []
    if checkpoint_dir is not None:
        state = _load_checkpoint(checkpoint_dir, fp, emit)
        if state is not None:
            named = dict(net.named_parameters())
            with torch.no_grad():
                for name, tensor in state["trainable"].items():
                    named[name].copy_(tensor.to(dev))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            start = int(state["step"])
            losses = list(state["losses"])
            _progress(emit, progress_fields, phase="resume", step=start, total_steps=total)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    parameters = sum(p.numel() for p in net.encoder.parameters()) + sum(
        p.numel() for p in head_params
    )

    # The frozen tower's embeddings of every option the data shows, once.
    if config.tool_tower != "shared":
        net.eval()
        options = {t for ex in train_examples for t in ex.texts}
        # all of them stay cached: one recomputed in train mode would differ (dropout)
        selector.cache_size = max(selector.cache_size, len(options))
        selector.base_option_embeddings(options)
    net.train()
    log_every = max(1, min(10, total // 20))
    step = start
    candidate = str((progress_fields or {}).get("candidate", ""))
    # the other fields (the fold of a cross-fitted run) go on every progress line
    line_fields = {k: v for k, v in (progress_fields or {}).items() if k != "candidate"}
    progress = Progress(
        emit or (lambda e: None),
        candidate,
        total,
        start_step=start,
        offset=progress_offset,
        overall_total=progress_total,
    )
    if start > 0:  # a resumed pod says where it stands before its next step (or calibration)
        progress.update(start, losses[-1] if losses else None, **line_fields)
    try:
        with SigtermFlag() as sigterm:
            while step < total:
                epoch, pos = divmod(step, per_epoch)
                order = batch_order(lengths, config.batch_size, config.seed, epoch)
                batch = [fit[i] for i in order[pos]]
                loss = selector.training_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], 1.0
                )
                optimizer.step()
                scheduler.step()
                losses.append(round(float(loss.detach()), 6))
                step += 1
                if step % log_every == 0 or step == total:
                    recent = losses[-log_every:]
                    progress.update(step, sum(recent) / len(recent), epoch=epoch + 1, **line_fields)
                if step_hook is not None:
                    step_hook(step)
                if checkpoint_dir is not None and (
                    sigterm.received or step % checkpoint_every == 0 or step == total
                ):
                    _save_checkpoint(checkpoint_dir, net, optimizer, scheduler, step, fp, losses)
                if sigterm.received and step < total:
                    raise Preempted(f"preempted by SIGTERM at step {step}/{total}")
    finally:
        progress.close()
    net.eval()

    # Calibration on held-out training calls: temperature, then the serving threshold.
    notes: list[str] = []
    if calib:
        calibrate(selector, calib, selector.raw_logits(calib), config.target_precision)
    else:
        notes.append(_refuse_uncalibrated(selector))
    return TrainOutcome(
        selector=selector,
        steps=total,
        resumed_from=start,
        losses=losses,
        train_seconds=round(time.monotonic() - started, 3),
        trainable_parameters=trainable,
        parameters=parameters,
        notes=notes,
    )


def _fit_and_calibration(
    config: SelectorConfig, examples: Sequence[Example]
) -> tuple[list[Example], list[Example]]:
    """The calls :func:`train_selector` trains on (those with options) and calibrates on."""
    fit_idx, calib_idx = calibration_split(examples, config.calibration_fraction, config.seed)
    return [examples[i] for i in fit_idx if examples[i].labels], [examples[i] for i in calib_idx]


def planned_steps(config: SelectorConfig, n_fit: int) -> int:
    """Optimizer steps of a training on ``n_fit`` calls: epochs of batches, capped by
    ``max_steps``."""
    total = config.epochs * math.ceil(n_fit / config.batch_size)
    return min(total, config.max_steps) if config.max_steps > 0 else total


#: The result's note when no call calibrated the threshold.
UNCALIBRATED_NOTE = (
    "no calibration calls (too few training calls per stratum for calibration_fraction, or "
    "none scored out of fold): threshold 1.0, it answers nothing; add calls or raise "
    "calibration_fraction / use calibration_folds"
)


def _refuse_uncalibrated(selector: Selector) -> str:
    """With no call to calibrate on, answer nothing (threshold 1.0, as when no threshold
    reaches the target) rather than serve at an arbitrary 0.5, whose precision nobody
    measured; returns the note the result's message carries."""
    selector.temperature, selector.threshold = 1.0, 1.0
    return UNCALIBRATED_NOTE


def calibrate(
    selector: Selector,
    calib: Sequence[Example],
    rows: Sequence[Sequence[float]],
    target_precision: float,
) -> None:
    """Set the selector's temperature (NLL on ``rows``, logits of calls it did not train on)
    and then its threshold: the lowest at which those calls reach ``target_precision``."""
    usable = [
        (r, ex.target)
        for r, ex in zip(rows, calib, strict=True)
        if len(r) > 1 and ex.target is not None
    ]
    selector.temperature = metrics.fit_temperature(
        [list(r) for r, _ in usable], [int(t or 0) for _, t in usable]
    )
    preds = [selector.decide(ex, r) for ex, r in zip(calib, rows, strict=True)]
    curve = metrics.coverage_curve(
        [p[0] for p in preds], [p[1] for p in preds], [ex.ref_label for ex in calib]
    )
    chosen = metrics.pick_threshold(curve, target_precision)
    selector.threshold = chosen.threshold if chosen is not None else 1.0


def crossfit_folds(examples: Sequence[Example], k: int, seed: int) -> list[int]:
    """Fold of each example (-1: no known label, never calibrated on), stratified like
    :func:`calibration_split`: within "tool" and "deferred", seeded hash order, dealt out.
    Calls with the same selector input share the fold of the first of them
    (:func:`_same_input_alike`), so no fold model has trained on a twin of a call it scores."""
    strata = _ranked_strata(examples, seed)
    fold = [-1] * len(examples)
    for ranked in strata:
        for j, i in enumerate(ranked):
            fold[i] = j % k
    return list(_same_input_alike(examples, strata, fold))


def train_crossfit(
    config: SelectorConfig,
    train_examples: Sequence[Example],
    checkpoint_dir: Path | None,
    data_digest: str,
    emit: Emit | None = None,
    checkpoint_every: int = 50,
    step_hook: Callable[[int], None] | None = None,
    progress_fields: Mapping[str, Any] | None = None,
) -> TrainOutcome:
    """Train on every call, and calibrate on out-of-fold logits of ``calibration_folds`` more.

    Why: a held-out calibration split is a few hundred calls, and a 97 % precision point
    estimated on that many moves by a few points between training seeds (README, "Tool
    selection"). Here each of K fold models trains on the other K-1 folds and scores its own,
    so every training call is scored by a model that did not see it; the threshold is picked
    on all of them and applied to the final model, trained on every call. Each fold resumes
    from its own checkpoints, and a finished fold's logits are kept, so preemption costs at
    most the fold in progress.

    Progress is one 0-100 % over the K+1 trainings (each line names its ``fold``). SIGTERM
    stops the run at the next fold boundary too: a fold's own loop raises :class:`Preempted`
    only when the signal comes before its last step, and one during that step let the next
    fold train on until the grace period ran out (SIGKILL, the step's work lost). One that
    comes while a fold is set up (its encoder loaded, its calls tokenised), taken by the
    ``with`` below, stops that fold after its first step: the fold's own flag starts raised
    (:class:`slm_trainer.preemption.SigtermFlag`).
    """
    k = config.calibration_folds
    base = replace(config, calibration_fraction=0.0, calibration_folds=0)
    fold_of = crossfit_folds(train_examples, k, config.seed)
    fields = dict(progress_fields or {})
    parts = [[ex for i, ex in enumerate(train_examples) if fold_of[i] != f] for f in range(k)]
    # A fold that holds no call has nothing to score, and one whose other folds hold nothing
    # to fit on (all calls one input) cannot be scored: neither is trained, and the calls of
    # the second stay out of calibration.
    steps = [
        planned_steps(base, len(_fit_and_calibration(base, p)[0])) if f in fold_of else 0
        for f, p in enumerate(parts)
    ]
    steps.append(planned_steps(base, len(_fit_and_calibration(base, train_examples)[0])))
    overall = sum(steps)
    sigterms = preemption.sigterm_count()
    rows: dict[int, list[float]] = {}
    spent = 0.0
    with SigtermFlag():  # a SIGTERM between two trainings is caught too, and ends the run
        for f in range(k):
            digest = f"{data_digest}:fold{f}/{k}"
            fp = fingerprint(base, digest)
            cache = checkpoint_dir / f"fold{f}-logits.pt" if checkpoint_dir else None
            held = [i for i, g in enumerate(fold_of) if g == f]
            saved = (_load_saved(cache, emit, weights_only=True) if cache else None) or {}
            if saved.get("fingerprint") == fp:
                rows.update(saved["rows"])
                continue
            if not steps[f]:
                continue
            out = train_selector(
                base,
                parts[f],
                checkpoint_dir / f"fold{f}" if checkpoint_dir else None,
                digest,
                emit=emit,
                checkpoint_every=checkpoint_every,
                step_hook=step_hook,
                progress_fields={**fields, "fold": f"{f + 1}/{k}"},
                progress_offset=sum(steps[:f]),
                progress_total=overall,
            )
            spent += out.train_seconds
            got = out.selector.raw_logits([train_examples[i] for i in held])
            rows.update(zip(held, got, strict=True))
            if cache is not None:
                done = {"fingerprint": fp, "rows": dict(zip(held, got, strict=True))}
                save_atomically(done, cache)
            del out
            if preemption.sigterm_count() > sigterms:
                raise Preempted(f"preempted by SIGTERM after fold {f + 1}/{k}")
        if preemption.sigterm_count() > sigterms:
            raise Preempted(f"preempted by SIGTERM before the final model ({k} folds done)")
        final = train_selector(
            base,
            train_examples,
            checkpoint_dir / "final" if checkpoint_dir else None,
            data_digest,
            emit=emit,
            checkpoint_every=checkpoint_every,
            step_hook=step_hook,
            progress_fields={**fields, "fold": "final"},
            progress_offset=sum(steps[:k]),
            progress_total=overall,
        )
    order = sorted(rows)
    final.selector.config = config
    if order:
        final.notes = []
        calibrate(
            final.selector,
            [train_examples[i] for i in order],
            [rows[i] for i in order],
            config.target_precision,
        )
    else:
        final.notes = [_refuse_uncalibrated(final.selector)]
    final.train_seconds = round(final.train_seconds + spent, 3)
    return final


def _progress(emit: Emit | None, extra: Mapping[str, Any] | None, **event: Any) -> None:
    if emit is not None:
        emit({"event": "progress", "stage": "finetune", **(extra or {}), **event})


# ============================================================================ artifact


#: What the bundled base leaves out: other runtimes' exports and the hub's notes.
NOT_BUNDLED = ("*.onnx", "*.h5", "*.msgpack", "onnx", "openvino", "README.md", ".gitattributes")


def _bundle_ignore(base: Path) -> Callable[[Any, list[str]], set[str]]:
    """``copytree``'s ignore for bundling ``base``: :data:`NOT_BUNDLED`, and PyTorch ``.bin``
    files only when safetensors weights are there.

    Why not always: transformers loads ``model.safetensors`` first, so a ``.bin`` beside it
    is a second copy of the weights; but a base that has only ``pytorch_model.bin`` (a valid
    base model for the stage) was bundled without weights, and the artifact that passed the
    gate failed to load in Triton.
    """
    patterns = [*NOT_BUNDLED, "*.bin"] if any(base.glob("*.safetensors")) else [*NOT_BUNDLED]
    return shutil.ignore_patterns(*patterns)


def save_selector(
    selector: Selector,
    output: Path,
    extra_manifest: Mapping[str, Any],
    bundle_base: bool = True,
) -> dict[str, Any]:
    """Write the artifact (layout in the module docstring); returns the manifest."""
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    config = selector.config
    net = selector.net
    files = [MANIFEST, HEAD_FILE]
    if config.method == "full":
        net.encoder.save_pretrained(str(output / "encoder"))
        files.append("encoder/")
    else:
        net.encoder.save_pretrained(str(output / "adapter"))
        files.append("adapter/")
    base_path = resolve_model_path(config.base_model)
    if bundle_base and Path(base_path).is_dir():
        target = output / "base"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(base_path, target, ignore=_bundle_ignore(Path(base_path)))
        files.append("base/")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in head_state(net).items()},
        str(output / HEAD_FILE),
    )
    manifest = {
        "format": FORMAT,
        "kind": "selector",
        "task_type": config.task_type,
        "base_model": config.base_model,
        "method": config.method,
        "tool_tower": config.tool_tower,
        "temperature": selector.temperature,
        "threshold": selector.threshold,
        "target_precision": config.target_precision,
        "labels": list(config.class_labels),
        "config": asdict(config),
        "files": files,
        **dict(extra_manifest),
    }
    tmp = output / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(finite(manifest), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, output / MANIFEST)
    selector.manifest = manifest
    return manifest


# ============================================================================ the finetune path


def read_records(path: Path, stats: ParseStats | None = None) -> list[CallRecord]:
    """Call records of one split; a malformed or non-UTF-8 line is skipped and counted in
    ``stats`` (:func:`slm_trainer.curate.read_split`), not a crash of the whole Job."""
    return read_split(path, stats if stats is not None else ParseStats())


def data_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _measured(
    at: Mapping[str, Any], examples: Sequence[Example], task_type: str, threshold: float
) -> str:
    """What a result's message says of the eval split, each figure only where its calls
    exist: a percentage of no calls (a precision of 100 % when none was answered, 100 % of
    no-tool calls deferred when the eval split held none) read as measured."""
    precision = f"precision {at['precision']:.1%}" if at["accepted"] else "no call answered"
    return (
        f"answers {at['coverage']:.1%} of eval calls{_relevant_note(at, examples, task_type)}; "
        f"{precision} at threshold {threshold:.3f}"
    )


def _relevant_note(at: Mapping[str, Any], examples: Sequence[Example], task_type: str) -> str:
    """The tool-call figures of :func:`_measured`."""
    if task_type != "tool-call":
        return ""
    n_relevant = sum(1 for ex in examples if ex.ref_label is not None)
    parts = []
    if n_relevant:
        parts.append(f"{at['relevant_coverage']:.1%} of calls that need a tool")
    if len(examples) > n_relevant:
        parts.append(f"{at['irrelevant_deferral']:.1%} of no-tool calls deferred")
    else:
        parts.append("no no-tool calls in the eval split")
    return ", " + ", ".join(parts)


def evaluate_predictions(
    examples: Sequence[Example],
    preds: Sequence[tuple[str | None, float]],
    threshold: float,
    target_precision: float,
) -> dict[str, Any]:
    """The finetune stage's own evaluation of its candidate on the eval split."""
    labels = [p[0] for p in preds]
    conf = [p[1] for p in preds]
    refs = [ex.ref_label for ex in examples]
    at = metrics.selective_point(labels, conf, refs, threshold)
    curve = metrics.coverage_curve(labels, conf, refs)
    best = metrics.pick_threshold(curve, target_precision)
    relevant = [i for i, r in enumerate(refs) if r is not None]
    return {
        "examples": len(examples),
        "decision_accuracy": round(
            sum(1 for p, r in zip(labels, refs, strict=True) if p == r) / max(1, len(refs)), 6
        ),
        "top1_relevant": round(
            sum(1 for i in relevant if labels[i] == refs[i]) / max(1, len(relevant)), 6
        ),
        "at_threshold": asdict(at),
        "oracle_threshold_on_eval": asdict(best) if best else None,
        # Of the choice, a tool or *defer*. (Counting a right deferral as wrong reported an
        # ECE of 0.28 on BFCL for a selector calibrated to within 0.02.)
        "ece": round(metrics.choice_calibration_error(labels, conf, refs), 6),
        "curve": metrics.curve_as_dicts(curve),
    }


def served_point(
    records: Sequence[CallRecord],
    preds: Sequence[tuple[str | None, float]],
    threshold: float,
    task_type: str,
    metric: str,
) -> dict[str, Any]:
    """The selective-prediction figures at ``threshold`` of the answers the selector serves
    (:func:`chatformat.selector_answer`: a tool call's arguments are ``{}``), each judged by
    ``metric`` against the LLM's full answer."""
    labels = [p[0] for p in preds]
    correct = [
        metrics.answer_correct(
            metric, chatformat.selector_answer(lab, conf, task_type), r.response, r.tools, task_type
        )
        for (lab, conf), r in zip(preds, records, strict=True)
    ]
    refs = [metrics.label_of(r.response, task_type) for r in records]
    point = metrics.selective_point(labels, [p[1] for p in preds], refs, threshold, correct)
    return asdict(point)


def selector_score(point: Mapping[str, Any]) -> float:
    """The gate's score for a selector: precision on the calls it answers, 0 if it answers none
    (:func:`slm_trainer.metrics.gate_score`, shared with generative candidates so that the
    operator compares like with like)."""
    return metrics.gate_score(point)


def run_selector(
    args: Any, emit: Emit, step_hook: Callable[[int], None] | None = None
) -> TrainerResult:
    """The finetune stage for encoder candidates (args: slm_trainer.finetune.Args)."""
    num_threads = int(getattr(args, "num_threads", 0) or 0)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if args.method == "qlora" and not torch.cuda.is_available():
        return TrainerResult(
            stage="finetune",
            ok=False,
            candidate=args.candidate,
            message="method qlora needs a GPU (bitsandbytes 4-bit); none is visible. "
            "Use method lora or full on CPU.",
        )
    train_path, eval_path = Path(args.data) / "train.jsonl", Path(args.data) / "eval.jsonl"
    stats = ParseStats()
    train_records, eval_records = read_records(train_path, stats), read_records(eval_path, stats)
    # said in the result's message too: the operator shows it, the log may be gone
    malformed_note = stats.skipped_note("line", where=True)
    if malformed_note:
        emit(
            {
                "event": "warning",
                "stage": "finetune",
                "candidate": args.candidate,
                "message": f"data in {args.data}{malformed_note}",
                "error_samples": stats.errors,
            }
        )
    if not train_records:
        return TrainerResult(
            stage="finetune",
            ok=False,
            candidate=args.candidate,
            message=f"no training records in {train_path}{malformed_note}",
        )
    task_type = "classification" if args.task_type == "classification" else "tool-call"
    class_labels = class_labels_of(train_records) if task_type == "classification" else []
    label_texts = class_label_texts(train_records) if task_type == "classification" else {}
    config = SelectorConfig(
        base_model=args.model,
        task_type=task_type,
        method="full" if args.method == "full" else "lora",
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        head_learning_rate=args.head_learning_rate,
        batch_size=args.batch_size or 16,
        max_query_tokens=min(args.max_seq_length, args.selector_max_tokens),
        max_option_tokens=min(args.max_seq_length, 64),
        tool_tower=args.tool_tower,
        seed=args.seed,
        max_steps=args.max_steps,
        calibration_fraction=args.calibration_fraction,
        calibration_folds=args.calibration_folds,
        target_precision=args.target_precision,
        missing_tool_weight=args.missing_tool_weight if task_type == "tool-call" else 0.0,
        in_batch_weight=args.in_batch_weight if task_type == "tool-call" else 0.0,
        defer_head=args.defer_head,
        class_labels=class_labels,
        label_texts=label_texts,
    )
    train_ex = examples_from_records(train_records, task_type, class_labels)
    eval_ex = examples_from_records(eval_records, task_type, class_labels)
    untrainable = TrainerResult(
        stage="finetune",
        ok=False,
        candidate=args.candidate,
        message=_untrainable_message(train_ex, task_type, train_path) + malformed_note,
    )
    if trainable_count(train_ex)[0] == 0:
        return untrainable  # said before the model is loaded: there is nothing to train it on
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    fields = {"candidate": args.candidate}
    try:
        outcome = (train_crossfit if config.calibration_folds >= 2 else train_selector)(
            config,
            train_ex,
            checkpoint_dir,
            data_digest(train_path),
            emit=emit,
            checkpoint_every=args.checkpoint_every,
            step_hook=step_hook,
            progress_fields=fields,
        )
    except Preempted as exc:
        _progress(emit, fields, phase="preempted", message=str(exc))
        return TrainerResult(
            stage="finetune",
            ok=False,
            candidate=args.candidate,
            # in the generative path's words, which the operator cuts from a Job it reports
            # failed past its deadline (nothing reruns that one)
            message=f"{exc}; {RERUN_TO_RESUME}",
        )
    except NoTrainableExamples:  # every trainable call went to calibration
        return untrainable
    except BaseModelNotFound as exc:
        return TrainerResult(stage="finetune", ok=False, candidate=args.candidate, message=str(exc))
    selector = outcome.selector

    eval_started = time.monotonic()
    preds = selector.predict_examples(eval_ex) if eval_ex else []
    latencies = _single_call_latencies(selector, eval_ex[: args.latency_samples])
    eval_seconds = round(time.monotonic() - eval_started, 3)
    report = evaluate_predictions(eval_ex, preds, selector.threshold, config.target_precision)
    report["latency_ms"] = metrics.latency_summary(latencies)
    at = report["at_threshold"]
    # No eval call, no measured score: None (as the generative path reports it), never a 0.0
    # or percentages the message would claim were measured.
    score: float | None = selector_score(at) if eval_ex else None
    served_note = ""
    if eval_ex and args.metric != "label-accuracy":
        # The gate's score is that of the answer served: the chosen tool with "{}" arguments.
        served = served_point(eval_records, preds, selector.threshold, task_type, args.metric)
        report["at_threshold_served"] = served
        score = selector_score(served)
        answer, short, chosen = (
            ("the chosen tool with '{}' arguments", "tool need arguments", "tool choice")
            if task_type == "tool-call"
            else ("the chosen label's text", "label differ from the LLM's text", "the label chosen")
        )
        served_note = (
            f"; score {score:.1%} is the {args.metric} precision of the answers it serves, "
            f"{answer}"
            + (
                f" ({at['correct'] - served['correct']} answered calls with the right {short}; "
                f"gate selectors on label-accuracy to score {chosen})"
                if at["correct"] > served["correct"]
                else ""
            )
        )

    output = Path(args.output)
    manifest = save_selector(
        selector,
        output,
        {
            "candidate": args.candidate,
            "metric": args.metric,  # what "score" measures
            "parameters": outcome.parameters,
            "trainable_parameters": outcome.trainable_parameters,
            "train_examples": len(train_ex),
            "eval": {k: v for k, v in report.items() if k != "curve"},
            "score": score,
            "steps": outcome.steps,
            "final_loss": outcome.losses[-1] if outcome.losses else None,
        },
        bundle_base=args.bundle_base,
    )
    _write_predictions(output / PREDICTIONS, eval_ex, preds, selector.threshold)
    (output / "eval_report.json").write_text(json.dumps(finite(report), indent=2) + "\n")
    del manifest
    measured = (
        _measured(at, eval_ex, task_type, selector.threshold) + served_note
        if eval_ex
        else f"no eval calls in {eval_path}, no score; threshold {selector.threshold:.3f}"
    )
    return TrainerResult(
        stage="finetune",
        ok=True,
        candidate=args.candidate,
        score=None if score is None else round(score, 6),
        llm_score=1.0,
        parameters=outcome.parameters,
        trainable_parameters=outcome.trainable_parameters,
        artifact_uri=args.artifact_uri or output.resolve().as_uri(),
        threshold=min(1.0, max(0.0, selector.threshold)),  # exact: see served_confidence
        examples=len(train_ex) + len(eval_ex),
        train_examples=len(train_ex),
        eval_examples=len(eval_ex),
        train_seconds=outcome.train_seconds,
        eval_seconds=eval_seconds,
        message=(
            f"selector {config.method} on {config.base_model}: {measured}; llm_score 1.0 "
            "because the references are the LLM's own answers"
            + (f"; resumed at step {outcome.resumed_from}" if outcome.resumed_from else "")
            + "".join(f"; {note}" for note in outcome.notes)
            + malformed_note
        ),
    )


def _single_call_latencies(selector: Selector, examples: Sequence[Example]) -> list[float]:
    """Milliseconds per call at batch size 1 (the gateway's case), tool cache warm."""
    out = []
    for ex in examples:
        t0 = time.perf_counter()
        selector.predict_examples([ex], batch_size=1)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _write_predictions(
    path: Path,
    examples: Sequence[Example],
    preds: Sequence[tuple[str | None, float]],
    threshold: float,
) -> None:
    """One line per eval call, in eval.jsonl order: what the evaluate stage re-scores."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i, (ex, (label, conf)) in enumerate(zip(examples, preds, strict=True)):
            fh.write(
                json.dumps(
                    {
                        "index": i,
                        "key": ex.key,
                        "request_id": ex.request_id,
                        "label": label,
                        "confidence": conf,
                        "accepted": label is not None and conf >= threshold,
                    }
                )
                + "\n"
            )
    os.replace(tmp, path)
