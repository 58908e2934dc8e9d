"""The operator's PromQL: one task's gateway series, scoped to its namespace when known; and
how it connects to Prometheus (certificate checked, credentials kept out of the log)."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from slm_gateway.metrics import GatewayMetrics
from slm_operator.live import CounterReading
from slm_operator.prom import PromMetrics, counter_readings, error_summary, queries

GATEWAY_SELECTOR = re.compile(r"slm_gateway_\w+\{([^}]*)\}")
# Triton's series: by model (the task's name), and the namespace its pod runs in, which the
# scrape adds (the chart's PodMonitor: the Prometheus Operator's `namespace` target label).
TRITON_SELECTOR = re.compile(r"nv_inference_\w+\{([^}]*)\}")


def test_with_a_namespace_every_gateway_selector_names_it_and_the_task() -> None:
    for name, q in queries("weather", "30s", "60s", namespace="team-a").items():
        selectors = GATEWAY_SELECTOR.findall(q)
        if name == "queue_ms":
            assert not selectors  # Triton's series, by model
            continue
        assert selectors, name
        for sel in selectors:
            assert sel.startswith('namespace="team-a",task="weather"'), (name, sel)


def test_with_a_namespace_triton_queue_time_is_that_namespaces_model() -> None:
    """Two tasks named alike in two namespaces each serve a model of that name: without the
    namespace, one task's queue time would be the two Tritons' together."""
    q = queries("weather", "30s", "60s", namespace="team-a")["queue_ms"]
    selectors = TRITON_SELECTOR.findall(q)
    assert len(selectors) == 2, q
    for sel in selectors:
        assert sel == 'namespace="team-a",model="weather"', sel


def test_without_a_namespace_the_selectors_match_the_task_in_any_namespace() -> None:
    for q in queries("weather", "30s", "60s").values():
        for sel in GATEWAY_SELECTOR.findall(q):
            assert "namespace" not in sel
            assert sel.startswith('task="weather"')
        for sel in TRITON_SELECTOR.findall(q):
            assert sel == 'model="weather"', sel


def test_the_slm_error_rate_selects_the_slm_backend_and_error_results() -> None:
    q = queries("weather", "30s", "60s", namespace="team-a")["error_rate"]
    assert (
        'slm_gateway_backend_calls_total{namespace="team-a",task="weather",backend="slm",'
        'result=~"error|timeout|bad_output"}[30s]' in q
    )


def test_an_https_prometheus_certificate_is_verified_unless_told_otherwise() -> None:
    """Its answers decide fallback, scaling and promotion: no silent man in the middle."""
    assert PromMetrics("https://prometheus.example:9090").client._session.verify is True
    insecure = PromMetrics("https://prometheus.example:9090", verify_tls=False)
    assert insecure.client._session.verify is False


def test_the_log_never_shows_the_prometheus_password(caplog: pytest.LogCaptureFixture) -> None:
    url = "https://ops:s3cr%40t@prometheus.example:9090"
    prom = PromMetrics(url)

    def down(query: str, **_: object) -> object:
        raise ConnectionError(f"Max retries exceeded for url: {url}/api/v1/query")

    prom.client.custom_query = down  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="slm_operator.prom"):
        assert prom.task_metrics("weather", 30) is None
    assert caplog.records, "the failure is logged"
    assert "s3cr" not in caplog.text and "ops:" not in caplog.text
    assert "https://prometheus.example:9090/api/v1/query" in caplog.text


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("https://u:p@prom:9090/x?a=b@c", "https://prom:9090/x"),
        ("http://u:p@ss@prom", "http://prom"),  # an unencoded @ in the password
        ("http://prom:9090", "http://prom:9090"),
        ("a http://u@h and https://v:w@k/", "a http://h and https://k/"),
        # A library quoting the netloc without its scheme still shows no password.
        ("connect to ops:s3cret@prom:9090 failed", "connect to ***@prom:9090 failed"),
    ],
)
def test_errors_show_no_credentials(text: str, want: str) -> None:
    url = "https://ops:s3cret@prom:9090"
    assert error_summary(ConnectionError(text), url) == want


def test_the_log_never_shows_a_response_body_that_echoes_the_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An auth proxy answering 401 may quote the ``Authorization`` header it refused (basic
    auth: the password, base64): prometheus_api_client's error carries the whole body, which
    was logged. The log keeps the status and its reason."""
    import base64
    import http.server

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = ("unauthorized: " + self.headers.get("authorization", "")).encode()
            self.send_response(401)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    secret = "sk-TESTSECRET1234567890abcdef"
    try:
        prom = PromMetrics(f"http://admin:{secret}@127.0.0.1:{srv.server_port}", timeout_s=2)
        with caplog.at_level(logging.WARNING, logger="slm_operator.prom"):
            assert prom.task_metrics("weather", 30) is None
    finally:
        srv.shutdown()
        srv.server_close()
    encoded = base64.b64encode(f"admin:{secret}".encode()).decode()
    assert caplog.records, "the failure is logged"
    assert secret not in caplog.text and encoded[:16] not in caplog.text
    assert "HTTP 401 Unauthorized" in caplog.text


@pytest.fixture
def hung_prometheus() -> Iterator[tuple[str, list[socket.socket]]]:
    """A Prometheus that accepts connections and never answers (overloaded, or hung)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", conns
    srv.close()
    for c in conns:
        c.close()


def test_a_hung_prometheus_costs_one_deadline_then_nothing_during_the_cooldown(
    hung_prometheus: tuple[str, list[socket.socket]], caplog: pytest.LogCaptureFixture
) -> None:
    """Every reconcile of a serving task waits for its metrics: a Prometheus that hangs must
    cost at most the deadline, once (no HTTP retries), and then, for every task, nothing
    until the cool-down is over (before: ~26 s per task and reconcile)."""
    url, conns = hung_prometheus
    prom = PromMetrics(url, timeout_s=5.0, deadline_s=1.0, cooldown_s=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="slm_operator.prom"):
        assert prom.task_metrics("weather", 30, namespace="agents") is None
        assert time.monotonic() - started < 2.0
        assert len(conns) == 1
        started = time.monotonic()
        assert prom.task_metrics("other-task", 30, namespace="agents") is None
        assert time.monotonic() - started < 0.1 and len(conns) == 1
    assert len(caplog.records) == 1  # said once, not once per task
    time.sleep(0.6)
    assert prom.task_metrics("weather", 30, namespace="agents") is None
    assert len(conns) == 2  # asked again after the cool-down


def test_each_window_reads_one_scrape_interval_more_than_it_spans() -> None:
    """Windows are judged every windowSeconds or two scrape intervals (plan.metrics_due's
    min_window_s: range_s); each rate reads one scrape interval more, so that consecutive
    windows share their boundary sample and the counter step across it is in one of them
    (reading exactly the span, it was in neither: about half the bursts were never judged).
    Agreement reads the copies not judged yet, the same interval more, in whole milliseconds
    rounded down, the time since agreementSince capped at an hour; a task never judged reads
    one window."""
    prom = PromMetrics("http://prometheus.example:9090", scrape_interval_s=15)
    assert (prom.range_s(5), prom.range_s(45)) == (30, 45)
    assert prom.window(5) == "45s"
    assert prom.window(45) == "60s"
    assert prom.agreement_window(5, None) == "45s"
    assert prom.agreement_window(5, 30.0123456) == "45012ms"
    assert prom.agreement_window(5, 86400) == "3615s"
    assert PromMetrics("http://p:9090", scrape_interval_s=0.5).window(1) == "1500ms"
    asked: list[str] = []

    def answer(query: str, **_: object) -> list[object]:
        asked.append(query)
        return []

    prom.client.custom_query = answer  # type: ignore[method-assign]
    prom.task_metrics("weather", 5, namespace="agents", agreement_since_s=42.5)
    shadow = [q for q in asked if "shadow_total" in q]
    assert shadow and all("[57500ms]" in q for q in shadow)
    assert all("[45s]" in q for q in asked if "shadow_total" not in q and "[" in q)


def test_counts_read_over_the_extra_interval_are_not_inflated() -> None:
    """increase() stretches what the samples in its range show to the whole range: over the
    span plus one scrape interval, a count is (span + scrape) / span too high (a burst of 20
    shadow copies read 40 and counted 40 towards shadowMinSamples). Counts are scaled back;
    rates and ratios need nothing (rate() divides by the span the samples cover)."""
    prom = PromMetrics("http://prometheus.example:9090", scrape_interval_s=15)

    def answer(query: str, **_: object) -> list[object]:
        if "shadow_total" in query and "/" not in query:
            value = "60"  # over 45 s + 15 s: 45 s of copies
        elif "cost_usd" in query:
            value = "0.9"  # over 30 s + 15 s
        else:
            value = "0.5"
        return [{"metric": {}, "value": [1800000000.0, value]}]

    prom.client.custom_query = answer  # type: ignore[method-assign]
    m = prom.task_metrics("weather", 5, namespace="agents", agreement_since_s=45)
    assert m is not None
    assert m.shadow_samples == 45
    assert m.cost_saved_usd == pytest.approx(0.6)
    assert (m.p95_latency_ms, m.error_rate, m.agreement, m.slm_share) == (0.5, 0.5, 0.5, 0.5)
    assert m.request_rate == 0.5
    # A task never judged reads one window (30 s) plus the interval.
    first = prom.task_metrics("weather", 5, namespace="agents")
    assert first is not None and first.shadow_samples == 40


def _scalar_answer(answer: Any) -> float:
    return float(answer[0]["value"][1]) if answer else 0.0


def _serve_gateway_metrics(m: GatewayMetrics, lock: threading.Lock) -> tuple[str, Any]:
    """The gateway's exposition of ``m`` on a free 127.0.0.1 port, as a scrape sees it."""
    import http.server

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Scrape(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                body = generate_latest(m.registry)
            self.send_response(200)
            self.send_header("content-type", CONTENT_TYPE_LATEST)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scrape)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"127.0.0.1:{srv.server_port}", srv


def test_a_real_prometheus_reads_every_burst_between_windows_once(tmp_path: Any) -> None:
    """A real Prometheus scraping the gateway's exposition every 0.5 s; windows judged every
    range_s (1 s), as the operator does. Bursts of 20 disagreeing shadow copies at random
    times: the windows together read as many copies as were made. Reading exactly its span,
    each window missed the step across its boundary (148 of 400 copies read: bursts never
    judged, and those read counted double). Slow SLM calls, once in a while: each is one
    window with a p95 over the SLO, never two (a window shares only its first sample with
    the one before, so it reads only the steps after it) and never none."""
    import random

    from slm_e2e.prometheus import LocalPrometheus

    gw, lock = GatewayMetrics(), threading.Lock()
    with lock:
        gw.expect_slm("agents", "weather")
    target, srv = _serve_gateway_metrics(gw, lock)
    prom_server = LocalPrometheus(tmp_path, {"gateway": [target]}, scrape_interval=0.5).start()
    try:
        prom = PromMetrics(prom_server.url, scrape_interval_s=0.5)
        span = prom.range_s(1)
        scraped = 'count_over_time(slm_gateway_shadow_total{result="disagree"}[10s])'
        deadline = time.monotonic() + 15
        while _scalar_answer(prom.client.custom_query(scraped)) < 4:
            assert time.monotonic() < deadline, "Prometheus scraped nothing"
            time.sleep(0.2)
        rnd = random.Random(7)
        copies, spikes, read, breached = 0, 0, 0, 0
        last = time.monotonic()
        next_burst = last + rnd.uniform(0.2, 0.8)
        next_spike = last + 2.3
        windows = 12
        for k in range(windows + 2):  # two quiet windows at the end read the last bursts
            due = last + span
            while (now := time.monotonic()) < due:
                if k < windows and now >= next_burst:
                    with lock:
                        gw.shadow.labels("agents", "weather", "disagree").inc(20)
                    copies += 20
                    next_burst = now + rnd.uniform(0.4, 1.2)
                if k < windows and now >= next_spike:
                    with lock:
                        for _ in range(20):
                            gw.attempt("agents", "weather", "slm", "ok", 2.0)
                    spikes += 1
                    next_spike = now + 3.1 * span
                time.sleep(0.01)
            m = prom.task_metrics("weather", 1, "agents", agreement_since_s=now - last)
            last = now
            assert m is not None
            read += m.shadow_samples or 0
            breached += bool(m.p95_latency_ms is not None and m.p95_latency_ms > 1000)
    finally:
        prom_server.stop()
        srv.shutdown()
        srv.server_close()
    assert copies >= 200 and spikes >= 3
    assert abs(read - copies) <= 0.1 * copies, (read, copies)
    assert breached == spikes, (breached, spikes)


def _promtool_values(
    series: list[dict[str, str]], names: list[str], above: float | None = None
) -> dict[str, str]:
    """What Prometheus's own engine (promtool) returns for the operator's queries on these
    series: each value as text ("0", "1", "0.5"), "none" when the query returns no sample.
    With ``above``, whether each value is above it ("1" or "0"), as an SLO judges it
    (slm_operator.live.slo_breached)."""
    import shutil
    import subprocess
    import tempfile

    import yaml

    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make setup installs it)"
    q = queries("weather", "30s", "60s", namespace="agents")
    got: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            expr = q[name] if above is None else f"({q[name]}) > bool {above}"
            got[name] = "other"
            for expected in ("none", "0", "1", "0.5"):
                samples = [] if expected == "none" else [{"labels": "{}", "value": float(expected)}]
                test = {
                    "interval": "15s",
                    "input_series": series,
                    "promql_expr_test": [{"expr": expr, "eval_time": "5m", "exp_samples": samples}],
                }
                path = f"{tmp}/t.yaml"
                with open(path, "w") as fh:
                    yaml.safe_dump({"rule_files": [], "tests": [test]}, fh)
                run = subprocess.run([promtool, "test", "rules", path], capture_output=True)
                if run.returncode == 0:
                    got[name] = expected
                    break
    return got


def _series(name: str, labels: str, values: str) -> dict[str, str]:
    return {
        "series": f'slm_gateway_{name}{{namespace="agents",task="weather"{labels}}}',
        "values": values,
    }


def _gateway_slm_latencies(calls: dict[float, int]) -> list[dict[str, str]]:
    """The gateway's own latency bucket series for the SLM when each 15 s scrape adds these
    calls ({latency in seconds: calls}): the bucket layout the operator's p95 is read from."""
    m = GatewayMetrics()
    for seconds, n in calls.items():
        for _ in range(n):
            m.attempt("agents", "weather", "slm", "ok", seconds)
    return [
        _series(
            "backend_duration_seconds_bucket",
            f',backend="slm",le="{s.labels["le"]}"',
            f"0+{s.value:g}x40",
        )
        for family in m.registry.collect()
        for s in family.samples
        if s.name == "slm_gateway_backend_duration_seconds_bucket"
    ]


@pytest.mark.parametrize(
    ("calls", "p95_slo_ms", "breached"),
    [
        ({1.1: 20}, 2000, "0"),
        ({0.55: 20}, 750, "0"),
        ({0.1: 94, 2.4: 6}, 1500, "1"),
    ],
)
def test_the_slo_p95_is_judged_as_the_slm_calls_took(
    calls: dict[float, int], p95_slo_ms: float, breached: str
) -> None:
    """histogram_quantile interpolates inside the bucket the p95 falls in. On the gateway's old
    1 -> 2.5 s bucket an SLM answering every call in 1.1 s read 2425 ms and breached a
    2000 ms SLO (fallback on for good), calls of 0.55 s read 975 ms against 750 ms, and a 6 %
    at 2.4 s behind fast calls read 1250 ms, meeting a 1500 ms SLO it breaks."""
    series = _gateway_slm_latencies(calls)
    got = _promtool_values(series, ["p95_latency_ms"], above=p95_slo_ms)
    assert got == {"p95_latency_ms": breached}


def test_a_canary_that_disagrees_on_every_copy_reads_agreement_zero() -> None:
    """The agree series starts with the first agreeing copy: with none, agreement read "not
    measured", and a canary that disagreed on every copy kept its share of the traffic."""
    disagreeing = [_series("shadow_total", ',result="disagree"', "0+5x40")]
    assert _promtool_values(disagreeing, ["agreement"]) == {"agreement": "0"}
    assert _promtool_values([], ["agreement"]) == {"agreement": "none"}  # no copies: unknown


def test_a_routed_task_no_call_reached_has_request_rate_zero() -> None:
    """A task idle since the gateway started has no requests series: read as no data, it
    never scaled down (minReplicas 0: never to zero). Its route is scraped, so that is 0;
    a gateway not scraped at all still reads as unknown."""
    routed = [_series("route_mode", ',mode="slm"', "1x40")]
    assert _promtool_values(routed, ["request_rate"]) == {"request_rate": "0"}
    assert _promtool_values([], ["request_rate"]) == {"request_rate": "none"}
    # A gateway pod just replaced, already serving: its counter is too new for a rate. Not
    # an idle task (read 0, a busy task scaled down during every gateway rollout).
    replaced = [*routed, _series("requests_total", ',backend="llm"', "_x19 50")]
    assert _promtool_values(replaced, ["request_rate"]) == {"request_rate": "none"}


def test_the_slm_share_is_zero_when_the_llm_answered_every_call() -> None:
    llm_only = [_series("requests_total", ',backend="llm"', "0+5x40")]
    assert _promtool_values(llm_only, ["slm_share"]) == {"slm_share": "0"}


def _vector(value: str, **labels: str) -> dict[str, Any]:
    return {"metric": labels, "value": [1800000000.0, value]}


def test_a_gateway_restarted_in_place_is_a_new_capture_counter() -> None:
    """Same pod, same scrape target, same labels: only the ``_created`` time tells the
    restarted gateway's counter from the old one, so that its count is not read as the old
    one's going down."""
    labels = {"namespace": "agents", "task": "weather", "backend": "llm", "pod": "gw-0"}
    before = counter_readings(
        [_vector("500", __name__="slm_gateway_requests_total", **labels)],
        [_vector("1799990000.5", __name__="slm_gateway_requests_created", **labels)],
    )
    after = counter_readings(
        [_vector("20", **labels)],
        [_vector("1799999000.25", **labels)],
    )
    again = counter_readings([_vector("35", **labels)], [_vector("1799999000.25", **labels)])
    assert before and after and again
    assert list(before.values()) == [CounterReading(500, True)]
    assert before.keys() != after.keys() and after.keys() == again.keys()
    # Without created series, the labels alone are the key, and the reading says so.
    bare = counter_readings([_vector("20", **labels)], [])
    assert bare and list(bare.values()) == [CounterReading(20, False)]
    # Another replica is another series; NaN is no reading; nothing at all is None.
    two = counter_readings([_vector("1", pod="gw-0"), _vector("2", pod="gw-1")], [])
    assert two and sorted(r.value for r in two.values()) == [1, 2]
    assert counter_readings([_vector("NaN", pod="gw-0")], []) is None
    assert counter_readings([], []) is None


def test_an_slm_that_starts_failing_reads_as_failing_in_the_first_window() -> None:
    """The SLM answered every call and agreed on every shadow copy for five minutes; in the
    last scrape interval of the judged window most calls fail and most copies disagree. Series born
    at their first event (no sample before it) were left out of that window by rate(): its
    error rate read 0 and its agreement 1, a healthy window. The gateway's first scrape of a
    route with an SLM has them at 0, so the first window already reads the failures."""
    from test_gateway_metrics import first_scrape

    from slm_gateway.routes import Route

    at_start = first_scrape(
        Route(
            task="weather",
            namespace="agents",
            mode="canary",
            llm_base_url="http://127.0.0.1:9/v1",
            llm_model="gpt-4o",
            slm_endpoint="http://127.0.0.1:9",
        )
    )

    def failures(name: str, labels: str) -> dict[str, str]:
        """A failure series, every 15 s: 0 until t=285 if the gateway's first scrape had it
        (no sample at all if not), then 8 more per scrape from t=300 (the judged one)."""
        want = re.findall(r'(\w+)="([^"]*)"', f'namespace="agents",task="weather"{labels}')
        exported = (f"slm_gateway_{name}", tuple(sorted(want))) in at_start
        return _series(name, labels, f"{'0x19' if exported else '_x20'} 8 16 24")

    # The SLM's own successes, counted since it first answered: +10 a scrape, then +2.
    healthy = "0+10x19 192 194 196"
    inputs = [
        _series("backend_calls_total", ',backend="slm",result="ok"', healthy),
        failures("backend_calls_total", ',backend="slm",result="error"'),
        _series("shadow_total", ',result="agree"', healthy),
        failures("shadow_total", ',result="disagree"'),
    ]
    assert _promtool_values(inputs, ["error_rate"], above=0.05) == {"error_rate": "1"}
    assert _promtool_values(inputs, ["agreement"], above=0.9) == {"agreement": "0"}
