"""The reconcile decision, as a pure function: observed state in, desired children and status out.

``plan(observed)`` answers three questions for one AgentTask: which children should exist
(built by :mod:`slm_operator.builders`), which stale Jobs should go, and what the status
should say. Nothing here talks to the API server, so every phase of the task's life (data
prep, training, the gate, export, serving, a new revision beside a serving one) is unit-tested
on plain dicts.

The life of a revision: data-prep Job → one fine-tune Job per candidate → the gate picks a
candidate → export Job writes the Triton model repository → the Triton Deployment is pointed
at it. The Deployment's annotations record which revision it serves; that observed fact, not
memory, tells the planner what is active (only when the Deployment is gone does the last
status's ``revision.active`` stand in, so that it is rebuilt rather than replaced). A new
revision trains beside the active one and replaces it only after passing the gate and
exporting.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slm_contract import ContractError, TrainerResult, http_url_problem
from slm_operator import builders as b
from slm_operator import conditions as c
from slm_operator import live as lv
from slm_operator import naming as n
from slm_operator.live import FallbackState, Metrics, Rollout
from slm_operator.observe import (
    FAILED,
    NEVER_RAN,
    PENDING,
    RUNNING,
    SUCCEEDED,
    JobView,
    never_ran_message,
    parse_time,
    short_message,
)

#: How long a succeeded Job may lack a readable result before we call it ResultMissing; the
#: Job controller can mark a Job complete a moment before the pod's message is visible.
RESULT_GRACE = dt.timedelta(seconds=120)

PHASE_PENDING = "Pending"
PHASE_PREPARING = "PreparingData"
PHASE_TRAINING = "Training"
PHASE_EVALUATING = "Evaluating"
PHASE_EXPORTING = "Exporting"
PHASE_DEPLOYING = "Deploying"
PHASE_SERVING = "Serving"
PHASE_FAILED = "Failed"
#: Every phase, in life-cycle order (the CRD's enum).
PHASES = (
    PHASE_PENDING,
    PHASE_PREPARING,
    PHASE_TRAINING,
    PHASE_EVALUATING,
    PHASE_EXPORTING,
    PHASE_DEPLOYING,
    PHASE_SERVING,
    PHASE_FAILED,
)

Obj = dict[str, Any]

#: The longest condition message and ``status.message``. Each is read in ``kubectl describe``
#: (Ready's in ``kubectl get`` too), and with eight failed candidates, each quoting its pod,
#: Trained, Ready and the phase message reached 3.7 KiB.
MESSAGE_LIMIT = 1024
#: The most a list of candidates (those that failed, those whose pod waits) takes of Trained's
#: message while the other list is there too; alone, twice as much.
CANDIDATE_LIST_LIMIT = 448
_CUT_SHORT = " (cut short: status.candidates has each one's message)"


def _capped(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis when it is longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(parts: Sequence[str], limit: int = CANDIDATE_LIST_LIMIT) -> str:
    """``parts`` (one per candidate) joined, in ``limit`` characters at most.

    Why each part is cut to its share rather than the whole cut at the end: every candidate
    stays named with the start of its reason, and ``status.candidates`` has the rest.
    """
    text = "; ".join(parts)
    if len(text) <= limit:
        return text
    room = limit - len(_CUT_SHORT)
    share = max(room // max(len(parts), 1) - 2, 24)
    return _capped("; ".join(_capped(x, share) for x in parts), room) + _CUT_SHORT


@dataclass(frozen=True)
class Observed:
    task: Mapping[str, Any]
    jobs: Mapping[str, JobView]
    deployment: Mapping[str, Any] | None
    now: dt.datetime
    #: This window's live metrics; None when Prometheus is not configured, did not answer, or
    #: was not asked (``metrics_not_due``).
    metrics: Metrics | None = None
    #: The ServiceAccount trainer pods run as unless the task names its own; empty when the
    #: operator has none configured or it does not exist in the task's namespace.
    trainer_service_account: str = ""
    #: How long after a data-prep Job found too few examples it runs again (the gateway keeps
    #: capturing meanwhile).
    data_recheck: dt.timedelta = dt.timedelta(minutes=5)
    #: Why a Triton pod of the task is not ready (unschedulable, image pull, crash loop), in
    #: the scheduler's or kubelet's words; empty when none is stuck.
    serving_waiting: str = ""
    #: ServiceAccounts spec.training.serviceAccountName may not name (the operator's and the
    #: gateway's): the trainer runs an image the task's author chose, with its permissions.
    reserved_accounts: frozenset[str] = frozenset()
    #: The trainer and Triton images of tasks that name none, and the Secrets listed as
    #: imagePullSecrets of those pods (the chart's imagePullSecrets): a private registry.
    images: b.Images = b.DEFAULT_IMAGES
    #: Prometheus was not asked because this window was already judged
    #: (:func:`metrics_due` was False): the last judgement stands as it is, which is not the
    #: same as "Prometheus did not answer" (MetricsUnavailable).
    metrics_not_due: bool = False
    #: The shortest window the metrics source measures without re-reading counter steps (two
    #: Prometheus scrape intervals: :meth:`slm_operator.prom.PromMetrics.range_s`); windows
    #: are judged every ``max(windowSeconds, min_window_s)`` (:func:`metrics_due`).
    min_window_s: float = 0.0
    #: The Deployment this pass built was not written (refused for good, or the API server
    #: busy): a revision exported since is not promoted. What the Deployment serves is still
    #: the revision that status names, whose Jobs are kept (see :func:`plan`).
    deployment_refused: bool = False
    #: Whether the operator has a Prometheus to ask (SLM_FLEET_PROMETHEUS_URL); None when the
    #: caller does not say. Without one, live control is off: SLOMet and Ready say so, where
    #: they said "no live metrics yet" and "until a canary starts" for good.
    prometheus_configured: bool | None = None
    #: The API server's clock when it listed the task's Jobs (the Date of its answer); None
    #: when not known (``now`` stands in). Job times (finished, completed) are the control
    #: plane's clock, so the time since a Job finished is measured on it: on the operator's,
    #: a node a few minutes ahead ran data prep again back to back, and failed a Job that had
    #: just succeeded for a result not read yet (ResultMissing).
    server_now: dt.datetime | None = None
    #: The kinds ("Deployment", "Service") whose object of the task's serving name exists and
    #: is not this task's (:func:`slm_operator.observe.task_child`): a user's or a Helm
    #: chart's. The operator does not apply those: server-side apply with force would take
    #: one over, and the garbage collector delete it with the task. Nor does it route calls
    #: to such a Service (:func:`_service_taken`). One a deleted task of the same name left
    #: is not among them (:func:`slm_operator.observe.earlier_incarnation`).
    foreign_children: frozenset[str] = frozenset()


@dataclass
class Plan:
    apply: list[Obj] = field(default_factory=list)
    delete_jobs: list[str] = field(default_factory=list)
    status: Obj = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    invalid: str | None = None
    #: Seconds until this task's next live-control window is due, while a model is served;
    #: the operator reconciles it then (see :func:`next_window_s`).
    next_window_s: float | None = None


@dataclass
class _Step:
    """Outcome of the training pipeline of one revision."""

    data: tuple[str, str, str]
    trained: tuple[str, str, str]
    evaluated: tuple[str, str, str]
    phase: str
    candidates: list[Obj]
    terminal_failure: bool = False
    selected: Obj | None = None
    exported_uri: str | None = None
    #: Why the export has not started: its Job of the same name is still being deleted.
    export_waiting: str = ""
    #: Jobs of this revision to delete: finished ones so that the next pass creates them
    #: again, and exports of a candidate no longer chosen.
    rerun_jobs: list[str] = field(default_factory=list)


def _ts(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reported(score: float) -> float:
    """A score as status shows it (selectedModel.score), 4 decimal places."""
    return round(score, 4)


def _micro_ts(now: dt.datetime) -> str:
    """RFC 3339 with microseconds (like metav1.MicroTime), for ``status.live.lastEvaluated``.

    Why: windows are judged when at least ``windowSeconds`` have passed since the last one.
    A time truncated to whole seconds makes a window look up to a second longer than it was,
    so with short windows two evaluations could land barely more than a second apart.
    """
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def validate(task: Mapping[str, Any], reserved_accounts: Collection[str] = ()) -> str | None:
    """Rules the CRD's schema and CEL cannot express; None when the spec is usable.

    ``reserved_accounts``: the operator's and the gateway's ServiceAccounts, which a task may
    not run its trainer as (the chart's admission policy refuses them too, where installed).
    """
    problem = n.task_name_problem(task["metadata"]["name"])
    if problem:
        return problem
    spec = task["spec"]
    account = (spec.get("training") or {}).get("serviceAccountName")
    if account and account in reserved_accounts:
        return (
            f"training.serviceAccountName {account} is the ServiceAccount of the slm-fleet "
            "operator or gateway: the trainer runs the task's image, which must not get their "
            "permissions; name an account of its own (or none, for the trainer account)"
        )
    claim = spec["storage"]["claimName"]
    for cand in spec["candidates"]:
        model = cand["model"]
        if model.startswith("pvc://") and not model.startswith(f"pvc://{claim}/"):
            return (
                f"candidate {cand['name']}: model {model} is on another PVC than "
                f"storage.claimName {claim}; trainer pods mount only the storage claim"
            )
    base_url = str(((spec.get("fallback") or {}).get("llm") or {}).get("baseURL") or "")
    why = http_url_problem(base_url)
    if why:
        # The CRD's rules refuse these URLs, but a task admitted before them keeps its URL
        # (ratcheting): the gateway would drop its route and fail every call, so training
        # for it would be wasted GPU time. The URL itself may hold a key: not quoted.
        return f"fallback.llm.baseURL cannot be used by the gateway: {why}"
    schedule = (spec.get("retraining") or {}).get("schedule")
    if schedule:
        # The CRD's rule refuses most bad schedules, but one admitted before it (or that a
        # pattern cannot judge) would otherwise raise at every metrics window, freezing live
        # control; here it is a condition the user can read.
        why = lv.cron_problem(str(schedule))
        if why:
            return f"retraining.schedule {schedule!r} is not a valid cron expression: {why}"
    return None


def answers_no_call(result: TrainerResult) -> bool:
    """Whether a result says its candidate answers no call: score 0 at threshold 1.0.

    The contract has no coverage field; this is how the finetune stage reports a candidate
    whose confidence reached ``targetPrecision`` at no threshold (``metrics.gate_score`` of
    no point, and the threshold 1.0), and a score of 0 means no call it answers is right.
    """
    return result.score == 0.0 and result.threshold is not None and result.threshold >= 1.0


def gate_verdict(result: TrainerResult, gate: Mapping[str, Any]) -> tuple[bool, str]:
    """Does a candidate pass the gate? Returns the verdict and a one-line reason.

    A candidate that answers no call never passes, whatever the gate: ``minScore: 0`` or
    ``maxDropVsLLM: 1`` let it through, and the operator then exported and served a model
    that hands every call back to the LLM (the evaluate stage refuses it too).
    """
    score = result.score
    if score is None:
        return False, "reported no score"
    if answers_no_call(result):
        return False, (
            "answers no call (score 0 at threshold 1.0: no confidence threshold reached "
            "targetPrecision), so every call would go to the LLM"
        )
    parts = []
    ok = True
    if gate.get("minScore") is not None:
        good = score >= float(gate["minScore"]) - 1e-12
        ok &= good
        parts.append(f"score {_fmt(score)} {'>=' if good else '<'} minScore {gate['minScore']}")
    if gate.get("maxDropVsLLM") is not None:
        llm = result.llm_score if result.llm_score is not None else 1.0
        drop = llm - score
        good = drop <= float(gate["maxDropVsLLM"]) + 1e-12
        ok &= good
        parts.append(
            f"drop vs LLM {_fmt(drop)} {'<=' if good else '>'} maxDropVsLLM {gate['maxDropVsLLM']}"
        )
    return ok, "; ".join(parts)


def select(
    passing: Sequence[tuple[Mapping[str, Any], TrainerResult]], policy: str
) -> tuple[Mapping[str, Any], TrainerResult] | None:
    """Pick the candidate to promote among those that passed the gate.

    ``smallest-passing`` (default) prefers fewer parameters, the paper's point being that the
    smallest adequate model is the cheapest to serve; ties go to the higher score.
    ``best-score`` prefers the higher score; ties go to the smaller model.
    """
    if not passing:
        return None

    def params(r: TrainerResult) -> float:
        return float(r.parameters) if r.parameters is not None else math.inf

    def score(r: TrainerResult) -> float:
        return r.score or 0.0

    if policy == "best-score":
        return min(passing, key=lambda p: (-score(p[1]), params(p[1]), p[0]["name"]))
    return min(passing, key=lambda p: (params(p[1]), -score(p[1]), p[0]["name"]))


def limit_raised(view: JobView | None, task: Mapping[str, Any]) -> bool:
    """Whether a Job that failed on its time limit or its retries would not have failed under
    the task's limits now, so that it runs again.

    Why: the limits are not part of the revision (editing one trains nothing), and a failed
    Job never starts again, so a raised ``activeDeadlineSeconds`` or ``backoffLimit`` was
    applied to the failed Job and changed nothing: the task stayed Failed until the Job was
    deleted by hand. A fine-tune run again resumes from its checkpoints. Only for the
    revision being trained (a served revision's Jobs are never run again), and not for a
    retraining beside a served model that already concluded: the next one runs with it.
    """
    if view is None or view.state != FAILED:
        return False
    deadline, retries = b.job_limits(task)
    if view.failure_reason == "DeadlineExceeded":
        return view.seconds is not None and deadline > view.seconds
    if view.failure_reason == "BackoffLimitExceeded":
        return 0 < view.failed_pods <= retries
    return False


#: The most of the data-prep Job's own message (curate's) a WaitingForData condition quotes.
CURATE_SAID_MAX = 300


def _curate_said(result: TrainerResult) -> str:
    """What curate said of the calls it read, for a WaitingForData message, or "".

    Why: the counts alone read as "no calls yet" whatever the cause, while curate names the
    folder it found no call log in (a dataset.uri with a typo waits for good) or why it
    rejected the records it read (another schema version, say). Its message is the same on
    every recheck of the same calls, so the condition does not flap; it is cut short, as it
    may be long, and it stays before the recheck time, whose words end every such message.
    """
    said = short_message(result.message, CURATE_SAID_MAX) if result.message else ""
    return f"; the data-prep Job said: {said}" if said else ""


def _job_outcome(view: JobView | None, now: dt.datetime) -> tuple[str, str, str]:
    """(status, reason, message) of one trainer Job in condition terms."""
    if view is not None and view.deleting:
        return c.UNKNOWN, c.JOB_PENDING, view.waiting  # "waiting for Job x to be deleted"
    if view is not None and view.waiting:
        return c.UNKNOWN, c.JOB_PENDING, f"Job {view.name} is waiting: {view.waiting}"
    if view is None or view.state == PENDING:
        return c.UNKNOWN, c.JOB_PENDING, "Job created, waiting for its pod to run"
    if view.state == RUNNING:
        pct = f" ({view.progress}%)" if view.progress is not None else ""
        return c.UNKNOWN, c.JOB_RUNNING, f"Job {view.name} is running{pct}"
    if view.state == FAILED:
        return c.FALSE, c.JOB_FAILED, f"Job {view.name} failed: {view.message}"
    if view.result_error:
        return (
            c.FALSE,
            c.RESULT_MISSING,
            f"Job {view.name} reported an invalid result: {view.result_error}",
        )
    if view.result is None:
        if view.finished_at is None or now - view.finished_at < RESULT_GRACE:
            return c.UNKNOWN, c.AWAITING_RESULT, f"Job {view.name} succeeded; reading its result"
        return (
            c.FALSE,
            c.RESULT_MISSING,
            (
                f"Job {view.name} succeeded but its pod reported no result in its termination "
                "message"
            ),
        )
    if not view.result.ok:
        return c.FALSE, c.JOB_FAILED, f"Job {view.name} reported failure: {view.result.message}"
    return c.TRUE, "", ""


def _candidate_entry(
    cand: Mapping[str, Any], revision: str, job: str, view: JobView | None, passed: bool | None
) -> Obj:
    state = PENDING if view is None else view.state
    r = view.result if view is not None else None
    entry: Obj = {"name": cand["name"], "revision": revision, "job": job, "state": state}
    if view is not None and view.state == SUCCEEDED and (r is None or not r.ok):
        entry["state"] = FAILED if (r is not None or view.result_error) else SUCCEEDED
    if r is not None:
        for key, value in (
            ("score", r.score),
            ("llmScore", r.llm_score),
            ("parameters", r.parameters),
            ("trainingSeconds", r.train_seconds),
        ):
            if value is not None:
                entry[key] = round(value, 4) if isinstance(value, float) else value
    if "trainingSeconds" not in entry and view is not None and view.seconds is not None:
        entry["trainingSeconds"] = round(view.seconds, 1)
    if passed is not None:
        entry["passedGate"] = passed
    if view is not None and view.state == SUCCEEDED and r is not None and r.ok:
        entry["result"] = _result_record(r)
    if state == SUCCEEDED:
        entry["progress"] = 100
    elif view is not None and view.progress is not None:
        entry["progress"] = view.progress
    else:
        entry["progress"] = 0
    msg = (
        view.message
        if view is not None and view.state == FAILED
        else (view.result_error or view.waiting)
        if view is not None
        else ""
    )
    if msg:
        entry["message"] = msg
    return entry


#: The fields of a fine-tune result that the later steps read (the gate, the choice, the
#: export), as ``status.candidates[].result`` names them.
_RECORDED_FIELDS = (
    ("score", "score"),
    ("llmScore", "llm_score"),
    ("parameters", "parameters"),
    ("threshold", "threshold"),
    ("artifactURI", "artifact_uri"),
)


def _result_record(r: TrainerResult) -> Obj:
    """What ``status.candidates[].result`` keeps of a fine-tune result that was read.

    Why exact values (the entry's own ``score`` is rounded for reading): the record stands for
    the result once its pod is gone, and a rounded score could pass a gate the real one did
    not, or change which candidate is chosen under a running export.
    """
    values = ((key, getattr(r, attr)) for key, attr in _RECORDED_FIELDS)
    return {key: value for key, value in values if value is not None}


def _recorded_result(
    view: JobView | None,
    recorded: Sequence[Mapping[str, Any]],
    rev: str,
    candidate: str,
    job: str,
) -> JobView | None:
    """``view`` with the result status recorded for it when its own is no longer readable.

    Why: a fine-tune result is read from its pod's termination message, and the pod can go
    (PodGC, a node scaled down, ``kubectl delete pod``) while the Job stays Complete, e.g.
    while the revision is exported. A result already read is not lost with it: failing the
    candidate then (ResultMissing) would throw away hours of training. Only an entry of this
    very Job (revision, candidate and Job name) stands for it; a readable result always wins.
    The same holds when the Job itself is gone after it succeeded (deleted by hand, a TTL
    policy): trained again, it would rewrite the candidate's output under its export.
    """
    if view is not None and (
        view.state != SUCCEEDED or view.result is not None or view.result_error
    ):
        return view
    if view is not None and view.name != job:
        return view
    entry = _entry_of(recorded, rev, candidate, job)
    record = entry.get("result") if entry is not None else None
    if entry is None or entry.get("state") != SUCCEEDED or not isinstance(record, Mapping):
        return view
    values: dict[str, Any] = {attr: record.get(key) for key, attr in _RECORDED_FIELDS}
    params = values["parameters"]
    if isinstance(params, float) and params.is_integer():
        values["parameters"] = int(params)  # a JSON number may come back as 1.35e8
    seconds = entry.get("trainingSeconds")
    try:
        result = TrainerResult(
            stage="finetune",
            ok=True,
            candidate=candidate,
            train_seconds=seconds if isinstance(seconds, int | float) else None,
            **values,
        )
    except (ContractError, TypeError):
        return view  # not a record this operator wrote: the result stays missing
    if view is None:
        # The Job itself is gone (deleted by hand, a TTL policy) after it succeeded: the
        # result recorded for it stands for it, as for a pod that is gone.
        view = JobView(
            name=job, stage="finetune", revision=rev, candidate=candidate, state=SUCCEEDED
        )
    return dataclasses.replace(view, result=result)


def _entry_of(
    recorded: Sequence[Mapping[str, Any]], rev: str, candidate: str, job: str
) -> Mapping[str, Any] | None:
    """The last status's entry of ``candidate``'s fine-tune Job ``job`` in ``rev``, if any."""
    return next(
        (
            x
            for x in recorded
            if (x.get("name"), x.get("revision"), x.get("job")) == (candidate, rev, job)
        ),
        None,
    )


def _last_wait(view: JobView | None, entry: Mapping[str, Any] | None) -> JobView | None:
    """``view`` of a fine-tune that failed before a pod of it ran, with what its pod waited
    for as ``entry`` (its entry in the last status's candidates) recorded it
    (:func:`slm_operator.observe.never_ran_message`).

    Why from status: a Job past its deadline deletes the pod that waited (no node with a free
    GPU), so the pass that sees it failed no longer sees why it never ran. The candidate's
    entry said so while it waited; once the failure is written with it, that entry keeps it,
    so the message does not change from one pass to the next.
    """
    if view is None or view.state != FAILED or view.pod_ran:
        return view
    entry = entry or {}
    said = str(entry.get("message") or "")
    if entry.get("state") == PENDING and said:
        return dataclasses.replace(view, message=never_ran_message(view.message, said))
    if entry.get("state") == FAILED and said.startswith(view.message + NEVER_RAN):
        return dataclasses.replace(view, message=said)
    return view


def _recorded_export(
    view: JobView | None, selected: Mapping[str, Any], rev: str, candidate: str
) -> JobView | None:
    """``view`` (the export Job of ``candidate`` in ``rev``) with the repository that
    ``status.selectedModel`` recorded for it, when its own result is no longer readable.

    Why: an export's result is read once, and its revision promoted in the same pass, which
    records the repository in ``selectedModel``; once the export pod is garbage-collected,
    the served revision would otherwise read ResultMissing (a Warning) while it serves. Only
    the record of this revision and candidate stands for it (the export Job's name is theirs).
    """
    if view is None or view.state != SUCCEEDED or view.result is not None or view.result_error:
        return view
    uri = selected.get("artifactURI")
    if (
        selected.get("revision") != rev
        or selected.get("candidate") != candidate
        or not isinstance(uri, str)
        or not uri
    ):
        return view
    result = TrainerResult(stage="export", ok=True, candidate=candidate, artifact_uri=uri)
    return dataclasses.replace(view, result=result)


def _pipeline(
    task: Mapping[str, Any],
    rev: str,
    jobs: Mapping[str, JobView],
    now: dt.datetime,
    apply: list[Obj] | None,
    must_beat: float | None = None,
    service_account: str = "",
    served: str = "",
    data_recheck: dt.timedelta = dt.timedelta(minutes=5),
    waited_for_data: tuple[str, str, str] | None = None,
    images: b.Images = b.DEFAULT_IMAGES,
    data_prepared: tuple[str, str, str] | None = None,
    recorded: Sequence[Mapping[str, Any]] = (),
    recorded_selected: Mapping[str, Any] | None = None,
    deleting: Mapping[str, JobView] | None = None,
) -> _Step:
    """Walk one revision's pipeline; append the Jobs it needs to ``apply`` when given.

    ``now``: the clock the Jobs' times are compared with (the API server's where known:
    :attr:`Observed.server_now`).

    ``data_prepared``: the DataPrepared condition the last status recorded for this revision,
    if any; it stands for the data-prep Job's result once that Job's pod is gone (see
    :func:`_data_ready_before`). ``waited_for_data``: likewise the WaitingForData condition.

    ``recorded`` (the last status's candidates) and ``recorded_selected`` (its selectedModel):
    the fine-tune and export results read before, which stand for those no longer readable
    (see :func:`_recorded_result` and :func:`_recorded_export`).

    ``deleting``: the views of this task's Jobs being deleted (:attr:`JobView.deleting`),
    left out of ``jobs``; a step whose Job is one of them waits for it, in its words.

    ``must_beat``: for a retraining on new data, the served model's score; a candidate is
    promoted only if it passes the gate *and* scores higher.

    ``served``: for the active revision, the candidate its Deployment serves. The choice was
    made when it was promoted (a retraining picks among the candidates that beat the model
    it replaced, which the policy alone may not), so it is read back rather than made again.
    """
    spec = task["spec"]
    name = task["metadata"]["name"]
    unknown = (c.UNKNOWN, c.PENDING, "waiting for an earlier step")
    step = _Step(
        data=unknown,
        trained=unknown,
        evaluated=unknown,
        phase=PHASE_PREPARING,
        candidates=[
            _candidate_entry(cd, rev, n.finetune_job_name(name, cd["name"], rev), None, None)
            for cd in spec["candidates"]
        ],
    )

    data_name = n.data_job_name(name, rev)
    data_job = b.data_prep_job(task, rev, service_account, images) if apply is not None else None
    if apply is not None and data_job is not None:
        apply.append(data_job)
    dv = jobs.get(data_name)
    # Prepared, as the last status recorded, and its Job gone since (deleted by hand, a TTL
    # policy): not created again. The curated data is on the claim; a rerun would rewrite
    # it, with the calls captured since, under the fine-tunes reading it.
    gone = dv is None and data_prepared is not None
    if gone and apply is not None and data_job is not None:
        apply.remove(data_job)
    if apply is not None and limit_raised(dv, task):  # (apply: this revision is trained)
        step.rerun_jobs.append(data_name)
        dv = None  # runs again: pending until the next pass creates it
    held = deleting or {}
    status, reason, msg = _job_outcome(dv if dv is not None else held.get(data_name), now)
    read_before = data_prepared is not None and (
        gone
        or (dv is not None and dv.state == SUCCEEDED and dv.result is None and not dv.result_error)
    )
    if read_before:
        status = c.TRUE
    need = b.min_examples(spec)
    short = dv.result if dv is not None else None
    # Curated, but nothing held out (one distinct call so far: curate holds out from every
    # stratum, rare ones pooled, but never a task's only call), so no candidate could be
    # scored and every GPU hour spent training would end in "reported no score". Wait for
    # calls, as for too few.
    no_eval = (
        status == c.TRUE and not read_before and short is not None and short.eval_examples == 0
    )
    # Waiting for data, as the last status said, and the finished Job's count unreadable
    # since (its pod garbage-collected, its node scaled down): still waiting, as a result
    # read once stands for DataPrepared. Failing the revision for good (JobFailed, or
    # ResultMissing when nothing was held out) ended a wait the next recheck would have
    # ended. A Job that crashed (its retries or its time spent) never counted: a failure.
    count_gone = (
        waited_for_data is not None
        and status == c.FALSE
        and dv is not None
        and dv.result is None
        and not dv.result_error
        and dv.failure_reason not in ("BackoffLimitExceeded", "DeadlineExceeded")
    )
    if (
        no_eval
        or count_gone
        or (
            status == c.FALSE
            and short is not None
            and short.examples is not None
            and short.examples < need
        )
    ):
        # Too few calls captured yet: the normal state of a task created before its agents
        # have called it. Not a failure: the gateway keeps capturing, and the data-prep Job
        # runs again once the recheck interval has passed (deleted here, re-created by the
        # next pass, so the Job name stays the revision's and a restart anywhere converges).
        again = ((dv.finished_at if dv is not None else None) or now) + data_recheck
        tail = f"the gateway keeps capturing calls, curating again at {_ts(again)}"
        if short is None:
            # The message written from this very Job's count (same recheck time) keeps it.
            said = waited_for_data[2] if waited_for_data is not None else ""
            message = (
                said
                if said.endswith(tail)
                else f"revision {rev}: too few curated examples when it last curated; {tail}"
            )
        else:
            have = (
                f"{short.examples} curated example(s), none of them held out to score candidates on"
                if no_eval
                else f"{short.examples} of {need} curated examples (spec.dataset.minExamples)"
            )
            message = f"revision {rev}: {have}{_curate_said(short)}; {tail}"
        step.data = (c.FALSE, c.WAITING_FOR_DATA, message)
        if apply is not None and data_job is not None and now >= again:
            apply.remove(data_job)
            step.rerun_jobs.append(data_name)
        return step
    if status == c.UNKNOWN and waited_for_data is not None:
        # The recheck's Job is pending or running: still waiting, as far as anyone can tell,
        # so the condition keeps its reason (no event, no transition every recheck).
        step.data = (
            c.FALSE,
            c.WAITING_FOR_DATA,
            f"revision {rev}: curating the calls captured so far again ({msg})",
        )
        return step
    if status != c.TRUE:
        step.data = (status, reason, f"revision {rev}: {msg}")
        step.terminal_failure = status == c.FALSE
        return step
    r = dv.result if dv else None
    step.data = (
        c.TRUE,
        c.DATA_PREPARED,
        f"revision {rev}: {r.examples if r else '?'} examples after curation "
        f"({r.train_examples if r else '?'} train, {r.eval_examples if r else '?'} eval)",
    )
    if read_before and data_prepared is not None:
        step.data = data_prepared

    step.phase = PHASE_TRAINING
    gate = spec["evaluation"]["gate"]
    finished: list[tuple[Mapping[str, Any], JobView | None, tuple[str, str, str]]] = []
    running = 0
    stuck: list[str] = []  # "candidate: why its pod does not run"
    entries = []
    passing: list[tuple[Mapping[str, Any], TrainerResult]] = []
    for cand in spec["candidates"]:
        jname = n.finetune_job_name(name, cand["name"], rev)
        view = _recorded_result(jobs.get(jname), recorded, rev, cand["name"], jname)
        view = _last_wait(view, _entry_of(recorded, rev, cand["name"], jname))
        view = view if view is not None else held.get(jname)  # pending while it is deleted
        # A finished fine-tune whose Job is gone (its result recorded) is not trained again:
        # the run would rewrite the candidate's output under the export reading it.
        if apply is not None and (jname in jobs or view is None):
            apply.append(b.finetune_job(task, rev, cand, service_account, images))
        if apply is not None and limit_raised(view, task):
            step.rerun_jobs.append(jname)
            view = None  # runs again (from its checkpoints): pending until then
        outcome = _job_outcome(view, now)
        passed: bool | None = None
        if outcome[0] == c.UNKNOWN:
            running += 1
            if view is not None and view.waiting:
                stuck.append(f"{cand['name']}: {view.waiting}")
        else:
            finished.append((cand, view, outcome))
            if outcome[0] == c.TRUE and view is not None and view.result is not None:
                passed, _ = gate_verdict(view.result, gate)
                if passed:
                    passing.append((cand, view.result))
        entries.append(_candidate_entry(cand, rev, jname, view, passed))
    step.candidates = entries
    total = len(spec["candidates"])
    failures = [(cd, o) for cd, _, o in finished if o[0] == c.FALSE]
    room = CANDIDATE_LIST_LIMIT * (1 if failures and stuck else 2)
    fail_text = _listed([f"{cd['name']}: {o[2]}" for cd, o in failures], room)
    if running:
        # A candidate that failed while others train is named now, not once they are done
        # (hours later): someone may want to fix its settings before they finish.
        step.trained = (
            c.UNKNOWN,
            c.JOB_PENDING if stuck else c.JOB_RUNNING,
            f"revision {rev}: {total - running}/{total} candidates finished"
            + (f"; failed: {fail_text}" if failures else "")
            + (f"; waiting: {_listed(stuck, room)}" if stuck else ""),
        )
        return step
    succeeded = [(cd, v) for cd, v, o in finished if o[0] == c.TRUE and v is not None]
    if not succeeded:
        step.trained = (
            c.FALSE,
            c.JOB_FAILED,
            f"revision {rev}: every candidate failed: {fail_text}",
        )
        step.terminal_failure = True
        return step
    if failures:
        step.trained = (
            c.TRUE,
            c.PARTIALLY_TRAINED,
            f"revision {rev}: {len(succeeded)}/{total} candidates trained; {fail_text}",
        )
    else:
        step.trained = (
            c.TRUE,
            c.TRAINING_SUCCEEDED,
            f"revision {rev}: {total}/{total} candidates trained",
        )

    step.phase = PHASE_EVALUATING
    policy = spec["evaluation"].get("selectionPolicy", "smallest-passing")
    if must_beat is not None and passing:
        # ``must_beat`` is selectedModel.score as reported: compare ours as reported too, or
        # the very score of the served model would count as better than itself.
        better = [(cd, r) for cd, r in passing if _reported(r.score or 0.0) > must_beat + 1e-9]
        if not better:
            best = max((r.score or 0.0) for _, r in passing)
            step.evaluated = (
                c.FALSE,
                c.NOT_BETTER,
                f"revision {rev}: best retrained candidate scored {best:.3f}, not better than "
                f"the served model's {must_beat:.3f}; the served model stays",
            )
            step.terminal_failure = True
            return step
        passing = better
    chosen = next(((cd, r) for cd, r in passing if cd["name"] == served), None) if served else None
    below_gate = False
    if served and chosen is None:
        # The gate (not part of the revision) was raised past the served model. Choosing
        # another candidate here would put its threshold on the route while Triton still
        # serves this one, whose artifact no export of the other replaces: the served
        # model stays, with its own figures, until a retraining promotes a passing one.
        chosen = next(
            (
                (cd, v.result)
                for cd, v in succeeded
                if cd["name"] == served and v.result is not None
            ),
            None,
        )
        below_gate = chosen is not None
    chosen = chosen or select(passing, policy)
    if chosen is None:
        scores = ", ".join(
            f"{cd['name']} {gate_verdict(v.result, gate)[1]}"
            for cd, v in succeeded
            if v.result is not None
        )
        step.evaluated = (
            c.FALSE,
            c.GATE_NOT_MET,
            f"revision {rev}: no candidate passed the gate: {scores}",
        )
        step.terminal_failure = True
        return step
    cand, res = chosen
    step.selected = {
        "candidate": cand["name"],
        "model": cand["model"],
        "revision": rev,
        **({"score": _reported(res.score)} if res.score is not None else {}),
        **({"parameters": res.parameters} if res.parameters is not None else {}),
        **({"threshold": res.threshold} if res.threshold is not None else {}),
    }
    verdict = gate_verdict(res, gate)[1]
    step.evaluated = (
        (
            c.TRUE,
            c.SERVED_BELOW_GATE,
            f"revision {rev}: {cand['name']} stays served but no longer passes the gate: "
            f"{verdict}; a retraining promotes a candidate that passes it",
        )
        if below_gate
        else (
            c.TRUE,
            c.GATE_PASSED,
            f"revision {rev}: {cand['name']} selected ({policy}): {verdict}",
        )
    )

    step.phase = PHASE_EXPORTING
    ev = _recorded_export(
        _export_of(jobs, rev, cand["name"]), recorded_selected or {}, rev, cand["name"]
    )
    # Exports of a candidate no longer chosen: never promoted, and deleted (while training)
    # so that they stop running.
    step.rerun_jobs += _stale_exports(jobs, rev, cand["name"])
    if apply is not None and ev is not None and limit_raised(ev, task):
        step.rerun_jobs.append(ev.name)
        ev = None
    if ev is None:  # an export Job of the name another controller's finalizer holds
        held_export = held.get(n.export_job_name(name, cand["name"], rev))
        step.export_waiting = held_export.waiting if held_export is not None else ""
    if apply is not None:
        problem = (
            f"{cand['name']} reported no artifactURI"
            if not res.artifact_uri
            else b.candidate_artifact_problem(task, res.artifact_uri)
        )
        if problem:
            step.evaluated = (c.FALSE, c.RESULT_MISSING, f"revision {rev}: {problem}")
            step.terminal_failure = True
            return step
        if ev is None or ev.name == n.export_job_name(name, cand["name"], rev):
            # (An export Job an older operator named after the revision alone is kept.)
            apply.append(
                b.export_job(
                    task, rev, cand, res.artifact_uri, res.threshold, service_account, images
                )
            )
    status, reason, msg = _job_outcome(ev, now)
    if status == c.FALSE:
        step.evaluated = (c.FALSE, reason, f"revision {rev}: export {msg}")
        step.terminal_failure = True
        return step
    if status == c.TRUE and ev is not None and ev.result is not None:
        if not ev.result.artifact_uri:
            step.evaluated = (
                c.FALSE,
                c.RESULT_MISSING,
                f"revision {rev}: export Job {ev.name} reported no artifactURI",
            )
            step.terminal_failure = True
            return step
        step.exported_uri = ev.result.artifact_uri
        step.selected["artifactURI"] = ev.result.artifact_uri
    return step


def _exported(view: JobView) -> str | None:
    """The candidate an export Job exports: its label, else the one its result names."""
    return view.candidate or (view.result.candidate if view.result is not None else None)


def _export_of(jobs: Mapping[str, JobView], rev: str, candidate: str) -> JobView | None:
    """The export Job of ``rev`` that exports ``candidate``, whatever its name.

    Why not by name alone: an export's repository may only ever be served as the candidate
    it exported, and operator versions before per-candidate names named one export Job per
    revision; found by what it exports, such a Job is still used (an upgrade neither exports
    again nor disturbs a served revision), and one of another candidate never is.
    """
    found = sorted(
        (v for v in jobs.values() if v.stage == n.STAGE_EXPORT and v.revision == rev),
        key=lambda v: v.name,
    )
    return next((v for v in found if _exported(v) == candidate), None)


def _stale_exports(jobs: Mapping[str, JobView], rev: str, candidate: str) -> list[str]:
    """Export Jobs of ``rev`` that do not export ``candidate`` (the choice changed)."""
    return sorted(
        v.name
        for v in jobs.values()
        if v.stage == n.STAGE_EXPORT and v.revision == rev and _exported(v) != candidate
    )


def _data_ready_before(
    prev: Mapping[str, Any], rev: str, recorded_as: tuple[str, str]
) -> tuple[str, str, str] | None:
    """DataReady as the last status recorded it, when it had ``recorded_as`` (status,
    reason) for revision ``rev``; else None. A DataPrepared stands for the revision in
    training or the served one, a WaitingForData for the one in training only.

    Why: a data-prep Job's result is read from its pod's termination message, and the pod
    can go (PodGC, a node scaled down) while the Job stays Complete, e.g. during hours of
    fine-tuning, or before a wait for data is rechecked. A result already read is not lost
    with it: failing the revision then (ResultMissing, JobFailed) would throw away a
    training in progress, or end a wait the next recheck would have ended.
    """
    revision = prev.get("revision") or {}
    described = revision.get("training")
    if recorded_as[1] == c.DATA_PREPARED:
        described = described or revision.get("active")
    recorded = _recorded(prev, c.DATA_READY, ("", "", ""))
    return recorded if described == rev and recorded[:2] == recorded_as else None


def _invalid_spec_step(prev: Mapping[str, Any], why: tuple[str, str, str], active: str) -> _Step:
    """The training outcome of an invalid spec beside a served model: none is trained.

    Why the last candidates are kept: they describe the served model's revision, the only
    training fact that still holds. For the same reason, when the last status described the
    served revision as passed (:func:`_served_step`), its DataReady, Trained and Evaluated
    stay as they were, and only Ready says the spec is invalid: overwritten, they were lost
    for good, and once the edit was reverted a served revision whose Jobs or pods were gone
    read as a Job about to run (JobPending) or a result missing, with a Warning.
    """
    step = _Step(
        data=why,
        trained=why,
        evaluated=why,
        phase=PHASE_FAILED,
        candidates=list(prev.get("candidates") or []),
        terminal_failure=True,
    )
    served = _served_step(step, prev, active)
    return dataclasses.replace(served, phase=PHASE_FAILED, terminal_failure=True)


def _recorded(
    prev: Mapping[str, Any], type_: str, fallback: tuple[str, str, str]
) -> tuple[str, str, str]:
    """(status, reason, message) of a condition as the last status recorded it."""
    x = c.find(prev.get("conditions") or [], type_)
    if x is None:
        return fallback
    return (str(x.get("status")), str(x.get("reason")), str(x.get("message", "")))


def _served_step(step: _Step, prev: Mapping[str, Any], active: str) -> _Step:
    """The training outcome status recorded for the served revision, when its Jobs no longer
    tell it (deleted by hand or a cleanup policy, their pods garbage-collected).

    Why: nothing of the served revision is trained again (its Jobs are never re-created),
    so walking its pipeline without them would report Jobs about to run (JobPending) or
    results missing, and post Events about them, while the model serves. ``step`` stands
    when the last status did not describe this revision alone, or not as one that passed
    the gate (an edit reverted while another revision trained).
    """
    revision = prev.get("revision") or {}
    evaluated = _recorded(prev, c.EVALUATED, step.evaluated)
    if (
        revision.get("active") != active
        or revision.get("training")
        or evaluated[:2] != (c.TRUE, c.GATE_PASSED)
    ):
        return step
    return dataclasses.replace(
        step,
        data=_recorded(prev, c.DATA_READY, step.data),
        trained=_recorded(prev, c.TRAINED, step.trained),
        evaluated=evaluated,
        candidates=list(prev.get("candidates") or step.candidates),
        terminal_failure=False,
    )


def _promoted_step(
    step: _Step,
    task: Mapping[str, Any],
    jobs: Mapping[str, JobView],
    rev: str,
    served: str,
    selected: Mapping[str, Any],
) -> _Step:
    """The served revision's outcome from what is known to serve it, when neither its Jobs
    nor the last status tell it: each stage its pipeline cannot read any more passed.

    Why: a revision is only served once its data was prepared, its candidates trained and
    ``served`` (the candidate its Deployment serves) passed the gate. The last status records
    that (:func:`_served_step`) only while it describes this revision alone: once an edit
    trained another revision beside it and was reverted, it described the other one, and the
    served revision, its pods garbage-collected, read ResultMissing (a Warning) for good while
    it served. ``selected`` (status.selectedModel) gives the served candidate's figures when
    it records this revision. A Job that is gone leaves its candidate without a state.
    """
    if step.evaluated[0] == c.TRUE:
        return step
    gone = "no longer readable"
    ours = selected.get("revision") == rev
    served = served or (str(selected.get("candidate") or "") if ours else "")
    score = selected.get("score") if ours else None
    name = task["metadata"]["name"]
    entries = []
    for cand, entry in zip(task["spec"]["candidates"], step.candidates, strict=True):
        if entry.get("state") == PENDING:  # not reached, or its Job is gone
            job = n.finetune_job_name(name, cand["name"], rev)
            view = jobs.get(job)
            entry = (
                _candidate_entry(cand, rev, job, view, None)
                if view is not None
                else {"name": cand["name"], "revision": rev, "job": job}
            )
        if cand["name"] == served:
            entry = {**entry, "state": SUCCEEDED, "progress": 100, "passedGate": True}
            for key in ("score", "parameters"):
                if ours and selected.get(key) is not None:
                    entry.setdefault(key, selected[key])
        entries.append(entry)
    return dataclasses.replace(
        step,
        data=step.data
        if step.data[0] == c.TRUE
        else (
            c.TRUE,
            c.DATA_PREPARED,
            f"revision {rev}: prepared before it was promoted (its data-prep result is {gone})",
        ),
        trained=step.trained
        if step.trained[0] == c.TRUE
        else (
            c.TRUE,
            c.TRAINING_SUCCEEDED,
            f"revision {rev}: trained before it was promoted (its fine-tune results are {gone})",
        ),
        evaluated=(
            c.TRUE,
            c.GATE_PASSED,
            f"revision {rev}: {served or 'its served candidate'} passed the gate when it was "
            f"promoted{f' (score {score})' if score is not None else ''}; its results are {gone}",
        ),
        candidates=entries,
        terminal_failure=False,
    )


def _concluded_step(step: _Step, prev: Mapping[str, Any]) -> _Step:
    """The outcome status recorded for a retraining that already lost or failed.

    Why: its Jobs may be gone (deleted by hand, a cleanup), and walking the pipeline without
    them would report a retraining about to start (JobPending) that never will. The recorded
    conditions and candidates say what happened; ``terminal_failure`` keeps it over.
    """
    over = (c.FALSE, c.NOT_BETTER, "the retraining ended without replacing the served model")
    return dataclasses.replace(
        step,
        data=_recorded(prev, c.DATA_READY, step.data),
        trained=_recorded(prev, c.TRAINED, step.trained),
        evaluated=_recorded(prev, c.EVALUATED, over),
        candidates=list(prev.get("candidates") or step.candidates),
        terminal_failure=True,
        selected=None,
        exported_uri=None,
        rerun_jobs=[],
    )


def _deployment_facts(dep: Mapping[str, Any] | None) -> tuple[str, str, str, int, int]:
    """(revision, artifact, candidate, replicas, ready replicas) of the Triton Deployment."""
    if not dep:
        return "", "", "", 0, 0
    ann = dep["metadata"].get("annotations") or {}
    st = dep.get("status") or {}
    return (
        ann.get(n.LABEL_REVISION, ""),
        ann.get(n.ANNOTATION_ARTIFACT, ""),
        ann.get(n.ANNOTATION_CANDIDATE, ""),
        int((dep.get("spec") or {}).get("replicas", 0)),
        int(st.get("readyReplicas") or 0),
    )


def _recorded_active(
    prev: Mapping[str, Any], jobs: Mapping[str, JobView], task_name: str
) -> tuple[str, str, str]:
    """(revision, artifact, candidate) that status says is served, for want of a Deployment.

    Why: the Deployment's annotations are the observed truth, but it can be deleted (by hand,
    to force fresh pods, or by a cleanup). Forgetting the served revision then would treat the
    task as never served: a retraining that lost to it would be promoted after all (nothing
    left to beat) and the served revision's Jobs deleted as abandoned. The artifact is the one
    recorded in selectedModel, else the one the revision's export Job reported.
    """
    active = str((prev.get("revision") or {}).get("active") or "")
    if not active:
        return "", "", ""
    selected = prev.get("selectedModel") or {}
    ours = selected.get("revision") == active
    uri = str(selected.get("artifactURI") or "") if ours else ""
    cand = str(selected.get("candidate") or "") if ours else ""
    exports = [v for v in jobs.values() if v.stage == n.STAGE_EXPORT and v.revision == active]
    # The export of the recorded candidate; with none recorded, the revision's only export.
    export = _export_of(jobs, active, cand) if cand else (exports[0] if len(exports) == 1 else None)
    if not uri and export is not None and export.result is not None:
        uri = export.result.artifact_uri or ""
    if not uri:
        return "", "", ""  # nothing to serve it from: as before, train it again
    if not cand and export is not None:
        cand = _exported(export) or ""
    return active, uri, cand


def _rolling_out(dep: Mapping[str, Any] | None) -> bool:
    if not dep:
        return False
    st = dep.get("status") or {}
    want = int((dep.get("spec") or {}).get("replicas", 0))
    return bool(
        int(st.get("observedGeneration") or 0) < int(dep["metadata"].get("generation") or 0)
        or int(st.get("updatedReplicas") or 0) < want
        or int(st.get("replicas") or 0) > want
    )


def _earlier_pods_answer(dep: Mapping[str, Any] | None, revision: str) -> bool:
    """Whether Triton pods from before ``revision``'s Deployment template may still answer.

    Why: the Deployment rolls out with ``maxUnavailable: 0``, so while a newly promoted
    revision's pods load their model, the previous ones keep answering the Service's calls,
    shadow copies included. A rollout judged on those answers promoted the new revision
    shadow -> canary -> slm on the old model's agreement and latency, and sent it all the
    calls once its pods were ready, never canaried. True when the Deployment found is not
    yet this revision's (it is applied in this pass), its controller has not yet seen the
    latest spec (a scale bumps the generation too: it holds for one pass), or pods of an
    older template remain.
    """
    if not dep:
        return False
    meta = dep["metadata"]
    st = dep.get("status") or {}
    return bool(
        (meta.get("annotations") or {}).get(n.LABEL_REVISION, "") != revision
        or int(st.get("observedGeneration") or 0) < int(meta.get("generation") or 0)
        or int(st.get("updatedReplicas") or 0) < int(st.get("replicas") or 0)
    )


def _may_write(view: JobView) -> bool:
    """Whether a pod of the Job may still write to (or remove from) the claim: it is pending
    or running, or it is being deleted before it finished (its pod perhaps still running).

    Why the last: a Job being deleted reads pending whatever it did, and one that had
    finished, held by another controller's finalizer (at the next promotion, or deleted by
    hand), was waited for as long as the finalizer stayed: a finished prune Job held every
    new revision's Jobs, and any such Job the next prune, for good.
    """
    if view.deleting:
        return not view.finished
    return view.state in (PENDING, RUNNING)


def _pruning(jobs: Mapping[str, JobView]) -> JobView | None:
    """The task's prune Job while it may still remove folders (:func:`_may_write`); None
    when there is none.

    A view without a uid is a Job the API server refused to create
    (:func:`slm_operator.observe.refused_job`): it removes nothing.
    """
    return next(
        (
            v
            for _, v in sorted(jobs.items())
            if v.stage == n.STAGE_PRUNE and v.uid and _may_write(v)
        ),
        None,
    )


def _held_for_prune(
    task: Mapping[str, Any], rev: str, jobs: Mapping[str, JobView]
) -> dict[str, JobView]:
    """The Jobs of revision ``rev`` not created yet, held while a prune Job runs, as views
    that wait for it (read as Jobs being deleted are: pending, not applied, its words).

    Why: a prune removes every revision folder it was not told to keep, and a revision whose
    training starts after its Job was made (a retraining triggered, a spec edit) is not among
    them; its data-prep Job would write into a folder being removed. A prune takes seconds to
    minutes, and one that failed holds nothing.
    """
    prune = _pruning(jobs)
    if prune is None:
        return {}
    name = task["metadata"]["name"]
    why = f"waiting for Job {prune.name} to finish removing the files of earlier revisions"
    planned = [(n.data_job_name(name, rev), n.STAGE_PREPARE, None)]
    for cand in task["spec"]["candidates"]:
        c_name = cand["name"]
        planned.append((n.finetune_job_name(name, c_name, rev), n.STAGE_FINETUNE, c_name))
        planned.append((n.export_job_name(name, c_name, rev), n.STAGE_EXPORT, c_name))
    return {
        job: JobView(job, stage, rev, cand, PENDING, waiting=why, deleting=True)
        for job, stage, cand in planned
        if job not in jobs
    }


def _prune_due(obs: Observed, active_rev: str, active_uri: str, planned: Sequence[Obj]) -> bool:
    """Whether the served revision's prune Job is to be created now.

    Once: the Deployment serves ``active_rev`` and no pod of an earlier template is left
    (none reads an earlier revision's model repository any more), no Job of the task may
    still write (:func:`_may_write`: pending, running, or being deleted before it finished),
    and none is created in this pass (none writes into a folder meanwhile). Not while a
    Deployment built in this pass was refused: what is served may not be what the
    Deployment found says. A Job of its name already there is never applied again: its
    ``--keep`` was fixed when it was made, and Jobs are immutable.
    Deleted (by hand, after it failed), it is made again: that is how it is run again.
    """
    dep = obs.deployment
    if not (active_rev and active_uri) or dep is None or obs.deployment_refused:
        return False
    if _deployment_facts(dep)[0] != active_rev or _earlier_pods_answer(dep, active_rev):
        return False
    if n.prune_job_name(obs.task["metadata"]["name"], active_rev) in obs.jobs:
        return False
    if any(map(_may_write, obs.jobs.values())):
        return False
    return not any(o["kind"] == "Job" and o["metadata"]["name"] not in obs.jobs for o in planned)


def _prune_failed(view: JobView) -> str:
    """What the Serving condition adds while the served revision's prune Job has failed.

    Why there: a prune that failed stops nothing (serving, retraining), so it is neither a
    Ready False nor a Warning on every pass; its message changes once, and the condition
    says what is left on the claim and how to run it again.
    """
    said = view.message or "no reason given"
    return (
        f"removing the files of earlier revisions failed (Job {view.name}: {said}); they stay "
        "on the storage claim until the Job is deleted, which runs it again"
    )


#: ``status.live.rolloutReason`` while the rollout step holds for the Deployment's rollout.
ROLLOUT_WAITS_FOR_REPLICAS = "WaitingForNewReplicas"

#: The Deployment controller's reason (Progressing=False) for a rollout that made no progress
#: for the Deployment's ``progressDeadlineSeconds`` (600 unless set).
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
#: Its reason (Progressing=True) once the rollout is complete: the condition's
#: ``lastUpdateTime`` then dates the end of that rollout, not the last progress of one.
_ROLLOUT_COMPLETE = "NewReplicaSetAvailable"


def _rollout_stuck(dep: Mapping[str, Any] | None, revision: str, now: dt.datetime) -> str:
    """Why the rollout of ``revision``'s Deployment template is stuck, or "" while it makes
    progress (or the controller has not seen the template yet: its conditions are then the
    previous rollout's).

    Why: while a promoted revision's new pods are not ready, the previous template's keep
    taking the calls (:func:`_earlier_pods_answer`) and the rollout holds. A new pod that
    never becomes ready (a crash loop, an image that cannot be pulled, no GPU node) held it
    for good under Ready=True, "is rolling out", with no Warning. Stuck: the Deployment
    controller gave up (Progressing=False, ProgressDeadlineExceeded), or the condition's
    ``lastUpdateTime``, the rollout's last progress, is older than the Triton pod's start-up
    budget (:data:`WAKE_GRACE_S`), which a raised ``progressDeadlineSeconds`` would outlast.
    ``now``: the API server's clock where known, the controller's times being its.
    """
    if not dep:
        return ""
    meta = dep["metadata"]
    st = dep.get("status") or {}
    if (meta.get("annotations") or {}).get(n.LABEL_REVISION, "") != revision or int(
        st.get("observedGeneration") or 0
    ) < int(meta.get("generation") or 0):
        return ""
    progressing = next(
        (x for x in st.get("conditions") or [] if x.get("type") == "Progressing"), None
    )
    if progressing is None:
        return ""
    if progressing.get("status") == "False" and (
        progressing.get("reason") == PROGRESS_DEADLINE_EXCEEDED
    ):
        return _STUCK_PAST_DEADLINE
    last = parse_time(progressing.get("lastUpdateTime"))
    if (
        progressing.get("status") == "True"
        and progressing.get("reason") != _ROLLOUT_COMPLETE
        and last is not None
        and (now - last).total_seconds() > WAKE_GRACE_S
    ):
        return _stuck_past_budget()
    return ""


#: :func:`_rollout_stuck`'s reasons, in the past tense: they stay true while the verdict is
#: kept (:func:`_stuck_verdict`), after the Deployment's condition has moved on.
_STUCK_PAST_DEADLINE = (
    "the Deployment reported ProgressDeadlineExceeded (no new pod became ready within its "
    "progressDeadlineSeconds)"
)
_STUCK_UNSAID = "its new pods did not become ready"


def _stuck_past_budget() -> str:
    return (
        "no new pod became ready within the Triton pod's start-up budget "
        f"({WAKE_GRACE_S / 60:.0f} minutes)"
    )


def _stuck_verdict(
    prev_conds: Sequence[Mapping[str, Any]], prev_active: str, revision: str, found: str
) -> str:
    """Why the rollout of ``revision`` is stuck, or "": ``found`` (:func:`_rollout_stuck`'s
    verdict on the Deployment now), unless the previous pass already found it stuck (Ready
    said RolloutStuck, the revision status then active being ``revision``): that verdict
    is kept, with the reason it gave.

    Why kept: the plan asks only while pods of an earlier template still answer
    (:func:`_earlier_pods_answer`), that is, while the same revision's new pods are not all
    ready. A scale-up of the stuck Deployment (the operator's own autoscaler, a minReplicas
    edit) makes the Deployment controller reset Progressing to True with a fresh
    lastUpdateTime, and in a pass before its controller sees the new generation the
    Deployment says nothing: Ready went True ("is rolling out", a Normal Event) and came
    back RolloutStuck with a second Warning ten minutes later, at every scale-up, while the
    same pod stayed broken. The verdict ends when the rollout completes or another revision
    is promoted. A reason this version did not write (an earlier operator's words) gives
    way to ``found``, or to general words.
    """
    before = c.find(prev_conds, c.READY) or {}
    if before.get("reason") != c.ROLLOUT_STUCK or not revision or prev_active != revision:
        return found
    said = str(before.get("message") or "")
    known = (_STUCK_PAST_DEADLINE, _stuck_past_budget())
    return next((why for why in known if why in said), found or _STUCK_UNSAID)


#: The rollout step of the served model in ``status.live``; a newly promoted revision starts
#: without them.
_ROLLOUT_KEYS = frozenset(
    {"rolloutMode", "rolloutReason", "canaryPercent", "canaryHealthyWindows", "agreementSince"}
)


def metrics_window(spec: Mapping[str, Any]) -> float:
    """Seconds in one live-control window (``spec.fallback.policy.windowSeconds``)."""
    policy = (spec.get("fallback") or {}).get("policy") or {}
    return float(policy.get("windowSeconds", 30))


def judged_window(spec: Mapping[str, Any], min_window_s: float = 0.0) -> float:
    """Seconds between two judged windows: ``windowSeconds``, or ``min_window_s`` (two scrape
    intervals, the shortest span a rate can be read over) when longer.

    Why not ``windowSeconds`` alone: judged more often than that, consecutive windows read
    the same counter steps, and one latency spike counted as ``breachWindows`` consecutive
    breached windows (see :meth:`slm_operator.prom.PromMetrics.range_s`). The queries read
    one scrape interval more than this (:meth:`slm_operator.prom.PromMetrics.read_s`), so
    that consecutive windows share their boundary sample and the step across it is judged.
    """
    return max(metrics_window(spec), min_window_s)


def metrics_due(task: Mapping[str, Any], now: dt.datetime, min_window_s: float = 0.0) -> bool:
    """Whether a new live-control window is to be judged at ``now``.

    Why one function for both: the reconcile asks Prometheus only when this is True (a window
    is judged once, however often the task is reconciled meanwhile), and :func:`plan` judges
    only when it is True, so the two can never disagree about which reconcile needs metrics.
    The window restarts at ``status.live.lastEvaluated``; a task never judged is due. A
    window lasts :func:`judged_window` (``min_window_s``: ``Observed.min_window_s``).
    """
    live = (task.get("status") or {}).get("live") or {}
    last = parse_time(live.get("lastEvaluated"))
    window = judged_window(task.get("spec") or {}, min_window_s)
    if last is None:
        return True
    # A window judged "in the future" was stamped by a clock ahead of this one (another
    # leader's, or this one before it stepped back): up to a window ahead, it is next due a
    # window after that stamp (at most two windows from now), as judged at once it read the
    # samples of the window before again (one latency spike, two breached windows). Further
    # ahead, waiting for it would freeze live control (fallback included) for the skew.
    return _skewed(last, now, window) or (now - last).total_seconds() >= window - 0.05


def _skewed(stamp: dt.datetime, now: dt.datetime, period_s: float) -> bool:
    """Whether a status time ``stamp`` is more than ``period_s`` seconds ahead of ``now``.

    Why: status times are stamped by whichever replica led, on its node's clock. One a
    little ahead of this clock (a clock stepped back by NTP, a new leader a few seconds
    behind the old) is taken at its word; counted as long ago, it had a window judged twice
    on the same samples and a wake-up from zero read as an outage. One more than the period
    it times ahead comes from a badly skewed clock: taken at its word, it would hold live
    control up for as long as the skew, so the callers treat it as none.
    """
    return (stamp - now).total_seconds() > period_s


def agreement_since_s(
    task: Mapping[str, Any], now: dt.datetime, min_window_s: float = 0.0
) -> float | None:
    """Seconds of shadow copies not judged yet, for the agreement queries of the window
    judged at ``now``: since ``status.live.agreementSince`` (an older status: since the last
    judged window), 0 for a start a little ahead of ``now``; None for a task never judged.
    ``min_window_s`` as for :func:`metrics_due`.

    Why: each copy is judged in one window only (:func:`_agreement_since`), so one burst of
    agreeing copies is one healthy window, not ``canaryWindows`` of them.
    """
    window = judged_window(task.get("spec") or {}, min_window_s)
    since = _agreement_start((task.get("status") or {}).get("live") or {}, now, window)
    return None if since is None else max(0.0, (now - since).total_seconds())


def _agreement_start(
    live: Mapping[str, Any], now: dt.datetime, window: float
) -> dt.datetime | None:
    """When the shadow copies not judged yet began, as of ``now``; None for a task never
    judged, and for a start more than a ``window`` in the future.

    Why such a start counts as none: it was stamped by a clock far ahead (as
    :func:`metrics_due` allows for ``lastEvaluated``). Read as 0 s, every window read no
    copies and kept that start, so the rollout stood still for as long as the skew. A start
    less far ahead (:func:`_skewed`) is kept: the copies pool on from it, none read twice.
    """
    since = parse_time(live.get("agreementSince")) or parse_time(live.get("lastEvaluated"))
    return None if since is None or _skewed(since, now, window) else since


def _agreement_since(
    m: Metrics,
    spec: Mapping[str, Any],
    prev: Mapping[str, Any],
    now: str,
    window: float,
    judged: bool = True,
) -> str:
    """``status.live.agreementSince`` after a window judged at ``now`` with metrics ``m``.

    A window that read ``shadowMinSamples`` copies or more and whose rollout step had an SLO
    verdict (``judged``) used them: the next reads only newer ones. One with fewer copies, or
    none of the verdict a canary needs besides agreement, pools them with the next: the start
    stays. Spending copies in windows that could not count them starved a canary at low
    traffic: its short windows rarely had both an SLM latency sample and enough fresh copies.
    """
    min_samples = int((spec.get("rollout") or {}).get("shadowMinSamples", 50))
    if judged and m.shadow_samples is not None and m.shadow_samples >= min_samples:
        return now
    at = parse_time(now)
    if at is None:
        return now
    since = _agreement_start(prev, at, window)
    if since is not None:
        return _micro_ts(since)
    # Never judged, or a start far in the future: this window read one window back
    # (PromMetrics.agreement_window), and its copies pool on from there.
    return _micro_ts(at - dt.timedelta(seconds=window))


def next_window_s(window: float, last: dt.datetime | None, judged: bool, now: dt.datetime) -> float:
    """Seconds from ``now`` until the next window is due (:func:`metrics_due`).

    Why the operator needs it: windows are judged when the task is reconciled, and without a
    wake-up of its own a task with no events was reconciled only at the resync (30 s by
    default), so a 5 s window was judged every 30 s. A window judged now, or due but not
    judged (Prometheus did not answer), is next due a whole window later: a Prometheus that
    is down must not turn the wake-up into a loop. A window stamped a little in the future
    is due a window after its stamp; one further ahead is due already (:func:`metrics_due`).
    """
    if judged or last is None:
        return window
    remaining = window - (now - last).total_seconds()
    return remaining if 0.05 < remaining <= 2 * window else window


def desired_replicas(spec: Mapping[str, Any], previous: Mapping[str, Any]) -> int:
    serving = spec.get("serving") or {}
    lo, hi = int(serving.get("minReplicas", 1)), int(serving.get("maxReplicas", 4))
    want = (previous.get("serving") or {}).get("desiredReplicas")
    if want is None:
        want = max(lo, 1)
    return max(lo, min(hi, int(want)))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _scaled_to_zero_message() -> str:
    """Why a task scaled to zero is fine, for its conditions and ``kubectl get``.

    ``serving.minReplicas: 0`` lets an idle task give its GPU back: no replica is then
    wanted, not missing. Reported as NoReadyReplicas (a Warning, Argo CD Degraded, phase
    Deploying "waiting for replicas (0/0)"), an idle fleet looked broken to everyone who
    watched it; the alerts already leave this state alone.
    """
    return (
        "scaled to zero while idle (serving.minReplicas 0); calls go to the LLM, and their "
        "rate brings a Triton replica back"
    )


#: Seconds a replica started from zero may take before its absence is an outage: the
#: Triton pod's startup probe budget (builders.triton_deployment: 60 probes, 10 s apart).
WAKE_GRACE_S = 600.0


def _autoscale(
    spec: Mapping[str, Any],
    m: Metrics,
    want: int,
    live_prev: Mapping[str, Any],
    now: dt.datetime,
) -> lv.ScaleDecision:
    """The autoscaler's decision for a judged window, from the spec's bounds and cool-down
    and the last change (``status.live.lastScaleTime``)."""
    sv = spec.get("serving") or {}
    scaling = sv.get("scaling") or {}
    last_scale = parse_time(live_prev.get("lastScaleTime"))
    return lv.decide_replicas(
        m.request_rate,
        float((sv.get("slo") or {}).get("targetQpsPerReplica", 10)),
        want,
        int(sv.get("minReplicas", 1)),
        int(sv.get("maxReplicas", 4)),
        max_step=int(scaling.get("maxStep", 2)),
        cooldown_s=float(scaling.get("scaleDownCooldownSeconds", 60)),
        # a change stamped in the future (a leader's clock ahead) does not block
        # scale-down for the skew: counted as long ago
        seconds_since_scale=(
            (now - last_scale).total_seconds() if last_scale and last_scale <= now else None
        ),
    )


def _waking_from_zero(
    prev_conds: Sequence[Mapping[str, Any]], last_scale: str | None, now: dt.datetime
) -> bool:
    """Whether a task that was scaled to zero is starting its first replica again.

    Why: with ``serving.minReplicas: 0`` the pass that sees calls come back raises the
    replicas from 0, and until the new replica is ready none is. Reported as an outage
    (NoReadyReplicas: a Warning, Ready False, Argo CD Degraded), every wake-up of an idle
    task looked like one, though the LLM answers meanwhile just as it did while scaled to
    zero. It is one for the replica's startup budget after the scale-up (``last_scale``);
    a replica that does not come up within it is an outage again. A scale-up stamped ahead
    of this clock (by a leader whose clock ran ahead) is one just made, unless the stamp is
    more than the budget ahead (:func:`_skewed`): that must not hide an outage for the skew.
    """
    prev_fb = c.find(prev_conds, c.FALLBACK_ACTIVE) or {}
    if prev_fb.get("status") != c.TRUE or prev_fb.get("reason") not in (
        c.SCALED_TO_ZERO,
        c.WAKING_FROM_ZERO,
    ):
        return False
    scaled = parse_time(last_scale)
    return (
        scaled is not None
        and not _skewed(scaled, now, WAKE_GRACE_S)
        and (now - scaled).total_seconds() < WAKE_GRACE_S
    )


def _live_control(
    spec: Mapping[str, Any],
    is_serving: bool,
    ready: int,
    m: Metrics | None,
    due: bool,
    prev: Mapping[str, Any],
    live: Obj,
    now: str,
    deployed: bool = False,
    not_due: bool = False,
    window: float = 30.0,
    scaled_to_zero: bool = False,
    earlier_pods: bool = False,
    waking: bool = False,
    edited: bool = False,
    blind: str = "",
    quiet_before: bool = False,
    service_taken: str = "",
    unscraped_before: bool = False,
) -> tuple[tuple[str, str, str], tuple[str, str, str], str, int]:
    """SLOMet and FallbackActive conditions plus the route mode; fills ``live`` (status.live).

    ``deployed``: a model that served has no ready replica now: FallbackActive says
    NoReadyReplicas (a Warning) rather than that no model exists, or ScaledToZero (Normal)
    when ``scaled_to_zero``: none is wanted (see :func:`_scaled_to_zero_message`), or
    WakingFromZero (Normal) when ``waking``: one is starting again (:func:`_waking_from_zero`).
    ``not_due``: Prometheus was not asked (this window was judged already), so a missing
    ``m`` is no sign that Prometheus is unavailable.
    ``window``: the length of a judged window (:func:`judged_window`).
    ``earlier_pods``: pods of an earlier Deployment template may still answer
    (:func:`_earlier_pods_answer`): the rollout step holds (a canary that breaches still goes
    back to shadow) and the shadow copies of the window are not counted towards agreement.
    ``edited``: the spec changed since the last status: the last window's measurements are
    judged again against the SLO it sets (:func:`_judged_again`).
    ``blind``: why live control has no metrics at all (:func:`_metrics_blind`), or "".
    ``quiet_before``: the last judged window had no SLM call (:func:`_quiet_before`): SLOMet
    says so until the next window.
    ``service_taken``: why the model is not served although it may have ready replicas
    (:func:`_service_taken`), or "".
    ``unscraped_before``: the last judged window found no gateway series of the task
    (:func:`_unscraped_before`): SLOMet says so until the next window.

    Streaks only advance once per window (``due``), so re-running the reconcile within a
    window changes nothing: the decision stays level-triggered and restart-safe.
    """
    if not is_serving:
        why = (
            (c.SERVICE_NAME_TAKEN, f"all calls for this task go to the LLM: {service_taken}")
            if service_taken
            else (c.SCALED_TO_ZERO, _scaled_to_zero_message())
            if scaled_to_zero
            else (
                c.WAKING_FROM_ZERO,
                "calls came back to a task scaled to zero; they go to the LLM until its "
                "Triton replica is ready",
            )
            if waking
            else (
                c.NO_READY_REPLICAS,
                "no Triton replica of the deployed model is ready; calls go to the LLM until "
                "one is",
            )
            if deployed
            else (c.NO_SERVING_MODEL, NO_SERVING_MODEL_MESSAGE)
        )
        return (
            (c.UNKNOWN, c.NOT_SERVING, "no SLM is serving"),
            (c.TRUE, *why),
            lv.MODE_LLM,
            0,
        )
    slo_spec = (spec.get("serving") or {}).get("slo") or {}
    policy = spec["fallback"].get("policy") or {}
    fb = lv.outage_over(
        FallbackState(
            bool(prev.get("fallback", False)),
            int(prev.get("breachStreak", 0)),
            int(prev.get("healthyStreak", 0)),
            str(prev.get("fallbackReason", "")),
        ),
        ready,
    )
    ro = Rollout(
        str(prev.get("rolloutMode", "")),
        int(prev.get("canaryPercent", 0)),
        str(prev.get("rolloutReason", "")),
        int(prev.get("canaryHealthyWindows", 0)),
    )
    breached: bool | None = prev.get("sloBreached")
    if due and m is not None:
        breached = lv.slo_breached(m, slo_spec)
        fb = lv.fallback_step(
            breached,
            ready,
            fb,
            int(policy.get("breachWindows", 3)),
            int(policy.get("recoveryWindows", 5)),
        )
        # A breached window rolls a canary back to shadow whatever fallback does in it: with
        # breachWindows 1 the same window turns fallback on, and a canary that merely held
        # would keep its healthy windows and be promoted the moment fallback ended.
        canary_breached = bool(breached) and ro.mode == lv.MODE_CANARY
        hold = earlier_pods and bool(ro.mode)
        stepped = canary_breached or not ro.mode or (not fb.active and not hold)
        if stepped:
            ro = lv.rollout_step(
                ro if ro.mode else Rollout(lv.MODE_LLM, 0, ""),
                m,
                breached,
                spec.get("rollout") or {},
            )
        elif hold:
            ro = Rollout(ro.mode, ro.canary_percent, ROLLOUT_WAITS_FOR_REPLICAS, ro.canary_healthy)
        # else: under fallback the LLM answers every call and the SLM only gets shadow copies,
        # so there is no canary to judge: the rollout holds, and goes on once fallback is off
        # (otherwise recovery windows would promote shadow -> canary -> slm unseen).
        live["lastEvaluated"] = now
        # The copies are spent only by a window whose rollout step could use them: one with
        # no SLO verdict (no SLM latency sample in its range) or under fallback pools them on.
        # Copies answered by pods of an earlier template say nothing of this model: spent.
        live["agreementSince"] = (
            now
            if earlier_pods
            else _agreement_since(
                m, spec, prev, now, window, judged=stepped and breached is not None
            )
        )
        live["observed"] = {
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in (
                ("p95LatencyMs", m.p95_latency_ms),
                ("errorRate", m.error_rate),
                ("requestRate", m.request_rate),
                ("queueMs", m.queue_ms),
                ("agreement", m.agreement),
                ("shadowSamples", m.shadow_samples),
            )
            if v is not None
        }
        quiet = breached is None and prev.get("sloBreached") is not None
        if quiet:
            # No SLM call in the window (sparse calls; under fallback the SLM sees only shadow
            # copies) leaves the verdict of the last window that had some, with its figures,
            # as it leaves the streaks (lv.fallback_step): SLOMet said MetricsUnavailable and
            # then breached again, an Event each way and a Warning every other window.
            breached = prev.get("sloBreached")
            live["observed"] = {**_slm_measured(prev.get("observed")), **live["observed"]}
            if edited:  # an SLO edit judges the kept figures again, as outside a window
                breached = _judged_again(live["observed"], slo_spec, breached)
            if not fb.active:
                # fallback_step names a window without a verdict MetricsUnavailable; this one
                # has the last window's.
                fb = dataclasses.replace(fb, reason="SLOAtRisk" if fb.breach_streak else "SLOMet")
    else:
        quiet = quiet_before
        for key in ("lastEvaluated", "agreementSince", "observed"):
            if key in prev:
                live[key] = prev[key]
        if edited:
            breached = _judged_again(live.get("observed"), slo_spec, breached)
        rollout = spec.get("rollout") or {}
        direct = rollout.get("strategy") == "direct"
        if not ro.mode or (direct and ro.mode != lv.MODE_SLM and not earlier_pods):
            # Direct needs no window: an edit to it (the documented way out of a shadow
            # that no metrics can advance) applies now, not only to a new revision. While
            # pods of an earlier template answer, the rollout holds, as a window says.
            ro = lv.rollout_step(Rollout(lv.MODE_LLM, 0, ""), Metrics(), None, rollout)
    for key in ("lastScaleTime", "scaleReason"):
        if key not in live and key in prev:
            live[key] = prev[key]
    live.update(
        {
            "fallback": fb.active,
            "fallbackReason": fb.reason or "SLOMet",
            "breachStreak": fb.breach_streak,
            "healthyStreak": fb.healthy_streak,
            "rolloutMode": ro.mode,
            "rolloutReason": ro.reason,
            "canaryPercent": ro.canary_percent,
            "canaryHealthyWindows": ro.canary_healthy,
        }
    )
    if breached is not None:
        live["sloBreached"] = breached
    obs_m = live.get("observed") or {}
    detail = _slo_detail(obs_m, slo_spec)
    unanswered = m is None and not not_due
    # A judged window tells whether Prometheus has the gateway's series of the task; a pass
    # between windows says what the last one said (one Prometheus did not answer, nothing).
    unscraped = (
        _no_gateway_series(m) if due and m is not None else unscraped_before and not unanswered
    )
    if breached is None or (unanswered and not obs_m):
        slo = (
            c.UNKNOWN,
            c.METRICS_UNAVAILABLE,
            NO_GATEWAY_SERIES if unscraped else "no live metrics for this task's SLM yet",
        )
    elif breached:
        slo = (c.FALSE, c.SLO_BREACHED, f"SLO breached: {detail}")
    else:
        slo = (c.TRUE, c.WITHIN_SLO, f"within SLO: {detail}")
    if quiet and slo[1] != c.METRICS_UNAVAILABLE:
        slo = (slo[0], slo[1], QUIET_WINDOW + slo[2])
    if unanswered and breached is not None:
        slo = (
            c.UNKNOWN,
            c.METRICS_UNAVAILABLE,
            f"Prometheus did not answer; keeping the last decision ({detail})",
        )
    if blind:
        slo = (
            c.UNKNOWN,
            c.METRICS_UNAVAILABLE,
            f"{blind}: live control is off (no SLO check, fallback on a breach, autoscaling "
            "or canary) until it has live metrics",
        )
    if fb.active:
        windows = int(policy.get("recoveryWindows", 5))
        fallback = (
            c.TRUE,
            fb.reason or c.SLO_BREACHED,
            f"calls go to the LLM: {fb.reason}; recovery after {windows} healthy "
            f"windows ({fb.healthy_streak} so far)",
        )
    else:
        rollout = ro.mode
        if ro.mode == lv.MODE_CANARY:
            rollout += f", {_canary_windows(ro.canary_healthy, spec)}"
        fallback = (c.FALSE, c.SLM_SERVING, _serving_message(ro, rollout))
    mode, pct = lv.route_mode(ro, fb)
    return slo, fallback, mode, pct


#: Measurements of the SLM itself in ``status.live.observed``: what an SLO verdict rests on.
_SLM_MEASURED = ("p95LatencyMs", "errorRate")

#: How SLOMet's message starts after a window with no SLM call (it keeps the last verdict).
QUIET_WINDOW = "no SLM call in the last window; last verdict: "


#: SLOMet's message while Prometheus answers but has no series of the task's gateway.
NO_GATEWAY_SERIES = (
    "Prometheus has no slm_gateway series for this task: is the gateway scraped? (the "
    "chart's ServiceMonitor needs the labels of the Prometheus's serviceMonitorSelector)"
)


def _no_gateway_series(m: Metrics) -> bool:
    """Whether Prometheus answered a window without a single slm_gateway series of the task.

    Why no other query is needed: a gateway that routes the task exports
    ``slm_gateway_route_mode`` for it from its first scrape on, which the request-rate query
    reads as 0 until a call comes (:func:`slm_operator.prom.queries`), and the counts of
    LLM answers and captured records are instant reads of its counters. With none of them
    Prometheus scrapes no gateway that routes the task: most likely the monitors' labels do
    not match its selector, the quickstart's likeliest mistake. SLOMet said "no live metrics
    for this task's SLM yet", the words for a scraped gateway no call has reached yet.
    """
    return m.empty and all(
        v is None for v in (m.request_rate, m.llm_answers, m.captured_records, m.shadow_samples)
    )


def _unscraped_before(prev_conds: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the last judged window found no gateway series of the task, as SLOMet said
    (reconciles until the next window say the same: see :func:`_quiet_before`)."""
    slo = c.find(prev_conds, c.SLO_MET) or {}
    return slo.get("message") == NO_GATEWAY_SERIES


def _quiet_before(prev_conds: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the last judged window had no SLM call, as SLOMet said.

    Why from the condition: status.live keeps the figures of the last window with calls, and
    nothing else tells a quiet window from it; reconciles until the next window must say
    what the one after it said, or SLOMet's message would change at every reconcile.
    """
    slo = c.find(prev_conds, c.SLO_MET) or {}
    return str(slo.get("message") or "").startswith(QUIET_WINDOW)


def _slm_measured(observed: Mapping[str, Any] | None) -> Obj:
    return {k: v for k, v in (observed or {}).items() if k in _SLM_MEASURED}


def _judged_again(
    observed: Mapping[str, Any] | None, slo: Mapping[str, Any], last: bool | None
) -> bool | None:
    """The last window's measurements judged against ``slo``, or ``last`` when none is kept.

    Why: an SLO edit applies at once to what SLOMet says; until the next window the last
    verdict, worded with the new limits, read "SLO breached: p95 900 ms (SLO 1000 ms)". Only
    on an edit: the kept measurements are rounded, and one within the rounding of a limit
    would otherwise flip the verdict between windows.
    """
    kept = observed or {}
    again = lv.slo_breached(
        Metrics(p95_latency_ms=kept.get("p95LatencyMs"), error_rate=kept.get("errorRate")), slo
    )
    return last if again is None else again


def _slo_detail(observed: Mapping[str, Any], slo: Mapping[str, Any]) -> str:
    """The last window's p95 latency and error rate beside their SLO, for SLOMet.

    Either may be missing (no SLM answer timed in the window, say, when its circuit was open):
    it is "not measured", not "nan ms" or a made-up 0.0%.
    """
    p95, err = observed.get("p95LatencyMs"), observed.get("errorRate")
    p95_lim = float(slo.get("p95LatencyMs", 500))
    err_lim = float(slo.get("maxErrorRate", 0.01))
    return (
        f"p95 {'not measured' if p95 is None else f'{p95:.0f} ms'} (SLO {p95_lim:.0f} ms), "
        f"error rate {'not measured' if err is None else _pct(err)} (SLO {_pct(err_lim)})"
    )


def _serving_message(ro: Rollout, rollout: str) -> str:
    """FallbackActive's message (and the route's reason) while no fallback is on.

    In shadow the LLM still answers every call, and in a canary most of them: saying that
    the SLM serves them misled whoever read why the SLM's answers were not reaching anyone.
    """
    if ro.mode == lv.MODE_SHADOW:
        return (
            "the LLM answers this task's calls; the SLM gets shadow copies for comparison "
            f"(rollout {rollout})"
        )
    if ro.mode == lv.MODE_CANARY:
        return (
            f"the SLM serves {ro.canary_percent}% of this task's calls and the LLM the rest "
            f"(rollout {rollout})"
        )
    return f"the SLM serves this task (rollout {rollout})"


def _canary_windows(healthy: int, spec: Mapping[str, Any]) -> str:
    """How far a canary is from its promotion, in FallbackActive's and Ready's words."""
    windows = int((spec.get("rollout") or {}).get("canaryWindows", 3))
    return f"{healthy} of {windows} healthy windows before promotion"


#: The pods that take the SLM's calls while a promoted model's own are not ready.
_EARLIER_PODS = "the pods of the model served before (the Deployment's previous template)"


def _who_answers(mode: str, live: Mapping[str, Any]) -> str:
    """Who answers the task's calls in route ``mode`` while the pods of the Deployment's
    previous template stand in for the promoted model's (:func:`_earlier_pods_answer`).

    Why: a newly promoted revision starts its rollout in shadow, where the LLM answers every
    call and those pods only get shadow copies; Ready said that they answered the calls.
    They do take the route's SLM share (a canary's, ``rollout.strategy: direct``'s all).
    """
    if mode == lv.MODE_SHADOW:
        return f"the LLM answers the task's calls and {_EARLIER_PODS} get shadow copies of them"
    if mode == lv.MODE_CANARY:
        return (
            f"{_EARLIER_PODS} answer {live.get('canaryPercent', 0)}% of the task's calls in a "
            "canary and the LLM the rest"
        )
    if mode == lv.MODE_SLM:
        return f"{_EARLIER_PODS} answer the task's calls"
    return "the LLM answers the task's calls"


def _stuck_message(model: str, why: str, waiting: str, mode: str, live: Mapping[str, Any]) -> str:
    """Ready's message (RolloutStuck) for a ``model`` whose rollout is stuck (``why``:
    :func:`_rollout_stuck`), naming the stuck pod and its reason (``waiting``, the kubelet's
    or the scheduler's words) where one is known, and who answers meanwhile."""
    pod = waiting or "its new pods are not ready (kubectl describe pods of the Deployment)"
    return f"the rollout of {model} is stuck: {why}; {pod}; meanwhile {_who_answers(mode, live)}"


def _ready_message(
    model: str,
    earlier_pods: bool,
    mode: str,
    live: Mapping[str, Any],
    spec: Mapping[str, Any],
    blind: str = "",
) -> str:
    """Ready's message for a served ``model`` with no fallback on; ``live`` is status.live.

    In shadow the LLM answers every call, and in a canary most of them: "serves the task's
    calls" said otherwise. A shadow with no metrics at all (``blind``) never starts a canary:
    it says so, and what serves the model without them.
    """
    if earlier_pods:
        return f"{model} is rolling out; until its replicas are ready, {_who_answers(mode, live)}"
    if mode == lv.MODE_SHADOW and blind:
        return (
            f"{model} is in shadow: the LLM answers the task's calls and the model gets copies "
            f"of them; {blind}, and no canary starts without live metrics: set "
            "rollout.strategy: direct to serve the model without them"
        )
    if mode == lv.MODE_SHADOW:
        return (
            f"{model} is in shadow: the LLM answers the task's calls and the model gets copies "
            "of them, until its agreement with the LLM starts a canary"
        )
    if mode == lv.MODE_CANARY:
        healthy = int(live.get("canaryHealthyWindows", 0))
        return (
            f"{model} serves {live.get('canaryPercent', 0)}% of the task's calls in a canary "
            f"and the LLM the rest ({_canary_windows(healthy, spec)})"
        )
    return f"{model} serves the task's calls"


def _metrics_blind(obs: Observed, live_prev: Mapping[str, Any]) -> str:
    """Why live control has had no metrics for this task at all, or "" when it has had some
    (or was not asked in this pass).

    Why: without a Prometheus (the chart's default) or with one that never answered, SLOMet
    said "no live metrics for this task's SLM yet" and Ready that the model stays in shadow
    "until its agreement with the LLM starts a canary", for good: nothing said that live
    control was off, nor that ``rollout.strategy: direct`` serves a model without it.
    ``status.live.lastEvaluated`` is written only by a window judged on metrics.
    """
    if obs.metrics is not None:
        return ""
    if obs.prometheus_configured is False:
        return "no Prometheus is configured (SLM_FLEET_PROMETHEUS_URL)"
    if obs.metrics_not_due or live_prev.get("lastEvaluated"):
        return ""
    if obs.prometheus_configured:
        return "Prometheus (SLM_FLEET_PROMETHEUS_URL) has not answered for this task yet"
    return (
        "no Prometheus has answered for this task (SLM_FLEET_PROMETHEUS_URL unset, or "
        "Prometheus unreachable)"
    )


def _outage_message(model: str, serving_status: Mapping[str, Any], waiting: str) -> str:
    """Ready's message while no replica of a ``model`` that served is ready, with why a
    Triton pod is stuck (``waiting``: its scheduler's or kubelet's words), when one is."""
    counts = f"{serving_status.get('readyReplicas', 0)}/{serving_status.get('desiredReplicas', 0)}"
    return f"{model} has no ready Triton replica ({counts}); calls go to the LLM until one is" + (
        f"; {waiting}" if waiting else ""
    )


#: Why the route is ``llm`` while no model serves (FallbackActive's NoServingModel message).
NO_SERVING_MODEL_MESSAGE = "all calls for this task go to the LLM until an SLM is served"


def _service_taken(obs: Observed) -> str:
    """Why the task's calls must not go to its Service: one of its serving name exists and
    is someone else's (:attr:`Observed.foreign_children`), or "".

    Why: that Service is not applied (it would be taken over), so it selects whatever pods
    its owner chose; a route naming ``http://<task>-slm.<ns>.svc:8000`` sent those pods the
    shadow copies of the agents' calls (prompts, tool arguments), judged their answers and
    walked the rollout on. Unless the task's own ``serving-endpoint`` annotation points the
    gateway elsewhere, the model is not served until the name is freed.
    """
    meta = obs.task["metadata"]
    # A Deployment of the name that is someone else's is not applied either: no Triton pod
    # of this task runs, and saying so beats "no ready replica", an outage without end.
    taken = [k for k in ("Service", "Deployment") if k in obs.foreign_children]
    if not taken or (meta.get("annotations") or {}).get(n.ANNOTATION_ENDPOINT):
        return ""
    return (
        f"{taken[0]} {n.serving_name(meta['name'])} belongs to something else (no "
        "ownerReference to this AgentTask: made by hand or by another tool?), so the SLM gets "
        f"none of this task's calls: rename this task or the {taken[0]}"
    )


def _route_llm(spec: Mapping[str, Any], prev: Mapping[str, Any]) -> Obj:
    """The LLM fields of ``status.route``: the spec's, or the last route's while the spec's
    cannot be used (see :func:`validate`).

    Why: the gateway prefers these fields over the spec's. Kept as they were while any part
    of the spec was invalid, an edit that changed the LLM along with something invalid (a
    candidate on another claim) left the calls on the old LLM; taken from a spec whose LLM
    is the invalid part, they would make the gateway drop the task's route and fail every
    call, where the last usable LLM can still answer them.
    """
    llm = (spec.get("fallback") or {}).get("llm") or {}
    if http_url_problem(str(llm.get("baseURL") or "")) or not llm.get("model"):
        route = prev.get("route") or {}
        return {k: route[k] for k in ("llmBaseURL", "llmModel", "llmPrice") if k in route}
    return {
        "llmBaseURL": llm["baseURL"],
        "llmModel": llm["model"],
        **({"llmPrice": dict(llm["price"])} if llm.get("price") else {}),
    }


def _route(
    spec: Mapping[str, Any],
    prev: Mapping[str, Any],
    mode: str,
    reason: str,
    canary: int = 0,
    endpoint: str = "",
    selected: Mapping[str, Any] | None = None,
    earlier_pods: bool = False,
) -> Obj:
    """``status.route``: how the gateway routes the task's calls.

    ``earlier_pods``: pods of the Deployment's previous template may still answer
    (:func:`_earlier_pods_answer`); the confidence threshold is then the stricter of the
    last route's and ``selected``'s (:func:`_route_threshold`).
    """
    budget = ((spec.get("serving") or {}).get("slo") or {}).get("slmTimeoutMs")
    threshold = _route_threshold(prev, selected, earlier_pods)
    return {
        "mode": mode,
        **({"canaryPercent": canary} if mode == lv.MODE_CANARY else {}),
        **_route_llm(spec, prev),
        "metric": spec["evaluation"]["metric"],
        **({"slmTimeoutMs": int(budget)} if budget is not None else {}),
        "reason": reason,
        **({"slmEndpoint": endpoint} if mode != lv.MODE_LLM else {}),
        **(
            {"confidenceThreshold": threshold}
            if mode != lv.MODE_LLM and threshold is not None
            else {}
        ),
    }


def _route_threshold(
    prev: Mapping[str, Any], selected: Mapping[str, Any] | None, earlier_pods: bool
) -> float | None:
    """The route's ``confidenceThreshold``: ``selected``'s, or, while pods of the Deployment's
    previous template may still answer (``earlier_pods``), the higher of it and the last
    route's, which that previous model was served with.

    Why: a threshold is calibrated on its own model's held-out calls (the lowest confidence
    at which it reaches ``targetPrecision``). The route took the promoted model's at once,
    while the previous model's pods still answered until the new ones were ready, for good
    if they never were: answers of the old model were accepted at a confidence calibrated
    for another, below ``targetPrecision``. The higher of the two holds that precision for
    either; once only the new pods answer, the new threshold alone applies.
    """
    new = (selected or {}).get("threshold")
    before = (prev.get("route") or {}).get("confidenceThreshold")
    if not earlier_pods or not isinstance(before, int | float) or isinstance(before, bool):
        return new
    return before if new is None else max(before, new)


def _stuck_event(
    prev_conds: Sequence[Mapping[str, Any]], conds: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str, str]]:
    """The Warning for a rollout that became stuck while Ready was already False (a
    fallback's reason), which Ready's transitions do not post (only its flips are news);
    when Ready flips to RolloutStuck, that transition's Warning is the one. Once: not while
    Ready already said RolloutStuck."""
    ready, before = c.find(conds, c.READY) or {}, c.find(prev_conds, c.READY) or {}
    if ready.get("reason") != c.ROLLOUT_STUCK or before.get("reason") == c.ROLLOUT_STUCK:
        return []
    if before.get("status") != c.FALSE:
        return []  # a flip: c.transitions posts it
    return [("Warning", c.ROLLOUT_STUCK, f"{c.READY}={c.FALSE}: {ready.get('message', '')}")]


def _events(prev: Mapping[str, Any], status: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Events to post for ``status`` written over ``prev``: each condition's transition
    (:func:`slm_operator.conditions.transitions`), and a Warning for each candidate of the
    revision in training whose fine-tune newly failed.

    Why the candidates: while others still train, Trained stays Unknown (JobRunning), so a
    candidate's failure changed no condition's status or reason and no event said so, then
    or once the others were done (PartiallyTrained is Normal). Posted when its entry in
    ``status.candidates`` turns Failed, so once, and not beside Trained's own JobFailed
    Warning (every candidate failed), which names them all.
    """
    prev_conds, conds = prev.get("conditions") or [], status.get("conditions") or []
    events = c.transitions(prev_conds, conds)
    training = (status.get("revision") or {}).get("training")
    trained = c.find(conds, c.TRAINED) or {}
    if not training or (trained.get("status"), trained.get("reason")) == (c.FALSE, c.JOB_FAILED):
        return events
    failed_before = {
        (x.get("name"), x.get("revision"), x.get("job"))
        for x in prev.get("candidates") or []
        if x.get("state") == FAILED
    }
    for x in status.get("candidates") or []:
        key = (x.get("name"), x.get("revision"), x.get("job"))
        if x.get("revision") == training and x.get("state") == FAILED and key not in failed_before:
            why = x.get("message") or "see Trained"
            events.append(
                (
                    "Warning",
                    c.JOB_FAILED,
                    f"candidate {x['name']} of revision {training} failed: {why}",
                )
            )
    return events


def plan(obs: Observed) -> Plan:
    """What to apply, delete and report for one AgentTask (see the module docstring).

    An invalid spec (:func:`validate`) stops training, but not the control of a model
    already served: its fallback, rollout and scaling go on for the active revision, so an
    SLM over its SLO still hands its calls to the LLM while someone fixes the spec (an
    unparsable retraining schedule, an edited candidate). Only the retraining trigger, which
    reads the spec being refused, waits. Ready and phase say InvalidSpec/Failed as for any
    invalid spec; the training conditions say InvalidSpec and no Job is created or deleted.
    """
    task = obs.task
    meta, spec = task["metadata"], task["spec"]
    gen = int(meta.get("generation") or 0)
    prev: Mapping[str, Any] = task.get("status") or {}
    prev_conds = prev.get("conditions") or []
    now = _ts(obs.now)
    now_us = _micro_ts(obs.now)  # for live control: windows and cooldowns need sub-second
    out = Plan()

    def cond(t: str, triple: tuple[str, str, str]) -> Obj:
        return c.condition(t, triple[0], triple[1], _capped(triple[2]), gen, now)

    invalid_step = (c.UNKNOWN, c.INVALID_SPEC, "the spec is invalid; see Ready")
    problem = validate(task, obs.reserved_accounts)
    active_rev, active_uri, active_cand, replicas, ready = _deployment_facts(obs.deployment)
    # A Job being deleted (kept by another controller's finalizer) counts as gone, which it
    # is about to be: its result is not read, and it is neither deleted again nor applied
    # while its name is taken; the step that waits for it says so (:func:`_job_outcome`).
    jobs = {name: v for name, v in obs.jobs.items() if not v.deleting}
    deleting = {name: v for name, v in obs.jobs.items() if v.deleting}
    if obs.deployment is None:  # deleted: the revision status last reported still serves
        active_rev, active_uri, active_cand = _recorded_active(prev, jobs, meta["name"])
    out.invalid = problem
    if problem and (n.task_name_problem(meta["name"]) or not (active_rev and active_uri)):
        # Nothing served: nothing to keep under control until the spec is fixed. The calls
        # go to the LLM meanwhile, and FallbackActive (the Fallback column) says so.
        served_none = not (active_rev and active_uri)
        fallback = (c.TRUE, c.NO_SERVING_MODEL, NO_SERVING_MODEL_MESSAGE)
        conds = [
            cond(t, fallback if served_none and t == c.FALLBACK_ACTIVE else invalid_step)
            for t in c.ALL_TYPES
            if t != c.READY
        ]
        conds.append(cond(c.READY, (c.FALSE, c.INVALID_SPEC, problem)))
        out.status = {
            **dict(prev),
            "observedGeneration": gen,
            "phase": PHASE_FAILED,
            "message": _capped(problem),
            "conditions": c.merge_conditions(prev_conds, conds),
        }
        if served_none:  # (an invalid name keeps an older one's route)
            out.status["route"] = _route(spec, prev, lv.MODE_LLM, NO_SERVING_MODEL_MESSAGE)
        out.events = c.transitions(prev_conds, out.status["conditions"])
        return out

    retrain_prev: Mapping[str, Any] = prev.get("retraining") or {}
    epoch = int(retrain_prev.get("epoch", 0))
    rev = n.revision_of(spec, epoch)
    legacy = n.legacy_revision_of(spec, epoch)
    named = (
        active_rev,
        (prev.get("revision") or {}).get("training"),
        retrain_prev.get("concludedRevision"),
    )
    if legacy in named:
        rev = legacy  # named by an earlier operator from this same spec: not trained again
    training_needed = rev != active_rev and not problem
    prev_selected = prev.get("selectedModel") or {}
    # A retraining beside a served model of the same spec (an earlier epoch, not necessarily
    # the previous one: that may have lost to it) must beat the served model's score.
    retraining_beside = (
        training_needed
        and epoch > 0
        and bool(active_rev)
        and prev_selected.get("revision") == active_rev
        and active_rev
        in {f(spec, e) for e in range(epoch) for f in (n.revision_of, n.legacy_revision_of)}
    )
    must_beat = prev_selected.get("score") if retraining_beside else None
    if training_needed:  # while a prune runs, this revision's new Jobs wait for it
        deleting = {**deleting, **_held_for_prune(task, rev, obs.jobs)}
    step = (
        _invalid_spec_step(prev, invalid_step, active_rev)
        if problem
        else _pipeline(
            task,
            rev if training_needed else active_rev,
            jobs,
            obs.server_now or obs.now,
            out.apply if training_needed else None,
            must_beat,
            obs.trainer_service_account,
            "" if training_needed else active_cand,
            obs.data_recheck,
            _data_ready_before(prev, rev, (c.FALSE, c.WAITING_FOR_DATA)),
            obs.images,
            _data_ready_before(
                prev, rev if training_needed else active_rev, (c.TRUE, c.DATA_PREPARED)
            ),
            prev.get("candidates") or (),
            prev_selected,
            deleting=deleting,
        )
    )

    if not training_needed and not problem and step.selected is None:
        step = _served_step(step, prev, active_rev)
        if active_uri:
            step = _promoted_step(step, task, jobs, active_rev, active_cand, prev_selected)
    selected: Obj | None = prev_selected if prev_selected.get("revision") == active_rev else None
    if not training_needed and step.selected is not None:
        selected = {**step.selected, **({"artifactURI": active_uri} if active_uri else {})}
    # A retraining that lost to the served model, or failed, is over: the served model stays
    # and new calls count towards the next retraining (else S6 would stop after one loss).
    # The verdict is recorded in status.retraining.concludedRevision: its Jobs are kept for
    # their results, but once they are gone (deleted by hand, a cleanup) only status remembers
    # that this revision already lost, and it must not train again. Jobs still there that
    # show a winner (a failed export Job deleted to retry it) go on as usual.
    concluded = retraining_beside and retrain_prev.get("concludedRevision") == rev
    if concluded and not step.terminal_failure and step.selected is None:
        step = _concluded_step(step, prev)
    retrain_over = retraining_beside and step.terminal_failure
    if retrain_over:  # never re-created (and so re-run) if deleted
        out.apply = [o for o in out.apply if o["kind"] != "Job"]
    spec_revision_starts = (
        training_needed
        and not retraining_beside
        and (prev.get("revision") or {}).get("training") != rev
    )
    # Promoted once its Deployment is written: a refused one (a hand edit the API server
    # rejects, a quota, an admission policy) left the status naming a revision no pod served,
    # with the Jobs of the one still served deleted as abandoned. Not promoted, it stays in
    # revision.training and the next pass promotes it if the Deployment is taken then.
    if training_needed and step.exported_uri and not obs.deployment_refused:
        active_rev, active_uri, active_cand = (
            rev,
            step.exported_uri,
            step.selected["candidate"] if step.selected else "",
        )
        selected = step.selected
        training_needed = False

    # The Service URL, unless an annotation points the gateway elsewhere (an external Triton,
    # a mesh ingress, or the local demo's tritonserver).
    endpoint = (meta.get("annotations") or {}).get(n.ANNOTATION_ENDPOINT) or b.service_endpoint(
        task
    )
    serving_status: Obj = {}
    earlier_pods = False  # (only with ready replicas: see _earlier_pods_answer)
    stuck_rollout = ""  # why the rollout those earlier pods stand in for is stuck
    live_prev: Mapping[str, Any] = prev.get("live") or {}
    prev_active = (prev.get("revision") or {}).get("active") or ""
    if prev_active and active_rev != prev_active:
        # A new revision takes over: the rollout step reached belongs to the model it replaces,
        # so the new one starts its own progressive rollout (shadow) instead of all calls at once.
        live_prev = {k: v for k, v in live_prev.items() if k not in _ROLLOUT_KEYS}
    window = judged_window(spec, obs.min_window_s)
    last_eval = parse_time(live_prev.get("lastEvaluated"))
    m = obs.metrics
    due = m is not None and metrics_due(task, obs.now, obs.min_window_s)
    live: Obj = {}
    if active_rev and active_uri:
        want = desired_replicas(spec, prev)
        decision = _autoscale(spec, m, want, live_prev, obs.now) if due and m is not None else None
        # Up only while replicas serve (not while the first ones start), except from zero:
        # a task scaled to zero has no replica to wait for, and its calls (answered by the
        # LLM meanwhile) must bring one back. Down (after the usual cool-down) whether or
        # not a replica is ready, once the model has served (live state; a first rollout
        # keeps its replica): a replica woken from zero that never became ready (no GPU
        # node, a crash loop) kept a task with minReplicas 0 at one replica, in an outage,
        # for good once its calls stopped.
        if decision is not None and (
            ready > 0 or want == 0 or (bool(live_prev) and decision.replicas <= want)
        ):
            live["scaleReason"] = decision.reason
            if decision.replicas != want:
                live["lastScaleTime"] = now_us  # whole seconds cut cooldowns short
                want = decision.replicas
        if want > 0 and (prev.get("serving") or {}).get("desiredReplicas") == 0:
            # Up from zero, whatever raised it (calls, or serving.minReplicas raised): the
            # replica's startup budget starts now (_waking_from_zero). Stamped by autoscaling
            # decisions alone, a raised minimum read as an outage (NoReadyReplicas, a Warning)
            # while its replica loaded the model.
            live["lastScaleTime"] = live.get("lastScaleTime") or now_us
        out.apply.append(
            b.triton_deployment(task, active_rev, active_uri, active_cand, want, obs.images)
        )
        out.apply.append(b.triton_service(task))
        # maxUnavailable=0: while a new revision rolls out, the old pods keep serving.
        # Ready replicas, not the Available condition: with maxUnavailable=0 a scale-up makes
        # the Deployment briefly un-Available although its ready pods serve.
        stuck = f"; {obs.serving_waiting}" if obs.serving_waiting else ""
        # Not gated on the Service: it is applied in this very pass, so one found missing (a
        # hand-deleted one) is back before the gateway calls again. Gated, the pass that
        # re-applied it reported an outage that never was (NoReadyReplicas with every replica
        # ready, a Warning, fallback on, route llm) and the next one flipped it all back.
        if ready > 0:
            rolling = _rolling_out(obs.deployment)
            earlier_pods = _earlier_pods_answer(obs.deployment, active_rev)
            if earlier_pods:  # once stuck, until the rollout completes (_stuck_verdict)
                stuck_rollout = _stuck_verdict(
                    prev_conds,
                    prev_active,
                    active_rev,
                    _rollout_stuck(obs.deployment, active_rev, obs.server_now or obs.now),
                )
            serving = (
                c.TRUE,
                c.DEPLOYMENT_AVAILABLE,
                f"{ready}/{replicas} Triton replicas ready"
                + (
                    f"; rolling out {active_cand} (revision {active_rev})"
                    if rolling
                    else f", serving {active_cand} (revision {active_rev})"
                )
                + stuck,
            )
        elif want == 0 and ready == 0:
            serving = (c.FALSE, c.SCALED_TO_ZERO, _scaled_to_zero_message())
        else:
            serving = (
                c.FALSE,
                c.DEPLOYMENT_PROGRESSING,
                f"waiting for Triton replicas of revision {active_rev} to become ready "
                f"({ready}/{want}){stuck}",
            )
        serving_status = {
            "endpoint": endpoint,
            "deployment": n.serving_name(meta["name"]),
            "replicas": replicas,
            "readyReplicas": ready,
            "desiredReplicas": want,
        }
    elif step.exported_uri and step.selected is not None and obs.deployment_refused:
        serving = (
            c.FALSE,
            c.DEPLOYMENT_PROGRESSING,
            f"the API server did not take the Deployment of {step.selected['candidate']} "
            f"(revision {rev}); it is applied again at every pass",
        )
    elif step.selected is not None and step.evaluated[0] == c.TRUE:
        serving = (
            c.FALSE,
            c.EXPORTING,
            f"exporting {step.selected['candidate']} as a Triton model repository"
            + (f": {step.export_waiting}" if step.export_waiting else ""),
        )
    else:
        serving = (c.FALSE, c.NO_MODEL, "no model has passed the evaluation gate yet")
    pruned = jobs.get(n.prune_job_name(meta["name"], active_rev)) if active_rev else None
    if serving[0] == c.TRUE and pruned is not None and pruned.state == FAILED:
        serving = (serving[0], serving[1], f"{serving[2]}; {_prune_failed(pruned)}")
    service_taken = _service_taken(obs) if active_rev and active_uri else ""
    if service_taken:
        # Its replicas are kept (the Deployment is the task's), but no call reaches them:
        # not serving, so the route is llm, without an endpoint, and the rollout waits.
        serving = (c.FALSE, c.SERVICE_NAME_TAKEN, service_taken)
    is_serving = serving[0] == c.TRUE
    scaled_to_zero = serving[1] == c.SCALED_TO_ZERO
    waking = (
        serving[1] == c.DEPLOYMENT_PROGRESSING
        and bool(live_prev)
        and _waking_from_zero(
            prev_conds, live.get("lastScaleTime") or live_prev.get("lastScaleTime"), obs.now
        )
    )

    blind = _metrics_blind(obs, live_prev)
    slo, fallback, route_mode, canary = _live_control(
        spec,
        is_serving,
        ready,
        m,
        due,
        live_prev,
        live,
        now_us,
        # An outage of a model that served (it has live state), not a first rollout, which
        # would otherwise post a Warning on every new task.
        deployed=bool(active_rev and active_uri and live_prev),
        not_due=obs.metrics_not_due,
        window=window,
        scaled_to_zero=scaled_to_zero,
        earlier_pods=earlier_pods,
        waking=waking,
        edited=int(prev.get("observedGeneration") or 0) != gen,
        blind=blind,
        quiet_before=_quiet_before(prev_conds),
        service_taken=service_taken,
        unscraped_before=_unscraped_before(prev_conds),
    )
    pipeline = [(c.DATA_READY, step.data), (c.TRAINED, step.trained), (c.EVALUATED, step.evaluated)]
    # A model that served has no ready replica (a crash loop, a drain): an outage, not a
    # rollout (which a first deployment without live state still is).
    outage = not is_serving and fallback[1] == c.NO_READY_REPLICAS
    if problem:
        ready_c = (c.FALSE, c.INVALID_SPEC, problem)
    elif is_serving and stuck_rollout:
        # Ahead of a fallback's reason: the calls are answered either way (the message says
        # by whom), but only someone looking at the new pods ends this.
        ready_c = (
            c.FALSE,
            c.ROLLOUT_STUCK,
            _stuck_message(
                f"{active_cand} (revision {active_rev})",
                stuck_rollout,
                obs.serving_waiting,
                route_mode,
                live,
            ),
        )
    elif is_serving and fallback[0] == c.FALSE:
        model = f"{active_cand} (revision {active_rev})"
        ready_c = (
            c.TRUE,
            c.READY_REASON,
            _ready_message(model, earlier_pods, route_mode, live, spec, blind),
        )
    elif is_serving:
        ready_c = (c.FALSE, fallback[1], fallback[2])
    elif scaled_to_zero:
        ready_c = (
            c.TRUE,
            c.SCALED_TO_ZERO,
            f"{active_cand} (revision {active_rev}) is {serving[2]}",
        )
    elif waking:
        ready_c = (
            c.TRUE,
            c.WAKING_FROM_ZERO,
            f"{active_cand} (revision {active_rev}) is starting a replica for calls that came "
            "back after it scaled to zero; the LLM answers them until it is ready",
        )
    elif outage:
        model = f"{active_cand} (revision {active_rev})"
        ready_c = (
            c.FALSE,
            c.NO_READY_REPLICAS,
            _outage_message(model, serving_status, obs.serving_waiting),
        )
    else:
        blocking = next((t for _, t in pipeline if t[0] != c.TRUE), serving)
        ready_c = (c.FALSE, blocking[1], blocking[2])

    conds = [cond(t, v) for t, v in pipeline]
    conds += [
        cond(c.SERVING, serving),
        cond(c.SLO_MET, slo),
        cond(c.FALLBACK_ACTIVE, fallback),
        cond(c.READY, ready_c),
    ]

    if problem:
        phase = PHASE_FAILED  # as for any invalid spec: someone has to fix it
    elif is_serving or scaled_to_zero or waking or outage:  # a retraining: revision.training
        phase = PHASE_SERVING  # (an outage: Ready and FallbackActive say NoReadyReplicas)
    elif training_needed and not step.terminal_failure:
        phase = PHASE_DEPLOYING if step.exported_uri else step.phase  # (a refused Deployment)
    elif active_rev and active_uri:
        phase = PHASE_DEPLOYING
    elif step.terminal_failure:
        phase = PHASE_FAILED
    else:
        phase = step.phase

    status: Obj = {
        "observedGeneration": gen,
        "phase": phase,
        "message": _capped(ready_c[2]),
        "conditions": c.merge_conditions(prev_conds, conds),
        "revision": {
            "active": active_rev,
            "training": rev if training_needed and not retrain_over else "",
        },
        "candidates": step.candidates,
        "route": _route(
            spec, prev, route_mode, fallback[2], canary, endpoint, selected, earlier_pods
        ),
    }
    if selected:
        status["selectedModel"] = selected
    if serving_status:
        status["serving"] = serving_status
    retraining = dict(retrain_prev)
    if is_serving and due and m is not None and not problem:
        # While a revision trains, the count goes on (a gateway restarted meanwhile would
        # otherwise lose what was captured since the trigger); only the trigger waits.
        may_trigger = not training_needed or retrain_over
        rcfg = spec.get("retraining")
        enabled = bool(rcfg) and (rcfg or {}).get("enabled", True)
        # Only a retraining that is on reads its schedule (validate() vouches for its syntax).
        schedule = (rcfg or {}).get("schedule") if enabled else None
        # The schedule is scanned from the last window that ran this step with a count
        # (status.retraining.scheduleCheckedAt), not from the last judged window: a window
        # that could not act (no ready replica, e.g. scaled to zero at night, or no captured
        # count) must not swallow a fire; the next window that can act sees it. An older
        # status without it scans from the last judged window, as before.
        checked = parse_time(retrain_prev.get("scheduleCheckedAt")) or last_eval
        fired = bool(schedule) and lv.cron_fired(str(schedule), checked, obs.now)
        counted = _count_new_records(retrain_prev, m, spec_revision_starts) if enabled else None
        r = lv.retrain_step(
            rcfg, epoch, None if counted is None else counted[0], fired, may_trigger=may_trigger
        )
        reason = r.reason or str(retrain_prev.get("reason") or "CountingNewExamples")
        if not r.reason and counted is not None and reason == "WaitingForRevision":
            reason = "CountingNewExamples"  # not enough any more: a spec edit started it again
        retraining = {"epoch": r.epoch, "reason": reason}
        new_records = r.new_records if r.new_records is not None else _new_records(retrain_prev)
        if new_records is not None:
            retraining["newRecords"] = new_records
        if counted is not None:
            retraining["gatewayCounters"] = [
                {"series": k, "count": v} for k, v in counted[1].items()
            ]
        elif "gatewayCounters" in retrain_prev:
            retraining["gatewayCounters"] = retrain_prev["gatewayCounters"]
        # A window without series (a restarted gateway that has captured nothing yet) keeps
        # the last total.
        seen = m.captured_records
        if seen is None:
            seen = retrain_prev.get("capturedRecords")
        if seen is not None:
            retraining["capturedRecords"] = int(seen)
        if r.triggered:
            retraining["lastTriggered"] = now
        elif "lastTriggered" in retrain_prev:
            retraining["lastTriggered"] = retrain_prev["lastTriggered"]
        if "concludedRevision" in retrain_prev:
            retraining["concludedRevision"] = retrain_prev["concludedRevision"]
        if schedule and m.llm_answers is not None and may_trigger:
            retraining["scheduleCheckedAt"] = now  # the schedule was acted on up to now
        elif schedule and "scheduleCheckedAt" in retrain_prev:
            retraining["scheduleCheckedAt"] = retrain_prev["scheduleCheckedAt"]
        # else no schedule (or a paused retraining): fires meanwhile are not owed later.
    if spec_revision_starts and retraining.get("newRecords"):
        # A spec edit's revision starts training (a retraining's count starts at its trigger):
        # its data has the calls counted so far. Counted on, they would start a retraining as
        # soon as it is promoted, on little more than what it trained on.
        retraining["newRecords"] = 0
    if retrain_over:
        retraining["concludedRevision"] = rev
    elif retraining.get("concludedRevision") == active_rev:
        del retraining["concludedRevision"]  # it won after all (a retried export): it serves
    if retraining:
        status["retraining"] = retraining
    if not is_serving and active_rev and active_uri and (live_prev or live):
        # No replica ready for now (a crash, a node drain, scaled to zero): the calls go to the
        # LLM meanwhile, but the rollout step, SLO streaks and last scaling belong to the
        # deployed model; forgetting them would restart its rollout in shadow when it is back.
        if due:
            # The window is judged, with no replica to judge (the LLM answers): recorded, or
            # every reconcile until a replica is ready would ask Prometheus all its queries.
            live["lastEvaluated"] = now_us
        merged = {**live_prev, **live}
        # Not while the Service's name is taken: no fallback to recover from once it is
        # freed (lv.outage_over ends only those for want of a replica), the rollout goes on.
        if not service_taken and (
            not merged.get("fallback") or merged.get("fallbackReason") in lv.NO_REPLICA_REASONS
        ):
            # FallbackActive is True for want of a replica (NoReadyReplicas, ScaledToZero,
            # WakingFromZero): status.live says so, in the condition's words. An SLO fallback
            # that was already on keeps its reason, so that its recovery windows still apply
            # when the replicas are back (live.fallback_step).
            merged["fallback"] = True
            merged["fallbackReason"] = fallback[1]
        status["live"] = merged
    if is_serving:
        status["live"] = live
        usage = dict(prev.get("usage") or {})
        if due and m is not None and m.slm_share is not None:
            # From the last window with calls, both: one without any has no share (0 of 0),
            # and its saving of 0 beside the share of an earlier window read as a share that
            # saved nothing. Kept, not dropped: usage says what the task last did, and does
            # not come and go with every quiet window.
            usage["slmShare"] = round(m.slm_share, 4)
            if m.cost_saved_usd is not None:
                usage["costSavedUSD"] = round(m.cost_saved_usd, 4)
            else:
                usage.pop("costSavedUSD", None)
            usage["windowSeconds"] = int(window)
        if usage:
            status["usage"] = usage
    out.status = status
    out.events = _events(prev, status) + _stuck_event(prev_conds, status["conditions"])
    if active_rev and active_uri:
        evaluated = parse_time((status.get("live") or {}).get("lastEvaluated"))
        out.next_window_s = next_window_s(window, evaluated, due, obs.now)

    keep = {active_rev, rev} if training_needed else {active_rev}
    abandoned = {name for name, v in jobs.items() if v.revision not in keep}
    out.delete_jobs = sorted(abandoned | set(step.rerun_jobs if training_needed else ()))
    if problem:
        out.delete_jobs = []  # an invalid edit is likely undone: keep what has been trained
    # Created once the name is free: the Job watch reports the deletion.
    out.apply = [
        o for o in out.apply if not (o["kind"] == "Job" and o["metadata"]["name"] in deleting)
    ]
    if not problem and _prune_due(obs, active_rev, active_uri, out.apply):
        # The files of every revision whose Jobs are deleted go too (the keep set is the
        # same): the served revision's and the one in training (a lost retraining's too,
        # whose Jobs are kept for their results) stay.
        kept = [active_rev, *([rev] if training_needed else [])]
        out.apply.append(
            b.prune_job(task, active_rev, kept, obs.trainer_service_account, obs.images)
        )
    return out


#: Longest Ready message listing the children the API server refused (an admission webhook's
#: or a quota's message can be long; a condition is read in `kubectl describe`).
APPLY_FAILED_MESSAGE_LIMIT = MESSAGE_LIMIT


def with_apply_failures(
    task: Mapping[str, Any],
    planned: Plan,
    failures: Sequence[tuple[str, str, str]],
    now: dt.datetime,
) -> Plan:
    """``planned`` with Ready=False (ApplyFailed) naming each ``(kind, name, API message)``.

    Why: a child write the API server refuses for good (RBAC 403, quota, an admission
    webhook's denial, 422) is not fixed by retrying; the platform engineer has to act, and
    the task's status is where they look. Everything else the plan says (the training
    steps, what serves) still holds and is written with it.
    """
    if not failures:
        return planned
    gen = int(task["metadata"].get("generation") or 0)
    prev_conds = (task.get("status") or {}).get("conditions") or []
    text = "; ".join(f"{kind} {name} was refused: {message}" for kind, name, message in failures)
    text = _capped(text, APPLY_FAILED_MESSAGE_LIMIT)
    ready = c.condition(c.READY, c.FALSE, c.APPLY_FAILED, text, gen, _ts(now))
    desired = [x for x in planned.status.get("conditions") or [] if x.get("type") != c.READY]
    conditions = c.merge_conditions(prev_conds, [*desired, ready])
    status = {**planned.status, "conditions": conditions}
    return dataclasses.replace(
        planned, status=status, events=_events(task.get("status") or {}, status)
    )


def _new_records(retrain_prev: Mapping[str, Any]) -> int | None:
    """``status.retraining.newRecords``; from an older operator's status, the count it kept
    as a baseline total (``baselineRecords``, ``carriedRecords``, ``capturedRecords``)."""
    if "newRecords" in retrain_prev:
        return int(retrain_prev["newRecords"])
    if retrain_prev.get("baselineRecords") is None:
        return None
    seen = int(retrain_prev.get("capturedRecords") or 0)
    carried = int(retrain_prev.get("carriedRecords") or 0)
    return carried + max(0, seen - int(retrain_prev["baselineRecords"]))


def _count_new_records(
    retrain_prev: Mapping[str, Any], m: lv.Metrics, restart: bool
) -> tuple[int, dict[str, int]] | None:
    """New examples counted so far (since the last trigger; from 0 when ``restart``: a spec
    edit's revision starts training), with this window's gains, and the counter readings to
    remember, most recently read first (a list in status: the API server returns a map's keys
    sorted, which would forget gone series by hash rather than by age); None when Prometheus
    has no gateway series for the task (no call answered by the LLM yet, or no gateway
    scraped): the count waits."""
    if m.llm_answers is None:
        return None
    # None at the first window that counts (or on an older operator's status, whose count
    # goes on from what it had): the readings are where counting starts.
    remembered = retrain_prev.get("gatewayCounters")
    gained, counters = lv.count_new_records(
        None
        if not isinstance(remembered, list)
        else {str(c["series"]): int(c["count"]) for c in remembered if isinstance(c, Mapping)},
        m.llm_answers,
    )
    so_far = 0 if restart else _new_records(retrain_prev) or 0
    return so_far + gained, counters
