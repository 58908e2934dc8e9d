"""The API server's warnings on the operator's writes: a field it dropped is said, never lost
in silence.

Why: ``helm upgrade`` never updates CRDs. An operator run on an older AgentTask CRD had the
status fields that CRD lacks pruned from every status write (``status.retraining.newRecords``
among them: retraining on new data never started) and nothing said why; the API server did,
in a ``Warning`` response header (RFC 7234: ``299 - "unknown field \\"...\\""``) that the
adapter read past.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.rest import RESTResponse
from prometheus_client import generate_latest
from test_plan import make_task
from test_reconcile_writes import Cluster

from slm_operator import conditions as c
from slm_operator import kube as k
from slm_operator import reconcile as rc
from slm_operator.kube import Kube, Written
from slm_operator.metrics import OperatorMetrics

DROPPED = '299 - "unknown field \\"status.retraining.newRecords\\""'
DEPRECATED = '299 - "batch/v1beta1 CronJob is deprecated in v1.21+, unavailable in v1.25+"'


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is a new operator process: nothing said yet, nothing counted."""
    monkeypatch.setattr(k, "_warnings_logged", set())
    monkeypatch.setattr(k, "_warning_counts", type(k._warning_counts)())
    monkeypatch.setattr(rc, "_crd_outdated_told", set())


def _kube(*warnings: str, body: dict[str, Any] | None = None) -> Kube:
    """A Kube whose API server answers every call with ``body`` and these Warning headers."""
    api = client.ApiClient(client.Configuration())

    def call_api(*_: Any, **__: Any) -> RESTResponse:
        headers = urllib3.HTTPHeaderDict()
        for w in warnings:
            headers.add("Warning", w)
        raw = urllib3.HTTPResponse(
            body=json.dumps(body or {"metadata": {"resourceVersion": "2"}}).encode(),
            headers=headers,
            status=200,
            preload_content=True,
        )
        return RESTResponse(raw)

    api.call_api = call_api  # type: ignore[method-assign]
    return Kube(api)


def _deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "weather-serving", "namespace": "agents"},
        "spec": {},
    }


def _said(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


@pytest.mark.parametrize(
    ("header", "texts"),
    [
        (DROPPED, ['unknown field "status.retraining.newRecords"']),
        # Two headers as urllib3 joins them; a comma inside the quoted text is no separator.
        (
            '299 - "unknown field \\"a\\"", 299 k8s "x, y" "Mon, 23 Nov 2026 12:00:00 GMT"',
            ['unknown field "a"', "x, y"],
        ),
        ("", []),
        ("not a warning", []),
    ],
)
def test_warning_headers_are_read_as_rfc_7234_says(header: str, texts: list[str]) -> None:
    assert k.warnings({"Warning": header} if header else {}) == texts


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('unknown field "status.retraining.newRecords"', "status.retraining.newRecords"),
        ('unknown field "spec.ports[0].bogus"', "spec.ports[0].bogus"),
        # Server-side apply refuses such a field (an error), it never warns of it.
        (".spec.template.spec.hostUsers: field not declared in schema", None),
        ('duplicate field "spec.replicas"', None),
        ("batch/v1beta1 CronJob is deprecated", None),
    ],
)
def test_an_unknown_field_warning_names_the_field(text: str, field: str | None) -> None:
    assert k.unknown_field(text) == field


def test_a_status_field_an_older_crd_drops_is_an_error_once_with_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The finding's repro: the status write is taken, the field is not stored, and before
    this only the API server's header said so."""
    kube = _kube(DROPPED)
    with caplog.at_level(logging.INFO, logger="slm_operator"):
        answer = kube.patch_status("agents", "hp", {"retraining": {"newRecords": 900}})
        kube.patch_status("agents", "other", {"retraining": {"newRecords": 900}})
    assert isinstance(answer, Written) and answer["metadata"]["resourceVersion"] == "2"
    assert answer.unknown_fields == ("status.retraining.newRecords",)
    errors = _said(caplog, logging.ERROR)
    assert len(errors) == 1, errors  # once per process, not at every write of every task
    assert "status.retraining.newRecords" in errors[0]
    assert "AgentTask CRD is older than this operator" in errors[0]
    assert "kubectl apply --server-side" in errors[0] and "crds/" in errors[0]


def test_a_child_field_the_cluster_does_not_know_is_an_error_naming_the_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = _kube('299 - "unknown field \\"spec.template.spec.hostUsers\\""')
    with caplog.at_level(logging.INFO, logger="slm_operator"):
        kube.apply(_deployment())
        kube.merge_patch(_deployment(), {"spec": {}})
    errors = _said(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert "Deployment agents/weather-serving" in errors[0]
    assert "spec.template.spec.hostUsers" in errors[0] and "older Kubernetes" in errors[0]
    assert "CRD" not in errors[0]


def test_other_warnings_are_logged_once_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    kube = _kube(DEPRECATED)
    with caplog.at_level(logging.INFO, logger="slm_operator"):
        for _ in range(3):
            kube.apply(_deployment())
    assert not _said(caplog, logging.ERROR)
    warned = _said(caplog, logging.WARNING)
    assert len(warned) == 1 and "deprecated" in warned[0], warned


def test_api_warnings_are_counted_in_the_operators_metrics() -> None:
    """Every write that got one counts, so that an alert sees it go on; by kind and whether
    a field was dropped."""
    kube = _kube(DROPPED)
    for _ in range(2):
        kube.patch_status("agents", "hp", {"retraining": {"newRecords": 900}})
    _kube(DEPRECATED).apply(_deployment())
    text = generate_latest(OperatorMetrics().registry).decode()
    assert 'slm_operator_api_warnings_total{kind="AgentTask",warning="unknown_field"} 2.0' in text
    assert 'slm_operator_api_warnings_total{kind="Deployment",warning="other"} 1.0' in text


class OldCrd(Cluster):
    """A cluster whose AgentTask CRD lacks a status field the operator writes."""

    def patch_status(self, *args: Any, **kwargs: Any) -> Written:
        super().patch_status(*args, **kwargs)
        return Written(
            {"metadata": {"resourceVersion": "4712"}},
            ['unknown field "status.retraining.newRecords"'],
        )


def _task() -> dict[str, Any]:
    task = make_task()
    task["metadata"]["resourceVersion"] = "4711"
    return task


def test_a_task_whose_status_loses_fields_gets_one_crd_outdated_event() -> None:
    """``kubectl describe agenttask`` says it too, where the user looks; once per task, not
    at every write."""
    kube = OldCrd(_task())
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    kube.task["status"] = {}  # the next pass writes its status again
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    told = [(t, m) for t, r, m in kube.events if r == c.CRD_OUTDATED]
    assert len(told) == 1, kube.events
    type_, message = told[0]
    assert type_ == "Warning"
    assert "status.retraining.newRecords" in message and "kubectl apply --server-side" in message


def test_a_status_write_without_warnings_posts_no_crd_event() -> None:
    kube = Cluster(_task())
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert kube.events and c.CRD_OUTDATED not in {r for _, r, _ in kube.events}
