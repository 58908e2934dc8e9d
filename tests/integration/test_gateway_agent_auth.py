"""Agents authenticate to the gateway with ServiceAccount tokens, reviewed by the real API server.

The gateway runs as a child process with ``--agent-auth serviceaccount``, watching the test
namespace's AgentTask; tokens are minted by the real kube-apiserver (``kubectl create token``)
and reviewed by it (TokenReview). What a platform engineer relies on: no token, a forged or
expired one, or one minted for another audience is a 401; an agent of another namespace gets a
403; a deleted ServiceAccount loses access within the cache period; tokens never reach the
log; an API server that cannot answer means 503, never a call let through.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_gateway_live_routes import LLM_KEY, TASK, TOOLS, agenttask, create_key_secret

from slm_e2e import llm_standin
from slm_e2e.cluster import free_port
from slm_e2e.testing import ClusterHandle, wait_for
from slm_gateway.testing import GatewayProcess, start_gateway

pytestmark = pytest.mark.integration

AUDIENCE = "slm-fleet-gateway"


def call(
    gw: GatewayProcess, token: str | None, path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = {
        "model": TASK,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": TOOLS,
    }
    data = json.dumps(body).encode() if path.endswith("completions") else None
    req = urllib.request.Request(gw.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, lower(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, lower(exc.headers), json.loads(exc.read())


def lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def token(cluster: ClusterHandle, ns: str, sa: str, *audience: str) -> str:
    args = [f"--audience={a}" for a in audience]
    return cluster.kubectl("create", "token", sa, "-n", ns, "--duration=10m", *args).stdout.strip()


def metric(gw: GatewayProcess, name: str, result: str) -> float:
    text = gw.get("/metrics")[1].decode()
    found = re.search(rf'^{name}_total\{{result="{result}"\}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_agents_call_their_own_namespaces_tasks_with_a_service_account_token(
    cluster: ClusterHandle, agenttask_crd: Path, namespace: str, tmp_path: Path
) -> None:
    ns, other = namespace, f"{namespace}-other"
    cluster.kubectl("create", "namespace", other)
    standin = llm_standin.start(expect_key=LLM_KEY)
    gw: GatewayProcess | None = None
    try:
        for where, sa in ((ns, "agent"), (other, "intruder")):
            cluster.kubectl("create", "serviceaccount", sa, "-n", where)
        create_key_secret(cluster, ns)
        cluster.apply(agenttask(standin.llm_base_url), ns)
        gw = start_gateway(
            [
                "--namespace",
                ns,
                "--kubeconfig",
                cluster.kubeconfig,
                "--agent-auth",
                "serviceaccount",
                "--agent-auth-cache-seconds",
                "2",
            ],
            log_path=tmp_path / "gateway.log",
        )
        agent = token(cluster, ns, "agent", AUDIENCE)
        wait_for(lambda: call(gw, agent)[0] == 200, timeout=30, what="the task's route")

        # An agent of the namespace, with a token for the gateway: the LLM answers.
        status, headers, body = call(gw, agent)
        assert status == 200 and headers["x-slm-backend"] == "llm"
        assert standin.stats()["auth_other"] == 0  # the LLM got the task's key, not the token

        # Everyone else: told why, in OpenAI's error shape, and nothing reaches the LLM.
        answered = standin.stats()["auth_expected"]
        refused = {
            "no token": (None, 401, "invalid_api_key"),
            "a forged token": ("eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjk5OTk5OTk5OTl9.c2ln", 401, ""),
            "the API server's audience": (token(cluster, ns, "agent"), 401, "invalid_api_key"),
            "another namespace": (token(cluster, other, "intruder", AUDIENCE), 403, ""),
        }
        for what, (tok, want, code) in refused.items():
            status, headers, body = call(gw, tok)
            assert status == want, (what, status, body)
            assert body["error"]["code"] == (code or body["error"]["code"]), what
            if want == 401:
                assert headers["www-authenticate"].startswith("Bearer"), what
        assert body["error"]["code"] == "permission_denied"
        assert f"ServiceAccount {other}/intruder may not call task" in body["error"]["message"]
        assert standin.stats()["auth_expected"] == answered

        # The model list: only with a token, and only the caller's tasks.
        assert call(gw, None, "/v1/models")[0] == 401
        assert [m["id"] for m in call(gw, agent, "/v1/models")[2]["data"]] == [TASK]
        intruder = token(cluster, other, "intruder", AUDIENCE)
        assert call(gw, intruder, "/v1/models")[2]["data"] == []

        # Reviews are cached per token: ten calls, at most a couple of TokenReviews.
        reviews = metric(gw, "slm_gateway_token_reviews", "authenticated")
        for _ in range(10):
            assert call(gw, agent)[0] == 200
        assert metric(gw, "slm_gateway_token_reviews", "authenticated") - reviews <= 2
        assert metric(gw, "slm_gateway_agent_auth", "forbidden") >= 1
        assert metric(gw, "slm_gateway_agent_auth", "missing") >= 2

        # The agent's ServiceAccount is deleted: its token stops working within the cache
        # period (2 s here) plus the API server's own token cache (10 s), with no restart.
        cluster.kubectl("delete", "serviceaccount", "agent", "-n", ns)
        deleted = time.monotonic()
        wait_for(lambda: call(gw, agent)[0] == 401, timeout=40, what="the token to be refused")
        print(f"\ndeleted ServiceAccount refused after {time.monotonic() - deleted:.1f} s")
    finally:
        if gw is not None:
            gw.stop()
        standin.stop()
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
    log = (tmp_path / "gateway.log").read_text()
    assert agent not in log and agent[-40:] not in log
    assert intruder not in log


def test_an_api_server_that_cannot_review_tokens_means_503_not_a_call_let_through(
    cluster: ClusterHandle, tmp_path: Path
) -> None:
    """Routes from a file, tokens reviewed by an API server that is not there (a dead port):
    every call is refused with a 503 the SDKs retry, and the LLM never hears of it."""
    standin = llm_standin.start(expect_key=LLM_KEY)
    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text(yaml.safe_dump(kubeconfig))
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {"tasks": {TASK: {"llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}}}
        )
    )
    gw = start_gateway(
        [
            "--routes",
            str(routes),
            "--kubeconfig",
            str(dead),
            "--agent-auth",
            "serviceaccount",
        ],
        env={"SLM_GATEWAY_LLM_API_KEY": LLM_KEY},
        log_path=tmp_path / "gateway.log",
    )
    try:
        status, headers, body = call(gw, "some-agent-token")
        assert status == 503
        assert headers["retry-after"] == "1"
        assert body["error"]["code"] == "auth_unavailable"
        assert standin.stats()["auth_expected"] == 0
        assert metric(gw, "slm_gateway_agent_auth", "unavailable") == 1
    finally:
        gw.stop()
        standin.stop()
    log = (tmp_path / "gateway.log").read_text()
    assert "agent tokens cannot be reviewed" in log and "some-agent-token" not in log
