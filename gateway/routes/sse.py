"""Server-sent events: the one way a route opens and writes a text/event-stream response.

`EventStream` opens lazily (a request that fails before its first event still gets a plain
HTTP error with its status), writes events and comments, and ends with `close` or `fail`:
once the headers are out an error can only travel as a last event, which `fail` logs and
counts against the request's metrics with the error's status.

A client that reads slowly, or stops reading without closing, costs bounded memory: the
transport buffers at most STREAM_BUFFER_CAP_BYTES (then aiohttp's write waits for it to drain),
and a write that waits longer than STREAM_STALL_S ends the stream: the connection is aborted
and `ClientTooSlow` unwinds the route like a disconnect, so the request is cancelled and its
sequence leaves the worker's batch. Each stream is written by its own handler task, so one
stalled writer never holds up the other streams of its batch.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from mlx_gw.gateway.errors import GatewayError
from mlx_gw.gateway.routes import metrics

log = logging.getLogger("mlxgw.http")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}

# Bytes one stream may leave unsent in its transport before its writes wait; and how long a
# write may wait (the buffer staying above the cap) before the request is cancelled.
STREAM_BUFFER_CAP_BYTES = int(os.environ.get("MLX_GW_STREAM_BUFFER_CAP", str(256 * 1024)))
STREAM_STALL_S = float(os.environ.get("MLX_GW_STREAM_STALL_TIMEOUT", "30"))


class ClientTooSlow(ConnectionResetError):
    """The client left its stream's buffer full for longer than STREAM_STALL_S. A
    ConnectionResetError, so every route unwinds it as it does a vanished client."""


class EventStream:
    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.headers = {**SSE_HEADERS, **(headers or {})}
        self.resp: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.resp is not None

    async def open(self) -> web.StreamResponse:
        if self.resp is None:
            transport = self.request.transport
            if transport is not None:  # the cap, not asyncio's 64 KiB default, bounds it
                transport.set_write_buffer_limits(high=STREAM_BUFFER_CAP_BYTES)
            self.resp = web.StreamResponse(headers=self.headers)
            await self.resp.prepare(self.request)
        return self.resp

    async def write(self, data: bytes) -> None:
        """Write `data`; waits while the client is behind, at most STREAM_STALL_S, then aborts
        the connection and raises ClientTooSlow."""
        resp = await self.open()
        try:
            async with asyncio.timeout(STREAM_STALL_S):
                await resp.write(data)
        except TimeoutError:
            transport = self.request.transport
            unsent = transport.get_write_buffer_size() if transport is not None else 0
            log.warning("[stream] %s %s from %s: the client left its stream over the buffer cap "
                        "(%d bytes) for %.0fs, %d bytes unsent: request cancelled",
                        self.request.method, self.request.path, self.request.remote,
                        STREAM_BUFFER_CAP_BYTES, STREAM_STALL_S, unsent)
            if transport is not None:
                transport.abort()  # frees the buffered bytes now
            raise ClientTooSlow("the client stopped reading its stream") from None

    async def comment(self, text: str) -> None:
        """An SSE comment: keeps proxies and clients from timing out while nothing happens."""
        await self.write(f": {text}\n\n".encode())

    async def close(self) -> web.StreamResponse:
        resp = await self.open()
        await resp.write_eof()
        return resp

    async def fail(self, e: GatewayError, last_event: bytes, what: str) -> web.StreamResponse:
        """End the stream with `last_event` (the error, in the route family's shape)."""
        log.warning("stream for %s failed: %s", what, e.message)
        timer = metrics.current()
        if timer is not None:
            timer.failed(e.status)
        await self.write(last_event)
        return await self.close()
