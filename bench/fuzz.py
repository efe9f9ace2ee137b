"""Fuzz every route of a live gateway with schemathesis, from its own `GET /openapi.json`.

Each operation gets `--examples` positive and as many negative (schema-violating) cases.
Checks: no 5xx, the response's content type and (where declared) JSON body conform to the
document, and every request answers within `--timeout` seconds (a timeout is a "hang" finding).
Half the cases that name a model are pointed at a configured model of a kind the route serves,
so the fuzzer reaches the workers and not only the 404 for an unknown name.

Not fuzzed as generated: `GET /api/events?follow=1` is an endless stream by design (its
`follow` is dropped; the JSON form is fuzzed). `python -m bench.fuzz` builds tiny models of every
installed kind, starts a gateway, fuzzes it and prints the figures bench/RESULTS.md quotes;
tests/test_fuzz.py runs the same `fuzz()` with fewer examples.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

MODEL_FIELDS = ("model", "name", "source")


@dataclass
class Report:
    operations: int = 0
    examples: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest_s: float = 0.0

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.operations} operations, {self.examples} examples, "
                f"{len(self.findings)} findings, {self.seconds:.0f} s "
                f"(slowest response {self.slowest_s:.1f} s; statuses {codes})")


def served_models(models: Mapping[str, str]) -> dict[str, list[str]]:
    """Route → configured model names of a kind it serves (admin routes take any), from
    `models` (name → type)."""
    from mlx_gw.gateway.supervision.kinds import ROUTE_KINDS

    out = {route: [n for n, t in models.items() if t in kinds]
           for route, kinds in ROUTE_KINDS.items()}
    for route in ("/api/load", "/api/unload", "/api/pin", "/api/show", "/api/delete",
                  "/api/pull", "/api/copy"):
        out[route] = list(models)
    return out


def _aim(case: Any, names: Sequence[str], pick: int) -> None:
    """Point the case's model field (body or query) at a configured model."""
    if not names:
        return
    name = names[pick % len(names)]
    for where in (case.body, case.query):
        if isinstance(where, dict):
            for key in MODEL_FIELDS:
                if key in where:
                    where[key] = name
                    return


def fuzz(url: str, models: Mapping[str, str], *, examples: int = 5,
         timeout_s: float = 30.0, seed: int = 0) -> Report:
    """Fuzz the gateway at `url` (serving `models`, name → type) and report what it found."""
    import hypothesis
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
    )

    checks = [not_a_server_error, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    aimed = served_models(models)
    report = Report()
    start = time.monotonic()
    session = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        report.operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases = st.tuples(op.as_strategy(generation_mode=mode), st.booleans(),
                              st.integers(0, 7))

            @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                                 derandomize=False, phases=[hypothesis.Phase.generate],
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.seed(seed)
            @hypothesis.given(cases)
            def run(drawn: tuple[Any, bool, int]) -> None:
                case, aim, pick = drawn
                op = case.operation
                if aim:
                    _aim(case, aimed.get(op.path, []), pick)
                if isinstance(case.query, dict):
                    case.query.pop("follow", None)  # an endless stream by design
                report.examples += 1
                label = f"{op.method.upper()} {op.path}"
                sent = time.monotonic()
                try:
                    response = case.call(base_url=url, session=session, timeout=timeout_s)
                except requests.Timeout:
                    report.findings.append(f"{label}: no answer within {timeout_s:.0f} s "
                                           f"(body {case.body!r:.300})")
                    return
                except requests.RequestException as e:
                    report.findings.append(f"{label}: {type(e).__name__}: {e}")
                    return
                report.slowest_s = max(report.slowest_s, time.monotonic() - sent)
                code = response.status_code
                report.statuses[code] = report.statuses.get(code, 0) + 1
                try:
                    case.validate_response(response, checks=checks)
                except (AssertionError, BaseExceptionGroup) as e:
                    text = str(e).strip().replace("\n", " ")[:600]
                    report.findings.append(f"{label} → {code}: {text}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                pass  # negative mode for an operation with nothing to violate (no inputs)
    report.seconds = time.monotonic() - start
    return report


# ------------------------------------------------------------------ python -m bench.fuzz


@contextlib.contextmanager
def tiny_gateway(root: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A gateway over tiny models of every installed kind: (url, name → type)."""
    import importlib.util

    from tests.conftest import GatewayProc, assert_gone
    from tests.tiny_models import build_tiny_llama

    models: dict[str, dict[str, Any]] = {}
    build_tiny_llama(root / "tiny-llm", seed=0)
    models["tiny-llm"] = {"type": "llm", "path": str(root / "tiny-llm")}
    from tests import tiny_kinds

    for pkg, name, kind, build in (("mlx_embeddings", "tiny-bert", "embedding",
                                    tiny_kinds.build_tiny_bert),
                                   ("mlx_whisper", "tiny-whisper", "stt",
                                    tiny_kinds.build_tiny_whisper),
                                   ("mlx_audio", "tiny-tts", "tts",
                                    tiny_kinds.build_tiny_soprano)):
        if importlib.util.find_spec(pkg) is not None:
            models[name] = {"type": kind, "path": str(build(root / name))}
    config = {"gateway": {"port": 0}, "models": models}
    gw = GatewayProc(config, root / "gw")
    try:
        yield gw.url, {n: m["type"] for n, m in models.items()}
    finally:
        gw.workers()
        gw.stop()
        assert_gone(gw.seen_workers)
        errors = [line for line in gw.log().splitlines() if "Error" in line or "Traceback" in line]
        if errors:
            print(f"gateway log ({gw.log_path}), error lines:", *errors[-40:], sep="\n  ")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__)
    ap.add_argument("--examples", type=int, default=50,
                    help="examples per operation and generation mode (default 50)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request bound, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep models and the gateway log here")
    ap.add_argument("--url", help="fuzz a running gateway instead (its models from /v1/models)")
    args = ap.parse_args(argv)
    if args.url:
        data = requests.get(args.url + "/v1/models", timeout=10).json()["data"]
        report = fuzz(args.url, {m["id"]: m["type"] for m in data}, examples=args.examples,
                      timeout_s=args.timeout, seed=args.seed)
    else:
        root = args.workdir or Path(tempfile.mkdtemp(prefix="mlxgw-fuzz-"))
        with tiny_gateway(root) as (url, models):
            print(f"fuzzing {url}: models {models}", flush=True)
            report = fuzz(url, models, examples=args.examples, timeout_s=args.timeout,
                          seed=args.seed)
    for f in report.findings:
        print("FINDING", f)
    print(report.summary())
    return 1 if report.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
