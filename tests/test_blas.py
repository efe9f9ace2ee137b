"""The fast-BLAS preload: what ``fast_blas_env`` returns and that a real worker-like process
started with it maps OpenBLAS."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_gw.gateway.supervision import blas
from mlx_gw.gateway.supervision.blas import (
    BLAS_ENV_VAR,
    BlasConfigError,
    blas_in_use,
    fast_blas_env,
    find_fast_blas,
)
from tests.conftest import tiny_config

READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 10.0

# Imports MLX, runs a float32 matmul, reports, then stays alive until stdin closes so the test
# can read its memory map.
CHILD = """
import sys
import numpy  # as in a real worker (mlx-lm imports it): numpy maps its own prefixed OpenBLAS
import mlx.core as mx
a = mx.random.normal((256, 256))
mx.eval(a @ a)
print("ready", flush=True)
sys.stdin.read()
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", BLAS_ENV_VAR)}
    env.update(extra)
    return env


@contextmanager
def mlx_child(env: Mapping[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A live Python process that has imported MLX and run a matmul under ``env``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=dict(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = bool(sel.select(timeout=READY_TIMEOUT_S))
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            proc.kill()
            _, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
            pytest.fail(f"child not ready (rc={proc.returncode}): {err[-2000:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=EXIT_TIMEOUT_S)


@pytest.fixture
def fast_lib() -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("the BLAS preload is Linux-only")
    lib = find_fast_blas(clean_env())
    if lib is None:
        pytest.skip("no OpenBLAS found (apt install libopenblas0-pthread, or cmeel-openblas)")
    return lib


def test_worker_process_maps_openblas(fast_lib: str) -> None:
    additions = fast_blas_env(clean_env())
    assert additions["LD_PRELOAD"] == fast_lib
    with mlx_child(clean_env(**additions)) as proc:
        in_use = blas_in_use(proc.pid)
    assert in_use is not None and "openblas" in Path(in_use).name.lower(), in_use


@linux_only
def test_off_preloads_nothing() -> None:
    assert find_fast_blas(clean_env(**{BLAS_ENV_VAR: "off"})) is None
    assert fast_blas_env(clean_env(**{BLAS_ENV_VAR: "OFF"})) == {}
    with mlx_child(clean_env(**{BLAS_ENV_VAR: "off"})) as proc:
        # mlx[cpu] bundles a reference libblas and numpy a prefixed-symbol OpenBLAS; neither
        # must be mistaken for the preloaded OpenBLAS.
        assert blas_in_use(proc.pid) is None


@linux_only
def test_existing_preload_is_kept(tmp_path: Path) -> None:
    lib = tmp_path / "libforced.so"
    lib.write_bytes(b"")
    other = "/opt/x/libjemalloc.so.2"
    base = clean_env(**{BLAS_ENV_VAR: str(lib), "LD_PRELOAD": f"{other}:/opt/y/libz.so"})
    assert fast_blas_env(base)["LD_PRELOAD"] == f"{other} /opt/y/libz.so {lib}"
    # Already listed: not added twice.
    base["LD_PRELOAD"] = f"{lib} {other}"
    assert fast_blas_env(base)["LD_PRELOAD"] == f"{lib} {other}"


@linux_only
def test_existing_preload_kept_with_discovered_lib(fast_lib: str) -> None:
    additions = fast_blas_env(clean_env(LD_PRELOAD="/opt/x/libfoo.so"))
    assert additions["LD_PRELOAD"] == f"/opt/x/libfoo.so {fast_lib}"


@linux_only
def test_forced_path_and_threads(tmp_path: Path) -> None:
    lib = tmp_path / "libforced.so"
    lib.write_bytes(b"")
    additions = fast_blas_env(clean_env(**{BLAS_ENV_VAR: str(lib)}, OPENBLAS_NUM_THREADS=""))
    assert additions["LD_PRELOAD"] == str(lib)
    assert int(additions["OPENBLAS_NUM_THREADS"]) >= 1
    kept = fast_blas_env(clean_env(**{BLAS_ENV_VAR: str(lib)}, OPENBLAS_NUM_THREADS="3"))
    assert "OPENBLAS_NUM_THREADS" not in kept


@linux_only
def test_forced_missing_path_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(BlasConfigError, match=BLAS_ENV_VAR):
        fast_blas_env(clean_env(**{BLAS_ENV_VAR: str(tmp_path / "missing.so")}))


def test_never_on_macos(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(blas.sys, "platform", "darwin")
    lib = tmp_path / "libforced.so"
    lib.write_bytes(b"")
    assert fast_blas_env(clean_env(**{BLAS_ENV_VAR: str(lib)})) == {}
    assert fast_blas_env(clean_env()) == {}
    assert blas_in_use(os.getpid()) is None


@linux_only
def test_blas_in_use_of_missing_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=EXIT_TIMEOUT_S)
    assert blas_in_use(proc.pid) is None


def test_pip_openblas_needs_no_system_gfortran(fast_lib: str) -> None:
    """cmeel-openblas needs libgfortran.so.5, absent on a fresh Debian machine: the workers
    get numpy's bundled copy through LD_LIBRARY_PATH, never the system's."""
    if fast_lib not in blas._pip_openblas_paths():
        pytest.skip("the BLAS found is not the pip-installed cmeel-openblas")
    additions = fast_blas_env(clean_env())
    with mlx_child(clean_env(**additions)) as proc:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    fortran = {line.split()[-1] for line in maps.splitlines() if "libgfortran" in line}
    # (mlx_cpu.libs maps its own renamed copy for the reference BLAS it bundles.)
    assert any("/numpy.libs/" in f for f in fortran), fortran
    assert not any(f.startswith(("/usr/", "/lib")) for f in fortran), fortran


def _worker_blas(gw: Any) -> str | None:
    r = httpx.post(gw.url + "/api/load", json={"model": "tiny-0"}, timeout=120)
    assert r.status_code == 200, r.text
    ps = httpx.get(gw.url + "/api/ps", timeout=10).json()["models"]
    assert ps[0]["blas"] == r.json()["blas"]
    ready = [e for e in httpx.get(gw.url + "/api/events", timeout=10).json()["events"]
             if e["type"] == "ready"]
    assert ready[-1]["blas"] == r.json()["blas"]
    return r.json()["blas"]


@linux_only
def test_each_worker_reports_its_blas(start_gateway: Any, tiny_dir: Path, fast_lib: str) -> None:
    gw = start_gateway(tiny_config(tiny_dir, n=1))
    used = _worker_blas(gw)
    assert used is not None and "openblas" in Path(used).name.lower(), used
    assert "reference BLAS" not in gw.log()


@linux_only
def test_a_worker_on_the_reference_blas_is_loud(start_gateway: Any, tiny_dir: Path) -> None:
    gw = start_gateway(tiny_config(tiny_dir, n=1), env={BLAS_ENV_VAR: "off"})
    assert _worker_blas(gw) == "reference"
    log = gw.log()
    assert "[worker:tiny-0] computes with MLX's reference BLAS" in log, log[-2000:]
    done = subprocess.run([sys.executable, "-m", "mlx_gw.gateway.cli", "ps"],
                          env={**os.environ, "MLX_GW_HOME": str(gw.home)}, capture_output=True,
                          text=True, timeout=60)
    assert "reference" in done.stdout, done.stdout + done.stderr


def _c_library(tmp_path: Path, name: str, body: str) -> str:
    """A real shared library built from `body` (C), for the test-load to judge."""
    if subprocess.run(["which", "cc"], capture_output=True).returncode != 0:
        pytest.skip("no C compiler")
    src, lib = tmp_path / f"{name}.c", tmp_path / f"lib{name}.so"
    src.write_text(body)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return str(lib)


SGEMM = "void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float al, const float *a,"\
        " int lda, const float *b, int ldb, float be, float *c, int ldc) {"


@linux_only
def test_a_blas_whose_sgemm_dies_on_this_cpu_is_not_preloaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fast_lib: str) -> None:
    """cmeel-openblas 0.3.31 runs AVX-512 in its small-matrix sgemm whatever the CPU: on an
    AVX2-only AMD EPYC every worker died of SIGILL at its first matmul. The candidate check
    multiplies matrices, so such a library is skipped (here, one whose sgemm traps)."""
    trap = _c_library(tmp_path, "trap", SGEMM + " __builtin_trap(); }")
    wrong = _c_library(tmp_path, "wrong", SGEMM + " c[0] = 0.0f; }")
    with caplog.at_level("WARNING", logger="mlxgw.supervisor"):
        assert not blas._loads(trap)
        assert not blas._loads(wrong)
    assert f"{trap} is not used: its sgemm was killed by SIGILL" in caplog.text
    assert "gave 0.0, not 4" in caplog.text
    assert blas._loads(fast_lib)  # what the search picked does compute here
