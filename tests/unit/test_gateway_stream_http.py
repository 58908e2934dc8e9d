"""Streamed answers over real HTTP: a gateway process (uvicorn) in front of the stand-in.

What only real sockets show: events reach the agent while the LLM is still generating (not
when it is done), and an agent that hangs up mid-stream makes the gateway drop the LLM call
and count it, without a traceback, and the gateway goes on serving.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from slm_e2e import llm_standin
from slm_gateway.testing import GatewayProcess, start_gateway

DELAY_MS = 250  # between the stand-in's events


@pytest.fixture(scope="module")
def standin() -> Iterator[llm_standin.StandIn]:
    with llm_standin.start(llm_stream_delay_ms=DELAY_MS) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(
    standin: llm_standin.StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    d: Path = tmp_path_factory.mktemp("stream")
    routes = d / "routes.yaml"
    task = {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}
    routes.write_text(yaml.safe_dump({"tasks": {"weather": task}}))
    with start_gateway(["--routes", str(routes)], log_path=d / "gw.log") as gw:
        yield gw
        log = gw.log()
    assert "Traceback" not in log and "internal error" not in log


def request(stream: bool = True) -> bytes:
    return orjson.dumps(
        {
            "model": "weather",
            "stream": stream,
            "messages": [{"role": "user", "content": "Tell me about the weather in Lyon"}],
        }
    )


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    _, body = gw.get("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_events_reach_the_agent_while_the_llm_is_still_generating(gateway: GatewayProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=request())
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/event-stream")
    arrivals: list[tuple[float, bytes]] = []
    while line := resp.readline():
        if line.startswith(b"data: "):
            arrivals.append((time.monotonic(), line[6:].strip()))
    conn.close()
    assert arrivals[-1][1] == b"[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for _, data in arrivals[:-1]
        for c in [orjson.loads(data)]
        if c["choices"]
    )
    assert text == "echo: Tell me about the weather in Lyon"
    # The stand-in pauses DELAY_MS before each event after the first: had the gateway waited
    # for the whole answer, every event would have arrived at once.
    spread = arrivals[-1][0] - arrivals[0][0]
    assert spread >= (len(arrivals) - 2) * DELAY_MS / 1000 * 0.8


def test_an_agent_that_hangs_up_mid_stream_cuts_the_llm_call(gateway: GatewayProcess) -> None:
    before = metric(gateway, "slm_gateway_streams_total", result="client_disconnected")
    llm = {"backend": "llm"}
    cut_off = {**llm, "result": "client_disconnected"}
    counted = {  # the LLM's attempts cut off, tokens, spend and answers before
        name: metric(gateway, name, **labels)
        for name, labels in (
            ("slm_gateway_backend_calls_total", cut_off),
            ("slm_gateway_tokens_total", llm),
            ("slm_gateway_cost_usd_total", llm),
            ("slm_gateway_requests_total", llm),
        )
    }
    raw = request()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)
        )
        got = b""
        while b"data: " not in got:
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
    # The gateway notices at the LLM's next event and leaves the stream (closing the LLM's
    # connection); nothing is captured or counted as answered.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(gateway, "slm_gateway_streams_total", result="client_disconnected") > before:
            break
        time.sleep(0.05)
    assert metric(gateway, "slm_gateway_streams_total", result="client_disconnected") == before + 1
    # The LLM worked on the call (and bills it): the attempt, its tokens so far and their
    # cost are counted, though it answered nobody.
    attempts = metric(gateway, "slm_gateway_backend_calls_total", **cut_off)
    assert attempts == counted["slm_gateway_backend_calls_total"] + 1
    for name in ("slm_gateway_tokens_total", "slm_gateway_cost_usd_total"):
        assert metric(gateway, name, **llm) > counted[name], name
    answered = metric(gateway, "slm_gateway_requests_total", **llm)
    assert answered == counted["slm_gateway_requests_total"]
    # ... and it goes on serving.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=request(stream=False))
    resp = conn.getresponse()
    assert resp.status == 200 and orjson.loads(resp.read())["choices"][0]["message"]["content"]
    conn.close()


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: -1\r\n",
        b"Content-Length: %d\r\nContent-Length: 5\r\n",
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_a_request_the_http_parser_refuses_gets_an_openai_error(
    gateway: GatewayProcess, framing: bytes
) -> None:
    """uvicorn answered these with a plain-text 400 that an agent's OpenAI client cannot
    read; every other bad request gets an OpenAI-style error body."""
    body = request(stream=False)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    framing = framing.replace(b"%d", str(len(body)).encode())
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(head + framing + b"\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request", answer
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in headers.lower()
    error = orjson.loads(payload)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_http"
    assert "Content-Length" in error["message"]


def test_a_body_that_stalls_is_answered_408_not_waited_for_forever(
    standin: llm_standin.StandIn, tmp_path: Path
) -> None:
    """Headers promising 1000 bytes, then 9: the gateway waited for the rest with no deadline
    (50 such connections were held open), and the agent never got an answer."""
    routes = tmp_path / "routes.yaml"
    task = {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}
    routes.write_text(yaml.safe_dump({"tasks": {"weather": task}}))
    args = ["--routes", str(routes), "--body-timeout-s", "0.5"]
    with start_gateway(args, log_path=tmp_path / "gw.log") as gw:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"model":'
            )
            t = time.monotonic()
            answer = s.recv(65536)
            waited = time.monotonic() - t
            # Closed after it: kept alive, the parser still expected 991 body bytes, took the
            # client's next request on this connection for them and never answered it.
            s.settimeout(5)
            rest = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):  # a socket.timeout here: left open
                    rest += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        head, _, payload = (answer + rest).partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        error = orjson.loads(payload)["error"]
        assert error["code"] == "request_timeout" and "0.5 s" in error["message"]
        assert waited < 8, waited
        # ...and a whole request is served as before.
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", request(stream=False))
        assert conn.getresponse().status == 200
        conn.close()


#: How long the slow LLM below holds an answer back unless the gateway hangs up on it first.
HOLD_S = 6.0
#: How long it takes to send its status line when told "before status": longer than the
#: agent's read timeout in the test below.
STATUS_AFTER_S = 1.0


class _SlowLLM(BaseHTTPRequestHandler):
    """An LLM that holds a streamed answer back after its status line, which it sends at once,
    or after :data:`STATUS_AFTER_S` when the last user message is "before status". It gives
    up and notes the call in ``server.cut`` as soon as the gateway closes the connection (the
    call cut off), else answers after :data:`HOLD_S`."""

    def do_POST(self) -> None:
        req = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        when = req["messages"][-1]["content"]
        if when == "before status":
            time.sleep(STATUS_AFTER_S)
        self._head()
        readable, _, _ = select.select([self.connection], [], [], HOLD_S)
        if readable and not self.connection.recv(1, socket.MSG_PEEK):
            self.server.cut.append(when)  # type: ignore[attr-defined]
            return
        message = {"role": "assistant", "content": "Sunny."}
        events = llm_standin.stream_events(
            message, completion_id="chatcmpl-slow", created=0, model="gpt-4o", usage=None
        )
        self.wfile.write(b"".join(events))

    def _head(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowLLM)
    server.cut = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d: Path = tmp_path_factory.mktemp("slow")
    routes = d / "routes.yaml"
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    task = {"mode": "llm", "llmBaseURL": url, "llmModel": "gpt-4o"}
    routes.write_text(yaml.safe_dump({"tasks": {"weather": task}}))
    with start_gateway(["--routes", str(routes)], log_path=d / "gw.log") as gw:
        gw.llm = server  # type: ignore[attr-defined]
        yield gw
        log = gw.log()
    server.shutdown()
    assert "Traceback" not in log and "internal error" not in log


@pytest.mark.parametrize("when", ["before status", "before first event"])
def test_an_agent_that_gives_up_before_the_first_event_cuts_the_llm_call(
    slow_gateway: GatewayProcess, when: str
) -> None:
    """An SDK's read timeout before the LLM's first token: the gateway noticed the hang-up
    only between the LLM's events, so the call ran to its end, was counted complete and
    captured, and the SDK's retries paid the LLM up to three times. Now the LLM's connection
    is closed at the hang-up, or, before the LLM's status, as soon as the status comes (the
    wait for it is not cut short: its timeout is the breaker's to learn); the stream is
    counted client_disconnected, nothing answered."""
    gw = slow_gateway
    llm = {"backend": "llm"}
    counted = {  # the streams by how they ended, the LLM's attempts cut off, its answers
        (name, tuple(labels.items())): metric(gw, name, **labels)
        for name, labels in (
            ("slm_gateway_streams_total", {"result": "complete"}),
            ("slm_gateway_streams_total", {"result": "client_disconnected"}),
            ("slm_gateway_backend_calls_total", {**llm, "result": "client_disconnected"}),
            ("slm_gateway_requests_total", llm),
        )
    }
    body = orjson.dumps(
        {"model": "weather", "stream": True, "messages": [{"role": "user", "content": when}]}
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        sock.settimeout(0.5)  # the agent's read timeout
        got = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                got += chunk
    if when == "before status":
        assert got == b""
    else:
        assert got.startswith(b"HTTP/1.1 200") and b"data: " not in got, got
    cut: list[str] = gw.llm.cut  # type: ignore[attr-defined]
    deadline = time.monotonic() + HOLD_S / 2
    while when not in cut and time.monotonic() < deadline:
        time.sleep(0.05)
    assert when in cut, "the LLM's call was not cut off when the agent hung up"
    cut.remove(when)
    hung_up = counted["slm_gateway_streams_total", (("result", "client_disconnected"),)] + 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if metric(gw, "slm_gateway_streams_total", result="client_disconnected") == hung_up:
            break
        time.sleep(0.05)
    for (name, labels), before in counted.items():
        more = labels[-1] == ("result", "client_disconnected")
        assert metric(gw, name, **dict(labels)) == before + more, (name, labels)


def test_an_llm_that_never_answers_opens_its_circuit_though_every_agent_gives_up_first(
    tmp_path: Path,
) -> None:
    """An LLM that takes calls and never answers, behind agents whose read timeout is shorter
    than --llm-timeout-s: every streamed call was cut at the agent's hang-up and counted
    client_disconnected only, so no error was counted and the circuit never opened, and each
    retry waited on the hung LLM again. The wait for the LLM's status is not cut short by a
    hang-up: it ends with the LLM's timeout, counted and learnt by the breaker as before."""
    llm = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []  # accepted, never answered

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                taken.append(llm.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    routes = tmp_path / "routes.yaml"
    url = f"http://127.0.0.1:{llm.getsockname()[1]}/v1"
    routes.write_text(
        yaml.safe_dump({"tasks": {"weather": {"mode": "llm", "llmBaseURL": url, "llmModel": "m"}}})
    )
    args = ["--routes", str(routes), "--llm-timeout-s", "1", "--breaker-failures", "2"]
    args += ["--breaker-cooldown-s", "60"]
    with start_gateway(args, log_path=tmp_path / "gw.log") as gw:
        raw = request()
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                    + b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)
                )
                sock.settimeout(0.3)  # the agent's read timeout
                with pytest.raises(TimeoutError):
                    sock.recv(65536)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if metric(gw, "slm_gateway_errors_total", code="upstream_timeout") >= 2:
                break
            time.sleep(0.05)
        assert metric(gw, "slm_gateway_errors_total", code="upstream_timeout") == 2
        assert metric(gw, "slm_gateway_backend_calls_total", backend="llm", result="timeout") == 2
        cut = metric(gw, "slm_gateway_backend_calls_total", result="client_disconnected")
        assert cut == 0
        # The circuit is open: the next call is answered at once, without the hung LLM.
        t = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=raw)
        resp = conn.getresponse()
        assert resp.status == 503 and time.monotonic() - t < 0.5
        assert orjson.loads(resp.read())["error"]["code"] == "upstream_unavailable"
        conn.close()
        assert len(taken) == 2
    llm.close()
    for conn in taken:
        conn.close()
