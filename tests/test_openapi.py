"""GET /openapi.json: every route has an entry, and request bodies are the decoded structs."""

from __future__ import annotations

import httpx
import msgspec
from aiohttp import web

from mlx_gw.config import parse_config
from mlx_gw.gateway.app import build_app
from mlx_gw.gateway.routes.openapi import OPERATIONS, build_spec, route_key, undocumented
from mlx_gw.gateway.translate.schemas import ChatRequest


def _app() -> web.Application:
    return build_app(parse_config({"models": {}}))


def test_every_route_has_an_entry_and_every_entry_a_route() -> None:
    app = _app()
    assert undocumented(app.router) == []
    served = {k for k in map(route_key, app.router.routes()) if k is not None}
    assert set(OPERATIONS) == served, f"entries without a route: {set(OPERATIONS) - served}"


def test_a_route_added_without_an_entry_is_caught() -> None:
    app = _app()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/v1/brand-new/{thing}", handler)
    assert undocumented(app.router) == [("POST", "/v1/brand-new/{thing}")]


def test_request_bodies_are_the_structs_the_handlers_decode() -> None:
    spec = build_spec("test")
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatRequest"}
    (want,), components = msgspec.json.schema_components(
        [ChatRequest], ref_template="#/components/schemas/{name}")
    assert spec["components"]["schemas"]["ChatRequest"] == components["ChatRequest"]
    chat = spec["components"]["schemas"]["ChatRequest"]
    assert {"model", "messages"} <= set(chat["required"])
    pull = spec["paths"]["/api/pull"]["post"]["requestBody"]["content"]["application/json"]
    assert len(pull["schema"]["anyOf"]) == 2  # ours (repo) and Ollama's (model)


def test_the_gateway_serves_the_document(gateway) -> None:
    r = httpx.get(gateway.url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    spec = r.json()
    assert spec["openapi"].startswith("3.1")
    for method, path in OPERATIONS:
        assert method.lower() in spec["paths"][path], (method, path)
    assert spec["paths"]["/v1/messages"]["post"]["responses"]["default"]["content"][
        "application/json"]["schema"] == {"$ref": "#/components/schemas/AnthropicError"}
