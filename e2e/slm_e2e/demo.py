"""``make demo``: the whole LLM-to-SLM loop on one machine, with real parts only.

What runs (all on 127.0.0.1, started and stopped by this script):
- the local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler,
  kwok fake GPU/CPU nodes), the operator, the gateway, a real Prometheus, the LLM stand-in;
- BFCL ``live_multiple`` and ``live_irrelevance`` calls are replayed through the gateway, which
  captures them (PII-redacted) while the stand-in plays the LLM;
- the operator takes the ``tool-router`` AgentTask through data prep, fine-tuning, the gate and
  export. Pods do not run on kwok's fake nodes, so where a trainer pod would run, this script
  runs ``slm-trainer`` locally with exactly the command, args and environment of the Job the
  operator built (mount paths mapped to the PersistentVolume's host folder), and reports its
  result into the pod status as the kubelet would;
- the exported model repository is served by the real ``tritonserver`` (as the Deployment's
  pods would serve it), and the gateway follows the operator's route: shadow, canary, slm;
- an SLO breach is forced (tritonserver is paused), to show fallback to the LLM and recovery.
It ends with a summary table and the evaluation plot.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from slm_e2e.binaries import locate
from slm_e2e.cluster import LocalCluster
from slm_e2e.kubelet import finish_pod
from slm_e2e.prometheus import LocalPrometheus
from slm_e2e.signals import STOP_SIGNALS, interrupt_on_stop_signals
from slm_e2e.testing import ClusterHandle, OperatorProcess, wait_for
from slm_gateway.testing import stop_child

REPO = Path(__file__).resolve().parents[2]
TASK = "tool-router"
NS = "agents"
CLAIM = "slm-work"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def bfcl_records(n_relevant: int, n_irrelevant: int, seed: int = 7) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "bench"))
    import bfcl_data

    rel = [json.loads(r.to_json()) for r in bfcl_data.records(["live_multiple"])]
    irr = [json.loads(r.to_json()) for r in bfcl_data.records(["live_irrelevance"])]
    rng = random.Random(seed)
    rng.shuffle(rel)
    rng.shuffle(irr)
    out = rel[:n_relevant] + irr[:n_irrelevant]
    rng.shuffle(out)
    return out


def kinds(recs: list[dict[str, Any]]) -> str:
    """How many of ``recs`` are of each BFCL category, as the demo says it: the capture gets
    a random mix of the two (the seed fixes it), not the counts asked for each."""
    n = sum(str(r.get("request_id", "")).startswith("live_multiple") for r in recs)
    return f"{n} live_multiple + {len(recs) - n} live_irrelevance"


# ---------------------------------------------------------------- traffic
class Replay:
    """Replays call records through the gateway from a few threads; counts who answered."""

    def __init__(
        self, url: str, records: list[dict[str, Any]], rate: float | None, workers: int = 6
    ) -> None:
        self.url, self.records, self.rate, self.workers = url, records, rate, workers
        self.backends: Counter[str] = Counter()
        self.fallback_reasons: Counter[str] = Counter()
        self.failures: list[str] = []
        self.latency: dict[str, list[float]] = {"slm": [], "llm": []}
        self.stop = threading.Event()
        self._i = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _next(self) -> dict[str, Any] | None:
        with self._lock:
            if self.rate is None and self._i >= len(self.records):
                return None
            rec = self.records[self._i % len(self.records)]
            self._i += 1
            return rec

    def _call(self, rec: dict[str, Any]) -> None:
        body = {"model": TASK, "messages": rec["messages"], "tools": rec.get("tools") or []}
        req = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer agent-1"},
        )
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                backend = r.headers.get("x-slm-backend", "?")
                reason = r.headers.get("x-slm-fallback-reason")
                r.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # HTTPException too (a body cut short, a malformed status line): it is no OSError,
            # and escaping here it ended the worker thread silently, uncounted, so a demo
            # whose gateway cut every answer reported "failed agent calls: 0".
            with self._lock:
                self.failures.append(repr(exc))
            return
        with self._lock:
            self.backends[backend] += 1
            if reason:
                self.fallback_reasons[reason] += 1
            self.latency.setdefault(backend, []).append((time.perf_counter() - t) * 1000)

    def _loop(self) -> None:
        period = self.workers / self.rate if self.rate else 0.0
        while not self.stop.is_set():
            rec = self._next()
            if rec is None:
                return
            t = time.monotonic()
            self._call(rec)
            if period:
                self.stop.wait(max(0.0, period - (time.monotonic() - t)))

    def start(self) -> Replay:
        for _ in range(self.workers):
            th = threading.Thread(target=self._loop, daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def join(self) -> None:
        """Finite replays end by themselves; a rate-driven one is stopped here."""
        if self.rate:
            self.stop.set()
        for th in self._threads:
            th.join(timeout=60)

    def total(self) -> int:
        return sum(self.backends.values())


# ---------------------------------------------------------------- playing the kubelet
def _default_stop_signals() -> None:
    """Run in a trainer's child process before it execs: the signals that stop a trainer get
    their default action back. An ignored signal stays ignored across exec, and the demo
    ignores them while it cleans up (and after a first SIGTERM): a trainer started then, in a
    session of its own, ignored every SIGTERM, SIGHUP and Ctrl-C, and outlived the demo."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


class TrainerKubelet:
    """Runs each trainer pod's container locally, exactly as the Job specifies, then reports
    the container's termination message into the pod status."""

    def __init__(self, cluster: ClusterHandle, pv_dir: Path, logs: Path) -> None:
        self.cluster, self.pv, self.logs = cluster, pv_dir, logs
        self.done: set[str] = set()
        self.gate = threading.Event()  # opened once the captured traffic is in
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.child: subprocess.Popen[bytes] | None = None
        # Held by stop() and around _run's check-then-start: without it the loop could check
        # ``stopping``, lose the race to stop(), and start the next trainer after stop() had
        # looked for one to kill; that trainer outlived the demo.
        self._spawn_lock = threading.Lock()

    def stop(self) -> None:
        """Stop the loop and the trainer it runs (a demo that fails, times out or is stopped
        left a training process running: it ran in this process's group, from a daemon
        thread no one waited for)."""
        with self._spawn_lock:
            self.stopping.set()
            self.gate.set()
            child = self.child
        if child is not None and child.poll() is None:
            stop_child(child, 10.0)  # a trainer checkpoints on SIGTERM

    def _map(self, value: str) -> str:
        return value.replace("/workspace", str(self.pv)).replace("/mnt/dataset", str(self.pv))

    def _run(self, pod: dict[str, Any]) -> None:
        ctr = pod["spec"]["containers"][0]
        name = pod["metadata"]["name"]
        result = self.logs / f"{name}.result.json"
        args = [self._map(a) for a in ctr.get("args", [])]
        args = [f"--result-path={result}" if a.startswith("--result-path=") else a for a in args]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "POD_NAME": name,
            "POD_NAMESPACE": NS,
        }
        for e in ctr.get("env", []):
            if "value" in e:
                env[e["name"]] = self._map(e["value"])
        exe = str(Path(sys.executable).parent / ctr["command"][0])
        stage = ctr["command"][1]
        say(
            f"kubelet: pod {name} runs `{' '.join(ctr['command'][:2])} ...` locally "
            f"(the Job's exact command and args; /workspace -> {self.pv})"
        )
        t = time.monotonic()
        with open(self.logs / f"{name}.log", "wb") as log, self._spawn_lock:
            if self.stopping.is_set():  # stop() came first: it will not look for this one
                return
            self.child = child = subprocess.Popen(
                [exe, stage, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.pv,
                start_new_session=True,
                preexec_fn=_default_stop_signals,
            )
        rc = child.wait()
        message = result.read_text() if result.exists() else f"no result (exit {rc})"
        say(f"kubelet: {name} exited {rc} after {time.monotonic() - t:.0f}s: {message[:160]}")
        finish_pod(self.cluster, NS, pod, message, exit_code=rc)

    def _loop(self) -> None:
        self.gate.wait()
        while not self.stopping.is_set():
            cp = self.cluster.kubectl(
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                "slmfleet.dev/component=trainer",
                "-o",
                "json",
                check=False,
            )
            pods = json.loads(cp.stdout)["items"] if cp.returncode == 0 else []
            for pod in pods:
                if self.stopping.is_set():  # the demo is ending: start no further trainer
                    return
                name = pod["metadata"]["name"]
                if name in self.done or pod.get("status", {}).get("phase") != "Running":
                    continue
                self.done.add(name)
                try:
                    self._run(pod)
                except Exception as exc:  # keep the demo going; the Job shows it
                    self.errors.append(f"{name}: {exc}")
                    finish_pod(self.cluster, NS, pod, f"demo runner error: {exc}", 1)
            self.stopping.wait(0.5)


# ---------------------------------------------------------------- helpers
def task_status(c: ClusterHandle) -> dict[str, Any]:
    cp = c.kubectl("get", "agenttask", TASK, "-n", NS, "-o", "json", check=False)
    return (json.loads(cp.stdout).get("status") or {}) if cp.returncode == 0 else {}


def cond(st: dict[str, Any], t: str) -> dict[str, Any]:
    return next((x for x in st.get("conditions") or [] if x["type"] == t), {})


def show_table(c: ClusterHandle) -> None:
    print(c.kubectl("get", "agenttasks", "-n", NS, "-o", "wide").stdout.rstrip(), flush=True)


def manifest(llm_base_url: str, model: str) -> dict[str, Any]:
    return {
        "apiVersion": "slmfleet.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": TASK, "namespace": NS},
        "spec": {
            "description": "Pick the right tool for BFCL live_multiple calls; defer the rest",
            "taskType": "tool-call",
            "dataset": {
                "uri": f"pvc://{CLAIM}/capture/{NS}/{TASK}",
                "minExamples": 200,
                "evalFraction": 0.25,
            },
            "candidates": [
                {
                    "name": "minilm-r8",
                    "model": model,
                    "lora": {"r": 8, "alpha": 16},
                    "epochs": 2,
                    "learningRate": 0.001,
                },
            ],
            "training": {"gpus": 1, "backoffLimit": 0},
            "storage": {"claimName": CLAIM},
            "evaluation": {
                "metric": "label-accuracy",
                "gate": {"minScore": 0.5, "maxDropVsLLM": 0.5},
            },
            "serving": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "gpus": 1,
                "slo": {"p95LatencyMs": 2500, "maxErrorRate": 0.05, "targetQpsPerReplica": 4},
            },
            "rollout": {
                "strategy": "progressive",
                # Each window is judged on fresh copies only (no copy counts twice), and at
                # ~4 calls/s the SLM's confident answers give about one copy every 2 s.
                "shadowMinSamples": 10,
                "minAgreement": 0.6,
                "canaryPercent": 30,
                "canaryWindows": 3,
            },
            "fallback": {
                "llm": {
                    "baseURL": llm_base_url,
                    "model": "gpt-4o",
                    "apiKeySecretRef": {"name": "llm-key"},
                },
                "policy": {"windowSeconds": 2, "breachWindows": 2, "recoveryWindows": 3},
            },
        },
    }


def evaluation_report(revision_dir: Path, spec: dict[str, Any], out: Path) -> tuple[str, bool]:
    """``slm-trainer evaluate`` on the served revision's candidates, with the task's metric,
    gate and target precision: ``report.json`` and ``report.png`` (scores per candidate,
    coverage/precision curve) in ``out``, as a platform engineer would run it to see why a
    candidate won. The operator gates on the fine-tune Jobs' results and runs no such stage,
    so without this the demo had no plot to show. Returns evaluate's one-line verdict, and
    whether it succeeded (exit 0: it ran and the served revision passed the gate)."""
    ev = spec["evaluation"]
    gate = ev.get("gate") or {}
    args = [
        sys.executable, "-m", "slm_trainer", "evaluate",
        "--data", str(revision_dir / "data"),
        "--candidates-dir", str(revision_dir / "candidates"),
        "--output", str(out),
        "--task-type", spec["taskType"],
        "--metric", ev["metric"],
        "--target-precision", str(ev.get("targetPrecision", 0.97)),
        "--min-score", str(gate.get("minScore", -1.0)),
        "--max-drop-vs-llm", str(gate.get("maxDropVsLLM", -1.0)),
    ]  # fmt: skip
    cp = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    ok = cp.returncode == 0
    for line in reversed(cp.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "result":
                return str(event.get("message", "")), ok
    return f"evaluate exited {cp.returncode}: {cp.stderr.strip()[-300:]}", ok


def prom_query(prom: LocalPrometheus, q: str) -> float | None:
    url = f"{prom.url}/api/v1/query?query={urllib.parse.quote(q)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        data = json.load(r)["data"]["result"]
    try:
        v = float(data[0]["value"][1])
    except (IndexError, KeyError, ValueError):
        return None
    return None if v != v else v


def end_summary(failed: list[str]) -> int:
    """Close the summary table and return the demo's exit code: 1 when any stage failed,
    named on a line of its own. Only failed live calls used to count, so a demo whose
    capture, rollout or closing evaluation had failed still ended with exit 0."""
    if failed:
        print(f"{'failed stages':<22}{'; '.join(failed)}")
    print("=========================================================")
    return 1 if failed else 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------- main
def run(work: Path, n_relevant: int, n_irrelevant: int) -> int:
    from slm_e2e import llm_standin
    from slm_e2e.triton import start_triton
    from slm_gateway.testing import start_gateway

    if work.exists():
        # An earlier demo killed before its cleanup may have left its control plane running:
        # its state file is the only record of the pids, so stop them before it is deleted.
        with contextlib.suppress(Exception):
            LocalCluster(work / "cluster").down()
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    pv = work / "pv"
    pv.mkdir()
    stack: list[Any] = []
    failed: list[str] = []  # stages that went wrong: the demo shows the rest, then exits 1
    try:
        say(
            "starting the local Kubernetes control plane (etcd, apiserver, scheduler, "
            "controller-manager, kwok GPU/CPU nodes)"
        )
        lc = LocalCluster(work / "cluster")
        st = lc.up()  # a start that fails or is interrupted stops what it started
        stack.append(lc)
        bins = locate()
        c = ClusterHandle(str(lc.kubeconfig), bins.kubectl.parent, bins.kubectl, lc)
        say(f"control plane ready in {st.ready_seconds}s; KUBECONFIG={lc.kubeconfig}")
        c.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        c.wait_crd_established("agenttasks.slmfleet.dev")
        c.kubectl("create", "namespace", NS)
        wait_for(
            lambda: c.kubectl("get", "sa", "default", "-n", NS, check=False).returncode == 0,
            what="namespace ready",
        )
        c.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": "demo-pv"},
                    "spec": {
                        "capacity": {"storage": "20Gi"},
                        "accessModes": ["ReadWriteMany"],
                        "storageClassName": "manual",
                        "hostPath": {"path": str(pv)},
                        "claimRef": {"namespace": NS, "name": CLAIM},
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": CLAIM, "namespace": NS},
                    "spec": {
                        "accessModes": ["ReadWriteMany"],
                        "storageClassName": "manual",
                        "volumeName": "demo-pv",
                        "resources": {"requests": {"storage": "20Gi"}},
                    },
                },
            ]
        )
        c.kubectl(
            "create",
            "secret",
            "generic",
            "llm-key",
            "-n",
            NS,
            "--from-literal=api-key=sk-demo-0000000000000000000000",
        )

        recs = bfcl_records(n_relevant * 2, n_irrelevant * 2)
        capture_recs = recs[: n_relevant + n_irrelevant]
        live_recs = recs[n_relevant + n_irrelevant :]
        say(
            f"loading BFCL calls: {2 * n_relevant} live_multiple + {2 * n_irrelevant} "
            f"live_irrelevance, mixed: {kinds(capture_recs)} to capture, {kinds(live_recs)} "
            "for live traffic (the LLM stand-in answers with BFCL's ground truth)"
        )
        answers = work / "llm-answers.jsonl"
        answers.write_text("".join(json.dumps(r) + "\n" for r in recs))
        standin = llm_standin.start(
            answers=answers, log_path=work / "logs/llm-standin.log", llm_latency_ms=60
        )
        stack.append(standin)
        # The key's owner says where it may go; the gateway sends it nowhere else.
        c.kubectl(
            "annotate",
            "secret",
            "llm-key",
            "-n",
            NS,
            f"slmfleet.dev/llm-hosts=127.0.0.1:{standin.port}",
        )
        gateway = start_gateway(
            [
                "--namespace",
                NS,
                "--kubeconfig",
                str(lc.kubeconfig),
                "--capture",
                str(pv / "capture"),
                "--capture-spool",
                str(work / "spool"),
                "--capture-shard-seconds",
                "5",
                "--slm-timeout-ms",
                "3000",
            ],
            log_path=work / "logs/gateway.log",
        )
        stack.append(gateway)
        prom = LocalPrometheus(
            work / "prometheus",
            {"gateway": [gateway.url.split("//")[1]]},
            1.0,
            # the namespace a cluster's PodMonitor adds: the operator reads Triton's queue
            # time by it (status.live.observed.queueMs)
            labels={"triton": {"namespace": NS}},
        ).start()
        stack.append(prom)
        op = OperatorProcess(
            str(lc.kubeconfig),
            NS,
            work / "logs/operator.log",
            resync_seconds=1.0,
            extra_env={
                "SLM_FLEET_PROMETHEUS_URL": prom.url,
                "SLM_FLEET_PROMETHEUS_SCRAPE_SECONDS": "1",
                # As the chart runs it: a leader elected on a Lease (here the only candidate).
                "SLM_FLEET_LEADER_ELECTION_LEASE": f"{NS}/slm-fleet-operator",
            },
        ).start()
        stack.append(op)
        say(f"gateway {gateway.url}, Prometheus {prom.url}, operator and LLM stand-in running")

        kubelet = TrainerKubelet(c, pv, work / "logs")
        stack.append(kubelet)  # stopped before the cluster it reads (stack: last in, first out)
        kubelet.thread.start()
        task = manifest(standin.llm_base_url, "sentence-transformers/all-MiniLM-L6-v2")
        spec = task["spec"]
        c.apply(task, NS)
        say(f"applied AgentTask {TASK}; the operator created its data-prep Job")
        show_table(c)

        say(
            f"S1 capture: replaying {len(capture_recs)} agent calls through the gateway "
            "(route mode llm: the LLM answers, every call is captured, PII-redacted)"
        )
        rp = Replay(gateway.url, capture_recs, rate=None, workers=8).start()
        rp.join()
        say(f"captured {rp.total()} calls ({dict(rp.backends)}); failures: {len(rp.failures)}")
        if rp.failures:
            failed.append(f"capture ({len(rp.failures)} failed agent calls)")
        time.sleep(6)  # one capture shard rotation
        kubelet.gate.set()

        last_phase = ""
        deadline = time.monotonic() + 900
        triton = None
        while time.monotonic() < deadline:
            s = task_status(c)
            phase = s.get("phase", "")
            if phase != last_phase:
                say(f"phase {phase}: {s.get('message', '')}")
                show_table(c)
                last_phase = phase
            if phase == "Failed":
                say("the task failed; see `kubectl describe agenttask` below")
                print(c.kubectl("describe", "agenttask", TASK, "-n", NS).stdout[-3000:])
                return 1
            dep = c.kubectl("get", "deployment", f"{TASK}-slm", "-n", NS, "-o", "json", check=False)
            if dep.returncode == 0 and triton is None:
                d = json.loads(dep.stdout)
                repo_arg = next(
                    a
                    for a in d["spec"]["template"]["spec"]["containers"][0]["args"]
                    if a.startswith("--model-repository=")
                )
                repo = Path(kubelet._map(repo_arg.split("=", 1)[1]))
                say(
                    f"the operator deployed Triton for {repo_arg}; serving it with the real "
                    f"tritonserver locally ({repo})"
                )
                triton = start_triton(
                    repo,
                    workdir=work / "triton",
                    extra_pythonpath=[str(REPO / "trainer")],
                    env={"OMP_NUM_THREADS": "1"},  # one core per instance; 2 cores here
                )
                stack.append(triton)
                c.kubectl(
                    "annotate",
                    "agenttask",
                    TASK,
                    "-n",
                    NS,
                    "--overwrite",
                    f"slmfleet.dev/serving-endpoint=http://127.0.0.1:{triton.http_port}",
                )
                prom.reload(
                    {
                        "gateway": [gateway.url.split("//")[1]],
                        "triton": [f"127.0.0.1:{triton.metrics_port}"],
                    }
                )
            if cond(s, "Serving").get("status") == "True" and triton is not None:
                break
            time.sleep(1)
        else:
            say("timed out waiting for the model to be served")
            return 1

        say(
            "live traffic: replaying fresh BFCL calls at ~4/s; the operator moves the route "
            "shadow -> canary -> slm as live agreement and the SLO hold (the canary must "
            "pass 3 healthy windows in a row, each judged on 10 shadow copies no other "
            "window counted)"
        )
        live = Replay(gateway.url, live_recs, rate=4, workers=4).start()
        last_mode = ""
        t_end = time.monotonic() + 200
        while time.monotonic() < t_end:
            s = task_status(c)
            mode = s.get("route", {}).get("mode", "")
            if mode != last_mode:
                obs = (s.get("live") or {}).get("observed") or {}
                say(
                    f"route mode -> {mode} (agreement {obs.get('agreement', 'n/a')}, "
                    f"p95 {obs.get('p95LatencyMs', 'n/a')} ms, "
                    f"rollout: {(s.get('live') or {}).get('rolloutReason', '')})"
                )
                last_mode = mode
            if mode == "slm":
                break
            time.sleep(0.5)
        else:
            say(f"the rollout stayed at {last_mode} (not enough agreeing shadow samples yet)")
            failed.append(f"rollout (stayed at {last_mode or 'no route'}, never reached slm)")
        say(
            "serving: calls the selector is confident about are answered by the SLM; the rest "
            "(low confidence, or no fitting tool) fall back to the LLM per request"
        )
        time.sleep(25)
        show_table(c)

        say(
            "forcing an SLO breach: pausing tritonserver (SIGSTOP) — SLM calls time out, the "
            "gateway answers them from the LLM, the operator turns FallbackActive on"
        )
        assert triton is not None
        os.kill(triton.pid, signal.SIGSTOP)
        t_fault = time.monotonic()
        try:
            wait_for(
                lambda: cond(task_status(c), "FallbackActive").get("status") == "True",
                timeout=60,
                interval=0.2,
                what="FallbackActive",
            )
            fb = cond(task_status(c), "FallbackActive")
            say(f"FallbackActive=True after {time.monotonic() - t_fault:.1f}s: {fb['message']}")
            show_table(c)
            time.sleep(3)
        finally:
            os.kill(triton.pid, signal.SIGCONT)
        say("resuming tritonserver (SIGCONT); recovery needs 3 healthy windows (hysteresis)")
        t_ok = time.monotonic()
        wait_for(
            lambda: cond(task_status(c), "FallbackActive").get("status") == "False",
            timeout=90,
            interval=0.5,
            what="recovery",
        )
        say(
            f"recovered after {time.monotonic() - t_ok:.1f}s: "
            f"{cond(task_status(c), 'FallbackActive')['message']}"
        )
        time.sleep(4)
        live.join()
        show_table(c)

        # ------------------------------------------------------------ summary
        s = task_status(c)
        agree = prom_query(
            prom,
            'sum(slm_gateway_shadow_total{result="agree"}) / '
            'sum(slm_gateway_shadow_total{result=~"agree|disagree"})',
        )
        saved = prom_query(
            prom, "sum(slm_gateway_llm_equivalent_cost_usd_total) - sum(slm_gateway_cost_usd_total)"
        )
        total = live.total()
        print("\n================ SLM Fleet demo summary ================")
        print(f"{'task':<22}{TASK}")
        print(
            f"{'promoted model':<22}{s.get('selectedModel', {}).get('candidate')} "
            f"(held-out score {s.get('selectedModel', {}).get('score')})"
        )
        print(f"{'live calls':<22}{total}  (failed agent calls: {len(live.failures)})")
        for b in ("slm", "llm"):
            lat = live.latency.get(b, [])
            print(
                f"{'served by ' + b.upper():<22}{live.backends.get(b, 0):>6} "
                f"({100 * live.backends.get(b, 0) / max(total, 1):5.1f}%)   "
                f"latency p50 {pct(lat, 0.5):7.1f} ms   p95 {pct(lat, 0.95):7.1f} ms"
            )
        print(f"{'fallback reasons':<22}{dict(live.fallback_reasons)}")
        print(
            f"{'agreement with LLM':<22}"
            f"{'n/a' if agree is None else f'{100 * agree:.1f}%'} (shadow + canary copies)"
        )
        print(
            f"{'est. cost saved':<22}"
            f"{'n/a' if saved is None else f'${saved:.4f}'} vs all-LLM at gateway prices"
        )
        revision = (s.get("revision") or {}).get("active", "")
        if revision:
            verdict, ok = evaluation_report(pv / TASK / revision, spec, work / "evaluation")
            print(f"{'evaluation':<22}{verdict}")
            if (work / "evaluation" / "report.png").is_file():
                print(f"{'eval plot':<22}{work / 'evaluation' / 'report.png'}")
            if not ok:
                failed.append("evaluation (slm-trainer evaluate failed)")
        else:
            failed.append("evaluation (no active revision to evaluate)")
        if live.failures:
            failed.append(f"live traffic ({len(live.failures)} failed agent calls)")
        return end_summary(failed)
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGINT):  # a second signal must not cut cleanup
            signal.signal(sig, signal.SIG_IGN)
        for thing in reversed(stack):
            try:
                thing.stop() if not isinstance(thing, LocalCluster) else thing.down()
            except Exception as exc:  # best effort shutdown
                print(f"stopping {type(thing).__name__}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slm-fleet-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=REPO / ".demo")
    ap.add_argument(
        "--relevant",
        type=int,
        default=300,
        help="live_multiple calls per half: twice as many are drawn and mixed with the "
        "live_irrelevance ones; the capture takes the first half of the mix, live traffic the rest",
    )
    ap.add_argument(
        "--irrelevant", type=int, default=150, help="live_irrelevance calls per half (likewise)"
    )
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    interrupt_on_stop_signals()  # SIGTERM, SIGHUP: so that `finally` stops every server
    try:
        return run(a.dir, a.relevant, a.irrelevant)
    except KeyboardInterrupt:
        say("interrupted; everything started by the demo was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
