"""Routes from AgentTasks and static files, and the live route table."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_gateway.routes import (
    LLM_HOSTS_ANNOTATION,
    MODES,
    SLM_TIMEOUT_ANNOTATION,
    Route,
    RouteError,
    RouteTable,
    key_may_go_to,
    llm_host,
    load_routes_file,
    parse_llm_hosts,
    route_from_entry,
    route_from_task,
    secret_ref,
    unread_host_hint,
    unread_llm_hosts,
)

TASK: dict[str, Any] = {
    "apiVersion": "slmfleet.dev/v1alpha1",
    "kind": "AgentTask",
    "metadata": {"name": "weather", "namespace": "agents"},
    "spec": {
        "fallback": {
            "llm": {
                "baseURL": "http://llm.example:8000/v1/",
                "model": "gpt-4o",
                "apiKeySecretRef": {"name": "llm-key"},
            }
        }
    },
}


def with_status(route: dict[str, Any], **status: Any) -> dict[str, Any]:
    task = copy.deepcopy(TASK)
    task["status"] = {"route": route, **status}
    return task


def test_a_new_task_is_served_by_its_llm() -> None:
    r = route_from_task(TASK)
    assert (r.mode, r.task, r.namespace, r.key) == ("llm", "weather", "agents", "agents/weather")
    assert r.llm_url == "http://llm.example:8000/v1/chat/completions"
    assert r.llm_model == "gpt-4o"
    assert not r.has_slm


def test_a_route_knows_its_tasks_type_for_live_agreement() -> None:
    """label-accuracy compares a tool-call task's tools and a classification task's labels:
    the gateway judged every task as a classification, so two answers in words of a tool-call
    task disagreed live while the gate scored them right."""
    assert route_from_task(TASK).task_type == "tool-call"  # the CRD's default
    classify = copy.deepcopy(TASK)
    classify["spec"]["taskType"] = "classification"
    assert route_from_task(classify).task_type == "classification"


def test_a_routes_file_names_a_task_type_of_the_crd_or_none() -> None:
    """A misspelt taskType was taken as given and changed silently what live agreement
    compares; none leaves labels compared as a classification's, as before it existed."""
    entry = {"llmBaseURL": "http://127.0.0.1:1/v1", "llmModel": "m"}
    assert route_from_entry("t", entry).task_type == ""
    assert route_from_entry("t", {**entry, "taskType": "tool-call"}).task_type == "tool-call"
    with pytest.raises(RouteError, match="taskType must be one of"):
        route_from_entry("t", {**entry, "taskType": "Classification"})


def test_status_route_overrides_the_spec() -> None:
    r = route_from_task(
        with_status(
            {
                "mode": "canary",
                "canaryPercent": 25,
                "slmEndpoint": "http://weather-slm.agents.svc:8000",
                "llmBaseURL": "http://other:9000/v1",
                "llmModel": "gpt-4.1",
                "confidenceThreshold": 0.7,
            }
        )
    )
    assert (r.mode, r.canary_percent, r.confidence_threshold) == ("canary", 25, 0.7)
    assert r.slm_url == "http://weather-slm.agents.svc:8000/v2/models/weather/infer"
    assert r.llm_url == "http://other:9000/v1/chat/completions"
    assert r.llm_model == "gpt-4.1"


def test_threshold_falls_back_to_the_selected_models() -> None:
    r = route_from_task(
        with_status(
            {"mode": "slm", "slmEndpoint": "http://s:8000"}, selectedModel={"threshold": 0.4}
        )
    )
    assert r.confidence_threshold == 0.4


def test_slm_mode_without_endpoint_degrades_to_llm_with_a_reason() -> None:
    r = route_from_task(with_status({"mode": "slm"}))
    assert r.mode == "llm"
    assert "slmEndpoint" in r.reason


def test_slm_budget_from_route_then_annotation_then_default() -> None:
    assert route_from_task(TASK, default_slm_timeout_s=1.5).slm_timeout_s == 1.5
    annotated = copy.deepcopy(TASK)
    annotated["metadata"]["annotations"] = {SLM_TIMEOUT_ANNOTATION: "250"}
    assert route_from_task(annotated).slm_timeout_s == 0.25
    r = route_from_task(with_status({"mode": "llm", "slmTimeoutMs": 800}))
    assert r.slm_timeout_s == 0.8


def test_api_key_is_sent_but_never_shown() -> None:
    r = route_from_task(TASK, api_key="sk-live-secret")
    assert r.llm_headers["Authorization"] == "Bearer sk-live-secret"
    assert "sk-live-secret" not in repr(r)
    assert "sk-live-secret" not in str(r.public())
    assert "Authorization" not in route_from_task(TASK).llm_headers


def test_secret_ref_defaults_the_key_name() -> None:
    assert secret_ref(TASK) == ("agents", "llm-key", "api-key")
    bare = copy.deepcopy(TASK)
    del bare["spec"]["fallback"]["llm"]["apiKeySecretRef"]
    assert secret_ref(bare) is None


@pytest.mark.parametrize(
    "route",
    [
        {"mode": "turbo"},
        {"mode": "canary", "slmEndpoint": "http://s:8000", "canaryPercent": 101},
        {"mode": "slm", "slmEndpoint": "ftp://s"},
        {"mode": "slm", "slmEndpoint": "http://s:8000", "confidenceThreshold": "high"},
    ],
)
def test_invalid_routes_are_refused(route: dict[str, Any]) -> None:
    with pytest.raises(RouteError):
        route_from_task(with_status(route))


def test_static_file_with_tasks_and_manifests(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        yaml.safe_dump_all(
            [
                {
                    "tasks": {
                        "extract": {
                            "mode": "slm",
                            "llmBaseURL": "http://127.0.0.1:1/v1",
                            "llmModel": "m",
                            "slmEndpoint": "http://127.0.0.1:2",
                            "slmModel": "extract-v2",
                            "slmTimeoutMs": 300,
                            "apiKeyEnv": "MY_KEY",
                        }
                    }
                },
                TASK,
            ]
        )
    )
    routes = {r.key: r for r in load_routes_file(path, environ={"MY_KEY": "k1"})}
    assert set(routes) == {"extract", "agents/weather"}
    extract = routes["extract"]
    assert extract.slm_url == "http://127.0.0.1:2/v2/models/extract-v2/infer"
    assert extract.slm_timeout_s == 0.3
    assert extract.llm_headers["Authorization"] == "Bearer k1"


def test_a_routes_file_names_the_key_files_it_reads_even_one_missing(tmp_path: Path) -> None:
    """The gateway reloads the routes when a key file changes (a rotated, mounted Secret), so
    it must know which files they are: each ``apiKeyFile`` read, and one that could not be
    read yet, whose appearing must cause a reload too. ``apiKeyEnv`` wins over a file."""
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    base = {"llmBaseURL": "http://127.0.0.1:1/v1", "llmModel": "m"}
    tasks = {
        "a": {**base, "apiKeyFile": str(key)},
        "b": {**base, "apiKeyEnv": "K", "apiKeyFile": str(tmp_path / "unused")},
    }
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    files: list[Path] = []
    routes = {r.task: r for r in load_routes_file(path, environ={"K": "k"}, key_files=files)}
    assert files == [key]
    assert routes["a"].llm_headers["Authorization"] == "Bearer sk-file"
    tasks["c"] = {**base, "apiKeyFile": str(tmp_path / "not-yet")}
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    files.clear()
    with pytest.raises(FileNotFoundError):
        load_routes_file(path, environ={"K": "k"}, key_files=files)
    assert files == [key, tmp_path / "not-yet"]


def route(task: str, ns: str = "", mode: str = "llm") -> Route:
    return Route(task=task, namespace=ns, mode=mode, llm_base_url="http://x/v1", llm_model="m")


class TestTable:
    def test_lookup_by_name_and_by_namespace(self) -> None:
        t = RouteTable()
        assert not t.ready
        t.replace_all([route("a", "ns1"), route("b", "ns1"), route("b", "ns2")])
        assert t.ready
        assert t.get("a") is t.get("ns1/a")
        assert t.get("b") is None  # ambiguous across namespaces
        assert t.get("ns2/b") is not None

    def test_upsert_and_remove_swap_the_index(self) -> None:
        t = RouteTable()
        t.replace_all([route("a")])
        v = t.version
        t.upsert(route("a", mode="llm"))
        assert t.version == v  # unchanged route, no new index
        t.upsert(route("c"))
        assert t.get("c") is not None and t.version == v + 1
        t.remove("c")
        assert t.get("c") is None
        t.remove("nope")
        assert [r.key for r in t.routes()] == ["a"]

    def test_a_name_that_becomes_ambiguous_and_unique_again_follows(self) -> None:
        """Each watch event re-indexes only its own name; the name's resolution must
        still follow every step, as a whole rebuild (replace_all) would have it."""
        t = RouteTable()
        t.replace_all([route("w", "ns1"), route("x", "ns1")])
        assert t.get("w") is t.get("ns1/w") and t.keys_named("w") == ("ns1/w",)
        t.upsert(route("w", "ns2"))
        assert t.get("w") is None and t.keys_named("w") == ("ns1/w", "ns2/w")
        assert t.get("ns2/w") is not None and t.get("x") is t.get("ns1/x")
        t.remove("ns1/w")
        assert t.get("w") is t.get("ns2/w") is not None and t.keys_named("w") == ("ns2/w",)
        t.upsert(route("w"))  # a routes file's task: its key is its name, and wins
        assert t.get("w") is not None and t.get("w").namespace == ""
        t.remove("w")
        t.remove("ns2/w")
        assert t.get("w") is None and t.keys_named("w") == ()

    def test_watch_events_and_rebuilds_index_by_the_same_rule(self) -> None:
        """After any run of events, and after a rebuild of the same routes, a key finds its
        route and a bare name its route without a namespace, else its only route."""
        rng = random.Random(7)
        t, rebuilt = RouteTable(), RouteTable()
        live: dict[str, Route] = {}
        for _ in range(500):
            r = route(rng.choice("abc"), rng.choice(["", "ns1", "ns2"]), rng.choice(MODES))
            if rng.random() < 0.3:
                t.remove(r.key)
                live.pop(r.key, None)
            else:
                t.upsert(r)
                live[r.key] = r
            rebuilt.replace_all(live.values())
            for table in (t, rebuilt):
                for key, r in live.items():
                    assert table.get(key) == r
                for name in "abc":
                    named = sorted(k for k, r in live.items() if r.task == name)
                    only = live[named[0]] if len(named) == 1 else None
                    assert table.get(name) == live.get(name, only)
                    assert table.keys_named(name) == tuple(named)


@pytest.mark.parametrize(
    ("field", "url"),
    [("baseURL", "http://llm.example:80800/v1"), ("slmEndpoint", "http://slm.example:99999")],
)
def test_a_url_with_an_impossible_port_is_a_route_error(field: str, url: str) -> None:
    """The CRD's ``isURL()`` accepts any digits as a port; yarl refuses one above 65535 with a
    plain ValueError, which the watch (catching RouteError per task) did not expect."""
    task = with_status({"mode": "slm", "slmEndpoint": "http://s:8000"})
    if field == "baseURL":
        task["spec"]["fallback"]["llm"]["baseURL"] = url
    else:
        task["status"]["route"]["slmEndpoint"] = url
    with pytest.raises(RouteError):
        route_from_task(task)


@pytest.mark.parametrize("annotated", ["0", "-5", "nan", "inf", "1e-400", "abc"])
def test_an_slm_budget_that_is_not_positive_is_a_route_error(annotated: str) -> None:
    """aiohttp takes a total timeout <= 0 as no timeout: a hung SLM would hold every call.
    The refusal names the annotation the task sets: "0" was refused as "slmTimeoutMs must be
    a positive number", a field that task does not have."""
    task = with_status({"mode": "slm", "slmEndpoint": "http://s:8000"})
    task["metadata"]["annotations"] = {SLM_TIMEOUT_ANNOTATION: annotated}
    with pytest.raises(RouteError) as refused:
        route_from_task(task)
    assert str(refused.value) == (
        f"task weather: annotation {SLM_TIMEOUT_ANNOTATION} must be a positive number of "
        "milliseconds"
    )
    task["metadata"]["annotations"] = {SLM_TIMEOUT_ANNOTATION: "250"}
    assert route_from_task(task).slm_timeout_s == 0.25


class _Meta:
    annotations = {LLM_HOSTS_ANNOTATION: "llm.example:8000"}  # the LLM of _named's tasks


class _Secret:
    def __init__(self, data: dict[str, str]) -> None:
        self.data = data
        self.metadata = _Meta()


class _Core:
    """Just enough of CoreV1Api for the watch to read a task's LLM key."""

    def __init__(self, secrets: dict[str, dict[str, str]]) -> None:
        self.secrets = secrets

    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> _Secret:
        return _Secret(self.secrets[name])


class _Custom:
    """Just enough of CustomObjectsApi for one list of AgentTasks."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"items": self.items, "metadata": {"resourceVersion": "7"}}


def _named(name: str, secret: str = "llm-key", base: str = "http://llm.example:8000/v1") -> Any:
    task = copy.deepcopy(TASK)
    task["metadata"]["name"] = name
    task["spec"]["fallback"]["llm"]["apiKeySecretRef"] = {"name": secret}
    task["spec"]["fallback"]["llm"]["baseURL"] = base
    return task


def test_one_broken_agenttask_does_not_keep_the_others_from_being_routed() -> None:
    """A task with an impossible port, or whose Secret holds bytes that are not UTF-8, is
    skipped or served without a key; the other tasks of the namespace are still routed and the
    gateway becomes ready (before, the whole list failed and was retried for ever)."""
    import base64

    from slm_gateway.kube import AgentTaskWatcher

    good = base64.b64encode(b"sk-good").decode()
    binary = base64.b64encode(b"\xff\xfe\x00k").decode()
    core = _Core({"llm-key": {"api-key": good}, "binary-key": {"api-key": binary}})
    custom = _Custom(
        [
            _named("weather"),
            _named("typo", base="http://llm.example:80800/v1"),
            _named("binary", secret="binary-key"),
        ]
    )
    table = RouteTable()
    watcher = AgentTaskWatcher(table, "agents")
    assert watcher._relist(custom, core) == "7"
    assert table.ready
    assert sorted(r.task for r in table.routes()) == ["binary", "weather"]
    weather = table.get("weather")
    assert weather is not None and weather.llm_headers["Authorization"] == "Bearer sk-good"
    binary_route = table.get("binary")
    assert binary_route is not None and "Authorization" not in binary_route.llm_headers


def test_the_llm_price_comes_from_the_route_else_the_spec() -> None:
    """status.route.llmPrice (the operator's copy) wins; the spec's price serves before the
    operator first wrote status; no price leaves the gateway's default; a bad one fails only
    this task."""
    from slm_gateway.routes import Price

    assert route_from_task(TASK).llm_price is None
    spec_priced = copy.deepcopy(TASK)
    spec_priced["spec"]["fallback"]["llm"]["price"] = {"prompt": 0.001, "completion": 0.002}
    assert route_from_task(spec_priced).llm_price == Price(0.001, 0.002)
    routed = copy.deepcopy(spec_priced)
    routed["status"] = {"route": {"mode": "llm", "llmPrice": {"prompt": 0.5, "completion": 1}}}
    assert route_from_task(routed).llm_price == Price(0.5, 1.0)
    for bad in ({"prompt": -1, "completion": 1}, {"prompt": "cheap", "completion": 1}, 3):
        routed["status"]["route"]["llmPrice"] = bad
        with pytest.raises(RouteError, match="llmPrice"):
            route_from_task(routed)


SECRET = "sk-TESTSECRET1234567890abcdef"


def test_a_query_in_the_base_url_stays_after_the_path_and_out_of_what_is_shown() -> None:
    """Azure OpenAI's base URL carries ``?api-version=``; ``base + "/chat/completions"`` put the
    path into the query. The query is sent, but may hold a key: what logs, labels and
    ``/v1/models`` show has none."""
    task = with_status(
        {
            "mode": "slm",
            "slmEndpoint": f"http://weather-slm.agents.svc:8000/?token={SECRET}",
            "llmBaseURL": f"https://res.openai.azure.com/openai/v1?api-version=1&api_key={SECRET}",
            "llmModel": "gpt-4o",
        }
    )
    r = route_from_task(task)
    assert r.llm_url == (
        f"https://res.openai.azure.com/openai/v1/chat/completions?api-version=1&api_key={SECRET}"
    )
    assert r.llm_log_url == "https://res.openai.azure.com/openai/v1/chat/completions"
    assert r.slm_url == f"http://weather-slm.agents.svc:8000/v2/models/weather/infer?token={SECRET}"
    assert r.slm_log_url == "http://weather-slm.agents.svc:8000/v2/models/weather/infer"
    assert r.public()["slm_endpoint"] == "http://weather-slm.agents.svc:8000/"
    assert SECRET not in str(r.public()) and SECRET not in repr(r)
    assert "https://res.openai.azure.com/openai/v1/chat/completions" in repr(r)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"https://bob:{SECRET}@api.example.com/v1", "api.example.com"),
        (f"https://bob:{SECRET}@api.example.com\uff0fv1", "cannot be parsed"),
        (f"https://api.example.com/v1#{SECRET}", "fragment"),
        (f"https://api.example.com:{SECRET}/v1", "port"),
    ],
)
def test_a_refused_url_is_a_route_error_that_names_the_task_not_the_secret(
    url: str, shown: str
) -> None:
    """The watch logs this error on every resync: urlsplit's own text quoted the password."""
    task = copy.deepcopy(TASK)
    task["spec"]["fallback"]["llm"]["baseURL"] = url
    with pytest.raises(RouteError) as info:
        route_from_task(task)
    assert "TESTSECRET" not in str(info.value)
    assert "task weather" in str(info.value) and shown in str(info.value)
    slm = with_status({"mode": "slm", "slmEndpoint": url})
    with pytest.raises(RouteError, match="slmEndpoint") as info:
        route_from_task(slm)
    assert "TESTSECRET" not in str(info.value)


def test_the_watch_skips_a_task_with_a_secret_in_its_url_without_logging_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import base64

    from slm_gateway.kube import AgentTaskWatcher

    core = _Core({"llm-key": {"api-key": base64.b64encode(b"sk-good").decode()}})
    custom = _Custom(
        [
            _named("userinfo", base=f"https://bob:{SECRET}@api.example.com/v1"),
            _named("nfkc", base=f"https://bob:{SECRET}@api.example.com\uff0fv1"),
            _named("azure", base=f"https://api.example.com/v1?api-version=1&api_key={SECRET}"),
        ]
    )
    table = RouteTable()
    caplog.set_level("INFO", logger="slm_gateway")
    AgentTaskWatcher(table, "agents")._relist(custom, core)
    assert [r.task for r in table.routes()] == ["azure"]
    skipped = [rec.getMessage() for rec in caplog.records if "skipped" in rec.getMessage()]
    assert len(skipped) == 2
    assert any("userinfo" in m and "https://api.example.com/v1" in m for m in skipped)
    assert not any("TESTSECRET" in rec.getMessage() for rec in caplog.records)


def test_a_routes_file_broken_mid_edit_is_refused_naming_the_place_not_the_line(
    tmp_path: Path,
) -> None:
    """PyYAML's error quotes the lines around the fault; the gateway logs it on every reload
    attempt, and the line being edited may hold a key."""
    path = tmp_path / "routes.yaml"
    path.write_text(
        "tasks:\n  t:\n"
        '    llmBaseURL: "https://api.example.com/v1?api_key=sk-TESTSECRET1234567890abcdef\n'
        "    llmModel: m\n"
    )
    with pytest.raises(RouteError) as err:
        load_routes_file(path)
    assert "not valid YAML at line" in str(err.value)
    assert "TESTSECRET" not in str(err.value)


@pytest.mark.parametrize(
    ("task", "namespace"),
    [("../outside", ""), ("a/b", ""), ("..", ""), ("weather", "../ns"), ("a\\b", "")],
)
def test_a_name_that_is_not_one_path_component_is_refused(task: str, namespace: str) -> None:
    """A task's names name its capture folder: a routes file's "../outside" had its calls
    written next to the --capture folder, not in it."""
    with pytest.raises(RouteError, match="it names the task's capture folder"):
        Route(
            task=task, mode="llm", namespace=namespace, llm_base_url="http://llm/v1", llm_model="m"
        )
    for fine in ("weather_tools.v2", "support triage", "acme:classify@v2"):  # as before
        Route(task=fine, mode="llm", llm_base_url="http://llm/v1", llm_model="m")


def test_a_routes_file_entry_keeps_its_metric(tmp_path: Path) -> None:
    """Its keys are status.route's, metric included: dropped, a selector task run from a
    routes file had its shadow copies compared on their arguments (a selector serves {}),
    and every copy disagreed."""
    routes = tmp_path / "routes.yaml"
    entry = {"llmBaseURL": "http://llm/v1", "llmModel": "m", "metric": "label-accuracy"}
    routes.write_text(yaml.safe_dump({"tasks": {"pick-tool": entry}}))
    [route] = load_routes_file(routes)
    assert route.metric == "label-accuracy"


ROUTES_ENTRY = {
    "mode": "slm",
    "llmBaseURL": "http://llm/v1",
    "llmModel": "m",
    "slmEndpoint": "http://triton:8000",
}


def refusals(tmp_path: Path, mode: str, key: str, value: str) -> tuple[str, str]:
    """Why a routes file's entry and a task's status.route are refused with ``key: value``
    (``value`` as YAML writes it, such as ``.nan``)."""
    routes = tmp_path / "routes.yaml"
    entry = yaml.safe_dump({"tasks": {"t": {**ROUTES_ENTRY, "mode": mode}}})
    routes.write_text(f"{entry}    {key}: {value}\n")
    with pytest.raises(RouteError) as from_file:
        load_routes_file(routes)
    task = with_status({"mode": mode, "slmEndpoint": "http://s:8000", key: yaml.safe_load(value)})
    with pytest.raises(RouteError) as from_status:
        route_from_task(task)
    return str(from_file.value), str(from_status.value)


@pytest.mark.parametrize("threshold", [".nan", "-1", "-.inf", "1.5", ".inf"])
def test_a_confidence_threshold_outside_0_to_1_is_refused_naming_it(
    tmp_path: Path, threshold: str
) -> None:
    """A confidence is within [0, 1] and the SLM's answer is served unless it is below the
    threshold: a routes file's NaN or negative threshold loaded and served every answer, however
    unsure, and one above 1 served none."""
    assert refusals(tmp_path, "slm", "confidenceThreshold", threshold) == (
        "task t: confidenceThreshold must be within 0..1",
        "task weather: confidenceThreshold must be within 0..1",
    )


def test_the_ends_of_the_confidence_range_are_thresholds() -> None:
    for threshold in (0, 0.0, 1, 1.0):
        route = route_from_entry("t", {**ROUTES_ENTRY, "confidenceThreshold": threshold})
        assert route.confidence_threshold == threshold


@pytest.mark.parametrize("percent", [".inf", "-.inf", ".nan"])
def test_a_canary_percent_that_is_not_finite_is_a_route_error(tmp_path: Path, percent: str) -> None:
    """int(.inf) raised a bare OverflowError (int(.nan) a ValueError) out of the routes file's
    load and the watch, which handle a RouteError per task."""
    assert refusals(tmp_path, "canary", "canaryPercent", percent) == (
        "task t: canaryPercent must be within 0..100",
        "task weather: canaryPercent must be within 0..100",
    )


# ---- where a Secret's key may go ----------------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "url", "allowed"),
    [
        ("api.openai.com", "https://api.openai.com/v1", True),
        ("api.openai.com", "https://api.openai.com:443/v1", True),
        # A host without a port is https on 443 only: an AgentTask editor who set the URL
        # to http:// on port 80 had the key sent unencrypted.
        ("api.openai.com", "http://api.openai.com/v1", False),
        ("api.openai.com", "HTTP://api.openai.com:80/v1", False),
        ("api.openai.com", "http://api.openai.com:443/v1", False),
        ("api.openai.com", "https://api.openai.com:8443/v1", False),
        ("*.openai.azure.com", "http://res.openai.azure.com/openai/v1", False),
        ("::1", "http://[::1]/v1", False),
        # An explicit port allows that port, with either scheme (a local server over http).
        ("api.openai.com:8443", "https://api.openai.com:8443/v1", True),
        ("api.openai.com:443", "http://api.openai.com/v1", False),  # that is port 80
        ("api.openai.com:443", "https://api.openai.com/v1", True),
        ("llm.local:80", "http://llm.local/v1", True),
        ("127.0.0.1:8000", "https://127.0.0.1:8000/v1", True),
        ("api.openai.com", "https://api.openai.com.evil.example/v1", False),
        ("api.openai.com", "https://evil.example/api.openai.com", False),
        ("api.openai.com", "https://evil.example/v1?host=api.openai.com", False),
        # Case and a trailing dot do not make another host.
        ("API.OpenAI.com", "https://api.OPENAI.com/v1", True),
        ("api.openai.com.", "https://api.openai.com/v1", True),
        ("api.openai.com", "https://api.openai.com./v1", True),
        # A wildcard matches subdomains, not the domain itself, nor a look-alike.
        ("*.openai.azure.com", "https://res.openai.azure.com/openai/v1", True),
        ("*.openai.azure.com", "https://a.b.openai.azure.com/openai/v1", True),
        ("*.openai.azure.com", "https://openai.azure.com/openai/v1", False),
        ("*.openai.azure.com", "https://evilopenai.azure.com/v1", False),
        ("*.openai.azure.com", "https://res.openai.azure.com:8443/v1", False),
        ("*.example.com:8443", "https://llm.example.com:8443/v1", True),
        # Several entries, with spaces; the one that matches is enough.
        ("api.openai.com, *.openai.azure.com, 127.0.0.1:8000", "http://127.0.0.1:8000/v1", True),
        ("api.openai.com, *.openai.azure.com, 127.0.0.1:8000", "http://127.0.0.1:8001/v1", False),
        ("127.0.0.1:8000", "http://localhost:8000/v1", False),
        # IPv6 literals, in brackets or bare (no port), in any spelling.
        ("[::1]:8000", "http://[::1]:8000/v1", True),
        ("[::1]:8000", "http://[0:0:0:0:0:0:0:1]:8000/v1", True),
        ("[::1]:8000", "http://[::2]:8000/v1", False),
        ("[::1]", "https://[::1]/v1", True),
        ("::1", "https://[::1]/v1", True),
        ("[::1]", "https://[::1]:8443/v1", False),
        ("[::1:8000", "http://[::1]:8000/v1", False),
        # User info is not the host: the call would go to evil.example.
        ("api.openai.com", "http://api.openai.com@evil.example/v1", False),
        ("api.openai.com", "http://api.openai.com:443@evil.example/v1", False),
        ("api.openai.com", "http://evil.example\\@api.openai.com/v1", False),
        # No annotation, an empty one, or entries that are not hosts allow nothing.
        (None, "https://api.openai.com/v1", False),
        ("", "https://api.openai.com/v1", False),
        (" , ", "https://api.openai.com/v1", False),
        ("*", "https://api.openai.com/v1", False),
        ("*.com:x", "https://api.openai.com/v1", False),
        ("api.openai.com:0", "https://api.openai.com/v1", False),
        ("https://api.openai.com", "https://api.openai.com/v1", False),
        ("api.openai.com", "ftp://api.openai.com/v1", False),
        ("api.openai.com", "https://api.openai.com:99999/v1", False),
    ],
)
def test_a_key_may_go_only_to_a_host_its_secret_lists(
    hosts: str | None, url: str, allowed: bool
) -> None:
    assert key_may_go_to(url, parse_llm_hosts(hosts)) is allowed


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://api.openai.com/v1", "api.openai.com"),
        ("https://API.openai.com.:443/v1", "api.openai.com"),
        ("http://127.0.0.1:19101/v1", "127.0.0.1:19101"),
        ("https://api.openai.com:80/v1", "api.openai.com:80"),
        # http on its default port is named with it: a bare host allows https only.
        ("http://api.openai.com/v1", "api.openai.com:80"),
        ("HTTP://llm.local.:80/v1", "llm.local:80"),
        ("http://[::1]:8000/v1", "[::1]:8000"),
        ("http://api.openai.com@evil.example/", "evil.example:80"),
    ],
)
def test_the_host_to_allow_is_named_as_the_annotation_takes_it(url: str, host: str) -> None:
    """What the error tells the Secret's owner to add, and exactly what then allows it."""
    assert llm_host(url) == host
    assert key_may_go_to(url, parse_llm_hosts(host))


def test_entries_that_allow_nothing_are_named_for_the_secrets_owner() -> None:
    """An owner who writes the URL (a scheme, a path) instead of the host allows nothing, by
    design; these entries are what the gateway warns about, in the order written."""
    value = "https://api.openai.com/v1,\n  llm.example:8000 api.openai.com/v1 *  [::1]:x"
    assert unread_llm_hosts(value) == [
        "https://api.openai.com/v1",
        "api.openai.com/v1",
        "*",
        "[::1]:x",
    ]
    assert parse_llm_hosts(value) == parse_llm_hosts("llm.example:8000")
    assert unread_llm_hosts("api.openai.com, *.openai.azure.com") == []
    assert unread_llm_hosts(None) == [] and unread_llm_hosts("") == []


def test_a_tasks_key_is_left_out_of_a_route_to_a_host_its_secret_does_not_list() -> None:
    """The spec's baseURL and the status' llmBaseURL are written by whoever may edit the task;
    the key is the Secret owner's. A route to a host the Secret does not list has no key, and
    says why, naming the Secret, the host and the fix. A routes file's key (the gateway's own
    configuration) is not restricted."""
    openai = parse_llm_hosts("api.openai.com, llm.example:8000")
    # white space separates entries too (a YAML block, one host per line), and a newline is
    # never part of a host
    for spaced in ("api.openai.com llm.example:8000", "api.openai.com\nllm.example:8000\n"):
        assert parse_llm_hosts(spaced) == openai
    allowed = route_from_task(TASK, api_key="sk-platform", key_hosts=openai)
    assert allowed.llm_headers == {"Authorization": "Bearer sk-platform"}
    assert allowed.llm_blocked == ""
    for hosts in (frozenset(), parse_llm_hosts("api.openai.com")):
        blocked = route_from_task(TASK, api_key="sk-platform", key_hosts=hosts)
        assert blocked.llm_headers == {} and blocked.llm_api_key == ""
        assert "agents/llm-key" in blocked.llm_blocked
        assert "add llm.example:8000 to the Secret's slmfleet.dev/llm-hosts" in blocked.llm_blocked
        assert "sk-platform" not in blocked.llm_blocked + repr(blocked)
    redirected = with_status(
        {"mode": "llm", "llmBaseURL": "http://127.0.0.1:19101/v1", "llmModel": "gpt-4o"}
    )
    blocked = route_from_task(redirected, api_key="sk-platform", key_hosts=openai)
    assert blocked.llm_headers == {} and "add 127.0.0.1:19101 " in blocked.llm_blocked
    # No key, nothing to withhold; no hosts given (a routes file's key): sent anywhere.
    assert route_from_task(TASK, key_hosts=frozenset()).llm_blocked == ""
    anywhere = route_from_task(redirected, api_key="sk-platform")
    assert anywhere.llm_headers == {"Authorization": "Bearer sk-platform"}


@pytest.mark.parametrize(
    ("entry", "shown", "meant"),
    [
        ("https://user:pass@api.example.com/v1", "https://api.example.com/v1", "api.example.com"),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai?key=AIza#x",
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "generativelanguage.googleapis.com",
        ),
        ("http://127.0.0.1:19101/v1", "http://127.0.0.1:19101/v1", "127.0.0.1:19101"),
        ("HTTP://llm.local./v1", "http://llm.local./v1", "llm.local:80"),
        ("user:pass@api.example.com/v1?key=x", "api.example.com/v1", "api.example.com"),
        ("api.openai.com/v1", "api.openai.com/v1", "api.openai.com"),
        ("*.openai.azure.com/openai", "*.openai.azure.com/openai", "*.openai.azure.com"),
        ("http://[::1", "http://[::1", ""),  # urlsplit refuses it
        ("*", "*", ""),
        ("[::1]:x", "[::1]:x", ""),
    ],
)
def test_an_unread_entry_is_shown_without_credentials_with_the_host_it_meant(
    entry: str, shown: str, meant: str
) -> None:
    """What the gateway's warning says of an entry that allows nothing: the entry without user
    info, query or fragment (a pasted URL may carry a password or a key), and the host entry
    the owner probably meant ("" when none reads as one)."""
    assert unread_host_hint(entry) == (shown, meant)
    if meant:
        assert parse_llm_hosts(meant) and not unread_llm_hosts(meant)
