"""Models on disk, read without MLX: the Hugging Face cache, a model's files and metadata, pulls.

Owns `describe` (files, sizes, kind, architecture, quantization, context length from a model
dir's config.json or a .gguf header), `cached_repos` (the HF cache scan), `pull` (a repo into
the HF cache through huggingface_hub, reporting byte progress) and `delete_repo`. Everything
here blocks on disk or network: the gateway calls it in a thread. huggingface_hub is imported
lazily (it reads HF_ENDPOINT and HF_HOME at import) and never brings MLX in.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_gw.formats.gguf_header import GGUFHeaderError, read_header

PROGRESS_INTERVAL_S = 0.1  # at most this often a byte-progress report, per pull
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                 "max_sequence_length")
# llama.cpp's general.file_type (enum llama_ftype) -> name.
_GGUF_FTYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
                10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
                15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


class PullCancelled(Exception):
    pass


# ---------------------------------------------------------------- reading a model


def local_path(path: str) -> tuple[Path | None, str | None]:
    """A model's files on disk: (local path or None, repo id when `path` is a repo id)."""
    p = Path(path).expanduser()
    if p.exists():
        return p, None
    if not is_repo_id(path):
        return None, None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True)), path
    except Exception:  # not in the cache (or an incomplete snapshot)
        return None, path


def is_repo_id(name: str) -> bool:
    """Whether `name` is a valid Hugging Face model repo id `org/name` (huggingface_hub's
    own rule: no `..`, no `--`, word characters, `-` and `.` only), so no path traversal."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def describe(p: Path) -> dict[str, Any]:
    """Files, sizes and what the model is, from its directory or .gguf file."""
    if p.is_file():
        files = [{"name": p.name, "size": p.stat().st_size}]
        info = _describe_gguf(p) if p.suffix.lower() == ".gguf" else {}
    else:
        files = sorted(({"name": str(f.relative_to(p)), "size": f.stat().st_size}
                        for f in p.rglob("*") if f.is_file()), key=lambda f: f["name"])
        info = _describe_dir(p)
    return {**info, "files": files, "size_bytes": sum(f["size"] for f in files)}


def _describe_dir(p: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    archs = cfg.get("architectures") or []
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(quant, dict):
        quant = {k: quant[k] for k in ("bits", "group_size", "mode", "quant_method")
                 if k in quant} or quant
    ctx = next((src[k] for src in (cfg, text) for k in _CONTEXT_KEYS
                if isinstance(src.get(k), int)), None)
    gguf = next(iter(sorted(p.glob("*.gguf"))), None)
    if not cfg and gguf is not None:
        return _describe_gguf(gguf)
    return {"format": "mlx" if any(p.glob("*.safetensors")) else "unknown",
            "kind": guess_kind(p, cfg), "architecture": archs[0] if archs else None,
            "model_type": cfg.get("model_type"), "quantization": quant or None,
            "dtype": cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype"),
            "context_length": ctx, "config": cfg or None}


def guess_kind(p: Path, cfg: dict[str, Any]) -> str:
    archs = " ".join(cfg.get("architectures") or []).lower()
    model_type = str(cfg.get("model_type", "")).lower()
    if "whisper" in archs or "whisper" in model_type:
        return "stt"
    if (p / "modules.json").exists() or archs.endswith("model") and "causallm" not in archs:
        return "embedding"
    if "vision_config" in cfg:
        return "vlm"
    return "llm"


def _describe_gguf(path: Path) -> dict[str, Any]:
    try:
        meta = read_header(path).metadata
    except (OSError, GGUFHeaderError) as e:
        return {"format": "gguf", "kind": "llm", "error": f"unreadable GGUF header: {e}"}
    arch = meta.get("general.architecture")
    ftype = meta.get("general.file_type")
    return {"format": "gguf", "kind": "llm", "architecture": arch, "model_type": arch,
            "quantization": _GGUF_FTYPES.get(ftype, f"type {ftype}") if ftype is not None
            else None, "dtype": None, "context_length": meta.get(f"{arch}.context_length"),
            "config": {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}}


def parameter_count(p: Path) -> int | None:
    """Parameters in a model dir's safetensors, from their headers alone (quantized weights
    counted unpacked: a U32 tensor beside `.scales` holds 32/bits values per element)."""
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return None
    try:
        bits = (json.loads((p / "config.json").read_text()).get("quantization") or {}).get("bits")
    except (OSError, ValueError, AttributeError):
        bits = None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (OSError, ValueError):
            return None
        for name, t in header.items():
            if name == "__metadata__" or name.endswith((".scales", ".biases")):
                continue
            n = 1
            for dim in t.get("shape", []):
                n *= dim
            if bits and t.get("dtype") == "U32" and name[:-7] + ".scales" in header:
                n = n * 32 // bits
            total += n
    return total


def chat_template(p: Path) -> str | None:
    """The model's chat template (chat_template.jinja or tokenizer_config.json), if any."""
    if not p.is_dir():
        return None
    jinja = p / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(errors="replace")
    try:
        value = json.loads((p / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(value, list):  # named templates: the default one
        value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def summary(path: str) -> dict[str, Any]:
    """`describe` plus what Ollama's listings show: local path, mtime, parameter count and
    chat template; for a model not on disk, only size 0."""
    local, _ = local_path(path)
    if local is None:
        return {"size_bytes": 0, "path": path, "mtime": 0.0}
    info = describe(local)
    info.pop("config", None)
    return {**info, "path": str(local), "mtime": local.stat().st_mtime,
            "parameter_count": parameter_count(local), "template": chat_template(local)}


# ---------------------------------------------------------------- the Hugging Face cache


def cached_repos() -> list[dict[str, Any]]:
    """Model repos in the local Hugging Face cache, largest first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    rows = []
    for r in info.repos:
        if r.repo_type != "model":
            continue
        revs = sorted(r.revisions, key=lambda v: v.last_modified, reverse=True)
        rows.append({"repo": r.repo_id, "size_bytes": r.size_on_disk, "files": r.nb_files,
                     "last_modified": r.last_modified, "path": str(r.repo_path),
                     "revisions": [{"commit": v.commit_hash, "refs": sorted(v.refs),
                                    "path": str(v.snapshot_path)} for v in revs]})
    rows.sort(key=lambda r: -r["size_bytes"])
    return rows


class OutsideCache(Exception):
    """A cached repo's folder is a symlink, or resolves outside the cache: not deleted."""


def delete_repo(repo: str) -> int | None:
    """Remove a repo's files from the cache. Returns the bytes freed, None if not cached.
    Raises OutsideCache rather than follow a symlink out of the cache directory."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE).resolve()
    for r in cached_repos():
        if r["repo"] == repo:
            path = Path(r["path"])
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                raise OutsideCache(f"{path} is a link out of the cache ({root}); remove it by "
                                   "hand if you mean to")
            shutil.rmtree(path)
            return r["size_bytes"]
    return None


class HubUnreachable(Exception):
    pass


def manifest(repo: str, revision: str | None) -> dict[str, Any]:
    """The repo's commit and files with sizes. Raises RepositoryNotFoundError,
    RevisionNotFoundError, HubUnreachable."""
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except (httpx.ConnectError, httpx.TimeoutException, OfflineModeIsEnabled) as e:
        raise HubUnreachable(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT}: "
                             f"{e}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is None or status >= 500:
            raise HubUnreachable(f"the Hugging Face Hub at {constants.ENDPOINT} answered: "
                                 f"{e}") from None
        raise
    files = [{"name": s.rfilename,
              "size": (s.lfs.size if s.lfs is not None else s.size) or 0}
             for s in info.siblings or []]
    return {"repo": repo, "ref": revision or "main", "revision": info.sha, "files": files,
            "total": sum(f["size"] for f in files)}


def pull(
    man: dict[str, Any],
    report: Callable[[dict[str, Any]], None],
    cancelled: threading.Event,
) -> str:
    """Download every file of `man` (from `manifest`) into the cache, calling `report` with
    byte progress (at most every PROGRESS_INTERVAL_S, and after each file). Blocks; raises
    PullCancelled once `cancelled` is set, OSError when a write fails (a full disk). Returns
    the snapshot's path. A pull that fails leaves no partial file: the repo's folder goes
    if the pull made it, its unfinished downloads otherwise."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    name = repo_folder_name(repo_id=man["repo"], repo_type="model")
    folder = Path(constants.HF_HUB_CACHE) / name
    existed = folder.exists()
    try:
        return _download(man, report, cancelled)
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(Path(constants.HF_HUB_CACHE) / ".locks" / name, ignore_errors=True)
        else:
            for partial in folder.glob("blobs/*.incomplete"):
                partial.unlink(missing_ok=True)
        raise


def _download(man: dict[str, Any], report: Callable[[dict[str, Any]], None],
              cancelled: threading.Event) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    done = 0  # bytes of finished files
    total = man["total"]
    state = {"file_bytes": 0, "last": 0.0}

    def progress(file: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - state["last"] >= PROGRESS_INTERVAL_S:
            state["last"] = now
            report({"status": "downloading", "file": file,
                    "completed": min(total, done + state["file_bytes"]), "total": total})

    for f in man["files"]:
        name = f["name"]
        state["file_bytes"] = 0

        class _Bar:
            """What huggingface_hub drives as a progress bar; counts this file's bytes."""

            def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
                state["file_bytes"] = initial or 0

            def __enter__(self) -> _Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def update(self, n: float | None = 1, _name: str = name) -> None:
                if cancelled.is_set():
                    raise PullCancelled("the pull was cancelled")
                state["file_bytes"] += int(n or 0)
                progress(_name)

            def __getattr__(self, attr: str) -> Callable[..., None]:
                return lambda *a, **k: None  # refresh, close, set_postfix_str, ...

        if cancelled.is_set():
            raise PullCancelled("the pull was cancelled")
        hf_hub_download(man["repo"], name, revision=man["revision"], tqdm_class=_Bar)
        done += f["size"]
        state["file_bytes"] = 0
        progress(name, force=True)
    # Everything is cached now: this only records the ref and the file listing, so the
    # snapshot resolves offline (local_files_only) by repo id.
    return snapshot_download(man["repo"], revision=man["ref"])
