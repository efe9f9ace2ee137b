"""`GET /openapi.json`: the gateway's HTTP surface as an OpenAPI 3.1 document.

Request bodies come from the very msgspec structs the handlers decode with
(`msgspec.json.schema_components`), so the contract cannot drift from validation. Responses are
declared only where a small hand schema says nothing the handler does not guarantee: errors in
each family's shape, and the simple JSON bodies. `OPERATIONS` is keyed by (method, path) as the
router spells them; `undocumented(router)` lists routes without an entry (tests fail on any).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from mlx_gw.gateway.routes.adapters import AdapterRequest
from mlx_gw.gateway.routes.admin import ModelRequest, PinRequest
from mlx_gw.gateway.routes.audio import FORMATS, SpeechRequest
from mlx_gw.gateway.routes.embeddings import EmbeddingRequest, RerankRequest
from mlx_gw.gateway.routes.models import PullRequest
from mlx_gw.gateway.supervision.training_data import FuseRequest, TrainRequest
from mlx_gw.gateway.translate.anthropic import CountRequest, MessagesRequest
from mlx_gw.gateway.translate.audio_codec import CONTENT_TYPES
from mlx_gw.gateway.translate.ollama import (
    ChatBody,
    CopyBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
)
from mlx_gw.gateway.translate.ollama import ModelBody as OllamaModelBody
from mlx_gw.gateway.translate.responses import ResponsesRequest
from mlx_gw.gateway.translate.schemas import ChatRequest, CompletionRequest

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{name}"
JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"

_OBJ: dict[str, Any] = {"type": "object"}
_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}

# Error bodies, as errors.GatewayError renders them (app.error_middleware picks the shape).
ERRORS: dict[str, dict[str, Any]] = {
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": _STR, "type": _STR, "code": {"type": ["string", "null"]},
            "param": {"type": ["string", "null"]}}}}},
    "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": _STR, "message": _STR}}}},
    "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": _STR}},
}


def _list_of(key: str, item: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "items": item or _OBJ}}}


@dataclass(frozen=True)
class Op:
    """One operation: what the handler decodes and what it may answer."""

    summary: str
    tag: str
    body: Any = None  # the msgspec struct the handler decodes, or a list of them (anyOf)
    form: dict[str, Any] | None = None  # a multipart/form-data body (no struct decodes it)
    query: tuple[tuple[str, dict[str, Any], bool], ...] = ()  # (name, schema, required)
    ok: dict[str, Any] | None = None  # the 200 JSON body, where a small schema is honest
    ok_types: tuple[str, ...] = (JSON,)
    errors: str = "OpenAIError"
    extra_errors: tuple[str, ...] = field(default=())


_KEEP = {"type": ["string", "integer", "number", "null"]}
_TRANSCRIBE_FORM = {"type": "object", "required": ["file", "model"], "properties": {
    "file": {"type": "string", "format": "binary"}, "model": _STR, "language": _STR,
    "prompt": _STR, "response_format": {"enum": list(FORMATS)},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "timestamp_granularities[]": {"type": "array", "items": {"enum": ["word", "segment"]}},
    "keep_alive": _STR}}
_MODEL_LIST = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object"],
        "properties": {"id": _STR, "object": {"const": "model"}}}}}}
_EMBEDDINGS = {"type": "object", "required": ["object", "data", "model"], "properties": {
    "object": {"const": "list"}, "model": _STR, "data": {"type": "array", "items": {
        "type": "object", "required": ["index", "embedding"],
        "properties": {"index": _INT,
                       "embedding": {"type": ["array", "string"]}}}}}}
_RERANK = _list_of("results", {"type": "object", "required": ["index", "relevance_score"],
                               "properties": {"index": _INT,
                                              "relevance_score": {"type": "number"}}})
_JOB = {"type": "object", "required": ["id", "status", "iteration", "iters"], "properties": {
    "id": _STR, "status": {"enum": ["queued", "running", "completed", "failed", "cancelled"]},
    "phase": _STR, "iteration": _INT, "iters": _INT}}
_FLAG = {"enum": ["0", "1", "true", "false", "yes"]}
_CHAT_STREAMED = (JSON, SSE)
_OLLAMA_STREAMED = (JSON, NDJSON)
_AUDIO = tuple(sorted(set(CONTENT_TYPES.values())))

OPERATIONS: dict[tuple[str, str], Op] = {
    # OpenAI
    ("GET", "/v1/models"): Op("Models and aliases this gateway serves", "openai",
                              ok=_MODEL_LIST),
    ("POST", "/v1/chat/completions"): Op("Chat completion (SSE with stream: true)", "openai",
                                         ChatRequest, ok_types=_CHAT_STREAMED),
    ("POST", "/v1/completions"): Op("Text completion (SSE with stream: true)", "openai",
                                    CompletionRequest, ok_types=_CHAT_STREAMED),
    ("POST", "/v1/embeddings"): Op("Embeddings", "openai", EmbeddingRequest, ok=_EMBEDDINGS),
    ("POST", "/v1/rerank"): Op("Rerank documents against a query", "openai", RerankRequest,
                               ok=_RERANK),
    ("POST", "/v1/audio/speech"): Op("Text to speech", "openai", SpeechRequest,
                                     ok_types=_AUDIO),
    ("POST", "/v1/audio/transcriptions"): Op("Speech to text", "openai", form=_TRANSCRIBE_FORM,
                                             ok_types=(JSON, "text/plain")),
    ("POST", "/v1/audio/translations"): Op("Speech to English text", "openai",
                                           form=_TRANSCRIBE_FORM,
                                           ok_types=(JSON, "text/plain")),
    ("POST", "/v1/responses"): Op("OpenAI Responses API (SSE with stream: true)", "openai",
                                  ResponsesRequest, ok_types=_CHAT_STREAMED),
    ("GET", "/v1/responses/{id}"): Op("A stored response", "openai"),
    ("DELETE", "/v1/responses/{id}"): Op("Delete a stored response", "openai"),
    # Anthropic
    ("POST", "/v1/messages"): Op("Anthropic Messages (SSE with stream: true)", "anthropic",
                                 MessagesRequest, ok_types=_CHAT_STREAMED,
                                 errors="AnthropicError"),
    ("POST", "/v1/messages/count_tokens"): Op("Count a request's input tokens", "anthropic",
                                              CountRequest, errors="AnthropicError",
                                              ok={"type": "object",
                                                  "required": ["input_tokens"],
                                                  "properties": {"input_tokens": _INT}}),
    # Ollama
    ("GET", "/"): Op("Ollama's liveness probe", "ollama", ok_types=("text/plain",)),
    ("GET", "/api/version"): Op("Ollama API version", "ollama", errors="OllamaError",
                                ok={"type": "object", "required": ["version"],
                                    "properties": {"version": _STR}}),
    ("POST", "/api/chat"): Op("Ollama chat (NDJSON unless stream: false)", "ollama", ChatBody,
                              ok_types=_OLLAMA_STREAMED, errors="OllamaError"),
    ("POST", "/api/generate"): Op("Ollama generate (NDJSON unless stream: false)", "ollama",
                                  GenerateBody, ok_types=_OLLAMA_STREAMED,
                                  errors="OllamaError"),
    ("POST", "/api/embed"): Op("Ollama embeddings", "ollama", EmbedBody, errors="OllamaError",
                               ok=_list_of("embeddings", {"type": "array"})),
    ("POST", "/api/embeddings"): Op("Ollama's older one-vector embeddings", "ollama",
                                    EmbeddingsBody, errors="OllamaError",
                                    ok={"type": "object", "required": ["embedding"],
                                        "properties": {"embedding": {"type": "array"}}}),
    ("GET", "/api/tags"): Op("Ollama's model list", "ollama", errors="OllamaError",
                             ok=_list_of("models")),
    ("POST", "/api/show"): Op("Ollama's model details", "ollama", OllamaModelBody,
                              errors="OllamaError"),
    ("DELETE", "/api/delete"): Op("Ollama's delete of a pulled model", "ollama",
                                  OllamaModelBody, errors="OllamaError", ok_types=()),
    ("POST", "/api/copy"): Op("Ollama's copy (refused: models.yaml names models)", "ollama",
                              CopyBody, errors="OllamaError", ok_types=()),
    # Admin
    ("GET", "/health"): Op("Liveness", "admin", ok={"type": "object", "required": ["status"],
                                                    "properties": {"status": {"const": "ok"}}}),
    ("GET", "/ready"): Op("Readiness (loads nothing); with ?model=, whether it is resident",
                          "admin", query=(("model", _STR, False),),
                          ok={"type": "object", "required": ["status"],
                              "properties": {"status": _STR, "models": _INT, "model": _STR}}),
    ("GET", "/metrics"): Op("Prometheus metrics", "admin", ok_types=("text/plain",)),
    ("GET", "/openapi.json"): Op("This document", "admin", ok=_OBJ),
    ("GET", "/dashboard"): Op("The dashboard page", "admin", ok_types=("text/html",),
                              query=(("key", _STR, False),)),
    ("GET", "/dashboard/state"): Op("The dashboard's data", "admin", ok=_OBJ),
    ("GET", "/api/ps"): Op("Loaded workers", "admin", ok=_list_of("models")),
    ("POST", "/api/load"): Op("Load a model (returns once ready)", "admin", ModelRequest,
                              ok=_OBJ),
    ("POST", "/api/unload"): Op("Unload a model", "admin", ModelRequest, ok=_OBJ),
    ("POST", "/api/pin"): Op("Pin or unpin a model until restart", "admin", PinRequest,
                             ok=_OBJ),
    ("GET", "/api/queue"): Op("Requests waiting and running per model", "admin",
                              ok={"type": "object", "required": ["models"],
                                  "properties": {"models": _OBJ}}),
    ("GET", "/api/events"): Op("Lifecycle events (SSE with follow=1)", "admin",
                               query=(("after", _INT, False),
                                      ("follow", {"enum": ["0", "1", "true", "yes"]}, False)),
                               ok_types=(JSON, SSE)),
    ("GET", "/api/models"): Op("Configured and cached models", "admin", ok=_OBJ),
    ("GET", "/api/show"): Op("A model's settings and files", "admin",
                             query=(("model", _STR, True),), ok=_OBJ),
    ("POST", "/api/pull"): Op("Download a Hugging Face repo (ours: repo; Ollama's: model)",
                              "admin", [PullRequest, OllamaModelBody],
                              ok_types=(JSON, SSE, NDJSON), extra_errors=("OllamaError",)),
    ("DELETE", "/api/models/{name}"): Op("Delete a pulled model's files", "admin", ok=_OBJ),
    ("GET", "/api/adapters"): Op("LoRA adapters (configured and runtime)", "admin",
                                 ok=_list_of("adapters")),
    ("POST", "/api/adapters"): Op("Add a LoRA adapter to a base model's worker", "admin",
                                  AdapterRequest, ok=_OBJ),
    ("DELETE", "/api/adapters/{name}"): Op("Remove a runtime LoRA adapter", "admin", ok=_OBJ),
    # Fine-tuning (routes/train.py)
    ("POST", "/api/train"): Op("Start a LoRA fine-tuning job (answers the queued job)",
                               "admin", TrainRequest, ok=_JOB),
    ("GET", "/api/train"): Op("Fine-tuning jobs", "admin", ok=_list_of("jobs", _JOB)),
    ("GET", "/api/train/{id}"): Op("A fine-tuning job (SSE of its events with follow=1)",
                                   "admin", query=(("follow", _FLAG, False),
                                                   ("stream", _FLAG, False),
                                                   ("after", _INT, False)),
                                   ok=_JOB, ok_types=(JSON, SSE)),
    ("GET", "/api/train/{id}/events"): Op("A fine-tuning job's events (SSE)", "admin",
                                          query=(("after", _INT, False),), ok_types=(SSE,)),
    ("DELETE", "/api/train/{id}"): Op("Cancel a fine-tuning job", "admin", ok=_JOB),
    ("POST", "/api/fuse"): Op("Merge a LoRA adapter into its base as a new model directory",
                              "admin", FuseRequest, ok=_OBJ),
}


def route_key(route: web.AbstractRoute) -> tuple[str, str] | None:
    """(method, OpenAPI path) of a router entry; None for the HEAD twins of GET routes."""
    if route.method == "HEAD" or route.resource is None:
        return None
    info = route.resource.get_info()
    path = info.get("path") or info.get("formatter") or route.resource.canonical
    return route.method, path


def undocumented(router: web.UrlDispatcher) -> list[tuple[str, str]]:
    """Routes the app serves that OPERATIONS does not describe."""
    keys = (route_key(r) for r in router.routes())
    return sorted({k for k in keys if k is not None and k not in OPERATIONS})


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": _STR} for n in names]


def _operation(op: Op, path: str, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                           "operationId": f"{op.tag}:{path}"}
    params = _path_params(path) + [{"name": n, "in": "query", "required": req, "schema": s}
                                   for n, s, req in op.query]
    if params:
        out["parameters"] = params
    if op.body is not None:
        kinds = op.body if isinstance(op.body, list) else [op.body]
        schema = refs[kinds[0]] if len(kinds) == 1 else {"anyOf": [refs[k] for k in kinds]}
        out["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
    elif op.form is not None:
        out["requestBody"] = {"required": True,
                              "content": {"multipart/form-data": {"schema": op.form}}}
    ok: dict[str, Any] = {}
    for media in op.ok_types:
        ok[media] = {"schema": op.ok} if media == JSON and op.ok is not None else {}
    shapes = [op.errors, *op.extra_errors]
    err = {"$ref": REF.format(name=shapes[0])} if len(shapes) == 1 else \
        {"anyOf": [{"$ref": REF.format(name=s)} for s in shapes]}
    out["responses"] = {"200": {"description": "OK", "content": ok},
                        "default": {"description": "An error, in this route's shape",
                                    "content": {JSON: {"schema": err}}}}
    return out


def build_spec(version: str) -> dict[str, Any]:
    """The OpenAPI document for OPERATIONS (pure: no app state)."""
    structs: list[Any] = []
    for op in OPERATIONS.values():
        for kind in op.body if isinstance(op.body, list) else [op.body]:
            if kind is not None and kind not in structs:
                structs.append(kind)
    schemas, components = msgspec.json.schema_components(structs, ref_template=REF)
    refs = dict(zip(structs, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in OPERATIONS.items():
        paths.setdefault(path, {})[method.lower()] = _operation(op, path, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "mlx-gw", "version": version,
                 "description": "OpenAI, Anthropic, Ollama and admin APIs over local MLX "
                                "models. Send 'Authorization: Bearer <key>' when the "
                                "gateway has an api_key."},
        "paths": paths,
        "components": {"schemas": {**components, **ERRORS}},
    }


routes = web.RouteTableDef()
_spec: bytes | None = None


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    global _spec
    if _spec is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("mlx-gw")
        except PackageNotFoundError:
            ver = "0"
        _spec = msgspec.json.encode(build_spec(ver))
    return web.Response(body=_spec, content_type=JSON)
