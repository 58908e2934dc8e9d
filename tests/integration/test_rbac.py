"""The chart's RBAC is enough for the operator's whole flow, and no more than that.

The chart is rendered with the locally built helm, applied to the real control plane, and the
operator then runs as a local process authenticated with the chart's ServiceAccount token
(pods do not run on kwok's fake nodes), taking an AgentTask all the way to Ready.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_operator import (  # noqa: F401
    agenttask,
    finetune_result,
    get_task,
    ok,
    revision,
    run_revision,
    storage,
)

from slm_e2e.binaries import locate
from slm_e2e.kubelet import complete_job, running_pod
from slm_e2e.testing import ClusterHandle, OperatorProcess, wait_for
from slm_operator import naming as n

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
        ("list", "events"),  # a Job's FailedCreate: why admission refused its pod
        ("get", "serviceaccounts"),  # does the trainer's exist before a Job names it
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
        ("patch", "pods", "-n", ns),
        ("list", "serviceaccounts", "-n", ns),
        ("create", "serviceaccounts", "-n", ns),
        ("create", "serviceaccounts/token", "-n", ns),
        ("create", "rolebindings", "-n", ns),
        ("*", "*", "-n", ns),
        ("create", "clusterrolebindings"),
    ]
    for verb, res, *where in denied:
        assert not can_i(cluster, sa, ns, verb, res, *where), f"{verb} {res} {where} allowed"
    rendered = yaml.safe_dump_all(helm_template(ns))
    assert "'*'" not in rendered and '"*"' not in rendered


def test_trainer_service_account_may_only_patch_pods_in_its_namespace(
    cluster: ClusterHandle, namespace: str, operator_sa: tuple[str, str]
) -> None:
    ns, trainer = namespace, f"{namespace}-trainer"
    assert can_i(cluster, trainer, ns, "patch", "pods", "-n", ns)
    denied = [
        ("get", "pods", "-n", ns),
        ("list", "pods", "-n", ns),
        ("create", "pods", "-n", ns),
        ("delete", "pods", "-n", ns),
        ("patch", "pods", "--subresource=status", "-n", ns),
        ("create", "pods/exec", "-n", ns),
        ("patch", "pods", "-n", "default"),
        ("patch", "pods", "--all-namespaces"),
        ("get", "secrets", "-n", ns),
        ("get", "agenttasks.slmfleet.dev", "-n", ns),
        ("patch", "jobs.batch", "-n", ns),
        ("*", "*", "-n", ns),
    ]
    for verb, res, *where in denied:
        assert not can_i(cluster, trainer, ns, verb, res, *where), f"{verb} {res} {where}"


def test_operator_with_only_the_chart_rbac_reaches_ready(
    cluster: ClusterHandle,
    namespace: str,
    operator_sa: tuple[str, str],
    storage: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    _, kubeconfig = operator_sa
    trainer = f"{namespace}-trainer"
    op = OperatorProcess(
        kubeconfig,
        namespace,
        tmp_path / "op.log",
        extra_env={"SLM_FLEET_TRAINER_SERVICE_ACCOUNT": trainer},
    ).start()
    try:
        cluster.apply(agenttask(), namespace)
        rev = revision(cluster, namespace)
        pod = running_pod(cluster, namespace, n.data_job_name("weather", rev))
        assert pod["spec"]["serviceAccountName"] == trainer
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


def _trainer_credentials(
    cluster: ClusterHandle, ns: str, sa: str, pod: str, folder: Path
) -> tuple[str, Path]:
    """(API server URL, token folder) as a trainer pod running as ``sa`` would see them."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    api = admin["clusters"][0]["cluster"]
    folder.mkdir()
    (folder / "ca.crt").write_bytes(base64.b64decode(api["certificate-authority-data"]))
    token = cluster.kubectl(
        "create",
        "token",
        sa,
        "-n",
        ns,
        "--bound-object-kind=Pod",
        f"--bound-object-name={pod}",
        "--duration=10m",
    ).stdout.strip()
    (folder / "token").write_text(token)
    return str(api["server"]), folder


def test_trainer_reports_progress_with_the_chart_service_account(
    cluster: ClusterHandle,
    namespace: str,
    operator_sa: tuple[str, str],
    storage: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The trainer's own progress reporter, with the trainer ServiceAccount's token, patches
    its pod, and the operator shows the percent in status; elsewhere it is refused, and the
    reporter turns itself off with a warning instead of failing the training."""
    from slm_trainer.progress import ANNOTATION, PodAnnotator

    ns, trainer = namespace, f"{namespace}-trainer"
    _, kubeconfig = operator_sa
    op = OperatorProcess(
        kubeconfig,
        ns,
        tmp_path / "op.log",
        resync_seconds=1.0,
        extra_env={"SLM_FLEET_TRAINER_SERVICE_ACCOUNT": trainer},
    ).start()
    try:
        cluster.apply(agenttask(), ns)
        rev = revision(cluster, ns)
        complete_job(
            cluster,
            ns,
            n.data_job_name("weather", rev),
            ok("prepare", examples=1200, train_examples=960, eval_examples=240),
        )
        pod = running_pod(cluster, ns, n.finetune_job_name("weather", "small", rev))
        assert pod["spec"]["serviceAccountName"] == trainer
        name = pod["metadata"]["name"]
        server, tokens = _trainer_credentials(cluster, ns, trainer, name, tmp_path / "sa")

        warnings: list[dict[str, object]] = []
        annotator = PodAnnotator(name, ns, server, token_dir=tokens, emit=warnings.append)
        annotator.set("40", force=True)
        annotator.close()
        assert annotator.patches == 1 and not warnings, warnings
        got = cluster.get_json("pod", name, "-n", ns)["metadata"]["annotations"]
        assert got[ANNOTATION] == "40"
        wait_for(
            lambda: any(
                c.get("name") == "small" and c.get("progress") == 40
                for c in (get_task(cluster, ns).get("status") or {}).get("candidates") or []
            ),
            timeout=30,
            what="status.candidates[small].progress = 40",
        )

        # The same token may not touch a pod in another namespace: a warning, then silence.
        elsewhere = PodAnnotator(name, "default", server, token_dir=tokens, emit=warnings.append)
        elsewhere.set("50", force=True)
        elsewhere.close()
        assert elsewhere.disabled and elsewhere.patches == 0
        assert len(warnings) == 1 and "HTTP 403" in str(warnings[0]["message"]), warnings

        complete_job(
            cluster,
            ns,
            n.finetune_job_name("weather", "small", rev),
            finetune_result("small", 0.62, 135_000_000, rev),
        )
        assert "Forbidden" not in op.log() and "forbidden" not in op.log()
    finally:
        cluster.kubectl("delete", "agenttasks", "--all", "-n", ns, "--wait=false", check=False)
        op.stop()


def test_trainer_pods_use_the_default_account_where_the_trainer_one_is_missing(
    cluster: ClusterHandle,
    namespace: str,
    operator_sa: tuple[str, str],
    storage: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A namespace the chart did not prepare (rbac.clusterWide, say): training still starts."""
    _, kubeconfig = operator_sa
    op = OperatorProcess(
        kubeconfig,
        namespace,
        tmp_path / "op.log",
        extra_env={"SLM_FLEET_TRAINER_SERVICE_ACCOUNT": "not-created-here"},
    ).start()
    try:
        cluster.apply(agenttask(), namespace)
        rev = revision(cluster, namespace)
        pod = running_pod(cluster, namespace, n.data_job_name("weather", rev))
        assert pod["spec"]["serviceAccountName"] == "default"
        assert "trainer ServiceAccount" in op.log() and "not-created-here" in op.log()
    finally:
        cluster.kubectl(
            "delete", "agenttasks", "--all", "-n", namespace, "--wait=false", check=False
        )
        op.stop()
