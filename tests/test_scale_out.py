"""Two gateways behind a real LiteLLM proxy, configured as docs/scale-out.md says (issue 18).

One test, in phases over the same three processes (the proxy alone takes ~35 s to start):
residency routing (64 requests over two models, each model resident on its home gateway only),
SIGKILL of one gateway mid-run (every request still succeeds through LiteLLM's retry, and
LiteLLM then stops routing to it), and a SIGTERM drain (the draining gateway answers not-ready
and LiteLLM stops choosing it while its stream still runs).
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayProc, assert_gone, wait_for
from tests.litellm_proxy import LiteLLMProxy, free_port

if importlib.util.find_spec("litellm") is None or importlib.util.find_spec("fastapi") is None:
    pytest.skip("LiteLLM's proxy needs litellm and the test extra's proxy packages",
                allow_module_level=True)

DOC = Path(__file__).resolve().parent.parent / "docs" / "scale-out.md"
HEALTH_INTERVAL_S = 1
MODELS = {"smollm2": "tiny-0", "llama3": "tiny-1"}  # the doc's names -> the test's models
HOME = {"tiny-0": 0, "tiny-1": 1}  # the gateway each model lives on, as the doc's config says


def doc_config(ports: list[int]) -> dict[str, Any]:
    """The LiteLLM config in docs/scale-out.md, pointed at our gateways and models."""
    text = DOC.read_text()
    block = re.search(r"<!-- litellm-config -->\n```yaml\n(.*?)```", text, re.S)
    assert block, "docs/scale-out.md lost its LiteLLM config block"
    body = block.group(1)
    for i, port in enumerate(ports):
        body = body.replace(f"http://10.0.0.{i + 1}:8095", f"http://127.0.0.1:{port}")
    for doc_name, ours in MODELS.items():
        body = re.sub(rf"\b{doc_name}\b", ours, body)
    config = yaml.safe_load(body)
    config["general_settings"]["health_check_interval"] = HEALTH_INTERVAL_S
    return config


def gateway_config(tiny_dir: Path) -> dict[str, Any]:
    models = {m: {"type": "llm", "path": str(tiny_dir / m)} for m in HOME}
    models["tiny-long"] = {"type": "llm", "path": str(tiny_dir / "tiny-long")}
    return {"gateway": {"port": 0}, "models": models}


def resident(gw: GatewayProc) -> set[str]:
    return {m["name"] for m in gw.ps()}


def served_by(r: httpx.Response, ports: list[int]) -> int:
    base = r.headers.get("x-litellm-model-api-base", "")
    return next(i for i, port in enumerate(ports) if f":{port}/" in base + "/")


def retries(r: httpx.Response) -> int:
    return int(r.headers.get("x-litellm-attempted-retries") or 0)


def run_batch(proxy: LiteLLMProxy, n: int, *, on_done=None) -> list[httpx.Response]:
    """n non-streamed requests over both models, 8 at a time; each must answer 200."""

    def one(i: int) -> httpx.Response:
        model = list(HOME)[i % 2]
        r = proxy.chat(model, f"request {i}", max_tokens=8, temperature=0,
                       extra_body={"ignore_eos": True})
        if on_done is not None:
            on_done()
        return r

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, range(n)))
    bad = [(r.status_code, r.text[:300]) for r in out if r.status_code != 200]
    assert not bad, f"{len(bad)} of {n} requests failed through LiteLLM: {bad[:3]}"
    for r in out:
        assert r.json()["usage"]["completion_tokens"] == 8
    return out


@pytest.fixture
def cluster(tiny_dir: Path, tmp_path: Path):
    ports = [free_port(), free_port()]
    proxy = LiteLLMProxy(doc_config(ports), tmp_path / "litellm")  # slow: start it first
    gws = [GatewayProc(gateway_config(tiny_dir), tmp_path / f"gw{i}", port=p)
           for i, p in enumerate(ports)]
    started = list(gws)
    try:
        proxy.wait_ready()
        yield proxy, gws, ports, started
    finally:
        proxy.stop()
        for gw in started:
            gw.workers()
            if gw.proc.poll() is None:
                gw.stop()
            assert_gone(gw.seen_workers)


def test_gateways_behind_litellm(cluster, tiny_dir: Path, tmp_path: Path) -> None:
    proxy, gws, ports, started = cluster

    # 1. Residency: each model's requests go to its home gateway; the other never loads it.
    out = run_batch(proxy, 64)
    for r in out:
        model = r.json()["model"]
        assert served_by(r, ports) == HOME[model], (model, r.headers.get("x-litellm-model-id"))
    assert resident(gws[0]) == {"tiny-0"} and resident(gws[1]) == {"tiny-1"}
    assert httpx.get(gws[0].url + "/ready", params={"model": "tiny-0"}).status_code == 200
    r = httpx.get(gws[0].url + "/ready", params={"model": "tiny-1"})
    assert r.status_code == 503 and r.json()["status"] == "stopped"
    assert httpx.get(gws[0].url + "/ready", params={"model": "nope"}).status_code == 404
    probe = httpx.post(gws[0].url + "/v1/chat/completions", headers={"X-MLX-GW-Probe": "resident"},
                       json={"model": "tiny-1", "messages": [{"role": "user", "content": "hi"}]})
    assert probe.status_code == 412 and probe.json()["error"]["code"] == "model_not_resident"
    assert resident(gws[0]) == {"tiny-0"}  # neither /ready nor the probe loaded anything

    # 2. SIGKILL gateway 0 mid-run: every request still succeeds through LiteLLM's retry.
    done = threading.Semaphore(0)
    killer = threading.Thread(target=lambda: (done.acquire(), [done.acquire() for _ in range(15)],
                                              gws[0].proc.send_signal(signal.SIGKILL)))
    killer.start()
    out = run_batch(proxy, 64, on_done=done.release)
    killer.join(5)
    assert gws[0].proc.wait(10) == -signal.SIGKILL
    assert_gone(gws[0].seen_workers)  # its workers died with it
    # tiny-0's requests after the kill (about 20 of them had not even been sent) were served
    # by gateway 1: through LiteLLM's retry, or its -failover fallback group (no retry counted).
    moved = [r for r in out if r.json()["model"] == "tiny-0" and served_by(r, ports) == 1]
    assert moved, "no tiny-0 request was served by the live gateway after the kill"
    assert all(served_by(r, ports) == 1 for r in out if retries(r))
    # ...and LiteLLM stops routing to it: later requests reach gateway 1 with no failed attempt.
    time.sleep(2 * HEALTH_INTERVAL_S)
    out = run_batch(proxy, 16)
    assert [(served_by(r, ports), retries(r)) for r in out] == [(1, 0)] * 16
    assert resident(gws[1]) == {"tiny-0", "tiny-1"}

    # 3. Drain: gateway 0 comes back (holding nothing); gateway 1 is SIGTERMed mid-stream. It
    # answers not-ready at once, and LiteLLM stops choosing it while its stream still runs.
    gws[0] = GatewayProc(gateway_config(tiny_dir), tmp_path / "gw0-again", port=ports[0])
    started.append(gws[0])
    # tiny-0's home is back, but tiny-0 is resident on gateway 1 now: its requests stay there,
    # and its home does not load it while gateway 1 holds it.
    time.sleep(2 * HEALTH_INTERVAL_S)
    out = run_batch(proxy, 16)
    assert [(served_by(r, ports), retries(r)) for r in out] == [(1, 0)] * 16
    assert resident(gws[0]) == set()
    stream = httpx.stream("POST", gws[1].url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny-long", "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 6000, "ignore_eos": True, "stream": True})
    lines = stream.__enter__().iter_lines()
    assert next(lines).startswith("data: ")  # streaming, so in flight when the drain starts
    gws[1].proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(gws[1].url + "/ready").status_code == 503, 5, "not-ready")
    assert httpx.get(gws[1].url + "/ready", params={"model": "tiny-1"}).status_code == 503

    def clean_on_gw0() -> bool:
        r = proxy.chat("tiny-1", "after the drain", max_tokens=2)
        return r.status_code == 200 and served_by(r, ports) == 0 and retries(r) == 0

    wait_for(clean_on_gw0, 45, "LiteLLM to route tiny-1 to gateway 0 without trying gateway 1")
    # The drained gateway is still streaming (6000 tokens take ~60 s here): LiteLLM left it
    # before its stream ended. The client then leaves, and the drain ends with the stream.
    assert gws[1].proc.poll() is None, "the drained gateway ended before its stream"
    more = [line for line in itertools.islice(lines, 40) if line]
    assert len(more) == 20 and all(line.startswith('data: {"id"') for line in more), more[-2:]
    stream.__exit__(None, None, None)
    assert gws[1].proc.wait(30) == 0
