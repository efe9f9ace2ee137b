"""Memory admission estimates for a model not loaded yet, read from its files (no MLX import).

estimate = weight bytes (scaled when the load changes the dtype, e.g. a 4-bit GGUF loaded as
float32) + the measured baseline of an empty worker + KV cache for one sequence at a modest
context. KV beyond that grows on demand and is governed by measured memory, never reserved
up front. After a load the worker's measured footprint replaces the estimate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mlx_gw.config import ModelConfig

MODEST_CONTEXT_TOKENS = 1024
DEFAULT_BASELINE_BYTES = 120 * 2**20  # until an empty worker has reported its own
_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
_GGUF_BITS = (("f32", 32), ("f16", 16), ("bf16", 16), ("q8", 8.5), ("q6", 6.6), ("q5", 5.5),
              ("q4", 4.5), ("q3", 3.4), ("q2", 2.6))
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz", ".bin")


def _local_path(path: str) -> Path | None:
    p = Path(path).expanduser()
    if p.exists():
        return p
    try:  # a Hugging Face repo id: its snapshot in the local cache, if any
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:
        return None


def _weights(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES)


def _source_bits(p: Path) -> float | None:
    if p.is_file() and p.suffix.lower() == ".gguf":
        name = p.name.lower()
        for tag, bits in _GGUF_BITS:
            if re.search(rf"[^a-z0-9]{tag}", name):
                return bits
        return None
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(q, dict) and "bits" in q:
        return float(q["bits"]) + 0.5
    return _BITS.get(str(cfg.get("torch_dtype", "float32")), 32)


def _config(p: Path) -> dict[str, Any]:
    """The model directory's config.json, or {} (a GGUF file, a missing or broken config)."""
    try:
        return json.loads((p / "config.json").read_text()) if p.is_dir() else {}
    except (OSError, ValueError):
        return {}


def _kv_bytes(p: Path, dtype_bits: float) -> int:
    cfg = _config(p)
    layers = cfg.get("num_hidden_layers")
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    if not (layers and heads and hidden):
        return 32 * 2**20
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    per_token = 2 * layers * kv_heads * head_dim * max(dtype_bits, 16) / 8
    return int(per_token * MODEST_CONTEXT_TOKENS)


def estimate_bytes(model: ModelConfig, baseline_bytes: int) -> int:
    """Bytes the model's worker is expected to hold right after loading (a distributed one's
    N ranks together: their shards add up to the weights, and each is a whole process)."""
    baseline_bytes *= model.distributed.ranks if model.distributed is not None else 1
    p = _local_path(model.path)
    if p is None:
        return baseline_bytes
    weights, bits = _as_loaded(p, model.dtype)
    if model.type == "train":  # a fine-tuning job's worker (supervision/training.py)
        return weights + baseline_bytes + training_bytes(p, model.max_batch,
                                                         model.context_length or 1)
    return weights + baseline_bytes + _kv_bytes(p, bits) + _draft_bytes(model)


def _as_loaded(p: Path, dtype: str | None) -> tuple[int, float]:
    """The weights' bytes once loaded in `dtype` (an upcast grows them), and their bits."""
    weights = _weights(p)
    src = _source_bits(p)
    target = _BITS.get(dtype) if dtype else None
    if src and target and target > src:
        weights = int(weights * target / src)
    return weights, target or src or 16


def _draft_bytes(model: ModelConfig) -> int:
    """A speculative draft model's weights and KV: the same worker loads it beside the target."""
    sp = model.speculative
    if sp is None or sp.method != "draft" or not sp.draft_path:
        return 0
    d = _local_path(sp.draft_path)
    if d is None:
        return 0
    weights, bits = _as_loaded(d, sp.draft_dtype)
    return weights + _kv_bytes(d, bits)


def training_bytes(p: Path, batch: int, tokens: int) -> int:
    """What backpropagation keeps beyond the weights, for `batch` sequences of `tokens`:
    each layer's activations (f32, about 12 hidden-sized and 3 MLP-sized tensors a token,
    plus the attention scores) and the logits with their softmax and gradient. LoRA's own
    weights and Adam's moments are a few MiB and are left out; measured memory governs once
    the job runs."""
    cfg = _config(p)
    layers = cfg.get("num_hidden_layers") or 24
    hidden = cfg.get("hidden_size") or 1024
    mlp = cfg.get("intermediate_size") or 4 * hidden
    heads = cfg.get("num_attention_heads") or 16
    vocab = cfg.get("vocab_size") or 32000
    per_layer = batch * tokens * (12 * hidden + 3 * mlp) + 2 * batch * heads * tokens * tokens
    return 4 * (layers * per_layer + 3 * batch * tokens * vocab)
