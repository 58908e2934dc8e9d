"""The gateway's HTTP surface: an ASGI app on Starlette, served by uvicorn (uvloop, httptools).

``POST /v1/chat/completions`` is the hot path and is a bare ASGI callable mounted in the
Starlette router: it reads headers straight from the ASGI scope, sends precomputed header
lists, and passes the LLM's response body through as received, so a call allocates little
beyond decoding the request once. Everything it decides comes from pure functions
(:mod:`slm_gateway.decide`, :mod:`slm_gateway.breaker`, :mod:`slm_gateway.validate`); the
upstream calls go through :mod:`slm_gateway.backends`.

The other endpoints (``/v1/models``, ``/healthz``, ``/readyz``, ``/metrics``) are ordinary
Starlette routes. Every error, including unknown paths and methods, has an OpenAI-style
body; an unexpected exception becomes a 500 with such a body and a log line without request
data, never a traceback page. A chat completion still running when uvicorn cancels it at the
end of its graceful shutdown (``--graceful-timeout-s``) gets a 503 ``shutting_down``, or an
error event ending its stream when the stream had begun, before the cancel goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard, TypeVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HTTPRoute

from slm_gateway import errors as e
from slm_gateway.auth import (
    AUTH_SERVICEACCOUNT,
    AuthRateLimited,
    AuthUnavailable,
    Identity,
    TokenReviewer,
    bearer_token,
    for_other_audiences_too,
    may_call,
    token_reviewer,
)
from slm_gateway.backends import (
    BAD_OUTPUT,
    CONNECT,
    TIMEOUT,
    LLMStream,
    UpstreamError,
    Upstreams,
    infer_body,
    new_client,
)
from slm_gateway.breaker import (
    CLOSED,
    STATE_VALUES,
    CircuitBreaker,
    failure_text,
    probe_line_due,
)
from slm_gateway.capture import DROP_ENCODE, Captured, CaptureSink, llm_only_call
from slm_gateway.config import GatewayConfig
from slm_gateway.decide import (
    LLM,
    PLAN_LLM,
    REASON_BAD_OUTPUT,
    REASON_CIRCUIT_OPEN,
    REASON_DEFER,
    REASON_ERROR,
    REASON_LOW_CONFIDENCE,
    REASON_TIMEOUT,
    SLM,
    agree,
    answer_limit,
    canary_bucket,
    estimate_tokens,
    judge_answer,
    normalize_message,
    plan_request,
    reported_usage,
    slm_can_serve,
    slm_completion_tokens,
)
from slm_gateway.errors import GatewayError
from slm_gateway.httpclient import GatewayBusy, OutOfFileDescriptors
from slm_gateway.metrics import GatewayMetrics
from slm_gateway.routes import MODE_CANARY, Route, RouteTable, load_routes_file
from slm_gateway.sse import (
    DONE,
    DONE_EVENT,
    SSE_HEADERS,
    EventSplitter,
    StreamAssembler,
    StreamFormatError,
    data_of,
    is_usage_only,
    synthesize,
)
from slm_gateway.validate import ChatRequest, encode, parse_chat_request, too_deep

log = logging.getLogger("slm_gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
#: An answer to send whole: status, headers, body. None from a path that streamed it itself.
Answer = tuple[int, Headers, bytes]
_T = TypeVar("_T")
#: What :meth:`Gateway._pump` returns when the agent hung up.
_GONE = ("gone", "", "")

_CT_JSON = (b"content-type", b"application/json")
_BACKEND_LLM = (b"x-slm-backend", b"llm")
_BACKEND_SLM = (b"x-slm-backend", b"slm")
_MAX_REQUEST_ID = 128
#: LLM statuses that reject the gateway's credentials (the task's key), not the agent's request.
_LLM_AUTH_STATUSES = frozenset({401, 403})
#: The errors metric's code for them: the task's LLM key Secret needs fixing.
_CODE_LLM_AUTH = "llm_auth"
_CODE_AUTH_RATE_LIMITED = "auth_rate_limited"
#: The code (in the 502's body and the errors metric) of an LLM call not made because the
#: task's key Secret does not let the key go to that LLM's host (:attr:`Route.llm_blocked`).
_CODE_LLM_HOST_NOT_ALLOWED = "llm_host_not_allowed"
#: A bare model name that tasks of several namespaces have (a 400: the task exists, the
#: agent must name which; model_not_found would say it does not).
_CODE_MODEL_AMBIGUOUS = "model_ambiguous"
#: The most ``namespace/task`` ids an ambiguous model's error lists.
_MAX_KEYS_SHOWN = 10
#: One warning per task per this many seconds while its key is rejected; the metric counts all.
_AUTH_LOG_INTERVAL_S = 60.0
#: The code of a call still running when the graceful shutdown ran out (a 503, or a stream's
#: error event): another replica can answer it, so the agent's SDK should retry.
_CODE_SHUTTING_DOWN = "shutting_down"
_SHUTTING_DOWN_MESSAGE = (
    "The gateway is shutting down and stopped this call before it was answered; retry it."
)
#: The 5xx codes counted in slm_gateway_errors_total where they are raised, with the attempt
#: and the breaker outcome that go with them (:meth:`Gateway._llm_broken`,
#: :meth:`Gateway._llm_allowed`, :meth:`Gateway._llm_failure`). Any other 5xx of a routed
#: call is counted where it is answered (:func:`_counted_when_answered`).
_COUNTED_WHERE_RAISED = frozenset(
    {e.CODE_UPSTREAM, e.CODE_UPSTREAM_TIMEOUT, e.CODE_UPSTREAM_UNAVAILABLE}
)
#: The backend_calls_total result of an LLM stream whose agent hung up: the LLM worked on it,
#: but it neither failed nor answered anyone.
_RESULT_CLIENT_DISCONNECTED = "client_disconnected"


class _ClientGone(Exception):
    """The agent disconnected (before its body arrived, or while its LLM stream was awaited:
    :func:`_unless_gone`); there is no one to answer."""


class _StreamCancelled(asyncio.CancelledError):
    """A cancel that reached a stream after its head was sent: the stream has ended with its
    error event, so no 503 may follow. Still a cancel: it propagates like the one it replaces."""


@dataclass(slots=True)
class _LLMCall:
    """What the LLM path needs to know about one call (built once it goes to the LLM)."""

    route: Route
    req: ChatRequest
    raw: bytes
    rid: str
    t0: float
    reason: str
    shadow: bool
    slm_b: CircuitBreaker | None
    llm_b: CircuitBreaker
    now: float
    #: when the LLM's breaker let this call through (_llm_allowed): its outcome counts for
    #: the breaker's state of that moment only
    admitted: float = 0.0


class CircuitKey(NamedTuple):
    """Whose circuit: one task's calls to one upstream endpoint (the route's ``*_log_url``).

    Per task, not per URL: tasks of any team may share one LLM URL, each with its own model
    and key, and one whose model fails or times out (or whose agent's prompts make it time
    out) opened a circuit per URL for every task on it, other namespaces included: their
    agents got 503 ``upstream_unavailable`` while their own model answered. A provider that
    is down opens each task's circuit after that task's own failures. An SLM endpoint is its
    task's own (its Service, ``/v2/models/<model>/infer``), so its circuit is unchanged."""

    namespace: str
    task: str
    endpoint: str

    def __str__(self) -> str:  # in log lines
        where = f"{self.namespace}/{self.task}" if self.namespace else self.task
        return f"{self.endpoint} (task {where})"


def llm_circuit(route: Route) -> CircuitKey:
    return CircuitKey(route.namespace, route.task, route.llm_log_url)


def slm_circuit(route: Route) -> CircuitKey:
    return CircuitKey(route.namespace, route.task, route.slm_log_url)


#: The share of ``--max-shadow-inflight`` kept for tasks below it (:func:`shadow_slot_free`).
SHADOW_TASK_SHARE = 4


def shadow_slot_free(in_flight: int, of_task: int, limit: int) -> bool:
    """Whether a task with ``of_task`` shadow copies in flight, of ``in_flight`` in all, may
    start one more under the gateway's budget ``limit`` (``--max-shadow-inflight``).

    A task below its share (a quarter of the budget, one copy at least) may take any free
    slot; one at or past it only while more than a share stays free. The budget shared
    first come, first served let a task whose SLM is slow hold every slot (each copy lasts
    the SLM's latency, and its calls keep coming): another task's copies were all but all
    skipped (39 of 40), so it never reached ``shadowMinSamples`` and stayed in shadow with
    no sign why. A share of the tasks holding slots now (``limit // holders``) would not do:
    copies are not taken back, so the slow task, alone when it filled the budget, keeps it
    full. A hard quarter per task throttled a task alone in shadow (the usual first rollout)
    to 16 of 64 with three quarters idle; now it gets three quarters, and the last quarter
    is always there for the others. Only four slow tasks at once fill it."""
    share = max(1, limit // SHADOW_TASK_SHARE)
    return in_flight < limit and (of_task < share or in_flight < limit - share)


class Breakers:
    """One circuit breaker per task and upstream endpoint (:class:`CircuitKey`), with its
    state mirrored to a gauge.

    The endpoint is the route's ``*_log_url`` (scheme, host, port and path: no user info, no
    query), as it is also the gauge's ``endpoint`` label and goes into log lines, and a query
    may hold a provider's key. A task's two routes differing only in their query share one
    breaker, which is right: a breaker judges whether the endpoint answers, whatever the query
    says.

    An opening is logged with its cause (how many failures, and the last one); a half-open
    probe that fails is "still open", logged once per :data:`PROBE_LOG_INTERVAL_S` at most
    (``clock`` is when, monotonic): an hour-long outage was a fresh "is now open" line per
    cooldown, 720 of them, none saying why.
    """

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.metrics = metrics
        self.clock = clock
        self._by_key: dict[CircuitKey, CircuitBreaker] = {}
        #: Per circuit whose probes are failing: when that was last logged, and the failed
        #: probes since (this outage only: forgotten when the circuit closes).
        self._probes: dict[CircuitKey, tuple[float, int]] = {}

    def _gauge(self, backend: str, key: CircuitKey, state: str) -> None:
        self.metrics.circuit.labels(key.namespace, key.task, backend, key.endpoint).set(
            STATE_VALUES[state]
        )

    def get(self, backend: str, key: CircuitKey) -> CircuitBreaker:
        found = self._by_key.get(key)
        if found is None:
            found = CircuitBreaker(self.failures, self.cooldown_s)
            self._by_key[key] = found
            self._gauge(backend, key, CLOSED)
        return found

    def prune(self, used: set[CircuitKey]) -> None:
        """Forget the breakers and gauges of circuits no route uses any more (a deleted task,
        a changed URL). Why: a circuit left open reads 2 on /metrics for ever, and the chart's
        SlmFleetSlmCircuitOpen alert would fire until the gateway restarts."""
        for key in [k for k in self._by_key if k not in used]:
            del self._by_key[key]
            self._probes.pop(key, None)
            for backend in (SLM, LLM):
                with contextlib.suppress(KeyError):
                    self.metrics.circuit.remove(key.namespace, key.task, backend, key.endpoint)

    def _current(self, key: CircuitKey, b: CircuitBreaker) -> bool:
        """Whether ``b`` is still the breaker of ``key``. A call that began before
        :meth:`prune` forgot it ends with the old breaker: its gauge series must not come
        back, as nothing would remove it again and a circuit it left open would read 2 for
        ever (the same stuck alert that pruning prevents)."""
        return self._by_key.get(key) is b

    def allow(self, backend: str, key: CircuitKey, b: CircuitBreaker, now: float) -> bool:
        before = b.state
        ok = b.allow(now)
        if b.state != before and self._current(key, b):
            self._gauge(backend, key, b.state)
        return ok

    def record(
        self,
        backend: str,
        key: CircuitKey,
        b: CircuitBreaker,
        ok: bool,
        admitted_at: float,
        why: str = "",
    ) -> None:
        """The outcome of a call that ``allow`` let through at ``admitted_at`` (monotonic);
        ``why`` says how a failed one failed (:func:`~slm_gateway.breaker.failure_text`)."""
        before = b.state
        now = self.clock()
        if ok:
            b.success(now, admitted_at)
        else:
            b.failure(now, admitted_at)
        if b.state == before:
            return
        if self._current(key, b):
            self._gauge(backend, key, b.state)
        why = why or "unknown"
        if ok:
            self._probes.pop(key, None)
            log.info("circuit for %s backend %s is now %s", backend, key, b.state)
        elif before == CLOSED:
            self._probes.pop(key, None)
            log.warning(
                "circuit for %s backend %s is now open after %d failures in a row (last: %s)",
                backend,
                key,
                b.failure_threshold,
                why,
            )
        else:  # its half-open probe failed: the same outage, not a new one
            said_at, unsaid = self._probes.get(key, (-math.inf, 0))
            if not probe_line_due(said_at, now):
                self._probes[key] = (said_at, unsaid + 1)
                return
            self._probes[key] = (now, 0)
            if said_at == -math.inf:
                log.warning(
                    "circuit for %s backend %s still open (probe failed: %s); failed probes "
                    "are logged at most once a minute",
                    backend,
                    key,
                    why,
                )
            else:
                log.warning(
                    "circuit for %s backend %s still open (probe failed: %s; %d since the "
                    "last line)",
                    backend,
                    key,
                    why,
                    unsaid + 1,
                )


class Gateway:
    """State shared by the request path: routes, breakers, metrics, capture, HTTP client."""

    def __init__(
        self,
        cfg: GatewayConfig,
        table: RouteTable,
        *,
        metrics: GatewayMetrics | None = None,
        capture: CaptureSink | None = None,
        auth: TokenReviewer | None = None,
    ) -> None:
        self.cfg = cfg
        #: With ``--agent-auth serviceaccount``: who is calling (see :mod:`slm_gateway.auth`).
        self.auth = auth
        self.table = table
        self.metrics = metrics or GatewayMetrics()
        # The outcome counters, labelled once: ``labels()`` on every call cost a microsecond.
        self._auth_count = {
            r: self.metrics.agent_auth.labels(r)
            for r in ("ok", "missing", "invalid", "forbidden", "rate_limited", "unavailable")
        }
        self.capture = capture
        self.breakers = Breakers(cfg.breaker_failures, cfg.breaker_cooldown_s, self.metrics)
        self.upstreams: Upstreams | None = None
        self.prices = cfg.prices
        self._llm_price = cfg.prices[LLM]
        self._shadows: set[asyncio.Task[None]] = set()
        #: Shadow copies in flight per task (namespace, task): its share of the budget
        #: (:func:`shadow_slot_free`); a task with none has no entry.
        self._shadows_of: dict[tuple[str, str], int] = {}
        self._models_cache: tuple[int, bytes] = (-1, b"")
        self._auth_logged: dict[str, float] = {}
        #: LLM base URLs that refused ``stream_options`` (servers that predate the field):
        #: their streams are asked for without it, and their tokens are estimated.
        self._no_stream_options: set[str] = set()
        # Request ids: a random per-process prefix and a counter. uuid4() reads the kernel's
        # random source on every call, which showed up in profiles of the hot path.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count(1)
        self.started = False
        #: What the route watcher cannot serve as the tasks' specs say, for /metrics
        #: (:meth:`slm_gateway.kube.AgentTaskWatcher.problems`); None with a routes file.
        self.route_problems: Callable[[], Mapping[tuple[str, str], str]] | None = None

    # ---- the hot path: POST /v1/chat/completions -------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        task_hdr = request_id = authorization = None
        length: bytes | None = None
        route: Route | None = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                length = v
            elif k == b"x-agent-task":
                task_hdr = v.decode("latin-1")
            elif k == b"x-request-id":
                request_id = v.decode("latin-1")
            elif k == b"authorization":
                # Two are refused: which one counts would depend on the path (Starlette's
                # headers take the first).
                authorization = v.decode("latin-1") if authorization is None else _TWO_AUTH
        # Settled before anything can fail: every answer names it, errors too, as OpenAI's
        # do (its SDKs show it as the error's request_id): the id an agent's developer has
        # to find the call by is the one it most needs when the call failed.
        request_id = request_id if _usable_request_id(request_id) else self._next_id()
        try:
            # Before the body and the task: a caller without a valid token learns nothing
            # here, not even whether a task exists (/metrics still names them, see README).
            agent = await self._authenticate(authorization) if self.auth is not None else None
            raw = await self._read_body(receive, length)
            req = parse_chat_request(raw)
            name = task_hdr or req.model
            if not name:
                raise e.invalid(
                    "Missing required parameter: 'model' (the AgentTask name); or send the "
                    "X-Agent-Task header.",
                    "model",
                    e.CODE_MISSING,
                )
            route = self._route(name, agent)
            if route is None:
                raise self._unknown_model(name, agent)
            if agent is not None:
                self._authorize(agent, route)
            answer = await self._serve(route, req, raw, request_id, t0, send, receive)
            if answer is None:
                return  # a streamed answer, sent as it came
            status, headers, body = answer
        except GatewayError as err:
            status, body = err.status, err.body()
            headers = [
                _CT_JSON,
                (b"x-request-id", request_id.encode()),
                *((k.encode(), v.encode()) for k, v in err.headers.items()),
            ]
            if status < 500:
                self.metrics.invalid.labels(err.code or str(status)).inc()
            elif route is not None and _counted_when_answered(err):
                self.metrics.errors.labels(
                    route.namespace, route.task, LLM, err.code or str(status)
                ).inc()
        except _ClientGone:
            return
        except asyncio.CancelledError as cancel:
            # uvicorn cancels the calls still running at --graceful-timeout-s. Answered here,
            # the agent gets an error its SDK retries (on another replica) rather than
            # uvicorn's plain-text 500; the cancel itself goes on, as a cancel must.
            if not isinstance(cancel, _StreamCancelled):
                await _send_whole(send, *self._shutting_down(route, request_id))
            raise
        except Exception:
            log.exception("internal error while serving chat completion %s", request_id)
            status = 500
            body = e.error_body(
                "The gateway failed to handle the request.",
                type=e.SERVER_ERROR,
                code=e.CODE_INTERNAL,
            )
            headers = [_CT_JSON, (b"x-request-id", request_id.encode())]
        await _send_whole(send, status, headers, body)

    def _shutting_down(self, route: Route | None, request_id: str) -> Answer:
        """The 503 of a call cancelled at the end of the graceful shutdown, counted and logged
        (one line, no request data). Counted under the LLM, the backend every error of a
        routed call is counted under; one cancelled before it was routed has no task to count
        it under. No scrape may come after the listener closed: the log line is the record."""
        if route is not None:
            self.metrics.errors.labels(route.namespace, route.task, LLM, _CODE_SHUTTING_DOWN).inc()
        log.warning(
            "a call%s was still running when the graceful shutdown timeout ran out: "
            "answered 503 %s",
            f" of task {route.key}" if route is not None else "",
            _CODE_SHUTTING_DOWN,
        )
        body = e.error_body(_SHUTTING_DOWN_MESSAGE, type=e.SERVER_ERROR, code=_CODE_SHUTTING_DOWN)
        headers = [_CT_JSON, (b"x-request-id", request_id.encode()), (b"retry-after", b"1")]
        return 503, headers, body

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):012x}"

    # ---- agent authentication (--agent-auth serviceaccount) --------------------------------
    async def _authenticate(self, authorization: str | None) -> Identity:
        """The calling agent's ServiceAccount, or a 401 (no or bad token), 429 (too many new
        tokens to review right now) or 503 (the API server cannot say). The token itself is
        never logged or echoed."""
        assert self.auth is not None
        if authorization == _TWO_AUTH:
            self._auth_count["invalid"].inc()
            raise _unauthenticated("More than one Authorization header: send one.")
        token = bearer_token(authorization)
        if token is None:
            self._auth_count["missing"].inc()
            raise _unauthenticated(
                "No ServiceAccount token: send one as the API key (Authorization: Bearer), "
                f"minted for the audience {self.auth.audience!r}."
            )
        try:
            agent = await self.auth.identify(token)
        except AuthRateLimited:
            self._auth_count["rate_limited"].inc()
            raise GatewayError(
                429,
                "Too many agent tokens never seen valid right now: the gateway reviews at "
                f"most {self.auth.reviews_per_s:g} of them a second (after a burst) with the "
                "Kubernetes API server; retry shortly. A token it has found valid before is "
                "never held back.",
                type=e.RATE_LIMIT,
                code=_CODE_AUTH_RATE_LIMITED,
                headers={"Retry-After": "1"},
            ) from None
        except AuthUnavailable:
            self._auth_count["unavailable"].inc()
            raise GatewayError(
                503,
                "The gateway cannot check agent tokens right now (the Kubernetes API server "
                "does not answer its TokenReview); retry shortly.",
                type=e.SERVER_ERROR,
                code=e.CODE_AUTH_UNAVAILABLE,
                headers={"Retry-After": "1"},
            ) from None
        if agent is None:
            self._auth_count["invalid"].inc()
            if for_other_audiences_too(token, self.auth.audience):
                raise _unauthenticated(
                    "The API key is a ServiceAccount token minted for other audiences besides "
                    f"{self.auth.audience!r}: mint one for that audience alone, so that a "
                    "gateway key is no credential anywhere else."
                )
            raise _unauthenticated(
                "The API key is not a valid ServiceAccount token for this gateway: expired, "
                f"of a deleted account or pod, or not minted for the audience "
                f"{self.auth.audience!r}."
            )
        return agent

    def _route(self, name: str, agent: Identity | None) -> Route | None:
        """The route of task ``name`` (a bare name, or ``namespace/name``).

        For an authenticated agent a bare name means a task of its own namespace (names are
        unique per namespace only), else a task without a namespace (a routes file's): never
        another namespace's, whose name the agent would then learn from a 403 though
        ``/v1/models`` hides it. Naming ``namespace/name`` itself, it gets that 403.
        """
        if agent is None or "/" in name:
            return self.table.get(name)
        route = self.table.get(f"{agent.namespace}/{name}")
        if route is not None:
            return route
        route = self.table.get(name)
        return route if route is not None and not route.namespace else None

    def _unknown_model(self, name: str, agent: Identity | None) -> GatewayError:
        """Why ``name`` has no route: a 404, or a 400 when the bare name is that of tasks in
        several namespaces, which the agent must then name as ``namespace/name``."""
        shown = repr(name[:200])
        keys = () if agent is not None or "/" in name else self.table.keys_named(name)
        if len(keys) > 1:
            listed = ", ".join(repr(k) for k in keys[:_MAX_KEYS_SHOWN])
            more = f" and {len(keys) - _MAX_KEYS_SHOWN} more" if len(keys) > _MAX_KEYS_SHOWN else ""
            return e.invalid(
                f"The model {shown} is ambiguous: AgentTasks of that name are routed in "
                f"{len(keys)} namespaces. Name one as namespace/task: {listed}{more}.",
                "model",
                _CODE_MODEL_AMBIGUOUS,
            )
        where = f" in namespace {agent.namespace!r}" if agent is not None else ""
        return GatewayError(
            404,
            f"The model {shown} does not exist: no AgentTask of that name{where} is routed by "
            "this gateway.",
            param="model",
            code=e.CODE_MODEL_NOT_FOUND,
        )

    def _authorize(self, agent: Identity, route: Route) -> None:
        if not may_call(agent, route.namespace):
            self._auth_count["forbidden"].inc()
            raise GatewayError(
                403,
                f"ServiceAccount {agent} may not call task {route.task!r} of namespace "
                f"{route.namespace!r}: an agent calls the tasks of its own namespace.",
                param="model",
                code=e.CODE_PERMISSION_DENIED,
            )
        self._auth_count["ok"].inc()

    async def _read_body(self, receive: Receive, length: bytes | None) -> bytes:
        """The request body, within ``body_timeout_s``: a client that stalls mid-body is
        answered 408 rather than holding its connection open for good.

        Any answer before the whole body was read (408, 413, a bad Content-Length) closes the
        connection: kept alive, the HTTP parser would still be inside the old body, take the
        client's next request for the rest of it, and leave it unanswered.
        """
        close = {"Connection": "close"}
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                return await self._receive_body(receive, length)
        except TimeoutError:
            raise GatewayError(
                408,
                f"The request body did not arrive within {self.cfg.body_timeout_s:g} s.",
                code=e.CODE_BODY_TIMEOUT,
                headers=close,
            ) from None
        except GatewayError as err:
            err.headers.update(close)
            raise

    async def _receive_body(self, receive: Receive, length: bytes | None) -> bytes:
        limit = self.cfg.max_body_bytes
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise e.invalid("Invalid Content-Length header.", None) from None
            if declared > limit:
                raise _too_large(limit)
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        body: bytes = msg.get("body", b"")
        if not msg.get("more_body", False):
            if len(body) > limit:
                raise _too_large(limit)
            return body
        chunks = [body]
        size = len(body)
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def _serve(
        self,
        route: Route,
        req: ChatRequest,
        raw: bytes,
        rid: str,
        t0: float,
        send: Send,
        receive: Receive,
    ) -> Answer | None:
        now = time.monotonic()
        breakers = self.breakers
        slm_b = breakers.get(SLM, slm_circuit(route)) if route.has_slm else None
        llm_b = breakers.get(LLM, llm_circuit(route))
        plan = plan_request(
            route.mode,
            route.canary_percent,
            canary_bucket(rid) if route.mode == MODE_CANARY else 0,
            has_slm=slm_b is not None,
            slm_allowed=slm_b is not None and slm_b.available(now),
            llm_allowed=llm_b.available(now),
        )
        wanted_slm = plan.primary == SLM or plan.reason == REASON_CIRCUIT_OPEN
        if wanted_slm and not slm_can_serve(req.body):
            # e.g. n > 1 or tool_choice "none": only the LLM can answer it, whatever the
            # SLM's circuit says, and no fallback is counted against the SLM for it
            plan = PLAN_LLM
        reason = plan.reason
        if plan.primary == SLM and slm_b is not None:
            # written before the breaker's claim: a body too deep to write is a 400 that
            # must not hold a half-open circuit's probe
            payload = _infer_payload(req, route)
            if breakers.allow(SLM, slm_circuit(route), slm_b, now):
                answer = await self._slm(route, req, rid, raw, slm_b, payload)
                if isinstance(answer, tuple):
                    doc, ptok, ctok = answer
                    body = orjson.dumps(doc)
                    self._served(route, SLM, route.slm_model, raw, body, t0, ptok, ctok, rid, "")
                    rid_header = (b"x-request-id", rid.encode())
                    if not req.stream:
                        return 200, [_CT_JSON, _BACKEND_SLM, rid_header], body
                    self.metrics.stream_first_chunk.labels(
                        route.namespace, route.task, SLM
                    ).observe(time.perf_counter() - t0)
                    self.metrics.streams.labels(route.namespace, route.task, SLM, "complete").inc()
                    events = synthesize(
                        doc["choices"][0]["message"],
                        completion_id=doc["id"],
                        created=doc["created"],
                        model=doc["model"],
                        usage=doc["usage"] if req.include_usage else None,
                    )
                    return 200, [*SSE_HEADERS, _BACKEND_SLM, rid_header], events
                reason = answer
            else:
                reason = REASON_CIRCUIT_OPEN
        if reason:
            self.metrics.fallbacks.labels(route.namespace, route.task, reason).inc()
        call = _LLMCall(route, req, raw, rid, t0, reason, plan.shadow, slm_b, llm_b, now)
        if req.stream:
            return await self._llm_stream(call, send, receive)
        return await self._llm(call)

    async def _llm(self, call: _LLMCall) -> Answer:
        route, req, raw = call.route, call.req, call.raw
        assert self.upstreams is not None
        if route.llm_blocked:
            raise _key_withheld(route)
        body = req.body
        if req.model != route.llm_model:
            body["model"] = route.llm_model
            payload = encode(body)  # before the breaker's claim, like the SLM's payload
        else:
            payload = raw
        self._llm_allowed(call)
        t = time.perf_counter()
        try:
            reply = await self.upstreams.llm(route, payload)
        except UpstreamError as err:
            raise self._llm_unreachable(call, err, time.perf_counter() - t) from None
        spent = time.perf_counter() - t
        status = reply.status
        if not 200 <= status < 300:
            return self._llm_failure(
                route, reply.status, reply.body, reply.retry_after, spent, call
            )
        try:
            doc = orjson.loads(reply.body)
            message = doc["choices"][0]["message"]
            usage = doc.get("usage")
            if not isinstance(message, dict):
                raise TypeError("message")
        except (
            orjson.JSONDecodeError,
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            AttributeError,
        ):
            self._llm_broken(call, BAD_OUTPUT, e.CODE_UPSTREAM, spent, "an unreadable answer")
            raise GatewayError(
                502,
                "The LLM backend answered with an unreadable chat completion.",
                type=e.SERVER_ERROR,
                code=e.CODE_UPSTREAM,
            ) from None
        ptok, ctok = _llm_tokens(call, message, usage, reply.body)
        self._llm_answered(call, message, reply.body, spent, ptok, ctok)
        return 200, [_CT_JSON, *self._llm_headers(call)], reply.body

    async def _llm_stream(self, call: _LLMCall, send: Send, receive: Receive) -> Answer | None:
        """A streamed LLM answer, relayed event by event as it arrives.

        Until the LLM's status is in, this fails like :meth:`_llm` (an error status, a 503 with
        the circuit open). Once the agent got its 200 and the first bytes, a failure can only
        be told inside the stream: an ``error`` event (what OpenAI sends in that case), then the
        end of the stream. The LLM is asked for its usage chunk, so the tokens and cost of
        streamed calls are counted like the others; an agent that did not ask for usage does
        not get that chunk. An LLM server that refuses ``stream_options`` (one that predates
        it) is asked again without it, and once that worked, never with it again unless the
        agent sent it: its streamed calls are served, with estimated tokens. Remembered only
        then: a refusal read wrong, or a server failing for other reasons, must not cost every
        later call its usage count for the life of the process.
        """
        route, req = call.route, call.req
        assert self.upstreams is not None
        if route.llm_blocked:
            raise _key_withheld(route)
        body = req.body
        body["model"] = route.llm_model
        asked = body.get("stream_options")
        bare = asked is None and route.llm_url in self._no_stream_options
        if not bare:
            body["stream_options"] = {**(asked or {}), "include_usage": True}
        payload = encode(body)  # before the breaker's claim
        self._llm_allowed(call)
        t = time.perf_counter()
        retried = False
        # Watched from before the LLM is asked (it completes when the agent disconnects), but
        # not raced against the wait for the LLM's status: that ends with its answer, its
        # timeout or a connect error, each learnt by the breaker (cut at a hang-up, an LLM
        # that never answers, behind agents that give up sooner, failed no call and its
        # circuit never opened). Once the status is in, a hang-up is seen at once
        # (:meth:`_stream_unwanted`); the wait for the first event is raced (:meth:`_pump`).
        gone = asyncio.ensure_future(receive())
        try:
            while True:
                try:
                    async with self.upstreams.llm_stream(route, payload) as upstream:
                        if 200 <= upstream.status < 300:
                            if retried:
                                self._no_stream_options.add(route.llm_url)
                                log.warning(
                                    "LLM backend %s refused stream_options and answered "
                                    "without it; its streamed answers are asked for without "
                                    "usage from now on, and their tokens estimated",
                                    route.llm_log_url,
                                )
                            if not self._stream_unwanted(call, gone, t):
                                await self._relay(call, upstream, t, send, gone)
                            return None  # leaving the context closes the LLM's connection
                        try:
                            text = await upstream.read_all()
                        except UpstreamError as err:
                            spent = time.perf_counter() - t
                            raise self._llm_unreachable(call, err, spent) from None
                except UpstreamError as err:  # before the status came: nothing was sent yet
                    raise self._llm_unreachable(call, err, time.perf_counter() - t) from None
                if asked is None and not bare and _refuses_stream_options(upstream.status, text):
                    if self._stream_unwanted(call, gone, t):
                        return None  # not asked again for nobody
                    # The gateway added the field, not the agent: ask again without it.
                    bare = retried = True
                    del body["stream_options"]
                    payload = orjson.dumps(body)  # written once already, with more in it
                    continue
                return self._llm_failure(
                    route,
                    upstream.status,
                    text,
                    upstream.retry_after,
                    time.perf_counter() - t,
                    call,
                )
        finally:
            gone.cancel()
            if gone.done() and not gone.cancelled():
                gone.exception()  # a receive() that failed: no one left to tell

    def _stream_unwanted(self, call: _LLMCall, gone: asyncio.Future[Message], t: float) -> bool:
        """Whether the agent of a stream whose LLM status just came has hung up meanwhile;
        if so, the LLM's attempt is counted as cut off (:meth:`_llm_hung_up`, nothing sent
        yet), and the caller closes the LLM's connection without reading on."""
        if not gone.done():
            return False
        self._llm_hung_up(call, StreamAssembler(), time.perf_counter() - t)
        return True

    async def _relay(
        self,
        call: _LLMCall,
        upstream: LLMStream,
        t: float,
        send: Send,
        gone: asyncio.Future[Message],
    ) -> None:
        """Pass the LLM's events on as they come; then count, shadow and capture the answer.

        A cancel once the head went out (uvicorn's, at the end of its graceful shutdown) ends
        the stream with an error event, wherever it came: the agent's SDK raises it, where a
        stream cut short without one would read as an answer cut short."""
        await send(
            {"type": "http.response.start", "status": 200, "headers": self._sse_headers(call)}
        )
        try:
            await self._relay_events(call, upstream, t, send, gone)
        except asyncio.CancelledError:
            try:
                await self._stream_cancelled(call, send)
            finally:  # a second cancel while the event is sent is still no place for a 503
                raise _StreamCancelled() from None

    async def _relay_events(
        self,
        call: _LLMCall,
        upstream: LLMStream,
        t: float,
        send: Send,
        gone: asyncio.Future[Message],
    ) -> None:
        route = call.route
        assembled = StreamAssembler()
        try:
            failure = await self._pump(call, upstream, assembled, send, gone)
        except Exception:
            # A bug here must not become a second response start on a started response.
            log.exception("internal error while relaying a streamed answer")
            failure = ("error", e.CODE_INTERNAL, "The gateway failed while streaming the answer.")
        spent = time.perf_counter() - t
        if failure == _GONE:
            self._llm_hung_up(call, assembled, spent)
            return  # leaving the upstream's context closes the LLM's connection
        if failure is not None:
            result, code, text = failure
            if code == e.CODE_INTERNAL:  # the gateway's fault, not the LLM's: no breaker
                self.metrics.errors.labels(route.namespace, route.task, LLM, code).inc()
            else:
                why = text.rstrip(".") or "an error event in its stream"
                self._llm_broken(call, result, code, spent, why)
            self.metrics.streams.labels(route.namespace, route.task, LLM, "failed").inc()
            tail = _error_event(text, code) if text else b""
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.metrics.streams.labels(route.namespace, route.task, LLM, "complete").inc()
        try:  # the response is over: nothing may escape to a second response start
            message = assembled.message()
            try:
                completion: bytes | None = orjson.dumps(
                    assembled.completion(f"chatcmpl-{call.rid}", route.llm_model)
                )
            except orjson.JSONEncodeError:  # read, but nested deeper than orjson writes
                completion = None
            ptok, ctok = _llm_tokens(call, message, assembled.usage, completion or b"")
            self._llm_answered(call, message, completion, spent, ptok, ctok)
        except Exception:
            log.exception("internal error while counting a streamed answer")
            self.metrics.errors.labels(route.namespace, route.task, LLM, e.CODE_INTERNAL).inc()

    async def _stream_cancelled(self, call: _LLMCall, send: Send) -> None:
        """End a stream cancelled at the end of the graceful shutdown with an error event
        (its head went out: the status cannot change), counted as a failed stream. The LLM
        did not fail: its breaker learns nothing."""
        route = call.route
        self.metrics.errors.labels(route.namespace, route.task, LLM, _CODE_SHUTTING_DOWN).inc()
        self.metrics.streams.labels(route.namespace, route.task, LLM, "failed").inc()
        log.warning(
            "a streamed call of task %s was still running when the graceful shutdown timeout "
            "ran out: ended with an error event %s",
            route.key,
            _CODE_SHUTTING_DOWN,
        )
        tail = _error_event(_SHUTTING_DOWN_MESSAGE, _CODE_SHUTTING_DOWN)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _llm_hung_up(self, call: _LLMCall, assembled: StreamAssembler, spent: float) -> None:
        """Count an LLM stream whose agent hung up. The LLM worked on it until then, so the
        attempt, its latency, and the tokens of what it had sent (estimated: its usage comes
        last) and their cost count; no answer (nothing captured) and no breaker outcome (the
        LLM did not fail). Without them the LLM's calls and spend read lower than what it did
        and billed."""
        route = call.route
        self.metrics.streams.labels(
            route.namespace, route.task, LLM, _RESULT_CLIENT_DISCONNECTED
        ).inc()
        self.metrics.attempt(route.namespace, route.task, LLM, _RESULT_CLIENT_DISCONNECTED, spent)
        if assembled.chunks:
            ptok, ctok = _llm_tokens(call, assembled.message(), assembled.usage, b"")
        else:  # it had sent nothing yet: the prompt alone
            ptok, ctok = estimate_tokens(len(call.raw)), 0
        cost, llm_cost = self._costs(route, LLM, ptok, ctok)
        self.metrics.served(route.namespace, route.task, LLM).spend(ptok, ctok, cost, llm_cost)

    async def _pump(
        self,
        call: _LLMCall,
        upstream: LLMStream,
        assembled: StreamAssembler,
        send: Send,
        gone: asyncio.Future[Message],
    ) -> tuple[str, str, str] | None:
        """Relay events until the LLM's stream ends: None when it ended well, else the
        failure (attempt result, error code, message for the agent's error event; an empty
        message when the LLM's own error event already went on), or :data:`_GONE`.

        A stream ends well with ``data: [DONE]``, or, for servers that do not send it, once
        every choice it began has its ``finish_reason`` (the agent then gets the ``[DONE]``
        OpenAI would have sent). Once it has either, a connection that then ends untidily
        (reset, no closing chunk, a last line without its blank line) takes nothing from the
        answer: it is served, counted and captured as complete, and never an error for the
        task's LLM circuit. One that stops short of both broke
        off, even when its end looked clean to HTTP: an answer delimited by the connection's
        close (no ``Content-Length``, not chunked) reads the same whether the LLM finished
        or its process died mid-answer. Passed on as complete, the agent would act on half
        an answer with no error, the call would count as a success, and capture would keep
        the half answer as a training example; so it ends like any other broken stream.
        """
        include_usage = call.req.include_usage
        secret = call.route.llm_api_key
        splitter = EventSplitter()
        first = True
        done = False
        while True:
            if gone.done():
                return _GONE
            try:
                if first:  # no token yet: an agent that gives up waiting is seen at once
                    chunk = await _unless_gone(upstream.next_chunk(), gone)
                else:  # after it, at the next event (a task per event would cost the hot path)
                    chunk = await upstream.next_chunk()
            except _ClientGone:
                return _GONE
            except UpstreamError as err:
                if done or assembled.finished:  # the answer is whole; only its end was not
                    chunk = None
                else:
                    return err.kind, _error_code(err), f"The LLM's stream broke off ({err.detail})."
            if chunk is None:
                tail = splitter.pending.strip()
                whole = done or assembled.finished or data_of(tail) == DONE  # one "\n" short
                if tail and not whole:
                    return BAD_OUTPUT, e.CODE_UPSTREAM, "The LLM's stream ended mid-event."
                if not whole:
                    return (
                        CONNECT,
                        e.CODE_UPSTREAM,
                        "The LLM's stream broke off (it ended before the answer was complete).",
                    )
                if not done:  # the agent's SDK may wait for it, as OpenAI always sends it
                    await send(
                        {"type": "http.response.body", "body": DONE_EVENT, "more_body": True}
                    )
                return None
            out = []
            tokens = False
            try:
                for event in splitter.feed(chunk):
                    data = data_of(event)
                    if data == DONE:
                        done = True
                    elif data is not None:
                        doc = orjson.loads(data)
                        if secret and isinstance(doc, dict) and "error" in doc:
                            event, doc = _unquoted(event, data, doc, secret)
                        assembled.add(doc)
                        if is_usage_only(doc) and not include_usage:
                            continue
                        tokens = True
                    out.append(event + b"\n\n")
            except (orjson.JSONDecodeError, StreamFormatError):
                return BAD_OUTPUT, e.CODE_UPSTREAM, "The LLM sent an unreadable stream."
            if out:
                if first and tokens:  # comments (keep-alives) are not the first token
                    first = False
                    route = call.route
                    self.metrics.stream_first_chunk.labels(
                        route.namespace, route.task, LLM
                    ).observe(time.perf_counter() - call.t0)
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            if assembled.error is not None:
                return "error", e.CODE_UPSTREAM, ""

    def _llm_allowed(self, call: _LLMCall) -> None:
        """Raise the 503 an agent gets while the LLM's circuit is open."""
        route = call.route
        # After an SLM attempt, the time now: a cooldown may have ended while the SLM was
        # tried, and the call then probes the LLM instead of getting a 503.
        now = time.monotonic() if call.reason else call.now
        if self.breakers.allow(LLM, llm_circuit(route), call.llm_b, now):
            call.admitted = now
            return
        self.metrics.errors.labels(
            route.namespace, route.task, LLM, e.CODE_UPSTREAM_UNAVAILABLE
        ).inc()
        raise GatewayError(
            503,
            "The LLM backend is failing and its circuit is open; retry shortly.",
            type=e.SERVER_ERROR,
            code=e.CODE_UPSTREAM_UNAVAILABLE,
            headers={"Retry-After": str(max(1, round(self.cfg.breaker_cooldown_s)))},
        )

    def _llm_broken(self, call: _LLMCall, result: str, code: str, spent: float, why: str) -> None:
        """Count an LLM attempt that failed (``why``: how, for the circuit's log line),
        against its breaker too."""
        route = call.route
        self.metrics.attempt(route.namespace, route.task, LLM, result, spent)
        self.breakers.record(LLM, llm_circuit(route), call.llm_b, False, call.admitted, why)
        self.metrics.errors.labels(route.namespace, route.task, LLM, code).inc()

    def _llm_unreachable(self, call: _LLMCall, err: UpstreamError, spent: float) -> GatewayError:
        """The 502 or 504 for an LLM that did not answer (counted here)."""
        code = _error_code(err)
        self._llm_broken(call, err.kind, code, spent, failure_text(err.kind, err.detail))
        return GatewayError(
            504 if err.kind == TIMEOUT else 502,
            f"The LLM backend did not answer ({err.detail}).",
            type=e.SERVER_ERROR,
            code=code,
        )

    def _llm_answered(
        self,
        call: _LLMCall,
        message: dict[str, Any],
        body: bytes | None,
        spent: float,
        ptok: int,
        ctok: int,
    ) -> None:
        """An LLM answer in full: count it, close its breaker, shadow it, capture it
        (``body`` None: a streamed answer too deep to write as one record)."""
        route = call.route
        self.metrics.attempt(route.namespace, route.task, LLM, "ok", spent)
        if call.llm_b.state != "closed":
            self.breakers.record(LLM, llm_circuit(route), call.llm_b, True, call.admitted)
        else:
            call.llm_b.success(call.now, call.admitted)
        if call.shadow and call.slm_b is not None:
            self._start_shadow(route, call.req, message, call.rid, call.slm_b)
        self._served(
            route,
            LLM,
            route.llm_model,
            call.raw,
            body,
            call.t0,
            ptok,
            ctok,
            call.rid,
            call.reason,
            # the record's mark; without capture there is no record to mark
            self.capture is not None and llm_only_call(call.req.body),
        )

    def _llm_headers(self, call: _LLMCall) -> Headers:
        headers = [_BACKEND_LLM, (b"x-request-id", call.rid.encode())]
        if call.reason:
            headers.append((b"x-slm-fallback-reason", call.reason.encode()))
        return headers

    def _sse_headers(self, call: _LLMCall) -> Headers:
        return [*SSE_HEADERS, *self._llm_headers(call)]

    def _llm_failure(
        self,
        route: Route,
        status: int,
        body: bytes,
        retry_after: str | None,
        spent: float,
        call: _LLMCall,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """A non-2xx from the LLM: 4xx (the agent's request, or rate limits) is passed on as
        the LLM said it, in OpenAI's error body (:func:`errors.upstream_4xx_body`); anything
        else (5xx, or a 1xx or 3xx, which is no answer either: an unfollowed redirect) becomes
        a 502 with our error body, never a status an SDK would take for success or a redirect
        to follow; the LLM's ``Retry-After`` goes with it.

        A 401 or 403 is a 502 too: the LLM was called with the task's key, not the agent's, so
        the agent's SDK must not read it as its own credentials being rejected. The endpoint
        did answer, so the task's breaker records no failure: an open circuit would answer
        503 in place of the message that says what to fix."""
        auth = status in _LLM_AUTH_STATUSES
        if auth or not 400 <= status < 500:
            self.metrics.attempt(route.namespace, route.task, LLM, "error", spent)
            self.breakers.record(
                LLM, llm_circuit(route), call.llm_b, auth, call.admitted, f"HTTP {status}"
            )
            if auth:
                self._auth_rejected(route, status)
                message = (
                    "The LLM backend rejected the gateway's credentials for task "
                    f"{route.task!r} (HTTP {status}): the LLM key this gateway holds for "
                    "the task is missing, wrong or lacks permission. Your own API key was not "
                    "used; the platform team must fix the task's LLM key Secret."
                )
            else:
                message = f"The LLM backend failed with HTTP {status}."
            self.metrics.errors.labels(
                route.namespace, route.task, LLM, _CODE_LLM_AUTH if auth else e.CODE_UPSTREAM
            ).inc()
            # An overloaded LLM's 503 says when to come back; the agent's SDK, which retries a
            # 502 anyway, would otherwise retry at once and add to the overload.
            come_back = {"Retry-After": retry_after} if retry_after and not auth else None
            raise GatewayError(
                502, message, type=e.SERVER_ERROR, code=e.CODE_UPSTREAM, headers=come_back
            )
        self.metrics.attempt(route.namespace, route.task, LLM, "status_4xx", spent)
        self.breakers.record(LLM, llm_circuit(route), call.llm_b, True, call.admitted)
        self.metrics.errors.labels(route.namespace, route.task, LLM, "llm_4xx").inc()
        body = e.upstream_4xx_body(status, body, route.llm_api_key)
        headers = [_CT_JSON, _BACKEND_LLM, (b"x-request-id", call.rid.encode())]
        if retry_after:
            headers.append((b"retry-after", retry_after.encode("latin-1", "replace")))
        return status, headers, body

    def _auth_rejected(self, route: Route, status: int) -> None:
        """Warn that a task's LLM key is rejected, at most once a minute per task."""
        now = time.monotonic()
        last = self._auth_logged.get(route.key)
        if last is not None and now - last < _AUTH_LOG_INTERVAL_S:
            return
        self._auth_logged[route.key] = now
        log.warning(
            "LLM backend %s answered HTTP %d for task %s: it rejects the LLM key the gateway "
            "holds for this task (check the task's LLM key Secret); agents get a 502. Counted "
            'in slm_gateway_errors_total{code="llm_auth"}, logged at most once a minute.',
            route.llm_log_url,
            status,
            route.key,
        )

    async def _ask_slm(
        self, route: Route, req: ChatRequest, slm_b: CircuitBreaker, body: bytes
    ) -> tuple[Any, str]:
        """One SLM call: its answer and the fallback reason ("" when the answer is usable).

        The answer comes back cut at the request's ``stop`` sequences, as it was judged
        (:func:`judge_answer`). Served and shadow calls both come here, so an SLM attempt is
        counted and fed to the breaker the same way whichever path made it.
        """
        assert self.upstreams is not None
        t = time.perf_counter()
        admitted = time.monotonic()  # just after the caller's breakers.allow
        try:
            answer, confidence = await self.upstreams.slm(route, body)
        except (OutOfFileDescriptors, GatewayBusy):
            # The gateway's shortage (no file descriptor, or no pooled connection free in
            # time), not the SLM's failure: no breaker outcome (a half-open probe's claim
            # expires after the cooldown), or a burst of calls opened the SLM's circuit for its
            # cooldown after the shortage was over; and no line per call, as the client already
            # says it once per 10 s. The LLM can still answer.
            self.metrics.attempt(route.namespace, route.task, SLM, "error", time.perf_counter() - t)
            return None, REASON_ERROR
        except Exception as exc:
            # Whatever went wrong asking the SLM, the LLM can still answer: the agent never
            # gets a 500 for it. A failure the adapter does not know (a bug, a session closing
            # at shutdown) is logged by type only, as its message may quote the request.
            if isinstance(exc, UpstreamError):
                kind = exc.kind
                why = failure_text(kind, exc.detail)
            else:
                kind = "error"
                why = f"unexpected {type(exc).__name__}"
                log.error(
                    "SLM call for task %s failed unexpectedly: %s", route.task, type(exc).__name__
                )
            result = kind if kind in (TIMEOUT, BAD_OUTPUT) else "error"
            self.metrics.attempt(route.namespace, route.task, SLM, result, time.perf_counter() - t)
            self.breakers.record(SLM, slm_circuit(route), slm_b, False, admitted, why)
            if kind == TIMEOUT:
                return None, REASON_TIMEOUT
            return None, REASON_BAD_OUTPUT if kind == BAD_OUTPUT else REASON_ERROR
        spent = time.perf_counter() - t
        # cut at the request's stop sequences, then judged as the agent would get it
        answer, verdict = judge_answer(
            answer, confidence, route.confidence_threshold, req.body, req.tool_names
        )
        bad = verdict == REASON_BAD_OUTPUT
        self.breakers.record(
            SLM, slm_circuit(route), slm_b, not bad, admitted, "bad output (an unusable answer)"
        )
        result = BAD_OUTPUT if bad else verdict or "ok"
        self.metrics.attempt(route.namespace, route.task, SLM, result, spent)
        return answer, verdict

    async def _slm(
        self,
        route: Route,
        req: ChatRequest,
        rid: str,
        raw: bytes,
        slm_b: CircuitBreaker,
        payload: bytes,
    ) -> tuple[dict[str, Any], int, int] | str:
        """The SLM's answer as a chat completion with token counts, or a fallback reason."""
        answer, verdict = await self._ask_slm(route, req, slm_b, payload)
        if verdict:
            return verdict
        message = _served_message(answer, self._next_id())
        ctok = slm_completion_tokens(answer, answer_limit(req.body))
        ptok = estimate_tokens(len(raw))
        doc = {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": route.task,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": ptok,
                "completion_tokens": ctok,
                "total_tokens": ptok + ctok,
            },
        }
        return doc, ptok, ctok

    def _start_shadow(
        self,
        route: Route,
        req: ChatRequest,
        llm_message: dict[str, Any],
        rid: str,
        slm_b: CircuitBreaker,
    ) -> None:
        owner = (route.namespace, route.task)
        free = shadow_slot_free(
            len(self._shadows), self._shadows_of.get(owner, 0), self.cfg.max_shadow_inflight
        )
        if not free or not slm_can_serve(req.body):
            # (A request only the LLM can answer, such as tool_choice "none" or n > 1, is
            # never the SLM's in any mode: compared anyway, its copy counted as a
            # disagreement against the SLM's agreement, which gates its rollout.)
            self.metrics.shadow.labels(route.namespace, route.task, "skipped").inc()
            return
        try:
            payload = _infer_payload(req, route)
        except GatewayError:  # too deep to write: the LLM answered it as it came
            self.metrics.shadow.labels(route.namespace, route.task, "skipped").inc()
            return
        if not self.breakers.allow(SLM, slm_circuit(route), slm_b, time.monotonic()):
            self.metrics.shadow.labels(route.namespace, route.task, "skipped").inc()
            return
        task = asyncio.create_task(self._shadow(route, req, llm_message, slm_b, payload))
        self._shadows.add(task)
        self._shadows_of[owner] = self._shadows_of.get(owner, 0) + 1
        task.add_done_callback(functools.partial(self._shadow_done, owner))

    def _shadow_done(self, owner: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._shadows.discard(task)
        left = self._shadows_of.pop(owner, 1) - 1
        if left:
            self._shadows_of[owner] = left

    async def _shadow(
        self,
        route: Route,
        req: ChatRequest,
        llm_message: dict[str, Any],
        slm_b: CircuitBreaker,
        payload: bytes,
    ) -> None:
        """Ask the SLM the same question and count whether it agrees with the LLM's answer.

        The comparison is inside the ``try`` too: nobody awaits this task, so an exception
        escaping it would only be logged at garbage collection and the call never counted.
        """
        try:
            answer, verdict = await self._ask_slm(route, req, slm_b, payload)
            if verdict in (REASON_DEFER, REASON_LOW_CONFIDENCE):
                result = "defer"
            elif verdict:
                result = "error"
            else:
                # Judged as it would be served (stop sequences cut, arguments as JSON text):
                # the raw answer disagreed where the agent would have read the LLM's answer.
                served = _served_message(answer, self._next_id())
                same = agree(served, llm_message, route.metric, req.tools, route.task_type)
                result = "agree" if same else "disagree"
        except Exception:
            log.exception("shadow call failed")
            result = "error"
        self.metrics.shadow.labels(route.namespace, route.task, result).inc()

    def _served(
        self,
        route: Route,
        backend: str,
        model: str,
        raw: bytes,
        body: bytes | None,
        t0: float,
        ptok: int,
        ctok: int,
        rid: str,
        reason: str,
        llm_only: bool = False,
    ) -> None:
        """Count an answered call and hand it to capture (``body`` None: counted as a
        capture dropped because it cannot be written, as the capture workers count theirs).
        ``llm_only``: the request is the LLM's alone (:func:`llm_only_call`); an SLM's
        answer never is."""
        latency = time.perf_counter() - t0
        cost, llm_cost = self._costs(route, backend, ptok, ctok)
        self.metrics.served(route.namespace, route.task, backend).observe(
            latency, ptok, ctok, cost, llm_cost
        )
        if self.capture is None:
            return
        if body is None:
            log.warning("capture: dropped a record of %s: cannot encode it", route.key)
            self.capture.drop(route.key, DROP_ENCODE)
        else:
            self.capture.submit(
                Captured(
                    route.key,
                    route.task,
                    model,
                    backend,
                    raw,
                    body,
                    latency * 1000.0,
                    ptok,
                    ctok,
                    time.time(),
                    rid,
                    reason,
                    llm_only,
                )
            )

    def _costs(self, route: Route, backend: str, ptok: int, ctok: int) -> tuple[float, float]:
        """The estimated cost of ``ptok`` + ``ctok`` tokens on ``backend``, and on the LLM."""
        llm_price = route.llm_price or self._llm_price  # the task's own LLM price, if it has one
        price = llm_price if backend == LLM else self.prices.get(backend)
        cost = price.cost(ptok, ctok) if price is not None else 0.0
        return cost, llm_price.cost(ptok, ctok)

    # ---- the other endpoints --------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        """The routed tasks as OpenAI's model list, cached per route table version.

        The version is read before the routes: the watcher thread may change the table while
        they are read, and a list cached under the later version would hide that change
        until the next one. Cached under the earlier one, it is only built once more. With
        agent authentication, an agent sees the tasks it may call, and only with a token.
        """
        if self.auth is not None:
            try:
                agent = await self._authenticate(_authorization(request))
            except GatewayError as err:
                return _error_response(err)
            data = [
                _model_entry(r, self._model_id(r, agent))
                for r in self.table.routes()
                if may_call(agent, r.namespace)
            ]
            return Response(
                orjson.dumps({"object": "list", "data": data}), media_type="application/json"
            )
        version, cached = self._models_cache
        current = self.table.version
        if version != current:
            data = [_model_entry(r, self._model_id(r, None)) for r in self.table.routes()]
            cached = orjson.dumps({"object": "list", "data": data})
            self._models_cache = (current, cached)
        return Response(cached, media_type="application/json")

    async def model(self, request: Request) -> Response:
        """One routed task as OpenAI's model object (``GET /v1/models/{model}``, the SDKs'
        ``models.retrieve``): the entry :meth:`models` lists for it, by the same rules (with
        agent authentication, a token, and only the tasks the agent may call), else the 404
        (or the ambiguous name's 400) a chat completion naming it gets. Another namespace's
        task is a 404 here, not a chat completion's 403: the list does not show it either."""
        name: str = request.path_params["model"]
        if not name:  # /v1/models/: a trailing slash is an unknown path, as anywhere else
            raise HTTPException(404)
        agent = None
        if self.auth is not None:
            try:
                agent = await self._authenticate(_authorization(request))
            except GatewayError as err:
                return _error_response(err)
        route = self._route(name, agent)
        if route is None or (agent is not None and not may_call(agent, route.namespace)):
            return _error_response(self._unknown_model(name, agent))
        entry = _model_entry(route, self._model_id(route, agent))
        return Response(orjson.dumps(entry), media_type="application/json")

    def _model_id(self, route: Route, agent: Identity | None) -> str:
        """The id a task is listed under: its bare name where that name alone reaches it (for
        ``agent``), else ``namespace/task``."""
        return route.task if self._route(route.task, agent) is route else route.key

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(self, request: Request) -> Response:
        if self.started and self.table.ready:
            return Response(
                orjson.dumps({"status": "ready", "tasks": len(self.table)}),
                media_type="application/json",
            )
        return Response(
            e.error_body("Routes are not loaded yet.", type=e.SERVER_ERROR, code=e.CODE_NOT_READY),
            status_code=503,
            media_type="application/json",
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        m = self.metrics
        m.routes.set(len(self.table))
        used: set[CircuitKey] = set()
        known: set[tuple[str, str]] = set()
        modes: set[tuple[str, str, str]] = set()
        for r in self.table.routes():
            modes.add((r.namespace, r.task, r.mode))
            if r.has_slm:
                # At 0 from this scrape on, so the operator's first window after the SLM's
                # first failure or disagreement reads it (slm_gateway.metrics).
                m.expect_slm(r.namespace, r.task)
            used.update((llm_circuit(r), slm_circuit(r)))
            known.add((r.namespace, r.task))
        # Replaced, not cleared and set again: an earlier scrape's text may be being written
        # in a thread meanwhile (slm_gateway.metrics.GatewayMetrics.exposition).
        m.set_route_modes(modes)
        m.set_route_problems(self.route_problems() if self.route_problems is not None else {})
        self.breakers.prune(used)
        m.forget_removed_tasks(known, time.monotonic(), self.cfg.removed_task_metrics_s)
        if self.capture is not None:
            m.capture_queue.set(self.capture.depth())
        # The text (about 20 KB a task) is written in a thread: on the loop, a scrape of 800
        # tasks held every agent call for 3.5 s. Only the per-call numbers are copied here.
        text = await asyncio.to_thread(m.exposition())
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    # ---- lifecycle ----------------------------------------------------------------------
    async def drain_shadows(self, timeout: float) -> None:
        if self._shadows:
            await asyncio.wait(list(self._shadows), timeout=timeout)


def _model_entry(route: Route, model_id: str) -> dict[str, Any]:
    """One task as an entry of OpenAI's model list."""
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "slm-fleet",
        "route": route.public(),
    }


def _usable_request_id(sent: str | None) -> TypeGuard[str]:
    """Whether an agent's ``X-Request-ID`` can be the call's id: echoed in a header and
    written to the call log, so short, printable ASCII; else the gateway makes its own."""
    return (
        sent is not None
        and 0 < len(sent) <= _MAX_REQUEST_ID
        and sent.isascii()
        and sent.isprintable()
    )


def _authorization(request: Request) -> str | None:
    """The Authorization header of a request to a Starlette route (:data:`_TWO_AUTH` for two,
    refused as on the chat path)."""
    sent = request.headers.getlist("authorization")
    return _TWO_AUTH if len(sent) > 1 else (sent[0] if sent else None)


def _error_response(err: GatewayError) -> Response:
    return Response(err.body(), err.status, headers=err.headers, media_type="application/json")


#: Stands for "two Authorization headers came" (no header value can hold a NUL byte).
_TWO_AUTH = "\x00two"


def _counted_when_answered(err: GatewayError) -> bool:
    """Whether a routed call's ``err`` is counted in slm_gateway_errors_total as it is
    answered: a 5xx not counted where it was raised. Why: the HTTP client's
    ``out_of_file_descriptors`` 503 reaches the answer uncounted, and an operator alerting on
    that metric saw a gateway turning agents away as a healthy one; the upstream codes, counted
    where raised, must not count twice."""
    return err.status >= 500 and err.code not in _COUNTED_WHERE_RAISED


def _key_withheld(route: Route) -> GatewayError:
    """The 502 of an LLM call not made: the task's key Secret does not let its key go to the
    task's LLM host. The message names the Secret, the host and the fix. Not the LLM's
    failure, so no attempt and no breaker outcome; counted where answered (code
    ``llm_host_not_allowed``). The route watcher logs it once when it starts, and reports it
    as a route problem: a log line per call would bury everything else."""
    return GatewayError(
        502, route.llm_blocked, type=e.SERVER_ERROR, code=_CODE_LLM_HOST_NOT_ALLOWED
    )


def _unauthenticated(message: str) -> GatewayError:
    """A 401 as OpenAI sends for a bad API key (its SDKs raise AuthenticationError)."""
    return GatewayError(
        401,
        message,
        code=e.CODE_INVALID_API_KEY,
        headers={"WWW-Authenticate": 'Bearer realm="slm-gateway"'},
    )


async def _send_whole(send: Send, status: int, headers: Headers, body: bytes) -> None:
    """Send an answer whose body is known whole (``headers`` gets its Content-Length)."""
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _unless_gone(work: Coroutine[Any, Any, _T], gone: asyncio.Future[Message]) -> _T:
    """What ``work`` returns or raises, unless the agent hangs up first (``gone`` completes):
    then ``work`` is cancelled, and its cleanup done, before :class:`_ClientGone` is raised.

    Why: the wait for an LLM's first event is the long one (a slow model's first token), and
    an agent's SDK gives up on it with a read timeout, then retries. A hang-up seen only when
    the LLM next sent something let the LLM answer in full for nobody, counted as a complete
    stream and captured, once per retry.

    A cancel of this call (uvicorn's, at the end of its graceful shutdown) cancels ``work``
    and goes on at once: waiting for ``work`` to wind down first, uvicorn finished shutting
    down meanwhile, and the agent got no 503 or error event, and the log no warning.
    """
    if gone.done():
        work.close()
        raise _ClientGone()
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieved)  # ends on its own; no one is left to tell
        raise
    if not task.done():  # the agent went
        task.cancel()
        await asyncio.wait((task,))  # e.g. the LLM's connection closed before going on
    if gone.done():
        if not task.cancelled():
            task.exception()  # retrieved: there is no one left to tell of a failure
        raise _ClientGone()
    return task.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of a task no one awaits as seen: an exception it ended with (one
    that came before its cancel) is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


def _error_event(message: str, code: str) -> bytes:
    """An ``error`` event as OpenAI ends a stream that failed after it began (its SDKs raise
    an APIError on an event holding "error")."""
    return b"data: " + e.error_body(message, type=e.SERVER_ERROR, code=code) + b"\n\n"


def _llm_tokens(
    call: _LLMCall, message: dict[str, Any], usage: Any, body: bytes
) -> tuple[int, int]:
    """(prompt, completion) tokens of an LLM answer: the ones it reported, else estimates.

    Why estimates: servers that send no ``usage`` (some OpenAI-compatible ones never do, and
    streams only when asked) would count 0 tokens, and the task's LLM spend, and so the
    savings its SLM shows, would read as nothing. ``body``, the whole completion, sizes a
    message nested deeper than orjson writes (it reads deeper).
    """
    ptok, ctok = reported_usage(usage)
    if not ctok:
        try:
            size = len(orjson.dumps(message))
        except orjson.JSONEncodeError:
            size = len(body)
        ctok = estimate_tokens(size)
    return ptok or estimate_tokens(len(call.raw)), ctok


def _served_message(answer: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    """A usable SLM answer, as :meth:`Gateway._ask_slm` returns it (its text already cut at
    the request's ``stop`` sequences, :func:`judge_answer`), as the assistant message an
    agent is served: normalised.

    Why one helper: the shadow comparison must judge what the SLM would serve, so that live
    agreement, which moves the rollout, measures the answer agents would get.
    """
    return normalize_message(answer, call_id)


def _infer_payload(req: ChatRequest, route: Route) -> bytes:
    """The SLM's infer request for a call; a 400 if the call is too deep to write.

    The request's ``tool_choice``, ``parallel_tool_calls`` and ``stop`` go along: the
    answer is judged against them (:func:`judge_answer`)."""
    body = req.body
    try:
        return infer_body(
            req.messages,
            req.tools,
            route.slm_timeout_s,
            answer_limit(body),
            tool_choice=body.get("tool_choice"),
            parallel_tool_calls=body.get("parallel_tool_calls"),
            stop=body.get("stop"),
        )
    except orjson.JSONEncodeError:
        raise too_deep() from None


_REFUSED = (
    r"(?:unrecogni[sz]ed|unknown|unsupported|unexpected|extra|forbidden"
    r"|not (?:supported|allowed|permitted))"
)
#: How servers that predate ``stream_options`` word their refusal of it: "Unrecognized request
#: argument supplied: stream_options", "Unknown parameter: 'stream_options'",
#: "stream_options is not supported", and pydantic's error for an extra field as vLLM quotes
#: it ("'loc': ('body', 'stream_options'), 'msg': 'Extra inputs are not permitted'"). Each
#: needs the field's name right next to the refusal: an error about something else that
#: quotes the request (so the field) is not one.
_STREAM_OPTIONS_REFUSAL = re.compile(
    rf"(?i){_REFUSED}[\w ]{{0,40}}?[:=]?\s*['\"`]?stream_options\b"
    rf"|\bstream_options['\"`]?\s+(?:is|are)\s+{_REFUSED}"
    r"|['\"]loc['\"]\s*:\s*[\[(]\s*['\"]body['\"]\s*,\s*['\"]stream_options['\"]\s*[\])]"
)


def _refuses_stream_options(status: int, body: bytes) -> bool:
    """Whether an LLM's error answer says it does not take ``stream_options`` (servers that
    predate the field reject unknown arguments with a 400 or 422 that names it).

    Narrow on purpose: the answer is a second, paid LLM call. The error must point at the
    field (OpenAI's ``param``, or a FastAPI validation error whose ``loc`` ends with it) or
    say in its message that the field is unknown or unsupported; that the body merely
    contains the name (an error about ``max_tokens`` quoting the request) is not enough.
    """
    if status not in (400, 422) or b"stream_options" not in body:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return bool(_STREAM_OPTIONS_REFUSAL.search(body.decode("utf-8", "replace")))
    if not isinstance(doc, dict):
        return False
    texts: list[Any] = []
    for err in (doc.get("error"), doc):
        if isinstance(err, dict):
            if err.get("param") == "stream_options":
                return True
            texts.append(err.get("message"))
    detail = doc.get("detail")
    if isinstance(detail, list):
        for item in detail:
            loc = item.get("loc") if isinstance(item, dict) else None
            if isinstance(loc, list) and loc and loc[-1] == "stream_options":
                return True
    else:
        texts.append(detail)
    return any(isinstance(t, str) and _STREAM_OPTIONS_REFUSAL.search(t) for t in texts)


def _unquoted(event: bytes, data: bytes, doc: Any, secret: str) -> tuple[bytes, Any]:
    """An error event of an LLM's stream (its ``data`` and ``doc`` decoded) with the task's
    LLM key, ``secret``, masked should the LLM have quoted it: as it came when it does not.
    Only error events: an answer's text is the model's, and a placeholder key ("EMPTY",
    "ollama") is a word an answer may well hold.

    Why: an LLM may end a stream it had begun with OpenAI's error event, and one that
    quoted the gateway's Authorization header showed the agent the task's key, which the
    gateway never shows an agent (a 4xx is masked too: :func:`errors.upstream_4xx_body`).
    Only data that may hold the key is searched decoded: its bytes, or a JSON escape that
    could hide one of its characters. A bearer token (RFC 6750) is letters, digits and
    ``-._~+/=``, which JSON writes as they are, as ``\\uXXXX``, or (``/``) as ``\\/``. The
    event's other fields (``event:``, ``id:``) are kept.
    """
    if secret.encode() not in data and b"\\u" not in data and b"\\/" not in data:
        return event, doc
    masked = e.mask_secret(data, doc, secret)
    if masked is None:  # too deep to search: never relayed unsearched
        raise StreamFormatError("an event is nested too deep to search for the LLM key")
    if masked is data:
        return event, doc
    lines = [line for line in event.split(b"\n") if not line.startswith(b"data:")]
    return b"\n".join([*lines, b"data: " + masked]), orjson.loads(masked)


def _error_code(err: UpstreamError) -> str:
    """The agent-facing code of an LLM that failed: a timeout, or any other failure."""
    return e.CODE_UPSTREAM_TIMEOUT if err.kind == TIMEOUT else e.CODE_UPSTREAM


def _split_key(key: str) -> tuple[str, str]:
    """(namespace, task) of a route key (``namespace/task``, or ``task`` alone)."""
    namespace, _, task = key.rpartition("/")
    return namespace, task


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than this gateway's limit of {limit} bytes.",
        code=e.CODE_TOO_LARGE,
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    if status == 404:
        msg, code = f"Unknown path {request.url.path[:200]!r}.", e.CODE_NOT_FOUND
    elif status == 405:
        msg, code = f"Method {request.method} is not allowed on this path.", e.CODE_METHOD
    else:
        msg, code = str(getattr(exc, "detail", "") or "Request failed."), None
    kind = e.INVALID_REQUEST if status < 500 else e.SERVER_ERROR
    headers = dict(getattr(exc, "headers", None) or {})
    return Response(
        e.error_body(msg, type=kind, code=code),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s: %s", request.url.path[:200], type(exc).__name__)
    return Response(
        e.error_body(
            "The gateway failed to handle the request.", type=e.SERVER_ERROR, code=e.CODE_INTERNAL
        ),
        status_code=500,
        media_type="application/json",
    )


def create_app(
    cfg: GatewayConfig,
    table: RouteTable | None = None,
    *,
    metrics: GatewayMetrics | None = None,
    watch: bool = True,
) -> FastPath:
    """Build the ASGI app. Routes come from ``table`` if given, else from ``cfg`` (a file, or
    a namespace watch unless ``watch`` is False). Capture starts with the app's lifespan."""
    table = table if table is not None else RouteTable()
    metrics = metrics or GatewayMetrics()
    capture = None
    if cfg.capture is not None:
        m = metrics

        def redactions(kinds: dict[str, int]) -> None:
            for kind, n in kinds.items():
                m.capture_redactions.labels(kind).inc(n)

        def dropped(key: str, n: int, reason: str) -> None:
            namespace, task = _split_key(key)
            m.capture_records.labels(namespace, task, "dropped").inc(n)
            m.capture_dropped.labels(namespace, task, reason).inc(n)

        # Capture counts by route key (its directory, ``namespace/task``); metrics carry the
        # namespace and the task name as two labels like every other gateway metric.
        capture = CaptureSink(
            cfg.capture,
            on_written=lambda k, n: m.capture_records.labels(*_split_key(k), "written").inc(n),
            on_dropped=dropped,
            on_redacted=lambda k, n: m.capture_redacted.labels(*_split_key(k)).inc(n),
            on_redactions=redactions,
        )
    auth = None
    if cfg.agent_auth == AUTH_SERVICEACCOUNT:
        auth = token_reviewer(
            cfg.kubeconfig,
            cfg.agent_auth_audience,
            cfg.agent_auth_cache_s,
            on_review=lambda result: metrics.token_reviews.labels(result).inc(),
            reviews_per_s=cfg.agent_auth_reviews_per_s,
        )
    gw = Gateway(cfg, table, metrics=metrics, capture=capture, auth=auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = new_client(cfg.pool_size)
        gw.upstreams = Upstreams(client)
        watcher = None
        reloader = None
        try:
            if capture is not None:
                await asyncio.to_thread(capture.start)
            if cfg.routes_file:
                source = _RoutesFile(cfg, table)
                await _load_routes_once(source)
                reloader = asyncio.create_task(_reload_routes(source))
            elif watch and (cfg.namespace or cfg.namespaces or cfg.all_namespaces):
                from slm_gateway.kube import AgentTaskWatcher

                watcher = AgentTaskWatcher(
                    table,
                    None if cfg.all_namespaces else cfg.namespace,
                    only_namespaces=frozenset(cfg.namespaces) or None,
                    kubeconfig=cfg.kubeconfig,
                    default_slm_timeout_s=cfg.slm_timeout_s,
                    llm_timeout_s=cfg.llm_timeout_s,
                    resync_s=cfg.resync_s,
                    secret_refresh_s=cfg.secret_refresh_s,
                )
                gw.route_problems = watcher.problems
                watcher.start()
            gw.started = True
            yield
        finally:
            gw.started = False
            if watcher is not None:
                watcher.stop()
            if gw.auth is not None:
                gw.auth.close()
            if reloader is not None:
                reloader.cancel()
            await gw.drain_shadows(timeout=min(5.0, cfg.graceful_timeout_s))
            await client.close()
            if capture is not None:
                stats = await asyncio.to_thread(capture.close)
                # The last word on drops counted while stopping (shutdown, upload_pending):
                # they come after the listener closed, where no scrape can see them.
                log.log(
                    logging.WARNING if stats.dropped or stats.unsent else logging.INFO,
                    "capture flushed: %d written, %d dropped, %d redacted, %d written to "
                    "shards left in the spool for upload",
                    stats.written,
                    stats.dropped,
                    stats.redacted,
                    stats.unsent,
                )

    routes = [
        HTTPRoute("/v1/chat/completions", gw, methods=["POST"]),
        HTTPRoute("/chat/completions", gw, methods=["POST"]),
        HTTPRoute("/v1/models", gw.models, methods=["GET"]),
        HTTPRoute("/models", gw.models, methods=["GET"]),
        # {model:path}: a ``namespace/task`` id has a slash (the SDKs send it as %2F)
        HTTPRoute("/v1/models/{model:path}", gw.model, methods=["GET"]),
        HTTPRoute("/models/{model:path}", gw.model, methods=["GET"]),
        HTTPRoute("/healthz", gw.healthz, methods=["GET"]),
        HTTPRoute("/readyz", gw.readyz, methods=["GET"]),
        HTTPRoute("/metrics", gw.metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    # A path with a trailing slash is an unknown path: a 404 with the error body any wrong
    # path gets, not Starlette's 307 with an empty body, which a client either reports as
    # an error saying nothing or follows with a second request.
    app.router.redirect_slashes = False
    app.state.gateway = gw
    return FastPath(app, gw)


class FastPath:
    """Sends chat completions straight to the gateway, everything else through Starlette.

    Starlette's error and exception middlewares and its router cost about a fifth of a
    pass-through call in profiles; the chat path handles its own errors, so it skips them.
    Lifespan, the other endpoints, unknown paths and wrong methods still go to Starlette.
    """

    def __init__(self, app: Starlette, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _CHAT_PATHS:
            await self.gateway(scope, receive, send)
        else:
            await self.app(scope, receive, send)


_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


class _RoutesFile:
    """The static routes file, the key files it reads, and what they held at the last load.

    Why the key files too: ``apiKeyFile:`` entries and ``--llm-api-key-file`` (typically a
    mounted Secret) used to be read only when the routes file itself changed, so a rotated
    key kept the old one in use, every LLM call a 401, until a restart. The key files are
    compared by content (they are a few bytes): a rewrite within the file system's mtime
    granularity, or a Secret volume's symlink swap, is seen all the same.
    """

    def __init__(self, cfg: GatewayConfig, table: RouteTable) -> None:
        self.cfg = cfg
        self.table = table
        self.path = Path(cfg.routes_file)
        self.key_files: list[Path] = self._default_key_files()
        #: ``state()`` as noted just before the last load (good or not); None before any.
        self.seen: tuple[Any, ...] | None = None

    def _default_key_files(self) -> list[Path]:
        return [Path(self.cfg.llm_api_key_file)] if self.cfg.llm_api_key_file else []

    def state(self) -> tuple[Any, ...]:
        """The routes file's mtime (None when it is missing) and each key file's digest."""
        try:
            mtime: int | None = self.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        return (mtime, tuple(_file_digest(p) for p in self.key_files))

    def load(self) -> int:
        """Read the routes and the keys again and set the table; blocking (a worker thread).

        The state is noted before the reads, so a change made during a load causes another.
        """
        before = self.state()
        key_files = self._default_key_files()
        try:
            default_key = self.cfg.llm_api_key
            if self.cfg.llm_api_key_file:
                default_key = Path(self.cfg.llm_api_key_file).read_text().strip()
            routes = load_routes_file(
                self.path,
                default_api_key=default_key,
                default_slm_timeout_s=self.cfg.slm_timeout_s,
                llm_timeout_s=self.cfg.llm_timeout_s,
                key_files=key_files,
            )
        finally:
            if key_files != self.key_files:  # files named now: what they hold now
                self.key_files = key_files
                before = self.state()
            self.seen = before
        self.table.replace_all(routes)
        return len(routes)


def _file_digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


async def _load_routes_once(source: _RoutesFile) -> None:
    n = await asyncio.to_thread(source.load)
    log.info("routes loaded from %s: %d task(s)", source.path, n)


async def _reload_routes(source: _RoutesFile) -> None:
    """Reload the static file when it or a key file it reads changes, so local demos can
    switch modes live and a rotated key file is in use without a restart."""
    while True:
        await asyncio.sleep(source.cfg.routes_reload_s)
        state = await asyncio.to_thread(source.state)
        # A routes file missing for a moment (an editor's save) keeps the routes as they are.
        if state[0] is None or state == source.seen:
            continue
        try:
            await _load_routes_once(source)
        except Exception as exc:
            log.warning("routes file %s not reloaded: %s", source.path, exc)


__all__ = ["Gateway", "create_app"]
