"""The prompt cache's lookup cost: mlx-lm's PromptTrie.search vs FastTrie.search (issue 20).

Entries as the benchmark leaves them: `--entries` cached sequences of `--tokens` tokens that
share a `--opening`-token prefix; each lookup is a new prompt with that opening. Both tries
hold the same entries and answer the same lookups, interleaved.

    python -m bench.trie_search --entries 256 --tokens 256 --opening 10
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from mlx_lm.models.cache import PromptTrie

from mlx_gw.worker.engines.prompt_cache import FastTrie


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--opening", type=int, default=10)
    ap.add_argument("--lookups", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(0)
    opening = [rng.randrange(32000) for _ in range(args.opening)]
    tries = {"mlx-lm PromptTrie": PromptTrie(), "FastTrie": FastTrie()}
    for _ in range(args.entries):
        tokens = opening + [rng.randrange(32000) for _ in range(args.tokens - args.opening)]
        for t in tries.values():
            t.add("m", tokens, None)
    times: dict[str, list[float]] = {k: [] for k in tries}
    for _ in range(args.lookups):
        query = opening + [rng.randrange(32000) for _ in range(118)]
        for name, t in tries.items():
            t0 = time.perf_counter()
            t.search("m", query)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["mlx-lm PromptTrie"])
    print(f"{args.entries} entries of {args.tokens} tokens under a {args.opening}-token "
          f"opening, {args.lookups} lookups (median):")
    for name, v in times.items():
        m = statistics.median(v)
        print(f"  {name:18s} {m * 1e3:8.3f} ms  ({m / base:.4f}x)")


if __name__ == "__main__":
    main()
