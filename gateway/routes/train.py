"""Fine-tuning routes: POST/GET /api/train, GET/DELETE /api/train/{id}, its events, /api/fuse.

`POST /api/train` checks the request (base, name, every row) and answers the queued job at
once; the job runs in its own worker (supervision/training.py). `GET /api/train/{id}/events`
(or `GET /api/train/{id}?follow=1` / `?stream=true`) streams the job's events as SSE: first
those it has had (after `Last-Event-ID` or `?after=`), then each new one, ending with its
last (done, failed or cancelled). `POST /api/fuse` blocks until the merged model is written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from mlx_gw.gateway.routes.events import after_id, event_frame
from mlx_gw.gateway.routes.sse import EventStream
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.supervision.training import Trainings
from mlx_gw.gateway.supervision.training_data import FuseRequest, TrainRequest
from mlx_gw.gateway.translate.schemas import decode

TRAININGS: web.AppKey[Trainings] = web.AppKey("trainings", Trainings)
routes = web.RouteTableDef()
_FOLLOW = ("1", "true", "yes")


@routes.post("/api/train")
async def create_job(request: web.Request) -> web.Response:
    spec = decode(await request.read(), TrainRequest)
    job = await request.app[TRAININGS].submit(spec)
    return web.json_response(job.public())


@routes.get("/api/train")
async def list_jobs(request: web.Request) -> web.Response:
    jobs = request.app[TRAININGS].jobs.values()
    return web.json_response({"jobs": [j.public() for j in jobs]})


async def _stream(request: web.Request) -> web.StreamResponse:
    trainings = request.app[TRAININGS]
    events: AsyncIterator = trainings.follow(request.match_info["id"], after_id(request))
    out = EventStream(request)
    await out.comment(f"mlx-gw training job {request.match_info['id']}")
    async for e in events:
        if e is None:
            await out.comment("keepalive")
        else:
            await out.write(event_frame(e))
    return await out.close()


@routes.get("/api/train/{id}")
async def get_job(request: web.Request) -> web.StreamResponse:
    job = request.app[TRAININGS].get(request.match_info["id"])
    if (request.query.get("follow", "").lower() in _FOLLOW
            or request.query.get("stream", "").lower() in _FOLLOW):
        return await _stream(request)
    return web.json_response(job.public())


@routes.get("/api/train/{id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    request.app[TRAININGS].get(request.match_info["id"])  # a 404 before the stream opens
    return await _stream(request)


@routes.delete("/api/train/{id}")
async def cancel_job(request: web.Request) -> web.Response:
    job = await request.app[TRAININGS].cancel(request.match_info["id"])
    return web.json_response(job.public())


@routes.post("/api/fuse")
async def fuse(request: web.Request) -> web.Response:
    spec = decode(await request.read(), FuseRequest)
    return web.json_response(await request.app[TRAININGS].fuse(spec))


def install(app: web.Application) -> Trainings:
    """The app's Trainings; adapters earlier jobs left are served again from start-up."""
    trainings = Trainings(app[SUPERVISOR])
    app[TRAININGS] = trainings
    trainings.restore()

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await trainings.close()

    app.cleanup_ctx.append(ctx)
    app.add_routes(routes)
    return trainings
