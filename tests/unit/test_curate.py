"""The curate stage: what a platform engineer sees in train/eval files and curate_report.json."""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import known_implementations
from fsspec.spec import AbstractFileSystem

from slm_contract import CallRecord, TrainerResult
from slm_trainer import curate as curate_mod
from slm_trainer.curate import (
    Args,
    assign_split,
    distinct_count,
    exact_key,
    llm_only_tools,
    run,
    shingles,
    stratum,
)

CITIES = [
    "Paris",
    "Berlin",
    "Rome",
    "Tokyo",
    "Lima",
    "Oslo",
    "Cairo",
    "Delhi",
    "Austin",
    "Quito",
    "Seoul",
    "Perth",
    "Lagos",
    "Hanoi",
    "Dublin",
    "Prague",
    "Nairobi",
    "Zurich",
]


def call(
    user: str,
    tool: str | None = None,
    args: dict[str, Any] | None = None,
    content: str = "",
    call_id: str = "call_0",
    task: str = "assistant",
) -> dict[str, Any]:
    response: dict[str, Any] = {"role": "assistant", "content": content}
    if tool:
        response["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": tool, "arguments": json.dumps(args or {})},
            }
        ]
    return {
        "task": task,
        "backend": "llm",
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a travel agent."},
            {"role": "user", "content": user},
        ],
        "tools": [
            {"type": "function", "function": {"name": n}}
            for n in ("get_weather", "book_table", "send_email")
        ],
        "response": response,
    }


def tool_calls(n_weather: int = 20, n_booking: int = 6, n_email: int = 2) -> list[dict[str, Any]]:
    """Distinct tool-calling records: prompts differ in several words, not just one."""
    out = []
    for i in range(n_weather):
        c = CITIES[i % len(CITIES)]
        out.append(
            call(
                f"Will it rain in {c} on day {i} of the trip? Answer in {i % 3 + 1} lines",
                "get_weather",
                {"city": c, "day": i},
                call_id=f"w{i}",
            )
        )
    for i in range(n_booking):
        c = CITIES[-1 - i]
        out.append(
            call(
                f"Book {i + 2} seats at a quiet {c} bistro for the evening of the {i}th",
                "book_table",
                {"city": c, "people": i + 2},
                call_id=f"b{i}",
            )
        )
    for i in range(n_email):
        out.append(
            call(
                f"Tell team {i} by email that the offsite is cancelled, sorry about {i}",
                "send_email",
                {"to": f"team{i}@corp.example.com"},
                call_id=f"e{i}",
            )
        )
    return out


def write_log(path: Path, lines: list[Any]) -> Path:
    with path.open("wb") as fh:
        for line in lines:
            if isinstance(line, bytes):
                fh.write(line + b"\n")
            elif isinstance(line, str):
                fh.write(line.encode() + b"\n")
            else:
                fh.write(json.dumps(line).encode() + b"\n")
    return path


def curate(tmp_path: Path, lines: list[Any], **kwargs: Any) -> tuple[Any, dict[str, Any], Path]:
    log = write_log(tmp_path / "calls.jsonl", lines)
    out = tmp_path / kwargs.pop("out", "out")
    result = run(Args(input=log, output_dir=out, **kwargs))
    report = json.loads((out / "curate_report.json").read_text())
    return result, report, out


def read(path: Path) -> list[CallRecord]:
    return [CallRecord.from_json(line) for line in path.read_text().splitlines()]


def test_malformed_lines_are_counted_by_reason_and_skipped(tmp_path: Path) -> None:
    good = tool_calls(12, 0, 0)
    bad = [
        "{not json",
        "[1, 2, 3]",
        {**good[0], "task": ""},
        {**good[0], "messages": []},
        {**good[0], "response": "text"},
        {**good[0], "tools": "all"},
        {**good[0], "schema": "slmfleet.dev/call-record/v0"},
        b'{"task": "\xff\xfe"}',
        call("no answer at all"),
        "",
    ]
    result, report, out = curate(tmp_path, good[:6] + bad + good[6:], min_examples=5)
    assert result.ok, result.message
    assert report["malformed"] == {
        "empty_response": 1,
        "invalid_json": 1,
        "invalid_messages": 1,
        "invalid_response": 1,
        "invalid_task": 1,
        "invalid_tools": 1,
        "invalid_utf8": 1,
        "not_an_object": 1,
        "unsupported_schema": 1,
    }
    assert report["malformed_total"] == 9
    assert report["blank"] == 1
    assert report["read"] == 12 + 9
    assert report["examples"] == 12
    samples = report["error_samples"]
    assert len(samples) == 5  # max_error_samples
    assert [s["line"] for s in samples] == [7, 8, 9, 10, 11]
    assert samples[0]["reason"] == "invalid_json"
    assert samples[0]["file"] == "calls.jsonl"
    assert len(read(out / "train.jsonl")) + len(read(out / "eval.jsonl")) == 12


def test_exact_and_near_duplicates_are_dropped(tmp_path: Path) -> None:
    base = tool_calls(12, 0, 0)
    dupes = [
        # Same call, another tool-call id and different whitespace: an exact duplicate.
        {
            **base[0],
            "response": {
                **base[0]["response"],
                "tool_calls": [{**base[0]["response"]["tool_calls"][0], "id": "call_retry"}],
            },
            "messages": [
                base[0]["messages"][0],
                {"role": "user", "content": "  " + base[0]["messages"][1]["content"]},
            ],
        },
        # Same prompt up to case and punctuation, and a different answer: a near duplicate.
        call(base[1]["messages"][1]["content"].upper() + "!!", "get_weather", {"city": "X"}),
        base[2],
    ]
    base = [{**r, "timestamp": 1000.0 + i} for i, r in enumerate(base)]
    dupes[0]["timestamp"] = 2000.0  # the retry came later; it is first in the log
    result, report, out = curate(tmp_path, dupes[:1] + base + dupes[1:], min_examples=5)
    assert result.ok
    assert report["exact_duplicates"] == 2
    assert report["near_duplicates"] == 1
    assert report["examples"] == 12
    kept = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert all(r.response["tool_calls"][0]["id"] != "call_retry" for r in kept)

    _, report_off, _ = curate(
        tmp_path, base + dupes, min_examples=5, near_dup_threshold=1.0, out="out_off"
    )
    assert report_off["near_duplicates"] == 0
    assert report_off["examples"] == 13


def test_templated_calls_that_differ_in_a_value_and_its_answer_are_all_kept(
    tmp_path: Path,
) -> None:
    """The calls an agent repeats are templated: one long request in which only the order
    id changes, and the tool call carries that id. Compared on the request alone, they were
    near duplicates of each other: 39 of 40 dropped, and the task never reached minExamples.
    Each is an example of filling the id; the same request answered two ways stays one."""
    template = (
        "You are processing a customer support ticket. The customer says the package never "
        "arrived and asks for a refund to the original payment method; the courier left no "
        "note and tracking has not updated for two weeks. Order id: {}."
    )
    calls = [
        {**call(template.format(100000 + 7919 * i), "refund", {"order_id": 100000 + 7919 * i})}
        for i in range(40)
    ]
    # the first request again, answered with another tool: a conflicting label, not an example
    calls.append(call(template.format(100000), "escalate", {"order_id": 100000}))
    result, report, out = curate(tmp_path, calls, min_examples=10, scrub_pii=False)
    assert result.ok, result.message
    assert (report["examples"], report["near_duplicates"]) == (40, 1)
    assert len(read(out / "eval.jsonl")) == 4  # the default 10 % held out


def test_a_tool_calls_lead_in_line_or_a_deep_answer_does_not_make_an_example_of_its_own(
    tmp_path: Path,
) -> None:
    """The same tool call with another lead-in line ("One moment.") is the same answer; an
    answer of brackets nested thousands deep is text, not a crash of discover."""
    long = (
        "Please look up the weather for the city of Oslo for the third day of the coming week, "
        "I need it for planning a trip with my family and we want to know if it will rain or "
        "not during the afternoon when we plan to walk around the old town and the harbour {}"
    )
    calls = []
    for word, lead in (("now", "Let me check."), ("today", "One moment."), ("please", "")):
        c = call(long.format(word), "get_weather", {"city": "Oslo", "day": 3})
        c["response"]["content"] = lead
        calls.append(c)
    deep = call("answer with nested brackets", content="[" * 5000 + "]" * 5000)
    calls += [deep, *tool_calls(12, 0, 0)]
    result, report, _ = curate(tmp_path, calls, min_examples=5, scrub_pii=False)
    assert result.ok, result.message
    assert report["near_duplicates"] == 2 and report["examples"] == 14
    records = [CallRecord.from_json(json.dumps(c)) for c in calls]
    assert distinct_count(records) == 14


def test_near_identical_requests_answered_in_prose_stay_one_example(tmp_path: Path) -> None:
    """A model learns nothing from two phrasings of one answer: near-identical requests that
    the LLM answered in words are still one example, whatever the words (only tool calls and
    JSON answers make a variant an example of its own)."""
    complaint = (
        "I ordered a blue kettle three weeks ago and it still has not arrived, the tracking page "
        "has said in transit for ten days and nobody answers the phone at the depot, the seller "
        "told me to wait another week but my mother needs it for her birthday on the weekend "
        "and I am running out of patience with the whole thing, what should I do {}"
    )
    replies = {"now": "We will check.", "today": "Let me look.", "please": "We are on it."}
    calls = [
        call(complaint.format(word), content=f"Sorry about the delay. {reply}")
        for word, reply in replies.items()
    ]
    calls += tool_calls(12, 0, 0)
    result, report, _ = curate(tmp_path, calls, min_examples=5, scrub_pii=False)
    assert result.ok, result.message
    assert report["near_duplicates"] == 2 and report["examples"] == 13


def test_the_same_calls_in_any_order_curate_to_the_same_files(tmp_path: Path) -> None:
    """Gateway replicas write shards whose order and contents depend on timing; a retrain on
    the same calls must see the same training set, in the same order, or its model changes
    for no reason. Of identical calls the earliest capture is kept; of near duplicates the
    one first in content-hash order."""
    calls = [
        {**r, "timestamp": 1000.0 + i, "request_id": f"req-{i}"}
        for i, r in enumerate(tool_calls(20, 6, 2))
    ]
    retries = [
        {**calls[i], "timestamp": 5000.0 + i, "request_id": f"retry-{i}", "latency_ms": 9.0}
        for i in (0, 3, 21)
    ]
    near = [
        {
            **call(calls[i]["messages"][1]["content"].upper() + "!!", "get_weather", {"city": "X"}),
            "timestamp": 6000.0 + i,
        }
        for i in (1, 2)
    ]
    lines = calls + retries + near

    seen = []
    for attempt in range(4):
        order = list(lines)
        random.Random(attempt).shuffle(order)
        log = tmp_path / f"log{attempt}"
        log.mkdir()
        write_log(log / "a.jsonl", order[: 7 + attempt])
        write_log(log / "b.jsonl", order[7 + attempt :])
        out = tmp_path / f"out{attempt}"
        assert run(Args(input=log, output_dir=out, min_examples=5)).ok
        report = json.loads((out / "curate_report.json").read_text())
        for volatile in ("input", "files", "seconds"):
            del report[volatile]
        seen.append(((out / "train.jsonl").read_bytes(), (out / "eval.jsonl").read_bytes(), report))

    assert all(s == seen[0] for s in seen[1:])
    report = seen[0][2]
    assert (report["exact_duplicates"], report["near_duplicates"]) == (3, 2)
    kept = read(tmp_path / "out0" / "train.jsonl") + read(tmp_path / "out0" / "eval.jsonl")
    assert len(kept) == 28
    assert not [r.request_id for r in kept if r.request_id.startswith("retry")]


def test_captures_of_one_call_that_redact_apart_curate_alike_in_any_order(tmp_path: Path) -> None:
    """Two captures equal but for whitespace count as one call before redaction, yet the
    redactor sees whitespace (a phone number split over lines is not found). When the earlier
    capture came last, curate replaced the later one's entry, and with it a third user's call
    that had redacted to the same text: one log order gave 2 examples, the other 1."""

    def capture(text: str, timestamp: float, request_id: str) -> dict[str, Any]:
        return {
            **call(text, content="I will call you back shortly."),
            "timestamp": timestamp,
            "request_id": request_id,
        }

    r1 = capture("call me at 415 555 0123 please", 2.0, "r1")
    r2 = capture("call me at 415\n555\n0123 please", 1.0, "r2")
    r3 = capture("call me at 212 555 0199 please", 3.0, "r3")
    written = []
    for name, order in (("a", [r1, r3, r2]), ("b", [r2, r1, r3]), ("c", [r3, r2, r1])):
        result, report, out = curate(tmp_path, order, out=name, min_examples=1, eval_fraction=0)
        assert result.examples == 2, (name, result.message)
        del report["seconds"]
        written.append(((out / "train.jsonl").read_bytes(), report))
    assert written[1] == written[0] and written[2] == written[0]
    assert b"415 555 0123" not in written[0][0] and b"212 555 0199" not in written[0][0]


def test_max_examples_keeps_the_calls_with_the_smallest_hash_whatever_the_order(
    tmp_path: Path,
) -> None:
    """A task's log only grows, and curate holds every distinct call it keeps: past
    ``max_examples`` it keeps a sample, the calls with the smallest content hash. That sample
    must be what the whole log's curation holds below that hash (near duplicates included,
    since they are compared in hash order), the same in any log order, with the earliest
    capture of each call, and every call left out counted."""
    calls = [
        {**r, "timestamp": 1000.0 + i, "request_id": f"req-{i}"}
        for i, r in enumerate(tool_calls(40, 12, 4))
    ]
    retries = [
        {**calls[i], "timestamp": 5000.0 + i, "request_id": f"retry-{i}"} for i in range(0, 56, 3)
    ]
    near = [
        {**call(calls[i]["messages"][1]["content"].upper() + "!!", "get_weather"), "timestamp": 9.0}
        for i in range(0, 40, 5)
    ]
    # Equal once redacted: one distinct call, whichever of them is read first.
    same_once_redacted = [
        call(f"Mail {who}@corp.example.com the roster", "send_email", {"to": f"{who}@x.example"})
        for who in ("ann", "bob", "cyd")
    ]
    lines = calls + retries + near + same_once_redacted

    def curated(order: list[Any], out: str, **kw: Any) -> tuple[dict[str, str], dict[str, Any]]:
        result, report, path = curate(tmp_path, order, out=out, min_examples=1, **kw)
        assert result.ok, result.message
        kept = {
            exact_key(CallRecord.from_json(line)): line
            for name in ("train.jsonl", "eval.jsonl")
            for line in (path / name).read_text().splitlines()
        }
        return kept, report

    whole, whole_report = curated(lines, "whole")
    bound = 30
    samples = []
    for attempt in range(3):
        order = list(lines)
        random.Random(attempt).shuffle(order)
        samples.append(curated(order, f"bound{attempt}", max_examples=bound))
    kept, report = samples[0]
    assert all(s[0] == kept for s in samples[1:])
    assert len(kept) <= bound < len(whole)
    assert kept == {k: line for k, line in whole.items() if k <= max(kept)}
    assert not [line for line in kept.values() if '"retry-' in line]  # earliest captures
    assert report["beyond_max_examples"] + report["near_duplicates"] + len(kept) == (
        whole_report["near_duplicates"] + len(whole)
    )
    assert report["beyond_max_examples"] > 0
    assert report["exact_duplicates"] == whole_report["exact_duplicates"]
    assert report["settings"]["max_examples"] == bound
    again = run(Args(input=tmp_path / "calls.jsonl", output_dir=tmp_path / "m", max_examples=bound))
    left_out = report["beyond_max_examples"]
    assert f"{left_out} distinct calls beyond max_examples {bound} left out" in again.message


def test_max_examples_is_reached_when_near_duplicates_thin_the_sample(tmp_path: Path) -> None:
    """The sample was drawn among distinct calls before near duplicates were dropped: with
    three near copies of each request (an agent's retries in other casing), 300 distinct
    calls gave 39 examples for a maxExamples of 100, and a task whose minExamples equals it
    waited for data for ever. Curate now reads on, in hash order, until it has 100."""
    lines = []
    for i in range(100):
        text = f"Will it rain in {CITIES[i % 18]} on day {i} of the trip? Answer in {i % 3} lines"
        lines += [
            call(variant, "get_weather", {"city": CITIES[i % 18], "day": i})
            for variant in (text, text.upper(), text.lower() + "!")
        ]
    result, report, out = curate(tmp_path, lines, min_examples=100, max_examples=100)
    assert result.ok, result.message
    assert report["examples"] == 100
    assert report["near_duplicates"] + report["beyond_max_examples"] + 100 == 300
    kept = {exact_key(r): r for r in read(out / "train.jsonl") + read(out / "eval.jsonl")}
    assert len({r.response["tool_calls"][0]["function"]["arguments"] for r in kept.values()}) == 100
    # the first 100 in hash order of what curate keeps without the bound, as before
    _, _, whole_out = curate(tmp_path, lines, out="whole", min_examples=1)
    whole = {
        exact_key(r): r for r in read(whole_out / "train.jsonl") + read(whole_out / "eval.jsonl")
    }
    assert kept == {k: r for k, r in whole.items() if k <= max(kept)}


def test_reading_on_holds_no_more_calls_than_a_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each further reading fetched a whole sample (1.25 x maxExamples) beside the examples
    already kept: up to 2.25 x held at once, where the docs promise 1.25 x."""
    lines = []
    for i in range(110):
        text = f"Will it rain in {CITIES[i % 18]} on day {i} of the trip? Answer in {i % 3} lines"
        lines += [
            call(variant, "get_weather", {"city": CITIES[i % 18], "day": i})
            for variant in (text, text.upper(), text.lower() + "!", text + " Thanks", text + "?")
        ]
    held: list[int] = []
    fetch = curate_mod._fetch
    kept_now: list[int] = [0]

    def counting_fetch(*a: Any) -> Any:
        more = fetch(*a)
        held.append(kept_now[0] + len(more))
        return more

    filter_near = curate_mod._filter_near

    def counting_filter(unique: Any, near: Any, kept: list[Any], limit: int) -> int:
        dupes = filter_near(unique, near, kept, limit)
        kept_now[0] = len(kept)  # beside what the next reading fetches
        return dupes

    monkeypatch.setattr(curate_mod, "_fetch", counting_fetch)
    monkeypatch.setattr(curate_mod, "_filter_near", counting_filter)
    result, report, _ = curate(tmp_path, lines, min_examples=100, max_examples=100)
    assert result.ok and report["examples"] == 100, result.message
    assert held and max(held) <= 125, held


def test_calls_with_custom_tools_are_counted_and_never_curated(tmp_path: Path) -> None:
    """The gateway now takes OpenAI's custom (free-form) tools, sends such calls to the LLM
    and captures them; curate trained on them as function calls with no name, which the SLM
    would have learnt to make, on requests it is never sent."""
    custom = {"type": "custom", "custom": {"name": "apply_patch"}}
    offered = [{**c, "tools": [*c["tools"], custom]} for c in tool_calls(4, 0, 0)]
    answered = []
    for i, c in enumerate(tool_calls(3, 0, 0)):
        c = {**c, "tools": [*c["tools"], custom], "messages": [*c["messages"]]}
        c["messages"][1] = {"role": "user", "content": f"patch file {i} of the repo please"}
        c["response"] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": f"p{i}", "type": "custom", "custom": {"name": "apply_patch", "input": "x"}}
            ],
        }
        answered.append(c)
    result, report, out = curate(tmp_path, tool_calls() + offered + answered, scrub_pii=False)
    assert result.ok, result.message
    assert report["llm_only_tools"] == 7 and "7 with custom tools" in result.message
    written = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert all(t.get("type", "function") == "function" for r in written for t in r.tools)
    assert report["examples"] == len(tool_calls())


def strict_and_custom_history_calls() -> list[dict[str, Any]]:
    """Calls the gateway never sends to an SLM that curate trained on: 4 with a strict
    function offered, 3 with a custom call earlier in the conversation."""
    strict = []
    for i, c in enumerate(tool_calls(4, 0, 0)):
        tools = [{**t, "function": {**t["function"], "strict": True}} for t in c["tools"]]
        user = {"role": "user", "content": f"Strictly, how hot is it in {CITIES[i]} on day {i}?"}
        strict.append({**c, "tools": tools, "messages": [c["messages"][0], user]})
    history = []
    for i, c in enumerate(tool_calls(3, 0, 0)):
        custom = {"id": f"x{i}", "type": "custom", "custom": {"name": "run_sql", "input": "1"}}
        earlier = [
            {"role": "user", "content": f"Count the rows of table {i}, then check the weather"},
            {"role": "assistant", "content": None, "tool_calls": [custom]},
            {"role": "tool", "tool_call_id": f"x{i}", "content": str(i)},
        ]
        history.append({**c, "messages": [c["messages"][0], *earlier]})
    return strict + history


def test_calls_with_a_strict_tool_or_an_earlier_custom_call_are_never_curated(
    tmp_path: Path,
) -> None:
    """The gateway sends a request with a strict function, or with a custom call in its
    history, to the LLM; curate trained and gated on such calls (and discover counted them
    toward minExamples), so a candidate was scored on calls it is never asked."""
    odd = strict_and_custom_history_calls()
    result, report, out = curate(tmp_path, tool_calls() + odd, scrub_pii=False)
    assert result.ok, result.message
    assert report["llm_only_tools"] == 7
    assert "7 with custom tools, strict functions, non-text content or marked llm_only" in (
        result.message
    )
    assert report["examples"] == len(tool_calls())
    written = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert not any(t["function"].get("strict") for r in written for t in r.tools)
    records = [CallRecord.from_dict(r) for r in tool_calls() + odd]
    assert distinct_count(records) == len(tool_calls())  # what discover proposes


def test_calls_the_gateway_marked_llm_only_are_never_curated(tmp_path: Path) -> None:
    """tool_choice "none", n > 1, logprobs and a JSON response_format are not in the record:
    curate trained on such calls (the text answer "none" forced, with tools offered, as if
    the LLM had chosen text) until the gateway marked them llm_only."""
    forced = [
        {**c, "llm_only": True, "response": {"role": "assistant", "content": f"Mild, {i} C"}}
        for i, c in enumerate(tool_calls(4, 0, 0))
    ]
    result, report, out = curate(tmp_path, tool_calls()[4:] + forced, scrub_pii=False)
    assert result.ok, result.message
    assert (report["llm_only_tools"], report["examples"]) == (4, len(tool_calls()) - 4)
    written = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert not any(r.llm_only or not r.response.get("tool_calls") for r in written)
    assert distinct_count(CallRecord.from_dict(r) for r in forced) == 0  # what discover proposes


def image_audio_and_file_calls() -> list[dict[str, Any]]:
    """Calls with an image, audio or file part in the request: the gateway took them for
    the text-only SLM, and curate trained on the answers to pictures it never sees."""
    parts = [
        {"type": "image_url", "image_url": {"url": "https://x.example/sky.png"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ]
    out = []
    for i, (c, part) in enumerate(zip(tool_calls(3, 0, 0), parts, strict=True)):
        text = {"type": "text", "text": f"Is it raining where this was taken, take {i}?"}
        user = {"role": "user", "content": [text, part]}
        out.append({**c, "messages": [c["messages"][0], user]})
    return out


def test_calls_with_image_audio_or_file_parts_are_counted_and_never_curated(
    tmp_path: Path,
) -> None:
    """The SLM reads text only, so the gateway sends such a call to the LLM; trained on, the
    SLM learnt to answer a photo's question from the words alone."""
    odd = image_audio_and_file_calls()
    result, report, out = curate(tmp_path, tool_calls() + odd, scrub_pii=False)
    assert result.ok, result.message
    assert (report["llm_only_tools"], report["examples"]) == (3, len(tool_calls()))
    written = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert all(isinstance(m.get("content"), str | None) for r in written for m in r.messages)


def test_curate_leaves_out_exactly_what_the_gateway_never_sends_to_an_slm() -> None:
    """Both sides read the same request fields the same way: a call is curated when, and
    only when, the gateway could send its request to an SLM (tools and history alike)."""
    from slm_gateway.decide import slm_can_serve

    for c in tool_calls(2, 0, 0) + strict_and_custom_history_calls() + image_audio_and_file_calls():
        record = CallRecord.from_dict(c)
        body = {"model": "m", "messages": record.messages, "tools": record.tools}
        assert slm_can_serve(body) is not llm_only_tools(record), c["messages"]


def test_an_answer_of_blank_text_parts_or_an_image_alone_is_empty(tmp_path: Path) -> None:
    """Blank content is no answer, and nor is blank text in content parts or an image part
    alone: the chat format trains all of them as an empty answer, which curate kept as an
    example (the SLM learnt to answer nothing)."""
    empty = [
        [{"type": "text", "text": "   "}],
        [{"type": "text", "text": ""}, {"type": "text", "text": "\n"}],
        [{"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}],
    ]
    odd = [
        {**c, "response": {"role": "assistant", "content": e}}
        for c, e in zip(tool_calls(3, 0, 0), empty, strict=True)
    ]
    spoken = {
        **tool_calls(4, 0, 0)[3],
        "response": {"role": "assistant", "content": [{"type": "text", "text": " It is sunny. "}]},
    }
    result, report, _ = curate(tmp_path, tool_calls(12, 0, 0)[4:] + odd + [spoken], min_examples=5)
    assert result.ok, result.message
    assert report["malformed"] == {"empty_response": 3}
    assert report["examples"] == 9


def test_an_answer_the_chat_format_trains_as_text_is_not_empty(tmp_path: Path) -> None:
    """A bare string part and a non-string text are trained as their text by the chat
    format; curate judged them by another rule and dropped them as empty_response."""
    odd = [["It is sunny"], [{"type": "text", "text": 42}]]
    answers = [
        {**c, "response": {"role": "assistant", "content": e}}
        for c, e in zip(tool_calls(2, 0, 0), odd, strict=True)
    ]
    result, report, _ = curate(tmp_path, tool_calls(12, 0, 0)[2:] + answers, min_examples=5)
    assert result.ok, result.message
    assert report["malformed"] == {}
    assert report["examples"] == 12


def test_answers_with_no_text_of_any_kind_are_counted_not_trained_nor_fatal(
    tmp_path: Path,
) -> None:
    """``tool_calls`` that is a number crashed the whole stage (every rerun of the task's data
    prep), and a null text part or object content was trained as Python's "None" or a dict's
    repr; each is now an empty answer, counted and skipped."""
    odd: list[dict[str, Any]] = [
        {"role": "assistant", "tool_calls": 5},
        {"role": "assistant", "tool_calls": True},
        {"role": "assistant", "content": [{"type": "text", "text": None}]},
        {"role": "assistant", "content": {"type": "text", "text": "hi"}},
    ]
    answers = [{**c, "response": r} for c, r in zip(tool_calls(4, 0, 0), odd, strict=True)]
    result, report, _ = curate(tmp_path, tool_calls(14, 0, 0)[4:] + answers, min_examples=5)
    assert result.ok, result.message
    assert report["malformed"] == {"empty_response": 4}
    assert report["examples"] == 10


def test_retries_stamped_with_a_time_and_request_id_are_one_example(tmp_path: Path) -> None:
    """An agent framework stamps every call; on a short request a retry's one changed token
    put it far below the similarity threshold, and the copies landed on both sides of the
    split (every eval example had its twin in train). A date or a number that is the request
    still tells calls apart."""
    retries = []
    for i in range(12):
        for k in range(3):
            stamp = f"2026-12-0{k + 1}T10:{i:02d}:00Z req-{(i * 7919 + k * 104729):08x}ab"
            retries.append(
                call(
                    f"[{stamp}] What is the weather in {CITIES[i]} tomorrow?",
                    "get_weather",
                    {"city": CITIES[i]},
                    call_id=f"r{i}-{k}",
                )
            )
    days = [
        call(f"Book a table in {CITIES[0]} on 2026-12-{d:02d}", "book_table", {"day": d})
        for d in range(1, 13)
    ]
    result, report, _ = curate(tmp_path, retries + days, min_examples=10, scrub_pii=False)
    assert result.ok, result.message
    assert (report["examples"], report["near_duplicates"]) == (24, 24)


def test_retries_stamped_in_the_system_prompt_are_one_example(tmp_path: Path) -> None:
    """Frameworks as often stamp the system prompt (current time, request id) as the user
    turn. Near duplicates are only looked for among calls with the same instructions, and
    the stamp put every call in a group of its own: 10 requests retried 3 times each gave 30
    examples, 0 near duplicates dropped, and eval examples whose twin was in train (the gate
    scored memorisation). Discover's distinct count, proposed as minExamples, follows."""
    retries = []
    for i in range(10):
        for k in range(3):
            system = (
                f"You are a weather bot. Current time: 2026-03-0{k + 1}T10:{i:02d}:{k:02d}Z. "
                f"Request id {uuid.UUID(int=i * 3 + k + 1)} ({0x9F8E7D6C0000 + i * 3 + k:x})."
            )
            retry = call(
                f"What is the weather in {CITIES[i]} right now?",
                "get_weather",
                {"city": CITIES[i]},
                call_id=f"r{i}-{k}",
            )
            retry["messages"][0]["content"] = system
            retries.append({**retry, "timestamp": 1000.0 + 10 * i + k, "request_id": f"q{i}-{k}"})
    result, report, out = curate(tmp_path, retries, min_examples=5, scrub_pii=False)
    assert result.ok, result.message
    assert (report["examples"], report["near_duplicates"]) == (10, 20)
    train, evals = read(out / "train.jsonl"), read(out / "eval.jsonl")
    asked = {r.messages[1]["content"] for r in train}
    assert evals and not [r for r in evals if r.messages[1]["content"] in asked]
    records = [CallRecord.from_json(json.dumps(r)) for r in retries]
    assert distinct_count(records) == 10
    # a stamp is no instruction, but the system prompt's words still are
    other = json.loads(json.dumps(retries[0]).replace("weather bot", "travel bot"))
    assert distinct_count([*records, CallRecord.from_json(json.dumps(other))]) == 11


def test_calls_whose_answer_follows_a_stamp_in_the_system_prompt_are_all_kept(
    tmp_path: Path,
) -> None:
    """A stamp in the system prompt is masked to find retries, but it can be what the answer
    is computed from: a reminder set two hours after the current time, a lookup for the
    tenant the prompt names. The same words with the stamp masked read as one request
    answered 40 ways (noise), and 38 of 40 calls were dropped. Such calls differ in the
    request itself, so they stay; retries, answered alike, are still one example."""
    calls = []
    for d in range(1, 21):
        reminder = call(
            "Remind me to call the landlord in two hours",
            "set_reminder",
            {"at": f"2026-03-{d:02d}T11:00:00Z", "text": "call the landlord"},
            call_id=f"c{d}",
        )
        reminder["messages"][0]["content"] = (
            f"You are a scheduling assistant. Current time: 2026-03-{d:02d}T09:00:00Z."
        )
        calls.append(reminder)
    for t in range(20):
        tenant = f"{0x7C1E4A920 + t * 977:x}b"
        lookup = call(
            "Show my open invoices",
            "lookup",
            {"tenant": tenant, "what": "open invoices"},
            call_id=f"t{t}",
        )
        lookup["messages"][0]["content"] = (
            f"You act for tenant {tenant}. Only look up this tenant's data."
        )
        calls.append(lookup)
    for c in calls:
        c["tools"] = [
            {"type": "function", "function": {"name": n}} for n in ("set_reminder", "lookup")
        ]
    calls = [{**c, "timestamp": 1000.0 + i, "request_id": f"r{i}"} for i, c in enumerate(calls)]
    result, report, _ = curate(tmp_path, calls, min_examples=5, scrub_pii=False)
    assert result.ok, result.message
    assert (report["examples"], report["near_duplicates"]) == (40, 0)
    records = [CallRecord.from_json(json.dumps(c)) for c in calls]
    assert distinct_count(records) == 40


def test_near_duplicates_need_the_same_system_prompt_and_tools(tmp_path: Path) -> None:
    """The near-duplicate text leaves the system prompt out, and the tools offered were never
    looked at: a template that puts the ticket in the system prompt and asks a fixed question
    made every call "the very same words" (59 of 60 dropped, and the task waited for data for
    ever), and two agent steps that send the same user text with their own tools lost one
    of each pair."""
    tickets = []
    for i in range(30):
        label = ("billing", "shipping", "login")[i % 3]
        ticket = f"Ticket {10000 + 37 * i} from {CITIES[i % 18]}: a {label} problem, case {i}"
        tickets.append(
            {
                **call("Classify the ticket above. Answer with one word.", content=label),
                "tools": [],
                "messages": [
                    {"role": "system", "content": f"You triage support tickets.\n\n{ticket}"},
                    {"role": "user", "content": "Classify the ticket above. Answer with one word."},
                ],
            }
        )
    steps = []
    for i in range(15):
        text = f"I land in {CITIES[i % 18]} on the {i + 1}th with {i % 4 + 2} colleagues"
        for tool, system in (
            ("search_flights", "You book flights."),
            ("search_hotels", "You book hotels."),
        ):
            step = call(text, tool, {"to": CITIES[i % 18], "day": i + 1})
            step["messages"][0]["content"] = system
            step["tools"] = [{"type": "function", "function": {"name": tool}}]
            steps.append(step)
    result, report, _ = curate(tmp_path, tickets + steps, min_examples=10, scrub_pii=False)
    assert result.ok, result.message
    assert (report["examples"], report["near_duplicates"]) == (60, 0)

    # The same system prompt and tools: the same words answered two ways are still one.
    again = [tickets[0], {**tickets[0], "response": {"role": "assistant", "content": "login"}}]
    _, report, _ = curate(tmp_path, again + tool_calls(12, 0, 0), out="again", scrub_pii=False)
    assert report["near_duplicates"] == 1


def test_answers_of_the_served_slm_are_counted_never_curated(tmp_path: Path) -> None:
    """Once a task is served by its SLM the gateway captures the SLM's answers too; curate
    trained and evaluated on them (a candidate learnt its predecessor's mistakes and was
    scored against them). Only the LLM's answers are examples; the others are counted."""
    llm = tool_calls(12, 0, 0)
    slm = [
        {
            **call(f"Is it sunny in {c} for the picnic on the {i}th? {i}", "book_table"),
            "backend": "slm",
        }
        for i, c in enumerate(CITIES[:8])
    ]
    result, report, out = curate(tmp_path, [*slm[:4], *llm, *slm[4:]], min_examples=5)
    assert result.ok, result.message
    kept = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert len(kept) == 12 and {r.backend for r in kept} == {"llm"}
    assert report["not_llm_answer"] == 8
    assert "8 not answered by the LLM (8 slm)" in result.message
    accounted = (
        report["malformed_total"]
        + report["other_task"]
        + report["not_llm_answer"]
        + report["exact_duplicates"]
        + report["near_duplicates"]
        + report["beyond_max_examples"]
        + report["examples"]
    )
    assert accounted == report["read"] == 20
    records = [CallRecord.from_dict(r) for r in slm + llm]
    assert distinct_count(records) == 12  # what discover proposes as minExamples

    only_slm, report, _ = curate(tmp_path, slm, out="only_slm", min_examples=5)
    assert not only_slm.ok and only_slm.examples == 0
    assert "8 not answered by the LLM" in only_slm.message


def test_near_duplicates_just_above_the_threshold_are_dropped(tmp_path: Path) -> None:
    """Judged on the MinHash estimate (about 0.026 off at 128 permutations) by an index built
    at the threshold, 47 of these 60 pairs were both kept, and could straddle the train/eval
    split. The index now favours recall and the exact Jaccard decides near the threshold;
    what an index may still miss at exactly the threshold is a pair or so in a hundred."""
    from slm_trainer.curate import dedupe_text, shingles

    pairs = []
    for i in range(60):
        text = [f"t{i}x{j}" for j in range(60)]  # each pair its own vocabulary
        changed = [*text[:30], f"other{i}", *text[31:]]  # 3 of 58 shingles differ
        pairs.append((call(" ".join(text), content="ok"), call(" ".join(changed), content="ok")))
    a, b = (shingles(dedupe_text(CallRecord.from_dict(r))) for r in pairs[0])
    assert 0.9 <= len(a & b) / len(a | b) < 0.91  # just above the default threshold
    result, report, _ = curate(tmp_path, [r for p in pairs for r in p], min_examples=5)
    assert result.ok and report["near_duplicates"] >= 57
    assert report["examples"] == 120 - report["near_duplicates"]


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path: Path) -> None:
    lines: list[Any] = [json.dumps(r) for r in tool_calls(12, 0, 0)]
    lines[0] = b"\xef\xbb\xbf" + lines[0].encode()  # an editor's UTF-8 BOM
    result, report, _ = curate(tmp_path, lines, min_examples=5)
    assert result.ok and report["malformed"] == {} and report["examples"] == 12


@pytest.mark.parametrize("scrub_pii", [True, False])
def test_a_line_no_stage_could_use_is_skipped_by_reason_not_fatal(
    tmp_path: Path, scrub_pii: bool
) -> None:
    """A lone surrogate (no UTF-8 writer can encode it) or a wrongly typed field crashed the
    whole stage, so the Job failed on every retry; now each is one malformed line."""
    surrogate = json.dumps(call("hi there", content="ok")).replace("hi there", "hi \\ud800 there")
    email = call("mail me at jane.doe@example.com", content="ok")
    odd = [
        surrogate,
        {**email, "redactions": 5},
        {**email, "redactions": {"EMAIL_ADDRESS": "x"}},
        {**call("which model", content="ok"), "model": ["gpt-4o"]},
        {**call("how fast", content="ok"), "latency_ms": "fast"},
        # roles are looked up in sets of roles: a list there raised TypeError
        {**email, "messages": [{"role": ["user"], "content": "hi"}]},
        {**email, "response": {"role": {"a": 1}, "content": "ok"}},
    ]
    result, report, out = curate(tmp_path, odd + tool_calls(12, 0, 0), scrub_pii=scrub_pii)
    assert result.ok, result.message
    assert report["malformed"] == {
        "invalid_latency_ms": 1,
        "invalid_messages": 1,
        "invalid_model": 1,
        "invalid_redactions": 2,
        "invalid_response": 1,
        "invalid_unicode": 1,
    }
    assert report["error_samples"][0]["line"] == 1
    assert report["examples"] == 12
    assert len(read(out / "train.jsonl")) + len(read(out / "eval.jsonl")) == 12


def flight_steps(i: int) -> list[dict[str, Any]]:
    """One multi-step agent call as the gateway logs it: the user's request answered by a
    search, then the same request with that search and its result, answered by a booking."""
    city = CITIES[i]
    request = {
        "role": "user",
        "content": f"Find and book a flight to {city} on the {i}th: aisle seat, one checked "
        "bag, a morning departure, a refundable fare, my loyalty number on file, and send "
        "the receipt to finance",
    }

    def step(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
        function = {"name": name, "arguments": json.dumps(arguments)}
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": function}],
        }

    search = step("search_flights", {"to": city, "day": i}, f"s{i}")
    found = {"role": "tool", "tool_call_id": f"s{i}", "content": json.dumps({"id": f"F{i}"})}
    system = {"role": "system", "content": "You are a travel agent."}
    first = {**call(""), "messages": [system, request], "response": search}
    second = {
        **call(""),
        "messages": [system, request, search, found],
        "response": step("book_flight", {"flight": f"F{i}"}, f"b{i}"),
    }
    return [first, second]


@pytest.mark.parametrize("threshold", [0.9, 0.8])
def test_every_step_of_a_multi_step_agent_call_is_kept(tmp_path: Path, threshold: float) -> None:
    """A later step repeats the user's request; it was dropped as a near duplicate of the
    first step, and the model never learnt to book what it had found. With a long request
    the two steps' texts are alike (Jaccard 0.81 here), so steps are never compared."""
    lines = [s for i in range(12) for s in flight_steps(i)]
    retried = json.loads(json.dumps(lines[1]).replace('"s0"', '"retry"'))  # other call ids
    shouted = json.loads(json.dumps(lines[3]))  # the same step, asked in capitals
    shouted["messages"][1]["content"] = shouted["messages"][1]["content"].upper() + "!!"
    result, report, out = curate(
        tmp_path,
        [*lines, retried, shouted],
        stratify_by="tool",
        min_examples=1,
        near_dup_threshold=threshold,
    )
    assert result.ok, result.message
    assert report["exact_duplicates"] == 1  # identical calls are still dropped
    assert report["near_duplicates"] == 1  # and so are near ones at the same step
    assert report["strata"] == {
        "tool:book_flight": {"train": 11, "eval": 1},
        "tool:search_flights": {"train": 11, "eval": 1},
    }
    kept = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert (
        sum(1 for r in kept if r.response["tool_calls"][0]["function"]["name"] == "book_flight")
        == 12
    )


def test_odd_but_valid_shapes_never_crash(tmp_path: Path) -> None:
    odd = [
        "[" * 100_000,  # too deep for the JSON decoder
        {**call("a"), "response": {"role": "assistant", "tool_calls": [{"function": "oops"}]}},
        # no call the chat format can read, so it trains an empty answer: empty_response
        {**call("b"), "response": {"role": "assistant", "tool_calls": ["x", None]}},
        {**call("c", content="ok"), "messages": [{"role": "user", "content": 42}]},
        {**call("d", content="fine"), "messages": [{"role": "user", "content": [1, {"text": 2}]}]},
    ]
    result, report, _ = curate(tmp_path, odd, min_examples=1)
    assert result.ok, result.message
    assert report["malformed"] == {"invalid_json": 1, "empty_response": 1}
    assert report["examples"] == 3
    assert report["strata"]["tool:?"]["train"] + report["strata"]["tool:?"]["eval"] == 1
    assert report["eval"] == 1  # 10 % of 3, and at least one


@pytest.mark.parametrize("scrub_pii", [True, False])
def test_json_nested_too_deep_inside_a_record_never_crashes(
    tmp_path: Path, scrub_pii: bool
) -> None:
    """One odd line must not cost the whole log: the stage ends with its outputs written."""
    deep = "[" * 5000  # a string field that looks like JSON too deep to decode
    nested: Any = []
    for _ in range(600):  # decodes, but is too deep to walk and write back
        nested = [nested]
    odd = [
        call("deep arguments", "get_weather", content=""),
        {**call("deep content"), "messages": [{"role": "user", "content": deep}]},
        {**call("deep field", content="ok"), "metadata": nested},
        {**call("deep message", content="ok"), "messages": [{"role": "user", "x": nested}]},
    ]
    odd[0]["response"]["tool_calls"][0]["function"]["arguments"] = deep
    odd[1]["response"]["content"] = "fine"
    result, report, out = curate(tmp_path, odd + tool_calls(6, 0, 0), scrub_pii=scrub_pii)
    assert report["malformed"] == {"too_deep": 1}  # only the one that cannot be written back
    assert report["examples"] == 6 + 3
    assert result.examples == 9
    assert len(read(out / "train.jsonl")) + len(read(out / "eval.jsonl")) == 9


def test_records_equal_once_pii_is_gone_are_duplicates(tmp_path: Path) -> None:
    lines = [
        call(
            f"Email {name}@corp.example.com the weekly report",
            "send_email",
            {"to": f"{name}@corp.example.com"},
        )
        for name in ("ann", "bob", "cyd")
    ]
    _, report, _ = curate(tmp_path, lines + tool_calls(10, 0, 0), min_examples=1)
    assert report["exact_duplicates"] == 2
    assert report["redactions"] == {"EMAIL_ADDRESS": 6}


def test_pii_is_removed_from_outputs(tmp_path: Path) -> None:
    lines = [
        *tool_calls(10, 0, 0),
        call(
            "Email priya.sharma@example.com and call her on +44 20 7946 0018",
            "send_email",
            {"to": "priya.sharma@example.com", "body": "Card 4111 1111 1111 1111 expired"},
        ),
        call(
            "Use key sk-proj-4f9Kx2LmQ7rT1vB8nZ3yW6cD0eH5jU9pA2sF to fetch 10.1.2.3 stats",
            content="Fetched.",
        ),
    ]
    result, report, out = curate(tmp_path, lines, min_examples=5)
    assert result.ok
    text = (out / "train.jsonl").read_text() + (out / "eval.jsonl").read_text()
    for secret in ("priya.sharma", "7946 0018", "4111 1111", "sk-proj-4f9K", "10.1.2.3"):
        assert secret not in text
    assert "<EMAIL_ADDRESS_1>" in text and "<API_KEY_1>" in text
    assert report["redactions"] == {
        "API_KEY": 1,
        "CREDIT_CARD": 1,
        "EMAIL_ADDRESS": 2,
        "IP_ADDRESS": 1,
        "PHONE_NUMBER": 1,
    }
    assert report["records_redacted"] == 2
    redacted = [r for r in read(out / "train.jsonl") + read(out / "eval.jsonl") if r.redactions]
    assert sorted(sum(r.redactions.values()) for r in redacted) == [2, 4]

    _, raw_report, raw_out = curate(tmp_path, lines, min_examples=5, scrub_pii=False, out="raw")
    assert raw_report["redactions"] == {}
    assert (
        "priya.sharma"
        in (raw_out / "train.jsonl").read_text() + (raw_out / "eval.jsonl").read_text()
    )


def test_split_is_deterministic_order_independent_and_stratified(tmp_path: Path) -> None:
    lines = tool_calls(20, 6, 2)
    r1, rep1, out1 = curate(tmp_path, lines, out="a")
    r2, _, out2 = curate(tmp_path, lines, out="b")
    shuffled = list(lines)
    random.Random(7).shuffle(shuffled)
    _, _, out3 = curate(tmp_path, shuffled, out="c")

    assert (out1 / "train.jsonl").read_bytes() == (out2 / "train.jsonl").read_bytes()
    assert (out1 / "eval.jsonl").read_bytes() == (out2 / "eval.jsonl").read_bytes()
    assert r1 == r2
    keys = {exact_key(r) for r in read(out1 / "eval.jsonl")}
    assert keys == {exact_key(r) for r in read(out3 / "eval.jsonl")}

    # 10 % of 28 is 2.8: 2 of the 2.0 of get_weather, 1 of the 0.6 of book_table, none of
    # the 0.2 of send_email
    assert rep1["strata"] == {
        "tool:book_table": {"train": 5, "eval": 1},
        "tool:get_weather": {"train": 18, "eval": 2},
        "tool:send_email": {"train": 2, "eval": 0},
    }
    assert (r1.examples, r1.train_examples, r1.eval_examples) == (28, 25, 3)

    _, rep_seed, _ = curate(tmp_path, lines, out="d", seed=1)
    other = {exact_key(r) for r in read(tmp_path / "d" / "eval.jsonl")}
    assert other != keys and rep_seed["eval"] == 3


def test_classification_answers_are_strata(tmp_path: Path) -> None:
    labels = ["positive"] * 10 + ["negative"] * 6 + ["neutral"] * 4
    lines = [
        call(f"Review {i}: the {CITIES[i % 18]} tour guide was {i} minutes late", content=lab)
        for i, lab in enumerate(labels)
    ]
    _, report, _ = curate(tmp_path, lines, eval_fraction=0.25)
    # a quarter of 20 is 5: the half left over after whole shares goes to the larger stratum
    assert report["strata"] == {
        "label:negative": {"train": 5, "eval": 1},
        "label:neutral": {"train": 3, "eval": 1},
        "label:positive": {"train": 7, "eval": 3},
    }


def test_too_few_examples_fail_with_a_clear_message(tmp_path: Path) -> None:
    result, report, out = curate(tmp_path, [*tool_calls(3, 0, 0), "{oops"], min_examples=10)
    assert not result.ok
    assert result.stage == "prepare"
    assert "3 < min_examples 10" in result.message
    assert "1 malformed" in result.message
    assert result.examples == 3
    assert report["examples"] == 3  # the report is still written, to see why
    assert (out / "train.jsonl").exists()


def test_missing_input_is_a_failed_result_with_zero_examples(tmp_path: Path) -> None:
    """A task's log directory appears with its first captured call: until then the result
    says 0 examples, which the operator reads as "wait for data", not as a broken stage."""
    for missing in (tmp_path / "nope.jsonl", tmp_path / "empty-dir"):
        if missing.name == "empty-dir":
            missing.mkdir()
        result = run(Args(input=missing, output_dir=tmp_path / "out"))
        assert not result.ok
        assert result.examples == 0
        assert "no call log" in result.message


def test_directory_of_shards_and_task_filter(tmp_path: Path) -> None:
    shards = tmp_path / "log"
    shards.mkdir()
    lines = tool_calls(12, 0, 0)
    write_log(shards / "000.jsonl", lines[:6])
    write_log(shards / "001.jsonl", [*lines[6:], call("other", "x", task="billing")])
    (shards / "notes.txt").write_text("ignored")
    result = run(Args(input=shards, output_dir=tmp_path / "out", task="assistant"))
    report = json.loads((tmp_path / "out" / "curate_report.json").read_text())
    assert result.ok
    assert report["other_task"] == 1
    assert report["examples"] == 12
    assert [Path(f).name for f in report["files"]] == ["000.jsonl", "001.jsonl"]
    # the records left to other tasks are in the message too: "0 examples from 30 records,
    # 0 malformed, 0 duplicates" said nothing of where they went
    assert '1 call of other tasks left out (--task assistant; most common: "billing" 1)' in (
        result.message
    )


def test_a_task_waiting_for_data_says_whose_calls_its_log_holds(tmp_path: Path) -> None:
    """A dataset.uri may be a log that holds several agents' calls (a shared file, an
    export). The data-prep Job keeps its own task's calls; when too few are left, the
    message says first how many calls of other tasks were left out and under which task
    names (the 3 most common, a tie by name), so that a user whose exported log names the
    task otherwise sees why, and the report counts them by name."""
    mine = tool_calls(3, 0, 0)
    names = ["support"] * 5 + ["billing"] * 3 + ["audit"] * 3 + ["x"]
    others = [
        call(f"Where is order {1000 + i}?", "lookup_order", {"id": i}, task=name)
        for i, name in enumerate(names)
    ]
    said = (
        "too few examples after curation: 3 < min_examples 10; 12 calls of other tasks left "
        'out (--task assistant; most common: "support" 5, "audit" 3, "billing" 3); 3 examples'
    )
    for n, lines in enumerate((mine + others, others[::-1] + mine)):
        result, report, _ = curate(
            tmp_path, lines, task="assistant", min_examples=10, scrub_pii=False, out=f"o{n}"
        )
        assert not result.ok and result.examples == 3
        assert result.message.startswith(said), result.message
        assert report["other_task"] == 12
        assert report["other_task_most_common"] == {"support": 5, "audit": 3, "billing": 3}
    # every call its own: nothing to say
    result, report, _ = curate(tmp_path, mine, task="assistant", min_examples=10, out="mine")
    assert "other tasks" not in result.message and report["other_task_most_common"] == {}


@pytest.mark.timeout(60)  # a FIFO opened for reading blocks for ever: never open one
def test_jsonl_entries_that_are_not_files_are_reported_never_opened(tmp_path: Path) -> None:
    """A dangling link, a FIFO or a folder named ``*.jsonl`` was left out without a word:
    curate succeeded on fewer records, and nothing said that a shard was not read."""
    shards = tmp_path / "log"
    shards.mkdir()
    write_log(shards / "a-good.jsonl", tool_calls(12, 0, 0))
    os.symlink(tmp_path / "gone" / "shard.jsonl", shards / "b-broken.jsonl")
    os.mkfifo(shards / "c-fifo.jsonl")
    (shards / "d-folder.jsonl").mkdir()
    os.symlink(shards / "a-good.jsonl", shards / "e-link.jsonl")  # a link to a file is read
    out = tmp_path / "out"
    result = run(Args(input=shards, output_dir=out))
    assert result.ok, result.message
    report = json.loads((out / "curate_report.json").read_text())
    assert [Path(f).name for f in report["files"]] == ["a-good.jsonl", "e-link.jsonl"]
    assert report["skipped_entries"] == [
        {"name": "b-broken.jsonl", "kind": "dangling link"},
        {"name": "c-fifo.jsonl", "kind": "fifo"},
        {"name": "d-folder.jsonl", "kind": "directory"},
    ]
    assert result.message.endswith(
        ", 3 *.jsonl entries skipped, not files (b-broken.jsonl: dangling link, "
        "c-fifo.jsonl: fifo, d-folder.jsonl: directory)"
    ), result.message
    # with no shard left to read, the wait for data says why as well
    (shards / "a-good.jsonl").unlink()
    (shards / "e-link.jsonl").unlink()
    waiting = run(Args(input=shards, output_dir=out))
    assert waiting.examples == 0 and not waiting.ok
    assert "3 *.jsonl entries skipped, not files (b-broken.jsonl: dangling link" in (
        waiting.message
    ), waiting.message


def test_a_shard_whose_name_is_not_utf8_is_named_with_an_escape(tmp_path: Path) -> None:
    """A file name on Linux is bytes; one that is not UTF-8 reaches Python as a lone
    surrogate, and curate crashed writing its report after train.jsonl and eval.jsonl were
    written, leaving a .curate_report.json.tmp behind."""
    shards = tmp_path / "log"
    shards.mkdir()
    odd = Path(os.fsdecode(os.fsencode(shards) + b"/shard-\xff.jsonl"))
    write_log(odd, [*tool_calls(12, 0, 0), "{not json"])
    out = tmp_path / "out"
    result = run(Args(input=shards, output_dir=out))
    assert result.ok, result.message
    report = json.loads((out / "curate_report.json").read_text(encoding="utf-8"))
    assert [Path(f).name for f in report["files"]] == ["shard-\\xff.jsonl"]
    assert report["error_samples"][0]["file"] == "shard-\\xff.jsonl"
    assert sorted(p.name for p in out.iterdir()) == [
        "curate_report.json",
        "eval.jsonl",
        "train.jsonl",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"near_dup_threshold": 0.0},
        {"eval_fraction": 1.0},
        {"min_examples": 0},
        {"stratify_by": "random"},
        {"max_examples": -1},
    ],
)
def test_invalid_arguments_are_rejected(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Args(input=tmp_path, output_dir=tmp_path, **bad)


def test_assign_split_pools_singletons_and_keeps_both_sides() -> None:
    strata = ["a", "a", "b", "b", "b", "b", "b", "b", "b", "b", "b", "b", "u1", "u2", "u3"]
    keys = [f"k{i}" for i in range(len(strata))]
    by_stratum = {"a": [0, 1], "b": list(range(2, 12)), "rare": [12, 13, 14]}

    def eval_of(fraction: float) -> dict[str, int]:
        is_eval = assign_split(strata, keys, fraction, seed=0)
        return {s: sum(is_eval[i] for i in members) for s, members in by_stratum.items()}

    # 1.5 of 15, rounded up to 2: b's whole share, then the largest remainder (rare's 0.3)
    assert eval_of(0.1) == {"a": 0, "b": 1, "rare": 1}
    # never every member of a stratum: each is also trained on
    assert eval_of(0.9) == {"a": 1, "b": 9, "rare": 2}
    assert eval_of(0.01) == {"a": 0, "b": 1, "rare": 0}  # at least one in eval
    assert assign_split(strata, keys, 0.0, seed=0) == [False] * len(strata)
    assert assign_split(["a"], ["k"], 0.5, seed=0) == [False]


def test_the_share_held_out_is_eval_fraction_however_small_the_strata(tmp_path: Path) -> None:
    """Every stratum of two or more gave at least one eval example: with 60 tools called
    twice each, half the examples were held out at evalFraction 0.05, and the model trained
    on half of what it could. The common strata still get their share."""
    lines = [
        call(
            f"Please run job {t * 100 + i} on host {CITIES[(t + i) % 18]} with label L{t}",
            f"tool_{t}",
            {"job": t * 100 + i},
        )
        for t in range(60)
        for i in range(2)
    ]
    lines += tool_calls(40, 0, 0)
    result, report, out = curate(tmp_path, lines, eval_fraction=0.05, stratify_by="tool")
    assert result.ok, result.message
    assert (report["examples"], report["train"], report["eval"]) == (160, 152, 8)
    assert report["strata"]["tool:get_weather"] == {"train": 38, "eval": 2}
    assert len(read(out / "eval.jsonl")) == 8


def test_shingles_and_stratum() -> None:
    assert shingles("Hello, WORLD!") == {"hello", "world"}
    assert shingles("a b c d") == {"a b c", "b c d"}
    assert shingles("mail <EMAIL_ADDRESS_1> now") == {"mail <email_address_1> now"}
    rec = CallRecord.from_dict(call("q", content="A long free-text answer " * 5))
    assert stratum(rec, "auto") == "text"
    assert stratum(rec, "none") == "all"
    assert stratum(CallRecord.from_dict(call("q", "get_weather")), "auto") == "tool:get_weather"


# ------------------------------------------------------------------- call logs behind fsspec URIs
#
# The operator hands the trainer ``s3://bucket/calls/<ns>/<task>/`` (builders.dataset_location),
# the prefix the gateway's capture uploads shards under. These read through fsspec's real
# memory:// and file:// filesystems: the same listing and streaming code as s3:// and gs://.


class DeniedFileSystem(AbstractFileSystem):
    """An object store whose credentials may not look at the prefix: s3fs turns AccessDenied
    into PermissionError."""

    protocol = "slmtestdenied"

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        raise PermissionError(f"AccessDenied: ListObjectsV2 on {path}")

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        raise PermissionError(f"AccessDenied: ListObjectsV2 on {path}")


class NoBucketFileSystem(AbstractFileSystem):
    """An object store with buckets (``split_path``, as s3fs and gcsfs have) holding none."""

    protocol = "slmtestnobucket"

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, _, key = self._strip_protocol(path).partition("/")
        return bucket, key, None

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        raise FileNotFoundError(path)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        raise FileNotFoundError(path)


def shard_directory(root: Path) -> Path:
    """A task's capture prefix as the gateway leaves it: two shards out of name order on disk,
    malformed, blank and other-task lines, an unfinished ``.part`` shard, a stray file and a
    sub-folder, none of which may be read."""
    root.mkdir(parents=True)
    lines = tool_calls(16, 6, 2)
    write_log(root / "calls-b-001.jsonl", [*lines[12:], "{oops", call("other", "x", task="x")])
    write_log(root / "calls-a-000.jsonl", [*lines[:12], "", b'{"task": "\xff"}', lines[3]])
    write_log(root / "calls-c-002.jsonl.part", tool_calls(3, 0, 0))
    (root / "notes.txt").write_text("ignored")
    (root / "sub").mkdir()
    write_log(root / "sub" / "deeper.jsonl", tool_calls(3, 0, 0))
    return root


def copy_to_memory(local: Path, prefix: str) -> str:
    """The same tree under ``memory://<prefix>``; the URI of its top."""
    fs = fsspec.filesystem("memory")
    for path in local.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return f"memory://{prefix}/"


@pytest.fixture
def memory_prefix() -> Iterator[str]:
    """A memory:// prefix of this test only, removed afterwards (the store is per process)."""
    prefix = f"bucket-{uuid.uuid4().hex}/calls/ns/task"
    yield prefix
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{prefix}"):
        fs.rm(f"/{prefix}", recursive=True)


def curated(out: Path) -> tuple[str, str, dict[str, Any]]:
    report = json.loads((out / "curate_report.json").read_text())
    return (out / "train.jsonl").read_text(), (out / "eval.jsonl").read_text(), report


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_uri_prefix_is_read_like_the_local_directory(
    tmp_path: Path, memory_prefix: str, scheme: str
) -> None:
    """Same shards (``*.jsonl`` only, in name order), same lines, same counts and skip reasons:
    the outputs are byte for byte those of the equivalent local directory."""
    local = shard_directory(tmp_path / "local")
    uri = copy_to_memory(local, memory_prefix) if scheme == "memory" else local.as_uri() + "/"
    expected = run(Args(input=local, output_dir=tmp_path / "a", task="assistant"))
    result = run(Args(input=uri, output_dir=tmp_path / "b", task="assistant"))
    assert expected.ok, expected.message
    assert result == expected
    train, evals, report = curated(tmp_path / "b")
    want_train, want_evals, want = curated(tmp_path / "a")
    assert (train, evals) == (want_train, want_evals)
    assert [f.rsplit("/", 1)[-1] for f in report["files"]] == [
        "calls-a-000.jsonl",
        "calls-b-001.jsonl",
    ]
    assert all(f.startswith(f"{scheme}://") for f in report["files"])
    assert report["input"] == uri
    for key in ("input", "files", "seconds"):
        report.pop(key), want.pop(key)
    assert report == want
    assert report["examples"] == 24 and report["other_task"] == 1
    assert report["malformed"] == {"invalid_json": 1, "invalid_utf8": 1}
    assert [s["file"] for s in report["error_samples"]] == [
        "calls-a-000.jsonl",
        "calls-b-001.jsonl",
    ]


def test_a_uri_naming_one_object_reads_that_object(tmp_path: Path, memory_prefix: str) -> None:
    uri = copy_to_memory(shard_directory(tmp_path / "local"), memory_prefix)
    result = run(Args(input=uri + "calls-b-001.jsonl", output_dir=tmp_path / "o", min_examples=1))
    assert result.ok, result.message
    _, _, report = curated(tmp_path / "o")
    assert [f.rsplit("/", 1)[-1] for f in report["files"]] == ["calls-b-001.jsonl"]
    assert report["examples"] == 13  # 12 calls and the other task's one; no task filter


def test_the_command_line_keeps_the_uri(tmp_path: Path, memory_prefix: str) -> None:
    """The operator runs ``slm-trainer curate --input=s3://...``: the flag must reach the stage
    as a URI, not as the local path ``s3:/...`` that a ``Path`` makes of it."""
    from slm_trainer import cli

    uri = copy_to_memory(shard_directory(tmp_path / "local"), memory_prefix)
    result_path = tmp_path / "result.json"
    code = cli.main(
        [
            "curate",
            f"--input={uri}",
            f"--output-dir={tmp_path / 'out'}",
            "--task=assistant",
            "--no-scrub-pii",
            f"--result-path={result_path}",
        ]
    )
    result = TrainerResult.from_json(result_path.read_text())
    assert (code, result.ok, result.examples) == (0, True, 24), result.message


def test_an_empty_uri_prefix_is_still_waiting_for_data(tmp_path: Path, memory_prefix: str) -> None:
    """Before the first captured call the prefix holds nothing (an object store has no empty
    folders): 0 examples, which the operator reads as "wait for data", as for a local path."""
    fsspec.filesystem("memory").pipe_file(f"/{memory_prefix}/calls-0.jsonl.part", b"{}\n")
    result = run(Args(input=f"memory://{memory_prefix}/", output_dir=tmp_path / "o"))
    assert (result.ok, result.examples) == (False, 0)
    assert "no call log" in result.message


@pytest.fixture
def test_filesystems(monkeypatch: pytest.MonkeyPatch) -> None:
    """Protocols for the failure cases; one known to fsspec whose driver is not installed is
    exactly what ``s3://`` is in an image without s3fs."""
    fsspec.register_implementation(DeniedFileSystem.protocol, DeniedFileSystem, clobber=True)
    fsspec.register_implementation(NoBucketFileSystem.protocol, NoBucketFileSystem, clobber=True)
    monkeypatch.setitem(
        known_implementations,
        "slmtestmissing",
        {"class": "slm_no_such_driver.FileSystem", "err": "Install slm-no-such-driver"},
    )


@pytest.mark.usefixtures("test_filesystems")
@pytest.mark.parametrize(
    "uri, says",
    [
        ("nosuchfs://bucket/calls/ns/task/", "no filesystem for the protocol nosuchfs://"),
        ("slmtestmissing://bucket/calls/ns/task/", "Install slm-no-such-driver"),
        ("slmtestdenied://bucket/calls/ns/task/", "access denied"),
        ("slmtestnobucket://typo-bucket/calls/ns/task/", "bucket 'typo-bucket' does not exist"),
    ],
)
def test_an_unreadable_uri_fails_with_a_readable_message_not_zero_examples(
    tmp_path: Path, uri: str, says: str
) -> None:
    """Waiting for data would never end: the result has no example count (so the operator
    reports the failure in DataReady instead of WaitingForData) and says what is wrong."""
    result = run(Args(input=uri, output_dir=tmp_path / "o"))
    assert not result.ok
    assert result.examples is None
    assert says in result.message and uri in result.message
    assert "0 examples" not in result.message


class NoReadFileSystem(MemoryFileSystem):
    """memory:// under another name whose objects may be listed but not read: a bucket policy
    with s3:ListBucket and without s3:GetObject."""

    protocol = "slmtestnoread"

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return str(MemoryFileSystem._strip_protocol(str(path).replace("slmtestnoread://", "/", 1)))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        raise PermissionError(f"AccessDenied: GetObject {path}")


def test_a_shard_listed_but_not_readable_fails_with_a_readable_message(
    tmp_path: Path, memory_prefix: str
) -> None:
    copy_to_memory(shard_directory(tmp_path / "local"), memory_prefix)
    fsspec.register_implementation(NoReadFileSystem.protocol, NoReadFileSystem, clobber=True)
    result = run(Args(input=f"slmtestnoread://{memory_prefix}/", output_dir=tmp_path / "o"))
    assert (result.ok, result.examples) == (False, None)
    assert "access denied" in result.message and "calls-a-000.jsonl" in result.message


def test_a_string_over_the_redactors_limit_is_malformed_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A string over MAX_TEXT_CHARS made the redactor raise, and the exception ended the whole
    curate stage: one huge tool result cost every other call in the log. It is counted as a
    malformed record (``too_long``), never written, and the rest is curated."""
    import slm_trainer.redact as redact_module

    monkeypatch.setattr(redact_module, "MAX_TEXT_CHARS", 5000)
    huge = call("summarise this: " + "word " * 1200 + "jane.long@example.com", content="ok")
    result, report, out = curate(tmp_path, [huge, *tool_calls(6, 0, 0)], min_examples=1)
    assert result.ok
    assert report["malformed"] == {"too_long": 1}
    assert report["examples"] == 6
    written = (out / "train.jsonl").read_text() + (out / "eval.jsonl").read_text()
    assert "jane.long@example.com" not in written and "word word" not in written


def test_records_refused_after_parsing_are_sampled_by_file_and_line_not_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report promises the first few malformed lines with their line numbers; a record too
    long to redact or too deep to write back was counted but never located, so the engineer
    had to search the log for it. Its content is never quoted: it was not redacted."""
    import slm_trainer.redact as redact_module

    monkeypatch.setattr(redact_module, "MAX_TEXT_CHARS", 5000)
    huge = call("summarise this: " + "word " * 1200 + "jane.long@example.com", content="ok")
    nested: Any = []
    for _ in range(600):  # decodes, but is too deep to walk and write back
        nested = [nested]
    deep = {
        **call("deep", content="ok"),
        "messages": [{"role": "user", "content": "jane.deep@example.com", "x": nested}],
    }
    good = tool_calls(6, 0, 0)
    _, report, _ = curate(tmp_path, [*good[:2], huge, *good[2:4], deep, *good[4:]])
    assert report["malformed"] == {"too_deep": 1, "too_long": 1}
    samples = report["error_samples"]
    assert [(s["file"], s["line"], s["reason"]) for s in samples] == [
        ("calls.jsonl", 3, "too_long"),
        ("calls.jsonl", 6, "too_deep"),
    ]
    assert all(s["error"] for s in samples)
    assert "jane." not in json.dumps(samples) and "word word" not in json.dumps(samples)


SECRET = "sk-TESTSECRET1234567890abcdef"


@pytest.mark.usefixtures("test_filesystems")
@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"nosuchfs://alice:{SECRET}@bucket/calls/", "nosuchfs://bucket/calls/"),
        (f"slmtestmissing://bucket/calls/?sas={SECRET}", "slmtestmissing://bucket/calls/"),
        # the driver's error quotes the path it made of the URI, without the scheme
        (f"slmtestdenied://alice:{SECRET}@bucket/calls/", "slmtestdenied://bucket/calls/"),
        (f"slmtestdenied://bucket/calls/?X-Amz-Signature={SECRET}", "slmtestdenied://bucket/"),
        (f"slmtestnobucket://alice:{SECRET}@typo/calls/", "slmtestnobucket://typo/calls/"),
        (f"webdav://alice:{SECRET}@dav.example.com/calls", "webdav://dav.example.com/calls"),
    ],
)
def test_a_uri_with_credentials_is_named_without_them(tmp_path: Path, uri: str, shown: str) -> None:
    """The message becomes the pod's termination message, then the AgentTask's condition
    and an Event: it used to quote the URI, and the driver's error, in full."""
    result = run(Args(input=uri, output_dir=tmp_path / "o"))
    assert not result.ok
    assert "TESTSECRET" not in result.message
    assert "cannot read the call log at " + shown in result.message


def test_an_empty_prefix_with_a_signature_waits_without_showing_it(
    tmp_path: Path, memory_prefix: str
) -> None:
    uri = f"memory://{memory_prefix}/?X-Amz-Signature={SECRET}"
    result = run(Args(input=uri, output_dir=tmp_path / "o"))
    assert (result.ok, result.examples) == (False, 0)
    assert result.message == f"no call log at memory://{memory_prefix}/ yet (0 examples)"


@pytest.fixture
def http_log() -> Iterator[str]:
    """A call log served over plain HTTP on 127.0.0.1 (a bad line among good ones); the URL
    of its directory. Any path under it answers with the log."""
    body = b"".join(json.dumps(line).encode() + b"\n" for line in tool_calls(6, 0, 0))
    body += b"{oops\n"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:  # keeps the test's output clean
            pass

        def _answer(self, head: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/calls"
    server.shutdown()
    thread.join(5)


def test_an_http_shards_name_in_the_report_drops_the_urls_query(
    tmp_path: Path, http_log: str
) -> None:
    """An http(s) call log's URL may carry a signature or SAS token in its query. The report
    redacted it from ``input`` and ``files`` but quoted the shard's name with it, in each
    error sample (``log.jsonl?token=...``)."""
    out = tmp_path / "o"
    run(Args(input=f"{http_log}/log.jsonl?token={SECRET}#frag", output_dir=out))
    report_text = (out / "curate_report.json").read_text()
    samples = json.loads(report_text)["error_samples"]
    assert [(s["file"], s["reason"]) for s in samples] == [("log.jsonl", "invalid_json")]
    assert SECRET not in report_text


def test_a_local_shard_the_trainer_may_not_read_fails_with_a_readable_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local file of another user (the capture claim written by a pod with another uid)
    crashed curate with a PermissionError (exit 1), and the Job retried into it; a remote
    shard in the same state was already a reported failure naming the file."""
    directory = shard_directory(tmp_path / "local")
    denied = sorted(directory.glob("*.jsonl"))[0]
    opened = Path.open

    def open_as_another_user(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == denied:  # as root in CI, chmod alone would not refuse the read
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_as_another_user)
    result = run(Args(input=str(directory), output_dir=tmp_path / "o"))
    assert (result.ok, result.examples) == (False, None)
    assert "permission denied" in result.message and str(denied) in result.message
    assert "uid 1000" in result.message


def test_a_local_folder_the_trainer_may_not_list_fails_instead_of_waiting_for_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glob() reads a folder it may not list as an empty one: "no call log yet", which the
    operator waits on for good (DataReady WaitingForData). A remote listing denied was
    already a reported failure."""
    directory = shard_directory(tmp_path / "local")
    listed = Path.iterdir

    def list_as_another_user(self: Path) -> Any:
        if self == directory:  # as root in CI, chmod alone would not refuse it
            raise PermissionError(13, "Permission denied", str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", list_as_another_user)
    result = run(Args(input=str(directory), output_dir=tmp_path / "o"))
    assert (result.ok, result.examples) == (False, None)
    assert "cannot list the call log folder" in result.message
    assert str(directory) in result.message and "uid 1000" in result.message


#: 2026-03-01T00:00:00Z: when the upgraded gateway rolled out, in the tests below.
UPGRADE = 1_772_323_200.0


def calls_across_an_upgrade() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(captured before the upgrade, after it). Before it the gateway did not mark the calls
    only the LLM may answer (tool_choice "none" forced these text answers), and nothing in
    such a record tells it apart; one record carries no capture time at all."""
    after = [{**c, "timestamp": UPGRADE + 60 * i} for i, c in enumerate(tool_calls())]
    # the epoch's first second, an hour and a second before the upgrade, a clock set wrong
    times = (1.0, UPGRADE - 3600, UPGRADE - 1, -5.0)
    forced = [
        {**call(f"In words: is {c} warm in spring? ({i})", content="Mild"), "timestamp": t}
        for i, (c, t) in enumerate(zip(CITIES, times, strict=False))
    ]
    undated = call("Mail the caterer that lunch moves to noon", "send_email", {"to": "c@x.org"})
    return [*forced, undated], after


@pytest.mark.parametrize("not_before", ["2026-03-01T00:00:00Z", "2026-03-01T01:00:00+01:00"])
def test_calls_captured_before_not_before_are_counted_never_curated(
    tmp_path: Path, not_before: str
) -> None:
    """After a gateway upgrade retraining re-read the whole log, and the unmarked calls of
    the old gateway were trained on for good: spec.dataset.notBefore (--not-before) leaves
    out every call captured before it, and any without a capture time, counted and said."""
    before, after = calls_across_an_upgrade()
    everything, _, _ = curate(tmp_path, before + after, scrub_pii=False, out="all")
    assert everything.examples == len(after) + len(before)  # the problem: all trained on

    result, report, out = curate(tmp_path, before + after, scrub_pii=False, not_before=not_before)
    assert result.ok, result.message
    assert (report["before_not_before"], report["examples"]) == (len(before), len(after))
    assert report["settings"]["not_before"] == not_before
    assert f"{len(before)} captured before not_before {not_before}" in result.message
    written = read(out / "train.jsonl") + read(out / "eval.jsonl")
    assert all(r.timestamp >= UPGRADE for r in written)
    left_out = ("malformed_total", "other_task", "before_not_before", "not_llm_answer")
    left_out += ("llm_only_tools", "exact_duplicates", "near_duplicates", "beyond_max_examples")
    assert report["read"] == sum(report[k] for k in left_out) + report["examples"]


def test_without_not_before_no_call_is_left_out_for_its_time(tmp_path: Path) -> None:
    before, after = calls_across_an_upgrade()
    result, report, _ = curate(tmp_path, before + after, scrub_pii=False)
    assert result.ok, result.message
    assert report["before_not_before"] == 0 and report["settings"]["not_before"] == ""
    assert "not_before" not in result.message


def test_a_log_captured_wholly_before_not_before_waits_for_data_and_says_why(
    tmp_path: Path,
) -> None:
    before, _ = calls_across_an_upgrade()
    result, report, _ = curate(tmp_path, before, not_before="2026-03-01T00:00:00Z")
    assert (result.ok, result.examples, report["before_not_before"]) == (False, 0, len(before))
    assert f"{len(before)} captured before not_before" in result.message


@pytest.mark.parametrize(
    "bad", ["yesterday", "2026-03-01", "2026-03-01T00:00:00", "2026-02-30T00:00:00Z"]
)
def test_a_not_before_that_is_not_an_rfc3339_time_is_refused(tmp_path: Path, bad: str) -> None:
    """Without an offset the time would depend on the pod's clock zone; refused, not guessed."""
    with pytest.raises(ValueError, match="not_before"):
        Args(input=tmp_path, output_dir=tmp_path, not_before=bad)
