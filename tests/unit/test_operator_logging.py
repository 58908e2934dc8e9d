"""What the operator's log says on its own: the Events it posts, not kopf's per-handler noise.

Why: an Event expires after an hour, so an incident at night left no record of what the
operator decided; its log held only kopf's "Handler 'on_pod' succeeded." at INFO, one per
watch event, which says nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import kopf
import pytest
import urllib3
from kubernetes import client
from kubernetes.client.rest import RESTResponse
from test_reconcile_writes import IMMUTABLE, _holding_own_job, _revision, _task

from slm_operator import main
from slm_operator import naming as n
from slm_operator import reconcile as rc
from slm_operator.kube import Kube, KubeError

TASK = {
    "apiVersion": "slmfleet.dev/v1alpha1",
    "kind": "AgentTask",
    "metadata": {"name": "weather", "namespace": "agents", "uid": "u-1"},
}


def _kube(posted: list[dict[str, Any]]) -> Kube:
    """A Kube whose API server takes every request; the bodies go to ``posted``."""
    api = client.ApiClient(client.Configuration())

    def call_api(
        method: str, url: str, headers: Any, body: Any, *_: Any, **__: Any
    ) -> RESTResponse:
        posted.append(body)
        raw = urllib3.HTTPResponse(body=b"{}", status=201, preload_content=True)
        return RESTResponse(raw)

    api.call_api = call_api  # type: ignore[method-assign]
    return Kube(api)


@pytest.mark.parametrize(
    ("type_", "level"), [("Normal", logging.INFO), ("Warning", logging.WARNING)]
)
def test_each_event_posted_is_also_logged(
    caplog: pytest.LogCaptureFixture, type_: str, level: int
) -> None:
    posted: list[dict[str, Any]] = []
    with caplog.at_level(logging.INFO):
        _kube(posted).event(TASK, type_, "DataPrepared", "revision r1: 500 examples")
    assert posted and posted[0]["reason"] == "DataPrepared"
    said = [r for r in caplog.records if "DataPrepared" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (level, "AgentTask agents/weather: DataPrepared: revision r1: 500 examples")
    ]


@pytest.fixture
def handler_noise_filtered() -> Any:
    """configure() as at startup; its filter taken off kopf.objects afterwards."""
    objects = logging.getLogger("kopf.objects")
    before = list(objects.filters)
    main.configure(kopf.OperatorSettings())
    yield objects
    objects.filters[:] = before


def test_kopf_handler_succeeded_lines_are_dropped_unless_verbose(
    caplog: pytest.LogCaptureFixture, handler_noise_filtered: logging.Logger
) -> None:
    objects = handler_noise_filtered
    with caplog.at_level(logging.INFO):  # kopf's default: neither --verbose nor --debug
        objects.info("Handler 'on_pod' succeeded.")
        objects.info("Handler 'on_task' succeeded.")
        objects.warning("Handler 'on_task' failed temporarily: boom")
    assert [r.getMessage() for r in caplog.records if r.name == "kopf.objects"] == [
        "Handler 'on_task' failed temporarily: boom"
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # --verbose or --debug: kopf's root level is DEBUG
        objects.info("Handler 'on_pod' succeeded.")
    assert [r.getMessage() for r in caplog.records if r.name == "kopf.objects"] == [
        "Handler 'on_pod' succeeded."
    ]


def test_a_kept_job_is_logged_once_and_names_its_task(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older operator's Job kept as immutable was logged at INFO on every pass (every
    resync), without the task it belongs to."""
    monkeypatch.setattr(rc, "_kept_jobs_logged", set(), raising=False)
    task = _task()
    rev = _revision(task)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            kube = _holding_own_job(task, rev, KubeError(422, IMMUTABLE, "Invalid"))
            rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    kept = [r.getMessage() for r in caplog.records if "keeping existing Job" in r.getMessage()]
    assert kept == [
        f"AgentTask agents/weather: keeping existing Job {n.data_job_name('weather', rev)}: "
        "its pod template differs and Jobs are immutable"
    ], kept


def test_the_json_log_format_applies_to_the_operators_own_loggers() -> None:
    """kopf installs its formatter on the root logger, so slm_operator's lines follow
    --log-format too (checked here with kopf's own configure, as `kopf run` calls it)."""
    from kopf._core.actions import loggers

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        loggers.configure(log_format=loggers.LogFormat.JSON)
        kopf_handler = next(h for h in root.handlers if h not in handlers)
        record = logging.getLogger("slm_operator.kube").makeRecord(
            "slm_operator.kube", logging.INFO, __file__, 1, "AgentTask a/b: R: m", (), None
        )
        line = json.loads(kopf_handler.format(record))
        assert line["message"] == "AgentTask a/b: R: m" and line["severity"] == "info"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
