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
import logging
import secrets
import time
from typing import Any

import msgspec
from aiohttp import web

from gateway import metrics
from gateway.chat_stream import ChoiceParser, merged
from gateway.errors import BadRequest, GatewayError
from gateway.schemas import check_tools, decode, keep_alive_param
from gateway.state import SUPERVISOR
from worker.protocol import Delta, Generate

log = logging.getLogger("mlxgw.http")
routes = web.RouteTableDef()
_json = msgspec.json.Encoder()
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class _Base(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # accepted; thinking follows the model's template


class MessagesRequest(_Base, kw_only=True):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class CountRequest(_Base, kw_only=True):
    pass


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of content blocks", param=where)
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or \
                not isinstance(block.get("text"), str):
            raise BadRequest(f"{where}[{j}] must be a text block", param=where)
        parts.append(block["text"])
    return "".join(parts)


def to_chat(req: _Base) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """(chat messages, OpenAI-shaped tools, tool_choice) for the worker."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system, "system")})
    if not req.messages:
        raise BadRequest("messages must contain at least one message", param="messages")
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"{where}.role must be user or assistant", param=f"{where}.role")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise BadRequest(f"{where}.content must be a string or a list of blocks",
                             param=f"{where}.content")
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(blocks):
            kind = b.get("type") if isinstance(b, dict) else None
            bw = f"{where}.content[{j}]"
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
                calls.append({"id": b.get("id", ""), "type": "function", "function": {
                    "name": b["name"], "arguments": b.get("input") or {}}})
            elif kind == "tool_result" and role == "user":
                result = b.get("content", "")
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id", ""),
                            "content": _text(result, f"{bw}.content")})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # earlier thoughts are not replayed to the model
            else:
                raise BadRequest(f"{bw} has type {kind!r}, which is not supported here",
                                 param=bw)
        if text or calls or not out or out[-1]["role"] != "tool":
            msg: dict[str, Any] = {"role": role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    tools = [{"type": "function", "function": {
        "name": t.get("name"), "description": t.get("description", ""),
        "parameters": t.get("input_schema") or {"type": "object"}}}
        for t in req.tools or [] if isinstance(t, dict)]
    choice: str | dict[str, Any] = "auto"
    if req.tool_choice is not None:
        kind = req.tool_choice.get("type")
        if kind == "tool":
            choice = {"type": "function", "function": {"name": req.tool_choice.get("name")}}
        elif kind in TOOL_CHOICES:
            choice = TOOL_CHOICES[kind]
        else:
            raise BadRequest('tool_choice.type must be auto, any, tool or none',
                             param="tool_choice")
    checked, worker_choice = check_tools(tools or None, choice)
    return out, checked, worker_choice


def _generate(req: MessagesRequest, model: Any) -> Generate:
    if req.max_tokens < 1:
        raise BadRequest("max_tokens must be at least 1", param="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 1.0:
        raise BadRequest("temperature must be between 0 and 1", param="temperature")
    messages, tools, choice = to_chat(req)
    return Generate(
        rid=0, messages=messages, max_tokens=req.max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p or 1.0, top_k=req.top_k or 0, stop=list(req.stop_sequences or []),
        tools=tools, tool_choice=choice, tool_parser=model.tool_parser,
        reasoning_parser=list(model.reasoning_parser)
        if isinstance(model.reasoning_parser, tuple) else model.reasoning_parser,
    )


def _stop_reason(p: ChoiceParser) -> tuple[str | None, str | None]:
    last = p.last
    if last is None or last.finish_reason is None:
        return None, None
    if p.calls:
        return "tool_use", None
    if last.finish_reason == "length":
        return "max_tokens", None
    if last.stop_sequence:
        return "stop_sequence", last.stop_sequence
    return "end_turn", None


def _new_tool_id() -> str:
    return "toolu_" + secrets.token_hex(12)


@routes.post("/v1/messages/count_tokens")
async def count_tokens(request: web.Request) -> web.Response:
    req = decode(await request.read(), CountRequest)
    sup = request.app[SUPERVISOR]
    model = sup.resolve(req.model)
    messages, tools, _ = to_chat(req)
    gen = Generate(rid=0, messages=messages, tools=tools, count_only=True,
                   tool_parser=model.tool_parser)
    async with sup.lease(req.model) as handle:
        deadline = time.monotonic() + sup.config.gateway.request_timeout
        async with contextlib.aclosing(handle.stream(gen, deadline=deadline)) as deltas:
            d = await anext(deltas)
    return web.json_response({"input_tokens": d.prompt_tokens})


@routes.post("/v1/messages")
async def messages(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), MessagesRequest)
    sup = request.app[SUPERVISOR]
    model = sup.resolve(req.model)
    gen = _generate(req, model)
    timer = metrics.current()
    if timer is not None:
        timer.model = model.name
    out = _Stream(request, model.name, ChoiceParser(chat=True, tools=gen.tools,
                                                    new_id=_new_tool_id))
    try:
        async with sup.lease(req.model, keep_alive_param(req.keep_alive),
                             heartbeat=out.ping if req.stream else None) as handle:
            deadline = time.monotonic() + sup.config.gateway.request_timeout
            observe = timer.delta if timer is not None else None
            async with contextlib.aclosing(merged(handle, [gen], deadline=deadline,
                                                  observe=observe)) as deltas:
                _, d = await anext(deltas)
                while True:
                    if req.stream:
                        await out.stream(d)
                    else:
                        out.collect(d)
                    if d.finish_reason is not None:
                        break
                    _, d = await anext(deltas)
                if req.stream:
                    return await out.end()
                return web.json_response(out.message())
    except GatewayError as e:
        if not out.started:
            raise
        return await out.fail(e)


class _Stream:
    """One Anthropic response: content blocks built from the choice's events, sent whole or
    as SSE events."""

    def __init__(self, request: web.Request, model: str, parser: ChoiceParser) -> None:
        self.request = request
        self.model = model
        self.parser = parser
        self.id = "msg_" + secrets.token_hex(12)
        self.blocks: list[dict[str, Any]] = []
        self.resp: web.StreamResponse | None = None
        self._open_kind: str | None = None  # the streamed block still open
        self._sent_start = False

    @property
    def started(self) -> bool:
        return self.resp is not None

    def _message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None]
                 ) -> dict[str, Any]:
        last = self.parser.last
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1],
                "usage": {"input_tokens": last.prompt_tokens if last else 0,
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
        return self._message(self.blocks, _stop_reason(self.parser))

    # ------------------------------------------------------------------ SSE

    async def _open(self) -> web.StreamResponse:
        if self.resp is None:
            self.resp = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"})
            await self.resp.prepare(self.request)
        return self.resp

    @staticmethod
    def _event(kind: str, body: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + _json.encode(body) + b"\n\n"

    async def ping(self) -> None:
        """Keepalive while the model loads."""
        resp = await self._open()
        await resp.write(self._event("ping", {"type": "ping"}))

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
        resp = await self._open()
        out: list[bytes] = []
        if not self._sent_start:
            self._sent_start = True
            msg = self._message([], (None, None))
            msg["usage"] = {"input_tokens": d.prompt_tokens, "output_tokens": 1}
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
            await resp.write(b"".join(out))

    async def end(self) -> web.StreamResponse:
        resp = await self._open()
        out: list[bytes] = []
        self._close_block(out)
        stop = _stop_reason(self.parser)
        last = self.parser.last
        out.append(self._event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]},
            "usage": {"output_tokens": last.completion_tokens if last else 0}}))
        out.append(self._event("message_stop", {"type": "message_stop"}))
        await resp.write(b"".join(out))
        await resp.write_eof()
        return resp

    async def fail(self, e: GatewayError) -> web.StreamResponse:
        log.warning("stream for %s failed: %s", self.model, e.message)
        timer = metrics.current()
        if timer is not None:
            timer.failed(e.status)
        resp = await self._open()
        await resp.write(self._event("error", e.anthropic_body()))
        await resp.write_eof()
        return resp
