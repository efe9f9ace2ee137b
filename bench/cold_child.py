"""The in-process side of `bench.cold_start`: import, load, one token, in a fresh process.

    python -m bench.cold_child MODEL DTYPE MESSAGE

Prints "LOADING" just before the load, then one JSON line with `time.monotonic()` stamps
(system-wide on Linux, so the parent can subtract its own spawn time): `t_main` (this module
running), `t_load` (imports done, just before the load), `t_loaded`, `t_first` (the first
generated token whose text is not empty).
A directory loads with `mlx_lm.load`; a .gguf with the worker's own loader
(`mlx_gw.worker.loaders.gguf.load_gguf`), which is what mlx-lm would need too. Greedy, EOS
not special.
Only the standard library is imported before `t_main`.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    t_main = time.monotonic()
    model_path, dtype, message = sys.argv[1], sys.argv[2], sys.argv[3]
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    if model_path.lower().endswith(".gguf"):
        from mlx_gw.worker.loaders.gguf import load_gguf
    print("LOADING", flush=True)
    t_load = time.monotonic()
    if model_path.lower().endswith(".gguf"):
        model, tokenizer, _ = load_gguf(model_path, dtype=dtype)
    else:
        model, tokenizer = load(model_path)[:2]
        if dtype != "auto":
            model.set_dtype(getattr(mx, dtype))
    t_loaded = time.monotonic()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                        add_generation_prompt=True, tokenize=True)
    detok = tokenizer.detokenizer
    detok.reset()
    n = 0
    for token, _ in generate_step(mx.array(list(ids)), model, max_tokens=16):
        n += 1
        detok.add_token(int(token))
        if detok.last_segment:
            break
    t_first = time.monotonic()
    print(json.dumps({"t_main": t_main, "t_load": t_load, "t_loaded": t_loaded,
                      "t_first": t_first, "tokens_to_text": n,
                      "device": str(mx.default_device())}), flush=True)


if __name__ == "__main__":
    main()
