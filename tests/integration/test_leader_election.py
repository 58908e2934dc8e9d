"""Leader election on a real Lease: one replica reconciles, a standby takes over.

The elector's rules are checked against the real API server (its resourceVersion checks are
what keep two candidates from both winning); then two real operator processes show what a
platform engineer running ``operator.replicas: 2`` relies on: the standby does nothing while
the leader lives, takes over when the leader dies only after the lease ran out, takes over at
once when the leader shuts down cleanly, and converges the task without duplicate children.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config
from test_operator import (  # noqa: F401
    agenttask,
    finetune_result,
    get_task,
    jobs,
    ok,
    revision,
    storage,
)

from slm_e2e.cluster import free_port
from slm_e2e.kubelet import complete_job
from slm_e2e.testing import ClusterHandle, OperatorProcess, wait_for
from slm_operator import naming as n
from slm_operator.kube import Kube, KubeError
from slm_operator.leader import LeaderElector, LeaseSettings

pytestmark = pytest.mark.integration

LEASE = "slm-fleet-operator"


class Clock:
    """A monotonic clock the test moves: expiry is judged on it, not on wall time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(kube: Kube, ns: str, who: str, clock: Clock, lease_s: float = 3) -> LeaderElector:
    settings = LeaseSettings(ns, LEASE, who, lease_s, lease_s * 2 / 3, lease_s / 6)
    return LeaderElector(kube, settings, lambda: None, lambda: None, clock=clock)


def lease(cluster: ClusterHandle, ns: str) -> dict[str, Any]:
    return cluster.get_json("lease", LEASE, "-n", ns)


def steal(cluster: ClusterHandle, ns: str, intruder: str, seconds: int) -> None:
    """Write another holder into the Lease the way a replica would: a read-modify-write on the
    resourceVersion, read again when the leader renewed in between (a 409 Conflict)."""
    for _ in range(10):
        stolen = lease(cluster, ns)
        stolen["spec"].update(holderIdentity=intruder, leaseDurationSeconds=seconds)
        stolen["metadata"].pop("managedFields", None)
        cp = cluster.kubectl("replace", "-f", "-", input=json.dumps(stolen), check=False)
        if cp.returncode == 0:
            return
        assert "Conflict" in cp.stderr, cp.stderr
    raise AssertionError("the leader renewed the Lease before each of 10 writes")


@pytest.fixture
def kube(cluster: ClusterHandle) -> Kube:
    return Kube(config.new_client_from_config(config_file=cluster.kubeconfig))


def test_a_held_lease_is_taken_over_only_after_it_expires_on_the_takers_clock(
    cluster: ClusterHandle, namespace: str, kube: Kube
) -> None:
    clock = Clock()
    a, b = elector(kube, namespace, "a", clock), elector(kube, namespace, "b", clock)
    assert a.try_acquire_or_renew()  # no lease yet: created, held by a
    assert lease(cluster, namespace)["spec"]["holderIdentity"] == "a"
    assert not b.try_acquire_or_renew()
    clock.now += 2.9
    assert not b.try_acquire_or_renew()  # 2.9 s since b saw this record: not expired
    assert a.try_acquire_or_renew()  # a renews: a new record...
    assert not b.try_acquire_or_renew()  # ...whose 3 s start when b sees it
    clock.now += 2.9
    assert not b.try_acquire_or_renew()
    clock.now += 0.2
    assert b.try_acquire_or_renew()  # 3.1 s of silence: b takes over
    spec = lease(cluster, namespace)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()  # a sees b's record as new: no way back


def test_a_renew_time_from_a_skewed_clock_does_not_free_the_lease(
    cluster: ClusterHandle, namespace: str, kube: Kube
) -> None:
    """The holder's clock runs an hour behind: its renewTime looks an hour old, yet the lease
    is live. Judging by renewTime would make two leaders; the taker's own clock does not."""
    cluster.apply(
        [
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": LEASE, "namespace": namespace},
                "spec": {
                    "holderIdentity": "skewed",
                    "leaseDurationSeconds": 15,
                    "acquireTime": "2026-01-01T00:00:00.000000Z",
                    "renewTime": "2026-01-01T00:00:00.000000Z",
                },
            }
        ]
    )
    clock = Clock()
    b = elector(kube, namespace, "b", clock)
    assert not b.try_acquire_or_renew()
    clock.now += 14
    assert not b.try_acquire_or_renew()
    clock.now += 1.5
    assert b.try_acquire_or_renew()


def race(candidates: list[LeaderElector]) -> dict[str, bool | str]:
    """Every candidate tries at the same moment: identity -> won, or the error it got."""
    results: dict[str, bool | str] = {}
    barrier = threading.Barrier(len(candidates))

    def campaign(c: LeaderElector) -> None:
        barrier.wait()
        try:
            results[c.settings.identity] = c.try_acquire_or_renew()
        except KubeError as e:
            results[c.settings.identity] = str(e)

    threads = [threading.Thread(target=campaign, args=(c,)) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_candidates_racing_for_a_free_lease_get_one_winner(
    cluster: ClusterHandle, namespace: str, kube: Kube
) -> None:
    clock = Clock()
    previous: list[LeaderElector] = []
    for round_ in range(5):
        candidates = [elector(kube, namespace, f"c{round_}-{i}", clock) for i in range(4)]
        if previous:
            # Free the lease as its holder's shutdown does.
            next(c for c in previous if c.leading).release()
        results = race(candidates)
        winners = [who for who, won in results.items() if won is True]
        assert len(winners) == 1, results
        # The losers read the winner's record, or lost the write on its resourceVersion.
        losers = [won for won in results.values() if won is not True]
        assert all(won is False or "HTTP 409" in str(won) for won in losers), results
        assert lease(cluster, namespace)["spec"]["holderIdentity"] == winners[0]
        for c in candidates:
            c.leading = c.settings.identity == winners[0]
        previous = candidates


# ---- two operator processes ----


def leader_env(who: str, lease_s: int) -> dict[str, str]:
    return {
        "SLM_FLEET_POD_NAME": who,
        "SLM_FLEET_LEADER_ELECTION_LEASE_SECONDS": str(lease_s),
        "SLM_FLEET_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": str(lease_s * 2 / 3),
        "SLM_FLEET_LEADER_ELECTION_RETRY_SECONDS": "0.5",
    }


def scrape(op: OperatorProcess) -> str:
    with urllib.request.urlopen(op.metrics_url, timeout=5) as r:
        return str(r.read().decode())


def metric(op: OperatorProcess, pattern: str) -> float:
    found = re.search("^" + pattern + r" ([0-9.e+]+)$", scrape(op), re.M)
    return float(found.group(1)) if found else 0.0


#: Every reconcile counter of an operator's /metrics, by result.
PASSES = re.compile(r"^slm_operator_reconcile_total\{[^}]*\} (\S+)$", re.M)


def is_leader(op: OperatorProcess) -> bool:
    return metric(op, r"slm_operator_leader") == 1


def reconciled(op: OperatorProcess) -> float:
    return metric(op, r'slm_operator_reconcile_total\{result="ok"\}')


def holder(cluster: ClusterHandle, ns: str) -> str:
    got = cluster.kubectl("get", "lease", LEASE, "-n", ns, "-o", "json", check=False)
    if got.returncode:
        return ""
    return str(json.loads(got.stdout)["spec"].get("holderIdentity") or "")


@pytest.fixture
def pair(
    cluster: ClusterHandle, namespace: str, tmp_path: Path, agenttask_crd: Path
) -> Iterator[Any]:
    """Start operators ``a`` and ``b`` on one Lease (``start(lease_s)``); stopped afterwards."""
    ops: list[OperatorProcess] = []

    def start(who: str, lease_s: int) -> OperatorProcess:
        op = OperatorProcess(
            cluster.kubeconfig,
            namespace,
            tmp_path / f"{who}.log",
            resync_seconds=600,  # what they do here, a watch event or the election caused
            metrics_port=free_port(),
            extra_env={
                "SLM_FLEET_LEADER_ELECTION_LEASE": f"{namespace}/{LEASE}",
                **leader_env(who, lease_s),
            },
        ).start()
        ops.append(op)
        return op

    yield start
    cluster.kubectl("delete", "agenttasks", "--all", "-n", namespace, "--wait=false", check=False)
    for op in ops:
        op.stop()
        print(op.log_path.name, op.log()[-3000:])


def leader_and_standby(
    cluster: ClusterHandle, ns: str, pair: Any, lease_s: int
) -> tuple[OperatorProcess, OperatorProcess]:
    """Operator ``a`` leading, then ``b`` started and standing by."""
    a = pair("op-a", lease_s)
    wait_for(lambda: holder(cluster, ns).startswith("op-a_"), timeout=60, what="a to lead")
    b = pair("op-b", lease_s)
    wait_for(lambda: "standing by: lease" in b.log(), timeout=60, what="b to stand by")
    return a, b


def test_the_standby_does_nothing_until_the_dead_leaders_lease_runs_out(
    cluster: ClusterHandle,
    namespace: str,
    storage: str,  # noqa: F811
    pair: Any,
) -> None:
    ns, lease_s = namespace, 6
    a, b = leader_and_standby(cluster, ns, pair, lease_s)

    cluster.apply(agenttask(), ns)
    rev = revision(cluster, ns)  # a wrote the status
    wait_for(lambda: jobs(cluster, ns), timeout=30, what="the data Job")
    assert is_leader(a) and not is_leader(b)
    assert reconciled(a) > 0 and reconciled(b) == 0

    a.kill()  # no release: b must wait the lease out
    killed = time.monotonic()
    complete_job(
        cluster,
        ns,
        n.data_job_name("weather", rev),
        ok("prepare", examples=1200, train_examples=960, eval_examples=240),
    )
    wait_for(lambda: is_leader(b), timeout=lease_s + 20, what="b to take over")
    took = time.monotonic() - killed
    # a renewed at most 0.5 s before it died, and b saw that record within its own 0.5 s.
    assert took >= lease_s - 1.5, f"b took over {took:.1f}s after a died: the lease was live"
    assert holder(cluster, ns).startswith("op-b_")
    # b reconciles what happened while nobody led: the data is ready, fine-tuning starts.
    wait_for(lambda: len(jobs(cluster, ns)) == 3, timeout=30, what="b to create the fine-tune Jobs")
    names = sorted(j["metadata"]["name"] for j in jobs(cluster, ns))
    assert names == sorted(
        [
            n.data_job_name("weather", rev),
            n.finetune_job_name("weather", "small", rev),
            n.finetune_job_name("weather", "big", rev),
        ]
    )
    assert reconciled(b) > 0
    assert lease(cluster, ns)["spec"]["leaseTransitions"] == 1


def test_a_leader_that_shuts_down_hands_over_at_once(
    cluster: ClusterHandle,
    namespace: str,
    storage: str,  # noqa: F811
    pair: Any,
) -> None:
    """A rollout's SIGTERM: the leader releases the Lease, and the standby leads within a
    second or two, not after the 60 s lease."""
    ns, lease_s = namespace, 60
    a, b = leader_and_standby(cluster, ns, pair, lease_s)
    cluster.apply(agenttask(), ns)
    rev = revision(cluster, ns)

    a.stop()
    stopped = time.monotonic()
    assert "released lease" in a.log()
    wait_for(lambda: is_leader(b), timeout=20, what="b to take over")
    assert time.monotonic() - stopped < 10
    complete_job(
        cluster,
        ns,
        n.data_job_name("weather", rev),
        ok("prepare", examples=1200, train_examples=960, eval_examples=240),
    )
    wait_for(lambda: len(jobs(cluster, ns)) == 3, timeout=30, what="b to create the fine-tune Jobs")
    assert get_task(cluster, ns)["status"]["phase"] == "Training"


def test_a_leader_that_finds_another_holder_stands_by_then_leads_when_it_lapses(
    cluster: ClusterHandle,
    namespace: str,
    storage: str,  # noqa: F811
    pair: Any,
) -> None:
    """Another replica wrote itself into the Lease (this one was paused past its lease, say):
    with no reconcile running, this one stops reconciling and exporting task series at once,
    without a restart, and leads again only once the other's record has lapsed."""
    ns = namespace
    a = pair("op-a", 6)
    wait_for(lambda: holder(cluster, ns).startswith("op-a_"), timeout=60, what="a to lead")
    cluster.apply(agenttask(), ns)
    rev = revision(cluster, ns)
    wait_for(lambda: "slm_operator_task_phase{" in scrape(a), timeout=30, what="task series")

    def quiet() -> bool:
        """No reconcile ended for 2 s: the passes the task's creation and its data Job's
        pod started are over (a fixed second left a pass the Job controller's status update
        woke running into the steal, which makes the leader exit instead)."""
        before = PASSES.findall(scrape(a))
        time.sleep(2)
        return bool(before) and before == PASSES.findall(scrape(a))

    wait_for(quiet, timeout=60, what="no reconcile for 2 s")
    steal(cluster, ns, "intruder", 10)
    wait_for(lambda: not is_leader(a), timeout=10, what="a to step down")
    assert "intruder holds it" in a.log()
    assert "lost the leader Lease; standing by (no reconcile was running)" in a.log()
    assert a.proc is not None and a.proc.poll() is None  # no restart needed
    assert "slm_operator_task_phase{" not in scrape(a)
    complete_job(
        cluster,
        ns,
        n.data_job_name("weather", rev),
        ok("prepare", examples=1200, train_examples=960, eval_examples=240),
    )
    time.sleep(3)
    assert len(jobs(cluster, ns)) == 1, "a standby created Jobs"
    wait_for(lambda: is_leader(a), timeout=30, what="a to lead again")
    assert holder(cluster, ns).startswith("op-a_")
    wait_for(lambda: len(jobs(cluster, ns)) == 3, timeout=30, what="the fine-tune Jobs")
    wait_for(lambda: "slm_operator_task_phase{" in scrape(a), timeout=30, what="task series")


def test_a_pod_restarted_container_takes_its_dead_predecessors_lease_at_once(
    cluster: ClusterHandle, namespace: str, kube: Kube
) -> None:
    """The container restarted (an API-server outage made the leader exit): its new process
    has a new identity, but the holder named after the same pod is its own dead predecessor,
    so it does not wait the lease out; a holder of another pod it does wait for."""
    clock = Clock()

    def in_pod(pod: str, identity: str) -> LeaderElector:
        settings = LeaseSettings(namespace, LEASE, identity, 15, 10, 2, pod)
        return LeaderElector(kube, settings, lambda: None, lambda: None, clock=clock)

    assert in_pod("operator-0", "operator-0_old").try_acquire_or_renew()
    assert in_pod("operator-0", "operator-0_new").try_acquire_or_renew()
    assert lease(cluster, namespace)["spec"]["holderIdentity"] == "operator-0_new"
    other = in_pod("operator-1", "operator-1_x")
    assert not other.try_acquire_or_renew()


def test_a_takeover_in_flight_when_the_loop_stopped_is_still_released(
    cluster: ClusterHandle, namespace: str, kube: Kube
) -> None:
    """The loop was cancelled (shutdown) while its PUT took the Lease: it never learnt that it
    leads, yet the release reads the Lease and frees it, so no standby waits it out."""
    b = elector(kube, namespace, "b", Clock(), lease_s=15)
    assert b.try_acquire_or_renew() and not b.leading
    b.release()
    assert lease(cluster, namespace)["spec"]["holderIdentity"] == ""


def test_shutdown_releases_the_lease_only_after_running_reconciles_end(
    cluster: ClusterHandle, namespace: str, kube: Kube
) -> None:
    """SIGTERM while a reconcile runs in its thread: releasing at once would let the standby
    reconcile beside it. The release waits for it, and the Lease is renewed meanwhile (a
    lease left unrenewed would expire under the running reconcile)."""
    import asyncio

    from slm_operator import main

    settings = LeaseSettings(namespace, LEASE, "leader_1", 15, 10, 0.5)
    rt = main.Runtime(kube=kube)
    rt.elector = LeaderElector(kube, settings, lambda: None, lambda: None)
    finish = threading.Event()
    worker = threading.Thread(target=rt.counted, args=(finish.wait, 30))
    worker.start()
    wait_for(lambda: rt.in_flight() == 1, timeout=5, what="the reconcile to run")

    async def shut_down() -> list[tuple[str, str]]:
        main._runtime = rt
        assert rt.elector is not None
        rt.elector_task = asyncio.ensure_future(rt.elector.run())
        while not rt.elector.leading:
            await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(main.cleanup())
        seen = []
        for _ in range(15):
            await asyncio.sleep(0.2)
            spec = (await asyncio.to_thread(lease, cluster, namespace))["spec"]
            seen.append((spec["holderIdentity"], spec["renewTime"]))
        finish.set()
        await asyncio.wait_for(stopping, timeout=20)
        spec = lease(cluster, namespace)["spec"]
        seen.append((spec["holderIdentity"], spec["renewTime"]))
        return seen

    seen = asyncio.run(shut_down())
    worker.join(timeout=5)
    assert [who for who, _ in seen[:-1]] == ["leader_1"] * 15, seen
    assert len({renewed for _, renewed in seen[:-1]}) >= 3, "not renewed while waiting"
    assert seen[-1][0] == ""


def test_shutdown_with_a_reconcile_that_will_not_end_exits_without_releasing(
    cluster: ClusterHandle, namespace: str
) -> None:
    """The reconcile still runs when the wait is over: handing the Lease over would let the
    standby reconcile beside it, so the process exits and the Lease expires."""
    code = f"""
import asyncio, logging, threading, time
logging.basicConfig(level=logging.INFO)
from kubernetes import config
from slm_operator import main
from slm_operator.kube import Kube
from slm_operator.leader import LeaderElector, LeaseSettings
kube = Kube(config.new_client_from_config(config_file={cluster.kubeconfig!r}))
main.SHUTDOWN_WAIT_SECONDS = 0.5
rt = main.Runtime(kube=kube)
rt.elector = LeaderElector(
    kube, LeaseSettings({namespace!r}, {LEASE!r}, "stuck_1", 15, 10, 0.5), lambda: None,
    lambda: None,
)
threading.Thread(target=rt.counted, args=(time.sleep, 60), daemon=True).start()
async def go():
    main._runtime = rt
    rt.elector_task = asyncio.ensure_future(rt.elector.run())
    while not rt.elector.leading:
        await asyncio.sleep(0.05)
    await main.cleanup()
    print("returned")
asyncio.run(go())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "returned" not in done.stdout
    assert "exiting without releasing the Lease" in done.stderr
    assert lease(cluster, namespace)["spec"]["holderIdentity"] == "stuck_1"
