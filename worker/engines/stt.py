"""Speech-to-text engine: mlx-whisper behind the worker's engine interface.

Requests queue and run one at a time (a Whisper decode is not batched across requests). A
transcription of minutes of audio takes longer than the gateway waits between heartbeats, so
it runs on the engine's own thread: `step` waits on it for at most STEP_WAIT_S, so the worker
loop keeps reading cancels and sending heartbeats meanwhile. That thread is the only one that
touches MLX for this engine (the load runs on it too). A model folder is either mlx-whisper's
own (config.json + weights.safetensors) or CTranslate2's (faster-whisper's model.bin, possibly
split into parts), converted at load by `mlx_gw.worker.loaders.whisper_convert`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import numpy as np

from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.loaders.whisper_convert import is_ct2_dir, load_whisper
from mlx_gw.worker.protocol import Error, Load, Transcribe, Transcription

log = logging.getLogger("mlxgw.worker")

SAMPLE_RATE = 16000
STEP_WAIT_S = 0.05  # longest one step blocks the loop while a transcription runs
CONTEXT_TOKENS = 448  # Whisper's text window (Ready.context_length)
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # OpenAI's temperature 0: auto


class STTEngine:
    def __init__(self, path: str, *, fp16: bool, pool: cf.ThreadPoolExecutor) -> None:
        from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        self.path = path
        self.fp16 = fp16
        self.context_length = CONTEXT_TOKENS
        self._pool = pool
        self._languages = LANGUAGES
        self._codes = TO_LANGUAGE_CODE
        self._queue: deque[Transcribe] = deque()
        self._running: tuple[Transcribe, cf.Future[dict[str, Any]]] | None = None
        self._dropped: set[int] = set()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_load(cls, load: Load) -> STTEngine:
        dtype = load.dtype
        if dtype == "auto":  # MLX's CPU half-precision kernels are slow; GPUs want float16
            dtype = "float32" if mx.default_device() == mx.cpu else "float16"
        pool = cf.ThreadPoolExecutor(1, thread_name_prefix="stt")
        pool.submit(_load_model, load.path, dtype).result()
        return cls(load.path, fp16=dtype == "float16", pool=pool)

    # ------------------------------------------------------------------ admission

    def submit(self, req: Transcribe) -> None:
        if not isinstance(req, Transcribe):
            raise AdmissionError("unsupported", "this is a speech-to-text model: it serves "
                                 "/v1/audio/transcriptions and /v1/audio/translations")
        if req.task not in ("transcribe", "translate"):
            raise AdmissionError("invalid_request", f"unknown task {req.task!r}")
        if req.language:
            code = req.language.lower()
            code = self._codes.get(code, code)
            if code not in self._languages:
                raise AdmissionError("invalid_request", f"unsupported language "
                                     f"{req.language!r}; use an ISO-639-1 code such as 'en'")
            req.language = code
        if len(req.audio) < 4:
            raise AdmissionError("invalid_request", "the audio is empty")
        self._queue.append(req)

    def cancel(self, rid: int) -> None:
        self._queue = deque(r for r in self._queue if r.rid != rid)
        if self._running is not None and self._running[0].rid == rid:
            self._dropped.add(rid)  # a running decode cannot be interrupted: drop its result

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._running is not None

    @property
    def in_flight(self) -> int:
        return len(self._queue) + (self._running is not None)

    # ------------------------------------------------------------------ decoding

    def step(self) -> list[Transcription | Error]:
        if self._running is None:
            if not self._queue:
                return []
            req = self._queue.popleft()
            self._running = (req, self._pool.submit(self._transcribe, req))
        req, future = self._running
        try:
            result = future.result(timeout=STEP_WAIT_S)
        except cf.TimeoutError:
            return []
        except Exception as e:  # this request failed; the engine keeps serving
            log.exception("transcription failed")
            self._running = None
            return [Error(rid=req.rid, code="internal", message=f"transcription failed: {e}")]
        self._running = None
        if req.rid in self._dropped:
            self._dropped.discard(req.rid)
            return []
        return [self._shape(req, result)]

    def _transcribe(self, req: Transcribe) -> dict[str, Any]:
        import mlx_whisper

        audio = np.frombuffer(req.audio, dtype=np.float32)
        temperature = FALLBACK_TEMPERATURES if req.temperature == 0 else req.temperature
        return mlx_whisper.transcribe(
            audio, path_or_hf_repo=self.path, fp16=self.fp16, verbose=None,
            task=req.task, language=req.language, initial_prompt=req.prompt or None,
            temperature=temperature, word_timestamps=req.word_timestamps)

    def _shape(self, req: Transcribe, r: dict[str, Any]) -> Transcription:
        segments, words = [], []
        for seg in r.get("segments", []):
            for w in seg.pop("words", None) or []:
                words.append({"word": w["word"], "start": round(float(w["start"]), 2),
                              "end": round(float(w["end"]), 2)})
            segments.append(msgspec.to_builtins(seg, enc_hook=_plain))
            self.generation_tokens_total += len(seg.get("tokens", []))
        code = r.get("language") or req.language or ""
        return Transcription(
            rid=req.rid, text=str(r.get("text", "")).strip(),
            language=self._languages.get(code, code), duration=len(req.audio) / 4 / SAMPLE_RATE,
            segments=segments, words=words)

    def abort_all(self) -> list[int]:
        rids = [r.rid for r in self._queue]
        if self._running is not None:
            rids.append(self._running[0].rid)
            self._dropped.add(self._running[0].rid)
        self._queue.clear()
        return rids

    def close(self) -> None:
        self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in mlx-whisper's segments, as plain Python values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def _load_model(path: str, dtype: str) -> None:
    """Load (or convert) the model into mlx-whisper's one-model cache, on the engine's thread."""
    from mlx_whisper.load_models import load_model
    from mlx_whisper.transcribe import ModelHolder

    if is_ct2_dir(path):
        model = load_whisper(path, dtype)
    else:
        model = load_model(path, dtype=getattr(mx, dtype))
        # written by mlx_gw.worker.loaders.whisper_convert
        heads = Path(path) / "alignment_heads.json"
        if heads.exists():
            model.set_alignment_heads(np.asarray(json.loads(heads.read_text()), dtype=np.int64))
    ModelHolder.model = model
    ModelHolder.model_path = path
