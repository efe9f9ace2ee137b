"""Text-to-speech engine: mlx-audio models behind the worker's engine interface.

Requests queue and run one at a time. The input is cut into segments of whole sentences
(at least MIN_SEGMENT_CHARS each, so short sentences keep their prosody together) and handed
to the model's `generate`, which yields audio segment by segment: each becomes one
`AudioChunk` as soon as it exists, so a client hears the first sentence while the rest is
generated. A last, empty chunk marks the end. As in the STT engine, generation runs on the
engine's own thread and `step` waits on it for at most STEP_WAIT_S, so cancels and heartbeats
flow meanwhile; a cancel takes effect at the next segment boundary.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import logging
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.protocol import AudioChunk, Error, Load, Speak

log = logging.getLogger("mlxgw.worker")

STEP_WAIT_S = 0.05
MIN_SEGMENT_CHARS = 40
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_DONE = object()


def segments(text: str) -> list[str]:
    """`text` as runs of whole sentences, each at least MIN_SEGMENT_CHARS long (but the last)."""
    out: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        if out and len(out[-1]) < MIN_SEGMENT_CHARS:
            out[-1] = f"{out[-1]} {sentence}"
        else:
            out.append(sentence)
    return out


class TTSEngine:
    def __init__(self, model: Any, *, voices: list[str], pool: cf.ThreadPoolExecutor) -> None:
        self.model = model
        self.voices = voices
        self.context_length = 0
        self._pool = pool
        params = inspect.signature(model.generate).parameters
        self._takes_speed = "speed" in params
        self._split = "split_pattern" in params
        self._queue: deque[Speak] = deque()
        self._current: tuple[Speak, Iterator[Any]] | None = None
        self._next: cf.Future[Any] | None = None
        self._cancelled: set[int] = set()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_load(cls, load: Load) -> TTSEngine:
        pool = cf.ThreadPoolExecutor(1, thread_name_prefix="tts")
        model = pool.submit(_load_model, load.path, load.dtype).result()
        voices_dir = Path(load.path) / "voices"
        voices = sorted(p.stem for p in voices_dir.iterdir()) if voices_dir.is_dir() else []
        return cls(model, voices=voices, pool=pool)

    # ------------------------------------------------------------------ admission

    def submit(self, req: Speak) -> None:
        if not isinstance(req, Speak):
            raise AdmissionError("unsupported", "this is a text-to-speech model: it serves "
                                 "/v1/audio/speech")
        if not req.text.strip():
            raise AdmissionError("invalid_request", "the input text is empty")
        if self.voices and req.voice not in self.voices:
            raise AdmissionError("invalid_request", f"unknown voice {req.voice!r}; this model "
                                 f"has: {', '.join(self.voices)}")
        if req.speed != 1.0 and not self._takes_speed:
            raise AdmissionError("invalid_request", "this model speaks at one speed only: "
                                 "leave speed at 1.0")
        self._queue.append(req)

    def cancel(self, rid: int) -> None:
        self._queue = deque(r for r in self._queue if r.rid != rid)
        if self._current is not None and self._current[0].rid == rid:
            self._cancelled.add(rid)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._current is not None

    @property
    def in_flight(self) -> int:
        return len(self._queue) + (self._current is not None)

    # ------------------------------------------------------------------ generation

    def _start(self, req: Speak) -> Iterator[Any]:
        kwargs: dict[str, Any] = {}
        if self.voices:
            kwargs["voice"] = req.voice
        if self._takes_speed:
            kwargs["speed"] = req.speed
        parts = segments(req.text)
        if self._split:
            return self.model.generate(text="\n".join(parts), split_pattern="\n", **kwargs)
        return (r for part in parts for r in self.model.generate(text=part, **kwargs))

    def step(self) -> list[AudioChunk | Error]:
        if self._current is None:
            if not self._queue:
                return []
            req = self._queue.popleft()
            self._current = (req, self._pool.submit(self._start, req).result())
        req, results = self._current
        if req.rid in self._cancelled:
            return self._finish(req, [])
        if self._next is None:
            self._next = self._pool.submit(_advance, results)
        try:
            result = self._next.result(timeout=STEP_WAIT_S)
        except cf.TimeoutError:
            return []
        except Exception as e:
            log.exception("speech generation failed")
            return self._finish(req, [Error(rid=req.rid, code="internal",
                                            message=f"speech generation failed: {e}")])
        self._next = None
        if result is _DONE:
            return self._finish(req, [AudioChunk(rid=req.rid, pcm=b"", sample_rate=0,
                                                 final=True)])
        audio, rate, tokens = result
        self.generation_tokens_total += tokens
        return [AudioChunk(rid=req.rid, pcm=audio, sample_rate=rate)]

    def _finish(self, req: Speak, out: list[AudioChunk | Error]) -> list[AudioChunk | Error]:
        self._current = None
        self._next = None
        if req.rid in self._cancelled:
            self._cancelled.discard(req.rid)
            return []
        return out

    def abort_all(self) -> list[int]:
        rids = [r.rid for r in self._queue]
        if self._current is not None:
            rids.append(self._current[0].rid)
        self._queue.clear()
        self._current = None
        self._next = None
        return rids

    def close(self) -> None:
        self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _advance(results: Iterator[Any]) -> Any:
    """The next generated segment as (float32 PCM bytes, sample rate, tokens), or _DONE."""
    try:
        r = next(results)
    except StopIteration:
        return _DONE
    audio = np.asarray(r.audio.astype(mx.float32)).reshape(-1)
    return audio.astype("<f4").tobytes(), int(r.sample_rate), int(getattr(r, "token_count", 0))


def _load_model(path: str, dtype: str) -> Any:
    from mlx_audio.tts.utils import load_model

    model = load_model(Path(path))
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    return model
