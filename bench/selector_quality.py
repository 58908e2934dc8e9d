"""Tool-selection quality on real BFCL traffic: the fine-tuned selector vs zero-shot MiniLM.

Why: the product's headline claim is the share of agent calls a small model takes over
without losing quality against the LLM. This benchmark measures it on the Berkeley Function
Calling Leaderboard and runs the trainer's own stages end to end
(bfcl_data -> curate -> finetune (selector) -> evaluate). It tunes only on ``live_multiple``,
``simple_python`` and ``live_irrelevance``.

Traffic: the held-out (eval) split of ``live_multiple`` mixed with the held-out split of
``live_irrelevance``. A model either answers, naming the function, or defers the call to the
LLM. The target (issue 4):

- accept >= 80% of the relevant calls (those the LLM answered with a tool);
- be right on >= 97% of the calls it accepts (the correct function; accepting an irrelevant
  call counts as wrong);
- defer >= 90% of the irrelevant calls.

The fine-tuned selector is trained with the evaluation settings of
``examples/classification.yaml`` (``targetPrecision: 0.97``, ``calibrationFolds: 4``): on every
training call, with its threshold picked on the out-of-fold confidences of 4 more models
(``--calibration-folds 4``; ``0`` holds out ``--calibration-fraction`` of the training calls
instead), so no choice is made on the traffic. The baseline,
from the same run, is untuned all-MiniLM-L6-v2 cosine ranking over the same texts, with the
similarity threshold set on the traffic itself so that it defers 90% of the irrelevant calls.
That choice favours the baseline.

Usage::

    python bench/selector_quality.py [--work /tmp/slm-bench-selector] [--epochs 4]
        [--threads 2] [--tool-tower frozen|shared] [--defer-head constant|query]
        [--seed N] [--split-seed N] [--calibration-folds K] [--reuse-data]

Writes ``bench/results/selector_quality.json`` and ``bench/results/selector_coverage.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bfcl_data  # noqa: E402

from slm_trainer import metrics  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TRAFFIC = ("live_multiple", "live_irrelevance")
TARGET = {"relevant_accepted": 0.80, "precision": 0.97, "irrelevant_deferred": 0.90}


def data_stamp(eval_fraction: float, seed: int) -> str:
    """What the curated split depends on: the code that builds and curates the call log, the
    versions of Python (its regular expressions and Unicode tables redact) and of the packages
    that redact and deduplicate it, and the split's settings.

    ``--reuse-data`` reuses a split only under the same stamp. Without it, a split an older
    curate had left in the work folder was reused silently, and the figures published from it
    differed from what the same command gives on a fresh machine."""
    import hashlib
    from importlib import metadata

    h = hashlib.sha256()
    trainer = ROOT / "trainer"
    sources = [ROOT / "bench" / "bfcl_data.py"]
    sources += [trainer / "slm_trainer" / f for f in ("curate.py", "redact.py")]
    sources += sorted((trainer / "slm_contract").glob("*.py"))
    for path in sources:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    for dist in ("bfcl-eval", "presidio-analyzer", "spacy", "phonenumbers", "datasketch"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{dist}=={version}\0".encode())
    h.update(f"python=={sys.version_info.major}.{sys.version_info.minor}\0".encode())
    h.update(f"eval_fraction={eval_fraction!r} seed={seed}".encode())
    return h.hexdigest()


def quiet_emit(event: dict[str, Any]) -> None:
    """Progress on stderr, sparsely: the table on stdout stays readable."""
    if event.get("phase") in ("train", "resume", "preempted") and (
        event.get("percent", 0) % 10 < 0.5 or event.get("phase") != "train"
    ):
        print(json.dumps(event), file=sys.stderr, flush=True)


def baseline_threshold(conf: Sequence[float], refs: Sequence[str | None], defer: float) -> float:
    """The lowest similarity threshold that defers at least ``defer`` of irrelevant calls."""
    irrelevant = sorted(c for c, r in zip(conf, refs, strict=True) if r is None)
    if not irrelevant:
        return 0.0
    k = min(len(irrelevant) - 1, int(defer * len(irrelevant) + 0.999999) - 1)
    # Accept iff cos >= t: t just above the k-th smallest defers irrelevant[0..k].
    import math

    return math.nextafter(irrelevant[k], math.inf)


def relevant_only_curve(
    labels: Sequence[str | None], conf: Sequence[float], refs: Sequence[str | None]
) -> list[metrics.CurvePoint]:
    """The coverage curve on the relevant calls alone: what the selector would reach if
    something else deferred every irrelevant call perfectly. Its best point at the target
    precision is bounded by the wrong tools the selector is confident about; below 80 %, no
    irrelevance detector, however good, meets the target with this ranking."""
    keep = [i for i, r in enumerate(refs) if r is not None]
    return metrics.coverage_curve(
        [labels[i] for i in keep], [conf[i] for i in keep], [refs[i] for i in keep]
    )


def row(name: str, point: metrics.CurvePoint, top1: float, top1_tool: float) -> dict[str, Any]:
    """One table row. ``top1_relevant``: the model's first choice on relevant calls, where a
    fine-tuned selector choosing *defer* counts as a miss; ``top1_tool``: the best-scored
    tool, defer left out, which is how the zero-shot baseline ranks and so the like-for-like
    comparison of ranking."""
    return {
        "model": name,
        "threshold": round(point.threshold, 4),
        "relevant_accepted": round(point.relevant_coverage, 4),
        "precision": round(point.precision, 4),
        "irrelevant_deferred": round(point.irrelevant_deferral, 4),
        "top1_relevant": round(top1, 4),
        "top1_tool": round(top1_tool, 4),
        "accepted": point.accepted,
        "correct": point.correct,
        "meets_target": point.relevant_coverage >= TARGET["relevant_accepted"]
        and point.precision >= TARGET["precision"]
        and point.irrelevant_deferral >= TARGET["irrelevant_deferred"],
    }


def print_table(rows: Sequence[dict[str, Any]], n_rel: int, n_irr: int) -> None:
    print(f"\nTraffic: held-out live_multiple ({n_rel} calls) + live_irrelevance ({n_irr} calls)")
    head = (
        f"{'model':44} {'thresh':>7} {'relevant accepted':>18} {'precision':>10} "
        f"{'irrelevant deferred':>20} {'top-1':>6} {'top-1 tool':>10} {'target':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:44} {r['threshold']:>7.3f} {r['relevant_accepted']:>18.1%} "
            f"{r['precision']:>10.1%} {r['irrelevant_deferred']:>20.1%} "
            f"{r['top1_relevant']:>6.1%} {r['top1_tool']:>10.1%} "
            f"{'info' if '(info)' in r['model'] else 'MET' if r['meets_target'] else 'missed':>7}"
        )
    print(
        f"{'target':44} {'':>7} {'>= 80.0%':>18} {'>= 97.0%':>10} {'>= 90.0%':>20} {'':>6} "
        f"{'':>10} {'':>7}"
    )
    print(
        "top-1: the first choice on relevant calls (a selector's defer counts as a miss); "
        "top-1 tool: the best-scored tool, defer left out"
    )
    print(
        "every irrelevant call removed: the same predictions on the relevant calls alone, the "
        "ceiling of this ranking with a perfect irrelevance detector (info)"
    )


def plot(
    curves: dict[str, list[metrics.CurvePoint]], marks: dict[str, dict[str, Any]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        pts = [p for p in curve if p.accepted]
        style = ":" if "ceiling" in name else "-"
        ax.plot([p.relevant_coverage for p in pts], [p.precision for p in pts], style, label=name)
        m = marks.get(name)
        if m:
            ax.scatter([m["relevant_accepted"]], [m["precision"]], zorder=3)
    ax.axhline(TARGET["precision"], color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(TARGET["relevant_accepted"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("relevant calls accepted (coverage)")
    ax.set_ylabel("precision on accepted calls")
    ax.set_title("BFCL live_multiple + live_irrelevance (held out)")
    ax.set_ylim(0.5, 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/slm-bench-selector"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--method",
        choices=("lora", "full"),
        default="lora",
        help="LoRA adapter, or full fine-tuning of the query encoder (use a lower --learning-rate)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="curate's train/eval split seed: the traffic itself, kept apart from --seed so that "
        "training seeds are compared on the same split",
    )
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--tool-tower", choices=("frozen", "shared"), default="frozen")
    parser.add_argument("--defer-head", choices=("constant", "query"), default="constant")
    parser.add_argument("--missing-tool-weight", type=float, default=0.5)
    parser.add_argument(
        "--in-batch-weight",
        type=float,
        default=1.0,
        help="weight of scoring each call against its batch's other tools (0: off)",
    )
    parser.add_argument("--calibration-fraction", type=float, default=0.15)
    parser.add_argument(
        "--calibration-folds",
        type=int,
        default=4,
        help="calibrate on out-of-fold logits of K extra models, the served one trained on every "
        "call, as examples/classification.yaml sets it (0: hold out --calibration-fraction)",
    )
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="keep work/data if the same code, package versions and settings built it",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)

    import torch

    torch.set_num_threads(ns.threads)
    from slm_trainer import curate, finetune, selector

    work: Path = ns.work
    data = work / "data"
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    stamp = data_stamp(ns.eval_fraction, ns.split_seed)
    stamp_file = data / "bench-stamp.txt"
    reuse = (
        ns.reuse_data
        and (data / "eval.jsonl").is_file()
        and stamp_file.is_file()
        and stamp_file.read_text().strip() == stamp
    )
    if ns.reuse_data and not reuse:
        print(
            "--reuse-data: no split built by this code and settings; building it", file=sys.stderr
        )
    if not reuse:
        stamp_file.unlink(missing_ok=True)  # a rebuild that fails half-way is not reused
        n = bfcl_data.write_call_log(work / "calls.jsonl")
        res = curate.run(
            curate.Args(
                input=work / "calls.jsonl",
                output_dir=data,
                eval_fraction=ns.eval_fraction,
                seed=ns.split_seed,
            ),
            quiet_emit,
        )
        print(f"curate: {n} BFCL records -> {res.message}", file=sys.stderr)
        if not res.ok:
            return 1
        stamp_file.write_text(stamp + "\n")
    timings["data_seconds"] = round(time.monotonic() - t0, 1)

    cand = work / "candidates" / "minilm-selector"
    checkpoints = work / "checkpoints" / "minilm-selector"
    import shutil

    # A fresh training every run: resuming an earlier run's checkpoints gives the same
    # weights but would report its own few seconds as the training time.
    for old in (cand, checkpoints):
        shutil.rmtree(old, ignore_errors=True)
    args = finetune.Args(
        candidate="minilm-selector",
        model="sentence-transformers/all-MiniLM-L6-v2",
        data=data,
        output=cand,
        task_type="tool-call",
        method=ns.method,
        lora_r=ns.lora_r,
        lora_alpha=2 * ns.lora_r,
        epochs=ns.epochs,
        learning_rate=ns.learning_rate,
        max_seq_length=128,
        metric="label-accuracy",
        checkpoint_dir=checkpoints,
        seed=ns.seed,
        batch_size=ns.batch_size,
        num_threads=ns.threads,
        tool_tower=ns.tool_tower,
        missing_tool_weight=ns.missing_tool_weight,
        in_batch_weight=ns.in_batch_weight,
        defer_head=ns.defer_head,
        calibration_fraction=ns.calibration_fraction,
        calibration_folds=ns.calibration_folds,
    )
    t1 = time.monotonic()
    result = finetune.run(args, quiet_emit)
    timings["finetune_seconds"] = round(time.monotonic() - t1, 1)
    print(f"finetune: {result.message}", file=sys.stderr)
    if not result.ok:
        return 1

    # The evaluate stage on the whole held-out split (all three categories), as a Job runs it.
    from slm_trainer import evaluate

    ev = evaluate.run(
        evaluate.Args(
            data=data,
            output=ns.results / "evaluate",
            candidates=str(cand),
            task_type="tool-call",
            metric="label-accuracy",
            target_precision=TARGET["precision"],
        )
    )
    print(f"evaluate: {ev.message}", file=sys.stderr)

    eval_records = selector.read_records(data / "eval.jsonl")
    examples = selector.examples_from_records(eval_records, "tool-call")
    preds = [json.loads(line) for line in (cand / selector.PREDICTIONS).open()]
    # Held out means unseen: a call whose conversation text a training call has too (the same
    # question with other tools offered, which curate keeps apart from near duplicates) is
    # left out of the traffic; 19 of the 23 such calls had the training call's very answer.
    from slm_trainer.curate import dedupe_text

    seen = {dedupe_text(r) for r in selector.read_records(data / "train.jsonl")}
    in_traffic = [bfcl_data.category_of(r.request_id) in TRAFFIC for r in eval_records]
    keep = [i for i, r in enumerate(eval_records) if in_traffic[i] and dedupe_text(r) not in seen]
    twins = sum(in_traffic) - len(keep)
    print(f"traffic: {twins} held-out calls left out, their text is a training call's")
    refs = [examples[i].ref_label for i in keep]
    n_rel = sum(r is not None for r in refs)
    n_irr = len(refs) - n_rel

    tuned_labels = [preds[i]["label"] for i in keep]
    tuned_conf = [float(preds[i]["confidence"]) for i in keep]
    manifest = json.loads((cand / selector.MANIFEST).read_text())
    tuned_th = float(manifest["threshold"])
    tuned_curve = metrics.coverage_curve(tuned_labels, tuned_conf, refs)
    tuned_at = metrics.selective_point(tuned_labels, tuned_conf, refs, tuned_th)
    oracle = metrics.pick_threshold(tuned_curve, TARGET["precision"])

    t2 = time.monotonic()
    zs = selector.zero_shot_predictions([examples[i] for i in keep], args.model)
    timings["zero_shot_seconds"] = round(time.monotonic() - t2, 1)
    zs_labels = [p[0] for p in zs]
    zs_conf = [p[1] for p in zs]
    zs_th = baseline_threshold(zs_conf, refs, TARGET["irrelevant_deferred"])
    zs_at = metrics.selective_point(zs_labels, zs_conf, refs, zs_th)
    zs_curve = metrics.coverage_curve(zs_labels, zs_conf, refs)

    def top1(labels: Sequence[str | None]) -> float:
        pairs = [(p, r) for p, r in zip(labels, refs, strict=True) if r is not None]
        return sum(p == r for p, r in pairs) / max(1, len(pairs))

    # The served model's best tool with defer left out, from its raw logits [defer, tools...].
    served = selector.load_selector(cand, num_threads=ns.threads)
    traffic = [examples[i] for i in keep]
    best_tool = [
        ex.labels[max(range(len(ex.labels)), key=lambda j: (lg[j + 1], -j))] if ex.labels else None
        for ex, lg in zip(traffic, served.raw_logits(traffic), strict=True)
    ]
    tuned_top1 = top1(tuned_labels), top1(best_tool)
    rows = [
        row("zero-shot MiniLM cosine (thr. on traffic)", zs_at, top1(zs_labels), top1(zs_labels)),
        row("fine-tuned selector (thr. from calibration)", tuned_at, *tuned_top1),
    ]
    if oracle is not None:
        rows.append(row("fine-tuned, thr. picked on traffic (info)", oracle, *tuned_top1))
    ceiling_curve = relevant_only_curve(tuned_labels, tuned_conf, refs)
    ceiling = metrics.pick_threshold(ceiling_curve, TARGET["precision"])
    if ceiling is not None:
        rows.append(row("fine-tuned, irrelevant calls removed (info)", ceiling, *tuned_top1))
    print_table(rows, n_rel, n_irr)
    # How far the served confidence is from the chance that its choice (a tool, or defer) is
    # right: what the gateway's threshold and an operator reading it rely on.
    ece = metrics.choice_calibration_error(tuned_labels, tuned_conf, refs)
    print(f"\nfine-tuned selector's calibration on the traffic: ECE {ece:.3f} (10 bins)")
    timings["total_seconds"] = round(time.monotonic() - t0, 1)
    print(
        f"\nfine-tune: {result.train_seconds:.0f} s train, {result.eval_seconds:.0f} s eval, "
        f"{result.trainable_parameters:,} trainable of {result.parameters:,} parameters, "
        f"{torch.get_num_threads()} CPU threads; eval latency (1 call): "
        f"{manifest['eval']['latency_ms']}"
    )

    out = {
        "target": TARGET,
        "traffic": {"relevant": n_rel, "irrelevant": n_irr, "left_out_as_seen": twins},
        "rows": rows,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(ns).items()},
        "finetune_result": json.loads(result.to_json()),
        "timings": timings,
        "curves": {
            "zero_shot": metrics.curve_as_dicts(zs_curve, 100),
            "selector": metrics.curve_as_dicts(tuned_curve, 100),
            "selector_relevant_only": metrics.curve_as_dicts(ceiling_curve, 100),
        },
        "tuned_point": asdict(tuned_at),
        "tuned_ece": round(ece, 6),
    }
    ns.results.mkdir(parents=True, exist_ok=True)
    (ns.results / "selector_quality.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(
        {
            "zero-shot MiniLM cosine": zs_curve,
            "fine-tuned selector": tuned_curve,
            "fine-tuned, irrelevant calls removed (ceiling)": ceiling_curve,
        },
        {"zero-shot MiniLM cosine": rows[0], "fine-tuned selector": rows[1]},
        ns.results / "selector_coverage.png",
    )
    print(f"wrote {ns.results / 'selector_quality.json'} and selector_coverage.png")
    return 0 if rows[1]["meets_target"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
