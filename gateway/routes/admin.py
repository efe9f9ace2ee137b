"""Admin and probe routes: /health, /ready, /api/ps, /api/load, /api/unload, /api/queue,
/api/pin. (/api/events is in mlx_gw.gateway.routes.events.)"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from mlx_gw.gateway.errors import NotFound
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.supervision.status import State, iso
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
    """Readiness for a load balancer (LiteLLM's health checks, Kubernetes): 200 or 503, and
    loads nothing. With `?model=NAME`: 200 only while NAME (or an alias) is resident and
    ready here, so a router can keep NAME's requests on the gateways that hold it; 404 for a
    name that is not configured. A draining gateway (SIGTERM) answers 503 for everything from
    its first draining moment, while its streams still run, so it stops being chosen. A 503
    also carries an OpenAI-shaped `error`, as every other error does."""
    sup = request.app[SUPERVISOR]
    name = request.query.get("model")
    body: dict[str, Any]
    if name is None:
        body = {"status": "draining" if sup.draining else "ready",
                "models": len(sup.config.models)}
    else:
        model = sup.config.resolve(name)
        if model is None and name in sup.aliases:
            model = sup.config.models[sup.aliases[name]]
        if model is None:
            raise NotFound(f"The model '{name}' does not exist. Available models: "
                           f"{', '.join(sup.config.models) or 'none configured'}", param="model")
        state = "draining" if sup.draining else sup.status(model).state.value
        body = {"status": state, "model": model.name}
    if body["status"] == State.READY.value:
        return web.json_response(body)
    why = ("The gateway is shutting down" if sup.draining else
           f"The model '{body['model']}' is not resident here (state: {body['status']})")
    body["error"] = {"message": why, "type": "server_error", "code": "not_ready"}
    return web.json_response(body, status=503, headers={"Retry-After": "1"})


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
