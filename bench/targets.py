"""The engines a benchmark run compares, each started by the harness and stopped after it.

A target runs a list of workload items (closed loop at N streams, or open loop at given arrival
times) and returns one `Record` per item:
  * `HttpTarget`: any OpenAI-compatible base URL, driven by `bench.client` (one asyncio task
    per request, no threads). The gateway, `mlx_lm.server`, llama-cpp-python's server and
    the peers from PyPI are started as child processes on a free port and waited for;
    `--url` names one that is already running.
  * `InProcessTarget`: mlx-lm's BatchGenerator driven directly in a child
    (`bench.inprocess`): no HTTP, no detokenizing: the ceiling for this engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.client import Record, complete
from bench.workload import Item

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 900.0
RESULT_LINE_LIMIT = 1 << 28  # one RESULT line holds every token time of a run
OnDone = Callable[[Record], None]


class HttpTarget:
    """An OpenAI-compatible server at `base_url` (ending in /v1)."""

    chat = False  # True: the prompt goes as one user message to /chat/completions

    def __init__(self, name: str, base_url: str, model_for: Callable[[str], str],
                 extra: dict[str, Any], pids: Sequence[int] = ()) -> None:
        self.name, self.base_url, self.model_for, self.extra = name, base_url, model_for, extra
        self.pids = list(pids)

    def body(self, item: Item) -> dict[str, Any]:
        text: dict[str, Any] = ({"messages": [{"role": "user", "content": item.prompt}]}
                                if self.chat else {"prompt": item.prompt})
        return {"model": self.model_for(item.model), **text,
                "max_tokens": item.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra}

    async def run(self, items: list[Item], scenario: str, level: float, rep: int,
                  concurrency: int | None, arrivals: list[float] | None,
                  on_done: OnDone) -> list[Record]:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            t0 = time.perf_counter()

            async def one(item: Item) -> Record:
                rec = Record(self.name, scenario, level, rep, item.model, 0.0)
                await complete(session, self.base_url, rec, self.body(item), t0)
                on_done(rec)
                return rec

            if arrivals is None:  # closed loop: `concurrency` clients, each one at a time
                queue = iter(enumerate(items))
                records: list[Record | None] = [None] * len(items)

                async def client() -> None:
                    for i, item in queue:
                        records[i] = await one(item)

                await asyncio.gather(*(client() for _ in range(concurrency or len(items))))
                return [r for r in records if r is not None]
            tasks = []
            for item, at in zip(items, arrivals, strict=True):
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
                tasks.append(asyncio.create_task(one(item)))
            return list(await asyncio.gather(*tasks))


class InProcessTarget:
    """The `bench.inprocess` child: one JSON command per run, one RESULT line back."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process,
                 logit_bias: dict[str, float]) -> None:
        self.name, self.proc, self.logit_bias = name, proc, logit_bias
        self.pids = [proc.pid]

    async def _line(self, prefix: str) -> str:
        return await read_prefixed(self.proc, prefix)

    async def run(self, items: list[Item], scenario: str, level: float, rep: int,
                  concurrency: int | None, arrivals: list[float] | None,
                  on_done: OnDone) -> list[Record]:
        assert self.proc.stdin is not None
        cmd = {"items": [{"prompt": it.prompt, "max_tokens": it.max_tokens} for it in items],
               "concurrency": concurrency, "arrivals": arrivals, "logit_bias": self.logit_bias}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        out = json.loads(await asyncio.wait_for(self._line("RESULT "), REQUEST_TIMEOUT_S))
        records = []
        for item, o in zip(items, out, strict=True):
            rec = Record(self.name, scenario, level, rep, item.model, o["start_s"],
                         o["ttft_s"], o["e2e_s"], o["prompt_tokens"], o["completion_tokens"],
                         o["itl_s"])
            on_done(rec)
            records.append(rec)
        return records


async def read_prefixed(proc: asyncio.subprocess.Process, prefix: str) -> str:
    """The rest of the child's next stdout line that starts with `prefix`."""
    assert proc.stdout is not None
    while line := (await proc.stdout.readline()).decode():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise RuntimeError(f"bench.inprocess exited with {await proc.wait()}")


def free_port() -> int:
    """A port free now (the OS picks it); a server given it may still find it taken, which
    `server` sees in its log and answers by starting it again on another."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """The server's port was bound by someone else between free_port() and its start."""


PORT_TAKEN = ("address already in use", "errno 98", "eaddrinuse")
START_ATTEMPTS = 3
LISTENING = re.compile(r"mlx-gw listening on (http://\S+)")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _wait_http(proc: asyncio.subprocess.Process, port: int, ready_path: str,
                     log: Path) -> str:
    """The server's base URL once GET `ready_path` answers 200. Port 0: the server picked
    its own and says so in its log (`mlx-gw listening on URL`). Fails at once when the
    process exits or its log says the port was taken, not after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    base = f"http://127.0.0.1:{port}" if port else None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if proc.returncode is not None:
                raise RuntimeError(f"exited with {proc.returncode} before serving; log:\n"
                                   f"{text[-1500:]}")
            if any(m in text.lower() for m in PORT_TAKEN):
                raise PortTaken(f"port {port} was taken; log:\n{text[-600:]}")
            if base is None and (m := LISTENING.search(text)):
                base = m.group(1).rstrip("/")
            if base is not None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(base + ready_path,
                                           timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        if resp.status == 200:
                            return base
            await asyncio.sleep(0.25)
    raise TimeoutError(f"{ready_path} not up after {START_TIMEOUT_S:.0f}s; see {log}")


@contextlib.asynccontextmanager
async def server(name: str, argv: Callable[[int], list[str]], ready_path: str, log: Path,
                 env: dict[str, str], model_for: Callable[[str], str],
                 extra: dict[str, Any], pick_port: bool = True) -> AsyncIterator[HttpTarget]:
    """A server child (own process group, output in `log`), ready when GET `ready_path`
    answers 200. `argv(port)` is its command line on a free port, started again on another
    when that one turns out taken; with `pick_port` False it gets port 0 and reports the
    one it bound in its log."""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port() if pick_port else 0
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv(port), stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True)
        try:
            try:
                base = await _wait_http(proc, port, ready_path, log)
            except PortTaken:
                if attempt == START_ATTEMPTS:
                    raise
                continue
            yield HttpTarget(name, base + "/v1", model_for, extra, [proc.pid])
            return
        finally:
            await _stop(proc)


@contextlib.asynccontextmanager
async def gateway(name: str, models: dict[str, Path], log: Path, env: dict[str, str],
                  extra: dict[str, Any], max_batch: int, dtype: str | None,
                  max_loaded: int | None = None, prompt_cache_bytes: int | None = None,
                  warm_spare: bool = True) -> AsyncIterator[HttpTarget]:
    """`mlx-gw start --foreground` serving `models` (name -> dir); the models load before the
    target is handed out, except under `max_loaded` (the mix scenario loads on demand).
    `prompt_cache_bytes`: each model's prompt cache budget (0: off; None: the default);
    `warm_spare` off: no idle second worker process (on a GPU, a second CUDA context)."""
    home = Path(tempfile.mkdtemp(prefix="mlxgw-bench-"))
    gw = {"port": 0, **({"max_loaded_models": max_loaded} if max_loaded else {}),
          **({} if warm_spare else {"warm_spare": False})}
    spec = {"type": "llm", "max_batch": max_batch, "keep_alive": -1,
            **({"dtype": dtype} if dtype else {}),
            **({"prompt_cache": {"max_bytes": prompt_cache_bytes}}
               if prompt_cache_bytes is not None else {})}
    config = {"gateway": gw, "models": {m: {**spec, "path": str(p)} for m, p in models.items()}}
    (home / "models.yaml").write_text(json.dumps(config))  # JSON is YAML 1.2
    argv = [sys.executable, "-m", "mlx_gw.gateway.cli", "start", "--foreground",
            "--config", str(home / "models.yaml"), "--port", "0"]
    async with server(name, lambda _: argv, "/health", log, {**env, "MLX_GW_HOME": str(home)},
                      lambda m: m, extra, pick_port=False) as target:
        base = target.base_url.removesuffix("/v1")
        if not max_loaded:
            async with aiohttp.ClientSession() as session:
                for m in models:
                    async with session.post(f"{base}/api/load",
                                            json={"model": m}) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"load {m}: {resp.status} {await resp.text()}")
        target.pids += [c.pid for c in psutil.Process(target.pids[0]).children()]
        yield target


@contextlib.asynccontextmanager
async def inprocess(name: str, model: Path, max_batch: int, env: dict[str, str],
                    logit_bias: dict[str, float]) -> AsyncIterator[InProcessTarget]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.inprocess", str(model), "--max-batch", str(max_batch),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        start_new_session=True, limit=RESULT_LINE_LIMIT)
    target = InProcessTarget(name, proc, logit_bias)
    try:
        await asyncio.wait_for(target._line("READY"), START_TIMEOUT_S)
        yield target
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        await _stop(proc)


def mlx_lm_server(model: Path, max_batch: int, log: Path, env: dict[str, str],
                  extra: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[HttpTarget]:
    """mlx-lm's own server, continuous batching up to `max_batch` decodes (its other settings
    at their defaults, as a user runs it). It serves any local model dir a request names."""
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
                "--port", str(port), "--decode-concurrency", str(max_batch),
                "--log-level", "WARNING"]

    return server("mlx_lm.server", argv, "/health", log, env,
                  lambda m: "default_model" if m == "bench" else m, extra)


def llama_cpp_server(gguf: Path, threads: int, log: Path, env: dict[str, str],
                     extra: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[HttpTarget]:
    """llama-cpp-python's server on the GGUF: one request at a time, the rest queue."""
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                "--model_alias", "bench", "--port", str(port), "--n_threads", str(threads),
                "--n_ctx", "4096", "--verbose", "False",
                # its default lets each new request cut off the one being generated
                "--interrupt_requests", "False"]

    return server("llama.cpp", argv, "/v1/models", log, env, lambda m: "bench", extra)


def vllm_mlx(venv: Path, model: Path, max_batch: int, log: Path, env: dict[str, str],
             extra: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[HttpTarget]:
    """vllm-mlx (PyPI) with continuous batching of up to `max_batch` sequences. It ignores
    `logit_bias` on /v1/completions, so only a model that never emits EOS gives it equal work."""
    exe = venv / "bin" / "vllm-mlx"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: pip install vllm-mlx 'mlx[cpu]' into --peer-venv")
    def argv(port: int) -> list[str]:
        return [str(exe), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", "bench", "--offline", "--continuous-batching",
                "--max-num-seqs", str(max_batch), "--completion-batch-size", str(max_batch)]

    return server("vllm-mlx", argv, "/v1/models", log,
                  {**env, "HF_HUB_OFFLINE": "1"}, lambda m: "bench", extra)


@contextlib.asynccontextmanager
async def mlx_serve(venv: Path, model: Path, log: Path, env: dict[str, str],
                    extra: dict[str, Any]) -> AsyncIterator[HttpTarget]:
    """mlx-serve (PyPI): a FastAPI proxy that starts `mlx_lm.server` (its own venv's, at its
    default settings) on the first request. It has only /v1/chat/completions."""
    exe = venv / "bin" / "mlx-serve"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: pip install mlx-serve into --peer-venv")
    home = Path(tempfile.mkdtemp(prefix="mlx-serve-"))

    def argv(port: int) -> list[str]:
        (home / "models.yaml").write_text(json.dumps({
            "mlx_port": free_port(), "manager_port": port, "inactivity_timeout_seconds": 3600,
            "startup_timeout_seconds": 300,
            "models": [{"name": "bench", "type": "text", "hf_path": str(model)}],
            "monitoring": {"log_dir": str(home / "logs")}}))
        return [str(exe), "start", "--host", "127.0.0.1", "--port", str(port)]

    menv = {**env, "MLX_SERVE_CONFIG": str(home / "models.yaml"), "HF_HUB_OFFLINE": "1"}
    async with server("mlx-serve", argv, "/v1/models", log, menv,
                      lambda m: "bench", extra) as target:
        target.chat = True
        yield target
