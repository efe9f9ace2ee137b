"""GET /dashboard in a real headless Chromium (Debian's chromium, driven by Playwright).

The page must work behind an API key (`?key=` once), show the loaded model with its memory
and the events, update live from /api/events, and its buttons must pin, unload and load. It
may fetch nothing but the gateway. Set MLX_GW_SCREENSHOT=path to save a screenshot of this
run; docs/dashboard.png comes from docs/dashboard_screenshot.py.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayProc

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium: apt-get install chromium chromium-driver")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs Playwright: pip install playwright (no browser "
    "download: the system Chromium is used)")

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


def state(gw: GatewayProc, name: str) -> dict:
    models = httpx.get(gw.url + "/dashboard/state", headers=AUTH).json()["models"]
    return next(m for m in models if m["name"] == name)


def test_dashboard_in_headless_chromium(start_gateway, tiny_dir: Path) -> None:
    gw = start_gateway({"gateway": {"api_key": KEY}, "models": {
        "tiny-0": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
        "tiny-1": {"type": "llm", "path": str(tiny_dir / "tiny-1")},
    }})
    assert httpx.get(gw.url + "/dashboard").status_code == 401
    assert httpx.get(gw.url + "/dashboard?key=wrong").status_code == 401
    assert httpx.get(gw.url + "/dashboard/state").status_code == 401
    assert httpx.get(gw.url + "/api/ps?key=" + KEY).status_code == 401  # ?key= is the page's only
    page_resp = httpx.get(gw.url + "/dashboard", params={"key": KEY})
    assert page_resp.status_code == 200
    assert "default-src 'none'" in page_resp.headers["Content-Security-Policy"]
    r = httpx.post(gw.url + "/api/load", json={"model": "tiny-0"}, headers=AUTH, timeout=60)
    assert r.status_code == 200
    httpx.post(gw.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny-0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

    requested: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("request", lambda req: requested.append(req.url))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(gw.url + f"/dashboard?key={KEY}")
            expect = sync_api.expect
            row0 = page.locator('tr[data-model="tiny-0"]')
            row1 = page.locator('tr[data-model="tiny-1"]')
            expect(row0.locator(".state")).to_have_text("ready")
            expect(row0.locator(".mem")).to_contain_text("MiB")
            expect(row0.locator(".expires")).to_have_text(re.compile(r"^\d+m \d\ds$"))
            expect(row1.locator(".state")).to_have_text("stopped")
            expect(page.locator('#events li[data-type="ready"][data-model="tiny-0"]')) \
                .to_have_count(1)
            expect(page.locator("#mem-limit")).to_contain_text("ceiling")
            assert "key=" not in page.url  # dropped from the address bar once read

            row0.locator('button[data-action="pin"]').click()
            expect(row0.locator(".expires")).to_have_text("pinned")
            expect(row0.locator('button[data-action="pin"]')).to_have_text("Unpin")
            assert state(gw, "tiny-0")["pinned"] is True
            if os.environ.get("MLX_GW_SCREENSHOT"):
                page.screenshot(path=os.environ["MLX_GW_SCREENSHOT"])

            row0.locator('button[data-action="unload"]').click()
            expect(row0.locator(".state")).to_have_text("stopped")
            expect(page.locator('#events li[data-type="unload"][data-model="tiny-0"]')) \
                .to_have_count(1)  # arrived through the live event stream
            assert httpx.get(gw.url + "/api/ps", headers=AUTH).json()["models"] == []

            row1.locator('button[data-action="load"]').click()
            expect(row1.locator(".state")).to_have_text("ready")
            expect(page.locator('#events li[data-type="ready"][data-model="tiny-1"]')) \
                .to_have_count(1)
            assert [m["name"] for m in gw.ps(AUTH)] == ["tiny-1"]
            expect(page.locator("#conn")).to_have_text("live")
            assert errors == []
        finally:
            browser.close()
    assert requested and all(u.startswith(gw.url + "/") for u in requested), requested
