"""Peak memory of the curate stage by log size, with and without ``max_examples``.

Why: curate holds every distinct call it keeps until it has compared them all (near
duplicates are compared in content-hash order, so the output does not depend on the log's
order), and a task's log only grows: retraining on new calls curates all of it again. Without
a bound its memory grows with the log until the data-prep Job is OOM-killed.
``max_examples`` (``spec.dataset.maxExamples``, 100,000 unless set) keeps a sample, the
calls with the smallest content hash, so it holds at most that many.

What runs: logs of growing size built from BFCL's calls, each call made distinct (a few
random words and a number added to its last user turn, so that near-duplicate detection has
work to do but finds little); curate on each, in a process of its own, once unbounded (the
baseline) and once with ``--max-examples``; the process's peak RSS and CPU time. PII
scrubbing is off, so the figures are curate's own memory, not the redactor's.

Usage (from the repository root)::

    .venv/bin/python bench/curate_memory.py [--sizes 5000,20000,40000] [--bound 5000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _root in ("trainer", "bench"):
    sys.path.insert(0, str(ROOT / _root))

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
]

CHILD = """
import json, resource, sys, time
from pathlib import Path
from slm_trainer import curate
log, out, bound = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.process_time()
result = curate.run(curate.Args(input=log, output_dir=out, scrub_pii=False, max_examples=bound,
                                min_examples=1))
report = json.loads((Path(out) / "curate_report.json").read_text())
print(json.dumps({"ok": result.ok, "examples": result.examples, "cpu_s": time.process_time() - t,
                  "beyond": report["beyond_max_examples"],
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_log(path: Path, n: int, source: list[dict]) -> None:
    rng = random.Random(n)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            rec = dict(source[i % len(source)])
            messages = [dict(m) for m in rec["messages"]]
            words = " ".join(rng.choice(WORDS) for _ in range(12))
            messages[-1]["content"] = f"{messages[-1].get('content')} {words} ref{i}"
            rec.update(messages=messages, request_id=f"r{i}")
            fh.write(json.dumps(rec) + "\n")


def curate_once(log: Path, out: Path, bound: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(log), str(out), str(bound)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "trainer"), "PATH": "/usr/bin:/bin"},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,20000,40000", help="distinct calls per log")
    ap.add_argument("--bound", type=int, default=5000, help="--max-examples of the bounded run")
    args = ap.parse_args(argv)

    import bfcl_data

    source = [json.loads(r.to_json()) for r in bfcl_data.records()]
    print(f"{len(source)} BFCL calls as the source; bound {args.bound}")
    print(
        f"{'calls':>7} {'log MiB':>8} | {'unbounded MiB':>13} {'cpu s':>6} {'kept':>6} | "
        f"{'bounded MiB':>11} {'cpu s':>6} {'kept':>6} {'left out':>8}"
    )
    with tempfile.TemporaryDirectory(prefix="slm-curate-memory-") as tmp:
        work = Path(tmp)
        for n in [int(s) for s in args.sizes.split(",")]:
            log = work / f"calls{n}.jsonl"
            write_log(log, n, source)
            whole = curate_once(log, work / f"whole{n}", 0)
            part = curate_once(log, work / f"part{n}", args.bound)
            print(
                f"{n:>7} {log.stat().st_size / 2**20:>8.1f} | {whole['maxrss_mib']:>13.0f} "
                f"{whole['cpu_s']:>6.1f} {whole['examples']:>6} | {part['maxrss_mib']:>11.0f} "
                f"{part['cpu_s']:>6.1f} {part['examples']:>6} {part['beyond']:>8}",
                flush=True,
            )
            log.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
