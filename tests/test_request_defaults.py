"""What a request does not say (issue 21): the default completion bound, a deadline that keeps
the text generated so far, sampling defaults from the model's files and models.yaml, forced
tool calls with ordinary (open) schemas, and a cut that never ends in half a character.

Real gateway, real workers, tiny random-weight models. A sampled request with a seed is
deterministic (its sampler owns its PRNG chain), so "sampled" vs "greedy" is told apart by
comparing against an explicit temperature-0 answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import GatewayProc, serving
from tests.test_tools import build_tool_model

OPEN_TOOL = {"type": "function", "function": {  # as SDKs write them: no additionalProperties
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "properties": {"site": {"type": "string"}}}},
        "required": ["query", "filters"]}}}
ASK = [{"role": "user", "content": "Search the web for the capital of France."}]
HI = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    models = tmp_path_factory.mktemp("defaults-models")
    hot = models / "hot"
    build_tool_model(hot, seed=3)
    (hot / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 2.0, "eos_token_id": 0}))
    config = {"gateway": {"port": 0, "default_max_tokens": 9},
              "models": {
                  "plain": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
                  "bounded": {"type": "llm", "path": str(tiny_dir / "tiny-0"),
                              "max_tokens": 5},
                  "hot": {"type": "llm", "path": str(hot)},
                  "hot-tamed": {"type": "llm", "path": str(hot),
                                "sampling": {"temperature": 0}},
                  "tools": {"type": "llm", "path": str(build_tool_model(models / "tools"))},
              }}
    yield from serving(config, tmp_path_factory.mktemp("gw-defaults"))


def chat(gw: GatewayProc, **body: Any) -> dict[str, Any]:
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=120,
                   json={"messages": HI, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- 2. completion bound


def test_a_request_without_max_tokens_gets_the_model_or_gateway_bound(gw: GatewayProc) -> None:
    for model, bound in (("plain", 9), ("bounded", 5)):
        r = chat(gw, model=model, ignore_eos=True)
        assert r["usage"]["completion_tokens"] == bound, (model, r)
        assert r["choices"][0]["finish_reason"] == "length"
    r = chat(gw, model="bounded", ignore_eos=True, max_tokens=7)  # the client's bound wins
    assert r["usage"]["completion_tokens"] == 7


def test_a_request_out_of_time_keeps_its_text(start_gateway, tiny_dir: Path) -> None:
    """request_timeout is 2 s; 16,000 tokens take far longer. Whole answers keep what was
    generated, cut as by max_tokens; a stream ends with an error event, as before."""
    gw = start_gateway({"gateway": {"port": 0, "request_timeout": "2s"}, "models": {
        "long": {"type": "llm", "path": str(tiny_dir / "tiny-long")}}})
    long = {"model": "long", "ignore_eos": True, "max_tokens": 16000, "temperature": 0}
    r = chat(gw, **long)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length"
    assert 0 < r["usage"]["completion_tokens"] < 16000 and choice["message"]["content"]
    assert "hit its deadline (request_timeout 2s)" in gw.log()
    a = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0, timeout=60)
    m = a.messages.create(model="long", max_tokens=16000, messages=HI,
                          extra_body={"ignore_eos": True, "temperature": 0})
    assert m.stop_reason == "max_tokens" and m.content[0].text
    assert 0 < m.usage.output_tokens < 16000
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60,
                      json={"messages": HI, "stream": True, **long}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert '"code"' in lines[-1] and "deadline" in lines[-1]


# ---------------------------------------------------------------- 3. sampling defaults


def test_sampling_defaults_come_from_generation_config_then_models_yaml(
        gw: GatewayProc) -> None:
    def text(model: str, **kw: Any) -> str:
        return chat(gw, model=model, max_tokens=24, ignore_eos=True, seed=7,
                    **kw)["choices"][0]["message"]["content"]

    greedy = text("hot", temperature=0)
    assert text("hot") != greedy  # generation_config.json: temperature 2.0
    assert text("hot-tamed") == greedy  # models.yaml sampling: {temperature: 0}
    assert text("hot-tamed", temperature=2.0) == text("hot")  # the request wins
    # No generation_config.json and no GGUF keys: the fallback is greedy.
    assert text("plain") == text("plain", temperature=0)


# ---------------------------------------------------------------- 4. forced tool calls


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_with_an_open_schema_ends_in_a_valid_call(gw: GatewayProc,
                                                                 stream: bool) -> None:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)
    kw = dict(model="tools", messages=ASK, tools=[OPEN_TOOL], tool_choice="required",
              max_tokens=600, temperature=1.0)
    for seed in range(3):
        if stream:
            with c.chat.completions.stream(**kw, seed=seed) as s:
                for _ in s:
                    pass
                r = s.get_final_completion()
        else:
            r = c.chat.completions.create(**kw, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "search" and set(args) == {"query", "filters"}
        assert set(args["filters"]) <= {"site"}
        assert len(args["query"]) <= 256


# ---------------------------------------------------------------- 7. split characters


def test_a_cut_never_ends_in_half_a_character(gw: GatewayProc) -> None:
    """Force the first byte of a three-byte character (logit_bias) and cut after it."""
    from mlx_lm.tokenizer_utils import _byte_decoder
    from transformers import AutoTokenizer

    byte_char = {b: c for c, b in _byte_decoder().items()}[0xE6]  # lead byte of 日 (3 bytes)
    tok = AutoTokenizer.from_pretrained(_models(gw)["plain"]["path"])
    token = tok.convert_tokens_to_ids(byte_char)
    assert tok.decode([token]) == "\ufffd"
    r = chat(gw, model="plain", max_tokens=1, logit_bias={str(token): 100})
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["choices"][0]["message"]["content"] == ""


def _models(gw: GatewayProc) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(gw.config_path).read_text())["models"]
