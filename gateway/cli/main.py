"""`mlx-gw` command line: init, start (daemon or --foreground), stop, status, ps, logs,
load, unload (and, from mlx_gw.gateway.cli.admin, events, models, pull).

State lives under $MLX_GW_HOME (default ~/.mlx-gw): `gateway.json` (pid, url of the running
gateway) and `gateway.log`. The daemon is this same program run with --foreground in a new
session, so it is the workers' parent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from mlx_gw.gateway.cli import admin as cli_admin
from mlx_gw.gateway.cli import train as cli_train
from mlx_gw.gateway.cli.client import api, log_file, read_state, state_dir_problem, state_file

EXIT_CONFIG = 2
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def _load_config(path: str | None):
    from mlx_gw.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        print(f"mlx-gw: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


# ---------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    from mlx_gw.config import render_init_yaml

    target = Path(args.path)
    if target.exists() and not args.force:
        print(f"mlx-gw: {target} exists; use --force to overwrite", file=sys.stderr)
        return 1
    target.write_text(render_init_yaml())
    print(f"wrote {target}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    running = read_state()
    if running and running["pid"] != os.getpid():
        print(f"mlx-gw: already running (pid {running['pid']}) at {running['url']}",
              file=sys.stderr)
        return 1
    config = _load_config(args.config)
    if config.source is None and _fetch_defaults():
        config = _load_config(args.config)  # now with the fetched default model
    problem = state_dir_problem()
    if problem and not args.foreground:
        print(f"mlx-gw: {problem}; the daemon keeps its log there. Set MLX_GW_HOME to a "
              "writable directory (or run `mlx-gw start --foreground`)", file=sys.stderr)
        return 1
    if args.foreground:
        return _run_foreground(config, args, state_problem=problem)
    return _daemonize(config, args)


def _fetch_defaults() -> bool:
    """With no models.yaml: fetch the default models' weights not on disk yet (once, with
    progress on the terminal). Returns whether anything was fetched."""
    from mlx_gw.config import DEFAULT_MODELS, models_dir
    from mlx_gw.gateway.store import default_weights

    fetched = False
    for candidate in default_weights.missing_downloadable(DEFAULT_MODELS, models_dir()):
        try:
            default_weights.fetch(candidate, models_dir())
            fetched = True
        except default_weights.FetchError as e:
            print(f"mlx-gw: could not fetch {candidate.name}: {e}", file=sys.stderr)
    return fetched


def _run_foreground(config, args: argparse.Namespace, state_problem: str | None = None) -> int:
    from mlx_gw.config import default_config_problem
    from mlx_gw.gateway.app import serve

    logging.basicConfig(level=os.environ.get("MLX_GW_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if config.source is None and not config.models:
        logging.getLogger("mlxgw").warning("no models configured: %s", default_config_problem())
    if state_problem:
        logging.getLogger("mlxgw").warning("%s: serving anyway, but `mlx-gw ps`, `stop` and "
                                           "`reload` will not find this gateway", state_problem)

    def on_listening(host: str, port: int, ollama_port: int | None) -> None:
        url = f"http://{host}:{port}"
        state: dict[str, Any] = {"pid": os.getpid(), "url": url, "config": config.source}
        if ollama_port is not None:
            state["ollama_url"] = f"http://{host}:{ollama_port}"
        if not state_problem:
            state_file().write_text(json.dumps(state))
        if ollama_port is not None:
            print(f"mlx-gw Ollama-compatible listener on {state['ollama_url']}", flush=True)
        print(f"mlx-gw listening on {url}", flush=True)

    try:
        return asyncio.run(serve(config, host=args.host, port=args.port,
                                 ollama_port=args.ollama_port, on_listening=on_listening))
    finally:
        st = read_state()
        if st and st.get("pid") == os.getpid():
            state_file().unlink(missing_ok=True)


def _daemonize(config, args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "mlx_gw.gateway.cli", "start", "--foreground"]
    if config.source:
        cmd += ["--config", str(Path(config.source).resolve())]
    if args.host:
        cmd += ["--host", args.host]
    if args.port is not None:
        cmd += ["--port", str(args.port)]
    if args.ollama_port is not None:
        cmd += ["--ollama-port", str(args.ollama_port)]
    log_path = log_file()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        st = read_state()
        if st and st["pid"] == proc.pid:
            print(f"mlx-gw started (pid {proc.pid}) at {st['url']}\nlogs: {log_path}")
            return 0
        try:
            proc.wait(0.1)
        except subprocess.TimeoutExpired:
            continue
        print(f"mlx-gw: the gateway exited with code {proc.returncode}; "
              f"last log lines:\n{_tail(log_path, 20)}", file=sys.stderr)
        return proc.returncode or 1
    print(f"mlx-gw: the gateway did not come up within {START_TIMEOUT_S:.0f}s; see {log_path}",
          file=sys.stderr)
    return 1


def cmd_stop(args: argparse.Namespace) -> int:
    st = read_state()
    if not st:
        print("mlx-gw is not running")
        return 0
    proc = psutil.Process(st["pid"])
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        proc.kill()
        print(f"mlx-gw: pid {st['pid']} did not stop in {STOP_TIMEOUT_S:.0f}s; killed it",
              file=sys.stderr)
        return 1
    state_file().unlink(missing_ok=True)
    print(f"mlx-gw stopped (pid {st['pid']})")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to the running gateway: it re-reads the config file it started with."""
    st = read_state()
    if not st:
        print("mlx-gw is not running", file=sys.stderr)
        return 1
    psutil.Process(st["pid"]).send_signal(signal.SIGHUP)
    print(f"mlx-gw (pid {st['pid']}) re-reads {st.get('config') or 'its config'}; "
          "`mlx-gw logs` shows the outcome ([reload] lines)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = read_state()
    if not st:
        print("mlx-gw is not running")
        return 3
    ps = api("GET", "/api/ps")["models"]
    print(f"mlx-gw running (pid {st['pid']}) at {st['url']}; {len(ps)} model(s) loaded")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    rows = api("GET", "/api/ps")["models"]
    fmt = "{:<28} {:<9} {:>8} {:<9} {:>10} {:>9}  {:<24}  {}"
    print(fmt.format("NAME", "TYPE", "PID", "STATE", "MEMORY", "IN_FLIGHT", "EXPIRES", "BLAS"))
    for m in rows:
        print(fmt.format(m["name"], m["type"], m["pid"] or "-", m["state"],
                         f"{m['memory_bytes'] / 2**20:.0f} MiB", m["in_flight"],
                         m["expires_at"] or "never", _blas_label(m.get("blas"))))
        for r in m.get("ranks", []):  # a distributed worker: one line per rank under it
            print(fmt.format(f"  rank {r['rank']} @ {r['host']}", "", r["pid"], "",
                             f"{r['memory_bytes'] / 2**20:.0f} MiB", "", "", ""))
    return 0


def _blas_label(blas: str | None) -> str:
    """OpenBLAS by file name, "reference (slow!)", or "-" where it does not apply (GPU)."""
    if blas is None:
        return "-"
    return "reference (slow!)" if blas == "reference" else Path(blas).name


def cmd_load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.name}
    if args.keep_alive is not None:
        body["keep_alive"] = args.keep_alive
    m = api("POST", "/api/load", body)
    print(f"{m['name']} ready (pid {m['pid']})")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    m = api("POST", "/api/unload", {"model": args.name})
    print(f"{m['name']} unloaded")
    return 0


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def cmd_logs(args: argparse.Namespace) -> int:
    path = log_file()
    if not path.exists():
        print(f"no log yet at {path}")
        return 0
    with open(path, errors="replace") as f:
        sys.stdout.write(f.read())
        sys.stdout.flush()
        while args.follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.25)  # polling a file: there is nothing to wait on
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlx-gw", description="Serve many MLX models behind one "
                                "OpenAI-compatible endpoint")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("init", help="write ./models.yaml with the defaults and examples")
    s.add_argument("--path", default="models.yaml")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_init)
    s = sub.add_parser("start", help="start the gateway (a daemon unless --foreground)")
    s.add_argument("--config", help="models.yaml (default: $MLX_GW_CONFIG, ./models.yaml, "
                   "~/.mlx-gw/models.yaml, else the embedded defaults)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--ollama-port", type=int, metavar="PORT",
                   help="also listen on PORT for Ollama clients (11434 is Ollama's; 0 = any "
                   "free port); overrides gateway.ollama_compat_port")
    s.add_argument("--foreground", action="store_true", help="run in this process")
    s.set_defaults(func=cmd_start)
    for name, func, text in (("stop", cmd_stop, "stop the gateway and its workers"),
                             ("reload", cmd_reload, "re-read the config file (as SIGHUP does)"),
                             ("status", cmd_status, "is the gateway running?"),
                             ("ps", cmd_ps, "list loaded models")):
        sub.add_parser(name, help=text).set_defaults(func=func)
    s = sub.add_parser("logs", help="print the gateway log")
    s.add_argument("-f", "--follow", action="store_true")
    s.set_defaults(func=cmd_logs)
    s = sub.add_parser("load", help="load a model now")
    s.add_argument("name")
    s.add_argument("--keep-alive")
    s.set_defaults(func=cmd_load)
    s = sub.add_parser("unload", help="unload a model now")
    s.add_argument("name")
    s.set_defaults(func=cmd_unload)
    cli_admin.add_commands(sub)
    cli_train.add_commands(sub)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
