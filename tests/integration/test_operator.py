"""The operator against the real control plane: from an AgentTask to a served SLM.

The operator runs as a real process (kopf, ``--standalone``, one namespace). kwok schedules
and runs the pods on fake GPU and CPU nodes; the tests play the kubelet for trainer pods by
writing the termination message the real trainer writes (:mod:`slm_e2e.kubelet`).
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_contract import TrainerResult
from slm_e2e.cluster import free_port
from slm_e2e.kubelet import complete_job, running_pod
from slm_e2e.testing import (
    LOOPBACK_HEX,
    ClusterHandle,
    OperatorProcess,
    listening_addresses,
    wait_for,
)
from slm_operator import naming as n

pytestmark = pytest.mark.integration

CLAIM = "slm-work"


@pytest.fixture
def storage(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> Iterator[str]:
    """A PVC bound to a hostPath PV, as the trainer and Triton pods mount one."""
    pv = f"pv-{namespace}"
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "manual",
                    "hostPath": {"path": str(tmp_path / "pv")},
                    "claimRef": {"namespace": namespace, "name": CLAIM},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": CLAIM, "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "manual",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            },
        ]
    )
    wait_for(
        lambda: cluster.get_json("pvc", CLAIM, "-n", namespace)["status"].get("phase") == "Bound",
        timeout=30,
        what="the PVC to bind",
    )
    yield CLAIM
    cluster.kubectl("delete", "pv", pv, "--wait=false", check=False)


@pytest.fixture
def operator(
    cluster: ClusterHandle, namespace: str, tmp_path: Path, agenttask_crd: Path
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(
        cluster.kubeconfig, namespace, tmp_path / "operator.log", metrics_port=free_port()
    ).start()
    yield op
    # Delete tasks while the operator still runs (kopf's advice), then stop it.
    cluster.kubectl("delete", "agenttasks", "--all", "-n", namespace, "--wait=false", check=False)
    op.stop()
    print(op.log()[-4000:])


def agenttask(
    name: str = "weather", candidates: list[dict[str, Any]] | None = None, **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "description": "Pick the weather tool and fill its arguments",
        "taskType": "tool-call",
        "dataset": {"uri": f"pvc://{CLAIM}/calls/weather.jsonl", "minExamples": 100},
        "candidates": candidates
        or [
            {"name": "small", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            {"name": "big", "model": "Qwen/Qwen2.5-0.5B-Instruct", "method": "qlora"},
        ],
        "training": {"gpus": 1, "backoffLimit": 0},
        "storage": {"claimName": CLAIM},
        "evaluation": {"metric": "tool-call-ast", "gate": {"minScore": 0.8, "maxDropVsLLM": 0.05}},
        "serving": {"minReplicas": 2, "maxReplicas": 4, "gpus": 1},
        "fallback": {
            "llm": {
                "baseURL": "http://127.0.0.1:9/v1",
                "model": "gpt-4o-mini",
                "apiKeySecretRef": {"name": "llm-key"},
            }
        },
    }
    body.update(spec)
    return {
        "apiVersion": "slmfleet.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": name},
        "spec": body,
    }


def get_task(cluster: ClusterHandle, ns: str, name: str = "weather") -> dict[str, Any]:
    task: dict[str, Any] = cluster.get_json("agenttask", name, "-n", ns)
    return task


def condition(task: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (task.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return {}


def condition_saying(
    cluster: ClusterHandle,
    ns: str,
    type_: str,
    fragment: str | tuple[str, ...],
    timeout: float,
    but_not: str | None = None,
) -> dict[str, Any]:
    """The task's ``type_`` condition, once its message contains ``fragment`` (every one of
    them, for a tuple) and, with ``but_not``, does not contain that."""
    wanted = (fragment,) if isinstance(fragment, str) else fragment

    def says() -> dict[str, Any] | None:
        found = condition(get_task(cluster, ns), type_)
        message = found.get("message", "")
        if any(f not in message for f in wanted) or (but_not is not None and but_not in message):
            return None
        return found

    what = f"{type_} to say {wanted!r}" + (f" but not {but_not!r}" if but_not else "")
    result: dict[str, Any] = wait_for(says, timeout=timeout, what=what)
    return result


def revision(cluster: ClusterHandle, ns: str, name: str = "weather") -> str:
    return str(
        wait_for(
            lambda: (
                (get_task(cluster, ns, name).get("status") or {})
                .get("revision", {})
                .get("training")
            ),
            timeout=30,
            what="a training revision in status",
        )
    )


def jobs(cluster: ClusterHandle, ns: str, name: str = "weather") -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        "jobs", "-n", ns, "-l", f"{n.LABEL_TASK}={name}"
    )["items"]
    return items


def zero_quota(cluster: ClusterHandle, ns: str, name: str, resource: str) -> None:
    """A ResourceQuota that allows none of ``resource`` in ``ns``."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": name},
        "spec": {"hard": {resource: "0"}},
    }
    cluster.apply(quota, ns)


def ok(stage: str, **kw: Any) -> str:
    return TrainerResult(stage=stage, ok=True, **kw).to_json()


def finetune_result(cand: str, score: float, params: int, rev: str) -> str:
    return ok(
        "finetune",
        candidate=cand,
        score=score,
        llm_score=0.95,
        parameters=params,
        artifact_uri=f"pvc://{CLAIM}/weather/{rev}/candidates/{cand}",
        threshold=0.72,
        train_seconds=321.5,
        eval_seconds=12.0,
    )


def prepared(cluster: ClusterHandle, ns: str, task: dict[str, Any]) -> str:
    """Apply ``task`` and play its data-prep pod to a 500-example dataset; its revision."""
    cluster.apply(task, ns)
    rev = revision(cluster, ns)
    complete_job(
        cluster,
        ns,
        n.data_job_name("weather", rev),
        ok("prepare", examples=500, train_examples=400, eval_examples=100),
    )
    return rev


def run_revision(
    cluster: ClusterHandle,
    ns: str,
    rev: str,
    small: float = 0.62,
    big: float = 0.93,
    name: str = "weather",
) -> None:
    """Play every trainer pod of one revision through to export."""
    complete_job(
        cluster,
        ns,
        n.data_job_name(name, rev),
        ok("prepare", examples=1200, train_examples=960, eval_examples=240),
    )
    for cand, score, params in (("small", small, 135_000_000), ("big", big, 494_000_000)):
        complete_job(
            cluster,
            ns,
            n.finetune_job_name(name, cand, rev),
            finetune_result(cand, score, params, rev),
        )
    complete_job(
        cluster,
        ns,
        n.export_job_name(name, "big", rev),
        ok("export", candidate="big", artifact_uri=f"pvc://{CLAIM}/{name}/{rev}/model_repository"),
    )


def test_agenttask_trains_selects_serves_updates_and_cleans_up(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    ns = namespace
    cluster.apply(agenttask(), ns)
    rev = revision(cluster, ns)

    # Data prep runs first, CPU only: no GPU request, so it lands on a CPU node.
    data_pod = running_pod(cluster, ns, n.data_job_name("weather", rev))
    assert data_pod["spec"]["nodeName"].startswith("kwok-cpu-")
    assert get_task(cluster, ns)["status"]["phase"] == "PreparingData"
    complete_job(
        cluster,
        ns,
        n.data_job_name("weather", rev),
        ok("prepare", examples=1200, train_examples=960, eval_examples=240),
    )

    # One fine-tune Job per candidate, on GPU nodes, with the GPU request.
    for cand in ("small", "big"):
        pod = running_pod(cluster, ns, n.finetune_job_name("weather", cand, rev))
        assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert pod["metadata"]["labels"][n.LABEL_CANDIDATE] == cand
    wait_for(
        lambda: get_task(cluster, ns)["status"]["phase"] == "Training",
        timeout=20,
        what="phase Training",
    )
    for cand, score, params in (("small", 0.62, 135_000_000), ("big", 0.93, 494_000_000)):
        complete_job(
            cluster,
            ns,
            n.finetune_job_name("weather", cand, rev),
            finetune_result(cand, score, params, rev),
        )

    # The gate: small (0.62 < 0.8) is reported, big passes and is exported.
    complete_job(
        cluster,
        ns,
        n.export_job_name("weather", "big", rev),
        ok("export", candidate="big", artifact_uri=f"pvc://{CLAIM}/weather/{rev}/model_repository"),
    )
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=60s", "agenttask/weather")

    task = get_task(cluster, ns)
    st = task["status"]
    assert st["phase"] == "Serving"
    assert st["selectedModel"]["candidate"] == "big"
    assert st["selectedModel"]["score"] == 0.93
    by_name = {c["name"]: c for c in st["candidates"]}
    assert by_name["small"]["passedGate"] is False and by_name["small"]["score"] == 0.62
    assert by_name["big"]["passedGate"] is True and by_name["big"]["parameters"] == 494_000_000
    assert by_name["big"]["progress"] == 100
    assert condition(task, "Evaluated")["reason"] == "GatePassed"
    assert "small score 0.620 < minScore 0.8" not in condition(task, "Evaluated")["message"]
    assert condition(task, "FallbackActive")["status"] == "False"
    # Ready needs one ready replica; kwok readies the second one moments later.
    wait_for(
        lambda: get_task(cluster, ns)["status"]["serving"].get("readyReplicas") == 2,
        timeout=30,
        what="both Triton replicas ready in status",
    )
    assert st["route"]["mode"] == "shadow"  # progressive rollout: the LLM still answers
    assert st["observedGeneration"] == task["metadata"]["generation"]

    dep = cluster.get_json("deployment", "weather-slm", "-n", ns)
    assert dep["metadata"]["ownerReferences"][0]["uid"] == task["metadata"]["uid"]
    tpl = dep["spec"]["template"]["spec"]
    assert (
        f"--model-repository=/workspace/weather/{rev}/model_repository"
        in tpl["containers"][0]["args"]
    )
    pods = cluster.get_json("pods", "-n", ns, "-l", "slmfleet.dev/stage=serving")["items"]
    assert len(pods) == 2 and all(p["spec"]["nodeName"].startswith("kwok-gpu-") for p in pods)
    svc = cluster.get_json("service", "weather-slm", "-n", ns)
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 8001, 8002}

    table = cluster.kubectl("get", "agenttasks", "-n", ns).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "MODEL", "REPLICAS", "FALLBACK", "MODE", "AGE"]
    row = table.splitlines()[1].split()
    assert row[:6] == ["weather", "Serving", "big", "2", "False", "shadow"]
    events = cluster.get_json(
        "events", "-n", ns, "--field-selector", "involvedObject.name=weather"
    )["items"]
    reasons = {e["reason"] for e in events}
    assert {"DataPrepared", "GatePassed", "DeploymentAvailable", "Ready"} <= reasons

    # Status is written only on change: a quiet period leaves resourceVersion alone.
    rv = get_task(cluster, ns)["metadata"]["resourceVersion"]
    import time

    time.sleep(5)  # > 2 resync periods of the operator under test
    assert get_task(cluster, ns)["metadata"]["resourceVersion"] == rv

    # Serving alone, the revision's prune Job removes earlier revisions' files (none here);
    # a new revision's Jobs would wait for it while it runs.
    prune = n.prune_job_name("weather", rev)
    pod = complete_job(cluster, ns, prune, ok("prune"))
    assert pod["spec"]["containers"][0]["command"] == ["slm-trainer", "prune"]
    assert f"--keep={rev}" in pod["spec"]["containers"][0]["args"]

    # A spec change trains a new revision while the old one keeps serving.
    changed = agenttask()
    changed["spec"]["candidates"][0]["epochs"] = 5
    cluster.apply(changed, ns)
    new_rev = wait_for(
        lambda: (
            (r := get_task(cluster, ns)["status"]["revision"].get("training")) and r != rev and r
        ),
        timeout=30,
        what="a new training revision",
    )
    running_pod(cluster, ns, n.data_job_name("weather", new_rev))
    task = get_task(cluster, ns)
    assert condition(task, "Ready")["status"] == "True"
    assert task["status"]["revision"]["active"] == rev
    dep = cluster.get_json("deployment", "weather-slm", "-n", ns)
    assert dep["metadata"]["annotations"][n.LABEL_REVISION] == rev

    run_revision(cluster, ns, new_rev)
    wait_for(
        lambda: get_task(cluster, ns)["status"]["revision"] == {"active": new_rev, "training": ""},
        timeout=30,
        what="the new revision to be active",
    )
    dep = cluster.get_json("deployment", "weather-slm", "-n", ns)
    assert dep["metadata"]["annotations"][n.LABEL_REVISION] == new_rev
    wait_for(
        lambda: {j["metadata"]["labels"][n.LABEL_REVISION] for j in jobs(cluster, ns)} == {new_rev},
        timeout=30,
        what="the old revision's Jobs to be removed",
    )
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=60s", "agenttask/weather")

    # Deleting the task removes every child through ownerReferences.
    cluster.kubectl("delete", "agenttask", "weather", "-n", ns, "--timeout=60s")
    wait_for(
        lambda: (
            not jobs(cluster, ns)
            and not cluster.get_json(
                "deployments,services", "-n", ns, "-l", f"{n.LABEL_TASK}=weather"
            )["items"]
        ),
        timeout=60,
        what="garbage collection of every child",
    )


def test_gate_not_met_is_reported_and_nothing_is_served(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    ns = namespace
    rev = prepared(cluster, ns, agenttask())
    for cand, score in (("small", 0.41), ("big", 0.7)):
        complete_job(
            cluster,
            ns,
            n.finetune_job_name("weather", cand, rev),
            finetune_result(cand, score, 1000, rev),
        )
    cluster.kubectl(
        "wait", "-n", ns, "--for=condition=Evaluated=False", "--timeout=60s", "agenttask/weather"
    )
    task = get_task(cluster, ns)
    ev = condition(task, "Evaluated")
    assert ev["reason"] == "GateNotMet"
    assert "big score 0.700 < minScore 0.8" in ev["message"]
    assert task["status"]["phase"] == "Failed"
    assert condition(task, "FallbackActive")["status"] == "True"
    assert not cluster.get_json("deployments", "-n", ns)["items"]
    assert not [j for j in jobs(cluster, ns) if j["metadata"]["labels"][n.LABEL_STAGE] == "export"]

    # The engineer lowers the gate: the trained candidates are judged again (big passes) and
    # exported, in the same revision; nothing is trained again.
    before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs(cluster, ns)}
    cluster.apply(agenttask(evaluation={"metric": "tool-call-ast", "gate": {"minScore": 0.65}}), ns)
    export = n.export_job_name("weather", "big", rev)
    wait_for(
        lambda: export in {j["metadata"]["name"] for j in jobs(cluster, ns)},
        timeout=60,
        what="the export of the candidate that passes the lowered gate",
    )
    after = {j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs(cluster, ns)}
    assert {k: v for k, v in after.items() if k != export} == before  # same Jobs, same uids
    assert revision(cluster, ns) == rev


def test_failed_job_shows_its_termination_message(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    ns = namespace
    rev = prepared(cluster, ns, agenttask(candidates=[{"name": "small", "model": "org/tiny"}]))
    failure = TrainerResult(
        stage="finetune",
        ok=False,
        candidate="small",
        message="CUDA out of memory: tried to allocate 2.00 GiB",
    ).to_json()
    complete_job(cluster, ns, n.finetune_job_name("weather", "small", rev), failure, exit_code=1)
    cluster.kubectl(
        "wait", "-n", ns, "--for=condition=Trained=False", "--timeout=60s", "agenttask/weather"
    )
    task = get_task(cluster, ns)
    trained = condition(task, "Trained")
    assert trained["reason"] == "JobFailed"
    assert "CUDA out of memory: tried to allocate 2.00 GiB" in trained["message"]
    assert task["status"]["candidates"][0]["state"] == "Failed"
    warnings = cluster.get_json("events", "-n", ns, "--field-selector", "type=Warning")["items"]
    assert any(e["reason"] == "JobFailed" for e in warnings)


def test_a_trainer_that_no_node_can_take_says_why_in_trained(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    """The real scheduler cannot place a trainer asking for more GPUs than any node has: the
    task's Trained condition carries the scheduler's reason instead of a bare "pending"."""
    ns = namespace
    prepared(
        cluster,
        ns,
        agenttask(
            candidates=[{"name": "small", "model": "org/tiny"}],
            training={"gpus": 12, "backoffLimit": 0},  # kwok GPU nodes have 8 each
        ),
    )

    trained = condition_saying(cluster, ns, "Trained", "Insufficient nvidia.com/gpu", 60)
    assert (trained["status"], trained["reason"]) == ("Unknown", "JobPending")
    assert "small: pod weather-ft-small-" in trained["message"]
    assert "cannot be scheduled" in trained["message"]
    entry = get_task(cluster, ns)["status"]["candidates"][0]
    assert "Insufficient nvidia.com/gpu" in entry["message"]


@pytest.fixture
def operator_without_resync(
    cluster: ClusterHandle, namespace: str, tmp_path: Path, agenttask_crd: Path
) -> Iterator[OperatorProcess]:
    """An operator whose periodic resync is 10 minutes away: what it does within a test, it
    does because a watch event woke it."""
    op = OperatorProcess(
        cluster.kubeconfig,
        namespace,
        tmp_path / "operator.log",
        resync_seconds=600,
        metrics_port=free_port(),
    ).start()
    yield op
    cluster.kubectl("delete", "agenttasks", "--all", "-n", namespace, "--wait=false", check=False)
    op.stop()
    print(op.log()[-4000:])


def reconciles(op: OperatorProcess) -> float:
    """slm_operator_reconcile_total{result="ok"} of ``op`` (which serves one namespace)."""
    with urllib.request.urlopen(op.metrics_url, timeout=5) as r:
        text = r.read().decode()
    found = re.search(r'slm_operator_reconcile_total\{result="ok"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_triton_replica_that_no_node_can_take_is_named_in_serving(
    cluster: ClusterHandle, namespace: str, storage: str, operator_without_resync: OperatorProcess
) -> None:
    """Three replicas of 8 GPUs on two 8-GPU nodes: two serve, and Serving names the third
    with the real scheduler's reason, so a stuck scale-up is visible on the task.

    The scheduler's verdict changes that pod only, not its Deployment, and may land after
    the Deployment's last change: the operator hears of it because it watches Triton pods.
    Here its resync is 10 minutes away and it has no Prometheus (so no live-control window
    wakes it either): nothing else would."""
    ns, op = namespace, operator_without_resync
    cluster.apply(agenttask(serving={"minReplicas": 3, "maxReplicas": 4, "gpus": 8}), ns)
    run_revision(cluster, ns, revision(cluster, ns))

    serving = condition_saying(
        cluster, ns, "Serving", ("2/3 Triton replicas ready", "Insufficient nvidia.com/gpu"), 90
    )
    assert (serving["status"], serving["reason"]) == ("True", "DeploymentAvailable")
    stuck = re.search(r"pod (weather-slm-\S+) cannot be scheduled", serving["message"])
    assert stuck, serving["message"]

    # A change to that pod alone (nothing else moves now) wakes the operator.
    def quiet() -> tuple[float] | None:
        before = reconciles(op)
        time.sleep(2)
        after = reconciles(op)
        return (after,) if after == before else None

    (settled,) = wait_for(quiet, timeout=30, what="no reconcile for 2 s")
    cluster.kubectl("annotate", "pod", stuck.group(1), "-n", ns, "example.com/poke=1")
    wait_for(
        lambda: reconciles(op) > settled,
        timeout=30,
        what="a reconcile after a change to a Triton pod",
    )

    # Its replacement is as stuck, and Serving names the pod that exists, not the deleted one.
    cluster.kubectl("delete", "pod", stuck.group(1), "-n", ns, "--wait=false")
    replacement = condition_saying(
        cluster, ns, "Serving", ("cannot be scheduled",), 60, but_not=stuck.group(1)
    )
    assert "Insufficient nvidia.com/gpu" in replacement["message"]


def test_triton_pods_a_limit_range_refuses_say_why_in_serving(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    """A LimitRange whose maximum is below serving.resources.limits: admission refuses every
    Triton pod, so no pod says why, and Serving said "waiting for Triton replicas ... (0/2)"
    for good. The ReplicaSet controller's reason (the Deployment's ReplicaFailure) is named,
    without the refused pod's generated name."""
    ns = namespace
    limits = {"type": "Container", "max": {"cpu": "2", "memory": "4Gi"}}
    limit_range = {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": {"name": "small"},
        "spec": {"limits": [limits]},
    }
    cluster.apply(limit_range, ns)
    small = {"limits": {"cpu": "1", "memory": "1Gi"}}
    big = {"limits": {"cpu": "4", "memory": "8Gi"}}
    task = agenttask(
        training={"gpus": 1, "backoffLimit": 0, "resources": small},
        serving={"minReplicas": 2, "maxReplicas": 4, "gpus": 1, "resources": big},
    )
    cluster.apply(task, ns)
    run_revision(cluster, ns, revision(cluster, ns))

    serving = condition_saying(cluster, ns, "Serving", "cannot create its pods: pods ", 90)
    assert (serving["status"], serving["reason"]) == ("False", "DeploymentProgressing")
    assert "maximum cpu usage per Container is 2, but limit is 4" in serving["message"]
    assert "weather-slm-" not in serving["message"]
    assert "maximum cpu usage" in condition(get_task(cluster, ns), "Ready")["message"]


def test_a_trainer_pod_that_admission_refuses_says_why_in_data_ready(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    """A namespace quota of zero pods: the Job controller cannot create the data-prep pod and
    says so only in an Event; DataReady carries its words."""
    ns = namespace
    zero_quota(cluster, ns, "no-pods", "pods")
    cluster.apply(agenttask(), ns)

    data = condition_saying(cluster, ns, "DataReady", "quota", 90)
    assert (data["status"], data["reason"]) == ("Unknown", "JobPending")
    assert "cannot create its pod: pods " in data["message"]
    assert "is forbidden" in data["message"]


def test_the_operators_metrics_listen_on_loopback_only(operator: OperatorProcess) -> None:
    """The test stack's operator served /metrics on every interface, the one port of the local
    stack reachable from the network."""

    def serving() -> bool:
        try:
            with urllib.request.urlopen(operator.metrics_url, timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for(serving, timeout=60, what="the operator's /metrics")
    assert operator.proc is not None
    addresses = listening_addresses(operator.proc.pid)
    assert addresses and all(a.split(":")[0] in LOOPBACK_HEX for a in addresses), addresses


def test_the_operator_exports_each_tasks_phase_and_conditions(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    """slm_operator_task_phase and _condition follow the task (what the chart's alerts read),
    reconciles are counted, and a deleted task's series go away with it."""
    ns = namespace

    def scrape() -> str:
        try:
            with urllib.request.urlopen(operator.metrics_url, timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    prepared(cluster, ns, agenttask(candidates=[{"name": "small", "model": "org/tiny"}]))
    training = f'slm_operator_task_phase{{namespace="{ns}",phase="Training",task="weather"}} 1.0'

    def training_shown() -> str | None:
        text = scrape()
        return text if training in text else None

    text = wait_for(training_shown, timeout=60, what="the Training phase in /metrics")
    assert (
        f'slm_operator_task_phase{{namespace="{ns}",phase="PreparingData",task="weather"}} 0.0'
        in text
    )
    assert (
        f'slm_operator_task_condition{{namespace="{ns}",status="True",task="weather",'
        'type="DataReady"} 1.0'
    ) in text
    assert reconciles(operator) >= 2
    cluster.kubectl("delete", "agenttask", "weather", "-n", ns)
    wait_for(lambda: 'task="weather"' not in scrape(), timeout=60, what="the deleted task's series")


def test_a_task_applied_before_its_calls_waits_for_data_then_trains(
    cluster: ClusterHandle, namespace: str, storage: str, tmp_path: Path, agenttask_crd: Path
) -> None:
    """The quickstart's order: the AgentTask exists before any agent called it, so its first
    data-prep finds no call log. The task waits (not Failed), and after the operator's recheck
    interval the same Job runs again; with enough calls captured by then, training starts.
    The trainer exits 3 for a reported failure, and the real Job controller fails the Job on
    it at once (podFailurePolicy), although backoffLimit would allow two more pods."""
    ns = namespace
    op = OperatorProcess(
        cluster.kubeconfig,
        ns,
        tmp_path / "operator.log",
        # Long enough that the failed Job and its pod are still there to be read below (at 3 s
        # the recheck could delete it about 2 s after it failed, on a loaded machine first).
        extra_env={"SLM_FLEET_DATA_RECHECK_SECONDS": "10"},
    ).start()
    try:
        cluster.apply(agenttask(training={"gpus": 1, "backoffLimit": 2}), ns)
        rev = revision(cluster, ns)
        dn = n.data_job_name("weather", rev)
        nothing_yet = TrainerResult(
            stage="prepare", ok=False, examples=0, message="no call log yet (0 examples)"
        ).to_json()
        complete_job(cluster, ns, dn, nothing_yet, exit_code=3)
        first_uid = cluster.get_json("job", dn, "-n", ns)["metadata"]["uid"]

        def waiting() -> dict[str, Any] | None:
            task = get_task(cluster, ns)
            return task if condition(task, "DataReady").get("reason") == "WaitingForData" else None

        task = wait_for(waiting, timeout=30, what="DataReady=False WaitingForData")
        first = cluster.get_json("job", dn, "-n", ns)
        assert any(
            cond["type"] == "Failed" and cond["reason"] == "PodFailurePolicy"
            for cond in first["status"].get("conditions") or []
        ), first["status"]
        pods = cluster.get_json("pods", "-n", ns, "-l", f"job-name={dn}")["items"]
        assert len(pods) == 1  # no retry of a reported failure
        assert task["status"]["phase"] == "PreparingData"
        assert condition(task, "Ready")["reason"] == "WaitingForData"
        assert "0 of 100 curated examples" in condition(task, "DataReady")["message"]

        def recreated() -> bool:
            found = cluster.kubectl("get", "job", dn, "-n", ns, "-o", "json", check=False)
            if found.returncode != 0:
                return False
            return bool(json.loads(found.stdout)["metadata"]["uid"] != first_uid)

        wait_for(recreated, timeout=60, what="the data-prep Job to be created again")
        complete_job(
            cluster, ns, dn, ok("prepare", examples=1200, train_examples=960, eval_examples=240)
        )
        wait_for(
            lambda: get_task(cluster, ns)["status"].get("phase") == "Training",
            timeout=60,
            what="phase Training",
        )
        assert len([j for j in jobs(cluster, ns) if j["metadata"]["name"] == dn]) == 1
        warnings = cluster.get_json("events", "-n", ns, "--field-selector", "type=Warning")
        assert not [e for e in warnings["items"] if e["reason"] == "JobFailed"]
    finally:
        cluster.kubectl("delete", "agenttasks", "--all", "-n", ns, "--wait=false", check=False)
        op.stop()
        print(op.log()[-4000:])


def test_operator_killed_mid_flow_converges_without_duplicates(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    ns = namespace
    cluster.apply(agenttask(), ns)
    rev = revision(cluster, ns)
    complete_job(
        cluster,
        ns,
        n.data_job_name("weather", rev),
        ok("prepare", examples=1200, train_examples=960, eval_examples=240),
    )
    running_pod(cluster, ns, n.finetune_job_name("weather", "small", rev))
    assert operator.proc is not None
    operator.proc.send_signal(signal.SIGKILL)
    operator.proc.wait(timeout=10)

    # While the operator is down, training finishes.
    for cand, score, params in (("small", 0.62, 135_000_000), ("big", 0.93, 494_000_000)):
        complete_job(
            cluster,
            ns,
            n.finetune_job_name("weather", cand, rev),
            finetune_result(cand, score, params, rev),
        )
    operator.start()
    complete_job(
        cluster,
        ns,
        n.export_job_name("weather", "big", rev),
        ok("export", candidate="big", artifact_uri=f"pvc://{CLAIM}/weather/{rev}/model_repository"),
    )
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=60s", "agenttask/weather")
    # Served alone, the revision gets its one prune Job.
    complete_job(cluster, ns, n.prune_job_name("weather", rev), ok("prune"))
    wait_for(
        lambda: all(j["status"].get("succeeded") == 1 for j in jobs(cluster, ns)),
        timeout=30,
        what="every Job succeeded",
    )
    names = sorted(j["metadata"]["name"] for j in jobs(cluster, ns))
    assert names == sorted(
        [
            n.data_job_name("weather", rev),
            n.export_job_name("weather", "big", rev),
            n.finetune_job_name("weather", "small", rev),
            n.finetune_job_name("weather", "big", rev),
            n.prune_job_name("weather", rev),
        ]
    )
    assert all(j["status"].get("succeeded") == 1 for j in jobs(cluster, ns))
    assert len(cluster.get_json("deployments", "-n", ns)["items"]) == 1
    assert get_task(cluster, ns)["status"]["selectedModel"]["candidate"] == "big"


def test_fine_tune_results_read_once_outlive_their_pods(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    """The fine-tune pods are deleted (PodGC, a node scaled down, kubectl delete pod) after the
    operator read their results but before the export is done: the task still exports and
    serves the chosen candidate, instead of waiting for results that are gone (and failing
    the revision, ResultMissing, two minutes later)."""
    ns = namespace
    rev = prepared(cluster, ns, agenttask())
    for cand, score, params in (("small", 0.62, 135_000_000), ("big", 0.93, 494_000_000)):
        complete_job(
            cluster,
            ns,
            n.finetune_job_name("weather", cand, rev),
            finetune_result(cand, score, params, rev),
        )

    # Read: the status that says so records the results (in the same write).
    cluster.kubectl(
        "wait", "-n", ns, "--for=condition=Evaluated", "--timeout=60s", "agenttask/weather"
    )
    for cand in ("small", "big"):
        selector = f"job-name={n.finetune_job_name('weather', cand, rev)}"
        cluster.kubectl("delete", "pods", "-n", ns, "-l", selector, "--force", "--grace-period=0")
    wait_for(
        lambda: (
            not [
                p
                for p in cluster.get_json("pods", "-n", ns)["items"]
                if (p["metadata"].get("labels") or {}).get(n.LABEL_STAGE) == "finetune"
            ]
        ),
        timeout=30,
        what="the fine-tune pods to be gone",
    )
    complete_job(
        cluster,
        ns,
        n.export_job_name("weather", "big", rev),
        ok("export", candidate="big", artifact_uri=f"pvc://{CLAIM}/weather/{rev}/model_repository"),
    )
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=60s", "agenttask/weather")
    task = get_task(cluster, ns)
    assert condition(task, "Trained")["reason"] == "TrainingSucceeded"
    assert condition(task, "Evaluated")["reason"] == "GatePassed"
    assert task["status"]["selectedModel"]["candidate"] == "big"
    assert [x["state"] for x in task["status"]["candidates"]] == ["Succeeded", "Succeeded"]


def test_invalid_combination_sets_invalid_spec_without_crash_loop(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    ns = namespace
    # Schema-valid (the CRD's pattern takes any five cron fields), but February has no 31st:
    # retraining would never fire. The operator reports it instead of creating Jobs for a
    # task whose schedule it could never keep.
    bad = agenttask(name="misplaced", retraining={"schedule": "0 0 31 2 *"})
    cluster.apply(bad, ns)
    cluster.kubectl(
        "wait", "-n", ns, "--for=condition=Ready=False", "--timeout=60s", "agenttask/misplaced"
    )
    task = get_task(cluster, ns, "misplaced")
    ready = condition(task, "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert "so it never fires" in ready["message"]
    assert task["status"]["phase"] == "Failed"
    assert not jobs(cluster, ns, "misplaced")

    def invalid_events() -> list[dict[str, Any]]:
        items = cluster.get_json("events", "-n", ns, "--field-selector", "type=Warning")["items"]
        return [e for e in items if e["reason"] == "InvalidSpec"]

    # One Warning, which says what is wrong (not one "see Ready" per condition).
    wait_for(lambda: invalid_events(), timeout=30, what="the InvalidSpec Warning")
    (event,) = invalid_events()
    assert "so it never fires" in event["message"]
    # The operator stays up and keeps serving other tasks.
    cluster.apply(agenttask(), ns)
    revision(cluster, ns)
    assert operator.proc is not None and operator.proc.poll() is None
    # ...and fixing the spec clears the condition.
    bad["spec"]["retraining"]["schedule"] = "0 3 * * *"
    cluster.apply(bad, ns)
    wait_for(
        lambda: (
            condition(get_task(cluster, ns, "misplaced"), "Ready").get("reason") != "InvalidSpec"
        ),
        timeout=30,
        what="InvalidSpec to clear after the fix",
    )


def test_children_reach_the_task_through_the_label_selected_watches(
    cluster: ClusterHandle, namespace: str, storage: str, operator_without_resync: OperatorProcess
) -> None:
    """With the resync out of the way (10 min), only the watches on Jobs, pods and the
    Deployment (selected by the API server on the labels the operator sets) can carry the
    task from data prep to Ready: a selector that missed its children would stall it here."""
    ns = namespace
    cluster.apply(agenttask(), ns)
    run_revision(cluster, ns, revision(cluster, ns))
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=60s", "agenttask/weather")


def test_a_triton_service_deleted_by_hand_is_back_at_once_and_nothing_flaps(
    cluster: ClusterHandle, namespace: str, storage: str, operator_without_resync: OperatorProcess
) -> None:
    """Services were not watched: a deleted one came back only at the next resync (the
    gateway's SLM calls failing until then), and the pass that re-applied it reported an
    outage that never was (NoReadyReplicas, fallback on, route llm) that the next pass
    flipped back. With the resync 10 minutes away, only the Service watch brings it back."""
    ns = namespace
    cluster.apply(agenttask(), ns)
    run_revision(cluster, ns, revision(cluster, ns))
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=60s", "agenttask/weather")
    before = get_task(cluster, ns)
    uid = cluster.kubectl(
        "get", "service", "weather-slm", "-n", ns, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    cluster.kubectl("delete", "service", "weather-slm", "-n", ns)

    def recreated() -> str | None:
        got = cluster.kubectl(
            "get",
            "service",
            "weather-slm",
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
            check=False,
        ).stdout
        return got if got and got != uid else None

    wait_for(recreated, timeout=30, what="the Service applied again")
    time.sleep(2)  # the pass after it, if any, has run
    after = get_task(cluster, ns)
    for type_ in ("Ready", "Serving", "FallbackActive"):
        # (the message may count a second replica that became ready meanwhile)
        fields = ("status", "reason", "lastTransitionTime")
        got, had = condition(after, type_), condition(before, type_)
        assert [got.get(f) for f in fields] == [had.get(f) for f in fields], type_
    assert after["status"]["phase"] == before["status"]["phase"] == "Serving"


def test_a_service_of_the_tasks_serving_name_made_by_a_user_is_left_alone(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    """`kubectl create service clusterip weather-slm`, then the task: server-side apply with
    force took the user's Service over (selector replaced, Triton ports and this task's
    ownerReference added), and the garbage collector deleted it with the task. It is not
    applied now, Ready says why, no call is routed to it, and it outlives the task."""
    ns = namespace
    cluster.kubectl("create", "service", "clusterip", "weather-slm", "--tcp=80:80", "-n", ns)
    cluster.apply(agenttask(), ns)
    run_revision(cluster, ns, revision(cluster, ns))

    ready = condition_saying(cluster, ns, "Ready", "Service weather-slm was refused", 90)
    assert (ready["status"], ready["reason"]) == ("False", "ApplyFailed")
    assert "belongs to something else" in ready["message"]
    status = get_task(cluster, ns)["status"]
    assert status["route"]["mode"] == "llm" and "slmEndpoint" not in status["route"]
    assert condition({"status": status}, "Serving")["reason"] == "ServiceNameTaken"
    assert status["phase"] != "Serving"
    svc = cluster.get_json("service", "weather-slm", "-n", ns)
    assert svc["spec"]["selector"] == {"app": "weather-slm"}
    assert [p["port"] for p in svc["spec"]["ports"]] == [80]
    assert not svc["metadata"].get("ownerReferences")

    cluster.kubectl("delete", "agenttask", "weather", "-n", ns, "--timeout=60s")
    wait_for(
        lambda: not cluster.get_json("deployments", "-n", ns)["items"],
        timeout=60,
        what="garbage collection of the task's Deployment",
    )
    kept = cluster.get_json("service", "weather-slm", "-n", ns)
    assert kept["metadata"]["uid"] == svc["metadata"]["uid"]


def test_a_child_the_api_server_refuses_says_why_in_ready(
    cluster: ClusterHandle, namespace: str, storage: str, operator: OperatorProcess
) -> None:
    """A quota of zero Jobs: the API server refuses the data-prep Job for good. The task says
    so (Ready=False ApplyFailed, in the quota's words) rather than keeping a status that
    never changes while the operator retries in its log; without the quota it goes on."""
    ns = namespace
    zero_quota(cluster, ns, "no-jobs", "count/jobs.batch")
    cluster.apply(agenttask(), ns)

    ready = condition_saying(cluster, ns, "Ready", "exceeded quota", 60)
    assert (ready["status"], ready["reason"]) == ("False", "ApplyFailed")
    assert "Job weather-data-" in ready["message"] and "no-jobs" in ready["message"]
    data = condition(get_task(cluster, ns), "DataReady")  # not "Job created"
    assert "refused to create it" in data["message"] and "no-jobs" in data["message"]
    warnings = cluster.get_json("events", "-n", ns, "--field-selector", "type=Warning")["items"]
    assert any(e["reason"] == "ApplyFailed" for e in warnings)

    cluster.kubectl("delete", "resourcequota", "no-jobs", "-n", ns)
    rev = revision(cluster, ns)
    running_pod(cluster, ns, n.data_job_name("weather", rev), timeout=90)
    wait_for(
        lambda: condition(get_task(cluster, ns), "Ready").get("reason") != "ApplyFailed",
        timeout=60,
        what="ApplyFailed to clear once the quota is gone",
    )


def test_status_is_never_written_onto_a_task_created_again_under_the_same_name(
    cluster: ClusterHandle, namespace: str, agenttask_crd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconcile that read the task, then the task was deleted and created again under the
    same name before the reconcile wrote its status: the API server refuses the write (it
    names the resourceVersion it read) and the new task keeps its own, empty status."""
    import datetime as dt

    from kubernetes import config

    from slm_operator import reconcile as rc
    from slm_operator.kube import Kube, TaskChanged

    ns = namespace
    kube = Kube(config.new_client_from_config(config_file=cluster.kubeconfig))
    cluster.apply(agenttask(), ns)
    stale = rc.observe(kube, ns, "weather", dt.datetime.now(dt.UTC))
    assert stale is not None
    cluster.kubectl("delete", "agenttask", "weather", "-n", ns, "--timeout=60s")
    cluster.apply(agenttask(), ns)
    fresh = get_task(cluster, ns)
    assert fresh["metadata"]["uid"] != stale.task["metadata"]["uid"]

    monkeypatch.setattr(rc, "observe", lambda *a, **k: stale)
    with pytest.raises(TaskChanged):
        rc.reconcile(kube, ns, "weather")
    assert not get_task(cluster, ns).get("status")


def test_a_job_created_again_under_its_name_survives_a_deletion_decided_on_the_old_one(
    cluster: ClusterHandle, namespace: str, agenttask_crd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass decided to delete a Job (abandoned, or to run it again) from what it read; by the
    time it deletes, that Job is gone and a new one runs under the same, deterministic name
    (created by the next pass, or by a replica that led before this one). The new Job is new
    work: the stale deletion must leave it, and a deletion of what was read still works."""
    import dataclasses
    import datetime as dt

    from kubernetes import config

    from slm_operator import reconcile as rc
    from slm_operator.kube import Kube
    from slm_operator.observe import JobView
    from slm_operator.plan import Plan

    ns = namespace
    kube = Kube(config.new_client_from_config(config_file=cluster.kubeconfig))
    cluster.apply(agenttask(), ns)
    name = "weather-data-stale"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "suspend": True,  # nothing needs to run: only which object survives matters
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "example.invalid/job:1"}],
                }
            },
        },
    }
    cluster.apply(job, ns)
    old_uid = cluster.get_json("job", name, "-n", ns)["metadata"]["uid"]
    obs = rc.observe(kube, ns, "weather", dt.datetime.now(dt.UTC))
    assert obs is not None
    seen = JobView(name=name, stage="data", revision="old", candidate=None, state="Complete")
    stale = dataclasses.replace(obs, jobs={name: dataclasses.replace(seen, uid=old_uid)})
    status = dict(obs.task.get("status") or {})
    monkeypatch.setattr(rc, "observe", lambda *a, **k: stale)
    monkeypatch.setattr(rc, "plan", lambda o: Plan(delete_jobs=[name], status=status))

    cluster.kubectl("delete", "job", name, "-n", ns, "--timeout=60s")
    cluster.apply(job, ns)
    new_uid = cluster.get_json("job", name, "-n", ns)["metadata"]["uid"]
    assert new_uid != old_uid
    rc.reconcile(kube, ns, "weather")  # no error: the Job read is gone, nothing left to do
    after = cluster.get_json("job", name, "-n", ns)
    assert after["metadata"]["uid"] == new_uid and not after["metadata"].get("deletionTimestamp")

    # The Job that was read is deleted as before.
    fresh = dataclasses.replace(obs, jobs={name: dataclasses.replace(seen, uid=new_uid)})
    monkeypatch.setattr(rc, "observe", lambda *a, **k: fresh)
    rc.reconcile(kube, ns, "weather")
    wait_for(
        lambda: cluster.kubectl("get", "job", name, "-n", ns, check=False).returncode != 0,
        timeout=60,
        what="the Job that was read to be deleted",
    )


def test_an_operator_whose_metrics_port_was_taken_starts_again_on_another(
    cluster: ClusterHandle, namespace: str, tmp_path: Path, agenttask_crd: Path
) -> None:
    """The tests pick the operator's metrics port before it binds it; taken meanwhile (by
    another server on this shared machine), kopf's startup handler failed and retried a
    minute later, and the operator reconciled nothing until then: a flaky test."""
    import socket

    squat = socket.socket()
    squat.bind(("127.0.0.1", 0))
    squat.listen()
    taken = squat.getsockname()[1]
    log = tmp_path / "operator.log"
    try:
        op = OperatorProcess(cluster.kubeconfig, namespace, log, metrics_port=taken).start()
        try:
            assert f":{taken}/" not in op.metrics_url
            with urllib.request.urlopen(op.metrics_url, timeout=5) as r:
                assert b"slm_operator_" in r.read()
        finally:
            op.stop()
    finally:
        squat.close()
    assert "Address already in use" in log.read_text()  # the first start met the clash


@pytest.fixture
def outdated_crd(cluster: ClusterHandle, agenttask_crd: Path, tmp_path: Path) -> Iterator[None]:
    """The AgentTask CRD as an older release left it, which ``helm upgrade`` never updates:
    without ``status.retraining.newRecords`` (the finding's field, written only once live
    control reads Prometheus) nor ``status.message`` (written at every pass); the real CRD
    again afterwards, for the session's other tests."""
    crd = yaml.safe_load((agenttask_crd / "slmfleet.dev_agenttasks.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    del status["properties"]["retraining"]["properties"]["newRecords"]
    del status["properties"]["message"]
    old = tmp_path / "old-crd.yaml"
    old.write_text(yaml.safe_dump(crd))
    cluster.kubectl("apply", "--server-side", "--field-manager=slm-fleet-tests", "-f", str(old))
    try:
        yield
    finally:
        cluster.kubectl(
            "apply", "--server-side", "--field-manager=slm-fleet-tests", "-f", str(agenttask_crd)
        )
        cluster.wait_crd_established("agenttasks.slmfleet.dev")


def test_status_fields_an_outdated_crd_drops_are_an_error_and_an_event(
    cluster: ClusterHandle,
    namespace: str,
    outdated_crd: None,
    operator: OperatorProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API server takes a status write whose fields the task's CRD lacks, prunes them,
    and says so only in a Warning header: retraining on new data never started and nothing
    said why. Now the operator logs an error with what to apply, posts a CRDOutdated Warning
    on the task once, and counts it in slm_operator_api_warnings_total."""
    import logging

    from kubernetes import config

    from slm_operator import conditions as c
    from slm_operator.kube import Kube

    ns = namespace
    # The finding's repro, through the operator's adapter: the real API server's header.
    kube = Kube(config.new_client_from_config(config_file=cluster.kubeconfig))
    cluster.apply(agenttask("hp"), ns)

    def dropped() -> tuple[str, ...]:
        answer = kube.patch_status(ns, "hp", {"retraining": {"newRecords": 900}})
        return answer.unknown_fields

    with caplog.at_level(logging.ERROR, logger="slm_operator"):
        wait_for(lambda: dropped(), timeout=30, what="the API server to serve the old CRD")
    assert dropped() == ("status.retraining.newRecords",)
    assert "newRecords" not in (get_task(cluster, ns, "hp")["status"].get("retraining") or {})
    assert any(
        "AgentTask CRD is older than this operator" in r.getMessage() for r in caplog.records
    )

    # The operator itself, on a task whose every status write loses status.message.
    cluster.apply(agenttask(), ns)

    def crd_outdated() -> list[dict[str, Any]]:
        items = cluster.get_json("events", "-n", ns, "--field-selector", "type=Warning")["items"]
        return [
            e
            for e in items
            if e["reason"] == c.CRD_OUTDATED and e["involvedObject"]["name"] == "weather"
        ]

    wait_for(lambda: crd_outdated(), timeout=60, what="the CRDOutdated Warning")
    revision(cluster, ns)  # the rest of the status is written
    time.sleep(5)  # passes go on (resync every 2 s): still one Event, one error line
    (event,) = crd_outdated()
    assert "status.message" in event["message"]
    assert "kubectl apply --server-side" in event["message"]
    errors = [
        line
        for line in operator.log().splitlines()
        if "dropped status.message" in line and "AgentTask CRD is older" in line
    ]
    assert len(errors) == 1, errors
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as r:
        metrics = r.read().decode()
    counted = re.search(
        r'slm_operator_api_warnings_total\{kind="AgentTask",warning="unknown_field"\} (\S+)',
        metrics,
    )
    assert counted and float(counted.group(1)) >= 1, metrics[-2000:]
