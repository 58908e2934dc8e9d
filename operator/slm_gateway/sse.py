"""Streamed chat completions (``"stream": true``): server-sent events, parsed and written.

Why the gateway reads a stream instead of piping its bytes through: it owes every answered
call a call-log record (the whole assistant message), a token count for the cost metrics, and
in shadow mode a comparison with the SLM, and it asks the LLM for the usage chunk that only
some agents ask for, which it must then hold back from the others. So the LLM's stream is cut
into events as it arrives, each event goes on to the agent at once (the agent still sees
tokens as they come), and :class:`StreamAssembler` folds the chunks into the message they
spell. An SLM answer arrives whole from Triton; :func:`synthesize` writes it as the same kind
of stream, so an agent cannot tell which backend streamed to it.

Everything here is pure (bytes and dicts in, bytes and dicts out) and unit-tested; the HTTP
layer (:mod:`slm_gateway.app`) does the I/O.

The format is the one OpenAI's API and SDKs use: events of ``data: <chat.completion.chunk
JSON>`` separated by a blank line, ended by ``data: [DONE]``. Lines may end in ``\\n``,
``\\r\\n`` or ``\\r`` (the SSE specification allows all three); events are re-emitted with
``\\n``. A comment line (``: keep-alive``) is passed on as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
#: Response headers of a streamed answer. ``x-accel-buffering: no`` keeps an nginx ingress
#: from holding the events back until the answer is complete.
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class StreamFormatError(ValueError):
    """The upstream's stream is not one an OpenAI SDK could read."""


class EventSplitter:
    """Cuts an SSE byte stream into events, whatever the transport's chunk boundaries.

    ``feed`` returns the complete events seen so far, each without its terminating blank
    line and with ``\\n`` line ends. An event longer than ``max_event`` bytes with no end in
    sight is a :class:`StreamFormatError`: a stream that never ends an event must not grow
    the gateway's memory without bound.
    """

    __slots__ = ("_buf", "max_event")

    def __init__(self, max_event: int = 8 * 1024 * 1024) -> None:
        self._buf = b""
        self.max_event = max_event

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # A CR at the very end may be the first half of a CRLF: keep it for the next feed.
            # Not after a line end, though ("\r\r", "\n\r"): that CR ends a blank line, so
            # the event is complete whether an LF follows or not (an LF after it would only
            # add a blank line, which dispatches nothing). Held back, the last event of a
            # CR-only stream would never end, and its ``[DONE]`` would never be read.
            tail = b""
            if buf.endswith(b"\r") and not buf.endswith((b"\r\r", b"\n\r")):
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        events: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = buf[start:end].lstrip(b"\n")  # extra blank lines dispatch nothing
            if event:
                events.append(event)
            start = end + 2
        rest = buf[start:].lstrip(b"\n")
        if len(rest) > self.max_event:
            raise StreamFormatError(f"an event is longer than {self.max_event} bytes")
        self._buf = rest
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet ended (what a stream that stops now leaves over)."""
        return self._buf


def data_of(event: bytes) -> bytes | None:
    """The ``data`` of one event (its data lines joined by ``\\n``), or None if it has none
    (a comment or an event of other fields only)."""
    if event.startswith(b"data:") and b"\n" not in event:
        value = event[5:]
        return value[1:] if value.startswith(b" ") else value
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def encode_event(doc: Mapping[str, Any]) -> bytes:
    """One ``data:`` event holding ``doc`` as JSON."""
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def is_usage_only(chunk: Mapping[str, Any]) -> bool:
    """Whether a chunk is the final usage chunk (no choices, only ``usage``)."""
    return chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


def _add_pieces(into: dict[str, Any], fn: dict[str, Any], where: str) -> None:
    """Append a function delta's ``name`` and ``arguments`` pieces to ``into``'s lists."""
    for key in ("name", "arguments"):
        piece = fn.get(key)
        if piece is None:
            continue
        if not isinstance(piece, str):
            raise StreamFormatError(f"{where.format(key)} is not a string")
        into[key].append(piece)


class StreamAssembler:
    """Folds ``chat.completion.chunk`` objects into the message and usage they spell.

    Only choice 0 is assembled, as a call record holds one answer. Tool calls are merged by
    their ``index``: the first delta of a call carries its id and name, later ones append to
    its ``arguments``. A delta with a function name starts a new call even at an index
    already used (Ollama numbers every call 0) unless it repeats that call's id, and a delta
    without an index continues the last call unless it names a new one (Gemini's endpoint
    sends none, and empty ids): merged, two calls became one with both names and both
    argument objects run together. A new id without a
    name continues the call (some servers send an id with every chunk); its first id stays.
    Malformed deltas (a wrong type where text is expected) raise :class:`StreamFormatError`
    rather than being guessed at.
    """

    __slots__ = (
        "_alias",
        "_finished",
        "_last",
        "_started",
        "calls",
        "chunks",
        "content",
        "created",
        "error",
        "finish_reason",
        "function_call",
        "id",
        "model",
        "refusal",
        "usage",
    )

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        #: a legacy ``function_call`` answer's name and argument pieces (``functions`` requests)
        self.function_call: dict[str, list[str]] | None = None
        self._alias: dict[int, int] = {}  # the provider's index -> its call's key in calls
        self._last: int | None = None
        self.finish_reason: str | None = None
        self._started: set[int] = set()  # every choice index seen, and those that finished
        self._finished: set[int] = set()
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.error: dict[str, Any] | None = None

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise StreamFormatError("a stream event is not a JSON object")
        err = chunk.get("error")
        if err is not None:
            # An error sent inside a stream that had already begun (OpenAI does this).
            self.error = err if isinstance(err, dict) else {"message": str(err)}
            return
        self.chunks += 1
        if self.id is None and isinstance(chunk.get("id"), str):
            self.id = chunk["id"]
        if self.model is None and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if self.created is None and isinstance(chunk.get("created"), int):
            self.created = chunk["created"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if choices is None:
            return
        if not isinstance(choices, list):
            raise StreamFormatError("'choices' of a chunk is not an array")
        for choice in choices:
            if not isinstance(choice, dict):
                raise StreamFormatError("a choice of a chunk is not an object")
            index = choice.get("index", 0)
            reason = choice.get("finish_reason")
            if isinstance(index, int):
                self._started.add(index)
                if isinstance(reason, str):
                    self._finished.add(index)
            if index != 0:
                continue
            if isinstance(reason, str):
                self.finish_reason = reason
            delta = choice.get("delta")
            if delta is None:
                continue
            if not isinstance(delta, dict):
                raise StreamFormatError("'delta' of a chunk is not an object")
            self._delta(delta)

    def _delta(self, delta: dict[str, Any]) -> None:
        text = delta.get("content")
        if text is not None:
            if not isinstance(text, str):
                raise StreamFormatError("'delta.content' is not a string")
            self.content.append(text)
        refusal = delta.get("refusal")
        if isinstance(refusal, str):
            self.refusal.append(refusal)
        legacy = delta.get("function_call")
        if legacy is not None:
            if not isinstance(legacy, dict):
                raise StreamFormatError("'delta.function_call' is not an object")
            if self.function_call is None:
                self.function_call = {"name": [], "arguments": []}
            _add_pieces(self.function_call, legacy, "'delta.function_call.{}'")
        calls = delta.get("tool_calls")
        if calls is None:
            return
        if not isinstance(calls, list):
            raise StreamFormatError("'delta.tool_calls' is not an array")
        for call in calls:
            if not isinstance(call, dict):
                raise StreamFormatError("a tool call delta is not an object")
            index = call.get("index")
            if index is not None and (
                not isinstance(index, int) or isinstance(index, bool) or index < 0
            ):
                raise StreamFormatError("a tool call delta has no valid 'index'")
            call_id = call.get("id") if isinstance(call.get("id"), str) else None
            fn = call.get("function")
            named = isinstance(fn, dict) and bool(fn.get("name"))
            slot = self._slot(index, call_id or None, named)
            if call_id and not slot["id"]:
                slot["id"] = call_id
            if isinstance(call.get("type"), str) and call["type"]:
                slot["type"] = call["type"]
            if fn is None:
                continue
            if not isinstance(fn, dict):
                raise StreamFormatError("a tool call delta's 'function' is not an object")
            _add_pieces(slot, fn, "a tool call delta's '{}'")

    def _slot(self, index: int | None, call_id: str | None, named: bool) -> dict[str, Any]:
        """The call a delta belongs to (see the class docstring); calls keep arrival order.

        A new id starts a new call only with a function name: some servers send a fresh id
        on every chunk of one call, whose later chunks carry arguments only. A name for a
        call that has one already starts a new call too, unless it comes with that call's
        id: Gemini's endpoint and some proxies send parallel calls at one index (or none)
        with empty ids, and a call's name is sent once (OpenAI's SDKs would join a repeated
        one into "ff" as well).
        """
        key = self._last if index is None else self._alias.get(index)
        slot = self.calls.get(key) if key is not None else None
        if slot is None or (
            named
            and (
                (call_id and slot["id"] and slot["id"] != call_id)
                or (slot["name"] and not (call_id and call_id == slot["id"]))
            )
        ):
            key = len(self.calls)
            slot = self.calls[key] = {"id": None, "type": "function", "name": [], "arguments": []}
            if index is not None:
                self._alias[index] = key
        self._last = key
        return slot

    @property
    def finished(self) -> bool:
        """Whether every choice the stream began has its ``finish_reason``: the model ended
        each answer, so a stream that stops here lacks nothing but its ``[DONE]``."""
        return bool(self._started) and self._started <= self._finished

    def message(self) -> dict[str, Any]:
        """The assistant message the chunks spelled, as a non-streamed answer would hold it."""
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content else None,
        }
        if self.refusal:
            msg["refusal"] = "".join(self.refusal)
        if self.function_call is not None:
            msg["function_call"] = {k: "".join(v) for k, v in self.function_call.items()}
        if self.calls:
            msg["tool_calls"] = [
                {
                    "id": slot["id"] or f"call_{index}",
                    "type": slot["type"],
                    "function": {
                        "name": "".join(slot["name"]),
                        "arguments": "".join(slot["arguments"]),
                    },
                }
                for index, slot in sorted(self.calls.items())
            ]
        return msg

    def completion(self, fallback_id: str, model: str) -> dict[str, Any]:
        """The ``chat.completion`` object the stream amounts to (what capture records).

        ``finish_reason`` is the one the LLM sent, None when it sent none: made up, a "stop"
        would tell the training set that an answer the LLM never finished was complete.
        """
        message = self.message()
        doc: dict[str, Any] = {
            "id": self.id or fallback_id,
            "object": "chat.completion",
            "created": self.created or 0,
            "model": self.model or model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": self.finish_reason,
                }
            ],
        }
        if self.usage is not None:
            doc["usage"] = self.usage
        return doc


def synthesize(
    message: Mapping[str, Any],
    *,
    completion_id: str,
    created: int,
    model: str,
    usage: Mapping[str, Any] | None = None,
) -> bytes:
    """A whole answer as an OpenAI stream: a chunk with the role and the message, a chunk
    with the finish reason, the usage chunk when ``usage`` is given, then ``[DONE]``.

    The message goes in one delta: it already exists whole, and cutting it into pieces would
    only cost the agent more parsing. Tool calls carry their ``index``, as streamed calls do.
    """
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    calls = message.get("tool_calls")
    if calls:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
    head["model"] = model
    first = {
        **head,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
    }
    last = {
        **head,
        "choices": [
            {
                "index": 0,
                "delta": {},
                "logprobs": None,
                "finish_reason": "tool_calls" if calls else "stop",
            }
        ],
    }
    parts = [encode_event(first), encode_event(last)]
    if usage is not None:
        parts.append(encode_event({**head, "choices": [], "usage": dict(usage)}))
    parts.append(DONE_EVENT)
    return b"".join(parts)


__all__ = [
    "DONE",
    "DONE_EVENT",
    "SSE_HEADERS",
    "EventSplitter",
    "StreamAssembler",
    "StreamFormatError",
    "data_of",
    "encode_event",
    "is_usage_only",
    "synthesize",
]
