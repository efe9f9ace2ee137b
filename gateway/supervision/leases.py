"""The requests that hold one model: each lease's phase, counted in one place.

A request leases its model for its whole life: held back (another model's turn), waiting for
the load, then running on the worker. `Supervisor.lease` moves a lease through its phases;
everything else (admission, eviction, /api/ps, /api/queue, metrics) only reads the counts.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any


class Phase(enum.StrEnum):
    HELD = "held"
    LOADING = "loading"
    RUNNING = "running"


class Leases:
    def __init__(self, max_batch: int) -> None:
        self._max_batch = max_batch
        self._counts = dict.fromkeys(Phase, 0)
        self._tickets: dict[int, tuple[float, Phase]] = {}  # lease id -> (since, phase)
        self._ids = itertools.count(1)

    def enter(self) -> int:
        """A request starts its lease (held); returns the lease id."""
        lid = next(self._ids)
        self._tickets[lid] = (time.monotonic(), Phase.HELD)
        self._counts[Phase.HELD] += 1
        return lid

    def advance(self, lid: int, phase: Phase) -> None:
        since, old = self._tickets[lid]
        self._counts[old] -= 1
        self._counts[phase] += 1
        self._tickets[lid] = (since, phase)

    def leave(self, lid: int) -> None:
        _, phase = self._tickets.pop(lid)
        self._counts[phase] -= 1

    @property
    def held(self) -> int:
        return self._counts[Phase.HELD]

    @property
    def active(self) -> int:
        """Leases that hold the worker in use (loading or running): never evicted under."""
        return self._counts[Phase.LOADING] + self._counts[Phase.RUNNING]

    @property
    def in_batch(self) -> int:
        """Running requests the worker batches now (at most max_batch)."""
        return min(self._counts[Phase.RUNNING], self._max_batch)

    @property
    def queued(self) -> int:
        """Requests waiting: held, waiting for the load, or running beyond max_batch."""
        return (self._counts[Phase.HELD] + self._counts[Phase.LOADING]
                + max(0, self._counts[Phase.RUNNING] - self._max_batch))

    def queue_entries(self) -> list[dict[str, Any]]:
        """/api/queue rows: each waiting request's lease id, age and phase (running requests
        beyond max_batch wait inside the worker: queued_in_batch)."""
        now = time.monotonic()
        entries, running = [], 0
        for lid, (since, phase) in sorted(self._tickets.items(), key=lambda kv: kv[1][0]):
            name = phase.value
            if phase is Phase.RUNNING:
                running += 1
                if running <= self._max_batch:
                    continue
                name = "queued_in_batch"
            entries.append({"id": lid, "age_s": round(now - since, 3), "phase": name})
        return entries
