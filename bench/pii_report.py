"""Precision and recall of the PII/secret redactor on the labelled set, beside stock Presidio.

Why: the curate stage is the gate that keeps PII out of fine-tuned models, so its detection
quality is a number we publish, not a feeling. A predicted span is a true positive when its
text equals a labelled value of the same kind in the same string (each label is matched at
most once); every other prediction is a false positive, every unmatched label a false negative.

The baseline, run on the same strings in the same process, is Presidio's own recognizers for
the kinds it ships (e-mail, phone, card, IP, IBAN) on the same blank spaCy pipeline, without our
secret recognizers, extra patterns and plausibility filters.

Usage::

    python bench/pii_report.py [--data tests/data/pii/labelled.jsonl] [--no-baseline] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "tests" / "data" / "pii" / "labelled.jsonl"

Pair = tuple[str, str]  # (kind, value)


@dataclass(frozen=True)
class Score:
    """Counts for one kind; precision/recall are 1.0 when there is nothing to get wrong."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass(frozen=True)
class Example:
    text: str
    labels: tuple[Pair, ...]


@dataclass(frozen=True)
class Report:
    per_kind: dict[str, Score]
    overall: Score
    errors: list[tuple[str, str, str, str]]  # (fp|fn, kind, value, text)
    seconds: float
    strings: int


def load_labelled(path: Path = DEFAULT_DATA) -> list[Example]:
    """Read the labelled JSON lines written by tests/data/pii/make_labelled.py."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                labels = tuple((e["kind"], e["value"]) for e in row["entities"])
                out.append(Example(row["text"], labels))
    return out


def score(
    examples: Sequence[Example], predictions: Sequence[Iterable[Pair]], kinds: Iterable[str]
) -> tuple[dict[str, Score], Score, list[tuple[str, str, str, str]]]:
    """Per-kind and micro-averaged counts; ``kinds`` restricts both labels and predictions."""
    wanted = set(kinds)
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    errors: list[tuple[str, str, str, str]] = []
    for ex, preds in zip(examples, predictions, strict=True):
        gold = Counter(p for p in ex.labels if p[0] in wanted)
        got = Counter(p for p in preds if p[0] in wanted)
        hit = gold & got
        for (kind, _), n in hit.items():
            tp[kind] += n
        for (kind, value), n in (got - hit).items():
            fp[kind] += n
            errors.append(("fp", kind, value, ex.text))
        for (kind, value), n in (gold - hit).items():
            fn[kind] += n
            errors.append(("fn", kind, value, ex.text))
    per_kind = {k: Score(tp[k], fp[k], fn[k]) for k in sorted(wanted)}
    overall = Score(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return per_kind, overall, errors


def run(
    examples: Sequence[Example], detect: Callable[[str], Iterable[Pair]], kinds: Iterable[str]
) -> Report:
    detect(examples[0].text)  # warm caches so the timing is per string, not per first call
    start = time.perf_counter()
    predictions = [list(detect(ex.text)) for ex in examples]
    seconds = time.perf_counter() - start
    per_kind, overall, errors = score(examples, predictions, kinds)
    return Report(per_kind, overall, errors, seconds, len(examples))


def redactor_report(examples: Sequence[Example]) -> Report:
    """The project's redactor (:class:`slm_trainer.redact.Redactor`) on every kind."""
    from slm_trainer.redact import KINDS, Redactor

    redactor = Redactor()
    return run(examples, lambda t: [(s.kind, s.value) for s in redactor.find(t)], KINDS)


def baseline_report(examples: Sequence[Example]) -> Report:
    """Stock Presidio recognizers, scored on all kinds (it finds no secrets, so they count)."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    from slm_trainer.redact import KINDS, BlankSpacyNlpEngine, OfflineEmailRecognizer

    registry = RecognizerRegistry(
        recognizers=[
            OfflineEmailRecognizer(),
            PhoneRecognizer(),
            CreditCardRecognizer(),
            IpRecognizer(),
            IbanRecognizer(),
        ],
        supported_languages=["en"],
    )
    analyzer = AnalyzerEngine(
        registry=registry, nlp_engine=BlankSpacyNlpEngine(), supported_languages=["en"]
    )

    def detect(text: str) -> list[Pair]:
        return [(r.entity_type, text[r.start : r.end]) for r in analyzer.analyze(text, "en")]

    return run(examples, detect, KINDS)


def format_table(ours: Report, baseline: Report | None) -> str:
    """A fixed-width table: one row per kind, ours beside the baseline."""
    head = f"{'kind':<14} {'labels':>6} {'TP':>4} {'FP':>4} {'FN':>4} {'prec':>6} {'recall':>6}"
    if baseline:
        head += f" | {'base P':>6} {'base R':>6}"
    lines = [head, "-" * len(head)]
    rows = [*ours.per_kind.items(), ("ALL (micro)", ours.overall)]
    for kind, s in rows:
        line = (
            f"{kind:<14} {s.tp + s.fn:>6} {s.tp:>4} {s.fp:>4} {s.fn:>4} "
            f"{s.precision:>6.3f} {s.recall:>6.3f}"
        )
        if baseline:
            b = baseline.overall if kind == "ALL (micro)" else baseline.per_kind[kind]
            line += f" | {b.precision:>6.3f} {b.recall:>6.3f}"
        lines.append(line)
    timing = f"{ours.strings} strings: redactor {1000 * ours.seconds / ours.strings:.2f} ms/string"
    if baseline:
        timing += f", baseline {1000 * baseline.seconds / baseline.strings:.2f} ms/string"
    lines.append(timing)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--errors", action="store_true", help="list every FP and FN")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "trainer"))
    examples = load_labelled(args.data)
    ours = redactor_report(examples)
    baseline = None if args.no_baseline else baseline_report(examples)
    if args.json:

        def as_dict(r: Report) -> dict[str, object]:
            return {
                k: {
                    "tp": s.tp,
                    "fp": s.fp,
                    "fn": s.fn,
                    "precision": s.precision,
                    "recall": s.recall,
                }
                for k, s in [*r.per_kind.items(), ("ALL", r.overall)]
            }

        out = {"redactor": as_dict(ours)}
        if baseline:
            out["baseline"] = as_dict(baseline)
        print(json.dumps(out, indent=2))
    else:
        print(format_table(ours, baseline))
    if args.errors:
        for what, kind, value, text in ours.errors:
            print(f"{what} {kind:<13} {value[:60]!r:<64} in {text[:100]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
