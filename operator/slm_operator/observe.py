"""Pure views of observed children: what a Job and its pods say, in the operator's terms.

The Kubernetes adapter lists raw Jobs, pods and the Deployment; this module turns them into
small immutable records that the planner reasons about. Keeping the parsing here (and pure)
means the tricky parts (Job conditions, termination messages, progress annotations) are unit
tested on plain dicts.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from slm_contract import ContractError, TrainerResult, redact_uris
from slm_operator import naming as n

PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
MAX_MESSAGE = 512


def parse_time(value: object) -> dt.datetime | None:
    """An RFC 3339 time as an aware datetime in UTC; None for none, and for a value that is
    no time at all.

    Why lenient: besides the API server's own times, the plan reads status times that any
    client may have written (``kubectl edit --subresource=status``, a backup restored), and
    the API server's date-time check takes a lowercase "t" or "z"; an older CRD without the
    check took any string. Raised, such a time failed every reconcile of its task: live
    control, conditions and status stood still for good. A time without a zone is UTC, as
    every time the operator writes; one that is none counts as absent, and the next write
    replaces it.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        at = dt.datetime.fromisoformat(value.strip().upper().replace("Z", "+00:00"))
        return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved into UTC
        return None


def short_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` in one line of at most ``limit`` characters, its URIs redacted.

    Why redact here: every message made with it (this module's, and the trainer's words the
    plan quotes) goes into a condition or an Event, and a trainer image older than its
    redaction (or any container's log tail) may name a dataset URI with its user info or a
    signed query; cut before it is cut short, so that a URI whose scheme falls off the end is
    not left bare.
    """
    text = " ".join(redact_uris(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def with_tail(head: str, tail: str, limit: int = MAX_MESSAGE) -> str:
    """``head: tail`` as :func:`short_message` makes it, but cut at the start of ``tail``
    (``...`` in its place) rather than at the end, where what says the most comes last: a
    log's last lines, the cause a wrapped error ends with.

    Redacted before it is cut: a URI whose scheme were cut off could no longer be recognised.
    """
    tail = " ".join(redact_uris(tail).split())
    room = limit - len(head) - 2
    if len(tail) > room:
        tail = "..." + tail[len(tail) - max(room - 3, 0) :]
    return short_message(f"{head}: {tail}", limit)


@dataclass(frozen=True)
class JobView:
    name: str
    stage: str
    revision: str
    candidate: str | None
    state: str
    result: TrainerResult | None = None
    result_error: str | None = None
    message: str = ""
    progress: int | None = None
    seconds: float | None = None
    finished_at: dt.datetime | None = None
    #: Why a pending Job's pod does not run, in the scheduler's or kubelet's words
    #: ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu."); empty when not known.
    waiting: str = ""
    #: The Job's metadata.uid: Events name a Job by name, and a Job of the same name (the
    #: revision's) may have been deleted and created again since.
    uid: str = ""
    #: A failed Job's reason (``DeadlineExceeded``, ``BackoffLimitExceeded``, ...) and how
    #: many of its pods failed: whether a limit raised since would have let it finish.
    failure_reason: str = ""
    failed_pods: int = 0
    #: Whether a pod of the Job is seen to have run (running, or ended). A failed Job with
    #: none may have failed before any pod of it ran (unschedulable until its deadline);
    #: the plan then says what its pod last waited for (:func:`never_ran_message`).
    pod_ran: bool = False
    #: The Job has a deletionTimestamp: it is being deleted, and stays while ``finalizers``
    #: (another controller's) hold it. Its view is then pending, with no result: what it
    #: said belongs to the run being deleted (:func:`job_view`).
    deleting: bool = False
    finalizers: tuple[str, ...] = ()
    #: A Job being deleted had finished (its Complete or Failed condition): its pods are
    #: over and write nothing more. Its view reads pending whatever it did, and a finished
    #: prune Job held by a finalizer held every new revision's Jobs for good (plan._pruning).
    finished: bool = False


def owned(obj: Mapping[str, Any] | None, uid: str) -> bool:
    """Whether ``obj`` names the object of ``uid`` among its ownerReferences."""
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def task_child(
    obj: Mapping[str, Any] | None, task: str, uid: str, serves: str | None = None
) -> bool:
    """Whether ``obj`` is the child of the AgentTask ``task`` (of ``uid``): owned by it, or
    left with no ownerReferences at all while its labels say this operator made it for
    ``task`` and, when ``serves`` is given, its revision annotation names that revision (the
    one the task's status says is served).

    Why: ownerReferences removed by hand (``kubectl edit``, a tool that strips them) made the
    task's Deployment read as missing for one pass: the route went to the LLM, a Warning
    NoReadyReplicas was posted and the conditions flipped while every replica stayed ready,
    and the pass's own apply put the reference back. As for a Service deleted by hand, which
    is back before the gateway calls again, a state this very pass repairs is not reported.
    One that names any other owner is someone else's and stays foreign. ``serves``: a task
    deleted with ``--cascade=orphan`` and created again has no status, and its first pass took
    the old Deployment for its own: nothing trained, no model was selected, and the route
    served every SLM answer at threshold 0.
    """
    meta = (obj or {}).get("metadata") or {}
    if meta.get("ownerReferences"):
        return owned(obj, uid)
    labels = meta.get("labels") or {}
    if (labels.get(n.MANAGED_BY), labels.get(n.LABEL_TASK)) != (n.FIELD_MANAGER, task):
        return False
    revision = (meta.get("annotations") or {}).get(n.LABEL_REVISION)
    return serves is None or (bool(serves) and revision == serves)


def earlier_incarnation(obj: Mapping[str, Any] | None, task: str, uid: str) -> bool:
    """Whether ``obj`` is a child this operator made for an earlier AgentTask named ``task``:
    its labels say the operator made it for ``task``, and its ownerReferences name only
    AgentTasks of that name, none of them ``uid`` (the task now of that name).

    Why: a task deleted and created again under its name before the garbage collector
    removed its Deployment and Service finds them owned by the old uid. They are what the
    task would make, and server-side apply takes them over (the ownerReference replaced);
    called someone else's, they were never applied and Ready said ApplyFailed "belongs to
    something else" until the garbage collector deleted them. A label alone proves nothing
    (anyone can copy it), so an owner of another kind or name keeps the object foreign.
    """
    meta = (obj or {}).get("metadata") or {}
    labels = meta.get("labels") or {}
    if (labels.get(n.MANAGED_BY), labels.get(n.LABEL_TASK)) != (n.FIELD_MANAGER, task):
        return False
    refs = meta.get("ownerReferences") or []
    return bool(refs) and all(
        ref.get("kind") == n.KIND
        and str(ref.get("apiVersion") or "").split("/")[0] == n.GROUP
        and ref.get("name") == task
        and ref.get("uid") != uid
        for ref in refs
    )


def refused_job(job: Mapping[str, Any], why: str) -> JobView:
    """The view of a Job the API server refused to create: pending, ``why`` as its wait.

    Why: the plan reads a missing Job of this revision as "created, waiting for its pod",
    so a Job refused for good (a quota, an admission webhook, a serviceAccountName the API
    server calls invalid) left the stage's condition, the phase message and the candidate
    saying it was created. A refused Job is pending for the reason the API server gave,
    like one whose pod cannot be created.
    """
    # A built Job has no status and no pods: job_view reads it as pending.
    return replace(
        job_view(job, ()), waiting=short_message(f"the API server refused to create it: {why}")
    )


def _conditions(job: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {
        c["type"]: c
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == "trainer":
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return term  # type: ignore[no-any-return]
    return None


def _last_failure(pods: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """How the newest pod's trainer container that failed ended (pods newest first)."""
    for pod in pods:
        term = _terminated(pod)
        if term and term.get("exitCode") not in (None, 0):
            return term
    return None


#: The trainer's advice after a SIGTERM (slm_trainer.preemption.RERUN_TO_RESUME, which both
#: training paths end with): true for a preempted pod, whose Job starts another; not for a
#: Job the operator reports failed, which is not rerun. The second form is a selector's in
#: trainer images before the two shared those words ("preempted; resumable (...; resumable)").
_RERUN_ADVICE = re.compile(r"[;,.]?\s*rerun to resume\.?\s*$|;\s*resumable(?=\s*[();]|\s*$)")


def failure_message(job_condition: Mapping[str, Any], last: Mapping[str, Any] | None) -> str:
    """Why a Job failed, in one bounded line: the Job controller's reason first, then how its
    last failed pod ended and what it said, e.g. ``BackoffLimitExceeded: last pod OOMKilled
    (exit 137): step 130/400 loss=0.82``.

    Why all three: the pod's own words alone hide the cause. An OOM-killed or SIGKILLed pod
    writes no result, and with terminationMessagePolicy FallbackToLogsOnError its message is
    its log tail (ordinary progress lines); a Job past activeDeadlineSeconds kills its pod,
    whose last words ("preempted by SIGTERM ... rerun to resume") would blame a preemption.
    """
    reason = str(job_condition.get("reason") or "Failed")
    if last is None:
        return short_message(f"{reason}: {job_condition.get('message') or 'the Job failed'}")
    code = last.get("exitCode")
    head = f"{reason}: last pod {last.get('reason') or 'terminated'}"
    head += f" (exit {code})" if code is not None else ""
    raw = str(last.get("message") or "")
    try:
        said = TrainerResult.from_json(raw).message if raw else ""
    except ContractError:
        # Not a result: the container's log tail, whose last lines say the most.
        return with_tail(head, raw)
    if reason == "DeadlineExceeded":
        said = _RERUN_ADVICE.sub("", said)
    return short_message(f"{head}: {said}" if said else head)


#: What a failed Job's message says after the Job controller's reason when its last pod never
#: ran. "Last": an earlier pod may have run (evicted, then a replacement no node could take).
NEVER_RAN = "; its last pod never ran: "


def never_ran_message(failure: str, waiting: str) -> str:
    """A failed Job's message when its last pod never ran, with what that pod waited for,
    e.g. ``DeadlineExceeded: Job was active longer than specified deadline; its last pod never
    ran: pod x cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.``

    Why: a Job past activeDeadlineSeconds deletes its pod, so the scheduler's reason (no
    node with a free GPU) went with it, and the message alone told the user to raise the
    deadline when the cluster lacked GPUs.
    """
    return short_message(f"{failure}{NEVER_RAN}{waiting}")


def _ran(pod: Mapping[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase in ("Running", "Succeeded", "Failed") or _terminated(pod) is not None


def pod_job_name(pod: Mapping[str, Any]) -> str | None:
    """The name of the Job a pod belongs to, from the Job controller's labels (either spelling)."""
    labels = pod["metadata"].get("labels") or {}
    return labels.get("job-name") or labels.get("batch.kubernetes.io/job-name")


def pod_of_job(pod: Mapping[str, Any], name: str, uid: str | None) -> bool:
    """Whether a pod belongs to this Job object, not merely to a Job of the same name.

    A Job run again (a raised limit) is deleted in the background and created anew under
    the same name, so the old run's pods, until the garbage collector removes them, carry
    the same job-name label: read as the new Job's, a finished old pod made a Job that had
    not started read as running, with the old run's progress. The pod's controller
    reference (or the Job controller's controller-uid label) names the Job's uid; a pod
    without either (or a Job not yet created, without a uid) is matched by name alone.
    """
    if pod_job_name(pod) != name:
        return False
    pmeta = pod["metadata"]
    owners = {
        ref.get("uid")
        for ref in pmeta.get("ownerReferences") or []
        if ref.get("kind") == "Job" and ref.get("controller")
    }
    labels = pmeta.get("labels") or {}
    owners |= {labels.get("controller-uid"), labels.get("batch.kubernetes.io/controller-uid")}
    owners.discard(None)
    return not uid or not owners or uid in owners


#: Container waiting reasons that do not clear by themselves: the pod needs a fix from someone.
STUCK_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "RegistryUnavailable",
        "SignatureValidationFailed",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)


def pod_waiting(pod: Mapping[str, Any], mounts: Mapping[str, str] | None = None) -> str:
    """Why a pod that is not running yet waits, or "" when nothing says it is stuck.

    Why: a trainer Job whose pod cannot be scheduled (no node with a free GPU), pull its image
    or mount its volumes stays "pending" for good; without the scheduler's or kubelet's reason
    in the task's conditions, a platform engineer sees a task that never trains and no cause.
    ``mounts`` (pod uid -> why, :func:`mount_failures`): a pod's status says nothing of its
    volumes, only Events do, which the caller reads.
    """
    name = pod["metadata"].get("name", "")
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return short_message(f"pod {name} cannot be scheduled: {cond.get('message', '')}", 300)
    for cs in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        state = cs.get("state") or {}
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if reason is None and _between_crashes(cs, state, last):
            # Started again after a crash and not ready yet: still the crash loop. Reported
            # in the same words as during the back-off, or the reason would leave the task's
            # Serving condition at every restart and come back at the next back-off.
            reason = "CrashLoopBackOff"
        if reason not in STUCK_WAITING_REASONS:
            continue
        if reason in _PULL_FAILURES or reason == "ImagePullBackOff":
            return _pull_failure(name, cs, reason, str(waiting.get("message") or ""))
        detail = f": {waiting['message']}" if waiting.get("message") else ""
        if last and reason == "CrashLoopBackOff":
            # How the container last ended says more than the back-off (whose duration ticks).
            # Other reasons keep their own words: lastState outlives any restart.
            detail = f" (last exit code {last.get('exitCode')}, {last.get('reason', '?')})"
        return short_message(f"pod {name}: {reason}{detail}", 300)
    why = (mounts or {}).get(str(pod["metadata"].get("uid", "")))
    if why and setting_up(pod):
        return short_message(f"pod {name} cannot mount its volumes: {why}", 300)
    return ""


#: Waiting reasons of a failed image pull, whose message is the cause in the kubelet's (or the
#: container runtime's) words; the kubelet names the last of them in the back-off's message.
_PULL_FAILURES = ("ErrImagePull", "RegistryUnavailable", "SignatureValidationFailed")
#: ImagePullBackOff's message since Kubernetes 1.32: 'Back-off pulling image "Y": ErrImagePull:
#: <cause>'; before, 'Back-off pulling image "Y"' alone.
_BACK_OFF_CAUSE_RE = re.compile(
    rf'^Back-off pulling image "[^"]*": (?:(?:{"|".join(_PULL_FAILURES)}): )?(?P<cause>.+)$', re.S
)


#: The gRPC wrapper of the container runtime's error ("rpc error: code = Unknown desc = ").
_RPC_ERROR_RE = re.compile(r"^rpc error: code = \w+ desc = ")
#: containerd's steps before the cause, each naming the image the message already names.
_PULL_STEPS_RE = re.compile(
    r'^(?:(?:failed to pull and unpack image|failed to resolve reference) "[^"]*": )+'
)
#: The addresses of a Go network error ("dial tcp 140.82.112.34:443: ", "read tcp
#: 10.244.1.5:41234->140.82.112.34:443: "): the registry's address and the local port
#: change from one pull attempt to the next.
_NET_ADDRESSES_RE = re.compile(r"\b(dial|read|write) (tcp|udp)([46]?) [^\s>]+?(?:->\S+?)?: ")


def _pull_cause(message: str) -> str:
    """The cause in a failed pull's message, without the wrappers and addresses around it.

    Why: containerd's message is the gRPC wrapper, then the image named twice, then the
    cause ('rpc error: code = Unknown desc = failed to pull and unpack image "IMG": failed
    to resolve reference "IMG": ... 401 Unauthorized'), and cut to length from the start,
    the cause was what went. The network addresses go because they change every attempt,
    and would rewrite the condition (and the task's status) each time.
    """
    message = _PULL_STEPS_RE.sub("", _RPC_ERROR_RE.sub("", message.strip()))
    return _NET_ADDRESSES_RE.sub(r"\1 \2\3: ", message)


def _pull_failure(name: str, cs: Mapping[str, Any], reason: str, message: str) -> str:
    """Why a container cannot pull its image: ``pod X cannot pull image Y: <cause>``, cut
    before the cause (:func:`with_tail`) where it is long.

    Why the cause: "cannot pull image" alone does not tell a missing tag from a registry that
    wants credentials (401 Unauthorized) or cannot be reached (:func:`_pull_cause`). Why the
    same words for the failed pull and the back-off after it: the kubelet alternates the two,
    and two texts would rewrite the condition (and the task's status) every back-off. Since
    Kubernetes 1.32 the back-off's message ends with the failed pull's, so both read the
    same. On an older kubelet the back-off says no cause: the text then alternates between
    the two forms, once per pull attempt (the kubelet's back-off doubles up to five minutes
    between them).
    """
    if reason == "ImagePullBackOff":
        found = _BACK_OFF_CAUSE_RE.match(message)
        message = found["cause"] if found else ""
    said = f"pod {name} cannot pull image {cs.get('image', '?')}"
    cause = _pull_cause(message)
    return with_tail(said, cause, 300) if cause else short_message(said, 300)


#: A container's waiting reason while the kubelet sets its pod up (the sandbox, the volumes,
#: the image pulls): ContainerCreating, or PodInitializing in a pod with init containers (a
#: sidecar injector's, say).
_SETTING_UP = frozenset({"ContainerCreating", "PodInitializing"})


def setting_up(pod: Mapping[str, Any]) -> bool:
    """Whether a pod is on a node and none of its containers has been created yet.

    Why: such a pod may wait for its volumes for good (a ReadWriteOnce claim attached to
    another node), and its status does not say so; only the Events of the attach/detach
    controller and the kubelet do (:func:`mount_failures`). Volumes are mounted before any
    container is created, so a pod with a container past this point has them all.
    """
    status = pod.get("status") or {}
    if status.get("phase", "Pending") != "Pending":
        return False
    scheduled = bool((pod.get("spec") or {}).get("nodeName")) or any(
        cond.get("type") == "PodScheduled" and cond.get("status") == "True"
        for cond in status.get("conditions") or []
    )
    containers = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    return scheduled and all(
        ((cs.get("state") or {}).get("waiting") or {}).get("reason") in _SETTING_UP
        for cs in containers
    )


def _between_crashes(
    cs: Mapping[str, Any], state: Mapping[str, Any], last: Mapping[str, Any]
) -> bool:
    """A container restarted after a failed run, running (or starting) and not ready."""
    if cs.get("ready") or not cs.get("restartCount"):
        return False
    if state and "running" not in state:
        return False  # waiting (its own reason) or terminated
    return bool(last) and last.get("exitCode") not in (None, 0)


# The refused pod's generated name ("j-6rzwv"), new on every retry of the Job controller.
_REFUSED_POD_NAME_RE = re.compile(r'^(pods?|Pod) "[^"]*" ')
_NO_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)


def _event_time(ev: Mapping[str, Any]) -> dt.datetime:
    """When an Event last happened: core/v1 style (lastTimestamp) or events.k8s.io style
    (series.lastObservedTime for a repeated one, else eventTime), as a comparable time."""
    raw = (
        ev.get("lastTimestamp")
        or (ev.get("series") or {}).get("lastObservedTime")
        or ev.get("eventTime")
        or ev.get("firstTimestamp")
    )
    try:
        return parse_time(raw) or _NO_TIME
    except ValueError:
        return _NO_TIME


def _newest_messages(
    events: Iterable[Mapping[str, Any]],
    key: Callable[[Mapping[str, Any]], str | None],
    rank: Callable[[Mapping[str, Any]], int] = lambda ev: 0,
) -> dict[str, str]:
    """The message of the newest Event per ``key`` (Events it gives None for are left out)
    among those of the highest ``rank``, without the aggregation prefix.

    Why the prefix goes: the event recorder adds it once similar Events come often, and a
    message read into a condition must not change (and have the status written) unless the
    reason does.
    """
    newest: dict[str, tuple[tuple[int, dt.datetime], str]] = {}
    for ev in events:
        k = key(ev)
        if k is None:
            continue
        order = (rank(ev), _event_time(ev))
        if k not in newest or order >= newest[k][0]:
            msg = str(ev.get("message", "")).removeprefix("(combined from similar events): ")
            newest[k] = (order, msg)
    return {k: msg for k, (_, msg) in newest.items()}


def failed_creates(
    events: Iterable[Mapping[str, Any]], uids: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The newest ``FailedCreate`` message per Job name, from core/v1 Events of Jobs.

    Why: when a ResourceQuota, a LimitRange or Pod Security admission refuses a Job's pod,
    the Job controller says so only in an Event: the Job has no pod, no condition, and would
    look like one about to start for good.

    ``uids`` (Job name -> uid): Events of an earlier Job of the same name are not counted.
    The message leaves out the refused pod's generated name and the aggregation prefix: both
    change from one retry to the next, and the reason goes into a condition message, which
    must not change (and have the status written) unless the reason does.
    """

    def job(ev: Mapping[str, Any]) -> str | None:
        obj = ev.get("involvedObject") or {}
        if ev.get("reason") != "FailedCreate" or obj.get("kind") != "Job":
            return None
        name = str(obj.get("name", ""))
        want, uid = (uids or {}).get(name), obj.get("uid")
        return None if want and uid and uid != want else name

    return {
        name: short_message(
            "cannot create its pod: "
            + _REFUSED_POD_NAME_RE.sub(r"\1 ", msg.removeprefix("Error creating: ")),
            300,
        )
        for name, msg in _newest_messages(events, job).items()
    }


#: The Event reasons that say why a pod's volumes are not attached or mounted: the
#: attach/detach controller's (a ReadWriteOnce volume attached to another node: Multi-Attach
#: error) and the kubelet's.
MOUNT_FAILURE_REASONS = ("FailedAttachVolume", "FailedMount")
#: How the kubelet's own time-out begins, which it posts every two minutes beside the cause.
_MOUNT_TIMEOUT = "Unable to attach or mount volumes"
#: A cloud API's request id in a CSI driver's error ("RequestID: 5b6c...,"), new every attempt.
_REQUEST_ID_RE = re.compile(r"\brequest[ _-]?id\s*[:=]\s*[\w-]+,?\s*", re.I)


#: The kubelet's Event reasons that say a pod got past every volume: its image pulled and its
#: containers started (the kubelet pulls only once every volume is mounted).
MOUNT_PROGRESS_REASONS = ("Pulling", "Pulled", "Created", "Started")
#: The attach/detach controller's Event that one volume (named in it) is attached: progress
#: for that volume only. Why not the pod's: a pod with two claims (a data-prep pod mounts the
#: capture claim and the workspace) has the second attached seconds after the first's
#: Multi-Attach error, which the controller reports once and which still holds.
ATTACHED_REASON = "SuccessfulAttachVolume"
_VOLUME_RE = re.compile(r'volume "([^"]+)"')


def _volume(ev: Mapping[str, Any]) -> str | None:
    """The volume an Event's message names (``... for volume "pvc-1234" ...``), if any."""
    found = _VOLUME_RE.search(str(ev.get("message", "")))
    return found[1] if found else None


def _pod_uid(ev: Mapping[str, Any], reasons: Collection[str]) -> str | None:
    """The uid of the pod an Event of one of ``reasons`` is about; None for any other."""
    obj = ev.get("involvedObject") or {}
    if ev.get("reason") not in reasons or obj.get("kind") != "Pod":
        return None
    return str(obj.get("uid", ""))


def mount_failures(events: Iterable[Mapping[str, Any]], uids: Collection[str]) -> dict[str, str]:
    """Why each pod of ``uids`` cannot attach or mount its volumes: pod uid -> the newest
    message of its ``FailedAttachVolume`` and ``FailedMount`` core/v1 Events.

    A failure older than one of the pod's progress Events (:data:`MOUNT_PROGRESS_REASONS`,
    or an attach of the volume it names, :data:`ATTACHED_REASON`) is over: a Multi-Attach
    error resolved, the pod attached and pulling its image (still in ContainerCreating), was
    named as the cause until its Event expired (an hour). The
    kubelet's time-out ("Unable to attach or mount volumes: unmounted volumes=[data] ...:
    timed out waiting for the condition") counts only while nothing says more: it comes every
    two minutes beside the cause (a Multi-Attach error, a failed SetUp), and taking the newest
    of the two would rewrite the condition (and the task's status) each time. For the same
    reason a cloud API's request id is left out.
    """
    events = list(events)
    # Per pod uid (the kubelet's progress) and per (uid, volume) (an attach).
    progress: dict[Any, dt.datetime] = {}
    for ev in events:
        key: Any = _pod_uid(ev, MOUNT_PROGRESS_REASONS)
        keys: list[Any] = [key]
        if key is None and (attached := _pod_uid(ev, (ATTACHED_REASON,))) is not None:
            # Its own volume's failures are over; so is the kubelet's time-out, which names
            # no volume that way ("unattached volumes=[capture]") and comes back while one is.
            keys = [(attached, _volume(ev)), (attached, None)]
        for key in filter(None, keys):
            progress[key] = max(progress.get(key, _NO_TIME), _event_time(ev))

    def pod(ev: Mapping[str, Any]) -> str | None:
        uid = _pod_uid(ev, MOUNT_FAILURE_REASONS)
        if uid is None or uid not in uids:
            return None
        since = max(progress.get(uid, _NO_TIME), progress.get((uid, _volume(ev)), _NO_TIME))
        return None if _event_time(ev) < since else uid

    def says_more(ev: Mapping[str, Any]) -> int:
        return 0 if _MOUNT_TIMEOUT in str(ev.get("message", "")) else 1

    return {
        uid: _REQUEST_ID_RE.sub("", msg)
        for uid, msg in _newest_messages(events, pod, says_more).items()
    }


def serving_waiting(
    pods: Iterable[Mapping[str, Any]], mounts: Mapping[str, str] | None = None
) -> str:
    """Why a Triton pod of the task is not ready, from the first stuck one, or "".
    ``mounts``: why pods cannot mount their volumes (:func:`pod_waiting`)."""
    for pod in pods:
        if (pod["metadata"].get("labels") or {}).get(n.LABEL_COMPONENT) != "triton":
            continue
        why = pod_waiting(pod, mounts)
        if why:
            return why
    return ""


def replica_failure(deployment: Mapping[str, Any] | None) -> str:
    """Why the Deployment cannot create its pods, from its ``ReplicaFailure`` condition (the
    ReplicaSet controller's words: a LimitRange's maximum, a quota), or "".

    Why: a pod that admission refuses never exists, so no pod says why (:func:`serving_waiting`
    has nothing to read), and Serving said "waiting for Triton replicas ... (0/2)" for good.
    The refused pod's generated name is left out: it is new on every retry, and the reason
    goes into a condition message, which must not change unless the reason does.
    """
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            said = _REFUSED_POD_NAME_RE.sub(r"\1 ", str(cond.get("message") or ""))
            return short_message(f"cannot create its pods: {said or cond.get('reason', '')}", 300)
    return ""


def job_view(
    job: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    mounts: Mapping[str, str] | None = None,
) -> JobView:
    """Summarise a trainer Job and its pods (pods of other Jobs are ignored). ``mounts``: why
    pods cannot mount their volumes (:func:`pod_waiting`)."""
    meta = job["metadata"]
    labels = meta.get("labels") or {}
    if meta.get("deletionTimestamp"):
        # Deleted (by the operator: a data recheck, a rerun; or by hand), and kept by
        # another controller's finalizer. Read as it was, its old result was taken for the
        # current one at every pass (a recheck deleted it again and again, and said "curating
        # again at" a time long past); the plan waits for it to go instead.
        finalizers = tuple(str(f) for f in meta.get("finalizers") or ())
        held = f" (finalizers: {', '.join(finalizers)})" if finalizers else ""
        # Not FailureTarget or SuccessCriteriaMet alone: its pods may still be ending.
        conds = _conditions(job)
        return JobView(
            name=meta["name"],
            stage=labels.get(n.LABEL_STAGE, ""),
            revision=labels.get(n.LABEL_REVISION, ""),
            candidate=labels.get(n.LABEL_CANDIDATE),
            state=PENDING,
            waiting=short_message(f"waiting for Job {meta['name']} to be deleted{held}", 300),
            uid=str(meta.get("uid", "")),
            deleting=True,
            finalizers=finalizers,
            finished="Complete" in conds or "Failed" in conds,
        )
    status = job.get("status") or {}
    conds = _conditions(job)
    own = [p for p in pods if pod_of_job(p, meta["name"], meta.get("uid"))]
    own.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)

    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        state = SUCCEEDED
    elif "Failed" in conds or "FailureTarget" in conds:
        state = FAILED
    elif own and (own[0].get("status") or {}).get("phase", "Pending") == "Pending":
        # The newest pod has not started: a first one, or the replacement of one that was
        # evicted (spot reclaim, node drain) or crashed. Counted as running because an older
        # pod had run, a replacement that no node could take said nothing for hours.
        state = PENDING
    elif any(
        (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for p in own
    ):
        state = RUNNING  # started; a finished pod counts until the Job controller concludes
    else:
        state = PENDING

    result: TrainerResult | None = None
    result_error: str | None = None
    raw = ""
    want_exit_zero = state == SUCCEEDED
    for pod in own:
        term = _terminated(pod)
        if not term or not term.get("message"):
            continue
        if want_exit_zero != (term.get("exitCode") == 0) and state in (SUCCEEDED, FAILED):
            continue
        raw = str(term["message"])
        try:
            result = TrainerResult.from_json(raw)
            # Its message becomes a condition message and an Event (plan._job_outcome).
            result = replace(result, message=redact_uris(result.message))
        except ContractError as exc:
            result_error = redact_uris(str(exc))
        break

    message = ""
    failure_reason = ""
    if state == FAILED:
        c = conds.get("Failed") or conds.get("FailureTarget") or {}
        message = failure_message(c, _last_failure(own))
        # Only once the Job controller says Failed: with FailureTarget alone its pods may
        # still be ending (a trainer checkpoints on SIGTERM), and a Job run again meanwhile
        # would count the old pod as its own.
        failure_reason = str(conds["Failed"].get("reason") or "") if "Failed" in conds else ""
    progress = None
    for pod in own:
        value = (pod["metadata"].get("annotations") or {}).get(n.ANNOTATION_PROGRESS)
        if value is not None:
            try:
                pct = float(value)
            except ValueError:
                continue
            # The annotation is the trainer's to write (or anyone's who may patch the pod):
            # "inf" or "1e999" parse as infinity, which int() refuses with an OverflowError
            # that crashed every reconcile of the task. Non-finite reads as no progress.
            if not math.isfinite(pct):
                continue
            progress = max(progress or 0, min(100, max(0, int(pct))))
    started, finished = (
        parse_time(status.get("startTime")),
        parse_time(status.get("completionTime")),
    )
    if finished is None and state in (SUCCEEDED, FAILED):
        c = (
            conds.get("Complete")
            or conds.get("Failed")
            or conds.get("SuccessCriteriaMet")
            or conds.get("FailureTarget")
            or {}
        )
        finished = parse_time(c.get("lastTransitionTime"))
    seconds = (finished - started).total_seconds() if started and finished else None
    waiting = ""
    if state == PENDING:
        waiting = next((w for w in (pod_waiting(p, mounts) for p in own) if w), "")
    return JobView(
        name=meta["name"],
        stage=labels.get(n.LABEL_STAGE, ""),
        revision=labels.get(n.LABEL_REVISION, ""),
        candidate=labels.get(n.LABEL_CANDIDATE),
        state=state,
        result=result,
        result_error=result_error,
        message=short_message(message),
        progress=progress,
        seconds=seconds,
        finished_at=finished,
        waiting=waiting,
        uid=str(meta.get("uid", "")),
        failure_reason=failure_reason,
        failed_pods=int(status.get("failed") or 0),
        pod_ran=any(map(_ran, own)),
    )
