"""The worker's single-threaded loop: sockets, the engine, heartbeats and the parent-death watch.

MLX is touched by this thread only. While a batch is running the loop never blocks: it drains
whatever arrived on the socket (new requests join the batch, cancels leave it), runs one engine
step, ships that step's deltas in one frame, and sends a heartbeat (with memory and counters)
once a second. A pulse thread tells the gateway the process is alive every PULSE_INTERVAL_S
even while one step runs long: MLX releases the GIL while it computes, and a GPU's first step
of each shape compiles kernels for tens of seconds.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import zmq

from mlx_gw.worker import protocol as p
from mlx_gw.worker.engines.base import AdmissionError, Engine
from mlx_gw.worker.step_log import StepLog

log = logging.getLogger("mlxgw.worker")

HEARTBEAT_INTERVAL_S = 1.0
PULSE_INTERVAL_S = 0.5
COALESCE_MAX_S = 0.004  # longest an idle worker waits for the rest of a burst
COALESCE_QUIET_MS = 1  # ... stopping as soon as the socket is quiet this long
PARENT_POLL_S = 0.5
PR_SET_PDEATHSIG = 1


def watch_parent(parent_pid: int) -> None:
    """Exit as soon as the gateway dies, however it dies (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        # The kernel kills us when the parent exits: immediate, even mid-load.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # parent died before the prctl took effect
        os._exit(0)

    def poll() -> None:  # portable fallback (macOS has no PDEATHSIG)
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def start_pulse(ctx: zmq.Context, tx_addr: str) -> None:
    """Send `Pulse` every PULSE_INTERVAL_S from a thread with its own socket (a zmq socket
    belongs to one thread); a gateway that stopped reading never blocks it."""
    frame = p.encode(p.Pulse())

    def pulse() -> None:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(tx_addr)
        while True:
            time.sleep(PULSE_INTERVAL_S)
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass

    threading.Thread(target=pulse, name="pulse", daemon=True).start()


def memory_bytes() -> int:
    """This process's physical footprint: RSS, plus MLX device memory on a GPU backend."""
    import mlx.core as mx
    import psutil

    rss = psutil.Process().memory_info().rss
    if mx.default_device() == mx.gpu:
        return rss + int(mx.get_active_memory())
    return rss


# The engine class of each model type, and for the optional kinds the package it needs and the
# mlx-gw extra that installs it: a load without it fails with what to install.
_ENGINES = {
    "llm": ("mlx_gw.worker.engines.llm", "LLMEngine"),
    "embedding": ("mlx_gw.worker.engines.embedding", "EmbeddingEngine"),
    "stt": ("mlx_gw.worker.engines.stt", "STTEngine"),
    "tts": ("mlx_gw.worker.engines.tts", "TTSEngine"),
    "vlm": ("mlx_gw.worker.engines.vlm", "VLMEngine"),
    "train": ("mlx_gw.worker.engines.trainer", "TrainerEngine"),  # a fine-tuning job's worker
}
_EXTRAS = {
    "embedding": ("mlx_embeddings", "embeddings"),
    "stt": ("mlx_whisper", "stt"),
    "tts": ("mlx_audio", "tts"),
    "vlm": ("mlx_vlm", "vision"),
}


def _give_back_memory() -> None:
    """Release MLX's cache of freed buffers, then ask glibc to return free heap pages to
    the system: without it the RSS the supervisor reads stays high after a shrink (glibc's
    dynamic mmap threshold keeps large freed buffers on the heap)."""
    import mlx.core as mx  # imported by then: the loop runs after the load

    mx.clear_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _cache_figures(engine: Engine) -> dict[str, int]:
    """The prompt cache's Heartbeat fields (engines without one report zeros)."""
    cache = getattr(engine, "prompt_cache", None)
    if cache is None:
        return {}
    return {"prompt_cache_bytes": cache.nbytes, "prompt_cache_entries": cache.entries,
            "prompt_cache_disk_bytes": cache.disk.nbytes if cache.disk is not None else 0,
            "prompt_cache_hit_tokens": cache.hit_tokens,
            "prompt_cache_miss_tokens": cache.miss_tokens}


def _spec_figures(engine: Engine) -> dict[str, int | bool]:
    """Speculative decoding's Heartbeat fields (none when the model does not speculate)."""
    gate = getattr(engine, "spec", None)
    if gate is None:
        return {}
    return {"spec_proposed": gate.proposed, "spec_accepted": gate.accepted,
            "spec_active": gate.on}


def _make_engine(load: p.Load) -> Engine:
    if load.type not in _ENGINES:
        raise ValueError(f"model type {load.type!r} is not supported by this worker")
    if load.type in _EXTRAS:
        package, extra = _EXTRAS[load.type]
        try:
            importlib.import_module(package)
        except ImportError as e:
            raise RuntimeError(
                f"a model of type '{load.type}' needs the {package.replace('_', '-')} package, "
                f"which cannot be imported ({e}): pip install 'mlx-gw[{extra}]'"
            ) from None
    module, cls = _ENGINES[load.type]
    return getattr(importlib.import_module(module), cls).from_load(load)


def _preimport() -> None:
    """Import what a load needs before saying Hello, so a warm spare has paid for it."""
    try:
        import mlx_lm.generate  # noqa: F401  (pulls in transformers' tokenizers too)
        import mlx_lm.utils  # noqa: F401
    except ImportError as e:  # a worker for another kind may not have mlx-lm
        log.warning("could not pre-import mlx-lm: %s", e)


def run(*, rx_addr: str, tx_addr: str, parent_pid: int,
        make_engine: Callable[[p.Load], Engine] | None = None) -> int:
    """Serve one model until Shutdown. `make_engine` (default: the model type's engine)
    is how a distributed rank 0 wraps its engine (worker/distributed.py)."""
    watch_parent(parent_pid)
    # The gateway owns our lifecycle: a Ctrl-C meant for it must not kill us mid-request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import mlx.core as mx

    _preimport()

    ctx = zmq.Context()
    rx = ctx.socket(zmq.PULL)
    rx.bind(rx_addr)
    tx = ctx.socket(zmq.PUSH)
    tx.setsockopt(zmq.LINGER, 2000)
    tx.connect(tx_addr)

    def send(msg: p._Msg) -> None:
        tx.send(p.encode(msg))

    send(p.Hello(pid=os.getpid(), memory_bytes=memory_bytes()))
    load = None
    while load is None:
        msg = p.decode_to_worker(rx.recv())
        if isinstance(msg, p.Shutdown):
            return 0
        if isinstance(msg, p.Load):
            load = msg
    t0 = time.perf_counter()
    try:
        if load.memory_limit_bytes:
            mx.set_memory_limit(load.memory_limit_bytes)
        engine = (make_engine or _make_engine)(load)
        _warm_up(engine, load, send, t0)
    except Exception as e:
        traceback.print_exc()
        send(p.Error(rid=0, code="load_failed", message=f"{type(e).__name__}: {e}"))
        tx.close()  # linger flushes the error before we exit
        return 3
    log.info("[worker:%s] loaded %s in %.2fs", load.name, load.path, time.perf_counter() - t0)
    send(
        p.Ready(
            pid=os.getpid(),
            context_length=engine.context_length,
            load_seconds=time.perf_counter() - t0,
            memory_bytes=memory_bytes(),
            device=str(mx.default_device()),
        )
    )
    start_pulse(ctx, tx_addr)
    code = _serve(engine, rx, send, load.name)
    tx.close()  # linger flushes what is queued
    # Skip interpreter teardown (MLX and tokenizer finalizers): an eviction is waiting on us.
    os._exit(code)


def _warm_up(engine: Engine, load: p.Load, send, t0: float) -> None:
    """Run the engine's batch shapes before Ready (worker/engines/warmup.py), telling the
    gateway first that the weights are in and kernels are being compiled."""
    if getattr(engine, "batch_generator", None) is None:  # the LLM engine's alone
        return
    from mlx_gw.worker.engines import warmup

    mode = warmup.resolve(load.warmup)
    if mode == "full":  # the minimal one (the CPU's) takes milliseconds: no state of its own
        send(p.Warming(pid=os.getpid(), load_seconds=time.perf_counter() - t0,
                       memory_bytes=memory_bytes()))
    warmup.warm_up(engine, mode, load.name)


def _drain(engine: Engine, rx: zmq.Socket, send, name: str) -> bool:
    """Handle every message waiting on the socket. Returns False on Shutdown."""
    while True:
        try:
            msg = p.decode_to_worker(rx.recv(zmq.NOBLOCK))
        except zmq.Again:
            return True
        if isinstance(msg, p.REQUESTS):
            try:
                engine.submit(msg)
            except AdmissionError as e:
                send(p.Error(rid=msg.rid, code=e.code, message=e.message))
            except Exception as e:
                log.exception("[worker:%s] submit failed", name)
                send(p.Error(rid=msg.rid, code="internal", message=f"{e}"))
        elif isinstance(msg, (p.AddAdapter, p.RemoveAdapter)):
            op = getattr(engine, "adapter_op", None)
            try:
                if op is None:
                    raise AdmissionError("unsupported", "this model kind serves no adapters")
                send(op(msg))
            except AdmissionError as e:
                send(p.Error(rid=msg.rid, code=e.code, message=e.message))
            except Exception as e:
                log.exception("[worker:%s] adapter change failed", name)
                send(p.Error(rid=msg.rid, code="internal", message=f"{e}"))
        elif isinstance(msg, p.Cancel):
            engine.cancel(msg.rid)
        elif isinstance(msg, p.TrimCache):
            cache = getattr(engine, "prompt_cache", None)
            if cache is not None:
                cache.shrink(msg.max_bytes)
            _give_back_memory()
        elif isinstance(msg, p.Shutdown):
            engine.close()
            return False


def _await_arrivals(engine: Engine, rx: zmq.Socket, send, name: str, steps: StepLog) -> bool:
    """Before a step, wait (briefly, while the step already queued runs) for the requests
    that replace the sequences the last step finished (worker/engines/arrivals.py), so they
    join the batch a step sooner. Returns False on Shutdown."""
    arrivals = getattr(engine, "arrivals", None)  # the LLM engine's alone
    t0 = time.perf_counter()
    while arrivals is not None and (wait := arrivals.remaining()) > 0:
        if not rx.poll(max(1, math.ceil(wait * 1000))):
            break
        if not _drain(engine, rx, send, name):
            return False
    steps.spent("arrivals", t0)
    return True


def _serve(engine: Engine, rx: zmq.Socket, send, name: str) -> int:
    next_hb = 0.0
    steps = StepLog(name)
    while True:
        now = time.monotonic()
        idle = not engine.busy
        timeout_ms = 0 if not idle else max(0, int((next_hb - now) * 1000))
        t_poll = time.perf_counter()
        if rx.poll(timeout_ms):
            t_drain = time.perf_counter()
            steps.spent("poll", t_poll)
            if not _drain(engine, rx, send, name):
                return 0
            steps.spent("drain", t_drain)
            if idle and engine.busy:
                # Requests of a burst arrive a few ms apart: let the burst land before the
                # first step, so it enters as one batch rather than in pieces (each piece
                # costs a prefill and a cache merge). Bounded: a lone request waits at most
                # COALESCE_MAX_S.
                end = time.monotonic() + COALESCE_MAX_S
                while time.monotonic() < end and rx.poll(COALESCE_QUIET_MS):
                    if not _drain(engine, rx, send, name):
                        return 0
        if engine.busy and not _await_arrivals(engine, rx, send, name, steps):
            return 0
        if engine.busy:
            t_step = time.perf_counter()
            try:
                deltas = engine.step()
                steps.stepped(t_step, engine.in_flight, getattr(engine, "prefill_rows", 0))
            except Exception as e:  # fail what is in flight, keep serving
                log.exception("[worker:%s] engine step failed", name)
                for rid in engine.abort_all():
                    send(p.Error(rid=rid, code="internal", message=f"engine failure: {e}"))
                deltas = []
            t_send = time.perf_counter()
            if deltas:
                if isinstance(deltas[0], p.Delta):  # text engines: one frame per step
                    send(p.Outputs(items=deltas))
                else:  # other kinds answer with their own result messages
                    for result in deltas:
                        send(result)
            steps.spent("send", t_send)
        now = time.monotonic()
        if now >= next_hb:
            t_hb = time.perf_counter()
            send(
                p.Heartbeat(
                    memory_bytes=memory_bytes(),
                    in_flight=engine.in_flight,
                    prompt_tokens_total=engine.prompt_tokens_total,
                    generation_tokens_total=engine.generation_tokens_total,
                    **_cache_figures(engine),
                    **_spec_figures(engine),
                )
            )
            next_hb = now + HEARTBEAT_INTERVAL_S
            steps.spent("heartbeat", t_hb)
            steps.report()
