"""Embedding routes: POST /v1/embeddings (OpenAI) and POST /v1/rerank (Cohere/Jina shape).

Thin handlers: validate the body, lease the embedding model's worker, send one `Embed` and
shape its vectors. The worker micro-batches concurrent requests into shared forward passes.
Vectors travel as float32 bytes; `encoding_format: base64` is those bytes as they are (what
OpenAI sends), `float` a JSON list. Rerank embeds the query with the documents in one request
and scores each document by cosine similarity (the vectors are normalised).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import BadRequest
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate.schemas import decode, keep_alive_param
from mlx_gw.worker.protocol import Embed, Embeddings

routes = web.RouteTableDef()
_json = msgspec.json.Encoder()
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    keep_alive: str | int | float | None = None
    truncate: bool | str = False  # also Cohere's "NONE" / "END"


class RerankRequest(msgspec.Struct, kw_only=True):
    model: str
    query: str
    documents: list[Any]
    top_n: int | None = None
    return_documents: bool = True
    keep_alive: str | int | float | None = None
    truncate: bool | str = False


def _truncate(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if value.upper() in ("END", "RIGHT"):
        return True
    if value.upper() == "NONE":
        return False
    raise BadRequest('truncate must be true, false, "END" or "NONE" (cutting the start of an '
                     "input is not supported)", param="truncate")


def _embed_message(value: str | list[Any]) -> Embed:
    """The `input` field as an Embed: a string, strings, a token array, or token arrays."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise BadRequest("'input' must not be empty", param="input")
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"at most {MAX_INPUTS} inputs per request, got {len(value)}",
                         param="input")
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            raise BadRequest("'input' must not contain empty strings", param="input")
        return Embed(rid=0, texts=value)
    if all(_is_token(v) for v in value):
        return Embed(rid=0, token_ids=[value])
    if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
        return Embed(rid=0, token_ids=value)
    raise BadRequest("'input' must be a string, a list of strings, a list of token ids, or a "
                     "list of non-empty lists of token ids", param="input")


def _is_token(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


async def _embed(request: web.Request, model: ModelConfig, msg: Embed, keep_alive: Any
                 ) -> Embeddings:
    async with request.app[SUPERVISOR].lease(model, keep_alive_param(keep_alive)) as handle:
        result = await handle.call(msg)
    assert isinstance(result, Embeddings)
    return result


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    req = decode(await request.read(), EmbeddingRequest)
    model = request.app[SUPERVISOR].resolve(req.model, "/v1/embeddings")
    if req.encoding_format not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    if req.dimensions is not None and req.dimensions < 1:
        raise BadRequest("dimensions must be at least 1", param="dimensions")
    msg = _embed_message(req.input)
    msg.dimensions = req.dimensions
    msg.truncate = _truncate(req.truncate)
    result = await _embed(request, model, msg, req.keep_alive)
    b64 = req.encoding_format == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v).decode() if b64
             else np.frombuffer(v, dtype=np.float32).tolist()}
            for i, v in enumerate(result.data)]
    return _json_response({
        "object": "list", "data": data, "model": model.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })


def _json_response(body: dict[str, Any]) -> web.Response:
    """msgspec's encoder: several times faster than json.dumps on long lists of floats."""
    return web.Response(body=_json.encode(body), content_type="application/json")


@routes.post("/v1/rerank")
async def rerank(request: web.Request) -> web.Response:
    req = decode(await request.read(), RerankRequest)
    model = request.app[SUPERVISOR].resolve(req.model, "/v1/rerank")
    if not req.query:
        raise BadRequest("'query' must not be empty", param="query")
    if not req.documents:
        raise BadRequest("'documents' must not be empty", param="documents")
    if len(req.documents) >= MAX_INPUTS:
        raise BadRequest(f"at most {MAX_INPUTS - 1} documents per request", param="documents")
    texts = []
    for i, doc in enumerate(req.documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str) or not text:
            raise BadRequest(f"documents[{i}] must be a non-empty string or an object with a "
                             "'text' string", param="documents")
        texts.append(text)
    if req.top_n is not None and req.top_n < 1:
        raise BadRequest("top_n must be at least 1", param="top_n")
    msg = Embed(rid=0, texts=[req.query, *texts], truncate=_truncate(req.truncate))
    result = await _embed(request, model, msg, req.keep_alive)
    scores = await asyncio.to_thread(_cosines, result.data)
    order = sorted(range(len(texts)), key=lambda i: scores[i], reverse=True)[:req.top_n]
    results = []
    for i in order:
        row: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            row["document"] = {"text": texts[i]}
        results.append(row)
    return _json_response({
        "id": "rerank-" + secrets.token_hex(12), "model": model.name, "results": results,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })


def _cosines(vectors: list[bytes]) -> list[float]:
    """Each document's score against the query (the first vector): a dot product, since the
    worker's vectors are normalised. One matrix product, off the event loop."""
    m = np.stack([np.frombuffer(v, dtype=np.float32) for v in vectors])
    return (m[1:] @ m[0]).tolist()
