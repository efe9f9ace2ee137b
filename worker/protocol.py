"""Every message the gateway and a worker exchange: typed msgspec structs, msgpack on the wire.

This is the only module both sides import. One ZeroMQ PUSH/PULL pair per worker carries it:
the gateway PUSHes `ToWorker` messages, the worker PUSHes `FromWorker` messages back. Request
ids (`rid`) multiplex many streams over the pair. Outputs are batched per engine step (one
`Outputs` frame per decode step, carrying a `Delta` for every sequence that advanced), never
one frame per token per request. Add a field here or nowhere.
"""

from __future__ import annotations

from typing import Any

import msgspec

# ---------------------------------------------------------------- gateway -> worker


class _Msg(msgspec.Struct, tag_field="t", array_like=True, omit_defaults=True, gc=False):
    pass


class Load(_Msg, tag="load"):
    """Load a model into this (so far empty) worker. Answered by `Ready` or `Error(rid=0)`."""

    name: str
    type: str  # llm | vlm | embedding | tts | stt
    path: str
    dtype: str = "auto"
    max_batch: int = 16
    context_length: int | None = None  # override of the model's own window
    memory_limit_bytes: int | None = None  # this worker's share of the ceiling (MLX limit)


class Generate(_Msg, tag="gen"):
    """One text-generation request. Exactly one of `messages` (chat) or `prompt` is set."""

    rid: int
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None  # None: up to the context window
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, tests), as vLLM's flag
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = {}


class Cancel(_Msg, tag="cancel"):
    """Drop request `rid` (client went away); the worker frees its sequence at once."""

    rid: int


class Shutdown(_Msg, tag="shutdown"):
    """Exit now. The gateway drains before it sends this."""


ToWorker = Load | Generate | Cancel | Shutdown

# ---------------------------------------------------------------- worker -> gateway


class Hello(_Msg, tag="hello"):
    """Sent once the process is up and MLX is imported, before any model is loaded."""

    pid: int
    memory_bytes: int


class Ready(_Msg, tag="ready"):
    """The model is loaded and the worker accepts requests."""

    pid: int
    context_length: int
    load_seconds: float
    memory_bytes: int
    device: str = ""


class Delta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """New text for one request from one engine step. `finish_reason` set on its last delta."""

    rid: int
    text: str = ""
    completion_tokens: int = 0  # total so far
    prompt_tokens: int = 0
    finish_reason: str | None = None  # stop | length | cancelled


class Outputs(_Msg, tag="out"):
    items: list[Delta]


class Error(_Msg, tag="err"):
    """A request (or, with rid 0, the load itself) failed. `code` is one of ERROR_CODES."""

    rid: int
    code: str
    message: str


class Heartbeat(_Msg, tag="hb"):
    memory_bytes: int
    in_flight: int
    queued: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


FromWorker = Hello | Ready | Outputs | Error | Heartbeat

# Error codes a worker may send, each mapped to one HTTP status by the gateway.
ERROR_CODES = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "unsupported": 400,
    "overloaded": 429,
    "load_failed": 503,
    "internal": 500,
}

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)
