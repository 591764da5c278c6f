"""Task pools: fixed, finite lists of N-way K-shot tasks with stable integer ids.

A :class:`TaskPool` stores, for every task, its N dataset classes, the example ids of its support
set (N·K) and query set (N·Q), and their labels 0..N-1. Order inside a task is class-major:
support = K examples of ``classes[t, 0]`` (label 0), then K of ``classes[t, 1]`` (label 1), ...;
the query set likewise with Q per class. Label j always means dataset class ``classes[t, j]``
(unless the label was deliberately corrupted, see :mod:`.corruption`).

Determinism: task t of a pool is drawn by a numpy Generator seeded from
(dataset fingerprint, split, N, K, Q, seed) and the task id t, so the same definition always gives
the same tasks, and a pool of n tasks is the first n tasks of any longer pool with the same
definition (the pool is a deterministic function of the definition and n_tasks).

Splits: pools of different splits use disjoint classes for ``split_kind='class'`` datasets and
disjoint examples (all classes) for ``split_kind='example'`` datasets; every saved pool says which.
Pools are drawn by :func:`.building.build_pool`.

Saved form: ``STEM.json`` (human-readable definition and corruption record, written last) and
``STEM.safetensors`` (index and label arrays). The JSON carries a checksum over the definition
and the arrays, so an edited or mixed-up file is refused on load.

Input corruption (duplicate and off-distribution tasks, :mod:`.harmful`): a pool holds example ids,
not pixels, so a changed input is stored as a per-task recipe applied by :meth:`TaskPool.tensors`:
``input_transform`` (0 none, 1 inverted contrast), ``input_noise`` (sd of added Gaussian noise on
the [0, 1] pixel scale) and ``input_seed`` (the noise's seed), plus ``duplicate_of`` (source task id
or −1). These four arrays exist only in input-corrupted pools (None otherwise), so clean and
label-corrupted pools keep their files and fingerprints.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..errors import PoolError
from .storage import _stem, load_pair, save_pair
from .tensors import TaskTensors

if TYPE_CHECKING:  # pragma: no cover
    from ..data.base import ClassDataset

SPLITS = ("train", "val", "test")
KIND = "class-task-pool"
_ARRAYS = (
    "task_ids",
    "classes",
    "support_ids",
    "support_y",
    "query_ids",
    "query_y",
    "support_true_y",
    "query_true_y",
    "support_corrupted",
    "query_corrupted",
    "corrupted_tasks",
)
# present only in input-corrupted pools (all four or none), see the module docstring
_INPUT_ARRAYS = ("input_transform", "input_noise", "input_seed", "duplicate_of")
INPUT_TRANSFORMS = ("none", "invert")
_DEFINITION_KEYS = ("kind", "dataset", "fingerprint", "split", "split_kind", "n_way", "k_shot", "q_query", "n_tasks_built", "seed", "corruption")


# --------------------------------------------------------------------------- the pool
@dataclass
class TaskPool:
    """A fixed list of N-way K-shot Q-query classification tasks (see the module docstring).

    Arrays (n = number of tasks in this pool, S = N·K, Q' = N·Q):
    ``task_ids`` (n,) stable ids; ``classes`` (n, N) dataset class ids; ``support_ids`` (n, S),
    ``query_ids`` (n, Q') example ids; ``support_y``/``query_y`` the labels used for training
    (possibly corrupted); ``support_true_y``/``query_true_y`` the true labels;
    ``support_corrupted``/``query_corrupted`` bool masks of changed labels; ``corrupted_tasks`` (n,)
    bool. Input-corrupted pools also hold the per-task input recipe ``input_transform``,
    ``input_noise``, ``input_seed`` and ``duplicate_of`` (n,) (see the module docstring).
    """

    dataset: str
    fingerprint: str
    split: str
    split_kind: str
    n_way: int
    k_shot: int
    q_query: int
    seed: int
    n_tasks_built: int
    task_ids: torch.Tensor
    classes: torch.Tensor
    support_ids: torch.Tensor
    support_y: torch.Tensor
    query_ids: torch.Tensor
    query_y: torch.Tensor
    support_true_y: torch.Tensor
    query_true_y: torch.Tensor
    support_corrupted: torch.Tensor
    query_corrupted: torch.Tensor
    corrupted_tasks: torch.Tensor
    corruption: dict | None = None
    dataset_split: str = ""
    input_transform: torch.Tensor | None = None
    input_noise: torch.Tensor | None = None
    input_seed: torch.Tensor | None = None
    duplicate_of: torch.Tensor | None = None

    # ---------------------------------------------------------------- basics
    def __len__(self) -> int:
        return int(self.task_ids.shape[0])

    @property
    def n_tasks(self) -> int:
        return len(self)

    @property
    def disjointness(self) -> str:
        if self.split_kind == "class":
            return "class-disjoint: train/val/test pools of this dataset use disjoint classes"
        return "example-disjoint: train/val/test pools use all classes but disjoint examples"

    @property
    def is_corrupted(self) -> bool:
        return self.corruption is not None

    @property
    def corruption_kind(self) -> str | None:
        """'labels', 'duplicate' or 'off-distribution' (None for a clean pool); a label-corruption
        record carries no kind (files written before other kinds existed)."""
        return None if self.corruption is None else str(self.corruption.get("kind", "labels"))

    @property
    def has_input_changes(self) -> bool:
        return self.input_transform is not None

    def classes_used(self) -> list[int]:
        return sorted(int(c) for c in torch.unique(self.classes))

    def _arrays(self) -> dict[str, torch.Tensor]:
        extra = _INPUT_ARRAYS if self.has_input_changes else ()
        return {k: getattr(self, k) for k in (*_ARRAYS, *extra)}

    def definition(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "dataset": self.dataset,
            "fingerprint": self.fingerprint,
            "split": self.split,
            "split_kind": self.split_kind,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "q_query": self.q_query,
            "n_tasks_built": self.n_tasks_built,
            "seed": self.seed,
            "corruption": self.corruption,
        }

    def _positions(self, task_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        if len(torch.unique(ids)) != len(ids):
            raise PoolError("task ids passed to subset() repeat; pass each task id once")
        lookup = {int(t): i for i, t in enumerate(self.task_ids.tolist())}
        pos = []
        for t in ids.tolist():
            if t not in lookup:
                raise PoolError(f"task id {t} is not in this pool (ids {self.task_ids.min().item()}..{self.task_ids.max().item()}, {len(self)} tasks); use ids from pool.task_ids")
            pos.append(lookup[t])
        return torch.tensor(pos, dtype=torch.long)

    def subset(self, task_ids: Sequence[int] | torch.Tensor) -> "TaskPool":
        """The pool restricted to the given stable task ids (in the given order); ids are kept in
        ``task_ids``, so a task keeps its id in every subset."""
        pos = self._positions(task_ids)
        if len(pos) == 0:
            raise PoolError("subset() got no task ids; a pool needs at least one task")
        return dataclasses.replace(self, **{k: v[pos].clone() for k, v in self._arrays().items()})

    def without(self, task_ids: Sequence[int] | torch.Tensor) -> "TaskPool":
        """The pool minus the given stable task ids (the others in their current order)."""
        drop = set(int(t) for t in self._positions(task_ids).tolist())
        keep = [int(t) for i, t in enumerate(self.task_ids.tolist()) if i not in drop]
        return self.subset(keep)

    def summary(self) -> str:
        n_corr = int(self.corrupted_tasks.sum())
        c = self.corruption
        if c is None:  # no corruption recorded (a detection experiment corrupts after this line: it logs its own)
            corr = "no corruption" if n_corr == 0 else f"{n_corr} corrupted"
        elif self.corruption_kind == "labels":
            corr = f"{n_corr} corrupted (rho_task={c['rho_task']}, rho_label={c['rho_label']}, {c['where']})"
        elif self.corruption_kind == "duplicate":
            corr = f"{n_corr} corrupted (duplicate: rho_task={c['rho_task']}, near-copies of task(s) {c['sources']}, noise {c['noise']})"
        else:
            corr = f"{n_corr} corrupted ({c['kind']}: rho_task={c['rho_task']}, {c['transform']})"
        return (
            f"{self.dataset} [{self.fingerprint}] split={self.split} ({self.split_kind}-disjoint): "
            f"{self.n_way}-way {self.k_shot}-shot {self.q_query}-query, {len(self)} tasks (seed {self.seed}), "
            f"{len(self.classes_used())} classes used, {corr}"
        )

    def __repr__(self) -> str:
        return f"TaskPool({self.summary()})"

    # ---------------------------------------------------------------- data
    def check_dataset(self, dataset: "ClassDataset") -> None:
        """PoolError unless ``dataset`` is the one this pool was built from and every task is
        consistent with it (class ids in range and in the split, examples of the claimed classes)."""
        if dataset.name != self.dataset:
            raise PoolError(f"pool was built from dataset {self.dataset!r}, not {dataset.name!r}; load the matching dataset")
        if dataset.fingerprint != self.fingerprint:
            raise PoolError(
                f"pool was built from {self.dataset} data/options with fingerprint {self.fingerprint}, but the dataset given has {dataset.fingerprint}; "
                "use the same files, image size, split and options, or rebuild the pool"
            )
        if dataset.split_kind != self.split_kind:
            raise PoolError(f"pool records split kind {self.split_kind!r} but the dataset has {dataset.split_kind!r}; rebuild the pool")
        cls = self.classes
        if cls.min() < 0 or cls.max() >= dataset.num_classes:
            raise PoolError(f"pool holds class ids outside 0..{dataset.num_classes - 1} of {dataset.name}; the pool file is corrupt — rebuild it")
        allowed = torch.zeros(dataset.num_classes, dtype=torch.bool)
        allowed[torch.tensor(dataset.classes(self.split), dtype=torch.long)] = True
        if not allowed[cls].all():
            raise PoolError(f"pool uses classes that are not in the {self.split!r} split of {dataset.name}; the pool file is corrupt — rebuild it")
        targets = dataset.targets
        for ids_name, y_name in (("support_ids", "support_true_y"), ("query_ids", "query_true_y")):
            ids, y = getattr(self, ids_name), getattr(self, y_name)
            if ids.min() < 0 or ids.max() >= dataset.num_examples:
                raise PoolError(f"pool {ids_name} hold example ids outside 0..{dataset.num_examples - 1}; the pool file is corrupt — rebuild it")
            claimed = torch.gather(cls, 1, y)
            if not torch.equal(targets[ids], claimed):
                raise PoolError(f"pool {ids_name} hold examples that are not of their task's claimed classes; the pool file is corrupt — rebuild it")
            split_idx = SPLITS.index(self.split)
            if not (torch.from_numpy(dataset.split_of_examples(ids.reshape(-1).numpy()).astype(np.int64)) == split_idx).all():
                raise PoolError(f"pool {ids_name} hold examples outside the {self.split!r} split; the pool file is corrupt — rebuild it")
        both = torch.cat([self.support_ids, self.query_ids], 1)
        if (torch.sort(both, 1).values.diff(dim=1) == 0).any():
            raise PoolError("a pool task uses the same example twice; the pool file is corrupt — rebuild it")

    def tensors(self, dataset: "ClassDataset") -> TaskTensors:
        """Stacked inputs and (training, possibly corrupted) labels: support_x (n, N·K, C, H, W)
        float32, support_y (n, N·K) int64, query_x (n, N·Q, C, H, W), query_y (n, N·Q)."""
        if dataset.name != self.dataset or dataset.fingerprint != self.fingerprint:
            self.check_dataset(dataset)
        n, s, q = len(self), self.support_ids.shape[1], self.query_ids.shape[1]
        flat = torch.cat([self.support_ids.reshape(-1), self.query_ids.reshape(-1)])
        uniq, inverse = torch.unique(flat, return_inverse=True)
        images = dataset.load(uniq)  # each distinct example loaded once
        sx = torch.index_select(images, 0, inverse[: n * s]).reshape(n, s, *dataset.image_shape)
        qx = torch.index_select(images, 0, inverse[n * s :]).reshape(n, q, *dataset.image_shape)
        if self.has_input_changes:
            sx, qx = self._apply_input_changes(sx, qx)
        return TaskTensors(sx, self.support_y.clone(), qx, self.query_y.clone())

    def _apply_input_changes(self, sx: torch.Tensor, qx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded per-task input recipe: invert contrast (x → 1 − x, pixels are in [0, 1]),
        then add Gaussian noise from the task's own seed and clip to [0, 1]. The noise depends only
        on (seed, task shape), so a task's inputs are the same in every subset of the pool."""
        sx, qx = sx.clone(), qx.clone()
        s = sx.shape[1]
        for i in torch.nonzero((self.input_transform != 0) | (self.input_noise > 0)).flatten().tolist():
            x = torch.cat([sx[i], qx[i]])
            if int(self.input_transform[i]) == 1:
                x = 1.0 - x
            sd = float(self.input_noise[i])
            if sd > 0:
                g = torch.Generator().manual_seed(int(self.input_seed[i]))
                x = (x + sd * torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)).clamp(0.0, 1.0)
            sx[i], qx[i] = x[:s], x[s:]
        return sx, qx

    # ---------------------------------------------------------------- files
    def save(self, path_stem: str | os.PathLike) -> Path:
        """Write ``STEM.json`` (readable definition) + ``STEM.safetensors`` (arrays); returns the JSON path."""
        corrupted = self.task_ids[self.corrupted_tasks].tolist()
        info = {
            "disjointness": self.disjointness,
            "dataset_split": self.dataset_split,
            "n_tasks": len(self),
            "is_subset": len(self) != self.n_tasks_built or not torch.equal(self.task_ids, torch.arange(self.n_tasks_built)),
            "label_order": "class-major: support = K examples of classes[t,0] (label 0), then K of classes[t,1] (label 1), ...; query likewise with Q per class",
            "num_classes_used": len(self.classes_used()),
            "corrupted_task_ids": corrupted,
            "n_corrupted_tasks": len(corrupted),
            "n_corrupted_labels": int(self.support_corrupted.sum() + self.query_corrupted.sum()),
            "summary": self.summary(),
        }
        return save_pair(path_stem, self.definition(), info, self._arrays())

    @classmethod
    def load(cls, path_stem: str | os.PathLike, dataset: "ClassDataset | None" = None) -> "TaskPool":
        """Read a saved pool; with ``dataset``, also check that it belongs to that dataset
        (name, fingerprint, classes and examples). PoolError with a one-line reason otherwise."""
        doc, arrays = load_pair(path_stem, KIND, _DEFINITION_KEYS)
        missing = [k for k in _ARRAYS if k not in arrays]
        if missing:
            raise PoolError(f"pool tensor file lacks array(s) {', '.join(missing)}; rebuild and save the pool again")
        unknown = [k for k in arrays if k not in _ARRAYS and k not in _INPUT_ARRAYS]
        if unknown:
            raise PoolError(f"pool tensor file holds unknown array(s) {', '.join(unknown)}; rebuild and save the pool again")
        try:
            pool = cls(
                dataset=str(doc["dataset"]),
                fingerprint=str(doc["fingerprint"]),
                split=str(doc["split"]),
                split_kind=str(doc["split_kind"]),
                n_way=int(doc["n_way"]),
                k_shot=int(doc["k_shot"]),
                q_query=int(doc["q_query"]),
                seed=int(doc["seed"]),
                n_tasks_built=int(doc["n_tasks_built"]),
                corruption=doc["corruption"],
                dataset_split=str(doc.get("dataset_split", "")),
                **arrays,
            )
        except (TypeError, ValueError) as exc:
            raise PoolError(f"pool definition {_stem(path_stem)}.json has a malformed field ({exc}); rebuild the pool") from None
        pool._check_shapes()
        if dataset is not None:
            pool.check_dataset(dataset)
        return pool

    def _check_shapes(self) -> None:
        n, N = len(self), self.n_way
        want = {
            "classes": (n, N),
            "support_ids": (n, N * self.k_shot),
            "query_ids": (n, N * self.q_query),
            "support_y": (n, N * self.k_shot),
            "query_y": (n, N * self.q_query),
            "support_true_y": (n, N * self.k_shot),
            "query_true_y": (n, N * self.q_query),
            "support_corrupted": (n, N * self.k_shot),
            "query_corrupted": (n, N * self.q_query),
            "corrupted_tasks": (n,),
        }
        for k, shape in want.items():
            if tuple(getattr(self, k).shape) != shape:
                raise PoolError(f"pool array {k} has shape {tuple(getattr(self, k).shape)}, expected {shape} for {N}-way {self.k_shot}-shot {self.q_query}-query; rebuild the pool")
        if self.split not in SPLITS:
            raise PoolError(f"pool split {self.split!r} is not one of {', '.join(SPLITS)}; rebuild the pool")
        for k in ("support_y", "query_y", "support_true_y", "query_true_y"):
            t = getattr(self, k)
            if t.numel() and (t.min() < 0 or t.max() >= N):
                raise PoolError(f"pool labels {k} fall outside 0..{N - 1}; rebuild the pool")
        if len(torch.unique(self.task_ids)) != n or self.task_ids.min() < 0 or self.task_ids.max() >= self.n_tasks_built:
            raise PoolError("pool task ids repeat or fall outside the built range; rebuild the pool")
        if not torch.equal(self.support_y != self.support_true_y, self.support_corrupted) or not torch.equal(self.query_y != self.query_true_y, self.query_corrupted):
            raise PoolError("pool labels and true labels disagree with the recorded corruption masks; rebuild the pool")
        kind = self.corruption_kind
        present = [k for k in _INPUT_ARRAYS if getattr(self, k) is not None]
        if present and len(present) != len(_INPUT_ARRAYS):
            raise PoolError(f"pool holds only part of the input recipe ({', '.join(present)}); rebuild the pool")
        if kind is not None and kind not in ("labels", "duplicate", "off-distribution"):
            raise PoolError(f"pool corruption record names an unknown kind {kind!r}; rebuild the pool")
        # input kinds need the recipe; a clean or label-corrupted pool must not carry one
        if (kind in ("duplicate", "off-distribution")) != bool(present):
            raise PoolError(f"pool corruption kind {kind!r} does not match its input recipe arrays (present: {bool(present)}); rebuild the pool")
        if present:
            for k in _INPUT_ARRAYS:
                if tuple(getattr(self, k).shape) != (n,):
                    raise PoolError(f"pool array {k} has shape {tuple(getattr(self, k).shape)}, expected ({n},); rebuild the pool")
            if self.support_corrupted.any() or self.query_corrupted.any():
                raise PoolError(f"a {kind} pool has flipped labels; rebuild the pool")
            changed = (self.input_transform != 0) | (self.input_noise > 0) | (self.duplicate_of >= 0)
            flags = self.duplicate_of >= 0 if kind == "duplicate" else changed
            if kind == "duplicate" and bool((self.input_transform != 0).any()):
                raise PoolError("a duplicate pool has contrast-inverted tasks; rebuild the pool")
            if not torch.equal(self.corrupted_tasks, flags) or not torch.equal(changed, flags):
                raise PoolError("pool's corrupted-task flags disagree with its input recipe; rebuild the pool")
            if self.input_transform.min() < 0 or self.input_transform.max() >= len(INPUT_TRANSFORMS) or not torch.isfinite(self.input_noise).all() or (self.input_noise < 0).any():
                raise PoolError("pool input recipe holds an unknown transform or a negative noise level; rebuild the pool")
            if self.duplicate_of.min() < -1 or self.duplicate_of.max() >= self.n_tasks_built:
                raise PoolError("pool duplicate_of names task ids outside the built range; rebuild the pool")
            return
        if not torch.equal(self.corrupted_tasks, self.support_corrupted.any(1) | self.query_corrupted.any(1)):
            raise PoolError("pool's corrupted-task flags disagree with its corrupted-label masks; rebuild the pool")
        if self.corruption is None and bool(self.corrupted_tasks.any()):
            raise PoolError("pool has corrupted labels but no corruption record; rebuild the pool")
