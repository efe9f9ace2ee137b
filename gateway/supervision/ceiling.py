"""The memory ceiling and max_loaded_models: what a load needs, who is evicted to make room.

`admit` runs inside a load (before its process is asked to load anything): it evicts idle,
unpinned workers least-recently-used first until the new model fits, or waits (bounded by
queue_timeout) for one to go idle, or fails with 503. `enforce` runs on the reaper's tick and
evicts idle workers while measured memory is over the ceiling. A model's need is its measured
peak from an earlier load, else the estimate from its files (read in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from mlx_gw.config import GatewayConfig
from mlx_gw.gateway.errors import Unavailable
from mlx_gw.gateway.supervision.memory import DEFAULT_BASELINE_BYTES, estimate_bytes
from mlx_gw.gateway.supervision.status import STARTING, State
from mlx_gw.gateway.supervision.worker_handle import WorkerHandle

log = logging.getLogger("mlxgw.supervisor")
MiB = 2**20
TRIM_GRACE_S = 2.5  # a trimmed worker's memory shows in its next heartbeats (every 1 s)


class Ceiling:
    def __init__(self, gw: GatewayConfig, handles: dict[str, WorkerHandle],
                 changed: Callable[[], asyncio.Event]) -> None:
        self._gw = gw
        self.limit = gw.memory_limit
        self._handles = handles  # the supervisor's, shared: read here, never changed
        self._changed = changed  # the event pulsed when a lease ends or a worker stops
        self._lock = asyncio.Lock()  # covers the evict-then-reserve step only
        self.measured: dict[str, int] = {}  # peak footprint of each model's last load
        self.baseline = DEFAULT_BASELINE_BYTES  # an empty worker's footprint, as measured
        self.starving: dict[str, float] = {}  # model -> since when its load waits for room

    def footprint(self, h: WorkerHandle) -> int:
        if h.state in STARTING:
            return max(h.estimate_bytes, h.memory_bytes)
        return h.memory_bytes or self.measured.get(h.model.name) or h.estimate_bytes

    @staticmethod
    def holds_room(h: WorkerHandle) -> bool:
        """Counts against the ceiling: loaded, stopping, or starting past admission (a load
        still waiting for room holds none)."""
        return h.state in (State.READY, State.DRAINING) or (
            h.state in STARTING and h.admitted)

    def resident_bytes(self) -> int:
        return sum(self.footprint(h) for h in self._handles.values() if self.holds_room(h))

    def usage_report(self) -> str:
        rows = [f"{h.model.name} {self.footprint(h) / MiB:.0f} MiB ({h.active} in flight"
                + (", pinned)" if h.pinned else ")")
                for h in self._handles.values() if self.holds_room(h)]
        return "; ".join(rows) or "nothing"

    async def admit(self, h: WorkerHandle) -> None:
        """Make room for `h` under the ceiling and max_loaded_models, evicting idle unpinned
        workers LRU-first; wait (bounded by queue_timeout) for one to go idle; else raise."""
        gw = self._gw
        need = self.measured.get(h.model.name) or await asyncio.to_thread(
            estimate_bytes, h.model, self.baseline)
        if need > self.limit:
            raise Unavailable(f"Model '{h.model.name}' needs about {need / MiB:.0f} MiB, more "
                              f"than the whole memory_limit ({self.limit / MiB:.0f} MiB); it "
                              "cannot be loaded on this gateway", code="model_too_large")
        deadline = time.monotonic() + gw.queue_timeout
        try:
            await self._make_room(h, need, deadline)
        finally:
            self.starving.pop(h.model.name, None)

    async def _make_room(self, h: WorkerHandle, need: int, deadline: float) -> None:
        gw = self._gw
        while True:
            change = self._changed()
            async with self._lock:
                others = [o for o in self._handles.values() if o is not h and self.holds_room(o)]
                over = sum(self.footprint(o) for o in others) + need - self.limit
                extra = len(others) + 1 - gw.max_loaded_models if gw.max_loaded_models else 0
                if over <= 0 and extra <= 0:
                    h.estimate_bytes = need
                    h.admitted = True
                    return
                idle = sorted((o for o in others if o.state is State.READY and o.active == 0
                               and not o.pinned), key=lambda o: o.last_used)
                victims: list[WorkerHandle] = []
                for o in idle:
                    if over <= 0 and extra <= 0:
                        break
                    victims.append(o)
                    over -= self.footprint(o)
                    extra -= 1
                if over <= 0 and extra <= 0:
                    why = "max_loaded_models" if extra + len(victims) > 0 else "memory"
                    tasks = [v.begin_stop("evict", reason=why, for_model=h.model.name)
                             for v in victims]
                    await asyncio.gather(*(t for t in tasks if t is not None))
                    continue
            self.starving.setdefault(h.model.name, time.monotonic())
            left = deadline - time.monotonic()
            if left <= 0:
                reason = ("max_loaded_models" if extra > 0 else
                          f"memory (needs ~{need / MiB:.0f} MiB; memory_limit "
                          f"{self.limit / MiB:.0f} MiB)")
                raise Unavailable(f"No room to load model '{h.model.name}': {reason}, and "
                                  f"nothing idle to evict. In use: {self.usage_report()}",
                                  code="no_capacity", retry_after=5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), left)

    def enforce(self) -> None:
        """Evict idle workers LRU-first while measured memory is over the ceiling."""
        for h in self._handles.values():
            if h.state is State.READY:
                self.measured[h.model.name] = max(self.measured.get(h.model.name, 0),
                                                  h.memory_bytes)
        over = self.resident_bytes() - self.limit
        if over <= 0:
            for h in self._handles.values():
                h.trim_asked_at = None  # the pressure is over
            return
        # Workers give memory back first, least recently used model first: each is asked to
        # shrink its prompt cache and release MLX's buffer cache (a smaller cache costs a few
        # re-prefills, an eviction a whole reload), again every TRIM_GRACE_S while its cache
        # still holds bytes. Known cache bytes count as freed at once; the rest shows in the
        # worker's next heartbeats, which eviction waits for. A worker is evicted only once
        # it has nothing left to give.
        now, waiting = time.monotonic(), False
        for h in sorted((h for h in self._handles.values() if h.state is State.READY),
                        key=lambda h: h.last_used):
            if over <= 0:
                return
            settled = h.trim_asked_at is None or now - h.trim_asked_at >= TRIM_GRACE_S
            if settled and (h.trim_asked_at is None or h.cache.prompt_cache_bytes > 0):
                keep = max(0, h.cache.prompt_cache_bytes - over)
                freed = h.trim_cache(keep)
                if freed is not None:
                    log.info("[supervisor] resident memory %.0f MiB over the ceiling: asking "
                             "%s to shrink its prompt cache to %.0f MiB", over / MiB,
                             h.model.name, keep / MiB)
                    h.trim_asked_at = now
                    over -= freed
                    waiting = True
            elif now - h.trim_asked_at < TRIM_GRACE_S:
                waiting = True
        if over <= 0 or waiting:
            return
        idle = sorted((h for h in self._handles.values() if h.state is State.READY
                       and h.active == 0 and not h.pinned), key=lambda h: h.last_used)
        for h in idle:
            if over <= 0:
                break
            h.begin_stop("evict", reason="memory", over_bytes=over)
            over -= self.footprint(h)
        if over > 0:
            log.warning("[supervisor] resident memory is %.0f MiB over the ceiling and nothing "
                        "idle can be evicted: %s", over / MiB, self.usage_report())
