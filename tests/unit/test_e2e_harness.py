"""The e2e harness cleans up after itself: a half-finished cluster start is not taken for a
running cluster, an interrupted operator start leaves no operator behind, and SIGTERM or
SIGHUP (a closed terminal) to the test session, the demo or ``slm-fleet-cluster up`` stops
every server they started. No real cluster: ``sleep`` processes stand in for the servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from slm_e2e.cluster import COMPONENTS, LocalCluster, State, _pid_alive, free_port
from slm_e2e.testing import OperatorProcess, wait_for

REPO = Path(__file__).resolve().parents[2]
SLEEP = shutil.which("sleep") or "/bin/sleep"


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent counts: it holds no port and no CPU)."""
    return not _pid_alive(pid)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _default_stop_signals() -> None:
    """Run in a driver before it execs. An ignored signal stays ignored across exec: under
    ``nohup make test &`` every driver got SIGHUP and SIGINT ignored, and kept them so."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


# ---------------------------------------------------------------- up after a killed up
@pytest.fixture
def running_components() -> Iterator[dict[str, int]]:
    """Five live processes, each in a session of its own as ``up`` starts them."""
    procs = {c: subprocess.Popen([SLEEP, "300"], start_new_session=True) for c in COMPONENTS}
    try:
        # until each has exec'd: the cluster recognises its components by their binary
        wait_for(
            lambda: all(_pid_alive(p.pid, SLEEP) for p in procs.values()),
            timeout=10,
            interval=0.02,
            what="the stand-ins to run",
        )
        yield {c: p.pid for c, p in procs.items()}
    finally:
        _kill([p.pid for p in procs.values()])
        for p in procs.values():
            p.wait(timeout=10)


@pytest.mark.parametrize(
    ("ready_seconds", "serving", "reused"),
    [
        (0.0, True, False),  # killed after spawning kwok, before it finished
        (12.3, False, False),  # finished once, but the apiserver or the nodes are not ready now
        (12.3, True, True),
    ],
)
def test_up_reuses_only_a_cluster_that_finished_starting_and_still_serves(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    running_components: dict[str, int],
    ready_seconds: float,
    serving: bool,
    reused: bool,
) -> None:
    old = State(
        dir=str(tmp_path),
        ports={"apiserver": free_port()},
        pids=running_components,
        binaries=dict.fromkeys(COMPONENTS, SLEEP),
        kubeconfig=str(tmp_path / "kubeconfig"),
        ready_seconds=ready_seconds,
    )
    old.save()
    fresh = State(dir=str(tmp_path), ready_seconds=4.2)
    started: list[bool] = []

    def start_all(self: LocalCluster) -> State:
        started.append(True)
        return fresh

    monkeypatch.setattr(LocalCluster, "_start_all", start_all)
    monkeypatch.setattr(
        LocalCluster, "_get", lambda self, url, tls=False: (200 if serving else 0, "")
    )
    monkeypatch.setattr(LocalCluster, "_nodes_ready", lambda self: serving)

    said: list[str] = []
    c = LocalCluster(tmp_path)
    st = c.up(say=said.append)

    assert c.reused is reused
    if reused:
        assert (st, started, said) == (old, [], [])
        assert not any(_gone(pid) for pid in running_components.values())
    else:
        assert st is fresh, f"reused a cluster that is not ready: {st}"
        assert started == [True]
        assert all(_gone(pid) for pid in running_components.values()), "old components left"
        # why, before all its objects and certificates are replaced
        assert len(said) == 1 and "from scratch" in said[0], said


# ---------------------------------------------------------------- an interrupted operator start
FAKE_OPERATOR = """#!/bin/sh
# Stand-in for slm-fleet-operator: starts a child, never serves /metrics.
# Each pid is written whole before its file appears, the operator's first: the test reads
# both as soon as the child's exists.
echo $$ > "$FAKE_PIDS/.operator" && mv "$FAKE_PIDS/.operator" "$FAKE_PIDS/operator"
sleep 300 &
echo $! > "$FAKE_PIDS/.child" && mv "$FAKE_PIDS/.child" "$FAKE_PIDS/child"
wait
"""


@pytest.mark.parametrize("how", ["interrupted", "timed out"])
def test_an_operator_whose_start_is_interrupted_is_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The fixtures call ``start()`` with no try: a Ctrl-C or a timeout while it waits for
    /metrics left the operator running, since the caller never got a handle to stop it."""
    bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
    bin_dir.mkdir()
    pids.mkdir()
    (bin_dir / "slm-fleet-operator").write_text(FAKE_OPERATOR)
    (bin_dir / "slm-fleet-operator").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))  # start() looks beside it
    real_wait = OperatorProcess._metrics_bound

    def wait_metrics(self: OperatorProcess, offset: int) -> bool:
        wait_for(lambda: (pids / "child").exists(), timeout=10, interval=0.05, what="the child")
        if how == "interrupted":
            raise KeyboardInterrupt
        return real_wait(self, offset, timeout=0.5)

    monkeypatch.setattr(OperatorProcess, "_metrics_bound", wait_metrics)
    op = OperatorProcess(
        "unused-kubeconfig",
        "ns",
        tmp_path / "operator.log",
        extra_env={"FAKE_PIDS": str(pids)},
        metrics_port=free_port(),
    )
    try:
        with pytest.raises(KeyboardInterrupt if how == "interrupted" else TimeoutError):
            op.start()
        started = [int((pids / name).read_text()) for name in ("operator", "child")]
        wait_for(
            lambda: all(_gone(pid) for pid in started),
            timeout=10,
            what="the operator and its child to be stopped",
        )
    finally:  # what a failed check left
        _kill([int(t) for p in pids.iterdir() if (t := p.read_text().strip())])


# ---------------------------------------------------------------- stop signals
#: Each driver starts a server in a session of its own (as every real one is started), writes
#: its pid to MARK/server.pid and MARK/started, then waits for the signal; stopping the server
#: is left to the program's own cleanup (a fixture's teardown, a finally, up()'s down()).
_SERVER = (
    "import os, pathlib, subprocess, time\n"
    "MARK = pathlib.Path(os.environ['MARK'])\n"
    "def serve():\n"
    f"    p = subprocess.Popen([{SLEEP!r}, '300'], start_new_session=True)\n"
    "    (MARK / 'server.pid').write_text(str(p.pid))\n"
    "    return p\n"
)

PYTEST_DRIVER = _SERVER + textwrap.dedent("""
    import pytest

    @pytest.fixture(scope="session")
    def server():
        p = serve()
        yield
        p.kill()
        p.wait()

    def test_long(server):
        (MARK / "started").write_text("")
        time.sleep(60)
""")

DEMO_DRIVER = _SERVER + textwrap.dedent("""
    import sys
    import slm_e2e.demo as demo

    def run(work, n_relevant, n_irrelevant):
        p = serve()
        try:
            (MARK / "started").write_text("")
            time.sleep(60)
            return 0
        finally:
            p.kill()
            p.wait()

    demo.run = run
    sys.exit(demo.main(["--dir", str(MARK)]))
""")

CLUSTER_DRIVER = _SERVER + textwrap.dedent("""
    import sys
    from slm_e2e import cluster

    def start_all(self):
        self.state = cluster.State(dir=str(self.dir))
        self._spawn("etcd", [%r, "300"])
        (MARK / "server.pid").write_text(str(self.state.pids["etcd"]))
        (MARK / "started").write_text("")
        time.sleep(60)

    cluster.LocalCluster._start_all = start_all
    sys.exit(cluster.main(["up", "--dir", str(MARK / "cluster")]))
""") % (SLEEP,)


def _driver_argv(which: str, mark: Path) -> list[str]:
    if which == "pytest session":
        # tests/conftest.py as a plugin of a session that runs one slow test with a server
        (mark / "test_long.py").write_text(PYTEST_DRIVER)
        return [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
                "-q", "--rootdir", str(mark), str(mark / "test_long.py")]  # fmt: skip
    text = DEMO_DRIVER if which == "demo" else CLUSTER_DRIVER
    return [sys.executable, "-c", text]


@pytest.mark.parametrize(
    ("which", "sig"),
    [
        ("pytest session", signal.SIGHUP),
        ("demo", signal.SIGHUP),
        ("slm-fleet-cluster up", signal.SIGHUP),
        ("slm-fleet-cluster up", signal.SIGTERM),
    ],
)
def test_a_stop_signal_stops_every_server_the_program_started(
    tmp_path: Path, which: str, sig: signal.Signals
) -> None:
    mark = tmp_path / "mark"
    mark.mkdir()
    path = os.pathsep.join(str(REPO / d) for d in ("tests", "e2e", "operator", "trainer"))
    env = {**os.environ, "MARK": str(mark), "PYTHONPATH": path}
    with (tmp_path / "out").open("w") as out:
        driver = subprocess.Popen(
            _driver_argv(which, mark),
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_stop_signals,
        )
    server = 0
    try:
        wait_for(
            lambda: (mark / "started").exists() or driver.poll() is not None,
            timeout=60,
            interval=0.05,
            what=f"{which} to start its server",
        )
        assert driver.poll() is None, (tmp_path / "out").read_text()
        server = int((mark / "server.pid").read_text())
        driver.send_signal(sig)
        driver.wait(timeout=60)
        log = (tmp_path / "out").read_text()
        assert driver.returncode != -sig, f"{which} died of {sig.name} without cleaning up"
        wait_for(lambda: _gone(server), timeout=15, what=f"the server to be stopped:\n{log}")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        if server:
            _kill([server])


# ---------------------------------------------------------------- a Ctrl-C during teardown
#: The session's real ``cluster`` fixture (tests/conftest.py as a plugin), its start replaced by
#: five stand-ins whose argv holds the cluster's directory as the real components' do, and a
#: server torn down before it that takes a while to stop, as tritonserver does.
CLUSTER_FIXTURE_DRIVER = textwrap.dedent("""
    import os, pathlib, sys, time, types
    import pytest
    import conftest
    from slm_e2e import cluster

    MARK = pathlib.Path(os.environ["MARK"])
    STANDIN = "import time; time.sleep(300)"

    def start_all(self):
        self.state = cluster.State(dir=str(self.dir), ready_seconds=0.1)
        for name in cluster.COMPONENTS:
            self._spawn(name, [sys.executable, "-c", STANDIN, str(self.dir)])
        (MARK / "cluster-dir").write_text(str(self.dir))
        return self.state

    cluster.LocalCluster._start_all = start_all
    conftest._binaries_or_skip = lambda: types.SimpleNamespace(kubectl=pathlib.Path("kubectl"))

    @pytest.fixture(scope="session")
    def slow_server(cluster):
        yield
        (MARK / "tearing-down").write_text("")
        time.sleep(float(os.environ["TEARDOWN_S"]))
        (MARK / "torn-down").write_text("")

    def test_long(slow_server):
        (MARK / "started").write_text("")
        time.sleep(float(os.environ["TEST_S"]))
""")


def _pids_with_arg(arg: str) -> list[int]:
    """Processes whose argv holds ``arg``: what a leaked cluster component looks like."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and not _gone(int(proc.name)):
            with contextlib.suppress(OSError):
                if arg.encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize(
    ("when", "test_s", "teardown_s"),
    [
        # Ctrl-C stops the test, a second one lands while a server takes its time to stop
        ("a second Ctrl-C during teardown", 60, 4),
        # the tests passed and the user hits Ctrl-C once while the servers are being stopped
        ("a Ctrl-C during teardown", 0, 60),
    ],
)
def test_a_ctrl_c_during_teardown_leaves_no_cluster_running(
    tmp_path: Path, when: str, test_s: float, teardown_s: float
) -> None:
    """A KeyboardInterrupt in an earlier fixture's teardown skipped the cluster's: etcd, the
    apiserver and the rest stayed running, and the next run wiped their pid file."""
    mark = tmp_path / "mark"
    mark.mkdir()
    (mark / "test_cluster_session.py").write_text(CLUSTER_FIXTURE_DRIVER)
    path = os.pathsep.join(str(REPO / d) for d in ("tests", "e2e", "operator", "trainer"))
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env |= {"MARK": str(mark), "PYTHONPATH": path, "TEST_S": str(test_s)}
    env |= {"TEARDOWN_S": str(teardown_s)}
    argv = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
            "-s", "--rootdir", str(mark), f"--basetemp={tmp_path / 'bt'}",
            str(mark / "test_cluster_session.py")]  # fmt: skip
    with (tmp_path / "out").open("w") as out:
        driver = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_default_stop_signals,
        )  # fmt: skip
    cluster_dir = ""
    try:
        if test_s:
            wait_for(lambda: (mark / "started").exists() or driver.poll() is not None,
                     timeout=60, interval=0.05, what="the test to start")  # fmt: skip
            driver.send_signal(signal.SIGINT)
        wait_for(lambda: (mark / "tearing-down").exists() or driver.poll() is not None,
                 timeout=60, interval=0.05, what="the slow teardown")  # fmt: skip
        cluster_dir = (mark / "cluster-dir").read_text()
        assert driver.poll() is None, (tmp_path / "out").read_text()
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=60)
        log = (tmp_path / "out").read_text()
        wait_for(lambda: not _pids_with_arg(cluster_dir), timeout=15,
                 what=f"the cluster to be stopped after {when}:\n{log}")  # fmt: skip
        if test_s:  # the second Ctrl-C was ignored: the slow server was still stopped in full
            assert (mark / "torn-down").exists(), log
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        if cluster_dir:
            _kill(_pids_with_arg(cluster_dir))


# ---------------------------------------------------------------- nohup
IGNORED_HUP_DRIVER = textwrap.dedent("""
    import pathlib, sys, time
    from slm_e2e.signals import interrupt_on_stop_signals

    interrupt_on_stop_signals()
    pathlib.Path(sys.argv[1]).write_text("")
    time.sleep(60)
""")


def test_a_run_started_with_hangups_ignored_survives_a_hangup(tmp_path: Path) -> None:
    """``nohup make test &`` starts pytest (and ``nohup make demo &`` the demo) with SIGHUP
    ignored; the handler installed over it stopped the run when the terminal closed."""
    ready = tmp_path / "ready"
    path = os.pathsep.join(str(REPO / d) for d in ("e2e", "operator"))

    def like_nohup() -> None:
        _default_stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-c", IGNORED_HUP_DRIVER, str(ready)],
        env={**os.environ, "PYTHONPATH": path},
        start_new_session=True,
        preexec_fn=like_nohup,
    )
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=30, what="the run")
        proc.send_signal(signal.SIGHUP)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        assert proc.poll() is None, (
            f"stopped by a hangup it was started to ignore: {proc.returncode}"
        )
        proc.send_signal(signal.SIGTERM)  # not ignored: still a KeyboardInterrupt, which
        proc.wait(timeout=10)  # Python ends with SIGINT when nothing catches it
        assert proc.returncode == -signal.SIGINT
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
