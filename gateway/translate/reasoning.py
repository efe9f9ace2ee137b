"""Reasoning output: splits a model's streamed text into its thought and its answer.

Models that think write `<think>…</think>` (or another configured pair) before the answer; the
thought goes to `reasoning_content` (OpenAI) or a `thinking` block (Anthropic), the rest to the
content. Markers split across deltas are held back until the next delta settles them, and a
prompt that already opened the thought (templates that end the generation prompt with
`<think>`) starts the splitter inside it.
"""

from __future__ import annotations


def held_prefix(buf: str, marker: str) -> int:
    """How many trailing characters of `buf` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Feed text deltas; get (reasoning, content) pieces that are safe to emit."""

    def __init__(self, start: str, end: str, *, thinking: bool = False) -> None:
        self.start = start
        self.end = end
        self.thinking = thinking
        self._held = ""
        self._after_end = False  # strip the blank line models put between thought and answer

    def feed(self, text: str) -> tuple[str, str]:
        buf = self._held + text
        reasoning: list[str] = []
        content: list[str] = []
        while buf:
            marker = self.end if self.thinking else self.start
            i = buf.find(marker)
            if i >= 0:
                self._emit(buf[:i], reasoning, content)
                buf = buf[i + len(marker):]
                self.thinking = not self.thinking
                self._after_end = not self.thinking
                continue
            keep = held_prefix(buf, marker)
            self._emit(buf[: len(buf) - keep], reasoning, content)
            buf = buf[len(buf) - keep:]
            break
        self._held = buf
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """The held-back tail, once the stream has ended."""
        held, self._held = self._held, ""
        reasoning: list[str] = []
        content: list[str] = []
        self._emit(held, reasoning, content)
        return "".join(reasoning), "".join(content)

    def _emit(self, piece: str, reasoning: list[str], content: list[str]) -> None:
        if self.thinking:
            reasoning.append(piece)
            return
        if self._after_end:
            piece = piece.lstrip("\n")
            if not piece:
                return
            self._after_end = False
        content.append(piece)
