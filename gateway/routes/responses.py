"""OpenAI Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request is translated into the same worker `Generate` as a chat request
(translate/responses), its deltas parsed by `ChoiceParser` and shaped into output items and
semantic events (translate/responses_stream). A streamed response opens with
`response.created` as soon as the model's worker is leased (or while it loads), and from then
on always ends with a terminal event: `response.completed`, `response.incomplete`, or
`response.failed` carrying the error's code (`context_length_exceeded` for an over-long
input), never a bare close. Errors before that (bad input, unknown model, queue full) are
plain OpenAI-shaped HTTP errors. With `store` (the default) the finished response is kept in
the bounded in-memory store (routes/response_store) for GET, DELETE and
`previous_response_id`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec
from aiohttp import web

from mlx_gw.gateway.errors import GatewayError, InternalError
from mlx_gw.gateway.routes import metrics
from mlx_gw.gateway.routes.response_store import RESPONSE_STORE, ResponseStore, Stored
from mlx_gw.gateway.routes.sse import EventStream
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate.chat_stream import ChoiceParser, merged
from mlx_gw.gateway.translate.responses import ResponsesRequest, to_generate
from mlx_gw.gateway.translate.responses_stream import Event, ResponseBuilder
from mlx_gw.gateway.translate.schemas import decode, for_model, keep_alive_param

log = logging.getLogger("mlxgw.http")
routes = web.RouteTableDef()
_json = msgspec.json.Encoder()


@routes.post("/v1/responses")
async def create(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), ResponsesRequest)
    sup = request.app[SUPERVISOR]
    store = request.app[RESPONSE_STORE]
    model = sup.resolve(req.model, "/v1/responses")
    history = store.history(req.previous_response_id) if req.previous_response_id else []
    gen, turn = to_generate(req, history)
    for_model(gen, model)
    out = ResponseBuilder(req, model.name, ChoiceParser(chat=True, tools=gen.tools))
    sse = _SSE(request, out) if req.stream else None
    try:
        async with sup.lease(model, keep_alive_param(req.keep_alive),
                             heartbeat=sse.waiting if sse else None) as handle:
            if sse is not None:
                await sse.start()
            async with contextlib.aclosing(merged(handle, [gen],
                                                  observe=metrics.observer())) as deltas:
                async for _, d in deltas:
                    events = out.feed(d)
                    if sse is not None:
                        await sse.send(events)
    except GatewayError as e:
        if sse is None or not sse.started:
            raise
        return await _failed(req, store, turn, sse, e)
    except ConnectionResetError:  # the client went away: the lease's exit cancelled it
        raise
    except Exception:
        if sse is None or not sse.started:
            raise
        log.exception("response stream %s failed", out.id)
        return await _failed(req, store, turn, sse,
                             InternalError("Internal error; see the gateway log"))
    _keep(req, store, turn, out)
    if sse is not None:
        return await sse.close()
    return web.json_response(out.response())


def _keep(req: ResponsesRequest, store: ResponseStore, turn: list[dict[str, Any]],
          out: ResponseBuilder) -> None:
    if req.store:
        store.put(Stored(out.response(), req.previous_response_id,
                         turn + out.output_messages()))


async def _failed(req: ResponsesRequest, store: ResponseStore, turn: list[dict[str, Any]],
                  sse: _SSE, e: GatewayError) -> web.StreamResponse:
    event = sse.out.failed(e.code or "server_error", e.message)
    _keep(req, store, turn, sse.out)
    return await sse.fail(e, _encode([event]), sse.out.id)


@routes.get("/v1/responses/{id}")
async def retrieve(request: web.Request) -> web.Response:
    return web.json_response(request.app[RESPONSE_STORE].get(request.match_info["id"]))


@routes.delete("/v1/responses/{id}")
async def delete(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    request.app[RESPONSE_STORE].delete(rid)
    return web.json_response({"id": rid, "object": "response", "deleted": True})


def _encode(events: list[Event]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + _json.encode(e) + b"\n\n"
                    for e in events)


class _SSE(EventStream):
    """The response's event stream: opened by `start` (or by the first keepalive while the
    model loads), which sends response.created and response.in_progress once."""

    def __init__(self, request: web.Request, out: ResponseBuilder) -> None:
        super().__init__(request)
        self.out = out

    async def start(self) -> None:
        if not self.started:
            await self.write(_encode(self.out.start()))

    async def waiting(self) -> None:
        """Keepalive while the request waits for its model: the response exists from the
        first one on, so a failed load ends it with response.failed."""
        if self.started:
            await self.comment(f"loading model {self.out.model}")
        else:
            await self.start()

    async def send(self, events: list[Event]) -> None:
        if events:
            await self.write(_encode(events))
