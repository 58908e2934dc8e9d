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


def _quickstart() -> tuple[str, str, set[str]]:
    """The README quickstart's namespace, capture claim and the Secrets the gateway may read."""
    readme = (REPO / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart on a real cluster") :]
    namespace = re.search(r"kubectl create namespace (\S+)", quickstart)
    claim = re.search(r"gateway\.capture\.existingClaim=(\S+)", quickstart)
    secrets = re.search(r"gateway\.llmApiKeySecrets='\{([^}]*)\}'", quickstart)
    assert namespace and claim and secrets
    return namespace.group(1), claim.group(1), set(secrets.group(1).split(","))


def test_every_example_the_notes_tell_to_apply_works_on_the_quickstart_install() -> None:
    """NOTES.txt once said `kubectl apply -f examples/`: three of the four tasks then read
    folders (or a bucket) the gateway never writes, or a Secret it may not read, and waited
    for data (or fell back to nothing) forever. Each example NOTES names in an apply command
    must read exactly where the chart's gateway captures it (<claim>/<subPath>/<namespace>/
    <task>/, claim and namespace those of the quickstart install NOTES detects) and name only
    Secrets in the quickstart's gateway.llmApiKeySecrets."""
    notes = (REPO / "charts" / "slm-fleet-operator" / "templates" / "NOTES.txt").read_text()
    values = yaml.safe_load((REPO / "charts" / "slm-fleet-operator" / "values.yaml").read_text())
    subpath = values["gateway"]["capture"]["subPath"].strip("/")
    namespace, claim, secrets = _quickstart()
    # The install NOTES recognises as the quickstart is the README's.
    assert f'(eq .Release.Namespace "{namespace}")' in notes
    assert f'(eq $claim "{claim}")' in notes
    assert all(f'(has "{s}" $g.llmApiKeySecrets)' in notes for s in secrets)
    applied: list[str] = []
    for line in notes.splitlines():
        if re.search(r"kubectl\b.*\bapply\b", line):
            assert not re.search(r"-f\s+examples/?(\s|$)", line), f"applies a folder: {line}"
            assert f"-n {namespace} " in line, line
            applied += re.findall(r"-f\s+examples/([\w.-]+\.yaml)", line)
    assert "tool-selection.yaml" in applied
    for name in applied:
        task = yaml.safe_load((REPO / "examples" / name).read_text())
        uri = task["spec"]["dataset"]["uri"]
        assert uri.rstrip("/") == (
            f"pvc://{claim}/{subpath}/{namespace}/{task['metadata']['name']}"
        ), f"{name}: {uri} is not where the gateway captures it"
        ref = task["spec"]["fallback"]["llm"].get("apiKeySecretRef")
        assert ref is None or ref["name"] in secrets, f"{name}: the gateway may not read {ref}"
        assert "serviceAccountName" not in task["spec"].get("training", {}), name


def test_every_example_reads_the_gateway_capture_and_says_what_it_needs() -> None:
    """Examples NOTES does not apply are templates: their header comment names what they need
    beyond the quickstart (a Secret, and that it must be in gateway.llmApiKeySecrets), and
    their data is still the gateway's capture, so only that is left to change."""
    values = yaml.safe_load((REPO / "charts" / "slm-fleet-operator" / "values.yaml").read_text())
    subpath = values["gateway"]["capture"]["subPath"].strip("/")
    namespace, claim, secrets = _quickstart()
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        text = path.read_text()
        header = text[: text.index("apiVersion:")]
        task = yaml.safe_load(text)
        name = task["metadata"]["name"]
        uri = task["spec"]["dataset"]["uri"]
        assert uri.rstrip("/") == f"pvc://{claim}/{subpath}/{namespace}/{name}", (path.name, uri)
        assert namespace in header and claim in header, f"{path.name}: header names no install"
        ref = task["spec"]["fallback"]["llm"].get("apiKeySecretRef")
        if ref is not None:
            assert ref["name"] in header and "gateway.llmApiKeySecrets" in header, path.name
            if ref["name"] not in secrets:
                assert "create secret generic " + ref["name"] in header, path.name
