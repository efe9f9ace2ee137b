"""A quantized KV cache that BatchGenerator can batch (models.yaml `kv_bits: 4 | 8`).

mlx-lm 0.32's QuantizedKVCache has no `merge`, so its BatchGenerator refuses it (and its
server turns batching off when kv_bits is set). `QuantizedKV` is that cache plus `merge`, and
`BatchQuantizedKVCache` is BatchKVCache's left-padded layout over quantized (packed, scales,
biases) triples: keys and values are quantized as they are written, and attention takes the
quantized path (`quantized_scaled_dot_product_attention`, chosen by the cache's `bits`).
Extracted per-sequence caches are `QuantizedKV` again, so the prompt cache keeps them
quantized too.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache, dynamic_roll

Triple = tuple[mx.array, mx.array, mx.array]


class QuantizedKV(QuantizedKVCache):
    """One sequence's quantized cache, batchable."""

    @classmethod
    def merge(cls, caches: list[QuantizedKV]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


def as_saveable(cache: Any) -> Any:
    """mlx-lm's save_prompt_cache names each cache by its class, which load_prompt_cache
    looks up in mlx-lm's own module: store a QuantizedKV as the QuantizedKVCache it is."""
    if type(cache) is QuantizedKV:
        plain = QuantizedKVCache(group_size=cache.group_size, bits=cache.bits)
        plain.state = cache.state
        return plain
    return cache


def as_batchable(cache: Any) -> Any:
    """The inverse of `as_saveable`, for a cache read back from disk."""
    if type(cache) is QuantizedKVCache:
        batchable = QuantizedKV(group_size=cache.group_size, bits=cache.bits)
        batchable.state = cache.state
        return batchable
    return cache


def fresh_caches(model: Any, bits: int, group_size: int) -> list[QuantizedKV]:
    """One empty quantized cache per layer. Raises ValueError for a model whose layers use
    another cache kind (sliding windows, state-space layers): those cannot be quantized."""
    from mlx_lm.models.cache import make_prompt_cache

    kinds = {type(c) for c in make_prompt_cache(model)}
    if kinds != {KVCache}:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise ValueError(f"kv_bits needs a plain KV cache in every layer; this model uses "
                         f"{names}: remove kv_bits for it")
    dim = _head_dim(model)
    if dim is not None and dim % group_size:
        raise ValueError(f"kv_group_size {group_size} does not divide this model's attention "
                         f"head size ({dim}): use a kv_group_size that does (32, 64, 128), "
                         "or remove kv_bits")
    return [QuantizedKV(group_size=group_size, bits=bits) for _ in model.layers]


def _head_dim(model: Any) -> int | None:
    attn = getattr(model.layers[0], "self_attn", None) if getattr(model, "layers", None) else None
    dim = getattr(attn, "head_dim", None)
    args = getattr(model, "args", None)
    if dim is None and args is not None:
        dim = getattr(args, "head_dim", None) or (
            args.hidden_size // args.num_attention_heads
            if getattr(args, "num_attention_heads", 0) else None)
    return int(dim) if dim else None


def _slice(t: Triple, *idx: Any) -> Triple:
    return tuple(x[idx] for x in t)  # type: ignore[return-value]


class BatchQuantizedKVCache(_BaseCache):
    step = 256

    def __init__(self, left_padding: list[int], group_size: int, bits: int) -> None:
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None
        self.group_size = group_size
        self.bits = bits

    # ------------------------------------------------------------------ writing

    def _alloc(self, b: int, h: int, steps: int, dim: int, dtype: mx.Dtype) -> Triple:
        per_int = 32 // self.bits
        shape = (b, h, steps)
        return (mx.zeros((*shape, dim // per_int), dtype=mx.uint32),
                mx.zeros((*shape, dim // self.group_size), dtype=dtype),
                mx.zeros((*shape, dim // self.group_size), dtype=dtype))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        prev = self._idx
        n = keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            b, h, _, dk = keys.shape
            steps = (self.step + n - 1) // self.step * self.step
            new_k = self._alloc(b, h, steps, dk, keys.dtype)
            new_v = self._alloc(b, h, steps, values.shape[3], values.dtype)
            if self.keys is not None and self.values is not None:
                if prev % self.step:
                    self.keys = _slice(self.keys, ..., slice(None, prev), slice(None))
                    self.values = _slice(self.values, ..., slice(None, prev), slice(None))
                self.keys = tuple(mx.concatenate([a, z], axis=2)
                                  for a, z in zip(self.keys, new_k, strict=True))
                self.values = tuple(mx.concatenate([a, z], axis=2)
                                    for a, z in zip(self.values, new_v, strict=True))
            else:
                self.keys, self.values = new_k, new_v
        self.offset = self.offset + n
        self._idx += n
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for i in range(3):
            self.keys[i][..., prev:self._idx, :] = qk[i]
            self.values[i][..., prev:self._idx, :] = qv[i]
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Triple, Triple]:
        assert self.keys is not None and self.values is not None
        cut = (..., slice(None, self._idx), slice(None))
        return _slice(self.keys, *cut), _slice(self.values, *cut)

    # ------------------------------------------------------------------ padding

    def prepare(self, *, left_padding: list[int] | None = None, lengths: Any = None,
                right_padding: list[int] | None = None) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            pad = mx.array(left_padding)
            self.left_padding += pad
            self.offset = self.offset - pad
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        if self._right_padding is None or self.keys is None or self.values is None:
            return
        pad = self._right_padding
        self.keys = tuple(dynamic_roll(x, pad[:, None], axis=2) for x in self.keys)
        self.values = tuple(dynamic_roll(x, pad[:, None], axis=2) for x in self.values)
        self.offset = self.offset - pad
        self.left_padding += pad
        self._right_padding = None

    def make_mask(self, n: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return create_causal_mask(n, offset=self._idx, left_padding=self.left_padding, **kwargs)

    # ------------------------------------------------------------------ the batch

    def filter(self, batch_indices: list[int]) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = _slice(self.keys, batch_indices)
            self.values = _slice(self.values, batch_indices)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist()) if self.left_padding.size else 0
        if shift > 0:
            if self.keys is not None and self.values is not None:
                cut = (..., slice(shift, None), slice(None))
                self.keys = _slice(self.keys, *cut)
                self.values = _slice(self.values, *cut)
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        top = max(self._idx, other._idx)
        ref = self if self.keys is not None else other
        assert ref.keys is not None and ref.values is not None
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def padded(c: BatchQuantizedKVCache) -> tuple[Triple, Triple, mx.array, mx.array]:
            if c.keys is None or c.values is None:
                b = c.offset.shape[0]
                k = tuple(mx.zeros((b, x.shape[1], 0, x.shape[3]), x.dtype) for x in ref.keys)
                v = tuple(mx.zeros((b, x.shape[1], 0, x.shape[3]), x.dtype)
                          for x in ref.values)
            else:
                k, v = c.keys, c.values
            left = top - c._idx
            right = size - k[0].shape[2] - left
            if right < 0:
                k = _slice(k, ..., slice(None, right), slice(None))
                v = _slice(v, ..., slice(None, right), slice(None))
                right = 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                k = tuple(mx.pad(x, widths) for x in k)
                v = tuple(mx.pad(x, widths) for x in v)
            return k, v, c.offset, c.left_padding + left

        (ka, va, oa, la), (kb, vb, ob, lb) = padded(self), padded(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(ka, kb, strict=True))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(va, vb, strict=True))
        self.offset = mx.concatenate([oa, ob])
        self.left_padding = mx.concatenate([la, lb])
        self._idx = top

    def extract(self, idx: int) -> QuantizedKV:
        assert self.keys is not None and self.values is not None
        pad = self.left_padding.tolist()[idx]
        cut = (slice(idx, idx + 1), slice(None), slice(pad, self._idx))
        cache = QuantizedKV(group_size=self.group_size, bits=self.bits)
        cache.keys = tuple(mx.contiguous(x) for x in _slice(self.keys, *cut))
        cache.values = tuple(mx.contiguous(x) for x in _slice(self.values, *cut))
        cache.offset = cache.keys[0].shape[2]
        return cache

    @classmethod
    def merge(cls, caches: list[QuantizedKV]) -> BatchQuantizedKVCache:
        first = caches[0]
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        if longest == 0:
            return cls([0] * len(caches), first.group_size, first.bits)
        ref = next(c for c in caches if c.keys is not None)
        pads = [longest - n for n in lengths]

        def stack(part: str) -> Triple:
            out = tuple(mx.zeros((len(caches), x.shape[1], longest, x.shape[3]), x.dtype)
                        for x in getattr(ref, part))
            for i, (p, c) in enumerate(zip(pads, caches, strict=True)):
                if c.keys is None:
                    continue
                for dst, src in zip(out, getattr(c, part), strict=True):
                    dst[i:i + 1, :, p:p + c.offset] = src[..., :c.offset, :]
            return out

        batch = cls(pads, ref.group_size, ref.bits)
        batch.keys, batch.values = stack("keys"), stack("values")
        batch.offset += longest
        batch._idx = longest
        return batch

    # ------------------------------------------------------------------ bookkeeping

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self) -> tuple[Any, ...]:
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))
