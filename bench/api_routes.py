"""Streaming throughput of /api/chat (Ollama) and /v1/responses beside /v1/chat/completions.

    python -m bench.api_routes [--streams 8] [--max-tokens 128] [--reps 3] [--model-dir DIR]

One gateway, one random-weight model at SmolLM2-135M's shapes (bench.make_model: greedy never
picks EOS, so every request runs to --max-tokens on every route). For each rep the three
routes run back to back, the order rotating, each with --streams concurrent streamed requests
of the same prompt length; a route's figure is generated tokens (from its own usage report)
over wall time. Ratios are paired by rep (route / chat.completions) and summarised by their
median, so the noise of a shared machine cancels as far as it can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.make_model import ensure_model

ROUTES = ("chat.completions", "ollama /api/chat", "responses")
PROMPT = "Tell me a long story about the sea, the wind and a small boat. " * 6
# The random-weight model has no chat template; chat routes need one (any will do).
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _with_template(model: Path, work: Path) -> Path:
    """A copy of `model` whose tokenizer carries a chat template (the weights linked)."""
    dest = work / "model"
    dest.mkdir()
    for f in model.iterdir():
        (dest / f.name).symlink_to(f.resolve())
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["chat_template"] = TEMPLATE
    cfg_path.unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg))
    return dest


async def _one(s: aiohttp.ClientSession, url: str, route: str, n: int) -> int:
    """One streamed request; returns the generated tokens its route reported."""
    msgs = [{"role": "user", "content": PROMPT}]
    if route == "chat.completions":
        body = {"model": "m", "messages": msgs, "max_tokens": n, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        path = "/v1/chat/completions"
    elif route == "responses":
        body = {"model": "m", "input": PROMPT, "max_output_tokens": n, "temperature": 0,
                "stream": True}
        path = "/v1/responses"
    else:
        body = {"model": "m", "messages": msgs, "stream": True,
                "options": {"num_predict": n, "temperature": 0}}
        path = "/api/chat"
    tokens = 0
    async with s.post(url + path, json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                line = line[6:]
            if not line.startswith("{"):
                continue
            obj = json.loads(line)
            if route == "chat.completions" and obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif route == "responses" and obj.get("type") in ("response.completed",
                                                             "response.incomplete"):
                tokens = obj["response"]["usage"]["output_tokens"]
            elif route.startswith("ollama") and obj.get("done"):
                tokens = obj["eval_count"]
    return tokens


async def _level(url: str, route: str, streams: int, n: int) -> float:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(_one(s, url, route, n) for _ in range(streams)))
        wall = time.perf_counter() - t0
    if min(counts) < n:
        raise RuntimeError(f"{route}: a request ended short of {n} tokens: {counts}")
    return sum(counts) / wall


async def _wait_up(url: str, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError("the gateway exited while starting")
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the gateway did not come up")


async def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="mlxgw-routes-"))
    model = _with_template(ensure_model(args.model_dir) if args.model_dir else ensure_model(),
                           work)
    port = args.port
    (work / "models.yaml").write_text(json.dumps({
        "gateway": {"port": port, "warm_spare": False},
        "models": {"m": {"type": "llm", "path": str(model), "max_batch": args.streams,
                         "prompt_cache": {"max_bytes": 0}}}}))
    env = {**os.environ, "MLX_GW_HOME": str(work / "home")}
    log = open(work / "gateway.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gw.gateway.cli", "start",
                             "--foreground", "--config", str(work / "models.yaml")],
                            env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_up(url, proc)
        await _level(url, "chat.completions", args.streams, 8)  # load and warm up
        table: dict[str, list[float]] = {r: [] for r in ROUTES}
        for rep in range(args.reps):
            order = ROUTES[rep % 3:] + ROUTES[:rep % 3]
            for route in order:
                table[route].append(await _level(url, route, args.streams, args.max_tokens))
            print(f"rep {rep}: " + ", ".join(f"{r} {table[r][-1]:.1f} tok/s" for r in ROUTES),
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    base = table["chat.completions"]
    ratios = {r: [a / b for a, b in zip(table[r], base, strict=True)] for r in ROUTES[1:]}
    return {"streams": args.streams, "max_tokens": args.max_tokens, "reps": args.reps,
            "tok_s": table, "ratios": ratios,
            "median_ratio": {r: statistics.median(v) for r, v in ratios.items()},
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.api_routes", description=__doc__)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--port", type=int, default=18123)
    result = asyncio.run(run(ap.parse_args(argv)))
    print(json.dumps(result))
    print("\n| route | tok/s per rep | median ratio to chat.completions |\n|---|---|---:|")
    for r in ROUTES:
        ratio = result["median_ratio"].get(r, 1.0)  # type: ignore[union-attr]
        reps = ", ".join(f"{x:.1f}" for x in result["tok_s"][r])  # type: ignore[index]
        print(f"| {r} | {reps} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
