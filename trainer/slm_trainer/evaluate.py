"""The ``evaluate`` stage: score candidates against the LLM on the same held-out calls and gate.

Why a stage of its own: every candidate is judged on the same ``eval.jsonl`` with the same
rules as every other one and as the LLM. Promotion therefore compares like with like, and a
human can read why a candidate won in ``report.json`` and ``report.png``.

What it reads per candidate directory (the finetune stage's ``--output``):

- ``predictions.jsonl``: one line per eval call, in ``eval.jsonl`` order, with ``index``
  and optionally ``key`` (a content hash checked against the eval record). Then either
  ``label`` (a selector's choice, ``null`` = defer) or ``response`` (alias ``prediction``: a
  generated assistant message, ``{"defer": true}`` = defer), plus ``confidence`` and
  ``latency_ms`` when known. A row with neither a label nor a response defers.
- when there are no predictions and a ``selector.json`` is present, the selector is loaded
  and run here, which also measures per-call latency; ``--rescore`` forces this;
- ``result.json`` (the candidate's :class:`TrainerResult`) or ``selector.json`` for its
  parameter count and artifact URI.

Scores (definitions in :mod:`slm_trainer.metrics`): exact match, JSON validity, tool-call AST
match (with ``bfcl_eval``'s checker when importable), label accuracy, and latency. Each
candidate that reports confidences also gets a coverage/precision curve over every threshold,
and the threshold that keeps the most coverage while meeting ``target_precision`` on these
calls, answering at least :data:`~slm_trainer.generative.MIN_ACCEPTED` of them (a tenth of a
smaller split): picked and scored on the same calls, a threshold that answers one call, right
by luck, would score 1.0. That threshold is this report's: the gateway applies the one
the candidate's finetune stage calibrated, which the report reads from ``selector.json``,
``manifest.json`` or ``result.json`` and scores too (``metrics.at_served_threshold``).
Confidences must lie in [0, 1]; predictions on another scale, or
not one per eval call, are that candidate's error. A candidate's ``score`` is its chosen
metric on the calls it answers at that threshold (without confidences, on every call it does
not defer: served, it has no threshold);
when no threshold reaches the target it answers nothing, so its score and coverage are 0 (as
the finetune stage reports it) and the curve's best point is kept as
``metrics.best_below_target``.
``llm_score`` is 1.0, because the references are the LLM's own answers. The gate
(``min_score``, ``max_drop_vs_llm``) and the selection policy then pick the winner that the
result reports. No candidate passing is a failed result (exit 3), with the reasons.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from slm_contract import MAX_COUNT, CallRecord, TaskType, TrainerResult
from slm_trainer import metrics
from slm_trainer.cli import finite
from slm_trainer.curate import ParseStats, parse_lines, read_lines, writable
from slm_trainer.generative import MIN_ACCEPTED, MIN_THRESHOLD
from slm_trainer.triton_model import chatformat

#: The contract has no evaluate stage; this one reports a candidate's score like finetune.
CONTRACT_STAGE = "evaluate"

Metric = Literal["exact-match", "tool-call-ast", "label-accuracy"]
Policy = Literal["smallest-passing", "best-score"]
Emit = Callable[[dict[str, Any]], None]


@dataclass
class Args:
    """Score candidates on eval.jsonl against the LLM's answers; write report.json and a plot."""

    data: Path = field(metadata={"help": "eval.jsonl, or the curate directory holding it"})
    output: Path = field(metadata={"help": "directory for report.json and report.png"})
    candidates: str = field(
        default="",
        metadata={"help": "comma-separated candidate directories (name=dir to rename)"},
    )
    candidates_dir: Path | None = field(
        default=None, metadata={"help": "every subdirectory is a candidate"}
    )
    task_type: TaskType = field(default="tool-call", metadata={"help": "AgentTask taskType"})
    metric: Metric = field(default="tool-call-ast", metadata={"help": "the gate's metric"})
    target_precision: float = field(
        default=0.97, metadata={"help": "precision on answered calls a threshold must reach"}
    )
    min_score: float = field(default=-1.0, metadata={"help": "gate: lowest score (<0: unset)"})
    max_drop_vs_llm: float = field(
        default=-1.0, metadata={"help": "gate: largest drop below the LLM (<0: unset)"}
    )
    selection_policy: Policy = field(
        default="smallest-passing", metadata={"help": "smallest-passing or best-score"}
    )
    rescore: bool = field(
        default=False, metadata={"help": "rerun selectors here even when predictions exist"}
    )
    plot: bool = field(default=True, metadata={"help": "write report.png"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: default)"})

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.output = Path(self.output)
        if self.candidates_dir is not None and str(self.candidates_dir):
            self.candidates_dir = Path(self.candidates_dir)
        else:
            self.candidates_dir = None
        if not self.candidates and self.candidates_dir is None:
            raise ValueError("give --candidates or --candidates-dir")
        if not 0.0 < self.target_precision <= 1.0:
            raise ValueError("target_precision must be in (0, 1]")
        for name in ("min_score", "max_drop_vs_llm"):
            # NaN fails every comparison: "nan > 1" let it through and "nan >= 0" then read it
            # as unset, so a gate the user asked for was silently not applied.
            value = getattr(self, name)
            if not math.isfinite(value) or value > 1.0:
                raise ValueError(f"{name} must be a finite number <= 1 (<0: unset), got {value}")


# ----------------------------------------------------------------------------- pure scoring


@dataclass(frozen=True)
class Prediction:
    """One candidate answer: a label (selectors), a response (generators), or both."""

    label: str | None = None
    response: Mapping[str, Any] | None = None
    confidence: float | None = None
    latency_ms: float | None = None


@dataclass
class CandidateScore:
    name: str
    kind: str
    path: str
    parameters: int | None = None
    artifact_uri: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    score: float = 0.0
    coverage: float = 1.0
    passes: bool = False
    reasons: list[str] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    #: False when no confidence threshold reaches the target precision on the eval calls.
    meets_precision: bool = True


def _mean(values: Sequence[bool | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 6) if known else None


def prediction_label(pred: Prediction, task_type: str) -> str | None:
    if pred.response is not None:
        return metrics.label_of(pred.response, task_type)
    return pred.label


def answer_label(pred: Prediction, label: str | None) -> str | None:
    """The label a call counts as answered with, None when it is not answered.

    A generated message that calls no tool answers ("<text>") unless it is a deferral. A row
    with neither a label nor a response defers, as the module docstring says: scored as a
    text answer, it matched every reference the LLM gave in text.
    """
    if label is not None:
        return label
    answered = pred.response is not None and not metrics.is_deferral(pred.response)
    return "<text>" if answered else None


def score_candidate(
    name: str,
    records: Sequence[CallRecord],
    preds: Sequence[Prediction],
    task_type: str,
    metric: str,
    target_precision: float,
    served_threshold: float | None = None,
) -> CandidateScore:
    """Every metric for one candidate, its curve, threshold and gate score (pure).

    ``served_threshold``: the candidate's own threshold (its finetune stage calibrated it,
    and the operator puts it on the route), when known. The threshold picked here is picked
    on these eval calls; the figures at the served one (``metrics.at_served_threshold``) are
    what the gateway will apply, and the two can differ.

    Raises ValueError for a confidence that is not a finite number (a selector run here that
    produced NaN): it would otherwise count as answered at every threshold.
    """
    for i, p in enumerate(preds):
        if p.confidence is not None and not math.isfinite(p.confidence):
            raise ValueError(f"the confidence of eval call {i} is not a finite number")
    refs = [metrics.label_of(r.response, task_type) for r in records]
    labels = [prediction_label(p, task_type) for p in preds]
    generative = any(p.response is not None for p in preds)
    out = CandidateScore(name=name, kind="generative" if generative else "selector", path="")
    answer_labels = [answer_label(p, lab) for p, lab in zip(preds, labels, strict=True)]
    # label-accuracy judges a generated message as the finetune stage does (a text answer
    # where the LLM called no tool is right) and a selector's choice by its label (None is
    # its deferral, never right). The reported label_accuracy is the mean of these very
    # verdicts: it had counted a deferral right wherever the LLM answered in text, so a
    # candidate that deferred every call showed a label accuracy beside its score of 0.
    label_ok = [
        metrics.answer_label_correct(p.response, r.response, task_type)
        if p.response is not None
        else metrics.label_correct(lab, ref)
        for p, r, lab, ref in zip(preds, records, labels, refs, strict=True)
    ]
    m: dict[str, Any] = {
        "examples": len(records),
        "label_accuracy": _mean(label_ok),
        "exact_match": None,
        "json_validity": None,
        "tool_call_ast": None,
        "ast_checker": None,
    }
    verdict = list(label_ok)
    # What is served for each call: the generated message, or for a selector gated on a metric
    # of whole answers, the answer it serves (the chosen tool with "{}" arguments), so that
    # it passes only where that answer is right. label-accuracy scores a selector's choice.
    responses: list[Mapping[str, Any] | None] | None = None
    if generative:
        responses = [p.response for p in preds]
    elif metric != "label-accuracy":
        responses = [
            chatformat.selector_answer(lab, float(p.confidence or 0.0), task_type)
            for lab, p in zip(labels, preds, strict=True)
        ]
    if responses is not None:
        exact = [
            metrics.exact_match(resp, r.response)
            for resp, r in zip(responses, records, strict=True)
        ]
        m["exact_match"] = _mean(exact)
        # In tool-call tasks a text answer is not meant to be JSON; only arguments are.
        m["json_validity"] = _mean(
            [
                metrics.json_valid(resp)
                if task_type != "tool-call" or (resp or {}).get("tool_calls")
                else None
                for resp in responses
            ]
        )
        if task_type == "tool-call":
            asts = [
                metrics.ast_match(resp, r.response, r.tools)
                for resp, r in zip(responses, records, strict=True)
            ]
            m["tool_call_ast"] = _mean([a.match for a in asts])
            m["ast_checker"] = "bfcl" if any(a.checker == "bfcl" for a in asts) else "builtin"
            if metric == "tool-call-ast":
                verdict = [a.match for a in asts]
        if metric == "exact-match":
            verdict = exact
    if not generative and metric != "label-accuracy":
        m["note"] = (
            f"a selector serves the tool it chooses with empty arguments ({{}}); {metric} "
            "scores that answer against the LLM's full call, so it is right only where the "
            "call takes no arguments. Gate selectors on label-accuracy to score tool choice."
        )
        # the right tool, yet a wrong answer as served: calls that need arguments
        wrong_as_served = sum(
            metrics.label_correct(lab, ref) and not ok
            for lab, ref, ok in zip(labels, refs, verdict, strict=True)
        )
        if wrong_as_served:
            out.reasons.append(
                f"{wrong_as_served} of {len(records)} calls get the right tool but a wrong "
                f"answer as served ({metric} scores the served call, whose arguments are "
                "'{}'; label-accuracy scores tool choice)"
            )
    lat = [p.latency_ms for p in preds if p.latency_ms is not None]
    m["latency_ms"] = metrics.latency_summary(lat) if lat else None

    if all(p.confidence is not None for p in preds) and preds:
        conf = [float(p.confidence or 0.0) for p in preds]
        curve = metrics.coverage_curve(answer_labels, conf, refs, verdict)
        # A generator's answer with confidence 0 was cut at max_new_tokens and is never served,
        # so the threshold is chosen among the points that defer it (all points of a selector).
        floor = MIN_THRESHOLD if generative else 0.0
        usable = [p for p in curve if p.threshold >= floor] or curve
        # Picked and scored on the same calls: a threshold that answers one call of a hundred,
        # right by luck, scored 1.0 and won. It must answer MIN_ACCEPTED calls, or a tenth of
        # a smaller eval split.
        least = max(1, min(MIN_ACCEPTED, len(preds) // 10))
        chosen = metrics.pick_threshold(usable, target_precision, min_accepted=least)
        out.curve = metrics.curve_as_dicts(curve)
        if chosen is None:
            # Such a candidate answers nothing (targetPrecision's documentation), and the
            # finetune stage gives it the threshold 1.0 and the score 0 (metrics.gate_score
            # of None): reported here as its best point on the curve, it showed a score the
            # gate never compares. That point stays on view for whoever lowers the target.
            best = max(usable, key=lambda p: (p.precision if p.accepted else -1, p.coverage))
            out.meets_precision = False
            out.reasons.append(
                f"no threshold reaches precision {target_precision:.2f}"
                + (f" on at least {least} answered calls" if least > 1 else "")
            )
            out.threshold, out.coverage, out.score = 1.0, 0.0, metrics.gate_score(None)
            m["at_threshold"] = None
            m["best_below_target"] = asdict(best)
        else:
            # Not rounded: the gateway compares served confidences with this value, and a
            # threshold rounded up would defer calls the curve counted as accepted. The
            # margin (halfway to the next lower confidence) answers the same eval calls.
            margin = metrics.with_margin(chosen.threshold, answer_labels, conf)
            out.threshold = max(floor, min(1.0, margin))
            out.coverage = round(chosen.coverage, 6)
            out.score = round(metrics.gate_score(chosen), 6)
            m["at_threshold"] = asdict(chosen)
        if served_threshold is not None:
            m["at_served_threshold"] = asdict(
                metrics.selective_point(answer_labels, conf, refs, served_threshold, verdict)
            )
    else:
        # No confidence: served, it answers every call it does not defer, with no threshold.
        # Its precision is over those calls, and a candidate that answers none does not pass.
        point = metrics.selective_point(answer_labels, [1.0] * len(preds), refs, 0.0, verdict)
        out.coverage = round(point.coverage, 6)
        out.score = round(metrics.gate_score(point), 6)
        if point.accepted and point.precision < target_precision:
            out.meets_precision = False
            out.reasons.append(
                f"precision {point.precision:.3f} on the calls it answers is below "
                f"{target_precision:.2f}, and without a confidence it cannot defer the rest"
            )
        m["at_threshold"] = asdict(point)
    out.metrics = m
    return out


def apply_gate(
    scores: list[CandidateScore],
    llm_score: float,
    min_score: float | None,
    max_drop: float | None,
    policy: str,
) -> CandidateScore | None:
    """Mark who passes (with reasons) and return the winner under the policy, if any."""
    for c in scores:
        if c.error:
            c.passes = False
            c.reasons.append(c.error)
            continue
        ok = c.coverage > 0
        if not ok:
            c.reasons.append("answers no call")
        # Its best point is below the precision the task asked for (the reason was added when
        # it was scored): served, it would answer wrongly more often than allowed.
        ok = ok and c.meets_precision
        if min_score is not None and c.score < min_score:
            ok = False
            c.reasons.append(f"score {c.score:.3f} < minScore {min_score:.3f}")
        if max_drop is not None and llm_score - c.score > max_drop + 1e-12:
            ok = False
            c.reasons.append(
                f"{llm_score - c.score:.3f} below the LLM > maxDropVsLLM {max_drop:.3f}"
            )
        c.passes = ok
    passing = [c for c in scores if c.passes]
    if not passing:
        return None

    # A candidate of unknown size ranks as the largest: "smallest" must not mean "unmeasured".
    def size(c: CandidateScore) -> float:
        return math.inf if c.parameters is None else c.parameters

    if policy == "best-score":
        return max(passing, key=lambda c: (c.score, c.coverage, -size(c)))
    return min(passing, key=lambda c: (size(c), -c.score))


# ----------------------------------------------------------------------------- I/O


def read_eval(path: Path, stats: ParseStats | None = None) -> list[CallRecord]:
    """The eval calls, read by curate's parser; raises OSError when the file is missing.

    A malformed line (hand-edited or truncated file) is skipped and counted in ``stats`` by
    reason, never fatal: the report says how many calls the scores are over and why the
    others were left out. A record too deep to hash or write is counted as ``too_deep``.
    """
    stats = stats if stats is not None else ParseStats()
    file = path / "eval.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {file}")
    out = []
    for record in parse_lines(read_lines([file]), stats, require_answer=False):
        if writable(record):
            out.append(record)
        else:
            stats.malformed["too_deep"] += 1
    return out


def candidate_dirs(args: Args) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for item in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        name, sep, where = item.partition("=")
        path = Path(where if sep else name)
        found.append((name if sep else path.name, path))
    if args.candidates_dir is not None and args.candidates_dir.is_dir():
        found += [(p.name, p) for p in sorted(args.candidates_dir.iterdir()) if p.is_dir()]
    return found


def read_predictions(path: Path, records: Sequence[CallRecord]) -> list[Prediction]:
    """predictions.jsonl aligned to the eval records; raises ValueError when it does not fit."""
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    if len(rows) != len(records):
        raise ValueError(f"{path} has {len(rows)} predictions for {len(records)} eval calls")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: every prediction must be a JSON object")
    try:
        rows.sort(key=lambda r: int(r.get("index", 0)))
    except (TypeError, ValueError) as exc:  # "index": null, "first"...
        raise ValueError(f"{path}: a prediction's index is not an integer: {exc}") from exc
    if any("index" in r for r in rows):
        # without a key, a call predicted twice (and another not at all) would be scored
        # against its neighbours' references
        indexes = [int(r.get("index", -1)) for r in rows]
        if indexes != list(range(len(rows))):
            raise ValueError(
                f"{path}: prediction indexes are not 0 to {len(rows) - 1} once each "
                "(a call predicted twice, or one left out)"
            )
    keys = [_record_key(r) for r in records]
    preds = []
    for i, row in enumerate(rows):
        if row.get("key") and row["key"] != keys[i]:
            raise ValueError(f"{path}: prediction {i} is for another call than eval.jsonl's")
        label = row.get("label")
        response = row.get("response", row.get("prediction"))
        if label is not None and not isinstance(label, str):
            raise ValueError(f"{path}: prediction {i}'s label is not a string or null")
        if response is not None and not isinstance(response, dict):
            raise ValueError(f"{path}: prediction {i}'s response is not a JSON object or null")
        confidence = _number(row.get("confidence"), f"{path}: prediction {i}'s confidence")
        if confidence is not None and not 0.0 <= confidence <= 1.0:
            # a logit or a score on another scale: thresholds are picked in [0, 1], and one
            # clamped to 1.0 would serve every call the curve counted as deferred
            raise ValueError(f"{path}: prediction {i}'s confidence {confidence} is not in [0, 1]")
        preds.append(
            Prediction(
                label=label,
                response=response,
                confidence=confidence,
                latency_ms=_number(row.get("latency_ms"), f"{path}: prediction {i}'s latency_ms"),
            )
        )
    return preds


def _number(value: Any, what: str) -> float | None:
    """``value`` when it is null or a finite number; ValueError naming ``what`` otherwise.

    Why: a confidence of NaN compares false with every threshold, so the curve read it as
    "always answered" and a candidate could win on it, and a NaN written to report.json is
    not JSON. A string or a list used to crash the stage for every candidate.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} is not a number or null: {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number: {value}")
    return float(value)


def _record_key(record: CallRecord) -> str:
    import hashlib

    blob = json.dumps([record.messages, record.tools], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_selector_here(path: Path, records: Sequence[CallRecord], threads: int) -> list[Prediction]:
    """Load the selector and answer every eval call one by one (latency as served)."""
    from slm_trainer.selector import load_selector

    sel = load_selector(path, num_threads=threads)
    preds = []
    for r in records:
        t0 = time.perf_counter()
        label, conf = sel.predict(r.messages, r.tools)
        preds.append(Prediction(label, None, conf, (time.perf_counter() - t0) * 1000.0))
    return preds


def description_numbers(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The counts (``parameters``, ``trainable_parameters``), ``score`` and ``threshold`` of a
    candidate's description (selector.json, manifest.json, result.json) that a
    :class:`TrainerResult` can carry, and a sentence for each one present that it cannot.

    One rule for the stages that read them: JSON's ``true`` is no threshold of 1.0, and
    ``2.2e7`` no parameter count, though Python's ``isinstance`` says so. The evaluate stage
    leaves such a value out (the candidate counts as of unknown size); the export stage
    refuses the candidate before writing anything, where it used to serve the threshold 1.0
    or crash on the result after the repository was in place.
    """
    valid: dict[str, Any] = {}
    problems: list[str] = []
    for name in ("parameters", "trainable_parameters"):
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT:
            valid[name] = value
        elif value is not None:
            problems.append(f"{name} {_shown(value)} is not a non-negative integer")
    for name in ("score", "threshold"):
        value = data.get(name)
        # NaN fails both comparisons
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
            valid[name] = float(value)
        elif value is not None:
            problems.append(f"{name} {_shown(value)} is not a number in [0, 1]")
    return valid, problems


def _shown(value: Any) -> str:
    """A JSON value as a message quotes it: a scalar as written (cut), else its kind."""
    if isinstance(value, str | int | float):
        return json.dumps(value)[:40]
    return "(an object)" if isinstance(value, dict) else "(an array)"


def candidate_info(path: Path) -> dict[str, Any]:
    """Parameters, artifact URI and served threshold from selector.json, manifest.json (a
    generative candidate's) or result.json, when present."""
    info: dict[str, Any] = {}
    for name in ("selector.json", "manifest.json", "result.json"):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            # what the winner's result would carry: a count and a URI, or nothing
            numbers, _ = description_numbers(data)
            info.update({k: v for k, v in numbers.items() if k in ("parameters", "threshold")})
            if isinstance(data.get("artifact_uri"), str) and data["artifact_uri"]:
                info["artifact_uri"] = data["artifact_uri"]
    return info


def plot_report(report: Mapping[str, Any], path: Path) -> None:
    """Scores per candidate (with the LLM and the gate) and each coverage/precision curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = report["candidates"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [c["name"] for c in cands]
    colors = ["tab:green" if c["passes"] else "tab:red" for c in cands]
    ax1.bar(names, [c["score"] for c in cands], color=colors)
    ax1.axhline(report["llm_score"], color="black", linestyle="-", linewidth=0.8, label="LLM")
    gate = report["gate"]
    if gate.get("min_score") is not None:
        ax1.axhline(
            gate["min_score"], color="grey", linestyle="--", linewidth=0.8, label="minScore"
        )
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel(f"score ({report['metric']}, answered calls)")
    ax1.set_title("candidates (green: passes the gate)")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", labelrotation=20)
    plotted = False
    for c in cands:
        pts = [p for p in c["curve"] if p["accepted"]]
        if pts:
            plotted = True
            ax2.plot([p["coverage"] for p in pts], [p["precision"] for p in pts], label=c["name"])
            at = c["metrics"].get("at_threshold")
            if at:
                ax2.scatter([at["coverage"]], [at["precision"]], zorder=3)
    ax2.axhline(report["target_precision"], color="grey", linestyle="--", linewidth=0.8)
    ax2.set_xlabel("coverage (share of calls answered)")
    ax2.set_ylabel("precision on answered calls")
    ax2.set_title("coverage / precision over confidence thresholds")
    ax2.grid(alpha=0.3)
    if plotted:
        ax2.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary_of(c: CandidateScore) -> str:
    """One candidate in the result's message: its score and why it failed the gate, or for a
    candidate that could not be scored, the error alone (its 0.0 was never measured)."""
    if c.error:
        return f"{c.name}: not scored: {c.error}"
    return f"{c.name}: score {c.score:.3f} at coverage {c.coverage:.1%}" + (
        f" ({', '.join(c.reasons)})" if c.reasons else ""
    )


def _no_candidates_message(args: Args) -> str:
    """Why there was nothing to judge: where candidates were looked for and what was there."""
    where = args.candidates_dir
    if where is None:
        return "no candidate directories were given (--candidates lists none)"
    state = "does not exist" if not where.exists() else "has no candidate subdirectories"
    return (
        f"no candidate directories were found: --candidates-dir {where} {state} "
        "(did the finetune Jobs write their candidates there?)"
    )


def _out_of_memory(exc: BaseException) -> bool:
    """A host or GPU out-of-memory error (``MemoryError``, torch's ``OutOfMemoryError``).

    Why apart: recorded as one candidate's error, a transient shortage would let a weaker
    candidate win the gate for good; raised, the stage crashes and its Job retries it.
    """
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def run(args: Args, emit: Emit | None = None) -> TrainerResult:
    started = time.monotonic()
    stats = ParseStats()
    try:
        records = read_eval(args.data, stats)
    except OSError as exc:
        return TrainerResult(stage=CONTRACT_STAGE, ok=False, message=f"no eval data: {exc}")
    skipped = stats.skipped_note("eval line")
    if not records:
        return TrainerResult(
            stage=CONTRACT_STAGE, ok=False, message=f"eval split is empty{skipped}"
        )
    if args.num_threads > 0:
        import torch

        torch.set_num_threads(args.num_threads)
    found = candidate_dirs(args)
    if not found:
        return TrainerResult(
            stage=CONTRACT_STAGE,
            ok=False,
            eval_examples=len(records),
            message=_no_candidates_message(args),
        )
    scores: list[CandidateScore] = []
    for name, path in found:
        if emit:
            emit({"event": "progress", "stage": "evaluate", "candidate": name})
        info: dict[str, Any] = {}
        try:
            info = candidate_info(path)
            pred_file = path / "predictions.jsonl"
            if (path / "selector.json").is_file() and (args.rescore or not pred_file.is_file()):
                preds = run_selector_here(path, records, args.num_threads)
            elif pred_file.is_file():
                preds = read_predictions(pred_file, records)
            else:
                raise ValueError(f"{path} has neither predictions.jsonl nor selector.json")
            cs = score_candidate(
                name,
                records,
                preds,
                args.task_type,
                args.metric,
                args.target_precision,
                info.get("threshold"),
            )
        except Exception as exc:
            if _out_of_memory(exc):
                raise  # the machine's trouble, not the candidate's: the retried pod judges all
            # One broken candidate (torn weights, odd predictions) is that candidate's error;
            # the others are still judged, and one of them may win.
            error = str(exc) if isinstance(exc, OSError | ValueError | KeyError) else ""
            cs = CandidateScore(
                name=name, kind="unknown", path="", error=error or f"{type(exc).__name__}: {exc}"
            )
        cs.path = str(path)
        cs.parameters = info.get("parameters")
        cs.artifact_uri = info.get("artifact_uri") or path.resolve().as_uri()
        scores.append(cs)

    llm_score = 1.0
    min_score = args.min_score if args.min_score >= 0 else None
    max_drop = args.max_drop_vs_llm if args.max_drop_vs_llm >= 0 else None
    winner = apply_gate(scores, llm_score, min_score, max_drop, args.selection_policy)
    report = {
        "eval_examples": len(records),
        # eval_lines == eval_examples + blank + malformed_total, as curate and discover count
        "eval_lines": stats.lines,
        "blank": stats.blank,
        "malformed": dict(sorted(stats.malformed.items())),
        "malformed_total": sum(stats.malformed.values()),
        "error_samples": stats.errors,
        "task_type": args.task_type,
        "metric": args.metric,
        "target_precision": args.target_precision,
        "llm_score": llm_score,
        "llm_score_note": "the references are the LLM's own answers",
        "gate": {
            "min_score": min_score,
            "max_drop_vs_llm": max_drop,
            "selection_policy": args.selection_policy,
        },
        "winner": winner.name if winner else None,
        "candidates": [asdict(c) for c in scores],
        "seconds": round(time.monotonic() - started, 3),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    # strict JSON: a NaN or an infinity (a latency summary, a figure of a broken candidate)
    # is written as null, which every reader parses
    report = finite(report)
    (args.output / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if args.plot:
        plot_report(report, args.output / "report.png")
    else:  # an earlier run's plot beside this report would show another verdict
        (args.output / "report.png").unlink(missing_ok=True)
    eval_seconds = round(time.monotonic() - started, 3)
    summary = "; ".join(_summary_of(c) for c in scores)
    if winner is None:
        return TrainerResult(
            stage=CONTRACT_STAGE,
            ok=False,
            llm_score=llm_score,
            eval_examples=len(records),
            eval_seconds=eval_seconds,
            message=f"no candidate passed the gate: {summary}{skipped}",
        )
    return TrainerResult(
        stage=CONTRACT_STAGE,
        ok=True,
        candidate=winner.name,
        score=winner.score,
        llm_score=llm_score,
        parameters=winner.parameters,
        artifact_uri=winner.artifact_uri,
        threshold=winner.threshold,
        eval_examples=len(records),
        eval_seconds=eval_seconds,
        message=f"winner {winner.name} ({args.selection_policy}); {summary}{skipped}",
    )
