"""Does an idle process holding the GPU slow the one that decodes? (issue 20's suspect)

The gateway keeps a warm spare (a second worker process, MLX imported) beside the model's
worker, and the benchmark keeps every target's processes alive at once. On a GPU each may hold
a CUDA context. This steps mlx-lm's BatchGenerator directly in this process (as
`bench.inprocess` does) at `--streams` rows, interleaving reps with 0, 1 and 2 idle helper
processes alive beside it:
  * `context`: a process that ran one MLX op on the GPU (it holds a CUDA context), then waits;
  * `spare`: a process that does what the warm spare does before a load (imports MLX and
    mlx-lm, reads its memory as the Hello does), then waits.
Prints ms per decode step for each, and whether nvidia-smi lists each helper (a context).

    python -m bench.gpu_contexts MODEL_DIR --tokens 128 --streams 1 16 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HELPERS = {
    "context": "import mlx.core as mx; mx.eval(mx.ones(4) + 1)",
    "spare": ("import mlx.core as mx; import mlx_lm.generate, mlx_lm.utils; "
              "from mlx_gw.worker.loop import memory_bytes; memory_bytes()"),
}


def _helper(kind: str) -> subprocess.Popen:
    code = HELPERS[kind] + "; print('up', flush=True); import sys; sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc


def _gpu_pids() -> set[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {int(x) for x in out.split() if x.strip().isdigit()}


def _decode(gen, prompt: list[int], rows: int, n: int) -> float:
    """ms per step over a batch of `rows` identical requests, after the first token."""
    uids = gen.insert([prompt] * rows, max_tokens=[n] * rows)
    left, first = set(uids), None
    steps = 0
    while left:
        _, responses = gen.next()
        if first is None and responses:
            first = time.perf_counter()
        else:
            steps += 1
        for r in responses:
            if r.finish_reason is not None:
                left.discard(r.uid)
    return (time.perf_counter() - first) / max(1, steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from bench.make_model import prompt_ids

    model, _ = load(args.model)
    gen = BatchGenerator(model, completion_batch_size=max(args.streams),
                         prefill_batch_size=min(8, max(args.streams)))
    prompt = prompt_ids(args.model, args.prompt_tokens)
    for rows in args.streams:  # warm: compile this batch's kernels before timing
        _decode(gen, prompt, rows, 8)
    setups = [("none", []), ("1 context", ["context"]), ("2 contexts", ["context", "context"]),
              ("1 spare", ["spare"])]
    times: dict[tuple[str, int], list[float]] = {}
    seen: dict[str, bool] = {}
    for _ in range(args.reps):
        for name, kinds in setups:
            helpers = [_helper(k) for k in kinds]
            try:
                on_gpu = _gpu_pids()
                for k, h in zip(kinds, helpers, strict=True):
                    seen[k] = h.pid in on_gpu
                for rows in args.streams:
                    times.setdefault((name, rows), []).append(
                        _decode(gen, prompt, rows, args.tokens))
            finally:
                for h in helpers:
                    h.kill()
                    h.wait()
    print(f"device {mx.default_device()}, {args.tokens} tokens, {args.reps} reps interleaved; "
          "median ms per decode step (all reps):")
    for rows in args.streams:
        base = statistics.median(times[("none", rows)])
        for name, _ in setups:
            v = times[(name, rows)]
            print(f"  {rows:3d} streams, {name:10s} {statistics.median(v):7.3f} ms "
                  f"({statistics.median(v) / base:.3f}x none; " + ", ".join(f"{x:.3f}" for x in v)
                  + ")")
    print("helpers with a CUDA context (nvidia-smi):", seen or "nvidia-smi not available")


if __name__ == "__main__":
    main()
