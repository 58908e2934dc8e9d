"""Pure builders of every child object of an AgentTask.

Each function takes the AgentTask (a plain dict, as the apiserver returns it with defaults
applied) and returns the full desired object for server-side apply. No I/O happens here, so
the shapes are unit-tested without a cluster and the reconcile stays short.

The Job containers run ``slm-trainer <stage>``; each writes its result (the
:class:`slm_contract.TrainerResult` JSON) to ``/dev/termination-log``, which the kubelet turns
into the pod's termination message that the operator reads back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from slm_contract import DEFINITE_EXIT_CODES
from slm_operator import naming as n

WORKSPACE: Final = "/workspace"
DATASET_MOUNT: Final = "/mnt/dataset"
TERMINATION_LOG: Final = "/dev/termination-log"
#: Under a revision's folder: one Triton model repository per exported candidate.
REPOSITORIES: Final = "model_repositories"
GPU_RESOURCE: Final = "nvidia.com/gpu"
TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002

Obj = dict[str, Any]

#: The images a task without spec.training.image / spec.serving.image runs, unless the operator
#: is told others (:class:`Images`).
DEFAULT_TRAINER_IMAGE: Final = "ghcr.io/slm-fleet/trainer:0.1.0"
DEFAULT_TRITON_IMAGE: Final = "ghcr.io/slm-fleet/triton:0.1.0"


@dataclass(frozen=True)
class Images:
    """Where the pods the operator creates get their images: the cluster's defaults.

    Why the operator holds them, not the CRD: a cluster that mirrors images into its own
    registry (air-gapped, or a pull-through cache) sets them once, on the operator (the
    chart's operator.trainerImage and operator.tritonImage), instead of in every AgentTask;
    a CRD default would be written into each task when it is created and never follow.
    ``pull_secrets`` are listed on every trainer and Triton pod.
    """

    trainer: str = DEFAULT_TRAINER_IMAGE
    triton: str = DEFAULT_TRITON_IMAGE
    pull_secrets: tuple[str, ...] = ()


DEFAULT_IMAGES: Final = Images()

#: The ``slm-trainer`` sub-command each Job stage runs.
TRAINER_COMMANDS: Final = {
    n.STAGE_PREPARE: "curate",
    n.STAGE_FINETUNE: "finetune",
    n.STAGE_EXPORT: "export",
    n.STAGE_PRUNE: "prune",
}


def _meta(task: Mapping[str, Any]) -> tuple[str, str]:
    return task["metadata"]["name"], task["metadata"]["namespace"]


def owner_reference(task: Mapping[str, Any]) -> Obj:
    """Controller reference: deleting the task garbage-collects every child."""
    return {
        "apiVersion": f"{n.GROUP}/{n.VERSION}",
        "kind": n.KIND,
        "name": task["metadata"]["name"],
        "uid": task["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def revision_dir(task: Mapping[str, Any], revision: str) -> str:
    return f"{WORKSPACE}/{task['metadata']['name']}/{revision}"


def _restricted_security() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(section: Mapping[str, Any], gpus: int) -> Obj:
    res = {k: dict(v) for k, v in (section.get("resources") or {}).items() if v}
    if gpus > 0:
        res.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
    return res


def cpu_threads(resources: Mapping[str, Any]) -> int:
    """Threads for a pod's CPU allowance: its CPU limit (else request) rounded up, 0 if unset.

    Why: torch and OpenMP size their thread pools by the node's cores, not the pod's quota,
    so a 2-CPU model server on a 64-core node would run 64 threads and spend its quota
    being throttled. ``OMP_NUM_THREADS`` set from this sizes them to the pod.
    """
    for key in ("limits", "requests"):
        value = (resources.get(key) or {}).get("cpu")
        if value is None:
            continue
        text = str(value).strip()
        try:
            cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
        except ValueError:
            return 0  # the API server refuses such a quantity anyway
        if not math.isfinite(cores):  # "1e400" matches the quantity pattern
            return 0
        return max(1, math.ceil(cores - 1e-9)) if cores > 0 else 0
    return 0


def _container_env(resources: Mapping[str, Any], gpus: int) -> list[Obj]:
    """Environment every trainer and Triton container gets from its resources.

    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` from its CPU allowance (:func:`cpu_threads`), and,
    with no GPU requested, ``NVIDIA_VISIBLE_DEVICES=void``: CUDA images set it to ``all``, and
    on a node whose default container runtime is NVIDIA's (the GPU Operator's default) a pod
    that requested no GPU still saw every GPU of the node, so a CPU Triton or trainer put its
    model on a GPU another pod was given.
    """
    threads = cpu_threads(resources)
    env = [{"name": v, "value": str(threads)} for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")]
    return [
        *(env if threads else []),
        *([{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}] if gpus <= 0 else []),
    ]


def _tolerations(section: Mapping[str, Any], gpus: int) -> list[Obj]:
    tols = [dict(t) for t in section.get("tolerations") or []]
    gpu_tol = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    if gpus > 0 and gpu_tol not in tols:
        tols.append(gpu_tol)  # GPU nodes are conventionally tainted nvidia.com/gpu:NoSchedule
    return tols


def _pull_secrets(names: Sequence[str]) -> list[Obj]:
    """A pod's ``imagePullSecrets`` for the operator's configured pull secrets (the chart's
    imagePullSecrets): private-registry trainer and Triton images need them in each pod,
    since a pod that lists none gets only its ServiceAccount's."""
    return [{"name": name} for name in dict.fromkeys(names) if name]


def dataset_location(uri: str) -> tuple[str, Obj | None]:
    """Where the trainer reads the call log, and the PVC volume to mount for it, if any."""
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://") :].partition("/")
        return f"{DATASET_MOUNT}/{path}", {
            "name": "dataset",
            "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
        }
    if uri.startswith("file://"):
        # A file URI is percent-encoded (Path.as_uri writes "call%20logs"); the path is not.
        return unquote(uri[len("file://") :]), None
    return uri, None  # s3:// and other fsspec URIs are read directly


#: The longest time limit a trainer Job gets: the CRD's maximum for
#: ``training.activeDeadlineSeconds``. Kubernetes' Job controller turns the limit into
#: nanoseconds and overflows past about 292 years: the Job failed DeadlineExceeded at once,
#: which read as a limit raised since, so the Job was deleted and created again, forever.
MAX_JOB_SECONDS = 31_536_000


def job_limits(task: Mapping[str, Any]) -> tuple[int, int]:
    """(activeDeadlineSeconds, backoffLimit) of the task's trainer Jobs; a limit stored
    before the CRD had its maximum is held to it."""
    training = task["spec"].get("training") or {}
    return (
        min(int(training.get("activeDeadlineSeconds", 21600)), MAX_JOB_SECONDS),
        int(training.get("backoffLimit", 2)),
    )


def _trainer_job(
    task: Mapping[str, Any],
    revision: str,
    stage: str,
    name: str,
    args: list[str],
    gpus: int,
    candidate: str | None = None,
    extra_volumes: list[Obj] | None = None,
    extra_mounts: list[Obj] | None = None,
    service_account: str = "",
    images: Images = DEFAULT_IMAGES,
    grace_seconds: int | None = None,
) -> Obj:
    """One trainer Job. ``service_account`` is the operator's default trainer ServiceAccount
    (allowed to patch its own pod's progress annotation); ``spec.training.serviceAccountName``
    overrides it, and with neither the pods run as the namespace's default ServiceAccount.
    ``images``: the trainer image unless spec.training.image names one, and the pull secrets.
    ``grace_seconds``: the pod's terminationGracePeriodSeconds (None: Kubernetes' 30 s)."""
    task_name, ns = _meta(task)
    spec = task["spec"]
    training = spec.get("training") or {}
    labels = n.labels(task_name, stage, revision, candidate)
    volumes = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": spec["storage"]["claimName"]}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        *(extra_volumes or []),
    ]
    mounts = [
        {"name": "workspace", "mountPath": WORKSPACE},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *(extra_mounts or []),
    ]
    container: Obj = {
        "name": "trainer",
        "image": training.get("image") or images.trainer,
        "command": ["slm-trainer", TRAINER_COMMANDS[stage]],
        "args": [*args, f"--result-path={TERMINATION_LOG}"],
        "env": [
            {"name": "HF_HOME", "value": f"{WORKSPACE}/.cache/huggingface"},
            {"name": "SLM_TASK", "value": task_name},
            {"name": "SLM_REVISION", "value": revision},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            *_container_env(_resources(training, gpus), gpus),
        ],
        "resources": _resources(training, gpus),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _restricted_security(),
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"fsGroup": 1000},
    }
    if grace_seconds is not None:
        pod_spec["terminationGracePeriodSeconds"] = grace_seconds
    deadline, retries = job_limits(task)
    if training.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(training["nodeSelector"])
    # The trainer's Jobs share training.nodeSelector: when it pins them to GPU nodes (their
    # conventional taint tolerated by the fine-tune pods), the CPU-only data-prep and export
    # pods must tolerate it too, or they stay Pending until the Job's deadline.
    pinned_gpus = int(training.get("gpus", 1)) if training.get("nodeSelector") else 0
    tolerations = _tolerations(training, max(gpus, pinned_gpus))
    if tolerations:
        pod_spec["tolerations"] = tolerations
    account = training.get("serviceAccountName") or service_account
    if account:
        pod_spec["serviceAccountName"] = account
    if _pull_secrets(images.pull_secrets):
        pod_spec["imagePullSecrets"] = _pull_secrets(images.pull_secrets)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [owner_reference(task)],
        },
        "spec": {
            "backoffLimit": retries,
            "activeDeadlineSeconds": deadline,
            "podReplacementPolicy": "Failed",
            # A preempted trainer checkpoints on SIGTERM and its next pod resumes; eviction
            # or node drain must not use up backoffLimit.
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    # The trainer ran and reported a failure (3: too few examples, nothing
                    # passing) or was given bad arguments (2): another pod would only say the
                    # same again, so the Job fails at once; backoffLimit is for crashes (1).
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "trainer",
                            "operator": "In",
                            "values": list(DEFINITE_EXIT_CODES),
                        },
                    },
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


#: Curated examples a revision needs before it trains, when spec.dataset.minExamples is unset.
DEFAULT_MIN_EXAMPLES = 200


def min_examples(spec: Mapping[str, Any]) -> int:
    """The curated examples a revision needs to train (the data-prep Job's ``--min-examples``)."""
    return int((spec.get("dataset") or {}).get("minExamples", DEFAULT_MIN_EXAMPLES))


def data_prep_job(
    task: Mapping[str, Any],
    revision: str,
    service_account: str = "",
    images: Images = DEFAULT_IMAGES,
) -> Obj:
    """S2: curate (PII scrubbing, de-duplication) and split the logged calls. CPU only."""
    spec = task["spec"]
    ds = spec["dataset"]
    path, volume = dataset_location(ds["uri"])
    if volume and volume["persistentVolumeClaim"]["claimName"] == spec["storage"]["claimName"]:
        # The call log on the workspace claim: read through the workspace mount. A second
        # (read-only) volume of the same claim in one pod can hang it in ContainerCreating
        # on some kubelets, or make the shared mount read-only, and curate could not write.
        path, volume = WORKSPACE + path[len(DATASET_MOUNT) :], None
    stratify = {"tool-call": "tool", "classification": "content"}.get(
        spec.get("taskType", "tool-call"), "auto"
    )
    args = [
        f"--input={path}",
        f"--output-dir={revision_dir(task, revision)}/data",
        # Only this task's calls: a dataset.uri may be a log holding several agents' calls (a
        # shared file, an export), and each task trained on all of them. The gateway names a
        # call by the AgentTask it was sent to, and discover names its cluster files' calls
        # after the AgentTasks it proposes; curate counts the others by name, and says so.
        f"--task={task['metadata']['name']}",
        f"--eval-fraction={ds.get('evalFraction', 0.2)}",
        f"--min-examples={min_examples(task['spec'])}",
        # Unset, curate's own default bounds it (slm_contract.DEFAULT_MAX_EXAMPLES): a trainer
        # image older than the flag (a task may pin one) refuses the whole command line. Not
        # a CRD default either: it would join every stored spec, and so the revision hash.
        *([f"--max-examples={int(ds['maxExamples'])}"] if "maxExamples" in ds else []),
        # Passed only when set, for the same reason. Part of the dataset, so of the revision:
        # setting or moving the cutoff curates and trains again without the calls before it.
        *([f"--not-before={ds['notBefore']}"] if ds.get("notBefore") else []),
        "--scrub-pii" if ds.get("piiScrubbing", True) else "--no-scrub-pii",
        f"--stratify-by={stratify}",
    ]
    mounts = [{"name": "dataset", "mountPath": DATASET_MOUNT, "readOnly": True}] if volume else []
    return _trainer_job(
        task,
        revision,
        n.STAGE_PREPARE,
        n.data_job_name(task["metadata"]["name"], revision),
        args,
        gpus=0,
        extra_volumes=[volume] if volume else [],
        extra_mounts=mounts,
        service_account=service_account,
        images=images,
    )


def prune_job(
    task: Mapping[str, Any],
    revision: str,
    keep: Sequence[str],
    service_account: str = "",
    images: Images = DEFAULT_IMAGES,
) -> Obj:
    """Remove the task's revision folders on the storage claim except ``keep``. CPU only.

    Why: every revision writes ``<task>/<revision>/`` on the claim (data, candidates, their
    checkpoints with optimizer state, model repositories) and nothing else removes one once
    it is superseded: after enough retrainings the claim was full and the next Job failed.
    ``revision`` is the served one: the Job carries its label, so it is kept with that
    revision's Jobs and deleted with them once another is promoted (:func:`plan.plan`).
    The pod is the data-prep pod's, less the dataset: same claim, mounts, security context
    and resources; but its image is the operator's trainer (``images.trainer``, pulled with
    the same secrets), not ``spec.training.image``: a task pinned to a trainer built before
    the prune stage got a Job that failed ("invalid choice: 'prune'") at every promotion,
    and deleting it to run it again could not help. Removing folders needs nothing of the
    task's trainer, and the operator's own is the one that knows the stage.
    """
    task_name = task["metadata"]["name"]
    args = [
        f"--root={WORKSPACE}",
        f"--task={task_name}",
        f"--keep={','.join(dict.fromkeys(r for r in keep if r))}",
    ]
    job = _trainer_job(
        task,
        revision,
        n.STAGE_PRUNE,
        n.prune_job_name(task_name, revision),
        args,
        gpus=0,
        service_account=service_account,
        images=images,
    )
    # A new revision's Jobs wait while a prune may still remove folders (plan.py): a prune
    # pod that never starts (a quota, an image that cannot be pulled) must not hold the next
    # training for the trainer Jobs' hours. Removing folders takes seconds.
    job["spec"]["activeDeadlineSeconds"] = min(PRUNE_DEADLINE_S, job_limits(task)[0])
    job["spec"]["template"]["spec"]["containers"][0]["image"] = images.trainer
    return job


#: The prune Job's time limit, pending time included (activeDeadlineSeconds counts from the
#: Job's start): how long at most it can hold a new revision's Jobs.
PRUNE_DEADLINE_S = 300


#: Seconds a fine-tune pod gets between SIGTERM and SIGKILL, by the candidate's method.
#: On SIGTERM the trainer finishes its step and writes a checkpoint: the trainable weights
#: and their two AdamW moments, fsynced. With method full that is 12 bytes a parameter, 4.3
#: GB for a 360M model: 20 s on a local disk at 218 MB/s, minutes on a slow network volume,
#: far past Kubernetes' default of 30 s, and a save cut by SIGKILL loses everything since the
#: previous checkpoint. A LoRA or QLoRA checkpoint is megabytes, but the step before it (long
#: sequences on a small GPU) and a generative eval batch still take seconds to tens of seconds.
#: A trainer that is done sooner exits sooner; the period only bounds how long a drain or a
#: Job's deletion waits for one that is slow. (A cloud's spot reclaim notice, 30 s to 2 min,
#: and the kubelet's shutdownGracePeriod on a node shutdown cut it short whatever it says.)
#: Data prep and export keep the default: they checkpoint nothing, SIGTERM ends them at once
#: and their files are renamed into place whole, and leaving the field out keeps their Jobs'
#: templates as older operator versions built them.
FINETUNE_GRACE_SECONDS: Final = {"full": 300, "lora": 120, "qlora": 120}


def finetune_job(
    task: Mapping[str, Any],
    revision: str,
    candidate: Mapping[str, Any],
    service_account: str = "",
    images: Images = DEFAULT_IMAGES,
) -> Obj:
    """S5: fine-tune one candidate and score it on the held-out split against the LLM."""
    spec = task["spec"]
    lora = candidate.get("lora") or {}
    rdir = revision_dir(task, revision)
    ev = spec["evaluation"]
    args = [
        f"--candidate={candidate['name']}",
        f"--model={model_location(task, candidate['model'])}",
        f"--data={rdir}/data",
        f"--output={rdir}/candidates/{candidate['name']}",
        f"--artifact-uri={artifact_uri(task, revision, 'candidates', candidate['name'])}",
        f"--task-type={spec.get('taskType', 'tool-call')}",
        f"--method={candidate.get('method', 'lora')}",
        f"--lora-r={lora.get('r', 16)}",
        f"--lora-alpha={lora.get('alpha', 32)}",
        f"--lora-dropout={lora.get('dropout', 0.05)}",
        f"--epochs={candidate.get('epochs', 3)}",
        f"--learning-rate={candidate.get('learningRate', 0.0002)}",
        f"--max-seq-length={candidate.get('maxSeqLength', 1024)}",
        f"--metric={ev['metric']}",
        f"--target-precision={float(ev.get('targetPrecision', 0.97)):g}",
        f"--checkpoint-dir={rdir}/checkpoints/{candidate['name']}",
    ]
    if ev.get("calibrationFolds"):  # only when set: existing tasks keep their Jobs as they are
        args.append(f"--calibration-folds={int(ev['calibrationFolds'])}")
    gpus = int((spec.get("training") or {}).get("gpus", 1))
    return _trainer_job(
        task,
        revision,
        n.STAGE_FINETUNE,
        n.finetune_job_name(task["metadata"]["name"], candidate["name"], revision),
        args,
        gpus=gpus,
        candidate=candidate["name"],
        service_account=service_account,
        images=images,
        grace_seconds=FINETUNE_GRACE_SECONDS.get(
            candidate.get("method", "lora"), FINETUNE_GRACE_SECONDS["lora"]
        ),
    )


def model_location(task: Mapping[str, Any], model: str) -> str:
    """The ``--model`` a trainer pod can open for a candidate's ``model``.

    Why: a base model on the storage claim is named ``pvc://<claim>/<path>`` in the spec (as
    datasets and artifacts are), but the trainer reads a folder or a hub id, not a URI: it
    refused the URI only after data prep, on a GPU pod. The claim is mounted at
    :data:`WORKSPACE` in trainer and Triton pods alike, so the served adapter finds its base
    at the same path. (A model on another claim is refused by ``plan.validate``.)
    """
    prefix = f"pvc://{task['spec']['storage']['claimName']}/"
    return f"{WORKSPACE}/{model[len(prefix) :]}" if model.startswith(prefix) else model


def artifact_uri(task: Mapping[str, Any], revision: str, *parts: str) -> str:
    """The storage URI of a path under the revision's workspace folder, as results report it."""
    tail = "/".join((task["metadata"]["name"], revision, *parts))
    return f"pvc://{task['spec']['storage']['claimName']}/{tail}"


def export_job(
    task: Mapping[str, Any],
    revision: str,
    candidate: Mapping[str, Any],
    candidate_artifact: str,
    threshold: float | None,
    service_account: str = "",
    images: Images = DEFAULT_IMAGES,
) -> Obj:
    """Write the Triton model repository (config.pbtxt + Python backend) for the winner."""
    spec = task["spec"]
    task_name = task["metadata"]["name"]
    problem = candidate_artifact_problem(task, candidate_artifact)
    if problem:
        raise ValueError(problem)  # plan() reports it in status before building the Job
    source, _ = model_repository_source(candidate_artifact)
    # A repository per candidate: an export of another candidate of the same revision (the
    # choice changed) can never write over, or race with, this one.
    repo = f"{REPOSITORIES}/{candidate['name']}"
    args = [
        f"--candidate={candidate['name']}",
        f"--model={model_location(task, candidate['model'])}",
        f"--candidate-dir={source}",
        f"--output={revision_dir(task, revision)}/{repo}",
        f"--artifact-uri={artifact_uri(task, revision, repo)}",
        f"--model-name={task_name}",
        f"--task-type={spec.get('taskType', 'tool-call')}",
    ]
    if threshold is not None:
        args.append(f"--threshold={threshold}")
    return _trainer_job(
        task,
        revision,
        n.STAGE_EXPORT,
        n.export_job_name(task_name, candidate["name"], revision),
        args,
        gpus=0,
        candidate=candidate["name"],
        service_account=service_account,
        images=images,
    )


def candidate_artifact_problem(task: Mapping[str, Any], uri: str) -> str | None:
    """Why the export pod cannot read a candidate's reported artifact, or None when it can.

    The export pod mounts only the storage claim; a revision's candidates are written there
    (the claim is part of the revision), so an artifact elsewhere is a trainer (a custom
    image) that misreported, and no retry reads it.
    """
    _, claim = model_repository_source(uri)
    own = task["spec"]["storage"]["claimName"]
    if claim and claim != own:
        return (
            f"candidate artifact {uri} is not on the storage claim {own}, the only volume "
            "the export pod mounts"
        )
    return None


def model_repository_source(uri: str) -> tuple[str, str]:
    """Triton's ``--model-repository`` value for an artifact URI, and the PVC to mount for it
    ("" when none).

    ``pvc://<claim>/<path>`` becomes the mounted path of that claim; object-store URIs (s3://,
    gs://) are handed to Triton as they are, since it reads them natively. The claim comes
    from the URI, not from ``spec.storage.claimName``: a served model stays where it was
    exported when the task moves to another claim, until a revision trained there replaces it.
    """
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://") :].partition("/")
        return f"{WORKSPACE}/{path}", claim
    return uri, ""


def triton_deployment(
    task: Mapping[str, Any],
    revision: str,
    model_repository: str,
    candidate: str,
    replicas: int,
    images: Images = DEFAULT_IMAGES,
) -> Obj:
    """Triton serving the promoted revision's model repository: spec.serving.image or the
    operator's Triton image, with its pull secrets listed as the pods' imagePullSecrets
    (Triton runs as the namespace's default ServiceAccount)."""
    task_name, ns = _meta(task)
    spec = task["spec"]
    serving = spec.get("serving") or {}
    gpus = int(serving.get("gpus", 1))
    repo, claim = model_repository_source(model_repository)
    name = n.serving_name(task_name)
    selector = {n.LABEL_TASK: task_name, n.LABEL_STAGE: n.STAGE_SERVING}
    pod_labels = n.labels(task_name, n.STAGE_SERVING, revision, candidate)
    # Triton's Python backend passes every request and response through shared memory in
    # /dev/shm, one pool per model instance; a container runtime's default 64 MiB fills with a
    # few instances or a batch of long prompts, and the model fails to load or answer.
    volumes: list[Obj] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[Obj] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if claim:
        volumes.append(
            {
                "name": "workspace",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        mounts.append({"name": "workspace", "mountPath": WORKSPACE, "readOnly": True})
    container: Obj = {
        "name": "triton",
        "image": serving.get("image") or images.triton,
        "command": ["tritonserver"],
        "args": [
            f"--model-repository={repo}",
            f"--http-port={TRITON_HTTP}",
            f"--grpc-port={TRITON_GRPC}",
            f"--metrics-port={TRITON_METRICS}",
            "--strict-readiness=true",
            "--exit-on-error=true",
        ],
        "ports": [
            {"name": "http", "containerPort": TRITON_HTTP},
            {"name": "grpc", "containerPort": TRITON_GRPC},
            {"name": "metrics", "containerPort": TRITON_METRICS},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "startupProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 60,
        },
        "resources": _resources(serving, gpus),
        "volumeMounts": mounts,
        "securityContext": _restricted_security(),
    }
    env = _container_env(container["resources"], gpus)
    if env:
        container["env"] = env
    pod_spec: Obj = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"fsGroup": 1000},
        # Triton never calls the Kubernetes API; the exported model.py it runs gets no token.
        "automountServiceAccountToken": False,
    }
    if _pull_secrets(images.pull_secrets):
        pod_spec["imagePullSecrets"] = _pull_secrets(images.pull_secrets)
    if serving.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(serving["nodeSelector"])
    tolerations = _tolerations(serving, gpus)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    annotations = {
        n.ANNOTATION_ARTIFACT: model_repository,
        n.ANNOTATION_CANDIDATE: candidate,
        n.LABEL_REVISION: revision,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": n.labels(task_name, n.STAGE_SERVING, revision, candidate),
            "annotations": annotations,
            "ownerReferences": [owner_reference(task)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            # Surge first: the old revision keeps serving until the new pods are ready.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {n.ANNOTATION_ARTIFACT: model_repository},
                },
                "spec": pod_spec,
            },
        },
    }


def triton_service(task: Mapping[str, Any]) -> Obj:
    task_name, ns = _meta(task)
    name = n.serving_name(task_name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": n.labels(task_name, n.STAGE_SERVING),
            "ownerReferences": [owner_reference(task)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {n.LABEL_TASK: task_name, n.LABEL_STAGE: n.STAGE_SERVING},
            "ports": [
                {"name": "http", "port": TRITON_HTTP, "targetPort": "http"},
                {"name": "grpc", "port": TRITON_GRPC, "targetPort": "grpc"},
                {"name": "metrics", "port": TRITON_METRICS, "targetPort": "metrics"},
            ],
        },
    }


def service_endpoint(task: Mapping[str, Any]) -> str:
    task_name, ns = _meta(task)
    return f"http://{n.serving_name(task_name)}.{ns}.svc:{TRITON_HTTP}"
