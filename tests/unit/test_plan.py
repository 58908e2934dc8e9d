"""The reconcile decision on plain data: every phase of an AgentTask's life, no cluster."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_contract import TrainerResult
from slm_operator import conditions as c
from slm_operator import live as lv
from slm_operator import naming as n
from slm_operator.live import CounterReading, Metrics
from slm_operator.observe import FAILED, PENDING, RUNNING, SUCCEEDED, JobView, job_view
from slm_operator.plan import (
    WAKE_GRACE_S,
    Observed,
    agreement_since_s,
    gate_verdict,
    metrics_due,
    plan,
    select,
    with_apply_failures,
)
from slm_operator.prom import PromMetrics

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.UTC)


def make_task(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "taskType": "tool-call",
        "dataset": {
            "uri": "pvc://calls/agent/weather.jsonl",
            "minExamples": 200,
            "evalFraction": 0.2,
            "piiScrubbing": True,
        },
        "candidates": [
            {"name": "small", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "method": "lora"},
            {"name": "big", "model": "Qwen/Qwen2.5-1.5B-Instruct", "method": "lora"},
        ],
        "training": {"gpus": 1, "backoffLimit": 2, "activeDeadlineSeconds": 3600},
        "storage": {"claimName": "slm-work"},
        "evaluation": {"metric": "tool-call-ast", "gate": {"minScore": 0.8, "maxDropVsLLM": 0.05}},
        "serving": {"minReplicas": 1, "maxReplicas": 3, "gpus": 1},
        "fallback": {
            "llm": {
                "baseURL": "https://llm.example.com/v1",
                "model": "gpt-4o",
                "apiKeySecretRef": {"name": "llm", "key": "api-key"},
            }
        },
    }
    spec.update(overrides)
    return {
        "apiVersion": "slmfleet.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": "weather", "namespace": "agents", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }


def result(stage: str, **kw: Any) -> TrainerResult:
    return TrainerResult(stage=stage, ok=kw.pop("ok", True), **kw)


def view(
    name: str,
    stage: str,
    rev: str,
    state: str,
    res: TrainerResult | None = None,
    candidate: str | None = None,
    message: str = "",
    finished: dt.datetime | None = None,
) -> JobView:
    return JobView(
        name=name,
        stage=stage,
        revision=rev,
        candidate=candidate,
        state=state,
        result=res,
        message=message,
        finished_at=finished or (NOW - dt.timedelta(seconds=5)),
    )


def jobs_through(
    task: dict[str, Any], upto: str, scores: tuple[float, float] = (0.9, 0.95)
) -> dict[str, JobView]:
    rev = n.revision_of(task["spec"])
    name = task["metadata"]["name"]
    claim = task["spec"]["storage"]["claimName"]
    out = {}
    dn = n.data_job_name(name, rev)
    out[dn] = view(
        dn,
        "prepare",
        rev,
        SUCCEEDED,
        result("prepare", examples=1000, train_examples=800, eval_examples=200),
    )
    if upto == "data":
        return out
    for cand, score, params in (
        ("small", scores[0], 135_000_000),
        ("big", scores[1], 1_500_000_000),
    ):
        jn = n.finetune_job_name(name, cand, rev)
        out[jn] = view(
            jn,
            "finetune",
            rev,
            SUCCEEDED,
            result(
                "finetune",
                candidate=cand,
                score=score,
                llm_score=0.93,
                parameters=params,
                artifact_uri=f"pvc://{claim}/weather/{rev}/candidates/{cand}",
                threshold=0.7,
                train_seconds=120.0,
            ),
            candidate=cand,
        )
    if upto == "train":
        return out
    en = n.export_job_name(name, "small", rev)  # smallest-passing: small
    out[en] = view(
        en,
        "export",
        rev,
        SUCCEEDED,
        result("export", artifact_uri=f"pvc://{claim}/weather/{rev}/model_repository"),
        candidate="small",
    )
    return out


def deployment(
    rev: str, candidate: str = "small", available: bool = True, ready: int = 1
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "weather-slm",
            "generation": 1,
            "annotations": {
                n.LABEL_REVISION: rev,
                n.ANNOTATION_CANDIDATE: candidate,
                n.ANNOTATION_ARTIFACT: f"pvc://slm-work/weather/{rev}/model_repository",
            },
        },
        "spec": {"replicas": 1},
        "status": {
            "observedGeneration": 1,
            "replicas": 1,
            "updatedReplicas": 1,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": [{"type": "Available", "status": "True" if available else "False"}],
        },
    }


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {x["type"]: (x["status"], x["reason"]) for x in status["conditions"]}


def kinds(p: Any) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in p.apply]


def training_jobs(p: Any) -> list[dict[str, Any]]:
    """The Jobs a pass applies, less the prune Job of a served revision (test_plan_prune.py):
    what "nothing to re-run" means."""
    return [
        o
        for o in p.apply
        if o["kind"] == "Job" and o["metadata"]["labels"].get(n.LABEL_STAGE) != n.STAGE_PRUNE
    ]


def kinds_but_prune(p: Any) -> list[tuple[str, str]]:
    return [k for k in kinds(p) if not k[1].startswith("weather-prune-")]


def test_fresh_task_starts_data_prep_and_sets_every_condition() -> None:
    task = make_task()
    p = plan(Observed(task, {}, None, NOW))
    rev = n.revision_of(task["spec"])
    assert kinds(p) == [("Job", f"weather-data-{rev}")]
    cs = conds(p.status)
    assert set(cs) == set(c.ALL_TYPES)
    assert cs[c.DATA_READY] == (c.UNKNOWN, c.JOB_PENDING)
    assert cs[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_SERVING_MODEL)
    assert cs[c.READY][0] == c.FALSE
    assert p.status["phase"] == "PreparingData"
    assert p.status["route"]["mode"] == "llm"
    assert p.status["revision"] == {"active": "", "training": rev}
    assert all(x["observedGeneration"] == 1 for x in p.status["conditions"])


def test_after_data_prep_one_gpu_job_per_candidate() -> None:
    task = make_task()
    p = plan(Observed(task, jobs_through(task, "data"), None, NOW))
    ft = [o for o in p.apply if o["metadata"]["labels"][n.LABEL_STAGE] == "finetune"]
    assert len(ft) == 2
    for job in ft:
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
    assert conds(p.status)[c.DATA_READY] == (c.TRUE, c.DATA_PREPARED)
    assert "1000 examples" in p.status["conditions"][0]["message"]
    assert p.status["phase"] == "Training"
    assert [x["state"] for x in p.status["candidates"]] == ["Pending", "Pending"]


def test_running_candidate_reports_progress() -> None:
    task = make_task()
    jobs = jobs_through(task, "data")
    rev = n.revision_of(task["spec"])
    jn = n.finetune_job_name("weather", "small", rev)
    jobs[jn] = JobView(jn, "finetune", rev, "small", RUNNING, progress=42)
    p = plan(Observed(task, jobs, None, NOW))
    small = next(x for x in p.status["candidates"] if x["name"] == "small")
    assert small["state"] == "Running" and small["progress"] == 42
    assert conds(p.status)[c.TRAINED] == (c.UNKNOWN, c.JOB_RUNNING)


@pytest.mark.parametrize("value", ["inf", "-inf", "1e999", "nan", "half"])
def test_a_non_finite_progress_annotation_reads_as_no_progress(value: str) -> None:
    """Anyone who may patch a trainer pod can write its progress annotation: "inf" or
    "1e999" used to raise OverflowError in every reconcile of the task, so its status never
    moved again. It reads as no progress; the candidate is still reported as running."""
    task = make_task()
    jobs = jobs_through(task, "data")
    rev = n.revision_of(task["spec"])
    jn = n.finetune_job_name("weather", "small", rev)
    job = {
        "metadata": {
            "name": jn,
            "uid": "u-small",
            "labels": {
                n.LABEL_STAGE: "finetune",
                n.LABEL_REVISION: rev,
                n.LABEL_CANDIDATE: "small",
            },
        },
        "status": {"active": 1},
    }
    pod = {
        "metadata": {
            "name": f"{jn}-x",
            "labels": {"job-name": jn},
            "annotations": {n.ANNOTATION_PROGRESS: value},
        },
        "status": {"phase": "Running"},
    }
    jobs[jn] = job_view(job, [pod])
    p = plan(Observed(task, jobs, None, NOW))
    small = next(x for x in p.status["candidates"] if x["name"] == "small")
    assert small["state"] == "Running" and small["progress"] == 0
    assert conds(p.status)[c.TRAINED] == (c.UNKNOWN, c.JOB_RUNNING)


def test_smallest_passing_candidate_is_selected_and_exported() -> None:
    task = make_task()
    p = plan(Observed(task, jobs_through(task, "train"), None, NOW))
    assert conds(p.status)[c.EVALUATED] == (c.TRUE, c.GATE_PASSED)
    export = [o for o in p.apply if o["metadata"]["labels"][n.LABEL_STAGE] == "export"]
    assert len(export) == 1
    assert "--candidate=small" in export[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert p.status["phase"] == "Exporting"
    assert all(x["passedGate"] for x in p.status["candidates"])


def test_best_score_policy_prefers_the_better_candidate() -> None:
    task = make_task()
    task["spec"]["evaluation"]["selectionPolicy"] = "best-score"
    p = plan(Observed(task, jobs_through(task, "train"), None, NOW))
    assert "big selected (best-score)" in next(
        x["message"] for x in p.status["conditions"] if x["type"] == c.EVALUATED
    )


def test_candidate_below_gate_is_reported_not_served() -> None:
    task = make_task()
    p = plan(Observed(task, jobs_through(task, "train", scores=(0.5, 0.95)), None, NOW))
    by_name = {x["name"]: x for x in p.status["candidates"]}
    assert by_name["small"]["passedGate"] is False and by_name["small"]["score"] == 0.5
    assert by_name["big"]["passedGate"] is True
    export = [o for o in p.apply if o["metadata"]["labels"][n.LABEL_STAGE] == "export"]
    assert "--candidate=big" in export[0]["spec"]["template"]["spec"]["containers"][0]["args"]


def test_no_candidate_passes_gate_not_met_and_nothing_exported() -> None:
    task = make_task()
    p = plan(Observed(task, jobs_through(task, "train", scores=(0.5, 0.6)), None, NOW))
    assert conds(p.status)[c.EVALUATED] == (c.FALSE, c.GATE_NOT_MET)
    assert conds(p.status)[c.READY] == (c.FALSE, c.GATE_NOT_MET)
    assert p.status["phase"] == "Failed"
    assert not [o for o in p.apply if o["metadata"]["labels"][n.LABEL_STAGE] == "export"]
    msg = next(x["message"] for x in p.status["conditions"] if x["type"] == c.EVALUATED)
    assert "score 0.500 < minScore 0.8" in msg
    assert ("Warning", c.GATE_NOT_MET) in [(e[0], e[1]) for e in p.events]


def test_failed_job_sets_trained_false_with_termination_message() -> None:
    task = make_task(candidates=[{"name": "small", "model": "m"}])
    jobs = jobs_through(task, "data")
    rev = n.revision_of(task["spec"])
    jn = n.finetune_job_name("weather", "small", rev)
    jobs[jn] = view(
        jn,
        "finetune",
        rev,
        FAILED,
        candidate="small",
        message="CUDA out of memory while loading the model",
    )
    p = plan(Observed(task, jobs, None, NOW))
    status, reason = conds(p.status)[c.TRAINED]
    assert (status, reason) == (c.FALSE, c.JOB_FAILED)
    msg = next(x["message"] for x in p.status["conditions"] if x["type"] == c.TRAINED)
    assert "CUDA out of memory" in msg
    assert p.status["candidates"][0]["state"] == "Failed"
    assert p.status["phase"] == "Failed"


def test_succeeded_job_without_result_waits_then_reports_missing() -> None:
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    fresh = {dn: view(dn, "prepare", rev, SUCCEEDED, None, finished=NOW)}
    assert conds(plan(Observed(task, fresh, None, NOW)).status)[c.DATA_READY] == (
        c.UNKNOWN,
        c.AWAITING_RESULT,
    )
    old = {dn: view(dn, "prepare", rev, SUCCEEDED, None, finished=NOW - dt.timedelta(minutes=10))}
    assert conds(plan(Observed(task, old, None, NOW)).status)[c.DATA_READY] == (
        c.FALSE,
        c.RESULT_MISSING,
    )


def test_too_few_examples_waits_for_data_and_curates_again_after_the_recheck() -> None:
    """A task applied before its agents called it (the quickstart's order) finds no call log,
    or too few calls: it waits, with the count in the message, instead of failing for good;
    once the recheck interval has passed the data-prep Job is deleted and created again."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    short = result("prepare", ok=False, examples=37, message="too few examples after curation")
    finished = NOW - dt.timedelta(minutes=2)
    # The stage exits 1 with its result, so the Job is Failed, with the result in its pod.
    jobs = {dn: view(dn, "prepare", rev, FAILED, short, finished=finished)}
    recheck = dt.timedelta(minutes=5)

    p = plan(Observed(task, jobs, None, NOW, data_recheck=recheck))
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.WAITING_FOR_DATA)
    assert conds(p.status)[c.READY] == (c.FALSE, c.WAITING_FOR_DATA)
    msg = next(x["message"] for x in p.status["conditions"] if x["type"] == c.DATA_READY)
    assert "37 of 200 curated examples" in msg and "2026-11-23T12:03:00Z" in msg
    assert p.status["phase"] == "PreparingData"  # not Failed
    assert kinds(p) == [("Job", dn)] and p.delete_jobs == []
    assert not any(e[0] == "Warning" for e in p.events)

    later = plan(Observed(task, jobs, None, NOW + dt.timedelta(minutes=3), data_recheck=recheck))
    assert later.delete_jobs == [dn] and kinds(later) == []
    assert later.status["phase"] == "PreparingData"
    # The next pass sees no Job and creates it again, under the same name; while it runs the
    # task is still waiting (same reason: no event, no transition at every recheck).
    waiting = {**task, "status": later.status}
    again = plan(Observed(waiting, {}, None, NOW + dt.timedelta(minutes=3), data_recheck=recheck))
    assert kinds(again) == [("Job", dn)]
    assert conds(again.status)[c.DATA_READY] == (c.FALSE, c.WAITING_FOR_DATA)
    assert again.events == []


def test_a_job_another_controllers_finalizer_holds_after_its_deletion_is_waited_for() -> None:
    """The recheck deletes the data-prep Job, and another controller's finalizer keeps it
    (Terminating): every pass read its old result again and sent DELETE again, and DataReady
    said "curating again at" a time long past. The Job being deleted is waited for, in its
    finalizers' name, its result is not read, and it is neither deleted nor applied again."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    short = result("prepare", ok=False, examples=37, message="too few examples after curation")
    # Too few examples: the stage exits 3 and the Job's podFailurePolicy fails it at once.
    failed = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}
    job = {
        "metadata": {
            "name": dn,
            "uid": "job-uid",
            "labels": n.labels("weather", n.STAGE_PREPARE, rev),
        },
        "status": {
            "conditions": [failed],
            "startTime": "2026-11-23T11:57:00Z",
            "completionTime": "2026-11-23T11:58:00Z",
            "failed": 1,
        },
    }
    ended = {"exitCode": 3, "message": short.to_json()}
    pod = {
        "metadata": {"name": f"{dn}-x", "labels": {"job-name": dn}},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": ended}}],
        },
    }
    recheck = dt.timedelta(minutes=5)
    at = NOW + dt.timedelta(minutes=3)
    p = plan(Observed(task, {dn: job_view(job, [pod])}, None, at, data_recheck=recheck))
    assert p.delete_jobs == [dn]
    task["status"] = p.status

    job["metadata"].update(
        deletionTimestamp="2026-11-23T12:03:00Z", finalizers=["example.com/hold"]
    )
    held = job_view(job, [pod])
    for later in (at + dt.timedelta(minutes=1), at + dt.timedelta(hours=1)):
        again = plan(Observed(task, {dn: held}, None, later, data_recheck=recheck))
        assert again.delete_jobs == [] and kinds(again) == []
        data = c.find(again.status["conditions"], c.DATA_READY)
        assert data is not None and (data["status"], data["reason"]) == (
            c.FALSE,
            c.WAITING_FOR_DATA,
        )
        assert (
            f"waiting for Job {dn} to be deleted (finalizers: example.com/hold)" in data["message"]
        )
        assert "curating again at" not in data["message"]
        assert not any(e[0] == "Warning" for e in again.events)
        task["status"] = again.status
    assert held.result is None and held.finalizers == ("example.com/hold",)
    # Gone at last: created again, under the same name.
    assert kinds(plan(Observed(task, {}, None, at, data_recheck=recheck))) == [("Job", dn)]


def test_waiting_for_data_says_what_the_data_prep_job_found() -> None:
    """A dataset.uri with a typo finds no call log, and a log of another schema version has
    only rejected records: curate says which, and the condition said "0 of 200 curated
    examples; the gateway keeps capturing calls" for both, as if the calls were still to
    come. Its words are quoted, cut short when long, before the recheck time."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    recheck = dt.timedelta(minutes=5)
    said = "no call log at /data/agent/wether yet (0 examples)"

    def waiting(message: str) -> str:
        res = result("prepare", ok=False, examples=0, message=message)
        jobs = {dn: view(dn, "prepare", rev, FAILED, res, finished=NOW)}
        p = plan(Observed(task, jobs, None, NOW, data_recheck=recheck))
        assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.WAITING_FOR_DATA)
        return next(x["message"] for x in p.status["conditions"] if x["type"] == c.DATA_READY)

    assert waiting(said) == (
        f"revision {rev}: 0 of 200 curated examples (spec.dataset.minExamples); the data-prep "
        f"Job said: {said}; the gateway keeps capturing calls, curating again at "
        "2026-11-23T12:05:00Z"
    )
    long = waiting("300 malformed records: " + "schema v2 " * 500)
    assert "the data-prep Job said: 300 malformed records: schema v2" in long
    assert len(long) < 500 and long.endswith("curating again at 2026-11-23T12:05:00Z")


def test_curated_calls_with_none_held_out_wait_for_data_instead_of_training() -> None:
    """``minExamples: 1`` and a log of one distinct call: curate succeeds with no held-out
    call. Training every candidate on GPUs then ended in "reported no score" at the gate;
    the task waits for calls instead."""
    task = make_task(dataset={"uri": "pvc://slm-work/calls/weather.jsonl", "minExamples": 1})
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    res = result("prepare", examples=1, train_examples=1, eval_examples=0)
    recheck = dt.timedelta(minutes=5)
    jobs = {dn: view(dn, "prepare", rev, SUCCEEDED, res, finished=NOW - dt.timedelta(minutes=2))}
    p = plan(Observed(task, jobs, None, NOW, data_recheck=recheck))
    data = c.find(p.status["conditions"], c.DATA_READY)
    assert data is not None and (data["status"], data["reason"]) == (c.FALSE, c.WAITING_FOR_DATA)
    assert "1 curated example(s), none of them held out" in data["message"]
    assert kinds(p) == [("Job", dn)] and p.status["phase"] == "PreparingData"
    later = plan(Observed(task, jobs, None, NOW + dt.timedelta(minutes=3), data_recheck=recheck))
    assert later.delete_jobs == [dn]  # curated again after the recheck interval


@pytest.mark.parametrize(
    "res",
    [
        result("prepare", ok=False, examples=500, message="cannot write the split"),
        result("prepare", ok=False, message="crashed before counting"),
    ],
)
def test_a_data_prep_failure_with_enough_or_unknown_examples_is_still_a_failure(
    res: TrainerResult,
) -> None:
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    jobs = {dn: view(dn, "prepare", rev, SUCCEEDED, res, finished=NOW - dt.timedelta(hours=1))}
    p = plan(Observed(task, jobs, None, NOW))
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.JOB_FAILED)
    assert p.status["phase"] == "Failed" and p.delete_jobs == []


def test_export_done_deploys_then_ready_when_available() -> None:
    task = make_task()
    rev = n.revision_of(task["spec"])
    p = plan(Observed(task, jobs_through(task, "export"), None, NOW))
    assert ("Deployment", "weather-slm") in kinds(p) and ("Service", "weather-slm") in kinds(p)
    dep = next(o for o in p.apply if o["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--model-repository=/workspace/weather/{rev}/model_repository" in args
    assert p.status["phase"] == "Deploying"
    assert p.status["revision"] == {"active": rev, "training": ""}
    assert p.status["selectedModel"]["candidate"] == "small"

    task["status"] = p.status
    p2 = plan(Observed(task, jobs_through(task, "export"), deployment(rev), NOW))
    cs = conds(p2.status)
    assert cs[c.SERVING] == (c.TRUE, c.DEPLOYMENT_AVAILABLE)
    assert cs[c.READY] == (c.TRUE, c.READY_REASON)
    assert cs[c.FALLBACK_ACTIVE] == (c.FALSE, c.SLM_SERVING)
    assert p2.status["phase"] == "Serving"
    assert p2.status["route"]["mode"] == "shadow"  # progressive rollout starts in shadow
    assert p2.status["route"]["slmEndpoint"] == "http://weather-slm.agents.svc:8000"
    assert p2.status["selectedModel"]["artifactURI"].endswith("model_repository")
    assert not training_jobs(p2)  # nothing to re-run

    # Level-triggered and stable: the same observation yields the same status, no events.
    task["status"] = p2.status
    later = NOW + dt.timedelta(minutes=5)
    p3 = plan(Observed(task, jobs_through(task, "export"), deployment(rev), later))
    assert p3.status == p2.status
    assert p3.events == []


def test_spec_change_trains_new_revision_while_old_keeps_serving() -> None:
    task = make_task()
    old_rev = n.revision_of(task["spec"])
    old_jobs = jobs_through(task, "export")
    task["status"] = plan(Observed(task, old_jobs, deployment(old_rev), NOW)).status

    changed = copy.deepcopy(task)
    changed["metadata"]["generation"] = 2
    changed["spec"]["candidates"][0]["epochs"] = 5
    new_rev = n.revision_of(changed["spec"])
    assert new_rev != old_rev
    p = plan(Observed(changed, old_jobs, deployment(old_rev), NOW))
    names = dict(kinds(p))
    assert f"weather-data-{new_rev}" in [nm for k, nm in kinds(p) if k == "Job"]
    dep = next(o for o in p.apply if o["kind"] == "Deployment")
    assert dep["metadata"]["annotations"][n.LABEL_REVISION] == old_rev
    assert names["Service"] == "weather-slm"
    assert conds(p.status)[c.READY] == (c.TRUE, c.READY_REASON)
    assert p.status["revision"] == {"active": old_rev, "training": new_rev}
    assert p.status["selectedModel"]["revision"] == old_rev
    assert p.status["phase"] == "Serving"
    assert p.delete_jobs == []  # the active revision's Jobs are kept

    # The new revision passes and exports: the Deployment moves to it.
    new_jobs = {**old_jobs, **jobs_through(changed, "export")}
    p2 = plan(Observed(changed, new_jobs, deployment(old_rev), NOW))
    dep = next(o for o in p2.apply if o["kind"] == "Deployment")
    assert dep["metadata"]["annotations"][n.LABEL_REVISION] == new_rev
    assert p2.status["revision"] == {"active": new_rev, "training": ""}
    # Once the Deployment reports the new revision, the old revision's Jobs are removed.
    p3 = plan(Observed(changed, new_jobs, deployment(new_rev), NOW))
    assert sorted(p3.delete_jobs) == sorted(old_jobs)


def test_a_first_deployment_the_api_server_did_not_take_is_not_reported_as_served() -> None:
    """The first revision exported and its Deployment refused (a GPU quota): the status named
    it the active revision, "waiting for Triton replicas ... to become ready", of a
    Deployment that did not exist. It stays in training, and Serving says the Deployment was
    not taken; the next pass that writes it promotes the revision as usual."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    p = plan(Observed(task, jobs, None, NOW, deployment_refused=True))
    assert p.status["revision"] == {"active": "", "training": rev}
    assert conds(p.status)[c.SERVING] == (c.FALSE, c.DEPLOYMENT_PROGRESSING)
    serving = c.find(p.status["conditions"], c.SERVING)
    assert serving is not None and "did not take the Deployment of small" in serving["message"]
    assert p.status["phase"] == "Deploying" and p.status["route"]["mode"] == "llm"
    assert "selectedModel" not in p.status and p.delete_jobs == []
    assert plan(Observed(task, jobs, None, NOW)).status["revision"]["active"] == rev


def test_a_gate_edit_judges_the_trained_candidates_again_and_trains_nothing() -> None:
    """Both candidates trained and missed the gate; the engineer lowers it. The revision used
    to hash the gate, so the finished fine-tunes were deleted and trained again from scratch
    (GPU hours); the operator applies the gate to the recorded results, so they now pass."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train", scores=(0.7, 0.75))
    p = plan(Observed(task, jobs, None, NOW))
    assert conds(p.status)[c.EVALUATED] == (c.FALSE, c.GATE_NOT_MET)
    task["status"] = p.status

    edited = copy.deepcopy(task)
    edited["metadata"]["generation"] = 2
    edited["spec"]["evaluation"]["gate"] = {"minScore": 0.7}
    edited["spec"]["evaluation"]["selectionPolicy"] = "best-score"
    assert n.revision_of(edited["spec"]) == rev
    p2 = plan(Observed(edited, jobs, None, NOW))
    assert p2.delete_jobs == [] and p2.status["revision"]["training"] == rev
    evaluated = c.find(p2.status["conditions"], c.EVALUATED)
    assert evaluated is not None and evaluated["reason"] == c.GATE_PASSED
    assert "big selected (best-score)" in evaluated["message"]  # both pass now
    exports = [o for o in p2.apply if o["metadata"]["name"].startswith("weather-export-")]
    assert [o["metadata"]["name"] for o in exports] == [n.export_job_name("weather", "big", rev)]


def test_a_gate_raised_past_the_served_model_keeps_it_and_its_threshold() -> None:
    """small (0.90) is served at its threshold; the engineer raises minScore to 0.92, which
    only big (0.95) passes. The gate is not part of the revision, so nothing retrains and
    nothing exports big: choosing big put big's threshold (0.2) on the route while Triton
    still served small, breaking the task's precision target for good."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    big = n.finetune_job_name("weather", "big", rev)
    assert jobs[big].result is not None
    jobs[big] = dataclasses.replace(
        jobs[big], result=dataclasses.replace(jobs[big].result, threshold=0.2)
    )
    dep = deployment(rev, "small")
    served = plan(Observed(task, jobs, dep, NOW))
    assert served.status["selectedModel"]["candidate"] == "small"
    threshold = served.status["route"]["confidenceThreshold"]
    task["status"] = json.loads(json.dumps(served.status))

    task["spec"]["evaluation"]["gate"] = {"minScore": 0.92}
    task["metadata"]["generation"] = 2
    p = plan(Observed(task, jobs, dep, NOW + dt.timedelta(minutes=1)))
    assert p.status["selectedModel"]["candidate"] == "small"
    assert p.status["selectedModel"]["threshold"] == threshold != 0.2
    assert p.status["route"]["confidenceThreshold"] == threshold
    assert p.delete_jobs == [] and not training_jobs(p)
    evaluated = c.find(p.status["conditions"], c.EVALUATED)
    assert evaluated is not None and evaluated["reason"] == c.SERVED_BELOW_GATE
    assert (
        "small stays served but no longer passes the gate: score 0.900 < minScore 0.92"
        in (evaluated["message"])
    )


def test_finished_jobs_deleted_while_later_stages_run_are_not_run_again() -> None:
    """A data-prep Job deleted (by hand, a TTL policy) while the fine-tunes run, and a
    finished fine-tune deleted while its export runs, were created again: the data was
    curated anew (with the calls captured since) under the fine-tunes reading it, and the
    candidate trained again under its export. Their recorded results stand for them."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "data")
    for cand in ("small", "big"):
        jn = n.finetune_job_name("weather", cand, rev)
        jobs[jn] = dataclasses.replace(view(jn, "finetune", rev, RUNNING, None, cand), progress=60)
    task["status"] = json.loads(json.dumps(plan(Observed(task, jobs, None, NOW)).status))
    del jobs[n.data_job_name("weather", rev)]
    p = plan(Observed(task, jobs, None, NOW + dt.timedelta(minutes=1)))
    assert n.data_job_name("weather", rev) not in [o["metadata"]["name"] for o in p.apply]
    assert conds(p.status)[c.DATA_READY] == (c.TRUE, c.DATA_PREPARED)
    assert [x["progress"] for x in p.status["candidates"]] == [60, 60]

    task = make_task()
    jobs = jobs_through(task, "train")
    export = n.export_job_name("weather", "small", rev)
    jobs[export] = view(export, "export", rev, RUNNING, None, "small")
    task["status"] = json.loads(json.dumps(plan(Observed(task, jobs, None, NOW)).status))
    del jobs[n.finetune_job_name("weather", "small", rev)]
    p = plan(Observed(task, jobs, None, NOW + dt.timedelta(minutes=1)))
    applied = [o["metadata"]["name"] for o in p.apply]
    assert n.finetune_job_name("weather", "small", rev) not in applied and export in applied
    assert p.status["phase"] == "Exporting" and p.delete_jobs == []
    assert conds(p.status)[c.TRAINED] == (c.TRUE, c.TRAINING_SUCCEEDED)


def test_a_job_limit_edit_updates_the_revisions_jobs_in_place() -> None:
    """A fine-tune about to run out of time: the engineer raises activeDeadlineSeconds (and
    the retries). Both are mutable on a Job, so the running Jobs get them; the revision, and
    the training in progress, stay."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "data")
    task["status"] = plan(Observed(task, jobs, None, NOW)).status
    task["spec"]["training"] = {
        **task["spec"].get("training", {}),
        "activeDeadlineSeconds": 43200,
        "backoffLimit": 5,
    }
    p = plan(Observed(task, jobs, None, NOW))
    assert p.delete_jobs == [] and p.status["revision"]["training"] == rev
    fts = [o for o in p.apply if o["metadata"]["name"].startswith("weather-ft-")]
    assert len(fts) == 2
    for job in fts:
        assert rev in job["metadata"]["name"]
        assert (job["spec"]["activeDeadlineSeconds"], job["spec"]["backoffLimit"]) == (43200, 5)


@pytest.mark.parametrize(
    ("reason", "ran", "failed_pods", "change"),
    [
        ("DeadlineExceeded", 3605.0, 1, {"activeDeadlineSeconds": 43200}),
        ("BackoffLimitExceeded", 900.0, 3, {"backoffLimit": 5}),
    ],
)
def test_a_raised_limit_runs_the_jobs_that_failed_on_it_again(
    reason: str, ran: float, failed_pods: int, change: dict[str, int]
) -> None:
    """Both fine-tunes ran out of time (or retries). The limits are no longer part of the
    revision, and a failed Job never starts again: the raised limit was applied to the
    failed Jobs and the task stayed Failed. They are now deleted and run again (resuming
    from their checkpoints); an unchanged limit leaves them failed."""
    task = make_task(training={"gpus": 1, "activeDeadlineSeconds": 3600, "backoffLimit": 2})
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "data")
    for cand in ("small", "big"):
        jn = n.finetune_job_name("weather", cand, rev)
        jobs[jn] = dataclasses.replace(
            view(jn, "finetune", rev, FAILED, candidate=cand, message=f"{reason}: ..."),
            seconds=ran,
            failure_reason=reason,
            failed_pods=failed_pods,
        )
    failed = plan(Observed(task, jobs, None, NOW))
    assert conds(failed.status)[c.TRAINED] == (c.FALSE, c.JOB_FAILED)
    assert failed.delete_jobs == [] and failed.status["phase"] == "Failed"
    task["status"] = failed.status

    task["spec"]["training"].update(change)
    assert n.revision_of(task["spec"]) == rev
    p = plan(Observed(task, jobs, None, NOW))
    fts = sorted(n.finetune_job_name("weather", cd, rev) for cd in ("small", "big"))
    assert p.delete_jobs == fts
    assert conds(p.status)[c.TRAINED][0] == c.UNKNOWN and p.status["phase"] != "Failed"
    # The next pass finds them gone and creates them again, with the raised limit.
    again = plan(Observed(task, jobs_through(task, "data"), None, NOW))
    made = {o["metadata"]["name"]: o for o in again.apply if o["kind"] == "Job"}
    assert set(fts) <= set(made) and again.delete_jobs == []
    key = "activeDeadlineSeconds" if "activeDeadlineSeconds" in change else "backoffLimit"
    assert made[fts[0]]["spec"][key] == change[key]


def _held(name: str, stage: str, rev: str, candidate: str | None = None) -> JobView:
    """``name`` as :func:`job_view` reads it once deleted, while a finalizer keeps it."""
    job = {
        "metadata": {
            "name": name,
            "labels": n.labels("weather", stage, rev, candidate),
            "deletionTimestamp": "2026-11-23T11:59:00Z",
            "finalizers": ["example.com/hold"],
        },
        "status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1},
    }
    return job_view(job, [])


def test_fine_tunes_held_by_a_finalizer_are_waited_for_or_stand_for_their_recorded_result() -> None:
    """A fine-tune deleted to run again under a raised limit and kept by another controller's
    finalizer is waited for, in the finalizers' name, not deleted again nor applied; one
    that had succeeded (deleted by hand) counts as gone: its recorded result stands."""
    task = make_task(training={"gpus": 1, "backoffLimit": 2})
    rev = n.revision_of(task["spec"])
    small, big = (n.finetune_job_name("weather", cd, rev) for cd in ("small", "big"))
    trained = jobs_through(task, "train")
    task["status"] = plan(Observed(task, trained, None, NOW)).status
    held = {**trained, big: _held(big, n.STAGE_FINETUNE, rev, "big")}
    p = plan(Observed(task, held, None, NOW))
    assert big not in p.delete_jobs and ("Job", big) not in kinds(p)
    entry = next(x for x in p.status["candidates"] if x["name"] == "big")
    assert entry["state"] == SUCCEEDED and entry["score"] == 0.95  # recorded: as if gone

    failed = dataclasses.replace(
        view(small, "finetune", rev, FAILED, candidate="small", message="BackoffLimitExceeded"),
        failure_reason="BackoffLimitExceeded",
        failed_pods=3,
    )
    task["spec"]["training"]["backoffLimit"] = 4  # raised: small runs again
    rerun = plan(Observed(task, {**trained, small: failed}, None, NOW))
    assert small in rerun.delete_jobs
    task["status"] = rerun.status
    waiting = plan(
        Observed(task, {**trained, small: _held(small, n.STAGE_FINETUNE, rev, "small")}, None, NOW)
    )
    assert small not in waiting.delete_jobs and ("Job", small) not in kinds(waiting)
    trained_c = c.find(waiting.status["conditions"], c.TRAINED)
    assert trained_c is not None and trained_c["status"] == c.UNKNOWN
    assert (
        f"small: waiting for Job {small} to be deleted (finalizers: example.com/hold)"
        in (trained_c["message"])
    )
    entry = next(x for x in waiting.status["candidates"] if x["name"] == "small")
    assert entry["state"] == PENDING and "score" not in entry


def test_an_export_held_by_a_finalizer_says_so_in_ready() -> None:
    """An export Job deleted (to run again, or by hand) and kept by another controller's
    finalizer: Ready said "exporting small as a Triton model repository" for as long as the
    finalizer held it, and nothing said why the export never finished."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    task["status"] = plan(Observed(task, jobs, None, NOW)).status
    en = n.export_job_name("weather", "small", rev)
    p = plan(Observed(task, {**jobs, en: _held(en, n.STAGE_EXPORT, rev, "small")}, None, NOW))
    assert ("Job", en) not in kinds(p) and en not in p.delete_jobs
    ready = c.find(p.status["conditions"], c.READY)
    assert ready is not None and ready["reason"] == c.EXPORTING
    assert (
        f"waiting for Job {en} to be deleted (finalizers: example.com/hold)" in (ready["message"])
    )


def test_a_raised_limit_leaves_the_failed_jobs_of_a_served_revision_alone() -> None:
    """A served revision's Jobs never run again: its candidate that ran out of time stays
    Failed when the deadline is raised (it used to read as pending for good, its Job never
    deleted since no training was needed)."""
    task = make_task(training={"gpus": 1, "activeDeadlineSeconds": 3600})
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    big = n.finetune_job_name("weather", "big", rev)
    jobs[big] = dataclasses.replace(
        view(big, "finetune", rev, FAILED, candidate="big", message="DeadlineExceeded: ..."),
        seconds=3601.0,
        failure_reason="DeadlineExceeded",
    )
    task["status"] = plan(Observed(task, jobs, deployment(rev), NOW)).status
    # An edit started another revision and was reverted: the last status still names it, so
    # the served revision's outcome is read from its Jobs, not from the recorded status.
    task["status"]["revision"]["training"] = "0123456789"
    before = conds(plan(Observed(task, jobs, deployment(rev), NOW)).status)
    assert before[c.TRAINED][0] == c.TRUE
    task["spec"]["training"]["activeDeadlineSeconds"] = 43200
    p = plan(Observed(task, jobs, deployment(rev), NOW))
    assert p.delete_jobs == [] and not training_jobs(p)
    assert conds(p.status)[c.TRAINED] == before[c.TRAINED]
    states = {x["name"]: x["state"] for x in p.status["candidates"]}
    assert states["big"] == FAILED


def test_a_retraining_an_earlier_operator_concluded_is_not_trained_again() -> None:
    """A retraining that lost under the old revision names is recorded only in
    status.retraining.concludedRevision (revision.training is empty again): after an upgrade
    its name must still be recognised, or it is deleted and trained again on GPUs."""
    task, jobs, dep = _serving_task()
    active = n.revision_of(task["spec"])
    lost = n.legacy_revision_of(task["spec"], 1)
    task["status"]["retraining"] = {"epoch": 1, "concludedRevision": lost}
    lost_jobs = {
        k.replace(active, lost): dataclasses.replace(v, name=k.replace(active, lost), revision=lost)
        for k, v in jobs_through(task, "train", scores=(0.1, 0.2)).items()
    }
    p = plan(Observed(task, {**jobs, **lost_jobs}, dep, NOW))
    assert not training_jobs(p)
    assert p.delete_jobs == []
    assert p.status["revision"]["training"] == ""


@pytest.mark.parametrize("served", [True, False])
def test_a_revision_named_by_an_earlier_operator_is_not_trained_again(served: bool) -> None:
    """Operators before the gate and the Job limits left the revision named revisions by all
    of the training fields: after an upgrade, a task whose spec did not change keeps its
    revision (served, or in training) instead of training everything again."""
    task = make_task()
    old = n.legacy_revision_of(task["spec"])
    assert old != n.revision_of(task["spec"])
    name = task["metadata"]["name"]
    if served:
        task["status"] = {"revision": {"active": old, "training": ""}}
        p = plan(Observed(task, {}, deployment(old), NOW))
        assert p.status["revision"] == {"active": old, "training": ""}
        assert not training_jobs(p)
    else:
        task["status"] = {"revision": {"active": "", "training": old}}
        dn = n.data_job_name(name, old)
        jobs = {dn: view(dn, "prepare", old, RUNNING)}
        p = plan(Observed(task, jobs, None, NOW))
        assert p.status["revision"]["training"] == old and p.delete_jobs == []
        assert [o["metadata"]["name"] for o in p.apply if o["kind"] == "Job"] == [dn]


def test_the_trainer_image_the_old_crd_wrote_in_is_the_same_revision_as_none() -> None:
    """The CRD used to default spec.training.image into every stored task. Without that
    default, a whole-object write of the unchanged manifest (kubectl replace, Argo CD's
    Replace=true) drops it: the served task must not train again, and neither may one whose
    owner removes the old default to follow the operator's image. Another image is another
    revision, as before."""
    stored = make_task()
    stored["spec"]["training"]["image"] = n.LEGACY_TRAINER_IMAGE
    rev = n.revision_of(stored["spec"])
    jobs = jobs_through(stored, "export")
    stored["status"] = plan(Observed(stored, jobs, deployment(rev), NOW)).status
    assert stored["status"]["revision"] == {"active": rev, "training": ""}

    replaced = copy.deepcopy(stored)
    del replaced["spec"]["training"]["image"]
    assert n.revision_of(replaced["spec"]) == rev
    assert n.legacy_revision_of(replaced["spec"]) == n.legacy_revision_of(stored["spec"])
    p = plan(Observed(replaced, jobs, deployment(rev), NOW))
    assert p.status["revision"] == {"active": rev, "training": ""}
    assert not training_jobs(p)

    own = copy.deepcopy(stored)
    own["spec"]["training"]["image"] = "reg.local/slm/trainer:0.2.0"
    assert n.revision_of(own["spec"]) != rev


def test_new_revision_failing_gate_keeps_old_model_serving() -> None:
    task = make_task()
    old_rev = n.revision_of(task["spec"])
    old_jobs = jobs_through(task, "export")
    task["status"] = plan(Observed(task, old_jobs, deployment(old_rev), NOW)).status
    changed = copy.deepcopy(task)
    changed["spec"]["dataset"]["minExamples"] = 300
    jobs = {**old_jobs, **jobs_through(changed, "train", scores=(0.1, 0.2))}
    p = plan(Observed(changed, jobs, deployment(old_rev), NOW))
    cs = conds(p.status)
    assert cs[c.EVALUATED] == (c.FALSE, c.GATE_NOT_MET)
    assert cs[c.SERVING][0] == c.TRUE and cs[c.READY][0] == c.TRUE
    assert p.status["phase"] == "Serving"


def test_invalid_name_is_invalid_spec_without_children() -> None:
    task = make_task()
    task["metadata"]["name"] = "Weather.v2"
    p = plan(Observed(task, {}, None, NOW))
    assert p.invalid and "DNS-1035" in p.invalid
    assert p.apply == []
    assert conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)
    assert p.status["phase"] == "Failed"


def test_an_invalid_edit_posts_one_warning_that_says_what_is_wrong() -> None:
    """kubectl describe used to show six "X=Unknown: the spec is invalid; see Ready" Warnings
    and not the problem itself, because Ready was already False (a failed gate) and only
    its flips were events. One Warning now carries the problem, again for a new problem."""
    reserved = frozenset({"slm-operator"})
    task = make_task()
    jobs = jobs_through(task, "train", scores=(0.1, 0.2))
    task["status"] = plan(Observed(task, jobs, None, NOW)).status
    assert conds(task["status"])[c.READY] == (c.FALSE, c.GATE_NOT_MET)

    bad = copy.deepcopy(task)
    bad["spec"]["training"]["serviceAccountName"] = "slm-operator"
    p = plan(Observed(bad, jobs, None, NOW, reserved_accounts=reserved))
    assert len(p.events) == 1
    kind, reason, message = p.events[0]
    assert (kind, reason) == ("Warning", c.INVALID_SPEC)
    assert message.startswith("Ready=False: training.serviceAccountName slm-operator")

    bad["status"] = p.status  # the same problem, planned again: nothing new to say
    assert plan(Observed(bad, jobs, None, NOW, reserved_accounts=reserved)).events == []
    worse = copy.deepcopy(bad)
    del worse["spec"]["training"]["serviceAccountName"]  # fixed, but another one broken
    worse["spec"]["candidates"][0]["model"] = "pvc://other/models/a"
    events = plan(Observed(worse, jobs, None, NOW, reserved_accounts=reserved)).events
    assert [e[:2] for e in events] == [("Warning", c.INVALID_SPEC)]
    assert "another PVC" in events[0][2]


def test_candidate_model_on_foreign_pvc_is_invalid() -> None:
    task = make_task(candidates=[{"name": "a", "model": "pvc://other/models/a"}])
    assert "another PVC" in (plan(Observed(task, {}, None, NOW)).invalid or "")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://llm.example.com/v1 ", "a space"),  # pasted with a trailing space
        ("https://llm.example.com/v1#chat", "fragment"),
        ("https://llm.example.com:99999/v1", "out of range"),
        ("https://bob:sk-TESTSECRET1234@llm.example.com/v1", "user info"),
    ],
)
def test_an_llm_url_the_gateway_would_refuse_is_invalid_before_any_training(
    url: str, why: str
) -> None:
    """A task admitted before the CRD refused these URLs keeps its URL (ratcheting); the
    gateway drops its route, so every call for it would fail and its training is wasted GPU
    time. The task says why instead, without quoting the URL (it may hold a key)."""
    task = make_task()
    task["spec"]["fallback"]["llm"]["baseURL"] = url
    p = plan(Observed(task, {}, None, NOW))
    assert p.invalid and "fallback.llm.baseURL cannot be used by the gateway" in p.invalid
    assert why in p.invalid and "TESTSECRET" not in p.invalid
    assert p.apply == [] and conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)


@pytest.mark.parametrize("account", ["slm-operator", "slm-gateway"])
def test_trainer_may_not_run_as_the_operators_or_gateways_service_account(account: str) -> None:
    """The trainer runs the image the task's author chose: as the gateway's ServiceAccount it
    could read the LLM key Secrets, as the operator's create Jobs anywhere it watches."""
    reserved = frozenset({"slm-operator", "slm-gateway"})
    task = make_task(training={"gpus": 1, "serviceAccountName": account})
    p = plan(Observed(task, {}, None, NOW, reserved_accounts=reserved))
    assert p.invalid and f"training.serviceAccountName {account}" in p.invalid
    assert "operator or gateway" in p.invalid
    assert p.apply == []
    assert conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)
    # An account of the task's own, or none (the trainer account), is fine.
    for training in ({"gpus": 1, "serviceAccountName": "s3-reader"}, {"gpus": 1}):
        ok = plan(Observed(make_task(training=training), {}, None, NOW, reserved_accounts=reserved))
        assert ok.invalid is None and ok.apply


@pytest.mark.parametrize(
    ("gate", "score", "llm", "ok"),
    [
        ({"minScore": 0.8}, 0.8, None, True),
        ({"minScore": 0.8}, 0.79, None, False),
        ({"maxDropVsLLM": 0.05}, 0.91, 0.95, True),
        ({"maxDropVsLLM": 0.05}, 0.89, 0.95, False),
        ({"minScore": 0.5, "maxDropVsLLM": 0.01}, 0.9, 0.95, False),
    ],
)
def test_gate_verdict(gate: dict[str, float], score: float, llm: float | None, ok: bool) -> None:
    assert gate_verdict(result("finetune", score=score, llm_score=llm), gate)[0] is ok


@pytest.mark.parametrize("gate", [{"minScore": 0}, {"maxDropVsLLM": 1}])
def test_a_candidate_that_answers_no_call_never_passes_the_gate(gate: dict[str, float]) -> None:
    """No threshold reached targetPrecision: the finetune stage reports score 0 at threshold
    1.0. The lowest gate let it through, and smallest-passing chose it over a real model: the
    operator exported and served a model that handed every call back to the LLM."""
    idle = result("finetune", score=0.0, llm_score=1.0, threshold=1.0, parameters=10)
    ok, why = gate_verdict(idle, gate)
    assert not ok and "answers no call" in why
    real = result("finetune", score=0.95, llm_score=1.0, threshold=0.6, parameters=1000)
    passing = [(cd, r) for cd, r in (({"name": "idle"}, idle), ({"name": "real"}, real))]
    passing = [(cd, r) for cd, r in passing if gate_verdict(r, gate)[0]]
    assert select(passing, "smallest-passing")[0]["name"] == "real"  # type: ignore[index]
    # a score of 0 at a threshold that answers calls is still the gate's to judge
    assert gate_verdict(result("finetune", score=0.0, threshold=0.5), gate)[0]


def test_select_ties_are_deterministic() -> None:
    a = ({"name": "a"}, result("finetune", score=0.9, parameters=100))
    b = ({"name": "b"}, result("finetune", score=0.9, parameters=100))
    assert select([b, a], "smallest-passing")[0]["name"] == "a"  # type: ignore[index]
    assert select([], "best-score") is None


def _with_replicas(dep: dict[str, Any], wanted: int, ready: int) -> dict[str, Any]:
    """``dep`` scaled to ``wanted`` replicas, ``ready`` of them ready."""
    d = copy.deepcopy(dep)
    d["spec"]["replicas"] = wanted
    d["status"].update(
        replicas=wanted, updatedReplicas=wanted, readyReplicas=ready, availableReplicas=ready
    )
    return d


def _serving_task() -> tuple[dict[str, Any], dict[str, JobView], dict[str, Any], dict[str, Any]]:
    task = make_task()
    task["spec"]["fallback"]["policy"] = {
        "windowSeconds": 10,
        "breachWindows": 2,
        "recoveryWindows": 3,
    }
    task["spec"]["rollout"] = {"shadowMinSamples": 20, "minAgreement": 0.9, "canaryPercent": 25}
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    dep = deployment(rev)
    task["status"] = plan(Observed(task, jobs, dep, NOW)).status
    return task, jobs, dep


def _step(
    task: dict[str, Any],
    jobs: dict[str, JobView],
    dep: dict[str, Any],
    at: dt.datetime,
    m: Metrics | None,
) -> Any:
    p = plan(Observed(task, jobs, dep, at, m))
    # What the API server keeps: a status field the CRD does not name is lost on write.
    task["status"] = _stored(p.status)
    return p


def captured(records: int, gateway: str = "gateway-0") -> Metrics:
    """A healthy window in which ``gateway`` (a counter series: a gateway pod or process) has
    captured ``records`` calls for the task since it started."""
    return captured_by({gateway: records})


def captured_by(gateways: dict[str, int], *, keyed_by_start: bool = True) -> Metrics:
    """A healthy window in which each gateway series has captured so many calls."""
    return Metrics(
        p95_latency_ms=80,
        error_rate=0.0,
        request_rate=5,
        captured_records=sum(gateways.values()),
        llm_answers={g: CounterReading(v, keyed_by_start) for g, v in gateways.items()},
    )


HEALTHY = Metrics(
    p95_latency_ms=80,
    error_rate=0.0,
    request_rate=5,
    agreement=0.97,
    shadow_samples=40,
    slm_share=0.0,
    cost_saved_usd=0.0,
)
SLOW = Metrics(
    p95_latency_ms=900, error_rate=0.0, request_rate=5, agreement=0.97, shadow_samples=40
)


def test_fallback_needs_consecutive_breaches_and_recovers_with_hysteresis() -> None:
    task, jobs, dep = _serving_task()
    t = NOW
    _step(task, jobs, dep, t, HEALTHY)
    assert conds(task["status"])[c.SLO_MET] == (c.TRUE, c.WITHIN_SLO)
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, SLOW)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE  # 1 of 2 windows
    assert conds(task["status"])[c.SLO_MET] == (c.FALSE, c.SLO_BREACHED)
    # Within the same window nothing advances, however often we reconcile.
    _step(task, jobs, dep, t + dt.timedelta(seconds=3), SLOW)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE
    t += dt.timedelta(seconds=10)
    p = _step(task, jobs, dep, t, SLOW)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    assert conds(task["status"])[c.READY][0] == c.FALSE
    assert task["status"]["route"]["mode"] == "shadow"  # LLM answers, SLM still measured
    assert ("Warning", c.SLO_BREACHED) in [(e[0], e[1]) for e in p.events]
    for i in range(2):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
        assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.RECOVERING), i
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE
    assert conds(task["status"])[c.READY][0] == c.TRUE


def test_the_rollout_holds_while_fallback_is_on() -> None:
    """Recovery windows are measured on shadow copies while the LLM answers every call: they
    must not walk the rollout to canary or slm, which would serve the SLM to every call the
    moment fallback ends without a canary ever having run."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 1
    task["spec"]["fallback"]["policy"]["recoveryWindows"] = 4
    t = NOW
    for _ in range(2):  # breached while still in shadow
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, SLOW)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    assert task["status"]["live"]["rolloutMode"] == "shadow"
    for _ in range(3):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
        assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.RECOVERING)
        assert task["status"]["live"]["rolloutMode"] == "shadow"
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE
    assert task["status"]["route"]["mode"] == "canary"  # the canary runs now, not skipped


def test_no_call_goes_to_a_service_of_the_serving_name_that_is_someone_elses() -> None:
    """A Service named ``<task>-slm`` that a user or a Helm chart made is not applied (it
    would be taken over), but the route still named ``http://<task>-slm.<ns>.svc:8000``:
    the gateway sent shadow copies of the agents' calls (prompts, tool arguments) to whatever
    pods that Service selects, judged its answers, and walked the rollout on to canary and
    slm. The route stays llm, without an endpoint, Serving says whose the name is, the phase
    does not claim Serving, and the rollout waits; freed, the name serves from where it was."""
    task, jobs, dep = _serving_task()
    taken = frozenset({"Service"})
    t = NOW
    for _ in range(3):
        t += dt.timedelta(seconds=10)
        p = plan(Observed(task, jobs, dep, t, HEALTHY, foreign_children=taken))
        task["status"] = _stored(p.status)
        route = task["status"]["route"]
        assert route["mode"] == lv.MODE_LLM and "slmEndpoint" not in route, route
        assert "Service weather-slm" in route["reason"]
        assert conds(task["status"])[c.SERVING] == (c.FALSE, c.SERVICE_NAME_TAKEN)
        assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SERVICE_NAME_TAKEN)
        assert task["status"]["phase"] != "Serving"
        assert task["status"]["live"]["rolloutMode"] == "shadow"  # not judged on its answers
        assert not task["status"]["live"]["fallback"]  # no fallback to recover from, once freed
    serving = c.find(task["status"]["conditions"], c.SERVING)
    assert serving is not None and "Service weather-slm" in serving["message"]
    assert "belongs to something else" in serving["message"]
    # The name freed (the other Service deleted): the task's Service is applied, and the
    # rollout goes on from shadow at once, with no fallback to wait out.
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    assert task["status"]["phase"] == "Serving"
    assert task["status"]["route"]["mode"] == "canary"
    assert task["status"]["route"]["slmEndpoint"] == "http://weather-slm.agents.svc:8000"


def test_a_serving_endpoint_annotation_routes_past_a_service_that_is_someone_elses() -> None:
    """The task points the gateway at its own endpoint (an external Triton): whose the
    Service of the serving name is does not matter to its calls."""
    task, jobs, dep = _serving_task()
    task["metadata"]["annotations"] = {n.ANNOTATION_ENDPOINT: "http://triton.ext:8000"}
    p = plan(Observed(task, jobs, dep, NOW, HEALTHY, foreign_children=frozenset({"Service"})))
    assert p.status["phase"] == "Serving"
    assert p.status["route"]["mode"] == "canary"
    assert p.status["route"]["slmEndpoint"] == "http://triton.ext:8000"


def test_a_new_revision_is_not_rolled_out_on_the_previous_pods_answers() -> None:
    """maxUnavailable 0: while a promoted revision's Triton pods load their model, the old
    pods answer every call, shadow copies included. The rollout was judged on those and took
    the new revision to canary and slm before one of its pods was ready; it now holds in
    shadow, spends those copies unjudged, and starts its canary once the old pods are gone."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 1
    t = NOW
    for _ in range(3):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
    assert task["status"]["route"]["mode"] == "slm"
    task["metadata"]["generation"] = 2
    task["spec"]["candidates"][0]["epochs"] = 5  # a new revision, trained and exported
    new_rev = n.revision_of(task["spec"])
    jobs = {**jobs, **jobs_through(task, "export")}
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)  # promoted: the Deployment is applied in this pass
    assert task["status"]["revision"]["active"] == new_rev
    assert task["status"]["route"]["mode"] == "shadow"
    rolling = deployment(new_rev)
    rolling["metadata"]["generation"] = 2
    rolling["status"].update(observedGeneration=2, replicas=2, updatedReplicas=1, readyReplicas=1)
    for _ in range(4):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, rolling, t, HEALTHY)
        live = task["status"]["live"]
        assert task["status"]["route"]["mode"] == "shadow"
        assert live["rolloutReason"] == "WaitingForNewReplicas"
        assert live["agreementSince"] == live["lastEvaluated"]  # the old pods' copies: spent
        ready = c.find(task["status"]["conditions"], c.READY)
        assert ready is not None and "is rolling out" in ready["message"]
    rolled = deployment(new_rev)
    for want in ("canary", "slm"):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, rolled, t, HEALTHY)
        assert task["status"]["route"]["mode"] == want
    ready = c.find(task["status"]["conditions"], c.READY)
    assert ready is not None and ready["message"].endswith("serves the task's calls")


def test_missing_metrics_keep_the_last_decision() -> None:
    task, jobs, dep = _serving_task()
    t = NOW
    for _ in range(2):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, SLOW)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.TRUE
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, None)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.TRUE
    assert conds(task["status"])[c.SLO_MET] == (c.UNKNOWN, c.METRICS_UNAVAILABLE)


def test_a_window_without_slm_samples_under_fallback_changes_nothing() -> None:
    """Sparse calls under an SLO fallback: a window with no SLM sample has no verdict. It
    renamed the fallback (and Ready) MetricsUnavailable and SLOMet Unknown, and the next
    breached window posted SLOBreached Warnings again, every other window. It keeps the
    reason, the verdict and its figures; SLOMet says that the window had no SLM call."""
    task, jobs, dep = _serving_task()
    t = NOW
    for _ in range(2):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, SLOW)
    breached = task["status"]["conditions"]
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    for m in (Metrics(request_rate=0.01), SLOW, Metrics(request_rate=0.01), SLOW):
        t += dt.timedelta(seconds=10)
        p = _step(task, jobs, dep, t, m)
        want = copy.deepcopy(breached)
        if m is not SLOW:
            slo = c.find(want, c.SLO_MET)
            assert slo is not None
            slo["message"] = "no SLM call in the last window; last verdict: " + slo["message"]
        assert task["status"]["conditions"] == want, m  # messages and times included
        assert p.events == [], m
    _settled(Observed(task, jobs, dep, t + dt.timedelta(seconds=1), metrics_not_due=True))
    # Recovering: the healthy windows counted so far stay, and so does the reason.
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    t += dt.timedelta(seconds=10)
    p = _step(task, jobs, dep, t, Metrics(request_rate=0.01))
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.RECOVERING)
    assert conds(p.status)[c.SLO_MET] == (c.TRUE, c.WITHIN_SLO)
    assert p.status["live"]["healthyStreak"] == 1 and p.events == []


#: What a real Prometheus answers for a window in which no call reached the task.
IDLE = Metrics(
    p95_latency_ms=None,
    error_rate=None,
    request_rate=0.0,
    agreement=None,
    shadow_samples=0,
    slm_share=None,
    cost_saved_usd=0.0,
)


def test_a_window_without_slm_calls_keeps_the_last_verdict() -> None:
    """A quiet window (no SLM call: no latency, no error rate) had a verdict only under
    fallback: otherwise SLOMet went True -> Unknown MetricsUnavailable "no live metrics for
    this task's SLM yet" -> True, an Event each way, and status.usage kept the last slmShare
    beside the quiet window's costSavedUSD 0. The last verdict holds, with its figures, and
    SLOMet says the window had no call; usage stays the last window with calls."""
    task, jobs, dep = _serving_task()
    busy = dataclasses.replace(HEALTHY, slm_share=0.6, cost_saved_usd=0.12)
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, busy)
    slo = c.find(task["status"]["conditions"], c.SLO_MET)
    assert slo is not None and (slo["status"], slo["reason"]) == (c.TRUE, c.WITHIN_SLO)
    usage = task["status"]["usage"]
    assert (usage["slmShare"], usage["costSavedUSD"]) == (0.6, 0.12)
    t += dt.timedelta(seconds=10)
    p = _step(task, jobs, dep, t, IDLE)
    quiet = c.find(task["status"]["conditions"], c.SLO_MET)
    assert quiet is not None
    assert (quiet["status"], quiet["reason"]) == (c.TRUE, c.WITHIN_SLO)
    assert quiet["message"] == "no SLM call in the last window; last verdict: " + slo["message"]
    assert p.events == []
    live = task["status"]["live"]
    assert live["sloBreached"] is False and live["observed"]["p95LatencyMs"] == 80
    assert live["fallbackReason"] == "SLOMet"
    assert task["status"]["usage"] == usage  # both from the last window with calls
    # Reconciles within the quiet window say the same.
    settled = _settled(Observed(task, jobs, dep, t + dt.timedelta(seconds=1), metrics_not_due=True))
    assert c.find(settled.status["conditions"], c.SLO_MET) == quiet
    t += dt.timedelta(seconds=10)
    p = _step(task, jobs, dep, t, busy)
    assert c.find(task["status"]["conditions"], c.SLO_MET) == slo  # times included
    assert p.events == []


def test_quiet_windows_between_breaches_neither_count_nor_reset_the_streak() -> None:
    """A task over its SLO with a quiet window between breached ones, before fallback: each
    breached window after a quiet one posted a new SLOBreached Warning, and SLOMet said
    MetricsUnavailable in between. The quiet windows keep the verdict and the streak."""
    task, jobs, dep = _serving_task()
    task["spec"]["fallback"]["policy"]["breachWindows"] = 5
    t = NOW
    events: list[tuple[str, str, str]] = []
    for m in (HEALTHY, SLOW, IDLE, SLOW, IDLE, SLOW):
        t += dt.timedelta(seconds=10)
        events += _step(task, jobs, dep, t, m).events
        live = task["status"]["live"]
        if m is not HEALTHY:
            assert conds(task["status"])[c.SLO_MET] == (c.FALSE, c.SLO_BREACHED), m
            assert live["fallbackReason"] == "SLOAtRisk", m
    assert [e[:2] for e in events if e[0] == "Warning"] == [("Warning", c.SLO_BREACHED)]
    assert not any(c.METRICS_UNAVAILABLE in e[1] for e in events)
    assert task["status"]["live"]["breachStreak"] == 3
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE


@pytest.mark.parametrize(
    ("m", "says", "not_says"),
    [
        (Metrics(error_rate=1.0, request_rate=5), "p95 not measured", "nan"),
        (Metrics(p95_latency_ms=900, request_rate=5), "error rate not measured", "0.0%"),
    ],
)
def test_slo_met_names_what_was_not_measured(m: Metrics, says: str, not_says: str) -> None:
    """A window with an error rate but no latency sample (the SLM's circuit open all window)
    read "p95 nan ms"; one without an error rate, "error rate 0.0%"."""
    task, jobs, dep = _serving_task()
    p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), m)
    slo = c.find(p.status["conditions"], c.SLO_MET)
    assert slo is not None and (slo["status"], slo["reason"]) == (c.FALSE, c.SLO_BREACHED)
    assert says in slo["message"] and not_says not in slo["message"], slo["message"]


def test_an_slo_edit_judges_the_last_window_again_at_once() -> None:
    """SLOMet said "SLO breached: p95 900 ms (SLO 1000 ms)" after the SLO was raised, until
    the next window: the last window is judged against the SLO the edit sets."""
    task, jobs, dep = _serving_task()
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, SLOW)
    assert conds(task["status"])[c.SLO_MET] == (c.FALSE, c.SLO_BREACHED)
    task["spec"]["serving"]["slo"] = {"p95LatencyMs": 1000}
    task["metadata"]["generation"] += 1
    edit = Observed(task, jobs, dep, t + dt.timedelta(seconds=1), metrics_not_due=True)
    p = _settled(edit)
    slo = c.find(p.status["conditions"], c.SLO_MET)
    assert slo is not None and (slo["status"], slo["reason"]) == (c.TRUE, c.WITHIN_SLO)
    assert slo["message"].startswith("within SLO: p95 900 ms (SLO 1000 ms)")
    assert conds(p.status)[c.FALLBACK_ACTIVE][0] == c.FALSE  # streaks wait for a window


def test_an_slo_edit_in_a_window_without_slm_calls_judges_the_kept_figures_again() -> None:
    """An SLO raised in an apply that lands on a judged window with no SLM call (the operator
    was down, or the window was due): SLOMet kept "SLO breached: p95 900 ms (SLO 1000 ms)",
    worded with the new limit, until the SLM got a call again."""
    task, jobs, dep = _serving_task()
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, SLOW)
    assert conds(task["status"])[c.SLO_MET] == (c.FALSE, c.SLO_BREACHED)
    task["spec"]["serving"]["slo"] = {"p95LatencyMs": 1000}
    task["metadata"]["generation"] += 1
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, IDLE)
    slo = c.find(task["status"]["conditions"], c.SLO_MET)
    assert slo is not None and (slo["status"], slo["reason"]) == (c.TRUE, c.WITHIN_SLO)
    assert slo["message"].startswith(
        "no SLM call in the last window; last verdict: within SLO: p95 900 ms (SLO 1000 ms)"
    )
    assert task["status"]["live"]["sloBreached"] is False


def test_in_shadow_the_conditions_say_the_llm_answers() -> None:
    """Shadow rollout: the LLM answers every call and the SLM gets copies. FallbackActive,
    the route's reason and Ready said the SLM serves them."""
    task, jobs, dep = _serving_task()
    measuring = dataclasses.replace(HEALTHY, agreement=None, shadow_samples=None)
    p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), measuring)
    assert p.status["route"]["mode"] == "shadow"
    fb = c.find(p.status["conditions"], c.FALLBACK_ACTIVE)
    ready = c.find(p.status["conditions"], c.READY)
    assert fb is not None and (fb["status"], fb["reason"]) == (c.FALSE, c.SLM_SERVING)
    assert fb["message"].startswith("the LLM answers this task's calls; the SLM gets shadow")
    assert p.status["route"]["reason"] == fb["message"]
    assert ready is not None and (ready["status"], ready["reason"]) == (c.TRUE, c.READY_REASON)
    assert "the LLM answers" in ready["message"] and "serves" not in ready["message"]


def test_in_a_canary_the_conditions_say_what_share_the_slm_answers() -> None:
    """A canary sends canaryPercent of the calls to the SLM: FallbackActive and the route's
    reason said "the SLM serves this task", as after promotion."""
    task, jobs, dep = _serving_task()
    p = _step(task, jobs, dep, NOW, HEALTHY)
    assert (p.status["route"]["mode"], p.status["route"]["canaryPercent"]) == ("canary", 25)
    fb = c.find(p.status["conditions"], c.FALLBACK_ACTIVE)
    assert fb is not None and (fb["status"], fb["reason"]) == (c.FALSE, c.SLM_SERVING)
    assert fb["message"].startswith("the SLM serves 25% of this task's calls and the LLM the rest")
    assert p.status["route"]["reason"] == fb["message"]


def test_rollout_goes_shadow_canary_slm_on_agreement() -> None:
    task, jobs, dep = _serving_task()
    t = NOW
    modes = []
    for _ in range(6):
        _step(task, jobs, dep, t, HEALTHY)
        modes.append(
            (task["status"]["route"]["mode"], task["status"]["route"].get("canaryPercent"))
        )
        t += dt.timedelta(seconds=10)
    # The canary starts on the first healthy window and must then pass canaryWindows (default
    # 3) more healthy windows before every call goes to the SLM.
    assert modes[:3] == [("canary", 25)] * 3
    assert modes[3] == ("slm", None) and modes[-1] == ("slm", None)
    disagree = Metrics(
        p95_latency_ms=80, error_rate=0.0, request_rate=5, agreement=0.5, shadow_samples=40
    )
    task2, jobs2, dep2 = _serving_task()
    _step(task2, jobs2, dep2, NOW, disagree)
    assert task2["status"]["route"]["mode"] == "shadow"
    assert task2["status"]["live"]["rolloutReason"] == "ShadowMeasuring"


def test_canary_count_lives_in_status_and_resets_on_a_bad_window() -> None:
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 2
    t = NOW
    _step(task, jobs, dep, t, HEALTHY)  # shadow -> canary
    assert task["status"]["live"]["canaryHealthyWindows"] == 0
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    live = task["status"]["live"]
    assert (live["rolloutMode"], live["canaryHealthyWindows"]) == ("canary", 1)
    fb = next(x for x in task["status"]["conditions"] if x["type"] == c.FALLBACK_ACTIVE)
    assert "1 of 2 healthy windows" in fb["message"]
    # Reconciles within the window (or by a restarted operator) do not count it again.
    _step(task, jobs, dep, t + dt.timedelta(seconds=3), HEALTHY)
    assert task["status"]["live"]["canaryHealthyWindows"] == 1
    # A window without canary measurements neither counts nor resets.
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=5))
    live = task["status"]["live"]
    assert (live["rolloutMode"], live["canaryHealthyWindows"]) == ("canary", 1)
    # One slow window sends the rollout back to shadow; the next canary counts from zero.
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, SLOW)
    live = task["status"]["live"]
    assert (live["rolloutMode"], live["rolloutReason"]) == ("shadow", "CanaryRolledBack")
    assert live["canaryHealthyWindows"] == 0
    for want in (("canary", 0), ("canary", 1), ("slm", 0)):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
        live = task["status"]["live"]
        assert (live["rolloutMode"], live["canaryHealthyWindows"]) == want


def test_a_window_is_judged_only_after_its_full_length() -> None:
    """Sub-second clocks: a reconcile 9.5 s after the last judged window (of 10 s) waits,
    even when the last one ran late in its second; a truncated timestamp would count it."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 2
    t = NOW + dt.timedelta(seconds=0.9)
    _step(task, jobs, dep, t, HEALTHY)  # shadow -> canary
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    assert task["status"]["live"]["canaryHealthyWindows"] == 1
    _step(task, jobs, dep, t + dt.timedelta(seconds=9.5), HEALTHY)
    live = task["status"]["live"]
    assert (live["rolloutMode"], live["canaryHealthyWindows"]) == ("canary", 1)
    _step(task, jobs, dep, t + dt.timedelta(seconds=10), HEALTHY)
    assert task["status"]["live"]["rolloutMode"] == "slm"


@pytest.mark.parametrize(
    ("start", "cooling_at"),
    [(0.0, 10.0), (0.7, 59.8)],
    ids=["steady", "cooldown-not-cut-short-by-rounding"],
)
def test_replicas_follow_request_rate_within_bounds(start: float, cooling_at: float) -> None:
    """Scale-up at once, scale-down only after the 60 s cooldown, counted from the very moment
    of the last scaling (not its whole second: 59.8 s after a scaling at .7 s still cools)."""
    task, jobs, dep = _serving_task()
    t = NOW + dt.timedelta(seconds=start)
    busy = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=35)
    p = _step(task, jobs, dep, t, busy)
    d = next(o for o in p.apply if o["kind"] == "Deployment")
    assert d["spec"]["replicas"] == 3  # ceil(35/10)=4, clamped to maxReplicas 3
    assert task["status"]["serving"]["desiredReplicas"] == 3
    quiet = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=0.5)
    p = _step(task, jobs, dep, t + dt.timedelta(seconds=cooling_at), quiet)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 3
    assert task["status"]["live"]["scaleReason"] == "ScaleDownCoolingDown"
    p = _step(task, jobs, dep, t + dt.timedelta(seconds=70), quiet)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 1


def test_scaling_up_moves_at_most_max_step_replicas_per_window() -> None:
    """A burst that wants 8 replicas at once gets them 2 per window (``maxStep``), so a
    spike in one window does not start a whole fleet of Triton pods."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["maxReplicas"] = 8
    task["spec"]["serving"]["scaling"] = {"maxStep": 2}
    burst = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=75)  # ceil(75/10) = 8
    seen = []
    for i in range(5):
        p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=10 * (i + 1)), burst)
        seen.append(next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"])
    assert seen == [3, 5, 7, 8, 8]


def test_the_next_window_is_due_a_window_after_the_last_judged_one() -> None:
    """What the operator's per-task wake-up is set from; also the usage a window reports."""
    task, jobs, dep = _serving_task()
    judged = Metrics(
        p95_latency_ms=80, error_rate=0.0, request_rate=5, slm_share=0.4, cost_saved_usd=0.1234
    )
    p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), judged)
    assert p.next_window_s == 10.0
    assert task["status"]["usage"] == {
        "slmShare": 0.4,
        "costSavedUSD": 0.1234,
        "windowSeconds": 10,
    }
    p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=14), None)  # an event between
    assert p.next_window_s == pytest.approx(6.0)
    # Due, but Prometheus did not answer: the next try is a window later, not at once.
    p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=25), None)
    assert p.next_window_s == 10.0
    # No model served: no windows.
    fresh = make_task()
    assert plan(Observed(fresh, {}, None, NOW)).next_window_s is None


def test_gateway_restarts_do_not_lose_the_new_examples_counted_so_far() -> None:
    """A gateway rollout replaces the counter series: what was counted before goes on
    counting, and so does what the new gateway captures, however its total compares with the
    old one's. Before, a second restart lost everything counted between the two whenever the
    new gateway's total passed the total at the first (549 counted as 69)."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 550, "enabled": True}
    t = NOW
    # the first count, 60 new, a window without series (the new gateway has written nothing
    # yet), the replaced gateway's own count, its 440 more, then a second rollout
    for m in (
        captured(1000, "a"),
        captured(1060, "a"),
        HEALTHY,
        captured(20, "b"),
        captured(460, "b"),
        captured(29, "c"),
    ):
        _step(task, jobs, dep, t, m)
        t += dt.timedelta(seconds=10)
    r = task["status"]["retraining"]
    assert (r["epoch"], r["newRecords"], r["capturedRecords"]) == (0, 60 + 20 + 440 + 29, 29)
    _step(task, jobs, dep, t, captured(30, "c"))
    assert task["status"]["retraining"]["epoch"] == 1
    assert task["status"]["retraining"]["newRecords"] == 0


def test_a_restart_in_place_counts_whole_and_a_lagging_read_counts_nothing_twice() -> None:
    """The same series read lower than before is a Prometheus replica answering behind (a
    restarted gateway is a new series: its start is in the key), so the dip and its recovery
    count nothing twice. Without start times (created series dropped by the scrape) a reading
    below half the last is taken for a restart in place, whose whole count is new, and one a
    little lower still for a read behind: counted whole, it started a retraining on 60 new
    calls."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "enabled": True}
    t = NOW
    for total in (1000, 1060, 1030, 1070, 1040, 1099):  # dips, 99 new in the end
        _step(task, jobs, dep, t, captured(total))
        t += dt.timedelta(seconds=10)
    assert task["status"]["retraining"]["epoch"] == 0
    assert task["status"]["retraining"]["newRecords"] == 99
    _step(task, jobs, dep, t, captured(1100))
    assert task["status"]["retraining"]["epoch"] == 1

    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 1000, "enabled": True}
    for i, total in enumerate((1000, 1060, 1050, 1070, 30)):
        _step(
            task,
            jobs,
            dep,
            NOW + dt.timedelta(seconds=10 * i),
            captured_by({"a": total}, keyed_by_start=False),
        )
    r = task["status"]["retraining"]
    assert (r["epoch"], r["newRecords"]) == (0, 60 + 10 + 30)


def test_several_gateways_count_each_ones_gain() -> None:
    """Three replicas: each series counts what it gained; one replaced meanwhile counts whole,
    and the one it replaced (gone from Prometheus) is remembered, not counted again when a
    read brings it back."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 200, "enabled": True}
    t = NOW
    for m in (
        captured_by({"a": 500, "b": 700, "c": 100}),
        captured_by({"a": 540, "b": 710, "c": 130}),  # 80
        captured_by({"a": 560, "b": 720, "d": 15}),  # c replaced by d: 30 + 15
        captured_by({"a": 570, "b": 720, "c": 130, "d": 40}),  # c read again: nothing new
    ):
        _step(task, jobs, dep, t, m)
        t += dt.timedelta(seconds=10)
    r = task["status"]["retraining"]
    assert (r["epoch"], r["newRecords"]) == (0, 80 + 45 + 35)
    assert [c["series"] for c in r["gatewayCounters"]] == ["a", "b", "c", "d"]
    _step(task, jobs, dep, t, captured_by({"a": 600, "b": 730, "d": 41}))
    assert task["status"]["retraining"]["epoch"] == 1


def test_an_older_operators_count_goes_on_after_an_upgrade() -> None:
    """A status an earlier operator wrote counted from a baseline total: its count so far is
    kept, and the new counting starts from the next readings."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "enabled": True}
    _step(task, jobs, dep, NOW, HEALTHY)
    task["status"]["retraining"] = {
        "epoch": 0,
        "reason": "CountingNewExamples",
        "baselineRecords": 1000,
        "capturedRecords": 1050,
        "carriedRecords": 20,
    }
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), captured(1055))
    r = task["status"]["retraining"]
    assert (r["newRecords"], r["gatewayCounters"]) == (70, [{"series": "gateway-0", "count": 1055}])
    assert "baselineRecords" not in r and "carriedRecords" not in r
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=20), captured(1085))
    assert task["status"]["retraining"]["epoch"] == 1


def test_retraining_starts_after_enough_new_calls_and_promotes_only_if_better() -> None:
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "enabled": True}
    rev0 = n.revision_of(task["spec"])
    t = NOW

    _step(task, jobs, dep, t, captured(1000))  # where counting starts
    assert task["status"]["retraining"]["newRecords"] == 0
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, captured(1050))
    assert task["status"]["retraining"]["epoch"] == 0
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, captured(1120))
    assert task["status"]["retraining"]["epoch"] == 1
    rev1 = n.revision_of(task["spec"], 1)
    p = _step(task, jobs, dep, t + dt.timedelta(seconds=1), captured(1120))
    assert task["status"]["revision"] == {"active": rev0, "training": rev1}
    assert f"weather-data-{rev1}" in [o["metadata"]["name"] for o in p.apply]

    # The retrained candidates pass the gate but are not better than the served 0.9: no swap.
    same = retrained_jobs(task, rev0, rev1, scores=(0.9, 0.85))
    p = _step(task, {**jobs, **same}, dep, t + dt.timedelta(seconds=2), captured(1120))
    assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.NOT_BETTER)
    assert not [o for o in p.apply if o["metadata"]["labels"].get(n.LABEL_STAGE) == "export"]
    assert conds(task["status"])[c.READY][0] == c.TRUE
    # The lost retraining is over: nothing is training, and the served model is still rev0.
    assert task["status"]["revision"] == {"active": rev0, "training": ""}


def retrained_jobs(
    task: dict[str, Any], rev0: str, rev: str, scores: tuple[float, float]
) -> dict[str, JobView]:
    """The finished Jobs of retraining revision ``rev``, its candidates scoring ``scores``."""
    out = {}
    for name, v in jobs_through(task, "train", scores=scores).items():
        out[name.replace(rev0, rev)] = JobView(
            name.replace(rev0, rev),
            v.stage,
            rev,
            v.candidate,
            v.state,
            v.result,
            finished_at=v.finished_at,
        )
    return out


def test_a_lost_retraining_keeps_counting_and_the_next_must_still_beat_the_served_model() -> None:
    """S6 goes on after a retraining that did not beat the served model: the next
    ``minNewExamples`` calls start another, which must beat the served (older) model too.
    The lost one never trains again, even once its Jobs are deleted (by hand, a cleanup)."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "enabled": True}
    rev0 = n.revision_of(task["spec"])
    rev1, rev2 = n.revision_of(task["spec"], 1), n.revision_of(task["spec"], 2)
    t = NOW

    _step(task, jobs, dep, t, captured(1000))
    _step(task, jobs, dep, t + dt.timedelta(seconds=10), captured(1100))
    assert task["status"]["retraining"]["epoch"] == 1
    lost = {**jobs, **retrained_jobs(task, rev0, rev1, scores=(0.88, 0.85))}
    t += dt.timedelta(seconds=20)
    p = _step(task, lost, dep, t, captured(1150))
    assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.NOT_BETTER)
    assert not training_jobs(p)
    assert not p.delete_jobs  # kept, with their results, until the next retraining
    assert task["status"]["retraining"]["concludedRevision"] == rev1

    # Someone deletes the lost retraining's Jobs: nothing is created again, and status still
    # says why the served model stays.
    for i in range(1, 3):
        p = _step(task, jobs, dep, t + dt.timedelta(seconds=i), captured(1150))
        assert not training_jobs(p), i
        assert task["status"]["revision"] == {"active": rev0, "training": ""}
        assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.NOT_BETTER)
        assert conds(task["status"])[c.DATA_READY] == (c.TRUE, c.DATA_PREPARED)
        assert task["status"]["retraining"]["epoch"] == 1  # 50 new calls since the trigger
        assert not p.events
    t += dt.timedelta(seconds=10)
    p = _step(task, jobs, dep, t, captured(1210))
    assert task["status"]["retraining"]["epoch"] == 2
    assert task["status"]["retraining"]["reason"] == "EnoughNewExamples"
    # Lost Jobs still there at the next retraining are deleted then.
    kept = plan(Observed(task, lost, dep, t + dt.timedelta(seconds=1), captured(1210)))
    assert sorted(kept.delete_jobs) == sorted(name for name in lost if rev1 in name)
    p = _step(task, jobs, dep, t + dt.timedelta(seconds=1), captured(1210))
    assert task["status"]["revision"] == {"active": rev0, "training": rev2}
    assert f"weather-data-{rev2}" in [o["metadata"]["name"] for o in p.apply]

    # Epoch 2 passes the gate at 0.89: still not better than the served 0.9.
    worse = {**jobs, **retrained_jobs(task, rev0, rev2, scores=(0.89, 0.86))}
    _step(task, worse, dep, t + dt.timedelta(seconds=2), captured(1210))
    assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.NOT_BETTER)
    assert task["status"]["revision"]["active"] == rev0
    # ... at 0.93 it is better: it is exported, and then served.
    better = {**jobs, **retrained_jobs(task, rev0, rev2, scores=(0.93, 0.86))}
    p = _step(task, better, dep, t + dt.timedelta(seconds=3), captured(1210))
    exports = [o for o in p.apply if o["metadata"]["labels"].get(n.LABEL_STAGE) == "export"]
    assert [o["metadata"]["name"] for o in exports] == [n.export_job_name("weather", "small", rev2)]


def test_deleting_the_deployment_after_a_lost_retraining_keeps_the_served_model() -> None:
    """The Triton Deployment is deleted (to force fresh pods, by a cleanup) after a retraining
    lost to the served model: the served revision is rebuilt from status, the loser is not
    promoted for want of a model to beat, and the served revision's Jobs are kept."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100}
    rev0, rev1 = n.revision_of(task["spec"]), n.revision_of(task["spec"], 1)
    t = NOW
    _step(task, jobs, dep, t, captured(1000))
    _step(task, jobs, dep, t + dt.timedelta(seconds=10), captured(1100))
    lost = {**jobs, **retrained_jobs(task, rev0, rev1, scores=(0.89, 0.88))}
    _step(task, lost, dep, t + dt.timedelta(seconds=20), captured(1100))
    assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.NOT_BETTER)

    p = _step(task, lost, None, t + dt.timedelta(seconds=21), None)
    assert kinds(p) == [("Deployment", "weather-slm"), ("Service", "weather-slm")]
    d = p.apply[0]
    assert d["metadata"]["annotations"][n.LABEL_REVISION] == rev0
    assert d["metadata"]["annotations"][n.ANNOTATION_CANDIDATE] == "small"
    args = d["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--model-repository=/workspace/weather/{rev0}/model_repository" in args
    assert p.delete_jobs == []  # neither the served revision's Jobs nor the loser's
    assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.NOT_BETTER)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_READY_REPLICAS)
    assert task["status"]["revision"] == {"active": rev0, "training": ""}
    assert task["status"]["selectedModel"]["revision"] == rev0
    assert task["status"]["selectedModel"]["score"] == 0.9

    # Its replicas are back: the same model serves again.
    p = _step(task, lost, dep, t + dt.timedelta(seconds=30), captured(1100))
    assert conds(task["status"])[c.READY] == (c.TRUE, c.READY_REASON)
    assert task["status"]["revision"] == {"active": rev0, "training": ""}
    assert not training_jobs(p)


def test_a_new_storage_claim_keeps_the_served_model_on_its_own_claim() -> None:
    """Moving a serving task to another PVC trains a new revision on the new claim; until it
    replaces the served model, Triton keeps reading that model from the claim it is on."""
    task, jobs, dep = _serving_task()
    old_rev = n.revision_of(task["spec"])
    task["metadata"]["generation"] = 2
    task["spec"]["storage"]["claimName"] = "slm-work-v2"
    new_rev = n.revision_of(task["spec"])
    assert new_rev != old_rev

    p = plan(Observed(task, jobs, dep, NOW))
    d = next(o for o in p.apply if o["kind"] == "Deployment")
    assert d["metadata"]["annotations"][n.LABEL_REVISION] == old_rev
    vols = d["spec"]["template"]["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in vols if v["name"] == "workspace"] == [
        "slm-work"
    ]
    data = next(o for o in p.apply if o["kind"] == "Job")
    assert data["metadata"]["name"] == f"weather-data-{new_rev}"
    workspace = next(
        v for v in data["spec"]["template"]["spec"]["volumes"] if v["name"] == "workspace"
    )
    assert workspace["persistentVolumeClaim"]["claimName"] == "slm-work-v2"
    assert conds(p.status)[c.READY] == (c.TRUE, c.READY_REASON)
    assert p.status["revision"] == {"active": old_rev, "training": new_rev}

    # The new revision, trained and exported on the new claim, replaces it there.
    p = plan(Observed(task, {**jobs, **jobs_through(task, "export")}, dep, NOW))
    d = next(o for o in p.apply if o["kind"] == "Deployment")
    assert d["metadata"]["annotations"][n.LABEL_REVISION] == new_rev
    vols = d["spec"]["template"]["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in vols if v["name"] == "workspace"] == [
        "slm-work-v2"
    ]


def _at(hour: int, minute: int, second: int = 0) -> dt.datetime:
    return NOW.replace(hour=hour, minute=minute, second=second)


@pytest.mark.parametrize(
    ("schedule", "triggered"),
    [("0 12 * * MON", True), ("0 12 * * mon-fri", True), ("0 12 * * sun", False)],
)
def test_a_schedule_with_day_names_triggers_retraining_when_it_fires(
    schedule: str, triggered: bool
) -> None:
    """Cron's day names (as the CRD admits them) work: the retraining starts at 12:00 on a
    Monday (NOW) for a Monday schedule, and waits for a Sunday one."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "schedule": schedule}
    _step(task, jobs, dep, _at(11, 59, 30), captured(1000))
    _step(task, jobs, dep, _at(12, 0, 0), captured(1100))
    retraining = task["status"]["retraining"]
    assert retraining["epoch"] == (1 if triggered else 0)
    assert retraining["reason"] == ("EnoughNewExamples" if triggered else "WaitingForSchedule")


@pytest.mark.parametrize("enabled", [True, False])
def test_a_schedule_cron_cannot_run_is_invalid_spec_not_a_crash(enabled: bool) -> None:
    """A step of 0 (admitted by an older CRD) used to raise at every metrics window, even with
    retraining paused: no status, no live control. Now the task says what is wrong."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "schedule": "*/0 * * * *"}
    task["spec"]["retraining"]["enabled"] = enabled
    p = _step(task, jobs, dep, NOW, captured(1000))
    assert p.invalid is not None and "retraining.schedule '*/0 * * * *'" in p.invalid
    assert "step in '*/0' must be at least 1" in p.invalid
    assert conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)
    # No Job; the served model's Deployment and Service stay under live control.
    assert kinds(p) == [("Deployment", "weather-slm"), ("Service", "weather-slm")]
    assert p.delete_jobs == []


def test_an_invalid_spec_keeps_the_served_model_under_live_control() -> None:
    """A schedule the CRD pattern admits but cron cannot run (a range that ends before it
    starts) makes the spec invalid: training stops, but the served SLM over its SLO must
    still hand its calls to the LLM (it used to keep every call, live control frozen)."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"] = {"strategy": "direct"}
    t = NOW
    for _ in range(2):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
    assert task["status"]["route"]["mode"] == "slm"
    task["spec"]["retraining"] = {"minNewExamples": 1000, "schedule": "50-10 * * * *"}
    for _ in range(2):  # breachWindows: 2
        t += dt.timedelta(seconds=10)
        p = _step(task, jobs, dep, t, SLOW)
    assert p.invalid is not None and "minute range '50-10'" in p.invalid
    cs = conds(task["status"])
    assert cs[c.READY] == (c.FALSE, c.INVALID_SPEC)
    assert cs[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    assert cs[c.SLO_MET] == (c.FALSE, c.SLO_BREACHED)
    assert cs[c.SERVING] == (c.TRUE, c.DEPLOYMENT_AVAILABLE)
    # The served revision's training facts still hold; only Ready says the spec is invalid.
    assert cs[c.TRAINED] == (c.TRUE, c.TRAINING_SUCCEEDED)
    assert cs[c.EVALUATED] == (c.TRUE, c.GATE_PASSED)
    assert task["status"]["route"]["mode"] != "slm"  # the LLM answers
    assert task["status"]["phase"] == "Failed"
    assert p.next_window_s == 10.0  # the operator still wakes for the next window
    assert [x["name"] for x in task["status"]["candidates"]] == ["small", "big"]
    assert kinds(p) == [("Deployment", "weather-slm"), ("Service", "weather-slm")]
    _settled(Observed(task, jobs, dep, t + dt.timedelta(seconds=1)))


def test_a_reverted_invalid_edit_leaves_a_served_revision_without_jobs_as_it_was() -> None:
    """The served revision's Jobs are gone (deleted by hand, a cleanup), an invalid edit
    comes and is reverted. The training conditions used to be overwritten with InvalidSpec
    and then, with nothing recorded to fall back on, read "Job created, waiting for its pod"
    for a Job that never comes (or ResultMissing, a Warning, where the pods were gone)."""
    task, _jobs, dep = _serving_task()
    before = conds(task["status"])
    assert before[c.EVALUATED] == (c.TRUE, c.GATE_PASSED)
    good = copy.deepcopy(task["spec"])
    task["spec"]["candidates"][0]["model"] = "pvc://other-claim/models/x"
    p = _step(task, {}, dep, NOW, HEALTHY)
    assert p.invalid and conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)
    assert p.apply and not training_jobs(p)
    task["spec"] = good
    for at in (NOW + dt.timedelta(seconds=10), NOW + dt.timedelta(minutes=5)):
        p = _step(task, {}, dep, at, HEALTHY)
        cs = conds(p.status)
        for type_ in (c.DATA_READY, c.TRAINED, c.EVALUATED):
            assert cs[type_] == before[type_], type_
        assert cs[c.READY][0] == c.TRUE and p.status["phase"] == "Serving"
        assert not training_jobs(p) and not p.delete_jobs
    assert not [e for e in p.events if e[0] == "Warning"]


def test_an_invalid_spec_with_nothing_served_creates_no_job() -> None:
    task = make_task(retraining={"schedule": "50-10 * * * *"})
    p = _settled(Observed(task, {}, None, NOW))
    assert p.invalid and p.apply == [] and p.delete_jobs == []
    assert conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)
    assert p.status["phase"] == "Failed"


@pytest.mark.parametrize(
    ("expr", "when", "ok"),
    [
        ("0 3 * * 0", dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC), True),  # a Sunday
        ("0 3 * * 0", dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC), False),
        ("*/15 * * * *", dt.datetime(2026, 11, 23, 3, 45, tzinfo=dt.UTC), True),
        ("*/15 * * * *", dt.datetime(2026, 11, 23, 3, 46, tzinfo=dt.UTC), False),
        ("0 9-17 * * 1-5", dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC), True),
    ],
)
def test_cron_matching(expr: str, when: dt.datetime, ok: bool) -> None:
    from slm_operator.live import cron_matches

    assert cron_matches(expr, when) is ok


def test_a_task_scaled_to_zero_scales_up_again_when_calls_arrive() -> None:
    """minReplicas 0: an idle task scales to zero and its calls go to the LLM; when calls
    arrive again the autoscaler must bring a replica back (no replica is ready to gate on)."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["minReplicas"] = 0
    idle = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=0.0)
    p = _step(task, jobs, dep, NOW, idle)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 0
    zero = copy.deepcopy(dep)
    zero["spec"]["replicas"] = 0
    zero["status"].update(replicas=0, updatedReplicas=0, readyReplicas=0, availableReplicas=0)
    busy = Metrics(request_rate=5.0)  # the gateway counts the calls it sends to the LLM
    p = _step(task, jobs, zero, NOW + dt.timedelta(seconds=10), busy)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 1
    assert task["status"]["serving"]["desiredReplicas"] == 1


def test_a_task_scaled_to_zero_while_idle_is_healthy_not_an_outage() -> None:
    """No replica wanted is not a replica missing: Ready, phase Serving, the LLM answering
    (route llm), Normal events only; NoReadyReplicas (a Warning, Argo CD Degraded, "waiting
    for replicas (0/0)") is for a replica that should be there."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["minReplicas"] = 0
    idle = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=0.0)
    _step(task, jobs, dep, NOW, idle)
    zero = copy.deepcopy(dep)
    zero["spec"]["replicas"] = 0
    zero["status"].update(replicas=0, updatedReplicas=0, readyReplicas=0, availableReplicas=0)
    p = _step(task, jobs, zero, NOW + dt.timedelta(seconds=10), idle)
    st = conds(p.status)
    assert st[c.READY] == (c.TRUE, c.SCALED_TO_ZERO)
    assert st[c.SERVING] == (c.FALSE, c.SCALED_TO_ZERO)
    assert st[c.FALLBACK_ACTIVE] == (c.TRUE, c.SCALED_TO_ZERO)
    assert p.status["phase"] == "Serving"
    assert p.status["route"]["mode"] == "llm"
    assert "scaled to zero" in p.status["message"] and "0/0" not in p.status["message"]
    assert not [e for e in p.events if e[0] == "Warning"], p.events
    _settled(Observed(task, jobs, zero, NOW + dt.timedelta(seconds=11)))
    # A replica that should be there and is not is still an outage.
    task2, jobs2, dep2 = _serving_task()
    crashed = copy.deepcopy(dep2)
    crashed["status"].update(readyReplicas=0, availableReplicas=0)
    p = _step(task2, jobs2, crashed, NOW + dt.timedelta(seconds=10), HEALTHY)
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_READY_REPLICAS)
    assert conds(p.status)[c.READY][0] == c.FALSE


def test_waking_from_zero_is_not_an_outage_for_the_replicas_startup_budget() -> None:
    """Calls come back to a task scaled to zero: the pass raises the replicas from 0 and none
    is ready until Triton has loaded the model. That was reported as an outage on every
    wake-up (NoReadyReplicas, a Warning, Ready False, Argo CD Degraded); the LLM answers
    meanwhile as it did while scaled to zero. A replica not up within the startup probe's
    budget is an outage again; one that comes up serves with the rollout it had."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["minReplicas"] = 0
    idle = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=0.0)
    _step(task, jobs, dep, NOW, idle)
    mode_before = task["status"]["live"]["rolloutMode"]

    def replicas(wanted: int, ready: int) -> dict[str, Any]:
        return _with_replicas(dep, wanted, ready)

    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, replicas(0, 0), t, idle)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SCALED_TO_ZERO)
    busy = Metrics(request_rate=5.0)
    for i, deployed in enumerate((replicas(0, 0), replicas(1, 0), replicas(1, 0))):
        t += dt.timedelta(seconds=10)
        p = _step(task, jobs, deployed, t, busy)
        st = conds(p.status)
        assert st[c.FALLBACK_ACTIVE] == (c.TRUE, c.WAKING_FROM_ZERO), i
        assert st[c.READY] == (c.TRUE, c.WAKING_FROM_ZERO)
        assert st[c.SERVING] == (c.FALSE, c.DEPLOYMENT_PROGRESSING)
        assert p.status["phase"] == "Serving" and p.status["route"]["mode"] == "llm"
        assert p.status["live"]["fallbackReason"] == c.WAKING_FROM_ZERO
        assert not [e for e in p.events if e[0] == "Warning"], p.events
        if i == 0:
            woken, woke_at = copy.deepcopy(task["status"]), t
    t += dt.timedelta(seconds=10)
    p = _step(task, jobs, replicas(1, 1), t, busy)
    assert conds(p.status)[c.FALLBACK_ACTIVE][0] == c.FALSE  # serving at once, no recovery
    assert conds(p.status)[c.READY] == (c.TRUE, c.READY_REASON)
    assert p.status["live"]["rolloutMode"] == mode_before

    # A replica that never comes up: an outage once the startup budget is spent.
    task["status"] = woken
    t = woke_at + dt.timedelta(seconds=WAKE_GRACE_S + 1)
    p = _step(task, jobs, replicas(1, 0), t, busy)
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_READY_REPLICAS)
    assert conds(p.status)[c.READY][0] == c.FALSE
    assert ("Warning", c.NO_READY_REPLICAS) in [(e[0], e[1]) for e in p.events]


def test_a_woken_replica_that_never_gets_ready_goes_back_to_zero_once_calls_stop() -> None:
    """minReplicas 0: calls wake an idle task, its replica never becomes ready (no GPU node, a
    crash loop), and the calls stop. It stayed at one replica for good (NoReadyReplicas, a
    Warning, Ready False); it scales back to zero after the usual scale-down cool-down, as a
    ready replica would."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["minReplicas"] = 0
    idle = Metrics(request_rate=0.0)
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, idle)
    t += dt.timedelta(seconds=10)
    _step(task, jobs, _with_replicas(dep, 0, 0), t, idle)
    assert conds(task["status"])[c.READY] == (c.TRUE, c.SCALED_TO_ZERO)
    t += dt.timedelta(seconds=10)
    _step(task, jobs, _with_replicas(dep, 0, 0), t, Metrics(request_rate=0.5))
    assert task["status"]["serving"]["desiredReplicas"] == 1
    woke_at, stuck = t, _with_replicas(dep, 1, 0)
    cooldown = dt.timedelta(seconds=60)  # scaling.scaleDownCooldownSeconds' default
    while t + dt.timedelta(seconds=10) < woke_at + cooldown:  # cooling down: kept
        t += dt.timedelta(seconds=10)
        _step(task, jobs, stuck, t, idle)
        assert task["status"]["serving"]["desiredReplicas"] == 1
    t = woke_at + cooldown
    p = _step(task, jobs, stuck, t, idle)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 0
    assert task["status"]["serving"]["desiredReplicas"] == 0
    assert task["status"]["live"]["scaleReason"] == "ScaleDown"
    assert conds(task["status"])[c.READY] == (c.TRUE, c.SCALED_TO_ZERO)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SCALED_TO_ZERO)
    assert not [e for e in p.events if e[0] == "Warning"], p.events


def test_a_first_rollout_keeps_its_replica_while_it_starts_though_idle() -> None:
    """The scale-down without a ready replica is for a model that served: a new task with
    minReplicas 0 and no calls still starts its replica (which shows the model loads) and is
    scaled to zero once it served, as before."""
    task = make_task()
    task["spec"]["serving"]["minReplicas"] = 0
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    starting = deployment(rev, available=False, ready=0)
    for i in range(3):
        p = _step(task, jobs, starting, NOW + dt.timedelta(minutes=i), Metrics(request_rate=0.0))
        assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 1
        assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_SERVING_MODEL)


def test_a_first_rollout_waiting_for_replicas_is_not_an_outage() -> None:
    """A newly deployed model whose replicas are still starting has never served: calls go to
    the LLM for want of a model (no Warning), not because replicas went missing."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    p = _step(task, jobs, deployment(rev, available=False, ready=0), NOW, HEALTHY)
    assert conds(p.status)[c.SERVING] == (c.FALSE, c.DEPLOYMENT_PROGRESSING)
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_SERVING_MODEL)
    assert not [e for e in p.events if e[0] == "Warning"]


def test_serving_says_why_a_triton_replica_is_not_ready() -> None:
    """A replica the scheduler cannot place (no free GPU) is named in Serving, whether no
    replica is ready yet or some are and a scale-up is stuck."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    why = "pod weather-slm-x cannot be scheduled: 0/4 nodes are available: 2 Insufficient GPU."
    starting = plan(
        Observed(
            task,
            jobs,
            deployment(rev, available=False, ready=0),
            NOW,
            HEALTHY,
            serving_waiting=why,
        )
    )
    serving = next(x for x in starting.status["conditions"] if x["type"] == c.SERVING)
    assert serving["reason"] == c.DEPLOYMENT_PROGRESSING and serving["message"].endswith(why)
    scaling = plan(Observed(task, jobs, deployment(rev), NOW, HEALTHY, serving_waiting=why))
    serving = next(x for x in scaling.status["conditions"] if x["type"] == c.SERVING)
    assert serving["reason"] == c.DEPLOYMENT_AVAILABLE and serving["message"].endswith(why)
    healthy = plan(Observed(task, jobs, deployment(rev), NOW, HEALTHY))
    serving = next(x for x in healthy.status["conditions"] if x["type"] == c.SERVING)
    assert "cannot be scheduled" not in serving["message"]


def test_a_moment_without_ready_replicas_does_not_restart_the_rollout() -> None:
    """Live-control memory survives a window in which no Triton replica is ready (a crash, a
    node drain): the calls go to the LLM meanwhile, and when the same model's replicas are
    back it serves as before instead of starting over in shadow."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 1
    t = NOW
    for _ in range(2):
        _step(task, jobs, dep, t, HEALTHY)
        t += dt.timedelta(seconds=10)
    assert task["status"]["route"]["mode"] == "slm"
    down = copy.deepcopy(dep)
    down["status"].update(readyReplicas=0, availableReplicas=0)
    _step(task, jobs, down, t, HEALTHY)
    assert task["status"]["route"]["mode"] == "llm"
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_READY_REPLICAS)
    live = task["status"]["live"]
    assert (live["fallback"], live["fallbackReason"]) == (True, c.NO_READY_REPLICAS)
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    assert task["status"]["route"]["mode"] == "slm"
    assert task["status"]["live"]["rolloutMode"] == "slm"
    assert task["status"]["live"]["fallback"] is False


def test_replicas_back_with_no_metrics_yet_serve_at_once() -> None:
    """The first window after an outage has no SLM metrics (the LLM answered meanwhile): the
    outage's fallback ends with the outage, and does not wait out recovery windows."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 1
    t = NOW
    for _ in range(2):
        _step(task, jobs, dep, t, HEALTHY)
        t += dt.timedelta(seconds=10)
    down = copy.deepcopy(dep)
    down["status"].update(readyReplicas=0, availableReplicas=0)
    _step(task, jobs, down, t, HEALTHY)
    for _ in range(2):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, Metrics())
        assert task["status"]["route"]["mode"] == "slm"
        assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE


def test_an_slo_fallback_interrupted_by_an_outage_still_recovers_slowly() -> None:
    """An SLO fallback that was on when the replicas went away is still on when they are
    back, and ends only after the policy's recovery windows, as without the outage."""
    task, jobs, dep = _serving_task()  # breachWindows 2, recoveryWindows 3
    t = NOW
    for metrics in (HEALTHY, SLOW, SLOW):
        _step(task, jobs, dep, t, metrics)
        t += dt.timedelta(seconds=10)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    down = copy.deepcopy(dep)
    down["status"].update(readyReplicas=0, availableReplicas=0)
    _step(task, jobs, down, t, HEALTHY)
    assert task["status"]["live"]["fallback"] is True
    for _ in range(2):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
        assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.TRUE
    t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE


def test_a_newly_promoted_revision_starts_its_own_progressive_rollout() -> None:
    """status.live.rolloutMode is the step reached by the promoted model: a new revision that
    replaces a fully rolled-out one starts in shadow, not with every call at once."""
    task, jobs, dep = _serving_task()
    task["spec"]["rollout"]["canaryWindows"] = 1
    old_rev = n.revision_of(task["spec"])
    t = NOW
    for _ in range(2):
        _step(task, jobs, dep, t, HEALTHY)
        t += dt.timedelta(seconds=10)
    assert task["status"]["route"]["mode"] == "slm"

    task["metadata"]["generation"] = 2
    task["spec"]["candidates"][0]["epochs"] = 5
    new_rev = n.revision_of(task["spec"])
    both = {**jobs, **jobs_through(task, "export")}
    # The new revision exported: the Deployment moves to it (old pods serve meanwhile).
    p = _step(task, both, dep, t, HEALTHY)
    d = next(o for o in p.apply if o["kind"] == "Deployment")
    assert d["metadata"]["annotations"][n.LABEL_REVISION] == new_rev
    assert task["status"]["revision"]["active"] == new_rev
    assert task["status"]["route"]["mode"] == "shadow"
    assert task["status"]["live"]["rolloutMode"] == "shadow"
    # Within the same window, and once the Deployment reports it, it goes on from shadow.
    _step(task, both, deployment(new_rev), t + dt.timedelta(seconds=3), HEALTHY)
    assert task["status"]["route"]["mode"] == "shadow"
    _step(task, both, deployment(new_rev), t + dt.timedelta(seconds=10), HEALTHY)
    assert task["status"]["route"]["mode"] == "canary"
    assert old_rev != new_rev


def test_a_retraining_that_only_ties_the_served_score_is_not_promoted() -> None:
    """The served score is kept rounded (selectedModel.score); a retrained candidate with the
    very same score must not count as better because its own score was not rounded."""
    task = make_task()
    task["spec"]["fallback"]["policy"] = {"windowSeconds": 10}
    task["spec"]["retraining"] = {"minNewExamples": 100}
    task["spec"]["evaluation"]["gate"] = {"minScore": 0.8}
    rev0, rev1 = n.revision_of(task["spec"]), n.revision_of(task["spec"], 1)
    five_sixths = 5 / 6  # e.g. 250 of 300 held-out calls right
    jobs = jobs_through(task, "export", scores=(five_sixths, 0.95))
    dep = deployment(rev0)
    task["status"] = plan(Observed(task, jobs, dep, NOW)).status
    assert task["status"]["selectedModel"]["score"] == 0.8333

    _step(task, jobs, dep, NOW, captured(1000))
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), captured(1100))
    assert task["status"]["retraining"]["epoch"] == 1
    tie = {**jobs, **retrained_jobs(task, rev0, rev1, scores=(five_sixths, 0.8))}
    p = _step(task, tie, dep, NOW + dt.timedelta(seconds=11), captured(1100))
    assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.NOT_BETTER)
    assert not [o for o in p.apply if o["metadata"]["labels"].get(n.LABEL_STAGE) == "export"]


def test_a_promoted_retraining_keeps_reporting_the_candidate_it_serves() -> None:
    """A retraining promotes the candidate that beat the served model, which need not be the
    one the selection policy alone would pick; once it serves, selectedModel (and the route's
    confidence threshold) must still describe that candidate."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100}
    rev0, rev1 = n.revision_of(task["spec"]), n.revision_of(task["spec"], 1)

    _step(task, jobs, dep, NOW, captured(1000))
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), captured(1100))
    assert task["status"]["retraining"]["epoch"] == 1
    # small passes the gate but is below the served 0.9; only big is better.
    new = {**jobs, **retrained_jobs(task, rev0, rev1, scores=(0.88, 0.95))}
    p = _step(task, new, dep, NOW + dt.timedelta(seconds=11), captured(1100))
    export = next(o for o in p.apply if o["metadata"]["labels"].get(n.LABEL_STAGE) == "export")
    assert "--candidate=big" in export["spec"]["template"]["spec"]["containers"][0]["args"]
    en = n.export_job_name("weather", "big", rev1)
    new[en] = view(
        en,
        "export",
        rev1,
        SUCCEEDED,
        result("export", artifact_uri=f"pvc://slm-work/weather/{rev1}/model_repository"),
        candidate="big",
    )
    _step(task, new, dep, NOW + dt.timedelta(seconds=12), captured(1100))
    assert task["status"]["revision"] == {"active": rev1, "training": ""}
    assert task["status"]["selectedModel"]["candidate"] == "big"
    served = deployment(rev1, candidate="big")
    _step(task, new, served, NOW + dt.timedelta(seconds=13), captured(1100))
    assert task["status"]["selectedModel"]["candidate"] == "big"
    assert task["status"]["selectedModel"]["score"] == 0.95


def test_the_slm_time_budget_from_the_spec_reaches_the_gateways_route() -> None:
    """spec.serving.slo.slmTimeoutMs is copied to status.route (which the gateway reads);
    unset, the route has none and the gateway's annotation or flag decides."""
    task, jobs, dep = _serving_task()
    assert "slmTimeoutMs" not in plan(Observed(task, jobs, dep, NOW)).status["route"]
    task["spec"]["serving"]["slo"] = {"p95LatencyMs": 300, "slmTimeoutMs": 800}
    route = plan(Observed(task, jobs, dep, NOW)).status["route"]
    assert route["slmTimeoutMs"] == 800
    assert n.revision_of(task["spec"]) == n.revision_of(_serving_task()[0]["spec"])  # no retrain


def test_a_candidate_waiting_for_a_gpu_node_says_so_in_trained() -> None:
    """Trained names the candidate whose pod cannot be scheduled, with the scheduler's words,
    and the candidate's status entry carries them too."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "data")
    stuck = n.finetune_job_name("weather", "big", rev)
    jobs[stuck] = dataclasses.replace(
        view(stuck, "finetune", rev, PENDING, candidate="big"),
        waiting="pod x cannot be scheduled: 0/3 nodes are available: "
        "3 Insufficient nvidia.com/gpu.",
    )
    p = plan(Observed(task, jobs, None, NOW))
    trained = next(x for x in p.status["conditions"] if x["type"] == c.TRAINED)
    status, reason, message = trained["status"], trained["reason"], trained["message"]
    assert (status, reason) == (c.UNKNOWN, c.JOB_PENDING)
    assert "big: pod x cannot be scheduled: 0/3 nodes are available" in message
    entry = next(e for e in p.status["candidates"] if e["name"] == "big")
    assert "Insufficient nvidia.com/gpu" in entry["message"]


@pytest.mark.parametrize("metrics", [None, HEALTHY], ids=["no-prometheus", "within-window"])
def test_an_outage_fallback_ends_when_replicas_are_back_even_between_metrics_windows(
    metrics: Metrics | None,
) -> None:
    """The outage's fallback is written to status.live; it must end with the outage, not at
    the next metrics window: without Prometheus (or while it is down) that window never
    comes, and the calls of a served model would go to the LLM for good after one crash."""
    task, jobs, dep = _serving_task()  # windowSeconds 10
    t = NOW
    for _ in range(2):
        _step(task, jobs, dep, t, metrics)
        t += dt.timedelta(seconds=10)
    before = task["status"]["route"]["mode"]
    down = copy.deepcopy(dep)
    down["status"].update(readyReplicas=0, availableReplicas=0)
    _step(task, jobs, down, t - dt.timedelta(seconds=8), metrics)  # not a new window
    assert task["status"]["live"]["fallback"] is True
    _step(task, jobs, dep, t - dt.timedelta(seconds=6), metrics)  # still not a new window
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE
    assert task["status"]["live"]["fallback"] is False
    assert task["status"]["route"]["mode"] == before != "llm"


def test_the_llm_price_reaches_the_route() -> None:
    """spec.fallback.llm.price is copied to status.route.llmPrice, which the gateway prices
    the task's calls with; without it the route carries none."""
    task = make_task()
    assert "llmPrice" not in plan(Observed(task, {}, None, NOW)).status["route"]
    task["spec"]["fallback"]["llm"]["price"] = {"prompt": 0.00015, "completion": 0.0006}
    route = plan(Observed(task, {}, None, NOW)).status["route"]
    assert route["llmPrice"] == {"prompt": 0.00015, "completion": 0.0006}


def _settled(obs: Observed) -> Any:
    """plan(obs), then plan again on the status it wrote (JSON round trip, as the API server
    stores it): a reconcile must be a fixed point, with no change, event or moved time."""
    p = plan(obs)
    task = {**obs.task, "status": json.loads(json.dumps(p.status))}
    again = plan(dataclasses.replace(obs, task=task))
    assert again.status == task["status"]
    assert again.events == []
    return p


def _exports(p: Any) -> list[tuple[str, list[str]]]:
    """(name, --candidate args) of each export Job ``p`` applies."""
    return [
        (
            o["metadata"]["name"],
            [a for a in o["spec"]["template"]["spec"]["containers"][0]["args"] if "candid" in a],
        )
        for o in p.apply
        if o["metadata"]["labels"].get(n.LABEL_STAGE) == "export"
    ]


def test_a_changed_choice_exports_again_and_never_serves_the_other_candidates_export() -> None:
    """small's result is unreadable, so big is chosen and exported; then small's result is back
    (its Job re-run): small is chosen, and big's finished export must not be served as small
    (under small's name and threshold). small gets an export Job of its own, big's goes, and
    only small's repository is served."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    sm = n.finetune_job_name("weather", "small", rev)
    lost = view(sm, "finetune", rev, SUCCEEDED, None, "small", finished=NOW - dt.timedelta(hours=1))
    p1 = plan(Observed(task, {**jobs, sm: lost}, None, NOW))
    [(big_export, big_args)] = _exports(p1)
    assert big_args == [
        "--candidate=big",
        f"--candidate-dir=/workspace/weather/{rev}/candidates/big",
    ]

    task["status"] = json.loads(json.dumps(p1.status))
    big_repo = f"pvc://slm-work/weather/{rev}/model_repositories/big"
    done = result("export", candidate="big", artifact_uri=big_repo)
    jobs[big_export] = view(big_export, "export", rev, SUCCEEDED, done, "big")
    p2 = _settled(Observed(task, jobs, None, NOW))
    [(small_export, small_args)] = _exports(p2)
    assert small_export != big_export and "--candidate=small" in small_args
    assert p2.delete_jobs == [big_export]
    assert not [o for o in p2.apply if o["kind"] == "Deployment"]  # nothing promoted yet
    assert p2.status["revision"] == {"active": "", "training": rev}
    assert conds(p2.status)[c.SERVING] == (c.FALSE, c.EXPORTING)
    assert p2.status["route"]["mode"] == "llm"

    task["status"] = json.loads(json.dumps(p2.status))
    small_repo = f"pvc://slm-work/weather/{rev}/model_repositories/small"
    done = result("export", candidate="small", artifact_uri=small_repo)
    jobs[small_export] = view(small_export, "export", rev, SUCCEEDED, done, "small")
    p3 = _settled(Observed(task, jobs, None, NOW))
    dep = next(o for o in p3.apply if o["kind"] == "Deployment")
    assert dep["metadata"]["annotations"][n.ANNOTATION_CANDIDATE] == "small"
    assert dep["metadata"]["annotations"][n.ANNOTATION_ARTIFACT] == small_repo
    assert p3.status["selectedModel"]["candidate"] == "small"
    assert p3.status["selectedModel"]["artifactURI"] == small_repo


def test_an_export_job_named_by_an_older_operator_is_kept_and_served() -> None:
    """Before per-candidate export Jobs, one export Job per revision: after an upgrade, such a
    Job of the chosen candidate is used as it is (no second export), and a served revision is
    rebuilt from it as before."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    old_name = f"weather-export-{rev}"
    repo = f"pvc://slm-work/weather/{rev}/model_repository"
    jobs = jobs_through(task, "train")
    jobs[old_name] = view(
        old_name, "export", rev, SUCCEEDED, result("export", artifact_uri=repo), "small"
    )
    p = _settled(Observed(task, jobs, None, NOW))
    assert _exports(p) == [] and p.delete_jobs == []
    dep = next(o for o in p.apply if o["kind"] == "Deployment")
    assert dep["metadata"]["annotations"][n.ANNOTATION_ARTIFACT] == repo
    assert p.status["selectedModel"]["candidate"] == "small"

    task["status"] = json.loads(json.dumps(p.status))
    served = _settled(Observed(task, jobs, deployment(rev), NOW))
    assert kinds_but_prune(served) == [("Deployment", "weather-slm"), ("Service", "weather-slm")]
    assert served.delete_jobs == []
    assert conds(served.status)[c.READY] == (c.TRUE, c.READY_REASON)


def test_a_candidate_artifact_on_another_claim_fails_the_revision_in_status() -> None:
    """A trainer (a custom image) reports its candidate on a claim the export pod cannot
    mount: the plan says so in Evaluated (a terminal failure), instead of raising at every
    reconcile and leaving status silent."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    for name, v in list(jobs.items()):
        if v.stage == "finetune":
            moved = dataclasses.replace(v.result, artifact_uri=f"pvc://other/x/{v.candidate}")
            jobs[name] = dataclasses.replace(v, result=moved)
    p = _settled(Observed(task, jobs, None, NOW))
    assert conds(p.status)[c.EVALUATED] == (c.FALSE, c.RESULT_MISSING)
    evaluated = next(x for x in p.status["conditions"] if x["type"] == c.EVALUATED)
    assert "pvc://other/x/small is not on the storage claim slm-work" in evaluated["message"]
    assert evaluated["message"].startswith(f"revision {rev}: ")
    assert p.status["phase"] == "Failed"
    assert _exports(p) == []
    assert ("Warning", c.RESULT_MISSING) in [(e[0], e[1]) for e in p.events]


def test_a_candidate_artifact_on_another_claim_beside_a_served_model_keeps_live_control() -> None:
    """The same misreported artifact in a retraining beside a served model: the served model
    stays under live control (its SLO fallback still acts)."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100}
    rev0, rev1 = n.revision_of(task["spec"]), n.revision_of(task["spec"], 1)
    _step(task, jobs, dep, NOW, captured(1000))
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), captured(1100))
    new = retrained_jobs(task, rev0, rev1, scores=(0.95, 0.96))
    for name, v in list(new.items()):
        if v.stage == "finetune":
            moved = dataclasses.replace(v.result, artifact_uri=f"pvc://other/x/{v.candidate}")
            new[name] = dataclasses.replace(v, result=moved)
    t = NOW + dt.timedelta(seconds=10)
    for _ in range(2):  # breachWindows: 2
        t += dt.timedelta(seconds=10)
        p = _step(task, {**jobs, **new}, dep, t, SLOW)
    assert conds(task["status"])[c.EVALUATED] == (c.FALSE, c.RESULT_MISSING)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    assert task["status"]["revision"]["active"] == rev0
    assert _exports(p) == []


def test_a_window_stamped_in_the_future_by_a_skewed_leader_does_not_freeze_live_control() -> None:
    """A previous leader whose clock ran 10 minutes ahead stamped lastEvaluated (and
    lastScaleTime) in the future: the next window was not due for 10 minutes, no SLO breach
    could turn fallback on meanwhile, and scale-down waited as long."""
    task, jobs, dep = _serving_task()
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    ahead = (t + dt.timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    task["status"]["live"]["lastEvaluated"] = ahead
    assert metrics_due(task, t + dt.timedelta(seconds=1))

    busy = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=35)
    p = _step(task, jobs, dep, t + dt.timedelta(seconds=10), busy)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 3
    task["status"]["live"]["lastScaleTime"] = ahead
    quiet = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=0.5)
    p = _step(task, jobs, dep, t + dt.timedelta(seconds=20), quiet)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 1


def test_a_window_without_ready_replicas_is_judged_once() -> None:
    """While no replica of the served model is ready, a window is still judged once: its
    time is recorded, so the reconciles within it do not ask Prometheus again."""
    task, jobs, dep = _serving_task()
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, HEALTHY)
    down = deployment(n.revision_of(task["spec"]), ready=0)
    t += dt.timedelta(seconds=11)
    assert metrics_due(task, t)
    p = _step(task, jobs, down, t, SLOW)
    assert task["status"]["live"]["lastEvaluated"] == t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert not metrics_due(task, t + dt.timedelta(seconds=1))
    assert metrics_due(task, t + dt.timedelta(seconds=10))
    assert p.next_window_s == 10.0
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_READY_REPLICAS)
    assert task["status"]["route"]["mode"] == "llm"
    later = t + dt.timedelta(seconds=1)
    _settled(Observed(task, jobs, down, later, metrics_not_due=True))


@pytest.mark.parametrize("gone", ["jobs", "pods"])
def test_the_served_revisions_jobs_or_pods_gone_keep_its_recorded_outcome(gone: str) -> None:
    """The served revision's finished Jobs are deleted (kubectl delete jobs, a cleanup policy)
    or their pods garbage-collected: nothing is trained again, so status keeps what they
    reported instead of going back to JobPending/ResultMissing, with Events about Jobs that
    never come."""
    task, jobs, dep = _serving_task()
    _step(task, jobs, dep, NOW, None)
    before = copy.deepcopy(task["status"])
    left = (
        {} if gone == "jobs" else {k: dataclasses.replace(v, result=None) for k, v in jobs.items()}
    )
    later = NOW + dt.timedelta(minutes=10)
    p = _settled(Observed(task, left, dep, later))
    assert p.status["conditions"] == before["conditions"]
    assert conds(p.status)[c.DATA_READY] == (c.TRUE, c.DATA_PREPARED)
    assert conds(p.status)[c.EVALUATED] == (c.TRUE, c.GATE_PASSED)
    assert p.status["candidates"] == before["candidates"]
    assert p.status["selectedModel"] == before["selectedModel"]
    assert p.status["route"] == before["route"]
    assert p.events == []
    assert kinds_but_prune(p) == [("Deployment", "weather-slm"), ("Service", "weather-slm")]
    assert p.delete_jobs == []


def test_a_data_prep_result_read_once_outlives_its_pod() -> None:
    """Fine-tunes run for hours; meanwhile the Complete data-prep Job's pod is garbage-
    collected, and its result (the termination message) with it. The result was read: the
    training goes on, instead of failing (ResultMissing) two minutes later."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    for name, v in list(jobs.items()):
        if v.stage == "finetune":
            jobs[name] = JobView(name, v.stage, rev, v.candidate, RUNNING, progress=40)
    task["status"] = json.loads(json.dumps(plan(Observed(task, jobs, None, NOW)).status))
    before = conds(task["status"])
    assert before[c.DATA_READY] == (c.TRUE, c.DATA_PREPARED)

    dn = n.data_job_name("weather", rev)
    jobs[dn] = dataclasses.replace(jobs[dn], result=None)
    later = NOW + dt.timedelta(hours=2)
    p = _settled(Observed(task, jobs, None, later))
    assert conds(p.status) == before
    assert "1000 examples after curation" in p.status["conditions"][0]["message"]
    assert p.status["phase"] == "Training"
    assert [x["state"] for x in p.status["candidates"]] == [RUNNING, RUNNING]
    assert sorted(name for _, name in kinds(p)) == sorted(jobs)  # every Job kept, none new
    assert p.delete_jobs == [] and p.events == []


def test_a_data_prep_result_never_read_is_still_missing() -> None:
    """Without a result read before (status never said DataPrepared), a Complete Job whose pod
    reported nothing is still ResultMissing after the grace period."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    gone = view(dn, "prepare", rev, SUCCEEDED, None, finished=NOW - dt.timedelta(minutes=5))
    p = plan(Observed(task, {dn: gone}, None, NOW))
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.RESULT_MISSING)


def _pruned(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` as a structural schema keeps it: fields the schema does not name are dropped
    by the API server, silently (so a status field missing from the CRD is lost on write)."""
    if isinstance(value, dict):
        if "properties" in schema:
            props = schema["properties"]
            return {k: _pruned(v, props[k]) for k, v in value.items() if k in props}
        extra = schema.get("additionalProperties")
        return {k: _pruned(v, extra) for k, v in value.items()} if extra else {}
    if isinstance(value, list):
        return [_pruned(v, schema["items"]) for v in value]
    return value


def _stored(status: dict[str, Any]) -> dict[str, Any]:
    """``status`` as the API server stores it: a JSON round trip through the CRD's schema."""
    crd = yaml.safe_load((REPO / "crds" / "slmfleet.dev_agenttasks.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return _pruned(json.loads(json.dumps(status)), schema)  # type: ignore[no-any-return]


def _candidate_pods_gone(jobs: dict[str, JobView], *names: str) -> dict[str, JobView]:
    """``jobs`` with the named candidates' fine-tune pods gone long ago: their Jobs are still
    Complete, their results (the pods' termination messages) no longer readable."""
    gone = NOW - dt.timedelta(hours=3)
    return {
        k: dataclasses.replace(v, result=None, finished_at=gone)
        if v.stage == "finetune" and v.candidate in names
        else v
        for k, v in jobs.items()
    }


def test_a_candidates_result_read_once_outlives_its_pod() -> None:
    """Both candidates trained (hours of GPU time) and their results were read; their pods are
    garbage-collected (PodGC, a node scaled down) while small's export runs. The revision goes
    on exporting small, and is served once the export is done, instead of failing every
    candidate (ResultMissing) and throwing the training away."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    p1 = plan(Observed(task, jobs, None, NOW))
    assert p1.status["phase"] == "Exporting"
    task["status"] = _stored(p1.status)  # what the API server keeps of it
    [export] = [o for o in p1.apply if o["metadata"]["labels"][n.LABEL_STAGE] == "export"]
    en = export["metadata"]["name"]

    jobs = _candidate_pods_gone(jobs, "small", "big")
    jobs[en] = view(en, "export", rev, RUNNING, candidate="small")
    later = NOW + dt.timedelta(hours=2)
    p2 = _settled(Observed(task, jobs, None, later))
    assert conds(p2.status) == conds(p1.status)
    assert conds(p2.status)[c.TRAINED] == (c.TRUE, c.TRAINING_SUCCEEDED)
    assert conds(p2.status)[c.EVALUATED] == (c.TRUE, c.GATE_PASSED)
    assert p2.status["phase"] == "Exporting"
    assert p2.status["candidates"] == task["status"]["candidates"]
    assert [x["state"] for x in p2.status["candidates"]] == [SUCCEEDED, SUCCEEDED]
    assert export in p2.apply  # the same export: small's artifact and threshold
    assert p2.delete_jobs == [] and p2.events == []

    task["status"] = _stored(p2.status)
    repo = f"pvc://slm-work/weather/{rev}/model_repositories/small"
    jobs[en] = view(en, "export", rev, SUCCEEDED, result("export", artifact_uri=repo), "small")
    p3 = plan(Observed(task, jobs, None, later))
    dep = next(o for o in p3.apply if o["kind"] == "Deployment")
    assert dep["metadata"]["annotations"][n.ANNOTATION_CANDIDATE] == "small"
    assert p3.status["revision"] == {"active": rev, "training": ""}
    assert p3.status["selectedModel"]["threshold"] == 0.7


def test_a_recorded_result_keeps_its_precision_and_the_same_choice() -> None:
    """Status shows scores to 4 decimals; a result stands for the lost one only as it was
    read. Rounded, small's 0.79996 would pass minScore 0.8, and the choice would change under
    a running export (big's, the only one passing when both results were read)."""
    task = make_task()
    task["spec"]["evaluation"]["gate"] = {"minScore": 0.8}
    jobs = jobs_through(task, "train", scores=(0.79996, 0.9))
    p1 = plan(Observed(task, jobs, None, NOW))
    task["status"] = _stored(p1.status)
    assert [x["score"] for x in p1.status["candidates"]] == [0.8, 0.9]
    assert [x["passedGate"] for x in p1.status["candidates"]] == [False, True]
    gone = _candidate_pods_gone(jobs, "small", "big")
    p2 = _settled(Observed(task, gone, None, NOW + dt.timedelta(hours=1)))
    assert conds(p2.status) == conds(p1.status)
    assert [x["passedGate"] for x in p2.status["candidates"]] == [False, True]
    assert "big selected" in p2.status["conditions"][2]["message"]
    assert _exports(p2) == _exports(p1)


@pytest.mark.parametrize("other", ["revision", "job", "none"])
def test_a_result_recorded_for_another_revision_or_job_never_stands_for_a_lost_one(
    other: str,
) -> None:
    """Only the result read from this very Job (the revision's, the candidate's) is a fact
    about it; an entry of another revision or Job, or an older status that recorded none,
    leaves the lost result missing."""
    task = make_task()
    jobs = jobs_through(task, "train")
    task["status"] = _stored(plan(Observed(task, jobs, None, NOW)).status)
    small = task["status"]["candidates"][0]
    if other == "revision":
        small["revision"] = "0123456789"
    elif other == "job":
        small["job"] = "weather-ft-small-0123456789"
    else:
        small.pop("result", None)  # an older operator's status
    p = plan(Observed(task, _candidate_pods_gone(jobs, "small"), None, NOW))
    assert conds(p.status)[c.TRAINED] == (c.TRUE, c.PARTIALLY_TRAINED)
    assert "small: Job" in p.status["conditions"][1]["message"]
    assert "reported no result" in p.status["conditions"][1]["message"]
    assert "big selected" in p.status["conditions"][2]["message"]


def test_a_readable_result_wins_over_the_recorded_one() -> None:
    """The Job's own result, while its pod is there, is what counts (a Job of the same name
    run again reports anew); the recorded one only stands in once it is gone."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    task["status"] = _stored(plan(Observed(task, jobs, None, NOW)).status)
    sm = n.finetune_job_name("weather", "small", rev)
    jobs[sm] = dataclasses.replace(jobs[sm], result=dataclasses.replace(jobs[sm].result, score=0.5))
    p = plan(Observed(task, jobs, None, NOW))
    small = p.status["candidates"][0]
    assert small["score"] == 0.5 and small["passedGate"] is False
    assert "big selected" in p.status["conditions"][2]["message"]


def test_the_served_revisions_export_pod_gone_keeps_its_recorded_outcome() -> None:
    """The served revision's export pod is garbage-collected while its fine-tune pods are
    still there: the export's result was read (status.selectedModel records where it wrote
    the model), so Evaluated stays GatePassed, with no ResultMissing Warning."""
    task, jobs, dep = _serving_task()
    _step(task, jobs, dep, NOW, None)
    task["status"] = _stored(task["status"])
    before = copy.deepcopy(task["status"])
    rev = n.revision_of(task["spec"])
    en = n.export_job_name("weather", "small", rev)
    jobs = {**jobs, en: dataclasses.replace(jobs[en], result=None)}
    p = _settled(Observed(task, jobs, dep, NOW + dt.timedelta(minutes=10)))
    assert p.status["conditions"] == before["conditions"]
    assert conds(p.status)[c.EVALUATED] == (c.TRUE, c.GATE_PASSED)
    assert p.status["selectedModel"] == before["selectedModel"]
    assert p.events == []


def test_a_breached_window_rolls_a_canary_back_even_when_it_turns_fallback_on() -> None:
    """breachWindows 1: the breached window turns fallback on at once. The canary must still
    be rolled back (it used to hold with its healthy windows, and was promoted to every call
    the moment fallback ended, right after breaching the SLO)."""
    task, jobs, dep = _serving_task()  # recoveryWindows 3
    task["spec"]["fallback"]["policy"]["breachWindows"] = 1
    task["spec"]["rollout"]["canaryWindows"] = 3
    t = NOW
    for _ in range(3):  # shadow -> canary, then 2 of 3 healthy windows
        _step(task, jobs, dep, t, HEALTHY)
        t += dt.timedelta(seconds=10)
    assert task["status"]["live"]["canaryHealthyWindows"] == 2
    _step(task, jobs, dep, t, SLOW)
    assert conds(task["status"])[c.FALLBACK_ACTIVE] == (c.TRUE, c.SLO_BREACHED)
    live = task["status"]["live"]
    assert (live["rolloutMode"], live["rolloutReason"]) == ("shadow", "CanaryRolledBack")
    assert live["canaryHealthyWindows"] == 0
    _settled(Observed(task, jobs, dep, t + dt.timedelta(seconds=1), metrics_not_due=True))
    routes = []
    for _ in range(3):
        t += dt.timedelta(seconds=10)
        _step(task, jobs, dep, t, HEALTHY)
        routes.append(task["status"]["route"]["mode"])
    # Recovered: a new canary starts from zero; not every call to the SLM at once.
    assert routes == ["shadow", "shadow", "canary"]
    assert task["status"]["live"]["canaryHealthyWindows"] == 0


@pytest.mark.parametrize("why", ["no-ready-replica", "no-captured-count"])
def test_a_scheduled_retraining_missed_while_the_task_could_not_act_runs_when_it_can(
    why: str,
) -> None:
    """A 02:00 schedule whose minute falls in windows that cannot run the retraining step (the
    task scaled to zero for the night, or no captured count) is acted on at the first window
    that can, even hours later; it used to be lost, the schedule being scanned only from the
    last judged window."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "schedule": "0 2 * * *"}
    day = NOW.replace(day=24)
    _step(task, jobs, dep, day.replace(hour=1, minute=59, second=30), captured(1000))
    _step(task, jobs, dep, day.replace(hour=1, minute=59, second=40), captured(1100))
    assert task["status"]["retraining"]["reason"] == "WaitingForSchedule"
    checked = task["status"]["retraining"].get("scheduleCheckedAt")
    down = deployment(n.revision_of(task["spec"]), ready=0)
    t = day.replace(hour=1, minute=59, second=50)
    while t < day.replace(hour=4):  # 02:00 passes while the step cannot act
        if why == "no-ready-replica":
            _step(task, jobs, down, t, captured(1100))
        else:
            _step(task, jobs, dep, t, HEALTHY)
        t += dt.timedelta(minutes=10)
    retraining = task["status"]["retraining"]
    assert (retraining["epoch"], retraining.get("scheduleCheckedAt")) == (0, checked)
    p = _step(task, jobs, dep, t, captured(1100))
    retraining = task["status"]["retraining"]
    assert (retraining["epoch"], retraining["reason"]) == (1, "EnoughNewExamples")
    assert (checked, retraining["scheduleCheckedAt"]) == (
        "2026-11-24T01:59:40Z",
        "2026-11-24T04:09:50Z",
    )
    assert "WaitingForSchedule" not in p.status["retraining"]["reason"]
    # The next reconcile trains the new epoch's revision beside the served one.
    later = Observed(task, jobs, dep, t + dt.timedelta(seconds=1), metrics_not_due=True)
    task["status"] = plan(later).status
    assert task["status"]["revision"]["training"] == n.revision_of(task["spec"], 1)
    p = _settled(dataclasses.replace(later, task=task))
    assert any(o["kind"] == "Job" for o in p.apply)


def test_windows_are_judged_no_more_often_than_the_queries_range() -> None:
    """windowSeconds 10 with a 15 s scrape interval: each rate reads 30 s. Judged every 10 s,
    one 30 s latency spike was read by three windows, three breaches (breachWindows 2: a
    fallback). Windows are now judged every 30 s, and usage.windowSeconds says so."""
    task, jobs, dep = _serving_task()  # windowSeconds 10, breachWindows 2
    rng = PromMetrics("http://127.0.0.1:1", scrape_interval_s=15).range_s(10)
    assert rng == 30

    def window(at: dt.datetime, m: Metrics) -> Any:
        due = metrics_due(task, at, rng)
        obs = Observed(
            task, jobs, dep, at, m if due else None, metrics_not_due=not due, min_window_s=rng
        )
        p = plan(obs)
        task["status"] = p.status
        return p

    p = window(NOW, SLOW)  # the spike, as every query within the next 30 s still reads it
    assert p.next_window_s == 30.0
    for s in (10, 20):
        window(NOW + dt.timedelta(seconds=s), SLOW)
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE
    assert task["status"]["live"]["breachStreak"] == 1
    window(NOW + dt.timedelta(seconds=30), HEALTHY)
    assert task["status"]["live"]["breachStreak"] == 0
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE
    assert task["status"]["usage"]["windowSeconds"] == 30
    at = NOW + dt.timedelta(seconds=31)
    _settled(Observed(task, jobs, dep, at, metrics_not_due=True, min_window_s=rng))


class _ShadowCopies:
    """A Prometheus client that answers the agreement queries from shadow copies at given
    times (all agreeing) as Prometheus reads them, and healthy figures otherwise: the counter
    scraped every 5 s (half a second before each judged window), increase() the step from the
    first to the last sample in the range each query names, stretched to the whole range."""

    SCRAPE_S = 5

    def __init__(self, copies: list[dt.datetime], no_latency: Any = None) -> None:
        self.copies = copies
        self.now = NOW
        #: Whether the SLO queries have no sample at a time (no SLM call in their range).
        self.no_latency = no_latency or (lambda at: False)

    def _samples(self, start: dt.datetime) -> list[dt.datetime]:
        """The scrape times in (start, now]."""
        k = math.floor(((start - NOW).total_seconds() + 0.5) / self.SCRAPE_S) + 1
        out = []
        while (at := NOW + dt.timedelta(seconds=k * self.SCRAPE_S - 0.5)) <= self.now:
            out.append(at)
            k += 1
        return out

    def custom_query(self, q: str, **_: Any) -> list[dict[str, Any]]:
        if "capture_records_total" in q:
            return []
        if ("histogram_quantile" in q or "error|timeout" in q) and self.no_latency(self.now):
            return []  # no SLM call in the range: no latency, no error rate
        value = 80.0 if "histogram_quantile" in q else 0.0 if "error|timeout" in q else 1.0
        if "shadow_total" in q:
            amount, unit = re.findall(r"\[(\d+)(ms|s)\]", q)[0]
            span = dt.timedelta(milliseconds=int(amount) * (1 if unit == "ms" else 1000))
            samples = self._samples(self.now - span)
            if len(samples) < 2:
                return []
            seen = [sum(1 for c_ in self.copies if c_ <= at) for at in (samples[0], samples[-1])]
            n_copies = seen[1] - seen[0]
            if "/" in q:
                value = 1.0 if n_copies else math.nan
            else:
                value = n_copies * span / (samples[-1] - samples[0])
        return [{"metric": {}, "value": [0, str(value)]}]


@pytest.mark.parametrize(
    ("copies", "promoted"),
    [
        # One burst of 50 agreeing copies: enough for one window, not for canaryWindows more.
        ([NOW - dt.timedelta(seconds=1)] * 50, False),
        # One copy a second: 20 copies (shadowMinSamples) pool over two 10 s windows.
        ([NOW + dt.timedelta(seconds=s) for s in range(-10, 200)], True),
    ],
    ids=["burst", "steady"],
)
def test_each_shadow_copy_is_judged_in_one_window_only(
    copies: list[dt.datetime], promoted: bool
) -> None:
    """Agreement used to be read over at least 60 s whatever the window: with 10 s windows a
    burst of agreeing copies was read by six windows and promoted a canary on its own. Each
    window now reads the copies since status.live.agreementSince, which moves on only once
    shadowMinSamples copies were judged; fewer are pooled with the next window's."""
    task, jobs, dep = _serving_task()  # windowSeconds 10, shadowMinSamples 20
    prom = PromMetrics("http://127.0.0.1:1", scrape_interval_s=5)
    fake = _ShadowCopies(copies)
    prom.client = fake  # type: ignore[assignment]
    modes = []
    for s in range(0, 150, 10):
        at = NOW + dt.timedelta(seconds=s)
        fake.now = at
        assert metrics_due(task, at, prom.range_s(10))
        m = prom.task_metrics("weather", 10, "agents", agreement_since_s(task, at))
        task["status"] = plan(Observed(task, jobs, dep, at, m, min_window_s=10)).status
        modes.append(task["status"]["route"]["mode"])
    assert modes[0] == ("shadow" if promoted else "canary")  # steady: 10 copies, then 20
    assert ("slm" in modes) is promoted
    live = task["status"]["live"]
    if not promoted:
        assert (live["rolloutMode"], live["canaryHealthyWindows"]) == ("canary", 0)
        assert live["agreementSince"] == NOW.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    else:
        assert modes.index("slm") >= 6  # three canary windows of 20 fresh copies each
    at = NOW + dt.timedelta(seconds=141)
    _settled(Observed(task, jobs, dep, at, metrics_not_due=True, min_window_s=10))


def _judge_windows(
    task: dict[str, Any],
    jobs: dict[str, JobView],
    dep: dict[str, Any],
    fake: _ShadowCopies,
    seconds: range,
) -> list[str]:
    """The route mode after each 10 s window judged at ``NOW + seconds``, on the shadow copies
    ``fake`` answers for, as the reconcile reads them (agreement since agreementSince)."""
    prom = PromMetrics("http://127.0.0.1:1", scrape_interval_s=5)
    prom.client = fake  # type: ignore[assignment]
    modes = []
    for s in seconds:
        at = NOW + dt.timedelta(seconds=s)
        fake.now = at
        m = prom.task_metrics("weather", 10, "agents", agreement_since_s(task, at))
        task["status"] = plan(Observed(task, jobs, dep, at, m, min_window_s=10)).status
        modes.append(task["status"]["route"]["mode"])
    return modes


def test_shadow_copies_stamped_in_the_future_by_a_skewed_leader_do_not_freeze_the_rollout() -> None:
    """A previous leader whose clock ran 10 minutes ahead stamped agreementSince (and
    lastEvaluated) in the future. Read as 0 s of copies, every window read none ("1ms") and
    kept that start, so the shadow rollout stood still until the clock caught up. A start in
    the future now counts as none: the window reads one window back and pools from there."""
    task, jobs, dep = _serving_task()  # windowSeconds 10, shadowMinSamples 20
    fake = _ShadowCopies([NOW + dt.timedelta(seconds=s) for s in range(-10, 200)])  # one a second
    ahead = (NOW + dt.timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    task["status"]["live"].update(agreementSince=ahead, lastEvaluated=ahead)
    modes = _judge_windows(task, jobs, dep, fake, range(0, 150, 10))
    assert "slm" in modes, modes
    assert task["status"]["live"]["agreementSince"] < ahead


def test_copies_a_window_could_not_judge_are_pooled_not_spent() -> None:
    """A window with enough fresh copies but no SLO verdict (no SLM latency sample in its
    short range, common at low traffic) cannot count for a canary; it used to spend the
    copies anyway, so a canary whose windows alternated between "copies, no latency" and
    "latency, too few new copies" never counted a healthy window: the demo stayed at canary.
    Such copies now pool on to the next window that has a verdict."""
    task, jobs, dep = _serving_task()  # windowSeconds 10, shadowMinSamples 20
    copies = [NOW + dt.timedelta(seconds=s) for s in range(-10, 400)]  # one a second
    # The windows whose pool has just reached 20 copies have no latency sample.
    fake = _ShadowCopies(copies, no_latency=lambda at: int((at - NOW).total_seconds()) % 20 == 10)
    modes = _judge_windows(task, jobs, dep, fake, range(0, 400, 10))
    assert "canary" in modes and modes[-1] == "slm", modes


def test_a_reverted_edit_leaves_a_served_revision_whose_pods_are_gone_as_it_passed() -> None:
    """The served revision's trainer pods are garbage-collected (its Jobs stay Complete), an
    edit trains another revision beside it and is reverted. The last status then described
    the other revision, so the served one's pipeline was walked without results: DataReady
    read ResultMissing (a Warning) for good while Ready was True. What is known to serve it
    (its Deployment, status.selectedModel) says each stage passed, as when nothing was
    trained in between."""
    task, jobs, dep = _serving_task()
    served = copy.deepcopy(task["status"])
    gone = {k: dataclasses.replace(v, result=None) for k, v in jobs.items()}
    later = NOW + dt.timedelta(hours=1)
    _step(task, gone, dep, later, None)
    task["spec"]["candidates"][0]["epochs"] = 5
    task["metadata"]["generation"] = 2
    p = _step(task, gone, dep, later + dt.timedelta(minutes=1), None)
    assert p.status["revision"]["training"] not in ("", served["revision"]["active"])
    del task["spec"]["candidates"][0]["epochs"]
    task["metadata"]["generation"] = 3
    at = later + dt.timedelta(minutes=2)
    p = plan(Observed(task, gone, dep, at))
    cs = conds(p.status)
    for type_ in (c.DATA_READY, c.TRAINED, c.EVALUATED):
        assert cs[type_] == conds(served)[type_], type_
    assert cs[c.READY] == (c.TRUE, c.READY_REASON) and p.status["phase"] == "Serving"
    assert not [e for e in p.events if e[0] == "Warning"], p.events
    small = next(x for x in p.status["candidates"] if x["name"] == "small")
    assert small["state"] == SUCCEEDED and small["passedGate"] is True and small["score"] == 0.9
    assert p.status["selectedModel"] == served["selectedModel"]
    assert not training_jobs(p) and p.delete_jobs == []
    task["status"] = json.loads(json.dumps(p.status))
    p = _settled(Observed(task, gone, dep, at + dt.timedelta(hours=5)))
    assert conds(p.status)[c.DATA_READY] == (c.TRUE, c.DATA_PREPARED)


@pytest.mark.parametrize("counted", ["too-few", "none-held-out"])
def test_a_task_waiting_for_data_keeps_waiting_when_its_data_prep_pod_is_gone(
    counted: str,
) -> None:
    """The data-prep Job found too few calls (or none to hold out), and its pod is garbage-
    collected before the recheck: its count can no longer be read. The task used to fail for
    good (JobFailed, or ResultMissing); it is still waiting for data, as the last status
    said, and curates again once the recheck interval has passed."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    finished = NOW - dt.timedelta(seconds=5)
    recheck = dt.timedelta(minutes=5)
    if counted == "too-few":
        res = result("prepare", ok=False, examples=10, message="too few examples")
        why = "PodFailurePolicy: Container trainer failed with exit code 3 matching FailJob rule"
        job = dataclasses.replace(
            view(dn, "prepare", rev, FAILED, res, message=why, finished=finished),
            failure_reason="PodFailurePolicy",
        )
    else:
        res = result("prepare", examples=250, train_examples=250, eval_examples=0)
        job = view(dn, "prepare", rev, SUCCEEDED, res, finished=finished)
    p = plan(Observed(task, {dn: job}, None, NOW, data_recheck=recheck))
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.WAITING_FOR_DATA)
    waiting = next(x for x in p.status["conditions"] if x["type"] == c.DATA_READY)
    task["status"] = json.loads(json.dumps(p.status))

    unread = dataclasses.replace(job, result=None)
    p = _settled(
        Observed(task, {dn: unread}, None, NOW + dt.timedelta(minutes=3), data_recheck=recheck)
    )
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.WAITING_FOR_DATA)
    assert c.find(p.status["conditions"], c.DATA_READY) == waiting  # the count it said stays
    assert p.status["phase"] == "PreparingData" and p.events == []
    assert kinds(p) == [("Job", dn)] and p.delete_jobs == []
    task["status"] = json.loads(json.dumps(p.status))

    p = plan(
        Observed(task, {dn: unread}, None, NOW + dt.timedelta(minutes=6), data_recheck=recheck)
    )
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.WAITING_FOR_DATA)
    assert p.delete_jobs == [dn] and kinds(p) == [] and p.events == []
    assert p.status["phase"] == "PreparingData"


def test_a_crashed_recheck_whose_pod_is_gone_is_still_a_failure() -> None:
    """Only a count stands for itself once its pod is gone: a data-prep Job that used up its
    retries never counted, and fails the revision even while it was waiting for data."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    res = result("prepare", ok=False, examples=10, message="too few examples")
    p = plan(Observed(task, {dn: view(dn, "prepare", rev, FAILED, res)}, None, NOW))
    task["status"] = p.status
    crashed = dataclasses.replace(
        view(dn, "prepare", rev, FAILED, message="BackoffLimitExceeded: last pod Error (exit 1)"),
        failure_reason="BackoffLimitExceeded",
    )
    p = plan(Observed(task, {dn: crashed}, None, NOW + dt.timedelta(minutes=1)))
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.JOB_FAILED)
    assert p.status["phase"] == "Failed"


def test_raising_min_replicas_on_a_task_scaled_to_zero_is_waking_not_an_outage() -> None:
    """A task scaled to zero (minReplicas 0) gets serving.minReplicas 1: its replica starts
    and loads the model, as when calls wake it. Only autoscaling decisions started the
    startup budget, so this start read as an outage (NoReadyReplicas, a Warning, Ready
    False); a replica still not ready past the budget is one."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["minReplicas"] = 0
    idle = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=0.0)
    _step(task, jobs, dep, NOW, idle)

    def replicas(wanted: int, ready: int) -> dict[str, Any]:
        return _with_replicas(dep, wanted, ready)

    t = NOW + dt.timedelta(hours=1)
    _step(task, jobs, replicas(0, 0), t, idle)
    assert conds(task["status"])[c.READY] == (c.TRUE, c.SCALED_TO_ZERO)
    task["spec"]["serving"]["minReplicas"] = 1
    task["metadata"]["generation"] += 1
    for deployed in (replicas(0, 0), replicas(1, 0)):
        t += dt.timedelta(seconds=5)
        p = _step(task, jobs, deployed, t, None)
        assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 1
        cs = conds(p.status)
        assert cs[c.READY] == (c.TRUE, c.WAKING_FROM_ZERO)
        assert cs[c.FALLBACK_ACTIVE] == (c.TRUE, c.WAKING_FROM_ZERO)
        assert p.status["phase"] == "Serving"
        assert not [e for e in p.events if e[0] == "Warning"], p.events
    p = _step(task, jobs, replicas(1, 0), t + dt.timedelta(seconds=WAKE_GRACE_S), None)
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_READY_REPLICAS)


def test_an_invalid_edit_with_nothing_served_routes_to_the_llm_it_names() -> None:
    """Nothing served, and one edit changes the LLM and breaks something else (a candidate on
    another claim). The route was kept as it was, and the gateway, which prefers it over the
    spec, kept calling the old LLM; it follows the spec's LLM. An LLM the gateway would
    refuse is not put on the route: the last one keeps answering."""
    task = make_task()
    task["status"] = plan(Observed(task, {}, None, NOW)).status
    assert task["status"]["route"]["llmModel"] == "gpt-4o"
    task["metadata"]["generation"] = 2
    task["spec"]["fallback"]["llm"].update(
        model="gpt-4.1", price={"prompt": 0.002, "completion": 0.008}
    )
    task["spec"]["candidates"][0]["model"] = "pvc://other-claim/models/smol"
    p = _settled(Observed(task, {}, None, NOW))
    assert conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)
    # the Fallback column says where the calls go (it read Unknown)
    assert conds(p.status)[c.FALLBACK_ACTIVE] == (c.TRUE, c.NO_SERVING_MODEL)
    assert conds(p.status)[c.TRAINED] == (c.UNKNOWN, c.INVALID_SPEC)
    route = p.status["route"]
    assert route["mode"] == "llm" and route["llmModel"] == "gpt-4.1"
    assert route["llmPrice"] == {"prompt": 0.002, "completion": 0.008}
    task["status"] = p.status

    task["spec"]["fallback"]["llm"]["baseURL"] = "https://llm.example.com/v1#chat"
    p = plan(Observed(task, {}, None, NOW))
    assert p.invalid and conds(p.status)[c.READY] == (c.FALSE, c.INVALID_SPEC)
    assert p.status["route"]["llmBaseURL"] == "https://llm.example.com/v1"
    assert p.status["route"]["llmModel"] == "gpt-4.1"


def test_an_llm_the_gateway_would_refuse_never_reaches_a_served_tasks_route() -> None:
    """A served task whose spec's LLM URL is invalid (admitted before the CRD's rule) keeps
    live control, and its route keeps the last usable LLM: the gateway would drop a route
    with this one and fail every call."""
    task, jobs, dep = _serving_task()
    task["spec"]["fallback"]["llm"]["baseURL"] = "https://llm.example.com/v1 "
    p = _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), HEALTHY)
    assert p.invalid and conds(p.status)[c.SERVING][0] == c.TRUE
    assert p.status["route"]["llmBaseURL"] == "https://llm.example.com/v1"


def test_a_candidate_failing_while_others_train_is_named_in_trained_with_one_warning() -> None:
    """small's fine-tune fails (OOM) while big still trains. Trained stayed "1/2 candidates
    finished" and no event said anything, then or once big was done (PartiallyTrained is
    Normal). Trained names the failure at once, and one Warning event is posted for it."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    fs, fb = (n.finetune_job_name("weather", cd, rev) for cd in ("small", "big"))
    big_done = jobs[fb]
    jobs[fs] = view(fs, "finetune", rev, RUNNING, candidate="small")
    jobs[fb] = view(fb, "finetune", rev, RUNNING, candidate="big")
    task["status"] = plan(Observed(task, jobs, None, NOW)).status
    oom = "BackoffLimitExceeded: last pod OOMKilled (exit 137): step 130/400"
    jobs[fs] = view(fs, "finetune", rev, FAILED, candidate="small", message=oom)
    at = NOW + dt.timedelta(minutes=5)
    p = _settled(Observed(task, jobs, None, at))
    trained = c.find(p.status["conditions"], c.TRAINED)
    assert trained is not None and (trained["status"], trained["reason"]) == (
        c.UNKNOWN,
        c.JOB_RUNNING,
    )
    assert "failed: small" in trained["message"] and oom in trained["message"]
    assert [e[:2] for e in p.events] == [("Warning", c.JOB_FAILED)]
    assert "candidate small" in p.events[0][2] and oom in p.events[0][2]
    assert p.status["phase"] == "Training"
    task["status"] = json.loads(json.dumps(p.status))
    jobs[fb] = big_done
    p = plan(Observed(task, jobs, None, at + dt.timedelta(hours=1)))
    assert conds(p.status)[c.TRAINED] == (c.TRUE, c.PARTIALLY_TRAINED)
    assert not [e for e in p.events if e[0] == "Warning"]  # said once, when it failed


def test_the_last_candidate_to_fail_warns_too_and_an_all_failed_revision_warns_once() -> None:
    """The Warning for a failed candidate comes whichever candidate fails last (Trained turns
    PartiallyTrained, a Normal event, in that pass), also when the API server refused a child
    in the same pass; when every candidate failed, Trained's JobFailed Warning names them
    all and no candidate Warning repeats it."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "train")
    fs, fb = (n.finetune_job_name("weather", cd, rev) for cd in ("small", "big"))
    jobs[fb] = view(fb, "finetune", rev, RUNNING, candidate="big")
    task["status"] = plan(Observed(task, jobs, None, NOW)).status
    jobs[fb] = view(fb, "finetune", rev, FAILED, candidate="big", message="DeadlineExceeded")
    p = plan(Observed(task, jobs, None, NOW))
    assert conds(p.status)[c.TRAINED] == (c.TRUE, c.PARTIALLY_TRAINED)
    assert ("Warning", c.JOB_FAILED) in [e[:2] for e in p.events]
    refused = with_apply_failures(task, p, [("Job", "weather-export", "quota")], NOW)
    assert ("Warning", c.JOB_FAILED) in [e[:2] for e in refused.events]

    jobs[fs] = view(fs, "finetune", rev, FAILED, candidate="small", message="OOMKilled")
    p = plan(Observed(task, jobs, None, NOW))
    assert conds(p.status)[c.TRAINED] == (c.FALSE, c.JOB_FAILED)
    assert [e[:2] for e in p.events if e[0] == "Warning"] == [("Warning", c.JOB_FAILED)]
    assert p.events[0][2].startswith("Trained=False")


def test_switching_a_served_task_to_the_direct_rollout_serves_the_slm_without_metrics() -> None:
    """Without Prometheus a progressive rollout stays at shadow, and the docs say to use
    ``rollout.strategy: direct`` then. The edit left a served task in shadow for good (only
    a task created with it, or a new revision, went direct): it applies at the next pass."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    jobs, dep = jobs_through(task, "export"), deployment(rev)
    task["status"] = plan(Observed(task, jobs, dep, NOW)).status
    assert task["status"]["route"]["mode"] == "shadow"
    task["spec"]["rollout"] = {"strategy": "direct"}
    task["metadata"]["generation"] = 2
    p = plan(Observed(task, jobs, dep, NOW + dt.timedelta(minutes=1), None))
    assert (p.status["route"]["mode"], p.status["live"]["rolloutReason"]) == (
        "slm",
        "DirectRollout",
    )
    assert not training_jobs(p)  # nothing retrained


def test_calls_captured_while_a_retraining_trains_still_count_across_a_gateway_restart() -> None:
    """The count was frozen while a revision trained: a gateway restarted meanwhile (a chart
    upgrade during hours of training) lost every call captured since the trigger, and the
    next retraining waited for minNewExamples all over again. The count goes on; only the
    trigger waits for the revision to conclude."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100}
    rev0, rev1 = n.revision_of(task["spec"]), n.revision_of(task["spec"], 1)
    t = NOW
    for total in (1000, 1100):  # baseline, then the trigger
        _step(task, jobs, dep, t, captured(total))
        t += dt.timedelta(seconds=10)
    assert task["status"]["retraining"]["epoch"] == 1
    for m in (captured(2000), captured(4100), captured(30, "b")):  # 3000, then a restart
        _step(task, jobs, dep, t, m)
        t += dt.timedelta(seconds=10)
        assert task["status"]["retraining"]["epoch"] == 1  # nothing starts meanwhile
        assert task["status"]["revision"]["training"] == rev1
        # enough for the next retraining, which waits for this one to conclude
        assert task["status"]["retraining"]["reason"] == "WaitingForRevision"
    lost = {**jobs, **retrained_jobs(task, rev0, rev1, scores=(0.88, 0.85))}
    _step(task, lost, dep, t, captured(40, "b"))  # concluded: it lost to the served model
    r = task["status"]["retraining"]
    assert r["epoch"] == 2 and r["reason"] == "EnoughNewExamples"  # the 3000 counted


def test_many_gateway_rollouts_do_not_grow_the_status_without_bound() -> None:
    """Every rollout brings new counter series; gone ones are remembered only while there is
    room, the ones read this window always."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 10_000, "enabled": True}
    for i in range(40):
        m = captured_by({"steady": 100 + i, f"rollout-{i}": 1})
        _step(task, jobs, dep, NOW + dt.timedelta(seconds=10 * i), m)
    r = task["status"]["retraining"]
    assert len(r["gatewayCounters"]) == lv.MAX_REMEMBERED_COUNTERS
    # read this window first, then the gone ones most recently read first
    expected = ["steady", "rollout-39", *(f"rollout-{i}" for i in range(38, 8, -1))]
    assert [c["series"] for c in r["gatewayCounters"]] == expected
    assert r["newRecords"] == 39 + 39  # steady's gains, and each new series' one record


def test_a_window_without_a_captured_count_keeps_the_retraining_reason() -> None:
    """A restarted gateway that has captured nothing yet has no series: the reason flipped to
    RetrainingIdle, which reads as "off", and back at the next window."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100}
    t = NOW
    reasons = []
    for m in (captured(1000), captured(1050), HEALTHY, captured(1060)):
        _step(task, jobs, dep, t, m)
        reasons.append(task["status"]["retraining"]["reason"])
        t += dt.timedelta(seconds=10)
    assert reasons == ["CountingNewExamples"] * 4


def test_a_direct_rollout_holds_one_reason_while_earlier_pods_answer() -> None:
    """A due window said WaitingForNewReplicas and the pass between windows DirectRollout:
    the status was written anew on every pass of every rolling update."""
    task = make_task()
    task["spec"]["fallback"]["policy"] = {"windowSeconds": 10}
    task["spec"]["rollout"] = {"strategy": "direct"}
    rev = n.revision_of(task["spec"])
    jobs = jobs_through(task, "export")
    task["status"] = plan(Observed(task, jobs, deployment(rev), NOW)).status
    dep = _with_replicas(deployment(rev), 2, 2)
    dep["status"]["updatedReplicas"] = 1  # one pod of an earlier template still answers
    reasons = set()
    for i in range(4):
        at = NOW + dt.timedelta(seconds=30 + 10 * (i // 2) + (3 if i % 2 else 0))
        p = plan(Observed(task, jobs, dep, at, HEALTHY if i % 2 == 0 else None))
        task["status"] = p.status
        reasons.add(p.status["live"]["rolloutReason"])
    assert reasons == {"WaitingForNewReplicas"}


def test_a_spec_edits_revision_starts_the_count_of_new_examples_again() -> None:
    """Calls counted before a spec edit are in its revision's data: counted on, they started a
    retraining as soon as that revision was promoted, on little more than it trained on."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "enabled": True}
    _step(task, jobs, dep, NOW, captured(1000))
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), captured(1090))
    assert task["status"]["retraining"]["newRecords"] == 90
    task["metadata"]["generation"] = 2
    task["spec"]["candidates"][0]["epochs"] = 5  # a new revision, trained and exported
    new_rev = n.revision_of(task["spec"])
    jobs = {**jobs, **jobs_through(task, "export")}
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=20), captured(1095))
    assert task["status"]["revision"]["active"] == new_rev
    assert task["status"]["retraining"]["newRecords"] == 0
    _step(task, jobs, deployment(new_rev), NOW + dt.timedelta(seconds=30), captured(1110))
    r = task["status"]["retraining"]
    assert (r["epoch"], r["newRecords"], r["reason"]) == (0, 15, "CountingNewExamples")


def test_enough_new_examples_behind_a_failed_spec_edit_say_what_holds_the_retraining() -> None:
    """A spec edit whose revision fails holds S6 until the spec is fixed (a retraining would
    train that spec again); the reason said CountingNewExamples with the count long past
    minNewExamples."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "enabled": True}
    _step(task, jobs, dep, NOW, captured(1000))
    task["metadata"]["generation"] = 2
    task["spec"]["candidates"][0]["epochs"] = 5
    new_rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", new_rev)
    failed = {**jobs, dn: view(dn, "prepare", new_rev, FAILED, None)}
    for i, total in enumerate((1050, 1200, 1300)):
        _step(task, failed, dep, NOW + dt.timedelta(seconds=10 * (i + 1)), captured(total))
    r = task["status"]["retraining"]
    assert (r["epoch"], r["newRecords"], r["reason"]) == (0, 250, "WaitingForRevision")
    assert task["status"]["revision"]["training"] == new_rev


def _api_server_sorted(task: dict[str, Any]) -> None:
    """``task`` as the API server returns it: every map's keys sorted (Go's JSON encoding)."""
    task["status"] = json.loads(json.dumps(task["status"], sort_keys=True))


def test_the_series_forgotten_first_are_those_gone_longest_whatever_their_hash() -> None:
    """The readings were a map, and the API server returns a map's keys sorted: once full,
    the gone series forgotten were those of the smallest hash, a series gone a moment ago
    among them, whose next reading then counted whole."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 10_000, "enabled": True}
    old = {f"a{i:02d}": 1 for i in range(lv.MAX_REMEMBERED_COUNTERS)}  # gone since
    t = NOW
    for m in (captured_by({**old, "z": 1}), captured_by({"x": 50}), captured_by({"x": 50})):
        _step(task, jobs, dep, t, m)
        _api_server_sorted(task)
        t += dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, captured_by({"y": 5}))  # x gone a window: still remembered
    _api_server_sorted(task)
    _step(task, jobs, dep, t + dt.timedelta(seconds=10), captured_by({"x": 60, "y": 5}))
    assert task["status"]["retraining"]["newRecords"] == 50 + 5 + 10


def test_a_spec_edit_that_starts_the_count_again_says_counting_not_waiting() -> None:
    """Enough new examples while a revision trained said WaitingForRevision; a spec edit then
    started the count again, and the reason kept saying it was enough for the whole training
    of the new revision."""
    task, jobs, dep = _serving_task()
    task["spec"]["retraining"] = {"minNewExamples": 100, "enabled": True}
    _step(task, jobs, dep, NOW, captured(1000))
    task["metadata"]["generation"] = 2
    task["spec"]["candidates"][0]["epochs"] = 5
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=10), captured(1010))  # training starts
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=20), captured(1200))
    assert task["status"]["retraining"]["reason"] == "WaitingForRevision"
    task["metadata"]["generation"] = 3
    task["spec"]["candidates"][0]["epochs"] = 6  # edited again while it trains
    _step(task, jobs, dep, NOW + dt.timedelta(seconds=30), captured(1230))
    r = task["status"]["retraining"]
    assert (r["newRecords"], r["reason"]) == (0, "CountingNewExamples")


def _micro(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize(
    ("stamp", "read"),
    [
        ("2026-11-23t12:00:00z", True),  # lowercase: the API server's date-time check takes it
        ("2026-11-23T12:00:00", True),  # no zone: UTC
        ("2026-11-23T13:00:00+01:00", True),
        ("yesterday", False),  # what an older CRD without the format let anyone write
        ("", False),
    ],
    ids=["lowercase", "zoneless", "offset", "garbage", "empty"],
)
def test_a_status_time_another_tool_wrote_is_read_or_replaced_never_a_crash(
    stamp: str, read: bool
) -> None:
    """A status time written by another client (kubectl edit --subresource=status, a backup
    tool) ending in a lowercase "z" raised ValueError in every reconcile of the task: live
    control, its conditions and its status stood still for good. Such a time is read as the
    time it says (no zone: UTC); one that is no time at all counts as absent, and the next
    write replaces it."""
    task, jobs, dep = _serving_task()  # windowSeconds 10
    task["spec"]["retraining"] = {"minNewExamples": 100, "schedule": "0 2 * * *"}
    _step(task, jobs, dep, NOW - dt.timedelta(seconds=10), captured(1000))
    for key in ("lastEvaluated", "agreementSince", "lastScaleTime"):
        task["status"]["live"][key] = stamp
    task["status"]["retraining"]["scheduleCheckedAt"] = stamp
    # Read: the window judged at NOW is the last one (not due 5 s later); absent: due.
    assert metrics_due(task, NOW + dt.timedelta(seconds=5)) is not read
    busy = dataclasses.replace(captured(1010), request_rate=35)
    t = NOW + dt.timedelta(seconds=10)
    p = _step(task, jobs, dep, t, busy)
    assert conds(p.status)[c.SLO_MET] == (c.TRUE, c.WITHIN_SLO)
    assert task["status"]["live"]["lastEvaluated"] == _micro(t)
    assert next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"] == 3
    assert task["status"]["live"]["lastScaleTime"] == _micro(t)
    assert task["status"]["retraining"]["scheduleCheckedAt"] == _ts(t)
    _settled(Observed(task, jobs, dep, t + dt.timedelta(seconds=1), metrics_not_due=True))


def _ts(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(("back", "due"), [(3, False), (300, True)])
def test_a_window_stamped_by_a_clock_a_little_ahead_is_not_judged_again_at_once(
    back: int, due: bool
) -> None:
    """The clock stepped back a few seconds (an NTP correction, or a new leader a little
    behind the old): lastEvaluated was in the future, which counted as due at once, so the
    next reconcile judged a second window on the same samples, and one latency spike made
    breachWindows (2) breached windows: fallback on. A stamp less than a window ahead is
    taken at its word; one further ahead is a badly skewed clock's, due at once, or live
    control would stand still for as long as the skew."""
    task, jobs, dep = _serving_task()  # windowSeconds 10, breachWindows 2
    _step(task, jobs, dep, NOW, HEALTHY)
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, dep, t, SLOW)  # one spike: 1 of 2 breached windows
    later = t + dt.timedelta(seconds=1) - dt.timedelta(seconds=back)
    assert metrics_due(task, later) is due
    p = _step(task, jobs, dep, later, SLOW)  # Prometheus still shows the same spike
    live = task["status"]["live"]
    if due:
        assert live["lastEvaluated"] == _micro(later)
        return
    assert live["breachStreak"] == 1
    assert conds(task["status"])[c.FALLBACK_ACTIVE][0] == c.FALSE
    assert p.next_window_s == pytest.approx(12.0)  # a window after the stamp
    assert not metrics_due(task, t + dt.timedelta(seconds=9))
    assert metrics_due(task, t + dt.timedelta(seconds=10))


def test_a_scale_up_is_not_made_twice_on_one_burst_by_a_clock_stepped_back() -> None:
    """maxStep 2: one burst raised the replicas by 2, and a reconcile a second later whose
    clock had stepped back 3 s judged the burst again and raised them by 2 more."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["maxReplicas"] = 8
    task["spec"]["serving"]["scaling"] = {"maxStep": 2}
    burst = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=75)
    seen = []
    for at in (NOW + dt.timedelta(seconds=10), NOW + dt.timedelta(seconds=8)):
        p = _step(task, jobs, dep, at, burst)
        seen.append(next(o for o in p.apply if o["kind"] == "Deployment")["spec"]["replicas"])
    assert seen == [3, 3]


@pytest.mark.parametrize(
    ("skew", "waking"),
    [(dt.timedelta(0), True), (dt.timedelta(minutes=-2), True), (dt.timedelta(minutes=-11), False)],
    ids=["same-clock", "2-min-behind", "11-min-behind"],
)
def test_a_wake_from_zero_stamped_by_a_clock_ahead_is_still_a_wake(
    skew: dt.timedelta, waking: bool
) -> None:
    """A leader wakes a task scaled to zero and fails over; the new leader's clock is behind,
    so lastScaleTime is in its future. That read as no wake-up at all: Ready False
    NoReadyReplicas and a Warning while the replica loaded the model. A stamp up to the
    startup budget ahead counts as just scaled; one further ahead is a badly skewed clock's,
    which must not hide an outage for as long as the skew."""
    task, jobs, dep = _serving_task()
    task["spec"]["serving"]["minReplicas"] = 0
    idle = Metrics(p95_latency_ms=80, error_rate=0.0, request_rate=0.0)
    _step(task, jobs, dep, NOW, idle)
    t = NOW + dt.timedelta(seconds=10)
    _step(task, jobs, _with_replicas(dep, 0, 0), t, idle)
    t += dt.timedelta(seconds=10)
    _step(task, jobs, _with_replicas(dep, 0, 0), t, Metrics(request_rate=5.0))  # wakes it
    assert task["status"]["live"]["lastScaleTime"] == _micro(t)
    p = _step(task, jobs, _with_replicas(dep, 1, 0), t + dt.timedelta(seconds=20) + skew, None)
    warnings = [e[1] for e in p.events if e[0] == "Warning"]
    if waking:
        assert conds(p.status)[c.READY] == (c.TRUE, c.WAKING_FROM_ZERO)
        assert warnings == []
    else:
        assert conds(p.status)[c.READY] == (c.FALSE, c.NO_READY_REPLICAS)


@pytest.mark.parametrize(("ahead", "server_later", "rerun"), [(6, 0, False), (6, 5, True)])
def test_a_data_recheck_is_timed_on_the_api_servers_clock(
    ahead: int, server_later: int, rerun: bool
) -> None:
    """A Job's finish time is the control plane's clock; the recheck was timed on the
    operator's, so an operator node 5+ minutes ahead re-ran data prep back to back. The API
    server's clock (the Date of its Jobs list, Observed.server_now) times it."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    short = result("prepare", ok=False, examples=37, message="too few examples after curation")
    jobs = {dn: view(dn, "prepare", rev, FAILED, short, finished=NOW - dt.timedelta(seconds=10))}
    server = NOW + dt.timedelta(minutes=server_later)
    p = plan(
        Observed(
            task,
            jobs,
            None,
            NOW + dt.timedelta(minutes=ahead),
            data_recheck=dt.timedelta(minutes=5),
            server_now=server,
        )
    )
    assert p.delete_jobs == ([dn] if rerun else [])
    assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.WAITING_FOR_DATA)


@pytest.mark.parametrize(("server_later", "missing"), [(0, False), (3, True)])
def test_a_just_succeeded_jobs_result_is_awaited_on_the_api_servers_clock(
    server_later: int, missing: bool
) -> None:
    """An operator node 2+ minutes ahead of the control plane turned a Job that had just
    succeeded (its result not read yet) into ResultMissing and the task Failed."""
    task = make_task()
    rev = n.revision_of(task["spec"])
    dn = n.data_job_name("weather", rev)
    jobs = {dn: view(dn, "prepare", rev, SUCCEEDED, None, finished=NOW - dt.timedelta(seconds=2))}
    server = NOW + dt.timedelta(minutes=server_later)
    p = plan(Observed(task, jobs, None, NOW + dt.timedelta(minutes=3), server_now=server))
    if missing:
        assert conds(p.status)[c.DATA_READY] == (c.FALSE, c.RESULT_MISSING)
    else:
        assert conds(p.status)[c.DATA_READY] == (c.UNKNOWN, c.AWAITING_RESULT)
        assert p.status["phase"] == "PreparingData"
        assert [e for e in p.events if e[0] == "Warning"] == []
