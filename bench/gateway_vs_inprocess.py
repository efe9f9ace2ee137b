"""Issue 3's benchmark: mlx-lm in-process vs the same requests through the gateway, in one run.

For each stream count N the two sides run interleaved (in-process, gateway, gateway, in-process,
... `--reps` times each) on the same model, prompt token ids and greedy settings:
  * in-process: `bench.inprocess`, a child that drives a BatchGenerator built as the worker
    builds it and inserts the N prompts at once;
  * gateway: `mlx-gw start --foreground` with one model; N concurrent streaming /v1/completions
    requests (one asyncio task each) with the prompt as token ids and temperature 0.
Aggregate tok/s = generated tokens / (first request or insert -> last finish); TTFT is per
request (gateway: the first chunk with text). Then `--ttft-reps` single requests of one token
per side, interleaved, give the p50 TTFT overhead, at the benchmark's prompt length and at a
4-token one (little compute, so the fixed overhead shows through the noise). Gateway RSS (its
pid only) is read at idle after start-up and after the runs. CPU seconds (user+sys) of the
serving processes are recorded too: on a shared, noisy machine they show the gateway's cost
better than wall time does.
Both sides get the same BLAS (`mlx_gw.gateway.supervision.blas.fast_blas_env`). Results:
bench/out/*.json and a
markdown table on stdout.

    python -m bench.gateway_vs_inprocess --streams 1 16 --max-tokens 64 --prompt-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

import aiohttp
import psutil

from bench.client import sse_events
from bench.machine import machine, revision
from bench.make_model import DEFAULT_DIR, ensure_model, prompt_ids
from bench.report import Run, markdown, median, report, summary
from bench.targets import read_prefixed
from mlx_gw.gateway.supervision.blas import fast_blas_env

OUT_DIR = Path(__file__).resolve().parent / "out"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 600.0
WARMUP_TOKENS = 4
MODEL_NAME = "bench"
MB = 1e6


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


class InProcess:
    """The `bench.inprocess` child: one JSON command in, one result line out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, model: Path, max_batch: int, env: dict[str, str]
                    ) -> AsyncIterator[InProcess]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.inprocess", str(model), "--max-batch", str(max_batch),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        self = cls(proc)
        try:
            await asyncio.wait_for(self._line("READY"), START_TIMEOUT_S)
            yield self
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def _line(self, prefix: str) -> str:
        return await read_prefixed(self.proc, prefix)

    async def run(self, prompt: list[int], n: int, max_tokens: int) -> Run:
        assert self.proc.stdin is not None
        load = os.getloadavg()[0]
        cpu0 = _cpu_s([self.proc.pid])
        cmd = {"n": n, "max_tokens": max_tokens, "prompt": prompt}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        r = json.loads(await asyncio.wait_for(self._line("RESULT "), RUN_TIMEOUT_S))
        return Run("in-process", n, r["wall_s"], r["ttft_s"], r["completion_tokens"],
                   _cpu_s([self.proc.pid]) - cpu0, load, r["finish_reasons"])


class Gateway:
    """An `mlx-gw start --foreground` child serving one model, and a client for it."""

    log: Path

    def __init__(self, proc: asyncio.subprocess.Process, url: str,
                 session: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.url = url
        self.session = session

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, model: Path, max_batch: int, log: Path,
                    profile: Path | None) -> AsyncIterator[Gateway]:
        config = ("gateway: {port: 0, warm_spare: false}\n"
                  f"models:\n  {MODEL_NAME}: {{type: llm, path: {model}, dtype: float32, "
                  f"max_batch: {max_batch}, keep_alive: -1}}\n")
        pre = ["-m", "cProfile", "-o", str(profile)] if profile else []
        async with cls.launch(config, log, pre=pre) as gw:
            yield gw

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, config_yaml: str, log: Path, env: Mapping[str, str] | None = None,
                     pre: Sequence[str] = ()) -> AsyncIterator[Self]:
        """A gateway started from `config_yaml` in a fresh MLX_GW_HOME, its stderr in `log`,
        stopped (SIGTERM, then SIGKILL) on exit. `pre`: interpreter options (cProfile)."""
        home = Path(tempfile.mkdtemp(prefix="mlxgw-bench-"))
        config = home / "models.yaml"
        config.write_text(config_yaml)
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *pre, "-m", "mlx_gw.gateway.cli", "start", "--foreground",
                "--config", str(config), "--port", "0",
                stdout=asyncio.subprocess.PIPE, stderr=err,
                env={**os.environ, **(env or {}), "MLX_GW_HOME": str(home)})
        try:
            url = await asyncio.wait_for(cls._listening(proc), START_TIMEOUT_S)
            timeout = aiohttp.ClientTimeout(total=RUN_TIMEOUT_S)
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
                self = cls(proc, url, session)
                self.log = log
                yield self
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    @staticmethod
    async def _listening(proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        while line := (await proc.stdout.readline()).decode():
            if "listening on " in line:
                return line.split("listening on ", 1)[1].strip()
        raise RuntimeError(f"the gateway exited with {await proc.wait()}; see its log")

    def rss_bytes(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    async def ps(self) -> dict[str, Any]:
        async with self.session.get(self.url + "/api/ps") as resp:
            models = (await resp.json())["models"]
        return next(m for m in models if m["name"] == MODEL_NAME)

    async def _stream(self, prompt: list[int], max_tokens: int) -> tuple[float, int, str]:
        """One streamed request: (TTFT, completion tokens from usage, finish reason)."""
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        ttft, tokens, finish = -1.0, -1, ""
        async with self.session.post(self.url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for chunk in sse_events(resp):
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if ttft < 0 and choice["text"]:
                        ttft = time.perf_counter() - t0
                    finish = choice["finish_reason"] or finish
        return ttft, tokens, finish

    async def round_trip_s(self, prompt: list[int], *, to_worker: bool) -> float:
        """One request that does no model work: GET /health, or (to_worker) a completion the
        worker refuses at admission (context_length_exceeded), which crosses HTTP, the gateway,
        ZeroMQ and the worker loop and back: the gateway's fixed cost per request."""
        t0 = time.perf_counter()
        if to_worker:
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 10**7, "stream": True}
            async with self.session.post(self.url + "/v1/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 400 or data["error"].get("code") != "context_length_exceeded":
                    raise RuntimeError(f"expected a 400 context_length_exceeded, got {data}")
        else:
            async with self.session.get(self.url + "/health") as resp:
                await resp.read()
        return time.perf_counter() - t0

    async def run(self, prompt: list[int], n: int, max_tokens: int, worker_pid: int) -> Run:
        pids = [self.proc.pid, worker_pid, os.getpid()]
        load = os.getloadavg()[0]
        cpu0 = _cpu_s(pids)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self._stream(prompt, max_tokens) for _ in range(n)))
        wall = time.perf_counter() - t0
        return Run("gateway", n, wall, [r[0] for r in results], [r[1] for r in results],
                   _cpu_s(pids) - cpu0, load, [r[2] for r in results])


def _check(run: Run, max_tokens: int, problems: list[str]) -> None:
    if any(t != max_tokens for t in run.completion_tokens) or min(run.ttft_s) < 0:
        problems.append(f"{run.side} n={run.n}: tokens {run.completion_tokens}, "
                        f"finish {run.finish_reasons}, ttft {run.ttft_s}")


async def _pair(inproc: InProcess, gw: Gateway, rep: int, prompt: list[int], n: int,
                max_tokens: int, worker_pid: int) -> list[Run]:
    """One run per side, back to back; the side that goes first alternates with `rep`."""
    runs = []
    for side in ("in-process", "gateway") if rep % 2 == 0 else ("gateway", "in-process"):
        if side == "in-process":
            runs.append(await inproc.run(prompt, n, max_tokens))
        else:
            runs.append(await gw.run(prompt, n, max_tokens, worker_pid))
    return runs


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = ensure_model(args.model)
    prompt = prompt_ids(model, args.prompt_tokens)
    ttft_prompts = {str(k): prompt_ids(model, k) for k in args.ttft_prompt_tokens}
    blas = fast_blas_env()
    env = {**os.environ, **blas}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    profile = OUT_DIR / "gateway.prof" if args.profile_gateway else None
    max_batch = max(args.max_batch, *args.streams)
    runs: list[Run] = []
    ttft: dict[str, dict[str, list[float]]] = {}
    problems: list[str] = []
    t_start = time.perf_counter()
    async with (InProcess.start(model, max_batch, env) as inproc,
                Gateway.start(model, max_batch, OUT_DIR / "gateway.log", profile) as gw):
        rss_start = gw.rss_bytes()
        await gw.run(prompt, 1, WARMUP_TOKENS, gw.proc.pid)  # loads the worker
        worker_pid = (await gw.ps())["pid"]
        for n in args.streams:
            await inproc.run(prompt, n, WARMUP_TOKENS)
            await gw.run(prompt, n, WARMUP_TOKENS, worker_pid)
            for rep in range(args.reps):
                for run in await _pair(inproc, gw, rep, prompt, n, args.max_tokens, worker_pid):
                    _check(run, args.max_tokens, problems)
                    runs.append(run)
                    print(f"n={n} {run.side:10s} {run.tok_s:7.2f} tok/s  wall {run.wall_s:6.2f}s"
                          f"  ttft p50 {median(run.ttft_s) * 1e3:7.1f} ms  cpu {run.cpu_s:6.1f}s"
                          f"  load {run.loadavg:.1f}", file=sys.stderr, flush=True)
        for key, ids in ttft_prompts.items():
            ttft[key] = {"in-process": [], "gateway": []}
            for rep in range(args.ttft_reps):
                for run in await _pair(inproc, gw, rep, ids, 1, 1, worker_pid):
                    _check(run, 1, problems)
                    ttft[key][run.side].append(run.ttft_s[0])
        rtt = {"health": [await gw.round_trip_s(prompt, to_worker=False) for _ in range(20)],
               "worker_refusal": [await gw.round_trip_s(prompt, to_worker=True)
                                  for _ in range(20)]}
        ps = await gw.ps()
        rss_end = gw.rss_bytes()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python -m bench.gateway_vs_inprocess", *sys.argv[1:]]),
        "machine": machine(), "revision": revision(),
        "blas": blas.get("LD_PRELOAD", "none (reference BLAS)"),
        "model": str(model), "prompt_tokens": len(prompt), "max_tokens": args.max_tokens,
        "max_batch": max_batch, "reps": args.reps, "profiled": bool(profile),
        "gateway_rss_idle_start_mb": rss_start / MB, "gateway_rss_idle_end_mb": rss_end / MB,
        "worker_memory_mb": ps["memory_bytes"] / MB,
        "ttft_single_s": ttft, "round_trip_s": rtt, "problems": problems,
        "total_s": time.perf_counter() - t_start,
        "runs": [asdict(r) | {"tok_s": r.tok_s} for r in runs],
        "summary": summary(runs, args.streams, ttft),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="measured runs per side and N")
    ap.add_argument("--ttft-reps", type=int, default=10, help="single-request TTFT runs per side")
    ap.add_argument("--ttft-prompt-tokens", type=int, nargs="+", default=None,
                    help="prompt lengths of the single-request TTFT runs (a short one shows "
                         "the fixed overhead with little compute noise); default: "
                         "--prompt-tokens and 4")
    ap.add_argument("--max-batch", type=int, default=16, help="the model's max_batch (both sides)")
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR, help="built if missing")
    ap.add_argument("--profile-gateway", action="store_true",
                    help="run the gateway under cProfile (bench/out/gateway.prof); slows it")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/out/...)")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="print the table of a saved result and exit")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.ttft_prompt_tokens is None:
        args.ttft_prompt_tokens = [args.prompt_tokens, 4]
    res = asyncio.run(bench(args))
    out = args.out or OUT_DIR / f"gateway_vs_inprocess-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nresults: {out} (total {res['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
