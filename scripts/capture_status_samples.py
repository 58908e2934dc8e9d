"""Capture AgentTask objects, status included, from real operator runs: the Argo CD samples.

Why: the health check (``argocd/agenttask-health.lua``) must be tested on what the operator
really writes, not on statuses typed by hand. This script starts the local control plane
(or uses the one ``KUBECONFIG`` names, if it is a local slm-fleet cluster), runs the real
operator as a process, plays the kubelet for trainer pods exactly as the integration tests do
(:mod:`slm_e2e.kubelet`), and writes each AgentTask as ``kubectl get -o json`` returns it to
``tests/data/argocd/<sample>.json`` as ``{"source": ..., "object": ...}``.

Two samples need live metrics that no Prometheus provides here: SLO fallback and recovery.
For those the operator is stopped and the status is patched through the status subresource,
starting from a real serving status, the way live control would change it; their ``source``
says so.

Run: ``.venv/bin/python scripts/capture_status_samples.py`` (about two minutes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slm_contract import TrainerResult
from slm_e2e.binaries import locate
from slm_e2e.cluster import LocalCluster
from slm_e2e.kubelet import complete_job, running_pod
from slm_e2e.testing import ClusterHandle, OperatorProcess, wait_for
from slm_operator import naming as n

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "argocd"
CLAIM = "slm-work"
Obj = dict[str, Any]


def agenttask(name: str, candidates: list[Obj] | None = None, **spec: Any) -> Obj:
    """The integration tests' AgentTask (tests/integration/test_operator.py); ``spec`` adds
    or replaces top-level spec fields."""
    task: Obj = {
        "apiVersion": "slmfleet.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": name},
        "spec": {
            "description": "Pick the weather tool and fill its arguments",
            "taskType": "tool-call",
            "dataset": {"uri": f"pvc://{CLAIM}/calls/{name}.jsonl", "minExamples": 100},
            "candidates": candidates
            or [
                {"name": "small", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                {"name": "big", "model": "Qwen/Qwen2.5-0.5B-Instruct", "method": "qlora"},
            ],
            "training": {"gpus": 1, "backoffLimit": 0},
            "storage": {"claimName": CLAIM},
            "evaluation": {
                "metric": "tool-call-ast",
                "gate": {"minScore": 0.8, "maxDropVsLLM": 0.05},
            },
            "serving": {"minReplicas": 2, "maxReplicas": 4, "gpus": 1},
            "fallback": {
                "llm": {
                    "baseURL": "http://127.0.0.1:9/v1",
                    "model": "gpt-4o-mini",
                    "apiKeySecretRef": {"name": "llm-key"},
                }
            },
        },
    }
    task["spec"].update(spec)
    return task


class Run:
    """One namespace on the cluster, the operator watching it, and the samples taken."""

    def __init__(self, cluster: ClusterHandle, workdir: Path) -> None:
        self.cluster = cluster
        self.ns = f"samples-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        self.samples: dict[str, Obj] = {}
        self.operator: OperatorProcess | None = None

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.cluster
        c.kubectl(
            "apply", "--server-side", "--field-manager=slm-fleet-tests", "-f", str(REPO / "crds")
        )
        c.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/agenttasks.slmfleet.dev"
        )
        c.kubectl("create", "namespace", self.ns)
        pv = f"pv-{self.ns}"
        c.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": pv},
                    "spec": {
                        "capacity": {"storage": "10Gi"},
                        "accessModes": ["ReadWriteMany"],
                        "storageClassName": "manual",
                        "hostPath": {"path": str(self.workdir / "pv")},
                        "claimRef": {"namespace": self.ns, "name": CLAIM},
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": CLAIM, "namespace": self.ns},
                    "spec": {
                        "accessModes": ["ReadWriteMany"],
                        "storageClassName": "manual",
                        "volumeName": pv,
                        "resources": {"requests": {"storage": "10Gi"}},
                    },
                },
            ]
        )
        wait_for(lambda: self.task_pvc_bound(), timeout=30, what="the PVC to bind")

    def task_pvc_bound(self) -> bool:
        pvc = self.cluster.get_json("pvc", CLAIM, "-n", self.ns)
        return bool(pvc["status"].get("phase") == "Bound")

    def start_operator(self) -> None:
        self.operator = OperatorProcess(
            self.cluster.kubeconfig, self.ns, self.workdir / "operator.log"
        ).start()

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()
            self.operator = None

    def cleanup(self) -> None:
        self.cluster.kubectl(
            "delete", "agenttasks", "--all", "-n", self.ns, "--wait=false", check=False
        )
        self.stop_operator()
        self.cluster.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)
        self.cluster.kubectl("delete", "pv", f"pv-{self.ns}", "--wait=false", check=False)

    # ---- helpers -------------------------------------------------------------------------
    def task(self, name: str) -> Obj:
        task: Obj = self.cluster.get_json("agenttask", name, "-n", self.ns)
        return task

    def status(self, name: str) -> Obj:
        return self.task(name).get("status") or {}

    def cond(self, name: str, type_: str) -> Obj:
        for c in self.status(name).get("conditions") or []:
            if c["type"] == type_:
                return dict(c)
        return {}

    def until(self, what: str, check: Callable[[], Any], timeout: float = 60) -> None:
        wait_for(check, timeout=timeout, what=what)

    def revision(self, name: str, not_: str = "") -> str:
        return str(
            wait_for(
                lambda: (
                    (r := self.status(name).get("revision", {}).get("training")) and r != not_ and r
                ),
                timeout=30,
                what=f"a training revision of {name}",
            )
        )

    def finish(self, job: str, result: TrainerResult, exit_code: int = 0) -> None:
        complete_job(self.cluster, self.ns, job, result.to_json(), exit_code=exit_code)

    def prepare(self, name: str, rev: str) -> None:
        self.finish(
            n.data_job_name(name, rev),
            TrainerResult(
                stage="prepare", ok=True, examples=1200, train_examples=960, eval_examples=240
            ),
        )

    def finetune(self, name: str, rev: str, scores: dict[str, float]) -> None:
        for cand, score in scores.items():
            self.finish(
                n.finetune_job_name(name, cand, rev),
                TrainerResult(
                    stage="finetune",
                    ok=True,
                    candidate=cand,
                    score=score,
                    llm_score=0.95,
                    parameters={"small": 135_000_000, "big": 494_000_000}.get(cand, 1000),
                    artifact_uri=f"pvc://{CLAIM}/{name}/{rev}/candidates/{cand}",
                    threshold=0.72,
                    train_seconds=321.5,
                    eval_seconds=12.0,
                ),
            )

    def export(self, name: str, rev: str) -> None:
        self.finish(
            n.export_job_name(name, "big", rev),
            TrainerResult(
                stage="export",
                ok=True,
                candidate="big",
                artifact_uri=f"pvc://{CLAIM}/{name}/{rev}/model_repositories/big",
            ),
        )

    def serve(self, name: str) -> str:
        self.cluster.apply(agenttask(name), self.ns)
        rev = self.revision(name)
        self.prepare(name, rev)
        self.finetune(name, rev, {"small": 0.62, "big": 0.93})
        self.export(name, rev)
        self.cluster.kubectl(
            "wait", "-n", self.ns, "--for=condition=Ready", "--timeout=60s", f"agenttask/{name}"
        )
        return rev

    def take(self, sample: str, name: str, source: str) -> None:
        obj = self.task(name)
        meta = obj["metadata"]
        for key in ("managedFields", "resourceVersion", "uid", "creationTimestamp"):
            meta.pop(key, None)
        self.samples[sample] = {"source": source, "object": obj}
        print(f"  {sample}: phase={obj.get('status', {}).get('phase')}")

    def patch_status(self, name: str, change: Callable[[Obj], None]) -> None:
        """Merge-patch status (the whole conditions list, as the operator writes it)."""
        status = self.status(name)
        change(status)
        self.cluster.kubectl(
            "patch",
            "agenttask",
            name,
            "-n",
            self.ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )


REAL = "real operator run (scripts/capture_status_samples.py): "


def capture(run: Run) -> None:
    c, ns = run.cluster, run.ns

    # Applied before the operator starts: no status yet.
    c.apply(agenttask("unobserved"), ns)
    run.take("unobserved", "unobserved", REAL + "applied, operator not started yet")
    c.kubectl("delete", "agenttask", "unobserved", "-n", ns)

    run.start_operator()

    c.apply(agenttask("fresh"), ns)
    rev = run.revision("fresh")
    running_pod(c, ns, n.data_job_name("fresh", rev))
    run.until("phase PreparingData", lambda: run.status("fresh").get("phase") == "PreparingData")
    run.take("preparing-data", "fresh", REAL + "data-prep Job running")

    c.apply(agenttask("training"), ns)
    rev = run.revision("training")
    run.prepare("training", rev)
    run.until("phase Training", lambda: run.status("training").get("phase") == "Training")
    for cand in ("small", "big"):
        running_pod(c, ns, n.finetune_job_name("training", cand, rev))
    run.until(
        "fine-tune Jobs running",
        lambda: run.cond("training", "Trained").get("reason") == "JobRunning",
    )
    run.take("training", "training", REAL + "two fine-tune Jobs running on GPU nodes")

    c.apply(agenttask("exporting"), ns)
    rev = run.revision("exporting")
    run.prepare("exporting", rev)
    run.finetune("exporting", rev, {"small": 0.62, "big": 0.93})
    run.until("phase Exporting", lambda: run.status("exporting").get("phase") == "Exporting")
    run.take("exporting", "exporting", REAL + "gate passed, export Job running")

    c.apply(agenttask("gate"), ns)
    rev = run.revision("gate")
    run.prepare("gate", rev)
    run.finetune("gate", rev, {"small": 0.41, "big": 0.7})
    run.until("GateNotMet", lambda: run.cond("gate", "Evaluated").get("reason") == "GateNotMet")
    run.take("gate-not-met", "gate", REAL + "no candidate passed the evaluation gate")

    c.apply(agenttask("oom", candidates=[{"name": "small", "model": "org/tiny"}]), ns)
    rev = run.revision("oom")
    run.prepare("oom", rev)
    run.finish(
        n.finetune_job_name("oom", "small", rev),
        TrainerResult(
            stage="finetune",
            ok=False,
            candidate="small",
            message="CUDA out of memory: tried to allocate 2.00 GiB",
        ),
        exit_code=1,
    )
    run.until("JobFailed", lambda: run.cond("oom", "Trained").get("reason") == "JobFailed")
    run.take("job-failed", "oom", REAL + "the only fine-tune Job failed (CUDA OOM)")

    # (A model on another PVC, the sample's first cause, is refused at admission now.)
    c.apply(agenttask("misplaced", retraining={"schedule": "0 0 31 2 *"}), ns)
    run.until("InvalidSpec", lambda: run.cond("misplaced", "Ready").get("reason") == "InvalidSpec")
    run.take("invalid-spec", "misplaced", REAL + "a retraining schedule that never fires")

    run.serve("weather")
    run.take("serving-ready", "weather", REAL + "promoted, Triton replicas ready, Ready=True")

    old = run.serve("retrain")
    changed = agenttask("retrain")
    changed["spec"]["candidates"][0]["epochs"] = 5
    c.apply(changed, ns)
    run.revision("retrain", not_=old)
    run.until(
        "the retraining to prepare data",
        lambda: run.status("retrain").get("revision", {}).get("training") not in ("", old),
    )
    run.take(
        "retraining-while-serving",
        "retrain",
        REAL + "spec changed while serving: a new revision trains beside the served one",
    )

    run.serve("slo")
    run.stop_operator()

    # Spec changed while no operator runs: status describes an older generation.
    stale = agenttask("weather")
    stale["spec"]["serving"]["maxReplicas"] = 6
    c.apply(stale, ns)
    run.take(
        "stale-generation",
        "weather",
        REAL + "Ready task whose spec changed while the operator was stopped",
    )

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def breached(st: Obj) -> None:
        msg = "calls go to the LLM: SLOBreached; recovery after 5 healthy windows (0 so far)"
        for cond in st["conditions"]:
            if cond["type"] == "SLOMet":
                cond.update(
                    status="False",
                    reason="SLOBreached",
                    lastTransitionTime=now,
                    message="SLO breached: p95 912 ms (SLO 500 ms), error rate 0.4% (SLO 1.0%)",
                )
            elif cond["type"] == "FallbackActive":
                cond.update(
                    status="True", reason="SLOBreached", lastTransitionTime=now, message=msg
                )
            elif cond["type"] == "Ready":
                cond.update(
                    status="False", reason="SLOBreached", lastTransitionTime=now, message=msg
                )
        st["message"] = msg
        st["route"].update(mode="shadow", reason=msg)
        st["live"] = {
            **st.get("live", {}),
            "fallback": True,
            "fallbackReason": "SLOBreached",
            "breachStreak": 3,
            "healthyStreak": 0,
            "sloBreached": True,
            "lastEvaluated": now,
            "observed": {"p95LatencyMs": 912.0, "errorRate": 0.004, "requestRate": 14.2},
        }

    patched = (
        "serving status from a real operator run, then, with the operator stopped, "
        "patched through the status subresource as live control writes it "
    )
    run.patch_status("slo", breached)
    run.take(
        "fallback-slo-breached",
        "slo",
        patched + "after breachWindows breached SLO windows (no Prometheus here to breach it)",
    )

    def recovering(st: Obj) -> None:
        msg = "calls go to the LLM: Recovering; recovery after 5 healthy windows (2 so far)"
        for cond in st["conditions"]:
            if cond["type"] == "SLOMet":
                cond.update(
                    status="True",
                    reason="WithinSLO",
                    message="within SLO: p95 231 ms (SLO 500 ms), error rate 0.0% (SLO 1.0%)",
                )
            elif cond["type"] in ("FallbackActive", "Ready"):
                cond.update(reason="Recovering", message=msg)
        st["message"] = msg
        st["route"]["reason"] = msg
        st["live"].update(
            fallbackReason="Recovering", breachStreak=0, healthyStreak=2, sloBreached=False
        )

    run.patch_status("slo", recovering)
    run.take(
        "fallback-recovering", "slo", patched + "two healthy windows into the recovery hysteresis"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    bins = locate()
    local: LocalCluster | None = None
    with tempfile.TemporaryDirectory(prefix="slm-samples-") as tmp:
        workdir = Path(tmp)
        kc = os.environ.get("KUBECONFIG")
        if not kc:
            (workdir / "cluster").mkdir()
            local = LocalCluster(workdir / "cluster")
            local.up()
            kc = str(local.kubeconfig)
        cluster = ClusterHandle(kc, bins.kubectl.parent, bins.kubectl, local)
        run = Run(cluster, workdir)
        try:
            run.setup()
            capture(run)
        finally:
            run.cleanup()
            if local is not None:
                local.down()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, sample in sorted(run.samples.items()):
        (args.out / f"{name}.json").write_text(json.dumps(sample, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(run.samples)} samples to {args.out}")


if __name__ == "__main__":
    main()
