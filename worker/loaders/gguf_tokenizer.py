"""Tokenizer from GGUF metadata.

Owns turning the vocabulary that llama.cpp stores in a .gguf file (``tokenizer.ggml.*``) into a
Hugging Face ``tokenizers`` tokenizer that encodes exactly as llama.cpp does, wrapped in
``transformers.PreTrainedTokenizerFast`` (chat template, special tokens) and then in mlx-lm's
``TokenizerWrapper`` (streaming detokenizer, end-of-generation ids).

Two vocabulary kinds are understood: ``gpt2`` (byte-level BPE with merges; the pre-tokenizer is
chosen by ``tokenizer.ggml.pre`` from the same table llama.cpp uses) and ``llama``
(SentencePiece-style BPE driven by token scores, with byte fallback). Anything else raises
``VocabError``, which ``mlx_gw.worker.loaders.gguf`` reports as a ``GGUFError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre
from transformers import PreTrainedTokenizerFast

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, copied from llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp). Each
# list is applied in order, every regex splitting the pieces the previous one produced, with the
# text between matches kept as pieces of its own: that is `Split(..., "isolated")` here.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (regexes, ignore_merges, add_bos default), as llama.cpp maps them.
_PRE: dict[str, tuple[list[str], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    **{
        name: ([_GPT2], False, False)
        for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling",
                     "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "a.x-4.0",
                     "mellum", "modern-bert")
    },
    **{
        name: ([r"\p{N}", _GPT2], False, False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva", "mellum2")
    },
    **{
        name: ([_LLAMA3], True, True)
        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2")
    },
    **{name: ([_LLAMA3], False, False) for name in ("dbrx", "smaug-bpe")},
    **{
        name: ([_QWEN2], False, False)
        for name in ("qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "hunyuan")
    },
}

# Tokens that end generation although the file does not name them eos/eot/eom; llama.cpp
# recognises the same texts (special_eog_ids), so generation stops where llama.cpp's would.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "<|end_of_text|>",
})


class VocabError(ValueError):
    """The file's vocabulary cannot be turned into a tokenizer; the message says why."""


def meta_scalar(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (mx.load returns numbers as 0-d arrays)."""
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _special(meta: Mapping[str, Any], tokens: list[str], name: str) -> int | None:
    token_id = meta_scalar(meta, f"tokenizer.ggml.{name}_token_id")
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise VocabError(f"tokenizer.ggml.{name}_token_id = {token_id} is outside the vocabulary")
    return int(token_id)


def _bpe_model(meta: Mapping[str, Any], tokens: list[str], ignore_merges: bool) -> models.BPE:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise VocabError("a gpt2 vocabulary needs tokenizer.ggml.merges, which is missing")
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise VocabError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    return models.BPE(_vocab(tokens), pairs, ignore_merges=ignore_merges)


def _spm_model(meta: Mapping[str, Any], tokens: list[str], unk: str | None) -> models.BPE:
    # llama.cpp's SentencePiece tokenizer repeatedly merges the adjacent pair whose concatenation
    # is the highest-scoring vocabulary entry. BPE with every (left, right) split of every entry
    # as a merge, ranked by the entry's score, makes the same choices.
    scores = meta_scalar(meta, "tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise VocabError("a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores")
    vocab = _vocab(tokens)
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    return models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True)


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a duplicated text keeps its first id, as llama.cpp does
    return vocab


def build_tokenizer(meta: Mapping[str, Any]) -> TokenizerWrapper:
    """Build the mlx-lm tokenizer described by a GGUF file's metadata (as mx.load returns it)."""
    kind = meta_scalar(meta, "tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise VocabError("the file has no vocabulary (tokenizer.ggml.tokens is missing)")
    types = meta_scalar(meta, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise VocabError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    bos, eos = _special(meta, tokens, "bos"), _special(meta, tokens, "eos")
    unk, pad = _special(meta, tokens, "unknown"), _special(meta, tokens, "padding")

    if kind == "gpt2":
        pre_name = meta_scalar(meta, "tokenizer.ggml.pre", "default")
        if pre_name not in _PRE:
            raise VocabError(
                f"pre-tokenizer tokenizer.ggml.pre = {pre_name!r} is not supported "
                f"(supported: {', '.join(sorted(_PRE))})"
            )
        regexes, ignore_merges, add_bos_default = _PRE[pre_name]
        tok = Tokenizer(_bpe_model(meta, tokens, ignore_merges))
        tok.pre_tokenizer = pre.Sequence(
            [pre.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        detokenizer: Any = BPEStreamingDetokenizer
    elif kind == "llama":
        add_bos_default = True
        prefix = bool(meta_scalar(meta, "tokenizer.ggml.add_space_prefix", True))
        tok = Tokenizer(_spm_model(meta, tokens, tokens[unk] if unk is not None else None))
        steps = [normalizers.Prepend("▁")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip(" ", 1, 0)] if prefix else []
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )

        def detokenizer(t: Any) -> SPMStreamingDetokenizer:
            return SPMStreamingDetokenizer(t, trim_space=prefix)
    else:
        raise VocabError(
            f"tokenizer.ggml.model = {kind!r} is not supported (supported: gpt2, llama)"
        )

    # Control tokens are matched as whole units in text and are "special" (skipped by
    # decode(skip_special_tokens=True)); user-defined ones are matched whole but are plain text.
    tok.add_tokens([
        AddedToken(tokens[i], special=t == _CONTROL, normalized=False)
        for i, t in enumerate(types)
        if t in (_CONTROL, _USER_DEFINED)
    ])
    _set_post_processor(tok, meta, tokens, bos, eos, add_bos_default)

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tokens[token_id]

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=text(bos),
        eos_token=text(eos),
        unk_token=text(unk),
        pad_token=text(pad),
        chat_template=meta_scalar(meta, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )
    return TokenizerWrapper(hf, detokenizer, eos_token_ids=sorted(_eog_ids(meta, tokens)))


def _set_post_processor(
    tok: Tokenizer,
    meta: Mapping[str, Any],
    tokens: list[str],
    bos: int | None,
    eos: int | None,
    add_bos_default: bool,
) -> None:
    # encode(add_special_tokens=True) adds BOS/EOS exactly when llama.cpp's tokenize would.
    add_bos = bos is not None and bool(
        meta_scalar(meta, "tokenizer.ggml.add_bos_token", add_bos_default)
    )
    add_eos = eos is not None and bool(meta_scalar(meta, "tokenizer.ggml.add_eos_token", False))
    if not (add_bos or add_eos):
        return
    head = [tokens[bos]] if add_bos else []
    tail = [tokens[eos]] if add_eos else []
    used = {(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on}
    tok.post_processor = processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B:1", *tail],
        special_tokens=sorted(used),
    )


def _eog_ids(meta: Mapping[str, Any], tokens: list[str]) -> set[int]:
    ids = {i for i, token in enumerate(tokens) if token in _EOG_TEXTS}
    for name in ("eos", "eot", "eom"):
        token_id = _special(meta, tokens, name)
        if token_id is not None:
            ids.add(token_id)
    return ids
