"""Thin adapter that keeps the route table in step with AgentTasks through the Kubernetes API.

Why a watch and not a mounted ConfigMap: a ConfigMap volume reaches the pod a minute or more
after it changes, while the operator flips a task to the LLM exactly when its SLM is failing.
A watch delivers the status change in milliseconds, with no restart.

The official ``kubernetes`` client's watch runs in one daemon thread: list (which sets the
whole table and marks it ready), then watch from the list's resourceVersion; when the watch
ends (``resync_s``, or a 410 Gone) it lists again, reading only the Secrets no task named
before (the key refresh below keeps the others current). Failures (and watches that end at
once) back off and retry, up to 30 s apart; the last good table keeps serving meanwhile. A
second daemon thread reads the named Secrets again every ``secret_refresh_s``, since they
cannot be watched: a rotated key or a Secret created after its task is in use within
seconds. Only ``get`` on the named Secrets and ``list``/``watch`` on agenttasks are needed.

A Secret's key goes only to the LLM hosts its ``slmfleet.dev/llm-hosts`` annotation lists
(:func:`slm_gateway.routes.key_may_go_to`); none without it. Why: whoever may edit an
AgentTask chooses its LLM URL, but only the Secret's owner may choose where the key goes.

Every call to the API server has a client-side timeout (``request_timeout``; the watch at
most :data:`WATCH_IDLE_S` without a byte): a list or a Secret read whose answer never comes
(a stalled connection, an API server that hangs) would otherwise block its thread for good,
silently freezing every route (a deleted task still routed, a switch to the LLM never
arriving) while /readyz said ready. A timed-out list or watch fails like any other: logged,
backed off, listed again.
"""

from __future__ import annotations

import base64
import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from slm_gateway.httpclient import header_value_problem
from slm_gateway.routes import (
    DEFAULT_LLM_TIMEOUT_S,
    DEFAULT_SLM_TIMEOUT_S,
    LLM_HOSTS_ANNOTATION,
    LLMHost,
    Route,
    RouteError,
    RouteTable,
    parse_llm_hosts,
    route_from_task,
    secret_ref,
    unread_host_hint,
    unread_llm_hosts,
)

log = logging.getLogger(__name__)

#: (namespace, Secret name, key in it) of a task's LLM API key.
SecretRef = tuple[str, str, str]
#: What a Secret gives a task: its key ("" for none) and the hosts the key may be sent to
#: (its :data:`~slm_gateway.routes.LLM_HOSTS_ANNOTATION`). Compared as one value, so a
#: refresh that finds either changed rebuilds the tasks' routes.
LLMKey = tuple[str, frozenset[LLMHost]]
NO_KEY: LLMKey = ("", frozenset())

GROUP = "slmfleet.dev"
VERSION = "v1alpha1"
PLURAL = "agenttasks"
#: How often the Secrets the tasks name are read again. The gateway may only ``get`` them (no
#: watch), so a rotated key, or a Secret created after its task, is in use within this.
DEFAULT_SECRET_REFRESH_S = 10.0
#: A watch open at least this long (or half of ``resync_s``) was healthy; see ``_run``.
HEALTHY_WATCH_S = 10.0
MAX_BACKOFF_S = 30.0
#: (connect, read) seconds for each list and Secret read. The read timeout bounds each wait
#: for data, not the whole answer, and urllib3 retries a timed-out GET up to 3 times, so a
#: stalled call gives up after about 2 minutes at most; a healthy list or read takes well
#: under a second.
REQUEST_TIMEOUT_S = (5.0, 30.0)
#: The longest a watch may go without a byte before it is dropped and the tasks listed again.
#: The watch asks for bookmarks, which the API server sends on a quiet watch about once a
#: minute, so a live one is never this silent. Why a limit: a connection that went dead
#: without a reset (a control-plane node lost behind a VIP, a dropped NAT entry) was only
#: noticed at the end of the watch's whole time limit: a route change, a deleted task or a
#: switch to the LLM reached the gateway 5.5 minutes late while the API server answered.
WATCH_IDLE_S = 90.0


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
    """Feeds a :class:`RouteTable` from AgentTasks in one namespace (or all, with None).

    ``only_namespaces``: with ``namespace`` None, route only the tasks of these namespaces.
    Why: a gateway that serves several namespaces lists and watches AgentTasks cluster-wide
    (one watch, not one per namespace), but must not route a task of a namespace it does not
    serve (another team's, or another installation's), whose key Secret it cannot read.
    """

    def __init__(
        self,
        table: RouteTable,
        namespace: str | None,
        *,
        kubeconfig: str | None = None,
        default_slm_timeout_s: float = DEFAULT_SLM_TIMEOUT_S,
        llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S,
        resync_s: int = 300,
        secret_refresh_s: float = DEFAULT_SECRET_REFRESH_S,
        version: str = VERSION,
        on_change: Callable[[], None] | None = None,
        only_namespaces: frozenset[str] | None = None,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT_S,
        watch_idle_s: float = WATCH_IDLE_S,
    ) -> None:
        self.table = table
        self.namespace = namespace
        self.only_namespaces = only_namespaces if not namespace else None
        self.kubeconfig = kubeconfig
        self.default_slm_timeout_s = default_slm_timeout_s
        self.llm_timeout_s = llm_timeout_s
        self.resync_s = resync_s
        self.secret_refresh_s = secret_refresh_s
        self.version = version
        self.on_change = on_change
        self.request_timeout = request_timeout
        self.watch_idle_s = watch_idle_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresher: threading.Thread | None = None
        self._watch: Any = None
        self._core: Any = None
        # Each task's latest object and the API key its route was built with: what a key
        # refresh rebuilds from. Written with the table under _lock, so a refresh can neither
        # bring back a task an event just deleted nor put back an older status.
        self._tasks: dict[str, tuple[Mapping[str, Any], LLMKey]] = {}
        # Each task's install number (from _seq), bumped whenever its route is set or removed:
        # a key refresh, which reads the Secrets without the lock, installs what it read only
        # for the tasks whose number is still the one it noted before the reads. Else a slow
        # refresh could put back the old key right after an event installed a rotated one.
        self._versions: dict[str, int] = {}
        self._seq = 0
        self._lock = threading.Lock()
        # The last key read from each Secret, kept through a read that fails for a moment.
        self._keys: dict[SecretRef, LLMKey] = {}
        # What is wrong with each Secret's key: (reason code, message), see :meth:`problems`.
        self._key_problems: dict[SecretRef, tuple[str, str]] = {}
        # Each Secret's llm-hosts annotation value whose unreadable entries were last logged:
        # a warning when the value changes, not at every refresh.
        self._hosts_logged: dict[SecretRef, str] = {}
        # The tasks whose route was refused (an unusable LLM URL or status), by task key.
        self._refused: set[str] = set()
        # The tasks whose key may not go to their LLM's host (the Secret does not allow it),
        # by task key: why (Route.llm_blocked), logged when it starts or changes.
        self._blocked: dict[str, str] = {}
        # The tasks an event installed with the key last read, not one it read itself: a
        # refresh that read the Secret meanwhile still updates them (see refresh_keys).
        self._cached: set[str] = set()
        self.events = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slm-route-watch", daemon=True)
        self._thread.start()
        if self.secret_refresh_s > 0:
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="slm-key-refresh", daemon=True
            )
            self._refresher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _clients(self) -> tuple[Any, Any]:
        from kubernetes import client

        api = api_client(self.kubeconfig)
        return client.CustomObjectsApi(api), client.CoreV1Api(api)

    def _run(self) -> None:
        backoff = 1.0
        custom: Any = None
        core: Any = None
        # A watch open this long was healthy: when it ends (its timeout, a 410 after a while,
        # an API server restart) the next list comes at once and the back-off starts over. A
        # watch that ends or fails sooner counts as a failure, even after a good list: else a
        # watch that can never stay open would list every task and read every Secret in a
        # loop, with no wait or a 1 s one.
        healthy_s = min(HEALTHY_WATCH_S, self.resync_s / 2)
        while not self._stop.is_set():
            watched_s = 0.0
            failure: Exception | None = None
            try:
                if custom is None:
                    # Inside the retry: a kubeconfig or in-cluster credentials that fail to
                    # load must not end this thread for good (readyz would stay 503 for ever).
                    custom, core = self._clients()
                    self._core = core
                rv = self._relist(custom, core)
                started = time.monotonic()
                try:
                    self._follow(custom, core, rv)
                finally:
                    watched_s = time.monotonic() - started
            except Exception as exc:  # the loop must survive any API or network failure
                failure = exc
            if self._stop.is_set():
                return
            if watched_s >= healthy_s:
                backoff = 1.0
                if failure is None:
                    continue
            if failure is not None:
                log.warning(
                    "AgentTask watch failed (%s)%s; retrying in %.0fs",
                    _summary(failure),
                    _hint(failure, self.namespace, self.version),
                    backoff,
                )
            else:
                log.warning(
                    "AgentTask watch ended after %.1fs; listing again in %.0fs", watched_s, backoff
                )
            self._stop.wait(backoff)
            backoff = min(MAX_BACKOFF_S, backoff * 2)

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
        listing = fn(*args, _request_timeout=self.request_timeout)
        items = [
            obj
            for obj in listing.get("items", [])
            if isinstance(obj, Mapping) and self._serves(obj)
        ]
        keys, cached = self._list_keys(core, items)
        tasks: dict[str, tuple[Mapping[str, Any], LLMKey]] = {}
        routes = []
        with self._lock:
            for obj in items:
                ref = secret_ref(obj)
                api_key = keys[ref] if ref is not None else NO_KEY
                tasks[_task_key(obj)] = (obj, api_key)
                route = self._build(obj, api_key)
                if route is not None:
                    routes.append(route)
            self._tasks = tasks
            # As after an event: a refresh that read these Secrets meanwhile still updates them.
            self._cached = {key for key, (obj, _) in tasks.items() if secret_ref(obj) in cached}
            self._refused &= set(tasks)
            self._blocked = {k: v for k, v in self._blocked.items() if k in tasks}
            self._versions = {key: self._next_seq() for key in tasks}
            self.table.replace_all(routes)
        # Forget the Secrets no task names any more: a stale key or problem must not come back
        # with a task that names one again (it would be taken as known, not read).
        for ref in (set(self._keys) | set(self._key_problems)) - set(keys):
            self._keys.pop(ref, None)
            self._key_problems.pop(ref, None)
        for ref in set(self._hosts_logged) - set(keys):
            del self._hosts_logged[ref]
        self._changed()
        log.info("routes listed: %d task(s)", len(routes))
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    def _list_keys(
        self, core: Any, items: list[Mapping[str, Any]]
    ) -> tuple[dict[SecretRef, LLMKey], set[SecretRef]]:
        """The key of each Secret the listed tasks name, and the Secrets whose key was the one
        last read rather than read now.

        Each Secret is read once per list, however many tasks name it, and only when no key
        of it is known (see :meth:`_known_key`). Why: the watch is closed while a list runs,
        so reading every Secret in turn held up every route change for as many slow reads as
        there are Secrets (a degraded KMS: 8 Secrets at 1 s each kept a task's switch to the
        LLM waiting 8 s), at every resync and every 410.
        """
        keys: dict[SecretRef, LLMKey] = {}
        cached: set[SecretRef] = set()
        for obj in items:
            ref = secret_ref(obj)
            if ref is None or ref in keys:
                continue
            known = self._known_key(ref)
            if known is None:
                keys[ref] = self._read_key(core, ref)
            else:
                keys[ref] = known
                cached.add(ref)
        return keys, cached

    def _known_key(self, ref: SecretRef) -> LLMKey | None:
        """The key last read from ``ref`` (:data:`NO_KEY` when it was missing or unusable), or
        None when the watch thread must read the Secret itself: one not read before, or any
        where no refresh loop runs to keep the keys current."""
        if self.secret_refresh_s <= 0 or (ref not in self._keys and ref not in self._key_problems):
            return None
        return self._keys.get(ref, NO_KEY)

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
                # (connect, read): the read limit bounds each wait for a byte, not the
                # watch, which the API server ends after timeout_seconds.
                _request_timeout=(self.request_timeout[0], self.watch_idle_s),
            ):
                if self._stop.is_set():
                    return
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    log.info("AgentTask watch expired (%s); listing again", obj.get("code"))
                    return
                if kind == "BOOKMARK" or not self._serves(obj):
                    continue
                self.events += 1
                self._apply_event(str(kind), obj, core)
                self._changed()
        except api_exception as exc:
            if exc.status != 410:
                raise
        finally:
            self._watch = None

    def _serves(self, obj: Mapping[str, Any]) -> bool:
        if self.only_namespaces is None:
            return True
        return (obj.get("metadata") or {}).get("namespace") in self.only_namespaces

    def _apply_event(self, kind: str, obj: Mapping[str, Any], core: Any) -> None:
        """One watch event: the task's route is replaced, or removed when it is deleted or
        cannot be served; no other task is touched."""
        key = _task_key(obj)
        if kind == "DELETED":
            with self._lock:
                self._tasks.pop(key, None)
                self._cached.discard(key)
                self._versions.pop(key, None)
                self._refused.discard(key)
                self._blocked.pop(key, None)
                self.table.remove(key)
            return
        ref = secret_ref(obj)
        api_key, cached = NO_KEY, False
        if ref is not None:
            # A Secret already read (or found missing or unreadable) is left to the refresh
            # loop: read here on every event of its task, one slow read (a degraded KMS) held
            # up every route change queued behind it on this one watch thread, another task's
            # fallback to the LLM included. A Secret first named here is read at once.
            known = self._known_key(ref)
            cached = known is not None
            api_key = known if known is not None else self._read_key(core, ref)
        with self._lock:
            self._install(key, obj, api_key)
            if cached:
                self._cached.add(key)

    def _install(self, key: str, obj: Mapping[str, Any], api_key: LLMKey) -> None:
        """Remember the task and route it with ``api_key``, or drop its route when it cannot
        be served; the caller holds ``_lock``."""
        self._tasks[key] = (obj, api_key)
        self._versions[key] = self._next_seq()
        self._cached.discard(key)
        route = self._build(obj, api_key)
        if route is None:
            self.table.remove(key)
        else:
            self.table.upsert(route)

    def _next_seq(self) -> int:
        """A fresh install number; the caller holds ``_lock``."""
        self._seq += 1
        return self._seq

    def _build(self, obj: Mapping[str, Any], api_key: LLMKey) -> Route | None:
        """The task's route, or None (logged, and in :meth:`problems`) when it cannot be
        served; the caller holds ``_lock``. A route whose key its Secret does not let go to
        the task's LLM is built without it (logged, and in :meth:`problems`, too)."""
        key = _task_key(obj)
        try:
            route = route_from_task(
                obj,
                api_key=api_key[0],
                key_hosts=api_key[1],
                default_slm_timeout_s=self.default_slm_timeout_s,
                llm_timeout_s=self.llm_timeout_s,
            )
        except RouteError as exc:
            if key not in self._refused:  # once per refusal, not at every refresh or resync
                # Named with its namespace: with several namespaces, "task weather" alone
                # could be anyone's. The message's own "task <name>: " would repeat it.
                name = str((obj.get("metadata") or {}).get("name") or "")
                why = str(exc).removeprefix(f"task {name}: ")
                log.warning("AgentTask %s skipped: %s", key, why)
            self._refused.add(key)
            self._blocked.pop(key, None)
            return None
        self._refused.discard(key)
        self._note_blocked(key, route.llm_blocked)
        return route

    def _note_blocked(self, key: str, why: str) -> None:
        """Note whether the task's key is withheld from its LLM, and log it when that starts,
        changes or ends: routes are rebuilt at every event, resync and rotated key, and a
        warning each time would bury everything else. The caller holds ``_lock``."""
        if self._blocked.get(key, "") == why:
            return
        if why:
            self._blocked[key] = why
            log.warning("AgentTask %s: LLM calls refused (502): %s", key, why)
        else:
            self._blocked.pop(key)
            log.info("AgentTask %s: its LLM key may go to its LLM again", key)

    def problems(self) -> dict[tuple[str, str], str]:
        """(namespace, task) -> why the gateway cannot serve the task as its spec says.

        ``route_refused``: no route at all (an LLM URL or status the gateway cannot use; every
        call for the task fails); ``llm_host_not_allowed``: the task's LLM URL is on a host
        its key's Secret does not list in its ``slmfleet.dev/llm-hosts`` annotation, so the
        key is not sent and every LLM call is answered 502; ``llm_key_missing`` (the Secret or
        its key is not there, or the key is empty), ``llm_key_unreadable`` (RBAC, an API
        error: the last key read stays in use) or ``llm_key_unusable`` (not base64 of UTF-8
        text, or a key no HTTP header can carry: a line break or NUL inside, a character
        outside Latin-1): calls go to the LLM
        without the task's key, and it answers 401. Why: the gateway may not write a task's
        status, and a log line is easy to miss; these become ``slm_gateway_route_problem`` and
        an alert.
        """
        with self._lock:
            out: dict[tuple[str, str], str] = {}
            for key, (obj, _) in self._tasks.items():
                meta = obj.get("metadata") or {}
                where = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
                ref = secret_ref(obj)
                if key in self._refused:
                    out[where] = "route_refused"
                elif key in self._blocked:
                    out[where] = "llm_host_not_allowed"
                elif ref is not None and (known := self._key_problems.get(ref)) is not None:
                    out[where] = known[0]
            return out

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.secret_refresh_s):
            core = self._core
            if core is None:
                continue
            try:
                self.refresh_keys(core)
            except Exception as exc:  # the next round tries again
                log.warning("LLM keys not refreshed (%s)", _summary(exc))

    def refresh_keys(self, core: Any) -> None:
        """Read every Secret the tasks name, once, and rebuild the routes whose key changed.

        Why polling: the gateway may only ``get`` the named Secrets (no list, no watch), and a
        task's key otherwise changed only with a list (``resync_s``, 5 minutes by default) or
        an event of that task: a rotated key, or a Secret created after its task, meant every
        LLM call answered 401 until then.

        The Secrets are read without the lock (a slow read must not hold up the watch), so a
        task installed meanwhile (an event or a list, which read its key later than this
        refresh did) is left as it is: its key is at least as new as the one read here;
        unless the event installed the key last read without reading it (``_cached``), which
        this refresh's read may be newer than.
        """
        with self._lock:
            noted = dict(self._versions)
            refs = {r for obj, _ in self._tasks.values() if (r := secret_ref(obj)) is not None}
        keys = {ref: self._read_key(core, ref) for ref in refs}
        changed = 0
        with self._lock:
            for key, (obj, used) in list(self._tasks.items()):
                if self._versions.get(key) != noted.get(key) and key not in self._cached:
                    continue
                ref = secret_ref(obj)
                if ref is None or ref not in keys or keys[ref] == used:
                    continue
                self._install(key, obj, keys[ref])
                changed += 1
        if changed:
            log.info("LLM key changed for %d task(s)", changed)
            self._changed()

    def _read_key(self, core: Any, ref: SecretRef) -> LLMKey:
        """The API key in the Secret ``ref`` and the hosts it may go to, or :data:`NO_KEY`
        (the task is then served without one). A Secret that is gone or holds no usable key
        gives none; a read that fails otherwise (429, 5xx, a timeout, RBAC) keeps the last key
        read: a resync or a refresh that misses once must not turn a working key into minutes
        of 401s. The hosts are the Secret's own annotation, which only those who may edit the
        Secret can set: none (no annotation) lets the key go nowhere."""
        ns, name, field = ref
        try:
            secret = core.read_namespaced_secret(name, ns, _request_timeout=self.request_timeout)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                self._keys.pop(ref, None)
                # Not "the task is served without a key": a task naming it may be skipped
                # for another reason (logged next), and several tasks may name it.
                self._problem(
                    ref,
                    "llm_key_missing",
                    "does not exist: no LLM key to send for the tasks that name it",
                )
                return NO_KEY
            last = self._keys.get(ref, NO_KEY)
            kept = "; the last key read stays in use" if last[0] else ""
            why = f"is not readable: {_summary(exc)}{_secret_hint(exc)}{kept}"
            self._problem(ref, "llm_key_unreadable", why)
            return last
        raw = (secret.data or {}).get(field)
        if raw is None:
            self._keys.pop(ref, None)
            self._problem(ref, "llm_key_missing", f"has no key {field!r}")
            return NO_KEY
        # A key that is not base64 text of UTF-8 would otherwise fail the whole list, and so
        # every task of the namespace; the task is served without a key, as when unreadable.
        try:
            value = base64.b64decode(raw).decode().strip()
        except ValueError as exc:  # binascii.Error and UnicodeDecodeError
            # The type only: a decode error's message quotes bytes of the secret.
            self._keys.pop(ref, None)
            self._problem(
                ref, "llm_key_unusable", f"key {field!r} is unusable ({type(exc).__name__})"
            )
            return NO_KEY
        if not value:
            # An empty key (``--from-literal=api-key=`` with an unset shell variable) went out
            # as no Authorization at all, with no problem reported: it is a missing key.
            self._keys.pop(ref, None)
            self._problem(ref, "llm_key_missing", f"has an empty key {field!r}")
            return NO_KEY
        unsendable = header_value_problem(value)
        if unsendable:
            # Such a key would be refused by the route (it cannot go in a header: a line break
            # would inject one), and with it the task: every call a 404 model_not_found and
            # the problem read route_refused. A key problem, the task served without it.
            self._keys.pop(ref, None)
            self._problem(ref, "llm_key_unusable", f"key {field!r} is unusable ({unsendable})")
            return NO_KEY
        annotations = getattr(getattr(secret, "metadata", None), "annotations", None) or {}
        hosts = annotations.get(LLM_HOSTS_ANNOTATION)
        self._log_unread_hosts(ref, hosts)
        read = (value, parse_llm_hosts(hosts))
        self._keys[ref] = read
        self._problem(ref, "", None)
        return read

    def _log_unread_hosts(self, ref: SecretRef, value: object) -> None:
        """Warn, once per annotation value, about llm-hosts entries that allow nothing
        (``https://api.openai.com``): the owner meant to allow a host, and the 502 each call
        then gets names the host to add without saying that the entry written is unreadable.
        Each is shown without the credentials a pasted URL may hold, with the host it meant
        (:func:`unread_host_hint`)."""
        text = value if isinstance(value, str) else ""
        if self._hosts_logged.get(ref) == text:
            return
        self._hosts_logged[ref] = text
        unread = [unread_host_hint(entry) for entry in unread_llm_hosts(text)]
        if unread:
            ns, name, _ = ref
            entries = ", ".join(
                repr(shown) + (f" (write {meant})" if meant else "") for shown, meant in unread
            )
            # an entry with no host to name still gets how one is written
            how = ""
            if not all(meant for _, meant in unread):
                how = " (write api.openai.com, not https://api.openai.com/v1)"
            log.warning(
                "Secret %s/%s: %s entries %s are not host or host:port and allow nothing%s",
                ns,
                name,
                LLM_HOSTS_ANNOTATION,
                entries,
                how,
            )

    def _problem(self, ref: SecretRef, reason: str, problem: str | None) -> None:
        """Note a Secret's problem (``reason``: a code for :meth:`problems`) and log it when it
        starts or changes, and when it ends: the Secrets are read every few seconds, and a
        warning each time would bury everything else."""
        known = self._key_problems.get(ref)
        if (known[1] if known else None) == problem:
            return
        ns, name, _ = ref
        if problem is None:
            self._key_problems.pop(ref, None)
            log.info("Secret %s/%s for the LLM key is readable again", ns, name)
        else:
            self._key_problems[ref] = (reason, problem)
            log.warning("Secret %s/%s for the LLM key %s", ns, name, problem)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _task_key(obj: Mapping[str, Any]) -> str:
    """The task's route key, as :attr:`Route.key` spells it."""
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace") or "", meta.get("name") or ""
    return f"{ns}/{name}" if ns else str(name)


def _hint(exc: BaseException, namespace: str | None, version: str) -> str:
    """What a list or watch failure most likely means, for the two that need a person."""
    status = getattr(exc, "status", None)
    if status == 403:
        where = f"in namespace {namespace}" if namespace else "in all namespaces"
        return (
            f" (RBAC: the gateway's ServiceAccount needs list and watch on "
            f"{PLURAL}.{GROUP} {where})"
        )
    if status == 404:
        return f" (is the AgentTask CRD, {GROUP}/{version}, installed?)"
    return ""


def _secret_hint(exc: BaseException) -> str:
    if getattr(exc, "status", None) == 403:
        return " (is it named in the chart's gateway.llmApiKeySecrets?)"
    return ""


def _summary(exc: BaseException) -> str:
    """An exception in one line, without response bodies (which may echo request data)."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        # urllib3's MaxRetryError: its cause (a read timeout, a refused connection) is what
        # says what went wrong, and the wrapper's own text would push it past the cut.
        return _summary(reason)
    if status is not None:
        return f"{type(exc).__name__} {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"
