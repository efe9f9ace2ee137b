"""LLM engine: mlx-lm's BatchGenerator behind the worker's engine interface.

`submit` tokenizes and admits a request (or raises AdmissionError with a typed code); `step`
runs one decode step for the whole batch and returns a Delta per sequence that produced text;
`cancel` removes a sequence at once. New requests join the running batch between steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from mlx_gw.worker.engines import sharding
from mlx_gw.worker.engines.adapters import (
    AdapterBank,
    AdapterModel,
    AdapterRows,
    apply_op,
    split_rows,
)
from mlx_gw.worker.engines.arrivals import ArrivalWait
from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.engines.constrained import (
    FORCED_FORMATS,
    GrammarError,
    GrammarProcessor,
    Grammars,
    resolve_reasoning,
    resolve_tool_parser,
)
from mlx_gw.worker.engines.defaults import (
    DEFAULT_CONTEXT_LENGTH,
    NEUTRAL,
    Sampling,
    completion_budget,
    final_text,
    model_sampling,
    resolve_sampling,
)
from mlx_gw.worker.engines.prompt_cache import BASE_KEY, PromptCache, default_max_bytes
from mlx_gw.worker.engines.prompt_disk import DiskTier, open_disk_tier
from mlx_gw.worker.engines.quantized_kv import fresh_caches
from mlx_gw.worker.engines.sampling import sampler_for, token_logprob
from mlx_gw.worker.engines.speculative import DraftPair, install, load_draft
from mlx_gw.worker.engines.stop_text import StopText
from mlx_gw.worker.protocol import (
    AdapterDone,
    AddAdapter,
    Delta,
    Generate,
    Load,
    RemoveAdapter,
)

log = logging.getLogger("mlxgw.worker")

PREFILL_STEP_TOKENS = 512  # prompt chunk per step: bounds how long one prefill stalls decoding
PENALTY_CONTEXT_TOKENS = 64  # presence/frequency/repetition penalties look this far back


_NO_STOP = StopSequences(None)


@dataclass
class _Seq:
    rid: int
    uid: int
    detok: StreamingDetokenizer
    stop: StopText
    prompt_tokens: int
    completion_tokens: int = 0
    grammar: GrammarProcessor | None = None
    top_logprobs: int = -1  # -1: no logprobs asked
    first: Delta | None = None  # the parse facts its first delta carries
    cached_tokens: int = 0  # prompt tokens its prefill took from the prompt cache
    slot: int = 0  # its LoRA adapter's slot (0: the base)
    key: str = BASE_KEY  # its prompt-cache key (one per adapter)


def load_model(load: Load) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """Load weights and tokenizer from an MLX model dir, a local HF cache repo id, or a .gguf."""
    if load.path.lower().endswith(".gguf"):
        from mlx_gw.worker.loaders.gguf import load_gguf

        return load_gguf(load.path, dtype=load.dtype)
    from mlx_lm import load as mlx_load

    model, tokenizer, config = mlx_load(load.path, return_config=True, lazy=sharding.active())
    sharding.shard(model)  # a rank of a distributed worker keeps its shard only
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
        sampling: Sampling = NEUTRAL,
        prompt_cache_bytes: int = 0,
        prompt_disk: DiskTier | None = None,
        kv_bits: int = 0,
        kv_group_size: int = 64,
        speculative: tuple[str, int] = ("", 4),  # (method, tokens per step)
        draft: nn.Module | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sampling = sampling  # the model's defaults for what a request leaves unset
        self._eos = set(tokenizer.eos_token_ids)
        self._vocab = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else 0
        self.adapters = AdapterBank(model)
        inner = model if draft is None else DraftPair(model, draft)
        self._gen = BatchGenerator(
            AdapterModel(inner, self.adapters),
            stop_tokens=[[t] for t in sorted(self._eos)],
            completion_batch_size=max_batch,
            prefill_batch_size=min(8, max_batch),
            prefill_step_size=PREFILL_STEP_TOKENS,
        )
        self._by_uid: dict[int, _Seq] = {}
        self._by_rid: dict[int, _Seq] = {}
        self._hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self._grammars = Grammars(self._hf, sorted(self._eos))
        self._formats: dict[str, tuple[str, list[str]]] = {}
        self._answers: list[Delta] = []  # ready without a decode step (count_only)
        self.prompt_cache = PromptCache(prompt_cache_bytes, prompt_disk)
        self._model = inner  # its make_cache: the target's caches, then the draft's
        self.spec = install(self._gen, method=speculative[0], k=speculative[1],
                            pair=inner if draft is not None else None) if speculative[0] else None
        self._kv = (kv_bits, kv_group_size)
        if kv_bits:
            fresh_caches(model, kv_bits, kv_group_size)  # refuses models it cannot quantize
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.arrivals = ArrivalWait()  # the loop waits on it for a finished wave's successors
        self.prefill_rows = 0  # rows the last step prefilled (the loop's step stats)

    @classmethod
    def from_load(cls, load: Load) -> LLMEngine:
        model, tokenizer, config = load_model(load)
        draft = load_draft(load, tokenizer, load_model)
        ctx = load.context_length or config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH
        sampling = model_sampling(load.path)
        log.info("[worker:%s] sampling defaults from %s: temperature %s, top_p %s, top_k %s, "
                 "min_p %s", load.name, sampling.source, sampling.temperature, sampling.top_p,
                 sampling.top_k, sampling.min_p)
        budget = load.prompt_cache_bytes
        if budget is None:
            weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            budget = default_max_bytes(weights, load.memory_limit_bytes)
        disk = None
        if load.prompt_cache_disk and budget > 0:
            # The KV's own format is part of its identity: 8-bit entries never serve f32.
            kv = f"{load.dtype}/kv{load.kv_bits}g{load.kv_group_size}" if load.kv_bits \
                else load.dtype
            kv += f"+draft:{load.spec_draft_path}" if draft is not None else ""
            disk = open_disk_tier(load.prompt_cache_disk, load.path, kv,
                                  load.prompt_cache_disk_bytes, load.name)
        engine = cls(model, tokenizer, context_length=int(ctx), max_batch=load.max_batch,
                     sampling=sampling, prompt_cache_bytes=budget, prompt_disk=disk,
                     kv_bits=load.kv_bits, kv_group_size=load.kv_group_size,
                     speculative=(load.speculative, load.spec_tokens), draft=draft)
        for name, path in load.adapters.items():
            engine.adapters.add(name, path)
        engine.warm(load.warm_prompts)
        log.info("[worker:%s] prompt cache: %.0f MiB, %d entries after %d warm prompts",
                 load.name, budget / 2**20, engine.prompt_cache.entries, len(load.warm_prompts))
        return engine

    def warm(self, system_prompts: list[str]) -> None:
        """Prefill each system prompt (as the chat template renders it alone) into the prompt
        cache, so the first request of an agent that starts with it skips that prefill."""
        for i, text in enumerate(system_prompts):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": text}], add_generation_prompt=False,
                tokenize=True)
            self.submit(Generate(rid=-1 - i, prompt=list(ids), max_tokens=1, temperature=0.0))
            while self.busy:
                self.step()

    # What worker/engines/warmup.py drives: the generator, a fresh cache as requests get one.
    batch_generator = property(lambda self: self._gen)
    vocab_size = property(lambda self: self._vocab)
    prefill_step_tokens = PREFILL_STEP_TOKENS

    def new_cache(self) -> list[Any]:
        """An empty cache list for one sequence: the model's KV (then the draft's), and the
        row's adapter (the base)."""
        kv = fresh_caches(self._model, *self._kv) if self._kv[0] \
            else make_prompt_cache(self._model)
        return [*kv, AdapterRows([0])]

    # ------------------------------------------------------------------ admission

    def _tokenize(self, req: Generate) -> list[int]:
        if req.messages is not None:
            try:
                tools = {"tools": req.tools} if req.tools else {}
                ids = self.tokenizer.apply_chat_template(
                    req.messages,
                    add_generation_prompt=req.add_generation_prompt,
                    tokenize=True,
                    **tools,
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

    def adapter_op(self, op: AddAdapter | RemoveAdapter) -> AdapterDone:
        """Load or forget a LoRA adapter between steps (raises AdmissionError)."""
        return apply_op(self.adapters, op, {s.slot for s in self._by_uid.values()})

    def submit(self, req: Generate) -> None:
        if req.rid in self._by_rid:
            raise AdmissionError("invalid_request", f"duplicate request id {req.rid}")
        slot = self.adapters.slot(req.adapter)
        if slot is None:
            raise AdmissionError("not_found", f"this worker has no adapter '{req.adapter}'")
        key = f"adapter#{slot}" if slot else BASE_KEY
        ids = self._tokenize(req)
        n = len(ids)
        if n == 0:
            raise AdmissionError("invalid_request", "the prompt is empty")
        if req.count_only:
            self._answers.append(Delta(req.rid, prompt_tokens=n, finish_reason="stop"))
            return
        max_tokens = completion_budget(req, n, self.context_length)
        sampling = resolve_sampling(req, self.sampling)
        sampler = sampler_for(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            seed=req.seed,
            vocab=self._vocab,
        )
        first = self._first_delta(req, ids)
        processors = self._processors(req)
        grammar = self._grammar(req, first)
        if grammar is not None:
            processors.append(grammar)
        # A grammar ends its sequence itself, so ignore_eos never runs it past the grammar.
        stops = [_NO_STOP] if req.ignore_eos and grammar is None else None
        cache, cached = self.prompt_cache.lookup(ids, key)
        if cache is None:
            cache = split_rows(self.new_cache())
        cache = [*cache, AdapterRows([slot])]
        (uid,) = self._gen.insert(
            [ids[cached:]], max_tokens=[max_tokens], samplers=[sampler], stop_sequences=stops,
            logits_processors=[processors], caches=[cache], all_tokens=[ids[:cached]],
        )
        first.cached_tokens = cached
        seq = _Seq(req.rid, uid, self.tokenizer.detokenizer, StopText(req.stop), n,
                   grammar=grammar, top_logprobs=req.top_logprobs if req.logprobs else -1,
                   first=first, cached_tokens=cached, slot=slot, key=key)
        self._by_uid[uid] = seq
        self._by_rid[req.rid] = seq
        self.prompt_tokens_total += n
        self.arrivals.arrived()

    def _format(self, req: Generate) -> tuple[str, list[str]]:
        """(tool-call format, thinking markers) for the parsers configured on this request."""
        key = f"{req.tool_parser}|{req.reasoning_parser}"
        if key not in self._formats:
            self._formats[key] = (resolve_tool_parser(self._hf, req.tool_parser),
                                  resolve_reasoning(self._hf, req.reasoning_parser))
        return self._formats[key]

    def _first_delta(self, req: Generate, ids: list[int]) -> Delta:
        tool_parser, reasoning = self._format(req)
        if req.tools and req.tool_choice != "auto" and tool_parser not in FORCED_FORMATS:
            tool_parser = "json"  # a forced call is generated as a bare JSON call object
        thinking = False
        if reasoning and req.messages is not None:
            tail = self.tokenizer.decode(ids[-64:])
            start = tail.rfind(reasoning[0])
            thinking = start >= 0 and start > tail.rfind(reasoning[1])
        return Delta(req.rid, tool_parser=tool_parser if req.tools else "",
                     reasoning=reasoning, thinking=thinking)

    def _processors(self, req: Generate) -> list[Any]:
        bad = [t for t in req.logit_bias if not 0 <= t < (self._vocab or 1 << 31)]
        if bad:
            raise AdmissionError("invalid_request", f"logit_bias token ids out of range: {bad[:5]}")
        return make_logits_processors(
            logit_bias=req.logit_bias or None,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty != 1.0 else None,
            repetition_context_size=PENALTY_CONTEXT_TOKENS,
            presence_penalty=req.presence_penalty or None,
            presence_context_size=PENALTY_CONTEXT_TOKENS,
            frequency_penalty=req.frequency_penalty or None,
            frequency_context_size=PENALTY_CONTEXT_TOKENS,
        )

    def _grammar(self, req: Generate, first: Delta) -> GrammarProcessor | None:
        g = self._grammars
        try:
            if req.tools and req.tool_choice != "auto":
                grammar = g.tool_call(req.tools, req.tool_choice, first.tool_parser)
            elif req.json_schema is not None:
                grammar = g.json_schema(req.json_schema or {"type": "object"},
                                        "response_format.json_schema.schema")
            else:
                return None
            return GrammarProcessor(g.matcher(grammar), g.llt.vocab_size)
        except GrammarError as e:
            raise AdmissionError("invalid_request", str(e)) from None

    def cancel(self, rid: int) -> None:
        seq = self._by_rid.pop(rid, None)
        if seq is not None:
            del self._by_uid[seq.uid]
            self._gen.remove([seq.uid])

    # ------------------------------------------------------------------ decoding

    @property
    def busy(self) -> bool:
        return bool(self._by_uid or self._answers)

    @property
    def in_flight(self) -> int:
        return len(self._by_uid)

    def step(self) -> list[Delta]:
        """One batch step. Returns the deltas of every sequence that advanced."""
        out, self._answers = self._answers, []
        if not self._by_uid:
            return out
        t0 = time.perf_counter()
        _, responses = self._gen.next()
        took = time.perf_counter() - t0
        self.prefill_rows = len(self._gen._prompt_batch)
        finished = 0
        for r in responses:
            seq = self._by_uid.get(r.uid)
            if seq is None:
                continue
            seq.completion_tokens += 1
            self.generation_tokens_total += 1
            finish = r.finish_reason
            lps = None
            if seq.top_logprobs >= 0:
                lps = [token_logprob(self.tokenizer.decode, r.token, r.logprobs, seq.top_logprobs)]
            if seq.grammar is not None and seq.grammar.done and not finish:
                finish = "stop"  # the grammar is complete: nothing may follow
                self._keep(self._gen.remove([r.uid], return_prompt_caches=True), seq.key)
            elif finish:
                self.prompt_cache.store(r.all_tokens, split_rows(r.prompt_cache), seq.key)
            if not (finish == "stop" and r.token in self._eos):
                seq.detok.add_token(r.token)
            if finish:
                seq.detok.finalize()
            text, hit = seq.stop.feed(final_text(seq.detok.last_segment, finish))
            if hit and not finish:
                finish = "stop"
                self._keep(self._gen.remove([r.uid], return_prompt_caches=True), seq.key)
            elif finish and not hit:
                text += seq.stop.flush()
            if finish:
                del self._by_uid[r.uid]
                del self._by_rid[seq.rid]
                finished += 1
            if text or finish or lps or seq.completion_tokens == 1:
                d = Delta(seq.rid, text, seq.completion_tokens, seq.prompt_tokens, finish, lps)
                if seq.first is not None:
                    d.tool_parser = seq.first.tool_parser
                    d.reasoning = seq.first.reasoning
                    d.thinking = seq.first.thinking
                    d.cached_tokens = seq.first.cached_tokens
                    seq.first = None
                if hit:
                    d.stop_sequence = seq.stop.matched
                out.append(d)
        self.arrivals.stepped(took, finished if self._by_uid else 0)
        return out

    def _keep(self, removed: dict[int, Any], key: str) -> None:
        """Store the caches of sequences removed before their natural end (a stop string, a
        completed grammar): the next turn of the conversation starts with those tokens."""
        for cache, tokens in removed.values():
            self.prompt_cache.store(tokens, split_rows(cache), key)

    def abort_all(self) -> list[int]:
        """Drop every sequence (after an engine failure); returns their request ids."""
        rids = list(self._by_rid)
        for rid in rids:
            self.cancel(rid)
        return rids

    def close(self) -> None:
        self.prompt_cache.close()  # memory's entries to the disk tier, when there is one
        self._gen.close()
