"""Reading the Job controller's FailedCreate Events is a best-effort extra of observe."""

from __future__ import annotations

from typing import Any

import pytest

from slm_operator import naming as n
from slm_operator.kube import KubeError
from slm_operator.observe import PENDING, JobView
from slm_operator.reconcile import _with_failed_creates


class NoEvents:
    """Just enough of :class:`slm_operator.kube.Kube` to refuse (or fail) an Event list."""

    def __init__(self, status: int) -> None:
        self.status = status

    def list(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise KubeError(self.status, "events is forbidden")


def _podless() -> dict[str, JobView]:
    name = n.data_job_name("weather", "r1")
    return {name: JobView(name, "prepare", "r1", None, PENDING)}


def test_a_forbidden_event_list_leaves_the_reconcile_going() -> None:
    """An operator whose RBAC predates the events `list` rule (an image upgraded without the
    chart, or RBAC managed by hand) must still reconcile: every new Job is podless for a
    moment, and a quota-blocked one for good, so a 403 here would stop its task entirely."""
    jobs = _podless()
    assert _with_failed_creates(NoEvents(403), "agents", jobs, []) == jobs  # type: ignore[arg-type]
    with pytest.raises(KubeError):  # anything else is retried, as everywhere in observe
        _with_failed_creates(NoEvents(503), "agents", jobs, [])  # type: ignore[arg-type]
