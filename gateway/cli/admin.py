"""`mlx-gw` commands over the event stream and the models on disk: events, models, pull.

`events [-f]` prints the gateway's lifecycle events (following them with -f). `models` lists
the Hugging Face cache: through the running gateway (which also says which configured model
uses each repo), or by scanning the cache here when none runs. `pull REPO` downloads a repo
through the running gateway's /api/pull with a progress bar, or here when none runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from mlx_gw.gateway.cli.client import api, open_api, read_state

BAR_WIDTH = 30
MB = 1e6
_EVENT_FIELDS = ("id", "type", "time", "model")


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("events", help="print lifecycle events (load, ready, evict, ...)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_events)
    s = sub.add_parser("models", help="list models on disk (the Hugging Face cache)")
    s.set_defaults(func=cmd_models)
    s = sub.add_parser("pull", help="download a Hugging Face repo into the local cache")
    s.add_argument("repo", help="org/name")
    s.add_argument("--revision", help="branch, tag or commit (default: main)")
    s.set_defaults(func=cmd_pull)


def _stream(method: str, path: str, body: dict[str, Any] | None = None) -> Iterator[Any]:
    """The `data:` payloads of an SSE response from the running gateway, as they arrive."""
    resp = open_api(method, path, body, accept="text/event-stream")
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                yield json.loads(line[5:].strip())


# ---------------------------------------------------------------- events


def format_event(e: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
    details = " ".join(f"{k}={v}" for k, v in e.items()
                       if k not in _EVENT_FIELDS and v is not None and v != "")
    return f"{when}  {e['type']:<11} {e['model']:<24} {details}".rstrip()


def cmd_events(args: argparse.Namespace) -> int:
    def show(e: dict[str, Any]) -> None:
        print(json.dumps(e) if args.json else format_event(e), flush=True)

    if not args.follow:
        for e in api("GET", "/api/events")["events"]:
            show(e)
        return 0
    for e in _stream("GET", "/api/events?follow=1"):
        show(e)
    return 0


# ---------------------------------------------------------------- models on disk


def cmd_models(args: argparse.Namespace) -> int:
    if read_state():
        rows = api("GET", "/api/models")["models"]
    else:
        from mlx_gw.gateway.store.model_files import cached_repos

        rows = cached_repos()
    if not rows:
        print("no models in the Hugging Face cache (pull one with `mlx-gw pull ORG/NAME`)")
        return 0
    fmt = "{:<48} {:>10} {:>6}  {:<19}  {}"
    print(fmt.format("REPO", "SIZE", "FILES", "MODIFIED", "USED BY"))
    for r in rows:
        used = ", ".join(r.get("used_by", []))
        if r.get("loaded"):
            used += " (loaded)"
        modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_modified"]))
        print(fmt.format(r["repo"], f"{r['size_bytes'] / MB:.1f} MB", r["files"], modified,
                         used or "-"))
    return 0


# ---------------------------------------------------------------- pull


class _Bar:
    """A one-line progress bar: redrawn in place on a terminal, one line per file otherwise."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.tty = sys.stdout.isatty()
        self._file: str | None = None

    def update(self, done: int, total: int, file: str) -> None:
        frac = done / total if total else 1.0
        filled = int(frac * BAR_WIDTH)
        line = (f"pulling {self.repo} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                f"{frac * 100:3.0f}%  {done / MB:.1f}/{total / MB:.1f} MB  {file}")
        if self.tty:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
        elif file != self._file or done >= total:
            print(line, flush=True)
        self._file = file

    def end(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def cmd_pull(args: argparse.Namespace) -> int:
    bar = _Bar(args.repo)
    events = _stream("POST", "/api/pull", {"repo": args.repo, "revision": args.revision}) \
        if read_state() else _pull_here(args.repo, args.revision)
    for e in events:
        status = e.get("status")
        if status == "manifest":
            print(f"{e['repo']} @ {e['revision'][:12]}: {e['files']} files, "
                  f"{e['total'] / MB:.1f} MB", flush=True)
        elif status == "downloading":
            bar.update(e["completed"], e["total"], e["file"])
        elif status == "success":
            bar.end()
            print(f"success: {e['repo']} is in {e['path']}")
            return 0
        elif status == "error":
            bar.end()
            print(f"mlx-gw: pull failed: {e['error']['message']}", file=sys.stderr)
            return 1
    print("mlx-gw: the pull ended without a result", file=sys.stderr)
    return 1


def _pull_here(repo: str, revision: str | None) -> Iterator[dict[str, Any]]:
    """The same progress events as /api/pull, downloading in this process."""
    import queue

    from huggingface_hub.errors import RepositoryNotFoundError

    from mlx_gw.gateway.store import model_files

    try:
        man = model_files.manifest(repo, revision)
    except (RepositoryNotFoundError, model_files.HubUnreachable) as e:
        yield {"status": "error", "error": {"message": f"{repo}: {e}"}}
        return
    yield {"status": "manifest", "repo": repo, "revision": man["revision"],
           "files": len(man["files"]), "total": man["total"]}
    reports: queue.Queue[dict[str, Any]] = queue.Queue()
    cancelled = threading.Event()

    def run() -> None:
        try:
            path = model_files.pull(man, reports.put, cancelled)
            reports.put({"status": "success", "repo": repo, "path": path})
        except Exception as e:
            reports.put({"status": "error", "error": {"message": f"{type(e).__name__}: {e}"}})

    t = threading.Thread(target=run, name="pull", daemon=True)
    t.start()
    try:
        while True:
            try:
                e = reports.get(timeout=1.0)
            except queue.Empty:
                if t.is_alive():
                    continue
                e = {"status": "error", "error": {"message": "the download thread died"}}
            yield e
            if e["status"] in ("success", "error"):
                return
    finally:
        cancelled.set()
