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
import gc
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))

if TYPE_CHECKING:
    from slm_trainer.redact import Redactor

UNIT = "Call me at 415-555-0199 or mail jane@example.com about order 12345. " + (
    "lorem ipsum dolor sit amet " * 40
)


def _warm(*redactors: Redactor) -> None:
    """Pay the one-time costs before anything is timed, so that no cell carries them.

    The first find loads spaCy and builds the recognisers, once for all redactors, so whichever
    ran first paid it inside its timing. After that, every full garbage collection still walked
    the objects the loaded models hold (about 0.2 s here) and landed in whichever cell happened
    to be timing; freezing them after the warm-up leaves collections only the text's own objects.
    """
    for redactor in redactors:
        redactor.find("warm-up: call 415-555-0100 or mail warm@example.com")
    gc.collect()
    gc.freeze()


def _print_table(ours: Redactor, stock: Redactor, baseline_max: int) -> None:
    print(f"{'characters':>10} {'findings':>9} {'redactor s':>11} {'Presidio enhancer s':>20}")
    for reps in (10, 40, 80, 160, 320, 1300):
        text = UNIT * reps + f" {reps}"  # a new string each time: no cache
        t = time.process_time()
        found = len(ours.find(text))
        mine = time.process_time() - t
        base = "-"
        if len(text) <= baseline_max:
            t = time.process_time()
            assert len(stock.find(text)) == found
            base = f"{time.process_time() - t:.2f}"
        print(f"{len(text):>10} {found:>9} {mine:>11.2f} {base:>20}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-max", type=int, default=400_000, help="longest baseline text")
    args = ap.parse_args(argv)

    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    from slm_trainer.redact import Redactor

    ours = Redactor()
    stock = Redactor()
    stock._analyzer.context_aware_enhancer = LemmaContextAwareEnhancer()
    _warm(ours, stock)
    try:
        _print_table(ours, stock, args.baseline_max)
    finally:
        gc.unfreeze()  # frozen objects are never freed at exit: native libraries report leaks
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
