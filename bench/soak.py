"""Issue 19: soak. `--requests` requests of mixed kinds (OpenAI chat streamed and not, OpenAI
completions streamed and not, Anthropic messages streamed and not, embeddings when
mlx-embeddings is installed) from `--clients` closed-loop clients, over more tiny models than
`max_loaded_models` holds, so models swap in and out all run long.

The first `--warmup` requests (same mix) grow the gateway's caches and are not measured. Then,
and again at the end, every model is unloaded and the gateway's idle state is read: its RSS,
its open file descriptors by kind (sockets, among them the ZeroMQ ipc ones, anonymous inodes,
pipes, files) and its worker processes. Reported: requests by kind, failed (must be 0), RSS
drift, and every fd or worker the run leaked.

    python -m bench.soak --requests 2000 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.gateway_vs_inprocess import OUT_DIR
from bench.gwtools import ConfigGateway, load1
from bench.machine import machine, revision

LLMS = ("soak-a", "soak-b", "soak-c", "soak-d")
EMBEDDER = "soak-emb"
MAX_TOKENS = 4
KINDS = ("chat", "chat_stream", "completion", "completion_stream", "messages",
         "messages_stream", "embeddings")


def _models() -> tuple[list[Path], Path | None]:
    from tests.tiny_models import build_tiny_llama

    root = OUT_DIR / "tiny-soak"
    paths = [root / f"tiny-{i}" for i in range(len(LLMS))]
    for i, p in enumerate(paths):
        if not (p / "config.json").is_file():
            build_tiny_llama(p, seed=i)
    try:
        import mlx_embeddings  # noqa: F401
    except ImportError:
        return paths, None
    from tests.tiny_kinds import build_tiny_bert

    emb = root / "bert"
    if not (emb / "config.json").is_file():
        build_tiny_bert(emb)
    return paths, emb


def _config(paths: list[Path], emb: Path | None, max_loaded: int) -> str:
    models = "".join(f"  {n}: {{type: llm, path: {p}}}\n" for n, p in zip(LLMS, paths,
                                                                          strict=True))
    if emb is not None:
        models += f"  {EMBEDDER}: {{type: embedding, path: {emb}}}\n"
    return (f"gateway: {{port: 0, max_loaded_models: {max_loaded}, default_keep_alive: -1}}\n"
            f"models:\n{models}")


def _plan(n: int, seed: int, embeddings: bool, block: int, stray: float
          ) -> list[tuple[str, str]]:
    """(kind, model) for each request: two 'hot' models at a time, the pair moving on every
    `block` requests (so models churn through the resident slots), a `stray` share to any."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS if embeddings or k != "embeddings"]
    out = []
    for i in range(n):
        kind = rng.choice(kinds)
        if kind == "embeddings":
            out.append((kind, EMBEDDER))
            continue
        hot = (i // block) % len(LLMS)
        pick = rng.choice(LLMS) if rng.random() < stray else LLMS[(hot + rng.randrange(2))
                                                                % len(LLMS)]
        out.append((kind, pick))
    return out


def _request(kind: str, model: str, i: int) -> tuple[str, dict[str, Any]]:
    text = f"soak request {i}: say something"
    stream = kind.endswith("_stream")
    if kind.startswith("chat"):
        return "/v1/chat/completions", {"model": model, "stream": stream, "max_tokens": MAX_TOKENS,
                                        "messages": [{"role": "user", "content": text}]}
    if kind.startswith("completion"):
        return "/v1/completions", {"model": model, "stream": stream, "max_tokens": MAX_TOKENS,
                                   "prompt": text}
    if kind.startswith("messages"):
        return "/v1/messages", {"model": model, "stream": stream, "max_tokens": MAX_TOKENS,
                                "messages": [{"role": "user", "content": text}]}
    return "/v1/embeddings", {"model": model, "input": [text, "another"]}


async def _one(session: aiohttp.ClientSession, url: str, kind: str, model: str, i: int
               ) -> str:
    """Send one request; '' when it succeeded in full, else why not."""
    path, body = _request(kind, model, i)
    try:
        async with session.post(url + path, json=body) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as e:
        return f"{kind} {model}: {type(e).__name__}: {e}"
    if resp.status != 200:
        return f"{kind} {model}: HTTP {resp.status} {text[:200]}"
    if not body.get("stream"):
        data = json.loads(text)
        ok = ("choices" in data or "content" in data or "data" in data) and "error" not in data
        return "" if ok else f"{kind} {model}: {text[:200]}"
    events = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    if any("error" in e and e.get("type") != "content_block_delta" for e in events):
        return f"{kind} {model}: error event {text[-200:]}"
    end = "event: message_stop" if kind.startswith("messages") else "data: [DONE]"
    return "" if end in text else f"{kind} {model}: stream ended early {text[-200:]}"


async def _drive(gw: ConfigGateway, plan: list[tuple[str, str]], clients: int, offset: int
                 ) -> tuple[collections.Counter[str], list[str]]:
    done: collections.Counter[str] = collections.Counter()
    failed: list[str] = []
    todo = iter(enumerate(plan, offset))

    async def client() -> None:
        for i, (kind, model) in todo:
            why = await _one(gw.session, gw.url, kind, model, i)
            done[kind] += 1
            if why:
                failed.append(why)

    await asyncio.gather(*(client() for _ in range(clients)))
    return done, failed


def _fds(pid: int) -> collections.Counter[str]:
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":")[0] if ":" in target else "file"] += 1
    return kinds


async def _idle_state(gw: ConfigGateway) -> dict[str, Any]:
    """Unload every model, then read the gateway's RSS, fds and workers (the warm spare is
    one worker process that serves nothing)."""
    for name in await gw.loaded():
        await gw.unload(name)
    deadline = time.monotonic() + 60
    proc = psutil.Process(gw.proc.pid)
    while await gw.loaded() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await gw.wait_spare()  # the spare respawns after a load took it
    kids = proc.children(recursive=True)
    return {"rss": proc.memory_info().rss, "fds": _fds(proc.pid),
            "workers": len(kids), "loaded": await gw.loaded()}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    paths, emb = _models()
    if args.no_embeddings:
        emb = None
    plan = _plan(args.warmup + args.requests, args.seed, emb is not None, args.block,
                 args.stray)
    log = OUT_DIR / "soak-gateway.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    async with ConfigGateway.launch(_config(paths, emb, args.max_loaded), log) as gw:
        t0 = time.monotonic()
        _, warm_failed = await _drive(gw, plan[:args.warmup], args.clients, 0)
        before = await _idle_state(gw)
        t1 = time.monotonic()
        done, failed = await _drive(gw, plan[args.warmup:], args.clients, args.warmup)
        took = time.monotonic() - t1
        after = await _idle_state(gw)
        events = await gw.events()
        res = {
            "requests": sum(done.values()), "by_kind": dict(sorted(done.items())),
            "failed": failed, "warmup": args.warmup, "warmup_failed": warm_failed,
            "seconds": round(took, 1), "warmup_seconds": round(t1 - t0, 1),
            "clients": args.clients, "models": len(LLMS) + (emb is not None),
            "max_loaded_models": args.max_loaded,
            "loads": sum(e["type"] == "load" for e in events),
            "evictions": sum(e["type"] == "evict" for e in events),
            "crashes": sum(e["type"] == "crash" for e in events),
            "rss_before_mib": round(before["rss"] / 2**20, 1),
            "rss_after_mib": round(after["rss"] / 2**20, 1),
            "rss_drift_mib": round((after["rss"] - before["rss"]) / 2**20, 1),
            "fds_before": dict(before["fds"]), "fds_after": dict(after["fds"]),
            "fds_leaked": {k: after["fds"][k] - before["fds"].get(k, 0) for k in after["fds"]
                           if after["fds"][k] > before["fds"].get(k, 0)},
            "workers_before": before["workers"], "workers_after": after["workers"],
            "loaded_after": after["loaded"],
            "machine": machine(), "revision": revision(), "load1_end": round(load1(), 2),
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    return res


def verdict(res: dict[str, Any]) -> list[str]:
    """What the soak failed on ([] when nothing)."""
    bad = []
    if res["failed"]:
        bad.append(f"{len(res['failed'])} failed requests")
    if res["rss_drift_mib"] > 10:
        bad.append(f"gateway RSS drift {res['rss_drift_mib']} MiB > 10")
    if res["fds_leaked"]:
        bad.append(f"leaked fds {res['fds_leaked']}")
    if res["workers_after"] > res["workers_before"]:
        bad.append(f"leaked workers ({res['workers_before']} -> {res['workers_after']})")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=None, help="default: 10%% (at least 50)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-loaded", type=int, default=3, help="of 5 models (4 without embeddings)")
    ap.add_argument("--stray", type=float, default=0.02,
                    help="share of requests to a model outside the hot pair")
    ap.add_argument("--block", type=int, default=250, help="requests before the hot pair moves")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--no-embeddings", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.warmup is None:
        args.warmup = max(50, args.requests // 10)
    res = asyncio.run(soak(args))
    for why in res["failed"][:20]:
        print("FAILED", why)
    shown = {k: v for k, v in res.items() if k not in ("failed", "warmup_failed", "machine")}
    shown["failed"] = len(res["failed"])
    shown["warmup_failed"] = len(res["warmup_failed"])
    print(json.dumps(shown, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    bad = verdict(res)
    print("soak:", "; ".join(bad) if bad else "passed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
