"""Streamed answers as pure data: events cut from any byte boundaries, chunks folded back into
the message an agent would have got without ``stream``, and SLM answers written as a stream.

The streams come from the LLM stand-in's own event writer (what the gateway's tests stream
against) and from :func:`slm_gateway.sse.synthesize`; every round trip must give back the
message it started from, whatever way the bytes are cut.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slm_e2e.llm_standin import stream_events
from slm_gateway import sse

CALL_MESSAGE = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
        },
    ],
}
TEXT_MESSAGE = {"role": "assistant", "content": "Il fait 21 °C à Paris — ensoleillé."}
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}


def fold(stream: bytes, cuts: list[int] | None = None) -> tuple[sse.StreamAssembler, list[bytes]]:
    """Feed ``stream`` cut at ``cuts`` (byte offsets); returns the assembler and the events."""
    splitter = sse.EventSplitter()
    assembler = sse.StreamAssembler()
    events: list[bytes] = []
    bounds = [0, *sorted(set(cuts or [])), len(stream)]
    for a, b in itertools.pairwise(bounds):
        for event in splitter.feed(stream[a:b]):
            events.append(event)
            data = sse.data_of(event)
            if data is not None and data != sse.DONE:
                assembler.add(orjson.loads(data))
    assert splitter.pending == b""
    return assembler, events


@pytest.mark.parametrize("message", [CALL_MESSAGE, TEXT_MESSAGE])
def test_a_streamed_llm_answer_folds_back_into_its_message(message: dict[str, Any]) -> None:
    stream = b"".join(
        stream_events(message, completion_id="c1", created=5, model="gpt-4o", usage=USAGE)
    )
    assembler, events = fold(stream)
    assert assembler.message() == message
    assert assembler.usage == USAGE
    assert events[-1] == b"data: [DONE]"
    done = assembler.completion("fallback", "m")
    assert done["id"] == "c1" and done["model"] == "gpt-4o"
    assert done["choices"][0]["finish_reason"] == (
        "tool_calls" if "tool_calls" in message else "stop"
    )
    assert done["usage"] == USAGE


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=2000), max_size=40),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_events_do_not_depend_on_where_the_bytes_were_cut(cuts: list[int], eol: bytes) -> None:
    stream = b"".join(
        stream_events(CALL_MESSAGE, completion_id="c", created=1, model="m", usage=USAGE)
    )
    # SSE allows CRLF and lone CR line ends; a cut may fall between the CR and the LF, and
    # the last event of a CR-only stream must end (``fold`` checks nothing is left pending)
    stream = stream.replace(b"\n", eol)
    whole, whole_events = fold(stream)
    cut, cut_events = fold(stream, [c % len(stream) for c in cuts])
    assert cut_events == whole_events
    assert cut.message() == whole.message() == CALL_MESSAGE


def test_comments_multi_line_data_and_lone_cr_line_ends_are_read_as_sse_says() -> None:
    splitter = sse.EventSplitter()
    events = splitter.feed(b': keep-alive\r\rdata: {"a":\ndata: 1}\n\n\n\nevent: x\ndata: y\n\n')
    assert events == [b": keep-alive", b'data: {"a":\ndata: 1}', b"event: x\ndata: y"]
    assert [sse.data_of(e) for e in events] == [None, b'{"a":\n1}', b"y"]
    assert sse.data_of(b"data:no-space") == b"no-space"


def test_a_lone_cr_after_a_line_end_ends_the_event_at_once() -> None:
    """``\\r\\r`` ends a line and a blank line, whatever follows: the event is complete, and
    an LF arriving next (``\\r\\r\\n``) only adds a blank line."""
    splitter = sse.EventSplitter()
    assert splitter.feed(b"data: [DONE]\r\r") == [b"data: [DONE]"]
    assert splitter.feed(b"\ndata: a\r") == []
    assert splitter.feed(b"\ndata: b\r\n\r") == [b"data: a\ndata: b"]
    assert splitter.pending == b""


def test_a_finish_reason_is_recorded_only_when_the_llm_sent_one() -> None:
    """The captured completion keeps the LLM's word: no "stop" made up for an answer whose
    end it never announced; and ``finished`` says whether every choice it began ended."""
    a = sse.StreamAssembler()
    a.add({"choices": [{"index": 0, "delta": {"content": "Sunny"}, "finish_reason": None}]})
    a.add({"choices": [{"index": 1, "delta": {"content": "Rain"}, "finish_reason": None}]})
    assert a.completion("c", "m")["choices"][0]["finish_reason"] is None
    assert not a.finished
    a.add({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert not a.finished  # choice 1 has not ended
    a.add({"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]})
    assert a.finished and a.completion("c", "m")["choices"][0]["finish_reason"] == "stop"


def test_a_streamed_legacy_function_call_is_kept() -> None:
    """A ``functions`` request streams its answer as ``delta.function_call`` pieces; they
    were dropped, and the captured answer was an empty assistant message."""
    a = sse.StreamAssembler()
    pieces = [{"name": "get_weather", "arguments": ""}, {"arguments": '{"city":'}]
    pieces.append({"arguments": '"Paris"}'})
    for piece in pieces:
        a.add({"choices": [{"index": 0, "delta": {"function_call": piece}}]})
    a.add({"choices": [{"index": 0, "delta": {}, "finish_reason": "function_call"}]})
    assert a.message() == {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    with pytest.raises(sse.StreamFormatError, match="function_call"):
        sse.StreamAssembler().add({"choices": [{"delta": {"function_call": "get_weather"}}]})


def test_an_event_that_never_ends_is_refused_instead_of_buffered_for_ever() -> None:
    splitter = sse.EventSplitter(max_event=1024)
    splitter.feed(b"data: " + b"x" * 1000)
    with pytest.raises(sse.StreamFormatError, match="longer than 1024"):
        splitter.feed(b"x" * 100)


@pytest.mark.parametrize(
    "chunk",
    [
        [],
        {"choices": {"index": 0}},
        {"choices": [{"index": 0, "delta": {"content": 3}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "0"}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"name": 1}}]}}]},
    ],
)
def test_chunks_an_sdk_could_not_read_are_refused(chunk: Any) -> None:
    with pytest.raises(sse.StreamFormatError):
        sse.StreamAssembler().add(chunk)


def _call_delta(call: dict[str, Any], index: int | None, part: str) -> dict[str, Any]:
    """One tool-call delta of ``call``: its head (id and name) or its arguments."""
    if part == "head":
        body: dict[str, Any] = {
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
    else:
        body = {"function": {"arguments": call["function"]["arguments"]}}
    if index is not None:
        body["index"] = index
    return {"choices": [{"index": 0, "delta": {"tool_calls": [body]}}]}


@pytest.mark.parametrize("numbering", ["all-zero", "none"], ids=["ollama", "gemini"])
def test_parallel_calls_are_told_apart_by_id_when_indexes_do_not(numbering: str) -> None:
    """Ollama numbers every streamed call 0 and Gemini's endpoint sends no index: merged by
    index, two calls became one, "get_weatherget_time" with both argument objects, and that
    corrupt call went into the training data while the agent got two good ones."""
    a = sse.StreamAssembler()
    for call in CALL_MESSAGE["tool_calls"]:
        index = 0 if numbering == "all-zero" else None
        a.add(_call_delta(call, index, "head"))
        a.add(_call_delta(call, index, "arguments"))
    assert a.message()["tool_calls"] == CALL_MESSAGE["tool_calls"]


@pytest.mark.parametrize("numbering", ["all-zero", "none"])
@pytest.mark.parametrize("call_id", ["", None], ids=["empty-id", "no-id"])
def test_parallel_calls_without_ids_are_told_apart_by_their_names(
    numbering: str, call_id: str | None
) -> None:
    """Gemini's endpoint and some proxies send each parallel call whole, at index 0 or none,
    with an empty id (and an empty type): a second name is a second call, not "get_weather"
    and "get_time" run together, with their arguments, into one corrupt training record."""
    a = sse.StreamAssembler()
    for call in CALL_MESSAGE["tool_calls"]:
        body: dict[str, Any] = {"type": "", "function": dict(call["function"])}
        if call_id is not None:
            body["id"] = call_id
        if numbering == "all-zero":
            body["index"] = 0
        a.add({"choices": [{"index": 0, "delta": {"tool_calls": [body]}}]})
    calls = a.message()["tool_calls"]
    assert [(c["type"], c["function"]) for c in calls] == [
        ("function", c["function"]) for c in CALL_MESSAGE["tool_calls"]
    ]


def test_a_call_whose_id_comes_before_its_name_stays_one_call() -> None:
    a = sse.StreamAssembler()
    for fn in ({}, {"name": "get_weather"}, {"arguments": '{"city":"Paris"}'}):
        delta = {"id": "call_1", "function": fn} if not fn else {"function": fn}
        a.add({"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]})
    calls = a.message()["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}')
    ]


def test_a_call_whose_every_chunk_has_a_new_id_stays_one_call() -> None:
    """Some servers send a fresh id with every chunk of one call: only a new id with a name
    starts a call, so the arguments are not split off into nameless calls."""
    a = sse.StreamAssembler()
    pieces = [("call_1", {"name": "get_weather", "arguments": ""})]
    pieces += [("call_2", {"arguments": '{"city":'}), ("call_3", {"arguments": '"Paris"}'})]
    for call_id, fn in pieces:
        delta = {"index": 0, "id": call_id, "function": fn}
        a.add({"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]})
    calls = a.message()["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}')
    ]


def test_an_error_event_and_other_choices_are_told_apart_from_the_answer() -> None:
    a = sse.StreamAssembler()
    a.add({"choices": [{"index": 1, "delta": {"content": "second choice"}}]})
    a.add({"choices": [{"index": 0, "delta": {"content": "first"}}]})
    assert a.message()["content"] == "first"
    assert a.error is None
    a.add({"error": {"message": "overloaded", "type": "server_error"}})
    assert a.error == {"message": "overloaded", "type": "server_error"}


def test_usage_only_chunks_are_recognised() -> None:
    assert sse.is_usage_only({"choices": [], "usage": USAGE})
    assert not sse.is_usage_only({"choices": [{"index": 0, "delta": {}}], "usage": USAGE})
    assert not sse.is_usage_only({"choices": [], "usage": None})


messages = st.one_of(
    st.builds(
        lambda text: {"role": "assistant", "content": text},
        st.text(max_size=200),
    ),
    st.builds(
        lambda calls: {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                for i, (n, a) in enumerate(calls)
            ],
        },
        st.lists(
            st.tuples(
                st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,20}", fullmatch=True),
                st.dictionaries(
                    st.text(max_size=8), st.integers(-(2**53), 2**53) | st.text(max_size=8)
                ).map(lambda d: orjson.dumps(d).decode()),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
)


@settings(max_examples=150, deadline=None)
@given(messages, st.booleans())
def test_a_synthesized_slm_stream_reads_back_as_the_slm_answer(
    message: dict[str, Any], with_usage: bool
) -> None:
    stream = sse.synthesize(
        message,
        completion_id="chatcmpl-1",
        created=9,
        model="task",
        usage=USAGE if with_usage else None,
    )
    assembler, events = fold(stream)
    assert assembler.message() == message
    assert assembler.usage == (USAGE if with_usage else None)
    assert events[-1] == b"data: [DONE]"
    # Each event is one JSON object an OpenAI SDK parses as a chunk.
    for event in events[:-1]:
        doc = orjson.loads(sse.data_of(event) or b"")
        assert doc["object"] == "chat.completion.chunk" and doc["id"] == "chatcmpl-1"
