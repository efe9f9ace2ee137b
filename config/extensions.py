"""models.yaml keys of issue 17: a model's LoRA `adapters` and its `speculative` decoding.

`parse_adapters` turns `adapters: {NAME: PATH}` into (name, absolute directory) pairs, each
directory holding what mlx-lm's LoRA trainer writes; `check_speculative` validates
`speculative: {method: ngram | draft, num_tokens: K, draft_model: NAME_OR_PATH}`. Both raise
ConfigError naming the key and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlx_gw.config.fields import (
    NAME_RE,
    NAME_RULE,
    check_int,
    check_known_keys,
    check_str,
    describe,
)
from mlx_gw.config.schema import ConfigError, SpeculativeConfig

ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")
SPEC_METHODS = ("ngram", "draft")
MAX_SPEC_TOKENS = 16


def parse_adapters(value: object, key: str, base_dir: Path, env: Mapping[str, str],
                   check_paths: bool) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping of adapter name to directory, got "
                          f"{describe(value)}", key=key,
                          fix="write e.g. `adapters: {support-bot: ./adapters/support}`")
    out = []
    for name, raw in value.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(f"invalid adapter name {name!r}", key=where,
                              fix=f"names must {NAME_RULE}")
        text = check_str(raw, where)
        home = env.get("HOME") or str(Path.home())
        path = Path(home + text[1:]) if text == "~" or text.startswith("~/") else Path(text)
        path = Path(os.path.normpath(path if path.is_absolute() else base_dir / path))
        missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
        if check_paths and missing:
            raise ConfigError(f"adapter directory {text!r} ({path}) has no {', '.join(missing)}",
                              key=where, fix="point at a directory written by `mlx_lm.lora` "
                              "or `mlx-gw train` (adapter_config.json + adapters.safetensors)")
        out.append((name, str(path)))
    return tuple(out)


def check_speculative(value: object, key: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {describe(value)}", key=key,
                          fix="write e.g. `speculative: {method: ngram, num_tokens: 4}`")
    check_known_keys(value, key, ("method", "num_tokens", "draft_model"))
    method = value.get("method")
    if method not in SPEC_METHODS:
        raise ConfigError(f"method {method!r} is not one of {', '.join(SPEC_METHODS)}",
                          key=f"{key}.method", fix="ngram (prompt lookup, no second model) or "
                          "draft (a smaller model with the same tokenizer)")
    k = check_int(value.get("num_tokens", 4), f"{key}.num_tokens", low=1, high=MAX_SPEC_TOKENS)
    draft = value.get("draft_model")
    if method == "draft" and draft is None:
        raise ConfigError("method draft needs `draft_model`", key=f"{key}.draft_model",
                          fix="name a configured llm model or give a model directory")
    if method == "ngram" and draft is not None:
        raise ConfigError("draft_model is only read with method: draft", key=f"{key}.draft_model",
                          fix="remove it, or set method: draft")
    return SpeculativeConfig(method=method, num_tokens=k,
                             draft_model=None if draft is None else check_str(draft, key))


def resolve_drafts(models: dict[str, Any], base_dir: Path, check_paths: bool) -> dict[str, Any]:
    """Each `speculative.draft_model` as the worker loads it: a configured llm model's path
    and dtype, else a directory (relative to the config file) or a Hugging Face repo id."""
    from dataclasses import replace

    out = {}
    for name, model in models.items():
        sp = model.speculative
        if sp is not None and sp.method == "draft":
            key = f"models.{name}.speculative.draft_model"
            other = models.get(sp.draft_model)
            if other is not None:
                if other.type != "llm" or other.name == name:
                    raise ConfigError(f"{sp.draft_model!r} is not another llm model", key=key,
                                      fix="name a smaller llm model with the same tokenizer")
                sp = replace(sp, draft_path=other.path, draft_dtype=other.dtype)
            else:
                raw = sp.draft_model or ""
                path = Path(os.path.expanduser(raw))
                path = path if path.is_absolute() else base_dir / path
                if path.exists():
                    sp = replace(sp, draft_path=os.path.normpath(path), draft_dtype=model.dtype)
                elif raw.count("/") == 1 and not raw.startswith((".", "/", "~")):
                    sp = replace(sp, draft_path=raw, draft_dtype=model.dtype)  # a repo id
                elif check_paths:
                    raise ConfigError(f"{raw!r} is neither a configured model nor a path "
                                      f"(looked at {path})", key=key,
                                      fix="name a configured llm model, or a model directory")
                else:
                    sp = replace(sp, draft_path=str(path), draft_dtype=model.dtype)
            model = replace(model, speculative=sp)
        out[name] = model
    return out
