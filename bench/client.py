"""One streamed OpenAI `/v1/completions` request (or `/v1/chat/completions` when the body has
`messages`), timed: the load generator's only client.

Per request it records the time to the first token (the first chunk with text), the gaps
between later chunks with text (inter-token latency: every server measured here sends one token
per chunk), the end-to-end time and the token counts. Counts come from the final usage chunk
(`stream_options.include_usage`) where the server sends one, else from the chunks with text.
Errors (HTTP status, an `error` event in the stream, a dropped connection, a timeout) are
recorded in `Record.error`, never raised: a run always finishes and counts them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["Record", "complete", "sse_events"]


@dataclass
class Record:
    """One request as the client saw it (times in seconds)."""

    target: str
    scenario: str  # "closed", "open" or "mix"
    level: float  # concurrent streams (closed, mix) or requests/s (open)
    rep: int
    model: str
    start_s: float  # from the start of its run
    ttft_s: float = -1.0
    e2e_s: float = -1.0
    prompt_tokens: int = -1
    completion_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    turn: int = -1  # the agent scenario: the turn of its conversation (0-based)
    cached_tokens: int = -1  # usage.prompt_tokens_details.cached_tokens, where reported

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (NaN with fewer than two tokens)."""
        if self.completion_tokens < 2 or self.ttft_s < 0:
            return float("nan")
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an OpenAI-style SSE stream, up to `[DONE]` (comments and other
    lines skipped)."""
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


async def complete(session: aiohttp.ClientSession, base_url: str, rec: Record,
                   body: dict[str, Any], t0: float, text: list[str] | None = None) -> Record:
    """POST `body` (a streaming completion) to `base_url`/completions (or /chat/completions)
    and fill in `rec`. `t0` is the run's start (perf_counter) `rec.start_s` is measured from.
    The generated text's pieces are appended to `text` when one is given (the agent scenario
    sends each answer back as the next turn's history)."""
    chat = "messages" in body
    start = time.perf_counter()
    rec.start_s = start - t0
    last = start
    chunks = 0
    try:
        path = "/chat/completions" if chat else "/completions"
        async with session.post(base_url + path, json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            async for chunk in sse_events(resp):
                if "error" in chunk:
                    rec.error = f"stream error: {str(chunk['error'])[:200]}"
                    break
                usage = chunk.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens", -1)
                    rec.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    rec.cached_tokens = details.get("cached_tokens", -1)
                choices = chunk.get("choices") or ()
                pieces = [(c.get("delta") or {}).get("content") if chat else c.get("text")
                          for c in choices]
                if text is not None:
                    text += [p for p in pieces if p]
                if any(pieces):
                    now = time.perf_counter()
                    if chunks == 0:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                    chunks += 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:200]
    rec.e2e_s = time.perf_counter() - start
    if not rec.completion_tokens:
        rec.completion_tokens = chunks
    if not rec.error and chunks == 0:
        rec.error = "no tokens"
    return rec
