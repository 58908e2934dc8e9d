"""Task discovery: pure naming/purity/manifest rules, and real clustering of BFCL traffic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_contract import CallRecord
from slm_trainer import discover

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def rec(prompt: str, tool: str | None, task: str = "t", answer: str = "ok") -> CallRecord:
    response: dict[str, Any] = (
        {"tool_calls": [{"type": "function", "function": {"name": tool, "arguments": "{}"}}]}
        if tool
        else {"content": answer}
    )
    tools = [{"type": "function", "function": {"name": tool}}] if tool else []
    return CallRecord(
        task=task,
        backend="llm",
        messages=[{"role": "user", "content": prompt}],
        tools=tools,
        response=response,
    )


def test_purity_ignores_noise_and_weighs_by_size() -> None:
    assert discover.purity([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert discover.purity([0, 0, 0, 1], ["a", "a", "b", "b"]) == 0.75
    assert discover.purity([-1, 0], ["a", "b"]) == 1.0
    assert discover.purity([], []) == 0.0


def test_names_are_unique_dns_labels() -> None:
    taken: set[str] = set()
    a = discover.cluster_name(["Weather_1_GetWeather"], [], taken)
    b = discover.cluster_name(["Weather_1_GetWeather"], [], taken)
    c = discover.cluster_name([], ["Refund", "order", "money"], taken, prefix="shop-")
    d = discover.cluster_name(["3d.render"], [], taken)
    assert (a, b, c) == (
        "weather-1-get-weather",
        "weather-1-get-weather-2",
        "shop-refund-order-money",
    )
    assert d.startswith("task-3d")
    assert all(DNS_1035.match(n) and len(n) <= 50 for n in taken)


def test_task_types_and_embedding_text() -> None:
    assert discover.task_type_of(rec("x", "get_weather")) == "tool-call"
    assert discover.task_type_of(rec("x", None, answer="billing")) == "classification"
    assert discover.task_type_of(rec("x", None, answer='{"name": "Ann", "age": 3}')) == "extraction"
    assert discover.task_type_of(rec("x", None, answer="A long free text answer " * 5)) == (
        "generation"
    )
    text = discover.embedding_text(rec("Weather in Oslo?", "get_weather"))
    assert text == "Weather in Oslo?\nTools: get weather\nAction: get weather"


def test_manifest_follows_the_crd(tmp_path: Path) -> None:
    args = discover.Args(input=tmp_path, output_dir=tmp_path, namespace="agents", llm_secret="k")
    m = discover.agent_task_manifest(
        "get-weather", "tool-call", "d", "pvc://logs/w.jsonl", args, "gpt-4o", 120
    )
    crd = yaml.safe_load((REPO / "crds" / "slmfleet.dev_agenttasks.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec_schema = schema["properties"]["spec"]
    assert m["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert m["kind"] == crd["spec"]["names"]["kind"]
    assert set(spec_schema["required"]) <= set(m["spec"])
    assert set(m["spec"]) <= set(spec_schema["properties"])
    props = spec_schema["properties"]
    assert m["spec"]["evaluation"]["metric"] in props["evaluation"]["properties"]["metric"]["enum"]
    assert m["spec"]["taskType"] in props["taskType"]["enum"]
    cand_props = props["candidates"]["items"]["properties"]
    for cand in m["spec"]["candidates"]:
        assert set(cand) <= set(cand_props) and re.match(
            cand_props["name"]["pattern"], cand["name"]
        )
    assert re.match(
        r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+|s3://[^/]+/.+|file:///.+)$",
        m["spec"]["dataset"]["uri"],
    )
    assert m["spec"]["fallback"]["llm"]["apiKeySecretRef"] == {"name": "k"}
    cls = discover.agent_task_manifest("t", "classification", "d", "file:///x", args, "m", 9)
    assert cls["spec"]["evaluation"]["metric"] == "label-accuracy"
    assert cls["spec"]["candidates"][0]["model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_manifest_asks_for_the_scrubbing_its_calls_were_counted_under(tmp_path: Path) -> None:
    """--no-scrub-pii counted calls that differ only in an e-mail address as distinct, yet
    the manifest asked curate to scrub them: one call once redacted, and minExamples (the
    distinct count) was never reached, so the task waited for data for good."""
    for scrub in (True, False):
        args = discover.Args(input=tmp_path, output_dir=tmp_path, scrub_pii=scrub)
        m = discover.agent_task_manifest("t", "tool-call", "d", "file:///x", args, "m", 60)
        assert m["spec"]["dataset"]["piiScrubbing"] is scrub


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ({"namespace": "Team_A"}, "not a Kubernetes namespace name"),
        ({"llm_secret": "My_Secret"}, "llm_secret 'My_Secret' is not a Kubernetes object name"),
        ({"storage_claim": "Artifacts"}, "storage_claim 'Artifacts' is not a Kubernetes object"),
        ({"storage_claim": ""}, "storage_claim '' is not a Kubernetes object name"),
        ({"llm_base_url": "api.openai.com/v1"}, "llm_base_url cannot be"),
        ({"dataset_uri_prefix": "https://logs.example.com/calls"}, "dataset_uri_prefix must"),
        ({"dataset_uri_prefix": "/data/calls"}, "dataset_uri_prefix must"),
        ({"name_prefix": "team-" * 5}, "name_prefix is 25 characters; at most 24"),
        (
            {"llm_model": "m" * 513},
            "llm_model is 513 characters; an AgentTask's fallback.llm.model takes at most 512",
        ),
        (
            {"dataset_uri_prefix": "s3://bucket/" + "p" * 1990},
            "dataset_uri_prefix makes dataset URIs of up to 2059 characters; an AgentTask's "
            "dataset.uri takes at most 2048",
        ),
    ],
)
def test_settings_the_crd_would_refuse_are_refused_before_any_work(
    tmp_path: Path, setting: dict[str, str], said: str
) -> None:
    """Each was written into every manifest of a run that reported success; `kubectl apply`
    of them all then failed at admission."""
    with pytest.raises(ValueError, match=re.escape(said)):
        discover.Args(input=tmp_path, output_dir=tmp_path, **setting)  # type: ignore[arg-type]
    for prefix in ("pvc://logs", "pvc://logs/calls/", "s3://bucket/calls", "file:///data/"):
        discover.Args(input=tmp_path, output_dir=tmp_path, dataset_uri_prefix=prefix)
    longest = "s3://bucket/" + "p" * (2048 - len("s3://bucket/") - 1 - 50 - len(".jsonl"))
    discover.Args(input=tmp_path, output_dir=tmp_path, dataset_uri_prefix=longest)
    discover.Args(input=tmp_path, output_dir=tmp_path, llm_model="m" * 512)


def test_the_length_limits_are_the_crds() -> None:
    """The limits discover checks are the ones the API server enforces at admission."""
    crd = yaml.safe_load((REPO / "crds" / "slmfleet.dev_agenttasks.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    llm = spec["properties"]["fallback"]["properties"]["llm"]["properties"]
    assert llm["model"]["maxLength"] == discover.MAX_LLM_MODEL
    assert spec["properties"]["dataset"]["properties"]["uri"]["maxLength"] == (
        discover.MAX_DATASET_URI
    )


def test_a_fallback_model_too_long_for_the_crd_is_a_usage_error(tmp_path: Path) -> None:
    """A bad flag is exit 2 (argparse's convention): the operator's Job fails at once rather
    than proposing manifests that `kubectl apply` refuses."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "slm_trainer",
            "discover",
            f"--input={tmp_path}",
            f"--output-dir={tmp_path / 'out'}",
            "--llm-model=" + "m" * 600,
            "--result-path=",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "llm_model is 600 characters" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ real clustering

#: Five BFCL live_multiple function sets whose tools do not overlap: five agent tasks.
FUNCTION_SETS = ("145", "161", "191", "164", "4")


def bfcl_tasks(per_set: int = 24) -> list[CallRecord]:
    pytest.importorskip("bfcl_eval")
    import bfcl_data

    out, seen = [], {s: 0 for s in FUNCTION_SETS}
    for r in bfcl_data.records(["live_multiple"]):
        fs = r.request_id.split("-")[1]
        if fs in seen and seen[fs] < per_set:
            seen[fs] += 1
            out.append(CallRecord(**{**json.loads(r.to_json()), "task": f"bfcl-set-{fs}"}))
    return out


@pytest.mark.slow
def test_discover_recovers_bfcl_tasks_and_writes_manifests(tmp_path: Path) -> None:
    records = bfcl_tasks()
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(r.to_json() + "\n" for r in records) + "{broken\n")
    events: list[dict[str, Any]] = []
    args = discover.Args(
        input=log,
        output_dir=tmp_path / "out",
        max_clusters=8,
        min_cluster_size=12,
        num_threads=2,
        dataset_uri_prefix="pvc://agent-call-logs/discovered",
    )
    result = discover.run(args, events.append)
    assert result.ok, result.message
    assert result.stage == "discover"
    report = json.loads((tmp_path / "out" / "discover_report.json").read_text())
    print(
        f"\ndiscover on BFCL: k={report['clusters_found']}, purity {report['purity']}, "
        f"silhouettes {report['silhouette_by_k']}"
    )
    assert report["label_by"] == "task"
    assert report["purity"] >= 0.9
    assert 4 <= report["clusters_found"] <= 8
    assert report["records"] == len(records)
    sizes = [c["size"] for c in report["clusters"]]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == len(records)
    first = report["clusters"][0]
    assert first["top_tools"] and first["keywords"] and first["examples"]
    assert first["task_type"] == "tool-call"

    manifests = sorted((tmp_path / "out" / "manifests").glob("*.yaml"))
    assert len(manifests) == len(report["manifests"]) >= 4
    for path in manifests:
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "AgentTask" and DNS_1035.match(doc["metadata"]["name"])
        name = doc["metadata"]["name"]
        assert doc["spec"]["dataset"]["uri"] == f"pvc://agent-call-logs/discovered/{name}.jsonl"
        lines = (tmp_path / "out" / "clusters" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) >= 12
        assert all(CallRecord.from_json(line) for line in lines)
    assert any(e.get("phase") == "cluster" for e in events)

    # Gateway replicas write shards in an order that depends on timing: the same calls in
    # another order, over two shards, must propose the same tasks with the same calls.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    order = sorted(records, key=lambda r: r.request_id[::-1])
    for name, part in (
        ("a.jsonl", order[: len(order) // 3]),
        ("b.jsonl", order[len(order) // 3 :]),
    ):
        (shuffled / name).write_text("".join(r.to_json() + "\n" for r in part))
    again = discover.run(replace(args, input=shuffled, output_dir=tmp_path / "again"))
    assert again.ok, again.message
    other = json.loads((tmp_path / "again" / "discover_report.json").read_text())
    assert [(c["name"], c["size"]) for c in other["clusters"]] == [
        (c["name"], c["size"]) for c in report["clusters"]
    ]
    for path in manifests:
        theirs = tmp_path / "again" / "clusters" / f"{path.stem}.jsonl"
        assert theirs.read_text() == (tmp_path / "out" / "clusters" / theirs.name).read_text()


@pytest.mark.slow
def test_discovered_tasks_count_distinct_calls_carry_no_pii_and_replace_old_proposals(
    tmp_path: Path,
) -> None:
    """Agents retry, so a log repeats calls: a manifest whose minExamples counted the repeats
    waited for data for ever, since its curate keeps each call once. The report, cluster
    files and manifests are scrubbed as curate scrubs, and a second run's output directory
    holds only its own proposals (kubectl apply -f would create the old ones too)."""
    from slm_trainer import curate

    cities = ["Oslo", "Paris", "Lima", "Quito", "Cairo", "Delhi", "Tokyo", "Seoul", "Perth"]
    calls = [
        c
        for i, city in enumerate(cities)
        for c in (
            rec(f"Weather forecast for {city} tomorrow? Mail jane{i}@example.com", "get_weather"),
            rec(f"Book a table for {i + 2} people at a restaurant in {city}", "book_table"),
            rec(f"Convert {i * 10 + 5} US dollars to euros for {city}", "convert_currency"),
        )
    ]
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(r.to_json() + "\n" for _ in range(3) for r in calls))  # retried 3x
    out = tmp_path / "out"
    (out / "manifests").mkdir(parents=True)
    (out / "manifests" / "old-task.yaml").write_text("kind: AgentTask\n")
    args = discover.Args(
        input=log, output_dir=out, min_cluster_size=5, max_clusters=4, num_threads=2
    )
    result = discover.run(args)
    assert result.ok, result.message
    manifests = sorted((out / "manifests").glob("*.yaml"))
    assert manifests and not (out / "manifests" / "old-task.yaml").exists()
    for path in manifests:
        doc = yaml.safe_load(path.read_text())
        name, dataset = doc["metadata"]["name"], doc["spec"]["dataset"]
        cluster = out / "clusters" / f"{name}.jsonl"
        assert len(cluster.read_text().splitlines()) == 3 * dataset["minExamples"]
        prepared = curate.run(
            curate.Args(
                input=cluster,
                output_dir=tmp_path / "prep" / name,
                min_examples=dataset["minExamples"],
                eval_fraction=dataset["evalFraction"],
            )
        )
        assert prepared.ok and prepared.examples == dataset["minExamples"], prepared.message
    written = "".join(p.read_text() for p in (out / "clusters").glob("*.jsonl"))
    written += (out / "discover_report.json").read_text()
    written += "".join(p.read_text() for p in manifests)
    assert "@example.com" not in written and "<EMAIL_ADDRESS_1>" in written


def test_discover_refuses_too_little_data(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    log.write_text(rec("hi", None).to_json() + "\n")
    result = discover.run(discover.Args(input=log, output_dir=tmp_path / "o"))
    assert not result.ok and "too few" in result.message


def test_malformed_lines_are_counted_in_the_report_never_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log with broken lines still gets its tasks discovered, and the report says what was
    skipped and why (the same reasons as curate's); a lone surrogate or a record too deep to
    write back used to crash the stage, other bad lines vanished without a count."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("sklearn")

    def by_tool(texts: list[str], model: str, batch_size: int) -> Any:
        # Stands in for MiniLM (what is read is under test, not the encoder): one axis per tool.
        return np.array([[1.0, 0.0] if "weather" in t else [0.0, 1.0] for t in texts])

    monkeypatch.setattr(discover, "embed_texts", by_tool)
    good = [rec(f"Weather in city {i}?", "get_weather") for i in range(4)]
    good += [rec(f"Set an alarm for {i} am", "set_alarm") for i in range(4)]
    nested: Any = []
    for _ in range(600):  # decodes, but is too deep to write back to a cluster file
        nested = [nested]
    deep = json.loads(rec("deep", "get_weather").to_json())
    deep["messages"][0]["x"] = nested
    lines = [
        *(r.to_json() for r in good[:4]),
        "{broken",
        "[" * 100_000,  # too deep for the JSON decoder
        rec("hi there", "get_weather").to_json().replace("hi there", "hi \\ud800 there"),
        rec("typed", "get_weather").to_json().replace('"model":""', '"model":["gpt-4o"]'),
        json.dumps(deep),
        *(r.to_json() for r in good[4:]),
    ]
    log = tmp_path / "calls.jsonl"
    log.write_bytes("".join(line + "\n" for line in lines).encode() + b'{"task": "\xff"}\n')
    args = discover.Args(input=log, output_dir=tmp_path / "out", max_clusters=2, min_cluster_size=2)
    result = discover.run(args)
    assert result.ok, result.message
    assert "6 malformed lines skipped" in result.message
    report = json.loads((tmp_path / "out" / "discover_report.json").read_text())
    assert report["records"] == 8
    # The record too deep to write back is found after the sample is drawn: it was counted
    # both malformed and valid, so the report's counts did not add up to the lines read.
    assert report["valid_records"] == 8 and report["left_out_by_sample"] == 0
    assert report["lines"] == report["blank"] + report["malformed_total"] + report["valid_records"]
    assert report["malformed"] == {
        "invalid_json": 2,
        "invalid_model": 1,
        "invalid_unicode": 1,
        "invalid_utf8": 1,
        "too_deep": 1,
    }
    assert report["malformed_total"] == 6
    assert [s["line"] for s in report["error_samples"]] == [5, 6, 7, 8, 14]
    assert sorted(report["manifests"]) == ["get-weather", "set-alarm"]
    for name in report["manifests"]:
        lines_out = (tmp_path / "out" / "clusters" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines_out) == 4 and all(CallRecord.from_json(x) for x in lines_out)


def test_discover_reads_a_uri_prefix_like_the_local_directory(tmp_path: Path) -> None:
    """dataset URIs and call-log prefixes may be s3://: read through fsspec (its real memory://
    filesystem here), the same records come back in the same order as from the directory."""
    fsspec = pytest.importorskip("fsspec")
    local = tmp_path / "calls"
    local.mkdir()
    calls = [rec(f"Weather in city {i}?", "get_weather") for i in range(5)]
    (local / "b.jsonl").write_text("".join(r.to_json() + "\n" for r in calls[3:]) + "{broken\n")
    (local / "a.jsonl").write_text("".join(r.to_json() + "\n" for r in calls[:3]))
    (local / "c.jsonl.part").write_text(rec("unfinished", None).to_json() + "\n")
    prefix = f"/discover-{os.getpid()}-{id(local):x}"
    memory = fsspec.filesystem("memory")
    for path in local.iterdir():
        memory.pipe_file(f"{prefix}/{path.name}", path.read_bytes())
    try:
        stats = discover.ParseStats()
        got = list(discover.read_records(f"memory://{prefix}/", stats))
    finally:
        memory.rm(prefix, recursive=True)
    assert got == list(discover.read_records(local)) == calls
    assert dict(stats.malformed) == {"invalid_json": 1}


def test_discover_says_why_a_uri_cannot_be_read(tmp_path: Path) -> None:
    result = discover.run(
        discover.Args(input="nosuchfs://bucket/calls/", output_dir=tmp_path / "o")
    )
    assert not result.ok
    assert "no filesystem for the protocol nosuchfs://" in result.message


# ------------------------------------------------------------------ stubbed encoder

CITIES = ["Oslo", "Paris", "Lima", "Quito", "Cairo", "Dakar", "Hanoi", "Seoul", "Delhi", "Tokyo"]
HOURS = ["seven", "eight", "nine", "ten", "eleven", "noon", "six", "five", "four", "three"]


def weather(i: int, empty: bool = False) -> CallRecord:
    """A call of a weather agent step; ``empty``: the LLM answered nothing."""
    call = rec(
        f"What will the weather be like tomorrow in {CITIES[i]}, and should I pack an "
        "umbrella or sunscreen for the trip?",
        "get_weather",
    )
    return replace(call, response={"content": ""}) if empty else call


def alarm(i: int) -> CallRecord:
    return rec(
        f"Please set an alarm for {HOURS[i]} o'clock so I can wake up in time for the early "
        "train to work",
        "set_alarm",
    )


def discovered(tmp_path: Path, calls: list[CallRecord], **kw: Any) -> tuple[Any, dict, dict]:
    """Run discover on ``calls``: (result, report, manifests by name)."""
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(r.to_json() + "\n" for r in calls))
    result = discover.run(discover.Args(input=log, output_dir=tmp_path / "out", **kw))
    report = json.loads((tmp_path / "out" / "discover_report.json").read_text())
    manifests = {
        p.stem: yaml.safe_load(p.read_text())
        for p in (tmp_path / "out" / "manifests").glob("*.yaml")
    }
    return result, report, manifests


@pytest.fixture
def by_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    """MiniLM stand-in: one axis for the first of these words a text has."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("sklearn")
    words = ("city", "town", "weather", "alarm")

    def embed(texts: list[str], model: str, batch_size: int) -> Any:
        first = [next((w for w in words if w in t), "") for t in texts]
        return np.array([[float(f == w) for w in words] for f in first])

    monkeypatch.setattr(discover, "embed_texts", embed)


def test_calls_with_an_empty_answer_neither_count_nor_vote_the_task_type(
    tmp_path: Path, by_axis: None
) -> None:
    """A cluster of 5 answered and 7 empty-answer calls was proposed with minExamples 12,
    which its curate (dropping the empty ones) never reached, and as taskType generation
    (an empty answer voted generation), though every answer is a get_weather call."""
    from slm_trainer import curate

    calls = [weather(i, empty=i >= 5) for i in range(10)]
    calls += [weather(0, empty=True), weather(1, empty=True)]  # 5 answered, 7 empty
    calls += [alarm(i) for i in range(10)]
    result, report, manifests = discovered(
        tmp_path, calls, max_clusters=2, min_cluster_size=2, scrub_pii=False
    )
    assert result.ok, result.message
    spec = manifests["get-weather"]["spec"]
    assert spec["taskType"] == "tool-call"
    assert spec["dataset"]["minExamples"] == 5
    assert manifests["set-alarm"]["spec"]["dataset"]["minExamples"] == 10
    info = next(c for c in report["clusters"] if c["name"] == "get-weather")
    assert (info["size"], info["empty_answers"], info["distinct"]) == (12, 7, 5)
    assert info["task_types"] == {"tool-call": 5} and report["empty_answers"] == 7
    cluster = tmp_path / "out" / "clusters" / "get-weather.jsonl"
    assert len(cluster.read_text().splitlines()) == 5  # only what curate would keep
    prepared = curate.run(curate.Args(input=cluster, output_dir=tmp_path / "prep", min_examples=5))
    assert prepared.ok and prepared.examples == 5, prepared.message


def test_a_proposed_task_finds_its_calls_under_its_own_name(tmp_path: Path, by_axis: None) -> None:
    """The data-prep Job keeps the calls whose task is the AgentTask's name (a log may hold
    several agents' calls). The cluster files kept the log's task names (one name for an
    export of one agent, any names for a shared log), so an applied proposal found none of
    its calls and waited for data for ever: each file's calls carry its AgentTask's name."""
    from slm_trainer import curate

    calls = [replace(weather(i), task="export") for i in range(10)]
    calls += [replace(alarm(i), task=("export", "shared")[i % 2]) for i in range(10)]
    result, _, manifests = discovered(
        tmp_path, calls, max_clusters=2, min_cluster_size=2, scrub_pii=False, name_prefix="ops-"
    )
    assert result.ok, result.message
    assert sorted(manifests) == ["ops-get-weather", "ops-set-alarm"]
    for name, manifest in manifests.items():
        cluster = tmp_path / "out" / "clusters" / f"{name}.jsonl"
        assert {r.task for r in map(CallRecord.from_json, cluster.read_text().splitlines())} == {
            manifest["metadata"]["name"]
        }
        need = manifest["spec"]["dataset"]["minExamples"]
        prepared = curate.run(
            curate.Args(
                input=cluster, output_dir=tmp_path / "prep" / name, task=name, min_examples=need
            )
        )
        assert prepared.ok and prepared.examples == need == 10, prepared.message


def test_the_served_slms_calls_neither_name_the_fallback_model_nor_vote_the_task_type(
    tmp_path: Path, by_axis: None
) -> None:
    """The gateway logs a call the served SLM answered with the task's name as its model:
    discover proposed that name as the fallback LLM's model (every fallback call would ask
    the LLM for a model it does not have), and the SLM's answers, which curate never trains
    on, voted the task type."""
    llm = [replace(weather(i), model="gpt-4o") for i in range(6)]
    slm = [
        replace(weather(i), backend="slm", model="get-weather", response={"content": "Sunny"})
        for i in range(10)
    ]
    result, report, manifests = discovered(
        tmp_path,
        llm + slm + [alarm(i) for i in range(10)],
        max_clusters=2,
        min_cluster_size=2,
        scrub_pii=False,
    )
    assert result.ok, result.message
    spec = manifests["get-weather"]["spec"]
    assert spec["fallback"]["llm"]["model"] == "gpt-4o"
    assert spec["taskType"] == "tool-call"
    info = next(c for c in report["clusters"] if c["name"] == "get-weather")
    assert info["task_types"] == {"tool-call": 6}
    # A log of the SLM's calls only names no LLM model: the default, not the task's name.
    assert discover.log_model(slm, []) == discover.DEFAULT_LLM_MODEL


def test_calls_only_the_llm_is_sent_do_not_vote_the_task_type(
    tmp_path: Path, by_axis: None
) -> None:
    """Curate leaves out the calls the gateway never sends to an SLM (a strict function
    offered): 8 such get_weather calls outvoted 5 text answers, and the cluster was proposed
    as a tool-call task, a taskType no AgentTask can change, whose curated data held no tool
    call."""
    text = "Mild, around 15 degrees with a light breeze; pack a jacket rather than sunscreen."
    strict = [{"type": "function", "function": {"name": "get_weather", "strict": True}}]
    calls = [replace(weather(i), tools=strict) for i in range(8)]
    calls += [replace(weather(i), response={"content": text}) for i in range(5, 10)]
    result, report, manifests = discovered(
        tmp_path,
        calls + [alarm(i) for i in range(10)],
        max_clusters=2,
        min_cluster_size=2,
        scrub_pii=False,
    )
    assert result.ok, result.message
    info = next(c for c in report["clusters"] if c["size"] == 13)
    assert info["task_types"] == {"generation": 5} and info["distinct"] == 5
    spec = manifests[info["name"]]["spec"]
    assert (spec["taskType"], spec["dataset"]["minExamples"]) == ("generation", 5)


def test_a_log_of_one_tool_is_one_agent_task_not_two(tmp_path: Path, by_axis: None) -> None:
    """k-means always makes >= 2 clusters: one get_weather task, asked about cities and
    towns, became get-weather and get-weather-2, each training on half the calls."""
    calls = [rec(f"Weather in the city of {c} tomorrow?", "get_weather") for c in CITIES[:6]]
    calls += [rec(f"Weather in the town of {c} on Sunday?", "get_weather") for c in CITIES[6:]]
    result, report, manifests = discovered(
        tmp_path, calls, max_clusters=2, min_cluster_size=2, scrub_pii=False
    )
    assert result.ok, result.message
    assert list(manifests) == ["get-weather"]
    assert manifests["get-weather"]["spec"]["dataset"]["minExamples"] == 10
    assert report["clusters_found"] == 2 and len(report["clusters"]) == 1
    assert report["merge_rule"] == discover.MERGE_RULE
    assert report["merged"] == [
        {"tool": "get_weather", "task_type": "tool-call", "sizes": [6, 4], "into": "get-weather"}
    ]
    assert report["clusters"][0]["merged_clusters"] == 2
    assert "2 clusters calling get_weather merged into get-weather" in result.message


def test_jsonl_entries_that_are_not_files_are_reported_never_read(
    tmp_path: Path, by_axis: None
) -> None:
    """A dangling link or a FIFO named like a shard was left out without a word: discover
    proposed tasks from fewer calls than the log holds and nothing said so. (A FIFO opened
    would block the stage for good.)"""
    logs = tmp_path / "logs"
    logs.mkdir()
    calls = [rec(f"Weather in the city of {c} tomorrow?", "get_weather") for c in CITIES[:6]]
    (logs / "a.jsonl").write_text("".join(r.to_json() + "\n" for r in calls))
    (logs / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    os.mkfifo(logs / "c.jsonl")
    out = tmp_path / "out"
    result = discover.run(
        discover.Args(
            input=logs, output_dir=out, max_clusters=2, min_cluster_size=2, scrub_pii=False
        )
    )
    assert result.ok, result.message
    assert result.examples == 6
    assert "2 *.jsonl entries skipped, not files (b.jsonl: dangling link, c.jsonl: fifo)" in (
        result.message
    )
    report = json.loads((out / "discover_report.json").read_text())
    assert report["skipped_entries"] == [
        {"name": "b.jsonl", "kind": "dangling link"},
        {"name": "c.jsonl", "kind": "fifo"},
    ]


def test_clusters_without_a_dominant_tool_and_with_other_templates_are_not_merged() -> None:
    """Two generation tasks (summaries, translations) share (no tool, generation), but not
    their prompt template."""
    long = "A long free text answer " * 5
    records = [rec(f"summarise {i}", None, answer=long) for i in range(3)]
    records += [rec(f"translate {i}", None, answer=long) for i in range(3)]
    assignments = [0, 0, 0, 1, 1, 1]
    assert discover.merge_same_task(assignments, records) == (assignments, [])


def test_hdbscan_keeps_a_one_task_log_as_one_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With allow_single_cluster=False HDBSCAN labelled a log of one task all noise and
    discover proposed nothing, without a word."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("sklearn")
    # twelve points evenly spaced on a 3x4 grid: one task of even density
    names = [*CITIES, "Rome", "Bern"]
    grid = {c: [1.0 + 0.01 * (n // 4), 0.01 * (n % 4)] for n, c in enumerate(names)}

    def on_a_grid(texts: list[str], model: str, batch_size: int) -> Any:
        return np.array([next(p for c, p in grid.items() if c in t) for t in texts])

    monkeypatch.setattr(discover, "embed_texts", on_a_grid)
    calls = [rec(f"Weather in {c} tomorrow?", "get_weather") for c in grid]
    result, report, manifests = discovered(
        tmp_path, calls, method="hdbscan", min_cluster_size=3, scrub_pii=False
    )
    assert result.ok, result.message
    assert list(manifests) == ["get-weather"] and report["noise"] == 0
    assert manifests["get-weather"]["spec"]["dataset"]["minExamples"] == 12


def test_a_log_that_is_all_noise_says_so(
    tmp_path: Path, by_axis: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HDBSCAN may still leave a log all noise: the message and report say why no task."""
    monkeypatch.setattr(discover, "choose_hdbscan", lambda emb, size: [-1] * len(emb))
    calls = [weather(i) for i in range(6)]
    result, report, manifests = discovered(
        tmp_path, calls, method="hdbscan", min_cluster_size=2, scrub_pii=False
    )
    assert result.ok and not manifests
    assert report["noise"] == 6
    assert report["warnings"] and "all 6 calls are noise to hdbscan" in report["warnings"][0]
    assert "warning: all 6 calls are noise to hdbscan" in result.message


# ------------------------------------------------------------------ no-tool tasks, real MiniLM

TICKETS = {
    "billing": [
        "I was charged twice for my subscription this month",
        "Why did my invoice go up by 20 dollars?",
        "Please refund the annual plan I cancelled yesterday",
        "My credit card was billed after I closed the account",
        "The receipt shows the wrong VAT number for our company",
        "Can I switch from monthly to yearly billing and get the discount?",
        "There is a charge I do not recognise on my bank statement",
        "The promo code was not applied to my last payment",
        "I need a copy of every invoice from last year for our accountant",
        "Your payment page declined my card three times",
    ],
    "technical": [
        "The app crashes every time I open the settings screen",
        "I cannot upload files larger than 10 MB, it just spins",
        "After the last update the sync between phone and laptop stopped working",
        "The API returns a 500 error on the orders endpoint",
        "Dark mode makes the text invisible in the editor",
        "Notifications arrive hours late on Android",
        "The export to CSV produces an empty file",
        "Login with Google shows a blank page in Safari",
        "The dashboard charts do not load, the browser console shows a timeout",
        "Search results are missing documents I created today",
    ],
    "account": [
        "How do I change the email address on my account?",
        "I forgot my password and the reset mail never arrives",
        "Please delete my account and all my data",
        "Can I add a second admin to our team workspace?",
        "My account got locked after too many login attempts",
        "How do I transfer ownership of the workspace to a colleague?",
        "I want to merge my two accounts into one",
        "Two-factor authentication codes are not accepted anymore",
        "How can I change the username shown to my team?",
        "Someone else seems to have logged into my account",
    ],
    "shipping": [
        "My package has not arrived after two weeks",
        "The tracking number you sent does not work",
        "The parcel was delivered to the wrong address",
        "Can I change the delivery address of an order already shipped?",
        "The box arrived damaged and the glass inside is broken",
        "Do you ship to Norway and how long does it take?",
        "The courier left the parcel outside in the rain",
        "Only half of my order arrived, the rest is missing",
        "Can I pick up the order at a store instead of delivery?",
        "Express shipping took five days, I want the fee back",
    ],
}
REVIEWS = [
    (
        "The battery of these headphones lasts two days and the noise cancelling is superb on "
        "flights, though the case feels cheap.",
        "positive",
    ),
    ("The blender broke after a week and customer service never answered my emails.", "negative"),
    (
        "Hotel room was clean and the staff were friendly, but the breakfast was cold and "
        "overpriced.",
        "neutral",
    ),
    ("This novel kept me up all night, the characters are unforgettable.", "positive"),
    ("The pizza arrived late and soggy, never ordering from them again.", "negative"),
    ("The running shoes fit well and are light, the sole wore out after three months.", "neutral"),
    ("Fantastic laptop: fast, silent, and the screen is gorgeous.", "positive"),
    ("The vacuum cleaner is loud and loses suction within minutes.", "negative"),
    (
        "The museum tour was interesting, although the guide rushed through the last rooms.",
        "neutral",
    ),
    ("Best coffee beans I have ever bought, rich and chocolatey.", "positive"),
    ("The phone case cracked when I dropped it from a table.", "negative"),
    ("The flight was on time, seats were narrow, food was okay.", "neutral"),
    ("My kids love this board game, we play it every weekend.", "positive"),
    ("The garden hose leaks at every connection.", "negative"),
    ("The concert sound was great but the queue for drinks took forever.", "neutral"),
    ("The electric kettle boils water in a minute and looks elegant.", "positive"),
    ("The sofa cushions went flat after a month.", "negative"),
    ("The yoga mat is grippy, a bit thin for my knees.", "neutral"),
    ("The sushi restaurant has the freshest fish in town.", "positive"),
    ("The printer jams on every second page.", "negative"),
    ("The rental car was fine, pickup took an hour.", "neutral"),
    ("The camera takes stunning photos even at night.", "positive"),
    ("The jacket's zipper broke on the first day.", "negative"),
    ("The spa was relaxing but the pool was smaller than in the pictures.", "neutral"),
]
ARTICLES = [
    "The central bank raised interest rates by a quarter point on Wednesday, citing persistent "
    "inflation in services and a tight labour market.",
    "A new species of tree frog was discovered in the cloud forests of Ecuador by a team of "
    "biologists from three universities.",
    "The city council approved a plan to close the old harbour road to cars and turn it into a "
    "cycling and walking path by 2026.",
    "The national football team qualified for the World Cup after a late penalty in a tense "
    "match against their neighbours.",
    "Researchers reported a battery chemistry based on sodium that could cut the cost of "
    "storing solar power in half.",
    "A heatwave across southern Europe pushed temperatures above 44 degrees and forced several "
    "regions to ban outdoor work at midday.",
    "The tech company announced layoffs of 8 percent of its staff, mostly in its hardware "
    "division, after weak sales of its headset.",
    "An exhibition of rarely seen Vermeer paintings opened in Amsterdam and sold out its first "
    "month within hours.",
    "Farmers protested in the capital against new rules on fertiliser use, blocking major "
    "roads with tractors for two days.",
    "The space agency confirmed that its probe entered orbit around Jupiter's moon Europa and "
    "sent back its first images.",
    "A major hospital group will introduce a four-day week for nurses in a trial meant to "
    "reduce burnout and staff shortages.",
    "Housing prices fell for the sixth month in a row as higher mortgage costs cooled demand "
    "from first-time buyers.",
    "The film festival awarded its top prize to a quiet drama about three generations of women "
    "running a family vineyard.",
    "A cyberattack disrupted ticket sales at several airports, causing long queues but no "
    "flight cancellations.",
    "The government unveiled a plan to plant two billion trees over the next decade to restore "
    "degraded farmland.",
    "The marathon record fell by eleven seconds as the winner ran a perfectly even pace in "
    "cool conditions.",
    "A study of 40,000 adults linked regular walking after meals to lower blood sugar levels.",
    "The electric carmaker opened its largest factory in Europe, with capacity for half a "
    "million vehicles a year.",
    "Archaeologists uncovered a Roman villa with intact mosaics beneath a car park in a small "
    "English town.",
    "The shipping company rerouted its vessels around Africa, adding two weeks to deliveries "
    "between Asia and Europe.",
]
PRODUCTS = [
    ("wireless earbuds", "noise cancelling, 30 hour battery"),
    ("hiking backpack", "40 litres, waterproof, padded straps"),
    ("espresso machine", "15 bar pump, milk frother"),
    ("standing desk", "electric, memory presets, oak top"),
    ("winter jacket", "down filling, hood, windproof"),
    ("smart watch", "heart rate, GPS, 7 day battery"),
    ("cast iron pan", "pre-seasoned, 28 cm, oven safe"),
    ("kids bicycle", "16 inch wheels, training wheels, bell"),
    ("office chair", "lumbar support, mesh back, adjustable arms"),
    ("yoga mat", "non-slip, 6 mm, carrying strap"),
    ("robot vacuum", "lidar mapping, app control, auto empty"),
    ("electric toothbrush", "pressure sensor, 3 modes, travel case"),
    ("camping tent", "two person, 1.8 kg, quick setup"),
    ("bluetooth speaker", "waterproof, 12 hour battery, deep bass"),
    ("air fryer", "5 litres, digital display, dishwasher safe basket"),
    ("mechanical keyboard", "hot-swap switches, RGB, aluminium case"),
    ("wool blanket", "merino, 150 x 200 cm, machine washable"),
    ("drone", "4K camera, 30 minute flight, obstacle sensors"),
    ("digital camera", "24 MP, flip screen, 4K video"),
    ("road bike helmet", "MIPS, 250 g, 18 vents"),
]
QUESTIONS = [
    "How long should I boil an egg for a runny yolk?",
    "What caused the fall of the Western Roman Empire?",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "What is the difference between a virus and a bacterium?",
    "How can I make sourdough bread rise more?",
    "Who painted the ceiling of the Sistine Chapel?",
    "What does a mortgage interest rate depend on?",
    "How do vaccines train the immune system?",
    "What is a good beginner routine for running a 5k?",
    "Explain how a hash map works.",
    "Why do cats purr?",
    "What was the Marshall Plan?",
    "How do I remove a red wine stain from a carpet?",
    "What is the capital gains tax and when do I pay it?",
    "How does a refrigerator keep food cold?",
    "What are the main causes of inflation?",
    "How do I center a div in CSS?",
    "Why did the Titanic sink?",
    "How many hours of sleep does a teenager need?",
    "What is photosynthesis?",
    "How do I write a cover letter?",
    "What is the difference between TCP and UDP?",
    "How should I store fresh basil?",
]


def asked(task: str, prompt: str, answer: str) -> CallRecord:
    """A call of an agent step that calls no tool: an answer in text only."""
    return rec(prompt, None, task=task, answer=answer)


def ticket_labels() -> list[CallRecord]:
    """One classification task with a closed label set (the label only as the answer)."""
    return [
        asked(
            "ticket-labels",
            "Classify this support ticket as billing, technical, account or shipping. Answer "
            f"with the label only.\n\nTicket: {ticket}",
            label,
        )
        for label, tickets in TICKETS.items()
        for ticket in tickets
    ]


def review_sentiment() -> list[CallRecord]:
    """Another classification task, another label set."""
    return [
        asked(
            "review-sentiment",
            f"What is the sentiment of this review? Reply positive, negative or neutral.\n\n{r}",
            label,
        )
        for r, label in REVIEWS
    ]


def news_summaries() -> list[CallRecord]:
    return [
        asked(
            "news-summaries",
            f"Summarise the following news article in two sentences:\n\n{a}",
            f"The article reports that {a[0].lower()}{a[1:]} It adds context on what happens next.",
        )
        for a in ARTICLES
    ]


def product_copy() -> list[CallRecord]:
    return [
        asked(
            "product-copy",
            f"Write a catchy product description for our online shop. Product: {p}. Features: {f}.",
            f"Meet the {p} you have been waiting for: {f}. Designed for everyday life, built to "
            "last, and ready to ship today.",
        )
        for p, f in PRODUCTS
    ]


def free_questions() -> list[CallRecord]:
    """A Q&A assistant without a system prompt: free-form questions, no template at all."""
    return [
        asked(
            "questions",
            q,
            f"Here is a clear answer in a few sentences: {q.lower().rstrip('?')} depends on "
            "several factors that I explain step by step, with an example at the end.",
        )
        for q in QUESTIONS
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("log", "task_type"),
    [
        (ticket_labels, "classification"),
        (news_summaries, "generation"),
        (free_questions, "generation"),
    ],
    ids=["ticket-labels", "news-summaries", "free-questions"],
)
def test_a_log_of_one_task_without_tools_is_one_agent_task(
    tmp_path: Path, log: Any, task_type: str
) -> None:
    """k-means never picks k=1 and no-tool clusters have no dominant tool to merge on: one
    ticket-labelling task came out as two AgentTasks (38 and 2 calls), twenty news summaries
    as two (18 and 2), twenty-four free-form questions to an assistant as five, each training
    on a part of one task and answering the same calls."""
    calls = log()
    result, report, manifests = discovered(
        tmp_path, calls, min_cluster_size=2, scrub_pii=False, num_threads=2
    )
    assert result.ok, result.message
    print(
        f"\n{calls[0].task}: k={report['clusters_found']} by silhouette "
        f"{report['silhouette_by_k']}, merged {report['merged']}"
    )
    assert len(report["clusters"]) == 1 and len(manifests) == 1
    # one task and no tool called: no labels to measure a purity by (it read 1.000 "by tool")
    assert report["label_by"] is None and report["purity"] is None
    assert "purity" not in result.message
    (manifest,) = manifests.values()
    assert manifest["spec"]["taskType"] == task_type
    assert manifest["spec"]["dataset"]["minExamples"] == len(calls)
    if report["clusters_found"] > 1:
        (merge,) = report["merged"]
        assert merge["tool"] is None and sum(merge["sizes"]) == len(calls)
        assert f"clusters of one prompt template merged into {merge['into']}" in result.message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "second"),
    [
        (ticket_labels, review_sentiment),  # two classification tasks, two label sets
        (news_summaries, product_copy),  # two generation tasks
        (ticket_labels, news_summaries),  # classification and generation
        (free_questions, product_copy),  # a template-less task and a templated one
    ],
    ids=["labels+sentiment", "summaries+copy", "labels+summaries", "questions+copy"],
)
def test_two_tasks_without_tools_are_still_two_agent_tasks(
    tmp_path: Path, first: Any, second: Any
) -> None:
    """The merge of no-tool clusters must not fold different tasks of one task type into one:
    each AgentTask proposed holds the calls of one task, all of them."""
    calls = first() + second()
    result, report, manifests = discovered(
        tmp_path, calls, min_cluster_size=2, scrub_pii=False, num_threads=2
    )
    assert result.ok, result.message
    print(f"\n{report['label_by']} purity {report['purity']}, merged {report['merged']}")
    assert len(manifests) == 2 and report["label_by"] == "task"
    assert sorted(c["majority_label"] for c in report["clusters"]) == sorted(
        {first()[0].task, second()[0].task}
    )
    assert report["purity"] >= 0.95
    assert {m["spec"]["dataset"]["minExamples"] for m in manifests.values()} == {
        len(first()),
        len(second()),
    }


def test_no_tool_clusters_of_one_prompt_template_are_merged_with_the_coverage_measured() -> None:
    """A cluster of one or two calls has no template of its own (its words are its topic):
    it joins the task whose template it carries; one with another template does not."""
    calls = ticket_labels()
    assignments = [0] * 20 + [1] * 19 + [2]
    merged, merges = discover.merge_same_task(assignments, calls)
    assert merged == [0] * 40
    assert merges == [
        {
            "label": 0,
            "tool": None,
            "task_type": "classification",
            "sizes": [20, 19, 1],
            "template": [
                "account",
                "answer",
                "billing",
                "classify",
                "label",
                "only",
                "shipping",
                "support",
                "technical",
                "ticket",
            ],
            "template_coverage": [1.0, 1.0],
        }
    ]
    other = review_sentiment()[:3]
    merged, merges = discover.merge_same_task([0] * 40 + [1] * 3, calls + other)
    assert merged == [0] * 40 + [1] * 3 and merges == []


def test_a_model_name_from_the_log_too_long_for_the_crd_falls_back_to_the_default(
    tmp_path: Path, by_axis: None
) -> None:
    """The log's most common model became every manifest's fallback.llm.model, and one over
    the CRD's 512 characters made `kubectl apply` refuse them all."""
    calls = [replace(weather(i), model="m" * 600) for i in range(6)]
    result, report, manifests = discovered(
        tmp_path, calls, max_clusters=2, min_cluster_size=2, scrub_pii=False
    )
    assert result.ok, result.message
    assert [m["spec"]["fallback"]["llm"]["model"] for m in manifests.values()] == ["gpt-4o"]
    assert any("600 characters" in w and "gpt-4o" in w for w in report["warnings"])
    assert "warning: the log's most common model name is 600 characters" in result.message


def test_a_call_over_the_redactors_limit_is_counted_not_fatal(
    tmp_path: Path, by_axis: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tool result over the redactor's limit made discover crash (exit 1) and propose
    nothing, where curate skips and counts it (``too_long``); it may not be clustered, quoted
    or written unredacted either."""
    import slm_trainer.redact as redact_module

    monkeypatch.setattr(redact_module, "MAX_TEXT_CHARS", 5000)
    huge = rec("summarise this log: " + "line of a log " * 500 + "jane.big@example.com", None)
    result, report, _ = discovered(
        tmp_path, [weather(i) for i in range(6)] + [huge], max_clusters=2
    )
    assert result.ok, result.message
    assert report["malformed"] == {"too_long": 1}
    assert "1 malformed line skipped (1 too_long)" in result.message
    written = "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert "jane.big" not in written and "line of a log line" not in written


def test_an_input_folder_whose_name_is_not_utf8_is_named_with_an_escape(
    tmp_path: Path, by_axis: None
) -> None:
    """discover crashed writing its report, after the manifests were written, when the call
    log's folder name was not UTF-8 (a lone surrogate cannot be encoded); the name is shown
    as curate shows it and the report is written whole or not at all."""
    folder = tmp_path / os.fsdecode(b"calls-\xff")
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(weather(i).to_json() + "\n" for i in range(6)))
    out = tmp_path / "out"
    args = discover.Args(input=folder, output_dir=out, max_clusters=2, min_cluster_size=2)
    result = discover.run(args)
    assert result.ok, result.message
    report = json.loads((out / "discover_report.json").read_text(encoding="utf-8"))
    assert report["input"].endswith("calls-\\xff")
    assert report["manifests"] == ["get-weather"]
    assert not list(out.glob(".*.tmp"))


def test_the_report_counts_the_calls_the_sample_left_out(tmp_path: Path, by_axis: None) -> None:
    """A log larger than --max-records was clustered on a sample, and nothing said so: the
    report and the message read as if every call had been looked at."""
    calls = [weather(i) for i in range(10)] + [alarm(i) for i in range(10)]
    result, report, _ = discovered(
        tmp_path, calls, max_records=12, max_clusters=2, min_cluster_size=2
    )
    assert result.ok, result.message
    assert (report["valid_records"], report["max_records"], report["left_out_by_sample"]) == (
        20,
        12,
        8,
    )
    assert report["records"] == 12
    assert "8 of 20 valid calls left out of the --max-records sample of 12" in result.message
    _, whole, _ = discovered(tmp_path, calls, max_clusters=2, min_cluster_size=2)
    assert (whole["valid_records"], whole["left_out_by_sample"]) == (20, 0)
