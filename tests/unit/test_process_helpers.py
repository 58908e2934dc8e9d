"""The helpers that start real servers for tests, benchmarks and the demo clean up after
themselves: every test run starts dozens of them, and each used to leave its temporary
directory (port file, log) in /tmp for good, or, interrupted while it waited, the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_e2e import llm_standin
from slm_e2e.testing import wait_for
from slm_gateway import testing as gateway_testing
from slm_gateway.testing import await_ready, start_gateway, stop_child

REPO = Path(__file__).resolve().parents[2]


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


def test_a_second_sigterm_does_not_cut_the_test_runs_teardown_short(tmp_path: Path) -> None:
    """A CI timeout signals the whole process group, so pytest gets SIGTERM twice (once
    itself, once passed on by make). The project's conftest turns the first into a
    KeyboardInterrupt so that fixtures tear down; the second used to interrupt that, leaving
    the local control plane running (its pid file already deleted with pytest's tmp folder)."""
    project_conftest = str(REPO / "tests" / "conftest.py")
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('project_conftest', {project_conftest!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "pytest_configure = mod.pytest_configure\n"
    )
    (tmp_path / "test_hold.py").write_text(
        "import os, time, pytest\n"
        "@pytest.fixture(scope='session')\n"
        "def server(tmp_path_factory):\n"
        "    state = tmp_path_factory.mktemp('state') / 'pids'\n"
        "    state.write_text('123')\n"
        "    yield\n"
        "    time.sleep(1)  # stopping servers takes a while\n"
        "    with open(os.environ['REPORT'], 'w') as fh:\n"
        "        fh.write(str(state.exists()))\n"
        "def test_hold(server):\n"
        "    open(os.environ['READY'], 'w').close()\n"
        "    time.sleep(120)\n"
    )
    ready, report = tmp_path / "ready", tmp_path / "report"
    env = {**os.environ, "READY": str(ready), "REPORT": str(report)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            os.devnull,
            "--rootdir",
            str(tmp_path),
            "--basetemp",
            str(tmp_path / "base"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(ready.exists, timeout=60, what="the test to start")
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.3)  # the second arrives while the first is being handled
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert report.exists(), "the session fixture's teardown did not run to its end"
    assert report.read_text() == "True", "the fixture's state was deleted before its teardown"
