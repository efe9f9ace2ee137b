"""Config reload without restart (issue 19): SIGHUP or `mlx-gw reload` re-reads the file the
gateway started with. Added models are served, removed ones stop once idle, changed ones load
anew on next use, in-flight requests finish; an invalid file keeps the running config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import GatewayProc, tiny_config, wait_for


def _chat(gw: GatewayProc, model: str, **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **kw})


def _pid(gw: GatewayProc, model: str) -> int | None:
    return next((m["pid"] for m in gw.ps() if m["name"] == model), None)


def _events(gw: GatewayProc, kind: str) -> list[dict[str, Any]]:
    return [e for e in httpx.get(gw.url + "/api/events", timeout=10).json()["events"]
            if e["type"] == kind]


def test_reload_adds_removes_and_changes_models_without_failing_in_flight_requests(
        start_gateway, tiny_dir: Path) -> None:
    config = tiny_config(tiny_dir, 2)
    config["models"]["tiny-long"] = {"type": "llm", "path": str(tiny_dir / "tiny-long")}
    gw = start_gateway(config)
    assert _chat(gw, "tiny-1").status_code == 200
    old_tiny1 = _pid(gw, "tiny-1")
    assert _chat(gw, "tiny-2").status_code == 404

    # A long stream on tiny-long, the model the reload removes, runs across the reload.
    streamed: dict[str, Any] = {}

    def long_stream() -> None:
        body = {"model": "tiny-long", "stream": True, "max_tokens": 600, "ignore_eos": True,
                "messages": [{"role": "user", "content": "count"}]}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=120) as r:
            streamed["status"] = r.status_code
            streamed["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=long_stream)
    t.start()
    wait_for(lambda: any(m["name"] == "tiny-long" and m["in_flight"] for m in gw.ps()), 30,
             "the long stream running")

    new = tiny_config(tiny_dir, 3)  # adds tiny-2, drops tiny-long
    new["models"]["tiny-1"]["max_batch"] = 4  # changes tiny-1
    gw.config_path.write_text(yaml.safe_dump(new))
    os.kill(gw.pid, signal.SIGHUP)
    wait_for(lambda: "[reload]" in gw.log(), 10, "the reload's log line")
    assert "added tiny-2; removed tiny-long; changed tiny-1" in gw.log()

    # Added: served at once. Removed: unknown to new requests, while its stream goes on.
    assert _chat(gw, "tiny-2").status_code == 200
    assert _chat(gw, "tiny-long").status_code == 404
    t.join(120)
    assert streamed["status"] == 200
    assert streamed["lines"][-1] == "data: [DONE]"
    assert not any('"error"' in line for line in streamed["lines"])
    # The removed model's worker stopped once its last request ended; the changed model's old
    # worker stopped (idle at the reload), and it loads anew, with its new config, on next use.
    wait_for(lambda: {e["model"] for e in _events(gw, "unload") if e.get("reason") == "reload"}
             >= {"tiny-long", "tiny-1"}, 30, "the removed and changed workers stopped")
    assert _chat(gw, "tiny-1").status_code == 200
    new_tiny1 = _pid(gw, "tiny-1")
    assert new_tiny1 is not None and new_tiny1 != old_tiny1
    show = httpx.get(gw.url + "/api/show", params={"model": "tiny-1"}, timeout=10).json()
    assert json.dumps(show).count('"max_batch": 4') >= 1
    assert {m["name"] for m in gw.ps()} == {"tiny-1", "tiny-2"}


def test_an_invalid_file_keeps_the_running_config(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway(tiny_config(tiny_dir, 1))
    assert _chat(gw, "tiny-0").status_code == 200
    pid = _pid(gw, "tiny-0")
    gw.config_path.write_text("models:\n  tiny-0:\n    type: llm\n    max_batchh: 3\n")
    # `mlx-gw reload` finds the gateway by its state file (under MLX_GW_HOME).
    done = subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", "reload"],
                          env={**os.environ, "MLX_GW_HOME": str(gw.home)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: "[reload]" in gw.log(), 10, "the reload's log line")
    assert "invalid; keeping the running config" in gw.log()
    assert "max_batchh" in gw.log()
    assert _chat(gw, "tiny-0").status_code == 200
    assert _pid(gw, "tiny-0") == pid
