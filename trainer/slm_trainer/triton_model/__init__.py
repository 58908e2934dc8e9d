"""The Triton model repository for a promoted candidate: config rendering and backend files.

Why a package of its own: the files in it are not imported by the trainer at serving time but
copied into ``<repository>/<model>/<version>/``, where Triton's Python backend runs them:
``model.py`` (the backend), ``chatformat.py`` (prompt rendering and answer parsing, shared with
training) and ``runtime.py`` (loading and greedy generation with a confidence, shared with the
trainer's evaluation). This module renders ``config.pbtxt``; it is stdlib-only.

The served contract, the same for every task:

- input ``REQUEST`` (BYTES, ``[1]`` per batch item): an OpenAI chat-completions body as JSON
  (``messages``, optional ``tools``, and optional ``max_tokens``: the agent's own limit on
  the answer, which a generative model does not write past; other fields are ignored);
- output ``RESPONSE`` (BYTES): the assistant message as JSON (``content`` or ``tool_calls``,
  plus ``finish_reason`` and, for a generated answer, ``usage.completion_tokens``;
  ``{"defer": true, ...}`` when a selector hands the call back, or when the chat template
  cannot render the conversation);
- output ``CONFIDENCE`` (FP32): in [0, 1]; the gateway falls back to the LLM below the
  AgentTask's threshold. 0 for an answer cut at ``max_new_tokens`` or at the request's
  ``max_tokens``, a tool call that breaks the trained format, and (``selector+generative``)
  an answer other than the selector's choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Files copied next to each other into the model version directory.
BACKEND_FILES = ("model.py", "chatformat.py", "runtime.py")

INPUT_NAME = "REQUEST"
OUTPUT_NAME = "RESPONSE"
CONFIDENCE_NAME = "CONFIDENCE"

#: Triton instance kinds: KIND_MODEL lets model.py place itself (GPU when the pod has one,
#: CPU otherwise), so the same repository serves on a GPU cluster and in CPU tests.
INSTANCE_KINDS = ("KIND_MODEL", "KIND_CPU", "KIND_GPU")


def _quote(value: str) -> str:
    """A protobuf text-format string literal."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def valid_model_name(name: str) -> bool:
    """Whether ``name`` can name a folder of a model repository (and so a Triton model)."""
    return bool(name) and not any(c in name for c in '/\\"\n') and name not in (".", "..")


#: The model's queue limit: the longest ``spec.serving.slo.slmTimeoutMs`` (600,000 ms).
QUEUE_TIMEOUT_US = 600_000_000


def render_config(
    name: str,
    parameters: Mapping[str, str] | None = None,
    max_batch_size: int = 8,
    instance_count: int = 1,
    instance_kind: str = "KIND_MODEL",
    max_queue_delay_us: int = 2000,
    queue_timeout_us: int = QUEUE_TIMEOUT_US,
    max_queue_size: int = 256,
) -> str:
    """``config.pbtxt`` for the Python-backend model ``name``.

    Dynamic batching gathers concurrent requests into one ``execute`` call, which generates
    for all of them in one padded batch. ``parameters`` reach ``model.py`` as strings.
    Requests that find ``max_queue_size`` ahead of them are rejected rather than computed
    late: under overload the queue stays short and the latency SLO stays meaningful. A
    request still queued when its own ``timeout`` parameter (the gateway sends its task's
    SLM budget, ``slmTimeoutMs``) or else ``queue_timeout_us`` ran out is rejected too: the
    gateway has fallen back to the LLM by then. ``queue_timeout_us`` is the longest budget a
    task may set, as Triton lets a request shorten the model's limit but never lengthen it:
    a fixed 5 s refused calls of tasks whose budget is longer (generative models under load)
    with a 503, which counted as SLM errors instead of being answered in time.
    """
    if not valid_model_name(name):
        raise ValueError(f"invalid Triton model name {name!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}")
    if max_batch_size < 0 or instance_count < 1:
        raise ValueError("max_batch_size must be >= 0 and instance_count >= 1")
    # Every caller sends [batch, 1] tensors (slm_contract: the gateway sends [1, 1]). With
    # batching, dims leave out the batch dimension; without (max_batch_size 0) they are the
    # whole shape, so [1, 1], or Triton would reject every request as the wrong shape.
    dims = "[ 1 ]" if max_batch_size > 0 else "[ 1, 1 ]"
    lines = [
        f"name: {_quote(name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {_quote(INPUT_NAME)}",
        "    data_type: TYPE_STRING",
        f"    dims: {dims}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_quote(OUTPUT_NAME)}",
        "    data_type: TYPE_STRING",
        f"    dims: {dims}",
        "  },",
        "  {",
        f"    name: {_quote(CONFIDENCE_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: {dims}",
        "  }",
        "]",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    if max_batch_size > 0:
        lines += [
            "dynamic_batching {",
            f"  max_queue_delay_microseconds: {max_queue_delay_us}",
            "  default_queue_policy {",
            "    timeout_action: REJECT",
            f"    default_timeout_microseconds: {queue_timeout_us}",
            "    allow_timeout_override: true",
            f"    max_queue_size: {max_queue_size}",
            "  }",
            "}",
        ]
    lines += ["version_policy: { latest: { num_versions: 1 } }"]
    for key, value in sorted((parameters or {}).items()):
        lines += [
            "parameters {",
            f"  key: {_quote(str(key))}",
            f"  value: {{ string_value: {_quote(str(value))} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"
