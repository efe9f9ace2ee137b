"""OpenAI request bodies: decoding, validation, and translation into worker `Generate` messages.

Bodies are decoded with msgspec into typed structs (unknown fields are accepted and ignored,
as OpenAI-compatible servers do); every type or range mistake becomes a BadRequest naming the
parameter.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from config import UNSET, parse_duration
from gateway.errors import BadRequest
from worker.protocol import Generate

ROLES = ("system", "developer", "user", "assistant", "tool")


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    keep_alive: str | int | float | None = None
    user: str | None = None
    ignore_eos: bool = False


class ChatRequest(_Sampling, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]  # a string, token ids, or a one-element list of strings
    echo: bool = False


T = TypeVar("T", bound=_Sampling)
_PARAM = re.compile(r"at `\$\.?([^`]*)`|missing required field `([^`]*)`")


def decode(body: bytes, kind: type[T]) -> T:
    if not body.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        m = _PARAM.search(str(e))
        param = (m.group(1) or m.group(2)) if m else None
        raise BadRequest(f"Invalid request: {e}", param=param) from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"The request body is not valid JSON: {e}") from None


def keep_alive_param(value: str | int | float | None) -> Any:
    """A request's keep_alive: seconds, None (never), or UNSET when the request has none."""
    if value is None:
        return UNSET
    try:
        return parse_duration(value)
    except ValueError as e:
        raise BadRequest(f"Invalid keep_alive: {e}", param="keep_alive") from None


def _check_sampling(req: _Sampling, max_tokens: int | None) -> None:
    if not req.model:
        raise BadRequest("'model' must be a non-empty string", param="model")
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise BadRequest("temperature must be between 0 and 2", param="temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise BadRequest("top_p must be in (0, 1]", param="top_p")
    if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
        raise BadRequest("min_p must be in [0, 1]", param="min_p")
    if req.top_k is not None and req.top_k < 0:
        raise BadRequest("top_k must be >= 0", param="top_k")
    if req.n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    stops = _stops(req.stop)
    if len(stops) > 16:
        raise BadRequest("at most 16 stop sequences are allowed", param="stop")


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _sampling_fields(req: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "min_p": req.min_p or 0.0,
        "seed": req.seed,
        "stop": _stops(req.stop),
        "ignore_eos": req.ignore_eos,
    }


def _text_content(content: object, where: str) -> str:
    """A message's content as plain text: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image", "input_audio"):
                raise BadRequest(f"{where}.content[{j}] is of type '{kind}', which this "
                                 "model (a text-only llm) does not accept",
                                 param=f"{where}.content")
            else:
                raise BadRequest(f"{where}.content[{j}] must be a text part "
                                 '({"type": "text", "text": "..."})', param=f"{where}.content")
        return "".join(texts)
    raise BadRequest(f"{where}.content must be a string or a list of content parts",
                     param=f"{where}.content")


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}",
                             param=f"{where}.role")
        msg = dict(m)
        msg["role"] = "system" if role == "developer" else role
        msg["content"] = _text_content(m.get("content"), where)
        out.append(msg)
    return out


def chat_to_generate(req: ChatRequest) -> Generate:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    _check_sampling(req, max_tokens)
    return Generate(
        rid=0,
        messages=chat_messages(req.messages),
        chat_template_kwargs=req.chat_template_kwargs or {},
        **_sampling_fields(req, max_tokens),
    )


def completion_to_generate(req: CompletionRequest) -> Generate:
    _check_sampling(req, req.max_tokens)
    if req.echo:
        raise BadRequest("echo is not supported", param="echo")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise BadRequest("only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    elif isinstance(prompt, list) and not all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        raise BadRequest("'prompt' must be a string, a list of token ids, or a list with one "
                         "string", param="prompt")
    if not prompt:
        raise BadRequest("'prompt' must not be empty", param="prompt")
    # OpenAI's default for /v1/completions is 16 tokens.
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    return Generate(rid=0, prompt=prompt, **_sampling_fields(req, max_tokens))
