"""Ollama API, model listings and management: GET /api/tags, POST /api/show (Ollama's body;
our GET /api/show?model= is in routes/models.py), DELETE /api/delete, POST /api/copy.

/api/tags lists every configured model, alias and /api/copy name with what the official client
requires (`modified_at`, `digest`, `size`, `details`); /api/show answers with `model_info` and
`capabilities`. /api/copy adds a name for a model until restart (an alias: no files are
copied); /api/delete removes such a name, or a pulled model's files. Disk reads run in a
thread (store/model_files).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from mlx_gw.gateway.auth import allows
from mlx_gw.gateway.errors import NotFound
from mlx_gw.gateway.routes.models import delete_pulled
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.store import model_files
from mlx_gw.gateway.translate.ollama import CopyBody, ModelBody
from mlx_gw.gateway.translate.ollama_shape import show_answer, tag_entry
from mlx_gw.gateway.translate.schemas import decode

routes = web.RouteTableDef()


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    config = sup.config
    names = [(n, m) for m in config.models.values() for n in (m.name, *m.aliases)]
    names += [(alias, config.models[name]) for alias, name in sup.aliases.items()]
    names = [(n, m) for n, m in names if allows(m)]  # what the request's key may use
    paths = {m.path for _, m in names}
    infos = await asyncio.to_thread(lambda: {p: model_files.summary(p) for p in paths})
    return web.json_response({"models": [tag_entry(n, infos[m.path]) for n, m in names]})


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    body = decode(await request.read(), ModelBody)
    model = request.app[SUPERVISOR].resolve(body.which)
    info = await asyncio.to_thread(model_files.summary, model.path)
    if not info.get("files"):
        raise NotFound(f"The model '{body.which}' has no files on disk ({model.path}); pull "
                       "it first", param="model")
    window = [c for c in (model.context_length, info.get("context_length")) if c]
    return web.json_response(show_answer(model.type, info, info.get("template"),
                                         min(window) if window else None))


@routes.delete("/api/delete")
async def delete(request: web.Request) -> web.Response:
    body = decode(await request.read(), ModelBody)
    sup = request.app[SUPERVISOR]
    if sup.aliases.pop(body.which, None) is None:
        await delete_pulled(sup, body.which)
    return web.Response()


@routes.post("/api/copy")
async def copy(request: web.Request) -> web.Response:
    body = decode(await request.read(), CopyBody)
    request.app[SUPERVISOR].add_alias(body.destination, body.source)
    return web.Response()
