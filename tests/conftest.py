"""Shared fixtures. Real datasets are found through METAINFLUENCE_DATA (CI points it at ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


# The test problems are tiny: one thread avoids thread-pool overhead that dominates them on a 2-core
# machine (the sinusoid leave-one-out tests: 20 s with 1 thread, over 2 minutes with 2 on a busy machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder holding the real datasets (omniglot/, mnist/, fashion-mnist/, mini-imagenet/)."""
    root = os.environ.get("METAINFLUENCE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("real data not available: set METAINFLUENCE_DATA to the shared data folder (e.g. ../shared/data)")
    return Path(root)
