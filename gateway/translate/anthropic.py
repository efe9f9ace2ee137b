"""Anthropic Messages requests in, worker `Generate` out, and the answer's stop reason.

System, multi-turn, `tool_use` / `tool_result` blocks become the chat template's messages and
OpenAI-shaped tools; Anthropic's tool_choice maps onto the worker's. Pure translation: no
aiohttp, no supervisor.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import msgspec

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import BadRequest
from mlx_gw.gateway.translate.chat_stream import ChoiceParser
from mlx_gw.gateway.translate.schemas import Tokens, check_tools, for_model
from mlx_gw.worker.protocol import Generate

TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class _Base(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # accepted; thinking follows the model's template


class MessagesRequest(_Base, kw_only=True):
    max_tokens: Tokens
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
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


def to_generate(req: MessagesRequest, model: ModelConfig) -> Generate:
    messages, tools, choice = to_chat(req)
    return for_model(Generate(
        rid=0, messages=messages, max_tokens=req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        stop=list(req.stop_sequences or []),
        tools=tools, tool_choice=choice,
    ), model)


def stop_reason(p: ChoiceParser) -> tuple[str | None, str | None]:
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


def new_tool_id() -> str:
    return "toolu_" + secrets.token_hex(12)
