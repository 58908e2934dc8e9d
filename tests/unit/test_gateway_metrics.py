"""The gateway's lock-free per-call metrics export exactly what prometheus_client's own
Counter and Histogram would for the same observations."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from slm_gateway.metrics import LATENCY_BUCKETS, GatewayMetrics

LABELS = ["namespace", "task", "backend"]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but the ``_created`` timestamps, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


# Bucket bounds themselves (a bucket is "less than or equal"), between them, and past the last.
LATENCIES = [0.0, 0.001, 0.0011, 0.0025, 0.04, 0.05, 1.0, 59.9, 60.0, 61.0, 1e6]


def test_served_calls_export_like_prometheus_client_metrics() -> None:
    ours = GatewayMetrics()
    ref = CollectorRegistry()
    requests = Counter("slm_gateway_requests", "", LABELS, registry=ref)
    duration = Histogram(
        "slm_gateway_request_duration_seconds", "", LABELS, buckets=LATENCY_BUCKETS, registry=ref
    )
    tokens = Counter("slm_gateway_tokens", "", [*LABELS, "kind"], registry=ref)
    cost = Counter("slm_gateway_cost_usd", "", LABELS, registry=ref)
    equivalent = Counter("slm_gateway_llm_equivalent_cost_usd", "", LABELS[:2], registry=ref)
    for i, seconds in enumerate(LATENCIES):
        for key in (("team-a", "weather", "llm"), ("team-b", "weather", "slm"), ("", "x", "llm")):
            ours.served(*key).observe(seconds, i, 2 * i, 0.5 * i, 0.25 * i)
            requests.labels(*key).inc()
            duration.labels(*key).observe(seconds)
            tokens.labels(*key, "prompt").inc(i)
            tokens.labels(*key, "completion").inc(2 * i)
            cost.labels(*key).inc(0.5 * i)
            equivalent.labels(*key[:2]).inc(0.25 * i)
    want = samples(ref)
    names = {name for name, _ in want}
    assert {k: v for k, v in samples(ours.registry).items() if k[0] in names} == want


def test_attempts_export_like_prometheus_client_metrics() -> None:
    ours = GatewayMetrics()
    ref = CollectorRegistry()
    calls = Counter("slm_gateway_backend_calls", "", [*LABELS, "result"], registry=ref)
    duration = Histogram(
        "slm_gateway_backend_duration_seconds", "", LABELS, buckets=LATENCY_BUCKETS, registry=ref
    )
    for seconds in LATENCIES:
        for result in ("ok", "timeout"):
            ours.attempt("team-a", "weather", "slm", result, seconds)
            calls.labels("team-a", "weather", "slm", result).inc()
            duration.labels("team-a", "weather", "slm").observe(seconds)
    want = samples(ref)
    names = {name for name, _ in want}
    assert {k: v for k, v in samples(ours.registry).items() if k[0] in names} == want


def test_the_exposition_has_the_documented_names_and_a_created_timestamp() -> None:
    m = GatewayMetrics()
    m.served("team-a", "weather", "llm").observe(0.01, 10, 2, 0.1, 0.1)
    m.attempt("team-a", "weather", "llm", "ok", 0.01)
    text = generate_latest(m.registry).decode()
    for name in (
        "slm_gateway_requests_total",
        "slm_gateway_requests_created",
        "slm_gateway_request_duration_seconds_bucket",
        "slm_gateway_request_duration_seconds_count",
        "slm_gateway_request_duration_seconds_created",
        "slm_gateway_backend_calls_total",
        "slm_gateway_backend_duration_seconds_sum",
        "slm_gateway_tokens_total",
        "slm_gateway_cost_usd_total",
        "slm_gateway_llm_equivalent_cost_usd_total",
    ):
        assert f"\n{name}{{" in text, name
    assert 'namespace="team-a"' in text


@pytest.mark.parametrize("seconds", LATENCIES)
def test_a_latency_lands_in_the_first_bucket_not_below_it(seconds: float) -> None:
    m = GatewayMetrics()
    m.served("", "t", "llm").observe(seconds, 0, 0, 0.0, 0.0)
    buckets = m.served("", "t", "llm").duration.buckets()
    for le, count in buckets:
        assert count == (1.0 if le == "+Inf" or seconds <= float(le) else 0.0), le
