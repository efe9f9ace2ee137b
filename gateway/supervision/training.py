"""Fine-tuning jobs, each in its own worker process that the supervisor owns like a model's.

A job leases a model of its own: named by the job id, type "train", its base's path and
dtype, `max_batch` its batch_size and `context_length` a bound on its longest batch (what
`memory.estimate_bytes` turns into the job's need). So everything a load gets, a job gets
unchanged: admission under memory_limit (it waits for room or fails with the load's 503), the
warm spare, heartbeats (its memory in /api/ps), the crash watch (a dead trainer fails the job),
and the shutdown that stops every worker. The lease is held for the whole run: nothing
evicts a job. The worker runs the `Train` (worker/engines/trainer.py) and reports
`TrainEvent`s; the adapter is written to `adapters/.NAME.partial-ID` under the state dir,
moved to `adapters/NAME` once saved, and registered with its base's worker through the same
path as `POST /api/adapters`, so it is servable as NAME at once (and again after a restart:
`restore` re-registers what `adapters/` holds). Cancelling ends the worker and deletes the
partial files. `fuse` runs `Fuse` in a worker of the same kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.errors import (
    BadRequest,
    Conflict,
    GatewayError,
    InternalError,
    NotFound,
    Unavailable,
)
from mlx_gw.gateway.supervision import training_data as td
from mlx_gw.gateway.supervision.adapters import ADAPTER_FILES
from mlx_gw.gateway.supervision.jobs import Job
from mlx_gw.gateway.supervision.memory import estimate_bytes
from mlx_gw.gateway.supervision.supervisor import Supervisor
from mlx_gw.worker import protocol as p

log = logging.getLogger("mlxgw.training")

TRAIN_DEADLINE_S = 30 * 86400.0  # a job's run has no request_timeout; cancel ends it
FUSE_DEADLINE_S = 3600.0
CANCEL_WAIT_S = 30.0  # DELETE waits this long for the job's worker to be gone
JOB_FILE = "mlxgw-job.json"  # beside a trained adapter: its base, for `restore`
MiB = 2**20


def state_home() -> Path:
    """The gateway's state directory: $MLX_GW_HOME, else ~/.mlx-gw (as the CLI's)."""
    return Path(os.environ.get("MLX_GW_HOME") or Path.home() / ".mlx-gw")


def job_model(name: str, base: ModelConfig, batch: int, tokens: int) -> ModelConfig:
    """The model a job's worker loads: its base's weights, with the job's shape."""
    return ModelConfig(name=name, type="train", path=base.path, dtype=base.dtype,  # type: ignore[arg-type]
                       max_batch=batch, context_length=tokens, keep_alive=None, warmup="off")


class Trainings:
    def __init__(self, sup: Supervisor, home: Path | None = None) -> None:
        self.sup = sup
        self.home = home or state_home()
        self.adapters_dir = self.home / "adapters"
        self.jobs: dict[str, Job] = {}

    # ------------------------------------------------------------------ checks

    def _base(self, name: str) -> ModelConfig:
        try:
            base = self.sup.resolve(name)
        except NotFound as e:
            e.param = "base"  # the field of this body that names it
            raise
        if base.type != "llm" or base.adapter or base.distributed is not None:
            raise BadRequest(f"'{name}' is not a single-process llm base model: fine-tuning "
                             "and fusing apply to llm models", param="base")
        return base

    def _check_name(self, name: str) -> None:
        if not td.ADAPTER_NAME.match(name):
            raise BadRequest(f"adapter_name {name!r}: use letters, digits, '.', '_' and '-' "
                             "(up to 64, starting with a letter or digit)", param="adapter_name")
        sup = self.sup
        if sup.config.resolve(name) or sup.adapters.resolve(sup, name):
            raise Conflict(f"'{name}' is already a model, alias or adapter name",
                           param="adapter_name")
        if any(j.adapter_name == name and not j.finished for j in self.jobs.values()):
            raise Conflict(f"a training job for adapter '{name}' is already running",
                           param="adapter_name")
        if (self.adapters_dir / name).exists():
            raise Conflict(f"{self.adapters_dir / name} already exists: pick another "
                           "adapter_name or delete it", param="adapter_name")

    async def _rows(self, source: td.DataSource, param: str) -> td.Rows:
        if isinstance(source, str):
            return await asyncio.to_thread(td.read_jsonl, source, param)
        return source

    # ------------------------------------------------------------------ jobs

    async def submit(self, spec: td.TrainRequest) -> Job:
        """Check the request, write its rows, start the job; raises the 4xx/503 errors."""
        base = self._base(spec.base)
        self._check_name(spec.adapter_name)
        td.check_layers(base.path, spec.num_layers)
        opts = {"batch_size": spec.batch_size, "mask_prompt": spec.mask_prompt}
        train = await self._rows(spec.data, "data")
        longest = td.check_rows(train, "data", **opts)
        valid = None
        if spec.valid is not None:
            valid = await self._rows(spec.valid, "valid")
            longest = max(longest, td.check_rows(valid, "valid", **opts))
        self._check_name(spec.adapter_name)  # again: another job may have taken it meanwhile
        job_id = f"train-{secrets.token_hex(4)}"
        model = job_model(job_id, base, spec.batch_size,
                          td.sequence_bound(longest, spec.max_seq_length))
        need = await asyncio.to_thread(estimate_bytes, model, self.sup.room.baseline)
        if need > self.sup.room.limit:
            raise Unavailable(f"training '{base.name}' with batch_size {spec.batch_size} needs "
                              f"about {need / MiB:.0f} MiB, more than the whole memory_limit "
                              f"({self.sup.room.limit / MiB:.0f} MiB): lower batch_size or "
                              "max_seq_length", code="model_too_large")
        data_dir = self.home / "train" / job_id
        await asyncio.to_thread(td.write_rows, data_dir / "train.jsonl", train)
        if valid is not None:
            await asyncio.to_thread(td.write_rows, data_dir / "valid.jsonl", valid)
        params = {k: v for k, v in msgspec_dict(spec).items() if k not in ("data", "valid")}
        job = Job(job_id, base.name, spec.adapter_name, spec.iters, params, need)
        job.data_rows = {"train": len(train), "valid": len(valid or [])}
        self.jobs[job_id] = job
        job.emit("queued", estimate_bytes=need)
        job.task = asyncio.create_task(self._run(job, model, spec, data_dir))
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no training job '{job_id}'", param="id")
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; returns once its worker is gone (bounded)."""
        job = self.get(job_id)
        if job.finished:
            raise Conflict(f"training job '{job_id}' has already {job.status}", param="id")
        assert job.task is not None
        job.task.cancel()
        await asyncio.wait({job.task}, timeout=CANCEL_WAIT_S)
        return job

    async def close(self) -> None:
        """Cancel every running job (the gateway is stopping)."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.finished]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)

    async def _run(self, job: Job, model: ModelConfig, spec: td.TrainRequest,
                   data_dir: Path) -> None:
        sup = self.sup
        h = sup.handle(model)
        job.handle = h
        partial = self.adapters_dir / f".{job.adapter_name}.partial-{job.id}"
        final = self.adapters_dir / job.adapter_name

        async def waiting() -> None:  # while the lease waits: room granted, now loading
            if h.admitted and job.phase == "queued":
                job.emit("loading")

        try:
            async with sup.lease(model, heartbeat=waiting) as h:
                try:
                    if job.phase == "queued":
                        job.emit("loading")
                    job.pid = h.pid
                    req = p.Train(rid=0, data_dir=str(data_dir), adapter_dir=str(partial),
                                  num_layers=spec.num_layers or 0,
                                  **{k: getattr(spec, k) for k in _TRAIN_FIELDS})
                    deadline = time.monotonic() + TRAIN_DEADLINE_S
                    async with contextlib.aclosing(h.results(req, deadline=deadline)) as evs:  # type: ignore[arg-type]
                        async for ev in evs:
                            job.apply(ev)
                finally:
                    await asyncio.shield(h.stop("unload", reason="training job ended"))
            await asyncio.to_thread(_publish, partial, final, job, spec.base)
            job.adapter_path = str(final)
            await sup.adapters.add(sup, job.base, job.adapter_name, str(final))
            job.finish("completed")
        except asyncio.CancelledError:
            job.finish("cancelled")
        except GatewayError as e:
            job.finish("failed", e)
        except Exception as e:  # a file move that failed: the job fails, the gateway serves on
            log.exception("[training] job %s failed", job.id)
            job.finish("failed", InternalError(f"{type(e).__name__}: {e}"))
        finally:
            await asyncio.shield(h.stop("unload", reason=f"training job {job.status}"))
            await asyncio.to_thread(shutil.rmtree, partial, True)
            await asyncio.to_thread(shutil.rmtree, data_dir, True)
            log.info("[training] job %s %s after %d/%d iterations", job.id, job.status,
                     job.iteration, job.iters)

    # ------------------------------------------------------------------ adapters

    def restore(self) -> list[str]:
        """Serve again the adapters earlier jobs left in adapters/ (their base still
        configured, their name free); added to the base's later loads, loading nothing now."""
        restored = []
        for f in sorted(self.adapters_dir.glob(f"*/{JOB_FILE}")):
            try:
                meta = json.loads(f.read_text())
                base, name = meta["base"], f.parent.name
            except (OSError, ValueError, KeyError, TypeError):
                continue
            sup = self.sup
            if base in sup.config.models and not (sup.config.resolve(name)
                                                  or sup.adapters.resolve(sup, name)):
                sup.adapters.for_base(base)[name] = str(f.parent)
                restored.append(name)
        return restored

    async def fuse(self, spec: td.FuseRequest) -> dict[str, Any]:
        """Merge an adapter into its base and write the model to `spec.output`; blocks until
        written. Raises 400/404/409, or the worker's error."""
        sup = self.sup
        row = next((r for r in sup.adapters.listing(sup)
                    if spec.adapter in (r["name"], f"{r['base']}:{r['name']}")), None)
        if row is not None:
            if spec.base is not None and spec.base != row["base"]:
                raise BadRequest(f"adapter '{spec.adapter}' belongs to '{row['base']}', not "
                                 f"'{spec.base}'", param="base")
            base_name, adapter_dir = str(row["base"]), str(row["path"])
        elif not (td.usable_path(spec.adapter) and td.usable_path(spec.output)):
            raise BadRequest("adapter and output must be usable paths (no NUL byte, not too "
                             "long)", param="adapter")
        elif Path(spec.adapter).is_absolute():
            if not all((Path(spec.adapter) / f).is_file() for f in ADAPTER_FILES):
                raise BadRequest(f"{spec.adapter} is not an adapter directory (it needs "
                                 f"{' and '.join(ADAPTER_FILES)})", param="adapter")
            if spec.base is None:
                raise BadRequest("'base' is needed with an adapter directory", param="base")
            base_name, adapter_dir = spec.base, spec.adapter
        else:
            raise NotFound(f"no adapter '{spec.adapter}'", param="adapter")
        base = self._base(base_name)
        out = Path(spec.output)
        if not td.usable_path(spec.output):
            raise BadRequest(f"output {spec.output!r} is not a usable path", param="output")
        if not out.is_absolute():
            raise BadRequest(f"output {spec.output!r} must be an absolute path", param="output")
        if out.exists():
            raise Conflict(f"output {out} already exists", param="output")
        if not out.parent.is_dir():
            raise BadRequest(f"output's parent {out.parent} is not a directory", param="output")
        tag = secrets.token_hex(4)
        partial = out.parent / f".{out.name}.partial-{tag}"
        model = job_model(f"fuse-{tag}", base, 1, 1)
        h = sup.handle(model)
        try:
            async with sup.lease(model) as h:
                try:
                    ev = await h.call(p.Fuse(rid=0, adapter_dir=adapter_dir,  # type: ignore[arg-type]
                                             output_dir=str(partial)),
                                      deadline=time.monotonic() + FUSE_DEADLINE_S)
                finally:
                    await asyncio.shield(h.stop("unload", reason="fuse ended"))
            await asyncio.to_thread(os.replace, partial, out)
        finally:
            await asyncio.shield(h.stop("unload", reason="fuse ended"))
            await asyncio.to_thread(shutil.rmtree, partial, True)
        return {"base": base.name, "adapter": spec.adapter, "adapter_path": adapter_dir,
                "output": str(out), "fused_layers": ev.detail.get("fused_layers", 0),  # type: ignore[union-attr]
                "models_yaml": {"type": "llm", "path": str(out)}}

    def follow(self, job_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        return self.get(job_id).follow(after)


_TRAIN_FIELDS = ("iters", "batch_size", "learning_rate", "rank", "scale", "dropout",
                 "max_seq_length", "steps_per_report", "steps_per_eval",
                 "val_batches", "mask_prompt", "seed")


def msgspec_dict(spec: Any) -> dict[str, Any]:
    return {f: getattr(spec, f) for f in spec.__struct_fields__}


def _publish(partial: Path, final: Path, job: Job, base: str) -> None:
    """The saved adapter moved to its name (with what `restore` needs beside it)."""
    if final.exists():
        raise Conflict(f"{final} appeared while the job ran (another adapter of that name)")
    (partial / JOB_FILE).write_text(json.dumps({"base": job.base, "job": job.id,
                                                "requested_base": base,
                                                "params": job.params}, indent=2))
    os.replace(partial, final)

