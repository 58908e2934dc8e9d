"""Live-control decisions alone: how many healthy windows a canary needs before promotion,
and which retraining schedules run when."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from slm_operator.live import (
    MODE_CANARY,
    MODE_SHADOW,
    MODE_SLM,
    FallbackState,
    Metrics,
    Rollout,
    cron_fired,
    cron_matches,
    cron_problem,
    decide_replicas,
    fallback_step,
    rollout_step,
)

GOOD = Metrics(p95_latency_ms=80, error_rate=0.0, agreement=0.95, shadow_samples=100)
DISAGREE = Metrics(p95_latency_ms=80, error_rate=0.0, agreement=0.5, shadow_samples=100)
NO_CANARY_CALLS = Metrics(p95_latency_ms=80, error_rate=0.0)
CFG: dict[str, Any] = {"minAgreement": 0.9, "shadowMinSamples": 50, "canaryPercent": 20}


def walk(
    windows: list[tuple[Metrics, bool | None]], cfg: dict[str, Any], start: Rollout
) -> list[Rollout]:
    out, ro = [], start
    for m, breached in windows:
        ro = rollout_step(ro, m, breached, cfg)
        out.append(ro)
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_canary_promotes_after_exactly_canary_windows_healthy_windows(n: int) -> None:
    cfg = {**CFG, "canaryWindows": n}
    steps = walk([(GOOD, False)] * (n + 1), cfg, Rollout(MODE_SHADOW, 0, ""))
    assert steps[0] == Rollout(MODE_CANARY, 20, "ShadowAgreementMet", 0)
    assert [s.mode for s in steps[1:n]] == [MODE_CANARY] * (n - 1)
    assert [s.canary_healthy for s in steps[1:n]] == list(range(1, n))
    assert steps[n] == Rollout(MODE_SLM, 100, "CanaryPromoted")


def test_default_is_three_windows() -> None:
    steps = walk([(GOOD, False)] * 3, CFG, Rollout(MODE_CANARY, 20, "ShadowAgreementMet"))
    assert [s.mode for s in steps] == [MODE_CANARY, MODE_CANARY, MODE_SLM]


@pytest.mark.parametrize(
    ("m", "breached"), [(GOOD, True), (DISAGREE, False), (DISAGREE, None)], ids=str
)
def test_an_unhealthy_window_rolls_back_to_shadow_and_forgets_the_count(
    m: Metrics, breached: bool | None
) -> None:
    ro = rollout_step(Rollout(MODE_CANARY, 20, "CanaryHealthy", 2), m, breached, CFG)
    assert ro == Rollout(MODE_SHADOW, 0, "CanaryRolledBack", 0)


@pytest.mark.parametrize(("m", "breached"), [(NO_CANARY_CALLS, False), (GOOD, None)], ids=str)
def test_an_unmeasured_window_keeps_the_count(m: Metrics, breached: bool | None) -> None:
    prev = Rollout(MODE_CANARY, 20, "CanaryHealthy", 2)
    assert rollout_step(prev, m, breached, CFG) == Rollout(MODE_CANARY, 20, "CanaryMeasuring", 2)


@pytest.mark.parametrize("agreement", [0.5, 1.0])
def test_a_canary_window_with_too_few_copies_neither_counts_nor_rolls_back(
    agreement: float,
) -> None:
    """Copies of the calls the LLM still answers are what a canary's agreement is measured
    on; below shadowMinSamples a window says nothing either way."""
    few = Metrics(p95_latency_ms=80, error_rate=0.0, agreement=agreement, shadow_samples=5)
    prev = Rollout(MODE_CANARY, 20, "CanaryHealthy", 1)
    assert rollout_step(prev, few, False, CFG) == Rollout(MODE_CANARY, 20, "CanaryMeasuring", 1)


def test_the_count_resumes_from_the_persisted_value() -> None:
    """A restarted operator rebuilds the Rollout from status.live and carries on counting."""
    cfg = {**CFG, "canaryWindows": 4}
    ro = rollout_step(Rollout(MODE_CANARY, 20, "CanaryHealthy", 3), GOOD, False, cfg)
    assert ro.mode == MODE_SLM


def test_direct_strategy_ignores_canary_windows() -> None:
    cfg = {"strategy": "direct", "canaryWindows": 10}
    assert rollout_step(Rollout("", 0, ""), Metrics(), None, cfg).mode == MODE_SLM


def test_a_canary_follows_an_edited_canary_percent() -> None:
    """spec.rollout is applied live: raising canaryPercent during a canary takes effect at the
    next window instead of after the canary ends."""
    prev = Rollout(MODE_CANARY, 20, "CanaryHealthy", 1)
    cfg = {**CFG, "canaryPercent": 50, "canaryWindows": 5}
    assert rollout_step(prev, GOOD, False, cfg) == Rollout(MODE_CANARY, 50, "CanaryHealthy", 2)
    assert rollout_step(prev, NO_CANARY_CALLS, False, cfg).canary_percent == 50


# ---- the retraining schedule ----------------------------------------------------------

SUNDAY_3AM = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)
MONDAY_3AM = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("expr", "when", "ok"),
    [
        ("0 3 * * SUN", SUNDAY_3AM, True),
        ("0 3 * * sun", MONDAY_3AM, False),
        ("0 3 * * mon-fri", MONDAY_3AM, True),
        ("0 3 * * Mon-Fri", SUNDAY_3AM, False),
        ("0 3 * * 7", SUNDAY_3AM, True),  # 7 is Sunday too
        ("0 3 * * 5-7", SUNDAY_3AM, True),
        ("0 3 * NOV *", SUNDAY_3AM, True),
        ("0 3 * jan-mar,dec *", SUNDAY_3AM, False),
        ("0 3 22 * MON", SUNDAY_3AM, True),  # both days restricted: either matches
        ("*/20 3 * * *", dt.datetime(2026, 11, 22, 3, 40, tzinfo=dt.UTC), True),
    ],
)
def test_cron_accepts_month_and_weekday_names(expr: str, when: dt.datetime, ok: bool) -> None:
    assert cron_problem(expr) is None
    assert cron_matches(expr, when) is ok


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("*/0 * * * *", "step in '*/0' must be at least 1"),
        ("0 3 * * FOO", "'FOO' is not a number or a name"),
        ("0 3 * * 1-SUNDAY", "'SUNDAY' is not a number or a name"),
        ("0 3 * SUN *", "month 'SUN' is not a number or a name (JAN"),
        ("60 * * * *", "minute '60' is outside 0-59"),
        ("0 3 * * fri-mon", "range 'fri-mon' ends before it starts"),
        ("0 3 * *", "has 4 fields, not 5"),
        ("0 3 */ * *", "step in '*/' is not a number"),
    ],
)
def test_a_schedule_cron_cannot_run_is_refused_in_words(expr: str, why: str) -> None:
    problem = cron_problem(expr)
    assert problem is not None and why in problem
    with pytest.raises(ValueError):
        cron_matches(expr, MONDAY_3AM)


@pytest.mark.parametrize(
    ("expr", "fires"),
    [
        ("0 3 31 2 *", False),  # 31 February
        ("0 3 30,31 feb *", False),
        ("0 3 31 apr,jun *", False),
        ("0 3 31 2,3 *", True),  # 31 March
        ("0 3 29 2 *", True),  # leap years
        ("0 3 31 2 MON", True),  # both day fields: any Monday in February
    ],
)
def test_a_schedule_that_never_fires_is_refused(expr: str, fires: bool) -> None:
    """It parses, so it used to be accepted, and retraining then never ran, silently."""
    problem = cron_problem(expr)
    if fires:
        assert problem is None
    else:
        assert problem is not None and "never fires" in problem


@pytest.mark.parametrize(
    ("since", "now", "fired"),
    [
        # Scaled to zero from 01:59 to 07:30: the 02:00 fire is still owed.
        ((24, 1, 59, 40), (24, 7, 30, 0), True),
        ((24, 2, 0, 10), (24, 7, 30, 0), False),  # acted on at 02:00 already
        ((20, 2, 0, 10), (24, 1, 0, 0), True),  # days without a window that could act
        ((24, 1, 59, 40), (24, 1, 59, 59), False),
    ],
)
def test_a_fire_since_the_schedule_was_last_acted_on_is_seen_hours_later(
    since: tuple[int, int, int, int], now: tuple[int, int, int, int], fired: bool
) -> None:
    """cron_fired scanned at most the last hour: a fire missed for a night was lost."""

    def at(d: int, h: int, m: int, s: int) -> dt.datetime:
        return dt.datetime(2026, 11, d, h, m, s, tzinfo=dt.UTC)

    assert cron_fired("0 2 * * *", at(*since), at(*now)) is fired


def test_a_tiny_qps_target_scales_to_the_maximum_instead_of_raising() -> None:
    """targetQpsPerReplica only has to be > 0: 1e-308 made rate / target infinite, and
    ceil() of it raised in every reconcile, freezing the task's status."""
    decision = decide_replicas(
        5.0, 1e-308, 1, 1, 4, max_step=10, cooldown_s=0, seconds_since_scale=None
    )
    assert (decision.replicas, decision.reason) == (4, "ScaleUp")


@pytest.mark.parametrize(
    ("expr", "fires_on_a_tuesday"),
    [("0 3 */1 * MON", False), ("0 3 * * MON", False), ("0 3 */2 * MON", True)],
)
def test_a_day_field_of_every_day_with_step_one_does_not_restrict(
    expr: str, fires_on_a_tuesday: bool
) -> None:
    """Cron fires on a day matching either restricted day field. "*/1" restricts nothing
    (as Kubernetes CronJobs read it): "0 3 */1 * MON" fired every day, not Mondays only."""
    tuesday = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC)  # a Tuesday, an odd day
    assert tuesday.weekday() == 1
    assert cron_matches(expr, tuesday) is fires_on_a_tuesday


def test_a_window_without_verdict_keeps_an_active_fallbacks_reason() -> None:
    """Renamed MetricsUnavailable, a breach under sparse calls read as a new one every other
    window; only an inactive fallback says MetricsUnavailable."""
    for reason in ("SLOBreached", "Recovering"):
        on = FallbackState(True, 0, 1, reason)
        assert fallback_step(None, 1, on, 2, 3) == on
    off = FallbackState(False, 1, 0, "SLOAtRisk")
    assert fallback_step(None, 1, off, 2, 3) == FallbackState(False, 1, 0, "MetricsUnavailable")
