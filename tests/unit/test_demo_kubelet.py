"""The demo's stand-in kubelet: it must not leave a trainer running when the demo ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slm_e2e.demo import TrainerKubelet
from slm_e2e.signals import STOP_SIGNALS
from slm_e2e.testing import wait_for


def test_closing_the_demo_kubelet_stops_the_trainer_it_runs(tmp_path: Path) -> None:
    """The demo ran each trainer with subprocess.run from a daemon thread, in the demo's own
    process group: a demo that failed, timed out or was stopped left a CPU training running
    (it ran on, parented to init)."""
    kubelet = TrainerKubelet(None, tmp_path, tmp_path)  # type: ignore[arg-type]
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    kubelet.child = trainer
    kubelet.stop()
    assert trainer.poll() is not None  # stopped, and reaped
    assert kubelet.stopping.is_set() and kubelet.gate.is_set()  # its loop ends too


def _trainer_pod(name: str) -> dict[str, Any]:
    """A Running trainer pod whose container is a Python one-liner: it marks that it started
    (in the kubelet's working folder) and then trains for a minute."""
    script = f"import time; open('{name}.started', 'w').close(); time.sleep(60)"
    return {
        "metadata": {"name": name},
        "status": {"phase": "Running"},
        "spec": {
            "containers": [
                {"name": "t", "image": "trainer", "command": ["python", "-c"], "args": [script]}
            ]
        },
    }


class _Pods:
    """The cluster as the kubelet sees it: ``pods`` stay Running; pod status writes vanish."""

    def __init__(self, *names: str) -> None:
        self.items = [_trainer_pod(n) for n in names]

    def kubectl(self, *args: str, check: bool = True, **_: Any) -> subprocess.CompletedProcess[str]:
        out = json.dumps({"items": self.items}) if args[0] == "get" else ""
        return subprocess.CompletedProcess(args, 0, out, "")


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[TrainerKubelet]:
    """A kubelet over two Running trainer pods; whatever trainer it left is killed after."""
    k = TrainerKubelet(_Pods("trainer-a", "trainer-b"), tmp_path, tmp_path)  # type: ignore[arg-type]
    yield k
    k.stopping.set()
    k.gate.set()
    k.thread.join(timeout=20)
    if k.child is not None and k.child.poll() is None:
        k.child.kill()
        k.child.wait()


def test_no_trainer_is_started_after_the_kubelet_is_stopped(
    kubelet: TrainerKubelet, tmp_path: Path
) -> None:
    """stop() killed the trainer it found, and the loop went on to start the next Running
    pod's trainer, which outlived the demo."""
    kubelet.thread.start()
    kubelet.gate.set()
    wait_for(lambda: (tmp_path / "trainer-a.started").exists(), timeout=30, what="trainer-a")
    kubelet.stop()
    kubelet.thread.join(timeout=20)
    assert not (tmp_path / "trainer-b.started").exists(), "a trainer started after stop()"
    assert not kubelet.thread.is_alive()


def test_a_trainer_started_while_the_demo_ignores_stop_signals_still_obeys_sigterm(
    kubelet: TrainerKubelet, tmp_path: Path
) -> None:
    """The demo ignores SIGTERM, SIGHUP and Ctrl-C while it cleans up (and after a first
    SIGTERM); a trainer started then inherited that, in a session of its own: it ignored the
    SIGTERM that asks it to checkpoint and stop, and every signal a user could send it."""
    sigs = (*STOP_SIGNALS, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in sigs}
    try:
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        kubelet.thread.start()
        kubelet.gate.set()
        wait_for(lambda: (tmp_path / "trainer-a.started").exists(), timeout=30, what="trainer")
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    trainer = kubelet.child
    assert trainer is not None
    kubelet.stop()
    assert trainer.returncode == -signal.SIGTERM  # not SIGKILLed after the 10 s grace
