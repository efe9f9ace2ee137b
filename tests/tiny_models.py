"""Tiny random-weight llama models built at test time, loadable by ``mlx_lm.load(dir)``.

Each model folder holds ``config.json`` (mlx-lm's llama ``ModelArgs``), ``model.safetensors``
and a byte-level BPE tokenizer saved through ``transformers.PreTrainedTokenizerFast`` with a
ChatML chat template. Nothing is downloaded; a build takes well under a second and the same
seed always writes the same files.

The weights are the default MLX init except for two scalings, chosen so that greedy decoding
is useful to tests: the embeddings are scaled up so each step's output depends on the token
(and not only on the shared norm weights), and the output projection is scaled up so the
next-token distribution is peaked. Greedy decoding then visits many different tokens and the
top-1/top-2 logit gap is large compared with float32 batching noise, so greedy output is
stable whether a sequence runs alone or in a batch.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "TOKENIZER_VOCAB_SIZE",
    "build_tiny_llama",
    "build_tiny_models",
]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB_SIZE = 640

# Scalings applied to the default init (see the module docstring); tuned by measuring the
# distinct-token count and the top-1/top-2 logit gap over greedy runs.
_EMBED_SCALE = 4.0
_LM_HEAD_SCALE = 8.0

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tokenizer: plain English plus some non-ASCII, so that common words
# become single tokens while rarer multi-byte characters stay split over several tokens.
_CORPUS = """\
The gateway starts one worker process for each model and sends it requests over a socket.
A worker loads its weights, answers a ready message, and then runs a loop: it takes new
requests, adds them to the batch, runs one step of the model, and sends the new tokens back.
When a model has not been used for a while, the gateway stops its worker to free memory.
If a request arrives for a model that is not loaded, the gateway starts a worker and waits.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Once upon a time there was a small town by the sea. Every morning the fishermen went out in
their boats, and every evening they came back with their nets full of fish. The children
played on the beach, the old men sat in the sun and talked about the weather, and the women
sold bread, cheese and apples at the market in the square. One day a stranger came to town.
He wore a long grey coat and carried a wooden box under his arm. Nobody knew where he came
from, and nobody dared to ask him. He took a room at the inn and stayed for the whole summer.
In the evenings he sat by the window and wrote in a thick notebook, page after page.
What is the capital of France? The capital of France is Paris. What is two plus two? Four.
Please write a short poem about the moon. The moon is bright tonight, a silver coin of light.
You are a helpful assistant. The user asks a question and the assistant gives an answer.
system user assistant message content role hello world thank you please yes no maybe
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 3.14 2.71 -1 +1 = < > ( ) [ ] { }
Code: def main(): return 0; for i in range(10): print(i) if x == y else None; import json
Punctuation, quotes "like this" and 'like that'; colons: semicolons; dashes - and ... dots!
Café au lait, naïve façade, jalapeño, crème brûlée, Straße, Ærøskøbing, smörgåsbord.
日本語のテキスト。東京は日本の首都です。こんにちは世界。
Русский текст: привет, мир. Ελληνικά: γειά σου κόσμε. עברית: שלום עולם. العربية: مرحبا
Emoji: 🙂 🎉 🚀 👍🏽 ❤️ ✨ — en dash – ellipsis … “curly quotes” ‘single’ €100 £20 ¥300
"""


@functools.cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer once per process; returns its JSON serialisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the English so its merges outrank the rare non-ASCII pairs.
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines * 4 + lines[-4:], trainer=trainer)
    return tok.to_str()


def _save_tokenizer(dest: Path, model_max_length: int) -> tuple[int, int]:
    """Write the tokenizer files into ``dest``; returns (vocab size, ``<|im_end|>`` id)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        bos_token=None,
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(dest))
    return len(fast), fast.convert_tokens_to_ids("<|im_end|>")


def build_tiny_llama(
    dest: Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight llama model with a ChatML tokenizer into ``dest``; returns ``dest``.

    ``dtype`` names an ``mlx.core`` float type ("float32", "bfloat16", "float16"). Files already
    in ``dest`` with the same names are overwritten.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab_size, eos_id = _save_tokenizer(dest, max_position_embeddings)

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
    args_keys = ModelArgs.__dataclass_fields__.keys()
    mx.random.seed(seed)
    model = Model(ModelArgs(**{k: v for k, v in config.items() if k in args_keys}))
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * _EMBED_SCALE
    model.lm_head.weight = model.lm_head.weight * _LM_HEAD_SCALE

    target = getattr(mx, dtype)
    weights = {k: v.astype(target) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest


def build_tiny_models(root: Path, n: int = 3) -> list[Path]:
    """Build ``root/tiny-0`` .. ``root/tiny-{n-1}`` with seeds 0..n-1; returns their paths."""
    return [build_tiny_llama(Path(root) / f"tiny-{i}", seed=i) for i in range(n)]
