"""Sampled rows speculate by rejection sampling (issue 17): their output keeps the exact
distribution of the row's sampler, on the f32 tiny models, with prompt lookup and a draft.

The engine (LLMEngine, what a worker runs) samples many continuations in batches of a few
rows; the reference is computed from the target itself (one forward pass per prefix, the
filters and temperature applied here with numpy), so no second sampled run is needed. A wrong
rule (accepting every proposal, drawing the residual from p instead of max(0, p - q),
accepting with p(x) instead of p(x)/q(x), skipping top-k or top-p/min-p) moves the
distribution of the first tokens far out of the chi-square bound at this N (p-values of 5e-7
to 2e-28, or tokens outside the support, where the right rule gives 0.24 to 0.88).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

SAMPLING = {"temperature": 0.7, "top_k": 3}
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
    counts, gate = _sample(tiny, prompt, sampling, samples, speculative=method, spec_tokens=2,
                           **load)
    assert gate.accepted > 0 and gate.proposed > gate.accepted, (gate.proposed, gate.accepted)
    p = _chi2_p(counts, _exact(tiny, prompt, sampling))
    assert p > 1e-3, (p, sorted(counts.items(), key=lambda kv: -kv[1])[:8])
