"""The gateway's Prometheus metrics: what the operator's live control reads and what the
per-task savings report is computed from.

Names and labels (``task`` is the AgentTask name, ``backend`` is ``slm`` or ``llm``):

- ``slm_gateway_requests_total{task,backend}``: calls answered (HTTP 200), by who answered.
- ``slm_gateway_request_duration_seconds{task,backend}``: histogram of the agent-visible
  latency of answered calls, fallback time included.
- ``slm_gateway_backend_duration_seconds{task,backend}``: histogram of each upstream attempt,
  failed and shadow SLM attempts included; the SLO's SLM p95 is read from here.
- ``slm_gateway_backend_calls_total{task,backend,result}``: every upstream attempt by result:
  ``ok``, ``error``, ``timeout``, ``bad_output``, ``low_confidence``, ``defer``; an SLM
  error rate is ``result=~"error|timeout|bad_output"`` over the total.
- ``slm_gateway_errors_total{task,backend,code}``: calls answered with an error, by code
  (``upstream_error``, ``upstream_timeout``, ``upstream_unavailable``, ``llm_4xx``).
- ``slm_gateway_invalid_requests_total{code}``: requests rejected before routing (4xx).
- ``slm_gateway_fallbacks_total{task,reason}``: calls meant for the SLM that the LLM answered.
- ``slm_gateway_tokens_total{task,backend,kind}``: prompt and completion tokens (SLM counts
  are estimated from bytes, see :func:`slm_gateway.decide.estimate_tokens`).
- ``slm_gateway_cost_usd_total{task,backend}``: estimated spend at the configured prices.
- ``slm_gateway_llm_equivalent_cost_usd_total{task}``: what the same tokens would have cost
  on the LLM; savings = this minus the sum of the cost counter.
- ``slm_gateway_shadow_total{task,result}``: shadow comparisons, ``agree``, ``disagree``,
  ``error`` (SLM failed) or ``skipped`` (too many in flight); agreement rate =
  agree / (agree + disagree).
- ``slm_gateway_circuit_state{backend,endpoint}``: 0 closed, 1 half-open, 2 open.
- ``slm_gateway_routes``: tasks known; ``slm_gateway_route_mode{task,mode}``: 1 for the
  current mode of each task.
- ``slm_gateway_capture_records_total{task,result}``: ``written`` or ``dropped`` (queue full,
  or a record the redactor could not process, which is never written unredacted).
- ``slm_gateway_capture_redacted_records_total{task}`` and
  ``slm_gateway_capture_redactions_total{kind}``: records with at least one redaction and the
  entities replaced, by kind (EMAIL_ADDRESS, API_KEY, ...).
- ``slm_gateway_capture_queue_depth``: records waiting to be redacted and written.

A registry per gateway instance (not the global one), so tests can build many apps in one
process. Children for a (task, backend) pair are resolved once and cached: ``labels()`` costs
a few microseconds and a lock, which adds up on the request path.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclass(slots=True)
class ServedChildren:
    """The metric children touched for every answered call of one (task, backend)."""

    requests: Counter
    duration: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    cost: Counter
    llm_equivalent: Counter


class GatewayMetrics:
    """All gateway metrics on one registry, with cached label children for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "slm_gateway_"
        self.requests = Counter(
            p + "requests", "Calls answered, by backend.", ["task", "backend"], registry=r
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Agent-visible latency of answered calls.",
            ["task", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_duration = Histogram(
            p + "backend_duration_seconds",
            "Latency of each upstream attempt, failures and shadow calls included.",
            ["task", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_calls = Counter(
            p + "backend_calls",
            "Upstream attempts by result.",
            ["task", "backend", "result"],
            registry=r,
        )
        self.errors = Counter(
            p + "errors", "Calls answered with an error.", ["task", "backend", "code"], registry=r
        )
        self.invalid = Counter(
            p + "invalid_requests", "Requests rejected before routing.", ["code"], registry=r
        )
        self.fallbacks = Counter(
            p + "fallbacks",
            "Calls meant for the SLM answered by the LLM.",
            ["task", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            p + "tokens", "Tokens by kind.", ["task", "backend", "kind"], registry=r
        )
        self.cost = Counter(
            p + "cost_usd",
            "Estimated spend at the configured prices.",
            ["task", "backend"],
            registry=r,
        )
        self.llm_equivalent = Counter(
            p + "llm_equivalent_cost_usd",
            "Estimated spend had the LLM answered every call.",
            ["task"],
            registry=r,
        )
        self.shadow = Counter(
            p + "shadow", "Shadow comparisons by result.", ["task", "result"], registry=r
        )
        self.circuit = Gauge(
            p + "circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["backend", "endpoint"],
            registry=r,
        )
        self.routes = Gauge(p + "routes", "Tasks known to the gateway.", registry=r)
        self.route_mode = Gauge(
            p + "route_mode", "1 for the current mode of each task.", ["task", "mode"], registry=r
        )
        self.capture_records = Counter(
            p + "capture_records", "Call records by result.", ["task", "result"], registry=r
        )
        self.capture_redacted = Counter(
            p + "capture_redacted_records",
            "Records with at least one redaction.",
            ["task"],
            registry=r,
        )
        self.capture_redactions = Counter(
            p + "capture_redactions", "Entities replaced by kind.", ["kind"], registry=r
        )
        self.capture_queue = Gauge(
            p + "capture_queue_depth", "Records waiting to be written.", registry=r
        )
        self._served: dict[tuple[str, str], ServedChildren] = {}
        self._attempts: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def served(self, task: str, backend: str) -> ServedChildren:
        key = (task, backend)
        found = self._served.get(key)
        if found is None:
            found = ServedChildren(
                requests=self.requests.labels(task, backend),
                duration=self.duration.labels(task, backend),
                prompt_tokens=self.tokens.labels(task, backend, "prompt"),
                completion_tokens=self.tokens.labels(task, backend, "completion"),
                cost=self.cost.labels(task, backend),
                llm_equivalent=self.llm_equivalent.labels(task),
            )
            self._served[key] = found
        return found

    def attempt(self, task: str, backend: str, result: str, seconds: float) -> None:
        """Count one upstream attempt and its latency."""
        key = (task, backend, result)
        found = self._attempts.get(key)
        if found is None:
            found = (
                self.backend_calls.labels(task, backend, result),
                self.backend_duration.labels(task, backend),
            )
            self._attempts[key] = found
        found[0].inc()
        found[1].observe(seconds)
