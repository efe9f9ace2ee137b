"""The `mlx-gw` command line, run as a user would: daemon start/stop, status, ps, load, unload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import yaml

from tests.conftest import assert_gone, tiny_config


def mlxgw(*args: str, home: Path, cwd: Path | None = None, timeout: float = 90):
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_GW_API_KEY", "MLX_GW_CONFIG")}
    env["MLX_GW_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_daemon_lifecycle(tmp_path: Path, tiny_dir: Path) -> None:
    home = tmp_path / "home"
    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_dir, n=1)))
    r = mlxgw("start", "--config", str(cfg), "--port", "0", home=home)
    assert r.returncode == 0, r.stderr
    state = json.loads((home / "gateway.json").read_text())
    daemon = psutil.Process(state["pid"])
    try:
        assert "started" in r.stdout and state["url"] in r.stdout
        again = mlxgw("start", "--config", str(cfg), "--port", "0", home=home)
        assert again.returncode == 1 and "already running" in again.stderr
        assert mlxgw("status", home=home).returncode == 0
        r = mlxgw("load", "tiny-0", home=home)
        assert r.returncode == 0 and "ready" in r.stdout, r.stderr
        ps = mlxgw("ps", home=home)
        assert "tiny-0" in ps.stdout and "ready" in ps.stdout
        ps_rows = httpx.get(state["url"] + "/api/ps").json()["models"]
        workers = {m["pid"] for m in ps_rows}
        assert len(workers) == 1
        missing = mlxgw("load", "nope", home=home)
        assert missing.returncode == 1 and "404" in missing.stderr
        assert mlxgw("unload", "tiny-0", home=home).returncode == 0
        assert_gone(workers)
        assert "tiny-0" not in mlxgw("ps", home=home).stdout
        assert "listening on" in mlxgw("logs", home=home).stdout
        all_children = daemon.children(recursive=True)
    finally:
        stop = mlxgw("stop", home=home)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not daemon.is_running()
    assert_gone({p.pid for p in all_children})
    assert mlxgw("status", home=home).returncode == 3


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "models.yaml"
    cfg.write_text("gateway:\n  prot: 8000\nmodels: {}\n")
    r = mlxgw("start", "--foreground", "--config", str(cfg), home=tmp_path / "home")
    assert r.returncode == 2
    assert "gateway.prot" in r.stderr and str(cfg) in r.stderr and "port" in r.stderr


def test_init_writes_a_config_that_loads(tmp_path: Path) -> None:
    r = mlxgw("init", home=tmp_path / "home", cwd=tmp_path)
    assert r.returncode == 0
    text = (tmp_path / "models.yaml").read_text()
    assert "smollm2-135m-instruct" in text
    assert mlxgw("init", home=tmp_path / "home", cwd=tmp_path).returncode == 1  # no overwrite
    from mlx_gw.config import load_config

    assert load_config(tmp_path / "models.yaml").gateway.port == 8095
