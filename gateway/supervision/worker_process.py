"""One worker OS process and its ZeroMQ socket pair, as the gateway sees it.

Owns: spawning `python -m mlx_gw.worker`, the PUSH (requests out) and PULL (outputs in) sockets, the
stderr relay (each line logged as `[worker:NAME]`, the tail kept for error messages), and a
staged stop (Shutdown message, bounded wait, SIGTERM, SIGKILL). It knows nothing of models or
requests: `WorkerHandle` builds on it, and a warm spare is simply one that has said Hello.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.asyncio

from mlx_gw.worker import protocol as p

log = logging.getLogger("mlxgw.worker")

STDERR_TAIL_LINES = 40
# A worker's stderr lines logged per second (and in a burst) before the rest are counted, not
# logged: a library that warns in a loop must not fill the gateway's log and disk.
STDERR_LINES_PER_S = 20.0
STDERR_BURST = 200.0
_ids = itertools.count(1)


class WorkerGone(Exception):
    """The process exited (or its socket is unusable) while we talked to it."""


class LoadRefused(Exception):
    """The worker answered its Load with an Error (bad files, a missing package): the
    message says why."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def socket_pair(ipc_dir: Path) -> tuple[int, Path, Path, zmq.Socket, zmq.asyncio.Socket]:
    """A fresh worker number, its ipc paths (requests in, outputs out) and the gateway's two
    sockets: PULL bound on the outputs path, PUSH connected to the requests path."""
    n = next(_ids)
    rx, tx = ipc_dir / f"w{n}-in", ipc_dir / f"w{n}-out"
    pull = zmq.asyncio.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(f"ipc://{tx}")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    # Connecting (not binding) queues what we send until the worker has bound its end.
    push.connect(f"ipc://{rx}")
    return n, rx, tx, push, pull


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, push: zmq.Socket, pull, paths: list[Path],
                 label: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._push = push
        self._pull = pull
        self._paths = paths
        self.label = label
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_task = asyncio.create_task(self._relay_stderr())
        self.hello: p.Hello | None = None

    @classmethod
    async def spawn(
        cls, *, ipc_dir: Path, env: dict[str, str], label: str = "spare"
    ) -> WorkerProcess:
        n, rx, tx, push, pull = socket_pair(ipc_dir)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlx_gw.worker",
            "--rx", f"ipc://{rx}", "--tx", f"ipc://{tx}", "--parent-pid", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # signals for the gateway's process group are not ours
        )
        return cls(proc, push, pull, [rx, tx], label)

    async def _relay_stderr(self) -> None:
        assert self.proc.stderr is not None
        allowance, at, dropped = STDERR_BURST, time.monotonic(), 0
        while True:
            try:
                line = await self.proc.stderr.readline()
            except ValueError:  # a line past the reader's 64 KiB limit (asyncio dropped it)
                line = b"<a line longer than 64 KiB, not shown>\n"
            if not line:
                break
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            now = time.monotonic()
            allowance = min(STDERR_BURST, allowance + (now - at) * STDERR_LINES_PER_S)
            at = now
            if allowance < 1.0:
                if not dropped:
                    log.warning("[worker:%s pid=%d] writes more than %.0f lines/s to stderr: "
                                "counting, not logging, the rest", self.label, self.pid,
                                STDERR_LINES_PER_S)
                dropped += 1
                continue
            allowance -= 1.0
            dropped = self._report_dropped(dropped)
            log.info("[worker:%s pid=%d] %s", self.label, self.pid, text)
        self._report_dropped(dropped)

    def _report_dropped(self, dropped: int) -> int:
        """Log how many stderr lines the rate limit left out (if any); returns 0."""
        if dropped:
            log.warning("[worker:%s pid=%d] %d stderr lines not logged (more than %.0f/s)",
                        self.label, self.pid, dropped, STDERR_LINES_PER_S)
        return 0

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def exit_description(self) -> str:
        rc = self.proc.returncode
        if rc is None:
            return "running"
        if rc < 0:
            return f"killed by signal {signal_name(-rc)}"
        return f"exited with code {rc}"

    def send(self, msg: p._Msg) -> None:
        """Queue one message for the worker; never blocks."""
        if self.proc.returncode is not None:
            raise WorkerGone(self.exit_description())
        try:
            self._push.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise WorkerGone(f"cannot send to worker: {e}") from e

    async def recv(self) -> p.FromWorker:
        """The next message from the worker. Cancel it to stop waiting (nothing is lost)."""
        return p.decode_from_worker(await self._pull.recv())

    async def await_ready(self, on_warming: Callable[[p.Warming], None] | None = None
                          ) -> p.Ready:
        """The worker's Ready for the Load sent to it (`on_warming` sees its Warming, sent
        between the weights' load and its warm-up). Raises LoadRefused when it answers an
        Error, WorkerGone when it exits first (the caller bounds the wait)."""
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while True:
                recv = asyncio.ensure_future(self.recv())
                done, _ = await asyncio.wait({recv, exited}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    await self.wait_exit()
                    raise WorkerGone(f"worker process {self.exit_description()} while loading")
                msg = recv.result()
                if isinstance(msg, p.Ready):
                    return msg
                if isinstance(msg, p.Warming) and on_warming is not None:
                    on_warming(msg)
                if isinstance(msg, p.Error):
                    raise LoadRefused(msg.message)
        finally:
            exited.cancel()

    async def wait_hello(self, timeout_s: float) -> p.Hello:
        """Blocks until the process says Hello (MLX imported), it exits, or the timeout passes."""
        recv = asyncio.ensure_future(self.recv())
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({recv, exited}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not recv.done():
                recv.cancel()
        if recv in done:
            msg = recv.result()
            if isinstance(msg, p.Hello):
                self.hello = msg
                return msg
            raise WorkerGone(f"unexpected first message {type(msg).__name__}")
        if exited in done or self.proc.returncode is not None:
            await self._drain_stderr()
            raise WorkerGone(f"worker process {self.exit_description()} during start-up")
        raise WorkerGone(f"worker process did not start within {timeout_s:.0f}s")

    async def _drain_stderr(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 2.0)
        except (TimeoutError, asyncio.CancelledError):
            pass

    async def wait_exit(self) -> int:
        rc = await self.proc.wait()
        await self._drain_stderr()
        return rc

    async def stop(self, grace_s: float = 5.0) -> None:
        """Staged stop: Shutdown message, then SIGTERM, then SIGKILL. Idempotent."""
        if self.proc.returncode is None:
            try:
                self.send(p.Shutdown())
            except WorkerGone:
                pass
            for sig, wait_s in ((None, grace_s), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                if sig is not None and self.proc.returncode is None:
                    try:
                        self.proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
                try:
                    await asyncio.wait_for(self.proc.wait(), wait_s)
                    break
                except TimeoutError:
                    continue
        self.close()

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._push.close(0)
        self._pull.close(0)
        for path in self._paths:
            path.unlink(missing_ok=True)
