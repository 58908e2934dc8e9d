"""Admission of AgentTask manifests by a real kube-apiserver.

The CRD's schema and CEL rules are the first thing a platform engineer meets: a bad manifest
must fail at `kubectl apply` (or Argo CD sync) with a message that says what to fix, and a
good one must come back with every default filled in, so the operator reads a complete spec.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("agenttask_crd")]

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))

DELETE = object()
"""Sentinel for `mutated`: remove the key instead of setting it."""


def valid_agenttask(name: str = "tool-selection") -> dict[str, Any]:
    """A minimal valid AgentTask: only required fields, so the server must fill the rest."""
    return {
        "apiVersion": "slmfleet.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"uri": "pvc://call-logs/support-agent/tool-selection.jsonl"},
            "candidates": [
                {"name": "smollm2-135m", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                {"name": "qwen25-05b", "model": "Qwen/Qwen2.5-0.5B-Instruct", "method": "lora"},
            ],
            "storage": {"claimName": "slm-fleet-artifacts"},
            "evaluation": {"metric": "tool-call-ast", "gate": {"maxDropVsLLM": 0.03}},
            "fallback": {
                "llm": {"baseURL": "https://api.openai.com/v1", "model": "gpt-4o"},
            },
        },
    }


def mutated(manifest: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Deep-copy `manifest` and apply `changes`, keyed by dotted paths ("spec.candidates.0.name").

    A value of DELETE removes the key; integer path parts index lists; missing objects on the
    way are created.
    """
    result = copy.deepcopy(manifest)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node: Any = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value
    return result


def apply(cluster: Any, namespace: str, manifest: dict[str, Any], *extra: str) -> Any:
    return cluster.kubectl(
        "apply",
        "--server-side",
        "-n",
        namespace,
        *extra,
        "-f",
        "-",
        input=yaml.safe_dump(manifest),
        check=False,
    )


BASE = valid_agenttask()
DATASET_URI_MESSAGE = (
    "dataset.uri must be pvc://<claim>/<path>, s3://<bucket>/<key>, gs://<bucket>/<key> or "
    "file:///<absolute path>"
)
CRON_MESSAGE = "retraining.schedule must be a 5-field cron expression"
REPLICAS_MESSAGE = "serving.minReplicas must be less than or equal to serving.maxReplicas"
BASE_URL_MESSAGE = "fallback.llm.baseURL must be an http:// or https:// URL"


def case(case_id: str, changes: dict[str, Any], *fragments: str) -> Any:
    """One invalid manifest: BASE with `changes`, and what kubectl's stderr must contain."""
    return pytest.param(mutated(BASE, changes), fragments, id=case_id)


NINE_CANDIDATES = [
    {"name": f"c{i}", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"} for i in range(9)
]

INVALID = [
    case(
        # Kubernetes' Job controller overflows on such a limit and fails the Job at once;
        # the operator then took it for a raised limit and created the Job again, forever
        "job-time-limit-past-what-a-job-can-hold",
        {"spec.training.activeDeadlineSeconds": 9999999999},
        "spec.training.activeDeadlineSeconds",
        "should be less than or equal to 31536000",
    ),
    case(
        "negative-llm-price",
        {"spec.fallback.llm.price": {"prompt": -0.001, "completion": 0.01}},
        "spec.fallback.llm.price.prompt",
        "should be greater than or equal to 0",
    ),
    case(
        "llm-price-without-completion",
        {"spec.fallback.llm.price": {"prompt": 0.001}},
        "spec.fallback.llm.price.completion",
        "Required value",
    ),
    case(
        "min-replicas-above-max",
        {"spec.serving": {"minReplicas": 5, "maxReplicas": 2}},
        REPLICAS_MESSAGE,
    ),
    case(
        "min-replicas-above-default-max",
        {"spec.serving": {"minReplicas": 5}},
        REPLICAS_MESSAGE + " (4 when not set)",  # the default the user never wrote
    ),
    case(
        "slm-budget-below-the-latency-target",
        {"spec.serving.slo": {"slmTimeoutMs": 100}},  # p95LatencyMs defaults to 500
        "serving.slo.slmTimeoutMs must be at least serving.slo.p95LatencyMs (500 when not set)",
    ),
    case(
        "max-examples-below-min-examples",
        {"spec.dataset.minExamples": 500, "spec.dataset.maxExamples": 400},
        "dataset.maxExamples must be at least dataset.minExamples",
    ),
    case(
        "max-examples-below-default-min-examples",
        {"spec.dataset.maxExamples": 100},  # minExamples defaults to 200
        "dataset.maxExamples must be at least dataset.minExamples",
    ),
    # without a zone the cutoff would depend on the data-prep pod's clock zone
    *(
        case(
            f"not-before-{name}",
            {"spec.dataset.notBefore": bad},
            "spec.dataset.notBefore in body must be of type date-time",
        )
        for name, bad in (
            ("without-a-zone", "2026-03-01T00:00:00"),
            ("a-date-alone", "2026-03-01"),
            ("in-words", "last tuesday"),
        )
    ),
    # date-times format: date-time admits that the data-prep Job could not read (it exited 2)
    *(
        case(
            f"not-before-{name}",
            {"spec.dataset.notBefore": bad},
            "spec.dataset.notBefore in body should match",
        )
        for name, bad in (
            ("comma-fraction", "2026-03-01T00:00:00,5Z"),
            ("zone-past-a-day", "2026-03-01T00:00:00+99:59"),
        )
    ),
    case(
        "empty-gate",
        {"spec.evaluation.gate": {}},
        "evaluation.gate needs minScore, maxDropVsLLM or both",
    ),
    case(
        "no-candidates", {"spec.candidates": []}, "spec.candidates", "should have at least 1 items"
    ),
    case(
        "too-many-candidates",
        {"spec.candidates": NINE_CANDIDATES},
        "spec.candidates",
        "must have at most 8 items",
    ),
    case(
        "qlora-without-gpu",
        {"spec.candidates.1.method": "qlora", "spec.training": {"gpus": 0}},
        "qlora needs a GPU: set training.gpus >= 1, or use method lora or full",
    ),
    case(
        "dataset-uri-https",
        {"spec.dataset.uri": "https://logs.example.com/calls.jsonl"},
        DATASET_URI_MESSAGE,
    ),
    case(
        "dataset-uri-pvc-without-path", {"spec.dataset.uri": "pvc://call-logs"}, DATASET_URI_MESSAGE
    ),
    case(
        "base-url-ftp", {"spec.fallback.llm.baseURL": "ftp://llm.example.com/v1"}, BASE_URL_MESSAGE
    ),
    case(
        "base-url-without-scheme",
        {"spec.fallback.llm.baseURL": "api.openai.com/v1"},
        BASE_URL_MESSAGE,
    ),
    case(
        "base-url-trailing-space",
        {"spec.fallback.llm.baseURL": "https://api.openai.com/v1 "},
        "fallback.llm.baseURL must not contain spaces",
    ),
    case(
        "base-url-fragment",
        {"spec.fallback.llm.baseURL": "https://api.openai.com/v1#chat"},
        "fallback.llm.baseURL must not have a #fragment",
    ),
    case(
        "base-url-port-out-of-range",
        {"spec.fallback.llm.baseURL": "https://api.openai.com:99999/v1"},
        "fallback.llm.baseURL's port must be between 1 and 65535",
    ),
    case(
        "base-url-user-info",
        {"spec.fallback.llm.baseURL": "https://bob:hunter2@llm.example.com/v1"},
        "fallback.llm.baseURL must not carry user info",
    ),
    # Whole numbers against fractional bounds: the schema alone passed 0 (kube-openapi
    # compares a whole number with the bound truncated to an integer) and refused 1 as "less
    # than or equal to 0"; the CEL rules say the real range.
    case(
        "eval-fraction-zero",
        {"spec.dataset.evalFraction": 0},
        "dataset.evalFraction must be between 0.05 and 0.5",
    ),
    case(
        "eval-fraction-one",
        {"spec.dataset.evalFraction": 1},
        "dataset.evalFraction must be between 0.05 and 0.5",
    ),
    case(
        "target-precision-zero",
        {"spec.evaluation.targetPrecision": 0},
        "evaluation.targetPrecision must be between 0.5 and 1",
    ),
    case(
        "lora-dropout-one",
        {"spec.candidates.1.lora": {"dropout": 1}},
        "lora.dropout must be between 0 and 0.9",
    ),
    # What the API server would refuse on the trainer Jobs or the Triton Deployment, refused
    # here instead: the task would otherwise be admitted and stall at ApplyFailed.
    case(
        "trainer-account-invalid",
        {"spec.training.serviceAccountName": "Bad_Name"},
        "spec.training.serviceAccountName",
        "should match",
    ),
    case(
        "trainer-image-blank",
        {"spec.training.image": ""},
        "spec.training.image",
        "should be at least 1 chars long",
    ),
    case(
        "serving-image-with-space",
        {"spec.serving": {"image": "ghcr.io/x/triton:1 "}},
        "spec.serving.image",
        "should match",
    ),
    case(
        "negative-cpu-string",
        {"spec.training.resources": {"requests": {"cpu": "-1"}}},
        "spec.training.resources.requests.cpu",
    ),
    case(
        "negative-cpu-integer",
        {"spec.serving": {"resources": {"limits": {"cpu": -2}}}},
        "resource quantities must not be negative",
    ),
    case(
        "request-above-limit",
        {"spec.training.resources": {"requests": {"memory": "64Gi"}, "limits": {"memory": "48Gi"}}},
        "a resource's request must not be greater than its limit",
    ),
    case(
        "gpus-in-resources",
        {"spec.serving": {"resources": {"requests": {"nvidia.com/gpu": "2"}}}},
        "set GPUs with the gpus field, not as nvidia.com/gpu in resources",
    ),
    case(
        "node-selector-bad-key",
        {"spec.training.nodeSelector": {"bad key!": "x"}},
        "every nodeSelector key must be a label key",
    ),
    case(
        "node-selector-bad-value",
        {"spec.serving": {"nodeSelector": {"pool": "x y"}}},
        "spec.serving.nodeSelector.pool",
        "should match",
    ),
    case(
        "toleration-exists-with-value",
        {"spec.training.tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]},
        "a toleration with operator Exists must not have a value",
    ),
    case(
        "toleration-without-key-equal",
        {"spec.serving": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
        "a toleration without a key must have operator Exists",
    ),
    case(
        "toleration-seconds-without-no-execute",
        {
            "spec.training.tolerations": [
                {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}
            ]
        },
        "tolerationSeconds needs effect NoExecute",
    ),
    case(
        "min-examples-above-the-default-max",
        {"spec.dataset.minExamples": 200000},
        "dataset.minExamples above 100000 needs dataset.maxExamples",
    ),
    case(
        "blank-model",
        {"spec.candidates.0.model": "   "},
        "spec.candidates[0].model",
        "should match",
    ),
    case(
        "llm-key-secret-name-invalid",
        {"spec.fallback.llm.apiKeySecretRef": {"name": "Bad_Name"}},
        "spec.fallback.llm.apiKeySecretRef.name",
        "should match",
    ),
    case(
        "llm-key-secret-key-invalid",
        {"spec.fallback.llm.apiKeySecretRef": {"name": "openai", "key": "a/b"}},
        "spec.fallback.llm.apiKeySecretRef.key",
        "should match",
    ),
    case(
        "unknown-task-type",
        {"spec.taskType": "summarisation"},
        "spec.taskType",
        'Unsupported value: "summarisation"',
    ),
    case(
        "unknown-metric",
        {"spec.evaluation.metric": "bleu"},
        "spec.evaluation.metric",
        'Unsupported value: "bleu"',
    ),
    case(
        "tool-call-ast-for-classification",
        {"spec.taskType": "classification"},
        "evaluation.metric tool-call-ast only applies to taskType tool-call",
    ),
    case(
        "label-accuracy-for-extraction",
        {"spec.taskType": "extraction", "spec.evaluation.metric": "label-accuracy"},
        "evaluation.metric label-accuracy only applies to taskType classification or tool-call",
    ),
    case(
        "duplicate-candidate-names",
        {"spec.candidates.1.name": "smollm2-135m"},
        "spec.candidates",
        "smollm2-135m",
        "duplicate entries for key",
    ),
    case(
        "candidate-name-uppercase",
        {"spec.candidates.0.name": "SmolLM2"},
        "spec.candidates[0].name",
        "should match",
    ),
    case(
        "candidate-name-too-long",
        {"spec.candidates.0.name": "smollm2-135m-instruct-v2"},
        "spec.candidates[0].name",
        "Too long",
    ),
    case(
        "eval-fraction-too-high",
        {"spec.dataset.evalFraction": 0.9},
        "spec.dataset.evalFraction",
        "should be less than or equal to 0.5",
    ),
    case(
        "negative-training-gpus",
        {"spec.training": {"gpus": -1}},
        "spec.training.gpus",
        "should be greater than or equal to 0",
    ),
    case(
        "zero-learning-rate",
        {"spec.candidates.0.learningRate": 0},
        "spec.candidates[0].learningRate",
        "should be greater than 0",
    ),
    case(
        "zero-lora-rank",
        {"spec.candidates.0.lora": {"r": 0}},
        "spec.candidates[0].lora.r",
        "should be greater than or equal to 1",
    ),
    case(
        "gate-drop-above-one",
        {"spec.evaluation.gate.maxDropVsLLM": 1.5},
        "spec.evaluation.gate.maxDropVsLLM",
        "should be less than or equal to 1",
    ),
    case(
        "target-precision-below-half",
        {"spec.evaluation.targetPrecision": 0.3},
        "spec.evaluation.targetPrecision",
        "should be greater than or equal to 0.5",
    ),
    case(
        "calibration-one-fold",
        {"spec.evaluation.calibrationFolds": 1},
        "spec.evaluation.calibrationFolds",
        "must be 0 (calibrate on held-out calls) or 2 to 10",
    ),
    case("missing-storage", {"spec.storage": DELETE}, "spec.storage: Required value"),
    case(
        "missing-fallback-llm-model",
        {"spec.fallback.llm.model": DELETE},
        "spec.fallback.llm.model: Required value",
    ),
    case("cron-schedule-four-fields", {"spec.retraining": {"schedule": "0 3 * *"}}, CRON_MESSAGE),
    case(
        "cron-schedule-words", {"spec.retraining": {"schedule": "every sunday at 3"}}, CRON_MESSAGE
    ),
    case("cron-schedule-step-zero", {"spec.retraining": {"schedule": "*/0 * * * *"}}, CRON_MESSAGE),
    case("cron-schedule-minute-60", {"spec.retraining": {"schedule": "60 3 * * *"}}, CRON_MESSAGE),
    case(
        "cron-schedule-day-name-as-month",
        {"spec.retraining": {"schedule": "0 3 * SUN *"}},
        CRON_MESSAGE,
    ),
    case(
        "candidate-model-on-another-claim",
        {"spec.candidates.0.model": "pvc://other-claim/models/base"},
        "spec.candidates",
        "must be on storage.claimName",
    ),
    case(
        "candidate-model-on-s3",
        {"spec.candidates.0.model": "s3://models/base"},
        "spec.candidates[0].model",
        "no other URL scheme is read",
    ),
    case(
        "candidate-model-pvc-without-path",
        {"spec.candidates.0.model": "pvc://slm-fleet-artifacts/"},
        "spec.candidates[0].model",
        "pvc://<storage.claimName>/<path>",
    ),
    case("name-not-dns-1035", {"metadata.name": "1abc"}, "metadata.name: Invalid value"),
    case(
        "retraining-threshold-past-its-maximum",
        {"spec.retraining": {"minNewExamples": 200_000_000}},
        "spec.retraining.minNewExamples",
        "should be less than or equal to 100000000",
    ),
    case(
        "toleration-key-not-a-label-key",
        {"spec.training.tolerations": [{"key": "bad key!", "operator": "Exists"}]},
        "spec.training.tolerations[0].key",
        "a toleration key must be a label key",
    ),
    case(
        "toleration-value-not-a-label-value",
        {"spec.serving.tolerations": [{"key": "spot", "value": "bad value!"}]},
        "spec.serving.tolerations[0].value",
        "a toleration value must be",
    ),
    case(
        "resource-name-not-a-resource",
        {"spec.training.resources": {"requests": {"Not A Resource!": "1"}}},
        "spec.training.resources.requests",
        "every resource name must be",
    ),
    case(
        "extended-resource-without-its-limit",
        {"spec.serving.resources": {"requests": {"example.com/fpga": "1"}}},
        "spec.serving.resources",
        "needs a limit equal to it",
    ),
    # Admitted before, then refused by Kubernetes in every Job and the Deployment (for
    # serving.resources only once data prep, every fine-tune and export had run).
    case(
        "extended-resource-in-fractions",
        {
            "spec.serving.resources": {
                "requests": {"example.com/fpga": "500m"},
                "limits": {"example.com/fpga": "500m"},
            }
        },
        "spec.serving.resources.requests",
        "counted in whole units",
    ),
    case(
        "hugepages-alone",
        {"spec.training.resources": {"limits": {"hugepages-2Mi": "1Gi"}}},
        "spec.training.resources",
        "hugepages need a cpu or memory request or limit",
    ),
    case(
        "hugepages-of-no-size",
        {"spec.serving.resources": {"limits": {"memory": "2Gi", "hugepages-foo": "1Gi"}}},
        "spec.serving.resources.limits",
        "hugepages-<size> (such as hugepages-2Mi",
    ),
    case(
        "llm-port-too-long-to-be-a-number",
        {"spec.fallback.llm.baseURL": "http://llm.example.com:99999999999999999999/v1"},
        # the rule's message with the value, not CEL's "type conversion error" for "string"
        'baseURL: Invalid value: "http://llm.example.com:9999',
        "port must be between 1 and 65535",
    ),
    case(
        "unknown-toleration-operator",
        {"spec.serving.tolerations": [{"key": "nvidia.com/gpu", "operator": "In"}]},
        "spec.serving.tolerations[0].operator",
        'Unsupported value: "In"',
    ),
]


@pytest.mark.parametrize(("manifest", "fragments"), INVALID)
def test_invalid_agenttask_is_rejected_with_a_readable_message(
    cluster: Any, namespace: str, manifest: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    result = apply(cluster, namespace, manifest)

    assert result.returncode != 0, f"apiserver accepted an invalid AgentTask:\n{result.stdout}"
    for fragment in fragments:
        assert fragment in result.stderr


def test_valid_agenttask_is_stored_with_defaults(cluster: Any, namespace: str) -> None:
    result = apply(cluster, namespace, BASE)
    assert result.returncode == 0, result.stderr

    stored = json.loads(
        cluster.kubectl("get", "agenttask", "tool-selection", "-n", namespace, "-o", "json").stdout
    )
    spec = stored["spec"]
    assert spec["taskType"] == "tool-call"
    assert spec["dataset"]["minExamples"] == 200
    # No schema default: one would enter every stored spec, and the revision hash with it.
    assert "maxExamples" not in spec["dataset"]
    assert spec["dataset"]["evalFraction"] == 0.2
    assert spec["dataset"]["piiScrubbing"] is True
    assert spec["candidates"][0]["method"] == "lora"
    assert spec["candidates"][0]["epochs"] == 3
    assert spec["candidates"][0]["learningRate"] == 0.0002
    assert spec["candidates"][0]["maxSeqLength"] == 1024
    assert spec["training"]["gpus"] == 1
    # No image default either: unset, the task runs the operator's images (operator.trainerImage,
    # operator.tritonImage), which a cluster with its own registry sets once for every task.
    assert "image" not in spec["training"] and "image" not in spec["serving"]
    assert spec["training"]["activeDeadlineSeconds"] == 21600
    assert spec["training"]["backoffLimit"] == 2
    assert spec["evaluation"]["selectionPolicy"] == "smallest-passing"
    assert (spec["serving"]["minReplicas"], spec["serving"]["maxReplicas"]) == (1, 4)
    assert spec["serving"]["gpus"] == 1
    assert spec["serving"]["slo"] == {
        "p95LatencyMs": 500,
        "maxErrorRate": 0.01,
        "targetQpsPerReplica": 10,
    }
    assert spec["fallback"]["policy"] == {
        "windowSeconds": 30,
        "breachWindows": 3,
        "recoveryWindows": 5,
    }
    assert "retraining" not in spec


def test_lora_block_and_secret_ref_get_their_defaults(cluster: Any, namespace: str) -> None:
    manifest = mutated(
        BASE,
        {
            "spec.candidates.0.lora": {},
            "spec.fallback.llm.apiKeySecretRef": {"name": "openai-api-key"},
            "spec.retraining": {"schedule": "0 3 * * 0"},
        },
    )
    result = apply(cluster, namespace, manifest)
    assert result.returncode == 0, result.stderr

    spec = json.loads(
        cluster.kubectl("get", "agenttask", "tool-selection", "-n", namespace, "-o", "json").stdout
    )["spec"]
    assert spec["candidates"][0]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05}
    assert spec["fallback"]["llm"]["apiKeySecretRef"] == {
        "name": "openai-api-key",
        "key": "api-key",
    }
    assert spec["retraining"] == {
        "schedule": "0 3 * * 0",
        "enabled": True,
        "minNewExamples": 1000,
    }


@pytest.mark.parametrize("schedule", ["0 3 * * SUN", "0 3 * * mon-fri", "*/15 0-6 1,15 JAN-mar 7"])
def test_cron_names_ranges_and_steps_are_admitted(
    cluster: Any, namespace: str, schedule: str
) -> None:
    """What cron itself takes is admitted (the operator's own parser reads the same)."""
    manifest = mutated(BASE, {"spec.retraining": {"schedule": schedule}})
    result = apply(cluster, namespace, manifest)
    assert result.returncode == 0, result.stderr


def test_task_type_cannot_change_after_creation(cluster: Any, namespace: str) -> None:
    created = apply(cluster, namespace, BASE)
    assert created.returncode == 0, created.stderr

    # label-accuracy is valid for classification, so only the immutability rule can object.
    changed = mutated(
        BASE, {"spec.taskType": "classification", "spec.evaluation.metric": "label-accuracy"}
    )
    result = apply(cluster, namespace, changed)

    assert result.returncode != 0
    assert "taskType is immutable: create a new AgentTask for a different kind of task" in (
        result.stderr
    )
    stored = cluster.kubectl(
        "get",
        "agenttask",
        "tool-selection",
        "-n",
        namespace,
        "-o",
        "jsonpath={.spec.taskType}",
    ).stdout
    assert stored == "tool-call"


def test_other_fields_stay_mutable(cluster: Any, namespace: str) -> None:
    assert apply(cluster, namespace, BASE).returncode == 0

    result = apply(cluster, namespace, mutated(BASE, {"spec.serving": {"maxReplicas": 8}}))

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://call-logs/support-agent/",
        "pvc://call.logs/support-agent/calls.jsonl",  # a claim name may have dots
        "s3://agent-call-logs/triage/2026-01.jsonl",
        "gs://agent-call-logs/calls/support-agent/triage/",
        "file:///data/calls.jsonl",
    ],
)
def test_every_dataset_scheme_is_accepted(cluster: Any, namespace: str, uri: str) -> None:
    result = apply(cluster, namespace, mutated(BASE, {"spec.dataset.uri": uri}), "--dry-run=server")

    assert result.returncode == 0, result.stderr


POD_SETTINGS = {
    "resources": {
        "requests": {
            "cpu": "500m",
            "memory": "1Gi",
            "ephemeral-storage": 0,
            "example.com/fpga": 1,  # extended resources and hugepages: limit == request
            "hugepages-2Mi": "64Mi",
        },
        "limits": {"cpu": 4, "memory": "1Gi", "example.com/fpga": "1", "hugepages-2Mi": "64Mi"},
    },
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": ""},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"operator": "Exists"},  # every taint
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute"},
        {"key": "drain", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
    ],
}


@pytest.mark.parametrize("section", ["training", "serving"])
def test_pod_settings_a_pod_accepts_are_admitted(
    cluster: Any, namespace: str, section: str
) -> None:
    """The rules that refuse what a Job or Deployment would refuse leave every ordinary pod
    setting alone: quantities as strings and integers, a request equal to its limit, label
    keys with a DNS prefix, an empty label value, the usual GPU and spot tolerations."""
    changes: dict[str, Any] = {f"spec.{section}.{k}": v for k, v in POD_SETTINGS.items()}
    if section == "training":
        changes["spec.training.serviceAccountName"] = "s3-reader.team-a"
        changes["spec.candidates.1.model"] = "pvc://slm-fleet-artifacts/models/qwen25-05b"
    result = apply(cluster, namespace, mutated(BASE, changes), "--dry-run=server")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted(cluster: Any, namespace: str, path: Path) -> None:
    result = cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        str(path),
        check=False,
    )

    assert result.returncode == 0, result.stderr


def test_examples_cover_every_task_type() -> None:
    task_types = {yaml.safe_load(p.read_text())["spec"]["taskType"] for p in EXAMPLES}

    assert task_types == {"tool-call", "classification", "extraction", "generation"}


@pytest.mark.parametrize(
    "cutoff", ["2026-03-01T00:00:00Z", "2026-03-01T01:00:00.000+01:00", "2026-03-01t00:00:00z"]
)
def test_a_not_before_the_data_prep_job_reads_is_admitted(
    cluster: Any, namespace: str, cutoff: str
) -> None:
    """Every RFC 3339 date-time the apiserver admits, curate reads (the same cutoff)."""
    from slm_trainer.curate import Args

    result = apply(
        cluster, namespace, mutated(BASE, {"spec.dataset.notBefore": cutoff}), "--dry-run=server"
    )
    assert result.returncode == 0, result.stderr
    assert Args(input="x", output_dir=Path("y"), not_before=cutoff).cutoff == 1_772_323_200.0
