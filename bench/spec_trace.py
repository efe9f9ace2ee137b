"""Per-step wall times of the worker's engine with speculation on: verify steps vs plain ones.

One stream (or `--streams`), the `repetitive` workload of bench.spec_lora, `--runs` times on
one loaded engine (the first compiles); each `SpeculativeBatch.next()` call is timed and
sorted by what it did (a verify, or a plain step), so a slow speculative path shows where its
time goes.

    python -m bench.spec_trace --target /root/m1b --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.worker_env import run_as_worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="model dir (default: packaged SmolLM2 f32)")
    ap.add_argument("--method", default="ngram")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    run_as_worker("bench.spec_trace")
    from bench.spec_lora import REPETITIVE
    from mlx_gw.worker.engines import speculative
    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.protocol import Generate, Load

    if args.target is None:
        from bench.export_gguf import ensure_exported

        args.target = str(ensure_exported()[1])
    calls: list[tuple[str, float]] = []
    plain_next = speculative.SpeculativeBatch.next

    def timed(self: speculative.SpeculativeBatch) -> list:
        proposed, t0 = self.gate.proposed, time.perf_counter()
        out = plain_next(self)
        kind = "verify" if self.gate.proposed != proposed else "plain"
        calls.append((kind, time.perf_counter() - t0))
        return out

    speculative.SpeculativeBatch.next = timed  # type: ignore[method-assign]
    engine = LLMEngine.from_load(Load(name="t", type="llm", path=args.target, max_batch=16,
                                      prompt_cache_bytes=0, speculative=args.method,
                                      spec_tokens=args.k))
    for run in range(args.runs):
        calls.clear()
        for i in range(args.streams):
            engine.submit(Generate(rid=i + 1, prompt=REPETITIVE[i % len(REPETITIVE)],
                                   max_tokens=args.tokens, ignore_eos=True, temperature=0.0))
        t0 = time.perf_counter()
        while engine.busy:
            engine.step()
        wall = time.perf_counter() - t0
        line = [f"run {run}: {wall * 1e3:7.1f} ms"]
        for kind in ("plain", "verify"):
            ts = [t * 1e3 for k, t in calls if k == kind]
            if ts:
                line.append(f"{kind} {len(ts):3d} calls, sum {sum(ts):7.1f} ms, median "
                            f"{statistics.median(ts):6.2f}, max {max(ts):7.2f}")
        print("  ".join(line), flush=True)
        print("   sequence:", " ".join(f"{k[0]}{t * 1e3:.1f}" for k, t in calls[:60]), flush=True)
    engine.close()


if __name__ == "__main__":
    main()
