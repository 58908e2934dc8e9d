"""docs/metrics.md lists every metric the gateway and the trainer export.

The gateway's metric names are documented in the docstring of ``slm_gateway.metrics`` (the
source of truth, next to the code that registers them); the trainer's are in
``slm_trainer.progress``. A metric added there and not here fails this test.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "metrics.md").read_text()


def documented_in(path: Path, prefix: str) -> set[str]:
    doc = path.read_text().split('"""')[1]
    return set(re.findall(rf"``({prefix}[a-z_]+)", doc))


def test_every_gateway_metric_is_listed() -> None:
    names = documented_in(REPO / "operator" / "slm_gateway" / "metrics.py", "slm_gateway_")
    assert len(names) > 10
    missing = {m for m in names if f"`{m}`" not in DOC}
    assert not missing, f"add to docs/metrics.md: {sorted(missing)}"


def test_every_trainer_metric_is_listed() -> None:
    names = documented_in(REPO / "trainer" / "slm_trainer" / "progress.py", "slm_trainer_")
    assert "slm_trainer_progress_percent" in names
    missing = {m for m in names if f"`{m}`" not in DOC}
    assert not missing, f"add to docs/metrics.md: {sorted(missing)}"


def test_the_dashboard_queries_documented_metrics_of_one_namespace() -> None:
    """An AgentTask's name is unique only within its namespace: a query filtered by task alone
    sums two tasks of one name in different namespaces. Every series the Grafana dashboard
    selects is filtered by the `namespace` variable as well as `task`, and the `task` variable
    lists only the chosen namespace's tasks."""
    import json

    dash = json.loads(
        (REPO / "charts" / "slm-fleet-operator" / "dashboards" / "slm-fleet.json").read_text()
    )
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ns = variables["namespace"]
    assert ns["query"]["query"] == "label_values(slm_gateway_requests_total, namespace)"
    assert not ns.get("multi") and not ns.get("includeAll"), 'namespace="$namespace" needs one'
    assert variables["task"]["query"]["query"] == (
        'label_values(slm_gateway_requests_total{namespace="$namespace"}, task)'
    )
    names = documented_in(REPO / "operator" / "slm_gateway" / "metrics.py", "slm_gateway_")
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 9
    for expr in exprs:
        selectors = re.findall(r"(slm_gateway_[a-z_]+)(\{[^}]*\})?", expr)
        assert selectors, expr
        for metric, labels in selectors:
            assert re.sub(r"_(bucket|sum|count)$", "", metric) in names, metric
            assert 'namespace="$namespace"' in labels and 'task="$task"' in labels, expr
