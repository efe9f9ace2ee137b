"""The supervisor: the only code that spawns or stops a worker.

Requests reach a worker through `lease()`, which resolves the model (name or alias), makes its
worker ready (one load however many requests arrive) and holds it in use for the request's
duration, so nothing stops a worker under a running request. Every lifecycle change is one
structured log line and one entry in the recent-events ring.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from config import Config, ModelConfig
from gateway.errors import NotFound
from gateway.worker_handle import State, WorkerHandle
from gateway.worker_process import WorkerProcess

log = logging.getLogger("mlxgw.supervisor")

SPAWN_TIMEOUT_S = 120.0  # interpreter start + `import mlx` on a cold, busy machine
EVENTS_KEPT = 1000


class Supervisor:
    def __init__(self, config: Config, *, ipc_dir: Path, worker_env: dict[str, str]) -> None:
        self.config = config
        self._ipc_dir = ipc_dir
        self._env = worker_env
        self._handles: dict[str, WorkerHandle] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.draining = False
        self._idle = asyncio.Event()  # set while no request holds a lease
        self._idle.set()

    # ------------------------------------------------------------------ models

    def resolve(self, name: str) -> ModelConfig:
        model = self.config.resolve(name)
        if model is None:
            known = ", ".join(self.config.models) or "none configured"
            raise NotFound(f"The model '{name}' does not exist. Available models: {known}",
                           param="model")
        return model

    def handle(self, model: ModelConfig) -> WorkerHandle:
        h = self._handles.get(model.name)
        if h is None:
            h = WorkerHandle(
                model,
                get_process=self._new_process,
                load_timeout_s=self.config.gateway.load_timeout,
                memory_limit_bytes=self.config.gateway.memory_limit,
                on_event=self._on_event,
            )
            self._handles[model.name] = h
        return h

    async def _new_process(self, label: str) -> WorkerProcess:
        wp = await WorkerProcess.spawn(ipc_dir=self._ipc_dir, env=self._env, label=label)
        try:
            await wp.wait_hello(SPAWN_TIMEOUT_S)
        except BaseException:
            wp.kill()
            wp.close()
            raise
        return wp

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[WorkerHandle]:
        """Yields the model's ready worker, held in use until the block exits.
        Blocks on the model's load (bounded by load_timeout); raises NotFound, LoadFailed."""
        h = self.handle(self.resolve(name))
        h.active += 1
        self._idle.clear()
        try:
            await h.ensure_ready()
            yield h
        finally:
            h.active -= 1
            h.last_used = time.monotonic()
            if not self.in_flight():
                self._idle.set()

    async def load(self, name: str) -> WorkerHandle:
        async with self.lease(name) as h:
            return h

    async def unload(self, name: str) -> WorkerHandle:
        h = self.handle(self.resolve(name))
        await h.stop("unload")
        return h

    # ------------------------------------------------------------------ reporting

    def ps(self) -> list[dict[str, Any]]:
        return [h.snapshot() for h in self._handles.values()
                if h.state in (State.STARTING, State.READY, State.DRAINING)]

    def in_flight(self) -> int:
        return sum(h.active for h in self._handles.values())

    def _on_event(self, h: WorkerHandle, kind: str, details: dict[str, Any]) -> None:
        event = {"type": kind, "time": time.time(), "model": h.model.name, **details}
        self.events.append(event)
        log.info("[event] %s", json.dumps(event, default=str))

    # ------------------------------------------------------------------ shutdown

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; wait (bounded) for in-flight ones to finish."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def shutdown(self) -> None:
        """Stop every worker; nothing outlives the gateway. Idempotent."""
        self.draining = True
        await asyncio.gather(*(h.stop("unload") for h in self._handles.values()),
                             return_exceptions=True)
        for h in self._handles.values():
            h.kill()
        with contextlib.suppress(OSError):
            for f in self._ipc_dir.iterdir():
                f.unlink()
            os.rmdir(self._ipc_dir)
