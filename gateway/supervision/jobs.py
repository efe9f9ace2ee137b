"""One fine-tuning job's record: its status, its latest figures, and its event history.

`status` is queued | running | completed | failed | cancelled; `phase` says more while it
runs (queued, loading, training, saving). Every change is an event with an increasing `id`
(`type`: queued, loading, training, progress, val, saving, done, failed, cancelled), kept (the
last JOB_EVENTS_KEPT) for `GET /api/train/{id}/events`, whose followers wake on each one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

from mlx_gw.gateway.errors import GatewayError
from mlx_gw.worker import protocol as p

JOB_EVENTS_KEPT = 2000
TERMINAL = ("completed", "failed", "cancelled")
_LAST_EVENT = {"completed": "done", "failed": "failed", "cancelled": "cancelled"}
_FIGURES = ("learning_rate", "iterations_per_second", "tokens_per_second")


class Job:
    def __init__(self, job_id: str, base: str, adapter_name: str, iters: int,
                 params: dict[str, Any], estimate_bytes: int) -> None:
        self.id = job_id
        self.base = base
        self.adapter_name = adapter_name
        self.iters = iters
        self.params = params
        self.estimate_bytes = estimate_bytes
        self.status = "queued"
        self.phase = "queued"
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.iteration = 0
        self.loss: float | None = None
        self.first_loss: float | None = None
        self.val_loss: float | None = None
        self.first_val_loss: float | None = None
        self.figures: dict[str, float | None] = dict.fromkeys(_FIGURES)
        self.trained_tokens = 0
        self.peak_memory_bytes = 0
        self.pid: int | None = None
        self.adapter_path: str | None = None
        self.data_rows: dict[str, int] = {}
        self.error: dict[str, Any] | None = None
        self.task: asyncio.Task[None] | None = None
        self.handle: Any = None  # its WorkerHandle, for live memory
        self.events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=JOB_EVENTS_KEPT)
        self._seq = 0
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def emit(self, kind: str, **details: Any) -> None:
        """Record event `kind` (a lifecycle one also sets the phase) and wake followers."""
        if kind in ("queued", "loading", "training", "saving"):
            self.phase = kind
            if kind != "queued":
                self.status = "running"
                self.started_at = self.started_at or time.time()
        self._seq += 1
        self.events.append({"id": self._seq, "type": kind, "time": time.time(),
                            "job": self.id, **details})
        self._changed.set()
        self._changed = asyncio.Event()

    def apply(self, ev: p.TrainEvent) -> None:
        """One report from the trainer."""
        if ev.kind == "progress":
            self.iteration, self.loss = ev.iteration, ev.loss
            if self.first_loss is None:
                self.first_loss = ev.loss
            self.figures = {k: getattr(ev, k) for k in _FIGURES}
            self.trained_tokens, self.peak_memory_bytes = ev.trained_tokens, ev.peak_memory_bytes
            self.emit("progress", iteration=ev.iteration, iters=self.iters, loss=ev.loss,
                      **self.figures, trained_tokens=ev.trained_tokens,
                      peak_memory_bytes=ev.peak_memory_bytes)
        elif ev.kind == "val":
            self.val_loss = ev.val_loss
            if self.first_val_loss is None:
                self.first_val_loss = ev.val_loss
            self.emit("val", iteration=ev.iteration, val_loss=ev.val_loss, **ev.detail)
        elif ev.kind in ("training", "saving"):
            self.emit(ev.kind, iteration=ev.iteration, **ev.detail)

    def finish(self, status: str, error: GatewayError | None = None) -> None:
        if self.finished:
            return
        self.status = status
        self.phase = _LAST_EVENT[status]
        self.finished_at = time.time()
        details: dict[str, Any] = {"iteration": self.iteration}
        if error is not None:
            self.error = error.openai_body()["error"]
            details["error"] = self.error
        if self.adapter_path:
            details["adapter_path"] = self.adapter_path
        self.emit(self.phase, **details)

    def public(self) -> dict[str, Any]:
        h = self.handle
        live = h is not None and not self.finished and h.pid is not None
        return {
            "id": self.id, "object": "training_job", "status": self.status,
            "phase": self.phase, "base": self.base, "adapter_name": self.adapter_name,
            "iteration": self.iteration, "iters": self.iters, "loss": self.loss,
            "first_loss": self.first_loss, "val_loss": self.val_loss,
            "first_val_loss": self.first_val_loss, **self.figures,
            "trained_tokens": self.trained_tokens, "peak_memory_bytes": self.peak_memory_bytes,
            "memory_bytes": h.memory_bytes if live else 0,
            "estimate_bytes": self.estimate_bytes, "pid": h.pid if live else self.pid,
            "adapter_path": self.adapter_path, "data_rows": self.data_rows,
            "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "error": self.error, "params": self.params,
        }

    async def follow(self, after: int = 0, keepalive_s: float = 15.0
                     ) -> AsyncIterator[dict[str, Any] | None]:
        """The job's events after id `after`, then each new one, until its last; None
        every `keepalive_s` while nothing happens (a comment for the stream)."""
        last = after
        while True:
            changed = self._changed
            for e in list(self.events):
                if e["id"] > last:
                    last = e["id"]
                    yield e
            if self.finished and last >= self._seq:
                return
            try:
                await asyncio.wait_for(changed.wait(), keepalive_s)
            except TimeoutError:
                yield None
