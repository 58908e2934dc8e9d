"""Loading a fine-tuned causal LM and answering with a confidence: shared by eval and serving.

Why shared: the confidence the gateway compares with the AgentTask's threshold is computed
here, and the threshold was chosen on the held-out split from confidences computed by the
trainer's evaluation. Both must be the same function of the same model, so the export stage
copies this file next to ``model.py`` and the trainer imports it from its package. It must not
import anything from ``slm_trainer``; torch, transformers and peft are imported lazily.

The confidence of a generated answer is the mean probability the model gave to each token it
chose (greedy decoding, neutral whatever the base model's ``generation_config`` asks:
:func:`greedy_settings`), end-of-sequence token included: low when the model hesitated anywhere
in the answer, e.g. on a tool name or an argument value. An answer cut at ``max_new_tokens``
(or at the request's own limit, in serving) gets 0: it is incomplete, and a model stuck
repeating itself is sure of every token.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The largest FP32 value below 1.0: the highest confidence ever served.
BELOW_ONE = struct.unpack("f", struct.pack("I", 0x3F7FFFFF))[0]


def served_confidence(value: float) -> float:
    """``value`` as the Triton backend sends it: a 32-bit float (its CONFIDENCE output is FP32).

    Why: the gateway answers a call only when this confidence is >= the task's threshold,
    and the threshold is picked among the confidences of the held-out calls. Computed in
    64 bits there and sent in 32 here, a confidence could land just below the very threshold
    that was picked on it (0.9999996 becomes 0.99999958), and calls the evaluation counted
    as answered would go to the LLM. Rounding at the source gives both sides the same
    rounding. (The value itself may still move in its last digits with which calls share a
    padded batch, in evaluation and in serving alike: a call exactly at the threshold can
    land on either side of it.) It stays below 1.0, the threshold of a candidate that must
    answer nothing: a model sure to the last bit would otherwise be served there.
    """
    return min(struct.unpack("f", struct.pack("f", value))[0], BELOW_ONE)


#: The finish reason of a prompt that was not run: with the answer's budget it would not fit
#: the model's context.
TOO_LONG = "too_long"


@dataclass(frozen=True)
class Answer:
    text: str
    confidence: float
    # "stop" (end-of-sequence generated), "length" (cut at max tokens) or TOO_LONG (not run)
    finish_reason: str
    tokens: int  # the answer's tokens, the end-of-sequence token not counted


def pick_device(kind: str = "AUTO", device_id: int = 0) -> str:
    """Triton's instance kind to a torch device: GPU instances use their GPU, AUTO/MODEL any."""
    import torch

    if kind.upper() == "CPU" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{device_id}"


def serving_dtype(device: str, bf16_native: bool | None = None) -> Any:
    """fp32 on CPU; on a GPU bf16 where it computes bf16 natively (compute capability 8.0 and
    newer), else fp16: T4 and V100 report bf16 support only through slow emulation, which
    ``torch.cuda.is_bf16_supported()`` counts unless told not to. The trainer evaluates in
    the same precision (``generative.compute_dtype``)."""
    import torch

    if not device.startswith("cuda"):
        return torch.float32
    if bf16_native is None:
        bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_native else torch.float16


#: The precisions a candidate's evaluation may have run in, by the name its manifest records
#: (``eval_dtype``) and ``config.pbtxt`` passes on.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` as the manifest records it: ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_named(name: str | None) -> Any:
    """The torch dtype a manifest's ``eval_dtype`` names, or None for a name not in
    :data:`DTYPE_NAMES` (no record, an edited ``config.pbtxt``)."""
    import torch

    return getattr(torch, name) if name in DTYPE_NAMES else None


def recorded_dtype(
    recorded: str | None, device: str, bf16_native: bool | None = None
) -> tuple[Any, str | None]:
    """(the dtype to serve in on ``device``, a warning or None) for a candidate evaluated in
    the ``recorded`` precision.

    Why: the threshold was picked on confidences the trainer computed in its own device's
    precision (bf16 on an Ampere GPU), and the same model in fp32 (a CPU pod) gives other
    confidences, enough to move calls across the threshold. So serving uses the recorded
    one wherever the device computes it: fp32 and fp16 anywhere, bf16 on a CPU (torch runs
    it there) and on a GPU that computes it natively (emulated bf16 on a T4 or V100 is too
    slow to serve, as :func:`serving_dtype` says). Otherwise :func:`serving_dtype`, with a
    warning that the served confidences may differ from the evaluated ones. No record (a
    candidate exported before it was kept) also means :func:`serving_dtype`, without warning:
    what such repositories were always served in.
    """
    fallback = serving_dtype(device, bf16_native)
    if not recorded:
        return fallback, None
    dtype = dtype_named(recorded)
    if dtype is None:
        why = f"unknown evaluation dtype {recorded!r} (expected one of {', '.join(DTYPE_NAMES)})"
    elif recorded == "bfloat16" and device.startswith("cuda") and fallback is not dtype:
        why = f"the candidate was evaluated in bfloat16, which {device} does not compute natively"
    else:
        return dtype, None
    return fallback, (
        f"{why}: serving in {dtype_name(fallback)}; confidences may differ from the evaluated "
        "ones, and calls near the threshold may be answered or deferred otherwise"
    )


def placement(device: str) -> dict[str, Any]:
    """``from_pretrained``'s placement for ``device``: on a GPU the weights go onto it as they
    are read, and the adapter merges there. Loaded on the host first, a 1.5B model in bf16
    needs 3 GB more of the Triton pod's (or trainer's) memory than the process otherwise
    does, and the merge runs as slow host matrix products. Nothing on the CPU, the default."""
    return {"device_map": {"": device}} if device.startswith("cuda") else {}


def missing_base(base: str, named_by: str) -> str | None:
    """Why the base model ``base`` cannot be read (None when it may be): an absolute path that
    is no directory. ``named_by`` names what gave it (the ``base_model`` parameter, as
    ``config.pbtxt`` writes it, or the adapter's own ``base_model_name_or_path``).

    Why: transformers reads a name that is no local directory as a hub id, and an absolute
    path failed with "Repo id must be in the form 'repo_name' or 'namespace/repo_name'",
    which says nothing of the volume the base model was meant to be on not being mounted.
    """
    if not os.path.isabs(base) or os.path.isdir(base):
        return None
    return (
        f"{named_by} {base!r} is not a directory: the volume holding the base model must be "
        "mounted at that path where the model loads"
    )


def load_model(
    model_dir: str | os.PathLike[str],
    base_model: str | None = None,
    device: str = "cpu",
    dtype: Any = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a candidate artifact: merged weights, or base + LoRA adapter.

    ``model_dir`` holds the tokenizer and either full weights or ``adapter_config.json``; for
    an adapter the base comes from ``base_model`` (a local path or hub id), else from the
    adapter's own ``base_model_name_or_path``; an absolute path there that is no directory
    raises FileNotFoundError (:func:`missing_base`). Weights in ``dtype`` (the adapter merged
    in it), by default :func:`serving_dtype`, placed on a GPU as they are read
    (:func:`placement`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if dtype is None:
        dtype = serving_dtype(device)
    kwargs = {"dtype": dtype, **placement(device)}
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base = base_model or json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        named_by = "parameter base_model" if base_model else "the adapter's base_model_name_or_path"
        missing = missing_base(base, named_by)
        if missing:
            raise FileNotFoundError(missing)
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        # peft reads the adapter onto the first GPU whenever one is visible, unless told
        model = PeftModel.from_pretrained(model, str(path), torch_device=device)
        model = model.merge_and_unload()  # serving needs no LoRA indirection per layer
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.to(device)
    model.eval()
    model.config.use_cache = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    limits: Sequence[int | None] | None = None,
) -> list[Answer]:
    """Greedy answers for rendered prompts, batched by length, in the order given.

    ``limits`` (serving) holds each prompt's own token limit, the request's ``max_tokens``
    (None: none): its answer has at most the smaller of that and ``max_new_tokens`` tokens,
    and one cut there says ``length`` with confidence 0 as one cut at ``max_new_tokens``
    does. A limit below ``max_new_tokens`` is generated one token past: an answer is cut
    only when it reached the limit and that next token is not the end of the sequence. Why:
    the end token is no answer token (the LLM counts none), and with the limit as the whole
    budget a complete answer of exactly ``max_tokens`` tokens had no room for it, came back
    ``length`` and went to the LLM (a one-token label under ``max_tokens: 1`` never served).
    Why per prompt: requests with different limits share a padded batch, which runs to the
    largest of their budgets; each answer is then cut at its own. Greedy decoding writes a
    row's tokens whatever the batch runs on for, so the cut answer is the one a generation
    stopped at that limit writes. Evaluation passes none. ``tokens`` counts the answer's
    tokens, the end token not included (what the gateway serves as the usage).

    A prompt that, with its budget more, would not fit the model's context
    (:func:`context_limit`) is not run: its answer is empty, with confidence 0 and finish
    reason :data:`TOO_LONG`, so the call goes back to the LLM. Why not run it anyway: a model
    with learned positions (GPT-2's kind) indexes past its position table, which on a GPU is
    a device-side assert that breaks every later request of the Triton instance, and a rotary
    one answers from positions it never trained on, or runs out of memory on a prompt the
    size of a document. Checked against the whole budget, as a shorter answer is not known
    in advance. A batch runs for the longest run of its rows, so rows that fit alone but not
    together are split into batches that fit (:func:`batches`), not deferred: an answer must
    not depend on the calls it happens to share a batch with.
    """
    import torch
    from transformers import LogitsProcessorList

    if not prompts:
        return []
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    answers: list[Answer | None] = [None] * len(prompts)
    caps = limits if limits is not None else [None] * len(prompts)
    # the most answer tokens each prompt may have, and the tokens generated for it: one more
    # under a limit, to tell an answer that ends there from one cut there
    budgets = [min(max_new_tokens, cap) if cap else max_new_tokens for cap in caps]
    runs = [min(max_new_tokens, cap + 1) if cap else max_new_tokens for cap in caps]
    limit = context_limit(model)
    for i, seq in enumerate(encoded):
        # the token past the budget is generated from positions within it: the budget fits
        if limit is not None and len(seq) + budgets[i] > limit:
            answers[i] = Answer(text="", confidence=0.0, finish_reason=TOO_LONG, tokens=0)
    runnable = [i for i in range(len(prompts)) if answers[i] is None]
    order = sorted(runnable, key=lambda i: len(encoded[i]))
    for idx in batches(order, [len(s) for s in encoded], runs, batch_size, limit):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            seq = encoded[i]
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        recorder = _chosen_probabilities()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                logits_processor=LogitsProcessorList([recorder]),
                **greedy_settings(max(runs[i] for i in idx), eos_ids, pad_id),
            )
        new = out.sequences[:, width:]
        chosen, argmax = recorder.result(new.shape[1])  # (batch, generated) each, on the CPU
        new = new.cpu()
        for row, i in enumerate(idx):
            toks = new[row].tolist()[: runs[i]]  # this prompt's own run
            # an end token within the run ends the answer (at most budgets[i] tokens before it)
            end = next((k for k, t in enumerate(toks) if t in eos_ids), None)
            n = len(toks) if end is None else end + 1
            n = min(n, chosen.shape[1])
            # greedy picks the argmax of the scores the recorder saw, so their top probability
            # is the chosen token's; anything else changing the pick makes it untrustworthy
            recorded = bool(n) and bool(torch.equal(argmax[row, :n], new[row, :n]))
            # cut at its budget: incomplete whatever the model's certainty (it may loop)
            conf = float(chosen[row, :n].mean()) if recorded and end is not None else 0.0
            body = toks[: budgets[i]] if end is None else toks[:end]
            text = tokenizer.decode(body, skip_special_tokens=True)
            answers[i] = Answer(
                text=text,
                confidence=served_confidence(max(0.0, conf)),  # capped below 1.0
                finish_reason="length" if end is None else "stop",
                tokens=len(body),  # the end token is none of the answer's
            )
    return [a for a in answers if a is not None]


def batches(
    order: Sequence[int],
    lengths: Sequence[int],
    runs: Sequence[int],
    batch_size: int,
    limit: int | None,
) -> list[list[int]]:
    """``order`` (prompt indices, shortest prompt first) cut into batches of at most
    ``batch_size``, each of which fits the model's context when run as one.

    Why: a padded batch is generated for the longest of its rows' runs (``runs``, in tokens),
    so a prompt that fits with its own small limit, batched with one that may write many
    tokens, was run past the model's positions (a tiny GPT-2: an IndexError; on a GPU a
    device-side assert that breaks the Triton instance). A batch fits when its widest prompt
    (``lengths``), padded, and its run do: the last token generated is not fed back, so
    ``width + run - 1 <= limit``. The padded width is the cautious measure (models number a
    left-padded row's positions from its first token or from the padding's). Every prompt
    passed its own check (:func:`generate`) and so fits alone: a row that does not fit the
    batch being built starts the next one.
    """
    out: list[list[int]] = []
    width = run = 0
    for i in order:
        grown_width, grown_run = max(width, lengths[i]), max(run, runs[i])
        fits = limit is None or grown_width + grown_run - 1 <= limit
        if out and len(out[-1]) < batch_size and fits:
            out[-1].append(i)
            width, run = grown_width, grown_run
        else:
            out.append([i])
            width, run = lengths[i], runs[i]
    return out


def context_limit(model: Any) -> int | None:
    """The most tokens (prompt and answer) the model's positions cover, from its config:
    ``max_position_embeddings`` (Llama, Qwen, Mistral...) or ``n_positions`` (GPT-2); None
    when the config names neither."""
    config = model.config
    if hasattr(config, "get_text_config"):  # a multimodal config keeps it on its text part
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _chosen_probabilities() -> Any:
    """A logits processor recording, at each generation step, every row's top probability
    under the scores it is given, and the token that has it.

    Why not ``output_logits``: that keeps a float32 (batch x vocabulary) tensor per generated
    token until generation ends (about 2.5 GB for 16 answers of 256 tokens with a 152k
    vocabulary), then stacking and a softmax copied it twice more. This keeps two numbers per
    row and step. ``generate`` runs a passed processor after its own ones (all neutral under
    :func:`greedy_settings`) and greedy decoding takes the argmax of what the processors
    return, so the scores seen here are the ones the token was chosen from, and their top
    probability is the chosen token's; :func:`generate` checks the recorded argmax against
    the generated tokens anyway.
    """
    import torch
    from transformers import LogitsProcessor

    class ChosenProbabilities(LogitsProcessor):
        def __init__(self) -> None:
            self.probs: list[Any] = []
            self.ids: list[Any] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            top = torch.softmax(scores.float(), dim=-1).max(dim=-1)
            self.probs.append(top.values)
            self.ids.append(top.indices)
            return scores

        def result(self, steps: int) -> tuple[Any, Any]:
            """(probabilities, token ids) of the first ``steps`` steps, (batch, steps) each."""
            if not self.probs or steps == 0:
                empty = torch.zeros((0, 0))
                return empty, empty.long()
            probs = torch.stack(self.probs[:steps], dim=1).cpu()
            ids = torch.stack(self.ids[:steps], dim=1).cpu()
            return probs, ids

    return ChosenProbabilities()


def greedy_settings(max_new_tokens: int, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
    """Every generation setting that could change which token greedy decoding picks, neutral.

    Why all of them, explicitly: ``generate`` starts from the base model's
    ``generation_config`` (its hub ``generation_config.json``), which may carry a
    ``repetition_penalty``, n-gram bans, bad words, forced or suppressed tokens, sampling or
    beam search. A repetition penalty alone stops a tool call from copying the city or the id
    it was asked about from the prompt. The fine-tuned model was trained to write its answer
    as is, and evaluation and serving must decode it the same way. They are passed as
    arguments rather than as a ``GenerationConfig`` object because transformers fills every
    field left unset (``None``) in a passed config from the model's, and ``None`` is the
    neutral value of several (``bad_words_ids``, ``forced_eos_token_id``...); arguments
    override the model's values, ``None`` included. Settings this transformers version does
    not know are left out (``generate`` would reject them, and they cannot apply).
    """
    from transformers import GenerationConfig

    settings = {
        "max_new_tokens": max_new_tokens,
        "min_length": 0,
        "min_new_tokens": None,
        "max_time": None,
        "stop_strings": None,
        "do_sample": False,
        "num_beams": 1,
        "num_beam_groups": 1,
        "num_return_sequences": 1,
        "penalty_alpha": None,  # with top_k, contrastive search
        "prompt_lookup_num_tokens": None,
        "assistant_early_exit": None,
        "constraints": None,
        "force_words_ids": None,
        "guidance_scale": None,
        "repetition_penalty": 1.0,
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "bad_words_ids": None,
        "sequence_bias": None,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "exponential_decay_length_penalty": None,
        "length_penalty": 1.0,
        "diversity_penalty": 0.0,
        "renormalize_logits": False,
        "remove_invalid_values": False,
        "watermarking_config": None,
        "token_healing": False,
        "dola_layers": None,
        "use_mtp": None,
        "output_logits": False,  # the chosen tokens' probabilities are recorded as they come
        "output_scores": False,
        "return_dict_in_generate": True,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids,
    }
    known = GenerationConfig()
    return {k: v for k, v in settings.items() if hasattr(known, k)}


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    cfg = getattr(model, "generation_config", None)
    for value in (getattr(cfg, "eos_token_id", None), tokenizer.eos_token_id):
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    if not ids:
        raise ValueError("the tokenizer has no end-of-sequence token; generation could not stop")
    return ids
