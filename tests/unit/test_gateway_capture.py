"""Capture (S1): shard rotation, redaction in worker processes, flush on close, drop counting."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from slm_contract import CallRecord
from slm_gateway.capture import CaptureConfig, Captured, CaptureSink, ShardWriter


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
    sink = CaptureSink(CaptureConfig(target=str(tmp_path / "calls"), workers=2, batch_size=16))
    sink.start()
    for i in range(300):
        assert sink.submit(item(i, key="weather" if i % 3 else "ns/extract"))
    sink.submit(item(999, request=b"not json"))  # cannot be redacted: dropped, never written
    stats = sink.close()
    assert (stats.submitted, stats.written, stats.dropped) == (301, 300, 1)
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


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    dropped: list[tuple[str, int]] = []
    sink = CaptureSink(
        CaptureConfig(target=str(tmp_path), queue_size=2),
        on_dropped=lambda k, n: dropped.append((k, n)),
    )  # not started: nothing drains the queue
    results = [sink.submit(item(i)) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert sink.stats.dropped == 3 and dropped == [("weather", 1)] * 3


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
