"""The Load message a worker gets for one model: every per-model setting the worker needs.

One function, so a new per-model setting (models.yaml -> worker) is added in one place.
"""

from __future__ import annotations

from mlx_gw.config import ModelConfig
from mlx_gw.worker import protocol as p


def load_message(model: ModelConfig, *, memory_limit_bytes: int | None,
                 adapters: dict[str, str] | None = None) -> p.Load:
    """`model`'s Load; `adapters` adds runtime LoRA adapters to those models.yaml lists."""
    return p.Load(
        name=model.name, type=model.type, path=model.path,
        dtype=model.dtype, max_batch=model.max_batch,
        context_length=model.context_length,
        memory_limit_bytes=memory_limit_bytes,
        prompt_cache_bytes=model.prompt_cache.max_bytes,
        prompt_cache_disk=model.prompt_cache.disk or "",
        prompt_cache_disk_bytes=model.prompt_cache.disk_max_bytes,
        warm_prompts=list(model.warm_prompts),
        kv_bits=model.kv_bits or 0, kv_group_size=model.kv_group_size,
        warmup=model.warmup,
        adapters={**dict(model.adapters), **(adapters or {})},
        **_speculative(model),
    )


def _speculative(model: ModelConfig) -> dict[str, str | int]:
    sp = model.speculative
    if sp is None:
        return {}
    return {"speculative": sp.method, "spec_tokens": sp.num_tokens,
            "spec_draft_path": sp.draft_path or "", "spec_draft_dtype": sp.draft_dtype}
