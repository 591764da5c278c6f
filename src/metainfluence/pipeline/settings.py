"""What a run is: :class:`RunSettings` (data, model, inner problem, objective, training, refine), the
source of the CLI flags and config-file sections."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import to_dict
from ..data.registry import canonical_name
from ..errors import DataError, SettingsError
from ..meta.models import ModelSettings
from ..meta.objective import InnerSettings
from ..meta.refine import RefineSettings
from ..meta.train import TrainSettings


# input values per example of each dataset at its default size (sinusoid: one x)
_VALUES_PER_EXAMPLE = {"digits": 64, "omniglot": 28 * 28, "mnist": 28 * 28, "fashion-mnist": 28 * 28, "mini-imagenet": 3 * 84 * 84, "orl-faces": 84 * 84, "image-folder": 3 * 84 * 84, "sinusoid": 1}


def _memory_bytes() -> int:
    """Physical memory of this machine (64 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 64 * 2**30


@dataclass
class DataSettings:
    """Which tasks: dataset, task shape and pool sizes."""

    dataset: str = field(default="digits", metadata={"help": "dataset: digits (embedded, no download) | omniglot | mnist | fashion-mnist | mini-imagenet | orl-faces (40 faces, Mini-ImageNet stand-in) | image-folder (your own images: class folders under --data-root) | sinusoid (regression)"})
    data_root: str | None = field(default=None, metadata={"help": "folder holding the dataset files (else $METAINFLUENCE_DATA); not needed for digits and sinusoid"})
    image_size: int = field(default=0, metadata={"help": "image side in pixels (0 = the dataset's default, e.g. 28 for Omniglot)"})
    n_way: int = field(default=5, metadata={"help": "classes per task N"})
    k_shot: int = field(default=1, metadata={"help": "support examples per class K (sinusoid: support points)"})
    q_query: int = field(default=5, metadata={"help": "query examples per class Q (sinusoid: query points) of the training pool, and of the others unless eval_q_query is set"})
    eval_q_query: int = field(default=0, metadata={"help": "query examples per class of the validation and test pools (0 = q_query); e.g. 1 in training and 15 at evaluation"})
    train_tasks: int = field(default=300, metadata={"help": "tasks in the training pool n (influence is over these)"})
    val_tasks: int = field(default=100, metadata={"help": "tasks in the validation pool (the influence measurement, docs/method.md §5)"})
    test_tasks: int = field(default=600, metadata={"help": "held-out meta-test tasks (≥ 600 for the usual 95% interval)"})
    standardize: bool = field(default=True, metadata={"help": "standardise image inputs with the training pool's statistics (per-pixel mean, overall sd); a well-conditioned F lets refine reach its tolerance"})
    pool_seed: int = field(default=0, metadata={"help": "seed of the task pools (same seed = same tasks)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the dataset's train/val/test split"})
    split_by: str = field(default="", metadata={"help": "image-folder only: class (class-disjoint splits, the few-shot protocol; the default) | example (every class in every split, disjoint images: for folders with too few classes, as MNIST)"})
    color: str = field(default="", metadata={"help": "image-folder only: auto (grey when every image is grey, else RGB; the default) | grey | rgb"})
    corrupt_tasks: float = field(default=0.0, metadata={"help": "fraction ρ_task of TRAINING tasks given wrong labels (mislabeled-task experiments; the truth is recorded in the pool)"})
    corrupt_labels: float = field(default=0.8, metadata={"help": "fraction ρ_label of a corrupted task's labels changed to another class of the task"})
    corrupt_where: str = field(default="both", metadata={"help": "which labels of a corrupted task: support | query | both"})

    def query_size(self, split: str) -> int:
        """Query examples per class of the ``split`` pool."""
        return self.q_query if split == "train" or not self.eval_q_query else self.eval_q_query

    def validate(self) -> None:
        for name in ("n_way", "k_shot", "q_query", "train_tasks", "val_tasks", "test_tasks"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.eval_q_query < 0:
            raise SettingsError(f"eval_q_query must be ≥ 0 (0 = q_query), got {self.eval_q_query}")
        self.check_pool_sizes()

    def check_pool_sizes(self) -> None:
        """Refuse pools whose input tensors cannot fit in memory, before any work starts."""
        try:
            name = canonical_name(self.dataset)  # an alias ('orl', 'folder') sizes like its dataset
        except DataError:
            name = self.dataset  # sinusoid, or a name the data stage will refuse
        values = _VALUES_PER_EXAMPLE.get(name, 784)
        if self.image_size and name in ("omniglot", "mnist", "fashion-mnist", "orl-faces"):
            values = self.image_size ** 2
        elif self.image_size and name in ("mini-imagenet", "image-folder"):  # RGB (image-folder: at most)
            values = 3 * self.image_size ** 2
        if name == "image-folder" and str(self.color).lower() in ("grey", "gray"):
            values //= 3  # forced grey: one channel
        limit = _memory_bytes() // 2
        for split, n in (("train", self.train_tasks), ("val", self.val_tasks), ("test", self.test_tasks)):
            per_task = self.n_way * (self.k_shot + self.query_size(split)) * values * 8  # float64 in influence
            if n * per_task > limit:
                flag = {"train": "--train-tasks", "val": "--val-tasks", "test": "--test-tasks"}[split]
                raise SettingsError(
                    f"the {split} pool of {n} tasks would need {n * per_task / 2**30:.1f} GiB of inputs in float64 "
                    f"({self.n_way} × ({self.k_shot} + {self.query_size(split)}) examples of {values} values per task), over half this "
                    f"machine's {_memory_bytes() / 2**30:.0f} GiB; lower {flag} (at most {max(1, limit // per_task)} here)")
        if self.image_size < 0:
            raise SettingsError(f"image_size must be ≥ 0, got {self.image_size}")
        if not (0 <= self.corrupt_tasks <= 1 and 0 <= self.corrupt_labels <= 1):
            raise SettingsError("corrupt_tasks and corrupt_labels are fractions: give values in [0, 1]")
        if self.split_by not in ("", "class", "example"):
            raise SettingsError(f"split_by must be class or example (or empty for the dataset's own), got {self.split_by!r}")
        if str(self.color).lower() not in ("", "auto", "grey", "gray", "rgb"):
            raise SettingsError(f"color must be auto, grey or rgb (or empty for auto), got {self.color!r}; e.g. --color grey")
        if self.corrupt_where not in ("support", "query", "both"):
            raise SettingsError(f"corrupt_where must be support, query or both, got {self.corrupt_where!r}")


@dataclass
class ObjectiveSettings:
    """The outer objective's regulariser and how full-pool passes are chunked."""

    weight_decay: float = field(default=1e-2, metadata={"help": "μ in F(λ) = (1/n) Σ L_Q^i + (μ/2)‖λ‖² — gives F a minimiser for refine"})
    pool_chunk: int = field(default=0, metadata={"help": "tasks per vmapped chunk in full-pool passes (refine, influence, evaluation); 0 = automatic: as many as fit a quarter of this machine's memory (at most 4 GiB on a CPU), by a bound from the model's activations"})


@dataclass
class RunSettings:
    """Everything a run needs; the CLI flags and config-file sections are generated from it.

    The defaults are the demo's, chosen so that refine reaches ‖∇F‖ ≤ 1e-6 within the demo's time
    budget (measured on digits, 300 tasks): a smooth network (tanh; with ReLU L-BFGS stalled at
    ‖∇F‖ ≈ 0.26 after 600 iterations), standardised inputs (largest Hessian eigenvalue of F 263 → 0.7)
    and μ = 1e-2 (with μ = 1e-3 refine was at ‖∇F‖ ≈ 0.02 after 1000 iterations).
    """

    data: DataSettings = field(default_factory=DataSettings, metadata={"help": "tasks", "flag_prefix": ""})
    model: ModelSettings = field(default_factory=lambda: ModelSettings(hidden=(64,), activation="tanh"), metadata={"help": "network", "flag_prefix": "model-"})
    inner: InnerSettings = field(default_factory=InnerSettings, metadata={"help": "adaptation (inner problem)", "flag_prefix": "inner-"})
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings, metadata={"help": "outer objective", "flag_prefix": ""})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(meta_batch=16, steps=1500, lr=3e-3, checkpoint_every=500), metadata={"help": "meta-training", "flag_prefix": ""})
    refine: RefineSettings = field(default_factory=RefineSettings, metadata={"help": "refine stage", "flag_prefix": "refine-"})

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.inner.validate()
        self.train.validate()
        self.refine.validate()
        if self.objective.weight_decay < 0 or not math.isfinite(self.objective.weight_decay):
            raise SettingsError(f"weight_decay must be ≥ 0, got {self.objective.weight_decay}")
        if self.objective.pool_chunk < 0:
            raise SettingsError(f"pool_chunk must be ≥ 0, got {self.objective.pool_chunk}")
        if self.data.dataset == "sinusoid" and self.model.kind != "mlp":
            raise SettingsError("the sinusoid dataset needs the mlp model; pass --model-kind mlp")


def stage_settings(settings: RunSettings) -> dict[str, Any]:
    """The settings recorded with a meta-training checkpoint: all sections but train and refine."""
    d = to_dict(settings)
    d.pop("train", None)
    d.pop("refine", None)
    return d
