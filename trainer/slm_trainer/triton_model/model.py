"""Triton Python backend serving one fine-tuned SLM candidate (copied into the repository).

Why it is written this way: Triton loads this file from ``<repo>/<model>/<version>/model.py``
in its own stub process, so it imports only its sibling files (``chatformat.py``,
``runtime.py``) plus torch/transformers/peft from the serving image (and, for a selector,
``slm_trainer.selector``). Everything it needs to know comes from ``config.pbtxt`` parameters:

- ``artifacts``: folder (relative to this file) with the tokenizer and the adapter or the
  merged weights; ``base_model``: base model path or hub id for an adapter;
- ``kind``: ``generative``, ``selector`` or ``selector+generative``; ``selector``: the
  selector's folder; ``task_type``;
- ``max_new_tokens``, ``tools_in_template``, optional ``cpu_threads``; ``threshold`` is
  written for people reading the repository (the gateway applies the task's own);
- ``eval_dtype``: the precision the trainer evaluated the candidate in (its threshold was
  picked on those confidences), served in where the device computes it
  (:func:`runtime.recorded_dtype`); absent in older repositories, served as before.

One ``execute`` call answers every row of every request it is given in one padded batch
(dynamic batching gathers them), and a selector scores them all in one call. A request's
``max_tokens`` (the gateway sends the agent's limit) caps its generated answer below
``max_new_tokens``: one cut there says ``length`` (confidence 0), and every generated answer
reports its tokens as ``usage.completion_tokens`` (the gateway serves that count, and hands
back an answer over the agent's limit). A selector's answer is a label, not generated text:
no limit cuts it and it reports no count. A conversation the chat template cannot render, or
one that with its token budget would outgrow the model's context, is deferred (confidence
0), as evaluation counts it. A request that is not a valid chat-completions JSON (or whose
limit is no positive integer), that the model fails on, or whose answer cannot be written
out, gets a Triton error of its own; the other requests of the batch are still answered.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import chatformat  # noqa: E402
import numpy as np  # noqa: E402
import runtime  # noqa: E402

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (unit tests of the helpers below)
    pb_utils = None


def _params(model_config: dict[str, Any]) -> dict[str, str]:
    return {
        k: str(v.get("string_value", ""))
        for k, v in (model_config.get("parameters") or {}).items()
        if isinstance(v, dict)
    }


#: What ``kind`` may say; anything else is refused when Triton loads the model.
KINDS = ("generative", "selector", "selector+generative")


def _settings(params: dict[str, str]) -> tuple[str, int, int]:
    """(kind, max_new_tokens, cpu_threads) from the parameters, or a ValueError naming the bad
    one. Why at load time: ``config.pbtxt`` is a file people edit, and a misspelt kind
    loaded a model with nothing to answer with (every call quietly deferred), while a bad
    number failed every request; refused, the model never becomes ready and Triton's log
    says why."""
    kind = params.get("kind", "generative")
    if kind not in KINDS:
        raise ValueError(f"parameter kind is {kind!r}; expected one of {', '.join(KINDS)}")
    numbers: dict[str, int] = {}
    for name, default, low in (("max_new_tokens", "256", 1), ("cpu_threads", "0", 0)):
        raw = params.get(name, default) or default
        try:
            numbers[name] = int(raw)
        except ValueError:
            numbers[name] = low - 1
        if numbers[name] < low:
            raise ValueError(f"parameter {name} is {raw!r}; expected an integer >= {low}")
    return kind, numbers["max_new_tokens"], numbers["cpu_threads"]


def _warn(message: str) -> None:
    """A warning in Triton's log (the server's own logger), or Python's outside Triton."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_warn(message)
    else:
        logging.getLogger(__name__).warning(message)


def _load_selector(path: str, device: str, threads: int) -> Any:
    from slm_trainer.selector import load_selector  # the trainer package, in the serving image

    return load_selector(path, device=device, num_threads=threads)


def select_each(selector: Any, rows: list[Row]) -> list[tuple[str | None, float]]:
    """The selector's (label, confidence) for every row, scored in one call.

    Why one call: dynamic batching hands ``execute`` up to ``max_batch_size`` requests, and
    the selector scores a batch at once (``Selector.predict_examples``, padded batches); run
    once per row, concurrent load was 4x slower for the same answers. The examples are those
    ``Selector.predict`` builds for one request. If the call fails, it fails the batch, and
    :meth:`TritonPythonModel._answer_each` answers each request alone: a request the selector
    fails on gets its own error.
    """
    from slm_trainer.selector import example_for  # the trainer package, in the serving image

    examples = [
        example_for(messages, tools, selector.task_type, selector.config.class_labels)
        for messages, tools, _ in rows
    ]
    return [
        (label, float(min(1.0, max(0.0, conf))))
        for label, conf in selector.predict_examples(examples)
    ]


#: The response for a closed-label prediction (shared with the evaluate stage's scoring).
selector_answer = chatformat.selector_answer


def _normalized(text: str) -> str:
    """As a classification label is compared (``slm_trainer.metrics.normalize_text``)."""
    return " ".join(text.split()).casefold()


def names_label(message: dict[str, Any], label: str) -> bool:
    """Whether a generated message is the answer the selector chose: its first tool call
    names the label, or, with no call, its text is the label (classification)."""
    calls = message.get("tool_calls") or []
    if calls:
        return str(calls[0].get("function", {}).get("name")) == label
    content = message.get("content")
    return isinstance(content, str) and _normalized(content) == _normalized(label)


def answer_confidence(
    message: dict[str, Any],
    finish_reason: str,
    generated: float,
    selected: tuple[str, float] | None = None,
) -> float:
    """The confidence served with a generated ``message``.

    A call that broke the trained format gets 0 (no agent could run it). With a selector
    (``selected``: its label and calibrated confidence), the selector's confidence vouches
    only for an answer that finished normally and is the selector's choice; a truncated
    answer or a call to another tool gets 0. Otherwise the generator's own confidence.
    """
    if message.get(chatformat.MALFORMED):
        return 0.0
    if selected is None:
        return generated
    label, conf = selected
    if finish_reason != "stop" or not names_label(message, label):
        return 0.0
    return conf


#: One row of a request: (messages, tools, token limit or None), as
#: :func:`chatformat.parse_request` reads it.
Row = tuple[list[dict[str, Any]], list[dict[str, Any]], int | None]


def _error(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def _response(mine: list[tuple[dict, float]] | str) -> Any:
    """One request's response: its answers, or a Triton error of its own.

    Why the try: writing an answer out can fail for that request alone (a lone surrogate in
    a tool name it offered cannot be encoded as UTF-8), and raised from ``execute`` it failed
    every request batched with it.
    """
    if isinstance(mine, str):
        return _error(mine)
    try:
        out = np.array(
            [[json.dumps(m, ensure_ascii=False).encode()] for m, _ in mine], dtype=np.object_
        )
        conf = np.array([[c] for _, c in mine], dtype=np.float32)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("RESPONSE", out), pb_utils.Tensor("CONFIDENCE", conf)]
        )
    except Exception as exc:
        return _error(f"{type(exc).__name__}: {exc}")


class TritonPythonModel:
    """Generative answers with mean-token-probability confidence, or a selector's decision."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = _params(config)
        self.kind, self.max_new_tokens, threads = _settings(params)
        self.task_type = params.get("task_type", "tool-call")
        self.batch_size = max(1, int(config.get("max_batch_size") or 1))
        self.tools_in_template = params.get("tools_in_template", "true") == "true"
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        device = runtime.pick_device(
            args.get("model_instance_kind", "MODEL"), int(args.get("model_instance_device_id", 0))
        )
        artifacts = os.path.join(HERE, params.get("artifacts", "artifacts"))
        self.model = self.tokenizer = self.selector = None
        if "generative" in self.kind:
            dtype, warning = runtime.recorded_dtype(params.get("eval_dtype"), device)
            if warning:
                _warn(f"model {config.get('name', '')!r}: {warning}")
            self.model, self.tokenizer = runtime.load_model(
                artifacts, params.get("base_model") or None, device=device, dtype=dtype
            )
        if "selector" in self.kind:
            self.selector = _load_selector(
                os.path.join(HERE, params.get("selector", "selector")), device, threads
            )

    def _answer(self, rows: list[Row]) -> list[tuple[dict, float]]:
        results: list[tuple[dict, float] | None] = [None] * len(rows)
        selected: list[tuple[str, float] | None] = [None] * len(rows)
        to_generate: list[int] = []
        choices = select_each(self.selector, rows) if self.selector is not None else []
        for i in range(len(rows)):
            if self.selector is not None:
                label, conf = choices[i]
                spelt = self.selector.answer_text(label) if label is not None else None
                results[i] = (selector_answer(label, conf, self.task_type, spelt), conf)
                if label is None or self.model is None:
                    continue
                selected[i] = (label, conf)
            to_generate.append(i)
        prompts, kept = chatformat.render_each(
            self.tokenizer, [rows[i][:2] for i in to_generate], self.tools_in_template
        )
        rendered = [to_generate[k] for k in kept]
        # A conversation the chat template rejects, or too long to run, goes back to the LLM,
        # as evaluation counted it: a deferral. Answered as an error, the gateway took it for
        # the SLM failing (its circuit breaker, the task's error rate).
        deferral = (selector_answer(None, 0.0, self.task_type), 0.0)
        for i in set(to_generate) - set(rendered):
            results[i] = deferral
        if rendered:
            answers = runtime.generate(
                self.model,
                self.tokenizer,
                prompts,
                self.max_new_tokens,
                self.batch_size,
                limits=[rows[i][2] for i in rendered],
            )
            for i, ans in zip(rendered, answers, strict=True):
                if ans.finish_reason == runtime.TOO_LONG:
                    results[i] = deferral
                    continue
                tools_offered = bool(rows[i][1]) or self.task_type == "tool-call"
                message = chatformat.parse_answer(ans.text, tools_offered)
                message["finish_reason"] = ans.finish_reason
                # what the gateway serves as usage and holds against the agent's limit
                message["usage"] = {"completion_tokens": ans.tokens}
                # with a selector, its calibrated confidence is the one the threshold applies
                # to, for the answer it chose only
                conf = answer_confidence(message, ans.finish_reason, ans.confidence, selected[i])
                results[i] = (message, conf)
        return [r for r in results if r is not None]

    def _answer_alone(self, request: list[Row] | str) -> list[tuple[dict, float]] | str:
        if isinstance(request, str):
            return request
        try:
            return self._answer(request)
        except Exception as exc:  # a model failure fails this request, not the server
            return f"{type(exc).__name__}: {exc}"

    def _answer_each(self, parsed: list[list[Row] | str]) -> list[list[tuple[dict, float]] | str]:
        """Each request's answers or error: one batch for all, else one request at a time.

        Why the second pass: a failure may belong to one request only (a conversation its
        chat template rejects, a prompt too long for memory), and the other callers of the
        batch must still get their answers.
        """
        valid = [p for p in parsed if not isinstance(p, str)]
        if len(valid) < 2:
            return [self._answer_alone(p) for p in parsed]
        try:
            answers = iter(self._answer([row for p in valid for row in p]))
        except Exception:
            return [self._answer_alone(p) for p in parsed]
        return [p if isinstance(p, str) else [next(answers) for _ in p] for p in parsed]

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed: list[list[Row] | str] = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "REQUEST")
                if tensor is None:
                    raise ValueError("missing input REQUEST")
                raws = tensor.as_numpy().reshape(-1)
                parsed.append([chatformat.parse_request(raw) for raw in raws])
            except Exception as exc:
                parsed.append(str(exc))
        return [_response(mine) for mine in self._answer_each(parsed)]

    def finalize(self) -> None:
        self.model = self.tokenizer = self.selector = None
