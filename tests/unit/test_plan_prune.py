"""The prune Job: a superseded revision's files leave the storage claim, and nothing waits on it.

Every revision writes ``<task>/<revision>/`` on the claim (data, candidates, checkpoints with
optimizer state, model repositories); without the prune Job nothing removed a superseded
one, and after enough retrainings the claim was full and the next Job failed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from test_plan import (
    NOW,
    _serving_task,
    _step,
    captured,
    conds,
    deployment,
    jobs_through,
    retrained_jobs,
    view,
)

from slm_operator import conditions as c
from slm_operator import naming as n
from slm_operator.observe import FAILED, PENDING, RUNNING, SUCCEEDED, JobView, job_view
from slm_operator.plan import Observed, plan


def _prunes(p: Any) -> list[dict[str, Any]]:
    return [o for o in p.apply if o["metadata"]["labels"].get(n.LABEL_STAGE) == n.STAGE_PRUNE]


def _args(job: dict[str, Any]) -> list[str]:
    return list(job["spec"]["template"]["spec"]["containers"][0]["args"])


def _made(job: dict[str, Any], state: str, message: str = "") -> JobView:
    """The view of ``job`` once the API server took it (it has a uid) and it is ``state``."""
    meta = job["metadata"]
    return dataclasses.replace(
        view(meta["name"], n.STAGE_PRUNE, meta["labels"][n.LABEL_REVISION], state, message=message),
        uid=f"uid-{meta['name']}",
    )


def _promoted() -> tuple[dict[str, Any], dict[str, JobView], str, str]:
    """A task that served ``old`` and has just promoted ``new`` (a spec edit), whose Jobs
    are the new revision's: the old ones were deleted with the promotion."""
    task, jobs, _ = _serving_task()
    old = n.revision_of(task["spec"])
    task["metadata"]["generation"] = 2
    task["spec"]["candidates"][0]["epochs"] = 5
    new = n.revision_of(task["spec"])
    p = _step(task, {**jobs, **jobs_through(task, "export")}, deployment(old), NOW, None)
    assert task["status"]["revision"]["active"] == new
    assert sorted(p.delete_jobs) == sorted(jobs)  # the old revision's Jobs go
    return task, jobs_through(task, "export"), old, new


def _retrain(
    task: dict[str, Any], jobs: dict[str, JobView], dep: dict[str, Any], t: dt.datetime
) -> tuple[str, Any]:
    """Enough new calls for a retraining (``minNewExamples`` 100): its revision, and the plan
    of the pass that starts training it."""
    task["spec"]["retraining"] = {"minNewExamples": 100}
    _step(task, jobs, dep, t, captured(1000))
    _step(task, jobs, dep, t + dt.timedelta(seconds=10), captured(1200))
    p = _step(task, jobs, dep, t + dt.timedelta(seconds=11), None)
    training = task["status"]["revision"]["training"]
    assert training == n.revision_of(task["spec"], 1)
    return training, p


def test_once_the_promoted_revision_alone_serves_one_prune_job_removes_the_others_files() -> None:
    task, jobs, old, new = _promoted()
    # The Deployment still serves the old template: its pods read the old repository.
    rolling = deployment(new)
    rolling["status"].update(replicas=2, updatedReplicas=1)
    p = _step(task, jobs, rolling, NOW + dt.timedelta(seconds=1), None)
    assert not _prunes(p)
    p = _step(task, jobs, deployment(old), NOW + dt.timedelta(seconds=1), None)
    assert not _prunes(p)

    p = _step(task, jobs, deployment(new), NOW + dt.timedelta(seconds=2), None)
    [job] = _prunes(p)
    assert job["metadata"]["name"] == n.prune_job_name("weather", new)
    assert job["metadata"]["labels"][n.LABEL_REVISION] == new
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["slm-trainer", "prune"]
    assert _args(job)[:3] == ["--root=/workspace", "--task=weather", f"--keep={new}"]
    assert old not in ",".join(_args(job))
    # Nothing else changes: it is housekeeping.
    assert conds(task["status"])[c.READY] == (c.TRUE, c.READY_REASON)


def test_no_prune_while_another_job_of_the_task_runs_or_is_made() -> None:
    task, jobs, _, new = _promoted()
    dep = deployment(new)
    ft = n.finetune_job_name("weather", "small", new)
    for state in (PENDING, RUNNING):
        busy = {**jobs, ft: dataclasses.replace(jobs[ft], state=state, result=None)}
        p = plan(Observed(task, busy, dep, NOW + dt.timedelta(seconds=2)))
        assert not _prunes(p), state
    # A retraining starts: its data-prep Job is created in this pass, and the prune waits.
    training, p = _retrain(task, jobs, dep, NOW + dt.timedelta(seconds=5))
    assert n.data_job_name("weather", training) in [o["metadata"]["name"] for o in p.apply]
    assert not _prunes(p)


def test_the_revision_in_training_is_kept() -> None:
    task, jobs, _, new = _promoted()
    dep = deployment(new)
    t = NOW + dt.timedelta(seconds=5)
    training, _ = _retrain(task, jobs, dep, t)
    # Its data-prep Job finished (too few examples: it curates again later); nothing runs.
    waiting = view(
        n.data_job_name("weather", training),
        n.STAGE_PREPARE,
        training,
        FAILED,
        res=None,
        message="too few",
    )
    p = plan(Observed(task, {**jobs, waiting.name: waiting}, dep, t + dt.timedelta(seconds=12)))
    [job] = _prunes(p)
    assert f"--keep={new},{training}" in _args(job)


def test_while_the_prune_job_runs_a_new_revision_waits_for_it() -> None:
    """A revision whose training starts after the prune Job was made is not among those it
    keeps: its Jobs wait until the prune is over, and the conditions say why."""
    task, jobs, _, new = _promoted()
    dep = deployment(new)
    [job] = _prunes(_step(task, jobs, dep, NOW + dt.timedelta(seconds=2), None))
    running = {**jobs, job["metadata"]["name"]: _made(job, RUNNING)}
    t = NOW + dt.timedelta(seconds=5)
    training, p = _retrain(task, running, dep, t)
    assert not [o for o in p.apply if o["kind"] == "Job"]
    data = c.find(task["status"]["conditions"], c.DATA_READY)
    assert data is not None and data["status"] == c.UNKNOWN
    assert f"waiting for Job {job['metadata']['name']} to finish removing" in data["message"]
    assert conds(task["status"])[c.READY] == (c.TRUE, c.READY_REASON)

    done = {**jobs, job["metadata"]["name"]: _made(job, SUCCEEDED)}
    p = _step(task, done, dep, t + dt.timedelta(seconds=12), None)
    assert n.data_job_name("weather", training) in [o["metadata"]["name"] for o in p.apply]
    assert not _prunes(p)  # made once: never applied again


def test_a_failed_prune_blocks_nothing_and_serving_says_so_once() -> None:
    task, jobs, _, new = _promoted()
    dep = deployment(new)
    [job] = _prunes(_step(task, jobs, dep, NOW + dt.timedelta(seconds=2), None))
    name = job["metadata"]["name"]
    failed = {**jobs, name: _made(job, FAILED, message="BackoffLimitExceeded: disk error")}
    p = _step(task, failed, dep, NOW + dt.timedelta(seconds=3), None)
    assert conds(task["status"])[c.READY] == (c.TRUE, c.READY_REASON)
    assert conds(task["status"])[c.SERVING] == (c.TRUE, c.DEPLOYMENT_AVAILABLE)
    serving = c.find(task["status"]["conditions"], c.SERVING)
    assert serving is not None
    assert f"removing the files of earlier revisions failed (Job {name}: " in serving["message"]
    assert "BackoffLimitExceeded: disk error" in serving["message"]
    assert not p.events  # a message, not a Warning on every pass
    assert not _prunes(p) and name not in p.delete_jobs

    # Training still starts.
    t = NOW + dt.timedelta(seconds=5)
    training, p = _retrain(task, failed, dep, t)
    assert n.data_job_name("weather", training) in [o["metadata"]["name"] for o in p.apply]

    # Deleted by hand, it is made again: that is how it is run again.
    data = n.data_job_name("weather", training)
    done = view(data, n.STAGE_PREPARE, training, SUCCEEDED, res=None)
    done = dataclasses.replace(done, state=FAILED, message="too few")
    again = plan(Observed(task, {**jobs, data: done}, dep, t + dt.timedelta(seconds=12)))
    assert [o["metadata"]["name"] for o in _prunes(again)] == [name]


def test_a_prune_job_the_api_server_refused_holds_nothing() -> None:
    task, jobs, _, new = _promoted()
    dep = deployment(new)
    [job] = _prunes(_step(task, jobs, dep, NOW + dt.timedelta(seconds=2), None))
    refused = dataclasses.replace(_made(job, PENDING), uid="", waiting="refused: quota")
    jobs2 = {**jobs, job["metadata"]["name"]: refused}
    training, p = _retrain(task, jobs2, dep, NOW + dt.timedelta(seconds=5))
    assert n.data_job_name("weather", training) in [o["metadata"]["name"] for o in p.apply]


def _deleted(job: dict[str, Any], conditions: list[dict[str, Any]]) -> JobView:
    """The view of ``job`` being deleted (at the next promotion, or by hand) while another
    controller's finalizer holds it, as the Job watch reports it."""
    meta = job["metadata"]
    raw = {
        "metadata": {
            "name": meta["name"],
            "uid": f"uid-{meta['name']}",
            "labels": meta["labels"],
            "deletionTimestamp": "2026-11-23T12:03:00Z",
            "finalizers": ["example.com/hold"],
        },
        "status": {"conditions": conditions},
    }
    return job_view(raw, [])


@pytest.mark.parametrize("ended", ["Complete", "Failed"])
def test_a_finished_prune_job_held_by_a_finalizer_holds_no_training(ended: str) -> None:
    """A prune Job that finished and is being deleted, kept by another controller's
    finalizer, removes nothing any more: every new revision's Jobs waited for it for good."""
    task, jobs, _, new = _promoted()
    dep = deployment(new)
    [job] = _prunes(_step(task, jobs, dep, NOW + dt.timedelta(seconds=2), None))
    held = _deleted(job, [{"type": ended, "status": "True"}])
    assert (held.deleting, held.finished) == (True, True)
    jobs2 = {**jobs, job["metadata"]["name"]: held}
    t = NOW + dt.timedelta(minutes=30)
    training, p = _retrain(task, jobs2, dep, t)
    assert n.data_job_name("weather", training) in [o["metadata"]["name"] for o in p.apply]
    data = c.find(task["status"]["conditions"], c.DATA_READY)
    assert data is not None and "removing the files" not in data["message"]
    # Nor does it hold the next prune: the revision in training is kept by it.
    prep = n.data_job_name("weather", training)
    too_few = dataclasses.replace(
        view(prep, n.STAGE_PREPARE, training, FAILED, res=None), message="too few"
    )
    p = plan(Observed(task, {**jobs2, prep: too_few}, dep, t + dt.timedelta(seconds=12)))
    assert not _prunes(p)  # its name is still taken: never applied again


def test_a_finished_job_of_the_old_revision_held_by_a_finalizer_holds_no_prune() -> None:
    """The old revision's Jobs are deleted at the promotion; one another controller's
    finalizer keeps writes nothing once it finished, and the prune no longer waits for it
    (one that had not finished still may write: the prune waits)."""
    task, jobs, old, new = _promoted()
    dep = deployment(new)
    name = n.data_job_name("weather", old)
    job = {"metadata": {"name": name, "labels": n.labels("weather", n.STAGE_PREPARE, old)}}
    for ended, pruned in (([{"type": "Complete", "status": "True"}], True), ([], False)):
        held = {**jobs, name: _deleted(job, ended)}
        p = plan(Observed(task, held, dep, NOW + dt.timedelta(seconds=2)))
        assert bool(_prunes(p)) is pruned, ended


def test_a_prune_job_being_deleted_before_it_finished_still_holds_training() -> None:
    """Deleted while its pod may still run (no Complete or Failed condition yet), it may
    still remove folders: a new revision's Jobs wait for it to go."""
    task, jobs, _, new = _promoted()
    dep = deployment(new)
    [job] = _prunes(_step(task, jobs, dep, NOW + dt.timedelta(seconds=2), None))
    held = _deleted(job, [])
    assert (held.deleting, held.finished) == (True, False)
    t = NOW + dt.timedelta(minutes=30)
    _, p = _retrain(task, {**jobs, job["metadata"]["name"]: held}, dep, t)
    assert not [o for o in p.apply if o["kind"] == "Job"]
    data = c.find(task["status"]["conditions"], c.DATA_READY)
    assert data is not None
    assert f"waiting for Job {job['metadata']['name']} to finish removing" in data["message"]


def test_the_prune_job_goes_with_its_revisions_jobs_when_another_is_promoted() -> None:
    """After each promoted retraining, the superseded revision's folder is removed: what a
    claim holds stays bounded however often the task retrains."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100}
    rev0 = n.revision_of(task["spec"])
    live = dict(jobs)
    t, count, score = NOW, 1000, 0.95
    pruned: list[tuple[str, str]] = []  # (served revision, --keep) of each prune Job made
    for epoch in (1, 2, 3):
        t += dt.timedelta(seconds=10)
        _step(task, live, dep, t, captured(count))
        count += 200
        t += dt.timedelta(seconds=10)
        _step(task, live, dep, t, captured(count))
        t += dt.timedelta(seconds=1)
        _step(task, live, dep, t, None)
        rev = n.revision_of(task["spec"], epoch)
        assert task["status"]["revision"]["training"] == rev
        prev = task["status"]["revision"]["active"]
        new = {
            k.replace(rev0, rev): dataclasses.replace(v, name=k.replace(rev0, rev), revision=rev)
            for k, v in retrained_jobs(task, rev0, rev0, scores=(score, 0.5)).items()
        }
        en = n.export_job_name("weather", "small", rev)
        uri = f"pvc://slm-work/weather/{rev}/model_repositories/small"
        new[en] = view(en, "export", rev, SUCCEEDED, _export(uri), candidate="small")
        live.update(new)
        for d in (dep, deployment(rev), deployment(rev)):
            t += dt.timedelta(seconds=1)
            p = _step(task, live, d, t, None)
            for name in p.delete_jobs:
                live.pop(name, None)
            for job in _prunes(p):
                pruned.append((job["metadata"]["labels"][n.LABEL_REVISION], _args(job)[2]))
                live[job["metadata"]["name"]] = _made(job, SUCCEEDED)
        assert task["status"]["revision"]["active"] == rev != prev
        assert {v.revision for v in live.values()} == {rev}  # the prune Job of prev went too
        dep, score = deployment(rev), score + 0.01
    revisions = [n.revision_of(task["spec"], e) for e in (1, 2, 3)]
    assert pruned == [(r, f"--keep={r}") for r in revisions]


def _export(uri: str) -> Any:
    from slm_contract import TrainerResult

    return TrainerResult(stage="export", ok=True, artifact_uri=uri)
