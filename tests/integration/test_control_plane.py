"""Proof that the local control plane behaves like a real cluster where we rely on it.

Scheduling honours GPU resources and taints, the Job controller completes Jobs, CRDs with
status subresources, OpenAPI descriptions and CEL rules work as in production, and nothing
listens beyond the loopback interface.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from slm_e2e import cluster as clustermod
from slm_e2e.cluster import COMPONENTS, LocalCluster, Starting, State
from slm_e2e.testing import LOOPBACK_HEX, ClusterHandle, listening_addresses, wait_for

pytestmark = pytest.mark.integration


def _deployment(name: str, replicas: int, gpus: int, tolerate_gpu: bool) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {"requests": {"cpu": "100m"}}
    spec: dict[str, Any] = {
        "containers": [{"name": "main", "image": "example.invalid/x:1", "resources": resources}]
    }
    if tolerate_gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }


def _pods(cluster: ClusterHandle, ns: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json("pods", "-n", ns, "-l", selector)["items"]
    return items


def test_gpu_deployment_becomes_available_only_on_gpu_nodes(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.apply(_deployment("gpu-app", 3, gpus=1, tolerate_gpu=True), namespace)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "--timeout=60s", "deployment/gpu-app"
    )
    pods = _pods(cluster, namespace, "app=gpu-app")
    assert len(pods) == 3
    assert {p["spec"]["nodeName"].rsplit("-", 1)[0] for p in pods} == {"kwok-gpu"}
    assert all(p["status"]["phase"] == "Running" for p in pods)


def test_gpu_request_never_lands_on_cpu_node_even_when_gpus_run_out(
    cluster: ClusterHandle, namespace: str
) -> None:
    # 2 GPU nodes x 8 GPUs: a pod asking for 9 GPUs fits nowhere and must stay Pending,
    # although the CPU nodes have room and tolerate nothing special.
    cluster.apply(_deployment("too-big", 1, gpus=9, tolerate_gpu=True), namespace)

    def unschedulable() -> bool:
        pods = _pods(cluster, namespace, "app=too-big")
        return bool(pods) and any(
            c.get("reason") == "Unschedulable"
            for c in pods[0].get("status", {}).get("conditions", [])
        )

    wait_for(unschedulable, timeout=30, what="the 9-GPU pod to be reported Unschedulable")
    pod = _pods(cluster, namespace, "app=too-big")[0]
    assert "nodeName" not in pod["spec"]
    assert "nvidia.com/gpu" in str(pod["status"]["conditions"])


def test_cpu_pod_without_toleration_avoids_tainted_gpu_nodes(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.apply(_deployment("cpu-app", 4, gpus=0, tolerate_gpu=False), namespace)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "--timeout=60s", "deployment/cpu-app"
    )
    nodes = {p["spec"]["nodeName"] for p in _pods(cluster, namespace, "app=cpu-app")}
    assert nodes and all(n.startswith("kwok-cpu-") for n in nodes)


def _job(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "example.invalid/job:1"}],
                },
            },
        },
    }


def test_job_pod_completes_and_job_reaches_complete(cluster: ClusterHandle, namespace: str) -> None:
    cluster.apply(_job("hello"), namespace)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Complete", "--timeout=60s", "job/hello"
    )
    job = cluster.get_json("job", "hello", "-n", namespace)
    assert job["status"]["succeeded"] == 1
    pod = _pods(cluster, namespace, "job-name=hello")[0]
    assert pod["status"]["phase"] == "Succeeded"


def test_trainer_pods_keep_running_until_their_result_is_reported(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.apply(_job("train", {clustermod.TRAINER_LABEL: "trainer"}), namespace)
    wait_for(
        lambda: [
            p
            for p in _pods(cluster, namespace, "job-name=train")
            if p["status"].get("phase") == "Running"
        ],
        timeout=30,
        what="the trainer pod to run",
    )
    # Other Job pods complete within a second here; this one must still be running.
    wait_for(
        lambda: cluster.get_json("job", "train", "-n", namespace)["status"].get("active"),
        timeout=10,
        what="the trainer Job to count an active pod",
    )
    job = cluster.get_json("job", "train", "-n", namespace)
    assert not job["status"].get("succeeded")


MIN_MAX_MESSAGE = "spec.min must be less than or equal to spec.max"
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.proof.slmfleet.dev"},
    "spec": {
        "group": "proof.slmfleet.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "description": "A Widget proves CRD handling on the local control plane.",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "description": "Desired widget sizing.",
                                "required": ["size"],
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.min <= self.max",
                                        "message": MIN_MAX_MESSAGE,
                                    }
                                ],
                                "properties": {
                                    "size": {
                                        "type": "string",
                                        "enum": ["small", "large"],
                                        "description": "How big the widget is: small or large.",
                                    },
                                    "min": {
                                        "type": "integer",
                                        "default": 1,
                                        "minimum": 0,
                                        "description": "Fewest widgets to keep.",
                                    },
                                    "max": {
                                        "type": "integer",
                                        "default": 3,
                                        "description": "Most widgets allowed.",
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "ready": {
                                        "type": "boolean",
                                        "description": "Whether it is ready.",
                                    }
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def widget_crd(cluster: ClusterHandle) -> None:
    cluster.apply(WIDGET_CRD)
    cluster.wait_crd_established("widgets.proof.slmfleet.dev")
    # Discovery for a fresh CRD can lag a moment behind Established.
    wait_for(
        lambda: cluster.kubectl("explain", "widget.spec", check=False).returncode == 0,
        timeout=30,
        what="kubectl explain to discover the Widget CRD",
    )


def _widget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "proof.slmfleet.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": spec,
    }


def test_crd_with_status_subresource_and_explain(
    cluster: ClusterHandle, namespace: str, widget_crd: None
) -> None:
    cluster.apply(_widget(size="small"), namespace)
    obj = cluster.get_json("widget", "w", "-n", namespace)
    assert obj["spec"] == {"size": "small", "min": 1, "max": 3}  # server-side defaults
    cluster.kubectl(
        "patch",
        "widget",
        "w",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"ready":true}}',
    )
    assert cluster.get_json("widget", "w", "-n", namespace)["status"] == {"ready": True}
    explained = cluster.kubectl("explain", "widget.spec").stdout
    assert "Desired widget sizing." in explained
    assert "How big the widget is: small or large." in explained


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"size": "small", "min": 5, "max": 2}, MIN_MAX_MESSAGE),
        ({"size": "huge"}, 'Unsupported value: "huge"'),
        ({"min": 1}, "spec.size: Required value"),
        ({"size": "small", "min": -1}, "should be greater than or equal to 0"),
    ],
)
def test_invalid_object_is_rejected_with_the_rule_message(
    cluster: ClusterHandle, namespace: str, widget_crd: None, spec: dict[str, Any], message: str
) -> None:
    cp = cluster.apply(_widget(**spec), namespace, check=False)
    assert cp.returncode != 0
    assert message in cp.stderr


def test_nothing_listens_beyond_loopback(cluster: ClusterHandle) -> None:
    if cluster.local is None:
        pytest.skip("cluster given by KUBECONFIG was not started by this session")
    seen = 0
    for name in COMPONENTS:
        for address in listening_addresses(cluster.local.state.pids[name]):
            seen += 1
            assert address.split(":")[0] in LOOPBACK_HEX, f"{name} listens on {address}"
    assert seen >= len(COMPONENTS), "every component should listen on at least one port"


def test_busy_port_is_skipped_and_down_after_crash_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port taken by someone else is never handed to a component, and ``down`` copes with
    components that died behind its back."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    real_free_port = clustermod.free_port
    offered = iter([busy_port, busy_port])
    monkeypatch.setattr(clustermod, "free_port", lambda: next(offered, None) or real_free_port())

    c = LocalCluster(tmp_path / "c")
    c.dir.mkdir(parents=True)
    c.state = State(dir=str(c.dir))
    etcd = _etcd_alone(c)
    try:
        c._start_with_ports(etcd.name, etcd.port_names, etcd.argv_for, etcd.ready, etcd.what)
        busy.close()
        assert busy_port not in c.state.ports.values()
        pid = c.state.pids["etcd"]

        os.killpg(pid, signal.SIGKILL)  # the "crash"
        wait_for(lambda: not clustermod._pid_alive(pid), timeout=10, what="etcd to die")
        status = LocalCluster(tmp_path / "c").status()
        assert status["components"]["etcd"]["running"] is False
        assert LocalCluster(tmp_path / "c").down() == []  # nothing alive to stop, no error
        assert State.load(tmp_path / "c").pids == {}  # type: ignore[union-attr]
    finally:  # a failed assert above must not leave a real etcd running
        busy.close()
        LocalCluster(tmp_path / "c").down()


def _etcd_alone(c: LocalCluster) -> Starting:
    """An etcd of its own in ``c``'s directory: a real component that needs no other."""
    bins = c.bins
    return Starting(
        "etcd",
        ("etcd", "etcd-peer"),
        lambda: [
            str(bins.etcd),
            f"--data-dir={c.dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{c.state.ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{c.state.ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{c.state.ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{c.state.ports['etcd-peer']}",
            f"--initial-cluster=default=http://127.0.0.1:{c.state.ports['etcd-peer']}",
            "--unsafe-no-fsync",
        ],
        lambda: c._get(f"http://127.0.0.1:{c.state.ports['etcd']}/health")[0] == 200,
        "etcd /health",
    )


def test_a_component_started_without_waiting_that_loses_its_port_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller-manager, scheduler and kwok start together and are awaited after; one
    whose port another process took between the check and the bind must be started again on
    another port, not end the cluster's start with "exited"."""
    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen()
    stolen = thief.getsockname()[1]
    real_free_port = clustermod.free_port
    offered = iter([stolen])
    monkeypatch.setattr(clustermod, "free_port", lambda: next(offered, None) or real_free_port())
    # the race: the port was free when checked, and taken before the component bound it
    monkeypatch.setattr(clustermod, "port_is_free", lambda port: True)

    c = LocalCluster(tmp_path / "c")
    c.dir.mkdir(parents=True)
    c.state = State(dir=str(c.dir))
    etcd = _etcd_alone(c)
    try:
        c._spawn_on_free_ports(etcd.name, etcd.port_names, etcd.argv_for)
        assert c.state.ports["etcd"] == stolen
        c._await_started(etcd)
        assert c.state.ports["etcd"] != stolen
        assert etcd.ready()
        clash_logs = list(c.logs.glob("etcd.port-clash-*.log"))
        assert len(clash_logs) == 1
        assert "address already in use" in clash_logs[0].read_text().lower()
    finally:
        thief.close()
        stopped = c.down()
    assert stopped == ["etcd"]


def test_a_clash_in_an_earlier_start_s_log_is_not_taken_for_this_start_s(
    tmp_path: Path,
) -> None:
    """Logs are appended to across starts: a start that fails for another reason must say
    so, not be retried as a port clash on the strength of an old line."""
    c = LocalCluster(tmp_path / "c")
    c.dir.mkdir(parents=True)
    c.state = State(dir=str(c.dir))
    c.logs.mkdir()
    (c.logs / "etcd.log").write_text("bind: address already in use (an earlier start)\n")
    broken = dataclasses.replace(
        _etcd_alone(c), argv_for=lambda: [str(c.bins.etcd), "--no-such-flag"]
    )
    with pytest.raises(clustermod.ClusterError, match="exited while waiting") as err:
        c._start_with_ports(
            broken.name, broken.port_names, broken.argv_for, broken.ready, broken.what
        )
    assert "address already in use" not in str(err.value)  # the tail is this start's
    assert not list(c.logs.glob("etcd.port-clash-*.log"))


def test_a_start_interrupted_half_way_stops_what_it_had_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C once etcd and the API server are up: up() stops both before the interrupt
    goes on, whoever called it (the CLI, the test fixture, the demo)."""
    spawned: dict[str, int] = {}
    real_spawn = LocalCluster._spawn

    def recording_spawn(self: LocalCluster, name: str, argv: list[str], env: Any = None) -> int:
        spawned[name] = real_spawn(self, name, argv, env)
        return spawned[name]

    def ctrl_c(self: LocalCluster, p: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalCluster, "_spawn", recording_spawn)
    monkeypatch.setattr(LocalCluster, "_write_kubeconfig", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        LocalCluster(tmp_path / "c").up()
    assert sorted(spawned) == ["etcd", "kube-apiserver"]
    for name, pid in spawned.items():
        assert not clustermod._pid_alive(pid), f"{name} still runs"
    assert State.load(tmp_path / "c").pids == {}  # type: ignore[union-attr]


def test_status_reports_running_components(cluster: ClusterHandle) -> None:
    if cluster.local is None:
        pytest.skip("cluster given by KUBECONFIG was not started by this session")
    st = copy.deepcopy(cluster.local).status()
    assert st["running"] is True and st["apiserverReady"] is True
    assert set(st["components"]) == set(COMPONENTS)


def test_a_kubernetes_client_leaves_no_copy_of_the_admin_key_behind(
    cluster: ClusterHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin kubeconfig names the PKI files instead of holding them inline. With inline
    data the Kubernetes Python client (what the operator, the gateway and the tests use)
    writes the private key to a temporary file that only a clean exit removes, and every
    process a test or the demo killed left one in /tmp."""
    if cluster.local is None:
        pytest.skip("cluster given by KUBECONFIG was not started by this session")
    import tempfile

    import kubernetes

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the client would write
    client = kubernetes.config.new_client_from_config(config_file=cluster.kubeconfig)
    try:
        namespaces = kubernetes.client.CoreV1Api(client).list_namespace().items
    finally:
        client.close()
    assert "default" in {ns.metadata.name for ns in namespaces}
    assert list(tmp_path.iterdir()) == []
    assert "PRIVATE KEY" not in Path(cluster.kubeconfig).read_text()


def test_a_prometheus_that_is_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    """A Prometheus that missed its readiness deadline kept running: the caller never got
    the object to stop it, and every later run on the machine shared its 2 cores with it."""
    from slm_e2e.prometheus import LocalPrometheus, PrometheusError

    prom = LocalPrometheus(tmp_path, {})
    with pytest.raises(PrometheusError, match="did not become ready"):
        prom.start(timeout=0.0)
    assert prom.proc is not None and prom.proc.poll() is not None  # stopped and reaped


def test_a_prometheus_whose_port_was_taken_meanwhile_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """free_port() releases the port it found before Prometheus binds it; on a shared machine
    another process can take it in between, and Prometheus exited with "address already in
    use", failing whatever test needed it."""
    import socket
    import urllib.request

    from slm_e2e import prometheus
    from slm_e2e.cluster import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], free_port()])
        monkeypatch.setattr(prometheus, "free_port", lambda: next(ports))
        prom = prometheus.LocalPrometheus(tmp_path, {})
        try:
            prom.start()
            assert prom.port != taken.getsockname()[1]
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5) as r:
                assert r.status == 200
        finally:
            prom.stop()
    assert "address already in use" in (tmp_path / "prometheus.log").read_text()
