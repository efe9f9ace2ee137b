"""LoRA adapters served by their base model's worker: many fine-tunes, one copy of the weights.

An adapter is what mlx-lm's trainer writes (`adapter_config.json` + `adapters.safetensors`,
read as `mlx_lm.tuner.utils.load_adapters` reads them). Instead of turning the base's linears
into mlx-lm's one-adapter `LoRALinear`, each linear an adapter touches becomes a
`MultiLoRALinear` holding every loaded adapter's (A, B, scale) beside the untouched base layer.

Which adapter each row of a batch uses travels inside the batch's own cache list: the last
entry is an `AdapterRows` (one adapter slot per row) that BatchGenerator merges, filters,
extends and extracts along with the KV caches, so it follows every row through prefill,
decode, removal and extraction without touching mlx-lm's code. `AdapterModel` (what the
BatchGenerator calls) strips it, tells the bank the rows' slots, and calls the base model.
A batch whose rows all use one adapter (or none) runs that adapter's matmuls alone; a mixed
batch gathers each row's A and B (slot 0 is the base: zeros), so different adapters share a
decode step. Slot 0 returns the base layer's output unchanged, bit for bit.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import _BaseCache, make_prompt_cache

from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.protocol import AdapterDone, AddAdapter, RemoveAdapter

log = logging.getLogger("mlxgw.worker")

BASE = 0  # the slot of "no adapter"


class AdapterError(Exception):
    """An adapter that cannot be loaded (its files, its format, or its shapes)."""


@dataclass(frozen=True)
class _Weights:
    a: mx.array  # (in, r)
    b: mx.array  # (r, out)
    scale: float


def read_adapter(path: str) -> dict[str, _Weights]:
    """The LoRA weights of the adapter directory `path`, by the module path they apply to
    ("model.layers.3.self_attn.q_proj"). Raises AdapterError naming what is wrong."""
    root = Path(path).expanduser()
    cfg_file, weights_file = root / "adapter_config.json", root / "adapters.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise AdapterError(f"adapter path {path!r} has no {f.name} (an mlx-lm LoRA "
                               "adapter directory holds adapter_config.json and "
                               "adapters.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
        kind = config.get("fine_tune_type", "lora")
        scale = float(config["lora_parameters"]["scale"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AdapterError(f"{cfg_file}: not an mlx-lm adapter config ({e!r})") from None
    if kind != "lora":
        raise AdapterError(f"{cfg_file}: fine_tune_type {kind!r} is not served as an adapter "
                           "(only 'lora'); fuse it into a model with `mlx_lm.fuse` instead")
    try:
        tensors = mx.load(str(weights_file))
    except Exception as e:  # a truncated or foreign file: MLX's own reader refuses it
        raise AdapterError(f"{weights_file}: cannot be read ({e})") from None
    out: dict[str, _Weights] = {}
    for name in sorted(tensors):
        module, _, leaf = name.rpartition(".")
        if leaf == "lora_a":
            b = tensors.get(f"{module}.lora_b")
            if b is None:
                raise AdapterError(f"{weights_file}: {name} has no matching lora_b")
            out[module] = _Weights(tensors[name], b, scale)
        elif leaf != "lora_b":
            raise AdapterError(f"{weights_file}: {name} is not a LoRA weight (lora_a, lora_b)")
    if not out:
        raise AdapterError(f"{weights_file}: holds no LoRA weights")
    return out


class AdapterRows(_BaseCache):
    """The adapter slot of each row, kept in the batch's cache list (see the module doc)."""

    def __init__(self, slots: list[int]) -> None:
        self.slots = list(slots)

    @classmethod
    def merge(cls, caches: list[AdapterRows]) -> AdapterRows:
        return cls([s for c in caches for s in c.slots])

    def filter(self, batch_indices: Any) -> None:
        idx = batch_indices.tolist() if isinstance(batch_indices, mx.array) else batch_indices
        self.slots = [self.slots[i] for i in idx]

    def extend(self, other: AdapterRows) -> None:
        self.slots = self.slots + other.slots

    def extract(self, idx: int) -> AdapterRows:
        return AdapterRows([self.slots[idx]])

    def prepare(self, **kwargs: Any) -> None:
        pass

    def finalize(self) -> None:
        pass

    @property
    def state(self) -> tuple[()]:
        return ()

    @state.setter
    def state(self, v: Any) -> None:
        pass

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return n

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return 0


def split_rows(cache: list[Any] | None) -> list[Any] | None:
    """A cache list without its AdapterRows entry (what the prompt cache keeps)."""
    if cache and isinstance(cache[-1], AdapterRows):
        return cache[:-1]
    return cache


class _Selection:
    """The slots of the batch the model is about to run, shared by every MultiLoRALinear."""

    def __init__(self) -> None:
        self.uniform: int | None = BASE  # the one slot of every row, or None when mixed
        self.rows: mx.array | None = None  # (B,) slot per row, when mixed


class MultiLoRALinear(nn.Module):
    """A base linear plus any number of LoRA adapters, chosen per row of the batch."""

    def __init__(self, linear: nn.Module, selection: _Selection) -> None:
        super().__init__()
        self.linear = linear
        self._sel = selection
        self._slots: dict[int, _Weights] = {}
        self._stacked: tuple[mx.array, mx.array, mx.array] | None = None

    def set_slot(self, slot: int, w: _Weights | None) -> None:
        if w is None:
            self._slots.pop(slot, None)
        else:
            self._slots[slot] = w
        self._stacked = None

    def _stack(self) -> tuple[mx.array, mx.array, mx.array]:
        """Every slot's A and B padded to one rank (zeros for slots without weights here),
        and the scales: what a mixed batch gathers from."""
        if self._stacked is None:
            n = max(self._slots) + 1
            r = max(w.a.shape[1] for w in self._slots.values())
            some = next(iter(self._slots.values()))
            d_in, d_out = some.a.shape[0], some.b.shape[1]
            a = [mx.zeros((d_in, r), some.a.dtype)] * n
            b = [mx.zeros((r, d_out), some.b.dtype)] * n
            s = [0.0] * n
            for slot, w in self._slots.items():
                pad = r - w.a.shape[1]
                a[slot] = mx.pad(w.a, [(0, 0), (0, pad)]) if pad else w.a
                b[slot] = mx.pad(w.b, [(0, pad), (0, 0)]) if pad else w.b
                s[slot] = w.scale
            self._stacked = (mx.stack(a), mx.stack(b), mx.array(s, some.a.dtype))
        return self._stacked

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        sel = self._sel
        if sel.uniform is not None:
            w = self._slots.get(sel.uniform)
            if w is None:  # the base, or an adapter that leaves this layer alone
                return y
            if w.b.dtype == y.dtype:  # y + scale * (x A) B in one matmul: fewer launches
                return mx.addmm(y, x @ w.a, w.b, alpha=w.scale)
            return y + (w.scale * ((x @ w.a) @ w.b)).astype(x.dtype)
        if not self._slots:
            return y
        a, b, s = self._stack()
        rows = sel.rows
        # (B, L, in) @ (in, r) @ (r, out) with each row's own A and B, read in place
        z = mx.gather_mm(mx.gather_mm(x, a, None, rows), b, None, rows)
        return y + (s[rows][:, None, None] * z).astype(x.dtype)


class AdapterBank:
    """The adapters loaded into one model, by name; each holds a slot (never reused, so a
    prompt-cache key naming a slot never matches a later adapter of the same name)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._sel = _Selection()
        self._layers: dict[str, MultiLoRALinear] = {}
        self._names: dict[str, int] = {}  # adapter name -> slot
        self._touches: dict[int, list[str]] = {}  # slot -> module paths it changes
        self._serial = itertools.count(1)
        self._modules = dict(model.named_modules())

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def slot(self, name: str) -> int | None:
        """The slot of adapter `name` ("" = the base model); None for an unknown name."""
        return BASE if not name else self._names.get(name)

    def add(self, name: str, path: str) -> int:
        """Load adapter `name` from `path` (replacing one of that name). Raises AdapterError
        for a file or shape that does not fit this model; nothing changes then."""
        weights = read_adapter(path)
        wrap: list[tuple[str, MultiLoRALinear]] = []
        for module_path, w in weights.items():
            layer = self._layers.get(module_path)
            base = layer.linear if layer is not None else self._modules.get(module_path)
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                raise AdapterError(f"adapter {name!r}: {module_path} is not a linear layer of "
                                   "this model (an adapter trained for another model?)")
            out_dims, in_dims = base.weight.shape
            if isinstance(base, nn.QuantizedLinear):
                in_dims = in_dims * 32 // base.bits
            if w.a.ndim != 2 or w.b.ndim != 2 or w.a.shape[0] != in_dims or \
                    w.b.shape[1] != out_dims or w.a.shape[1] != w.b.shape[0]:
                raise AdapterError(
                    f"adapter {name!r}: {module_path} has lora_a {tuple(w.a.shape)} and lora_b "
                    f"{tuple(w.b.shape)}, which do not fit a {in_dims}->{out_dims} linear "
                    "(an adapter trained for another model?)")
            if layer is None:
                wrap.append((module_path, MultiLoRALinear(base, self._sel)))
        if wrap:
            self._model.update_modules(tree_unflatten(wrap))
            self._layers.update(wrap)
        if name in self._names:
            self.remove(name)
        slot = next(self._serial)
        mx.eval([(w.a, w.b) for w in weights.values()])
        for module_path, w in weights.items():
            self._layers[module_path].set_slot(slot, w)
        self._names[name] = slot
        self._touches[slot] = list(weights)
        log.info("[adapters] %s loaded from %s: %d layers, rank %d", name, path, len(weights),
                 max(w.a.shape[1] for w in weights.values()))
        return slot

    def remove(self, name: str) -> bool:
        slot = self._names.pop(name, None)
        if slot is None:
            return False
        for module_path in self._touches.pop(slot):
            self._layers[module_path].set_slot(slot, None)
        return True

    def select(self, slots: list[int] | None) -> None:
        """The rows of the next model call (None: the base for every row)."""
        sel = self._sel
        if not slots or all(s == slots[0] for s in slots):
            sel.uniform, sel.rows = (slots[0] if slots else BASE), None
        else:
            sel.uniform, sel.rows = None, mx.array(slots)


class AdapterModel:
    """What BatchGenerator calls: the base model, with the adapter rows taken off the cache."""

    def __init__(self, model: nn.Module, bank: AdapterBank) -> None:
        self.model = model
        self.bank = bank
        self.layers = model.layers

    def make_cache(self) -> list[Any]:
        return [*make_prompt_cache(self.model), AdapterRows([BASE])]

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, **kwargs: Any) -> Any:
        if cache and isinstance(cache[-1], AdapterRows):
            self.bank.select(cache[-1].slots)
            cache = cache[:-1]
        else:
            self.bank.select(None)
        return self.model(inputs, cache=cache, **kwargs)


def apply_op(bank: AdapterBank, op: AddAdapter | RemoveAdapter, busy: set[int]) -> AdapterDone:
    """Carry out an AddAdapter / RemoveAdapter between steps; `busy` holds the slots rows of
    the batch decode with (an adapter in use is neither replaced nor removed). Raises
    AdmissionError, which the loop sends as the op's Error."""
    slot = bank.slot(op.name) if op.name else None
    if slot is not None and slot in busy:
        raise AdmissionError("conflict", f"adapter '{op.name}' is decoding requests; retry "
                             "once they finish")
    if isinstance(op, AddAdapter):
        try:
            bank.add(op.name, op.path)
        except AdapterError as e:
            raise AdmissionError("invalid_request", str(e)) from None
    elif slot is None:
        raise AdmissionError("not_found", f"no adapter '{op.name}' is loaded")
    else:
        bank.remove(op.name)
    return AdapterDone(op.rid, bank.names)
