"""A promoted revision rolling out over the previous one's pods: what Ready says, when the
rollout counts as stuck, and the confidence threshold the route carries meanwhile.

With ``maxUnavailable: 0`` the pods of the Deployment's previous template (the model served
before) keep running until the new ones are ready. Ready said that they answered the calls
while the route, in shadow, sent every call to the LLM; a new pod that never became ready
left that claim, Ready=True, for good; and the route carried the new model's calibrated
threshold while the old model answered.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from test_plan import (
    HEALTHY,
    NOW,
    SLOW,
    WAKE_GRACE_S,
    _serving_task,
    _step,
    _stored,
    conds,
    deployment,
    jobs_through,
)

from slm_operator import conditions as c
from slm_operator import naming as n
from slm_operator.observe import JobView
from slm_operator.plan import Observed, plan

CRASH_LOOP = "pod weather-slm-7d9f-x2k4q: CrashLoopBackOff (last exit code 1, Error)"


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    found = c.find(status["conditions"], c.READY)
    assert found is not None
    return dict(found)


def _rolling(rev: str, progressing: dict[str, Any] | None = None) -> dict[str, Any]:
    """``rev``'s Deployment mid-rollout: its template seen by the controller, one pod of the
    previous template ready, the new one not (yet)."""
    dep = deployment(rev)
    dep["metadata"]["generation"] = 2
    dep["status"].update(observedGeneration=2, replicas=2, updatedReplicas=1, readyReplicas=1)
    if progressing is not None:
        dep["status"]["conditions"].append({"type": "Progressing", **progressing})
    return dep


def _promoted(
    strategy: str = "", threshold: float | None = None
) -> tuple[dict[str, Any], dict[str, JobView], str, dt.datetime]:
    """A task serving (route slm) whose retrained revision has just been promoted."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 1
    if strategy:
        task["spec"]["rollout"] = {"strategy": strategy}
    t = NOW
    for _ in range(3):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
    assert task["status"]["route"]["mode"] == "slm"
    task["metadata"]["generation"] = 2
    task["spec"]["candidates"][0]["epochs"] = 5  # a new revision, trained and exported
    new_rev = n.revision_of(task["spec"])
    new_jobs = jobs_through(task, "export")
    if threshold is not None:
        new_jobs = {
            k: dataclasses.replace(v, result=dataclasses.replace(v.result, threshold=threshold))
            if v.stage == "finetune" and v.result is not None
            else v
            for k, v in new_jobs.items()
        }
    jobs = {**jobs, **new_jobs}
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)  # promoted: the Deployment is applied in this pass
    assert task["status"]["revision"]["active"] == new_rev
    return task, jobs, new_rev, t


def _pass(
    task: dict[str, Any],
    jobs: dict[str, JobView],
    dep: dict[str, Any],
    at: dt.datetime,
    waiting: str = "",
    m: Any = HEALTHY,
) -> Any:
    p = plan(Observed(task, jobs, dep, at, m, serving_waiting=waiting))
    task["status"] = _stored(p.status)
    return p


def test_ready_says_the_llm_answers_while_a_new_revision_rolls_out_in_shadow() -> None:
    """A newly promoted revision starts in shadow: the LLM answers every call and the old
    pods only get shadow copies. Ready said that the old pods answered."""
    task, jobs, new_rev, t = _promoted()
    p = _pass(task, jobs, _rolling(new_rev), t + dt.timedelta(seconds=10))
    assert p.status["route"]["mode"] == "shadow"
    ready = _ready(p.status)
    assert ready["status"] == c.TRUE
    assert "is rolling out" in ready["message"]
    assert "the LLM answers the task's calls" in ready["message"]
    assert "shadow copies" in ready["message"]
    assert "previous template answer" not in ready["message"]


def test_ready_says_the_previous_pods_answer_while_a_direct_rollout_waits() -> None:
    """With rollout.strategy direct the route is slm at once: the old pods do answer."""
    task, jobs, new_rev, t = _promoted("direct")
    p = _pass(task, jobs, _rolling(new_rev), t + dt.timedelta(seconds=10))
    assert p.status["route"]["mode"] == "slm"
    message = _ready(p.status)["message"]
    assert "is rolling out" in message
    assert "the model served before" in message and "answer the task's calls" in message


def test_a_rollout_past_its_progress_deadline_is_stuck_with_one_warning() -> None:
    """The new pod crash-loops: the Deployment controller reports ProgressDeadlineExceeded.
    Ready said True ("is rolling out") for good, with no Warning and no time limit; now it
    is False, RolloutStuck, names the pod and why, and one Warning Event says so."""
    task, jobs, new_rev, t = _promoted()
    rolling = _rolling(
        new_rev,
        {
            "status": "True",
            "reason": "ReplicaSetUpdated",
            "lastUpdateTime": (t + dt.timedelta(seconds=5)).isoformat(),
        },
    )
    t += dt.timedelta(seconds=10)
    p = _pass(task, jobs, rolling, t, CRASH_LOOP)
    assert conds(p.status)[c.READY] == (c.TRUE, c.READY_REASON)  # within its budget
    stuck = _rolling(
        new_rev,
        {
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "lastUpdateTime": (t + dt.timedelta(seconds=600)).isoformat(),
        },
    )
    warnings = []
    for i in range(5):
        p = _pass(task, jobs, stuck, t + dt.timedelta(seconds=610 + 10 * i), CRASH_LOOP)
        warnings += [e for e in p.events if e[0] == "Warning"]
    ready = _ready(p.status)
    assert (ready["status"], ready["reason"]) == (c.FALSE, "RolloutStuck")
    assert CRASH_LOOP in ready["message"]
    assert "ProgressDeadlineExceeded" in ready["message"]
    assert "the LLM answers the task's calls" in ready["message"]
    assert p.status["phase"] == "Serving"
    assert p.status["route"]["mode"] == "shadow"  # the calls are answered meanwhile
    assert [e[1] for e in warnings] == ["RolloutStuck"]


def test_a_rollout_stuck_under_fallback_still_posts_its_warning_once() -> None:
    """Ready was already False (an SLO fallback): a Ready that stays False posts no event of
    its own, so the stuck rollout gets its Warning apart, once."""
    task, jobs, new_rev, t = _promoted()
    rolling = _rolling(new_rev)
    for _ in range(2):  # breachWindows 2
        t += dt.timedelta(seconds=10)
        _pass(task, jobs, rolling, t, CRASH_LOOP, SLOW)
    assert conds(task["status"])[c.READY] == (c.FALSE, c.SLO_BREACHED)
    stuck = _rolling(new_rev, {"status": "False", "reason": "ProgressDeadlineExceeded"})
    warnings = []
    for _ in range(3):
        t += dt.timedelta(seconds=10)
        p = _pass(task, jobs, stuck, t, CRASH_LOOP, SLOW)
        warnings += [e[1] for e in p.events if e[0] == "Warning"]
    assert conds(p.status)[c.READY] == (c.FALSE, "RolloutStuck")
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    assert "meanwhile the LLM answers the task's calls" in _ready(p.status)["message"]
    assert warnings == ["RolloutStuck"]


@pytest.mark.parametrize(
    ("waited", "stuck"), [(WAKE_GRACE_S - 30, False), (WAKE_GRACE_S + 30, True)]
)
def test_a_rollout_that_made_no_progress_for_the_triton_startup_budget_is_stuck(
    waited: float, stuck: bool
) -> None:
    """Before the Deployment controller's deadline says so (a longer
    progressDeadlineSeconds): no progress for the Triton pod's start-up budget is stuck."""
    task, jobs, new_rev, t = _promoted()
    started = t + dt.timedelta(seconds=5)
    rolling = _rolling(
        new_rev,
        {"status": "True", "reason": "ReplicaSetUpdated", "lastUpdateTime": started.isoformat()},
    )
    p = _pass(task, jobs, rolling, started + dt.timedelta(seconds=waited), CRASH_LOOP)
    ready = _ready(p.status)
    if stuck:
        assert (ready["status"], ready["reason"]) == (c.FALSE, "RolloutStuck")
        assert CRASH_LOOP in ready["message"]
    else:
        assert (ready["status"], ready["reason"]) == (c.TRUE, c.READY_REASON)


def test_a_finished_rollouts_old_progress_time_is_not_a_stuck_rollout() -> None:
    """A scale bumps the Deployment's generation: for one pass the controller has not seen
    it, and its Progressing condition is the last rollout's, finished long ago."""
    task, jobs, new_rev, t = _promoted()
    long_ago = (t - dt.timedelta(hours=5)).isoformat()
    scaled = _rolling(
        new_rev,
        {"status": "True", "reason": "NewReplicaSetAvailable", "lastUpdateTime": long_ago},
    )
    scaled["metadata"]["generation"] = 3  # observedGeneration 2
    p = _pass(task, jobs, scaled, t + dt.timedelta(seconds=10))
    assert conds(p.status)[c.READY] == (c.TRUE, c.READY_REASON)


def test_the_route_keeps_the_stricter_threshold_while_the_previous_pods_answer() -> None:
    """rollout.strategy direct: the old model's pods answer until the new ones are ready, and
    the route carried the new model's threshold (0.2), calibrated for another model: the old
    one's answers were accepted at a confidence it was never calibrated for. The higher of
    the two holds until only new pods answer; then the new one alone."""
    task, jobs, new_rev, t = _promoted("direct", threshold=0.2)
    assert task["status"]["route"]["confidenceThreshold"] == 0.7  # the promotion pass
    for _ in range(3):
        t += dt.timedelta(seconds=10)
        p = _pass(task, jobs, _rolling(new_rev), t)
        assert p.status["route"]["mode"] == "slm"
        assert p.status["route"]["confidenceThreshold"] == 0.7
    t += dt.timedelta(seconds=10)
    p = _pass(task, jobs, deployment(new_rev), t)
    assert p.status["route"]["confidenceThreshold"] == 0.2
    assert p.status["selectedModel"]["threshold"] == 0.2


def test_a_higher_new_threshold_applies_at_once() -> None:
    task, jobs, new_rev, t = _promoted("direct", threshold=0.9)
    p = _pass(task, jobs, _rolling(new_rev), t + dt.timedelta(seconds=10))
    assert p.status["route"]["confidenceThreshold"] == 0.9


def test_a_stuck_rollout_stays_stuck_through_a_scale_up_until_its_new_pods_are_ready() -> None:
    """A scale-up of a stuck Deployment (the operator's own autoscaler, a minReplicas edit)
    makes the Deployment controller reset Progressing to True, ReplicaSetUpdated, with a
    fresh lastUpdateTime, and for one pass its controller has not seen the new generation.
    Ready went True ("is rolling out", a Normal Event) and RolloutStuck came back with a
    second Warning ten minutes later, at every scale-up, while the same pod crash-looped.
    The verdict stays until the rollout completes."""
    task, jobs, new_rev, t = _promoted()
    stuck = _rolling(new_rev, {"status": "False", "reason": "ProgressDeadlineExceeded"})
    events = []
    for _ in range(2):
        t += dt.timedelta(seconds=10)
        events += _pass(task, jobs, stuck, t, CRASH_LOOP).events
    message = _ready(task["status"])["message"]
    assert conds(task["status"])[c.READY] == (c.FALSE, "RolloutStuck")

    unseen = _rolling(new_rev, {"status": "False", "reason": "ProgressDeadlineExceeded"})
    unseen["metadata"]["generation"] = 3  # scaled; observedGeneration still 2
    unseen["spec"]["replicas"] = 2
    t += dt.timedelta(seconds=10)
    events += _pass(task, jobs, unseen, t, CRASH_LOOP).events
    assert conds(task["status"])[c.READY] == (c.FALSE, "RolloutStuck")

    scaled = _rolling(
        new_rev, {"status": "True", "reason": "ReplicaSetUpdated", "lastUpdateTime": t.isoformat()}
    )
    scaled["metadata"]["generation"] = scaled["status"]["observedGeneration"] = 3
    scaled["spec"]["replicas"] = 2
    scaled["status"].update(replicas=3, updatedReplicas=2, readyReplicas=1)
    for s in (10, 300, 590, 610, 1300):
        p = _pass(task, jobs, scaled, t + dt.timedelta(seconds=s), CRASH_LOOP)
        events += p.events
        ready = _ready(p.status)
        assert (ready["status"], ready["reason"]) == (c.FALSE, "RolloutStuck"), s
        assert ready["message"] == message, s  # no status write either
    assert [e[1] for e in events if e[0] == "Warning"] == ["RolloutStuck"]
    assert not [e for e in events if e[1] == c.READY_REASON]

    # The new pods are ready: the rollout is complete, and Ready is True.
    done = deployment(new_rev)
    done["spec"]["replicas"] = 2
    done["status"].update(replicas=2, updatedReplicas=2, readyReplicas=2)
    p = _pass(task, jobs, done, t + dt.timedelta(seconds=1310))
    assert conds(p.status)[c.READY] == (c.TRUE, c.READY_REASON)
    assert "is rolling out" not in _ready(p.status)["message"]


def test_a_stuck_verdict_is_the_revisions_a_newly_promoted_one_starts_afresh() -> None:
    """RolloutStuck is kept for the revision it was found for: another promoted revision
    rolls out under Ready True until its own rollout is stuck."""
    task, jobs, new_rev, t = _promoted()
    stuck = _rolling(new_rev, {"status": "False", "reason": "ProgressDeadlineExceeded"})
    t += dt.timedelta(seconds=10)
    _pass(task, jobs, stuck, t, CRASH_LOOP)
    assert conds(task["status"])[c.READY] == (c.FALSE, "RolloutStuck")
    task["metadata"]["generation"] = 3
    task["spec"]["candidates"][0]["epochs"] = 6  # fixed by another edit
    third = n.revision_of(task["spec"])
    jobs = {**jobs, **jobs_through(task, "export")}
    t += dt.timedelta(seconds=10)
    _pass(task, jobs, stuck, t, CRASH_LOOP)  # promoted: its Deployment is applied now
    assert task["status"]["revision"]["active"] == third
    fresh = _rolling(
        third, {"status": "True", "reason": "ReplicaSetUpdated", "lastUpdateTime": t.isoformat()}
    )
    p = _pass(task, jobs, fresh, t + dt.timedelta(seconds=10), CRASH_LOOP)
    assert conds(p.status)[c.READY] == (c.TRUE, c.READY_REASON)
    assert "is rolling out" in _ready(p.status)["message"]
