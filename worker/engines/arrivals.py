"""How long a busy LLM worker waits, after a step that finished sequences, for the requests
that replace them (issue 20).

A client in a closed loop (a chat UI, an agent, the benchmark) sends its next request as soon
as its last token arrives, so the step that ends some sequences is followed, one round trip
later, by about as many new requests. mlx-lm evaluates one decode step ahead: when `next()`
returns, the next step is already running, and the loop can wait that round trip without
slowing the rows still decoding. The new requests then enter a step sooner than if the loop
had stepped at once and found them only after that step.

Measured on an H200 (bench/RESULTS.md, issue 20, runs 9-11, same machine back to back): p50
TTFT over in-process +49 / +60 ms at 64 / 128 streams with the wait, +68..80 / +122..148 ms
without; throughput within the runs' noise either way. It did not change how full the prefill
passes were (8 rows each with and without: the queue was never short of requests there).

The wait ends as soon as as many requests have arrived as sequences finished, and never lasts
more than half a step (the time the step already running leaves) or MLX_GW_ADMIT_WAIT_MS
(default 10; 0 turns it off).
"""

from __future__ import annotations

import os
import time

MAX_WAIT_S = float(os.environ.get("MLX_GW_ADMIT_WAIT_MS", "10")) / 1000
STEP_FRACTION = 0.5  # of a step's time: what the step already running leaves for the wait
_EMA = 0.2  # weight of the newest step in the step-time average


class ArrivalWait:
    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self.step_s = 0.0  # moving average of a step's wall time
        self._expected = 0  # requests still expected after the last step's finishes
        self._until = 0.0  # time.monotonic() when the wait ends regardless

    def stepped(self, took_s: float, finished: int) -> None:
        """A step took `took_s` and finished `finished` sequences."""
        self.step_s = took_s if not self.step_s else (1 - _EMA) * self.step_s + _EMA * took_s
        self._expected = finished
        self._until = time.monotonic() + min(self.max_wait_s, STEP_FRACTION * self.step_s)

    def arrived(self) -> None:
        """A request was admitted."""
        self._expected = max(0, self._expected - 1)

    def remaining(self) -> float:
        """Seconds still worth waiting before the next step (0: step now)."""
        if self._expected <= 0:
            return 0.0
        return max(0.0, self._until - time.monotonic())
