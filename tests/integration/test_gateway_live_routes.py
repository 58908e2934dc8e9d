"""The gateway follows an AgentTask's status on the real control plane, live, with no restart.

Real servers on 127.0.0.1: the local kube-apiserver (``cluster``), the real ``tritonserver``
from nvidia-pytriton serving the fault-injecting test model under the task's name, the LLM
stand-in, and the gateway as a child process watching the test namespace. The test plays the
operator by patching ``status.route`` (``kubectl patch --subresource=status``), and checks
what an agent sees: served by the LLM with the key from the task's Secret, then by the SLM on
Triton once the route says ``slm``, back on the LLM with no failed call when Triton fails,
and a 404 once the task is deleted; all from the same gateway process.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_contract import CallRecord
from slm_e2e import llm_standin
from slm_e2e.testing import ClusterHandle, wait_for
from slm_gateway.testing import GatewayProcess, start_gateway

pytestmark = pytest.mark.integration

TASK = "weather"
LLM_HOSTS = "slmfleet.dev/llm-hosts"
LLM_KEY = "sk-live-FROMTHESECRET-0123456789abcdef"
FAULTY = Path(__file__).resolve().parents[1] / "data" / "triton_faulty" / "faulty"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


def agenttask(llm_base_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "slmfleet.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": TASK},
        "spec": {
            "description": "Pick the weather tool",
            "taskType": "tool-call",
            "dataset": {"uri": "pvc://slm-work/calls/weather"},
            "candidates": [{"name": "small", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}],
            "storage": {"claimName": "slm-work"},
            "evaluation": {"metric": "tool-call-ast", "gate": {"minScore": 0.8}},
            "fallback": {
                "llm": {
                    "baseURL": llm_base_url,
                    "model": "gpt-4o",
                    "apiKeySecretRef": {"name": "llm-key"},
                }
            },
        },
    }


@pytest.fixture
def triton(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Real tritonserver serving the fault-injecting model as the task's model."""
    pytest.importorskip("pytriton")
    from slm_e2e.triton import start_triton

    repo = tmp_path / "repo"
    shutil.copytree(FAULTY, repo / TASK)
    config = repo / TASK / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "faulty"', f'name: "{TASK}"'))
    flag = tmp_path / "fault"
    flag.write_text("")
    with start_triton(repo, env={"SLM_FAULT_FILE": str(flag)}) as server:
        yield f"http://127.0.0.1:{server.http_port}", flag
    # the temporary directory start_triton made (backends copy, log) is gone with the server
    assert not server.workdir.exists()


def route_problems(gw: GatewayProcess) -> set[tuple[str, str, str]]:
    """(namespace, task, reason) of each ``slm_gateway_route_problem`` series at 1."""
    with urllib.request.urlopen(gw.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = set()
    for line in text.splitlines():
        if line.startswith("slm_gateway_route_problem{") and line.endswith(" 1.0"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out.add((labels["namespace"], labels["task"], labels["reason"]))
    return out


def chat(gw: GatewayProcess) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {
        "model": TASK,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": TOOLS,
    }
    req = urllib.request.Request(
        gw.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer agent-token"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def create_key_secret(cluster: ClusterHandle, ns: str, allow: str | None) -> None:
    """The Secret the test task's spec.fallback.llm.apiKeySecretRef names, holding LLM_KEY,
    whose key may go to ``allow`` (its slmfleet.dev/llm-hosts annotation, set as the docs
    say; None: not annotated, so its key goes nowhere)."""
    cluster.kubectl(
        "create", "secret", "generic", "llm-key", "-n", ns, f"--from-literal=api-key={LLM_KEY}"
    )
    if allow is not None:
        cluster.kubectl("annotate", "secret", "llm-key", "-n", ns, f"{LLM_HOSTS}={allow}")


def llm_host(standin: llm_standin.StandIn) -> str:
    """What a Secret's slmfleet.dev/llm-hosts must list for its key to reach ``standin``."""
    return f"127.0.0.1:{standin.port}"


def patch_route(cluster: ClusterHandle, ns: str, route: dict[str, Any]) -> None:
    cluster.kubectl(
        "patch",
        "agenttask",
        TASK,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"route": route}}),
    )


def test_route_changes_apply_live_from_agenttask_status(
    cluster: ClusterHandle,
    agenttask_crd: Path,
    namespace: str,
    triton: tuple[str, Path],
    tmp_path: Path,
) -> None:
    slm_endpoint, fault = triton
    standin = llm_standin.start(expect_key=LLM_KEY)
    gw: GatewayProcess | None = None
    try:
        create_key_secret(cluster, namespace, llm_host(standin))
        cluster.apply(agenttask(standin.llm_base_url), namespace)
        gw = start_gateway(
            [
                "--namespace",
                namespace,
                "--kubeconfig",
                cluster.kubeconfig,
                "--capture",
                str(tmp_path / "calls"),
                "--breaker-failures",
                "100",
            ],
            log_path=tmp_path / "gateway.log",
        )
        pid = gw.proc.pid

        # 1. No status yet: the spec's LLM answers, with the key read from the Secret.
        status, headers, _ = wait_for(
            lambda: (r := chat(gw)) and r[0] == 200 and r, timeout=30, what="the task's route"
        )
        assert headers["x-slm-backend"] == "llm"
        assert standin.stats()["auth_expected"] >= 1 and standin.stats()["auth_other"] == 0

        # 2. The operator promotes the SLM: the next calls go to Triton, no restart.
        patch_route(
            cluster,
            namespace,
            {
                "mode": "slm",
                "slmEndpoint": slm_endpoint,
                "confidenceThreshold": 0.5,
                "reason": "Promoted",
            },
        )
        t0 = time.monotonic()
        wait_for(
            lambda: chat(gw)[1].get("x-slm-backend") == "slm", timeout=30, what="the SLM route"
        )
        switch_s = time.monotonic() - t0
        status, headers, body = chat(gw)
        assert status == 200 and headers["x-slm-backend"] == "slm"
        call = body["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        models = json.loads(gw.get("/v1/models")[1])["data"]
        assert models[0]["id"] == TASK and models[0]["route"]["mode"] == "slm"

        # 3. Triton fails: every call is still answered, by the LLM, saying why.
        fault.write_text("error")
        results = [chat(gw) for _ in range(5)]
        assert [r[0] for r in results] == [200] * 5
        assert {r[1]["x-slm-backend"] for r in results} == {"llm"}
        assert {r[1]["x-slm-fallback-reason"] for r in results} == {"slm_error"}
        fault.write_text("")

        # 4. Fallback turned on task-wide: back to the LLM without a fallback reason.
        patch_route(cluster, namespace, {"mode": "llm", "reason": "SLOBreached"})
        wait_for(
            lambda: (
                (r := chat(gw))[1].get("x-slm-backend") == "llm"
                and "x-slm-fallback-reason" not in r[1]
            ),
            timeout=30,
            what="the LLM route",
        )

        # 5. The task is deleted: its model is gone.
        cluster.kubectl("delete", "agenttask", TASK, "-n", namespace)
        status, _, body = wait_for(
            lambda: (r := chat(gw))[0] == 404 and r, timeout=30, what="the route to disappear"
        )
        assert body["error"]["code"] == "model_not_found"
        assert gw.proc.pid == pid and gw.proc.poll() is None
        print(f"\nroute switch llm -> slm seen by the gateway after {switch_s * 1000:.0f} ms")
    finally:
        if gw is not None:
            gw.stop()
        standin.stop()

    log = (tmp_path / "gateway.log").read_text()
    assert LLM_KEY not in log and "agent-token" not in log
    lines = [
        line
        for shard in sorted((tmp_path / "calls").rglob("*.jsonl"))
        for line in shard.read_text().splitlines()
    ]
    records = [CallRecord.from_json(line) for line in lines]
    assert {r.backend for r in records} == {"llm", "slm"}
    assert {r.fallback_reason for r in records} >= {"", "slm_error"}
    assert all(LLM_KEY not in line and "agent-token" not in line for line in lines)


def test_llm_key_follows_its_secret_live(
    cluster: ClusterHandle, agenttask_crd: Path, namespace: str, tmp_path: Path
) -> None:
    """The LLM key follows the task's Secret with no restart and no resync (the default
    --resync-seconds is 5 minutes): a Secret created after its task (``kubectl apply -f
    dir/`` applies agenttask.yaml first), then annotated with the hosts its key may go to,
    then rotated, then deleted. The gateway may only ``get`` that Secret, so it cannot watch
    it; it reads it again every few seconds. Until its owner lets the key go to the task's
    LLM host, the key is sent nowhere: anyone who may edit the task chooses its LLM URL."""
    rotated = "sk-live-ROTATED-fedcba9876543210"
    standin = llm_standin.start(expect_key=rotated)
    gw: GatewayProcess | None = None

    def calls_with(auth: str) -> Any:
        before = standin.stats()[auth]
        status, _, _ = chat(gw)  # type: ignore[arg-type]
        return status == 200 and standin.stats()[auth] > before

    try:
        cluster.apply(agenttask(standin.llm_base_url), namespace)
        gw = start_gateway(
            ["--namespace", namespace, "--kubeconfig", cluster.kubeconfig],
            log_path=tmp_path / "gateway.log",
        )
        pid = gw.proc.pid
        # 1. No Secret yet: the task is served, without a key, and /metrics says so.
        assert calls_with("auth_missing")
        assert route_problems(gw) == {(namespace, TASK, "llm_key_missing")}

        # 2. The Secret appears, not annotated: its key goes nowhere. The LLM is not called,
        #    and the agent is told which Secret, which host and what to do.
        create_key_secret(cluster, namespace, allow=None)
        _, _, body = wait_for(
            lambda: (r := chat(gw))[0] == 502 and r,  # type: ignore[arg-type]
            timeout=30,
            what="the unannotated Secret to be read",
        )
        host = llm_host(standin)
        assert body["error"]["code"] == "llm_host_not_allowed"
        assert f"Secret {namespace}/llm-key" in body["error"]["message"]
        assert f"add {host} to the Secret's {LLM_HOSTS} annotation" in body["error"]["message"]
        calls = standin.stats()["llm_calls"]
        assert chat(gw)[0] == 502  # type: ignore[arg-type]
        assert standin.stats()["llm_calls"] == calls
        assert route_problems(gw) == {(namespace, TASK, "llm_host_not_allowed")}

        # 3. Its owner lets the key go to the stand-in: it is sent (LLM_KEY, not the one the
        #    stand-in expects).
        cluster.kubectl(
            "annotate", "secret", "llm-key", "-n", namespace, f"{LLM_HOSTS}=api.openai.com,{host}"
        )
        wait_for(lambda: calls_with("auth_other"), timeout=30, what="the Secret's key")
        assert route_problems(gw) == set()

        # 4. The key is rotated in place: the new key is sent.
        cluster.kubectl(
            "patch",
            "secret",
            "llm-key",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"stringData": {"api-key": rotated}}),
        )
        wait_for(lambda: calls_with("auth_expected"), timeout=30, what="the rotated key")

        # 5. The Secret is deleted: no key is sent any more.
        cluster.kubectl("delete", "secret", "llm-key", "-n", namespace)
        wait_for(lambda: calls_with("auth_missing"), timeout=30, what="the key to be dropped")
        assert gw.proc.pid == pid and gw.proc.poll() is None
    finally:
        if gw is not None:
            gw.stop()
        standin.stop()

    log = (tmp_path / "gateway.log").read_text()
    assert LLM_KEY not in log and rotated not in log


def service_account_kubeconfig(cluster: ClusterHandle, ns: str, sa: str, path: Path) -> str:
    """A kubeconfig that authenticates as ServiceAccount ``sa`` of ``ns``, as in a pod."""
    cluster.kubectl("create", "serviceaccount", sa, "-n", ns)
    token = cluster.kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = {"cluster": admin["clusters"][0]["name"], "user": sa, "namespace": ns}
    kc = {
        **admin,
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": admin["current-context"], "context": context}],
    }
    path.write_text(yaml.safe_dump(kc))
    return str(path)


def test_gateway_without_rbac_waits_unready_then_serves_once_granted(
    cluster: ClusterHandle, agenttask_crd: Path, namespace: str, tmp_path: Path
) -> None:
    """With no RBAC yet (the Role applied after the Deployment), the gateway neither crashes
    nor turns ready: it says what is missing and retries, backing off; once the Role exists
    it lists the tasks, turns ready and sends the key from the Secret, in the same process."""
    standin = llm_standin.start(expect_key=LLM_KEY)
    log_path = tmp_path / "gateway.log"
    gw: GatewayProcess | None = None
    try:
        kubeconfig = service_account_kubeconfig(
            cluster, namespace, "gw", tmp_path / "gw.kubeconfig"
        )
        create_key_secret(cluster, namespace, llm_host(standin))
        cluster.apply(agenttask(standin.llm_base_url), namespace)
        with ThreadPoolExecutor(1) as pool:
            starting = pool.submit(
                start_gateway,
                ["--namespace", namespace, "--kubeconfig", kubeconfig],
                log_path=log_path,
                timeout=120,
            )
            wait_for(
                lambda: log_path.exists() and "retrying in 2s" in log_path.read_text(),
                timeout=60,
                what="the gateway to retry the forbidden list",
            )
            assert not starting.done()  # /readyz is still 503
            assert "RBAC" in log_path.read_text()
            cluster.apply(
                [
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "Role",
                        "metadata": {"name": "gw"},
                        "rules": [
                            {
                                "apiGroups": ["slmfleet.dev"],
                                "resources": ["agenttasks"],
                                "verbs": ["get", "list", "watch"],
                            },
                            {
                                "apiGroups": [""],
                                "resources": ["secrets"],
                                "verbs": ["get"],
                                "resourceNames": ["llm-key"],
                            },
                        ],
                    },
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "RoleBinding",
                        "metadata": {"name": "gw"},
                        "roleRef": {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "Role",
                            "name": "gw",
                        },
                        "subjects": [
                            {"kind": "ServiceAccount", "name": "gw", "namespace": namespace}
                        ],
                    },
                ],
                namespace,
            )
            gw = starting.result(timeout=120)
        status, headers, _ = chat(gw)
        assert status == 200 and headers["x-slm-backend"] == "llm"
        assert standin.stats()["auth_expected"] == 1
    finally:
        if gw is not None:
            gw.stop()
        standin.stop()
    assert LLM_KEY not in log_path.read_text()
