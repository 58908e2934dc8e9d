"""Live control with every real part on 127.0.0.1: operator, kube-apiserver, gateway, a real
tritonserver, a real Prometheus scraping both every second, and the LLM stand-in.

The SLM is a Triton Python-backend model that answers like an exported SLM and sleeps or fails
while a flag file says so (``tests/data/triton_faulty``). The tests inject faults and watch the
operator switch the task to the LLM, scale the Deployment, and walk shadow → canary → slm,
while every agent call still succeeds.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_operator import CLAIM, agenttask, get_task, storage  # noqa: F401

from slm_contract import TrainerResult
from slm_e2e.kubelet import complete_job
from slm_e2e.prometheus import LocalPrometheus
from slm_e2e.testing import ClusterHandle, OperatorProcess, wait_for
from slm_operator import conditions as c
from slm_operator import naming as n

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
TASK = "faulty"  # the Triton model's name is the task's name
SCRAPE = 1.0


@dataclass
class Stack:
    ns: str
    gateway_url: str
    triton_url: str
    fault_file: Path
    llm_base_url: str
    prom: LocalPrometheus
    operator: OperatorProcess
    #: Replaces the gateway with a new process on a new port (a rollout of its pod),
    #: scraped in its place; returns the new gateway's URL.
    replace_gateway: Callable[[], str]


@pytest.fixture
def stack(
    cluster: ClusterHandle,
    namespace: str,
    storage: str,  # noqa: F811
    agenttask_crd: Path,
    tmp_path: Path,
) -> Iterator[Stack]:
    from slm_e2e import llm_standin
    from slm_e2e.triton import start_triton
    from slm_gateway.testing import start_gateway

    fault = tmp_path / "fault"
    fault.write_text("")
    # Every part is stopped however the setup ends: one that fails to start (or a Ctrl-C
    # meanwhile) must not leave those started before it running. Stops run in reverse order.
    with contextlib.ExitStack() as parts:
        standin = llm_standin.start(log_path=tmp_path / "standin.log")
        parts.callback(standin.stop)
        triton = start_triton(
            REPO / "tests/data/triton_faulty",
            workdir=tmp_path / "triton",
            env={"SLM_FAULT_FILE": str(fault)},
        )
        parts.callback(triton.stop)
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "llm-key",
            "-n",
            namespace,
            "--from-literal=api-key=sk-test-not-a-real-key-000000000000",
        )
        # The key may go to the stand-in only: the gateway sends it nowhere else.
        cluster.kubectl(
            "annotate",
            "secret",
            "llm-key",
            "-n",
            namespace,
            f"slmfleet.dev/llm-hosts=127.0.0.1:{standin.port}",
        )
        gateway_args = [
            "--namespace",
            namespace,
            "--kubeconfig",
            cluster.kubeconfig,
            "--capture",
            str(tmp_path / "capture"),
            "--capture-spool",
            str(tmp_path / "spool"),
            "--slm-timeout-ms",
            "1500",
            "--breaker-failures",
            "1000",
        ]
        gateways = [start_gateway(gateway_args, log_path=tmp_path / "gateway.log")]
        parts.callback(lambda: print("---- gateway log tail\n" + gateways[-1].log()[-2000:]))
        parts.callback(lambda: gateways[-1].stop())
        host = lambda url: url.split("//", 1)[1].rstrip("/")  # noqa: E731
        prom = LocalPrometheus(
            tmp_path / "prom",
            {
                "gateway": [host(gateways[0].url)],
                "triton": [f"127.0.0.1:{triton.metrics_port}"],
            },
            scrape_interval=SCRAPE,
            # As the chart's PodMonitor labels a serving pod's series: the operator reads a
            # task's Triton queue time by its namespace.
            labels={"triton": {"namespace": namespace}},
        ).start()
        parts.callback(prom.stop)
        op = OperatorProcess(
            cluster.kubeconfig,
            namespace,
            tmp_path / "operator.log",
            resync_seconds=0.5,
            extra_env={
                "SLM_FLEET_PROMETHEUS_URL": prom.url,
                "SLM_FLEET_PROMETHEUS_SCRAPE_SECONDS": str(SCRAPE),
            },
        ).start()
        parts.callback(lambda: print("---- operator log tail\n" + op.log()[-3000:]))
        parts.callback(op.stop)
        # tasks are deleted while the operator still runs, before anything stops
        parts.callback(
            cluster.kubectl,
            "delete",
            "agenttasks",
            "--all",
            "-n",
            namespace,
            "--wait=false",
            check=False,
        )

        def replace_gateway() -> str:
            gateways[-1].stop()
            gateways.append(start_gateway(gateway_args, log_path=tmp_path / "gateway.log"))
            prom.reload({**prom.targets, "gateway": [host(gateways[-1].url)]})
            return gateways[-1].url

        yield Stack(
            namespace,
            gateways[0].url,
            f"http://127.0.0.1:{triton.http_port}",
            fault,
            standin.llm_base_url,
            prom,
            op,
            replace_gateway,
        )


def fallback_with(policy: dict[str, Any]) -> dict[str, Any]:
    """spec.fallback with this policy; serve_task points the LLM at the stand-in."""
    return {
        "llm": {
            "baseURL": "http://127.0.0.1:9/v1",
            "model": "gpt-4o-mini",
            "apiKeySecretRef": {"name": "llm-key"},
        },
        "policy": policy,
    }


def serve_task(cluster: ClusterHandle, s: Stack, **spec: Any) -> None:
    """Apply the task, play its trainer pods, and point it at the local tritonserver."""
    task = agenttask(name=TASK, candidates=[{"name": "small", "model": "org/tiny"}], **spec)
    task["metadata"]["annotations"] = {n.ANNOTATION_ENDPOINT: s.triton_url}
    task["spec"]["fallback"]["llm"]["baseURL"] = s.llm_base_url
    cluster.apply(task, s.ns)
    rev = wait_for(
        lambda: (
            (get_task(cluster, s.ns, TASK).get("status") or {}).get("revision", {}).get("training")
        ),
        timeout=30,
        what="a training revision",
    )
    finish_revision(cluster, s, rev, score=0.95)
    wait_for(
        lambda: (
            n.LABEL_REVISION
            in str(
                cluster.kubectl(
                    "get", "deployment", n.serving_name(TASK), "-n", s.ns, "-o", "json", check=False
                ).stdout
            )
        ),
        timeout=30,
        what="the Triton Deployment",
    )


def finish_revision(
    cluster: ClusterHandle, s: Stack, rev: str, score: float, export: bool = True
) -> None:
    """Play one revision's trainer pods: data, candidate ``small`` scoring ``score`` (the
    LLM scores 0.96, so the gate passes from 0.91), and, when asked, the export."""
    ok = lambda stage, **kw: TrainerResult(stage=stage, ok=True, **kw).to_json()  # noqa: E731
    # The served revision's prune Job, made once it serves alone, holds a new revision's Jobs
    # while it runs (a real one takes seconds): play it first.
    pruning = cluster.get_json("jobs", "-n", s.ns, "-l", f"{n.LABEL_STAGE}={n.STAGE_PRUNE}")
    for job in pruning["items"]:
        if not (job.get("status") or {}).get("succeeded"):
            complete_job(cluster, s.ns, job["metadata"]["name"], ok("prune"))
    complete_job(
        cluster,
        s.ns,
        n.data_job_name(TASK, rev),
        ok("prepare", examples=500, train_examples=400, eval_examples=100),
    )
    complete_job(
        cluster,
        s.ns,
        n.finetune_job_name(TASK, "small", rev),
        ok(
            "finetune",
            candidate="small",
            score=score,
            llm_score=0.96,
            parameters=22_000_000,
            artifact_uri=f"pvc://{CLAIM}/{TASK}/{rev}/candidates/small",
            threshold=0.5,
        ),
    )
    if export:
        complete_job(
            cluster,
            s.ns,
            n.export_job_name(TASK, "small", rev),
            ok(
                "export",
                candidate="small",
                artifact_uri=f"pvc://{CLAIM}/{TASK}/{rev}/model_repository",
            ),
        )


@dataclass
class Traffic:
    """Agent calls at a steady rate through the gateway, recording who answered each."""

    url: str
    rate: float
    #: Calls only the LLM may answer (a strict tool): what retraining counts as new examples.
    llm_only: bool = False
    backends: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    log: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _one(self, i: int) -> None:
        body = {
            "model": TASK,
            "messages": [{"role": "user", "content": f"weather in {i}?"}],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "description": "Current weather",
                        "parameters": {"type": "object", "properties": {}},
                        **({"strict": True} if self.llm_only else {}),
                    },
                }
            ],
        }
        req = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer agent-key"},
        )
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                backend = r.headers.get("x-slm-backend", "?")
                json.loads(r.read())
            self.backends[backend] += 1
            self.log.append((time.monotonic(), backend))
        except (urllib.error.URLError, OSError) as exc:
            self.failures.append(repr(exc))

    def _loop(self, offset: int, workers: int) -> None:
        i = offset
        period = workers / self.rate
        while not self._stop.is_set():
            t0 = time.monotonic()
            self._one(i)
            i += workers
            self._stop.wait(max(0.0, period - (time.monotonic() - t0)))

    def __enter__(self) -> Traffic:
        workers = 6
        for k in range(workers):
            t = threading.Thread(target=self._loop, args=(k, workers), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def since(self, t: float) -> Counter[str]:
        return Counter(b for ts, b in self.log if ts >= t)

    def send(self, count: int, first: int = 0) -> None:
        """``count`` calls one after the other (no rate), numbered from ``first``."""
        for i in range(first, first + count):
            self._one(i)


def gateway_mode(s: Stack) -> str:
    """The mode the gateway routes the task in, from its own ``slm_gateway_route_mode``
    gauge: the task's status changes first, and the gateway follows it through its watch."""
    with urllib.request.urlopen(f"{s.gateway_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "slm_gateway_route_mode"
                and sample.value == 1
                and (labels.get("namespace"), labels.get("task")) == (s.ns, TASK)
            ):
                return labels["mode"]
    return ""


def condition(cluster: ClusterHandle, ns: str, type_: str) -> dict[str, Any]:
    for cond in (get_task(cluster, ns, TASK).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def test_slo_breach_falls_back_to_llm_and_recovers(cluster: ClusterHandle, stack: Stack) -> None:
    s = stack
    serve_task(
        cluster,
        s,
        rollout={"strategy": "direct"},
        serving={
            "minReplicas": 1,
            "maxReplicas": 4,
            "gpus": 1,
            # The fault is errors; a latency budget a loaded machine's slow window cannot
            # breach before it (one window of 1 s is enough to switch the route).
            "slo": {"p95LatencyMs": 1000, "maxErrorRate": 0.05, "targetQpsPerReplica": 100},
        },
        fallback=fallback_with({"windowSeconds": 1, "breachWindows": 1, "recoveryWindows": 3}),
    )
    with Traffic(s.gateway_url, rate=12) as traffic:
        wait_for(
            lambda: condition(cluster, s.ns, "SLOMet").get("status") == "True",
            timeout=60,
            what="SLOMet=True on healthy traffic",
        )
        assert get_task(cluster, s.ns, TASK)["status"]["route"]["mode"] == "slm"
        wait_for(
            lambda: traffic.since(time.monotonic() - 2)["slm"] > 5,
            timeout=20,
            what="the SLM to answer calls",
        )

        s.fault_file.write_text("error")
        t_fault = time.monotonic()
        first_llm = wait_for(
            lambda: next((ts for ts, b in traffic.log if ts > t_fault and b == "llm"), None),
            timeout=10,
            what="the first call answered by the LLM",
        )
        wait_for(
            lambda: condition(cluster, s.ns, "FallbackActive").get("status") == "True",
            timeout=30,
            interval=0.1,
            what="FallbackActive=True after the fault",
        )
        engaged = time.monotonic() - t_fault
        fb = condition(cluster, s.ns, "FallbackActive")
        assert fb["reason"] == "SLOBreached"
        assert condition(cluster, s.ns, "SLOMet")["reason"] == "SLOBreached"
        route = get_task(cluster, s.ns, TASK)["status"]["route"]
        assert route["mode"] == "shadow"  # the LLM answers; the SLM keeps getting copies
        print(
            f"fault -> first LLM answer {first_llm - t_fault:.2f}s; "
            f"fault -> FallbackActive {engaged:.2f}s"
        )
        # The issue's bound, two scrape intervals + 1 s, for the calls going to the LLM (the
        # gateway's per-call fallback, typically 0.25 s). Task-wide fallback (the condition)
        # measured 1.7-4.1 s here under load; its bound (8 s) leaves a loaded CI machine
        # room and still catches a fallback that waits for more windows than breachWindows.
        assert first_llm - t_fault <= 2 * SCRAPE + 1, first_llm - t_fault
        assert engaged <= 2 * SCRAPE + 1 + 2 + 3, engaged

        s.fault_file.write_text("")
        wait_for(
            lambda: condition(cluster, s.ns, "FallbackActive").get("status") == "False",
            timeout=60,
            what="recovery after the fault clears",
        )
        assert condition(cluster, s.ns, "Ready")["status"] == "True"
        time.sleep(1.5)
        wait_for(
            lambda: traffic.since(time.monotonic() - 1.5)["slm"] > 3,
            timeout=20,
            what="the SLM to answer again",
        )
    assert traffic.failures == [], traffic.failures[:5]  # no agent call ever failed
    assert traffic.backends["llm"] > 0 and traffic.backends["slm"] > 0


def test_replicas_follow_load_and_shadow_agreement_drives_promotion(
    cluster: ClusterHandle, stack: Stack
) -> None:
    s = stack
    serve_task(
        cluster,
        s,
        rollout={
            "strategy": "progressive",
            "shadowMinSamples": 20,
            "minAgreement": 0.9,
            "canaryPercent": 30,
            "canaryWindows": 2,
        },
        serving={
            "minReplicas": 1,
            "maxReplicas": 4,
            "gpus": 1,
            "scaling": {"maxStep": 1, "scaleDownCooldownSeconds": 2},
            "slo": {"p95LatencyMs": 1000, "maxErrorRate": 0.05, "targetQpsPerReplica": 4},
        },
        fallback=fallback_with({"windowSeconds": 2, "breachWindows": 2, "recoveryWindows": 2}),
    )
    modes: list[str] = []
    since: dict[str, float] = {}

    def mode() -> str:
        m = (get_task(cluster, s.ns, TASK).get("status") or {}).get("route", {}).get("mode", "")
        if not modes or modes[-1] != m:
            modes.append(m)
            since[m] = time.monotonic()
        return str(m)

    with Traffic(s.gateway_url, rate=12) as traffic:
        wait_for(
            lambda: mode() == "slm",
            timeout=120,
            interval=0.3,
            what="promotion shadow -> canary -> slm",
        )
        assert modes[-3:] == ["shadow", "canary", "slm"], modes
        # canaryWindows 2 at 2 s windows: the canary must pass two healthy windows, not one
        # (less a second for the status polling and write latency).
        canary_s = since["slm"] - since["canary"]
        assert canary_s >= 2 * 2 - 1, canary_s
        st = get_task(cluster, s.ns, TASK)["status"]
        assert "live" in st, json.dumps(st, indent=1)
        live = st["live"]
        assert live["observed"]["agreement"] >= 0.9
        # Triton's queue time per request, read from its own series (status.live.observed).
        wait_for(
            lambda: (
                (get_task(cluster, s.ns, TASK)["status"]["live"].get("observed") or {}).get(
                    "queueMs"
                )
                is not None
            ),
            timeout=30,
            what="status.live.observed.queueMs measured from Triton's series",
        )
        # In slm mode the SLM answers: the task's usage reports a non-zero SLM share.
        wait_for(
            lambda: (
                0
                < (
                    (get_task(cluster, s.ns, TASK)["status"].get("usage") or {}).get("slmShare")
                    or 0
                )
                <= 1
            ),
            timeout=30,
            what="status.usage.slmShare > 0 while the SLM serves",
        )
        # 12 calls/s at 4 per replica: scale out to 3, one step per window.
        wait_for(
            lambda: (
                cluster.get_json("deployment", n.serving_name(TASK), "-n", s.ns)["spec"]["replicas"]
                >= 3
            ),
            timeout=60,
            what="scale-up to 3 replicas",
        )
    assert traffic.failures == []
    # Traffic stopped: rate 0 -> back to minReplicas after the cool-down.
    wait_for(
        lambda: (
            cluster.get_json("deployment", n.serving_name(TASK), "-n", s.ns)["spec"]["replicas"]
            == 1
        ),
        timeout=90,
        what="scale-down to minReplicas",
    )


def test_new_calls_retrain_and_only_a_better_revision_replaces_the_served_one(
    cluster: ClusterHandle, stack: Stack
) -> None:
    """S6 on real parts: the gateway's capture counter, scraped by Prometheus, starts a new
    revision after ``minNewExamples`` calls; a retrained model that does not beat the served
    one is not deployed and counting goes on; the next, better one replaces it, with no
    failed agent call meanwhile."""
    s = stack
    serve_task(
        cluster,
        s,
        rollout={"strategy": "direct"},
        serving={
            "minReplicas": 1,
            "maxReplicas": 2,
            "gpus": 1,
            "slo": {"p95LatencyMs": 1000, "maxErrorRate": 0.05, "targetQpsPerReplica": 100},
        },
        fallback=fallback_with({"windowSeconds": 1, "breachWindows": 2, "recoveryWindows": 2}),
        retraining={"minNewExamples": 60},
    )
    rev0 = get_task(cluster, s.ns, TASK)["status"]["revision"]["active"]

    def status() -> dict[str, Any]:
        return dict(get_task(cluster, s.ns, TASK).get("status") or {})

    def training_at(epoch: int) -> str | None:
        st = status()
        if (st.get("retraining") or {}).get("epoch") != epoch:
            return None
        return str(st["revision"]["training"]) or None

    def deployed_revision() -> str:
        dep = cluster.get_json("deployment", n.serving_name(TASK), "-n", s.ns)
        return str(dep["spec"]["template"]["metadata"]["labels"][n.LABEL_REVISION])

    # Calls the LLM answers are the new examples (the SLM serves everything else here).
    with Traffic(s.gateway_url, rate=12, llm_only=True) as traffic:
        rev1 = wait_for(lambda: training_at(1), timeout=90, what="retraining epoch 1")
    failures = list(traffic.failures)
    st = status()
    assert rev1 != rev0 and st["revision"]["active"] == rev0
    assert st["retraining"]["reason"] == "EnoughNewExamples"
    captured = st["retraining"]["capturedRecords"]
    assert captured >= 60  # counted from the gateway's captured calls, through Prometheus

    # No calls now: the retrained model passes the gate but 0.93 < the served 0.95.
    finish_revision(cluster, s, rev1, score=0.93, export=False)
    wait_for(
        lambda: condition(cluster, s.ns, "Evaluated").get("reason") == c.NOT_BETTER,
        timeout=30,
        what="Evaluated=False/NotBetter for the retrained revision",
    )
    time.sleep(3)  # a few more reconciles and windows: nothing else may happen
    st = status()
    assert st["revision"] == {"active": rev0, "training": ""}
    assert st["retraining"]["epoch"] == 1
    assert deployed_revision() == rev0
    assert condition(cluster, s.ns, "Ready")["status"] == "True"
    assert not cluster.get_json(
        "jobs", "-n", s.ns, "-l", f"{n.LABEL_STAGE}=export,{n.LABEL_REVISION}={rev1}"
    )["items"]

    # Calls again: counting went on from the last trigger, so epoch 2 starts; rev1's Jobs go.
    with Traffic(s.gateway_url, rate=12, llm_only=True) as traffic:
        rev2 = wait_for(lambda: training_at(2), timeout=90, what="retraining epoch 2")
    failures += traffic.failures
    assert rev2 not in (rev0, rev1)
    assert status()["retraining"]["capturedRecords"] >= captured + 60
    with Traffic(s.gateway_url, rate=12) as traffic:
        wait_for(
            lambda: (
                not cluster.get_json("jobs", "-n", s.ns, "-l", f"{n.LABEL_REVISION}={rev1}")[
                    "items"
                ]
            ),
            timeout=30,
            what="the lost revision's Jobs to be deleted",
        )
        finish_revision(cluster, s, rev2, score=0.98)
        wait_for(lambda: deployed_revision() == rev2, timeout=60, what="rev2 deployed")
        wait_for(
            lambda: (
                status()["revision"]["active"] == rev2
                and (status().get("selectedModel") or {}).get("score") == 0.98
            ),
            timeout=30,
            what="status to show rev2 serving",
        )
        t_swap = time.monotonic()
        wait_for(lambda: traffic.since(t_swap)["slm"] > 3, timeout=20, what="the SLM to answer")
    failures += traffic.failures
    assert failures == [], failures[:5]


def test_llm_answers_on_both_sides_of_a_gateway_rollout_count_towards_retraining(
    cluster: ClusterHandle, stack: Stack
) -> None:
    """S6 across a gateway rollout, on real parts: the new gateway's counters start from zero
    in new series, and the old one's are gone from Prometheus. Counting each series' gain, the
    30 LLM answers before and the 30 after make the 50 new examples asked for. Before, the
    count went on from the total at the first reading, so only the new gateway's own 30
    counted (29 new) and the retraining never started. Calls the SLM answered are captured
    but are no new examples (curate does not train on them)."""
    s = stack
    serve_task(
        cluster,
        s,
        rollout={"strategy": "direct"},
        fallback=fallback_with({"windowSeconds": 1, "breachWindows": 2, "recoveryWindows": 2}),
        retraining={"minNewExamples": 50},
    )

    def retraining() -> dict[str, Any]:
        return dict((get_task(cluster, s.ns, TASK).get("status") or {}).get("retraining") or {})

    def captured(records: int) -> bool:
        return retraining().get("capturedRecords") == records

    # The task's status says slm first; the gateway's watch follows.
    wait_for(lambda: gateway_mode(s) == "slm", timeout=30, what="the gateway to route to the SLM")
    served = Traffic(s.gateway_url, rate=1)
    served.send(30)  # answered by the SLM
    assert served.backends == Counter({"slm": 30}), served.backends
    wait_for(lambda: captured(30), timeout=30, what="30 captured calls to be read")
    assert retraining().get("newRecords", 0) == 0
    # One LLM answer, read by a window: counting starts there.
    answered = Traffic(s.gateway_url, rate=1, llm_only=True)
    answered.send(1)
    wait_for(
        lambda: captured(31) and "newRecords" in retraining(),
        timeout=30,
        what="the first LLM answer to be read",
    )
    answered.send(30, first=1)
    wait_for(lambda: retraining().get("newRecords") == 30, timeout=30, what="30 new examples")
    assert retraining()["epoch"] == 0

    answered = Traffic(s.replace_gateway(), rate=1, llm_only=True)
    answered.send(30, first=31)
    wait_for(
        lambda: retraining().get("epoch") == 1,
        timeout=30,
        what="retraining after 60 LLM answers on both sides of the rollout",
    )
    assert retraining()["capturedRecords"] == 30  # the new gateway's own total
    assert answered.backends == Counter({"llm": 30}) and not answered.failures
