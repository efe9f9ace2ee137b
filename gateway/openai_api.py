"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Handlers are thin: decode and validate the body, lease the model's worker from the supervisor,
stream the request's deltas back as one JSON body or as SSE. The first delta is awaited before
any response byte is sent, so admission errors (unknown model, over-long prompt, failed load)
still get their proper HTTP status; errors after that end the stream with an error event.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from gateway.errors import GatewayError
from gateway.schemas import (
    ChatRequest,
    CompletionRequest,
    chat_to_generate,
    completion_to_generate,
    decode,
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
    return await _complete(request, req, chat_to_generate(req), chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), CompletionRequest)
    return await _complete(request, req, completion_to_generate(req), chat=False)


async def _complete(
    request: web.Request, req: ChatRequest | CompletionRequest, gen: Generate, *, chat: bool
) -> web.StreamResponse:
    sup = request.app[SUPERVISOR]
    model = sup.resolve(req.model)
    async with sup.lease(req.model, keep_alive_param(req.keep_alive)) as handle:
        deadline = time.monotonic() + sup.config.gateway.request_timeout
        async with contextlib.aclosing(handle.stream(gen, deadline=deadline)) as deltas:
            first = await anext(deltas)
            out = _Shaper(model.name, chat)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return await _sse(request, out, first, deltas, include_usage)
            text = [first.text]
            last = first
            while last.finish_reason is None:
                last = await anext(deltas)
                text.append(last.text)
            return web.json_response(out.full("".join(text), last))


class _Shaper:
    """Builds OpenAI response objects for one request."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(d: Delta) -> dict[str, int]:
        return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                "total_tokens": d.prompt_tokens + d.completion_tokens}

    def full(self, text: str, last: Delta) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": last.finish_reason}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": last.finish_reason}
            body = self._base("text_completion")
        body["choices"] = [choice]
        body["usage"] = self.usage(last)
        return body

    def chunk(self, text: str | None, finish: str | None, *, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = self._base("text_completion")
        body["choices"] = [choice]
        return b"data: " + _json.encode(body) + b"\n\n"

    def usage_chunk(self, last: Delta) -> bytes:
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = self.usage(last)
        return b"data: " + _json.encode(body) + b"\n\n"


async def _sse(
    request: web.Request,
    out: _Shaper,
    first: Delta,
    deltas: AsyncIterator[Delta],
    include_usage: bool,
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    d = first
    try:
        if out.chat:
            await resp.write(out.chunk("", None, role=True))
        while True:
            if d.text:
                await resp.write(out.chunk(d.text, None))
            if d.finish_reason is not None:
                await resp.write(out.chunk(None if out.chat else "", d.finish_reason))
                break
            d = await anext(deltas)
        if include_usage:
            await resp.write(out.usage_chunk(d))
        await resp.write(b"data: [DONE]\n\n")
    except GatewayError as e:  # headers are gone: the error travels as an event
        log.warning("stream for %s failed: %s", out.model, e.message)
        await resp.write(b"data: " + _json.encode(e.openai_body()) + b"\n\n")
    await resp.write_eof()
    return resp
