"""Run the real gateway as a child process, for tests, benchmarks and the demo.

Why a process and not an in-process server: capture starts worker processes and flushes on
SIGTERM, and the only faithful test of that is a real signal to a real process. The port is
chosen by the gateway (``--port 0``) and read back from ``--port-file``, so parallel runs
never race for a port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_SOURCE_ROOTS = ("operator", "trainer", "e2e")


@dataclass
class GatewayProcess:
    """A running gateway; ``url`` is its base URL (``http://127.0.0.1:PORT``)."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    # The temporary directory start_gateway made (port file, default log); removed by stop()
    # so that test runs do not leave hundreds of directories in /tmp.
    workdir: Path | None = None
    _final_log: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the gateway drains requests and flushes capture, then exits.

        Returns the exit status: ``-SIGTERM`` after a clean shutdown, because uvicorn
        re-raises the signal it caught once its graceful shutdown is done.
        """
        stop_child(self.proc, timeout)
        if self.workdir is not None:
            # a log kept in the directory stays readable through log() after the stop
            if self.log_path.is_relative_to(self.workdir):
                self._final_log = self.log()
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_child(proc: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM ``proc``, and SIGKILL its whole session if it has not exited after ``grace``
    seconds (at once, with no SIGTERM, for a ``grace`` of 0); returns its exit status.

    Every server these helpers start runs in a session of its own (``start_new_session``),
    so its process group holds whatever it started (the gateway's capture workers,
    tritonserver's Python stubs). The SIGTERM goes to the process alone, which stops its
    children in order (capture flushes); the SIGKILL goes to the group, since a process
    killed alone would leave those children running, holding ports and CPU.
    """
    if proc.poll() is None and grace <= 0:
        # No time to stop in order: the whole session at once. A SIGTERM first, and a
        # process that died of it before the zero-second wait left its children running.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    elif proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def _pythonpath(env: Mapping[str, str]) -> str:
    repo = Path(__file__).resolve().parents[2]
    roots = [str(repo / r) for r in _SOURCE_ROOTS if (repo / r).is_dir()]
    return os.pathsep.join([*roots, *(p for p in [env.get("PYTHONPATH", "")] if p)])


def start_gateway(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: str | Path | None = None,
    timeout: float = 90.0,
    python: str | None = None,
) -> GatewayProcess:
    """Start ``python -m slm_gateway ARGS --port 0`` and wait until ``/readyz`` says ready."""
    workdir = Path(tempfile.mkdtemp(prefix="slm-gateway-"))
    port_file = workdir / "port"
    log = Path(log_path) if log_path else workdir / "gateway.log"
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = _pythonpath(full_env)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [
        python or sys.executable,
        "-m",
        "slm_gateway",
        *args,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def ready(port: int) -> bool:
        try:
            return GatewayProcess(proc, port, log).get("/readyz", timeout=5)[0] == 200
        except OSError:
            return False

    port = await_ready(proc, port_file, log, workdir, ready, "gateway", timeout)
    return GatewayProcess(proc, port, log, workdir)


def await_ready(
    proc: subprocess.Popen[bytes],
    port_file: Path,
    log: Path,
    workdir: Path,
    ready: Callable[[int], bool],
    what: str,
    timeout: float,
) -> int:
    """The port a child wrote to ``port_file``, once ``ready(port)`` says it serves.

    If it exits first, is not ready within ``timeout``, or the wait is interrupted (Ctrl-C,
    SIGTERM turned into an exception, a test's timeout), its whole session (capture workers
    too) is killed and ``workdir`` removed before the error goes on: the caller never got a
    handle to stop it with, and a child left running would hold its port and CPU until the
    machine stops.
    """
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
            if port_file.exists() and ready(port := int(port_file.read_text())):
                return port
            time.sleep(0.05)
        raise RuntimeError(f"{what} not ready within {timeout}s:\n{_tail(log)}")
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
