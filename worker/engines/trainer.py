"""Fine-tuning in a worker: mlx-lm's LoRA trainer, one iteration per engine step.

A worker loaded with type "train" holds a base model and runs one `Train` (or one `Fuse`)
for the gateway's training job. The pieces are mlx-lm's own: `linear_to_lora_layers` turns
the last `num_layers` blocks' linears into LoRA layers, `mlx_lm.tuner.datasets` reads the
rows (chat `messages`, `prompt`/`completion`, or `text`, as `mlx_lm.lora` does),
`iterate_batches` and `default_loss` feed the compiled step that `mlx_lm.tuner.trainer.train`
builds. Only its loop is split here: `train()` runs every iteration in one call, while the
worker loop must keep answering between iterations (heartbeats carry the job's memory to
/api/ps, a Cancel or Shutdown ends it after the current iteration). The report fields
(loss, iterations/s, tokens/s, trained tokens, peak memory) are the ones `train()` gives
its callback. The adapter is saved as `mlx_lm.lora` saves it (adapters.safetensors +
adapter_config.json), so `mlx_lm.tuner.utils.load_adapters`, `mlx_lm.fuse` and the LLM
engine's AdapterBank all read it. `Fuse` merges an adapter into the base as `mlx_lm.fuse`
does and saves the whole model with `mlx_lm.utils.save`.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_gw.worker.engines.base import AdmissionError
from mlx_gw.worker.protocol import Error, Fuse, Load, Train, TrainEvent

log = logging.getLogger("mlxgw.worker")
DEFAULT_LORA_LAYERS = 16  # mlx_lm.lora's num_layers default


def _rows(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Job:
    """One Train: the LoRA model, the optimizer, the compiled step and the report counters."""

    def __init__(self, model: nn.Module, tokenizer: Any, req: Train) -> None:
        from mlx_lm.tuner.datasets import CacheDataset, create_dataset
        from mlx_lm.tuner.trainer import default_loss, iterate_batches
        from mlx_lm.tuner.utils import linear_to_lora_layers

        self.req = req
        self.rid = req.rid
        mx.random.seed(req.seed)
        np.random.seed(req.seed)
        data = Path(req.data_dir)
        opts = SimpleNamespace(mask_prompt=req.mask_prompt)
        try:
            train = CacheDataset(create_dataset(_rows(data / "train.jsonl"), tokenizer, opts))
            valid_file = data / "valid.jsonl"
            self.valid = (CacheDataset(create_dataset(_rows(valid_file), tokenizer, opts))
                          if valid_file.is_file() else None)
        except (OSError, ValueError, KeyError) as e:
            raise AdmissionError("invalid_request", f"training data: {e}") from None
        layers = len(model.layers)
        if req.num_layers > layers:
            raise AdmissionError("invalid_request", f"num_layers {req.num_layers} is more than "
                                 f"the model's {layers} layers (-1 trains them all)")
        self.num_layers = (layers if req.num_layers < 0 else
                           req.num_layers or min(DEFAULT_LORA_LAYERS, layers))
        self.lora = {"rank": req.rank, "scale": req.scale, "dropout": req.dropout}
        model.freeze()
        linear_to_lora_layers(model, self.num_layers, self.lora)
        self.model = model
        self.trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        self.optimizer = optim.Adam(learning_rate=req.learning_rate)
        self._loss = default_loss
        self._iterate = iterate_batches
        loss_and_grad = nn.value_and_grad(model, default_loss)
        self.state = [model.state, self.optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def step(batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
            (loss, toks), grad = loss_and_grad(model, batch, lengths)
            self.optimizer.update(model, grad)
            return loss, toks

        self._step = step
        self.batches = iterate_batches(dataset=train, batch_size=req.batch_size,
                                       max_seq_length=req.max_seq_length, loop=True)
        self.sizes = {"train": len(train), "valid": len(self.valid) if self.valid else 0,
                      "trainable_parameters": self.trainable, "num_layers": self.num_layers}
        self.it = 0  # iterations done
        self.started = False
        self.saved = False
        self._reset()
        self.trained_tokens = 0

    def _reset(self) -> None:
        self.losses, self.tokens, self.steps, self.seconds = 0.0, 0, 0, 0.0

    def _event(self, kind: str, **fields: Any) -> TrainEvent:
        return TrainEvent(rid=self.rid, kind=kind, iteration=self.it, **fields)

    def _validate(self) -> TrainEvent:
        from mlx_lm.tuner.trainer import evaluate

        t0 = time.perf_counter()
        val = evaluate(model=self.model, dataset=self.valid, batch_size=self.req.batch_size,
                       num_batches=self.req.val_batches,
                       max_seq_length=self.req.max_seq_length)
        self.model.train()
        return self._event("val", val_loss=val,
                           detail={"seconds": round(time.perf_counter() - t0, 3)})

    def step(self) -> list[TrainEvent]:
        """The next slice: set-up report, one iteration (with its reports), or the save."""
        req = self.req
        if not self.started:
            self.started = True
            out = [self._event("training", detail={**self.sizes, "iters": req.iters})]
            if self.valid is not None and len(self.valid) >= req.batch_size:
                out.append(self._validate())  # the loss before any training
            self.model.train()
            return out
        if self.it >= req.iters:
            return self._save()
        t0 = time.perf_counter()
        batch, lengths = next(self.batches)
        loss, toks = self._step(batch, lengths)
        mx.eval(self.state, loss, toks)
        self.it += 1
        self.seconds += time.perf_counter() - t0
        self.losses += loss.item()
        self.tokens += int(toks.item())
        self.steps += 1
        out: list[TrainEvent] = []
        last = self.it == req.iters
        if self.it % req.steps_per_report == 0 or last:
            self.trained_tokens += self.tokens
            out.append(self._event(
                "progress", loss=self.losses / self.steps,
                learning_rate=float(self.optimizer.learning_rate.item()),
                iterations_per_second=self.steps / self.seconds,
                tokens_per_second=self.tokens / self.seconds,
                trained_tokens=self.trained_tokens,
                peak_memory_bytes=int(mx.get_peak_memory())))
            self._reset()
        if self.valid is not None and len(self.valid) >= req.batch_size and (
                last or self.it % req.steps_per_eval == 0):
            out.append(self._validate())
        if last:
            out.append(self._event("saving"))
        return out

    def _save(self) -> list[TrainEvent]:
        """adapters.safetensors and adapter_config.json, as mlx_lm.lora writes them."""
        req = self.req
        out = Path(req.adapter_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = dict(tree_flatten(self.model.trainable_parameters()))
        mx.save_safetensors(str(out / "adapters.safetensors"), weights)
        config = {"fine_tune_type": "lora", "num_layers": self.num_layers,
                  "lora_parameters": self.lora, "iters": req.iters,
                  "batch_size": req.batch_size, "learning_rate": req.learning_rate,
                  "max_seq_length": req.max_seq_length, "mask_prompt": req.mask_prompt,
                  "seed": req.seed}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        self.saved = True
        return [self._event("saved", path=str(out), trained_tokens=self.trained_tokens,
                            final=True)]


class TrainerEngine:
    """The engine of a "train" worker: the base model, and the one Train or Fuse it runs."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: dict[str, Any],
                 path: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.path = path
        self.context_length = int(config.get("max_position_embeddings") or 0)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._job: _Job | None = None
        self._fuse: Fuse | None = None
        self._used = False  # a worker trains once: its model now carries LoRA layers

    @classmethod
    def from_load(cls, load: Load) -> TrainerEngine:
        from mlx_gw.worker.engines.llm import load_model

        model, tokenizer, config = load_model(load)
        log.info("[worker:%s] base %s loaded for training", load.name, load.path)
        return cls(model, tokenizer, config, load.path)

    def submit(self, req: Any) -> None:
        if not isinstance(req, (Train, Fuse)):
            raise AdmissionError("unsupported", "a training worker runs Train and Fuse only")
        if self._used:
            raise AdmissionError("conflict", "this training worker has already run its job")
        if isinstance(req, Train):
            self._job = _Job(self.model, self.tokenizer, req)
        else:
            self._fuse = req
        self._used = True

    def step(self) -> list[TrainEvent | Error]:
        if self._fuse is not None:
            req, self._fuse = self._fuse, None
            try:
                return [self._fused(req)]
            except AdmissionError as e:
                return [Error(rid=req.rid, code=e.code, message=e.message)]
            except Exception as e:  # a save that fails (disk full, permissions)
                log.exception("[trainer] fuse failed")
                return [Error(rid=req.rid, code="internal", message=f"fuse failed: {e}")]
        job = self._job
        if job is None:
            return []
        out = job.step()
        if job.saved:
            self._job = None
        return out

    def _fused(self, req: Fuse) -> TrainEvent:
        """The base with the adapter merged in, saved as a model dir (mlx_lm.fuse's steps)."""
        from mlx_lm.tuner.utils import load_adapters
        from mlx_lm.utils import dequantize_model, save

        try:
            model = load_adapters(self.model, req.adapter_dir)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AdmissionError("invalid_request",
                                 f"adapter {req.adapter_dir}: {type(e).__name__}: {e}") from None
        # Quantized weights whose config says nothing of it (a GGUF base) would save a dir
        # nothing can load: those are written dequantized, as `mlx_lm.fuse --dequantize`.
        config = dict(self.config)
        dequantize = "quantization" not in config and any(
            isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            for _, m in model.named_modules())
        fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
                 if hasattr(m, "fuse")]
        if fused:
            model.update_modules(tree_unflatten(fused))
        if dequantize:
            model = dequantize_model(model)
        save(req.output_dir, self.path, model, self.tokenizer, config, donate_model=False)
        return TrainEvent(rid=req.rid, kind="fused", path=req.output_dir,
                          detail={"fused_layers": len(fused), "dequantized": dequantize},
                          final=True)

    def cancel(self, rid: int) -> None:
        if self._job is not None and self._job.rid == rid:
            log.info("[trainer] job cancelled after %d iterations", self._job.it)
            self._job = None
        if self._fuse is not None and self._fuse.rid == rid:
            self._fuse = None

    @property
    def busy(self) -> bool:
        return self._job is not None or self._fuse is not None

    @property
    def in_flight(self) -> int:
        return int(self.busy)

    def abort_all(self) -> list[int]:
        rids = [r.rid for r in (self._job, self._fuse) if r is not None]
        self._job = self._fuse = None
        return rids

    def close(self) -> None:
        self.abort_all()
