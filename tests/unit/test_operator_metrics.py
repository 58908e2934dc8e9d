"""The operator's own series: a task's phase and conditions as kube-state-metrics-style gauges."""

from __future__ import annotations

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
