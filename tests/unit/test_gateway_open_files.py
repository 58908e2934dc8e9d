"""The gateway and its limit of open files: each agent call holds a socket, and each LLM call
another one, so about 500 concurrent calls took all 1024 that many container runtimes allow.

What an operator would notice: the gateway raises its own soft limit to the hard one at
start and says so, and a gateway that runs out anyway answers a 503 saying why, instead of
blaming the LLM and opening its circuit for every task that uses it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from starlette.testclient import TestClient

from slm_e2e import llm_standin
from slm_gateway.app import create_app
from slm_gateway.config import GatewayConfig
from slm_gateway.routes import Route, RouteTable
from slm_gateway.testing import start_gateway


def test_the_gateway_raises_its_soft_limit_of_open_files_and_says_so(
    standin: llm_standin.StandIn, tmp_path: Path
) -> None:
    """Only the capture workers raised theirs: the gateway process, which holds the sockets,
    kept the soft limit it was started with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    if low == hard:
        pytest.skip("the hard limit of open files is too low to lower the soft one")
    routes = tmp_path / "routes.yaml"
    task = {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}
    routes.write_text(yaml.safe_dump({"tasks": {"weather": task}}))
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:  # the gateway inherits the low soft limit
        gw = start_gateway(["--routes", str(routes)], log_path=tmp_path / "gw.log")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with gw:
        limits = Path(f"/proc/{gw.proc.pid}/limits").read_text()
    (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
    assert line.split()[3] == line.split()[4]  # soft == hard
    said = [row for row in gw.log().splitlines() if "open files" in row]
    assert len(said) == 1 and f"raised from {low}" in said[0], said


#: Run in a child process: the gateway app, whose process has every free file descriptor
#: taken for five calls; prints what the agent got for them, then for a call made once the
#: descriptors are free again, and the LLM circuit's state.
_OUT_OF_FILES = """
import json, os, resource, sys

import orjson
from starlette.testclient import TestClient

from slm_gateway.app import create_app
from slm_gateway.config import GatewayConfig
from slm_gateway.routes import Route, RouteTable

table = RouteTable()
table.replace_all(
    [Route(task="weather", mode="llm", llm_base_url=sys.argv[1], llm_model="gpt-4o")]
)
app = create_app(GatewayConfig(breaker_failures=2, breaker_cooldown_s=60), table)
body = orjson.dumps(
    {"model": "weather", "messages": [{"role": "user", "content": "Weather in Paris?"}]}
)
with TestClient(app, raise_server_exceptions=False) as c:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        full = [c.post("/v1/chat/completions", content=body) for _ in range(5)]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after = c.post("/v1/chat/completions", content=body)
    scraped = c.get("/metrics").text.splitlines()
    circuit = [line for line in scraped if line.startswith("slm_gateway_circuit_state{")]
    errors = [line for line in scraped if line.startswith("slm_gateway_errors_total{")]
print(
    json.dumps(
        {
            "full": [[r.status_code, r.json(), r.headers.get("retry-after")] for r in full],
            "after": after.status_code,
            "circuit": circuit,
            "errors": errors,
        }
    )
)
"""


def test_a_gateway_out_of_file_descriptors_answers_503_and_keeps_the_llm_circuit_closed(
    standin: llm_standin.StandIn,
) -> None:
    """Five calls that could not open a socket to the LLM: each a 502 ``upstream_error`` and
    a failure of the LLM, so that its circuit opened and every task on that LLM got 503
    ``upstream_unavailable`` for the cooldown, long after the descriptors were free again."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FILES, standin.llm_base_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    for status, answer, retry_after in result["full"]:
        assert status == 503, result["full"]
        assert answer["error"]["code"] == "out_of_file_descriptors"
        assert answer["error"]["type"] == "server_error"
        assert "out of file descriptors" in answer["error"]["message"]
        assert retry_after == "1"
    assert result["after"] == 200
    assert [line.rsplit(" ", 1)[1] for line in result["circuit"]] == ["0.0"]  # closed
    (errors,) = result["errors"]  # counted, once each, and nothing else
    assert 'code="out_of_file_descriptors"' in errors and errors.endswith(" 5.0"), errors
    said = [line for line in done.stderr.splitlines() if "out of file descriptors" in line]
    assert len(said) == 1, done.stderr[-3000:]  # once for the burst, not once per call


# ---- counted and kept off the breakers -------------------------------------------------------
# A connection refused on 127.0.0.1:9 is taken for a shortage of descriptors (the check that
# tells them apart is patched): the gateway's path from the client's error to the agent's
# answer, its metrics and its breakers is the one a real shortage takes (above), without
# taking every descriptor of the test process.

DEAD = "http://127.0.0.1:9"


def _short_of_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    from slm_gateway import httpclient

    monkeypatch.setattr(httpclient, "out_of_file_descriptors", lambda exc: True)


def _client(task: Route, breaker_failures: int = 3) -> TestClient:
    table = RouteTable()
    table.replace_all([task])
    cfg = GatewayConfig(breaker_failures=breaker_failures, breaker_cooldown_s=60)
    return TestClient(create_app(cfg, table), raise_server_exceptions=False)


def _chat(c: TestClient, **extra: Any) -> Any:
    body = {"model": "weather", "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return c.post("/v1/chat/completions", content=orjson.dumps({**body, **extra}))


def _metric(c: TestClient, name: str, **labels: str) -> float:
    total = 0.0
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_503_out_of_file_descriptors_is_counted_once_in_the_errors_metric(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answered, but counted nowhere: an operator alerting on slm_gateway_errors_total saw a
    gateway turning agents away as a healthy one. The 5xx codes already counted where they
    are raised (a dead LLM's 502, its open circuit's 503) are still counted once each."""
    _short_of_descriptors(monkeypatch)
    task = Route(task="weather", mode="llm", llm_base_url=DEAD + "/v1", llm_model="gpt-4o")
    with _client(task, breaker_failures=2) as c:
        short = [_chat(c), _chat(c, stream=True)]
        assert [r.status_code for r in short] == [503, 503]
        assert {r.json()["error"]["code"] for r in short} == {"out_of_file_descriptors"}
        errors = {"namespace": "", "task": "weather", "backend": "llm"}
        assert _metric(c, "slm_gateway_errors_total", code="out_of_file_descriptors") == 2
        assert _metric(c, "slm_gateway_errors_total", **errors) == 2
        monkeypatch.undo()  # the LLM is down, not the gateway short
        codes = [_chat(c).json()["error"]["code"] for _ in range(3)]
        assert codes == ["upstream_error", "upstream_error", "upstream_unavailable"]
        assert _metric(c, "slm_gateway_errors_total", code="upstream_error") == 2
        assert _metric(c, "slm_gateway_errors_total", code="upstream_unavailable") == 1
        assert _metric(c, "slm_gateway_errors_total", **errors) == 5


def test_an_slm_call_short_of_descriptors_falls_back_without_opening_the_slm_circuit(
    standin: llm_standin.StandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The shortage is the gateway's: counted as an SLM failure, three calls opened the SLM's
    circuit and sent its task to the LLM for the cooldown after the descriptors were free
    again, and each call logged an ERROR (the client already says it, once per 10 s)."""
    _short_of_descriptors(monkeypatch)
    task = Route(
        task="weather",
        mode="slm",
        slm_endpoint=DEAD,
        llm_base_url=standin.llm_base_url,
        llm_model="gpt-4o",
    )
    with caplog.at_level(logging.INFO, logger="slm_gateway"), _client(task) as c:
        answers = [_chat(c) for _ in range(6)]  # twice the breaker's threshold
        assert {(r.status_code, r.headers["x-slm-backend"]) for r in answers} == {(200, "llm")}
        assert {r.headers["x-slm-fallback-reason"] for r in answers} == {"slm_error"}
        assert _metric(c, "slm_gateway_circuit_state", backend="slm") == 0  # closed
        assert _metric(c, "slm_gateway_backend_calls_total", backend="slm", result="error") == 6
        assert _metric(c, "slm_gateway_fallbacks_total", reason="slm_error") == 6
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    # The client's warning is shared by both kinds of call: it said "answered 503" while
    # every agent here got a 200 from the LLM.
    (said,) = [
        r.getMessage() for r in caplog.records if "out of file descriptors" in r.getMessage()
    ]
    assert "SLM calls fall back to the LLM" in said, said
    assert "; answered 503" not in said, said
