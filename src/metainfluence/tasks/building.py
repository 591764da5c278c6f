"""Drawing a classification task pool from a dataset (:func:`build_pool`); the pool itself, its saved
form and its checks are :mod:`.pool`."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import PoolError
from .pool import KIND, SPLITS, TaskPool
from .storage import _hash_entropy

if TYPE_CHECKING:  # pragma: no cover
    from ..data.base import ClassDataset


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PoolError(f"{name}={value!r} is invalid; use an integer of at least {minimum}")
    return int(value)


def _own_folders(dataset: "ClassDataset") -> str:
    """The layout of an image-folder dataset with class-disjoint splits ('' for other datasets)."""
    return str(dataset.identity.get("layout", "")) if dataset.name == "image-folder" and dataset.split_kind == "class" else ""


def _too_few_classes_advice(dataset: "ClassDataset", n_way: int) -> str:
    layout = _own_folders(dataset)
    if layout == "class-folders":
        return (f" (with the seeded ≈60/20/20 class split, about {5 * n_way} class folders: 5·N); lower --n-way, add class folders, "
                f"or --split-by example puts every class in every split")
    if layout == "split-folders":
        return f" ({n_way} class folders in each of train/, val/, test/); lower --n-way, or add class folders"
    return "; lower --n-way"


def _same_classes_warning(dataset: "ClassDataset", split: str, n_way: int, n_tasks: int) -> str:
    """Every task of a split with exactly N classes holds the same classes: say what an interval over them measures."""
    layout = _own_folders(dataset)
    remedy = ("more class folders, or --split-by example" if layout == "class-folders" else
              f"more class folders in {split}/" if layout == "split-folders" else "a lower --n-way, or a split with more classes")
    return (f"the {split!r} split of {dataset.name} has exactly {n_way} classes, so all {n_tasks} tasks use the same {n_way} classes "
            f"(only their examples differ); intervals over tasks understate the spread over classes — {remedy}")


def build_pool(
    dataset: "ClassDataset",
    split: str,
    n_way: int,
    k_shot: int,
    q_query: int,
    n_tasks: int,
    seed: int = 0,
) -> TaskPool:
    """Draw ``n_tasks`` N-way K-shot Q-query tasks from ``split`` of ``dataset``.

    Each task: N distinct classes of the split (random order = label order), then for each class
    K + Q distinct examples of that split (first K support, last Q query). Deterministic in
    (dataset fingerprint, split, N, K, Q, seed) and the task id (see the module docstring).
    """
    if split not in SPLITS:
        raise PoolError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    n_tasks = _positive_int(n_tasks, "n_tasks")
    n_way = _positive_int(n_way, "n_way", 2)
    k_shot = _positive_int(k_shot, "k_shot")
    q_query = _positive_int(q_query, "q_query")
    seed = int(seed)
    classes = np.asarray(dataset.classes(split), dtype=np.int64)
    if n_way > len(classes):
        raise PoolError(f"n_way={n_way} is larger than the {len(classes)} classes in the {split!r} split of {dataset.name}; "
                        f"{n_way}-way tasks need {n_way} classes in each split{_too_few_classes_advice(dataset, n_way)}")
    if len(classes) == n_way and n_tasks > 1 and split != "train" and dataset.split_kind == "class":
        warnings.warn(_same_classes_warning(dataset, split, n_way, n_tasks), stacklevel=2)
    per_class = [dataset.examples_of(int(c), split).numpy() for c in classes]
    smallest = min(len(e) for e in per_class)
    if k_shot + q_query > smallest:
        small = [c for c, e in zip(classes.tolist(), per_class) if len(e) < k_shot + q_query]
        names = getattr(dataset, "class_names", None) or [str(c) for c in range(dataset.num_classes)]
        which = ", ".join(str(names[c]) for c in small[:3]) + (f" and {len(small) - 3} more" if len(small) > 3 else "")
        raise PoolError(
            f"k_shot + q_query = {k_shot + q_query} is larger than the {smallest} examples of the smallest class in the {split!r} split of {dataset.name} "
            f"({len(small)} class{'es' if len(small) > 1 else ''} too small: {which}); "
            + ("lower --k-shot or --q-query" if split == "train" else f"lower --eval-q-query (queries per class of the val/test pools; at most {smallest - k_shot} here) or --k-shot")
        )
    entropy = _hash_entropy(KIND, dataset.fingerprint, split, n_way, k_shot, q_query, seed)
    m = k_shot + q_query
    cls_out = np.empty((n_tasks, n_way), dtype=np.int64)
    sup = np.empty((n_tasks, n_way, k_shot), dtype=np.int64)
    qry = np.empty((n_tasks, n_way, q_query), dtype=np.int64)
    for t in range(n_tasks):
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(t,)))
        chosen = rng.choice(len(classes), size=n_way, replace=False)
        cls_out[t] = classes[chosen]
        for j, ci in enumerate(chosen):
            ex = per_class[ci]
            pick = ex[rng.choice(len(ex), size=m, replace=False)]
            sup[t, j] = pick[:k_shot]
            qry[t, j] = pick[k_shot:]
    sy = np.repeat(np.arange(n_way), k_shot)[None].repeat(n_tasks, 0)
    qy = np.repeat(np.arange(n_way), q_query)[None].repeat(n_tasks, 0)
    sy_t, qy_t = torch.from_numpy(sy), torch.from_numpy(qy)
    return TaskPool(
        dataset=dataset.name,
        fingerprint=dataset.fingerprint,
        split=split,
        split_kind=dataset.split_kind,
        n_way=n_way,
        k_shot=k_shot,
        q_query=q_query,
        seed=seed,
        n_tasks_built=n_tasks,
        task_ids=torch.arange(n_tasks, dtype=torch.long),
        classes=torch.from_numpy(cls_out),
        support_ids=torch.from_numpy(sup.reshape(n_tasks, -1)),
        support_y=sy_t.clone(),
        query_ids=torch.from_numpy(qry.reshape(n_tasks, -1)),
        query_y=qy_t.clone(),
        support_true_y=sy_t.clone(),
        query_true_y=qy_t.clone(),
        support_corrupted=torch.zeros(sy.shape, dtype=torch.bool),
        query_corrupted=torch.zeros(qy.shape, dtype=torch.bool),
        corrupted_tasks=torch.zeros(n_tasks, dtype=torch.bool),
        corruption=None,
        dataset_split=dataset.split_description,
    )
