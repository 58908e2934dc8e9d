"""Entry point: ``python -m slm_gateway`` (or the ``slm-gateway`` console script).

Why the socket is bound here rather than by uvicorn: ``--port 0`` lets tests and benchmarks
run many gateways side by side, and the bound port is written to ``--port-file`` before the
server starts, so a caller never guesses a free port and races another process for it.
uvicorn runs with uvloop and httptools (its protocol wrapped so that each answer is one
write, see :mod:`slm_gateway.wire`), without websockets, and without its access log (one log
line per call costs more than the rest of the request path, and would be a place for request
data to leak).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
from collections.abc import Sequence

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

    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
