"""What agents get from a gateway that stops while their calls are still running.

SIGTERM lets running calls finish for up to ``--graceful-timeout-s``; uvicorn then cancels
the rest. Those calls must still end as the README promises every error ends: a 503 in
OpenAI's error body that the agent's SDK retries (on another replica), or, for a stream
already begun, an ``error`` event, never uvicorn's plain-text 500, a cut-off body, or a
traceback per call in the log. The process tests send a real SIGTERM to a real gateway; the
in-process ones cancel the request's task as uvicorn does, to read what was counted (no
scrape can come after the listener closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client import generate_latest

from slm_e2e import llm_standin
from slm_gateway.app import create_app
from slm_gateway.config import GatewayConfig
from slm_gateway.routes import Route, RouteTable
from slm_gateway.testing import GatewayProcess, start_gateway


@pytest.fixture(autouse=True)
def reset(standin: llm_standin.StandIn) -> None:
    standin.control(**llm_standin.SETTINGS, reset_stats=True)


def body(stream: bool) -> bytes:
    return orjson.dumps(
        {
            "model": "weather",
            "stream": stream,
            "messages": [{"role": "user", "content": "Weather in Lyon?"}],
        }
    )


def wait_for(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def llm_has_calls(standin: llm_standin.StandIn) -> Callable[[], bool]:
    return lambda: standin.stats()["llm_calls"] >= 1


@contextlib.contextmanager
def gateway(
    standin: llm_standin.StandIn, tmp_path: Path, graceful_s: str
) -> Iterator[GatewayProcess]:
    routes = tmp_path / "routes.yaml"
    task = {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}
    routes.write_text(yaml.safe_dump({"tasks": {"weather": task}}))
    args = ["--routes", str(routes), "--graceful-timeout-s", graceful_s]
    with start_gateway(args, log_path=tmp_path / "gw.log") as gw:
        yield gw


def post(gw: GatewayProcess, stream: bool) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body(stream))
    return conn.getresponse()


def in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a thread; the returned function joins it and gives its result (or
    raises what it raised)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> Any:
        thread.join(30)
        assert out, "the call did not end"
        if isinstance(out[0], Exception):
            raise out[0]
        return out[0]

    return result


def read_to_the_end(resp: http.client.HTTPResponse) -> bytes:
    """The rest of a body, also when the connection closed before its end."""
    try:
        return resp.read()
    except http.client.IncompleteRead as cut:
        return cut.partial


def stopped(gw: GatewayProcess) -> str:
    """SIGTERM the gateway, wait for it to exit, and return its log."""
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(30)
    return gw.log()


def stop_during_a_call(
    standin: llm_standin.StandIn, gw: GatewayProcess
) -> tuple[int, str | None, bytes, str]:
    """Post a whole call and SIGTERM the gateway once the LLM has it: the call's status,
    Retry-After and body, and the gateway's log."""

    def call() -> tuple[int, str | None, bytes]:
        resp = post(gw, stream=False)
        return resp.status, resp.getheader("retry-after"), resp.read()

    result = in_background(call)
    wait_for(llm_has_calls(standin))
    log = stopped(gw)
    return (*result(), log)


def test_a_call_still_running_at_the_graceful_timeout_gets_a_503_it_can_retry(
    standin: llm_standin.StandIn, tmp_path: Path
) -> None:
    standin.control(llm_latency_ms=10_000)
    with gateway(standin, tmp_path, "0.3") as gw:
        status, retry_after, raw, log = stop_during_a_call(standin, gw)
    assert (status, retry_after) == (503, "1"), raw
    doc = orjson.loads(raw)
    assert doc["error"]["code"] == "shutting_down" and doc["error"]["type"] == "server_error"
    assert "answered 503 shutting_down" in log and "Traceback" not in log


def test_a_stream_still_running_at_the_graceful_timeout_ends_with_an_error_event(
    standin: llm_standin.StandIn, tmp_path: Path
) -> None:
    standin.control(llm_stream_delay_ms=10_000)
    with gateway(standin, tmp_path, "0.3") as gw:
        resp = post(gw, stream=True)
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: {")  # the stream has begun: its status cannot change
        rest = in_background(lambda: read_to_the_end(resp))
        log = stopped(gw)
    events = [line[6:] for line in (first + rest()).splitlines() if line.startswith(b"data: ")]
    assert events[-1] != b"[DONE]"
    assert orjson.loads(events[-1])["error"]["code"] == "shutting_down"
    assert "ended with an error event shutting_down" in log and "Traceback" not in log


def test_a_graceful_timeout_under_a_second_still_lets_calls_finish(
    standin: llm_standin.StandIn, tmp_path: Path
) -> None:
    # 0.9 s used to become 0 s (int()): every running call was cancelled at once.
    standin.control(llm_latency_ms=300)
    with gateway(standin, tmp_path, "0.9") as gw:
        status, _, raw, log = stop_during_a_call(standin, gw)
    assert status == 200 and orjson.loads(raw)["choices"][0]["message"]["content"]
    assert "shutting_down" not in log


# ---- in process: what a cancelled call counts --------------------------------------------


def run_cancelled(
    standin: llm_standin.StandIn, stream: bool, ready: Callable[[list[Any]], bool]
) -> tuple[list[Any], bool, dict[str, float]]:
    """Serve one call in process, cancel its task once ``ready(sent)`` (as uvicorn does at
    the graceful timeout) and return what was sent, whether the task ended cancelled, and
    the metrics' samples."""
    table = RouteTable()
    table.replace_all(
        [Route(task="weather", mode="llm", llm_base_url=standin.llm_base_url, llm_model="m")]
    )
    app = create_app(GatewayConfig(), table, watch=False)
    sent: list[Any] = []
    requests = [{"type": "http.request", "body": body(stream), "more_body": False}]

    async def receive() -> Any:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the agent stays connected

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> bool:
        async with app.app.router.lifespan_context(app.app):
            scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
            task = asyncio.create_task(app({**scope, "headers": []}, receive, send))
            while not ready(sent):
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return task.cancelled()

    cancelled = asyncio.run(main())
    return sent, cancelled, samples(generate_latest(app.gateway.metrics.registry))


SHUTTING_DOWN = "slm_gateway_errors_total{backend=llm,code=shutting_down,namespace=,task=weather}"


def samples(exposition: bytes) -> dict[str, float]:
    """Each sample of an exposition by its name and labels, sorted: ``name{a=x,b=y}``."""
    out = {}
    for line in exposition.decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            pairs = sorted(p.replace('"', "") for p in labels.rstrip("}").split(",") if p)
            out[name + "{" + ",".join(pairs) + "}"] = float(value)
    return out


def test_a_cancelled_call_is_answered_counted_and_still_cancelled(
    standin: llm_standin.StandIn,
) -> None:
    standin.control(llm_latency_ms=10_000)
    has_call = llm_has_calls(standin)
    sent, cancelled, scrape = run_cancelled(standin, False, lambda _: has_call())
    assert cancelled  # the cancel goes on once the agent has its answer
    assert sent[0]["status"] == 503
    assert orjson.loads(sent[1]["body"])["error"]["code"] == "shutting_down"
    assert scrape[SHUTTING_DOWN] == 1


def test_a_cancelled_stream_ends_with_an_error_event_and_counts_as_failed(
    standin: llm_standin.StandIn,
) -> None:
    standin.control(llm_stream_delay_ms=10_000)
    sent, cancelled, scrape = run_cancelled(
        standin, True, lambda sent: any(m.get("more_body") for m in sent)
    )
    assert cancelled
    assert [m["type"] for m in sent].count("http.response.start") == 1  # no 503 after the 200
    assert sent[-1]["more_body"] is False
    assert orjson.loads(sent[-1]["body"][6:])["error"]["code"] == "shutting_down"
    assert (
        scrape["slm_gateway_streams_total{backend=llm,namespace=,result=failed,task=weather}"] == 1
    )
    assert scrape[SHUTTING_DOWN] == 1


# ---- a stream still waiting for the LLM ----------------------------------------------------


def stop_during_a_stream(gw: GatewayProcess, until: Callable[[], bool]) -> tuple[Any, str]:
    """Post a streamed call and SIGTERM the gateway once ``until()``: the call's status,
    Retry-After and the body read to its end, and the gateway's log."""

    def call() -> tuple[int, str | None, bytes]:
        resp = post(gw, stream=True)
        return resp.status, resp.getheader("retry-after"), read_to_the_end(resp)

    result = in_background(call)
    wait_for(until)
    log = stopped(gw)
    return result(), log


def test_a_stream_waiting_for_the_llms_status_at_the_graceful_timeout_gets_a_503(
    standin: llm_standin.StandIn, tmp_path: Path
) -> None:
    """The wait for the LLM's status line is cancelled like any call: a 503 the agent's SDK
    retries. It got an empty reply, no warning: the cancel waited for the LLM's connection
    to be dropped, and uvicorn finished shutting down meanwhile."""
    standin.control(llm_latency_ms=10_000)
    with gateway(standin, tmp_path, "0.3") as gw:
        (status, retry_after, raw), log = stop_during_a_stream(gw, llm_has_calls(standin))
    assert (status, retry_after) == (503, "1"), raw
    assert orjson.loads(raw)["error"]["code"] == "shutting_down"
    assert "answered 503 shutting_down" in log and "Traceback" not in log


class _HeadOnlyLLM(BaseHTTPRequestHandler):
    """An LLM that answers a streamed call's status line and headers, then nothing until the
    gateway closes the connection (a slow model's first token)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.server.called.set()  # type: ignore[attr-defined]
        select.select([self.connection], [], [], 30)

    def log_message(self, *_: Any) -> None:
        pass


def test_a_stream_waiting_for_its_first_event_at_the_graceful_timeout_ends_with_an_error_event(
    tmp_path: Path,
) -> None:
    """Its 200 went out: the stream ends with an error event the agent's SDK raises. It went
    on with no event and no end until the gateway's process exited, and nothing was logged."""
    llm = ThreadingHTTPServer(("127.0.0.1", 0), _HeadOnlyLLM)
    llm.called = threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=llm.serve_forever, daemon=True).start()
    routes = tmp_path / "routes.yaml"
    url = f"http://127.0.0.1:{llm.server_address[1]}/v1"
    task = {"mode": "llm", "llmBaseURL": url, "llmModel": "gpt-4o"}
    routes.write_text(yaml.safe_dump({"tasks": {"weather": task}}))
    args = ["--routes", str(routes), "--graceful-timeout-s", "0.3"]
    try:
        with start_gateway(args, log_path=tmp_path / "gw.log") as gw:
            called = llm.called.is_set  # type: ignore[attr-defined]
            (status, _, raw), log = stop_during_a_stream(gw, called)
    finally:
        llm.shutdown()
    assert status == 200
    events = [line[6:] for line in raw.splitlines() if line.startswith(b"data: ")]
    assert events and orjson.loads(events[-1])["error"]["code"] == "shutting_down", raw
    assert "ended with an error event shutting_down" in log and "Traceback" not in log
