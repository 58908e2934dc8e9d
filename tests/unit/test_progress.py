"""The progress reporter: JSON lines, Prometheus gauges, the pod annotation, and never failing."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import REGISTRY

from slm_trainer import progress as progress_mod
from slm_trainer.progress import ANNOTATION, PodAnnotator, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gauge(name: str, candidate: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"candidate": candidate})


def test_json_lines_and_gauges() -> None:
    events: list[dict[str, Any]] = []
    clock = Clock()
    p = Progress(events.append, "smollm-a", total_steps=8, env={}, clock=clock)
    clock.now += 10
    first = p.update(2, loss=1.23456789)
    assert first == {
        "event": "progress",
        "stage": "finetune",
        "candidate": "smollm-a",
        "step": 2,
        "total_steps": 8,
        "loss": 1.234568,
        "percent": 25.0,
        "eta_seconds": 30.0,  # 5 s per step, 6 steps left
    }
    assert json.loads(json.dumps(events[-1])) == first  # one JSON line each
    assert gauge("slm_trainer_progress_percent", "smollm-a") == 25.0
    assert gauge("slm_trainer_loss", "smollm-a") == pytest.approx(1.23456789)
    clock.now += 30
    last = p.update(8, loss=0.5, epoch=2)
    assert last["percent"] == 100.0 and last["eta_seconds"] == 0.0 and last["epoch"] == 2
    assert gauge("slm_trainer_progress_percent", "smollm-a") == 100.0
    p.close()


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinite_loss_is_null_in_the_progress_line(loss: float) -> None:
    """A diverged step's loss went out as ``"loss": NaN``, which is no JSON: strict readers
    of the log refused the line. The line says null; the gauge keeps the value."""
    events: list[dict[str, Any]] = []
    p = Progress(events.append, "diverged", total_steps=4, env={}, clock=Clock())
    event = p.update(1, loss=loss)
    assert event["loss"] is None and events[-1]["loss"] is None
    json.dumps(events[-1], allow_nan=False)
    value = gauge("slm_trainer_loss", "diverged")
    assert value is not None and (math.isnan(value) if math.isnan(loss) else value == loss)


def test_eta_counts_only_steps_done_in_this_attempt() -> None:
    clock = Clock()
    p = Progress(lambda e: None, "c", total_steps=10, env={}, clock=clock, start_step=6)
    clock.now += 4
    assert p.update(8)["eta_seconds"] == 4.0  # 2 s per step since the resume, 2 left


def test_outside_a_pod_the_annotation_is_skipped_cleanly(tmp_path: Path) -> None:
    assert PodAnnotator.from_environment({}) is None
    env = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert PodAnnotator.from_environment(env, token_dir=tmp_path) is None  # no token mounted
    p = Progress(lambda e: None, "c", total_steps=2, env=env)
    assert p.annotator is None
    p.update(1, 0.1)
    p.close()


def test_a_failing_emitter_never_stops_training() -> None:
    def broken(event: dict[str, Any]) -> None:
        raise OSError("stdout closed")

    p = Progress(broken, "c", total_steps=3, env={})
    assert p.update(1, 2.0)["percent"] == pytest.approx(33.33)
    p.close()


class _ApiServer:
    """A stand-in kube-apiserver that records pod patches (or refuses them)."""

    def __init__(self, status: int = 200) -> None:
        self.patches: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.patches.append(
                    {
                        "path": self.path,
                        "body": json.loads(body),
                        "content_type": self.headers["Content-Type"],
                        "auth": self.headers["Authorization"],
                    }
                )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[_ApiServer]:
    server = _ApiServer()
    yield server
    server.close()


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    (tmp_path / "token").write_text("s3cret\n")
    return tmp_path


def wait_for(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_in_a_pod_the_percent_is_patched_rate_limited(api: _ApiServer, token_dir: Path) -> None:
    annotator = PodAnnotator("train-0", "team", api.url, token_dir=token_dir, interval=30.0)
    p = Progress(lambda e: None, "c", total_steps=10, env={}, annotator=annotator)
    p.update(1)
    wait_for(lambda: len(api.patches) == 1)
    for step in range(2, 10):  # all inside the 30 s interval: not sent
        p.update(step)
    time.sleep(0.2)
    assert len(api.patches) == 1
    p.update(10)  # the end is always sent at once
    wait_for(lambda: len(api.patches) == 2)
    p.close()
    first, last = api.patches
    assert first["path"] == "/api/v1/namespaces/team/pods/train-0"
    assert first["content_type"] == "application/merge-patch+json"
    assert first["auth"] == "Bearer s3cret"
    assert first["body"] == {"metadata": {"annotations": {ANNOTATION: "10"}}}
    assert last["body"]["metadata"]["annotations"][ANNOTATION] == "100"


def test_a_run_inside_a_longer_one_reports_the_whole_run_s_percent() -> None:
    """Cross-fitting trains K fold models and a final one, each a Progress of its own: each
    reported 0-100 %, and the operator read 100 % after the first fold."""
    events: list[dict[str, Any]] = []
    for offset, total in ((0, 4), (4, 4), (8, 2)):
        p = Progress(events.append, "c", total, env={}, offset=offset, overall_total=10)
        for step in range(1, total + 1):
            p.update(step, fold=str(offset))
        p.close()
    percents = [e["percent"] for e in events]
    assert percents == [10.0 * i for i in range(1, 11)]
    assert events[3]["step"] == events[3]["total_steps"] == 4  # this run's own steps
    assert events[3]["overall_step"] == 4 and events[3]["overall_total_steps"] == 10
    assert events[0]["fold"] == "0" and events[-1]["fold"] == "8"


def test_close_flushes_the_last_percent(api: _ApiServer, token_dir: Path) -> None:
    annotator = PodAnnotator("p", "ns", api.url, token_dir=token_dir, interval=30.0)
    annotator.set("5")
    wait_for(lambda: len(api.patches) == 1)
    annotator.set("42")
    annotator.close()
    assert [p["body"]["metadata"]["annotations"][ANNOTATION] for p in api.patches] == ["5", "42"]


def test_a_forbidden_patch_disables_the_annotator(token_dir: Path) -> None:
    server = _ApiServer(status=403)
    warnings: list[dict[str, Any]] = []
    try:
        annotator = PodAnnotator(
            "p", "ns", server.url, token_dir=token_dir, interval=0.0, emit=warnings.append
        )
        annotator.set("10")
        wait_for(lambda: annotator.disabled)
        annotator.set("20")
        annotator.close()
        assert len(server.patches) == 1
        assert warnings and "403" in warnings[0]["message"]
    finally:
        server.close()


def test_metrics_endpoint_when_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(progress_mod, "_server_port", None)
    p = Progress(
        lambda e: None, "served", total_steps=4, env={"SLM_TRAINER_METRICS_PORT": str(port)}
    )
    assert p.metrics_port == port
    p.update(3, loss=0.25)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'slm_trainer_progress_percent{candidate="served"} 75.0' in text
    assert 'slm_trainer_loss{candidate="served"} 0.25' in text
    p.close()
