"""OpenAI-style error bodies, so agents' SDKs show a readable reason instead of a parse failure.

Every answer that is not a completion carries ``{"error": {"message", "type", "param",
"code"}}``, the shape OpenAI's API and SDKs use. The gateway raises :class:`GatewayError`
anywhere on the request path; the HTTP layer turns it into a response with
:func:`error_body`. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"

# Stable machine-readable codes (the ``code`` field) the gateway itself emits.
CODE_INVALID_JSON = "invalid_json"
CODE_INVALID_TYPE = "invalid_type"
CODE_INVALID_VALUE = "invalid_value"
CODE_MISSING = "missing_required_parameter"
CODE_MODEL_NOT_FOUND = "model_not_found"
CODE_TOO_LARGE = "request_too_large"
CODE_NOT_FOUND = "not_found"
CODE_METHOD = "method_not_allowed"
CODE_UPSTREAM = "upstream_error"
CODE_UPSTREAM_TIMEOUT = "upstream_timeout"
CODE_UPSTREAM_UNAVAILABLE = "upstream_unavailable"
CODE_NOT_READY = "not_ready"
CODE_INVALID_API_KEY = "invalid_api_key"
CODE_PERMISSION_DENIED = "permission_denied"
CODE_AUTH_UNAVAILABLE = "auth_unavailable"
CODE_INTERNAL = "internal_error"
CODE_INVALID_HTTP = "invalid_http"
CODE_BODY_TIMEOUT = "request_timeout"


class GatewayError(Exception):
    """A request the gateway answers with an error; ``status`` is the HTTP status to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else {}

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """The JSON bytes of an OpenAI-style error."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def invalid(message: str, param: str | None = None, code: str = CODE_INVALID_VALUE) -> GatewayError:
    """A 400 for a request the agent must fix."""
    return GatewayError(400, message, param=param, code=code)


#: The longest reason from an LLM server that an agent gets in a rebuilt error body.
MAX_UPSTREAM_REASON = 1000


def upstream_4xx_body(status: int, body: bytes, secret: str = "") -> bytes:
    """An LLM's 4xx answer as OpenAI's error body: as it came when it has that shape already,
    else rebuilt around the LLM server's own reason.

    Why: OpenAI-compatible servers word their refusals in their own shapes, vLLM's and
    SGLang's ``{"object": "error", "message"}``, TGI's and llama.cpp's string ``error``,
    FastAPI's ``detail`` (a string, or pydantic's list of errors), and an agent's SDK reads
    only ``error.message``: replaced by a generic message, the reason (a context length
    exceeded, an unsupported parameter) was lost. ``secret`` (the task's LLM key) is masked
    should the server quote it, in a body passed on as it came too, as the gateway never
    shows an agent that key.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        kept = mask_secret(body, doc, secret)
        if kept is not None:
            return kept
        doc = None  # too deep to mask: rebuilt below, with no reason to quote
    message = f"The LLM backend rejected the request with HTTP {status}."
    reason = _upstream_reason(doc)
    if reason:
        if secret:  # masked before the cut, which could leave part of it
            reason = reason.replace(secret, "[redacted]")
        message = f"{message[:-1]}: {reason[:MAX_UPSTREAM_REASON]}"
    param = doc.get("param") if isinstance(doc, dict) else None
    return error_body(
        message,
        type=RATE_LIMIT if status == 429 else INVALID_REQUEST,
        param=param if isinstance(param, str) else None,
        code=CODE_UPSTREAM,
    )


def mask_secret(body: bytes, doc: Any, secret: str) -> bytes | None:
    """A JSON ``body`` from an LLM server (``doc`` decoded) with ``secret`` replaced by
    ``[redacted]`` in each of its strings: the very ``body`` object when it quotes no secret,
    else re-encoded; None when it is nested too deep to mask or to write again.

    Why decoded: a server may write any character of the key as a JSON escape, which a
    search of the bytes would miss. Used for an error body (:func:`upstream_4xx_body`) and
    for each event of a streamed answer that may quote the key.
    """
    if not secret:
        return body
    try:
        masked = _mask(doc, secret)
        return body if masked == doc else orjson.dumps(masked)
    except (RecursionError, orjson.JSONEncodeError):
        return None


def _mask(value: Any, secret: str) -> Any:
    """``value`` with ``secret`` replaced in every string of it, keys included."""
    if isinstance(value, str):
        return value.replace(secret, "[redacted]")
    if isinstance(value, list):
        return [_mask(item, secret) for item in value]
    if isinstance(value, dict):
        return {_mask(k, secret): _mask(v, secret) for k, v in value.items()}
    return value


def _upstream_reason(doc: Any) -> str:
    """The reason a non-OpenAI error body gives (see :func:`upstream_4xx_body`); "" when it
    gives none."""
    if not isinstance(doc, dict):
        return ""
    for key in ("message", "error", "detail"):
        value = doc.get(key)
        if key == "detail" and value is not None and not isinstance(value, str):
            try:
                value = orjson.dumps(value).decode()
            except orjson.JSONEncodeError:  # nested deeper than orjson writes
                continue
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""
