"""What capture costs per call record, for sizing the gateway's redaction workers.

Why: every answered call is redacted (Presidio recognisers, libphonenumber over several
regions) and written by a capture worker process. ``gateway_bench.py`` replays 200 distinct
requests, so its redactor cache is warm and its capture cost is the floor. Real agent traffic
brings new text in most calls; this measures both, on the same records, in one run:

- **new text**: BFCL calls whose user turns are made unique (a ticket number and an e-mail
  address appended, so each record also has something to redact);
- **repeated text**: the same records again, which the redactor's span cache answers.

The figure is the worker's CPU time per record (``to_record`` + ``redact_record`` + the JSON
line), and from it the records per second one worker sustains on one core. Give the gateway
``--capture-workers`` so that their sum exceeds the task's peak call rate; beyond it records
are dropped and counted (``slm_gateway_capture_dropped_total``), never written unredacted.

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

from slm_gateway.capture import Captured, record_line, to_record  # noqa: E402
from slm_trainer.redact import default_redactor  # noqa: E402


def captured_calls(n: int, work: Path) -> list[Captured]:
    """``n`` BFCL calls as the gateway hands them to capture, each with new user text."""
    log = work / "calls.jsonl"
    bfcl_data.write_call_log(log)
    out: list[Captured] = []
    for i, line in enumerate(log.read_text().splitlines()[:n]):
        rec = orjson.loads(line)
        messages = [dict(m) for m in rec["messages"]]
        for m in messages:
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                m["content"] += f" (ticket {i}, contact agent{i}@example.org)"
        request = orjson.dumps(
            {"model": "bench", "messages": messages, "tools": rec.get("tools") or []}
        )
        response = orjson.dumps({"choices": [{"message": rec["response"]}]})
        out.append(
            Captured(
                "bench/t", "t", "gpt", "llm", request, response, 1.0, 10, 5, time.time(), "", ""
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--work", type=Path, default=Path("/tmp/slm-bench-capture"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    items = captured_calls(args.records, args.work)
    redactor = default_redactor()
    redactor.redact_text("warm-up: jane@example.com")  # loads the recognisers, as a worker does

    def timed() -> float:
        start = time.process_time()
        for item in items:
            record, _ = redactor.redact_record(to_record(item))
            record_line(record)
        return (time.process_time() - start) / len(items)

    new = timed()  # first pass: every user text is new to the cache
    repeated = timed()  # second pass: the same texts again
    print(f"{len(items)} BFCL call records, CPU time of one capture worker per record:")
    for label, cost in (("new text", new), ("repeated text (cache)", repeated)):
        print(f"  {label:24s} {cost * 1e6:8.0f} us/record  {1 / cost:8.0f} records/s per worker")
    print(f"  new / repeated          {new / repeated:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
