"""The benchmark harness itself, end to end: `python -m bench` starts a real gateway and the
in-process mlx-lm child on a tiny model, runs closed- and open-loop workloads through both and
writes the table, JSON, CSV and plots. (The figures it produces are in bench/RESULTS.md; this
only checks that the harness measures what it says.)"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _leftovers(before: set[int]) -> list[psutil.Process]:
    """Harness children still alive: new since `before` and run by this interpreter (other
    checkouts' tests on a shared machine start gateways too, from their own venvs)."""
    ours = ("-m bench.inprocess", "-m mlx_gw.gateway.cli", "-m mlx_gw.worker")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if p.pid not in before and argv and argv[0] == sys.executable \
                and any(s in " ".join(argv) for s in ours):
            found.append(p)
    return found


def test_bench_runs_gateway_and_in_process_side_by_side(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = {p.pid for p in psutil.process_iter()}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--targets", "gateway", "in-process",
         "--model-dir", str(tiny_dir / "tiny-0"), "--streams", "1", "3",
         "--requests-per-stream", "2", "--max-tokens", "6:10", "--prompt-tokens", "20:40",
         "--rates", "20", "--open-requests", "4", "--reps", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["targets"] == ["gateway", "in-process"] and res["notes"] == []
    # The tiny model may emit EOS: the harness bans it through logit_bias on both sides.
    assert res["logit_bias"]
    records = res["records"]
    # closed: (1 + 3) streams x 2 requests each, open: 4; per target and rep
    assert len(records) == 2 * 2 * (2 + 6 + 4)
    assert all(r["error"] == "" for r in records)
    for side in ("gateway", "in-process"):
        mine = [r for r in records if r["target"] == side]
        assert all(6 <= r["completion_tokens"] <= 10 for r in mine)
        assert all(0 < r["ttft_s"] <= r["e2e_s"] for r in mine)
        # One gap per token after the first; over HTTP a token whose text is still incomplete
        # (part of a UTF-8 character) shares the next token's chunk.
        gaps = [len(r["itl_s"]) - (r["completion_tokens"] - 1) for r in mine]
        assert all(g == 0 for g in gaps) if side == "in-process" else all(g <= 0 for g in gaps)
        assert {r["scenario"] for r in mine} == {"closed", "open"}
    # Both sides got the same requests: same output lengths, in the same order.
    for rep in (0, 1):
        lengths = {side: [r["completion_tokens"] for r in records
                          if r["target"] == side and r["rep"] == rep]
                   for side in ("gateway", "in-process")}
        assert lengths["gateway"] == lengths["in-process"]
    # The gateway counted the same prompt tokens as the in-process tokenizer. (A prompt is the
    # text of 20-40 token ids; encoding that text again may merge a few of them.)
    gw = [r["prompt_tokens"] for r in records if r["target"] == "gateway"]
    inproc = [r["prompt_tokens"] for r in records if r["target"] == "in-process"]
    assert gw == inproc and min(gw) >= 10 and max(gw) <= 40

    rows = res["summary"]
    assert {(r["scenario"], r["level"], r["target"]) for r in rows} == {
        (s, lv, t) for s, lv in (("closed", 1), ("closed", 3), ("open", 20))
        for t in ("gateway", "in-process")}
    for r in rows:
        assert r["tok_s"] > 0 and r["errors"] == 0
        assert r["vs_reference"] > 0 and r["gateway_vs_this"] > 0
        if r["target"] == "in-process":
            assert r["vs_reference"] == 1.0
    assert "| closed | 3 streams | gateway |" in proc.stdout
    with (out / "requests.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(records)
    for png in ("throughput.png", "latency.png", "open_loop.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The harness stopped everything it started.
    assert _leftovers(before) == []


def test_bench_agent_turns_cache_on_and_off(tiny_dir: Path, tmp_path: Path) -> None:
    """Issue 15's scenario, tiny: conversations whose history grows each turn, through the
    gateway with its prompt cache on and off, then the no-hit check; the table and the JSON
    carry the per-turn figures and the cache's reuse shows in them."""
    out = tmp_path / "agent"
    before = {p.pid for p in psutil.process_iter()}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--agent-turns", "3", "--agent-conversations", "2",
         "--agent-user-tokens", "24", "--agent-max-tokens", "4", "--agent-from-turn", "2",
         "--agent-nohit-streams", "2", "--requests-per-stream", "1", "--max-tokens", "4",
         "--prompt-tokens", "16", "--targets", "gateway", "gateway-nocache", "--reps", "1",
         "--model-dir", str(tiny_dir / "tiny-0"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["targets"] == ["gateway", "gateway-nocache"] and res["notes"] == []
    records = res["records"]
    agent = [r for r in records if r["scenario"] == "agent"]
    assert len(agent) == 2 * 2 * 3 and all(r["error"] == "" for r in agent)
    assert sorted({r["turn"] for r in agent}) == [1, 2, 3]
    # The no-hit check ran on both gateways: 2 streams x 1 request.
    assert len([r for r in records if r["scenario"] == "closed"]) == 2 * 2
    s = res["agent_summary"]
    cell = {(c["target"], c["turn"]): c for c in s["turns"]}
    assert set(cell) == {(t, n) for t in ("gateway", "gateway-nocache") for n in (1, 2, 3)}
    for t in ("gateway", "gateway-nocache"):
        assert all(cell[(t, n)]["ttft_p50_ms"] > 0 for n in (1, 2, 3))
        # The history grows: each turn's prompt holds the last one's and its answer.
        assert cell[(t, 1)]["prompt_tokens"] < cell[(t, 2)]["prompt_tokens"] \
            < cell[(t, 3)]["prompt_tokens"]
    # Reuse is visible: the cache-on gateway took turn 2's history from its cache.
    assert cell[("gateway", 2)]["cached_tokens"] >= cell[("gateway", 1)]["prompt_tokens"] - 4
    assert all(cell[("gateway-nocache", n)]["cached_tokens"] <= 0 for n in (1, 2, 3))
    assert s["late"]["gateway-nocache"]["gateway_ratio"] > 0
    assert len(res["runs"]) == 4 and all(r["loadavg"] >= 0 for r in res["runs"])
    assert "gateway ÷ gateway-nocache (p50)" in proc.stdout
    assert "| 3 | " in proc.stdout and "turns >= 2: gateway-nocache TTFT p50" in proc.stdout
    assert _leftovers(before) == []


def test_every_bench_script_imports() -> None:
    """The scripts outside this test share helpers; a helper renamed in one place must not
    leave another script unable to start (it happened: bench.churn imported a removed name)."""
    import importlib

    names = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")
    assert {"__main__", "churn", "gateway_vs_inprocess", "targets"} <= set(names)
    for name in names:
        importlib.import_module(f"bench.{name}")


def test_soak_smoke(tmp_path: Path) -> None:
    """`python -m bench.soak` end to end at a tiny size (the figures come from long runs, in
    bench/RESULTS.md): mixed kinds over churning models, zero failed, nothing leaked."""
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--requests", "40", "--warmup", "20", "--clients",
         "4", "--block", "20", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["requests"] == 40 and res["failed"] == [] and res["fds_leaked"] == {}
    assert res["workers_after"] == res["workers_before"] and res["loads"] >= 2
