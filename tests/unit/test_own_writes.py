"""What the operator does not do twice: a pass for the event of its own status write, and a
warning for a namespace already told.

The status write comes back as a MODIFIED watch event of the AgentTask. A pass for it read
the task, its pods, Jobs and Deployment and applied the Deployment and Service again (six
requests) to find nothing to do: an idle serving task judged every ten seconds cost twice
the requests its windows need.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from test_plan import HEALTHY, NOW, _serving_task, _step, captured, make_task
from test_reconcile_accounts import Accounts
from test_reconcile_retries import KEY, VirtualClockLoop, loop, run  # noqa: F401 (a fixture)

from slm_operator import main
from slm_operator import reconcile as rc
from slm_operator.kube import KubeError
from slm_operator.plan import Observed, Plan

WINDOW = 10.0
#: Stands in for the PromMetrics of an operator with Prometheus configured: windows are set.
PROMETHEUS = object()


class StatusWriter:
    """Stands in for :func:`slm_operator.reconcile.reconcile` of a serving task whose status
    changes once per window (``status.live.lastEvaluated``): such a pass writes it, under a
    new resourceVersion, and the watch event of that write reaches ``on_task`` 10 ms later,
    while the pass still posts its Events (it ends 50 ms after the write)."""

    def __init__(self, clock: VirtualClockLoop, *, settled: bool = True) -> None:
        self.loop, self.settled = clock, settled
        self.calls: list[float] = []
        self.writes: list[float] = []
        self.version = 100
        #: The write's event comes at once, and the "thread" reports the version only after
        #: it was handled (:meth:`report`), as on a real API server ~40% of the time.
        self.event_first = False
        self.late: Callable[[], None] | None = None

    def __call__(
        self, *_: Any, status_written: Callable[[str], None] | None = None, **__: Any
    ) -> Plan:
        now = self.loop.now
        self.calls.append(now)
        if not self.writes or now - self.writes[-1] >= WINDOW - 0.1:
            self.writes.append(now)
            self.version += 1
            version = str(self.version)
            if status_written is not None and self.settled:
                if self.event_first:
                    self.late = lambda: status_written(version)
                else:
                    status_written(version)
            self.loop.call_later(0.0 if self.event_first else 0.01, self.event, version)
        return Plan(next_window_s=self.writes[-1] + WINDOW - now)  # as plan.next_window_s

    def report(self) -> None:
        """The "thread" has read the PATCH's answer: it reports the version, if it held it."""
        late, self.late = self.late, None
        if late is not None:
            late()

    def event(self, version: str) -> None:
        """The watch event of a write at ``version``."""
        body = {"metadata": {"resourceVersion": version}}
        self.loop.create_task(
            main.on_task(type="MODIFIED", namespace=KEY[0], name=KEY[1], body=body)
        )


@pytest.fixture
def writer(loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch) -> StatusWriter:  # noqa: F811
    """A :class:`StatusWriter` as the reconcile, each pass taking 50 ms in its "thread"."""
    fake = StatusWriter(loop)
    monkeypatch.setattr(main, "reconcile", fake)

    async def to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        await asyncio.sleep(0.005)  # the event of a write may be handled before it is reported
        fake.report()
        await asyncio.sleep(0.045)  # the pass posts its Events; the write's event comes
        return result

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    return fake


def _serve(
    writer: StatusWriter,
    monkeypatch: pytest.MonkeyPatch,
    seconds: float,
    then: Callable[[main.Runtime], Any] | None = None,
    prom: Any = PROMETHEUS,
) -> main.Runtime:
    """A serving task (Prometheus configured: windows) created at 0 s, left alone for
    ``seconds``, then ``then``."""

    async def scenario(rt: main.Runtime) -> None:
        rt.prom = prom
        body = {"metadata": {"resourceVersion": "100"}}
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1], body=body)
        await asyncio.sleep(seconds)
        if then is not None:
            await then(rt)

    return run(writer.loop, monkeypatch, scenario)


def test_the_event_of_its_own_status_write_costs_no_pass(
    monkeypatch: pytest.MonkeyPatch,
    writer: StatusWriter,
) -> None:
    """A serving task judged every 10 s for a minute: one pass per window (and the resync's
    at 30 s), where each window's status write used to cost a second, idle pass (the event
    came while the pass ran, and marked it to run again)."""
    monkeypatch.setattr(main, "RESYNC_SECONDS", 30.0)
    _serve(writer, monkeypatch, 59.9)
    assert len(writer.writes) == 6  # 0, 10.05, 20.1, ... (a window 10 s after each pass)
    assert len(writer.calls) == 7, writer.calls  # the windows and the resync: was 12
    assert [round(t, 2) for t in writer.calls if 29.9 < t < 30.1] == [30.0]


def test_the_event_of_its_own_write_handled_before_the_write_is_reported_costs_no_pass(
    monkeypatch: pytest.MonkeyPatch,
    writer: StatusWriter,
) -> None:
    """On a real API server the watch event of the status write often reaches the operator
    before the reconcile thread has read the PATCH's answer: it was taken for another
    writer's change and cost a second pass (54 passes for 30 writes, live)."""
    writer.event_first = True
    monkeypatch.setattr(main, "RESYNC_SECONDS", 30.0)
    _serve(writer, monkeypatch, 59.9)
    assert len(writer.writes) == 6
    assert len(writer.calls) == 7, writer.calls  # the windows and the resync: was 12


def test_another_writers_change_of_the_task_still_reconciles_at_once(
    monkeypatch: pytest.MonkeyPatch,
    writer: StatusWriter,
) -> None:
    """A spec edit, or another client's write of the status or metadata, has a
    resourceVersion the operator did not write: reconciled at once, also while a pass runs
    (it runs once more after it)."""

    async def edited(rt: main.Runtime) -> None:
        before = len(writer.calls)
        body = {"metadata": {"resourceVersion": "500"}}
        await main.on_task(type="MODIFIED", namespace=KEY[0], name=KEY[1], body=body)
        assert len(writer.calls) == before + 1
        # While a pass runs: after it, once more.
        running = asyncio.ensure_future(main.trigger(KEY, urgent=True))
        await asyncio.sleep(0.02)
        body = {"metadata": {"resourceVersion": "501"}}
        await main.on_task(type="MODIFIED", namespace=KEY[0], name=KEY[1], body=body)
        await running
        assert len(writer.calls) == before + 3

    _serve(writer, monkeypatch, 5.0, edited)


def test_a_write_that_leaves_more_to_do_is_reconciled_again(
    monkeypatch: pytest.MonkeyPatch,
    writer: StatusWriter,
) -> None:
    """A pass whose status write is not settled (a retraining decided, its Job created by
    the next pass) does not report the version: its event runs the next pass at once."""
    writer.settled = False
    _serve(writer, monkeypatch, 5.0)
    assert [round(t, 2) for t in writer.calls] == [0.0, 0.05]


def test_the_resync_still_reconciles_a_task_whose_last_event_was_its_own_write(
    monkeypatch: pytest.MonkeyPatch, writer: StatusWriter
) -> None:
    """kopf lists the tasks again after a watch expires, with the same resourceVersion: that
    event is skipped too, and the resync reconciles the task all the same."""

    async def relisted(rt: main.Runtime) -> None:
        assert len(writer.calls) == 1
        body = {"metadata": {"resourceVersion": str(writer.version)}}
        await main.on_task(type=None, namespace=KEY[0], name=KEY[1], body=body)  # type: ignore[arg-type]
        assert len(writer.calls) == 1
        await asyncio.sleep(30)
        assert len(writer.calls) == 2  # the resync

    _serve(writer, monkeypatch, 1.0, relisted, prom=None)  # no windows: the resync alone


def test_a_forgotten_task_forgets_its_own_write() -> None:
    """Deleted: a task created again under the name is never mistaken for the old one (its
    resourceVersions are new anyway), and the operator keeps nothing per deleted task."""
    rt = main.Runtime(kube=None)  # type: ignore[arg-type]
    rt.wrote_status(KEY, "7")
    assert rt.own_write(KEY, "7") and not rt.own_write(KEY, "8") and not rt.own_write(KEY, None)
    rt.forget(KEY)
    assert not rt.own_write(KEY, "7")


# ---------------------------------------------------------------- reconcile's side


class Recorder:
    """Just enough of :class:`slm_operator.kube.Kube` for reconcile to write a status; the
    status write is answered as the API server does, with the object at a new version."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task, self.did = task, []

    def apply(self, obj: Any) -> None:
        pass

    def delete(self, *args: Any, **kwargs: Any) -> None:
        pass

    def event(self, obj: Any, type_: str, reason: str, message: str) -> None:
        self.did.append(f"event {reason}")

    def patch_status(self, namespace: str, name: str, status: Any, **_: Any) -> dict[str, Any]:
        self.did.append("patch_status")
        return {"metadata": {"resourceVersion": "7"}, "status": status}


def _served() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A serving task as read from the API server (at resourceVersion 6), its Jobs and its
    Deployment."""
    task, jobs, dep = _serving_task()
    task["metadata"]["resourceVersion"] = "6"
    return task, jobs, dep


def _reconcile(monkeypatch: pytest.MonkeyPatch, obs: Observed) -> tuple[list[str], Plan | None]:
    """Reconcile what ``obs`` shows; what happened, in order ("written 7": the version
    reported to the caller), and the plan."""
    kube = Recorder(obs.task)
    monkeypatch.setattr(rc, "observe", lambda *a, **k: obs)
    p = rc.reconcile(
        kube,  # type: ignore[arg-type]
        *KEY,
        status_written=lambda version: kube.did.append(f"written {version}"),
    )
    return kube.did, p


def test_reconcile_reports_the_version_of_a_settled_status_write_before_its_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A window judged (status.live changes): the version the API server answered reaches
    the caller right after the write, before the Events are posted (the watch event may be
    handled meanwhile); a pass that writes nothing reports nothing, nor one whose write had
    no resourceVersion to be made on."""
    task, jobs, dep = _served()
    judged = Observed(copy.deepcopy(task), jobs, dep, NOW + dt.timedelta(seconds=10), HEALTHY)
    did, p = _reconcile(monkeypatch, judged)
    assert did == ["patch_status", "written 7", "event WithinSLO"]
    assert p is not None and p.status != task["status"]
    quiet = Observed(
        {**task, "status": p.status},
        jobs,
        dep,
        NOW + dt.timedelta(seconds=11),
        metrics_not_due=True,
    )
    assert _reconcile(monkeypatch, quiet)[0] == []
    # Written without a resourceVersion to guard it, another change could come between.
    del judged.task["metadata"]["resourceVersion"]
    assert _reconcile(monkeypatch, judged)[0] == ["patch_status", "event WithinSLO"]


def test_reconcile_does_not_report_a_write_the_next_pass_acts_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Enough new calls: this pass decides the retraining (its status), and the next pass
    creates the data-prep Job of the new revision. The event of this write must start it."""
    task, jobs, dep = _served()
    task["spec"]["retraining"] = {"minNewExamples": 100}
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), captured(1000))
    later = NOW + dt.timedelta(seconds=20)
    did, p = _reconcile(
        monkeypatch, Observed(copy.deepcopy(task), jobs, dep, later, captured(1100))
    )
    assert p is not None and p.status["retraining"]["epoch"] == 1
    assert "patch_status" in did and not any(x.startswith("written") for x in did)


def test_reconcile_does_not_report_a_write_beside_a_refused_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child write refused: the status says so, and the next pass must try it again."""
    task, jobs, dep = _served()
    judged = Observed(copy.deepcopy(task), jobs, dep, NOW + dt.timedelta(seconds=10), HEALTHY)

    def refuse(obj: Any) -> None:
        raise KubeError(403, "deployments.apps is forbidden", "Forbidden")

    monkeypatch.setattr(Recorder, "apply", lambda self, obj: refuse(obj))
    did, _ = _reconcile(monkeypatch, judged)
    assert "patch_status" in did and not any(x.startswith("written") for x in did)


# ---------------------------------------------------------------- said once


class _Crowded(set):  # type: ignore[type-arg]
    """A set whose membership test waits (up to 0.5 s) for a second caller before it answers:
    two passes that check it at once both look before either adds."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=0.5)

    def __contains__(self, key: object) -> bool:
        found = super().__contains__(key)
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait()
        return found


def _twice_at_once(fn: Callable[[], Any]) -> None:
    threads = [threading.Thread(target=fn) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)


def test_a_missing_trainer_account_is_said_once_by_concurrent_passes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nine tasks created at once in a namespace without the account: said once, not once
    per pass that checked at the same moment."""
    monkeypatch.setattr(rc, "_missing_account_logged", _Crowded())
    with caplog.at_level(logging.WARNING, logger=rc.__name__):
        _twice_at_once(lambda: rc.trainer_account(Accounts(set()), make_task(), "slm-trainer"))
    said = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(said) == 1


def test_forbidden_events_are_said_once_by_concurrent_passes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Forbidden:
        def list(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            raise KubeError(403, "events is forbidden", "Forbidden")

    monkeypatch.setattr(rc, "_events_forbidden_logged", _Crowded())
    with caplog.at_level(logging.WARNING, logger=rc.__name__):
        _twice_at_once(lambda: rc._list_events(Forbidden(), "agents", "reason=FailedCreate"))  # type: ignore[arg-type]
    said = [r for r in caplog.records if "may not list Events" in r.getMessage()]
    assert len(said) == 1
