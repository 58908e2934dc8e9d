"""Test helpers shared by the test suite, benchmarks and the demo: a kubectl handle and polling."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slm_e2e.cluster import LocalCluster, free_port
from slm_gateway.testing import stop_child

#: 127.0.0.1 and ::1 as /proc/net/tcp and tcp6 write local addresses (hex).
LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}


def listening_addresses(pid: int) -> list[str]:
    """The local addresses (hex ``ADDR:PORT``, as /proc/net/tcp writes them) of the TCP
    sockets process ``pid`` listens on: for tests that nothing listens beyond loopback."""
    listening: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # LISTEN
                listening[int(cols[9])] = cols[1]
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in listening:
            found.append(listening[int(target[8:-1])])
    return found


@dataclass
class ClusterHandle:
    """What tests get: the kubeconfig, the built binaries and a kubectl helper."""

    kubeconfig: str
    bin_dir: Path
    kubectl_path: Path
    local: LocalCluster | None

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and cp.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {cp.returncode}:\n{cp.stderr}{cp.stdout}"
            )
        return cp

    def apply(
        self,
        objs: dict[str, Any] | list[dict[str, Any]],
        namespace: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        docs = objs if isinstance(objs, list) else [objs]
        ns = ["-n", namespace] if namespace else []
        return self.kubectl(
            "apply",
            "--server-side",
            "--field-manager=slm-fleet-tests",
            *ns,
            "-f",
            "-",
            input=yaml.safe_dump_all(docs),
            check=check,
        )

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def wait_crd_established(self, name: str, timeout: float = 60) -> None:
        """Poll rather than ``kubectl wait``: a CRD created a moment ago may have no status
        yet, which ``kubectl wait --for=condition=Established`` reports as an error
        (".status.conditions accessor error") instead of waiting."""

        def established() -> bool:
            status = self.get_json("crd", name).get("status") or {}
            return any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in status.get("conditions") or []  # null until the controller has run
            )

        wait_for(established, timeout=timeout, what=f"the CRD {name} to be Established")


def send_json(handler: Any, doc: Any, status: int = 200) -> None:
    """Answer an ``http.server`` request with ``doc`` as JSON (a tiny stand-in server)."""
    body = json.dumps(doc).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60,
    interval: float = 0.25,
    what: str = "condition",
) -> Any:
    """Poll until predicate returns a truthy value; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class OperatorProcess:
    """The real operator (``slm-fleet-operator``, i.e. kopf) as a child process.

    Tests kill it with SIGKILL to prove a restart at any point converges, so it must be a
    separate process rather than an in-process KopfRunner.
    """

    def __init__(
        self,
        kubeconfig: str,
        namespace: str,
        log_path: Path,
        resync_seconds: float = 2.0,
        extra_env: dict[str, str] | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        #: The operator's own /metrics (slm_operator_*), when a port was given.
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""
        self.env = {
            "KUBECONFIG": kubeconfig,
            "SLM_FLEET_RESYNC_SECONDS": str(resync_seconds),
            "SLM_FLEET_METRICS_PORT": str(metrics_port),
            "SLM_FLEET_METRICS_ADDR": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, attempts: int = 5) -> OperatorProcess:
        """Start the operator; with a metrics port, until /metrics answers on it.

        Why wait: the port was free when the test picked it, and the operator binds it
        seconds later, in kopf's startup handler. Taken meanwhile (another test's server on
        this shared machine), that handler fails and kopf retries it only after a minute,
        without reconciling anything; so the operator is started again on another port.
        """
        import sys

        exe = Path(sys.executable).parent / "slm-fleet-operator"
        for _ in range(attempts):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            self.proc = subprocess.Popen(
                [str(exe), "--namespace", self.namespace, "--verbose"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
            log.close()
            try:
                bound = not self.metrics_url or self._metrics_bound(offset)
            except BaseException:
                # Interrupted (Ctrl-C, a SIGTERM turned into an exception), timed out or
                # exited: the caller gets no handle to stop it with, so it goes now, with
                # whatever it started (no grace: a second Ctrl-C must not find it running).
                stop_child(self.proc, 0)
                raise
            if bound:
                return self
            stop_child(self.proc, 15)
            port = free_port()
            self.env["SLM_FLEET_METRICS_PORT"] = str(port)
            self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        raise RuntimeError(f"the operator's metrics port was taken {attempts} times")

    def _metrics_bound(self, offset: int, timeout: float = 60.0) -> bool:
        """True once /metrics answers; False if the log says its port was taken."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.metrics_url, timeout=2),
            ):
                return True
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                if b"Address already in use" in fh.read():
                    return False
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited ({self.proc.returncode}); see its log")
            time.sleep(0.1)
        raise TimeoutError(f"the operator's /metrics did not answer within {timeout:.0f}s")

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers run, exactly like a node or OOM kill."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc:
            stop_child(self.proc, 15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
