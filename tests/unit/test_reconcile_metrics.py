"""When a reconcile asks Prometheus: only when the plan will judge a live-control window."""

from __future__ import annotations

import copy
import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from test_plan import HEALTHY, NOW, _serving_task, _step, conds

from slm_e2e.testing import send_json
from slm_operator import conditions as c
from slm_operator import reconcile as rc
from slm_operator.prom import PromMetrics


class Prometheus:
    """A real HTTP server answering every instant query with 1, counting the queries."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.queries.append(self.path)
                vector = {"resultType": "vector", "result": [{"metric": {}, "value": [0, "1"]}]}
                send_json(self, {"status": "success", "data": vector})

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def prometheus() -> Iterator[Prometheus]:
    p = Prometheus()
    yield p
    p.server.shutdown()
    p.server.server_close()


class ServingTask:
    """Just enough of :class:`slm_operator.kube.Kube` for a reconcile of a serving task."""

    def __init__(self, task: dict[str, Any], dep: dict[str, Any]) -> None:
        self.task = task
        owner = [{"kind": "AgentTask", "name": "weather", "uid": task["metadata"]["uid"]}]
        self.children = {
            "deployments": {**dep, "metadata": {**dep["metadata"], "ownerReferences": owner}},
        }

    def get_task(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.task)

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        return copy.deepcopy(self.children.get(plural))

    def list(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        return []

    def apply(self, obj: Any) -> None:
        pass

    def delete(self, *_: Any, **__: Any) -> None:
        pass

    def event(self, *_: Any) -> None:
        pass

    def patch_status(self, namespace: str, name: str, status: Any, **_: Any) -> None:
        from test_reconcile_status import merge_patch

        self.task["status"] = merge_patch(self.task.get("status"), status)


def test_a_reconcile_within_the_judged_window_asks_prometheus_nothing(
    prometheus: Prometheus,
) -> None:
    """A serving task is reconciled on every event of its pods, Jobs and Deployment, but its
    SLO is judged once per window (10 s here): only that reconcile runs the queries, and the
    others keep the last judgement as it is (not MetricsUnavailable)."""
    task, jobs, dep = _serving_task()
    _step(task, jobs, dep, NOW, HEALTHY)  # a window judged at NOW
    assert conds(task["status"])[c.SLO_MET] == (c.TRUE, c.WITHIN_SLO)
    kube = ServingTask(task, dep)
    prom = PromMetrics(prometheus.url, scrape_interval_s=5)

    for seconds in (1, 5, 9.5):
        rc.reconcile(kube, "agents", "weather", NOW + dt.timedelta(seconds=seconds), prom)  # type: ignore[arg-type]
    assert prometheus.queries == []
    assert conds(kube.task["status"])[c.SLO_MET] == (c.TRUE, c.WITHIN_SLO)

    rc.reconcile(kube, "agents", "weather", NOW + dt.timedelta(seconds=10), prom)  # type: ignore[arg-type]
    assert len(prometheus.queries) == 11  # every query of queries(), once
    assert kube.task["status"]["live"]["lastEvaluated"].startswith("2026-11-23T12:00:10")
