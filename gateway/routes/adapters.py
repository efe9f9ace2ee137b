"""LoRA adapter routes: GET /api/adapters, POST /api/adapters, DELETE /api/adapters/{name}.

An adapter is served by its base model's worker as its own model name and as BASE:NAME
(supervision/adapters.py). Adding one loads its base if needed and has the worker read the
files before answering, so a bad directory fails here with a 400, not on first use.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate.schemas import Name, decode

routes = web.RouteTableDef()


class AdapterRequest(msgspec.Struct, forbid_unknown_fields=True):
    base: Name
    name: Name
    path: str


@routes.get("/api/adapters")
async def list_adapters(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    return web.json_response({"adapters": sup.adapters.listing(sup)})


@routes.post("/api/adapters")
async def add_adapter(request: web.Request) -> web.Response:
    body = decode(await request.read(), AdapterRequest)
    sup = request.app[SUPERVISOR]
    model = await sup.adapters.add(sup, body.base, body.name, body.path)
    return web.json_response({"name": body.name, "base": model.name, "path": body.path,
                              "models": [body.name, f"{model.name}:{body.name}"]})


@routes.delete("/api/adapters/{name}")
async def remove_adapter(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    model = await sup.adapters.remove(sup, request.match_info["name"])
    return web.json_response({"name": model.adapter, "base": model.name, "deleted": True})
