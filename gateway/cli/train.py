"""`mlx-gw` commands for fine-tuning: train, jobs, adapters, fuse.

`train` starts a job on the running gateway (the data file is read there: the gateway runs on
this machine) and follows its event stream with a progress bar (one line per report when
stdout is not a terminal); Ctrl-C cancels the job. `jobs` lists the jobs, `adapters` the
LoRA adapters (configured, runtime and trained), `fuse` writes a merged model directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mlx_gw.gateway.cli.admin import BAR_WIDTH, _stream
from mlx_gw.gateway.cli.client import api

MiB = 2**20


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train", help="fine-tune a LoRA adapter on the running gateway")
    s.add_argument("--base", required=True, help="the llm model to fine-tune")
    s.add_argument("--data", required=True, help="training rows, JSONL (chat, completions "
                   "or text format, as mlx-lm reads them)")
    s.add_argument("--valid", help="validation rows, JSONL (reports val loss)")
    s.add_argument("--adapter-name", required=True, help="the model name it is served as")
    for flag, kind, default in (("--iters", int, 100), ("--batch-size", int, 4),
                                ("--learning-rate", float, 1e-5), ("--rank", int, 8),
                                ("--scale", float, 20.0), ("--num-layers", int, None),
                                ("--max-seq-length", int, 2048),
                                ("--steps-per-report", int, 10),
                                ("--steps-per-eval", int, 200), ("--seed", int, 0)):
        s.add_argument(flag, type=kind, default=default,
                       help=f"default {default if default is not None else 'the last 16'}")
    s.add_argument("--mask-prompt", action="store_true", help="train on completions only")
    s.add_argument("--json", action="store_true", help="print the events as JSON lines")
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("jobs", help="list fine-tuning jobs")
    s.set_defaults(func=cmd_jobs)
    s = sub.add_parser("adapters", help="list LoRA adapters")
    s.set_defaults(func=cmd_adapters)
    s = sub.add_parser("fuse", help="merge a LoRA adapter into its base as a model directory")
    s.add_argument("--adapter", required=True, help="an adapter name, or an adapter directory")
    s.add_argument("--output", required=True, help="the directory to write")
    s.add_argument("--base", help="the base model (needed with an adapter directory)")
    s.set_defaults(func=cmd_fuse)


def _path(p: str | None) -> str | None:
    return str(Path(p).expanduser().resolve()) if p is not None else None


class _Progress:
    """Iteration bar redrawn in place on a terminal; a line per report otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.val: float | None = None

    def show(self, e: dict[str, Any]) -> None:
        it, total = e.get("iteration", 0), e.get("iters") or 1
        filled = int(BAR_WIDTH * it / total)
        line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {it}/{total}  "
                f"loss {e['loss']:.3f}" + (f"  val {self.val:.3f}" if self.val is not None else "")
                + f"  {e['iterations_per_second']:.2f} it/s  {e['tokens_per_second']:.0f} tok/s"
                + f"  peak {e['peak_memory_bytes'] / MiB:.0f} MiB")
        if self.tty:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def say(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    body = {"base": args.base, "data": _path(args.data), "adapter_name": args.adapter_name,
            "iters": args.iters, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "rank": args.rank, "scale": args.scale,
            "num_layers": args.num_layers, "max_seq_length": args.max_seq_length,
            "steps_per_report": args.steps_per_report, "steps_per_eval": args.steps_per_eval,
            "mask_prompt": args.mask_prompt, "seed": args.seed}
    if args.valid:
        body["valid"] = _path(args.valid)
    job = api("POST", "/api/train", body)
    bar = _Progress()
    bar.say(f"job {job['id']}: {args.base} -> adapter '{args.adapter_name}', "
            f"{args.iters} iterations (estimate {job['estimate_bytes'] / MiB:.0f} MiB)")
    try:
        for e in _stream("GET", f"/api/train/{job['id']}/events"):
            if args.json:
                print(json.dumps(e), flush=True)
            kind = e["type"]
            if kind == "progress":
                if not args.json:
                    bar.show(e)
            elif kind == "val":
                bar.val = e["val_loss"]
                if not args.json:
                    bar.say(f"iteration {e['iteration']}: val loss {e['val_loss']:.3f}")
            elif kind in ("loading", "training", "saving") and not args.json:
                bar.say(f"{kind}...")
            elif kind == "done":
                bar.say(f"done: adapter '{args.adapter_name}' is served (files in "
                        f"{e.get('adapter_path')})")
                return 0
            elif kind in ("failed", "cancelled"):
                why = (e.get("error") or {}).get("message", "")
                bar.say(f"mlx-gw: training job {kind}" + (f": {why}" if why else ""))
                return 1
    except KeyboardInterrupt:
        bar.say(f"cancelling job {job['id']}...")
        api("DELETE", f"/api/train/{job['id']}")
        return 130
    print("mlx-gw: the job's event stream ended without a result", file=sys.stderr)
    return 1


def cmd_jobs(args: argparse.Namespace) -> int:
    fmt = "{:<16} {:<10} {:<24} {:<24} {:>11} {:>8} {:>8}"
    print(fmt.format("ID", "STATUS", "BASE", "ADAPTER", "ITERATION", "LOSS", "VAL"))
    for j in api("GET", "/api/train")["jobs"]:
        loss = f"{j['loss']:.3f}" if j["loss"] is not None else "-"
        val = f"{j['val_loss']:.3f}" if j["val_loss"] is not None else "-"
        print(fmt.format(j["id"], j["status"], j["base"], j["adapter_name"],
                         f"{j['iteration']}/{j['iters']}", loss, val))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    rows = api("GET", "/api/adapters")["adapters"]
    if not rows:
        print("no adapters (add one with `mlx-gw train` or POST /api/adapters)")
        return 0
    fmt = "{:<24} {:<24} {:<8} {}"
    print(fmt.format("NAME", "BASE", "SOURCE", "PATH"))
    for r in rows:
        print(fmt.format(r["name"], r["base"], "runtime" if r["runtime"] else "config",
                         r["path"]))
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    adapter = _path(args.adapter) if Path(args.adapter).expanduser().exists() else args.adapter
    body = {"adapter": adapter, "output": _path(args.output), "base": args.base}
    r = api("POST", "/api/fuse", body)
    print(f"fused '{r['adapter']}' into {r['base']}: {r['output']} ({r['fused_layers']} layers)")
    print(f"add it to models.yaml:\n  NAME:\n    type: llm\n    path: {r['output']}")
    return 0
