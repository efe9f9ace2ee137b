"""The supervisor through a real gateway: keep_alive, TTL, LRU under count and memory ceilings,
crash containment, one load per model, load/unload API, and a churn run with zero failures."""

from __future__ import annotations

import concurrent.futures as cf
import random
import signal
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import GatewayProc, LoadGate, wait_for

MSG = [{"role": "user", "content": "hi"}]


def chat(gw: GatewayProc, model: str, **kw) -> openai.types.chat.ChatCompletion:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)
    # ignore_eos: sampled tiny models may end early, and tests count the tokens
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return c.chat.completions.create(model=model, messages=MSG, max_tokens=kw.pop("n", 2),
                                     extra_body=extra, **kw)


def loaded(gw: GatewayProc) -> dict[str, dict]:
    return {m["name"]: m for m in gw.ps()}


def events(gw: GatewayProc, kind: str | None = None) -> list[dict]:
    ev = httpx.get(gw.url + "/api/events").json()["events"]
    return [e for e in ev if kind is None or e["type"] == kind]


def models(tiny_dir: Path, n: int = 3, *, long: bool = False, **per_model) -> dict[str, dict]:
    """n tiny models m0..; with long=True, m0 has a 16k context so it can be kept busy."""
    out = {f"m{i}": {"type": "llm", "path": str(tiny_dir / f"tiny-{i}"), **per_model}
           for i in range(n)}
    if long:
        out["m0"]["path"] = str(tiny_dir / "tiny-long")
    return out


LONG = 12000  # tokens: seconds of decoding for the long tiny model


def pid_exits(pid: int, timeout: float = 10.0) -> None:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass


def test_keep_alive_zero_unloads_after_the_request(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"models": models(tiny_dir, 1)})
    chat(gw, "m0", extra_body={"keep_alive": 0})
    ev = wait_for(lambda: events(gw, "expire"), what="an expire event")
    assert ev[0]["model"] == "m0" and ev[0]["keep_alive"] == 0
    assert "m0" not in loaded(gw)
    pid_exits(ev[0]["pid"])


def test_ttl_unloads_and_the_pid_exits(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"models": models(tiny_dir, 1, keep_alive="2s")})
    chat(gw, "m0")
    row = loaded(gw)["m0"]
    assert row["expires_at"] is not None
    wait_for(lambda: "m0" not in loaded(gw), timeout=8, what="TTL expiry")
    pid_exits(row["pid"])
    assert not psutil.pid_exists(row["pid"]) or psutil.Process(row["pid"]).status() == "zombie"


def test_per_request_never_outlives_the_model_ttl(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"models": models(tiny_dir, 2, keep_alive="1s")})
    chat(gw, "m0", extra_body={"keep_alive": -1})
    chat(gw, "m1")  # the witness: same 1 s TTL, no override
    assert loaded(gw)["m0"]["expires_at"] is None
    wait_for(lambda: "m1" not in loaded(gw), timeout=8, what="the witness to expire")
    assert "m0" in loaded(gw)


def test_bad_keep_alive_is_400(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"models": models(tiny_dir, 1)})
    with pytest.raises(openai.BadRequestError) as e:
        chat(gw, "m0", extra_body={"keep_alive": "5 minutes"})
    assert "keep_alive" in str(e.value)


def test_lru_under_max_loaded_models(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"max_loaded_models": 2}, "models": models(tiny_dir)})
    for m in ("m0", "m1", "m0", "m2"):  # m1 is least recently used when m2 arrives
        chat(gw, m)
        assert len(loaded(gw)) <= 2
    assert set(loaded(gw)) == {"m0", "m2"}
    evict = events(gw, "evict")
    assert [(e["model"], e["reason"]) for e in evict] == [("m1", "max_loaded_models")]


def test_lru_under_memory_limit_keeps_sum_under_ceiling(start_gateway, tiny_dir: Path) -> None:
    probe = start_gateway({"models": models(tiny_dir, 1)})
    chat(probe, "m0")
    one = loaded(probe)["m0"]["memory_bytes"]
    probe.stop()
    ceiling = int(one * 2.6)
    gw = start_gateway({"gateway": {"memory_limit": ceiling}, "models": models(tiny_dir)})
    for m in ("m0", "m1", "m2", "m1", "m0"):
        chat(gw, m)
        rows = loaded(gw)
        assert sum(r["memory_bytes"] for r in rows.values()) <= ceiling
        assert m in rows
    # m0, m1 loaded; m2 evicts m0 (LRU); m1 used; m0 evicts m2 (LRU, m1 was used after it).
    assert [e["model"] for e in events(gw, "evict")] == ["m0", "m2"]
    assert all(e["reason"] == "memory" for e in events(gw, "evict"))


def test_model_larger_than_the_ceiling_fails_at_once(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"memory_limit": "20MB"}, "models": models(tiny_dir, 1)})
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                   json={"model": "m0", "messages": MSG, "max_tokens": 1})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "model_too_large" and "memory_limit" in err["message"]


def test_busy_models_make_a_load_wait_then_503(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"max_loaded_models": 1, "queue_timeout": "1s"},
                        "models": models(tiny_dir, 2, long=True)})
    body = {"model": "m0", "messages": MSG, "max_tokens": LONG, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()  # keep the iterator: dropping it closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                       json={"model": "m1", "messages": MSG, "max_tokens": 1})
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert "m0" in r.json()["error"]["message"]  # says what is using the room


def test_worker_sigkill_mid_stream_ends_stream_and_restarts(start_gateway, tiny_dir) -> None:
    gw = start_gateway({"models": models(tiny_dir, 2, long=True)})
    chat(gw, "m1")
    other_pid = loaded(gw)["m1"]["pid"]
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = c.chat.completions.create(model="m0", messages=MSG, max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    pid = loaded(gw)["m0"]["pid"]
    psutil.Process(pid).send_signal(signal.SIGKILL)
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "SIGKILL" in str(e.value)
    crash = wait_for(lambda: events(gw, "crash"), what="a crash event")[0]
    assert crash["model"] == "m0" and crash["returncode"] == -9
    r = chat(gw, "m0")
    assert r.usage.completion_tokens == 2
    assert loaded(gw)["m0"]["pid"] != pid
    assert loaded(gw)["m1"]["pid"] == other_pid  # the other model never noticed
    assert events(gw, "restart")


def first_tokens(gw: GatewayProc, model: str) -> float:
    """Requests of `model` that have had their first token (the TTFT histogram's count)."""
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(f'mlxgw_time_to_first_token_seconds_count{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_non_stream_request_gets_502_when_its_worker_dies(start_gateway, tiny_dir) -> None:
    """Once tokens have come back, a death ends the request (a request with no answer yet
    is retried instead: tests/test_faults.py)."""
    gw = start_gateway({"models": models(tiny_dir, 1, long=True)})
    chat(gw, "m0")
    pid = loaded(gw)["m0"]["pid"]
    answered = first_tokens(gw, "m0")
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(httpx.post, gw.url + "/v1/chat/completions", timeout=60,
                          json={"model": "m0", "messages": MSG, "max_tokens": LONG,
                                "ignore_eos": True})
        wait_for(lambda: first_tokens(gw, "m0") > answered, what="the request's first token")
        psutil.Process(pid).kill()
        r = fut.result()
    assert r.status_code == 502 and r.json()["error"]["code"] == "worker_died"


def test_worker_sigkill_during_load_fails_the_request_and_the_next_loads(
        start_gateway, load_gate: LoadGate) -> None:
    """A worker killed while it loads (after Load, before Ready) fails the request waiting on
    the load at once with a 503, not at load_timeout; the next request loads the model again
    in a new process."""
    gw = start_gateway({"gateway": {"warm_spare": False},
                        "models": {"m0": {"type": "llm", "path": str(load_gate.dir)}}})
    body = {"model": "m0", "messages": MSG, "max_tokens": 2, "ignore_eos": True}
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(httpx.post, gw.url + "/v1/chat/completions", json=body, timeout=60)
        load_gate.wait_loading()
        assert loaded(gw)["m0"]["state"] == "starting"
        [worker] = gw.workers()  # no warm spare: the one process is the one loading
        worker.kill()
        r = fut.result(timeout=30)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "model_load_failed" and "SIGKILL" in err["message"]
    assert [e["type"] for e in events(gw)] == ["load", "load_failed"]
    assert "m0" not in loaded(gw)

    load_gate.release()
    # Within the back-off after the failure a request gets a 503 at once; the first one after
    # it loads the model again.
    again = wait_for(lambda: httpx.post(gw.url + "/v1/chat/completions", json=body,
                                        timeout=60).status_code == 200,
                     timeout=60, what="a request that loads the model again")
    assert again
    assert [e["type"] for e in events(gw)] == ["load", "load_failed", "load", "ready"]
    row = loaded(gw)["m0"]
    assert row["state"] == "ready" and row["pid"] != worker.pid


def test_six_concurrent_first_requests_cause_one_load(start_gateway, tiny_dir) -> None:
    gw = start_gateway({"models": models(tiny_dir, 1)})
    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: chat(gw, "m0"), range(6)))
    assert all(r.usage.completion_tokens == 2 for r in results)
    assert len(events(gw, "load")) == 1 and len(events(gw, "ready")) == 1


def test_load_unload_api(start_gateway, tiny_dir) -> None:
    gw = start_gateway({"models": models(tiny_dir, 1)})
    r = httpx.post(gw.url + "/api/load", json={"model": "m0", "keep_alive": -1}, timeout=60)
    assert r.status_code == 200
    row = r.json()
    assert row["state"] == "ready" and row["pid"] and row["expires_at"] is None
    assert httpx.post(gw.url + "/api/load", json={"model": "zz"}).status_code == 404
    assert httpx.post(gw.url + "/api/unload", json={"model": "zz"}).status_code == 404
    assert httpx.post(gw.url + "/api/load", json={}).status_code == 400
    assert httpx.post(gw.url + "/api/unload", json={"model": "m0"}, timeout=30).status_code == 200
    assert loaded(gw) == {}
    pid_exits(row["pid"])
    assert [e["type"] for e in events(gw)] == ["load", "ready", "unload"]


def test_failed_load_reports_the_worker_error_and_backs_off(start_gateway, tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    gw = start_gateway({"models": {"bad": {"type": "llm", "path": str(broken)},
                                   **models(tiny_dir, 1)}})
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                   json={"model": "bad", "messages": MSG, "max_tokens": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    assert "bad" in r.json()["error"]["message"]
    again = httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                       json={"model": "bad", "messages": MSG, "max_tokens": 1})
    assert again.status_code == 503 and "Retry-After" in again.headers
    assert len(events(gw, "load")) == 1  # the retry inside the back-off did not spawn again
    assert chat(gw, "m0").usage.completion_tokens == 2  # the rest keep serving


def test_churn_three_models_ceiling_fits_two(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"max_loaded_models": 2}, "models": models(tiny_dir)})
    rng = random.Random(7)
    plan = [rng.choice(["m0", "m1", "m2"]) for _ in range(200)]

    def run(model: str) -> str:
        r = chat(gw, model, n=3)
        assert 1 <= r.usage.completion_tokens <= 3 and r.model == model
        return r.choices[0].finish_reason

    with cf.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(run, plan))  # any failed request raises here
    assert len(done) == 200 and set(done) <= {"stop", "length"}
    assert len(loaded(gw)) <= 2
    assert events(gw, "evict")
