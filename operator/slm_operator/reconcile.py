"""One reconcile of one AgentTask: observe → plan (pure) → apply → write status if changed.

This is the whole life of an AgentTask from the operator's side; every decision is in
:func:`slm_operator.plan.plan`. The function is level-triggered and idempotent: it can run at
any time, any number of times, after a crash at any point, and converges on the same children
because their names are deterministic and they are written with server-side apply.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from slm_operator import conditions as c
from slm_operator import naming as n
from slm_operator.builders import DEFAULT_IMAGES, Images
from slm_operator.kube import (
    CRD_ADVICE,
    Kube,
    KubeError,
    Listed,
    TaskChanged,
    TaskGone,
    Written,
)
from slm_operator.observe import (
    PENDING,
    JobView,
    earlier_incarnation,
    failed_creates,
    job_view,
    mount_failures,
    owned,
    pod_of_job,
    refused_job,
    replica_failure,
    serving_waiting,
    setting_up,
    task_child,
)
from slm_operator.plan import (
    Observed,
    Plan,
    agreement_since_s,
    metrics_due,
    metrics_window,
    plan,
    with_apply_failures,
)
from slm_operator.prom import PromMetrics

log = logging.getLogger(__name__)

#: Namespaces already told (in the log) that the default trainer ServiceAccount is missing.
_missing_account_logged: set[tuple[str, str]] = set()
#: Namespaces already told (in the log) that the operator may not list Events there.
_events_forbidden_logged: set[str] = set()
#: Tasks (namespace, name, uid) already told, in an Event, that their CRD is outdated.
_crd_outdated_told: set[tuple[str, str, str]] = set()
#: Jobs (namespace, name, uid) already logged as kept though their pod template differs.
_kept_jobs_logged: set[tuple[str, str, str]] = set()
#: Guards the sets above: reconciles run in threads, several at once.
_logged_lock = threading.Lock()
#: The Event reason that says a hand edit of the task's Deployment or Service was replaced
#: (:func:`replace_hand_edits`).
HAND_EDIT_REPLACED = "HandEditReplaced"


def _first_time(logged: set[Any], key: Any) -> bool:
    """Add ``key`` to ``logged``; True only for the one caller that added it.

    Why a lock: reconciles run concurrently in threads, and a check then an add let several
    passes find a namespace new at once (nine tasks created together logged the missing
    ServiceAccount twice).
    """
    with _logged_lock:
        if key in logged:
            return False
        logged.add(key)
        return True


class HandEditReplacedBusy(KubeError):
    """The merge patch of :func:`replace_hand_edits` was taken but the apply after it got a
    busy answer: retried as busy, while the object already holds what the operator built (a
    Deployment so patched serves the new revision, which the status must then say)."""

    def __init__(self, cause: KubeError) -> None:
        super().__init__(cause.status, cause.message, cause.reason)


class ChildWriteBusy(KubeError):
    """A child write or deletion got a busy answer (429, 5xx), raised after the pass wrote
    the task's status: retried like any busy answer, but ``plan``, whose status is now the
    task's, still schedules the next live-control window and sets the task's metrics.

    Why: an admission webhook that is down answers every pass's Deployment apply with a 500
    for as long as the outage lasts. Raised as a plain error, the windows (fallback judged
    once per ``windowSeconds``) waited for each retry, whose back-off grows to five minutes,
    and the task's series kept the state from before the outage.
    """

    def __init__(self, cause: KubeError, plan: Plan) -> None:
        super().__init__(cause.status, cause.message, cause.reason)
        self.plan = plan


@dataclasses.dataclass
class _Writes:
    """What became of one pass's child writes."""

    #: (kind, name, the API server's reason) of each write refused for good.
    refused: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    #: Views of the Jobs the API server refused to create, pending for its reason.
    refused_jobs: dict[str, JobView] = dataclasses.field(default_factory=dict)
    #: The first busy answer (429, 5xx): raised once the status is written.
    busy: KubeError | None = None
    #: The Deployment was not written, refused or busy (:attr:`Observed.deployment_refused`).
    deployment_unwritten: bool = False

    def failed(self, kind: str, name: str, e: KubeError, doing: str = "") -> None:
        """A write the API server did not take: a busy answer (429, 5xx) is retried once the
        status is written; one refused for good is said in the status, which is still written
        (raised, it stopped every pass before the status, and the log alone said why)."""
        if e.retryable:
            self.busy = self.busy or e
        else:
            self.refused.append((kind, name, f"{doing}{e.message or e}"))


def trainer_account(kube: Kube, task: dict[str, Any], default: str) -> str:
    """The operator's default trainer ServiceAccount if it exists in the task's namespace.

    Why check: a pod naming a ServiceAccount that does not exist is rejected at admission, so
    a Job would sit with no pod and training would never start. Without the account the
    trainer pods run as the namespace's default ServiceAccount; training works the same and
    only the progress annotation is not written (the trainer logs a warning). A task that
    names its own ``spec.training.serviceAccountName`` is not checked: that is its choice.
    """
    if not default or (task["spec"].get("training") or {}).get("serviceAccountName"):
        return ""
    namespace = task["metadata"]["namespace"]
    try:
        found = kube.get("v1", "serviceaccounts", namespace, default) is not None
    except KubeError as e:
        if e.status != 403:
            raise
        found = True  # not allowed to look: trust the configuration
    if not found and _first_time(_missing_account_logged, (namespace, default)):
        log.warning(
            "trainer ServiceAccount %s/%s does not exist: trainer pods there run as the "
            "default ServiceAccount and cannot report progress (the chart creates it in the "
            "namespaces of trainer.serviceAccount.namespaces or watchNamespaces)",
            namespace,
            default,
        )
    elif found:
        with _logged_lock:
            _missing_account_logged.discard((namespace, default))
    return default if found else ""


def _replacing_patch(previous: Any, desired: Any) -> Any:
    """The JSON merge patch that turns ``previous`` into exactly ``desired``.

    Why nested: a merge patch merges objects key by key at every depth, so a field the plan
    no longer reports inside one (``route.slmTimeoutMs`` once the spec drops it) must be sent
    as null, or the stale value stays, and the gateway, which reads it, keeps using it.
    """
    if not isinstance(desired, dict) or not isinstance(previous, dict):
        return desired
    patch = {key: _replacing_patch(previous.get(key), value) for key, value in desired.items()}
    for key in previous:
        patch.setdefault(key, None)
    return patch


def observe(
    kube: Kube,
    namespace: str,
    name: str,
    now: dt.datetime,
    prom: PromMetrics | None = None,
    trainer_service_account: str = "",
    data_recheck_s: float = 300.0,
    *,
    reserved_accounts: Collection[str] = (),
    images: Images = DEFAULT_IMAGES,
) -> Observed | None:
    task = kube.get_task(namespace, name)
    if task is None:
        raise TaskGone(namespace, name)
    if task["metadata"].get("deletionTimestamp"):
        return None  # ownerReferences let the garbage collector remove the children
    uid = task["metadata"]["uid"]
    selector = f"{n.LABEL_TASK}={name}"
    pods = kube.list("v1", "pods", namespace, selector)
    mounts = _mount_failures(kube, namespace, pods)
    listed = kube.list("batch/v1", "jobs", namespace, selector)
    jobs = {j["metadata"]["name"]: job_view(j, pods, mounts) for j in listed if owned(j, uid)}
    jobs = _with_failed_creates(kube, namespace, jobs, pods)
    dep = kube.get("apps/v1", "deployments", namespace, n.serving_name(name))
    foreign = _foreign_children(kube, namespace, name, uid, dep)
    served = ((task.get("status") or {}).get("revision") or {}).get("active") or ""
    if not task_child(dep, name, uid, serves=served):
        # Not the one this task serves: its apply adopts one the operator made for the task
        # (an orphan); someone else's is not applied at all (``foreign``).
        dep = None
    metrics = None
    # Prometheus only when the plan will judge a window: a task is reconciled on every event
    # of its Jobs, pods and Deployment and every resync, but judged once per window.
    # Windows are no shorter than two scrape intervals, so that two judged windows never
    # read the same counter step (PromMetrics.range_s; the queries read one interval more).
    min_window = prom.range_s(metrics_window(task["spec"])) if prom is not None else 0.0
    not_due = not metrics_due(task, now, min_window)
    if prom is not None and dep is not None and not not_due:
        metrics = prom.task_metrics(
            name,
            metrics_window(task["spec"]),
            namespace=namespace,
            agreement_since_s=agreement_since_s(task, now, min_window),
        )
    return Observed(
        task=task,
        jobs=jobs,
        deployment=dep,
        now=now,
        metrics=metrics,
        trainer_service_account=trainer_account(kube, task, trainer_service_account),
        data_recheck=dt.timedelta(seconds=data_recheck_s),
        # No pod to say why (admission refused them all): the ReplicaSet controller says.
        serving_waiting=serving_waiting(pods, mounts) or replica_failure(dep),
        reserved_accounts=frozenset(reserved_accounts),
        images=images,
        metrics_not_due=not_due,
        min_window_s=min_window,
        prometheus_configured=prom is not None,
        # The Jobs' times are the control plane's clock: compared with the API server's.
        server_now=listed.served_at if isinstance(listed, Listed) else None,
        foreign_children=foreign,
    )


def _foreign_children(
    kube: Kube, namespace: str, name: str, uid: str, dep: Mapping[str, Any] | None
) -> frozenset[str]:
    """The kinds of the task's serving children whose name an object that is not the task's
    holds (:attr:`Observed.foreign_children`); ``dep``: the Deployment of that name, as read.

    Why the Service is read on every pass (one GET), before anything is applied: server-side
    apply with force takes over whatever holds the name (a user's ``kubectl create service
    clusterip``, a Helm chart's Service: selector replaced, ports added) and adds this task's
    ownerReference, after which the object reads as the task's and the garbage collector
    deletes it with the task. Whose it is can only be told before the first apply.
    One a deleted task of this name left (:func:`earlier_incarnation`) is the task's to take
    over, as server-side apply does.
    """
    svc = kube.get("v1", "services", namespace, n.serving_name(name))
    live = {"Deployment": dep, "Service": svc}
    return frozenset(
        kind
        for kind, obj in live.items()
        if obj is not None
        and not task_child(obj, name, uid)
        and not earlier_incarnation(obj, name, uid)
    )


def _list_events(kube: Kube, namespace: str, fields: str) -> list[dict[str, Any]]:
    """The core/v1 Events of ``namespace`` that the field selector ``fields`` selects; none
    where the operator may not list them (logged once per namespace).

    Why a 403 is no error: RBAC without the events `list` rule (an older chart, a hand-made
    Role) loses only the reason a pod waits, an extra; it must not stop the reconcile (every
    new Job is podless for a moment, and every new pod in ContainerCreating).
    """
    try:
        return kube.list("v1", "events", namespace, fields=fields)
    except KubeError as e:
        if e.status != 403:
            raise
        if _first_time(_events_forbidden_logged, namespace):
            log.warning(
                "may not list Events in %s: a Job whose pod cannot be created (quota, Pod "
                "Security) or a pod that cannot mount its volumes will not say why in the "
                "task's conditions",
                namespace,
            )
        return []


def _mount_failures(kube: Kube, namespace: str, pods: list[dict[str, Any]]) -> dict[str, str]:
    """Why pods of the task that wait in ContainerCreating cannot mount their volumes (pod uid
    -> message, :func:`slm_operator.observe.mount_failures`).

    Events are read only when such a pod exists (usually one at most), so a healthy task
    costs no extra request: one list per such pod, of its own Events alone (the API server
    selects them by its uid). Its own, and not only its failures: a failure its progress
    Events (attached, pulling its image) came after is over. Not a list of every pod Event of
    the namespace, which would bring the recent history of every workload there over the
    wire and into the operator on each such pass.
    """
    uids = sorted(
        {str(p["metadata"]["uid"]) for p in pods if p["metadata"].get("uid") and setting_up(p)}
    )
    events = [
        ev for uid in uids for ev in _list_events(kube, namespace, f"involvedObject.uid={uid}")
    ]
    return mount_failures(events, uids)


def _with_failed_creates(
    kube: Kube, namespace: str, jobs: dict[str, JobView], pods: list[dict[str, Any]]
) -> dict[str, JobView]:
    """Pending Jobs without a pod, with the reason the Job controller could not create one.

    Events are read only when such a Job exists, so a healthy task costs no extra request.
    """
    podless = [
        v
        for v in jobs.values()
        # (One being deleted waits for its finalizers, not for a pod: no Event says more.)
        if v.state == PENDING
        and not v.deleting
        and not any(pod_of_job(p, v.name, v.uid) for p in pods)
    ]
    if not podless:
        return jobs
    events = _list_events(kube, namespace, "involvedObject.kind=Job,reason=FailedCreate")
    reasons = failed_creates(events, {v.name: v.uid for v in podless})
    out = dict(jobs)
    for v in podless:
        if v.name in reasons:
            out[v.name] = dataclasses.replace(v, waiting=reasons[v.name])
    return out


def reconcile(
    kube: Kube,
    namespace: str,
    name: str,
    now: dt.datetime | None = None,
    prom: PromMetrics | None = None,
    trainer_service_account: str = "",
    data_recheck_s: float = 300.0,
    *,
    reserved_accounts: Collection[str] = (),
    images: Images = DEFAULT_IMAGES,
    status_written: Callable[[str], None] | None = None,
) -> Plan | None:
    """One pass over the task ``namespace/name``; its plan, or None while it is deleted.

    ``status_written`` is called, from this thread, with the resourceVersion the API server
    gave this pass's status write, as soon as it is answered and only when the write leaves
    nothing more to do (:func:`_settled`): the caller then knows the watch event that write
    causes as its own, and need not reconcile again for it.
    """
    obs = observe(
        kube,
        namespace,
        name,
        now or dt.datetime.now(dt.UTC),
        prom,
        trainer_service_account,
        data_recheck_s,
        reserved_accounts=reserved_accounts,
        images=images,
    )
    if obs is None:
        return None
    p = plan(obs)
    writes = _apply_children(kube, obs, p)
    if writes.refused_jobs or writes.deployment_unwritten:
        # Planned again with what is really there: refused Jobs pending for the API server's
        # reason (the stage's condition, the phase and the candidates say they were refused,
        # not "created"), and a revision whose Deployment was not written not promoted (its
        # status, route and Jobs stay the served revision's). The plan is pure.
        p = plan(
            dataclasses.replace(
                obs,
                jobs={**obs.jobs, **writes.refused_jobs},
                deployment_refused=writes.deployment_unwritten,
            )
        )
    _delete_jobs(kube, obs, p, writes)
    p = with_apply_failures(obs.task, p, writes.refused, obs.now)
    _write_status(kube, obs, p, writes.refused, _if_settled(status_written, obs, p, writes))
    if writes.busy is not None:
        raise ChildWriteBusy(writes.busy, p)
    return p


def _apply_children(kube: Kube, obs: Observed, p: Plan) -> _Writes:
    """Apply the planned children; a write refused or busy is noted and the others go on.

    A busy answer (429, 5xx: an admission webhook down, etcd changing leader) is retried, but
    only after the status is written: it carries the live-control decisions (fallback, the
    route the gateway follows), which must not wait out a webhook outage behind the
    Deployment that every pass of a serving task applies again.
    """
    writes = _Writes()
    for obj in p.apply:
        if obj["kind"] in obs.foreign_children:
            # Refused here, as the API server refuses a write for good: said in Ready
            # (ApplyFailed), a Deployment not written is not promoted, and the rest goes on.
            kind = obj["kind"]
            writes.refused.append((kind, obj["metadata"]["name"], _foreign_refusal(kind)))
            writes.deployment_unwritten |= kind == "Deployment"
            continue
        try:
            _apply(kube, obs, obj)
        except KubeError as e:
            _note_refusal(kube, obs, obj, e, writes)
    return writes


def _foreign_refusal(kind: str) -> str:
    """Why a Deployment or Service of the task's serving name that is not the task's is not
    applied: the platform engineer has to free the name, or give the task another."""
    return (
        f"a {kind} of this name exists and belongs to something else (no ownerReference to "
        f"this AgentTask: made by hand or by another tool?); it is left as it is: rename this "
        f"task or the {kind}"
    )


def _patch_job_limits(kube: Kube, job: Mapping[str, Any], writes: _Writes) -> None:
    """Set the task's limits on a kept Job whose pod template an older operator built.

    Why: the API server refuses a whole apply that changes an immutable pod template, the
    limits with it, so a limit raised for a fine-tune about to run out of time reached no Job
    an older operator had created (its pod template lacks the grace period this version
    gives fine-tune pods); the Job died at the old limit and started again from its last
    checkpoint. The limits are mutable: a merge patch of them alone is accepted, and one
    that changes nothing is no write.
    """
    limits = {k: job["spec"][k] for k in ("activeDeadlineSeconds", "backoffLimit")}
    try:
        kube.merge_patch(job, {"spec": limits})
    except KubeError as e:
        writes.failed("Job", job["metadata"]["name"], e)


def _note_refusal(
    kube: Kube, obs: Observed, obj: Mapping[str, Any], e: KubeError, writes: _Writes
) -> None:
    child, why = obj["metadata"]["name"], e.message or str(e)
    if obj["kind"] == "Job" and e.status == 422 and "immutable" in e.message:
        # A Job built by an older operator version for the same revision: Jobs are
        # immutable and the existing one does the same work, so keep it. The API server's
        # own words are left out: they dump the whole new pod template, the dataset URI
        # (credentials and all) among the data-prep Job's args.
        if child in obs.jobs:
            # Once per Job: every pass (each resync) applies it again and is refused again.
            meta = obs.task["metadata"]
            if _first_time(_kept_jobs_logged, (meta["namespace"], child, obs.jobs[child].uid)):
                log.info(
                    "AgentTask %s/%s: keeping existing Job %s: its pod template differs and "
                    "Jobs are immutable",
                    meta["namespace"],
                    meta["name"],
                    child,
                )
            _patch_job_limits(kube, obj, writes)
            return
        # Not this task's: another task's child has the name (task "a" with candidate "b-data"
        # and task "a-ft-b" name a Job alike). Kept silently, this task waited for ever on a
        # Job that does other work. (The API server's own words dump the pod template: left
        # out.)
        why = (
            "a Job of this name exists and belongs to something else (another AgentTask's "
            "child?), and Jobs are immutable; rename this task or its candidate"
        )
    elif e.retryable:
        writes.busy = writes.busy or e
        if not isinstance(e, HandEditReplacedBusy):
            writes.deployment_unwritten |= obj["kind"] == "Deployment"
        return
    # Refused for good (RBAC, quota, an admission webhook, validation): say so in the status,
    # which is still written, and go on with the other children.
    writes.refused.append((obj["kind"], child, why))
    writes.deployment_unwritten |= obj["kind"] == "Deployment"
    if obj["kind"] == "Job" and child not in obs.jobs:
        writes.refused_jobs[child] = refused_job(obj, why)


def _apply(kube: Kube, obs: Observed, obj: Mapping[str, Any]) -> None:
    """Server-side apply ``obj``; this task's Deployment or Service refused as invalid has
    its hand edits replaced (:func:`replace_hand_edits`) and is applied once more."""
    try:
        kube.apply(obj)
    except KubeError as e:
        if e.status != 422 or not _ours(kube, obs, obj):
            raise
        replace_hand_edits(kube, obs.task, obj)


def _ours(kube: Kube, obs: Observed, obj: Mapping[str, Any]) -> bool:
    """Whether the live Deployment or Service ``obj`` names is this task's.

    The Deployment was read by :func:`observe`; the Service is read again now, after the API
    server refused its apply (:func:`observe` kept only whether it is someone else's, which
    is then never applied; this says whether one exists to repair).
    """
    if obj["kind"] == "Deployment":
        return obs.deployment is not None
    if obj["kind"] != "Service":
        return False
    meta = obs.task["metadata"]
    try:
        live = kube.get("v1", "services", meta["namespace"], obj["metadata"]["name"])
    except KubeError as e:
        if e.retryable:
            raise  # busy: the pass is retried, and the Service read again
        return False  # not known to be this task's: the refusal stands as it came
    return task_child(live, meta["name"], meta["uid"])


def replace_hand_edits(kube: Kube, task: Mapping[str, Any], obj: Mapping[str, Any]) -> None:
    """Set the live object's spec (its lists whole) and labels and annotations to the built
    ``obj`` with one JSON merge patch, then apply ``obj`` again; raises the API server's
    refusal of either (:class:`HandEditReplacedBusy` for a busy answer to the apply after
    the patch was taken).

    Why: server-side apply merges a keyed list item by item, so a hand edit of an item's key
    (the Service's port 8000 patched to 9999, the container's port 8000 to 9000) leaves that
    item beside the one the operator applies, and the API server refuses the pair
    ('spec.ports[1].name: Duplicate value: "http"'): Ready was False (ApplyFailed) for good
    while the Service had no port 8000 and the gateway's SLM endpoint was dead. A merge patch
    replaces lists whole. The labels and annotations go with the spec because a Deployment's
    say which revision its containers serve. Not deleted and created again: a refusal that is
    no such edit (a ValidatingAdmissionPolicy's denial is a 422 too) would become an outage.
    """
    meta = obj["metadata"]
    kube.merge_patch(
        obj,
        {
            "metadata": {key: meta[key] for key in ("labels", "annotations") if key in meta},
            "spec": obj["spec"],
        },
    )
    # Said once the patch is taken: the apply after it only claims the fields for the
    # operator again, and a retry that finds nothing to replace would never say it.
    # The API server's words are left out: a Deployment's may quote its pod template.
    said = (
        f"{obj['kind']} {meta['name']} had been edited by hand in a way server-side apply "
        "cannot merge (the API server refused it as invalid); its spec was set back to what "
        "the operator builds"
    )
    kube.event(task, "Warning", HAND_EDIT_REPLACED, said)  # and logged, as every Event is
    try:
        kube.apply(obj)
    except KubeError as e:
        if e.retryable:
            raise HandEditReplacedBusy(e) from e
        raise


def _delete_jobs(kube: Kube, obs: Observed, p: Plan, writes: _Writes) -> None:
    for job in p.delete_jobs:
        seen = obs.jobs.get(job)
        try:
            kube.delete(
                "batch/v1",
                "jobs",
                obs.task["metadata"]["namespace"],
                job,
                uid=seen.uid if seen else "",
            )
        except KubeError as e:  # RBAC without `delete` on Jobs, a webhook, a busy server
            writes.failed("Job", job, e, doing="deleting it: ")


def _if_settled(
    status_written: Callable[[str], None] | None, obs: Observed, p: Plan, writes: _Writes
) -> Callable[[str], None] | None:
    """``status_written`` if this pass writes a status and that write is :func:`_settled`;
    None otherwise (the write's watch event then reconciles again, as any change does).

    A pass with a child write the API server did not take is never settled: what it wrote
    was planned around the refusal, and the next pass must try the write again. Nor is a
    write without the resourceVersion read as its precondition: another client's change
    could then land between the read and the write, unseen by this pass.
    """
    if status_written is None or writes.refused or writes.busy is not None:
        return None
    if not obs.task["metadata"].get("resourceVersion"):
        return None
    if p.status == (obs.task.get("status") or {}):
        return None  # nothing to write: no event comes
    return status_written if _settled(obs, p) else None


def _settled(obs: Observed, p: Plan) -> bool:
    """Whether a pass that read back the status ``p`` writes, with the same children, would
    do nothing more: the same status, no Event, no child write ``p`` did not make.

    Why ask: the status write comes back as a watch event, and a pass for it cost as many API
    calls as this one (the task, its pods, Jobs and Deployment, the applies) to find nothing
    to do, doubling the requests of every serving task at each live-control window. Mostly
    the plan is such a fixed point; not always: a retraining is decided in one pass (its
    status) and its data-prep Job created by the next, which that event must still start.
    The plan is pure and takes well under a millisecond. Asked as the next pass would see
    the task: the status as the API server stores it (JSON), and Prometheus read only if
    that status leaves a window due (:func:`observe`).
    """
    task = {**obs.task, "status": json.loads(json.dumps(p.status))}
    not_due = not metrics_due(task, obs.now, obs.min_window_s)
    again = plan(
        dataclasses.replace(
            obs, task=task, metrics=None if not_due else obs.metrics, metrics_not_due=not_due
        )
    )
    return (
        again.status == task["status"]
        and not again.events
        and all(obj in p.apply for obj in again.apply)
        and set(again.delete_jobs) <= set(p.delete_jobs)
    )


def _resource_version(answer: Any) -> str:
    """The resourceVersion of the object the API server answered a write with; empty if none."""
    meta = answer.get("metadata") if isinstance(answer, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else ""


def _tell_crd_outdated(kube: Kube, task: Mapping[str, Any], answer: Any) -> None:
    """Post one ``CRDOutdated`` Warning on ``task`` when the API server dropped fields of the
    status just written, once per task and process.

    Why an Event as well as the adapter's error log: the user who finds retraining never
    starting looks at ``kubectl describe agenttask``, not at the operator's log; once,
    because every later write loses the same fields.
    """
    dropped = answer.unknown_fields if isinstance(answer, Written) else ()
    meta = task["metadata"]
    key = (meta["namespace"], meta["name"], str(meta.get("uid") or ""))
    if dropped and _first_time(_crd_outdated_told, key):
        said = f"the API server dropped status fields this operator wrote ({', '.join(dropped)})"
        kube.event(task, "Warning", c.CRD_OUTDATED, f"{said}: {CRD_ADVICE}")


def _write_status(
    kube: Kube,
    obs: Observed,
    p: Plan,
    refused: list[tuple[str, str, str]],
    written: Callable[[str], None] | None = None,
) -> None:
    """Write the planned status if it changed, then post its Events and log the refusals.

    ``written`` gets the new resourceVersion right after the write, before the Events are
    posted: the write's watch event may be handled while they are.
    """
    meta, previous = obs.task["metadata"], obs.task.get("status") or {}
    namespace, name = meta["namespace"], meta["name"]
    if p.status != previous:
        try:
            answer = kube.patch_status(
                namespace,
                name,
                _replacing_patch(previous, p.status),
                resource_version=meta.get("resourceVersion"),
            )
        except KubeError as e:
            if e.status == 409:
                # Changed since it was read (a spec edit, or deleted and created again under
                # this name): this status describes an object that is gone.
                raise TaskChanged(namespace, name, e.message) from e
            if e.status == 404:
                # Deleted since it was read: nothing to report on, and no error either; the
                # children go with it (owner references).
                raise TaskGone(namespace, name) from e
            raise
        version = _resource_version(answer)
        if written is not None and version:
            written(version)
        _tell_crd_outdated(kube, obs.task, answer)
        for type_, reason, message in p.events:
            kube.event(obs.task, type_, reason, message)
        if refused:
            log.warning(
                "AgentTask %s/%s: the API server refused %s",
                namespace,
                name,
                ", ".join(f"{kind} {child}: {why}" for kind, child, why in refused),
            )
        if p.invalid:
            log.error("AgentTask %s/%s has an invalid spec: %s", namespace, name, p.invalid)
