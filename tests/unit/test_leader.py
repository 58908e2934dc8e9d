"""Leader election's pure rules: settings, expiry, and the Lease bodies it writes.

The elector against a real API server (resourceVersion races, takeover by a standby operator)
is in tests/integration/test_leader_election.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client

from slm_operator.kube import Kube, KubeError, without_retries
from slm_operator.leader import (
    ENV_DURATION,
    ENV_LEASE,
    ENV_POD_NAME,
    ENV_RENEW,
    ENV_RETRY,
    LeaderElector,
    LeaseSettings,
    free_for,
    lease_body,
    released_body,
)


def test_election_is_off_unless_a_lease_is_named() -> None:
    assert LeaseSettings.from_env({}) is None
    assert LeaseSettings.from_env({ENV_LEASE: "  "}) is None


def test_settings_default_to_client_go_terms_and_a_fresh_identity_per_process() -> None:
    env = {ENV_LEASE: "fleet/slm-fleet-operator", ENV_POD_NAME: "op-7d9f-x2"}
    s = LeaseSettings.from_env(env)
    assert s is not None
    assert (s.namespace, s.name) == ("fleet", "slm-fleet-operator")
    assert (s.lease_seconds, s.renew_deadline_seconds, s.retry_seconds) == (15, 10, 2)
    assert s.identity.startswith("op-7d9f-x2_")
    # A restarted container keeps its pod name but must not take its old process's lease
    # for its own.
    again = LeaseSettings.from_env(env)
    assert again is not None and again.identity != s.identity


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({ENV_LEASE: "no-namespace"}, "must be NAMESPACE/NAME"),
        ({ENV_LEASE: "a/b/c"}, "must be NAMESPACE/NAME"),
        ({ENV_LEASE: "/b"}, "must be NAMESPACE/NAME"),
        ({ENV_LEASE: "a/b", ENV_DURATION: "15s"}, f"{ENV_DURATION} must be a number"),
        ({ENV_LEASE: "a/b", ENV_RETRY: "0"}, f"{ENV_RETRY} must be more than 0"),
        ({ENV_LEASE: "a/b", ENV_RENEW: "nan"}, f"{ENV_RENEW} must be more than 0"),
        ({ENV_LEASE: "a/b", ENV_RENEW: "20"}, "needs"),
        ({ENV_LEASE: "a/b", ENV_RETRY: "10"}, "needs"),
    ],
)
def test_settings_that_cannot_be_honoured_are_refused_by_name(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LeaseSettings.from_env(env)


def test_the_operator_refuses_to_start_on_bad_election_settings(tmp_path: Path) -> None:
    """Exit 2 and one line, before kopf starts: not a traceback, not a crash loop of retries."""
    exe = Path(sys.executable).parent / "slm-fleet-operator"
    cp = subprocess.run(
        [str(exe), "--namespace", "x"],
        env={ENV_LEASE: "x/y", ENV_RENEW: "30", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 2
    assert cp.stderr.startswith("slm-fleet-operator: leader election needs")
    assert "Traceback" not in cp.stderr


SETTINGS = LeaseSettings("fleet", "op", "me_1", 15, 10, 2)


def test_a_lease_is_free_when_released_mine_or_silent_for_its_duration() -> None:
    held = {"holderIdentity": "other_2", "leaseDurationSeconds": 15}
    assert free_for({}, "me_1", seen_at=100, now=100)
    assert free_for({**held, "holderIdentity": ""}, "me_1", seen_at=100, now=100)
    assert free_for({**held, "holderIdentity": "me_1"}, "me_1", seen_at=100, now=100)
    assert not free_for(held, "me_1", seen_at=100, now=114.9)
    assert free_for(held, "me_1", seen_at=100, now=115)
    # A holder named after this pod is this container's previous process, dead: no wait.
    mine_before = {**held, "holderIdentity": "operator-0_1a2b"}
    assert free_for(mine_before, "operator-0_9f8e", 100, 100, pod="operator-0")
    assert not free_for(mine_before, "operator-0_9f8e", 100, 100)  # pod name unknown
    assert not free_for(held, "operator-0_9f8e", 100, 100, pod="operator-0")


def test_expiry_ignores_the_holders_renew_time() -> None:
    """A holder whose clock runs an hour behind still holds its lease: only how long this
    process has seen the same record counts."""
    held = {
        "holderIdentity": "other_2",
        "leaseDurationSeconds": 15,
        "renewTime": "2000-01-01T00:00:00.000000Z",
    }
    assert not free_for(held, "me_1", seen_at=100, now=101)


def test_taking_over_counts_a_transition_renewing_does_not_and_metadata_is_kept() -> None:
    created = lease_body(None, SETTINGS, "T0", None)
    assert created["spec"] == {
        "holderIdentity": "me_1",
        "leaseDurationSeconds": 15,
        "acquireTime": "T0",
        "renewTime": "T0",
        "leaseTransitions": 0,
    }
    assert created["metadata"] == {
        "name": "op",
        "namespace": "fleet",
        "labels": {"app.kubernetes.io/managed-by": "slm-fleet-operator"},
    }
    read = {
        "name": "op",
        "namespace": "fleet",
        "resourceVersion": "42",
        "labels": {"app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": "slm"},
        "managedFields": [{"manager": "helm"}],
    }
    renewed = lease_body(created["spec"], SETTINGS, "T1", read)
    # Conditional on the version read, and Helm's ownership marks survive the write (without
    # them `helm upgrade` refuses the release).
    assert renewed["metadata"] == {k: v for k, v in read.items() if k != "managedFields"}
    assert renewed["spec"]["acquireTime"] == "T0"
    assert renewed["spec"]["renewTime"] == "T1"
    assert renewed["spec"]["leaseTransitions"] == 0
    theirs = {**created["spec"], "holderIdentity": "other_2", "leaseTransitions": 3}
    taken = lease_body(theirs, SETTINGS, "T2", read)
    assert taken["spec"]["acquireTime"] == "T2"
    assert taken["spec"]["leaseTransitions"] == 4
    released = {**theirs, "holderIdentity": ""}
    assert lease_body(released, SETTINGS, "T3", read)["spec"]["leaseTransitions"] == 4
    # The chart's Lease, never held yet: the first leader is no transition.
    assert lease_body({}, SETTINGS, "T4", read)["spec"]["leaseTransitions"] == 0


def test_the_recorded_duration_is_never_shorter_than_the_leaders_own_terms() -> None:
    """10.5 s written as 10 (round half to even) would let a standby take over 0.5 s early."""
    settings = LeaseSettings("fleet", "op", "me_1", 10.5, 10.4, 2)
    assert lease_body(None, settings, "T0", None)["spec"]["leaseDurationSeconds"] == 11


def test_release_empties_the_holder_on_the_version_read() -> None:
    lease = {
        "metadata": {"name": "op", "namespace": "fleet", "resourceVersion": "7", "uid": "u"},
        "spec": {"holderIdentity": "me_1", "leaseDurationSeconds": 15, "leaseTransitions": 2},
    }
    body = released_body(lease, SETTINGS)
    assert body["metadata"] == lease["metadata"]
    assert body["spec"]["holderIdentity"] == ""
    assert body["spec"]["leaseDurationSeconds"] == 1
    assert body["spec"]["leaseTransitions"] == 2


def test_a_leader_keeps_leading_through_failed_renewals_until_the_renew_deadline() -> None:
    """Renewals that fail (API server slow or unreachable) keep the replica leading for up to
    renew_deadline after the start of its last good one; then it stops, once, well before
    any standby may take over (lease 15 s after the standby last saw the record)."""
    events: list[str] = []
    now = [100.0]
    e = LeaderElector(
        cast(Any, None),
        SETTINGS,
        lambda: events.append("started"),
        lambda: events.append("stopped"),
        clock=lambda: now[0],
    )
    e._attempt_at = now[0]
    e._step(True)
    assert e.leading and events == ["started"]
    for t in (102, 104, 106, 108, 109.9):
        now[0] = t
        e._step(False)
        assert e.leading, t
    now[0] = 110.0
    e._step(False)
    assert not e.leading and events == ["started", "stopped"]
    now[0] = 112.0
    e._step(False)
    assert events == ["started", "stopped"]


def test_a_leader_that_reads_another_holder_stops_at_once() -> None:
    events: list[str] = []
    e = LeaderElector(
        cast(Any, None),
        SETTINGS,
        lambda: events.append("started"),
        lambda: events.append("stopped"),
        clock=lambda: 100.0,
    )
    e._attempt_at = 100.0
    e._step(True)
    e._other_holder = "other_2"
    e._step(False)
    assert not e.leading and events == ["started", "stopped"]


class _Leases:
    """An API server holding one Lease in memory: GET, POST (409 when it exists), PUT (409 on
    a stale resourceVersion), and ``delete`` as ``kubectl delete lease`` does it. Every call
    is recorded with the time on ``clock``; from ``failing_from`` on, each is answered 503."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.calls: list[tuple[float, str]] = []
        self.failing_from = float("inf")

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls.append((self.clock[0], method))
        if self.clock[0] >= self.failing_from:
            raise KubeError(503, "etcd leader changed", "ServiceUnavailable")
        if method == "GET":
            if self.lease is None:
                raise KubeError(404, "not found", "NotFound")
            return self.lease
        if (method == "POST") != (self.lease is None) or (
            method == "PUT"
            and body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]
        ):
            raise KubeError(409, "conflict", "Conflict")
        self.version += 1
        body["metadata"]["resourceVersion"] = str(self.version)
        self.lease = body
        return body

    def delete(self) -> None:
        self.lease = None

    def holder(self) -> str:
        return str((self.lease or {}).get("spec", {}).get("holderIdentity") or "")


def _electors(leases: _Leases, *identities: str) -> list[LeaderElector]:
    """Candidates on ``leases`` with the default terms, on its clock."""
    return [
        LeaderElector(
            cast(Any, leases),
            dataclasses.replace(SETTINGS, identity=identity),
            lambda: None,
            lambda: None,
            clock=lambda: leases.clock[0],
        )
        for identity in identities
    ]


def test_a_lease_deleted_under_a_live_leader_is_not_taken_by_its_standby() -> None:
    """`kubectl delete lease` while a leads and b stands by: b created a new Lease at its next
    try and led at once, while a led on until its own next renewal read b's name: two
    leaders. b now waits as if a's last record were still there; a recreates the Lease."""
    now = [100.0]
    leases = _Leases(now)
    a, b = _electors(leases, "a_1", "b_2")
    assert a.try_acquire_or_renew()  # nothing there yet (a fresh install): created at once
    now[0] = 101.0
    assert not b.try_acquire_or_renew()
    now[0] = 102.0
    assert a.try_acquire_or_renew()  # a renews, b sees it at 103
    now[0] = 103.0
    assert not b.try_acquire_or_renew()
    leases.delete()
    now[0] = 103.5
    assert not b.try_acquire_or_renew()
    assert leases.lease is None  # b did not create it
    now[0] = 104.0
    assert a.try_acquire_or_renew()  # the leader recreates it at its next renewal
    assert leases.holder() == "a_1"
    now[0] = 105.0
    assert not b.try_acquire_or_renew()
    # Deleted again, and a dies with it: b takes over once a's last record it read has
    # been silent for leaseDurationSeconds (15 s from 105), as after any leader's death.
    leases.delete()
    now[0] = 119.9
    assert not b.try_acquire_or_renew() and leases.lease is None
    now[0] = 120.0
    assert b.try_acquire_or_renew() and leases.holder() == "b_2"


def test_a_leader_whose_renewal_fails_tries_again_before_its_deadline() -> None:
    """retry 6 < renew deadline 10 < lease 15 are accepted settings, whose message promises
    the leader tries more than once before it gives up. A renewal answered 503 at 6 s was
    its only try: it slept a whole retry period, past its deadline, and stepped down at 10 s.
    It tries again sooner now, and still steps down at its deadline."""
    now = [0.0]
    leases = _Leases(now)
    leases.failing_from = 5.0
    settings = LeaseSettings("fleet", "op", "me_1", 15, 10, 6)
    stopped: list[float] = []
    e = LeaderElector(
        cast(Any, leases), settings, lambda: None, lambda: stopped.append(now[0]), lambda: now[0]
    )
    real_sleep = asyncio.sleep

    class SteppedDown(Exception):
        pass

    async def sleep_on_the_fake_clock(seconds: float) -> None:
        # The loop ends here, not by a cancel: Python 3.11's wait_for can swallow a cancel
        # that comes as the attempt ends, and the loop then went on spinning on this clock.
        if stopped:
            raise SteppedDown
        now[0] += seconds
        await real_sleep(0)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(SteppedDown):
        mp.setattr(asyncio, "sleep", sleep_on_the_fake_clock)
        asyncio.run(asyncio.wait_for(e.run(), timeout=10))
    renewals = [t for t, method in leases.calls if method == "GET" and t > 0]
    assert len(renewals) >= 2, leases.calls
    assert all(t < 10 for t in renewals), repr(renewals)
    assert len(renewals) <= 10, renewals  # sooner, but no busy loop
    assert 10 <= stopped[0] < 10.5, stopped


def test_a_stopped_elector_takes_nothing_back_when_its_cancel_was_lost() -> None:
    """Python 3.11's wait_for drops a cancel that lands as its attempt ends. The operator
    cancels run() and then calls stop(), which releases the Lease; a run() that missed its
    cancel went on and took the released Lease back while the process exited."""
    now = [0.0]
    leases = _Leases(now)
    settings = LeaseSettings("fleet", "op", "me_1", 15, 10, 2)
    e = LeaderElector(cast(Any, leases), settings, lambda: None, lambda: None, lambda: now[0])
    real_sleep = asyncio.sleep

    async def sleep_on_the_fake_clock(seconds: float) -> None:
        if now[0] > 60:  # a minute on the fake clock after stop(): it went on campaigning
            raise RuntimeError(f"run() still going after stop(): {leases.calls}")
        now[0] += seconds
        await real_sleep(0)

    async def scenario() -> None:
        runner = asyncio.ensure_future(e.run())  # never cancelled: the lost cancel
        while not e.leading:
            await real_sleep(0)
        await e.stop()
        released = len(leases.calls)
        await runner  # it ends by itself
        assert [m for _, m in leases.calls[released:]] == []  # and wrote nothing more

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asyncio, "sleep", sleep_on_the_fake_clock)
        asyncio.run(scenario())


# ---- the elector against HTTP servers that misbehave (real sockets on 127.0.0.1) ----


class _Server:
    """A local server that accepts connections and answers each request with ``answer``
    (raw HTTP bytes), or never answers when ``answer`` is None."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.requests = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests += 1
            if self.answer is None:
                self.held.append(conn)  # never answered
                continue
            conn.recv(65536)
            conn.sendall(self.answer)
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def _kube(url: str, retries: bool = False) -> Kube:
    cfg = client.Configuration()
    cfg.host = url
    api = client.ApiClient(cfg)
    return Kube(without_retries(api) if not retries else api)


def test_an_api_call_that_gets_no_answer_is_not_retried_past_its_timeout() -> None:
    server = _Server(None)
    try:
        started = time.monotonic()
        with pytest.raises(KubeError):
            _kube(server.url).request("GET", "/apis/x", timeout=1.0)
        assert time.monotonic() - started < 2.5
        assert server.requests == 1
    finally:
        server.close()


@pytest.mark.parametrize("body", [b'"service unavailable"', b"null", b"[]", b'{"message": 7}'])
def test_an_error_whose_body_is_not_a_status_object_is_a_retryable_kube_error(
    body: bytes,
) -> None:
    """A proxy or load balancer before the API server may answer a 503 with a JSON string or
    null: that was an AttributeError, a crash of the pass (logged with a traceback, retried
    only at the resync) instead of the back-off a busy API server gets."""
    answer = b"HTTP/1.1 503 X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    server = _Server(answer % (len(body), body))
    try:
        with pytest.raises(KubeError) as raised:
            _kube(server.url).request("GET", "/apis/x", timeout=5.0)
    finally:
        server.close()
    assert raised.value.status == 503 and raised.value.retryable
    assert isinstance(raised.value.message, str)


def test_a_leader_whose_renewal_hangs_steps_down_at_its_renew_deadline() -> None:
    """The API server stops answering right after a renewal: the leader gives up when its
    renew deadline (1.5 s here) ends, not when the hung call returns."""
    server = _Server(None)
    stopped: list[float] = []
    settings = LeaseSettings("fleet", "op", "me_1", 3, 1.5, 0.5)
    e = LeaderElector(_kube(server.url), settings, lambda: None, lambda: stopped.append(1))
    e.leading, e._renewed_at = True, time.monotonic()

    async def renew_until_stopped() -> float:
        start = time.monotonic()
        while e.leading:
            e._step(await e.attempt())
        return time.monotonic() - start

    try:
        took = asyncio.run(asyncio.wait_for(renew_until_stopped(), timeout=10))
    finally:
        server.close()
    assert stopped == [1]
    assert 1.4 <= took < 2.5, took


def test_a_leader_whose_renewals_fail_fast_steps_down_at_its_deadline_not_a_retry_later() -> None:
    """Renewals answered at once with a 503 (settings lease 2.4 s, deadline 2.0 s, retry
    1.6 s, which the settings allow): after the failed one at 1.6 s the leader slept a
    whole retry period and stepped down 3.2 s after its last renewal, past the moment a
    standby may take over (2.4 s). It steps down at its deadline, with no call after it."""

    class Busy:
        calls: list[float] = []

        def request(self, *_: Any, **__: Any) -> Any:
            Busy.calls.append(time.monotonic())
            raise KubeError(503, "overloaded", "ServiceUnavailable")

    stopped: list[float] = []
    settings = LeaseSettings("fleet", "op", "me_1", 2.4, 2.0, 1.6)
    e = LeaderElector(cast(Any, Busy()), settings, lambda: None, lambda: stopped.append(1))
    e.leading = True
    e._renewed_at = e._attempt_at = renewed = time.monotonic()

    async def lead() -> None:
        await asyncio.sleep(settings.retry_seconds)  # as after that good renewal
        task = asyncio.create_task(e.run())
        while not stopped:
            await asyncio.sleep(0.01)
        took.append(time.monotonic() - renewed)
        task.cancel()

    took: list[float] = []
    asyncio.run(asyncio.wait_for(lead(), timeout=10))
    assert 2.0 <= took[0] < 2.4, took
    assert all(t - renewed < 2.0 for t in Busy.calls)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]",
    ],
    ids=["html", "empty", "not-an-object"],
)
def test_an_answer_that_is_not_a_lease_is_a_failed_attempt_not_a_dead_elector(
    answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy's error page with status 200, or an empty body: the attempt fails and the loop
    goes on (a dead loop left a leader leading with nobody renewing)."""
    server = _Server(answer)
    settings = LeaseSettings("fleet", "op", "me_1", 3, 1.5, 0.2)
    e = LeaderElector(_kube(server.url), settings, lambda: None, lambda: None)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="slm_operator.leader"),
            pytest.raises(TimeoutError),
        ):
            asyncio.run(asyncio.wait_for(e.run(), timeout=1.5))
    finally:
        server.close()
    assert server.requests >= 3  # it kept trying
    assert not e.leading
    assert len([r for r in caplog.records if "lease fleet/op" in r.getMessage()]) == 1


def test_a_leader_that_loses_the_lease_during_a_reconcile_exits(tmp_path: Path) -> None:
    """A reconcile is running in its thread when the Lease is lost: the process exits (1)
    rather than let it write on beside the new leader (the pod restarts as a standby)."""
    code = """
import logging, threading, time
logging.basicConfig(level=logging.INFO)
from slm_operator import main
rt = main.Runtime(kube=None)
threading.Thread(target=rt.counted, args=(time.sleep, 30), daemon=True).start()
time.sleep(0.5)
main._lost_leadership(rt)
print("still alive")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "still alive" not in done.stdout
    assert "lost the leader Lease while a reconcile was running; exiting" in done.stderr


def test_a_leader_that_loses_the_lease_between_reconciles_stands_by_and_starts_none() -> None:
    from slm_operator import main

    rt = main.Runtime(kube=cast(Any, None))
    main._lost_leadership(rt)
    assert not rt.leading
    ran: list[int] = []
    with pytest.raises(main.NotLeading):
        rt.counted(ran.append, 1)
    assert ran == [] and rt.in_flight() == 0


def test_a_bare_kopf_run_refuses_bad_election_settings_for_good_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under `kopf run -m slm_operator.main` (no cli() check), the startup handler raised a
    ValueError, which kopf retries every minute, after it had made a runtime and spawned a
    resync loop: one more loop per retry. It is a permanent error now, raised first."""
    import kopf

    from slm_operator import main

    monkeypatch.setenv(ENV_LEASE, "x/y")
    monkeypatch.setenv(ENV_RENEW, "30")
    monkeypatch.setattr(main, "_runtime", None)
    with pytest.raises(kopf.PermanentError, match="leader election needs"):
        asyncio.run(main.startup(settings=kopf.OperatorSettings()))
    assert main._runtime is None
