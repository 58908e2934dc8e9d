"""OpenAI-style error bodies, so agents' SDKs show a readable reason instead of a parse failure.

Every answer that is not a completion carries ``{"error": {"message", "type", "param",
"code"}}``, the shape OpenAI's API and SDKs use. The gateway raises :class:`GatewayError`
anywhere on the request path; the HTTP layer turns it into a response with
:func:`error_body`. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping

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
