"""A task deleted while it is reconciled: the status write finds it gone (404)."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
from test_plan import NOW, make_task

from slm_operator.kube import KubeError, TaskGone
from slm_operator.reconcile import reconcile


class _GoneOnWrite:
    """A Kube whose AgentTask is read, then deleted before its status is written."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task
        self.applied: list[str] = []
        self.events: list[str] = []

    def get_task(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.task)

    def list(self, *_: Any, **__: Any) -> list[Any]:
        return []

    def get(self, *_: Any, **__: Any) -> None:
        return None

    def apply(self, obj: dict[str, Any]) -> None:
        self.applied.append(obj["metadata"]["name"])

    def delete(self, *_: Any, **__: Any) -> None:
        pass

    def patch_status(self, *_: Any, **__: Any) -> None:
        raise KubeError(404, 'agenttasks.slmfleet.dev "weather" not found', "NotFound")

    def event(self, _obj: Any, type_: str, reason: str, _message: str) -> None:
        self.events.append(reason)


def test_a_task_deleted_during_its_reconcile_is_gone_not_an_error() -> None:
    """Its status PATCH gets 404: the pass ends with TaskGone, which the operator handles by
    forgetting the task (test_reconcile_retries), with no Events about an object that no
    longer exists. Before, the 404 was a failed reconcile ("the resync retries it"), counted
    in slm_operator_reconcile_total{result="error"}."""
    task = make_task()
    task["metadata"].update(uid="u1", resourceVersion="7", namespace="agents")
    kube = _GoneOnWrite(task)
    with pytest.raises(TaskGone):
        reconcile(cast(Any, kube), "agents", "weather", NOW)
    assert kube.applied  # it had got as far as applying the data-prep Job
    assert kube.events == []


def test_a_task_that_is_not_there_is_gone() -> None:
    kube = _GoneOnWrite(make_task())
    kube.get_task = lambda namespace, name: None  # type: ignore[method-assign,assignment]
    with pytest.raises(TaskGone):
        reconcile(cast(Any, kube), "agents", "weather", NOW)
    assert kube.applied == []
