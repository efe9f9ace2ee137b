"""The benchmark harness starting its targets (bench/targets.py): a target that dies or finds
its port taken fails the start at once, not after START_TIMEOUT_S (issue 20: a server whose
port was taken kept the harness waiting 300 s). Real child processes."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from bench import targets as T


async def _start(argv, log: Path) -> None:
    async with T.server("t", argv, "/health", log, {}, lambda m: m, {}):
        raise AssertionError("the server never serves")


def test_a_target_that_exits_fails_at_once(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 3"):
        asyncio.run(_start(lambda port: [sys.executable, "-c", "import sys; sys.exit(3)"],
                           tmp_path / "exit.log"))
    assert time.monotonic() - t0 < 10


def test_a_taken_port_is_retried_on_another_then_reported(tmp_path: Path) -> None:
    ports: list[int] = []

    def argv(port: int) -> list[str]:
        ports.append(port)
        return [sys.executable, "-c", "import time; print('OSError: [Errno 98] Address "
                "already in use', flush=True); time.sleep(60)"]

    t0 = time.monotonic()
    with pytest.raises(T.PortTaken):
        asyncio.run(_start(argv, tmp_path / "taken.log"))
    assert time.monotonic() - t0 < 20
    assert len(ports) == T.START_ATTEMPTS and len(set(ports)) == T.START_ATTEMPTS
