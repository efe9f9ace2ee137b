"""LiteLLM's proxy (`litellm --config`) as a real subprocess, for tests that put gateways behind it.

The proxy runs from this interpreter (its `litellm` console script may carry another venv's
shebang); it listens on 127.0.0.1 and needs a master key, which `chat` sends.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

START_TIMEOUT_S = 180.0  # its imports alone take ~35 s on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiteLLMProxy:
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "litellm.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "sk-" + secrets.token_hex(24)
        self.log_path = workdir / "litellm.log"
        env = {**os.environ, "LITELLM_MASTER_KEY": self.key,
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "INFO"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from litellm_cli.main import proxy_server; proxy_server()",
             "--config", str(self.config_path), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health/readiness", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"LiteLLM's proxy did not start:\n{self.log()[-3000:]}")

    def chat(self, model: str, content: str, **body: Any) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {self.key}"},
                          json={"model": model, "messages": [{"role": "user", "content": content}],
                                **body})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
