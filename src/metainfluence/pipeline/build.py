"""Building a run's parts from its settings: the dataset, the task pools (and their standardised
tensors) and the meta-learning problem. Deterministic in the settings."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ..data import load_dataset
from ..data.registry import dataset_options
from ..errors import PoolError, SettingsError
from ..meta.models import build_model
from ..meta.objective import MetaProblem
from ..tasks import TaskTensors, build_pool, corrupt_labels, sinusoid_pool
from .settings import DataSettings, RunSettings

SPLITS = ("train", "val", "test")
# split_seed's default: an explicitly different seed is refused for datasets whose split is fixed
_DEFAULT_SPLIT_SEED = next(f.default for f in dataclasses.fields(DataSettings) if f.name == "split_seed")


def input_statistics(train: TaskTensors) -> tuple[torch.Tensor, float]:
    """Per-pixel mean and overall standard deviation of the inputs of a (training) pool, every
    support and query image counted once per appearance; computed in float64."""
    x = torch.cat([train.support_x.flatten(0, 1), train.query_x.flatten(0, 1)]).to(torch.float64)
    mean = x.mean(0)
    sd = float((x - mean).std())
    if not sd > 0:
        raise PoolError("the training pool's inputs are constant, so they cannot be standardised; pass --no-standardize")
    return mean, sd


def standardize_tensors(tasks: TaskTensors, mean: torch.Tensor, sd: float) -> TaskTensors:
    """(x − mean) / sd for support and query inputs; labels unchanged."""
    m = mean.to(tasks.support_x.dtype)
    return TaskTensors((tasks.support_x - m) / sd, tasks.support_y, (tasks.query_x - m) / sd, tasks.query_y)


def pool_tensors(pools: Mapping[str, Any], dataset, data: DataSettings) -> tuple[dict[str, TaskTensors], dict | None]:
    """Tensors of every pool; with ``data.standardize`` (image datasets only), standardised with the
    training pool's statistics. Returns (tensors, {"mean_abs_max", "sd"} or None)."""
    tensors = {name: pool.tensors(dataset) for name, pool in pools.items()}
    if not data.standardize or dataset is None:
        return tensors, None
    if "train" not in tensors:
        raise SettingsError("standardising inputs needs the training pool (its statistics); build it too")
    mean, sd = input_statistics(tensors["train"])
    info = {"kind": "per-pixel mean, overall sd of the training pool's images", "sd": sd, "mean_range": [float(mean.min()), float(mean.max())]}
    return {name: standardize_tensors(t, mean, sd) for name, t in tensors.items()}, info


# --------------------------------------------------------------------------- building
def load_data(data: DataSettings):
    """The dataset of ``data`` (None for sinusoid, whose pools are generated)."""
    if data.dataset == "sinusoid":
        return None
    takes = dataset_options(data.dataset)
    options: dict[str, Any] = {}
    # Only loaders that draw their split take a seed; Mini-ImageNet's split is fixed by its csv files.
    if "split_seed" in takes:
        options["split_seed"] = data.split_seed
    elif data.split_seed != _DEFAULT_SPLIT_SEED:
        source = "its train.csv, val.csv and test.csv files" if "csv_dir" in takes else "its files"
        raise SettingsError(
            f"dataset {data.dataset!r} has fixed train/val/test splits (they come from {source}), so split_seed "
            f"{data.split_seed} would have no effect; drop --split-seed (or split_seed in the config)")
    if data.split_by:
        if "split_by" not in takes:
            raise SettingsError(f"dataset {data.dataset!r} has its own kind of split; --split-by applies to image-folder only — drop it (or split_by in the config)")
        options["split_by"] = data.split_by
    if data.color:
        if "color" not in takes:
            raise SettingsError(f"dataset {data.dataset!r} has its own colour; --color applies to image-folder only — drop it (or color in the config)")
        options["color"] = data.color
    if data.image_size:
        if "image_size" not in takes:
            raise SettingsError(f"dataset {data.dataset!r} keeps its native image size and cannot be resized; drop --image-size (or image_size in the config)")
        options["image_size"] = data.image_size
    return load_dataset(data.dataset, root=data.data_root, **options)


def build_pools(data: DataSettings, dataset, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """Train/val/test pools of ``data`` (deterministic in the settings)."""
    sizes = {"train": data.train_tasks, "val": data.val_tasks, "test": data.test_tasks}
    pools = {}
    for split in splits:
        if dataset is None:
            # Sinusoid tasks have no classes to split: the pools differ by seed.
            pools[split] = sinusoid_pool(sizes[split], data.k_shot, data.query_size(split), seed=data.pool_seed * 3 + SPLITS.index(split))
        else:
            pools[split] = build_pool(dataset, split, data.n_way, data.k_shot, data.query_size(split), sizes[split], seed=data.pool_seed)
            if split == "train" and data.corrupt_tasks > 0:
                pools[split] = corrupt_labels(pools[split], data.corrupt_tasks, data.corrupt_labels, where=data.corrupt_where, seed=data.pool_seed)
    return pools


def build_problem(settings: RunSettings, dataset) -> MetaProblem:
    """The model (initialised from ``settings.train.seed``), loss and inner solver."""
    if dataset is None:
        input_shape, out, loss = (1,), 1, "mse"
    else:
        input_shape, out, loss = tuple(dataset.image_shape), settings.data.n_way, "cross_entropy"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        model = build_model(settings.model, input_shape, out)
    inner = dataclasses.replace(settings.inner)
    return MetaProblem(model, loss, inner, weight_decay=settings.objective.weight_decay, chunk_size=settings.objective.pool_chunk or None)
