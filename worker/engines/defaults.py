"""What a text request did not say, resolved inside the worker, which knows the model's files:
sampling parameters, the completion bound, and the end of a cut sequence's text.

Sampling, per parameter, first set wins: the request, models.yaml (stamped on the request by
the gateway), then the model's own defaults. The model's own defaults are its
`generation_config.json` (what transformers and vLLM read), else the `general.sampling.*` keys
of a GGUF file; where the model says anything, what it leaves out is neutral (temperature 1,
no top-p/top-k/min-p cut), as in vLLM. A model that says nothing gets `FALLBACK`: greedy, as
transformers decodes a model whose generation_config names no sampling. That suits the small
models served by default: SmolLM2-135M-Instruct's first token for "What is the capital of
France?" is "The" at p=0.15 against "L" at 0.14 (then French rambling), so any sampling
temperature derails a large share of answers; greedy answers "The capital of France is
Paris." Its repetition loops are bounded by the default max_tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.protocol import Generate

log = logging.getLogger("mlxgw.worker")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    source: str = "neutral"  # where these came from, for the worker's log line


DEFAULT_CONTEXT_LENGTH = 4096  # a model whose config names no context window
NEUTRAL = Sampling()  # what a model that names some defaults leaves out
# For models whose files name no sampling defaults (the README documents these values).
FALLBACK = Sampling(temperature=0.0, source="fallback (greedy)")
_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float}
# llama.cpp's GGUF keys (gguf-py Keys.General.SAMPLING_*) for the same parameters.
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p"}


def _typed(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, kind in _KEYS.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = kind(value)
    return out


def from_generation_config(model_dir: Path) -> dict[str, Any]:
    """The sampling keys of `model_dir/generation_config.json` ({} when absent or unreadable).
    `do_sample: false` means greedy, as in transformers."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    found = _typed(config)
    if config.get("do_sample") is False:
        found["temperature"] = 0.0
    elif config.get("do_sample") is True:
        found.setdefault("temperature", 1.0)
    return found


def from_gguf(path: str) -> dict[str, Any]:
    """The `general.sampling.*` keys of a GGUF file's header ({} when it has none)."""
    from mlx_gw.formats.gguf_header import GGUFHeaderError, read_header

    try:
        meta = read_header(path).metadata
    except (GGUFHeaderError, OSError):
        return {}
    return _typed({ours: meta[key] for key, ours in _GGUF_KEYS.items() if key in meta})


def model_sampling(path: str) -> Sampling:
    """The sampling defaults of the model at `path` (a .gguf file, an MLX model dir, or a
    Hugging Face repo id in the local cache)."""
    if path.lower().endswith(".gguf"):
        found, source = from_gguf(path), "GGUF metadata"
    else:
        found, source = {}, "generation_config.json"
        try:
            from mlx_lm.utils import _download  # resolves a repo id in the local cache

            found = from_generation_config(Path(_download(path)))
        except Exception as e:  # a private helper of mlx-lm; without it: no model defaults
            log.debug("no generation_config.json for %s: %s", path, e)
    if not found:
        return FALLBACK
    return replace(Sampling(**found), source=source)


def resolve_sampling(req: Generate, model: Sampling) -> Sampling:
    """The request's sampling with every parameter it left as None taken from `model`."""
    return Sampling(
        temperature=model.temperature if req.temperature is None else req.temperature,
        top_p=model.top_p if req.top_p is None else req.top_p,
        top_k=model.top_k if req.top_k is None else req.top_k,
        min_p=model.min_p if req.min_p is None else req.min_p,
        source="request",
    )


def completion_budget(req: Generate, prompt_tokens: int, context_length: int) -> int:
    """Most tokens this request may generate. A client's max_tokens must fit the window
    (else context_length_exceeded, as OpenAI answers); the default bound is cut to fit."""
    n, ctx = prompt_tokens, context_length
    room = ctx - n
    if req.max_tokens is None:
        max_tokens = room if req.default_max_tokens is None else min(req.default_max_tokens,
                                                                      room)
    else:
        max_tokens = req.max_tokens
    if n >= ctx or n + max_tokens > ctx:
        raise AdmissionError(
            "context_length_exceeded",
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n + max(max_tokens, 0)} tokens ({n} in the prompt, {max_tokens} in the "
            "completion). Please reduce the length of the prompt or the completion.",
        )
    if max_tokens <= 0:
        raise AdmissionError("invalid_request", "max_tokens must be at least 1")
    return max_tokens


def final_text(segment: str, finish: str | None) -> str:
    """A detokenizer's segment, without the replacement characters that a sequence ending in
    the middle of a multi-byte character (cut by max_tokens, say) leaves at its end: the
    incomplete character is dropped rather than shown as U+FFFD."""
    return segment.rstrip("\ufffd") if finish else segment
