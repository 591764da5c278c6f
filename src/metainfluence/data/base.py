"""The one dataset interface every task pool is built from: :class:`ClassDataset`.

A class dataset is a finite set of labelled images. Every example has an integer id
``0..num_examples-1`` and a class id ``0..num_classes-1``. A dataset also fixes a split into
``'train'``, ``'val'`` and ``'test'`` of one of two kinds:

- ``split_kind='class'``: every *class* belongs to one split (or to none); pools from different
  splits use disjoint classes (Omniglot, Mini-ImageNet, ORL faces).
- ``split_kind='example'``: every *example* belongs to one split; each split holds all classes, and
  pools from different splits use disjoint examples (the 10-class sets: digits, MNIST,
  Fashion-MNIST, where class-disjoint 5-way splits are impossible).

The pixels are produced on demand by ``load(example_ids)`` (float32 in [0, 1], shape
``(m, C, H, W)``), so a dataset may keep its images compressed or on disk.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..io import fingerprint

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_KINDS: tuple[str, ...] = ("class", "example")
UNASSIGNED = -1


def check_split(split: str) -> int:
    """Return the index (0, 1, 2) of ``split``; raise DataError for any other name."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


# the library's one fingerprint helper lives in io (below every stage); data keeps its old name
digest = fingerprint


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder: the argument, else $METAINFLUENCE_CACHE, else ~/.cache/metainfluence."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("METAINFLUENCE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/metainfluence").expanduser()


def seeded_example_split(
    targets: np.ndarray, fractions: Sequence[float], seed: int, stratified: bool = True
) -> np.ndarray:
    """Assign every example to train/val/test (0/1/2) by a seeded shuffle within each class.

    ``fractions`` = (train, val, test) shares; per class, val and test get ``round(share·count)``
    examples and train the rest.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"split fractions {tuple(fractions)} must be three non-negative shares summing to 1")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E17]))
    assign = np.full(len(targets), UNASSIGNED, dtype=np.int8)
    groups = [np.flatnonzero(targets == c) for c in np.unique(targets)] if stratified else [np.arange(len(targets))]
    for idx in groups:
        perm = idx[rng.permutation(len(idx))]
        n_val = int(np.floor(fractions[1] * len(idx) + 0.5))
        n_test = int(np.floor(fractions[2] * len(idx) + 0.5))
        assign[perm[:n_val]] = 1
        assign[perm[n_val : n_val + n_test]] = 2
        assign[perm[n_val + n_test :]] = 0
    return assign


def seeded_class_split(n: int, sizes: Sequence[int], seed: int, salt: int, what: str = "classes") -> np.ndarray:
    """Assign ``n`` classes to train/val/test (0/1/2; -1 beyond ``sum(sizes)``) by a seeded shuffle.

    ``salt`` keeps each dataset's stream its own (Omniglot 0x0A11, ORL 0x0A7F), so a seed gives
    unrelated splits on different datasets and every dataset keeps its recorded split.
    """
    sizes = tuple(int(v) for v in sizes)
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) > n:
        raise DataError(f"split sizes {sizes} do not fit the {n} {what}; give three counts summing to at most {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(salt)]))
    perm = rng.permutation(n)
    a, b, c = sizes
    assign = np.full(n, UNASSIGNED, dtype=np.int8)
    assign[perm[:a]] = 0
    assign[perm[a : a + b]] = 1
    assign[perm[a + b : a + b + c]] = 2
    return assign


class ClassDataset:
    """A labelled image dataset with a fixed train/val/test split.

    Parameters
    ----------
    name: short dataset name (``'omniglot'``, ``'mnist'``, ...).
    image_shape: ``(C, H, W)`` of one loaded image.
    targets: int array, class id of every example (length = number of examples).
    split_kind: ``'class'`` or ``'example'``.
    assignment: int array with values 0/1/2 (train/val/test) or -1 (in no split); one entry per class
        for ``split_kind='class'``, one per example for ``split_kind='example'``.
    loader: function mapping an int64 numpy array of example ids to a float32 tensor (m, C, H, W).
    identity: JSON-able description of the source data and options (file digests, image size...);
        it enters the fingerprint together with the targets and the split.
    class_names: optional readable name of every class.
    example_names: optional name of every example (its file, relative to the dataset's folder), so that scores
        can be traced back to the user's files; not part of the fingerprint (``identity`` covers the files).
    split_description: one sentence stating how the split was made (recorded in pool files).
    """

    def __init__(
        self,
        name: str,
        image_shape: tuple[int, int, int],
        targets: np.ndarray,
        split_kind: str,
        assignment: np.ndarray,
        loader: Callable[[np.ndarray], torch.Tensor],
        identity: Mapping[str, Any],
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        split_description: str = "",
        example_names: Sequence[str] | None = None,
    ) -> None:
        if split_kind not in SPLIT_KINDS:
            raise DataError(f"unknown split kind {split_kind!r}; use 'class' or 'example'")
        targets = np.asarray(targets, dtype=np.int64)
        if targets.ndim != 1 or len(targets) == 0:
            raise DataError(f"dataset {name!r} has no examples; check the data files")
        self.name = str(name)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes if num_classes is not None else targets.max() + 1)
        if targets.min() < 0 or targets.max() >= self.num_classes:
            raise DataError(f"dataset {name!r} has class ids outside 0..{self.num_classes - 1}; check the label files")
        self.split_kind = split_kind
        self._targets = targets
        assignment = np.asarray(assignment, dtype=np.int8)
        expected = self.num_classes if split_kind == "class" else len(targets)
        if assignment.shape != (expected,):
            raise DataError(f"split assignment of {name!r} has {assignment.shape[0]} entries, expected {expected}")
        self._assignment = assignment
        self._loader = loader
        self.identity = dict(identity)
        self.class_names = list(class_names) if class_names is not None else None
        self.example_names = list(example_names) if example_names is not None else None
        if self.example_names is not None and len(self.example_names) != len(targets):
            raise DataError(f"dataset {name!r} names {len(self.example_names)} examples but has {len(targets)}; one name per example")
        self.split_description = split_description
        self.fingerprint = digest(
            {
                "name": self.name,
                "identity": self.identity,
                "image_shape": list(self.image_shape),
                "num_classes": self.num_classes,
                "split_kind": split_kind,
                "targets": targets,
                "assignment": assignment,
            }
        )
        # Examples of every class, in increasing id order, and the split restrictions.
        order = np.argsort(targets, kind="stable")
        bounds = np.searchsorted(targets[order], np.arange(self.num_classes + 1))
        self._by_class = [order[bounds[c] : bounds[c + 1]] for c in range(self.num_classes)]
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_examples(self) -> int:
        return len(self._targets)

    @property
    def targets(self) -> torch.Tensor:
        """Class id of every example (LongTensor, length ``num_examples``)."""
        return torch.from_numpy(self._targets)

    def classes(self, split: str) -> list[int]:
        """Class ids usable in ``split`` (all classes with examples there for ``split_kind='example'``)."""
        s = check_split(split)
        if self.split_kind == "class":
            return [int(c) for c in np.flatnonzero(self._assignment == s)]
        return [c for c in range(self.num_classes) if len(self._examples_np(c, s)) > 0]

    def _examples_np(self, class_id: int, s: int) -> np.ndarray:
        key = (class_id, s)
        if key not in self._cache:
            ids = self._by_class[class_id]
            if self.split_kind == "class":
                ids = ids if self._assignment[class_id] == s else ids[:0]
            else:
                ids = ids[self._assignment[ids] == s]
            self._cache[key] = ids
        return self._cache[key]

    def examples_of(self, class_id: int, split: str) -> torch.Tensor:
        """Example ids (LongTensor, increasing) of class ``class_id`` available in ``split``."""
        s = check_split(split)
        c = int(class_id)
        if not 0 <= c < self.num_classes:
            raise DataError(f"class id {c} is outside 0..{self.num_classes - 1} for dataset {self.name!r}")
        if self.split_kind == "class" and self._assignment[c] != s:
            where = SPLITS[self._assignment[c]] if self._assignment[c] >= 0 else "no split"
            raise DataError(f"class {c} of {self.name!r} belongs to {where}, not {split!r}; use classes({split!r}) to list its classes")
        return torch.from_numpy(self._examples_np(c, s).copy())

    def split_of_examples(self, example_ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Split index (0/1/2, or -1) of each example id."""
        ids = np.asarray(example_ids, dtype=np.int64)
        if self.split_kind == "class":
            return self._assignment[self._targets[ids]]
        return self._assignment[ids]

    def load(self, example_ids: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Images of ``example_ids`` as a float32 tensor (m, C, H, W) with values in [0, 1]."""
        ids = np.asarray(torch.as_tensor(example_ids, dtype=torch.long).reshape(-1).numpy())
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_examples):
            bad = int(ids[(ids < 0) | (ids >= self.num_examples)][0])
            raise DataError(f"example id {bad} is outside 0..{self.num_examples - 1} for dataset {self.name!r}")
        if len(ids) == 0:
            return torch.zeros((0, *self.image_shape), dtype=torch.float32)
        out = self._loader(ids)
        return out.to(torch.float32).reshape(len(ids), *self.image_shape)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: name, fingerprint, sizes of each split."""
        info: dict[str, Any] = {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_classes": self.num_classes,
            "num_examples": self.num_examples,
            "image_shape": list(self.image_shape),
            "split_kind": self.split_kind,
            "split": self.split_description,
        }
        for split in SPLITS:
            cl = self.classes(split)
            info[f"{split}_classes"] = len(cl)
            info[f"{split}_examples"] = int(sum(len(self._examples_np(c, SPLITS.index(split))) for c in cl))
        return info

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.classes(s))}" for s in SPLITS)
        return (
            f"ClassDataset({self.name!r}, {self.num_classes} classes, {self.num_examples} examples, "
            f"image {self.image_shape}, {self.split_kind}-disjoint splits: {sizes} classes, fingerprint {self.fingerprint})"
        )
