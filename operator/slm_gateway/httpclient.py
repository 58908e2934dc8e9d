"""A lean HTTP/1.1 keep-alive client for the gateway's two upstreams (the LLM and Triton).

Why not aiohttp's client: the gateway sits on every agent call, and on this project's 2-core
machine the forwarding client was most of its CPU. In ``bench/gateway_bench.py`` a bare
uvicorn pass-through spent about 210 µs of CPU per call with aiohttp's ``ClientSession`` and
about 80 µs with this client (c=64, same LLM stand-in, same wrk load), and reached 31 % vs
67 % of the stand-in's direct rate. aiohttp builds a request object, a multidict of headers, a
response object and a stream reader per call; the gateway needs none of that, because it
always sends one kind of request (``POST`` a JSON body to a URL fixed per route) and passes
the answer on as bytes.

What it does:

- **Parsing** is httptools (llhttp, the parser of Node.js, already a dependency through
  uvicorn): status line, headers, ``Content-Length``, chunked transfer coding, a body read
  until the connection closes, and skipped ``1xx`` interim responses.
- **Requests** are a precomputed byte prefix per route (:class:`Target`: request line,
  ``Host``, the JSON headers, the route's ``Authorization``) plus ``Content-Length`` and the
  body, written in one ``transport.write``.
- **Connections** are pooled per origin, at most ``limit_per_origin`` at once, shared by all
  routes on that origin (callers wait for a free one beyond that, for at most the call's own
  timeout, then get :class:`GatewayBusy`), reused while the server keeps them alive, and
  closed after ``idle_timeout`` seconds unused. TLS uses the system trust store
  (``ssl.create_default_context``) with the URL's host name checked.
- **Deadlines**: one deadline per call covers connecting, sending and the whole answer; it
  starts once the call holds a place in the pool, so time spent queued behind other calls
  is not taken from the upstream (a queued call used to time out as the upstream's failure
  though the upstream answered every call it got in time). A call that times out, is
  cancelled, or fails midway closes its connection, so a late answer can never be read as
  the next call's.
- **Stale keep-alive connections**: a server may close an idle connection just as a request
  is written to it. When a *reused* connection closes before a single byte of the answer
  arrived, and within :data:`STALE_CLOSE_WINDOW_S` of the write, the request is sent once
  more on a new connection (Go's ``net/http`` resends a POST only when none of it was
  written; a close that soon after the write is as near as a one-write client gets to that).
  Any other failure is raised, never retried, a later close included (the server worked on
  the request, then died): an LLM call costs money and may not be idempotent.

- **Streamed answers** (:meth:`Client.stream`, for ``"stream": true`` chat calls): the call
  returns once the status line and headers are in, and the body is handed over as it
  arrives, under the same single deadline. When the reader falls behind, the socket stops
  being read (``pause_reading``) above ``high_water`` buffered bytes (256 KiB), so
  a slow agent slows the LLM's connection instead of filling the gateway's memory. The
  connection goes back to the pool only if the answer was read to its end.

Errors: :class:`TimeoutError` when the deadline passes, :class:`OutOfFileDescriptors` when
this process has no file descriptor left for a new connection and :class:`GatewayBusy` when no
place in the pool came free in time (both the gateway's shortage, not the upstream's failure),
:class:`HTTPClientError` for everything else (refused, reset, malformed
answer, answer over ``max_body`` bytes), with a message that never contains request headers,
so never an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl as ssl_module
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httptools

from slm_contract import http_url_problem
from slm_gateway.errors import SERVER_ERROR, GatewayError

#: Headers every request carries: both upstreams take and return JSON.
JSON_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", "application/json"),
    ("Accept", "application/json"),
    # The answer is passed on and parsed as it arrives; nothing here decompresses.
    ("Accept-Encoding", "identity"),
    ("User-Agent", "slm-gateway"),
)

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")
#: At most one "out of file descriptors" warning per this many seconds.
OUT_OF_FILES_LOG_INTERVAL_S = 10.0


class HTTPClientError(Exception):
    """A call failed for a reason other than its deadline; the message is safe to log."""


#: The ``code`` of the 503 an agent gets when the gateway has no file descriptor left.
CODE_OUT_OF_FILES = "out_of_file_descriptors"


class OutOfFileDescriptors(GatewayError):
    """No connection could be opened: this process has no file descriptor left (``EMFILE``,
    or the system none, ``ENFILE``). The answer is a 503 in OpenAI's error body, with
    ``Retry-After: 1`` (another replica, or this one a moment later, answers the retry).

    Why not an :class:`HTTPClientError`: the caller takes those for the upstream failing,
    and under a burst of calls (about 500 concurrent ones with a soft limit of 1024) five of
    them opened the LLM's circuit for every task on it, long after the descriptors were free
    again. The shortage is the gateway's own, so this is the gateway's error: the request path
    answers any :class:`~slm_gateway.errors.GatewayError` as it is, and no breaker sees it.
    """

    def __init__(self) -> None:
        super().__init__(
            503,
            "The gateway is out of file descriptors (too many calls at once for its limit of "
            "open files); retry shortly.",
            type=SERVER_ERROR,
            code=CODE_OUT_OF_FILES,
            headers={"Retry-After": "1"},
        )


#: The ``code`` of the 503 an agent gets when no pooled connection came free in time.
CODE_GATEWAY_BUSY = "gateway_busy"


class GatewayBusy(GatewayError):
    """No connection to the upstream's origin came free within the call's timeout: the pool
    (``--upstream-pool-size`` connections per origin, shared by every task on it) is full of
    other calls. A 503 in OpenAI's error body with ``Retry-After: 1``.

    Why not a :class:`TimeoutError`: the caller takes those for the upstream failing to
    answer, so a burst of calls past the pool was answered 504 ``upstream_timeout`` and opened
    the LLM's circuit for every task on it, though the LLM answered every call it got in time.
    As with :class:`OutOfFileDescriptors`, the shortage is the gateway's: no breaker sees it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            503,
            f"The gateway is busy: all {limit} of its connections to this backend are in use "
            "by other calls (--upstream-pool-size, shared by all tasks on the backend) and none "
            "came free in time; retry shortly.",
            type=SERVER_ERROR,
            code=CODE_GATEWAY_BUSY,
            headers={"Retry-After": "1"},
        )


def out_of_file_descriptors(exc: OSError) -> bool:
    """Whether a failure to connect came from this process having no file descriptor left.

    ``EMFILE``/``ENFILE`` say so, but a host name is looked up first, and a lookup that cannot
    open ``/etc/hosts`` or a socket to the resolver fails in its own words (uvloop's reads
    "Name or service not known"): any other failure is checked by opening one descriptor.
    Only on the failure path, so a connect costs nothing more."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return True
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as probe:
        return probe.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return False


def _split(url: str) -> SplitResult:
    """``urlsplit`` with a fixed error text.

    Why: ``urlsplit``'s own ValueError quotes the netloc (user info, password included) for
    a URL with characters that change under NFKC normalization, and the gateway logs a
    refused URL's error on every resync; this message names the problem, never the value.
    """
    try:
        return urlsplit(url)
    except ValueError:
        raise ValueError(
            "the URL cannot be parsed (a bracket or a non-ASCII character in its host part?)"
        ) from None


def safe_url(url: str) -> str:
    """``url`` as logs and metric labels may show it: ``scheme://host[:port]/path``.

    Why: a provider's base URL may carry a key in its user info or its query string (Azure
    OpenAI's ``?api-version=`` is harmless, an ``?api_key=`` is not, and the gateway cannot
    tell them apart), so every log line and label names an upstream through this helper, which
    drops both, and the fragment, and a port that is not digits (it could be anything). Never
    raises: a URL that cannot be split is shown as a fixed text, as its raw form could hold
    anything.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.startswith("["):  # an IPv6 literal: its colons are not the port's
        host, _, rest = hostport.partition("]")
        host, port = host + "]", rest.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    netloc = f"{host}:{port}" if port.isdigit() else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def with_path(url: str, suffix: str) -> str:
    """``url`` with ``suffix`` appended to its path, its query (and fragment) kept after it.

    Why not ``url + suffix``: with a query in the base URL (``.../v1?api-version=...``) the
    suffix would land in the query and the call go to the wrong path. :class:`ValueError`
    with a fixed message (see :func:`_split`) for a URL that cannot be split.
    """
    parts = _split(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))


def header_value_problem(value: str) -> str:
    """Why ``value`` cannot go in an HTTP/1.1 header, or "" when it can: a line break or NUL
    inside (it would inject a header; a Secret made from a file of two lines), or a
    character outside Latin-1. Never quotes the value: it may be an API key."""
    if any(c in value for c in _FORBIDDEN_IN_HEADERS):
        return "a line break or NUL character inside"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return "a character an HTTP header cannot carry"
    return ""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one kind of request goes, parsed once when a route is built.

    ``head`` is the request up to (not including) ``Content-Length``; it may hold an API key,
    so it is left out of ``repr``, and so is ``path``, as its query may hold one too.
    """

    scheme: str
    host: str
    port: int
    path: str = field(repr=False)
    head: bytes = field(repr=False)

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @classmethod
    def parse(cls, url: str, headers: tuple[tuple[str, str], ...] = JSON_HEADERS) -> Target:
        """A POST target for ``url``; :class:`ValueError` for a URL or header we cannot send.

        Why the checks: a URL :func:`slm_contract.http_url_problem` refuses (a port outside
        1..65535, user info, a fragment, a space or control character), or a header value
        with a line break, would otherwise fail at the first call, or worse (a line break in
        an API key would let it inject headers), so a route with one is refused up front; the
        operator refuses the same URLs in a task's spec. A query is kept and sent (Azure
        OpenAI needs ``?api-version=``), but may hold a key: log the URL only through
        :func:`safe_url`.

        Every message names the problem, never a part of the URL or a header value: the
        caller logs it, and either may hold a secret.
        """
        problem = http_url_problem(url)
        if problem:
            raise ValueError(problem)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[scheme]
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = f"[{host}]" if ":" in host else host
        if port != _DEFAULT_PORTS[scheme]:
            host_header += f":{port}"
        lines = [f"POST {path} HTTP/1.1", f"Host: {host_header}"]
        for name, value in headers:
            # The value is never shown: it may be an API key.
            if not name or any(c in name for c in (":", " ", *_FORBIDDEN_IN_HEADERS)):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            problem = header_value_problem(value)
            if problem:
                raise ValueError(f"header {name} has {problem}")
            lines.append(f"{name}: {value}")
        try:
            head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1", "strict")
        except UnicodeEncodeError:  # its text quotes a character, maybe one of an API key
            raise ValueError(
                "the URL or a header value has a character HTTP/1.1 cannot carry"
            ) from None
        return cls(scheme, host, port, path, head)


@dataclass(slots=True)
class Response:
    """An upstream's answer: the status, the whole body, and ``Retry-After`` if it sent one."""

    status: int
    body: bytes
    retry_after: str | None = None


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a transport, a response parser and the call waiting on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int) -> None:
        self.loop = loop
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.received = False  # any byte of the current answer seen
        self.header_name = b""
        self.retry_after: str | None = None
        self.framed = False  # Content-Length or chunked: the end is known without EOF
        self.headers_done = False
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.sent_at = 0.0  # when the current request was written
        self.lost_at: float | None = None  # when the connection was seen closed
        self.stream: _StreamState | None = None  # set while a streamed answer is read

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.waiter is None:
            # Bytes nobody asked for: the stream is out of step, so it cannot be reused.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HTTPClientError(f"malformed HTTP answer ({type(exc).__name__})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_at = self.loop.time()
        stream = self.stream
        if stream is not None and stream.head.done():
            if stream.done or stream.error is not None:
                return
            if not self.framed and exc is None:
                # A streamed body delimited by the connection's end. To HTTP that is its
                # end, but it reads the same when the server died mid-answer: the caller
                # must judge completeness from the body itself (the gateway wants an SSE
                # stream's ``[DONE]`` or finish reasons, see ``Gateway._pump``).
                self.on_message_complete()
            else:
                stream.fail(HTTPClientError("the server closed the connection mid-answer"))
            return
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.headers_done and not self.framed and exc is None:
            # A body delimited by the connection's end (no Content-Length, not chunked).
            self.on_message_complete()
            return
        self._fail(HTTPClientError("the server closed the connection before answering"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.waiter is None or self.waiter.done():
            # A second answer to one request: out of step, never reuse this connection.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only these headers matter; a lowercase compare per header is cheap.
        lower = name.lower()
        if lower == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif lower == b"content-length" or (
            lower == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.framed = True
        elif lower == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            # Asked for identity: a compressed body would reach the agent as garbage.
            self._fail(HTTPClientError(f"compressed answer ({value.decode('latin-1')})"))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        stream = self.stream
        if stream is not None and not stream.head.done():
            status = self.parser.get_status_code()
            if not (100 <= status < 200 and status != 101):  # an interim answer is skipped
                stream.head.set_result(Response(status, b"", self.retry_after))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self._fail(HTTPClientError(f"answer larger than {self.max_body} bytes"))
            return
        stream = self.stream
        if stream is None:
            self.chunks.append(body)
        elif stream.push(body) and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._reset()
            return
        stream = self.stream
        if stream is not None:
            if not self.parser.should_keep_alive():
                self.close()
            stream.finish()
            return
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        body = b"".join(self.chunks)
        response = Response(status, body, self.retry_after)
        if not self.parser.should_keep_alive():
            self.close()
        waiter.set_result(response)

    # -- helpers
    def _reset(self) -> None:
        self.chunks = []
        self.size = 0
        self.retry_after = None
        self.framed = False
        self.headers_done = False

    def _fail(self, exc: BaseException) -> None:
        waiter = self.waiter
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self.stream is not None:
            self.stream.fail(exc)

    def send(self, target: Target, body: bytes) -> asyncio.Future[Response]:
        self.waiter = waiter = self.loop.create_future()
        self._write(target, body)
        return waiter

    def send_stream(self, target: Target, body: bytes, high_water: int) -> _StreamState:
        self.stream = state = _StreamState(self.loop, high_water)
        self.waiter = state.head
        self._write(target, body)
        return state

    def _write(self, target: Target, body: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.received = False
        self.sent_at = self.loop.time()
        self.transport.write(b"%s%d\r\n\r\n%s" % (target.head, len(body), body))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _StreamState:
    """A streamed answer being read: its head (status), the unread body chunks, the end."""

    __slots__ = ("buffered", "chunks", "done", "error", "head", "high_water", "paused", "wakeup")

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int) -> None:
        self.head: asyncio.Future[Response] = loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.high_water = high_water
        self.paused = False
        self.done = False
        self.error: BaseException | None = None
        self.wakeup: asyncio.Future[None] | None = None

    def push(self, data: bytes) -> bool:
        """Queue a body chunk; True when the socket should stop being read for now."""
        self.chunks.append(data)
        self.buffered += len(data)
        self._wake()
        if not self.paused and self.buffered > self.high_water:
            self.paused = True
            return True
        return False

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not self.done:
            self.error = exc
        self._wake()

    @property
    def read_to_end(self) -> bool:
        """The whole body arrived without error and was handed out."""
        return self.done and self.error is None and not self.chunks

    def _wake(self) -> None:
        w = self.wakeup
        if w is not None and not w.done():
            w.set_result(None)


class StreamedResponse:
    """A streamed answer: ``status`` and ``retry_after`` at once, the body by :meth:`next_chunk`.

    Use it inside :meth:`Client.stream`, which returns the connection to the pool, or closes
    it when the body was not read to its end.
    """

    __slots__ = ("_conn", "_deadline", "_loop", "_state", "retry_after", "status")

    def __init__(
        self,
        conn: _Connection,
        state: _StreamState,
        head: Response,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
    ) -> None:
        self._conn = conn
        self._state = state
        self._loop = loop
        self._deadline = deadline
        self.status = head.status
        self.retry_after = head.retry_after

    @property
    def complete(self) -> bool:
        """The whole body arrived and was handed out."""
        return self._state.read_to_end

    async def next_chunk(self) -> bytes | None:
        """The body received since the last call (waiting for some if none), or None at its end.

        Everything buffered comes at once: a streaming LLM sends many small chunks, and the
        gateway pays per hand-over (a wake-up, a parse, a write to the agent), not per byte.

        Raises :class:`TimeoutError` at the call's deadline and :class:`HTTPClientError` when
        the connection fails or the answer breaks off.
        """
        s = self._state
        while not s.chunks:
            if s.error is not None:
                raise s.error
            if s.done:
                return None
            waiter: asyncio.Future[None] = self._loop.create_future()
            s.wakeup = waiter
            timer = self._loop.call_at(self._deadline, _expire, waiter, "answer not complete")
            try:
                await waiter
            finally:
                timer.cancel()
                s.wakeup = None
        chunks = s.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        s.buffered = 0
        if s.paused:
            s.paused = False
            transport = self._conn.transport
            if transport is not None and not self._conn.closed:
                transport.resume_reading()
        return data

    async def read_all(self) -> bytes:
        """The rest of the body (for an error answer, which is short and read whole)."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)


class _Origin:
    """The connections to one (scheme, host, port): idle ones, a count, and waiting callers."""

    __slots__ = ("active", "idle", "waiters")

    def __init__(self) -> None:
        self.idle: deque[_Connection] = deque()  # most recently used on the right
        self.active = 0  # connections handed out plus being opened
        self.waiters: deque[asyncio.Future[None]] = deque()


class Client:
    """A pool of keep-alive HTTP/1.1 connections; one per process, shared by all routes."""

    def __init__(
        self,
        *,
        limit_per_origin: int = 1024,
        idle_timeout: float = 15.0,
        connect_timeout: float = 10.0,
        max_body: int = 64 * 1024 * 1024,
        ssl_context: ssl_module.SSLContext | None = None,
    ) -> None:
        if limit_per_origin < 1:
            raise ValueError("limit_per_origin must be at least 1")
        self.limit = limit_per_origin
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.max_body = max_body
        self._ssl = ssl_context
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._closed = False
        self._out_of_files_said_at = float("-inf")
        self._out_of_files_unsaid = 0
        self._busy_said_at = float("-inf")
        self._busy_unsaid = 0

    def _ssl_context(self) -> ssl_module.SSLContext:
        if self._ssl is None:
            self._ssl = ssl_module.create_default_context()
        return self._ssl

    async def post(self, target: Target, body: bytes, timeout: float) -> Response:
        """POST ``body`` to ``target``; the whole call must finish within ``timeout`` s of
        getting a place in the pool, and that place must come within ``timeout`` s too."""
        loop = asyncio.get_running_loop()
        origin = await self._acquire(target, loop, loop.time() + timeout)
        deadline = loop.time() + timeout
        try:
            conn = await self._connection(origin, target, loop, deadline)
            try:
                return await self._exchange(conn, origin, target, body, loop, deadline)
            except HTTPClientError:
                if not _may_resend(conn, loop, deadline):
                    raise
            # The server closed a reused idle connection as we wrote: once more, on a new one.
            conn = await self._connect(target, loop, deadline)
            return await self._exchange(conn, origin, target, body, loop, deadline)
        finally:
            self._release(origin)

    @contextlib.asynccontextmanager
    async def stream(
        self, target: Target, body: bytes, timeout: float, *, high_water: int = 256 * 1024
    ) -> AsyncIterator[StreamedResponse]:
        """POST ``body`` and read the answer as it streams in (see :class:`StreamedResponse`).

        The context is entered once the status and headers are in; the whole call, body
        included, must finish within ``timeout`` s of getting a place in the pool (which must
        come within ``timeout`` s too). On exit the connection is pooled again if
        the body was read to its end, and closed otherwise (an agent that went away, a
        deadline, an error), so an unread rest can never be taken for the next answer.
        """
        loop = asyncio.get_running_loop()
        origin = await self._acquire(target, loop, loop.time() + timeout)
        deadline = loop.time() + timeout
        conn: _Connection | None = None
        try:
            conn = await self._connection(origin, target, loop, deadline)
            try:
                resp = await self._open(conn, target, body, high_water, loop, deadline)
            except HTTPClientError:
                if not _may_resend(conn, loop, deadline):
                    raise
                conn = await self._connect(target, loop, deadline)
                resp = await self._open(conn, target, body, high_water, loop, deadline)
            yield resp
        finally:
            if conn is not None:
                state = conn.stream
                conn.stream = None
                conn.waiter = None
                if state is not None and state.read_to_end:
                    self._pool(conn, origin, loop)
                else:
                    conn.close()
            self._release(origin)

    async def _open(
        self,
        conn: _Connection,
        target: Target,
        body: bytes,
        high_water: int,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
    ) -> StreamedResponse:
        state = conn.send_stream(target, body, high_water)
        timer = loop.call_at(deadline, _expire, state.head, "no answer before the deadline")
        try:
            head = await state.head
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
        return StreamedResponse(conn, state, head, loop, deadline)

    async def _acquire(
        self, target: Target, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> _Origin:
        """A slot on the target's origin, waiting for one beyond the limit until ``deadline``,
        then :class:`GatewayBusy`."""
        if self._closed:
            raise HTTPClientError("the client is closed")
        origin = self._origins.get(target.origin)
        if origin is None:
            origin = self._origins[target.origin] = _Origin()
        if origin.active >= self.limit:
            try:
                await self._wait_for_slot(origin, loop, deadline)
            except TimeoutError:
                self._say_busy(target)
                raise GatewayBusy(self.limit) from None
        origin.active += 1
        return origin

    @staticmethod
    def _release(origin: _Origin) -> None:
        origin.active -= 1
        _wake_one(origin)

    async def _connection(
        self, origin: _Origin, target: Target, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> _Connection:
        conn = self._idle_connection(origin, loop)
        return conn if conn is not None else await self._connect(target, loop, deadline)

    def _pool(self, conn: _Connection, origin: _Origin, loop: asyncio.AbstractEventLoop) -> None:
        """After a whole answer: keep the connection for the next call, unless it is done."""
        if conn.closed:
            pass
        elif self._closed:
            conn.close()
        else:
            conn.idle_since = loop.time()
            origin.idle.append(conn)

    async def _wait_for_slot(
        self, origin: _Origin, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> None:
        while origin.active >= self.limit:
            waiter: asyncio.Future[None] = loop.create_future()
            origin.waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter, "no free connection")
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed a free slot just as this caller was cancelled: pass it on, or
                    # the next waiter would sit out its deadline with the slot unused.
                    _wake_one(origin)
                raise
            finally:
                timer.cancel()

    def _idle_connection(
        self, origin: _Origin, loop: asyncio.AbstractEventLoop
    ) -> _Connection | None:
        now = loop.time()
        # Reuse takes the most recently used connection, so the least recently used ones sink
        # to the left end and would stay open for ever under light load: close one per call.
        if origin.idle and now - origin.idle[0].idle_since > self.idle_timeout:
            origin.idle.popleft().close()
        while origin.idle:
            conn = origin.idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(
        self, target: Target, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> _Connection:
        budget = min(self.connect_timeout, deadline - loop.time())
        if budget <= 0:
            raise TimeoutError("no time left to connect")
        try:
            async with asyncio.timeout(budget):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop, self.max_body),
                    target.host,
                    target.port,
                    ssl=self._ssl_context() if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
        except TimeoutError:
            if loop.time() >= deadline:
                raise
            raise HTTPClientError(
                f"connecting took longer than {self.connect_timeout:g}s"
            ) from None
        except ssl_module.SSLError as exc:
            raise HTTPClientError(
                f"TLS handshake failed ({exc.reason or type(exc).__name__})"
            ) from None
        except OSError as exc:
            if out_of_file_descriptors(exc):
                self._say_out_of_files()
                raise OutOfFileDescriptors() from None
            raise HTTPClientError(
                f"cannot connect ({exc.strerror or type(exc).__name__})"
            ) from None
        return protocol

    def _say_out_of_files(self) -> None:
        """Log that connections fail for want of file descriptors, at most once per
        :data:`OUT_OF_FILES_LOG_INTERVAL_S`, with the count since the last line: the agents'
        503s say it, and the operator, who must raise the limit or add replicas, needs to
        read it too, once, not once per call of a burst.

        The client serves both kinds of call and does not know which one failed, so the
        line says what happens to each: an LLM call is answered 503, an SLM call falls back
        to the LLM (its agent gets a 200); "answered 503" alone was wrong for the latter."""
        self._out_of_files_unsaid += 1
        now = time.monotonic()
        if now - self._out_of_files_said_at < OUT_OF_FILES_LOG_INTERVAL_S:
            return
        log.warning(
            "%d upstream connection(s) could not be opened: this process is out of file "
            "descriptors (too many calls at once for its limit of open files); LLM calls are "
            "answered 503 %s, SLM calls fall back to the LLM",
            self._out_of_files_unsaid,
            CODE_OUT_OF_FILES,
        )
        self._out_of_files_said_at, self._out_of_files_unsaid = now, 0

    def _say_busy(self, target: Target) -> None:
        """Log that calls found no free connection, at most once per
        :data:`OUT_OF_FILES_LOG_INTERVAL_S`, with the count since the last line (as
        :meth:`_say_out_of_files`, and for the same reason: the operator must raise
        ``--upstream-pool-size`` or add replicas). Names the origin by host and port only."""
        self._busy_unsaid += 1
        now = time.monotonic()
        if now - self._busy_said_at < OUT_OF_FILES_LOG_INTERVAL_S:
            return
        log.warning(
            "%d call(s) to %s:%d found none of its %d pooled connections (--upstream-pool-size, "
            "shared by all tasks on it) free in time; LLM calls are answered 503 %s, SLM calls "
            "fall back to the LLM",
            self._busy_unsaid,
            target.host,
            target.port,
            self.limit,
            CODE_GATEWAY_BUSY,
        )
        self._busy_said_at, self._busy_unsaid = now, 0

    async def _exchange(
        self,
        conn: _Connection,
        origin: _Origin,
        target: Target,
        body: bytes,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
    ) -> Response:
        waiter = conn.send(target, body)
        timer = loop.call_at(deadline, _expire, waiter, "no answer before the deadline")
        try:
            response = await waiter
        except BaseException:
            # Timed out, cancelled or failed midway: the connection's state is unknown.
            conn.close()
            raise
        finally:
            timer.cancel()
            conn.waiter = None
        self._pool(conn, origin, loop)
        return response

    async def close(self) -> None:
        """Close every idle connection and refuse later calls; a call in flight finishes and
        then closes its connection."""
        self._closed = True
        for origin in self._origins.values():
            for conn in origin.idle:
                conn.close()
            origin.idle.clear()
            for waiter in origin.waiters:
                if not waiter.done():
                    waiter.set_exception(HTTPClientError("the client is closed"))
        await asyncio.sleep(0)


#: How soon after the request was written a reused connection must close, without a byte of
#: answer, to be taken for one the server dropped while idle. A server closes an idle
#: connection on its own clock, so that close reaches the gateway within about a round trip
#: of the write; one that closes later was working on the request (an LLM that died
#: mid-generation), and sending it again would pay for, and may run, the call twice.
STALE_CLOSE_WINDOW_S = 0.05


def _may_resend(conn: _Connection, loop: asyncio.AbstractEventLoop, deadline: float) -> bool:
    """A reused connection that closed before a byte of the answer came, right after the
    request was written (:data:`STALE_CLOSE_WINDOW_S`): the server dropped it while idle, so
    the request never reached it and may be sent once more."""
    return (
        conn.reused
        and not conn.received
        and conn.lost_at is not None
        and conn.lost_at - conn.sent_at <= STALE_CLOSE_WINDOW_S
        and loop.time() < deadline
    )


def _wake_one(origin: _Origin) -> None:
    while origin.waiters:
        waiter = origin.waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


def _expire(waiter: asyncio.Future[Any], what: str) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(what))


__all__ = [
    "JSON_HEADERS",
    "Client",
    "GatewayBusy",
    "HTTPClientError",
    "OutOfFileDescriptors",
    "Response",
    "StreamedResponse",
    "Target",
]
