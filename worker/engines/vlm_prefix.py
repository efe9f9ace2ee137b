"""KV reuse across requests for the VLM engine: mlx-vlm's automatic prefix cache (APC).

mlx-vlm's BatchGenerator reuses cached KV blocks (16 tokens each, chained hashes) when it is
given an `APCManager`; this wraps one with the model's byte budget and the worker's prompt
cache interface (bytes, entries, hit and miss tokens, `shrink`), so heartbeats, metrics and
the supervisor's memory pressure treat a VLM like an LLM. Each request's blocks are salted
with a hash of its images (`salt`): a prefix seen with other images, or none, never matches,
so the text side of a conversation is reused and an image is never mistaken for another.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

log = logging.getLogger("mlxgw.worker")

BLOCK_TOKENS = 16  # mlx-vlm's default block
POOL_BLOCKS = 8192  # block slots (cheap objects); the byte budget is the real bound


class VisionPrefixCache:
    disk = None  # no disk tier for vision models (yet)

    def __init__(self, max_bytes: int, model: Any, processor: Any) -> None:
        from mlx_vlm import apc

        self._apc = apc
        self.max_bytes = max_bytes
        self.manager = apc.APCManager(
            num_blocks=POOL_BLOCKS, block_size=BLOCK_TOKENS, disk=None,
            overrides={"enabled": True, "memory_max_gb": max_bytes / 2**30})
        self._deps = (model, processor)
        self.hit_tokens = 0  # prompt tokens served from the cache, since load
        self.miss_tokens = 0  # prompt tokens prefilled

    def salt(self, pixel_values: Any) -> int:
        """The hash every block of a request is chained with: its images, and the model."""
        image = self._apc.hash_image_payload(pixel_values=pixel_values) \
            if pixel_values is not None else 0
        model, processor = self._deps
        return self._apc.semantic_extra_hash(image_hash=image, model=model, processor=processor)

    def count(self, prompt_tokens: int, cached: int) -> None:
        self.hit_tokens += cached
        self.miss_tokens += prompt_tokens - cached

    @property
    def nbytes(self) -> int:
        return self.manager.resident_bytes()

    @property
    def entries(self) -> int:
        return sum(1 for b in self.manager.pool if b.block_hash is not None)

    def shrink(self, max_bytes: int) -> int:
        """Drop least recently used idle blocks until at most `max_bytes` remain; returns
        the bytes freed. Blocks a running request holds stay."""
        before = self.nbytes
        budget = self.manager.memory_max_bytes
        try:
            self.manager.memory_max_bytes = max(0, max_bytes)
            self.manager._make_room()  # mlx-vlm's own LRU eviction of idle blocks
        finally:
            self.manager.memory_max_bytes = budget
        freed = max(0, before - self.nbytes)
        if freed:
            mx.clear_cache()
            log.info("[prompt-cache] shrunk by %.0f MiB", freed / 2**20)
        return freed

    def close(self) -> None:
        self.manager.close()
