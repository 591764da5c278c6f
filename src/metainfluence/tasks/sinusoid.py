"""Sinusoid regression task pools (docs/method.md §1.4; Finn et al. 2017).

Task t: amplitude A_t ~ U[0.1, 5], phase φ_t ~ U[0, π]; K support and Q query inputs x ~ U[−5, 5];
targets y = A_t · sin(x − φ_t). Inputs and targets are shaped (n, K, 1) / (n, Q, 1).
Task t is drawn by a numpy Generator seeded from (K, Q, ranges, seed) and t, so a pool is a
deterministic function of its definition and n_tasks, and shorter pools are prefixes of longer ones.
The saved form stores the amplitudes, phases and x values, so a reloaded pool is identical.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import PoolError
from .building import _positive_int
from .storage import _hash_entropy, load_pair, save_pair
from .tensors import TaskTensors

KIND = "sinusoid-pool"
_ARRAYS = ("task_ids", "amplitudes", "phases", "support_x", "query_x")
_DEFINITION_KEYS = ("kind", "dataset", "n_tasks_built", "k_shot", "q_query", "seed", "amplitude_range", "phase_range", "x_range")


@dataclass
class SinusoidPool:
    """A fixed pool of sinusoid regression tasks with stable ids (float64 parameters and inputs)."""

    k_shot: int
    q_query: int
    seed: int
    n_tasks_built: int
    amplitude_range: tuple[float, float]
    phase_range: tuple[float, float]
    x_range: tuple[float, float]
    task_ids: torch.Tensor
    amplitudes: torch.Tensor
    phases: torch.Tensor
    support_x: torch.Tensor
    query_x: torch.Tensor

    dataset = "sinusoid"
    split_kind = "task"

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])

    @property
    def n_tasks(self) -> int:
        return len(self)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """y = A sin(x − φ) for inputs shaped (n, m, 1) of this pool's tasks."""
        return self.amplitudes[:, None, None] * torch.sin(x - self.phases[:, None, None])

    def tensors(self, dataset: object = None, dtype: torch.dtype = torch.float32) -> TaskTensors:
        """support_x (n, K, 1), support_y (n, K, 1), query_x (n, Q, 1), query_y (n, Q, 1) in ``dtype``
        (targets computed in float64, then cast). ``dataset`` is ignored (kept for a uniform API)."""
        return TaskTensors(
            self.support_x.to(dtype),
            self.targets(self.support_x).to(dtype),
            self.query_x.to(dtype),
            self.targets(self.query_x).to(dtype),
        )

    def subset(self, task_ids: Sequence[int] | torch.Tensor) -> "SinusoidPool":
        ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        lookup = {int(t): i for i, t in enumerate(self.task_ids.tolist())}
        if len(ids) == 0:
            raise PoolError("subset() got no task ids; a pool needs at least one task")
        if len(torch.unique(ids)) != len(ids):
            raise PoolError("task ids passed to subset() repeat; pass each task id once")
        bad = [int(t) for t in ids.tolist() if int(t) not in lookup]
        if bad:
            raise PoolError(f"task id {bad[0]} is not in this pool; use ids from pool.task_ids")
        pos = torch.tensor([lookup[int(t)] for t in ids.tolist()], dtype=torch.long)
        return dataclasses.replace(self, **{k: getattr(self, k)[pos].clone() for k in _ARRAYS})

    def without(self, task_ids: Sequence[int] | torch.Tensor) -> "SinusoidPool":
        drop = {int(t) for t in torch.as_tensor(task_ids, dtype=torch.long).reshape(-1).tolist()}
        missing = drop - set(self.task_ids.tolist())
        if missing:
            raise PoolError(f"task id {min(missing)} is not in this pool; use ids from pool.task_ids")
        return self.subset([t for t in self.task_ids.tolist() if t not in drop])

    def summary(self) -> str:
        return (
            f"sinusoid regression: {len(self)} tasks (seed {self.seed}), K={self.k_shot} support, Q={self.q_query} query, "
            f"amplitude U{list(self.amplitude_range)}, phase U[{self.phase_range[0]:.4g}, {self.phase_range[1]:.4g}], x U{list(self.x_range)}"
        )

    def definition(self) -> dict:
        return {
            "kind": KIND,
            "dataset": "sinusoid",
            "n_tasks_built": self.n_tasks_built,
            "k_shot": self.k_shot,
            "q_query": self.q_query,
            "seed": self.seed,
            "amplitude_range": list(self.amplitude_range),
            "phase_range": list(self.phase_range),
            "x_range": list(self.x_range),
        }

    def save(self, path_stem: str | os.PathLike) -> Path:
        info = {"n_tasks": len(self), "target": "y = A * sin(x - phase)", "summary": self.summary()}
        return save_pair(path_stem, self.definition(), info, {k: getattr(self, k) for k in _ARRAYS})

    @classmethod
    def load(cls, path_stem: str | os.PathLike) -> "SinusoidPool":
        doc, arrays = load_pair(path_stem, KIND, _DEFINITION_KEYS)
        missing = [k for k in _ARRAYS if k not in arrays]
        if missing:
            raise PoolError(f"sinusoid pool tensor file lacks array(s) {', '.join(missing)}; rebuild the pool")
        pool = cls(
            k_shot=int(doc["k_shot"]),
            q_query=int(doc["q_query"]),
            seed=int(doc["seed"]),
            n_tasks_built=int(doc["n_tasks_built"]),
            amplitude_range=tuple(doc["amplitude_range"]),
            phase_range=tuple(doc["phase_range"]),
            x_range=tuple(doc["x_range"]),
            **arrays,
        )
        n = len(pool)
        if pool.support_x.shape != (n, pool.k_shot, 1) or pool.query_x.shape != (n, pool.q_query, 1) or pool.amplitudes.shape != (n,) or pool.phases.shape != (n,):
            raise PoolError("sinusoid pool arrays have shapes inconsistent with its definition; rebuild the pool")
        return pool


def _range(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise PoolError(f"{name}={value!r} is invalid; give (low, high)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise PoolError(f"{name}=({lo}, {hi}) is invalid; give finite low <= high")
    return lo, hi


def sinusoid_pool(
    n_tasks: int,
    k_shot: int = 10,
    q_query: int = 10,
    seed: int = 0,
    *,
    amplitude_range: Sequence[float] = (0.1, 5.0),
    phase_range: Sequence[float] = (0.0, math.pi),
    x_range: Sequence[float] = (-5.0, 5.0),
) -> SinusoidPool:
    """Draw a pool of ``n_tasks`` sinusoid tasks (see the module docstring)."""
    n_tasks = _positive_int(n_tasks, "n_tasks")
    k_shot = _positive_int(k_shot, "k_shot")
    q_query = _positive_int(q_query, "q_query")
    a_r, p_r, x_r = _range(amplitude_range, "amplitude_range"), _range(phase_range, "phase_range"), _range(x_range, "x_range")
    entropy = _hash_entropy(KIND, k_shot, q_query, a_r, p_r, x_r, int(seed))
    amp = np.empty(n_tasks)
    phase = np.empty(n_tasks)
    xs = np.empty((n_tasks, k_shot + q_query))
    for t in range(n_tasks):
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(t,)))
        amp[t] = rng.uniform(*a_r)
        phase[t] = rng.uniform(*p_r)
        xs[t] = rng.uniform(*x_r, size=k_shot + q_query)
    return SinusoidPool(
        k_shot=k_shot,
        q_query=q_query,
        seed=int(seed),
        n_tasks_built=n_tasks,
        amplitude_range=a_r,
        phase_range=p_r,
        x_range=x_r,
        task_ids=torch.arange(n_tasks, dtype=torch.long),
        amplitudes=torch.from_numpy(amp),
        phases=torch.from_numpy(phase),
        support_x=torch.from_numpy(xs[:, :k_shot, None].copy()),
        query_x=torch.from_numpy(xs[:, k_shot:, None].copy()),
    )
