"""One worker's outputs, sorted into per-request queues.

The handle's reader task delivers each output to the queue of the request id it names; a
request whose client has stopped reading gets a bounded backlog, then an Error in place of it
(the handle cancels it in the worker). When the process dies, every open request gets `Died`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import Any, NamedTuple

from mlx_gw.worker import protocol as p

log = logging.getLogger("mlxgw.supervisor")

# Outputs one request may leave unread (its client stalled) before it is cancelled: bounded memory.
PENDING_MAX_ITEMS = int(os.environ.get("MLX_GW_PENDING_MAX_ITEMS", "1024"))


class Died(NamedTuple):
    """The worker process exited while the request was open; `why` says how."""

    why: str


class Inbox:
    def __init__(self, label: str) -> None:
        self.label = label
        self._queues: dict[int, asyncio.Queue[Any]] = {}
        self._rids = itertools.count(1)

    def open(self) -> tuple[int, asyncio.Queue[Any]]:
        """A fresh request id and the queue its outputs arrive on."""
        rid = next(self._rids)
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = q
        return rid, q

    def close(self, rid: int) -> None:
        self._queues.pop(rid, None)

    def deliver(self, rid: int, item: Any) -> bool:
        """Queue `item` for request `rid` (dropped if it is closed). Returns False when the
        request's backlog overflowed: it was replaced by an Error and must be cancelled."""
        if (q := self._queues.get(rid)) is None:
            return True
        if q.qsize() < PENDING_MAX_ITEMS:
            q.put_nowait(item)
            return True
        log.warning("[worker:%s] request %d: %d outputs unread (client stalled): cancelled",
                    self.label, rid, q.qsize())
        for _ in range(q.qsize()):
            q.get_nowait()
        q.put_nowait(p.Error(rid=rid, code="client_too_slow", message="the client fell behind"))
        return False

    def fail_all(self, why: str) -> None:
        """Every open request learns that the process has died."""
        for q in self._queues.values():
            q.put_nowait(Died(why))
