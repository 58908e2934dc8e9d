"""Fuzzing the gateway with malformed requests: every answer is a 4xx with an OpenAI error body.

Hypothesis builds requests that are wrong in one way each (malformed or truncated JSON, JSON
that is not an object, wrong types anywhere, missing messages, broken tool schemas, bad
parameters, unknown tasks, oversize bodies) starting from a valid request for a task that is
routed to a live stand-in LLM. The bulk runs through Starlette's TestClient into the real
ASGI app; a second pass sends the same kinds of request over real HTTP to a real gateway
process (uvicorn, httptools), plus the cases only a socket can produce (chunked oversize
bodies, wrong methods and paths). A valid request would be answered 200 by the stand-in, so
a strategy that failed to break its request shows up as a failure too.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from slm_e2e import llm_standin
from slm_gateway.app import create_app
from slm_gateway.config import GatewayConfig
from slm_gateway.routes import Route, RouteTable
from slm_gateway.testing import GatewayProcess, start_gateway
from slm_gateway.validate import ROLES

TASK = "weather"
LIMIT = 4096
ERROR_KEYS = {"message", "type", "param", "code"}

# ---- strategies ----------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
non_str = json_values.filter(lambda v: not isinstance(v, str))
non_null_non_str = json_values.filter(lambda v: v is not None and not isinstance(v, str))
non_list = json_values.filter(lambda v: v is not None and not isinstance(v, list))
non_dict = json_values.filter(lambda v: not isinstance(v, dict))
non_number = json_values.filter(
    lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int | float))
)
non_int = json_values.filter(
    lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int))
)
non_bool = json_values.filter(lambda v: v is not None and not isinstance(v, bool))
bad_names = texts.filter(lambda s: not s or any(c in s for c in " \t\n\"'/(){}[]") or len(s) > 64)
bad_roles = texts.filter(lambda s: s not in ROLES)
bad_schema_types = texts.filter(
    lambda s: s not in {"object", "array", "string", "number", "integer", "boolean", "null"}
)


def tool(name: str = "get_weather", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


def valid() -> dict[str, Any]:
    return {
        "model": TASK,
        "messages": [
            {"role": "system", "content": "Pick a tool."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        "tools": [tool(parameters={"type": "object", "properties": {"city": {"type": "string"}}})],
    }


def with_field(name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return values.map(lambda v: {**valid(), name: v})


def with_message(bad: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    def build(m: Any, at: int) -> dict[str, Any]:
        body = valid()
        body["messages"].insert(at, m)
        return body

    return st.builds(build, bad, st.integers(0, 2))


def with_tool(bad: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return bad.map(lambda t: {**valid(), "tools": [*valid()["tools"], t]})


def without(name: str) -> dict[str, Any]:
    body = valid()
    del body[name]
    return body


bad_content = non_null_non_str.filter(lambda v: not isinstance(v, list)) | st.lists(
    non_dict | st.fixed_dictionaries({"type": non_str}) | st.just({"type": "text", "text": 5}),
    min_size=1,
    max_size=2,
)

bad_messages = st.one_of(
    non_dict,
    st.fixed_dictionaries({"content": texts}),
    st.fixed_dictionaries({"role": non_str.filter(lambda v: v is not None), "content": texts}),
    st.fixed_dictionaries({"role": bad_roles, "content": texts}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": bad_content}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"])}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": texts}),
    st.fixed_dictionaries(
        {"role": st.just("tool"), "content": texts, "tool_call_id": non_null_non_str}
    ),
    st.fixed_dictionaries({"role": st.just("assistant"), "tool_calls": non_list}),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "tool_calls": st.lists(non_dict, min_size=1, max_size=2)}
    ),
    st.fixed_dictionaries(
        {
            "role": st.just("assistant"),
            "tool_calls": st.just([{"id": "c1", "type": "function", "function": {"name": "f"}}]),
        }
    ),
)

bad_tools = st.one_of(
    non_dict,
    st.fixed_dictionaries({"type": texts.filter(lambda s: s != "function")}),
    st.fixed_dictionaries({"type": st.just("function"), "function": non_dict}),
    st.builds(lambda n: {"type": "function", "function": {"name": n}}, non_str),
    st.builds(lambda n: {"type": "function", "function": {"name": n}}, bad_names),
    st.builds(lambda p: tool("f", parameters=p), non_dict.filter(lambda v: v is not None)),
    st.builds(lambda t: tool("f", parameters={"type": t}), bad_schema_types),
    st.builds(
        lambda t: tool("f", parameters={"type": t}),
        non_str.filter(lambda v: v is not None and not isinstance(v, list)),
    ),
    st.builds(
        lambda p: tool("f", parameters={"type": "object", "properties": p}),
        non_dict.filter(lambda v: v is not None),
    ),
    st.builds(
        lambda p: tool("f", parameters={"properties": {"a": p}}),
        # true and false are JSON Schemas (anything, nothing): not broken
        non_dict.filter(lambda v: v is not None and not isinstance(v, bool)),
    ),
    st.builds(
        lambda r: tool("f", parameters={"required": r}),
        non_list | st.lists(non_str.filter(lambda v: v is not None), min_size=1, max_size=2),
    ),
    st.builds(lambda d: tool("f", description=d), non_str.filter(lambda v: v is not None)),
    st.just(tool("get_weather")),  # a duplicate name
)

bad_params = st.one_of(
    with_field("temperature", non_number | st.floats(2.01, 1e6) | st.floats(-1e6, -0.01)),
    with_field("top_p", non_number | st.floats(1.01, 1e6)),
    with_field(
        "n", non_int | st.integers(-(2**40), 0) | st.integers(min_value=129, max_value=2**40)
    ),
    with_field("max_tokens", non_int | st.integers(-(2**40), 0)),
    with_field("stream", non_bool),
    with_field("stream_options", non_dict.filter(lambda v: v is not None)),
    st.builds(
        lambda v: {**valid(), "stream": True, "stream_options": {"include_usage": v}},
        non_bool.filter(lambda v: v is not None),
    ),
    with_field(
        "stop",
        non_list.filter(lambda v: not isinstance(v, str))
        | st.lists(non_str, min_size=1, max_size=3).filter(
            lambda v: any(not isinstance(x, str) for x in v)
        )
        | st.lists(texts, min_size=5, max_size=6),
    ),
    with_field(
        "tool_choice",
        texts.filter(lambda s: s not in ("none", "auto", "required"))
        | non_dict.filter(lambda v: v is not None and not isinstance(v, str))
        | st.just({"type": "function", "function": {"name": "nope"}}),
    ),
    with_field("response_format", non_dict.filter(lambda v: v is not None)),
    with_field("model", non_str.filter(lambda v: v is not None) | st.just("")),
    with_field("messages", non_list | st.just([])),
    st.just(without("messages")),
)

unknown_task = with_field("model", texts.filter(lambda s: s and s != TASK))


def encoded(bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return bodies.map(orjson.dumps)


def not_json(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return True
    return False


malformed_json = st.one_of(
    st.binary(max_size=200).filter(not_json),
    st.integers(1, len(orjson.dumps(valid())) - 1).map(lambda k: orjson.dumps(valid())[:k]),
    st.just(b""),
    st.just(b'{"model": "weather", "messages": [}'),
    st.just(b'{"model": NaN}'),
)
oversize = st.integers(LIMIT + 1, 16 * LIMIT).map(
    lambda n: orjson.dumps({**valid(), "messages": [{"role": "user", "content": "x" * n}]})
)

bad_requests = st.one_of(
    malformed_json,
    encoded(non_dict),
    encoded(with_message(bad_messages)),
    encoded(with_tool(bad_tools)),
    encoded(with_field("tools", non_list)),
    encoded(bad_params),
    encoded(unknown_task),
    oversize,
)


def assert_openai_error(status: int, content_type: str, raw: bytes) -> None:
    assert 400 <= status < 500, (status, raw[:300])
    assert content_type.startswith("application/json")
    doc = orjson.loads(raw)
    assert set(doc) == {"error"} and set(doc["error"]) == ERROR_KEYS, doc
    err = doc["error"]
    assert err["type"] == "invalid_request_error"
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(standin: llm_standin.StandIn) -> Iterator[TestClient]:
    table = RouteTable()
    table.replace_all(
        [Route(task=TASK, mode="llm", llm_base_url=standin.llm_base_url, llm_model="m")]
    )
    app = create_app(GatewayConfig(max_body_bytes=LIMIT), table)
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


@pytest.fixture(scope="module")
def gateway(
    standin: llm_standin.StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    d = tmp_path_factory.mktemp("fuzz")
    routes = d / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {"tasks": {TASK: {"mode": "llm", "llmBaseURL": standin.llm_base_url, "llmModel": "m"}}}
        )
    )
    with start_gateway(
        ["--routes", str(routes), "--max-body-bytes", str(LIMIT)], log_path=d / "gw.log"
    ) as gw:
        yield gw
        log = gw.log()
    assert "Traceback" not in log and "internal error" not in log


# ---- tests -----------------------------------------------------------------------------------


def test_the_base_request_is_valid(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", content=orjson.dumps(valid())).status_code == 200


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(raw=bad_requests)
def test_asgi_app_answers_every_bad_request_with_a_4xx_error_body(
    client: TestClient, raw: bytes
) -> None:
    r = client.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_openai_error(r.status_code, r.headers["content-type"], r.content)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(task=st.from_regex(r"\A[a-z0-9.-]{1,40}\Z").filter(lambda s: s != TASK))
def test_unknown_task_in_header_is_a_404(client: TestClient, task: str) -> None:
    body = {**valid(), "model": "gpt-4o"}
    r = client.post(
        "/v1/chat/completions", content=orjson.dumps(body), headers={"X-Agent-Task": task}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _http(gw: GatewayProcess) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(raw=bad_requests)
def test_real_http_answers_every_bad_request_with_a_4xx_error_body(
    gateway: GatewayProcess, raw: bytes
) -> None:
    conn = _http(gateway)
    try:
        conn.request(
            "POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        assert_openai_error(resp.status, resp.getheader("content-type", ""), resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/chat/completions", 405), ("PUT", "/v1/models", 405), ("GET", "/v1/nothing", 404)],
)
def test_real_http_wrong_method_or_path(
    gateway: GatewayProcess, method: str, path: str, status: int
) -> None:
    conn = _http(gateway)
    conn.request(method, path)
    resp = conn.getresponse()
    assert resp.status == status
    assert_openai_error(resp.status, resp.getheader("content-type", ""), resp.read())


def test_real_http_chunked_oversize_body_is_a_413(gateway: GatewayProcess) -> None:
    conn = _http(gateway)
    chunks = (
        [b'{"model": "weather", "messages": [{"role": "user", "content": "']
        + [b"x" * 1024] * 8
        + [b'"}]}']
    )
    # The chunks in one write with the head: the gateway answers 413 and closes once the
    # body passes its limit, and a client still writing chunk by chunk then (a loaded
    # machine) got a broken pipe instead of the answer.
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders(body)
    resp = conn.getresponse()
    assert resp.status == 413
    assert_openai_error(resp.status, resp.getheader("content-type", ""), resp.read())


def test_real_http_keeps_serving_after_the_fuzz(
    gateway: GatewayProcess, standin: llm_standin.StandIn
) -> None:
    conn = _http(gateway)
    conn.request("POST", "/v1/chat/completions", body=orjson.dumps(valid()))
    resp = conn.getresponse()
    assert resp.status == 200 and orjson.loads(resp.read())["choices"]
    status, body = gateway.get("/metrics")
    assert status == 200 and b'slm_gateway_invalid_requests_total{code="invalid_json"}' in body
