"""Fuzzing (issue 19): schemathesis over every route of a live gateway, and its findings.

The short run here is `bench.fuzz.fuzz` with few examples per operation (the long one is
`python -m bench.fuzz`, figures in bench/RESULTS.md); each finding it made has a regression
test below it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import tiny_config

pytest.importorskip("schemathesis")


@pytest.fixture
def fuzz_gateway(start_gateway, tiny_dir: Path, tiny_bert: Path, tiny_whisper: Path,
                 tiny_soprano: Path):
    config = tiny_config(tiny_dir, n=1)
    config["models"].update({
        "bert": {"type": "embedding", "path": str(tiny_bert)},
        "whisper": {"type": "stt", "path": str(tiny_whisper)},
        "tts": {"type": "tts", "path": str(tiny_soprano)},
    })
    gw = start_gateway(config)
    return gw, {name: m["type"] for name, m in config["models"].items()}


@pytest.mark.timeout(300)
def test_fuzz_every_route_briefly(fuzz_gateway) -> None:
    from bench.fuzz import fuzz

    gw, models = fuzz_gateway
    report = fuzz(gw.url, models, examples=3, timeout_s=30.0)
    print(report.summary())
    assert report.operations >= 38
    assert report.findings == [], "\n".join(report.findings)
    assert "unhandled error" not in gw.log()


def test_malformed_multipart_is_a_400_not_a_500(gateway) -> None:
    # A part header with a control character: aiohttp's parser raises InvalidHeader.
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"q\x1bh\"\r\n\r\nx\r\n"
            f"--{boundary}--\r\n").encode()
    r = httpx.post(gateway.url + "/v1/audio/transcriptions", content=body, timeout=10,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and "malformed" in err["message"]
    assert "Traceback" not in gateway.log()


def test_a_keep_alive_past_any_representable_time_means_never(gateway) -> None:
    # Fuzzing found {"keep_alive": 1e300}: the expiry overflowed time_t and every later
    # /api/ps and /api/load answered 500.
    r = httpx.post(gateway.url + "/api/load", json={"model": "tiny-1", "keep_alive": 1e300},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["expires_at"] is None
    r = httpx.get(gateway.url + "/api/ps", timeout=10)
    assert r.status_code == 200, r.text
    httpx.post(gateway.url + "/api/unload", json={"model": "tiny-1"}, timeout=30)
