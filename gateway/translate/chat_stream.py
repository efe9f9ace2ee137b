"""From worker deltas to parsed chat events, for one or several choices of one request.

`merged` runs the request's choices (`n` > 1 sends one Generate per choice; they share the
worker's batch) and yields `(index, Delta)` in arrival order. `ChoiceParser` turns one choice's
deltas into events: thought (`reasoning`), answer text (`content`) and complete tool calls
(`call`), using the parse facts the worker sends on the first delta (tool-call format, thinking
markers). The OpenAI and Anthropic routes shape these events in their own wire formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from mlx_gw.gateway.translate.reasoning import ReasoningSplitter
from mlx_gw.gateway.translate.tool_calls import Event, ToolCall, ToolCallParser, new_call_id
from mlx_gw.worker.protocol import Delta, Generate, TokenLogprob


async def merged(handle: Any, gens: list[Generate], *, deadline: float | None = None,
                 **stream_kw: Any) -> AsyncIterator[tuple[int, Delta]]:
    """Yields every choice's deltas as `(choice index, delta)` until each has finished.
    Leaving early (or an error in any choice) cancels the others. One deadline covers all
    choices (None: the handle's request_timeout from now)."""
    if deadline is None:
        deadline = time.monotonic() + handle.request_timeout_s
    if len(gens) == 1:
        async with contextlib.aclosing(handle.stream(gens[0], deadline=deadline,
                                                     **stream_kw)) as deltas:
            async for d in deltas:
                yield 0, d
        return
    q: asyncio.Queue[tuple[int, Delta | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: Generate) -> None:
        try:
            async with contextlib.aclosing(handle.stream(gen, deadline=deadline,
                                                         **stream_kw)) as deltas:
                async for d in deltas:
                    q.put_nowait((i, d, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced to the consumer, which cancels the rest
            q.put_nowait((i, None, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        running = len(gens)
        while running:
            i, d, err = await q.get()
            if err is not None:
                raise err
            assert d is not None
            yield i, d
            if d.finish_reason is not None:
                running -= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def ran_out_of_time(last: Delta | None) -> Delta:
    """The last delta of a choice whose request hit its deadline (request_timeout) before the
    worker finished it: what was generated stands, cut as by max_tokens."""
    return Delta(rid=last.rid if last else 0, finish_reason="length",
                 completion_tokens=last.completion_tokens if last else 0,
                 prompt_tokens=last.prompt_tokens if last else 0)


class ChoiceParser:
    """One choice's deltas -> events. `reasoning` and tool parsing apply to chat only."""

    def __init__(self, *, chat: bool, tools: list[dict[str, Any]] | None,
                 new_id: Callable[[], str] = new_call_id) -> None:
        self.chat = chat
        self.tools = tools
        self.new_id = new_id
        self._split: ReasoningSplitter | None = None
        self._calls: ToolCallParser | None = None
        self._started = False
        self.calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] = []
        self.last: Delta | None = None
        self.cached_tokens = 0  # prompt tokens the worker took from its prompt cache

    def feed(self, d: Delta) -> list[Event]:
        if not self._started:
            self._started = True
            self.cached_tokens = d.cached_tokens
            if self.chat and len(d.reasoning) == 2:
                self._split = ReasoningSplitter(*d.reasoning, thinking=d.thinking)
            if self.chat and d.tool_parser and self.tools:
                self._calls = ToolCallParser(d.tool_parser, self.tools, self.new_id)
        self.last = d
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        events: list[Event] = []
        self._text(d.text, events)
        if d.finish_reason is not None:
            if self._split is not None:
                thought, answer = self._split.flush()
                if thought:
                    events.append(("reasoning", thought))
                self._answer(answer, events)
            if self._calls is not None:
                events += self._calls.finish()
        self.calls += [e[1] for e in events if e[0] == "call"]
        return events

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._split is None:
            self._answer(text, events)
            return
        thought, answer = self._split.feed(text)
        if thought:
            events.append(("reasoning", thought))
        self._answer(answer, events)

    def _answer(self, text: str, events: list[Event]) -> None:
        if self._calls is None:
            if text:
                events.append(("content", text))
        else:
            events += self._calls.feed(text)

    @property
    def finish_reason(self) -> str | None:
        reason = self.last.finish_reason if self.last else None
        return "tool_calls" if self.calls and reason == "stop" else reason


def openai_logprobs(entries: list[TokenLogprob], chat: bool) -> dict[str, Any] | None:
    """OpenAI's `logprobs` object for these tokens (chat shape, or the legacy completions one)."""
    if chat:
        return {"content": [
            {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                              for t, lp in e.top]}
            for e in entries]}
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries],
            "text_offset": []}
