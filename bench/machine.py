"""What a benchmark ran on: the machine (CPU, GPU, RAM, Python) and the checkout's revision."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

__all__ = ["machine", "revision"]


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").open()
                if line.startswith("model name")), platform.processor())
    gpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "gpu": gpu,
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def revision() -> str:
    """The checkout measured: `git describe --always --dirty`, or "unknown". A copy without
    its .git (the GPU machine's) names it in MLX_GW_REVISION."""
    if os.environ.get("MLX_GW_REVISION"):
        return os.environ["MLX_GW_REVISION"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
