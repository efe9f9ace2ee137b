"""Issue 4's cold-start benchmark: a cold request through the gateway vs load + first token
in-process, with and without the warm spare, in one interleaved run.

For each model (`tiny`: a 2-layer random llama from `tests.tiny_models`, whose load costs ~0
so the serving machinery shows; `gguf`: the SmolLM2-135M Q4_1 GGUF, dequantized to float32)
three sides take turns, the order rotating every rep:
  * in-process: a fresh `python -m bench.cold_child` with the workers' BLAS env that imports
    mlx-lm, loads and generates until the first token with text; timed from the parent's
    spawn ("from start") and from just before the load ("from load");
  * gateway + spare: `mlx-gw` with `warm_spare: true`; before each request the script waits
    until the spare is up (the log line "worker process pid N up (spare)"), then sends one
    streaming chat request for the unloaded model (ignore_eos, 4 tokens); TTFT = the first
    chunk with content; then /api/unload;
  * gateway, no spare: the same with `warm_spare: false` (a load starts a new process);
  * in-process, spare imports beside: the in-process side again, with a second process doing
    the warm spare's imports started as the load begins: the gateway refills its spare at
    the moment a load takes it, so on a small CPU the refill competes with the load.
Both gateways run through the whole run (one of each per model). One untimed warm-up per
side first (page cache, lazy imports). The issue's target: overhead (gateway TTFT - in-process
from load) <= 300 ms with the warm spare.

    python -m bench.cold_start --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.gateway_vs_inprocess import OUT_DIR
from bench.gwtools import ConfigGateway, blas_desc, chat, load1, med, smollm2_gguf
from bench.machine import machine, revision
from mlx_gw.gateway.supervision.blas import fast_blas_env

MODEL = "cold"
MESSAGE = "Write one short sentence about the sea."
IN, BESIDE, SPARE, NO_SPARE = ("in-process", "in-process, spare imports beside",
                               "gateway+spare", "gateway, no spare")
SIDES = (IN, BESIDE, SPARE, NO_SPARE)
GATEWAYS = (SPARE, NO_SPARE)
# What a warm spare imports before it says Hello (worker/loop.py's _preimport, and the loop).
SPARE_IMPORTS = "import mlx.core, mlx_lm.generate, mlx_lm.utils, mlx_gw.worker.loop"


def _tiny_model() -> Path:
    from tests.tiny_models import build_tiny_llama

    dest = OUT_DIR / "tiny-cold"
    if not (dest / "config.json").is_file():
        build_tiny_llama(dest)
    return dest


async def in_process(path: Path, dtype: str, env: dict[str, str], beside: bool
                     ) -> dict[str, Any]:
    """One fresh `bench.cold_child`; with `beside`, a process doing the warm spare's imports
    starts as the child begins its load (what the gateway's spare refill does during a load)."""
    load = load1()
    t_spawn = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.cold_child", str(path), dtype, MESSAGE,
        stdout=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    other = None
    lines = []
    while line := (await proc.stdout.readline()).decode():
        lines.append(line)
        if beside and line.startswith("LOADING"):
            other = await asyncio.create_subprocess_exec(sys.executable, "-c", SPARE_IMPORTS,
                                                         env=env)
    if await proc.wait() != 0:
        raise RuntimeError(f"bench.cold_child exited with {proc.returncode}")
    if other is not None:
        await other.wait()
    r = json.loads(lines[-1])
    return {"ttft_s": r["t_first"] - t_spawn, "from_load_s": r["t_first"] - r["t_load"],
            "imports_s": r["t_load"] - t_spawn, "load_s": r["t_loaded"] - r["t_load"],
            "load1": load}


async def through_gateway(gw: ConfigGateway, spare: bool) -> dict[str, Any]:
    waited = await gw.wait_spare() if spare else 0.0
    fresh_before = gw.log_count(f"up ({MODEL})")
    load = load1()
    body = {"model": MODEL, "messages": [{"role": "user", "content": MESSAGE}],
            "max_tokens": 4, "ignore_eos": True, "temperature": 0, "stream": True}
    r = await chat(gw.session, gw.url, body)
    if r.error or r.ttft_s < 0:
        raise RuntimeError(f"cold request failed: {r}")
    ready = [e for e in await gw.events() if e["type"] == "ready" and e["model"] == MODEL][-1]
    await gw.unload(MODEL)
    return {"ttft_s": r.ttft_s, "ready_duration_s": ready["duration_s"], "load1": load,
            "spare_wait_s": waited,
            "new_process": gw.log_count(f"up ({MODEL})") > fresh_before}


def _config(path: Path, dtype: str, spare: bool) -> str:
    return (f"gateway: {{port: 0, warm_spare: {str(spare).lower()}, default_keep_alive: -1}}\n"
            f"models:\n  {MODEL}: {{type: llm, path: {path}, dtype: {dtype}}}\n")


async def bench_model(name: str, path: Path, dtype: str, reps: int) -> dict[str, Any]:
    env = {**os.environ, **fast_blas_env()}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    async with contextlib.AsyncExitStack() as stack:
        gws = {s: await stack.enter_async_context(ConfigGateway.launch(
            _config(path, dtype, s == SPARE), OUT_DIR / f"cold_start-{name}-{i}.log"))
            for i, s in enumerate(GATEWAYS)}
        for rep in range(-1, reps):  # rep -1: the untimed warm-up
            k = rep % len(SIDES)
            for side in SIDES[k:] + SIDES[:k]:
                if side in GATEWAYS:
                    r = await through_gateway(gws[side], side == SPARE)
                else:
                    r = await in_process(path, dtype, env, side == BESIDE)
                r["rep"] = rep
                if rep >= 0:
                    runs[side].append(r)
                print(f"{name} rep {rep} {side:34s} ttft {r['ttft_s'] * 1e3:7.0f} ms  "
                      f"load {r['load1']:.1f}", file=sys.stderr, flush=True)
    return {"model": str(path), "dtype": dtype, "runs": runs, "summary": _summary(runs)}


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in (IN, BESIDE):
        rs = runs[side]
        out[side] = {key + "_ms": med([r[key + "_s"] for r in rs]) * 1e3
                     for key in ("ttft", "from_load", "imports", "load")}
        out[side]["load1"] = med([r["load1"] for r in rs])
    ip = runs[IN]
    for side in GATEWAYS:
        gw = runs[side]
        ttft = [r["ttft_s"] for r in gw]
        out[side] = {
            "ttft_ms": med(ttft) * 1e3, "min_ms": min(ttft) * 1e3, "max_ms": max(ttft) * 1e3,
            "ready_duration_ms": med([r["ready_duration_s"] for r in gw]) * 1e3,
            "overhead_vs_load_ms": med(ttft) * 1e3 - out[IN]["from_load_ms"],
            "overhead_vs_load_paired_ms": med(
                [g["ttft_s"] - i["from_load_s"] for g, i in zip(gw, ip, strict=True)]) * 1e3,
            "overhead_vs_start_ms": med(ttft) * 1e3 - out[IN]["ttft_ms"],
            "new_processes": sum(r["new_process"] for r in gw),
            "load1": med([r["load1"] for r in gw])}
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [f"{res['date']}, {res['machine']['cpu']} ({res['machine']['nproc']} cores), "
             f"load avg {res['load_start']} -> {res['load_end']}, {res['reps']} reps, "
             f"BLAS {res['blas']}", "",
             "| model | side | TTFT p50 | min-max or parts | overhead vs in-process from load "
             "(p50 / paired) | vs in-process from start | gateway `ready` duration | "
             "new worker processes | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in res["models"].items():
        s = m["summary"]
        for side in (IN, BESIDE):
            ip = s[side]
            lines.append(
                f"| {name} | {side} | from start {ip['ttft_ms']:.0f} ms, from load "
                f"{ip['from_load_ms']:.0f} ms | imports {ip['imports_ms']:.0f} ms, load "
                f"{ip['load_ms']:.0f} ms | | | | | {ip['load1']:.1f} |")
        for side in GATEWAYS:
            g = s[side]
            lines.append(
                f"| {name} | {side} | {g['ttft_ms']:.0f} ms | {g['min_ms']:.0f}-"
                f"{g['max_ms']:.0f} ms | **{g['overhead_vs_load_ms']:+.0f} ms** / "
                f"{g['overhead_vs_load_paired_ms']:+.0f} ms | {g['overhead_vs_start_ms']:+.0f} "
                f"ms | {g['ready_duration_ms']:.0f} ms | {g['new_processes']}/{res['reps']} | "
                f"{g['load1']:.1f} |")
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    paths = {"tiny": (_tiny_model(), "auto"), "gguf": (smollm2_gguf(), "float32")}
    t0, load_start = time.perf_counter(), os.getloadavg()
    models = {m: await bench_model(m, *paths[m], args.reps) for m in args.models}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python -m bench.cold_start", *sys.argv[1:]]),
            "machine": machine(), "revision": revision(), "reps": args.reps,
            "blas": blas_desc(),
            "load_start": " / ".join(f"{x:.1f}" for x in load_start),
            "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "models": models, "total_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="timed runs per side and model")
    ap.add_argument("--models", nargs="+", choices=["tiny", "gguf"], default=["tiny", "gguf"])
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/out/...)")
    args = ap.parse_args()
    res = asyncio.run(bench(args))
    out = args.out or OUT_DIR / f"cold_start-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nresults: {out} (total {res['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
