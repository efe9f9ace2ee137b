"""What a fine-tuning job takes: the request bodies, and its rows checked before it starts.

Rows are JSON objects in one of the formats `mlx_lm.tuner.datasets` reads: chat
(`{"messages": [{"role", "content"}, ...]}`), completions (`{"prompt", "completion"}`) or
text (`{"text"}`). mlx-lm picks the format from the first row and fails mid-run on a row of
another, so every row is checked here, and a bad one is a 400 naming its line, before any
worker starts. The gateway never tokenizes: a row's length in UTF-8 bytes bounds its token
count from above (a byte-level BPE token is at least one byte), which is what the job's
memory estimate uses.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import msgspec

from mlx_gw.gateway.errors import BadRequest

Rows = list[dict[str, Any]]
DataSource = str | Rows
MAX_DATA_BYTES = 1 << 30  # a JSONL file the gateway reads to check (1 GiB)
TEMPLATE_BYTES = 16  # a chat template's markers around one message (role, start, end)
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also a directory name


class TrainRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/train. `data` / `valid`: a JSONL file on the gateway's machine, or rows."""

    base: Annotated[str, msgspec.Meta(min_length=1)]
    data: DataSource
    adapter_name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    valid: DataSource | None = None
    iters: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 4
    learning_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1e-5
    rank: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    scale: Annotated[float, msgspec.Meta(gt=0.0, le=1e4)] = 20.0
    dropout: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.0
    # The last N blocks get LoRA layers; None: mlx-lm's 16 (all, when fewer); -1: all.
    num_layers: Annotated[int, msgspec.Meta(ge=-1, le=100_000)] | None = None
    max_seq_length: Annotated[int, msgspec.Meta(ge=8, le=1 << 20)] = 2048
    steps_per_report: Annotated[int, msgspec.Meta(ge=1)] = 10
    steps_per_eval: Annotated[int, msgspec.Meta(ge=1)] = 200
    val_batches: Annotated[int, msgspec.Meta(ge=-1)] = 25  # -1: the whole valid set
    mask_prompt: bool = False  # train on the completions only (not for text rows)
    seed: int = 0


class FuseRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/fuse. `adapter`: an adapter's name, or an absolute adapter directory (then
    `base` is needed); `output`: the absolute directory to create."""

    adapter: Annotated[str, msgspec.Meta(min_length=1)]
    output: Annotated[str, msgspec.Meta(min_length=1)]
    base: str | None = None


def _text(value: Any) -> bool:
    return isinstance(value, str)


def row_format(row: Any, where: str) -> str:
    """"chat", "completions" or "text" for one row; BadRequest saying what is wrong."""
    if not isinstance(row, dict):
        raise BadRequest(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    if "prompt" in row and "completion" in row:
        if not (_text(row["prompt"]) and _text(row["completion"])):
            raise BadRequest(f"{where}: 'prompt' and 'completion' must be strings")
        return "completions"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and _text(m.get("role"))
                    and (m.get("content") is None or _text(m["content"]))):
                raise BadRequest(f"{where}: messages[{i}] must be an object with a string "
                                 "'role' and a string 'content'")
        return "chat"
    if "text" in row:
        if not _text(row["text"]):
            raise BadRequest(f"{where}: 'text' must be a string")
        return "text"
    raise BadRequest(f"{where}: unknown row format (keys {sorted(row)}): a row is "
                     "{\"messages\": [...]} (chat), {\"prompt\", \"completion\"} "
                     "(completions) or {\"text\"}")


def usable_path(path: str) -> bool:
    """Whether `path` can be asked about at all (no NUL byte, not too long for the OS)."""
    try:
        os.stat(Path(path).expanduser())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return True
    except (ValueError, OSError):
        return False
    return True


def read_jsonl(path: str, param: str) -> Rows:
    """The rows of JSONL file `path` on this machine (BadRequest for a missing, oversized or
    malformed file; line numbers from 1). Blocking: run it in a thread."""
    f = Path(path).expanduser()
    if not usable_path(path):
        raise BadRequest(f"{param} path {path!r} is not a usable path", param=param)
    if not f.is_absolute():
        raise BadRequest(f"{param} path {path!r} must be absolute (a file on the gateway's "
                         "machine), or send the rows themselves", param=param)
    if not f.is_file():
        raise BadRequest(f"{param} file {path} does not exist", param=param,
                         code="file_not_found")
    if f.stat().st_size > MAX_DATA_BYTES:
        raise BadRequest(f"{param} file {path} is over {MAX_DATA_BYTES >> 20} MiB",
                         param=param)
    rows: Rows = []
    with open(f, encoding="utf-8", errors="strict") as fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise BadRequest(f"{param} file {path} line {n}: not JSON ({e})",
                                     param=param) from None
        except UnicodeDecodeError as e:
            raise BadRequest(f"{param} file {path}: not UTF-8 text ({e})", param=param) \
                from None
    return rows


def row_bytes(row: dict[str, Any]) -> int:
    """A bound on the row's tokens: the UTF-8 bytes of its strings, plus TEMPLATE_BYTES for
    each message (the chat template's markers around it)."""
    def size(v: Any) -> int:
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 8
    messages = row.get("messages")
    turns = len(messages) if isinstance(messages, list) else 2
    return size(row) + TEMPLATE_BYTES * turns


def check_rows(rows: Rows, param: str, *, batch_size: int, mask_prompt: bool) -> int:
    """Check every row (one format throughout, enough of them for a batch); returns the
    longest row's length in UTF-8 bytes (an upper bound of its tokens, less the template)."""
    if not rows:
        raise BadRequest(f"{param} has no rows", param=param)
    first = row_format(rows[0], f"{param} row 1")
    if mask_prompt and first == "text":
        raise BadRequest("mask_prompt needs chat or completions rows (text rows have no "
                         "prompt to mask)", param="mask_prompt")
    longest = 0
    for i, row in enumerate(rows, 1):
        fmt = row_format(row, f"{param} row {i}")
        if fmt != first:
            raise BadRequest(f"{param} row {i} is in {fmt} format, row 1 in {first}: one "
                             "format per file", param=param)
        longest = max(longest, row_bytes(row))
    if len(rows) < batch_size:
        raise BadRequest(f"{param} has {len(rows)} rows, fewer than batch_size ({batch_size})",
                         param=param)
    return longest


def sequence_bound(longest_bytes: int, max_seq_length: int) -> int:
    """Tokens of the longest batch (padded as mlx-lm pads: one plus a multiple of 32)."""
    tokens = longest_bytes
    return min(max_seq_length, 1 + 32 * ((tokens + 31) // 32))


def check_layers(model_path: str, num_layers: int | None) -> None:
    """A num_layers more than the model has is a 400 (when its config.json says how many)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        layers = int(cfg["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a GGUF file or a repo id: the worker checks it
    if num_layers is not None and num_layers > layers:
        raise BadRequest(f"num_layers {num_layers} is more than the model's {layers} layers "
                         "(-1 trains them all)", param="num_layers")


def write_rows(path: Path, rows: Rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
