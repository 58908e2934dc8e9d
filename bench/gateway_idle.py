"""What an idle gateway costs: CPU per second with no traffic, with capture on and off.

Why: a fleet runs a gateway replica per node or per team, and most of them are idle most of
the time. Whatever a replica does without traffic (timers, pollers, helper threads waking up)
is paid on every node, every second, and shows up in CPU requests and autoscaling. Capture's
feeding thread used to poll its queue every 2 ms, which cost an idle replica 4 % of a core.

What runs (on 127.0.0.1): two gateways from a routes file, one with capture (its redaction
worker included) and one without, as the baseline in the same run. After a warm-up (the
capture worker loads its redactor) each is left idle, and the CPU time of its processes is
read from ``/proc`` over ``--seconds``, split into the event loop, other threads and child
processes.

Usage (from the repository root)::

    .venv/bin/python bench/gateway_idle.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
for _root in ("operator", "trainer", "e2e", "bench"):
    sys.path.insert(0, str(ROOT / _root))

from gateway_bench import cpu_parts_s  # noqa: E402

from slm_gateway.testing import start_gateway  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="idle time measured")
    ap.add_argument("--warmup", type=float, default=5.0, help="idle time before measuring")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="gateway-idle-"))
    routes = work / "routes.yaml"
    # The LLM is never called: nothing is sent to the gateways.
    routes.write_text(
        yaml.safe_dump(
            {
                "tasks": {
                    "t": {"mode": "llm", "llmBaseURL": "http://127.0.0.1:9/v1", "llmModel": "m"}
                }
            }
        )
    )
    base = ["--routes", str(routes), "--log-level", "warning"]
    gateways = {
        "gateway, capture on": start_gateway(
            [*base, "--capture", str(work / "calls")], log_path=work / "capture.log"
        ),
        "gateway, capture off (baseline)": start_gateway(base, log_path=work / "plain.log"),
    }
    try:
        time.sleep(args.warmup)
        before = {name: cpu_parts_s(gw.proc.pid) for name, gw in gateways.items()}
        time.sleep(args.seconds)
        after = {name: cpu_parts_s(gw.proc.pid) for name, gw in gateways.items()}
    finally:
        for gw in gateways.values():
            gw.stop()
    print(f"idle for {args.seconds:g} s after {args.warmup:g} s of warm-up; % of one core:")
    print(f"{'target':<34} {'total':>7}   parts")
    for name in gateways:
        parts = {
            k: (v - before[name].get(k, 0.0)) / args.seconds * 100 for k, v in after[name].items()
        }
        split = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(f"{name:<34} {sum(parts.values()):6.2f}%   {split}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
