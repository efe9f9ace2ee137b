"""Vision-language engine: mlx-vlm's BatchGenerator behind the worker's engine interface.

Chat requests arrive as `Generate` messages whose `images` lists hold the image bytes the
gateway fetched or decoded. `submit` renders the chat template, runs the processor and the
vision tower (so a bad image or an over-long prompt is refused at once) and inserts the
prompt's embeddings into mlx-vlm's continuous-batching BatchGenerator; `step` runs one batch
step and returns a Delta per sequence that advanced, as the LLM engine does. Image and
text-only requests share the batch (every row carries input embeddings).

What mlx-vlm 0.7.10 allows, and how this engine gets per-request sampling from it: the
BatchGenerator takes one sampler for the whole batch but per-row logits processors, so the
sampler is plain categorical sampling and each row's processor applies its own temperature,
top-k, top-p and min-p (temperature 0 keeps only the argmax: greedy). A `seed` reseeds MLX's
global generator when its request is admitted: reproducible alone, not inside a shared batch.

transformers 5 rejects the `padding` keyword that llava's processor passes on to its image
processor (`ImagesKwargs.__init__() got an unexpected keyword argument 'padding'`): the loaded
processor's image processor is wrapped so it only receives the keywords it declares, without
touching the installed packages.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.engines.defaults import (
    DEFAULT_CONTEXT_LENGTH,
    NEUTRAL,
    Sampling,
    completion_budget,
    final_text,
    model_sampling,
    resolve_sampling,
)
from mlx_gw.worker.engines.prompt_cache import default_max_bytes
from mlx_gw.worker.engines.stop_text import StopText
from mlx_gw.worker.engines.vlm_prefix import VisionPrefixCache
from mlx_gw.worker.protocol import Delta, Generate, Load

log = logging.getLogger("mlxgw.worker")

MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused (decompression bombs)


class ImageKwargsFilter:
    """A transformers image processor that passes on only the keywords it declares."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        declared = getattr(inner, "valid_kwargs", None)
        self._allowed = set(getattr(declared, "__annotations__", {})) if declared else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _keep(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._allowed is None:
            return kwargs
        return {k: v for k, v in kwargs.items() if k in self._allowed}

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        return self._inner(images, *args, **self._keep(kwargs))

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        return self._inner.preprocess(images, *args, **self._keep(kwargs))


@dataclass
class _Seq:
    rid: int
    uid: int
    detok: Any
    stop: StopText
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int | None = None  # known once its prefill is done


def _categorical(logprobs: mx.array) -> mx.array:
    return mx.random.categorical(logprobs)


def row_sampling(temperature: float, top_k: int, top_p: float, min_p: float):
    """A per-row logits processor that turns the batch's categorical sampler into this
    request's sampling: greedy at temperature 0, else scaled and truncated logits."""
    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        vocab = mx.arange(logits.shape[-1])[None]
        if temperature == 0:
            best = mx.argmax(logits, axis=-1, keepdims=True)
            return mx.where(vocab == best, 0.0, -mx.inf)
        logits = logits.astype(mx.float32) / temperature
        if top_k > 0 and top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -top_k][..., None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if min_p > 0:
            floor = mx.max(logits, axis=-1, keepdims=True) + float(np.log(min_p))
            logits = mx.where(logits < floor, -mx.inf, logits)
        if top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            sorted_logits = mx.take_along_axis(logits, order, axis=-1)
            probs = mx.softmax(sorted_logits, axis=-1)
            before = mx.cumsum(probs, axis=-1) - probs  # mass of the better tokens
            cut = mx.where(before >= top_p, -mx.inf, sorted_logits)
            logits = mx.put_along_axis(mx.full(logits.shape, -mx.inf), order, cut, axis=-1)
        return logits

    return process


class VLMEngine:
    def __init__(self, model: Any, processor: Any, *, context_length: int,
                 max_batch: int, sampling: Sampling = NEUTRAL,
                 prompt_cache_bytes: int = 0) -> None:
        from mlx_vlm.generate.ar import BatchGenerator
        from mlx_vlm.utils import resolve_eos_token_ids

        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.context_length = context_length
        self.sampling = sampling  # the model's defaults for what a request leaves unset
        self._eos = set(resolve_eos_token_ids(getattr(model.config, "eos_token_id", None),
                                              self.tokenizer))
        self._eos.update(getattr(processor, "additional_eos_token_ids", ()))
        self.prompt_cache = VisionPrefixCache(prompt_cache_bytes, model.language_model,
                                              processor) if prompt_cache_bytes > 0 else None
        self._gen = BatchGenerator(model.language_model, processor, stop_tokens=self._eos,
                                   sampler=_categorical, completion_batch_size=max_batch,
                                   prefill_batch_size=min(8, max_batch),
                                   compute_logprobs=False,
                                   apc_manager=self.prompt_cache.manager
                                   if self.prompt_cache else None)
        self._by_uid: dict[int, _Seq] = {}
        self._by_rid: dict[int, _Seq] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_load(cls, load: Load) -> VLMEngine:
        import mlx_vlm

        model, processor = mlx_vlm.load(load.path)
        if getattr(processor, "image_processor", None) is not None:
            processor.image_processor = ImageKwargsFilter(processor.image_processor)
        if load.dtype != "auto":
            model.set_dtype(getattr(mx, load.dtype))
        text = getattr(model.config, "text_config", None)
        ctx = load.context_length or getattr(text, "max_position_embeddings", None) \
            or DEFAULT_CONTEXT_LENGTH
        budget = load.prompt_cache_bytes
        if budget is None:
            weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            budget = default_max_bytes(weights, load.memory_limit_bytes)
        return cls(model, processor, context_length=int(ctx), max_batch=load.max_batch,
                   sampling=model_sampling(load.path), prompt_cache_bytes=budget)

    # ------------------------------------------------------------------ admission

    def _images(self, gen: Generate) -> list[Any]:
        from PIL import Image

        out = []
        for i, m in enumerate(gen.messages or []):
            for j, data in enumerate(m.get("images") or []):
                try:
                    img = Image.open(io.BytesIO(data))
                    if img.width * img.height > MAX_IMAGE_PIXELS:
                        raise AdmissionError("invalid_request", f"messages[{i}] image {j} is "
                                             f"{img.width}x{img.height} pixels; the limit is "
                                             f"{MAX_IMAGE_PIXELS} pixels")
                    out.append(img.convert("RGB"))
                except AdmissionError:
                    raise
                except Exception as e:
                    raise AdmissionError("invalid_request", f"messages[{i}] image {j} is not "
                                         f"a readable image: {e}") from None
        return out

    def _inputs(self, gen: Generate, images: list[Any]) -> tuple[mx.array, dict[str, Any]]:
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.utils import prepare_inputs

        messages = [{"role": m["role"], "content": m.get("content") or ""}
                    for m in gen.messages or []]
        try:
            prompt = apply_chat_template(self.processor, self.model.config, messages,
                                         num_images=len(images))
        except Exception as e:
            raise AdmissionError("invalid_request", f"chat template failed: {e}") from e
        raw = prepare_inputs(self.processor, images=images or None, prompts=prompt,
                             image_token_index=getattr(self.model.config, "image_token_index",
                                                       None),
                             add_special_tokens=True)
        extra = {k: v for k, v in raw.items()
                 if k not in ("input_ids", "pixel_values", "attention_mask")}
        return raw["input_ids"], {"pixel_values": raw.get("pixel_values"),
                                  "mask": raw.get("attention_mask"), **extra}

    def submit(self, gen: Generate) -> None:
        if not isinstance(gen, Generate) or gen.messages is None:
            raise AdmissionError("unsupported", "this is a vision chat model: it serves "
                                 "/v1/chat/completions")
        if gen.rid in self._by_rid:
            raise AdmissionError("invalid_request", f"duplicate request id {gen.rid}")
        ids, vision = self._inputs(gen, self._images(gen))
        n = int(ids.shape[1])
        ctx = self.context_length
        max_tokens = completion_budget(gen, n, ctx)
        pixels, mask = vision.pop("pixel_values"), vision.pop("mask")
        embedded = self.model.get_input_embeddings(ids, pixels, mask=mask, **vision)
        kwargs = {**vision, **{k: v for k, v in embedded.to_dict().items() if v is not None}}
        if self.prompt_cache is not None:  # blocks chained with this request's images
            kwargs["_apc_semantic_hash"] = self.prompt_cache.salt(pixels)
        if gen.seed is not None:
            mx.random.seed(gen.seed)
        sp = resolve_sampling(gen, self.sampling)
        sampling = row_sampling(sp.temperature, sp.top_k, sp.top_p, sp.min_p)
        (uid,) = self._gen.insert([ids.squeeze(0).tolist()], max_tokens=max_tokens,
                                  prompt_kwargs=[kwargs], logits_processors=[[sampling]])
        from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

        seq = _Seq(gen.rid, uid, NaiveStreamingDetokenizer(self.tokenizer), StopText(gen.stop),
                   n)
        self._by_uid[uid] = seq
        self._by_rid[gen.rid] = seq
        self.prompt_tokens_total += n

    def cancel(self, rid: int) -> None:
        seq = self._by_rid.pop(rid, None)
        if seq is not None:
            del self._by_uid[seq.uid]
            self._gen.remove(seq.uid)

    @property
    def busy(self) -> bool:
        return bool(self._by_uid)

    @property
    def in_flight(self) -> int:
        return len(self._by_uid)

    # ------------------------------------------------------------------ decoding

    def step(self) -> list[Delta]:
        if not self._by_uid:
            return []
        progress, responses = self._gen.next()
        for pp in progress or ():  # a prompt's prefill is done: how much came from the cache
            if (seq := self._by_uid.get(pp.uid)) is not None and seq.cached_tokens is None:
                seq.cached_tokens = int(pp.cached_tokens)
                if self.prompt_cache is not None:
                    self.prompt_cache.count(seq.prompt_tokens, seq.cached_tokens)
        out: list[Delta] = []
        for r in responses:
            seq = self._by_uid.get(r.uid)
            if seq is None or r.token is None:
                continue
            token = int(r.token)
            seq.completion_tokens += 1
            self.generation_tokens_total += 1
            finish = r.finish_reason
            if not (finish == "stop" and token in self._eos):
                seq.detok.add_token(token)
            if finish:
                seq.detok.finalize()
            text, hit = seq.stop.feed(final_text(seq.detok.last_segment, finish))
            if hit and not finish:
                finish = "stop"
                self._gen.remove(r.uid)
            elif finish and not hit:
                text += seq.stop.flush()
            if finish:
                del self._by_uid[r.uid]
                del self._by_rid[seq.rid]
            if text or finish or seq.completion_tokens == 1:
                d = Delta(seq.rid, text, seq.completion_tokens, seq.prompt_tokens, finish)
                if seq.completion_tokens == 1:
                    d.cached_tokens = seq.cached_tokens or 0
                out.append(d)
        return out

    def abort_all(self) -> list[int]:
        rids = list(self._by_rid)
        for rid in rids:
            self.cancel(rid)
        return rids

    def close(self) -> None:
        self._gen.close()
        if self.prompt_cache is not None:
            self.prompt_cache.close()
