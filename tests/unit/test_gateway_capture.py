"""Capture (S1): shard rotation, redaction in worker processes, flush on close, drop counting."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from slm_contract import CallRecord
from slm_gateway import capture
from slm_gateway.capture import (
    CaptureConfig,
    Captured,
    CaptureSink,
    ShardWriter,
    capture_line,
    restart_backoff,
    shard_name,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def shards(root: Path, pattern: str = "*.jsonl") -> list[Path]:
    return sorted(root.rglob(pattern))


def test_rotates_by_size_and_publishes_complete_shards_only(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 0, max_bytes=100, max_seconds=3600, clock=Clock())
    w.write("weather", [b"x" * 60 + b"\n"])
    assert shards(tmp_path) == []  # still .part: invisible to the trainer
    assert len(shards(tmp_path, "*.jsonl.part")) == 1
    w.write("weather", [b"y" * 60 + b"\n"])  # crosses 100 bytes: rotated
    assert len(shards(tmp_path)) == 1
    w.write("weather", [b"z\n"])
    w.close_all()
    done = shards(tmp_path)
    assert len(done) == 2 and shards(tmp_path, "*.part") == []
    assert [p.read_bytes().count(b"\n") for p in done] == [2, 1]
    assert done == sorted(done, key=lambda p: p.name)  # name order is write order


def test_rotates_by_age_per_task(tmp_path: Path) -> None:
    clock = Clock()
    w = ShardWriter(tmp_path, 0, max_bytes=1 << 20, max_seconds=60, clock=clock)
    w.write("a", [b"1\n"])
    clock.now += 30
    w.write("b", [b"2\n"])
    assert w.next_deadline() == pytest.approx(30)
    clock.now += 31
    w.rotate_expired()
    assert [p.parent.name for p in shards(tmp_path)] == ["a"]
    clock.now += 30
    w.rotate_expired()
    assert sorted(p.parent.name for p in shards(tmp_path)) == ["a", "b"]


def test_publish_hook_receives_each_finished_shard(tmp_path: Path) -> None:
    published: list[str] = []
    w = ShardWriter(
        tmp_path, 3, 1 << 20, 60, publish=lambda p, rel: published.append(rel), clock=Clock()
    )
    w.write("ns/task", [b"{}\n"])
    w.close_all()
    assert len(published) == 1
    assert published[0].startswith("ns/task/calls-") and published[0].endswith("-w3-000001.jsonl")


REQ = orjson.dumps(
    {
        "model": "weather",
        "api_key": "sk-proj-THISISNOTCAPTURED0000000000000000",
        "messages": [
            {"role": "system", "content": "Pick tools."},
            {"role": "user", "content": "Weather for jane.doe@example.com in Paris?"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
    }
)
RESP = orjson.dumps(
    {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                }
            }
        ]
    }
)


def item(i: int, key: str = "weather", request: bytes = REQ) -> Captured:
    return Captured(
        key, "weather", "gpt-4o", "llm", request, RESP, 12.5, 30, 10, time.time(), f"r{i}", ""
    )


def test_records_are_redacted_written_and_flushed_on_close(tmp_path: Path) -> None:
    dropped: list[tuple[str, int, str]] = []
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path / "calls"), workers=2, batch_size=16),
        on_dropped=lambda k, n, reason: dropped.append((k, n, reason)),
    )
    sink.start()
    for i in range(300):
        assert sink.submit(item(i, key="weather" if i % 3 else "ns/extract"))
    sink.submit(item(999, request=b"not json"))  # cannot be redacted: dropped, never written
    # Redacted, but nested deeper than orjson writes: dropped as such, not as a redaction
    # failure, which would send whoever reads the alert to the redactor.
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    nested = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi", "x": deep}]})
    sink.submit(item(998, request=nested.encode()))
    stats = sink.close()
    assert (stats.submitted, stats.written, stats.dropped) == (302, 300, 2)
    assert sorted(dropped) == [
        ("weather", 1, capture.DROP_ENCODE),
        ("weather", 1, capture.DROP_REDACTION),
    ]
    assert stats.redacted == 300 and stats.redactions["EMAIL_ADDRESS"] == 300
    files = shards(tmp_path / "calls")
    assert shards(tmp_path, "*.part") == []
    lines = [line for f in files for line in f.read_bytes().splitlines()]
    assert len(lines) == 300
    assert {f.parent.relative_to(tmp_path / "calls").as_posix() for f in files} == {
        "weather",
        "ns/extract",
    }
    text = b"\n".join(lines)
    assert b"jane.doe@example.com" not in text and b"THISISNOTCAPTURED" not in text
    rec = CallRecord.from_json(lines[0].decode())
    assert rec.messages[1]["content"] == "Weather for <EMAIL_ADDRESS_1> in Paris?"
    assert rec.redactions == {"EMAIL_ADDRESS": 1}
    assert rec.response["tool_calls"][0]["function"]["name"] == "get_weather"
    assert (rec.backend, rec.model, rec.latency_ms, rec.prompt_tokens) == (
        "llm",
        "gpt-4o",
        12.5,
        30,
    )


@pytest.mark.parametrize(
    "messages, answer",
    [
        (
            [{"role": "user", "content": "Weather in Paris?"}],
            {"role": "assistant", "content": "Sun."},
        ),
        (  # PII in the prompt and the arguments, a placeholder from an earlier pass, a history
            [
                {"role": "system", "content": "Reply to <EMAIL_ADDRESS_1> only."},
                {"role": "user", "content": "Mail bob@example.org, card 4111 1111 1111 1111"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"api_key": "s3cr3t-v@lue!"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "a", "content": '{"ip": "10.1.2.3"}'},
            ],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "b",
                        "type": "function",
                        "function": {"name": "send", "arguments": '{"to": "bob@example.org"}'},
                    }
                ],
            },
        ),
    ],
)
def test_a_captured_line_is_the_contracts_record(
    messages: list[dict[str, object]], answer: dict[str, object]
) -> None:
    """The worker builds the line without a CallRecord (for speed); what the trainer reads
    must still be exactly what ``redact_record`` + ``CallRecord.to_json`` give."""
    from slm_trainer.redact import default_redactor

    redactor = default_redactor()
    tools = [{"type": "function", "function": {"name": "send", "parameters": {}}}]
    request = orjson.dumps({"model": "t", "messages": messages, "tools": tools, "user": "x"})
    response = orjson.dumps({"id": "r", "choices": [{"index": 0, "message": answer}]})
    captured = Captured(
        "ns/t", "t", "gpt-4o", "llm", request, response, 1.23456, 7, 3, 5.0, "r", ""
    )
    line, counts = capture_line(captured, redactor)
    expected, expected_counts = redactor.redact_record(
        CallRecord(
            task="t",
            messages=messages,
            response=answer,
            backend="llm",
            model="gpt-4o",
            tools=tools,
            latency_ms=1.235,
            prompt_tokens=7,
            completion_tokens=3,
            timestamp=5.0,
            request_id="r",
        )
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == orjson.loads(expected.to_json())
    assert list(orjson.loads(line)) == list(orjson.loads(expected.to_json()))  # field order
    assert counts == expected_counts


@pytest.mark.parametrize(
    ("encode", "tools"),
    [
        (lambda body: json.dumps(body).encode(), "as sent"),  # Python's ", " and ": "
        (lambda body: json.dumps(body, indent=2).encode(), "as sent"),  # line breaks
        (lambda body: orjson.dumps(body), "as sent"),
        (lambda body: orjson.dumps({**body, "tools": None}), []),
        (lambda body: orjson.dumps({k: v for k, v in body.items() if k != "tools"}), []),
        (lambda body: orjson.dumps({**body, "tools": []}), []),
    ],
)
def test_the_tools_are_written_as_the_agent_sent_them_on_one_line(encode: Any, tools: Any) -> None:
    """The worker copies the request's tools into the line without decoding them (they are
    most of the request, and never redacted); whatever the agent's formatting, the record is
    one JSON line whose tools are the agent's, and a request without tools has []."""
    from slm_trainer.redact import default_redactor

    sent = [
        {
            "type": "function",
            "function": {
                "name": "send",
                "description": "Send a note.\nOne line per recipient.",
                "parameters": {"type": "object", "properties": {"to": {"type": "string"}}},
            },
        }
    ]
    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "tools": sent}
    response = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]})
    captured = Captured("ns/t", "t", "gpt", "llm", encode(body), response, 1.0, 1, 1, 5.0, "", "")
    line, _ = capture_line(captured, default_redactor())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = CallRecord.from_dict(orjson.loads(line))
    assert record.tools == (sent if tools == "as sent" else tools)
    assert record.messages == body["messages"]


_FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "object"}}]
_TOOLS = [{"type": "function", "function": _FUNCTIONS[0]}]
_ALLOWED = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": _TOOLS}}


@pytest.mark.parametrize(
    ("extra", "marked"),
    [
        ({"tools": _TOOLS}, False),
        ({"tools": _TOOLS, "tool_choice": "none"}, True),
        ({"tools": _TOOLS, "tool_choice": _ALLOWED}, True),
        ({"n": 2}, True),
        ({"logprobs": True}, True),
        ({"response_format": {"type": "json_object"}}, True),
        ({"response_format": {"type": "text"}}, False),
        ({"tools": [{"type": "function", "function": {**_FUNCTIONS[0], "strict": True}}]}, True),
        # the legacy form alone is trained on: capture writes it as a tools call on purpose
        ({"functions": _FUNCTIONS}, False),
        ({"functions": _FUNCTIONS, "function_call": {"name": "get_weather"}}, False),
        ({"functions": _FUNCTIONS, "function_call": "none"}, True),
        ({"functions": [{**_FUNCTIONS[0], "strict": True}]}, True),
    ],
)
def test_a_call_no_slm_is_sent_is_marked_in_its_record(extra: Any, marked: bool) -> None:
    """n, logprobs, response_format and tool_choice are not in the record, so curate
    trained on calls the gateway never sends to an SLM (the text answer tool_choice "none"
    forced, with tools offered, as if the LLM had chosen text). The mark is the gateway's
    own decision, the legacy form aside; the line is still CallRecord.to_json's."""
    from slm_gateway.decide import slm_can_serve
    from slm_gateway.validate import parse_chat_request
    from slm_trainer.redact import default_redactor

    messages = [{"role": "user", "content": "hi"}]
    body = parse_chat_request(orjson.dumps({"model": "t", "messages": messages, **extra})).body
    assert capture.llm_only_call(body) is marked
    if "functions" not in extra:
        assert marked is not slm_can_serve(body)
    answer = {"role": "assistant", "content": "ok"}
    response = orjson.dumps({"choices": [{"message": answer}]})
    captured = Captured(
        "ns/t",
        "t",
        "gpt",
        "llm",
        orjson.dumps(body),
        response,
        1.0,
        1,
        1,
        5.0,
        "r",
        "",
        capture.llm_only_call(body),
    )
    line, _ = capture_line(captured, default_redactor())
    record = CallRecord.from_json(line.decode())
    assert record.llm_only is marked
    assert line == record.to_json().encode() + b"\n"


@pytest.mark.parametrize("tools", [None, [], "[ ]"], ids=["no-tools", "empty-tools", "spaced"])
def test_a_legacy_functions_call_is_recorded_in_the_tools_form(tools: Any) -> None:
    """Recorded as it came, a ``functions`` call had no tools and an answer without a tool
    call: the trainer learned that the LLM answered it in text, and a selector learned to
    hand back the very calls that chose a function. With ``"tools": []`` beside the
    functions it was recorded with the tool call but no tools at all."""
    from slm_trainer import metrics
    from slm_trainer.redact import default_redactor

    functions = [{"name": "get_weather", "parameters": {"type": "object"}}]
    body: dict[str, Any] = {
        "model": "t",
        "messages": [{"role": "user", "content": "hi"}],
        "functions": functions,
    }
    if tools is not None:
        body["tools"] = [] if tools == "[ ]" else tools
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    answer = {"role": "assistant", "content": None, "function_call": call}
    response = orjson.dumps({"choices": [{"message": answer}]})
    request = orjson.dumps(body)
    if tools == "[ ]":
        request = request.replace(b'"tools":[]', b'"tools":[ ]')
    captured = Captured("ns/t", "t", "gpt", "llm", request, response, 1.0, 1, 1, 5.0, "", "")
    record = CallRecord.from_dict(orjson.loads(capture_line(captured, default_redactor())[0]))
    assert record.tools == [{"type": "function", "function": functions[0]}]
    assert "function_call" not in record.response
    assert metrics.tool_calls(record.response) == [("get_weather", {"city": "Paris"})]
    assert metrics.tool_label(record.response) == "get_weather"


def test_a_number_wider_than_64_bits_is_written_as_the_gateway_read_it() -> None:
    """The gateway decodes requests with orjson, which reads an integer wider than 64 bits
    as a float; the worker must read the messages the same way, or it cannot write the
    record and drops it (it did, with msgspec decoding them)."""
    from slm_trainer.redact import default_redactor

    request = (
        b'{"model":"t","messages":[{"role":"user","content":"hi",'
        b'"metadata":{"trace_id":123456789012345678901234567890}}]}'
    )
    response = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]})
    captured = Captured("ns/t", "t", "gpt", "llm", request, response, 1.0, 1, 1, 5.0, "", "")
    line, _ = capture_line(captured, default_redactor())
    record = orjson.loads(line)
    assert record["messages"][0]["metadata"] == {"trace_id": 1.2345678901234568e29}
    assert record["tools"] == []


def test_an_integer_wider_than_64_bits_in_the_tools_is_written_as_the_gateway_serves_it() -> None:
    """The tools were copied into the line as the agent wrote them, so the trainer read a
    schema's ``maximum`` of 2**64 as an integer, while the gateway (orjson) reads it, and
    serves it to the SLM, as a float: the model was trained on another prompt than the one it
    is served. A 19-digit run in a string is kept as it is either way."""
    from slm_trainer.redact import default_redactor

    schema = (
        b'{"type":"object","properties":{"n":{"type":"integer","maximum":18446744073709551616,'
        b'"minimum":-9223372036854775809,"description":"an id like 1234567890123456789"}}}'
    )
    request = (
        b'{"model":"t","messages":[{"role":"user","content":"pick"}],"tools":[{"type":"function",'
        b'"function":{"name":"pick","parameters":' + schema + b"}}]}"
    )
    response = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]})
    captured = Captured("ns/t", "t", "gpt", "llm", request, response, 1.0, 1, 1, 5.0, "", "")
    record = CallRecord.from_json(capture_line(captured, default_redactor())[0].decode())
    served = orjson.loads(request)["tools"]
    # as the chat format renders them: 1.8446744073709552e+19, never 18446744073709551616
    assert json.dumps(record.tools) == json.dumps(served)
    n = record.tools[0]["function"]["parameters"]["properties"]["n"]
    assert n["description"] == "an id like 1234567890123456789"


def test_close_keeps_its_deadline_when_a_worker_is_stalled(tmp_path: Path) -> None:
    """A worker that stops reading (a hung upload, an NFS stall) filled its pipe, and close()
    blocked sending it the stop signal, past its deadline, until the kubelet's SIGKILL: the
    records it held and the queue were lost without a count."""
    import signal
    import threading

    big = orjson.dumps(
        {
            "model": "weather",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [
                {"type": "function", "function": {"name": "f", "description": "d" * 100_000}}
            ],
        }
    )
    reasons: Counter[str] = Counter()
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), batch_size=8),
        on_dropped=lambda k, n, reason: reasons.update({reason: n}),
    )
    sink.start()
    pid = sink._workers[0].proc.pid
    assert sink.submit(item(0))
    deadline = time.monotonic() + 60
    while sink.stats.written < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGSTOP)  # the worker stalls with its pipe filling up
    try:
        for i in range(1, 60):
            assert sink.submit(item(i, request=big))
        time.sleep(1.0)
        closer = threading.Thread(target=sink.close, kwargs={"timeout": 2.0}, daemon=True)
        started = time.monotonic()
        closer.start()
        closer.join(20.0)
        assert not closer.is_alive() and time.monotonic() - started < 15
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stats = sink.stats
    assert stats.written + stats.dropped == stats.submitted == 60 and stats.pending == 0
    assert reasons == {capture.DROP_SHUTDOWN: stats.dropped}  # the killed worker's included


def test_close_at_its_deadline_counts_each_queued_record_once(tmp_path: Path) -> None:
    """With a stalled worker, close() kills it at its deadline; the pump, stuck in a send to
    it, then goes on draining the queue. close() drained it beside the pump, and a batch the
    pump had taken but not yet counted was counted twice (more dropped than submitted, the
    rest under a made-up "_shutdown" task)."""
    import signal

    by_key: Counter[str] = Counter()
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), batch_size=16, queue_size=100_000, queue_bytes=1 << 30),
        on_dropped=lambda k, n, reason: by_key.update({k: n}),
    )
    sink.start()
    pid = sink._workers[0].proc.pid or 0
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(30_000):
            sink.submit(item(i))
        time.sleep(0.5)  # the pump fills the pipe and blocks in a send
        stats = sink.close(timeout=1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert (stats.submitted, stats.written, stats.dropped, stats.pending) == (30_000, 0, 30_000, 0)
    assert by_key == {"weather": 30_000}


def test_a_full_queue_drops_counts_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each drop is counted; the log says so too, once per interval and not once per record
    (a full queue drops thousands a second)."""
    dropped: list[tuple[str, int, str]] = []
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), queue_size=2),
        on_dropped=lambda k, n, reason: dropped.append((k, n, reason)),
    )  # not started: nothing drains the queue
    with caplog.at_level("WARNING", logger="slm_gateway.capture"):
        results = [sink.submit(item(i)) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert sink.stats.dropped == 3 and dropped == [("weather", 1, capture.DROP_QUEUE_FULL)] * 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1 record(s) dropped: the workers cannot keep up" in warnings[0]
    sink._full_logged_at -= capture.FULL_LOG_INTERVAL_S  # the interval has passed
    with caplog.at_level("WARNING", logger="slm_gateway.capture"):
        sink.submit(item(9))
    assert "3 record(s) dropped" in caplog.records[-1].getMessage()  # the two silent ones too


@pytest.mark.slow
def test_shards_left_by_a_worker_killed_at_close_are_counted_upload_pending(
    tmp_path: Path,
) -> None:
    """An object store that accepts connections and never answers: the upload hangs, close()
    kills the worker at its deadline, and the shards in its spool (which goes with the pod)
    stayed counted as written, with no loss reported. They are upload_pending now."""
    pytest.importorskip("fsspec")
    server, port = _hanging_store()
    dropped: Counter[str] = Counter()
    sink = CaptureSink(
        CaptureConfig(target=f"ftp://127.0.0.1:{port}/calls", spool=str(tmp_path / "spool")),
        on_dropped=lambda key, n, reason: dropped.update({reason: n}),
    )
    sink.start()
    try:
        for i in range(20):
            sink.submit(item(i))
        deadline = time.monotonic() + 30
        while sink.stats.written < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.stats.written == 20
    finally:
        stats = sink.close(timeout=3)
        server.close()
    assert stats.unsent == 20 and dropped == {"upload_pending": 20}
    assert sum(f.read_bytes().count(b"\n") for f in shards(tmp_path / "spool")) == 20


def test_an_upload_cut_short_leaves_no_torn_shard_where_the_trainer_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put to the final name was readable while it ran on a filesystem that is no object
    store (local, NFS, sftp...), and one cut short (the writer killed mid-upload) stayed there:
    a *.jsonl with a torn last line. It is now written as .part and renamed when whole."""
    pytest.importorskip("fsspec")
    from fsspec.implementations.local import LocalFileSystem

    from slm_gateway.capture import _fsspec_publisher

    remote = tmp_path / "bucket"
    local = tmp_path / "spool" / "weather" / "w0-000001.jsonl"
    local.parent.mkdir(parents=True)
    local.write_bytes(b'{"a":1}\n{"a":2}\n')
    real_put = LocalFileSystem.put_file

    def cut_short(self: Any, lpath: str, rpath: str, **kwargs: Any) -> None:
        Path(rpath).write_bytes(Path(lpath).read_bytes()[:10])
        raise OSError("connection lost")

    monkeypatch.setattr(LocalFileSystem, "put_file", cut_short)
    publish = _fsspec_publisher(f"local://{remote}")
    with pytest.raises(OSError):
        publish(local, "weather/w0-000001.jsonl")
    assert shards(remote) == [] and local.is_file()  # nothing readable; kept to retry
    monkeypatch.setattr(LocalFileSystem, "put_file", real_put)
    publish(local, "weather/w0-000001.jsonl")
    (uploaded,) = shards(remote)
    assert uploaded.read_bytes() == b'{"a":1}\n{"a":2}\n'
    assert not list(remote.rglob("*.part")) and not local.exists()


class FlakyStore:
    """An upload hook that fails while ``outage`` is set, and keeps what it uploaded."""

    def __init__(self) -> None:
        self.outage = True
        self.uploaded: list[str] = []

    def __call__(self, local: Path, relative: str) -> None:
        if self.outage:
            raise OSError("connection timed out")
        self.uploaded.append(relative)
        local.unlink()


def test_a_shard_waiting_for_its_upload_stays_locked_against_other_writers(
    tmp_path: Path,
) -> None:
    """A shard whose upload failed was unlocked (its file closed) while its writer kept it
    for a retry: after max_seconds + 60 s of outage another worker's sweep took it too, and
    both counted it (100 records on disk, 200 upload_pending at shutdown) and charged it to
    their spool bounds."""
    outage = True
    uploaded: list[str] = []

    def publish(local: Path, relative: str) -> None:
        if outage:
            raise OSError("connection timed out")
        uploaded.append(relative)
        local.unlink()

    clock = Clock()
    clock.now = time.time()
    one = ShardWriter(tmp_path, 1, 1 << 20, 300, publish=publish, clock=clock)
    zero = ShardWriter(tmp_path, 0, 1 << 20, 300, publish=publish, clock=clock)
    one.write("ns/task", [b'{"r":%d}\n' % i for i in range(100)], rotate=False)
    one.close_all()  # rotated; the upload fails and waits for a retry
    assert one.pending_uploads == 1
    clock.now += 400  # the outage outlasts max_seconds + 60 s
    zero._next_sweep = 0
    zero.sweep_orphans()
    assert zero.pending_uploads == 0 and dict(zero.unsent()) == {}
    assert dict(one.unsent()) == {"ns/task": 100}
    outage = False
    one.retry_uploads(force=True)  # the owner uploads it once the store is back
    assert len(uploaded) == 1 and shards(tmp_path) == []  # once, by its owner
    assert one.pending_uploads == 0 and one._alive_fd is None  # its lock let go: none waits


def test_uri_targets_upload_finished_shards_through_fsspec(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    from slm_gateway.capture import _fsspec_publisher

    remote = tmp_path / "bucket"
    spool = tmp_path / "spool"
    w = ShardWriter(spool, 0, 1 << 20, 60, publish=_fsspec_publisher(f"local://{remote}"))
    w.write("weather", [b'{"a":1}\n', b'{"a":2}\n'])
    w.close_all()
    uploaded = shards(remote)
    assert [p.parent.name for p in uploaded] == ["weather"]
    assert uploaded[0].read_bytes() == b'{"a":1}\n{"a":2}\n'
    assert shards(spool) == []  # the local copy is gone once uploaded


def test_a_failed_upload_is_kept_and_tried_again_until_it_lands(tmp_path: Path) -> None:
    """An object store outage at rotation left the shard in the spool as ``.jsonl`` and
    nothing tried it again: its records, counted as written, never reached the trainer."""
    import subprocess
    import sys

    uploaded: dict[str, bytes] = {}
    outage = {"on": True}

    def publish(local: Path, relative: str) -> None:
        if outage["on"]:
            raise OSError("s3 PutObject: connection reset")
        uploaded[relative] = local.read_bytes()
        local.unlink()

    clock = Clock()
    w = ShardWriter(tmp_path, 0, 1 << 20, 60, publish=publish, clock=clock)
    w.write("ns/task", [b'{"r":1}\n', b'{"r":2}\n'])
    w.close_all()  # the rotation itself does not fail
    assert w.pending_uploads == 1 and len(shards(tmp_path)) == 1 and not uploaded
    clock.now += 1
    w.retry_uploads()  # still within the back-off: not tried yet, nothing raised
    outage["on"] = False
    w.retry_uploads()
    assert not uploaded  # the back-off is the store's breathing room
    clock.now += capture.RETRY_MIN_S
    w.retry_uploads()
    assert w.pending_uploads == 0 and shards(tmp_path) == []
    assert list(uploaded.values()) == [b'{"r":1}\n{"r":2}\n']

    # A writer stopped before its retry: the next one in its slot uploads what it left.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    left = _orphan(tmp_path, w, int(gone.stdout), b'{"r":3}\n')
    finished = left.with_name(left.name.removesuffix(".part"))
    left.rename(finished)  # published locally, never uploaded
    successor = ShardWriter(tmp_path, 0, 1 << 20, 60, publish=publish, clock=clock)
    assert successor.recover_orphans() == 1
    successor.retry_uploads()  # recovered shards wait for the worker's loop to upload them
    # uploaded once, into the same task's folder (renamed into the successor's sequence)
    (taken,) = [k for k, v in uploaded.items() if v == b'{"r":3}\n']
    assert taken.rsplit("/", 1)[0] == finished.parent.relative_to(tmp_path).as_posix()
    assert shards(tmp_path) == []


def test_a_shard_left_in_a_shared_spool_goes_to_its_own_target(tmp_path: Path) -> None:
    """Two gateways on one host with the default spool and different targets: a shard one of
    them could not upload before it stopped is uploaded to its own bucket when it starts
    again, never to the other gateway's (where that task's trainer would never see it)."""
    pytest.importorskip("fsspec")
    import subprocess
    import sys

    spool = tmp_path / "spool"
    target_a, target_b = f"local://{tmp_path}/bucket-a", f"local://{tmp_path}/bucket-b"
    assert capture.spool_dir(str(spool), target_a) != capture.spool_dir(str(spool), target_b)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    root_a = capture.spool_dir(str(spool), target_a)
    left = _orphan(root_a, ShardWriter(root_a, 0, 1 << 20, 60), int(gone.stdout), b'{"a":1}\n')
    left = left.rename(left.with_name(left.name.removesuffix(".part")))  # upload had failed

    for target in (target_b, target_a):
        sink = CaptureSink(CaptureConfig(target=target, spool=str(spool)))
        sink.start()
        sink.submit(item(0, key="ns/other"))
        sink.close()
        if target == target_b:
            assert left.exists()  # not B's to upload
    assert [p.read_bytes() for p in shards(tmp_path / "bucket-a" / "ns" / "task")] == [b'{"a":1}\n']
    assert not (tmp_path / "bucket-b" / "ns" / "task").exists()
    assert shards(spool) == []


def test_shards_an_earlier_version_left_in_the_spool_are_reported_not_uploaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before targets had spool folders of their own, shards lay in the spool's top level;
    whose target they are is unknown, so the gateway names them at start instead of
    uploading them to its own target."""
    pytest.importorskip("fsspec")
    spool, target = tmp_path / "spool", f"local://{tmp_path}/bucket"
    old = spool / "ns" / "task" / "calls-20260101T000000Z-h-1-w0-000001.jsonl"
    old.parent.mkdir(parents=True)
    old.write_bytes(b'{"a":1}\n')
    own = capture.spool_dir(str(spool), target) / "ns" / "task" / "x.jsonl.part"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    assert capture.stray_spool_shards(str(spool)) == [old]
    sink = CaptureSink(CaptureConfig(target=target, spool=str(spool)))
    with caplog.at_level("WARNING", logger="slm_gateway.capture"):
        sink.start()
    sink.close()
    assert any("1 shard(s) in the spool" in r.getMessage() for r in caplog.records)
    assert old.read_bytes() == b'{"a":1}\n' and not (tmp_path / "bucket" / "ns").exists()


def test_a_uri_target_is_uploaded_where_the_trainer_reads_it(tmp_path: Path) -> None:
    """Both ends of an object-store call log: the sink's worker spools and uploads each task's
    shards under the URI, and the trainer lists and reads that task's prefix through fsspec
    (``local://`` stands in for ``s3://``: the same publisher and the same reader)."""
    pytest.importorskip("fsspec")
    from slm_trainer.curate import ParseStats, input_files, parse_lines, read_lines

    bucket = tmp_path / "bucket"
    sink = CaptureSink(
        CaptureConfig(target=f"local://{bucket}/calls", spool=str(tmp_path / "spool"))
    )
    sink.start()
    for i in range(5):
        assert sink.submit(item(i, key="ns/extract"))
    stats = sink.close()
    assert (stats.written, stats.dropped) == (5, 0)
    assert shards(tmp_path / "spool") == []  # uploaded, not left behind
    files = input_files(f"local://{bucket}/calls/ns/extract/")
    assert len(files) == 1 and str(files[0]).endswith(".jsonl")
    read = ParseStats()
    records = list(parse_lines(read_lines(files), read))
    assert [r.request_id for r in records] == [f"r{i}" for i in range(5)]
    assert read.lines == 5 and not read.malformed


@pytest.mark.parametrize(
    "target, says",
    [
        ("slmtestmissing://bucket/calls", "Install slm-no-such-driver"),
        ("nosuchfs://bucket/calls", "no filesystem for nosuchfs://"),
    ],
)
def test_a_uri_target_without_its_filesystem_fails_at_start_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, says: str
) -> None:
    """s3:// in an image without s3fs: the gateway must not start, and must say which package
    is missing, rather than that a worker "exited before it was ready"."""
    fsspec_registry = pytest.importorskip("fsspec.registry")
    monkeypatch.setitem(
        fsspec_registry.known_implementations,
        "slmtestmissing",
        {"class": "slm_no_such_driver.FileSystem", "err": "Install slm-no-such-driver"},
    )
    sink = CaptureSink(CaptureConfig(target=target, spool=str(tmp_path / "spool")))
    with pytest.raises(RuntimeError, match=re.escape(says)):
        sink.start()


def test_capture_batches_linger_briefly_and_the_setting_is_checked(tmp_path: Path) -> None:
    """Short batches keep the redaction workers' CPU bursts small (the gateway's p99 depends
    on it); the flag tunes it and a value that would spin the pump is refused."""
    from slm_gateway.config import config_from_args

    base = ["--routes", str(tmp_path / "routes.yaml"), "--capture", str(tmp_path / "logs")]
    cfg = config_from_args(base)
    assert cfg.capture is not None and cfg.capture.linger_s == pytest.approx(0.002)
    cfg = config_from_args([*base, "--capture-linger-ms", "5"])
    assert cfg.capture is not None and cfg.capture.linger_s == pytest.approx(0.005)
    with pytest.raises(SystemExit) as exc:
        config_from_args([*base, "--capture-linger-ms", "0"])
    assert exc.value.code == 2


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _thread_cpu_s(native_id: int) -> float:
    """CPU seconds of one thread of this process (Linux schedstat, nanoseconds)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


def test_an_idle_pump_sleeps_and_a_lone_record_is_still_written_at_once(tmp_path: Path) -> None:
    """The pump thread wakes for work, not on a timer: polling an empty queue cost an idle
    gateway 1.9 % of a core (0.4 % without capture). Waking only on the append that finds the
    queue empty must not leave a lone record waiting for the next call to ship it."""
    sink = CaptureSink(CaptureConfig(target=str(tmp_path / "calls")))
    sink.start()
    try:
        pump = sink._pump_thread
        assert pump is not None and pump.native_id is not None
        # The worker is batch work for the scheduler: a batch arriving never preempts the loop.
        assert os.sched_getscheduler(sink._workers[0].proc.pid) == os.SCHED_BATCH
        time.sleep(0.2)
        before = _thread_cpu_s(pump.native_id)
        time.sleep(1.0)
        # Polling every linger_s (2 ms) is 500 wake-ups in this second, about 20 ms of CPU
        # here; asleep on the event it is none.
        assert _thread_cpu_s(pump.native_id) - before < 0.002
        for burst in range(3):  # each one record, each after the pump went back to sleep
            assert sink.submit(item(burst))
            assert wait_for(lambda b=burst: sink.stats.written == b + 1, timeout=10.0)
            time.sleep(0.05)
    finally:
        stats = sink.close()
    assert (stats.written, stats.dropped) == (3, 0)


def test_a_killed_worker_counts_its_records_as_dropped_at_once_and_is_replaced(
    tmp_path: Path,
) -> None:
    """A worker killed (OOM, SIGKILL) with records it never acknowledged: they are counted as
    dropped for their task while the gateway runs, so "written = served" checks see the loss
    then, not at shutdown; a new worker takes over, and close counts nothing twice."""
    dropped: Counter[str] = Counter()
    reasons: set[str] = set()
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), batch_size=8, restart_backoff_s=0.05),
        on_dropped=lambda k, n, reason: (dropped.update({k: n}), reasons.add(reason)),
    )
    sink.start()
    try:
        old = sink._workers[0].proc.pid
        os.kill(old, signal.SIGSTOP)  # holds what it receives without acknowledging it
        for i in range(20):
            sink.submit(item(i, key="weather" if i % 2 else "ns/extract"))
        assert wait_for(lambda: sink.depth() == 0)  # shipped into the stopped worker's pipe
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: sink.stats.dropped == 20), sink.stats
        assert dropped == {"weather": 10, "ns/extract": 10}
        assert reasons == {capture.DROP_WORKER}
        assert sink.stats.pending == 0 and sink.stats.written == 0
        assert wait_for(lambda: sink._workers[0].proc.pid != old and sink._workers[0].alive)
        for i in range(5):
            sink.submit(item(100 + i))
        assert wait_for(lambda: sink.stats.written == 5)
        second = sink._workers[0].proc.pid
        os.kill(second, signal.SIGKILL)  # died young again: the next delay is doubled
        assert wait_for(lambda: sink._workers[0].proc.pid != second and sink._workers[0].alive)
        assert sink._workers[0].crashes == 2
    finally:
        stats = sink.close()
    assert (stats.submitted, stats.written, stats.dropped, stats.pending) == (25, 5, 20, 0)
    assert sum(dropped.values()) == 20 and "_shutdown" not in dropped
    # The second worker was killed before it could rotate its shard; its successor published
    # it, so the trainer (which reads *.jsonl only) sees all 5 records.
    assert shards(tmp_path, "*.part") == []
    assert sum(f.read_bytes().count(b"\n") for f in shards(tmp_path)) == 5


def test_shards_an_earlier_container_left_under_a_worker_pid_are_not_its_records(
    tmp_path: Path,
) -> None:
    """A container restarted in its pod keeps the hostname and the capture volume, and with
    the gateway as PID 1 its workers get the same pids. A worker killed holding records it
    never wrote had them counted written, matched against the earlier container's shards of
    the same host, pid and slot: lost in silence. They are dropped, as worker_lost."""
    reasons: Counter[str] = Counter()
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), batch_size=8, restart_backoff_s=0.05),
        on_dropped=lambda k, n, reason: reasons.update({reason: n}),
    )
    sink.start()
    try:
        pid = sink._workers[0].proc.pid or 0
        name = capture.shard_name(capture.shard_host(), pid, 0, 1, time.time() - 3600)
        earlier = tmp_path / "weather" / (name + ".jsonl")
        earlier.parent.mkdir(parents=True, exist_ok=True)
        earlier.write_bytes(b"".join(b'{"earlier": %d}\n' % i for i in range(50)))
        os.kill(pid, signal.SIGSTOP)  # holds what it receives, never writes it
        for i in range(20):
            sink.submit(item(i))
        assert wait_for(lambda: sink.depth() == 0)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: sink.stats.pending == 0), sink.stats
    finally:
        stats = sink.close()
    assert (stats.written, stats.dropped) == (0, 20)
    assert reasons == {capture.DROP_WORKER: 20}


def _asleep_writing_to_a_full_pipe(pid: int) -> bool:
    """Whether ``pid`` sleeps in a write to a full pipe (its wait channel, from /proc)."""
    with contextlib.suppress(OSError):
        return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()
    return False


def _dead(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not yet reaped, or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("cut", ["after its write", "mid-write"])
@pytest.mark.parametrize("target", ["folder", "uri, spool below a batch"])
def test_a_worker_killed_before_it_acknowledges_a_write_counts_each_record_once(
    tmp_path: Path, cut: str, target: str
) -> None:
    """A worker killed between writing a batch to its shard and acknowledging it: its
    successor publishes the shard with those lines, and the gateway counted them as dropped
    (``worker_lost``) too, so the drop alert fired for calls the trainer got. Each record must
    be counted once: ``written`` for every line in the published shards, dropped for the rest;
    a line the kill cut short is not published, and counted dropped.

    The worker is stopped at the right point without a seam: the gateway's thread that reads
    the acknowledgements is held in the ``on_written`` hook, so the worker fills the
    acknowledgement pipe and sleeps writing the acknowledgement of lines it has just written;
    it is killed there. For ``mid-write`` the shard is then cut inside the last of those
    lines, which is what a kill during the write leaves. With a URI target whose spool holds
    less than a batch of two tasks' records, writing the second task's line first uploads
    (and deletes) the first one's shard, this batch's line in it: the worker must not be
    killable with that line uploaded and unacknowledged, where the gateway cannot see it.
    """
    import fcntl
    import threading

    submitted = 120  # more than the acknowledgements a 4 KiB pipe holds
    held, release = threading.Event(), threading.Event()
    written: Counter[str] = Counter()
    reasons: Counter[str] = Counter()

    def on_written(key: str, n: int) -> None:
        written[key] += n
        if not held.is_set():
            held.set()
            release.wait(60)  # the gateway reads no acknowledgement meanwhile

    line = len(orjson.dumps(orjson.loads(REQ))) + 400  # about one record's line
    if target == "folder":  # shards of a few lines: the dead worker's earlier ones stay there
        cfg = CaptureConfig(
            target=str(tmp_path),
            batch_size=1,
            max_shard_bytes=3 * line,
            restart_backoff_s=0.05,
        )
        spool = published = tmp_path
        keys = ["ns/extract"]
    else:
        pytest.importorskip("fsspec")
        spool, published = tmp_path / "spool", tmp_path / "bucket"
        cfg = CaptureConfig(
            target=f"local://{published}",
            spool=str(spool),
            batch_size=2,
            max_spool_bytes=3 * line // 2,
            restart_backoff_s=0.05,
        )
        keys = ["ns/a", "ns/b"]
    sink = CaptureSink(
        cfg, on_written=on_written, on_dropped=lambda k, n, reason: reasons.update({reason: n})
    )
    sink.start()
    try:
        old = sink._workers[0].proc.pid
        # The smallest pipe (one page), so that few acknowledgements fill it.
        fcntl.fcntl(sink._workers[0].recv_conn.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        for i in range(submitted):
            assert sink.submit(item(i, key=keys[i % len(keys)]))
        if not wait_for(lambda: _asleep_writing_to_a_full_pipe(old), 60):
            channel = Path(f"/proc/{old}/wchan").read_text().strip()
            if channel in ("", "0"):
                pytest.skip("this kernel does not show a process's wait channel in /proc")
            pytest.fail(f"the worker never slept on its full pipe (it waits in {channel})")
        (part,) = shards(spool, "*.jsonl.part")
        data = part.read_bytes()
        assert data.endswith(b"\n")
        on_disk = [CallRecord.from_json(x.decode()).request_id for x in data.splitlines()]
        if cut == "mid-write":
            last = data.rfind(b"\n", 0, len(data) - 1) + 1
            os.truncate(part, last + (len(data) - last) // 2)
            cut_off = on_disk.pop()
        os.kill(old, signal.SIGKILL)
        # Dead before the gateway reads again: a kill that has not taken effect yet lets the
        # write that makes room in the pipe go through, acknowledgement and all.
        assert wait_for(lambda: _dead(old))
        release.set()
        assert wait_for(lambda: sink._workers[0].proc.pid != old and sink._workers[0].alive)
    finally:
        release.set()
        stats = sink.close()
    assert shards(spool, "*.part") == []
    lines = [line for f in shards(published) for line in f.read_bytes().splitlines()]
    ids = {CallRecord.from_json(line.decode()).request_id for line in lines}
    assert len(ids) == len(lines) < submitted  # every line a whole record, none twice
    assert set(on_disk) <= ids  # the killed worker's lines are kept
    if cut == "mid-write":
        assert cut_off not in ids  # the cut line is not published
    assert stats.written == len(lines) == sum(written.values()), stats
    assert stats.written + stats.dropped == stats.submitted == submitted and stats.pending == 0
    assert reasons == {capture.DROP_WORKER: stats.dropped}
    sizes = {len(f.read_bytes().splitlines()) for f in shards(published)}
    if target == "folder":
        assert max(sizes) > 1 and len(shards(published)) > 2
    else:  # the spool held one line at a time: each went up on its own
        assert sizes == {1}


def test_a_crash_looping_worker_is_restarted_with_a_growing_bounded_delay() -> None:
    """Each restart loads the redactor (seconds of CPU): a worker that keeps dying is
    restarted after 1, 2, 4... seconds up to a cap, never in a tight loop, and a worker that
    stayed up a while is restarted promptly again."""
    crashes, delays = 0, []
    for _ in range(9):
        crashes, delay = restart_backoff(crashes, uptime_s=0.5, base_s=1.0, cap_s=60.0)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert restart_backoff(5_000, uptime_s=0.5, base_s=1.0, cap_s=60.0) == (5_001, 60.0)
    assert restart_backoff(7, uptime_s=600.0, base_s=1.0, cap_s=60.0) == (1, 1.0)


def _orphan(root: Path, w: ShardWriter, pid: int, body: bytes, host: str = "") -> Path:
    name = shard_name(host or w.host, pid, w.index, 1, 1_700_000_000) + ".jsonl.part"
    path = root / "ns" / "task" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def test_a_dead_writers_open_shard_is_published_without_its_cut_off_last_line(
    tmp_path: Path,
) -> None:
    """A worker killed mid-write leaves ``.part`` shards the trainer never reads: the next
    worker in the same slot publishes them, whole records only."""
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    w = ShardWriter(tmp_path, 0, 1 << 20, 300)
    dead = _orphan(tmp_path, w, dead_pid, b'{"a":1}\n{"a":2}\n{"a":')
    alive = _orphan(tmp_path, w, os.getppid(), b'{"b":1}\n')  # a live process: not ours
    other_slot = tmp_path / "ns" / "task" / dead.name.replace("-w0-", "-w1-")
    other_slot.write_bytes(b'{"c":1}\n')  # another worker slot's, maybe alive
    assert w.recover_orphans() == 1
    published = shards(tmp_path)
    assert [p.name for p in published] == [dead.name.removesuffix(".part")]
    assert published[0].read_bytes() == b'{"a":1}\n{"a":2}\n'
    assert alive.exists() and other_slot.exists()
    assert w.recover_orphans() == 0  # idempotent


def test_a_lost_replicas_stale_shard_is_published_by_a_remaining_one(tmp_path: Path) -> None:
    """A replica that is gone for good cannot come back for its shards; one untouched for
    longer than a writer could keep it open is published by any replica's sweep."""
    clock = Clock()
    w = ShardWriter(tmp_path, 0, 1 << 20, 300, clock=clock)
    stale = _orphan(tmp_path, w, 4242, b'{"a":1}\n', host="gateway-7f9c-lost")
    os.utime(stale, (clock.now - 100, clock.now - 100))
    w.sweep_orphans()  # too early: sweeps run once per max_seconds, and it is fresh anyway
    assert stale.exists()
    os.utime(stale, (clock.now - 400, clock.now - 400))
    clock.now += 301
    w.sweep_orphans()
    assert not stale.exists() and [p.read_bytes() for p in shards(tmp_path)] == [b'{"a":1}\n']


def test_a_failed_rotation_neither_stops_the_worker_nor_drops_later_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shard that cannot be published when it comes of age (its folder removed here) ended
    the worker's loop, and a restart with the redactor's seconds of CPU followed; now the
    worker carries on, and the next records are written. The record in the removed shard is
    lost, and counted so (it stayed counted as written)."""
    import shutil

    sink = CaptureSink(CaptureConfig(target=str(tmp_path), max_shard_seconds=0.5))
    sink.start()
    try:
        pid = sink._workers[0].proc.pid
        sink.submit(item(0, key="gone"))
        assert wait_for(lambda: sink.stats.written == 1)
        shutil.rmtree(tmp_path / "gone")  # the open shard's rename at rotation would fail
        time.sleep(1.5)  # past its age: the rotation is tried
        for i in range(5):
            sink.submit(item(100 + i))
        assert wait_for(lambda: sink.stats.pending == 0 and sink.stats.dropped == 1), sink.stats
        assert sink._workers[0].proc.pid == pid and sink._workers[0].alive
    finally:
        stats = sink.close()
    assert (stats.written, stats.dropped, stats.pending) == (5, 1, 0)
    assert sum(len(p.read_bytes().splitlines()) for p in shards(tmp_path / "weather")) == 5


def test_a_write_that_fails_leaves_none_of_its_lines(tmp_path: Path) -> None:
    """On a full disk a buffered shard kept the batch's tail and wrote it at the next flush:
    records counted as dropped appeared in the log after all, and the count lied."""
    import errno

    w = ShardWriter(tmp_path, 0, 1 << 20, 60)
    w.write("ns/task", [b'{"a":1}\n'])
    fh, path, opened, size = w._open["ns/task"]

    class DiskFull:
        """Writes 3 bytes of what it is given, then the disk is full."""

        def __init__(self) -> None:
            self.calls = 0

        def write(self, data: memoryview) -> int:
            self.calls += 1
            if self.calls == 1:
                return int(fh.write(data[:3]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self) -> int:
            return int(fh.fileno())

        def close(self) -> None:
            fh.close()

    w._open["ns/task"] = (DiskFull(), path, opened, size)
    with pytest.raises(OSError):
        w.write("ns/task", [b'{"b":2}\n', b'{"c":3}\n'])
    assert path.read_bytes() == b'{"a":1}\n'  # cut back to the lines counted as written
    w._open["ns/task"] = (fh, path, opened, size)
    w.write("ns/task", [b'{"d":4}\n'])
    w.close_all()
    assert [p.read_bytes() for p in shards(tmp_path)] == [b'{"a":1}\n{"d":4}\n']


def test_a_shard_that_cannot_be_written_drops_its_records_saying_why(tmp_path: Path) -> None:
    """A task whose shard cannot be written (here its folder is a file; in a pod, a full
    disk) loses that batch's records, counted with the reason an alert points to; the other
    tasks' records in the same batch are written."""
    (tmp_path / "weather").write_bytes(b"in the way of the task's folder")
    dropped: list[tuple[str, int, str]] = []
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), batch_size=16),
        on_dropped=lambda k, n, reason: dropped.append((k, n, reason)),
    )
    sink.start()
    for i in range(4):
        sink.submit(item(i, key="weather" if i % 2 else "ns/extract"))
    stats = sink.close()
    assert (stats.written, stats.dropped) == (2, 2)
    assert {(k, reason) for k, _, reason in dropped} == {("weather", capture.DROP_WRITE)}
    assert sum(n for _, n, _ in dropped) == 2
    assert sum(f.read_bytes().count(b"\n") for f in shards(tmp_path / "ns" / "extract")) == 2


def test_a_task_folder_removed_under_an_open_shard_loses_only_what_it_held(
    tmp_path: Path,
) -> None:
    """A task's folder removed while its shard was open (someone resetting the task's data):
    later records went on into the deleted file, counted written and lost, and closing then
    failed on that shard and left every other task's shard unpublished. Now the loss is
    counted, the next records go to a new shard, and the other tasks are published."""
    import shutil

    w = ShardWriter(tmp_path, 0, 1 << 20, 3600, clock=Clock())
    w.write("weather", [b'{"a":1}\n', b'{"a":2}\n'])
    w.write("ns/extract", [b'{"o":1}\n'])
    shutil.rmtree(tmp_path / "weather")
    w.write("weather", [b'{"b":1}\n'])
    w.close_all()
    assert [p.read_bytes() for p in shards(tmp_path / "weather")] == [b'{"b":1}\n']
    assert [p.read_bytes() for p in shards(tmp_path / "ns")] == [b'{"o":1}\n']
    assert shards(tmp_path, "*.part") == []
    assert w.take_removed() == {"weather": 2} and w.take_removed() == {}


def test_a_shard_removed_before_it_is_published_is_counted_and_the_others_still_are(
    tmp_path: Path,
) -> None:
    """Closing stopped at the first shard it could not publish (removed here): the shards
    after it stayed ``.jsonl.part``, never read by the trainer."""
    w = ShardWriter(tmp_path, 0, 1 << 20, 3600, clock=Clock())
    for key in ("a", "b", "c"):
        w.write(key, [b"{}\n"] * 3)
    next((tmp_path / "a").glob("*.part")).unlink()
    w.close_all()
    assert sorted(p.parent.name for p in shards(tmp_path)) == ["b", "c"]
    assert shards(tmp_path, "*.part") == [] and w.take_removed() == {"a": 3}


def test_a_shard_that_cannot_be_published_leaves_the_others_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One shard whose rename fails (a read-only folder) is logged once and left as its
    ``.part`` for recovery; it no longer keeps the shards after it from being published."""
    w = ShardWriter(tmp_path, 0, 1 << 20, 3600, clock=Clock())
    for key in ("a", "b"):
        w.write(key, [b"{}\n"])
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src).parent.name == "a":
            raise PermissionError(13, "Permission denied")
        real(src, dst)

    with caplog.at_level("ERROR", logger="slm_gateway.capture"), monkeypatch.context() as m:
        m.setattr(capture.os, "replace", replace)
        w.close_all()
    assert [p.parent.name for p in shards(tmp_path)] == ["b"]
    assert [p.parent.name for p in shards(tmp_path, "*.part")] == ["a"]  # left for recovery
    assert len(caplog.records) == 1 and "cannot publish 1 shard" in caplog.records[0].getMessage()
    assert w.take_removed() == {}  # its lines are on disk: a later recovery publishes them


def test_records_lost_with_a_removed_task_folder_are_counted_dropped(tmp_path: Path) -> None:
    """The gateway end to end: the records written to a shard whose folder was removed are
    counted dropped (``shard_removed``) instead of written, the later ones are written to a
    new shard, and the other task's shard is published at shutdown."""
    import shutil

    dropped: list[tuple[str, int, str]] = []
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path)),
        on_dropped=lambda k, n, reason: dropped.append((k, n, reason)),
    )
    sink.start()
    try:
        for i in range(3):
            sink.submit(item(i))
            sink.submit(item(i, key="ns/extract"))
        assert wait_for(lambda: sink.stats.written == 6), sink.stats
        shutil.rmtree(tmp_path / "weather")
        for i in range(3, 13):
            sink.submit(item(i))
        for i in range(3, 6):
            sink.submit(item(i, key="ns/extract"))
        assert wait_for(lambda: sink.stats.pending == 0), sink.stats
    finally:
        stats = sink.close()
    assert (stats.submitted, stats.written, stats.dropped, stats.pending) == (19, 16, 3, 0)
    assert dropped == [("weather", 3, capture.DROP_SHARD_REMOVED)]
    assert sum(p.read_bytes().count(b"\n") for p in shards(tmp_path / "weather")) == 10
    assert sum(p.read_bytes().count(b"\n") for p in shards(tmp_path / "ns")) == 6
    assert shards(tmp_path, "*.part") == []


def test_a_disk_that_cannot_be_written_is_logged_once_per_interval_and_when_it_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full or read-only disk logged one error per batch (about 190 lines a second under
    load); now one line per interval with the count since the last one, and one line when
    the shard is written again. The worker runs here, on a thread, with its real redactor."""
    import multiprocessing as mp
    import threading

    monkeypatch.setattr(capture.signal, "signal", lambda *_: None)
    monkeypatch.setattr(capture, "batch_scheduling", lambda: False)
    monkeypatch.setattr(capture, "raise_open_files_limit", lambda: (0, 0))
    blocker = tmp_path / "weather"
    blocker.write_bytes(b"a file where the task's folder goes: its shard cannot be written")
    inbox_r, inbox_w = mp.Pipe(duplex=False)
    outbox_r, outbox_w = mp.Pipe(duplex=False)
    worker = threading.Thread(
        target=capture._worker_main, args=(inbox_r, outbox_w, CaptureConfig(str(tmp_path)), 0)
    )

    def batch(i: int) -> tuple[Any, ...]:
        inbox_w.send([item(i)])
        while True:
            msg = outbox_r.recv()
            if msg[0] == "ack":
                return tuple(msg)

    with caplog.at_level("INFO", logger="slm_gateway.capture"):
        worker.start()
        assert outbox_r.recv()[0] == "ready"
        acks = [batch(i) for i in range(30)]
        blocker.unlink()
        acks.append(batch(30))
        inbox_w.send(None)
        worker.join(30)
    assert [a[2] for a in acks[:30]] == [{capture.DROP_WRITE: {"weather": 1}}] * 30
    assert acks[30][1] == {"weather": 1}
    lines = [r.getMessage() for r in caplog.records if "weather" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("capture: cannot write the shard of weather")
    assert "writing the shard of weather again" in lines[1] and "29 more" in lines[1]


def test_a_stalled_writers_open_shard_is_never_taken_and_a_dead_ones_still_is(
    tmp_path: Path,
) -> None:
    """Two workers on one spool: worker 1's upload stalls (an object-store outage) for longer
    than any shard stays open, and worker 0's sweep ran meanwhile. Taking "untouched for
    max_seconds + 60 s" for "abandoned", it published, uploaded and deleted worker 1's open
    shard, whose later lines, acknowledged as written, were then lost. A writer's lock says
    it is alive; a writer killed outright leaves its shard unlocked, and that one is taken."""
    import subprocess
    import sys

    spool, remote = tmp_path / "spool", tmp_path / "remote"
    clock = Clock()
    uploads: list[str] = []

    def put(local: Path, relative: str) -> None:
        (remote / relative).parent.mkdir(parents=True, exist_ok=True)
        (remote / relative).write_bytes(local.read_bytes())
        local.unlink()
        uploads.append(relative)

    w0 = ShardWriter(spool, 0, 1 << 30, 300, publish=put, clock=clock)

    def stalled_put(local: Path, relative: str) -> None:
        clock.now += 400  # the upload hangs; every shard now looks abandoned by its age
        for part in spool.rglob("*"):
            if part.is_file():
                os.utime(part, (clock.now - 390, clock.now - 390))
        w0._next_sweep = 0
        w0.sweep_orphans()
        put(local, relative)

    w1 = ShardWriter(spool, 1, 1 << 30, 300, publish=stalled_put, clock=clock)
    w1.write("ns/a", [b'{"r":"A1"}\n'])
    clock.now += 10
    w1.write("ns/b", [b'{"r":"B1"}\n'])
    clock.now += 290
    w1.rotate_expired()  # shard A rotates; its upload stalls, and worker 0 sweeps
    assert [u.split("/")[1] for u in uploads] == ["a"]  # A once; B, still open, not taken
    assert len(shards(spool, "*.jsonl.part")) == 1
    w1.write("ns/b", [b'{"r":"B2"}\n', b'{"r":"B3"}\n'])
    w1.publish = put
    w1.close_all()
    lines = sorted(line for f in shards(remote) for line in f.read_text().split())
    assert lines == ['{"r":"A1"}', '{"r":"B1"}', '{"r":"B2"}', '{"r":"B3"}']
    assert len(uploads) == 2 and shards(spool, "*.jsonl*") == []

    # A writer killed outright (SIGKILL) in another process: its lock went with it.
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys; from pathlib import Path; "
            "from slm_gateway.capture import ShardWriter; "
            "w = ShardWriter(Path(sys.argv[1]), 5, 1 << 30, 300); "
            "w.write('ns/c', [b'{\"r\":\"C1\"}\\n']); os.kill(os.getpid(), signal.SIGKILL)",
            str(spool),
        ],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    (left,) = shards(spool, "*.jsonl.part")
    os.utime(left, (clock.now - 400, clock.now - 400))
    assert w0.recover_orphans() == 1
    w0.retry_uploads()
    assert [p.read_bytes() for p in shards(remote / "ns" / "c")] == [b'{"r":"C1"}\n']


def test_a_live_writers_stale_shard_is_left_to_it_by_a_sweep(tmp_path: Path) -> None:
    """The lock is what protects a live writer: its shard, however long unwritten, is not
    published by another writer, in this process or another; once published by its owner it
    is whole."""
    clock = Clock()
    owner = ShardWriter(tmp_path, 1, 1 << 20, 300, clock=clock)
    owner.write("ns/task", [b'{"a":1}\n'])
    (part,) = shards(tmp_path, "*.jsonl.part")
    os.utime(part, (clock.now - 10_000, clock.now - 10_000))
    other = ShardWriter(tmp_path, 0, 1 << 20, 300, clock=clock)
    assert other.recover_orphans() == 0 and part.exists()
    owner.write("ns/task", [b'{"a":2}\n'])
    owner.close_all()
    assert [p.read_bytes() for p in shards(tmp_path)] == [b'{"a":1}\n{"a":2}\n']


BIG_REQ = orjson.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]})


def test_a_queue_of_large_records_stops_at_its_byte_bound(tmp_path: Path) -> None:
    """A record holds its raw request and response; a queue bounded by count only (50,000)
    grew a gateway whose workers fell behind to an OOM kill, losing all it held, uncounted.
    Past its bytes bound the queue drops and counts (queue_full), and bytes shipped to the
    workers make room again."""
    import threading

    size = len(BIG_REQ) + len(RESP)
    dropped: Counter[str] = Counter()
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), queue_bytes=10 * size + size // 2),
        on_dropped=lambda k, n, reason: dropped.update({reason: n}),
    )  # not started: nothing drains the queue
    results = [sink.submit(item(i, request=BIG_REQ)) for i in range(25)]
    assert results == [True] * 10 + [False] * 15
    assert sink.depth() == 10 and sink.queued_bytes() == 10 * size
    assert dropped == {capture.DROP_QUEUE_FULL: 15} and sink.stats.dropped == 15
    assert sink.submit(item(99))  # a small record still fits

    shipped: list[int] = []
    sink._send = lambda batch, rr: shipped.append(len(batch)) or rr  # type: ignore[method-assign]
    pump = threading.Thread(target=sink._pump, daemon=True)
    pump.start()
    try:
        assert wait_for(lambda: sink.queued_bytes() == 0 and sink.depth() == 0, 10)
        assert sum(shipped) == 11
        assert all(sink.submit(item(i, request=BIG_REQ)) for i in range(10))
    finally:
        sink._stop.set()
        sink._work.set()
        pump.join(10)


def test_the_capture_byte_bounds_are_flags(tmp_path: Path) -> None:
    from slm_gateway.config import config_from_args

    base = ["--routes", str(tmp_path / "routes.yaml"), "--capture", str(tmp_path / "logs")]
    cfg = config_from_args(base)
    assert cfg.capture is not None
    assert (cfg.capture.queue_bytes, cfg.capture.max_spool_bytes) == (256 << 20, 1024 << 20)
    cfg = config_from_args([*base, "--capture-queue-mb", "64", "--capture-spool-mb", "2048"])
    assert cfg.capture is not None
    assert (cfg.capture.queue_bytes, cfg.capture.max_spool_bytes) == (64 << 20, 2048 << 20)
    with pytest.raises(SystemExit):
        config_from_args([*base, "--capture-spool-mb", "0"])


def test_a_spool_bound_below_the_shard_size_rotates_instead_of_dropping(tmp_path: Path) -> None:
    """While uploads work, the spool bound only makes shards rotate sooner."""
    uploaded: list[bytes] = []

    def publish(local: Path, relative: str) -> None:
        uploaded.append(local.read_bytes())
        local.unlink()

    w = ShardWriter(tmp_path, 0, 1 << 20, 60, publish=publish, max_spool_bytes=100)
    for i in range(10):
        line = b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * 30)
        assert w.has_room(len(line))
        w.write("ns/task", [line])
    w.close_all()
    assert sum(b.count(b"\n") for b in uploaded) == 10 and shards(tmp_path) == []


def test_an_object_store_outage_fills_the_spool_to_its_bound_and_no_further(
    tmp_path: Path,
) -> None:
    """Uploads fail for good: records go to the spool up to its bound, those after are
    dropped and counted (spool_full) instead of filling the pod's disk, and what is still in
    the spool when the gateway stops is counted (upload_pending) instead of only logged."""
    pytest.importorskip("fsspec")
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")  # the bucket's prefix is a file: every upload fails
    spool = tmp_path / "spool"
    reasons: Counter[str] = Counter()
    from slm_trainer.redact import default_redactor

    line_size = len(capture_line(item(0), default_redactor())[0])
    bound = 5 * line_size + line_size // 2
    sink = CaptureSink(
        CaptureConfig(target=f"local://{blocker}/calls", spool=str(spool), max_spool_bytes=bound),
        on_dropped=lambda k, n, reason: reasons.update({reason: n}),
    )
    sink.start()
    for i in range(12):
        assert sink.submit(item(i))
        wait_for(lambda: sink.stats.pending == 0, 30)  # one record per batch
    stats = sink.close()
    assert (stats.submitted, stats.written, stats.dropped, stats.pending) == (12, 5, 7, 0)
    assert stats.unsent == 5
    assert reasons == {capture.DROP_SPOOL_FULL: 7, capture.DROP_UPLOAD_PENDING: 5}
    kept = shards(spool, "*.jsonl")
    assert sum(p.stat().st_size for p in kept) <= bound
    assert sum(p.read_bytes().count(b"\n") for p in kept) == 5


SECRET = "sk-TESTSECRET1234567890abcdef"


def test_a_target_down_at_start_keeps_capture_running_and_its_credentials_out_of_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ftp:// store refusing connections when the gateway starts: its filesystem connects
    when built, so the worker died before it was ready and the gateway refused to start,
    blaming the redactor. Now the records wait in the spool, as for any failed upload, and
    are counted; the target's password appears in no log line."""
    pytest.importorskip("fsspec")
    reasons: Counter[str] = Counter()
    sink = CaptureSink(
        CaptureConfig(
            target=f"ftp://alice:{SECRET}@127.0.0.1:1/calls", spool=str(tmp_path / "spool")
        ),
        on_dropped=lambda k, n, reason: reasons.update({reason: n}),
    )
    with caplog.at_level("DEBUG"):
        sink.start()
        assert sink.submit(item(0))
        stats = sink.close()
    assert (stats.submitted, stats.written, stats.unsent) == (1, 1, 1)
    assert reasons == {capture.DROP_UPLOAD_PENDING: 1}
    assert len(shards(tmp_path / "spool")) == 1  # kept where a restart uploads it
    assert SECRET not in caplog.text


def test_a_start_up_error_names_the_target_without_its_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsspec_registry = pytest.importorskip("fsspec.registry")
    monkeypatch.setitem(
        fsspec_registry.known_implementations,
        "slmtestmissing",
        {"class": "slm_no_such_driver.FileSystem", "err": "Install slm-no-such-driver"},
    )
    target = f"slmtestmissing://alice:{SECRET}@store.example/calls?sig={SECRET}#x"
    sink = CaptureSink(CaptureConfig(target=target, spool=str(tmp_path / "spool")))
    with pytest.raises(RuntimeError) as err:
        sink.start()
    assert "slmtestmissing://store.example/calls:" in str(err.value)
    assert SECRET not in str(err.value)


def test_a_worker_that_cannot_load_the_redactor_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway used to guess ("is presidio installed?") from the worker's exit code."""
    import multiprocessing as mp

    import slm_trainer.redact

    def broken() -> None:
        raise ImportError("No module named 'presidio_analyzer'")

    monkeypatch.setattr(slm_trainer.redact, "default_redactor", broken)
    # run here, in the test's own process: its signal handlers and scheduling stay as they are
    monkeypatch.setattr(capture.signal, "signal", lambda *_: None)
    monkeypatch.setattr(capture, "batch_scheduling", lambda: False)
    inbox_r, _inbox_w = mp.Pipe(duplex=False)
    outbox_r, outbox_w = mp.Pipe(duplex=False)
    capture._worker_main(inbox_r, outbox_w, CaptureConfig(target="/nonexistent"), 0)
    assert outbox_r.recv() == (
        "failed",
        "cannot load the redactor: ImportError: No module named 'presidio_analyzer'",
    )


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": -1},  # counters went down; curate refused
        {"prompt_tokens": 1e20, "completion_tokens": 1},  # past 64 bits: could not be encoded
        {"prompt_tokens": "many", "completion_tokens": {}},  # the agent got a 502
        ["not", "an", "object"],
    ],
)
def test_a_served_call_with_odd_llm_usage_is_answered_and_captured_readably(
    tmp_path: Path, usage: Any
) -> None:
    """The LLM's usage numbers are its to report: odd ones must not cost the agent its
    answer, the training log the call, or the counters their monotonicity."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from starlette.testclient import TestClient

    from slm_e2e.testing import send_json
    from slm_gateway.app import create_app
    from slm_gateway.config import GatewayConfig
    from slm_gateway.routes import Route, RouteTable

    class OddLLM(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            answer = {"role": "assistant", "content": "Sunny."}
            choice = {"index": 0, "message": answer, "finish_reason": "stop"}
            send_json(
                self,
                {"id": "x", "object": "chat.completion", "created": 1, "model": "m"}
                | {"choices": [choice], "usage": usage},
            )

        def log_message(self, *_: Any) -> None:
            pass

    llm = ThreadingHTTPServer(("127.0.0.1", 0), OddLLM)
    threading.Thread(target=llm.serve_forever, daemon=True).start()
    try:
        table = RouteTable()
        url = f"http://127.0.0.1:{llm.server_port}/v1"
        table.replace_all(
            [Route(task="weather", namespace="ns", mode="llm", llm_base_url=url, llm_model="m")]
        )
        app = create_app(GatewayConfig(capture=CaptureConfig(target=str(tmp_path))), table)
        with TestClient(app) as c:
            ask = {"model": "weather", "messages": [{"role": "user", "content": "Weather?"}]}
            r = c.post("/v1/chat/completions", json=ask)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "Sunny."
            text = c.get("/metrics").text
        tokens = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("slm_gateway_tokens_total{")
        ]
        assert tokens and all(0 <= t < 2**63 for t in tokens), tokens
    finally:
        llm.shutdown()
    lines = [line for p in tmp_path.rglob("*.jsonl") for line in p.read_text().splitlines()]
    assert len(lines) == 1
    record = CallRecord.from_json(lines[0])  # what curate reads: not a malformed line
    assert record.response["content"] == "Sunny." and record.prompt_tokens >= 0


def _hanging_store() -> tuple[Any, int]:
    """A server that accepts connections and never answers (a black-holed endpoint)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[Any] = []
    threading.Thread(
        target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True
    ).start()
    return server, server.getsockname()[1]


def test_a_store_that_hangs_neither_holds_back_the_start_nor_stops_capture(
    tmp_path: Path,
) -> None:
    """A gateway restarted while its object store hangs, with a shard an earlier run left in
    the spool: the worker uploaded it before it reported ready, the gateway gave up after
    start_timeout_s and never started (blaming the redactor). The shard now waits for the
    worker's loop, whose uploads are bounded, so records are written meanwhile."""
    pytest.importorskip("fsspec")
    server, port = _hanging_store()
    target, spool = f"ftp://127.0.0.1:{port}/calls", tmp_path / "spool"
    left = capture.spool_dir(str(spool), target) / "ns" / "task"
    left.mkdir(parents=True)
    old = left / (shard_name("gateway-old-pod", 4242, 0, 1, time.time() - 900) + ".jsonl")
    old.write_bytes(b'{"a":1}\n')
    os.utime(old, (time.time() - 900, time.time() - 900))
    sink = CaptureSink(
        CaptureConfig(target=target, spool=str(spool), start_timeout_s=15.0, upload_timeout_s=0.5)
    )
    try:
        sink.start()
        for i in range(5):
            assert sink.submit(item(i))
        assert wait_for(lambda: sink.stats.written == 5, 10), sink.stats
        assert sink._workers[0].alive
    finally:
        began = time.monotonic()
        stats = sink.close(timeout=10)
        server.close()
    assert time.monotonic() - began < 5  # no upload held the worker's shutdown either
    assert (stats.written, stats.dropped) == (5, 0)
    # still in the spool for the next start (taken over: renamed into the worker's sequence)
    assert [p.read_bytes() for p in left.glob("*.jsonl")] == [b'{"a":1}\n']


def test_a_worker_late_to_report_ready_is_named_for_what_it_is(tmp_path: Path) -> None:
    """The error blamed the redactor's import, whereas the worker's start-up (then: uploads of
    what was left in the spool) could be what took the time."""
    sink = CaptureSink(CaptureConfig(target=str(tmp_path), start_timeout_s=0.05))
    with pytest.raises(RuntimeError, match=r"did not report ready within 0\.05 s"):
        sink.start()


def test_a_failed_start_stops_the_workers_it_had_started(tmp_path: Path) -> None:
    """Worker 1 failing to start left worker 0 running: it ignores SIGTERM, close() did
    nothing for a sink never started, and the interpreter's exit joined it for ever, so the
    gateway whose start failed never exited."""
    sink = CaptureSink(CaptureConfig(target=str(tmp_path), workers=2))
    started: list[Any] = []
    real = sink._spawn

    def spawn(index: int, crashes: int = 0) -> Any:
        if index == 1:
            raise RuntimeError("capture worker 1 could not start: no redactor")
        worker = real(index, crashes)
        started.append(worker.proc)
        return worker

    sink._spawn = spawn  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="no redactor"):
            sink.start()
        assert len(started) == 1 and not started[0].is_alive()
        assert sink._workers == []
    finally:
        for proc in started:
            proc.kill()
            proc.join(5)


def test_shards_waiting_for_their_upload_hold_no_open_files(tmp_path: Path) -> None:
    """Each shard waiting for its upload kept an open file (its lock): a long outage reached
    the open-files limit, new records were dropped (write_failed), and once the store was
    back no upload could open its shard. The shards still cannot be taken by another
    writer, in another process, while their writer lives."""
    import subprocess
    import sys

    store = FlakyStore()
    w = ShardWriter(tmp_path, 0, 1 << 20, 300, publish=store, clock=Clock())
    before = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        w.write(f"ns/t{i}", [b'{"r":%d}\n' % i])
    w.close_all()
    assert w.pending_uploads == 50
    # One lock for them all (other tests' helper threads may open or close a few meanwhile).
    assert len(os.listdir("/proc/self/fd")) - before <= 5
    for path in shards(tmp_path):
        os.utime(path, (time.time() - 10_000, time.time() - 10_000))  # stale, as in an outage
    sweep = (
        "import sys; from pathlib import Path; from slm_gateway.capture import ShardWriter; "
        "w = ShardWriter(Path(sys.argv[1]), 1, 1 << 20, 300, publish=lambda *a: None); "
        "print(w.recover_orphans())"
    )
    other = subprocess.run(
        [sys.executable, "-c", sweep, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == "0" and len(shards(tmp_path)) == 50
    store.outage = False
    w.retry_uploads(force=True)
    assert len(store.uploaded) == 50 and shards(tmp_path) == [] and w.pending_uploads == 0
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_worker_may_open_as_many_files_as_its_hard_limit_allows(tmp_path: Path) -> None:
    """A worker holds a file per task with an open shard; the soft limit (1024 in many
    container runtimes) is raised to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    if low == hard:
        pytest.skip("the hard limit of open files is too low to lower the soft one")
    sink = CaptureSink(CaptureConfig(target=str(tmp_path)))
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        sink.start()  # the worker inherits the low soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{sink._workers[0].proc.pid}/limits").read_text()
    finally:
        sink.close()
    (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]


@pytest.mark.parametrize("suffix", [capture.SHARD_SUFFIX, capture.PART_SUFFIX])
def test_a_dead_writers_shard_is_taken_and_uploaded_by_one_worker_only(
    tmp_path: Path, suffix: str
) -> None:
    """A shard waiting for upload is protected by its writer's lock, found through the writer
    its name gives. Taken over from a dead writer, it kept the dead writer's name, whose lock
    is always free, so a second worker's sweep took it too: uploaded and counted twice."""
    shard = tmp_path / "ns" / "t" / (capture.shard_name("gone", 999_999, 0, 1, 0.0) + suffix)
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b'{"a":1}\n{"a":2}\n')
    os.utime(shard, (1.0, 1.0))  # untouched for longer than any live writer keeps a shard
    uploads: list[str] = []

    def store_down(local: Path, relative: str) -> None:
        raise OSError("store down")

    a = capture.ShardWriter(tmp_path, 0, 1 << 20, 60.0, store_down)
    b = capture.ShardWriter(tmp_path, 1, 1 << 20, 60.0, store_down)
    a.recover_orphans()
    b.recover_orphans()
    assert (a.pending_uploads, b.pending_uploads) == (1, 0)
    assert dict(a.unsent()) == {"ns/t": 2} and not b.unsent()

    def store_back(local: Path, relative: str) -> None:
        uploads.append(relative)
        local.unlink()

    a.publish = b.publish = store_back
    for w in (a, b):
        w.retry_uploads(force=True)
    assert len(uploads) == 1 and uploads[0].startswith("ns/t/"), uploads
    assert not list((tmp_path / "ns" / "t").iterdir())
