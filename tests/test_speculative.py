"""Speculative decoding inside the batch (issue 17, part 1), on the f32 tiny models.

Greedy output is identical with and without speculation for a batch of 8, with prompt lookup
(ngram) and with a draft model (the model itself: every proposal right; another tiny model:
most wrong), also for greedy rows sharing the batch with sampled ones; a seeded row keeps
its seed's output; through a real gateway a sampled request's proposals are accepted
(their exact distribution: tests/test_spec_sampling.py); a draft with another tokenizer is
refused at load with a clear error; the acceptance counters reach /api/ps and /metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayProc, serving

NEW_TOKENS = 120  # long enough for greedy tiny-model output to repeat itself
SAMPLING = {"temperature": 0.7, "top_k": 3}  # the sampled rows' settings
# Repetitive prompts (a text to edit, a list to continue): prompt lookup finds n-grams again.
PROMPTS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog. the quick brown fox",
    "def main(): return 0; def main(): return 0; def main(): return",
    "one two three four one two three four one two three",
    "The gateway starts one worker. The gateway starts one worker. The gateway",
    "hello world thank you please hello world thank you please hello",
    "Café au lait, naïve façade, Café au lait, naïve",
    "What is two plus two? Four. What is two plus two?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 Numbers: 0 1 2 3",
]


def _run(tiny: Path, prompts: list[str], sampled: tuple[int, ...] = (), seed: int | None = None,
         **load: Any) -> tuple[list[str], Any]:
    """Each prompt's output (greedy, but rows in `sampled` sample, with `seed` if given) and
    the engine's Gate."""
    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.protocol import Generate, Load

    engine = LLMEngine.from_load(Load(name="t", type="llm", path=str(tiny), max_batch=8,
                                      prompt_cache_bytes=0, **load))
    texts = [""] * len(prompts)
    for i, text in enumerate(prompts):
        sampling = {**SAMPLING, "seed": seed} if i in sampled else {"temperature": 0.0}
        engine.submit(Generate(rid=i + 1, prompt=text, max_tokens=NEW_TOKENS, ignore_eos=True,
                               **sampling))
    while engine.busy:
        for d in engine.step():
            texts[d.rid - 1] += d.text
    engine.close()
    return texts, engine.spec


@pytest.fixture(scope="module")
def plain(tiny_dir: Path) -> list[str]:
    return _run(tiny_dir / "tiny-0", PROMPTS)[0]


def test_ngram_speculation_keeps_greedy_output(tiny_dir: Path, plain: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_gw.worker.engines import speculative

    # Try every step however often a row has nothing to propose: this batch's rows rarely
    # all have one, and the point is to verify many steps of eight different rows.
    monkeypatch.setattr(speculative, "MISSES_OFF", 10**9)
    texts, gate = _run(tiny_dir / "tiny-0", PROMPTS, speculative="ngram", spec_tokens=4)
    assert texts == plain
    assert gate.proposed > 0, gate.proposed  # eight different rows verified together
    cycling = PROMPTS[:2] * 4  # eight rows whose output soon repeats: most proposals right
    texts, gate = _run(tiny_dir / "tiny-0", cycling, speculative="ngram", spec_tokens=4)
    assert texts == plain[:2] * 4
    assert gate.accepted > gate.proposed // 2, (gate.proposed, gate.accepted)


def test_greedy_rows_beside_sampled_rows_keep_their_output(tiny_dir: Path, plain: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_gw.worker.engines import speculative

    monkeypatch.setattr(speculative, "PAYS", 0.0)  # speculate whatever the timing says
    # The model drafting for itself, so the sampled rows accept most proposals too.
    texts, gate = _run(tiny_dir / "tiny-0", PROMPTS, sampled=(1, 3, 5, 7), speculative="draft",
                       spec_tokens=3, spec_draft_path=str(tiny_dir / "tiny-0"))
    assert texts[0::2] == plain[0::2]
    assert texts[1::2] != plain[1::2]
    assert gate.accepted > gate.proposed // 2, (gate.proposed, gate.accepted)


def test_seeded_rows_keep_their_seeds_output(tiny_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded row samples from its own key chain, so its output is its seed's; speculating
    (when depends on timing) would change which draws it uses, so its batch steps plainly."""
    from mlx_gw.worker.engines import speculative

    monkeypatch.setattr(speculative, "PAYS", 0.0)
    rows = tuple(range(len(PROMPTS)))
    alone = _run(tiny_dir / "tiny-0", PROMPTS, sampled=rows, seed=5)[0]
    texts, gate = _run(tiny_dir / "tiny-0", PROMPTS, sampled=rows, seed=5, speculative="draft",
                       spec_tokens=3, spec_draft_path=str(tiny_dir / "tiny-0"))
    assert texts == alone and gate.proposed == 0


def test_ngram_speculation_on_a_quantized_kv_cache(tmp_path: Path) -> None:
    from tests.tiny_models import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "wide", hidden_size=128, num_heads=4)  # head size 32
    cycling = PROMPTS[:2] * 4
    q8 = {"kv_bits": 8, "kv_group_size": 32}
    plain8 = _run(tiny, cycling, **q8)[0]
    texts, gate = _run(tiny, cycling, **q8, speculative="ngram")
    assert texts == plain8 and gate.accepted > 0


@pytest.mark.parametrize("draft", ["tiny-0", "tiny-1"])
def test_draft_speculation_keeps_greedy_output(tiny_dir: Path, plain: list[str],
                                               draft: str) -> None:
    texts, gate = _run(tiny_dir / "tiny-0", PROMPTS, speculative="draft", spec_tokens=3,
                       spec_draft_path=str(tiny_dir / draft))
    assert texts == plain
    assert gate.proposed > 0
    if draft == "tiny-0":  # the model drafting for itself: every proposal right
        assert gate.accepted == gate.proposed, (gate.accepted, gate.proposed)


def _other_tokenizer(src: Path, dest: Path) -> Path:
    """A copy of a tiny model whose tokenizer maps two tokens the other way round."""
    shutil.copytree(src, dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    return dest


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("gw-spec")
    other = _other_tokenizer(tiny_dir / "tiny-1", root / "other-tok")
    path = str(tiny_dir / "tiny-0")
    config = {"gateway": {"port": 0}, "models": {
        "ng": {"type": "llm", "path": path, "speculative": {"method": "ngram"}},
        "dr": {"type": "llm", "path": path,
               "speculative": {"method": "draft", "num_tokens": 2, "draft_model": "ng"}},
        "bad": {"type": "llm", "path": path,
                "speculative": {"method": "draft", "draft_model": str(other)}}}}
    yield from serving(config, root / "gw")


def _complete(g: GatewayProc, model: str, prompt: str) -> httpx.Response:
    return httpx.post(g.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "temperature": 0, "max_tokens": NEW_TOKENS,
        "ignore_eos": True})


def test_acceptance_shows_in_ps_and_metrics(gw: GatewayProc, plain: list[str]) -> None:
    for model in ("ng", "dr"):
        r = _complete(gw, model, PROMPTS[0])
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == plain[0]
    spec = {m["name"]: m["speculative"] for m in gw.ps()}
    assert spec["ng"]["method"] == "ngram" and spec["dr"]["method"] == "draft"
    # Heartbeats come once a second: wait for the figures of the request that just ran.
    from tests.conftest import wait_for

    def figures() -> dict[str, Any]:
        s = {m["name"]: m["speculative"] for m in gw.ps()}
        return s if all(s[n]["proposed"] > 0 for n in ("ng", "dr")) else {}

    spec = wait_for(figures, 10, "speculation figures in /api/ps")
    assert spec["dr"]["accepted"] == spec["dr"]["proposed"]  # the model drafting for itself
    assert 0 < spec["ng"]["acceptance_rate"] <= 1
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'mlxgw_spec_tokens_total{kind="proposed",model="ng"}' in text
    assert 'mlxgw_spec_tokens_total{kind="accepted",model="dr"}' in text


def test_a_sampled_request_speculates_through_the_gateway(gw: GatewayProc) -> None:
    from tests.conftest import wait_for

    def accepted() -> int:
        return {m["name"]: m for m in gw.ps()}.get("dr", {}).get("speculative", {}).get(
            "accepted", 0)

    before = accepted()
    r = httpx.post(gw.url + "/v1/completions", timeout=120, json={
        "model": "dr", "prompt": PROMPTS[0], "temperature": 0.7, "top_p": 0.9,
        "max_tokens": NEW_TOKENS, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == NEW_TOKENS
    # The model drafting for itself: a sampled row keeps nearly every proposal (p/q = 1).
    wait_for(lambda: accepted() > before, 10, "sampled tokens accepted in /api/ps")


def test_a_draft_with_another_tokenizer_is_refused(gw: GatewayProc) -> None:
    r = httpx.post(gw.url + "/api/load", json={"model": "bad"}, timeout=120)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "model_load_failed"
    assert "another tokenizer than the target" in err["message"], err["message"]


def test_config_checks_speculative(tiny_dir: Path) -> None:
    from mlx_gw.config import ConfigError, parse_config

    path = str(tiny_dir / "tiny-0")

    def parse(spec: Any) -> Any:
        return parse_config({"models": {"m": {"type": "llm", "path": path,
                                              "speculative": spec}}})

    assert parse({"method": "ngram"}).models["m"].speculative.num_tokens == 4
    sp = parse({"method": "draft", "draft_model": str(tiny_dir / "tiny-1")}).models["m"]
    assert sp.speculative.draft_path == str(tiny_dir / "tiny-1")
    for bad, match in [({"method": "medusa"}, "not one of ngram, draft"),
                       ({"method": "draft"}, "needs `draft_model`"),
                       ({"method": "ngram", "num_tokens": 0}, "num_tokens"),
                       ({"method": "draft", "draft_model": "nowhere"}, "neither a configured"),
                       ({"method": "ngram", "k": 2}, "unknown key `k`")]:
        with pytest.raises(ConfigError, match=match):
            parse(bad)


def test_admission_counts_the_draft_models_memory(tiny_dir: Path) -> None:
    from mlx_gw.config import parse_config
    from mlx_gw.gateway.supervision.memory import estimate_bytes

    path, draft = str(tiny_dir / "tiny-0"), str(tiny_dir / "tiny-1")
    models = parse_config({"models": {
        "plain": {"type": "llm", "path": path},
        "ngram": {"type": "llm", "path": path, "speculative": {"method": "ngram"}},
        "drafted": {"type": "llm", "path": path,
                    "speculative": {"method": "draft", "draft_model": draft}},
        "draft": {"type": "llm", "path": draft}}}).models
    baseline = 200 * 2**20
    plain = estimate_bytes(models["plain"], baseline)
    assert estimate_bytes(models["ngram"], baseline) == plain
    # the worker loads the draft's weights (and keeps its KV) beside the target's
    assert estimate_bytes(models["drafted"], baseline) == \
        plain + estimate_bytes(models["draft"], baseline) - baseline


def test_the_gate_turns_speculation_off_while_it_does_not_pay_and_probes_again() -> None:
    from mlx_gw.worker.engines.speculative import (
        BACKOFF_START,
        MISS_REST_STEPS,
        MISSES_OFF,
        PROBE_STEPS,
        Gate,
    )

    gate = Gate()
    for _ in range(PROBE_STEPS):  # first plain steps measure the plain rate: 10 tok/s a row
        assert not gate.on and not gate.backing_off
        gate.plain(0.1)
    assert gate.on
    for _ in range(3):  # speculative steps at 2 tokens in 0.5 s: 4 tok/s, slower
        gate.spec(0.5, 2, proposed=4, accepted=1)
    assert not gate.on and gate.backing_off
    for _ in range(BACKOFF_START):
        gate.plain(0.1)
    assert gate.on  # probes again: one slow step is enough now, and the rest is twice as long
    gate.spec(0.5, 2, proposed=4, accepted=1)
    assert not gate.on
    for _ in range(2 * BACKOFF_START):
        gate.plain(0.1)
    assert gate.on
    gate.spec(0.1, 4, proposed=4, accepted=3)  # now 40 tok/s: it pays, it stays on
    gate.spec(0.1, 4, proposed=4, accepted=3)
    assert gate.on and (gate.proposed, gate.accepted) == (24, 10)
    rate = gate.plain_rate
    for _ in range(MISSES_OFF):  # rows with nothing to propose: a short rest, then again
        assert gate.on
        gate.no_proposal()
        gate.plain(1.0, measured=False)  # right after a verify: not measured
    assert not gate.on and gate.plain_rate == rate
    for _ in range(MISS_REST_STEPS):
        gate.plain(0.1)
    assert gate.on


def test_a_plain_step_right_after_a_verify_does_not_set_the_plain_rate(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verify waits for its own result, so the plain step after it starts with nothing in
    flight and returns at once: timed, it would make plain decoding look far faster than it
    is. A try that finds a row without a recurring n-gram does not wait for the queued token,
    so its plain step is timed. Real engine, real steps."""
    from mlx_gw.worker.engines import speculative
    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.protocol import Generate, Load

    monkeypatch.setattr(speculative, "MISSES_OFF", 10**9)  # keep trying every step
    monkeypatch.setattr(speculative, "PAYS", 0.0)  # and keep speculating once it found one
    engine = LLMEngine.from_load(Load(name="t", type="llm", path=str(tiny_dir / "tiny-0"),
                                      max_batch=8, prompt_cache_bytes=0, speculative="ngram",
                                      spec_tokens=4))
    # Rows whose output soon repeats: verifies, and plain steps when some row has no n-gram.
    for i, text in enumerate(PROMPTS[:2] * 4):
        engine.submit(Generate(rid=i + 1, prompt=text, max_tokens=60, ignore_eos=True,
                               temperature=0.0))
    gate, after_verify, timed_tries, verified = engine.spec, 0, 0, False
    while engine.busy:
        tried, rate, proposed = gate.on, gate.plain_rate, gate.proposed
        engine.step()
        if gate.proposed != proposed:
            verified = True
            continue
        if verified:  # the first plain step after a verify: counted, not timed
            after_verify += 1
            assert gate.plain_rate == rate
        elif tried and rate and gate.plain_rate != rate:
            timed_tries += 1  # a try that found nothing without waiting: a step's time
        verified = False
    engine.close()
    assert after_verify > 0 and timed_tries > 0, (after_verify, timed_tries)


def test_whole_buffer_attention_masks_the_positions_not_written() -> None:
    """Within `whole_buffer` a batch cache hands attention its whole buffer (a length that
    changes once per 256 positions: one cuDNN graph, not one per step), its mask hides
    every position past the written ones, and attention gives what it gives without."""
    import mlx.core as mx
    from mlx_lm.models.base import create_causal_mask
    from mlx_lm.models.cache import BatchKVCache

    from mlx_gw.worker.engines import whole_buffer as wb

    def kv(n: int) -> tuple[mx.array, mx.array]:
        return mx.random.normal((2, 2, n, 16)), mx.random.normal((2, 2, n, 16))

    first, (keys, values) = kv(3), kv(5)
    cache, ref = BatchKVCache(left_padding=[1, 0]), BatchKVCache(left_padding=[1, 0])
    for c in (cache, ref):
        c.update_and_fetch(*first)
    q = mx.random.normal((2, 4, 5, 16))
    want_mask = create_causal_mask(5, offset=3, left_padding=ref.left_padding)
    k_ref, v_ref = ref.update_and_fetch(keys, values)
    want = mx.fast.scaled_dot_product_attention(q, mx.repeat(k_ref, 2, 1), mx.repeat(v_ref, 2, 1),
                                                scale=0.25, mask=want_mask)
    full = BatchKVCache(left_padding=[0, 0])  # 254 written: these 5 grow its buffer
    full.update_and_fetch(*kv(254))
    old_on, wb.ON = wb.ON, True
    try:
        with wb.whole_buffer([cache, full], 5):
            mask = cache.make_mask(5)
            k, v = cache.update_and_fetch(keys, values)
            grown_mask = full.make_mask(5)
            grown = full.update_and_fetch(keys, values)[0]
    finally:
        wb.ON = old_on
    assert grown.shape[2] == grown_mask.shape[-1] == 254 + 256  # grown before the mask
    assert k.shape[2] == v.shape[2] == mask.shape[-1] == cache.step == 256
    assert mx.array_equal(mask[..., :8], want_mask).item()
    assert not mask[..., 8:].any().item()
    got = mx.fast.scaled_dot_product_attention(q, mx.repeat(k, 2, 1), mx.repeat(v, 2, 1),
                                               scale=0.25, mask=mask)
    assert mx.allclose(got, want, atol=1e-5).item()
    assert cache.update_and_fetch(*kv(1))[0].shape[2] == 9  # outside: the written positions


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_verify_over_the_whole_buffer_keeps_greedy_output(
        tiny_dir: Path, plain: list[str], method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (verify passes attend over the whole KV buffer) forced on here: the
    output is the same token for token, for the target's caches and the draft's."""
    from mlx_gw.worker.engines import speculative, whole_buffer

    monkeypatch.setattr(whole_buffer, "ON", True)
    monkeypatch.setattr(speculative, "MISSES_OFF", 10**9)
    monkeypatch.setattr(speculative, "PAYS", 0.0)  # verify every step it can
    extra = {"spec_draft_path": str(tiny_dir / "tiny-0")} if method == "draft" else {}
    cycling = PROMPTS[:2] * 4
    texts, gate = _run(tiny_dir / "tiny-0", cycling, speculative=method, spec_tokens=3, **extra)
    assert texts == plain[:2] * 4
    assert gate.accepted > gate.proposed // 2, (gate.proposed, gate.accepted)
