"""``slm-fleet-cluster`` as a user meets it: ``up`` on a cluster that already runs keeps it and
says so, ``up`` on one that cannot be kept says why before it starts over (new certificates,
empty etcd), and ``status`` exits 1 unless the cluster runs and its apiserver is ready.

The unit tests use ``sleep`` stand-ins; the one marked ``integration`` runs a real cluster of
its own (about 10 s per start)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from slm_e2e import cluster as clustermod
from slm_e2e.binaries import BinariesMissing, locate
from slm_e2e.cluster import COMPONENTS, LocalCluster, State, fake_nodes_ready, free_port
from slm_e2e.testing import wait_for

REPO = Path(__file__).resolve().parents[2]
SLEEP = shutil.which("sleep") or "/bin/sleep"


def _node(name: str, ready: bool, fake: bool = True) -> dict[str, object]:
    meta: dict[str, object] = {"name": name}
    if fake:
        meta["annotations"] = {"kwok.x-k8s.io/node": "fake"}
    cond = {"type": "Ready", "status": "True" if ready else "False"}
    return {"metadata": meta, "status": {"conditions": [cond]}}


@pytest.mark.parametrize(
    ("nodes", "ready"),
    [
        ([_node("kwok-gpu-0", True), _node("kwok-cpu-0", True)], True),
        # a node a user added by hand: no kubelet plays it here, it is never Ready
        ([_node("kwok-gpu-0", True), _node("kwok-cpu-0", True), _node("mine", False, False)], True),
        ([_node("kwok-gpu-0", True), _node("kwok-cpu-0", False)], False),
        ([_node("kwok-gpu-0", True), _node("mine", True, False)], False),  # one fake node short
    ],
)
def test_only_the_fake_nodes_the_tool_made_count_for_readiness(
    nodes: list[dict[str, object]], ready: bool
) -> None:
    assert fake_nodes_ready(nodes, expected=2) is ready


# ---------------------------------------------------------------- status
@pytest.fixture
def standins() -> Iterator[dict[str, int]]:
    """Five live processes, each in a session of its own as ``up`` starts them."""
    procs = {c: subprocess.Popen([SLEEP, "300"], start_new_session=True) for c in COMPONENTS}
    try:
        wait_for(
            lambda: all(clustermod._pid_alive(p.pid, SLEEP) for p in procs.values()),
            timeout=10,
            interval=0.02,
            what="the stand-ins to run",
        )
        yield {c: p.pid for c, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=10)


@pytest.mark.parametrize(
    ("state", "apiserver_ready", "code"),
    [
        ("never started", False, 1),
        ("stopped", False, 1),
        ("running", False, 1),
        ("running", True, 0),
    ],
)
def test_status_exits_0_only_when_the_cluster_runs_and_serves(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    standins: dict[str, int],
    state: str,
    apiserver_ready: bool,
    code: int,
) -> None:
    if state != "never started":
        State(
            dir=str(tmp_path),
            ports={"apiserver": free_port()},
            pids=standins if state == "running" else {},
            binaries=dict.fromkeys(COMPONENTS, SLEEP),
            ready_seconds=9.9,
        ).save()
    monkeypatch.setattr(
        LocalCluster, "_get", lambda self, url, tls=False: (200 if apiserver_ready else 0, "")
    )
    assert clustermod.main(["status", "--dir", str(tmp_path)]) == code
    shown = json.loads(capsys.readouterr().out)  # printed whatever the answer
    assert shown["running"] is (state == "running")


# ---------------------------------------------------------------- up on an existing cluster
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(str(REPO / d) for d in ("e2e", "operator"))
    return subprocess.run(
        [sys.executable, "-m", "slm_e2e", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": path},
    )


@pytest.mark.integration
@pytest.mark.slow
def test_up_keeps_a_running_cluster_and_says_why_it_starts_one_over(tmp_path: Path) -> None:
    """A node added by hand (never Ready: no kubelet plays it) made ``up`` tear down the whole
    cluster, with every object and certificate in it, and report the new start just like a
    reuse; a dead component did the same without a word."""
    try:
        kubectl = locate().kubectl
    except BinariesMissing as exc:
        pytest.skip(f"needs the local control plane's binaries: {exc}")
    d = str(tmp_path / "c")
    try:
        first = _cli("up", "--dir", d)
        assert first.returncode == 0, first.stderr
        assert _cli("status", "--dir", d).returncode == 0

        def kc(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(kubectl), f"--kubeconfig={d}/kubeconfig", *args],
                input=input, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        assert kc("create", "namespace", "kept").returncode == 0
        by_hand = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "by-hand"}}
        assert kc("create", "-f", "-", input=json.dumps(by_hand)).returncode == 0

        again = _cli("up", "--dir", d)
        assert again.returncode == 0, again.stderr
        assert kc("get", "namespace", "kept").returncode == 0, "the cluster was started over"
        assert "already running" in again.stderr, again.stderr

        kwok = State.load(Path(d)).pids["kwok"]  # type: ignore[union-attr]
        os.kill(kwok, signal.SIGKILL)
        wait_for(lambda: not clustermod._pid_alive(kwok), timeout=10, what="kwok to die")
        over = _cli("up", "--dir", d)
        assert over.returncode == 0, over.stderr
        assert "kwok" in over.stderr and "from scratch" in over.stderr, over.stderr
        assert "already running" not in over.stderr, over.stderr
    finally:
        with contextlib.suppress(Exception):
            LocalCluster(Path(d)).down()
    assert _cli("status", "--dir", d).returncode == 1
