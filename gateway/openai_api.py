"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Handlers are thin: decode and validate the body, lease the model's worker from the supervisor,
stream the request's deltas back as one JSON body or as SSE. The first delta is awaited before
any response byte is sent, so admission errors (unknown model, over-long prompt, failed load)
still get their proper HTTP status; errors after that end the stream with an error event.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from gateway import metrics, vision
from gateway.chat_stream import merged
from gateway.errors import GatewayError
from gateway.openai_shape import Shaper as _Shaper
from gateway.schemas import (
    ChatRequest,
    CompletionRequest,
    completion_to_generate,
    decode,
    fan_out,
    keep_alive_param,
)
from gateway.state import SUPERVISOR
from worker.protocol import Delta, Generate

log = logging.getLogger("mlxgw.http")
routes = web.RouteTableDef()
_json = msgspec.json.Encoder()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    config = request.app[SUPERVISOR].config
    data = []
    for m in config.models.values():
        for name in (m.name, *m.aliases):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "mlx-gw",
                         "root": m.name, "type": m.type})
    return web.json_response({"object": "list", "data": data})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), ChatRequest)
    # vision.chat_generate: image parts for vlm models, 400 for kinds that do not chat
    return await _complete(request, req, await vision.chat_generate(request, req), chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), CompletionRequest)
    return await _complete(request, req, completion_to_generate(req), chat=False)


PROBE_HEADER = "X-MLX-GW-Probe"
# LiteLLM's background health check sends this prompt (its DEFAULT_HEALTH_CHECK_PROMPT).
LITELLM_HEALTH_PROMPT = "test from litellm"


def is_probe(request: web.Request, req: ChatRequest | CompletionRequest) -> bool:
    """A health probe: answered by a loaded model, or without loading one."""
    if request.headers.get(PROBE_HEADER, "").lower() in ("1", "true", "yes"):
        return True
    msgs = getattr(req, "messages", None)
    return (isinstance(msgs, list) and len(msgs) == 1 and msgs[0].get("role") == "user"
            and msgs[0].get("content") == LITELLM_HEALTH_PROMPT)


async def _complete(
    request: web.Request, req: ChatRequest | CompletionRequest, gen: Generate, *, chat: bool
) -> web.StreamResponse:
    sup = request.app[SUPERVISOR]
    model = sup.resolve(req.model)
    timer = metrics.current()
    if timer is not None:
        timer.model = model.name
    gen.tool_parser = model.tool_parser
    gen.reasoning_parser = list(model.reasoning_parser) \
        if isinstance(model.reasoning_parser, tuple) else model.reasoning_parser
    out = _Shaper(model.name, chat, tools=gen.tools, n=req.n)
    probe = is_probe(request, req)
    if probe and not sup.is_ready(model.name):
        return await _probe_answer(request, req, out)
    sse = _SSE(request, out) if req.stream else None
    try:
        async with sup.lease(req.model, keep_alive_param(req.keep_alive),
                             heartbeat=sse.loading if sse else None, touch=not probe) as handle:
            deadline = time.monotonic() + sup.config.gateway.request_timeout
            observe = timer.delta if timer is not None else None
            async with contextlib.aclosing(merged(handle, fan_out(gen, req.n),
                                                  deadline=deadline,
                                                  observe=observe)) as deltas:
                first = await anext(deltas)
                if sse is not None:
                    include_usage = bool(req.stream_options and
                                         req.stream_options.include_usage)
                    return await sse.relay(first, deltas, include_usage)
                out.add(*first)
                while not out.done:
                    out.add(*await anext(deltas))
                return web.json_response(out.full())
    except GatewayError as e:
        if sse is None or not sse.started:
            raise
        return await sse.fail(e)  # headers are gone: the error travels as an event


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


class _SSE:
    """One SSE response, opened lazily: by the first keepalive while the model loads, or by
    the first delta."""

    def __init__(self, request: web.Request, out: _Shaper) -> None:
        self.request = request
        self.out = out
        self.headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no"}
        self.resp: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.resp is not None

    async def _open(self) -> web.StreamResponse:
        if self.resp is None:
            self.resp = web.StreamResponse(headers=self.headers)
            await self.resp.prepare(self.request)
        return self.resp

    async def loading(self) -> None:
        """Keepalive comment while the request waits for its model (LiteLLM and proxies
        would otherwise time out or put the deployment on cooldown)."""
        resp = await self._open()
        await resp.write(f": loading model {self.out.model}\n\n".encode())

    async def relay(
        self, first: tuple[int, Delta], deltas: AsyncIterator[tuple[int, Delta]],
        include_usage: bool
    ) -> web.StreamResponse:
        resp = await self._open()
        out = self.out
        item = first
        try:
            if out.chat:
                await resp.write(out.start_chunks())
            while True:
                chunk = out.chunks(*item)
                if chunk:
                    await resp.write(chunk)
                if out.done:
                    break
                item = await anext(deltas)
            if include_usage:
                await resp.write(out.usage_chunk())
            await resp.write(b"data: [DONE]\n\n")
        except GatewayError as e:
            return await self.fail(e)
        await resp.write_eof()
        return resp

    async def fail(self, e: GatewayError) -> web.StreamResponse:
        log.warning("stream for %s failed: %s", self.out.model, e.message)
        timer = metrics.current()
        if timer is not None:
            timer.failed(e.status)
        resp = await self._open()
        await resp.write(b"data: " + _json.encode(e.openai_body()) + b"\n\n")
        await resp.write_eof()
        return resp
