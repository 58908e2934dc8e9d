"""The gateway against upstreams that misbehave in ways the stand-in cannot: a scripted raw
HTTP server on 127.0.0.1 answers each request with the next action of its script.

Each test states what an agent or an operator would notice: the status and body the agent
got, the metrics, what capture was handed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from starlette.testclient import TestClient

from slm_contract import TRITON_CONFIDENCE, TRITON_OUTPUT
from slm_gateway.app import Breakers, CircuitKey, _refuses_stream_options, create_app
from slm_gateway.capture import Captured
from slm_gateway.config import GatewayConfig
from slm_gateway.metrics import GatewayMetrics
from slm_gateway.routes import Route, RouteTable

#: One scripted answer: writes to the connection, returns whether to keep it open.
Action = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


class Upstream:
    """A raw HTTP/1.1 server on its own thread; each request gets the next scripted action
    (none left: the connection is closed). Requests are kept as (head, body)."""

    def __init__(self) -> None:
        self.script: collections.deque[Action] = collections.deque()
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = int(self._server.sockets[0].getsockname()[1])
            self._ready.set()
            async with self._server:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._server.serve_forever()

        self._loop.run_until_complete(main())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                action = self.script.popleft() if self.script else None
                if action is None or not await action(reader, writer, body):
                    await writer.drain()
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def llm_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def slm_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._thread.join(5)


class FakeSink:
    """Stands in for the capture sink: keeps what the gateway hands it."""

    def __init__(self) -> None:
        self.items: list[Captured] = []
        self.dropped: list[tuple[str, str]] = []

    def submit(self, item: Captured) -> bool:
        self.items.append(item)
        return True

    def drop(self, key: str, reason: str) -> None:
        self.dropped.append((key, reason))

    def depth(self) -> int:
        return 0


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.stop()


def respond(status: int, body: bytes, content_type: bytes = b"application/json") -> Action:
    async def action(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes) -> bool:
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status, content_type, len(body), body)
        )
        await writer.drain()
        return True

    return action


def chunk(content: str | None = None, finish: str | None = None, index: int = 0) -> bytes:
    delta = {} if content is None else {"content": content}
    doc = {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def sse(events: list[bytes], framing: str = "close") -> Action:
    """A 200 event stream: delimited by the connection's close, chunked and ended cleanly,
    or chunked and cut off without its closing chunk (``"chunked-cut"``)."""

    async def action(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes) -> bool:
        if framing == "close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
            writer.write(b"Connection: close\r\n\r\n" + b"".join(events))
            await writer.drain()
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        for ev in events:
            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
        if framing == "chunked-cut":
            await writer.drain()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    return action


def gateway(*routes: Route) -> tuple[TestClient, FakeSink]:
    table = RouteTable()
    table.replace_all(routes)
    app = create_app(GatewayConfig(breaker_failures=3, breaker_cooldown_s=0.3), table)
    sink = FakeSink()
    app.gateway.capture = sink  # type: ignore[assignment]
    return TestClient(app, raise_server_exceptions=False), sink


def llm_route(up: Upstream) -> Route:
    return Route(task="weather", mode="llm", llm_base_url=up.llm_url, llm_model="gpt-4o")


def slm_route(up: Upstream, mode: str = "slm", **extra: Any) -> Route:
    """A task in ``mode`` (slm unless told) whose LLM and Triton are both ``up``."""
    return Route(
        task="weather",
        mode=mode,
        llm_base_url=up.llm_url,
        llm_model="gpt-4o",
        slm_endpoint=up.slm_endpoint,
        **extra,
    )


def ask(c: TestClient, **extra: Any) -> Any:
    body = {"model": "weather", "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    body.update(extra)
    return c.post("/v1/chat/completions", content=orjson.dumps(body))


def events_of(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def metric(c: TestClient, name: str, **labels: str) -> float:
    total = 0.0
    for line in c.get("/metrics").text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------- streams that stop short


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_a_stream_that_stops_before_done_is_a_failure_not_a_short_answer(
    upstream: Upstream, framing: str
) -> None:
    """An LLM whose process dies mid-answer closes the connection; a stream delimited by
    that close looks complete to HTTP. Without ``[DONE]`` or a finish reason it is not: the
    agent gets the error event of a broken stream, the attempt counts as failed, and the half
    answer is never handed to capture as a training example."""
    upstream.script.append(sse([chunk("The answer is ")], framing))
    c, sink = gateway(llm_route(upstream))
    with c:
        r = ask(c, stream=True)
        events = events_of(r.text)
        assert r.status_code == 200
        assert events[0]["choices"][0]["delta"]["content"] == "The answer is "
        assert events[-1]["error"]["code"] == "upstream_error"
        assert "broke off" in events[-1]["error"]["message"]
        assert metric(c, "slm_gateway_streams_total", result="failed") == 1
        assert metric(c, "slm_gateway_streams_total", result="complete") == 0
        assert metric(c, "slm_gateway_backend_calls_total", backend="llm", result="ok") == 0
        assert metric(c, "slm_gateway_errors_total", code="upstream_error") == 1
        assert metric(c, "slm_gateway_requests_total") == 0
    assert sink.items == []


def test_a_stream_whose_answer_finished_is_complete_without_done(upstream: Upstream) -> None:
    """Not every OpenAI-compatible server sends ``[DONE]``; a stream whose choice carried its
    finish reason holds the whole answer, and is served and captured as such."""
    upstream.script.append(sse([chunk("Sunny."), chunk(finish="stop")]))
    c, sink = gateway(llm_route(upstream))
    with c:
        events = events_of(ask(c, stream=True).text)
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert events[-1] == "[DONE]"  # as OpenAI ends every stream; SDKs may wait for it
        assert metric(c, "slm_gateway_streams_total", result="complete") == 1
    [item] = sink.items
    choice = orjson.loads(item.response)["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Sunny.", "stop")


FINISHED = [chunk("Sunny."), chunk(finish="stop")]
COMPLETION: dict[str, Any] = {
    "id": "x",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
}


@pytest.mark.parametrize(
    ("events", "framing"),
    [
        ([*FINISHED, b"data: [DONE]\n\n"], "chunked-cut"),
        (FINISHED, "chunked-cut"),
        ([chunk("Sunny."), b"data: [DONE]\n"], "chunked"),
        ([chunk("Sunny."), b"data: [DONE]\n"], "close"),
    ],
    ids=["done-then-cut", "finished-then-cut", "done-one-newline", "done-one-newline-close"],
)
def test_a_whole_answer_whose_connection_ends_untidily_is_complete(
    upstream: Upstream, events: list[bytes], framing: str
) -> None:
    """Once the answer is whole (``[DONE]``, or every choice finished), a cut connection or
    a last line short of its blank line takes nothing from it. Read as broken, the agent
    got an error event after ``[DONE]`` (its SDK raising on a complete answer), the call
    went uncaptured, and three such answers opened the LLM's circuit for every task on it."""
    for _ in range(3):
        upstream.script.append(sse(events, framing))
    c, sink = gateway(llm_route(upstream))
    with c:
        for _ in range(3):
            got = events_of(ask(c, stream=True).text)
            assert [e for e in got if isinstance(e, dict) and "error" in e] == []
            assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
        assert metric(c, "slm_gateway_streams_total", result="complete") == 3
        assert metric(c, "slm_gateway_errors_total") == 0
        upstream.script.append(respond(200, orjson.dumps(COMPLETION)))
        assert ask(c).status_code == 200  # the circuit stayed closed
    contents = [orjson.loads(i.response)["choices"][0]["message"]["content"] for i in sink.items]
    assert contents == ["Sunny."] * 3 + ["ok"]


def _nested(depth: int) -> Any:
    doc: Any = 1
    for _ in range(depth):
        doc = {"a": doc}
    return doc


def test_a_streamed_answer_too_deep_to_write_is_served_and_its_capture_counted(
    upstream: Upstream,
) -> None:
    """orjson reads 1,024 levels but writes 255: a usage chunk nested 300 deep made the
    finished stream's bookkeeping raise, the app tried a second response start, and the
    answer went uncounted. It is an answer: counted, and its capture counted as dropped."""
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "extra": _nested(300)}}
    events = [*FINISHED, b"data: " + json.dumps(usage).encode() + b"\n\n", b"data: [DONE]\n\n"]
    upstream.script.append(sse(events, "chunked"))
    c, sink = gateway(llm_route(upstream))
    with c:
        assert events_of(ask(c, stream=True).text)[-1] == "[DONE]"
        assert metric(c, "slm_gateway_backend_calls_total", backend="llm", result="ok") == 1
        assert metric(c, "slm_gateway_errors_total") == 0
    assert sink.items == []
    assert sink.dropped == [(llm_route(upstream).key, "encode_failed")]


def test_a_whole_answer_too_deep_to_write_is_relayed(upstream: Upstream) -> None:
    """The same depth in a non-streamed message made the token estimate raise: a 500 for
    a 200 the LLM sent. The agent gets the LLM's answer as it came."""
    message = {"role": "assistant", "content": "x", "extra": _nested(300)}
    answer = dict(COMPLETION, choices=[{"index": 0, "message": message, "finish_reason": "stop"}])
    body = json.dumps(answer).encode()  # deeper than orjson writes
    upstream.script.append(respond(200, body))
    c, sink = gateway(llm_route(upstream))
    with c:
        r = ask(c)
        assert (r.status_code, r.content) == (200, body)
        assert metric(c, "slm_gateway_backend_calls_total", backend="llm", result="ok") == 1
    assert [i.response for i in sink.items] == [body]


def test_capture_keeps_the_finish_reason_the_llm_sent_and_invents_none(
    upstream: Upstream,
) -> None:
    upstream.script.append(sse([chunk("Sunny."), b"data: [DONE]\n\n"]))
    c, sink = gateway(llm_route(upstream))
    with c:
        assert events_of(ask(c, stream=True).text)[-1] == "[DONE]"
    [item] = sink.items
    assert orjson.loads(item.response)["choices"][0]["finish_reason"] is None


def test_a_cr_only_stream_ends_its_last_event(upstream: Upstream) -> None:
    """SSE allows lone CR line ends; the ``[DONE]`` of such a stream must be read."""
    events = [chunk("Sunny."), chunk(finish="stop"), b"data: [DONE]\n\n"]
    upstream.script.append(sse([e.replace(b"\n", b"\r") for e in events], "chunked"))
    c, _ = gateway(llm_route(upstream))
    with c:
        assert events_of(ask(c, stream=True).text)[-1] == "[DONE]"
        assert metric(c, "slm_gateway_streams_total", result="complete") == 1


# ------------------------------------------------------- SLM answers too deep to write


def infer_answer(answer: str, confidence: float = 0.99) -> Action:
    doc = {
        "outputs": [
            {"name": TRITON_OUTPUT, "data": [answer]},
            {"name": TRITON_CONFIDENCE, "data": [confidence]},
        ]
    }
    return respond(200, json.dumps(doc).encode())


def test_slm_tool_arguments_too_deep_to_write_fall_back_to_the_llm(upstream: Upstream) -> None:
    """orjson reads JSON 1024 levels deep but writes only 254: an SLM whose arguments nest
    deeper cannot be served. It is bad output, and the LLM answers instead of a 500."""
    deep = "{}"
    for _ in range(300):
        deep = '{"a":' + deep + "}"
    answer = '{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f",'
    answer += '"arguments":' + deep + "}}]}"
    upstream.script.extend([infer_answer(answer), respond(200, orjson.dumps(COMPLETION))])
    route = slm_route(upstream)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    c, _ = gateway(route)
    with c:
        r = ask(c, tools=tools)
        assert r.status_code == 200, r.text
        assert r.headers["x-slm-backend"] == "llm"
        assert r.headers["x-slm-fallback-reason"] == "slm_bad_output"
        assert metric(c, "slm_gateway_backend_calls_total", backend="slm", result="ok") == 0
        assert metric(c, "slm_gateway_backend_calls_total", backend="slm", result="bad_output") == 1


# ------------------------------------------------------------------- stream_options


def test_an_error_that_only_echoes_the_request_is_not_a_stream_options_refusal(
    upstream: Upstream,
) -> None:
    """A 400 about something else that quotes the request (so the gateway's own
    ``stream_options``) is passed on after one LLM call, and later calls still ask for
    usage: a second paid call and a URL marked for good were the old answer to it."""

    async def echo400(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes):
        err = {
            "message": "max_tokens is too large: 999999. Request: " + body.decode(),
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": None,
        }
        return await respond(400, orjson.dumps({"error": err}))(reader, writer, body)

    upstream.script.extend([echo400, sse([chunk("Sunny."), b"data: [DONE]\n\n"])])
    c, _ = gateway(llm_route(upstream))
    with c:
        r = ask(c, stream=True, max_tokens=999999)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert len(upstream.requests) == 1
        assert events_of(ask(c, stream=True).text)[-1] == "[DONE]"
    assert b"stream_options" in upstream.requests[1][1]


def test_a_refusal_is_remembered_only_once_the_retry_without_the_field_succeeded(
    upstream: Upstream,
) -> None:
    refusal = {
        "error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error",
            "param": "stream_options",
            "code": None,
        }
    }
    stream = sse([chunk("Sunny."), b"data: [DONE]\n\n"], "chunked")
    upstream.script.extend(
        [
            respond(400, orjson.dumps(refusal)),
            respond(503, b'{"error":{"message":"overloaded"}}'),  # the retry fails
            respond(400, orjson.dumps(refusal)),  # so the next call asks with the field
            stream,  # the retry works: from now on, without it
            stream,
        ]
    )
    c, _ = gateway(llm_route(upstream))
    with c:
        assert ask(c, stream=True).status_code == 502
        for _ in range(2):
            assert events_of(ask(c, stream=True).text)[-1] == "[DONE]"
    sent = [b"stream_options" in body for _, body in upstream.requests]
    assert sent == [True, False, True, False, False]


@pytest.mark.parametrize(
    ("status", "body", "refused"),
    [
        (400, {"error": {"message": "Unknown parameter: 'x'.", "param": "stream_options"}}, True),
        (
            400,
            {"error": {"message": "Unrecognized request argument supplied: stream_options"}},
            True,
        ),
        (400, {"message": "stream_options is not supported", "object": "error"}, True),
        (
            400,  # vLLM before stream_options: pydantic's error, as text
            {
                "object": "error",
                "message": "[{'type': 'extra_forbidden', 'loc': ('body', 'stream_options'), "
                "'msg': 'Extra inputs are not permitted', 'input': {'include_usage': True}}]",
            },
            True,
        ),
        (
            422,  # FastAPI's validation error
            {
                "detail": [
                    {
                        "type": "extra_forbidden",
                        "loc": ["body", "stream_options"],
                        "msg": "Extra inputs are not permitted",
                        "input": {"include_usage": True},
                    }
                ]
            },
            True,
        ),
        (
            400,
            {
                "error": {
                    "message": 'bad max_tokens in {"stream_options":{}}',
                    "param": "max_tokens",
                }
            },
            False,
        ),
        (
            422,
            {"detail": [{"loc": ["body", "max_tokens"], "msg": "bad", "input": "stream_options"}]},
            False,
        ),
        (500, {"error": {"message": "x", "param": "stream_options"}}, False),
        (400, {"error": "unsupported field in request"}, False),
    ],
)
def test_only_an_error_that_names_stream_options_as_unknown_is_a_refusal(
    status: int, body: dict[str, Any], refused: bool
) -> None:
    assert _refuses_stream_options(status, orjson.dumps(body)) is refused
    assert _refuses_stream_options(status, b"not json stream_options unknown") is False


# --------------------------------------------------------------- metrics and routing


def test_a_call_ending_after_its_breaker_was_pruned_leaves_no_circuit_series() -> None:
    """A call to an SLM whose task was deleted meanwhile fails after the scrape pruned its
    breaker: its circuit must not come back on /metrics at 2, where nothing removes it and
    SlmFleetSlmCircuitOpen would fire until the gateway restarts."""
    metrics = GatewayMetrics()
    breakers = Breakers(failures=1, cooldown_s=5.0, metrics=metrics)
    url = "http://old-slm:8000/v2/models/t/infer"
    key = CircuitKey("team-a", "t", url)
    b = breakers.get("slm", key)  # a call is in flight with this breaker
    breakers.prune(set())  # the task goes, a scrape prunes
    breakers.record("slm", key, b, False, 0.0)  # the call fails: its breaker opens
    breakers.allow("slm", key, b, 1e9)
    assert "slm_gateway_circuit_state{" not in generate_latest(metrics.registry).decode()
    fresh = breakers.get("slm", key)  # a route that uses the URL again gets its own
    breakers.record("slm", key, fresh, False, 0.0)
    text = generate_latest(metrics.registry).decode()
    labels = f'backend="slm",endpoint="{url}",namespace="team-a",task="t"'
    assert f"slm_gateway_circuit_state{{{labels}}} 2.0" in text


def test_models_built_while_a_task_was_added_are_not_cached_as_current(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher thread adds a task while /v1/models is built from the old list: the next
    call must list it, not serve the old list until some other change."""
    table = RouteTable()
    table.replace_all([llm_route(upstream)])
    app = create_app(GatewayConfig(), table)
    routes = table.routes

    def racing() -> list[Route]:
        snapshot = routes()
        table.upsert(Route(task="other", mode="llm", llm_base_url=upstream.llm_url, llm_model="m"))
        return snapshot

    with TestClient(app) as c:
        monkeypatch.setattr(table, "routes", racing)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["weather"]
        monkeypatch.setattr(table, "routes", routes)
        assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["other", "weather"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"), ("GET", "/healthz/")],
)
def test_a_trailing_slash_is_an_openai_style_404_not_an_empty_redirect(
    upstream: Upstream, method: str, path: str
) -> None:
    c, _ = gateway(llm_route(upstream))
    with c:
        r = c.request(method, path, content=b"{}", follow_redirects=False)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found" and path in r.json()["error"]["message"]
    assert upstream.requests == []


def test_the_slm_is_asked_to_drop_a_call_still_queued_when_the_tasks_budget_ends(
    upstream: Upstream,
) -> None:
    """Triton's ``timeout`` request parameter carries the task's SLM budget: a call queued
    behind slow batches is dropped by Triton once the gateway has fallen back to the LLM,
    and the exported model's own queue limit no longer refuses calls still in budget."""
    upstream.script.append(infer_answer('{"role":"assistant","content":"Sunny."}'))
    c, _ = gateway(slm_route(upstream, slm_timeout_s=20.0))
    with c:
        r = ask(c)
        assert (r.status_code, r.headers["x-slm-backend"]) == (200, "slm")
    [(_, body)] = upstream.requests
    assert orjson.loads(body)["parameters"] == {"timeout": 20_000_000}


def test_the_slms_text_is_served_up_to_the_requests_stop_sequence(upstream: Upstream) -> None:
    """OpenAI never returns the stop sequence or what follows it; an agent's ReAct loop
    relies on that."""
    text = "Thought: look it up\nObservation: sunny\nFinal Answer: sunny"
    upstream.script.append(
        infer_answer(orjson.dumps({"role": "assistant", "content": text}).decode())
    )
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, stop=["Observation:"])
    assert r.headers["x-slm-backend"] == "slm"
    assert r.json()["choices"][0]["message"]["content"] == "Thought: look it up\n"


def test_a_request_only_the_llm_can_answer_is_no_circuit_open_fallback(upstream: Upstream) -> None:
    """With the SLM's circuit open, a call the SLM could never have answered (n=2) was
    counted as a circuit_open fallback, which the operator counts as a failed SLM call."""
    for _ in range(3):  # three failures open the circuit (breaker_failures=3)
        upstream.script.extend([respond(500, b"{}"), respond(200, orjson.dumps(COMPLETION))])
    upstream.script.append(respond(200, orjson.dumps(COMPLETION)))
    c, _ = gateway(slm_route(upstream))
    with c:
        for _ in range(3):
            assert ask(c).headers["x-slm-fallback-reason"] == "slm_error"
        r = ask(c, n=2)
        assert r.status_code == 200 and "x-slm-fallback-reason" not in r.headers
        assert metric(c, "slm_gateway_fallbacks_total", reason="circuit_open") == 0


# ------------------------------------------------------------ shadow judges the served answer


def shadow_result(c: TestClient) -> str:
    """The one shadow comparison's result label, once the background copy has counted it."""
    results = ("agree", "disagree", "error", "defer", "skipped")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        counted = [r for r in results if metric(c, "slm_gateway_shadow_total", result=r)]
        if counted:
            return counted[0]
        time.sleep(0.02)
    return ""


def completion_of(message: dict[str, Any]) -> bytes:
    doc = dict(COMPLETION, choices=[{"index": 0, "message": message, "finish_reason": "stop"}])
    return orjson.dumps(doc)


@pytest.mark.parametrize("task_metric", ["exact-match", "label-accuracy", ""])
def test_shadow_agreement_judges_the_slm_text_cut_at_stop_as_served(
    upstream: Upstream, task_metric: str
) -> None:
    """A ReAct agent's ``stop: ["Observation:"]``: the LLM stops before it, the SLM writes
    past it. Served, the SLM's text is cut there and reads as the LLM's; judged raw in
    shadow it disagreed, lowering the agreement that gates the task's rollout."""
    llm = {"role": "assistant", "content": "Thought: look it up\n"}
    slm = {"role": "assistant", "content": "Thought: look it up\nObservation: 42"}
    upstream.script.extend(
        [respond(200, completion_of(llm)), infer_answer(orjson.dumps(slm).decode())]
    )
    c, _ = gateway(slm_route(upstream, mode="shadow", metric=task_metric))
    with c:
        r = ask(c, stop=["Observation:"])
        assert r.headers["x-slm-backend"] == "llm"
        assert shadow_result(c) == "agree"


@pytest.mark.parametrize("task_metric", ["tool-call-ast", "exact-match"])
def test_shadow_agreement_judges_a_call_without_arguments_as_served(
    upstream: Upstream, task_metric: str
) -> None:
    """An SLM call with no ``arguments`` key is served with ``"{}"``, the LLM's own call."""
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    llm = {"role": "assistant", "content": None, "tool_calls": [call]}
    slm = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "now"}}]}
    upstream.script.extend(
        [respond(200, completion_of(llm)), infer_answer(orjson.dumps(slm).decode())]
    )
    c, _ = gateway(slm_route(upstream, mode="shadow", metric=task_metric))
    with c:
        assert ask(c, tools=tools).headers["x-slm-backend"] == "llm"
        assert shadow_result(c) == "agree"


# ------------------------------------------------------------------ the task's LLM key


KEY = "sk-task-SECRET-0123456789"


def keyed_route(up: Upstream) -> Route:
    """An LLM task whose LLM key is :data:`KEY`."""
    return Route(
        task="weather", mode="llm", llm_base_url=up.llm_url, llm_model="m", llm_api_key=KEY
    )


def quoting_authorization(
    upstream: Upstream, escaped: bool, write: Callable[[str], bytes]
) -> bytes:
    """What ``write`` makes of the last request's Authorization header; ``escaped``: with the
    key's first character written as a JSON escape, which a search of the bytes misses."""
    auth = re.search(r"(?im)^authorization:\s*(.*?)\r?$", upstream.requests[-1][0].decode())
    out = write(auth.group(1) if auth else "")
    if escaped:
        out = out.replace(KEY.encode(), b"\\u%04x" % ord(KEY[0]) + KEY[1:].encode())
    return out


def echo_authorization(upstream: Upstream, escaped: bool) -> Action:
    """A 404 in OpenAI's own error shape that quotes the request's Authorization header, as
    some proxies do in "model not found for request with ..." messages; ``escaped`` as in
    :func:`quoting_authorization`."""

    def write(quoted: str) -> bytes:
        error = {"message": f"model not found for {quoted}", "type": "invalid_request_error"}
        return orjson.dumps(
            {"error": dict(error, param="model", code="model_not_found"), "echo": quoted}
        )

    async def action(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
    ) -> bool:
        doc = quoting_authorization(upstream, escaped, write)
        return await respond(404, doc)(reader, writer, body)

    return action


@pytest.mark.parametrize("escaped", [False, True], ids=["plain", "json-escaped"])
def test_an_llm_error_in_openais_shape_never_shows_the_tasks_key(
    upstream: Upstream, escaped: bool
) -> None:
    """An LLM error already in OpenAI's shape is passed on as it came, and one that quoted
    the gateway's Authorization header showed the agent the task's LLM key. The key is now
    masked there too, and the rest of the body is still the LLM's."""
    upstream.script.extend([echo_authorization(upstream, escaped) for _ in range(2)])
    c, _ = gateway(keyed_route(upstream))
    with c:
        for stream in (False, True):
            r = ask(c, stream=stream)
            assert r.status_code == 404 and KEY not in r.text, stream
            doc = r.json()
            assert doc["error"]["message"] == "model not found for Bearer [redacted]"
            assert doc["error"]["code"] == "model_not_found" and doc["error"]["param"] == "model"
            assert doc["echo"] == "Bearer [redacted]"
    assert KEY.encode() in upstream.requests[-1][0]  # the key did travel, to the LLM alone


def test_a_streamed_answer_holding_the_key_as_words_is_relayed_as_written(
    upstream: Upstream,
) -> None:
    """Only an error event is searched for the task's key: a local server's placeholder key
    ("ollama", "EMPTY") is a word an answer may hold, and masking answers rewrote them for
    the agent and for the capture ("Install [redacted] with: ...")."""
    said = [chunk("Install ollama with: curl -fsSL https://ollama.com/install.sh | sh")]
    upstream.script.append(sse([*said, b"data: [DONE]\n\n"], "chunked"))
    route = dataclasses.replace(keyed_route(upstream), llm_api_key="ollama")
    c, _ = gateway(route)
    with c:
        r = ask(c, stream=True)
    assert r.status_code == 200 and r.text.startswith(said[0].decode())  # byte for byte
    assert "[redacted]" not in r.text


def stream_quoting_authorization(upstream: Upstream, escaped: bool, first: bytes) -> Action:
    """A streamed answer that began (``first``) and then ended with OpenAI's error event
    quoting the request's Authorization header; ``escaped`` as in
    :func:`quoting_authorization`."""

    def write(quoted: str) -> bytes:
        error = {"message": f"upstream rejected credentials {quoted}", "code": "invalid_api_key"}
        return b"event: error\ndata: " + orjson.dumps({"error": error}) + b"\n\n"

    async def action(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
    ) -> bool:
        event = quoting_authorization(upstream, escaped, write)
        return await sse([first, event, b"data: [DONE]\n\n"], "chunked")(reader, writer, body)

    return action


@pytest.mark.parametrize("escaped", [False, True], ids=["plain", "json-escaped"])
def test_a_streamed_llm_error_never_shows_the_tasks_key(upstream: Upstream, escaped: bool) -> None:
    """A stream that had begun can only end in an error event, and one that quoted the
    gateway's Authorization header showed the agent the task's LLM key, which a 4xx no longer
    did. The key is masked in the event too; the events that do not quote it, a JSON escape
    included, are relayed as the LLM wrote them."""
    first = chunk("caf\u00e9 ").replace("\u00e9".encode(), b"\\u00e9")  # as Python's json writes it
    upstream.script.append(stream_quoting_authorization(upstream, escaped, first))
    c, _ = gateway(keyed_route(upstream))
    with c:
        r = ask(c, stream=True)
    assert r.status_code == 200 and KEY not in r.text
    assert r.text.startswith(first.decode())  # byte for byte
    events = events_of(r.text.replace("event: error\n", ""))
    # The stream ends at the error event, or with the LLM's [DONE] when it came with it.
    (error,) = [ev["error"] for ev in events if isinstance(ev, dict) and "error" in ev]
    assert error["message"] == "upstream rejected credentials Bearer [redacted]"
    assert error["code"] == "invalid_api_key"
    assert "event: error\ndata: " in r.text  # the event's other fields are kept
    assert KEY.encode() in upstream.requests[-1][0]  # the key did travel, to the LLM alone


# ------------------------------------------------------------ the request's token limit


def infer_request(up: Upstream, i: int = 0) -> dict[str, Any]:
    """The ``REQUEST`` the gateway's ``i``-th call to Triton held (messages, tools...)."""
    doc = orjson.loads(up.requests[i][1])
    return orjson.loads(doc["inputs"][0]["data"][0])


@pytest.mark.parametrize(
    ("limits", "sent"),
    [
        ({}, None),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 40}, 40),
        ({"max_tokens": 50, "max_completion_tokens": 20}, 20),
        ({"max_tokens": 20, "max_completion_tokens": 50}, 20),
    ],
)
def test_the_slm_is_sent_the_requests_token_limit(
    upstream: Upstream, limits: dict[str, int], sent: int | None
) -> None:
    """The SLM generated up to its own max_new_tokens whatever the agent allowed: it is
    told the request's limit, the smaller of the two fields, and nothing without one."""
    upstream.script.append(
        infer_answer('{"role":"assistant","content":"Sunny.","usage":{"completion_tokens":3}}')
    )
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, **limits)
    assert r.headers["x-slm-backend"] == "slm"
    inner = infer_request(upstream)
    assert inner.get("max_tokens") == sent and ("max_tokens" in inner) == (sent is not None)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_an_slm_answer_cut_at_the_requests_limit_goes_to_the_llm_as_no_slm_failure(
    upstream: Upstream, threshold: float
) -> None:
    """A model cut at the agent's own max_tokens answers finish_reason "length" (confidence
    0, as the model serves a cut answer): the LLM answers with its own cut answer. That is
    the agent's limit, not the SLM failing: a hand-back (``defer``), never ``bad_output``
    (the SLM's error rate, which rolls a canary back) nor a failure of its circuit."""
    cut = '{"role":"assistant","content":"Paris is a","finish_reason":"length",'
    cut += '"usage":{"completion_tokens":5}}'
    llm_cut = dict(COMPLETION, choices=[{**COMPLETION["choices"][0], "finish_reason": "length"}])
    for _ in range(4):  # one more than breaker_failures
        upstream.script.extend([infer_answer(cut, 0.0), respond(200, orjson.dumps(llm_cut))])
    c, _ = gateway(slm_route(upstream, confidence_threshold=threshold))
    with c:
        for _ in range(4):
            r = ask(c, max_tokens=5)
            assert r.headers["x-slm-backend"] == "llm"
            assert r.headers["x-slm-fallback-reason"] == "defer"
            assert r.json()["choices"][0]["finish_reason"] == "length"  # the LLM's, as it came
        assert metric(c, "slm_gateway_backend_calls_total", backend="slm", result="defer") == 4
        assert metric(c, "slm_gateway_backend_calls_total", backend="slm", result="bad_output") == 0
        assert metric(c, "slm_gateway_circuit_state", backend="slm") == 0


def test_an_slm_that_ignores_the_limit_is_not_served_past_it(upstream: Upstream) -> None:
    """A repository exported by an older trainer ignores the field and reports no count:
    its whole answer came back as a finished one with usage.completion_tokens far above the
    agent's max_tokens. Over the limit by the gateway's count, it is handed back as cut."""
    long = orjson.dumps({"role": "assistant", "content": "Paris is lovely. " * 30}).decode()
    upstream.script.extend([infer_answer(long), respond(200, orjson.dumps(COMPLETION))])
    upstream.script.append(infer_answer(long))
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, max_tokens=5)
        assert r.headers["x-slm-backend"] == "llm"
        assert r.headers["x-slm-fallback-reason"] == "defer"
        r = ask(c, max_tokens=1000)  # within the limit: served, counted within it
        assert r.headers["x-slm-backend"] == "slm"
        assert 0 < r.json()["usage"]["completion_tokens"] <= 1000
        assert metric(c, "slm_gateway_circuit_state", backend="slm") == 0


def test_the_slms_own_token_count_is_served_and_judged(upstream: Upstream) -> None:
    """A model that honours the limit reports the tokens it generated: the agent gets that
    count (the byte estimate of the whole message said 11 for "Sunny." and its wrapping,
    over the agent's max_tokens of 5), and an answer within the limit is served."""
    upstream.script.append(
        infer_answer('{"role":"assistant","content":"Sunny.","usage":{"completion_tokens":3}}')
    )
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, max_tokens=5)
    assert r.headers["x-slm-backend"] == "slm"
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3
    assert "usage" not in r.json()["choices"][0]["message"]


def test_a_selectors_short_label_is_served_within_a_small_limit(upstream: Upstream) -> None:
    """A selector's label is not generated text and comes with no count: the gateway counts
    the label's text, not the message's JSON around it, so a classification agent's
    max_tokens of 3 still gets the selector's "billing", counted within the limit."""
    upstream.script.append(
        infer_answer('{"role":"assistant","content":"billing","label":"billing"}')
    )
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, max_tokens=3)
    assert r.headers["x-slm-backend"] == "slm"
    assert r.json()["choices"][0]["message"]["content"] == "billing"
    assert r.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("label", ["yes", "positive", "billing"])
def test_a_selectors_label_is_served_under_max_tokens_1(upstream: Upstream, label: str) -> None:
    """A classification agent asks for one token (max_tokens: 1). The label carries no count
    and "positive" is 2 tokens at ~4 bytes a token: held to the limit by that estimate,
    every such call went to the LLM as ``defer``. A label is what the LLM would name in a
    token or two: served."""
    answer = orjson.dumps({"role": "assistant", "content": label, "label": label}).decode()
    upstream.script.extend([infer_answer(answer), respond(200, orjson.dumps(COMPLETION))])
    c, _ = gateway(slm_route(upstream))
    with c:
        r = ask(c, max_tokens=1)
    assert r.headers["x-slm-backend"] == "slm", r.headers.get("x-slm-fallback-reason")
    assert r.json()["choices"][0]["message"]["content"] == label
    # and its usage, an estimate, is not served above the limit the agent set
    assert r.json()["usage"]["completion_tokens"] <= 1
