"""docs/agenttask-reference.md is exactly what scripts/gen_crd_reference.py renders from the CRD.

So the reference cannot drift from the schema the API server enforces: change the CRD, and
this test fails until the reference is generated again.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[2]


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_crd_reference", REPO / "scripts" / "gen_crd_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_up_to_date() -> None:
    gen = generator()
    want = gen.render(yaml.safe_load(gen.CRD.read_text()))
    have = (REPO / "docs" / "agenttask-reference.md").read_text()
    assert have == want, (
        "docs/agenttask-reference.md is stale: run .venv/bin/python scripts/gen_crd_reference.py"
    )


def test_reference_lists_every_spec_field_with_its_default() -> None:
    gen = generator()
    crd = yaml.safe_load(gen.CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = (REPO / "docs" / "agenttask-reference.md").read_text()
    rows = {
        line.split(" | ")[0].strip("| `"): line
        for line in text.splitlines()
        if line.startswith("| `spec.")
    }
    for path, field, _ in gen.fields(schema["properties"]["spec"], "spec"):
        if path == "spec":
            continue
        assert path in rows, f"{path} is missing from the reference"
        if "default" in field:
            assert f"`{gen.json.dumps(field['default'])}`" in rows[path], path
    assert rows["spec.fallback.policy.windowSeconds"].count("1 ≤ x ≤ 3600") == 1
    assert "immutable" in rows["spec.taskType"]
