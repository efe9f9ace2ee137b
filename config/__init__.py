"""models.yaml: schema, parsing, validation and the embedded defaults.

The gateway imports everything it needs from here; see DESIGN.md ("models.yaml") for the contract.
"""

from mlx_gw.config.defaults import (
    DEFAULT_MODELS,
    DefaultModel,
    default_config,
    default_config_problem,
    locate_default_model,
    models_dir,
)
from mlx_gw.config.durations import format_duration, parse_bytes, parse_duration
from mlx_gw.config.loader import find_config, load_config, load_yaml, render_init_yaml
from mlx_gw.config.schema import (
    DTYPES,
    ENV_API_KEY,
    ENV_CONFIG,
    MODEL_TYPES,
    SAMPLING_KEYS,
    UNSET,
    ApiKey,
    Config,
    ConfigError,
    GatewayConfig,
    ModelConfig,
    ModelType,
    SamplingConfig,
)
from mlx_gw.config.validate import parse_config

__all__ = [
    "DEFAULT_MODELS",
    "DTYPES",
    "ENV_API_KEY",
    "ENV_CONFIG",
    "MODEL_TYPES",
    "SAMPLING_KEYS",
    "UNSET",
    "ApiKey",
    "Config",
    "ConfigError",
    "DefaultModel",
    "GatewayConfig",
    "ModelConfig",
    "ModelType",
    "SamplingConfig",
    "default_config",
    "default_config_problem",
    "find_config",
    "format_duration",
    "load_config",
    "load_yaml",
    "locate_default_model",
    "models_dir",
    "parse_bytes",
    "parse_config",
    "parse_duration",
    "render_init_yaml",
]
