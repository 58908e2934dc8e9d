"""``make test`` (what CI runs) hands a SIGTERM to pytest, whose fixtures then stop the servers
they started. Its recipe used to be pytest inside a shell line that mapped exit code 5: make
signalled that shell, the shell died, and pytest ran on as an orphan that never heard of it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SLOW_TEST = """
import pathlib, time, pytest

@pytest.fixture
def server():
    pathlib.Path(__file__).with_name("started").write_text("")
    yield
    pathlib.Path(__file__).with_name("stopped").write_text("")

def test_slow(server):
    time.sleep(120)
"""

# the same SIGTERM handling as tests/conftest.py, for a test folder of its own
CONFTEST = """
import signal, threading

def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

def pytest_configure(config):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_a_sigterm_to_make_test_reaches_pytest_and_its_teardown(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_slow.py").write_text(SLOW_TEST)
    args = f"PYTEST_ARGS={tmp_path / 'test_slow.py'} -p no:cacheprovider -q"
    make = subprocess.Popen(
        ["make", "-s", "test", args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "started").exists(), "the slow test never started"
        make.send_signal(signal.SIGTERM)  # to make alone, as a CI runner's timeout does
        make.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not (tmp_path / "stopped").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "stopped").exists(), "pytest never got the SIGTERM: no teardown ran"
    finally:
        import os

        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-f", str(tmp_path / "test_slow.py")], check=False)


def test_no_test_collected_fails_make_test() -> None:
    """A selection that matches nothing is a failure (exit 1, from tests/conftest.py), not
    pytest's exit code 5, which a CI step might read as something other than a failure."""
    args = "PYTEST_ARGS=tests/unit/test_make_test.py -p no:cacheprovider -q -k nothing_matches"
    run = subprocess.run(["make", "-s", "test", args], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "Error 1" in run.stderr, run.stdout + run.stderr
