"""What a platform engineer sees from kubectl: field documentation and the list columns.

`kubectl explain` reads the CRD's published OpenAPI, which the apiserver rebuilds a moment
after the CRD is established, so the explain checks wait for the documentation to appear.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("agenttask_crd")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tool-selection.yaml"


def explain(cluster: Any, field: str, expected: str, timeout: float = 60.0) -> str:
    """`kubectl explain FIELD` with whitespace collapsed, once its output contains `expected`."""
    deadline = time.monotonic() + timeout
    while True:
        result = cluster.kubectl("explain", field, check=False)
        text = " ".join(result.stdout.split())
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


@pytest.mark.parametrize(
    ("field", "phrases"),
    [
        pytest.param(
            "agenttask.spec.serving.slo",
            (
                "Service level objective of the SLM, checked from Prometheus metrics",
                "Target 95th-percentile latency of one SLM call, in milliseconds",
                "Default 500.",
                "targetQpsPerReplica",
            ),
            id="serving-slo",
        ),
        pytest.param(
            "agenttask.spec.evaluation.gate",
            (
                "Quality bar a candidate must pass to be promoted",
                "Non-inferiority margin (0 to 1): a candidate's score may be at most this much "
                "below the LLM's score on the same held-out calls.",
                "minScore",
            ),
            id="evaluation-gate",
        ),
        pytest.param(
            "agenttask.spec.fallback.policy.recoveryWindows",
            ("Consecutive healthy windows that turn fallback off again",),
            id="fallback-hysteresis",
        ),
        pytest.param(
            "agenttask",
            ("AgentTask turns one recurring, narrow kind of agent LLM call into a fine-tuned",),
            id="kind",
        ),
    ],
)
def test_explain_shows_field_documentation(
    cluster: Any, field: str, phrases: tuple[str, ...]
) -> None:
    text = explain(cluster, field, phrases[0])

    for phrase in phrases:
        assert phrase in text


def test_explain_finds_the_kind_by_short_name(cluster: Any) -> None:
    text = explain(cluster, "at.spec.candidates.method", "How to fine-tune.")

    assert "How to fine-tune." in text
    assert "qlora" in text


def test_get_shows_printer_columns(cluster: Any, namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(EXAMPLE))

    header = cluster.kubectl("get", "agenttasks", "-n", namespace).stdout.splitlines()[0]
    wide = cluster.kubectl("get", "at", "-n", namespace, "-o", "wide").stdout.splitlines()[0]

    # MODE by default, beside FALLBACK: in shadow and canary FALLBACK is False while the LLM
    # answers every call or most of them, which only MODE tells (reviewer C). SCORE went to
    # -o wide to keep the default row as narrow as it was.
    assert header.split() == ["NAME", "PHASE", "MODEL", "REPLICAS", "FALLBACK", "MODE", "AGE"]
    assert wide.split() == [
        "NAME",
        "PHASE",
        "MODEL",
        "SCORE",
        "REPLICAS",
        "FALLBACK",
        "MODE",
        "AGE",
        "REVISION",
    ]


def test_columns_show_status_written_through_the_status_subresource(
    cluster: Any, namespace: str
) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(EXAMPLE))
    status = {
        "status": {
            "phase": "Serving",
            "revision": {"active": "r3", "training": ""},
            "selectedModel": {"candidate": "smollm2-135m", "score": 0.93},
            "serving": {"readyReplicas": 2},
            "route": {"mode": "shadow"},
            "conditions": [
                {
                    "type": "FallbackActive",
                    "status": "False",
                    "reason": "WithinSLO",
                    "message": "p95 latency and error rate are within the SLO",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }
    }
    cluster.kubectl(
        "patch",
        "agenttask",
        "tool-selection",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )

    row = cluster.kubectl("get", "at", "tool-selection", "-n", namespace).stdout
    wide = cluster.kubectl("get", "at", "tool-selection", "-n", namespace, "-o", "wide").stdout
    values, wide_values = row.splitlines()[1].split(), wide.splitlines()[1].split()

    # A promoted model in shadow: not on fallback, yet the LLM answers: the row says both.
    assert values[:6] == ["tool-selection", "Serving", "smollm2-135m", "2", "False", "shadow"]
    assert wide_values[:7] == [
        "tool-selection",
        "Serving",
        "smollm2-135m",
        "0.93",
        "2",
        "False",
        "shadow",
    ]
    assert wide_values[-1] == "r3"


def test_category_lists_agenttasks(cluster: Any, namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(EXAMPLE))

    names = cluster.kubectl("get", "slmfleet", "-n", namespace, "-o", "name").stdout.split()

    assert names == ["agenttask.slmfleet.dev/tool-selection"]
