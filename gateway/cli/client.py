"""The CLI's view of a running gateway: its state files and its HTTP API.

State lives under $MLX_GW_HOME (default ~/.mlx-gw): `gateway.json` (pid and url of the running
gateway) and `gateway.log`. `api`/`open_api` call the gateway with the key from
MLX_GW_API_KEY and exit with its error message when it is down or answers an error.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil


def state_dir() -> Path:
    d = Path(os.environ.get("MLX_GW_HOME") or Path.home() / ".mlx-gw")
    d.mkdir(parents=True, exist_ok=True)
    return d


def state_dir_problem() -> str | None:
    """Why the state directory cannot be written (None when it can): a gateway still
    serves without it, but `mlx-gw ps`, `stop` and the daemon's log need it."""
    where = os.environ.get("MLX_GW_HOME") or str(Path.home() / ".mlx-gw")
    try:
        d = state_dir()
        probe = d / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"cannot write the state directory {where} ($MLX_GW_HOME): {e.strerror}"
    return None


def state_file() -> Path:
    return state_dir() / "gateway.json"


def log_file() -> Path:
    return state_dir() / "gateway.log"


def read_state() -> dict[str, Any] | None:
    """The running gateway's state, or None (a stale file is removed)."""
    try:
        st = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    try:
        alive = psutil.Process(st["pid"]).is_running()
    except (psutil.Error, KeyError, TypeError):
        alive = False
    if not alive:
        state_file().unlink(missing_ok=True)
        return None
    return st


def open_api(method: str, path: str, body: dict[str, Any] | None = None,
          accept: str | None = None) -> Any:
    """An HTTP response from the running gateway (with the API key from the environment);
    exits with the gateway's error message when it is not running or answers an error."""
    st = read_state()
    if not st:
        print("mlx-gw is not running (start it with `mlx-gw start`)", file=sys.stderr)
        sys.exit(1)
    headers = {"Content-Type": "application/json"}
    if accept:
        headers["Accept"] = accept
    req = urllib.request.Request(st["url"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers)
    key = os.environ.get("MLX_GW_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        return urllib.request.urlopen(req, timeout=3600)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        print(f"mlx-gw: {e.code}: {msg}", file=sys.stderr)
        sys.exit(1)


def api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    with open_api(method, path, body) as resp:
        return json.loads(resp.read())
