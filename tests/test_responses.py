"""The OpenAI Responses API through a real gateway, real workers and the real `openai` SDK (and
the OpenAI Agents SDK): responses whole and streamed (the event sequence the SDK's own stream
helper accumulates), function tool round-trips, reasoning items, json_schema output,
previous_response_id chains, GET / DELETE by id, a context overflow ending the stream with
response.failed, and bad input answered with a 4xx.

A tiny random model cannot choose to call a tool or to stop, so calls come from a forced
tool_choice and completed (not incomplete) responses from a bounded json_schema, both
enforced by the worker's constrained decoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import GatewayProc, serving, wait_for
from tests.test_tools import build_thinking_model, build_tool_model

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"enum": ["Paris", "Oslo"]},
               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {
    k: v for k, v in WEATHER.items() if k != "type"}}
ASK = "What is the weather in Paris?"
TEXT_EVENTS = ["response.output_item.added", "response.content_part.added",
               "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]


class Forecast(BaseModel):
    city: Literal["Paris", "Oslo"]
    degrees: int = Field(ge=-20, le=40)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    models = tmp_path_factory.mktemp("responses-models")
    config = {"gateway": {"port": 0}, "models": {
        "tools": {"type": "llm", "path": str(build_tool_model(models / "tools")),
                  "aliases": ["gpt-4.1-mini"]},
        "thinker": {"type": "llm", "path": str(build_thinking_model(models / "thinker")),
                    "reasoning_parser": ["<think>", "</think>"]},
    }}
    yield from serving(config, tmp_path_factory.mktemp("gw-responses"))


def client(gw: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)


def kinds(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def test_create_whole_and_streamed_agree(gw: GatewayProc) -> None:
    c = client(gw)
    kw = dict(model="gpt-4.1-mini", input=ASK, max_output_tokens=10, temperature=0)
    r = c.responses.create(**kw)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tools"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert r.output_text and r.usage.output_tokens == 10
    assert r.usage.total_tokens == r.usage.input_tokens + 10
    events = list(c.responses.create(**kw, stream=True))
    names = kinds(events)
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.incomplete" and names.count("response.incomplete") == 1
    body = [n for n in names[2:-1] if n != "response.output_text.delta"]
    assert body == [n for n in TEXT_EVENTS if n != "response.output_text.delta"]
    assert names.count("response.output_text.delta") >= 2
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.id == events[-1].response.id and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 10


def test_instructions_reach_the_template(gw: GatewayProc) -> None:
    c = client(gw)
    bare = c.responses.create(model="tools", input=ASK, max_output_tokens=1)
    told = c.responses.create(model="tools", input=ASK, max_output_tokens=1,
                              instructions="You are a terse forecaster.")
    assert told.instructions == "You are a terse forecaster."
    assert told.usage.input_tokens > bare.usage.input_tokens + 5
    as_items = c.responses.create(model="tools", max_output_tokens=1, input=[
        {"role": "developer", "content": "You are a terse forecaster."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK}]}])
    assert as_items.usage.input_tokens == told.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_round_trip(gw: GatewayProc, stream: bool) -> None:
    c = client(gw)
    kw = dict(model="tools", input=ASK, tools=[WEATHER], max_output_tokens=100,
              tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0)
    if stream:
        with c.responses.stream(**kw) as s:
            events = list(s)
            r = s.get_final_response()
        names = kinds(events)
        assert names[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                             "response.function_call_arguments.done",
                             "response.output_item.done", "response.completed"]
        assert events[2].item.type == "function_call" and events[2].item.arguments == ""
        assert events[4].arguments == r.output[0].arguments
    else:
        r = c.responses.create(**kw)
    assert r.status == "completed"
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    history = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "18 degrees and sunny"}]
    follow = c.responses.create(model="tools", input=history, tools=[WEATHER],
                                max_output_tokens=4)
    assert follow.output[0].type == "message" and follow.output_text
    # the same conversation as chat messages renders to the same prompt
    chat = c.chat.completions.create(model="tools", max_tokens=1, tools=[CHAT_WEATHER], messages=[
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call.call_id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 degrees and sunny"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    assert follow.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens


def test_required_tool_choice_and_built_in_tools(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.responses.create(model="tools", input=ASK, tools=[WEATHER], tool_choice="required",
                           max_output_tokens=100)
    assert [o.type for o in r.output] == ["function_call"]
    assert r.tool_choice == "required" and r.tools[0].name == "get_weather"
    for tool in ({"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["v"]},
                 {"type": "computer_use_preview", "display_width": 8, "display_height": 8,
                  "environment": "linux"}):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="tools", input=ASK, tools=[tool])
        assert e.value.code == "unsupported_tool" and tool["type"] in e.value.message
        assert e.value.param == "tools[0]"


def test_previous_response_id_chains_turns(gw: GatewayProc) -> None:
    c = client(gw)
    first = c.responses.create(model="tools", input="Hi there", max_output_tokens=6,
                               instructions="Be brief.")
    second = c.responses.create(model="tools", input="And tomorrow?", max_output_tokens=2,
                                previous_response_id=first.id)
    assert second.previous_response_id == first.id
    explicit = c.responses.create(model="tools", max_output_tokens=2, input=[
        {"role": "user", "content": "Hi there"},
        first.output[0].model_dump(exclude_none=True),  # as the Agents SDK replays it
        {"role": "user", "content": "And tomorrow?"}])
    # the history is replayed, the first turn's instructions are not (as OpenAI does)
    assert second.usage.input_tokens == explicit.usage.input_tokens
    # the same prompt again: all but its last token come from the worker's prompt cache
    assert explicit.usage.input_tokens_details.cached_tokens == explicit.usage.input_tokens - 1
    call = c.responses.create(model="tools", input=ASK, tools=[WEATHER],
                              tool_choice="required", max_output_tokens=100)
    # Greedy: sampled, the two tokens sometimes made no message (1 run in 4 here, and CI).
    answer = c.responses.create(model="tools", previous_response_id=call.id, tools=[WEATHER],
                                max_output_tokens=2, temperature=0, input=[{
                                    "type": "function_call_output",
                                    "call_id": call.output[0].call_id, "output": "18 C"}])
    assert answer.status == "incomplete" and answer.output[0].type == "message"
    assert answer.usage.input_tokens > call.usage.input_tokens + call.usage.output_tokens


def test_get_and_delete_stored_responses(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.responses.create(model="tools", input="Hi", max_output_tokens=3,
                           metadata={"session": "s1"})
    got = c.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == r.status
    assert got.metadata == {"session": "s1"} and got.usage.output_tokens == 3
    with c.responses.stream(model="tools", input="Hi", max_output_tokens=2) as s:
        streamed_id = [e for e in s if e.type == "response.created"][0].response.id
    assert c.responses.retrieve(streamed_id).status == "incomplete"
    deleted = httpx.delete(f"{gw.url}/v1/responses/{r.id}", timeout=10).json()
    assert deleted == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve(r.id)
    assert e.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        c.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as bad:
        c.responses.create(model="tools", input="again", previous_response_id=r.id)
    assert bad.value.code == "previous_response_not_found"
    unstored = c.responses.create(model="tools", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_is_parsed(gw: GatewayProc, stream: bool) -> None:
    c = client(gw)
    kw = dict(model="tools", input="Forecast for Paris as JSON", text_format=Forecast,
              max_output_tokens=60)
    if stream:
        with c.responses.stream(**kw) as s:
            names = kinds(list(s))
            r = s.get_final_response()
        assert names[-1] == "response.completed"
    else:
        r = c.responses.parse(**kw)
    assert r.status == "completed", r.output_text
    assert isinstance(r.output_parsed, Forecast)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Forecast"


def test_reasoning_items(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.responses.create(model="thinker", input=ASK, max_output_tokens=12, temperature=0)
    (item,) = r.output
    assert item.type == "reasoning" and item.id.startswith("rs_")
    thought = item.content[0].text
    assert item.content[0].type == "reasoning_text" and thought and r.output_text == ""
    events = list(c.responses.create(model="thinker", input=ASK, max_output_tokens=12,
                                     temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") \
        == thought
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == thought and events[-1].type == "response.incomplete"


def test_context_overflow_ends_the_stream_with_response_failed(gw: GatewayProc) -> None:
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="tools", input=ASK, max_output_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    events = list(c.responses.create(model="tools", input=ASK, max_output_tokens=100_000,
                                     stream=True))
    assert kinds(events) == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "context_length_exceeded"
    assert failed.id == events[0].response.id and failed.error.message


def test_client_leaving_a_stream_frees_the_sequence(gw: GatewayProc) -> None:
    body = {"model": "tools", "input": ASK, "max_output_tokens": 2000, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/responses", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while next(lines) != "event: response.output_text.delta":
            pass
        assert [m["in_flight"] for m in gw.ps() if m["name"] == "tools"] == [1]
    wait_for(lambda: all(m["in_flight"] == 0 and m["worker_in_flight"] == 0
                         for m in gw.ps()), timeout=10, what="in-flight back to 0")


BAD: list[tuple[dict[str, Any], int, str | None]] = [
    ({"input": "hi"}, 400, "model"),
    ({"model": "tools"}, 400, "input"),
    ({"model": "tools", "input": 7}, 400, "input"),
    ({"model": "tools", "input": []}, 400, "input"),
    ({"model": "tools", "input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0]"),
    ({"model": "tools", "input": [{"role": "robot", "content": "hi"}]}, 400, "input[0].role"),
    ({"model": "tools", "input": [{"type": "function_call", "call_id": "c", "name": "f",
                                   "arguments": "{oops"}]}, 400, "input[0]"),
    ({"model": "tools", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]}, 400,
     "input[0].content"),
    ({"model": "tools", "input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": "tools", "input": "hi", "temperature": 3}, 400, "temperature"),
    ({"model": "tools", "input": "hi", "tools": [{"type": "function", "name": "a b"}]}, 400,
     "tools[0].function.name"),
    ({"model": "tools", "input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": "tools", "input": "hi", "tools": [WEATHER],
      "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"model": "tools", "input": "hi", "tool_choice": {"type": "web_search_preview"}}, 400,
     "tool_choice"),
    ({"model": "tools", "input": "hi", "text": {"format": {"type": "json_schema"}}}, 400,
     "text.format.schema"),
    ({"model": "tools", "input": "hi", "text": {"format": {"type": "yaml"}}}, 400,
     "text.format"),
    ({"model": "tools", "input": "hi", "previous_response_id": "resp_nope"}, 400,
     "previous_response_id"),
    ({"model": "tools", "input": "hi", "background": True}, 400, "background"),
    ({"model": "tools", "input": "hi", "conversation": "conv_1"}, 400, "conversation"),
    ({"model": "nope", "input": "hi"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_input_is_a_4xx_naming_the_field(gw: GatewayProc, body: dict[str, Any],
                                              status: int, param: str | None) -> None:
    r = httpx.post(gw.url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param, err


def test_malformed_bodies_and_unknown_ids(gw: GatewayProc) -> None:
    for raw in (b"", b"{oops", b"[1, 2]"):
        r = httpx.post(gw.url + "/v1/responses", content=raw, timeout=10,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    for method in ("GET", "DELETE"):
        r = httpx.request(method, gw.url + "/v1/responses/resp_unknown", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def test_agents_sdk_runs_an_agent_with_a_function_tool(gw: GatewayProc) -> None:
    agents = pytest.importorskip("agents")
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"18 degrees in {city}"

    model = agents.OpenAIResponsesModel(
        model="tools", openai_client=openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x",
                                                        max_retries=0, timeout=60))
    agent = agents.Agent(name="forecaster", instructions="Answer with the forecast.",
                         model=model, tools=[get_weather], output_type=Forecast,
                         model_settings=agents.ModelSettings(tool_choice="required",
                                                             max_tokens=80))
    result = agents.Runner.run_sync(agent, "Weather in Paris?",
                                    run_config=agents.RunConfig(tracing_disabled=True))
    assert len(asked) == 1 and asked[0] in ("Paris", "Oslo")
    assert isinstance(result.final_output, Forecast)
    item_types = [i.type for i in result.new_items]
    assert item_types[:2] == ["tool_call_item", "tool_call_output_item"]
    assert item_types[-1] == "message_output_item"
