"""docs/agenttask-reference.md is exactly what scripts/gen_crd_reference.py renders from the CRD.

So the reference cannot drift from the schema the API server enforces: change the CRD, and
this test fails until the reference is generated again. Also: the CRD's schedule rule admits
what the operator can run and refuses what it cannot.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from slm_operator.live import cron_problem

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


def _spec_description(*path: str) -> str:
    """The CRD's description of the spec field at ``path``, in one line."""
    crd = yaml.safe_load((REPO / "crds" / "slmfleet.dev_agenttasks.yaml").read_text())
    field = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name in path:
        field = field.get("items", field)["properties"][name]
    return " ".join(field["description"].split())


def test_pii_scrubbing_says_which_parts_of_a_call_are_scrubbed() -> None:
    """It promised personal data gone "from the logged calls before any model sees them",
    but tool definitions are kept as logged (the agent developer's code, which the model
    must see verbatim): an address in one reaches the training data."""
    import json

    from slm_contract import CallRecord
    from slm_trainer.redact import default_redactor

    email = "jane.doe@example.com"
    tools = [{"type": "function", "function": {"name": "send", "description": f"From {email}"}}]
    call = {"id": "c", "type": "function", "function": {"name": "send", "arguments": "{}"}}
    call["function"]["arguments"] = json.dumps({"to": email})
    record = CallRecord(
        task="t",
        backend="llm",
        tools=tools,
        messages=[{"role": "user", "content": f"mail {email}"}],
        response={"role": "assistant", "content": None, "tool_calls": [call]},
    )
    scrubbed, _ = default_redactor().redact_record(record)
    assert email not in json.dumps([scrubbed.messages, scrubbed.response])
    assert scrubbed.tools == tools
    text = _spec_description("dataset", "piiScrubbing")
    assert "messages, tool-call arguments, tool results and answers" in text
    assert "Tool definitions (tools, written by the agent's developer) are kept as they are" in text


def test_max_seq_length_says_what_each_training_path_does_with_a_longer_example() -> None:
    """It said "longer examples are truncated", which only a selector does: a causal LM
    leaves them out of training (test_generative counts them in its result)."""
    text = _spec_description("candidates", "maxSeqLength")
    assert "truncated" not in text
    assert (
        "A selector (an encoder base model, or any model on a classification task) truncates"
        in text
    )
    assert "A causal LM leaves a longer example out of training" in text


def _schedule_rule() -> re.Pattern[str]:
    """The RE2 pattern of spec.retraining.schedule's CEL rule, as Python's re (the rule uses
    only syntax both share: classes, groups, alternation, repetition, (?i:...))."""
    crd = yaml.safe_load((REPO / "crds" / "slmfleet.dev_agenttasks.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    (rule,) = spec["properties"]["retraining"]["properties"]["schedule"]["x-kubernetes-validations"]
    found = re.fullmatch(r"self\.matches\('([^']*)'\)", rule["rule"])
    assert found is not None, rule["rule"]
    return re.compile(found.group(1))


@pytest.mark.parametrize(
    "schedule",
    ["0 3 * * 0", "0 3 * * SUN", "0 3 * * mon-fri", "*/15 * * * *", "0 9-17 1,15 JAN-jun 1-5/2"],
)
def test_admission_takes_a_schedule_the_operator_runs(schedule: str) -> None:
    assert _schedule_rule().search(schedule)
    assert cron_problem(schedule) is None


@pytest.mark.parametrize(
    "schedule",
    [
        "*/0 * * * *",
        "0 3 * * FOO",
        "60 * * * *",
        "0 24 * * *",
        "0 3 * SUN *",
        "0 3 * *",
        "*/ * * * *",
    ],
)
def test_admission_refuses_a_schedule_the_operator_cannot_run(schedule: str) -> None:
    assert not _schedule_rule().search(schedule)
    assert cron_problem(schedule) is not None


def test_the_chart_ships_the_same_crd() -> None:
    chart = REPO / "charts" / "slm-fleet-operator" / "crds" / "slmfleet.dev_agenttasks.yaml"
    assert chart.read_text() == (REPO / "crds" / "slmfleet.dev_agenttasks.yaml").read_text()
