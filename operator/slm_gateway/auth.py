"""Who may call the gateway: agents authenticated by their Kubernetes ServiceAccount token.

Why: the gateway calls the LLM with each task's own API key, so without a check every pod
that can reach its Service spends any task's LLM budget and reads its answers. With
``--agent-auth serviceaccount`` an agent sends a ServiceAccount token as its API key
(``Authorization: Bearer <token>``: what OpenAI SDKs send for ``api_key``), the gateway asks
the API server whether the token is valid for its audience (a TokenReview, the way the
kubelet and every aggregated API server authenticate callers), and lets a ServiceAccount call
the tasks of its own namespace only: the namespace is the tenancy boundary, as it is for the
AgentTasks themselves. No token, an invalid or expired one, or one minted for another
audience (a token meant for the API server must not double as a gateway key), or one minted
for other audiences besides ours (it would double as a key elsewhere) is a 401; a
ServiceAccount of another namespace gets a 403. Tokens are never logged.

Reviews are cached by the token's SHA-256 for ``ttl_s`` (60 s), never past the token's own
``exp``, and refusals for ``negative_ttl_s`` (5 s), so the API server sees one review per
agent and minute instead of one per call; concurrent calls with one token share one review.
What no review could accept (no JWT of a sane size, or its unchecked claims lack our audience
or an expiry, name another audience too, or have expired) is refused without a review:
garbage, a token for another audience and a stale projected token cost the API server nothing.
The claims read unchecked only ever refuse a token: the TokenReview decides who it belongs to,
and the signature it checks covers those claims. A forged token with our audience, a future
expiry and a made-up signature does need a review, and a caller can make endless such tokens
that no cache matches (2,000 made 2,000 TokenReviews in 4.4 s, and an API server that
throttles the gateway then failed real agents with 503s): tokens never found valid are
reviewed at ``reviews_per_s`` (100) a second at most, after a burst of five times that (500),
and the calls past it get a 429 (``auth_rate_limited``, ``Retry-After: 1``) without a review.
A token the API server has found valid is never held back by it: cached, it needs no review,
and once its cache entry lapses it is reviewed again without taking from the budget (its
digest is remembered until its own ``exp``, see :class:`TokenReviewer`), so a flood of
forged tokens, or ``ttl_s`` 0, cannot lock out an agent already seen. A never-seen token can
get a 429 during such a flood, or when more new pods start at once than the burst holds:
OpenAI SDKs retry a 429 twice, a second apart, and then give up.

A deleted ServiceAccount or pod keeps its access for at most ``ttl_s`` (plus the API server's
own cache of token reviews, about 10 s): a token found valid is still reviewed again once its
cache entry lapses, and forgotten when that review refuses it. When the API server cannot
answer, calls get a 503 (``auth_unavailable``; OpenAI SDKs retry it) rather than being
let through: fail closed. After a failed review no other is asked for a second, so calls get
that 503 at once rather than each waiting out a connect timeout; cached tokens keep working.

The pure part (:func:`bearer_token`, :func:`identity_from_review`, :func:`token_expiry`) is
unit tested; :class:`TokenReviewer` is the thin adapter that asks the API server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import importlib
import logging
import re
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
#: Reviews at once (threads, and pooled connections to the API server).
REVIEW_THREADS = 16
#: (connect, read) seconds for one TokenReview: a call waits for it.
REVIEW_TIMEOUT_S = (2.0, 5.0)
#: TokenReviews a second for tokens never found valid, sustained (see :class:`ReviewBudget`).
DEFAULT_REVIEWS_PER_S = 100.0
#: The budget's burst, in seconds of its rate: 500 reviews at the default rate, so that a
#: fleet of that many new pods starting at once is let in without a 429.
REVIEW_BURST_S = 5.0
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


class AuthRateLimited(AuthUnavailable):
    """Too many tokens not in the cache right now: no review was asked for (a 429).

    An :class:`AuthUnavailable` too, so that code that knows only that one still refuses the
    call (a 503 the SDKs retry) rather than letting it through or failing it with a 500.
    """


class AuthNotConfigured(Exception):
    """``--agent-auth serviceaccount`` without Kubernetes credentials to review tokens with.

    Raised when the app is built, so the entry point ends the start with this one line
    (exit 2, like a bad flag) instead of a kubernetes ``ConfigException`` traceback.
    """


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


def token_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, read without checking the signature; None when it has none.

    Only ever used to refuse or to shorten a cache entry, never to accept: the API server
    checks the signature.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _expiry(claims: Mapping[str, Any]) -> float | None:
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (Unix seconds), unchecked (see :func:`token_claims`)."""
    return _expiry(token_claims(token) or {})


def _audiences(claims: Mapping[str, Any]) -> list[Any]:
    """The ``aud`` claim as a list (a JWT may give a single audience as a string)."""
    aud = claims.get("aud")
    return aud if isinstance(aud, list) else [aud]


def for_other_audiences_too(token: str, audience: str) -> bool:
    """Whether the token's unchecked ``aud`` names ``audience`` and others besides.

    Such a token is refused (see :func:`reviewable_until`): a TokenReview for our audience
    accepts it, yet the API server, or whatever service the other audience names, accepts
    it as well, so a leaked gateway key would be a credential there too, and the reverse.
    """
    auds = _audiences(token_claims(token) or {})
    return audience in auds and any(a != audience for a in auds)


def reviewable_until(token: str, audience: str, now: float) -> float | None:
    """The token's ``exp`` if it could be a live token for us, else None. Only a bound
    ServiceAccount token can pass a review for our audience, and it names the audience
    (``aud``) and expires (``exp``). One that names other audiences too passes a review but
    is refused here all the same (:func:`for_other_audiences_too`).

    Why before the review: anything else would be refused by the API server anyway, and each
    such string cost one TokenReview. An expired token in particular: the API server still
    accepted one 5 s past its ``exp`` (its own leeway), and nothing was cached for it, so an
    agent with a stale token made one review per call.
    """
    if not looks_like_a_service_account_token(token):
        return None
    claims = token_claims(token) or {}
    auds = _audiences(claims)
    exp = _expiry(claims)
    if audience not in auds or any(a != audience for a in auds) or exp is None or exp <= now:
        return None
    return exp


def may_call(identity: Identity, task_namespace: str) -> bool:
    """A ServiceAccount calls its own namespace's tasks; a task from a routes file (no
    namespace) takes any authenticated agent."""
    return not task_namespace or identity.namespace == task_namespace


#: The longest token reviewed: a ServiceAccount token is about 1 KB; the API server refuses
#: a review body of megabytes with a 413, which is the caller's fault, not an outage.
MAX_TOKEN_BYTES = 16 * 1024
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def looks_like_a_service_account_token(token: str) -> bool:
    """A JWT (three base64url parts) of a sane size: anything else is refused without asking
    the API server, so that garbage costs a caller a 401, and the API server nothing."""
    return len(token) <= MAX_TOKEN_BYTES and _JWT.fullmatch(token) is not None


@dataclass(slots=True)
class ReviewBudget:
    """A token bucket: ``rate`` reviews a second, up to ``burst`` of them at once.

    Why: every review of a token never found valid is a request to the API server, and a
    caller decides how many of those it sends (forged tokens never repeat). A TokenReview is
    cheap for the API server (no etcd write), so the bound is only there against such a
    flood: an agent fleet's own new tokens (one per pod, rotated hourly) stay far below it,
    and a burst of :data:`REVIEW_BURST_S` seconds' worth lets a fleet of pods start at once.
    Tokens found valid before do not take from it (see :class:`TokenReviewer`).
    """

    rate: float
    burst: float
    level: float
    at: float

    @classmethod
    def full(cls, rate: float, now: float) -> ReviewBudget:
        """A full bucket; the burst is :data:`REVIEW_BURST_S` seconds' worth, at least one."""
        burst = max(1.0, REVIEW_BURST_S * rate)
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> bool:
        """Whether one review may be asked for at ``now``; if so, it is taken."""
        self.level = min(self.burst, self.level + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


class _StillDown(AuthUnavailable):
    """No review asked for: another failed a moment ago (see ``retry_after_s``)."""


class TokenRejected(Exception):
    """The API server refused to review the token (400, 413, 422): a bad token, not an
    outage."""


def _review_with(api: Any, token: str, audience: str) -> Mapping[str, Any]:
    """POST one TokenReview; its status as a dict.

    Raises :class:`TokenRejected` when the API server calls the request itself invalid, and
    :class:`AuthUnavailable` on any other failure (connection, timeout, 401/403/429/5xx).
    """
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
        if code in (400, 413, 422):
            raise TokenRejected(f"HTTP {code}") from None
        raise AuthUnavailable(
            f"{type(exc).__name__}" + (f" (HTTP {code})" if code else "")
        ) from None
    if not isinstance(status, dict):
        raise AuthUnavailable("the TokenReview's answer has no status")
    return status


class TokenReviewer:
    """Identifies agents by token through TokenReviews, cached (see the module docstring).

    While the API server fails, reviews are not asked for again for ``retry_after_s``: every
    uncached token gets its 503 at once instead of each call waiting out a connect timeout
    (the thread pool would queue them). Tokens already cached keep working meanwhile.
    Reviews of tokens never found valid are asked for at ``reviews_per_s`` at most
    (:class:`ReviewBudget`); calls that share one review take one from it. The digests of
    tokens the API server found valid are remembered until the token's own ``exp``, so that
    such a token is reviewed again (when its cache entry lapses, or at every call with
    ``ttl_s`` 0) without taking from the budget: a caller cannot make more of them than the
    ServiceAccount tokens it holds, and a flood of forged ones must not lock out an agent
    already seen. At most ``max_entries`` digests are remembered (about 120 bytes each: 1.2 MB
    for the default 10,000), the oldest pushed out first; a token pushed out only takes from
    the budget again. A token a later review refuses is forgotten at once.
    """

    def __init__(
        self,
        api: Any,
        audience: str = DEFAULT_AUDIENCE,
        *,
        ttl_s: float = 60.0,
        negative_ttl_s: float = 5.0,
        max_entries: int = 10_000,
        retry_after_s: float = 1.0,
        reviews_per_s: float = DEFAULT_REVIEWS_PER_S,
        review: Callable[[Any, str, str], Mapping[str, Any]] = _review_with,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_review: Callable[[str], None] = lambda result: None,
    ) -> None:
        self.api = api
        self.audience = audience
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self.retry_after_s = retry_after_s
        self._review = review
        #: Cache lifetimes run on the monotonic clock; only a token's ``exp`` needs wall time.
        self._clock = clock
        self._wall = wall
        #: Told ``authenticated``, ``rejected`` or ``failed`` after each review (metrics).
        self._on_review = on_review
        #: sha256(token) -> (valid until, on ``clock``). Accepted and refused tokens apart, so
        #: that a flood of bad tokens cannot push the good ones out; both evict oldest first.
        self._good: dict[bytes, tuple[float, Identity]] = {}
        self._bad: dict[bytes, float] = {}
        #: sha256(token) -> its ``exp`` (wall time), for tokens the API server found valid:
        #: reviewed again without taking from the budget. Insertion order is oldest first.
        self._valid: dict[bytes, float] = {}
        self._pending: dict[bytes, asyncio.Task[Identity | None]] = {}
        self._down_until = 0.0
        #: Reviews run on threads of their own: on asyncio's default pool (6 threads on 2
        #: cores) they queued behind each other, and behind everything else that uses it.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=REVIEW_THREADS, thread_name_prefix="token-review"
        )
        self._failing = False
        self.reviews_per_s = reviews_per_s
        self._budget = ReviewBudget.full(reviews_per_s, clock())

    async def identify(self, token: str) -> Identity | None:
        """The token's ServiceAccount, None if it is not a valid agent token for us.

        Raises :class:`AuthUnavailable` when the API server could not say, and
        :class:`AuthRateLimited` when too many other tokens are being reviewed right now.
        """
        if len(token) > MAX_TOKEN_BYTES:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        good = self._good.get(digest)
        if good is not None:
            if good[0] > now:
                return good[1]
            del self._good[digest]
        bad = self._bad.get(digest)
        if bad is not None:
            if bad > now:
                return None
            del self._bad[digest]
        review = self._pending.get(digest)
        if review is None:
            # Checked here, not before the cache: a regular expression over 1 KB on every call
            # cost more than the lookup.
            exp = reviewable_until(token, self.audience, self._wall())
            if exp is None:
                return None
            if now < self._down_until:
                raise _StillDown("the API server failed a review a moment ago")
            # Neither remembered as a refusal nor an outage: the token is reviewed on the
            # next call that finds room, and other tokens are not held back. A token found
            # valid before needs no room (its exp, which the entry ends with, is still ahead:
            # reviewable_until checked it).
            if digest not in self._valid and not self._budget.take(now):
                raise AuthRateLimited(f"more than {self.reviews_per_s:g} new tokens a second")
            # A task of its own: a caller that is cancelled (shutdown, a client gone) does
            # not take the review with it, and every caller sharing it gets its outcome.
            review = asyncio.ensure_future(self._review_and_remember(digest, token, exp))
            self._pending[digest] = review
            review.add_done_callback(lambda t: self._pending.pop(digest, None))
            review.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(review)

    async def _review_and_remember(self, digest: bytes, token: str, exp: float) -> Identity | None:
        try:
            status = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._review_unless_down, token
            )
        except TokenRejected:
            status = {}
        except _StillDown:
            raise
        except Exception as exc:
            self._on_review("failed")
            self._down_until = self._clock() + self.retry_after_s
            if not self._failing:
                if isinstance(exc, AuthUnavailable):
                    log.warning("agent tokens cannot be reviewed (%s): calls get 503", exc)
                else:  # a bug: still a 503, never a call let through or a 500
                    log.exception("reviewing an agent token failed; calls get 503")
                self._failing = True
            raise AuthUnavailable(str(exc)) from None
        if self._failing:
            log.info("agent tokens are reviewed again")
            self._failing = False
        identity = identity_from_review(status, self.audience)
        self._on_review("authenticated" if identity is not None else "rejected")
        self._remember(digest, identity, exp)
        return identity

    def _review_unless_down(self, token: str) -> Mapping[str, Any]:
        """The review, unless another failed while this one waited for a thread: then it
        fails at once instead of waiting out its own timeout."""
        if self._clock() < self._down_until:
            raise _StillDown("the API server failed a review a moment ago")
        return self._review(self.api, token, self.audience)

    def _remember(self, digest: bytes, identity: Identity | None, exp: float) -> None:
        now = self._clock()
        if identity is None:  # a refusal stands whatever the token's exp
            self._valid.pop(digest, None)
            _bounded_put(self._bad, digest, now + self.negative_ttl_s, self.max_entries // 10 or 1)
            return
        _bounded_put(self._valid, digest, exp, self.max_entries)
        ttl = min(self.ttl_s, exp - self._wall())
        if ttl > 0:
            _bounded_put(self._good, digest, (now + ttl, identity), self.max_entries)

    def close(self) -> None:
        """Stop the review threads (a review in flight ends with its timeout) and the client."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.api, "close", None)
        if close is not None:
            close()


def _bounded_put(cache: dict[bytes, Any], key: bytes, value: Any, limit: int) -> None:
    """``cache[key] = value``, first dropping the oldest entries past ``limit``: O(1), no scan
    (expired entries go when they are looked up)."""
    cache.pop(key, None)
    while len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value


def token_reviewer(
    kubeconfig: str | None,
    audience: str,
    ttl_s: float,
    on_review: Callable[[str], None] = lambda result: None,
    reviews_per_s: float = DEFAULT_REVIEWS_PER_S,
) -> TokenReviewer:
    """A reviewer with the gateway's Kubernetes credentials (in-cluster or ``kubeconfig``),
    on a client that does not retry: urllib3's default retries turned a 2 s connect timeout
    into 8 s per call while the API server was unreachable."""
    import copy

    from slm_gateway.kube import api_client

    try:
        api = api_client(kubeconfig)
    except Exception as exc:
        raise AuthNotConfigured(
            "--agent-auth serviceaccount needs Kubernetes credentials to review agent tokens "
            "(in-cluster, --kubeconfig, or the default kubeconfig), and none could be loaded"
            f" ({_credentials_problem(exc)})"
        ) from None
    cfg = copy.deepcopy(api.configuration)
    cfg.retries = False
    # As many pooled connections as review threads (the default, 5 per CPU of the node, is 10
    # on a 2-CPU node: urllib3 warned and opened new connections past it).
    cfg.connection_pool_maxsize = REVIEW_THREADS
    client = importlib.import_module("kubernetes.client")
    return TokenReviewer(
        client.ApiClient(cfg),
        audience,
        ttl_s=ttl_s,
        reviews_per_s=reviews_per_s,
        on_review=on_review,
    )


def _credentials_problem(exc: BaseException) -> str:
    """Why no credentials loaded, in a few words. The kubernetes client's own ConfigException
    says what is missing ("Service host/port is not set.", "No configuration found."); of any
    other error only the type is shown: a YAML error quotes a line of the kubeconfig, which
    may hold a token or a client key."""
    if type(exc).__name__ == "ConfigException":
        return f"ConfigException: {str(exc)[:200]}"
    return type(exc).__name__
