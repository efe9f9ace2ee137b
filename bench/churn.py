"""Issues 4 and 9: swap churn. Three tiny models behind one gateway that may hold only
`max_loaded_models` of them; `--clients` clients send `--requests` short chat requests in all
(max_tokens 8, ignore_eos), each client cycling through the three models, `--run-length`
requests to one model before it moves to the next. A run length of 1 is closed-loop clients
that never send two requests in a row to one model, so a resident model drains by itself as
soon as another one waits; longer runs keep it busy, which is where grouping and swap-asap
differ.

Four gateways run side by side for the whole run: max_loaded_models 1 and 2, each with the
default grouping (`starvation_timeout: 10s`: a model waiting for room waits until the
resident ones drain, so requests for it pile up and run together) and with swap-asap
(`starvation_timeout: 1ms`). Their runs interleave, the order rotating every rep. Before each
run every model is unloaded and the warm spare is up. Reported per config: requests/s,
p50/p95 latency, swaps (`load` events in /api/events), evictions and errors (must be 0).

    python -m bench.churn --clients 8 --requests 120 --reps 2 --run-lengths 1 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.gateway_vs_inprocess import OUT_DIR
from bench.gwtools import ConfigGateway, chat, load1, med
from bench.machine import machine, revision

MODELS = ("tiny-a", "tiny-b", "tiny-c")
MAX_TOKENS = 8
FRESH = "up (tiny-"  # a load that found no spare spawns a process labelled with the model


def _models() -> list[Path]:
    from tests.tiny_models import build_tiny_models

    root = OUT_DIR / "tiny-churn"
    if all((root / f"tiny-{i}" / "config.json").is_file() for i in range(len(MODELS))):
        return [root / f"tiny-{i}" for i in range(len(MODELS))]
    return build_tiny_models(root, len(MODELS))


def _config(paths: list[Path], max_loaded: int, starvation: str) -> str:
    models = "".join(f"  {n}: {{type: llm, path: {p}}}\n" for n, p in zip(MODELS, paths,
                                                                          strict=True))
    return (f"gateway: {{port: 0, max_loaded_models: {max_loaded}, starvation_timeout: "
            f"{starvation}, default_keep_alive: -1}}\nmodels:\n{models}")


async def one_run(gw: ConfigGateway, clients: int, total: int, run_length: int
                  ) -> dict[str, Any]:
    for name in await gw.loaded():
        await gw.unload(name)
    spare_wait = await gw.wait_spare()
    fresh = gw.log_count(FRESH)
    first_event = max((e["id"] for e in await gw.events()), default=0)
    counter = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []

    async def client(i: int) -> None:
        for k in itertools.count():
            if next(counter) >= total:
                return
            model = MODELS[(i + k // run_length) % len(MODELS)]
            body = {"model": model, "max_tokens": MAX_TOKENS,
                    "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"client {i} request {k}"}]}
            r = await chat(gw.session, gw.url, body)
            latencies.append(r.total_s)
            if r.error or r.completion_tokens != MAX_TOKENS:
                errors.append(r.error or f"{r.completion_tokens} tokens, finish {r.finish}")

    load = load1()
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    events = [e for e in await gw.events() if e["id"] > first_event]
    latencies.sort()
    return {"wall_s": wall, "req_s": total / wall, "p50_s": med(latencies),
            "p95_s": statistics.quantiles(latencies, n=20)[18],
            "swaps": sum(e["type"] in ("load", "restart") for e in events),
            "evictions": sum(e["type"] == "evict" for e in events),
            "loads_without_spare": gw.log_count(FRESH) - fresh,
            "errors": len(errors), "error_samples": errors[:5], "load1": load,
            "spare_wait_s": spare_wait,
            "event_types": sorted({e["type"] for e in events})}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    paths = _models()
    configs = {f"max_loaded {m}, {label}": (m, st) for m in args.max_loaded
               for label, st in (("grouping (10s)", "10s"), ("swap-asap (1ms)", "1ms"))}
    cases = [(c, n) for n in args.run_lengths for c in configs]
    runs: dict[str, list[dict[str, Any]]] = {f"{c}, run {n}": [] for c, n in cases}
    t_start, load_start = time.perf_counter(), os.getloadavg()
    async with contextlib.AsyncExitStack() as stack:
        gws = {c: await stack.enter_async_context(ConfigGateway.launch(
            _config(paths, m, st), OUT_DIR / f"churn-{i}.log"))
            for i, (c, (m, st)) in enumerate(configs.items())}
        for rep in range(args.reps):
            for c, n in cases[rep % len(cases):] + cases[:rep % len(cases)]:
                r = await one_run(gws[c], args.clients, args.requests, n)
                r["rep"] = rep
                runs[f"{c}, run {n}"].append(r)
                print(f"rep {rep} {c:32s} run {n} {r['req_s']:6.2f} req/s  p50 {r['p50_s']:6.2f}s  "
                      f"p95 {r['p95_s']:6.2f}s  swaps {r['swaps']:3d}  errors {r['errors']}  "
                      f"load {r['load1']:.1f}", file=sys.stderr, flush=True)
    summary = {c: {"req_s": med([r["req_s"] for r in rs]),
                   "p50_s": med([r["p50_s"] for r in rs]),
                   "p95_s": med([r["p95_s"] for r in rs]),
                   "swaps": med([r["swaps"] for r in rs]),
                   "without_spare": med([r["loads_without_spare"] for r in rs]),
                   "errors": sum(r["errors"] for r in rs),
                   "load1": med([r["load1"] for r in rs]),
                   "req_s_all": [round(r["req_s"], 2) for r in rs]} for c, rs in runs.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python -m bench.churn", *sys.argv[1:]]),
            "machine": machine(), "revision": revision(), "clients": args.clients,
            "requests": args.requests, "reps": args.reps, "max_tokens": MAX_TOKENS,
            "run_lengths": args.run_lengths,
            "load_start": " / ".join(f"{x:.1f}" for x in load_start),
            "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "runs": runs, "summary": summary, "total_s": time.perf_counter() - t_start}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"{res['date']}, {res['machine']['cpu']} ({res['machine']['nproc']} cores), "
             f"load avg {res['load_start']} -> {res['load_end']}; {res['clients']} clients, "
             f"{res['requests']} requests of {res['max_tokens']} tokens per run, "
             f"{res['reps']} reps (medians); run N = N requests to one model before the next",
             "",
             "| config | requests/s | (each rep) | p50 latency | p95 latency | swaps (`load` "
             "events) | of which found no spare | errors | load avg |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c, s in res["summary"].items():
        lines.append(f"| {c} | {s['req_s']:.2f} | {', '.join(map(str, s['req_s_all']))} | "
                     f"{s['p50_s']:.2f} s | {s['p95_s']:.2f} s | {s['swaps']:.0f} | "
                     f"{s['without_spare']:.0f} | {s['errors']} | {s['load1']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=120, help="requests per run")
    ap.add_argument("--reps", type=int, default=2, help="runs per config")
    ap.add_argument("--max-loaded", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--run-lengths", type=int, nargs="+", default=[1, 4],
                    help="requests a client sends to one model before moving to the next")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/out/...)")
    args = ap.parse_args()
    res = asyncio.run(bench(args))
    out = args.out or OUT_DIR / f"churn-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nresults: {out} (total {res['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
