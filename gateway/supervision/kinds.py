"""Which model kinds serve which route: checked once, in `Supervisor.resolve`, before any load.

A request naming a model whose `type` does not serve the route (embeddings from an llm, chat
with a whisper model) gets a 400 that says which kinds the route wants, and nothing spawns.
Every route that leases a worker names itself here; a route missing from the table is a bug
that fails loudly (KeyError) the first time it runs, in the tests.
"""

from __future__ import annotations

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import BadRequest

ROUTE_KINDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("llm", "vlm"),
    "/v1/completions": ("llm",),
    "/v1/messages": ("llm", "vlm"),
    "/v1/messages/count_tokens": ("llm",),
    "/v1/responses": ("llm", "vlm"),
    "/v1/embeddings": ("embedding",),
    "/v1/rerank": ("embedding",),
    "/v1/audio/transcriptions": ("stt",),
    "/v1/audio/translations": ("stt",),
    "/v1/audio/speech": ("tts",),
    "/api/chat": ("llm", "vlm"),
    "/api/generate": ("llm", "vlm"),
    "/api/embed": ("embedding",),
    "/api/embeddings": ("embedding",),
}


class WrongModelType(BadRequest):
    code = "model_type_mismatch"


def check_kind(model: ModelConfig, name: str, route: str) -> None:
    kinds = ROUTE_KINDS[route]
    if model.type not in kinds:
        wanted = " or ".join(kinds)
        raise WrongModelType(f"The model '{name}' is of type '{model.type}', which does not "
                             f"serve {route}: use a model of type {wanted}", param="model")
