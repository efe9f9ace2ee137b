"""Security of a real gateway: several API keys with model allowlists and request rates, the
refusal to serve the network without a key, /api/pull off beyond loopback, repo ids and
deletes that cannot leave the model cache, and request size limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import GatewayProc

MSG = [{"role": "user", "content": "hi"}]
ALPHA = "alpha-key-0001"  # may use tiny-0 only
BETA = "beta-key-00002"  # any model, 3 requests a minute


def keyed(tiny_dir: Path, **gateway) -> dict:
    return {"gateway": {"api_keys": [{"key": ALPHA, "name": "alpha", "models": ["tiny-0"]},
                                     {"key": BETA, "name": "beta", "requests_per_minute": 3}],
                        **gateway},
            "models": {f"tiny-{i}": {"type": "llm", "path": str(tiny_dir / f"tiny-{i}")}
                       for i in range(2)}}


def get(gw: GatewayProc, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(gw.url + path, headers=headers, timeout=30)


def test_keys_allowlists_and_rate_limits(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway(keyed(tiny_dir))
    assert get(gw, "/v1/models", None).status_code == 401
    assert get(gw, "/v1/models", "alpha-key-0002").status_code == 401  # a near miss
    alpha = openai.OpenAI(base_url=gw.url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)
    r = alpha.chat.completions.create(model="tiny-0", messages=MSG, max_tokens=2,
                                      extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.PermissionDeniedError) as e:
        alpha.chat.completions.create(model="tiny-1", messages=MSG, max_tokens=2)
    assert e.value.body["code"] == "model_not_allowed" and e.value.body["param"] == "model"
    assert [m.id for m in alpha.models.list()] == ["tiny-0"]
    for path in ("/api/ps", "/metrics", "/api/events"):  # management: not for this key
        r = get(gw, path, ALPHA)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", path
    r = httpx.post(gw.url + "/api/pull", json={"repo": "org/name"},
                   headers={"Authorization": f"Bearer {ALPHA}"})
    assert r.status_code == 403
    assert [m["name"] for m in get(gw, "/api/tags", ALPHA).json()["models"]] == ["tiny-0"]

    for _ in range(3):  # beta's burst
        assert get(gw, "/api/ps", BETA).status_code == 200
    r = get(gw, "/v1/models", BETA)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 20  # one request every 20 s
    assert get(gw, "/v1/models", ALPHA).status_code == 200  # the limit is beta's alone


def test_serving_the_network_needs_a_key_or_an_explicit_waiver(tmp_path: Path,
                                                               tiny_dir: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  m: {{type: llm, path: {tiny_dir / 'tiny-0'}}}\n")
    env = {k: v for k, v in os.environ.items() if k != "MLX_GW_API_KEY"}
    env["MLX_GW_HOME"] = str(tmp_path / "home")
    r = subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", "start", "--foreground",
                        "--config", str(config), "--host", "0.0.0.0", "--port", "0"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "refusing to listen on 0.0.0.0 with no API key" in r.stderr
    assert "allow_unauthenticated" in r.stderr


def test_network_gateway_with_waiver_serves_but_will_not_pull(start_gateway,
                                                              tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"host": "0.0.0.0", "allow_unauthenticated": True},
                        "models": {"m": {"type": "llm", "path": str(tiny_dir / "tiny-0")}}})
    r = httpx.post(gw.url + "/api/pull", json={"repo": "org/name"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "pull_disabled"
    assert "allow_pull" in r.json()["error"]["message"]
    r = httpx.post(gw.url + "/api/pull", json={"model": "org/name"}, timeout=30)  # Ollama's
    assert r.status_code == 403


@pytest.mark.parametrize("repo", ["org/..", "../etc", "org/../../x", "org/na--me", "a/b/c",
                                  "/etc/passwd", "org/name%2F.."])
def test_pull_refuses_repo_ids_that_are_paths(gateway: GatewayProc, repo: str) -> None:
    r = httpx.post(gateway.url + "/api/pull", json={"repo": repo}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "repo", r.text


def test_delete_stays_inside_the_cache(start_gateway, tiny_dir: Path, tmp_path: Path) -> None:
    """A repo folder in the cache that is a symlink to elsewhere is not followed."""
    outside = tmp_path / "precious"
    snap = outside / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (outside / "refs").mkdir()
    (outside / "refs" / "main").write_text("a" * 40)
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    (hub / "models--evil--link").symlink_to(outside, target_is_directory=True)
    gw = start_gateway({"models": {"m": {"type": "llm", "path": str(tiny_dir / "tiny-0")}}},
                       env={"HF_HOME": str(tmp_path / "hf")})
    for name in ("..%2F..%2Fetc", "evil%2F..", "evil/../../x"):
        r = httpx.delete(gw.url + f"/api/models/{name}", timeout=30)
        assert r.status_code in (400, 404), (name, r.text)
    r = httpx.delete(gw.url + "/api/models/evil/link", timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "outside_cache", r.text
    assert (snap / "config.json").exists()


def test_oversized_headers_and_bodies_are_refused(gateway: GatewayProc) -> None:
    r = httpx.get(gateway.url + "/v1/models", headers={"X-Big": "x" * 20000}, timeout=30)
    assert r.status_code in (400, 431)
    big = b'{"model": "tiny-0", "messages": [], "pad": "' + b"x" * (17 * 2**20) + b'"}'
    r = httpx.post(gateway.url + "/v1/chat/completions", content=big,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(gateway.url + "/health").status_code == 200  # and it still serves
