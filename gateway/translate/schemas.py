"""OpenAI request bodies: decoding, validation, and translation into worker `Generate` messages.

Bodies are decoded with msgspec into typed structs (unknown fields are accepted and ignored,
as OpenAI-compatible servers do); every type or range mistake becomes a BadRequest naming the
parameter.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, TypeVar

import msgspec

from mlx_gw.config import SAMPLING_KEYS, UNSET, ModelConfig, parse_duration
from mlx_gw.gateway.errors import BadRequest
from mlx_gw.worker.protocol import Generate

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


# Ranges as msgspec constraints: decoding refuses what is out of range (a 400 naming the field).
Name = Annotated[str, msgspec.Meta(min_length=1)]
Tokens = Annotated[int, msgspec.Meta(ge=1)]
Unit = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Stops = str | Annotated[list[str], msgspec.Meta(max_length=16)]


class _Sampling(msgspec.Struct, kw_only=True):
    model: Name
    max_tokens: Tokens | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Unit | None = None
    seed: int | None = None
    stop: Stops | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)] = 1
    keep_alive: str | int | float | None = None
    user: str | None = None
    ignore_eos: bool = False
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]] | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: Tokens | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]  # a string, token ids, or a one-element list of strings
    echo: bool = False
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None  # alternatives per token


T = TypeVar("T")


def decode(body: bytes, kind: type[T]) -> T:
    """A request body as the struct `kind`, or a BadRequest naming the offending field.

    msgspec checks types and the `Meta` ranges; on a failure each top-level field is
    converted on its own to find the one at fault, so `param` never comes from parsing
    msgspec's message text."""
    if not body.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise BadRequest(f"Invalid request: {e}", param=_culprit(body, kind)) from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"The request body is not valid JSON: {e}") from None


def _culprit(body: bytes, kind: type) -> str | None:
    """The first top-level field of `kind` that is missing or fails its own type."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    for f in msgspec.structs.fields(kind):
        if f.encode_name not in raw:
            if f.required:
                return f.encode_name
            continue
        try:
            msgspec.convert(raw[f.encode_name], f.type)
        except msgspec.ValidationError:
            return f.encode_name
    return None


def keep_alive_param(value: str | int | float | None) -> Any:
    """A request's keep_alive: seconds, None (never), or UNSET when the request has none."""
    if value is None:
        return UNSET
    try:
        return parse_duration(value)
    except ValueError as e:
        raise BadRequest(f"Invalid keep_alive: {e}", param="keep_alive") from None


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _sampling_fields(req: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    return {
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": req.repetition_penalty or 1.0,
        "logit_bias": _logit_bias(req.logit_bias),
        "max_tokens": max_tokens,
        # None = not given: models.yaml `sampling`, else the worker's model defaults.
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
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
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _history_calls(m["tool_calls"], f"{where}.tool_calls")
        out.append(msg)
    return out


def _history_calls(calls: object, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, arguments parsed for the chat template
    (templates render them as objects)."""
    if not isinstance(calls, list):
        raise BadRequest(f"{where} must be a list", param=where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"{where}[{j}].function.name must be a string", param=where)
        args = fn.get("arguments") or "{}"
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise BadRequest(f"{where}[{j}].function.arguments must be a JSON object",
                                 param=where) from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_tools(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None
                ) -> tuple[list[dict[str, Any]] | None, str]:
    """Validated `tools` and the worker's `tool_choice` ("auto", "required" or a function name);
    tools are dropped for "none"."""
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(fn, dict):
            raise BadRequest(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}',
                             param=f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not _TOOL_NAME.fullmatch(fn["name"]):
            raise BadRequest(f"tools[{i}].function.name must be 1-64 letters, digits, _ . -",
                             param=f"tools[{i}].function.name")
        if not isinstance(fn.get("parameters", {}), dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object",
                             param=f"tools[{i}].function.parameters")
    names = [t["function"]["name"] for t in tools or []]
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest('tool_choice must be "none", "auto", "required" or {"type": '
                             '"function", "function": {"name": "..."}}', param="tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise BadRequest('tool_choice must be "none", "auto", "required" or a named function',
                         param="tool_choice")
    if choice not in ("none", "auto") and choice != "required" and choice not in names:
        raise BadRequest(f"tool_choice names function {choice!r}, which is not in tools",
                         param="tool_choice")
    if choice == "required" and not names:
        raise BadRequest('tool_choice "required" needs tools', param="tool_choice")
    if choice == "none" or not names:
        return None, "auto"
    return list(tools or []), choice


def response_schema(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks for: None (free text), {} (any JSON object)."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object",
                             param="response_format")
        return schema
    raise BadRequest('response_format.type must be "text", "json_object" or "json_schema"',
                     param="response_format")


def chat_to_generate(req: ChatRequest) -> Generate:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    tools, choice = check_tools(req.tools, req.tool_choice)
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return Generate(
        rid=0,
        messages=chat_messages(req.messages),
        chat_template_kwargs=req.chat_template_kwargs or {},
        tools=tools,
        tool_choice=choice,
        json_schema=response_schema(req.response_format),
        logprobs=bool(req.logprobs),
        top_logprobs=top,
        **_sampling_fields(req, max_tokens),
    )


def fan_out(gen: Generate, n: int) -> list[Generate]:
    """One Generate per choice; seeded choices get seed, seed+1, … so they differ."""
    gens = [gen]
    for i in range(1, n):
        copy = msgspec.structs.replace(gen)
        if gen.seed is not None:
            copy.seed = gen.seed + i
        gens.append(copy)
    return gens


def completion_to_generate(req: CompletionRequest) -> Generate:
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
    return Generate(rid=0, prompt=prompt, logprobs=req.logprobs is not None,
                    top_logprobs=req.logprobs or 0, **_sampling_fields(req, max_tokens))


def for_model(gen: Generate, model: ModelConfig, *,
              default_max_tokens: int | None = None) -> Generate:
    """Stamp the model's settings on its Generate: parse formats (tool calls, reasoning), the
    completion bound for a request without max_tokens, and the models.yaml `sampling` defaults
    for each parameter the request left unset (None travels on: the worker resolves it)."""
    gen.tool_parser = model.tool_parser
    rp = model.reasoning_parser
    gen.reasoning_parser = list(rp) if isinstance(rp, tuple) else rp
    gen.default_max_tokens = default_max_tokens
    gen.adapter = model.adapter  # a LoRA adapter's name resolves to its base + this
    sampling = model.sampling
    for name in SAMPLING_KEYS:
        if getattr(gen, name) is None:
            setattr(gen, name, getattr(sampling, name))
    return gen
