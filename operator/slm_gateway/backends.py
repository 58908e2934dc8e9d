"""Thin HTTP adapter for the two upstreams: an OpenAI-compatible LLM and a Triton-served SLM.

Why a client of our own (:mod:`slm_gateway.httpclient`) for both, with one shared pool: the
gateway always sends one kind of request, a JSON ``POST`` to a URL fixed per route, and
passes the answer on as bytes. Measured on this project's 2-core machine
(``bench/gateway_bench.py``, c=64, the same LLM stand-in and wrk load), a bare uvicorn
pass-through spent about 210 µs of CPU per call with aiohttp's ``ClientSession`` and about
80 µs with this client, and reached 31 % vs 67 % of the stand-in's direct rate; httpx's
AsyncClient topped out near 270 req/s. One pool keeps connections warm for both backends.
The SLM is called through Triton's KServe v2 HTTP/JSON API (``POST
/v2/models/<model>/infer``) with the tensors of :mod:`slm_contract`; the request body is
assembled from precomputed byte strings around the one variable piece.

Errors are classified here (``timeout``, ``connect``, ``status``, ``bad_output``) so the
pure decision code and the metrics see one vocabulary whatever the library raised.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from slm_contract import TRITON_CONFIDENCE, TRITON_INPUT, TRITON_OUTPUT
from slm_gateway.httpclient import Client, HTTPClientError, StreamedResponse
from slm_gateway.routes import Route

TIMEOUT = "timeout"
CONNECT = "connect"
STATUS = "status"
BAD_OUTPUT = "bad_output"

_INFER_PREFIX: bytes = (
    b'{"inputs":[{"name":"' + TRITON_INPUT.encode() + b'","shape":[1,1],"datatype":"BYTES","data":['
)
_INFER_SUFFIX: bytes = (
    b']}],"outputs":[{"name":"'
    + TRITON_OUTPUT.encode()
    + b'"},{"name":"'
    + TRITON_CONFIDENCE.encode()
    + b'"}]}'
)


class UpstreamError(Exception):
    """An upstream call failed; ``kind`` is one of TIMEOUT, CONNECT, STATUS, BAD_OUTPUT."""

    def __init__(self, kind: str, detail: str, status: int = 0) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status


@dataclass(slots=True)
class LLMReply:
    """The LLM's answer as received: the status and the raw body, passed on untouched."""

    status: int
    body: bytes
    retry_after: str | None


def new_client(limit: int = 1024) -> Client:
    """The process-wide upstream client: at most ``limit`` connections per upstream origin."""
    return Client(limit_per_origin=limit)


def infer_body(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    timeout_s: float = 0.0,
    max_tokens: int | None = None,
    *,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    stop: str | list[str] | None = None,
) -> bytes:
    """A KServe v2 infer request with one BYTES tensor holding ``{"messages", "tools"}``.

    ``timeout_s`` (when > 0) goes along as Triton's ``timeout`` request parameter: a request
    still queued when the gateway's SLM budget is spent is dropped by Triton instead of
    computed for nobody. The exported model's own queue limit is the longest budget a task
    may set; Triton lets a request shorten it, never lengthen it.

    ``max_tokens`` (the request's limit, :func:`slm_gateway.decide.answer_limit`) goes in
    the tensor next to them: the model generates at most that many tokens. A repository
    exported before it was sent ignores the field (the model reads only the keys it knows),
    and the gateway holds that answer to the limit itself.

    ``tool_choice``, ``parallel_tool_calls`` and ``stop`` go along as the request set them
    (each left out when it set none): the gateway judges the answer against them
    (:func:`slm_gateway.decide.judge_answer`), so a model that can honour them must be told
    of them. The exported model reads none of them (its ``chatformat.parse_request`` ignores
    every key it does not know), so an answer that breaks only ``tool_choice`` or
    ``parallel_tool_calls`` is handed back to the LLM, not counted as the SLM's failure, and
    its text is cut at ``stop`` by the gateway.
    """
    doc: dict[str, Any] = {"messages": messages, "tools": tools}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    if tool_choice is not None:
        doc["tool_choice"] = tool_choice
    if parallel_tool_calls is not None:
        doc["parallel_tool_calls"] = parallel_tool_calls
    if stop is not None:
        doc["stop"] = stop
    inner = orjson.dumps(doc)
    head = _INFER_PREFIX
    if timeout_s > 0:
        head = b'{"parameters":{"timeout":%d},' % max(1, round(timeout_s * 1e6)) + head[1:]
    return head + orjson.dumps(inner.decode()) + _INFER_SUFFIX


def parse_infer_response(raw: bytes) -> tuple[Any, Any]:
    """(assistant message or ``{"defer": true}``, confidence) from a v2 infer response."""
    try:
        doc = orjson.loads(raw)
        answer: Any = None
        confidence: Any = None
        for out in doc["outputs"]:
            name = out.get("name")
            if name == TRITON_OUTPUT:
                value = out["data"][0]
                answer = orjson.loads(value) if isinstance(value, str | bytes) else value
            elif name == TRITON_CONFIDENCE:
                confidence = out["data"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        detail = f"unreadable infer response ({type(exc).__name__})"
        raise UpstreamError(BAD_OUTPUT, detail) from None
    if answer is None:
        raise UpstreamError(BAD_OUTPUT, f"infer response has no {TRITON_OUTPUT} output")
    return answer, confidence


class LLMStream:
    """A streamed LLM answer: its status at once, the body as it comes (:meth:`next_chunk`).

    A failure while the body streams (the deadline, a connection that breaks off) raises
    :class:`UpstreamError` as a failure before the first byte does, so the caller sees one
    vocabulary whenever the LLM fails.
    """

    __slots__ = ("_late", "_resp", "retry_after", "status")

    def __init__(self, resp: StreamedResponse, timeout_s: float) -> None:
        self._resp = resp
        self._late = f"not complete within {timeout_s:g}s"
        self.status = resp.status
        self.retry_after = resp.retry_after

    async def next_chunk(self) -> bytes | None:
        with _upstream_errors(self._late):
            return await self._resp.next_chunk()

    async def read_all(self) -> bytes:
        with _upstream_errors(self._late):
            return await self._resp.read_all()


@contextlib.contextmanager
def _upstream_errors(timeout_detail: str) -> Iterator[None]:
    """The client's errors on the streamed path, as :class:`UpstreamError`."""
    try:
        yield
    except TimeoutError:
        raise UpstreamError(TIMEOUT, timeout_detail) from None
    except HTTPClientError as exc:
        raise UpstreamError(CONNECT, str(exc)) from None


class Upstreams:
    """Calls the LLM and the SLM of a route over one shared upstream client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def llm(self, route: Route, body: bytes) -> LLMReply:
        """POST the chat request to the LLM; any HTTP status is returned, not raised."""
        try:
            resp = await self.client.post(route.llm_target, body, route.llm_timeout_s)
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no answer within {route.llm_timeout_s:g}s") from None
        except HTTPClientError as exc:
            raise UpstreamError(CONNECT, str(exc)) from None
        return LLMReply(resp.status, resp.body, resp.retry_after)

    @contextlib.asynccontextmanager
    async def llm_stream(self, route: Route, body: bytes) -> AsyncIterator[LLMStream]:
        """POST a streamed chat request to the LLM; entered once its status is in.

        Leaving the context before the body's end closes the connection, which is how an LLM
        call is cut off when its agent goes away.
        """
        timeout = route.llm_timeout_s
        async with contextlib.AsyncExitStack() as stack:
            # Only entering (up to the status line) is converted here; what the caller raises
            # inside the context passes through as it is.
            with _upstream_errors(f"no answer within {timeout:g}s"):
                resp = await stack.enter_async_context(
                    self.client.stream(route.llm_target, body, timeout)
                )
            yield LLMStream(resp, timeout)

    async def slm(self, route: Route, body: bytes) -> tuple[Any, Any]:
        """Run the SLM's Triton model on an infer body (see :func:`infer_body`)."""
        try:
            resp = await self.client.post(route.slm_target, body, route.slm_timeout_s)
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no answer within {route.slm_timeout_s:g}s") from None
        except HTTPClientError as exc:
            raise UpstreamError(CONNECT, str(exc)) from None
        if resp.status != 200:
            raise UpstreamError(STATUS, f"HTTP {resp.status}", resp.status)
        return parse_infer_response(resp.body)


__all__ = [
    "LLMReply",
    "LLMStream",
    "UpstreamError",
    "Upstreams",
    "infer_body",
    "new_client",
    "parse_infer_response",
]
