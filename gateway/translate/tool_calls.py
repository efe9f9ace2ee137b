"""Tool-call parsers: the model's tool-call text back into structured calls, streamed or not.

One parser per format the common open model families emit:
- `hermes` (Qwen 2.5/3, Hermes, many others): `<tool_call>\\n{"name": …, "arguments": {…}}
  \\n</tool_call>`, repeated for parallel calls;
- `llama3_json` (Llama 3.1–3.3): the whole answer is `{"name": …, "parameters": {…}}`
  (optionally after `<|python_tag|>`, several separated by `;`);
- `mistral`: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`, or the newer
  `[TOOL_CALLS]name[ARGS]{…}`;
- `json`: a bare call object, which the worker generates when it forces a call for a model
  whose own format it cannot force;
- `mlx_lm:NAME`: any other format mlx-lm knows (glm47, qwen3_coder, pythonic, kimi_k2, …),
  through mlx-lm's own parser module, loaded from its file so the gateway never imports MLX.

Text outside the markers is content. A call whose text does not parse (bad JSON, an unknown
function, a missing name) degrades to plain content: never an error. Whitespace between
content and a call is dropped, so a reply made of calls has no content.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mlx_gw.gateway.translate.reasoning import held_prefix

log = logging.getLogger("mlxgw.tools")

# format -> (start marker, end marker); "" start = the call is the whole answer.
MARKERS: dict[str, tuple[str, str]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]", ""),
    "llama3_json": ("", ""),
    "json": ("", ""),
}
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_HEADER = re.compile(r"\s*([\w.-]+)\s*(?:\[ARGS\])?\s*")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Event = tuple[str, Any]  # ("content", str) | ("call", ToolCall)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------- parsing one call body


def _call(obj: Any, keys: tuple[str, ...]) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def parse_json_calls(body: str, keys: tuple[str, ...] = ("arguments", "parameters")
                     ) -> list[tuple[str, str]] | None:
    """One or more call objects (or lists of them), separated by whitespace, `;` or `,`."""
    dec = json.JSONDecoder()
    calls: list[tuple[str, str]] = []
    pos, text = 0, body.strip()
    while pos < len(text):
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        for item in obj if isinstance(obj, list) else [obj]:
            call = _call(item, keys)
            if call is None:
                return None
            calls.append(call)
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
    return calls or None


def parse_mistral(body: str) -> list[tuple[str, str]] | None:
    calls = parse_json_calls(body)
    if calls is not None:
        return calls
    dec = json.JSONDecoder()
    out: list[tuple[str, str]] = []
    pos = 0
    body = body.rstrip()
    while pos < len(body):  # name[ARGS]{...}, repeated
        if body.startswith("[TOOL_CALLS]", pos):
            pos += len("[TOOL_CALLS]")
        m = _MISTRAL_HEADER.match(body, pos)
        if not m:
            return None
        try:
            args, pos = dec.raw_decode(body, m.end())
        except json.JSONDecodeError:
            return None
        if not isinstance(args, dict):
            return None
        out.append((m.group(1), json.dumps(args, ensure_ascii=False)))
        while pos < len(body) and body[pos] in " \t\r\n":
            pos += 1
    return out or None


@functools.cache
def mlx_lm_parser(name: str) -> ModuleType | None:
    """mlx-lm's parser module `name`, loaded from its file without importing mlx_lm (whose
    package init imports MLX). None when it is missing or needs its package."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations or not name.isidentifier():
        return None
    path = Path(spec.submodule_search_locations[0]) / "tool_parsers" / f"{name}.py"
    file_spec = importlib.util.spec_from_file_location(f"_mlxgw_tool_parser_{name}", path)
    if not path.is_file() or file_spec is None or file_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:  # relative imports, missing dependencies: the format is unknown
        log.warning("mlx-lm tool parser %s unavailable: %s", name, e)
        return None
    return module


def _mlx_lm_body(module: ModuleType, tools: list[dict[str, Any]] | None
                 ) -> Callable[[str], list[tuple[str, str]] | None]:
    def parse(body: str) -> list[tuple[str, str]] | None:
        try:
            got = module.parse_tool_call(body, tools)
        except Exception:
            return None
        calls = [_call(c, ("arguments",)) for c in (got if isinstance(got, list) else [got])]
        return None if not calls or None in calls else calls  # type: ignore[return-value]

    return parse


# ---------------------------------------------------------------- the streaming parser


class ToolCallParser:
    """Feed content deltas of one choice; get events (content pieces, complete calls)."""

    def __init__(self, fmt: str, tools: list[dict[str, Any]] | None,
                 new_id: Callable[[], str] = new_call_id) -> None:
        self.names = {(t.get("function") or {}).get("name") for t in tools or []}
        self.new_id = new_id
        self.calls = 0
        self.start, self.end = MARKERS.get(fmt, ("", ""))
        self._parse: Callable[[str], list[tuple[str, str]] | None] = parse_json_calls
        if fmt == "mistral":
            self._parse = parse_mistral
        elif fmt == "llama3_json":
            self._parse = lambda body: parse_json_calls(body.replace(_PYTHON_TAG, ""),
                                                        ("parameters", "arguments"))
        elif fmt.startswith("mlx_lm:"):
            module = mlx_lm_parser(fmt[len("mlx_lm:"):])
            self.start, self.end = ("", "") if module is None else \
                (module.tool_call_start, module.tool_call_end)
            self._parse = (lambda body: None) if module is None else _mlx_lm_body(module, tools)
            if module is None:
                fmt = ""
        self.enabled = bool(fmt)
        self._markerless = self.enabled and not self.start
        self._inside = False
        self._decided = not self._markerless  # markerless: is the answer a call at all?
        self._buf = ""
        self._ws = ""  # whitespace-only content, held until we know it is not next to a call

    def feed(self, text: str) -> list[Event]:
        if not self.enabled:
            return [("content", text)] if text else []
        self._buf += text
        events: list[Event] = []
        while self._buf:
            if not self._decided:
                stripped = self._buf.lstrip()
                if not stripped or (len(stripped) < len(_PYTHON_TAG)
                                    and _PYTHON_TAG.startswith(stripped)):
                    return events  # not yet known
                looks_like_call = stripped[0] in "{[" or stripped.startswith(_PYTHON_TAG)
                self._decided = True
                self._inside = looks_like_call
                if not looks_like_call:
                    self.enabled = False
                    buf, self._buf = self._buf, ""
                    return [("content", buf)]
                continue
            if self._inside:
                if not self.end:
                    return events  # the call runs to the end of the answer
                i = self._buf.find(self.end)
                if i < 0:
                    return events
                events += self._close(self._buf[:i], self.start + self._buf[:i + len(self.end)])
                self._buf = self._buf[i + len(self.end):]
                continue
            i = self._buf.find(self.start)
            if i >= 0:
                self._content(self._buf[:i], events)
                self._buf = self._buf[i + len(self.start):]
                self._inside = True
                continue
            keep = held_prefix(self._buf, self.start)
            self._content(self._buf[: len(self._buf) - keep], events)
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return events

    def finish(self) -> list[Event]:
        """Events for what is still held once the answer has ended."""
        events: list[Event] = []
        buf, self._buf = self._buf, ""
        if self._inside:
            self._inside = False
            events += self._close(buf, self.start + buf)
        elif buf:
            self._content(buf, events)
        if self._ws and not self.calls:
            events.append(("content", self._ws))
        self._ws = ""
        return events

    def _content(self, text: str, events: list[Event]) -> None:
        body = text.rstrip()
        if body:  # trailing whitespace waits: it is dropped if a call comes next
            events.append(("content", self._ws + body))
            self._ws = ""
        self._ws += text[len(body):]

    def _close(self, body: str, raw: str) -> list[Event]:
        """A complete call text: its calls, or the raw text as content when it is malformed."""
        self._inside = False
        calls = self._parse(body)
        if calls and all(name in self.names for name, _ in calls):
            self._ws = ""
            self.calls += len(calls)
            return [("call", ToolCall(self.new_id(), name, args)) for name, args in calls]
        events: list[Event] = []
        self._ws, ws = "", self._ws
        if raw.strip():
            events.append(("content", ws + raw))
        return events
