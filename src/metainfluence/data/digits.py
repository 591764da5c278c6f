"""scikit-learn's 8×8 digits: the embedded default dataset (no file needed)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .base import ClassDataset, digest, seeded_example_split


def load_digits(*, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), split_seed: int = 0) -> ClassDataset:
    """The 1,797 scikit-learn digits (shape (1, 8, 8), values 0..16 scaled to [0, 1]), 10 classes.

    Split (``split_kind='example'``; every split holds all 10 classes): within each class a seeded
    shuffle puts ``round(0.2·count)`` examples in val, ``round(0.2·count)`` in test and the rest
    (about 60%) in train — about 107/36/36 examples per class.
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("scikit-learn is not installed; pip install scikit-learn to use the digits dataset") from None
    bunch = _sk_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    targets = np.asarray(bunch.target, dtype=np.int64)
    assign = seeded_example_split(targets, fractions, split_seed)
    data = torch.from_numpy(images)

    def loader(ids: np.ndarray) -> torch.Tensor:
        return data[torch.from_numpy(ids)]

    return ClassDataset(
        name="digits",
        image_shape=(1, 8, 8),
        targets=targets,
        split_kind="example",
        assignment=assign,
        loader=loader,
        identity={"source": "sklearn.datasets.load_digits", "pixels": digest(images, 32), "fractions": list(fractions), "split_seed": split_seed},
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        split_description=(
            f"example-disjoint, stratified seeded shuffle (seed {split_seed}) per class: "
            f"{fractions[0]:.0%}/{fractions[1]:.0%}/{fractions[2]:.0%} train/val/test"
        ),
    )
