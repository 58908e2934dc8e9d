"""Deterministic names, labels and the training revision of an AgentTask.

Why deterministic: the operator may be killed at any moment and restarted; recomputing the
same name for the same intent is what makes a second create a no-op instead of a duplicate.
Jobs are immutable, so anything that changes what a Job would do must change its name: that
is the revision, a short hash of exactly the spec fields that affect training.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

GROUP: Final = "slmfleet.dev"
VERSION: Final = "v1alpha1"
PLURAL: Final = "agenttasks"
KIND: Final = "AgentTask"
FIELD_MANAGER: Final = "slm-fleet-operator"

LABEL_TASK: Final = f"{GROUP}/agenttask"
LABEL_REVISION: Final = f"{GROUP}/revision"
LABEL_STAGE: Final = f"{GROUP}/stage"
LABEL_CANDIDATE: Final = f"{GROUP}/candidate"
LABEL_COMPONENT: Final = f"{GROUP}/component"
ANNOTATION_PROGRESS: Final = f"{GROUP}/progress"
ANNOTATION_ARTIFACT: Final = f"{GROUP}/artifact-uri"
ANNOTATION_CANDIDATE: Final = f"{GROUP}/candidate"
#: On an AgentTask: the Triton base URL the gateway should use instead of the task's Service.
ANNOTATION_ENDPOINT: Final = f"{GROUP}/serving-endpoint"
MANAGED_BY: Final = "app.kubernetes.io/managed-by"

STAGE_PREPARE: Final = "prepare"
STAGE_FINETUNE: Final = "finetune"
STAGE_EXPORT: Final = "export"
#: Removes the storage claim's folders of the task's superseded revisions.
STAGE_PRUNE: Final = "prune"
STAGE_SERVING: Final = "serving"

#: Spec fields whose change means "train again". Serving, fallback and retraining settings
#: are applied live without retraining.
TRAINING_FIELDS: Final = ("taskType", "dataset", "candidates", "training", "evaluation", "storage")

MAX_TASK_NAME: Final = 50
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


#: Fields inside :data:`TRAINING_FIELDS` that change how results are judged or how the Jobs
#: run, not what they train: the gate and the selection policy are applied by the operator
#: to recorded results on every pass, and a Job's deadline and retries are updated in place
#: (both are mutable). In the revision, an edit of one threw away finished training.
NOT_TRAINING_INPUTS: Final = {
    "evaluation": ("gate", "selectionPolicy"),
    "training": ("activeDeadlineSeconds", "backoffLimit"),
}


#: The trainer image the CRD used to write into every AgentTask's spec.training.image (its
#: schema default, until the operator got its own trainer image). Revisions hash an unset
#: image as this one: a task stored back then holds it, and a whole-object write of its
#: unchanged manifest (kubectl replace, Argo CD's Replace=true) now drops it; neither may
#: train again, nor may removing that default to follow the operator's image.
LEGACY_TRAINER_IMAGE: Final = "ghcr.io/slm-fleet/trainer:0.1.0"


def _with_legacy_image(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    training = spec.get("training")
    if isinstance(training, Mapping) and "image" not in training:
        return {**spec, "training": {**training, "image": LEGACY_TRAINER_IMAGE}}
    return spec


def _digest(relevant: dict[str, Any], retrain_epoch: int) -> str:
    if retrain_epoch:
        relevant["retrainEpoch"] = retrain_epoch
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def revision_of(spec: Mapping[str, Any], retrain_epoch: int = 0) -> str:
    """Ten hex digits identifying what would be trained; stable across key order."""
    spec = _with_legacy_image(spec)
    relevant: dict[str, Any] = {}
    for k in TRAINING_FIELDS:
        value = spec.get(k)
        if value is None:
            continue
        if k in NOT_TRAINING_INPUTS and isinstance(value, Mapping):
            value = {f: v for f, v in value.items() if f not in NOT_TRAINING_INPUTS[k]}
        relevant[k] = value
    return _digest(relevant, retrain_epoch)


def legacy_revision_of(spec: Mapping[str, Any], retrain_epoch: int = 0) -> str:
    """The revision operators before :data:`NOT_TRAINING_INPUTS` named for ``spec``.

    Why kept: a revision they trained from a spec that has not changed since must not be
    trained again after an upgrade (``plan`` keeps its name).
    """
    spec = _with_legacy_image(spec)
    return _digest(
        {k: spec.get(k) for k in TRAINING_FIELDS if spec.get(k) is not None}, retrain_epoch
    )


def child_name(*parts: str, limit: int = 63) -> str:
    """Join parts with '-' into a DNS-1123 label of at most ``limit`` characters.

    Over-long names keep their head and get a hash suffix, so two long names never collide.
    """
    name = "-".join(p.strip("-") for p in parts if p)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def data_job_name(task: str, revision: str) -> str:
    return child_name(task, "data", revision)


def finetune_job_name(task: str, candidate: str, revision: str) -> str:
    return child_name(task, "ft", candidate, revision)


def export_job_name(task: str, candidate: str, revision: str) -> str:
    """One export Job per candidate of a revision, not one per revision.

    Why: the candidate chosen within a revision can change (a failed candidate's Job re-run,
    a result lost and read again). With one name per revision the new export would clash
    with the old, immutable Job, and the old Job's repository would be promoted under the new
    candidate's name and threshold.
    """
    return child_name(task, "export", candidate, revision)


def prune_job_name(task: str, revision: str) -> str:
    """One prune Job per served revision: promoted, it makes the earlier ones superseded once,
    and the Job carries the served revision's label so that it goes with that revision's Jobs
    when another is promoted."""
    return child_name(task, "prune", revision)


def serving_name(task: str) -> str:
    return child_name(task, "slm")


def task_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an AgentTask's children, or None when it can.

    The Service and the labels derived from it need a DNS-1035 label, which is stricter than
    the DNS subdomain the apiserver accepts for custom objects.
    """
    if len(name) > MAX_TASK_NAME or not _DNS_LABEL.match(name):
        return (
            f"AgentTask name {name!r} must be a DNS-1035 label (lower-case letters, digits and "
            f"'-', starting with a letter) of at most {MAX_TASK_NAME} characters, because it "
            "names the task's Service, Jobs and labels"
        )
    return None


def labels(
    task: str, stage: str, revision: str | None = None, candidate: str | None = None
) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "slm-fleet",
        MANAGED_BY: FIELD_MANAGER,
        LABEL_TASK: task,
        LABEL_STAGE: stage,
        LABEL_COMPONENT: "triton" if stage == STAGE_SERVING else "trainer",
    }
    if revision:
        out[LABEL_REVISION] = revision
    if candidate:
        out[LABEL_CANDIDATE] = candidate
    return out
