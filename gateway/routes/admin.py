"""Admin and probe routes: /health, /ready, /api/ps, /api/load, /api/unload, /api/queue,
/api/pin. (/api/events is in mlx_gw.gateway.routes.events.)"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.supervision.status import iso
from mlx_gw.gateway.translate.schemas import Name, decode, keep_alive_param

routes = web.RouteTableDef()


class ModelRequest(msgspec.Struct):
    model: Name
    keep_alive: str | int | float | None = None


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    body: dict[str, Any] = {"status": "draining" if sup.draining else "ready",
                            "models": len(sup.config.models)}
    return web.json_response(body, status=503 if sup.draining else 200)


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    return web.json_response({"models": [s.ps_entry() for s in request.app[SUPERVISOR].ps()]})


@routes.post("/api/load")
async def load(request: web.Request) -> web.Response:
    body = decode(await request.read(), ModelRequest)
    status = await request.app[SUPERVISOR].load(body.model, keep_alive_param(body.keep_alive))
    return web.json_response(status.ps_entry())


@routes.post("/api/unload")
async def unload(request: web.Request) -> web.Response:
    body = decode(await request.read(), ModelRequest)
    status = await request.app[SUPERVISOR].unload(body.model)
    return web.json_response(status.ps_entry())


@routes.get("/api/queue")
async def queue(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[SUPERVISOR].queue()})


class PinRequest(msgspec.Struct):
    model: Name
    pin: bool = True


@routes.post("/api/pin")
async def pin(request: web.Request) -> web.Response:
    """Pin or unpin a model at runtime (until restart); loads nothing."""
    body = decode(await request.read(), PinRequest)
    status = request.app[SUPERVISOR].pin(body.model, body.pin)
    return web.json_response({"name": status.name, "pinned": status.pinned,
                              "state": status.state.value, "expires_at": iso(status.expires_at)})
