"""One decode step of SmolLM2-135M (float32) at batch 4: base rows vs four different LoRA
adapters in the same batch vs one adapter, interleaved step by step (issue 17, part 2).

Isolates what mixing adapters costs the model call itself (the gather of each row's A and B
and the small batched matmuls), from the scheduling noise of a whole run:

    python -m bench.lora_step --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.worker_env import run_as_worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    run_as_worker("bench.lora_step")
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from bench.export_gguf import ensure_exported
    from bench.spec_lora import make_adapters
    from mlx_gw.worker.engines.adapters import AdapterBank, AdapterModel, AdapterRows

    _, target = ensure_exported()
    model, _ = load(str(target))
    bank = AdapterBank(model)
    slots = [bank.add(f"a{i}", str(d)) for i, d in enumerate(make_adapters(target, 4))]
    wrapped = AdapterModel(model, bank)
    kinds = {"base": [0] * 4, "one adapter": [slots[0]] * 4, "4 adapters": slots}
    caches = {}
    for name, rows in kinds.items():
        kv = [BatchKVCache.merge([c[i] for c in [make_prompt_cache(model) for _ in rows]])
              for i in range(len(model.layers))]
        cache = [*kv, AdapterRows(rows)]
        wrapped(mx.ones((4, args.context), dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in kv])
        caches[name] = cache
    times: dict[str, list[float]] = {k: [] for k in kinds}
    x = mx.ones((4, 1), dtype=mx.int32)
    for _ in range(args.steps):
        for name, cache in caches.items():  # interleaved: each step of each, back to back
            t0 = time.perf_counter()
            mx.eval(wrapped(x, cache=cache))
            times[name].append(time.perf_counter() - t0)
            for c in cache:
                c.trim(1)
    base = statistics.median(times["base"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:12s} median {med * 1e3:7.2f} ms/step  ({med / base:.3f}x base)  "
              f"4-stream decode {4 / med:6.1f} tok/s")


if __name__ == "__main__":
    main()
