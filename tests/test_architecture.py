"""The shape of the tree, checked: import layers (import-linter), one namespace in
site-packages, every package listed for the wheel, and no module past ~400 lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MAX_MODULE_LINES = 420  # "~400": a module past this is doing two things


def test_import_layers_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]'")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_only_the_mlx_gw_namespace_is_installed(tmp_path: Path) -> None:
    """Outside the repo, `import config` (or worker, gateway) does not resolve to us."""
    code = ("import importlib.util as u, sys; "
            "ours = [n for n in ('config', 'worker', 'gateway') if u.find_spec(n)]; "
            "assert not ours, ours; "
            "import mlx_gw.config, mlx_gw.worker.protocol, mlx_gw.gateway.app; "
            "print(mlx_gw.config.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent == ROOT / "config"


def test_every_package_is_in_the_wheel_list() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {"mlx_gw." + ".".join(init.parent.relative_to(ROOT).parts)
             for top in ("gateway", "worker", "config", "formats")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found == listed


def test_no_module_is_too_long() -> None:
    long = {str(f.relative_to(ROOT)): n for top in ("gateway", "worker", "config", "formats")
            for f in (ROOT / top).rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
