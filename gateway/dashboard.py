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

from gateway.metrics import METRICS
from gateway.state import SUPERVISOR
from gateway.worker_handle import State

PAGE = Path(__file__).parent / "static" / "dashboard.html"
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
    handles = {h.model.name: h for h in sup.handles()}
    models: list[dict[str, Any]] = []
    for name, m in sup.config.models.items():
        h = handles.get(name)
        st = h.state if h is not None else State.STOPPED
        resident = st in (State.STARTING, State.READY, State.DRAINING)
        models.append({
            "name": name,
            "type": m.type,
            "aliases": list(m.aliases),
            "state": st.value,
            "pinned": h.model.pin if h is not None else m.pin,
            "pid": h.pid if h is not None else None,
            "memory_bytes": h.memory_bytes if h is not None and resident else 0,
            "expires_at": h.expires_at if h is not None and st is State.READY else None,
            "queued": h.queued if h is not None else 0,
            "in_flight": min(h.running, m.max_batch) if h is not None else 0,
            "tokens_out_total": tokens.get(name, 0),
            "error": h.error if h is not None else None,
        })
    return web.json_response({"time": time.time(), "memory_limit_bytes": sup.ceiling,
                              "resident_bytes": sup.resident_bytes(), "models": models})
