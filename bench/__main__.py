"""`python -m bench`: one workload against several engines, side by side in one run.

The harness starts each target (the gateway, mlx-lm in-process, `mlx_lm.server`,
llama-cpp-python's server on the same GGUF; `--url` adds any running OpenAI-compatible server)
and keeps them all up; then for each scenario level and rep it runs the same requests on every
target back to back, the order rotating with the rep, so ratios are paired. Scenarios:
  * closed: N concurrent streams (`--streams`), each sending its next request when the last
    ends, `--requests-per-stream` x N requests per run;
  * open: Poisson arrivals at fixed rates (`--rates`, requests/s), `--open-requests` each;
  * mix: `--mix K` copies of the model under K names, requests naming one at random, with
    `--mix-loaded` models allowed at once: every switch is a swap (gateway and mlx_lm.server);
  * agent: `--agent-turns T` (bench.agent): `--agent-conversations` multi-turn chats at once,
    the history growing each turn, through the gateway with its prompt cache on and off
    (`gateway`, `gateway-nocache`) and the peers; then the no-hit check, unique prompts at
    `--agent-nohit-streams` through the two gateways.
Per request it records TTFT, inter-token gaps, end-to-end latency, tokens and errors; it
prints a markdown table and writes results.json, requests.csv, summary.md and PNG plots into
`--out` (default bench/out/bench-DATE).

    python -m bench                                     # SmolLM2-135M, 1/4/16 streams
    python -m bench --streams 1 16 64 --rates 2 4 --mix 3
    python -m bench --targets url --url http://127.0.0.1:8000/v1 --served-model M --ban-eos off
    python -m bench --agent-turns 10                    # gateway cache on/off, mlx_lm.server
    python -m bench --report bench/out/bench-DATE/results.json   # re-print + re-plot
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bench import agent
from bench import targets as T
from bench.client import Record
from bench.machine import machine, revision
from bench.make_model import RANDOM_MARK
from bench.stats import markdown, summarize
from bench.workload import Item, Span, arrivals, build

OUT_DIR = Path(__file__).resolve().parent / "out"
ALL_TARGETS = ["gateway", "gateway-nocache", "gateway-nospare", "in-process", "mlx_lm.server",
               "llama.cpp", "vllm-mlx", "mlx-serve", "url"]
AGENT_TARGETS = ["gateway", "gateway-nocache", "mlx_lm.server"]
AGENT_CACHE_BYTES = 2 * 2**30  # 4 conversations of ~4,400 f32 SmolLM2 tokens: ~0.8 GB of KV
WARMUP_TOKENS = 4


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the GPU machine may lack it: a line per run instead
        return None
    return tqdm(total=total, unit="req", dynamic_ncols=True, file=sys.stderr)


def _model(args: argparse.Namespace) -> tuple[Path, Path | None, bool]:
    """(MLX model dir, GGUF or None, greedy may emit EOS)."""
    if args.model_dir:
        model_dir = args.model_dir.resolve()
        config = json.loads((model_dir / "config.json").read_text())
        gguf = args.gguf or (Path(config["source_gguf"]) if "source_gguf" in config else None)
        return model_dir, gguf, config.get("mlx_gw_bench") != RANDOM_MARK
    from bench.export_gguf import ensure_exported

    gguf, mlx_dir = ensure_exported(args.gguf)
    return mlx_dir, gguf, True


def _eos_bias(model_dir: Path) -> dict[str, float]:
    """logit_bias that keeps greedy decoding off every end-of-generation token, so each
    request runs to max_tokens on every engine (the OpenAI parameter all of them take)."""
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id", [])
    return {str(t): -100.0 for t in ([eos] if isinstance(eos, int) else eos)}


class Runner:
    def __init__(self, args: argparse.Namespace, model_dir: Path, out: Path) -> None:
        self.args = args
        self.model_dir = model_dir
        self.out = out
        self.records: list[Record] = []
        self.notes: list[str] = []
        self.bar: Any = None
        self.meta: dict[str, Any] = {}
        self.runs: list[dict[str, Any]] = []  # per target run: load average, wall time
        self.exact = True  # a request ending short of its max_tokens is an error

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def result(self) -> dict[str, Any]:
        return {**self.meta, "notes": self.notes, "runs": self.runs,
                "records": [asdict(r) for r in self.records]}

    def checkpoint(self) -> None:
        """results.json as it stands: a run cut short (a device time limit, a crash) keeps
        what it measured; `--report` summarises it."""
        (self.out / "results.json").write_text(json.dumps(self.result()) + "\n")

    def items(self, n: int, seed: int, models: list[str], max_tokens: Span | None = None
              ) -> list[Item]:
        a = self.args
        return build(self.model_dir, n, a.prompt_tokens, max_tokens or a.max_tokens, seed, models)

    def done(self, rec: Record) -> None:
        if self.bar is not None:
            self.bar.update(1)

    async def level(self, targets: list[Any], scenario: str, level: float,
                    concurrency: int | None, n: int, rates: float | None,
                    models: list[str]) -> None:
        for rep in range(self.args.reps):
            seed = self.args.seed + 1000 * rep + int(level * 10)
            items = self.items(n, seed, models)
            times = arrivals(n, rates, seed) if rates else None
            k = rep % len(targets)
            for t in targets[k:] + targets[:k]:
                await self.one(t, scenario, level, rep, t.run(
                    items, scenario, level, rep, concurrency, times, self.done),
                    [it.max_tokens for it in items])
        self.checkpoint()

    async def one(self, t: Any, scenario: str, level: float, rep: int,
                  go: Awaitable[list[Record]], max_tokens: list[int] | int) -> None:
        """One target's run (`go` returns its records), timed, with the load average."""
        if self.bar is not None:
            self.bar.set_description(f"{scenario} {level:g} {t.name} rep {rep}")
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        try:
            recs = await go
        except (RuntimeError, OSError, ValueError, TimeoutError) as e:
            self.notes.append(f"{scenario} {level:g} {t.name} rep {rep} failed: {e!r}")
            self.log(self.notes[-1])
            return
        if self.exact:
            _flag_short(recs, max_tokens if isinstance(max_tokens, list)
                        else [max_tokens] * len(recs))
        self.records += recs
        tok = sum(r.completion_tokens for r in recs if not r.error)
        err = sum(1 for r in recs if r.error)
        dt = time.perf_counter() - t0
        load = (load0 + os.getloadavg()[0]) / 2
        self.runs.append({"scenario": scenario, "level": level, "target": t.name, "rep": rep,
                          "wall_s": dt, "loadavg": load})
        self.log(f"{scenario} {level:g} {t.name} rep {rep}: {tok} tokens in {dt:.1f}s "
                 f"= {tok / dt:.1f} tok/s, {err} errors, load avg {load:.1f}")

    async def agents(self, targets: list[Any]) -> None:
        """The agent scenario (bench.agent): per rep the same conversations on every target,
        back to back, the order rotating."""
        a = self.args
        for rep in range(a.reps):
            convs = agent.conversations(self.model_dir, a.agent_conversations, a.agent_turns,
                                        a.agent_user_tokens, a.seed + 1000 * rep)
            k = rep % len(targets)
            for t in targets[k:] + targets[:k]:
                await self.one(t, agent.SCENARIO, len(convs), rep, agent.talk(
                    t, convs, a.agent_max_tokens, rep, self.done), a.agent_max_tokens)
                self.checkpoint()

    async def warm(self, targets: list[Any], concurrency: int, models: list[str]) -> None:
        """A short run per target at this concurrency: first-use costs (a GPU's kernel JIT
        per shape, lazy imports) stay out of the measurement."""
        items = self.items(concurrency, 99, models, Span(WARMUP_TOKENS, WARMUP_TOKENS))
        for t in targets:
            recs = await t.run(items, "warmup", concurrency, 0, concurrency, None, lambda r: None)
            bad = [r.error for r in recs if r.error]
            if bad:
                self.notes.append(f"warm-up on {t.name} at {concurrency}: {bad[0]}")


def _flag_short(records: list[Record], max_tokens: list[int]) -> None:
    """Every request is meant to run to its max_tokens (EOS banned or never picked): a shorter
    one was cut off, and counting its tokens would flatter the tok/s."""
    for rec, want in zip(records, max_tokens, strict=True):
        if not rec.error and rec.completion_tokens < want:
            rec.error = f"short: {rec.completion_tokens} of {want} tokens"


async def _start(stack: contextlib.AsyncExitStack, name: str, args: argparse.Namespace,
                 model_dir: Path, gguf: Path | None, env: dict[str, str],
                 extra: dict[str, Any], out: Path) -> Any:
    max_batch = max([*args.streams, args.mix_streams if args.mix else 0, args.max_batch,
                     *([args.agent_conversations, args.agent_nohit_streams]
                       if args.agent_turns else [])])
    if name in ("gateway", "gateway-nocache", "gateway-nospare"):
        cache = 0 if name == "gateway-nocache" else args.prompt_cache_bytes
        return await stack.enter_async_context(T.gateway(
            name, {"bench": model_dir}, out / f"{name}.log", env, extra, max_batch, args.dtype,
            prompt_cache_bytes=cache, warm_spare=name != "gateway-nospare"))
    if name == "in-process":
        return await stack.enter_async_context(T.inprocess(
            name, model_dir, max_batch, env, extra.get("logit_bias", {})))
    if name == "mlx_lm.server":
        return await stack.enter_async_context(T.mlx_lm_server(
            model_dir, max_batch, out / "mlx_lm_server.log", env, extra))
    if name == "llama.cpp":
        if gguf is None:
            raise RuntimeError("no GGUF for this model (--gguf)")
        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeError("llama-cpp-python is not installed: "
                               "pip install 'llama-cpp-python[server]'")
        return await stack.enter_async_context(T.llama_cpp_server(
            gguf, args.threads, out / "llama_cpp.log", env, extra))
    if name == "vllm-mlx":
        return await stack.enter_async_context(T.vllm_mlx(
            args.peer_venv, model_dir, max_batch, out / "vllm_mlx.log", env, extra))
    if name == "mlx-serve":
        return await stack.enter_async_context(T.mlx_serve(
            args.peer_venv, model_dir, out / "mlx_serve.log", env, extra))
    if name == "url":
        if not args.url:
            raise RuntimeError("--url is required for the url target")
        served = args.served_model
        return T.HttpTarget(args.url_name, args.url.rstrip("/"),
                            lambda m: served or m, extra)
    raise ValueError(name)


async def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from mlx_gw.gateway.supervision.blas import fast_blas_env

    # SIGTERM cancels the run, so the exit stack stops every target (each runs in its own
    # session and would outlive a killed harness); results.json keeps what was measured.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    model_dir, gguf, may_stop = _model(args)
    env = {**os.environ, **fast_blas_env()}
    if args.threads:
        env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    ban = may_stop if args.ban_eos == "auto" else args.ban_eos == "on"
    extra: dict[str, Any] = {"logit_bias": _eos_bias(model_dir)} if ban else {}
    runner = Runner(args, model_dir, out)
    # Every request should then run to max_tokens; with EOS allowed a real model may stop.
    runner.exact = ban or not may_stop
    started: list[Any] = []
    t_start = time.perf_counter()
    runner.meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": machine(), "revision": revision(), "model": str(model_dir),
        "gguf": str(gguf) if gguf else None, "blas": env.get("LD_PRELOAD", "none"),
        "openblas_threads": env.get("OPENBLAS_NUM_THREADS", ""),
        "prompt_tokens": str(args.prompt_tokens), "max_tokens": str(args.max_tokens),
        "logit_bias": extra.get("logit_bias"), "reps": args.reps, "targets": args.targets,
        "prompt_cache_bytes": args.prompt_cache_bytes,
        **({"agent": {k: getattr(args, f"agent_{k}") for k in (
            "turns", "conversations", "user_tokens", "max_tokens", "from_turn",
            "nohit_streams")}} if args.agent_turns else {}),
    }
    async with contextlib.AsyncExitStack() as stack:
        for name in args.targets:
            try:
                started.append(await _start(stack, name, args, model_dir, gguf, env, extra, out))
            except (RuntimeError, TimeoutError, OSError) as e:
                runner.notes.append(f"{name}: not run: {e}")
                print(f"{name}: not run: {e}", file=sys.stderr)
        total = args.reps * len(started) * (
            sum(n * args.requests_per_stream for n in args.streams)
            + len(args.rates) * args.open_requests)
        if args.mix:
            total += args.reps * 2 * args.mix_requests
        gateways = [t for t in started if t.name in ("gateway", "gateway-nocache")]
        nohit = args.agent_nohit_streams if args.agent_turns and len(gateways) == 2 else 0
        if args.agent_turns:
            total += args.reps * (len(started) * args.agent_conversations * args.agent_turns
                                  + 2 * nohit * args.requests_per_stream)
        runner.meta["targets"] = [t.name for t in started]
        runner.bar = _progress(total)
        if args.agent_turns:
            await runner.warm(started, args.agent_conversations, ["bench"])
            await runner.agents(started)
            if nohit:  # the cache's cost when nothing hits: unique prompts, cache on vs off
                await runner.warm(gateways, nohit, ["bench"])
                await runner.level(gateways, "closed", nohit, nohit,
                                   nohit * args.requests_per_stream, None, ["bench"])
        for n in args.streams:
            await runner.warm(started, n, ["bench"])
            await runner.level(started, "closed", n, n, n * args.requests_per_stream, None,
                               ["bench"])
        for rate in args.rates:
            await runner.level(started, "open", rate, None, args.open_requests, rate, ["bench"])
    if args.mix:
        await _mix(runner, args, model_dir, env, extra, out)
    if runner.bar is not None:
        runner.bar.close()
    return {**runner.result(), "total_s": time.perf_counter() - t_start}


async def _mix(runner: Runner, args: argparse.Namespace, model_dir: Path, env: dict[str, str],
               extra: dict[str, Any], out: Path) -> None:
    """K names for the same weights; each request names one at random; at most
    `--mix-loaded` loaded: the gateway and mlx_lm.server (which swaps to whatever local model
    a request names) swap on every switch."""
    names = [f"bench-{i}" for i in range(args.mix)]
    links = {}
    for name in names:  # distinct paths, so mlx_lm.server sees distinct models
        link = out / "mix" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(model_dir.resolve(), target_is_directory=True)
        links[name] = link
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for name in [t for t in args.targets if t in ("gateway", "mlx_lm.server")]:
            try:
                if name == "gateway":
                    started.append(await stack.enter_async_context(T.gateway(
                        "gateway", links, out / "gateway-mix.log", env, extra,
                        args.mix_streams, args.dtype, max_loaded=args.mix_loaded)))
                else:
                    t = await stack.enter_async_context(T.mlx_lm_server(
                        links[names[0]], args.mix_streams, out / "mlx_lm_server-mix.log", env,
                        extra))
                    t.model_for = lambda m: str(links[m])
                    started.append(t)
            except (RuntimeError, TimeoutError, OSError) as e:
                runner.notes.append(f"mix {name}: not run: {e}")
        await runner.level(started, "mix", args.mix_streams, args.mix_streams,
                           args.mix_requests, None, names)


def _write(res: dict[str, Any], out: Path) -> str:
    records = [Record(**r) for r in res["records"]]
    ref = "in-process" if "in-process" in res["targets"] else None
    gw = "gateway" if "gateway" in res["targets"] else None
    rows = summarize(records, ref, gw)
    res.setdefault("total_s", float("nan"))
    res["summary"] = rows
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    with (out / "requests.csv").open("w", newline="") as f:
        w = csv.writer(f)
        names = [x.name for x in fields(Record) if x.name != "itl_s"]
        w.writerow([*names, "tpot_s", "itl_p50_s", "itl_max_s"])
        for r in records:
            itl = sorted(r.itl_s)
            w.writerow([getattr(r, n) for n in names] + [
                r.tpot_s, itl[len(itl) // 2] if itl else "", itl[-1] if itl else ""])
    table = markdown(rows, ref, gw)
    m = res["machine"]
    title = (f"{Path(res['model']).name}, prompt {res['prompt_tokens']} / output "
             f"{res['max_tokens']} tokens; {m['gpu'] or m['cpu']} ({m['nproc']} cores)")
    text = (f"{table}\n\n- command: `{res['command']}`\n- date {res['date']}, revision "
            f"{res['revision']}, {title}; BLAS {res['blas']} threads "
            f"{res['openblas_threads'] or 'default'}; {res['reps']} reps, order rotating\n")
    if res.get("agent"):
        s = agent.summarize(records, "gateway", res["agent"]["from_turn"])
        res["agent_summary"] = s
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        a = res["agent"]
        text += (f"\n### agent: {a['conversations']} conversations x {a['turns']} turns, "
                 f"+{a['user_tokens']} user tokens and a {a['max_tokens']}-token answer a turn"
                 f" (TTFT ms; gateway prompt cache {res['prompt_cache_bytes']} bytes)\n\n"
                 + agent.markdown(s, "gateway-nocache", "mlx_lm.server") + "\n")
    loads = [r["loadavg"] for r in res.get("runs", [])]
    if loads:
        text += f"- load avg (1 min) during the runs: {min(loads):.1f} to {max(loads):.1f}\n"
    text += "".join(f"- {n}\n" for n in res["notes"])
    (out / "summary.md").write_text(text)
    try:
        from bench.plots import draw
        for p in draw(rows, out, title):
            text += f"- plot: {p}\n"
    except ImportError:
        text += "- no plots: matplotlib is not installed (pip install -e '.[bench]')\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--targets", nargs="+", choices=ALL_TARGETS, default=None,
                    help="default: gateway in-process mlx_lm.server llama.cpp; with "
                         "--agent-turns: " + " ".join(AGENT_TARGETS))
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="an mlx-lm model dir (default: the packaged SmolLM2-135M-Instruct GGUF "
                         "exported to one; see bench.make_model for random-weight shapes)")
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF llama.cpp serves")
    ap.add_argument("--dtype", default=None, help="the gateway's dtype for the model")
    ap.add_argument("--streams", type=int, nargs="*", default=None,
                    help="default 1 4 16; none with --agent-turns")
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--rates", type=float, nargs="*", default=[])
    ap.add_argument("--open-requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=Span.parse, default=Span(128, 128), help="N or LO:HI")
    ap.add_argument("--max-tokens", type=Span.parse, default=Span(64, 64), help="N or LO:HI")
    ap.add_argument("--mix", type=int, default=0, help="models in the swap scenario (0: none)")
    ap.add_argument("--mix-loaded", type=int, default=1)
    ap.add_argument("--mix-streams", type=int, default=8)
    ap.add_argument("--mix-requests", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=0, help="at least the largest --streams")
    ap.add_argument("--agent-turns", type=int, default=0,
                    help="run the multi-turn agent scenario with this many turns (0: none)")
    ap.add_argument("--agent-conversations", type=int, default=4)
    ap.add_argument("--agent-user-tokens", type=int, default=336,
                    help="new user tokens a turn (with the answer: the history's growth)")
    ap.add_argument("--agent-max-tokens", type=int, default=64, help="each answer's length")
    ap.add_argument("--agent-from-turn", type=int, default=5,
                    help="the late-turn ratios use turns from this one on")
    ap.add_argument("--agent-nohit-streams", type=int, default=16,
                    help="the no-hit check: unique prompts at this many streams through "
                         "gateway and gateway-nocache (0: skip)")
    ap.add_argument("--prompt-cache-bytes", type=int, default=None,
                    help="the gateway target's prompt_cache max_bytes (default: the gateway's "
                         f"own default; with --agent-turns {AGENT_CACHE_BYTES})")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="OPENBLAS_NUM_THREADS and llama.cpp --n_threads (0: CPU count)")
    ap.add_argument("--peer-venv", type=Path, default=Path(sys.prefix),
                    help="the venv holding vllm-mlx / mlx-serve (they pin other mlx-lm "
                         "versions; default: this one)")
    ap.add_argument("--ban-eos", choices=["auto", "on", "off"], default="auto",
                    help="send logit_bias -100 on the model's end-of-generation ids so every "
                         "request runs to max_tokens (auto: unless the model is a random-weight "
                         "one from bench.make_model; off for a --url server with another "
                         "vocabulary, and then short outputs are not errors)")
    ap.add_argument("--url", default=None, help="base URL of a running server (…/v1)")
    ap.add_argument("--url-name", default="url", help="its name in the tables")
    ap.add_argument("--served-model", default=None, help="the model name --url serves")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None, metavar="RESULTS_JSON",
                    help="re-print the table and redraw the plots of a saved run")
    args = ap.parse_args()
    if args.report:
        print(_write(json.loads(args.report.read_text()), args.report.parent))
        return
    if args.targets is None:
        args.targets = AGENT_TARGETS if args.agent_turns else [
            "gateway", "in-process", "mlx_lm.server", "llama.cpp"]
    if args.streams is None:
        args.streams = [] if args.agent_turns else [1, 4, 16]
    if args.agent_turns and args.prompt_cache_bytes is None:
        args.prompt_cache_bytes = AGENT_CACHE_BYTES
    if args.url and "url" not in args.targets:
        args.targets.append("url")
    args.threads = args.threads or os.cpu_count() or 1
    out = args.out or OUT_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()  # the mix scenario links model dirs under it
    out.mkdir(parents=True, exist_ok=True)
    try:
        res = asyncio.run(run(args, out))
    except asyncio.CancelledError:  # SIGTERM: the targets are stopped, results.json kept
        sys.exit(f"stopped by SIGTERM; what was measured is in {out / 'results.json'}")
    print(_write(res, out))
    print(f"results: {out} ({res['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
