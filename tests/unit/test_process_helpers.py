"""The helpers that start real servers for tests, benchmarks and the demo clean up after
themselves: every test run starts dozens of them, and each used to leave its temporary
directory (port file, log) in /tmp for good, or, interrupted while it waited, the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_e2e import llm_standin
from slm_e2e.testing import wait_for
from slm_gateway import testing as gateway_testing
from slm_gateway.testing import await_ready, start_gateway, stop_child


def test_the_stand_in_removes_its_directory_on_stop() -> None:
    standin = llm_standin.start()
    workdir = standin.workdir
    assert workdir is not None and (workdir / "port").exists()
    standin.stop()
    assert not workdir.exists()
    standin.stop()  # a second stop is harmless


def test_the_gateway_removes_its_directory_and_keeps_its_log_readable(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    task = {"mode": "llm", "llmBaseURL": "http://127.0.0.1:9/v1", "llmModel": "m"}
    routes.write_text(yaml.safe_dump({"tasks": {"t": task}}))
    with start_gateway(["--routes", str(routes)]) as gw:
        workdir = gw.workdir
        assert workdir is not None and gw.log_path.is_relative_to(workdir)
    assert not workdir.exists()
    assert "Uvicorn running" in gw.log() or "Application startup complete" in gw.log()


def test_a_log_the_caller_placed_is_left_where_it_is(tmp_path: Path) -> None:
    log = tmp_path / "standin.log"
    with llm_standin.start(log_path=log) as standin:
        workdir = standin.workdir
    assert workdir is not None and not workdir.exists()
    assert log.exists()


def _gone(pid: int) -> bool:
    """Whether ``pid`` is dead (a zombie waiting for its parent counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_a_start_interrupted_while_waiting_kills_the_child_and_what_it_started(
    tmp_path: Path,
) -> None:
    """A Ctrl-C (or a test timeout) during the wait must not leave the server running: the
    caller never got a handle to stop it."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    port_file, pid_file = workdir / "port", tmp_path / "grandchild.pid"
    child = (
        "import pathlib, subprocess, sys, time\n"
        "g = subprocess.Popen(['sleep', '60'])\n"
        "pathlib.Path(sys.argv[2]).write_text(str(g.pid))\n"
        "pathlib.Path(sys.argv[1]).write_text('9')\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(port_file), str(pid_file)], start_new_session=True
    )

    def interrupted(port: int) -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await_ready(proc, port_file, tmp_path / "log", workdir, interrupted, "child", 30)
    assert proc.poll() is not None
    wait_for(lambda: _gone(int(pid_file.read_text())), timeout=10, what="the grandchild to die")
    assert not workdir.exists()


def test_a_gateway_whose_start_is_interrupted_is_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(gateway_testing.subprocess, "Popen", recording_popen)

    def ctrl_c(self: Any, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        raise KeyboardInterrupt  # pressed while start_gateway asks /readyz

    monkeypatch.setattr(gateway_testing.GatewayProcess, "get", ctrl_c)
    routes = tmp_path / "routes.yaml"
    task = {"mode": "llm", "llmBaseURL": "http://127.0.0.1:9/v1", "llmModel": "m"}
    routes.write_text(yaml.safe_dump({"tasks": {"t": task}}))
    with pytest.raises(KeyboardInterrupt):
        start_gateway(["--routes", str(routes)])
    assert len(started) == 1
    assert started[0].poll() is not None, "the gateway outlived its interrupted start"


def test_a_child_stuck_in_its_shutdown_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """A server that ignores SIGTERM (a hung drain) is killed after the grace period, and its
    own children with it: killing the process alone would leave, for example, the gateway's
    capture workers or tritonserver's Python stubs running."""
    pid_file = tmp_path / "grandchild.pid"
    child = (
        "import signal, subprocess, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "pathlib.Path(sys.argv[1]).write_text(str(g.pid))\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, str(pid_file)], start_new_session=True)
    wait_for(pid_file.exists, timeout=20, what="the grandchild to start")
    status = stop_child(proc, grace=0.5)
    assert status == -9, "a child that ignores SIGTERM must be killed once the grace is over"
    wait_for(lambda: _gone(int(pid_file.read_text())), timeout=10, what="the grandchild to die")


def test_a_child_that_stops_on_sigterm_gets_to_stop_on_its_own() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_child(proc, grace=20) == -15
    assert stop_child(proc, grace=20) == -15  # a second stop is harmless
