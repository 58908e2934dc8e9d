"""The gateway app against a real upstream process (the LLM/Triton stand-in on 127.0.0.1).

Requests go through Starlette's TestClient into the real ASGI app; the app's own aiohttp
session calls the stand-in over real HTTP. Each test states one behaviour an agent or an
operator would notice: who answered, why it fell back, what error body came back.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from starlette.testclient import TestClient

from slm_contract import CallRecord
from slm_e2e import llm_standin
from slm_gateway.app import create_app
from slm_gateway.auth import TokenReviewer, token_claims
from slm_gateway.capture import CaptureConfig
from slm_gateway.config import GatewayConfig, config_from_args
from slm_gateway.decide import canary_bucket
from slm_gateway.routes import Route, RouteError, RouteTable

KEY = "sk-test-0123456789abcdef"
AGENT_TOKEN = "Bearer agent-own-token-should-never-travel"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


@pytest.fixture(scope="module")
def standin() -> Iterator[llm_standin.StandIn]:
    with llm_standin.start(expect_key=KEY) as s:
        yield s


@pytest.fixture(autouse=True)
def reset(standin: llm_standin.StandIn) -> None:
    standin.control(**llm_standin.SETTINGS, reset_stats=True)


def route(standin: llm_standin.StandIn, task: str = "weather", **kw: Any) -> Route:
    fields: dict[str, Any] = {
        "task": task,
        "mode": "llm",
        "llm_base_url": standin.llm_base_url,
        "llm_model": "gpt-4o",
        "llm_api_key": KEY,
    }
    if kw.get("mode", "llm") != "llm":
        fields["slm_endpoint"] = standin.slm_endpoint
    fields.update(kw)
    return Route(**fields)


def client(*routes: Route, **cfg: Any) -> TestClient:
    table = RouteTable()
    table.replace_all(routes)
    config = GatewayConfig(**{"breaker_failures": 3, "breaker_cooldown_s": 0.3, **cfg})
    return TestClient(create_app(config, table), raise_server_exceptions=False)


def chat(c: TestClient, model: str = "weather", **extra: Any) -> Any:
    headers = {"Authorization": AGENT_TOKEN, **extra.pop("headers", {})}
    body = {"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    body.update(extra)
    return c.post("/v1/chat/completions", content=orjson.dumps(body), headers=headers)


def metric(c: TestClient, name: str, **labels: str) -> float:
    text = c.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def is_error_body(resp: Any, code: str | None = None) -> bool:
    err = resp.json()["error"]
    return set(err) == {"message", "type", "param", "code"} and (
        code is None or err["code"] == code
    )


def test_llm_mode_uses_the_tasks_key_and_never_the_agents(standin: llm_standin.StandIn) -> None:
    with client(route(standin)) as c:
        r = chat(c, tools=TOOLS)
    assert r.status_code == 200
    assert r.headers["x-slm-backend"] == "llm"
    body = r.json()
    assert body["model"] == "gpt-4o"  # the LLM got its own model name, not the task's
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    stats = standin.stats()
    assert (stats["auth_expected"], stats["auth_other"], stats["auth_missing"]) == (1, 0, 0)


def test_x_agent_task_header_picks_the_task(standin: llm_standin.StandIn) -> None:
    with client(route(standin, "extract")) as c:
        r = chat(c, model="gpt-4o", headers={"X-Agent-Task": "extract"})
        assert r.status_code == 200
        assert metric(c, "slm_gateway_requests_total", task="extract") == 1


def test_slm_mode_is_served_by_triton_without_credentials(standin: llm_standin.StandIn) -> None:
    with client(route(standin, mode="slm")) as c:
        r = chat(c, tools=TOOLS)
    assert r.status_code == 200 and r.headers["x-slm-backend"] == "slm"
    msg = r.json()["choices"][0]["message"]
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
    stats = standin.stats()
    assert (stats["slm_calls"], stats["llm_calls"], stats["slm_auth_seen"]) == (1, 0, 0)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"slm_fail": True}, "slm_error"),
        ({"slm_latency_ms": 3000}, "slm_timeout"),
        ({"slm_confidence": 0.2}, "low_confidence"),
        ({"slm_defer": True}, "defer"),
    ],
)
def test_per_request_fallback_to_the_llm(
    standin: llm_standin.StandIn, settings: dict[str, Any], reason: str
) -> None:
    standin.control(**settings)
    with client(route(standin, mode="slm", confidence_threshold=0.5, slm_timeout_s=0.1)) as c:
        t = time.monotonic()
        r = chat(c)
        elapsed = time.monotonic() - t
        assert r.status_code == 200
        assert r.headers["x-slm-backend"] == "llm"
        assert r.headers["x-slm-fallback-reason"] == reason
        assert metric(c, "slm_gateway_fallbacks_total", task="weather", reason=reason) == 1
    assert elapsed < 1.5  # the SLM's 0.1 s budget, never its 3 s latency
    assert standin.stats()["llm_calls"] == 1


def test_circuit_opens_skips_the_slm_then_probes_and_recovers(
    standin: llm_standin.StandIn,
) -> None:
    standin.control(slm_fail=True)
    # A cooldown the three skipped calls (real HTTP to the LLM stand-in) fit in on a loaded
    # machine: at 0.3 s a slow one let a half-open probe out early.
    with client(route(standin, mode="slm"), breaker_cooldown_s=2.0) as c:
        reasons = [chat(c).headers["x-slm-fallback-reason"] for _ in range(6)]
        assert reasons == ["slm_error"] * 3 + ["circuit_open"] * 3
        assert standin.stats()["slm_calls"] == 3  # skipped while open
        assert metric(c, "slm_gateway_circuit_state", backend="slm") == 2
        standin.control(slm_fail=False)
        time.sleep(2.05)
        r = chat(c)  # the half-open probe succeeds
        assert r.headers["x-slm-backend"] == "slm"
        assert metric(c, "slm_gateway_circuit_state", backend="slm") == 0
        assert chat(c).headers["x-slm-backend"] == "slm"


def deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("mode", "stream", "where"),
    [
        ("llm", False, "extra"),
        ("llm", True, "extra"),
        ("slm", False, "content"),
        ("shadow", False, "content"),
    ],
)
def test_a_body_too_deep_to_write_again_is_a_400_not_a_500(
    standin: llm_standin.StandIn, mode: str, stream: bool, where: str
) -> None:
    """orjson reads JSON nested 1024 levels deep but writes only 254, and the gateway writes
    the request again (the LLM's model name, the SLM's infer request). Such a body is the
    agent's error: a 400 naming it, no upstream call, no breaker probe held."""
    message: dict[str, Any] = {"role": "user", "content": "Weather in Paris?"}
    body: dict[str, Any] = {"model": "weather", "messages": [message], "stream": stream}
    if where == "extra":
        body["x_vendor"] = deep(300)
    else:
        message["content"] = [{"type": "text", "text": "Weather?", "x": deep(300)}]
    raw = json.dumps(body).encode()
    with client(route(standin, mode=mode)) as c:
        r = c.post("/v1/chat/completions", content=raw, headers={"Authorization": AGENT_TOKEN})
        assert r.status_code == 400, r.text
        assert is_error_body(r, "invalid_json")
        assert "levels deep" in r.json()["error"]["message"]
        assert chat(c).status_code == 200  # the gateway and its circuits are unharmed
        assert metric(c, "slm_gateway_circuit_state") == 0
    stats = standin.stats()
    assert stats["llm_calls"] + stats["slm_calls"] == (2 if mode == "shadow" else 1)


def test_slm_tool_call_ids_are_unique_across_answers(standin: llm_standin.StandIn) -> None:
    """The SLM answers ``call_0`` every time; an agent keeps every turn's calls in one
    conversation and matches results by id, so each answer's calls get ids of their own."""
    with client(route(standin, mode="slm")) as c:
        ids = []
        for _ in range(3):
            r = chat(c, tools=TOOLS)
            assert r.headers["x-slm-backend"] == "slm"
            ids += [t["id"] for t in r.json()["choices"][0]["message"]["tool_calls"]]
    assert len(set(ids)) == 3 and all(i.startswith("call_") for i in ids)


def test_a_fallback_after_a_slow_slm_sees_the_llm_cooldown_end(
    standin: llm_standin.StandIn,
) -> None:
    """The LLM's circuit is open, and its cooldown ends while the SLM is being tried: the
    fallback probes the LLM (and is answered) instead of getting a 503 computed from the time
    the call arrived."""
    shared_llm = route(standin, "other")
    table = RouteTable()
    table.replace_all([shared_llm, route(standin, mode="slm", slm_timeout_s=0.5)])
    config = GatewayConfig(breaker_failures=1, breaker_cooldown_s=0.3)
    with TestClient(create_app(config, table), raise_server_exceptions=False) as c:
        standin.control(llm_error_every=1)
        assert chat(c, model="other").status_code == 502  # the LLM's circuit opens
        assert chat(c, model="other").status_code == 503
        standin.control(llm_error_every=0, slm_latency_ms=800)
        r = chat(c)  # the SLM times out after 0.5 s, past the LLM's 0.3 s cooldown
        assert r.status_code == 200, r.text
        assert r.headers["x-slm-fallback-reason"] == "slm_timeout"


def test_a_deleted_tasks_open_circuit_leaves_the_metrics(standin: llm_standin.StandIn) -> None:
    """The circuit of an SLM no route uses any more (its task was deleted while the SLM was
    failing) must not stay at 2 on /metrics: SlmFleetSlmCircuitOpen would fire until the
    gateway restarts. Circuits are per task: the deleted task's go, a task still routed keeps
    its own."""
    standin.control(slm_fail=True)
    table = RouteTable()
    kept = route(standin, "other", mode="llm")
    table.replace_all([route(standin, mode="slm"), kept])
    config = GatewayConfig(breaker_failures=3, breaker_cooldown_s=30)
    with TestClient(create_app(config, table), raise_server_exceptions=False) as c:
        for _ in range(3):
            chat(c)
        assert chat(c, "other").status_code == 200
        assert metric(c, "slm_gateway_circuit_state", backend="slm") == 2
        table.replace_all([kept])
        text = c.get("/metrics").text
        circuits = [s for s in text.splitlines() if s.startswith("slm_gateway_circuit_state{")]
        assert [s for s in circuits if 'task="weather"' in s] == []
        assert [s for s in circuits if 'backend="llm"' in s and 'task="other"' in s] != []


def test_a_removed_tasks_series_leave_metrics_after_a_grace(standin: llm_standin.StandIn) -> None:
    """A deleted AgentTask's series stay on /metrics for the grace (so every scraper reads
    their final counts), then go: a fleet that creates and deletes tasks must not export an
    ever-growing set of dead series until the gateway restarts. Other tasks keep theirs."""
    standin.control(slm_fail=True)
    table = RouteTable()
    kept = route(standin, "other")
    table.replace_all([route(standin, mode="slm"), kept])
    config = GatewayConfig(removed_task_metrics_s=0.5)
    with TestClient(create_app(config, table), raise_server_exceptions=False) as c:
        assert chat(c).headers["x-slm-backend"] == "llm"  # the SLM failed: a fallback
        assert chat(c, model="other").status_code == 200
        assert metric(c, "slm_gateway_fallbacks_total", task="weather") == 1
        table.replace_all([kept])
        first = c.get("/metrics").text  # the scrape that sees the task gone
        assert 'task="weather"' in first
        assert metric(c, "slm_gateway_requests_total", task="weather") == 1
        time.sleep(0.6)
        after = c.get("/metrics").text
        assert 'task="weather"' not in after
        assert metric(c, "slm_gateway_requests_total", task="other") == 1
        table.replace_all([route(standin, mode="slm"), kept])  # the task comes back
        chat(c)
        assert metric(c, "slm_gateway_requests_total", task="weather") == 1
        assert metric(c, "slm_gateway_fallbacks_total", task="weather") == 1


def test_tasks_the_watcher_cannot_serve_are_on_metrics_while_they_last(
    standin: llm_standin.StandIn,
) -> None:
    """What the route watcher reports (a refused route, a missing LLM key Secret) is a
    gauge per task and reason, read at each scrape: gone from /metrics once fixed."""
    table = RouteTable()
    table.replace_all([route(standin)])
    app = create_app(GatewayConfig(), table)
    problems = {("agents", "weather"): "llm_key_missing", ("agents", "bad"): "route_refused"}
    app.state.gateway.route_problems = lambda: dict(problems)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert metric(c, "slm_gateway_route_problem", task="bad", reason="route_refused") == 1
        assert metric(c, "slm_gateway_route_problem", task="weather") == 1
        problems.pop(("agents", "weather"))
        assert (
            'slm_gateway_route_problem{namespace="agents",task="weather"'
            not in c.get("/metrics").text
        )


def test_a_task_back_within_the_grace_keeps_its_series(standin: llm_standin.StandIn) -> None:
    table = RouteTable()
    table.replace_all([route(standin)])
    with TestClient(
        create_app(GatewayConfig(removed_task_metrics_s=0.3), table),
        raise_server_exceptions=False,
    ) as c:
        chat(c)
        table.replace_all([])
        c.get("/metrics")
        table.replace_all([route(standin)])  # back before the grace ended (a resync, a move)
        c.get("/metrics")
        time.sleep(0.4)
        assert metric(c, "slm_gateway_requests_total", task="weather") == 1


def test_shadow_mode_answers_from_llm_and_measures_agreement(
    standin: llm_standin.StandIn,
) -> None:
    with client(route(standin, mode="shadow")) as c:
        for _ in range(4):
            r = chat(c, tools=TOOLS)
            assert r.headers["x-slm-backend"] == "llm"
        standin.control(slm_different=True)
        for _ in range(2):
            chat(c, tools=TOOLS)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            agree = metric(c, "slm_gateway_shadow_total", result="agree")
            disagree = metric(c, "slm_gateway_shadow_total", result="disagree")
            if agree + disagree == 6:
                break
            time.sleep(0.02)
        assert (agree, disagree) == (4, 2)
        assert metric(c, "slm_gateway_requests_total", backend="slm") == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": "none"},
        {"n": 2},
        {"response_format": {"type": "json_object"}},
        {"functions": [{"name": "get_weather", "parameters": {"type": "object"}}]},
    ],
    ids=["tool_choice_none", "n2", "json_format", "legacy_functions"],
)
def test_a_request_only_the_llm_can_answer_is_not_shadowed(
    standin: llm_standin.StandIn, extra: dict[str, Any]
) -> None:
    """Never the SLM's in any mode, such a request was still copied to it and compared: a
    tool call where the agent asked for none counted as a disagreement, which lowers the
    agreement that gates the rollout (one bad window sends a canary back to shadow)."""
    with client(route(standin, mode="shadow")) as c:
        before = standin.stats()["slm_calls"]
        r = chat(c, tools=TOOLS, **extra)
        assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if metric(c, "slm_gateway_shadow_total", result="skipped"):
                break
            time.sleep(0.02)
        assert metric(c, "slm_gateway_shadow_total", result="skipped") == 1
        assert metric(c, "slm_gateway_shadow_total", result="disagree") == 0
        assert standin.stats()["slm_calls"] == before


def test_a_bad_shadow_answer_counts_as_an_slm_error_like_a_served_one(
    standin: llm_standin.StandIn,
) -> None:
    """A confidence that is not a number is bad output on either path, and shows as
    ``result="bad_output"``, which the operator's SLM error rate counts."""
    standin.control(slm_confidence="nan")  # sent as JSON null: not a usable confidence
    for mode in ("shadow", "slm"):
        with client(route(standin, mode=mode), breaker_failures=100) as c:
            r = chat(c, tools=TOOLS)
            assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                bad = metric(
                    c, "slm_gateway_backend_calls_total", backend="slm", result="bad_output"
                )
                if bad:
                    break
                time.sleep(0.02)
            assert bad == 1, mode
            if mode == "shadow":
                assert metric(c, "slm_gateway_shadow_total", result="error") == 1


def test_canary_split_follows_the_request_id(standin: llm_standin.StandIn) -> None:
    ids = [f"agent-req-{i}" for i in range(200)]
    with client(route(standin, mode="canary", canary_percent=30)) as c:
        backends = [chat(c, headers={"X-Request-Id": i}).headers["x-slm-backend"] for i in ids]
    expected = ["slm" if canary_bucket(i) < 30 else "llm" for i in ids]
    assert backends == expected
    assert 40 <= backends.count("slm") <= 80


def test_a_canary_keeps_measuring_agreement_on_the_calls_the_llm_answers(
    standin: llm_standin.StandIn,
) -> None:
    """The operator promotes a canary only on windows with live agreement. Without copies of
    the LLM-answered calls the agreement series ran dry once the shadow phase was out of the
    query's lookback, and a canary with the default settings was never promoted."""
    ids = [f"agent-req-{i}" for i in range(40)]
    with client(route(standin, mode="canary", canary_percent=30)) as c:
        for i in ids:
            chat(c, tools=TOOLS, headers={"X-Request-Id": i})
        llm_answered = sum(canary_bucket(i) >= 30 for i in ids)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            agree = metric(c, "slm_gateway_shadow_total", result="agree")
            if agree >= llm_answered:
                break
            time.sleep(0.02)
    assert agree == llm_answered > 0


def test_a_url_scheme_in_capitals_is_served_as_admission_accepted_it(
    standin: llm_standin.StandIn,
) -> None:
    """URL schemes are case-insensitive: admission, the operator and the HTTP client take
    ``HTTPS://...``. The route refused it, so the task had no route and every agent call for
    it failed while the operator trained its model."""
    upper = lambda url: url.replace("http://", "HTTP://", 1)  # noqa: E731
    r = route(
        standin,
        mode="slm",
        llm_base_url=upper(standin.llm_base_url),
        slm_endpoint=upper(standin.slm_endpoint),
    )
    with client(r) as c:
        res = chat(c, tools=TOOLS)
        assert res.status_code == 200 and res.headers["x-slm-backend"] == "slm"
        standin.control(slm_fail=True)
        res = chat(c, tools=TOOLS)
        assert res.status_code == 200 and res.headers["x-slm-backend"] == "llm"
    for url in ("ftp://h/v1", "HTTPX://h/v1", "https:/h/v1"):
        with pytest.raises(RouteError):
            route(standin, llm_base_url=url)


def test_llm_failures_map_to_502_504_and_pass_4xx_through(
    standin: llm_standin.StandIn,
) -> None:
    with client(route(standin, llm_timeout_s=0.2), breaker_failures=100) as c:
        standin.control(llm_error_every=1, llm_error_status=500)
        r = chat(c)
        assert r.status_code == 502 and is_error_body(r, "upstream_error")
        standin.control(llm_error_status=429)
        r = chat(c)
        assert r.status_code == 429 and r.json()["error"]["message"] == "injected failure"
        standin.control(llm_error_every=0, llm_latency_ms=500)
        r = chat(c)
        assert r.status_code == 504 and is_error_body(r, "upstream_timeout")


def test_unreachable_llm_is_a_502_and_its_circuit_opens(standin: llm_standin.StandIn) -> None:
    dead = replace(route(standin), llm_base_url="http://127.0.0.1:9/v1")
    with client(dead) as c:
        codes = [chat(c).status_code for _ in range(4)]
        r = chat(c)
    assert codes == [502, 502, 502, 503]
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and is_error_body(r)


def test_slm_failure_with_llm_up_never_reaches_the_agent(standin: llm_standin.StandIn) -> None:
    standin.control(slm_fail=True, slm_error_status=503)
    with client(route(standin, mode="slm")) as c:
        assert {chat(c).status_code for _ in range(20)} == {200}


def test_service_endpoints(standin: llm_standin.StandIn) -> None:
    with client(route(standin), route(standin, "extract", mode="canary", canary_percent=5)) as c:
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["extract", "weather"]
        assert models["data"][0]["route"] == {
            "mode": "canary",
            "llm_model": "gpt-4o",
            "slm_endpoint": standin.slm_endpoint,
            "canary_percent": 5,
        }
        assert KEY not in c.get("/v1/models").text
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json() == {"status": "ready", "tasks": 2}
        r = chat(c, model="nope")
        assert r.status_code == 404 and is_error_body(r, "model_not_found")
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and is_error_body(r, "method_not_allowed")
        assert c.get("/v2/anything").status_code == 404
        assert "slm_gateway_route_mode" in c.get("/metrics").text


def test_costs_and_tokens_are_counted(standin: llm_standin.StandIn) -> None:
    with client(route(standin)) as c:
        usage = chat(c).json()["usage"]
        p, q = usage["prompt_tokens"], usage["completion_tokens"]
        assert metric(c, "slm_gateway_tokens_total", kind="prompt") == p
        expected = (p * 0.0025 + q * 0.01) / 1000
        assert metric(c, "slm_gateway_cost_usd_total", backend="llm") == pytest.approx(expected)
        assert metric(c, "slm_gateway_llm_equivalent_cost_usd_total") == pytest.approx(expected)


def test_an_llm_that_reports_no_usage_still_has_its_tokens_and_cost_counted(
    standin: llm_standin.StandIn,
) -> None:
    """A whole answer without ``usage`` (some OpenAI-compatible servers never send it) was
    counted as 0 tokens: the task's LLM spend, and the savings its SLM shows, read as nothing.
    Its tokens are estimated from bytes, as a stream's already were."""
    standin.control(llm_omits_usage=True)
    with client(route(standin)) as c:
        r = chat(c)
        assert r.status_code == 200 and "usage" not in r.json()  # the LLM's body, as it was
        p = metric(c, "slm_gateway_tokens_total", kind="prompt")
        q = metric(c, "slm_gateway_tokens_total", kind="completion")
        assert p > 0 and q > 0
        expected = (p * 0.0025 + q * 0.01) / 1000
        assert metric(c, "slm_gateway_cost_usd_total", backend="llm") == pytest.approx(expected)


def test_a_tasks_own_llm_price_prices_its_calls(standin: llm_standin.StandIn) -> None:
    """spec.fallback.llm.price (here GPT-4o-mini's) prices the task's LLM calls and what its
    SLM saves; the gateway's --price llm (GPT-4o's by default) would overstate both 16x."""
    from slm_gateway.routes import Price

    with client(route(standin, llm_price=Price(0.00015, 0.0006))) as c:
        usage = chat(c).json()["usage"]
        p, q = usage["prompt_tokens"], usage["completion_tokens"]
        expected = (p * 0.00015 + q * 0.0006) / 1000
        assert metric(c, "slm_gateway_cost_usd_total", backend="llm") == pytest.approx(expected)
        assert metric(c, "slm_gateway_llm_equivalent_cost_usd_total") == pytest.approx(expected)


def test_static_routes_file_reloads_live(standin: llm_standin.StandIn, tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"

    def write(mode: str) -> None:
        entry = {
            "mode": mode,
            "llmBaseURL": standin.llm_base_url,
            "llmModel": "gpt-4o",
            "slmEndpoint": standin.slm_endpoint,
        }
        routes.write_text(yaml.safe_dump({"tasks": {"weather": entry}}))

    write("llm")
    cfg = GatewayConfig(routes_file=str(routes), routes_reload_s=0.05)
    with TestClient(create_app(cfg)) as c:
        assert chat(c).headers["x-slm-backend"] == "llm"
        time.sleep(0.02)  # a new mtime
        write("slm")
        deadline = time.monotonic() + 5
        while chat(c).headers["x-slm-backend"] != "slm":
            assert time.monotonic() < deadline, "route file change not applied"
            time.sleep(0.05)


@pytest.mark.parametrize("where", ["apiKeyFile", "--llm-api-key-file"])
def test_a_rotated_key_file_is_used_without_touching_the_routes_file(
    standin: llm_standin.StandIn, tmp_path: Path, where: str
) -> None:
    """A key file (a mounted Secret, named by an ``apiKeyFile:`` entry or by
    ``--llm-api-key-file``) was read only when the routes file changed: after a rotation the
    old, revoked key went to the LLM until a restart. The new key now goes with the next
    calls, while the routes file stays as it was."""
    key_file = tmp_path / "api-key"
    key_file.write_text("sk-old-revoked-key\n")
    entry = {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}
    argv = ["--routes", str(tmp_path / "routes.yaml")]
    if where == "apiKeyFile":
        entry["apiKeyFile"] = str(key_file)
    else:
        argv += ["--llm-api-key-file", str(key_file)]
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"tasks": {"weather": entry}}))
    cfg = replace(config_from_args(argv), routes_reload_s=0.05)
    with TestClient(create_app(cfg)) as c:
        assert chat(c).status_code == 200
        assert (standin.stats()["auth_expected"], standin.stats()["auth_other"]) == (0, 1)
        mtime = routes.stat().st_mtime_ns
        key_file.write_text(KEY + "\n")
        deadline = time.monotonic() + 5
        while standin.stats()["auth_expected"] == 0:
            assert time.monotonic() < deadline, "the rotated key was never sent to the LLM"
            assert chat(c).status_code == 200
            time.sleep(0.05)
        assert routes.stat().st_mtime_ns == mtime


def test_the_gateway_never_imports_the_training_stack() -> None:
    """The gateway image has no torch; only the capture worker imports the (light) redactor."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys, slm_gateway.main, slm_gateway.app, slm_gateway.kube;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'presidio_analyzer')"
        " if m in sys.modules))"
    )
    env = {"PYTHONPATH": f"{repo / 'operator'}:{repo / 'trainer'}:{repo / 'e2e'}"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == "[]"


def test_same_named_tasks_of_two_namespaces_have_their_own_series(
    standin: llm_standin.StandIn,
) -> None:
    a = route(standin, namespace="team-a")
    b = route(standin, namespace="team-b")
    with client(a, b) as c:
        for model in ("team-a/weather", "team-a/weather", "team-b/weather"):
            assert chat(c, model=model).status_code == 200
        count = "slm_gateway_requests_total"
        assert metric(c, count, namespace="team-a", task="weather", backend="llm") == 2
        assert metric(c, count, namespace="team-b", task="weather", backend="llm") == 1
        tokens = "slm_gateway_tokens_total"
        assert metric(c, tokens, namespace="team-b", task="weather", kind="prompt") > 0


def test_a_name_two_namespaces_use_is_ambiguous_not_missing(standin: llm_standin.StandIn) -> None:
    """Without agent auth, team-b applying a task named like team-a's must not make team-a's
    agent read that its task "does not exist": the answer says which ids to use."""
    a = route(standin, namespace="team-a")
    b = route(standin, namespace="team-b")
    with client(a, b, route(standin, "extract", namespace="team-b")) as c:
        r = chat(c, model="weather")
        assert r.status_code == 400 and is_error_body(r, "model_ambiguous")
        assert r.json()["error"]["param"] == "model"
        assert "'team-a/weather', 'team-b/weather'" in r.json()["error"]["message"]
        assert chat(c, headers={"X-Agent-Task": "weather"}).status_code == 400
        assert chat(c, model="team-a/weather").status_code == 200
        assert chat(c, model="extract").status_code == 200  # unique: the bare name serves
        r = chat(c, model="nosuch")
        assert r.status_code == 404 and is_error_body(r, "model_not_found")


def sa_token(namespace: str, *audiences: str) -> str:
    """A token shaped like a ServiceAccount's; the fake review of :func:`authed_client`
    vouches for the account its ``sub`` names (the real API server's reviews are in
    tests/integration/test_gateway_agent_auth.py)."""
    claims = {
        "aud": list(audiences or ["slm-fleet-gateway"]),
        "exp": 4_000_000_000,
        "sub": f"system:serviceaccount:{namespace}:agent",
    }

    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(d)).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def authed_client(monkeypatch: pytest.MonkeyPatch, *routes: Route) -> TestClient:
    """A gateway with --agent-auth serviceaccount whose TokenReviews accept every token."""
    from slm_gateway import app as app_module

    def review(api: Any, token: str, audience: str) -> dict[str, Any]:
        username = (token_claims(token) or {})["sub"]
        return {"authenticated": True, "audiences": [audience], "user": {"username": username}}

    def reviewer(kubeconfig: Any, audience: str, ttl_s: float, **kw: Any) -> TokenReviewer:
        return TokenReviewer(None, audience, review=review)

    monkeypatch.setattr(app_module, "token_reviewer", reviewer)
    return client(*routes, agent_auth="serviceaccount")


def test_an_agents_bare_name_never_resolves_in_another_namespace(
    standin: llm_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/models hides other namespaces' tasks from an agent; a bare name must not reveal
    them either (it got a 403 naming team-b's task). Naming team-b/payroll itself, the agent
    is refused as before."""
    routes = (
        route(standin, namespace="team-a"),
        route(standin, "payroll", namespace="team-b"),
        route(standin, "search"),  # from a routes file: no namespace, any agent may call it
    )
    with authed_client(monkeypatch, *routes) as c:
        auth = {"Authorization": f"Bearer {sa_token('team-a')}"}
        assert chat(c, headers=auth).status_code == 200
        assert chat(c, model="search", headers=auth).status_code == 200
        r = chat(c, model="payroll", headers=auth)
        assert r.status_code == 404 and is_error_body(r, "model_not_found")
        assert "team-b" not in r.text and "namespace 'team-a'" in r.text
        r = chat(c, model="team-b/payroll", headers=auth)
        assert r.status_code == 403 and is_error_body(r, "permission_denied")
        ids = [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]]
        assert ids == ["search", "weather"]


def test_a_token_for_the_api_server_too_is_refused_saying_why(
    standin: llm_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README promises that a token for the API server is no gateway key: one minted for
    both audiences passed the TokenReview for the gateway's and was served."""
    with authed_client(monkeypatch, route(standin, namespace="team-a")) as c:
        both = sa_token("team-a", "slm-fleet-gateway", "https://kubernetes.default.svc")
        r = chat(c, headers={"Authorization": f"Bearer {both}"})
        assert r.status_code == 401 and is_error_body(r, "invalid_api_key")
        assert "other audiences besides 'slm-fleet-gateway'" in r.json()["error"]["message"]
        assert chat(c, headers={"Authorization": f"Bearer {sa_token('team-a')}"}).status_code == 200


TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "get_forecast")
]


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"tools": TOOLS, "tool_choice": "none"},
    ],
    ids=["n=2", "logprobs", "json_object", "tool_choice=none"],
)
def test_a_request_only_the_llm_can_answer_skips_the_slm(
    standin: llm_standin.StandIn, extra: dict[str, Any]
) -> None:
    """The SLM answers one choice, without log-probabilities or a structured-output
    guarantee, and with a tool call when it picks one: an agent that asked for more, or for
    no tool call, must not silently get less, so such a call goes to the LLM in any mode."""
    for mode, kw in (("slm", {}), ("canary", {"canary_percent": 100})):
        with client(route(standin, mode=mode, **kw)) as c:
            r = chat(c, **extra)
            assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm", mode
            assert "x-slm-fallback-reason" not in r.headers
            assert chat(c).headers["x-slm-backend"] == "slm"
    assert standin.stats()["slm_calls"] == 2


@pytest.mark.parametrize(
    ("extra", "slm_text"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "get_forecast"}}}, False),
        ({"tool_choice": "required"}, True),
    ],
    ids=["named-other-tool", "required-but-text"],
)
def test_an_slm_answer_that_breaks_tool_choice_is_answered_by_the_llm(
    standin: llm_standin.StandIn, extra: dict[str, Any], slm_text: bool
) -> None:
    """The stand-in SLM calls the first tool (get_weather), or answers in text: neither keeps
    a tool_choice that names get_forecast or requires a call, so the LLM answers. A hand-back
    (``defer``), not bad output: the exported model does not read tool_choice, and such an
    answer counted against the SLM's circuit and error rate."""
    standin.control(slm_different=slm_text)
    with client(route(standin, mode="slm")) as c:
        r = chat(c, tools=TOOLS, **extra)
        assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm"
        assert r.headers["x-slm-fallback-reason"] == "defer"
        assert chat(c, tools=TOOLS).headers["x-slm-backend"] == "slm"  # no tool_choice: fine


@pytest.mark.parametrize("status", [201, 204, 302])
def test_an_llm_status_that_is_neither_200_nor_4xx_is_a_502(
    standin: llm_standin.StandIn, status: int
) -> None:
    """Only a 4xx is the LLM rejecting the agent's request; a 2xx or 3xx was passed on with
    its status and an error body, which an SDK reads as a success it cannot parse."""
    standin.control(llm_error_every=1, llm_error_status=status)
    with client(route(standin), breaker_failures=100) as c:
        r = chat(c)
        assert r.status_code == 502 and is_error_body(r, "upstream_error")
        assert metric(c, "slm_gateway_errors_total", code="upstream_error") == 1


def test_an_unexpected_slm_failure_is_answered_by_the_llm(
    standin: llm_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an upstream error the adapter knows (a bug, a session closing at shutdown): the
    LLM can still answer, so the agent gets its answer, not a 500."""
    from slm_gateway import app as gateway_app

    async def broken(self: Any, route: Route, body: bytes) -> Any:
        raise RuntimeError("Session is closed")

    monkeypatch.setattr(gateway_app.Upstreams, "slm", broken)
    with client(route(standin, mode="slm")) as c:
        r = chat(c)
        assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm"
        assert r.headers["x-slm-fallback-reason"] == "slm_error"
        assert metric(c, "slm_gateway_fallbacks_total", reason="slm_error") == 1


@pytest.mark.parametrize("status", [401, 403])
def test_an_llm_that_rejects_the_gateways_key_is_a_502_not_the_agents_auth_error(
    standin: llm_standin.StandIn, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway calls the LLM with the task's key from its Secret, never the agent's: a 401
    or 403 means that key is wrong. Passed on, it would tell the agent its own key is bad (an
    OpenAI SDK raises AuthenticationError and does not retry). The agent gets a 502 naming the
    task, the platform a counted and logged error without the key, and the LLM's circuit,
    shared by every task on that URL, stays closed. Same when the LLM answers a fallback."""
    standin.control(llm_error_every=1, llm_error_status=status, slm_fail=True)
    caplog.set_level("WARNING", logger="slm_gateway")
    for mode in ("llm", "slm"):
        with client(route(standin, mode=mode)) as c:
            replies = [chat(c) for _ in range(4)]  # more than breaker_failures (3)
            assert [r.status_code for r in replies] == [502] * 4, mode
            r = replies[-1]
            assert is_error_body(r, "upstream_error")
            err = r.json()["error"]
            assert err["type"] == "server_error"
            assert "weather" in err["message"] and "credentials" in err["message"]
            assert "injected failure" not in err["message"]  # the LLM's body may quote the key
            assert metric(c, "slm_gateway_errors_total", code="llm_auth") == 4
            assert metric(c, "slm_gateway_errors_total", code="llm_4xx") == 0
            assert metric(c, "slm_gateway_circuit_state", backend="llm") == 0
            if mode == "slm":
                assert metric(c, "slm_gateway_fallbacks_total", reason="slm_error") >= 1
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert any("weather" in w and str(status) in w for w in warnings)
    assert not any(KEY in rec.getMessage() for rec in caplog.records)
    standin.control(llm_error_status=400, slm_fail=False)
    with client(route(standin)) as c:
        assert chat(c).status_code == 400  # a request the LLM rejects is still the agent's


class _SecretMeta:
    def __init__(self, annotations: dict[str, str]) -> None:
        self.annotations = annotations


class _KeySecret:
    """The task's key Secret as the Kubernetes client reads it: the key, and its owner's
    annotations."""

    def __init__(self, annotations: dict[str, str]) -> None:
        self.data = {"api-key": base64.b64encode(KEY.encode()).decode()}
        self.metadata = _SecretMeta(annotations)


class _OneList:
    """One list of AgentTasks, as CustomObjectsApi answers it."""

    def __init__(self, *items: dict[str, Any]) -> None:
        self.items = list(items)

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"items": self.items, "metadata": {"resourceVersion": "1"}}


@pytest.mark.parametrize(
    "hosts",
    [None, "", "api.openai.com, *.openai.azure.com", "127.0.0.1", "127.0.0.1:1, 127.0.0.1:*"],
    ids=["unannotated", "empty", "other-hosts", "other-port", "no-such-entry"],
)
def test_a_tasks_key_never_reaches_an_llm_host_its_secret_does_not_allow(
    standin: llm_standin.StandIn, hosts: str | None
) -> None:
    """Anyone who may create or patch AgentTasks but not read Secrets set a task's LLM to a
    server of theirs, named the platform's key Secret, and received the key as ``Bearer``.
    Routed through the real watcher from the Secret as the API server gives it, the key now
    goes only to a host the Secret's slmfleet.dev/llm-hosts annotation lists: otherwise the
    LLM is not called at all (streamed or not), and the agent gets a 502 naming the Secret,
    the host and the fix, counted under code llm_host_not_allowed. The LLM's circuit, shared
    by every task on that URL, learns nothing from it."""
    from slm_gateway.kube import AgentTaskWatcher

    host = f"127.0.0.1:{standin.port}"
    annotations: dict[str, str] = {}

    class Core:
        def read_namespaced_secret(self, name: str, namespace: str, **kw: Any) -> _KeySecret:
            return _KeySecret(annotations)

    def served(with_annotations: dict[str, str]) -> RouteTable:
        annotations.clear()
        annotations.update(with_annotations)
        watcher = AgentTaskWatcher(RouteTable(), "agents")
        task = {
            "metadata": {"name": "weather", "namespace": "agents"},
            "spec": {
                "fallback": {
                    "llm": {
                        "baseURL": standin.llm_base_url,
                        "model": "gpt-4o",
                        "apiKeySecretRef": {"name": "platform-key"},
                    }
                }
            },
        }
        watcher._relist(_OneList(task), Core())
        return watcher.table

    table = served({} if hosts is None else {"slmfleet.dev/llm-hosts": hosts})
    with client(*table.routes()) as c:
        replies = [chat(c), chat(c, stream=True), chat(c), chat(c), chat(c)]
        assert [r.status_code for r in replies] == [502] * 5
        for r in replies:
            assert is_error_body(r, "llm_host_not_allowed")
            message = r.json()["error"]["message"]
            assert "agents/platform-key" in message and "weather" in message
            assert f"add {host} to the Secret's slmfleet.dev/llm-hosts annotation" in message
            assert KEY not in r.text
        assert metric(c, "slm_gateway_errors_total", code="llm_host_not_allowed") == 5
        assert metric(c, "slm_gateway_circuit_state", backend="llm") == 0
    assert standin.stats()["llm_calls"] == 0  # the key, and the call, never left the gateway
    # The Secret's owner allows the stand-in's host: the key goes there, and the calls work.
    table = served({"slmfleet.dev/llm-hosts": f"api.openai.com, {host}"})
    with client(*table.routes()) as c:
        assert chat(c).status_code == 200 and chat(c, stream=True).status_code == 200
    stats = standin.stats()
    assert (stats["auth_expected"], stats["auth_other"], stats["auth_missing"]) == (2, 0, 0)


CUSTOM_TOOL = {"type": "custom", "custom": {"name": "apply_patch", "description": "A patch."}}


@pytest.mark.parametrize("mode", ["slm", "shadow"])
def test_a_request_with_a_custom_tool_is_the_llms_and_is_captured(
    standin: llm_standin.StandIn, tmp_path: Path, mode: str
) -> None:
    """GPT-5's custom (free-form input) tools got a 400. The SLM is trained on function
    tools only, so such a request goes to the LLM in every mode, without a fallback reason
    and without a shadow copy, and its call is captured like any other."""
    call = {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** P"}}
    history = [
        {"role": "user", "content": "Patch it."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    named = {"type": "custom", "custom": {"name": "apply_patch"}}
    requests: list[dict[str, Any]] = [
        {"tools": [*TOOLS, CUSTOM_TOOL]},
        {"tools": [*TOOLS, CUSTOM_TOOL], "tool_choice": named},
        {"tools": [*TOOLS, CUSTOM_TOOL], "messages": history},
    ]
    capture = CaptureConfig(target=str(tmp_path))
    with client(route(standin, mode=mode), capture=capture) as c:
        for extra in requests:
            r = chat(c, **extra)
            assert r.status_code == 200, r.text
            assert r.headers["x-slm-backend"] == "llm", extra
            assert "x-slm-fallback-reason" not in r.headers
        skipped = metric(c, "slm_gateway_shadow_total", result="skipped")
    assert standin.stats()["slm_calls"] == 0
    assert skipped == (3 if mode == "shadow" else 0)
    lines = [line for f in tmp_path.rglob("*.jsonl") for line in f.read_text().splitlines()]
    records = [CallRecord.from_json(line) for line in lines]
    assert len(records) == 3 and all(rec.tools[-1] == CUSTOM_TOOL for rec in records)


def test_a_call_only_the_llm_is_sent_is_captured_marked_and_left_out_by_curate(
    standin: llm_standin.StandIn, tmp_path: Path
) -> None:
    """tool_choice "none", n > 1 and the like never go to an SLM, but the record holds none
    of those fields, and curate trained on them: the text answer "none" forced, with tools
    offered, taught the SLM to answer in text where it would call a tool. The gateway marks
    the record; a legacy functions call, which capture writes as a tools call for training
    on purpose, stays unmarked."""
    from slm_trainer import curate

    functions = [{"name": "get_weather", "parameters": {"type": "object"}}]
    requests: list[dict[str, Any]] = [
        {"tools": TOOLS, "tool_choice": "none"},
        {"n": 2},
        {"tools": TOOLS},
        {"functions": functions},
    ]
    capture = CaptureConfig(target=str(tmp_path / "calls"))
    with client(route(standin), capture=capture) as c:
        for i, extra in enumerate(requests):
            content = f"Weather in Paris, call {i}?"
            r = chat(c, messages=[{"role": "user", "content": content}], **extra)
            assert r.status_code == 200, r.text
    lines = [line for f in tmp_path.rglob("*.jsonl") for line in f.read_text().splitlines()]
    marks = {
        CallRecord.from_json(line).messages[0]["content"]: CallRecord.from_json(line).llm_only
        for line in lines
    }
    assert [marks[f"Weather in Paris, call {i}?"] for i in range(4)] == [True, True, False, False]
    prep = curate.Args(
        input=tmp_path / "calls" / "weather",
        output_dir=tmp_path / "prep",
        min_examples=1,
        scrub_pii=False,
    )
    result = curate.run(prep)
    report = orjson.loads((tmp_path / "prep" / "curate_report.json").read_bytes())
    assert (report["llm_only_tools"], report["examples"]) == (2, 2), result.message


class _RawLLM(BaseHTTPRequestHandler):
    """An LLM server that answers every call with ``reply``: (status, body bytes)."""

    reply: tuple[int, bytes] = (200, b"{}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def raw_llm() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RawLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (  # vLLM's and SGLang's ErrorResponse
            400,
            b'{"object":"error","message":"maximum context length is 4096 tokens",'
            b'"type":"BadRequestError","param":null,"code":400}',
            "maximum context length is 4096 tokens",
        ),
        (  # TGI, llama.cpp, Ollama
            422,
            b'{"error":"Input validation error: inputs too long","error_type":"validation"}',
            "Input validation error: inputs too long",
        ),
        (422, b'{"detail":"tool_choice required is not supported"}', "not supported"),
        (422, b'{"detail":[{"loc":["body","messages"],"msg":"field required"}]}', "field required"),
        (400, b'{"message":"bad header: Bearer ' + KEY.encode() + b'"}', "bad header: Bearer"),
        (400, b'{"message":"' + b"x" * 5000 + b'"}', "x" * 1000),
        (413, b"<html>too big</html>", ""),
    ],
    ids=["vllm", "tgi", "fastapi", "pydantic", "key-quoted", "long", "not-json"],
)
def test_an_llm_4xx_in_another_servers_shape_keeps_its_reason(
    raw_llm: ThreadingHTTPServer, status: int, body: bytes, reason: str
) -> None:
    """Only OpenAI's ``{"error": {...}}`` kept the LLM's reason; from vLLM, TGI or a FastAPI
    server the agent read "rejected the request with HTTP 400" and nothing about why. The
    status stays the LLM's, the body is OpenAI's, the reason is cut at 1000 characters, and
    the task's LLM key never shows, even when the server quotes it."""
    _RawLLM.reply = (status, body)
    url = f"http://127.0.0.1:{raw_llm.server_port}/v1"
    task = Route(task="weather", mode="llm", llm_base_url=url, llm_model="m", llm_api_key=KEY)
    with client(task) as c:
        for stream in (False, True):
            r = chat(c, stream=stream)
            assert r.status_code == status and is_error_body(r, "upstream_error")
            message = r.json()["error"]["message"]
            assert message.startswith(f"The LLM backend rejected the request with HTTP {status}")
            assert reason in message and KEY not in message
            assert len(message) < 1100
            assert reason or message.endswith(f"HTTP {status}.")  # nothing to quote


SECRET = "sk-TESTSECRET1234567890abcdef"


def test_a_key_in_an_upstream_urls_query_is_sent_but_never_logged_or_labelled(
    standin: llm_standin.StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """An LLM base URL may carry a query: Azure OpenAI's ``?api-version=``, or a provider's
    ``?api_key=``. It used to be logged in full (circuit changes, a rejected key, a server
    refusing stream_options), used as the circuit gauge's ``endpoint`` label, and the path
    went into the query (``/v1?api_key=.../chat/completions``). Now the call goes to the
    right path with the query after it, and logs, labels and /v1/models show no query."""
    caplog.set_level("INFO", logger="slm_gateway")
    query = f"?api-version=2024-06-01&api_key={SECRET}"
    ok = route(standin, llm_base_url=standin.llm_base_url + query)
    slm = route(standin, "extract", mode="slm", slm_endpoint=standin.slm_endpoint + query)
    dead = route(standin, "dead", llm_base_url="http://127.0.0.1:9/v1" + query)
    with client(ok, slm, dead) as c:
        r = chat(c)
        assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm"
        assert chat(c, model="extract").headers["x-slm-backend"] == "slm"
        assert [chat(c, model="dead").status_code for _ in range(4)] == [502, 502, 502, 503]
        standin.control(llm_error_every=1, llm_error_status=401)
        assert chat(c).status_code == 502
        standin.control(llm_error_every=0, llm_rejects_stream_options=True)
        r, events = stream_chat(c)
        assert r.status_code == 200 and events[-1] == "[DONE]"
        text = c.get("/metrics").text
        models = c.get("/v1/models").text
    assert "TESTSECRET" not in text and "TESTSECRET" not in models
    assert 'endpoint="http://127.0.0.1:9/v1/chat/completions"' in text
    assert f'endpoint="{standin.llm_base_url}/chat/completions"' in text
    logs = [rec.getMessage() for rec in caplog.records]
    assert not [m for m in logs if "TESTSECRET" in m]
    assert any("circuit" in m and "http://127.0.0.1:9/v1/chat/completions" in m for m in logs)
    assert any("401" in m and "weather" in m for m in logs)
    assert any("stream_options" in m and standin.llm_base_url in m for m in logs)


# ---------------------------------------------------------------------------- streaming


def stream_chat(c: TestClient, model: str = "weather", **extra: Any) -> tuple[Any, list[Any]]:
    """A ``"stream": true`` call: the response and its events (``[DONE]`` as the string)."""
    r = chat(c, model=model, stream=True, **extra)
    events: list[Any] = []
    for block in r.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return r, events


def folded(events: list[Any]) -> dict[str, Any]:
    """The message a streaming SDK builds from the events (as the OpenAI SDK accumulates)."""
    from slm_gateway.sse import StreamAssembler

    a = StreamAssembler()
    for ev in events:
        if ev != "[DONE]":
            a.add(ev)
    return a.message()


def test_a_streamed_llm_answer_is_relayed_and_reads_as_the_unstreamed_one(
    standin: llm_standin.StandIn,
) -> None:
    with client(route(standin)) as c:
        whole = chat(c, tools=TOOLS).json()["choices"][0]["message"]
        r, events = stream_chat(c, tools=TOOLS)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-slm-backend"] == "llm"
        assert events[-1] == "[DONE]"
        assert all(ev["object"] == "chat.completion.chunk" for ev in events[:-1])
        assert folded(events) == whole
        # The gateway asked the LLM for usage (tokens and cost are counted), but an agent that
        # did not ask for it does not get the usage chunk.
        assert not any(ev != "[DONE]" and ev.get("choices") == [] for ev in events)
        assert metric(c, "slm_gateway_tokens_total", kind="completion") > 0
        assert metric(c, "slm_gateway_requests_total", backend="llm") == 2
        assert metric(c, "slm_gateway_streams_total", backend="llm", result="complete") == 1
        assert metric(c, "slm_gateway_stream_first_chunk_seconds_count", backend="llm") == 1
    stats = standin.stats()
    assert (stats["auth_expected"], stats["auth_other"]) == (2, 0)


def test_an_llm_server_that_refuses_stream_options_still_streams(
    standin: llm_standin.StandIn,
) -> None:
    """The gateway adds ``stream_options`` to count tokens; a server that predates the field
    answers 400. The agent never asked for it, so its call must not fail: the gateway asks
    again without it, and after that goes straight there. An agent that sent the field
    itself gets the server's answer to its own request."""
    standin.control(llm_rejects_stream_options=True)
    with client(route(standin)) as c:
        for _ in range(2):
            r, events = stream_chat(c, tools=TOOLS)
            assert r.status_code == 200 and events[-1] == "[DONE]"
            assert folded(events)["tool_calls"][0]["function"]["name"] == "get_weather"
        assert standin.stats()["llm_rejected_stream_options"] == 1  # asked once, then not
        # Without usage from the LLM the tokens are estimated, so cost is still counted.
        assert metric(c, "slm_gateway_tokens_total", kind="completion") > 0
        assert metric(c, "slm_gateway_streams_total", backend="llm", result="complete") == 2
        r = chat(c, stream=True, stream_options={"include_usage": True})
        assert r.status_code == 400 and is_error_body(r)
        assert "stream_options" in r.json()["error"]["message"]
    assert standin.stats()["llm_rejected_stream_options"] == 2


def test_an_agent_that_asks_for_usage_gets_the_usage_chunk(standin: llm_standin.StandIn) -> None:
    with client(route(standin)) as c:
        _, events = stream_chat(c, stream_options={"include_usage": True})
    usage = [ev for ev in events if ev != "[DONE]" and ev.get("choices") == []]
    assert len(usage) == 1 and usage[0]["usage"]["total_tokens"] > 0
    assert folded(events)["content"] == "echo: Weather in Paris?"


def test_a_streamed_slm_answer_and_a_streamed_fallback_read_alike(
    standin: llm_standin.StandIn,
) -> None:
    with client(route(standin, mode="slm")) as c:
        r, events = stream_chat(c, tools=TOOLS, stream_options={"include_usage": True})
        assert r.status_code == 200 and r.headers["x-slm-backend"] == "slm"
        assert r.headers["content-type"].startswith("text/event-stream")
        slm_message = folded(events)
        assert slm_message["tool_calls"][0]["function"] == {
            "name": "get_weather",
            "arguments": "{}",
        }
        assert events[-2]["usage"]["completion_tokens"] > 0 and events[-1] == "[DONE]"
        standin.control(slm_fail=True)
        r, events = stream_chat(c, tools=TOOLS)
        assert r.headers["x-slm-backend"] == "llm"
        assert r.headers["x-slm-fallback-reason"] == "slm_error"
        llm_message = folded(events)
        assert llm_message["tool_calls"][0]["function"] == slm_message["tool_calls"][0]["function"]
        assert metric(c, "slm_gateway_streams_total", backend="slm", result="complete") == 1
        assert metric(c, "slm_gateway_streams_total", backend="llm", result="complete") == 1


def test_an_llm_stream_that_breaks_off_ends_with_an_error_event(
    standin: llm_standin.StandIn,
) -> None:
    """Once the agent has its 200 and some tokens, the status cannot change: the stream ends
    with an OpenAI-style ``error`` event (the SDKs raise it), and the failure is counted."""
    standin.control(llm_stream_cut_after=2)
    with client(route(standin)) as c:
        r, events = stream_chat(c, tools=TOOLS)
        assert r.status_code == 200
        assert "[DONE]" not in events
        assert events[-1]["error"]["code"] == "upstream_error"
        assert "broke off" in events[-1]["error"]["message"]
        assert metric(c, "slm_gateway_streams_total", result="failed") == 1
        assert metric(c, "slm_gateway_errors_total", code="upstream_error") == 1
        assert metric(c, "slm_gateway_requests_total") == 0  # not an answered call


def test_an_overloaded_llm_s_retry_after_reaches_the_agent(
    standin: llm_standin.StandIn,
) -> None:
    """An LLM that answers 503 with ``Retry-After`` tells clients when to come back; the agent
    gets a 502 (the gateway's own error body) but the same ``Retry-After``, so its SDK's retry
    waits instead of adding to the overload, whether the call streams or not. A rejected LLM
    key (401) is the platform's problem, with no retry time to pass on."""
    standin.control(llm_error_every=1, llm_error_status=503, llm_error_retry_after="17")
    with client(route(standin), breaker_failures=100) as c:
        for stream in (False, True):
            r = chat(c, stream=stream)
            assert r.status_code == 502 and is_error_body(r, "upstream_error")
            assert r.headers["retry-after"] == "17"
        standin.control(llm_error_status=401)
        r = chat(c)
        assert r.status_code == 502 and "retry-after" not in r.headers


def test_an_llm_stream_past_its_deadline_ends_with_a_timeout_event(
    standin: llm_standin.StandIn,
) -> None:
    standin.control(llm_stream_delay_ms=400)
    with client(route(standin, llm_timeout_s=0.5)) as c:
        r, events = stream_chat(c)
        assert r.status_code == 200
        assert events[-1]["error"]["code"] == "upstream_timeout"
        assert metric(c, "slm_gateway_errors_total", code="upstream_timeout") == 1


def test_an_llm_that_fails_before_streaming_gets_the_usual_json_error(
    standin: llm_standin.StandIn,
) -> None:
    standin.control(llm_error_every=1, llm_error_status=503)
    with client(route(standin)) as c:
        r = chat(c, stream=True)
        assert r.status_code == 502 and is_error_body(r, "upstream_error")
        assert r.headers["content-type"] == "application/json"
    standin.control(llm_error_every=0, llm_latency_ms=2000)
    with client(route(standin, llm_timeout_s=0.3)) as c:
        r = chat(c, stream=True)  # no status line within the deadline
        assert r.status_code == 504 and is_error_body(r, "upstream_timeout")
    standin.control(llm_error_every=1, llm_error_status=429, llm_latency_ms=0)
    with client(route(standin)) as c:
        r = chat(c, stream=True)
        # A 4xx is the LLM's word on the agent's request: passed on as the LLM said it.
        assert r.status_code == 429 and r.json()["error"]["message"] == "injected failure"


def test_shadow_mode_compares_a_streamed_llm_answer(standin: llm_standin.StandIn) -> None:
    with client(route(standin, mode="shadow")) as c:
        for _ in range(3):
            r, _ = stream_chat(c, tools=TOOLS)
            assert r.headers["x-slm-backend"] == "llm"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if metric(c, "slm_gateway_shadow_total", result="agree") == 3:
                break
            time.sleep(0.02)
        assert metric(c, "slm_gateway_shadow_total", result="agree") == 3


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": []}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_malformed_stream_fields_are_400s_naming_the_field(
    standin: llm_standin.StandIn, extra: dict[str, Any], param: str
) -> None:
    with client(route(standin)) as c:
        r = chat(c, **extra)
    assert r.status_code == 400 and is_error_body(r)
    assert r.json()["error"]["param"] == param
    assert standin.stats()["llm_calls"] == 0


def test_a_bug_while_relaying_ends_the_stream_with_an_error_event(
    standin: llm_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the 200 went out, an unexpected exception must not try to start a second
    response (uvicorn would drop the connection with a traceback): the stream ends with an
    ``internal_error`` event and the gateway keeps serving."""
    from slm_gateway import app as app_module

    class Broken(app_module.StreamAssembler):
        def add(self, chunk: Any) -> None:
            raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "StreamAssembler", Broken)
    with client(route(standin)) as c:
        r, events = stream_chat(c)
        assert r.status_code == 200
        assert events[-1]["error"]["code"] == "internal_error"
        assert metric(c, "slm_gateway_errors_total", code="internal_error") == 1
        assert metric(c, "slm_gateway_circuit_state", backend="llm") == 0  # not the LLM's fault
        monkeypatch.undo()
        r, events = stream_chat(c)
        assert events[-1] == "[DONE]"


def test_an_slm_call_its_own_tool_schema_rejects_is_answered_by_the_llm(
    standin: llm_standin.StandIn,
) -> None:
    """The stand-in SLM calls get_weather with ``{}``; the request's schema requires a city,
    so the agent's tool would fail on it: the LLM answers (slm_bad_output), and the same call
    is served from the SLM when the schema asks for nothing."""
    params = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    strict_city = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    with client(route(standin, mode="slm")) as c:
        r = chat(c, tools=strict_city)
        assert r.status_code == 200 and r.headers["x-slm-backend"] == "llm"
        assert r.headers["x-slm-fallback-reason"] == "slm_bad_output"
        assert metric(c, "slm_gateway_fallbacks_total", reason="slm_bad_output") == 1
        assert chat(c, tools=TOOLS).headers["x-slm-backend"] == "slm"


IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize("mode", ["slm", "shadow"])
def test_a_request_with_an_image_is_the_llms_and_is_captured_llm_only(
    standin: llm_standin.StandIn, tmp_path: Path, mode: str
) -> None:
    """The SLM reads text only: asked about a photo it answered from the words alone, a
    shadow copy counted that as agreement, and the call was captured for training. Such a
    request, and one asking for audio or a web search, goes to the LLM, without a fallback
    reason or a shadow copy, and its record is marked llm_only."""
    text = {"type": "text", "text": "What is the weather in the city in this photo?"}
    requests: list[dict[str, Any]] = [
        {"tools": TOOLS, "messages": [{"role": "user", "content": [text, IMAGE_PART]}]},
        {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
        {"web_search_options": {}},
    ]
    capture = CaptureConfig(target=str(tmp_path))
    with client(route(standin, mode=mode), capture=capture) as c:
        for extra in requests:
            r = chat(c, **extra)
            assert r.status_code == 200, r.text
            assert r.headers["x-slm-backend"] == "llm", extra
            assert "x-slm-fallback-reason" not in r.headers
    assert standin.stats()["slm_calls"] == 0
    lines = [line for f in tmp_path.rglob("*.jsonl") for line in f.read_text().splitlines()]
    records = [CallRecord.from_json(line) for line in lines]
    assert len(records) == 3 and all(rec.llm_only for rec in records)


def test_top_logprobs_without_logprobs_is_a_400_naming_it(standin: llm_standin.StandIn) -> None:
    """OpenAI refuses it; the gateway let an SLM answer it (without log-probabilities)."""
    with client(route(standin, mode="slm")) as c:
        r = chat(c, top_logprobs=2)
        assert r.status_code == 400 and is_error_body(r, "invalid_value")
        assert r.json()["error"]["param"] == "top_logprobs"
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert standin.stats()["slm_calls"] == 0


def test_a_scrape_of_many_tasks_leaves_the_event_loop_free(
    standin: llm_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics of 800 tasks took 3.5 s to write, on the event loop: every agent call made
    meanwhile waited as long (3.35 s, against 3 ms without a scrape). The loop now only
    snapshots the per-call numbers; the text is written in another thread. Checked by which
    thread writes it, not by timing the loop (this machine is shared; the figures are in
    the fix's note), and the text is the whole of it."""
    import asyncio
    import threading

    import httpx

    from slm_gateway.metrics import GatewayMetrics

    n = 500
    table = RouteTable()
    table.replace_all([route(standin, f"t{i:03d}", mode="shadow") for i in range(n)])
    metrics = GatewayMetrics()
    for i in range(n):
        metrics.served("", f"t{i:03d}", "llm").observe(0.2, 10, 5, 0.001, 0.001)
        metrics.attempt("", f"t{i:03d}", "llm", "ok", 0.2)
        metrics.attempt("", f"t{i:03d}", "slm", "ok", 0.05)
        metrics.shadow.labels("", f"t{i:03d}", "agree").inc()
    writers: list[int] = []
    exposition = metrics.exposition

    def watched() -> Callable[[], bytes]:
        write = exposition()

        def in_thread() -> bytes:
            writers.append(threading.get_ident())
            return write()

        return in_thread

    monkeypatch.setattr(metrics, "exposition", watched)
    app = create_app(GatewayConfig(), table, metrics=metrics)

    async def scrape() -> tuple[int, bytes]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            r = await c.get("/metrics")
        assert r.status_code == 200
        return threading.get_ident(), r.content

    loop_thread, body = asyncio.run(scrape())
    assert len(body) > 5_000_000  # about 20 KB a task
    assert writers and loop_thread not in writers
    assert body.count(b'slm_gateway_shadow_total{namespace="",result="agree"') == n


def test_the_scrape_is_the_registrys_own_exposition(standin: llm_standin.StandIn) -> None:
    """Writing /metrics in a thread from a snapshot changes none of it: the same families,
    samples and values (and _created timestamps) as the registry exports itself."""
    from prometheus_client import generate_latest

    from slm_gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    table = RouteTable()
    table.replace_all([route(standin, mode="shadow"), route(standin, "plain")])
    with TestClient(create_app(GatewayConfig(), table, metrics=metrics)) as c:
        assert chat(c).status_code == 200
        assert chat(c, model="plain").status_code == 200
        for _ in range(100):  # the shadow copy's result is counted after the answer
            if metric(c, "slm_gateway_shadow_total", task="weather") == 1:
                break
            time.sleep(0.02)
        assert metric(c, "slm_gateway_shadow_total", task="weather") == 1
        text = c.get("/metrics").content
    assert text == generate_latest(metrics.registry)
    assert b'slm_gateway_requests_total{backend="llm",namespace="",task="plain"} 1.0' in text
