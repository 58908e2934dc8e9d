"""The demo's stand-in kubelet: it must not leave a trainer running when the demo ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from slm_e2e.demo import TrainerKubelet


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
