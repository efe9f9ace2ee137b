"""OpenAI Responses requests in, worker `Generate` out: input items, instructions, tools,
tool_choice and `text.format`.

`input` (a string, or items: messages, `function_call`, `function_call_output`, earlier
`reasoning`) becomes the chat template's messages, in the same worker-ready shape as a chat
request's (tool-call arguments as objects, `developer` as `system`), so a stored turn can be
replayed as history under `previous_response_id`. Function tools are flattened in Responses
(`{"type": "function", "name", "parameters"}`) and are re-nested for `check_tools`; OpenAI's
built-in tools (web_search, file_search, computer, …) are refused with a 400 that says so.
Pure translation: no aiohttp, no supervisor.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec

from mlx_gw.gateway.errors import BadRequest
from mlx_gw.gateway.translate.schemas import Tokens, check_tools
from mlx_gw.worker.protocol import Generate

# OpenAI's hosted tools: they run on OpenAI's side, so a local gateway cannot provide them.
BUILT_IN_TOOLS = ("web_search", "web_search_preview", "web_search_preview_2025_03_11",
                  "file_search", "computer", "computer_use", "computer_use_preview",
                  "code_interpreter", "image_generation", "mcp", "local_shell", "shell",
                  "apply_patch", "custom", "tool_search")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class TextOptions(msgspec.Struct, kw_only=True):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    reasoning: dict[str, Any] | None = None  # accepted; thinking follows the model's template
    max_output_tokens: Tokens | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    keep_alive: str | int | float | None = None
    # OpenAI features that need state or services a local gateway does not have.
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


def _refuse_unsupported(req: ResponsesRequest) -> None:
    if req.background:
        raise BadRequest("background responses are not supported; omit 'background'",
                         param="background")
    if req.conversation is not None:
        raise BadRequest("conversations are not supported; chain turns with "
                         "previous_response_id", param="conversation")
    if req.prompt is not None:
        raise BadRequest("prompt templates are not supported; send input and instructions",
                         param="prompt")
    if req.truncation not in (None, "disabled"):
        raise BadRequest('truncation must be "disabled"; an over-long input is an error',
                         param="truncation")


def _text(content: Any, where: str) -> str:
    """A message's content as plain text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of content parts", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise BadRequest(f"{where}[{j}] is of type '{kind}', which /v1/responses does not "
                             "accept yet; send text", param=where)
        else:
            raise BadRequest(f"{where}[{j}] must be an input_text or output_text part",
                             param=where)
    return "".join(parts)


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A function call's arguments as an object: chat templates render them that way."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value or "{}")
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    raise BadRequest(f"{where}.arguments must be a JSON object, as a string", param=where)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This turn's input as worker-ready chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise BadRequest("input must be a string or a non-empty list of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise BadRequest(f"{where}.role must be user, assistant, system or developer",
                                 param=f"{where}.role")
            out.append({"role": role, "content": _text(item.get("content"),
                                                       f"{where}.content")})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise BadRequest(f"{where} needs call_id and name strings", param=where)
            call = {"id": call_id, "type": "function", "function": {
                "name": name, "arguments": _arguments(item.get("arguments"), where)}}
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":  # calls join the turn's message
                last = {"role": "assistant", "content": ""}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise BadRequest(f"{where}.call_id must be a string", param=where)
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": _text(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # earlier thoughts are not replayed to the model
        else:
            raise BadRequest(f"{where} has type {kind!r}; /v1/responses accepts message, "
                             "function_call, function_call_output and reasoning items",
                             param=where)
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools in the chat shape the worker and `check_tools` read."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in BUILT_IN_TOOLS:
            raise BadRequest(f"tools[{i}] is OpenAI's built-in '{kind}' tool, which mlx-gw "
                             "does not provide: only function tools run here",
                             code="unsupported_tool", param=f"tools[{i}]")
        if kind != "function":
            raise BadRequest(f'tools[{i}] must be {{"type": "function", "name": ..., '
                             f'"parameters": {{...}}}}; got type {kind!r}', param=f"tools[{i}]")
        out.append({"type": "function", "function": {
            "name": tool.get("name"), "description": tool.get("description") or "",
            "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    kind = choice.get("type")
    if kind == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if kind in BUILT_IN_TOOLS or (isinstance(kind, str) and kind.startswith("web_search")):
        raise BadRequest(f"tool_choice names OpenAI's built-in '{kind}' tool, which mlx-gw "
                         "does not provide", code="unsupported_tool", param="tool_choice")
    raise BadRequest('tool_choice must be "none", "auto", "required" or {"type": "function", '
                     '"name": "..."}', param="tool_choice")


def text_schema(text: TextOptions | None) -> dict[str, Any] | None:
    """The JSON schema `text.format` asks for: None (free text), {} (any JSON object)."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {}
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("text.format.schema must be a JSON schema object",
                             param="text.format.schema")
        return schema
    raise BadRequest('text.format.type must be "text", "json_object" or "json_schema"',
                     param="text.format")


def to_generate(req: ResponsesRequest, history: list[dict[str, Any]]
                ) -> tuple[Generate, list[dict[str, Any]]]:
    """(the worker's Generate, this turn's input messages, kept for a later turn's history).
    `history` is the chain under previous_response_id; instructions are not inherited."""
    _refuse_unsupported(req)
    turn = input_messages(req.input)
    messages = list(history) + turn
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    tools, choice = check_tools(chat_tools(req.tools), chat_tool_choice(req.tool_choice))
    gen = Generate(
        rid=0, messages=messages, tools=tools, tool_choice=choice,
        json_schema=text_schema(req.text), max_tokens=req.max_output_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
    )
    return gen, turn
