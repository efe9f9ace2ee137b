"""A distributed worker as the gateway sees it: N rank processes behind one WorkerProcess.

`process_source` gives a WorkerHandle the right way to get a process for its model: the usual
one (the warm spare, else a new worker), or for a model with `distributed:` a
`DistributedProcess`, whose ranks this module starts the way `mlx.launch` would (MLX_RANK and a
ring hostfile, or NCCL_* for nccl), each a child of the gateway with its parent-death watch.
Rank 0 speaks the usual protocol, so the handle needs nothing else; `RankGroup` stands in for
the one OS process: it has exited as soon as any rank has, and then it kills the others (a
dead rank would leave the rest blocked in a collective), so the handle fails the worker's
requests and the next request starts all ranks again. Memory is each rank's RSS, summed into
the worker's `memory_bytes` (all ranks run on this machine) and listed per rank in `ranks`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.supervision.worker_process import WorkerProcess, signal_name, socket_pair
from mlx_gw.worker import protocol as p

log = logging.getLogger("mlxgw.worker")

SPAWN_TIMEOUT_S = 60.0
RANK_EXIT_GRACE_S = 1.0  # after one rank exits, how long the others get before SIGKILL


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RankGroup:
    """The N rank processes, shaped like the one asyncio Process WorkerProcess holds."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs
        self.pid = procs[0].pid
        self.stderr = procs[0].stderr
        self.first_exit: int | None = None  # the rank that exited first
        self._waiter: asyncio.Task[int] | None = None

    @property
    def returncode(self) -> int | None:
        if self.first_exit is None:
            for i, proc in enumerate(self.procs):
                if proc.returncode is not None:
                    self.first_exit = i
                    break
            else:
                return None
        return self.procs[self.first_exit].returncode

    async def _wait_all(self) -> int:
        waits = [asyncio.ensure_future(proc.wait()) for proc in self.procs]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self.first_exit is None:
            self.first_exit = next(i for i, w in enumerate(waits) if w in done)
        _, pending = await asyncio.wait(waits, timeout=RANK_EXIT_GRACE_S)
        if pending:
            self.kill()
            await asyncio.wait(waits)
        return self.procs[self.first_exit].returncode  # type: ignore[return-value]

    async def wait(self) -> int:
        """Blocks until every rank has exited (the first exit ends the others); returns the
        first one's code."""
        if self._waiter is None:
            self._waiter = asyncio.ensure_future(self._wait_all())
        return await asyncio.shield(self._waiter)

    def send_signal(self, sig: int) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class DistributedProcess(WorkerProcess):
    """Rank 0's sockets and stderr (as any worker), plus the other ranks and their memory."""

    proc: RankGroup  # type: ignore[assignment]

    def __init__(self, group: RankGroup, push: zmq.Socket, pull: Any, paths: list[Path],
                 label: str, hosts: tuple[str, ...]) -> None:
        super().__init__(group, push, pull, paths, label)  # type: ignore[arg-type]
        self.hosts = hosts
        self.rank_memory = [0] * len(group.procs)
        self._relays = [asyncio.create_task(self._relay_rank(r, proc))
                        for r, proc in enumerate(group.procs) if r > 0]

    @classmethod
    async def spawn_ranks(cls, model: ModelConfig, *, ipc_dir: Path, env: dict[str, str],
                          label: str) -> DistributedProcess:
        dist = model.distributed
        assert dist is not None
        n, rx, tx, push, pull = socket_pair(ipc_dir)
        hostfile = ipc_dir / f"w{n}-hosts.json"
        ring = [[f"{h}:{_free_port(h)}"] for h in dist.hosts]
        hostfile.write_text(json.dumps(ring))
        calls = [f"tcp://{h}:{_free_port(h)}" for h in dist.hosts[1:]]
        nccl_port = _free_port(dist.hosts[0])
        procs = []
        for rank in range(dist.ranks):
            rank_env = {**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
                        "MLX_WORLD_SIZE": str(dist.ranks), "NCCL_HOST_IP": dist.hosts[0],
                        "NCCL_PORT": str(nccl_port)}
            if dist.backend == "nccl":
                rank_env["CUDA_VISIBLE_DEVICES"] = str(rank)
            args = ["--rank", str(rank), "--backend", dist.backend,
                    "--parent-pid", str(os.getpid())]
            args += (["--rx", f"ipc://{rx}", "--tx", f"ipc://{tx}", "--followers", *calls]
                     if rank == 0 else ["--listen", calls[rank - 1]])
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mlx_gw.worker.distributed", *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=rank_env, start_new_session=True))
        wp = cls(RankGroup(procs), push, pull, [rx, tx, hostfile], label, dist.hosts)
        try:
            await wp.wait_hello(SPAWN_TIMEOUT_S)
        except BaseException:
            wp.kill()
            wp.close()
            raise
        log.info("[supervisor] %d ranks up for %s (%s): pids %s", dist.ranks, model.name,
                 dist.backend, ", ".join(str(proc.pid) for proc in procs))
        return wp

    async def _relay_rank(self, rank: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.info("[worker:%s rank %d pid=%d] %s", self.label, rank, proc.pid,
                     line.decode(errors="replace").rstrip())

    def exit_description(self) -> str:
        rc = self.proc.returncode
        if rc is None:
            return "running"
        rank = self.proc.first_exit
        how = f"killed by signal {signal_name(-rc)}" if rc < 0 else f"exited with code {rc}"
        return f"rank {rank} (pid {self.proc.procs[rank].pid}) {how}"  # type: ignore[index]

    async def recv(self) -> p.FromWorker:
        """Rank 0's next message; its memory figure becomes the sum over every rank."""
        msg = await super().recv()
        if isinstance(msg, p.Heartbeat | p.Ready):
            self.rank_memory = [msg.memory_bytes] + [_rss(proc.pid) for proc in
                                                     self.proc.procs[1:]]
            msg.memory_bytes = sum(self.rank_memory)
        return msg

    @property
    def ranks(self) -> tuple[dict[str, Any], ...]:
        return tuple({"rank": r, "host": self.hosts[r], "pid": proc.pid,
                      "memory_bytes": self.rank_memory[r]}
                     for r, proc in enumerate(self.proc.procs))


def _rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def process_source(
    model: ModelConfig, default: Callable[[str], Awaitable[WorkerProcess]], ipc_dir: Path,
    env: dict[str, str],
) -> Callable[[str], Awaitable[WorkerProcess]]:
    """How the handle of `model` gets its process: `default`, or N ranks when distributed."""
    if model.distributed is None:
        return default

    async def ranks(label: str) -> WorkerProcess:
        return await DistributedProcess.spawn_ranks(model, ipc_dir=ipc_dir, env=env,
                                                    label=label)

    return ranks

