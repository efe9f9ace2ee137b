"""Vision chat through a real gateway, a real worker and the openai SDK: images as data URLs
and as fetched http URLs, streamed and not, concurrent requests, and clear 400s for a bad data
URL, a huge image, a non-image, disabled remote fetches and image parts sent to an llm."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import GatewayProc, assert_gone

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("mlx_vlm")


def png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    """A local HTTP server: /small.png, /big.png (over the byte limit)."""
    from mlx_gw.gateway.routes.vision import MAX_IMAGE_BYTES

    files = {"/small.png": png(), "/big.png": b"\x89PNG" + b"0" * (MAX_IMAGE_BYTES + 10)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def gw(tiny_llava: Path, tiny_dir: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    g = GatewayProc({"gateway": {"port": 0}, "models": {
        "llava": {"type": "vlm", "path": str(tiny_llava), "aliases": ["gpt-4o"]},
        "llm": {"type": "llm", "path": str(tiny_dir / "tiny-0")},
    }}, tmp_path_factory.mktemp("gw-vision"))
    yield g
    g.workers()
    g.stop()
    assert_gone(g.seen_workers)


def client(gw: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_chat_with_an_image_streamed_and_not(gw: GatewayProc) -> None:
    c = client(gw)
    msgs = ask(data_url(png()))
    full = c.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=6,
                                     temperature=0)
    assert full.model == "llava" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 6 and full.usage.prompt_tokens > 10
    chunks = list(c.chat.completions.create(model="llava", messages=msgs, max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6
    # The image counts: the same question without it is a shorter prompt...
    plain = c.chat.completions.create(model="llava", max_tokens=2, messages=[
        {"role": "user", "content": "What is in this picture?"}])
    assert plain.usage.prompt_tokens < full.usage.prompt_tokens
    # ...and its pixels reach the model: another picture of the same size is as long a prompt
    # and gets another greedy answer (a worker that counted image tokens but fed the model no
    # pixels, or the same pixels every time, would answer the same).
    other = c.chat.completions.create(model="llava", messages=ask(data_url(png(color=(20, 40,
                                      220)))), max_tokens=6, temperature=0)
    assert other.usage.prompt_tokens == full.usage.prompt_tokens
    assert other.choices[0].message.content != full.choices[0].message.content, \
        "two different images got the same greedy answer"


def test_remote_image_url_is_fetched(gw: GatewayProc, images: str) -> None:
    r = client(gw).chat.completions.create(model="llava", messages=ask(images + "/small.png"),
                                           max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_concurrent_requests_share_the_batch_with_greedy_results_unchanged(
        gw: GatewayProc) -> None:
    """Image and text-only requests run in one continuous batch; each gets exactly what it
    gets alone (f32 tiny model, greedy)."""
    c = client(gw)

    def one(i: int):
        msgs = (ask(data_url(png(32 + 8 * i, 32)), f"Picture {i}?") if i % 2 == 0 else
                [{"role": "user", "content": f"No picture {i}."}])
        return c.chat.completions.create(model="llava", messages=msgs, max_tokens=8,
                                         temperature=0)

    alone = [one(i).choices[0].message.content for i in range(4)]
    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, range(4)))
    assert [g.choices[0].message.content for g in together] == alone
    assert [g.usage.completion_tokens for g in together] == [8, 8, 8, 8]


def chat_status(gw: GatewayProc, model: str, url: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": ask(url), "max_tokens": 2})


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,@@@not-base64@@@", "invalid_image"),
    ("data:image/png,rawbytes", "invalid_image"),
    (data_url(b"this is not an image at all"), "invalid_image"),
    (data_url(png(9000, 6000)), "image_too_large"),  # 54 MP, a small PNG
    ("ftp://example.com/x.png", None),
])
def test_bad_images_get_400(gw: GatewayProc, url: str, code: str | None) -> None:
    r = chat_status(gw, "llava", url)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1]" and "Traceback" not in err["message"]
    if code:
        assert err["code"] == code


def test_oversized_remote_image_gets_400(gw: GatewayProc, images: str) -> None:
    r = chat_status(gw, "llava", images + "/big.png")
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    missing = chat_status(gw, "llava", images + "/nope.png")
    assert missing.status_code == 400 and "404" in missing.json()["error"]["message"]


def test_images_to_an_llm_and_disabled_remote_fetches(gw: GatewayProc, start_gateway,
                                                      tiny_llava: Path, images: str) -> None:
    r = chat_status(gw, "llm", data_url(png()))
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    g = start_gateway({"gateway": {"remote_images": False},
                       "models": {"llava": {"type": "vlm", "path": str(tiny_llava)}}})
    off = chat_status(g, "llava", images + "/small.png")
    assert off.status_code == 400 and off.json()["error"]["code"] == "remote_images_disabled"
    assert not g.ps()  # refused before loading anything


def _vision_turns(gw: GatewayProc, picture: bytes, turns: int = 4) -> list[tuple[str, int, int]]:
    """A greedy conversation that opens with a picture; each turn's (answer, prompt tokens,
    cached tokens)."""
    c = client(gw)
    messages = ask(data_url(picture), "Describe this picture at length, please.")
    out = []
    for turn in range(turns):
        r = c.chat.completions.create(model="llava", messages=messages, max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True})
        text = r.choices[0].message.content
        out.append((text, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": f"Turn {turn}: and what else do you see?"}]
    return out


def test_vision_conversation_reuses_its_text_history_and_never_another_image(
        gw: GatewayProc, tiny_llava: Path, tmp_path: Path) -> None:
    """mlx-vlm's prefix cache (16-token blocks) serves each turn's history; the greedy
    answers equal a gateway's with the cache off; another picture shares no block."""
    on = _vision_turns(gw, png(40, 40, (10, 200, 10)))
    off_gw = GatewayProc({"gateway": {"port": 0, "warm_spare": False}, "models": {
        "llava": {"type": "vlm", "path": str(tiny_llava), "prompt_cache": {"max_bytes": 0}}}},
        tmp_path / "gw-off")
    try:
        off = _vision_turns(off_gw, png(40, 40, (10, 200, 10)))
    finally:
        off_gw.stop()
    assert [t for t, _, _ in on] == [t for t, _, _ in off]
    assert all(cached == 0 for _, _, cached in off)
    assert on[0][2] == 0
    for (_, prev, _), (_, prompt, cached) in zip(on, on[1:], strict=False):
        # Whole 16-token blocks: at most two short of the previous prompt (the block the
        # last answer re-tokenizes into differently, and the one being filled).
        assert prev - 2 * 16 - 8 <= cached < prompt and cached > 0, on
    other = _vision_turns(gw, png(40, 40, (200, 10, 200)), turns=1)
    assert other[0][2] == 0  # the same text, another image: nothing reused
    row = next(m for m in gw.ps() if m["name"] == "llava")
    assert row["prompt_cache_bytes"] > 0 and row["prompt_cache_entries"] > 0
