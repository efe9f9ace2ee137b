"""Shared fixtures: tiny models built once per session, and real gateway subprocesses.

`GatewayProc` runs `mlx-gw start --foreground` on an ephemeral port with its own MLX_GW_HOME.
Every gateway a test starts is stopped at teardown, and the fixture asserts that no worker
process it ever had outlives it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.tiny_models import build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for i in range(3):
        build_tiny_llama(root / f"tiny-{i}", seed=i)
    # A long context, so one request can keep a worker busy for seconds (8k tokens).
    build_tiny_llama(root / "tiny-long", seed=5, max_position_embeddings=16384)
    return root


# Tiny models of the other kinds (tests/tiny_kinds.py): each built once, on first use, and
# skipped where its kind's package (extra) is not installed.


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_embeddings")
    from tests.tiny_kinds import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_whisper")
    from tests.tiny_kinds import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="session")
def tiny_soprano(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_audio")
    from tests.tiny_kinds import build_tiny_soprano

    return build_tiny_soprano(tmp_path_factory.mktemp("soprano"))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_vlm")
    from tests.tiny_kinds import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


class GatewayProc:
    """`mlx-gw start --foreground` on an ephemeral port. With config=None it runs with no
    config at all (a clean HOME and working directory): the embedded defaults."""

    def __init__(self, config: dict[str, Any] | None, workdir: Path,
                 env: dict[str, str] | None = None, port: int = 0):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.home = workdir / "home"
        self.log_path = workdir / "gateway.log"
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("MLX_GW_API_KEY", "MLX_GW_CONFIG")}
        full_env = {**inherited, "MLX_GW_HOME": str(self.home), **(env or {})}
        args = [sys.executable, "-m", "mlx_gw.gateway.cli", "start", "--foreground",
                "--port", str(port)]
        if config is not None:
            self.config_path = workdir / "models.yaml"
            self.config_path.write_text(yaml.safe_dump(config))
            args += ["--config", str(self.config_path)]
        else:
            full_env["HOME"] = str(self.home)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=workdir, env=full_env, stdout=subprocess.PIPE,
                                     stderr=self._log)
        self.pid = self.proc.pid
        self.url = self._wait_listening()
        self.seen_workers: set[int] = set()

    def _wait_listening(self) -> str:
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                text = line.decode()
                if text.startswith("mlx-gw listening on "):
                    found.append(text.split()[-1])
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(START_TIMEOUT_S)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"gateway did not start:\n{self.log_path.read_text()[-3000:]}")
        return found[0]

    def workers(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_workers.update(k.pid for k in kids)
        return kids

    def ps(self, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/ps", headers=headers, timeout=10)
        r.raise_for_status()
        self.workers()
        return r.json()["models"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45.0) -> int:
        self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _zombie(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_gone(pids: set[int], timeout: float = 5.0) -> None:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if not _zombie(p)]  # exited; init has yet to reap it
    for p in alive:
        p.kill()
    assert not alive, f"worker processes outlived their gateway: {[p.pid for p in alive]}"


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Any]:
    started: list[GatewayProc] = []

    def start(config: dict[str, Any] | None, env: dict[str, str] | None = None) -> GatewayProc:
        gw = GatewayProc(config, tmp_path / f"gw{len(started)}", env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.workers()
        if gw.proc.poll() is None:
            gw.stop()
        assert_gone(gw.seen_workers)


def tiny_config(tiny_dir: Path, n: int = 2, **gateway: Any) -> dict[str, Any]:
    models = {f"tiny-{i}": {"type": "llm", "path": str(tiny_dir / f"tiny-{i}")} for i in range(n)}
    models["tiny-0"]["aliases"] = ["gpt-4o-mini"]
    return {"gateway": {"port": 0, **gateway}, "models": models}


def serving(config: dict[str, Any] | None, workdir: Path) -> Iterator[GatewayProc]:
    """A module's shared gateway, for `yield from` in a fixture: started, handed out, then
    stopped, asserting that no worker it ever had outlives it."""
    gw = GatewayProc(config, workdir)
    yield gw
    gw.workers()
    gw.stop()
    assert_gone(gw.seen_workers)


@pytest.fixture(scope="module")
def gateway(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    """One gateway with two tiny models, shared by a test module."""
    yield from serving(tiny_config(tiny_dir), tmp_path_factory.mktemp("gw"))


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class LoadGate:
    """A copy of a tiny model whose load stops half-way, in the worker, until the test lets it
    go. Its generation_config.json, which mlx-lm's load opens after config.json and before
    the weights (and which the gateway never reads), is a named pipe: a worker loading the
    model blocks reading it. Real files, a real worker, a real load: only slower.

    `wait_loading()` returns once a worker is blocked there (and keeps it blocked);
    `release()` puts a plain file in the pipe's place, so that load and every later one go
    through."""

    def __init__(self, src: Path, dest: Path) -> None:
        shutil.copytree(src, dest)
        self.dir = dest
        self._pipe = dest / "generation_config.json"
        os.mkfifo(self._pipe)
        self._fd: int | None = None

    def wait_loading(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until a worker has opened the pipe: it is inside the load, before the
        weights. The write end stays open with nothing written, so it stays blocked."""

        def reader_there() -> bool:
            try:  # a non-blocking open for writing fails (ENXIO) while nobody reads the pipe
                self._fd = os.open(self._pipe, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                return False
            return True

        wait_for(reader_there, timeout, "a worker to start loading the model")

    def release(self) -> None:
        tmp = self.dir / "generation_config.json.tmp"
        tmp.write_text("{}\n")
        os.replace(tmp, self._pipe)
        if self._fd is not None:  # a reader still on the old pipe reads EOF (mlx-lm: no config)
            os.close(self._fd)
            self._fd = None


@pytest.fixture
def load_gate(tiny_dir: Path, tmp_path: Path) -> Iterator[LoadGate]:
    """tiny-0 behind a LoadGate, released at teardown whatever the test did."""
    gate = LoadGate(tiny_dir / "tiny-0", tmp_path / "gated-tiny-0")
    yield gate
    gate.release()


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)
