"""The prompt cache's disk tier, through real gateways, real workers and real tiny models.

A conversation survives its model's unload and a gateway restart (its next turn is served from
disk, with the answer the cache-off gateway gives); entries evicted from memory come back from
disk; damaged files are skipped with a log line; the directory stays under disk_max_bytes,
oldest out first; another model, revision or dtype sharing the directory never hits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayProc, wait_for

SYSTEM = "You are a careful agent. Answer in short sentences and use the tools you are given."
GREEDY = {"temperature": 0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}


def _model(path: Path, disk: Path | None, **cache: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"type": "llm", "path": str(path)}
    if disk is not None:
        model["prompt_cache"] = {"disk": str(disk), **cache}
    elif cache:
        model["prompt_cache"] = cache
    return model


@pytest.fixture(scope="module")
def gw_off(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same tiny models with the cache off: the answers a hit must not change."""
    g = GatewayProc({"gateway": {"port": 0}, "models": {
        "m": _model(tiny_dir / "tiny-long", None, max_bytes=0)}},
        tmp_path_factory.mktemp("gw-disk-off"))
    yield g
    g.stop()


def _ask(g: GatewayProc, messages: list[dict[str, str]], model: str = "m") -> tuple[str, int]:
    """(the greedy answer, its cached_tokens)."""
    answer, cached, _ = _usage(g, messages, model)
    return answer, cached


def _usage(g: GatewayProc, messages: list[dict[str, str]],
           model: str = "m") -> tuple[str, int, int]:
    c = openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=model, messages=messages, **GREEDY)
    return (r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens,
            r.usage.prompt_tokens)


def _opening(topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": topic}]


def _next_turn(messages: list[dict[str, str]], answer: str) -> list[dict[str, str]]:
    return [*messages, {"role": "assistant", "content": answer},
            {"role": "user", "content": "Tell me more about that."}]


def _unload(g: GatewayProc, model: str = "m") -> None:
    httpx.post(g.url + "/api/unload", json={"model": model}, timeout=30).raise_for_status()
    wait_for(lambda: all(m["name"] != model for m in g.ps()), 30, f"{model} to unload")


def _files(disk: Path) -> list[Path]:
    return sorted(f for f in disk.rglob("*.safetensors") if ".tmp-" not in f.name)


def _disk_bytes(disk: Path) -> int:
    return sum(f.stat().st_size for f in disk.rglob("*") if f.is_file())


def test_an_unloaded_model_resumes_its_conversation_from_disk(
        tiny_dir: Path, tmp_path: Path, start_gateway: Any, gw_off: GatewayProc) -> None:
    disk = tmp_path / "pc"
    config = {"gateway": {"port": 0}, "models": {"m": _model(tiny_dir / "tiny-long", disk)}}
    g = start_gateway(config)
    turn1 = _opening("Plan a trip to the mountains.")
    answer1, _ = _ask(g, turn1)
    turn2 = _next_turn(turn1, answer1)
    answer2, cached, prompt2 = _usage(g, turn2)
    assert cached > 0  # from memory
    turn3 = _next_turn(turn2, answer2)
    _unload(g)  # the worker writes its memory entries to disk as it stops
    assert _files(disk), "nothing was written to the disk tier at unload"

    # A fresh worker: only the disk can hit, and it holds all of turn 2 but the template's
    # closing tokens (as from memory).
    answer3, cached3, prompt3 = _usage(g, turn3)
    assert prompt2 - 8 <= cached3 < prompt3, (prompt2, cached3, prompt3, g.log()[-3000:])
    assert answer3 == _ask(gw_off, turn3)[0]
    assert "disk hit" in g.log()
    row = wait_for(lambda: next(m for m in g.ps() if m["name"] == "m"
                                and m["prompt_cache_disk_bytes"] > 0), what="disk bytes")
    assert row["prompt_cache_disk_bytes"] <= _disk_bytes(disk)
    metrics = httpx.get(g.url + "/metrics", timeout=10).text
    assert re.search(r'mlxgw_prompt_cache_bytes\{model="m",tier="disk"\} [1-9]', metrics)

    # A restarted gateway (new workers, same directory) finds the entries too.
    g.stop()
    again = start_gateway(config)
    turn4 = _next_turn(turn3, answer3)
    answer4, cached4 = _ask(again, turn4)
    assert cached4 >= prompt3 - 8, (cached4, prompt3)
    assert answer4 == _ask(gw_off, turn4)[0]


def test_entries_evicted_from_memory_come_back_from_disk(
        tiny_dir: Path, tmp_path: Path, start_gateway: Any, gw_off: GatewayProc) -> None:
    disk = tmp_path / "pc"
    g = start_gateway({"gateway": {"port": 0}, "models": {
        "m": _model(tiny_dir / "tiny-long", disk, max_bytes=600_000)}})
    talk = _opening("Describe a river " + " ".join(f"r{j}" for j in range(100)))
    answer, _ = _ask(g, talk)
    for i in range(4):  # push it out of the 600 kB memory budget
        _ask(g, [{"role": "user", "content": " ".join(f"w{i}x{j}" for j in range(150))}])
    assert _files(disk)
    turn2 = _next_turn(talk, answer)
    answer2, cached = _ask(g, turn2)
    assert cached > 100, g.log()[-3000:]
    assert "disk hit" in g.log()
    assert answer2 == _ask(gw_off, turn2)[0]


def _corrupt(files: list[Path]) -> None:
    """Three kinds of damage: cut short, wholly garbage, and garbage in the KV of every
    tensor under an intact header (its sizes, offsets and token count all still agree)."""
    truncated, garbage, scribbled = files[:3]
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    data = bytearray(scribbled.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for name, info in header.items():
        begin, end = info["data_offsets"] if name != "__metadata__" else (0, 0)
        if end - begin >= 1024:  # a layer's keys or values, not a scalar
            data[8 + n + begin:8 + n + end] = os.urandom(end - begin)
    scribbled.write_bytes(bytes(data))


def test_damaged_files_are_skipped_with_a_log_line(
        tiny_dir: Path, tmp_path: Path, start_gateway: Any, gw_off: GatewayProc) -> None:
    disk = tmp_path / "pc"
    g = start_gateway({"gateway": {"port": 0}, "models": {
        "m": _model(tiny_dir / "tiny-long", disk)}})
    talks = [_opening(f"Topic {k}: tell me about the {k} sea.") for k in ("red", "black", "dead")]
    turns = [_next_turn(t, _ask(g, t)[0]) for t in talks]
    _unload(g)
    files = _files(disk)
    assert len(files) == 3, files
    _corrupt(files)

    for turn in turns:  # each would hit its own (damaged) file
        answer, _ = _ask(g, turn)
        assert answer == _ask(gw_off, turn)[0]
    log = g.log()
    skipped = set(re.findall(r"skipping disk entry (\S+):", log))
    assert skipped == {str(f) for f in files}, log[-3000:]
    assert "disk hit" not in log
    assert all(m["state"] == "ready" for m in g.ps())


def test_the_directory_stays_under_disk_max_bytes(
        tiny_dir: Path, tmp_path: Path, start_gateway: Any) -> None:
    disk, budget = tmp_path / "pc", 1_500_000
    g = start_gateway({"gateway": {"port": 0}, "models": {"m": _model(
        tiny_dir / "tiny-long", disk, max_bytes=600_000, disk_max_bytes=budget)}})

    def prompt(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": " ".join(f"w{i}x{j}" for j in range(150))}]

    seen = []
    for i in range(14):
        _ask(g, prompt(i))
        seen.append((_disk_bytes(disk), len(_files(disk))))
        assert seen[-1][0] <= budget, seen
    assert seen[-1][0] > budget // 2, seen  # it filled up, then removed the oldest
    assert max(n for _, n in seen) < 14 - 2, seen
    row = next(m for m in g.ps() if m["name"] == "m")
    assert 0 < row["prompt_cache_disk_bytes"] <= budget
    assert _ask(g, prompt(0))[1] < 10  # the oldest entry is gone...
    assert _ask(g, prompt(12))[1] > 100  # ...the last one memory evicted is not


def test_another_model_revision_or_dtype_never_hits(
        tiny_dir: Path, tmp_path: Path, start_gateway: Any) -> None:
    disk, mine = tmp_path / "pc", tmp_path / "mine"
    shutil.copytree(tiny_dir / "tiny-long", mine)
    config = {"gateway": {"port": 0}, "models": {
        "a": _model(mine, disk),
        "other": _model(tiny_dir / "tiny-0", disk),  # other weights, same tokenizer
        "a-bf16": {**_model(mine, disk), "dtype": "bfloat16"}}}
    g = start_gateway(config)
    talk = _opening("Explain how tides work.")
    turn2 = _next_turn(talk, _ask(g, talk, "a")[0])
    _unload(g, "a")
    assert _files(disk)
    assert _ask(g, turn2, "other")[1] == 0
    assert _ask(g, turn2, "a-bf16")[1] == 0
    assert _ask(g, turn2, "a")[1] > 0  # the control: a itself hits its entry
    assert g.log().count("disk hit") == 1
    g.stop()

    # A new revision at the same path: same file names and sizes, other weights.
    shutil.copy2(tiny_dir / "tiny-0" / "model.safetensors", mine / "model.safetensors")
    again = start_gateway(config)
    assert _ask(again, turn2, "a")[1] == 0
    assert "disk hit" not in again.log()
