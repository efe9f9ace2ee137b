"""The worker loop's wait for a finished wave's successors (worker/engines/arrivals.py).

A real LLMEngine on the tiny model and a real ZeroMQ PUSH/PULL pair, driven through the loop's
own `_await_arrivals`: after a step that finished a sequence while another still decodes, a
request sent a few ms later is admitted before the next step; the wait ends at once when it
arrives, lasts no longer than its bound when nothing comes, and does not happen after a step
that finished nothing or with MLX_GW_ADMIT_WAIT_MS=0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mlx_gw.worker import loop
from mlx_gw.worker import protocol as p
from mlx_gw.worker.step_log import StepLog

LATE_S = 0.05  # how long after the finishing step the successor is sent


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Any:
    from mlx_gw.worker.engines.llm import LLMEngine

    return LLMEngine.from_load(p.Load(name="t", type="llm", path=str(tiny_dir / "tiny-0"),
                                      max_batch=8))


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    addr = f"ipc://{tmp_path}/in"
    rx.bind(addr)
    tx.connect(addr)
    yield rx, tx
    rx.close(0)
    tx.close(0)
    ctx.term()


def _generate(rid: int, max_tokens: int) -> p.Generate:
    return p.Generate(rid=rid, prompt=[1, 2, 3, 4, 5], max_tokens=max_tokens, temperature=0.0,
                      ignore_eos=True)


def _finish_one(engine: Any, max_wait_s: float, finishing: bool = True) -> None:
    """Leave the engine just after a step in which one sequence finished (or, with
    `finishing` off, none did) while another keeps decoding; the wait's bound is
    `max_wait_s` (the step estimate is made long enough not to shorten it)."""
    from mlx_gw.worker.engines.arrivals import ArrivalWait

    while engine.busy:
        engine.step()
    engine.arrivals = ArrivalWait(max_wait_s)
    engine.submit(_generate(1, 1 if finishing else 40))
    engine.submit(_generate(2, 40))
    while True:
        engine.arrivals.step_s = 100 * max_wait_s
        deltas = engine.step()
        if not finishing or any(d.finish_reason for d in deltas):
            break
    assert engine.in_flight == (1 if finishing else 2)


def _wait(engine: Any, rx: zmq.Socket) -> tuple[bool, float]:
    t0 = time.perf_counter()
    alive = loop._await_arrivals(engine, rx, lambda msg: None, "t", StepLog("t"))
    return alive, time.perf_counter() - t0


def test_a_successor_sent_after_a_finish_joins_before_the_next_step(engine, sockets) -> None:
    rx, tx = sockets
    _finish_one(engine, max_wait_s=5.0)
    sender = threading.Timer(LATE_S, lambda: tx.send(p.encode(_generate(3, 4))))
    sender.start()
    alive, took = _wait(engine, rx)
    sender.join()
    assert alive
    assert engine.in_flight == 2  # admitted by the wait, not left for after the step
    assert LATE_S * 0.8 <= took < 2.0  # it ended when the request came, not at the bound


def test_the_wait_is_bounded_when_nothing_comes(engine, sockets) -> None:
    rx, _ = sockets
    _finish_one(engine, max_wait_s=0.2)
    alive, took = _wait(engine, rx)
    assert alive and engine.in_flight == 1
    assert 0.15 <= took < 1.0


def test_no_wait_after_a_step_that_finished_nothing(engine, sockets) -> None:
    rx, _ = sockets
    _finish_one(engine, max_wait_s=5.0, finishing=False)
    _, took = _wait(engine, rx)
    assert took < 0.5


def test_admit_wait_zero_turns_it_off(engine, sockets) -> None:
    rx, _ = sockets
    _finish_one(engine, max_wait_s=0.0)
    _, took = _wait(engine, rx)
    assert took < 0.5


def test_shutdown_during_the_wait_stops_the_loop(engine, sockets) -> None:
    rx, tx = sockets
    _finish_one(engine, max_wait_s=5.0)
    tx.send(p.encode(p.Shutdown()))
    alive, took = _wait(engine, rx)
    assert not alive and took < 2.0
