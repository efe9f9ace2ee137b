"""Speculative decoding inside the batch (issue 17, part 1), on the f32 tiny models.

Greedy output is identical with and without speculation for a batch of 8, with prompt lookup
(ngram) and with a draft model (the model itself: every proposal right; another tiny model:
most wrong), also for greedy rows sharing the batch with sampled ones; sampled rows speculate
by rejection sampling and their first tokens have the exact distribution the target's own
logits give (chi-square, both methods), and through a real gateway a sampled request's
proposals are accepted; a draft with another tokenizer is refused at load
with a clear error; the acceptance counters reach /api/ps and /metrics.
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
    assert gate.proposed > 0 and gate.accepted > 0, (gate.proposed, gate.accepted)
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
    for _ in range(MISSES_OFF):  # rows with nothing to propose: a short rest, then again
        assert gate.on
        gate.no_proposal()
        gate.plain(0.1)
    assert not gate.on
    for _ in range(MISS_REST_STEPS):
        gate.plain(0.1)
    assert gate.on


# Sampled rows (temperature > 0) speculate by rejection sampling: their output must have the
# sampler's exact distribution. The reference is computed from the target itself (one forward
# pass per prefix, the filters and temperature applied here with numpy), so the test needs no
# second sampled run; a wrong rule (accepting every proposal, drawing the residual from p instead of
# max(0, p - q), accepting with p(x) instead of p(x)/q(x), ignoring top-k) moves the
# distribution of the first tokens far out of the chi-square bound at this N (p-values of
# 1e-10 to 1e-57 where the right rule gives 0.03 to 0.9).
DEPTH = 3  # tokens per sample: the first is the prefill's, the next ones are speculated
SAMPLES, ROWS = 768, 4  # rows per batch: the batch's common acceptance count m is exercised


def _filtered(logits: Any, sampling: dict[str, Any]) -> Any:
    """The probabilities mlx-lm's sampler draws from (top-p, min-p, top-k, then temperature),
    written out with numpy: the tokens whose more likely tokens hold less than top_p of the
    mass, those within min_p of the best, the top_k best."""
    import numpy as np

    lp = logits - logits.max()
    lp = lp - np.log(np.exp(lp).sum())
    keep = np.ones(lp.shape, dtype=bool)
    order = np.argsort(-lp)
    if sampling.get("top_p"):
        before = np.cumsum(np.exp(lp[order])) - np.exp(lp[order])
        keep[order[before >= sampling["top_p"]]] = False
    if sampling.get("min_p"):
        keep &= lp >= lp.max() + np.log(sampling["min_p"])
    if sampling.get("top_k"):
        keep[order[sampling["top_k"]:]] = False
    z = np.where(keep, lp / sampling["temperature"], -np.inf)
    w = np.exp(z - z.max())
    return w / w.sum()


def _exact(model_dir: Path, prompt: list[int],
           sampling: dict[str, Any]) -> dict[tuple[str, ...], float]:
    """P(first DEPTH tokens) under `sampling`, from the target's own logits, keyed by text."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    model, tok = load(str(model_dir))
    out: dict[tuple[str, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == DEPTH:
            key = tuple(tok.decode([t]) for t in prefix)
            out[key] = out.get(key, 0.0) + prob
            return
        logits = np.array(model(mx.array([prompt + prefix]))[0, -1].astype(mx.float32))
        probs = _filtered(logits.astype(np.float64), sampling)
        for t in np.flatnonzero(probs):
            walk([*prefix, int(t)], prob * float(probs[t]))

    walk([], 1.0)
    return out


def _chi2_p(counts: dict[tuple[str, ...], int], exact: dict[tuple[str, ...], float]) -> float:
    """Goodness-of-fit p-value (categories expecting fewer than 5 pooled; Wilson-Hilferty)."""
    import math

    n = sum(counts.values())
    assert set(counts) <= set(exact), set(counts) - set(exact)  # e.g. a token outside top-k
    big = [k for k, p in exact.items() if p * n >= 5]
    cells = [(counts.get(k, 0), exact[k] * n) for k in big]
    rest = n - sum(o for o, _ in cells)
    if n - sum(e for _, e in cells) > 0:
        cells.append((rest, n - sum(e for _, e in cells)))
    stat, df = sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _sample(tiny: Path, prompt: list[int], sampling: dict[str, Any], samples: int,
            **load: Any) -> tuple[dict[tuple[str, ...], int], Any]:
    import mlx.core as mx

    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.protocol import Generate, Load

    mx.random.seed(17)  # unseeded requests share the global PRNG: the run is reproducible
    engine = LLMEngine.from_load(Load(name="t", type="llm", path=str(tiny), max_batch=ROWS,
                                      prompt_cache_bytes=0, **load))
    counts: dict[tuple[str, ...], int] = {}
    rid = 0
    for _ in range(samples // ROWS):
        tokens: dict[int, list[str]] = {}
        for _ in range(ROWS):
            rid += 1
            tokens[rid] = []
            engine.submit(Generate(rid=rid, prompt=prompt, max_tokens=DEPTH, ignore_eos=True,
                                   logprobs=True, **sampling))
        while engine.busy:
            for d in engine.step():
                tokens[d.rid] += [lp.token for lp in d.logprobs or []]
        for t in tokens.values():
            counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    engine.close()
    return counts, engine.spec


@pytest.fixture(scope="module")
def sharp_draft(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-0 with its output projection doubled: the same ranking, a sharper distribution,
    so its proposals are often but not always accepted, and the residual max(0, p - q) a
    rejection draws from is far from p."""
    import mlx.core as mx

    dest = tmp_path_factory.mktemp("sharp") / "sharp"
    shutil.copytree(tiny_dir / "tiny-0", dest)
    weights = mx.load(str(dest / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2.0
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    return dest


def _prompt(tiny: Path, *, looping: bool) -> list[int]:
    """A short prompt; `looping`: followed by tiny-0's own greedy continuation, which ends in
    a loop that sampled continuations often repeat, so prompt lookup has proposals, some of
    them rejected."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(tiny))
    ids = tok.encode("one two three four")
    if not looping:
        return ids
    steps = generate_step(mx.array(ids), model, max_tokens=60)
    return ids + [int(t) for t, _ in steps]


NUCLEUS = {"temperature": 0.7, "top_p": 0.8, "min_p": 0.05}


# The nucleus case checks the other filters (a wrong one samples outside the support at once):
# half the samples.
@pytest.mark.parametrize(("method", "sampling", "samples"),
                         [("ngram", SAMPLING, SAMPLES), ("draft", SAMPLING, SAMPLES),
                          ("draft", NUCLEUS, SAMPLES // 2)],
                         ids=["ngram-top_k", "draft-top_k", "draft-top_p-min_p"])
def test_sampled_rows_speculate_with_the_exact_distribution(
        tiny_dir: Path, sharp_draft: Path, method: str, sampling: dict[str, Any], samples: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_gw.worker.engines import speculative

    # Speculate on every step from the first, whatever the timing says.
    monkeypatch.setattr(speculative, "PROBE_STEPS", 0)
    monkeypatch.setattr(speculative, "PAYS", 0.0)
    monkeypatch.setattr(speculative, "MISSES_OFF", 10**9)
    tiny = tiny_dir / "tiny-0"
    prompt = _prompt(tiny, looping=method == "ngram")
    load = {"spec_draft_path": str(sharp_draft)} if method == "draft" else {}
    counts, gate = _sample(tiny, prompt, sampling, samples, speculative=method, spec_tokens=3,
                           **load)
    assert gate.accepted > 0 and gate.proposed > gate.accepted, (gate.proposed, gate.accepted)
    p = _chi2_p(counts, _exact(tiny, prompt, sampling))
    assert p > 1e-3, (p, sorted(counts.items(), key=lambda kv: -kv[1])[:8])
