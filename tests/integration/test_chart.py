"""The Helm chart: lint, render, schema, and a real install into the local control plane.

``helm`` is the locally built one (``slm_e2e.binaries``). Rendering uses the control plane's
``--kube-version``; the install goes to the real kube-apiserver, where kwok runs the operator
and gateway pods on fake CPU nodes (GPU nodes are tainted, and nothing here tolerates that).
No container runs there, so the last test runs the operator and the gateway as local
processes, authenticated with the tokens of the ServiceAccounts the chart installed: that
proves the chart's RBAC is enough for both, while ``kubectl auth can-i`` proves it is minimal.
"""

from __future__ import annotations

import filecmp
import inspect
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config

from slm_e2e.binaries import locate
from slm_e2e.testing import ClusterHandle, OperatorProcess, wait_for
from slm_operator.kube import Kube
from slm_operator.leader import LeaderElector, LeaseSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "slm-fleet-operator"
GATEWAY_METRICS = REPO / "operator" / "slm_gateway" / "metrics.py"
KEY_SECRET = "llm-key"
# The claim the quickstart captures to (examples/storage/quickstart-pvcs.yaml). Without a
# claim, an object store or an explicit opt-in to an emptyDir the chart refuses to render.
CAPTURE_CLAIM = "gateway.capture.existingClaim=agent-call-logs"

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "cluster-wide": ["rbac.clusterWide=true"],
    "monitoring": [
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.podMonitor.enabled=true",
        "monitoring.prometheusRule.enabled=true",
    ],
    "dashboard": ["dashboard.enabled=true"],
    "several-namespaces": ["watchNamespaces={team-a,team-b}"],
    "no-trainer-account": ["trainer.serviceAccount.create=false"],
    "no-admission-policy": ["trainer.admissionPolicy.enabled=false"],
    "replicated-gateway": ["gateway.replicas=3"],
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(
        [str(locate(("helm",)).helm), *args], capture_output=True, text=True, timeout=300
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {cp.returncode}:\n{cp.stderr}")
    return cp


def kube_version() -> str:
    return locate(("helm",)).kubernetes_version.lstrip("v")


def sets(values: list[str]) -> list[str]:
    return [x for v in values for x in ("--set", v)]


def render_bare(
    *values: str, namespace: str = "slm", json_values: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The chart rendered with these values on top of values.yaml, and nothing else;
    ``json_values`` go through ``--set-json``."""
    out = helm(
        "template",
        "slm",
        str(CHART),
        "-n",
        namespace,
        "--kube-version",
        kube_version(),
        *sets(list(values)),
        *[x for v in json_values for x in ("--set-json", v)],
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render(*values: str, namespace: str = "slm") -> list[dict[str, Any]]:
    """Rendered with a capture claim (the quickstart's), since the chart refuses to capture
    into nowhere; ``values`` come after it, so a test can still override it."""
    return render_bare(CAPTURE_CLAIM, *values, namespace=namespace)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    spec = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
    c: dict[str, Any] = spec["containers"][0]
    return c


# ---- offline: lint and render ------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict(variant: str) -> None:
    values = [CAPTURE_CLAIM, *VARIANTS[variant]]
    helm("lint", "--strict", str(CHART), "--kube-version", kube_version(), *sets(values))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_restricted_with_probes_and_resources(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {"slm-operator", "slm-gateway"}
    for dep in deployments.values():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert c["livenessProbe"]["httpGet"] and c["readinessProbe"]["httpGet"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    rendered = yaml.safe_dump_all(docs)
    assert "'*'" not in rendered and '"*"' not in rendered, "no wildcard anywhere"


def test_the_operator_may_block_its_tasks_deletion_as_its_owner_references_say() -> None:
    """The children's ownerReferences set blockOwnerDeletion; OwnerReferencesPermission-
    Enforcement (an admission plugin on in OpenShift) admits that only from who may update
    the owner's finalizers: without this rule every Job, Deployment and Service the operator
    applies there is refused."""
    want = {
        "apiGroups": ["slmfleet.dev"],
        "resources": ["agenttasks/finalizers"],
        "verbs": ["update"],
    }
    assert want in by_kind(render(), "Role")["slm-operator"]["rules"]
    wide = by_kind(render("rbac.clusterWide=true"), "ClusterRole")["slm-operator"]["rules"]
    assert want in wide


def test_the_operator_may_only_post_and_list_core_events() -> None:
    """The operator (kube.py) and kopf only POST new core/v1 Events and list them (a Job's
    FailedCreate); nothing patches an Event or uses events.k8s.io, so neither is granted."""
    want = {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]}
    for rules in (
        by_kind(render(), "Role")["slm-operator"]["rules"],
        by_kind(render("rbac.clusterWide=true"), "ClusterRole")["slm-operator"]["rules"],
    ):
        events = [r for r in rules if "events" in r["resources"]]
        assert events == [want], events


def test_default_render_watches_the_release_namespace() -> None:
    docs = render(f"gateway.llmApiKeySecrets={{{KEY_SECRET}}}", namespace="team-a")
    op = container(docs, "slm-operator")
    assert op["command"] == ["slm-fleet-operator"]
    assert op["args"][:2] == ["--namespace=team-a", "--liveness=http://0.0.0.0:8080/healthz"]
    assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "SLM_FLEET_PROMETHEUS_URL", "value": ""} in op["env"]
    gw = container(docs, "slm-gateway")
    assert gw["command"] == ["python", "-m", "slm_gateway"]
    assert "--namespace=team-a" in gw["args"]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Only the operator's discovery is cluster-scoped; the gateway's grants are one Role.
    assert set(by_kind(docs, "ClusterRole")) == {"slm-operator-discovery"}
    role = by_kind(docs, "Role")["slm-gateway"]
    assert role["metadata"]["namespace"] == "team-a"
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get"],
            "resourceNames": [KEY_SECRET],
        }
    ]
    svc = by_kind(docs, "Service")["slm-gateway"]
    pod_labels = by_kind(docs, "Deployment")["slm-gateway"]["spec"]["template"]["metadata"]
    assert svc["spec"]["selector"].items() <= pod_labels["labels"].items()


def test_gateway_shutdown_loses_neither_calls_nor_captures() -> None:
    from slm_gateway.capture import CaptureSink
    from slm_gateway.config import GatewayConfig

    pod = by_kind(render(), "Deployment")["slm-gateway"]["spec"]["template"]["spec"]
    gw = pod["containers"][0]
    # Endpoints and load balancers drop a terminating pod a moment after it gets SIGTERM;
    # until then new calls still arrive, so the gateway keeps listening for a few seconds.
    pre_stop = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5
    # Then: uvicorn's request drain, the shadow-call drain (up to 5 s) and the capture flush,
    # each bounded by the gateway itself; a SIGKILL before the flush ends loses training data.
    flush = inspect.signature(CaptureSink.close).parameters["timeout"].default
    shutdown = pre_stop + GatewayConfig.graceful_timeout_s + 5 + flush
    assert pod["terminationGracePeriodSeconds"] >= shutdown


def test_replicated_gateway_is_spread_and_guarded_against_drains() -> None:
    docs = render("gateway.replicas=3")
    dep = by_kind(docs, "Deployment")["slm-gateway"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (spread,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # never blocks scheduling
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    pdb = by_kind(docs, "PodDisruptionBudget")["slm-gateway"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # One replica: a budget could only block node drains, so there is none.
    assert not by_kind(render(), "PodDisruptionBudget")
    off = render("gateway.replicas=3", "gateway.podDisruptionBudget.enabled=false")
    assert not by_kind(off, "PodDisruptionBudget")


def helm_fails(*values: str) -> str:
    """helm template's error for these values (on top of values.yaml); it must fail."""
    cp = helm(
        "template",
        "slm",
        str(CHART),
        "--kube-version",
        kube_version(),
        *sets(list(values)),
        check=False,
    )
    assert cp.returncode != 0, f"helm template {values} rendered"
    return cp.stderr


def capture_volume(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    pod = by_kind(docs, "Deployment")["slm-gateway"]["spec"]["template"]["spec"]
    return next((v for v in pod["volumes"] if v["name"] == "capture"), None)


def test_agents_only_network_policy_is_refused_for_leaving_prometheus_out() -> None:
    """The gateway's /metrics shares its port with the API: a policy admitting only the
    agents cut Prometheus off, and the operator saw no gateway metrics (the SLO never judged,
    the rollout stuck in shadow), silently."""
    err = helm_fails(
        CAPTURE_CLAIM,
        "networkPolicy.enabled=true",
        "networkPolicy.agents[0].namespaceSelector.matchLabels.team=agents",
    )
    assert "networkPolicy.prometheus is empty" in err
    docs = render(
        "networkPolicy.enabled=true",
        "networkPolicy.agents[0].namespaceSelector.matchLabels.team=agents",
        "networkPolicy.prometheus[0].namespaceSelector.matchLabels.team=monitoring",
    )
    rules = by_kind(docs, "NetworkPolicy")["slm-gateway"]["spec"]["ingress"]
    assert len(rules) == 2  # the agents, and the scrapers


def test_capture_without_durable_storage_is_refused_unless_opted_into() -> None:
    """An emptyDir fills up (shards are never deleted locally), gets the pod evicted, and no
    trainer can read it: the chart does not capture there unless told to, in so many words."""
    err = helm_fails()
    for named in (
        "gateway.capture.existingClaim",
        "gateway.capture.persistence.create",
        "gateway.capture.target",
        "gateway.capture.ephemeral",
        "gateway.capture.enabled=false",
    ):
        assert named in err, err
    assert "emptyDir" in err, err
    helm_fails("gateway.capture.persistence.create=false", "gateway.capture.target=")
    # Opted in: the emptyDir as before, size-limited.
    ephemeral = capture_volume(render_bare("gateway.capture.ephemeral=true"))
    assert ephemeral == {"name": "capture", "emptyDir": {"sizeLimit": "5Gi"}}
    # Durable destinations render, and mount no emptyDir.
    assert capture_volume(render_bare(CAPTURE_CLAIM)) == {
        "name": "capture",
        "persistentVolumeClaim": {"claimName": "agent-call-logs"},
    }
    created = render_bare("gateway.capture.persistence.create=true")
    assert capture_volume(created) == {
        "name": "capture",
        "persistentVolumeClaim": {"claimName": "slm-gateway-capture"},
    }
    assert "slm-gateway-capture" in by_kind(created, "PersistentVolumeClaim")
    remote = render_bare("gateway.capture.target=s3://bucket/calls")
    assert capture_volume(remote) is None
    assert "--capture=s3://bucket/calls" in container(remote, "slm-gateway")["args"]
    assert capture_volume(render_bare("gateway.capture.enabled=false")) is None
    # /tmp holds the capture spool (shards waiting for an object store): size-limited in
    # every mode, so an object-store outage cannot fill the node's disk.
    for docs, limit in (
        (remote, "2Gi"),
        (render_bare(CAPTURE_CLAIM), "2Gi"),
        (render_bare("gateway.capture.enabled=false"), "2Gi"),
        (render_bare(CAPTURE_CLAIM, "gateway.capture.spoolSizeLimit=500Mi"), "500Mi"),
    ):
        pod = by_kind(docs, "Deployment")["slm-gateway"]["spec"]["template"]["spec"]
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert tmp == {"name": "tmp", "emptyDir": {"sizeLimit": limit}}, tmp
    # Without the gateway there is nothing to capture.
    assert "slm-gateway" not in by_kind(render_bare("gateway.enabled=false"), "Deployment")


def _gateway_config(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The gateway's settings as the pod would get them: the image's environment
    (operator/slm_gateway/Dockerfile's ENV), the container's env, then its arguments."""
    from slm_gateway.config import config_from_args

    dockerfile = (REPO / "operator" / "slm_gateway" / "Dockerfile").read_text()
    image_env = dict(re.findall(r"\b(SLM_GATEWAY_[A-Z_]+)=(\S+)", dockerfile))
    assert image_env.get("SLM_GATEWAY_CAPTURE"), "the image captures by default"
    gw = container(docs, "slm-gateway")
    env = {**image_env, **{e["name"]: e["value"] for e in gw["env"] if "value" in e}}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return config_from_args(gw["args"])


def test_capture_disabled_overrides_the_images_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway image captures to /var/lib/slm-gateway/calls unless told otherwise;
    capture.enabled=false must tell it otherwise, not just leave out --capture."""
    off = _gateway_config(render_bare("gateway.capture.enabled=false"), monkeypatch)
    assert off.capture is None
    on = _gateway_config(render(), monkeypatch)
    assert on.capture is not None
    assert on.capture.target == "/var/lib/slm-gateway/data/calls"


def _strategy(docs: list[dict[str, Any]]) -> str:
    spec = by_kind(docs, "Deployment")["slm-gateway"]["spec"]
    return str((spec.get("strategy") or {}).get("type", "RollingUpdate"))


def test_single_node_capture_claim_makes_the_gateway_replace_not_roll() -> None:
    """A rolling update starts the new pod (on another node, by the topology spread) while
    the old one still holds a ReadWriteOnce volume: Multi-Attach error, and the rollout hangs
    (ReadWriteOncePod: the new pod never schedules). Such a claim gets Recreate."""
    created = "gateway.capture.persistence.create=true"
    assert _strategy(render_bare(created)) == "Recreate"  # ReadWriteOnce by default
    rwop = "gateway.capture.persistence.accessModes={ReadWriteOncePod}"
    assert _strategy(render_bare(created, rwop)) == "Recreate"
    rwx = "gateway.capture.persistence.accessModes={ReadWriteMany}"
    assert _strategy(render_bare(created, rwx)) == "RollingUpdate"
    assert _strategy(render_bare(created, rwx, "gateway.replicas=3")) == "RollingUpdate"
    # Nothing shared to hold: roll.
    assert _strategy(render_bare("gateway.capture.ephemeral=true")) == "RollingUpdate"
    assert _strategy(render_bare("gateway.capture.target=s3://b/calls")) == "RollingUpdate"
    # An existing claim that cannot be looked up (helm template): ReadWriteMany, as the
    # quickstart's; gateway.strategy says otherwise for one that is not.
    assert _strategy(render()) == "RollingUpdate"
    assert _strategy(render("gateway.strategy.type=Recreate")) == "Recreate"


def test_replicated_gateway_refuses_a_single_node_capture_claim() -> None:
    """Replicas spread over nodes cannot all mount a ReadWriteOnce(Pod) claim, rolling or
    not: refused at render, naming the values to change."""
    for mode in ("ReadWriteOnce", "ReadWriteOncePod"):
        err = helm_fails(
            "gateway.capture.persistence.create=true",
            f"gateway.capture.persistence.accessModes={{{mode}}}",
            "gateway.replicas=2",
        )
        assert "gateway.replicas" in err and mode in err and "ReadWriteMany" in err, err


def test_capture_claim_the_chart_creates_must_be_writable() -> None:
    """The gateway writes its captures to the claim the chart creates: with ReadOnlyMany
    alone that is a new, empty volume nothing may write to (provisioners refuse it or mount it
    read-only), so the gateway could capture nothing. A writable mode is required; a read-only
    mode beside one is kept, and the strategy still follows ReadWriteMany alone."""
    created = "gateway.capture.persistence.create=true"
    err = helm_fails(created, "gateway.capture.persistence.accessModes={ReadOnlyMany}")
    assert "values don't meet the specifications of the schema" in err
    assert "at '/gateway/capture/persistence/accessModes'" in err, err
    assert "'ReadWriteOnce', 'ReadWriteMany', 'ReadWriteOncePod'" in err, err
    # the API server refuses ReadWriteOncePod beside another mode, mid-install
    err = helm_fails(
        created, "gateway.capture.persistence.accessModes={ReadWriteOncePod,ReadWriteOnce}"
    )
    assert "at '/gateway/capture/persistence/accessModes'" in err, err
    for modes, strategy in (
        ("{ReadWriteMany,ReadOnlyMany}", "RollingUpdate"),
        ("{ReadOnlyMany,ReadWriteOnce}", "Recreate"),
        ("{ReadWriteOncePod}", "Recreate"),
    ):
        docs = render_bare(created, f"gateway.capture.persistence.accessModes={modes}")
        assert _strategy(docs) == strategy, modes


def _quickstart_sets(text: str) -> tuple[str, list[str]]:
    """The namespace and --set values of the first `helm install` command in ``text``."""
    import shlex

    lines = text.replace("\\\n", " ").splitlines()
    words = shlex.split(next(line for line in lines if line.strip().startswith("helm install")))
    values = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    return words[words.index("-n") + 1], values


def _section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("readme", ["README.md", "charts/slm-fleet-operator/README.md"])
def test_readme_quickstart_installs_a_scraped_fleet(readme: str) -> None:
    """With the quickstart's values, the chart renders (capture to the tasks' claim), the
    operator reads Prometheus, and that Prometheus scrapes the gateway and Triton: without
    those series live control never leaves shadow. kube-prometheus-stack's Prometheus only
    selects monitors labelled with its release."""
    text = (REPO / readme).read_text()
    if readme == "README.md":
        text = _section(text, "## Quickstart on a real cluster")
    ns, values = _quickstart_sets(text)
    docs = render_bare(*values, namespace=ns)
    env = {e["name"]: e.get("value") for e in container(docs, "slm-operator")["env"]}
    assert env["SLM_FLEET_PROMETHEUS_URL"], "the quickstart sets operator.prometheusURL"
    gateway_volume = capture_volume(docs)
    assert gateway_volume and "persistentVolumeClaim" in gateway_volume
    monitors = [
        *by_kind(docs, "ServiceMonitor").values(),
        *by_kind(docs, "PodMonitor").values(),
    ]
    scraped = {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors}
    assert {"gateway", "triton"} <= scraped, scraped
    for m in monitors:
        assert m["metadata"]["labels"].get("release"), m["metadata"]["name"]


def test_operator_settings_come_from_values() -> None:
    docs = render(
        "operator.prometheusURL=http://prometheus.monitoring.svc:9090",
        "operator.logLevel=verbose",
    )
    op = container(docs, "slm-operator")
    assert {
        "name": "SLM_FLEET_PROMETHEUS_URL",
        "value": "http://prometheus.monitoring.svc:9090",
    } in op["env"]
    assert "--verbose" in op["args"]


def test_operator_replicas_elect_a_leader_on_a_lease_only_they_may_renew() -> None:
    from slm_operator.leader import ENV_POD_NAME, LeaseSettings

    docs = render("operator.replicas=2")
    dep = by_kind(docs, "Deployment")["slm-operator"]
    assert dep["spec"]["replicas"] == 2
    # A new pod stands by until the old one releases the Lease: rolling loses no time.
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    op = container(docs, "slm-operator")
    env = {e["name"]: e.get("value") for e in op["env"]}
    pod_name = next(e for e in op["env"] if e["name"] == ENV_POD_NAME)
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    settings = LeaseSettings.from_env({**env, ENV_POD_NAME: "slm-operator-abc"})
    assert settings is not None
    assert (settings.namespace, settings.name) == ("slm", "slm-operator")
    assert (settings.lease_seconds, settings.renew_deadline_seconds) == (15, 10)
    role = by_kind(docs, "Role")["slm-operator-leader-election"]
    assert role["metadata"]["namespace"] == "slm"
    named = next(r for r in role["rules"] if "resourceNames" in r)
    assert named["resourceNames"] == [settings.name]
    assert sorted(named["verbs"]) == ["get", "update"]
    pdb = by_kind(docs, "PodDisruptionBudget")["slm-operator"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # One replica: no budget (it could only block drains), still a leader election.
    assert "slm-operator" not in by_kind(render(), "PodDisruptionBudget")


def test_operator_without_leader_election_is_one_replica_replaced() -> None:
    docs = render("operator.leaderElection.enabled=false")
    dep = by_kind(docs, "Deployment")["slm-operator"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(
        e["name"].startswith("SLM_FLEET_LEADER") for e in container(docs, "slm-operator")["env"]
    )
    assert "slm-operator-leader-election" not in by_kind(docs, "Role")
    err = helm_fails("operator.leaderElection.enabled=false", "operator.replicas=2")
    assert "operator.replicas=2 needs operator.leaderElection.enabled=true" in err
    err = helm_fails("operator.leaderElection.renewDeadlineSeconds=20")
    assert "retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds" in err


def test_agent_auth_renders_flags_the_gateway_takes_and_a_tokenreview_role() -> None:
    from slm_gateway.config import config_from_args

    docs = render("gateway.agentAuth.mode=serviceaccount", "gateway.agentAuth.cacheSeconds=30")
    cfg = config_from_args(container(docs, "slm-gateway")["args"])
    assert (cfg.agent_auth, cfg.agent_auth_audience, cfg.agent_auth_cache_s) == (
        "serviceaccount",
        "slm-fleet-gateway",
        30.0,
    )
    assert cfg.agent_auth_reviews_per_s == 100.0
    # The TokenReview rate for tokens not yet cached (past it a 429), and its bounds.
    fast = render("gateway.agentAuth.mode=serviceaccount", "gateway.agentAuth.reviewsPerSecond=200")
    assert config_from_args(container(fast, "slm-gateway")["args"]).agent_auth_reviews_per_s == 200
    err = helm_fails(CAPTURE_CLAIM, "gateway.agentAuth.reviewsPerSecond=0")
    assert "reviewsPerSecond" in err
    role = by_kind(docs, "ClusterRole")["slm-gateway-tokenreview"]
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    binding = by_kind(docs, "ClusterRoleBinding")["slm-gateway-tokenreview"]
    assert binding["subjects"][0]["name"] == "slm-gateway"
    # Off by default: any caller, and no right to review tokens.
    off = render()
    assert config_from_args(container(off, "slm-gateway")["args"]).agent_auth == "none"
    assert "slm-gateway-tokenreview" not in by_kind(off, "ClusterRole")
    assert "must be one of" in helm_fails(CAPTURE_CLAIM, "gateway.agentAuth.mode=token")


def test_network_policies_let_only_the_gateway_reach_triton_and_match_real_pods(
    cluster: ClusterHandle, namespace: str
) -> None:
    """The policies' selectors match the pods the operator and the chart actually build
    (a selector that matches nothing silently protects nothing), and the API server accepts
    them (server-side dry run)."""
    from test_operator import agenttask

    from slm_operator import builders

    agents = '[{"namespaceSelector":{"matchLabels":{"team":"agents"}}}]'
    scrape = '[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]'
    docs = render_bare(
        "gateway.capture.enabled=false",
        "networkPolicy.enabled=true",
        f"watchNamespaces={{{namespace}}}",
        namespace=namespace,
        json_values=(f"networkPolicy.agents={agents}", f"networkPolicy.prometheus={scrape}"),
    )
    policies = by_kind(docs, "NetworkPolicy")
    assert set(policies) == {"slm-gateway", "slm-triton"}
    gw_pod = by_kind(docs, "Deployment")["slm-gateway"]["spec"]["template"]["metadata"]["labels"]
    gw = policies["slm-gateway"]["spec"]
    assert gw["podSelector"]["matchLabels"].items() <= gw_pod.items()
    assert [r["from"] for r in gw["ingress"]] == [json.loads(agents), json.loads(scrape)]
    task = agenttask()
    task["metadata"].update(namespace=namespace, uid="u-1")
    triton_pod = builders.triton_deployment(task, "r1", "pvc://c/m", "small", 1)["spec"][
        "template"
    ]["metadata"]["labels"]
    tr = policies["slm-triton"]
    assert tr["metadata"]["namespace"] == namespace
    assert tr["spec"]["podSelector"]["matchLabels"].items() <= triton_pod.items()
    inference, metrics = tr["spec"]["ingress"]
    assert inference["ports"] == [{"port": builders.TRITON_HTTP, "protocol": "TCP"}]
    (peer,) = inference["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    assert peer["podSelector"]["matchLabels"].items() <= gw_pod.items()
    assert metrics["ports"] == [{"port": builders.TRITON_METRICS, "protocol": "TCP"}]
    assert metrics["from"] == json.loads(scrape)
    for policy in policies.values():
        cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(policy))
    # Off by default; and with rbac.clusterWide the namespaces are unknown: no Triton policy.
    assert not by_kind(render(), "NetworkPolicy")
    wide = by_kind(render("networkPolicy.enabled=true", "rbac.clusterWide=true"), "NetworkPolicy")
    assert set(wide) == {"slm-gateway"}
    assert "from" not in wide["slm-gateway"]["spec"]["ingress"][0]  # any agent


def test_cluster_wide_render() -> None:
    docs = render("rbac.clusterWide=true", f"gateway.llmApiKeySecrets={{{KEY_SECRET}}}")
    assert "--all-namespaces" in container(docs, "slm-operator")["args"]
    assert "--all-namespaces" in container(docs, "slm-gateway")["args"]
    # Only the trainer's ServiceAccount is namespaced: a pod runs as an account of its own
    # namespace. With no namespaces listed, the release namespace gets one. So are the Lease
    # the operator replicas elect a leader on
    # and the operator's own Lease, in the release namespace.
    assert (
        set(by_kind(docs, "Role"))
        == set(by_kind(docs, "RoleBinding"))
        == {
            "slm-trainer",
            "slm-operator-leader-election",
        }
    )
    assert by_kind(docs, "Role")["slm-trainer"]["metadata"]["namespace"] == "slm"
    gw_rules = by_kind(docs, "ClusterRole")["slm-gateway"]["rules"]
    assert {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": [KEY_SECRET],
    } in gw_rules
    assert all(r.get("resourceNames") for r in gw_rules if "secrets" in r["resources"])
    assert set(by_kind(docs, "ClusterRoleBinding")) == {
        "slm-operator-discovery",
        "slm-operator",
        "slm-gateway",
    }


def test_several_namespaces_get_a_role_each() -> None:
    docs = render("watchNamespaces={team-a,team-b}", f"gateway.llmApiKeySecrets={{{KEY_SECRET}}}")
    args = container(docs, "slm-operator")["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "slm-gateway"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    # The gateway reads AgentTasks everywhere, but Secrets only in the watched namespaces,
    # and routes only those namespaces' tasks.
    gw_args = container(docs, "slm-gateway")["args"]
    assert "--namespace=team-a,team-b" in gw_args and "--all-namespaces" not in gw_args
    cluster_rules = by_kind(docs, "ClusterRole")["slm-gateway"]["rules"]
    assert [r["resources"] for r in cluster_rules] == [["agenttasks"]]


def _trainer_objects(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (d["kind"], d["metadata"]["namespace"]): d
        for d in docs
        if d["metadata"]["name"] == "slm-trainer"
        and d["kind"] in ("ServiceAccount", "Role", "RoleBinding")
    }


def test_trainer_service_account_in_each_namespace_where_tasks_live() -> None:
    docs = render("watchNamespaces={team-a,team-b}")
    got = _trainer_objects(docs)
    assert set(got) == {
        (kind, ns)
        for kind in ("ServiceAccount", "Role", "RoleBinding")
        for ns in ("team-a", "team-b")
    }
    for ns in ("team-a", "team-b"):
        # patch on pods (the progress annotation on its own pod) and nothing else
        assert got[("Role", ns)]["rules"] == [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}
        ]
        assert got[("RoleBinding", ns)]["subjects"] == [
            {"kind": "ServiceAccount", "name": "slm-trainer", "namespace": ns}
        ]
    env = container(docs, "slm-operator")["env"]
    assert {"name": "SLM_FLEET_TRAINER_SERVICE_ACCOUNT", "value": "slm-trainer"} in env
    op_rules = by_kind(docs, "Role")["slm-operator"]["rules"]
    assert {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]} in op_rules

    wide = _trainer_objects(
        render("rbac.clusterWide=true", "trainer.serviceAccount.namespaces={agents,research}")
    )
    assert {ns for _, ns in wide} == {"agents", "research"}


def test_trainer_service_account_can_be_brought_or_turned_off() -> None:
    docs = render("trainer.serviceAccount.create=false", "trainer.serviceAccount.name=ci-trainer")
    kinds = {d["kind"] for d in docs if d["metadata"]["name"] == "slm-trainer"}
    assert kinds == {"Role", "RoleBinding"}, "an existing account gets the Role, not a new one"
    binding = by_kind(docs, "RoleBinding")["slm-trainer"]
    assert binding["subjects"][0]["name"] == "ci-trainer"
    env = container(docs, "slm-operator")["env"]
    assert {"name": "SLM_FLEET_TRAINER_SERVICE_ACCOUNT", "value": "ci-trainer"} in env

    off = render("trainer.serviceAccount.create=false")
    assert not [d for d in off if "trainer" in d["metadata"]["name"]]
    env = container(off, "slm-operator")["env"]
    assert {"name": "SLM_FLEET_TRAINER_SERVICE_ACCOUNT", "value": ""} in env


def _policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    }


def test_admission_policies_guard_the_trainer_account() -> None:
    """The trainer runs the task author's image with `patch` on pods: one policy keeps that
    to its own pod's progress annotation, another keeps tasks off the operator's and the
    gateway's ServiceAccounts (tested against the apiserver in test_rbac.py)."""
    docs = render("watchNamespaces={team-a,team-b}")
    env = container(docs, "slm-operator")["env"]
    reserved = {"name": "SLM_FLEET_RESERVED_SERVICE_ACCOUNTS", "value": "slm-operator,slm-gateway"}
    assert reserved in env
    got = _policies(docs)
    assert set(got) == {"slm-trainer-pods", "slm-agenttask-accounts"}
    for d in docs:
        if d["kind"].startswith("ValidatingAdmissionPolicy"):
            assert d["apiVersion"] == "admissionregistration.k8s.io/v1"
    pods = next(
        d
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"] == "slm-trainer-pods"
    )
    (match,) = pods["spec"]["matchConditions"]
    assert match["expression"] == (
        'request.userInfo.username in ["system:serviceaccount:team-a:slm-trainer",'
        '"system:serviceaccount:team-b:slm-trainer"]'
    )
    assert pods["spec"]["failurePolicy"] == "Fail"
    rules = pods["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods", "pods/*"],
            "operations": ["UPDATE"],
        }
    ]
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert {b["spec"]["policyName"] for b in bindings} == set(got)
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings)

    # No gateway: only the operator's account is reserved. No trainer account: no pod policy.
    alone = render("gateway.enabled=false", "trainer.serviceAccount.create=false")
    assert set(_policies(alone)) == {"slm-agenttask-accounts"}
    env = container(alone, "slm-operator")["env"]
    assert {"name": "SLM_FLEET_RESERVED_SERVICE_ACCOUNTS", "value": "slm-operator"} in env
    assert not _policies(render("trainer.admissionPolicy.enabled=false"))


def test_pull_secrets_reach_the_trainer_account_and_the_pods_the_operator_creates() -> None:
    def trainer_account(docs: list[dict[str, Any]]) -> dict[str, Any]:
        sa: dict[str, Any] = by_kind(docs, "ServiceAccount")["slm-trainer"]
        return sa

    def pull_env(docs: list[dict[str, Any]]) -> str:
        env = container(docs, "slm-operator")["env"]
        return str(next(e["value"] for e in env if e["name"] == "SLM_FLEET_IMAGE_PULL_SECRETS"))

    plain = render()
    assert "imagePullSecrets" not in trainer_account(plain) and pull_env(plain) == ""
    docs = render("imagePullSecrets[0].name=registry")
    assert trainer_account(docs)["imagePullSecrets"] == [{"name": "registry"}]
    assert pull_env(docs) == "registry"
    # The trainer account's own list; the operator lists both on its pods, since a pod that
    # names pull secrets gets none from its ServiceAccount.
    own = render(
        "imagePullSecrets[0].name=registry",
        "trainer.serviceAccount.imagePullSecrets[0].name=ml-registry",
    )
    assert trainer_account(own)["imagePullSecrets"] == [{"name": "ml-registry"}]
    assert pull_env(own) == "registry,ml-registry"


def test_the_operators_images_for_tasks_without_their_own_follow_the_values() -> None:
    """A mirrored registry is set once: the operator gets the trainer and Triton images of
    tasks that name none, tagged with the chart's appVersion unless a tag is given."""

    def image_env(docs: list[dict[str, Any]]) -> dict[str, str]:
        env = container(docs, "slm-operator")["env"]
        return {
            e["name"]: e["value"]
            for e in env
            if e["name"] in ("SLM_FLEET_TRAINER_IMAGE", "SLM_FLEET_TRITON_IMAGE")
        }

    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert image_env(render()) == {
        "SLM_FLEET_TRAINER_IMAGE": f"ghcr.io/slm-fleet/trainer:{version}",
        "SLM_FLEET_TRITON_IMAGE": f"ghcr.io/slm-fleet/triton:{version}",
    }
    mirrored = render(
        "operator.trainerImage.repository=reg.local/slm/trainer",
        "operator.tritonImage.repository=reg.local/slm/triton",
        "operator.tritonImage.tag=24.09-py3",
    )
    assert image_env(mirrored) == {
        "SLM_FLEET_TRAINER_IMAGE": f"reg.local/slm/trainer:{version}",
        "SLM_FLEET_TRITON_IMAGE": "reg.local/slm/triton:24.09-py3",
    }
    # `helm upgrade --reuse-values` from a release made before these values existed reuses
    # values without them: the defaults still apply (the template failed on a nil map).
    assert image_env(render("operator.trainerImage=null", "operator.tritonImage=null")) == (
        image_env(render())
    )
    # ...or only the tag that upgrade sets: the default repository with it.
    tag_only = image_env(
        render("operator.tritonImage.repository=null", "operator.tritonImage.tag=v2")
    )
    assert tag_only["SLM_FLEET_TRITON_IMAGE"] == "ghcr.io/slm-fleet/triton:v2"


def test_the_monitors_scrape_at_the_interval_the_operator_reads_rates_over() -> None:
    """The operator reads rates over at least two of operator.prometheusScrapeSeconds; two
    settings for one interval let a monitor scrape every minute while the operator assumed
    15 s, and its windows held one sample or none. The monitors now follow it unless set."""

    def intervals(docs: list[dict[str, Any]]) -> list[str]:
        out = [
            e["interval"]
            for e in by_kind(docs, "ServiceMonitor")["slm-gateway"]["spec"]["endpoints"]
        ]
        for pm in by_kind(docs, "PodMonitor").values():
            out += [e["interval"] for e in pm["spec"]["podMetricsEndpoints"]]
        return out

    on = VARIANTS["monitoring"]
    assert set(intervals(render(*on))) == {"15s"}
    assert set(intervals(render(*on, "operator.prometheusScrapeSeconds=30"))) == {"30s"}
    fractional = render_bare(
        CAPTURE_CLAIM, *on, json_values=("operator.prometheusScrapeSeconds=2.5",)
    )
    assert set(intervals(fractional)) == {"2500ms"}
    # A monitor's own interval still wins (the operator must then be told the same).
    own = intervals(render(*on, "monitoring.podMonitor.interval=1m"))
    assert own[0] == "15s" and set(own[1:]) == {"1m"}


def test_monitoring_objects() -> None:
    docs = render(*VARIANTS["monitoring"], namespace="team-a")
    sm = by_kind(docs, "ServiceMonitor")["slm-gateway"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = by_kind(docs, "Service")["slm-gateway"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    # The gateway's own `namespace` label (the AgentTask's) must survive the scrape: the
    # operator selects a task's series by it.
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    op_pm = by_kind(docs, "PodMonitor")["slm-operator"]
    op_pod = by_kind(docs, "Deployment")["slm-operator"]["spec"]["template"]
    assert op_pm["spec"]["selector"]["matchLabels"].items() <= op_pod["metadata"]["labels"].items()
    assert op_pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    ports = container(docs, "slm-operator")["ports"]
    assert {"name": "metrics", "containerPort": 8081} in ports
    assert {"name": "SLM_FLEET_METRICS_PORT", "value": "8081"} in container(docs, "slm-operator")[
        "env"
    ]
    pm = by_kind(docs, "PodMonitor")["slm-triton"]
    assert pm["spec"]["selector"]["matchLabels"]["slmfleet.dev/component"] == "triton"
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not [d for d in render() if d["apiVersion"].startswith("monitoring.coreos.com")]


def documented_gateway_metrics() -> set[str]:
    doc = GATEWAY_METRICS.read_text().split('"""')[1]
    return set(re.findall(r"``(slm_gateway_[a-z_]+)", doc))


def test_dashboard_uses_documented_gateway_metrics() -> None:
    cm = by_kind(render("dashboard.enabled=true"), "ConfigMap")["slm-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["slm-fleet.json"])
    titles = {p["title"] for p in dash["panels"]}
    assert {"SLM share", "p95 latency by backend", "Fallbacks by reason", "Cost saved"} <= titles
    assert any(p.get("repeat") == "task" for p in dash["panels"]), "one row per task"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"slm_gateway_[a-z_]+", e)
    }
    assert used and used <= documented_gateway_metrics(), used - documented_gateway_metrics()
    # A task's name is unique only per namespace: every series is filtered by both, and the
    # task variable lists the chosen namespace's tasks (tests/unit/test_docs_metrics.py too).
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "namespace" in variables and "$namespace" in variables["task"]["query"]["query"]
    for e in exprs:
        for _, labels in re.findall(r"(slm_gateway_[a-z_]+)(\{[^}]*\})?", e):
            assert 'namespace="$namespace"' in labels and 'task="$task"' in labels, e


# ---- alerts: the PrometheusRule, tested by promtool on series that fault and that do not ----

A, T = "agents", "weather"
TASK_LABELS = f'namespace="{A}",task="{T}"'


def _series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{labels}}}", "values": values}


# Per alert: input series (one sample a minute) that should fire it at 40m, and ones that
# must not (healthy, or a fault too small or too short), and the value shown in its summary.
ALERT_CASES: dict[str, tuple[list[dict[str, str]], list[dict[str, str]], dict[str, str], str]] = {
    "SlmFleetAgentErrors": (
        [  # 0.8 calls/s answered, 0.2/s errors: 20 % of calls failed
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="llm"', "0+48x60"),
            _series(
                "slm_gateway_errors_total",
                TASK_LABELS + ',backend="llm",code="upstream_timeout"',
                "0+12x60",
            ),
        ],
        [  # 1 % errors: under the 5 % default
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="llm"', "0+594x60"),
            _series(
                "slm_gateway_errors_total",
                TASK_LABELS + ',backend="llm",code="upstream_timeout"',
                "0+6x60",
            ),
        ],
        {"namespace": A, "task": T},
        "20%",
    ),
    "SlmFleetLlmKeyRejected": (
        [
            _series(
                "slm_gateway_errors_total", TASK_LABELS + ',backend="llm",code="llm_auth"', "0+3x60"
            )
        ],
        [
            _series(
                "slm_gateway_errors_total", TASK_LABELS + ',backend="llm",code="llm_auth"', "5x60"
            )
        ],
        {"namespace": A, "task": T},
        "",
    ),
    "SlmFleetTaskNotServable": (
        [_series("slm_gateway_route_problem", TASK_LABELS + ',reason="llm_key_missing"', "1x60")],
        [  # fixed half an hour ago: the series is gone
            _series("slm_gateway_route_problem", TASK_LABELS + ',reason="llm_key_missing"', "1x10")
        ],
        {"namespace": A, "task": T, "reason": "llm_key_missing"},
        "",
    ),
    "SlmFleetCaptureDropping": (
        [
            _series(
                "slm_gateway_capture_dropped_records_total",
                TASK_LABELS + ',reason="queue_full"',
                "0+1x60",
            ),
            _series(
                "slm_gateway_capture_records_total", TASK_LABELS + ',result="written"', "0+60x60"
            ),
        ],
        [  # drops long ago, none in the last half hour
            _series(
                "slm_gateway_capture_dropped_records_total",
                TASK_LABELS + ',reason="write_failed"',
                "0+1x10 10x50",
            ),
        ],
        {"namespace": A, "task": T, "reason": "queue_full"},
        "",
    ),
    "SlmFleetCaptureBacklog": (
        [_series("slm_gateway_capture_queue_depth", 'instance="10.0.0.7:8080"', "20000x60")],
        [_series("slm_gateway_capture_queue_depth", 'instance="10.0.0.7:8080"', "20000x5 100x55")],
        {"instance": "10.0.0.7:8080"},
        "20000",
    ),
    "SlmFleetSlmCircuitOpen": (
        [_series("slm_gateway_circuit_state", 'backend="slm",endpoint="http://t:8000"', "2x60")],
        [  # half-open and closed again: a circuit doing its job
            _series(
                "slm_gateway_circuit_state",
                'backend="slm",endpoint="http://t:8000"',
                "2 1 0x58",
            )
        ],
        {"endpoint": "http://t:8000"},
        "",
    ),
    "SlmFleetTaskFailed": (
        [
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Failed"', "1x60"),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Serving"', "0x60"),
        ],
        [  # failed for a moment, then fixed by a new spec
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Failed"', "1x3 0x57"),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Training"', "0x3 1x57"),
        ],
        {"namespace": A, "task": T},
        "",
    ),
    "SlmFleetServingTaskOnFallback": (
        [
            _series(
                "slm_operator_task_condition",
                TASK_LABELS + ',type="FallbackActive",status="True"',
                "1x60",
            ),
            _series(
                "slm_operator_task_condition", TASK_LABELS + ',type="Ready",status="False"', "1x60"
            ),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Serving"', "1x60"),
        ],
        [  # a task still training: its calls go to the LLM by design
            _series(
                "slm_operator_task_condition",
                TASK_LABELS + ',type="FallbackActive",status="True"',
                "1x60",
            ),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Training"', "1x60"),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Serving"', "0x60"),
        ],
        {"namespace": A, "task": T},
        "",
    ),
    "SlmFleetOperatorReconcileErrors": (
        [_series("slm_operator_reconcile_total", 'result="error"', "0+2x60")],
        [
            _series("slm_operator_reconcile_total", 'result="error"', "3x60"),
            _series("slm_operator_reconcile_total", 'result="ok"', "0+30x60"),
        ],
        {},
        "",
    ),
    "SlmFleetOperatorNoLeader": (
        [  # two replicas in slm, both standing by (the Lease cannot be renewed); another
            # release's leader in another namespace does not hide it
            _series("slm_operator_leader", 'namespace="slm",pod="slm-operator-a"', "0x60"),
            _series("slm_operator_leader", 'namespace="slm",pod="slm-operator-b"', "0x60"),
            _series("slm_operator_leader", 'namespace="other",pod="other-operator-a"', "1x60"),
        ],
        [  # one leads, one stands by; and a handover's brief gap
            _series("slm_operator_leader", 'namespace="slm",pod="slm-operator-a"', "1x30 0x30"),
            _series("slm_operator_leader", 'namespace="slm",pod="slm-operator-b"', "0x32 1x28"),
        ],
        {"namespace": "slm"},
        "",
    ),
    "SlmFleetOperatorDown": (
        [  # the operator of release namespace slm is not scraped; another release's is
            _series("slm_operator_leader", 'namespace="other",pod="other-operator-a"', "1x60"),
        ],
        [  # a standby alone is still a scraped replica (NoLeader covers it)
            _series("slm_operator_leader", 'namespace="slm",pod="slm-operator-a"', "0x60"),
        ],
        {"namespace": "slm"},
        "",
    ),
    "SlmFleetSlmHandsBackMostCalls": (
        [  # mode slm, 1 call/s answered, 0.6/s of them handed back to the LLM
            _series("slm_gateway_route_mode", TASK_LABELS + ',mode="slm"', "1x60"),
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="llm"', "0+36x60"),
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="slm"', "0+24x60"),
            _series(
                "slm_gateway_fallbacks_total", TASK_LABELS + ',reason="low_confidence"', "0+36x60"
            ),
        ],
        [  # the same share in shadow mode, where the LLM answers by design
            _series("slm_gateway_route_mode", TASK_LABELS + ',mode="shadow"', "1x60"),
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="llm"', "0+60x60"),
            _series(
                "slm_gateway_fallbacks_total", TASK_LABELS + ',reason="low_confidence"', "0+36x60"
            ),
        ],
        {"namespace": A, "task": T},
        "60%",
    ),
}


def _expected_annotations(
    rule: dict[str, Any], labels: dict[str, str], value: str
) -> dict[str, str]:
    """The rule's annotation templates with the labels and value filled in, as Prometheus
    renders them (the test's values are exact, so their formatting is known)."""
    out = {}
    for key, text in rule["annotations"].items():
        for name, val in labels.items():
            text = text.replace(f"{{{{ $labels.{name} }}}}", val)
        text = text.replace("{{ $value | humanizePercentage }}", value)
        out[key] = text.replace("{{ $value }}", value)
    return out


def test_alerts_fire_on_their_fault_and_only_then(tmp_path: Path) -> None:
    """Each alert of the chart's PrometheusRule fires on the fault it names, with the task in
    its labels and summary, and stays quiet on healthy series; promtool checks the rules."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make setup installs it)"
    on = ("monitoring.prometheusRule.enabled=true", "monitoring.podMonitor.enabled=true")
    rule = by_kind(render(*on), "PrometheusRule")["slm"]
    groups = rule["spec"]["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(rules) == set(ALERT_CASES)
    # Without the chart's PodMonitor the operator's series may carry another namespace label.
    only_rule = by_kind(render(on[0]), "PrometheusRule")["slm"]["spec"]["groups"]
    assert "SlmFleetOperatorDown" not in {r["alert"] for g in only_rule for r in g["rules"]}
    used = {m for r in rules.values() for m in re.findall(r"slm_[a-z]+_[a-z_]+", r["expr"])}
    documented = set(
        re.findall(r"`(slm_[a-z]+_[a-z_]+)`", (REPO / "docs" / "metrics.md").read_text())
    )
    assert used <= documented, used - documented
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = []
    for alert, (faulty, healthy, labels, value) in ALERT_CASES.items():
        r = rules[alert]
        fired = {
            "exp_labels": {**labels, "severity": r["labels"]["severity"]},
            "exp_annotations": _expected_annotations(r, labels, value),
        }
        for series, expected in ((faulty, [fired]), (healthy, [])):
            tests.append(
                {
                    "interval": "1m",
                    "input_series": series,
                    "alert_rule_test": [
                        {"eval_time": "40m", "alertname": alert, "exp_alerts": expected}
                    ],
                }
            )
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Faults as they look in production, which the one-case-per-alert table above does not cover:
# (alert, input series, labels it fires with or None when it must stay quiet, summary value).
REAL_FAULTS: list[tuple[str, list[dict[str, str]], dict[str, str] | None, str]] = [
    # Every call fails (a wrong LLM URL on a new task, or an outage since the gateway last
    # restarted): no call was ever answered, so slm_gateway_requests_total has no series.
    (
        "SlmFleetAgentErrors",
        [
            _series(
                "slm_gateway_errors_total",
                TASK_LABELS + ',backend="llm",code="upstream_unavailable"',
                "0+12x60",
            )
        ],
        {"namespace": A, "task": T},
        "100%",
    ),
    # A circuit whose half-open probes time out (a hung SLM): it reads 1 while each probe
    # waits its SLM timeout, then 2 again; it never closes.
    (
        "SlmFleetSlmCircuitOpen",
        [
            _series(
                "slm_gateway_circuit_state",
                'backend="slm",endpoint="http://t:8000"',
                " ".join(["2 2 1"] * 20),
            )
        ],
        {"endpoint": "http://t:8000"},
        "",
    ),
    # A first deployment whose replicas never became ready while agents call the task.
    (
        "SlmFleetServingTaskOnFallback",
        [
            _series(
                "slm_operator_task_condition",
                TASK_LABELS + ',type="FallbackActive",status="True"',
                "1x60",
            ),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Deploying"', "1x60"),
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="llm"', "0+60x60"),
        ],
        {"namespace": A, "task": T},
        "",
    ),
    # A reason's first drops: its series starts with them (no zero before), so there is no
    # increase() to see, only a series that was not there 10 minutes ago.
    (
        "SlmFleetCaptureDropping",
        [
            _series(
                "slm_gateway_capture_dropped_records_total",
                TASK_LABELS + ',reason="write_failed"',
                "_x32 7x28",
            ),
        ],
        {"namespace": A, "task": T, "reason": "write_failed"},
        "",
    ),
    # A served model whose SLO is breached, or with no ready replica (Ready NoReadyReplicas):
    # phase Serving, Ready False, FallbackActive True (it alerts without calls too: the
    # table's case above).
    (
        "SlmFleetServingTaskOnFallback",
        [
            _series(
                "slm_operator_task_condition",
                TASK_LABELS + ',type="FallbackActive",status="True"',
                "1x60",
            ),
            _series(
                "slm_operator_task_condition", TASK_LABELS + ',type="Ready",status="False"', "1x60"
            ),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Serving"', "1x60"),
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="llm"', "0+60x60"),
        ],
        {"namespace": A, "task": T},
        "",
    ),
    # A task scaled to zero (minReplicas 0) that gets no calls: phase Serving, FallbackActive
    # True and Ready True (ScaledToZero), by design. It alerted every idle night before.
    (
        "SlmFleetServingTaskOnFallback",
        [
            _series(
                "slm_operator_task_condition",
                TASK_LABELS + ',type="FallbackActive",status="True"',
                "1x60",
            ),
            _series(
                "slm_operator_task_condition", TASK_LABELS + ',type="Ready",status="True"', "1x60"
            ),
            _series(
                "slm_operator_task_condition", TASK_LABELS + ',type="Ready",status="False"', "0x60"
            ),
            _series("slm_operator_task_phase", TASK_LABELS + ',phase="Serving"', "1x60"),
            _series("slm_gateway_requests_total", TASK_LABELS + ',backend="llm"', "0+60x5 300x55"),
        ],
        None,
        "",
    ),
]


def test_alerts_fire_on_faults_as_they_happen(tmp_path: Path) -> None:
    """The alerts fire on their faults' real shapes: a task none of whose calls succeeds, a
    circuit that flips to half-open for each failing probe, a served model with no replica
    while agents call it (and not an idle task scaled to zero)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make setup installs it)"
    rule = by_kind(render("monitoring.prometheusRule.enabled=true"), "PrometheusRule")["slm"]
    groups = rule["spec"]["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    failed = []
    for alert, series, labels, value in REAL_FAULTS:
        r = rules[alert]
        expected = []
        if labels is not None:
            expected.append(
                {
                    "exp_labels": {**labels, "severity": r["labels"]["severity"]},
                    "exp_annotations": _expected_annotations(r, labels, value),
                }
            )
        test = {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": "40m", "alertname": alert, "exp_alerts": expected}],
        }
        (tmp_path / "tests.yaml").write_text(
            yaml.safe_dump(
                {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [test]}
            )
        )
        result = subprocess.run(
            [promtool, "test", "rules", "tests.yaml"], capture_output=True, text=True, cwd=tmp_path
        )
        if result.returncode != 0:
            failed.append(f"{alert}:\n{result.stdout}{result.stderr}")
    assert not failed, "\n".join(failed)


def install_notes(tmp_path: Path, *values: str, namespace: str = "slm-system") -> str:
    """What `helm install` prints after NOTES:, for these values (on top of values.yaml).
    `helm template` renders no notes and `helm install --dry-run` needs a cluster, so a copy of
    the chart renders NOTES.txt through tpl, with the same engine, helpers and values."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    shown = "templates/notes-as-configmap.yaml"
    (chart / shown).write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
    )
    out = helm(
        "template", "slm", str(chart), "-n", namespace, "--kube-version", kube_version(),
        "--show-only", shown, *sets(list(values)),
    ).stdout  # fmt: skip
    notes: str = yaml.safe_load(out)["data"]["notes"]
    return notes


def test_install_notes_give_a_capture_claims_dataset_uri_only_to_tasks_that_can_mount_it(
    tmp_path: Path,
) -> None:
    """A pod mounts claims of its own namespace only, and the capture claim is in the release
    namespace. The notes told a release watching only team-a to point dataset.uri at
    pvc://<claim>/calls/slm-system/<task>/, where no task is reconciled and which no task in
    team-a can mount; they now say so, and name the object-store target for tasks elsewhere."""
    uri = "pvc://agent-call-logs/calls/slm-system/<task>/"
    elsewhere = "tasks in other namespaces cannot mount this claim"
    for claim in (CAPTURE_CLAIM, "gateway.capture.persistence.create=true"):
        notes = install_notes(tmp_path / claim, claim, "watchNamespaces={team-a}")
        assert "dataset.uri:     none: the captures go to the claim" in notes, notes
        assert "pvc://" not in notes, notes
        assert "Tasks in team-a cannot mount it: set\n" in notes, notes
        assert "gateway.capture.target to an object store" in notes, notes
        assert "add slm-system to watchNamespaces" in notes, notes
    # The release namespace watched alone: its tasks read the claim, nothing to add.
    notes = install_notes(tmp_path / "alone", CAPTURE_CLAIM)
    assert uri in notes and elsewhere not in notes, notes
    # Watched with others, or every namespace: the claim serves the release namespace's tasks.
    for i, watched in enumerate(("watchNamespaces={team-a,slm-system}", "rbac.clusterWide=true")):
        notes = install_notes(tmp_path / str(i), CAPTURE_CLAIM, watched)
        assert uri in notes and elsewhere in notes and "gateway.capture.target" in notes, notes
    # An object store serves every namespace.
    notes = install_notes(
        tmp_path / "remote", "gateway.capture.target=s3://b/calls", "watchNamespaces={team-a}"
    )
    assert "dataset.uri:     s3://b/calls/<namespace>/<task>/" in notes, notes
    assert "cannot mount" not in notes, notes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gateway.replicas=-1", "at '/gateway/replicas': minimum: got -1, want 0"),
        ("operator.logLevel=loud", "at '/operator/logLevel': value must be one of"),
        ("gateway.enabeld=false", "additional properties 'enabeld' not allowed"),
        ("watchNamespaces={Team_A}", "at '/watchNamespaces/0'"),
        ("operator.prometheusURL=prometheus:9090", "at '/operator/prometheusURL'"),
    ],
)
def test_schema_rejects_bad_values_readably(value: str, message: str) -> None:
    err = helm_fails(value)
    assert "values don't meet the specifications of the schema" in err
    assert message in err, err


@pytest.mark.parametrize(
    "value",
    [
        "gateway.capture.persistence.size=-5Gi",
        "gateway.capture.persistence.size=0Gi",
        "gateway.capture.persistence.size=0.0",
        "gateway.capture.emptyDirSizeLimit=-1Gi",
        "gateway.capture.spoolSizeLimit=-1Gi",
        "gateway.resources.requests.cpu=-1",
        "gateway.resources.limits.memory=-512Mi",
        "operator.resources.requests.memory=-1Mi",
        "operator.resources.limits.cpu=-0.5",
    ],
)
def test_schema_refuses_sizes_the_api_server_refuses(value: str) -> None:
    """helm lint --strict passed negative quantities (and a claim of size zero), and the API
    server refused the objects halfway through the install ("must be greater than zero")."""
    err = helm_fails("gateway.capture.ephemeral=true", value)
    assert "values don't meet the specifications of the schema" in err
    assert f"at '/{value.split('=')[0].replace('.', '/')}'" in err, err


def test_schema_keeps_every_quantity_the_api_server_takes() -> None:
    """Zero requests and size limits, signed-plus and exponent forms, numbers given with
    --set: the API server takes them, so the schema must too."""
    docs = render_bare(
        "gateway.capture.ephemeral=true",
        "gateway.capture.spoolSizeLimit=+1.5Gi",
        "gateway.resources.requests.cpu=0",
        "gateway.resources.limits.cpu=2",
        "operator.resources.requests.memory=1e9",
        "operator.resources.limits.memory=1Gi",  # not below the request: refused then
        "operator.resources.limits.cpu=.5",
        json_values=('gateway.capture.emptyDirSizeLimit="0"',),
    )
    volume = capture_volume(docs)
    assert volume is not None and str(volume["emptyDir"]["sizeLimit"]) == "0"
    for size in ("1Gi", "0.5Gi", ".5Ti", "+10Gi", "500M", "1e3"):
        claim = by_kind(
            render_bare(
                "gateway.capture.persistence.create=true",
                f"gateway.capture.persistence.size={size}",
            ),
            "PersistentVolumeClaim",
        )["slm-gateway-capture"]
        assert claim["spec"]["resources"]["requests"]["storage"] == size


def test_alert_groups_follow_what_is_deployed() -> None:
    """The operator's alerts do not depend on the gateway being deployed by this release, and
    no alert reads series the release does not export (metricsPort 0: no slm_operator_*)."""
    on = "monitoring.prometheusRule.enabled=true"

    def groups(*values: str) -> list[str]:
        rules = by_kind(render(on, *values), "PrometheusRule")
        return [g["name"] for r in rules.values() for g in r["spec"]["groups"]]

    assert groups() == ["slm-fleet.gateway", "slm-fleet.operator"]
    assert groups("gateway.enabled=false") == ["slm-fleet.operator"]
    assert groups("operator.metricsPort=0") == ["slm-fleet.gateway"]
    assert groups("gateway.enabled=false", "operator.metricsPort=0") == []


def test_operator_metrics_port_must_differ_from_its_health_port() -> None:
    """One port for both would let the metrics server (bound in kopf's startup) take kopf's
    liveness port, or fail on it: either way the operator pod never becomes healthy. The
    chart refuses it and says which values collide."""
    err = helm_fails(CAPTURE_CLAIM, "operator.metricsPort=8080")
    assert "operator.metricsPort" in err and "operator.healthPort" in err, err


def test_network_policy_without_the_charts_gateway_needs_the_triton_clients_listed() -> None:
    """With gateway.enabled=false the Triton policy admitted inference calls only from this
    release's gateway pods, which do not exist: a gateway run outside the chart could never
    reach an SLM, and every call fell back to the LLM, silently. The chart now refuses that,
    and admits the peers listed in networkPolicy.tritonClients (besides its own gateway)."""
    err = helm_fails("gateway.enabled=false", "networkPolicy.enabled=true")
    assert "networkPolicy.tritonClients" in err and "gateway.enabled=false" in err, err
    client = "networkPolicy.tritonClients[0].namespaceSelector.matchLabels.team=gateways"
    peer = {"namespaceSelector": {"matchLabels": {"team": "gateways"}}}

    def inference_from(*values: str) -> list[dict[str, Any]]:
        policy = by_kind(render(*values), "NetworkPolicy")["slm-triton"]["spec"]
        inference = policy["ingress"][0]
        assert inference["ports"] == [{"port": 8000, "protocol": "TCP"}]
        peers: list[dict[str, Any]] = inference["from"]
        return peers

    assert inference_from("gateway.enabled=false", "networkPolicy.enabled=true", client) == [peer]
    # With the chart's gateway: its pods, and the listed peers too.
    own, listed = inference_from("networkPolicy.enabled=true", client)
    assert own["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert listed == peer
    assert inference_from("networkPolicy.enabled=true") == [own]
    # rbac.clusterWide makes no Triton policy, so there is nothing to refuse.
    wide = render("gateway.enabled=false", "networkPolicy.enabled=true", "rbac.clusterWide=true")
    assert not by_kind(wide, "NetworkPolicy")


# Fractional values, as `helm --set` passes them (text) and as --set-json does (numbers).
FRACTIONAL = (
    "operator.prometheusScrapeSeconds=7.5",
    "operator.resyncSeconds=2.5",
    "operator.dataRecheckSeconds=0.25",
    "gateway.slmTimeoutMs=1500.5",
    "gateway.llmTimeoutSeconds=60.5",
    "gateway.agentAuth.cacheSeconds=0.5",
    "gateway.prices.llm.prompt=0.003",
    "gateway.prices.llm.completion=0.012",
    "gateway.prices.slm.prompt=0.0002",
    "gateway.prices.slm.completion=1e-5",
    "monitoring.prometheusRule.agentErrorRatio=0.1",
    "monitoring.prometheusRule.fallbackShare=0.3",
)


def test_fractional_values_given_with_set_render_as_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`helm --set x=0.1` passes the text "0.1", and the schema wanted a number: only
    --set-json worked. Text that is a decimal is now taken, and renders exactly as the number
    does, in the gateway's flags, the operator's env and the alerts' PromQL."""
    from slm_operator import main

    on = (
        CAPTURE_CLAIM,
        "gateway.agentAuth.mode=serviceaccount",
        *VARIANTS["monitoring"],
    )
    as_text = render_bare(*on, *FRACTIONAL)
    as_numbers = render_bare(*on, json_values=FRACTIONAL)
    assert as_text == as_numbers
    gw = _gateway_config(as_text, monkeypatch)
    assert (gw.slm_timeout_s, gw.llm_timeout_s, gw.agent_auth_cache_s) == (1.5005, 60.5, 0.5)
    assert (gw.prices["llm"].prompt, gw.prices["llm"].completion) == (0.003, 0.012)
    assert (gw.prices["slm"].prompt, gw.prices["slm"].completion) == (0.0002, 1e-5)
    env = {e["name"]: e.get("value") for e in container(as_text, "slm-operator")["env"]}
    known = len(main.SETTINGS_ERRORS)
    for name, expected in (
        ("SLM_FLEET_PROMETHEUS_SCRAPE_SECONDS", 7.5),
        ("SLM_FLEET_RESYNC_SECONDS", 2.5),
        ("SLM_FLEET_DATA_RECHECK_SECONDS", 0.25),
    ):
        monkeypatch.setenv(name, env[name])
        assert main._env_number(name, 1, most=86400) == expected
    assert not main.SETTINGS_ERRORS[known:], main.SETTINGS_ERRORS[known:]
    rules = by_kind(as_text, "PrometheusRule")["slm"]["spec"]["groups"][0]["rules"]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert ") > 0.1\n" in exprs["SlmFleetAgentErrors"]
    assert ") > 0.3\n" in exprs["SlmFleetSlmHandsBackMostCalls"]
    monitor = by_kind(as_text, "ServiceMonitor")["slm-gateway"]["spec"]["endpoints"][0]
    assert monitor["interval"] == "7500ms"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("gateway.llmTimeoutSeconds=0.0", "it must be more than 0 and at most 3600."),
        ("operator.prometheusScrapeSeconds=0.0001", "it must be at least 0.001 and at most 3600."),
        ("monitoring.prometheusRule.agentErrorRatio=1.5", "it must be more than 0 and at most 1."),
        ("gateway.prices.llm.prompt=cheap", "at '/gateway/prices/llm/prompt': 'cheap' does not"),
        ("gateway.prices.slm.completion=-0.5", "'/gateway/prices/slm/completion': '-0.5' does not"),
    ],
)
def test_fractional_values_given_as_text_keep_their_bounds(setting: str, message: str) -> None:
    """The schema bounds only numbers; decimal text gets the same bounds from the chart, and
    text that is no decimal is refused by the schema."""
    err = helm_fails(CAPTURE_CLAIM, "monitoring.prometheusRule.enabled=true", setting)
    assert message in err, err
    if "out of range" in err:
        assert f"{setting} is out of range" in err, err


def test_gateway_pre_stop_sleep_must_end_before_its_grace_period() -> None:
    """A preStop sleep as long as the grace period leaves the gateway no time to drain calls
    and flush captures, and a longer one the API server refuses at apply, mid-upgrade: the
    chart refuses both at render, naming the two values."""
    for values in (
        ("gateway.preStopSleepSeconds=60", "gateway.terminationGracePeriodSeconds=30"),
        ("gateway.preStopSleepSeconds=30", "gateway.terminationGracePeriodSeconds=30"),
        ("gateway.terminationGracePeriodSeconds=0",),
    ):
        err = helm_fails(CAPTURE_CLAIM, *values)
        assert "gateway.preStopSleepSeconds" in err, err
        assert "must be less than gateway.terminationGracePeriodSeconds" in err, err
    pod = by_kind(
        render("gateway.preStopSleepSeconds=29", "gateway.terminationGracePeriodSeconds=30"),
        "Deployment",
    )["slm-gateway"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            ("operator.resources.requests.memory=1Gi",),  # the default limit is 512Mi
            "operator.resources.requests.memory (1Gi) is above "
            "operator.resources.limits.memory (512Mi)",
        ),
        (
            ("gateway.resources.limits.memory=256Mi",),  # the default request is 512Mi
            "gateway.resources.requests.memory (512Mi) is above "
            "gateway.resources.limits.memory (256Mi)",
        ),
        (
            ("operator.resources.requests.cpu=2", "operator.resources.limits.cpu=1500m"),
            "operator.resources.requests.cpu (2) is above operator.resources.limits.cpu (1500m)",
        ),
        (
            ("gateway.resources.requests.cpu=1.5", "gateway.resources.limits.cpu=1"),
            "gateway.resources.requests.cpu (1.5) is above gateway.resources.limits.cpu (1)",
        ),
        (
            (
                "gateway.resources.requests.ephemeral-storage=1.1G",
                "gateway.resources.limits.ephemeral-storage=1Gi",
            ),
            "gateway.resources.requests.ephemeral-storage (1.1G) is above "
            "gateway.resources.limits.ephemeral-storage (1Gi)",
        ),
        (
            ("operator.resources.requests.memory=2e9", "operator.resources.limits.memory=1G"),
            "operator.resources.requests.memory (2e9) is above "
            "operator.resources.limits.memory (1G)",
        ),
    ],
)
def test_resource_requests_above_their_limits_are_refused(
    values: tuple[str, ...], message: str
) -> None:
    """The schema takes each quantity alone; a request above its limit the API server refused
    at apply, halfway through an install or upgrade (the release failed, half-applied). The
    chart compares them as quantities at render and names both values."""
    err = helm_fails(CAPTURE_CLAIM, *values)
    assert message in err, err
    assert "raise the limit too" in err, err


@pytest.mark.parametrize(
    "values",
    [
        ("operator.resources.requests.cpu=500m", "operator.resources.limits.cpu=1"),
        ("operator.resources.requests.memory=512Mi", "operator.resources.limits.memory=0.5Gi"),
        ("gateway.resources.requests.cpu=1", "gateway.resources.limits.cpu=1000m"),
        ("gateway.resources.requests.memory=1G", "gateway.resources.limits.memory=1Gi"),
        ("gateway.resources.requests.memory=1e9", "gateway.resources.limits.memory=1G"),
        ("gateway.resources.requests.cpu=4",),  # no cpu limit by default: nothing to exceed
        ("operator.resources.limits.memory=256Mi", "operator.resources.requests.memory=256Mi"),
    ],
)
def test_resource_requests_at_or_below_their_limits_render(values: tuple[str, ...]) -> None:
    """Equal quantities written differently (500m and 0.5, 512Mi and 0.5Gi) are equal."""
    docs = render(*values)
    for v in values:
        key, _, want = v.partition("=")
        component, _, path = key.partition(".resources.")
        kind, _, name = path.partition(".")
        got = container(docs, f"slm-{component}")["resources"][kind][name]
        assert str(got) == want, (v, got)


def test_gateway_recreate_strategy_refuses_rolling_update_settings() -> None:
    """The API server refuses a Deployment with strategy Recreate and rollingUpdate set."""
    err = helm_fails(
        CAPTURE_CLAIM,
        "gateway.strategy.type=Recreate",
        "gateway.strategy.rollingUpdate.maxSurge=1",
    )
    assert "gateway.strategy.type=Recreate" in err and "gateway.strategy.rollingUpdate" in err
    spec = by_kind(
        render("gateway.strategy.type=RollingUpdate", "gateway.strategy.rollingUpdate.maxSurge=1"),
        "Deployment",
    )["slm-gateway"]["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}
    assert _strategy(render("gateway.strategy.type=Recreate")) == "Recreate"


def test_gateway_disruption_budget_takes_only_a_count_or_a_percentage() -> None:
    """maxUnavailable took any string, which the API server refuses unless it is a
    percentage: the schema now does."""
    for bad in ("one", "150%", "-1"):
        err = helm_fails(
            CAPTURE_CLAIM, "gateway.replicas=2", f"gateway.podDisruptionBudget.maxUnavailable={bad}"
        )
        assert "values don't meet the specifications of the schema" in err, err
        assert "/gateway/podDisruptionBudget/maxUnavailable" in err, err
    for good, rendered in (("50%", "50%"), ("2", 2), ("0", 0)):
        docs = render("gateway.replicas=3", f"gateway.podDisruptionBudget.maxUnavailable={good}")
        assert (
            by_kind(docs, "PodDisruptionBudget")["slm-gateway"]["spec"]["maxUnavailable"]
            == rendered
        )


def test_release_name_with_a_dot_is_refused_not_renamed() -> None:
    """Helm accepts `slm.fleet` as a release name, but the Service slm.fleet-gateway is no DNS
    label: the API server refused it at apply. The chart refuses to render instead (renaming
    would make the objects' names unpredictable, and change them across upgrades)."""
    cp = helm(
        "template",
        "slm.fleet",
        str(CHART),
        "--kube-version",
        kube_version(),
        "--set",
        CAPTURE_CLAIM,
        check=False,
    )
    assert cp.returncode != 0, "a release name with a dot rendered"
    assert 'release name "slm.fleet" contains a dot' in cp.stderr, cp.stderr
    assert "slm-fleet" in cp.stderr, cp.stderr  # what to use instead
    ok = helm("template", "slm-fleet", str(CHART), "--set", CAPTURE_CLAIM).stdout
    assert "name: slm-fleet-gateway" in ok


def test_schema_documents_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(v: Any, s: dict[str, Any], path: str) -> None:
        assert s.get("description"), f"{path or '.'} has no description in values.schema.json"
        if isinstance(v, dict) and "properties" in s:
            for k, sub in v.items():
                assert k in s["properties"], f"{path}.{k} is not in values.schema.json"
                walk(sub, s["properties"][k], f"{path}.{k}")

    walk(values, schema, "")


def test_chart_crds_are_the_repository_crds() -> None:
    ours = sorted(p.name for p in (CHART / "crds").iterdir())
    theirs = sorted(p.name for p in (REPO / "crds").iterdir())
    assert ours == theirs
    _, mismatch, errors = filecmp.cmpfiles(REPO / "crds", CHART / "crds", theirs, shallow=False)
    assert not mismatch and not errors, (
        f"charts/slm-fleet-operator/crds differs from crds/: {mismatch or errors}; "
        "copy crds/ into the chart again"
    )


# ---- the real control plane --------------------------------------------------------------


#: What a release installs outside its namespace.
CLUSTER_KINDS = (
    "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings"
)


def sa_kubeconfig(cluster: ClusterHandle, ns: str, sa: str, path: Path) -> str:
    """A kubeconfig that authenticates as ServiceAccount ``ns/sa`` with a short-lived token."""
    token = cluster.kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    ctx = admin["current-context"]
    path.write_text(
        yaml.safe_dump(
            {
                **admin,
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": ctx,
                        "context": {
                            "cluster": admin["clusters"][0]["name"],
                            "user": sa,
                            "namespace": ns,
                        },
                    }
                ],
            }
        )
    )
    return str(path)


def can_i(cluster: ClusterHandle, ns: str, sa: str, *args: str) -> bool:
    cp = cluster.kubectl(
        "auth", "can-i", *args, f"--as=system:serviceaccount:{ns}:{sa}", check=False
    )
    return cp.stdout.strip() == "yes"


@pytest.fixture
def release(cluster: ClusterHandle, namespace: str, agenttask_crd: Path) -> Iterator[str]:
    """The chart installed with helm into ``namespace``; uninstalled (and checked) after."""
    name = f"slm-{namespace.removeprefix('t-')}"
    kc = ["--kubeconfig", cluster.kubeconfig, "-n", namespace]
    helm(
        "install",
        name,
        str(CHART),
        *kc,
        "--wait",
        "--timeout",
        "180s",
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--set",
        f"gateway.llmApiKeySecrets={{{KEY_SECRET}}}",
        "--set",
        "dashboard.enabled=true",
        # No PVC here: an emptyDir, opted into (pods do not run on kwok nodes anyway).
        "--set",
        "gateway.capture.ephemeral=true",
    )
    try:
        yield name
    finally:
        helm("uninstall", name, *kc, "--wait", "--timeout", "120s", check=False)


def upgrade(cluster: ClusterHandle, ns: str, release: str, *changes: str) -> None:
    """``helm upgrade --reuse-values`` with ``changes``: ``key=value`` sets, or flags."""
    flags = [c for c in changes if c.startswith("--")]
    sets_ = [x for c in changes if not c.startswith("--") for x in ("--set", c)]
    helm(
        "upgrade",
        release,
        str(CHART),
        "--kubeconfig",
        cluster.kubeconfig,
        "-n",
        ns,
        "--reuse-values",
        *flags,
        *sets_,
    )


def test_an_upgrade_to_the_recreate_strategy_is_accepted(
    cluster: ClusterHandle, namespace: str, release: str
) -> None:
    """The API server fills in rollingUpdate for a Deployment made without a strategy; an
    upgrade to Recreate (gateway.strategy, or a capture claim found to be ReadWriteOnce) must
    not keep it, or the API server refuses the update ("may not be specified when strategy
    type is 'Recreate'", helm/helm#5144). A review feared it; the Deployment strategy's
    retainKeys patch strategy clears it, and this holds it so."""
    gateway = f"{release}-gateway"
    before = cluster.get_json("deployment", gateway, "-n", namespace)["spec"]["strategy"]
    assert before["type"] == "RollingUpdate" and before.get("rollingUpdate")
    upgrade(cluster, namespace, release, "gateway.strategy.type=Recreate")
    after = cluster.get_json("deployment", gateway, "-n", namespace)["spec"]["strategy"]
    assert after == {"type": "Recreate"}


def test_install_creates_everything_and_uninstall_cleans_up(
    cluster: ClusterHandle, namespace: str, release: str
) -> None:
    ns = namespace
    selector = f"app.kubernetes.io/instance={release}"
    namespaced = "deployments,services,serviceaccounts,roles,rolebindings,configmaps,leases"
    got = {
        (o["kind"], o["metadata"]["name"])
        for o in cluster.get_json(namespaced, "-n", ns, "-l", selector)["items"]
    }
    assert got == {
        ("Deployment", f"{release}-operator"),
        ("Deployment", f"{release}-gateway"),
        ("Service", f"{release}-gateway"),
        ("ServiceAccount", f"{release}-operator"),
        ("ServiceAccount", f"{release}-gateway"),
        ("Role", f"{release}-operator"),
        ("Role", f"{release}-gateway"),
        ("RoleBinding", f"{release}-operator"),
        ("RoleBinding", f"{release}-gateway"),
        ("ServiceAccount", f"{release}-trainer"),
        ("Role", f"{release}-trainer"),
        ("RoleBinding", f"{release}-trainer"),
        ("ConfigMap", f"{release}-dashboard"),
        ("Role", f"{release}-operator-leader-election"),
        ("RoleBinding", f"{release}-operator-leader-election"),
    }
    cluster_scoped = {
        (o["kind"], o["metadata"]["name"])
        for o in cluster.get_json(CLUSTER_KINDS, "-l", selector)["items"]
    }
    assert cluster_scoped == {
        ("ClusterRole", f"{release}-operator-discovery"),
        ("ClusterRoleBinding", f"{release}-operator-discovery"),
        ("ValidatingAdmissionPolicy", f"{release}-trainer-pods"),
        ("ValidatingAdmissionPolicyBinding", f"{release}-trainer-pods"),
        ("ValidatingAdmissionPolicy", f"{release}-agenttask-accounts"),
        ("ValidatingAdmissionPolicyBinding", f"{release}-agenttask-accounts"),
    }

    # Both Deployments are Available; kwok runs their pods on CPU nodes (GPU nodes are tainted).
    for dep in ("operator", "gateway"):
        cluster.kubectl(
            "wait",
            "-n",
            ns,
            "--for=condition=Available",
            "--timeout=60s",
            f"deployment/{release}-{dep}",
        )
    pods = cluster.get_json("pods", "-n", ns, "-l", selector)["items"]
    assert len(pods) == 2
    assert all(p["spec"]["nodeName"].startswith("kwok-cpu-") for p in pods)
    assert all(p["status"]["phase"] == "Running" for p in pods)

    # RBAC is minimal: the gateway gets the one named Secret, and nothing else about Secrets.
    gw, op = f"{release}-gateway", f"{release}-operator"
    assert can_i(cluster, ns, gw, "get", f"secret/{KEY_SECRET}", "-n", ns)
    assert can_i(cluster, ns, gw, "watch", "agenttasks.slmfleet.dev", "-n", ns)
    for args in (
        ("get", "secret/other-secret", "-n", ns),
        ("list", "secrets", "-n", ns),
        ("watch", "secrets", "-n", ns),
        ("list", "secrets", "--all-namespaces"),
        ("get", f"secret/{KEY_SECRET}", "-n", "default"),
        ("patch", "agenttasks.slmfleet.dev", "-n", ns),
        ("patch", "agenttasks.slmfleet.dev", "--subresource=status", "-n", ns),
        ("list", "agenttasks.slmfleet.dev", "--all-namespaces"),
        ("create", "pods", "-n", ns),
    ):
        assert not can_i(cluster, ns, gw, *args), f"gateway may {args}"
    for args in (
        ("list", "secrets", "--all-namespaces"),
        ("get", f"secret/{KEY_SECRET}", "-n", ns),
        ("create", "jobs.batch", "-n", "default"),
        ("patch", "pods", "-n", ns),
    ):
        assert not can_i(cluster, ns, op, *args), f"operator may {args}"
    # The trainer may patch pods (its progress annotation) in its namespace, and nothing else.
    tr = f"{release}-trainer"
    assert can_i(cluster, ns, tr, "patch", "pods", "-n", ns)
    for args in (
        ("get", "pods", "-n", ns),
        ("create", "pods", "-n", ns),
        ("patch", "pods", "-n", "default"),
        ("get", f"secret/{KEY_SECRET}", "-n", ns),
        ("list", "agenttasks.slmfleet.dev", "-n", ns),
    ):
        assert not can_i(cluster, ns, tr, *args), f"trainer may {args}"

    # The operator creates its Lease at its first start; an upgrade, even a forced one that
    # replaces every object of the release, leaves its holder alone (a chart-owned Lease was
    # replaced empty, and a standby took it while the leader still led).
    kube = Kube(config.new_client_from_config(config_file=cluster.kubeconfig))
    lease = LeaseSettings(ns, f"{release}-operator", "op-0_test")
    elector = LeaderElector(kube, lease, lambda: None, lambda: None)
    assert elector.try_acquire_or_renew()
    upgrade(cluster, ns, release, "operator.replicas=2", "--force")
    held = cluster.get_json("lease", f"{release}-operator", "-n", ns)
    assert held["spec"]["holderIdentity"] == "op-0_test"
    assert held["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "slm-fleet-operator"}

    # helm uninstall removes everything it created (the CRD stays, as Helm keeps CRDs); the
    # operator's Lease stays, as the chart's README says.
    helm("uninstall", release, "--kubeconfig", cluster.kubeconfig, "-n", ns, "--wait")
    wait_for(
        lambda: (
            not cluster.get_json(namespaced, "-n", ns, "-l", selector)["items"]
            and not cluster.get_json(CLUSTER_KINDS, "-l", selector)["items"]
        ),
        timeout=60,
        what="every object of the release to be deleted",
    )
    cluster.get_json("lease", f"{release}-operator", "-n", ns)
    cluster.kubectl("get", "crd", "agenttasks.slmfleet.dev")


def test_installed_service_accounts_are_enough_for_operator_and_gateway(
    cluster: ClusterHandle, namespace: str, release: str, tmp_path: Path
) -> None:
    """Pods do not run on kwok nodes, so the operator and the gateway run here as processes,
    each with nothing but its installed ServiceAccount's token."""
    from test_operator import agenttask, get_task

    from slm_gateway.testing import start_gateway

    ns = namespace
    cluster.kubectl(
        "create", "secret", "generic", KEY_SECRET, "-n", ns, "--from-literal=api-key=sk-test"
    )
    # Where its key may go (the LLM of test_operator's task): else it would go nowhere.
    cluster.kubectl(
        "annotate", "secret", KEY_SECRET, "-n", ns, "slmfleet.dev/llm-hosts=127.0.0.1:9"
    )
    op_kc = sa_kubeconfig(cluster, ns, f"{release}-operator", tmp_path / "operator.kubeconfig")
    gw_kc = sa_kubeconfig(cluster, ns, f"{release}-gateway", tmp_path / "gateway.kubeconfig")
    op = OperatorProcess(op_kc, ns, tmp_path / "operator.log").start()
    try:
        cluster.apply(agenttask(), ns)
        wait_for(
            lambda: (
                (get_task(cluster, ns).get("status") or {}).get("phase") == "PreparingData"
                and cluster.get_json("jobs", "-n", ns)["items"]
            ),
            timeout=60,
            what="the operator to start data preparation with the chart's RBAC",
        )
        with start_gateway(
            ["--namespace", ns, "--kubeconfig", gw_kc], log_path=tmp_path / "gateway.log"
        ) as gw:
            status, body = gw.get("/v1/models")
            assert status == 200 and b"weather" in body
            log = gw.log()
            assert "not readable" not in log and "Forbidden" not in log, log[-2000:]
        # Agent authentication turned on: the chart's ClusterRole lets the gateway review an
        # agent's token, and nothing else about tokens.
        upgrade(cluster, ns, release, "gateway.agentAuth.mode=serviceaccount")
        gateway_sa = f"{release}-gateway"
        assert can_i(cluster, ns, gateway_sa, "create", "tokenreviews.authentication.k8s.io")
        assert not can_i(cluster, ns, gateway_sa, "create", "serviceaccounts/token", "-n", ns)
        cluster.kubectl("create", "serviceaccount", "router", "-n", ns)
        agent = cluster.kubectl(
            "create", "token", "router", "-n", ns, "--audience=slm-fleet-gateway"
        ).stdout.strip()
        # The gateway's flags as the chart renders them.
        args = container(render("gateway.agentAuth.mode=serviceaccount"), "slm-gateway")["args"]
        auth_args = [a for a in args if a.startswith("--agent-auth")]
        assert auth_args[0] == "--agent-auth=serviceaccount"
        with start_gateway(
            ["--namespace", ns, "--kubeconfig", gw_kc, *auth_args],
            log_path=tmp_path / "gateway-auth.log",
        ) as gw:
            assert gw.get("/v1/models")[0] == 401
            req = urllib.request.Request(
                gw.url + "/v1/models", headers={"Authorization": f"Bearer {agent}"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert b"weather" in resp.read()
            assert "Forbidden" not in gw.log() and "cannot be reviewed" not in gw.log()
        assert "Forbidden" not in op.log() and "forbidden" not in op.log()
    finally:
        cluster.kubectl("delete", "agenttasks", "--all", "-n", ns, "--wait=false", check=False)
        op.stop()


def test_existing_capture_claims_access_mode_is_looked_up(
    cluster: ClusterHandle, namespace: str
) -> None:
    """At install (not under plain `helm template`) the chart reads the existing claim's
    access modes: a ReadWriteOnce one gets Recreate, and more than one replica is refused."""
    ns = namespace
    for name, mode in (("calls-rwo", "ReadWriteOnce"), ("calls-rwx", "ReadWriteMany")):
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": name},
                "spec": {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}},
            },
            ns,
        )

    def install(*values: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return helm(
            "template", "slm", str(CHART), "--dry-run=server",
            "--kubeconfig", cluster.kubeconfig, "-n", ns,
            *sets([f"watchNamespaces={{{ns}}}", *values]),
            check=check,
        )  # fmt: skip

    def strategy(*values: str) -> str:
        docs = [d for d in yaml.safe_load_all(install(*values).stdout) if d]
        return _strategy(docs)

    assert strategy("gateway.capture.existingClaim=calls-rwo") == "Recreate"
    assert strategy("gateway.capture.existingClaim=calls-rwx") == "RollingUpdate"
    assert strategy("gateway.capture.existingClaim=calls-rwx", "gateway.replicas=3") == (
        "RollingUpdate"
    )
    refused = install("gateway.capture.existingClaim=calls-rwo", "gateway.replicas=2", check=False)
    assert refused.returncode != 0
    assert "gateway.replicas" in refused.stderr and "ReadWriteOnce" in refused.stderr


def test_the_capture_claim_the_chart_created_is_not_changed_under_it(
    cluster: ClusterHandle, namespace: str, agenttask_crd: Path
) -> None:
    """A claim's access modes and storage class cannot change, nor its size shrink (or grow
    while unbound): the API server refused such an upgrade of the claim the chart created, but
    only after updating the gateway Deployment (2 replicas rolling on a ReadWriteOnce claim),
    and the release was marked failed. The chart reads its own claim back at install and
    upgrade, refuses those changes at render, and takes its access modes from the live claim;
    a reinstall adopting the claim kept on uninstall is held to it the same way."""
    ns = namespace
    name = f"slm-{ns.removeprefix('t-')}"
    kc = ["--kubeconfig", cluster.kubeconfig, "-n", ns]
    claim = f"{name}-gateway-capture"
    created = [
        f"watchNamespaces={{{ns}}}",
        "gateway.capture.persistence.create=true",
        "gateway.capture.persistence.size=1Gi",
        # No such StorageClass: the claim stays Pending, which is all this needs.
        "gateway.capture.persistence.storageClassName=fast",
    ]

    def install(*values: str) -> subprocess.CompletedProcess[str]:
        return helm("install", name, str(CHART), *kc, *sets([*created, *values]), check=False)

    def upgrade_(*values: str) -> subprocess.CompletedProcess[str]:
        return helm(
            "upgrade", name, str(CHART), *kc, "--reuse-values", *sets(list(values)), check=False
        )

    def status() -> tuple[str, int]:
        info = json.loads(helm("status", name, *kc, "-o", "json").stdout)
        return info["info"]["status"], info["version"]

    def gateway() -> dict[str, Any]:
        spec: dict[str, Any] = cluster.get_json("deployment", f"{name}-gateway", "-n", ns)["spec"]
        return spec

    assert install().returncode == 0
    try:
        before = gateway()
        assert before["replicas"] == 1 and before["strategy"] == {"type": "Recreate"}
        # What the replica refusal used to advise: refused at render, nothing applied.
        cp = upgrade_(
            "gateway.replicas=2", "gateway.capture.persistence.accessModes={ReadWriteMany}"
        )
        assert cp.returncode != 0
        err = cp.stderr
        assert "is immutable" not in err, err  # not the API server's refusal, mid-upgrade
        assert f"the capture claim {claim} this chart created is ReadWriteOnce" in err, err
        assert "create a ReadWriteMany claim" in err and "gateway.capture.existingClaim" in err
        assert status() == ("deployed", 1)
        assert gateway() == before
        # The replica refusal no longer advises what cannot be done to an existing claim.
        err = upgrade_("gateway.replicas=2").stderr
        assert "gateway.replicas=2" in err and "gateway.capture.existingClaim" in err, err
        assert "persistence.accessModes" not in err, err
        for change, message in (
            ("gateway.capture.persistence.storageClassName=slow", "storageClassName fast"),
            ("gateway.capture.persistence.size=512Mi", "smaller than the 1Gi"),
            ("gateway.capture.persistence.size=2Gi", "not bound yet"),
        ):
            cp = upgrade_(change)
            assert cp.returncode != 0 and message in cp.stderr, (change, cp.stderr)
            assert "is immutable" not in cp.stderr, cp.stderr
        assert status() == ("deployed", 1)
        # An unset class keeps the claim's: the upgrade does not try to clear it.
        assert upgrade_("gateway.capture.persistence.storageClassName=").returncode == 0
        live = cluster.get_json("pvc", claim, "-n", ns)["spec"]
        assert live["storageClassName"] == "fast" and live["accessModes"] == ["ReadWriteOnce"]
        assert status() == ("deployed", 2)
        # Uninstalled, the claim is kept; a reinstall adopts it, so it is held to it too.
        helm("uninstall", name, *kc, "--wait", "--timeout", "120s")
        cluster.get_json("pvc", claim, "-n", ns)
        cp = install("gateway.capture.persistence.accessModes={ReadWriteMany}")
        assert cp.returncode != 0 and "this chart created is ReadWriteOnce" in cp.stderr, cp.stderr
        deployments = cluster.get_json("deployments", "-n", ns)["items"]
        assert deployments == []
        assert install().returncode == 0
        assert status() == ("deployed", 1)
    finally:
        helm("uninstall", name, *kc, "--wait", "--timeout", "120s", check=False)


def test_the_capture_claim_the_chart_created_grows_only_where_the_api_server_lets_it(
    cluster: ClusterHandle, namespace: str, agenttask_crd: Path
) -> None:
    """A bound claim grows only on a StorageClass with allowVolumeExpansion (the admission
    plugin refuses it otherwise, mid-upgrade): refused at render there, applied where it can.
    A ReadWriteMany claim found live takes more gateway replicas, rolling."""
    ns = namespace
    kc = ["--kubeconfig", cluster.kubeconfig, "-n", ns]
    names = {expands: f"{ns}-{'exp' if expands else 'noexp'}" for expands in (True, False)}
    try:
        for expands, name in names.items():
            release = f"slm-{name.removeprefix('t-')}"
            cluster.apply(
                [
                    {
                        "apiVersion": "storage.k8s.io/v1",
                        "kind": "StorageClass",
                        "metadata": {"name": name},
                        "provisioner": "example.com/none",
                        "allowVolumeExpansion": expands,
                    },
                    {  # bound to the claim the chart will create, as a provisioner would
                        "apiVersion": "v1",
                        "kind": "PersistentVolume",
                        "metadata": {"name": name},
                        "spec": {
                            "capacity": {"storage": "1Gi"},
                            "accessModes": ["ReadWriteMany"],
                            "storageClassName": name,
                            "hostPath": {"path": "/tmp/captures"},
                            "claimRef": {"namespace": ns, "name": f"{release}-gateway-capture"},
                        },
                    },
                ]
            )
            helm(
                "install", release, str(CHART), *kc,
                *sets([
                    f"watchNamespaces={{{ns}}}",
                    "gateway.capture.persistence.create=true",
                    "gateway.capture.persistence.size=1Gi",
                    f"gateway.capture.persistence.storageClassName={name}",
                    "gateway.capture.persistence.accessModes={ReadWriteMany}",
                ]),
            )  # fmt: skip
            wait_for(
                lambda r=release: (
                    cluster.get_json("pvc", f"{r}-gateway-capture", "-n", ns)["status"]["phase"]
                    == "Bound"
                ),
                timeout=60,
                what=f"{release}'s capture claim bound",
            )
            cp = helm(
                "upgrade", release, str(CHART), *kc, "--reuse-values",
                *sets(["gateway.capture.persistence.size=2Gi", "gateway.replicas=2"]),
                check=False,
            )  # fmt: skip
            claim = cluster.get_json("pvc", f"{release}-gateway-capture", "-n", ns)["spec"]
            gateway = cluster.get_json("deployment", f"{release}-gateway", "-n", ns)["spec"]
            if expands:
                assert cp.returncode == 0, cp.stderr
                assert claim["resources"]["requests"]["storage"] == "2Gi"
                assert gateway["replicas"] == 2
                assert gateway["strategy"]["type"] == "RollingUpdate"
            else:
                assert cp.returncode != 0
                assert f"its StorageClass {name} does not allow volume expansion" in cp.stderr
                assert "is forbidden" not in cp.stderr, cp.stderr  # not the admission plugin
                assert claim["resources"]["requests"]["storage"] == "1Gi"
                assert gateway["replicas"] == 1
    finally:
        for name in names.values():
            release = f"slm-{name.removeprefix('t-')}"
            helm("uninstall", release, *kc, "--wait", "--timeout", "120s", check=False)
            cluster.kubectl("delete", "pvc", f"{release}-gateway-capture", "-n", ns, check=False)
            cluster.kubectl("delete", "pv,storageclass", name, "--wait=false", check=False)


def test_operator_log_format_comes_from_values() -> None:
    """kopf's --log-format (plain, full or json) was not settable from the chart, so a log
    shipper that parses JSON got the operator's text lines. full is kopf's own default."""
    assert not any(
        a.startswith("--log-format") for a in container(render(), "slm-operator")["args"]
    )
    op = container(render("operator.logFormat=json"), "slm-operator")
    assert "--log-format=json" in op["args"]
    err = helm_fails(CAPTURE_CLAIM, "operator.logFormat=yaml")
    assert "at '/operator/logFormat': value must be one of" in err, err


def test_gateway_log_format_comes_from_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway had no structured log option: a log shipper that parses JSON got text
    lines, and uvicorn's in a layout of their own. text is the gateway's default."""
    assert "--log-format=text" in container(render(), "slm-gateway")["args"]
    cfg = _gateway_config(render("gateway.logFormat=json"), monkeypatch)
    assert cfg.log_format == "json"
    assert cfg.capture is not None and cfg.capture.log_format == "json"  # the workers too
    err = helm_fails(CAPTURE_CLAIM, "gateway.logFormat=yaml")
    assert "at '/gateway/logFormat': value must be one of" in err, err


def test_gateway_upstream_pool_size_comes_from_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool (connections per upstream origin, shared by all tasks) had no value, flag or
    variable: 1024, fixed. It renders as --upstream-pool-size, and the schema refuses 0."""
    assert "--upstream-pool-size=1024" in container(render(), "slm-gateway")["args"]
    assert _gateway_config(render(), monkeypatch).pool_size == 1024
    cfg = _gateway_config(render("gateway.upstreamPoolSize=64"), monkeypatch)
    assert cfg.pool_size == 64
    err = helm_fails(CAPTURE_CLAIM, "gateway.upstreamPoolSize=0")
    assert "at '/gateway/upstreamPoolSize'" in err, err
