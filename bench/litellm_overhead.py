"""Issue 18: what LiteLLM's proxy adds in front of gateways, side by side in one run.

Two gateways (the tiny test model, `tests/tiny_models`: the serving path shows, not the model)
behind LiteLLM's proxy with docs/scale-out.md's config; reps alternate `direct` (clients split
between the two gateways by model, as the config's home gateways would) and `litellm` (the
same requests through the proxy). Each rep sends N non-streamed completions, C at a time, and
reports requests/s and the median latency.

    python -m bench.litellm_overhead [--requests 64] [--concurrency 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import GatewayProc
from tests.litellm_proxy import LiteLLMProxy, free_port
from tests.test_scale_out import HOME, doc_config, gateway_config
from tests.tiny_models import build_tiny_llama


def rep(send, n: int, concurrency: int) -> tuple[float, float]:
    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = send(list(HOME)[i % 2], f"request {i}")
        assert r.status_code == 200, r.text[:300]
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0), statistics.median(lat) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.litellm_overhead")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
    for i in range(2):
        build_tiny_llama(root / f"tiny-{i}", seed=i)
    build_tiny_llama(root / "tiny-long", seed=5, max_position_embeddings=16384)
    ports = [free_port(), free_port()]
    proxy = LiteLLMProxy(doc_config(ports), root / "litellm")
    gws = [GatewayProc(gateway_config(root), root / f"gw{i}", port=p) for i, p in enumerate(ports)]
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    try:
        proxy.wait_ready()

        def direct(model: str, text: str) -> httpx.Response:
            return httpx.post(gws[HOME[model]].url + "/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": text}], **body})

        def via_litellm(model: str, text: str) -> httpx.Response:
            return proxy.chat(model, text, **body)

        rep(via_litellm, 16, 4)  # loads both models at home, warms both paths
        rep(direct, 16, 4)
        out: dict[str, list[tuple[float, float]]] = {"direct": [], "litellm": []}
        for _ in range(args.reps):
            out["direct"].append(rep(direct, args.requests, args.concurrency))
            out["litellm"].append(rep(via_litellm, args.requests, args.concurrency))
        for name, runs in out.items():
            rps = statistics.median(r for r, _ in runs)
            ms = statistics.median(m for _, m in runs)
            print(f"{name:>8}: {rps:6.1f} req/s, median latency {ms:6.0f} ms  "
                  f"(reps {[(round(r, 1), round(m)) for r, m in runs]})", flush=True)
    finally:
        proxy.stop()
        for gw in gws:
            gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
