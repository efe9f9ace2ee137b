"""LiteLLM as the client, as users put it in front of the gateway."""

from __future__ import annotations

import os

import pytest

from tests.conftest import GatewayProc

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here
litellm = pytest.importorskip("litellm")

MESSAGES = [{"role": "user", "content": "Say something"}]


def test_litellm_completion_and_stream(gateway: GatewayProc) -> None:
    kw = dict(model="openai/gpt-4o-mini", api_base=gateway.url + "/v1", api_key="unused",
              messages=MESSAGES, max_tokens=8, temperature=0)
    r = litellm.completion(**kw)
    assert r.usage.completion_tokens == 8
    text = r.choices[0].message.content
    assert text
    chunks = list(litellm.completion(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert any(getattr(c, "usage", None) and c.usage.completion_tokens == 8 for c in chunks)


def test_litellm_passes_keep_alive_through_extra_body(gateway: GatewayProc) -> None:
    r = litellm.completion(model="openai/tiny-1", api_base=gateway.url + "/v1", api_key="x",
                           messages=MESSAGES, max_tokens=2,
                           extra_body={"keep_alive": "1m", "ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_litellm_maps_context_overflow(gateway: GatewayProc) -> None:
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model="openai/tiny-0", api_base=gateway.url + "/v1", api_key="x",
                           messages=[{"role": "user", "content": "word " * 2000}],
                           max_tokens=4, num_retries=0)
