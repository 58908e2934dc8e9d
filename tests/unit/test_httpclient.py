"""The gateway's upstream HTTP client, against real servers on 127.0.0.1.

Each test starts an asyncio TCP server that speaks HTTP/1.1 from a script (so it can also
misbehave: close early, chunk, answer twice, stall), and checks what a gateway user would
see: the right answer, a reused connection, a clear error, a deadline that holds, and no
late answer read as the next call's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from slm_e2e import pki
from slm_gateway.httpclient import (
    JSON_HEADERS,
    Client,
    HTTPClientError,
    Target,
    safe_url,
    with_path,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A scripted HTTP server: ``handler`` runs once per connection."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl_context
        self.connections = 0
        self.requests: list[bytes] = []  # request heads, in arrival order
        self.bodies: list[bytes] = []
        self.open_now = 0
        self.max_open = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def url(self, path: str = "/v1/chat/completions", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request's body on this connection (None at its end); heads are kept."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.bodies.append(body)
        self.requests.append(head)
        return body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_alive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server):
    """Answers every request on the connection with its own body, until the client closes."""
    while (body := await srv.read_request(reader)) is not None:
        writer.write(ok(body))
        await writer.drain()


def slow_echo(trigger: bytes, delay: float) -> Handler:
    """A keep-alive echo that takes ``delay`` seconds to answer a body equal to ``trigger``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server):
        while (body := await srv.read_request(reader)) is not None:
            if body == trigger:
                await asyncio.sleep(delay)
            writer.write(ok(body))
            await writer.drain()

    return handler


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- Target


def test_target_builds_the_request_head_once_with_host_auth_and_json_headers() -> None:
    t = Target.parse(
        "https://llm.example.com/v1/chat/completions?api-version=2024",
        (*JSON_HEADERS, ("Authorization", "Bearer sk-secret")),
    )
    assert (t.scheme, t.host, t.port, t.tls) == ("https", "llm.example.com", 443, True)
    head = t.head.decode()
    assert head.startswith("POST /v1/chat/completions?api-version=2024 HTTP/1.1\r\n")
    assert "Host: llm.example.com\r\n" in head  # default port left out
    assert "Authorization: Bearer sk-secret\r\n" in head
    assert "Content-Type: application/json\r\n" in head
    assert "Accept-Encoding: identity\r\n" in head
    assert head.endswith("Content-Length: ")
    assert "sk-secret" not in repr(t)


def test_target_host_header_keeps_a_non_default_port_and_brackets_ipv6() -> None:
    assert b"Host: 10.0.0.5:8000\r\n" in Target.parse("http://10.0.0.5:8000/x").head
    t = Target.parse("http://[::1]:9000/v2/models/m/infer")
    assert (t.host, t.port) == ("::1", 9000)
    assert b"Host: [::1]:9000\r\n" in t.head


@pytest.mark.parametrize(
    ("url", "headers", "message"),
    [
        ("http://h:70000/x", JSON_HEADERS, "out of range"),
        ("http://h:0/x", JSON_HEADERS, "port 0 is out of range"),  # not silently port 80
        ("ftp://h/x", JSON_HEADERS, "http:// or https://"),
        ("http://user:pw@h/x", JSON_HEADERS, "user info"),
        ("http:///x", JSON_HEADERS, "no host"),
        ("http://h/x", (("Authorization", "Bearer a\r\nX-Injected: 1"),), "line break"),
        ("http://h/x", (("Bad Name", "v"),), "not a valid HTTP header name"),
    ],
)
def test_target_refuses_what_it_cannot_send_safely(
    url: str, headers: tuple[tuple[str, str], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Target.parse(url, headers)
    assert "X-Injected" not in str(info.value)  # a header value is never echoed


SECRET = "sk-TESTSECRET1234567890abcdef"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # urlsplit's own error quoted the netloc, password included (NFKC-changing slash)
        (f"https://bob:{SECRET}@api.example.com\uff0fv1", "non-ASCII character"),
        (f"https://bob:{SECRET}@api.example.com/v1", "user info"),
        (f"http://h:{SECRET}/v1", "port"),  # "Port could not be cast ... as '<text>'"
        (f"https://api.example.com/v1#{SECRET}", "fragment"),
        ("http://h/\u2019" + SECRET, "non-ASCII character"),
        (f"https://api.example.com/v1?key={SECRET} ", "a space"),  # pasted with a trailing space
    ],
)
def test_a_refused_url_is_named_by_its_problem_never_by_its_secret(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Target.parse(url)
    assert "TESTSECRET" not in str(info.value)
    # nor in a traceback's "During handling of the above exception" part
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_a_header_value_that_http_cannot_carry_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError, match="cannot carry") as info:
        Target.parse("http://h/x", (("Authorization", "Bearer sk-\u2019TESTSECRET"),))
    assert "TESTSECRET" not in str(info.value) and "\u2019" not in str(info.value)


def test_a_query_is_sent_after_the_path_but_never_shown() -> None:
    """Azure OpenAI needs ``?api-version=``; a query may also hold a key, so it is sent but
    logs and labels get the URL through safe_url, without it."""
    base = f"https://api.example.com:8443/openai/v1/?api-version=2024-06-01&api_key={SECRET}"
    url = with_path(base, "/chat/completions")
    assert url == (
        "https://api.example.com:8443/openai/v1/chat/completions"
        f"?api-version=2024-06-01&api_key={SECRET}"
    )
    t = Target.parse(url)
    assert t.head.startswith(
        b"POST /openai/v1/chat/completions?api-version=2024-06-01&api_key=sk-TESTSECRET"
    )
    assert SECRET not in repr(t)
    assert safe_url(url) == "https://api.example.com:8443/openai/v1/chat/completions"
    assert with_path("http://h:8000/v1/", "/chat/completions") == (
        "http://h:8000/v1/chat/completions"
    )
    assert with_path("http://h", "/chat/completions") == "http://h/chat/completions"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"https://bob:{SECRET}@api.example.com/v1?k={SECRET}#{SECRET}",
            "https://api.example.com/v1",
        ),
        (f"http://[::1]:9000/v2?sig={SECRET}", "http://[::1]:9000/v2"),
        (
            "http://llm.example:8000/v1/chat/completions",
            "http://llm.example:8000/v1/chat/completions",
        ),
        (f"https://bob:{SECRET}@api.example.com\uff0fv1", "(unparsable URL)"),
        (f"http://[{SECRET}/", "(unparsable URL)"),
        (f"http://h:{SECRET}/v1", "http://h/v1"),
        ("http://h:/v1", "http://h/v1"),
    ],
)
def test_safe_url_keeps_where_and_drops_user_info_query_and_fragment(url: str, shown: str) -> None:
    assert safe_url(url) == shown


# ---------------------------------------------------------------------------- calls


def test_a_call_sends_the_head_and_body_and_reuses_one_connection() -> None:
    async def main() -> None:
        async with Server(keep_alive_echo) as srv:
            client = Client()
            target = Target.parse(srv.url(), (*JSON_HEADERS, ("Authorization", "Bearer k")))
            answers = [await client.post(target, b'{"n":%d}' % i, 5) for i in range(3)]
            await client.close()
        assert [(a.status, a.body) for a in answers] == [(200, b'{"n":%d}' % i) for i in range(3)]
        assert srv.connections == 1
        head = srv.requests[0].decode()
        assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{srv.port}\r\n" in head
        assert "Authorization: Bearer k\r\n" in head
        assert "Content-Length: 7\r\n" in head

    run(main())


def test_chunked_answers_interim_answers_and_retry_after_are_read() -> None:
    async def handler(reader, writer, srv):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()
        await srv.read_request(reader)
        writer.write(ok(b"again"))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            target = Target.parse(srv.url())
            first = await client.post(target, b"{}", 5)
            second = await client.post(target, b"{}", 5)
            await client.close()
        assert (first.status, first.body, first.retry_after) == (429, b"hello world", "7")
        assert (second.status, second.body, second.retry_after) == (200, b"again", None)
        assert srv.connections == 1

    run(main())


def test_a_body_delimited_by_the_connection_end_is_read_and_not_reused() -> None:
    async def handler(reader, writer, srv):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil-close")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            target = Target.parse(srv.url())
            a = await client.post(target, b"{}", 5)
            b = await client.post(target, b"{}", 5)
            await client.close()
        assert (a.body, b.body) == (b"until-close", b"until-close")
        assert srv.connections == 2

    run(main())


def test_connection_close_from_the_server_is_honoured() -> None:
    async def handler(reader, writer, srv):
        await srv.read_request(reader)
        writer.write(ok(b"x", b"Connection: close\r\n"))
        await writer.drain()
        await asyncio.sleep(0.2)  # the client must not wait for this close to reuse

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            target = Target.parse(srv.url())
            for _ in range(2):
                assert (await client.post(target, b"{}", 5)).body == b"x"
            await client.close()
        assert srv.connections == 2

    run(main())


def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one() -> None:
    # The server answers one request per connection without saying so, then closes the
    # connection when the next request arrives: the keep-alive race with an idle timeout.
    async def handler(reader, writer, srv):
        await srv.read_request(reader)
        writer.write(ok(b"fresh"))
        await writer.drain()
        await srv.read_request(reader)
        writer.transport.abort()

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            target = Target.parse(srv.url())
            first = await client.post(target, b"{}", 5)
            second = await client.post(target, b"{}", 5)
            await client.close()
        assert (first.body, second.body) == (b"fresh", b"fresh")
        assert srv.connections == 2
        assert len(srv.requests) == 3  # the second call was sent twice, once per connection

    run(main())


def test_a_reused_connection_closed_after_the_server_worked_on_the_call_is_not_resent() -> None:
    """An LLM that took the request, worked on it, then died closes the connection without a
    byte of answer, like a server dropping an idle one; but sending it again would pay for
    the call twice (and run a non-idempotent one twice): only a close right after the write
    is the idle race."""

    async def handler(reader, writer, srv):
        await srv.read_request(reader)
        writer.write(ok(b"fresh"))
        await writer.drain()
        await srv.read_request(reader)
        await asyncio.sleep(0.3)  # generating...
        writer.transport.abort()  # ...and the process dies

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            target = Target.parse(srv.url())
            assert (await client.post(target, b"{}", 5)).body == b"fresh"
            with pytest.raises(HTTPClientError, match="closed the connection"):
                await client.post(target, b"{}", 5)
            await client.close()
        assert len(srv.requests) == 2  # the second call was sent once

    run(main())


def test_a_new_connection_closed_without_an_answer_fails_and_is_not_retried() -> None:
    async def handler(reader, writer, srv):
        await srv.read_request(reader)
        writer.transport.abort()

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            with pytest.raises(HTTPClientError, match="closed the connection"):
                await client.post(Target.parse(srv.url()), b"{}", 5)
            await client.close()
        assert len(srv.requests) == 1  # an LLM call is never silently sent twice

    run(main())


def test_a_deadline_holds_and_the_late_answer_is_never_read_as_the_next_calls() -> None:
    handler = slow_echo(b"slow", 0.5)

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            target = Target.parse(srv.url())
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(TimeoutError):
                await client.post(target, b"slow", 0.1)
            assert loop.time() - start < 0.4
            after = await client.post(target, b"next", 5)
            await client.close()
        assert after.body == b"next"
        assert srv.connections == 2  # the timed-out connection was not reused

    run(main())


def test_a_cancelled_call_closes_its_connection() -> None:
    handler = slow_echo(b"hang", 0.3)

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client()
            target = Target.parse(srv.url())
            task = asyncio.create_task(client.post(target, b"hang", 5))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.post(target, b"ok", 5)).body == b"ok"
            await client.close()
        assert srv.connections == 2

    run(main())


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed HTTP answer"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
            "compressed",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, "larger than 64"),
    ],
)
def test_malformed_or_oversize_answers_are_clear_errors(answer: bytes, message: str) -> None:
    async def handler(reader, writer, srv):
        await srv.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.2)

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client(max_body=64)
            with pytest.raises(HTTPClientError, match=message):
                await client.post(Target.parse(srv.url()), b"{}", 5)
            await client.close()

    run(main())


def test_a_refused_connection_is_a_clear_error() -> None:
    async def main() -> None:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        client = Client()
        with pytest.raises(HTTPClientError, match="cannot connect"):
            await client.post(Target.parse(f"http://127.0.0.1:{port}/x"), b"{}", 5)
        await client.close()

    run(main())


def test_the_connection_limit_per_origin_holds_under_concurrency() -> None:
    async def handler(reader, writer, srv):
        while (body := await srv.read_request(reader)) is not None:
            await asyncio.sleep(0.05)
            writer.write(ok(body))
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = Client(limit_per_origin=2)
            target = Target.parse(srv.url())
            answers = await asyncio.gather(*(client.post(target, b"%d" % i, 5) for i in range(8)))
            await client.close()
        assert sorted(a.body for a in answers) == sorted(b"%d" % i for i in range(8))
        assert srv.max_open == 2

    run(main())


def test_idle_connections_expire() -> None:
    async def main() -> None:
        async with Server(keep_alive_echo) as srv:
            client = Client(idle_timeout=0.05)
            target = Target.parse(srv.url())
            await client.post(target, b"1", 5)
            await asyncio.sleep(0.15)
            await client.post(target, b"2", 5)
            await client.close()
        assert srv.connections == 2

    run(main())


def test_https_checks_the_certificate(tmp_path: Path) -> None:
    certs = pki.generate(tmp_path / "pki")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.serving_crt, certs.serving_key)

    async def main() -> None:
        async with Server(keep_alive_echo, server_ctx) as srv:
            trusted = Client(ssl_context=ssl.create_default_context(cafile=str(certs.ca_crt)))
            url = srv.url(scheme="https").replace("127.0.0.1", "localhost")
            answer = await trusted.post(Target.parse(url), b'{"tls":1}', 5)
            await trusted.close()
            untrusted = Client(ssl_context=ssl.create_default_context())
            with pytest.raises(HTTPClientError, match="TLS handshake failed"):
                await untrusted.post(Target.parse(url), b"{}", 5)
            await untrusted.close()
        assert answer.body == b'{"tls":1}'

    run(main())


def test_a_caller_cancelled_as_it_is_handed_a_free_connection_passes_it_on() -> None:
    # limit 1: A holds the connection, B and C wait. A finishes and hands the free slot to B,
    # whose caller gives up at that very moment (its agent disconnected): C must get the slot
    # instead of waiting out its whole deadline while no connection is in use.
    async def main() -> None:
        async with Server(keep_alive_echo) as srv:
            client = Client(limit_per_origin=1)
            target = Target.parse(srv.url())
            tasks: dict[str, asyncio.Task[object]] = {}

            async def first() -> object:
                answer = await client.post(target, b"A", 5)
                tasks["B"].cancel()
                return answer

            tasks["A"] = asyncio.create_task(first())
            await asyncio.sleep(0)
            tasks["B"] = asyncio.create_task(client.post(target, b"B", 5))
            tasks["C"] = asyncio.create_task(client.post(target, b"C", 1))
            assert (await tasks["A"]).body == b"A"  # type: ignore[attr-defined]
            with pytest.raises(asyncio.CancelledError):
                await tasks["B"]
            assert (await tasks["C"]).body == b"C"  # type: ignore[attr-defined]
            await client.close()

    run(main())


def test_connections_left_idle_after_a_burst_are_closed_under_light_load() -> None:
    """Reuse takes the most recently used connection; the others, left from a burst, must
    not stay open for ever while one connection is enough."""

    async def main() -> None:
        async with Server(slow_echo(b"burst", 0.05)) as srv:
            client = Client(idle_timeout=0.1)
            target = Target.parse(srv.url())
            await asyncio.gather(*(client.post(target, b"burst", 5) for _ in range(3)))
            assert srv.open_now == 3
            for _ in range(12):  # one call every 30 ms keeps one connection fresh
                await client.post(target, b"light", 5)
                await asyncio.sleep(0.03)
            await asyncio.sleep(0.05)  # the server notices the closes
            assert srv.open_now == 1
            await client.close()

    run(main())


# ---------------------------------------------------------------------------- streamed answers


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def streaming(pieces: list[bytes], gate: asyncio.Event | None = None, cut: bool = False) -> Handler:
    """A keep-alive server that answers each request with ``pieces`` as chunks; it holds the
    last piece until ``gate`` is set, and with ``cut`` closes the connection instead of it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server):
        while await srv.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in pieces[:-1]:
                writer.write(chunk(piece))
                await writer.drain()
            if gate is not None:
                await gate.wait()
            if cut:
                writer.transport.abort()
                return
            writer.write(chunk(pieces[-1]) + b"0\r\n\r\n")
            await writer.drain()

    return handler


def test_a_streamed_answer_arrives_piece_by_piece_and_its_connection_is_reused() -> None:
    async def go() -> None:
        gate = asyncio.Event()
        async with Server(streaming([b"data: 1\n\n", b"data: 2\n\n"], gate)) as srv:
            client = Client()
            target = Target.parse(srv.url())
            async with client.stream(target, b"{}", 5) as resp:
                assert resp.status == 200
                # The first piece is readable while the server still holds the second one.
                assert await resp.next_chunk() == b"data: 1\n\n"
                gate.set()
                assert await resp.next_chunk() == b"data: 2\n\n"
                assert await resp.next_chunk() is None
                assert resp.complete
            async with client.stream(target, b"{}", 5) as resp:
                assert await resp.read_all() == b"data: 1\n\ndata: 2\n\n"
            assert srv.connections == 1  # read to its end: the connection went back to the pool
            await client.close()

    run(go())


def test_a_stream_left_before_its_end_closes_its_connection() -> None:
    async def go() -> None:
        gate = asyncio.Event()
        async with Server(streaming([b"a", b"b"], gate)) as srv:
            client = Client()
            target = Target.parse(srv.url())
            async with client.stream(target, b"{}", 5) as resp:
                assert await resp.next_chunk() == b"a"
            gate.set()
            # The unread rest must never be taken for the next call's answer.
            assert (await client.post(target, b"next", 5)).status == 200
            assert srv.connections == 2
            await client.close()

    run(go())


def test_a_stream_that_breaks_off_or_stalls_raises_from_next_chunk() -> None:
    async def go() -> None:
        async with Server(streaming([b"a", b"b"], cut=True)) as srv:
            client = Client()
            async with client.stream(Target.parse(srv.url()), b"{}", 5) as resp:
                assert await resp.next_chunk() == b"a"
                with pytest.raises(HTTPClientError, match="mid-answer"):
                    await resp.next_chunk()
            await client.close()
        async with Server(streaming([b"a", b"b"], asyncio.Event())) as srv:
            client = Client()
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with client.stream(Target.parse(srv.url()), b"{}", 0.3) as resp:
                assert await resp.next_chunk() == b"a"
                with pytest.raises(TimeoutError):
                    await resp.next_chunk()
            assert loop.time() - started < 2  # one deadline for the whole answer
            await client.close()

    run(go())


def test_a_streamed_error_status_comes_with_its_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server):
        await srv.read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\n"
            b'Content-Length: 11\r\n\r\n{"e":"429"}'
        )
        await writer.drain()

    async def go() -> None:
        async with Server(handler) as srv:
            client = Client()
            async with client.stream(Target.parse(srv.url()), b"{}", 5) as resp:
                assert (resp.status, resp.retry_after) == (429, "7")  # the interim 100 skipped
                assert await resp.read_all() == b'{"e":"429"}'
            await client.close()

    run(go())


def test_a_slow_reader_stops_the_socket_being_read() -> None:
    """Back-pressure: an agent reading slowly must not make the gateway buffer the LLM's whole
    answer; above the high-water mark the connection is no longer read until it drains."""
    pieces = [b"x" * 4096] * 512 + [b"end"]  # 2 MiB

    async def go() -> None:
        async with Server(streaming(pieces)) as srv:
            client = Client()
            async with client.stream(Target.parse(srv.url()), b"{}", 5, high_water=16384) as resp:
                await asyncio.sleep(0.3)  # the server writes everything meanwhile
                state = resp._state
                assert state.paused and not resp._conn.transport.is_reading()
                # Stopped at the mark plus what one socket read brought (at most 256 KiB),
                # far from the 2 MiB the server sent.
                assert state.buffered <= 16384 + 4096 + 256 * 1024
                got = await resp.read_all()
            assert got == b"".join(pieces)
            await client.close()

    run(go())


# ---------------------------------------------------------------------------- open files

#: Run in a child process, whose soft limit of open files is lowered and every free file
#: descriptor taken before one call: prints what that call raised, then the status of a call
#: made once the descriptors are free again.
_OUT_OF_FILES = """
import asyncio, json, os, resource, sys

from slm_gateway.httpclient import Client, Target


async def answer(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    await reader.readexactly(2)
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
    await writer.drain()


async def main():
    srv = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    client = Client()
    target = Target.parse(f"http://{sys.argv[2]}:{port}/v1/chat/completions")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        await client.post(target, b"{}", 5)
        full = ["answered"]
    except Exception as exc:
        full = [type(exc).__name__, getattr(exc, "status", 0), str(exc)]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after = (await client.post(target, b"{}", 5)).status
    print(json.dumps({"full": full, "after": after}))


if sys.argv[1] == "uvloop":
    import uvloop

    uvloop.install()
asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_gateway_out_of_file_descriptors_is_no_upstream_failure(loop: str, host: str) -> None:
    """With every file descriptor taken (about 500 concurrent calls under a soft limit of
    1024), a connect failed as ``cannot connect (Too many open files)``, an upstream failure:
    five of them opened the LLM's circuit for every task on it. It is the gateway's own
    shortage now, an error of its own that the gateway answers with a 503 saying so, and that
    never reaches the breaker. With a host name the lookup fails first (uvloop reads it as an
    unknown name): the shortage is found all the same."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FILES, loop, host],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    name, status, message = result["full"]
    assert (name, status) == ("OutOfFileDescriptors", 503), result
    assert "out of file descriptors" in message
    assert result["after"] == 200
