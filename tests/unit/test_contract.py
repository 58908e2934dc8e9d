"""The contract: the trainer result as the operator reads it back from a 4 KiB termination
message, and the call records the gateway writes and every trainer stage reads."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from slm_contract import (
    CALL_RECORD_SCHEMA,
    TERMINATION_MESSAGE_LIMIT,
    CallRecord,
    ContractError,
    TrainerResult,
    http_url_problem,
    llm_only_request,
    redact_uri,
    redact_uris,
)


@pytest.mark.parametrize(
    "message",
    [
        "Ошибка загрузки модели: " * 400,  # escaped as \uXXXX: 6 bytes a character
        'Traceback:\n  File "x.py", line 1\n\tboom\n' * 300,  # escapes double newlines, quotes
        "模型 🚀 " * 2000,  # emoji become surrogate pairs: 12 bytes for one character
    ],
)
def test_a_long_message_keeps_as_much_as_fits(message: str) -> None:
    text = TrainerResult(stage="evaluate", ok=False, message=message).to_json()
    kept = TrainerResult.from_json(text).message
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert kept.endswith(" [truncated]")
    assert message.startswith(kept.removesuffix(" [truncated]"))
    # The operator shows this message as the reason: cut only what does not fit.
    assert len(text.encode()) > TERMINATION_MESSAGE_LIMIT - 16


def test_a_result_that_cannot_be_written_leaves_the_file_as_it_was(tmp_path: Any) -> None:
    # Opened before it was serialized, the termination message was emptied by a result
    # that then failed to fit: the operator read no result at all.
    path = tmp_path / "termination-log"
    path.write_text("earlier")
    with pytest.raises(ContractError, match="does not fit"):
        TrainerResult(stage="evaluate", ok=True, artifact_uri="s3://b/" + "x" * 5000).write(
            str(path)
        )
    assert path.read_text() == "earlier"


# ------------------------------------------------------------------ call records


def _call(**fields: Any) -> dict[str, Any]:
    """A call record as the gateway writes it (operator/slm_gateway/capture.py)."""
    return {
        "task": "weather",
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "response": {"role": "assistant", "content": "Sunny."},
        "backend": "llm",
        "model": "gpt-4o",
        "tools": [],
        "latency_ms": 812.345,
        "prompt_tokens": 21,
        "completion_tokens": 3,
        "timestamp": 1764650000.25,
        "request_id": "req-1",
        "fallback_reason": "",
        "redactions": {"EMAIL_ADDRESS": 1},
        "schema": CALL_RECORD_SCHEMA,
        **fields,
    }


def test_a_record_as_the_gateway_writes_it_round_trips() -> None:
    record = CallRecord.from_json(json.dumps(_call()))
    assert record.redactions == {"EMAIL_ADDRESS": 1} and record.latency_ms == 812.345
    assert CallRecord.from_json(record.to_json()) == record
    # JSON has one number type: a count another writer wrote as 21.0 is still 21.
    again = CallRecord.from_json(json.dumps(_call(prompt_tokens=21.0, redactions={"X": 2.0})))
    assert again.prompt_tokens == 21 and again.redactions == {"X": 2}
    assert isinstance(again.prompt_tokens, int) and isinstance(again.redactions["X"], int)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redactions", 5),
        ("redactions", {"EMAIL_ADDRESS": "x"}),
        ("redactions", {"EMAIL_ADDRESS": -1}),
        ("redactions", {"EMAIL_ADDRESS": True}),
        ("redactions", ["EMAIL_ADDRESS"]),
        ("model", 5),
        ("model", ["gpt-4o"]),
        ("request_id", None),
        ("fallback_reason", {"reason": "x"}),
        ("latency_ms", "812"),
        ("latency_ms", True),
        ("latency_ms", -1),
        ("timestamp", None),
        ("prompt_tokens", 1.5),
        ("prompt_tokens", "21"),
        ("completion_tokens", -3),
        ("completion_tokens", False),
        # Past a double's range: float() raised OverflowError, which no stage caught, and
        # one such line crashed curate, discover and evaluate (the Job retried into it).
        ("timestamp", 10**400),
        ("latency_ms", 10**4000),
        ("prompt_tokens", 2**63),  # past what the JSON encoders write back
        ("redactions", {"EMAIL_ADDRESS": 10**30}),
        ("llm_only", "true"),
        ("llm_only", 1),
    ],
)
def test_a_wrongly_typed_field_is_refused_by_name(field: str, value: Any) -> None:
    """Refused here, readers skip the line as ``invalid_<field>``; accepted, a later stage
    (redaction adds the counts up) crashed on it and the whole Job failed."""
    with pytest.raises(ContractError) as caught:
        CallRecord.from_json(json.dumps(_call(**{field: value})))
    assert str(caught.value).startswith(f"{field} ")


def test_the_llm_only_mark_is_optional_and_written_only_when_true() -> None:
    """The gateway marks a call no SLM is sent for a field the record does not hold
    (tool_choice "none"), and curate leaves it out; a mark lost on the way (discover writes
    a cluster's records back) would have it trained on again. An older gateway's record has
    no mark and reads as unmarked; an unmarked record's line is what it was before."""
    marked = CallRecord.from_json(json.dumps(_call(llm_only=True)))
    assert marked.llm_only is True
    assert json.loads(marked.to_json())["llm_only"] is True
    assert CallRecord.from_json(marked.to_json()) == marked
    plain = CallRecord.from_json(json.dumps(_call()))
    assert plain.llm_only is False and "llm_only" not in json.loads(plain.to_json())


def test_a_result_with_a_number_past_a_doubles_range_is_a_contract_error() -> None:
    """The operator reads results with ``except ContractError``: an OverflowError from a
    termination message holding 10**400 crashed its reading of the Job."""
    with pytest.raises(ContractError, match="score must be finite"):
        TrainerResult.from_json('{"stage": "evaluate", "ok": true, "score": 1' + "0" * 400 + "}")
    # Counts too: plan's float(parameters) raised OverflowError, and 2**64 cannot be written
    # into the task's status.
    for field, value in (("parameters", "1" + "0" * 400), ("examples", str(2**64))):
        with pytest.raises(ContractError, match=f"{field} must be below 2\\*\\*63"):
            TrainerResult.from_json(f'{{"stage": "prepare", "ok": true, "{field}": {value}}}')


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        ('{"stage": "prepare", "ok": false, "message": null}', "message must be a string"),
        ('{"stage": "prepare", "ok": true, "examples": 20, "message": 42}', "message must be"),
        ('{"stage": "finetune", "ok": true, "candidate": 7}', "candidate must be a string"),
        ('{"stage": "export", "ok": true, "artifact_uri": {"a": 1}}', "artifact_uri must be"),
        ("[" * 2000, "termination message is not JSON"),
    ],
)
def test_a_result_with_a_wrongly_typed_or_too_deep_field_is_a_contract_error(
    raw: str, said: str
) -> None:
    """The operator reads results with ``except ContractError``: an accepted null or numeric
    message crashed it where it cut URIs out of the message, and a deeply nested termination
    message raised RecursionError instead."""
    with pytest.raises(ContractError, match=said):
        TrainerResult.from_json(raw)
    ok = TrainerResult.from_json('{"stage": "finetune", "ok": true, "candidate": "a"}')
    assert (ok.candidate, ok.artifact_uri, ok.message) == ("a", None, "")


#: A key pasted into the wrong field of a call-log line.
PASTED = "OPENAI_API_KEY=sk-proj-AbCdEfGhIjKlMnOpQrSt"


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"prompt_tokens": PASTED}, "prompt_tokens must be a non-negative integer, got str"),
        ({"completion_tokens": [PASTED]}, "completion_tokens must be a non-negative integer"),
        ({"prompt_tokens": -7}, "prompt_tokens must be a non-negative integer, got a negative"),
        ({"redactions": {PASTED: "x"}}, "redactions must be a non-negative integer for every"),
        ({"redactions": {"EMAIL": PASTED}}, "redactions must be a non-negative integer"),
        ({"schema": PASTED}, "unsupported call record schema, expected slmfleet.dev/"),
    ],
)
def test_a_refused_call_record_field_is_named_never_quoted(
    fields: dict[str, Any], said: str
) -> None:
    """The error reaches curate's and discover's reports as an error sample, whose parser
    promises it says what is wrong, never what the line holds: a key pasted into
    prompt_tokens, or a redactions kind, was quoted there."""
    with pytest.raises(ContractError) as caught:
        CallRecord.from_json(json.dumps(_call(**fields)))
    assert str(caught.value).startswith(said)
    assert "sk-proj" not in str(caught.value) and "-7" not in str(caught.value)


def test_a_refused_result_field_is_named_never_quoted() -> None:
    """The operator quotes this error in the task's conditions and Events."""
    for raw in (
        f'{{"stage": "prepare", "ok": true, "examples": "{PASTED}"}}',
        f'{{"stage": "prepare", "ok": true, "schema": "{PASTED}"}}',
    ):
        with pytest.raises(ContractError) as caught:
            TrainerResult.from_json(raw)
        assert "sk-proj" not in str(caught.value), str(caught.value)


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(ContractError, match="latency_ms must be finite"):
        CallRecord.from_json(json.dumps(_call()).replace("812.345", "NaN"))


def test_a_lone_surrogate_is_refused_but_real_characters_are_not() -> None:
    """No UTF-8 writer can encode a lone surrogate: every stage writing it back would crash."""
    lone = json.dumps(_call()).replace("Weather in Oslo?", "hi \\ud800 there")
    with pytest.raises(ContractError, match=r"^invalid Unicode"):
        CallRecord.from_json(lone)
    low_in_key = json.dumps(_call(response={"content": "ok", "x\\udc00": 1}))
    with pytest.raises(ContractError, match=r"^invalid Unicode"):
        CallRecord.from_json(low_in_key.replace("\\\\udc00", "\\udc00"))
    # An escaped pair is one real character (what ensure_ascii writes for an emoji), and an
    # escaped backslash followed by "ud800" is just text.
    pair = json.dumps(_call()).replace("Weather in Oslo?", "sun \\ud83c\\udf1e")
    assert CallRecord.from_json(pair).messages[0]["content"] == "sun \U0001f31e"
    text = json.dumps(_call()).replace("Weather in Oslo?", "C:\\\\ud800")
    assert CallRecord.from_json(text).messages[0]["content"] == "C:\\ud800"


SECRET = "sk-TESTSECRET1234567890abcdef"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (
            f"https://alice:{SECRET}@127.0.0.1:1/calls/shard.jsonl",
            "https://127.0.0.1:1/calls/shard.jsonl",
        ),
        (f"webdav://alice:{SECRET}@dav.example.com/calls", "webdav://dav.example.com/calls"),
        (f"s3://bucket/calls/?X-Amz-Signature={SECRET}&X-Amz-Date=1", "s3://bucket/calls/"),
        (f"az://calls?sas={SECRET}", "az://calls"),
        (f"https://h/p#{SECRET}", "https://h/p"),
        (f"simplecache::s3://k:{SECRET}@b/k", "simplecache::s3://b/k"),
        (f"http://[::1]:9000/x?k={SECRET}", "http://[::1]:9000/x"),
        # a password with an unencoded '#' or '/' ends the host early: no part of it is kept
        (f"https://alice:{SECRET}#x@h/p", "https://alice"),
        (f"https://alice:{SECRET}/x@h/p", "https://alice/x@h/p"),
        ("s3://bucket/calls/ns/task/", "s3://bucket/calls/ns/task/"),
        ("/data/calls?not-a-query", "/data/calls?not-a-query"),  # a local path is a path
        # a quote is legal in user info and in a query: one URI holds no closing quote
        (
            "https://svc-logs:Kq7'x9Vf2LmZ@logs.example.com/calls/",
            "https://logs.example.com/calls/",
        ),
        ("https://host/calls/?sig=abc'defSECRET", "https://host/calls/"),
        (f"https://alice:{SECRET}'x#y@h/p", "https://alice"),
        (f"s3://b/k?sig={SECRET} 'x", "s3://b/k"),  # a typed space in a URI is still its own
    ],
)
def test_redact_uri_keeps_scheme_host_port_path_only(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_redact_uris_works_on_prose_and_on_json_lines() -> None:
    uri = f"s3://bucket/calls?X-Amz-Signature={SECRET}"
    text = f"cannot read the call log at {uri}: denied (GET {uri}), retry."
    assert redact_uris(text) == (
        "cannot read the call log at s3://bucket/calls: denied (GET s3://bucket/calls), retry."
    )
    line = json.dumps({"input": f'"{uri}"', "n": 1})  # a quoted URI: JSON escapes its quotes
    assert json.loads(redact_uris(line)) == {"input": '"s3://bucket/calls"', "n": 1}


def test_redact_uris_also_hides_a_known_uris_secrets_quoted_without_the_scheme() -> None:
    """fsspec drivers quote the path they made of the URI, without the scheme."""
    uri = f"webdav://alice:{SECRET}@dav.example.com/calls?token={SECRET}x"
    text = f"404 for alice:{SECRET}@dav.example.com/calls?token={SECRET}x; password {SECRET}"
    out = redact_uris(text, uri)
    assert "TESTSECRET" not in out
    assert "dav.example.com/calls" in out


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "GET https://svc-logs:Kq7'x9Vf2LmZ@logs.example.com/calls/ failed",
            "GET https://logs.example.com/calls/ failed",
        ),
        ("GET https://host/calls/?sig=abc'defSECRET failed", "GET https://host/calls/ failed"),
        ("GET https://host/?sig=abc'.defSECRET.", "GET https://host/."),
        (f"at https://alice:{SECRET}'x#y@h/p now", "at https://alice now"),
        # a quote that closes a quoted URI is the sentence's, not the URI's
        ("cannot open 'https://h/calls?sig=abc': denied", "cannot open 'https://h/calls': denied"),
        ("OSError('https://h/calls?sig=abc')", "OSError('https://h/calls')"),
        ("['https://a/x?s=1', 'https://b/y']", "['https://a/x', 'https://b/y']"),
        ("{'u': 'https://a/x?s=1'}", "{'u': 'https://a/x'}"),
        ("'http://prometheus:9090' is down", "'http://prometheus:9090' is down"),
        ("'https://h/p' for alice@example.com", "'https://h/p' for alice@example.com"),
        # the quote that closes a URI is no user info's, though an '@' comes later
        (
            "url='https://prometheus:9090',user='bob@corp.com'",
            "url='https://prometheus:9090',user='bob@corp.com'",
        ),
        (
            "url='https://prometheus:9090',user=bob@corp.com",
            "url='https://prometheus:9090',user=bob@corp.com",
        ),
    ],
)
def test_a_quote_inside_a_uri_hides_no_secret_behind_it(message: str, shown: str) -> None:
    """A quote is legal in user info and in a query, and ended the part it stood in: what
    followed it, the rest of a password or a signature, was shown as prose."""
    assert redact_uris(message) == shown


@pytest.mark.parametrize(
    "piece", ["s3://'x", "s3://'", "s3://a'b", "https://u:'@", "s3://b?x'y", "a.", "a-b+"]
)
def test_redacting_text_full_of_quoted_uris_takes_time_in_proportion_to_it(piece: str) -> None:
    """Each quote after a scheme looked ahead for an '@' to the end of the text: 112 KB of
    ``s3://'x`` took 25 s (0.8 s at 20 KB), where a message is redacted in milliseconds.
    At 64 KB it took 5 to 6 s; linear, it takes about 10 ms. And a scheme could be as long
    as the text: at every word of ``a.a.a.…`` it was read to the end (46 s at 112 KB)."""
    text = (piece * (64 * 1024 // len(piece) + 1))[: 64 * 1024]
    started = time.perf_counter()
    redact_uris(text)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "Prometheus at http://prometheus:9090: connection refused",
            "Prometheus at http://prometheus:9090: connection refused",
        ),
        (
            "cannot read the call log at s3://calls: bucket 'calls' does not exist",
            "cannot read the call log at s3://calls: bucket 'calls' does not exist",
        ),
        ("at https://alice:pw-1234@host.io:443: refused", "at https://host.io:443: refused"),
    ],
)
def test_a_colon_after_a_path_less_uri_is_the_sentences(message: str, shown: str) -> None:
    """Taken for part of a port, it made the real port look invalid, and both were dropped:
    the message lost the one detail that says where the call went."""
    assert redact_uris(message) == shown


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("https://api.openai.com\\v1", "host contains a character"),
        ("https://llm{1}.example.com/v1", "host contains a character"),
        ("https://ho|st.example.com/v1", "host contains a character"),
        ("https://ho^st/v1", "host contains a character"),
        ("https://ho`st/v1", "host contains a character"),
        ("https://host%zz/v1", "%-escape in the URL's host"),
        ("https://host%41/v1", "%-escape in the URL's host"),
        (f"https://api.example.com:{SECRET}/v1", "port"),  # still named as the port's problem
    ],
)
def test_a_host_the_crds_isurl_refuses_is_refused(url: str, said: str) -> None:
    """Python's urlsplit takes these hosts, Go's net/url (the CRD's CEL isURL) does not:
    discover proposed manifests that `kubectl apply` refused, and the operator started work
    on a task whose URL admission would have refused."""
    why = http_url_problem(url)
    assert why is not None and said in why
    assert "TESTSECRET" not in why


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "http://vllm.llm.svc:8000/v1",
        "http://[::1]:8000/v1",
        "http://10.0.0.5:8000/x",
        "https://host:/v1",  # an empty port is the scheme's, as for Go
        "https://api.openai.com/v1?api-version=1",
        "https://res.openai.azure.com/openai/v1?api-version=2024-10-21",
    ],
)
def test_an_ordinary_endpoint_url_is_accepted(url: str) -> None:
    assert http_url_problem(url) is None


FUNCTION = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
STRICT = {"type": "function", "function": {**FUNCTION["function"], "strict": True}}
CUSTOM_CALL = {"id": "c0", "type": "custom", "custom": {"name": "run_sql", "input": "select 1"}}
USER = {"role": "user", "content": "weather in Paris?"}
TEXT = {"type": "text", "text": "weather in this city?"}
IMAGE = {"type": "image_url", "image_url": {"url": "https://x.example/paris.png"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
REFUSAL = {"type": "refusal", "refusal": "I cannot help with that."}


@pytest.mark.parametrize(
    ("tools", "messages", "llm_only"),
    [
        ([FUNCTION], [USER], False),
        ([FUNCTION, STRICT], [USER], True),
        ([{"type": "custom", "custom": {"name": "run_sql"}}], [USER], True),
        ([FUNCTION], [USER, {"role": "assistant", "tool_calls": [CUSTOM_CALL]}], True),
        # a tool call without a type is a function's, and odd values are nobody's business here
        ([FUNCTION], [USER, {"role": "assistant", "tool_calls": [{"id": "c"}]}], False),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], [USER], False),
        (None, None, False),
        ("tools", [USER, "text", {"tool_calls": "x"}], False),
        # the SLM reads text: an image, audio or file part anywhere is the LLM's
        ([FUNCTION], [{"role": "user", "content": [TEXT, IMAGE]}], True),
        ([FUNCTION], [{"role": "user", "content": [AUDIO]}, USER], True),
        ([FUNCTION], [{"role": "user", "content": [TEXT, {"type": "file", "file": {}}]}], True),
        ([FUNCTION], [{"role": "user", "content": [TEXT]}], False),
        ([FUNCTION], [USER, {"role": "assistant", "content": [REFUSAL]}, USER], False),
        ([FUNCTION], [{"role": "user", "content": ["bare", {"text": "x"}, 1]}], False),
    ],
)
def test_what_only_the_llm_answers(tools: Any, messages: Any, llm_only: bool) -> None:
    """One definition for the gateway (which never sends such a request to an SLM) and for
    curate (which must then never train or gate on it): a strict function, a custom tool, a
    custom call earlier in the conversation, an image, audio or file part (the SLM reads
    text only: it answered a photo's question from the words alone)."""
    assert llm_only_request(tools, messages) is llm_only
