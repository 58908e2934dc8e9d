"""The helpers that start real servers for tests, benchmarks and the demo clean up after
themselves: every test run starts dozens of them, and each used to leave its temporary
directory (port file, log) in /tmp for good."""

from __future__ import annotations

from pathlib import Path

import yaml

from slm_e2e import llm_standin
from slm_gateway.testing import start_gateway


def test_the_stand_in_removes_its_directory_on_stop() -> None:
    standin = llm_standin.start()
    workdir = standin.workdir
    assert workdir is not None and (workdir / "port").exists()
    standin.stop()
    assert not workdir.exists()
    standin.stop()  # a second stop is harmless


def test_the_gateway_removes_its_directory_and_keeps_its_log_readable(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    task = {"mode": "llm", "llmBaseURL": "http://127.0.0.1:9/v1", "llmModel": "m"}
    routes.write_text(yaml.safe_dump({"tasks": {"t": task}}))
    with start_gateway(["--routes", str(routes)]) as gw:
        workdir = gw.workdir
        assert workdir is not None and gw.log_path.is_relative_to(workdir)
    assert not workdir.exists()
    assert "Uvicorn running" in gw.log() or "Application startup complete" in gw.log()


def test_a_log_the_caller_placed_is_left_where_it_is(tmp_path: Path) -> None:
    log = tmp_path / "standin.log"
    with llm_standin.start(log_path=log) as standin:
        workdir = standin.workdir
    assert workdir is not None and not workdir.exists()
    assert log.exists()
