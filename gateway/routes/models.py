"""Model management routes: what is on disk, what a model is, pulls and deletes.

- `GET /api/models`: model repos in the local Hugging Face cache, with the configured models
  that use each and whether one is loaded.
- `GET /api/show?model=`: a configured model (name or alias) or a cached repo id: its settings,
  files, sizes, kind, architecture, quantization and context length.
- `POST /api/pull {"repo", "revision"?, "stream"?}`: download a repo into the cache through
  huggingface_hub ($HF_ENDPOINT), progress streamed as SSE (`stream: false` answers once done).
  The repo is resolved before any byte is sent, so an unknown repo is a plain 404.
  Ollama's body (`{"model"}`) gets Ollama's NDJSON status lines and error shape instead.
- `DELETE /api/models/{repo}`: remove a pulled repo's files; 409 while a model using it is
  loaded, 404 when it is not in the cache.
Disk and network work runs in threads (mlx_gw.gateway.store.model_files); the event loop never
blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.auth import check_allowed, check_pull_allowed, restricted
from mlx_gw.gateway.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    GatewayError,
    InsufficientStorage,
    NotFound,
    Unavailable,
)
from mlx_gw.gateway.routes.ollama import mark_ollama
from mlx_gw.gateway.routes.sse import EventStream
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.store import model_files
from mlx_gw.gateway.supervision.supervisor import Supervisor
from mlx_gw.gateway.translate.ollama import ModelBody, pull_status, pull_target
from mlx_gw.gateway.translate.schemas import decode

PULL_KEEPALIVE_S = 15.0
routes = web.RouteTableDef()


def _users(sup: Supervisor, repo: str) -> list[ModelConfig]:
    return [m for m in sup.config.models.values() if m.path == repo]


def _loaded(sup: Supervisor) -> set[str]:
    return {s.name for s in sup.ps()}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


@routes.get("/api/models")
async def list_models(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    rows = await asyncio.to_thread(model_files.cached_repos)
    loaded = _loaded(sup)
    for r in rows:
        names = [m.name for m in _users(sup, r["repo"])]
        r["used_by"] = names
        r["loaded"] = any(n in loaded for n in names)
    return web.json_response({"models": rows}, dumps=_dumps)


def _settings(sup: Supervisor, m: ModelConfig) -> dict[str, Any]:
    return {"type": m.type, "path": m.path, "aliases": list(m.aliases),
            "keep_alive": sup.config.effective_keep_alive(m),
            "pin": sup.status(m).pinned, "max_batch": m.max_batch,
            "max_queue": m.max_queue, "dtype": m.dtype, "context_length": m.context_length}


@routes.get("/api/show")
async def show(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    name = request.query.get("model", "").strip()
    if not name:
        raise BadRequest("Missing query parameter 'model' (a model name or a repo id)",
                         param="model")
    model = sup.config.resolve(name)
    if model is not None:
        check_allowed(model, name)
    elif restricted():
        raise Forbidden("This API key may only show its own models", param="model")
    if model is None and not model_files.is_repo_id(name):
        raise NotFound(f"The model '{name}' does not exist: it is neither configured nor a "
                       "Hugging Face repo id", param="model")
    path = model.path if model else name
    local, repo = await asyncio.to_thread(model_files.local_path, path)
    if local is None:
        hint = f"; pull it with `mlx-gw pull {repo}`" if repo else ""
        raise NotFound(f"The model '{name}' has no files on disk ({path}){hint}",
                       param="model")
    info = await asyncio.to_thread(model_files.describe, local)
    body: dict[str, Any] = {"name": model.name if model else name,
                            "configured": model is not None, "repo": repo,
                            "path": str(local), **info}
    if model is not None:
        body["kind"] = model.type
        body["settings"] = _settings(sup, model)
        if model.context_length and info.get("context_length"):
            body["context_length"] = min(model.context_length, info["context_length"])
        body["state"] = sup.status(model).state.value
    return web.json_response(body, dumps=_dumps)


class PullRequest(msgspec.Struct):
    repo: str
    revision: str | None = None
    stream: bool = True


async def _manifest(repo: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.errors import RevisionNotFoundError as NoRevision

    try:
        return await asyncio.to_thread(model_files.manifest, repo, revision)
    except RepositoryNotFoundError:
        raise NotFound(f"Repository '{repo}' was not found on the Hugging Face Hub (or needs "
                       "a token: set HF_TOKEN for the gateway)", code="repo_not_found",
                       param="repo") from None
    except NoRevision:
        raise NotFound(f"Revision '{revision}' of '{repo}' was not found",
                       code="revision_not_found", param="revision") from None
    except model_files.HubUnreachable as e:
        raise Unavailable(str(e), code="hub_unreachable", retry_after=30) from None
    except HfHubHTTPError as e:
        raise BadRequest(f"The Hugging Face Hub refused '{repo}': {e}", param="repo") from None


async def pull_progress(man: dict[str, Any]) -> AsyncIterator[dict[str, Any] | None]:
    """Downloads `man` (from `_manifest`) in a thread, yielding its progress reports, None
    after PULL_KEEPALIVE_S without one, and last {"status": "success", "path"}. A failed
    download raises a GatewayError; leaving early stops the thread at its next chunk."""
    loop = asyncio.get_running_loop()
    reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def report(event: dict[str, Any]) -> None:  # called in the download thread
        loop.call_soon_threadsafe(reports.put_nowait, event)

    fut = loop.run_in_executor(None, model_files.pull, man, report, cancelled)
    try:
        while not fut.done():
            get = asyncio.ensure_future(reports.get())
            done, _ = await asyncio.wait({get, fut}, timeout=PULL_KEEPALIVE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                yield get.result()
            else:
                get.cancel()
                if not done:
                    yield None
        while not reports.empty():  # reports queued before the thread returned
            yield reports.get_nowait()
        try:
            path = fut.result()
        except GatewayError:
            raise
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise Unavailable(f"pulling '{man['repo']}' failed: {e}",
                                  code="pull_failed") from None
            raise InsufficientStorage(
                f"pulling '{man['repo']}' failed: {e.strerror} writing to the model cache "
                f"(it needs {man['total']} bytes); the partial download was removed. Free "
                "some space (`mlx-gw models`, DELETE /api/models/REPO) or set HF_HOME to a "
                "larger disk") from None
        except Exception as e:
            raise Unavailable(f"pulling '{man['repo']}' failed: {type(e).__name__}: {e}",
                              code="pull_failed") from None
        yield {"status": "success", "path": path}
    finally:
        if not fut.done():
            cancelled.set()  # the download thread stops at its next chunk


@routes.post("/api/pull")
async def pull(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    if _ollama_body(raw):
        return await _ollama_pull(request, raw)
    body = decode(raw, PullRequest)
    check_pull_allowed(request.app[SUPERVISOR].config.gateway)
    if not model_files.is_repo_id(body.repo):
        raise BadRequest(f"'{body.repo}' is not a Hugging Face repo id (expected 'org/name')",
                         param="repo")
    man = await _manifest(body.repo, body.revision)
    summary = {"repo": man["repo"], "revision": man["revision"], "files": len(man["files"]),
               "total": man["total"]}
    progress = contextlib.aclosing(pull_progress(man))
    if not body.stream:
        path = None
        async with progress as events:
            async for event in events:
                if event is not None and event["status"] == "success":
                    path = event["path"]
        return web.json_response({"status": "success", **summary, "path": path})
    out = EventStream(request)

    async def send(event: dict[str, Any]) -> None:
        await out.write(b"data: " + _dumps(event).encode() + b"\n\n")

    await send({"status": "manifest", **summary})
    try:
        async with progress as events:
            async for event in events:
                if event is None:
                    await out.comment("downloading")
                elif event["status"] == "success":
                    await send({**event, **summary})
                else:
                    await send(event)
    except GatewayError as e:
        await send({"status": "error", **e.openai_body()})
    return await out.close()


def _ollama_body(raw: bytes) -> bool:
    """Ollama's pull body names `model` (or `name`); ours names `repo`."""
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and "repo" not in body and ("model" in body or "name" in body)


async def _ollama_pull(request: web.Request, raw: bytes) -> web.StreamResponse:
    """Ollama's pull: a configured model's repo, or a repo id (`hf.co/` prefix and `:tag` as
    the revision accepted), with Ollama's NDJSON status lines."""
    mark_ollama(request)
    body = decode(raw, ModelBody)
    sup = request.app[SUPERVISOR]
    check_pull_allowed(sup.config.gateway)
    name = body.which
    model = sup.config.resolve(name)
    repo, revision = (model.path, None) if model is not None else pull_target(name)
    if model is not None and not model_files.is_repo_id(repo):
        return web.json_response({"status": "success"})  # local files: nothing to pull
    if not model_files.is_repo_id(repo):
        raise NotFound(f"'{name}' is neither a configured model nor a Hugging Face repo id "
                       "(org/name or hf.co/org/name)", param="model")
    man = await _manifest(repo, revision)
    out = EventStream(request, {"Content-Type": "application/x-ndjson"}) if body.stream \
        else None

    async def send(event: dict[str, Any]) -> None:
        if out is not None:
            await out.write(_dumps(event).encode() + b"\n")

    await send({"status": "pulling manifest"})
    try:
        async with contextlib.aclosing(pull_progress(man)) as events:
            async for event in events:
                if event is not None and event["status"] != "success":
                    await send(pull_status(event))
    except GatewayError as e:
        if out is None:
            raise
        return await out.fail(e, _dumps({"error": e.message}).encode() + b"\n", repo)
    for status in ("verifying sha256 digest", "writing manifest"):
        await send({"status": status})
    if out is None:
        return web.json_response({"status": "success"})
    await send({"status": "success"})
    return await out.close()


@routes.delete("/api/models/{name:.+}")
async def delete(request: web.Request) -> web.Response:
    return web.json_response(await delete_pulled(request.app[SUPERVISOR],
                                                 request.match_info["name"]))


async def delete_pulled(sup: Supervisor, name: str) -> dict[str, Any]:
    """Remove the files of a pulled model (by model name or repo id): 409 while loaded, 404
    when not in the cache, 400 for a model served from local files."""
    model = sup.config.resolve(name)
    repo = model.path if model is not None else name
    if not model_files.is_repo_id(repo) or Path(repo).expanduser().exists():
        if model is not None:
            raise BadRequest(f"Model '{name}' is served from {repo}, not from the Hugging Face "
                             "cache: mlx-gw deletes only pulled models", param="name")
        raise NotFound(f"'{name}' is not a pulled model (expected a repo id 'org/name')",
                       param="name")
    loaded = _loaded(sup)
    busy = [m.name for m in _users(sup, repo) if m.name in loaded]
    if busy:
        raise Conflict(f"'{repo}' is loaded (as {', '.join(busy)}); unload it first",
                       code="model_loaded")
    try:
        freed = await asyncio.to_thread(model_files.delete_repo, repo)
    except model_files.OutsideCache as e:
        raise Forbidden(f"'{repo}' was not deleted: {e}", code="outside_cache") from None
    if freed is None:
        raise NotFound(f"'{repo}' is not in the local Hugging Face cache", param="name")
    return {"deleted": repo, "freed_bytes": freed}
