"""LiteLLM as the client, as users put it in front of the gateway."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

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


def _expires_in_s(gw: GatewayProc, model: str) -> float:
    """Seconds from now until the model's expiry, read from /api/ps."""
    row = next(m for m in gw.ps() if m["name"] == model)
    at = datetime.strptime(row["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return at.timestamp() - time.time()


def test_litellm_passes_keep_alive_through_extra_body(gateway: GatewayProc) -> None:
    """keep_alive sent through LiteLLM's extra_body sets the model's expiry: 1h, then 2m, each
    far from the gateway default (5m), so a gateway that ignored it would show 5m both times."""
    for keep_alive, seconds in (("1h", 3600), ("2m", 120)):
        r = litellm.completion(model="openai/tiny-1", api_base=gateway.url + "/v1",
                               api_key="x", messages=MESSAGES, max_tokens=2,
                               extra_body={"keep_alive": keep_alive, "ignore_eos": True})
        assert r.usage.completion_tokens == 2
        left = _expires_in_s(gateway, "tiny-1")
        assert seconds - 30 < left <= seconds + 1, (keep_alive, left)


def test_litellm_maps_context_overflow(gateway: GatewayProc) -> None:
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model="openai/tiny-0", api_base=gateway.url + "/v1", api_key="x",
                           messages=[{"role": "user", "content": "word " * 2000}],
                           max_tokens=4, num_retries=0)
