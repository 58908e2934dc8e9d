"""The gateway's Prometheus metrics: what the operator's live control reads and what the
per-task savings report is computed from.

Names and labels (``namespace`` and ``task`` are the AgentTask's namespace and name, the
namespace empty for routes from a static file; ``backend`` is ``slm`` or ``llm``):

- ``slm_gateway_requests_total{namespace,task,backend}``: calls answered (HTTP 200), by who
  answered.
- ``slm_gateway_request_duration_seconds{namespace,task,backend}``: histogram of the
  agent-visible latency of answered calls, fallback time included.
- ``slm_gateway_backend_duration_seconds{namespace,task,backend}``: histogram of each upstream
  attempt, failed and shadow SLM attempts included; the SLO's SLM p95 is read from here.
- ``slm_gateway_backend_calls_total{namespace,task,backend,result}``: every upstream attempt by
  result: ``ok``, ``error``, ``timeout``, ``bad_output``, ``low_confidence``, ``defer``, and for
  the LLM also ``connect``, ``status_4xx`` and ``client_disconnected`` (a stream whose agent
  hung up; its tokens so far are counted too); an SLM error rate is
  ``result=~"error|timeout|bad_output"`` over the total.
- ``slm_gateway_errors_total{namespace,task,backend,code}``: calls answered with an error, by
  code (``upstream_error``, ``upstream_timeout``, ``upstream_unavailable``, ``llm_4xx``, and
  ``llm_auth``: the LLM answered 401 or 403 to the task's key, the agent got a 502;
  ``internal_error``: the gateway failed while relaying a stream; ``shutting_down``: the call
  was still running when the graceful shutdown ran out; ``out_of_file_descriptors``: the
  gateway had no file descriptor left to connect to the LLM, a 503).
- ``slm_gateway_invalid_requests_total{code}``: requests rejected before routing (4xx).
- ``slm_gateway_agent_auth_total{result}`` and ``slm_gateway_token_reviews_total{result}``:
  with ``--agent-auth serviceaccount``, how calls fared (``ok``, ``missing``, ``invalid``,
  ``forbidden``, ``rate_limited``, ``unavailable``) and the TokenReviews behind them
  (``authenticated``, ``rejected``, ``failed``; one per token and cache period, see
  :mod:`slm_gateway.auth`).
- ``slm_gateway_fallbacks_total{namespace,task,reason}``: calls meant for the SLM that went to
  the LLM instead, counted when they are sent there (also when the LLM then fails, or its own
  circuit is open): the reason is the SLM's side, which the operator's SLM error rate reads.
- ``slm_gateway_tokens_total{namespace,task,backend,kind}``: prompt and completion tokens
  (estimated from bytes where the backend reports none: always for the SLM, for LLM servers
  that send no ``usage``, and for LLM streams whose agent hung up; see
  :func:`slm_gateway.decide.estimate_tokens`).
- ``slm_gateway_cost_usd_total{namespace,task,backend}``: estimated spend at the configured
  prices.
- ``slm_gateway_llm_equivalent_cost_usd_total{namespace,task}``: what the same tokens would
  have cost on the LLM; savings = this minus the sum of the cost counter.
- ``slm_gateway_shadow_total{namespace,task,result}``: shadow comparisons, ``agree``,
  ``disagree``, ``defer`` (the SLM handed the call back), ``error`` (SLM failed) or
  ``skipped`` (too many in flight, the SLM's circuit open, or a request only the LLM can
  answer); agreement rate = agree / (agree + disagree).
- ``slm_gateway_circuit_state{namespace,task,backend,endpoint}``: 0 closed, 1 half-open, 2
  open; one circuit per task and endpoint (tasks sharing an LLM URL each have their own).
- ``slm_gateway_routes``: tasks known; ``slm_gateway_route_mode{namespace,task,mode}``: 1 for
  the current mode of each task.
- ``slm_gateway_route_problem{namespace,task,reason}``: 1 for each AgentTask the gateway cannot
  serve as its spec says: ``route_refused`` (no route: every call for it fails),
  ``llm_key_missing``, ``llm_key_unreadable`` or ``llm_key_unusable`` (its LLM key Secret;
  see :meth:`slm_gateway.kube.AgentTaskWatcher.problems`), ``llm_host_not_allowed`` (the
  Secret's ``slmfleet.dev/llm-hosts`` does not list the task's LLM host: the key is not sent).
- ``slm_gateway_capture_records_total{namespace,task,result}``: ``written`` or ``dropped``.
- ``slm_gateway_capture_dropped_records_total{namespace,task,reason}``: the dropped records by
  why: ``queue_full`` (the workers cannot keep up), ``redaction_failed`` (the redactor failed on
  it; never written unredacted), ``encode_failed`` (redacted, but not writable as one JSON
  line: nested deeper than orjson writes), ``write_failed`` (the shard could not be written: a
  full disk), ``worker_lost`` (held by a capture worker that died before writing it whole to a
  shard, counted when it dies; lines it wrote but never acknowledged are found in its shards
  and counted ``written``), ``shutdown`` (not written before the gateway stopped), ``spool_full`` (a
  URI target's local spool reached ``--capture-spool-mb``: uploads have been failing),
  ``upload_pending`` (written to the spool, so also counted ``written``, but not uploaded when
  its worker stopped; a later gateway on the same spool uploads them, a pod's spool goes with
  the pod) or ``shard_removed`` (written, so also counted ``written``, to a shard deleted
  while open: its task's folder removed under the gateway; the next records go to a new
  shard).
- ``slm_gateway_capture_redacted_records_total{namespace,task}`` and
  ``slm_gateway_capture_redactions_total{kind}``: records with at least one redaction and the
  entities replaced, by kind (EMAIL_ADDRESS, API_KEY, ...).
- ``slm_gateway_capture_queue_depth``: records waiting to be redacted and written.
- ``slm_gateway_streams_total{namespace,task,backend,result}``: streamed answers (``"stream":
  true``) by how they ended: ``complete``, ``client_disconnected`` (the agent closed the
  connection first; the LLM call was cut off there) or ``failed`` (the stream broke off after
  it had begun: the LLM's, or cut by the gateway's shutdown; its code is in
  ``slm_gateway_errors_total``).
- ``slm_gateway_stream_first_chunk_seconds{namespace,task,backend}``: histogram of the time
  from a streamed request to its first event sent to the agent (time to first token).

A registry per gateway instance (not the global one), so tests can build many apps in one
process.

The series of a task whose route is gone (its AgentTask deleted, or dropped from the routes
file) are removed :data:`REMOVED_TASK_GRACE_S` after it left, at a scrape: long enough for
every scraper to read the final counts, and a fleet that creates and deletes tasks does not
export an ever-growing set of dead series until the gateway restarts. A task that comes back
starts its counters from zero, which ``rate()`` and ``increase()`` treat as a counter reset.

The series touched on every answered call (requests, request and backend durations, backend
calls, tokens, cost) are plain numbers in :class:`ServedStats` and :class:`AttemptStats`,
updated by the event loop and turned into metric families only when ``/metrics`` is
scraped. A prometheus_client child takes a lock on every ``inc`` and ``observe``; the nine
updates of a call cost more than the rest of its routing decision. A scrape copies them on
the event loop and writes the text in a thread (:meth:`GatewayMetrics.exposition`), so agent
calls are not held while a large exposition is written.

The series the operator's live control divides or compares (an SLM's attempts by result and
their latency, the shadow copies it judges, the calls kept from an SLM whose circuit is
open) are exported at 0 from the first scrape that sees a route with an SLM
(:meth:`GatewayMetrics.expect_slm`), not from their first event. Why: ``rate()`` and
``increase()`` need two samples of a series, so a series born at the first error was left
out of the window it appeared in, and ``or vector(0)`` read that window's error rate as 0
and its agreement as 1: an SLM that began failing or disagreeing looked healthy for a window.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from slm_gateway.backends import BAD_OUTPUT, TIMEOUT
from slm_gateway.decide import REASON_CIRCUIT_OPEN, REASON_DEFER, REASON_LOW_CONFIDENCE, SLM

# Ten bounds a decade, each at most 4/3 of the one below (1 ms to 600 s: 59 bounds and +Inf).
# histogram_quantile interpolates linearly inside the bucket the p95 falls in, so the SLO is
# judged to within a bucket: with the old 1 -> 2.5 s bucket, SLM calls that all took 1.1 s
# read 2.4 s and breached a 2000 ms SLO. Buckets 4/3 wide keep the reading within a third
# above or a quarter below the true p95 (docs/metrics.md), at about three times the old 19
# series per histogram and label set. Every old bound (0.001, 0.0025, ..., 1, 2.5, 5, 10, 30,
# 60, 120, 300, 600) is among them, so queries and dashboards that name one keep their meaning.
_DECADE = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
# The longest SLM budget (slmTimeoutMs) is the last bound: a p95 SLO up to it can be breached.
_LONGEST_S = 600.0
# round() to whole tenths of a millisecond gives the float of the decimal literal
# (0.0012, not 0.0012000000000000001), so the `le` labels read as the bounds are written.
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    b
    for exponent in range(-3, 3)
    for m in _DECADE
    if (b := round(m * 10.0**exponent, 4)) <= _LONGEST_S
)
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))
_LE: tuple[str, ...] = tuple(str(floatToGoString(b)) for b in _BOUNDS)  # type: ignore[no-untyped-call]

_P = "slm_gateway_"
_K = TypeVar("_K", bound=tuple[str, ...])

# How long the series of a removed task are still exported (see the module docstring).
REMOVED_TASK_GRACE_S = 600.0

# What a route with an SLM exports at 0 before its first event (GatewayMetrics.expect_slm):
# every result of an SLM attempt (the error rate is the failed ones over all of them), the
# shadow results agreement reads, and the fallback reason the error rate counts as failed.
SLM_RESULTS = ("ok", "error", TIMEOUT, BAD_OUTPUT, REASON_LOW_CONFIDENCE, REASON_DEFER)
JUDGED_SHADOW_RESULTS = ("agree", "disagree")
FAILED_FALLBACK_REASONS = (REASON_CIRCUIT_OPEN,)


class LatencyHistogram:
    """A histogram over :data:`LATENCY_BUCKETS` without a lock: per-bucket (not cumulative)
    counts, made cumulative when exported."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= the value.
        self.counts[bisect_left(_BOUNDS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for le, n in zip(_LE, self.counts, strict=True):
            total += n
            out.append((le, float(total)))
        return out

    def copy(self) -> LatencyHistogram:
        """The counts as they are now (see :class:`_HotNumbers`)."""
        new = LatencyHistogram.__new__(LatencyHistogram)
        new.counts = self.counts.copy()
        new.sum = self.sum
        new.created = self.created
        return new


class ServedStats:
    """Everything counted for an answered call of one (namespace, task, backend)."""

    __slots__ = (
        "completion_tokens",
        "cost",
        "created",
        "duration",
        "llm_equivalent",
        "prompt_tokens",
        "requests",
    )

    def __init__(self, llm_equivalent: LlmEquivalent) -> None:
        self.requests = 0
        self.duration = LatencyHistogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0
        self.llm_equivalent = llm_equivalent
        self.created = self.duration.created

    def observe(
        self, seconds: float, prompt_tokens: int, completion_tokens: int, cost: float, llm: float
    ) -> None:
        self.requests += 1
        self.duration.observe(seconds)
        self.spend(prompt_tokens, completion_tokens, cost, llm)

    def spend(self, prompt_tokens: int, completion_tokens: int, cost: float, llm: float) -> None:
        """Tokens and cost alone: of an LLM stream whose agent hung up, which the LLM worked
        on (and bills) though no call was answered."""
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost += cost
        self.llm_equivalent.value += llm

    def copy(self, llm_equivalent: LlmEquivalent) -> ServedStats:
        """The numbers as they are now, sharing the copy of the task's ``llm_equivalent``
        (see :class:`_HotNumbers`)."""
        new = ServedStats.__new__(ServedStats)
        new.requests = self.requests
        new.duration = self.duration.copy()
        new.prompt_tokens = self.prompt_tokens
        new.completion_tokens = self.completion_tokens
        new.cost = self.cost
        new.llm_equivalent = llm_equivalent
        new.created = self.created
        return new


class LlmEquivalent:
    """What a task's calls would have cost on the LLM, shared by its two backends."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def copy(self) -> LlmEquivalent:
        new = LlmEquivalent.__new__(LlmEquivalent)
        new.value = self.value
        new.created = self.created
        return new


class AttemptStats:
    """Upstream attempts of one (namespace, task, backend, result), and their latencies, which
    are shared by every result of that backend."""

    __slots__ = ("count", "created", "duration")

    def __init__(self, duration: LatencyHistogram) -> None:
        self.count = 0
        self.duration = duration
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.duration.observe(seconds)

    def copy(self, duration: LatencyHistogram) -> AttemptStats:
        """The count as it is now, with the copy of its backend's latencies (see
        :class:`_HotNumbers`)."""
        new = AttemptStats.__new__(AttemptStats)
        new.count = self.count
        new.duration = duration
        new.created = self.created
        return new


class _HotNumbers(NamedTuple):
    """A copy of the per-call numbers taken on the event loop, which alone updates them, for
    an exposition written in another thread (:meth:`GatewayMetrics.exposition`): the loop
    goes on counting calls meanwhile, and the thread must not read a histogram half updated
    or a dict changing size. Copying is a small part of writing them out (about 20 KB of
    text a task)."""

    served: dict[tuple[str, str, str], ServedStats]
    equivalent: dict[tuple[str, str], LlmEquivalent]
    attempts: dict[tuple[str, str, str, str], AttemptStats]
    durations: dict[tuple[str, str, str], LatencyHistogram]


# The snapshot an exposition being written in this context reads instead of the live numbers,
# with the collector it belongs to (many GatewayMetrics may live in one process). A context
# variable, set only while :meth:`GatewayMetrics.exposition`'s function runs: two scrapes
# written at once, each in its own thread, read each their own.
_SNAPSHOT: ContextVar[tuple[_HotCollector, _HotNumbers] | None] = ContextVar(
    "slm_gateway_metrics_snapshot", default=None
)


class _HotCollector(Collector):
    """Exports :class:`ServedStats` and :class:`AttemptStats` as Prometheus metric families,
    with the same names, labels and samples the equivalent prometheus_client metrics have."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return list(self._families({}, {}, {}, {}))

    def snapshot(self) -> _HotNumbers:
        """Copy every per-call number; event loop only."""
        m = self.m
        durations = {k: h.copy() for k, h in m._backend_duration.items()}
        equivalent = {k: e.copy() for k, e in m._llm_equivalent.items()}
        return _HotNumbers(
            {k: st.copy(equivalent[k[:2]]) for k, st in m._served.items()},
            equivalent,
            {k: at.copy(durations[k[:3]]) for k, at in m._attempts.items()},
            durations,
        )

    def collect(self) -> Iterator[Metric]:
        frozen = _SNAPSHOT.get()
        if frozen is not None and frozen[0] is self:
            return self._families(*frozen[1])
        m = self.m
        # list(): a scrape from another thread must not see the dicts change size under it.
        return self._families(
            dict(list(m._served.items())),
            dict(list(m._llm_equivalent.items())),
            dict(list(m._attempts.items())),
            dict(list(m._backend_duration.items())),
        )

    @staticmethod
    def _families(
        served: dict[tuple[str, str, str], ServedStats],
        equivalent: dict[tuple[str, str], LlmEquivalent],
        attempts: dict[tuple[str, str, str, str], AttemptStats],
        durations: dict[tuple[str, str, str], LatencyHistogram],
    ) -> Iterator[Metric]:
        labels = ["namespace", "task", "backend"]
        requests = CounterMetricFamily(
            _P + "requests", "Calls answered, by backend.", labels=labels
        )
        duration = HistogramMetricFamily(
            _P + "request_duration_seconds",
            "Agent-visible latency of answered calls.",
            labels=labels,
        )
        tokens = CounterMetricFamily(_P + "tokens", "Tokens by kind.", labels=[*labels, "kind"])
        cost = CounterMetricFamily(
            _P + "cost_usd", "Estimated spend at the configured prices.", labels=labels
        )
        for key, st in served.items():
            requests.add_metric(key, st.requests, created=st.created)
            _add_histogram(duration, key, st.duration)
            tokens.add_metric((*key, "prompt"), st.prompt_tokens, created=st.created)
            tokens.add_metric((*key, "completion"), st.completion_tokens, created=st.created)
            cost.add_metric(key, st.cost, created=st.created)
        llm_equivalent = CounterMetricFamily(
            _P + "llm_equivalent_cost_usd",
            "Estimated spend had the LLM answered every call.",
            labels=["namespace", "task"],
        )
        for task_key, eq in equivalent.items():
            llm_equivalent.add_metric(task_key, eq.value, created=eq.created)
        backend_duration = HistogramMetricFamily(
            _P + "backend_duration_seconds",
            "Latency of each upstream attempt, failures and shadow calls included.",
            labels=labels,
        )
        for key, hist in durations.items():
            _add_histogram(backend_duration, key, hist)
        backend_calls = CounterMetricFamily(
            _P + "backend_calls", "Upstream attempts by result.", labels=[*labels, "result"]
        )
        for attempt_key, at in attempts.items():
            backend_calls.add_metric(attempt_key, at.count, created=at.created)
        yield requests
        yield duration
        yield backend_duration
        yield backend_calls
        yield tokens
        yield cost
        yield llm_equivalent


def _add_histogram(
    family: HistogramMetricFamily, key: tuple[str, ...], hist: LatencyHistogram
) -> None:
    family.add_metric(list(key), hist.buckets(), hist.sum)
    family.samples.append(
        Sample(
            family.name + "_created", dict(zip(family._labelnames, key, strict=True)), hist.created
        )
    )


def _drop_tasks(stats: dict[_K, Any], tasks: set[tuple[str, str]]) -> None:
    """Delete the entries of these (namespace, task) pairs from a dict keyed by label tuples,
    in one pass over it: a pass per task made removing many tasks at once quadratic."""
    for key in [k for k in stats if k[:2] in tasks]:
        del stats[key]


def _series(metric: Counter | Gauge | Histogram) -> set[tuple[str, ...]]:
    """The label values of every series of a metric. prometheus_client (0.26) has no public
    way to list them but to collect every sample, and its ``remove_by_labels`` scans every
    series for each call, so removing n tasks that way was quadratic. Its children dict is
    read under its own lock, as prometheus_client does itself (capture workers add series
    from their threads); the only use of its private attributes in the gateway."""
    with metric._lock:
        return {tuple(key) for key in metric._metrics}


def _remove_series(
    metric: Counter | Gauge | Histogram, drop: Callable[[tuple[str, ...]], bool]
) -> None:
    """Remove every series of a metric whose label values ``drop`` picks, in one pass."""
    for key in _series(metric):
        if drop(key):
            metric.remove(*key)


def _show_only(gauge: Gauge, wanted: Iterable[tuple[str, ...]]) -> None:
    """Set the gauge to 1 for each label tuple of ``wanted`` and remove its other series,
    the wanted ones first: no moment without a series that stays. Why not clear() and set
    again: the exposition of an earlier scrape is written in another thread
    (:meth:`GatewayMetrics.exposition`) while the next scrape updates the gauges on the
    loop, and Prometheus marks a series missing from one scrape stale."""
    keep = {tuple(str(v) for v in key) for key in wanted}
    for key in keep:
        gauge.labels(*key).set(1)
    _remove_series(gauge, lambda key: key not in keep)


class GatewayMetrics:
    """All gateway metrics on one registry; the per-call ones as lock-free plain numbers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = _P
        self._served: dict[tuple[str, str, str], ServedStats] = {}
        self._llm_equivalent: dict[tuple[str, str], LlmEquivalent] = {}
        self._attempts: dict[tuple[str, str, str, str], AttemptStats] = {}
        self._backend_duration: dict[tuple[str, str, str], LatencyHistogram] = {}
        # (namespace, task) -> when it was first seen missing from the route table
        self._gone_since: dict[tuple[str, str], float] = {}
        # The tasks whose SLM series expect_slm has created: one set lookup per route and
        # scrape once they exist.
        self._expected: set[tuple[str, str]] = set()
        self._hot = _HotCollector(self)
        r.register(self._hot)
        self.errors = Counter(
            p + "errors",
            "Calls answered with an error.",
            ["namespace", "task", "backend", "code"],
            registry=r,
        )
        self.invalid = Counter(
            p + "invalid_requests", "Requests rejected before routing.", ["code"], registry=r
        )
        self.agent_auth = Counter(
            p + "agent_auth",
            "Agent authentication outcomes with --agent-auth serviceaccount: ok, missing (no "
            "token), invalid (not a live token for the gateway's audience), forbidden (a "
            "ServiceAccount of another namespace than the task's), rate_limited (an unknown token "
            "past --agent-auth-reviews-per-second; the call got a 429), unavailable (the API "
            "server could not review the token; the call got a 503).",
            ["result"],
            registry=r,
        )
        self.token_reviews = Counter(
            p + "token_reviews",
            "TokenReviews the gateway asked the API server for (reviews are cached per token): "
            "authenticated, rejected or failed.",
            ["result"],
            registry=r,
        )
        self.fallbacks = Counter(
            p + "fallbacks",
            "Calls meant for the SLM answered by the LLM.",
            ["namespace", "task", "reason"],
            registry=r,
        )
        self.shadow = Counter(
            p + "shadow",
            "Shadow comparisons by result.",
            ["namespace", "task", "result"],
            registry=r,
        )
        self.circuit = Gauge(
            p + "circuit_state",
            "Circuit breaker state per task and upstream: 0 closed, 1 half-open, 2 open.",
            ["namespace", "task", "backend", "endpoint"],
            registry=r,
        )
        self.routes = Gauge(p + "routes", "Tasks known to the gateway.", registry=r)
        self.route_problem = Gauge(
            p + "route_problem",
            "1 for each AgentTask the gateway cannot serve as its spec says, by reason.",
            ["namespace", "task", "reason"],
            registry=r,
        )
        self.route_mode = Gauge(
            p + "route_mode",
            "1 for the current mode of each task.",
            ["namespace", "task", "mode"],
            registry=r,
        )
        self.capture_records = Counter(
            p + "capture_records",
            "Call records by result.",
            ["namespace", "task", "result"],
            registry=r,
        )
        self.capture_dropped = Counter(
            p + "capture_dropped_records",
            "Call records not written, by why (queue_full, redaction_failed, encode_failed, "
            "write_failed, worker_lost, shutdown, spool_full, upload_pending, shard_removed).",
            ["namespace", "task", "reason"],
            registry=r,
        )
        self.capture_redacted = Counter(
            p + "capture_redacted_records",
            "Records with at least one redaction.",
            ["namespace", "task"],
            registry=r,
        )
        self.capture_redactions = Counter(
            p + "capture_redactions", "Entities replaced by kind.", ["kind"], registry=r
        )
        self.capture_queue = Gauge(
            p + "capture_queue_depth", "Records waiting to be written.", registry=r
        )
        self.streams = Counter(
            p + "streams",
            "Streamed answers by how they ended.",
            ["namespace", "task", "backend", "result"],
            registry=r,
        )
        self.stream_first_chunk = Histogram(
            p + "stream_first_chunk_seconds",
            "Time from a streamed request to its first event sent to the agent.",
            ["namespace", "task", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _task_metrics(self) -> list[Counter | Gauge | Histogram]:
        """The prometheus_client metrics labelled by namespace and task, in that order first:
        a removed task's series are looked for, and removed, in each."""
        return [
            self.errors,
            self.fallbacks,
            self.shadow,
            self.route_mode,
            self.capture_records,
            self.capture_dropped,
            self.capture_redacted,
            self.streams,
            self.stream_first_chunk,
        ]

    def forget_removed_tasks(
        self, known: set[tuple[str, str]], now: float, grace_s: float = REMOVED_TASK_GRACE_S
    ) -> list[tuple[str, str]]:
        """Remove every series of the tasks that have not been in ``known`` (the route
        table's ``(namespace, task)`` pairs) for ``grace_s`` seconds; event loop only.

        Returns the tasks removed. A task seen again before its grace ends keeps its series.
        """
        # Every task with a series, not only those with answered calls or attempts: a task
        # whose every call got a 503 (its LLM's circuit open) has nothing but
        # slm_gateway_errors_total, and kept it for ever.
        seen = {k[:2] for k in self._served} | {k[:2] for k in self._attempts}
        seen |= set(self._llm_equivalent)
        for metric in self._task_metrics():
            seen |= {(k[0], k[1]) for k in _series(metric)}
        for task in known:
            self._gone_since.pop(task, None)
        removed: list[tuple[str, str]] = []
        for task in seen - known:
            since = self._gone_since.setdefault(task, now)
            if now - since >= grace_s:
                removed.append(task)
        if not removed:
            return removed
        # One pass over each dict and metric for all of them: 800 tasks removed one by one
        # took 3.3 s of the event loop, each scanning every series of nine metrics.
        gone = set(removed)
        for task in removed:
            del self._gone_since[task]
            self._expected.discard(task)
            self._llm_equivalent.pop(task, None)
        _drop_tasks(self._served, gone)
        _drop_tasks(self._attempts, gone)
        _drop_tasks(self._backend_duration, gone)
        for metric in self._task_metrics():
            _remove_series(metric, lambda key: key[:2] in gone)
        return removed

    def set_route_modes(self, modes: Iterable[tuple[str, str, str]]) -> None:
        """``slm_gateway_route_mode`` at 1 for each (namespace, task, mode) and for no other;
        event loop only."""
        _show_only(self.route_mode, modes)

    def set_route_problems(self, problems: Mapping[tuple[str, str], str]) -> None:
        """``slm_gateway_route_problem`` at 1 for each (namespace, task): reason and for no
        other; event loop only."""
        _show_only(self.route_problem, [(ns, task, why) for (ns, task), why in problems.items()])

    def exposition(self) -> Callable[[], bytes]:
        """Copy the per-call numbers now (event loop only), and return a function that writes
        the text exposition with them and the prometheus_client metrics as they are when it
        runs; it may run in another thread, and does on /metrics.

        Why: the text of 800 tasks (about 20 KB each) took 3.5 s to write, and written on the
        event loop every agent call made meanwhile waited as long. prometheus_client's
        metrics are safe to collect from another thread (each reads its series under its
        lock, as the capture workers' updates take it); the per-call numbers are not, so the
        thread reads a copy (:class:`_HotNumbers`).
        """
        frozen = (self._hot, self._hot.snapshot())

        def write() -> bytes:
            token = _SNAPSHOT.set(frozen)
            try:
                return generate_latest(self.registry)
            finally:
                _SNAPSHOT.reset(token)

        return write

    def served(self, namespace: str, task: str, backend: str) -> ServedStats:
        """The stats of answered calls of one (namespace, task, backend); event loop only."""
        key = (namespace, task, backend)
        found = self._served.get(key)
        if found is None:
            equivalent = self._llm_equivalent.get((namespace, task))
            if equivalent is None:
                equivalent = self._llm_equivalent[(namespace, task)] = LlmEquivalent()
            found = self._served[key] = ServedStats(equivalent)
        return found

    def expect_slm(self, namespace: str, task: str) -> None:
        """Create at 0 the series of a task with an SLM that the operator's queries divide or
        compare (see the module docstring); event loop only, called for each route at each
        scrape. A task removed (:meth:`forget_removed_tasks`) and routed again gets them
        anew."""
        key = (namespace, task)
        if key in self._expected:
            return
        self._expected.add(key)
        for result in SLM_RESULTS:
            self._attempt_stats((namespace, task, SLM, result))
        for result in JUDGED_SHADOW_RESULTS:
            self.shadow.labels(namespace, task, result)
        for reason in FAILED_FALLBACK_REASONS:
            self.fallbacks.labels(namespace, task, reason)

    def attempt(self, namespace: str, task: str, backend: str, result: str, seconds: float) -> None:
        """Count one upstream attempt and its latency; event loop only."""
        self._attempt_stats((namespace, task, backend, result)).observe(seconds)

    def _attempt_stats(self, key: tuple[str, str, str, str]) -> AttemptStats:
        """The attempts of one (namespace, task, backend, result), created at 0 if new."""
        found = self._attempts.get(key)
        if found is None:
            duration = self._backend_duration.get(key[:3])
            if duration is None:
                duration = self._backend_duration[key[:3]] = LatencyHistogram()
            found = self._attempts[key] = AttemptStats(duration)
        return found
