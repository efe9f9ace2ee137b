"""Warm-up at load (issue 20) and the prompt cache's real memory, on the CPU.

A model with `warmup: full` runs its batch shapes before it is ready: /api/ps shows it
`warming` meanwhile, the events say `load`, `warming`, `ready` in that order, and the first
request after ready is served. `auto` on the CPU runs the minimal warm-up (no `warming`
state: it takes milliseconds), `off` none. And a
finished sequence's KV kept by the prompt cache costs what the cache counts, not the whole
batch's buffers it was sliced from.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayProc

WARM_BATCH = 32  # full warm-up of a tiny model at this max_batch: seconds on 2 busy cores


def _model(tiny_dir: Path, warmup: str | None, max_batch: int = 8) -> dict[str, Any]:
    m: dict[str, Any] = {"type": "llm", "path": str(tiny_dir / "tiny-0"), "max_batch": max_batch}
    if warmup is not None:
        m["warmup"] = warmup
    return m


def _load_watching(gw: GatewayProc, model: str) -> tuple[int, list[str]]:
    """POST /api/load while polling /api/ps: (load status, the model's states in order)."""
    states: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(httpx.post, gw.url + "/api/load", json={"model": model},
                           timeout=120)
        while not load.done():
            for m in gw.ps():
                if m["name"] == model and (not states or states[-1] != m["state"]):
                    states.append(m["state"])
            time.sleep(0.01)
        status = load.result().status_code
    states += [m["state"] for m in gw.ps() if m["name"] == model][-1:]
    return status, states


def _events(gw: GatewayProc, model: str) -> list[str]:
    body = httpx.get(gw.url + "/api/events", timeout=10).json()
    events = body["events"] if isinstance(body, dict) else body
    return [e["type"] for e in events if e.get("model") == model]


def _complete(gw: GatewayProc, model: str) -> dict[str, Any]:
    r = httpx.post(gw.url + "/v1/completions", timeout=60,
                   json={"model": model, "prompt": "Hello there", "max_tokens": 5,
                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_full_warm_up_shows_warming_then_serves(tiny_dir: Path, start_gateway: Any) -> None:
    gw = start_gateway({"gateway": {"port": 0},
                        "models": {"w": _model(tiny_dir, "full", WARM_BATCH)}})
    status, states = _load_watching(gw, "w")
    assert status == 200
    assert "warming" in states and states[-1] == "ready", states
    assert states.index("warming") < states.index("ready")
    kinds = [k for k in _events(gw, "w") if k in ("load", "warming", "ready")]
    assert kinds == ["load", "warming", "ready"], kinds
    body = _complete(gw, "w")
    assert body["usage"]["completion_tokens"] == 5
    line = re.search(r"warm-up \(full\): (\d+) steps", gw.log())
    assert line and int(line.group(1)) > 20, line  # prefill shapes, then decode sizes
    row = next(m for m in gw.ps() if m["name"] == "w")
    assert row["prompt_cache_entries"] == 0  # the warm-up's sequences are not kept
    assert row["in_flight"] == 0 and row["worker_in_flight"] == 0


def test_auto_is_minimal_on_the_cpu_and_off_skips_it(tiny_dir: Path,
                                                     start_gateway: Any) -> None:
    gw = start_gateway({"gateway": {"port": 0},
                        "models": {"a": _model(tiny_dir, None), "o": _model(tiny_dir, "off")}})
    for name in ("a", "o"):
        assert httpx.post(gw.url + "/api/load", json={"model": name}, timeout=120
                          ).status_code == 200
        assert _complete(gw, name)["usage"]["completion_tokens"] == 5
    for name in ("a", "o"):  # the minimal warm-up is no state of its own
        assert "warming" not in _events(gw, name)
    assert len(re.findall(r"warm-up \(minimal\)", gw.log())) == 1


def test_a_bad_warmup_mode_is_a_config_error(tiny_dir: Path, tmp_path: Path) -> None:
    from mlx_gw.config import ConfigError, load_config

    cfg = tmp_path / "models.yaml"
    cfg.write_text(f"models:\n  m: {{type: llm, path: {tiny_dir / 'tiny-0'}, warmup: always}}\n")
    with pytest.raises(ConfigError, match="warmup"):
        load_config(cfg)


def test_cached_kv_costs_what_the_cache_counts(tiny_dir: Path) -> None:
    """Each finished sequence's cache entry must not keep its batch's KV buffers alive: four
    waves of 32 sequences, every one kept, and MLX's active memory grows by about the
    bytes the prompt cache reports (without evaluating the copies it grew ~20x more)."""
    import mlx.core as mx

    from mlx_gw.worker.engines.llm import LLMEngine, load_model
    from mlx_gw.worker.protocol import Generate, Load

    model, tok, _ = load_model(Load(name="m", type="llm", path=str(tiny_dir / "tiny-long")))
    engine = LLMEngine(model, tok, context_length=4096, max_batch=32,
                       prompt_cache_bytes=1 << 40)
    mx.synchronize()
    base = mx.get_active_memory()
    rid = 0
    for wave in range(4):
        for i in range(32):
            rid += 1
            engine.submit(Generate(rid=rid, prompt=[1 + (wave * 97 + i * 7 + j) % 500
                                                    for j in range(200)],
                                   max_tokens=20 + i, temperature=0.0, ignore_eos=True))
        while engine.busy:
            engine.step()
    mx.synchronize()
    grown = mx.get_active_memory() - base
    assert engine.prompt_cache.entries > 32
    assert grown < 2 * engine.prompt_cache.nbytes + (16 << 20), (grown, engine.prompt_cache.nbytes)
    engine.close()


def test_a_short_shared_opening_is_no_cache_hit(tiny_dir: Path) -> None:
    """Prompts that share only a few leading tokens with a cached entry (a template's
    opening) prefill from scratch: the hit would save little and cost a copy of the entry
    and the cache-merging path. A long shared prefix still hits."""
    from mlx_gw.worker.engines.llm import LLMEngine, load_model
    from mlx_gw.worker.engines.prompt_cache import MIN_HIT_TOKENS
    from mlx_gw.worker.protocol import Generate, Load

    model, tok, _ = load_model(Load(name="m", type="llm", path=str(tiny_dir / "tiny-long")))
    engine = LLMEngine(model, tok, context_length=4096, max_batch=4, prompt_cache_bytes=1 << 30)
    base = [1 + (j * 7) % 500 for j in range(200)]

    def cached(rid: int, prompt: list[int]) -> int:
        engine.submit(Generate(rid=rid, prompt=prompt, max_tokens=2, temperature=0.0,
                               ignore_eos=True))
        first = None
        while engine.busy:
            for d in engine.step():
                first = d if first is None else first
        assert first is not None
        return first.cached_tokens

    assert cached(1, base) == 0
    short = base[:MIN_HIT_TOKENS - 4] + [499 - j % 400 for j in range(150)]
    assert cached(2, short) == 0
    long = base[:150] + [3, 5, 7, 11]
    assert cached(3, long) >= 150
    engine.close()


def test_bench_models_never_pick_a_token_the_detokenizer_holds(tiny_dir: Path) -> None:
    """bench.make_model keeps only ids whose text streams at once: a lone space is held by
    mlx-lm's streaming detokenizer until the next token, and a random model's greedy loop on
    it streamed nothing for 2.5-3.5 s at 64-128 streams on the H200 (no step was slow)."""
    from transformers import PreTrainedTokenizerFast

    from bench.make_model import _visible_ids

    fast = PreTrainedTokenizerFast.from_pretrained(str(tiny_dir / "tiny-0"))
    ids = _visible_ids(fast, len(fast))
    spaces = [i for i in range(len(fast)) if fast.decode([i]).isspace()]
    assert spaces and not set(spaces) & set(ids)
    assert len(ids) > 100
