"""In-process benchmarks run under the BLAS the gateway gives its workers."""

from __future__ import annotations

import os
import subprocess
import sys


def run_as_worker(module: str) -> None:
    """Re-execute `python -m module` (same arguments) with the library the gateway preloads
    into its workers, and exit with its status; returns at once when that is already in
    place, or when there is none (or MLX_GW_BLAS=off)."""
    if "LD_PRELOAD" in os.environ or os.environ.get("MLX_GW_BLAS") == "off":
        return
    from mlx_gw.gateway.supervision.blas import fast_blas_env

    env = {**os.environ, **fast_blas_env()}
    if "LD_PRELOAD" in env:
        sys.exit(subprocess.call([sys.executable, "-m", module, *sys.argv[1:]], env=env))
