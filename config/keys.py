"""`gateway.api_keys`: several keys, each with an optional model allowlist and request rate.

Each entry is a key string, or a mapping `{key, name?, models?, requests_per_minute?}`. Keys
must be distinct; an allowlist names configured models (or their aliases).
"""

from __future__ import annotations

from typing import Any

from mlx_gw.config.fields import (
    check_int,
    check_known_keys,
    check_names,
    check_str,
    describe,
)
from mlx_gw.config.schema import ApiKey, ConfigError

KEY_FIELDS = ("key", "name", "models", "requests_per_minute")


def check_api_keys(value: object, key: str) -> tuple[ApiKey, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"expected a list, got {describe(value)}", key=key,
                          fix="write e.g. `api_keys: [{key: sk-one, models: [llm]}]`")
    out: list[ApiKey] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"key": item}
        if not isinstance(item, dict) or "key" not in item:
            raise ConfigError(f"expected a key or a mapping with `key`, got {describe(item)}",
                              key=where, fix="write `- sk-...` or `- {key: sk-..., models: [a]}`")
        check_known_keys(item, where, KEY_FIELDS)
        secret = check_str(item["key"], f"{where}.key")
        if len(secret) < 8:
            raise ConfigError("is shorter than 8 characters", key=f"{where}.key",
                              fix="use a long random key, e.g. `openssl rand -hex 24`")
        if any(k.key == secret for k in out):
            raise ConfigError("repeats an earlier key", key=f"{where}.key",
                              fix="give each client its own key")
        out.append(ApiKey(
            key=secret,
            name=check_str(item["name"], f"{where}.name") if "name" in item else f"key{i}",
            models=check_names(item.get("models", []), f"{where}.models", check=False),
            requests_per_minute=check_int(item.get("requests_per_minute", 0),
                                          f"{where}.requests_per_minute", low=0),
        ))
    return tuple(out)


def check_key_models(config: Any) -> None:
    """Every model an allowlist names is configured (by name or alias)."""
    for i, k in enumerate(config.gateway.api_keys):
        for name in k.models:
            if config.resolve(name) is None:
                raise ConfigError(f"names model '{name}', which is not configured",
                                  key=f"gateway.api_keys[{i}].models",
                                  fix=f"configured models: {', '.join(config.models)}")
