"""A real local Kubernetes control plane on 127.0.0.1: ``up``, ``down`` and ``status``.

Why this exists: every part of SLM Fleet Operator is tested against a real kube-apiserver,
and the machines we develop and run CI on have no container engine. So we run the real
binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) as plain processes
and let kwok play the kubelets of fake nodes, some of them GPU nodes. Pods are scheduled for
real (resources, taints, node selectors) and kwok moves them to Running; generic Job pods
complete on their own. Trainer pods (label ``slmfleet.dev/component=trainer``) are left
Running, because in a real cluster they run the trainer for minutes to hours: a test or the
demo finishes them with the trainer's real result, exactly as the kubelet would report it.

All state of one cluster (certificates, etcd data, logs, pid files, kubeconfig) lives in one
directory; every port is a free port on 127.0.0.1, so several clusters can run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slm_e2e import pki as pkimod
from slm_e2e.binaries import Binaries, BinariesMissing, locate
from slm_e2e.signals import STOP_SIGNALS, interrupt_on_stop_signals

CONTEXT = "slm-fleet-local"
TRAINER_LABEL = "slmfleet.dev/component"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
#: Starts of one component on fresh ports before a port race is reported as an error.
PORT_ATTEMPTS = 4
#: The annotation on the nodes ``up`` creates, by which kwok knows the nodes it plays.
FAKE_NODE_ANNOTATION, FAKE_NODE_VALUE = "kwok.x-k8s.io/node", "fake"


class ClusterError(RuntimeError):
    """The control plane could not be brought up; the message names the component and log."""


def free_ports(n: int) -> list[int]:
    """``n`` different free ports of 127.0.0.1: the sockets stay bound until all are picked,
    because a port freed by one pick may be handed out again by the next (a clean-clone run
    got the same port for Triton's gRPC and metrics, and tritonserver refused to start)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Starting:
    """How to start one component and tell that it is ready (ports are picked per start)."""

    name: str
    port_names: tuple[str, ...]
    argv_for: Callable[[], list[str]]
    ready: Callable[[], bool]
    what: str


@dataclass
class State:
    """What ``up`` started; persisted as ``state.json`` so ``down`` and ``status`` can find it."""

    dir: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    binaries: dict[str, str] = field(default_factory=dict)
    kubeconfig: str = ""
    started_at: float = 0.0
    ready_seconds: float = 0.0

    @classmethod
    def load(cls, directory: Path) -> State | None:
        p = directory / "state.json"
        if not p.is_file():
            return None
        return cls(**json.loads(p.read_text()))

    def save(self) -> None:
        p = Path(self.dir) / "state.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(p)


def fake_nodes_ready(nodes: Sequence[dict[str, Any]], expected: int) -> bool:
    """Whether at least ``expected`` of the fake nodes ``up`` created (kwok's annotation) exist
    and every one of them is Ready. Other nodes do not count: one a user added by hand has no
    kubelet here and is never Ready, and it made ``up`` throw the whole cluster away."""
    fake = [
        n
        for n in nodes
        if n.get("metadata", {}).get("annotations", {}).get(FAKE_NODE_ANNOTATION) == FAKE_NODE_VALUE
    ]
    return len(fake) >= expected and all(
        any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in n.get("status", {}).get("conditions", [])
        )
        for n in fake
    )


def _pid_alive(pid: int, binary: str | None = None) -> bool:
    """True when pid runs and (if given) is still our binary, not a recycled pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        # reaped between the two reads (not our child: init reaps it at once) is gone too
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    except OSError:
        return False
    return binary is None or (bool(cmdline) and cmdline[0].decode(errors="replace") == binary)


class LocalCluster:
    """Drives one control plane in ``directory``. Use :meth:`up`, :meth:`down`, :meth:`status`."""

    def __init__(
        self,
        directory: Path,
        gpu_nodes: int = 2,
        cpu_nodes: int = 2,
        gpus_per_node: int = 8,
        timeout: float = 90.0,
    ) -> None:
        self.dir = directory.resolve()
        self.gpu_nodes = gpu_nodes
        self.cpu_nodes = cpu_nodes
        self.gpus_per_node = gpus_per_node
        self.timeout = timeout
        self.logs = self.dir / "logs"
        self.kubeconfig = self.dir / "kubeconfig"
        self.state = State(dir=str(self.dir))
        self._bins: Binaries | None = None
        #: Whether the last :meth:`up` kept a cluster that was already running.
        self.reused = False
        #: Where each component's log stood when it was last spawned: logs are appended to
        #: across starts, and only this start's lines say why it failed.
        self._log_starts: dict[str, int] = {}

    # ---------------------------------------------------------------- helpers
    @property
    def bins(self) -> Binaries:
        if self._bins is None:
            self._bins = locate()
        return self._bins

    def _ssl_context(self) -> ssl.SSLContext:
        p = pkimod.Pki(self.dir / "pki")
        ctx = ssl.create_default_context(cafile=str(p.ca_crt))
        ctx.load_cert_chain(str(p.admin_crt), str(p.admin_key))
        return ctx

    def _get(self, url: str, tls: bool = False) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                url, timeout=3, context=self._ssl_context() if tls else None
            ) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self._log_starts[name] = log.tell()
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.dir,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.state.pids[name] = proc.pid
        self.state.binaries[name] = argv[0]
        self.state.save()
        return proc.pid

    def _log_tail(self, name: str, lines: int = 15) -> str:
        p = self.logs / f"{name}.log"
        if not p.is_file():
            return "(no log)"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])

    def _wait(self, name: str, check: Any, what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        pid = self.state.pids.get(name)
        while time.monotonic() < deadline:
            # Alive, and then ready: a component that died on a port clash must not pass on
            # another one's answer from that port.
            alive = pid is None or _pid_alive(pid)
            if alive and check():
                return
            if not alive:
                raise ClusterError(
                    f"{name} exited while waiting for {what}; log {self.logs}/{name}.log:\n"
                    + self._log_tail(name)
                )
            time.sleep(0.1)
        raise ClusterError(
            f"timed out after {timeout or self.timeout:.0f}s waiting for {what}; "
            f"log {self.logs}/{name}.log:\n" + self._log_tail(name)
        )

    def _start_with_ports(
        self,
        name: str,
        port_names: Sequence[str],
        argv_for: Callable[[], list[str]],
        ready: Callable[[], bool],
        what: str,
        attempts: int = PORT_ATTEMPTS,
    ) -> None:
        """Start a component on fresh free ports; if a port was taken meanwhile, try others."""
        for attempt in range(attempts):
            self._spawn_on_free_ports(name, port_names, argv_for)
            try:
                self._wait(name, ready, what)
                return
            except ClusterError:
                if attempt + 1 < attempts and self._lost_port(name):
                    continue
                self._stop_one(name)  # not ready: nothing of it stays running
                raise

    def _spawn_on_free_ports(
        self, name: str, port_names: Sequence[str], argv_for: Callable[[], list[str]]
    ) -> None:
        """Spawn ``name`` on ports free now and given to no other component (those spawned
        together have not bound theirs yet, and the kernel may offer one twice)."""
        for pn in port_names:
            self.state.ports.pop(pn, None)
            taken = set(self.state.ports.values())
            p = free_port()
            while p in taken or not port_is_free(p):
                p = free_port()
            self.state.ports[pn] = p
        self._spawn(name, argv_for())

    def _lost_port(self, name: str) -> bool:
        """Whether ``name`` failed because another process took its port between our check
        and its bind; if so it is stopped and its log kept aside for the next attempt."""
        log = self.logs / f"{name}.log"
        with log.open("rb") as fh:
            fh.seek(self._log_starts.get(name, 0))
            this_start = fh.read().decode(errors="replace")
        if "address already in use" not in this_start.lower():
            return False
        self._stop_one(name)
        n = 0
        while (aside := self.logs / f"{name}.port-clash-{n}.log").exists():
            n += 1
        log.rename(aside)
        return True

    def _await_started(self, s: Starting) -> None:
        """Wait for a component spawned without waiting (its start overlapped the others');
        one that lost a port race meanwhile is started again on other ports."""
        try:
            self._wait(s.name, s.ready, s.what)
        except ClusterError:
            if not self._lost_port(s.name):
                raise
            self._start_with_ports(
                s.name, s.port_names, s.argv_for, s.ready, s.what, attempts=PORT_ATTEMPTS - 1
            )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run(
            [str(self.bins.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and cp.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {cp.stderr.strip()}")
        return cp

    # ---------------------------------------------------------------- up
    def up(self, say: Callable[[str], None] | None = None) -> State:
        """Start everything and wait until nodes are Ready; idempotent if already running
        (then :attr:`reused` is set and the old start's state returned).

        A cluster in the directory that cannot be reused is stopped and started from scratch:
        new certificates and an empty etcd, so every object in it is gone and kubeconfigs
        written before stop working. ``say`` is told why first, since that is no small thing.

        A start that fails or is interrupted (a Ctrl-C, a SIGTERM or SIGHUP turned into an
        exception) stops what it had started, keeping the logs: every caller, the CLI, the
        test fixture and the demo, would otherwise have to, and the state file is the only
        record of the pids."""
        existing = State.load(self.dir)
        why = self._not_reusable(existing) if existing else None
        self.reused = existing is not None and why is None
        if existing and why is None:
            return existing
        if existing:
            if say:
                say(
                    f"the control plane in {self.dir} cannot be reused ({why}): starting it "
                    "from scratch, with every object and certificate new (kubeconfigs written "
                    "before stop working)"
                )
            self.down(quiet=True)
        try:
            return self._start_all()
        except BaseException:
            self.down(quiet=True)
            raise

    def _start_all(self) -> State:
        bins = self.bins
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = State(dir=str(self.dir), started_at=time.time())
        p = pkimod.generate(self.dir / "pki")

        etcd_dir = self.dir / "etcd"
        # A fresh PKI invalidates everything stored before (tokens, secrets): start clean.
        shutil.rmtree(etcd_dir, ignore_errors=True)
        self._start_with_ports(
            "etcd",
            ["etcd", "etcd-peer"],
            lambda: [
                str(bins.etcd),
                "--name=default",
                f"--data-dir={etcd_dir}",
                f"--listen-client-urls=http://127.0.0.1:{self.state.ports['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{self.state.ports['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{self.state.ports['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.state.ports['etcd-peer']}",
                f"--initial-cluster=default=http://127.0.0.1:{self.state.ports['etcd-peer']}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
            lambda: self._get(f"http://127.0.0.1:{self.state.ports['etcd']}/health")[0] == 200,
            "etcd /health",
        )

        self._start_with_ports(
            "kube-apiserver",
            ["apiserver"],
            lambda: [
                str(bins.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.state.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.state.ports['apiserver']}",
                f"--tls-cert-file={p.serving_crt}",
                f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_crt}",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--storage-media-type=application/vnd.kubernetes.protobuf",
                "--v=1",
            ],
            lambda: (
                self._get(f"https://127.0.0.1:{self.state.ports['apiserver']}/readyz", tls=True)[0]
                == 200
            ),
            "kube-apiserver /readyz",
        )
        self._write_kubeconfig(p)
        self.state.kubeconfig = str(self.kubeconfig)
        self.state.save()

        kc = str(self.kubeconfig)
        stages = self._kwok_stages()
        # Started together (each takes seconds to come up), then awaited one by one.
        starting = [
            Starting(
                "kube-controller-manager",
                ("controller-manager",),
                lambda: [
                    str(bins.kube_controller_manager),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={self.state.ports['controller-manager']}",
                    f"--tls-cert-file={p.serving_crt}",
                    f"--tls-private-key-file={p.serving_key}",
                    f"--service-account-private-key-file={p.sa_key}",
                    f"--root-ca-file={p.ca_crt}",
                    f"--cluster-signing-cert-file={p.ca_crt}",
                    f"--cluster-signing-key-file={p.ca_key}",
                    "--use-service-account-credentials=true",
                    "--leader-elect=false",
                    "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
                    "--node-monitor-grace-period=60s",
                    "--v=1",
                ],
                self._controller_manager_ready,
                "kube-controller-manager /healthz and the default ServiceAccount",
            ),
            Starting(
                "kube-scheduler",
                ("scheduler",),
                lambda: [
                    str(bins.kube_scheduler),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={self.state.ports['scheduler']}",
                    f"--tls-cert-file={p.serving_crt}",
                    f"--tls-private-key-file={p.serving_key}",
                    "--leader-elect=false",
                    "--v=1",
                ],
                self._scheduler_ready,
                "kube-scheduler /healthz",
            ),
            Starting(
                "kwok",
                ("kwok",),
                lambda: [
                    str(bins.kwok),
                    f"--kubeconfig={kc}",
                    f"--server-address=127.0.0.1:{self.state.ports['kwok']}",
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector="
                    f"{FAKE_NODE_ANNOTATION}={FAKE_NODE_VALUE}",
                    "--cidr=10.244.0.1/16",
                    "--node-ip=10.0.0.1",
                    "--node-lease-duration-seconds=40",
                    *[f"--config={s}" for s in stages],
                ],
                self._nodes_ready,
                "all fake nodes Ready",
            ),
        ]
        for s in starting:
            self._spawn_on_free_ports(s.name, s.port_names, s.argv_for)
        self.kubectl(
            "apply",
            "--server-side",
            "--field-manager=slm-fleet-e2e",
            "-f",
            "-",
            input=yaml.safe_dump_all(self._nodes()),
        )
        for s in starting:
            self._await_started(s)
        self.state.ready_seconds = round(time.monotonic() - t0, 2)
        self.state.save()
        return self.state

    def _controller_manager_ready(self) -> bool:
        code, _ = self._get(
            f"https://127.0.0.1:{self.state.ports['controller-manager']}/healthz", tls=True
        )
        if code != 200:
            return False
        return (
            self.kubectl(
                "get", "serviceaccount", "default", "-n", "default", check=False
            ).returncode
            == 0
        )

    def _scheduler_ready(self) -> bool:
        url = f"https://127.0.0.1:{self.state.ports['scheduler']}/healthz"
        return self._get(url, tls=True)[0] == 200

    def _nodes_ready(self) -> bool:
        cp = self.kubectl("get", "nodes", "-o", "json", check=False)
        if cp.returncode != 0:
            return False
        return fake_nodes_ready(json.loads(cp.stdout)["items"], self.gpu_nodes + self.cpu_nodes)

    def _write_kubeconfig(self, p: pkimod.Pki) -> None:
        """The admin kubeconfig, naming the PKI files rather than holding their contents.

        Why paths: the Kubernetes Python client (the operator, the gateway and the tests use
        it) writes inline ``*-data`` certificates and keys to temporary files and removes
        them only at a clean exit, so every operator or gateway a test or the demo killed
        left the admin's private key in /tmp (about 500 files on a development machine). The
        files live in the cluster's directory and go with it on ``down``.
        """
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": CONTEXT,
            "clusters": [
                {
                    "name": CONTEXT,
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.state.ports['apiserver']}",
                        "certificate-authority": str(p.ca_crt.resolve()),
                    },
                }
            ],
            "users": [
                {
                    "name": "slm-fleet-admin",
                    "user": {
                        "client-certificate": str(p.admin_crt.resolve()),
                        "client-key": str(p.admin_key.resolve()),
                    },
                }
            ],
            "contexts": [
                {
                    "name": CONTEXT,
                    "context": {
                        "cluster": CONTEXT,
                        "user": "slm-fleet-admin",
                        "namespace": "default",
                    },
                }
            ],
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg))
        self.kubeconfig.chmod(0o600)

    def _kwok_stages(self) -> list[Path]:
        """kwok's own fast stages; pod-complete skips trainer pods (see module docstring)."""
        src = self.bins.kwok_stages
        out = self.dir / "stages"
        out.mkdir(exist_ok=True)
        paths = []
        for f in sorted(src.glob("*.yaml")):
            doc = yaml.safe_load(f.read_text())
            if doc["metadata"]["name"] == "pod-complete":
                doc["spec"]["selector"]["matchExpressions"].append(
                    {
                        "key": f'.metadata.labels["{TRAINER_LABEL}"]',
                        "operator": "NotIn",
                        "values": ["trainer"],
                    }
                )
            dst = out / f.name
            dst.write_text(yaml.safe_dump(doc, sort_keys=False))
            paths.append(dst)
        return paths

    def _nodes(self) -> list[dict[str, Any]]:
        nodes = []
        for i in range(self.gpu_nodes + self.cpu_nodes):
            gpu = i < self.gpu_nodes
            name = f"kwok-gpu-{i}" if gpu else f"kwok-cpu-{i - self.gpu_nodes}"
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "node.kubernetes.io/instance-type": "p5.48xlarge" if gpu else "m7i.8xlarge",
            }
            alloc: dict[str, str] = {
                "cpu": "32",
                "memory": "256Gi",
                "pods": "110",
                "ephemeral-storage": "1Ti",
            }
            taints = []
            if gpu:
                labels |= {
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": GPU_PRODUCT,
                    "nvidia.com/gpu.count": str(self.gpus_per_node),
                }
                alloc["nvidia.com/gpu"] = str(self.gpus_per_node)
                taints.append({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"})
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "annotations": {
                            FAKE_NODE_ANNOTATION: FAKE_NODE_VALUE,
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                    },
                    "spec": {"taints": taints},
                    "status": {"allocatable": alloc, "capacity": alloc},
                }
            )
        return nodes

    # ---------------------------------------------------------------- down / status
    def _not_reusable(self, st: State) -> str | None:
        """Why ``st`` cannot be reused, or None when it is a finished start that still serves:
        every component running, the apiserver ready and every fake node it made Ready.

        Running is not enough: a start killed after it spawned the last component (SIGKILL, a
        crash) leaves all five alive but maybe no nodes yet, and ``ready_seconds`` is only
        written once a start finished."""
        if not st.pids:
            return "it was stopped"
        dead = [c for c in COMPONENTS if not _pid_alive(st.pids.get(c, -1), st.binaries.get(c))]
        if len(dead) == len(COMPONENTS):
            return "none of its components is running"
        if dead:
            return f"{', '.join(dead)} {'is' if len(dead) == 1 else 'are'} not running"
        if st.ready_seconds <= 0:
            return "its last start did not finish"
        self.state = st
        url = f"https://127.0.0.1:{st.ports.get('apiserver')}/readyz"
        if self._get(url, tls=True)[0] != 200:
            return "kube-apiserver is not ready"
        if not self._nodes_ready():
            return f"not all {self.gpu_nodes + self.cpu_nodes} fake nodes are Ready"
        return None

    def _stop_one(self, name: str, grace: float = 10.0) -> None:
        pid = self.state.pids.get(name)
        binary = self.state.binaries.get(name)
        if pid is None:
            return
        if _pid_alive(pid, binary):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _pid_alive(pid, binary):
                time.sleep(0.05)
            if _pid_alive(pid, binary):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        self.state.pids.pop(name, None)
        self.state.save()

    def down(self, quiet: bool = False) -> list[str]:
        """Stop every component by pid (stale pids are just forgotten); keeps logs."""
        st = State.load(self.dir)
        if st is None:
            return []
        self.state = st
        stopped = []
        # A second Ctrl-C or SIGTERM (common while each component gets 10 s of grace) must not
        # cut the loop short and leave the rest running: held until every one is stopped.
        held = {signal.SIGINT, *STOP_SIGNALS}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for name in reversed(COMPONENTS):
                if name in st.pids:
                    if _pid_alive(st.pids[name], st.binaries.get(name)):
                        stopped.append(name)
                    self._stop_one(name)
            self.state.pids = {}
            self.state.save()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return stopped

    def status(self) -> dict[str, Any]:
        st = State.load(self.dir)
        if st is None:
            return {"dir": str(self.dir), "running": False, "components": {}}
        self.state = st
        comps = {
            c: {
                "pid": st.pids.get(c),
                "running": _pid_alive(st.pids.get(c, -1), st.binaries.get(c)),
            }
            for c in COMPONENTS
        }
        ready = False
        if st.ports.get("apiserver") and comps["kube-apiserver"]["running"]:
            ready = (
                self._get(f"https://127.0.0.1:{st.ports['apiserver']}/readyz", tls=True)[0] == 200
            )
        return {
            "dir": str(self.dir),
            "kubeconfig": st.kubeconfig,
            "ports": st.ports,
            "running": all(c["running"] for c in comps.values()),
            "apiserverReady": ready,
            "components": comps,
            "readySeconds": st.ready_seconds,
        }


def default_dir() -> Path:
    return Path(os.environ.get("SLM_FLEET_CLUSTER_DIR", Path.cwd() / ".cluster"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="slm-fleet-cluster",
        description="Run a real local Kubernetes control plane (etcd, kube-apiserver, "
        "kube-controller-manager, kube-scheduler, kwok fake nodes) on 127.0.0.1.",
        epilog="up keeps a cluster already running in --dir; one that is not (a component "
        "stopped, a fake node not Ready) is started over from scratch, every object and "
        "certificate new. status prints the cluster as JSON and exits 0 only when every "
        "component runs and the apiserver is ready, 1 otherwise (for scripts and CI).",
    )
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="state directory (default: $SLM_FLEET_CLUSTER_DIR or ./.cluster)",
    )
    ap.add_argument("--gpu-nodes", type=int, default=2)
    ap.add_argument("--cpu-nodes", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds to wait per component")
    a = ap.parse_args(argv)
    # up() stops what it started when interrupted; SIGTERM and SIGHUP as well, this way.
    interrupt_on_stop_signals()
    c = LocalCluster(a.dir or default_dir(), a.gpu_nodes, a.cpu_nodes, a.gpus_per_node, a.timeout)
    try:
        if a.command == "up":
            st = c.up(say=lambda msg: print(msg, file=sys.stderr))
            if c.reused:
                print(
                    f"control plane already running (started in {st.ready_seconds}s)",
                    file=sys.stderr,
                )
            else:
                print(f"control plane ready in {st.ready_seconds}s", file=sys.stderr)
            print(f"export KUBECONFIG={st.kubeconfig}")
        elif a.command == "down":
            stopped = c.down()
            print(
                "stopped: " + (", ".join(stopped) if stopped else "nothing was running"),
                file=sys.stderr,
            )
        else:
            status = c.status()
            print(json.dumps(status, indent=2))
            # a script or CI step asking "is it up?" gets its answer from the exit code
            return 0 if status["running"] and status.get("apiserverReady") else 1
    except (BinariesMissing, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing it started was left running", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
