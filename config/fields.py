"""Checks of single values from models.yaml: exact types, ranges, durations and sizes.

Owns the per-value rules `mlx_gw.config.validate` applies key by key. YAML strings never pass for
booleans or numbers (a quoted "yes" or "8095" is a mistake to report, not to coerce). Each check
takes the value and its dotted key path, and returns the clean value or raises ConfigError.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, cast

from mlx_gw.config.durations import BYTES_HELP, DURATION_HELP, parse_bytes, parse_duration
from mlx_gw.config.schema import ConfigError, total_memory_bytes

Check = Callable[[object, str], Any]
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
NAME_RULE = "start with a letter or digit and use only letters, digits and - _ . : /"


def describe(value: object) -> str:
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def check_str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"expected a non-empty string, got {describe(value)}",
            key=key,
            fix="write a text value; quote it if it looks like a number",
        )
    return value


def check_int(value: object, key: str, *, low: int, high: int | None = None) -> int:
    bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"expected a whole number, got {describe(value)}",
            key=key,
            fix=f"write a whole number {bounds}, without quotes",
        )
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{value} is out of range", key=key, fix=f"use a number {bounds}")
    return value


def check_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"expected true or false, got {describe(value)}",
            key=key,
            fix="write true or false without quotes",
        )
    return value


def check_choice(value: object, key: str, *, choices: tuple[str, ...]) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"{describe(value)} is not valid",
            key=key,
            fix=f"use one of: {', '.join(choices)}{hint}",
        )
    return cast(str, value)


def check_int_choice(value: object, key: str, *, choices: tuple[int, ...]) -> int:
    number = check_int(value, key, low=min(choices))
    if number not in choices:
        raise ConfigError(f"{number} is not valid", key=key,
                          fix=f"use one of: {', '.join(map(str, choices))}")
    return number


def check_duration(value: object, key: str) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(
            f"expected a duration, got {describe(value)}", key=key, fix=f"use {DURATION_HELP}"
        )
    try:
        return parse_duration(value, key=key)
    except ValueError:
        raise ConfigError(
            f"invalid duration {value!r}", key=key, fix=f"use {DURATION_HELP}"
        ) from None


def check_timeout(value: object, key: str) -> float:
    seconds = check_duration(value, key)
    if not seconds:  # None (negative = never) or 0: a timeout must end and must allow work
        raise ConfigError(
            f"{value!r} is not a positive duration",
            key=key,
            fix='use a positive duration such as "30s" or "10m"',
        )
    return seconds


def check_size(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(
            f"expected a size, got {describe(value)}",
            key=key,
            fix='use a size such as "16MiB" or a number of bytes',
        )
    try:
        size = parse_bytes(value)
    except ValueError as error:
        raise ConfigError(str(error), key=key, fix='use a size such as "16MiB"') from None
    if size <= 0:
        raise ConfigError(f"{value!r} is not a positive size", key=key, fix="use a size above 0")
    return size


def check_memory_limit(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(
            f"expected a size, got {describe(value)}", key=key, fix=f"use {BYTES_HELP}"
        )
    try:
        limit = parse_bytes(value, total=total_memory_bytes())
    except ValueError as error:
        raise ConfigError(str(error), key=key, fix=f"use {BYTES_HELP}") from None
    if limit <= 0:
        raise ConfigError(f"{value!r} is not a positive size", key=key, fix=f"use {BYTES_HELP}")
    return limit


def check_reasoning_parser(value: object, key: str) -> str | tuple[str, str]:
    """A reasoning_parser name, or a [start, end] pair of marker strings."""
    from mlx_gw.config.schema import REASONING_PARSERS

    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, str) and v for v in value):
            return (value[0], value[1])
        raise ConfigError(
            f"expected two marker strings, got {describe(value)}",
            key=key,
            fix='write the pair of markers, e.g. ["<think>", "</think>"]',
        )
    return check_choice(value, key, choices=REASONING_PARSERS)


def check_number(value: object, key: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"expected a number, got {describe(value)}",
            key=key,
            fix=f"write a number from {low} to {high}, without quotes",
        )
    if not low <= value <= high:
        raise ConfigError(f"{value} is out of range", key=key,
                          fix=f"use a number from {low} to {high}")
    return float(value)


def check_known_keys(value: dict[Any, Any], key: str, valid: tuple[str, ...]) -> None:
    """A nested mapping's keys: each one of `valid`, else an error with a did-you-mean."""
    for name in value:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(f"unknown key `{name}`", key=f"{key}.{name}",
                              fix=f"{hint}Valid keys here: {', '.join(valid)}")


def check_sampling(value: object, key: str) -> Any:
    """A model's `sampling:` mapping: temperature, top_p, top_k, min_p, each optional."""
    from mlx_gw.config.schema import SAMPLING_KEYS, SamplingConfig

    if not isinstance(value, dict):
        raise ConfigError(
            f"expected a mapping, got {describe(value)}",
            key=key,
            fix="write e.g. `sampling: {temperature: 0.7, top_p: 0.9}`",
        )
    checks: dict[str, Check] = {
        "temperature": lambda v, k: check_number(v, k, low=0.0, high=2.0),
        "top_p": lambda v, k: check_number(v, k, low=0.0, high=1.0),
        "top_k": lambda v, k: check_int(v, k, low=0),
        "min_p": lambda v, k: check_number(v, k, low=0.0, high=1.0),
    }
    check_known_keys(value, key, SAMPLING_KEYS)
    values = {}
    for name, raw in value.items():
        values[name] = None if raw is None else checks[name](raw, f"{key}.{name}")
    return SamplingConfig(**values)


def check_prompt_cache(value: object, key: str) -> Any:
    """A model's `prompt_cache:` mapping: {max_bytes: SIZE (0 turns the cache off), disk: PATH,
    disk_max_bytes: SIZE}. A relative `disk` is resolved by the caller, which knows the file."""
    from mlx_gw.config.schema import DEFAULT_PROMPT_DISK_BYTES, PromptCacheConfig

    keys = ("max_bytes", "disk", "disk_max_bytes")
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {describe(value)}", key=key,
                          fix="write e.g. `prompt_cache: {max_bytes: 1GB}`")
    check_known_keys(value, key, keys)
    raw = value.get("max_bytes")
    max_bytes = None if raw is None else 0 if raw == 0 else check_size(raw, f"{key}.max_bytes")
    disk = value.get("disk")
    if disk is not None and (not isinstance(disk, str) or not disk.strip()):
        raise ConfigError(f"expected a directory path, got {describe(disk)}", key=f"{key}.disk",
                          fix="write e.g. `disk: ~/.mlx-gw/prompt-cache`")
    if disk is not None and max_bytes == 0:
        raise ConfigError("the disk tier keeps what memory evicts, and max_bytes: 0 keeps "
                          "nothing", key=f"{key}.disk", fix="remove `disk` or `max_bytes: 0`")
    disk_max = value.get("disk_max_bytes")
    if disk_max is not None and disk is None:
        raise ConfigError("disk_max_bytes bounds the disk tier, and there is none",
                          key=f"{key}.disk_max_bytes", fix="add `disk: PATH` or remove it")
    return PromptCacheConfig(
        max_bytes=max_bytes, disk=disk,
        disk_max_bytes=(DEFAULT_PROMPT_DISK_BYTES if disk_max is None
                        else check_size(disk_max, f"{key}.disk_max_bytes")))


def optional(check: Check) -> Check:
    return lambda value, key: None if value is None else check(value, key)


def check_names(value: object, key: str, *, check: bool) -> tuple[str, ...]:
    """A list of strings (a lone string is a one-item list); `check` applies the name rule."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(
            f"expected a list of strings, got {describe(value)}",
            key=key,
            fix='write a list such as ["a", "b"]',
        )
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(
                f"expected strings, found {describe(item)}", key=key, fix="quote each item"
            )
        if check and not NAME_RE.fullmatch(item):
            raise ConfigError(f"invalid name {item!r}", key=key, fix=f"names must {NAME_RULE}")
    return tuple(items)
