"""The real Triton Inference Server on 127.0.0.1, for tests, benchmarks and the demo.

Why this exists: the project serves SLMs with Triton's Python backend, and tests must load the
exported model repository in the real server. PyPI's ``nvidia-pytriton`` ships a real
``tritonserver`` binary with the Python backend; this module runs it the way the recipe in
shared/docs/real-components.md found to work:

- a writable copy of the backends folder, with the Python backend stub for this interpreter's
  version copied in (site-packages stays untouched);
- ``LD_LIBRARY_PATH`` pointing at this Python's own ``LIBDIR``, or the stub picks the system's
  older libpython and models fail to load;
- this interpreter's site-packages (and any extra paths) on ``PYTHONPATH``, so ``model.py``
  can import torch, transformers and peft;
- free ports on 127.0.0.1 for HTTP, gRPC and metrics; a wait for ``/v2/health/ready`` that
  fails early, with the log tail, if the server exits; stop by pid.

Usage::

    with start_triton(repo) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slm_e2e.cluster import free_ports
from slm_gateway.testing import stop_child

#: Log lines after which the server will not become ready, though it may not exit for a while.
_FATAL = ("error while loading shared libraries", "failed to load", "Stub process", "UNAVAILABLE:")


class TritonError(RuntimeError):
    """tritonserver could not be started; the message carries the end of its log."""


def pytriton_dir() -> Path:
    """The ``tritonserver`` folder inside the installed nvidia-pytriton package."""
    try:
        import pytriton
    except ImportError as exc:
        raise TritonError(
            "nvidia-pytriton is not installed (pip install 'nvidia-pytriton==0.7.0')"
        ) from exc
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def prepare_backends(dest: Path) -> Path:
    """A writable copy of pytriton's backends with this Python's backend stub in it."""
    root = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backends = dest / "backends"
    if not (backends / "python" / stub.name).is_file():
        shutil.copytree(root / "backends", backends, dirs_exist_ok=True)
        shutil.copy2(stub, backends / "python" / stub.name)
    return backends


def server_env(
    extra_pythonpath: Sequence[str] = (), base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the stub needs: this Python's libpython and site-packages."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    # the copied stub's RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) no longer resolves
    bundled = str(pytriton_dir().parent.parent / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, bundled, env.get("LD_LIBRARY_PATH", "")) if p
    )
    # The stub's embedded interpreter ignores PYTHONPATH; it finds its prefix from the first
    # python3 on PATH, so this interpreter's bin folder goes first (as an activated venv
    # does) and the venv's site-packages, editable installs included, become importable.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    paths = [*extra_pythonpath, *site.getsitepackages(), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@dataclass
class TritonServer:
    """A running tritonserver; ``stop()`` (or leaving the ``with`` block) ends it."""

    process: subprocess.Popen[bytes]
    repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    workdir: Path
    _own_workdir: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self.ready():
                return
            tail = self.log_tail(20)
            if any(sign in tail for sign in _FATAL):
                raise TritonError(f"tritonserver failed; log {self.log_path}:\n{tail}")
            time.sleep(0.25)
        raise TritonError(
            f"tritonserver not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM by pid, then SIGKILL of its process group after ``grace`` seconds."""
        stop_child(self.process, grace)  # the SIGKILL reaches its Python stubs too
        if self._own_workdir:
            # start_triton made the directory (backends copy, log): leave nothing in /tmp
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._own_workdir = False
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_triton(
    repository: Path,
    workdir: Path | None = None,
    extra_pythonpath: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
    extra_args: Sequence[str] = (),
    attempts: int = 3,
    exit_timeout: int = 5,
) -> TritonServer:
    """Start tritonserver on ``repository`` and return once every model is ready.

    ``env`` entries are added to the server's environment (e.g. ``OMP_NUM_THREADS``). A port
    taken between picking and binding is retried with new ports up to ``attempts`` times.
    ``exit_timeout`` bounds how long a stopping server waits for clients that keep idle
    keep-alive connections open (Triton's default is 30 s).
    """
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="slm-triton-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        backends = prepare_backends(workdir)
        binary = pytriton_dir() / "bin" / "tritonserver"
        full_env = server_env(extra_pythonpath)
    except BaseException:  # no stub for this Python, pytriton missing: no directory left
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    full_env.update(env or {})
    last: TritonError | None = None
    for attempt in range(attempts):
        ports = free_ports(3)  # three different ones: gRPC and metrics must differ
        log_path = workdir / f"tritonserver-{ports[0]}.log"
        argv = [
            str(binary),
            f"--model-repository={Path(repository).resolve()}",
            f"--backend-directory={backends}",
            f"--http-port={ports[0]}",
            f"--grpc-port={ports[1]}",
            f"--metrics-port={ports[2]}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={exit_timeout}",
            # several servers may run side by side: keep their shared-memory regions apart
            f"--backend-config=python,shm-region-prefix-name=slm{uuid.uuid4().hex[:8]}",
            *extra_args,
        ]
        log = log_path.open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=workdir,
            start_new_session=True,
        )
        log.close()
        # Not owning the directory yet: a retry after a port clash reuses its backends copy.
        server = TritonServer(
            proc, Path(repository), ports[0], ports[1], ports[2], log_path, workdir, False
        )
        try:
            server.wait_ready(timeout)
            server._own_workdir = own
            return server
        except TritonError as exc:
            server.stop()
            last = exc
            # gRPC says "Address already in use"; the HTTP and metrics services say "Socket
            # '127.0.0.1:N' already in use": a retry on new ports for either
            if "already in use" not in server.log_tail(200).lower():
                break
            if attempt + 1 < attempts:
                continue
        except BaseException:  # a Ctrl-C, SIGTERM or test timeout in the wait of up to 180 s
            server.stop()  # tritonserver and its Python stubs (a torch model each)
            if own:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    assert last is not None
    raise last
