"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Handlers are thin: decode and validate the body, lease the model's worker from the supervisor,
stream the request's deltas back as one JSON body or as SSE. The first delta is awaited before
any response byte is sent, so admission errors (unknown model, over-long prompt, failed load)
still get their proper HTTP status; errors after that end the stream with an error event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.auth import allows_name
from mlx_gw.gateway.errors import GatewayError, TimedOut
from mlx_gw.gateway.routes import metrics, vision
from mlx_gw.gateway.routes.sse import EventStream
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate.chat_stream import merged
from mlx_gw.gateway.translate.openai_shape import Shaper as _Shaper
from mlx_gw.gateway.translate.schemas import (
    ChatRequest,
    CompletionRequest,
    completion_to_generate,
    decode,
    fan_out,
    for_model,
    keep_alive_param,
)
from mlx_gw.worker.protocol import Delta, Generate

routes = web.RouteTableDef()
_json = msgspec.json.Encoder()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    adapters = sup.adapters.listing(sup)  # LoRA adapters: served by their base ("root")
    data = []
    for m in sup.config.models.values():
        for name in (m.name, *m.aliases, *(a["name"] for a in adapters if a["base"] == m.name)):
            if not allows_name(name, m):  # list what the request's key may use
                continue
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "mlx-gw",
                         "root": m.name, "type": m.type})
    return web.json_response({"object": "list", "data": data})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), ChatRequest)
    model = request.app[SUPERVISOR].resolve(req.model, "/v1/chat/completions")
    gen = await vision.chat_generate(request, req, model)  # image parts for a vlm model
    return await _complete(request, req, model, gen, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), CompletionRequest)
    model = request.app[SUPERVISOR].resolve(req.model, "/v1/completions")
    return await _complete(request, req, model, completion_to_generate(req), chat=False)


# A probe loads nothing and touches no expiry. `X-MLX-GW-Probe: resident` (what
# docs/scale-out.md has LiteLLM's health checks send) answers 412 for a model that is not
# resident here, as `/ready?model=` does, so health-check routing keeps a model's requests on
# the gateways that hold it; other values answer a not-loaded model with an empty completion.
PROBE_HEADER = "X-MLX-GW-Probe"
# LiteLLM's background health check sends this prompt (its DEFAULT_HEALTH_CHECK_PROMPT).
LITELLM_HEALTH_PROMPT = "test from litellm"


def not_resident(name: str) -> GatewayError:
    """The resident probe's answer for a model not loaded here: 412 (its precondition failed),
    which fails LiteLLM's health check (the deployment leaves the pool) without the cooldown
    that 429/5xx would also put on it: a standby must stay usable for failover."""
    err = GatewayError(f"The model '{name}' is not resident on this gateway",
                       code="model_not_resident")
    err.status, err.type = 412, "invalid_request_error"
    return err


def is_probe(request: web.Request, req: ChatRequest | CompletionRequest) -> bool:
    """A health probe: answered by a loaded model, or without loading one."""
    if request.headers.get(PROBE_HEADER, "").lower() in ("1", "true", "yes", "resident"):
        return True
    msgs = getattr(req, "messages", None)
    return (isinstance(msgs, list) and len(msgs) == 1 and msgs[0].get("role") == "user"
            and msgs[0].get("content") == LITELLM_HEALTH_PROMPT)


async def _complete(
    request: web.Request, req: ChatRequest | CompletionRequest, model: ModelConfig,
    gen: Generate, *, chat: bool
) -> web.StreamResponse:
    sup = request.app[SUPERVISOR]
    for_model(gen, model, default_max_tokens=sup.config.effective_max_tokens(model))
    out = _Shaper(model.name, chat, tools=gen.tools, n=req.n)
    probe = is_probe(request, req)
    if probe and not sup.is_ready(model):
        if request.headers.get(PROBE_HEADER, "").lower() == "resident":  # a router's health check
            raise not_resident(model.name)
        return await _probe_answer(request, req, out)
    sse = _SSE(request, out) if req.stream else None
    try:
        async with sup.lease(model, keep_alive_param(req.keep_alive),
                             heartbeat=sse.loading if sse else None, touch=not probe) as handle:
            async with contextlib.aclosing(merged(handle, fan_out(gen, req.n),
                                                  observe=metrics.observer())) as deltas:
                first = await anext(deltas)
                if sse is not None:
                    include_usage = bool(req.stream_options and
                                         req.stream_options.include_usage)
                    return await sse.relay(first, deltas, include_usage)
                out.add(*first)
                while not out.done:
                    try:
                        out.add(*await anext(deltas))
                    except TimedOut:  # logged by the handle; the text so far is the answer
                        out.cut()
                return web.json_response(out.full())
    except GatewayError as e:
        if sse is None or not sse.started:
            raise
        return await sse.error(e)  # headers are gone: the error travels as an event


async def _probe_answer(
    request: web.Request, req: ChatRequest | CompletionRequest, out: _Shaper
) -> web.StreamResponse:
    """A probe for a model that is not loaded: answer at once, load nothing."""
    headers = {PROBE_HEADER: "not-loaded"}
    out = _Shaper(out.model, out.chat)
    empty = (0, Delta(rid=0, finish_reason="stop"))
    if not req.stream:
        out.add(*empty)
        return web.json_response(out.full(), headers=headers)
    sse = _SSE(request, out)
    sse.headers.update(headers)
    return await sse.relay(empty, _no_more(), include_usage=True)


async def _no_more() -> AsyncIterator[tuple[int, Delta]]:
    return
    yield


class _SSE(EventStream):
    """The chat/completions stream: opened by the first keepalive while the model loads, or
    by the first delta."""

    def __init__(self, request: web.Request, out: _Shaper) -> None:
        super().__init__(request)
        self.out = out

    async def loading(self) -> None:
        """Keepalive comment while the request waits for its model (LiteLLM and proxies
        would otherwise time out or put the deployment on cooldown)."""
        await self.comment(f"loading model {self.out.model}")

    async def relay(
        self, first: tuple[int, Delta], deltas: AsyncIterator[tuple[int, Delta]],
        include_usage: bool
    ) -> web.StreamResponse:
        out = self.out
        item = first
        try:
            if out.chat:
                await self.write(out.start_chunks())
            while True:
                chunk = out.chunks(*item)
                if chunk:
                    await self.write(chunk)
                if out.done:
                    break
                item = await anext(deltas)
            if include_usage:
                await self.write(out.usage_chunk())
            await self.write(b"data: [DONE]\n\n")
        except GatewayError as e:
            return await self.error(e)
        return await self.close()

    async def error(self, e: GatewayError) -> web.StreamResponse:
        return await self.fail(e, b"data: " + _json.encode(e.openai_body()) + b"\n\n",
                               self.out.model)
