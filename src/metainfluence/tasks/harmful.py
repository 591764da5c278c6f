"""Harmful tasks that are not mislabeled, for the detection experiment (docs/method.md §10).

Label flips are easy to find: a flipped task has a high training loss, so the loss ranking and
TracIn already reach AUC 1 on digits. The kinds here keep every label correct, so what makes them
harmful is what they do to the meta-learned model, which is what influence measures:

``duplicate``
    A seeded ``round(rho_task·n)`` tasks are replaced by near-copies of ``n_sources`` other
    training tasks: the same classes, examples and labels, plus small Gaussian input noise (sd
    ``noise`` on the [0, 1] pixel scale, a different seed per copy). The pool over-weights those
    few tasks (harm through redundancy); each copy is as easy to fit as its source, so its loss is
    ordinary.
``off-distribution``
    A seeded ``round(rho_task·n)`` tasks keep their examples and labels but get inputs moved away
    from the data distribution: ``transform='invert'`` (default) flips the contrast (x → 1 − x);
    ``transform='noise'`` adds strong Gaussian noise (sd ``noise``, default 0.5). Inversion is the
    default because it is harmful yet not trivially caught by the loss ranking: an inverted task
    keeps all its structure (edges, shapes; only the sign flips), so the adapted learner still fits
    it and its loss is only moderately raised, while its meta-gradient pulls the shared
    initialisation towards features of a distribution no test task has. Strong noise destroys the
    structure, so those tasks get a high loss and the loss ranking finds them — kept as the easy
    contrast. (A design argument, not a measurement: in the digits quick regime removing the
    inverted tasks did not change test accuracy; see docs/experiments.md.)

Representation: pools store example ids into a dataset, not pixels, so an input change is stored
as a per-task recipe (``input_transform``, ``input_noise``, ``input_seed``, ``duplicate_of``; see
:mod:`.pool`) that :meth:`TaskPool.tensors` applies when it builds the tensors. The recipe is four
small integer/float arrays saved in the pool's safetensors file, and the corruption record (with
``kind``) is in its JSON; both enter the pool's checksum and fingerprint, so a corrupted pool is
never mistaken for the clean one, and nothing is pickled. Copies and sources are task ids, so the
recipe survives ``subset``/``without``. The truth is recorded as for label corruption:
``corrupted_tasks`` flags the changed tasks (the copies, not their sources); the label masks stay
all False and the true labels equal the labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import PoolError
from .corruption import WHERE, _check_rho, _round_half_up, corrupt_labels
from .pool import INPUT_TRANSFORMS, TaskPool
from .storage import _hash_entropy

KINDS = ("labels", "duplicate", "off-distribution")
OFFDIST_TRANSFORMS = ("invert", "noise")


def _check_noise(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PoolError(f"{name}={value!r} is not a number; use a noise sd >= 0 on the [0, 1] pixel scale") from None
    if not v >= 0 or not np.isfinite(v):
        raise PoolError(f"{name}={value!r} is invalid; use a noise sd >= 0 on the [0, 1] pixel scale")
    return v


def _start(pool: TaskPool, kind: str, rho_task: float, seed: int, *extra) -> tuple[int, int, np.random.Generator]:
    """Common checks, the task count round(rho_task·n) and the seeded generator."""
    rho_task = _check_rho(rho_task, "rho_task")
    if pool.corruption is not None:
        raise PoolError("this pool is already corrupted; corrupt the clean pool instead")
    n = len(pool)
    n_tasks = _round_half_up(rho_task * n)
    if rho_task > 0 and n_tasks == 0:
        raise PoolError(f"rho_task={rho_task} of {n} tasks rounds to 0 tasks; raise rho_task or use rho_task=0")
    entropy = _hash_entropy(kind, pool.fingerprint, pool.split, pool.n_way, pool.k_shot, pool.q_query, pool.seed, pool.task_ids.tolist(), rho_task, int(seed), *extra)
    return n, n_tasks, np.random.default_rng(np.random.SeedSequence(entropy))


def _with_recipe(pool: TaskPool, flags: np.ndarray, transform: np.ndarray, noise: np.ndarray, seeds: np.ndarray, dup: np.ndarray, record: dict, **arrays) -> TaskPool:
    return dataclasses.replace(
        pool, **arrays,
        corrupted_tasks=torch.from_numpy(flags),
        input_transform=torch.from_numpy(transform.astype(np.int64)),
        input_noise=torch.from_numpy(noise.astype(np.float32)),
        input_seed=torch.from_numpy(seeds.astype(np.int64)),
        duplicate_of=torch.from_numpy(dup.astype(np.int64)),
        corruption=record,
    )


def duplicate_tasks(pool: TaskPool, rho_task: float, seed: int = 0, n_sources: int = 1, noise: float = 0.05) -> TaskPool:
    """A copy of ``pool`` in which a seeded ``round(rho_task·n)`` tasks are near-copies of
    ``n_sources`` other tasks (see the module docstring). PoolError for rho outside [0, 1], a
    negative noise, an already-corrupted pool, or too few tasks left to act as sources."""
    noise = _check_noise(noise, "noise")
    if isinstance(n_sources, bool) or not isinstance(n_sources, (int, np.integer)) or n_sources < 1:
        raise PoolError(f"n_sources={n_sources!r} is invalid; use an integer of at least 1")
    if noise == 0:
        raise PoolError("noise=0 makes exact copies, whose inputs carry no recipe to record; use a small noise such as 0.05")
    n, n_tasks, rng = _start(pool, "duplicate", rho_task, seed, int(n_sources), noise)
    if n_tasks > 0 and n - n_tasks < n_sources:
        raise PoolError(f"duplicating {n_tasks} of {n} tasks leaves fewer than n_sources={n_sources} source tasks; lower rho_task or n_sources")
    chosen = np.sort(rng.choice(n, size=n_tasks, replace=False))
    rest = np.setdiff1d(np.arange(n), chosen)
    sources = np.sort(rng.choice(rest, size=int(n_sources), replace=False)) if n_tasks else np.zeros(0, np.int64)
    src_of = sources[np.arange(n_tasks) % int(n_sources)] if n_tasks else np.zeros(0, np.int64)  # copies spread evenly
    flags = np.zeros(n, dtype=bool)
    flags[chosen] = True
    dup = np.full(n, -1, dtype=np.int64)
    dup[chosen] = pool.task_ids.numpy()[src_of]  # stable ids, so subsets keep the link
    noise_sd = np.where(flags, noise, 0.0)
    seeds = np.where(flags, rng.integers(0, 2**62, size=n), 0)  # every copy gets its own noise
    idx = torch.arange(n)
    idx[torch.from_numpy(chosen)] = torch.from_numpy(src_of)
    copied = {k: getattr(pool, k)[idx].clone() for k in ("classes", "support_ids", "support_y", "query_ids", "query_y", "support_true_y", "query_true_y")}
    record = {"kind": "duplicate", "rho_task": _check_rho(rho_task, "rho_task"), "seed": int(seed), "n_sources": int(n_sources), "noise": noise,
              "sources": [int(t) for t in pool.task_ids.numpy()[sources]]}
    return _with_recipe(pool, flags, np.zeros(n), noise_sd, seeds, dup, record, **copied)


def off_distribution_tasks(pool: TaskPool, rho_task: float, seed: int = 0, transform: str = "invert", noise: float = 0.5) -> TaskPool:
    """A copy of ``pool`` in which a seeded ``round(rho_task·n)`` tasks have their inputs moved off
    the data distribution by ``transform`` ('invert' or 'noise' with sd ``noise``); examples and
    labels unchanged (see the module docstring)."""
    if transform not in OFFDIST_TRANSFORMS:
        raise PoolError(f"transform={transform!r} is invalid; use one of {', '.join(OFFDIST_TRANSFORMS)}")
    noise = _check_noise(noise, "noise")
    if transform == "noise" and noise == 0:
        raise PoolError("transform='noise' with noise=0 changes nothing; use a noise sd such as 0.5")
    n, n_tasks, rng = _start(pool, "off-distribution", rho_task, seed, transform, noise if transform == "noise" else 0.0)
    chosen = np.sort(rng.choice(n, size=n_tasks, replace=False))
    flags = np.zeros(n, dtype=bool)
    flags[chosen] = True
    code = np.where(flags, INPUT_TRANSFORMS.index("invert"), 0) if transform == "invert" else np.zeros(n)
    noise_sd = np.where(flags, noise, 0.0) if transform == "noise" else np.zeros(n)
    seeds = np.where(flags, rng.integers(0, 2**62, size=n), 0) if transform == "noise" else np.zeros(n)
    record = {"kind": "off-distribution", "rho_task": _check_rho(rho_task, "rho_task"), "seed": int(seed), "transform": transform,
              "noise": noise if transform == "noise" else 0.0}
    return _with_recipe(pool, flags, code, noise_sd, seeds, np.full(n, -1), record)


def corrupt_tasks(pool: TaskPool, kind: str = "labels", rho_task: float = 0.2, *, seed: int = 0, rho_label: float = 0.8, where: str = "both",
                  n_sources: int = 1, duplicate_noise: float = 0.05, transform: str = "invert", offdist_noise: float = 0.5) -> TaskPool:
    """One entry point for the detection experiment: ``kind`` 'labels' (:func:`corrupt_labels`,
    uses ``rho_label``/``where``), 'duplicate' (uses ``n_sources``/``duplicate_noise``) or
    'off-distribution' (uses ``transform``/``offdist_noise``)."""
    if kind == "labels":
        return corrupt_labels(pool, rho_task, rho_label, where, seed=seed)
    if kind == "duplicate":
        return duplicate_tasks(pool, rho_task, seed=seed, n_sources=n_sources, noise=duplicate_noise)
    if kind == "off-distribution":
        return off_distribution_tasks(pool, rho_task, seed=seed, transform=transform, noise=offdist_noise)
    raise PoolError(f"kind={kind!r} is invalid; use one of {', '.join(KINDS)}")


__all__ = ["KINDS", "OFFDIST_TRANSFORMS", "WHERE", "corrupt_tasks", "duplicate_tasks", "off_distribution_tasks"]
