"""Per-request samplers for the LLM batch.

Greedy requests get no sampler (mlx-lm's batched argmax runs once for the whole batch).
Unseeded sampling requests with equal parameters share one sampler object, so BatchGenerator
can still sample them in one batched call; it carries its parameters, so speculative decoding
can compute the distribution it samples from (`spec_sampling`). A seeded request owns a sampler
with its own PRNG key chain, so its output depends on its seed alone, not on what else shares
the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from mlx_gw.worker.protocol import TokenLogprob

Sampler = Callable[[mx.array], mx.array]


def _filters(top_p: float, top_k: int, min_p: float) -> list[Callable[[mx.array], mx.array]]:
    methods: list[Callable[[mx.array], mx.array]] = []
    if 0 < top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        methods.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        methods.append(lambda x: apply_top_k(x, top_k))
    return methods


class SharedSampler:
    """mlx-lm's sampler for these parameters, plus the parameters: `filters` then a softmax of
    the filtered log-probabilities times 1/temp is the distribution `__call__` samples from."""

    def __init__(self, temp: float, top_p: float, top_k: int, min_p: float) -> None:
        self.temp, self.top_p, self.top_k, self.min_p = temp, top_p, top_k, min_p
        self._sample = make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self._sample(logprobs)

    def filters(self) -> list[Callable[[mx.array], mx.array]]:
        """The filters make_sampler applies, in its order (top-p, min-p, top-k)."""
        return _filters(self.top_p, self.top_k, self.min_p)


@lru_cache(maxsize=256)
def _shared_sampler(temp: float, top_p: float, top_k: int, min_p: float) -> Sampler:
    return SharedSampler(temp, top_p, top_k, min_p)


def _seeded_sampler(temp: float, top_p: float, top_k: int, min_p: float, seed: int) -> Sampler:
    methods = _filters(top_p, top_k, min_p)
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        for method in methods:
            logprobs = method(logprobs)
        return mx.random.categorical(logprobs * (1.0 / temp), key=sub)

    return sample


def sampler_for(
    *, temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None, vocab: int
) -> Sampler | None:
    """The sampler for one request, or None for greedy (the batch's shared argmax)."""
    if temperature <= 0.0:
        return None
    top_k = top_k if 0 < top_k < vocab else 0
    if seed is None:
        return _shared_sampler(temperature, top_p, top_k, min_p)
    return _seeded_sampler(temperature, top_p, top_k, min_p, seed)


def token_logprob(decode: Callable[[list[int]], str], token: int, logprobs: mx.array,
                  top: int) -> TokenLogprob:
    """The chosen token's log-probability, with the `top` most likely alternatives."""
    entry = TokenLogprob(decode([token]), float(logprobs[token].item()))
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        vals = logprobs[ids]
        order = mx.argsort(-vals)
        entry.top = [(decode([i]), v) for i, v in
                     zip(ids[order].tolist(), vals[order].tolist(), strict=True)]
    return entry
