"""bench/gpu_check.sh, the one prepared device run of the trainer's GPU path, works end to end.

Why here: a GPU machine is lent to few sessions, for minutes, and cannot download anything.
A script that breaks on its first line there wastes that chance. Its small mode runs the same
steps on the CPU (lora where qlora needs a GPU), so CI keeps it working."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_and_writes_its_results(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GPU_CHECK_SMALL": "1",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "GPU_CARRY": str(tmp_path / "no-carry"),
    }
    # Its own session: on a timeout the whole group goes, not only bash (the script's
    # budget in small mode is 420 s, so this is a backstop).
    proc = subprocess.Popen(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-4000:]
    for step in ("env", "throughput", "qlora", "lora-gc", "selector"):
        assert f"== {step}: exit 0" in stdout, stdout[-4000:]
    assert "== 0 step(s) failed" in stdout

    figures = json.loads((tmp_path / "throughput.json").read_text())
    assert figures["ours"]["samples_per_second"] > 0 < figures["baseline"]["samples_per_second"]
    for name, checkpointing in (("qlora", False), ("lora-gc", True)):
        result = json.loads((tmp_path / f"{name}-result.json").read_text())
        assert result["ok"] and result["stage"] == "finetune", result
        assert result["train_examples"] > 0 and result["trainable_parameters"] > 0
        log = (tmp_path / f"{name}.log").read_text().splitlines()
        started = json.loads(next(line for line in log if '"event": "start"' in line))
        assert started["args"]["gradient_checkpointing"] is checkpointing
    selector = json.loads((tmp_path / "selector-result.json").read_text())
    assert selector["ok"] and selector["stage"] == "finetune", selector
    assert selector["message"].startswith("selector "), selector["message"]
    # a device call brings back 8 files at most: the script must not write more
    assert len(list(tmp_path.iterdir())) <= 8, sorted(p.name for p in tmp_path.iterdir())
