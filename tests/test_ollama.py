"""The Ollama API through a real gateway, real workers and the official `ollama` Python client:
list, show, ps, chat and generate (streamed and not), embed, tool calls, `format`, thinking,
the preload idiom and keep_alive 0, pull from a local Hugging Face Hub, copy/delete, a failure
after the stream started, Ollama-shaped errors, and the second listener on
`gateway.ollama_compat_port`.

The official client validates every answer with pydantic (tool-call arguments must be an
object, /api/show needs `model_info`, /api/tags items need `modified_at`/`digest`/`size`/
`details`) and raises a streamed line holding "error": using it is the compatibility check.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psutil
import pytest

from mlx_gw.config import ConfigError
from mlx_gw.config.validate import parse_config
from tests.conftest import GatewayProc, assert_gone, wait_for
from tests.test_model_management import LocalHub, hub_env
from tests.test_tools import build_thinking_model, build_tool_model

ollama = pytest.importorskip("ollama")

REPO = "test-org/ollama-tiny"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "num_predict": 8}
# The official client keeps only type/required/properties (and a property's type, enum,
# description) of a tool's schema, so this is all a forced call can be constrained by.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "required": ["city", "days"], "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo"]},
            "days": {"type": "integer"}}}}}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "tag": {"enum": ["a", "b"]}},
         "required": ["x", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def hub(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    repo_dir = tmp_path_factory.mktemp("ollama-hub") / "tiny"
    shutil.copytree(tiny_dir / "tiny-2", repo_dir)
    h = LocalHub({REPO: repo_dir})
    yield h
    h.close()


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tiny_bert: Path, hub: LocalHub,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    models = tmp_path_factory.mktemp("ollama-models")
    config = {"gateway": {"port": 0, "ollama_compat_port": 0, "memory_limit": "4GiB"},
              "models": {
                  "tools": {"type": "llm", "path": str(build_tool_model(models / "tools")),
                            "aliases": ["llama3.2"]},
                  "thinker": {"type": "llm",
                              "path": str(build_thinking_model(models / "thinker")),
                              "reasoning_parser": ["<think>", "</think>"]},
                  "plain": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
                  "long": {"type": "llm", "path": str(tiny_dir / "tiny-long")},
                  "bert": {"type": "embedding", "path": str(tiny_bert)},
                  "pulled": {"type": "llm", "path": REPO},
              }}
    work = tmp_path_factory.mktemp("gw-ollama")
    g = GatewayProc(config, work, env=hub_env(hub, work / "hf"))
    yield g
    g.workers()
    g.stop()
    assert_gone(g.seen_workers)


def client(gw: GatewayProc) -> Any:
    return ollama.Client(host=gw.url, timeout=120)


def loaded(gw: GatewayProc) -> set[str]:
    return {m["name"] for m in gw.ps()}


def check_final(chunk: Any, eval_count: int) -> None:
    assert chunk.done is True and chunk.done_reason == "length"
    assert chunk.eval_count == eval_count and chunk.prompt_eval_count > 5
    # Nanoseconds: a request on a tiny model takes well over 10 µs and under a minute.
    assert 10_000 < chunk.total_duration < 60e9
    assert chunk.total_duration >= chunk.load_duration + chunk.eval_duration
    assert chunk.eval_duration > 0 and chunk.prompt_eval_duration > 0


def test_root_version_and_tags(gw: GatewayProc) -> None:
    r = httpx.get(gw.url + "/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert httpx.head(gw.url + "/").status_code == 200
    assert httpx.get(gw.url + "/api/version").json()["version"].count(".") == 2
    listed = {m.model: m for m in client(gw).list().models}
    assert {"tools", "llama3.2", "thinker", "plain", "bert", "pulled"} <= set(listed)
    tools = listed["tools"]
    assert tools.size > 100_000 and len(tools.digest) == 64 and tools.modified_at.year > 2000
    assert tools.details.format == "mlx" and tools.details.family == "llama"
    assert tools.details.quantization_level == "F32" and tools.details.parameter_size
    assert listed["llama3.2"].digest == tools.digest
    assert listed["pulled"].size == 0  # configured, not pulled yet


def test_show_and_ps(gw: GatewayProc) -> None:
    c = client(gw)
    shown = c.show("llama3.2")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 4096
    assert shown.modelinfo["general.parameter_count"] > 1000
    assert shown.capabilities == ["completion", "tools"] and "<tool_call>" in shown.template
    assert "thinking" in c.show("thinker").capabilities
    assert c.show("bert").capabilities == ["embedding"]
    c.chat(model="plain", messages=ASK, options={"num_predict": 2})
    (entry,) = [m for m in c.ps().models if m.model == "plain"]
    assert entry.name == "plain" and entry.size > 0 and entry.expires_at is not None
    assert entry.context_length > 0


def test_chat_streamed_and_whole_agree(gw: GatewayProc) -> None:
    c = client(gw)
    whole = c.chat(model="tools", messages=ASK, options=GREEDY)
    assert whole.model == "tools" and whole.message.role == "assistant"
    assert whole.message.content
    check_final(whole, 8)
    chunks = list(c.chat(model="tools", messages=ASK, options=GREEDY, stream=True))
    *parts, last = chunks
    assert parts and all(p.done is False for p in parts)
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert last.message.content == ""
    check_final(last, 8)


def test_generate_streamed_whole_and_raw(gw: GatewayProc) -> None:
    c = client(gw)
    whole = c.generate(model="tools", prompt="Tell me a story", options=GREEDY)
    check_final(whole, 8)
    parts = list(c.generate(model="tools", prompt="Tell me a story", options=GREEDY,
                            stream=True))
    assert "".join(p.response for p in parts) == whole.response
    check_final(parts[-1], 8)
    chat = c.chat(model="tools", messages=[{"role": "user", "content": "Tell me a story"}],
                  options=GREEDY)
    assert chat.message.content == whole.response  # the prompt goes through the template
    assert chat.prompt_eval_count == whole.prompt_eval_count
    raw = c.generate(model="tools", prompt="Tell me a story", raw=True, options=GREEDY)
    assert raw.prompt_eval_count < whole.prompt_eval_count  # no template around it
    system = c.generate(model="tools", prompt="Tell me a story", system="Be terse.",
                        options=GREEDY)
    assert system.prompt_eval_count > whole.prompt_eval_count
    longer = c.generate(model="tools", prompt="Tell me a story",
                        options={"temperature": 0, "num_predict": 12, "stop": ["never"]})
    assert longer.eval_count == 12 and longer.response.startswith(whole.response)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_comes_back_with_object_arguments(gw: GatewayProc, stream: bool
                                                           ) -> None:
    kw = dict(model="tools", messages=ASK, tools=[WEATHER],
              options={"num_predict": 200, "temperature": 0, "tool_choice": "required"})
    if stream:
        chunks = list(client(gw).chat(**kw, stream=True))
        calls = [tc for ch in chunks for tc in ch.message.tool_calls or []]
        final = chunks[-1]
    else:
        final = client(gw).chat(**kw)
        calls = final.message.tool_calls
    (call,) = calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict)
    jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
    assert final.done and final.done_reason == "stop"
    # The call and its result go back as history; the template renders both.
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"}]
    follow = client(gw).chat(model="tools", messages=history, tools=[WEATHER],
                             options={"num_predict": 2})
    assert follow.prompt_eval_count > final.prompt_eval_count + 10


def test_format_json_schema_and_json(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.chat(model="plain", messages=ASK, format=POINT,
               options={"num_predict": 60, "temperature": 0})
    jsonschema.validate(json.loads(r.message.content), POINT)
    parts = list(c.generate(model="plain", prompt="A point", format=POINT, stream=True,
                            options={"num_predict": 60, "temperature": 0}))
    jsonschema.validate(json.loads("".join(p.response for p in parts)), POINT)
    free = c.generate(model="plain", prompt="An object", format="json",
                      options={"num_predict": 40, "temperature": 0})
    assert free.response.startswith("{")  # any object: a random model may not close it
    if free.done_reason == "stop":
        assert isinstance(json.loads(free.response), dict)


def test_thinking_is_its_own_field(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.chat(model="thinker", messages=ASK, think=True, options=GREEDY)
    assert r.message.thinking and r.message.content == ""
    parts = list(c.chat(model="thinker", messages=ASK, think=True, options=GREEDY,
                        stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == r.message.thinking
    g = c.generate(model="thinker", prompt=ASK[0]["content"], think=True, options=GREEDY)
    assert g.thinking == r.message.thinking and g.response == ""


def test_embed_and_the_older_embeddings(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.embed(model="bert", input=["I like grapes", "The stock market crashed"])
    assert r.model == "bert" and len(r.embeddings) == 2 and r.prompt_eval_count > 4
    assert r.total_duration > 10_000
    for v in r.embeddings:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-3
    one = c.embed(model="bert", input="I like grapes").embeddings[0]
    old = c.embeddings(model="bert", prompt="I like grapes").embedding
    openai_shape = httpx.post(gw.url + "/v1/embeddings", json={
        "model": "bert", "input": "I like grapes"}, timeout=60).json()["data"][0]["embedding"]
    assert one == pytest.approx(r.embeddings[0], abs=1e-5)
    assert old == pytest.approx(one, abs=1e-5) and openai_shape == pytest.approx(one, abs=1e-5)
    short = c.embed(model="bert", input="I like grapes", dimensions=8).embeddings[0]
    assert len(short) == 8


def test_preload_idiom_and_keep_alive_zero(gw: GatewayProc) -> None:
    c = client(gw)
    c.generate(model="thinker", keep_alive=0)  # whatever an earlier test left
    assert "thinker" not in loaded(gw)
    r = c.chat(model="thinker", messages=[])
    assert r.done and r.done_reason == "load" and r.message.content == ""
    assert "thinker" in loaded(gw)
    r = c.generate(model="thinker", keep_alive=0)
    assert r.done_reason == "unload" and "thinker" not in loaded(gw)
    # A real request with keep_alive 0 unloads the model once it has answered.
    c.chat(model="thinker", messages=ASK, options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: "thinker" not in loaded(gw), 30, "thinker to unload")
    c.embeddings(model="bert", keep_alive="10m")  # an empty prompt loads an embedder too
    (bert,) = [m for m in gw.ps() if m["name"] == "bert"]
    assert bert["state"] == "ready"


def test_a_worker_dying_mid_stream_ends_with_an_error_line(gw: GatewayProc) -> None:
    stream = client(gw).chat(model="long", messages=ASK, stream=True,
                             options={"num_predict": 16000, "temperature": 1.0})
    first = next(stream)
    assert first.done is False
    (entry,) = [m for m in gw.ps() if m["name"] == "long"]
    psutil.Process(entry["pid"]).kill()
    with pytest.raises(ollama.ResponseError) as e:
        for chunk in stream:
            assert not chunk.done  # the stream never claims to have finished
    assert "long" in e.value.error
    r = client(gw).chat(model="long", messages=ASK, options={"num_predict": 2})
    assert r.eval_count == 2  # restarted on the next request


def test_pull_from_a_local_hub(gw: GatewayProc, hub: LocalHub) -> None:
    c = client(gw)
    with pytest.raises(ollama.ResponseError) as e:
        c.show("pulled")
    assert e.value.status_code == 404
    statuses = list(c.pull("pulled", stream=True))
    total = sum(p.stat().st_size for p in hub.files(REPO).values())
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    progress = [s for s in statuses if s.status.startswith("pulling ") and s.total]
    assert progress and progress[-1].completed == total
    assert {s.digest for s in progress} == set(hub.files(REPO))
    assert c.show("pulled").modelinfo["general.architecture"] == "llama"
    assert c.pull(f"hf.co/{REPO}").status == "success"  # by repo id, not streamed
    assert c.chat(model="pulled", messages=ASK, options={"num_predict": 2}).eval_count == 2
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("test-org/missing")
    assert e.value.status_code == 404 and isinstance(e.value.error, str)
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("llama3.1:8b")  # an Ollama library name: not something we can fetch
    assert e.value.status_code == 404 and "Hugging Face" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.delete("pulled")
    assert e.value.status_code == 409  # loaded
    c.chat(model="pulled", messages=[], keep_alive=0)
    assert c.delete("pulled").status == "success"
    assert [m.size for m in c.list().models if m.model == "pulled"] == [0]


def test_copy_adds_a_name_and_delete_removes_it(gw: GatewayProc) -> None:
    c = client(gw)
    assert c.copy("tools", "my-tools").status == "success"
    assert "my-tools" in {m.model for m in c.list().models}
    assert c.chat(model="my-tools", messages=ASK, options={"num_predict": 2}).model == "tools"
    assert c.delete("my-tools").status == "success"
    assert "my-tools" not in {m.model for m in c.list().models}
    for call in (lambda: c.copy("nope", "x"), lambda: c.chat(model="my-tools", messages=ASK)):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        c.copy("tools", "plain")
    assert e.value.status_code == 409


BAD = [
    ("/api/chat", {"model": "nope", "messages": ASK}, 404),
    ("/api/generate", {"model": "nope", "prompt": "hi"}, 404),
    ("/api/embed", {"model": "nope", "input": "hi"}, 404),
    ("/api/show", {"model": "nope"}, 404),
    ("/api/chat", {"model": "bert", "messages": ASK}, 400),  # an embedder does not chat
    ("/api/embed", {"model": "plain", "input": "hi"}, 400),
    ("/api/chat", {"messages": ASK}, 400),
    ("/api/chat", {"model": "plain", "messages": ASK, "options": {"temperature": -1}}, 400),
    ("/api/chat", {"model": "plain", "messages": ASK, "options": {"num_predict": 0}}, 400),
    ("/api/chat", {"model": "plain", "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("/api/chat", {"model": "plain", "messages": [
        {"role": "user", "content": "x", "images": ["aGVsbG8="]}]}, 400),  # a text-only llm
    ("/api/chat", {"model": "plain", "messages": ASK, "format": "yaml"}, 400),
    ("/api/chat", {"model": "plain", "messages": ASK, "think": "very"}, 400),
    ("/api/chat", {"model": "plain", "messages": ASK, "keep_alive": "soon"}, 400),
    ("/api/chat", {"model": "plain", "messages": ASK,
                   "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400),
    ("/api/generate", {"model": "plain", "prompt": "hi", "suffix": "end"}, 400),
    ("/api/generate", {"model": "plain", "prompt": "hi", "context": [1, 2]}, 400),
    ("/api/embed", {"model": "bert", "input": []}, 400),
    ("/api/copy", {"source": "plain"}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{b[0]}-{i}" for i, b in
                                                        enumerate(BAD)])
def test_bad_input_is_a_4xx_in_ollamas_shape(gw: GatewayProc, path: str, body: dict[str, Any],
                                             status: int) -> None:
    for stream in (False, True):
        r = httpx.post(gw.url + path, json={**body, "stream": stream}, timeout=60)
        assert r.status_code == status, r.text
        err = r.json()
        assert list(err) == ["error"] and isinstance(err["error"], str) and err["error"]


def test_other_failures_are_ollama_shaped_too(gw: GatewayProc) -> None:
    r = httpx.post(gw.url + "/api/chat", content=b"{oops", timeout=30)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.request("DELETE", gw.url + "/api/delete", json={"model": "plain"}, timeout=30)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)  # local files
    r = httpx.get(gw.url + "/api/chat", timeout=30)
    assert r.status_code == 405 and isinstance(r.json()["error"], str)
    with pytest.raises(ollama.ResponseError) as e:
        client(gw).chat(model="plain", messages=ASK, options={"top_p": 5})
    assert e.value.status_code == 400 and "top_p" in e.value.error
    # Our own routes on the same paths keep their shapes.
    r = httpx.get(gw.url + "/api/show", params={"model": "nope"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(gw.url + "/api/pull", json={"repo": "not a repo"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "repo"


def test_requests_are_counted_by_route_and_model(gw: GatewayProc) -> None:
    client(gw).chat(model="plain", messages=ASK, options={"num_predict": 2})
    text = httpx.get(gw.url + "/metrics", timeout=30).text
    assert any(line.startswith("mlxgw_requests_total{") and 'route="/api/chat"' in line
               and 'model="plain"' in line and 'status="200"' in line
               for line in text.splitlines()), text[-2000:]


def test_the_ollama_port_listener_answers_ollama_clients(gw: GatewayProc) -> None:
    state = json.loads((gw.home / "gateway.json").read_text())
    url = state["ollama_url"]
    assert url != gw.url
    assert httpx.get(url + "/").text == "Ollama is running"
    c = ollama.Client(host=url, timeout=120)
    assert "tools" in {m.model for m in c.list().models}
    r = c.chat(model="tools", messages=ASK, options=GREEDY)
    assert r.eval_count == 8
    assert "tools" in {m.model for m in c.ps().models}


def test_ollama_compat_port_config() -> None:
    def parse(gateway: dict[str, Any]) -> Any:
        return parse_config({"gateway": gateway}, source="t.yaml", base_dir=Path("."), env={},
                            check_paths=False).gateway

    assert parse({}).ollama_compat_port is None
    assert parse({"ollama_compat_port": 11434}).ollama_compat_port == 11434
    assert parse({"port": 0, "ollama_compat_port": 0}).ollama_compat_port == 0
    for bad in ({"ollama_compat_port": "11434"}, {"ollama_compat_port": 70000},
                {"port": 9000, "ollama_compat_port": 9000}):
        with pytest.raises(ConfigError) as e:
            parse(bad)
        assert "gateway.ollama_compat_port" in str(e.value)
