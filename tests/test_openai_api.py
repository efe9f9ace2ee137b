"""The OpenAI surface through a real gateway, real workers and the real `openai` SDK."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import GatewayProc, wait_for

CHAT = [{"role": "user", "content": "Tell me a story about a quick fox"}]


def client(gw: GatewayProc, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)


def greedy_chat(c: openai.OpenAI, content: str, model: str = "tiny-0", n: int = 24) -> str:
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                  max_tokens=n, temperature=0)
    return r.choices[0].message.content


def test_models_list_has_names_and_aliases(gateway: GatewayProc) -> None:
    ids = {m.id for m in client(gateway).models.list()}
    assert ids == {"tiny-0", "tiny-1", "gpt-4o-mini"}


def test_chat_non_stream_and_stream_agree_with_usage(gateway: GatewayProc) -> None:
    c = client(gateway)
    full = c.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=20,
                                     temperature=0)
    assert full.object == "chat.completion"
    assert full.model == "tiny-0"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 20
    assert full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + 20

    chunks = list(c.chat.completions.create(
        model="tiny-0", messages=CHAT, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_stream_and_not(gateway: GatewayProc) -> None:
    c = client(gateway)
    full = c.completions.create(model="tiny-1", prompt="Once upon a time", max_tokens=12,
                                temperature=0)
    assert full.object == "text_completion"
    assert full.usage.completion_tokens == 12
    parts = list(c.completions.create(model="tiny-1", prompt="Once upon a time", max_tokens=12,
                                      temperature=0, stream=True,
                                      stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert parts[-1].usage.completion_tokens == 12


def test_stop_string_is_not_emitted(gateway: GatewayProc) -> None:
    c = client(gateway)
    text = greedy_chat(c, "hello there", n=30)
    stop = text[8:11]
    assert stop.strip(), f"need a visible stop string in {text!r}"
    r = c.chat.completions.create(model="tiny-0", messages=[{"role": "user", "content":
                                  "hello there"}], max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(gateway: GatewayProc) -> None:
    c = client(gateway)
    kw = dict(model="tiny-0", messages=CHAT, max_tokens=16, temperature=1.0, seed=1234)
    a = c.chat.completions.create(**kw).choices[0].message.content
    b = c.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_batching_does_not_change_greedy_results(gateway: GatewayProc) -> None:
    c = client(gateway)
    prompts = [f"prompt number {i}: " + "words " * i for i in range(8)]
    alone = [greedy_chat(c, p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: greedy_chat(c, p), prompts))
    assert together == alone


def test_eight_streams_share_one_worker_and_overlap(gateway: GatewayProc) -> None:
    c = client(gateway)
    greedy_chat(c, "warm up", n=2)
    pid = next(m["pid"] for m in gateway.ps() if m["name"] == "tiny-0")
    started = threading.Barrier(8, timeout=30)
    first_token_before_any_end = []

    def run(i: int) -> int:
        n = 0
        for ch in c.chat.completions.create(model="tiny-0", messages=CHAT, max_tokens=40,
                                            temperature=0, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                if n == 0:
                    started.wait()  # every stream has produced text before any of them ends
                    first_token_before_any_end.append(i)
                n += 1
        return n

    with cf.ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(run, range(8)))
    assert len(first_token_before_any_end) == 8 and all(n > 0 for n in counts)
    rows = [m for m in gateway.ps() if m["name"] == "tiny-0"]
    assert [m["pid"] for m in rows] == [pid]


def test_two_models_run_in_two_processes(gateway: GatewayProc) -> None:
    c = client(gateway)
    greedy_chat(c, "a", model="tiny-0", n=2)
    greedy_chat(c, "b", model="tiny-1", n=2)
    pids = {m["name"]: m["pid"] for m in gateway.ps()}
    assert pids["tiny-0"] != pids["tiny-1"]
    assert {pids["tiny-0"], pids["tiny-1"]} <= {w.pid for w in gateway.workers()}


BAD = [
    (b"{not json", 400, None),
    (b"", 400, None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    (b'{"model": "tiny-0"}', 400, "messages"),
    (b'{"model": "tiny-0", "messages": []}', 400, "messages"),
    (b'{"model": "tiny-0", "messages": "hi"}', 400, "messages"),
    (b'{"model": "tiny-0", "messages": [{"role": "user", "content": "x"}], "max_tokens": "a"}',
     400, "max_tokens"),
    (b'{"model": "tiny-0", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}',
     400, "max_tokens"),
    (b'{"model": "tiny-0", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "messages[0].role"),
    (b'{"model": "tiny-0", "messages": [{"role": "user", "content": 5}]}', 400,
     "messages[0].content"),
    (b'{"model": "tiny-0", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
     400, "temperature"),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_input_gets_openai_shaped_error(gateway: GatewayProc, body: bytes, status: int,
                                            param: str | None) -> None:
    r = httpx.post(gateway.url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in err["message"]
    if param:
        assert err["param"] == param


def test_sdk_raises_typed_errors(gateway: GatewayProc) -> None:
    c = client(gateway)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="missing", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-0", messages=CHAT, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"


def test_unknown_route_and_method_are_json(gateway: GatewayProc) -> None:
    r = httpx.get(gateway.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(gateway.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


# Far more tokens than any machine decodes during the test (the tiny model runs at ~100-1000
# tokens/s): a sequence asking for them with ignore_eos holds the worker's batch for hours
# unless something takes it out.
ENDLESS_TOKENS = 1_000_000


def test_client_disconnect_frees_the_sequence(start_gateway, tiny_dir: Path) -> None:
    """A client that hangs up mid-stream takes its sequence out of the worker's batch: the
    gateway sends Cancel. Nothing else can end this sequence early (ignore_eos, a million
    tokens), so the worker's own in-flight count falling to 0 is the Cancel at work."""
    gw = start_gateway({"models": {"long": {
        "type": "llm", "path": str(tiny_dir / "tiny-long"),
        "context_length": ENDLESS_TOKENS + 1024}}})
    body = {"model": "long", "messages": CHAT, "max_tokens": ENDLESS_TOKENS,
            "ignore_eos": True, "stream": True}

    def row() -> dict:
        return next(m for m in gw.ps() if m["name"] == "long")

    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        data = 0
        while data < 3:  # a few generated deltas (after the ": loading model" comments)
            data += next(lines).startswith("data: ")
        assert row()["in_flight"] == 1
        # The worker's heartbeat (once a second) reports the sequence in its batch.
        wait_for(lambda: row()["worker_in_flight"] == 1, timeout=10,
                 what="the worker to report the sequence in its batch")
    # The connection is closed mid-stream: the gateway cancels, the worker drops the sequence,
    # hours before max_tokens would have ended it.
    wait_for(lambda: row()["in_flight"] == 0 and row()["worker_in_flight"] == 0, timeout=10,
             what="the worker's in-flight count back to 0 after the client hung up")
    assert row()["state"] == "ready"  # the worker is still up and serving
    done = httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                      json={"model": "long", "messages": CHAT, "max_tokens": 3,
                            "ignore_eos": True})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
