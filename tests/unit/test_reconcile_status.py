"""How reconcile writes status: a JSON merge patch that leaves exactly the planned status."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_plan import NOW, _serving_task

from slm_operator import reconcile as rc
from slm_operator.plan import Observed


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies ``application/merge-patch+json``."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class StatusOnly:
    """Just enough of :class:`slm_operator.kube.Kube` for reconcile to write a status."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task

    def apply(self, obj: Any) -> None:
        pass

    def delete(self, *args: Any, **kwargs: Any) -> None:
        pass

    def event(self, *args: Any) -> None:
        pass

    def patch_status(self, namespace: str, name: str, status: Any, **_: Any) -> None:
        self.task["status"] = merge_patch(self.task.get("status"), status)


def test_a_route_field_the_plan_drops_is_removed_from_the_stored_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Removing spec.serving.slo.slmTimeoutMs must remove status.route.slmTimeoutMs too: the
    gateway reads the status first, so a value left behind would keep the old SLM budget."""
    task, jobs, dep = _serving_task()
    kube = StatusOnly(task)
    monkeypatch.setattr(
        rc, "observe", lambda *a, **k: Observed(copy.deepcopy(task), jobs, dep, NOW)
    )
    task["spec"]["serving"]["slo"] = {"p95LatencyMs": 300, "slmTimeoutMs": 800}
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert task["status"]["route"]["slmTimeoutMs"] == 800
    del task["spec"]["serving"]["slo"]["slmTimeoutMs"]
    p = rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert "slmTimeoutMs" not in task["status"]["route"]
    assert p is not None and task["status"] == p.status
