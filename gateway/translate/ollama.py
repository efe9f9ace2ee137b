"""Ollama API request bodies in, worker `Generate` / `Embed` out.

Bodies follow Ollama's `api/types.go` as its official clients send them: `/api/chat`
(`messages` with `images` and `tool_calls` whose arguments are objects, `tools`, `think`,
`format`), `/api/generate` (`prompt`, `system`, `raw`, `images`), `/api/embed`,
`/api/embeddings`, and `options` mapped onto our sampling. Options Ollama has and we cannot
honour per request (num_ctx, num_thread, mirostat, ...) are accepted and ignored, as Ollama
itself ignores unknown ones. One extension: `options.tool_choice` ("auto", "required", "none"
or a function name; the Ollama API has no such field) forces a call through the constrained
decoder. Pure translation: no aiohttp, no supervisor.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import msgspec

from mlx_gw.gateway.errors import BadRequest
from mlx_gw.gateway.translate.schemas import MAX_TOP_LOGPROBS, chat_messages, check_tools
from mlx_gw.worker.protocol import Embed, Generate

# Ollama's sampling defaults (api/types.go DefaultOptions), used where `options` is silent, so
# a client moved over from Ollama samples as it did there. repeat_penalty stays off unless
# asked: mlx-lm's penalty is a logits processor per step, not free.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 40
KeepAlive = str | int | float | None
Unit = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]


class Options(msgspec.Struct, kw_only=True):
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Unit | None = None
    seed: int | None = None  # -1 (Ollama's default): random
    num_predict: Annotated[int, msgspec.Meta(ge=-2)] | None = None  # -1, -2: no limit
    stop: str | Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    num_ctx: Annotated[int, msgspec.Meta(ge=1)] | None = None  # the model's window governs
    tool_choice: str | None = None  # mlx-gw extension (see the module docstring)


class _Body(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    stream: bool = True  # Ollama streams unless told not to
    keep_alive: KeepAlive = None
    options: Options | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0


class ChatBody(_Body, kw_only=True):
    messages: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Body, kw_only=True):
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedBody(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[str]
    truncate: bool = True  # Ollama's default, unlike OpenAI's
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    """The older /api/embeddings: one prompt, one vector."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str = ""
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class ModelBody(msgspec.Struct, kw_only=True):
    """/api/show, /api/delete, /api/pull: Ollama sends `model` (older clients `name`)."""

    model: str = ""
    name: str = ""
    verbose: bool = False
    stream: bool = True
    insecure: bool = False

    @property
    def which(self) -> str:
        found = self.model or self.name
        if not found:
            raise BadRequest("'model' is required", param="model")
        return found


class CopyBody(msgspec.Struct, kw_only=True):
    source: Annotated[str, msgspec.Meta(min_length=1)]
    destination: Annotated[str, msgspec.Meta(min_length=1)]


def is_preload(body: ChatBody | GenerateBody) -> bool:
    """Ollama's idiom: a request with only `model` (and keep_alive) loads, or with keep_alive
    0 unloads, the model."""
    if isinstance(body, ChatBody):
        return not body.messages
    return not body.prompt and not body.images


def _sampling(options: Options | None) -> dict[str, Any]:
    o = options or Options()
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else None
    if max_tokens == 0:
        raise BadRequest("options.num_predict must be at least 1 (or -1 for no limit)",
                         param="options.num_predict")
    stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or [])
    return {
        "max_tokens": max_tokens,
        "temperature": DEFAULT_TEMPERATURE if o.temperature is None else o.temperature,
        "top_p": DEFAULT_TOP_P if o.top_p is None else o.top_p,
        "top_k": DEFAULT_TOP_K if o.top_k is None else o.top_k,
        "min_p": o.min_p or 0.0,
        "seed": None if o.seed is None or o.seed < 0 else o.seed,
        "stop": stop,
        "repetition_penalty": o.repeat_penalty or 1.0,
        "presence_penalty": o.presence_penalty or 0.0,
        "frequency_penalty": o.frequency_penalty or 0.0,
    }


def _schema(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """`format`: "" or absent = free text, "json" = any JSON object, an object = its schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {}
    if isinstance(fmt, dict):
        return fmt
    raise BadRequest('format must be "json" or a JSON schema object', param="format")


def _think(think: bool | str | None) -> dict[str, Any]:
    """`think` as chat-template variables (Qwen3's enable_thinking, gpt-oss's effort levels);
    a template that reads neither ignores them."""
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"enable_thinking": think}
    if think not in ("low", "medium", "high"):
        raise BadRequest('think must be true, false, "low", "medium" or "high"', param="think")
    return {"enable_thinking": True, "reasoning_effort": think}


def _images(values: object, where: str, vision: bool) -> list[bytes]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"{where} must be a list of base64 strings", param=where)
    if not vision and values:
        raise BadRequest(f"{where}: this model is a text-only llm and does not accept images",
                         param=where)
    out = []
    for j, v in enumerate(values):
        try:
            data = base64.b64decode(v.partition(",")[2] if v.startswith("data:") else v,
                                    validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}[{j}] is not valid base64", code="invalid_image",
                             param=where) from None
        if not data:
            raise BadRequest(f"{where}[{j}] is empty", code="invalid_image", param=where)
        out.append(data)
    return out


def _messages(raw: list[dict[str, Any]], vision: bool) -> list[dict[str, Any]]:
    """Ollama messages as chat-template messages: tool results carry `tool_name`, assistant
    tool calls carry argument objects, images become bytes (vlm) or a 400 (llm)."""
    stripped: list[dict[str, Any]] = []
    images: dict[int, list[bytes]] = {}
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        msg = {k: v for k, v in m.items() if k not in ("images", "thinking", "tool_name")}
        if m.get("images"):
            images[i] = _images(m["images"], f"messages[{i}].images", vision)
        if m.get("tool_name"):
            msg["name"] = m["tool_name"]
        if msg.get("tool_calls"):
            msg["tool_calls"] = [
                {"type": "function", **c} if isinstance(c, dict) else c for c in msg["tool_calls"]]
        stripped.append(msg)
    out = chat_messages(stripped)
    for i, data in images.items():
        out[i]["images"] = data
    return out


def _common(body: _Body) -> dict[str, Any]:
    if body.top_logprobs and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return {"json_schema": _schema(body.format), "chat_template_kwargs": _think(body.think),
            "logprobs": body.logprobs, "top_logprobs": body.top_logprobs,
            **_sampling(body.options)}


def chat_generate(body: ChatBody, vision: bool) -> Generate:
    choice = body.options.tool_choice if body.options else None
    tools, worker_choice = check_tools(body.tools or None, choice)
    return Generate(rid=0, messages=_messages(body.messages, vision), tools=tools,
                    tool_choice=worker_choice, **_common(body))


def generate_generate(body: GenerateBody, vision: bool) -> Generate:
    """/api/generate: the prompt through the model's chat template (as Ollama applies the
    model's template), or as it is with `raw`."""
    for name in ("suffix", "template"):
        if getattr(body, name):
            raise BadRequest(f"'{name}' is not supported by mlx-gw: the model's own chat "
                             "template applies", param=name)
    if body.context:
        raise BadRequest("'context' (token history) is not supported: send the history as "
                         "/api/chat messages", param="context")
    if body.raw:
        if body.images or body.system:
            raise BadRequest("raw prompts take no images or system", param="raw")
        return Generate(rid=0, prompt=body.prompt, **_common(body))
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": body.system})
    user: dict[str, Any] = {"role": "user", "content": body.prompt}
    if body.images:
        user["images"] = body.images
    messages.append(user)
    return Generate(rid=0, messages=_messages(messages, vision), **_common(body))


def embed_message(value: str | list[str], truncate: bool, dimensions: int | None) -> Embed:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts or any(not t for t in texts):
        raise BadRequest("'input' must be a non-empty string or a list of non-empty strings",
                         param="input")
    return Embed(rid=0, texts=texts, truncate=truncate, dimensions=dimensions)


HUB_PREFIXES = ("https://huggingface.co/", "huggingface.co/", "hf.co/")


def pull_target(name: str) -> tuple[str, str | None]:
    """An Ollama pull name as (Hugging Face repo id, revision): `hf.co/org/name` and
    `org/name` name a repo; a `:tag` other than `latest` is the revision."""
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    repo, _, tag = name.partition(":")
    return repo, None if tag in ("", "latest") else tag


def pull_status(event: dict[str, Any]) -> dict[str, Any]:
    """One of our pull progress reports as Ollama's status line."""
    if event["status"] == "downloading":
        return {"status": f"pulling {event['file']}", "digest": event["file"],
                "total": event["total"], "completed": event["completed"]}
    return {"status": event["status"]}
