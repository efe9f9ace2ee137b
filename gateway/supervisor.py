"""The supervisor: the only code that spawns or stops a worker.

Requests reach a worker through `lease()`, which resolves the model (name or alias), makes its
worker ready (one load however many requests arrive) and holds it in use for the request's
duration, so nothing evicts or expires a worker under a running request. Before a load,
`_admit` makes room under the memory ceiling and `max_loaded_models` by evicting idle, unpinned
workers least-recently-used first, or waits (bounded by queue_timeout) for one to go idle.
One reaper task expires idle workers at `last use + keep_alive` and evicts idle ones when
measured memory crosses the ceiling. A warm spare process (MLX imported, no model) makes a
load skip interpreter start-up. Every lifecycle change is one structured log line and one
entry in the recent-events ring.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from config import UNSET, Config, ModelConfig
from gateway.errors import NotFound, QueueFull, Unavailable
from gateway.memory import DEFAULT_BASELINE_BYTES, estimate_bytes
from gateway.worker_handle import State, WorkerHandle
from gateway.worker_process import WorkerGone, WorkerProcess

log = logging.getLogger("mlxgw.supervisor")

SPAWN_TIMEOUT_S = 120.0  # interpreter start + `import mlx` on a cold, busy machine
EVENTS_KEPT = 1000
REAPER_TICK_S = 1.0  # how often measured memory is checked against the ceiling
KEEPALIVE_S = 2.0  # SSE comment interval while a streaming request waits for its model
KEEPALIVE_FIRST_S = 0.5  # the first one comes sooner: a client sees at once that it waits
MiB = 2**20

LOADED = (State.STARTING, State.READY, State.DRAINING)


class Supervisor:
    def __init__(self, config: Config, *, ipc_dir: Path, worker_env: dict[str, str]) -> None:
        self.config = config
        self.ceiling = config.gateway.memory_limit
        self._ipc_dir = ipc_dir
        self._env = worker_env
        self._handles: dict[str, WorkerHandle] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        # Called with each event as it happens (metrics, /api/events?follow=1); must not block.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Called with the resolved model's name as a lease begins, in the request's task
        # (request metrics attribute the request to its model whatever the route).
        self.lease_observers: list[Callable[[str], None]] = []
        self._event_ids = itertools.count(1)
        self.draining = False
        self._idle = asyncio.Event()  # set while no request holds a lease
        self._idle.set()
        self._change = asyncio.Event()  # pulsed when a lease ends or a worker stops
        self._admission = asyncio.Lock()  # covers the evict-then-reserve step only
        self._measured: dict[str, int] = {}  # peak footprint of each model's last load
        self._baseline = DEFAULT_BASELINE_BYTES
        self._spare: asyncio.Task[WorkerProcess] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._lease_ids = itertools.count(1)
        self._starving: dict[str, float] = {}  # model -> since when its load waits for room

    async def start(self) -> None:
        """Background work: the reaper, the warm spare, and pinned models' loads."""
        self._tasks.append(asyncio.create_task(self._reaper()))
        if self.config.gateway.warm_spare:
            self._refill_spare()
        for m in self.config.models.values():
            if m.pin:
                self._tasks.append(asyncio.create_task(self._load_pinned(m)))

    async def _load_pinned(self, model: ModelConfig) -> None:
        try:
            await self.load(model.name)
        except Exception as e:
            log.error("[supervisor] pinned model %s failed to load: %s", model.name, e)

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
                get_process=self._process_for,
                admit=self._admit,
                load_timeout_s=self.config.gateway.load_timeout,
                memory_limit_bytes=self.ceiling,
                on_event=self._on_event,
            )
            h.keep_alive = self.config.effective_keep_alive(model)
            self._handles[model.name] = h
        return h

    @contextlib.asynccontextmanager
    async def lease(
        self,
        name: str,
        keep_alive: Any = UNSET,
        *,
        heartbeat: Callable[[], Awaitable[None]] | None = None,
        touch: bool = True,
    ) -> AsyncIterator[WorkerHandle]:
        """Yields the model's ready worker, held in use until the block exits.

        `keep_alive` (seconds, None = never, UNSET = keep the model's setting) applies from the
        end of this request; `touch=False` (health probes) leaves expiry and LRU order alone.
        While the request waits, `heartbeat` is awaited every KEEPALIVE_S. Blocks on the hold
        (another model's turn), then on the load; raises NotFound, QueueFull, LoadFailed,
        Unavailable."""
        h = self.handle(self.resolve(name))
        for observe in self.lease_observers:
            observe(h.model.name)
        self._check_queue(h)
        lid = next(self._lease_ids)
        h.tickets[lid] = (time.monotonic(), "held")
        h.held += 1
        self._idle.clear()
        phase = "held"
        try:
            # Awaited only when there is something to wait for: a request passing straight
            # through to a ready model must not count as waiting, even for one loop turn (a
            # burst of them would fill max_queue).
            if self._must_hold(h):
                await self._waiting(self._hold(h), heartbeat)
            h.held -= 1
            h.loading += 1
            phase = "loading"
            h.tickets[lid] = (h.tickets[lid][0], phase)
            if keep_alive is not UNSET and touch:
                h.keep_alive = keep_alive
            if h.state is not State.READY:
                await self._waiting(h.ensure_ready(), heartbeat)
            h.loading -= 1
            h.running += 1
            phase = "running"
            h.tickets[lid] = (h.tickets[lid][0], phase)
            yield h
        finally:
            setattr(h, phase, getattr(h, phase) - 1)
            del h.tickets[lid]
            if touch:
                h.last_used = time.monotonic()
                self._touch(h)
            else:
                self._pulse()
            if not self.in_flight():
                self._idle.set()

    def _check_queue(self, h: WorkerHandle) -> None:
        if h.queued >= h.model.max_queue:
            raise QueueFull(f"Too many requests waiting for model '{h.model.name}' "
                            f"({h.queued}; max_queue {h.model.max_queue}); retry shortly",
                            retry_after=2)
        total = sum(o.queued for o in self._handles.values())
        if total >= self.config.gateway.max_queue:
            raise QueueFull(f"Too many requests waiting across all models ({total}; "
                            f"gateway.max_queue {self.config.gateway.max_queue})",
                            retry_after=2)

    @staticmethod
    async def _waiting(aw: Awaitable[None], heartbeat: Callable[[], Awaitable[None]] | None):
        if heartbeat is None:
            return await aw
        task = asyncio.ensure_future(aw)
        try:
            interval = KEEPALIVE_FIRST_S
            while True:
                done, _ = await asyncio.wait({task}, timeout=interval)
                if done:
                    return task.result()
                await heartbeat()
                interval = KEEPALIVE_S
        finally:
            task.cancel()

    async def _hold(self, h: WorkerHandle) -> None:
        """Hold a new request for a resident model while another model has starved for room
        longer than starvation_timeout, so this one drains and the other gets its turn
        (bounded by queue_timeout; then it goes ahead)."""
        deadline = time.monotonic() + self.config.gateway.queue_timeout
        while self._must_hold(h) and time.monotonic() < deadline:
            change = self._change
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), deadline - time.monotonic())

    def _must_hold(self, h: WorkerHandle) -> bool:
        """Whether a new request for `h` should wait: it is resident, unpinned, and another
        model has starved for room longer than starvation_timeout."""
        if h.state is not State.READY or h.model.pin:
            return False
        now, limit = time.monotonic(), self.config.gateway.starvation_timeout
        return any(n != h.model.name and now - since >= limit
                   for n, since in self._starving.items())

    def queue(self) -> dict[str, list[dict[str, Any]]]:
        now = time.monotonic()
        out: dict[str, list[dict[str, Any]]] = {}
        for h in self._handles.values():
            rows = sorted(h.tickets.items(), key=lambda kv: kv[1][0])
            running = 0
            entries = []
            for lid, (since, phase) in rows:
                if phase == "running":
                    running += 1
                    if running <= h.model.max_batch:
                        continue
                    phase = "queued_in_batch"
                entries.append({"id": lid, "age_s": round(now - since, 3), "phase": phase})
            if entries:
                out[h.model.name] = entries
        return out

    def _touch(self, h: WorkerHandle) -> None:
        """Recompute a model's expiry after use; keep_alive 0 unloads once it is idle."""
        if h.model.pin or h.keep_alive is None:
            h.expires_at = None
        else:
            h.expires_at = time.time() + h.keep_alive
        if h.active == 0 and h.keep_alive == 0 and not h.model.pin and h.state is State.READY:
            h.begin_stop("expire", keep_alive=0)
        self._pulse()

    def _pulse(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def load(self, name: str, keep_alive: Any = UNSET) -> WorkerHandle:
        async with self.lease(name, keep_alive) as h:
            return h

    async def unload(self, name: str) -> WorkerHandle:
        h = self.handle(self.resolve(name))
        await h.stop("unload")
        self._pulse()
        return h

    def pin(self, name: str, pinned: bool) -> WorkerHandle:
        """Pin or unpin a model until the gateway restarts: a per-handle override of the
        config's `pin` (never evicted, never expired). Loads nothing; unpinning restarts the
        model's keep_alive from now."""
        h = self.handle(self.resolve(name))
        h.model = dataclasses.replace(h.model, pin=pinned)
        if h.state is State.READY:
            self._touch(h)
        return h

    # ------------------------------------------------------------------ processes

    def _refill_spare(self) -> None:
        if self._spare is None and self.config.gateway.warm_spare and not self.draining:
            self._spare = asyncio.create_task(self._spawn("spare"))
            self._spare.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _spawn(self, label: str) -> WorkerProcess:
        wp = await WorkerProcess.spawn(ipc_dir=self._ipc_dir, env=self._env, label=label)
        try:
            hello = await wp.wait_hello(SPAWN_TIMEOUT_S)
        except BaseException:
            wp.kill()
            wp.close()
            raise
        self._baseline = hello.memory_bytes
        log.info("[supervisor] worker process pid %d up (%s), baseline %.0f MiB", wp.pid, label,
                 hello.memory_bytes / MiB)
        return wp

    async def _process_for(self, label: str) -> WorkerProcess:
        """An empty worker process for a load: the warm spare if it is up, else a new one."""
        spare, self._spare = self._spare, None
        wp = None
        if spare is not None:
            try:
                wp = await spare
            except (WorkerGone, OSError) as e:
                log.warning("[supervisor] warm spare failed (%s); spawning a new process", e)
            if wp is not None and wp.returncode is not None:
                wp.close()
                wp = None
        # The next spare starts once this load is over (see _on_event): started now, its
        # interpreter start and imports would compete with the load for the CPU (measured on
        # 2 cores: a GGUF load went from 0.9 s to 1.5-1.8 s).
        return wp if wp is not None else await self._spawn(label)

    # ------------------------------------------------------------------ memory

    def _footprint(self, h: WorkerHandle) -> int:
        if h.state is State.STARTING:
            return max(h.estimate_bytes, h.memory_bytes)
        return h.memory_bytes or self._measured.get(h.model.name) or h.estimate_bytes

    @staticmethod
    def _holds_room(h: WorkerHandle) -> bool:
        """Counts against the ceiling: loaded, stopping, or starting past admission (a load
        still waiting for room holds none)."""
        return h.state in (State.READY, State.DRAINING) or (
            h.state is State.STARTING and h.admitted)

    def resident_bytes(self) -> int:
        return sum(self._footprint(h) for h in self._handles.values() if self._holds_room(h))

    def _usage_report(self) -> str:
        rows = [f"{h.model.name} {self._footprint(h) / MiB:.0f} MiB ({h.active} in flight"
                + (", pinned)" if h.model.pin else ")")
                for h in self._handles.values() if self._holds_room(h)]
        return "; ".join(rows) or "nothing"

    async def _admit(self, h: WorkerHandle) -> None:
        """Make room for `h` under the ceiling and max_loaded_models, evicting idle unpinned
        workers LRU-first; wait (bounded by queue_timeout) for one to go idle; else raise."""
        gw = self.config.gateway
        need = self._measured.get(h.model.name) or estimate_bytes(h.model, self._baseline)
        if need > self.ceiling:
            raise Unavailable(f"Model '{h.model.name}' needs about {need / MiB:.0f} MiB, more "
                              f"than the whole memory_limit ({self.ceiling / MiB:.0f} MiB); it "
                              "cannot be loaded on this gateway", code="model_too_large")
        deadline = time.monotonic() + gw.queue_timeout
        try:
            await self._make_room(h, need, deadline)
        finally:
            self._starving.pop(h.model.name, None)

    async def _make_room(self, h: WorkerHandle, need: int, deadline: float) -> None:
        gw = self.config.gateway
        while True:
            change = self._change
            async with self._admission:
                others = [o for o in self._handles.values() if o is not h and self._holds_room(o)]
                over = sum(self._footprint(o) for o in others) + need - self.ceiling
                extra = len(others) + 1 - gw.max_loaded_models if gw.max_loaded_models else 0
                if over <= 0 and extra <= 0:
                    h.estimate_bytes = need
                    h.admitted = True
                    return
                idle = sorted((o for o in others if o.state is State.READY and o.active == 0
                               and not o.model.pin), key=lambda o: o.last_used)
                victims: list[WorkerHandle] = []
                for o in idle:
                    if over <= 0 and extra <= 0:
                        break
                    victims.append(o)
                    over -= self._footprint(o)
                    extra -= 1
                if over <= 0 and extra <= 0:
                    why = "max_loaded_models" if extra + len(victims) > 0 else "memory"
                    tasks = [v.begin_stop("evict", reason=why, for_model=h.model.name)
                             for v in victims]
                    await asyncio.gather(*(t for t in tasks if t is not None))
                    continue
            self._starving.setdefault(h.model.name, time.monotonic())
            left = deadline - time.monotonic()
            if left <= 0:
                reason = ("max_loaded_models" if extra > 0 else
                          f"memory (needs ~{need / MiB:.0f} MiB; memory_limit "
                          f"{self.ceiling / MiB:.0f} MiB)")
                raise Unavailable(f"No room to load model '{h.model.name}': {reason}, and "
                                  f"nothing idle to evict. In use: {self._usage_report()}",
                                  code="no_capacity", retry_after=5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), left)

    async def _reaper(self) -> None:
        """Expire idle workers at last use + keep_alive; evict idle ones over the ceiling."""
        while True:
            change = self._change
            now = time.time()
            due = [h.expires_at for h in self._handles.values()
                   if h.state is State.READY and h.expires_at is not None]
            timeout = min([REAPER_TICK_S, *(max(0.0, t - now) for t in due)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), timeout)
            now = time.time()
            for h in list(self._handles.values()):
                if (h.state is State.READY and h.active == 0 and not h.model.pin
                        and h.expires_at is not None and h.expires_at <= now):
                    h.begin_stop("expire", keep_alive=h.keep_alive)
            for h in self._handles.values():
                if h.state is State.READY:
                    self._measured[h.model.name] = max(self._measured.get(h.model.name, 0),
                                                       h.memory_bytes)
            self._enforce_ceiling()

    def _enforce_ceiling(self) -> None:
        over = self.resident_bytes() - self.ceiling
        if over <= 0:
            return
        idle = sorted((h for h in self._handles.values() if h.state is State.READY
                       and h.active == 0 and not h.model.pin), key=lambda h: h.last_used)
        for h in idle:
            if over <= 0:
                break
            h.begin_stop("evict", reason="memory", over_bytes=over)
            over -= self._footprint(h)
        if over > 0:
            log.warning("[supervisor] resident memory is %.0f MiB over the ceiling and nothing "
                        "idle can be evicted: %s", over / MiB, self._usage_report())

    # ------------------------------------------------------------------ reporting

    def is_ready(self, name: str) -> bool:
        h = self._handles.get(self.resolve(name).name)
        return h is not None and h.state is State.READY

    def ps(self) -> list[dict[str, Any]]:
        return [h.snapshot() for h in self._handles.values() if h.state in LOADED]

    def handles(self) -> list[WorkerHandle]:
        """Every model's handle so far (loaded or not), for metrics and the dashboard."""
        return list(self._handles.values())

    def in_flight(self) -> int:
        return sum(h.held + h.active for h in self._handles.values())

    def _on_event(self, h: WorkerHandle, kind: str, details: dict[str, Any]) -> None:
        event = {"id": next(self._event_ids), "type": kind, "time": time.time(),
                 "model": h.model.name, **details}
        self.events.append(event)
        log.info("[event] %s", json.dumps(event, default=str))
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("[supervisor] event listener failed")
        if kind in ("ready", "crash", "unload", "evict", "expire", "load_failed"):
            self._pulse()
        if kind in ("ready", "load_failed"):
            self._refill_spare()

    # ------------------------------------------------------------------ shutdown

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; wait (bounded) for in-flight ones to finish."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def shutdown(self) -> None:
        """Stop every worker and the spare; nothing outlives the gateway. Idempotent."""
        self.draining = True
        for t in self._tasks:
            t.cancel()
        spare, self._spare = self._spare, None
        if spare is not None:
            if spare.done() and not spare.cancelled() and spare.exception() is None:
                await spare.result().stop()
            else:
                spare.cancel()
                await asyncio.gather(spare, return_exceptions=True)
        await asyncio.gather(*(h.stop("unload") for h in self._handles.values()),
                             return_exceptions=True)
        for h in self._handles.values():
            h.kill()
        with contextlib.suppress(OSError):
            for f in self._ipc_dir.iterdir():
                f.unlink()
            os.rmdir(self._ipc_dir)
