"""The in-process side of the gateway benchmark: mlx-lm's BatchGenerator driven directly.

Runs as a long-lived child of `bench.gateway_vs_inprocess` so the model loads once: it reads one
JSON command per line on stdin, `{"n": N, "max_tokens": M, "prompt": [ids]}`, inserts N copies
of the prompt at once, steps until all finish and answers one `RESULT {json}` line on stdout
with the wall time (first insert to last finish), per-request time to first token, generated
token counts and finish reasons. The generator is built exactly as worker/engine_llm.py builds
it (greedy, EOS as the stop token, completion batch = max_batch, prefill batch = min(8, that),
prefill chunk 512); no detokenizing, no sockets.

    python -m bench.inprocess MODEL_DIR --max-batch 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

PREFILL_STEP_TOKENS = 512  # as worker/engine_llm.py


def run_once(gen: Any, prompt: list[int], n: int, max_tokens: int) -> dict[str, Any]:
    """Insert `n` copies of `prompt` together and step until every one has finished."""
    t0 = time.perf_counter()
    uids = gen.insert([list(prompt) for _ in range(n)], max_tokens=[max_tokens] * n,
                      samplers=[None] * n)
    first: dict[int, float] = {}
    end: dict[int, float] = {}
    tokens = dict.fromkeys(uids, 0)
    finish: dict[int, str] = {}
    while len(end) < n:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            tokens[r.uid] += 1
            first.setdefault(r.uid, now)
            if r.finish_reason is not None:
                end[r.uid] = now
                finish[r.uid] = r.finish_reason
    return {
        "wall_s": max(end.values()) - t0,
        "ttft_s": [first[u] - t0 for u in uids],
        "completion_tokens": [tokens[u] for u in uids],
        "finish_reasons": [finish[u] for u in uids],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()

    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(args.model)
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=args.max_batch,
        prefill_batch_size=min(8, args.max_batch),
        prefill_step_size=PREFILL_STEP_TOKENS,
    )
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        result = run_once(gen, cmd["prompt"], cmd["n"], cmd["max_tokens"])
        print("RESULT " + json.dumps(result), flush=True)
    gen.close()


if __name__ == "__main__":
    main()
