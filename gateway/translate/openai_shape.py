"""OpenAI response objects for one request: whole bodies and SSE chunks, for every choice.

Each choice's deltas go through a `ChoiceParser` (thought, answer, tool calls, logprobs); this
module only decides how OpenAI spells them: `message.reasoning_content` / `delta.
reasoning_content`, `tool_calls` (streamed as OpenAI streams them: a first chunk with the
call's index, id and name and empty arguments, then argument deltas), `finish_reason:
"tool_calls"`, and `usage` summed over the choices (the prompt counted once).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from mlx_gw.gateway.translate.chat_stream import ChoiceParser, openai_logprobs, ran_out_of_time
from mlx_gw.gateway.translate.tool_calls import ToolCall
from mlx_gw.worker.protocol import Delta

_json = msgspec.json.Encoder()


class Shaper:
    def __init__(self, model: str, chat: bool, *, tools: list[dict[str, Any]] | None = None,
                 n: int = 1) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.parsers = [ChoiceParser(chat=chat, tools=tools) for _ in range(n)]
        self._content: list[list[str]] = [[] for _ in range(n)]
        self._reasoning: list[list[str]] = [[] for _ in range(n)]
        self._open = n  # choices not finished yet

    @property
    def done(self) -> bool:
        return self._open == 0

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self) -> dict[str, Any]:
        lasts = [p.last for p in self.parsers if p.last is not None]
        prompt = max((d.prompt_tokens for d in lasts), default=0)
        completion = sum(d.completion_tokens for d in lasts)
        cached = max((p.cached_tokens for p in self.parsers), default=0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _feed(self, i: int, d: Delta) -> list[tuple[str, Any]]:
        events = self.parsers[i].feed(d)
        if d.finish_reason is not None:
            self._open -= 1
        return events

    # ------------------------------------------------------------------ one JSON body

    def add(self, i: int, d: Delta) -> None:
        for kind, value in self._feed(i, d):
            if kind == "content":
                self._content[i].append(value)
            elif kind == "reasoning":
                self._reasoning[i].append(value)

    def cut(self) -> None:
        """End every unfinished choice as cut by max_tokens (the request ran out of time)."""
        for i, p in enumerate(self.parsers):
            if p.last is None or p.last.finish_reason is None:
                self.add(i, ran_out_of_time(p.last))

    def full(self) -> dict[str, Any]:
        choices = []
        for i, p in enumerate(self.parsers):
            text = "".join(self._content[i])
            logprobs = openai_logprobs(p.logprobs, self.chat) if p.logprobs else None
            if not self.chat:
                choices.append({"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": p.finish_reason})
                continue
            message: dict[str, Any] = {"role": "assistant",
                                       "content": None if p.calls and not text else text}
            if self._reasoning[i]:
                message["reasoning_content"] = "".join(self._reasoning[i])
            if p.calls:
                message["tool_calls"] = [c.openai() for c in p.calls]
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": p.finish_reason})
        body = self._base("chat.completion" if self.chat else "text_completion")
        body["choices"] = choices
        body["usage"] = self.usage()
        return body

    # ------------------------------------------------------------------ SSE chunks

    def _chunk(self, i: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: dict[str, Any] | None = None) -> bytes:
        if self.chat:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": i, "text": delta.get("content", ""), "logprobs": logprobs,
                      "finish_reason": finish}
            body = self._base("text_completion")
        body["choices"] = [choice]
        return b"data: " + _json.encode(body) + b"\n\n"

    def start_chunks(self) -> bytes:
        if not self.chat:
            return b""
        return b"".join(self._chunk(i, {"role": "assistant", "content": ""})
                        for i in range(len(self.parsers)))

    def chunks(self, i: int, d: Delta) -> bytes:
        """The SSE chunks for one delta of choice `i` (its final chunk included)."""
        p = self.parsers[i]
        calls_before = len(p.calls)
        events = self._feed(i, d)
        out: list[bytes] = []
        text: list[str] = []
        for kind, value in events:
            if kind == "content":
                text.append(value)
            elif kind == "reasoning":
                out.append(self._chunk(i, {"reasoning_content": value}))
            elif kind == "call":
                out += self._call_chunks(i, calls_before, value)
                calls_before += 1
        logprobs = openai_logprobs(d.logprobs, self.chat) if d.logprobs else None
        if text or logprobs:
            out.append(self._chunk(i, {"content": "".join(text)}, logprobs=logprobs))
        if d.finish_reason is not None:
            out.append(self._chunk(i, {}, p.finish_reason))
        return b"".join(out)

    def _call_chunks(self, i: int, index: int, call: ToolCall) -> list[bytes]:
        head = {"index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        args = {"index": index, "function": {"arguments": call.arguments}}
        return [self._chunk(i, {"tool_calls": [head]}), self._chunk(i, {"tool_calls": [args]})]

    def usage_chunk(self) -> bytes:
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = self.usage()
        return b"data: " + _json.encode(body) + b"\n\n"
