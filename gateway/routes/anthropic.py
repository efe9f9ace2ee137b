"""Anthropic Messages API: POST /v1/messages and POST /v1/messages/count_tokens.

Anthropic requests are translated into the same worker `Generate` as OpenAI chat (system,
multi-turn, `tool_use` / `tool_result` blocks become the chat template's messages and tool
calls); the answer's events (thought, text, tool calls, from `ChoiceParser`) come back as
Anthropic content blocks: `thinking`, `text`, `tool_use`. Streaming sends Anthropic's event
sequence (`message_start`, then per block `content_block_start`, `content_block_delta`…,
`content_block_stop`, then `message_delta` and `message_stop`). Errors are Anthropic-shaped
(the error middleware renders every /v1/messages error that way).
"""

from __future__ import annotations

import contextlib
import json
import secrets
from typing import Any

import msgspec
from aiohttp import web

from mlx_gw.gateway.errors import GatewayError, TimedOut
from mlx_gw.gateway.routes import metrics
from mlx_gw.gateway.routes.sse import EventStream
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate.anthropic import (
    CountRequest,
    MessagesRequest,
    new_tool_id,
    stop_reason,
    to_chat,
    to_generate,
)
from mlx_gw.gateway.translate.chat_stream import ChoiceParser, merged, ran_out_of_time
from mlx_gw.gateway.translate.schemas import decode, for_model, keep_alive_param
from mlx_gw.worker.protocol import Delta, Generate

routes = web.RouteTableDef()
_json = msgspec.json.Encoder()


@routes.post("/v1/messages/count_tokens")
async def count_tokens(request: web.Request) -> web.Response:
    req = decode(await request.read(), CountRequest)
    sup = request.app[SUPERVISOR]
    model = sup.resolve(req.model, "/v1/messages/count_tokens")
    messages, tools, _ = to_chat(req)
    gen = for_model(Generate(rid=0, messages=messages, tools=tools, count_only=True), model)
    async with sup.lease(model) as handle:
        async with contextlib.aclosing(handle.stream(gen)) as deltas:
            d = await anext(deltas)
    return web.json_response({"input_tokens": d.prompt_tokens})


@routes.post("/v1/messages")
async def messages(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), MessagesRequest)
    sup = request.app[SUPERVISOR]
    model = sup.resolve(req.model, "/v1/messages")
    gen = to_generate(req, model)
    out = _Stream(request, model.name, ChoiceParser(chat=True, tools=gen.tools,
                                                    new_id=new_tool_id))
    try:
        async with sup.lease(model, keep_alive_param(req.keep_alive),
                             heartbeat=out.ping if req.stream else None) as handle:
            async with contextlib.aclosing(merged(handle, [gen],
                                                  observe=metrics.observer())) as deltas:
                _, d = await anext(deltas)
                while True:
                    if req.stream:
                        await out.stream(d)
                    else:
                        out.collect(d)
                    if d.finish_reason is not None:
                        break
                    try:
                        _, d = await anext(deltas)
                    except TimedOut:  # logged by the handle; a whole message keeps its text
                        if req.stream:
                            raise
                        d = ran_out_of_time(out.parser.last)
                if req.stream:
                    return await out.end()
                return web.json_response(out.message())
    except GatewayError as e:
        if not out.started:
            raise
        return await out.error(e)


class _Stream(EventStream):
    """One Anthropic response: content blocks built from the choice's events, sent whole or
    as SSE events."""

    def __init__(self, request: web.Request, model: str, parser: ChoiceParser) -> None:
        super().__init__(request)
        self.model = model
        self.parser = parser
        self.id = "msg_" + secrets.token_hex(12)
        self.blocks: list[dict[str, Any]] = []
        self._open_kind: str | None = None  # the streamed block still open
        self._sent_start = False

    def _message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None]
                 ) -> dict[str, Any]:
        last = self.parser.last
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1],
                # Anthropic counts input apart from what was read from the cache.
                "usage": {"input_tokens": (last.prompt_tokens if last else 0)
                          - self.parser.cached_tokens,
                          "cache_read_input_tokens": self.parser.cached_tokens,
                          "cache_creation_input_tokens": 0,
                          "output_tokens": last.completion_tokens if last else 0}}

    # ------------------------------------------------------------------ whole message

    def collect(self, d: Delta) -> None:
        for kind, value in self.parser.feed(d):
            if kind == "call":
                self.blocks.append({"type": "tool_use", "id": value.id, "name": value.name,
                                    "input": json.loads(value.arguments)})
                continue
            block_type, field = ("thinking", "thinking") if kind == "reasoning" \
                else ("text", "text")
            if self.blocks and self.blocks[-1]["type"] == block_type:
                self.blocks[-1][field] += value
            else:
                block = {"type": block_type, field: value}
                if block_type == "thinking":
                    block["signature"] = ""
                self.blocks.append(block)

    def message(self) -> dict[str, Any]:
        return self._message(self.blocks, stop_reason(self.parser))

    # ------------------------------------------------------------------ SSE

    @staticmethod
    def _event(kind: str, body: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + _json.encode(body) + b"\n\n"

    async def ping(self) -> None:
        """Keepalive while the model loads."""
        await self.write(self._event("ping", {"type": "ping"}))

    def _start_block(self, out: list[bytes], kind: str, block: dict[str, Any]) -> None:
        self._close_block(out)
        out.append(self._event("content_block_start", {
            "type": "content_block_start", "index": len(self.blocks), "content_block": block}))
        self.blocks.append(block)
        self._open_kind = kind

    def _close_block(self, out: list[bytes]) -> None:
        if self._open_kind is None:
            return
        index = len(self.blocks) - 1
        if self._open_kind == "reasoning":
            out.append(self._delta(index, {"type": "signature_delta", "signature": ""}))
        out.append(self._event("content_block_stop", {"type": "content_block_stop",
                                                      "index": index}))
        self._open_kind = None

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return self._event("content_block_delta", {"type": "content_block_delta",
                                                   "index": index, "delta": delta})

    async def stream(self, d: Delta) -> None:
        out: list[bytes] = []
        if not self._sent_start:
            self._sent_start = True
            msg = self._message([], (None, None))
            msg["usage"] = {"input_tokens": d.prompt_tokens - d.cached_tokens, "output_tokens": 1,
                            "cache_read_input_tokens": d.cached_tokens,
                            "cache_creation_input_tokens": 0}
            out.append(self._event("message_start", {"type": "message_start",
                                                     "message": msg}))
        for kind, value in self.parser.feed(d):
            if kind == "call":
                self._start_block(out, "call", {"type": "tool_use", "id": value.id,
                                                "name": value.name, "input": {}})
                out.append(self._delta(len(self.blocks) - 1, {
                    "type": "input_json_delta", "partial_json": value.arguments}))
                self._close_block(out)
                continue
            if kind != self._open_kind:
                block = {"type": "thinking", "thinking": "", "signature": ""} \
                    if kind == "reasoning" else {"type": "text", "text": ""}
                self._start_block(out, kind, block)
            delta = {"type": "thinking_delta", "thinking": value} if kind == "reasoning" \
                else {"type": "text_delta", "text": value}
            out.append(self._delta(len(self.blocks) - 1, delta))
        if out:
            await self.write(b"".join(out))

    async def end(self) -> web.StreamResponse:
        out: list[bytes] = []
        self._close_block(out)
        stop = stop_reason(self.parser)
        last = self.parser.last
        out.append(self._event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]},
            "usage": {"output_tokens": last.completion_tokens if last else 0}}))
        out.append(self._event("message_stop", {"type": "message_stop"}))
        await self.write(b"".join(out))
        return await self.close()

    async def error(self, e: GatewayError) -> web.StreamResponse:
        return await self.fail(e, self._event("error", e.anthropic_body()), self.model)
