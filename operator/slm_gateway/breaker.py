"""A circuit breaker per backend, as a small state machine driven by an explicit clock.

Why: when an SLM replica is down, waiting out its timeout on every request adds the whole
budget to every call before the LLM answers. After ``failure_threshold`` consecutive failures
the breaker opens and requests skip that backend at once; after ``cooldown_s`` one probe
request is let through (half-open) and its outcome closes or re-opens the breaker.

Time is passed in (``now``, monotonic seconds), never read here, so every transition is
unit-tested without sleeping.
"""

from __future__ import annotations

from slm_gateway.backends import BAD_OUTPUT, TIMEOUT

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
#: Gauge values for the state, in the order a failing backend goes through them.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
#: A circuit whose half-open probes keep failing says so at most once per this many seconds:
#: with the default 5 s cooldown an hour-long outage was 720 "is now open" lines.
PROBE_LOG_INTERVAL_S = 60.0


def failure_text(kind: str, detail: str) -> str:
    """A failed call as the circuit's log lines say it: ``HTTP 500``, ``timeout (no answer
    within 30s)``, ``cannot connect (Connection refused)``, ``bad output (...)``; ``kind`` and
    ``detail`` as an :class:`~slm_gateway.backends.UpstreamError` has them (its detail is the
    client's own words, safe to log: no body, no key)."""
    if kind == TIMEOUT:
        return f"timeout ({detail})"
    if kind == BAD_OUTPUT:
        return f"bad output ({detail})"
    return detail


def probe_line_due(said_at: float, now: float) -> bool:
    """Whether a failed half-open probe is logged at ``now``, the last such line of this
    outage having been at ``said_at`` (``-inf``: none yet): the first one is, then one per
    :data:`PROBE_LOG_INTERVAL_S`."""
    return now - said_at >= PROBE_LOG_INTERVAL_S


class CircuitBreaker:
    """Consecutive-failure breaker with one half-open probe at a time.

    A probe whose outcome never arrives (its request was cancelled) would hold the breaker
    half-open for ever, so a probe claim expires after another ``cooldown_s``.

    An outcome says something only about the breaker's state when its call was let through
    (``admitted_at``, the ``now`` of that :meth:`allow`): a long call admitted before the
    breaker opened that ends while it is open or half-open is ignored. Counted, one slow
    success from before an outage closed the open circuit at once, with no probe, and the
    agents got the failing backend's errors again until it reopened.
    """

    __slots__ = ("_failures", "_opened_at", "_probe_at", "cooldown_s", "failure_threshold", "state")

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 5.0) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None

    def allow(self, now: float) -> bool:
        """May a request use this backend now? In half-open, True claims the single probe."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self._opened_at < self.cooldown_s:
                return False
            self.state = HALF_OPEN
            self._probe_at = now
            return True
        if self._probe_at is not None and now - self._probe_at < self.cooldown_s:
            return False
        self._probe_at = now
        return True

    def available(self, now: float) -> bool:
        """Would :meth:`allow` say yes, without claiming a probe (for planning only)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now - self._opened_at >= self.cooldown_s
        return self._probe_at is None or now - self._probe_at >= self.cooldown_s

    def _stale(self, admitted_at: float | None) -> bool:
        return admitted_at is not None and self.state != CLOSED and admitted_at < self._opened_at

    def success(self, now: float, admitted_at: float | None = None) -> None:
        if self._stale(admitted_at):
            return
        self.state = CLOSED
        self._failures = 0
        self._probe_at = None

    def failure(self, now: float, admitted_at: float | None = None) -> None:
        if self._stale(admitted_at):
            return
        if self.state == HALF_OPEN:
            self._open(now)
            return
        self._failures += 1
        if self.state == CLOSED and self._failures >= self.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = OPEN
        self._opened_at = now
        self._probe_at = None
        self._failures = 0
