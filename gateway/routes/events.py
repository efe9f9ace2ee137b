"""GET /api/events: the supervisor's recent lifecycle events as JSON, or followed as SSE.

Every event carries `id` (increasing), `type`, `time` (epoch seconds), `model` and its details.
`?follow=1` answers `text/event-stream`: first the recent events (those after `Last-Event-ID`
or `?after=ID` when given), then each new one as it happens, with a comment every
KEEPALIVE_S so proxies keep the connection. A subscriber that falls SUBSCRIBER_BACKLOG events
behind is dropped (its stream ends; the client reconnects with Last-Event-ID) rather than
letting the gateway buffer without bound. Streams end when the app shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

from mlx_gw.gateway.errors import BadRequest
from mlx_gw.gateway.routes.sse import EventStream
from mlx_gw.gateway.state import SUPERVISOR

KEEPALIVE_S = 15.0
SUBSCRIBER_BACKLOG = 1000
_END = None  # queued to a subscriber: its stream ends

Event = dict[str, Any]


class EventHub:
    """Fans supervisor events out to the open follow streams."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event | None]] = set()

    def publish(self, event: Event) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(q)
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()  # make room for the end marker
                q.put_nowait(_END)

    def subscribe(self) -> asyncio.Queue[Event | None]:
        q: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event | None]) -> None:
        self._subscribers.discard(q)

    def close_all(self) -> None:
        for q in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(_END)
        self._subscribers.clear()


EVENT_HUB: web.AppKey[EventHub] = web.AppKey("event_hub", EventHub)
routes = web.RouteTableDef()


def after_id(request: web.Request) -> int:
    """The event id a client resumes after (Last-Event-ID or ?after=), 0 for all."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"Invalid event id {raw!r}: expected an integer",
                         param="after") from None


def event_frame(event: Event) -> bytes:
    """One event as an SSE frame, its `id` the stream's resume point."""
    return f"id: {event['id']}\ndata: {json.dumps(event, default=str)}\n\n".encode()


@routes.get("/api/events")
async def events(request: web.Request) -> web.StreamResponse:
    sup = request.app[SUPERVISOR]
    after = after_id(request)
    if request.query.get("follow", "").lower() not in ("1", "true", "yes"):
        return web.json_response({"events": [e for e in sup.events if e["id"] > after]},
                                 dumps=lambda o: json.dumps(o, default=str))
    hub = request.app[EVENT_HUB]
    q = hub.subscribe()  # before the backlog is copied: nothing falls between the two
    try:
        backlog = [e for e in sup.events if e["id"] > after]
        out = EventStream(request)
        await out.comment("mlx-gw events")
        last = after
        for e in backlog:
            await out.write(event_frame(e))
            last = e["id"]
        while True:
            try:
                e = await asyncio.wait_for(q.get(), KEEPALIVE_S)
            except TimeoutError:
                await out.comment("keepalive")
                continue
            if e is _END:
                break
            if e["id"] > last:
                await out.write(event_frame(e))
                last = e["id"]
        return await out.close()
    finally:
        hub.unsubscribe(q)


def install(app: web.Application) -> EventHub:
    hub = EventHub()
    app[EVENT_HUB] = hub
    app[SUPERVISOR].listeners.append(hub.publish)

    async def end_streams(app: web.Application) -> None:
        hub.close_all()

    app.on_shutdown.append(end_streams)
    app.add_routes(routes)
    return hub
