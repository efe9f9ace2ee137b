"""The prompt cache's trie search (worker/engines/prompt_cache.py `FastTrie`): the same answer
as mlx-lm's PromptTrie on every kind of lookup, without walking the entries below the match.
(What the walk cost on an H200, and what this saves, is in bench/RESULTS.md, issue 20.)"""

from __future__ import annotations

import random

from mlx_lm.models.cache import PromptTrie

from mlx_gw.worker.engines.prompt_cache import FastTrie


def _tries(entries: list[list[int]]) -> tuple[PromptTrie, FastTrie]:
    theirs, ours = PromptTrie(), FastTrie()
    for tokens in entries:
        theirs.add("m", tokens, tuple(tokens))
        ours.add("m", tokens, tuple(tokens))
    return theirs, ours


def _conversations(rng: random.Random) -> list[list[int]]:
    """Entries as a server holds them: a shared opening, conversations that grow by turns
    (each turn's entry extends the last), and unrelated prompts."""
    opening = [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
    entries = []
    for _ in range(rng.randrange(1, 8)):
        history = opening + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
        for _ in range(rng.randrange(1, 4)):
            entries.append(list(history))
            history += [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
    entries += [[rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(3)]
    return entries


def test_the_search_answers_as_mlx_lms_on_every_kind_of_lookup() -> None:
    rng = random.Random(7)
    kinds = {"exact": 0, "shorter": 0, "longer": 0, "none": 0}
    for _ in range(300):
        entries = _conversations(rng)
        theirs, ours = _tries(entries)
        stored = {tuple(e) for e in entries}
        for _ in range(20):
            base = rng.choice(entries)
            cut = rng.randrange(len(base) + 1)
            query = base[:cut] + [rng.randrange(50) for _ in range(rng.randrange(0, 10))]
            roll = rng.random()
            if roll < 0.1:
                query = [rng.randrange(50, 60)]  # matches nothing
            elif roll < 0.3:
                query = list(base)  # an entry itself
            want, got = theirs.search("m", query), ours.search("m", query)
            assert (got.exact, got.shorter, got.common_prefix) == \
                (want.exact, want.shorter, want.common_prefix), query
            assert (got.longer is None) == (want.longer is None), query
            if got.longer is not None:
                # mlx-lm picks the shortest entry below the match, this any one: both share
                # exactly the matched prefix with the query, which is what a lookup reuses.
                assert tuple(got.longer) in stored
                assert got.longer[:got.common_prefix] == query[:got.common_prefix]
                if len(want.longer) == want.common_prefix:  # the matched node holds one
                    assert got.longer == want.longer
                assert ours.get("m", got.longer) == tuple(got.longer)
                kinds["longer"] += 1
            kinds["exact" if got.exact is not None else
                  "shorter" if got.shorter is not None else "none"] += 1
    assert all(n >= 100 for n in kinds.values()), kinds  # every branch was exercised


def test_a_search_does_not_visit_the_entries_below_the_match() -> None:
    """Many conversations under one shared opening: mlx-lm's search walks all of them to
    find the shortest; this one follows one path (its visits are counted through the dicts
    it descends)."""
    rng = random.Random(3)
    opening = list(range(10))
    entries = [opening + [100 + i] + [rng.randrange(50) for _ in range(200)] for i in range(64)]
    _, ours = _tries(entries)

    class Counting(dict):
        visits = 0

        def __getitem__(self, key):  # type: ignore[no-untyped-def]
            Counting.visits += 1
            return super().__getitem__(key)

    def wrap(node: dict) -> Counting:
        return Counting({k: (wrap(v) if isinstance(v, dict) else v) for k, v in node.items()})

    ours._trie = {"m": wrap(ours._trie["m"])}
    result = ours.search("m", opening + [999])
    assert result.longer is not None and result.common_prefix == len(opening)
    assert Counting.visits <= len(opening) + 202, Counting.visits  # the match, then one path
