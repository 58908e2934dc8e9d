"""The chart's RBAC is enough for the operator's whole flow, and no more than that.

The chart is rendered with the locally built helm, applied to the real control plane, and the
operator then runs as a local process authenticated with the chart's ServiceAccount token
(pods do not run on kwok's fake nodes), taking an AgentTask all the way to Ready.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_operator import agenttask, get_task, revision, run_revision, storage  # noqa: F401

from slm_e2e.binaries import locate
from slm_e2e.testing import ClusterHandle, OperatorProcess

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "charts" / "slm-fleet-operator"


def helm_template(namespace: str, *sets: str) -> list[dict]:
    helm = locate(("helm",)).helm
    out = subprocess.run(
        [
            str(helm),
            "template",
            namespace,
            str(CHART),
            "-n",
            namespace,
            "--kube-version",
            "1.36.3",
            *[x for s in sets for x in ("--set", s)],
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture
def operator_sa(
    cluster: ClusterHandle, namespace: str, agenttask_crd: Path, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    """Install the chart's ServiceAccount and RBAC; yield (service account, kubeconfig)."""
    docs = [
        d
        for d in helm_template(namespace, f"watchNamespaces={{{namespace}}}")
        if d["kind"]
        in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    cluster.apply(docs)
    sa = next(
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith("-operator")
    )
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    kc = {
        **admin,
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [
            {
                "name": admin["current-context"],
                "context": {
                    "cluster": admin["clusters"][0]["name"],
                    "user": "operator",
                    "namespace": namespace,
                },
            }
        ],
    }
    path = tmp_path / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    yield sa, str(path)
    for d in docs:
        if d["kind"].startswith("Cluster"):
            cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], check=False)


def can_i(cluster: ClusterHandle, sa: str, ns: str, *args: str) -> bool:
    cp = cluster.kubectl(
        "auth", "can-i", *args, f"--as=system:serviceaccount:{ns}:{sa}", check=False
    )
    return cp.stdout.strip() == "yes"


def test_chart_rbac_is_minimal(
    cluster: ClusterHandle, namespace: str, operator_sa: tuple[str, str]
) -> None:
    sa, _ = operator_sa
    ns = namespace
    allowed = [
        ("create", "jobs.batch"),
        ("patch", "agenttasks.slmfleet.dev", "--subresource=status"),
        ("watch", "pods"),
        ("patch", "deployments.apps"),
        ("create", "events"),
    ]
    for verb, res, *extra in allowed:
        assert can_i(cluster, sa, ns, verb, res, *extra, "-n", ns), f"{verb} {res} denied"
    denied = [
        ("list", "secrets", "-n", ns),
        ("get", "secrets", "-n", ns),
        ("list", "secrets", "--all-namespaces"),
        ("create", "jobs.batch", "-n", "default"),  # only the watched namespace
        ("delete", "deployments.apps", "-n", ns),
        ("update", "agenttasks.slmfleet.dev", "-n", ns),
        ("delete", "pods", "-n", ns),
        ("create", "pods", "-n", ns),
        ("*", "*", "-n", ns),
        ("create", "clusterrolebindings"),
    ]
    for verb, res, *where in denied:
        assert not can_i(cluster, sa, ns, verb, res, *where), f"{verb} {res} {where} allowed"
    rendered = yaml.safe_dump_all(helm_template(ns))
    assert "'*'" not in rendered and '"*"' not in rendered


def test_operator_with_only_the_chart_rbac_reaches_ready(
    cluster: ClusterHandle,
    namespace: str,
    operator_sa: tuple[str, str],
    storage: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    _, kubeconfig = operator_sa
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "op.log").start()
    try:
        cluster.apply(agenttask(), namespace)
        rev = revision(cluster, namespace)
        run_revision(cluster, namespace, rev)
        cluster.kubectl(
            "wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s", "agenttask/weather"
        )
        assert get_task(cluster, namespace)["status"]["selectedModel"]["candidate"] == "big"
        assert "Forbidden" not in op.log() and "forbidden" not in op.log()
    finally:
        cluster.kubectl(
            "delete", "agenttasks", "--all", "-n", namespace, "--wait=false", check=False
        )
        op.stop()
