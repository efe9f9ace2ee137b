"""KV reuse across requests for the LLM engine: the prompt cache, on mlx-lm's LRUPromptCache.

A finished (or stopped) sequence leaves its KV cache here, keyed by every token it holds
(prompt and generated). A new request looks up the longest cached prefix of its prompt
tokens (`lookup`): an exact or shorter entry is used as is, a longer one is trimmed to the
common prefix (a copy: the entry stays); BatchGenerator then prefills only the rest, with hits
and misses side by side in one batch. Entries live in one worker, which serves one model, so
a prefix of another model never matches; a different template or adapter tokenizes to other
tokens and so misses too. The bytes are bounded (`max_bytes`, least recently used out first)
and counted in the worker's heartbeat; `shrink` gives memory back when the supervisor asks.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

log = logging.getLogger("mlxgw.worker")

MiB = 2**20
MIN_DEFAULT_BYTES = 256 * MiB
MAX_DEFAULT_BYTES = 4 * 2**30
MAX_ENTRIES = 256  # beyond the byte budget: many tiny entries cost lookups, not memory
_KEY = "model"  # one model per worker


def default_max_bytes(weight_bytes: int, memory_limit_bytes: int | None) -> int:
    """Half the model's weights, within [256 MiB, 4 GiB], and at most an eighth of the
    gateway's memory ceiling: room for a few agents' histories beside the weights."""
    budget = min(max(weight_bytes // 2, MIN_DEFAULT_BYTES), MAX_DEFAULT_BYTES)
    if memory_limit_bytes:
        budget = min(budget, memory_limit_bytes // 8)
    return budget


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=max_bytes)
        self.hit_tokens = 0  # prompt tokens served from the cache, since load
        self.miss_tokens = 0  # prompt tokens prefilled

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    @property
    def entries(self) -> int:
        return len(self._lru)

    def lookup(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """(a KV cache holding tokens[:n], n) for the longest usable cached prefix, or
        (None, 0). At least one token is always left to prefill: the model needs it to
        produce the first logits."""
        if self.max_bytes <= 0 or len(tokens) < 2:
            self.miss_tokens += len(tokens)
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_KEY, tokens)
        n = len(tokens) - len(rest) if cache is not None else 0
        if cache is not None and n >= len(tokens):  # an exact hit: give one token back
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, n - (len(tokens) - 1))
                n = len(tokens) - 1
            else:
                cache, n = None, 0
        if cache is not None and n <= 0:
            cache = None
        self.hit_tokens += n
        self.miss_tokens += len(tokens) - n
        return cache, n

    def store(self, tokens: list[int], cache: list[Any] | None) -> None:
        """Keep `cache` (which holds exactly `tokens`) for later prompts that start with them."""
        if cache is None or self.max_bytes <= 0 or not tokens:
            return
        if any(getattr(c, "offset", len(tokens)) != len(tokens) for c in cache):
            return  # the cache and its key disagree: never risk a wrong prefix
        self._lru.insert_cache(_KEY, list(tokens), cache)

    def shrink(self, max_bytes: int) -> int:
        """Drop least recently used entries until at most `max_bytes` remain (the budget
        itself is unchanged); returns the bytes freed."""
        before = self._lru.nbytes
        self._lru.trim_to(n_bytes=max(0, max_bytes))
        freed = before - self._lru.nbytes
        if freed:
            mx.clear_cache()
            log.info("[prompt-cache] shrunk by %.0f MiB to %.0f MiB", freed / MiB,
                     self._lru.nbytes / MiB)
        return freed
