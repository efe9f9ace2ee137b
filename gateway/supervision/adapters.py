"""LoRA adapters as servable model names, all served by their base model's one worker.

Adapters in models.yaml (`adapters: {NAME: DIR}`) resolve through `Config.resolve`; this
module owns those added at run time (`POST /api/adapters`, a finished training job) until
the gateway restarts, and the names Ollama's /api/copy adds. An adapter resolves, as `NAME`
or `BASE:NAME`, to its base's ModelConfig with `adapter` set: the lease is the base's
(one worker, one copy of the weights) and the request's Generate carries the adapter.
A runtime adapter is added to a running worker at once (`AddAdapter`) and to every later
load of its base (`Load.adapters`, through `WorkerHandle.runtime_adapters`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import BadRequest, Conflict, NotFound
from mlx_gw.worker import protocol as p

if TYPE_CHECKING:
    from mlx_gw.gateway.supervision.supervisor import Supervisor

ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")
ADAPTER_OP_TIMEOUT_S = 120.0  # reading an adapter's weights from disk


class Adapters:
    def __init__(self) -> None:
        self._runtime: dict[str, dict[str, str]] = {}  # base name -> {adapter: directory}

    def for_base(self, base: str) -> dict[str, str]:
        """The runtime adapters of `base` (the dict a WorkerHandle loads them from)."""
        return self._runtime.setdefault(base, {})

    def resolve(self, sup: Supervisor, name: str) -> ModelConfig | None:
        """A name the config does not know: a runtime alias, or a runtime adapter."""
        if name in sup.aliases:
            return sup.config.resolve(sup.aliases[name])
        for base, adapters in self._runtime.items():
            model = sup.config.models.get(base)
            if model is None:
                continue
            for adapter in adapters:
                if name in (adapter, f"{base}:{adapter}"):
                    return dataclasses.replace(model, adapter=adapter)
        return None

    def listing(self, sup: Supervisor) -> list[dict[str, str | bool]]:
        """Every adapter, configured and runtime: name, base, path, and where it came from."""
        rows: list[dict[str, str | bool]] = []
        for model in sup.config.models.values():
            rows += [{"name": a, "base": model.name, "path": path, "runtime": False}
                     for a, path in model.adapters]
            rows += [{"name": a, "base": model.name, "path": path, "runtime": True}
                     for a, path in self._runtime.get(model.name, {}).items()]
        return rows

    async def add(self, sup: Supervisor, base_name: str, name: str, path: str,
                  lease: Callable[[ModelConfig], Awaitable[None]] | None = None) -> ModelConfig:
        """Register adapter `name` of `base_name` from directory `path`: the base is loaded
        (if it is not) and its worker reads the adapter, so a bad file fails here, not on
        the first request. Raises NotFound, BadRequest, Conflict, or the load's error."""
        base = sup.resolve(base_name)
        if base.type != "llm" or base.adapter:
            raise BadRequest(f"'{base_name}' is not an llm base model: adapters apply to llm "
                             "models", param="base")
        taken = sup.config.resolve(name) or self.resolve(sup, name)
        if taken is not None and not (taken.name == base.name and taken.adapter == name
                                      and name in self._runtime.get(base.name, {})):
            raise Conflict(f"'{name}' is already a model, alias or adapter name", param="name")
        missing = [f for f in ADAPTER_FILES if not (Path(path) / f).is_file()]
        if not Path(path).is_absolute() or missing:
            raise BadRequest(f"adapter path {path!r} must be an absolute directory holding "
                             f"{' and '.join(ADAPTER_FILES)} (missing: {', '.join(missing)})",
                             param="path")
        async with sup.lease(base) as h:
            await h.call(p.AddAdapter(rid=0, name=name, path=path),  # type: ignore[arg-type]
                         deadline=None)
            self.for_base(base.name)[name] = path
            h.runtime_adapters = self.for_base(base.name)
        return dataclasses.replace(base, adapter=name)

    async def remove(self, sup: Supervisor, name: str) -> ModelConfig:
        """Forget a runtime adapter; its base's worker (if running) drops it. Raises NotFound,
        or Conflict for a configured adapter or one decoding requests."""
        model = sup.config.resolve(name)
        if model is not None and model.adapter:
            raise Conflict(f"adapter '{name}' is defined in models.yaml: remove it there and "
                           "reload (mlx-gw reload)", param="name")
        model = self.resolve(sup, name)
        if model is None or not model.adapter:
            raise NotFound(f"no runtime adapter '{name}'", param="name")
        base = sup.config.models[model.name]
        if sup.is_ready(base):
            async with sup.lease(base, touch=False) as h:
                await h.call(p.RemoveAdapter(rid=0, name=model.adapter),  # type: ignore[arg-type]
                             deadline=None)
        self._runtime.get(base.name, {}).pop(model.adapter, None)
        return model
