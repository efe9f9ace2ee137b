"""Verify passes attend over the KV buffer's whole allocated length (on CUDA).

A speculative verify feeds K+1 positions per row. With more than one query position MLX's
CUDA backend runs attention through cuDNN, whose graphs are cached by the exact key length:
every verify step, at a length never seen before, built a new graph first. On an H200 that
made a one-stream verify 48-58 ms against 3 ms for a plain step (`bench.spec_trace`,
bench/RESULTS.md), so speculation lost there even with every proposal accepted.

`whole_buffer(caches)` makes each BatchKVCache hand attention its whole buffer, which grows
256 positions at a time, with the positions past the written ones masked out: the key length
then changes once per 256 tokens, and cuDNN's cache holds the graph in between. The masked
positions get zero weight, so the result is the same attention. Plain decode steps (one
position: MLX's own vector kernel, any length) are not touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache

ON = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())


def _reserve(c: BatchKVCache, n: int) -> None:
    """Grow c's buffer now, as its next update of n positions would (mlx-lm's step), so the
    mask built before the update knows the length attention will see, and the update itself
    does not grow it."""
    prev, size = c._idx, c.keys.shape[2]
    if prev + n <= size:
        return
    steps = (c.step + n - 1) // c.step * c.step
    grown = []
    for x in (c.keys, c.values):
        if prev % c.step:
            x = x[..., :prev, :]
        grown.append(mx.concatenate([x, mx.zeros((*x.shape[:2], steps, x.shape[3]), x.dtype)],
                                    axis=2))
    c.keys, c.values = grown


def _make_mask(c: BatchKVCache, n: int, return_array: bool = False, **kw: Any) -> mx.array:
    mask = create_causal_mask(n, offset=c._idx, left_padding=c.left_padding, **kw)
    extra = c.keys.shape[2] - mask.shape[-1]
    return mx.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, extra)], constant_values=False)


def _update_and_fetch(c: BatchKVCache, keys: mx.array,
                      values: mx.array) -> tuple[mx.array, mx.array]:
    BatchKVCache.update_and_fetch(c, keys, values)
    return c.keys, c.values


@contextlib.contextmanager
def whole_buffer(caches: list[Any], n: int) -> Iterator[None]:
    """Within: every non-empty BatchKVCache in `caches`, about to take `n` positions, attends
    over its whole buffer (when ON: on CUDA; elsewhere attention's kernels do not depend on
    the key length)."""
    patched = [c for c in caches if ON and type(c) is BatchKVCache and c.keys is not None]
    for c in patched:
        _reserve(c, n)
        c.make_mask = _make_mask.__get__(c)
        c.update_and_fetch = _update_and_fetch.__get__(c)
    try:
        yield
    finally:
        for c in patched:
            del c.make_mask, c.update_and_fetch
