"""Threads on a busy small CPU: the gateway (dtype float32, OpenBLAS) with OPENBLAS_NUM_THREADS
1 vs 2, and llama-cpp-python with --n_threads 1 vs 2, interleaved in one run.

A diagnostic for `bench.vs_llamacpp` (same servers, requests and checks, see there): on a
2-core machine that other processes also use, a thread of a 2-thread GEMM often waits for a
core, and a decode step makes ~200 GEMM calls. Per rep and side: 1 and `--streams`
concurrent requests of `--max-tokens`, aggregate tok/s.

    python -m bench.blas_threads --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.gateway_vs_inprocess import OUT_DIR
from bench.gwtools import ConfigGateway, med, smollm2_gguf
from bench.machine import machine, revision
from bench.vs_llamacpp import LLAMA, LlamaServer, Tokens, _config, streams


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    tokens = Tokens(gguf)
    sides = [f"{name}, {n} thread{'s' * (n > 1)}" for name in ("gateway f32", "llama.cpp")
             for n in (1, 2)]
    runs: dict[str, dict[str, list[float]]] = {s: {"s1": [], "sN": [], "load1": []}
                                               for s in sides}
    t0, load_start = time.perf_counter(), os.getloadavg()
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, Any] = {}
        for side, n in zip(sides, (1, 2, 1, 2), strict=True):
            log = OUT_DIR / f"blas_threads-{n}-{len(servers)}.log"
            servers[side] = await stack.enter_async_context(
                LlamaServer.start(gguf, log, n) if side.startswith("llama") else
                ConfigGateway.launch(_config(gguf, "float32"), log,
                                     {"OPENBLAS_NUM_THREADS": str(n)}))
            await streams(servers[side], LLAMA if "llama" in side else side, tokens, 1, 4)
        for rep in range(args.reps):
            k = rep % len(sides)
            for kind, side in itertools.product(("s1", "sN"), sides[k:] + sides[:k]):
                n = 1 if kind == "s1" else args.streams
                r = await streams(servers[side], LLAMA if "llama" in side else side, tokens, n,
                                  args.max_tokens)
                if r["problems"]:
                    raise RuntimeError(f"{side}: {r['problems']}")
                runs[side][kind].append(r["tok_s"])
                runs[side]["load1"].append(r["load1"])
                print(f"rep {rep} {kind} {side:22s} {r['tok_s']:7.2f} tok/s  load "
                      f"{r['load1']:.1f}", file=sys.stderr, flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python -m bench.blas_threads", *sys.argv[1:]]),
            "machine": machine(), "revision": revision(), "reps": args.reps,
            "max_tokens": args.max_tokens, "streams": args.streams,
            "load_start": " / ".join(f"{x:.1f}" for x in load_start),
            "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "runs": runs, "total_s": time.perf_counter() - t0}


def markdown(res: dict[str, Any]) -> str:
    n = res["streams"]
    lines = [f"{res['date']}, {res['machine']['cpu']} ({res['machine']['nproc']} cores), "
             f"load avg {res['load_start']} -> {res['load_end']}; {res['reps']} reps, "
             f"max_tokens {res['max_tokens']} (medians)", "",
             f"| server | 1 stream tok/s | (each rep) | {n} streams tok/s | (each rep) "
             "| load avg |",
             "|---|---:|---|---:|---|---:|"]
    for side, r in res["runs"].items():
        lines.append(f"| {side} | {med(r['s1']):.1f} | {', '.join(f'{x:.1f}' for x in r['s1'])}"
                     f" | {med(r['sN']):.1f} | {', '.join(f'{x:.1f}' for x in r['sN'])} | "
                     f"{med(r['load1']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/out/...)")
    args = ap.parse_args()
    res = asyncio.run(bench(args))
    out = args.out or OUT_DIR / f"blas_threads-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nresults: {out} (total {res['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
