"""Requests over one worker's socket pair: send, relay the answers, cancel, retry once.

`WorkerHandle` inherits this: `stream()` (text deltas), `results()` and `call()` (embeddings,
transcription, speech) each run one `_exchange`. A worker found dead before it answered is
replaced (`ensure_ready`) and the request sent once more; later deaths end the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import TimedOut, WorkerDied, from_worker
from mlx_gw.gateway.supervision.inbox import Died, Inbox
from mlx_gw.gateway.supervision.status import State
from mlx_gw.gateway.supervision.worker_process import WorkerGone, WorkerProcess
from mlx_gw.worker import protocol as p

log = logging.getLogger("mlxgw.supervisor")


class Exchange:
    """The request half of a WorkerHandle; the handle owns these attributes."""

    model: ModelConfig
    request_timeout_s: float
    state: State
    _wp: WorkerProcess | None
    _inbox: Inbox
    _watcher: asyncio.Task[None] | None
    _stopping: bool

    async def ensure_ready(self) -> None:  # WorkerHandle's: blocks until a worker is ready
        raise NotImplementedError

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
        """Send `msg` and yield what the worker answers for it (of `kinds`, when given) until
        `is_last`. A worker found dead before anything came back is replaced and `msg` sent
        once more: a request never fails only because it reached a worker that had died
        before it began. Raises the mapped GatewayError when the worker refuses it, WorkerDied
        when the process dies once answers have flowed (or again), TimedOut past `deadline`
        (monotonic; None: request_timeout from now). Leaving early sends Cancel."""
        if deadline is None:
            deadline = time.monotonic() + self.request_timeout_s
        for attempt in (1, 2):
            answered = False
            try:
                async with contextlib.aclosing(
                    self._send_and_relay(msg, deadline, is_last, kinds)
                ) as items:
                    async for item in items:
                        answered = True
                        yield item
                return
            except WorkerDied as e:
                wp = self._wp
                alive = wp is not None and wp.returncode is None and self.state is State.READY
                if answered or attempt == 2 or self._stopping or alive:
                    raise
                log.warning("[worker:%s] %s before answering request %d: retrying it on a "
                            "fresh worker", self.model.name, e.message, msg.rid)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    if wp is not None and self._watcher is not None:
                        await asyncio.shield(self._watcher)  # the death is registered
                    await self.ensure_ready()
            except TimeoutError:
                raise TimedOut("the request exceeded its deadline (request_timeout) while its "
                               "worker restarted", retry_after=5) from None

    async def _send_and_relay(
        self, msg: Any, deadline: float, is_last: Callable[[Any], bool],
        kinds: type | tuple[type, ...] | None,
    ) -> AsyncIterator[Any]:
        """One attempt of `_exchange`, under a fresh request id."""
        rid, q = self._inbox.open()
        msg.rid = rid
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
                if isinstance(item, Died):
                    finished = True
                    raise WorkerDied(item.why)
                if kinds is not None and not isinstance(item, kinds):
                    continue
                finished = is_last(item)
                tokens = getattr(item, "completion_tokens", tokens)
                yield item
        finally:
            self._inbox.close(rid)
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


_Request = p.Embed | p.Transcribe | p.Speak
_Result = p.Embeddings | p.Transcription | p.AudioChunk
ROUTED = (p.Error, *p.RESULTS)  # worker messages delivered to one request's queue by rid
