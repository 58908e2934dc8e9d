"""A local stand-in for the LLM (OpenAI chat completions) and, for benchmarks, a Triton SLM.

Why it exists: tests, the gateway benchmark and the demo need an upstream that answers
deterministically, fast enough not to be the bottleneck, and that can be told to be slow or
to fail, on 127.0.0.1 with no network. It is a bare ASGI app on uvicorn (uvloop, httptools),
started as a subprocess by :func:`start` and stopped by pid.

How it answers a chat completion, in order:

1. a table of known prompts: ``--answers FILE`` (call-log JSONL, one CallRecord per line)
   maps a request's ``messages`` to the recorded ``response``;
2. else, with ``tools``, a call to the first tool with empty arguments ``{}``;
3. else an echo of the last user message.

With ``"stream": true`` the same answer comes as OpenAI's server-sent events: a chunk with
the role, the content (or each tool call's name, then its arguments) in three pieces each,
a chunk with the finish reason, the usage chunk when ``stream_options.include_usage`` is set,
and ``data: [DONE]``.

The same answer comes from ``POST /v2/models/<name>/infer`` (KServe v2, the tensors of
:mod:`slm_contract`), so a gateway in shadow mode sees full agreement unless told otherwise.

Faults, by flag, by ``SLM_STANDIN_*`` environment variable, or live through
``POST /_control`` with a JSON object of the same names: ``llm_latency_ms``,
``llm_error_every`` (every Nth call fails), ``llm_error_status``, ``llm_error_retry_after``
(a ``Retry-After`` value sent with every LLM error, empty: none), ``slm_latency_ms``,
``slm_fail`` (every infer call fails with ``slm_error_status``), ``slm_confidence``,
``slm_defer``, ``slm_different`` (answers that disagree with the LLM's), and for streamed
answers ``llm_stream_delay_ms`` (a pause before each event after the first) and
``llm_stream_cut_after`` (the connection is cut after that many events, 0: never), and
``llm_rejects_stream_options`` (a 400 for any request with ``stream_options``, as servers that
predate the field answer; counted as ``llm_rejected_stream_options``), and
``llm_omits_usage`` (whole answers without ``usage``, as some OpenAI-compatible servers send).
``GET /_stats`` returns call counts, how many infer calls carried any Authorization header
(``slm_auth_seen``, which must stay 0 behind the gateway) and, with ``--expect-key``, how many
chat calls carried exactly that bearer key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

ENV_PREFIX = "SLM_STANDIN_"
_JSON = [(b"content-type", b"application/json")]
SETTINGS: dict[str, Any] = {
    "llm_latency_ms": 0.0,
    "llm_error_every": 0,
    "llm_error_status": 500,
    "llm_error_retry_after": "",
    "slm_latency_ms": 0.0,
    "slm_fail": False,
    "slm_error_status": 500,
    "slm_confidence": 0.9,
    "slm_defer": False,
    "slm_different": False,
    "llm_stream_delay_ms": 0.0,
    "llm_stream_cut_after": 0,
    "llm_rejects_stream_options": False,
    "llm_omits_usage": False,
    "model": "standin-llm",
}


def _key(messages: Any) -> bytes:
    return orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)


def load_answers(path: str | Path) -> dict[bytes, dict[str, Any]]:
    """Prompt → recorded assistant message, from call-log JSONL (bad lines are skipped)."""
    table: dict[bytes, dict[str, Any]] = {}
    with open(path, "rb") as fh:
        for line in fh:
            try:
                rec = orjson.loads(line)
                table[_key(rec["messages"])] = rec["response"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
    return table


class StandInApp:
    """The ASGI app: chat completions, KServe v2 infer, health, control and stats."""

    def __init__(
        self,
        settings: dict[str, Any],
        answers: dict[bytes, dict[str, Any]] | None = None,
        expect_key: str = "",
    ) -> None:
        self.settings = settings
        self.answers = answers or {}
        self.expect = f"Bearer {expect_key}".encode() if expect_key else b""
        self.stats: dict[str, int] = {
            "llm_calls": 0,
            "llm_errors": 0,
            "llm_rejected_stream_options": 0,
            "slm_calls": 0,
            "slm_errors": 0,
            "auth_expected": 0,
            "auth_other": 0,
            "auth_missing": 0,
            "slm_auth_seen": 0,
        }
        self.created = int(time.time())

    def answer(self, messages: Any, tools: Any) -> dict[str, Any]:
        if self.answers:
            found = self.answers.get(_key(messages))
            if found is not None:
                return found
        if isinstance(tools, list) and tools:
            fn = tools[0].get("function", {}) if isinstance(tools[0], dict) else {}
            return {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": str(fn.get("name", "tool")), "arguments": "{}"},
                    }
                ],
            }
        text = ""
        if isinstance(messages, list):
            for m in reversed(messages):
                if isinstance(m, dict) and m.get("role") == "user":
                    c = m.get("content")
                    text = c if isinstance(c, str) else orjson.dumps(c).decode()
                    break
        return {"role": "assistant", "content": f"echo: {text}"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        body = b""
        if method == "POST":
            chunks = []
            while True:
                msg = await receive()
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
        if path.endswith("/chat/completions") and method == "POST":
            status, out = await self.chat(scope, body)
            if isinstance(out, list):
                await self.stream(out, send)
                return
        elif path.startswith("/v2/models/") and path.endswith("/infer") and method == "POST":
            status, out = await self.infer(scope, path, body)
        elif path in ("/health", "/v2/health/ready", "/v2/health/live") or (
            path.startswith("/v2/models/") and path.endswith("/ready")
        ):
            status, out = 200, b"{}"
        elif path == "/v1/models":
            model = self.settings["model"]
            status, out = 200, orjson.dumps({"object": "list", "data": [{"id": model}]})
        elif path == "/_stats":
            status, out = 200, orjson.dumps(self.stats)
        elif path == "/_control" and method == "POST":
            status, out = self.control(body)
        else:
            status, out = 404, b'{"error":{"message":"not found","type":"invalid_request_error"}}'
        headers = _JSON
        retry_after = self.settings["llm_error_retry_after"]
        if status >= 400 and retry_after and path.endswith("/chat/completions"):
            headers = [*_JSON, (b"retry-after", str(retry_after).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    async def chat(self, scope: Scope, body: bytes) -> tuple[int, bytes | list[bytes]]:
        s = self.settings
        self.stats["llm_calls"] += 1
        n = self.stats["llm_calls"]
        if self.expect:
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            key = (
                "auth_missing"
                if auth is None
                else "auth_expected"
                if auth == self.expect
                else "auth_other"
            )
            self.stats[key] += 1
        if s["llm_latency_ms"]:
            await asyncio.sleep(s["llm_latency_ms"] / 1000.0)
        every = s["llm_error_every"]
        if every and n % every == 0:
            self.stats["llm_errors"] += 1
            return s["llm_error_status"], (
                b'{"error":{"message":"injected failure","type":"server_error","code":null}}'
            )
        try:
            req = orjson.loads(body)
            messages, tools = req["messages"], req.get("tools")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return 400, b'{"error":{"message":"bad request","type":"invalid_request_error"}}'
        if s["llm_rejects_stream_options"] and "stream_options" in req:
            self.stats["llm_rejected_stream_options"] += 1
            return 400, orjson.dumps(
                {
                    "error": {
                        "message": "Unrecognized request argument supplied: stream_options",
                        "type": "invalid_request_error",
                        "param": "stream_options",
                        "code": None,
                    }
                }
            )
        message = self.answer(messages, tools)
        prompt = max(1, len(body) // 4)
        completion = max(1, len(orjson.dumps(message)) // 4)
        if req.get("stream") is True:
            options = req.get("stream_options") or {}
            usage = {"prompt_tokens": prompt, "completion_tokens": completion}
            usage["total_tokens"] = prompt + completion
            return 200, stream_events(
                message,
                completion_id=f"chatcmpl-standin-{n}",
                created=self.created,
                model=req.get("model") or s["model"],
                usage=usage if options.get("include_usage") else None,
            )
        whole: dict[str, Any] = {
            "id": f"chatcmpl-standin-{n}",
            "object": "chat.completion",
            "created": self.created,
            "model": req.get("model") or s["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                }
            ],
        }
        if not s["llm_omits_usage"]:
            whole["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return 200, orjson.dumps(whole)

    async def stream(self, events: list[bytes], send: Send) -> None:
        """Send events one by one, pausing and cutting off as the fault settings say."""
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        cut = int(self.settings["llm_stream_cut_after"])
        delay = float(self.settings["llm_stream_delay_ms"]) / 1000.0
        for i, event in enumerate(events):
            if cut and i >= cut:
                # An exception after the response started: uvicorn drops the connection
                # without ending the chunked body, as a crashed LLM server would.
                raise ConnectionAbortedError("stand-in cut the stream (llm_stream_cut_after)")
            if delay and i:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def infer(self, scope: Scope, path: str, body: bytes) -> tuple[int, bytes]:
        s = self.settings
        self.stats["slm_calls"] += 1
        if any(k == b"authorization" for k, _ in scope["headers"]):
            self.stats["slm_auth_seen"] += 1
        if s["slm_latency_ms"]:
            await asyncio.sleep(s["slm_latency_ms"] / 1000.0)
        if s["slm_fail"]:
            self.stats["slm_errors"] += 1
            return s["slm_error_status"], b'{"error":"injected failure"}'
        try:
            req = orjson.loads(body)
            tensor = next(i for i in req["inputs"] if i["name"] == "REQUEST")
            inner = orjson.loads(tensor["data"][0])
        except (orjson.JSONDecodeError, KeyError, TypeError, StopIteration, IndexError):
            return 400, b'{"error":"malformed infer request"}'
        if s["slm_defer"]:
            answer: dict[str, Any] = {"defer": True}
        elif s["slm_different"]:
            answer = {"role": "assistant", "content": "a different answer"}
        else:
            answer = self.answer(inner.get("messages"), inner.get("tools"))
        model = path[len("/v2/models/") : -len("/infer")]
        return 200, orjson.dumps(
            {
                "model_name": model,
                "outputs": [
                    {
                        "name": "RESPONSE",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [orjson.dumps(answer).decode()],
                    },
                    {
                        "name": "CONFIDENCE",
                        "datatype": "FP32",
                        "shape": [1],
                        "data": [float(s["slm_confidence"])],
                    },
                ],
            }
        )

    def control(self, body: bytes) -> tuple[int, bytes]:
        try:
            changes = orjson.loads(body)
            if not isinstance(changes, dict):
                raise TypeError
        except (orjson.JSONDecodeError, TypeError):
            return 400, b'{"error":"control body must be a JSON object"}'
        unknown = sorted(set(changes) - set(self.settings) - {"reset_stats"})
        if unknown:
            return 400, orjson.dumps({"error": f"unknown settings: {unknown}"})
        if changes.pop("reset_stats", False):
            for k in self.stats:
                self.stats[k] = 0
        self.settings.update(changes)
        return 200, orjson.dumps(self.settings)


def _pieces(text: str, n: int = 3) -> list[str]:
    """``text`` cut into ``n`` pieces (fewer when it is shorter), as a model streams it."""
    step = max(1, -(-len(text) // n))
    return [text[i : i + step] for i in range(0, len(text), step)] or [""]


def stream_events(
    message: dict[str, Any],
    *,
    completion_id: str,
    created: int,
    model: str,
    usage: dict[str, Any] | None,
) -> list[bytes]:
    """An answer as the events an OpenAI streaming server sends for it, one per list item."""
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
    head["model"] = model

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    events = [event({"role": "assistant", "content": None if message.get("tool_calls") else ""})]
    calls = message.get("tool_calls") or []
    for i, call in enumerate(calls):
        fn = call.get("function", {})
        first = {"index": i, "id": call.get("id"), "type": "function"}
        events.append(event({"tool_calls": [{**first, "function": {"name": fn.get("name")}}]}))
        for piece in _pieces(str(fn.get("arguments", ""))):
            args = {"index": i, "function": {"arguments": piece}}
            events.append(event({"tool_calls": [args]}))
    if not calls:
        content = message.get("content")
        for piece in _pieces(content if isinstance(content, str) else ""):
            events.append(event({"content": piece}))
    events.append(event({}, "tool_calls" if calls else "stop"))
    if usage is not None:
        events.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _settings_from(args: argparse.Namespace) -> dict[str, Any]:
    out = dict(SETTINGS)
    for name, default in SETTINGS.items():
        value = getattr(args, name)
        out[name] = type(default)(value) if value is not None else default
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-standin", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--port-file", default="", help="write the bound port here")
    p.add_argument("--answers", default=os.environ.get(ENV_PREFIX + "ANSWERS", ""))
    p.add_argument("--expect-key", default=os.environ.get(ENV_PREFIX + "EXPECT_KEY", ""))
    for name, default in SETTINGS.items():
        env = os.environ.get(ENV_PREFIX + name.upper())
        if isinstance(default, bool):
            p.add_argument(
                "--" + name.replace("_", "-"),
                action="store_true",
                default=env in ("1", "true") if env is not None else None,
            )
        else:
            p.add_argument(
                "--" + name.replace("_", "-"),
                type=type(default),
                default=type(default)(env) if env is not None else None,
            )
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    answers = load_answers(args.answers) if args.answers else None
    app = StandInApp(_settings_from(args), answers, args.expect_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    port = sock.getsockname()[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        Path(tmp).write_text(str(port))
        os.replace(tmp, args.port_file)
    print(f"llm-standin listening on http://{args.host}:{port}", flush=True)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        backlog=2048,
    )
    uvicorn.Server(config).run(sockets=[sock])


# ---- the helper tests and benchmarks use --------------------------------------------------


@dataclass
class StandIn:
    """A running stand-in process; ``url`` is its base, ``llm_base_url`` the OpenAI base."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    # start()'s temporary directory (port file, default log): stop() removes it
    workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def llm_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def slm_endpoint(self) -> str:
        return self.url

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.url + path,
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())

    def control(self, **settings: Any) -> dict[str, Any]:
        """Change fault settings live, e.g. ``control(slm_fail=True)``."""
        result: dict[str, Any] = self._post("/_control", settings)
        return result

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as resp:
            result: dict[str, int] = orjson.loads(resp.read())
            return result

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        from slm_gateway.testing import stop_child

        stop_child(self.proc, 10)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    *,
    answers: str | Path | None = None,
    expect_key: str = "",
    log_path: str | Path | None = None,
    timeout: float = 30.0,
    python: str | None = None,
    **settings: Any,
) -> StandIn:
    """Start a stand-in on a free 127.0.0.1 port and wait until it answers."""
    # here, not at the top: the stand-in process itself runs this module and needs none of it
    from slm_gateway.testing import await_ready

    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown stand-in settings: {sorted(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="llm-standin-"))
    port_file = workdir / "port"
    log = Path(log_path) if log_path else workdir / "standin.log"
    cmd = [python or sys.executable, "-m", "slm_e2e.llm_standin", "--port-file", str(port_file)]
    if answers:
        cmd += ["--answers", str(answers)]
    if expect_key:
        cmd += ["--expect-key", expect_key]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(SETTINGS[name], bool):
            if value:
                cmd.append(flag)
        else:
            cmd += [flag, str(value)]
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def ready(port: int) -> bool:
        try:
            StandIn(proc, port, log).stats()
            return True
        except OSError:
            return False

    port = await_ready(proc, port_file, log, workdir, ready, "stand-in", timeout)
    return StandIn(proc, port, log, workdir)


if __name__ == "__main__":
    main()
