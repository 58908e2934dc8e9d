"""The operator's own series: a task's phase and conditions as kube-state-metrics-style gauges."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

from prometheus_client import generate_latest

from slm_operator import conditions as c
from slm_operator.metrics import OperatorMetrics


def _text(m: OperatorMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_a_tasks_phase_and_conditions_are_one_series_each_with_1_for_the_current() -> None:
    m = OperatorMetrics()
    status = {
        "phase": "Serving",
        "conditions": [
            {"type": c.READY, "status": c.TRUE},
            {"type": c.FALLBACK_ACTIVE, "status": c.FALSE},
        ],
    }
    m.observe_task("agents", "weather", status)
    text = _text(m)
    assert 'slm_operator_task_phase{namespace="agents",phase="Serving",task="weather"} 1.0' in text
    assert 'slm_operator_task_phase{namespace="agents",phase="Training",task="weather"} 0.0' in text
    ready = (
        'slm_operator_task_condition{namespace="agents",status="True",task="weather",type="Ready"}'
    )
    assert f"{ready} 1.0" in text
    # A condition the status does not carry reads 0 for every status, never a stale 1.
    assert 'type="SLOMet"} 1.0' not in text
    # The phase moves on: the old one reads 0.
    m.observe_task("agents", "weather", {**status, "phase": "Failed"})
    text = _text(m)
    assert 'phase="Serving",task="weather"} 0.0' in text
    assert 'phase="Failed",task="weather"} 1.0' in text


def test_a_deleted_tasks_series_go_away_and_others_stay() -> None:
    m = OperatorMetrics()
    m.observe_task("agents", "weather", {"phase": "Training", "conditions": []})
    m.observe_task("agents", "other", {"phase": "Serving", "conditions": []})
    m.forget_task("agents", "weather")
    m.forget_task("agents", "never-seen")  # harmless
    text = _text(m)
    assert 'task="weather"' not in text
    assert 'phase="Serving",task="other"} 1.0' in text


def test_a_task_deleted_during_its_reconcile_leaves_no_series(monkeypatch: Any) -> None:
    """A resync's reconcile read the task just before it was deleted and returns its plan
    after the DELETED event: the series must not come back (SlmFleetTaskFailed would fire for
    a task that no longer exists until the operator restarts)."""
    from slm_operator import main
    from slm_operator.plan import Plan

    metrics = OperatorMetrics()
    monkeypatch.setattr(main, "METRICS", metrics)
    entered, release = threading.Event(), threading.Event()

    def reconcile(*_: Any, **__: Any) -> Plan:
        entered.set()
        release.wait(5)
        return Plan(status={"phase": "Failed", "conditions": []})

    monkeypatch.setattr(main, "reconcile", reconcile)

    async def scenario() -> None:
        monkeypatch.setattr(main, "_runtime", main.Runtime(kube=cast(Any, None)))
        main._runtime.known.add(("agents", "weather"))  # type: ignore[union-attr]
        running = asyncio.create_task(main.trigger(("agents", "weather")))
        await asyncio.to_thread(entered.wait, 5)
        await main.on_task(type="DELETED", namespace="agents", name="weather")
        release.set()
        await running

    asyncio.run(scenario())
    assert 'task="weather"' not in _text(metrics)
