"""What the benchmarks that rescore a finished detection run read from its folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metainfluence.config import settings_from_dict
from metainfluence.influence.results import InfluenceResult, InfluenceSettings
from metainfluence.pipeline.run import RunContext


def load_detection_run(run: Path, data_root: str | None, ranking: str = "task-if"):
    """(context with the train and val pools, refined λ*, the kept result of ``ranking`` (a task-IF tier: task-if,
    task-if-exact, …), its influence settings) of a `metainfluence experiment detection` folder."""
    kept = InfluenceResult.load(run / "scores" / ranking)
    settings = settings_from_dict(InfluenceSettings, kept.settings["influence"], source=f"{run}/scores/{ranking}")
    own = run / "curvature"
    if settings.curvature_file and own.with_suffix(".json").is_file():
        # the run keeps its curvature file beside its scores: read it there, even when the folder was moved
        # (the fingerprint check still refuses a file of another λ*)
        settings = dataclasses.replace(settings, curvature_file=str(own))
    ctx, ckpt = RunContext.from_checkpoint(run / "refined", data_root=data_root, splits=("train", "val"))
    return ctx, ckpt.lam, kept, settings


def run_with_heartbeat(main) -> None:
    """Run a rescoring benchmark as the CLI's --no-progress does: no bars, but a CG solve or pool pass that runs
    over a minute prints its status (iteration, residual, ETA) as one line a minute on stderr."""
    from metainfluence.progress import showing

    with showing(False, heartbeat=60):
        main()
