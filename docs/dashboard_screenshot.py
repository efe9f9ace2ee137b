"""Regenerate docs/dashboard.png: three tiny models, two loaded (one pinned), live traffic.

Run from the repository root: `python docs/dashboard_screenshot.py` (needs Debian's chromium
and Playwright, as the dashboard test does; nothing is downloaded).
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import GatewayProc  # noqa: E402
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.tiny_models import build_tiny_llama  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]


def main() -> None:
    d = Path(tempfile.mkdtemp())
    names = ("tiny-base", "tiny-chat", "tiny-coder")
    for i, name in enumerate(names):
        build_tiny_llama(d / name, seed=i)
    gw = GatewayProc({"gateway": {"memory_limit": "600MB", "max_loaded_models": 2},
                      "models": {n: {"type": "llm", "path": str(d / n)} for n in names}},
                     d / "gw")
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny-chat", "messages": MSG, "max_tokens": 200, "ignore_eos": True})

    try:
        for name in names:  # the third load evicts the first (max_loaded_models: 2)
            httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                       json={"model": name, "messages": MSG, "max_tokens": 8})
        httpx.post(gw.url + "/api/pin", json={"model": "tiny-coder", "pin": True})
        for _ in range(2):
            threading.Thread(target=traffic, daemon=True).start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(gw.url + "/dashboard")
            page.wait_for_selector('tr[data-model="tiny-coder"] .state.s-ready')
            page.wait_for_timeout(3500)  # a few polls, so tokens/s has a rate to show
            page.screenshot(path=str(ROOT / "docs" / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        stop.set()
        gw.stop()


if __name__ == "__main__":
    main()
