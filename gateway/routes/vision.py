"""Chat requests for vision models: image parts resolved in the gateway, before any load.

`chat_generate` is what /v1/chat/completions calls: an llm model gets the plain text path; a
vlm model's `image_url` parts (data: URLs, or http(s) URLs fetched with a size limit and a
timeout unless `gateway.remote_images` is false) become image bytes in the message's `images`
list, and the rest goes through the same validation as text chat; other kinds get a 400.
A bad data URL, an image over the size limit, something that is not an image or a failed
fetch is a 400 that says which part.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import BadRequest
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate.schemas import ChatRequest, chat_to_generate
from mlx_gw.worker.protocol import Generate

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 50_000_000  # also the worker's limit: bigger images are decompression bombs
FETCH_TIMEOUT_S = 10.0
IMAGE_PARTS = ("image_url", "input_image")


async def chat_generate(request: web.Request, req: ChatRequest, model: ModelConfig) -> Generate:
    """The Generate for a chat request to `model` (resolved, an llm or a vlm), images
    included for a vlm."""
    if model.type != "vlm":
        return chat_to_generate(req)
    stripped: list[dict[str, Any]] = []
    images: dict[int, list[bytes]] = {}
    for i, m in enumerate(req.messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            stripped.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in IMAGE_PARTS:
                where = f"messages[{i}].content[{j}]"
                url = _url(part, where)
                images.setdefault(i, []).append(await _image_bytes(url, where, request))
            else:
                parts.append(part)
        stripped.append({**m, "content": parts})
    gen = chat_to_generate(msgspec.structs.replace(req, messages=stripped))
    for i, data in images.items():
        assert gen.messages is not None
        gen.messages[i]["images"] = data
    return gen


def _url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where} needs an image_url with a 'url' string", param=where)
    return value


async def _image_bytes(url: str, where: str, request: web.Request) -> bytes:
    if url.startswith("data:"):
        data = _data_url(url, where)
    elif url.startswith(("http://", "https://")):
        if not request.app[SUPERVISOR].config.gateway.remote_images:
            raise BadRequest(f"{where}: remote image URLs are disabled on this gateway "
                             "(gateway.remote_images: false); send the image as a data: URL",
                             code="remote_images_disabled", param=where)
        data = await _fetch(url, where)
    else:
        raise BadRequest(f"{where}: the image URL must be a data: URL or an http(s) URL",
                         param=where)
    _check_image(data, where)
    return data


def _data_url(url: str, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise BadRequest(f"{where}: a data URL must look like data:image/png;base64,<data>",
                         code="invalid_image", param=where)
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise BadRequest(f"{where}: the image is larger than {MAX_IMAGE_BYTES} bytes",
                         code="image_too_large", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: the data URL is not valid base64", code="invalid_image",
                         param=where) from None


async def _fetch(url: str, where: str) -> bytes:
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as r:
            if r.status != 200:
                raise BadRequest(f"{where}: fetching {url} answered HTTP {r.status}",
                                 code="image_fetch_failed", param=where)
            if (r.content_length or 0) > MAX_IMAGE_BYTES:
                raise _too_large(where)
            data = await r.content.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise _too_large(where)
            return data
    except (aiohttp.ClientError, TimeoutError) as e:
        raise BadRequest(f"{where}: could not fetch {url} within {FETCH_TIMEOUT_S:.0f}s: "
                         f"{type(e).__name__}", code="image_fetch_failed", param=where) from None


def _too_large(where: str) -> BadRequest:
    return BadRequest(f"{where}: the image is larger than {MAX_IMAGE_BYTES} bytes",
                      code="image_too_large", param=where)


def _check_image(data: bytes, where: str) -> None:
    """A 400 for bytes that are not an image, or for one too large to decode safely. Pillow
    reads only the header here; without Pillow the worker makes the same checks."""
    if not data:
        raise BadRequest(f"{where}: the image is empty", code="invalid_image", param=where)
    try:
        from PIL import Image
    except ImportError:
        return
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:
        raise BadRequest(f"{where}: the data is not an image Pillow can read",
                         code="invalid_image", param=where) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise BadRequest(f"{where}: the image is {width}x{height} pixels; the limit is "
                         f"{MAX_IMAGE_PIXELS} pixels", code="image_too_large", param=where)
