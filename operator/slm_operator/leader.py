"""Leader election on a coordination.k8s.io/v1 Lease, so that a second replica can stand by.

Why: kopf in ``--standalone`` mode does not coordinate replicas, so without this only one
operator pod may run (``replicas: 1``, ``Recreate``) and every node drain, eviction or
rollout leaves the AgentTasks unreconciled until a new pod is scheduled, pulled and started;
during that time no SLO breach switches a task to the LLM. With election on, every replica
watches (its caches stay warm) but only the holder of the Lease reconciles.

The rules are client-go's ``leaderelection``, which platform engineers already know from
kube-controller-manager and every controller-runtime operator:

- A lease is free when it has no holder (released), or when its record has not changed for
  ``leaseDurationSeconds`` *as measured on this process's own monotonic clock* from when this
  process first saw that record. The holder's ``renewTime`` is never compared with the local
  wall clock: with clock skew between nodes that comparison lets two replicas lead at once.
  A Lease that does not exist is judged as the record this process read last: free at once
  when it read none (a fresh install) or held it itself, and otherwise once that record's
  holder could have renewed for the last time. A Lease deleted under a live leader (``kubectl
  delete``, a cleanup script) is thus not taken while that leader leads on until its next
  renewal; it recreates the Lease itself.
- Taking or renewing is an update carrying the ``resourceVersion`` that was read: of two
  replicas racing for a free lease, the API server lets one win (409 for the other).
- The leader renews every ``retry`` seconds and stops leading when it could not renew for
  ``renew_deadline`` seconds, which is shorter than the lease. After a renewal that failed it
  tries again sooner, in half the time left to that deadline (at most ``retry``, at least
  :data:`MIN_RETRY_SECONDS`), so that even with a retry period close to the deadline one
  failed call does not end its leadership. A renewal that hangs is not waited for past that
  deadline (each call has its own short timeout and no HTTP retries), and the operator then
  stands by, or exits when a reconcile is running (:mod:`slm_operator.main`), as
  controller-runtime's managers do: a reconcile already running in a thread cannot be
  interrupted any other way, and it must not write on after another replica took over. The
  pod restarts as a standby, and takes its own dead predecessor's lease at once (same pod
  name) instead of waiting it out.
- On shutdown (SIGTERM, a rollout) the leader waits for its running reconciles, then releases
  the lease, so the standby takes over within about one retry period instead of one lease
  duration.
- The operator creates the Lease (labelled as its own) when there is none. The chart does not
  template it: ``helm upgrade --force`` would replace it with an empty one while its holder
  leads, and a standby would take it at once. So ``helm uninstall`` leaves it behind, as
  every controller-runtime operator leaves its own.

The pure part (:func:`free_for`, :func:`lease_body`, :class:`LeaseSettings`) is unit tested;
:class:`LeaderElector` is the thin adapter that talks to the API server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from slm_operator import naming as n
from slm_operator.kube import NO_ANSWER, Kube, KubeError

log = logging.getLogger(__name__)

LEASE_API = "coordination.k8s.io/v1"
LEASES = "leases"

#: ``namespace/name`` of the Lease; unset or empty: no election (one replica only).
ENV_LEASE = "SLM_FLEET_LEADER_ELECTION_LEASE"
ENV_DURATION = "SLM_FLEET_LEADER_ELECTION_LEASE_SECONDS"
ENV_RENEW = "SLM_FLEET_LEADER_ELECTION_RENEW_DEADLINE_SECONDS"
ENV_RETRY = "SLM_FLEET_LEADER_ELECTION_RETRY_SECONDS"
#: The pod's name (the chart sets it from the downward API); the host name otherwise.
ENV_POD_NAME = "SLM_FLEET_POD_NAME"

#: The shortest wait between a leader's retries of a failed renewal, so that an API server that
#: fails fast is not called in a busy loop as the deadline nears (less when the settings leave
#: less room between the retry period and the renew deadline).
MIN_RETRY_SECONDS = 0.2

#: The fields of a Lease's spec that make up its holder record (see :func:`free_for`).
_RECORD_KEYS = (
    "holderIdentity",
    "renewTime",
    "acquireTime",
    "leaseDurationSeconds",
    "leaseTransitions",
)


@dataclass(frozen=True)
class LeaseSettings:
    """Where the Lease is and how long its terms are (client-go's defaults: 15, 10, 2 s)."""

    namespace: str
    name: str
    identity: str
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0
    #: The pod's name, when the environment gave it (``SLM_FLEET_POD_NAME``): a holder named
    #: after this pod is this container's previous process, which is dead (the kubelet
    #: starts a container again only after the old one exited), so its lease is free.
    pod: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LeaseSettings | None:
        """The settings from the environment, None when election is off.

        Raises ValueError with a message naming the variable: the operator refuses to start
        on a setting it cannot honour rather than lead on terms nobody chose.
        """
        where = env.get(ENV_LEASE, "").strip()
        if not where:
            return None
        namespace, _, name = where.partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"{ENV_LEASE} must be NAMESPACE/NAME")
        numbers = {}
        for var, default in ((ENV_DURATION, 15.0), (ENV_RENEW, 10.0), (ENV_RETRY, 2.0)):
            raw = env.get(var, "").strip()
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{var} must be a number of seconds") from None
            if not 0 < value < 86400:
                raise ValueError(f"{var} must be more than 0 and less than a day")
            numbers[var] = value
        lease, renew, retry = numbers[ENV_DURATION], numbers[ENV_RENEW], numbers[ENV_RETRY]
        if not retry < renew < lease:
            # retry < renew: the first renewal try comes before the deadline, and the retries
            # after a failed one come sooner (LeaderElector._next_wait), so it tries again.
            raise ValueError(
                f"leader election needs {ENV_RETRY} < {ENV_RENEW} < {ENV_DURATION} "
                f"(got {retry:g} < {renew:g} < {lease:g}): the leader must give up before "
                "another replica may take over, and try more than once before it gives up"
            )
        pod = env.get(ENV_POD_NAME, "").strip()
        # A restarted container keeps its pod name; the suffix makes it a new candidate, so it
        # never renews its previous process's lease as if it were still that process.
        identity = f"{pod or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        return cls(namespace, name, identity, lease, renew, retry, pod)


def now_rfc3339() -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds, UTC."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def free_for(
    spec: Mapping[str, Any], identity: str, seen_at: float, now: float, pod: str = ""
) -> bool:
    """May ``identity`` take or renew a lease whose spec is ``spec``?

    ``seen_at``: this process's monotonic time when it first saw this very holder record;
    ``now``: the same clock now. Expiry is judged from those two, never from the record's
    renewTime (see the module docstring: clock skew). ``pod`` (:attr:`LeaseSettings.pod`): a
    holder named after this pod is this container's previous, dead process.
    """
    holder = str(spec.get("holderIdentity") or "")
    if not holder or holder == identity or (pod and holder.rpartition("_")[0] == pod):
        return True
    duration = spec.get("leaseDurationSeconds")
    if not isinstance(duration, int | float) or duration <= 0:
        return True  # a record without terms binds no one
    return now >= seen_at + float(duration)


def _kept_metadata(read: Mapping[str, Any] | None, settings: LeaseSettings) -> dict[str, Any]:
    """The metadata a write sends: what was read (its resourceVersion makes the write
    conditional), less managedFields; a new Lease is labelled as the operator's. An update
    replaces the whole object, so metadata left out would be deleted: labels and annotations
    that a GitOps tool or a person added."""
    if not read:
        return {
            "name": settings.name,
            "namespace": settings.namespace,
            "labels": {n.MANAGED_BY: n.FIELD_MANAGER},
        }
    return {k: v for k, v in read.items() if k != "managedFields"}


def lease_body(
    spec: Mapping[str, Any] | None,
    settings: LeaseSettings,
    now: str,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The Lease that says ``settings.identity`` holds it as of ``now``.

    ``spec`` and ``metadata`` are the Lease as read (None: there is none, it is created).
    Renewing keeps acquireTime and leaseTransitions; taking over from another holder (or a
    released lease) sets acquireTime and counts one more transition.
    """
    spec = spec or {}
    mine = spec.get("holderIdentity") == settings.identity
    held_before = bool(spec.get("holderIdentity") or spec.get("acquireTime"))
    transitions = int(spec.get("leaseTransitions") or 0)
    return {
        "apiVersion": LEASE_API,
        "kind": "Lease",
        "metadata": _kept_metadata(metadata, settings),
        "spec": {
            "holderIdentity": settings.identity,
            # Rounded up: a record shorter than the leader's own renew deadline would let a
            # standby take over while the leader still counts itself in.
            "leaseDurationSeconds": max(1, math.ceil(settings.lease_seconds)),
            "acquireTime": spec.get("acquireTime") if mine else now,
            "renewTime": now,
            "leaseTransitions": transitions if mine or not held_before else transitions + 1,
        },
    }


def released_body(lease: Mapping[str, Any], settings: LeaseSettings) -> dict[str, Any]:
    """The same lease with no holder (client-go's release): the standby takes it at once."""
    spec = dict(lease.get("spec") or {})
    spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=now_rfc3339())
    return {
        "apiVersion": LEASE_API,
        "kind": "Lease",
        "metadata": _kept_metadata(lease.get("metadata"), settings),
        "spec": spec,
    }


class LeaderElector:
    """Campaigns for the Lease, renews it while leading, and calls back on each change.

    ``on_started`` runs when this replica starts leading, ``on_stopped`` when it stops (it
    could not renew within the renew deadline, or another replica holds the lease). Both run
    on the event loop and must not block. Give it a :class:`Kube` whose client does not retry
    (:func:`slm_operator.kube.without_retries`): each call is bounded by its own timeout, and
    a renewal is not waited for past the renew deadline.
    """

    def __init__(
        self,
        kube: Kube,
        settings: LeaseSettings,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.clock = clock
        self.leading = False
        #: The last holder record read (holder, times, terms) and when this process first read
        #: it. The record, not the resourceVersion: a label added to the Lease changes nothing.
        self._seen: tuple[tuple[Any, ...], float] | None = None
        #: When the last attempt started, and when the last one that held the lease did: the
        #: renew deadline counts from the start of a renewal, not its answer (safe side).
        self._attempt_at = 0.0
        self._renewed_at = 0.0
        #: The attempt in flight (a thread), awaited before the lease is released.
        self._attempt: asyncio.Future[bool] | None = None
        # Set by stop(): run() ends even if the cancel that came before was lost (Python
        # 3.11's asyncio.wait_for drops a cancel that lands as its awaited attempt ends), so
        # it cannot take back the Lease stop() has just released.
        self._stopping = False
        self._last_error = ""
        #: Another replica named as holder by the last read ("" when none was).
        self._other_holder = ""
        #: Threads of its own: on the default pool, shared with the reconciles, a renewal
        #: waited behind them for a thread and the leader stepped down with a healthy API
        #: server.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="lease"
        )

    @property
    def _path(self) -> str:
        s = self.settings
        return f"/apis/{LEASE_API}/namespaces/{s.namespace}/{LEASES}"

    def _timeout(self) -> float:
        """Seconds one API call may take: two of them fit in the renew deadline."""
        return max(0.5, min(5.0, self.settings.renew_deadline_seconds / 3))

    def _round_trip_s(self) -> float:
        """The most a standby's attempt (GET, then POST or PUT) is waited for."""
        return 2 * self._timeout() + 1

    def _get(self) -> dict[str, Any] | None:
        """The Lease, or None when there is none."""
        try:
            lease = self.kube.request(
                "GET", f"{self._path}/{self.settings.name}", timeout=self._timeout()
            )
        except KubeError as e:
            if e.status == 404:
                return None
            raise
        if not isinstance(lease, dict) or not isinstance(lease.get("metadata"), dict):
            raise KubeError(
                NO_ANSWER, "the answer to a GET of the Lease is not a Lease", "BadResponse"
            )
        return lease

    def try_acquire_or_renew(self) -> bool:
        """One round trip (GET, then POST or PUT): True if this replica holds the lease now."""
        s = self.settings
        self._attempt_at = self.clock()
        lease = self._get()
        if lease is None:
            return self._create()
        spec = lease.get("spec") or {}
        record = tuple(spec.get(k) for k in _RECORD_KEYS)
        # Seen when the answer came (not when it was asked for): a slow GET never makes a
        # record look older than it is.
        now = self.clock()
        if self._seen is None or self._seen[0] != record:
            self._seen = (record, now)
        if not free_for(spec, s.identity, self._seen[1], now, s.pod):
            holder = str(spec.get("holderIdentity"))
            if holder != self._other_holder:
                log.info("standing by: lease %s/%s is held by %s", s.namespace, s.name, holder)
            self._other_holder = holder
            return False
        self._other_holder = ""
        updated = lease_body(spec, s, now_rfc3339(), lease["metadata"])
        self.kube.request("PUT", f"{self._path}/{s.name}", body=updated, timeout=self._timeout())
        return True

    def _create(self) -> bool:
        """Create the Lease, found absent, unless the holder this process read last may still
        lead: True if this replica holds it now.

        Someone deleted it; its last holder leads on until its next renewal, which recreates
        it. Creating it at once made two leaders until then, so absent binds as that record
        did: for its ``leaseDurationSeconds`` from when this process first read it.
        """
        s = self.settings
        if self._seen is not None:
            last = dict(zip(_RECORD_KEYS, self._seen[0], strict=True))
            if not free_for(last, s.identity, self._seen[1], self.clock(), s.pod):
                return False
        self.kube.request(
            "POST",
            self._path,
            body=lease_body(None, s, now_rfc3339(), None),
            timeout=self._timeout(),
        )
        self._seen = None
        return True

    def release(self) -> None:
        """Give the lease up if this replica holds it (on shutdown); errors are logged only.

        Whether it holds it is read from the Lease, not from ``leading``: a takeover that was
        in flight when the loop stopped may have made it the holder without its knowing.
        """
        s = self.settings
        self.leading = False
        try:
            lease = self._get()
            if lease and (lease.get("spec") or {}).get("holderIdentity") == s.identity:
                self.kube.request(
                    "PUT",
                    f"{self._path}/{s.name}",
                    body=released_body(lease, s),
                    timeout=self._timeout(),
                )
                log.info("released lease %s/%s", s.namespace, s.name)
        except KubeError as e:
            log.warning("could not release lease %s/%s (%s); it expires", s.namespace, s.name, e)

    def _step(self, held: bool) -> None:
        """Turn one round trip's outcome into leading or not, with the callbacks."""
        s = self.settings
        now = self.clock()
        if held:
            self._renewed_at = self._attempt_at
            if not self.leading:
                self.leading = True
                log.info(
                    "leading: this replica (%s) holds lease %s/%s", s.identity, s.namespace, s.name
                )
                self.on_started()
        elif self.leading and (
            # Another holder: leading on would make two leaders at once.
            self._other_holder or now - self._renewed_at >= s.renew_deadline_seconds
        ):
            self.leading = False
            why = (
                f"{self._other_holder} holds it"
                if self._other_holder
                else f"not renewed for {now - self._renewed_at:.1f}s"
            )
            log.error("stopped leading: lease %s/%s %s", s.namespace, s.name, why)
            self.on_stopped()

    def _complain(self, error: str) -> None:
        """Log an attempt's failure, once while the same one repeats."""
        if error != self._last_error:
            s = self.settings
            log.warning("lease %s/%s: %s", s.namespace, s.name, error)
            self._last_error = error

    async def attempt(self) -> bool:
        """One bounded attempt: a leader waits no longer than what is left of its deadline."""
        s = self.settings
        if self.leading:
            budget = self._renewed_at + s.renew_deadline_seconds - self.clock()
            if budget <= 0:  # too late to renew: step down without another call
                return False
        else:
            budget = self._round_trip_s()
        self._attempt = attempt = asyncio.get_running_loop().run_in_executor(
            self._pool, self.try_acquire_or_renew
        )
        # Its outcome is read here or not at all (after a timeout): never "never retrieved".
        attempt.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            held = await asyncio.wait_for(asyncio.shield(attempt), timeout=max(0.0, budget))
        except TimeoutError:
            self._complain("no answer from the API server in time")
            return False
        except KubeError as e:
            if e.status != 409:  # a 409 is a lost race, not a fault
                self._complain(str(e))
            return False
        except Exception as e:  # whatever it is, the loop must go on renewing or stepping down
            self._complain(f"{type(e).__name__}: {e}")
            return False
        self._last_error = ""
        return held

    def _next_wait(self, held: bool) -> float:
        """Seconds until the next attempt, after one that ``held`` the lease or not."""
        s = self.settings
        if not self.leading:
            # Candidates spread their attempts (client-go's jitter).
            return s.retry_seconds * (1.0 + random.random() * 0.2)
        # A leader renews on time, and never sleeps past its renew deadline: after renewals
        # that failed fast (a 503, a refused connection) a whole retry period could run past
        # it, and with settings where retry + renew deadline exceed the lease, past the moment
        # a standby may take over: two leaders at once.
        left = max(0.0, self._renewed_at + s.renew_deadline_seconds - self.clock())
        if held:
            return min(s.retry_seconds, left)
        # After a failure, sooner: with retry 6 and deadline 10 a whole retry period left one
        # try (at 6 s) before the leader stepped down at 10 s. Half of what is left makes the
        # next try land before the deadline; the floor keeps that from becoming a busy loop.
        floor = min(MIN_RETRY_SECONDS, (s.renew_deadline_seconds - s.retry_seconds) / 2)
        return min(s.retry_seconds, max(floor, left / 2), left)

    async def run(self) -> None:
        """Campaign and renew until cancelled."""
        while not self._stopping:
            held = await self.attempt()
            if self._stopping:
                return
            self._step(held)
            await asyncio.sleep(self._next_wait(held))

    async def stop(self) -> None:
        """After :meth:`run` was cancelled: let an attempt in flight end, then release."""
        self._stopping = True
        attempt = self._attempt
        if attempt is not None and not attempt.done():
            await asyncio.wait([attempt], timeout=self._round_trip_s())
            if not attempt.done():
                log.warning(
                    "lease %s/%s not released: the API server does not answer",
                    self.settings.namespace,
                    self.settings.name,
                )
                return
        await asyncio.get_running_loop().run_in_executor(self._pool, self.release)
