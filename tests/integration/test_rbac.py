"""The chart's RBAC is enough for the operator's whole flow, and no more than that.

The chart is rendered with the locally built helm, applied to the real control plane, and the
operator then runs as a local process authenticated with the chart's ServiceAccount token
(pods do not run on kwok's fake nodes), taking an AgentTask all the way to Ready.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
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
#: What the chart installs outside the namespace: RBAC and the admission policies.
CLUSTER_SCOPED = (
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)


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
            # The chart refuses a capturing gateway without a claim; RBAC does not depend on it.
            *[x for s in ("gateway.capture.enabled=false", *sets) for x in ("--set", s)],
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
    """Install the chart's ServiceAccounts, RBAC and admission policies; yield (operator
    service account, kubeconfig)."""
    docs = [
        d
        for d in helm_template(namespace, f"watchNamespaces={{{namespace}}}")
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", *CLUSTER_SCOPED)
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
        if d["kind"] in CLUSTER_SCOPED:
            cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], check=False)


def operator_env(namespace: str) -> dict[str, str]:
    """The operator container's plain env as the chart renders it for this namespace."""
    dep = next(
        d
        for d in helm_template(namespace, f"watchNamespaces={{{namespace}}}")
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e}


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
        # blockOwnerDeletion on the children's ownerReferences: OwnerReferencesPermission-
        # Enforcement (OpenShift) refuses them without it.
        ("update", "agenttasks.slmfleet.dev", "--subresource=finalizers"),
        ("watch", "pods"),
        ("patch", "deployments.apps"),
        ("create", "events"),
        ("list", "events"),  # a Job's FailedCreate: why admission refused its pod
        ("get", "serviceaccounts"),  # does the trainer's exist before a Job names it
    ]
    # Its own leader-election Lease, by name; nobody else's.
    lease = operator_env(ns)["SLM_FLEET_LEADER_ELECTION_LEASE"].split("/")[1]
    allowed += [
        ("get", f"leases.coordination.k8s.io/{lease}"),
        ("update", f"leases.coordination.k8s.io/{lease}"),
        ("create", "leases.coordination.k8s.io"),
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
        # Events are only posted (core/v1) and listed: never patched, never events.k8s.io.
        ("patch", "events", "-n", ns),
        ("create", "events.events.k8s.io", "-n", ns),
        ("patch", "events.events.k8s.io", "-n", ns),
        ("update", "leases.coordination.k8s.io/kube-scheduler", "-n", ns),
        ("get", "leases.coordination.k8s.io/other", "-n", ns),
        ("list", "leases.coordination.k8s.io", "-n", ns),
        ("delete", f"leases.coordination.k8s.io/{lease}", "-n", ns),
        ("create", "leases.coordination.k8s.io", "-n", "kube-system"),
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
    # As the chart runs it: electing a leader on the chart's Lease, with the chart's RBAC.
    election = {k: v for k, v in operator_env(namespace).items() if "LEADER_ELECTION" in k}
    assert election
    op = OperatorProcess(
        kubeconfig,
        namespace,
        tmp_path / "op.log",
        extra_env={"SLM_FLEET_TRAINER_SERVICE_ACCOUNT": trainer, **election},
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
        assert "leading: this replica" in op.log()
    finally:
        cluster.kubectl(
            "delete", "agenttasks", "--all", "-n", namespace, "--wait=false", check=False
        )
        op.stop()


def _ca_pem(api: dict[str, str]) -> bytes:
    """The cluster CA of a kubeconfig's cluster entry, by file or inline (a reused cluster's
    kubeconfig may be either)."""
    if "certificate-authority" in api:
        return Path(api["certificate-authority"]).read_bytes()
    return base64.b64decode(api["certificate-authority-data"])


def _trainer_credentials(
    cluster: ClusterHandle, ns: str, sa: str, pod: str, folder: Path
) -> tuple[str, Path]:
    """(API server URL, token folder) as a trainer pod running as ``sa`` would see them."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    api = admin["clusters"][0]["cluster"]
    folder.mkdir()
    (folder / "ca.crt").write_bytes(_ca_pem(api))
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


# ---- the admission policies: what RBAC's `patch` on pods cannot narrow --------------------

POLICY_SAYS = (
    "the trainer ServiceAccount may change only the slmfleet.dev/progress annotation of the "
    "trainer pod it runs in"
)


def _pod(name: str, labels: dict[str, str], account: str = "default") -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": {"team": "ml"}},
        "spec": {
            "serviceAccountName": account,
            "containers": [{"name": "main", "image": "registry.example/app:1"}],
        },
    }


def _patcher(cluster: ClusterHandle, ns: str) -> Callable[..., tuple[int, str]]:
    """PATCH a pod of ``ns`` with a bearer token, as the trainer's reporter does (kubectl
    patch would GET the pod first, which the trainer may not); returns (HTTP status, message)."""
    api = yaml.safe_load(Path(cluster.kubeconfig).read_text())["clusters"][0]["cluster"]
    tls = ssl.create_default_context(cadata=_ca_pem(api).decode())

    def patch(
        token: str,
        pod: str,
        body: object,
        kind: str = "merge-patch+json",
        dry_run: bool = False,
    ) -> tuple[int, str]:
        url = f"{api['server']}/api/v1/namespaces/{ns}/pods/{pod}"
        req = urllib.request.Request(
            url + ("?dryRun=All" if dry_run else ""),
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={"Authorization": f"Bearer {token}", "Content-Type": f"application/{kind}"},
        )
        try:
            with urllib.request.urlopen(req, context=tls, timeout=30) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as e:
            return e.code, str(json.loads(e.read()).get("message"))

    return patch


def test_trainer_service_account_may_only_set_the_progress_of_its_own_trainer_pod(
    cluster: ClusterHandle, namespace: str, operator_sa: tuple[str, str]
) -> None:
    """The trainer runs an image the AgentTask's author chose, with `patch` on pods: the
    chart's ValidatingAdmissionPolicy keeps that to the progress annotation of its own pod,
    so it cannot swap the gateway's image (and read the LLM key) or relabel anything."""
    ns, trainer = namespace, f"{namespace}-trainer"
    trainer_labels = n.labels("weather", n.STAGE_FINETUNE, "abc", "small")
    cluster.apply(
        [
            _pod("trainer-a", trainer_labels, trainer),
            _pod("trainer-b", trainer_labels, trainer),
            _pod("gateway", {"app.kubernetes.io/component": "gateway"}),
        ],
        ns,
    )
    token = cluster.kubectl(
        "create",
        "token",
        trainer,
        "-n",
        ns,
        "--bound-object-kind=Pod",
        "--bound-object-name=trainer-a",
        "--duration=10m",
    ).stdout.strip()
    patch = _patcher(cluster, ns)
    progress = {"metadata": {"annotations": {n.ANNOTATION_PROGRESS: "40"}}}
    relabel = {"metadata": {"labels": {"x": "y"}}}

    # The apiserver loads a new policy within a second or so; dry runs do not change the pod.
    def policy_in_force() -> bool:
        # The policy's own 403, not RBAC's (a binding not yet in force refuses with 403 too).
        status, message = patch(token, "trainer-a", relabel, dry_run=True)
        return status == 403 and POLICY_SAYS in message

    wait_for(
        policy_in_force,
        timeout=30,
        what="the trainer-pods admission policy to be in force",
    )

    assert patch(token, "trainer-a", progress) == (200, "")
    assert patch(
        token,
        "trainer-a",
        [{"op": "remove", "path": "/metadata/annotations/slmfleet.dev~1progress"}],
        "json-patch+json",
    ) == (200, "")
    assert patch(token, "trainer-a", progress) == (200, "")

    image = {"spec": {"containers": [{"name": "main", "image": "attacker.example/x:1"}]}}
    refused = {
        "image": ("trainer-a", image, "strategic-merge-patch+json", "the pod's spec"),
        "label": ("trainer-a", relabel, "merge-patch+json", "the pod's labels"),
        "annotation": (
            "trainer-a",
            {"metadata": {"annotations": {"team": "attacker"}}},
            "merge-patch+json",
            "the pod's other annotations",
        ),
        "finalizer": (
            "trainer-a",
            {"metadata": {"finalizers": ["example.com/hold"]}},
            "merge-patch+json",
            "finalizers",
        ),
        "gateway pod": ("gateway", progress, "merge-patch+json", "gateway is not a trainer pod"),
        "gateway image": ("gateway", image, "strategic-merge-patch+json", "not a trainer pod"),
        "other trainer pod": (
            "trainer-b",
            progress,
            "merge-patch+json",
            "bound to pod trainer-a, not to trainer-b",
        ),
    }
    for what, (pod, body, kind, why) in refused.items():
        status, message = patch(token, pod, body, kind)
        assert status == 403, (what, status, message)
        assert POLICY_SAYS in message and why in message, (what, message)

    # A token not bound to a pod (a long-lived Secret token, say) speaks for no pod.
    unbound = cluster.kubectl("create", "token", trainer, "-n", ns).stdout.strip()
    status, message = patch(unbound, "trainer-a", progress)
    assert status == 403 and "bound to no pod" in message, message

    pods = {p["metadata"]["name"]: p for p in cluster.get_json("pods", "-n", ns)["items"]}
    assert pods["trainer-a"]["metadata"]["annotations"] == {
        "team": "ml",
        n.ANNOTATION_PROGRESS: "40",
    }
    assert pods["trainer-a"]["metadata"]["labels"] == trainer_labels
    assert pods["trainer-a"]["spec"]["containers"][0]["image"] == "registry.example/app:1"
    assert pods["gateway"]["spec"]["containers"][0]["image"] == "registry.example/app:1"
    assert n.ANNOTATION_PROGRESS not in pods["trainer-b"]["metadata"]["annotations"]
    # Everyone else is untouched by the policy: an administrator may still relabel the pod.
    cluster.kubectl("label", "pod", "trainer-a", "-n", ns, "x=y")


def test_agenttask_may_not_run_its_trainer_as_the_operator_or_gateway(
    cluster: ClusterHandle, namespace: str, operator_sa: tuple[str, str]
) -> None:
    ns = namespace

    def admitted(account: str, dry_run: bool = True) -> subprocess.CompletedProcess[str]:
        task = agenttask(training={"gpus": 1, "serviceAccountName": account})
        return cluster.kubectl(
            "apply",
            "--server-side",
            "--field-manager=slm-fleet-tests",
            *(["--dry-run=server"] if dry_run else []),
            "-n",
            ns,
            "-f",
            "-",
            input=yaml.safe_dump(task),
            check=False,
        )

    wait_for(
        lambda: admitted(f"{ns}-operator").returncode != 0,
        timeout=30,
        what="the agenttask-accounts admission policy to be in force",
    )
    for account in (f"{ns}-operator", f"{ns}-gateway"):
        cp = admitted(account)
        assert cp.returncode != 0
        assert (
            f"spec.training.serviceAccountName {account} is a ServiceAccount of the slm-fleet "
            "operator or gateway" in cp.stderr
        ), cp.stderr
    assert admitted("s3-reader", dry_run=False).returncode == 0
    assert admitted(f"{ns}-trainer", dry_run=False).returncode == 0
    cluster.kubectl("delete", "agenttasks", "--all", "-n", ns, "--wait=false", check=False)
