"""Embedding engine: mlx-embeddings models behind the worker's engine interface, micro-batched.

`submit` tokenizes an `Embed` request at once (so an over-long input is refused before any work)
and queues its inputs; `step` takes the queued inputs of every request that arrived meanwhile
(up to `max_batch` inputs and a padded-token budget) and embeds them in one forward pass, then
answers each request whose inputs are all done with one `Embeddings` message. Requests that
arrive together therefore share a forward pass; a request with many inputs spans several steps.

On the CPU, MLX's transcendental kernels are scalar: the exact (erf) GELU of a BERT layer costs
more than its matmuls. Loaded models get a rational-polynomial erf instead (the one Eigen and
XLA use, accurate to float32 rounding), built from multiply-adds that MLX vectorises.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.protocol import Embed, Embeddings, Error, Load

log = logging.getLogger("mlxgw.worker")

DEFAULT_WINDOW_TOKENS = 512
MAX_BATCH_TOKENS = 16384  # padded tokens per forward pass: bounds one step's time and memory

# erf(x) ~= x * P(x^2) / Q(x^2) on [-4, 4] (Eigen's generic_fast_erf_float; |error| < 2e-7).
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)


def fast_erf(x: mx.array) -> mx.array:
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p = mx.full(x.shape, _ERF_ALPHA[0], dtype=x.dtype)
    for a in _ERF_ALPHA[1:]:
        p = p * x2 + a
    q = mx.full(x.shape, _ERF_BETA[0], dtype=x.dtype)
    for b in _ERF_BETA[1:]:
        q = q * x2 + b
    return x * p / q


def fast_gelu(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + fast_erf(x * 0.7071067811865476))


_fused_gelu = mx.compile(fast_gelu, shapeless=True)  # one fused kernel for the ~30 ops


class _FastGELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return _fused_gelu(x)


def use_fast_gelu(model: nn.Module) -> int:
    """Replace every exact nn.GELU module of `model` by the polynomial one; returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        for key, child in list(module.items()):  # an MLX module keeps its children as items
            if isinstance(child, nn.GELU) and child._approx == "none":
                module[key] = _FastGELU()
                swapped += 1
    return swapped


def model_window(path: Path, config: dict, tokenizer) -> int:
    """Longest input in tokens: the smallest of the position table, sentence-transformers'
    max_seq_length and the tokenizer's model_max_length (where they are set)."""
    limits = [int(config.get("max_position_embeddings") or DEFAULT_WINDOW_TOKENS)]
    st = path / "sentence_bert_config.json"
    if st.exists():
        seq = json.loads(st.read_text()).get("max_seq_length")
        if seq:
            limits.append(int(seq))
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits)


@dataclass
class _Job:
    rid: int
    ids: list[list[int]]
    dimensions: int | None
    vectors: list[bytes | None] = field(default_factory=list)
    left: int = 0


class EmbeddingEngine:
    def __init__(self, model: nn.Module, tokenizer, *, context_length: int, max_batch: int,
                 dim: int) -> None:
        self.model = model
        self.tok = tokenizer
        self.context_length = context_length
        self.max_batch = max_batch
        self.dim = dim
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab = len(tokenizer)
        self._specials = _special_tokens(tokenizer)
        self._queue: deque[tuple[_Job, int]] = deque()  # (job, input index), FIFO
        self._jobs: dict[int, _Job] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_load(cls, load: Load) -> EmbeddingEngine:
        from mlx_embeddings.utils import get_model_path, load_config
        from mlx_embeddings.utils import load as load_embedder

        path = get_model_path(load.path)
        model, wrapper = load_embedder(load.path)
        tokenizer = getattr(wrapper, "_tokenizer", wrapper)
        if load.dtype != "auto":
            model.set_dtype(getattr(mx, load.dtype))
        if mx.default_device() == mx.cpu:
            n = use_fast_gelu(model)
            log.info("[worker:%s] %d GELU layers use the vectorised erf", load.name, n)
        config = load_config(path)
        window = load.context_length or model_window(path, config, tokenizer)
        engine = cls(model, tokenizer, context_length=window, max_batch=load.max_batch,
                     dim=0)
        engine.dim = len(engine._forward([[engine.pad_id]])[0]) // 4  # also warms up
        return engine

    # ------------------------------------------------------------------ admission

    def _tokenize(self, req: Embed) -> list[list[int]]:
        window = self.context_length
        if req.texts:
            enc = self.tok(list(req.texts), add_special_tokens=True, truncation=req.truncate,
                           max_length=window if req.truncate else None)
            seqs = [list(ids) for ids in enc["input_ids"]]
        else:
            seqs = []
            for raw in req.token_ids:
                bad = [t for t in raw if not 0 <= t < self.vocab]
                if bad:
                    raise AdmissionError("invalid_request",
                                         f"token ids out of range [0, {self.vocab}): {bad[:5]}")
                pre, post = self._specials
                body = list(raw)
                if req.truncate:
                    body = body[:max(0, window - len(pre) - len(post))]
                seqs.append(pre + body + post)
        for i, ids in enumerate(seqs):
            if len(ids) > window:
                raise AdmissionError(
                    "context_length_exceeded",
                    f"Input {i} is {len(ids)} tokens long; this model's maximum is {window} "
                    "tokens. Shorten it, or send \"truncate\": true to cut it to the window.")
        return seqs

    def submit(self, req: Embed) -> None:
        if not isinstance(req, Embed):
            raise AdmissionError("unsupported", "this is an embedding model: it serves "
                                 "/v1/embeddings and /v1/rerank, not text generation")
        if req.rid in self._jobs:
            raise AdmissionError("invalid_request", f"duplicate request id {req.rid}")
        if req.dimensions is not None and not 0 < req.dimensions <= self.dim:
            raise AdmissionError("invalid_request", f"dimensions must be between 1 and "
                                 f"{self.dim} for this model, got {req.dimensions}")
        seqs = self._tokenize(req)
        if not seqs:
            raise AdmissionError("invalid_request", "no input to embed")
        job = _Job(req.rid, seqs, req.dimensions, [None] * len(seqs), len(seqs))
        self._jobs[req.rid] = job
        self._queue.extend((job, i) for i in range(len(seqs)))

    def cancel(self, rid: int) -> None:
        job = self._jobs.pop(rid, None)
        if job is not None:
            self._queue = deque(item for item in self._queue if item[0] is not job)

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    # ------------------------------------------------------------------ batching

    def _take(self) -> list[tuple[_Job, int]]:
        """The next inputs, FIFO, up to max_batch of them and MAX_BATCH_TOKENS padded."""
        batch: list[tuple[_Job, int]] = []
        longest = 0
        while self._queue and len(batch) < self.max_batch:
            job, i = self._queue[0]
            n = len(job.ids[i])
            if batch and max(longest, n) * (len(batch) + 1) > MAX_BATCH_TOKENS:
                break
            longest = max(longest, n)
            batch.append(self._queue.popleft())
        return batch

    def _forward(self, seqs: list[list[int]]) -> list[bytes]:
        """One forward pass over `seqs` (padded to the longest): their normalised vectors."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), width), dtype=np.int32)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        out = self.model(mx.array(ids), attention_mask=mx.array(mask))
        vecs = getattr(out, "text_embeds", None)
        if vecs is None:  # no pooled output: mean-pool the last hidden state
            hidden = out.last_hidden_state
            m = mx.array(mask, dtype=hidden.dtype)[..., None]
            vecs = (hidden * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
        vecs = vecs.astype(mx.float32)
        mx.eval(vecs)
        arr = np.array(vecs, copy=False)
        return [arr[row].tobytes() for row in range(len(seqs))]

    def step(self) -> list[Embeddings | Error]:
        batch = self._take()
        if not batch:
            return []
        vectors = self._forward([job.ids[i] for job, i in batch])
        out: list[Embeddings | Error] = []
        for (job, i), vec in zip(batch, vectors, strict=True):
            job.vectors[i] = vec
            job.left -= 1
            if job.left == 0 and self._jobs.pop(job.rid, None) is not None:
                tokens = sum(len(ids) for ids in job.ids)
                self.prompt_tokens_total += tokens
                data = [_shorten(v, job.dimensions) for v in job.vectors]
                out.append(Embeddings(rid=job.rid, data=data, prompt_tokens=tokens))
        return out

    def abort_all(self) -> list[int]:
        rids = list(self._jobs)
        self._jobs.clear()
        self._queue.clear()
        return rids

    def close(self) -> None:
        self._queue.clear()


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [CLS] and [SEP]),
    found by tokenizing a word with and without them: token-array inputs get the same."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def _shorten(vec: bytes | None, dimensions: int | None) -> bytes:
    """The first `dimensions` components, renormalised (as OpenAI's `dimensions` does)."""
    assert vec is not None
    if dimensions is None:
        return vec
    v = np.frombuffer(vec, dtype=np.float32)[:dimensions]
    norm = float(np.linalg.norm(v))
    return (v / max(norm, 1e-12)).astype(np.float32).tobytes()
