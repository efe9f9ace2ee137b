"""KV reuse across requests for the LLM engine: the prompt cache, on mlx-lm's LRUPromptCache.

A finished (or stopped) sequence leaves its KV cache here, keyed by every token it holds
(prompt and generated). A new request looks up the longest cached prefix of its prompt
tokens (`lookup`): an exact or shorter entry is used as is, a longer one is trimmed to the
common prefix (a copy: the entry stays); BatchGenerator then prefills only the rest, with hits
and misses side by side in one batch. Entries live in one worker, which serves one model, so
a prefix of another model never matches; each LoRA adapter has its own key (`key`), so an
adapter's KV never serves the base or another adapter, and only the base's entries go to disk.
The bytes are bounded (`max_bytes`, least recently used out first)
and counted in the worker's heartbeat; `shrink` gives memory back when the supervisor asks.
With a disk tier (prompt_disk.py), what leaves memory (evicted by the budget, shrunk, or still
here when the worker shuts down) is written to disk, and a lookup that finds a longer prefix
on disk than in memory loads it from there.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import (
    LRUPromptCache,
    PromptTrie,
    PromptTrieResult,
    can_trim_prompt_cache,
    trim_prompt_cache,
)

from mlx_gw.worker.engines.prompt_disk import DiskTier

log = logging.getLogger("mlxgw.worker")

MiB = 2**20
MIN_DEFAULT_BYTES = 256 * MiB
MAX_DEFAULT_BYTES = 4 * 2**30
MAX_ENTRIES = 256  # beyond the byte budget: many tiny entries cost lookups, not memory
BASE_KEY = "model"  # one model per worker; an adapter's entries live under its own key
SPILL_ON_CLOSE_S = 3.0  # the gateway waits 5 s for a worker to exit after Shutdown
# A shorter hit is refused: it saves a few tokens of prefill but costs a copy of the whole
# entry and sends the request down the batch's cache-merging path. Prompts that share only a
# template's opening ("Request 12: ..." in the benchmark) hit 5-10 tokens: on an H200 that
# made every gateway request slower than the same request in-process (issue 20).
MIN_HIT_TOKENS = 32


def default_max_bytes(weight_bytes: int, memory_limit_bytes: int | None) -> int:
    """Half the model's weights, within [256 MiB, 4 GiB], and at most an eighth of the
    gateway's memory ceiling: room for a few agents' histories beside the weights."""
    budget = min(max(weight_bytes // 2, MIN_DEFAULT_BYTES), MAX_DEFAULT_BYTES)
    if memory_limit_bytes:
        budget = min(budget, memory_limit_bytes // 8)
    return budget


class FastTrie(PromptTrie):
    """mlx-lm's PromptTrie with a search that costs the prompt's length, not the cache's size.

    mlx-lm's `search` finds the shortest entry extending the matched prefix by a depth-first
    walk of everything below it, copying the path list at every node: with the prompts of
    many conversations under one shared opening, that is the whole trie, quadratic in entry
    length (1.4-2.7 ms per search on an H200's host at 64-128 cached entries; a lookup
    searched twice, and the worker loop stalled 10-70 ms per step while a wave of requests
    was admitted, issue 20). Any entry below the matched node shares the same common prefix,
    so this one descends to the nearest value along a single path instead."""

    def search(self, model: Any, tokens: list[int]) -> PromptTrieResult:
        if model not in self._trie:
            return PromptTrieResult(model, None, None, None, 0)
        current = self._trie[model]
        if not tokens and "__value__" in current:
            return PromptTrieResult(model, [], None, None, 0)
        last_index, index = -1, 0
        while index < len(tokens) and tokens[index] in current:
            current = current[tokens[index]]
            if "__value__" in current:
                last_index = index
            index += 1
        if last_index == len(tokens) - 1 >= 0:
            return PromptTrieResult(model, tokens, None, None, 0)
        shorter = tokens[: last_index + 1] if last_index > 0 else None
        longer = None
        if index > 0:
            extra: list[int] = []
            while "__value__" not in current and current:  # pop prunes: a value lies below
                tok = next(iter(current))
                extra.append(tok)
                current = current[tok]
            longer = tokens[:index] + extra if "__value__" in current else None
        return PromptTrieResult(model, None, shorter, longer, index)


class _EvictionTrie(FastTrie):
    """LRUPromptCache's trie, keeping what the LRU evicts (`pop` is its eviction: redundant
    prefixes leave through `pop_prefixes`) until the disk tier has written it."""

    def __init__(self) -> None:
        super().__init__()
        self.evicted: list[tuple[list[int], list[Any]]] = []

    def pop(self, model: Any, tokens: list[int]) -> Any:
        entry = super().pop(model, tokens)
        if model == BASE_KEY:  # the disk tier is keyed by the base model's files alone
            self.evicted.append((list(tokens), entry.prompt_cache))
        return entry


class PromptCache:
    def __init__(self, max_bytes: int, disk: DiskTier | None = None) -> None:
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=max_bytes)
        self.disk = None
        with_disk = disk is not None and max_bytes > 0
        if isinstance(getattr(self._lru, "_trie", None), PromptTrie):
            # Still empty: ours searches in the prompt's length (FastTrie), and with a disk
            # tier also keeps what the LRU evicts.
            self._lru._trie = _EvictionTrie() if with_disk else FastTrie()
            if with_disk:
                self._evictions, self.disk = self._lru._trie, disk
        elif with_disk:  # another mlx-lm's internals: serve from memory only
            log.warning("[prompt-cache] this mlx-lm's LRUPromptCache has no trie to "
                        "watch: the disk tier is off")
        self.hit_tokens = 0  # prompt tokens served from the cache, since load
        self.miss_tokens = 0  # prompt tokens prefilled
        self.disk_hit_tokens = 0  # of hit_tokens, those loaded from the disk tier

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    @property
    def entries(self) -> int:
        return len(self._lru)

    def lookup(self, tokens: list[int], key: str = BASE_KEY) -> tuple[list[Any] | None, int]:
        """(a KV cache holding tokens[:n], n) for the longest usable cached prefix, or
        (None, 0). At least one token is always left to prefill: the model needs it to
        produce the first logits."""
        if self.max_bytes <= 0 or len(tokens) < 2:
            self.miss_tokens += len(tokens)
            return None, 0
        cache, rest = None, tokens
        if self._reusable(tokens, key) >= MIN_HIT_TOKENS:
            cache, rest = self._lru.fetch_nearest_cache(key, tokens)
        n = len(tokens) - len(rest) if cache is not None else 0
        if cache is not None and n >= len(tokens):  # an exact hit: give one token back
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, n - (len(tokens) - 1))
                n = len(tokens) - 1
            else:
                cache, n = None, 0
        if cache is not None and n < MIN_HIT_TOKENS:
            cache, n = None, 0
        if self.disk is not None and key == BASE_KEY:  # memory first; disk for a longer prefix
            found, m = self.disk.load(tokens, better_than=max(n, MIN_HIT_TOKENS - 1))
            if found is not None:
                cache, n = found, m
                self.disk_hit_tokens += n
        self.hit_tokens += n
        self.miss_tokens += len(tokens) - n
        return cache, n

    def _reusable(self, tokens: list[int], key: str) -> int:
        """How many leading tokens the memory tier could serve, found without copying an
        entry (fetch_nearest_cache copies whatever it finds)."""
        trie = getattr(self._lru, "_trie", None)
        if not isinstance(trie, PromptTrie):  # another mlx-lm's internals: let it decide
            return len(tokens)
        found = trie.search(key, tokens)
        if found.exact is not None:
            return len(tokens)
        shorter = len(found.shorter) if found.shorter is not None else 0
        return max(shorter, found.common_prefix if found.longer is not None else 0)

    def store(self, tokens: list[int], cache: list[Any] | None, key: str = BASE_KEY) -> None:
        """Keep `cache` (which holds exactly `tokens`) for later prompts that start with them."""
        if cache is None or self.max_bytes <= 0 or not tokens:
            return
        if any(getattr(c, "offset", len(tokens)) != len(tokens) for c in cache):
            return  # the cache and its key disagree: never risk a wrong prefix
        # BatchGenerator hands a finished sequence's KV over as lazy copies (mx.contiguous of
        # a slice) of the whole batch's cache: left unevaluated, every entry would keep that
        # batch's buffers alive (gigabytes on a GPU at 64 streams). Start the copies now.
        mx.async_eval([c.state for c in cache])
        self._lru.insert_cache(key, list(tokens), cache)
        self._spill()

    def _spill(self) -> None:
        """Write what the LRU just evicted to the disk tier (oldest first, so the newest
        gets the newest mtime)."""
        if self.disk is None:
            return
        evicted, self._evictions.evicted = self._evictions.evicted, []
        for tokens, cache in evicted:
            self.disk.save(tokens, cache)

    def close(self) -> None:
        """The worker is stopping: write what memory holds to the disk tier, most recently
        used first, for at most SPILL_ON_CLOSE_S and never more than the disk budget (an
        older entry would only push out a newer one)."""
        if self.disk is None or not len(self._lru):
            return
        t0 = time.perf_counter()
        self._lru.trim_to(n_bytes=0)  # every entry leaves, least recently used first
        evicted, self._evictions.evicted = self._evictions.evicted, []
        stamp, written, n = time.time_ns(), 0, 0
        for rank, (tokens, cache) in enumerate(reversed(evicted)):
            size = sum(c.nbytes for c in cache)
            if written + size > self.disk.max_bytes or time.perf_counter() - t0 > SPILL_ON_CLOSE_S:
                break
            written += self.disk.save(tokens, cache, mtime_ns=stamp - rank * 1000)
            n += 1
        log.info("[prompt-cache] wrote %d of %d entries (%.1f MiB) to disk at shutdown in "
                 "%.0f ms", n, len(evicted), written / MiB, (time.perf_counter() - t0) * 1e3)

    def shrink(self, max_bytes: int) -> int:
        """Drop least recently used entries until at most `max_bytes` remain (the budget
        itself is unchanged); returns the bytes freed."""
        before = self._lru.nbytes
        self._lru.trim_to(n_bytes=max(0, max_bytes))
        freed = before - self._lru.nbytes
        self._spill()
        if freed:
            mx.clear_cache()
            log.info("[prompt-cache] shrunk by %.0f MiB to %.0f MiB", freed / MiB,
                     self._lru.nbytes / MiB)
        return freed
