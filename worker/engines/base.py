"""The one interface every engine (llm, vlm, embedding, stt, tts) offers the worker loop.

The loop owns the sockets and the clock; an engine owns its model and its batch. `submit`
admits a request at once or raises `AdmissionError` (nothing queued, nothing computed); `step`
does one bounded slice of work for everything admitted and returns what is ready to send;
`cancel` drops a request wherever it is. MLX is touched only from the loop's thread.
"""

from __future__ import annotations

from typing import Any, Protocol

from mlx_gw.worker.protocol import Load


class AdmissionError(Exception):
    """A request the engine refuses before any work; `code` is a protocol ERROR_CODES key."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Engine(Protocol):
    @classmethod
    def from_load(cls, load: Load) -> Engine:
        """Load the model the Load message names; raises on bad files or a missing package."""
        ...

    def submit(self, req: Any) -> None:
        """Admit one request (its rid is new) or raise AdmissionError."""
        ...

    def step(self) -> list[Any]:
        """One slice of work for every admitted request: the messages ready to send (deltas,
        results, per-request Errors). Returns [] when idle; bounded in time when busy."""
        ...

    def cancel(self, rid: int) -> None:
        """Forget the request: it leaves the batch before the next step. Unknown rids are
        ignored (a cancel may cross the request's last output)."""
        ...

    def busy(self) -> bool:
        """Whether `step` has work to do (the loop polls without blocking while it has)."""
        ...

    def in_flight(self) -> int:
        """Requests admitted and not finished (reported in each heartbeat)."""
        ...

    def abort_all(self) -> list[int]:
        """Drop every request (the worker is going down); the rids dropped."""
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...
