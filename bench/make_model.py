"""A random-weight llama at a real model's shapes, as an mlx-lm model dir, for benchmarks.

Default shapes: SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536,
vocab 49152, tied embeddings), float32 (the fast dtype on CPU). `--shape` picks Llama 3.x 1B,
3B or 8B shapes (for the GPU: no downloads there) and `--bits 4` quantizes the way
`mlx_lm.convert -q` does (group size 64). The tokenizer is a small byte-level BPE trained here:
prompts only need ids below its vocabulary, and the full-width output layer still costs what
the real model's does.

Greedy decoding must run every request to exactly `max_tokens` and every token must decode to
visible text (so the first streamed chunk is the first token). Both follow from one choice: the
embedding rows (tied, so also the output rows) of EOS, of byte tokens that are partial UTF-8
and of every id past the tokenizer's vocabulary are zero. Their logits are then exactly 0, while
the largest of the ~500 remaining random logits is positive, so greedy never picks them.
Whitespace-only tokens are zeroed too: mlx-lm's streaming detokenizer holds a lone space
back until the next token, so a greedy loop on one streamed nothing for seconds.

    python -m bench.make_model [DEST]     # default bench/out/smollm2-135m-shape-f32
    python -m bench.make_model /tmp/llama1b --shape llama-3.2-1b --dtype bfloat16 --bits 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["DEFAULT_DIR", "SHAPES", "build", "ensure_model", "prompt_ids"]

DEFAULT_DIR = Path(__file__).resolve().parent / "out" / "smollm2-135m-shape-f32"
EOS = "<|endoftext|>"
TOKENIZER_VOCAB = 512
SEED = 0
RANDOM_MARK = "random weights: greedy decoding never picks EOS"  # in config.json

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "torch_dtype": "float32",
}

_LLAMA3 = {
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "num_key_value_heads": 8, "head_dim": 128,
}
SHAPES: dict[str, dict[str, object]] = {
    "smollm2-135m": {},
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "intermediate_size": 8192, "head_dim": 64},
    "llama-3.2-3b": {**_LLAMA3, "hidden_size": 3072, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "intermediate_size": 8192},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "intermediate_size": 14336,
                     "tie_word_embeddings": False},
}

_CORPUS = """\
The gateway starts one worker process for each model and sends it requests over a socket.
A worker loads its weights, answers a ready message, and then runs a loop: it takes new
requests, adds them to the batch, runs one step of the model, and sends the new tokens back.
Once upon a time there was a small town by the sea. Every morning the fishermen went out in
their boats, and every evening they came back with their nets full of fish. The children
played on the beach, the old men sat in the sun and talked about the weather.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024; code: def main(): return 0 if x else None
"""


def _train_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return tok


def _visible_ids(fast: object, n: int) -> list[int]:
    """Ids (below n) that decode on their own to printable ASCII, not only whitespace: a
    streaming detokenizer holds a lone space back until the next token, so a greedy loop on
    one held its text for seconds and looked like a stall (issue 20)."""
    ok = []
    for i in range(n):
        text = fast.decode([i])  # type: ignore[attr-defined]
        if text and text.isascii() and text.isprintable() and not text.isspace():
            ok.append(i)
    return ok


def build(dest: Path = DEFAULT_DIR, shape: str = "smollm2-135m", dtype: str = "float32",
          bits: int | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer into `dest`: `shape` (a key of
    SHAPES) in `dtype`, quantized to `bits` (group size 64) unless None."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=EOS,
        model_max_length=CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(dest))
    eos_id = fast.convert_tokens_to_ids(EOS)
    visible = [i for i in _visible_ids(fast, len(fast)) if i != eos_id]

    config = {**CONFIG, **SHAPES[shape], "torch_dtype": dtype, "eos_token_id": eos_id,
              "bos_token_id": eos_id, "mlx_gw_bench": RANDOM_MARK}
    fields = ModelArgs.__dataclass_fields__.keys()
    mx.random.seed(SEED)
    model = Model(ModelArgs(**{k: v for k, v in config.items() if k in fields}))
    model.set_dtype(getattr(mx, dtype))
    mask = mx.zeros((config["vocab_size"], 1), dtype=getattr(mx, dtype))
    mask[mx.array(visible)] = 1.0
    embed = model.model.embed_tokens
    embed.weight = embed.weight * mask
    if not config["tie_word_embeddings"]:
        model.lm_head.weight = model.lm_head.weight * mask
    if bits:  # zero rows quantize to zero rows: their logits stay exactly 0
        nn.quantize(model, group_size=64, bits=bits)
        config["quantization"] = {"group_size": 64, "bits": bits}
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest


def ensure_model(dest: Path = DEFAULT_DIR) -> Path:
    """`dest`, built first unless it already holds a model."""
    if not (Path(dest) / "model.safetensors").is_file():
        build(dest)
    return Path(dest)


def prompt_ids(model_dir: Path, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` token ids of English text, from the model's own tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tok.encode(_CORPUS).ids
    return ids[:n_tokens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--bits", type=int, choices=[4, 8], default=None)
    args = ap.parse_args()
    dest = build(args.dest, args.shape, args.dtype, args.bits)
    print(dest)


if __name__ == "__main__":
    main()
