"""The prompt cache's disk tier: KV entries that leave memory, kept in files for later hits.

An entry the in-memory cache evicts (its byte budget, `shrink` under pressure, the worker's
shutdown) is written here with mlx-lm's `save_prompt_cache` (safetensors; the entry's tokens,
the model's identity and a checksum in the metadata) and comes back on a lookup that finds a
longer prefix than memory had. Files live under `ROOT/<identity>/`, where the identity is a
digest of what the KV depends on (the model's files, their sizes and mtimes, the dtype, this
format), so a prefix cached by another model, revision or dtype never matches; the index
(tokens -> file) is rebuilt from the files' headers at load, so a reloaded model or a
restarted worker finds its entries again.

A file is written to a temporary name and renamed into place, and read back only if its size,
header and checksum agree: a crash, a truncated or a scribbled-over file is skipped (and
removed) with a log line, never loaded wrong. The whole ROOT stays under `max_bytes` (the
oldest files, by mtime, across every model sharing it, go first). All of this runs in the
worker's one MLX thread: each write or read is one entry's bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from mlx_gw.worker.engines.quantized_kv import as_batchable, as_saveable

log = logging.getLogger("mlxgw.worker")

FORMAT = "mlxgw-prompt-cache-1"  # part of the identity: a new format never reads old files
SUFFIX = ".safetensors"
TMP_MARK = ".tmp-"  # in-progress writes: `<name>.tmp-<pid>.safetensors`
STALE_TMP_S = 3600.0  # a temporary file this old is a crashed write's leftover
MAX_HEADER_BYTES = 64 * 2**20
HEADER_SLACK_BYTES = 16 * 2**10  # beyond the tokens and tensors: what a header adds, at most


def model_identity(path: str, dtype: str) -> str | None:
    """A digest of what a model's KV depends on: its resolved path, every top-level file's
    name, size and mtime (a new revision or re-conversion changes them), the dtype and this
    format. None when the model's files cannot be found (the disk tier stays off)."""
    p = Path(path).expanduser()
    if not p.exists():
        try:
            from mlx_lm.utils import hf_repo_to_path

            p = hf_repo_to_path(path)  # the local snapshot: its path names the revision
        except Exception:
            return None
    p = p.resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir()
                                           if f.is_file() and not f.name.startswith("."))
    parts: list[Any] = [FORMAT, str(p), dtype]
    for f in files:
        st = f.stat()
        parts.append([f.name, st.st_size, st.st_mtime_ns])
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=12).hexdigest()


def _checksum(cache: list[Any]) -> str:
    """CRC32 over every array of the cache's state, in order: a file whose data was damaged
    after its header was written fails it."""
    crc = 0
    for _, value in tree_flatten([c.state for c in cache]):
        if isinstance(value, mx.array):
            crc = zlib.crc32(memoryview(mx.contiguous(value).view(mx.uint8)), crc)
    return f"{crc:08x}"


def _read_header(path: Path) -> tuple[dict[str, str], int]:
    """(the safetensors metadata, the size the header says the file has); raises ValueError
    for anything that is not a whole safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if not 2 <= n <= MAX_HEADER_BYTES:
            raise ValueError(f"header length {n} is not plausible")
        body = f.read(n)
    if len(body) != n:
        raise ValueError("header cut short")
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a mapping")
    end = 0
    for name, info in header.items():
        if name != "__metadata__":
            end = max(end, int(info["data_offsets"][1]))
    meta = header.get("__metadata__") or {}
    return meta, 8 + n + end


@dataclass
class _File:
    path: Path
    nbytes: int
    tokens: np.ndarray  # int64: 8 bytes a token, where a trie would spend a dict a token


class DiskTier:
    """Entries of one model under `root/identity`; `root` as a whole bounded by `max_bytes`."""

    def __init__(self, root: Path, identity: str, max_bytes: int) -> None:
        self.root = root
        self.identity = identity
        self.max_bytes = max_bytes
        self.dir = root / identity
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, _File] = {}  # by file name
        self.nbytes = 0  # this model's files
        self.written_bytes = 0  # since load, and the seconds those writes took
        self.write_seconds = 0.0
        self._scan()

    @property
    def entries(self) -> int:
        return len(self._files)

    # ------------------------------------------------------------------ the index

    def _scan(self) -> None:
        t0 = time.perf_counter()
        for f in sorted(self.dir.iterdir()):
            if f.name.endswith(SUFFIX) and TMP_MARK not in f.name:
                try:
                    meta, size = _read_header(f)
                    tokens = self._check_meta(meta)
                    if f.stat().st_size != size:
                        raise ValueError(f"{f.stat().st_size} bytes, the header says {size}")
                except (OSError, ValueError, KeyError, TypeError) as e:
                    self._discard(f, str(e))
                    continue
                self._add(_File(f, size, np.asarray(tokens, dtype=np.int64)))
        log.info("[prompt-cache] disk tier %s: %d entries, %.1f MiB (indexed in %.0f ms)",
                 self.dir, self.entries, self.nbytes / 2**20, (time.perf_counter() - t0) * 1e3)

    def _check_meta(self, meta: dict[str, str]) -> list[int]:
        """The entry's tokens, from metadata save_prompt_cache wrote as `0.KEY`."""
        if meta.get("0.format") != FORMAT or meta.get("0.identity") != self.identity:
            raise ValueError("written by another model or format (stale)")
        tokens = [int(t) for t in meta["0.tokens"].split(",")]
        if not tokens or meta.get("0.checksum") is None:
            raise ValueError("no tokens or checksum")
        return tokens

    def _add(self, entry: _File) -> None:
        self._files[entry.path.name] = entry
        self.nbytes += entry.nbytes

    def _forget(self, name: str) -> None:
        entry = self._files.pop(name, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def _discard(self, path: Path, why: str) -> None:
        log.warning("[prompt-cache] skipping disk entry %s: %s (removed)", path, why)
        self._forget(path.name)
        try:
            path.unlink()
        except OSError:
            pass

    # ------------------------------------------------------------------ lookup

    def usable(self, tokens: list[int]) -> tuple[_File | None, int]:
        """The file whose entry covers the longest prefix of `tokens`, and that prefix's
        length (at most len(tokens) - 1: one token is always left to prefill). A scan of
        every entry in numpy: microseconds an entry."""
        best: tuple[_File | None, int] = (None, 0)
        if not self._files or len(tokens) < 2:
            return best
        q = np.asarray(tokens, dtype=np.int64)
        for entry in self._files.values():
            m = min(len(entry.tokens), len(q))
            same = entry.tokens[:m] == q[:m]
            n = min(m if same.all() else int(np.argmin(same)), len(q) - 1)
            if n > best[1] or (n == best[1] and best[0] is not None
                               and entry.nbytes < best[0].nbytes):
                best = (entry, n)
        return best if best[1] > 0 else (None, 0)

    def load(self, tokens: list[int], better_than: int) -> tuple[list[Any] | None, int]:
        """(a KV cache holding tokens[:n], n) from the best file, if n > better_than; else
        (None, 0). A file that fails any check is skipped and removed."""
        entry, n = self.usable(tokens)
        if entry is None or n <= better_than:
            return None, 0
        t0 = time.perf_counter()
        try:
            if entry.path.stat().st_size != entry.nbytes:
                raise ValueError("its size changed since it was indexed")
            cache, meta = load_prompt_cache(str(entry.path), return_metadata=True)
            cache = [as_batchable(c) for c in cache]
            if meta.get("checksum") != _checksum(cache):
                raise ValueError("checksum mismatch (damaged data)")
            if any(getattr(c, "offset", len(entry.tokens)) != len(entry.tokens) for c in cache):
                raise ValueError("its KV length disagrees with its tokens")
            if len(entry.tokens) > n:
                if not can_trim_prompt_cache(cache):
                    return None, 0
                trim_prompt_cache(cache, len(entry.tokens) - n)
        except FileNotFoundError:  # removed meanwhile (another worker's budget)
            self._forget(entry.path.name)
            return None, 0
        except Exception as e:  # whatever a damaged file makes the loader raise
            self._discard(entry.path, f"{type(e).__name__}: {e}")
            return None, 0
        _touch(entry.path)
        log.info("[prompt-cache] disk hit: %d tokens from %s (%.1f MiB in %.1f ms)", n,
                 entry.path.name, entry.nbytes / 2**20, (time.perf_counter() - t0) * 1e3)
        return cache, n

    # ------------------------------------------------------------------ writing

    def save(self, tokens: list[int], cache: list[Any], mtime_ns: int | None = None) -> int:
        """Write the entry holding exactly `tokens` (unless already there); returns the bytes
        written. Makes room first, so ROOT never holds more than max_bytes."""
        name = hashlib.blake2b(struct.pack(f"<{len(tokens)}q", *tokens),
                               digest_size=16).hexdigest() + SUFFIX
        path = self.dir / name
        if name in self._files:
            _touch(path, mtime_ns)
            return 0
        text = ",".join(map(str, tokens))
        estimate = sum(c.nbytes for c in cache) + len(text) + HEADER_SLACK_BYTES
        if estimate > self.max_bytes:
            log.info("[prompt-cache] not writing a %.1f MiB entry: over disk_max_bytes",
                     estimate / 2**20)
            return 0
        self._make_room(estimate)
        t0 = time.perf_counter()
        tmp = self.dir / f"{name[:-len(SUFFIX)]}{TMP_MARK}{os.getpid()}{SUFFIX}"
        try:
            save_prompt_cache(str(tmp), [as_saveable(c) for c in cache], {
                              "format": FORMAT, "identity": self.identity,
                                                "tokens": text, "checksum": _checksum(cache)})
            os.replace(tmp, path)
            size = path.stat().st_size
        except OSError as e:  # a full or read-only disk: the entry is only lost
            log.warning("[prompt-cache] could not write %s: %s", path, e)
            tmp.unlink(missing_ok=True)
            return 0
        _touch(path, mtime_ns)
        self.write_seconds += time.perf_counter() - t0
        self.written_bytes += size
        new = np.asarray(tokens, dtype=np.int64)
        if can_trim_prompt_cache(cache):  # a longer trimmable entry makes its prefixes moot
            for old in [e for e in self._files.values() if len(e.tokens) < len(new)
                        and (e.tokens == new[:len(e.tokens)]).all()]:
                self._forget(old.path.name)
                old.path.unlink(missing_ok=True)
        self._add(_File(path, size, new))
        return size

    def _make_room(self, incoming: int) -> None:
        """Delete the oldest files under ROOT (any model's) until `incoming` more bytes fit."""
        now = time.time()
        files = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if TMP_MARK in f.name and now - st.st_mtime > STALE_TMP_S:
                    f.unlink(missing_ok=True)  # a crashed write's leftover
                    continue
                if f.name.endswith(SUFFIX):
                    files.append((st.st_mtime_ns, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files, key=lambda x: x[0]):
            if total + incoming <= self.max_bytes:
                break
            if TMP_MARK in f.name:
                continue  # another worker's write in progress
            if f.parent == self.dir and f.name in self._files:
                entry = self._files[f.name]
                self._forget(f.name)
                entry.path.unlink(missing_ok=True)
            else:
                f.unlink(missing_ok=True)
            total -= size


def _touch(path: Path, mtime_ns: int | None = None) -> None:
    """Mark a file as recently used: the budget removes the oldest mtimes first."""
    try:
        if mtime_ns is None:
            os.utime(path)
        else:
            os.utime(path, ns=(mtime_ns, mtime_ns))
    except OSError:
        pass


def open_disk_tier(root: str, model_path: str, dtype: str, max_bytes: int,
                   name: str) -> DiskTier | None:
    """The disk tier for this model under `root`, or None (with a log line) when its files
    cannot be identified or `root` cannot be written: the cache then stays in memory."""
    identity = model_identity(model_path, dtype)
    if identity is None:
        log.warning("[worker:%s] prompt cache disk tier off: cannot identify %s", name,
                    model_path)
        return None
    try:
        return DiskTier(Path(root).expanduser(), identity, max_bytes)
    except OSError as e:
        log.warning("[worker:%s] prompt cache disk tier off: %s", name, e)
        return None
