"""A model's `distributed:` setting: one logical worker made of N ranks (mlx.distributed).

`{ranks: N, backend: ring | mpi | nccl, hosts: [...]}`. Rank 0 speaks to the gateway; the
ranks shard the model with mlx-lm (tensor parallel where the architecture has `shard`, else
pipeline). `hosts` names the machine of each rank (default: all on this one); this version
starts ranks on this machine only, so any other host is refused here with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from mlx_gw.config.fields import check_int, check_known_keys, describe
from mlx_gw.config.schema import ConfigError

Backend = Literal["ring", "mpi", "nccl"]
BACKENDS: tuple[str, ...] = get_args(Backend)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_RANKS = 64
KEYS = ("ranks", "backend", "hosts")


@dataclass(frozen=True)
class DistributedConfig:
    ranks: int
    backend: Backend = "ring"
    hosts: tuple[str, ...] = ()  # one per rank, all local

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", tuple(self.hosts) or ("127.0.0.1",) * self.ranks)


def check_distributed(value: object, key: str) -> DistributedConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {describe(value)}", key=key,
                          fix="write e.g. `distributed: {ranks: 2, backend: ring}`")
    check_known_keys(value, key, KEYS)
    if "ranks" not in value:
        raise ConfigError("missing `ranks`", key=f"{key}.ranks",
                          fix="add `ranks: N` (how many processes share the model, 2 or more)")
    ranks = check_int(value["ranks"], f"{key}.ranks", low=2, high=MAX_RANKS)
    backend = value.get("backend", "ring")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {describe(backend)}", key=f"{key}.backend",
                          fix=f"use one of: {', '.join(BACKENDS)}")
    if backend == "mpi":
        raise ConfigError("the mpi backend needs mpirun to start the ranks, which this gateway "
                          "does not do", key=f"{key}.backend",
                          fix="use `backend: ring` (TCP, any machine) or nccl (CUDA)")
    hosts = value.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"expected a list of host names, got {describe(hosts)}",
                          key=f"{key}.hosts", fix="write e.g. `hosts: [127.0.0.1, 127.0.0.1]`")
    if hosts and len(hosts) != ranks:
        raise ConfigError(f"{len(hosts)} hosts for {ranks} ranks", key=f"{key}.hosts",
                          fix="give one host per rank, or leave `hosts` out (all on this one)")
    remote = [h for h in hosts if h not in LOCAL_HOSTS]
    if remote:
        raise ConfigError(f"rank hosts other than this machine are not supported yet: "
                          f"{', '.join(remote)}", key=f"{key}.hosts",
                          fix="run every rank here (127.0.0.1), or leave `hosts` out")
    return DistributedConfig(ranks=ranks, backend=backend, hosts=tuple(hosts))


def check_distributed_model(values: dict[str, Any], prefix: str) -> None:
    """What a distributed model may not combine: another kind than llm (mlx-lm shards only
    its own models), and the prompt cache's disk tier (N ranks would write one directory)."""
    if values.get("distributed") is None:
        return
    if values.get("type") != "llm":
        raise ConfigError(f"a distributed model must be of type llm, not {values.get('type')}",
                          key=f"{prefix}.distributed", fix="remove `distributed`")
    cache = values.get("prompt_cache")
    if cache is not None and cache.disk is not None:
        raise ConfigError("the prompt cache's disk tier is not supported with distributed "
                          "ranks (each would write the same directory)",
                          key=f"{prefix}.prompt_cache.disk", fix="remove `disk`")
