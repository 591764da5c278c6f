"""What the benchmarks that rescore a finished detection run read from its folder."""

from __future__ import annotations

from pathlib import Path

from metainfluence.config import settings_from_dict
from metainfluence.influence.results import InfluenceResult, InfluenceSettings
from metainfluence.pipeline.run import RunContext


def load_detection_run(run: Path, data_root: str | None):
    """(context with the train and val pools, refined λ*, task-IF's kept result, its influence settings) of a
    `metainfluence experiment detection` folder."""
    kept = InfluenceResult.load(run / "scores" / "task-if")
    settings = settings_from_dict(InfluenceSettings, kept.settings["influence"], source=f"{run}/scores/task-if")
    ctx, ckpt = RunContext.from_checkpoint(run / "refined", data_root=data_root, splits=("train", "val"))
    return ctx, ckpt.lam, kept, settings
