"""Step timing in the worker loop: a line for each stall, and per-second figures on demand.

A step longer than MLX_GW_SLOW_STEP_MS (default 1000) is logged with the batch it ran: after
the warm-up a GPU step takes milliseconds, so a long one is a stall worth finding. With
MLX_GW_STEP_STATS=1 the loop also logs, once a heartbeat, how its time split between engine
steps and everything else (sockets, deltas): the numbers behind a gateway-vs-in-process gap.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("mlxgw.worker")

SLOW_STEP_S = float(os.environ.get("MLX_GW_SLOW_STEP_MS", "1000")) / 1000
STATS = os.environ.get("MLX_GW_STEP_STATS", "") not in ("", "0")


class StepLog:
    def __init__(self, name: str) -> None:
        self.name = name
        self._steps: list[float] = []
        self._busy_since = 0.0  # the start of the first step since the last report
        self._last_end = 0.0
        self._sizes = 0
        self._prefills = 0  # steps that ran a prefill pass
        self._prefill_rows = 0  # the rows those passes prefilled
        self._parts: dict[str, float] = {}  # time between steps, by what the loop did

    def spent(self, part: str, t0: float) -> None:
        """The loop spent from `t0` (time.perf_counter) to now on `part` between steps."""
        if STATS and self._steps:
            self._parts[part] = self._parts.get(part, 0.0) + time.perf_counter() - t0

    def stepped(self, t0: float, in_flight: int, prefill_rows: int = 0) -> None:
        """One engine step ran from `t0` (time.perf_counter) to now, prefilling
        `prefill_rows` sequences (a pass costs about the same for 1 row as for 8 on a GPU)."""
        now = time.perf_counter()
        took = now - t0
        if took > SLOW_STEP_S:
            log.warning("[worker:%s] a step took %.0f ms (%d in flight)", self.name,
                        took * 1000, in_flight)
        if STATS:
            if not self._steps:
                self._busy_since = t0
            self._steps.append(took)
            self._sizes += in_flight
            self._prefills += prefill_rows > 0
            self._prefill_rows += prefill_rows
            self._last_end = now

    def report(self) -> None:
        """Log and reset the figures since the last report (MLX_GW_STEP_STATS only)."""
        if not self._steps:
            return
        steps = sorted(self._steps)
        span = self._last_end - self._busy_since
        n = len(steps)
        parts = ", ".join(f"{k} {v / max(1, n - 1) * 1e3:.3f}" for k, v in self._parts.items())
        log.info("[worker:%s] steps %d in %.3fs: step p50 %.2f mean %.2f max %.1f ms, "
                 "between steps %.3f ms each (%s), mean batch %.1f, prefill passes %d (%.1f rows "
                 "each)", self.name, n, span, steps[n // 2] * 1e3, sum(steps) / n * 1e3,
                 steps[-1] * 1e3, (span - sum(steps)) / max(1, n - 1) * 1e3, parts,
                 self._sizes / n, self._prefills, self._prefill_rows / max(1, self._prefills))
        self._steps = []
        self._sizes = 0
        self._prefills = 0
        self._prefill_rows = 0
        self._parts = {}
