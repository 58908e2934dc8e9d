"""One task must not take the gateway from another: tasks that share an LLM URL, or the
shadow budget, each keep their own.

Requests go through Starlette's TestClient into the real ASGI app; the app's own HTTP client
calls upstreams on 127.0.0.1 (a scripted LLM here, the LLM/Triton stand-in processes). Each
test states what an agent or an operator would notice.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from slm_e2e import llm_standin
from slm_gateway.app import create_app, shadow_slot_free
from slm_gateway.config import GatewayConfig
from slm_gateway.routes import Route, RouteTable

KEY = "sk-test-0123456789abcdef"
#: The model the scripted LLM fails every call of (HTTP 500); any other model is answered.
BROKEN_MODEL = "overloaded-model"


def _completion(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    )


class _LLM(BaseHTTPRequestHandler):
    """One LLM URL serving several models: :data:`BROKEN_MODEL` fails, the others answer."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("model") == BROKEN_MODEL:
            status, out = 500, b'{"error":{"message":"model overloaded","type":"server_error"}}'
        else:
            status, out = 200, _completion(body.get("model", ""))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def llm_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def client(*routes: Route, **cfg: Any) -> TestClient:
    table = RouteTable()
    table.replace_all(routes)
    config = GatewayConfig(**{"breaker_failures": 3, "breaker_cooldown_s": 30.0, **cfg})
    return TestClient(create_app(config, table), raise_server_exceptions=False)


def chat(c: TestClient, model: str) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return c.post("/v1/chat/completions", content=orjson.dumps(body))


def metric(c: TestClient, name: str, **labels: str) -> float:
    total = 0.0
    for line in c.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_task_whose_llm_model_fails_does_not_open_the_circuit_of_another_task_on_its_url(
    llm_url: str,
) -> None:
    """Two tasks of two teams call one LLM URL, each with its own model; one model fails.
    With one circuit per URL, its failures opened the circuit for both: the healthy task's
    agents got 503 ``upstream_unavailable`` for every call, though its own model answered.
    Each task now has its own circuit on that URL, and its gauge says whose it is."""
    broken = Route(
        task="broken",
        namespace="team-a",
        mode="llm",
        llm_base_url=llm_url,
        llm_model=BROKEN_MODEL,
        llm_api_key=KEY,
    )
    healthy = Route(
        task="healthy",
        namespace="team-b",
        mode="llm",
        llm_base_url=llm_url,
        llm_model="gpt-4o",
        llm_api_key=KEY,
    )
    endpoint = broken.llm_log_url
    assert healthy.llm_log_url == endpoint
    with client(broken, healthy) as c:
        got = [chat(c, "team-a/broken") for _ in range(5)]
        assert [r.status_code for r in got] == [502, 502, 502, 503, 503]
        assert got[-1].json()["error"]["code"] == "upstream_unavailable"
        assert [chat(c, "team-b/healthy").status_code for _ in range(10)] == [200] * 10
        assert metric(c, "slm_gateway_errors_total", namespace="team-b") == 0
        state = {"backend": "llm", "endpoint": endpoint}
        assert metric(c, "slm_gateway_circuit_state", namespace="team-a", **state) == 2
        assert metric(c, "slm_gateway_circuit_state", namespace="team-b", **state) == 0


def test_a_provider_that_is_down_opens_each_tasks_circuit_after_its_own_failures(
    llm_url: str,
) -> None:
    """The other side of a circuit per task: a task's circuit opens on its own failures,
    so a provider that fails every task opens each one's circuit (after
    ``--breaker-failures`` calls of that task), and none is opened by another's calls."""
    routes = [
        Route(
            task=t,
            namespace="team-a",
            mode="llm",
            llm_base_url=llm_url,
            llm_model=BROKEN_MODEL,
            llm_api_key=KEY,
        )
        for t in ("one", "two")
    ]
    with client(*routes) as c:
        assert [chat(c, "team-a/one").status_code for _ in range(4)] == [502, 502, 502, 503]
        assert [chat(c, "team-a/two").status_code for _ in range(4)] == [502, 502, 502, 503]


@pytest.fixture(scope="module")
def slow_slm() -> Iterator[llm_standin.StandIn]:
    with llm_standin.start(slm_latency_ms=3000) as s:
        yield s


@pytest.fixture(scope="module")
def fast_slm() -> Iterator[llm_standin.StandIn]:
    with llm_standin.start() as s:
        yield s


def _shadow_route(task: str, standin: llm_standin.StandIn) -> Route:
    return Route(
        task=task,
        mode="shadow",
        llm_base_url=standin.llm_base_url,
        llm_model="gpt-4o",
        llm_api_key=KEY,
        slm_endpoint=standin.slm_endpoint,
        slm_model=task,
    )


def test_a_task_with_a_slow_slm_leaves_other_tasks_their_shadow_copies(
    slow_slm: llm_standin.StandIn, fast_slm: llm_standin.StandIn
) -> None:
    """Task A is in shadow with an SLM that takes 3 s; its calls came first and its
    copies held every slot of ``--max-shadow-inflight``, so task B's copies were skipped
    (39 of 40 in the reviewer's run): B never reached ``shadowMinSamples`` and stayed in
    shadow. One task now holds a quarter of the budget at most; B's copies are all taken."""
    a, b = _shadow_route("slow", slow_slm), _shadow_route("fast", fast_slm)
    with client(a, b, max_shadow_inflight=8) as c:
        for _ in range(12):
            assert chat(c, "slow").status_code == 200
        for _ in range(5):
            assert chat(c, "fast").status_code == 200
        skipped_b = metric(c, "slm_gateway_shadow_total", task="fast", result="skipped")
        skipped_a = metric(c, "slm_gateway_shadow_total", task="slow", result="skipped")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            judged = metric(c, "slm_gateway_shadow_total", task="fast", result="agree")
            if judged == 5:
                break
            time.sleep(0.05)
    assert skipped_b == 0
    assert judged == 5
    # Alone at first, A took 6 slots of 8: all but the quarter kept for the others.
    assert skipped_a == 12 - 6


@pytest.mark.parametrize(("limit", "alone"), [(1, 1), (2, 1), (4, 3), (8, 6), (64, 48)])
def test_a_task_alone_in_shadow_uses_all_but_the_others_share(limit: int, alone: int) -> None:
    """A hard quarter per task throttled the usual first rollout, one task in shadow, to 16
    copies of 64 with the rest idle. It now takes every slot but the quarter kept for the
    others, and a task below its quarter still gets one while any is free."""
    held = 0
    while shadow_slot_free(held, held, limit):
        held += 1
    assert held == alone
    share = max(1, limit // 4)
    assert all(shadow_slot_free(held + k, k, limit) for k in range(limit - held) if k < share)
