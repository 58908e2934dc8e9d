"""Thin HTTP adapter for the two upstreams: an OpenAI-compatible LLM and a Triton-served SLM.

Why aiohttp for both, with one shared session: measured on this project's 2-core machine, an
aiohttp pass-through added about 0.6 ms and reached ~63% of the upstream's direct rate, where
httpx's AsyncClient topped out near 270 req/s. One session means one connection pool kept
warm for both backends. The SLM is called through Triton's KServe v2 HTTP/JSON API
(``POST /v2/models/<model>/infer``) with the tensors of :mod:`slm_contract`; the request
body is assembled from precomputed byte strings around the one variable piece.

Errors are classified here (``timeout``, ``connect``, ``status``, ``bad_output``) so the
pure decision code and the metrics see one vocabulary whatever the library raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from slm_contract import TRITON_CONFIDENCE, TRITON_INPUT, TRITON_OUTPUT
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


#: Headers every upstream call carries: both upstreams take and return JSON. Set once on the
#: session, so a call passes only what differs per route (the LLM's Authorization). A
#: User-Agent of our own, rather than ``skip_auto_headers``: any skip list sends aiohttp
#: down a slow path that copies the headers and builds a multidict on every request.
SESSION_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "slm-gateway",
}


def new_session(limit: int = 1024) -> aiohttp.ClientSession:
    """The process-wide client session: a large keep-alive pool, no cookie jar, the JSON
    headers of :data:`SESSION_HEADERS`."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=limit, ttl_dns_cache=300, keepalive_timeout=60
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers=SESSION_HEADERS,
        raise_for_status=False,
    )


def infer_body(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> bytes:
    """A KServe v2 infer request with one BYTES tensor holding ``{"messages", "tools"}``."""
    inner = orjson.dumps({"messages": messages, "tools": tools})
    return _INFER_PREFIX + orjson.dumps(inner.decode()) + _INFER_SUFFIX


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


class Upstreams:
    """Calls the LLM and the SLM of a route over one shared :class:`aiohttp.ClientSession`."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def llm(self, route: Route, body: bytes) -> LLMReply:
        """POST the chat request to the LLM; any HTTP status is returned, not raised."""
        try:
            async with self.session.post(
                route.llm_target, data=body, headers=route.llm_headers, timeout=route.llm_timeout
            ) as resp:
                raw = await resp.read()
                return LLMReply(resp.status, raw, resp.headers.get("Retry-After"))
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no answer within {route.llm_timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(CONNECT, type(exc).__name__) from None

    async def slm(self, route: Route, body: bytes) -> tuple[Any, Any]:
        """Run the SLM's Triton model on an infer body (see :func:`infer_body`)."""
        try:
            async with self.session.post(
                route.slm_target, data=body, timeout=route.slm_timeout
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise UpstreamError(STATUS, f"HTTP {resp.status}", resp.status)
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no answer within {route.slm_timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(CONNECT, type(exc).__name__) from None
        return parse_infer_response(raw)


__all__ = [
    "LLMReply",
    "UpstreamError",
    "Upstreams",
    "infer_body",
    "new_session",
    "parse_infer_response",
]
