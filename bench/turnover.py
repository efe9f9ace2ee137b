"""What a request's admission costs the worker loop while a batch decodes (issue 20).

On the H200 the worker loop spent 10-70 ms per step in `_drain` while a wave of requests turned
over at 64-128 streams (MLX_GW_STEP_STATS), although `LLMEngine.submit` takes ~0.15 ms on the
CPU. This keeps `--streams` requests decoding in one `LLMEngine` and, each time some finish,
submits as many new ones between steps, as the loop does, timing each submit and profiling them.

    python -m bench.turnover MODEL_DIR --streams 64 --tokens 32 --waves 4
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

from mlx_gw.worker import protocol as p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--logit-bias", action="store_true", help="as the benchmark sends (ban EOS)")
    args = ap.parse_args()

    import mlx.core as mx

    from bench.make_model import prompt_ids
    from mlx_gw.worker.engines.llm import LLMEngine

    engine = LLMEngine.from_load(p.Load(name="m", type="llm", path=args.model,
                                        max_batch=args.streams))
    base = prompt_ids(args.model, args.prompt_tokens)
    rid = 0
    bias = {int(engine._eos and next(iter(engine._eos))): -100.0} if args.logit_bias else {}

    def submit() -> float:
        nonlocal rid
        rid += 1
        prompt = [*base[:-4], *(t % 200 + 10 for t in (rid, rid * 7, rid * 13, rid * 31))]
        t0 = time.perf_counter()
        engine.submit(p.Generate(rid=rid, prompt=prompt, max_tokens=args.tokens,
                                 temperature=0.0, ignore_eos=True, logit_bias=bias))
        return time.perf_counter() - t0

    for _ in range(args.streams):
        submit()
    prof = cProfile.Profile()
    costs: list[float] = []
    steps: list[float] = []
    waves = 0
    while waves <= args.waves:
        t0 = time.perf_counter()
        deltas = engine.step()
        steps.append(time.perf_counter() - t0)
        done = sum(1 for d in deltas if d.finish_reason)
        if done:
            waves += 1
            if waves <= args.waves:
                prof.enable()
                costs += [submit() for _ in range(done)]
                prof.disable()
    while engine.busy:
        engine.step()
    costs_ms = sorted(c * 1e3 for c in costs)
    print(f"device {mx.default_device()}, {args.streams} streams, {len(costs)} submits "
          f"between steps: p50 {statistics.median(costs_ms):.3f} ms, max {costs_ms[-1]:.3f} ms, "
          f"total {sum(costs_ms):.1f} ms; step p50 {statistics.median(steps) * 1e3:.2f} ms")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


if __name__ == "__main__":
    main()
