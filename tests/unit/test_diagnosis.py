"""What the task's status says when something is wrong: the cause, in words a user can act on.

Each test reproduces, on plain dicts, a case a reviewer found on a live cluster where the
conditions hid the cause (a deadline that hid an unschedulable pod, live control off without
a word, a crash loop read as a rollout) or grew without bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from typing import Any

import pytest
from test_plan import (
    HEALTHY,
    NOW,
    _serving_task,
    _settled,
    _step,
    _stored,
    _with_replicas,
    conds,
    jobs_through,
    make_task,
)

from slm_operator import conditions as c
from slm_operator import naming as n
from slm_operator import reconcile as rc
from slm_operator.kube import KubeError
from slm_operator.live import Metrics
from slm_operator.observe import FAILED, PENDING, RUNNING, JobView, job_view, pod_waiting
from slm_operator.plan import Observed, plan

#: The longest condition message and status.message (plan.MESSAGE_LIMIT): a kibibyte.
MESSAGE_LIMIT = 1024

UNSCHEDULABLE = (
    "pod weather-ft-small-x cannot be scheduled: 0/3 nodes are available: 3 Insufficient "
    "nvidia.com/gpu."
)


def _cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = c.find(status["conditions"], type_)
    assert found is not None
    return dict(found)


def _finetune_job(task: dict[str, Any], cand: str, **status: Any) -> dict[str, Any]:
    rev = n.revision_of(task["spec"])
    return {
        "metadata": {
            "name": n.finetune_job_name("weather", cand, rev),
            "uid": f"uid-{cand}",
            "labels": {
                n.LABEL_STAGE: "finetune",
                n.LABEL_REVISION: rev,
                n.LABEL_CANDIDATE: cand,
            },
        },
        "status": status,
    }


def _one_candidate() -> dict[str, Any]:
    """A task of one candidate whose fine-tune may run for 60 s (the reviewer's)."""
    return make_task(
        candidates=[{"name": "small", "model": "org/tiny", "method": "lora"}],
        training={"gpus": 12, "backoffLimit": 0, "activeDeadlineSeconds": 60},
    )


def _deadline_exceeded(task: dict[str, Any], cand: str) -> JobView:
    """A fine-tune Job past activeDeadlineSeconds (61 s after it started), its pod deleted by
    the Job controller."""
    job = _finetune_job(
        task,
        cand,
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
                "lastTransitionTime": "2026-11-23T11:59:01Z",
            }
        ],
        failed=1,
        startTime="2026-11-23T11:58:00Z",
    )
    return job_view(job, [])


def test_a_deadline_hit_before_the_pod_ran_keeps_why_it_never_ran() -> None:
    """Finding 1: an unschedulable fine-tune pod (training.gpus above any node's) until
    activeDeadlineSeconds said only "DeadlineExceeded: Job was active longer than specified
    deadline": the scheduler's reason, shown while it waited, was lost with the pod, and the
    user raised the deadline instead of adding GPUs."""
    task = _one_candidate()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "data")
    name = n.finetune_job_name("weather", "small", rev)
    waiting = JobView(name, "finetune", rev, "small", PENDING, waiting=UNSCHEDULABLE)
    task["status"] = _stored(plan(Observed(task, {**jobs, name: waiting}, None, NOW)).status)
    assert UNSCHEDULABLE in _cond(task["status"], c.TRAINED)["message"]

    failed = {**jobs, name: _deadline_exceeded(task, "small")}
    first = _stored(plan(Observed(task, failed, None, NOW)).status)
    trained = _cond(first, c.TRAINED)
    assert (trained["status"], trained["reason"]) == (c.FALSE, c.JOB_FAILED)
    said = (
        "DeadlineExceeded: Job was active longer than specified deadline; its last pod never ran: "
        + UNSCHEDULABLE
    )
    assert trained["message"].endswith(said)
    assert first["message"] == _cond(first, c.READY)["message"] == trained["message"]
    assert first["candidates"][0]["message"] == said

    # Level-triggered: the next passes (the pod long gone) say the same, so nothing is written.
    task["status"] = first
    again = _stored(plan(Observed(task, failed, None, NOW + dt.timedelta(minutes=5))).status)
    assert again["conditions"] == first["conditions"]
    assert again["candidates"] == first["candidates"]


def test_a_failed_job_whose_pod_ran_is_not_said_to_have_never_run() -> None:
    """A pod seen running (or ended) ran: its Job's failure says how the pod ended, and the
    wait recorded before it ran is not quoted."""
    task = _one_candidate()
    rev = n.revision_of(task["spec"])
    name = n.finetune_job_name("weather", "small", rev)
    pod = {
        "metadata": {"name": f"{name}-x", "labels": {"job-name": name}},
        "status": {"phase": "Running", "containerStatuses": [{"name": "trainer"}]},
    }
    view = _deadline_exceeded(task, "small")
    assert not view.pod_ran
    ran = job_view(_finetune_job(task, "small", **{"conditions": []}), [pod])
    assert ran.state == RUNNING and ran.pod_ran
    jobs = {**jobs_through(task, "data"), name: dataclasses.replace(view, pod_ran=True)}
    task["status"] = {
        "candidates": [
            {"name": "small", "revision": rev, "job": name, "state": PENDING, "message": "x"}
        ]
    }
    status = plan(Observed(task, jobs, None, NOW)).status
    assert status["candidates"][0]["state"] == FAILED
    assert "never ran" not in status["candidates"][0]["message"]


def _long_failure(i: int) -> str:
    return f"BackoffLimitExceeded: last pod Error (exit 1): {'Traceback line ' * 30}{i}"


NAMES = [f"cand{i}" for i in range(8)]


def _eight_candidates(state: str, why: list[str]) -> dict[str, Any]:
    """The status of a task of eight candidates whose fine-tunes are all in ``state``, each
    for its own (long) reason: its failure, or why its pod waits."""
    task = make_task(candidates=[{"name": x, "model": "org/tiny", "method": "lora"} for x in NAMES])
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "data")
    said = "message" if state == FAILED else "waiting"
    for x, text in zip(NAMES, why, strict=True):
        jn = n.finetune_job_name("weather", x, rev)
        jobs[jn] = JobView(jn, "finetune", rev, x, state, **{said: text})
    return plan(Observed(task, jobs, None, NOW)).status


def test_eight_failed_candidates_keep_every_message_within_a_kibibyte() -> None:
    """Finding 4: Trained, Ready and status.message joined every candidate's message (each
    up to 512 characters) and reached 3.7 KiB with eight failed candidates."""
    status = _eight_candidates(FAILED, [_long_failure(i) for i in range(8)])
    trained = _cond(status, c.TRAINED)
    assert trained["reason"] == c.JOB_FAILED
    for message in (trained["message"], _cond(status, c.READY)["message"], status["message"]):
        assert len(message) <= MESSAGE_LIMIT
        assert all(f"{x}: Job" in message for x in NAMES)  # every candidate named
        assert "status.candidates" in message  # where the rest is
    # status.candidates keeps each one's whole message.
    assert [e["message"] for e in status["candidates"]] == [_long_failure(i) for i in range(8)]


def test_eight_waiting_candidates_keep_trained_within_a_kibibyte() -> None:
    """Finding 4: the JobPending "waiting:" list grew the same way."""
    why = f"{UNSCHEDULABLE} preemption: 0/3 nodes are available: 3 Preemption {'x' * 200}"
    status = _eight_candidates(PENDING, [f"{why} {i}" for i in range(8)])
    trained = _cond(status, c.TRAINED)
    assert trained["reason"] == c.JOB_PENDING
    assert len(trained["message"]) <= MESSAGE_LIMIT and len(status["message"]) <= MESSAGE_LIMIT
    assert all(f"{x}: pod" in trained["message"] for x in NAMES)


@pytest.mark.parametrize(
    ("configured", "says"),
    [
        (False, "no Prometheus is configured (SLM_FLEET_PROMETHEUS_URL)"),
        (True, "Prometheus (SLM_FLEET_PROMETHEUS_URL) has not answered for this task yet"),
        (None, "SLM_FLEET_PROMETHEUS_URL unset, or Prometheus unreachable"),
    ],
)
def test_without_any_live_metrics_slo_met_and_ready_say_live_control_is_off(
    configured: bool | None, says: str
) -> None:
    """Finding 3: with no Prometheus (the chart's default) or one that never answered, SLOMet
    said "no live metrics for this task's SLM yet" and Ready that the model stays in shadow
    "until its agreement with the LLM starts a canary", for good."""
    task, jobs, dep = _serving_task()
    for minutes in (0, 1):  # every pass says the same
        at = NOW + dt.timedelta(minutes=minutes)
        told = {} if configured is None else {"prometheus_configured": configured}
        p = plan(Observed(task, jobs, dep, at, None, **told))
        task["status"] = _stored(p.status)
        assert p.status["route"]["mode"] == "shadow"
        slo, ready = _cond(p.status, c.SLO_MET), _cond(p.status, c.READY)
        assert (slo["status"], slo["reason"]) == (c.UNKNOWN, c.METRICS_UNAVAILABLE)
        assert says in slo["message"] and "live control is off" in slo["message"]
        assert says in ready["message"] and "rollout.strategy: direct" in ready["message"]
        assert "until its agreement" not in ready["message"]


#: What a Prometheus that answers, but scrapes no gateway, returns for a task: every
#: slm_gateway query empty (Triton's PodMonitor may still be matched: a queue time).
UNSCRAPED = Metrics(queue_ms=2.0)


def test_a_prometheus_that_scrapes_no_gateway_says_the_gateway_is_not_scraped() -> None:
    """Reviewer C: monitors whose labels the Prometheus selector does not match (the
    quickstart's likeliest mistake) left SLOMet at "no live metrics for this task's SLM yet",
    the words for a scraped gateway that had no call for the task yet, for good."""
    task, jobs, dep = _serving_task()
    p = _step(task, jobs, dep, NOW, UNSCRAPED)
    slo = _cond(p.status, c.SLO_MET)
    assert (slo["status"], slo["reason"]) == (c.UNKNOWN, c.METRICS_UNAVAILABLE)
    assert "Prometheus has no slm_gateway series for this task" in slo["message"]
    assert "is the gateway scraped?" in slo["message"]
    # Reconciles until the next window say the same (no message flapping, no Event).
    later = Observed(task, jobs, dep, NOW + dt.timedelta(seconds=1), metrics_not_due=True)
    assert _cond(_settled(later).status, c.SLO_MET) == slo
    # Once scraped, with no call yet (the route-mode series reads a request rate of 0),
    # SLOMet says that no SLM call has been measured.
    p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), Metrics(request_rate=0.0))
    slo = _cond(p.status, c.SLO_MET)
    assert slo["message"] == "no live metrics for this task's SLM yet"


def test_a_prometheus_that_answered_before_and_not_now_keeps_the_last_decision() -> None:
    """Once it has answered for the task, a silent Prometheus is a passing outage: SLOMet
    keeps its words for that, and Ready its shadow wording."""
    task, jobs, dep = _serving_task()
    quiet = dataclasses.replace(HEALTHY, agreement=None, shadow_samples=None)
    _step(task, jobs, dep, NOW, quiet)
    p = plan(Observed(task, jobs, dep, NOW + dt.timedelta(seconds=10), None))
    assert _cond(p.status, c.SLO_MET)["message"].startswith("Prometheus did not answer")
    assert "until its agreement" in _cond(p.status, c.READY)["message"]


def test_an_operator_without_prometheus_says_so_once_at_startup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 3: nothing in the operator's log said that live control was off."""
    import kopf

    from slm_operator import main

    async def idle() -> None:
        return None

    monkeypatch.delenv("SLM_FLEET_LEADER_ELECTION_LEASE", raising=False)
    for attr, value in (
        ("_runtime", None),
        ("PROMETHEUS_URL", ""),
        ("METRICS_PORT", 0),
        ("load_api_client", lambda: None),
        ("Kube", lambda api: None),
        ("_resync_loop", idle),
    ):
        monkeypatch.setattr(main, attr, value)
    with caplog.at_level(logging.INFO, logger="slm_operator"):
        asyncio.run(main.startup(settings=kopf.OperatorSettings()))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "SLM_FLEET_PROMETHEUS_URL unset" in x and "live control is off" in x for x in said
    ), said


def _after_a_window(task: dict[str, Any], jobs: dict[str, JobView], dep: dict[str, Any]) -> None:
    _step(task, jobs, dep, NOW, dataclasses.replace(HEALTHY, agreement=None, shadow_samples=None))
    assert task["status"]["live"]


def test_a_served_model_with_every_replica_down_is_an_outage_not_a_rollout() -> None:
    """Finding 5: every replica of a model that served crash-looping read phase Deploying and
    Ready DeploymentProgressing (as if a first rollout), where the README says
    NoReadyReplicas, a Warning."""
    task, jobs, dep = _serving_task()
    _after_a_window(task, jobs, dep)
    crash = "pod weather-slm-x: CrashLoopBackOff (last exit code 1, Error)"
    down = _with_replicas(dep, 1, 0)
    p = plan(Observed(task, jobs, down, NOW + dt.timedelta(seconds=10), serving_waiting=crash))
    ready = _cond(p.status, c.READY)
    assert (ready["status"], ready["reason"]) == (c.FALSE, c.NO_READY_REPLICAS)
    assert crash in ready["message"] and p.status["message"] == ready["message"]
    assert p.status["phase"] == "Serving"
    assert ("Warning", c.NO_READY_REPLICAS) in [(k, r) for k, r, _ in p.events]
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_READY_REPLICAS)


def test_a_first_rollout_without_ready_replicas_is_still_deploying() -> None:
    """A model that never served (no live state) is rolling out, not down."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    task["status"] = _stored(plan(Observed(task, jobs, None, NOW)).status)
    p = plan(Observed(task, jobs, _with_replicas(_serving_task()[2], 1, 0), NOW))
    assert p.status["revision"]["active"] == rev
    assert p.status["phase"] == "Deploying"
    assert conds(p.status)[c.READY] == (c.FALSE, c.DEPLOYMENT_PROGRESSING)


def test_in_a_canary_ready_says_what_share_the_model_serves() -> None:
    """Finding 7: during a canary, Ready and status.message said "<model> serves the task's
    calls" while the LLM answered 75% of them."""
    task, jobs, dep = _serving_task()
    p = _step(task, jobs, dep, NOW, HEALTHY)
    assert (p.status["route"]["mode"], p.status["route"]["canaryPercent"]) == ("canary", 25)
    ready = _cond(p.status, c.READY)
    assert (ready["status"], ready["reason"]) == (c.TRUE, c.READY_REASON)
    assert ready["message"].endswith(
        "serves 25% of the task's calls in a canary and the LLM the rest "
        "(0 of 3 healthy windows before promotion)"
    )
    assert p.status["message"] == ready["message"]
    fb = _cond(p.status, c.FALLBACK_ACTIVE)
    assert "0 of 3 healthy windows before promotion" in fb["message"]


MULTI_ATTACH = (
    'Multi-Attach error for volume "pvc-1234" Volume is already used by pod(s) '
    "weather-slm-7d9f-abcde"
)
MOUNT_TIMEOUT = (
    "Unable to attach or mount volumes: unmounted volumes=[work], unattached volumes=[work "
    "kube-api-access-x]: timed out waiting for the condition"
)


class EventsKube:
    """Just enough of :class:`slm_operator.kube.Kube` for ``reconcile.observe``: the task, its
    pods and Jobs, no Deployment, and the Events that the field selector selects (as the API
    server filters them); every list is recorded."""

    def __init__(
        self,
        task: dict[str, Any],
        pods: list[dict[str, Any]],
        jobs: list[dict[str, Any]],
        events: list[dict[str, Any]] | None = None,
        forbidden: bool = False,
    ) -> None:
        self.task, self.pods, self.jobs = task, pods, jobs
        self.events, self.forbidden = events or [], forbidden
        self.lists: list[tuple[str, str | None]] = []

    def get_task(self, namespace: str, name: str) -> dict[str, Any]:
        return self.task

    def get(self, *args: Any) -> None:
        return None

    def list(
        self,
        api: str,
        plural: str,
        namespace: str,
        selector: str | None = None,
        fields: str | None = None,
    ) -> list[dict[str, Any]]:
        self.lists.append((plural, fields))
        if plural != "events":
            return {"pods": self.pods, "jobs": self.jobs}[plural]
        if self.forbidden:
            raise KubeError(403, "events is forbidden")
        wanted = dict(f.split("=", 1) for f in (fields or "").split(",") if f)

        def field(ev: dict[str, Any], key: str) -> Any:
            if key.startswith("involvedObject."):
                return ev["involvedObject"].get(key.removeprefix("involvedObject."))
            return ev.get(key)

        return [ev for ev in self.events if all(field(ev, k) == v for k, v in wanted.items())]


def _data_job_and_pod(**status: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The reviewer's case: a data-prep pod on a node, its container in ContainerCreating
    (or ``status``), of a Job the task owns."""
    task = _one_candidate()
    rev = n.revision_of(task["spec"])
    name = n.data_job_name("weather", rev)
    job = {
        "metadata": {
            "name": name,
            "uid": "job-uid",
            "ownerReferences": [{"uid": task["metadata"]["uid"]}],
            "labels": {n.LABEL_STAGE: "prepare", n.LABEL_REVISION: rev},
        },
        "status": {"active": 1},
    }
    pod = {
        "metadata": {
            "name": f"{name}-abcde",
            "uid": "pod-uid",
            "labels": {n.LABEL_TASK: "weather", "job-name": name},
        },
        "spec": {"nodeName": "node-1"},
        "status": status
        or {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}
            ],
        },
    }
    return task, job, pod


def _mount_event(
    pod: dict[str, Any], reason: str, message: str, at: str, uid: str = ""
) -> dict[str, Any]:
    return {
        "type": "Warning",
        "reason": reason,
        "message": message,
        "lastTimestamp": at,
        "involvedObject": {
            "kind": "Pod",
            "name": pod["metadata"]["name"],
            "uid": uid or pod["metadata"]["uid"],
        },
    }


def test_a_pod_that_cannot_mount_its_volumes_says_why() -> None:
    """Finding 2: a data-prep pod stuck in ContainerCreating (its ReadWriteOnce claim attached
    to another node) read "Job created, waiting for its pod to run" until its deadline: the
    pod's status says nothing of its volumes, only Events do."""
    task, job, pod = _data_job_and_pod()
    said = f"pod {pod['metadata']['name']} cannot mount its volumes: {MULTI_ATTACH}"
    events = [
        _mount_event(pod, "FailedAttachVolume", MULTI_ATTACH, "2026-11-23T11:50:00Z"),
        # An earlier pod of the same name, and the kubelet's time-out beside the cause.
        _mount_event(pod, "FailedMount", "MountVolume.SetUp failed", "2026-11-23T11:59:00Z", "x"),
        _mount_event(pod, "FailedMount", MOUNT_TIMEOUT, "2026-11-23T11:52:00Z"),
    ]
    kube = EventsKube(task, [pod], [job], events)
    obs = rc.observe(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    assert obs is not None
    assert obs.jobs[job["metadata"]["name"]].waiting == said
    data = _cond(plan(obs).status, c.DATA_READY)
    assert data["reason"] == c.JOB_PENDING
    assert data["message"].endswith(f"Job {job['metadata']['name']} is waiting: {said}")
    # One list, of this pod's own Events alone.
    assert [f for plural, f in kube.lists if plural == "events"] == ["involvedObject.uid=pod-uid"]

    # Stable from pass to pass: a newer time-out, and the recorder's aggregation of the same
    # cause, leave the words (and so the status) as they were.
    kube.events += [
        _mount_event(pod, "FailedMount", MOUNT_TIMEOUT, "2026-11-23T11:58:00Z"),
        _mount_event(
            pod,
            "FailedAttachVolume",
            f"(combined from similar events): {MULTI_ATTACH}",
            "2026-11-23T11:57:00Z",
        ),
    ]
    again = rc.observe(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    assert again is not None and again.jobs[job["metadata"]["name"]].waiting == said
    # With nothing but the time-out, the time-out is what there is to say.
    kube.events = [_mount_event(pod, "FailedMount", MOUNT_TIMEOUT, "2026-11-23T11:58:00Z")]
    only = rc.observe(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    assert only is not None
    assert only.jobs[job["metadata"]["name"]].waiting.endswith(
        "cannot mount its volumes: " + MOUNT_TIMEOUT
    )


def test_a_mount_failure_that_is_over_is_not_the_cause_of_a_pod_pulling_its_image() -> None:
    """The reviewer's case: the Multi-Attach error resolved (the volume attached on this
    node) and the pod, still in ContainerCreating, pulls its image; it was said not to mount
    its volumes until the failure's Event expired, an hour later."""
    task, job, pod = _data_job_and_pod()
    attached = 'AttachVolume.Attach succeeded for volume "pvc-1234"'
    events = [
        _mount_event(pod, "FailedAttachVolume", MULTI_ATTACH, "2026-11-23T11:50:00Z"),
        _mount_event(pod, "FailedMount", MOUNT_TIMEOUT, "2026-11-23T11:52:00Z"),
        _mount_event(pod, "SuccessfulAttachVolume", attached, "2026-11-23T11:53:00Z"),
        _mount_event(pod, "Pulling", f'Pulling image "{IMAGE}"', "2026-11-23T11:53:05Z"),
    ]
    kube = EventsKube(task, [pod], [job], events)
    obs = rc.observe(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    assert obs is not None and obs.jobs[job["metadata"]["name"]].waiting == ""
    # Attached, not pulling yet: the kubelet's time-out, which names no volume as an attach
    # does ("unattached volumes=[...]"), is over too; it was the cause until the pull began.
    kube.events = events[:3]
    attached_only = rc.observe(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    assert attached_only is not None and attached_only.jobs[job["metadata"]["name"]].waiting == ""
    # Attached, then its mount failed: that failure is the cause.
    kube.events = [
        events[2],
        _mount_event(pod, "FailedMount", "MountVolume.SetUp failed", "2026-11-23T11:54:00Z"),
    ]
    again = rc.observe(kube, "agents", "weather", NOW)  # type: ignore[arg-type]
    assert again is not None
    assert again.jobs[job["metadata"]["name"]].waiting.endswith(
        "cannot mount its volumes: MountVolume.SetUp failed"
    )


def test_another_claims_attach_does_not_end_a_multi_attach_error() -> None:
    """A data-prep pod mounts the capture claim and the workspace: the workspace attached
    seconds after the capture claim's Multi-Attach error (which the attach/detach controller
    reports once, and which still held), and the cause was dropped."""
    task, job, pod = _data_job_and_pod()
    other = 'AttachVolume.Attach succeeded for volume "pvc-work"'
    events = [
        _mount_event(pod, "FailedAttachVolume", MULTI_ATTACH, "2026-11-23T11:50:00Z"),
        _mount_event(pod, "SuccessfulAttachVolume", other, "2026-11-23T11:50:06Z"),
    ]
    obs = rc.observe(EventsKube(task, [pod], [job], events), "agents", "weather", NOW)  # type: ignore[arg-type]
    assert obs is not None
    assert obs.jobs[job["metadata"]["name"]].waiting.endswith(
        "cannot mount its volumes: " + MULTI_ATTACH
    )


def test_a_triton_pod_that_cannot_mount_its_volumes_is_named_in_serving() -> None:
    """Finding 2, serving side: a Triton replica whose model volume cannot be attached."""
    task, _, pod = _data_job_and_pod()
    pod["metadata"].update(name="weather-slm-1", labels={n.LABEL_COMPONENT: "triton"})
    pod["spec"] = {}  # scheduled, said by its condition alone
    cause = (
        'MountVolume.MountDevice failed for volume "pvc-9" : rpc error: RequestID: 5b6c-77, boom'
    )
    events = [_mount_event(pod, "FailedMount", cause, "2026-11-23T11:50:00Z")]
    obs = rc.observe(EventsKube(task, [pod], [], events), "agents", "weather", NOW)  # type: ignore[arg-type]
    assert obs is not None
    assert obs.serving_waiting == (
        "pod weather-slm-1 cannot mount its volumes: MountVolume.MountDevice failed for volume "
        '"pvc-9" : rpc error: boom'
    )


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]},
        {  # not on a node yet: the scheduler's reason is in its status
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        },
        {  # past its volumes: the kubelet's reason is in its status
            "phase": "Pending",
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "ErrImagePull"}}}
            ],
        },
    ],
)
def test_a_task_without_a_pod_in_container_creating_lists_no_events(
    status: dict[str, Any],
) -> None:
    """Finding 2: a healthy task costs no extra request; Events are read only for a pod
    that waits in ContainerCreating, whose status cannot say why."""
    task, job, pod = _data_job_and_pod(**status)
    if status["phase"] != "Running":
        pod["spec"] = {}
    kube = EventsKube(task, [pod], [job])
    assert rc.observe(kube, "agents", "weather", NOW) is not None  # type: ignore[arg-type]
    assert [plural for plural, _ in kube.lists] == ["pods", "jobs"]


def test_a_forbidden_event_list_leaves_a_creating_pod_waiting_without_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 2: RBAC without the events `list` rule must not stop the reconcile of a task
    whose pod is being set up (every new pod is, for a moment); it is said in the log."""
    task, job, pod = _data_job_and_pod()
    rc._events_forbidden_logged.discard("agents")
    with caplog.at_level(logging.WARNING, logger="slm_operator"):
        obs = rc.observe(EventsKube(task, [pod], [job], forbidden=True), "agents", "weather", NOW)  # type: ignore[arg-type]
    assert obs is not None and obs.jobs[job["metadata"]["name"]].waiting == ""
    warned = [r.getMessage() for r in caplog.records if "may not list Events" in r.getMessage()]
    assert len(warned) == 1 and "cannot mount its volumes" in warned[0]


def test_data_ready_says_why_the_image_cannot_be_pulled() -> None:
    """Finding 6: DataReady said only "pod X cannot pull image Y" while the kubelet said why
    (401 Unauthorized: the registry wants credentials); the README promises its words."""
    cause = 'failed to pull and unpack image "ghcr.io/x/slm-trainer:0.1.0": 401 Unauthorized'
    said = []
    for reason, message in (
        ("ErrImagePull", cause),
        (
            "ImagePullBackOff",
            f'Back-off pulling image "ghcr.io/x/slm-trainer:0.1.0": ErrImagePull: {cause}',
        ),
    ):
        waiting = {"reason": reason, "message": message}
        task, job, pod = _data_job_and_pod(
            phase="Pending",
            containerStatuses=[
                {
                    "name": "trainer",
                    "image": "ghcr.io/x/slm-trainer:0.1.0",
                    "state": {"waiting": waiting},
                }
            ],
        )
        obs = rc.observe(EventsKube(task, [pod], [job]), "agents", "weather", NOW)  # type: ignore[arg-type]
        assert obs is not None
        said.append(_cond(plan(obs).status, c.DATA_READY)["message"])
    assert said[0] == said[1]
    assert said[0].endswith("cannot pull image ghcr.io/x/slm-trainer:0.1.0: 401 Unauthorized")


IMAGE = "ghcr.io/slm-fleet/trainer:0.1.0"
#: How containerd words a failed pull, as the kubelet puts it in the container's waiting
#: message: the gRPC wrapper, the image twice, then the cause.
CONTAINERD = (
    f'rpc error: code = {{code}} desc = failed to pull and unpack image "{IMAGE}": '
    f'failed to resolve reference "{IMAGE}": {{cause}}'
)
PULL_CAUSES = {
    "401 Unauthorized": (
        "Unknown",
        "failed to authorize: failed to fetch anonymous token: unexpected status from GET "
        "request to https://ghcr.io/token?scope=repository%3Aslm-fleet%2Ftrainer%3Apull"
        "&service=ghcr.io: 401 Unauthorized",
    ),
    "dial tcp: i/o timeout": (
        "DeadlineExceeded",
        'failed to do request: Head "https://ghcr.io/v2/slm-fleet/trainer/manifests/0.1.0": '
        "dial tcp 140.82.112.34:443: i/o timeout",
    ),
    f"{IMAGE}: not found": ("NotFound", f"{IMAGE}: not found"),
}


def _pulling(message: str, reason: str = "ErrImagePull", image: str = IMAGE) -> str:
    """What the status says of a trainer pod whose pull failed with ``message``."""
    pod = {
        "metadata": {"name": "weather-ft-small-6950bed916-smqzt", "uid": "u"},
        "spec": {"nodeName": "node-1"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": image,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
            ],
        },
    }
    return pod_waiting(pod)


@pytest.mark.parametrize("cause", list(PULL_CAUSES))
def test_a_failed_pull_keeps_the_cause_containerd_ends_its_message_with(cause: str) -> None:
    """The reviewer's containerd messages (294 to 356 characters) were cut at 300 from the
    start: the condition named the image three times and lost the 401 or the time-out."""
    code, text = PULL_CAUSES[cause]
    said = _pulling(CONTAINERD.format(code=code, cause=text))
    assert said.startswith(f"pod weather-ft-small-6950bed916-smqzt cannot pull image {IMAGE}: ")
    assert said.endswith(cause) and len(said) <= 300
    assert "rpc error" not in said and "failed to resolve reference" not in said


def test_a_long_pull_failure_is_cut_before_its_cause_and_reads_the_same_every_attempt() -> None:
    """Too long even without containerd's wrappers (a long image name): the start of the
    cause goes, not its end. The registry's address and the local port change from one pull
    attempt to the next; the status must not be rewritten for that."""
    image = f"registry.example.com/{'platform/' * 12}trainer:0.1.0"
    head = f'failed to do request: Head "https://registry.example.com/v2/{"x/" * 40}manifests"'
    attempts = [
        f"{head}: read tcp 10.244.1.5:41234->140.82.112.34:443: read: connection reset by peer",
        f"{head}: read tcp 10.244.1.5:52871->[2606:50c0::154]:443: read: connection reset by peer",
    ]
    said = [_pulling(CONTAINERD.format(code="Unknown", cause=a), image=image) for a in attempts]
    back_off = f'Back-off pulling image "{image}": ErrImagePull: {attempts[1]}'
    said.append(_pulling(back_off, "ImagePullBackOff", image))
    assert said[0] == said[1] == said[2]
    assert len(said[0]) == 300
    assert said[0].startswith(
        f"pod weather-ft-small-6950bed916-smqzt cannot pull image {image}: ..."
    )
    assert said[0].endswith('/manifests": read tcp: read: connection reset by peer')
