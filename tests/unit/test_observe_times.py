"""Times the operator reads: status times any client may have written, and the API server's
clock, which Job times are compared with."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.rest import RESTResponse
from test_plan import NOW, make_task
from test_reconcile_writes import Cluster

from slm_operator import conditions as c
from slm_operator import naming as n
from slm_operator import reconcile as rc
from slm_operator.kube import Kube, Listed
from slm_operator.observe import parse_time

UTC_NOON = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-23T12:00:00Z",
        "2026-11-23t12:00:00z",  # the API server's date-time check is case-insensitive
        "2026-11-23T12:00:00.000000Z",
        "2026-11-23T12:00:00.000000000Z",  # nanoseconds, as Go's RFC3339Nano writes them
        "2026-11-23T13:00:00+01:00",
        "2026-11-23T07:00:00-05:00",
        "2026-11-23T12:00:00",  # no zone: UTC, as every time the operator writes
        " 2026-11-23T12:00:00Z ",
    ],
)
def test_parse_time_reads_every_spelling_of_an_rfc3339_time(value: str) -> None:
    at = parse_time(value)
    assert at == UTC_NOON
    assert at is not None and at.utcoffset() is not None


@pytest.mark.parametrize("value", [None, "", "yesterday", "2026-13-01T00:00:00Z", 1764, ["x"]])
def test_parse_time_counts_what_is_no_time_as_none_not_an_error(value: Any) -> None:
    """A status time that is no time at all (an older CRD without the format check let any
    string through) is absent to the plan, which writes a new one: raising, every reconcile
    of the task failed."""
    assert parse_time(value) is None


def _answering(api: client.ApiClient, body: dict[str, Any], headers: dict[str, str]) -> None:
    """Make ``api`` answer every call with ``body`` and ``headers``, as the REST layer would."""

    def call_api(*_: Any, **__: Any) -> RESTResponse:
        raw = urllib3.HTTPResponse(
            body=json.dumps(body).encode(), headers=headers, status=200, preload_content=True
        )
        return RESTResponse(raw)

    api.call_api = call_api  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("date", "served_at"),
    [
        ("Mon, 23 Nov 2026 12:00:00 GMT", UTC_NOON),
        ("not a date", None),
        (None, None),
    ],
)
def test_a_list_says_when_the_api_server_answered_it(
    date: str | None, served_at: dt.datetime | None
) -> None:
    api = client.ApiClient(client.Configuration())
    _answering(api, {"items": [{"metadata": {"name": "j"}}]}, {"Date": date} if date else {})
    listed = Kube(api).list("batch/v1", "jobs", "agents", "app=x")
    assert listed == [{"metadata": {"name": "j"}}]
    assert isinstance(listed, Listed) and listed.served_at == served_at


def _just_succeeded(task: dict[str, Any], finished: dt.datetime) -> dict[str, Any]:
    """The task's data-prep Job, succeeded at ``finished`` (the control plane's clock), its
    pod not seen yet: no result read."""
    rev = n.revision_of(task["spec"])
    stamp = finished.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": n.data_job_name("weather", rev),
            "uid": "job-uid-1",
            "labels": {
                n.LABEL_TASK: "weather",
                n.LABEL_STAGE: n.STAGE_PREPARE,
                n.LABEL_REVISION: rev,
            },
            "ownerReferences": [{"uid": task["metadata"]["uid"], "kind": "AgentTask"}],
        },
        "status": {
            "startTime": stamp,
            "completionTime": stamp,
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": stamp}],
        },
    }


class _Dated(Cluster):
    """A cluster whose lists say the API server answered them at ``server_now``."""

    server_now: dt.datetime | None = None

    def list(self, api_version: str, plural: str, *args: Any, **kwargs: Any) -> Listed:
        return Listed(super().list(api_version, plural, *args, **kwargs), self.server_now)


@pytest.mark.parametrize(
    ("server_later", "reason"), [(0, c.AWAITING_RESULT), (3, c.RESULT_MISSING)]
)
def test_a_job_is_timed_on_the_api_servers_clock_not_the_operators(
    server_later: int, reason: str
) -> None:
    """The operator's node 3 minutes ahead of the control plane: a data-prep Job that had
    just succeeded (its result not read yet) read as ResultMissing, and the task Failed. The
    Date of the Jobs list is the clock its finish time is compared with."""
    task = make_task()
    task["metadata"]["resourceVersion"] = "4711"
    kube = _Dated(task)
    kube.jobs = [_just_succeeded(task, NOW - dt.timedelta(seconds=2))]
    kube.server_now = NOW + dt.timedelta(minutes=server_later)
    rc.reconcile(kube, "agents", "weather", NOW + dt.timedelta(minutes=3))  # type: ignore[arg-type]
    data = c.find(kube.task["status"]["conditions"], c.DATA_READY)
    assert data is not None and data["reason"] == reason


def test_without_the_api_servers_clock_the_operators_is_used() -> None:
    task = make_task()
    task["metadata"]["resourceVersion"] = "4711"
    kube = Cluster(task)  # plain lists: no Date known
    kube.jobs = [_just_succeeded(task, NOW - dt.timedelta(seconds=2))]
    obs = rc.observe(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    assert obs is not None and obs.server_now is None
    rc.reconcile(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    data = c.find(kube.task["status"]["conditions"], c.DATA_READY)
    assert data is not None and data["reason"] == c.AWAITING_RESULT
