"""One model's status at one moment: the immutable snapshot every reader uses.

`/api/ps`, `/api/load`, `/api/pin`, `/api/show`, the dashboard and the Prometheus collector all
read `ModelStatus` (from `WorkerHandle.status()` or `Supervisor.statuses()`), so each figure
is computed in one place: what counts as in flight, as queued, as resident.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    WARMING = "warming"  # loaded, running its batch shapes once (GPU kernels compile)
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


STARTING = (State.STARTING, State.WARMING)  # a load in progress
LOADED = (*STARTING, State.READY, State.DRAINING)  # a process exists and holds memory


@dataclasses.dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    type: str
    aliases: tuple[str, ...]
    state: State
    pinned: bool
    pid: int | None = None
    memory_bytes: int = 0  # the worker's last reported footprint; 0 unless resident
    expires_at: float | None = None  # wall clock; None = never by time
    in_flight: int = 0  # requests in the worker's batch (at most max_batch)
    queued: int = 0  # requests waiting: held, for the load, or beyond max_batch
    worker_in_flight: int = 0  # sequences the worker itself reported in its last heartbeat
    context_length: int = 0
    loaded_at: float | None = None  # wall clock
    error: str | None = None
    blas: str | None = None  # the BLAS the worker computes with (CPU workers), from Ready
    prompt_cache_bytes: int = 0  # KV the worker keeps across requests (within memory_bytes)
    prompt_cache_entries: int = 0
    prompt_cache_disk_bytes: int = 0  # its entries in the disk tier (not memory)
    ranks: tuple[dict[str, Any], ...] = ()  # a distributed worker's: rank, host, pid, memory
    speculative: dict[str, Any] | None = None  # speculative decoding's figures (spec_figures)

    @property
    def resident(self) -> bool:
        return self.state in LOADED

    def ps_entry(self) -> dict[str, Any]:
        """The /api/ps entry (also /api/load's answer): ours plus Ollama's field names."""
        return {
            "name": self.name,
            "model": self.name,
            "type": self.type,
            "pid": self.pid,
            "state": self.state.value,
            "memory_bytes": self.memory_bytes,
            "size": self.memory_bytes,
            "size_vram": 0,
            "expires_at": iso(self.expires_at),
            "in_flight": self.in_flight,
            "queued": self.queued,
            "worker_in_flight": self.worker_in_flight,
            "context_length": self.context_length,
            "loaded_at": iso(self.loaded_at),
            "pinned": self.pinned,
            "blas": self.blas,
            "prompt_cache_bytes": self.prompt_cache_bytes,
            "prompt_cache_entries": self.prompt_cache_entries,
            "prompt_cache_disk_bytes": self.prompt_cache_disk_bytes,
            "speculative": self.speculative,
            "error": self.error,
            **({"ranks": list(self.ranks)} if self.ranks else {}),
        }


def spec_figures(method: str | None, k: int, proposed: int, accepted: int,
                 active: bool) -> dict[str, Any] | None:
    """A speculating model's /api/ps figures: tokens proposed and accepted since load, their
    ratio, and whether it speculates now (it stops while speculation does not pay)."""
    if method is None:
        return None
    return {"method": method, "num_tokens": k, "proposed": proposed, "accepted": accepted,
            "acceptance_rate": round(accepted / proposed, 4) if proposed else None,
            "active": active}


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def handle_status(h: Any) -> ModelStatus:
    """The snapshot of one WorkerHandle (`h`): what every reader above uses."""
    resident = h.state in LOADED
    c = h.cache  # the last Heartbeat's figures: zeros once the process has gone
    sp = h.model.speculative
    return ModelStatus(
        name=h.model.name, type=h.model.type, aliases=tuple(h.model.aliases),
        state=h.state, pinned=h.pinned, pid=h.pid,
        memory_bytes=h.memory_bytes if resident else 0, expires_at=h.expires_at,
        in_flight=h.leases.in_batch, queued=h.leases.queued,
        worker_in_flight=h.worker_in_flight, context_length=h.context_length,
        loaded_at=h.loaded_at, error=h.error, blas=h.blas if resident else None,
        prompt_cache_bytes=c.prompt_cache_bytes, prompt_cache_entries=c.prompt_cache_entries,
        prompt_cache_disk_bytes=c.prompt_cache_disk_bytes, ranks=h.ranks,
        speculative=spec_figures(sp and sp.method, sp.num_tokens if sp else 0,
                                 c.spec_proposed, c.spec_accepted, c.spec_active))
