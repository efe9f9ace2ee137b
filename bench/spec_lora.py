"""Issue 17 figures: speculative decoding (off / ngram / draft) and LoRA adapter switching.

Runs the worker's own engine (`LLMEngine`, what each worker process runs) in one process with
the workers' fast BLAS preloaded (it re-executes itself with the env the gateway gives its
workers), so every configuration of a rep runs back to back on the same loaded machine.

- Target: the packaged SmolLM2-135M-Instruct GGUF exported to float32 (`bench/export_gguf`).
- Draft: the same model cut to its first `--draft-layers` layers (same embeddings, norm and
  tied output layer, same tokenizer): a cheaper copy of itself.
- Workloads: `repetitive` (rewrite a given code snippet with one name changed: the answer
  copies most of the prompt), `unique` (16 different short questions).
- Adapters: 4 random LoRA adapters in mlx-lm's default layout (rank 8, every linear of the
  last 16 layers); 4 streams on 4 adapters vs 4 streams on the base.

    python -m bench.spec_lora --reps 3 --tokens 96 --out bench/out/spec-lora

`--temperature T` samples instead (unseeded; sampled rows speculate by rejection sampling):
outputs then differ run to run, so only rates and acceptance are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from bench.worker_env import run_as_worker

OUT = Path(__file__).resolve().parent / "out"
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal = subtotal + item.price * item.quantity
    tax = subtotal * tax_rate
    total = subtotal + tax
    return round(total, 2)
'''
REPETITIVE = [f"Here is a Python function:\n\n{CODE}\nRewrite the whole function with the "
              f"variable `subtotal` renamed to `{name}`. Output only the code."
              for name in ("base_sum", "net", "amount", "pre_tax", "running", "acc", "s", "sum0",
                           "gross", "cost", "value", "partial", "raw", "sum_items", "t0", "x")]
UNIQUE = ["What is the capital of France?", "Write a haiku about rain.",
          "Explain what a CPU cache is.", "Name three prime numbers.",
          "Why is the sky blue?", "Give me a tip for learning Python.",
          "What does HTTP stand for?", "Describe a cat in one sentence.",
          "How many legs does a spider have?", "What is photosynthesis?",
          "Suggest a name for a dog.", "What is 17 times 3?",
          "Translate 'good morning' to Spanish.", "What is a black hole?",
          "List two uses of a paperclip.", "Who wrote Hamlet?"]


def draft_dir(target: Path, layers: int) -> Path:
    """The target cut to its first `layers` layers, written once under bench/out."""
    import mlx.core as mx

    dest = OUT / f"{target.name}-first{layers}"
    if (dest / "model.safetensors").is_file():
        return dest
    shutil.copytree(target, dest, dirs_exist_ok=True)
    weights = mx.load(str(target / "model.safetensors"))
    keep = {k: v for k, v in weights.items() if not k.startswith("model.layers.")
            or int(k.split(".")[2]) < layers}
    mx.save_safetensors(str(dest / "model.safetensors"), keep, metadata={"format": "mlx"})
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def make_adapters(target: Path, n: int, rank: int = 8, layers: int = 16) -> list[Path]:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(target))
    total = len(model.layers)
    out = []
    for a in range(n):
        dest = OUT / f"lora-{a}"
        out.append(dest)
        if (dest / "adapters.safetensors").is_file():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        mx.random.seed(100 + a)
        weights = {}
        for i in range(total - layers, total):
            for name, mod in model.layers[i].named_modules():
                if hasattr(mod, "weight") and mod.weight.ndim == 2 and "proj" in name:
                    o, d = mod.weight.shape
                    p = f"model.layers.{i}.{name}"
                    weights[f"{p}.lora_a"] = mx.random.normal((d, rank)) * d ** -0.5
                    weights[f"{p}.lora_b"] = mx.random.normal((rank, o)) * 0.01
        mx.save_safetensors(str(dest / "adapters.safetensors"), weights)
        (dest / "adapter_config.json").write_text(json.dumps({
            "fine_tune_type": "lora", "num_layers": layers,
            "lora_parameters": {"rank": rank, "scale": 20.0, "dropout": 0.0}}))
    return out


def run(engine, prompts: list[str], tokens: int, adapters: list[str] | None = None,
        temperature: float = 0.0) -> tuple[float, list[str], float]:
    """Generated tokens per second (all streams together, prefill included), the texts, and
    the decode-only rate (tokens after each stream's first, from the first token on)."""
    from mlx_gw.worker.protocol import Generate

    texts = [""] * len(prompts)
    n = 0
    t0 = time.perf_counter()
    first: float | None = None
    chat = bool(getattr(engine.tokenizer, "chat_template", None))  # bench.make_model's: none
    for i, p in enumerate(prompts):
        engine.submit(Generate(rid=i + 1, messages=[{"role": "user", "content": p}] if chat
                               else None, prompt=None if chat else p,
                               max_tokens=tokens, temperature=temperature, ignore_eos=True,
                               adapter=adapters[i] if adapters else ""))
    while engine.busy:
        for d in engine.step():
            first = time.perf_counter() if first is None else first
            texts[d.rid - 1] += d.text
            if d.finish_reason:
                n += d.completion_tokens
    end = time.perf_counter()
    return n / (end - t0), texts, (n - len(prompts)) / max(end - (first or t0), 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--draft-layers", type=int, default=6,
                    help="the draft is the target's first N layers (0: the whole target, which "
                    "accepts every proposal: speculation's upper bound)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="the GGUF to export as the target (default the packaged SmolLM2)")
    ap.add_argument("--target", type=Path, default=None,
                    help="an MLX model directory as the target instead of a GGUF export")
    ap.add_argument("--spec-tokens", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (0: greedy, outputs compared with off)")
    ap.add_argument("--discard", type=int, default=0,
                    help="the first N of the --reps run without being recorded (a fresh GPU "
                    "compiles each new shape's kernels in its first step)")
    ap.add_argument("--out", type=Path, default=OUT / "spec-lora")
    ap.add_argument("--only", choices=["spec", "lora"], default=None)
    ap.add_argument("--work", default=None, help="only the speculation workload named so, "
                    "e.g. 'unique x16'")
    args = ap.parse_args()
    run_as_worker("bench.spec_lora")
    from bench.export_gguf import ensure_exported
    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.engines.speculative import Gate
    from mlx_gw.worker.protocol import Load

    target = args.target or ensure_exported(args.gguf)[1]
    base = {"name": "t", "type": "llm", "path": str(target), "max_batch": 16,
            "prompt_cache_bytes": 0}
    results: dict[str, list[float]] = {}
    meta = {"blas": os.environ.get("LD_PRELOAD", "none"), "tokens": args.tokens,
            "target": str(target), "draft_layers": args.draft_layers,
            "temperature": args.temperature,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if args.only in (None, "spec"):
        draft = draft_dir(target, args.draft_layers) if args.draft_layers else target
        engines = {
            "off": LLMEngine.from_load(Load(**base)),
            "ngram": LLMEngine.from_load(Load(**base, speculative="ngram",
                                              spec_tokens=args.spec_tokens)),
            "draft": LLMEngine.from_load(Load(**base, speculative="draft",
                                              spec_tokens=args.spec_tokens,
                                              spec_draft_path=str(draft))),
        }
        for rep in range(-args.discard, args.reps - args.discard):
            for work, prompts in (("repetitive x1", REPETITIVE[:1]),
                                  ("repetitive x16", REPETITIVE), ("unique x16", UNIQUE)):
                if args.work and work != args.work:
                    continue
                ref = None
                for name, eng in engines.items():
                    if eng.spec is not None:  # each run learns afresh whether it pays
                        eng.spec = eng._gen._generation_batch.gate = Gate()
                    rate, texts, decode = run(eng, prompts, args.tokens,
                                              temperature=args.temperature)
                    ref = texts if ref is None else ref
                    differ = 0 if args.temperature else sum(
                        a != b for a, b in zip(texts, ref, strict=True))
                    if rep < 0:  # compiling: printed, not recorded
                        print(f"warm-up {work:15s} {name:6s} {rate:7.1f} tok/s", flush=True)
                        continue
                    key = f"greedy outputs differing from off, {name}"
                    meta[key] = meta.get(key, 0) + differ
                    results.setdefault(f"{work} {name}", []).append(rate)
                    results.setdefault(f"{work} {name} (decode only)", []).append(decode)
                    g = eng.spec
                    print(f"rep {rep} {work:15s} {name:6s} {rate:7.1f} tok/s, decode {decode:6.1f}"
                          + (f"  accepted {g.accepted}/{g.proposed}" if g else "")
                          + (f"  ({differ} outputs differ)" if differ else ""), flush=True)
                    if g is not None:
                        acc = meta.setdefault(f"acceptance {work} {name}", [0, 0])
                        acc[0] += g.accepted
                        acc[1] += g.proposed
        for eng in engines.values():
            eng.close()
    if args.only in (None, "lora"):
        dirs = make_adapters(target, 4)
        eng = LLMEngine.from_load(Load(**base, adapters={f"a{i}": str(d)
                                                         for i, d in enumerate(dirs)}))
        prompts = UNIQUE[:4]
        for rep in range(-args.discard, args.reps - args.discard):
            for label, names in (("4 streams base", None),
                                 ("4 streams, one adapter", ["a0"] * 4),
                                 ("4 streams, 4 adapters", ["a0", "a1", "a2", "a3"])):
                rate, _, decode = run(eng, prompts, args.tokens, names)
                if rep < 0:
                    continue
                results.setdefault(label, []).append(rate)
                results.setdefault(f"{label} (decode only)", []).append(decode)
                print(f"rep {rep} {label:24s} {rate:7.1f} tok/s, decode {decode:6.1f}",
                      flush=True)
        eng.close()
    summary = {k: {"median": statistics.median(v), "runs": v} for k, v in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": summary},
                                                      indent=1))
    for k, v in summary.items():
        print(f"{k:32s} median {v['median']:7.1f} tok/s  runs {[round(x, 1) for x in v['runs']]}")


if __name__ == "__main__":
    main()
