"""Checks that turn already-parsed YAML data into a validated `Config`.

Owns `parse_config` and every rule it enforces: known keys only (with a did-you-mean), exact
types (a quoted "yes" is not a bool, a quoted "8095" is not a port), durations, sizes, ranges,
model names and aliases that never collide, and model paths that exist or are Hugging Face repo
ids. Each failure is a `ConfigError` naming the key path and the fix; the file is added by the
caller's `source`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from mlx_gw.config.distributed import check_distributed, check_distributed_model
from mlx_gw.config.extensions import check_speculative, parse_adapters, resolve_drafts
from mlx_gw.config.fields import (
    NAME_RE,
    NAME_RULE,
    Check,
    check_bool,
    check_choice,
    check_duration,
    check_int,
    check_int_choice,
    check_memory_limit,
    check_names,
    check_prompt_cache,
    check_reasoning_parser,
    check_sampling,
    check_size,
    check_str,
    check_timeout,
    describe,
    optional,
)
from mlx_gw.config.keys import check_api_keys, check_key_models
from mlx_gw.config.schema import (
    DTYPES,
    ENV_API_KEY,
    GATEWAY_KEY_DOCS,
    MODEL_KEY_DOCS,
    MODEL_TYPES,
    REQUIRED_MODEL_KEYS,
    TOOL_PARSERS,
    TOP_LEVEL_DOCS,
    WARMUP_MODES,
    Config,
    ConfigError,
    GatewayConfig,
    ModelConfig,
)

_HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_config(
    data: object,
    *,
    source: str | None = None,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    check_paths: bool = True,
) -> Config:
    """Validate parsed YAML (`data`) into a Config, or raise ConfigError naming `source`.

    Relative model paths resolve against `base_dir` (default: the directory of `source`, else
    the working directory). `env` supplies MLX_GW_API_KEY and HOME (default: os.environ).
    `check_paths=False` skips the existence check of local model paths (for templates).
    """
    env = os.environ if env is None else env
    if base_dir is None:
        base_dir = Path(source).parent if source else Path.cwd()
    try:
        return _parse(data, source, Path(base_dir).absolute(), env, check_paths)
    except ConfigError as error:
        raise error.located(file=source) from None


def _parse(
    data: object, source: str | None, base_dir: Path, env: Mapping[str, str], check_paths: bool
) -> Config:
    if data is None:  # an empty file: default gateway, no models
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level is {describe(data)}, not a mapping",
            fix="write `gateway:` and `models:` sections (run `mlx-gw init` for a template)",
        )
    _check_keys(data, "", TOP_LEVEL_DOCS)
    gateway = _parse_gateway(data.get("gateway"), env)
    raw_models = data.get("models")
    if raw_models is None:
        raw_models = {}
    if not isinstance(raw_models, dict):
        raise ConfigError(
            f"expected a mapping of model name to settings, got {describe(raw_models)}",
            key="models",
            fix="write each model as `NAME:` followed by indented `type:` and `path:` lines",
        )
    models: dict[str, ModelConfig] = {}
    for name, entry in raw_models.items():
        model = _parse_model(name, entry, base_dir=base_dir, env=env, check_paths=check_paths)
        models[model.name] = model
    models = resolve_drafts(models, base_dir, check_paths)
    _check_collisions(models)
    config = Config(gateway=gateway, models=models, source=source)
    check_key_models(config)
    return config


def _parse_gateway(data: object, env: Mapping[str, str]) -> GatewayConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of settings, got {describe(data)}",
            key="gateway",
            fix="indent settings such as `port: 8095` under `gateway:`",
        )
    _check_keys(data, "gateway.", GATEWAY_KEY_DOCS)
    values = {name: _GATEWAY_CHECKS[name](raw, f"gateway.{name}") for name, raw in data.items()}
    if "memory_limit" in values:
        values["memory_limit_raw"] = data["memory_limit"]
    if values.get("api_key") is None:
        values["api_key"] = env.get(ENV_API_KEY) or None
    ollama_port = values.get("ollama_compat_port")
    if ollama_port and ollama_port == values.get("port", GatewayConfig.port):
        raise ConfigError(
            f"is the same port as gateway.port ({ollama_port})",
            key="gateway.ollama_compat_port",
            fix="pick another port (Ollama's is 11434), or null to listen on gateway.port only",
        )
    return GatewayConfig(**values)


def _parse_model(
    name: object, data: object, *, base_dir: Path, env: Mapping[str, str], check_paths: bool
) -> ModelConfig:
    if not isinstance(name, str):
        raise ConfigError(
            f"model names must be strings, got {describe(name)}",
            key=f"models.{name}",
            fix=f"quote the name, e.g. '\"{name}\":'",
        )
    prefix = f"models.{name}"
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid model name {name!r}", key=prefix, fix=f"names must {NAME_RULE}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of settings, got {describe(data)}",
            key=prefix,
            fix="give the model indented `type:` and `path:` lines",
        )
    _check_keys(data, f"{prefix}.", MODEL_KEY_DOCS)
    for required in REQUIRED_MODEL_KEYS:
        if required not in data:
            raise ConfigError(
                f"missing `{required}`",
                key=f"{prefix}.{required}",
                fix=f"add `{required}:` ({MODEL_KEY_DOCS[required]})",
            )
    values: dict[str, Any] = {"name": name}
    for key_name, raw in data.items():
        key = f"{prefix}.{key_name}"
        if key_name == "path":
            values["path"] = _model_path(raw, key, base_dir, env, check_paths)
        elif key_name == "adapters":
            values["adapters"] = parse_adapters(raw, key, base_dir, env, check_paths)
        else:
            values[key_name] = _MODEL_CHECKS[key_name](raw, key)
    for extra in ("adapters", "speculative"):
        if values.get(extra) and values.get("type") != "llm":
            raise ConfigError(f"only llm models take `{extra}`", key=f"{prefix}.{extra}",
                              fix="remove it, or set type: llm")
    cache = values.get("prompt_cache")
    if cache is not None and cache.disk is not None:  # relative to the file, as `path` is
        disk = _expand_user(cache.disk, env)
        disk = disk if disk.is_absolute() else base_dir / disk
        values["prompt_cache"] = replace(cache, disk=os.path.normpath(disk))
    check_distributed_model(values, prefix)
    return ModelConfig(**values)


def _check_collisions(models: Mapping[str, ModelConfig]) -> None:
    """Names and aliases share one namespace: each may point at exactly one model, once."""
    owners: dict[str, tuple[str, str]] = {name: (name, "name") for name in models}
    for model in models.values():
        adapters = [(a, "adapter") for a, _ in model.adapters]
        adapters += [(f"{model.name}:{a}", "adapter") for a, _ in model.adapters]
        for alias, what in [(a, "alias") for a in model.aliases] + adapters:
            key = f"models.{model.name}.{what}es" if what == "alias" else \
                f"models.{model.name}.adapters"
            if alias in owners:
                owner, kind = owners[alias]
                if owner == model.name:
                    where = "its own name" if kind == "name" else "listed twice"
                    raise ConfigError(f"{what} {alias!r} is {where}", key=key, fix="remove it")
                raise ConfigError(
                    f"{what} {alias!r} is already the {kind} of model {owner!r}",
                    key=key,
                    fix="give each name and alias to one model only; remove or rename it",
                )
            owners[alias] = (model.name, what)


def _check_keys(data: Mapping[object, object], prefix: str, valid: Iterable[str]) -> None:
    valid = list(valid)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(
                f"keys must be strings, got {describe(key)}",
                key=f"{prefix}{key}",
                fix=f"use one of: {', '.join(valid)}",
            )
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else "remove it"
            raise ConfigError(
                f"unknown key `{key}`",
                key=f"{prefix}{key}",
                fix=f"{hint} Valid keys here: {', '.join(valid)}",
            )


_GATEWAY_CHECKS: dict[str, Check] = {
    "host": check_str,
    "api_keys": check_api_keys,
    "allow_unauthenticated": check_bool,
    "allow_pull": optional(check_bool),
    "port": partial(check_int, low=0, high=65535),  # 0 = any free port (tests)
    "memory_limit": check_memory_limit,
    "default_keep_alive": check_duration,
    "max_loaded_models": partial(check_int, low=0),
    "api_key": optional(check_str),
    "cors_origins": partial(check_names, check=False),
    "warm_spare": check_bool,
    "load_timeout": check_timeout,
    "request_timeout": check_timeout,
    "queue_timeout": check_timeout,
    "starvation_timeout": check_timeout,
    "max_queue": partial(check_int, low=1),
    "max_body_bytes": check_size,
    "remote_images": check_bool,
    "default_max_tokens": optional(partial(check_int, low=1)),
    "ollama_compat_port": optional(partial(check_int, low=0, high=65535)),
}
_MODEL_CHECKS: dict[str, Check] = {  # `path` is checked apart: it needs the file's context
    "type": partial(check_choice, choices=MODEL_TYPES),
    "aliases": partial(check_names, check=True),
    "keep_alive": check_duration,
    "pin": check_bool,
    "max_batch": partial(check_int, low=1),
    "max_queue": partial(check_int, low=1),
    "dtype": partial(check_choice, choices=DTYPES),
    "context_length": optional(partial(check_int, low=1)),
    "tool_parser": partial(check_choice, choices=TOOL_PARSERS),
    "reasoning_parser": check_reasoning_parser,
    "max_tokens": optional(partial(check_int, low=1)),
    "sampling": check_sampling,
    "prompt_cache": check_prompt_cache,
    "warm_prompts": partial(check_names, check=False),
    "kv_bits": optional(partial(check_int_choice, choices=(4, 8))),
    "kv_group_size": partial(check_int_choice, choices=(32, 64, 128)),
    "warmup": partial(check_choice, choices=WARMUP_MODES),
    "distributed": optional(check_distributed),
    "speculative": check_speculative,
}


def _model_path(
    value: object, key: str, base_dir: Path, env: Mapping[str, str], check_paths: bool
) -> str:
    """An absolute local path, or a Hugging Face repo id ("org/name") kept as written."""
    raw = check_str(value, key)
    local = _expand_user(raw, env)
    if not local.is_absolute():
        local = base_dir / local
    local = Path(os.path.normpath(local))
    if local.exists():
        return str(local)
    explicit = raw.startswith((".", "/", "~")) or raw.endswith(".gguf")
    if not explicit and _HF_REPO_RE.fullmatch(raw):
        return raw
    if check_paths:
        raise ConfigError(
            f"path {raw!r} does not exist (looked at {local})",
            key=key,
            fix="point at an MLX model directory or .gguf file (relative paths start from the "
            "config file's directory), or give a Hugging Face repo id such as org/name",
        )
    return str(local)


def _expand_user(raw: str, env: Mapping[str, str]) -> Path:
    if raw == "~" or raw.startswith("~/"):
        home = env.get("HOME") or str(Path.home())
        return Path(home + raw[1:])
    return Path(os.path.expanduser(raw))
