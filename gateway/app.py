"""The aiohttp application: factory, middleware (errors, auth, CORS, drain), and `serve()`.

`build_app` wires routes to one Supervisor; the app's cleanup context stops every worker when
the app stops. `serve` runs it until SIGTERM/SIGINT, then drains: new requests get 503,
in-flight ones finish (bounded), workers stop, and it returns 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from mlx_gw.config import ENV_API_KEY, Config, ConfigError, load_config
from mlx_gw.gateway.auth import CURRENT_KEY, KeyRing, check_allowed, is_loopback
from mlx_gw.gateway.errors import (
    BadRequest,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from mlx_gw.gateway.routes import (
    adapters,
    admin,
    anthropic,
    audio,
    dashboard,
    embeddings,
    events,
    metrics,
    models,
    ollama,
    ollama_models,
    openai,
    openapi,
    response_store,
    responses,
    train,
)
from mlx_gw.gateway.state import KEYS, SUPERVISOR
from mlx_gw.gateway.supervision.blas import fast_blas_env, warn_if_none
from mlx_gw.gateway.supervision.supervisor import Supervisor

log = logging.getLogger("mlxgw.http")

DRAIN_TIMEOUT_S = 30.0
PROTECTED_PREFIXES = ("/v1", "/api", "/metrics", "/dashboard")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(request: web.Request, err: GatewayError) -> web.Response:
    if request.path.startswith("/v1/messages"):
        body = err.anthropic_body()
    elif ollama.is_ollama(request):
        body = err.ollama_body()
    else:
        body = err.openai_body()
    return web.json_response(body, status=err.status, headers=err.headers())


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as e:
        return _error_response(request, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        mapped: GatewayError
        if e.status == 404:
            mapped = NotFound(f"No route for {request.method} {request.path}", code="not_found")
        elif e.status == 405:
            mapped = MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}")
        elif e.status == 413:
            mapped = TooLarge(f"The request body is larger than the limit "
                              f"({request.app[SUPERVISOR].config.gateway.max_body_bytes} bytes)")
        else:
            mapped = BadRequest(e.reason or "bad request")
            mapped.status = e.status
        return _error_response(request, mapped)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(request, InternalError("Internal error; see the gateway log"))


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    sup = request.app[SUPERVISOR]
    gw = sup.config.gateway
    origin = request.headers.get("Origin")
    if origin and origin not in gw.cors_origins and origin != f"{request.scheme}://{request.host}":
        err = BadRequest(f"Cross-origin requests from {origin} are not allowed "
                         "(configure gateway.cors_origins)", code="cors_refused")
        err.status = 403
        raise err
    ring = request.app[KEYS]
    key = None
    if ring.keys and request.path.startswith(PROTECTED_PREFIXES):
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else \
            request.headers.get("x-api-key", "")
        if not given and request.path == "/dashboard":
            given = request.query.get("key", "")  # a browser's first visit; the page has no data
        key = ring.match(given) if given else None
        if key is None:
            raise Unauthorized("Missing or invalid API key: send 'Authorization: Bearer <key>'")
        ring.admit(key, request.path)
    if sup.draining and request.path.startswith(("/v1", "/api")):
        raise Unavailable("The gateway is shutting down", retry_after=5)
    token = CURRENT_KEY.set(key)
    try:
        resp = await handler(request)
    finally:
        CURRENT_KEY.reset(token)
    if origin and origin in gw.cors_origins:
        resp.headers["Access-Control-Allow-Origin"] = origin
    return resp


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    additions = fast_blas_env(env)
    warn_if_none(additions, env)
    env.update(additions)
    return env


def build_app(config: Config) -> web.Application:
    app = web.Application(
        client_max_size=config.gateway.max_body_bytes,
        middlewares=[metrics.metrics_middleware, error_middleware, guard_middleware],
    )
    ipc_dir = Path(tempfile.mkdtemp(prefix="mlxgw-"))
    app[SUPERVISOR] = Supervisor(config, ipc_dir=ipc_dir, worker_env=worker_env())
    app[KEYS] = KeyRing(config.gateway.keys())
    app[SUPERVISOR].resolve_observers.append(check_allowed)
    metrics.install(app)
    events.install(app)
    response_store.install(app)
    app.add_routes(openai.routes)
    app.add_routes(anthropic.routes)
    app.add_routes(responses.routes)
    app.add_routes(embeddings.routes)
    app.add_routes(audio.routes)
    app.add_routes(admin.routes)
    app.add_routes(adapters.routes)
    app.add_routes(models.routes)
    app.add_routes(dashboard.routes)
    app.add_routes(ollama.routes)
    app.add_routes(ollama_models.routes)
    app.add_routes(openapi.routes)

    async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[SUPERVISOR].start()
        yield
        await app[SUPERVISOR].shutdown()

    app.cleanup_ctx.append(supervisor_ctx)
    train.install(app)  # after the supervisor's: its jobs end before the workers stop
    return app


def reload_config(sup: Supervisor) -> bool:
    """Re-read the config file the gateway started with (SIGHUP, `mlx-gw reload`) and serve its
    models; an invalid file keeps the running config and logs why. Returns whether it applied."""
    source = sup.config.source
    if source is None:
        log.warning("[reload] nothing to re-read: the gateway runs on the embedded defaults")
        return False
    try:
        new = load_config(source)
    except ConfigError as e:
        log.error("[reload] %s is invalid; keeping the running config: %s", source, e)
        return False
    stale = [f.name for f in dataclasses.fields(new.gateway)
             if getattr(new.gateway, f.name) != getattr(sup.config.gateway, f.name)]
    added, removed, changed = sup.reload(new)
    log.info("[reload] %s: added %s; removed %s; changed %s", source, ", ".join(added) or "none",
             ", ".join(removed) or "none", ", ".join(changed) or "none")
    if stale:
        log.warning("[reload] gateway settings apply at restart: %s", ", ".join(stale))
    return True


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    ollama_port: int | None = None,
    on_listening: Callable[[str, int, int | None], None] | None = None,
) -> int:
    """Run the gateway until SIGTERM/SIGINT, then drain and stop. Returns the exit code.

    `ollama_port` (else gateway.ollama_compat_port; None = none, 0 = any free port) is a second
    listener on the same app, for clients that hard-code Ollama's port. `on_listening` gets the
    host, the bound port and the bound Ollama port (None without one)."""
    host = host or config.gateway.host
    if not is_loopback(host) and not config.gateway.keys() \
            and not config.gateway.allow_unauthenticated:
        log.error("refusing to listen on %s with no API key: anyone who can reach it could "
                  "use every model. Set gateway.api_key (or $%s), or gateway.api_keys; or set "
                  "gateway.allow_unauthenticated: true to serve the network without one",
                  host, ENV_API_KEY)
        return 1
    config = dataclasses.replace(config, gateway=dataclasses.replace(config.gateway, host=host))
    app = build_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = config.gateway.port if port is None else port
    if ollama_port is None:
        ollama_port = config.gateway.ollama_compat_port
    sites = [web.TCPSite(runner, host, port)]
    if ollama_port is not None:
        sites.append(web.TCPSite(runner, host, ollama_port))
    bound: list[int] = []
    bound_sockets: list[Any] = []
    for site, want in zip(sites, (port, ollama_port), strict=False):
        try:
            await site.start()
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", host, want, e)
            await runner.cleanup()
            return 1
        # The sites' sockets in start order: this site's are the ones not seen yet.
        mine = runner.addresses[len(bound_sockets):]
        bound_sockets.extend(mine)
        bound.append(mine[0][1] if mine else want)
    log.info("mlx-gw listening on http://%s:%d (%d models configured)", host, bound[0],
             len(config.models))
    if len(bound) > 1:
        log.info("mlx-gw also listening for Ollama clients on http://%s:%d", host, bound[1])
    if on_listening:
        on_listening(host, bound[0], bound[1] if len(bound) > 1 else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_config, app[SUPERVISOR])
    await stop.wait()
    await app[train.TRAININGS].close()  # a training job is cancelled, not waited for
    log.info("shutting down: draining in-flight requests (up to %.0fs)", DRAIN_TIMEOUT_S)
    await app[SUPERVISOR].drain(DRAIN_TIMEOUT_S)
    await runner.cleanup()
    log.info("stopped")
    return 0
