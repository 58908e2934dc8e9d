"""One write per response: the held response head (slm_gateway.wire).

The protocol tests drive uvicorn's real httptools protocol and a real ASGI app; only the
socket is replaced by a transport that records each write, because what is asserted is how
many writes (and so TCP segments and syscalls) one answer takes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from slm_gateway.wire import HeldHeadTransport, OneWriteHttpToolsProtocol


class Recorder(asyncio.Transport):
    """A transport that keeps what is written, one entry per write call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A plain test that runs the coroutine ``test`` on a fresh event loop."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())

    return wrapper


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


@run
async def test_a_head_and_its_body_go_out_as_one_write() -> None:
    raw = Recorder()
    t = HeldHeadTransport(raw, asyncio.get_running_loop())
    t.write(HEAD)
    assert raw.writes == [] and t.get_write_buffer_size() == len(HEAD)
    t.write(b"{}")
    assert raw.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)  # the safety flush finds nothing held
    assert raw.writes == [HEAD + b"{}"]


@run
async def test_a_head_alone_is_written_on_the_next_loop_turn() -> None:
    """A streamed answer's first event may be seconds away: its head must not wait for it."""
    raw = Recorder()
    t = HeldHeadTransport(raw, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    t.write(b"data: 1\n\n")  # not a head: straight through
    assert raw.writes[-1] == b"data: 1\n\n"


@run
async def test_closing_writes_a_held_head_first_and_the_rest_passes_through() -> None:
    raw = Recorder()
    t = HeldHeadTransport(raw, asyncio.get_running_loop())
    t.write(HEAD)
    t.close()
    assert raw.writes == [HEAD] and raw.closed
    t.pause_reading()  # not wrapped: the real transport's
    assert raw.paused
    assert t.get_extra_info("peername") == ("127.0.0.1", 50000)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers[:1]})
        await asyncio.sleep(0.05)  # the first event is late
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def protocol(loop: asyncio.AbstractEventLoop) -> tuple[OneWriteHttpToolsProtocol, Recorder]:
    config = Config(app, http=OneWriteHttpToolsProtocol, lifespan="off", access_log=False)
    proto = OneWriteHttpToolsProtocol(config, ServerState(), app_state={}, _loop=loop)
    raw = Recorder()
    proto.connection_made(raw)
    return proto, raw


async def wait_writes(raw: Recorder, n: int) -> None:
    for _ in range(200):
        if len(raw.writes) >= n:
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"{len(raw.writes)} writes, expected {n}: {raw.writes!r}")


@run
async def test_uvicorns_protocol_answers_each_request_in_one_write() -> None:
    proto, raw = protocol(asyncio.get_running_loop())
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    for n in (1, 2):  # two requests on one keep-alive connection
        proto.data_received(request)
        await wait_writes(raw, n)
        assert raw.writes[-1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert raw.writes[-1].endswith(b'\r\n\r\n{"ok":true}')
    await asyncio.sleep(0.01)
    assert len(raw.writes) == 2
    proto.connection_lost(None)


@run
async def test_a_streamed_answers_head_does_not_wait_for_its_first_event() -> None:
    proto, raw = protocol(asyncio.get_running_loop())
    proto.data_received(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    await wait_writes(raw, 1)
    assert raw.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and raw.writes[0].endswith(b"\r\n\r\n")
    await wait_writes(raw, 3)
    assert raw.writes[1:] == [b"9\r\ndata: x\n\n\r\n", b"0\r\n\r\n"]
    proto.connection_lost(None)
