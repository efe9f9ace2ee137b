"""One model's worker, as the gateway sees it: state machine, pending requests, death detection.

`ensure_ready()` is the only way to get a ready worker: it decides inside the state machine
whether a load is needed, so concurrent callers share one load. Requests go through the
methods of `Exchange` (exchange.py). A reader task fans worker output out to per-request queues
(`Inbox`); an exit watcher fails every pending request the moment the process dies; a worker
silent for longer than the heartbeat timeout is killed (and so fails the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import GatewayError, LoadFailed
from mlx_gw.gateway.supervision import blas
from mlx_gw.gateway.supervision.exchange import ROUTED, Exchange
from mlx_gw.gateway.supervision.inbox import Inbox
from mlx_gw.gateway.supervision.leases import Leases
from mlx_gw.gateway.supervision.load_message import load_message
from mlx_gw.gateway.supervision.status import ModelStatus, State, handle_status
from mlx_gw.gateway.supervision.worker_process import (
    LoadRefused,
    WorkerGone,
    WorkerProcess,
    signal_name,
)
from mlx_gw.worker import protocol as p

log = logging.getLogger("mlxgw.supervisor")

# Silence longer than this (no heartbeat, no pulse, nothing) means the worker process is frozen
# (stopped, or stuck holding the GIL): it is killed. Long steps do not count: the worker's pulse
# thread speaks while they run. MLX_GW_HEARTBEAT_TIMEOUT (seconds) overrides it.
HEARTBEAT_TIMEOUT_S = float(os.environ.get("MLX_GW_HEARTBEAT_TIMEOUT", "60"))
LOAD_RETRY_BASE_S = 1.0
LOAD_RETRY_MAX_S = 30.0


EventSink = Callable[["WorkerHandle", str, dict[str, Any]], None]
ProcessSource = Callable[[str], Awaitable[WorkerProcess]]
Admission = Callable[["WorkerHandle"], Awaitable[None]]


class WorkerHandle(Exchange):
    def __init__(
        self,
        model: ModelConfig,
        *,
        get_process: ProcessSource,
        admit: Admission,
        load_timeout_s: float,
        request_timeout_s: float,
        memory_limit_bytes: int | None,
        on_event: EventSink,
    ) -> None:
        self.model = model
        self.pinned = model.pin  # /api/pin overrides the config until the gateway restarts
        self.request_timeout_s = request_timeout_s
        self.state = State.STOPPED
        self._get_process = get_process
        self._admit = admit
        self._load_timeout_s = load_timeout_s
        self._memory_limit_bytes = memory_limit_bytes
        self._on_event = on_event
        self._wp: WorkerProcess | None = None
        self._inbox = Inbox(model.name)
        self._watcher: asyncio.Task[None] | None = None  # the current process's exit watcher
        self._start_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._failures = 0
        self._retry_at = 0.0
        self._crashed = False
        self.error: str | None = None
        self.leases = Leases(model.max_batch)  # the requests holding or waiting for it
        self.memory_bytes = 0
        self.blas: str | None = None
        self.worker_in_flight = 0
        self.cache = p.Heartbeat(memory_bytes=0, in_flight=0)  # last prompt-cache figures
        self.trim_asked_at: float | None = None  # memory pressure: when the worker was asked
        self.context_length = 0
        self.loaded_at: float | None = None
        self.last_used = time.monotonic()
        self.expires_at: float | None = None  # wall-clock; None = never by time
        self.keep_alive: float | None = None  # seconds, set by the latest request; None = never
        self.estimate_bytes = 0  # admission estimate while starting
        self.admitted = False  # a load in progress has been given room under the ceiling
        self.runtime_adapters: dict[str, str] = {}  # LoRA adapters added at run time

    @property
    def active(self) -> int:
        """Requests that hold this worker in use (loading or running): never evicted under."""
        return self.leases.active

    @property
    def queued(self) -> int:
        return self.leases.queued

    @property
    def pid(self) -> int | None:
        return self._wp.pid if self._wp else None

    @property
    def ranks(self) -> tuple[dict[str, Any], ...]:
        """A distributed worker's ranks (rank, host, pid, memory each); () for one process."""
        return getattr(self._wp, "ranks", ())

    # ------------------------------------------------------------------ lifecycle

    async def ensure_ready(self) -> None:
        """Blocks until the worker is ready, starting it if needed; one load however many
        callers. Bounded by the load timeout. Raises LoadFailed or TimedOut."""
        while self.state is not State.READY:
            if self._stop_task is not None:
                await asyncio.shield(self._stop_task)
                continue
            if self._start_task is None:
                if self.state is State.FAILED and time.monotonic() < self._retry_at:
                    raise LoadFailed(self.error or "load failed",
                                     retry_after=self._retry_at - time.monotonic())
                self._start_task = asyncio.create_task(self._start())
                self._start_task.add_done_callback(self._start_done)
            await asyncio.shield(self._start_task)

    def _start_done(self, task: asyncio.Task[None]) -> None:
        if self._start_task is task:
            self._start_task = None
        if not task.cancelled():
            task.exception()  # retrieved here so a load nobody awaits logs no warning

    async def _start(self) -> None:
        name = self.model.name
        self.state = State.STARTING
        self._stopping = False
        self._emit("restart" if self._crashed else "load")
        t0 = time.monotonic()
        wp: WorkerProcess | None = None
        self.admitted = False
        try:
            await self._admit(self)  # waits (bounded) for room under the ceiling
        except BaseException as e:
            self.state = State.FAILED if self._crashed else State.STOPPED
            if isinstance(e, GatewayError):  # the load event gets its outcome
                self._emit("load_failed", error=e.message, code=e.code)
            raise
        try:
            async with asyncio.timeout(self._load_timeout_s):
                wp = await self._get_process(name)
                wp.label = name
                wp.send(load_message(self.model, memory_limit_bytes=self._memory_limit_bytes,
                                     adapters=self.runtime_adapters))
                ready = await wp.await_ready(on_warming=self._warming)
        except (WorkerGone, TimeoutError, LoadRefused) as e:
            why = (f"loading took longer than load_timeout ({self._load_timeout_s:.0f}s)"
                   if isinstance(e, TimeoutError) else str(e))
            tail = "\n".join(list(wp.stderr_tail)[-8:]) if wp else ""
            if wp is not None:
                wp.kill()
                await wp.wait_exit()
                wp.close()
            self._failures += 1
            delay = min(LOAD_RETRY_MAX_S, LOAD_RETRY_BASE_S * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            self.error = f"model '{name}' failed to load: {why}"
            if tail and not isinstance(e, LoadRefused):
                self.error += f"\nworker stderr:\n{tail}"
            self.state = State.FAILED
            self._emit("load_failed", error=self.error)
            raise LoadFailed(self.error, retry_after=delay) from None
        self._wp = wp
        self._failures = 0
        self._crashed = False
        self.error = None
        self.context_length = ready.context_length
        self.memory_bytes = ready.memory_bytes
        self.blas = blas.worker_blas(wp.pid, ready.device)
        if self.blas == blas.REFERENCE:
            log.warning("[worker:%s] computes with MLX's reference BLAS (pid %d): prompts run "
                        "~25x slower. %s", name, wp.pid, blas.REFERENCE_HINT)
        self.loaded_at = time.time()
        self.last_used = time.monotonic()
        reader = asyncio.create_task(self._read(wp))
        self._watcher = asyncio.create_task(self._watch_exit(wp, reader))
        self._tasks = [reader, self._watcher]
        self.state = State.READY
        self._emit("ready", duration_s=round(time.monotonic() - t0, 3), pid=wp.pid,
                   memory_bytes=ready.memory_bytes, device=ready.device, blas=self.blas)

    def _warming(self, msg: p.Warming) -> None:
        """The weights are in; the worker runs its batch shapes before Ready."""
        self.state, self.memory_bytes = State.WARMING, msg.memory_bytes
        self._emit("warming", pid=msg.pid, load_s=round(msg.load_seconds, 3))

    async def _read(self, wp: WorkerProcess) -> None:
        while True:
            try:
                msg = await asyncio.wait_for(wp.recv(), HEARTBEAT_TIMEOUT_S)
            except TimeoutError:
                log.error("[worker:%s] no heartbeat for %.0fs: killing pid %d",
                          self.model.name, HEARTBEAT_TIMEOUT_S, wp.pid)
                wp.kill()
                return
            if isinstance(msg, p.Outputs):
                for d in msg.items:
                    self._deliver(wp, d.rid, d)
            elif isinstance(msg, p.Heartbeat):
                self.memory_bytes = msg.memory_bytes
                self.worker_in_flight = msg.in_flight
                self.cache = msg
            elif isinstance(msg, ROUTED):
                self._deliver(wp, msg.rid, msg)

    def _deliver(self, wp: WorkerProcess, rid: int, item: Any) -> None:
        if not self._inbox.deliver(rid, item):  # its client stalled: cancelled
            with contextlib.suppress(WorkerGone):
                wp.send(p.Cancel(rid=rid))

    async def _watch_exit(self, wp: WorkerProcess, reader: asyncio.Task[None]) -> None:
        await wp.wait_exit()
        reader.cancel()
        why = f"the worker for model '{self.model.name}' {wp.exit_description()}"
        self._inbox.fail_all(why)
        wp.close()
        self._wp = None
        self.memory_bytes = 0
        self.worker_in_flight = 0
        self.cache = p.Heartbeat(memory_bytes=0, in_flight=0)
        if self._stopping:
            self.state = State.STOPPED
        else:
            self.state = State.FAILED
            self._crashed = True
            self.error = why
            self._retry_at = 0.0  # a crash restarts on the next request
            rc = wp.returncode
            self._emit("crash", pid=wp.pid, exit=wp.exit_description(), returncode=rc,
                       exit_code=rc if rc is not None and rc >= 0 else None,
                       signal=signal_name(-rc) if rc is not None and rc < 0 else None)

    def begin_stop(self, kind: str, **details: Any) -> asyncio.Task[None] | None:
        """Start stopping the worker (staged: Shutdown, SIGTERM, SIGKILL) and return the task.
        The state turns DRAINING at once, before any await, so no new request can pick it."""
        if self._stop_task is None and self._wp is not None and self._start_task is None:
            self._stopping = True
            self.state = State.DRAINING
            self._stop_task = asyncio.create_task(self._stop(self._wp, kind, details))
        return self._stop_task

    async def stop(self, kind: str = "unload", **details: Any) -> None:
        """Stop the worker; blocks until it has exited (waits out a load in progress first)."""
        while self._start_task is not None:
            await asyncio.wait({self._start_task})
        task = self.begin_stop(kind, **details)
        if task is not None:
            await asyncio.shield(task)

    async def _stop(self, wp: WorkerProcess, kind: str, details: dict[str, Any]) -> None:
        try:
            await wp.stop()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.state = State.STOPPED
            self.expires_at = None
            self._emit(kind, pid=wp.pid, **details)
        finally:
            self._stop_task = None

    def kill(self) -> None:
        """Last resort at gateway exit: SIGKILL without waiting."""
        if self._wp is not None:
            self._stopping = True
            self._wp.kill()

    def _emit(self, kind: str, **details: Any) -> None:
        self._on_event(self, kind, details)

    def status(self) -> ModelStatus:
        return handle_status(self)

    def trim_cache(self, max_bytes: int) -> int | None:
        """Shrink the worker's prompt cache to `max_bytes`, freeing MLX's buffer cache too;
        returns the cache bytes that frees by its last report (None: not running)."""
        try:
            if self._wp is None or self.state is not State.READY:
                return None
            self._wp.send(p.TrimCache(max_bytes=max_bytes))
        except WorkerGone:
            return None
        held = self.cache.prompt_cache_bytes
        self.cache = msgspec.structs.replace(self.cache, prompt_cache_bytes=min(held, max_bytes))
        return max(0, held - max_bytes)
