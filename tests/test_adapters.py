"""LoRA adapters: many fine-tunes served by their base model's one worker (issue 17, part 2).

Adapters are written at test time in mlx-lm's format (adapter_config.json +
adapters.safetensors, random LoRA weights of the tiny llama's shapes). In-process, the engine's
output for an adapter equals mlx-lm's own `load_adapters` model, and a mixed batch (base and
two adapters) equals each alone. Through a real gateway: adapters from models.yaml and one
added at run time answer differently from each other and from the base, all from one worker
pid; the base answers exactly as a plain copy of the model; adapters come and go at run time;
bad requests get OpenAI-shaped errors.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayProc, serving

PROMPT = [{"role": "user", "content": "Tell me about the town by the sea."}]
NEW_TOKENS = 12


def make_adapter(dest: Path, seed: int, *, rank: int = 4, hidden: int = 64, kv_out: int = 32,
                 layers: int = 2, keys: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter for the tiny llama (tests/tiny_models.py shapes) with random A and B."""
    import mlx.core as mx

    dest.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    weights = {}
    for i in range(layers):
        for k in keys:
            out = hidden if k == "q_proj" else kv_out
            prefix = f"model.layers.{i}.self_attn.{k}"
            weights[f"{prefix}.lora_a"] = mx.random.normal((hidden, rank)) * 0.5
            weights[f"{prefix}.lora_b"] = mx.random.normal((rank, out)) * 0.5
    mx.save_safetensors(str(dest / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": layers,
              "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0,
                                  "keys": [f"self_attn.{k}" for k in keys]}}
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"a1": make_adapter(root / "a1", 1), "a2": make_adapter(root / "a2", 2),
            "narrow": make_adapter(root / "narrow", 3, hidden=32)}  # fits no tiny model


# ---------------------------------------------------------------- in-process: the engine


def _engine_outputs(tiny: Path, adapter_dirs: dict[str, Path], asks: list[str],
                    messages: list[dict[str, str]] = PROMPT) -> list[str]:
    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.protocol import Generate, Load

    engine = LLMEngine.from_load(Load(name="t", type="llm", path=str(tiny),
                                      adapters={k: str(v) for k, v in adapter_dirs.items()},
                                      prompt_cache_bytes=0))
    texts = [""] * len(asks)
    for i, adapter in enumerate(asks):
        engine.submit(Generate(rid=i + 1, messages=messages, max_tokens=NEW_TOKENS,
                               temperature=0.0, ignore_eos=True, adapter=adapter))
    while engine.busy:
        for d in engine.step():
            texts[d.rid - 1] += d.text
    engine.close()
    return texts


def test_engine_matches_mlx_lm_load_adapters_and_mixed_batches(tiny_dir: Path,
                                                               adapters: dict[str, Path]) -> None:
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tuner.utils import load_adapters

    tiny = tiny_dir / "tiny-0"
    two = {"a1": adapters["a1"], "a2": adapters["a2"]}
    alone = [_engine_outputs(tiny, two, [a])[0] for a in ("", "a1", "a2")]
    mixed = _engine_outputs(tiny, two, ["", "a1", "a2", "a1"])
    assert mixed == [*alone, alone[1]]  # one decode batch, three adapters: as each alone
    assert len(set(alone)) == 3, alone  # the adapters change the output

    model, tok = load(str(tiny))
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    base = generate(model, tok, prompt, max_tokens=NEW_TOKENS, sampler=make_sampler(0.0))
    load_adapters(model, str(adapters["a1"]))
    tuned = generate(model, tok, prompt, max_tokens=NEW_TOKENS, sampler=make_sampler(0.0))
    assert alone[0].startswith(base) and alone[1].startswith(tuned), (alone, base, tuned)


def test_the_prompt_cache_never_mixes_adapters(tiny_dir: Path,
                                               adapters: dict[str, Path]) -> None:
    from mlx_gw.worker.engines.llm import LLMEngine
    from mlx_gw.worker.protocol import Generate, Load

    two = {"a1": adapters["a1"], "a2": adapters["a2"]}
    # Long enough for a hit: the cache serves prefixes of MIN_HIT_TOKENS tokens and more.
    long = [{"role": "user", "content": PROMPT[0]["content"] * 8}]
    expected = [_engine_outputs(tiny_dir / "tiny-0", two, [a], long)[0]
                for a in ("", "a1", "", "a1")]
    engine = LLMEngine.from_load(Load(name="t", type="llm", path=str(tiny_dir / "tiny-0"),
                                      adapters={k: str(v) for k, v in two.items()}))
    got, cached = [], []
    for i, adapter in enumerate(("", "a1", "", "a1")):  # one after another: each finds the last
        engine.submit(Generate(rid=i + 1, messages=long, max_tokens=NEW_TOKENS,
                               temperature=0.0, ignore_eos=True, adapter=adapter))
        text, first = "", None
        while engine.busy:
            for d in engine.step():
                text += d.text
                first = d if first is None else first
        got.append(text)
        cached.append(first.cached_tokens)
    engine.close()
    assert got == expected
    assert cached[0] == cached[1] == 0 and cached[2] > 0 and cached[3] > 0, cached


def test_engine_refuses_an_adapter_of_other_shapes(tiny_dir: Path,
                                                   adapters: dict[str, Path]) -> None:
    from mlx_gw.worker.engines.adapters import AdapterError

    with pytest.raises(AdapterError, match="do not fit a 64->64 linear"):
        _engine_outputs(tiny_dir / "tiny-0", {"narrow": adapters["narrow"]}, [""])


# ---------------------------------------------------------------- through the gateway


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, adapters: dict[str, Path],
       tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = str(tiny_dir / "tiny-0")
    config = {"gateway": {"port": 0}, "models": {
        "base": {"type": "llm", "path": path, "adapters": {"a1": str(adapters["a1"])}},
        "plain": {"type": "llm", "path": path}}}
    yield from serving(config, tmp_path_factory.mktemp("gw-adapters"))


def _chat(g: GatewayProc, model: str) -> httpx.Response:
    return httpx.post(g.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": PROMPT, "temperature": 0, "max_tokens": NEW_TOKENS,
        "ignore_eos": True})


def _text(g: GatewayProc, model: str) -> str:
    r = _chat(g, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _pids(g: GatewayProc) -> dict[str, int]:
    return {m["name"]: m["pid"] for m in g.ps()}


def test_adapters_share_the_base_worker(gw: GatewayProc, adapters: dict[str, Path]) -> None:
    plain = _text(gw, "plain")
    base_before = _text(gw, "base")
    r = httpx.post(gw.url + "/api/adapters", timeout=120,
                   json={"base": "base", "name": "a2", "path": str(adapters["a2"])})
    assert r.status_code == 200, r.text
    assert r.json()["models"] == ["a2", "base:a2"]
    names = ["base", "a1", "base:a1", "a2", "base:a2", "base", "a1", "a2"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        texts = dict(zip(range(len(names)), pool.map(lambda n: _text(gw, n), names),
                         strict=True))
    out = {n: texts[i] for i, n in enumerate(names)}
    assert base_before == plain == out["base"] == texts[5]  # the base answers as a plain copy
    assert out["a1"] == out["base:a1"] == texts[6]
    assert out["a2"] == out["base:a2"] == texts[7]
    assert len({out["base"], out["a1"], out["a2"]}) == 3, out
    pids = _pids(gw)
    assert set(pids) == {"plain", "base"}  # no worker per adapter
    models = {m["id"]: m["root"] for m in
              httpx.get(gw.url + "/v1/models", timeout=10).json()["data"]}
    assert models["a1"] == models["a2"] == "base"
    listed = httpx.get(gw.url + "/api/adapters", timeout=10).json()["adapters"]
    assert {(a["name"], a["base"], a["runtime"]) for a in listed} == {
        ("a1", "base", False), ("a2", "base", True)}

    r = httpx.delete(gw.url + "/api/adapters/a2", timeout=60)
    assert r.status_code == 200, r.text
    gone = _chat(gw, "a2")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert _text(gw, "a1") == out["a1"] and _text(gw, "base") == plain
    assert _pids(gw) == pids  # the same worker throughout


def test_adapter_errors_are_openai_shaped(gw: GatewayProc, adapters: dict[str, Path],
                                          tmp_path: Path) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(gw.url + "/api/adapters", json=body, timeout=120)

    cases = [
        (post({"base": "nope", "name": "x", "path": str(adapters["a2"])}), 404,
         "model_not_found"),
        (post({"base": "base", "name": "x", "path": str(tmp_path)}), 400, None),
        (post({"base": "base", "name": "plain", "path": str(adapters["a2"])}), 409, "conflict"),
        (post({"base": "base", "name": "x", "path": str(adapters["narrow"])}), 400, None),
        (post({"base": "base", "name": "x"}), 400, None),
        (httpx.delete(gw.url + "/api/adapters/a1", timeout=10), 409, "conflict"),
        (httpx.delete(gw.url + "/api/adapters/nothing", timeout=10), 404, "model_not_found"),
        (_chat(gw, "base:nothing"), 404, "model_not_found"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], err
        if code:
            assert err["code"] == code, err
    assert "do not fit" in cases[3][0].json()["error"]["message"]
    assert _chat(gw, "x").status_code == 404  # nothing half-added


def test_config_checks_adapters(tiny_dir: Path, adapters: dict[str, Path],
                                tmp_path: Path) -> None:
    from mlx_gw.config import ConfigError, parse_config

    path = str(tiny_dir / "tiny-0")

    def parse(model: dict[str, Any], **more: Any) -> Any:
        return parse_config({"models": {"m": {"type": "llm", "path": path, **model}, **more}})

    cfg = parse({"adapters": {"a1": str(adapters["a1"])}})
    assert cfg.resolve("a1").adapter == "a1" and cfg.resolve("m:a1").name == "m"
    assert cfg.resolve("m").adapter == ""
    with pytest.raises(ConfigError, match=r"models\.m\.adapters\.a1: .*has no adapter_config"):
        parse({"adapters": {"a1": str(tmp_path)}})
    with pytest.raises(ConfigError, match="already the name of model 'other'"):
        parse({"adapters": {"other": str(adapters["a1"])}},
              other={"type": "llm", "path": path})
    with pytest.raises(ConfigError, match="only llm models take `adapters`"):
        parse({"type": "embedding", "adapters": {"a1": str(adapters["a1"])}})
    with pytest.raises(ConfigError, match="expected a mapping of adapter name"):
        parse({"adapters": [str(adapters["a1"])]})


def test_a_key_may_be_allowed_one_adapter_only(start_gateway, tiny_dir: Path,
                                                adapters: dict[str, Path]) -> None:
    key = "adapter-only-key"
    gw = start_gateway({"gateway": {"api_keys": [{"key": key, "models": ["a1"]}]},
                        "models": {"base": {"type": "llm", "path": str(tiny_dir / "tiny-0"),
                                            "adapters": {"a1": str(adapters["a1"])}}}})
    auth = {"Authorization": f"Bearer {key}"}

    def chat(model: str) -> httpx.Response:
        return httpx.post(gw.url + "/v1/chat/completions", headers=auth, timeout=120, json={
            "model": model, "messages": PROMPT, "max_tokens": 2, "ignore_eos": True})

    assert chat("a1").status_code == 200
    r = chat("base")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    listed = httpx.get(gw.url + "/v1/models", headers=auth, timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["a1"]
