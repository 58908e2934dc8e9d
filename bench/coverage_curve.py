"""Time to compute the coverage/precision curve of a candidate, by the number of calls.

Why: the threshold a served model answers above is picked on this curve, computed on every
calibration call (all training calls, out of fold, with ``calibrationFolds``) and again on
the eval split by the evaluate stage. Scoring every distinct confidence anew grows with the
square of the calls: 7 s at 8,000, about 18 minutes at 100,000 by that square, in a Job
that holds a GPU node meanwhile. :func:`slm_trainer.metrics.coverage_curve` sweeps the levels once.

What runs: random tasks (labels, references with calls needing no tool, confidences) of
growing size; the curve by the sweep, and, as the baseline in the same run, by
:func:`slm_trainer.metrics.selective_point` at every level (up to ``--baseline-max`` calls,
since it is slow). Both must give the same points.

Usage (from the repository root)::

    .venv/bin/python bench/coverage_curve.py [--baseline-max 8000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-max", type=int, default=8000, help="largest baseline task")
    args = ap.parse_args(argv)

    from slm_trainer import metrics

    rng = random.Random(0)
    print(f"{'calls':>7} {'levels':>7} {'sweep s':>8} {'every level s':>14} {'ratio':>7}")
    for n in (1000, 2000, 4000, 8000, 30000, 100000):
        labels = [rng.choice(["a", "b", "c", None]) for _ in range(n)]
        refs = [rng.choice(["a", "b", None]) for _ in range(n)]
        conf = [rng.random() for _ in range(n)]
        t = time.process_time()
        curve = metrics.coverage_curve(labels, conf, refs)
        sweep = time.process_time() - t
        base, ratio = "-", "-"
        if n <= args.baseline_max:
            t = time.process_time()
            each = [metrics.selective_point(labels, conf, refs, p.threshold) for p in curve]
            every = time.process_time() - t
            assert each == curve, "the sweep and the per-level scoring disagree"
            base, ratio = f"{every:.2f}", f"{every / max(sweep, 1e-6):.0f}x"
        print(f"{n:>7} {len(curve) - 1:>7} {sweep:>8.3f} {base:>14} {ratio:>7}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
