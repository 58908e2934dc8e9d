"""Child objects of an AgentTask: names, ownership, scheduling and the trainer command line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_plan import make_task

from slm_contract import CallRecord, ContractError, TrainerResult
from slm_operator import builders as b
from slm_operator import conditions as c
from slm_operator import naming as n
from slm_operator.observe import (
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    failed_creates,
    job_view,
    replica_failure,
    serving_waiting,
)
from slm_operator.plan import Observed, plan


def test_child_names_are_deterministic_valid_and_bounded() -> None:
    long_task = "t" * 50
    name = n.finetune_job_name(long_task, "c" * 20, "abcdef0123")
    assert len(name) <= 63 and name == n.finetune_job_name(long_task, "c" * 20, "abcdef0123")
    assert name != n.finetune_job_name(long_task, "c" * 19 + "d", "abcdef0123")
    assert n.child_name("a", "b") == "a-b"


def test_revision_ignores_serving_and_key_order() -> None:
    spec = make_task()["spec"]
    same = dict(reversed(list(spec.items())))
    assert n.revision_of(spec) == n.revision_of(same)
    scaled = {**spec, "serving": {"minReplicas": 3, "maxReplicas": 9}}
    assert n.revision_of(scaled) == n.revision_of(spec)
    retrained = {**spec, "candidates": [{"name": "small", "model": "other"}]}
    assert n.revision_of(retrained) != n.revision_of(spec)
    assert n.revision_of(spec, retrain_epoch=1) != n.revision_of(spec)


def test_jobs_are_owned_labelled_and_restricted() -> None:
    task = make_task()
    job = b.finetune_job(task, "rev1", task["spec"]["candidates"][0])
    ref = job["metadata"]["ownerReferences"][0]
    assert ref["controller"] is True and ref["uid"] == "uid-1" and ref["kind"] == "AgentTask"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[n.LABEL_COMPONENT] == "trainer" and labels[n.LABEL_REVISION] == "rev1"
    pod = job["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert ctr["securityContext"]["runAsNonRoot"] is True
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert ctr["terminationMessagePath"] == "/dev/termination-log"
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 3600


def test_selector_threshold_follows_the_tasks_target_precision() -> None:
    """The finetune Job calibrates a selector to spec.evaluation.targetPrecision (0.97 when
    absent), so lowering it lets the SLM answer more calls."""
    task = make_task()

    def flag(job: dict) -> list[str]:
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        return [a for a in args if a.startswith("--target-precision=")]

    cand = task["spec"]["candidates"][0]
    assert flag(b.finetune_job(task, "r", cand)) == ["--target-precision=0.97"]
    task["spec"]["evaluation"]["targetPrecision"] = 0.9
    assert flag(b.finetune_job(task, "r", cand)) == ["--target-precision=0.9"]


def test_cross_fitted_calibration_is_passed_only_when_asked_for() -> None:
    task = make_task()
    cand = task["spec"]["candidates"][0]

    def folds(job: dict) -> list[str]:
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        return [a for a in args if a.startswith("--calibration-folds")]

    assert folds(b.finetune_job(task, "r", cand)) == []
    task["spec"]["evaluation"]["calibrationFolds"] = 4
    assert folds(b.finetune_job(task, "r", cand)) == ["--calibration-folds=4"]


def test_a_time_limit_stored_past_what_a_job_can_hold_is_held_to_the_crds_maximum() -> None:
    """A task stored before the CRD had a maximum may ask for 9999999999 s. Kubernetes' Job
    controller overflows on it and fails the Job at once, which read as a raised limit: the
    Job was deleted and created again in a loop that never ended."""
    task = make_task()
    task["spec"]["training"]["activeDeadlineSeconds"] = 9_999_999_999
    cand = task["spec"]["candidates"][0]
    for job in (b.data_prep_job(task, "r"), b.finetune_job(task, "r", cand)):
        assert job["spec"]["activeDeadlineSeconds"] == 31_536_000


def test_finetune_pods_get_the_time_to_save_their_checkpoint_on_sigterm() -> None:
    """A full fine-tune writes its weights and two AdamW moments on SIGTERM (4.3 GB for a
    360M model), which the default 30 s grace period cut short with SIGKILL on a slow
    volume. Data prep and export save nothing and keep the default (field left out)."""
    task = make_task()
    cand = task["spec"]["candidates"][0]

    def grace(job: dict) -> Any:
        return job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")

    expected = {"full": 300, "lora": 120, "qlora": 120}
    for method, seconds in expected.items():
        assert grace(b.finetune_job(task, "r", {**cand, "method": method})) == seconds
    assert grace(b.finetune_job(task, "r", {k: v for k, v in cand.items() if k != "method"})) == 120
    assert grace(b.data_prep_job(task, "r")) is None
    artifact = "pvc://slm-work/weather/r/candidates/small"
    assert grace(b.export_job(task, "r", cand, artifact, 0.5)) is None


def _trainer_pods(task: dict, account: str = "") -> list[dict]:
    cand = task["spec"]["candidates"][0]
    jobs = [
        b.data_prep_job(task, "r", account),
        b.finetune_job(task, "r", cand, account),
        b.export_job(task, "r", cand, "pvc://slm-work/weather/r/candidates/small", 0.5, account),
    ]
    return [j["spec"]["template"]["spec"] for j in jobs]


def test_trainer_pods_run_as_the_trainer_service_account() -> None:
    """The trainer patches its own pod's progress annotation: it needs its pod's name and
    namespace (downward API) and a ServiceAccount allowed to patch pods."""
    for pod in _trainer_pods(make_task(), "slm-trainer"):
        assert pod["serviceAccountName"] == "slm-trainer"
        env = {e["name"]: e.get("valueFrom") for e in pod["containers"][0]["env"]}
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # The task's own account wins; with neither, the namespace's default account is used.
    own = make_task(training={"gpus": 1, "serviceAccountName": "s3-reader"})
    assert {p["serviceAccountName"] for p in _trainer_pods(own, "slm-trainer")} == {"s3-reader"}
    assert all("serviceAccountName" not in p for p in _trainer_pods(make_task()))


def test_trainer_and_triton_pods_list_the_configured_pull_secrets() -> None:
    """Private-registry trainer and Triton images: the operator lists the chart's pull
    secrets on every pod it creates (a pod that lists none gets only its ServiceAccount's)."""
    task = make_task()
    cand = task["spec"]["candidates"][0]
    secrets = b.Images(pull_secrets=("registry", "mirror", "registry"))
    want = [{"name": "registry"}, {"name": "mirror"}]
    pods = [
        b.data_prep_job(task, "r", "slm-trainer", secrets),
        b.finetune_job(task, "r", cand, "slm-trainer", secrets),
        b.export_job(task, "r", cand, "pvc://slm-work/weather/r/c", 0.5, "slm-trainer", secrets),
        b.triton_deployment(task, "r", "pvc://slm-work/weather/r/m", "small", 1, secrets),
    ]
    for obj in pods:
        assert obj["spec"]["template"]["spec"]["imagePullSecrets"] == want, obj["kind"]
    # None configured: no field, so the ServiceAccount's pull secrets apply.
    assert all("imagePullSecrets" not in p for p in _trainer_pods(task, "slm-trainer"))
    dep = b.triton_deployment(task, "r", "pvc://slm-work/weather/r/m", "small", 1)
    assert "imagePullSecrets" not in dep["spec"]["template"]["spec"]


def _images_of(objs: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for obj in objs:
        if obj["kind"] in ("Job", "Deployment"):
            for ctr in obj["spec"]["template"]["spec"]["containers"]:
                out.setdefault(obj["kind"], set()).add(ctr["image"])
    return out


def test_tasks_without_an_image_run_the_operators_images_and_train_the_same_revision() -> None:
    """A cluster that mirrors images into its own registry sets the trainer and Triton images
    once, on the operator: every task without its own runs them, and changing them names
    the same Jobs (no retraining); a task's own image still wins."""
    from test_plan import NOW, deployment, jobs_through

    task = make_task()
    rev = n.revision_of(task["spec"])
    mirror = b.Images(trainer="reg.local/slm/trainer:7", triton="reg.local/slm/triton:7")
    fresh = plan(Observed(task, {}, None, NOW, images=mirror)).apply
    assert _images_of(fresh) == {"Job": {"reg.local/slm/trainer:7"}}
    assert [o["metadata"]["name"] for o in fresh] == [
        o["metadata"]["name"] for o in plan(Observed(task, {}, None, NOW)).apply
    ]
    served = plan(Observed(task, jobs_through(task, "export"), deployment(rev), NOW, images=mirror))
    assert _images_of(served.apply)["Deployment"] == {"reg.local/slm/triton:7"}
    # The built-in defaults, without a setting...
    default = plan(Observed(task, jobs_through(task, "export"), deployment(rev), NOW)).apply
    assert _images_of(default)["Deployment"] == {b.DEFAULT_TRITON_IMAGE}
    # ...and the task's own images, whatever the operator's.
    own = make_task(
        training={"gpus": 1, "image": "team/trainer:1"}, serving={"image": "team/triton:1"}
    )
    rev_own = n.revision_of(own["spec"])
    mine = plan(Observed(own, jobs_through(own, "export"), deployment(rev_own), NOW, images=mirror))
    assert _images_of(mine.apply)["Deployment"] == {"team/triton:1"}
    assert _images_of(plan(Observed(own, {}, None, NOW, images=mirror)).apply) == {
        "Job": {"team/trainer:1"}
    }


def test_plan_passes_the_pull_secrets_to_every_pod_it_builds() -> None:
    from test_plan import NOW, jobs_through

    task = make_task()
    reg = b.Images(pull_secrets=("reg",))
    obs = Observed(task, jobs_through(task, "export"), None, NOW, images=reg)
    built = plan(obs).apply
    assert {o["kind"] for o in built} >= {"Deployment"}
    for obj in built:
        if obj["kind"] in ("Job", "Deployment"):
            pod = obj["spec"]["template"]["spec"]
            assert pod["imagePullSecrets"] == [{"name": "reg"}], obj["metadata"]["name"]
    fresh = plan(Observed(task, {}, None, NOW, images=reg)).apply
    assert [o["spec"]["template"]["spec"]["imagePullSecrets"] for o in fresh] == [[{"name": "reg"}]]


def test_operator_reads_pull_secrets_and_reserved_accounts_from_its_environment() -> None:
    """The chart sets these from imagePullSecrets and the operator's and gateway's
    ServiceAccounts (a fresh interpreter: main reads its environment once, on import)."""
    env = {
        **os.environ,
        "SLM_FLEET_IMAGE_PULL_SECRETS": "registry, mirror,,registry",
        "SLM_FLEET_RESERVED_SERVICE_ACCOUNTS": "slm-operator,slm-gateway",
        "SLM_FLEET_TRAINER_IMAGE": "reg.local/trainer:7",
        "SLM_FLEET_TRITON_IMAGE": "",  # the chart always sets it; empty is the default
    }
    code = (
        "from slm_operator import main; "
        "print(list(main.IMAGES.pull_secrets), sorted(main.RESERVED_SERVICE_ACCOUNTS)); "
        "print(main.IMAGES.trainer, main.IMAGES.triton)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [
        "['registry', 'mirror'] ['slm-gateway', 'slm-operator']",
        f"reg.local/trainer:7 {b.DEFAULT_TRITON_IMAGE}",
    ]


def test_operator_help_lists_every_setting_it_reads_and_the_chart_sets() -> None:
    """``slm-fleet-operator --help`` answered "pass --namespace NS" and exit 2, and no page
    listed the environment variables the operator is configured by."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from slm_operator.main import cli; cli()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: slm-fleet-operator")
    listed = set(re.findall(r"SLM_FLEET_[A-Z_]+", proc.stdout))
    source = "".join(p.read_text() for p in (repo / "operator" / "slm_operator").glob("*.py"))
    read = set(re.findall(r'"(SLM_FLEET_[A-Z_]+)"', source))
    chart = repo / "charts" / "slm-fleet-operator" / "templates" / "operator-deployment.yaml"
    set_by_chart = set(re.findall(r"name: (SLM_FLEET_[A-Z_]+)", chart.read_text()))
    assert read and set_by_chart
    assert read <= listed, read - listed
    assert set_by_chart <= read, set_by_chart - read


def test_the_operator_refuses_a_setting_it_cannot_read_and_says_which() -> None:
    """SLM_FLEET_RESYNC_SECONDS=abc crashed the import with a bare ValueError (and --help
    with it); a port out of range, an address with a port in it and a URL that cannot be
    parsed were accepted until the startup handler failed on them."""
    code = "import sys; from slm_operator.main import cli; cli()"
    env = {
        **os.environ,
        "SLM_FLEET_RESYNC_SECONDS": "abc",
        "SLM_FLEET_METRICS_PORT": "99999",
        "SLM_FLEET_TRITON_IMAGE": "reg.local/triton 24.09",
        "SLM_FLEET_METRICS_ADDR": "0.0.0.0:8081",
        "SLM_FLEET_PROMETHEUS_URL": "http://user:s3cret@[prometheus:9090",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, "--namespace", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "SLM_FLEET_RESYNC_SECONDS must be a number of seconds" in proc.stderr
    assert "got 'abc'" in proc.stderr
    assert "SLM_FLEET_METRICS_PORT must be a whole number from 0 to 65535" in proc.stderr
    assert "SLM_FLEET_TRITON_IMAGE must be an image reference without spaces" in proc.stderr
    # These two were a traceback in kopf's startup handler, retried every minute, and
    # /healthz never served: the liveness probe restarted the pod over and over.
    assert "SLM_FLEET_METRICS_ADDR must be an IP address" in proc.stderr
    assert "SLM_FLEET_PROMETHEUS_URL must be an http:// or https:// URL" in proc.stderr
    assert "s3cret" not in proc.stderr
    helped = subprocess.run(
        [sys.executable, "-c", code, "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and helped.stdout.startswith("usage:")


def test_user_scheduling_constraints_are_kept() -> None:
    task = make_task(
        training={
            "gpus": 2,
            "nodeSelector": {"pool": "a100"},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
            "resources": {"requests": {"memory": "32Gi"}},
        }
    )
    pod = b.finetune_job(task, "r", task["spec"]["candidates"][0])["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert {"key": "spot", "operator": "Exists"} in pod["tolerations"]
    res = pod["containers"][0]["resources"]
    assert res == {"requests": {"memory": "32Gi"}, "limits": {"nvidia.com/gpu": "2"}}


def test_cpu_only_training_requests_no_gpu_and_no_toleration() -> None:
    task = make_task(training={"gpus": 0})
    pod = b.finetune_job(task, "r", task["spec"]["candidates"][0])["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(pod)


def _template(job: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["containers"][0].get("env", [])}


def test_trainer_jobs_pinned_to_gpu_nodes_all_tolerate_the_gpu_taint() -> None:
    """training.nodeSelector goes to the three trainer Jobs, the GPU toleration only went to
    the fine-tune pods: a selector naming GPU nodes left data-prep (the first step) Pending on
    tainted nodes until its deadline, six hours by default."""
    gpu_tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    pinned = make_task(training={"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "H100"}})
    cand = pinned["spec"]["candidates"][0]
    jobs = [
        b.data_prep_job(pinned, "r"),
        b.finetune_job(pinned, "r", cand),
        b.export_job(pinned, "r", cand, "pvc://slm-work/weather/r/candidates/small", 0.5),
    ]
    for job in jobs:
        assert gpu_tol in _template(job)["tolerations"], job["metadata"]["name"]
    # Unpinned, the CPU-only pods need not go to GPU nodes, and are not invited there.
    free = make_task(training={"gpus": 1})
    assert "tolerations" not in _template(b.data_prep_job(free, "r"))
    cpu = make_task(training={"gpus": 0, "nodeSelector": {"pool": "cpu"}})
    assert "tolerations" not in _template(b.data_prep_job(cpu, "r"))


def test_pods_without_a_gpu_see_none_and_size_threads_to_their_cpu() -> None:
    """CUDA images set NVIDIA_VISIBLE_DEVICES=all: on a node whose default runtime is
    NVIDIA's, a pod that asked for no GPU saw them all, and a CPU Triton or trainer loaded its
    model onto a GPU given to another pod. Trainer pods also ran one thread per node core."""
    task = make_task(training={"gpus": 1, "resources": {"limits": {"cpu": "4"}}})
    cand = task["spec"]["candidates"][0]
    data = _env(_template(b.data_prep_job(task, "r")))
    assert data["NVIDIA_VISIBLE_DEVICES"] == "void" and data["OMP_NUM_THREADS"] == "4"
    tuned = _env(_template(b.finetune_job(task, "r", cand)))
    assert "NVIDIA_VISIBLE_DEVICES" not in tuned and tuned["MKL_NUM_THREADS"] == "4"
    task["spec"]["serving"] = {**task["spec"].get("serving", {}), "gpus": 0}
    dep = b.triton_deployment(task, "r1", "s3://bucket/repo", "small", 1)
    assert _env(dep["spec"]["template"]["spec"])["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_a_call_log_on_the_workspace_claim_is_read_through_the_workspace_mount() -> None:
    """dataset.uri on storage.claimName put the same claim into the data-prep pod twice, read
    write and read-only: some kubelets hang such a pod in ContainerCreating, others make the
    shared mount read-only, and curate could not write its split."""
    task = make_task()
    task["spec"]["dataset"]["uri"] = "pvc://slm-work/calls/weather/"
    pod = _template(b.data_prep_job(task, "r"))
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["slm-work"]
    assert "--input=/workspace/calls/weather/" in pod["containers"][0]["args"]


def test_dataset_on_pvc_is_mounted_read_only() -> None:
    job = b.data_prep_job(make_task(), "r")
    pod = job["spec"]["template"]["spec"]
    assert {
        "name": "dataset",
        "persistentVolumeClaim": {"claimName": "calls", "readOnly": True},
    } in pod["volumes"]
    args = pod["containers"][0]["args"]
    assert "--input=/mnt/dataset/agent/weather.jsonl" in args
    assert "--scrub-pii" in args and "--stratify-by=tool" in args


def test_a_file_uri_is_read_at_its_decoded_path() -> None:
    """discover writes file:// URIs with Path.as_uri(), which percent-encodes the path."""
    task = make_task()
    task["spec"]["dataset"]["uri"] = "file:///data/call%20logs%20%C3%A9/weather.jsonl"
    args = b.data_prep_job(task, "r")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--input=/data/call logs é/weather.jsonl" in args


def test_pii_scrubbing_can_be_turned_off() -> None:
    task = make_task()
    task["spec"]["dataset"]["piiScrubbing"] = False
    args = b.data_prep_job(task, "r")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-scrub-pii" in args


def test_the_data_prep_job_bounds_what_curate_holds_and_the_trainer_parses_it() -> None:
    """A task's log only grows; curate is always bounded (the task's bound, or 100,000 when
    unset, which adds nothing to the stored spec and so to the revision hash). Unset, the
    flag is left out and curate's own default applies: a task that pins a trainer image
    older than the flag had every data-prep Job refused (exit 2) after an operator upgrade."""
    from slm_trainer import cli

    task = make_task()
    revision = n.revision_of(task["spec"])
    for bound, expected in ((None, 100_000), (5000, 5000)):
        if bound is not None:
            task["spec"]["dataset"]["maxExamples"] = bound
        job = b.data_prep_job(task, "r")
        ctr = job["spec"]["template"]["spec"]["containers"][0]
        flags = [a for a in ctr["args"] if a.startswith("--max-examples")]
        assert flags == ([] if bound is None else [f"--max-examples={bound}"])
        assert ctr["command"] == ["slm-trainer", "curate"]
        parsed = cli.build_parser().parse_args(ctr["command"][1:] + ctr["args"])
        assert parsed.max_examples == expected
    assert n.revision_of(task["spec"]) != revision  # a bound set by the user trains again


def test_triton_deployment_serves_the_revision_repository() -> None:
    task = make_task()
    dep = b.triton_deployment(task, "r1", "pvc://slm-work/weather/r1/model_repository", "small", 2)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--model-repository=/workspace/weather/r1/model_repository" in ctr["args"]
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert dep["spec"]["selector"]["matchLabels"] == b.triton_service(task)["spec"]["selector"]
    s3 = b.triton_deployment(task, "r1", "s3://bucket/repo", "small", 1)
    s3ctr = s3["spec"]["template"]["spec"]["containers"][0]
    assert "--model-repository=s3://bucket/repo" in s3ctr["args"]
    assert all(v["name"] != "workspace" for v in s3["spec"]["template"]["spec"]["volumes"])
    # A model exported before the task moved to another claim is read from where it is.
    moved = b.triton_deployment(task, "r1", "pvc://old-claim/weather/r1/model_repository", "s", 1)
    pod = moved["spec"]["template"]["spec"]
    assert (
        "--model-repository=/workspace/weather/r1/model_repository" in pod["containers"][0]["args"]
    )
    workspace = next(v for v in pod["volumes"] if v["name"] == "workspace")
    assert workspace["persistentVolumeClaim"] == {"claimName": "old-claim", "readOnly": True}


def test_triton_gets_a_memory_backed_dev_shm_for_its_python_backend() -> None:
    """The Python backend's shared-memory pools live in /dev/shm; the runtime's 64 MiB
    default is too small for a few model instances ("Failed to increase the shared memory
    pool size"), so the pod mounts a memory-backed emptyDir there, as the trainer's do."""
    pod = b.triton_deployment(make_task(), "r1", "s3://bucket/repo", "small", 1)["spec"][
        "template"
    ]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize(
    ("resources", "threads"),
    [
        ({"limits": {"cpu": "2"}, "requests": {"cpu": "1"}}, 2),
        ({"requests": {"cpu": "1500m"}}, 2),
        ({"limits": {"cpu": "500m"}}, 1),
        ({"limits": {"cpu": 4}}, 4),
        ({"limits": {"memory": "4Gi"}}, 0),
        ({}, 0),
        ({"limits": {"cpu": "1e400"}}, 0),  # matches the quantity pattern; raised before
    ],
)
def test_triton_threads_follow_the_pods_cpu_not_the_nodes(
    resources: dict[str, Any], threads: int
) -> None:
    """torch sizes its thread pool by the node's cores: a 2-CPU server on a 64-core node
    would run 64 threads and be throttled. OMP_NUM_THREADS follows the pod's CPU instead."""
    task = make_task()
    task["spec"]["serving"] = {**task["spec"].get("serving", {}), "resources": resources}
    dep = b.triton_deployment(task, "r1", "s3://bucket/repo", "small", 1)
    env = {
        e["name"]: e["value"]
        for e in dep["spec"]["template"]["spec"]["containers"][0].get("env", [])
    }
    if threads:
        assert env == {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    else:
        assert "OMP_NUM_THREADS" not in env


def test_triton_pods_get_no_api_token() -> None:
    # Triton runs user-exported Python (model.py) and never calls the Kubernetes API: a mounted
    # token of the namespace's default ServiceAccount would only be something to steal.
    task = make_task()
    dep = b.triton_deployment(task, "r1", "pvc://slm-work/weather/r1/model_repository", "small", 1)
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    # Trainer pods keep theirs: they patch their own pod's progress annotation.
    job = b.finetune_job(task, "r1", task["spec"]["candidates"][0], service_account="trainer")
    assert "automountServiceAccountToken" not in job["spec"]["template"]["spec"]


def test_trainer_cli_accepts_every_command_line_the_operator_builds() -> None:
    """The Job's command and args must parse with the real trainer CLI, stage by stage."""
    from slm_trainer.cli import build_parser

    task = make_task()
    cand = task["spec"]["candidates"][0]
    jobs = [
        b.data_prep_job(task, "r"),
        b.finetune_job(task, "r", cand),
        b.export_job(task, "r", cand, "pvc://slm-work/weather/r/candidates/small", 0.7),
    ]
    parser = build_parser()
    for job in jobs:
        ctr = job["spec"]["template"]["spec"]["containers"][0]
        assert ctr["command"][0] == "slm-trainer"
        ns = parser.parse_args([*ctr["command"][1:], *ctr["args"]])
        assert ns.result_path == "/dev/termination-log"


def _job(name: str, conds: list[dict[str, str]] | None = None, **status: object) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {n.LABEL_STAGE: "finetune", n.LABEL_REVISION: "r", n.LABEL_CANDIDATE: "a"},
        },
        "status": {"conditions": conds or [], **status},
    }


def _pod(
    job: str,
    phase: str,
    message: str | None = None,
    exit_code: int = 0,
    progress: str | None = None,
) -> dict:
    cs: dict = {"name": "trainer", "state": {"running": {}}}
    if message is not None:
        cs["state"] = {"terminated": {"exitCode": exit_code, "message": message}}
    ann = {n.ANNOTATION_PROGRESS: progress} if progress is not None else {}
    return {
        "metadata": {
            "name": f"{job}-x",
            "labels": {"job-name": job},
            "annotations": ann,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": phase, "containerStatuses": [cs]},
    }


def test_job_view_reads_state_result_and_progress() -> None:
    assert job_view(_job("j"), []).state == PENDING
    running = job_view(_job("j"), [_pod("j", "Running", progress="37")])
    assert running.state == RUNNING and running.progress == 37
    done = job_view(
        _job("j", [{"type": "Complete", "status": "True"}]),
        [_pod("j", "Succeeded", TrainerResult(stage="finetune", ok=True, score=0.9).to_json())],
    )
    assert done.state == SUCCEEDED and done.result is not None and done.result.score == 0.9
    garbage = job_view(
        _job("j", [{"type": "Complete", "status": "True"}]),
        [_pod("j", "Succeeded", "Traceback (most recent call last): ...")],
    )
    assert garbage.result is None and "not JSON" in (garbage.result_error or "")
    failed = job_view(
        _job("j", [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
        [_pod("j", "Failed", "killed: OOM", exit_code=137)],
    )
    assert failed.state == FAILED
    assert failed.message == "BackoffLimitExceeded: last pod terminated (exit 137): killed: OOM"
    assert failed.failure_reason == "BackoffLimitExceeded"
    counted = job_view(
        _job(
            "j", [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], failed=3
        ),
        [],
    )
    assert counted.failed_pods == 3  # what plan.limit_raised compares with backoffLimit
    # FailureTarget alone: its pods may still be ending, so it is not yet a reason to rerun.
    ending = job_view(
        _job("j", [{"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}]),
        [],
    )
    assert ending.state == FAILED and ending.failure_reason == ""
    no_msg = job_view(
        _job(
            "j",
            [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "too slow",
                }
            ],
        ),
        [],
    )
    assert no_msg.message == "DeadlineExceeded: too slow"
    other = job_view(_job("j"), [_pod("other", "Running", progress="99")])
    assert other.progress is None


def _owned(pod: dict, uid: str, how: str = "ref") -> dict:
    if how == "ref":
        pod["metadata"]["ownerReferences"] = [
            {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": uid, "controller": True}
        ]
    else:
        pod["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] = uid
    return pod


@pytest.mark.parametrize("how", ["ref", "label"])
def test_a_job_run_again_under_its_name_ignores_the_old_runs_pods(how: str) -> None:
    """A Job run again (a raised limit) is deleted in the background and created under the
    same name; until the garbage collector removes the old run's pods they carry the same
    job-name label. The new Job must read as waiting for its pod, not as running with the
    old run's progress or result, and a pod of its own must still count."""
    new = _job("j")
    new["metadata"]["uid"] = "uid-new"
    old_pod = _owned(_pod("j", "Failed", "killed", exit_code=137, progress="40"), "uid-old", how)
    view = job_view(new, [old_pod])
    assert view.state == PENDING and view.progress is None and view.result is None
    mine = _owned(_pod("j", "Running", progress="5"), "uid-new", how)
    view = job_view(new, [old_pod, mine])
    assert view.state == RUNNING and view.progress == 5


def _failed_pod(job: str, exit_code: int, reason: str, message: str = "", at: int = 0) -> dict:
    pod = _pod(job, "Failed", message, exit_code=exit_code)
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = reason
    pod["metadata"]["creationTimestamp"] = f"2026-01-01T00:0{at}:00Z"
    return pod


def test_a_failed_job_names_the_job_reason_and_how_its_last_pod_ended() -> None:
    """An OOM-killed trainer writes no result; with FallbackToLogsOnError its termination
    message is its log tail. The message must still say OOMKilled and why the Job gave up."""
    logs = "step 120/400 loss=0.84\nstep 130/400 loss=0.82\n"
    job = _job(
        "j",
        [
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ],
    )
    pods = [_failed_pod("j", 137, "OOMKilled", logs, at=i) for i in range(3)]
    v = job_view(job, pods)
    assert v.state == FAILED
    assert v.message == (
        "BackoffLimitExceeded: last pod OOMKilled (exit 137): "
        "step 120/400 loss=0.84 step 130/400 loss=0.82"
    )
    # A long log tail keeps its end (where the error is) and the message stays bounded.
    long = "x" * 5000 + " CUDA error: out of memory"
    v = job_view(job, [_failed_pod("j", 1, "Error", long)])
    assert len(v.message) <= 512 and v.message.endswith("CUDA error: out of memory")
    assert v.message.startswith("BackoffLimitExceeded: last pod Error (exit 1): ...")
    # No message at all (terminationMessagePolicy File, killed before writing one).
    v = job_view(job, [_failed_pod("j", 137, "OOMKilled")])
    assert v.message == "BackoffLimitExceeded: last pod OOMKilled (exit 137)"


def test_a_job_past_its_deadline_says_so_and_not_to_rerun() -> None:
    """activeDeadlineSeconds kills the trainer with SIGTERM; its result says it was preempted
    and to rerun to resume, which the operator does not do for a failed Job."""
    said = TrainerResult(
        stage="finetune",
        ok=False,
        message="preempted by SIGTERM (120 of 400 steps); checkpoint saved in /workspace/x; "
        "rerun to resume",
    ).to_json()
    job = _job(
        "j",
        [
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
            }
        ],
    )
    v = job_view(job, [_failed_pod("j", 143, "Error", said)])
    assert v.message == (
        "DeadlineExceeded: last pod Error (exit 143): preempted by SIGTERM (120 of 400 "
        "steps); checkpoint saved in /workspace/x"
    )
    # The trainer's own failure report (exit 3) keeps its words after the Job's reason.
    failed = TrainerResult(stage="finetune", ok=False, message="CUDA out of memory").to_json()
    job = _job("j", [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    v = job_view(job, [_failed_pod("j", 3, "Error", failed)])
    assert v.message == "PodFailurePolicy: last pod Error (exit 3): CUDA out of memory"


def test_conditions_keep_transition_time_until_status_flips() -> None:
    first = c.merge_conditions([], [c.condition(c.READY, c.FALSE, "A", "m", 1, "t1")])
    same = c.merge_conditions(first, [c.condition(c.READY, c.FALSE, "B", "m2", 2, "t2")])
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "B"
    flipped = c.merge_conditions(same, [c.condition(c.READY, c.TRUE, "C", "m3", 2, "t3")])
    assert flipped[0]["lastTransitionTime"] == "t3"
    assert c.transitions(same, flipped) == [("Normal", "C", "Ready=True: m3")]
    assert c.transitions(flipped, flipped) == []
    foreign = {
        "type": "Custom",
        "status": "True",
        "reason": "X",
        "message": "",
        "lastTransitionTime": "t0",
    }
    assert foreign in c.merge_conditions([foreign], [])


def test_trainer_result_fits_the_termination_message_and_rejects_nonsense() -> None:
    big = TrainerResult(stage="export", ok=False, message="x" * 10_000)
    text = big.to_json()
    assert len(text.encode()) <= 4096 and text.endswith('[truncated]"}') is False
    assert TrainerResult.from_json(text).message.endswith("[truncated]")
    with pytest.raises(ContractError, match="score must be within"):
        TrainerResult(stage="finetune", ok=True, score=1.5)
    with pytest.raises(ContractError, match="unknown result fields"):
        TrainerResult.from_json('{"stage": "finetune", "ok": true, "acc": 1}')
    with pytest.raises(ContractError, match="stage must be one of"):
        TrainerResult.from_json('{"stage": "train", "ok": true}')


def test_trainer_jobs_fail_at_once_on_a_reported_failure_and_retry_only_crashes() -> None:
    """A stage that reported a failure (exit 3) or got bad arguments (2) would say the same
    again: the Job fails without spending backoffLimit; a crash (1) and a disruption do not
    fail it at once."""
    from slm_trainer import cli

    task = make_task()
    for job in (
        b.data_prep_job(task, "rev1"),
        b.finetune_job(task, "rev1", task["spec"]["candidates"][0]),
    ):
        rules = job["spec"]["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert fail == [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3]},
            }
        ]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["name"] == "trainer"
        assert cli.EXIT_REPORTED in fail[0]["onExitCodes"]["values"]
        assert cli.EXIT_CRASHED not in fail[0]["onExitCodes"]["values"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def _pending_pod(job: str, **status: object) -> dict:
    pod = _pod(job, "Pending")
    pod["status"] = {"phase": "Pending", **status}
    return pod


def test_a_replacement_pod_that_cannot_start_is_pending_with_its_reason() -> None:
    """A spot reclaim evicts the trainer's pod (a disruption the Job's podFailurePolicy
    ignores) and no node has a free GPU for its replacement: the Job read "running" because
    its first pod had run, and the task said nothing of the wait for hours."""
    evicted = _pod("j", "Failed", message="", exit_code=143)
    replacement = _pending_pod(
        "j",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    replacement["metadata"].update(name="j-y", creationTimestamp="2026-01-01T01:00:00Z")
    for pods in ([evicted, replacement], [replacement, evicted]):
        v = job_view(_job("j", active=1, failed=1), pods)
        assert v.state == PENDING
        assert v.waiting.startswith("pod j-y cannot be scheduled: 0/4 nodes are available")
    # Once it runs, the Job is running again; a newest pod that ended before the Job
    # controller concludes still counts as running.
    replacement["status"] = {"phase": "Running"}
    assert job_view(_job("j", active=1, failed=1), [evicted, replacement]).state == RUNNING
    assert job_view(_job("j", failed=1), [evicted]).state == RUNNING


def test_a_pending_jobs_view_says_why_its_pod_does_not_run() -> None:
    """The scheduler's and the kubelet's reasons reach the task's conditions: a trainer that
    waits for a GPU node or an image it cannot pull must not look like one about to start."""
    unschedulable = _pending_pod(
        "j",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    v = job_view(_job("j"), [unschedulable])
    assert v.state == PENDING
    assert v.waiting == (
        "pod j-x cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )

    # The kubelet alternates ErrImagePull and ImagePullBackOff; since Kubernetes 1.32 the
    # back-off's message ends with the failed pull's, so both say the same cause in the same
    # words, or the task's status would be rewritten every back-off.
    def pulling(reason: str, message: str) -> str:
        pod = _pending_pod(
            "j",
            containerStatuses=[
                {
                    "name": "trainer",
                    "image": "ghcr.io/x/trainer:nope",
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
            ],
        )
        return job_view(_job("j"), [pod]).waiting

    # containerd's steps before the cause name the image again: left out.
    cause = 'failed to pull and unpack image "ghcr.io/x/trainer:nope": 401 Unauthorized'
    back_off = 'Back-off pulling image "ghcr.io/x/trainer:nope"'
    pulls = [
        pulling("ErrImagePull", cause),
        pulling("ImagePullBackOff", f"{back_off}: ErrImagePull: {cause}"),
    ]
    assert pulls == ["pod j-x cannot pull image ghcr.io/x/trainer:nope: 401 Unauthorized"] * 2
    # The runtime's other pull failures, named in the back-off the same way.
    unavailable = "image pull failed for ghcr.io/x/trainer:nope because the registry is unavailable"
    assert pulling("RegistryUnavailable", unavailable) == pulling(
        "ImagePullBackOff", f"{back_off}: RegistryUnavailable: {unavailable}"
    )
    # A kubelet older than 1.32 says no cause in the back-off: the image alone, so there the
    # text alternates between the two forms, once per pull attempt (minutes apart at most).
    assert (
        pulling("ImagePullBackOff", back_off) == "pod j-x cannot pull image ghcr.io/x/trainer:nope"
    )
    assert len(pulling("ErrImagePull", "x" * 1000)) == 300
    starting = _pending_pod(
        "j",
        containerStatuses=[
            {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}
        ],
    )
    assert job_view(_job("j"), [starting]).waiting == ""  # on its way: nothing to report
    assert job_view(_job("j"), []).waiting == ""
    # A pod of another Job says nothing about this one.
    assert job_view(_job("j"), [_pending_pod("other", **unschedulable["status"])]).waiting == ""


def test_a_stuck_triton_pod_is_named_with_its_reason() -> None:
    """Serving reports why a Triton replica is not ready: a crash loop (a model repository
    tritonserver cannot load) with how the container last ended; trainer pods are not its
    business."""
    crashing = _pending_pod(
        "d",
        containerStatuses=[
            {
                "name": "triton",
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
            }
        ],
    )
    crashing["metadata"]["labels"] = {n.LABEL_COMPONENT: "triton"}
    trainer = _pending_pod(
        "j",
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
    )
    trainer["metadata"]["labels"][n.LABEL_COMPONENT] = "trainer"
    assert serving_waiting([trainer]) == ""
    assert serving_waiting([trainer, crashing]) == (
        "pod d-x: CrashLoopBackOff (last exit code 1, Error)"
    )
    # Between two back-offs the kubelet starts the container again: running, not ready. The
    # reason must not leave Serving then (and come back at the next back-off), which would
    # rewrite the task's status at every restart.
    restarted = copy.deepcopy(crashing)
    restarted["status"]["containerStatuses"][0].update(
        state={"running": {"startedAt": "2026-12-02T02:00:00Z"}}, ready=False, restartCount=4
    )
    assert serving_waiting([restarted]) == serving_waiting([crashing])
    # Ready again, or restarted after a clean exit (exit code 0): no crash loop to report.
    healed = copy.deepcopy(restarted)
    healed["status"]["containerStatuses"][0]["ready"] = True
    assert serving_waiting([healed]) == ""
    clean = copy.deepcopy(restarted)
    clean["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] = 0
    assert serving_waiting([clean]) == ""


def test_a_deployments_replica_failure_says_why_its_pods_are_not_created() -> None:
    """Admission refusing every Triton pod (a LimitRange's maximum, a quota) leaves no pod to
    read a reason from; the Deployment's ReplicaFailure condition has it. Only while True,
    and without the refused pod's generated name, which changes on every retry."""

    def dep(status: str, pod: str) -> dict[str, Any]:
        message = f'pods "{pod}" is forbidden: exceeded quota: gpus, requested: pods=1'
        cond = {"type": "ReplicaFailure", "status": status, "reason": "FailedCreate"}
        return {
            "status": {
                "conditions": [
                    {"type": "Available", "status": "False"},
                    cond | {"message": message},
                ]
            }
        }

    said = replica_failure(dep("True", "weather-slm-6f859965cb-zgtrn"))
    assert (
        said == "cannot create its pods: pods is forbidden: exceeded quota: gpus, requested: pods=1"
    )
    assert replica_failure(dep("True", "weather-slm-6f859965cb-4jr4v")) == said
    assert replica_failure(dep("False", "weather-slm-6f859965cb-zgtrn")) == ""
    assert replica_failure({"status": {}}) == replica_failure(None) == ""


def test_failed_creates_keeps_the_newest_reason_per_job() -> None:
    """A Job whose pod admission refuses (quota, Pod Security) has only Events to say so."""

    def ev(job: str, when: str, msg: str, reason: str = "FailedCreate", kind: str = "Job") -> dict:
        return {
            "involvedObject": {"kind": kind, "name": job},
            "reason": reason,
            "lastTimestamp": when,
            "message": msg,
        }

    events = [
        ev("j", "2026-01-01T00:00:01Z", "old"),
        ev(
            "j",
            "2026-01-01T00:00:09Z",
            'Error creating: pods "j-x" is forbidden: exceeded quota: q',
        ),
        ev("j", "2026-01-01T00:00:05Z", "older"),
        ev("k", "2026-01-01T00:00:02Z", "created pod", reason="SuccessfulCreate"),
        ev("p", "2026-01-01T00:00:02Z", "not a Job", kind="Pod"),
    ]
    assert failed_creates(events) == {
        "j": "cannot create its pod: pods is forbidden: exceeded quota: q"
    }


def _failed_create(job: str, uid: str, when: str, pod: str, **extra: object) -> dict:
    """A FailedCreate Event as the Job controller posts it: the refused pod's generated name
    is in the message, and each retry is a new Event."""
    return {
        "involvedObject": {"kind": "Job", "name": job, "uid": uid},
        "reason": "FailedCreate",
        "lastTimestamp": when,
        "message": f'Error creating: pods "{pod}" is forbidden: exceeded quota: q, '
        "requested: pods=1, used: pods=0, limited: pods=0",
        **extra,
    }


def test_a_refused_pods_generated_name_does_not_change_the_reason_every_retry() -> None:
    """The Job controller retries about every minute, each time with a new generated pod name
    in its message (seen on a real kube-apiserver). The reason must read the same each time,
    or the task's status is rewritten on every retry for as long as the quota refuses."""
    first = failed_creates([_failed_create("j", "u1", "2026-01-01T00:00:01Z", "j-6rzwv")])
    again = failed_creates(
        [
            _failed_create("j", "u1", "2026-01-01T00:00:01Z", "j-6rzwv"),
            _failed_create("j", "u1", "2026-01-01T00:01:01Z", "j-4jr4v"),
        ]
    )
    combined = _failed_create("j", "u1", "2026-01-01T00:11:01Z", "j-w4z4l")
    combined["message"] = f"(combined from similar events): {combined['message']}"
    assert first == again == failed_creates([combined])
    assert first["j"].startswith("cannot create its pod: pods is forbidden: exceeded quota: q")


def test_failed_creates_of_an_earlier_job_of_the_same_name_are_not_this_ones() -> None:
    """Job names are the revision's, so a Job deleted and created again (a data recheck, a
    task re-applied) has the name of one whose Events (kept an hour) say its pod was refused.
    Only the Events of this Job (its uid) count; events.k8s.io-style ones (no lastTimestamp,
    a series) are ordered by their last occurrence."""
    old = _failed_create("j", "old-uid", "2026-01-01T00:00:09Z", "j-aaaaa")
    assert failed_creates([old], {"j": "new-uid"}) == {}
    assert failed_creates([old], {"j": "old-uid"}) != {}
    series = _failed_create("j", "u", "", "j-bbbbb", eventTime="2026-01-01T00:00:01.000000Z")
    series["series"] = {"count": 3, "lastObservedTime": "2026-01-01T00:00:30.000000Z"}
    series["message"] = series["message"].replace("quota: q", "quota: newest")
    older = _failed_create("j", "u", "2026-01-01T00:00:20Z", "j-ccccc")
    assert "quota: newest" in failed_creates([series, older])["j"]
    assert "quota: newest" in failed_creates([older, series])["j"]


def test_a_crash_loops_last_exit_does_not_hide_another_waiting_reason() -> None:
    """lastState is kept after any restart; only a crash loop is explained by it. A container
    that crashed once and now cannot start (a deleted Secret) must show the kubelet's words."""
    pod = _pending_pod(
        "d",
        containerStatuses=[
            {
                "name": "triton",
                "state": {
                    "waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": 'secret "hf-token" not found',
                    }
                },
                "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            }
        ],
    )
    pod["metadata"]["labels"] = {n.LABEL_COMPONENT: "triton"}
    assert (
        serving_waiting([pod]) == 'pod d-x: CreateContainerConfigError: secret "hf-token" not found'
    )


def test_each_candidate_of_a_revision_has_its_own_export_job_and_repository() -> None:
    """The chosen candidate can change within a revision: each candidate's export is a Job
    (a valid, distinct name even for the longest task and candidate names) and a repository
    of its own, so neither clashes with nor writes over the other's."""
    task = make_task()
    task["metadata"]["name"] = "a" * n.MAX_TASK_NAME
    cands = [{"name": f"{'c' * 40}-{i}", "model": "m"} for i in (1, 2)]
    jobs = [b.export_job(task, "r1", cd, "pvc://slm-work/x", None) for cd in cands]
    names = [j["metadata"]["name"] for j in jobs]
    assert len(set(names)) == 2 and all(len(x) <= 63 for x in names)
    assert names == [n.export_job_name(task["metadata"]["name"], cd["name"], "r1") for cd in cands]
    outputs = [
        [a for a in j["spec"]["template"]["spec"]["containers"][0]["args"] if "--output" in a]
        for j in jobs
    ]
    assert outputs == [
        [f"--output=/workspace/{'a' * 50}/r1/model_repositories/{cd['name']}"] for cd in cands
    ]


def test_an_export_of_an_artifact_on_another_claim_is_refused() -> None:
    """The export pod mounts only the storage claim (plan() reports this in status first)."""
    problem = b.candidate_artifact_problem(make_task(), "pvc://other/x")
    assert problem is not None and "not on the storage claim slm-work" in problem
    assert b.candidate_artifact_problem(make_task(), "pvc://slm-work/x") is None
    assert b.candidate_artifact_problem(make_task(), "s3://bucket/x") is None
    with pytest.raises(ValueError, match="not on the storage claim"):
        b.export_job(make_task(), "r1", {"name": "s", "model": "m"}, "pvc://other/x", None)


def test_a_base_model_on_the_storage_claim_is_opened_where_the_claim_is_mounted() -> None:
    """``model: pvc://<storage claim>/<path>`` passed every check, but the trainer opens a
    folder or a hub id, not a URI: every candidate failed after data prep, on a GPU pod.
    Trainer and Triton pods mount the claim at /workspace, so the Jobs get that path."""
    task = make_task(candidates=[{"name": "small", "model": "pvc://slm-work/models/smollm2"}])
    cand = task["spec"]["candidates"][0]
    for job in (
        b.finetune_job(task, "r", cand),
        b.export_job(task, "r", cand, "pvc://slm-work/weather/r/candidates/small", 0.5),
    ):
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--model=/workspace/models/smollm2" in args
        mounts = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "workspace", "mountPath": "/workspace"} in mounts
    # A hub id or a folder inside the image is passed as it is.
    hub = make_task(candidates=[{"name": "small", "model": "HuggingFaceTB/SmolLM2-135M"}])
    args = b.finetune_job(hub, "r", hub["spec"]["candidates"][0])["spec"]["template"]["spec"]
    assert "--model=HuggingFaceTB/SmolLM2-135M" in args["containers"][0]["args"]


def _operator_cli(
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    kopf_runs: bool = False,
) -> list[str] | None:
    """The argv slm-fleet-operator hands to kopf for ``args``, or None when it (or, with
    ``kopf_runs``, kopf itself) refuses them (exit 2). Kopf's own parsing is real; only its
    run is replaced, unless ``kopf_runs``."""
    from kopf.cli import main as kopf_main

    from slm_operator.main import cli

    for name in ("KOPF_RUN_NAMESPACE", "KOPF_RUN_NAMESPACES", "KOPF_RUN_CLUSTERWIDE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    ran: list[list[str]] = []
    if not kopf_runs:
        monkeypatch.setattr(kopf_main, "main", lambda *a, **kw: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["slm-fleet-operator", *args])
    try:
        cli()
    except SystemExit as exc:
        assert exc.code == 2
        return None
    return ran[0]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["-nsupport-agent"], {}),
        (["-vnsupport-agent"], {}),
        (["--namespace=support-agent"], {}),
        (["-n", "support-agent"], {}),
        (["-A"], {}),
        (["--verbose"], {"KOPF_RUN_NAMESPACES": "support-agent"}),
        ([], {"KOPF_RUN_NAMESPACE": "support-agent"}),
    ],
)
def test_the_operator_takes_every_namespace_form_kopf_takes(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]
) -> None:
    """The operator's CLI (slm-fleet-operator, in slm_operator.main) refused
    ``-nsupport-agent``, which kopf run takes as --namespace support-agent, with "pass
    --namespace NS"."""
    kopf_argv = ["kopf", "run", "--standalone", "-m", "slm_operator.main", *args]
    assert _operator_cli(monkeypatch, args, env) == kopf_argv


@pytest.mark.parametrize("args", [[], ["--verbose"], ["--liveness", "-n"], ["--", "-nx"]])
def test_the_operator_without_a_namespace_says_to_pass_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """In ``--liveness -n`` the ``-n`` is the liveness endpoint: kopf would have watched every
    namespace it may see, as with no flag at all."""
    assert _operator_cli(monkeypatch, args) is None
    assert capsys.readouterr().err == (
        "slm-fleet-operator: pass --namespace NS (repeatable) or --all-namespaces\n"
    )


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--bogus", "-n", "support-agent"], "--bogus"), (["-z", "-nsupport-agent"], "-z")],
)
def test_an_unknown_flag_before_the_namespace_is_named_by_kopf(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], flag: str
) -> None:
    """A mistyped flag before ``-n NS`` was answered "pass --namespace NS", a namespace that
    was given, where kopf names the flag it does not know."""
    assert _operator_cli(monkeypatch, args, kopf_runs=True) is None
    err = capsys.readouterr().err
    assert "No such option" in err and flag in err
    assert "pass --namespace" not in err


def test_the_data_prep_job_passes_not_before_and_a_new_cutoff_trains_again() -> None:
    """spec.dataset.notBefore leaves out the calls captured before it (an older gateway's,
    whose LLM-only calls are unmarked). Unset, no flag: a trainer image older than it would
    refuse the command line. Set or moved, it is a dataset field like maxExamples, so the
    revision changes and the task is curated and trained again without those calls."""
    from slm_trainer import cli

    task = make_task()
    revision = n.revision_of(task["spec"])
    for cutoff in (None, "2026-03-01T00:00:00Z"):
        if cutoff is not None:
            task["spec"]["dataset"]["notBefore"] = cutoff
        ctr = b.data_prep_job(task, "r")["spec"]["template"]["spec"]["containers"][0]
        flags = [a for a in ctr["args"] if a.startswith("--not-before")]
        assert flags == ([] if cutoff is None else [f"--not-before={cutoff}"])
        parsed = cli.build_parser().parse_args(ctr["command"][1:] + ctr["args"])
        assert parsed.not_before == (cutoff or "")
    cut = n.revision_of(task["spec"])
    task["spec"]["dataset"]["notBefore"] = "2026-04-01T00:00:00Z"  # moved: the agent changed
    assert len({revision, cut, n.revision_of(task["spec"])}) == 3


def test_the_data_prep_job_curates_its_own_tasks_calls_and_says_whose_it_left_out(
    tmp_path: Path,
) -> None:
    """A dataset.uri may be a log holding several agents' calls (a shared file, an export).
    The data-prep Job passed no --task, so each task trained on every task's calls and
    curate_report.json said other_task: 0. It passes the AgentTask's name, as the gateway
    names the calls it captures; with too few calls of its own, WaitingForData says how many
    of other tasks were left out and under which names, for a log that names it otherwise."""
    from test_plan import NOW, view

    from slm_trainer import cli

    task = make_task()  # metadata.name: weather
    rev = n.revision_of(task["spec"])
    ctr = b.data_prep_job(task, rev)["spec"]["template"]["spec"]["containers"][0]
    assert "--task=weather" in ctr["args"]

    def record(name: str, i: int) -> str:
        return CallRecord(
            task=name,
            backend="llm",
            messages=[{"role": "user", "content": f"{name} question number {i} of {i * 7}"}],
            response={"role": "assistant", "content": f"answer {i}"},
            timestamp=1000.0 + i,
        ).to_json()

    log = tmp_path / "calls.jsonl"
    names = ["weather"] * 3 + ["support"] * 30 + ["billing"] * 10
    log.write_text("".join(record(name, i) + "\n" for i, name in enumerate(names)))
    out, said = tmp_path / "data", tmp_path / "result.json"
    moved = {"--input": f"--input={log}", "--output-dir": f"--output-dir={out}"}
    moved["--result-path"] = f"--result-path={said}"
    args = [moved.get(a.split("=", 1)[0], a) for a in ctr["args"]]
    assert cli.main([*ctr["command"][1:], *args]) == 3  # too few: a reported failure
    res = TrainerResult.from_json(said.read_text())
    report = json.loads((out / "curate_report.json").read_text())
    assert (report["examples"], report["other_task"]) == (3, 40)

    dn = n.data_job_name("weather", rev)
    jobs = {dn: view(dn, "prepare", rev, FAILED, res, finished=NOW)}
    status = plan(Observed(task, jobs, None, NOW)).status
    data = next(x for x in status["conditions"] if x["type"] == c.DATA_READY)
    assert data["reason"] == c.WAITING_FOR_DATA
    assert (
        "3 < min_examples 200; 40 calls of other tasks left out (--task weather; most common: "
        '"support" 30, "billing" 10)'
    ) in data["message"], data["message"]


def test_the_prune_job_runs_the_trainers_prune_stage_in_the_data_prep_pod() -> None:
    """The Job that removes a task's superseded revision folders from the storage claim: its
    command line parses with the real trainer CLI, it carries the served revision's label (it
    goes with that revision's Jobs), and its pod is the data-prep pod less the dataset."""
    from slm_trainer.cli import build_parser

    task = make_task(training={"gpus": 1, "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}})
    task["spec"]["training"]["nodeSelector"] = {"pool": "gpu"}
    prune = b.prune_job(task, "0123456789", ["0123456789", "abcdef0123"], "slm-trainer")
    data = b.data_prep_job(task, "0123456789", "slm-trainer")
    assert prune["metadata"]["name"] == n.prune_job_name("weather", "0123456789")
    assert prune["metadata"]["labels"][n.LABEL_REVISION] == "0123456789"
    assert prune["metadata"]["labels"][n.LABEL_STAGE] == n.STAGE_PRUNE
    ctr = prune["spec"]["template"]["spec"]["containers"][0]
    ns = build_parser().parse_args([*ctr["command"][1:], *ctr["args"]])
    assert (ns.stage, ns.task, ns.keep) == ("prune", "weather", "0123456789,abcdef0123")
    assert str(ns.root) == b.WORKSPACE and ns.result_path == "/dev/termination-log"

    pp, dp = prune["spec"]["template"]["spec"], data["spec"]["template"]["spec"]
    for key in ("securityContext", "serviceAccountName", "nodeSelector", "tolerations"):
        assert pp[key] == dp[key], key
    assert pp["volumes"] == [v for v in dp["volumes"] if v["name"] != "dataset"]
    dc = dp["containers"][0]
    for key in ("image", "resources", "securityContext", "env", "terminationMessagePath"):
        assert ctr[key] == dc[key], key
    assert ctr["volumeMounts"] == [m for m in dc["volumeMounts"] if m["name"] != "dataset"]
    assert "nvidia.com/gpu" not in ctr["resources"].get("limits", {})
    for key in ("backoffLimit", "podFailurePolicy"):
        assert prune["spec"][key] == data["spec"][key], key
    # Its own short limit: a prune pod that never starts holds a new revision's Jobs.
    assert prune["spec"]["activeDeadlineSeconds"] == b.PRUNE_DEADLINE_S


def test_the_prune_job_runs_the_operators_trainer_image_not_the_tasks_pin() -> None:
    """A task pinned to an older trainer image (spec.training.image), built before the
    prune stage: its prune Job failed ("invalid choice: 'prune'", exit 2) at every
    promotion, and deleting it to run it again, as Serving advised, could never help.
    Housekeeping needs nothing of the task's trainer: it runs the operator's own, pulled
    with the same secrets."""
    task = make_task(training={"image": "registry.local/slm-trainer:2026-10"})
    images = b.Images(trainer="reg.local/slm/trainer:8", pull_secrets=("reg",))
    prune = b.prune_job(task, "0123456789", ["0123456789"], "slm-trainer", images)
    data = b.data_prep_job(task, "0123456789", "slm-trainer", images)
    pp, dp = prune["spec"]["template"]["spec"], data["spec"]["template"]["spec"]
    assert dp["containers"][0]["image"] == "registry.local/slm-trainer:2026-10"
    assert pp["containers"][0]["image"] == "reg.local/slm/trainer:8"
    assert pp["imagePullSecrets"] == dp["imagePullSecrets"] == [{"name": "reg"}]
