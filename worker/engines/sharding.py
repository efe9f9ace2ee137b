"""The model shard of one rank of a distributed worker (mlx.distributed, via mlx-lm).

`use_group` is called once, by worker/distributed.py, before the model loads; `load_model` then
loads lazily and `shard` keeps this rank's part: tensor parallel where the architecture has
mlx-lm's `shard` (attention heads and MLP columns split, one all_sum per block), else pipeline
parallel where it has `model.pipeline` (layers split); any other architecture is refused with
a clear error at load. Outside a distributed worker both are no-ops.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

log = logging.getLogger("mlxgw.worker")

_group: Any = None  # mx.distributed.Group of this worker's ranks, or None


def use_group(group: Any) -> None:
    global _group
    _group = group


def active() -> bool:
    return _group is not None


def shard(model: Any) -> None:
    """Keep this rank's part of `model` (in place) and materialize it."""
    if _group is None:
        return
    n = _group.size()
    full = _nbytes(model)
    if hasattr(model, "shard"):
        args = getattr(model, "args", None)
        heads = [getattr(args, k, None) for k in ("num_attention_heads", "num_key_value_heads")]
        if any(h is not None and h % n for h in heads):
            raise ValueError(f"tensor parallel over {n} ranks splits attention heads evenly, and "
                             f"this model has {heads[0]} query / {heads[1]} key-value heads: "
                             f"pick ranks that divide both")
        model.shard(_group)
        how = "tensor"
    elif hasattr(getattr(model, "model", None), "pipeline"):
        model.model.pipeline(_group)
        how = "pipeline"
    else:
        raise ValueError(f"mlx-lm cannot shard the {type(model).__module__} architecture "
                         f"(no tensor or pipeline parallel support): serve it without "
                         f"`distributed`")
    mx.eval(model.parameters())
    log.info("[rank %d/%d] holds a %s-parallel shard: %d of %d parameter bytes", _group.rank(),
             n, how, _nbytes(model), full)
    # Every rank has its shard before any serves: a slow rank fails here, not mid-request.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=_group, stream=mx.cpu))


def _nbytes(model: Any) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
