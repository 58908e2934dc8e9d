"""Live control decisions as pure functions: replicas, SLO fallback with hysteresis, rollout.

The operator evaluates a serving task once per ``fallback.policy.windowSeconds`` from a
:class:`Metrics` snapshot (queried from Prometheus by :mod:`slm_operator.prom`). Everything it
must remember between windows (streaks, the rollout mode, when it last scaled) lives in
``status.live`` and ``status.route``, so a restarted operator continues where it stopped.

Missing metrics never cause a change: the last decision is kept and the SLOMet condition says
``MetricsUnavailable``. Scaling up is immediate, scaling down waits for a cool-down, and each
step is bounded, as in the usual autoscaler designs.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

MODE_LLM: Final = "llm"
MODE_SHADOW: Final = "shadow"
MODE_CANARY: Final = "canary"
MODE_SLM: Final = "slm"


@dataclass(frozen=True)
class Metrics:
    """One window of live measurements for one task; None means "not measured"."""

    p95_latency_ms: float | None = None
    error_rate: float | None = None  # SLM failures / SLM attempts
    request_rate: float | None = None  # all calls for the task, per second
    queue_ms: float | None = None  # Triton queue time per request
    agreement: float | None = None  # shadow/canary agreement with the LLM, 0..1
    shadow_samples: int | None = None  # SLM answers compared with the LLM so far
    slm_share: float | None = None  # fraction of calls answered by the SLM
    cost_saved_usd: float | None = None
    captured_records: int | None = None  # call records the gateway has written for the task

    @property
    def empty(self) -> bool:
        return self.p95_latency_ms is None and self.error_rate is None


@dataclass(frozen=True)
class ScaleDecision:
    replicas: int
    reason: str


def decide_replicas(
    rate_qps: float | None,
    target_qps: float,
    current: int,
    lo: int,
    hi: int,
    *,
    max_step: int,
    cooldown_s: float,
    seconds_since_scale: float | None,
) -> ScaleDecision:
    """replicas = clamp(ceil(rate / target), min, max), at most ``max_step`` per decision;
    a scale-down waits ``cooldown_s`` after the previous change."""
    current = max(lo, min(hi, current))
    if rate_qps is None:
        return ScaleDecision(current, "MetricsUnavailable")
    want = math.ceil(rate_qps / target_qps - 1e-9) if rate_qps > 0 else 0
    want = max(lo, min(hi, max(want, 1 if lo > 0 else 0)))
    if want > current:
        return ScaleDecision(min(want, current + max_step), "ScaleUp")
    if want < current:
        if seconds_since_scale is not None and seconds_since_scale < cooldown_s:
            return ScaleDecision(current, "ScaleDownCoolingDown")
        return ScaleDecision(max(want, current - max_step), "ScaleDown")
    return ScaleDecision(current, "Steady")


def slo_breached(m: Metrics, slo: Mapping[str, Any]) -> bool | None:
    """True when p95 latency or the error rate is over the SLO; None when unmeasured."""
    if m.empty:
        return None
    p95 = m.p95_latency_ms is not None and m.p95_latency_ms > float(slo.get("p95LatencyMs", 500))
    err = m.error_rate is not None and m.error_rate > float(slo.get("maxErrorRate", 0.01))
    return p95 or err


@dataclass(frozen=True)
class FallbackState:
    active: bool
    breach_streak: int = 0
    healthy_streak: int = 0
    reason: str = ""


def outage_over(prev: FallbackState, ready_replicas: int) -> FallbackState:
    """``prev`` without a fallback that was on only for want of ready replicas, once some are.

    Replicas are back: such a fallback ends here, as if it had never been on; it must not wait
    for recovery windows meant for an SLO breach, nor for the next metrics window at all (the
    caller applies this on every pass: without Prometheus, or while it does not answer, no
    window ever comes, and the calls would stay on the LLM for good).
    """
    if ready_replicas > 0 and prev.active and prev.reason == "NoReadyReplicas":
        return FallbackState(False, prev.breach_streak, prev.healthy_streak)
    return prev


def fallback_step(
    breached: bool | None,
    ready_replicas: int,
    prev: FallbackState,
    breach_windows: int,
    recovery_windows: int,
) -> FallbackState:
    """Hysteresis: on after ``breach_windows`` consecutive breached windows (or at once when no
    replica is ready), off after ``recovery_windows`` consecutive healthy ones."""
    if ready_replicas <= 0:
        return FallbackState(True, prev.breach_streak, 0, "NoReadyReplicas")
    prev = outage_over(prev, ready_replicas)
    if breached is None:
        return FallbackState(
            prev.active, prev.breach_streak, prev.healthy_streak, "MetricsUnavailable"
        )
    if breached:
        streak = prev.breach_streak + 1
        active = prev.active or streak >= breach_windows
        return FallbackState(active, streak, 0, "SLOBreached" if active else "SLOAtRisk")
    healthy = prev.healthy_streak + 1
    if prev.active and prev.reason != "NoReadyReplicas" and healthy < recovery_windows:
        return FallbackState(True, 0, healthy, "Recovering")
    return FallbackState(False, 0, healthy, "SLOMet")


@dataclass(frozen=True)
class Rollout:
    mode: str
    canary_percent: int
    reason: str
    #: Consecutive healthy windows the current canary has passed; 0 outside a canary.
    canary_healthy: int = 0


def rollout_step(
    prev: Rollout, m: Metrics, breached: bool | None, cfg: Mapping[str, Any]
) -> Rollout:
    """shadow → canary → slm, each step only while live agreement and the SLO hold.

    A canary is promoted after ``canaryWindows`` consecutive healthy windows (SLO met and
    agreement at least ``minAgreement``), so one lucky window is not enough. Any window that
    breaches the SLO or measures too little agreement sends it back to shadow, and a later
    canary counts from zero again. A window that measures neither (no canary calls, metrics
    missing) neither counts nor resets, like the fallback streaks. ``strategy: direct`` serves
    the SLM at once.
    """
    if cfg.get("strategy", "progressive") == "direct":
        return Rollout(MODE_SLM, 100, "DirectRollout")
    min_agree = float(cfg.get("minAgreement", 0.9))
    min_samples = int(cfg.get("shadowMinSamples", 50))
    canary = int(cfg.get("canaryPercent", 10))
    windows = max(1, int(cfg.get("canaryWindows", 3)))
    agree_ok = m.agreement is not None and m.agreement >= min_agree
    if prev.mode in (MODE_LLM, ""):
        return Rollout(MODE_SHADOW, 0, "ShadowStarted")
    if prev.mode == MODE_SHADOW:
        if (
            breached is False
            and agree_ok
            and m.shadow_samples is not None
            and m.shadow_samples >= min_samples
        ):
            return Rollout(MODE_CANARY, canary, "ShadowAgreementMet")
        return Rollout(MODE_SHADOW, 0, "ShadowMeasuring")
    if prev.mode == MODE_CANARY:
        pct = canary  # the spec's, not the one the canary started with: edits apply live
        if breached or (m.agreement is not None and not agree_ok):
            return Rollout(MODE_SHADOW, 0, "CanaryRolledBack")
        if breached is False and agree_ok:
            healthy = prev.canary_healthy + 1
            if healthy >= windows:
                return Rollout(MODE_SLM, 100, "CanaryPromoted")
            return Rollout(MODE_CANARY, pct, "CanaryHealthy", healthy)
        return Rollout(MODE_CANARY, pct, "CanaryMeasuring", prev.canary_healthy)
    return Rollout(MODE_SLM, 100, "Promoted")


def route_mode(rollout: Rollout, fallback: FallbackState) -> tuple[str, int]:
    """What the gateway does now. Under fallback the LLM answers every call; while replicas are
    ready the SLM still gets shadow copies, so its recovery can be measured."""
    if fallback.active:
        return (MODE_LLM, 0) if fallback.reason == "NoReadyReplicas" else (MODE_SHADOW, 0)
    return rollout.mode, rollout.canary_percent


def _cron_field(spec: str, value: int, lo: int, hi: int) -> bool:
    for part in spec.split(","):
        rng, _, step_s = part.partition("/")
        step = int(step_s) if step_s else 1
        if rng in ("*", "?"):
            start, end = lo, hi
        elif "-" in rng:
            a, b = rng.split("-", 1)
            start, end = int(a), int(b)
        else:
            start = int(rng)
            end = hi if step_s else start
        if start <= value <= end and (value - start) % step == 0:
            return True
    return False


def cron_matches(expr: str, when: dt.datetime) -> bool:
    """Whether a 5-field cron expression (UTC; numbers, *, ranges, lists, steps) matches the
    minute ``when`` falls in. Day-of-month and day-of-week combine with OR when both are
    restricted, as in cron."""
    minute, hour, dom, month, dow = expr.split()
    w = when.astimezone(dt.UTC)
    cron_dow = (w.weekday() + 1) % 7  # cron: 0 = Sunday
    day_ok_dom = _cron_field(dom, w.day, 1, 31)
    day_ok_dow = _cron_field(dow, cron_dow, 0, 7) or (cron_dow == 0 and _cron_field(dow, 7, 0, 7))
    if dom not in ("*", "?") and dow not in ("*", "?"):
        day_ok = day_ok_dom or day_ok_dow
    else:
        day_ok = day_ok_dom and day_ok_dow
    return (
        _cron_field(minute, w.minute, 0, 59)
        and _cron_field(hour, w.hour, 0, 23)
        and _cron_field(month, w.month, 1, 12)
        and day_ok
    )


def cron_fired(expr: str, since: dt.datetime | None, now: dt.datetime) -> bool:
    """Whether the schedule matched a minute after ``since`` up to ``now`` (the current minute
    alone when ``since`` is None; at most the last hour is scanned)."""
    t = now.replace(second=0, microsecond=0)
    oldest = (
        t
        if since is None
        else max(
            since.replace(second=0, microsecond=0) + dt.timedelta(minutes=1),
            t - dt.timedelta(hours=1),
        )
    )
    while t >= oldest:
        if cron_matches(expr, t):
            return True
        t -= dt.timedelta(minutes=1)
    return False


@dataclass(frozen=True)
class Retrain:
    epoch: int
    baseline: int | None
    triggered: bool
    reason: str


def retrain_step(
    cfg: Mapping[str, Any] | None,
    epoch: int,
    baseline: int | None,
    captured: int | None,
    schedule_fired: bool,
) -> Retrain:
    """S6: start a new revision once ``minNewExamples`` new calls were captured since the last
    training (and, with a schedule, only when it fires). A gateway restart resets its counters,
    which restarts the count rather than triggering."""
    if not cfg or not cfg.get("enabled", True) or captured is None:
        return Retrain(epoch, baseline, False, "RetrainingIdle")
    if baseline is None or captured < baseline:
        return Retrain(epoch, captured, False, "CountingNewExamples")
    new = captured - baseline
    if new < int(cfg.get("minNewExamples", 1000)):
        return Retrain(epoch, baseline, False, "CountingNewExamples")
    if cfg.get("schedule") and not schedule_fired:
        return Retrain(epoch, baseline, False, "WaitingForSchedule")
    return Retrain(epoch + 1, captured, True, "EnoughNewExamples")
