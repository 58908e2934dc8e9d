"""What agent authentication costs the gateway per call, beside the same gateway without it.

Why: ``--agent-auth serviceaccount`` puts a token check on every agent call. A TokenReview is a
round trip to the API server, so the gateway caches each token's review; this measures what a
call then costs (cache hit: a SHA-256 of the token and a dict lookup), what a new token's
first call costs (one TokenReview), and how many reviews a steady load makes.

What runs (all on 127.0.0.1): the local control plane (``slm_e2e.cluster``: etcd,
kube-apiserver; it mints and reviews the tokens), the LLM stand-in answering BFCL
``live_multiple`` requests, and two gateways on the same routes file and upstream: one with
``--agent-auth none`` (the baseline) and one with ``--agent-auth serviceaccount``. The load
(wrk, or a Python closed loop without it) sends every call with the same ServiceAccount token
to both, in interleaved rounds; the figures are medians over the rounds. CPU per request is
read from /proc around each run (threads and children included): on a shared machine it moves
much less than req/s.

Usage (from the repository root)::

    .venv/bin/python bench/agent_auth_cost.py [--duration 8] [--rounds 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _root in ("operator", "trainer", "e2e", "bench"):
    sys.path.insert(0, str(ROOT / _root))

import yaml  # noqa: E402
from gateway_bench import (  # noqa: E402
    LUA,
    TASK,
    Load,
    _aio_load,
    bodies_and_answers,
    ensure_wrk,
    run_wrk,
    tree_cpu_s,
)

from slm_e2e import llm_standin  # noqa: E402
from slm_e2e.cluster import LocalCluster  # noqa: E402
from slm_gateway.testing import GatewayProcess, start_gateway  # noqa: E402

AUDIENCE = "slm-fleet-gateway"


def token(cluster: LocalCluster, sa: str) -> str:
    out = cluster.kubectl(
        "create", "token", sa, "-n", "bench", f"--audience={AUDIENCE}", "--duration=1h"
    )
    return str(out.stdout).strip()


def first_call_ms(gw: GatewayProcess, tok: str, body: bytes) -> float:
    req = urllib.request.Request(
        gw.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {tok}"},
    )
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        assert r.status == 200
    return (time.perf_counter() - t) * 1000


def reviews(gw: GatewayProcess) -> float:
    text = gw.get("/metrics")[1].decode()
    return sum(
        float(v)
        for v in re.findall(r"^slm_gateway_token_reviews_total\{[^}]*\} (\S+)$", text, re.M)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per gateway")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--fresh-tokens", type=int, default=10, help="first calls of new tokens")
    ap.add_argument("--python-load", action="store_true", help="aiohttp generator, not wrk")
    args = ap.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="agent-auth-bench-"))
    bodies_path, answers, source = bodies_and_answers(200, workdir)
    bodies = bodies_path.read_bytes().splitlines()
    wrk = None if args.python_load else ensure_wrk()
    lua = workdir / "bodies.lua"
    lua.write_text(LUA)
    print(f"workdir {workdir}\nrequests: {source}", flush=True)
    print(
        f"load: {'wrk' if wrk else 'Python closed loop'}, {args.concurrency} connections, "
        f"{args.rounds} x {args.duration:g} s per gateway, interleaved",
        flush=True,
    )

    cluster = LocalCluster(workdir / "cluster", gpu_nodes=0, cpu_nodes=1)
    standin = None
    gateways: dict[str, GatewayProcess] = {}
    try:
        cluster.up()
        cluster.kubectl("create", "namespace", "bench")
        cluster.kubectl("create", "serviceaccount", "agent", "-n", "bench")
        tok = token(cluster, "agent")
        standin = llm_standin.start(answers=answers, log_path=workdir / "standin.log")
        routes = workdir / "routes.yaml"
        routes.write_text(
            yaml.safe_dump(
                {"tasks": {TASK: {"llmBaseURL": standin.llm_base_url, "llmModel": "gpt-4o"}}}
            )
        )
        common = ["--routes", str(routes), "--kubeconfig", str(cluster.kubeconfig)]
        for mode in ("none", "serviceaccount"):
            gateways[mode] = start_gateway(
                [*common, "--agent-auth", mode], log_path=workdir / f"gateway-{mode}.log"
            )

        def load(gw: GatewayProcess) -> Load:
            before = tree_cpu_s(gw.proc.pid)
            if wrk:
                env = {"BENCH_BODIES": str(bodies_path), "BENCH_TOKEN": tok}
                result = run_wrk(
                    wrk, gw.url + "/v1/chat/completions", lua, env, args.concurrency, args.duration
                )
            else:
                result = asyncio.run(
                    _aio_load(
                        gw.url + "/v1/chat/completions",
                        bodies,
                        tok,
                        args.concurrency,
                        args.duration,
                    )
                )
            if result.requests:
                result.cpu_us = (tree_cpu_s(gw.proc.pid) - before) / result.requests * 1e6
            return result

        for gw in gateways.values():  # warm up: connections, the token's one review
            first_call_ms(gw, tok, bodies[0])
        runs: dict[str, list[Load]] = {m: [] for m in gateways}
        for _ in range(args.rounds):
            for mode, gw in gateways.items():
                runs[mode].append(load(gw))
        reviews_under_load = reviews(gateways["serviceaccount"])

        # New tokens: each first call waits for one TokenReview; the second is a cache hit.
        cold, warm = [], []
        for i in range(args.fresh_tokens):
            cluster.kubectl("create", "serviceaccount", f"agent-{i}", "-n", "bench")
            fresh = token(cluster, f"agent-{i}")
            cold.append(first_call_ms(gateways["serviceaccount"], fresh, bodies[i]))
            warm.append(first_call_ms(gateways["serviceaccount"], fresh, bodies[i]))
        baseline_calls = [
            first_call_ms(gateways["none"], tok, bodies[i]) for i in range(args.fresh_tokens)
        ]
    finally:
        for gw in gateways.values():
            gw.stop()
        if standin is not None:
            standin.stop()
        cluster.down(quiet=True)

    def med(mode: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs[mode])

    print("\ngateway                          req/s    p50 ms   p99 ms   CPU us/req   errors")
    for mode in runs:
        errors = sum(r.errors for r in runs[mode])
        print(
            f"--agent-auth {mode:<18} {med(mode, 'rps'):9.0f} {med(mode, 'p50_ms'):9.2f} "
            f"{med(mode, 'p99_ms'):8.2f} {med(mode, 'cpu_us'):12.0f} {errors:8d}"
        )
    ratio_cpu = med("serviceaccount", "cpu_us") / med("none", "cpu_us")
    ratio_rps = med("serviceaccount", "rps") / med("none", "rps")
    requests = sum(r.requests for r in runs["serviceaccount"])
    print(f"\nwith auth / without: CPU per request x{ratio_cpu:.3f}, req/s x{ratio_rps:.3f}")
    print(
        f"TokenReviews for {requests} authenticated calls with one token: "
        f"{reviews_under_load:.0f} (one per token and cache period, 60 s)"
    )
    print(
        f"a new token's first call: median {statistics.median(cold):.1f} ms (one TokenReview); "
        f"its second: {statistics.median(warm):.1f} ms; "
        f"a call without auth: {statistics.median(baseline_calls):.1f} ms"
    )
    (workdir / "results.json").write_text(
        json.dumps(
            {
                "runs": {m: [r.__dict__ for r in rs] for m, rs in runs.items()},
                "cpu_ratio": ratio_cpu,
                "rps_ratio": ratio_rps,
                "first_call_ms": cold,
                "second_call_ms": warm,
                "no_auth_call_ms": baseline_calls,
                "reviews_under_load": reviews_under_load,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
