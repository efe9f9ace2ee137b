"""GGUF loading: a llama.cpp ``.gguf`` file as an mlx-lm model, tokenizer and config.

Owns reading the file (``mx.load`` for tensors and metadata, plus a scan of the header for each
tensor's llama.cpp type, which ``mx.load`` does not report), mapping llama.cpp's
hyper-parameters and tensor names onto mlx-lm's own model classes, undoing the Q/K rotary
permutation that llama.cpp's converter applies to llama models, and the dtype policy. The
tokenizer is built by ``mlx_gw.worker.loaders.gguf_tokenizer``.

Every failure a user can cause (a bad path; a truncated or corrupt file; an unsupported
architecture, tensor type or vocabulary) raises ``GGUFError``, whose message names the file and
what is wrong.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_gw.formats.gguf_header import GGUFHeaderError, read_header
from mlx_gw.worker.loaders.gguf_tokenizer import VocabError, build_tokenizer, meta_scalar

__all__ = ["GGUFError", "load_gguf"]

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
GROUP_SIZE = 32  # every llama.cpp type MLX keeps quantized uses blocks of 32 weights

# llama.cpp tensor type ids (ggml_type) -> names, for the scan and for error messages.
_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# mx.load returns these as MLX affine-quantized (weight, scales, biases), group size 32: the
# block formats are exactly "q * scale + bias" per 32 weights, so nothing is lost.
_QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
# mx.load returns these dense: F32/F16 as stored; BF16 it rounds to float16, so we re-read it;
# Q6_K and Q2_K it dequantizes to float16 (checked against llama.cpp's reference dequantizer).
_DENSE = {"F32", "F16", "BF16", "Q6_K", "Q2_K"}
# Refused: Q5_*, Q3_K, Q5_K, IQ* make mx.load fail without naming the tensor, and mlx 0.32
# dequantizes Q4_K wrongly (each odd 32-weight sub-block gets its even neighbour's scale and
# min; compared with llama.cpp's reference dequantizer).


class GGUFError(Exception):
    """A .gguf file cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class _Arch:
    module: str  # mlx_lm.models.<module>
    # convert_hf_to_gguf interleaves the Q/K rows of llama models for llama.cpp's "normal"
    # rope; NEOX-rope architectures (qwen2, qwen3) keep Hugging Face's half-split layout.
    permuted_qk: bool


# Mistral 7B-style files say general.architecture = llama (their Q/K rows are interleaved too),
# so they load as llama; "mistral3", MoE and other variants are refused.
_ARCHS = {"llama": _Arch("llama", True), "qwen2": _Arch("qwen2", False),
          "qwen3": _Arch("qwen3", False)}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class _TensorInfo:
    type_name: str
    shape: tuple[int, ...]  # MLX order (GGUF lists dimensions innermost first)
    offset: int  # absolute byte offset of the data in the file


def load_gguf(
    path: str | os.PathLike[str], *, dtype: str = "auto"
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """Load a .gguf file as (model, tokenizer, config).

    ``dtype="auto"`` keeps Q4_0/Q4_1/Q8_0 tensors quantized (MLX QuantizedLinear /
    QuantizedEmbedding, group size 32) and dense tensors as stored; "float32", "float16" or
    "bfloat16" dequantizes everything to that dtype (on CPU float32 decodes fastest). ``config``
    is the llama-style dict the mlx-lm ModelArgs were built from; the context length is its
    ``max_position_embeddings``. Blocks on reading the whole file; raises GGUFError.
    """
    path = os.fspath(path)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, not {dtype!r}")
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    infos, header = _scan(path)
    arch_name = header.get("general.architecture")
    arch = _ARCHS.get(arch_name)  # checked before mx.load, which reads every tensor
    if arch is None:
        raise GGUFError(
            f"{path}: architecture {arch_name!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHS))})"
        )
    unsupported = sorted(
        f"{name} ({info.type_name})" for name, info in infos.items()
        if info.type_name not in _QUANT_BITS and info.type_name not in _DENSE
    )
    if unsupported:
        raise GGUFError(
            f"{path}: {len(unsupported)} tensor(s) use a type this loader does not support, e.g. "
            f"{', '.join(unsupported[:3])}; supported types are "
            f"{', '.join(sorted({*_QUANT_BITS, *_DENSE}))} (re-quantize the file, e.g. "
            "`llama-quantize --allow-requantize IN.gguf OUT.gguf Q8_0`)"
        )
    try:
        tensors, meta = mx.load(path, return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise GGUFError(f"{path}: MLX could not read the file ({e})") from e
    try:
        tokenizer = build_tokenizer(meta)
    except VocabError as e:
        raise GGUFError(f"{path}: {e}") from e
    try:
        config = _config(path, meta, arch_name, infos)
        params, bits = _params(path, tensors, infos, config, arch, dtype)
        model = _build(path, arch, config, params, bits, tensors.get("rope_freqs.weight"))
    except (TypeError, ValueError, KeyError) as e:
        # Hyper-parameters of the wrong type, or tensors whose shapes contradict them.
        raise GGUFError(f"{path}: inconsistent {arch_name} model ({e!r})") from e
    return model, tokenizer, config


def _scan(path: str) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Each tensor's type, shape and data offset, and the header's string-valued metadata,
    read without loading any tensor data."""
    try:
        header = read_header(path)
    except (GGUFHeaderError, OSError) as e:
        raise GGUFError(f"{path}: {e}") from e
    infos = {name: _TensorInfo(_TYPE_NAMES.get(t.type_id, f"type id {t.type_id}"), t.shape,
                               t.offset) for name, t in header.tensors.items()}
    return infos, {k: v for k, v in header.metadata.items() if isinstance(v, str)}


def _config(
    path: str, meta: dict[str, Any], arch: str, infos: dict[str, _TensorInfo]
) -> dict[str, Any]:
    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = meta_scalar(meta, f"{arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key '{arch}.{key}' is missing")
        if isinstance(value, list):  # a per-layer list: mlx-lm's models want one value
            if len(set(value)) != 1:
                raise GGUFError(f"{path}: '{arch}.{key}' varies per layer, which is unsupported")
            value = value[0]
        return value

    if "token_embd.weight" not in infos:
        raise GGUFError(f"{path}: the file has no token_embd.weight tensor")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings are not supported")
    rope_type = get("rope.scaling.type", "none")
    factor = float(get("rope.scaling.factor", 0.0) or get("rope.scale_linear", 0.0))
    rope_scaling = None
    if rope_type == "linear" or (rope_type == "none" and factor not in (0.0, 1.0)):
        rope_scaling = {"type": "linear", "factor": factor}
    elif rope_type != "none":
        raise GGUFError(f"{path}: rope scaling {rope_type!r} is not supported (only linear)")
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": infos["token_embd.weight"].shape[0],
        "max_position_embeddings": int(get("context_length")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_traditional": False,  # true once the Q/K permutation is undone
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in infos,
        "attention_bias": "blk.0.attn_q.bias" in infos,
        "mlp_bias": "blk.0.ffn_up.bias" in infos,
    }


def _mlx_name(base: str) -> str | None:
    if base in _TOP_NAMES:
        return _TOP_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def _unpermute(x: mx.array, n_heads: int) -> mx.array:
    # Inverse of convert_hf_to_gguf's permute(): rows per head go from interleaved pairs
    # (r0, r_half, r1, r_half+1, ...) back to the half-split order mlx-lm's rope expects. It acts
    # on output rows only, so weight, scales, biases and bias rows are reordered alike.
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _params(
    path: str,
    tensors: dict[str, mx.array],
    infos: dict[str, _TensorInfo],
    config: dict[str, Any],
    arch: _Arch,
    dtype: str,
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """mlx-lm parameter name -> array, and the bit width of each layer kept quantized."""
    params: dict[str, mx.array] = {}
    bits: dict[str, int] = {}
    unknown = []
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, info in infos.items():
        base, _, suffix = name.rpartition(".")
        target = _mlx_name(base)
        if base == "rope_freqs":
            continue  # used by _build
        if target is None or suffix not in ("weight", "bias"):
            unknown.append(name)
            continue
        if info.type_name in _QUANT_BITS:
            parts = {"weight": tensors[name], "scales": tensors[f"{base}.scales"],
                     "biases": tensors[f"{base}.biases"]}
        elif info.type_name == "BF16":
            count = math.prod(info.shape)
            raw = np.fromfile(path, dtype=np.uint16, count=count, offset=info.offset)
            parts = {suffix: mx.array(raw).view(mx.bfloat16).reshape(info.shape)}
        else:
            parts = {suffix: tensors[name]}
        kind = base.rpartition(".")[2]
        if arch.permuted_qk and kind in heads:
            parts = {k: _unpermute(v, heads[kind]) for k, v in parts.items()}
        if "scales" in parts and dtype == "auto":
            bits[target] = _QUANT_BITS[info.type_name]
        elif "scales" in parts:
            # Dequantize in float32 (q * scale + bias, as llama.cpp computes it), then cast.
            parts = {"weight": mx.dequantize(
                parts["weight"], parts["scales"].astype(mx.float32),
                parts["biases"].astype(mx.float32), group_size=GROUP_SIZE,
                bits=_QUANT_BITS[info.type_name],
            ).astype(DTYPES[dtype])}
        elif dtype != "auto":
            parts = {k: v.astype(DTYPES[dtype]) for k, v in parts.items()}
        params.update({f"{target}.{k}": v for k, v in parts.items()})
    if unknown:
        raise GGUFError(
            f"{path}: {len(unknown)} tensor(s) have no place in a {config['model_type']} model, "
            f"e.g. {', '.join(sorted(unknown)[:3])} (mixture-of-experts and other variants "
            "are not supported)"
        )
    return params, bits


class _FreqFactorRoPE(nn.Module):
    """RoPE with llama.cpp's per-frequency divisors: the ``rope_freqs`` tensor that Llama 3.x
    files carry instead of the "llama3" rope_scaling parameters."""

    def __init__(self, dims: int, base: float, factors: mx.array) -> None:
        super().__init__()
        self.dims = dims
        # mx.fast.rope rotates by position / freqs; llama.cpp by position * base^(-2i/d) / f_i.
        inv = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._freqs = inv * factors.astype(mx.float32)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
            freqs=self._freqs,
        )


def _build(
    path: str,
    arch: _Arch,
    config: dict[str, Any],
    params: dict[str, mx.array],
    bits: dict[str, int],
    rope_factors: mx.array | None,
) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{arch.module}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if bits:
        # Parameters are lazy until load_weights replaces them, so this quantizes nothing real.
        nn.quantize(
            model,
            class_predicate=lambda p, _: (
                {"group_size": GROUP_SIZE, "bits": bits[p], "mode": "affine"}
                if p in bits else False
            ),
        )
    if rope_factors is not None:
        if rope_factors.shape != (config["head_dim"] // 2,):
            raise GGUFError(f"{path}: rope_freqs.weight has shape {rope_factors.shape}")
        for layer in model.layers:
            layer.self_attn.rope = _FreqFactorRoPE(
                config["head_dim"], config["rope_theta"], rope_factors
            )
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise GGUFError(
            f"{path}: the tensors do not fit a {config['model_type']} model "
            f"(missing: {missing[:3]}, unexpected: {extra[:3]})"
        )
    for name, value in params.items():
        if value.shape != expected[name].shape:
            raise GGUFError(
                f"{path}: tensor for {name} has shape {value.shape}, "
                f"the model expects {expected[name].shape}"
            )
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    model.eval()
    return model
