"""GET /metrics and the lifecycle events, through real gateways and workers.

A mixed workload (chat and completions, streamed or not, concurrent, plus refusals) must add
up in the counters and histograms; the gauges must show a request in flight and one queued
behind it; a load/evict/crash/restart/unload sequence must appear in order in /api/events, in
its SSE follow stream, in `mlx-gw events` (and -f), and in the lifecycle counters.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayProc, wait_for

MSG = [{"role": "user", "content": "hello there"}]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(gw: GatewayProc, headers: dict[str, str] | None = None) -> Samples:
    r = httpx.get(gw.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def client(gw: GatewayProc, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_counters_add_up_after_a_mixed_workload(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"models": {
        "a": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
        "b": {"type": "llm", "path": str(tiny_dir / "tiny-1")},
    }})
    c = client(gw)
    usage: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}  # (prompt, completion)

    def chat(n: int) -> None:
        r = c.chat.completions.create(model="a", messages=MSG, max_tokens=n)
        usage["a"].append((r.usage.prompt_tokens, r.usage.completion_tokens))

    with cf.ThreadPoolExecutor(4) as pool:  # concurrent, so they share decode steps
        list(pool.map(chat, [3, 4, 5, 6]))
    for n in (7, 8):
        chunks = list(c.chat.completions.create(model="a", messages=MSG, max_tokens=n,
                                                stream=True,
                                                stream_options={"include_usage": True}))
        u = chunks[-1].usage
        usage["a"].append((u.prompt_tokens, u.completion_tokens))
    r = c.completions.create(model="b", prompt="once upon a time", max_tokens=5)
    usage["b"].append((r.usage.prompt_tokens, r.usage.completion_tokens))
    chunks = list(c.completions.create(model="b", prompt="the gateway", max_tokens=9,
                                       stream=True, stream_options={"include_usage": True}))
    usage["b"].append((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens))
    refused = [
        httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                   json={"model": "nope", "messages": MSG}),
        httpx.post(gw.url + "/v1/chat/completions", timeout=30,  # longer than the context
                   json={"model": "a", "messages": MSG, "max_tokens": 100000}),
        httpx.post(gw.url + "/v1/completions", timeout=30, json={"model": "b"}),  # no prompt
    ]
    assert [r.status_code for r in refused] == [404, 400, 400]

    m = scrape(gw)
    req = "mlxgw_requests_total"
    assert val(m, req, model="a", route="/v1/chat/completions", status="200") == 6
    assert val(m, req, model="b", route="/v1/completions", status="200") == 2
    assert val(m, req, model="", route="/v1/chat/completions", status="404") == 1
    assert val(m, req, model="a", route="/v1/chat/completions", status="400") == 1
    assert val(m, req, model="", route="/v1/completions", status="400") == 1
    sent = {k: v for k, v in m.items() if k[0] == req and dict(k[1])["route"].startswith("/v1")}
    assert sum(sent.values()) == 11
    for name, rows in usage.items():
        assert len(rows) in (6, 2)
        prompt = sum(p for p, _ in rows)
        completion = sum(n for _, n in rows)
        assert val(m, "mlxgw_tokens_total", model=name, direction="in") == prompt
        assert val(m, "mlxgw_tokens_total", model=name, direction="out") == completion
        assert val(m, "mlxgw_time_to_first_token_seconds_count", model=name) == len(rows)
        # One inter-token gap per generated token after the first.
        assert val(m, "mlxgw_inter_token_latency_seconds_count", model=name) == \
            completion - len(rows)
        refusals = 1 if name == "a" else 0  # the over-long prompt was resolved to "a"
        assert val(m, "mlxgw_e2e_request_latency_seconds_count", model=name) == \
            len(rows) + refusals
        ttft = val(m, "mlxgw_time_to_first_token_seconds_sum", model=name)
        e2e = val(m, "mlxgw_e2e_request_latency_seconds_sum", model=name)
        assert 0 < ttft < e2e
        assert val(m, "mlxgw_loads_total", model=name) == 1
        assert val(m, "mlxgw_load_duration_seconds_count", model=name) == 1
        assert val(m, "mlxgw_model_state", model=name, state="ready") == 1
        assert val(m, "mlxgw_worker_memory_bytes", model=name) > 10 * 2**20
        assert val(m, "mlxgw_in_flight_requests", model=name) == 0
        assert val(m, "mlxgw_queue_depth", model=name) == 0
    ps = {row["name"]: row for row in gw.ps()}
    assert val(m, "mlxgw_resident_memory_bytes") >= max(r["memory_bytes"] for r in ps.values())
    assert val(m, "mlxgw_memory_limit_bytes") > val(m, "mlxgw_resident_memory_bytes")
    assert not any(k[0] == "mlxgw_evictions_total" for k in m)


def test_gauges_show_in_flight_and_queued_behind_the_batch(start_gateway, tiny_dir) -> None:
    key = "s3cret"
    auth = {"Authorization": f"Bearer {key}"}
    gw = start_gateway({"gateway": {"api_key": key}, "models": {
        "m": {"type": "llm", "path": str(tiny_dir / "tiny-0"), "max_batch": 1}}})
    assert httpx.get(gw.url + "/metrics").status_code == 401
    body = {"model": "m", "messages": MSG, "max_tokens": 8, "stream": True}

    def gauges() -> tuple[float, float]:
        m = scrape(gw, auth)
        return val(m, "mlxgw_in_flight_requests", model="m"), val(m, "mlxgw_queue_depth", model="m")

    def stream(timeout: float = 60) -> list[str]:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=auth,
                          timeout=timeout) as r:
            return list(r.iter_lines())

    assert httpx.post(gw.url + "/api/load", json={"model": "m"}, headers=auth,
                      timeout=60).status_code == 200
    worker = psutil.Process(gw.ps(auth)[0]["pid"])
    worker.suspend()  # SIGSTOP: requests stay in flight, deterministically
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            done = [pool.submit(stream) for _ in range(2)]
            wait_for(lambda: gauges() == (1, 1), what="one request in flight, one queued")
            with contextlib.suppress(httpx.ReadTimeout):  # a client that gives up
                stream(timeout=0.5)
            wait_for(lambda: val(scrape(gw, auth), "mlxgw_requests_total", model="m",
                                 route="/v1/chat/completions", status="499") == 1,
                     what="a 499 for the client that went away")
            worker.resume()
            assert all(f.result(timeout=30)[-2] == "data: [DONE]" for f in done)
    finally:
        if worker.is_running():
            worker.resume()
    wait_for(lambda: gauges() == (0, 0), what="nothing in flight")
    m = scrape(gw, auth)
    assert val(m, "mlxgw_requests_total", model="m", route="/v1/chat/completions",
               status="200") == 2
    assert val(m, "mlxgw_tokens_total", model="m", direction="out") >= 16
    # Any route that leases a model is attributed to it (here the admin load).
    assert val(m, "mlxgw_requests_total", model="m", route="/api/load", status="200") == 1
    assert val(m, "mlxgw_requests_total", model="", route="/metrics", status="401") == 0


EXPECTED = [("load", "m0"), ("ready", "m0"), ("load", "m1"), ("evict", "m0"), ("ready", "m1"),
            ("crash", "m1"), ("restart", "m1"), ("ready", "m1"), ("unload", "m1")]


def test_events_in_order_for_load_evict_crash(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"max_loaded_models": 1}, "models": {
        f"m{i}": {"type": "llm", "path": str(tiny_dir / f"tiny-{i}")} for i in range(2)}})
    env = {k: v for k, v in os.environ.items() if k != "MLX_GW_API_KEY"}
    env["MLX_GW_HOME"] = str(gw.home)
    cli = subprocess.Popen([sys.executable, "-m", "mlx_gw.gateway.cli", "events", "-f", "--json"],
                           env=env, stdout=subprocess.PIPE, text=True)
    cli_lines: list[str] = []
    cli_reader = threading.Thread(target=lambda: cli_lines.extend(cli.stdout), daemon=True)
    cli_reader.start()
    followed: list[dict[str, Any]] = []

    def follow() -> None:
        with httpx.stream("GET", gw.url + "/api/events?follow=1", timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    followed.append(json.loads(line[6:]))

    threading.Thread(target=follow, daemon=True).start()
    c = client(gw)
    c.chat.completions.create(model="m0", messages=MSG, max_tokens=2)
    c.chat.completions.create(model="m1", messages=MSG, max_tokens=2)  # evicts m0
    pid = gw.ps()[0]["pid"]
    psutil.Process(pid).send_signal(signal.SIGKILL)
    wait_for(lambda: any(e["type"] == "crash" for e in followed), what="the crash event")
    c.chat.completions.create(model="m1", messages=MSG, max_tokens=2)  # restarts m1
    assert httpx.post(gw.url + "/api/unload", json={"model": "m1"}, timeout=30).is_success

    wait_for(lambda: len(followed) >= len(EXPECTED), what="every event on the follow stream")
    recent = httpx.get(gw.url + "/api/events").json()["events"]
    assert [(e["type"], e["model"]) for e in recent] == EXPECTED
    assert followed == recent
    assert [e["id"] for e in recent] == sorted(e["id"] for e in recent)
    assert [e["time"] for e in recent] == sorted(e["time"] for e in recent)
    evict, crash, restart = recent[3], recent[5], recent[6]
    assert evict["reason"] == "max_loaded_models" and evict["for_model"] == "m1"
    assert crash["signal"] == "SIGKILL" and crash["pid"] == pid and crash["exit_code"] is None
    assert recent[4]["duration_s"] > 0 and recent[4]["memory_bytes"] > 0
    assert restart["model"] == "m1"
    after = httpx.get(gw.url + "/api/events", params={"after": crash["id"]}).json()["events"]
    assert after == recent[6:]

    m = scrape(gw)
    assert val(m, "mlxgw_loads_total", model="m0") == 1
    assert val(m, "mlxgw_loads_total", model="m1") == 2
    assert val(m, "mlxgw_load_duration_seconds_count", model="m1") == 2
    assert val(m, "mlxgw_evictions_total", model="m0", reason="max_loaded_models") == 1
    assert val(m, "mlxgw_crashes_total", model="m1") == 1
    assert val(m, "mlxgw_restarts_total", model="m1") == 1
    assert val(m, "mlxgw_unloads_total", model="m1") == 1
    assert val(m, "mlxgw_expiries_total", model="m1") == 0

    listed = subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", "events"], env=env,
                            capture_output=True, text=True, timeout=30)
    rows = [line.split()[2:4] for line in listed.stdout.splitlines()]
    assert [tuple(r) for r in rows] == EXPECTED
    assert "reason=max_loaded_models" in listed.stdout and "signal=SIGKILL" in listed.stdout

    assert gw.stop() == 0  # ends the follow streams: the CLI exits by itself
    assert cli.wait(30) == 0
    cli_reader.join(10)
    assert [json.loads(line) for line in cli_lines][:len(EXPECTED)] == recent
