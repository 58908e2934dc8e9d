"""kopf wiring: which events wake the reconcile, and the settings that keep kopf out of the way.

Run it as ``slm-fleet-operator --namespace NS`` (or ``--all-namespaces``), which is
``kopf run -m slm_operator.main --standalone`` underneath.

Design choices:
- Only ``@kopf.on.event`` handlers: they need no finalizer and store no handler progress or
  diff-base on the object, so kopf never writes to an AgentTask. All state lives in status,
  written by the reconcile.
- Events on the AgentTask and on its Jobs, pods and Deployment trigger a reconcile of the
  task; a periodic resync covers anything missed (level-triggered: no event is essential).
- Per task, at most one reconcile runs at a time; triggers that arrive meanwhile coalesce
  into one more pass. Retryable API errors (conflicts, 429, 5xx) back off exponentially.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from slm_operator import naming as n
from slm_operator.kube import Kube, KubeError, load_api_client
from slm_operator.metrics import RESULT_ERROR, RESULT_OK, RESULT_RETRY, OperatorMetrics, serve
from slm_operator.prom import PromMetrics
from slm_operator.reconcile import reconcile

log = logging.getLogger("slm_operator")


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names, without blanks and duplicates."""
    return tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))


RESYNC_SECONDS = float(os.environ.get("SLM_FLEET_RESYNC_SECONDS", "30"))
#: Prometheus that scrapes the gateway and Triton; unset disables live control (SLOMet stays
#: Unknown with reason MetricsUnavailable, and the rollout does not advance past shadow).
PROMETHEUS_URL = os.environ.get("SLM_FLEET_PROMETHEUS_URL", "")
SCRAPE_SECONDS = float(os.environ.get("SLM_FLEET_PROMETHEUS_SCRAPE_SECONDS", "15"))
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
#: After a data-prep Job found fewer examples than spec.dataset.minExamples, how long until it
#: curates again (a new task waits for its agents' calls to be captured this way).
DATA_RECHECK_SECONDS = float(os.environ.get("SLM_FLEET_DATA_RECHECK_SECONDS", "300"))
#: Port of the operator's own /metrics (slm_operator_*); 0 turns it off.
METRICS_PORT = int(os.environ.get("SLM_FLEET_METRICS_PORT", "0") or 0)
METRICS = OperatorMetrics()
MAX_BACKOFF = 60.0
CHILD_FILTER = {n.MANAGED_BY: n.FIELD_MANAGER}

Key = tuple[str, str]


@dataclass
class _KeyState:
    running: bool = False
    dirty: bool = False
    failures: int = 0


@dataclass
class Runtime:
    kube: Kube
    prom: PromMetrics | None = None
    known: set[Key] = field(default_factory=set)
    states: dict[Key, _KeyState] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)


_runtime: Runtime | None = None
#: The port /metrics is served on, once per process (kopf may start up again in tests).
_metrics_served: list[int] = []


async def trigger(key: Key) -> None:
    """Reconcile ``key`` now, or once more after the reconcile already running for it."""
    rt = _runtime
    if rt is None:
        return
    st = rt.states.setdefault(key, _KeyState())
    if st.running:
        st.dirty = True
        return
    st.running = True
    try:
        while True:
            st.dirty = False
            started = time.monotonic()
            try:
                plan = await asyncio.to_thread(
                    reconcile,
                    rt.kube,
                    key[0],
                    key[1],
                    None,
                    rt.prom,
                    TRAINER_SERVICE_ACCOUNT,
                    DATA_RECHECK_SECONDS,
                    reserved_accounts=RESERVED_SERVICE_ACCOUNTS,
                    image_pull_secrets=IMAGE_PULL_SECRETS,
                )
                st.failures = 0
                METRICS.reconciles.labels(RESULT_OK).inc()
                # Not known any more: the DELETED event came while this reconcile ran on what
                # it had read before; its series must not come back after forget_task.
                if plan is None or key not in rt.known:  # gone, or being deleted
                    METRICS.forget_task(*key)
                else:
                    METRICS.observe_task(key[0], key[1], plan.status)
            except KubeError as e:
                METRICS.reconciles.labels(RESULT_RETRY if e.retryable else RESULT_ERROR).inc()
                st.failures += 1
                delay = min(MAX_BACKOFF, 0.5 * 2 ** min(st.failures, 8))
                level = logging.INFO if e.retryable else logging.ERROR
                log.log(
                    level,
                    "reconcile %s/%s failed (%s); retrying in %.1fs",
                    key[0],
                    key[1],
                    e,
                    delay,
                )
                rt.spawn(_retry_later(key, delay))
            except Exception:
                METRICS.reconciles.labels(RESULT_ERROR).inc()
                st.failures += 1
                log.exception(
                    "reconcile %s/%s crashed; the periodic resync will retry", key[0], key[1]
                )
            finally:
                METRICS.duration.observe(time.monotonic() - started)
            if not st.dirty:
                break
    finally:
        st.running = False


async def _retry_later(key: Key, delay: float) -> None:
    await asyncio.sleep(delay)
    await trigger(key)


async def _resync_loop() -> None:
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        rt = _runtime
        if rt is None:
            return
        for key in sorted(rt.known):
            rt.spawn(trigger(key))


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _runtime
    settings.persistence.finalizer = f"{n.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=n.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=n.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    prom = (
        PromMetrics(PROMETHEUS_URL, SCRAPE_SECONDS, verify_tls=not PROMETHEUS_INSECURE)
        if PROMETHEUS_URL
        else None
    )
    if METRICS_PORT and not _metrics_served:
        # Before the runtime: a port that cannot be bound fails this handler, which kopf
        # retries; a runtime made first would leave one more resync loop per retry.
        serve(METRICS, METRICS_PORT)
        _metrics_served.append(METRICS_PORT)
    _runtime = Runtime(kube=Kube(load_api_client()), prom=prom)
    _runtime.spawn(_resync_loop())
    log.info(
        "slm-fleet-operator started; resync every %.0fs; trainer ServiceAccount %s",
        RESYNC_SECONDS,
        TRAINER_SERVICE_ACCOUNT or "(namespace default)",
    )


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    global _runtime
    if _runtime is not None:
        for t in list(_runtime.tasks):
            t.cancel()
        _runtime = None


@kopf.on.event(n.GROUP, n.VERSION, n.PLURAL)
async def on_task(type: str, namespace: str | None, name: str, **_: Any) -> None:
    rt = _runtime
    if rt is None or namespace is None:
        return
    key = (namespace, name)
    if type == "DELETED":
        rt.known.discard(key)
        rt.states.pop(key, None)
        METRICS.forget_task(*key)
        return
    rt.known.add(key)
    await trigger(key)


async def _on_child(labels: Mapping[str, str], namespace: str | None) -> None:
    task = labels.get(n.LABEL_TASK)
    if task and namespace and _runtime is not None and (namespace, task) in _runtime.known:
        await trigger((namespace, task))


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_FILTER)
async def on_job(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    await _on_child(labels, namespace)


@kopf.on.event("", "v1", "pods", labels={n.LABEL_COMPONENT: "trainer"})
async def on_pod(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    await _on_child(labels, namespace)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_FILTER)
async def on_deployment(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    await _on_child(labels, namespace)


def cli() -> None:
    """Console entry point: ``kopf run --standalone -m slm_operator.main`` plus your flags."""
    from kopf.cli import main as kopf_main

    args = sys.argv[1:]
    if not any(
        a in ("-n", "--namespace", "-A", "--all-namespaces") or a.startswith("--namespace=")
        for a in args
    ):
        sys.stderr.write(
            "slm-fleet-operator: pass --namespace NS (repeatable) or --all-namespaces\n"
        )
        raise SystemExit(2)
    sys.argv = ["kopf", "run", "--standalone", "-m", "slm_operator.main", *args]
    kopf_main()


if __name__ == "__main__":
    cli()
