"""The ``export`` stage: turn the promoted candidate into a versioned Triton model repository.

Why a stage of its own: serving must not depend on the training pod's file layout, and a
repository must be complete before Triton sees it (Triton loads what it finds, half-written or
not). This stage writes into a temporary folder beside ``<output>`` (in its parent folder,
``<output>`` resolved first, so that ``--output .`` stages beside the repository, not in it),
renamed into place at the end:

- ``<output>/<model-name>/config.pbtxt``: Python backend, BYTES request in, BYTES response
  and FP32 confidence out, dynamic batching (:func:`slm_trainer.triton_model.render_config`);
- ``<output>/<model-name>/<version>/model.py`` with its sibling ``chatformat.py`` and
  ``runtime.py`` (the same prompt rendering and confidence code the trainer evaluated with)
  and ``artifacts/`` (tokenizer + LoRA adapter, or merged weights with ``--merge``);
- ``<output>/<model-name>/metadata.json``: base model, parameters, adapter sha256, eval score,
  threshold, creation time: for people and tools inspecting the repository (the operator
  reads the export stage's result instead).

The model folder holds one version: ``config.pbtxt``'s parameters (kind, threshold, base
model) describe it. Exporting the same version again replaces the folder whole; another
version is refused while one is there, rather than deleting it (the operator writes version 1
into a repository of its own per revision).

A LoRA adapter is served on top of its base model, named by the ``base_model`` parameter: a
local folder when the base is in the trainer's Hugging Face cache on the shared volume (the
serving pod mounts the same volume), else the hub id. ``--merge`` writes merged weights
instead, for a repository that needs nothing else.

``<output>`` must therefore not be the root of a mounted volume (``--output /models`` where
the PVC is mounted at ``/models``): beside it is another filesystem, where the final rename
fails (EXDEV) after the whole repository was written, and inside it there is no place to
stage, since Triton loads every folder at the repository root, hidden ones too. Such an
output is refused before anything is written (exit 2, every retry would fail the same way),
asking for a folder inside the volume, which is what the operator passes
(``<claim>/<task>/<revision>/model_repository``); Triton's ``--model-repository`` then
points at that folder.

A candidate folder may instead hold a closed-label selector (``selector.json`` and its
sub-folders, written by the selector path of ``finetune``); it is copied to ``selector/`` and
the backend answers (or defers) with the selector's calibrated confidence, loading it through
:func:`slm_trainer.selector.load_selector` (so the serving image needs this package). Without
``--threshold`` the candidate's own calibrated threshold is recorded (the selector's, else the
one in a generative candidate's ``manifest.json``). ``metadata.json`` keeps that one as
``eval_threshold`` in any case: the candidate's ``eval_score`` was measured there, not at an
overriding ``--threshold``. The gateway applies the AgentTask's route threshold; the one in
``config.pbtxt`` is for people reading the repository.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_contract import TaskType, TrainerResult
from slm_trainer.cli import BadArguments

CONTRACT_STAGE = "export"
METADATA_SCHEMA = "slmfleet.dev/triton-model/v1"
#: Files of a candidate folder that are training records, not serving artifacts.
NOT_SERVED = {"predictions.jsonl", "trainer_state.json", "checkpoint.pt"}

Emit = Callable[[dict[str, Any]], None]


@dataclass
class Args:
    """Write the Triton model repository (config.pbtxt, Python backend, metadata)."""

    candidate: str = field(metadata={"help": "name of the promoted candidate"})
    model: str = field(metadata={"help": "base model (hub id or path) it was trained from"})
    candidate_dir: Path = field(metadata={"help": "the finetune stage's output folder"})
    output: Path = field(metadata={"help": "model repository root to write into"})
    model_name: str = field(metadata={"help": "Triton model name (the AgentTask's name)"})
    artifact_uri: str = field(default="", metadata={"help": "URI of --output, for the result"})
    task_type: TaskType = field(default="tool-call", metadata={"help": "the AgentTask's taskType"})
    threshold: float | None = field(
        default=None, metadata={"help": "confidence threshold chosen by the evaluation gate"}
    )
    version: int = field(default=1, metadata={"help": "model version folder"})
    merge: bool = field(
        default=False, metadata={"help": "merge a LoRA adapter into the base weights"}
    )
    max_batch_size: int = field(default=8, metadata={"help": "Triton dynamic batch size"})
    instances: int = field(default=1, metadata={"help": "model instances per server"})
    cpu_threads: int = field(
        default=0, metadata={"help": "torch threads per instance on CPU (0: torch's default)"}
    )

    def __post_init__(self) -> None:
        """Refused here (exit 2, what a wrong command line is), not as a crash later: the
        Job retried a crash, and an empty output folder was left behind."""
        if self.version < 1:
            raise ValueError("--version must be >= 1")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError("--threshold must be within [0, 1]")
        from slm_trainer.triton_model import valid_model_name

        if not valid_model_name(self.model_name):
            raise ValueError(f"--model-name {self.model_name!r} is not a Triton model name")
        if self.instances < 1 or self.max_batch_size < 0 or self.cpu_threads < 0:
            raise ValueError("--instances must be >= 1, --max-batch-size and --cpu-threads >= 0")


def resolve_base(model: str) -> tuple[str, str]:
    """(what the backend loads, how it was found) for a base model id or path.

    A local folder is used as it is, found as finetune found the one it trained from
    (:func:`slm_trainer.finetune.resolve_model_path`: ``~/models/x`` expanded, since Job
    arguments see no shell; written as a hub id, Triton could not load it). A hub id is
    looked up in the local Hugging Face cache only (``HF_HOME`` on the shared volume in a
    Job): serving pods mount that volume read-only and have no hub access. If it is not
    cached the id is kept and the serving image must reach the hub.
    """
    from slm_trainer.finetune import resolve_model_path

    path = Path(resolve_model_path(model))
    if path.is_dir():
        return str(path.resolve()), "path"
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True), "hf-cache"
    except Exception:
        return model, "hub-id"


def _copy_artifacts(candidate_dir: Path, dest: Path) -> list[str]:
    """Copy the candidate's serving files into ``dest``; the names copied.

    The tokenizer's named chat templates are a folder of their own (transformers writes
    ``tool_use`` and the like, as Hermes and Command-R ship them, into
    ``additional_chat_templates/``): without it the served tokenizer had only its
    ``default`` template, which for those models ignores tools, and a candidate trained with
    its tools in the prompt was served without them.
    """
    from transformers.utils.hub import CHAT_TEMPLATE_DIR

    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for item in sorted(candidate_dir.iterdir()):
        if item.is_file() and item.name not in NOT_SERVED and not item.name.endswith(".tmp"):
            shutil.copy2(item, dest / item.name)
            copied.append(item.name)
        elif item.is_dir() and item.name == CHAT_TEMPLATE_DIR:
            shutil.copytree(item, dest / item.name, ignore=shutil.ignore_patterns("*.tmp"))
            copied.append(item.name)
    return copied


def _merge_adapter(candidate_dir: Path, base: str, dest: Path, eval_dtype: str | None) -> None:
    """Write the adapter merged into its base, with the candidate's tokenizer, into ``dest``.

    Merged exactly as the evaluation merged it (:func:`runtime.load_model`), in the
    precision it recorded (the manifest's ``eval_dtype``): loaded in transformers' default
    precision instead (bf16 for most hub checkpoints), the merged weights differed from the
    evaluated ones, and so did the confidences the threshold was picked on. A candidate with
    no record is merged in fp32, the most precise weights to cast from when served.
    """
    import torch
    from transformers import AutoTokenizer

    from slm_trainer.triton_model import runtime

    dtype = runtime.dtype_named(eval_dtype) or torch.float32
    model, _ = runtime.load_model(candidate_dir, base, device="cpu", dtype=dtype)
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(candidate_dir)).save_pretrained(str(dest))


class UnreadableDescription(Exception):
    """A candidate's ``manifest.json`` or ``selector.json`` is not a JSON object (torn by a
    killed writer, hand-edited). Exporting it again gives the same answer, so the stage
    reports it, naming the file, instead of crashing into the Job's retries."""


def _read_description(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`UnreadableDescription` when it is not one.

    An OSError passes: a read that failed may succeed on the retry a crash earns.
    """
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise UnreadableDescription(
            f"cannot export: {path} is not valid JSON ({type(exc).__name__}: {exc}); "
            "finetune the candidate again"
        ) from exc
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(data), "a number"
        )
        raise UnreadableDescription(
            f"cannot export: {path} holds {kind}, not a JSON object; finetune the candidate again"
        )
    return data


def _check_selector_format(path: Path, selector: dict[str, Any]) -> None:
    """:class:`UnreadableDescription` unless ``selector`` is a selector manifest this code
    serves. Exported as is, ``{}`` (or another version's manifest) would fail only when
    Triton loads it, a revision later, as a model that never becomes ready."""
    from slm_trainer.selector import FORMAT

    found = selector.get("format")
    if found != FORMAT:
        what = "has no format field" if found is None else f"has format {found!r}"
        raise UnreadableDescription(
            f"cannot export: {path} {what}, not {FORMAT!r}; finetune the candidate again"
        )


def _check_numbers(path: Path, description: dict[str, Any]) -> dict[str, Any]:
    """The counts, score and threshold of ``description`` (read from ``path``), checked by
    the evaluate stage's rules; :class:`UnreadableDescription` naming the ones that are not
    what they claim. Checked before anything is written: a threshold of ``true`` was served
    as 1.0, and a float parameter count crashed the result with the repository in place."""
    from slm_trainer.evaluate import description_numbers

    numbers, problems = description_numbers(description)
    if problems:
        raise UnreadableDescription(
            f"cannot export: in {path}, {'; '.join(problems)}; finetune the candidate again"
        )
    return numbers


def _repository_root(output: Path) -> Path:
    """``output`` resolved, so that the staging folder beside it is on its filesystem;
    :class:`BadArguments` when it is a mount point (see the module docstring)."""
    out = Path(output).resolve()
    if os.path.ismount(out):
        raise BadArguments(_mount_point_message(out))
    return out


def _mount_point_message(out: Path) -> str:
    return (
        f"--output {out} is the root of a mounted volume: the repository is staged beside "
        "it and renamed into place, which cannot cross filesystems, and staged inside it "
        "Triton would load the half-written folder; pass a folder inside the volume (such as "
        f"{out / 'model_repository'}) and point Triton's --model-repository at it"
    )


def _move_into_place(staging: Path, final: Path, old: Path) -> None:
    """Replace ``final`` by ``staging`` (the previous one set aside as ``old``, then removed).

    A bind mount of the same filesystem passes :func:`os.path.ismount` yet refuses the
    rename (EXDEV): the staging folder is removed and the output refused as a mount point,
    not left behind by a crash the Job retries in vain.
    """
    try:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise BadArguments(_mount_point_message(final.parent)) from exc
    shutil.rmtree(old, ignore_errors=True)


def run(args: Args, emit: Emit) -> TrainerResult:
    from slm_trainer.generative import MANIFEST, weights_sha256
    from slm_trainer.triton_model import BACKEND_FILES, HERE, render_config

    cand = Path(args.candidate_dir)
    manifest_path = cand / MANIFEST
    has_selector = (cand / "selector.json").is_file()
    manifest: dict[str, Any] = {}
    selector: dict[str, Any] = {}
    manifest_numbers: dict[str, Any] = {}
    selector_numbers: dict[str, Any] = {}
    try:
        if manifest_path.is_file():
            manifest = _read_description(manifest_path)
            manifest_numbers = _check_numbers(manifest_path, manifest)
        if has_selector:
            selector = _read_description(cand / "selector.json")
            _check_selector_format(cand / "selector.json", selector)
            selector_numbers = _check_numbers(cand / "selector.json", selector)
    except UnreadableDescription as exc:
        return TrainerResult(
            stage=CONTRACT_STAGE, ok=False, candidate=args.candidate, message=str(exc)
        )
    if not manifest and not has_selector:
        return TrainerResult(
            stage=CONTRACT_STAGE,
            ok=False,
            candidate=args.candidate,
            message=f"{cand} holds neither {MANIFEST} nor selector.json: "
            "was it written by the finetune stage?",
        )

    out = _repository_root(args.output)
    final = out / args.model_name
    others = sorted(
        d.name
        for d in (final.iterdir() if final.is_dir() else ())
        if d.is_dir() and d.name.isdigit() and int(d.name) != args.version
    )
    if others:
        # config.pbtxt's parameters (kind, threshold, base model) describe one version, so the
        # folder is replaced whole; silently deleting another version would lose a rollback.
        return TrainerResult(
            stage=CONTRACT_STAGE,
            ok=False,
            candidate=args.candidate,
            message=f"{final} already holds version(s) {', '.join(others)}: a model folder "
            f"describes one version (config.pbtxt parameters), so version {args.version} is "
            "not written over it; export into a new repository (the operator uses one per "
            "revision), or remove the folder first",
        )
    out.mkdir(parents=True, exist_ok=True)
    # beside the repository, not in it: Triton loads every folder it finds there, hidden or not
    staging = out.parent / f".{out.name}.{args.model_name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / str(args.version)
    version_dir.mkdir(parents=True)
    for name in BACKEND_FILES:
        shutil.copy2(HERE / name, version_dir / name)

    params: dict[str, str] = {"task_type": args.task_type}
    kinds = []
    base_model, base_found = "", ""
    merged = False
    if manifest:
        kinds.append("generative")
        adapter = manifest.get("weights") == "adapter"
        if adapter:
            base_model, base_found = resolve_base(str(manifest.get("base_model") or args.model))
        artifacts = version_dir / "artifacts"
        if adapter and args.merge:
            emit({"event": "merge", "base_model": base_model})
            _merge_adapter(cand, base_model, artifacts, manifest.get("eval_dtype"))
            merged = True
            (artifacts / MANIFEST).write_text(manifest_path.read_text())
        else:
            _copy_artifacts(cand, artifacts)
        params["artifacts"] = "artifacts"
        if adapter and not merged:
            params["base_model"] = base_model
        params["max_new_tokens"] = str(manifest.get("max_new_tokens", 256))
        params["tools_in_template"] = "true" if manifest.get("tools_in_template") else "false"
        if manifest.get("eval_dtype"):  # what model.py loads the weights in, where it can
            params["eval_dtype"] = str(manifest["eval_dtype"])
    if has_selector:
        kinds.append("selector")
        shutil.copytree(
            cand,
            version_dir / "selector",
            ignore=shutil.ignore_patterns(*NOT_SERVED, "eval_report.json", "*.tmp", ".*"),
        )
        params["selector"] = "selector"
    params["kind"] = "+".join(sorted(kinds, reverse=True))  # "selector+generative"
    # the candidate's own calibrated threshold (a selector's confidence is the one served, if
    # any), and the score measured there: a selector+generative folder's manifest.json has a
    # score at the generator's own threshold, which is not the one served
    numbers = manifest_numbers if manifest else selector_numbers  # the served model's size
    measured = next((n for n in (selector_numbers, manifest_numbers) if "threshold" in n), numbers)
    own_threshold = measured.get("threshold")
    threshold = args.threshold if args.threshold is not None else own_threshold
    if threshold is not None:
        params["threshold"] = str(threshold)
    if args.cpu_threads > 0:
        params["cpu_threads"] = str(args.cpu_threads)

    config = render_config(
        args.model_name,
        parameters=params,
        max_batch_size=args.max_batch_size,
        instance_count=args.instances,
    )
    (staging / "config.pbtxt").write_text(config)
    info = manifest or selector  # what describes the served model
    score = measured.get("score")
    metadata = {
        "schema": METADATA_SCHEMA,
        "model_name": args.model_name,
        "version": args.version,
        "candidate": args.candidate,
        "kind": params["kind"],
        "task_type": args.task_type,
        "base_model": str(info.get("base_model") or args.model),
        "base_model_source": base_model or None,
        "base_model_found_as": base_found or None,
        "method": info.get("method"),
        "merged": merged,
        "eval_dtype": info.get("eval_dtype"),
        "parameters": numbers.get("parameters"),
        "trainable_parameters": numbers.get("trainable_parameters"),
        "adapter_sha256": weights_sha256(cand),
        "eval_score": score,
        "llm_score": info.get("llm_score", 1.0),
        "metric": info.get("metric"),
        "threshold": threshold,
        # what eval_score was measured at: differs from threshold when --threshold overrode it
        "eval_threshold": own_threshold,
        "format": info.get("format"),
        "artifact_uri": args.artifact_uri or None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")

    # Built before the rename: a result the contract refuses must not follow a repository
    # already in place.
    result = TrainerResult(
        stage=CONTRACT_STAGE,
        ok=True,
        candidate=args.candidate,
        artifact_uri=args.artifact_uri or None,
        threshold=threshold,
        score=score,
        parameters=numbers.get("parameters"),
        trainable_parameters=numbers.get("trainable_parameters"),
        message=f"Triton model {args.model_name!r} version {args.version} ({params['kind']}) "
        f"written to {final}",
    )
    _move_into_place(staging, final, out.parent / f".{out.name}.{args.model_name}.old")
    emit(
        {
            "event": "exported",
            "candidate": args.candidate,
            "model_name": args.model_name,
            "path": str(final),
            "kind": params["kind"],
        }
    )
    return result
