"""One model's worker, as the gateway sees it: state machine, pending requests, death detection.

`ensure_ready()` is the only way to get a ready worker: it decides inside the state machine
whether a load is needed, so concurrent callers share one load. `stream()` multiplexes a request
over the worker's socket pair and yields its deltas. A reader task fans worker output out to
per-request queues; an exit watcher fails every pending request the moment the process dies;
a worker silent for longer than the heartbeat timeout is killed (and so fails the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import msgspec

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import GatewayError, LoadFailed, TimedOut, WorkerDied, from_worker
from mlx_gw.gateway.supervision import blas
from mlx_gw.gateway.supervision.leases import Leases
from mlx_gw.gateway.supervision.status import ModelStatus, State
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
# Outputs one request may leave unread (its client stalled) before it is cancelled: bounded memory.
PENDING_MAX_ITEMS = int(os.environ.get("MLX_GW_PENDING_MAX_ITEMS", "1024"))
LOAD_RETRY_BASE_S = 1.0
LOAD_RETRY_MAX_S = 30.0


class _Died(NamedTuple):
    why: str


EventSink = Callable[["WorkerHandle", str, dict[str, Any]], None]
ProcessSource = Callable[[str], Awaitable[WorkerProcess]]
Admission = Callable[["WorkerHandle"], Awaitable[None]]


class WorkerHandle:
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
        self._pending: dict[int, asyncio.Queue[p.Delta | p.Error | _Died | _Result]] = {}
        self._rids = itertools.count(1)
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
                wp.send(p.Load(
                    name=name, type=self.model.type, path=self.model.path,
                    dtype=self.model.dtype, max_batch=self.model.max_batch,
                    context_length=self.model.context_length,
                    memory_limit_bytes=self._memory_limit_bytes,
                    prompt_cache_bytes=self.model.prompt_cache.max_bytes,
                    prompt_cache_disk=self.model.prompt_cache.disk or "",
                    prompt_cache_disk_bytes=self.model.prompt_cache.disk_max_bytes,
                    warm_prompts=list(self.model.warm_prompts),
                    kv_bits=self.model.kv_bits or 0, kv_group_size=self.model.kv_group_size,
                ))
                ready = await wp.await_ready()
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
        self._tasks = [reader, asyncio.create_task(self._watch_exit(wp, reader))]
        self.state = State.READY
        self._emit("ready", duration_s=round(time.monotonic() - t0, 3), pid=wp.pid,
                   memory_bytes=ready.memory_bytes, device=ready.device, blas=self.blas)

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
            elif isinstance(msg, _ROUTED):
                self._deliver(wp, msg.rid, msg)

    def _deliver(self, wp: WorkerProcess, rid: int, item: Any) -> None:
        if (q := self._pending.get(rid)) is None:
            return
        if q.qsize() >= PENDING_MAX_ITEMS:  # its reader is stuck: drop its backlog, cancel it
            log.warning("[worker:%s] request %d: %d outputs unread (client stalled): cancelled",
                        self.model.name, rid, q.qsize())
            for _ in range(q.qsize()):
                q.get_nowait()
            item = p.Error(rid=rid, code="client_too_slow", message="the client fell behind")
            with contextlib.suppress(WorkerGone):
                wp.send(p.Cancel(rid=rid))
        q.put_nowait(item)

    async def _watch_exit(self, wp: WorkerProcess, reader: asyncio.Task[None]) -> None:
        await wp.wait_exit()
        reader.cancel()
        why = f"the worker for model '{self.model.name}' {wp.exit_description()}"
        for q in self._pending.values():
            q.put_nowait(_Died(why))
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

    # ------------------------------------------------------------------ requests

    async def stream(
        self,
        gen: p.Generate,
        *,
        deadline: float | None = None,
        observe: Callable[[p.Delta], None] | None = None,
    ) -> AsyncIterator[p.Delta]:
        """Send one request and yield its deltas until the one with a finish_reason.

        `observe` sees each delta as it arrives (request metrics: first token, inter-token
        latency, token counts). Raises as `_exchange`."""
        async with contextlib.aclosing(
            self._exchange(gen, deadline, lambda d: d.finish_reason is not None)
        ) as items:
            async for item in items:
                if observe is not None:
                    observe(item)
                yield item

    async def results(self, req: _Request, *, deadline: float | None = None
                      ) -> AsyncIterator[_Result]:
        """Send a non-text request (Embed, Transcribe, Speak) and yield its result messages
        until the last one (every result is final except an AudioChunk with final=False).
        Raises as `_exchange`."""
        async with contextlib.aclosing(
            self._exchange(req, deadline, lambda r: getattr(r, "final", True), p.RESULTS)
        ) as items:
            async for item in items:
                yield item

    async def _exchange(
        self,
        msg: Any,
        deadline: float | None,
        is_last: Callable[[Any], bool],
        kinds: type | tuple[type, ...] | None = None,
    ) -> AsyncIterator[Any]:
        """Send `msg` under a fresh request id and yield what the worker answers for it (of
        `kinds`, when given) until `is_last`. Raises the mapped GatewayError when the worker
        refuses it, WorkerDied when the process dies meanwhile, TimedOut past `deadline`
        (monotonic; None: request_timeout from now). Leaving early sends Cancel."""
        if deadline is None:
            deadline = time.monotonic() + self.request_timeout_s
        rid = next(self._rids)
        msg.rid = rid
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._pending[rid] = q
        finished = False
        tokens = 0  # generated so far, for the deadline's log line
        try:
            wp = self._wp
            if wp is None or self.state is not State.READY:
                raise WorkerDied(f"the worker for model '{self.model.name}' is not running")
            try:
                wp.send(msg)
            except WorkerGone as e:
                raise WorkerDied(f"the worker for model '{self.model.name}': {e}") from None
            while not finished:
                try:
                    item = await asyncio.wait_for(q.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    log.warning("[worker:%s] request %d hit its deadline (request_timeout "
                                "%.0fs) after %d generated tokens: cancelled", self.model.name,
                                rid, self.request_timeout_s, tokens)
                    raise TimedOut("the request exceeded its deadline (request_timeout)",
                                   retry_after=5) from None
                if isinstance(item, p.Error):
                    finished = True
                    raise from_worker(item.code, item.message)
                if isinstance(item, _Died):
                    finished = True
                    raise WorkerDied(item.why)
                if kinds is not None and not isinstance(item, kinds):
                    continue
                finished = is_last(item)
                tokens = getattr(item, "completion_tokens", tokens)
                yield item
        finally:
            self._pending.pop(rid, None)
            if not finished and self._wp is not None:
                try:
                    self._wp.send(p.Cancel(rid=rid))
                except WorkerGone:
                    pass

    async def call(self, req: _Request, *, deadline: float | None = None) -> _Result:
        """A one-shot request (Embed, Transcribe): its single result. Raises as `results()`."""
        async with contextlib.aclosing(self.results(req, deadline=deadline)) as answers:
            async for item in answers:
                return item
        raise WorkerDied(f"the worker for model '{self.model.name}' sent no result")

    def _emit(self, kind: str, **details: Any) -> None:
        self._on_event(self, kind, details)

    def status(self) -> ModelStatus:
        resident = self.state in (State.STARTING, State.READY, State.DRAINING)
        c = self.cache  # zeros once the process has gone (_watch_exit)
        return ModelStatus(
            name=self.model.name, type=self.model.type, aliases=tuple(self.model.aliases),
            state=self.state, pinned=self.pinned, pid=self.pid,
            memory_bytes=self.memory_bytes if resident else 0, expires_at=self.expires_at,
            in_flight=self.leases.in_batch, queued=self.leases.queued,
            worker_in_flight=self.worker_in_flight, context_length=self.context_length,
            loaded_at=self.loaded_at, error=self.error, blas=self.blas if resident else None,
            prompt_cache_bytes=c.prompt_cache_bytes, prompt_cache_entries=c.prompt_cache_entries,
            prompt_cache_disk_bytes=c.prompt_cache_disk_bytes)

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


_Request = p.Embed | p.Transcribe | p.Speak
_Result = p.Embeddings | p.Transcription | p.AudioChunk
_ROUTED = (p.Error, *p.RESULTS)  # worker messages delivered to one request's queue by rid
