"""Admin and probe routes: /health, /ready, /api/ps, /api/load, /api/unload, /api/queue,
/api/pin. (/api/events is in gateway.events.)"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from gateway.errors import BadRequest
from gateway.schemas import keep_alive_param
from gateway.state import SUPERVISOR

routes = web.RouteTableDef()


class _ModelBody(msgspec.Struct):
    model: str
    keep_alive: str | int | float | None = None


def _model_body(body: bytes) -> _ModelBody:
    try:
        return msgspec.json.decode(body or b"{}", type=_ModelBody)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadRequest(f"Invalid request: {e}", param="model") from None


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
    return web.json_response({"models": request.app[SUPERVISOR].ps()})


@routes.post("/api/load")
async def load(request: web.Request) -> web.Response:
    body = _model_body(await request.read())
    handle = await request.app[SUPERVISOR].load(body.model, keep_alive_param(body.keep_alive))
    return web.json_response(handle.snapshot())


@routes.post("/api/unload")
async def unload(request: web.Request) -> web.Response:
    body = _model_body(await request.read())
    handle = await request.app[SUPERVISOR].unload(body.model)
    return web.json_response(handle.snapshot())


@routes.get("/api/queue")
async def queue(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[SUPERVISOR].queue()})


class _PinBody(msgspec.Struct):
    model: str
    pin: bool = True


@routes.post("/api/pin")
async def pin(request: web.Request) -> web.Response:
    """Pin or unpin a model at runtime (until restart); loads nothing."""
    try:
        body = msgspec.json.decode(await request.read() or b"{}", type=_PinBody)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadRequest(f"Invalid request: {e}", param="model") from None
    h = request.app[SUPERVISOR].pin(body.model, body.pin)
    return web.json_response({"name": h.model.name, "pinned": h.model.pin,
                              "state": h.state.value, "expires_at": h.snapshot()["expires_at"]})
