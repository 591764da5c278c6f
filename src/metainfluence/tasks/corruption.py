"""Label corruption for mislabeled-task detection (docs/method.md §10), with the truth recorded.

``corrupt_labels(pool, rho_task, rho_label, where, seed)`` picks exactly ``round(rho_task·n)`` tasks
(round half up) and, in each, exactly ``round(rho_label·m)`` of its m labels in the chosen sets
('support': m = N·K, 'query': m = N·Q, 'both': m = N·K + N·Q, positions drawn from the union),
replacing each with a label drawn uniformly from the other N−1 labels of the same task.
The returned pool keeps the true labels, per-label masks and per-task flags; they are saved with it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..errors import PoolError
from .pool import TaskPool
from .storage import _hash_entropy

WHERE = ("both", "support", "query")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _check_rho(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PoolError(f"{name}={value!r} is not a number; use a fraction in [0, 1]") from None
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise PoolError(f"{name}={value!r} is outside [0, 1]; use a fraction in [0, 1]")
    return v


def corrupt_labels(pool: TaskPool, rho_task: float, rho_label: float, where: str = "both", seed: int = 0) -> TaskPool:
    """A copy of ``pool`` with a seeded fraction of its tasks mislabeled (see the module docstring).

    ``rho_task = 0`` gives an unchanged copy with an (empty) corruption record. PoolError for
    rho outside [0, 1], an unknown ``where``, N < 2, an already-corrupted pool, or settings that
    would corrupt no label in a selected task (or select no task although rho_task > 0).
    """
    rho_task = _check_rho(rho_task, "rho_task")
    rho_label = _check_rho(rho_label, "rho_label")
    if where not in WHERE:
        raise PoolError(f"where={where!r} is invalid; use one of {', '.join(WHERE)}")
    if pool.n_way < 2:
        raise PoolError(f"label corruption needs at least 2 classes per task, the pool is {pool.n_way}-way; use n_way >= 2")
    if pool.corruption is not None:
        raise PoolError("this pool is already corrupted; corrupt the clean pool instead")
    n = len(pool)
    s_len, q_len = pool.support_y.shape[1], pool.query_y.shape[1]
    m = {"both": s_len + q_len, "support": s_len, "query": q_len}[where]
    n_tasks = _round_half_up(rho_task * n)
    n_labels = _round_half_up(rho_label * m)
    if rho_task > 0 and n_tasks == 0:
        raise PoolError(f"rho_task={rho_task} of {n} tasks rounds to 0 tasks; raise rho_task or use rho_task=0")
    if n_tasks > 0 and n_labels == 0:
        raise PoolError(f"rho_label={rho_label} of the {m} {where} labels of a task rounds to 0 labels; raise rho_label")

    entropy = _hash_entropy("corrupt", pool.fingerprint, pool.split, pool.n_way, pool.k_shot, pool.q_query, pool.seed, pool.task_ids.tolist(), rho_task, rho_label, where, int(seed))
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    chosen = np.sort(rng.choice(n, size=n_tasks, replace=False))
    true = torch.cat([pool.support_y, pool.query_y], 1).numpy()
    labels = true.copy()
    mask = np.zeros_like(true, dtype=bool)
    offset = {"both": 0, "support": 0, "query": s_len}[where]
    for t in chosen:
        pos = offset + rng.choice(m, size=n_labels, replace=False)
        shift = rng.integers(1, pool.n_way, size=n_labels)
        labels[t, pos] = (true[t, pos] + shift) % pool.n_way
        mask[t, pos] = True
    flags = np.zeros(n, dtype=bool)
    flags[chosen] = True
    record = {"rho_task": rho_task, "rho_label": rho_label, "where": where, "seed": int(seed), "labels_per_task": n_labels}
    lab = torch.from_numpy(labels)
    msk = torch.from_numpy(mask)
    return dataclasses.replace(
        pool,
        support_y=lab[:, :s_len].clone(),
        query_y=lab[:, s_len:].clone(),
        support_true_y=pool.support_y.clone(),
        query_true_y=pool.query_y.clone(),
        support_corrupted=msk[:, :s_len].clone(),
        query_corrupted=msk[:, s_len:].clone(),
        corrupted_tasks=torch.from_numpy(flags),
        corruption=record,
    )
