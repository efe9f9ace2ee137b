"""Tiny random-weight models of the other kinds, built at test time (recipes in FACTS.md).

Each builder writes a folder its kind's package loads as-is: `config.json` from the package's
own argument classes, weights saved with `mx.save_safetensors(tree_flatten(parameters))`, and
a tokenizer trained with `tokenizers`. Nothing is downloaded; each build takes about a second.

- `build_tiny_bert`: a BERT embedder (mlx-embeddings) with a WordPiece tokenizer.
- `build_tiny_whisper`: an mlx-whisper model (the tokenizer ships in mlx-whisper).
- `build_tiny_soprano`: a Soprano TTS model (mlx-audio: Qwen3 LM + Vocos decoder).
- `build_tiny_llava`: a llava VLM (mlx-vlm: llama text + clip vision).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.tiny_models import _CORPUS

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _save_weights(model, dest: Path, name: str = "model.safetensors") -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / name), weights, metadata={"format": "mlx"})


def _wordpiece_vocab(size: int) -> list[str]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=size, special_tokens=list(BERT_SPECIALS),
                                        show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    vocab = tok.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def build_tiny_bert(dest: Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                    max_position_embeddings: int = 128) -> Path:
    """A random-weight BERT embedder loadable by `mlx_embeddings.utils.load(dest)`."""
    import mlx.core as mx
    from mlx_embeddings.models.bert import Model, ModelArgs
    from transformers import BertTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab = _wordpiece_vocab(600)
    (dest / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab_file=str(dest / "vocab.txt"), do_lower_case=True,
                        model_max_length=max_position_embeddings)
    tok.save_pretrained(str(dest))
    config = {
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": 4,
        "intermediate_size": hidden_size * 4, "max_position_embeddings": max_position_embeddings,
        "vocab_size": len(vocab), "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu", "pad_token_id": 0,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    _save_weights(model, dest)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def build_tiny_whisper(dest: Path, *, text: str = " Hello world.", state: int = 64) -> Path:
    """A tiny mlx-whisper model that transcribes any audio as `text` (English, one segment
    from 0.00 to 1.00 s). Multilingual vocabulary and full audio context, as the package's
    tokenizer and mel front end expect. Its blocks are zeroed, so the decoder's output at
    position p is the (tied) embedding direction written into positional embedding p: the
    language token after SOT, then a timestamp, the text's tokens, a timestamp and EOT."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_whisper.tokenizer import get_tokenizer
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dims = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": state, "n_audio_head": 2,
            "n_audio_layer": 1, "n_vocab": 51865, "n_text_ctx": 448,
            "n_text_state": state, "n_text_head": 2, "n_text_layer": 1}
    mx.random.seed(0)
    model = Whisper(ModelDimensions(**dims), mx.float32)
    params = {k: mx.zeros_like(v) if ".blocks." in k else v
              for k, v in tree_flatten(model.parameters())}
    tok = get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((51865, state)).astype(np.float32)
    # Rows of norm 8: the target's logit (64) clears the log-sum-exp of all the others
    # (~43), so greedy decoding is confident and mlx-whisper keeps its first pass.
    emb *= 8 / np.linalg.norm(emb, axis=1, keepdims=True)
    targets = [tok.to_language_token("en"), tok.timestamp_begin, *tok.encode(text),
               tok.timestamp_begin + 50, tok.eot]
    pos = np.zeros((448, state), dtype=np.float32)
    pos[0] = 10 * emb[targets[0]]  # after SOT: the language
    start = len(tok.sot_sequence) - 1  # after the task token: the first sampled token
    for i, t in enumerate(targets[1:]):
        pos[start + i] = 10 * emb[t]
    params["decoder.token_embedding.weight"] = mx.array(emb)
    params["decoder.positional_embedding"] = mx.array(pos)
    model.update(tree_unflatten(list(params.items())))
    _save_weights(model, dest, "weights.safetensors")
    (dest / "config.json").write_text(json.dumps({**dims, "model_type": "whisper"}, indent=2))
    return dest


SOPRANO_SPECIALS = ("[STOP]", "[TEXT]", "[START]")
SOPRANO_CHAIN = 4  # generated tokens before [STOP]: 4 * 2048 samples per segment


def build_tiny_soprano(dest: Path, *, seed: int = 0, hidden_size: int = 64) -> Path:
    """A random-weight Soprano TTS model (mlx-audio: a Qwen3 LM whose hidden states a Vocos
    decoder turns into 32 kHz audio). The decoder keeps its full size whatever the config says,
    so the folder is ~53 MB."""
    import mlx.core as mx
    from mlx_audio.tts.models.soprano.soprano import Model, ModelConfig
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SOPRANO_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 2, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[STOP]")
    fast.save_pretrained(str(dest))
    config = {
        "model_type": "soprano", "hidden_size": hidden_size, "num_hidden_layers": 1,
        "intermediate_size": hidden_size * 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": hidden_size // 2, "rms_norm_eps": 1e-6,
        "vocab_size": len(fast), "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "sample_rate": 32000,
    }
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict({**config, "model_path": str(dest)}))
    # A fixed chain, whatever the text: after the prompt come tokens X1..Xk, then [STOP].
    # Each token's embedding carries a large value in one marker dimension (prompt tokens: dim
    # k; Xi: dim i-1), the final norm keeps only the marker dimensions, and the output row of
    # the chain's next token reads the current one. Each text segment so yields k+1 decoder
    # frames, k*2048 samples of audio: deterministic and fast.
    lm = model.language_model
    stop = fast.convert_tokens_to_ids("[STOP]")
    chain = [len(fast) - 1 - i for i in range(SOPRANO_CHAIN)]
    k = SOPRANO_CHAIN
    emb = lm.embed_tokens.weight
    emb[:, : k + 1] = 0.0
    emb[:, k] = 10.0
    for i, t in enumerate(chain):
        emb[t, k] = 0.0
        emb[t, i] = 10.0
    norm = mx.zeros_like(lm.norm.weight)
    norm[: k + 1] = 1.0
    lm.norm.weight = norm
    head = lm.lm_head.weight
    head[:, : k + 1] = 0.0
    for i, t in enumerate([*chain, stop]):
        head[t, (i - 1) % (k + 1)] = 1.0  # X1 reads the prompt marker (dim k)
    _save_weights(model, dest)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


# ChatML whose content may be a list of parts, as mlx-vlm passes it (an image part becomes the
# processor's <image> token, which it expands to one token per patch).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llava(dest: Path, *, seed: int = 0, image_size: int = 28,
                     hidden_size: int = 64) -> Path:
    """A random-weight llava VLM (mlx-vlm: a llama text model and a CLIP vision tower, images
    of `image_size` pixels in 14-pixel patches) with a ChatML tokenizer that has an `<image>`
    token, and the processor files (CLIP image processor, llava processor) mlx-vlm loads."""
    import mlx.core as mx
    from mlx_vlm.models.llava import Model, ModelConfig, TextConfig, VisionConfig
    from tokenizers import Tokenizer
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from tests.tiny_models import _tokenizer_json

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = LLAVA_TEMPLATE
    image_id = fast.convert_tokens_to_ids("<image>")
    patch = 14
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=patch,
                               vision_feature_select_strategy="default",
                               chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    processor.save_pretrained(str(dest))
    text = {"model_type": "llama", "hidden_size": hidden_size, "num_hidden_layers": 2,
            "intermediate_size": hidden_size * 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": len(fast), "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512}
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
              "intermediate_size": 64, "num_attention_heads": 2, "image_size": image_size,
              "patch_size": patch, "projection_dim": 32}
    config = {"model_type": "llava", "text_config": text, "vision_config": vision,
              "image_token_index": image_id, "vocab_size": len(fast),
              "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
              "eos_token_id": [fast.convert_tokens_to_ids("<|im_end|>")]}
    mx.random.seed(seed)
    model_config = ModelConfig.from_dict(config)
    model_config.text_config = TextConfig.from_dict(text)
    model_config.vision_config = VisionConfig.from_dict(vision)
    model = Model(model_config)
    _save_weights(model, dest)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest
