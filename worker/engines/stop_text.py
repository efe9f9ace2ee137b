"""Stop strings over a stream of text deltas.

Text that could still be the start of a stop string is held back until the next delta settles
it, so a client never sees a partial stop string, and the stop string itself is never emitted
(OpenAI semantics).
"""

from __future__ import annotations


class StopText:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the stream

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            self._held = ""
            at, self.matched = min(hits)
            return buf[:at], True
        keep = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back tail, once the stream ends without a stop string."""
        held, self._held = self._held, ""
        return held
