"""Who may call the gateway: agents authenticated by their Kubernetes ServiceAccount token.

Why: the gateway calls the LLM with each task's own API key, so without a check every pod
that can reach its Service spends any task's LLM budget and reads its answers. With
``--agent-auth serviceaccount`` an agent sends a ServiceAccount token as its API key
(``Authorization: Bearer <token>``: what OpenAI SDKs send for ``api_key``), the gateway asks
the API server whether the token is valid for its audience (a TokenReview, the way the
kubelet and every aggregated API server authenticate callers), and lets a ServiceAccount call
the tasks of its own namespace only: the namespace is the tenancy boundary, as it is for the
AgentTasks themselves. No token, an invalid or expired one, or one minted for another
audience (a token meant for the API server must not double as a gateway key) is a 401; a
ServiceAccount of another namespace gets a 403. Tokens are never logged.

Reviews are cached by the token's SHA-256 for ``ttl_s`` (60 s), never past the token's own
``exp``, and failures for ``negative_ttl_s`` (5 s), so the API server sees one review per
agent and minute instead of one per call; concurrent calls with one token share one review.
So a deleted ServiceAccount or pod keeps its access for at most ``ttl_s`` (plus the API
server's own cache of token reviews, about 10 s). When the API server
cannot answer, calls get a 503 (``auth_unavailable``; OpenAI SDKs retry it) rather than being
let through: fail closed.

The pure part (:func:`bearer_token`, :func:`identity_from_review`, :func:`token_expiry`) is
unit tested; :class:`TokenReviewer` is the thin adapter that asks the API server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import importlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger(__name__)

AUTH_NONE = "none"
AUTH_SERVICEACCOUNT = "serviceaccount"
AUTH_MODES = (AUTH_NONE, AUTH_SERVICEACCOUNT)
DEFAULT_AUDIENCE = "slm-fleet-gateway"
#: (connect, read) seconds for one TokenReview: a call waits for it.
REVIEW_TIMEOUT_S = (2.0, 5.0)
_SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated agent: the ServiceAccount its token belongs to."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class AuthUnavailable(Exception):
    """The API server could not review a token (down, slow, or refusing the gateway)."""


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def identity_from_review(status: Mapping[str, Any], audience: str) -> Identity | None:
    """The ServiceAccount a TokenReview's ``status`` vouches for, or None.

    None unless the token is authenticated, for this audience (the API server lists the
    audiences it checked; an API server that ignores ``spec.audiences`` lists none and is not
    trusted), and belongs to a ServiceAccount: a user's or a node's token is no agent.
    """
    if status.get("authenticated") is not True:
        return None
    if audience not in (status.get("audiences") or []):
        return None
    username = str((status.get("user") or {}).get("username") or "")
    if not username.startswith(_SA_PREFIX):
        return None
    namespace, sep, name = username.removeprefix(_SA_PREFIX).partition(":")
    if not sep or not namespace or not name:
        return None
    return Identity(namespace, name)


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (Unix seconds), read without checking the signature.

    Only used to cache a review no longer than the token lives; the API server did the
    checking. None when the token is no JWT or has no usable ``exp``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def may_call(identity: Identity, task_namespace: str) -> bool:
    """A ServiceAccount calls its own namespace's tasks; a task from a routes file (no
    namespace) takes any authenticated agent."""
    return not task_namespace or identity.namespace == task_namespace


def _review_with(api: Any, token: str, audience: str) -> Mapping[str, Any]:
    """POST one TokenReview; its status as a dict. Raises AuthUnavailable on any failure."""
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    }
    try:
        client = importlib.import_module("kubernetes.client")
        answer = client.AuthenticationV1Api(api).create_token_review(
            body, _request_timeout=REVIEW_TIMEOUT_S
        )
        status = api.sanitize_for_serialization(answer).get("status") or {}
    except Exception as exc:
        # The exception's text may quote the request, and so the token: only its type and
        # HTTP status are kept.
        code = getattr(exc, "status", None)
        raise AuthUnavailable(
            f"{type(exc).__name__}" + (f" (HTTP {code})" if code else "")
        ) from None
    if not isinstance(status, dict):
        raise AuthUnavailable("the TokenReview's answer has no status")
    return status


class TokenReviewer:
    """Identifies agents by token through TokenReviews, cached (see the module docstring)."""

    def __init__(
        self,
        api: Any,
        audience: str = DEFAULT_AUDIENCE,
        *,
        ttl_s: float = 60.0,
        negative_ttl_s: float = 5.0,
        max_entries: int = 10_000,
        review: Callable[[Any, str, str], Mapping[str, Any]] = _review_with,
        clock: Callable[[], float] = time.time,
        on_review: Callable[[str], None] = lambda result: None,
    ) -> None:
        self.api = api
        self.audience = audience
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self._review = review
        self._clock = clock
        #: Told ``authenticated``, ``rejected`` or ``failed`` after each review (metrics).
        self._on_review = on_review
        #: sha256(token) -> (valid until, Identity or None)
        self._cache: dict[bytes, tuple[float, Identity | None]] = {}
        self._pending: dict[bytes, asyncio.Future[Identity | None]] = {}
        self.reviews = 0
        self._failing = False

    async def identify(self, token: str) -> Identity | None:
        """The token's ServiceAccount, None if it is not a valid agent token for us.

        Raises :class:`AuthUnavailable` when the API server could not say.
        """
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            identity = await self._ask(token)
        except AuthUnavailable as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, none is left unread
            raise
        finally:
            del self._pending[digest]
        future.set_result(identity)
        self._remember(digest, identity, token, now)
        return identity

    async def _ask(self, token: str) -> Identity | None:
        self.reviews += 1
        try:
            status = await asyncio.to_thread(self._review, self.api, token, self.audience)
        except AuthUnavailable as exc:
            self._on_review("failed")
            if not self._failing:
                log.warning("agent tokens cannot be reviewed (%s): calls get 503", exc)
                self._failing = True
            raise
        if self._failing:
            log.info("agent tokens are reviewed again")
            self._failing = False
        identity = identity_from_review(status, self.audience)
        self._on_review("authenticated" if identity is not None else "rejected")
        return identity

    def _remember(self, digest: bytes, identity: Identity | None, token: str, now: float) -> None:
        until = now + (self.ttl_s if identity is not None else self.negative_ttl_s)
        exp = token_expiry(token)
        if exp is not None:
            until = min(until, exp)
        if len(self._cache) >= self.max_entries:
            for key in [k for k, (t, _) in self._cache.items() if t <= now]:
                del self._cache[key]
            while len(self._cache) >= self.max_entries:  # oldest entries first
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (until, identity)


def token_reviewer(
    kubeconfig: str | None,
    audience: str,
    ttl_s: float,
    on_review: Callable[[str], None] = lambda result: None,
) -> TokenReviewer:
    """A reviewer with the gateway's Kubernetes credentials (in-cluster or ``kubeconfig``)."""
    from slm_gateway.kube import api_client

    return TokenReviewer(api_client(kubeconfig), audience, ttl_s=ttl_s, on_review=on_review)
