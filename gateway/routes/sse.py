"""Server-sent events: the one way a route opens and writes a text/event-stream response.

`EventStream` opens lazily (a request that fails before its first event still gets a plain
HTTP error with its status), writes events and comments, and ends with `close` or `fail`:
once the headers are out an error can only travel as a last event, which `fail` logs and
counts against the request's metrics with the error's status.
"""

from __future__ import annotations

import logging

from aiohttp import web

from mlx_gw.gateway.errors import GatewayError
from mlx_gw.gateway.routes import metrics

log = logging.getLogger("mlxgw.http")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


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
            self.resp = web.StreamResponse(headers=self.headers)
            await self.resp.prepare(self.request)
        return self.resp

    async def write(self, data: bytes) -> None:
        await (await self.open()).write(data)

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
