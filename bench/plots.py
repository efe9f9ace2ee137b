"""PNG plots of a `python -m bench` result (matplotlib, Agg backend: no display needed).

  * throughput.png: aggregate tok/s vs concurrent streams, one line per target (closed loop);
  * latency.png: TTFT p50/p99 and TPOT p50 vs streams, per target (closed loop);
  * open_loop.png: TTFT and end-to-end p50/p99 vs offered request rate (open loop).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["draw"]


def _series(rows: list[dict[str, Any]], scenario: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["scenario"] == scenario:
            out.setdefault(r["target"], []).append(r)
    return {t: sorted(v, key=lambda r: r["level"]) for t, v in out.items()}


def _panel(ax: Any, series: dict[str, list[dict[str, Any]]], keys: Iterable[tuple[str, str]],
           xlabel: str, ylabel: str, log_x: bool) -> None:
    import matplotlib

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = list(keys)
    for i, (target, rows) in enumerate(series.items()):
        for key, style in keys:  # one colour per target, one line style per percentile
            ax.plot([r["level"] for r in rows], [r[key] for r in rows], style, marker="o",
                    color=colors[i % len(colors)],
                    label=f"{target} {key.split('_')[1]}" if len(keys) > 1 else target)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _pair(plt: Any, series: dict[str, list[dict[str, Any]]],
          panels: list[tuple[list[tuple[str, str]], str]], xlabel: str, log_x: bool,
          title: str, path: Path) -> Path:
    """Two panels side by side, each (keys, y label), saved to `path`."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (keys, ylabel) in zip(axes, panels, strict=True):
        _panel(ax, series, keys, xlabel, ylabel, log_x)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw(rows: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """The plots that `rows` (from bench.stats.summarize) have data for; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ttft = ([("ttft_p50_ms", "-"), ("ttft_p99_ms", "--")], "time to first token (ms)")
    closed = _series(rows, "closed")
    if closed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _panel(ax, closed, [("tok_s", "-")], "concurrent streams", "aggregate tok/s", True)
        ax.set_title(f"Throughput (closed loop)\n{title}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "throughput.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
        tpot = ([("tpot_p50_ms", "-"), ("tpot_p99_ms", "--")], "time per output token (ms)")
        written.append(_pair(plt, closed, [ttft, tpot], "concurrent streams", True,
                             f"Latency percentiles (closed loop)\n{title}",
                             out_dir / "latency.png"))
    open_ = _series(rows, "open")
    if open_:
        e2e = ([("e2e_p50_s", "-"), ("e2e_p99_s", "--")], "end-to-end latency (s)")
        written.append(_pair(plt, open_, [ttft, e2e], "offered rate (requests/s)", False,
                             f"Open loop (Poisson arrivals)\n{title}",
                             out_dir / "open_loop.png"))
    return written
