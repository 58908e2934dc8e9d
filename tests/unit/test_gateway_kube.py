"""The AgentTask watch loop and the LLM keys, against a fake Kubernetes API.

The real client's ``Watch`` runs over fake list/watch calls, so these tests cover what the
gateway does with what the API server can answer: a watch that expires (410 Gone), one that
ends at once or is refused, a list that is forbidden (RBAC) or 404 (no CRD), a kubeconfig that
cannot be loaded, and Secrets that appear, rotate, vanish or fail to read for a moment.
The back-off is measured by recording the loop's waits instead of sleeping. A list or Secret
read that never gets an answer is played by a real HTTP server on 127.0.0.1 that stops
answering, under the real client.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from slm_gateway import kube
from slm_gateway.kube import AgentTaskWatcher
from slm_gateway.routes import RouteTable

KEY = "sk-rotating-0123456789abcdef"
NEW_KEY = "sk-rotated-fedcba9876543210"
#: The annotation by which a Secret's owner says where its key may go, and the value the
#: Secrets of these tests have unless a test says otherwise: the host of task()'s LLM.
HOSTS_ANNOTATION = "slmfleet.dev/llm-hosts"
LLM_HOST = "llm.example:8000"


def task(name: str, *, secret: str | None = "llm-key", **route: Any) -> dict[str, Any]:
    llm: dict[str, Any] = {"baseURL": "http://llm.example:8000/v1", "model": "gpt-4o"}
    if secret:
        llm["apiKeySecretRef"] = {"name": secret}
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {"fallback": {"llm": llm}},
    }
    if route:
        obj["status"] = {"route": route}
    return obj


class _Meta:
    def __init__(self, annotations: dict[str, str] | None) -> None:
        self.annotations = annotations


class _Secret:
    def __init__(self, data: dict[str, str] | None, annotations: dict[str, str] | None) -> None:
        self.data = data
        self.metadata = _Meta(annotations)


class FakeCore:
    """CoreV1Api's ``read_namespaced_secret`` over a dict; ``fail`` makes the next reads raise.
    ``hosts``: a Secret's llm-hosts annotation by Secret name (None: not annotated); a Secret
    not named there allows :data:`LLM_HOST`."""

    def __init__(
        self, keys: dict[str, str] | None = None, hosts: dict[str, str | None] | None = None
    ) -> None:
        self.keys = dict(keys or {})
        self.hosts = dict(hosts or {})
        self.fail: ApiException | None = None
        self.reads = 0

    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> _Secret:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        if name not in self.keys:
            raise ApiException(status=404, reason="Not Found")
        hosts = self.hosts.get(name, LLM_HOST)
        return _Secret(
            {"api-key": base64.b64encode(self.keys[name].encode()).decode()},
            None if hosts is None else {HOSTS_ANNOTATION: hosts},
        )


class _Stream:
    """An HTTP response of a watch: the given events as JSON lines, then the end."""

    status = 200

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.lines = [json.dumps(e).encode() + b"\n" for e in events]

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        yield from self.lines

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class FakeCustom:
    """CustomObjectsApi's list (and watch) of AgentTasks, scripted call by call.

    ``lists`` are the successive lists' items (the last one repeats); ``watches`` the
    successive watches, each a list of events, or an exception to raise; the last repeats.
    After ``stop_after`` lists, ``stop`` is called, so a test can run the loop synchronously.
    """

    def __init__(
        self,
        lists: list[list[dict[str, Any]] | Exception],
        watches: list[list[dict[str, Any]] | Exception],
        *,
        stop_after: int,
        stop: Any,
    ) -> None:
        self.lists = lists
        self.watches = watches
        self.stop_after = stop_after
        self.stop = stop
        self.list_calls = 0
        self.watch_calls = 0
        self.watch_kwargs: list[dict[str, Any]] = []

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("watch"):
            self.watch_kwargs.append(kwargs)
            step = self.watches[min(self.watch_calls, len(self.watches) - 1)]
            self.watch_calls += 1
            if isinstance(step, Exception):
                raise step
            return _Stream(step)
        step = self.lists[min(self.list_calls, len(self.lists) - 1)]
        self.list_calls += 1
        if self.list_calls >= self.stop_after:
            self.stop()
        if isinstance(step, Exception):
            raise step
        return {"items": copy.deepcopy(step), "metadata": {"resourceVersion": str(self.list_calls)}}

    list_cluster_custom_object = list_namespaced_custom_object  # same script, all namespaces


class RecordingEvent(threading.Event):
    """A stop event whose waits return at once and are recorded (the loop's back-off)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.waits.append(timeout)
        return self.is_set()


def run_loop(
    monkeypatch: pytest.MonkeyPatch,
    lists: list[list[dict[str, Any]] | Exception],
    watches: list[list[dict[str, Any]] | Exception],
    *,
    stop_after: int,
    core: FakeCore | None = None,
    api_client: Any = None,
) -> tuple[AgentTaskWatcher, FakeCustom, RecordingEvent]:
    """Run the watch thread's loop in this thread over the fakes until ``stop_after`` lists."""
    import kubernetes.client

    table = RouteTable()
    watcher = AgentTaskWatcher(table, "agents")
    stop = RecordingEvent()
    watcher._stop = stop
    custom = FakeCustom(lists, watches, stop_after=stop_after, stop=stop.set)
    core = core or FakeCore({"llm-key": KEY})
    monkeypatch.setattr(kube, "api_client", api_client or (lambda kubeconfig=None: object()))
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda api: custom)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda api: core)
    watcher._run()
    return watcher, custom, stop


def ev(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


GONE = ev("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"})


# ---- the watch loop -----------------------------------------------------------------------


def test_events_update_one_task_each_and_a_bad_status_skips_only_its_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ADDED/MODIFIED/DELETED each touch one route; a status the gateway cannot serve (here a
    zero SLM budget) removes that task, as a list skips it, and leaves the others routed."""
    events = [
        ev("ADDED", task("new")),
        ev("MODIFIED", task("weather", mode="slm", slmEndpoint="http://triton:8000")),
        ev(
            "MODIFIED", task("broken", mode="slm", slmEndpoint="http://triton:8000", slmTimeoutMs=0)
        ),
        ev("DELETED", task("gone")),
    ]
    lists: list[list[dict[str, Any]] | Exception] = [
        [task("weather"), task("broken"), task("gone")],
        ApiException(status=503, reason="Service Unavailable"),
    ]
    watcher, custom, _ = run_loop(monkeypatch, lists, [events], stop_after=2)
    assert custom.watch_kwargs[0]["resource_version"] == "1"
    assert custom.watch_kwargs[0]["allow_watch_bookmarks"] is True
    # The second list failed, so the table is the one the events left.
    routes = {r.task: r for r in watcher.table.routes()}
    assert sorted(routes) == ["new", "weather"]
    assert routes["weather"].mode == "slm"
    assert watcher.table.ready


def test_410_gone_lists_again_and_drops_tasks_deleted_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    watcher, custom, _ = run_loop(
        monkeypatch,
        [[task("weather"), task("deleted-while-away")], [task("weather")]],
        [[GONE], []],
        stop_after=2,
    )
    assert custom.list_calls == 2
    assert [r.task for r in watcher.table.routes()] == ["weather"]
    assert custom.watch_kwargs[1]["resource_version"] == "2"  # from the fresh list


def test_a_watch_that_ends_at_once_backs_off_instead_of_relisting_in_a_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A watch that closes right after it opens (a proxy that does not stream, an API server
    going away) used to be listed again with no wait at all: a busy loop of full lists and
    Secret reads. Each short watch now costs a growing back-off."""
    _, custom, stop = run_loop(monkeypatch, [[task("weather")]], [[]], stop_after=5)
    assert custom.list_calls == 5
    assert stop.waits == [1.0, 2.0, 4.0, 8.0]


def test_a_watch_refused_after_a_good_list_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The back-off used to restart at 1 s after every good list, so a watch that always
    fails (403 on watch only, a 500) relisted every task and read every Secret each second."""
    _, custom, stop = run_loop(
        monkeypatch,
        [[task("weather")]],
        [ApiException(status=403, reason="Forbidden")],
        stop_after=5,
    )
    assert custom.list_calls == 5
    assert stop.waits == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    ("status", "hint"),
    [(403, "RBAC"), (404, "CRD")],
)
def test_list_forbidden_or_no_crd_is_retried_with_backoff_and_not_ready(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, status: int, hint: str
) -> None:
    caplog.set_level(logging.WARNING, logger="slm_gateway.kube")
    watcher, custom, stop = run_loop(
        monkeypatch, [ApiException(status=status, reason="x")], [[]], stop_after=7
    )
    assert custom.list_calls == 7 and custom.watch_calls == 0
    assert stop.waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert not watcher.table.ready
    assert hint in caplog.text


def test_a_client_that_cannot_be_configured_is_retried_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kubeconfig or in-cluster credentials that fail to load used to end the watch thread
    for good (readyz 503 for ever, with only a thread traceback); it is now retried."""
    from kubernetes.config import ConfigException

    attempts: list[int] = []

    def flaky(kubeconfig: str | None = None) -> object:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConfigException("Service host/port is not set.")
        return object()

    watcher, custom, stop = run_loop(
        monkeypatch, [[task("weather")]], [[]], stop_after=1, api_client=flaky
    )
    assert len(attempts) == 3 and custom.list_calls == 1
    assert stop.waits[:2] == [1.0, 2.0]
    assert watcher.table.ready and watcher.table.get("weather") is not None


# ---- LLM keys from Secrets ----------------------------------------------------------------


def listed(core: FakeCore, *tasks: dict[str, Any]) -> AgentTaskWatcher:
    """A watcher whose table was set by one list of ``tasks``."""
    custom = FakeCustom([list(tasks)], [[]], stop_after=10**6, stop=lambda: None)
    watcher = AgentTaskWatcher(RouteTable(), "agents")
    watcher._relist(custom, core)
    return watcher


def auth(watcher: AgentTaskWatcher, name: str) -> str | None:
    route = watcher.table.get(name)
    assert route is not None
    return route.llm_headers.get("Authorization")


def test_a_secret_created_after_its_task_is_picked_up_without_waiting_for_a_resync() -> None:
    """The task arrived before its Secret (``kubectl apply -f dir/`` applies agenttask.yaml
    first): it was served without a key, every LLM call a 401, until the next resync
    (5 minutes by default). The named Secrets are now read again every few seconds."""
    core = FakeCore({})
    watcher = listed(core, task("weather"), task("plain", secret=None))
    assert auth(watcher, "weather") is None
    core.keys["llm-key"] = KEY
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    assert auth(watcher, "plain") is None


def test_a_rotated_key_is_picked_up_and_a_deleted_secret_drops_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="slm_gateway")
    core = FakeCore({"llm-key": KEY, "other": "sk-other"})
    watcher = listed(core, task("a"), task("b"), task("c", secret="other"))
    version = watcher.table.version
    watcher.refresh_keys(core)
    assert watcher.table.version == version  # nothing changed, nothing swapped
    core.keys["llm-key"] = NEW_KEY
    reads = core.reads
    watcher.refresh_keys(core)
    assert core.reads - reads == 2  # once per Secret, not once per task
    assert auth(watcher, "a") == auth(watcher, "b") == f"Bearer {NEW_KEY}"
    assert auth(watcher, "c") == "Bearer sk-other"
    del core.keys["llm-key"]
    watcher.refresh_keys(core)
    assert auth(watcher, "a") is None and auth(watcher, "b") is None
    assert KEY not in caplog.text and NEW_KEY not in caplog.text


def test_a_failed_secret_read_keeps_the_last_key_read() -> None:
    """A Secret read that fails for a moment (429 from API priority and fairness, a 500, a
    timeout) during a resync used to drop a working key until the next resync: five minutes
    of 401s from the LLM. Only a Secret that is gone (404) drops it now."""
    core = FakeCore({"llm-key": KEY})
    watcher = listed(core, task("weather"))
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    core.fail = ApiException(status=429, reason="Too Many Requests")
    custom = FakeCustom([[task("weather")]], [[]], stop_after=10**6, stop=lambda: None)
    watcher._relist(custom, core)
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    core.fail = None
    core.keys["llm-key"] = NEW_KEY
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {NEW_KEY}"


def test_a_refresh_never_brings_back_a_deleted_task() -> None:
    core = FakeCore({"llm-key": KEY})
    watcher = listed(core, task("weather"), task("other"))
    watcher._apply_event("DELETED", task("weather"), core)
    core.keys["llm-key"] = NEW_KEY
    watcher.refresh_keys(core)
    assert [r.task for r in watcher.table.routes()] == ["other"]
    assert auth(watcher, "other") == f"Bearer {NEW_KEY}"


# ---- where a Secret lets its key go --------------------------------------------------------


def test_a_key_goes_only_to_the_hosts_its_secret_allows(caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who may create or patch AgentTasks, but not read Secrets, pointed a task's LLM
    (its spec, or the status the operator copies) at a server of theirs, naming the platform's
    key Secret: the gateway sent them the key. A Secret's key now goes only to the hosts its
    owner lists in its slmfleet.dev/llm-hosts annotation, and nowhere without one. The task is
    reported (llm_host_not_allowed) and logged once, not at every refresh, until it is fixed;
    the key itself is never logged."""
    caplog.set_level(logging.DEBUG, logger="slm_gateway")
    core = FakeCore({"llm-key": KEY}, hosts={"llm-key": None})
    hijacked = task("hijacked")
    hijacked["spec"]["fallback"]["llm"]["baseURL"] = "http://127.0.0.1:19101/v1"
    watcher = listed(core, task("weather"), hijacked, task("plain", secret=None))
    assert auth(watcher, "weather") is None and auth(watcher, "hijacked") is None
    assert watcher.problems() == {
        ("agents", "weather"): "llm_host_not_allowed",
        ("agents", "hijacked"): "llm_host_not_allowed",
    }
    watcher.refresh_keys(core)
    core.hosts["llm-key"] = f"api.openai.com, {LLM_HOST.upper()}"  # the owner allows its LLM
    watcher.refresh_keys(core)
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    assert auth(watcher, "hijacked") is None
    assert watcher.problems() == {("agents", "hijacked"): "llm_host_not_allowed"}
    # The status' llmBaseURL is checked as the spec's is.
    watcher._apply_event(
        "MODIFIED",
        task("weather", mode="llm", llmBaseURL="http://evil.example/v1", llmModel="gpt-4o"),
        core,
    )
    assert auth(watcher, "weather") is None
    assert watcher.problems()[("agents", "weather")] == "llm_host_not_allowed"
    watcher._apply_event("MODIFIED", task("weather"), core)
    watcher._apply_event("DELETED", hijacked, core)
    assert auth(watcher, "weather") == f"Bearer {KEY}" and watcher.problems() == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    hijacked_warnings = [w for w in warnings if "agents/hijacked" in w]
    assert len(hijacked_warnings) == 1, warnings
    assert "127.0.0.1:19101" in hijacked_warnings[0] and "agents/llm-key" in hijacked_warnings[0]
    assert HOSTS_ANNOTATION in hijacked_warnings[0]
    assert len([w for w in warnings if "agents/weather" in w]) == 2  # unannotated, evil.example
    assert KEY not in caplog.text


def test_host_entries_that_allow_nothing_are_logged_once_per_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The owner wrote the LLM's URL, not its host: the entry allows nothing and every call is
    a 502 naming the host to add, which the owner believes is there. The gateway says which
    entry it could not read, once per annotation value (the Secrets are read every few
    seconds), and the refusal says how an entry is written."""
    caplog.set_level(logging.WARNING, logger="slm_gateway")
    core = FakeCore({"llm-key": KEY}, hosts={"llm-key": f"http://{LLM_HOST}/v1"})
    watcher = listed(core, task("weather"))
    watcher.refresh_keys(core)
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") is None
    unread = [r.getMessage() for r in caplog.records if "allow nothing" in r.getMessage()]
    assert len(unread) == 1, unread
    assert f"'http://{LLM_HOST}/v1'" in unread[0] and "agents/llm-key" in unread[0]
    blocked = [r.getMessage() for r in caplog.records if "LLM calls refused" in r.getMessage()]
    assert "without a scheme or path" in blocked[0]
    core.hosts["llm-key"] = LLM_HOST  # fixed: nothing more to say, and the key goes again
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    assert len([r for r in caplog.records if "allow nothing" in r.getMessage()]) == 1


# ---- several namespaces -------------------------------------------------------------------


def test_a_gateway_for_several_namespaces_routes_only_their_tasks() -> None:
    """With ``--namespace team-a,team-b`` the gateway lists and watches cluster-wide (one
    watch) but must not route another namespace's task: not another team's, and not one of
    another installation, whose key Secret it cannot read anyway."""

    def in_ns(name: str, namespace: str) -> dict[str, Any]:
        obj = task(name)
        obj["metadata"]["namespace"] = namespace
        return obj

    core = FakeCore({"llm-key": KEY})
    watcher = AgentTaskWatcher(RouteTable(), None, only_namespaces=frozenset({"team-a", "team-b"}))
    custom = FakeCustom(
        [[in_ns("x", "team-a"), in_ns("y", "team-b"), in_ns("z", "elsewhere")]],
        [[]],
        stop_after=10**6,
        stop=lambda: None,
    )
    watcher._relist(custom, core)
    assert sorted(r.key for r in watcher.table.routes()) == ["team-a/x", "team-b/y"]
    assert core.reads == 2  # team-a's and team-b's Secrets; never the other namespace's
    assert not watcher._serves(in_ns("w", "elsewhere"))
    assert watcher._serves(in_ns("w", "team-b"))


def test_namespace_flag_takes_one_or_several() -> None:
    from slm_gateway.config import config_from_args

    one = config_from_args(["--namespace", "team-a"])
    assert (one.namespace, one.namespaces) == ("team-a", ())
    several = config_from_args(["--namespace", "team-a, team-b,team-a"])
    assert (several.namespace, several.namespaces) == (None, ("team-a", "team-b"))
    with pytest.raises(SystemExit):
        config_from_args(["--namespace", " , "])


# ---- an API server that stops answering ---------------------------------------------------


class StallingAPI:
    """A Kubernetes API on 127.0.0.1 for the real client: ``answer(path)`` gives each GET's
    JSON body, or None to never answer (the connection stays open, as when an API server or
    a proxy hangs). A watch ends at once with no events. Stalled handlers are let go at
    ``close``."""

    def __init__(
        self,
        answer: Callable[[str], dict[str, Any] | None],
        silent_watch: bool = False,
        bookmarks: int = 0,
    ) -> None:
        self.answer = answer
        self.paths: list[str] = []
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.paths.append(self.path)
                if "watch=" in self.path and silent_watch:
                    # The watch is answered, then not a byte more, and the connection stays
                    # open: a peer gone without a reset (a node lost behind a VIP).
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.flush()
                    api.release.wait(30)
                    return
                if "watch=" in self.path and bookmarks:
                    # A quiet, healthy watch: a BOOKMARK every 0.2 s, then its end.
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(bookmarks):
                        line = json.dumps(
                            {
                                "type": "BOOKMARK",
                                "object": {"metadata": {"resourceVersion": str(i)}},
                            }
                        ).encode()
                        line += b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                        time.sleep(0.2)
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if "watch=" in self.path:
                    body = b""
                else:
                    obj = api.answer(self.path)
                    if obj is None:
                        api.release.wait(30)
                        return
                    body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, tmp_path: Path) -> str:
        port = self.server.server_address[1]
        path = tmp_path / "kubeconfig"
        path.write_text(
            f"""
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: x}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u}}}}]
current-context: c
"""
        )
        return str(path)

    def lists(self) -> int:
        return sum(1 for p in self.paths if "/agenttasks" in p and "watch=" not in p)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class QuickEvent(threading.Event):
    """A stop event whose back-off waits last 50 ms at most, so the loop retries quickly."""

    def wait(self, timeout: float | None = None) -> bool:
        return super().wait(0.05 if timeout is None else min(timeout, 0.05))


def listing(*tasks: dict[str, Any]) -> dict[str, Any]:
    return {"items": list(tasks), "metadata": {"resourceVersion": "1"}}


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def stalling_api() -> Iterator[Callable[..., StallingAPI]]:
    made: list[StallingAPI] = []

    def make(answer: Callable[[str], dict[str, Any] | None], **kw: Any) -> StallingAPI:
        made.append(StallingAPI(answer, **kw))
        return made[-1]

    yield make
    for api in made:
        api.close()


def two_routes_then_a_switch(
    stalled: Callable[[], bool] = lambda: False,
) -> Callable[[str], dict[str, Any] | None]:
    """A :class:`StallingAPI`'s list answers: first two tasks served by their SLM; then (no
    answer while ``stalled``) one of them switched to the LLM and the other deleted."""
    lists = [0]

    def answer(path: str) -> dict[str, Any] | None:
        lists[0] += 1
        if lists[0] == 1:
            return listing(
                task("weather", secret=None, mode="slm", slmEndpoint="http://triton:8000"),
                task("gone", secret=None, mode="slm", slmEndpoint="http://triton:8000"),
            )
        return None if stalled() else listing(task("weather", secret=None, mode="llm"))

    return answer


def watch_against(api: StallingAPI, tmp_path: Path, **kw: Any) -> AgentTaskWatcher:
    """A started watcher on ``api`` with short request timeouts and quick back-off."""
    watcher = AgentTaskWatcher(
        RouteTable(),
        "agents",
        kubeconfig=api.kubeconfig(tmp_path),
        secret_refresh_s=0,
        request_timeout=(1.0, 0.2),
        **kw,
    )
    watcher._stop = QuickEvent()
    watcher.start()
    return watcher


def test_a_list_that_never_answers_times_out_and_the_next_list_picks_up_the_change(
    stalling_api: Callable[..., StallingAPI],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A relist whose answer never came blocked the watch thread for good: the routes froze
    (a deleted task still sent to its SLM, a switch to the LLM never arriving), /readyz still
    said ready, and nothing was logged. The list now times out, is logged, backed off and
    listed again, and the API server's answer, once it comes, is in the table."""
    caplog.set_level(logging.WARNING, logger="slm_gateway.kube")
    state = {"stalled": True}
    api = stalling_api(two_routes_then_a_switch(lambda: state["stalled"]))
    watcher = watch_against(api, tmp_path)
    try:
        wait_for(lambda: watcher.table.ready, "first list not applied")
        assert sorted(r.task for r in watcher.table.routes()) == ["gone", "weather"]
        wait_for(
            lambda: "AgentTask watch failed" in caplog.text and "timed out" in caplog.text,
            "a list that never answers was not given up and logged",
        )
        state["stalled"] = False  # the API server answers again
        wait_for(
            lambda: [(r.task, r.mode) for r in watcher.table.routes()] == [("weather", "llm")],
            "the change made while the list stalled never reached the routes",
        )
    finally:
        watcher.stop()


def test_a_watch_gone_silent_is_dropped_and_the_change_made_meanwhile_arrives(
    stalling_api: Callable[..., StallingAPI], tmp_path: Path
) -> None:
    """A watch whose connection went dead without a reset (a control-plane node lost behind a
    VIP) was noticed only at the end of its whole time limit (5.5 minutes with the default
    resync) while the API server answered new connections: a switch to the LLM and a deleted
    task reached the gateway that late. A watch silent for ``watch_idle_s`` (longer than the
    API server's once-a-minute bookmarks) is now dropped and the tasks listed again."""
    api = stalling_api(two_routes_then_a_switch(), silent_watch=True)
    watcher = watch_against(api, tmp_path, resync_s=300, watch_idle_s=0.5)
    try:
        wait_for(lambda: watcher.table.ready, "first list not applied")
        wait_for(
            lambda: [(r.task, r.mode) for r in watcher.table.routes()] == [("weather", "llm")],
            "a silent watch was kept: the change made meanwhile never reached the routes",
            timeout=10.0,
        )
    finally:
        watcher.stop()


def test_a_quiet_watch_that_gets_bookmarks_is_kept(
    stalling_api: Callable[..., StallingAPI], tmp_path: Path
) -> None:
    """The idle limit bounds each wait for a byte, not the watch's length: a quiet, healthy
    watch (the API server bookmarks it once a minute) must never be dropped by it, or every
    gateway would list every task again each ``watch_idle_s``."""
    api = stalling_api(two_routes_then_a_switch(), bookmarks=12)  # 2.4 s of bookmarks
    watcher = watch_against(api, tmp_path, resync_s=300, watch_idle_s=0.6)
    try:
        wait_for(lambda: watcher.table.ready, "first list not applied")
        time.sleep(1.8)  # three idle limits, each far longer than between two bookmarks
        assert api.lists() == 1
        assert sorted(r.task for r in watcher.table.routes()) == ["gone", "weather"]
    finally:
        watcher.stop()


def test_a_secret_read_that_never_answers_does_not_hold_up_the_list(
    stalling_api: Callable[..., StallingAPI], tmp_path: Path
) -> None:
    """A Secret read that never answered blocked the list it was part of for good: no task of
    the namespace was ever routed and /readyz stayed 503. It now times out; the task is
    routed (without a key, as for any unreadable Secret) and the tasks without one too."""

    def answer(path: str) -> dict[str, Any] | None:
        if "/secrets/" in path:
            return None
        return listing(task("weather"), task("plain", secret=None))

    api = stalling_api(answer)
    watcher = watch_against(api, tmp_path)
    try:
        wait_for(lambda: watcher.table.ready, "a stalled Secret read held up the list")
        assert sorted(r.task for r in watcher.table.routes()) == ["plain", "weather"]
        assert auth(watcher, "weather") is None
    finally:
        watcher.stop()


# ---- a key refresh racing a watch event ---------------------------------------------------


class SlowCore(FakeCore):
    """A refresh's read (in the thread named "refresher") gets the key of that moment, then
    waits for ``go`` before it returns: the watch meanwhile reads and installs a newer key."""

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__(keys)
        self.entered = threading.Event()
        self.go = threading.Event()

    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> _Secret:
        secret = super().read_namespaced_secret(name, namespace, **kwargs)
        if threading.current_thread().name == "refresher":
            self.entered.set()
            assert self.go.wait(10)
        return secret


def test_a_slow_refresh_never_puts_back_the_key_an_event_just_replaced() -> None:
    """A refresh reads the Secrets without the lock; one in flight while the key rotated used
    to install the old key it had read right after a watch event installed the new one, and
    every LLM call got a 401 until the next refresh. Tasks installed meanwhile are now left
    as they are. (An event reads the Secret itself only where no refresh loop runs, or for a
    Secret first named: see the next test.)"""
    core = SlowCore({"llm-key": KEY})
    watcher = listed(core, task("weather"))
    watcher.secret_refresh_s = 0  # events read the Secret themselves
    refresher = threading.Thread(target=watcher.refresh_keys, args=(core,), name="refresher")
    refresher.start()
    assert core.entered.wait(10)
    core.keys["llm-key"] = NEW_KEY  # rotated, the old key revoked
    watcher._apply_event("MODIFIED", task("weather", mode="llm"), core)
    assert auth(watcher, "weather") == f"Bearer {NEW_KEY}"
    core.go.set()
    refresher.join(10)
    assert auth(watcher, "weather") == f"Bearer {NEW_KEY}"
    watcher.refresh_keys(core)  # the next refresh still rotates keys as before
    assert auth(watcher, "weather") == f"Bearer {NEW_KEY}"
    core.keys["llm-key"] = KEY
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {KEY}"


def test_an_event_does_not_wait_for_a_secret_already_read() -> None:
    """The watch thread handles one event at a time. It read the task's Secret on every event,
    so one slow Secret (a degraded KMS: seconds per read, then a 500) held up every route
    change behind it, another task's fallback to the LLM included. A Secret already read is
    left to the refresh loop, which also updates the tasks an event installed meanwhile."""

    class Stalled(FakeCore):
        reads = 0

        def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> _Secret:
            if threading.current_thread().name != "refresher":
                Stalled.reads += 1
            return super().read_namespaced_secret(name, namespace, **kwargs)

    core = Stalled({"llm-key": KEY})
    watcher = listed(core, task("weather"), task("other"))
    listed_reads = Stalled.reads
    for _ in range(5):
        watcher._apply_event("MODIFIED", task("weather", mode="llm"), core)
    assert Stalled.reads == listed_reads  # no read on the watch thread
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    core.keys["llm-key"] = NEW_KEY  # rotated
    refresher = threading.Thread(target=watcher.refresh_keys, args=(core,), name="refresher")
    refresher.start()
    refresher.join(10)
    assert auth(watcher, "weather") == auth(watcher, "other") == f"Bearer {NEW_KEY}"
    # A Secret no task named before is read at once: its key is needed now.
    watcher._apply_event("MODIFIED", task("new", secret="fresh"), core)
    assert Stalled.reads == listed_reads + 1


def test_what_the_gateway_cannot_serve_is_reported_per_task_until_it_is_fixed() -> None:
    """The gateway may not write a task's status, and its log is easy to miss: a task whose
    route it refused (every call fails) or whose LLM key Secret is missing (every LLM call a
    401) is named by :meth:`problems`, which /metrics exports, and only until it is fixed."""
    core = FakeCore({"llm-key": KEY})
    bad_url = task("bad-url")
    bad_url["spec"]["fallback"]["llm"]["baseURL"] = "https://llm.example/v1#frag"
    watcher = listed(core, task("ok"), task("no-secret", secret="absent"), bad_url)
    assert watcher.problems() == {
        ("agents", "no-secret"): "llm_key_missing",
        ("agents", "bad-url"): "route_refused",
    }
    assert watcher.table.get("bad-url") is None
    core.keys["absent"] = NEW_KEY  # the Secret is created
    watcher.refresh_keys(core)
    fixed = task("bad-url")
    watcher._apply_event("MODIFIED", fixed, core)
    assert watcher.problems() == {}
    assert watcher.table.get("bad-url") is not None
    core.fail = ApiException(status=403, reason="Forbidden")
    watcher.refresh_keys(core)  # the last key read stays in use, and the problem is named
    assert watcher.problems() == {
        ("agents", t): "llm_key_unreadable" for t in ("ok", "no-secret", "bad-url")
    }
    watcher._apply_event("DELETED", fixed, core)
    assert ("agents", "bad-url") not in watcher.problems()


@pytest.mark.parametrize(
    "bad_key",
    [KEY + "\n" + NEW_KEY, KEY + "\r\n" + NEW_KEY, KEY + "\0", "sk-\u20ac-" + KEY],
    ids=["line-break", "crlf", "nul", "not-latin-1"],
)
def test_a_key_no_header_can_carry_is_unusable_and_the_task_is_still_served(
    caplog: pytest.LogCaptureFixture, bad_key: str
) -> None:
    """A Secret made from a file of two lines has a line break inside its key. It was taken
    as usable, then the route refused it (it cannot go in a header), so the whole task was
    dropped: every call a 404 model_not_found, and the problem read route_refused. It is a
    key problem: the task is served without the key (the LLM answers 401), reported as
    llm_key_unusable, and the key is never logged."""
    caplog.set_level(logging.DEBUG, logger="slm_gateway")
    core = FakeCore({"llm-key": bad_key})
    watcher = listed(core, task("weather"))
    assert auth(watcher, "weather") is None
    assert watcher.problems() == {("agents", "weather"): "llm_key_unusable"}
    core.keys["llm-key"] = NEW_KEY  # the Secret is fixed
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {NEW_KEY}"
    assert watcher.problems() == {}
    assert KEY not in caplog.text and NEW_KEY not in caplog.text


# ---- a list while the Secrets are slow ----------------------------------------------------


class CountingCore(FakeCore):
    """Counts the Secret reads made outside the refresh thread, by Secret name."""

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__(keys)
        self.watch_reads: list[str] = []

    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> _Secret:
        if threading.current_thread().name != "refresher":
            self.watch_reads.append(name)
        return super().read_namespaced_secret(name, namespace, **kwargs)


def test_a_list_again_reads_only_the_secrets_no_task_named_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch is closed while a list runs, and every list (each resync, each 410) read
    every Secret the tasks name, one after another: with a degraded KMS (8 Secrets at 1 s a
    read) a task's switch to the LLM reached the routes 8 s late. A list now reads only a
    Secret no task named before; the others' keys are the refresh loop's, as for events."""
    first = [task("a"), task("b", secret="other")]
    again = [task("a", mode="llm"), task("b", secret="other"), task("c", secret="fresh")]
    core = CountingCore({"llm-key": KEY, "other": "sk-other", "fresh": NEW_KEY})
    watcher, custom, _ = run_loop(
        monkeypatch, [first, again], [[GONE], []], stop_after=2, core=core
    )
    assert custom.list_calls == 2
    assert core.watch_reads == ["llm-key", "other", "fresh"]  # each once, "fresh" when named
    assert auth(watcher, "a") == f"Bearer {KEY}" and auth(watcher, "c") == f"Bearer {NEW_KEY}"
    route = watcher.table.get("a")
    assert route is not None and route.mode == "llm"


def test_a_refresh_in_flight_during_a_list_still_updates_the_tasks_it_listed() -> None:
    """A list that takes a key it did not read is no newer than a refresh running meanwhile:
    the rotated key that refresh read still reaches the tasks the list installed. And a Secret
    no task names any more is forgotten, so a task that names it again reads it at once."""
    core = SlowCore({"llm-key": KEY, "other": "sk-other"})
    watcher = listed(core, task("weather"), task("b", secret="other"))
    core.keys["llm-key"] = NEW_KEY  # rotated, then read by a refresh that is slow to finish
    refresher = threading.Thread(target=watcher.refresh_keys, args=(core,), name="refresher")
    refresher.start()
    assert core.entered.wait(10)
    lists: list[list[dict[str, Any]] | Exception] = [
        [task("weather", mode="llm"), task("b", secret="other")],
        [task("weather", mode="llm")],  # "other" is named by no task now
    ]
    custom = FakeCustom(lists, [[]], stop_after=10**6, stop=lambda: None)
    watcher._relist(custom, core)
    core.go.set()
    refresher.join(10)
    assert auth(watcher, "weather") == f"Bearer {NEW_KEY}"
    watcher._relist(custom, core)
    del core.keys["other"]  # gone, then a task names it again: its old key must not return
    reads = core.reads
    watcher._apply_event("ADDED", task("b", secret="other"), core)
    assert core.reads == reads + 1
    assert auth(watcher, "b") is None
    assert watcher.problems() == {("agents", "b"): "llm_key_missing"}


@pytest.mark.parametrize("empty", ["", " \n"], ids=["empty", "blank"])
def test_an_empty_key_is_reported_as_missing(caplog: pytest.LogCaptureFixture, empty: str) -> None:
    """A Secret made with ``--from-literal=api-key=$KEY`` and KEY unset holds an empty key. It
    was taken as a good one: no problem reported and nothing logged, while every LLM call
    went out without Authorization and got a 401. It is now a missing key: reported as
    llm_key_missing, with one warning that says the key is empty."""
    caplog.set_level(logging.DEBUG, logger="slm_gateway")
    core = FakeCore({"llm-key": empty})
    watcher = listed(core, task("weather"))
    watcher.refresh_keys(core)  # read again: still one warning, not one per read
    assert auth(watcher, "weather") is None
    assert watcher.problems() == {("agents", "weather"): "llm_key_missing"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Secret agents/llm-key for the LLM key has an empty key 'api-key'"]
    core.keys["llm-key"] = KEY  # the Secret is fixed
    watcher.refresh_keys(core)
    assert auth(watcher, "weather") == f"Bearer {KEY}"
    assert watcher.problems() == {}


@pytest.mark.parametrize(
    ("entry", "secrets", "meant"),
    [
        (
            "https://llm-user:s3cr3t-pass@api.example.com/v1",
            ("llm-user", "s3cr3t-pass"),
            "api.example.com",
        ),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai?key=AIzaSyD-SECRET",
            ("AIzaSyD-SECRET",),
            "generativelanguage.googleapis.com",
        ),
        # without a scheme, urlsplit reads no user info: it is cut off at the '@'
        (
            "llm-user:s3cr3t-pass@llm.example:8000/v1#AIzaSyD-SECRET",
            ("llm-user", "s3cr3t-pass", "AIzaSyD"),
            LLM_HOST,
        ),
    ],
    ids=["user-info", "query-key", "no-scheme"],
)
def test_an_unread_host_entry_is_logged_without_the_credentials_pasted_with_it(
    caplog: pytest.LogCaptureFixture, entry: str, secrets: tuple[str, ...], meant: str
) -> None:
    """An owner who pasted the provider's whole URL may have pasted its credentials with it:
    user info, or a key in the query (Gemini's ``?key=``). The warning named the entry as
    written, so the log (read by more people than the Secret) held them. It shows the entry
    without them, and names the host the owner meant to write."""
    caplog.set_level(logging.WARNING, logger="slm_gateway")
    core = FakeCore({"llm-key": KEY}, hosts={"llm-key": entry})
    listed(core, task("weather"))
    unread = [r.getMessage() for r in caplog.records if "allow nothing" in r.getMessage()]
    assert len(unread) == 1, unread
    for secret in secrets:
        assert secret not in unread[0], unread[0]
    assert f"write {meant}" in unread[0] and "agents/llm-key" in unread[0]
