"""The operator's PromQL: one task's gateway series, scoped to its namespace when known."""

from __future__ import annotations

import re

from slm_operator.prom import queries

GATEWAY_SELECTOR = re.compile(r"slm_gateway_\w+\{([^}]*)\}")


def test_with_a_namespace_every_gateway_selector_names_it_and_the_task() -> None:
    for name, q in queries("weather", "30s", "60s", namespace="team-a").items():
        selectors = GATEWAY_SELECTOR.findall(q)
        if name == "queue_ms":
            assert not selectors  # Triton's series, by model
            continue
        assert selectors, name
        for sel in selectors:
            assert sel.startswith('namespace="team-a",task="weather"'), (name, sel)


def test_without_a_namespace_the_selectors_match_the_task_in_any_namespace() -> None:
    for q in queries("weather", "30s", "60s").values():
        for sel in GATEWAY_SELECTOR.findall(q):
            assert "namespace" not in sel
            assert sel.startswith('task="weather"')


def test_the_slm_error_rate_selects_the_slm_backend_and_error_results() -> None:
    q = queries("weather", "30s", "60s", namespace="team-a")["error_rate"]
    assert (
        'slm_gateway_backend_calls_total{namespace="team-a",task="weather",backend="slm",'
        'result=~"error|timeout|bad_output"}[30s]' in q
    )
