"""``python -m slm_trainer <stage> [args]``: the command line that the operator's Jobs run.

Why it looks like this: a trainer pod is judged by three things the operator can see, so each
is fixed here once for every stage:

- JSON lines on stdout (``{"event": "progress", "stage": ...}``) for logs and humans;
- the :class:`slm_contract.TrainerResult` written to ``--result-path`` (by default the
  kubelet's ``/dev/termination-log`` when it is writable), where the operator reads it back,
  and echoed as a final ``{"event": "result", ...}`` line;
- never a credential: a dataset or artifact URI may carry one (``https://user:pw@...``, a
  presigned ``?X-Amz-Signature=``), and all three reach people who may not read the Secret
  it came from (the operator copies the result's message into conditions and Events), so
  every URI in a line or a message is cut to scheme, host, port and path
  (:func:`slm_contract.redact_uris`) here, whatever the stage put in it;
- the exit code: 0 when the result is ok; 3 when the stage ran and reported a failure (too
  few examples, no candidate passing: running it again gives the same answer); 1 when it
  crashed (an exception: maybe transient, so worth a retry); 2 for bad arguments (argparse's
  convention, and a stage's :class:`BadArguments`); 143 when SIGTERM stopped the stage: a
  training loop after saving a checkpoint (a new pod resumes it), any other part of a stage
  at once (:class:`slm_trainer.preemption.StageSigterm`). The operator's Jobs fail at once on 2
  and 3 (:data:`EXIT_REPORTED` and a podFailurePolicy) and spend ``backoffLimit`` only on
  crashes.

A stage is a module with an ``Args`` dataclass (its fields become ``--flags``; the field's
``metadata["help"]`` is the help text; the class docstring is the stage's description) and a
``run(args, progress) -> TrainerResult`` function. Adding one is one line in :data:`STAGES`.
Stage modules keep torch, Presidio and the like inside ``run`` so that ``--help`` and argument
errors never pay for them (checked by tests/unit/test_trainer_cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import traceback
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slm_contract import (
    EXIT_BAD_ARGUMENTS,
    EXIT_CRASHED,
    EXIT_PREEMPTED,
    EXIT_REPORTED,
    ContractError,
    TrainerResult,
    redact_uris,
)
from slm_trainer import preemption

#: CLI stage name -> module implementing it. The contract stage it reports is the module's
#: ``CONTRACT_STAGE``.
STAGES: dict[str, str] = {
    "curate": "slm_trainer.curate",
    "export": "slm_trainer.export",
    "finetune": "slm_trainer.finetune",
    "evaluate": "slm_trainer.evaluate",
    "discover": "slm_trainer.discover",
    "prune": "slm_trainer.prune",
}

TERMINATION_LOG = "/dev/termination-log"

#: The URIs among this run's arguments: their user info and query are redacted from every
#: line and message even where an error quotes them without the scheme (set by :func:`main`).
_ARG_URIS: tuple[str, ...] = ()


class BadArguments(ValueError):
    """Arguments that parse but that the stage finds it cannot use once it looks (LoRA target
    modules the base model does not have): raised by a stage, they end the run as argparse's
    refusals do, with exit 2 (every pod would be refused the same way; a crash, exit 1, is
    retried in vain), and the message is reported in the result."""


def default_result_path() -> str:
    """The kubelet's termination message file when we can write it, else nothing."""
    return TERMINATION_LOG if os.access(TERMINATION_LOG, os.W_OK) else ""


def emit(event: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed so that ``kubectl logs -f`` shows it at once.

    Every URI in it is redacted (no user info, no query): the start line lists every
    argument, and a stage's progress or warning may quote a URI or an error naming one.
    A lone surrogate (an argument or file name whose bytes are not UTF-8, as Python decodes
    it) is written as ``\\udcff``: stdout refuses it, and the stage would crash on a log line.
    A NaN or infinite number (a diverged loss) is written as null: JSON has no such numbers,
    and a line with ``NaN`` is refused by every strict reader of the log.
    """
    text = json.dumps(finite(event), ensure_ascii=False, default=str, allow_nan=False)
    line = redact_uris(text, *_ARG_URIS)
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), flush=True)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (in keys: by its text).

    For every JSON file a stage writes as well as its log lines: a diverged loss wrote
    ``"final_loss": NaN`` into a candidate's manifest, which no strict JSON reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            str(k) if isinstance(k, float) and not math.isfinite(k) else k: finite(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _flag_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse keywords for a dataclass field type (str, int, float, Path, bool, Literal)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0])
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), {"choices": choices}
    if tp is bool:
        return bool, {"action": argparse.BooleanOptionalAction}
    return tp, {}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--kebab-case`` option per field of ``cls``; fields without a default are required."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, extra = _flag_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", ""), **extra}
        if "action" not in kwargs:
            kwargs["type"] = tp
            kwargs["metavar"] = f.name.upper()
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
            if isinstance(f.default, bool):
                kwargs["help"] += f" (default: {'on' if f.default else 'off'})"
            elif f.default not in ("", None):
                kwargs["help"] += " (default: %(default)s)"
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm-trainer",
        description="SLM Fleet trainer: the stages of the LLM-to-SLM conversion loop.",
    )
    parser.add_argument(
        "--result-path",
        default=None,
        help=f"where to write the TrainerResult JSON (default: {TERMINATION_LOG} if writable; "
        "'' to skip)",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, module_name in STAGES.items():
        module = importlib.import_module(module_name)
        doc = (module.Args.__doc__ or "").strip()
        stage_parser = sub.add_parser(name, help=doc.split("\n")[0], description=doc)
        add_dataclass_arguments(stage_parser, module.Args)
        stage_parser.add_argument(
            "--result-path", default=argparse.SUPPRESS, help="as above; may follow the stage"
        )
    return parser


def write_result(result: TrainerResult, path: str) -> None:
    if not path:
        return
    try:
        result.write(path)
    except OSError as exc:
        emit({"event": "warning", "message": f"could not write result to {path}: {exc}"})


def main(argv: Sequence[str] | None = None) -> int:
    # Installed first: as the container's PID 1 the trainer would otherwise drop a SIGTERM
    # (the kernel's rule for PID 1 without a handler) and run on until SIGKILL. It counts
    # this run's SIGTERMs only: an earlier run in the process that saw one must not make a
    # later run's reported failure read as preempted (143).
    with preemption.StageSigterm() as sigterm:
        return _run_stage(argv, sigterm)


def _run_stage(argv: Sequence[str] | None, sigterm: preemption.StageSigterm) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    module = importlib.import_module(STAGES[ns.stage])
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(module.Args)}
    try:
        args = module.Args(**values)
    except (TypeError, ValueError) as exc:
        parser.error(f"{ns.stage}: {exc}")  # exits 2
    result_path = default_result_path() if ns.result_path is None else ns.result_path
    global _ARG_URIS
    _ARG_URIS = tuple(v for v in values.values() if isinstance(v, str) and "://" in v)

    emit(
        {
            "event": "start",
            "stage": ns.stage,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in values.items()},
        }
    )
    crashed = bad_arguments = False
    candidate = getattr(args, "candidate", None)
    try:
        try:
            sigterm.arm()
            result = module.run(args, emit)
        finally:
            sigterm.disarm()  # the result below is written whole, whatever comes now
    except preemption.Terminated:
        # Outside a training loop: what the stage wrote is whole (see StageSigterm), and a
        # finetune's next pod resumes from its last checkpoint.
        result = TrainerResult(
            stage=module.CONTRACT_STAGE,
            ok=False,
            candidate=candidate if isinstance(candidate, str) else None,
            message=f"{ns.stage} preempted by SIGTERM before it finished; "
            f"{preemption.RERUN_TO_RESUME}",
        )
    except BadArguments as exc:
        sys.stderr.write(redact_uris(f"{parser.prog} {ns.stage}: error: {exc}\n", *_ARG_URIS))
        bad_arguments = True
        result = TrainerResult(
            stage=module.CONTRACT_STAGE,
            ok=False,
            candidate=candidate if isinstance(candidate, str) else None,
            message=f"{ns.stage}: bad arguments: {exc}",
        )
    except Exception as exc:
        # The traceback's messages (fsspec's, aiohttp's) may quote the URI it failed on.
        sys.stderr.write(redact_uris("".join(traceback.format_exception(exc)), *_ARG_URIS))
        sys.stderr.flush()
        crashed = True
        result = TrainerResult(
            stage=module.CONTRACT_STAGE,
            ok=False,
            message=f"{ns.stage} crashed: {type(exc).__name__}: {exc}",
        )
    # The termination message goes to the operator's conditions and Events verbatim, and
    # the pod's status (all of it, artifact URI included) to whoever may read pods.
    result = dataclasses.replace(
        result,
        message=redact_uris(result.message, *_ARG_URIS),
        artifact_uri=result.artifact_uri and redact_uris(result.artifact_uri, *_ARG_URIS),
    )
    try:
        result.to_json()
    except ContractError as exc:
        # Only the message can be cut; a field that cannot (an artifact URI of kilobytes read
        # from a candidate's result.json) crashed here with the file already emptied, and the
        # operator read nothing. The same run gives the same result: a reported failure.
        result = TrainerResult(
            stage=result.stage,
            ok=False,
            message=f"{ns.stage}: its result cannot be reported: {exc} "
            f"(artifact_uri is {len((result.artifact_uri or '').encode())} bytes, candidate "
            f"{len((result.candidate or '').encode())})",
        )
    write_result(result, result_path)
    emit({"event": "result", **json.loads(result.to_json())})
    if result.ok:
        return 0
    if crashed:
        return EXIT_CRASHED
    if bad_arguments:
        return EXIT_BAD_ARGUMENTS
    return EXIT_PREEMPTED if sigterm.received() else EXIT_REPORTED
