"""What the gateway's log says, and in what form, as an on-call engineer or a log shipper reads it.

One gateway stream must have one layout: its own lines, uvicorn's ("Started server process"),
and its capture workers' (which used to go through Python's bare fallback handler: no time,
no level, nothing below WARNING) alike, as text or as one JSON object a line
(``--log-format``). The circuit breaker's lines say why a circuit opened, and an outage of an
hour is not a line per cooldown; a skipped AgentTask is named with its namespace.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from slm_e2e import llm_standin
from slm_gateway.app import Breakers, CircuitKey
from slm_gateway.config import config_from_args
from slm_gateway.kube import AgentTaskWatcher
from slm_gateway.metrics import GatewayMetrics
from slm_gateway.routes import RouteTable
from slm_gateway.testing import start_gateway

KEY = "sk-logging-test-0123456789abcdef"
#: A text line of the gateway: local time with milliseconds, level, logger, message.
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.-]+( \[[\w-]+\])?: "
)


# ---- --log-format -----------------------------------------------------------------------


def test_log_format_comes_from_the_flag_or_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args(["--namespace", "ns"]).log_format == "text"
    assert config_from_args(["--namespace", "ns", "--log-format", "JSON"]).log_format == "json"
    monkeypatch.setenv("SLM_GATEWAY_LOG_FORMAT", "json")
    cfg = config_from_args(["--namespace", "ns", "--capture", "/tmp/calls", "--log-level", "debug"])
    assert cfg.log_format == "json"
    # The capture workers log as the gateway does.
    assert cfg.capture is not None
    assert (cfg.capture.log_format, cfg.capture.log_level) == ("json", "debug")


def test_an_unknown_log_format_is_refused_in_one_line_without_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLM_GATEWAY_LOG_FORMAT", "sk-misplaced-key")
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--namespace", "ns"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--log-format must be one of text, json (SLM_GATEWAY_LOG_FORMAT sets its default)" in err
    assert "sk-misplaced-key" not in err


def _post(url: str, model: str) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_one_gateway_stream_has_one_layout(tmp_path: Path, fmt: str) -> None:
    """A real gateway: its lines, uvicorn's and its capture worker's all in the chosen
    format, with time and level; the worker's failed write an ERROR; no key anywhere."""
    calls = tmp_path / "calls"
    calls.mkdir()
    (calls / "t").write_text("a file where task t's folder would be\n")  # its writes fail
    with llm_standin.start(expect_key=KEY) as standin:
        routes = tmp_path / "routes.yaml"
        routes.write_text(
            yaml.safe_dump(
                {
                    "tasks": {
                        "t": {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "m"},
                        "down": {
                            "mode": "llm",
                            "llmBaseURL": "http://127.0.0.1:9/v1",
                            "llmModel": "m",
                        },
                    }
                }
            )
        )
        args = ["--routes", str(routes), "--capture", str(calls), "--capture-workers", "1"]
        args += ["--breaker-failures", "2", "--breaker-cooldown-s", "0"]
        env = {"SLM_GATEWAY_LLM_API_KEY": KEY, "SLM_GATEWAY_LOG_FORMAT": fmt}  # as the chart
        log = tmp_path / "gateway.log"
        with start_gateway(args, env=env, log_path=log) as gw:
            assert _post(gw.url, "t") == 200
            statuses = [_post(gw.url, "down") for _ in range(6)]
            assert set(statuses) <= {502, 503}, statuses
    text = log.read_text()
    assert KEY not in text
    lines = [line for line in text.splitlines() if line.strip()]
    if fmt == "json":
        docs = [json.loads(line) for line in lines]  # every line is one JSON object
        for doc in docs:
            assert {"timestamp", "level", "logger", "message"} <= set(doc), doc
        said = [(d["level"], d["logger"], d.get("process", ""), d["message"]) for d in docs]
    else:
        for line in lines:
            assert TEXT_LINE.match(line), line
        said = []
        for line in lines:
            m = re.match(r"^\S+ \S+ (\w+) ([\w.-]+)(?: \[([\w-]+)\])?: (.*)$", line)
            assert m is not None, line
            said.append((m[1], m[2], m[3] or "", m[4]))
    assert any(
        lg == "uvicorn.error" and msg.startswith("Started server process") for _, lg, _, msg in said
    ), said
    shard = [s for s in said if "cannot write the shard of t" in s[3]]
    assert shard and shard[0][:3] == ("ERROR", "slm_gateway.capture", "slm-capture-0"), said
    circuit = [msg for _, _, _, msg in said if msg.startswith("circuit for llm backend")]
    assert len(circuit) == 2, circuit
    assert "is now open after 2 failures in a row (last: cannot connect" in circuit[0], circuit
    assert "still open (probe failed: cannot connect" in circuit[1], circuit


# ---- circuit breaker lines ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_circuit_says_why_it_opened_and_a_long_outage_is_not_a_line_per_cooldown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    breakers = Breakers(3, 5.0, GatewayMetrics(), clock=clock)
    url = "http://llm.example/v1/chat/completions"
    key = CircuitKey("team-a", "weather", url)
    where = f"{url} (task team-a/weather)"  # whose circuit: the task's, on that URL
    b = breakers.get("llm", key)
    caplog.set_level(logging.INFO, logger="slm_gateway")
    for _ in range(3):
        assert breakers.allow("llm", key, b, clock.now)
        breakers.record("llm", key, b, False, clock.now, "HTTP 500")
    # An hour of outage: a failed probe every cooldown.
    for _ in range(720):
        clock.now += 5.0
        assert breakers.allow("llm", key, b, clock.now)
        breakers.record("llm", key, b, False, clock.now, "timeout (no answer within 30s)")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        f"circuit for llm backend {where} is now open after 3 failures in a row (last: HTTP 500)"
    )
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert 55 <= len(lines) <= 62, len(lines)  # once a minute, not once per cooldown
    assert lines[1] == (
        f"circuit for llm backend {where} still open (probe failed: timeout (no answer within "
        "30s)); failed probes are logged at most once a minute"
    )
    assert lines[2].endswith(
        "(probe failed: timeout (no answer within 30s); 12 since the last line)"
    )
    # It closes, and the next outage is told as new at once.
    caplog.clear()
    clock.now += 5.0
    assert breakers.allow("llm", key, b, clock.now)
    breakers.record("llm", key, b, True, clock.now)
    for _ in range(3):
        assert breakers.allow("llm", key, b, clock.now)
        breakers.record("llm", key, b, False, clock.now, "cannot connect (Connection refused)")
    clock.now += 5.0
    assert breakers.allow("llm", key, b, clock.now)
    breakers.record("llm", key, b, False, clock.now, "cannot connect (Connection refused)")
    assert [r.getMessage() for r in caplog.records] == [
        f"circuit for llm backend {where} is now closed",
        f"circuit for llm backend {where} is now open after 3 failures in a row "
        "(last: cannot connect (Connection refused))",
        f"circuit for llm backend {where} still open (probe failed: cannot connect (Connection "
        "refused)); failed probes are logged at most once a minute",
    ]


# ---- AgentTasks the gateway skips -----------------------------------------------------------


class _Core:
    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> Any:
        raise ApiException(status=404, reason="Not Found")


class _Custom:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
        return {"items": self.items, "metadata": {"resourceVersion": "1"}}

    list_cluster_custom_object = list_namespaced_custom_object


def test_a_skipped_task_is_named_with_its_namespace_and_its_secret_line_does_not_serve_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = {
        "metadata": {
            "name": "weather",
            "namespace": "team-b",
            "annotations": {"slmfleet.dev/slm-timeout-ms": "2s"},
        },
        "spec": {
            "fallback": {
                "llm": {
                    "baseURL": "http://llm.example:8000/v1",
                    "model": "m",
                    "apiKeySecretRef": {"name": "llm-key"},
                }
            }
        },
    }
    watcher = AgentTaskWatcher(RouteTable(), None)  # every namespace
    caplog.set_level(logging.INFO, logger="slm_gateway")
    watcher._relist(_Custom([task]), _Core())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "AgentTask team-b/weather skipped: annotation slmfleet.dev/slm-timeout-ms must be a "
        "positive number of milliseconds" in warnings
    ), warnings
    secret = [w for w in warnings if w.startswith("Secret team-b/llm-key")]
    assert secret and "served" not in secret[0], secret
