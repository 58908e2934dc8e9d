"""Live control decisions as pure functions: replicas, SLO fallback with hysteresis, rollout.

The operator evaluates a serving task once per ``fallback.policy.windowSeconds`` (or two
Prometheus scrape intervals when longer; each window reads from the sample the one before ended
on, so every counter step is judged in exactly one window) from a :class:`Metrics` snapshot
(queried from Prometheus by :mod:`slm_operator.prom`). Everything it
must remember between windows (streaks, the rollout mode, when it last scaled) lives in
``status.live`` and ``status.route``, so a restarted operator continues where it stopped.

Missing metrics never cause a change: the last decision is kept and the SLOMet condition says
``MetricsUnavailable`` (a window without SLM samples keeps the last verdict instead, its
figures and its streaks). Scaling up is immediate, scaling down waits for a
cool-down, and each step is bounded, as in the usual autoscaler designs.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

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
    captured_records: int | None = None  # call records the gateways have written for the task
    #: Calls the LLM answered, by gateway counter series (key: :mod:`slm_operator.prom`'s
    #: series key): what retraining counts as new examples. None when Prometheus has none, e.g.
    #: no call of the task answered by the LLM since the gateway started.
    llm_answers: Mapping[str, CounterReading] | None = None

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
    # bounded before ceil(): a tiny target (the CRD only asks > 0) made the ratio infinite,
    # and int(inf) raised in every pass, freezing the task's status
    want = math.ceil(min(rate_qps / target_qps, float(hi)) - 1e-9) if rate_qps > 0 else 0
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


#: Fallback reasons that mean "no replica is ready" (an outage, scaled to zero, a replica
#: starting again): such a fallback ends as soon as one is (:func:`outage_over`).
NO_REPLICA_REASONS = frozenset({"NoReadyReplicas", "ScaledToZero", "WakingFromZero"})


def outage_over(prev: FallbackState, ready_replicas: int) -> FallbackState:
    """``prev`` without a fallback that was on only for want of ready replicas, once some are.

    Replicas are back: such a fallback ends here, as if it had never been on; it must not wait
    for recovery windows meant for an SLO breach, nor for the next metrics window at all (the
    caller applies this on every pass: without Prometheus, or while it does not answer, no
    window ever comes, and the calls would stay on the LLM for good).
    """
    if ready_replicas > 0 and prev.active and prev.reason in NO_REPLICA_REASONS:
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
        # A window without a verdict (no SLM sample: sparse calls, which under fallback reach
        # the SLM only as shadow copies) changes nothing, the reason of an active fallback
        # included: renamed MetricsUnavailable and back, every other window posted the breach
        # as a new Warning.
        held = prev.reason if prev.active and prev.reason else "MetricsUnavailable"
        return FallbackState(prev.active, prev.breach_streak, prev.healthy_streak, held)
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
    agreement at least ``minAgreement`` over ``shadowMinSamples`` copies or more), so one
    lucky window is not enough. Any window that breaches the SLO or measures too little
    agreement sends it back to shadow, and a later canary counts from zero again. A window
    that measures neither (no canary calls, too few copies, metrics missing) neither counts
    nor resets, like the fallback streaks. ``strategy: direct`` serves
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
        # Agreement is judged on shadowMinSamples copies at least, as in shadow: a canary's
        # copies are only the calls the LLM still answers, and at a high canaryPercent one
        # disagreement among a handful would roll it back, one agreeing copy count as healthy.
        enough = m.shadow_samples is not None and m.shadow_samples >= min_samples
        if breached or (m.agreement is not None and enough and not agree_ok):
            return Rollout(MODE_SHADOW, 0, "CanaryRolledBack")
        if breached is False and agree_ok and enough:
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


#: Cron's names for months and days of the week (case-insensitive), as numbers.
_MONTHS: Final[Mapping[str, int]] = {
    m: i + 1
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_DAYS: Final[Mapping[str, int]] = {
    d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}
#: (field name, lowest value, highest value, names) of the five cron fields, in order. Day of
#: week 7 is Sunday too, as in cron.
_NO_NAMES: Final[Mapping[str, int]] = {}
_CRON_FIELDS: Final[tuple[tuple[str, int, int, Mapping[str, int]], ...]] = (
    ("minute", 0, 59, _NO_NAMES),
    ("hour", 0, 23, _NO_NAMES),
    ("day-of-month", 1, 31, _NO_NAMES),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)


def _cron_value(text: str, what: str, lo: int, hi: int, names: Mapping[str, int]) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not (text.isascii() and text.isdigit()):
            named = f" or a name ({', '.join(n.upper() for n in names)})" if names else ""
            raise ValueError(f"{what} {text!r} is not a number{named}")
        value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{what} {text!r} is outside {lo}-{hi}")
    return value


def _cron_values(
    spec: str, what: str, lo: int, hi: int, names: Mapping[str, int]
) -> frozenset[int]:
    """The values one cron field allows; ValueError, in words, when it is malformed."""
    out: set[int] = set()
    for part in spec.split(","):
        rng, slash, step_s = part.partition("/")
        if slash and not (step_s.isascii() and step_s.isdigit()):
            raise ValueError(f"{what} step in {part!r} is not a number")
        step = int(step_s) if slash else 1
        if step < 1:
            # Cron has no step 0; taken at face value it would divide by zero.
            raise ValueError(f"{what} step in {part!r} must be at least 1")
        if rng in ("*", "?"):
            start, end = lo, hi
        elif "-" in rng:
            a, _, b = rng.partition("-")
            start = _cron_value(a, what, lo, hi, names)
            end = _cron_value(b, what, lo, hi, names)
            if start > end:
                raise ValueError(f"{what} range {rng!r} ends before it starts")
        else:
            start = _cron_value(rng, what, lo, hi, names)
            end = hi if slash else start
        out.update(range(start, end + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class _Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday; a 7 in the expression is folded into 0
    #: Both day fields restricted: a day matches when either does, as in cron.
    either_day: bool


@functools.lru_cache(maxsize=128)
def _parse_cron(expr: str) -> _Cron:
    fields = expr.split()
    if len(fields) != len(_CRON_FIELDS):
        raise ValueError(
            f"has {len(fields)} fields, not 5 (minute hour day-of-month month day-of-week)"
        )
    minutes, hours, days, months, weekdays = (
        _cron_values(spec, what, lo, hi, names)
        for spec, (what, lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True)
    )
    return _Cron(
        minutes,
        hours,
        days,
        months,
        frozenset(d % 7 for d in weekdays),
        _restricted(fields[2]) and _restricted(fields[4]),
    )


def _restricted(field: str) -> bool:
    """Whether a day field restricts the days (for cron's rule that a day matching either
    restricted day field fires). ``*`` and ``?`` do not, with a step of 1 too (``*/1``), as
    Kubernetes CronJobs' parser reads them; ``*/2`` does."""
    for part in field.split(","):
        base, _, step = part.partition("/")
        if base in ("*", "?") and (not step or int(step) == 1):
            return False
    return True


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a schedule :func:`cron_matches` understands, or None when it is.

    Why here as well as in the CRD's rule: a schedule admitted by an older CRD (or one the
    rule cannot judge, like a range that ends before it starts) must become a readable
    InvalidSpec condition, not an exception at every metrics window.
    """
    try:
        cron = _parse_cron(expr)
    except ValueError as exc:
        return str(exc)
    if not cron.either_day and not any(d <= _MONTH_DAYS[m] for m in cron.months for d in cron.days):
        # "0 3 31 2 *" parses, and never fires: retraining would silently never run.
        return "no month it names has a day-of-month it names, so it never fires"
    return None


#: Longest month lengths (February in a leap year: "29 2" fires, every four years).
_MONTH_DAYS: Final = {
    1: 31,
    2: 29,
    3: 31,
    4: 30,
    5: 31,
    6: 30,
    7: 31,
    8: 31,
    9: 30,
    10: 31,
    11: 30,
    12: 31,
}


def _day_matches(cron: _Cron, day: dt.date) -> bool:
    dom_ok = day.day in cron.days
    dow_ok = (day.weekday() + 1) % 7 in cron.weekdays  # cron: 0 = Sunday
    return day.month in cron.months and (
        (dom_ok or dow_ok) if cron.either_day else (dom_ok and dow_ok)
    )


def cron_matches(expr: str, when: dt.datetime) -> bool:
    """Whether a 5-field cron expression (UTC; numbers, month and weekday names, *, ranges,
    lists, steps) matches the minute ``when`` falls in. Day-of-month and day-of-week combine
    with OR when both are restricted, as in cron. ValueError for an expression that
    :func:`cron_problem` refuses."""
    cron = _parse_cron(expr)
    w = when.astimezone(dt.UTC)
    return w.minute in cron.minutes and w.hour in cron.hours and _day_matches(cron, w.date())


#: How far back :func:`cron_fired` looks. Why so far: the minutes since the schedule was last
#: acted on may span a night with the task scaled to zero, or a long outage; a fire in them is
#: still owed (once), as a Kubernetes CronJob runs a missed schedule when it can.
CRON_LOOKBACK: Final = dt.timedelta(days=31)


def cron_fired(expr: str, since: dt.datetime | None, now: dt.datetime) -> bool:
    """Whether the schedule matched a minute after ``since`` up to ``now`` (the current minute
    alone when ``since`` is None; at most :data:`CRON_LOOKBACK` is scanned, a day at a time,
    so a long gap costs a few hundred steps, not one per minute)."""
    cron = _parse_cron(expr)
    t = now.astimezone(dt.UTC).replace(second=0, microsecond=0)
    oldest = (
        t
        if since is None
        else max(
            since.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1),
            t - CRON_LOOKBACK,
        )
    )
    hours = sorted(cron.hours, reverse=True)
    minutes = sorted(cron.minutes, reverse=True)
    day = t.date()
    while day >= oldest.date():
        if _day_matches(cron, day):
            # The latest fire of this day up to now; the earlier ones are older still.
            latest = next(
                (
                    at
                    for h in hours
                    for mi in minutes
                    if (at := dt.datetime.combine(day, dt.time(h, mi), dt.UTC)) <= t
                ),
                None,
            )
            if latest is not None:
                return latest >= oldest
        day -= dt.timedelta(days=1)
    return False


class CounterReading(NamedTuple):
    """One gateway counter series as Prometheus last saw it."""

    value: int
    #: Whether the series' key includes its ``_created`` time (the gateway process's start for
    #: it): then a restarted gateway is a new key, and a lower value under the same key can
    #: only be a Prometheus replica answering behind. Without it (created series turned off) a
    #: lower value is taken for a restart in place.
    keyed_by_start: bool = True


#: Counter series remembered in ``status.retraining.gatewayCounters``: every series read this
#: window, then as many gone ones (a replaced pod, a scrape that failed for a while) as fit,
#: the most recently read first.
#: A gone series is remembered so that, back, only what it gained meanwhile counts; one
#: forgotten after this many newer ones came is counted whole if it ever comes back.
MAX_REMEMBERED_COUNTERS: Final = 32


def count_new_records(
    remembered: Mapping[str, int] | None, readings: Mapping[str, CounterReading]
) -> tuple[int, dict[str, int]]:
    """S6's count: calls the LLM answered (through the gateways, which capture them) since the
    last window, and what to remember for the next one.

    Why per series, not the sum: the gateways' total goes down whenever one restarts (a
    rollout, an OOM kill) and up again as it counts, so no threshold on the total tells a
    restart from a lagging read. Compared with the last window series by series, a new series
    (a new pod or process: its key includes its start) counts whole, a known one counts what
    it gained, and one read lower than before counts nothing (a lagging read; restarts are new
    keys). Only the calls a gateway answered after its last scrape and before it stopped go
    uncounted: Prometheus never saw them. Without start times (``_created`` series dropped by
    the scrape) a restart in place is told by the reading falling below half the last one;
    one that counts more than that before its first scrape is counted from the last reading
    on.

    ``remembered`` and the returned readings are in the order last read, most recent first:
    the gone series forgotten first, when there is no room, are those gone the longest.

    ``remembered`` None (the first window that counts): nothing is new yet, the readings are
    the starting point; records captured before a model was served trained it already.
    """
    if remembered is None:
        return 0, {k: r.value for k, r in readings.items()}
    new = 0
    kept: dict[str, int] = {}
    for key, (value, keyed_by_start) in readings.items():
        last = remembered.get(key)
        if last is None:
            new += value
        elif value >= last:
            new += value - last
        elif not keyed_by_start and value < last // 2:
            # Restarted in place, as far as can be told without its start: all it has now is
            # new. A reading only a little lower is a Prometheus replica behind, which counted
            # whole would start a retraining on what was counted already.
            new += value
        else:
            value = last  # behind: keep the higher reading, so nothing counts twice
        kept[key] = value
    for key, value in remembered.items():
        if len(kept) >= MAX_REMEMBERED_COUNTERS:
            break
        kept.setdefault(key, value)
    return new, kept


@dataclass(frozen=True)
class Retrain:
    epoch: int
    #: New examples counted since the last trigger (0 right after one); None: unchanged.
    new_records: int | None
    triggered: bool
    reason: str


def retrain_step(
    cfg: Mapping[str, Any] | None,
    epoch: int,
    new_records: int | None,
    schedule_fired: bool,
    may_trigger: bool = True,
) -> Retrain:
    """S6: start a new revision once ``minNewExamples`` new calls were captured since the last
    training (and, with a schedule, only when it fires).

    ``new_records``: counted since the last trigger (:func:`count_new_records`, window by
    window); None when no gateway series could be read this window: the count waits, and so
    does the reason (returned empty), for an enabled retraining is not idle. A paused
    retraining (``enabled: false``) counts nothing either: once enabled again, what the
    gateways gained meanwhile counts.
    ``may_trigger`` False (a revision is training): the count goes on and nothing starts; the
    reason is left as it was (empty: EnoughNewExamples for the retraining it started, say)
    until the count is enough for the next, WaitingForRevision: what holds it back then is the
    revision in training (or one that failed, until the spec is fixed), not the count.
    """
    if not cfg or not cfg.get("enabled", True):
        return Retrain(epoch, None, False, "RetrainingIdle")
    if new_records is None:
        return Retrain(epoch, None, False, "")
    enough = new_records >= int(cfg.get("minNewExamples", 1000))
    if not may_trigger:
        return Retrain(epoch, new_records, False, "WaitingForRevision" if enough else "")
    if not enough:
        return Retrain(epoch, new_records, False, "CountingNewExamples")
    if cfg.get("schedule") and not schedule_fired:
        return Retrain(epoch, new_records, False, "WaitingForSchedule")
    return Retrain(epoch + 1, 0, True, "EnoughNewExamples")
