"""Warm-up at load: the LLM engine runs its batch shapes once before the worker says Ready.

On a GPU backend the first step of each new shape compiles kernels: on an H200 (MLX CUDA) the
first request after a load took 81 s, and a batch size first seen mid-run stalls every stream
in it. So the worker runs, before Ready (the gateway shows the model as `warming`):
  * prefill batches of 1, 2, 4 .. prefill_batch sequences, each at a short, an unaligned and
    a full-chunk prompt; then one batch of unequal prompts, one longer than a chunk;
  * decode batches of 1, 2, 4 .. max_batch sequences.
Measured on a fresh H200 (MLX CUDA 0.32.4, 1B shapes): compiling happened in the first steps
of each prompt shape (up to ~60 s each), never for a new decode batch size once one had run.
Nothing of it reaches the prompt cache or the counters. Modes (models.yaml `warmup`):
`off`; `minimal`: one two-token generation (lazy initialisation only); `full`: the shapes;
`auto`: `full` on a GPU (CUDA, Metal), `minimal` on the CPU, where nothing is compiled.
MLX keeps the compiled CUDA kernels on disk (MLX_PTX_CACHE_DIR, by default
/tmp/mlx/VERSION/ptx), so a restarted worker on the same machine warms up much faster.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlx.core as mx
from mlx_lm.generate import StopSequences

log = logging.getLogger("mlxgw.worker")

MODES = ("auto", "off", "minimal", "full")
SHORT_PROMPT_TOKENS = 17  # 16 prefilled, the last one starts decoding
UNALIGNED_PROMPT_TOKENS = 100  # a length no kernel tile divides (H200: its own kernels)
_NO_STOP = StopSequences(None)  # warm-up sequences never stop early on an EOS


def resolve(mode: str) -> str:
    """`auto` as the device decides: `full` on a GPU, `minimal` on the CPU."""
    if mode == "auto":
        return "full" if mx.default_device() == mx.gpu else "minimal"
    return mode


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    """n token ids in range, different per sequence (so no two prompts are equal)."""
    span = max(1, min(vocab or 256, 4096) - 2)
    return [1 + (seed * 7919 + i * 104729) % span for i in range(n)]


SLOW_STEP_S = 0.5  # a warm-up step this long compiled something: logged with its batch


def _sizes(most: int) -> list[int]:
    """1, 2, 4 .. up to `most`, and `most` itself."""
    out = [1 << i for i in range(most.bit_length()) if 1 << i < most]
    return [*out, most]


def _run(engine: Any, prompts: list[list[int]], max_tokens: int, slow: list[str]) -> int:
    """Insert `prompts` together and step until every one has finished; returns the steps
    taken. Steps over SLOW_STEP_S go into `slow`."""
    gen = engine.batch_generator
    n = len(prompts)
    live = set(gen.insert(prompts, max_tokens=[max_tokens] * n, samplers=[None] * n,
                          stop_sequences=[_NO_STOP] * n,
                          caches=[engine.new_cache() for _ in prompts]))
    steps = 0
    while live:
        t0 = time.perf_counter()
        _, responses = gen.next()
        if (took := time.perf_counter() - t0) > SLOW_STEP_S:
            slow.append(f"{len(live)} live, {len(prompts[0])}-token prompts: {took:.1f}s")
        steps += 1
        for r in responses:
            if r.finish_reason is not None:
                live.discard(r.uid)
    return steps


def warm_up(engine: Any, mode: str, name: str = "") -> dict[str, Any]:
    """Run the shapes `mode` asks for; returns what was done (logged too)."""
    mode = resolve(mode)
    if mode == "off":
        return {"mode": mode, "seconds": 0.0, "steps": 0}
    t0 = time.perf_counter()
    vocab = engine.vocab_size
    slow: list[str] = []
    steps = _run(engine, [_prompt(2, 0, vocab)], 2, slow)
    first = time.perf_counter() - t0
    if mode == "full":
        gen = engine.batch_generator
        most = engine.context_length - 1
        lengths = sorted({min(n, most) for n in (SHORT_PROMPT_TOKENS, UNALIGNED_PROMPT_TOKENS,
                                                   engine.prefill_step_tokens + 1)})
        for k in _sizes(gen.prefill_batch_size):
            for length in lengths:
                steps += _run(engine, [_prompt(length, k * 31 + j, vocab) for j in range(k)],
                              1, slow)
        # Unequal prompts in one prefill batch (padding, masks), and one longer than a chunk
        # (the second chunk attends to the first: a prefill on top of a cache).
        mixed = [min(most, SHORT_PROMPT_TOKENS + j * 67) for j in range(gen.prefill_batch_size)]
        mixed[-1] = min(most, 2 * engine.prefill_step_tokens - UNALIGNED_PROMPT_TOKENS)
        steps += _run(engine, [_prompt(n, 500 + j, vocab) for j, n in enumerate(mixed)], 2,
                      slow)
        # Decode batches of 1, 2, 4 .. max_batch (the prefill groups join one after another,
        # so their caches merge with unequal lengths on the way).
        for b in _sizes(gen.completion_batch_size):
            steps += _run(engine, [_prompt(SHORT_PROMPT_TOKENS, 1000 + b + j, vocab)
                                   for j in range(b)], 3, slow)
    mx.clear_cache()
    took = time.perf_counter() - t0
    log.info("[worker:%s] warm-up (%s): %d steps in %.2fs (the first %.2fs)%s", name, mode,
             steps, took, first, "; slow steps: " + "; ".join(slow) if slow else "")
    return {"mode": mode, "seconds": took, "first_seconds": first, "steps": steps,
            "slow": slow}
