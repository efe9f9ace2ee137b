"""LLM engine: mlx-lm's BatchGenerator behind the worker's engine interface.

`submit` tokenizes and admits a request (or raises AdmissionError with a typed code); `step`
runs one decode step for the whole batch and returns a Delta per sequence that produced text;
`cancel` removes a sequence at once. New requests join the running batch between steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from worker.protocol import Delta, Generate, Load
from worker.sampling import sampler_for
from worker.stop_text import StopText

log = logging.getLogger("mlxgw.worker")

DEFAULT_CONTEXT_LENGTH = 4096
PREFILL_STEP_TOKENS = 512  # prompt chunk per step: bounds how long one prefill stalls decoding


_NO_STOP = StopSequences(None)


class AdmissionError(Exception):
    """A request the engine refuses before any work; `code` is a protocol ERROR_CODES key."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Seq:
    rid: int
    uid: int
    detok: StreamingDetokenizer
    stop: StopText
    prompt_tokens: int
    completion_tokens: int = 0


def load_model(load: Load) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """Load weights and tokenizer from an MLX model dir, a local HF cache repo id, or a .gguf."""
    if load.path.lower().endswith(".gguf"):
        from worker.gguf import load_gguf

        return load_gguf(load.path, dtype=load.dtype)
    from mlx_lm import load as mlx_load

    model, tokenizer, config = mlx_load(load.path, return_config=True)
    if load.dtype != "auto":
        model.set_dtype(getattr(mx, load.dtype))
    return model, tokenizer, config


class LLMEngine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerWrapper,
        *,
        context_length: int,
        max_batch: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self._eos = set(tokenizer.eos_token_ids)
        self._vocab = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else 0
        self._gen = BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(self._eos)],
            completion_batch_size=max_batch,
            prefill_batch_size=min(8, max_batch),
            prefill_step_size=PREFILL_STEP_TOKENS,
        )
        self._by_uid: dict[int, _Seq] = {}
        self._by_rid: dict[int, _Seq] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_load(cls, load: Load) -> LLMEngine:
        model, tokenizer, config = load_model(load)
        ctx = load.context_length or config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH
        return cls(model, tokenizer, context_length=int(ctx), max_batch=load.max_batch)

    # ------------------------------------------------------------------ admission

    def _tokenize(self, req: Generate) -> list[int]:
        if req.messages is not None:
            try:
                ids = self.tokenizer.apply_chat_template(
                    req.messages,
                    add_generation_prompt=req.add_generation_prompt,
                    tokenize=True,
                    **req.chat_template_kwargs,
                )
            except Exception as e:  # a template raising on its input is the client's error
                raise AdmissionError("invalid_request", f"chat template failed: {e}") from e
            return list(ids)
        if isinstance(req.prompt, str):
            return list(self.tokenizer.encode(req.prompt))
        ids = list(req.prompt or [])
        vocab = self._vocab or 1 << 31
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise AdmissionError("invalid_request", f"prompt token ids out of range: {bad[:5]}")
        return ids

    def submit(self, req: Generate) -> None:
        if req.rid in self._by_rid:
            raise AdmissionError("invalid_request", f"duplicate request id {req.rid}")
        ids = self._tokenize(req)
        n = len(ids)
        if n == 0:
            raise AdmissionError("invalid_request", "the prompt is empty")
        ctx = self.context_length
        max_tokens = req.max_tokens if req.max_tokens is not None else ctx - n
        if n >= ctx or n + max_tokens > ctx:
            raise AdmissionError(
                "context_length_exceeded",
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{n + max(max_tokens, 0)} tokens ({n} in the prompt, {max_tokens} in the "
                "completion). Please reduce the length of the prompt or the completion.",
            )
        if max_tokens <= 0:
            raise AdmissionError("invalid_request", "max_tokens must be at least 1")
        sampler = sampler_for(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            vocab=self._vocab,
        )
        stops = [_NO_STOP] if req.ignore_eos else None
        (uid,) = self._gen.insert(
            [ids], max_tokens=[max_tokens], samplers=[sampler], stop_sequences=stops
        )
        seq = _Seq(req.rid, uid, self.tokenizer.detokenizer, StopText(req.stop), n)
        self._by_uid[uid] = seq
        self._by_rid[req.rid] = seq
        self.prompt_tokens_total += n

    def cancel(self, rid: int) -> None:
        seq = self._by_rid.pop(rid, None)
        if seq is not None:
            del self._by_uid[seq.uid]
            self._gen.remove([seq.uid])

    # ------------------------------------------------------------------ decoding

    @property
    def busy(self) -> bool:
        return bool(self._by_uid)

    @property
    def in_flight(self) -> int:
        return len(self._by_uid)

    def step(self) -> list[Delta]:
        """One batch step. Returns the deltas of every sequence that advanced."""
        if not self._by_uid:
            return []
        _, responses = self._gen.next()
        out: list[Delta] = []
        for r in responses:
            seq = self._by_uid.get(r.uid)
            if seq is None:
                continue
            seq.completion_tokens += 1
            self.generation_tokens_total += 1
            finish = r.finish_reason
            if not (finish == "stop" and r.token in self._eos):
                seq.detok.add_token(r.token)
            if finish:
                seq.detok.finalize()
            text, hit = seq.stop.feed(seq.detok.last_segment)
            if hit and not finish:
                finish = "stop"
                self._gen.remove([r.uid])
            elif finish and not hit:
                text += seq.stop.flush()
            if finish:
                del self._by_uid[r.uid]
                del self._by_rid[seq.rid]
            if text or finish or seq.completion_tokens == 1:
                out.append(
                    Delta(seq.rid, text, seq.completion_tokens, seq.prompt_tokens, finish)
                )
        return out

    def abort_all(self) -> list[int]:
        """Drop every sequence (after an engine failure); returns their request ids."""
        rids = list(self._by_rid)
        for rid in rids:
            self.cancel(rid)
        return rids

    def close(self) -> None:
        self._gen.close()
