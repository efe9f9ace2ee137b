"""Statistics of `python -m bench` runs: per run, per (scenario, level, target) over reps,
ratios between targets paired by rep, and the markdown table.

Aggregate tok/s of a run = its completion tokens / (first request start -> last request end).
A ratio "A / B" is the median over reps of A's tok/s over B's in the same rep: the two ran
back to back, so slow drift of a shared machine cancels.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from bench.client import Record

__all__ = ["pct", "run_stats", "summarize", "markdown"]


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation); NaN for no data."""
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_stats(records: list[Record]) -> dict[str, float]:
    ok = [r for r in records if not r.error]
    tokens = sum(r.completion_tokens for r in ok)
    if ok:
        wall = max(r.start_s + r.e2e_s for r in ok) - min(r.start_s for r in records)
    else:
        wall = float("nan")
    itl = [x for r in ok for x in r.itl_s]
    return {
        "requests": len(records), "errors": len(records) - len(ok), "tokens": tokens,
        "wall_s": wall, "tok_s": tokens / wall if ok and wall > 0 else 0.0,
        "req_s": len(ok) / wall if ok and wall > 0 else 0.0,
        **{f"ttft_p{q}_ms": pct([r.ttft_s for r in ok], q) * 1e3 for q in (50, 90, 99)},
        **{f"tpot_p{q}_ms": pct([r.tpot_s for r in ok], q) * 1e3 for q in (50, 99)},
        **{f"itl_p{q}_ms": pct(itl, q) * 1e3 for q in (50, 99)},
        **{f"e2e_p{q}_s": pct([r.e2e_s for r in ok], q) for q in (50, 99)},
    }


def _paired(per_run: dict[tuple[str, float, str, int], dict[str, float]],
            at: tuple[str, float], reps: list[int], num: str | None, den: str | None) -> float:
    """Median over `reps` of num's tok/s / den's at scenario level `at`."""
    ratios = []
    for rep in reps:
        a, b = per_run.get((*at, num, rep)), per_run.get((*at, den, rep))
        if a and b and b["tok_s"] > 0:
            ratios.append(a["tok_s"] / b["tok_s"])
    return statistics.median(ratios) if ratios else float("nan")


def summarize(records: list[Record], reference: str | None,
              gateway: str | None) -> list[dict[str, Any]]:
    """One row per (scenario, level, target): medians over reps of each run's stats, errors
    summed, and paired ratios of its tok/s to `reference`'s and of `gateway`'s to its."""
    runs: dict[tuple[str, float, str, int], list[Record]] = defaultdict(list)
    for r in records:
        runs[(r.scenario, r.level, r.target, r.rep)].append(r)
    per_run = {k: run_stats(v) for k, v in runs.items()}
    rows = []
    keys = sorted({(s, lv, t) for s, lv, t, _ in runs})
    for scenario, level, target in keys:
        reps = sorted(rep for s, lv, t, rep in runs if (s, lv, t) == (scenario, level, target))
        stats = [per_run[(scenario, level, target, rep)] for rep in reps]
        row: dict[str, Any] = {"scenario": scenario, "level": level, "target": target,
                               "reps": len(reps)}
        for name in stats[0]:
            values = [s[name] for s in stats]
            row[name] = sum(values) if name in ("requests", "errors", "tokens") else \
                statistics.median(values)
        at = (scenario, level)
        row["vs_reference"] = _paired(per_run, at, reps, target, reference)
        row["gateway_vs_this"] = _paired(per_run, at, reps, gateway, target)
        rows.append(row)
    return rows


def _f(x: float, fmt: str) -> str:
    return "–" if isinstance(x, float) and math.isnan(x) else format(x, fmt)


def markdown(rows: list[dict[str, Any]], reference: str | None, gateway: str | None) -> str:
    ref = reference or "reference"
    gw = gateway or "gateway"
    head = ("| scenario | level | target | requests (errors) | tok/s | × " + ref + " | " + gw
            + " ÷ this | TTFT p50 / p99 ms | TPOT p50 ms | ITL p99 ms | e2e p50 / p99 s |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        unit = "streams" if r["scenario"] != "open" else "req/s"
        lines.append(
            f"| {r['scenario']} | {r['level']:g} {unit} | {r['target']} | {r['requests']} "
            f"({r['errors']}) | {_f(r['tok_s'], '.1f')} | {_f(r['vs_reference'], '.3f')} | "
            f"{_f(r['gateway_vs_this'], '.3f')} | {_f(r['ttft_p50_ms'], '.0f')} / "
            f"{_f(r['ttft_p99_ms'], '.0f')} | {_f(r['tpot_p50_ms'], '.1f')} | "
            f"{_f(r['itl_p99_ms'], '.1f')} | {_f(r['e2e_p50_s'], '.2f')} / "
            f"{_f(r['e2e_p99_s'], '.2f')} |")
    return "\n".join(lines)
