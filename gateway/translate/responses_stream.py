"""One Responses API response: its output items and its semantic stream events.

The choice's events from `ChoiceParser` (thought, answer text, complete tool calls) become
output items in arrival order: `reasoning` (with `reasoning_text` content), `message` (with
`output_text`) and `function_call` (`call_id`, `name`, `arguments` as a JSON string). Each
item is announced, streamed and closed as OpenAI streams it (`response.output_item.added`,
`response.content_part.added`, `…delta`, `…done`, `response.content_part.done`,
`response.output_item.done`), between `response.created` / `response.in_progress` and one
terminal event: `response.completed`, `response.incomplete` (the token limit was reached) or
`response.failed` (with `response.error.code`). Events are plain dicts with their
`sequence_number`; the route encodes them. Pure: no aiohttp, no supervisor.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from mlx_gw.gateway.translate.chat_stream import ChoiceParser
from mlx_gw.gateway.translate.responses import ResponsesRequest
from mlx_gw.gateway.translate.tool_calls import ToolCall
from mlx_gw.worker.protocol import Delta

Event = dict[str, Any]
_PART = {"reasoning": "reasoning_text", "content": "output_text"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class ResponseBuilder:
    """Feed the choice's deltas; get the stream's events and, at the end, the Response."""

    def __init__(self, req: ResponsesRequest, model: str, parser: ChoiceParser) -> None:
        self.req = req
        self.model = model
        self.parser = parser
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.status = "in_progress"
        self.error: dict[str, str] | None = None
        self.items: list[dict[str, Any]] = []
        self._open: str | None = None  # "reasoning" | "content": the item being streamed
        self._text: list[str] = []
        self._seq = 0

    # ------------------------------------------------------------------ the Response object

    def response(self) -> dict[str, Any]:
        req, last = self.req, self.parser.last
        usage = None
        if last is not None:
            usage = {"input_tokens": last.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": self.parser.cached_tokens},
                     "output_tokens": last.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": last.prompt_tokens + last.completion_tokens}
        fmt = req.text.format if req.text is not None and req.text.format else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "background": False, "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if self.status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model, "output": list(self.items),
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None, **(req.reasoning or {})},
            "store": req.store, "temperature": 1.0 if req.temperature is None
            else req.temperature, "text": {"format": fmt},
            "tool_choice": req.tool_choice or "auto", "tools": list(req.tools or []),
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }

    def output_messages(self) -> list[dict[str, Any]]:
        """The output as chat messages, for the history of a later turn (thoughts are not
        replayed, as in the input)."""
        out: list[dict[str, Any]] = []
        for item in self.items:
            if item["type"] == "message":
                text = "".join(p["text"] for p in item["content"])
                out.append({"role": "assistant", "content": text})
            elif item["type"] == "function_call":
                if not out or out[-1]["role"] != "assistant":
                    out.append({"role": "assistant", "content": ""})
                out[-1].setdefault("tool_calls", []).append({
                    "id": item["call_id"], "type": "function", "function": {
                        "name": item["name"], "arguments": json.loads(item["arguments"])}})
        return out

    # ------------------------------------------------------------------ events

    def _event(self, kind: str, **body: Any) -> Event:
        event = {"type": kind, "sequence_number": self._seq, **body}
        self._seq += 1
        return event

    def start(self) -> list[Event]:
        """The first two events, sent once the request is accepted (or while it waits)."""
        snapshot = self.response()
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def feed(self, d: Delta) -> list[Event]:
        events: list[Event] = []
        for kind, value in self.parser.feed(d):
            if kind == "call":
                self._close(events)
                self._call(value, events)
                continue
            if kind != self._open:
                self._close(events)
                self._begin(kind, events)
            self._text.append(value)
            item = self.items[-1]
            delta = "response.reasoning_text.delta" if kind == "reasoning" \
                else "response.output_text.delta"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            events.append(self._event(delta, item_id=item["id"], output_index=len(self.items) - 1,
                                      content_index=0, delta=value, **extra))
        if d.finish_reason is not None:
            self.status = "incomplete" if d.finish_reason == "length" else "completed"
            self._close(events)
            terminal = "response.incomplete" if self.status == "incomplete" \
                else "response.completed"
            events.append(self._event(terminal, response=self.response()))
        return events

    def failed(self, code: str, message: str) -> Event:
        """The terminal event of a response that could not finish."""
        if self._open is not None:
            self.items[-1]["status"] = "incomplete"
            self._open = None
        self.status = "failed"
        self.error = {"code": code, "message": message}
        return self._event("response.failed", response=self.response())

    def _begin(self, kind: str, events: list[Event]) -> None:
        if kind == "reasoning":
            item: dict[str, Any] = {"id": new_id("rs"), "type": "reasoning", "summary": [],
                                    "content": [], "status": "in_progress"}
        else:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}
        index = len(self.items)
        self.items.append(item)
        self._open = kind
        self._text = []
        events.append(self._event("response.output_item.added", output_index=index,
                                  item={**item, "content": []}))
        events.append(self._event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0,
                                  part=self._part(kind, "")))

    @staticmethod
    def _part(kind: str, text: str) -> dict[str, Any]:
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _close(self, events: list[Event]) -> None:
        """Close the streamed item, if one is open."""
        kind, self._open = self._open, None
        if kind is None:
            return
        item, index = self.items[-1], len(self.items) - 1
        text = "".join(self._text)
        part = self._part(kind, text)
        item["content"] = [part]
        item["status"] = "incomplete" if self.status == "incomplete" else "completed"
        done = "response.reasoning_text.done" if kind == "reasoning" \
            else "response.output_text.done"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        events.append(self._event(done, item_id=item["id"], output_index=index,
                                  content_index=0, text=text, **extra))
        events.append(self._event("response.content_part.done", item_id=item["id"],
                                  output_index=index, content_index=0, part=dict(part)))
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=dict(item)))

    def _call(self, call: ToolCall, events: list[Event]) -> None:
        item = {"id": new_id("fc"), "type": "function_call", "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": "completed"}
        index = len(self.items)
        self.items.append(item)
        events.append(self._event("response.output_item.added", output_index=index,
                                  item={**item, "arguments": "", "status": "in_progress"}))
        events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=index, delta=call.arguments))
        events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                  output_index=index, name=call.name,
                                  arguments=call.arguments))
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=dict(item)))
