"""One write per response: uvicorn's httptools protocol with its response head held back.

Why: uvicorn writes a response's status line and headers (``http.response.start``) and its
body (``http.response.body``) as two ``transport.write`` calls, and uvloop sends each at once
when the socket's buffer is empty. Every answer then costs two ``write`` syscalls and two TCP
segments, and the agent's side wakes up twice to read one response (strace on the
benchmark's gateway: three writes per call, one to the LLM and two to the agent). Holding
the head until the body's first bytes are written sends both in one segment.

The head is never held past the current turn of the event loop: a ``call_soon`` flushes it
if no body write follows at once (a streamed answer whose first event is still on its way,
a ``100 Continue``), so nothing waits on it. Anything else the protocol does with its
transport (close, pause and resume reading, extra info) passes straight through, with a
held head written first.

This leans on one uvicorn internal: a request's response cycle writes through the protocol's
``transport`` attribute. ``tests/unit/test_gateway_wire.py`` drives uvicorn's real protocol
and counts the writes per answer, so an upgrade that changes this fails there, not in
production.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from slm_gateway.errors import CODE_INVALID_HTTP, error_body

_HEAD = b"HTTP/"


class HeldHeadTransport:
    """A transport that holds a response head back until the next write or the next loop turn.

    Only ``write`` and ``close`` change behaviour; every other attribute is the wrapped
    transport's. What is written is always the same bytes in the same order.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = loop

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif data[:5] == _HEAD and not self._transport.is_closing():
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        """Write the held head now (no-op if none is held)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self._transport.get_write_buffer_size() + (len(held) if held else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose request cycles write through :class:`HeldHeadTransport`.

    uvicorn hands ``self.transport`` to each request's response cycle, so wrapping it once per
    connection covers every response on it; flow control keeps the raw transport.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = HeldHeadTransport(transport, self.loop)  # type: ignore[assignment]

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refuses (a negative or doubled Content-Length, both it
        and chunked encoding) gets an OpenAI-style error like every other bad request, not
        uvicorn's plain text, which an agent's OpenAI client cannot read."""
        body = error_body(
            f"{msg.rstrip('.')}: the request is not valid HTTP/1.1 (its request line, a "
            "header, or its framing: Content-Length, Transfer-Encoding)",
            code=CODE_INVALID_HTTP,
        )
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
