"""One rank of a distributed worker: `python -m mlx_gw.worker.distributed --rank R ...`.

The gateway starts N of these (gateway/supervision/distributed.py) with the environment that
`mlx.launch` gives its ranks (MLX_RANK, MLX_HOSTFILE for ring; NCCL_* for nccl). Rank 0 is the
worker the gateway talks to: `loop.run`, the usual protocol, with its engine wrapped in
`Mirror`, which sends every engine call (the Load, each admitted request, cancel, cache trim,
step, shutdown) to the other ranks before making it. The other ranks ("followers") replay those
calls on their own engine in the same order, so every collective of a step meets its peers and
every rank holds the same batch. Followers say nothing to the gateway; each exits when the
gateway dies (parent-death watch) and on Shutdown, and the gateway kills every rank when any
one of them dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

import zmq

from mlx_gw.worker import loop
from mlx_gw.worker import protocol as p
from mlx_gw.worker.engines import sharding, warmup
from mlx_gw.worker.engines.base import AdmissionError, Engine

log = logging.getLogger("mlxgw.worker")

STEP = b"S"  # run one engine step
ABORT = b"A"  # drop every sequence (rank 0's step failed)


def _join(backend: str) -> Any:
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend=backend)
    sharding.use_group(group)
    log.info("[rank %d/%d] joined the %s group", group.rank(), group.size(), backend)
    return group


class _CacheMirror:
    """Rank 0's prompt cache, whose shrink (memory pressure) every rank makes too."""

    def __init__(self, cache: Any, fan) -> None:
        self._cache = cache
        self._fan = fan

    def shrink(self, max_bytes: int) -> None:
        self._fan(p.encode(p.TrimCache(max_bytes=max_bytes)))
        self._cache.shrink(max_bytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class Mirror:
    """Rank 0's engine: each call goes to the followers first, then to the engine."""

    def __init__(self, engine: Engine, fan) -> None:
        self._engine = engine
        self._fan = fan
        cache = getattr(engine, "prompt_cache", None)
        self.prompt_cache = None if cache is None else _CacheMirror(cache, fan)

    def submit(self, req: Any) -> None:
        self._fan(p.encode(req))
        self._engine.submit(req)

    def cancel(self, rid: int) -> None:
        self._fan(p.encode(p.Cancel(rid=rid)))
        self._engine.cancel(rid)

    def step(self) -> list[Any]:
        self._fan(STEP)
        return self._engine.step()

    def abort_all(self) -> list[int]:
        self._fan(ABORT)
        return self._engine.abort_all()

    def close(self) -> None:
        self._fan(p.encode(p.Shutdown()))
        self._engine.close()

    def __getattr__(self, name: str) -> Any:  # busy, in_flight, counters, context_length
        return getattr(self._engine, name)


def run_rank0(args: argparse.Namespace) -> int:
    ctx = zmq.Context.instance()
    peers = []
    for addr in args.followers:
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(addr)  # queued until the follower has bound
        peers.append(s)

    def fan(frame: bytes) -> None:
        for s in peers:
            s.send(frame)

    def make_engine(load: p.Load) -> Engine:
        fan(p.encode(load))
        _join(args.backend)
        return Mirror(loop._make_engine(load), fan)

    return loop.run(rx_addr=args.rx, tx_addr=args.tx, parent_pid=args.parent_pid,
                    make_engine=make_engine)


def run_follower(args: argparse.Namespace) -> int:
    loop.watch_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import mlx.core as mx

    loop._preimport()
    rx = zmq.Context.instance().socket(zmq.PULL)
    rx.bind(args.listen)
    load = p.decode_to_worker(rx.recv())  # rank 0 forwards it; the parent watch bounds the wait
    if isinstance(load, p.Shutdown):
        return 0
    assert isinstance(load, p.Load), type(load).__name__
    if load.memory_limit_bytes:
        mx.set_memory_limit(load.memory_limit_bytes)
    _join(args.backend)
    engine = loop._make_engine(load)
    if getattr(engine, "batch_generator", None) is not None:  # as rank 0's loop warms up
        warmup.warm_up(engine, load.warmup, load.name)
    log.info("[worker:%s rank %d] loaded", load.name, args.rank)
    while True:
        frame = rx.recv()
        if frame == STEP:
            try:
                engine.step()
            except Exception:
                log.exception("[worker:%s rank %d] engine step failed", load.name, args.rank)
                engine.abort_all()
            continue
        if frame == ABORT:
            engine.abort_all()
            continue
        msg = p.decode_to_worker(frame)
        if isinstance(msg, p.REQUESTS):
            try:
                engine.submit(msg)
            except (AdmissionError, Exception):  # rank 0 refused it too, and answered
                pass
        elif isinstance(msg, p.Cancel):
            engine.cancel(msg.rid)
        elif isinstance(msg, p.TrimCache):
            cache = getattr(engine, "prompt_cache", None)
            if cache is not None:
                cache.shrink(msg.max_bytes)
            loop._give_back_memory()
        elif isinstance(msg, p.Shutdown):
            engine.close()
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_gw.worker.distributed")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--backend", default="ring")
    ap.add_argument("--parent-pid", type=int, required=True, help="exit when this process dies")
    ap.add_argument("--rx", help="rank 0: ZeroMQ address to bind for gateway->worker")
    ap.add_argument("--tx", help="rank 0: ZeroMQ address to connect for worker->gateway")
    ap.add_argument("--followers", nargs="*", default=[], help="rank 0: each follower's address")
    ap.add_argument("--listen", help="a follower: the address rank 0 sends its calls to")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [worker rank {args.rank}] %(message)s")
    return run_rank0(args) if args.rank == 0 else run_follower(args)


if __name__ == "__main__":
    sys.exit(main())
