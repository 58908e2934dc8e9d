"""Memory of a long-running redactor (a capture worker) that keeps seeing new text.

Why: spaCy's tokenizer adds every distinct token it meets to its vocabulary and never lets go.
A capture worker redacts new text on nearly every call, for weeks, so a vocabulary without a
bound is a leak: its memory grows with every record until the pod is OOM-killed.
``BlankSpacyNlpEngine.max_lexemes`` bounds it by swapping in a fresh blank pipeline.

What runs: two worker-like processes, one with the default bound and one without (the
baseline, ``max_lexemes`` = infinity), each redacting the same stream of new strings (BFCL
user turns, each with a new ticket number, e-mail address and order reference appended,
so that nearly every string is new), printing resident memory and CPU per string as they go.

Usage (from the repository root)::

    .venv/bin/python bench/redactor_memory.py [--strings 60000]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _root in ("operator", "trainer", "bench"):
    sys.path.insert(0, str(ROOT / _root))


def _rss_mib() -> float:
    pages = int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _texts(n: int) -> list[str]:
    import bfcl_data

    turns = []
    for rec in bfcl_data.records(["live_multiple", "simple_python"]):
        for m in rec.messages:
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                turns.append(m["content"])
    return [
        f"{turns[i % len(turns)]} (ticket {100000 + 7 * i}, from user{i}@example.com, "
        f"order ref X{i * 7919 % 1000003:07d}Q{i})"
        for i in range(n)
    ]


def worker(strings: int, bounded: bool, every: int) -> None:
    """One redactor over ``strings`` new strings; prints a line every ``every``."""
    from slm_trainer.redact import BlankSpacyNlpEngine, Redactor

    if not bounded:
        BlankSpacyNlpEngine.max_lexemes = math.inf  # type: ignore[assignment]
    texts = _texts(strings)
    redactor = Redactor()
    redactor.redact_text("warm-up: jane@example.com, +1 415 555 0199")
    engine = redactor._analyzer.nlp_engine
    start_rss = _rss_mib()
    t = time.process_time()
    found = 0
    for i, text in enumerate(texts, 1):
        found += any(s.kind == "EMAIL_ADDRESS" for s in redactor.find(text))
        if i % every == 0:
            lexemes = len(engine.nlp["en"].vocab)
            print(
                f"{i:7d} {_rss_mib():9.0f} {_rss_mib() - start_rss:+9.0f} {lexemes:9d}"
                f" {(time.process_time() - t) / i * 1e6:9.0f} {found:7d}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strings", type=int, default=60_000)
    ap.add_argument("--every", type=int, default=10_000)
    ap.add_argument("--worker", choices=("bounded", "unbounded"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.strings, args.worker == "bounded", args.every)
        return 0
    for mode, label in (
        ("unbounded", "baseline: spaCy vocabulary without a bound"),
        ("bounded", "default: max_lexemes = 100,000"),
    ):
        print(f"\n{label}")
        head = ("strings", "RSS MiB", "growth", "lexemes", "us/str", "e-mails")
        print(" ".join(f"{h:>{7 if i in (0, 5) else 9}}" for i, h in enumerate(head)))
        subprocess.run(
            [sys.executable, __file__, "--worker", mode, "--strings", str(args.strings),
             "--every", str(args.every)],
            check=True,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
