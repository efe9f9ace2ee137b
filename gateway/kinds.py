"""Which model kinds serve which route, checked before anything loads.

A request naming a model whose `type` does not serve the route (embeddings from an llm, chat
with a whisper model) gets a 400 that says which kinds the route wants.
"""

from __future__ import annotations

from config import ModelConfig
from gateway.errors import BadRequest
from gateway.supervisor import Supervisor


class WrongModelType(BadRequest):
    code = "model_type_mismatch"


def require_kind(sup: Supervisor, name: str, kinds: tuple[str, ...], route: str) -> ModelConfig:
    """The model `name` (by name or alias) if its type is one of `kinds`; else a 400 (404 when
    there is no such model)."""
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' must be a non-empty string", param="model")
    model = sup.resolve(name)
    if model.type not in kinds:
        wanted = " or ".join(kinds)
        raise WrongModelType(f"The model '{name}' is of type '{model.type}', which does not "
                             f"serve {route}: use a model of type {wanted}", param="model")
    return model
