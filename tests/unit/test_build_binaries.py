"""e2e/build-binaries.sh: two builds into one cache take turns instead of deleting each
other's work."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slm_e2e.testing import wait_for

SCRIPT = Path(__file__).resolve().parents[2] / "e2e" / "build-binaries.sh"


def _helm_version() -> str:
    for line in (SCRIPT.parent / "versions.env").read_text().splitlines():
        if line.startswith("HELM_VERSION="):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("HELM_VERSION not in versions.env")


def test_a_second_build_waits_for_the_first_then_finds_the_binaries_cached(
    tmp_path: Path,
) -> None:
    if not (Path("/usr/local/go/bin/go").exists() or shutil.which("go")):
        pytest.skip("the script needs the Go toolchain")
    if not shutil.which("flock"):
        pytest.skip("flock (util-linux) is not installed: the script builds without a lock")
    cache = tmp_path / "cache"
    # What the first build will have left when it is done: a finished helm folder.
    done = cache / "bin" / f"helm-{_helm_version()}"
    done.mkdir(parents=True)
    env = {**os.environ, "SLM_FLEET_CACHE": str(cache)}
    with open(cache / "build.lock", "w") as first:
        fcntl.flock(first, fcntl.LOCK_EX)  # the first build, still running
        log = tmp_path / "second.log"
        with log.open("w") as out:
            second = subprocess.Popen(
                ["bash", str(SCRIPT), "helm"], env=env, stderr=out, start_new_session=True
            )
        try:
            wait_for(
                lambda: "waiting for it to finish" in log.read_text(),
                timeout=30,
                what="the second build to say it waits",
            )
            time.sleep(1.0)
            assert second.poll() is None, "the second build went on while the first held the lock"
            (done / ".complete").write_text("2026-12-02T00:00:00Z\n")
            fcntl.flock(first, fcntl.LOCK_UN)
            assert second.wait(timeout=30) == 0, log.read_text()
        finally:
            if second.poll() is None:  # a failed check: it must not go on to build helm
                os.killpg(second.pid, signal.SIGKILL)
                second.wait(timeout=10)
    text = log.read_text()
    assert "cached" in text and "redoing" not in text, text
