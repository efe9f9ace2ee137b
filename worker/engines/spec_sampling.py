"""Exact speculative sampling for batch rows that sample (temperature > 0).

Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a proposal x at a
position is accepted with probability min(1, p(x)/q(x)), where p is the target's distribution
there as the row's sampler would sample it (temperature, top-p, min-p, top-k applied the way
`sampling.SharedSampler` applies them) and q the draft's (its own processed distribution, which
the draft sampled x from). At the first rejection the row's token is drawn from
norm(max(0, p - q)); when every proposal is accepted, a bonus token from p at the next position.
Prompt lookup proposes deterministically (q is a point mass on x): accept with probability p(x),
on rejection draw from p with x removed. Greedy rows are the same rule with p a point mass on
the argmax: they accept exactly the proposals equal to the target's argmax.

Truncating to the batch's common count m (BatchKVCache rewinds every row alike) stays exact:
every token the procedure emits is, given the tokens before it, distributed as p, and whether a
position is emitted depends only on earlier positions (this row's acceptances and other rows'
independent ones). So each row emits its first m accepted proposals, then its own token at
position m+1: the proposal there if the row accepted it, else its residual draw (or the bonus
when m = K). Seeded rows (own key chains) and rows with logits processors are not covered
(`row_dists` answers None): their batch takes the plain step.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler

from mlx_gw.worker.engines.sampling import SharedSampler


class RowDists:
    """Each row's sampling distribution, computed in one batched call per distinct sampler."""

    def __init__(self, samplers: list[SharedSampler | None]) -> None:
        groups: dict[int, tuple[SharedSampler | None, list[int]]] = {}
        for i, s in enumerate(samplers):
            groups.setdefault(id(s), (s, []))[1].append(i)
        self.groups = list(groups.values())
        order = [i for _, rows in self.groups for i in rows]
        self._inverse = None if order == sorted(order) else mx.array(np.argsort(order))

    def probs(self, logprobs: mx.array) -> mx.array:
        """(B, ..., V) log-probabilities → float32 probabilities as each row's sampler draws."""
        v = logprobs.shape[-1]
        parts = []
        for s, rows in self.groups:
            x = logprobs if len(self.groups) == 1 else logprobs[mx.array(rows)]
            flat = x.reshape(-1, v)
            if s is None:  # greedy: a point mass on the argmax
                p = (mx.arange(v) == mx.argmax(flat, axis=-1, keepdims=True)).astype(mx.float32)
            else:
                for f in s.filters():
                    flat = f(flat)
                p = mx.softmax(flat.astype(mx.float32) * (1.0 / s.temp), axis=-1)
            parts.append(p.reshape(x.shape))
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        return out if self._inverse is None else out[self._inverse]


def row_dists(samplers: list[Any] | None) -> RowDists | None:
    """The batch's distributions, or None when some row's sampler is not a SharedSampler
    (a seeded row: its key chain keeps its output a function of its seed; speculating, whose
    gate depends on timing, would not)."""
    rows: list[SharedSampler | None] = []
    for s in samplers or []:
        if s is None or s is greedy_sampler:
            rows.append(None)
        elif isinstance(s, SharedSampler):
            rows.append(s)
        else:
            return None
    return RowDists(rows)


def sample(probs: mx.array) -> mx.array:
    """One token per row from (B, V) probabilities (a point mass gives its token exactly)."""
    return mx.random.categorical(mx.log(probs))


def accept(p: mx.array, d: mx.array, q: mx.array | None) -> tuple[list[int], mx.array]:
    """Verify proposals d (B, K) against the target's distributions p (B, K+1, V): p[:, j] is
    the distribution of the token d[:, j] proposes (p[:, K]: the bonus position). q (B, K, V)
    holds the draft's distributions, None for point-mass proposals (prompt lookup).
    Returns each row's count of leading accepted proposals and every row's token at position
    m = min(counts) (see the module doc)."""
    b, k = d.shape
    idx = d[..., None].astype(mx.int32)
    ratio = mx.take_along_axis(p[:, :k], idx, axis=-1)[..., 0]
    if q is not None:  # q(x) > 0: the draft sampled x from q
        ratio = ratio / mx.take_along_axis(q, idx, axis=-1)[..., 0]
    ok = mx.random.uniform(shape=(b, k)) < ratio  # u in [0, 1): ratio >= 1 always accepts
    counts = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)
    accepted = counts.tolist()
    m = min(accepted)
    if m == k:
        return accepted, sample(p[:, k])
    pm = p[:, m]
    if q is None:
        resid = mx.where(mx.arange(pm.shape[-1]) == idx[:, m], 0.0, pm)
    else:
        resid = mx.maximum(pm - q[:, m], 0.0)
    # All zero only where p == q, where a rejection had probability 0: fall back to p.
    resid = mx.where(resid.sum(axis=-1, keepdims=True) > 0, resid, pm)
    token = mx.where(counts > m, d[:, m].astype(mx.uint32), sample(resid))
    return accepted, token


def draft_step(logits: mx.array, dists: RowDists) -> tuple[mx.array, mx.array]:
    """The draft's next token per row, sampled from its processed distribution, and that
    distribution (B, V), from its last-position logits (B, V)."""
    q = dists.probs(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return sample(q), q
