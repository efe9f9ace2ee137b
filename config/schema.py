"""The shape of models.yaml: immutable config objects, their defaults and the one error type.

Owns `ConfigError`, `GatewayConfig`, `ModelConfig`, `Config`, the valid keys with their one-line
documentation (used by `mlx-gw init` and the README reference), and the `UNSET` sentinel that tells
"keep_alive not set for this model" apart from -1 (never expire). Turning parsed YAML into these
objects lives in `mlx_gw.config.validate` (per-value checks in `mlx_gw.config.fields`); reading
files lives in
`mlx_gw.config.loader`; the embedded default models live in `mlx_gw.config.defaults`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, get_args

from mlx_gw.config.durations import parse_bytes

if TYPE_CHECKING:
    from mlx_gw.config.distributed import DistributedConfig

ModelType = Literal["llm", "vlm", "embedding", "tts", "stt"]
MODEL_TYPES: tuple[str, ...] = get_args(ModelType)
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
WARMUP_MODES: tuple[str, ...] = ("auto", "off", "minimal", "full")  # worker/engines/warmup.py
# Tool-call formats the gateway parses: its own, then mlx-lm's (mlx_lm.tool_parsers).
TOOL_PARSERS: tuple[str, ...] = (
    "auto", "none", "hermes", "llama3_json", "mistral",
    *(f"mlx_lm:{n}" for n in ("function_gemma", "gemma4", "glm47", "kimi_k2", "longcat",
                              "minimax_m2", "pythonic", "qwen3_coder")),
)
REASONING_PARSERS: tuple[str, ...] = ("auto", "none", "think")

ENV_API_KEY = "MLX_GW_API_KEY"
ENV_CONFIG = "MLX_GW_CONFIG"


class ConfigError(Exception):
    """A mistake in a config, located: `file` (None for in-memory data), `key` (a dotted path
    such as "models.smollm2.keep_alive"), `line` when known, and a `fix` for the user."""

    def __init__(
        self,
        problem: str,
        *,
        key: str | None = None,
        fix: str | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.key = key
        self.fix = fix
        self.file = file
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file or "config"
        if self.line is not None:
            where = f"{where}:{self.line}"
        text = f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"
        return f"{text}. Fix: {self.fix}" if self.fix else text

    def located(self, *, file: str | None = None, line: int | None = None) -> ConfigError:
        """A copy with the file and line filled in where this error has none."""
        return ConfigError(
            self.problem,
            key=self.key,
            fix=self.fix,
            file=self.file or file,
            line=self.line if self.line is not None else line,
        )


class _Unset(enum.Enum):
    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset.UNSET
"""ModelConfig.keep_alive when the file does not set it: the gateway default applies."""

DEFAULT_MEMORY_LIMIT = "75%"
DEFAULT_MAX_TOKENS = 2048
SAMPLING_KEYS: tuple[str, ...] = ("temperature", "top_p", "top_k", "min_p")


@dataclass(frozen=True)
class SamplingConfig:
    """A model's `sampling:` overrides: each one set replaces the model's own default (from
    its generation_config.json or GGUF metadata) for requests that do not send it."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None


DEFAULT_PROMPT_DISK_BYTES = 10 * 2**30


@dataclass(frozen=True)
class PromptCacheConfig:
    """A model's `prompt_cache:` settings: the KV cache kept across requests."""

    max_bytes: int | None = None  # None: half the weights, 256 MiB..4 GiB, <= ceiling/8; 0: off
    disk: str | None = None  # the disk tier's directory (absolute); None: no disk tier
    disk_max_bytes: int = DEFAULT_PROMPT_DISK_BYTES  # the whole directory's bound


@dataclass(frozen=True)
class SpeculativeConfig:
    """A model's `speculative:` settings: draft `num_tokens` per step, verified in one pass."""

    method: str  # ngram | draft
    num_tokens: int = 4
    draft_model: str | None = None  # method draft: a configured model name, or a path
    draft_path: str | None = None  # draft_model resolved (the model's path, or the path given)
    draft_dtype: str = "auto"  # a configured draft's dtype


def total_memory_bytes() -> int:
    """Physical memory of this machine, in bytes."""
    try:
        import psutil
    except ImportError:  # psutil is a dependency; this keeps bare interpreters working
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(psutil.virtual_memory().total)


@dataclass(frozen=True)
class ApiKey:
    """One entry of `gateway.api_keys`: the key, the models it may use (empty: every model,
    and the management routes too) and its request rate (0: unbounded)."""

    key: str
    name: str = ""  # shown in logs instead of the key
    models: tuple[str, ...] = ()
    requests_per_minute: int = 0


@dataclass(frozen=True)
class GatewayConfig:
    """The `gateway:` section. Durations are seconds; sizes are bytes."""

    host: str = "127.0.0.1"
    port: int = 8095
    memory_limit: int = 0  # bytes; 0 here means "resolve memory_limit_raw" (see __post_init__)
    memory_limit_raw: str | int = DEFAULT_MEMORY_LIMIT  # as written, for display
    default_keep_alive: float | None = 300.0  # None = never expire
    max_loaded_models: int = 0  # 0 = bounded by memory only
    api_key: str | None = None
    api_keys: tuple[ApiKey, ...] = ()
    allow_unauthenticated: bool = False  # serve beyond loopback with no key (told explicitly)
    allow_pull: bool | None = None  # None: on when listening on loopback only
    cors_origins: tuple[str, ...] = ()
    warm_spare: bool = True
    load_timeout: float = 600.0
    request_timeout: float = 600.0
    queue_timeout: float = 120.0
    starvation_timeout: float = 10.0
    max_queue: int = 1024
    max_body_bytes: int = 16 * 2**20
    remote_images: bool = True  # fetch http(s) image URLs for vlm models
    # Completion bound of a request that sends no max_tokens (cut to what the context window
    # leaves); None = up to the window. At ~16 tok/s (135M f32 on 2 CPU cores) 2048 tokens
    # take ~2 min, well inside request_timeout, and far more than a chat answer needs.
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS
    ollama_compat_port: int | None = None  # a second listener (Ollama's 11434); 0 = any free

    def __post_init__(self) -> None:
        if self.memory_limit <= 0:
            limit = parse_bytes(self.memory_limit_raw, total=total_memory_bytes())
            object.__setattr__(self, "memory_limit", limit)
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))

    def keys(self) -> tuple[ApiKey, ...]:
        """Every key the gateway accepts: `api_key` (unrestricted) and `api_keys`."""
        single = (ApiKey(key=self.api_key, name="api_key"),) if self.api_key else ()
        return single + self.api_keys


@dataclass(frozen=True)
class ModelConfig:
    """One entry of `models:`. `path` is absolute for local files, or a Hugging Face repo id."""

    name: str
    type: ModelType
    path: str
    aliases: tuple[str, ...] = ()
    keep_alive: float | None | _Unset = UNSET  # None = never expire; UNSET = gateway default
    pin: bool = False
    max_batch: int = 16
    max_queue: int = 512
    dtype: str = "auto"
    context_length: int | None = None
    tool_parser: str = "auto"
    reasoning_parser: str | tuple[str, str] = "auto"
    max_tokens: int | None = None  # None = gateway.default_max_tokens
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompt_cache: PromptCacheConfig = field(default_factory=PromptCacheConfig)
    warm_prompts: tuple[str, ...] = ()  # system prompts prefilled into the cache at load
    kv_bits: int | None = None  # 4 or 8: KV stored quantized (batched); None: full precision
    kv_group_size: int = 64
    warmup: str = "auto"  # batch shapes run at load: auto | off | minimal | full
    distributed: DistributedConfig | None = None  # N ranks (config/distributed.py)
    adapters: tuple[tuple[str, str], ...] = ()  # LoRA adapters: (name, directory)
    speculative: SpeculativeConfig | None = None
    # Set only on what `Config.resolve` answers for an adapter's name ("NAME", "BASE:NAME"):
    # the base model's config with the adapter its requests decode with.
    adapter: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "warm_prompts", tuple(self.warm_prompts))


@dataclass(frozen=True)
class Config:
    """A validated config: the gateway settings and the models, keyed by name in file order."""

    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    source: str | None = None  # the file it came from; None for the embedded defaults
    _index: Mapping[str, ModelConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))
        index: dict[str, ModelConfig] = {}
        for model in self.models.values():
            index.setdefault(model.name, model)
        for model in self.models.values():
            for alias in model.aliases:
                index.setdefault(alias, model)
        for model in self.models.values():
            for adapter, _ in model.adapters:
                view = replace(model, adapter=adapter)
                index.setdefault(adapter, view)
                index.setdefault(f"{model.name}:{adapter}", view)
        object.__setattr__(self, "_index", MappingProxyType(index))

    def resolve(self, name: str) -> ModelConfig | None:
        """The model called `name`, by its name or one of its aliases; None if there is none."""
        return self._index.get(name)

    def model_changes(self, new: Config) -> tuple[list[str], list[str], list[str]]:
        """(added, removed, changed) model names going from this config to `new` (a reload)."""
        old = self.models
        return ([n for n in new.models if n not in old], [n for n in old if n not in new.models],
                [n for n, m in new.models.items() if n in old and old[n] != m])

    def effective_keep_alive(self, model: ModelConfig) -> float | None:
        """Seconds `model` stays loaded after use (None = never): its own or the gateway's."""
        if model.keep_alive is UNSET:
            return self.gateway.default_keep_alive
        return model.keep_alive

    def effective_max_tokens(self, model: ModelConfig) -> int | None:
        """The completion bound of `model`'s requests that send no max_tokens (None: up to
        the context window): its own `max_tokens` or `gateway.default_max_tokens`."""
        return model.max_tokens if model.max_tokens is not None \
            else self.gateway.default_max_tokens


# Every key models.yaml accepts, with the one-line comment `mlx-gw init` writes beside it.
TOP_LEVEL_DOCS: dict[str, str] = {
    "gateway": "settings of the gateway process",
    "models": "the models the gateway serves, by the name clients send as 'model'",
}
GATEWAY_KEY_DOCS: dict[str, str] = {
    "host": "address to listen on; 0.0.0.0 to serve the network (set api_key then)",
    "port": "TCP port to listen on",
    "memory_limit": 'ceiling for all workers together: share of RAM ("75%"), "12GB" or bytes',
    "default_keep_alive": 'how long an idle model stays loaded: "5m", "1h", -1 = never, 0 = unload',
    "max_loaded_models": "most models loaded at once; 0 = bounded by memory only",
    "api_key": f"when set, /v1 and /api routes need it; null = use ${ENV_API_KEY}",
    "api_keys": "more keys, each `{key, name?, models?: [allowed], requests_per_minute?}`; "
    "a key with `models` may use only those and no management route",
    "allow_unauthenticated": "listen beyond loopback with no key at all (otherwise refused)",
    "allow_pull": "POST /api/pull downloads models; null = only when host is loopback",
    "cors_origins": 'origins allowed for browser requests, e.g. ["http://localhost:3000"]',
    "warm_spare": "keep one idle worker process ready so a load skips process start-up",
    "load_timeout": "longest a model load may take",
    "request_timeout": "deadline of one request, queueing included",
    "queue_timeout": "longest a request waits for a load or for room under memory_limit",
    "starvation_timeout": "after this wait for room, busy models stop taking new requests so "
    "the waiting model gets its turn",
    "max_queue": "most requests waiting at once across all models; more get 429",
    "max_body_bytes": 'largest request body accepted, e.g. "16MiB"; more gets 413',
    "remote_images": "fetch http(s) image URLs in vlm chat requests; false = only data: URLs",
    "default_max_tokens": "completion bound of a request that sends no max_tokens; null = up "
    "to the context window",
    "ollama_compat_port": "also listen on this port (Ollama's is 11434) for clients that "
    "hard-code it; null = off, 0 = any free port",
}
MODEL_KEY_DOCS: dict[str, str] = {
    "type": "llm | vlm | embedding | tts | stt",
    "path": "MLX model dir, Hugging Face repo id (org/name, from the local cache) or a .gguf file",
    "aliases": "other names clients may send for this model",
    "keep_alive": "overrides gateway.default_keep_alive for this model",
    "pin": "load at start-up and never evict",
    "max_batch": "most sequences decoded together in one batch",
    "max_queue": "most requests waiting for this model (while it loads too); more get 429",
    "dtype": "weight dtype on load: auto | float32 | float16 | bfloat16 (CPU wants float32)",
    "context_length": "override of the model's own context window, in tokens",
    "tool_parser": "tool-call format: auto (from the chat template) | none | hermes | "
    "llama3_json | mistral | mlx_lm:NAME",
    "reasoning_parser": 'thinking markers: auto | none | think | ["<start>", "<end>"]',
    "max_tokens": "overrides gateway.default_max_tokens for this model",
    "prompt_cache": "KV reuse across requests: {max_bytes: SIZE, disk: PATH, disk_max_bytes: "
                    "SIZE}; max_bytes default half the weights (256MB..4GB, at most 1/8 of "
                    "memory_limit), 0 turns it off; disk keeps entries evicted from memory "
                    "(off by default), disk_max_bytes bounds that directory (default 10GiB)",
    "warm_prompts": "system prompts (an agent's) prefilled into the prompt cache at load",
    "kv_bits": "4 or 8: keys and values stored quantized (about 0.28x the memory of a float32 "
               "cache at 8 bits), batched and prompt-cached as usual; null = full precision",
    "kv_group_size": "quantization group of kv_bits: 32, 64 (default) or 128",
    "warmup": "batch shapes an llm runs once at load, before it is ready (the model shows "
              "`warming`), so no request waits for a GPU's kernels to compile: auto (full on "
              "a GPU, minimal on the CPU) | full (prefill batches 1..8, decode batches "
              "1..max_batch) | minimal (one short generation) | off",
    "distributed": "one model across N processes with mlx.distributed: {ranks: N, backend: "
                   "ring | mpi | nccl, hosts: [one per rank, default 127.0.0.1]}; llm only",
    "adapters": "LoRA adapters served by this model's worker, each as its own model name and "
                "as BASE:NAME: {NAME: DIR} (DIR as `mlx_lm.lora` writes it)",
    "speculative": "speculative decoding: {method: ngram | draft, num_tokens: K (default 4), "
                   "draft_model: NAME_OR_PATH}; exact (greedy output unchanged), off by itself "
                   "while it does not pay",
    "sampling": "defaults for requests that send none: {temperature, top_p, top_k, min_p}; "
    "unset = the model's generation_config.json, GGUF metadata, else greedy",
}
REQUIRED_MODEL_KEYS: tuple[str, ...] = ("type", "path")
