"""Ollama API, generation and embeddings: GET|HEAD /, GET /api/version, POST /api/chat,
POST /api/generate, POST /api/embed, POST /api/embeddings. (Model listings and management,
/api/tags, /api/show, /api/delete, /api/copy, are in routes/ollama_models.py; /api/pull with
Ollama's body in routes/models.py; /api/ps in routes/admin.py.)

Same path as every route: decode the body (translate/ollama), resolve the model (404, or 400
for a kind the route does not serve), lease its worker (queueing, keep_alive, metrics), and
shape the answer (translate/ollama_shape). Ollama streams by default: NDJSON lines, opened at
the first delta, so an admission error is still a plain HTTP error; a failure after that is a
last line holding "error", which the official clients raise. A request with no messages (no
prompt) is Ollama's preload idiom: it loads the model, or with keep_alive 0 unloads it.
Errors on these paths are Ollama-shaped, `{"error": "..."}` (app.error_middleware).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import ERROR_SHAPE, GatewayError
from mlx_gw.gateway.routes import metrics
from mlx_gw.gateway.routes.sse import EventStream
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate.chat_stream import merged
from mlx_gw.gateway.translate.ollama import (
    ChatBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    chat_generate,
    embed_message,
    generate_generate,
    is_preload,
)
from mlx_gw.gateway.translate.ollama_shape import (
    OLLAMA_API_VERSION,
    Shaper,
    Timings,
    line,
    preload_answer,
)
from mlx_gw.gateway.translate.schemas import decode, for_model, keep_alive_param
from mlx_gw.worker.protocol import Embed, Embeddings

routes = web.RouteTableDef()
_json = msgspec.json.Encoder()
NDJSON_HEADERS = {"Content-Type": "application/x-ndjson"}
# Paths whose errors are Ollama-shaped. POST /api/show is Ollama's (GET is ours); /api/pull is
# marked per request, by its body (`mark_ollama`).
OLLAMA_PATHS = frozenset({"/", "/api/version", "/api/tags", "/api/chat", "/api/generate",
                          "/api/embed", "/api/embeddings", "/api/delete", "/api/copy"})


def mark_ollama(request: web.Request) -> None:
    """Errors of this request are rendered in Ollama's shape."""
    request[ERROR_SHAPE] = "ollama"


def is_ollama(request: web.Request) -> bool:
    return (request.get(ERROR_SHAPE) == "ollama" or request.path in OLLAMA_PATHS
            or (request.path == "/api/show" and request.method == "POST"))


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")  # what Ollama answers; clients probe it


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION})


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    return await _answer(request, decode(await request.read(), ChatBody), "/api/chat")


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    return await _answer(request, decode(await request.read(), GenerateBody), "/api/generate")


def _respond(request: web.Request, body: dict[str, Any], stream: bool) -> web.Response:
    if stream:
        return web.Response(body=line(body), headers=NDJSON_HEADERS)
    return web.json_response(body)


async def _answer(request: web.Request, body: ChatBody | GenerateBody, route: str
                  ) -> web.StreamResponse:
    timings = Timings(start=time.perf_counter_ns())
    sup = request.app[SUPERVISOR]
    model = sup.resolve(body.model, route)
    is_chat = route == "/api/chat"
    if is_preload(body):
        unload = await _preload(request, model, body.keep_alive)
        return _respond(request, preload_answer(model.name, chat=is_chat, unloaded=unload),
                        body.stream)
    vision = model.type == "vlm"
    gen = chat_generate(body, vision) if isinstance(body, ChatBody) \
        else generate_generate(body, vision)
    for_model(gen, model)
    out = Shaper(model.name, chat=is_chat, tools=gen.tools, timings=timings)
    stream = EventStream(request, NDJSON_HEADERS) if body.stream else None
    try:
        async with sup.lease(model, keep_alive_param(body.keep_alive)) as handle:
            timings.mark_ready()
            async with contextlib.aclosing(merged(handle, [gen],
                                                  observe=metrics.observer())) as deltas:
                async for _, d in deltas:
                    if stream is None:
                        out.add(d)
                    elif chunk := out.chunk(d):
                        await stream.write(chunk)
                    if d.finish_reason is not None:
                        break
        if stream is None:
            return web.json_response(out.whole())
        return await stream.close()
    except GatewayError as e:
        if stream is None or not stream.started:
            raise
        return await stream.fail(e, line({"error": e.message}), model.name)


async def _preload(request: web.Request, model: ModelConfig, keep_alive: Any) -> bool:
    """Ollama's preload idiom; returns True when it unloaded the model (keep_alive 0)."""
    sup = request.app[SUPERVISOR]
    ka = keep_alive_param(keep_alive)
    if ka == 0:
        await sup.unload(model.name)
        return True
    await sup.load(model.name, ka)
    return False


async def _embed(request: web.Request, model: ModelConfig, msg: Embed, keep_alive: Any,
                 timings: Timings) -> Embeddings:
    async with request.app[SUPERVISOR].lease(model, keep_alive_param(keep_alive)) as handle:
        timings.mark_ready()
        result = await handle.call(msg)
    timings.mark()
    assert isinstance(result, Embeddings)
    return result


def _vectors(result: Embeddings) -> list[list[float]]:
    return [np.frombuffer(v, dtype=np.float32).tolist() for v in result.data]


def _fast_json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=_json.encode(body), content_type="application/json")


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    timings = Timings(start=time.perf_counter_ns())
    body = decode(await request.read(), EmbedBody)
    model = request.app[SUPERVISOR].resolve(body.model, "/api/embed")
    msg = embed_message(body.input, body.truncate, body.dimensions)
    result = await _embed(request, model, msg, body.keep_alive, timings)
    t = timings.fields()
    return _fast_json({"model": model.name, "embeddings": _vectors(result),
                       "total_duration": t["total_duration"],
                       "load_duration": t["load_duration"],
                       "prompt_eval_count": result.prompt_tokens})


@routes.post("/api/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """The older single-prompt route; an empty prompt loads the model (as Ollama's does)."""
    body = decode(await request.read(), EmbeddingsBody)
    model = request.app[SUPERVISOR].resolve(body.model, "/api/embeddings")
    if not body.prompt:
        await _preload(request, model, body.keep_alive)
        return _fast_json({"embedding": []})
    result = await _embed(request, model, Embed(rid=0, texts=[body.prompt], truncate=True),
                          body.keep_alive, Timings(start=time.perf_counter_ns()))
    return _fast_json({"embedding": _vectors(result)[0]})
