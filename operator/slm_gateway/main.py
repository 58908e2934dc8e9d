"""Entry point: ``python -m slm_gateway`` (or the ``slm-gateway`` console script).

Why the socket is bound here rather than by uvicorn: ``--port 0`` lets tests and benchmarks
run many gateways side by side, and the bound port is written to ``--port-file`` before the
server starts, so a caller never guesses a free port and races another process for it.
uvicorn runs with uvloop and httptools (its protocol wrapped so that each answer is one
write, see :mod:`slm_gateway.wire`), without websockets, and without its access log (one log
line per call costs more than the rest of the request path, and would be a place for request
data to leak). uvicorn's own lines go through the gateway's handler (:func:`configure_logging`),
so that one stream has one layout, text or JSON.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from slm_gateway.auth import AuthNotConfigured
from slm_gateway.config import GatewayConfig, build_parser, config_from_args


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(cfg: GatewayConfig) -> None:
    """Run the gateway until SIGTERM/SIGINT; capture is flushed before this returns."""
    import uvicorn

    from slm_gateway.app import create_app
    from slm_gateway.wire import OneWriteHttpToolsProtocol

    configure_logging(cfg.log_level, cfg.log_format)
    open_files_limit()
    try:
        app = create_app(cfg)
    except AuthNotConfigured as exc:
        # One line and exit 2, like a bad flag: a setting that cannot work, not a crash.
        build_parser().error(str(exc))
    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as exc:  # in use, not ours to bind, or a host that does not resolve
        # A failure to start, not a bad setting: exit 1. The host is not shown: it may come
        # from SLM_GATEWAY_HOST, and a key pasted into the wrong variable must not be logged.
        why = exc.strerror or type(exc).__name__
        sys.exit(f"slm-gateway: error: cannot listen on --host's address, port {cfg.port}: {why}")
    port = sock.getsockname()[1]
    if cfg.port_file:
        tmp = cfg.port_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(str(port))
        os.replace(tmp, cfg.port_file)
    logging.getLogger("slm_gateway").info("listening on %s:%d", cfg.host, port)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http=OneWriteHttpToolsProtocol,
        ws="none",
        lifespan="on",
        access_log=False,
        # No handlers of uvicorn's own: its loggers propagate to the root's (configure_logging).
        log_config=None,
        log_level=cfg.log_level.lower(),
        server_header=False,
        proxy_headers=False,
        # As given: uvicorn types it int but only hands it to asyncio.timeout, which takes
        # a float; int() cut 0.9 s to 0, cancelling every running call at once.
        timeout_graceful_shutdown=cfg.graceful_timeout_s,  # type: ignore[arg-type]
        backlog=2048,
    )
    # After the Config: it configures uvicorn's loggers.
    logging.getLogger("uvicorn.error").addFilter(_no_cancel_traceback)
    tune_gc()
    uvicorn.Server(config).run(sockets=[sock])


#: The text layout: local time with milliseconds, level, logger (and the worker), message.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s{worker}: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and ``exception`` (its traceback) or ``stack`` when the record has one;
    ``process`` names a capture worker.

    Why these fields only: a log shipper needs no more to index a line, and a record's other
    attributes (its ``args``, or extras a library adds) are never written, so a JSON line
    says no more than the text line would: what the gateway keeps out of its messages (keys,
    request bodies) stays out."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, str] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker:
            doc["process"] = self.worker
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False)


def log_formatter(fmt: str, worker: str = "") -> logging.Formatter:
    """The formatter of ``--log-format`` ``fmt`` (``text`` or ``json``); ``worker`` names the
    process in each line (a capture worker), as its lines share the gateway's stream."""
    if fmt == "json":
        return JsonFormatter(worker)
    return logging.Formatter(TEXT_FORMAT.format(worker=f" [{worker}]" if worker else ""))


def configure_logging(level: str, fmt: str, *, worker: str = "") -> None:
    """Send every record of this process at ``level`` or above to stderr, in ``fmt``.

    The root logger's handler is the only one: uvicorn runs with ``log_config=None``, so its
    loggers have no handler and propagate here (its default configuration gave them a handler
    of their own, ``INFO:     Started server process``, without time or logger), and each
    capture worker calls this at its start (it used to log through Python's bare fallback
    handler: no time, no level, nothing below WARNING)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(fmt, worker))
    # Not forced: where the root logger has a handler already (a test running a worker on a
    # thread, under pytest's log capture) that one stays, as with logging.basicConfig.
    logging.basicConfig(level=level.upper(), handlers=[handler])


def open_files_limit() -> int:
    """Raise the gateway's soft limit of open files to its hard limit, say which it is, and
    return it.

    Why: every agent call holds a socket, and every LLM call another one; with the soft limit
    many container runtimes set (1024), about 500 concurrent calls took them all: agents got
    connection resets, and 502s that opened the LLM's circuit for every task on it. The
    capture workers raised theirs; the process holding the sockets did not. Said once, at
    start, so that a shortage of descriptors can be told apart from a low limit."""
    from slm_gateway.capture import raise_open_files_limit

    before, now = raise_open_files_limit()
    logger = logging.getLogger("slm_gateway")
    if now != before:
        logger.info("open files: soft limit %d (raised from %d)", now, before)
    else:
        logger.info("open files: soft limit %d", now)
    return now


def _no_cancel_traceback(record: logging.LogRecord) -> bool:
    """Drop uvicorn's "Exception in ASGI application" record of a cancelled request.

    Why: uvicorn cancels the requests still running when ``--graceful-timeout-s`` runs out,
    and logs each cancel coming back out of the app with a traceback. A cancel is no failure
    of the gateway: it answered those calls (a 503, or an error event ending a stream) and
    logged one line for each, and uvicorn's own line says how many it cancelled.
    """
    exc = record.exc_info
    cancelled = (
        exc is not None and exc[0] is not None and issubclass(exc[0], asyncio.CancelledError)
    )
    return not (cancelled and str(record.msg).startswith(_UVICORN_APP_FAILED))


#: How uvicorn's HTTP protocols begin the record of an exception out of the app.
_UVICORN_APP_FAILED = "Exception in ASGI application"


def tune_gc() -> None:
    """Everything imported at startup is long-lived: freeze it out of the collector's scans,
    and collect the young generation less often (a request makes a few hundred short-lived
    containers). In an interleaved A/B on the benchmark's BFCL load this cut the gateway's
    CPU per request by about a tenth."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> None:
    serve(config_from_args(argv))


if __name__ == "__main__":
    main()
