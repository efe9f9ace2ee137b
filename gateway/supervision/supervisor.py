"""The supervisor: the only code that spawns or stops a worker.

Requests reach a worker through `lease()`, which resolves the model (name or alias), makes its
worker ready (one load however many requests arrive) and holds it in use for the request's
duration, so nothing evicts or expires a worker under a running request. Before a load,
`Ceiling.admit` makes room under the memory ceiling and `max_loaded_models` by evicting idle,
unpinned workers least-recently-used first, or waits (bounded by queue_timeout) for one to go idle.
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

from mlx_gw.config import UNSET, Config, ModelConfig
from mlx_gw.gateway.errors import BadRequest, Conflict, NotFound, QueueFull
from mlx_gw.gateway.supervision.adapters import Adapters
from mlx_gw.gateway.supervision.ceiling import Ceiling
from mlx_gw.gateway.supervision.distributed import process_source
from mlx_gw.gateway.supervision.kinds import check_kind
from mlx_gw.gateway.supervision.leases import Phase
from mlx_gw.gateway.supervision.status import LOADED, ModelStatus, State
from mlx_gw.gateway.supervision.worker_handle import WorkerHandle
from mlx_gw.gateway.supervision.worker_process import WorkerGone, WorkerProcess

log = logging.getLogger("mlxgw.supervisor")

SPAWN_TIMEOUT_S = 120.0  # interpreter start + `import mlx` on a cold, busy machine
EVENTS_KEPT = 1000
REAPER_TICK_S = 1.0  # how often measured memory is checked against the ceiling
KEEPALIVE_S = 2.0  # SSE comment interval while a streaming request waits for its model
KEEPALIVE_FIRST_S = 0.5  # the first one comes sooner: a client sees at once that it waits
MiB = 2**20

class Supervisor:
    def __init__(self, config: Config, *, ipc_dir: Path, worker_env: dict[str, str]) -> None:
        self.config = config
        self._ipc_dir = ipc_dir
        self._env = worker_env
        self._handles: dict[str, WorkerHandle] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        # Called with each event as it happens (metrics, /api/events?follow=1); must not block.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Called with the model and the name asked for once a request has resolved it, in the
        # request's task (request metrics attribute the request to its model whatever the
        # route); one may raise a GatewayError to refuse it (an API key's model allowlist).
        self.resolve_observers: list[Callable[[ModelConfig, str], None]] = []
        self._event_ids = itertools.count(1)
        # Names added at runtime (Ollama's /api/copy), until restart: alias -> model name.
        self.aliases: dict[str, str] = {}
        self.adapters = Adapters()  # LoRA adapters added at runtime, and their resolution
        self.draining = False
        self._idle = asyncio.Event()  # set while no request holds a lease
        self._idle.set()
        self._change = asyncio.Event()  # pulsed when a lease ends or a worker stops
        self.room = Ceiling(config.gateway, self._handles, lambda: self._change)
        self._spare: asyncio.Task[WorkerProcess] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._retired = itertools.count(1)  # keys of handles a reload replaced (still counted)

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

    def resolve(self, name: object, route: str | None = None) -> ModelConfig:
        """The configured model `name` (a name or an alias) that serves `route` (None: any
        kind, for the admin routes). The one lookup of a request, before anything loads:
        raises BadRequest for a missing name or a kind the route does not serve, NotFound for
        an unknown one."""
        if not isinstance(name, str) or not name:
            raise BadRequest("'model' must be a non-empty string", param="model")
        model = self.config.resolve(name) or self.adapters.resolve(self, name)
        if model is None:
            known = ", ".join(self.config.models) or "none configured"
            raise NotFound(f"The model '{name}' does not exist. Available models: {known}",
                           param="model")
        for observe in self.resolve_observers:
            observe(model, name)
        if route is not None:
            check_kind(model, name, route)
        return model

    def add_alias(self, alias: str, name: str) -> ModelConfig:
        """Serve model `name` as `alias` too, until restart (Ollama's /api/copy). Raises
        NotFound for an unknown `name`, Conflict when `alias` is a configured name."""
        model = self.resolve(name)
        if self.config.resolve(alias) is not None:
            raise Conflict(f"'{alias}' is already a configured model name or alias",
                           param="destination")
        self.aliases[alias] = model.name
        return model

    def handle(self, model: ModelConfig) -> WorkerHandle:
        h = self._handles.get(model.name)
        if h is None:
            h = WorkerHandle(
                self.config.models.get(model.name, model),  # an adapter's: its base
                get_process=process_source(model, self._process_for, self._ipc_dir, self._env),
                admit=self.room.admit,
                load_timeout_s=self.config.gateway.load_timeout,
                request_timeout_s=self.config.gateway.request_timeout,
                memory_limit_bytes=self.room.limit,
                on_event=self._on_event,
            )
            h.keep_alive = self.config.effective_keep_alive(model)
            h.runtime_adapters = self.adapters.for_base(model.name)
            self._handles[model.name] = h
        return h

    @contextlib.asynccontextmanager
    async def lease(
        self,
        model: ModelConfig,
        keep_alive: Any = UNSET,
        *,
        heartbeat: Callable[[], Awaitable[None]] | None = None,
        touch: bool = True,
    ) -> AsyncIterator[WorkerHandle]:
        """Yields the model's ready worker, held in use until the block exits.

        `model` comes from `resolve` (which checked its kind). `keep_alive` (seconds, None =
        never, UNSET = keep the model's setting) applies from the end of this request;
        `touch=False` (health probes) leaves expiry and LRU order alone. While the request
        waits, `heartbeat` is awaited every KEEPALIVE_S. Blocks on the hold (another model's
        turn), then on the load; raises QueueFull, LoadFailed, Unavailable."""
        h = self.handle(model)
        self._check_queue(h)
        lid = h.leases.enter()
        self._idle.clear()
        try:
            # Awaited only when there is something to wait for: a request passing straight
            # through to a ready model must not count as waiting, even for one loop turn (a
            # burst of them would fill max_queue).
            if self._must_hold(h):
                await self._waiting(self._hold(h), heartbeat)
            h.leases.advance(lid, Phase.LOADING)
            if keep_alive is not UNSET and touch:
                h.keep_alive = keep_alive
            if h.state is not State.READY:
                await self._waiting(h.ensure_ready(), heartbeat)
            h.leases.advance(lid, Phase.RUNNING)
            yield h
        finally:
            h.leases.leave(lid)
            if h.model is not self.config.models.get(h.model.name) and h.active == 0:
                h.begin_stop("unload", reason="reload")  # its model left or changed
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
        if h.state is not State.READY or h.pinned:
            return False
        now, limit = time.monotonic(), self.config.gateway.starvation_timeout
        return any(n != h.model.name and now - since >= limit
                   for n, since in self.room.starving.items())

    def queue(self) -> dict[str, list[dict[str, Any]]]:
        out = {h.model.name: h.leases.queue_entries() for h in self._handles.values()}
        return {name: rows for name, rows in out.items() if rows}

    def _touch(self, h: WorkerHandle) -> None:
        """Recompute a model's expiry after use; keep_alive 0 unloads once it is idle."""
        if h.pinned or h.keep_alive is None:
            h.expires_at = None
        else:
            h.expires_at = time.time() + h.keep_alive
        if h.active == 0 and h.keep_alive == 0 and not h.pinned and h.state is State.READY:
            h.begin_stop("expire", keep_alive=0)
        self._pulse()

    def _pulse(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def load(self, name: str, keep_alive: Any = UNSET) -> ModelStatus:
        async with self.lease(self.resolve(name), keep_alive) as h:
            return h.status()

    async def unload(self, name: str) -> ModelStatus:
        h = self.handle(self.resolve(name))
        await h.stop("unload")
        self._pulse()
        return h.status()

    def pin(self, name: str, pinned: bool) -> ModelStatus:
        """Pin or unpin a model until the gateway restarts: a per-handle override of the
        config's `pin` (never evicted, never expired). Loads nothing; unpinning restarts the
        model's keep_alive from now."""
        h = self.handle(self.resolve(name))
        h.pinned = pinned
        if h.state is State.READY:
            self._touch(h)
        return h.status()

    def reload(self, config: Config) -> tuple[list[str], list[str], list[str]]:
        """Serve `config`'s models from now on (its gateway section applies at restart).
        Added models are servable at once; a removed or changed model's worker stops once
        idle (in-flight requests finish on it) and a changed one loads anew on next use.
        Returns (added, removed, changed)."""
        added, removed, changed = self.config.model_changes(config)
        self.config = dataclasses.replace(config, gateway=self.config.gateway)
        for name, h in self._handles.items():  # unchanged: the new (equal) config object
            if h.model == self.config.models.get(name):
                h.model = self.config.models[name]
        for name in removed + changed:
            h = self._handles.pop(name, None)
            if h is not None and h.state not in (State.STOPPED, State.FAILED):
                # Kept under another key, so the ceiling still counts its memory until it stops.
                self._handles[f"{name}\0retired-{next(self._retired)}"] = h
                if h.active == 0:
                    h.begin_stop("unload", reason="reload")
        for name in added + changed:
            if (m := self.config.models[name]).pin:
                self._tasks.append(asyncio.create_task(self._load_pinned(m)))
        self._pulse()
        return added, removed, changed

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
        self.room.baseline = hello.memory_bytes
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
                if (h.state is State.READY and h.active == 0 and not h.pinned
                        and h.expires_at is not None and h.expires_at <= now):
                    h.begin_stop("expire", keep_alive=h.keep_alive)
            self.room.enforce()

    # ------------------------------------------------------------------ reporting

    @property
    def ceiling(self) -> int:
        return self.room.limit

    def resident_bytes(self) -> int:
        return self.room.resident_bytes()

    def is_ready(self, model: ModelConfig) -> bool:
        return (h := self._handles.get(model.name)) is not None and h.state is State.READY

    def status(self, model: ModelConfig) -> ModelStatus:
        """The model's status; a model never used yet is stopped."""
        h = self._handles.get(model.name)
        if h is not None:
            return h.status()
        return ModelStatus(name=model.name, type=model.type, aliases=tuple(model.aliases),
                           state=State.STOPPED, pinned=model.pin)

    def statuses(self) -> list[ModelStatus]:
        """Every configured model's status, in config order (dashboard, metrics)."""
        return [self.status(m) for m in self.config.models.values()]

    def ps(self) -> list[ModelStatus]:
        """The resident models (/api/ps)."""
        return [h.status() for h in self._handles.values() if h.state in LOADED]

    def in_flight(self) -> int:
        return sum(h.leases.held + h.active for h in self._handles.values())

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
        if kind in ("crash", "unload", "evict", "expire") and \
                self._handles.get(h.model.name) is not h:  # a handle a reload retired: gone
            for key in [k for k, v in self._handles.items() if v is h]:
                del self._handles[key]
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
