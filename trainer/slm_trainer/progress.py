"""Training progress, reported the three ways the fleet watches a trainer pod.

Why one reporter: both training paths (the generative SFT and the closed-label selector) must
say the same thing in the same places, and none of it may ever stop training:

- a JSON line on stdout per update (``{"event": "progress", "step", "total_steps", "loss",
  "percent", "eta_seconds", ...}``) for ``kubectl logs`` and the CLI's readers;
- Prometheus gauges ``slm_trainer_progress_percent`` and ``slm_trainer_loss`` (labelled by
  candidate), served only when ``SLM_TRAINER_METRICS_PORT`` is set, on 127.0.0.1 unless
  ``SLM_TRAINER_METRICS_ADDR`` names another address (``0.0.0.0`` for a scrape from outside);
- in a pod (``POD_NAME`` and ``POD_NAMESPACE`` set and a service-account token mounted), a
  merge-patch of the pod's ``slmfleet.dev/progress`` annotation to the integer percent, which
  the operator reads into the AgentTask's status. The patch goes through the standard library
  (the trainer image carries no Kubernetes client), runs on a background thread, is sent at
  most every ``patch_interval`` seconds and only when the percent changed, and gives up for
  good after a 401/403 (the service account may simply not be allowed to patch its pod).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ANNOTATION = "slmfleet.dev/progress"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
METRICS_PORT_ENV = "SLM_TRAINER_METRICS_PORT"
METRICS_ADDR_ENV = "SLM_TRAINER_METRICS_ADDR"

Emit = Callable[[dict[str, Any]], None]


def _json_loss(loss: float | None) -> float | None:
    """The loss as the progress line says it: rounded, and null when it is NaN or infinite
    (a diverged step); JSON has no such numbers, and ``"loss": NaN`` broke every strict
    reader of the log (the gauge still shows the NaN)."""
    if loss is None or not math.isfinite(float(loss)):
        return None
    return round(float(loss), 6)


_metrics_lock = threading.Lock()
_gauges: tuple[Any, Any] | None = None
_server_port: int | None = None


def gauges() -> tuple[Any, Any]:
    """(percent gauge, loss gauge), registered once per process in the default registry."""
    global _gauges
    with _metrics_lock:
        if _gauges is None:
            from prometheus_client import Gauge

            _gauges = (
                Gauge(
                    "slm_trainer_progress_percent",
                    "Share of training steps done, 0-100",
                    ["candidate"],
                ),
                Gauge("slm_trainer_loss", "Training loss of the last step", ["candidate"]),
            )
        return _gauges


def serve_metrics(env: Mapping[str, str]) -> int | None:
    """Start the metrics endpoint once if the environment asks for one; its port or None."""
    global _server_port
    raw = env.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return None
    with _metrics_lock:
        if _server_port is None:
            from prometheus_client import start_http_server

            addr = env.get(METRICS_ADDR_ENV, "").strip() or "127.0.0.1"
            start_http_server(int(raw), addr=addr)
            _server_port = int(raw)
        return _server_port


class PodAnnotator:
    """Best-effort, rate-limited patches of one annotation on the pod we run in.

    ``api_server`` and ``token_dir`` are overridable for tests; in a pod they come from the
    standard in-cluster environment.
    """

    def __init__(
        self,
        pod: str,
        namespace: str,
        api_server: str,
        token_dir: Path = SERVICE_ACCOUNT_DIR,
        interval: float = 10.0,
        emit: Emit | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.url = f"{api_server.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.token_dir = token_dir
        self.interval = interval
        self.timeout = timeout
        self._emit = emit
        self._cond = threading.Condition()
        self._wanted: str | None = None
        self._sent: str | None = None
        self._last_sent = -float("inf")
        self._closed = False
        self.disabled = False
        self.patches = 0
        self._thread = threading.Thread(target=self._run, name="progress-annotator", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str], emit: Emit | None = None, **kwargs: Any
    ) -> PodAnnotator | None:
        """An annotator when running in a pod with in-cluster credentials, else None."""
        pod, ns = env.get("POD_NAME"), env.get("POD_NAMESPACE")
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        token_dir = kwargs.pop("token_dir", SERVICE_ACCOUNT_DIR)
        if not (pod and ns and host and (token_dir / "token").is_file()):
            return None
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(pod, ns, server, token_dir=token_dir, emit=emit, **kwargs)

    def set(self, value: str, force: bool = False) -> None:
        """Ask for the annotation to become ``value``; sent later by the background thread."""
        with self._cond:
            self._wanted = value
            if force:
                self._last_sent = -float("inf")
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending (final percent) and stop the thread."""
        with self._cond:
            self._closed = True
            self._last_sent = -float("inf")
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.disabled:
                    pending = self._wanted is not None and self._wanted != self._sent
                    wait = self._last_sent + self.interval - time.monotonic()
                    if pending and wait <= 0:
                        break
                    if self._closed and not pending:
                        return
                    self._cond.wait(timeout=max(wait, 0.05) if pending else None)
                if self.disabled:
                    return
                value = self._wanted
                self._last_sent = time.monotonic()
            assert value is not None
            if self._patch(value):
                self._sent = value
            elif self._closed:
                return  # the run is over: do not hold the process up retrying

    def _patch(self, value: str) -> bool:
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: value}}}).encode()
        req = urllib.request.Request(self.url, data=body, method="PATCH")
        req.add_header("Content-Type", "application/merge-patch+json")
        context = None
        try:
            token = (self.token_dir / "token").read_text().strip()
            req.add_header("Authorization", f"Bearer {token}")
            if self.url.startswith("https://"):
                ca = self.token_dir / "ca.crt"
                context = ssl.create_default_context(cafile=str(ca) if ca.is_file() else None)
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                resp.read()
            self.patches += 1
            return True
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403, 404):
                self.disabled = True  # not allowed, or not our pod: retrying cannot help
            self._warn(f"progress annotation patch failed: HTTP {exc.code}")
        except Exception as exc:
            self._warn(f"progress annotation patch failed: {type(exc).__name__}: {exc}")
        return False

    def _warn(self, message: str) -> None:
        if self._emit is not None:
            with contextlib.suppress(Exception):
                self._emit({"event": "warning", "message": message})


class Progress:
    """Step/loss/ETA reporting for one training run; every method swallows its own failures."""

    def __init__(
        self,
        emit: Emit,
        candidate: str,
        total_steps: int,
        stage: str = "finetune",
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        annotator: PodAnnotator | None = None,
        start_step: int = 0,
        offset: int = 0,
        overall_total: int | None = None,
    ) -> None:
        """``offset`` and ``overall_total`` place this run inside a longer one: cross-fitting
        trains K fold models and then the final one, and the percent (lines, gauge, pod
        annotation) is of all their steps, so it rises once from 0 to 100 instead of K+1
        times (the operator showed 100 % after the first fold). Without them the run is the
        whole."""
        self.emit = emit
        self.candidate = candidate or "default"
        self.total_steps = max(1, int(total_steps))
        self.offset = max(0, int(offset))
        self.overall_total = max(self.offset + self.total_steps, int(overall_total or 0))
        self.stage = stage
        self.clock = clock
        env = os.environ if env is None else env
        self._t0 = clock()
        self._start_step = start_step
        self.last: dict[str, Any] | None = None
        self._percent_gauge = self._loss_gauge = None
        try:
            pct, loss = gauges()
            self._percent_gauge = pct.labels(candidate=self.candidate)
            self._loss_gauge = loss.labels(candidate=self.candidate)
            self.metrics_port = serve_metrics(env)
        except Exception as exc:
            self.metrics_port = None
            self._safe_emit({"event": "warning", "message": f"metrics unavailable: {exc}"})
        try:
            self.annotator = annotator or PodAnnotator.from_environment(env, emit=self._safe_emit)
        except Exception as exc:
            self.annotator = None
            self._safe_emit({"event": "warning", "message": f"pod annotation off: {exc}"})

    def _safe_emit(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.emit(event)

    def update(self, step: int, loss: float | None = None, **extra: Any) -> dict[str, Any]:
        """Report that ``step`` of ``total_steps`` is done; returns the event it emitted."""
        step = max(0, min(int(step), self.total_steps))
        overall = self.offset + step
        percent = round(100.0 * overall / self.overall_total, 2)
        done_here = step - self._start_step
        elapsed = self.clock() - self._t0
        eta = None
        if done_here > 0:  # the steps left in all the runs, at this run's pace
            eta = round(elapsed / done_here * (self.overall_total - overall), 1)
        event: dict[str, Any] = {
            "event": "progress",
            "stage": self.stage,
            "candidate": self.candidate,
            "step": step,
            "total_steps": self.total_steps,
            "loss": _json_loss(loss),
            "percent": percent,
            "eta_seconds": eta,
            **extra,
        }
        if self.overall_total != self.total_steps:
            event["overall_step"], event["overall_total_steps"] = overall, self.overall_total
        self.last = event
        self._safe_emit(event)
        try:
            if self._percent_gauge is not None:
                self._percent_gauge.set(percent)
            if self._loss_gauge is not None and loss is not None:
                self._loss_gauge.set(float(loss))
        except Exception:
            pass
        if self.annotator is not None:
            with contextlib.suppress(Exception):
                self.annotator.set(str(int(percent)), force=overall >= self.overall_total)
        return event

    def close(self) -> None:
        """Flush the last annotation; call when the run ends, whatever the outcome."""
        if self.annotator is not None:
            with contextlib.suppress(Exception):
                self.annotator.close()
