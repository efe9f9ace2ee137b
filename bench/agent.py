"""The multi-turn agent scenario of `python -m bench --agent-turns T` (issue 15: the prompt cache).

N conversations run at once, each T turns long, on `/v1/chat/completions`: turn k sends the
whole history (every earlier user message and the target's own real answer to it) plus a new
user message of `--agent-user-tokens` tokens, so the prompt grows by user + answer tokens a
turn. A server that keeps the KV of the last turn prefills only what is new; one without
re-reads the history from token 0. The user texts are seeded and the same for every target of
a rep (each conversation leads with its own id, so only the chat template's first tokens are
shared between conversations, and none between reps); the answers are each target's own.

The figures: TTFT p50/p95 per turn per target, and over the turns from `--agent-from-turn` on,
the ratio of the gateway's TTFT p50 to each other target's (median of the per-rep ratios).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import Record, complete
from bench.make_model import _CORPUS
from bench.stats import pct
from bench.targets import REQUEST_TIMEOUT_S, HttpTarget, OnDone

__all__ = ["conversations", "markdown", "summarize", "talk"]

SCENARIO = "agent"


def conversations(model_dir: Path, n: int, turns: int, user_tokens: int, seed: int
                  ) -> list[list[str]]:
    """`n` conversations of `turns` user messages, each about `user_tokens` tokens of the
    model's tokenizer; the first leads with the conversation's own id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    corpus = tok.encode(_CORPUS, add_special_tokens=False).ids
    rng = random.Random(seed)
    out = []
    for c in range(n):
        users = []
        for turn in range(turns):
            lead = f"Task {seed}-{c}. " if turn == 0 else f"Step {turn + 1}. "
            ids = tok.encode(lead, add_special_tokens=False).ids
            start = rng.randrange(len(corpus))
            while len(ids) < user_tokens:
                ids += corpus[start:start + user_tokens - len(ids)]
                start = 0
            users.append(tok.decode(ids[:user_tokens]))
        out.append(users)
    return out


async def talk(target: HttpTarget, convs: list[list[str]], max_tokens: int, rep: int,
               on_done: OnDone) -> list[Record]:
    """Every conversation at once, each one turn at a time; one Record per turn (`turn` from
    1). A turn that fails ends its conversation: the next one has no answer to build on."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        t0 = time.perf_counter()

        async def one(users: list[str]) -> list[Record]:
            messages: list[dict[str, str]] = []
            recs = []
            for turn, user in enumerate(users, 1):
                messages.append({"role": "user", "content": user})
                body = {"model": target.model_for("bench"), "messages": list(messages),
                        "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}, **target.extra}
                rec = Record(target.name, SCENARIO, len(convs), rep, "bench", 0.0, turn=turn)
                text: list[str] = []
                await complete(session, target.base_url, rec, body, t0, text)
                on_done(rec)
                recs.append(rec)
                if rec.error:
                    break
                messages.append({"role": "assistant", "content": "".join(text)})
            return recs

        per_conv = await asyncio.gather(*(one(users) for users in convs))
    return [r for recs in per_conv for r in recs]


def _ok(records: list[Record]) -> list[Record]:
    return [r for r in records if r.scenario == SCENARIO and not r.error]


def summarize(records: list[Record], gateway: str, from_turn: int) -> dict[str, Any]:
    """Per (target, turn): TTFT p50/p95, median prompt and cached tokens, errors. Per target:
    TTFT p50 over turns >= `from_turn`, and `gateway`'s ratio to it paired by rep."""
    mine = [r for r in records if r.scenario == SCENARIO]
    targets = list(dict.fromkeys(r.target for r in mine))
    by: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for r in mine:
        by[(r.target, r.turn)].append(r)
    turns = []
    for t, turn in sorted(by, key=lambda k: (k[1], targets.index(k[0]))):
        recs = by[(t, turn)]
        ok = [r for r in recs if not r.error]
        turns.append({
            "target": t, "turn": turn, "requests": len(recs), "errors": len(recs) - len(ok),
            "ttft_p50_ms": pct([r.ttft_s for r in ok], 50) * 1e3,
            "ttft_p95_ms": pct([r.ttft_s for r in ok], 95) * 1e3,
            "prompt_tokens": statistics.median([r.prompt_tokens for r in ok]) if ok else -1,
            "cached_tokens": statistics.median([r.cached_tokens for r in ok]) if ok else -1,
        })

    def late_p50(target: str, rep: int | None = None) -> float:
        return pct([r.ttft_s for r in _ok(mine) if r.target == target and r.turn >= from_turn
                    and (rep is None or r.rep == rep)], 50) * 1e3

    reps = sorted({r.rep for r in mine})
    late = {}
    for t in targets:
        ratios = [late_p50(gateway, rep) / late_p50(t, rep) for rep in reps]
        ratios = [x for x in ratios if not math.isnan(x)]
        late[t] = {"ttft_p50_ms": late_p50(t),
                   "gateway_ratio": statistics.median(ratios) if ratios else float("nan")}
    return {"from_turn": from_turn, "gateway": gateway, "targets": targets, "turns": turns,
            "late": late}


def _f(x: float, fmt: str) -> str:
    return "–" if math.isnan(x) else format(x, fmt)


def markdown(s: dict[str, Any], nocache: str, peer: str) -> str:
    """A row per turn: each target's TTFT p50 / p95, the gateway's ratio to `nocache` and
    to `peer` (where they ran), the gateway's prompt and cached tokens; then the late rows."""
    gw, targets = s["gateway"], s["targets"]
    cell = {(r["target"], r["turn"]): r for r in s["turns"]}
    ratio_to = [t for t in (nocache, peer) if t in targets and t != gw]
    head = ["turn", *[f"{t} TTFT p50 / p95 ms" for t in targets],
            *[f"{gw} ÷ {t} (p50)" for t in ratio_to], f"{gw} prompt / cached tokens",
            "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for turn in sorted({r["turn"] for r in s["turns"]}):
        row = [str(turn)]
        for t in targets:
            c = cell.get((t, turn))
            row.append(f"{_f(c['ttft_p50_ms'], '.0f')} / {_f(c['ttft_p95_ms'], '.0f')}"
                       if c else "–")
        g = cell.get((gw, turn))
        for t in ratio_to:
            c = cell.get((t, turn))
            row.append(_f(g["ttft_p50_ms"] / c["ttft_p50_ms"], ".3f") if g and c else "–")
        row.append(f"{g['prompt_tokens']:.0f} / {g['cached_tokens']:.0f}" if g else "–")
        row.append(str(sum(cell[(t, turn)]["errors"] for t in targets if (t, turn) in cell)))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for t, v in s["late"].items():
        extra = "" if t == gw else (f"; {gw} ÷ {t} = **{_f(v['gateway_ratio'], '.3f')}** "
                                    "(median of per-rep ratios)")
        lines.append(f"- turns >= {s['from_turn']}: {t} TTFT p50 {_f(v['ttft_p50_ms'], '.0f')}"
                     f" ms{extra}")
    return "\n".join(lines)
