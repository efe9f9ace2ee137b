"""Ollama response objects: chat and generate chunks (NDJSON lines) and whole answers, model
listings (`/api/tags`, `/api/show`).

A request's deltas go through one `ChoiceParser` (thought, answer, tool calls); this module only
decides how Ollama spells them: `message.content` / `response`, `thinking`, `tool_calls` with
argument objects (the official client rejects a JSON string), and the final chunk's `done`,
`done_reason`, `prompt_eval_count`, `eval_count` and durations in nanoseconds. Pure: no
aiohttp, no supervisor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

from mlx_gw.gateway.translate.chat_stream import ChoiceParser
from mlx_gw.worker.protocol import Delta, TokenLogprob

# The Ollama release whose API these routes mirror (clients gate features on /api/version).
OLLAMA_API_VERSION = "0.12.0"
CAPABILITIES = {"llm": ["completion", "tools"], "vlm": ["completion", "vision"],
                "embedding": ["embedding"]}


def now_iso() -> str:
    return rfc3339(time.time())


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


@dataclasses.dataclass
class Timings:
    """perf_counter_ns marks of one request: start, model ready, first delta, last delta."""

    start: int
    ready: int = 0
    first: int = 0
    end: int = 0

    def mark_ready(self) -> None:
        self.ready = time.perf_counter_ns()

    def mark(self) -> None:
        t = time.perf_counter_ns()
        if not self.first:
            self.first = t
        self.end = t

    def fields(self) -> dict[str, int]:
        ready = self.ready or self.start
        first = self.first or ready
        end = self.end or first
        return {"total_duration": end - self.start, "load_duration": ready - self.start,
                "prompt_eval_duration": first - ready, "eval_duration": end - first}


class Shaper:
    """One chat (`chat=True`) or generate answer, as chunks or whole."""

    def __init__(self, model: str, *, chat: bool, tools: list[dict[str, Any]] | None,
                 timings: Timings) -> None:
        self.model = model
        self.chat = chat
        self.timings = timings
        self.parser = ChoiceParser(chat=True, tools=tools)
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._logprobs: list[dict[str, Any]] = []

    def _body(self, content: str, thinking: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = content
            if thinking:
                body["thinking"] = thinking
        return body

    def _feed(self, d: Delta) -> tuple[str, str, list[dict[str, Any]]]:
        self.timings.mark()
        text, thought, calls = [], [], []
        for kind, value in self.parser.feed(d):
            if kind == "content":
                text.append(value)
            elif kind == "reasoning":
                thought.append(value)
            elif kind == "call":
                calls.append({"id": value.id, "function": {
                    "index": len(self._calls) + len(calls), "name": value.name,
                    "arguments": json.loads(value.arguments)}})
        if d.logprobs:
            self._logprobs += [_logprob(e) for e in d.logprobs]
        return "".join(text), "".join(thought), calls

    def chunk(self, d: Delta) -> bytes:
        """The NDJSON lines for one delta: its text (if any), and the final line on the last."""
        text, thought, calls = self._feed(d)
        out = b""
        if text or thought or calls or d.logprobs:
            body = self._body(text, thought, calls)
            body["done"] = False
            if d.logprobs:
                body["logprobs"] = [_logprob(e) for e in d.logprobs]
            out = line(body)
        if d.finish_reason is not None:
            out += line(self._final(self._body("", "", [])))
        return out

    def add(self, d: Delta) -> None:
        text, thought, calls = self._feed(d)
        self._content.append(text)
        self._thinking.append(thought)
        self._calls += calls

    def whole(self) -> dict[str, Any]:
        body = self._body("".join(self._content), "".join(self._thinking), self._calls)
        if self._logprobs:
            body["logprobs"] = self._logprobs
        return self._final(body)

    def _final(self, body: dict[str, Any]) -> dict[str, Any]:
        last = self.parser.last
        reason = last.finish_reason if last else "stop"
        body.update({"done": True, "done_reason": "length" if reason == "length" else "stop",
                     **self.timings.fields(),
                     "prompt_eval_count": last.prompt_tokens if last else 0,
                     "eval_count": last.completion_tokens if last else 0})
        return body


def preload_answer(model: str, *, chat: bool, unloaded: bool) -> dict[str, Any]:
    """The answer to Ollama's load/unload idiom (a request with no messages or prompt)."""
    body: dict[str, Any] = {"model": model, "created_at": now_iso()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body.update({"done": True, "done_reason": "unload" if unloaded else "load"})
    return body


def line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _logprob(e: TokenLogprob) -> dict[str, Any]:
    return {"token": e.token, "logprob": e.logprob,
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in e.top]}


# ---------------------------------------------------------------- model listings


def details(info: dict[str, Any]) -> dict[str, Any]:
    """Ollama's `details` from `model_files.describe` output (plus `parameter_count`)."""
    family = info.get("model_type") or info.get("architecture") or ""
    return {"parent_model": "", "format": info.get("format") or "",
            "family": family, "families": [family] if family else None,
            "parameter_size": _parameter_size(info.get("parameter_count")),
            "quantization_level": _quantization(info)}


def _parameter_size(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _quantization(info: dict[str, Any]) -> str:
    q = info.get("quantization")
    if isinstance(q, str):
        return q
    if isinstance(q, dict) and q.get("bits"):
        return f"Q{q['bits']}"
    dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    return dtype.get(str(info.get("dtype")), "")


def digest(path: str, size: int, mtime: float) -> str:
    """A stable id for a model's files (Ollama's is its manifest's sha256; ours hashes the
    path, size and modification time, which change whenever the files do)."""
    return hashlib.sha256(f"{path}\0{size}\0{mtime}".encode()).hexdigest()


def tag_entry(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """One /api/tags item: `info` from describe, with `path` and `mtime` (0: not on disk)."""
    size = info.get("size_bytes", 0)
    mtime = info.get("mtime", 0.0)
    return {"name": name, "model": name, "modified_at": rfc3339(mtime), "size": size,
            "digest": digest(info.get("path", ""), size, mtime), "details": details(info)}


def show_answer(kind: str, info: dict[str, Any], template: str | None,
                context_length: int | None) -> dict[str, Any]:
    """The POST /api/show answer; `model_info` holds what Ollama's GGUF keys would."""
    arch = info.get("model_type") or info.get("architecture") or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch}
    if info.get("parameter_count"):
        model_info["general.parameter_count"] = info["parameter_count"]
    if context_length:
        model_info[f"{arch}.context_length"] = context_length
    caps = list(CAPABILITIES.get(kind, []))
    if kind == "llm" and template is not None and "tools" not in template:
        caps.remove("tools")
    if template and "<think>" in template:
        caps.append("thinking")
    return {"modelfile": f"# served by mlx-gw from {info.get('path', '')}\n",
            "parameters": "", "template": template or "", "details": details(info),
            "model_info": model_info, "capabilities": caps,
            "modified_at": rfc3339(info.get("mtime", 0.0))}
