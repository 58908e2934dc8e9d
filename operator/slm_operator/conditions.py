"""Condition types, reasons and the one helper that sets a condition.

Every condition the operator owns is listed here with what it means, so that a platform
engineer reading ``kubectl describe agenttask`` (or an Argo CD health check) can rely on a
closed vocabulary. Conditions follow the Kubernetes API conventions: ``type``, ``status``
(True/False/Unknown), a CamelCase ``reason``, a human ``message``, ``lastTransitionTime``
(moves only when ``status`` flips) and ``observedGeneration``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

# ---- condition types -------------------------------------------------------------------
#: The curated, PII-scrubbed, split dataset of the revision being trained exists.
DATA_READY: Final = "DataReady"
#: Every candidate's fine-tune Job of the revision being trained finished (at least one well).
TRAINED: Final = "Trained"
#: The evaluation gate selected a candidate (True) or rejected all of them (False, GateNotMet).
EVALUATED: Final = "Evaluated"
#: A promoted model is served by Triton with at least one ready replica.
SERVING: Final = "Serving"
#: Live latency and error rate are within the SLO (filled by live control from Prometheus).
SLO_MET: Final = "SLOMet"
#: Calls for this task go to the LLM instead of the SLM (no model yet, or SLO at risk).
FALLBACK_ACTIVE: Final = "FallbackActive"
#: Summary: a model serves the task's calls within its SLO.
READY: Final = "Ready"

ALL_TYPES: Final = (DATA_READY, TRAINED, EVALUATED, SERVING, SLO_MET, FALLBACK_ACTIVE, READY)

TRUE: Final = "True"
FALSE: Final = "False"
UNKNOWN: Final = "Unknown"

# ---- reasons ----------------------------------------------------------------------------
INVALID_SPEC: Final = "InvalidSpec"  # the spec breaks a rule CEL cannot express
PENDING: Final = "Pending"  # waiting for an earlier step
JOB_PENDING: Final = "JobPending"  # Job created, pod not running yet
JOB_RUNNING: Final = "JobRunning"
JOB_FAILED: Final = "JobFailed"  # message carries the pod's termination message
AWAITING_RESULT: Final = "AwaitingResult"  # Job succeeded, result not visible yet
RESULT_MISSING: Final = "ResultMissing"  # Job succeeded but never reported a valid result
DATA_PREPARED: Final = "DataPrepared"
#: Fewer curated examples than spec.dataset.minExamples: the gateway keeps capturing and the
#: data-prep Job runs again after the operator's recheck interval. Not a failure.
WAITING_FOR_DATA: Final = "WaitingForData"
TRAINING_SUCCEEDED: Final = "TrainingSucceeded"
PARTIALLY_TRAINED: Final = "PartiallyTrained"  # some candidates failed, others can be judged
GATE_PASSED: Final = "GatePassed"
GATE_NOT_MET: Final = "GateNotMet"
NOT_BETTER: Final = "NotBetterThanServing"  # a retrained model passed the gate but is no better
#: The gate was raised past the served model's score: it stays served (only a retraining
#: exports and promotes another), and says so.
SERVED_BELOW_GATE: Final = "ServedBelowGate"
EXPORTING: Final = "Exporting"
NO_MODEL: Final = "NoModel"  # nothing has passed the gate yet
DEPLOYMENT_PROGRESSING: Final = "DeploymentProgressing"
DEPLOYMENT_AVAILABLE: Final = "DeploymentAvailable"
METRICS_UNAVAILABLE: Final = "MetricsUnavailable"  # no metrics: the last decision is kept
SLO_BREACHED: Final = "SLOBreached"  # p95 latency or error rate over the SLO
WITHIN_SLO: Final = "WithinSLO"
RECOVERING: Final = "Recovering"  # fallback on, SLO healthy again, waiting out the hysteresis
NO_READY_REPLICAS: Final = "NoReadyReplicas"
#: serving.minReplicas 0 and no traffic: no replica by design, the LLM answers until calls
#: bring one back. Healthy (Ready=True) and a Normal event, unlike NoReadyReplicas.
SCALED_TO_ZERO: Final = "ScaledToZero"
#: Calls came back to a task scaled to zero and a replica is starting: the LLM answers until
#: it is ready, as while scaled to zero. Healthy and a Normal event, for the replica's
#: startup budget; past it, NoReadyReplicas.
WAKING_FROM_ZERO: Final = "WakingFromZero"
#: A Service of the task's serving name (``<task>-slm``) exists and is someone else's (made
#: by hand or by another tool): it is not applied, and the route does not name it, so every
#: call goes to the LLM (Serving False, FallbackActive True). Someone has to free the name.
SERVICE_NAME_TAKEN: Final = "ServiceNameTaken"
#: A promoted model's Deployment does not finish rolling out: its new pods are not ready past
#: the Deployment's progress deadline (ProgressDeadlineExceeded) or the Triton pod's start-up
#: budget. The pods of its previous template still take the calls the route gives the SLM
#: (or, in shadow, their copies), with no end in sight: someone has to look at the new pods.
ROLLOUT_STUCK: Final = "RolloutStuck"
NOT_SERVING: Final = "NotServing"
SLM_SERVING: Final = "SLMServing"
NO_SERVING_MODEL: Final = "NoServingModel"
READY_REASON: Final = "Ready"
#: The API server refused to create or update a child (RBAC, quota, an admission webhook,
#: validation); the message carries its words. Retrying does not help: someone has to act.
APPLY_FAILED: Final = "ApplyFailed"

# ---- Event reasons of no condition --------------------------------------------------------
#: A Warning Event, once per task and operator process: the API server dropped status fields
#: this operator wrote, which the cluster's AgentTask CRD does not declare (an older CRD:
#: ``helm upgrade`` never updates CRDs). The message names them and says what to apply.
CRD_OUTDATED: Final = "CRDOutdated"

#: Reasons that deserve a Warning event rather than a Normal one.
WARNING_REASONS: Final = frozenset(
    {
        INVALID_SPEC,
        JOB_FAILED,
        RESULT_MISSING,
        GATE_NOT_MET,
        SERVED_BELOW_GATE,
        SLO_BREACHED,
        NO_READY_REPLICAS,
        ROLLOUT_STUCK,
        SERVICE_NAME_TAKEN,
        APPLY_FAILED,
    }
)


def condition(
    type_: str, status: str, reason: str, message: str, generation: int, now: str
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
        "observedGeneration": generation,
    }


def merge_conditions(
    previous: Iterable[Mapping[str, Any]], desired: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Return ``desired`` with ``lastTransitionTime`` carried over where status did not flip.

    The result is ordered like :data:`ALL_TYPES` so that a write-if-changed comparison is not
    fooled by ordering, and conditions the operator does not own are kept untouched.
    """
    prev = {c["type"]: c for c in previous if "type" in c}
    out: dict[str, dict[str, Any]] = {}
    for c in desired:
        c = dict(c)
        old = prev.get(c["type"])
        if old is not None and old.get("status") == c["status"] and old.get("lastTransitionTime"):
            c["lastTransitionTime"] = old["lastTransitionTime"]
        out[c["type"]] = c
    for t, c in prev.items():
        if t not in out:
            out[t] = dict(c)
    order = {t: i for i, t in enumerate(ALL_TYPES)}
    return sorted(out.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def find(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    for c in conditions:
        if c.get("type") == type_:
            return c
    return None


def transitions(
    previous: Iterable[Mapping[str, Any]], current: Iterable[Mapping[str, Any]]
) -> list[tuple[str, str, str]]:
    """Events to post: ``(event_type, reason, message)`` for every condition whose status or
    reason changed since the last written status.

    An invalid spec is one event, Ready's, which says what is wrong: the other conditions
    only point to it ("see Ready"), and six such Warnings without the problem itself buried
    it in ``kubectl describe``. Ready's event comes even when Ready was already False (a
    failed gate, say), and again when another edit is invalid for another reason.
    """
    prev = {c["type"]: c for c in previous if "type" in c}
    events = []
    for c in current:
        old = prev.get(c["type"]) or {}
        if c["reason"] == INVALID_SPEC:
            if c["type"] != READY or (old.get("reason"), old.get("message")) == (
                INVALID_SPEC,
                c["message"],
            ):
                continue
        elif (old.get("status"), old.get("reason")) == (c["status"], c["reason"]):
            continue
        elif c["type"] == READY and old.get("status") == c["status"]:
            continue  # Ready echoes other conditions; only its flips are news
        if not old and c["status"] == UNKNOWN:
            continue  # first visit: every condition starts Unknown, not news
        kind = "Warning" if c["reason"] in WARNING_REASONS else "Normal"
        events.append((kind, c["reason"], f"{c['type']}={c['status']}: {c['message']}"))
    return events
