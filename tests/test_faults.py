"""Faults beyond a plain SIGKILL, on real workers: a request that reaches a dead worker is
retried once on a fresh one; a frozen (SIGSTOP) worker is killed by the heartbeat deadline and
replaced; corrupt weights fail the load clearly and back off instead of crash-looping; a worker
that floods its stderr is rate-limited in the gateway's log; an unwritable state directory."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import GatewayProc, wait_for

MSG = [{"role": "user", "content": "hi"}]
LONG = 12000  # tokens: seconds of decoding for the long tiny model


def ps(gw: GatewayProc) -> dict[str, dict]:
    return {m["name"]: m for m in gw.ps()}


def events(gw: GatewayProc, kind: str) -> list[dict]:
    return [e for e in httpx.get(gw.url + "/api/events").json()["events"] if e["type"] == kind]


def frozen_then_killed(gw: GatewayProc, model: str, send) -> tuple[httpx.Response, int]:
    """Freeze `model`'s worker (SIGSTOP), send a request, and SIGKILL the worker once the
    request is in it: the request reached a worker that could never answer it."""
    pid = ps(gw)[model]["pid"]
    worker = psutil.Process(pid)
    worker.suspend()
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(send)
        wait_for(lambda: ps(gw)[model]["in_flight"] == 1, what="the request in the worker")
        time.sleep(0.2)  # from the lease to the socket: no await blocks in between
        worker.kill()
        return fut.result(timeout=60), pid


def test_request_sent_to_a_worker_that_then_died_is_retried_on_a_fresh_one(
        start_gateway, tiny_dir: Path, tiny_bert: Path) -> None:
    gw = start_gateway({"models": {
        "llm": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
        "bert": {"type": "embedding", "path": str(tiny_bert)}}})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)
    c.embeddings.create(model="bert", input="warm")
    c.chat.completions.create(model="llm", messages=MSG, max_tokens=1)
    llm_pid = ps(gw)["llm"]["pid"]

    r, dead = frozen_then_killed(gw, "bert", lambda: httpx.post(
        gw.url + "/v1/embeddings", json={"model": "bert", "input": "again"}, timeout=60))
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 64
    assert ps(gw)["bert"]["pid"] != dead and ps(gw)["llm"]["pid"] == llm_pid

    body = {"model": "llm", "messages": MSG, "max_tokens": 4, "ignore_eos": True}
    r, dead = frozen_then_killed(gw, "llm", lambda: httpx.post(
        gw.url + "/v1/chat/completions", json=body, timeout=60))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert ps(gw)["llm"]["pid"] != dead
    assert {e["model"] for e in events(gw, "crash")} == {"bert", "llm"}
    assert "retrying it on a fresh worker" in gw.log()


def test_stream_already_answering_when_its_worker_dies_ends_with_the_error(
        start_gateway, tiny_dir: Path) -> None:
    """Only a request that has had no answer is retried: a stream that has sent tokens
    ends with worker_died (it cannot be replayed), and the next request is served."""
    gw = start_gateway({"models": {"m": {"type": "llm", "path": str(tiny_dir / "tiny-long")}}})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = c.chat.completions.create(model="m", messages=MSG, max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    psutil.Process(ps(gw)["m"]["pid"]).kill()
    with pytest.raises(openai.APIError, match="SIGKILL"):
        for _ in stream:
            pass
    assert "retrying it on a fresh worker" not in gw.log()
    r = c.chat.completions.create(model="m", messages=MSG, max_tokens=2,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_sigstopped_worker_mid_stream_is_killed_by_the_heartbeat_deadline_and_replaced(
        start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"models": {"m": {"type": "llm", "path": str(tiny_dir / "tiny-long")}}},
                       env={"MLX_GW_HEARTBEAT_TIMEOUT": "2"})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = c.chat.completions.create(model="m", messages=MSG, max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    pid = ps(gw)["m"]["pid"]
    psutil.Process(pid).suspend()
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="SIGKILL"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 15  # the 2 s deadline, not the request's 600 s
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert "no heartbeat for 2s" in gw.log()
    r = c.chat.completions.create(model="m", messages=MSG, max_tokens=2,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2 and ps(gw)["m"]["pid"] != pid


def test_corrupt_weights_fail_clearly_back_off_and_load_once_mended(
        start_gateway, tiny_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "broken"
    shutil.copytree(tiny_dir / "tiny-0", model)
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])  # a download cut short
    gw = start_gateway({"gateway": {"warm_spare": False},
                        "models": {"m": {"type": "llm", "path": str(model)}}})
    body = {"model": "m", "messages": MSG, "max_tokens": 2, "ignore_eos": True}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "model_load_failed" and "'m' failed to load" in err["message"]
    assert "safetensors" in err["message"].lower(), err["message"]
    # At once again: refused from the back-off, no second load, no crash loop.
    again = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
    assert again.status_code == 503 and int(again.headers["Retry-After"]) >= 1
    assert len(events(gw, "load")) == 1 and len(events(gw, "load_failed")) == 1
    assert gw.proc.poll() is None and not gw.workers()  # no worker left behind
    weights.write_bytes(good)
    time.sleep(1.1)  # the first back-off is 1 s
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


FLOOD = '''
import pathlib, sys, threading
if "mlx_gw.worker" in sys.orig_argv:
    def flood():
        sys.stderr.write("y" * 200_000 + "\\n")  # one line past asyncio's 64 KiB line limit
        for i in range(%d):
            sys.stderr.write(f"flood line {i} " + "x" * 80 + "\\n")
        sys.stderr.flush()  # blocks while the gateway has not read it: all but a pipe's worth
        pathlib.Path(%r).touch()
    threading.Thread(target=flood, daemon=True).start()
'''


def test_worker_flooding_its_stderr_is_served_and_the_log_stays_small(
        start_gateway, tiny_dir: Path, tmp_path: Path) -> None:
    lines = 200_000  # ~19 MB of output
    hook, done = tmp_path / "hook", tmp_path / "flood-done"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FLOOD % (lines, str(done)))
    gw = start_gateway({"gateway": {"warm_spare": False},
                        "models": {"m": {"type": "llm", "path": str(tiny_dir / "tiny-0")}}},
                       env={"PYTHONPATH": str(hook)})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)
    for _ in range(3):
        r = c.chat.completions.create(model="m", messages=MSG, max_tokens=4,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
    wait_for(done.exists, timeout=120, what="the flood to be read")
    r = c.chat.completions.create(model="m", messages=MSG, max_tokens=2,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2  # the relay kept reading: the worker never blocked
    assert gw.stop() == 0
    log = gw.log()
    assert "longer than 64 KiB" in log
    dropped = [int(line.split("] ")[1].split()[0]) for line in log.splitlines()
               if "stderr lines not logged" in line]
    assert dropped and sum(dropped) > lines * 0.9, dropped
    assert len(log) < 2 * 2**20, f"the gateway logged {len(log)} bytes of a worker's flood"


def test_unwritable_state_directory(start_gateway, tiny_dir: Path, tmp_path: Path) -> None:
    """A state directory that cannot be written: the foreground gateway serves anyway and
    says what will not work; the daemon, whose log lives there, refuses with the fix."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    home = str(blocker / "home")  # under a file: mkdir fails, even for root
    config = {"models": {"m": {"type": "llm", "path": str(tiny_dir / "tiny-0")}}}
    gw = start_gateway(config, env={"MLX_GW_HOME": home})
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": MSG, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200
    assert "cannot write the state directory" in gw.log() and "serving anyway" in gw.log()
    assert gw.stop() == 0
    env = {k: v for k, v in os.environ.items() if k != "MLX_GW_API_KEY"}
    daemon = subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", "start", "--config",
                             str(gw.config_path), "--port", "0"], env={**env, "MLX_GW_HOME": home},
                            capture_output=True, text=True, timeout=60)
    assert daemon.returncode == 1 and "Set MLX_GW_HOME to a writable directory" in daemon.stderr
