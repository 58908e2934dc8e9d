"""One reconcile of one AgentTask: observe → plan (pure) → apply → write status if changed.

This is the whole life of an AgentTask from the operator's side; every decision is in
:func:`slm_operator.plan.plan`. The function is level-triggered and idempotent: it can run at
any time, any number of times, after a crash at any point, and converges on the same children
because their names are deterministic and they are written with server-side apply.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Collection
from typing import Any

from slm_operator import naming as n
from slm_operator.builders import DEFAULT_IMAGES, Images
from slm_operator.kube import Kube, KubeError, TaskChanged, TaskGone
from slm_operator.observe import (
    PENDING,
    JobView,
    failed_creates,
    job_view,
    pod_of_job,
    refused_job,
    serving_waiting,
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


def _owned(obj: dict[str, Any] | None, uid: str) -> bool:
    return bool(obj) and any(
        ref.get("uid") == uid
        for ref in (obj or {}).get("metadata", {}).get("ownerReferences") or []
    )


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
    if not found and (namespace, default) not in _missing_account_logged:
        _missing_account_logged.add((namespace, default))
        log.warning(
            "trainer ServiceAccount %s/%s does not exist: trainer pods there run as the "
            "default ServiceAccount and cannot report progress (the chart creates it in the "
            "namespaces of trainer.serviceAccount.namespaces or watchNamespaces)",
            namespace,
            default,
        )
    elif found:
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
    jobs = {
        j["metadata"]["name"]: job_view(j, pods)
        for j in kube.list("batch/v1", "jobs", namespace, selector)
        if _owned(j, uid)
    }
    jobs = _with_failed_creates(kube, namespace, jobs, pods)
    dep = kube.get("apps/v1", "deployments", namespace, n.serving_name(name))
    metrics = None
    # Prometheus only when the plan will judge a window: a task is reconciled on every event
    # of its Jobs, pods and Deployment and every resync, but judged once per window.
    # Windows are no shorter than the range the queries read (two scrape intervals), so that
    # two judged windows never read the same samples (PromMetrics.range_s).
    min_window = prom.range_s(metrics_window(task["spec"])) if prom is not None else 0.0
    not_due = not metrics_due(task, now, min_window)
    if prom is not None and _owned(dep, uid) and not not_due:
        metrics = prom.task_metrics(
            name,
            metrics_window(task["spec"]),
            namespace=namespace,
            agreement_since_s=agreement_since_s(task, now),
        )
    return Observed(
        task=task,
        jobs=jobs,
        deployment=dep if _owned(dep, uid) else None,
        now=now,
        metrics=metrics,
        trainer_service_account=trainer_account(kube, task, trainer_service_account),
        data_recheck=dt.timedelta(seconds=data_recheck_s),
        serving_waiting=serving_waiting(pods),
        reserved_accounts=frozenset(reserved_accounts),
        images=images,
        metrics_not_due=not_due,
        min_window_s=min_window,
    )


def _with_failed_creates(
    kube: Kube, namespace: str, jobs: dict[str, JobView], pods: list[dict[str, Any]]
) -> dict[str, JobView]:
    """Pending Jobs without a pod, with the reason the Job controller could not create one.

    Events are read only when such a Job exists, so a healthy task costs no extra request.
    """
    podless = [
        v
        for v in jobs.values()
        if v.state == PENDING and not any(pod_of_job(p, v.name, v.uid) for p in pods)
    ]
    if not podless:
        return jobs
    try:
        events = kube.list(
            "v1", "events", namespace, fields="involvedObject.kind=Job,reason=FailedCreate"
        )
    except KubeError as e:
        if e.status != 403:
            raise
        # RBAC without the events `list` rule (older chart, hand-made Role): the reason is an
        # extra, and every new Job is podless for a moment; it must not stop the reconcile.
        if namespace not in _events_forbidden_logged:
            _events_forbidden_logged.add(namespace)
            log.warning(
                "may not list Events in %s: a Job whose pod cannot be created (quota, Pod "
                "Security) will not say why in the task's conditions",
                namespace,
            )
        return jobs
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
) -> Plan | None:
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
    refused: list[tuple[str, str, str]] = []
    refused_jobs: dict[str, JobView] = {}
    # A busy answer (429, 5xx: an admission webhook down, etcd changing leader) is retried,
    # but only after the status is written: it carries the live-control decisions (fallback,
    # the route the gateway follows), which must not wait out a webhook outage behind the
    # Deployment that every pass of a serving task applies again.
    busy: KubeError | None = None
    for obj in p.apply:
        try:
            kube.apply(obj)
        except KubeError as e:
            child, why = obj["metadata"]["name"], e.message or str(e)
            if obj["kind"] == "Job" and e.status == 422 and "immutable" in e.message:
                # A Job built by an older operator version for the same revision: Jobs are
                # immutable and the existing one does the same work, so keep it. The API
                # server's own words are left out: they dump the whole new pod template,
                # the dataset URI (credentials and all) among the data-prep Job's args.
                if child in obs.jobs:
                    log.info(
                        "keeping existing Job %s: its pod template differs and Jobs are immutable",
                        child,
                    )
                    continue
                # Not this task's: another task's child has the name (task "a" with candidate
                # "b-data" and task "a-ft-b" name a Job alike). Kept silently, this task
                # waited for ever on a Job that does other work.
                # (The API server's own words dump the whole pod template: left out.)
                why = (
                    "a Job of this name exists and belongs to something else (another "
                    "AgentTask's child?), and Jobs are immutable; rename this task or its "
                    "candidate"
                )
            elif e.retryable:
                busy = busy or e
                continue
            # Refused for good (RBAC, quota, an admission webhook, validation): say so in
            # the status, which is still written, and go on with the other children.
            refused.append((obj["kind"], child, why))
            if obj["kind"] == "Job" and child not in obs.jobs:
                refused_jobs[child] = refused_job(obj, why)
    if refused_jobs:
        # Planned again with the refused Jobs pending for the API server's reason: the
        # stage's condition, the phase and the candidates say they were refused, not
        # "created" (the plan is pure, so this is the plan of what is really there).
        p = plan(dataclasses.replace(obs, jobs={**obs.jobs, **refused_jobs}))
    for job in p.delete_jobs:
        seen = obs.jobs.get(job)
        try:
            kube.delete("batch/v1", "jobs", namespace, job, uid=seen.uid if seen else "")
        except KubeError as e:
            if e.retryable:
                busy = busy or e
                continue
            # Refused for good (RBAC without `delete` on Jobs, a webhook): as for a refused
            # write, the status says so and is still written. Raised, it stopped every pass
            # before the status, which stayed at its last write while the log alone said why.
            refused.append(("Job", job, f"deleting it: {e.message or e}"))
    p = with_apply_failures(obs.task, p, refused, obs.now)
    previous = obs.task.get("status") or {}
    if p.status != previous:
        try:
            kube.patch_status(
                namespace,
                name,
                _replacing_patch(previous, p.status),
                resource_version=obs.task["metadata"].get("resourceVersion"),
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
        for type_, reason, message in p.events:
            kube.event(obs.task, type_, reason, message)
        if refused:
            log.warning(
                "AgentTask %s/%s: the API server refused %s",
                namespace,
                name,
                ", ".join(f"{kind} {child}: {why}" for kind, child, why in refused),
            )
    if p.invalid and p.status != previous:
        log.error("AgentTask %s/%s has an invalid spec: %s", namespace, name, p.invalid)
    if busy is not None:
        raise ChildWriteBusy(busy, p)
    return p
