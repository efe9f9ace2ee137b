"""Where a single stream's time per token goes in the worker, without HTTP or sockets.

In one process, on one model, interleaved `--reps` times, one request of `--tokens` new tokens:
  * raw: mlx-lm's BatchGenerator stepped directly (as `bench.inprocess` does);
  * engine: the worker's `LLMEngine` (the same generator, plus per-token detokenizing, stop
    strings, deltas);
  * engine+frame: that, plus encoding each step's `Outputs` frame as the loop does.
Prints ms per token of each and the differences. On a GPU, where a small model's decode step is
bound by Python and kernel launches rather than by the GPU, the per-token work of the worker adds
to the step; this says how much.

    python -m bench.engine_overhead MODEL_DIR --tokens 256 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlx_gw.worker import protocol as p


def _raw(gen, prompt: list[int], n: int) -> float:
    (uid,) = gen.insert([prompt], max_tokens=[n], samplers=[None])
    first = None
    while True:
        _, responses = gen.next()
        for r in responses:
            if first is None:
                first = time.perf_counter()
            if r.finish_reason is not None:
                return (time.perf_counter() - first) / (n - 1)


def _engine(engine, prompt: list[int], n: int, rid: int, frame: bool) -> float:
    engine.submit(p.Generate(rid=rid, prompt=prompt, max_tokens=n, temperature=0.0,
                             ignore_eos=True))
    first = None
    while engine.busy:
        deltas = engine.step()
        if deltas and frame:
            p.encode(p.Outputs(items=deltas))
        for d in deltas:
            if first is None and d.completion_tokens:
                first = time.perf_counter()
    return (time.perf_counter() - first) / (n - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory-limit-gb", type=float, default=0,
                    help="mx.set_memory_limit first, as the worker does with its ceiling")
    args = ap.parse_args()

    import mlx.core as mx

    if args.memory_limit_gb:
        mx.set_memory_limit(int(args.memory_limit_gb * 2**30))

    from bench.make_model import prompt_ids
    from mlx_gw.worker.engines.llm import LLMEngine

    engine = LLMEngine.from_load(p.Load(name="m", type="llm", path=args.model, max_batch=1))
    gen = engine._gen  # the same generator, stepped without the engine around it
    prompt = prompt_ids(args.model, args.prompt_tokens)
    times: dict[str, list[float]] = {"raw": [], "engine": [], "engine+frame": []}
    rid = 0
    for rep in range(args.reps + 1):  # rep 0 warms up (a GPU compiles its kernels)
        for side in ("raw", "engine", "engine+frame"):
            rid += 1
            if side == "raw":
                t = _raw(gen, prompt, args.tokens)
            else:
                t = _engine(engine, prompt, args.tokens, rid, side == "engine+frame")
            if rep:
                times[side].append(t * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {mx.default_device()}, {args.tokens} tokens, {args.reps} reps "
          "(median ms per token after the first):")
    for k, v in med.items():
        print(f"  {k:13s} {v:7.3f} ms/token  ({v - med['raw']:+.3f} vs raw; all: "
              + ", ".join(f"{x:.3f}" for x in times[k]) + ")")


if __name__ == "__main__":
    main()
