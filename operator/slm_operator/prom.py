"""Every PromQL query the operator runs, and the thin adapter that runs them.

The queries read what the gateway exports (``slm_gateway_*``, see ``slm_gateway.metrics``) and
what Triton exports (``nv_inference_*``). Each returns one number for one task over one
window; an empty result, NaN or an unreachable Prometheus becomes None, which the decision
functions treat as "unmeasured" (keep the last decision).

Gateway series carry ``namespace`` and ``task`` labels, so two AgentTasks of the same name in
different namespaces are told apart when the caller passes the task's namespace. Triton's
series are selected by ``model`` (the task name) and, likewise, ``namespace``: Triton does not
export one, the scrape adds it, the namespace of the Triton pod, which is the task's (the
chart's PodMonitor: the Prometheus Operator's ``namespace`` target label). Without it two
same-named tasks in two namespaces would share one queue time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from http import HTTPStatus
from typing import Any

from slm_contract import redact_uri, redact_uris
from slm_operator.live import CounterReading, Metrics

log = logging.getLogger(__name__)

ERROR_RESULTS = "error|timeout|bad_output"

#: The longest range live agreement is read over: shadow copies pooled (too few to judge) for
#: longer are left out rather than read by an unbounded query.
AGREEMENT_MAX_S = 3600.0


def _sel(task: str, namespace: str | None = None, **labels: str) -> str:
    """A label selector for one task's gateway series (``namespace`` None: any namespace)."""
    scope = [f'namespace="{namespace}"'] if namespace is not None else []
    parts = [*scope, f'task="{task}"'] + [
        f'{k}=~"{v}"' if any(ch in v for ch in "|*") else f'{k}="{v}"' for k, v in labels.items()
    ]
    return "{" + ",".join(parts) + "}"


def queries(
    task: str, window: str, agreement_window: str, namespace: str | None = None
) -> dict[str, str]:
    """name -> PromQL; ``window`` like ``"30s"`` (at least two scrape intervals); with a
    ``namespace``, only that namespace's task of this name is measured."""

    def sel(**labels: str) -> str:
        return _sel(task, namespace, **labels)

    slm = sel(backend="slm")
    scope = f'namespace="{namespace}",' if namespace is not None else ""
    triton = f'{{{scope}model="{task}"}}'
    open_rate = (
        f"(sum(rate(slm_gateway_fallbacks_total{sel(reason='circuit_open')}[{window}])) "
        "or vector(0))"
    )
    return {
        "p95_latency_ms": (
            "1000 * histogram_quantile(0.95, sum by (le) "
            f"(rate(slm_gateway_backend_duration_seconds_bucket{slm}[{window}])))"
        ),
        # Calls the gateway kept from the SLM because its circuit breaker is open count as
        # failed SLM calls: otherwise an SLM that is down would show no attempts at all, hence
        # no measurable error rate, and fallback would never turn on.
        "error_rate": (
            "((sum(rate(slm_gateway_backend_calls_total"
            f"{sel(backend='slm', result=ERROR_RESULTS)}[{window}])) or vector(0)) + "
            f"{open_rate}) / "
            f"((sum(rate(slm_gateway_backend_calls_total{slm}[{window}])) or vector(0)) + "
            f"{open_rate})"
        ),
        # A task no call reached since the gateway started has no requests series at all:
        # read as "no data", it never scaled down (minReplicas 0: never to zero). The
        # gateway routing it is scraped when its route-mode series is, so that reads 0, but
        # only while no requests series exists: one too new for a rate (a gateway pod just
        # replaced, serving calls) is still "no data", not an idle task to scale down.
        "request_rate": (
            f"sum(rate(slm_gateway_requests_total{sel()}[{window}])) "
            f"or (0 * sum(slm_gateway_route_mode{sel()}) "
            f"unless on() count(slm_gateway_requests_total{sel()}))"
        ),
        "queue_ms": (
            f"sum(rate(nv_inference_queue_duration_us{triton}[{window}])) / "
            f"sum(rate(nv_inference_request_success{triton}[{window}])) / 1000"
        ),
        # The agree series starts with the first agreeing copy: until then, every copy
        # disagreeing read as "not measured" rather than 0, and a canary that disagreed on
        # everything kept its traffic. Still no data when there are no copies at all.
        "agreement": (
            "(sum(increase(slm_gateway_shadow_total"
            f"{sel(result='agree')}[{agreement_window}])) or vector(0)) / "
            "sum(increase(slm_gateway_shadow_total"
            f"{sel(result='agree|disagree')}[{agreement_window}]))"
        ),
        "shadow_samples": (
            "sum(increase(slm_gateway_shadow_total"
            f"{sel(result='agree|disagree')}[{agreement_window}]))"
        ),
        "slm_share": (  # 0, not stale, when the SLM answered nothing
            f"(sum(rate(slm_gateway_requests_total{slm}[{window}])) or vector(0)) / "
            f"sum(rate(slm_gateway_requests_total{sel()}[{window}]))"
        ),
        "captured_records": f"sum(slm_gateway_capture_records_total{sel(result='written')})",
        # The calls the LLM answered (the examples curate trains on; the SLM's own answers are
        # captured too, but are no reference), by series, not summed: retraining counts what
        # each one gained (see counter_readings).
        "llm_answer_totals": f"slm_gateway_requests_total{sel(backend='llm')}",
        "llm_answer_starts": f"slm_gateway_requests_created{sel(backend='llm')}",
        "cost_saved_usd": (
            f"sum(increase(slm_gateway_llm_equivalent_cost_usd_total{sel()}[{window}])) - "
            f"sum(increase(slm_gateway_cost_usd_total{sel()}[{window}]))"
        ),
    }


#: Queries whose answer is read series by series (the others: one number).
VECTOR_QUERIES = frozenset({"llm_answer_totals", "llm_answer_starts"})


def counter_readings(totals: Any, starts: Any) -> dict[str, CounterReading] | None:
    """A gateway counter, one reading per series, keyed by a hash of the series' labels and
    its ``_created`` time; None when there is none.

    Why the start is in the key: a gateway restarted in place (same pod, same scrape target)
    keeps its labels, and its counter starts again from zero; with the start in the key it is
    a new series, counted whole (:func:`slm_operator.live.count_new_records`). The hash keeps
    ``status.retraining.gatewayCounters`` short whatever labels the scrape adds.
    """
    created = {_series(s): str((s.get("value") or ["", ""])[1]) for s in starts or []}
    out: dict[str, CounterReading] = {}
    for s in totals or []:
        value = _scalar([s])
        if value is None:
            continue
        ident = _series(s)
        start = created.get(ident)
        key = hashlib.sha256(f"{ident}\0{start or ''}".encode()).hexdigest()[:16]
        out[key] = CounterReading(int(value), start is not None)
    return out or None


def _series(sample: Any) -> str:
    """A series' labels but its name, as text: a counter and its ``_created`` share them."""
    labels = {k: v for k, v in (sample.get("metric") or {}).items() if k != "__name__"}
    return json.dumps(labels, sort_keys=True)


_STATUS_CODE = re.compile(r"HTTP Status Code (\d{3})")


def error_summary(exc: BaseException, url: str = "") -> str:
    """``exc`` in one line for the log, without the response body Prometheus sent.

    Why: prometheus_api_client raises ``HTTP Status Code 401 (b'<body>')``, and a body may
    echo the request, e.g. an auth proxy quoting the ``Authorization`` header it refused
    (basic auth: the password, base64). The status code and its reason say what went wrong;
    other errors (connection refused, a timeout) keep their text, with every URL in it cut to
    scheme, host, port and path, and the user info, query and fragment of ``url`` (the
    Prometheus URL: ``https://user:pass@host`` for basic auth) replaced wherever they appear,
    with or without the scheme (:func:`slm_contract.redact_uris`, as the operator's other
    messages are).
    """
    text = str(exc)
    found = _STATUS_CODE.match(text)
    if found is not None:
        code = int(found.group(1))
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = "unknown status"
        return f"HTTP {code} {reason} (response body not logged)"
    return str(redact_uris(text, url))


def _duration(seconds: float) -> str:
    """A PromQL range: whole seconds as such (``"45s"``), others in milliseconds, rounded
    down (``"1500ms"``)."""
    ms = math.floor(seconds * 1000 + 1e-6)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def unstretched(count: float | None, span_s: float, scrape_s: float) -> float | None:
    """A count increase() read over ``span_s`` plus one scrape interval, as it was over the
    ``span_s`` its samples cover.

    Why: increase() extrapolates what the samples in its range show to the whole range.
    Read over the span plus the scrape interval shared with the window before
    (:meth:`PromMetrics.read_s`), its samples cover the span, and a burst of 20 shadow copies
    read ``20 * (span + scrape) / span`` (40 with two scrapes a window), counted as that
    many towards ``shadowMinSamples``. Only counts are scaled: a rate divides the same
    stretch out, and a ratio or quantile of two stretched increases is not changed.
    """
    if count is None or span_s <= 0:
        return count
    return count * span_s / (span_s + scrape_s)


def _scalar(result: Any) -> float | None:
    if not result:
        return None
    try:
        value = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


class PromMetrics:
    """Reads one task's live metrics from Prometheus (prometheus-api-client).

    An https Prometheus's certificate is verified (against the system's CAs, or the bundle
    named by ``REQUESTS_CA_BUNDLE``): its answers decide fallback, scaling and promotion, so a
    man in the middle must not be able to make them up. ``verify_tls=False`` is the explicit
    opt-out (``SLM_FLEET_PROMETHEUS_INSECURE_SKIP_VERIFY``).

    A slow or hung Prometheus must not stall reconciles (each holds a worker thread, and
    Jobs, Deployments and status wait behind it): no HTTP retries (the next window asks
    again), one deadline for all of a task's queries (``deadline_s``), and after a failure
    no request at all for ``cooldown_s``, for every task (one instance serves them all):
    they report MetricsUnavailable and keep their last decision meanwhile.
    """

    def __init__(
        self,
        url: str,
        scrape_interval_s: float = 15.0,
        timeout_s: float = 5.0,
        verify_tls: bool = True,
        deadline_s: float = 10.0,
        cooldown_s: float = 30.0,
    ) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.url = url
        self.scrape = scrape_interval_s
        self.timeout = timeout_s
        self.deadline = deadline_s
        self.cooldown = cooldown_s
        #: time.monotonic() until which Prometheus is not asked (after a failure).
        self._quiet_until = 0.0
        self._lock = threading.Lock()
        self.client = PrometheusConnect(
            url=url,
            disable_ssl=not verify_tls,
            timeout=timeout_s,
            # The library's default retries 3 times with backoff: ~26 s per task when
            # Prometheus hangs. One attempt; the next window is the retry.
            retry=Retry(total=0, read=False, redirect=False),
        )

    def cooling_down(self) -> bool:
        """Whether a recent failure keeps Prometheus from being asked now."""
        return time.monotonic() < self._quiet_until

    def range_s(self, window_seconds: float) -> int:
        """Seconds a judged window spans: ``windowSeconds``, or two scrape intervals when
        longer (a rate needs two samples); windows are judged this often, no more.

        Why it is the shortest time between two judged windows (the reconcile passes it to
        :func:`slm_operator.plan.metrics_due` as ``min_window_s``): windows judged more often
        than they span re-read the same counter steps, so one latency spike counted as
        ``breachWindows`` consecutive breaches. Judging every ``max(windowSeconds, range)``
        keeps consecutive windows apart (but for the 50 ms timer slack ``metrics_due``
        allows); raising the CRD's minimum instead could not follow the operator's scrape
        interval. Each query reads one scrape interval more than this (:meth:`window`).
        """
        return max(math.ceil(window_seconds), math.ceil(2 * self.scrape))

    def read_s(self, span_s: float) -> float:
        """Seconds a query reads for a window spanning ``span_s``: one scrape interval more.

        Why: a range holds the samples inside it, and rate() and increase() see only the
        steps between those. Reading exactly the span, consecutive windows shared no sample,
        so the step from the last sample of one window to the first of the next was in
        neither: about half the bursts of SLM errors or shadow disagreements were never
        judged. One scrape interval more, consecutive windows share their boundary sample:
        every step is in one window, and in one only (a window reads the steps after its
        first sample, so a latency spike still breaches one window, not two).
        """
        return span_s + self.scrape

    def window(self, window_seconds: float) -> str:
        """The range each rate of a window reads (:meth:`read_s` of :meth:`range_s`)."""
        return _duration(self.read_s(self.range_s(window_seconds)))

    def agreement_span_s(self, window_seconds: float, since_s: float | None) -> float:
        """Seconds of shadow copies the agreement of a window covers: since
        ``status.live.agreementSince`` (at most :data:`AGREEMENT_MAX_S`), or one window for
        a task never judged; in whole milliseconds, rounded down."""
        if since_s is None:
            return float(self.range_s(window_seconds))
        return max(1, math.floor(min(since_s, AGREEMENT_MAX_S) * 1000)) / 1000

    def agreement_window(self, window_seconds: float, since_s: float | None) -> str:
        """The range live agreement is read over: the shadow copies not judged yet, plus one
        scrape interval (:meth:`read_s`: the sample the last judged window ended on).

        ``since_s``: seconds since ``status.live.agreementSince`` (see
        :func:`slm_operator.plan.agreement_since_s`); None for a task never judged, which reads
        one window. Why not a fixed range: a range longer than the window (it was at least
        60 s) let consecutive windows read the same copies, so one burst of agreeing copies
        counted as ``canaryWindows`` healthy windows. Copies too few to judge are pooled with
        the next window's instead, up to :data:`AGREEMENT_MAX_S`. The range starts on the
        sample the window that spent the last copies ended on, so each copy is read by one
        window: none twice, and none lost between two (:meth:`read_s`); the count is scaled
        back to the span (:func:`unstretched`).
        """
        return _duration(self.read_s(self.agreement_span_s(window_seconds, since_s)))

    def task_metrics(
        self,
        task: str,
        window_seconds: float,
        namespace: str | None = None,
        agreement_since_s: float | None = None,
    ) -> Metrics | None:
        """One task's metrics; pass its ``namespace`` to leave out same-named tasks elsewhere,
        and ``agreement_since_s`` (:meth:`agreement_window`) to read each copy once."""
        if self.cooling_down():
            return None
        w = self.window(window_seconds)
        agreement_w = self.agreement_window(window_seconds, agreement_since_s)
        values: dict[str, float | None] = {}
        vectors: dict[str, Any] = {}
        deadline = time.monotonic() + self.deadline
        try:
            for name, q in queries(task, w, agreement_w, namespace).items():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to all queries within {self.deadline:g}s")
                # Connect and read timeouts both within what is left of the deadline.
                timeout = min(self.timeout, left)
                answer = self.client.custom_query(q, timeout=(timeout, timeout))
                if name in VECTOR_QUERIES:
                    vectors[name] = answer
                else:
                    values[name] = _scalar(answer)
        except Exception as exc:  # connection errors, HTTP errors, bad JSON, the deadline
            with self._lock:
                first = not self.cooling_down()  # another task's failure already said so
                self._quiet_until = time.monotonic() + self.cooldown
            if first:
                log.warning(
                    "Prometheus at %s did not answer for task %s: %s; not asking again for "
                    "%gs (live control keeps its last decisions)",
                    redact_uri(self.url),
                    task,
                    error_summary(exc, self.url),
                    self.cooldown,
                )
            return None
        span = self.range_s(window_seconds)
        samples = unstretched(
            values.pop("shadow_samples"),
            self.agreement_span_s(window_seconds, agreement_since_s),
            self.scrape,
        )
        values["cost_saved_usd"] = unstretched(values.get("cost_saved_usd"), span, self.scrape)
        captured = values.pop("captured_records")
        return Metrics(
            **values,
            shadow_samples=round(samples) if samples is not None else None,
            captured_records=int(captured) if captured is not None else None,
            llm_answers=counter_readings(
                vectors.get("llm_answer_totals"), vectors.get("llm_answer_starts")
            ),
        )
