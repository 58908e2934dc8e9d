"""The operator's own Prometheus metrics: how its reconciles go, and each task's phase and
conditions as series.

Why: a platform engineer alerts on state, not on logs. The gateway's metrics say how calls are
served; only the operator knows that a task has been Failed for an hour, or that a serving
task's SLM has been bypassed (FallbackActive) all afternoon. The series follow the
kube-state-metrics convention for conditions (one series per status, 1 for the current one),
so that ``== 1`` selects what is true now and a task's series disappear with the task.

Served on ``SLM_FLEET_METRICS_PORT`` (0 or unset: not served); ``slm_operator_*`` names are
listed in docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric

from slm_operator import conditions as c
from slm_operator import kube
from slm_operator.plan import PHASES  # every phase: a task's old phase reads 0, not a stale 1

log = logging.getLogger(__name__)

STATUSES = (c.TRUE, c.FALSE, c.UNKNOWN)
RESULT_OK, RESULT_RETRY, RESULT_ERROR = "ok", "retry", "error"


class ApiWarnings:
    """``slm_operator_api_warnings_total``: the API server's warnings on the operator's
    writes, by kind and ``warning`` (``unknown_field``: it dropped a field the operator
    wrote, e.g. a status field an older AgentTask CRD lacks; ``other``: a deprecation, an
    admission webhook's words).

    Read at each scrape from the adapter's count (:func:`slm_operator.kube.warning_counts`),
    which counts for the whole process: the adapter needs no handle on the metrics.
    """

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "slm_operator_api_warnings",
            "Warnings the API server sent on the operator's writes, by the kind written and "
            "warning: unknown_field (it dropped a field the operator wrote: an AgentTask CRD "
            "older than the operator, or a Kubernetes older than it supports) or other.",
            labels=["kind", "warning"],
        )
        for (kind, warning), count in sorted(kube.warning_counts().items()):
            family.add_metric([kind, warning], count)
        yield family


class OperatorMetrics:
    """The operator's series on their own registry (one per process; tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reconciles = Counter(
            "slm_operator_reconcile_total",
            "Reconciles of AgentTasks by result: ok, retry (a retryable API error: conflict, "
            "429, 5xx; retried with back-off) or error (anything else; the resync retries).",
            ["result"],
            registry=r,
        )
        self.duration = Histogram(
            "slm_operator_reconcile_duration_seconds",
            "Time one reconcile took: observe, plan, apply, status.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.phase = Gauge(
            "slm_operator_task_phase",
            "1 for the AgentTask's current status.phase, 0 for the others.",
            ["namespace", "task", "phase"],
            registry=r,
        )
        self.condition = Gauge(
            "slm_operator_task_condition",
            "1 for the current status of each of the AgentTask's conditions, 0 for the others.",
            ["namespace", "task", "type", "status"],
            registry=r,
        )
        self.leader = Gauge(
            "slm_operator_leader",
            "1 while this replica reconciles (it holds the leader Lease, or leader election "
            "is off), 0 while it stands by.",
            registry=r,
        )
        r.register(ApiWarnings())
        self._lock = threading.Lock()

    def observe_task(self, namespace: str, task: str, status: Mapping[str, Any]) -> None:
        """Set a task's phase and condition series from the status just written."""
        phase = status.get("phase")
        current = {
            str(cond.get("type")): str(cond.get("status"))
            for cond in status.get("conditions") or []
            if isinstance(cond, Mapping)
        }
        with self._lock:
            for p in PHASES:
                self.phase.labels(namespace, task, p).set(1 if p == phase else 0)
            for t in c.ALL_TYPES:
                for s in STATUSES:
                    self.condition.labels(namespace, task, t, s).set(
                        1 if current.get(t) == s else 0
                    )

    def forget_task(self, namespace: str, task: str) -> None:
        """Drop a deleted task's series, so that no alert keeps firing for it."""
        with self._lock:
            for p in PHASES:
                with contextlib.suppress(KeyError):
                    self.phase.remove(namespace, task, p)
            for t in c.ALL_TYPES:
                for s in STATUSES:
                    with contextlib.suppress(KeyError):
                        self.condition.remove(namespace, task, t, s)


def serve(metrics: OperatorMetrics, port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread (prometheus_client's)."""
    start_http_server(port, addr=addr, registry=metrics.registry)
    log.info("operator metrics on http://%s:%d/metrics", addr, port)
