"""kopf's own API requests (its watches, its Event posts) ride out a long run of 5xx answers.

kopf retries a 5xx or 403 answer only as many times as ``settings.networking.error_backoffs``
has entries (by default 8, about 54 s), then raises; its watch loop does not catch that, so
the watchers died and the operator exited with tracebacks, or hung doing nothing, after a
minute of 503s from a load balancer in front of the API server (control-plane maintenance),
every replica at once. A connection refused for as long was ridden out. These tests run
kopf's real request function against a real HTTP server on 127.0.0.1; only the waits between
attempts are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import aiohttp
import kopf
import pytest
from aiohttp import web
from kopf._cogs.clients import api, errors

from slm_operator.main import API_RETRY_SECONDS, MAX_API_BACKOFF_SECONDS, configure

#: More 503s than kopf's default sequence has retries (8).
UNAVAILABLE_ANSWERS = 30


def _answer_503_then_200(failures: int) -> tuple[web.Application, list[int]]:
    """An API front that answers ``failures`` requests with a Kubernetes 503 Status, then 200."""
    seen: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(1)
        if len(seen) <= failures:
            status = {"kind": "Status", "status": "Failure", "code": 503, "message": "upstream"}
            return web.json_response(status, status=503)
        return web.json_response({"kind": "AgentTaskList", "items": []})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app, seen


async def _get_through(failures: int, settings: kopf.OperatorSettings) -> tuple[Any, int, list]:
    app, seen = _answer_503_then_200(failures)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    try:
        async with aiohttp.ClientSession() as session:
            context = types.SimpleNamespace(
                session=session, server=f"http://127.0.0.1:{port}", add_response=lambda r: None
            )
            real_asyncio = api.asyncio
            api.asyncio = types.SimpleNamespace(sleep=no_wait)  # type: ignore[assignment]
            try:
                response = await api.request(
                    "get",
                    "/apis/slmfleet.dev/v1alpha1/agenttasks",
                    settings=settings,
                    logger=logging.getLogger("test"),
                    context=context,
                )
                async with response:
                    body = await response.json()
            finally:
                api.asyncio = real_asyncio
            return body, len(seen), waits
    finally:
        await runner.cleanup()


def test_kopf_requests_wait_out_a_long_run_of_503s() -> None:
    settings = kopf.OperatorSettings()
    configure(settings)
    body, requests, waits = asyncio.run(_get_through(UNAVAILABLE_ANSWERS, settings))
    assert body["kind"] == "AgentTaskList"
    assert requests == UNAVAILABLE_ANSWERS + 1
    # Backing off as kopf does at first, then never longer than the cap.
    assert waits[:3] == [1, 1, 2] and max(waits) == MAX_API_BACKOFF_SECONDS


def test_kopf_defaults_gave_up_after_a_minute_of_503s() -> None:
    """What the operator's settings change: kopf's default sequence escalates the 503."""
    with pytest.raises(errors.APIServerError):
        asyncio.run(_get_through(UNAVAILABLE_ANSWERS, kopf.OperatorSettings()))


def test_a_lasting_error_still_ends_after_ten_minutes_so_that_kopf_can_fall_back() -> None:
    """kopf falls back only on the error (to the namespaces it was given, on a 403 listing
    namespaces): an endless retry never watched anything with namespace-scoped RBAC."""
    settings = kopf.OperatorSettings()
    configure(settings)
    with pytest.raises(errors.APIServerError):
        asyncio.run(_get_through(10_000, settings))
    waits = list(settings.networking.error_backoffs)  # type: ignore[arg-type]
    assert API_RETRY_SECONDS <= sum(waits) < API_RETRY_SECONDS + MAX_API_BACKOFF_SECONDS
