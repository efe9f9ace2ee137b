"""Fast BLAS for worker processes on Linux CPU: which library to preload, and whether it took.

The ``mlx[cpu]`` wheel links a reference BLAS (``mlx_cpu.libs/libblas-*.so``) that is ~50x
slower than OpenBLAS on a 1024x1024 float32 matmul. Preloading an OpenBLAS that exports the
plain ``cblas_sgemm``/``sgemm_`` symbols makes MLX's calls bind to it instead. The gateway
spawns the workers, so it owns their environment: ``fast_blas_env`` returns the variables to
add, and ``blas_in_use`` reads a live worker's memory map to log (and test) what it got.

The pip-installed ``cmeel-openblas`` needs ``libgfortran.so.5``, which a fresh Debian or Ubuntu
machine does not have: there the library failed its test load and workers silently ran on the
reference BLAS (a 1,000-token prompt took 135-202 s to its first token instead of 6-9 s).
numpy's wheel bundles a libgfortran (``numpy.libs/libgfortran-*.so.5*``): ``gfortran_dir``
links it as ``libgfortran.so.5`` in a private directory that goes on the workers'
LD_LIBRARY_PATH, so the preload works with no system package and no root.

``MLX_GW_BLAS`` steers the choice: unset, empty or ``auto`` searches; ``off`` disables the
preload; anything else is the path of the library to preload. Nothing is preloaded outside
Linux (on macOS MLX uses Metal and Accelerate).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from mlx_gw.gateway.supervision.worker_process import signal_name

log = logging.getLogger("mlxgw.supervisor")

__all__ = [
    "BLAS_ENV_VAR",
    "REFERENCE",
    "worker_blas",
    "BlasConfigError",
    "blas_in_use",
    "fast_blas_env",
    "find_fast_blas",
]

BLAS_ENV_VAR = "MLX_GW_BLAS"

# Debian/Ubuntu (packages libopenblas0-pthread, -openmp, -serial), in order of preference:
# the pthread flavour parallelises without dragging an OpenMP runtime into the worker.
_DEBIAN_FLAVOURS = ("openblas-pthread", "openblas-openmp", "openblas-serial")
_MULTIARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu")
SYSTEM_OPENBLAS_PATHS = tuple(
    f"{arch}/{flavour}/libblas.so.3" for flavour in _DEBIAN_FLAVOURS for arch in _MULTIARCH_DIRS
)

# PyPI distributions shipping an OpenBLAS with unprefixed symbols, and the file to preload.
# (numpy's and scipy-openblas's builds prefix their symbols, so they cannot stand in.)
_PIP_OPENBLAS = (("cmeel-openblas", "libopenblas.so.0"),)

# A broken preload (say, a missing libgfortran.so.5) stops the worker before Python starts,
# and a build whose kernels this CPU lacks kills it with SIGILL at its first matmul
# (cmeel-openblas 0.3.31's small-matrix sgemm uses AVX-512 unconditionally: seen on an AMD
# EPYC with AVX2 only). So every discovered candidate is loaded in a throwaway interpreter
# first, and multiplies matrices of a small-kernel size and of blocked sizes.
LOAD_CHECK_TIMEOUT_S = 30.0
_LOAD_CHECK = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
for n in (4, 64, 256):
    a = (ctypes.c_float * (n * n))(*([1.0] * (n * n)))
    c = (ctypes.c_float * (n * n))()
    lib.cblas_sgemm(101, 111, 111, n, n, n, one, a, n, a, n, zero, c, n)  # row-major, no trans
    if c[0] != n or c[n * n - 1] != n:
        sys.exit(f"cblas_sgemm of {n}x{n} ones gave {c[0]}, not {n}")
"""


class BlasConfigError(ValueError):
    """``MLX_GW_BLAS`` names a library that does not exist."""


def _is_linux() -> bool:
    return sys.platform.startswith("linux")


@functools.cache
def _loads(path: str, lib_dir: str | None = None) -> bool:
    """Whether ``path`` and its dependencies load (with ``lib_dir`` on LD_LIBRARY_PATH) and
    its ``cblas_sgemm`` computes; runs once per path per process. A failure is logged with
    its reason."""
    env = dict(os.environ)
    if lib_dir:
        env["LD_LIBRARY_PATH"] = _prepend(lib_dir, env.get("LD_LIBRARY_PATH", ""))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_CHECK, path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=LOAD_CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("[blas] %s does not load: %s", path, e)
        return False
    if done.returncode < 0:
        log.warning("[blas] %s is not used: its sgemm was killed by %s on this CPU", path,
                    signal_name(-done.returncode))
    elif done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        log.warning("[blas] %s does not load: %s", path, reason)
    return done.returncode == 0


def _prepend(entry: str, path_list: str) -> str:
    parts = [p for p in path_list.split(":") if p]
    return ":".join([entry, *(p for p in parts if p != entry)])


@functools.cache
def gfortran_dir() -> str | None:
    """A directory holding ``libgfortran.so.5`` (numpy's bundled copy, and the libraries it
    links by $ORIGIN), for the workers' LD_LIBRARY_PATH; None when numpy bundles none."""
    try:
        dist = importlib.metadata.distribution("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None
    libs = [Path(str(dist.locate_file(f))) for f in dist.files or ()
            if f.parent.name == "numpy.libs"]
    fortran = next((f for f in libs if f.name.startswith("libgfortran")), None)
    if fortran is None:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(fortran.resolve()).encode()).hexdigest()[:12]
    target = cache / "mlx-gw" / f"gfortran-{digest}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        links = {f.name: f for f in libs} | {"libgfortran.so.5": fortran}
        for name, src in links.items():
            link = target / name
            if not link.is_symlink() or link.resolve() != src.resolve():
                link.unlink(missing_ok=True)
                link.symlink_to(src.resolve())
    except OSError as e:
        log.warning("[blas] cannot link numpy's libgfortran into %s: %s", target, e)
        return None
    return str(target)


def _pip_openblas_paths() -> list[str]:
    """Library paths from installed pip distributions in ``_PIP_OPENBLAS`` (none imported).
    They need libgfortran.so.5: `gfortran_dir` supplies it."""
    paths = []
    for dist_name, file_name in _PIP_OPENBLAS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for entry in dist.files or ():
            if entry.name == file_name:
                paths.append(str(Path(str(dist.locate_file(entry))).resolve()))
    return paths


def find_fast_blas(env: Mapping[str, str] | None = None) -> str | None:
    """Path of the BLAS library to preload into workers, or None for none.

    ``env`` (default ``os.environ``) supplies ``MLX_GW_BLAS``. Search order: the path that
    variable names; a pip-installed ``cmeel-openblas``; Debian/Ubuntu OpenBLAS (pthread,
    openmp, serial; x86_64 and aarch64). Found libraries are test-loaded in a subprocess (cached,
    ~50 ms once) and skipped if they fail. Raises ``BlasConfigError`` if ``MLX_GW_BLAS`` names
    a file that does not exist. Always None outside Linux.
    """
    env = os.environ if env is None else env
    if not _is_linux():
        return None
    setting = env.get(BLAS_ENV_VAR, "").strip()
    if setting.lower() == "off":
        return None
    if setting and setting.lower() != "auto":
        if not Path(setting).is_file():
            raise BlasConfigError(
                f"{BLAS_ENV_VAR}={setting!r}: no such file; set it to the path of an OpenBLAS "
                f"shared library, 'auto' to search, or 'off' to preload nothing"
            )
        return setting
    # The pip wheel (0.3.31) measured 1.5-1.9x faster than Debian 12's 0.3.21: try it first.
    for path in _pip_openblas_paths():
        if Path(path).is_file() and _loads(path, gfortran_dir()):
            return path
    for path in SYSTEM_OPENBLAS_PATHS:
        if Path(path).is_file() and _loads(path):
            return path
    return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fast_blas_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Env additions for a worker process: LD_PRELOAD of a fast BLAS on Linux when found, else {}.

    ``base`` (default ``os.environ``) is the environment the worker would otherwise get; the
    caller merges the result over it. Never on macOS (Metal/Accelerate) and never when
    ``MLX_GW_BLAS=off``; ``MLX_GW_BLAS=/path/lib.so`` forces a library. Keeps any existing
    LD_PRELOAD entries (ahead of ours, so a library the user chose still wins). Also sets
    OPENBLAS_NUM_THREADS to the CPU count if unset. Raises ``BlasConfigError`` as
    ``find_fast_blas`` does.
    """
    base = os.environ if base is None else base
    lib = find_fast_blas(base)
    if lib is None:
        return {}
    existing = base.get("LD_PRELOAD", "").replace(":", " ").split()
    additions = {"LD_PRELOAD": " ".join(existing if lib in existing else [*existing, lib])}
    fortran = gfortran_dir() if lib in _pip_openblas_paths() else None
    if fortran is not None:
        additions["LD_LIBRARY_PATH"] = _prepend(fortran, base.get("LD_LIBRARY_PATH", ""))
    if not base.get("OPENBLAS_NUM_THREADS"):
        additions["OPENBLAS_NUM_THREADS"] = str(_cpu_count())
    return additions


def blas_in_use(pid: int) -> str | None:
    """Path of an OpenBLAS library mapped into process ``pid``, or None.

    None too when the process is gone, its map is unreadable, or this is not Linux. Matches on
    the file name, so MLX's bundled reference ``libblas`` and numpy's prefixed-symbol
    ``libscipy_openblas`` never count.
    """
    if not _is_linux():
        return None
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        path = fields[5].strip().removesuffix(" (deleted)")
        name = Path(path).name.lower()
        # numpy/scipy bundle an OpenBLAS with prefixed symbols (libscipy_openblas*): mapped
        # into a worker that imports numpy, but it can never serve MLX's BLAS calls.
        if "openblas" in name and "scipy_openblas" not in name:
            return path
    return None


REFERENCE = "reference"  # MLX's bundled reference BLAS: correct, ~25x slower on prompts
REFERENCE_HINT = (
    "Install a fast BLAS the gateway can preload: `apt-get install libopenblas0-pthread` "
    "(Debian/Ubuntu), or `apt-get install libgfortran5` for the pip-installed cmeel-openblas; "
    f"or point {BLAS_ENV_VAR} at an OpenBLAS library.")


def warn_if_none(additions: Mapping[str, str], env: Mapping[str, str] | None = None) -> None:
    """Say loudly, once at start-up, that CPU workers will run on the reference BLAS."""
    env = os.environ if env is None else env
    if (_is_linux() and "LD_PRELOAD" not in additions
            and env.get(BLAS_ENV_VAR, "").strip().lower() != "off"):
        log.warning("[blas] no fast BLAS found: CPU workers will use MLX's reference BLAS and "
                    "run prompts ~25x slower. %s", REFERENCE_HINT)


def worker_blas(pid: int, device: str) -> str | None:
    """What a ready worker computes its CPU matmuls with: the OpenBLAS path it mapped,
    REFERENCE when it mapped none, None when that does not apply (not Linux, or the worker
    runs on a GPU)."""
    if not _is_linux() or "cpu" not in device.lower():
        return None
    return blas_in_use(pid) or REFERENCE
