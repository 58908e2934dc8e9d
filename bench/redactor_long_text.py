"""Time to redact one long text (a document or tool result in a call), by its length.

Why: Presidio's context step walks the text's tokens for every finding and scans a list of
all its keywords, so its time grows with findings x tokens. A capture worker redacting a
long document stalls for that long, and spaCy refused texts over 1,000,000 characters
outright, so such calls were never captured. The redactor now uses its own context enhancer
(:class:`slm_trainer.redact.LinearContextEnhancer`, the same findings and scores) and takes
texts up to ``MAX_TEXT_CHARS``.

What runs: texts of growing length, a contact line (phone, e-mail, order number) every 1,150
characters, each redacted by the default redactor and, as the baseline in the same run, by
one with Presidio's own enhancer (up to ``--baseline-max`` characters, since it is slow).

Usage (from the repository root)::

    .venv/bin/python bench/redactor_long_text.py [--baseline-max 400000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))

UNIT = "Call me at 415-555-0199 or mail jane@example.com about order 12345. " + (
    "lorem ipsum dolor sit amet " * 40
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-max", type=int, default=400_000, help="longest baseline text")
    args = ap.parse_args(argv)

    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    from slm_trainer.redact import Redactor

    ours = Redactor()
    stock = Redactor()
    stock._analyzer.context_aware_enhancer = LemmaContextAwareEnhancer()
    print(f"{'characters':>10} {'findings':>9} {'redactor s':>11} {'Presidio enhancer s':>20}")
    for reps in (10, 40, 80, 160, 320, 1300):
        text = UNIT * reps + f" {reps}"  # a new string each time: no cache
        t = time.process_time()
        found = len(ours.find(text))
        mine = time.process_time() - t
        base = "-"
        if len(text) <= args.baseline_max:
            t = time.process_time()
            assert len(stock.find(text)) == found
            base = f"{time.process_time() - t:.2f}"
        print(f"{len(text):>10} {found:>9} {mine:>11.2f} {base:>20}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
