"""The Anthropic Messages API through a real gateway, real workers and the real `anthropic` SDK:
messages, streaming (checked by the SDK's own stream helper), tools, count_tokens, auth and
Anthropic-shaped errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.conftest import GatewayProc, serving
from tests.test_tools import build_tool_model

anthropic = pytest.importorskip("anthropic")

KEY = "sk-anthropic-test"
WEATHER = {"name": "get_weather", "description": "Weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ANTHROPIC_EVENTS = {"message_start", "content_block_start", "content_block_delta",
                    "content_block_stop", "message_delta", "message_stop"}
GREEDY = {"temperature": 0}  # this SDK version dropped the `temperature` argument


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    models = tmp_path_factory.mktemp("anthropic-models")
    config = {"gateway": {"port": 0, "api_key": KEY}, "models": {
        "tools": {"type": "llm", "path": str(build_tool_model(models / "tools")),
                  "aliases": ["claude-local"]}}}
    yield from serving(config, tmp_path_factory.mktemp("gw-anthropic"))


def client(gw: GatewayProc, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=60)


def test_message_with_system_and_turns(gw: GatewayProc) -> None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}]
    m = client(gw).messages.create(model="claude-local", max_tokens=12, extra_body=GREEDY,
                                   system="You are terse.", messages=msgs)
    assert m.type == "message" and m.role == "assistant" and m.model == "tools"
    assert m.id.startswith("msg_")
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 12
    assert m.content[0].type == "text" and m.content[0].text
    # Anthropic's input_tokens leaves out what came from the prompt cache.
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == client(gw).messages.\
        count_tokens(model="tools", system="You are terse.", messages=msgs).input_tokens


def test_stream_event_order_checked_by_the_sdk_helper(gw: GatewayProc) -> None:
    c = client(gw)
    kw = dict(model="tools", max_tokens=16, extra_body=GREEDY, messages=ASK)
    whole = c.messages.create(**kw)
    with c.messages.stream(**kw) as stream:
        events = [e for e in stream if e.type in ANTHROPIC_EVENTS]
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    blocks = [(e.type, e.index) for e in events if e.type.startswith("content_block")]
    assert blocks[0] == ("content_block_start", 0) and blocks[-1] == ("content_block_stop", 0)
    assert all(b == ("content_block_delta", 0) for b in blocks[1:-1]) and len(blocks) > 2
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 16


def test_stop_sequence_is_reported(gw: GatewayProc) -> None:
    c = client(gw)
    text = c.messages.create(model="tools", max_tokens=30, extra_body=GREEDY,
                             messages=ASK).content[0].text
    stop = text[6:9]
    assert stop.strip(), text
    m = c.messages.create(model="tools", max_tokens=30, extra_body=GREEDY, messages=ASK,
                          stop_sequences=[stop, "never-appears"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_use_and_tool_result_round_trip(gw: GatewayProc, stream: bool) -> None:
    c = client(gw)
    kw = dict(model="tools", max_tokens=100, extra_body={"temperature": 1.0}, tools=[WEATHER],
              messages=ASK, tool_choice={"type": "tool", "name": "get_weather"})
    if stream:
        with c.messages.stream(**kw) as s:
            kinds = [event.type for event in s]
            m = s.get_final_message()
        assert "input_json" in kinds
    else:
        m = c.messages.create(**kw)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER["input_schema"])
    follow = c.messages.create(model="tools", max_tokens=4, tools=[WEATHER], messages=[
        *ASK, {"role": "assistant", "content": m.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "18 degrees"}]}])
    def total(u):
        return u.input_tokens + u.cache_read_input_tokens

    assert total(follow.usage) > total(m.usage)
    # The follow-up starts with the first turn's prompt: the worker reused its KV.
    assert follow.usage.cache_read_input_tokens >= total(m.usage) - 8


def test_any_tool_choice_and_count_tokens_with_tools(gw: GatewayProc) -> None:
    c = client(gw)
    m = c.messages.create(model="tools", max_tokens=100, tools=[WEATHER], messages=ASK,
                          tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use" and m.content[-1].type == "tool_use"
    bare = c.messages.count_tokens(model="tools", messages=ASK).input_tokens
    with_tools = c.messages.count_tokens(model="tools", messages=ASK,
                                         tools=[WEATHER]).input_tokens
    assert with_tools > bare > 5


def test_bearer_and_x_api_key_auth(gw: GatewayProc) -> None:
    body = {"model": "tools", "max_tokens": 2, "messages": ASK}
    url = gw.url + "/v1/messages"
    assert httpx.post(url, json=body, headers={"x-api-key": KEY}, timeout=30).status_code == 200
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30).status_code == 200
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(gw, key="wrong").messages.create(model="tools", max_tokens=2, messages=ASK)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "authentication_error"


def test_errors_are_anthropic_shaped(gw: GatewayProc) -> None:
    c = client(gw)
    with pytest.raises(anthropic.NotFoundError) as nf:
        c.messages.create(model="nope", max_tokens=2, messages=ASK)
    assert nf.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        c.messages.create(model="tools", max_tokens=100_000, messages=ASK)
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    for body in [b"{oops", json.dumps({"model": "tools", "messages": ASK}).encode(),
                 json.dumps({"model": "tools", "max_tokens": 5, "messages": [
                     {"role": "user", "content": [{"type": "image", "source": {}}]}]}).encode()]:
        r = httpx.post(gw.url + "/v1/messages", content=body, timeout=30,
                       headers={"x-api-key": KEY, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
