"""A LoRA fine-tuning job on real SmolLM2-135M (float32): through the gateway vs mlx-lm's own
`trainer.train` in-process, same data and settings, side by side in one run (issue 17, part 3).

The gateway runs the job in its own worker (POST /api/train, events read from the SSE stream);
the in-process run calls `mlx_lm.tuner.trainer.train` with the same model, rows, seed and
LoRA settings. Both report mlx-lm's figures (iterations/s and tokens/s over the iterations,
peak MLX memory), and the gateway's wall time from POST to a servable adapter (worker start,
base load, training, save, registration) beside the training time itself.

    python -m bench.train --iters 30 --batch-size 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.worker_env import run_as_worker

QUESTIONS = ["Where is the town?", "Who goes out every morning?", "What do the children do?",
             "What is sold at the market?", "Who came to town one day?", "What did he wear?",
             "What did he carry?", "Where did he stay?"]
ANSWERS = ["By the sea, where the boats go out at dawn.", "The fishermen, in their boats.",
           "They play on the beach all day.", "Bread, cheese and apples, in the square.",
           "A stranger nobody had seen before.", "A long grey coat, even in summer.",
           "A wooden box under his arm.", "At the inn, for the whole summer."]


def rows(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": QUESTIONS[i % 8]},
                          {"role": "assistant", "content": ANSWERS[i % 8]}]} for i in range(n)]


def in_process(model_dir: Path, data: list[dict[str, Any]], args: argparse.Namespace
               ) -> dict[str, Any]:
    """mlx-lm's own loop: trainer.train with a callback collecting its reports."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    reports: list[dict[str, Any]] = []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            reports.append(info)

    mx.random.seed(0)
    np.random.seed(0)
    model, tok = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, 16, {"rank": args.rank, "scale": 20.0, "dropout": 0.0})
    ds = CacheDataset(create_dataset(data, tok, argparse.Namespace(mask_prompt=False)))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's progress display
            train(model, optim.Adam(learning_rate=args.learning_rate), ds, None,
                  TrainingArgs(batch_size=args.batch_size, iters=args.iters,
                               steps_per_report=args.steps_per_report, steps_per_save=10**9,
                               adapter_file=str(Path(out) / "adapters.safetensors")),
                  training_callback=Collect())
        seconds = time.perf_counter() - t0
    return {"reports": reports, "seconds": seconds, "peak_bytes": int(mx.get_peak_memory())}


async def through_gateway(model_dir: Path, data: list[dict[str, Any]],
                          args: argparse.Namespace, log: Path) -> dict[str, Any]:
    from bench.client import sse_events
    from bench.gateway_vs_inprocess import Gateway

    config = ("gateway: {port: 0}\n"
              f"models:\n  smollm2: {{type: llm, path: {model_dir}, dtype: float32}}\n")
    async with Gateway.launch(config, log) as gw:
        body = {"base": "smollm2", "data": data, "adapter_name": "town", "iters": args.iters,
                "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "rank": args.rank, "steps_per_report": args.steps_per_report}
        t0 = time.perf_counter()
        async with gw.session.post(gw.url + "/api/train", json=body) as r:
            job = await r.json()
            assert r.status == 200, job
        events: list[dict[str, Any]] = []
        ps_memory = 0
        async with gw.session.get(f"{gw.url}/api/train/{job['id']}/events") as r:
            async for e in sse_events(r):
                events.append({**e, "at": time.perf_counter() - t0})
                if e["type"] == "progress" and not ps_memory:
                    async with gw.session.get(gw.url + "/api/ps") as p:
                        ps_memory = next(m["memory_bytes"] for m in (await p.json())["models"]
                                         if m["name"] == job["id"])
        wall = time.perf_counter() - t0
        async with gw.session.get(f"{gw.url}/api/train/{job['id']}") as r:
            final = await r.json()
    return {"events": events, "wall": wall, "job": final, "ps_memory": ps_memory}


def _summary(reports: list[dict[str, Any]], loss: str, its: str, toks: str) -> dict[str, Any]:
    later = reports[1:] or reports  # the first report carries the step's compilation
    return {"first_loss": reports[0][loss], "last_loss": reports[-1][loss],
            "it_s": statistics.median(r[its] for r in later),
            "tok_s": statistics.median(r[toks] for r in later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--steps-per-report", type=int, default=5)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    run_as_worker("bench.train")
    from bench.export_gguf import ensure_exported

    _, model_dir = ensure_exported()
    data = rows(args.rows)
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    print(f"SmolLM2-135M float32, LoRA rank {args.rank} on 16 layers, batch {args.batch_size}, "
          f"{args.iters} iterations, {args.rows} chat rows; LD_PRELOAD="
          f"{os.environ.get('LD_PRELOAD', 'none')}; the two alternate, {args.rounds} rounds")
    print(f"{'':<24}{'it/s':>8}{'tok/s':>9}{'loss first->last':>20}{'peak MiB':>10}"
          f"{'load avg':>10}")
    runs: dict[str, list[dict[str, Any]]] = {"gateway job": [], "mlx-lm trainer.train": []}
    order = ["gateway job", "mlx-lm trainer.train"]
    for rnd in range(args.rounds):
        for name in order if rnd % 2 == 0 else order[::-1]:
            if name == "gateway job":
                gw = asyncio.run(through_gateway(model_dir, data, args,
                                                 out / f"gateway-{rnd}.log"))
                progress = [e for e in gw["events"] if e["type"] == "progress"]
                s = _summary(progress, "loss", "iterations_per_second", "tokens_per_second")
                at = {e["type"]: e["at"] for e in gw["events"]}
                s.update(peak=gw["job"]["peak_memory_bytes"], wall=at["done"],
                         training=at["training"], saving=at["saving"],
                         ps=gw["ps_memory"], estimate=gw["job"]["estimate_bytes"])
            else:
                ref = in_process(model_dir, data, args)
                s = _summary(ref["reports"], "train_loss", "iterations_per_second",
                             "tokens_per_second")
                s.update(peak=ref["peak_bytes"], wall=ref["seconds"])
            s["load"] = os.getloadavg()[0]
            runs[name].append(s)
            print(f"{name:<24}{s['it_s']:>8.2f}{s['tok_s']:>9.0f}{s['first_loss']:>11.3f} ->"
                  f"{s['last_loss']:>6.3f}{s['peak'] / 2**20:>10.0f}{s['load']:>10.2f}",
                  flush=True)
    g, r = runs["gateway job"], runs["mlx-lm trainer.train"]
    ratio = statistics.median(x["it_s"] for x in g) / statistics.median(x["it_s"] for x in r)
    print(f"gateway/in-process it/s (medians over rounds): {ratio:.2f}x")
    for s in g:
        print(f"gateway job: POST -> training {s['training']:.1f}s, -> saving {s['saving']:.1f}s"
              f", -> done (adapter servable) {s['wall']:.1f}s; worker RSS in /api/ps while "
              f"training {s['ps'] / 2**20:.0f} MiB (admission estimate "
              f"{s['estimate'] / 2**20:.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
