"""The gateway's pool of upstream connections: ``--upstream-pool-size`` per origin, shared by
every task whose LLM or SLM is on that origin.

What an agent or an operator would notice. With more calls in flight to one origin than the
pool holds, the calls past it wait for a free connection. That wait used to count against the
call's upstream timeout: a queued call was answered 504 ``upstream_timeout`` ("The LLM backend
did not answer") and counted as the LLM's failure, so the LLM's circuit opened though the LLM
answered every call it got in time. Now the upstream's timeout starts once a connection is
held; a call that finds none within that time is a 503 ``gateway_busy`` with ``Retry-After``
(the gateway's shortage, like ``out_of_file_descriptors``), counted in
``slm_gateway_errors_total`` and by no circuit. The pool size is a flag, an environment
variable and a chart value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from slm_e2e import llm_standin
from slm_gateway.app import create_app
from slm_gateway.config import GatewayConfig, config_from_args
from slm_gateway.routes import Route, RouteTable

#: The stand-in's latency and the calls' timeout: a queued call's wait for a connection
#: (one latency) plus its own exchange (another) is past the timeout, each alone well within.
LATENCY_MS = 700
TIMEOUT_S = 1.0
POOL = 2


def _body(task: str) -> bytes:
    return orjson.dumps({"model": task, "messages": [{"role": "user", "content": "Paris?"}]})


async def _burst(app: Any, task: str, n: int) -> tuple[list[httpx.Response], str]:
    """``n`` concurrent calls for ``task`` through the app (its lifespan running, so its real
    upstream client), then one more once they are done; and the /metrics text after."""
    async with app.app.router.lifespan_context(app.app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=30
        ) as c:
            url = "/v1/chat/completions"
            answers = await asyncio.gather(*(c.post(url, content=_body(task)) for _ in range(n)))
            answers.append(await c.post(url, content=_body(task)))
            metrics = (await c.get("/metrics")).text
    return answers, metrics


def _samples(metrics: str, name: str, *has: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name + "{") and all(h in line for h in has)
    ]


@pytest.fixture
def slow_llm(standin: llm_standin.StandIn) -> Iterator[llm_standin.StandIn]:
    standin.control(llm_latency_ms=LATENCY_MS)
    yield standin
    standin.control(llm_latency_ms=0)  # the stand-in is the module's


def _llm_app(standin: llm_standin.StandIn) -> Any:
    table = RouteTable()
    table.replace_all(
        [
            Route(
                task="weather",
                mode="llm",
                llm_base_url=standin.llm_base_url,
                llm_model="gpt-4o",
                llm_timeout_s=TIMEOUT_S,
            )
        ]
    )
    cfg = GatewayConfig(pool_size=POOL, breaker_failures=2, breaker_cooldown_s=60)
    return create_app(cfg, table)


def test_calls_queued_for_a_connection_get_the_llms_answer_not_a_504(
    slow_llm: llm_standin.StandIn,
) -> None:
    """Twice as many calls as the pool holds, each answered by the LLM in 0.7 s of its 1 s:
    the second pair waited 0.7 s for a connection and was cut off 0.3 s into the LLM's work,
    504 ``upstream_timeout``, two failures of the LLM, and its circuit open for every task on
    it."""
    answers, metrics = asyncio.run(_burst(_llm_app(slow_llm), "weather", 2 * POOL))
    assert [r.status_code for r in answers] == [200] * (2 * POOL + 1), [r.text for r in answers]
    assert _samples(metrics, "slm_gateway_circuit_state", 'backend="llm"') == [0.0]  # closed
    assert not _samples(metrics, "slm_gateway_errors_total")


def test_a_call_that_finds_no_free_connection_in_time_is_a_503_gateway_busy(
    slow_llm: llm_standin.StandIn,
) -> None:
    """Four times as many calls as the pool holds: the last pairs would get a connection only
    after 1.4 s, past the 1 s the wait may take. They are the gateway's shortage, not the
    LLM's failure: a 503 ``gateway_busy`` that says so, with ``Retry-After``, counted, never
    sent to the LLM, and no circuit counts them."""
    before = slow_llm.stats()["llm_calls"]
    answers, metrics = asyncio.run(_burst(_llm_app(slow_llm), "weather", 4 * POOL))
    statuses = sorted(r.status_code for r in answers[:-1])
    assert statuses == [200] * (2 * POOL) + [503] * (2 * POOL), [r.text for r in answers]
    for r in answers[:-1]:
        if r.status_code == 503:
            error = r.json()["error"]
            assert (error["code"], error["type"]) == ("gateway_busy", "server_error")
            assert "upstream-pool-size" in error["message"]
            assert r.headers["retry-after"] == "1"
    assert answers[-1].status_code == 200  # the circuit stayed closed
    assert slow_llm.stats()["llm_calls"] - before == 2 * POOL + 1
    assert _samples(metrics, "slm_gateway_circuit_state", 'backend="llm"') == [0.0]
    errors = _samples(metrics, "slm_gateway_errors_total", 'code="gateway_busy"', 'task="weather"')
    assert errors == [2.0 * POOL]
    assert not _samples(metrics, "slm_gateway_errors_total", 'code="upstream_timeout"')


@pytest.fixture
def other_llm() -> Iterator[llm_standin.StandIn]:
    with llm_standin.start() as s:
        yield s


def test_an_slm_call_that_finds_no_free_connection_falls_back_without_opening_its_circuit(
    standin: llm_standin.StandIn, other_llm: llm_standin.StandIn, request: pytest.FixtureRequest
) -> None:
    """The SLM shares the client: its queued calls timed out the same way, each a failure of
    the SLM, whose circuit opened. Now the agent gets the LLM's answer for a call the pool had
    no room for, and the SLM's circuit stays closed."""
    standin.control(slm_latency_ms=LATENCY_MS)
    request.addfinalizer(lambda: standin.control(slm_latency_ms=0))
    table = RouteTable()
    table.replace_all(
        [
            Route(
                task="weather",
                mode="slm",
                llm_base_url=other_llm.llm_base_url,
                llm_model="gpt-4o",
                slm_endpoint=standin.slm_endpoint,
                slm_model="weather-slm",
                slm_timeout_s=TIMEOUT_S,
            )
        ]
    )
    cfg = GatewayConfig(pool_size=POOL, breaker_failures=2, breaker_cooldown_s=60)
    answers, metrics = asyncio.run(_burst(create_app(cfg, table), "weather", 4 * POOL))
    assert [r.status_code for r in answers] == [200] * (4 * POOL + 1), [r.text for r in answers]
    backends = sorted(r.headers["x-slm-backend"] for r in answers[:-1])
    assert backends == ["llm"] * (2 * POOL) + ["slm"] * (2 * POOL), backends
    assert answers[-1].headers["x-slm-backend"] == "slm"  # the SLM's circuit is closed
    assert _samples(metrics, "slm_gateway_circuit_state", 'backend="slm"') == [0.0]


def test_the_pool_size_comes_from_the_flag_or_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It had neither: 1024 connections per origin, shared by all tasks, fixed."""
    assert config_from_args(["--namespace", "ns"]).pool_size == 1024
    assert config_from_args(["--namespace", "ns", "--upstream-pool-size", "2"]).pool_size == 2
    monkeypatch.setenv("SLM_GATEWAY_UPSTREAM_POOL_SIZE", "3")
    assert config_from_args(["--namespace", "ns"]).pool_size == 3
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            config_from_args(["--namespace", "ns", "--upstream-pool-size", bad])
        err = capsys.readouterr().err
        assert "--upstream-pool-size must be at least 1" in err
        assert "SLM_GATEWAY_UPSTREAM_POOL_SIZE" in err
    monkeypatch.setenv("SLM_GATEWAY_UPSTREAM_POOL_SIZE", "many")
    with pytest.raises(SystemExit):
        config_from_args(["--namespace", "ns"])
    assert "SLM_GATEWAY_UPSTREAM_POOL_SIZE must be an integer" in capsys.readouterr().err
