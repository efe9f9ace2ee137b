"""The first request after a model loads (issue 20): what a user waits for on a fresh GPU.

Starts a gateway serving one model with models.yaml `warmup: MODE`, then twice (a fresh
worker, then after `/api/unload`, i.e. a worker restart on the same machine):
  * POST /api/load, polling /api/ps every 50 ms meanwhile: the load's duration and the
    states seen (`starting`, `warming`, `ready`) with when each was first seen;
  * one streamed completion (128-token prompt, 16 new tokens): its TTFT and total, then a
    second one the same way (the steady state).
`--ptx-cache DIR` sets MLX_PTX_CACHE_DIR for the gateway; a new empty directory there is a
fresh machine as far as MLX's compiled CUDA kernels go (the default cache lives in /tmp).

    python -m bench.first_request --model-dir /root/m1b --warmup auto --max-batch 128 \
        --ptx-cache "$(mktemp -d)" --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from bench.client import sse_events
from bench.gwtools import ConfigGateway
from bench.machine import machine, revision
from bench.make_model import prompt_ids

MODEL = "bench"


async def _load(gw: ConfigGateway) -> dict[str, Any]:
    """POST /api/load while polling /api/ps; the states seen, first seen at (s)."""
    seen: dict[str, float] = {}
    t0 = time.perf_counter()

    async def poll() -> None:
        while True:
            with contextlib.suppress(Exception):
                for m in await gw.ps_all():
                    if m["name"] == MODEL:
                        seen.setdefault(m["state"], round(time.perf_counter() - t0, 3))
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    try:
        async with gw.session.post(gw.url + "/api/load", json={"model": MODEL}) as resp:
            body = await resp.text()
            status = resp.status
    finally:
        poller.cancel()
    return {"load_s": round(time.perf_counter() - t0, 3), "http": status,
            "states": seen, **({"error": body[:500]} if status != 200 else {})}


async def _complete(gw: ConfigGateway, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, text = -1.0, 0
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    async with gw.session.post(gw.url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {(await resp.text())[:300]}"}
        async for chunk in sse_events(resp):
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    text += 1
                    if ttft < 0:
                        ttft = time.perf_counter() - t0
    return {"ttft_s": round(ttft, 4), "total_s": round(time.perf_counter() - t0, 4),
            "chunks": text}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model_dir.resolve()
    env = {"MLX_PTX_CACHE_DIR": str(args.ptx_cache)} if args.ptx_cache else {}
    config = ("gateway: {port: 0}\n"
              f"models:\n  {MODEL}: {{type: llm, path: {model}, max_batch: {args.max_batch}, "
              f"keep_alive: -1, warmup: {args.warmup}}}\n")
    prompt = prompt_ids(model, 128)
    out: dict[str, Any] = {"command": args.command, "revision": revision(),
                           "machine": machine(), "warmup": args.warmup,
                           "max_batch": args.max_batch, "ptx_cache": str(args.ptx_cache or ""),
                           "rounds": []}
    async with ConfigGateway.launch(config, args.log, env) as gw:
        for label in ("fresh worker", "after a worker restart"):
            r: dict[str, Any] = {"round": label, **await _load(gw)}
            r["first"] = await _complete(gw, prompt, args.max_tokens)
            r["second"] = await _complete(gw, prompt, args.max_tokens)
            out["rounds"].append(r)
            print(json.dumps(r), flush=True)
            await gw.unload(MODEL)
        out["events"] = [e for e in await gw.events()
                         if e["type"] in ("load", "warming", "ready", "unload")]
    return out


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--warmup", default="auto", choices=("auto", "off", "minimal", "full"))
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ptx-cache", type=Path, default=None,
                    help="MLX_PTX_CACHE_DIR for the gateway (a new empty dir: fresh kernels)")
    ap.add_argument("--log", type=Path, default=Path("first_request_gateway.log"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.command = " ".join(["python -m bench.first_request", *sys.argv[1:]])
    res = asyncio.run(run(args))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
