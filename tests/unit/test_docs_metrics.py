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
