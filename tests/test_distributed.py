"""A model served by 2 ranks (mlx.distributed, ring backend, on this machine's CPU) (issue 18).

The same f32 tiny model is configured twice: `solo` (one process) and `duo` (2 ranks, tensor
parallel through mlx-lm's shard). Greedy output must be identical, batched or not; the worker
appears once in /api/ps with its ranks; a dead rank fails the in-flight request within 5 s and
the next request starts all ranks again; no rank outlives the gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import GatewayProc, assert_gone, serving, wait_for

PROMPTS = [f"tell me about the number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    path = str(tiny_dir / "tiny-1")
    config = {"gateway": {"port": 0}, "models": {
        "solo": {"type": "llm", "path": path},
        "duo": {"type": "llm", "path": path, "distributed": {"ranks": 2, "backend": "ring"}},
        "trio": {"type": "llm", "path": path, "distributed": {"ranks": 3}},  # 4 heads: no
    }}
    yield from serving(config, tmp_path_factory.mktemp("dist"))


def complete(gw: GatewayProc, model: str, prompt: str, n: int = 24) -> str:
    r = httpx.post(gw.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == n
    return r.json()["choices"][0]["text"]


def ranks_of(gw: GatewayProc, model: str) -> list[dict]:
    (entry,) = [m for m in gw.ps() if m["name"] == model]
    return entry.get("ranks", [])


def test_two_ranks_match_one_batched_or_not(gw: GatewayProc) -> None:
    alone = [complete(gw, "solo", PROMPTS[0]), complete(gw, "duo", PROMPTS[0])]
    assert alone[0] == alone[1] and alone[0]
    with ThreadPoolExecutor(8) as pool:  # 8 at once: one batch in each worker
        solo = list(pool.map(lambda t: complete(gw, "solo", t), PROMPTS))
        duo = list(pool.map(lambda t: complete(gw, "duo", t), PROMPTS))
    assert duo == solo
    assert solo[0] == alone[0]

    entries = [m for m in gw.ps() if m["name"] == "duo"]
    assert len(entries) == 1  # one logical worker...
    ranks = entries[0]["ranks"]  # ...with its two ranks, each a child of the gateway
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["pid"] == entries[0]["pid"] and len({r["pid"] for r in ranks}) == 2
    assert all(r["memory_bytes"] > 0 and r["host"] == "127.0.0.1" for r in ranks)
    assert entries[0]["memory_bytes"] == sum(r["memory_bytes"] for r in ranks)
    kids = {k.pid for k in psutil.Process(gw.pid).children()}
    assert {r["pid"] for r in ranks} <= kids
    assert "ranks" not in next(m for m in gw.ps() if m["name"] == "solo")
    for rank in (0, 1):  # each rank holds a shard, not the whole model
        shard, full = map(int, re.search(rf"\[rank {rank}/2\] holds a tensor-parallel shard: "
                                         rf"(\d+) of (\d+) parameter bytes", gw.log()).groups())
        assert shard < full
    env = {k: v for k, v in os.environ.items() if k != "MLX_GW_API_KEY"}
    ps = subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", "ps"], timeout=60,
                        env={**env, "MLX_GW_HOME": str(gw.home)}, capture_output=True, text=True)
    lines = ps.stdout.splitlines()
    assert sum(line.startswith("duo ") for line in lines) == 1, ps.stdout
    assert [line.split()[:2] for line in lines if "rank " in line] == [["rank", "0"],
                                                                        ["rank", "1"]]


def test_dead_rank_fails_in_flight_then_restarts(gw: GatewayProc) -> None:
    complete(gw, "duo", "warm", 2)
    old = ranks_of(gw, "duo")
    events: list[tuple[float, dict]] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", gw.url + "/v1/completions", timeout=60, json={
                "model": "duo", "prompt": "go", "max_tokens": 480, "temperature": 0,
                "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append((time.monotonic(), json.loads(line[6:])))
                    started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(30)
    killed_at = time.monotonic()
    psutil.Process(old[1]["pid"]).send_signal(signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    last_at, last = events[-1]
    assert "error" in last, last  # the stream ends with an error event, not a hang
    assert last_at - killed_at < 5.0
    assert_gone({r["pid"] for r in old})  # rank 0 went down with its peer

    assert complete(gw, "duo", PROMPTS[0]) == complete(gw, "solo", PROMPTS[0])  # restarted
    new = ranks_of(gw, "duo")
    assert len(new) == 2 and not {r["pid"] for r in new} & {r["pid"] for r in old}
    crashes = [e for e in httpx.get(gw.url + "/api/events").json()["events"]
               if e["type"] == "crash" and e["model"] == "duo"]
    assert crashes and "rank 1" in crashes[-1]["exit"]


def test_no_rank_outlives_the_gateway(tiny_dir: Path, tmp_path: Path) -> None:
    gw = GatewayProc({"gateway": {"port": 0}, "models": {"duo": {
        "type": "llm", "path": str(tiny_dir / "tiny-0"), "distributed": {"ranks": 2}}}},
        tmp_path / "gw")
    try:
        complete(gw, "duo", "hello", 2)
        pids = {r["pid"] for r in ranks_of(gw, "duo")}
        assert len(pids) == 2
    finally:
        gw.proc.send_signal(signal.SIGKILL)  # no drain, no stop message: the kernel's watch
        gw.proc.wait(10)
        gw._log.close()
    assert_gone(pids)
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 5, "ranks to exit")


def test_a_model_the_ranks_cannot_split_is_refused_at_load(gw: GatewayProc) -> None:
    r = httpx.post(gw.url + "/v1/completions", timeout=120,
                   json={"model": "trio", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503, r.text
    assert "splits attention heads evenly" in r.json()["error"]["message"]
    assert "trio" not in {m["name"] for m in gw.ps()}


def test_admission_counts_every_rank_process(tiny_dir: Path) -> None:
    from mlx_gw.config import parse_config
    from mlx_gw.gateway.supervision.memory import estimate_bytes

    path = str(tiny_dir / "tiny-1")
    models = parse_config({"models": {
        "solo": {"type": "llm", "path": path},
        "duo": {"type": "llm", "path": path, "distributed": {"ranks": 2}}}}).models
    baseline = 200 * 2**20
    # the shards add up to the weights; each rank is a whole process with its own baseline
    assert estimate_bytes(models["duo"], baseline) == estimate_bytes(models["solo"], baseline) \
        + baseline
