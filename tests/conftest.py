"""Shared fixtures: one real local control plane per test session, on demand.

The control plane comes up only when a test asks for ``cluster`` (unit tests never pay for
it). ``KUBECONFIG`` may name a running cluster made by ``e2e`` (``slm-fleet-cluster up``) to
skip the start-up; any other cluster is refused, because these tests create and delete
namespaces, CRDs and nodes.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_e2e.binaries import BinariesMissing, go_available, locate
from slm_e2e.cluster import CONTEXT, LocalCluster
from slm_e2e.signals import STOP_SIGNALS, interrupt_on_stop_signals
from slm_e2e.testing import ClusterHandle, wait_for

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """A CI timeout or a Ctrl-C in another terminal sends SIGTERM, a closed terminal SIGHUP.
    Python's default would end the run at once and leave etcd, the apiserver, Prometheus and
    tritonserver running; as a KeyboardInterrupt pytest stops the test and still runs every
    fixture's teardown."""
    if threading.current_thread() is threading.main_thread():
        interrupt_on_stop_signals()


def pytest_keyboard_interrupt(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    """Once a Ctrl-C or a stop signal has ended the tests, ignore further ones while the
    fixtures stop their servers, as the demo's cleanup does. A second Ctrl-C while one server
    took its time to stop (tritonserver) cut the teardown short, and every fixture after it,
    the control plane's included, left its servers running. Not after ``-x`` or
    ``--maxfail`` (pytest stops the same way): no one has asked to stop there."""
    if not isinstance(excinfo.value, KeyboardInterrupt) or isinstance(
        excinfo.value, pytest.Session.Interrupted
    ):
        return
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, *STOP_SIGNALS):
            signal.signal(sig, signal.SIG_IGN)
        print(
            "\nstopping the servers the tests started; Ctrl-C is ignored until then",
            file=sys.stderr,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test collected is a failure, not success with nothing to show: ``make test`` and CI
    see exit code 1 (pytest's own is 5). Here rather than in the Makefile, so that the recipe
    is pytest alone and a SIGTERM to make reaches it (a shell between them swallowed it)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("\nno tests collected")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _binaries_or_skip() -> Any:
    try:
        return locate()
    except BinariesMissing as exc:
        if not go_available():
            pytest.skip(
                "integration tests need the local control plane, built from source with the Go "
                f"toolchain (>= 1.26), which is not installed: {exc}"
            )
        # Not built here: a cold build takes about 15 minutes on 2 cores, past the 900 s
        # pytest-timeout gives a fixture, and a timeout killed the build script but left its
        # go children running, holding the build lock.
        pytest.fail(f"{exc}; then run the tests again", pytrace=False)


def _refuse_foreign_kubeconfig(kc: str) -> None:
    """End the session unless ``kc`` is one kubeconfig file whose current context is a local
    slm-fleet cluster. A list of files (``a:b``, as kubectl merges them) is refused as well:
    it crashed here with FileNotFoundError, and the kubectl these tests run is handed
    ``--kubeconfig``, which takes one file, so no SLM_FLEET_ALLOW_FOREIGN_CLUSTER helps."""
    if os.pathsep in kc:
        pytest.exit(
            f"KUBECONFIG={kc} lists several files; the tests take one: set it to the local "
            f"slm-fleet cluster's kubeconfig alone (context {CONTEXT!r}), or unset it",
            returncode=2,
        )
    cfg = yaml.safe_load(Path(kc).read_text())
    if cfg.get("current-context") != CONTEXT and not os.environ.get(
        "SLM_FLEET_ALLOW_FOREIGN_CLUSTER"
    ):
        pytest.exit(
            f"KUBECONFIG={kc} is not a local slm-fleet cluster (context {CONTEXT!r}); "
            "unset it, or set SLM_FLEET_ALLOW_FOREIGN_CLUSTER=1 if you really mean it",
            returncode=2,
        )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    bins = _binaries_or_skip()
    kc = os.environ.get("KUBECONFIG")
    if kc:
        _refuse_foreign_kubeconfig(kc)
        yield ClusterHandle(kc, bins.kubectl.parent, bins.kubectl, None)
        return
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    state = local.up()  # a failed or interrupted start stops what it started
    # A KeyboardInterrupt in an earlier fixture's teardown (a Ctrl-C while the tests were
    # being torn down) skips this one's: stopped at exit then, since the next run deletes the
    # state file, the only record of the pids. down() is a no-op on a stopped cluster.
    atexit.register(local.down)
    print(f"\nlocal control plane ready in {state.ready_seconds}s at {local.dir}")
    try:
        yield ClusterHandle(str(local.kubeconfig), bins.kubectl.parent, bins.kubectl, local)
    finally:
        local.down()
        atexit.unregister(local.down)


@pytest.fixture
def namespace(cluster: ClusterHandle) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: (
            cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode
            == 0
        ),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def agenttask_crd(cluster: ClusterHandle) -> Path:
    crds = REPO / "crds"
    cluster.kubectl("apply", "--server-side", "--field-manager=slm-fleet-tests", "-f", str(crds))
    cluster.wait_crd_established("agenttasks.slmfleet.dev")
    return crds
