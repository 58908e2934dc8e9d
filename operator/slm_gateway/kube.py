"""Thin adapter that keeps the route table in step with AgentTasks through the Kubernetes API.

Why a watch and not a mounted ConfigMap: a ConfigMap volume reaches the pod a minute or more
after it changes, while the operator flips a task to the LLM exactly when its SLM is failing.
A watch delivers the status change in milliseconds, with no restart.

The official ``kubernetes`` client's watch runs in one daemon thread: list (which sets the
whole table and marks it ready), then watch from the list's resourceVersion; when the watch
ends (``resync_s``, or a 410 Gone) it lists again, which also re-reads the API keys from
their Secrets. Failures back off and retry; the last good table keeps serving meanwhile.
Only ``get`` on the named Secrets and ``list``/``watch`` on agenttasks are needed.
"""

from __future__ import annotations

import base64
import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from slm_gateway.routes import (
    DEFAULT_LLM_TIMEOUT_S,
    DEFAULT_SLM_TIMEOUT_S,
    Route,
    RouteError,
    RouteTable,
    route_from_task,
    secret_ref,
)

log = logging.getLogger(__name__)

GROUP = "slmfleet.dev"
VERSION = "v1alpha1"
PLURAL = "agenttasks"


def api_client(kubeconfig: str | None = None) -> Any:
    """A client from ``kubeconfig``, else in-cluster credentials, else the default kubeconfig."""
    k8s: Any = importlib.import_module("kubernetes")
    client, config = k8s.client, k8s.config
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    except config.ConfigException:
        return config.new_client_from_config()


class AgentTaskWatcher:
    """Feeds a :class:`RouteTable` from AgentTasks in one namespace (or all, with None)."""

    def __init__(
        self,
        table: RouteTable,
        namespace: str | None,
        *,
        kubeconfig: str | None = None,
        default_slm_timeout_s: float = DEFAULT_SLM_TIMEOUT_S,
        llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S,
        resync_s: int = 300,
        version: str = VERSION,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.table = table
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.default_slm_timeout_s = default_slm_timeout_s
        self.llm_timeout_s = llm_timeout_s
        self.resync_s = resync_s
        self.version = version
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self.events = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slm-route-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        from kubernetes import client

        backoff = 1.0
        api = api_client(self.kubeconfig)
        custom = client.CustomObjectsApi(api)
        core = client.CoreV1Api(api)
        while not self._stop.is_set():
            try:
                rv = self._relist(custom, core)
                backoff = 1.0
                self._follow(custom, core, rv)
            except Exception as exc:  # the loop must survive any API or network failure
                log.warning(
                    "AgentTask watch failed (%s); retrying in %.0fs", _summary(exc), backoff
                )
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)

    def _list_fn(self, custom: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self.namespace:
            return custom.list_namespaced_custom_object, (
                GROUP,
                self.version,
                self.namespace,
                PLURAL,
            )
        return custom.list_cluster_custom_object, (GROUP, self.version, PLURAL)

    def _relist(self, custom: Any, core: Any) -> str:
        fn, args = self._list_fn(custom)
        listing = fn(*args)
        routes = []
        for obj in listing.get("items", []):
            route = self._route(obj, core)
            if route is not None:
                routes.append(route)
        self.table.replace_all(routes)
        self._changed()
        log.info("routes listed: %d task(s)", len(routes))
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    def _follow(self, custom: Any, core: Any, rv: str) -> None:
        k8s: Any = importlib.import_module("kubernetes")
        api_exception = k8s.client.exceptions.ApiException
        fn, args = self._list_fn(custom)
        self._watch = k8s.watch.Watch()
        try:
            for event in self._watch.stream(
                fn,
                *args,
                resource_version=rv,
                timeout_seconds=self.resync_s,
                allow_watch_bookmarks=True,
                _request_timeout=self.resync_s + 30,
            ):
                if self._stop.is_set():
                    return
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    log.info("AgentTask watch expired (%s); listing again", obj.get("code"))
                    return
                if kind == "BOOKMARK":
                    continue
                self.events += 1
                meta = obj.get("metadata") or {}
                key = f"{meta.get('namespace')}/{meta.get('name')}"
                if kind == "DELETED":
                    self.table.remove(key)
                else:
                    route = self._route(obj, core)
                    if route is None:
                        self.table.remove(key)
                    else:
                        self.table.upsert(route)
                self._changed()
        except api_exception as exc:
            if exc.status != 410:
                raise
        finally:
            self._watch = None

    def _route(self, obj: Mapping[str, Any], core: Any) -> Route | None:
        try:
            return route_from_task(
                obj,
                api_key=self._api_key(obj, core),
                default_slm_timeout_s=self.default_slm_timeout_s,
                llm_timeout_s=self.llm_timeout_s,
            )
        except RouteError as exc:
            log.warning("AgentTask skipped: %s", exc)
            return None

    def _api_key(self, obj: Mapping[str, Any], core: Any) -> str:
        ref = secret_ref(obj)
        if ref is None:
            return ""
        ns, name, key = ref
        try:
            secret = core.read_namespaced_secret(name, ns)
        except Exception as exc:
            log.warning("Secret %s/%s for the LLM key is not readable: %s", ns, name, _summary(exc))
            return ""
        raw = (secret.data or {}).get(key)
        if raw is None:
            log.warning("Secret %s/%s has no key %r", ns, name, key)
            return ""
        # A key that is not base64 text of UTF-8 would otherwise fail the whole list, and so
        # every task of the namespace; the task is served without a key, as when unreadable.
        try:
            return base64.b64decode(raw).decode().strip()
        except ValueError as exc:  # binascii.Error and UnicodeDecodeError
            # The type only: a decode error's message quotes bytes of the secret.
            log.warning("Secret %s/%s key %r is unusable (%s)", ns, name, key, type(exc).__name__)
            return ""

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _summary(exc: BaseException) -> str:
    """An exception in one line, without response bodies (which may echo request data)."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"{type(exc).__name__} {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"
