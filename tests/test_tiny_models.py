"""Checks that the tiny test models load in mlx-lm and behave as the other tests assume."""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_models import CHATML_TEMPLATE, build_tiny_llama, build_tiny_models

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

PROMPTS = (
    "Hello",
    "What is the capital of France?",
    "Write a short poem about the moon.",
    "café 日本語 🙂",
)
NON_ASCII = "café naïve 日本語のテキスト 🙂🎉 привет — “quoted” €100"


def greedy(model: Any, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy-decode ``steps`` tokens; returns the tokens and each step's top-1/top-2 gap."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array([prompt_ids])
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(steps):
        logits = model(x, cache=cache)[0, -1]
        second, first = mx.sort(logits)[-2:].tolist()
        gaps.append(first - second)
        token = int(mx.argmax(logits).item())
        tokens.append(token)
        x = mx.array([[token]])
    return tokens, gaps


def chat_ids(tokenizer: Any, content: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"), n=2)


@pytest.fixture(scope="module")
def loaded(tiny_dirs: list[Path]) -> tuple[Any, Any]:
    return mlx_lm.load(str(tiny_dirs[0]))


def test_builds_folders(tiny_dirs: list[Path]) -> None:
    assert [d.name for d in tiny_dirs] == ["tiny-0", "tiny-1"]
    for d in tiny_dirs:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (d / name).is_file()


def test_chat_template_renders(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    ids = chat_ids(tokenizer, "Hi")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_special_tokens_and_eos(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    # Special tokens encode as one id each, not as their characters.
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == (
        tokenizer.convert_tokens_to_ids("<|im_start|>")
    )
    assert model.args.vocab_size == len(tokenizer.get_vocab())


def test_non_ascii_round_trip(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    ids = tokenizer.encode(NON_ASCII, add_special_tokens=False)
    assert tokenizer.decode(ids) == NON_ASCII
    # Some character must span several tokens, so streaming detokenizers get exercised.
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)

    detok = tokenizer.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == NON_ASCII


def test_greedy_is_varied_and_well_separated(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    all_gaps: list[float] = []
    for prompt in PROMPTS:
        tokens, gaps = greedy(model, chat_ids(tokenizer, prompt), steps=20)
        assert len(set(tokens)) >= 3, (prompt, tokens)
        all_gaps += gaps
    near_ties = sum(g <= 1e-3 for g in all_gaps)
    assert near_ties <= len(all_gaps) // 20, sorted(all_gaps)[:10]


def test_same_seed_same_files_and_outputs(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    again = build_tiny_llama(tmp_path / "again", seed=0)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert filecmp.cmp(again / name, tiny_dirs[0] / name, shallow=False), name

    outputs = []
    for d in (tiny_dirs[0], again):
        model, tokenizer = mlx_lm.load(str(d))
        outputs.append([greedy(model, chat_ids(tokenizer, p), steps=12)[0] for p in PROMPTS])
    assert outputs[0] == outputs[1]


def test_different_seeds_differ(tiny_dirs: list[Path]) -> None:
    outs = []
    for d in tiny_dirs:
        model, tokenizer = mlx_lm.load(str(d))
        outs.append(greedy(model, chat_ids(tokenizer, PROMPTS[1]), steps=12)[0])
    assert outs[0] != outs[1]


def test_bfloat16_build_loads(tmp_path: Path) -> None:
    d = build_tiny_llama(tmp_path / "half", seed=5, dtype="bfloat16", num_layers=1)
    model, tokenizer = mlx_lm.load(str(d))
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    tokens, _ = greedy(model, chat_ids(tokenizer, "Hello"), steps=3)
    assert len(tokens) == 3
