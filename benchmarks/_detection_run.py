"""What the benchmarks that rescore a finished detection run read from its folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from metainfluence.config import settings_from_dict
from metainfluence.evaluation.groundtruth import GroundTruthSettings
from metainfluence.evaluation.metrics import fraction_to_count
from metainfluence.influence.results import InfluenceResult, InfluenceSettings
from metainfluence.meta.refine import RefineSettings
from metainfluence.pipeline.proximal import proximal_of
from metainfluence.pipeline.run import RunContext
from metainfluence.tasks.tensors import TaskTensors


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


def recall_cut(corrupted: torch.Tensor, factor: float = 1.25) -> int:
    """Recall at ``factor``·ρ counts the corrupted tasks in the top this many of a ranking (the experiment's count,
    metrics.fraction_to_count)."""
    return fraction_to_count(min(1.0, factor * float(corrupted.double().mean())), len(corrupted))


def recall_boundary(scores: torch.Tensor, corrupted: torch.Tensor, factor: float = 1.25) -> tuple[int, torch.Tensor]:
    """(cut, order) of a ranking: ``order`` lists the tasks most harmful first (ascending score), and recall at
    ``factor``·ρ counts the corrupted tasks in ``order[:cut]``."""
    return recall_cut(corrupted, factor), torch.argsort(scores.double(), stable=True)


def reoptimisation_arguments(ap) -> None:
    """The options of the benchmarks that re-optimise a detection run without some of its tasks."""
    ap.add_argument("--run", required=True, help="detection experiment folder")
    ap.add_argument("--ranking", default="task-if-exact", help="kept scores (scores/NAME) whose boundary is probed; task-if when absent")
    ap.add_argument("--dtype", default="float64", help="precision of the re-optimisations")
    ap.add_argument("--tol-ratio", type=float, default=1e-5, help="stationarity ‖∇P‖ / mean‖g_i‖ of each re-optimisation")
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)


@dataclasses.dataclass
class Reoptimisation:
    """What the re-optimising benchmarks read from a detection run: its context and λ*, the corrupted flags, the
    probed ranking and the kept scores, and the settings every re-optimisation uses (the run's proximal γ and
    anchor, L-BFGS to ``--tol-ratio`` in ``--dtype``)."""

    ctx: RunContext
    lam: torch.Tensor
    flags: torch.Tensor
    ranking: str
    kept: dict[str, torch.Tensor]
    ground_truth: GroundTruthSettings
    refine: RefineSettings
    anchor: torch.Tensor | None
    mean_task_grad: float | None  # mean ‖g_i‖ at λ*: the stationarity ratio's denominator
    train: TaskTensors
    val: TaskTensors

    def store(self, run: Path, kind: str) -> Path:
        """The run's unit folder of ``kind`` (loo, groups), suffixed by the dtype when it is not the run's."""
        name = f"groundtruth_{kind}"
        return run / (name if self.refine.dtype == self.ctx.settings.refine.dtype else f"{name}_{self.refine.dtype}")


def load_for_reoptimisation(args) -> Reoptimisation:
    """The run ``args.run`` read once for re-optimisation; the ranking falls back to task-if when the run kept no
    ``args.ranking``."""
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    ctx, refined = RunContext.from_checkpoint(run / "refined", data_root=args.data_root, splits=("train", "val"))
    lam = refined.lam
    names = [p.stem for p in sorted((run / "scores").glob("*.json"))]
    kept = {m: InfluenceResult.load(run / "scores" / m).scores.double() for m in names if m.startswith("task-if") or m in ("direct-if", "tracin")}
    prox = proximal_of(refined)
    return Reoptimisation(
        ctx=ctx, lam=lam, flags=ctx.pools["train"].corrupted_tasks.bool(), ranking=args.ranking if args.ranking in names else "task-if",
        kept=kept, ground_truth=GroundTruthSettings(n_loo=0, method="lbfgs", proximal=float(prox[0]) if prox else 0.0),
        refine=RefineSettings(method="lbfgs", tol=0.0, tol_ratio=args.tol_ratio, max_iter=args.max_iter, dtype=args.dtype),
        anchor=prox[1] if prox else None, mean_task_grad=(refined.info.get("refine_report") or {}).get("task_grad_norm_after"),
        train=ctx.tensors["train"].to(dtype=lam.dtype), val=ctx.tensors["val"].to(dtype=lam.dtype))
