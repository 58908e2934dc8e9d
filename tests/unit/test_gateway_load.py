"""Capture under load: every call served is written, redacted, and no credential is kept.

A real gateway process (uvicorn, capture workers) in front of the real stand-in, 2000 calls
at concurrency 32 over real HTTP, a third of them streamed (``"stream": true``), then
SIGTERM: after the flush, the JSON lines on disk equal the calls answered 200, none was
dropped, a streamed call's record holds the whole answer its events spelled, and neither the
agent's Authorization header nor the LLM key appears in any record or in the gateway's log.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from slm_contract import CallRecord
from slm_e2e import llm_standin
from slm_gateway.testing import start_gateway

pytestmark = pytest.mark.slow

CALLS = 2000
CONCURRENCY = 32
LLM_KEY = "sk-proj-LLMKEYmustNEVERbeWRITTEN0123456789abcd"
AGENT_TOKEN = "agent-bearer-TOKENmustNEVERbeWRITTEN-5f4e3d2c"


def streamed(i: int) -> bool:
    return i % 3 == 0


def request(i: int) -> bytes:
    return orjson.dumps(
        {
            "stream": streamed(i),
            "model": "weather" if i % 4 else "extract",
            "messages": [
                {"role": "system", "content": "You call tools for the user."},
                {
                    "role": "user",
                    "content": f"Forecast #{i} for Paris, then mail it to user{i % 50}@example.com",
                },
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_forecast",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                        },
                    },
                }
            ],
        }
    )


async def drive(url: str) -> list[int]:
    """Statuses of every call; a streamed call counts as 200 only if its stream ended well."""
    statuses: list[int] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(CALLS):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {AGENT_TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as s:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                async with s.post(url, data=request(i), headers=headers) as resp:
                    body = await resp.read()
                    ok = not streamed(i) or body.endswith(b"data: [DONE]\n\n")
                    statuses.append(resp.status if ok else 599)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


def test_records_written_equal_calls_served_and_hold_no_secret(tmp_path: Path) -> None:
    with llm_standin.start(expect_key=LLM_KEY) as standin:
        routes = tmp_path / "routes.yaml"
        routes.write_text(
            yaml.safe_dump(
                {
                    "tasks": {
                        "weather": {
                            "mode": "llm",
                            "llmBaseURL": standin.llm_base_url,
                            "llmModel": "gpt-4o",
                        },
                        "extract": {
                            "mode": "slm",
                            "llmBaseURL": standin.llm_base_url,
                            "llmModel": "gpt-4o",
                            "slmEndpoint": standin.slm_endpoint,
                        },
                    }
                }
            )
        )
        calls = tmp_path / "calls"
        log = tmp_path / "gateway.log"
        gw = start_gateway(
            [
                "--routes",
                str(routes),
                "--capture",
                str(calls),
                "--capture-shard-mb",
                "0.25",
                "--log-level",
                "debug",
            ],
            env={"SLM_GATEWAY_LLM_API_KEY": LLM_KEY},
            log_path=log,
        )
        try:
            statuses = asyncio.run(drive(gw.url + "/v1/chat/completions"))
            _, metrics = gw.get("/metrics")
        finally:
            # uvicorn re-raises the SIGTERM after its graceful shutdown, hence -15.
            assert gw.stop() in (0, -signal.SIGTERM)
        stats = standin.stats()

    served = statuses.count(200)
    assert served == CALLS, {s: statuses.count(s) for s in set(statuses)}
    assert stats["auth_expected"] == stats["llm_calls"] == CALLS * 3 // 4
    assert stats["auth_other"] == stats["auth_missing"] == stats["slm_auth_seen"] == 0

    shards = sorted(calls.rglob("*.jsonl"))
    assert not list(calls.rglob("*.part")), "every shard is published on shutdown"
    assert len(shards) > 2, "size rotation produced several shards"
    lines = [line for shard in shards for line in shard.read_bytes().splitlines()]
    assert len(lines) == served
    records = [CallRecord.from_json(line.decode()) for line in lines]
    assert {r.request_id for r in records}.__len__() == CALLS
    assert sum(r.backend == "slm" for r in records) == CALLS // 4
    # Streamed or not, a record holds the whole answer: the call of the request's tool.
    assert all(r.response["tool_calls"][0]["function"]["name"] == "get_forecast" for r in records)
    # One record per call, the streamed ones included (each prompt carries its call number).
    numbers = sorted(int(r.messages[1]["content"].split("#")[1].split()[0]) for r in records)
    assert numbers == list(range(CALLS))
    assert all(r.redactions.get("EMAIL_ADDRESS") == 1 for r in records)

    text = b"\n".join(lines) + log.read_bytes()
    for secret in (LLM_KEY, AGENT_TOKEN, "example.com"):
        assert secret.encode() not in text, f"{secret} leaked"
    assert f"capture flushed: {CALLS} written, 0 dropped".encode() in log.read_bytes()
    # labels print sorted (namespace first): match the series by name and label, not spelling
    assert not re.search(
        rb'^slm_gateway_capture_records_total\{[^}]*result="dropped"', metrics, re.M
    )
    assert not re.search(rb"^slm_gateway_capture_dropped_records_total\{", metrics, re.M)
