"""GET /dashboard: one self-contained page, and GET /dashboard/state, the JSON it polls.

The page (gateway/static/dashboard.html) inlines its CSS and JS and fetches nothing but this
gateway: its Content-Security-Policy forbids any other origin. It follows /api/events?follow=1
for lifecycle changes and polls /dashboard/state each second for what changes without an
event (queue, in flight, tokens/s, memory). With an API key set, open `/dashboard?key=KEY`
once: the page keeps the key in sessionStorage, drops it from the address bar and sends it as
a bearer header (the auth middleware accepts `?key=` on this one page, which holds no data).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from mlx_gw.gateway.routes.metrics import METRICS
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.supervision.status import State

PAGE = Path(__file__).parent.parent / "static" / "dashboard.html"
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
routes = web.RouteTableDef()
_page: str | None = None


@routes.get("/dashboard")
async def page(request: web.Request) -> web.Response:
    global _page
    if _page is None:
        _page = PAGE.read_text()
    return web.Response(text=_page, content_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store",
                                 "Referrer-Policy": "no-referrer"})


@routes.get("/dashboard/state")
async def state(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    metrics = request.app.get(METRICS)
    tokens = metrics.tokens_out if metrics is not None else {}
    models: list[dict[str, Any]] = [{
        "name": s.name,
        "type": s.type,
        "aliases": list(s.aliases),
        "state": s.state.value,
        "pinned": s.pinned,
        "pid": s.pid,
        "memory_bytes": s.memory_bytes,
        "expires_at": s.expires_at if s.state is State.READY else None,
        "queued": s.queued,
        "in_flight": s.in_flight,
        "tokens_out_total": tokens.get(s.name, 0),
        "error": s.error,
    } for s in sup.statuses()]
    return web.json_response({"time": time.time(), "memory_limit_bytes": sup.ceiling,
                              "resident_bytes": sup.resident_bytes(), "models": models})
