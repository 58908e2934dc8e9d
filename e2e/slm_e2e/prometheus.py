"""A real Prometheus (Debian's package) scraping local targets, for tests and the demo.

It listens on a free 127.0.0.1 port, keeps its TSDB in a temporary directory, scrapes the
given ``host:port`` targets every ``scrape_interval`` seconds, and is stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from slm_e2e.cluster import free_port
from slm_gateway.testing import stop_child


class PrometheusError(RuntimeError):
    pass


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError(
            "the prometheus binary is missing: run 'make setup' (Debian package 'prometheus')"
        )
    return path


class LocalPrometheus:
    """``labels``: job name -> labels added to that job's targets, as a cluster's scrape adds
    them. Why: the operator selects Triton's series by ``namespace`` (the Prometheus
    Operator's target label for the pod's namespace), which Triton does not export; scraped
    without it, a task's queue time is never measured."""

    def __init__(
        self,
        workdir: Path,
        targets: dict[str, list[str]],
        scrape_interval: float = 1.0,
        labels: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.dir = workdir
        self.targets = targets  # job name -> ["127.0.0.1:port", ...]
        self.labels = labels or {}
        self.interval = scrape_interval
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where this start's lines begin in prometheus.log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> dict[str, object]:
        iv = f"{int(self.interval * 1000)}ms"
        return {
            "global": {"scrape_interval": iv, "evaluation_interval": iv, "scrape_timeout": iv},
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": list(t), "labels": self.labels.get(job, {})}],
                }
                for job, t in self.targets.items()
            ],
        }

    def start(self, timeout: float = 30, attempts: int = 3) -> LocalPrometheus:
        """Start on a free port; again on another when that one was taken between
        :func:`free_port` releasing it and Prometheus binding it (a shared machine)."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except PrometheusError as e:
                if "address already in use" not in str(e) or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> LocalPrometheus:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self._config()))
        self.port = free_port()
        log = open(self.dir / "prometheus.log", "ab")  # noqa: SIM115 - handed to the child
        self._log_from = log.tell()
        self.proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.dir,
        )
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:  # a timeout or a Ctrl-C: the caller never gets self to stop()
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                # The log is appended to by every start: only this one's lines count.
                log = (self.dir / "prometheus.log").read_bytes()[self._log_from :]
                said = log.decode(errors="replace")
                raise PrometheusError(f"prometheus exited: {said[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise PrometheusError("prometheus did not become ready")

    def targets_up(self) -> dict[str, bool]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=3) as r:
            data = json.load(r)
        return {t["scrapeUrl"]: t["health"] == "up" for t in data["data"]["activeTargets"]}

    def reload(self, targets: dict[str, list[str]]) -> None:
        self.targets = targets
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(self._config()))
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def stop(self) -> None:
        if self.proc:
            stop_child(self.proc, 15)
