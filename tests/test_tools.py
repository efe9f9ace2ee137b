"""Tool calling: the parsers on recorded model outputs (whole and streamed, split at every
position), reasoning splitting, and tool calls end to end through the OpenAI SDK and LiteLLM.

A tiny random model cannot choose to call a tool, so end to end the calls come from
`tool_choice` "required" / a named function, which the worker enforces with constrained
decoding: the arguments must validate against the function's schema even from random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from mlx_gw.gateway.translate.chat_stream import ChoiceParser
from mlx_gw.worker.protocol import Delta
from tests.conftest import GatewayProc, serving
from tests.tiny_models import build_tiny_llama

# A Qwen 2.5-style template: renders tools, assistant tool calls and tool results.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You are a helpful assistant.

# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# ---------------------------------------------------------------- recorded outputs

RECORDED: list[tuple[str, str, list[str], dict[str, Any]]] = [
    # (format, model output, thinking markers, expected)
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Paris", "unit": "celsius", "days": 2}}\n</tool_call>', [],
     {"content": "Let me check.", "calls": [("get_weather", {"city": "Paris",
                                                                "unit": "celsius", "days": 2})]}),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": '
     '"celsius", "days": 1}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
     '"{\\"zone\\": \\"CET\\"}"}\n</tool_call>', [],
     {"content": "", "calls": [("get_weather", {"city": "Oslo", "unit": "celsius", "days": 1}),
                               ("get_time", {"zone": "CET"})]}),
    ("hermes", '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": '
     '"get_time", "arguments": {"zone": "UTC"}}\n</tool_call>', ["<think>", "</think>"],
     {"content": "", "reasoning": "\nThe user wants weather.\n",
      "calls": [("get_time", {"zone": "UTC"})]}),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', [],
     {"content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
      "calls": []}),
    ("hermes", 'Sure <tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call> done', [],
     {"content": 'Sure <tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call> done',
      "calls": []}),
    ("hermes", 'I think <tool_ is not a tag; <b>bold</b>', [],
     {"content": 'I think <tool_ is not a tag; <b>bold</b>', "calls": []}),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}', [],
     {"content": "", "calls": [("get_time", {"zone": "UTC"})]}),  # cut before the end tag
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Lima", "unit": '
     '"fahrenheit", "days": 3}}', [],
     {"content": "", "calls": [("get_weather", {"city": "Lima", "unit": "fahrenheit",
                                                "days": 3})]}),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "A"}}; '
     '{"name": "get_time", "parameters": {"zone": "B"}}', [],
     {"content": "", "calls": [("get_time", {"zone": "A"}), ("get_time", {"zone": "B"})]}),
    ("llama3_json", "The weather is fine {not json}", [],
     {"content": "The weather is fine {not json}", "calls": []}),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone": "A"', [],
     {"content": '{"name": "get_time", "parameters": {"zone": "A"', "calls": []}),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius", "days": 5}}, {"name": "get_time", "arguments": {"zone": "Z"}}]', [],
     {"content": "", "calls": [("get_weather", {"city": "Paris", "unit": "celsius",
                                                "days": 5}), ("get_time", {"zone": "Z"})]}),
    ("mistral", 'Calling.[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}', [],
     {"content": "Calling.", "calls": [("get_time", {"zone": "UTC"})]}),
    ("mistral", "[TOOL_CALLS]get_time[ARGS]{broken", [],
     {"content": "[TOOL_CALLS]get_time[ARGS]{broken", "calls": []}),
    ("mlx_lm:qwen3_coder", "<tool_call>\n<function=get_time>\n<parameter=zone>\nUTC\n"
     "</parameter>\n</function>\n</tool_call>", [],
     {"content": "", "calls": [("get_time", {"zone": "UTC"})]}),
    ("json", '{"name":"get_time","arguments":{"zone":"UTC"}}', [],
     {"content": "", "calls": [("get_time", {"zone": "UTC"})]}),
    ("", '<think>short</think>plain answer', ["<think>", "</think>"],
     {"content": "plain answer", "reasoning": "short", "calls": []}),
]


def run_parser(fmt: str, pieces: list[str], reasoning: list[str]) -> dict[str, Any]:
    p = ChoiceParser(chat=True, tools=TOOLS)
    got: dict[str, Any] = {"content": "", "reasoning": "", "calls": []}
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        d = Delta(0, piece, finish_reason="stop" if last else None, tool_parser=fmt,
                  reasoning=reasoning)
        for kind, value in p.feed(d):
            if kind == "call":
                got["calls"].append((value.name, json.loads(value.arguments)))
                assert value.id.startswith("call_")
            else:
                got[kind] += value
    got["finish"] = p.finish_reason
    return got


@pytest.mark.parametrize("fmt,text,reasoning,want", RECORDED,
                         ids=[f"{i}-{r[0] or 'none'}" for i, r in enumerate(RECORDED)])
def test_parser_on_recorded_output(fmt: str, text: str, reasoning: list[str],
                                   want: dict[str, Any]) -> None:
    whole = run_parser(fmt, [text], reasoning)
    assert whole["content"] == want["content"]
    assert whole["reasoning"] == want.get("reasoning", "")
    assert whole["calls"] == want["calls"]
    assert whole["finish"] == ("tool_calls" if want["calls"] else "stop")
    for k in range(len(text) + 1):  # streamed: split at every position
        assert run_parser(fmt, [text[:k], text[k:]], reasoning) == whole, k
    assert run_parser(fmt, list(text), reasoning) == whole  # one character per delta


def test_gateway_loads_mlx_lm_parsers_without_importing_mlx() -> None:
    code = ("import sys; from mlx_gw.gateway import app; "
            "from mlx_gw.gateway.translate import tool_calls; "
            "assert tool_calls.mlx_lm_parser('qwen3_coder') is not None; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', "
            "'transformers')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# ---------------------------------------------------------------- end to end


def build_tool_model(dest: Path, seed: int = 11) -> Path:
    build_tiny_llama(dest, seed=seed, max_position_embeddings=4096)
    (dest / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return dest


def build_thinking_model(dest: Path) -> Path:
    """A template that opens the thought in the generation prompt, as DeepSeek-R1's does: a
    random model never closes it, so its whole answer is reasoning."""
    build_tiny_llama(dest, seed=12)
    template = HERMES_TEMPLATE.replace("{%- if add_generation_prompt %}<|im_start|>assistant\n",
                                       "{%- if add_generation_prompt %}<|im_start|>assistant\n"
                                       "<think>\n")
    (dest / "chat_template.jinja").write_text(template)
    return dest


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    models = tmp_path_factory.mktemp("tool-models")
    config = {"gateway": {"port": 0}, "models": {
        "tools": {"type": "llm", "path": str(build_tool_model(models / "tools"))},
        "plain": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
        "llama": {"type": "llm", "path": str(tiny_dir / "tiny-1"),
                  "tool_parser": "llama3_json"},
        "thinker": {"type": "llm", "path": str(build_thinking_model(models / "thinker")),
                    "reasoning_parser": ["<think>", "</think>"]},
    }}
    yield from serving(config, tmp_path_factory.mktemp("gw-tools"))


def client(gw: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("model", ["tools", "plain", "llama"])
def test_required_tool_choice_returns_a_valid_call(gw: GatewayProc, model: str) -> None:
    r = client(gw).chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=120,
                                           temperature=1.0, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    check_call(call.function.name, call.function.arguments)


def test_named_tool_choice_streamed_with_the_sdk_helper(gw: GatewayProc) -> None:
    kw = dict(model="tools", messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    full = client(gw).chat.completions.create(**kw)
    with client(gw).chat.completions.stream(**kw) as stream:
        raw = [event for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    check_call(call.function.name, call.function.arguments)
    assert call.function.arguments == full.choices[0].message.tool_calls[0].function.arguments
    assert final.choices[0].finish_reason == "tool_calls"
    heads = [c.chunk.choices[0].delta.tool_calls[0] for c in raw
             if c.chunk.choices and c.chunk.choices[0].delta.tool_calls]
    assert heads[0].id and heads[0].function.name == "get_weather"
    assert heads[0].function.arguments == "" and all(h.index == 0 for h in heads)
    assert "".join(h.function.arguments or "" for h in heads[1:]) == call.function.arguments


def test_tools_reach_the_template_and_history_is_accepted(gw: GatewayProc) -> None:
    c = client(gw)

    def prompt_tokens(**kw: Any) -> int:
        return c.chat.completions.create(model="tools", max_tokens=1, **kw).usage.prompt_tokens

    bare = prompt_tokens(messages=ASK)
    assert prompt_tokens(messages=ASK, tools=TOOLS) > bare + 50
    assert prompt_tokens(messages=ASK, tools=TOOLS, tool_choice="none") == bare
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather",
                "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]
    assert prompt_tokens(messages=history, tools=TOOLS) > prompt_tokens(messages=ASK,
                                                                        tools=TOOLS) + 20


def test_auto_tool_choice_from_a_random_model_is_plain_content(gw: GatewayProc) -> None:
    r = client(gw).chat.completions.create(model="tools", messages=ASK, tools=TOOLS,
                                           max_tokens=16, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "code"}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "x",
                                                                      "arguments": "{"}}]}]},
     "messages[0].tool_calls"),
]


@pytest.mark.parametrize("extra,param", BAD_TOOLS)
def test_bad_tool_requests_are_400(gw: GatewayProc, extra: dict[str, Any], param: str) -> None:
    body = {"model": "tools", "messages": ASK, **extra}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unenforceable_tool_schema_is_a_400_naming_it(gw: GatewayProc) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(model="tools", messages=ASK, tools=[tool],
                                           tool_choice="required")
    assert "uniqueItems" in e.value.message and "tools[0]" in e.value.message


def test_litellm_tool_call(gw: GatewayProc) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(model="openai/tools", api_base=gw.url + "/v1", api_key="x",
                           messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
                           temperature=0)
    (call,) = r.choices[0].message.tool_calls
    check_call(call.function.name, call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"


def test_reasoning_content_when_the_prompt_opens_the_thought(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.chat.completions.create(model="thinker", messages=ASK, max_tokens=12, temperature=0)
    message = r.choices[0].message
    thought = message.model_extra["reasoning_content"]
    assert thought and message.content == ""
    chunks = list(c.chat.completions.create(model="thinker", messages=ASK, max_tokens=12,
                                            temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == thought
    assert not "".join(d.content or "" for d in deltas)
    m = httpx.post(gw.url + "/v1/messages", timeout=30, json={
        "model": "thinker", "max_tokens": 12, "temperature": 0, "messages": ASK}).json()
    assert m["content"] == [{"type": "thinking", "thinking": thought, "signature": ""}]
