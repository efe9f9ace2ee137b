"""What one speculative step costs next to a plain one, on this machine (issue 17).

Speculation pays when a verify pass of K+1 positions, which must wait for its result before
the next proposal, costs less than the m+1 plain steps it replaces. Plain decoding keeps a
step in flight (mlx-lm's `async_eval` lookahead), so three costs decide it, timed here on one
model with its KV cache at `--context` tokens, at each `--batch` size:

- `lookahead`: a plain step in the steady lookahead (what decoding costs per token);
- `sync`: a plain step that waits for its own result (the lookahead lost);
- `verify`: a pass of K+1 positions that waits for its result, then rewinds K (what a
  speculative step costs before its proposals are made).

Break-even acceptance: a verify emits m+1 tokens, so it pays when m+1 > verify / lookahead.

    python -m bench.verify_cost --batch 1 16 --k 4   # default model: the packaged SmolLM2, float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench.worker_env import run_as_worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="an MLX model dir (default: the packaged SmolLM2 exported to float32)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    run_as_worker("bench.verify_cost")
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    if args.model is None:
        from bench.export_gguf import ensure_exported

        args.model = str(ensure_exported()[1])
    model, _ = load(args.model)

    def filled(b: int) -> list:
        cache = make_prompt_cache(model)
        model(mx.random.randint(0, 1000, (b, args.context)), cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    def lookahead(b: int) -> float:
        cache, y = filled(b), mx.zeros((b, 1), dtype=mx.int32)
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.async_eval(y)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            nxt = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
        return (time.perf_counter() - t0) / args.steps

    def synced(b: int, width: int) -> float:
        cache, x = filled(b), mx.zeros((b, width), dtype=mx.int32)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            mx.argmax(model(x, cache=cache), axis=-1).tolist()
            if width > 1:
                for c in cache:
                    c.trim(width - 1)
        return (time.perf_counter() - t0) / args.steps

    rows = []
    for b in args.batch:
        lookahead(b), synced(b, 1), synced(b, args.k + 1)  # compile every shape once
        times: dict[str, list[float]] = {"lookahead": [], "sync": [], "verify": []}
        for _ in range(args.reps):  # interleaved: the machine's load hits all three alike
            times["lookahead"].append(lookahead(b))
            times["sync"].append(synced(b, 1))
            times["verify"].append(synced(b, args.k + 1))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"batch": b, "k": args.k, "context": args.context,
               **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()},
               "sync_over_lookahead": round(med["sync"] / med["lookahead"], 3),
               "verify_over_lookahead": round(med["verify"] / med["lookahead"], 3),
               "runs_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in times.items()}}
        rows.append(row)
        print(f"batch {b:3d}: lookahead {row['lookahead_ms']:8.2f} ms  sync {row['sync_ms']:8.2f}"
              f" ms ({row['sync_over_lookahead']:.2f}x)  verify K+1={args.k + 1} "
              f"{row['verify_ms']:8.2f} ms ({row['verify_over_lookahead']:.2f}x: pays from "
              f"{max(0.0, row['verify_over_lookahead'] - 1):.2f} accepted a step)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
