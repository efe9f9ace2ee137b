"""Tables of `bench.gateway_vs_inprocess` results: the per-run record, medians, ratios, markdown.

Kept apart from the runner so a saved JSON can be summarised again (`--report FILE`) without
starting anything.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "markdown", "median", "report", "summary"]


@dataclass
class Run:
    """One measured batch of N requests on one side."""

    side: str
    n: int
    wall_s: float
    ttft_s: list[float]
    completion_tokens: list[int]
    cpu_s: float
    loadavg: float
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return sum(self.completion_tokens) / self.wall_s


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summary(runs: list[Run], streams: list[int],
            ttft: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    rows = []
    for n in streams:
        row: dict[str, Any] = {"streams": n}
        for side in ("in-process", "gateway"):
            mine = [r for r in runs if r.n == n and r.side == side]
            row[side] = {
                "tok_s": median([r.tok_s for r in mine]),
                "ttft_p50_ms": median([t for r in mine for t in r.ttft_s]) * 1e3,
                "cpu_ms_per_token": median(
                    [r.cpu_s * 1e3 / sum(r.completion_tokens) for r in mine]),
                "loadavg": median([r.loadavg for r in mine]),
            }
        row["ratio"] = row["gateway"]["tok_s"] / row["in-process"]["tok_s"]
        # Runs of one rep ran back to back: their ratio cancels slow drift of the machine.
        pairs = zip([r for r in runs if r.n == n and r.side == "in-process"],
                    [r for r in runs if r.n == n and r.side == "gateway"], strict=True)
        row["ratio_paired"] = median([g.tok_s / i.tok_s for i, g in pairs])
        rows.append(row)
    single = {}
    for key, sides in ttft.items():
        p50 = {side: median(v) * 1e3 for side, v in sides.items()}
        diffs = [g - i for i, g in zip(sides["in-process"], sides["gateway"], strict=True)]
        single[key] = {**p50, "overhead_ms": p50["gateway"] - p50["in-process"],
                       "overhead_paired_ms": median(diffs) * 1e3, "reps": len(diffs)}
    return {"by_streams": rows, "ttft_single_p50_ms": single}


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        "| streams | in-process tok/s | gateway tok/s | gateway / in-process (paired) | "
        "in-process TTFT p50 | gateway TTFT p50 | CPU ms/token in-process | "
        "CPU ms/token gateway+worker+client | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in s["by_streams"]:
        a, b = row["in-process"], row["gateway"]
        lines.append(f"| {row['streams']} | {a['tok_s']:.2f} | {b['tok_s']:.2f} | "
                     f"{row['ratio']:.3f} ({row['ratio_paired']:.3f}) | "
                     f"{a['ttft_p50_ms']:.0f} ms | {b['ttft_p50_ms']:.0f} ms | "
                     f"{a['cpu_ms_per_token']:.0f} | {b['cpu_ms_per_token']:.0f} | "
                     f"{a['loadavg']:.1f} / {b['loadavg']:.1f} |")
    rtt = res["round_trip_s"]
    lines.append("")
    for key, t in s["ttft_single_p50_ms"].items():
        lines.append(
            f"- single-request TTFT p50, {key}-token prompt ({t['reps']} interleaved reps, "
            f"max_tokens 1): in-process {t['in-process']:.1f} ms, gateway {t['gateway']:.1f} ms,"
            f" overhead **{t['overhead_ms']:+.1f} ms** (median of paired differences "
            f"{t['overhead_paired_ms']:+.1f} ms; target <= 5 ms)")
    lines += [
        f"- round trips with no model work, p50 of {len(rtt['health'])}: GET /health "
        f"{median(rtt['health']) * 1e3:.2f} ms; a completion the worker refuses at admission "
        f"(HTTP -> gateway -> ZeroMQ -> worker loop -> back) "
        f"{median(rtt['worker_refusal']) * 1e3:.2f} ms",
        f"- gateway RSS at idle: {res['gateway_rss_idle_start_mb']:.1f} MB after start-up, "
        f"{res['gateway_rss_idle_end_mb']:.1f} MB after the runs (target <= 60 MB); "
        f"worker {res['worker_memory_mb']:.0f} MB",
        f"- medians of {res['reps']} interleaved reps (paired: median of the per-rep ratios); "
        f"prompt {res['prompt_tokens']} tokens, max_tokens {res['max_tokens']}, max_batch "
        f"{res['max_batch']}; BLAS {res['blas']}; load avg = 1-min load at the runs' start",
    ]
    if res["problems"]:
        lines.append(f"- PROBLEMS (completion_tokens != max_tokens): {res['problems']}")
    return "\n".join(lines)


def report(path: Path) -> str:
    """The markdown table of a saved result, its summary recomputed from the raw runs."""
    res = json.loads(path.read_text())
    names = Run.__dataclass_fields__.keys()
    runs = [Run(**{k: v for k, v in r.items() if k in names}) for r in res["runs"]]
    streams = list(dict.fromkeys(r.n for r in runs))
    ttft = res["ttft_single_s"]
    if "gateway" in ttft:  # files written before TTFT was measured at several prompt lengths
        ttft = res["ttft_single_s"] = {str(res["prompt_tokens"]): ttft}
    res["summary"] = summary(runs, streams, ttft)
    return markdown(res)
