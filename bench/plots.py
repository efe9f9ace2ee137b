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
    for target, rows in series.items():
        for key, style in keys:
            ax.plot([r["level"] for r in rows], [r[key] for r in rows], style, marker="o",
                    label=f"{target} {key.split('_')[1]}" if len(list(keys)) > 1 else target)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def draw(rows: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """The plots that `rows` (from bench.stats.summarize) have data for; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    closed = _series(rows, "closed")
    if closed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _panel(ax, closed, [("tok_s", "-")], "concurrent streams", "aggregate tok/s", True)
        ax.set_title(f"Throughput (closed loop)\n{title}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "throughput.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        _panel(axes[0], closed, [("ttft_p50_ms", "-"), ("ttft_p99_ms", "--")],
               "concurrent streams", "time to first token (ms)", True)
        _panel(axes[1], closed, [("tpot_p50_ms", "-"), ("tpot_p99_ms", "--")],
               "concurrent streams", "time per output token (ms)", True)
        fig.suptitle(f"Latency percentiles (closed loop)\n{title}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "latency.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    open_ = _series(rows, "open")
    if open_:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        _panel(axes[0], open_, [("ttft_p50_ms", "-"), ("ttft_p99_ms", "--")],
               "offered rate (requests/s)", "time to first token (ms)", False)
        _panel(axes[1], open_, [("e2e_p50_s", "-"), ("e2e_p99_s", "--")],
               "offered rate (requests/s)", "end-to-end latency (s)", False)
        fig.suptitle(f"Open loop (Poisson arrivals)\n{title}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "open_loop.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
