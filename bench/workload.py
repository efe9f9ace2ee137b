"""The requests of a benchmark run: prompts and output lengths drawn from seeded distributions.

Every target of a run gets the same list. A prompt is English text of about `n` tokens of the
model's own tokenizer, led by its request number so no two prompts share a prefix (a server with
a prompt cache gets no free hits). Lengths are fixed ("128") or uniform over a range
("64:256"). Open-loop arrival times are a seeded Poisson process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from bench.make_model import _CORPUS

__all__ = ["Item", "Span", "arrivals", "build"]


@dataclass(frozen=True)
class Span:
    """A length: `lo` when fixed, else uniform over [lo, hi]."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str) -> Span:
        lo, _, hi = text.partition(":")
        span = cls(int(lo), int(hi or lo))
        if not 0 < span.lo <= span.hi:
            raise ValueError(f"length {text!r}: want N or LO:HI with 0 < LO <= HI")
        return span

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True)
class Item:
    """One request: a text prompt, its output length, and the (logical) model it names."""

    prompt: str
    max_tokens: int
    model: str


def build(model_dir: Path, n: int, prompt: Span, output: Span, seed: int,
          models: list[str]) -> list[Item]:
    """`n` requests; the model of each is drawn at random from `models`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    corpus = tok.encode(_CORPUS, add_special_tokens=False).ids
    rng = random.Random(seed)
    items = []
    for i in range(n):
        want = prompt.draw(rng)
        ids = tok.encode(f"Request {i}: ", add_special_tokens=False).ids
        start = rng.randrange(len(corpus))
        while len(ids) < want:
            ids += corpus[start:start + want - len(ids)]
            start = 0
        items.append(Item(tok.decode(ids[:want]), output.draw(rng), rng.choice(models)))
    return items


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (s) of `n` requests at `rate` per second (exponential gaps)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
