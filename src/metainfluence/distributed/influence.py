"""task-IF of a whole pool computed by every process on its shard (see the package docstring)."""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingsError
from ..meta.objective import MetaProblem
from ..tasks.tensors import TaskTensors

from .process import _barrier, _dist, all_reduce_count, distribute, gather_rows, is_distributed, shard, shard_counts


# ---------------------------------------------------------------------- task-IF over processes
def _agree(flag: bool, group=None) -> tuple[bool, bool]:
    """(all, any) of a boolean over processes."""
    if not is_distributed():
        return flag, flag
    n = all_reduce_count(int(bool(flag)), group)
    world = _dist().get_world_size(group)
    return n == world, n > 0


def distributed_task_influence(
    problem: MetaProblem,
    lam: torch.Tensor,
    train_tasks_full: TaskTensors,
    val_tasks_full: TaskTensors,
    settings=None,
    *,
    task_ids: torch.Tensor | None = None,
    out: str | os.PathLike | None = None,
    pool_fingerprint: str | None = None,
    group=None,
):
    """task-IF (or any ``settings.method``) of the whole training pool, computed by every process
    on its shard of the training AND validation pools; returns the same scores on every process.

    ``train_tasks_full`` / ``val_tasks_full`` are the full pools (identical on every process); this
    process keeps the rows of :func:`shard`. ``task_ids`` are the pool's stable ids (default
    0..n-1). The result holds scores, self-influence (if asked for) and ids in full-pool order;
    ``measurement``, ``extra['s']`` and the solver diagnostics are the full-pool values, identical on
    every process (except lissa with a ``lissa_batch``: see the module docstring). Timings are this
    process's; ``diagnostics['distributed']`` records world size, backend, shard sizes and every
    process's total seconds. With ``out`` the result is written by rank 0 only (``out.safetensors``
    + ``out.json``) and the others wait for it.

    Without a process group this is exactly :func:`~metainfluence.influence.task_if.task_influence`
    on the full pools.
    """
    from ..influence.results import InfluenceSettings, settings_dict
    from ..influence.task_if import task_influence

    settings = settings or InfluenceSettings()
    settings.validate()
    n_train, n_val = len(train_tasks_full), len(val_tasks_full)
    if is_distributed():
        dist = _dist()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        backend = str(dist.get_backend(group))
    else:
        rank, world, backend = 0, 1, None
    if world > min(n_train, n_val):
        raise SettingsError(f"{world} processes but the training pool has {n_train} tasks and the validation pool {n_val}: every process needs at least one task of each — use fewer processes")
    ids_full = torch.arange(n_train) if task_ids is None else torch.as_tensor(task_ids)
    if ids_full.shape != (n_train,):
        raise SettingsError(f"task_ids has shape {tuple(ids_full.shape)} but the training pool has {n_train} tasks")
    counts_train, counts_val = shard_counts(n_train, world), shard_counts(n_val, world)
    idx_train, idx_val = shard(n_train, rank, world), shard(n_val, rank, world)

    run_settings = settings
    notes: dict[str, Any] = {}
    if settings.solver == "lissa" and settings.lissa_batch and world > 1:
        if settings.lissa_batch > min(counts_train):
            raise SettingsError(f"lissa_batch = {settings.lissa_batch} exceeds the smallest shard ({min(counts_train)} tasks on {world} processes); set lissa_batch ≤ {min(counts_train)}")
        notes["lissa"] = "each process solved with subsets of its own shard: a local estimate, s differs between processes"
        warnings.warn("lissa with lissa_batch over several processes is a per-process estimate (each shard's s differs); use cg or lowrank for one exact solve", stacklevel=2)
    if settings.solver == "lowrank" and settings.lowrank_file:
        stem = Path(settings.lowrank_file)
        every, some = _agree(stem.with_name(stem.name + ".json").exists(), group)
        if some and not every:
            raise SettingsError(f"the eigenpair file {settings.lowrank_file} is visible to some processes only; put it on a filesystem every process sees, or delete it to recompute")
        if not every and rank != 0:
            run_settings = replace(settings, lowrank_file="")  # compute together, rank 0 saves

    local_train = train_tasks_full.subset(idx_train)
    local_val = val_tasks_full.subset(idx_val)
    with distribute(problem, group):
        res = task_influence(problem, lam, local_train, local_val, run_settings, ids_full[idx_train])
        scores = gather_rows(res.scores, counts_train, group)
        self_inf = None if res.self_influence is None else gather_rows(res.self_influence, counts_train, group)
        seconds = gather_rows(torch.tensor([res.diagnostics.get("timings_s", {}).get("total", float("nan"))], dtype=torch.float64), [1] * world, group)

    diag = dict(res.diagnostics)
    diag["distributed"] = {
        "world_size": world,
        "rank": rank,
        "backend": backend,
        "train_shard_sizes": counts_train,
        "val_shard_sizes": counts_val,
        "seconds_per_rank": seconds.tolist(),
        **notes,
    }
    settings_record = dict(res.settings)
    settings_record["influence"] = settings_dict(settings)
    result = replace(res, scores=scores, task_ids=ids_full, self_influence=self_inf, settings=settings_record, diagnostics=diag)
    if out is not None:
        if rank == 0:
            result.save(out, pool_fingerprint=pool_fingerprint)
        if is_distributed():
            _barrier(group)
    return result
