"""What capture costs per call record, for sizing the gateway's redaction workers.

Why: every answered call is redacted (Presidio recognisers, libphonenumber over several
regions) and written by a capture worker process. ``gateway_bench.py`` replays 200 distinct
requests, so its redactor cache is warm and its capture cost is the floor. Real agent traffic
brings new text in most calls; this measures three cases, on the same records, in one run:

- **new text, as logged**: distinct BFCL calls, each seen once (a cold span cache);
- **new text with PII**: the same calls with a ticket number and an e-mail address appended
  to each user turn, so that every record has something to redact and the phone and e-mail
  recognizers run on every user turn (the expensive case);
- **repeated text**: the PII records again, which the redactor's span cache answers.

Each case runs with the default redactor, which skips the recognizers a string cannot
satisfy (``possible_kinds``), and, as the baseline in the same run, with ``gate=False``,
which runs every recognizer on every new string.

The figure is the worker's CPU time per record (:func:`slm_gateway.capture.capture_line`:
decode, redact, the JSON line), and from it the records per second one worker sustains on one
core. Give the gateway ``--capture-workers`` so that their sum exceeds the task's peak call
rate; beyond it records are dropped and counted
(``slm_gateway_capture_dropped_records_total{reason="queue_full"}``), never
written unredacted.

Usage (from the repository root)::

    .venv/bin/python bench/capture_cost.py [--records 1500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _root in ("operator", "trainer", "e2e", "bench"):
    sys.path.insert(0, str(ROOT / _root))

import bfcl_data  # noqa: E402
import orjson  # noqa: E402

from slm_gateway.capture import Captured, capture_line  # noqa: E402
from slm_trainer.redact import Redactor  # noqa: E402


def captured_calls(n: int, work: Path, with_pii: bool) -> list[Captured]:
    """``n`` distinct BFCL calls as the gateway hands them to capture."""
    log = work / "calls.jsonl"
    if not log.exists():
        bfcl_data.write_call_log(log)
    out: list[Captured] = []
    seen: set[bytes] = set()
    for i, line in enumerate(log.read_text().splitlines()):
        rec = orjson.loads(line)
        messages = [dict(m) for m in rec["messages"]]
        for m in messages:
            if with_pii and m.get("role") == "user" and isinstance(m.get("content"), str):
                m["content"] += f" (ticket {i}, contact agent{i}@example.org)"
        request = orjson.dumps(
            {"model": "bench", "messages": messages, "tools": rec.get("tools") or []}
        )
        if request in seen:
            continue
        seen.add(request)
        response = orjson.dumps({"choices": [{"message": rec["response"]}]})
        out.append(
            Captured(
                "bench/t", "t", "gpt", "llm", request, response, 1.0, 10, 5, time.time(), "", ""
            )
        )
        if len(out) >= n:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--work", type=Path, default=Path("/tmp/slm-bench-capture"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    logged = captured_calls(args.records, args.work, with_pii=False)
    with_pii = captured_calls(args.records, args.work, with_pii=True)

    def timed(redactor: Redactor, items: list[Captured]) -> float:
        start = time.process_time()
        for item in items:
            capture_line(item, redactor)
        return (time.process_time() - start) / len(items)

    rows: dict[str, list[float]] = {}
    for gate in (True, False):
        # A fresh redactor per case: its span cache starts cold, as a new worker's does.
        fresh = Redactor(gate=gate)
        fresh.redact_text("warm-up: jane@example.com")  # loads the recognisers
        rows.setdefault("new text, as logged", []).append(timed(fresh, logged))
        fresh = Redactor(gate=gate)
        fresh.redact_text("warm-up: jane@example.com")
        rows.setdefault("new text with PII", []).append(timed(fresh, with_pii))
        rows.setdefault("repeated text (cache)", []).append(timed(fresh, with_pii))
    print(
        f"{len(logged)} distinct BFCL call records, CPU time of one capture worker per record "
        "(us/record, records/s per worker):"
    )
    print(f"  {'':24s} {'gated (default)':>24s} {'every recognizer':>24s} {'speed-up':>9s}")
    for label, (gated, ungated) in rows.items():
        print(
            f"  {label:24s} {gated * 1e6:8.0f} us {1 / gated:8.0f}/s    "
            f"{ungated * 1e6:8.0f} us {1 / ungated:8.0f}/s    {ungated / gated:6.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
