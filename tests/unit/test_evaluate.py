"""The evaluate stage: the same rules for every candidate, the gate, and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from slm_contract import CallRecord, TrainerResult
from slm_trainer import evaluate

REPO = Path(__file__).resolve().parents[2]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string"}},
            },
        },
    },
    {"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object"}}},
]


def tool_call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        ],
    }


def records() -> list[CallRecord]:
    """Four calls: three with a tool (weather x2, alarm), one the LLM answered in text."""
    refs = [
        tool_call("get_weather", {"city": "Oslo"}),
        tool_call("get_weather", {"city": "Lima"}),
        tool_call("set_alarm", {}),
        {"role": "assistant", "content": "I can't do that with these tools."},
    ]
    return [
        CallRecord(
            task="t",
            backend="llm",
            messages=[{"role": "user", "content": f"q{i}"}],
            tools=TOOLS,
            response=r,
        )
        for i, r in enumerate(refs)
    ]


SELECTOR = [
    evaluate.Prediction(label="get_weather", confidence=0.95, latency_ms=3.0),
    evaluate.Prediction(label="get_weather", confidence=0.70, latency_ms=5.0),
    evaluate.Prediction(label="get_weather", confidence=0.60, latency_ms=4.0),  # wrong
    evaluate.Prediction(label=None, confidence=0.90, latency_ms=3.0),  # defers: never right
]
GENERATOR = [
    evaluate.Prediction(response=tool_call("get_weather", {"city": "oslo"}), confidence=0.9),
    evaluate.Prediction(response=tool_call("get_weather", {"city": "Paris"}), confidence=0.8),
    evaluate.Prediction(response={"defer": True}, confidence=0.1),
    evaluate.Prediction(
        response={"role": "assistant", "content": "I can't do that with these  tools."},
        confidence=0.3,
    ),
]


def test_a_selector_is_scored_by_its_labels_over_thresholds() -> None:
    s = evaluate.score_candidate("sel", records(), SELECTOR, "tool-call", "label-accuracy", 0.99)
    assert s.kind == "selector"
    assert s.metrics["label_accuracy"] == 0.5  # 2 of 4: a deferral is never right
    assert s.metrics["exact_match"] is None and s.metrics["tool_call_ast"] is None
    # the lowest confidence answered is 0.7; the threshold sits halfway down to the next (0.6)
    assert s.threshold == pytest.approx(0.65) and s.score == 1.0 and s.coverage == 0.5
    assert s.metrics["latency_ms"]["p50"] == 3.0
    assert [p["accepted"] for p in s.curve] == [3, 2, 1, 0]


def test_the_report_shows_the_figures_at_the_threshold_the_candidate_is_served_with() -> None:
    """The threshold evaluate picks is picked on the eval calls; the gateway applies the one
    the candidate's finetune stage calibrated (selector.json, manifest.json, result.json).
    A report with only its own pick (0.65: half the calls answered, all right) read as what
    production would get, while a candidate served at 0.96 answers none of them."""
    s = evaluate.score_candidate(
        "sel", records(), SELECTOR, "tool-call", "label-accuracy", 0.99, served_threshold=0.96
    )
    assert s.threshold == pytest.approx(0.65) and s.coverage == 0.5
    served = s.metrics["at_served_threshold"]
    assert served["threshold"] == 0.96 and served["accepted"] == 0 and served["coverage"] == 0.0
    plain = evaluate.score_candidate(
        "sel", records(), SELECTOR, "tool-call", "label-accuracy", 0.99
    )
    assert "at_served_threshold" not in plain.metrics


def test_a_generator_making_the_llms_parallel_calls_in_another_order_scores_them_right() -> None:
    """Parallel calls are independent (BFCL checks them without order): a candidate that made
    the LLM's two calls in the other order scored 0 on tool-call-ast and failed the gate."""

    def parallel(*cities: str) -> dict[str, Any]:
        calls = [tool_call("get_weather", {"city": c})["tool_calls"][0] for c in cities]
        return {"role": "assistant", "tool_calls": calls}

    recs = [
        CallRecord(
            task="t",
            backend="llm",
            messages=[{"role": "user", "content": f"weather in Oslo and Lima? ({i})"}],
            tools=TOOLS,
            response=parallel("Oslo", "Lima"),
        )
        for i in range(2)
    ]
    preds = [evaluate.Prediction(response=parallel("Lima", "Oslo"), confidence=0.9)] * 2
    s = evaluate.score_candidate("gen", recs, preds, "tool-call", "tool-call-ast", 0.97)
    assert s.metrics["tool_call_ast"] == 1.0 and s.metrics["exact_match"] == 0.0
    assert s.score == 1.0 and s.coverage == 1.0 and s.meets_precision


def test_candidate_info_reads_the_served_threshold(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"threshold": 0.42, "parameters": 7}))
    assert evaluate.candidate_info(tmp_path) == {"threshold": 0.42, "parameters": 7}
    (tmp_path / "manifest.json").write_text(json.dumps({"threshold": True}))
    assert evaluate.candidate_info(tmp_path) == {}


def test_a_parameter_count_no_result_can_carry_leaves_the_size_unknown(tmp_path: Path) -> None:
    """2**63 passed as a count, and the winner's TrainerResult then refused it: the stage
    crashed (exit 1) after judging every candidate. The export stage applies the same rules."""
    (tmp_path / "manifest.json").write_text(json.dumps({"parameters": 2**63, "threshold": 0.5}))
    assert evaluate.candidate_info(tmp_path) == {"threshold": 0.5}
    numbers, problems = evaluate.description_numbers(
        {"parameters": 2.2e7, "trainable_parameters": 4, "score": 97.0, "threshold": True}
    )
    assert numbers == {"trainable_parameters": 4}
    assert problems == [
        "parameters 22000000.0 is not a non-negative integer",
        "score 97.0 is not a number in [0, 1]",
        "threshold true is not a number in [0, 1]",
    ]


@pytest.mark.parametrize("metric", ["tool-call-ast", "exact-match"])
def test_a_selector_gated_on_whole_answers_is_scored_on_the_call_it_serves(metric: str) -> None:
    """A selector serves the tool it picks with "{}" arguments. Scored on the tool name it
    passed the tool-call-ast gate at 1.0, then served get_weather without its city."""
    preds = [
        evaluate.Prediction(label="get_weather", confidence=0.90),  # needs {"city": "Oslo"}
        evaluate.Prediction(label="get_weather", confidence=0.80),  # needs {"city": "Lima"}
        evaluate.Prediction(label="set_alarm", confidence=0.99),  # no arguments: right
        evaluate.Prediction(label=None, confidence=0.50),
    ]
    s = evaluate.score_candidate("sel", records(), preds, "tool-call", metric, 0.97)
    # It answers only where its served answer is right: the call without arguments.
    # halfway between the answered 0.99 and the next lower confidence, 0.9
    assert s.threshold == pytest.approx(0.945) and s.coverage == 0.25 and s.score == 1.0
    assert s.metrics["exact_match" if metric == "exact-match" else "tool_call_ast"] == 0.25
    assert "empty arguments" in s.metrics["note"] and "label-accuracy" in s.metrics["note"]
    assert any("2 of 4 calls get the right tool but a wrong answer" in r for r in s.reasons)
    # Tool choice is what label-accuracy scores: unchanged.
    s = evaluate.score_candidate("sel", records(), preds, "tool-call", "label-accuracy", 0.97)
    assert s.threshold == 0.8 and s.coverage == 0.75 and s.score == 1.0
    assert s.metrics["tool_call_ast"] is None and not s.reasons

    # Every call needs arguments: no threshold makes its answers right, so it fails the gate.
    recs = [r for r in records() if r.response.get("tool_calls")][:2]
    preds = [evaluate.Prediction(label="get_weather", confidence=0.99) for _ in recs]
    s = evaluate.score_candidate("sel", recs, preds, "tool-call", metric, 0.97)
    assert s.score == 0.0 and not s.meets_precision
    assert evaluate.apply_gate([s], 1.0, 0.5, None, "best-score") is None


def test_a_generator_is_scored_by_ast_exact_match_and_json() -> None:
    s = evaluate.score_candidate("gen", records(), GENERATOR, "tool-call", "tool-call-ast", 0.9)
    assert s.kind == "generative"
    assert s.metrics["tool_call_ast"] == 0.5  # "oslo" ~ "Oslo" and the text answer
    assert s.metrics["exact_match"] == 0.25  # only the text answer is exact
    assert s.metrics["json_validity"] == 1.0
    # At 0.9 only the Oslo call is answered, and it is right.
    assert s.threshold == pytest.approx(0.85) and s.score == 1.0 and s.coverage == 0.25


def test_a_generator_never_gets_a_threshold_that_serves_cut_answers() -> None:
    """Confidence 0 marks an answer cut at max_new_tokens; a threshold of 0 would serve it,
    even when the eval calls happened to score it right."""
    right = [tool_call("get_weather", {"city": "Oslo"}), tool_call("get_weather", {"city": "Lima"})]
    preds = [
        evaluate.Prediction(response=right[0], confidence=0.9),
        evaluate.Prediction(response=right[1], confidence=0.0),  # cut, yet scored right
        evaluate.Prediction(response=tool_call("set_alarm", {}), confidence=0.5),
        evaluate.Prediction(response=records()[3].response, confidence=0.4),
    ]
    s = evaluate.score_candidate("gen", records(), preds, "tool-call", "tool-call-ast", 0.9)
    assert s.threshold == pytest.approx(0.2) and s.coverage == 0.75 and s.score == 1.0
    cut = [evaluate.Prediction(response=p.response, confidence=0.0) for p in preds]
    s = evaluate.score_candidate("gen", records(), cut, "tool-call", "tool-call-ast", 0.9)
    assert s.threshold is not None and s.threshold > 0.0
    assert s.coverage == 0.0 and not s.meets_precision


def test_without_confidences_the_score_is_the_precision_on_the_calls_it_answers() -> None:
    """Served without a threshold, a candidate answers every call it does not defer: its
    coverage and precision are over those, and it is held to the task's precision."""
    preds = [evaluate.Prediction(response=p.response) for p in GENERATOR]
    s = evaluate.score_candidate("gen", records(), preds, "tool-call", "exact-match", 0.9)
    # three answers (one deferral), of which only the text one is exact
    assert s.threshold is None and s.coverage == 0.75 and s.score == round(1 / 3, 6)
    assert not s.meets_precision and "below 0.90" in s.reasons[0]
    assert evaluate.apply_gate([s], 1.0, None, None, "best-score") is None


@pytest.mark.parametrize("metric", ["label-accuracy", "tool-call-ast"])
def test_a_candidate_without_confidences_that_defers_every_call_does_not_pass(metric: str) -> None:
    preds = [evaluate.Prediction(label=None) for _ in records()]
    s = evaluate.score_candidate("idle", records(), preds, "tool-call", metric, 0.97)
    assert s.coverage == 0.0 and s.score == 0.0
    assert evaluate.apply_gate([s], 1.0, None, None, "smallest-passing") is None
    assert "answers no call" in s.reasons


@pytest.mark.parametrize(
    "defer",
    [
        evaluate.Prediction(response={"defer": True}, confidence=0.0),
        evaluate.Prediction(label=None),
    ],
    ids=["generator", "selector"],
)
def test_a_candidate_that_defers_every_call_has_label_accuracy_0(
    defer: evaluate.Prediction,
) -> None:
    """A deferral answers nothing, so it is never right (metrics.label_correct). Where the
    LLM answered in text (one call of four here), label_accuracy counted it right: a
    candidate that deferred every call showed label_accuracy 0.25 beside its score 0."""
    s = evaluate.score_candidate(
        "never", records(), [defer] * 4, "tool-call", "label-accuracy", 0.97
    )
    assert s.score == 0.0 and s.coverage == 0.0
    assert s.metrics["label_accuracy"] == 0.0


def test_a_generator_copying_the_llms_text_answers_is_right_under_label_accuracy() -> None:
    """The LLM answered one call of four in text (no tool fits). A generator that answered
    every call as the LLM did counted that text answer wrong under label-accuracy, so it
    reached no threshold, answered nothing and failed the gate. A selector's deferral on the
    same call stays no answer."""
    recs = records()
    copy = [
        evaluate.Prediction(response=r.response, confidence=c)
        for r, c in zip(recs, (0.6, 0.7, 0.8, 0.9), strict=True)
    ]
    s = evaluate.score_candidate("copy", recs, copy, "tool-call", "label-accuracy", 0.97)
    assert s.score == 1.0 and s.coverage == 1.0 and s.meets_precision and not s.reasons
    assert evaluate.apply_gate([s], 1.0, 0.9, None, "best-score") is s
    sel = evaluate.score_candidate("sel", recs, SELECTOR, "tool-call", "label-accuracy", 0.97)
    assert sel.coverage == 0.5 and sel.curve[0]["accepted"] == 3  # the deferral answers nothing


def test_a_prediction_row_with_neither_label_nor_response_defers(tmp_path: Path) -> None:
    """The documented meaning of a row without a label: defer. Such a row of a generator was
    scored as a text answer, right wherever the LLM answered in text."""
    recs = records()
    rows = [{"index": i, "response": r.response, "confidence": 0.9} for i, r in enumerate(recs[:3])]
    rows.append({"index": 3, "confidence": 0.95})  # not run: no label, no response
    _write_rows(tmp_path / "gen", rows)
    preds = evaluate.read_predictions(tmp_path / "gen" / "predictions.jsonl", recs)
    s = evaluate.score_candidate("gen", recs, preds, "tool-call", "tool-call-ast", 0.97)
    assert s.coverage == 0.75 and s.score == 1.0
    assert s.curve[0]["accepted"] == 3


def test_gate_and_selection_policies() -> None:
    def cand(name: str, score: float, params: int, coverage: float = 0.5) -> Any:
        return evaluate.CandidateScore(
            name=name, kind="selector", path="", parameters=params, score=score, coverage=coverage
        )

    pool = [cand("big", 0.99, 500), cand("small", 0.96, 20), cand("bad", 0.80, 5)]
    win = evaluate.apply_gate(pool, 1.0, 0.9, 0.05, "smallest-passing")
    assert win is not None and win.name == "small"
    assert [c.passes for c in pool] == [True, True, False]
    assert any("minScore" in r for r in pool[2].reasons)
    pool = [cand("big", 0.99, 500), cand("small", 0.96, 20)]
    assert evaluate.apply_gate(pool, 1.0, None, None, "best-score").name == "big"  # type: ignore[union-attr]
    pool = [cand("idle", 1.0, 1, coverage=0.0)]
    assert evaluate.apply_gate(pool, 1.0, None, None, "best-score") is None
    assert pool[0].reasons == ["answers no call"]


def test_a_candidate_of_unknown_size_is_not_the_smallest() -> None:
    """ "smallest-passing" picks the smallest model it knows the size of; an artifact that
    does not say how big it is ranks last, not first."""
    known = evaluate.CandidateScore(
        name="known", kind="selector", path="", parameters=22_000_000, score=0.99, coverage=0.5
    )
    unknown = evaluate.CandidateScore(
        name="unknown", kind="selector", path="", score=0.99, coverage=0.5
    )
    win = evaluate.apply_gate([unknown, known], 1.0, None, None, "smallest-passing")
    assert win is not None and win.name == "known"
    win = evaluate.apply_gate([unknown, known], 1.0, None, None, "best-score")
    assert win is not None and win.name == "known"  # a tie on score goes to the known size


def test_a_candidate_that_reaches_no_target_precision_fails_the_gate() -> None:
    """Even without minScore: if no threshold reaches the task's precision on the eval calls,
    the candidate would answer wrongly more often than the task allows once served."""
    recs = records()
    # Wrong on its most confident call: no threshold reaches 0.97 (or anything near it).
    preds = [
        evaluate.Prediction(label="wrong_tool", confidence=0.99),
        *(evaluate.Prediction(label=None, confidence=0.5) for _ in recs[1:]),
    ]
    s = evaluate.score_candidate("weak", recs, preds, "tool-call", "label-accuracy", 0.97)
    assert evaluate.apply_gate([s], 1.0, None, None, "best-score") is None
    assert s.passes is False
    assert "no threshold reaches precision 0.97" in s.reasons


def _weather_eval(tmp_path: Path, n: int) -> Path:
    """A data folder whose eval.jsonl holds ``n`` calls the LLM answered with get_weather."""
    calls = [
        CallRecord(
            task="t",
            backend="llm",
            messages=[{"role": "user", "content": f"weather {i}?"}],
            tools=TOOLS,
            response=tool_call("get_weather", {"city": f"c{i}"}),
        )
        for i in range(n)
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text("".join(r.to_json() + "\n" for r in calls))
    return data


def test_a_candidate_that_reaches_no_target_precision_scores_0_answering_nothing(
    tmp_path: Path,
) -> None:
    """Such a candidate answers nothing (targetPrecision's docs; finetune scores it 0 with the
    threshold 1.0), yet the report gave it its best precision on the curve: "score 0.800 at
    coverage 100.0%", a figure the gate never compares. That point stays on view apart."""
    data = _weather_eval(tmp_path, 10)
    # 8 of 10 right; the 2 wrong ones are the most confident: no threshold reaches 0.97
    rows = [{"index": i, "label": "get_weather", "confidence": 0.9} for i in range(8)] + [
        {"index": i, "label": "set_alarm", "confidence": 0.95} for i in (8, 9)
    ]
    _write_rows(tmp_path / "cands" / "a", rows)
    args = _args_for(tmp_path, data, tmp_path / "cands")
    args.plot = True
    result = evaluate.run(args)
    assert not result.ok
    assert "a: score 0.000 at coverage 0.0% (no threshold reaches precision 0.97" in (
        result.message
    )
    (cand,) = json.loads((tmp_path / "out" / "report.json").read_text())["candidates"]
    assert (cand["score"], cand["coverage"], cand["threshold"]) == (0.0, 0.0, 1.0)
    assert cand["metrics"]["at_threshold"] is None
    best = cand["metrics"]["best_below_target"]
    assert (best["precision"], best["coverage"]) == (0.8, 1.0)
    assert (tmp_path / "out" / "report.png").is_file()


def write_candidate(folder: Path, preds: list[evaluate.Prediction], params: int) -> None:
    folder.mkdir(parents=True)
    with (folder / "predictions.jsonl").open("w") as fh:
        for i, p in enumerate(preds):
            row = {"index": i, "label": p.label, "confidence": p.confidence}
            if p.response is not None:
                row["response"] = p.response
            fh.write(json.dumps(row) + "\n")
    (folder / "result.json").write_text(
        TrainerResult(
            stage="finetune", ok=True, parameters=params, artifact_uri=f"pvc://x/{params}"
        ).to_json()
    )


def test_the_stage_writes_report_and_plot_and_reports_the_winner(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text("".join(r.to_json() + "\n" for r in records()))
    write_candidate(tmp_path / "cands" / "selector", SELECTOR, 22_000_000)
    write_candidate(tmp_path / "cands" / "generator", GENERATOR, 135_000_000)
    (tmp_path / "cands" / "broken").mkdir()
    result_path = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slm_trainer",
            "evaluate",
            f"--data={data}",
            f"--output={tmp_path / 'report'}",
            f"--candidates-dir={tmp_path / 'cands'}",
            "--metric=label-accuracy",
            "--min-score=0.9",
            "--max-drop-vs-llm=0.05",
            "--target-precision=0.95",
            f"--result-path={result_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = TrainerResult.from_json(result_path.read_text())
    assert result.ok and result.stage == "evaluate"
    assert result.candidate == "selector"  # smallest passing
    assert result.artifact_uri == "pvc://x/22000000" and result.threshold == pytest.approx(0.65)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["winner"] == "selector"
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name["broken"]["error"] and not by_name["broken"]["passes"]
    assert by_name["generator"]["passes"]
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "uri", ["s3://bucket/" + "x" * 5000, "https://user:secretpw@host/m?X-Amz-Signature=abc"]
)
def test_the_winners_artifact_uri_is_reported_whole_or_not_at_all(tmp_path: Path, uri: str) -> None:
    """The winner's artifact URI is copied from its own result.json into the termination
    message. One of kilobytes crashed the CLI with that file already emptied (the operator
    read nothing); one with a password or a presigned signature was written there whole,
    for anyone who may read pods."""
    from slm_trainer import cli

    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text("".join(r.to_json() + "\n" for r in records()))
    write_candidate(tmp_path / "cands" / "selector", SELECTOR, 22_000_000)
    written = json.loads((tmp_path / "cands" / "selector" / "result.json").read_text())
    (tmp_path / "cands" / "selector" / "result.json").write_text(
        json.dumps({**written, "artifact_uri": uri})
    )
    result_path = tmp_path / "result.json"
    code = cli.main(
        [
            "evaluate",
            f"--data={data}",
            f"--output={tmp_path / 'report'}",
            f"--candidates-dir={tmp_path / 'cands'}",
            "--metric=label-accuracy",
            "--target-precision=0.95",
            "--no-plot",
            f"--result-path={result_path}",
        ]
    )
    text = result_path.read_text()
    result = TrainerResult.from_json(text)
    assert "secretpw" not in text and "Signature" not in text
    if uri.startswith("s3://"):
        assert code == cli.EXIT_REPORTED and not result.ok
        assert "cannot be reported" in result.message and "5012 bytes" in result.message
    else:
        assert code == 0 and result.ok and result.artifact_uri == "https://host/m"


def test_predictions_for_other_calls_are_refused(tmp_path: Path) -> None:
    recs = records()
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"index": 0, "key": "not-this-call", "label": "x"}) + "\n")
    with pytest.raises(ValueError, match="predictions for 4 eval calls"):
        evaluate.read_predictions(path, recs)
    path.write_text("".join(json.dumps({"index": i, "key": "nope"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="another call"):
        evaluate.read_predictions(path, recs)


def test_a_malformed_candidate_is_reported_not_fatal(tmp_path: Path) -> None:
    """One broken candidate folder must not cost the report and the other candidates."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text("".join(r.to_json() + "\n" for r in records()))
    write_candidate(tmp_path / "cands" / "selector", SELECTOR, 22_000_000)
    bad_rows = {
        "null-index": [{"index": None, "label": "get_weather"}] * 4,
        "not-objects": [[0, "get_weather"]] * 4,
    }
    for name, rows in bad_rows.items():
        folder = tmp_path / "cands" / name
        folder.mkdir()
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad_info = tmp_path / "cands" / "odd-result"
    write_candidate(bad_info, SELECTOR, 5)
    (bad_info / "result.json").write_text("[1, 2]\n")  # JSON, but not a result
    args = evaluate.Args(
        data=data,
        output=tmp_path / "out",
        candidates_dir=tmp_path / "cands",
        plot=False,
        metric="label-accuracy",  # tool choice: the selectors' get_weather has no arguments
    )
    result = evaluate.run(args)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name["null-index"]["error"] and not by_name["null-index"]["passes"]
    assert by_name["not-objects"]["error"] and not by_name["not-objects"]["passes"]
    assert by_name["odd-result"]["parameters"] is None and not by_name["odd-result"]["error"]
    assert result.ok and result.candidate in ("selector", "odd-result")


def test_malformed_eval_lines_are_counted_in_the_report_never_fatal(tmp_path: Path) -> None:
    """A hand-edited or truncated eval.jsonl: the scores are over the calls that parse, and
    the report says what was skipped and why (a line nested too deep used to crash)."""
    nested: Any = []
    for _ in range(600):  # decodes, but is too deep to hash or write back
        nested = [nested]
    deep = json.loads(records()[0].to_json())
    deep["messages"][0]["x"] = nested
    good = [r.to_json() for r in records()]
    lines = [
        good[0],
        "{broken",
        "[" * 100_000,
        good[1].replace('"q1"', '"q \\ud800"'),
        good[2],
        json.dumps(deep),
        good[3],
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_bytes(
        "".join(line + "\n" for line in lines).encode() + b'{"task": "\xff"}\n'
    )
    keep = [0, 2, 3]  # what parses: q0, q2, q3
    write_candidate(tmp_path / "cands" / "selector", [SELECTOR[i] for i in keep], 22_000_000)
    args = evaluate.Args(
        data=data, output=tmp_path / "out", candidates_dir=tmp_path / "cands", plot=False
    )
    result = evaluate.run(args)
    assert result.eval_examples == 3, result.message
    assert "5 malformed eval lines skipped" in result.message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["malformed"] == {
        "invalid_json": 2,
        "invalid_unicode": 1,
        "invalid_utf8": 1,
        "too_deep": 1,
    }
    assert report["malformed_total"] == 5 and report["eval_lines"] == 8
    assert [s["line"] for s in report["error_samples"]] == [2, 3, 4, 8]
    assert report["candidates"][0]["metrics"]["examples"] == 3


def test_blank_eval_lines_are_counted_as_curate_and_discover_count_them(tmp_path: Path) -> None:
    """The report counted blank lines among eval_lines and nowhere else, so its lines did
    not add up to the calls scored and the lines skipped."""
    good = [r.to_json() for r in records()]
    data = tmp_path / "data"
    data.mkdir()
    lines = [good[0], "", good[1], "{broken", "  ", good[2], good[3], ""]
    (data / "eval.jsonl").write_text("".join(line + "\n" for line in lines))
    write_candidate(tmp_path / "cands" / "selector", SELECTOR, 22_000_000)
    args = evaluate.Args(
        data=data, output=tmp_path / "out", candidates_dir=tmp_path / "cands", plot=False
    )
    assert evaluate.run(args).eval_examples == 4
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["blank"] == 3 and report["malformed_total"] == 1
    assert report["eval_lines"] == 8 == report["eval_examples"] + report["blank"] + 1


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="candidates"):
        evaluate.Args(data=Path("d"), output=Path("o"))
    with pytest.raises(ValueError, match="target_precision"):
        evaluate.Args(data=Path("d"), output=Path("o"), candidates="a", target_precision=0)


@pytest.mark.parametrize("flag", ["--min-score", "--max-drop-vs-llm"])
@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_a_gate_value_that_is_not_a_finite_number_is_refused(
    tmp_path: Path, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--min-score nan`` passed the check (NaN is not > 1) and then read as unset (NaN is
    not >= 0): the stage ran without the gate the user asked for."""
    from slm_trainer import cli

    argv = ["evaluate", f"--data={tmp_path}", f"--output={tmp_path}", "--candidates=a"]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, f"{flag}={value}"])
    assert exc.value.code == 2
    assert "must be a finite number" in capsys.readouterr().err


def _write_rows(folder: Path, rows: list[dict[str, Any]], params: int = 1_000) -> None:
    """A candidate folder with these predictions rows and a small result.json."""
    folder.mkdir(parents=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "result.json").write_text(
        TrainerResult(stage="finetune", ok=True, parameters=params).to_json()
    )


def _eval_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text("".join(r.to_json() + "\n" for r in records()))
    return data


def _selector_that_raises(monkeypatch: pytest.MonkeyPatch, cand: Path, error: Exception) -> None:
    """A selector candidate at ``cand`` whose scoring raises ``error`` (loading its weights)."""
    cand.mkdir()
    (cand / "selector.json").write_text("{}")

    def raising(path: Path, recs: Any, threads: int) -> Any:
        raise error

    monkeypatch.setattr(evaluate, "run_selector_here", raising)


def _args_for(tmp_path: Path, data: Path, cands: Path) -> evaluate.Args:
    return evaluate.Args(
        data=data,
        output=tmp_path / "out",
        candidates_dir=cands,
        plot=False,
        metric="label-accuracy",
    )


def test_a_candidate_that_cannot_be_scored_costs_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Predictions of the wrong types, or a selector whose weights are torn (safetensors
    raises its own error type), used to crash the stage for every candidate. Each is now
    that candidate's error, shown as such in the message rather than as a measured 0.0."""
    data = _eval_data(tmp_path)
    cands = tmp_path / "cands"
    write_candidate(cands / "selector", SELECTOR, 22_000_000)
    _write_rows(
        cands / "list-conf", [{"index": i, "label": "x", "confidence": [0.5]} for i in range(4)]
    )
    _write_rows(
        cands / "text-response", [{"index": i, "response": "get_weather"} for i in range(4)]
    )

    class SafetensorError(Exception):  # what safetensors raises for a truncated file
        pass

    error = SafetensorError("Error while deserializing header: incomplete metadata")
    _selector_that_raises(monkeypatch, cands / "torn", error)
    result = evaluate.run(_args_for(tmp_path, data, cands))
    assert result.ok and result.candidate == "selector", result.message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    assert "confidence is not a number" in by_name["list-conf"]["error"]
    assert "response is not a JSON object" in by_name["text-response"]["error"]
    assert by_name["torn"]["error"].startswith("SafetensorError: Error while deserializing")
    for name in ("list-conf", "text-response", "torn"):
        assert not by_name[name]["passes"]
        assert f"{name}: not scored: " in result.message
        assert f"{name}: score " not in result.message


def test_predictions_on_another_scale_or_misaligned_are_the_candidates_error(
    tmp_path: Path,
) -> None:
    """Logits as confidences had the threshold clamped to 1.0, which serves every call the
    curve counted as deferred; a call predicted twice without a key was scored against its
    neighbours' references. Both are now that candidate's error."""
    data = _eval_data(tmp_path)
    cands = tmp_path / "cands"
    write_candidate(cands / "selector", SELECTOR, 22_000_000)
    right = ["get_weather", "get_weather", "set_alarm", None]
    logits = [4.0, 3.0, 2.0, 1.5]
    _write_rows(
        cands / "logits",
        [
            {"index": i, "label": lab, "confidence": c}
            for i, (lab, c) in enumerate(zip(right, logits, strict=True))
        ],
    )
    _write_rows(cands / "twice", [{"index": 0, "label": "get_weather", "confidence": 0.9}] * 4)
    result = evaluate.run(_args_for(tmp_path, data, cands))
    assert result.ok and result.candidate == "selector", result.message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    assert "confidence 4.0 is not in [0, 1]" in by_name["logits"]["error"]
    assert "indexes are not 0 to 3 once each" in by_name["twice"]["error"]
    # written with plot=False: no earlier run's report.png is left beside it
    (tmp_path / "out" / "report.png").write_bytes(b"an earlier verdict")
    evaluate.run(_args_for(tmp_path, data, cands))
    assert not (tmp_path / "out" / "report.png").exists()


def test_a_threshold_must_answer_more_than_a_lucky_call(tmp_path: Path) -> None:
    """The threshold is picked and scored on the same eval calls: one answering only the most
    confident call of a hundred, right, scored 1.0 and won. It must answer 10 of them."""
    data = _weather_eval(tmp_path, 100)
    rows = [
        {"index": i, "label": "get_weather" if i == 0 else "set_alarm", "confidence": 1 - i / 200}
        for i in range(100)
    ]
    _write_rows(tmp_path / "cands" / "lucky", rows)
    result = evaluate.run(_args_for(tmp_path, data, tmp_path / "cands"))
    assert not result.ok, result.message
    assert "no threshold reaches precision 0.97 on at least 10 answered calls" in result.message
    rows = [{**r, "label": "get_weather"} if r["index"] < 10 else r for r in rows]
    _write_rows(tmp_path / "cands2" / "ten", rows)
    result = evaluate.run(_args_for(tmp_path, data, tmp_path / "cands2"))
    assert result.ok and result.candidate == "ten", result.message
    assert "at coverage 10.0%" in result.message


def test_nan_confidences_never_win_and_the_report_stays_strict_json(tmp_path: Path) -> None:
    """NaN compares false with every threshold, so a candidate of NaN confidences answered
    every call and, being the smallest, won; and report.json held a bare NaN."""
    data = _eval_data(tmp_path)
    cands = tmp_path / "cands"
    write_candidate(cands / "selector", SELECTOR, 22_000_000)
    right = ["get_weather", "get_weather", "set_alarm", None]  # every label right
    rows = [
        {"index": i, "label": label, "confidence": float("nan"), "latency_ms": float("inf")}
        for i, label in enumerate(right)
    ]
    _write_rows(cands / "nan", rows, params=1)
    args = evaluate.Args(
        data=data,
        output=tmp_path / "out",
        candidates_dir=cands,
        plot=False,
        metric="label-accuracy",
    )
    result = evaluate.run(args)
    assert result.ok and result.candidate == "selector", result.message
    assert "nan: not scored: " in result.message and "not a finite number" in result.message

    def refuse(constant: str) -> None:
        raise AssertionError(f"report.json holds {constant}, which is not JSON")

    report = json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=refuse)
    assert report["winner"] == "selector"


@pytest.mark.parametrize("made", [False, True])
def test_no_candidate_directory_says_where_it_looked(tmp_path: Path, made: bool) -> None:
    """A missing or empty --candidates-dir said "no candidate passed the gate: " and nothing
    after it."""
    cands = tmp_path / "cands"
    if made:
        cands.mkdir()
        (cands / "stray.txt").write_text("not a candidate")
    args = evaluate.Args(
        data=_eval_data(tmp_path), output=tmp_path / "out", candidates_dir=cands, plot=False
    )
    result = evaluate.run(args)
    assert not result.ok
    assert f"no candidate directories were found: --candidates-dir {cands}" in result.message
    assert ("has no candidate subdirectories" if made else "does not exist") in result.message
    assert "passed the gate" not in result.message


def test_running_out_of_memory_fails_the_stage_rather_than_one_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient shortage is the machine's, not the candidate's: recorded as its error, a
    weaker candidate would have won the gate for good instead of the Job retrying."""
    data = _eval_data(tmp_path)
    cands = tmp_path / "cands"
    write_candidate(cands / "selector", SELECTOR, 22_000_000)

    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    _selector_that_raises(monkeypatch, cands / "big", OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(OutOfMemoryError):
        evaluate.run(_args_for(tmp_path, data, cands))
