"""The quickstart's example fits together: the task reads what the chart's gateway writes.

Why: each piece (example AgentTask, storage manifest, chart defaults, README commands) can be
valid alone and still never meet: a PVC in another namespace, a capture folder the dataset
URI does not point at. Then a new task waits for data forever.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_the_quickstart_task_reads_the_folder_the_gateway_captures_it_to() -> None:
    task = yaml.safe_load((REPO / "examples" / "tool-selection.yaml").read_text())
    claims = {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all(
            (REPO / "examples" / "storage" / "quickstart-pvcs.yaml").read_text()
        )
    }
    values = yaml.safe_load((REPO / "charts" / "slm-fleet-operator" / "values.yaml").read_text())
    readme = (REPO / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart on a real cluster") :]
    namespace = re.search(r"kubectl create namespace (\S+)", quickstart)
    assert namespace is not None
    capture_claim = re.search(r"gateway\.capture\.existingClaim=(\S+)", quickstart)
    assert capture_claim is not None

    uri = task["spec"]["dataset"]["uri"]
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    assert claim == capture_claim.group(1) and claim in claims
    subpath = values["gateway"]["capture"]["subPath"].strip("/")
    # The gateway captures to <claim>/<subPath>/<namespace>/<task>/.
    assert path.rstrip("/") == f"{subpath}/{namespace.group(1)}/{task['metadata']['name']}"
    assert task["spec"]["storage"]["claimName"] in claims
    for doc in claims.values():
        assert doc["kind"] == "PersistentVolumeClaim"
        assert doc["spec"]["accessModes"] == ["ReadWriteMany"]
    # The Secret the quickstart creates is the one the task names.
    secret = task["spec"]["fallback"]["llm"]["apiKeySecretRef"]["name"]
    assert f"create secret generic {secret} " in quickstart
    assert f"llmApiKeySecrets='{{{secret}}}'" in quickstart
