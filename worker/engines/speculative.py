"""Speculative decoding inside the continuous batch (models.yaml `speculative:`).

mlx-lm speculates for one sequence only (`speculative_generate_step`). Here the batch's
decode step itself speculates: `SpeculativeBatch` is BatchGenerator's GenerationBatch with a
`next()` that, for a batch of greedy rows, proposes `num_tokens` (K) tokens per row, verifies
all rows' proposals in one forward pass of K+1 positions, and emits for every row the tokens
the target itself would have produced. Proposals come from prompt lookup (`ngram`: the tokens
that followed the latest earlier occurrence of the row's last n-gram) or from a draft model
(`draft`) that shares the tokenizer; its caches ride in the batch's cache list after the
target's (`DraftPair`), so BatchGenerator merges, filters and extracts them with the rest.

Exactness: for a batch of greedy rows the emitted tokens are the target's own argmax at each
position, so greedy output is the same as without speculation. Rows that sample verify by
rejection sampling (`spec_sampling`: accept with probability min(1, p/q), else draw from the
residual), so their output has the sampler's exact distribution; the draft then samples from
its own processed distribution. BatchKVCache rewinds every row by the same count, so a step
accepts the fewest proposals any row accepted (m) and emits m+1 tokens per row; a row without
a proposal (ngram) makes the step a plain one. Seeded rows, logits processors (penalties,
grammars) or a missing proposal run mlx-lm's plain step. `Gate` measures tokens
per second per row with and without speculation and turns it off (backing off, then probing
again) while it does not pay.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from mlx_gw.worker.engines import spec_sampling
from mlx_gw.worker.engines.spec_sampling import RowDists
from mlx_gw.worker.engines.whole_buffer import whole_buffer

log = logging.getLogger("mlxgw.worker")

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better
PROBE_STEPS = 4  # plain steps measured before the first speculative one
BACKOFF_START, BACKOFF_MAX = 16, 1024  # plain steps while off (doubling after each failed probe)
EMA = 0.2
PAYS = 1.0  # speculation stays on while its rate is at least this share of the plain one
MISSES_OFF, MISS_REST_STEPS = 3, 8  # steps without a proposal for every row, then a rest


class Gate:
    """Whether to speculate on this step: on while tokens/s per row beats plain decoding."""

    def __init__(self) -> None:
        self.plain_rate = 0.0  # EMA of emitted tokens per second per row, plain steps
        self.spec_rate = 0.0
        self._plain_steps = 0
        self._off_until = PROBE_STEPS  # plain-step count before the next speculative try
        self._backoff = BACKOFF_START
        self._bad = 0
        self._misses = 0
        self.proposed = 0
        self.accepted = 0

    @property
    def on(self) -> bool:
        return self._plain_steps >= self._off_until

    @property
    def backing_off(self) -> bool:
        """Off because speculating did not pay (not the first plain steps' measurement)."""
        return not self.on and self._off_until > PROBE_STEPS

    def plain(self, seconds: float, measured: bool = True) -> None:
        """A plain step took `seconds`. One right after a speculative step is counted but not
        measured: nothing was in flight when it started (the verify waited for its result),
        so its time is not what a plain step costs in the steady lookahead."""
        self._plain_steps += 1
        if not measured:
            return
        rate = 1.0 / max(seconds, 1e-6)
        self.plain_rate = rate if not self.plain_rate else (1 - EMA) * self.plain_rate + EMA * rate

    def spec(self, seconds: float, emitted: int, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        rate = emitted / max(seconds, 1e-6)
        self.spec_rate = rate if not self.spec_rate else (1 - EMA) * self.spec_rate + EMA * rate
        if self.spec_rate < PAYS * self.plain_rate:
            self._bad += 1
            # Three slow steps in a row (one, once it has failed before: a probe costs): off
            # for a while, longer each time.
            if self._bad >= (3 if self._backoff == BACKOFF_START else 1):
                self._off_until = self._plain_steps + self._backoff
                self._backoff = min(BACKOFF_MAX, self._backoff * 2)
                self._bad = 0
                self.spec_rate = 0.0
        else:
            self._bad = 0
            self._backoff = BACKOFF_START
        self._misses = 0

    def no_proposal(self) -> None:
        """A step found nothing to propose for some row. Each try costs every row's lookup
        (and a wait for the queued step when the check before it was wrong), so after
        MISSES_OFF misses in a row it rests MISS_REST_STEPS plain steps (a fixed rest: a
        proposal may appear any step)."""
        self._misses += 1
        if self._misses >= MISSES_OFF:
            self._misses = 0
            self._off_until = max(self._off_until, self._plain_steps + MISS_REST_STEPS)


def ngram_proposal(history: list[int], k: int) -> list[int] | None:
    """The k tokens that followed the latest earlier occurrence of history's last n-gram
    (longest n first), padded with its last token; None when no n-gram recurs."""
    h = np.asarray(history, dtype=np.int64)
    for n in NGRAM_SIZES:
        if len(h) <= n:
            continue
        tail = h[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            out = h[start:start + k].tolist()
            if out:
                return out + [out[-1]] * (k - len(out))
    return None


class DraftPair:
    """Target and draft as one model for BatchGenerator: the cache list holds the target's
    caches then the draft's, and every call (prefill, plain decode) runs both, so the
    draft's caches hold exactly the target's tokens. `skip_draft` (speculation off) saves
    the draft's cost: its caches then lag, which can only lower acceptance (the target
    verifies every token), and a lagging entry is never prompt-cached (its size disagrees)."""

    def __init__(self, target: Any, draft: Any) -> None:
        self.target, self.draft = target, draft
        self.layers = target.layers
        self.n_target = len(make_prompt_cache(target))
        self.n_draft = len(make_prompt_cache(draft))
        self.skip_draft = False

    def make_cache(self) -> list[Any]:
        return [*make_prompt_cache(self.target), *make_prompt_cache(self.draft)]

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, **kw: Any) -> Any:
        if cache is None:
            return self.target(inputs, **kw)
        n = self.n_target
        if not self.skip_draft or inputs.shape[1] > 1:  # prefill always feeds the draft
            self.draft(inputs, cache=cache[n:])
        return self.target(inputs, cache=cache[:n], **kw)


def check_same_tokenizer(target: Any, draft: Any, draft_path: str) -> None:
    """A draft must tokenize exactly as the target does; raises ValueError otherwise."""
    tv, dv = target.get_vocab(), draft.get_vocab()
    if tv != dv or set(target.eos_token_ids) != set(draft.eos_token_ids):
        diff = len(set(tv.items()) ^ set(dv.items()))
        raise ValueError(f"speculative draft_model {draft_path!r} has another tokenizer than "
                         f"the target ({len(dv)} vs {len(tv)} tokens, {diff} entries differ): "
                         "a draft must share the target's tokenizer; pick a smaller model of "
                         "the same family, or method: ngram")


class SpeculativeBatch(GenerationBatch):
    """GenerationBatch whose `next()` speculates when it can (see the module doc). Set up by
    `install`; `extend` keeps this class, so every row BatchGenerator adds decodes here."""

    method: str = "ngram"
    k: int = 4
    gate: Gate
    pair: DraftPair | None = None
    _y_known = False  # the next input token y is computed (waited for), not still queued

    def extend(self, batch: Any) -> None:
        super().extend(batch)
        self._y_known = False  # the new rows' first tokens are still being computed

    def next(self) -> list[Any]:
        if not self.uids:
            return []
        t0 = time.perf_counter()  # plain steps run ahead (async): a call's wall time is a step
        plain = any(self.logits_processors)
        greedy = not plain and all(s is greedy_sampler or s is None for s in self.samplers or [])
        # Rows that sample: their distributions (None for a seeded row: the plain step).
        dists = None if greedy or plain else spec_sampling.row_dists(self.samplers)
        can = greedy or dists is not None
        tried = can and self.gate.on
        proposals = self._propose(dists) if tried else None
        if proposals is None and tried:
            self.gate.no_proposal()
        if self.pair is not None:
            self.pair.skip_draft = self.gate.backing_off
        if proposals is None:
            # After a verify, or a try that waited for y, nothing was in flight: this call's
            # time is not a plain step's.
            measured = not self._y_known
            out = super().next()
            self._y_known = False
            self.gate.plain(time.perf_counter() - t0, measured=measured)
            return out
        out = self._verify(*proposals, t0, dists)
        self._y_known = True
        return out

    def _propose(self, dists: RowDists | None) -> tuple[mx.array, mx.array | None] | None:
        """Each row's K proposals and, for a sampling draft, the draft's distributions.
        The draft takes the queued step's token y as a lazy input. Prompt lookup needs y's
        value, and waiting for it costs the queued plain step its lookahead, so it first
        checks (without y) that every row's known tokens end in a recurring n-gram, and
        does not wait when one does not (tries that waited and found nothing were most of
        ngram's steps at 1 stream on an H200, where it ran at 0.72x)."""
        y = self._next_tokens
        if self.method == "draft":
            return self._draft(y, dists)
        if not self._y_known and any(ngram_proposal(t, 1) is None for t in self.tokens):
            return None
        self._y_known = True
        rows = []
        for tokens, last in zip(self.tokens, y.tolist(), strict=True):
            p = ngram_proposal([*tokens, last], self.k)
            if p is None:
                return None  # a row without a guess: every row would accept nothing
            rows.append(p)
        return mx.array(rows, dtype=y.dtype), None

    def _draft(self, y: mx.array, dists: RowDists | None) -> tuple[mx.array, mx.array | None]:
        assert self.pair is not None
        n = self.pair.n_target
        cache = self.prompt_cache[n:n + self.pair.n_draft]
        self._catch_up(cache)
        x, out, qs = y[:, None], [], []
        for _ in range(self.k):
            logits = self.pair.draft(x, cache=cache)[:, -1, :]
            if dists is None:
                x = mx.argmax(logits, axis=-1)[:, None]
            else:
                token, q = spec_sampling.draft_step(logits, dists)
                x = token[:, None]
                qs.append(q)
            out.append(x)
        for c in cache:  # back to before y: the verify pass feeds the draft y..dK itself
            c.trim(self.k)
        return (mx.concatenate(out, axis=1).astype(y.dtype),
                mx.stack(qs, axis=1) if qs else None)

    def _catch_up(self, cache: list[Any]) -> None:
        """Feed the draft the latest tokens it skipped while speculation was off (each row's
        lag, from the caches' per-row offsets), right-padded as mlx-lm's prefill does."""
        lag = (self.prompt_cache[0].offset - cache[0].offset).tolist()
        most = max(lag)
        if most <= 0:
            return
        rows = [tokens[len(tokens) - n:] + [0] * (most - n) if n else [0] * most
                for tokens, n in zip(self.tokens, lag, strict=True)]
        for c in cache:
            c.prepare(lengths=lag, right_padding=[most - n for n in lag])
        self.pair.draft(mx.array(rows), cache=cache)  # type: ignore[union-attr]
        for c in cache:
            c.finalize()

    def _verify(self, d: mx.array, q: mx.array | None, t0: float,
                dists: RowDists | None) -> list[Any]:
        y, y_logprobs = self._next_tokens, self._next_logprobs
        k = d.shape[1]
        inputs = mx.concatenate([y[:, None], d], axis=1)
        with whole_buffer(self.prompt_cache, k + 1):  # one cuDNN graph per 256 positions
            logits = self.model(inputs, cache=self.prompt_cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if dists is None:  # greedy rows: accept the proposals equal to the target's argmax
            t = mx.argmax(logits, axis=-1)
            mx.eval(t)
            accepted = []
            for tr, dr in zip(t.tolist(), d.tolist(), strict=True):
                a = 0
                while a < k and dr[a] == tr[a]:
                    a += 1
                accepted.append(a)
            m = min(accepted)
            following = t[:, m]
        else:
            accepted, following = spec_sampling.accept(dists.probs(logprobs), d, q)
            m = min(accepted)
        for c in self.prompt_cache:
            c.trim(k - m)
        self._next_tokens = following.astype(y.dtype)
        d_rows, y_list = d.tolist(), y.tolist()
        self._next_logprobs = list(logprobs[:, m])
        responses, keep = [], []
        for i in range(len(self.uids)):
            emitted = [y_list[i], *d_rows[i][:m]]
            self.tokens[i].extend(emitted)
            finish = None
            for j, token in enumerate(emitted):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish = "length"
                if self._matchers[i].advance(token):
                    finish = "stop"
                lp = y_logprobs[i] if j == 0 else logprobs[i, j - 1]
                done = finish is not None
                responses.append(self.Response(
                    uid=self.uids[i], token=token, logprobs=lp, finish_reason=finish,
                    prompt_cache=self.extract_cache(i) if done else None,
                    all_tokens=self.tokens[i] if done else None))
                if done:
                    break
            if finish is None:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        rows = len(accepted)
        self.gate.spec(time.perf_counter() - t0, m + 1, rows * k, rows * m)
        return responses


def install(gen: Any, *, method: str, k: int, pair: DraftPair | None) -> Gate:
    """Make BatchGenerator `gen` decode through a SpeculativeBatch; returns its Gate (the
    acceptance counters the heartbeat reports)."""
    batch = SpeculativeBatch.empty(gen.model, gen.sampler)
    batch.method, batch.k, batch.pair = method, k, pair
    batch.gate = Gate()
    gen._generation_batch = batch
    return batch.gate


def load_draft(load: Any, tokenizer: Any, loader: Any) -> Any | None:
    """The draft model a Load names (method draft), checked against the target's tokenizer
    and KV settings; None for ngram or no speculation. Raises ValueError with the fix."""
    if load.speculative != "draft":
        return None
    if load.kv_bits:
        raise ValueError("speculative method draft cannot be combined with kv_bits (the draft "
                         "keeps its own cache layout): remove one, or use method: ngram")
    draft, draft_tok, _ = loader(type(load)(name=f"{load.name}-draft", type="llm",
                                            path=load.spec_draft_path,
                                            dtype=load.spec_draft_dtype))
    check_same_tokenizer(tokenizer, draft_tok, load.spec_draft_path)
    log.info("[worker:%s] speculative draft %s loaded", load.name, load.spec_draft_path)
    return draft
