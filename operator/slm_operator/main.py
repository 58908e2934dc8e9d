"""kopf wiring: which events wake the reconcile, and the settings that keep kopf out of the way.

Run it as ``slm-fleet-operator --namespace NS`` (or ``--all-namespaces``), which is
``kopf run -m slm_operator.main --standalone`` underneath.

Design choices:
- Only ``@kopf.on.event`` handlers: they need no finalizer and store no handler progress or
  diff-base on the object, so kopf never writes to an AgentTask. All state lives in status,
  written by the reconcile.
- Events on the AgentTask and on its Jobs, pods and Deployment trigger a reconcile of the
  task; a periodic resync covers anything missed (level-triggered: no event is essential).
  The event of the operator's own status write does not, when that pass left nothing more
  to do (:meth:`Runtime.own_write`).
- Per task, at most one reconcile runs at a time; triggers that arrive meanwhile coalesce
  into one more pass. Retryable API errors (conflicts, 429, 5xx) back off exponentially, with
  at most one retry pending per task; other errors wait for the resync and are logged once.
  An API server that cannot be reached is retried at most 15 s apart, and while a task waits
  for that retry any event or resync of it runs a pass at once (the API server may be back);
  once it has answered a failure (a timeout, 429, 5xx) since the task's last pass that
  worked, the long back-off holds.
- With ``SLM_FLEET_LEADER_ELECTION_LEASE`` set, replicas elect a leader on that Lease
  (:mod:`slm_operator.leader`): all of them watch, only the leader reconciles, and a standby
  takes over within the lease duration (at once when the leader shuts down cleanly). A
  leader that cannot renew in time stands by, or exits when a reconcile is running (its pod
  restarts as a standby).
- The child watches are label-selected by the API server and listed in chunks: the operator
  never receives the other pods, Jobs and Deployments of a namespace (or of the cluster).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from slm_operator import naming as n
from slm_operator.builders import DEFAULT_TRAINER_IMAGE, DEFAULT_TRITON_IMAGE, Images
from slm_operator.kube import (
    UNREACHABLE,
    Kube,
    KubeError,
    TaskGone,
    load_api_client,
    without_retries,
)
from slm_operator.leader import LeaderElector, LeaseSettings
from slm_operator.metrics import RESULT_ERROR, RESULT_OK, RESULT_RETRY, OperatorMetrics, serve
from slm_operator.plan import Plan
from slm_operator.prom import PromMetrics
from slm_operator.reconcile import ChildWriteBusy, reconcile

log = logging.getLogger("slm_operator")


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names, without blanks and duplicates."""
    return tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))


#: Settings the environment gave in a form the operator cannot use: ``cli`` (and the startup
#: handler, under a bare ``kopf run``) refuses to start with any, naming the variable, rather
#: than run on a default nobody chose; ``--help`` still answers.
SETTINGS_ERRORS: list[str] = []


def _env_number(name: str, default: float, *, whole: bool = False, most: float = 604800) -> float:
    """A number of seconds (or a port) from the environment; the default when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(int(raw)) if whole else float(raw)
    except ValueError:
        value = math.nan
    least = 0 if whole else 1e-3
    if not (math.isfinite(value) and least <= value <= most):
        kind = "a whole number" if whole else "a number of seconds"
        SETTINGS_ERRORS.append(f"{name} must be {kind} from {least:g} to {most:g}, got {raw!r}")
        return default
    return value


def _env_url(name: str) -> str:
    """An http(s) URL from the environment; empty when unset."""
    value = os.environ.get(name, "").strip()
    try:
        parts = urllib.parse.urlsplit(value)
        ok = not value or (parts.scheme in ("http", "https") and bool(parts.hostname))
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        ok = False
    if not ok:  # not quoted: its user info or query may hold a password
        SETTINGS_ERRORS.append(f"{name} must be an http:// or https:// URL with a host and port")
        return ""
    return value


def _env_listen_address(name: str, default: str) -> str:
    """An address to listen on: an IP address or a host name that resolves."""
    value = os.environ.get(name, "").strip() or default
    try:
        ipaddress.ip_address(value)
    except ValueError:
        try:
            socket.getaddrinfo(value, None)
        except (OSError, UnicodeError):
            SETTINGS_ERRORS.append(
                f"{name} must be an IP address (or a host name) without a port, got {value!r}"
            )
            return default
    return value


RESYNC_SECONDS = _env_number("SLM_FLEET_RESYNC_SECONDS", 30)
#: Prometheus that scrapes the gateway and Triton; unset disables live control (SLOMet stays
#: Unknown with reason MetricsUnavailable, and the rollout does not advance past shadow
#: unless a task sets rollout.strategy: direct).
PROMETHEUS_URL = _env_url("SLM_FLEET_PROMETHEUS_URL")
SCRAPE_SECONDS = _env_number("SLM_FLEET_PROMETHEUS_SCRAPE_SECONDS", 15, most=3600)
#: "true" skips verifying an https Prometheus's certificate (verified by default; a private CA
#: goes in REQUESTS_CA_BUNDLE instead). Both can be set through the chart's operator.extraEnv.
PROMETHEUS_INSECURE = os.environ.get(
    "SLM_FLEET_PROMETHEUS_INSECURE_SKIP_VERIFY", ""
).strip().lower() in ("1", "true", "yes")
#: ServiceAccount the trainer Jobs' pods run as (unless a task sets
#: spec.training.serviceAccountName), in the task's namespace: the chart creates it with
#: `patch` on pods so the trainer can report progress. Empty: the namespace's default account.
TRAINER_SERVICE_ACCOUNT = os.environ.get("SLM_FLEET_TRAINER_SERVICE_ACCOUNT", "")
#: ServiceAccounts an AgentTask may not name in spec.training.serviceAccountName, comma-separated:
#: the chart sets the operator's and the gateway's. The trainer runs an image the task's author
#: chose; as one of these it would get the operator's or the gateway's permissions (the LLM key
#: Secrets). Refused by name in every namespace (InvalidSpec). Empty: no name is refused.
RESERVED_SERVICE_ACCOUNTS = frozenset(
    _names(os.environ.get("SLM_FLEET_RESERVED_SERVICE_ACCOUNTS", ""))
)
#: Secrets listed as imagePullSecrets of every trainer Job pod and Triton pod, comma-separated
#: (the chart's imagePullSecrets and trainer.serviceAccount.imagePullSecrets); they must exist
#: in the task's namespace. Empty: the pods get their ServiceAccount's pull secrets, if any.
IMAGE_PULL_SECRETS = _names(os.environ.get("SLM_FLEET_IMAGE_PULL_SECRETS", ""))


def _env_image(name: str, default: str) -> str:
    """An image reference from the environment (no blanks, as the CRD's image fields)."""
    value = os.environ.get(name, "").strip()
    if value and any(ch.isspace() for ch in value):
        SETTINGS_ERRORS.append(f"{name} must be an image reference without spaces, got {value!r}")
        return default
    return value or default


#: The trainer and Triton images of AgentTasks that name none (spec.training.image,
#: spec.serving.image): the chart's operator.trainerImage and operator.tritonImage, so that a
#: cluster with its own registry sets them once. Changing them retrains nothing: trainer Jobs
#: created from then on run the new one, and the Triton Deployments of tasks without their
#: own image roll to it.
IMAGES = Images(
    trainer=_env_image("SLM_FLEET_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
    triton=_env_image("SLM_FLEET_TRITON_IMAGE", DEFAULT_TRITON_IMAGE),
    pull_secrets=IMAGE_PULL_SECRETS,
)
#: After a data-prep Job found fewer examples than spec.dataset.minExamples, how long until it
#: curates again (a new task waits for its agents' calls to be captured this way).
DATA_RECHECK_SECONDS = _env_number("SLM_FLEET_DATA_RECHECK_SECONDS", 300)
#: Port of the operator's own /metrics (slm_operator_*); 0 turns it off.
METRICS_PORT = int(_env_number("SLM_FLEET_METRICS_PORT", 0, whole=True, most=65535))
#: Address it listens on: every interface in a pod (Prometheus scrapes the pod IP); the local
#: test stack sets 127.0.0.1, so nothing it starts listens beyond loopback.
METRICS_ADDR = _env_listen_address("SLM_FLEET_METRICS_ADDR", "0.0.0.0")
METRICS = OperatorMetrics()
#: First retry of a reconcile that failed with a retryable API error, doubling per failure...
BASE_BACKOFF = 1.0
#: ...up to this: an API server answering 429 or 5xx for minutes is overloaded, and every
#: failing task retrying faster would keep it so.
MAX_BACKOFF = 300.0
#: ...or up to this while every failure since the last pass that worked reached no API server
#: (down, restarting: :data:`~slm_operator.kube.UNREACHABLE`): nothing answered, so nothing is
#: overloaded by a retry, and once it is back every second of a longer wait is lag (a 5-minute
#: outage left tasks untouched for minutes after it).
MAX_UNREACHABLE_BACKOFF = 15.0
#: Objects per page of the initial LIST of each watch (kopf lists everything at once otherwise).
LIST_CHUNK_SIZE = 500
#: Labels every Job and Deployment the operator builds carries (:func:`naming.labels`).
CHILD_FILTER = {n.MANAGED_BY: n.FIELD_MANAGER}
#: Components whose pods are watched: trainer pods (progress, how a container ended) and
#: Triton pods. A Triton pod no node can take, or one whose image cannot be pulled, changes
#: nothing on its Deployment, so without this watch Serving would name the reason only at
#: the next resync (30 s by default). The price: each event of a Triton pod (scheduled,
#: started, ready) asks for a reconcile of its task; those arriving while one runs are
#: merged into a single next pass.
WATCHED_POD_COMPONENTS = ("trainer", "triton")
JOBS = ("batch", "v1", "jobs")
DEPLOYMENTS = ("apps", "v1", "deployments")
SERVICES = ("", "v1", "services")
PODS = ("", "v1", "pods")
#: (group, version, plural) of each child watch, with the label selector the API server
#: applies to it (equality for Jobs and Deployments, a set for pods).
_MANAGED = ",".join(f"{k}={v}" for k, v in sorted(CHILD_FILTER.items()))
CHILD_WATCHES: dict[tuple[str, str, str], str] = {
    JOBS: _MANAGED,
    DEPLOYMENTS: _MANAGED,
    SERVICES: _MANAGED,
    PODS: f"{_MANAGED},{n.LABEL_COMPONENT} in ({','.join(WATCHED_POD_COMPONENTS)})",
}


def _watched_component(value: str | None, **_: Any) -> bool:
    return value in WATCHED_POD_COMPONENTS


#: The same filter applied by kopf to each pod it receives (the watch already selected it).
POD_FILTER: Mapping[str, Any] = {
    n.MANAGED_BY: n.FIELD_MANAGER,
    n.LABEL_COMPONENT: _watched_component,
}

Key = tuple[str, str]


def backoff(failures: int, most: float = MAX_BACKOFF) -> float:
    """Seconds before retrying after ``failures`` retryable failures in a row: 1, 2, 4 ...
    up to ``most`` (300)."""
    return float(min(most, BASE_BACKOFF * 2 ** min(max(failures, 1) - 1, 30)))


def retry_delay(unreachable: int, answered: int) -> float:
    """Seconds before retrying a task whose retryable failures since its last pass that
    worked are ``unreachable`` ones (no API server reached) and ``answered`` ones (409, 429,
    5xx, a timeout).

    Any answered failure sets the pace (1 s doubling to 300 s, counted over those alone):
    the API server is there and overloaded, and a refused connection between its 429s says
    nothing better (a load balancer shedding load refuses some connections). Only an API
    server nothing reached is retried at most 15 s apart; one that starts answering 503
    after an outage backs off from 1 s, its outage not counted.
    """
    if answered:
        return backoff(answered)
    return backoff(unreachable, MAX_UNREACHABLE_BACKOFF)


@dataclass
class _KeyState:
    running: bool = False
    #: A trigger came while a pass ran: one more pass follows (unless it failed, see ``urgent``).
    dirty: bool = False
    #: That trigger was the AgentTask's own event: it runs even after a failed pass.
    urgent: bool = False
    #: The resourceVersions of the AgentTask's events that came while a pass ran, judged when
    #: it ends (:func:`_changed_meanwhile`): one that is not its own settled write marks it
    #: ``dirty`` and ``urgent``.
    versions: set[str] = field(default_factory=set)
    #: Retryable failures since the last pass that worked: of passes that reached no API
    #: server, and of passes it answered (409, 429, 5xx, a timeout): :func:`retry_delay`.
    #: Only a pass that works sets both back to 0.
    unreachable: int = 0
    answered: int = 0
    #: The one pending retry of this task; while it is pending, resyncs and child events wait
    #: for it instead of starting passes of their own (unless no failure since the last pass
    #: that worked was answered, see :func:`_waits_for_retry`).
    retry: asyncio.TimerHandle | None = None
    #: The last non-retryable error logged for this task: the same one is not logged again at
    #: every resync.
    last_error: str = ""
    #: The wake-up for this task's next live-control window, while it serves a model.
    window: asyncio.TimerHandle | None = None

    def cancel_retry(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None

    def cancel_window(self) -> None:
        if self.window is not None:
            self.window.cancel()
            self.window = None


class NotLeading(Exception):
    """A reconcile was about to start on a replica that no longer leads: it does not run."""


@dataclass
class Runtime:
    kube: Kube
    prom: PromMetrics | None = None
    known: set[Key] = field(default_factory=set)
    #: The uid of the object each known key names: a key outlives a delete and re-create.
    uids: dict[Key, str] = field(default_factory=dict)
    states: dict[Key, _KeyState] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: Whether this replica reconciles: always without leader election; with it, only while
    #: it holds the Lease. A standby keeps ``known`` current from its watches, so that it
    #: reconciles every task the moment it takes over.
    leading: bool = True
    elector: LeaderElector | None = None
    elector_task: asyncio.Task[None] | None = None
    #: Reconciles running in threads. Counted in the thread itself: cancelling the coroutine
    #: that awaits one does not stop it, and shutdown must not release the Lease before it
    #: ends.
    _running: int = 0
    _running_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Per task, the resourceVersion of the operator's own last status write, recorded by the
    #: reconcile thread as soon as the API server answered it (:meth:`wrote_status`).
    _own_versions: dict[Key, str] = field(default_factory=dict)
    _own_lock: threading.Lock = field(default_factory=threading.Lock)

    def wrote_status(self, key: Key, version: str) -> None:
        """The reconcile of ``key`` wrote its status, now at ``version``, and left nothing
        more to do (:func:`slm_operator.reconcile.reconcile`'s ``status_written``)."""
        with self._own_lock:
            self._own_versions[key] = version

    def own_write(self, key: Key, version: str | None) -> bool:
        """Whether an event of ``key`` at ``version`` shows the operator's own status write.

        Why skip its pass: that pass read the object just as the write left it (the write
        names the resourceVersion it read, so nothing came between), planned nothing more,
        and cost as many API calls as the pass that wrote, which doubled the requests of
        every serving task at each live-control window. Any other change has another
        resourceVersion. Recorded from the thread, as soon as the write is answered,
        because the event often comes while the pass still runs; one that comes even before
        this is recorded is judged when the pass ends (:func:`_changed_meanwhile`). A kopf
        re-list brings the same version again and is skipped too: the resync still
        reconciles every task.
        """
        with self._own_lock:
            return bool(version) and self._own_versions.get(key) == version

    def in_flight(self) -> int:
        with self._running_lock:
            return self._running

    def counted(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, counted in :meth:`in_flight` while it runs; not run at all
        (:class:`NotLeading`) once this replica stopped leading, checked under the same lock
        that :func:`_lost_leadership` steps down under."""
        with self._running_lock:
            if not self.leading:
                raise NotLeading()
            self._running += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._running_lock:
                self._running -= 1

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def forget(self, key: Key) -> None:
        """Drop ``key``'s state (it was deleted), unless a pass of it is running: that pass
        must still see ``running`` so that a task created again under the same name does not
        get a second, concurrent pass; it drops the state itself when it ends."""
        with self._own_lock:
            self._own_versions.pop(key, None)
        st = self.states.get(key)
        if st is None:
            return
        st.cancel_retry()
        st.cancel_window()
        st.unreachable, st.answered, st.last_error = 0, 0, ""
        if not st.running:
            del self.states[key]


_runtime: Runtime | None = None
#: The port /metrics is served on, once per process (kopf may start up again in tests).
_metrics_served: list[int] = []


async def trigger(key: Key, *, urgent: bool = False, version: str | None = None) -> None:
    """Reconcile ``key`` now, or once more after the reconcile already running for it.

    ``urgent``: the AgentTask itself changed (or its retry is due), so it runs even while a
    retry is pending; resyncs and child events then leave the task to that retry, unless no
    pass since the last one that worked reached the API server (:func:`_waits_for_retry`).
    ``version``: the resourceVersion of the AgentTask event that asks (urgent, then). While a
    pass runs it is only noted, and judged when the pass ends (:func:`_changed_meanwhile`).
    """
    rt = _runtime
    if rt is None or key not in rt.known or not rt.leading:
        return
    st = rt.states.setdefault(key, _KeyState())
    if st.running:
        if version:
            st.versions.add(version)
        else:
            st.dirty = True
            st.urgent = st.urgent or urgent
        return
    if st.retry is not None and not urgent:
        if _waits_for_retry(st):
            return
        st.cancel_retry()
    st.running = True
    try:
        while True:
            st.dirty = st.urgent = False
            st.versions.clear()
            ok = await _pass(rt, key, st)
            if _changed_meanwhile(rt, key, st):
                st.dirty = st.urgent = True
            # After a failure only the task's own change runs again at once; anything else
            # waits for the retry or the resync, or a failing task would fail at event rate.
            if not (st.urgent if not ok else st.dirty) or key not in rt.known or not rt.leading:
                break
    finally:
        st.running = False
        if key not in rt.known:
            rt.forget(key)  # deleted while it ran


def _waits_for_retry(st: _KeyState) -> bool:
    """Whether a resync or child event of a task whose retry is pending leaves it to that
    retry, rather than cancelling it and running a pass now.

    It does once the API server has answered a failure since the task's last pass that
    worked (a conflict, 429, 5xx, a timeout): an overloaded server gets no more passes than
    the back-off allows, even while connections to it are refused in between (a flapping
    server let a pass through about every second). Not while no pass reached it at all: the
    event itself shows that the API server is back (its watches listed again), and a resync
    is cheap to try; left to the retry, whose back-off grew through the outage, a 90 s outage
    left every task untouched for 35 s after it (a Job completed meanwhile, DataReady late).
    The AgentTask's own event after the outage does not help: the watch lists it again at
    the version of the operator's last status write, which is skipped as its own.
    """
    return st.answered > 0


def _changed_meanwhile(rt: Runtime, key: Key, st: _KeyState) -> bool:
    """Whether an event of the AgentTask that came while the pass ran shows a change other
    than that pass's own settled status write; the noted versions are dropped.

    Why judged when the pass ends: on a real API server the watch event of the status write
    often reaches :func:`on_task` before the reconcile thread has read the PATCH's answer
    and called :meth:`Runtime.wrote_status`, so judged on arrival it looked like another
    writer's change and cost a second, idle pass (54 passes for 30 status writes).
    """
    versions, st.versions = st.versions, set()
    return any(not rt.own_write(key, version) for version in versions)


async def _pass(rt: Runtime, key: Key, st: _KeyState) -> bool:
    """One reconcile of ``key``; schedules its retry when it fails retryably. True if it worked."""
    started = time.monotonic()
    uid = rt.uids.get(key)  # the object this pass reads, as far as events have told
    try:
        plan = await asyncio.to_thread(
            rt.counted,
            reconcile,
            rt.kube,
            key[0],
            key[1],
            None,
            rt.prom,
            TRAINER_SERVICE_ACCOUNT,
            DATA_RECHECK_SECONDS,
            reserved_accounts=RESERVED_SERVICE_ACCOUNTS,
            images=IMAGES,
            status_written=functools.partial(rt.wrote_status, key),
        )
    except NotLeading:
        return True  # stepped down meanwhile: the new leader reconciles it
    except TaskGone:
        if rt.uids.get(key) != uid:
            # Created again under its name while this pass ran (`kubectl replace --force`):
            # the 404 was the old object's; the new one's ADDED asked for another pass.
            return True
        # Deleted, whether or not its DELETED event comes (see TaskGone): forgotten here.
        log.debug("AgentTask %s/%s does not exist any more; forgotten", *key)
        rt.known.discard(key)
        rt.uids.pop(key, None)
        st.unreachable, st.answered, st.last_error = 0, 0, ""
        st.cancel_retry()
        st.cancel_window()
        METRICS.forget_task(*key)
        return True
    except KubeError as e:
        METRICS.reconciles.labels(RESULT_RETRY if e.retryable else RESULT_ERROR).inc()
        st.cancel_window()
        if e.retryable:
            if e.status == UNREACHABLE:
                st.unreachable += 1
            else:
                st.answered += 1
            delay = _schedule_retry(rt, key, st, retry_delay(st.unreachable, st.answered))
            log.info("reconcile %s/%s failed (%s); retrying in %.1fs", *key, e, delay)
        else:
            st.cancel_retry()
            _log_once(st, key, str(e), "reconcile %s/%s failed (%s); the resync retries it")
        if isinstance(e, ChildWriteBusy) and rt.leading:  # its status was written
            _written(rt, key, st, e.plan)
        return False
    except Exception as e:
        METRICS.reconciles.labels(RESULT_ERROR).inc()
        st.cancel_retry()
        st.cancel_window()
        _log_once(st, key, repr(e), "reconcile %s/%s crashed (%s); the resync retries it", True)
        return False
    finally:
        METRICS.duration.observe(time.monotonic() - started)
    st.unreachable, st.answered, st.last_error = 0, 0, ""
    st.cancel_retry()
    if not rt.leading:  # shutting down: nothing more to schedule or export
        st.cancel_window()
        return True
    METRICS.reconciles.labels(RESULT_OK).inc()
    _written(rt, key, st, plan)
    return True


def _written(rt: Runtime, key: Key, st: _KeyState, plan: Plan | None) -> None:
    """After a pass that wrote the task's status: its next live-control window, and its
    series set from that status."""
    st.cancel_window()
    if rt.prom is not None and plan is not None and plan.next_window_s is not None:
        _schedule_window(rt, key, st, plan.next_window_s)
    # Not known any more: the DELETED event came while this reconcile ran on what it had
    # read before; its series must not come back after forget_task.
    if plan is None or key not in rt.known:  # gone, or being deleted
        METRICS.forget_task(*key)
    else:
        METRICS.observe_task(key[0], key[1], plan.status)


def _log_once(st: _KeyState, key: Key, error: str, msg: str, trace: bool = False) -> None:
    """Log a non-retryable failure at ERROR the first time, at DEBUG while it repeats."""
    level = logging.DEBUG if error == st.last_error else logging.ERROR
    st.last_error = error
    log.log(level, msg, key[0], key[1], error, exc_info=trace and level == logging.ERROR)


def _schedule_retry(rt: Runtime, key: Key, st: _KeyState, delay: float) -> float:
    """Retry ``key`` after ``delay`` unless a retry is already pending; when it runs.

    A pending retry is moved sooner only while no failure since the last pass that worked
    was answered (:func:`_waits_for_retry`): one the API server's 429s or 5xx set holds, or
    a refused connection between them would cut their back-off short.
    """
    loop = asyncio.get_running_loop()
    if st.retry is not None and not st.answered and st.retry.when() > loop.time() + delay:
        st.cancel_retry()
    if st.retry is None:
        st.retry = loop.call_later(delay, _retry_due, rt, key, st)
    return max(0.0, st.retry.when() - loop.time())


def _schedule_window(rt: Runtime, key: Key, st: _KeyState, delay: float) -> None:
    """Reconcile ``key`` when its next live-control window is due (``delay`` seconds).

    Why a timer per task: the resync alone (every ``RESYNC_SECONDS``) judged any shorter
    ``windowSeconds`` late, so fallback, scaling and promotion ran at the resync's pace,
    not the task's. The wake-up runs even while a retry is pending: only a pass that wrote
    the status sets a window (one whose child writes were busy, too), so a task failing
    before its status (the API server down) is still left to its retries' back-off.
    """
    st.window = asyncio.get_running_loop().call_later(delay, _window_due, rt, key, st)


def _window_due(rt: Runtime, key: Key, st: _KeyState) -> None:
    st.window = None
    if rt is _runtime:
        rt.spawn(trigger(key, urgent=True))


def _retry_due(rt: Runtime, key: Key, st: _KeyState) -> None:
    st.retry = None
    if rt is _runtime:
        rt.spawn(trigger(key, urgent=True))


async def _resync_loop() -> None:
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        rt = _runtime
        if rt is None:
            return
        for key in sorted(rt.known):
            rt.spawn(trigger(key))


#: kopf's line after each handler that returned: "Handler 'on_pod' succeeded.".
_HANDLER_SUCCEEDED = re.compile(r"Handler '[^']*' succeeded\.")


def is_handler_noise(record: logging.LogRecord, root_level: int) -> bool:
    """Whether ``record`` is kopf's "Handler '...' succeeded." below --verbose.

    Why dropped: kopf logs it at INFO once per watch event of every task and child (each
    pod's status change, each status write of the operator's own), so at the default level
    the log was mostly such lines, which say nothing, and what the operator decided (its
    Events, :meth:`slm_operator.kube.Kube.event`) was lost among them. --verbose and
    --debug set kopf's root logger to DEBUG: there they stay, to follow every pass.
    """
    return (
        root_level > logging.DEBUG
        and record.levelno <= logging.INFO
        and _HANDLER_SUCCEEDED.fullmatch(record.getMessage()) is not None
    )


class _HandlerNoiseFilter(logging.Filter):
    """Drops :func:`is_handler_noise` records, judged by the root level when logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_handler_noise(record, logging.getLogger().getEffectiveLevel())


#: One instance: ``addFilter`` adds an instance once, however often kopf starts up.
_HANDLER_NOISE_FILTER = _HandlerNoiseFilter()


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's settings: no state on the AgentTask, and server-side selected child watches;
    kopf's per-handler "succeeded" lines dropped below --verbose (:func:`is_handler_noise`).

    Why server-side: a ``labels=`` filter on a handler is applied by kopf after it received
    the object, so without a selector on the watch itself the operator would LIST and WATCH
    every pod, Job and Deployment in its namespaces (with cluster-wide RBAC, in the
    cluster): tens of thousands of pods are a GiB of memory. Only the children it builds
    carry these labels.
    """
    logging.getLogger("kopf.objects").addFilter(_HANDLER_NOISE_FILTER)
    settings.persistence.finalizer = f"{n.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=n.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=n.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.chunk_size = LIST_CHUNK_SIZE
    for resource, selector in CHILD_WATCHES.items():
        settings.watching.label_selectors[resource] = selector
    settings.networking.request_timeout = 60
    settings.networking.error_backoffs = API_BACKOFFS


#: The longest wait between two tries of one of kopf's own API requests.
MAX_API_BACKOFF_SECONDS = 21.0
#: How long kopf keeps trying one of its own API requests that gets a 5xx or 403.
API_RETRY_SECONDS = 600.0


#: kopf's waits between tries of a request that got a 5xx or 403: its own first steps, then
#: every :data:`MAX_API_BACKOFF_SECONDS`, about :data:`API_RETRY_SECONDS` in all; then kopf
#: raises. Why ten minutes, not kopf's 54 s: its watch loop does not catch that error, so after
#: a minute of 503s from a load balancer in front of the API server (control-plane
#: maintenance), or of 403s while a Role is recreated, every watcher died, at once on every
#: replica, and the operator exited with a traceback per watch or hung, reconciling nothing.
#: Why not endless: kopf falls back only on the error, e.g. to the namespaces it was given
#: when it may not list namespaces (namespace-scoped RBAC); without an end it never watched.
_FIRST_BACKOFFS = (1.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0)
API_BACKOFFS = _FIRST_BACKOFFS + (MAX_API_BACKOFF_SECONDS,) * math.ceil(
    (API_RETRY_SECONDS - sum(_FIRST_BACKOFFS)) / MAX_API_BACKOFF_SECONDS
)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _runtime
    if SETTINGS_ERRORS:  # started by a bare `kopf run`, past cli()'s check
        raise kopf.PermanentError("; ".join(SETTINGS_ERRORS))
    try:  # first: kopf retries a handler's ValueError every minute, runtime and all
        lease = LeaseSettings.from_env()
    except ValueError as e:
        raise kopf.PermanentError(str(e)) from None
    configure(settings)
    prom = (
        PromMetrics(PROMETHEUS_URL, SCRAPE_SECONDS, verify_tls=not PROMETHEUS_INSECURE)
        if PROMETHEUS_URL
        else None
    )
    if METRICS_PORT and not _metrics_served:
        # Before the runtime: a port that cannot be bound fails this handler, which kopf
        # retries; a runtime made first would leave one more resync loop per retry.
        serve(METRICS, METRICS_PORT, METRICS_ADDR)
        _metrics_served.append(METRICS_PORT)
    api = load_api_client()
    rt = _runtime = Runtime(kube=Kube(api), prom=prom)
    rt.spawn(_resync_loop())
    if lease is None:
        METRICS.leader.set(1)
    else:
        rt.leading = False
        METRICS.leader.set(0)
        rt.elector = LeaderElector(
            Kube(without_retries(api)),
            lease,
            lambda: _started_leading(rt),
            lambda: _lost_leadership(rt),
        )
        rt.elector_task = asyncio.get_running_loop().create_task(rt.elector.run())
        log.info(
            "leader election on lease %s/%s as %s: standing by until it is held",
            lease.namespace,
            lease.name,
            lease.identity,
        )
    log.info(
        "slm-fleet-operator started; resync every %.0fs; trainer ServiceAccount %s",
        RESYNC_SECONDS,
        TRAINER_SERVICE_ACCOUNT or "(namespace default)",
    )
    if prom is None:
        # Said once here: the tasks' SLOMet and Ready say it too, but whoever reads the
        # operator's log for why no canary ever starts looks here first.
        log.warning(
            "no Prometheus configured (SLM_FLEET_PROMETHEUS_URL unset): live control is off "
            "(no SLO fallback, autoscaling or canary); a task rolled out progressively stays "
            "in shadow, and rollout.strategy: direct serves a model without live metrics"
        )


def _started_leading(rt: Runtime) -> None:
    """This replica took the Lease: reconcile every task it knows of now."""
    if rt is not _runtime:
        return
    rt.leading = True
    METRICS.leader.set(1)
    for key in sorted(rt.known):
        rt.spawn(trigger(key, urgent=True))


def _lost_leadership(rt: Runtime) -> None:
    """This replica lost the Lease. With no reconcile running it stands by at once (none can
    start: :meth:`Runtime.counted` checks ``leading`` under the lock this steps down under);
    with one running it exits, and the pod restarts as a standby.

    Why exit then, as controller-runtime's managers do: a reconcile running in a thread
    cannot be interrupted, and each of its API calls may take a while, so it would write on
    after another replica took over. The renew deadline ends before the lease does, so dying
    now ends every write before a standby may start. Logged at ERROR, flushed first.
    """
    with rt._running_lock:
        rt.leading = False
        running = rt._running
    METRICS.leader.set(0)
    if running:
        _exit_now(
            "lost the leader Lease while a reconcile was running; exiting so that it writes "
            "nothing after another replica took over (the pod restarts as a standby)"
        )
    log.error("lost the leader Lease; standing by (no reconcile was running)")
    for key in list(rt.states):  # no retries or windows: the new leader reconciles
        rt.forget(key)
    for key in rt.known:  # the new leader exports them
        METRICS.forget_task(*key)


def _exit_now(message: str) -> None:
    log.error(message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


#: How long shutdown waits for running reconciles before it releases the Lease (the chart's
#: grace period is 30 s; past it, the process exits without releasing, and the Lease expires).
SHUTDOWN_WAIT_SECONDS = 10.0


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    """Stop; a leader lets its running reconciles end, then hands the Lease over at once
    instead of letting it expire (the standby would wait the whole lease duration).

    The elector keeps renewing while reconciles end (a renewal that fails past the deadline
    still exits, as while leading); reconciles still running after ``SHUTDOWN_WAIT_SECONDS``
    end with the process, not after a standby took over.
    """
    global _runtime
    rt = _runtime
    if rt is None:
        return
    _runtime = None
    with rt._running_lock:  # no pass starts, and none that ends schedules another
        was_leading, rt.leading = rt.leading, False
    for t in list(rt.tasks):
        t.cancel()
    if rt.elector is None or rt.elector_task is None:
        METRICS.leader.set(0)
        return
    if was_leading:
        deadline = time.monotonic() + SHUTDOWN_WAIT_SECONDS
        while rt.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    rt.elector_task.cancel()
    METRICS.leader.set(0)
    if rt.in_flight():
        _exit_now(
            f"a reconcile is still running after {SHUTDOWN_WAIT_SECONDS:.0f}s; exiting "
            "without releasing the Lease, which expires (handed over, a standby would "
            "reconcile beside it)"
        )
    await rt.elector.stop()


@kopf.on.event(n.GROUP, n.VERSION, n.PLURAL)
async def on_task(
    type: str,
    namespace: str | None,
    name: str,
    uid: str | None = None,
    body: Mapping[str, Any] | None = None,
    **_: Any,
) -> None:
    """Track which AgentTasks exist, and reconcile one whenever it changes, unless the change
    is the operator's own status write that left nothing to do (:meth:`Runtime.own_write`).

    Why the uid: kopf queues events per object uid, so a task deleted and created again under
    the same name (``kubectl replace --force``, an Argo CD ``Replace=true`` sync) has two
    workers, and the old object's DELETED can arrive after the new one's ADDED. Acted on, it
    forgot the new task: nothing but an edit reconciled it again (no child event, no resync).
    A DELETED for an object other than the one the key now names is ignored.
    """
    rt = _runtime
    if rt is None or namespace is None:
        return
    key = (namespace, name)
    if type == "DELETED":
        current = rt.uids.get(key)
        if uid and current and current != uid:
            log.debug("AgentTask %s/%s: DELETED of an older object (uid %s) ignored", *key, uid)
            return
        rt.uids.pop(key, None)
        rt.known.discard(key)
        rt.forget(key)
        METRICS.forget_task(*key)
        return
    if uid:
        rt.uids[key] = uid
    rt.known.add(key)
    version = ((body or {}).get("metadata") or {}).get("resourceVersion")
    if rt.own_write(key, version):
        log.debug("AgentTask %s/%s: the event of its own status write; no pass for it", *key)
        return
    await trigger(key, urgent=True, version=version if isinstance(version, str) else None)


async def _on_child(labels: Mapping[str, str], namespace: str | None) -> None:
    task = labels.get(n.LABEL_TASK)
    if task and namespace and _runtime is not None and (namespace, task) in _runtime.known:
        await trigger((namespace, task))


@kopf.on.event(*JOBS, labels=CHILD_FILTER)
async def on_job(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    await _on_child(labels, namespace)


@kopf.on.event(*PODS, labels=POD_FILTER)
async def on_pod(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    await _on_child(labels, namespace)


@kopf.on.event(*DEPLOYMENTS, labels=CHILD_FILTER)
async def on_deployment(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    await _on_child(labels, namespace)


@kopf.on.event(*SERVICES, labels=CHILD_FILTER)
async def on_service(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    """A Triton Service deleted by hand is applied again at once, not at the next resync:
    until then the gateway's SLM calls to it fail (and fall back to the LLM)."""
    await _on_child(labels, namespace)


#: What ``slm-fleet-operator --help`` prints: the flags are kopf's, the settings environment
#: variables (the chart sets each from a value), so that one place lists them all.
HELP = f"""usage: slm-fleet-operator (--namespace NS ... | --all-namespaces) [kopf run flags]

Reconciles AgentTasks (slmfleet.dev/v1alpha1): data prep, fine-tune and export Jobs, the
evaluation gate, Triton serving, scaling and SLO fallback. The flags are `kopf run`'s
(`kopf run --help`); the operator adds --standalone. Settings come from the environment:

  SLM_FLEET_PROMETHEUS_URL                 Prometheus scraping the gateway and Triton; unset:
                                           no live control (no scaling, no SLO fallback, the
                                           rollout stays at shadow unless a task sets
                                           rollout.strategy: direct)
  SLM_FLEET_PROMETHEUS_SCRAPE_SECONDS      its scrape interval (15); rates are read over two
  SLM_FLEET_PROMETHEUS_INSECURE_SKIP_VERIFY  true: skip verifying an https Prometheus's
                                           certificate (a private CA: REQUESTS_CA_BUNDLE)
  SLM_FLEET_RESYNC_SECONDS                 full resync of every task (30)
  SLM_FLEET_DATA_RECHECK_SECONDS           curate again after too few examples (300)
  SLM_FLEET_TRAINER_IMAGE                  trainer image of tasks without spec.training.image
                                           ({DEFAULT_TRAINER_IMAGE})
  SLM_FLEET_TRITON_IMAGE                   Triton image of tasks without spec.serving.image
                                           ({DEFAULT_TRITON_IMAGE})
  SLM_FLEET_IMAGE_PULL_SECRETS             Secrets listed on trainer and Triton pods (a,b)
  SLM_FLEET_TRAINER_SERVICE_ACCOUNT        account of trainer pods unless a task names one
  SLM_FLEET_RESERVED_SERVICE_ACCOUNTS      accounts no task may run its trainer as (a,b)
  SLM_FLEET_METRICS_PORT                   port of the operator's /metrics; 0: none (0)
  SLM_FLEET_METRICS_ADDR                   its address (0.0.0.0)
  SLM_FLEET_LEADER_ELECTION_LEASE          NAMESPACE/NAME of the Lease replicas elect a
                                           leader on; unset: no election (one replica)
  SLM_FLEET_LEADER_ELECTION_LEASE_SECONDS  lease duration (15)
  SLM_FLEET_LEADER_ELECTION_RENEW_DEADLINE_SECONDS  a leader that cannot renew within it
                                           stands by (10)
  SLM_FLEET_LEADER_ELECTION_RETRY_SECONDS  between attempts to take or renew the Lease (2)
  SLM_FLEET_POD_NAME                       this pod's name (downward API): its restarted
                                           container takes its own dead predecessor's Lease
"""


def _kopf_run_watches_a_namespace(args: list[str]) -> bool:
    """Whether ``kopf run`` given ``args`` watches one namespace or more, or all of them.

    Asked of kopf's own command rather than matched against the flags' spellings: click also
    takes ``-nNS``, ``-vnNS`` and the ``KOPF_RUN_*`` variables (a string match refused them,
    though kopf would have run), and knows that in ``-L -n`` the ``-n`` is --liveness's
    value. Parsed leniently: a flag kopf does not know is left for kopf to report, and
    skipped here, so that a namespace given after it still counts (click's lenient parse
    alone stopped at ``--bogus`` in ``--bogus -n NS``, and the operator said "pass
    --namespace NS" where kopf says "No such option: --bogus").
    """
    from kopf.cli import main as kopf_main

    # Under its group's context, as kopf runs it, so that the KOPF_RUN_* variables count.
    with kopf_main.make_context("kopf", ["run"], resilient_parsing=True) as group:
        run = kopf_main.commands["run"].make_context(
            "run",
            list(args),
            parent=group,
            resilient_parsing=True,
            ignore_unknown_options=True,
            allow_extra_args=True,
        )
    # KOPF_RUN_NAMESPACE is the variable kopf's run itself still adds as a namespace.
    return bool(
        run.params.get("namespaces")
        or run.params.get("clusterwide")
        or os.environ.get("KOPF_RUN_NAMESPACE")
    )


def cli() -> None:
    """Console entry point: ``kopf run --standalone -m slm_operator.main`` plus your flags."""
    from kopf.cli import main as kopf_main

    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        sys.stdout.write(HELP)
        return
    if SETTINGS_ERRORS:
        sys.stderr.write("".join(f"slm-fleet-operator: {e}\n" for e in SETTINGS_ERRORS))
        raise SystemExit(2)
    if not _kopf_run_watches_a_namespace(args):
        sys.stderr.write(
            "slm-fleet-operator: pass --namespace NS (repeatable) or --all-namespaces\n"
        )
        raise SystemExit(2)
    try:
        LeaseSettings.from_env()
    except ValueError as e:
        sys.stderr.write(f"slm-fleet-operator: {e}\n")
        raise SystemExit(2) from None
    sys.argv = ["kopf", "run", "--standalone", "-m", "slm_operator.main", *args]
    kopf_main()


if __name__ == "__main__":
    cli()
