"""Gateway process lifecycle: auth, SIGKILL leaves no worker, SIGTERM drains and exits 0."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import LoadGate, assert_gone, tiny_config, wait_for

CHAT = [{"role": "user", "content": "hello"}]


def test_api_key_guards_v1_and_api_but_not_probes(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway(tiny_config(tiny_dir, n=1, api_key="sekret"))
    assert httpx.get(gw.url + "/health").status_code == 200
    for path in ("/v1/models", "/api/ps"):
        r = httpx.get(gw.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(gw.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert httpx.get(gw.url + "/api/ps", headers={"Authorization": "Bearer sekret"}).is_success
    assert httpx.get(gw.url + "/v1/models", headers={"x-api-key": "sekret"}).is_success
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=gw.url + "/v1", api_key="sekret", max_retries=0)
    r = good.chat.completions.create(model="tiny-0", messages=CHAT, max_tokens=3,
                                     extra_body={"ignore_eos": True})  # sampled: may stop early
    assert r.usage.completion_tokens == 3


def test_api_key_from_environment(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway(tiny_config(tiny_dir, n=1), env={"MLX_GW_API_KEY": "envkey"})
    assert httpx.get(gw.url + "/v1/models").status_code == 401
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": "Bearer envkey"}).is_success


def test_sigkill_of_gateway_takes_workers_down(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway(tiny_config(tiny_dir, n=2))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    for m in ("tiny-0", "tiny-1"):
        c.chat.completions.create(model=m, messages=CHAT, max_tokens=2)
    pids = {w.pid for w in gw.workers()}
    assert len(pids) >= 2
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    assert_gone(pids, timeout=2.0)


def test_sigterm_drains_in_flight_stream_then_exits_zero(start_gateway, tiny_dir: Path) -> None:
    config = tiny_config(tiny_dir, n=1)
    config["models"]["tiny-0"]["path"] = str(tiny_dir / "tiny-long")
    gw = start_gateway(config)
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="tiny-0", messages=CHAT, max_tokens=2)
    workers = {w.pid for w in gw.workers()}
    got_first = threading.Event()
    result: dict[str, object] = {}

    def stream() -> None:
        text, finish = [], None
        for ch in c.chat.completions.create(model="tiny-0", messages=CHAT, max_tokens=1500,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}):
            if ch.choices:
                text.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
                got_first.set()
        result["finish"] = finish

    t = threading.Thread(target=stream)
    t.start()
    assert got_first.wait(30)
    gw.proc.send_signal(signal.SIGTERM)
    # New requests are refused while the stream drains.
    r = wait_for(lambda: _post_or_none(gw.url), timeout=10, what="a refused request")
    assert r.status_code == 503
    t.join(60)
    assert result.get("finish") == "length", "the in-flight stream was cut"
    assert gw.proc.wait(45) == 0
    assert_gone(workers)


def _post_or_none(url: str) -> httpx.Response | None:
    try:
        r = httpx.post(url + "/v1/chat/completions", timeout=5,
                       json={"model": "tiny-0", "messages": CHAT, "max_tokens": 1})
    except httpx.TransportError:
        return None
    return r if r.status_code == 503 else None


def test_worker_exits_when_parent_dies_during_load(start_gateway, load_gate: LoadGate) -> None:
    """A worker whose parent vanishes exits by itself, even in the middle of a load: here it
    is blocked inside the load, reading the model's files, when the gateway is SIGKILLed."""
    gw = start_gateway({"gateway": {"warm_spare": False},
                        "models": {"tiny-0": {"type": "llm", "path": str(load_gate.dir)}}})

    def first_request() -> None:  # answered by no one: the gateway dies under it
        with contextlib.suppress(httpx.TransportError):
            httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny-0", "messages": CHAT, "max_tokens": 1})

    t = threading.Thread(target=first_request)
    t.start()
    load_gate.wait_loading()
    assert [m["state"] for m in gw.ps()] == ["starting"]
    [worker] = gw.workers()  # no warm spare: the one process is the one loading
    assert worker.ppid() == gw.pid
    gw.proc.kill()
    gw.proc.wait(10)
    t.join(10)
    assert not t.is_alive()
    with pytest.raises(psutil.NoSuchProcess):
        worker.wait(2.0)
        worker.status()
