"""The in-process side of the gateway benchmark: mlx-lm's BatchGenerator driven directly.

Runs as a long-lived child of `bench.gateway_vs_inprocess` so the model loads once: it reads one
JSON command per line on stdin, `{"n": N, "max_tokens": M, "prompt": [ids]}`, inserts N copies
of the prompt at once, steps until all finish and answers one `RESULT {json}` line on stdout
with the wall time (first insert to last finish), per-request time to first token, generated
token counts and finish reasons. The generator is built exactly as worker/engine_llm.py builds
it (greedy, EOS as the stop token, completion batch = max_batch, prefill batch = min(8, that),
prefill chunk 512); no detokenizing, no sockets.

`python -m bench` sends `{"items": [{"prompt": TEXT, "max_tokens": M}, ...], "concurrency": N}`
instead (or `"arrivals": [s, ...]` for an open loop, and `"logit_bias"`): the child tokenizes
each prompt as the servers do, keeps N requests in the batch (inserting the next as one
finishes) or inserts each at its arrival time, and answers per request its start, TTFT,
inter-token gaps, end and token counts.

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


def run_items(gen: Any, tokenizer: Any, cmd: dict[str, Any]) -> list[dict[str, Any]]:
    """`python -m bench`'s command: a closed loop of `concurrency` requests, or an open loop
    with `arrivals` (seconds from the start); times are seconds from the start."""
    from mlx_lm.sample_utils import make_logits_processors

    items = cmd["items"]
    bias = {int(k): float(v) for k, v in (cmd.get("logit_bias") or {}).items()}
    prompts = [tokenizer.encode(it["prompt"]) for it in items]
    arrivals = cmd.get("arrivals")
    limit = cmd.get("concurrency") or len(items)
    out = [{"prompt_tokens": len(p), "completion_tokens": 0, "itl_s": []} for p in prompts]
    last: dict[int, float] = {}
    by_uid: dict[int, int] = {}
    pending, active = 0, 0
    t0 = time.perf_counter()
    while pending < len(items) or active:
        now = time.perf_counter() - t0
        new = []
        while pending < len(items) and active + len(new) < limit and (
                arrivals is None or arrivals[pending] <= now):
            new.append(pending)
            pending += 1
        if new:
            procs = [make_logits_processors(logit_bias=bias) if bias else None for _ in new]
            uids = gen.insert([prompts[i] for i in new],
                              max_tokens=[items[i]["max_tokens"] for i in new],
                              samplers=[None] * len(new), logits_processors=procs)
            for uid, i in zip(uids, new, strict=True):
                by_uid[uid] = i
                out[i]["start_s"] = now
            active += len(new)
        if not active:
            time.sleep(max(0.0, arrivals[pending] - now) if arrivals else 0.0)
            continue
        _, responses = gen.next()
        now = time.perf_counter() - t0
        for r in responses:
            o = out[by_uid[r.uid]]
            o["completion_tokens"] += 1
            if r.uid in last:
                o["itl_s"].append(now - last[r.uid])
            else:
                o["ttft_s"] = now - o["start_s"]
            last[r.uid] = now
            if r.finish_reason is not None:
                o["e2e_s"] = now - o["start_s"]
                active -= 1
    return out


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
        if "items" in cmd:
            result: Any = run_items(gen, tokenizer, cmd)
        else:
            result = run_once(gen, cmd["prompt"], cmd["n"], cmd["max_tokens"])
        print("RESULT " + json.dumps(result), flush=True)
    gen.close()


if __name__ == "__main__":
    main()
