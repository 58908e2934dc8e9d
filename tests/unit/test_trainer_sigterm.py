"""SIGTERM outside a training loop: the CLI ends the stage with exit 143 (as PID 1 too).

The operator's Jobs run ``slm-trainer`` as the container's PID 1, and the kernel drops a
signal to PID 1 that has no handler. These tests stand in for that with SIG_IGN (in process)
or run the trainer as PID 1 of a new PID namespace (``unshare``, where the machine allows it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from slm_contract import EXIT_PREEMPTED, TrainerResult
from slm_trainer import cli, preemption

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Args:
    """A stage that SIGTERMs itself outside any training loop."""

    candidate: str = "c"


@pytest.fixture
def as_pid1() -> Iterator[None]:
    """SIGTERM dropped unless handled, as the kernel treats PID 1 (SIG_IGN stands in)."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    import types

    module = types.ModuleType("fake_sigterm_stage")
    module.Args = Args  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    module.CONTRACT_STAGE = "finetune"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.STAGES, "sigterm-stage", module.__name__)


def _wait_for_signal() -> None:
    """Long enough that a handler that does not end the stage shows (the stage finishes)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_sigterm_while_a_stage_loads_ends_it_with_143_and_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_pid1: None
) -> None:
    """A SIGTERM while a stage loads its data or model (before any training loop) was
    dropped in a pod: the stage ran on, to the kubelet's SIGKILL (exit 137, no result)."""
    after: list[str] = []

    def run(args: Args, emit: Any) -> TrainerResult:
        os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends
        _wait_for_signal()
        after.append("ran on")
        return TrainerResult(stage="finetune", ok=True, candidate=args.candidate)

    register(monkeypatch, run)
    out = tmp_path / "result.json"
    started = time.monotonic()
    code = cli.main(["sigterm-stage", f"--result-path={out}"])
    assert code == EXIT_PREEMPTED
    assert not after and time.monotonic() - started < 1.5  # ended at once
    result = json.loads(out.read_text())
    assert result["ok"] is False and result["candidate"] == "c"
    assert result["message"] == (
        f"sigterm-stage preempted by SIGTERM before it finished; {preemption.RERUN_TO_RESUME}"
    )
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # put back as it was


def swallowing_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A module ``name`` whose import SIGTERMs the process and swallows what that raised,
    as torch's start-up does with numpy's import."""
    (tmp_path / f"{name}.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.01)\n"
        "except BaseException:\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_sigterm_inside_an_import_is_not_lost_to_code_that_swallows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_pid1: None
) -> None:
    """torch's start-up imports numpy from C and clears whatever that raised: a SIGTERM
    handled there vanished and the stage went on. Here a module swallows it the same way."""
    swallowing_module(tmp_path, monkeypatch, "swallowing_module")
    after: list[str] = []

    def run(args: Args, emit: Any) -> TrainerResult:
        import swallowing_module  # noqa: F401

        time.sleep(2.0)  # one blocking call (a big read, a socket wait): interrupted too
        after.append("ran on")
        return TrainerResult(stage="finetune", ok=True, candidate=args.candidate)

    register(monkeypatch, run)
    started = time.monotonic()
    code = cli.main(["sigterm-stage", f"--result-path={tmp_path / 'result.json'}"])
    assert code == EXIT_PREEMPTED and not after
    assert time.monotonic() - started < 1.0


def test_a_sigterm_retried_after_an_import_does_not_reach_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_pid1: None
) -> None:
    """The retry of a SIGTERM that came inside an import fired after its stage had
    returned, into the next run in the same process, which it ended as preempted."""
    swallowing_module(tmp_path, monkeypatch, "swallowing_module_quick")

    def first(args: Args, emit: Any) -> TrainerResult:
        import swallowing_module_quick  # noqa: F401

        return TrainerResult(stage="finetune", ok=True, candidate=args.candidate)

    def second(args: Args, emit: Any) -> TrainerResult:
        _wait_for_signal()
        return TrainerResult(stage="finetune", ok=True, candidate=args.candidate)

    register(monkeypatch, first)
    cli.main(["sigterm-stage", f"--result-path={tmp_path / 'first.json'}"])
    register(monkeypatch, second)
    assert cli.main(["sigterm-stage", f"--result-path={tmp_path / 'second.json'}"]) == 0
    assert json.loads((tmp_path / "second.json").read_text())["ok"] is True


def test_a_training_loop_honours_a_sigterm_that_came_earlier_in_its_run() -> None:
    """A cross-fitted fold's flag started lowered although the run's outer handler had
    taken a SIGTERM while the fold was set up: the fold trained to its end. A run that
    begins later starts afresh."""
    with preemption.SigtermFlag() as outer:  # cross-fitting's, around its folds
        os.kill(os.getpid(), signal.SIGTERM)
        assert outer.received
        with preemption.SigtermFlag() as fold:
            assert fold.received
    with preemption.SigtermFlag() as next_run:
        assert not next_run.received


def test_the_result_written_after_the_stage_is_never_cut_by_a_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_pid1: None
) -> None:
    """Once the stage has returned its result, a SIGTERM only counts: the result is written
    whole (an ok one stays ok), and the CLI exits as the result says."""

    def run(args: Args, emit: Any) -> TrainerResult:
        return TrainerResult(stage="finetune", ok=True, candidate=args.candidate)

    register(monkeypatch, run)
    real_write = cli.write_result

    def write_result(result: TrainerResult, path: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_signal()
        real_write(result, path)

    monkeypatch.setattr(cli, "write_result", write_result)
    out = tmp_path / "result.json"
    assert cli.main(["sigterm-stage", f"--result-path={out}"]) == 0
    assert json.loads(out.read_text())["ok"] is True


def _can_be_pid1() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rpf", "--kill-child", "--", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


DRIVER = """
import os, signal, sys, time, types
from dataclasses import dataclass
from slm_contract import TrainerResult
from slm_trainer import cli

@dataclass
class Args:
    '''Loads for a while, then succeeds.'''

def run(args, emit):
    print("LOADING", flush=True)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return TrainerResult(stage="prepare", ok=True)

m = types.ModuleType("pid1_stage")
m.Args, m.run, m.CONTRACT_STAGE = Args, run, "prepare"
sys.modules["pid1_stage"] = m
cli.STAGES["load"] = "pid1_stage"
sys.exit(cli.main(["load", "--result-path="]))
"""


@pytest.mark.skipif(not _can_be_pid1(), reason="no unprivileged PID namespace here")
def test_as_pid1_of_its_container_the_trainer_stops_on_sigterm() -> None:
    """The pod's case itself: the trainer is PID 1 (``unshare -p``), SIGTERM comes while
    the stage loads. It used to be dropped, and the stage ran until its end (or SIGKILL)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'trainer'}"}
    cmd = ["unshare", "-rpf", "--kill-child", "--", sys.executable, "-c", DRIVER]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("LOADING"):
                break
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        trainer = int(children[0])  # unshare forks: its child is PID 1 of the namespace
        started = time.monotonic()
        os.kill(trainer, signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == EXIT_PREEMPTED
    assert time.monotonic() - started < 4  # not after the 6 s it loads
