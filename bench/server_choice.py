"""Which ASGI server the gateway runs on: uvicorn (uvloop, httptools) vs granian (Rust).

Why: issue 5 asks for the HTTP server and client to be chosen by measurement. granian moves
HTTP parsing and socket I/O into Rust threads, which could leave the Python thread more of
a core on a 2-core machine; whether that helps depends on how much of a call is Python. So
the same two apps run under both servers, in the same run, against the same LLM stand-in
and the same wrk load as ``bench/gateway_bench.py``:

- the bare 20-line aiohttp pass-through (``gateway_bench.PASSTHROUGH``), under uvicorn,
  granian's ASGI interface and granian's native RSGI interface;
- the real gateway (route mode ``llm``, capture and metrics on), under uvicorn (its
  production entry point, ``python -m slm_gateway``) and under granian's ASGI interface
  (the same ``create_app``).

granian is installed with ``pip install --target`` into its own folder
(``$SLM_BENCH_GRANIAN_DIR``, default ``/tmp/slm-bench-granian``) and put on the path of the
granian processes only, so it never becomes a project dependency.

Usage (from the repository root)::

    .venv/bin/python bench/server_choice.py [--duration 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gateway_bench as gb  # noqa: E402
import yaml  # noqa: E402

from slm_e2e import llm_standin  # noqa: E402
from slm_gateway.testing import start_gateway  # noqa: E402

GRANIAN_DIR = Path(os.environ.get("SLM_BENCH_GRANIAN_DIR", "/tmp/slm-bench-granian"))

# What granian imports besides gateway_bench's pass-through (written as passthrough.py).
APPS = r'''
import os, shlex
import aiohttp

UP = os.environ.get("BENCH_UPSTREAM", "")


class Rsgi:
    """The same pass-through on granian's native interface (no ASGI message dicts)."""

    def __rsgi_init__(self, loop):
        self.s = None

    def __rsgi_del__(self, loop):
        pass

    async def __rsgi__(self, scope, proto):
        if self.s is None:
            self.s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
        body = await proto()
        async with self.s.post(UP, data=body, headers={"Content-Type": "application/json"}) as r:
            out = await r.read()
        proto.response_bytes(r.status, [("content-type", "application/json")], out)


rsgi = Rsgi()


def gateway():
    """The real gateway app, configured by the same flags as ``python -m slm_gateway``."""
    from slm_gateway.app import create_app
    from slm_gateway.config import config_from_args
    from slm_gateway.main import tune_gc

    app = create_app(config_from_args(shlex.split(os.environ["BENCH_GATEWAY_ARGS"])))
    tune_gc()  # as under uvicorn
    return app
'''


def ensure_granian(log: Path) -> Path | None:
    """granian in its own --target folder; None when pip cannot get it."""
    if (GRANIAN_DIR / "bin" / "granian").exists():
        return GRANIAN_DIR
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(GRANIAN_DIR), "granian"],
        capture_output=True,
        text=True,
    )
    log.write_text(res.stdout + res.stderr)
    return GRANIAN_DIR if res.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    wrk = gb.ensure_wrk()
    if wrk is None:
        print("wrk is required (apt-get install wrk)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="slm-server-choice-"))
    granian = ensure_granian(work / "granian-install.log")
    if granian is None:
        print(f"granian could not be installed; see {work / 'granian-install.log'}")
        return 1
    (work / "bench_apps.py").write_text(APPS)
    (work / "passthrough.py").write_text(gb.PASSTHROUGH)
    bodies, answers, source = gb.bodies_and_answers(400, work)
    lua = work / "bodies.lua"
    lua.write_text(gb.LUA)
    wrk_env = {"BENCH_BODIES": str(bodies), "BENCH_TOKEN": "bench-token"}
    print(f"workdir {work}\nrequests: {source}", flush=True)

    standin = llm_standin.start(answers=answers, log_path=work / "standin.log")
    upstream = standin.llm_base_url + "/chat/completions"
    routes = work / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {
                "tasks": {
                    gb.TASK: {
                        "mode": "llm",
                        "llmBaseURL": standin.llm_base_url,
                        "llmModel": "gpt-4o",
                    }
                }
            }
        )
    )
    gw_args = ["--routes", str(routes), "--capture", str(work / "calls"), "--log-level", "warning"]
    pythonpath = os.pathsep.join(
        [str(work), *(str(ROOT / r) for r in ("operator", "trainer", "e2e"))]
    )
    env = {**os.environ, "BENCH_UPSTREAM": upstream, "PYTHONPATH": pythonpath}
    genv = {
        **env,
        "PYTHONPATH": os.pathsep.join([pythonpath, str(granian)]),
        "BENCH_GATEWAY_ARGS": shlex.join(gw_args),
    }
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], e: dict[str, str], name: str) -> tuple[str, int]:
        proc = subprocess.Popen(
            cmd,
            env=e,
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=open(work / f"{name}.log", "wb"),  # noqa: SIM115 (closed with the process)
            start_new_session=True,
        )
        procs.append(proc)
        return name, proc.pid

    def granian_cmd(interface: str, target: str, port: int, factory: bool = False) -> list[str]:
        return [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            interface,
            *(["--factory"] if factory else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--workers",
            "1",
            "--no-ws",
            "--log-level",
            "warning",
            target,
        ]

    targets: dict[str, tuple[str, int]] = {}
    try:
        targets["direct (stand-in)"] = (upstream, standin.proc.pid)
        port = gb.free_port()
        spawn([sys.executable, str(work / "passthrough.py"), str(port)], env, "pt-uv")
        targets["pass-through, uvicorn"] = (f"http://127.0.0.1:{port}/", procs[-1].pid)
        for interface, target in (("asgi", "passthrough:app"), ("rsgi", "bench_apps:rsgi")):
            port = gb.free_port()
            spawn(granian_cmd(interface, target, port), genv, f"pt-{interface}")
            targets[f"pass-through, granian {interface}"] = (
                f"http://127.0.0.1:{port}/",
                procs[-1].pid,
            )
        gw = start_gateway(gw_args, log_path=work / "gateway-uvicorn.log")
        targets["gateway, uvicorn (shipped)"] = (gw.url + "/v1/chat/completions", gw.proc.pid)
        port = gb.free_port()
        spawn(granian_cmd("asgi", "bench_apps:gateway", port, factory=True), genv, "gw-granian")
        targets["gateway, granian asgi"] = (
            f"http://127.0.0.1:{port}/v1/chat/completions",
            procs[-1].pid,
        )
        for url, _ in targets.values():
            gb.wait_port("/".join(url.split("/")[:3]), 60)

        rows: dict[str, list[gb.Load]] = {k: [] for k in targets}
        for _ in range(args.rounds):
            for name, (url, pid) in targets.items():  # interleaved: noise hits all alike
                lat = gb.run_wrk(wrk, url, lua, wrk_env, 1, min(5.0, args.duration))
                c0 = gb.tree_cpu_s(pid)
                load = gb.run_wrk(wrk, url, lua, wrk_env, 64, args.duration)
                load.cpu_us = 1e6 * (gb.tree_cpu_s(pid) - c0) / max(1, load.requests)
                load.p50_ms, load.p99_ms = lat.p50_ms, lat.p99_ms
                rows[name].append(load)
        direct = statistics.median(x.rps for x in rows["direct (stand-in)"])
        print(
            f"\n{'target':34s} {'c=1 p50':>8s} {'c=1 p99':>8s} {'c=64 req/s':>11s} "
            f"{'% direct':>9s} {'CPU us/req':>11s} {'errors':>7s}"
        )
        for name, loads in rows.items():
            m = gb.median_load(loads)
            print(
                f"{name:34s} {m.p50_ms:7.2f}ms {m.p99_ms:7.2f}ms {m.rps:11.0f} "
                f"{100 * m.rps / direct:8.1f}% {m.cpu_us:11.0f} {sum(x.errors for x in loads):7d}"
            )
        print(f"\nmedian of {args.rounds} interleaved rounds, wrk 1 thread, {args.duration:g} s")
    finally:
        for proc in procs:
            gb.stop_proc(proc)
        if "gateway, uvicorn (shipped)" in targets:
            gw.stop()
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
