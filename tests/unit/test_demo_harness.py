"""The demo's traffic, verdict and exit code; the local cluster's PKI; the test session's
KUBECONFIG guard."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from slm_e2e import pki
from slm_e2e.binaries import CLUSTER_COMPONENTS, component_dirs
from slm_e2e.demo import Replay, end_summary, evaluation_report, manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cutting_gateway() -> Iterator[str]:
    """A gateway that answers every call with a body cut short (the connection closes after
    a few of the bytes its Content-Length promised)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b'x-slm-backend: llm\r\nContent-Length: 100\r\n\r\n{"id":'
                )

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


def test_calls_whose_answer_is_cut_short_count_as_failed_agent_calls(
    cutting_gateway: str,
) -> None:
    """http.client's IncompleteRead is no OSError: it ended each worker thread silently,
    uncounted, and the demo summed up "failed agent calls: 0" and exited 0."""
    calls = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(12)]
    replay = Replay(cutting_gateway, calls, rate=None, workers=3).start()
    replay.join()
    assert len(replay.failures) == 12  # every call, so each worker went on after the first
    assert replay.total() == 0


def test_the_demo_exits_1_and_names_each_stage_that_failed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    failed = ["capture (3 failed agent calls)", "evaluation (no active revision to evaluate)"]
    assert end_summary(failed) == 1
    out = capsys.readouterr().out
    assert "failed stages" in out and all(stage in out for stage in failed), out


def test_a_demo_with_no_failed_stage_ends_its_summary_as_before(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert end_summary([]) == 0
    assert capsys.readouterr().out == "=" * 57 + "\n"


def test_a_failed_closing_evaluation_is_reported_as_failed(tmp_path: Path) -> None:
    """A served revision without its eval data: slm-trainer evaluate fails, and the demo
    showed its message as the verdict but still exited 0."""
    spec = manifest("http://127.0.0.1:9", "m")["spec"]
    verdict, ok = evaluation_report(tmp_path / "revision", spec, tmp_path / "evaluation")
    assert not ok
    assert "no eval data" in verdict


def test_private_keys_are_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each key was written with the umask's 0644 and only then made 0600: readable by any
    user while it was written; the PKI folder itself was 0755."""
    modes: list[tuple[str, int]] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        modes.append((Path(path).name, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(Path, "chmod", lambda self, mode, **kw: None)  # no 0600 after the fact
    old = os.umask(0o022)  # the common default, under which a plain write gives 0644
    try:
        p = pki.generate(tmp_path / "pki")
    finally:
        os.umask(old)
    keys = [p.ca_key, p.serving_key, p.admin_key, p.sa_key]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert {name for name, mode in modes if mode == 0o600} >= {k.name for k in keys}, modes
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700


def test_a_kubeconfig_list_is_refused_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    """kubectl accepts KUBECONFIG=a:b (it merges the files); the session fixture read it as one
    path and crashed with FileNotFoundError instead of refusing it as it refuses a foreign
    cluster."""
    cache = tmp_path / "cache"
    for name in CLUSTER_COMPONENTS:  # "built" binaries: the fixture looks for them first
        done = cache / "bin" / component_dirs()[name].name
        done.mkdir(parents=True)
        (done / ".complete").write_text("stand-in\n")
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs_cluster.py").write_text("def test_it(cluster):\n    pass\n")
    other = tmp_path / "prod-kubeconfig"
    other.write_text("apiVersion: v1\nkind: Config\ncurrent-context: my-prod\n")
    env = {
        **os.environ,
        "KUBECONFIG": f"{other}{os.pathsep}{tmp_path / 'missing'}",
        "SLM_FLEET_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("operator", "trainer", "e2e")),
    }
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_needs_cluster.py"]
    cp = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 2, out
    assert "FileNotFoundError" not in out, out
    assert "lists several files" in out, out
