"""How often the operator retries a task whose reconcile fails, over hours of simulated time.

The operator's own scheduling (the retry timer, the resync loop, kopf's events) runs on a
real asyncio loop whose clock jumps to the next timer instead of waiting for it, so an hour
takes milliseconds; only the reconcile itself is faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, cast

import pytest
from kubernetes import client
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)

from slm_operator import main
from slm_operator.kube import Kube, KubeError

KEY = ("agents", "weather")


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Answers what is ready now; when nothing is, moves the clock to the next timer."""

    loop: VirtualClockLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("nothing scheduled and nothing ready: the test would hang")
        self.loop.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now


class FakeReconcile:
    """Stands in for :func:`slm_operator.reconcile.reconcile`; records when it ran."""

    def __init__(self, loop: VirtualClockLoop, outcome: Callable[[int], Exception | None]):
        self.loop, self.outcome = loop, outcome
        self.calls: list[float] = []
        self.running = self.most_at_once = 0

    def __call__(self, *_: Any, **__: Any) -> None:
        self.calls.append(self.loop.now)
        error = self.outcome(len(self.calls))
        if error is not None:
            raise error

    def per_minute(self, start_min: int, end_min: int) -> list[int]:
        return [
            sum(1 for t in self.calls if 60 * m <= t < 60 * (m + 1))
            for m in range(start_min, end_min)
        ]


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualClockLoop]:
    async def inline(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    # The reconcile is synchronous here: a worker thread would finish in real, not virtual time.
    monkeypatch.setattr(asyncio, "to_thread", inline)
    monkeypatch.setattr(main, "RESYNC_SECONDS", 30.0)
    monkeypatch.setattr(main, "METRICS", main.OperatorMetrics())
    lp = VirtualClockLoop()
    yield lp
    lp.close()


def run(
    loop: VirtualClockLoop,
    monkeypatch: pytest.MonkeyPatch,
    scenario: Callable[[main.Runtime], Coroutine[Any, Any, None]],
) -> main.Runtime:
    rt = main.Runtime(kube=cast(Any, None))
    monkeypatch.setattr(main, "_runtime", rt)

    async def body() -> None:
        rt.spawn(main._resync_loop())
        try:
            await scenario(rt)
        finally:
            for t in list(rt.tasks):
                t.cancel()
            await asyncio.gather(*rt.tasks, return_exceptions=True)

    loop.run_until_complete(body())
    return rt


def test_a_task_failing_with_429_is_retried_about_every_five_minutes_after_an_hour(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API server answering 429 (or 5xx) for hours: the failing task's attempts back off
    to one per five minutes and stay there. Before, every failed pass and every resync
    started a retry chain of its own: attempts per minute kept growing until restart."""
    fake = FakeReconcile(loop, lambda _: KubeError(429, "too many requests", "TooManyRequests"))
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(3 * 3600)
        assert len(rt.tasks) == 1  # the resync loop, no pile of retry tasks

    run(loop, monkeypatch, scenario)
    assert fake.calls[:6] == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]  # 1, 2, 4 ... seconds apart
    assert max(fake.per_minute(15, 180)) == 1
    assert sum(fake.per_minute(60, 180)) <= 120 / 5 + 1  # one in five minutes


def test_a_refused_reconcile_is_left_to_the_resync_and_logged_once(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """403 (RBAC), 422, an admission webhook's denial: retrying sooner cannot help, so the
    task is tried at each resync (twice a minute) and the log says it once, not per pass."""
    fake = FakeReconcile(loop, lambda _: KubeError(403, "jobs.batch is forbidden", "Forbidden"))
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(3600)

    with caplog.at_level(logging.INFO, logger="slm_operator"):
        run(loop, monkeypatch, scenario)
    assert max(fake.per_minute(0, 60)) <= 3  # the event's pass and two resyncs
    assert max(fake.per_minute(1, 60)) == 2
    said = [r for r in caplog.records if "forbidden" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR


def test_a_pass_that_works_cancels_the_pending_retry(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conflict, then the task changes and its pass works: nothing more runs until the
    next resync (the retry scheduled for the conflict is gone with it)."""
    fake = FakeReconcile(loop, lambda n: KubeError(409, "conflict", "Conflict") if n == 1 else None)
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])  # fails at 0 s
        await asyncio.sleep(0.5)
        await main.on_task(type="MODIFIED", namespace=KEY[0], name=KEY[1])  # works at 0.5 s
        await asyncio.sleep(29)

    run(loop, monkeypatch, scenario)
    assert fake.calls == [0.0, 0.5]


def test_a_deleted_task_is_not_retried(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeReconcile(
        loop, lambda _: KubeError(503, "etcd leader changed", "ServiceUnavailable")
    )
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(0.5)  # its retry is due at 1 s
        await main.on_task(type="DELETED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(600)
        assert KEY not in rt.states

    run(loop, monkeypatch, scenario)
    assert fake.calls == [0.0]


def test_a_task_deleted_and_created_again_during_its_pass_gets_no_second_concurrent_pass(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delete and re-create under the same name while a (slow) pass runs: the new object's
    pass waits for the old one to end, instead of the two writing the same children and
    status at once."""
    fake = FakeReconcile(loop, lambda _: None)
    monkeypatch.setattr(main, "reconcile", fake)

    async def slow(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fake.running += 1
        fake.most_at_once = max(fake.most_at_once, fake.running)
        try:
            await asyncio.sleep(10)
            return fn(*args, **kwargs)
        finally:
            fake.running -= 1

    monkeypatch.setattr(asyncio, "to_thread", slow)

    async def scenario(rt: main.Runtime) -> None:
        first = asyncio.ensure_future(main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1]))
        await asyncio.sleep(1)
        await main.on_task(type="DELETED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(1)
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await first

    run(loop, monkeypatch, scenario)
    assert fake.most_at_once == 1
    assert fake.calls[:2] == [10.0, 20.0]  # the re-created task's pass follows the old one


def test_a_late_deleted_event_of_the_old_object_does_not_forget_the_recreated_task(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kubectl replace --force: kopf handles the old and the new object (two uids) in two
    workers, so the old object's DELETED can come after the new one's ADDED. It used to
    forget the new task, which then was never reconciled again (no resync, no child event)."""
    fake = FakeReconcile(loop, lambda _: None)
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1], uid="old")
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1], uid="new")
        await main.on_task(type="DELETED", namespace=KEY[0], name=KEY[1], uid="old")
        assert KEY in rt.known
        await asyncio.sleep(95)  # three resyncs
        await main._on_child({main.n.LABEL_TASK: KEY[1]}, KEY[0])  # its Job finished
        await main.on_task(type="DELETED", namespace=KEY[0], name=KEY[1], uid="new")
        assert KEY not in rt.known and KEY not in rt.uids

    run(loop, monkeypatch, scenario)
    assert len(fake.calls) >= 5, fake.calls  # two ADDED, three resyncs, the Job event


def test_a_404_of_the_old_object_does_not_forget_the_task_created_again_meanwhile(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kubectl replace --force while a pass of the old object runs: its read gets a 404
    (TaskGone), and the new object's ADDED is handled before the pass ends. The pass then
    forgot the key, and the new task got no resync and no child events until an edit."""
    from slm_operator.kube import TaskGone

    def outcome(n: int) -> Exception | None:
        if n == 1:  # the old object is gone; the new one is created meanwhile
            loop.create_task(main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1], uid="u2"))
            return TaskGone(*KEY)
        return None

    fake = FakeReconcile(loop, outcome)
    monkeypatch.setattr(main, "reconcile", fake)

    async def to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            await asyncio.sleep(0)  # the thread's result comes a loop turn later

    monkeypatch.setattr(asyncio, "to_thread", to_thread)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="MODIFIED", namespace=KEY[0], name=KEY[1], uid="u1")
        await asyncio.sleep(65)  # two resyncs
        assert KEY in rt.known and rt.uids.get(KEY) == "u2"

    run(loop, monkeypatch, scenario)
    assert len(fake.calls) >= 3, fake.calls  # the new object's pass and the resyncs


def test_a_task_gone_without_a_deleted_event_is_forgotten(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a watch's 410 Gone kopf lists the tasks again and sends no DELETED for one that
    is missing: the task's next read finds nothing (TaskGone). It is forgotten then: not read
    again at every resync for the life of the process, and no failed reconcile counted."""
    from slm_operator.kube import TaskGone

    fake = FakeReconcile(loop, lambda n: TaskGone(*KEY) if n >= 2 else None)
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1], uid="u1")
        await asyncio.sleep(35)  # the resync finds it gone
        assert KEY not in rt.known and KEY not in rt.states
        await asyncio.sleep(300)  # ten more resyncs

    run(loop, monkeypatch, scenario)
    assert len(fake.calls) == 2, fake.calls
    errors = main.METRICS.reconciles.labels(main.RESULT_ERROR)._value.get()
    assert errors == 0


def test_backoff_doubles_from_one_second_up_to_five_minutes() -> None:
    assert [main.backoff(n) for n in (1, 2, 3, 9, 10, 50)] == [1, 2, 4, 256, 300, 300]


def test_backoff_after_a_connection_error_stops_at_fifteen_seconds() -> None:
    """An API server that cannot be reached is back soon or not at all: once it is back, a
    long wait is only lag. Once it has answered (409, 429, 5xx, a timeout: overloaded) since
    the last pass that worked, its back-off holds, up to five minutes, whatever failed since."""
    assert [main.retry_delay(n, 0) for n in (1, 2, 3, 4, 5, 50)] == [1, 2, 4, 8, 15, 15]
    assert [main.retry_delay(0, n) for n in (5, 50)] == [16, 300]
    assert [main.retry_delay(50, n) for n in (1, 5, 50)] == [1, 16, 300]


def _adapted(exc: Exception) -> KubeError:
    """The error :class:`Kube` raises when the client's request raises ``exc`` (as urllib3
    raises it): what a reconcile fails with."""
    api = client.ApiClient(client.Configuration())

    def call_api(*_: Any, **__: Any) -> Any:
        raise exc

    api.call_api = call_api  # type: ignore[method-assign]
    with pytest.raises(KubeError) as caught:
        Kube(api).request("PATCH", "/apis/slmfleet.dev/v1alpha1/namespaces/agents/agenttasks")
    return caught.value


def _refused() -> KubeError:
    """A connection refused, after urllib3's retries: the API server is down."""
    cause = NewConnectionError(
        cast(Any, None), "Failed to establish a new connection: [Errno 111] Connection refused"
    )
    return _adapted(MaxRetryError(cast(Any, None), "/apis", cause))


def _timed_out() -> KubeError:
    """A PATCH (never retried by urllib3) that got no answer in the client's 30 s: the API
    server is overloaded."""
    return _adapted(ReadTimeoutError(cast(Any, None), "/apis", "Read timed out. (read timeout=30)"))


@contextlib.contextmanager
def _api_server(behaviour: str) -> Iterator[str]:
    """The URL of an API server on 127.0.0.1 that is ``down`` (nothing listens), ``hung``
    (takes connections, never answers) or ``hangs up`` (reads each request, then closes)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    if behaviour == "down":
        sock.close()
        yield url
        return
    sock.listen(16)  # the kernel takes connections nobody accepts: a hung server
    stop = threading.Event()

    def hang_up() -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = sock.accept()
                with conn:
                    conn.recv(65536)

    thread = threading.Thread(target=hang_up) if behaviour == "hangs up" else None
    if thread:
        thread.start()
    try:
        yield url
    finally:
        stop.set()
        if thread:
            thread.join()
        sock.close()


@pytest.mark.parametrize("method", ["GET", "PATCH"])
@pytest.mark.parametrize(
    ("behaviour", "status", "reason"),
    [("down", 0, "Unreachable"), ("hung", 504, "Timeout"), ("hangs up", 502, "NoAnswer")],
)
def test_only_an_api_server_that_cannot_be_reached_fails_with_status_0(
    method: str, behaviour: str, status: int, reason: str
) -> None:
    """Status 0 (retried at most 15 s apart, events and resyncs not held back) is only for
    an API server nothing reached. A request it took and never answered (the read timeout of
    an overloaded server) or whose connection it closed is retried like its 5xx: both were
    status 0, and a server overloaded into timeouts got a pass per task about every second.
    GETs come through urllib3's retries (MaxRetryError), PATCHes straight (not idempotent)."""
    with _api_server(behaviour) as url:
        kube = Kube(client.ApiClient(client.Configuration(host=url)))
        with pytest.raises(KubeError) as caught:
            kube.request(method, "/api/v1/namespaces/agents/pods", timeout=0.2)
    assert (caught.value.status, caught.value.reason) == (status, reason), caught.value
    assert caught.value.retryable


@pytest.mark.parametrize(
    "cause",
    [
        NameResolutionError("api.cluster.invalid", cast(Any, None), socket.gaierror(-2, "no")),
        ConnectTimeoutError(None, "Connection to 10.0.0.1 timed out. (connect timeout=30)"),
    ],
)
def test_no_such_host_and_a_connect_timeout_are_unreachable_too(cause: Exception) -> None:
    """Nothing was sent: no API server was reached, none is loaded by trying again soon."""
    assert _adapted(MaxRetryError(cast(Any, None), "/apis", cause)).status == 0


def _api_server_down_until(
    back_at: float, loop: VirtualClockLoop
) -> Callable[[int], Exception | None]:
    """The reconcile's outcome while the API server refuses connections until ``back_at``."""

    def outcome(_: int) -> Exception | None:
        return _refused() if loop.now < back_at else None

    return outcome


def test_a_child_event_after_an_api_server_outage_is_reconciled_at_once(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server is stopped for 90 s: the task's retries back off through the outage
    (1, 2, 4 ... 32 s apart). When it is back, the watches list again and the task's Job
    event (it completed meanwhile) runs a pass at once. Before, every event and resync was
    left to the pending retry, due at 127 s, and DataReady came 32 s late (minutes, after a
    longer outage)."""
    fake = FakeReconcile(loop, _api_server_down_until(90.0, loop))
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(92.5)
        await main._on_child({main.n.LABEL_TASK: KEY[1]}, KEY[0])  # at 92.5 s
        await asyncio.sleep(0.5)

    run(loop, monkeypatch, scenario)
    assert 92.5 in fake.calls, fake.calls


def test_a_resync_after_an_api_server_outage_reconciles_the_task_at_once(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No event at all after the outage (the watches listed nothing new): the first resync
    once the API server is back reconciles the task, instead of leaving it to the retry."""
    monkeypatch.setattr(main, "RESYNC_SECONDS", 10.0)
    fake = FakeReconcile(loop, _api_server_down_until(9.5, loop))
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(12)

    run(loop, monkeypatch, scenario)
    assert fake.calls == [0.0, 1.0, 3.0, 7.0, 10.0]  # the retry was due at 15 s


def test_a_long_outage_is_retried_at_most_fifteen_seconds_apart(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection refused for an hour: one try at least every 15 s (its retries; resyncs
    may add one), never the five-minute back-off of an overloaded API server."""
    fake = FakeReconcile(loop, lambda _: _refused())
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(3595)  # between a resync and a retry
        assert len(rt.tasks) == 1  # the resync loop, no pile of retry tasks

    run(loop, monkeypatch, scenario)
    assert max(b - a for a, b in itertools.pairwise(fake.calls)) <= 15
    assert max(fake.per_minute(5, 60)) <= 6  # four retries and two resyncs a minute at most


def test_a_503_from_the_api_server_starting_again_does_not_inherit_the_outage_s_backoff(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kube-apiserver that starts again answers 503 until it is ready. The twenty
    connection errors of the outage before it are not 503s: the first one is retried after
    1 s, as any first 503, not after five minutes (with events and resyncs left to it)."""

    def outcome(_: int) -> Exception | None:
        if loop.now < 300:
            return _refused()
        if loop.now < 301:
            return KubeError(503, "apiserver not ready", "ServiceUnavailable")
        return None

    fake = FakeReconcile(loop, outcome)
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(310)

    run(loop, monkeypatch, scenario)
    assert 300.0 in fake.calls  # the 503
    assert [t for t in fake.calls if t > 300] == [301.0], fake.calls


def test_a_connection_error_after_503s_keeps_their_back_off(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503s for two minutes (the next retry 128 s away), then the task is edited and its pass
    cannot connect: the retry stays when the 503s' back-off has it. Why not sooner: the 503s
    showed an overloaded API server, and a refused connection after them does not show that
    it recovered (a load balancer shedding load refuses some connections and answers others
    429 or 503); retried as a first failure, every such flap let a pass through about every
    second. Only a pass that works starts the count over."""

    def outcome(_: int) -> Exception | None:
        if loop.now < 129:
            return KubeError(503, "overloaded", "ServiceUnavailable")
        if loop.now < 140:
            return _refused()
        return None

    fake = FakeReconcile(loop, outcome)
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(130)
        await main.on_task(type="MODIFIED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(130)

    run(loop, monkeypatch, scenario)
    # the resyncs (every 30 s) and the refused pass's own retry wait for the 503s' one
    assert fake.calls[7:] == [127.0, 130.0, 255.0]


def test_events_still_wait_for_the_retry_of_a_task_failing_with_503(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API server that answers 503 is overloaded: its child events and resyncs do not
    add passes to the task's back-off (only the task's own change does)."""
    fake = FakeReconcile(loop, lambda _: KubeError(503, "overloaded", "ServiceUnavailable"))
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(40)  # tries at 0, 1, 3, 7, 15, 31; the next at 63
        await main._on_child({main.n.LABEL_TASK: KEY[1]}, KEY[0])
        await asyncio.sleep(22)

    run(loop, monkeypatch, scenario)
    assert fake.calls == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]


def _flapping(
    loop: VirtualClockLoop,
    monkeypatch: pytest.MonkeyPatch,
    outcome: Callable[[int], Exception | None],
    child_every: float | None = None,
) -> FakeReconcile:
    """An hour of a task whose passes fail as ``outcome`` says, with a child event every
    ``child_every`` seconds (a pod's, a Job's) if set."""
    fake = FakeReconcile(loop, outcome)
    monkeypatch.setattr(main, "reconcile", fake)

    async def scenario(rt: main.Runtime) -> None:
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        if child_every is None:
            await asyncio.sleep(3600)
            return
        while loop.now < 3600:
            await asyncio.sleep(child_every)
            await main._on_child({main.n.LABEL_TASK: KEY[1]}, KEY[0])

    run(loop, monkeypatch, scenario)
    return fake


def test_an_api_server_refusing_connections_and_answering_429_in_turn_is_retried_slowly(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overloaded API server behind a load balancer, for an hour: one pass's connection
    is refused, the next one is answered 429, and so on. The 429s set the pace: one pass in
    five minutes once the back-off has grown, as with 429s alone. Before, each change of
    kind started the count over and each refused connection let the next resync through:
    a pass about every second, per task (100 tasks: 6,000 a minute)."""
    busy = KubeError(429, "too many requests", "TooManyRequests")
    fake = _flapping(loop, monkeypatch, lambda i: _refused() if i % 2 else busy)
    assert max(fake.per_minute(20, 60)) == 1
    assert sum(fake.per_minute(30, 60)) <= 30 / 5 + 1


def test_an_api_server_timing_out_and_answering_429_in_turn_is_retried_slowly(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overloaded API server: one pass waits out the client's 30 s read timeout, the
    next is answered 429, and so on. One pass in five minutes once the back-off has grown;
    before, the timeouts counted as connection errors: 4 passes a minute per task."""
    busy = KubeError(429, "too many requests", "TooManyRequests")

    def outcome(i: int) -> Exception | None:
        if i % 2:
            loop.now += 30  # the pass's request waited out the read timeout
            return _timed_out()
        return busy

    fake = _flapping(loop, monkeypatch, outcome)
    assert sum(fake.per_minute(30, 60)) <= 30 / 5 + 1


def test_a_hung_api_server_is_not_retried_at_the_pace_of_child_events(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request times out for an hour while the watch still delivers a pod event of the
    task every 5 s: the events wait for the back-off (one pass in five minutes), as for a
    503. Before, a timeout counted as a connection error and each event ran a pass: 14 a
    minute per task."""
    fake = _flapping(loop, monkeypatch, lambda _: _timed_out(), child_every=5)
    assert sum(fake.per_minute(30, 60)) <= 30 / 5 + 1


def test_a_served_task_is_judged_at_its_own_window_not_the_resyncs(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task with 5 s windows and no events: reconciled every 5 s (its windows), not every
    30 s (the resync), so fallback and scaling react at the pace the spec asks for. Without
    Prometheus there are no windows to judge and only the resync runs."""
    from slm_operator.plan import Plan

    for prom, expected in ((object(), [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]), (None, [0.0])):
        fake = FakeReconcile(loop, lambda _: None)
        start = loop.now

        def served(*args: Any, _fake: FakeReconcile = fake, **kwargs: Any) -> Plan:
            _fake(*args, **kwargs)
            return Plan(next_window_s=5.0)

        monkeypatch.setattr(main, "reconcile", served)

        async def scenario(rt: main.Runtime, _prom: Any = prom) -> None:
            rt.prom = _prom
            await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
            await asyncio.sleep(29)

        run(loop, monkeypatch, scenario)
        assert [round(t - start, 3) for t in fake.calls] == expected


def test_a_task_failing_before_its_status_is_not_reconciled_at_window_pace(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a pass that wrote the status sets a window: a task backing off after 429s is
    not reconciled at window pace on top of its retries."""
    from slm_operator.plan import Plan

    outcomes = iter([None] + [KubeError(429, "too many", "TooManyRequests")] * 3)
    calls: list[float] = []

    def flaky(*_: Any, **__: Any) -> Plan:
        calls.append(loop.now)
        error = next(outcomes, None)
        if error is not None:
            raise error
        return Plan(next_window_s=1.0)

    monkeypatch.setattr(main, "reconcile", flaky)

    async def scenario(rt: main.Runtime) -> None:
        rt.prom = object()
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(12)

    run(loop, monkeypatch, scenario)
    # works at 0, window at 1 fails (retry in 1 s), 2 fails (2 s), 4 fails (4 s), 8 works,
    # then windows again every second
    assert calls[:5] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert calls[5:] == [9.0, 10.0, 11.0]


def test_a_task_whose_child_writes_stay_busy_is_still_judged_at_its_windows(
    loop: VirtualClockLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admission webhook down for ten minutes answers every pass's Deployment apply with
    a 500, after the pass wrote the status. Windows (30 s here) are still judged at their
    pace, not at the retries' back-off (1, 2, 4 ... 300 s: 4 passes in the first minute,
    then about one in five minutes), and the task's series follow the status written, so
    the alert on FallbackActive fires during the outage rather than after it."""
    from slm_operator import conditions as c
    from slm_operator.plan import Plan
    from slm_operator.reconcile import ChildWriteBusy

    status = {"phase": "Serving", "conditions": [{"type": c.FALLBACK_ACTIVE, "status": c.TRUE}]}
    webhook = KubeError(500, 'failed calling webhook "validate.kyverno.svc"', "InternalError")
    calls: list[float] = []

    def busy(*_: Any, **__: Any) -> Plan:
        calls.append(loop.now)
        raise ChildWriteBusy(webhook, Plan(status=status, next_window_s=30.0))

    monkeypatch.setattr(main, "reconcile", busy)

    async def scenario(rt: main.Runtime) -> None:
        rt.prom = object()
        await main.on_task(type="ADDED", namespace=KEY[0], name=KEY[1])
        await asyncio.sleep(600)

    run(loop, monkeypatch, scenario)
    # a window 30 s after each pass, whatever the retries' back-off has grown to
    assert max(b - a for a, b in itertools.pairwise(calls)) <= 30
    assert calls[-1] >= 570
    sample = main.METRICS.registry.get_sample_value(
        "slm_operator_task_condition",
        {"namespace": KEY[0], "task": KEY[1], "type": c.FALLBACK_ACTIVE, "status": c.TRUE},
    )
    assert sample == 1.0
