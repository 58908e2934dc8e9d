"""Agents authenticate to the gateway with ServiceAccount tokens, reviewed by the real API server.

The gateway runs as a child process with ``--agent-auth serviceaccount``, watching the test
namespace's AgentTask; tokens are minted by the real kube-apiserver (``kubectl create token``)
and reviewed by it (TokenReview). What a platform engineer relies on: no token, a forged or
expired one, or one minted for another audience is a 401; an agent of another namespace gets a
403; a deleted ServiceAccount loses access within the cache period; tokens never reach the
log; an API server that cannot answer means 503, never a call let through.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_gateway_live_routes import (
    LLM_KEY,
    TASK,
    TOOLS,
    agenttask,
    create_key_secret,
    llm_host,
)

from slm_e2e import llm_standin
from slm_e2e.testing import ClusterHandle, wait_for
from slm_gateway.testing import GatewayProcess, start_gateway

pytestmark = pytest.mark.integration

AUDIENCE = "slm-fleet-gateway"


def call(
    gw: GatewayProcess,
    token: str | None,
    path: str = "/v1/chat/completions",
    *more: str,
    model: str = TASK,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One request; ``more`` are further tokens sent in Authorization headers of their own."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": TOOLS,
    }
    data = json.dumps(body).encode() if path.endswith("completions") else None
    conn = http.client.HTTPConnection(gw.url.split("//")[1], timeout=30)
    conn.putrequest("POST" if data else "GET", path)
    conn.putheader("Content-Type", "application/json")
    for tok in (token, *more) if token is not None else more:
        conn.putheader("Authorization", f"Bearer {tok}")
    conn.putheader("Content-Length", str(len(data or b"")))
    conn.endheaders(data)
    resp = conn.getresponse()
    status, headers, raw = resp.status, lower(resp.headers), resp.read()
    conn.close()
    return status, headers, json.loads(raw)


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
        create_key_secret(cluster, ns, llm_host(standin))
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
            # The intruder names the task with its namespace: a bare name means a task of
            # its own namespace, and is a 404 (the next assertions after the loop).
            status, headers, body = call(gw, tok, model=f"{ns}/{TASK}")
            assert status == want, (what, status, body)
            assert body["error"]["code"] == (code or body["error"]["code"]), what
            if want == 401:
                assert headers["www-authenticate"].startswith("Bearer"), what
        assert body["error"]["code"] == "permission_denied"
        assert f"ServiceAccount {other}/intruder may not call task" in body["error"]["message"]
        status, _, body = call(gw, refused["another namespace"][0])
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert f"'{ns}'" not in body["error"]["message"]  # the task's namespace stays unnamed
        assert standin.stats()["auth_expected"] == answered

        # Two Authorization headers are refused on both paths, whichever comes first.
        for pair in ((agent, "forged.x.y"), ("forged.x.y", agent)):
            assert call(gw, pair[0], "/v1/chat/completions", pair[1])[0] == 401
            assert call(gw, pair[0], "/v1/models", pair[1])[0] == 401
        # Garbage and a token of megabytes: a 401 without asking the API server (it answered
        # a 3.5 MB review with a 413, which read as an outage: a 503 and a false alert).
        asked = sum(metric(gw, "slm_gateway_token_reviews", r) for r in ("rejected", "failed"))
        for junk in ("sk-proj-0123456789", "x" * 200, "a." + "b" * 4_000_000 + ".c"):
            assert call(gw, junk)[0] == 401
        assert (
            sum(metric(gw, "slm_gateway_token_reviews", r) for r in ("rejected", "failed")) == asked
        )

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


def blackhole() -> socket.socket:
    """A port that takes TCP connections and never says a word: an API server that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    held: list[socket.socket] = []
    threading.Thread(
        target=lambda: held.extend(iter(lambda: sock.accept()[0], None)), daemon=True
    ).start()
    return sock


def test_an_api_server_that_cannot_review_tokens_means_503_not_a_call_let_through(
    cluster: ClusterHandle, tmp_path: Path
) -> None:
    """Routes from a file, tokens reviewed by an API server that hangs: every call is refused
    with a 503 the SDKs retry, soon (not after urllib3's retries, not queued behind each
    other's reviews), and the LLM never hears of it."""
    standin = llm_standin.start(expect_key=LLM_KEY)
    hole = blackhole()
    gw: GatewayProcess | None = None
    try:  # from here on, whatever fails stops the stand-in (its own session outlives pytest)
        kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
        kubeconfig["clusters"][0]["cluster"]["server"] = (
            f"https://127.0.0.1:{hole.getsockname()[1]}"
        )
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
        # Shaped like tokens for the gateway's audience, so that only the API server can judge.
        tokens = [
            ".".join(
                base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
                for part in ({"alg": "RS256"}, {"aud": [AUDIENCE], "exp": 4_000_000_000, "n": i})
            )
            + ".c2ln"
            for i in range(12)
        ]
        started = time.monotonic()
        status, headers, body = call(gw, tokens[0])
        first = time.monotonic() - started
        assert status == 503
        assert headers["retry-after"] == "1"
        assert body["error"]["code"] == "auth_unavailable"
        # Twelve agents at once, each with its own token: all told within seconds.
        time.sleep(1.2)
        started = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda t: call(gw, t)[0], tokens))
        together = time.monotonic() - started
        assert statuses == [503] * 12
        assert standin.stats()["auth_expected"] == 0
        assert metric(gw, "slm_gateway_agent_auth", "unavailable") == 13
    finally:
        if gw is not None:
            gw.stop()
        standin.stop()
        hole.close()
    print(f"\n503 after {first:.1f} s; 12 concurrent agents all answered in {together:.1f} s")
    # One 2 s connect timeout each, side by side: a review retried or the twelve done one
    # after another would take 6 s or 24 s; the margin is for a loaded 2-core machine.
    assert first < 6 and together < 8
    log = (tmp_path / "gateway.log").read_text()
    assert log.count("agent tokens cannot be reviewed") == 1
    assert "Retrying" not in log and tokens[0] not in log


def forged_tokens(n: int) -> list[str]:
    """Shaped like ServiceAccount tokens for the gateway (its audience alone, a future expiry)
    with made-up signatures: only a TokenReview can refuse them, and none repeats."""

    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    claims = {"aud": [AUDIENCE], "exp": int(time.time()) + 3600}
    return [
        f"{part({'alg': 'RS256'})}.{part({**claims, 'n': i})}.{part({'sig': uuid.uuid4().hex})}"
        for i in range(n)
    ]


def test_forged_tokens_get_429s_past_a_review_rate_and_agents_are_still_served(
    cluster: ClusterHandle, agenttask_crd: Path, namespace: str, tmp_path: Path
) -> None:
    """2,000 forged tokens made 2,000 TokenReviews in 4.4 s (the refusal cache never matches
    a token that never repeats), and an API server throttling the gateway then failed real
    agents with 503s. With the defaults the gateway reviews at most 100 tokens never found
    valid a second after a burst of 500; the other calls get a 429 the SDKs retry. An agent
    whose token is cached is served all along, and a new agent gets through as soon as there
    is room."""
    ns = namespace
    standin = llm_standin.start(expect_key=LLM_KEY)
    gw: GatewayProcess | None = None
    stop = threading.Event()
    try:
        cluster.kubectl("create", "serviceaccount", "agent", "-n", ns)
        create_key_secret(cluster, ns, llm_host(standin))
        cluster.apply(agenttask(standin.llm_base_url), ns)
        gw = start_gateway(
            [
                "--namespace",
                ns,
                "--kubeconfig",
                cluster.kubeconfig,
                "--agent-auth",
                "serviceaccount",
            ],
            log_path=tmp_path / "gateway.log",
        )
        agent, newcomer = (token(cluster, ns, "agent", AUDIENCE) for _ in range(2))
        wait_for(lambda: call(gw, agent)[0] == 200, timeout=30, what="the task's route")
        assert gw is not None

        def reviews() -> float:
            return sum(
                metric(gw, "slm_gateway_token_reviews", r)
                for r in ("authenticated", "rejected", "failed")
            )

        answers: list[tuple[int, str, str]] = []

        def flood(tokens: list[str]) -> None:
            for tok in tokens:
                if stop.is_set():
                    return
                status, headers, body = call(gw, tok)
                answers.append((status, headers.get("retry-after", ""), body["error"]["code"]))

        forged = [forged_tokens(2000) for _ in range(8)]
        before, started = reviews(), time.monotonic()
        agent_statuses, newcomer_tries = [], 0
        with ThreadPoolExecutor(8) as pool:
            floods = [pool.submit(flood, tokens) for tokens in forged]
            while time.monotonic() - started < 4:
                agent_statuses.append(call(gw, agent)[0])
                if newcomer_tries >= 0:
                    newcomer_tries += 1
                    if call(gw, newcomer)[0] == 200:
                        newcomer_tries = -newcomer_tries  # through, after that many tries
                time.sleep(0.05)
            stop.set()
            for f in floods:
                f.result()
        elapsed = time.monotonic() - started
        reviewed = reviews() - before

        limited = [a for a in answers if a[0] == 429]
        print(
            f"\n{len(answers)} forged calls in {elapsed:.1f} s: {reviewed:.0f} TokenReviews, "
            f"{len(limited)} answered 429; the new agent "
            + (f"got through on try {-newcomer_tries}" if newcomer_tries < 0 else "waited")
        )
        assert reviewed <= 500 + 100 * elapsed + 1
        assert len(limited) > len(answers) / 2
        assert set(limited) == {(429, "1", "auth_rate_limited")}
        assert {a[0] for a in answers} == {401, 429}
        assert agent_statuses == [200] * len(agent_statuses)
        # No backoff outlives the flood: a new token is reviewed at once.
        assert newcomer_tries < 0 or call(gw, newcomer)[0] == 200
        assert metric(gw, "slm_gateway_agent_auth", "rate_limited") == len(limited)
        assert metric(gw, "slm_gateway_token_reviews", "failed") == 0
    finally:
        stop.set()
        if gw is not None:
            gw.stop()
        standin.stop()
