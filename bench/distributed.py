"""Issue 18: one model served by 1 rank vs 2 ranks (mlx.distributed, ring), side by side.

One gateway, the same random-weight model configured twice: `one` (a plain worker) and `two`
(`distributed: {ranks: 2, backend: ring}`). The model has SmolLM2-135M's shapes except 8 query
/ 4 key-value heads (135M's 9/3 do not split over 2 ranks). For each stream count, reps
alternate one/two; each rep sends that many concurrent non-streamed completions of
`--max-tokens` greedy tokens (ignore_eos) and reports aggregate completion tok/s. Also checks
that both answer the same text.

    python -m bench.distributed [--streams 1 8] [--max-tokens 64] [--reps 3] [--ranks 2]
                                [--layers 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench import make_model
from tests.conftest import GatewayProc

SHAPE = "smollm2-135m-8h"
make_model.SHAPES.setdefault(SHAPE, {"num_attention_heads": 8, "num_key_value_heads": 4})


def run(url: str, model: str, streams: int, max_tokens: int) -> tuple[float, list[str]]:
    def one(i: int) -> tuple[int, str]:
        r = httpx.post(url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": f"number {i} is the one that", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["text"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        out = list(pool.map(one, range(streams)))
    return sum(n for n, _ in out) / (time.perf_counter() - t0), [t for _, t in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.distributed")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="fewer than 135M's 30: a quicker run")
    args = ap.parse_args(argv)
    make_model.SHAPES[SHAPE]["num_hidden_layers"] = args.layers
    root = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    model = make_model.build(root / "model", shape=SHAPE)
    config = {"gateway": {"port": 0}, "models": {
        "one": {"type": "llm", "path": str(model)},
        "two": {"type": "llm", "path": str(model),
                "distributed": {"ranks": args.ranks, "backend": "ring"}}}}
    gw = GatewayProc(config, root / "gw")
    try:
        for m in ("one", "two"):  # load and warm both
            run(gw.url, m, 1, 4)
        print(f"{'streams':>7} {'1 rank tok/s':>14} {f'{args.ranks} ranks tok/s':>15} {'ratio':>6}")
        for streams in args.streams:
            tps: dict[str, list[float]] = {"one": [], "two": []}
            texts: dict[str, list[str]] = {}
            for _ in range(args.reps):
                for m in ("one", "two"):
                    rate, texts[m] = run(gw.url, m, streams, args.max_tokens)
                    tps[m].append(rate)
            a, b = statistics.median(tps["one"]), statistics.median(tps["two"])
            same = "same text" if texts["one"] == texts["two"] else "TEXT DIFFERS"
            print(f"{streams:>7} {a:>14.1f} {b:>15.1f} {b / a:>6.2f}  ({same}; "
                  f"reps one {[round(x, 1) for x in tps['one']]}, "
                  f"two {[round(x, 1) for x in tps['two']]})", flush=True)
        ps = httpx.get(gw.url + "/api/ps").json()["models"]
        for m in ps:
            ranks = m.get("ranks") or [{"rank": 0, "memory_bytes": m["memory_bytes"]}]
            print(f"{m['name']}: " + ", ".join(
                f"rank {r['rank']} {r['memory_bytes'] / 2**20:.0f} MiB" for r in ranks))
    finally:
        gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
