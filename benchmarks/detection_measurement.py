"""Does the size of the validation pool limit detection by task-IF? Rescore a finished detection run
against a larger validation pool of the same split.

    python benchmarks/detection_measurement.py --run RUN [--val-tasks 1000] [--val-seed 1] [--ranking task-if] [--data-root DIR] [--threads 1]

RUN is the folder of `metainfluence experiment detection` (its refined λ*, corrupted pool, curvature file
and task-IF settings are reused; --ranking picks which kept task-IF tier, e.g. task-if-exact). The task-IF
score estimates the change of *this* validation pool's loss; with 100 validation tasks that loss is itself a
sample. This prints task-IF's detection AUC (with its stratified-bootstrap interval) against the run's own
validation pool and against a fresh, larger one drawn from the same split with another seed, and the
Spearman correlation of the two score vectors. If the larger pool raises the AUC, the measurement's size, not the estimate, limited it.
When the run kept a leave-one-out ground truth (`[detection] loo_tasks`), its re-optimised λ's are
re-measured on both pools: the ceiling AUC of a faithful score under each measurement. With
--reliability-splits K (default 4) it also measures each pool's split-half reliability (docs/method.md §5.1)
and sets the Spearman–Brown prophecy from the run's pool beside the reliability measured on the larger one,
and √(r₁r₂) beside the measured correlation of the two score vectors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from _detection_run import load_detection_run, run_with_heartbeat
from metainfluence import metrics, task_influence
from metainfluence.pipeline.run import RunContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder (holds refined.*, pools/, scores/task-if.*)")
    ap.add_argument("--val-tasks", type=int, default=1000, help="tasks of the larger validation pool")
    ap.add_argument("--val-seed", type=int, default=1, help="pool seed of the larger validation pool (the run's is 0 by default)")
    ap.add_argument("--data-root", default=None, help="dataset folder (else the recorded one, else $METAINFLUENCE_DATA)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranking", default="task-if", help="the kept task-IF tier to rescore (scores/NAME: task-if, task-if-exact, …)")
    ap.add_argument("--reliability-splits", type=int, default=4, help="halvings of each pool for its split-half reliability (0 = skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    ctx, lam, kept, settings = load_detection_run(run, args.data_root, args.ranking)
    flags = ctx.pools["train"].corrupted_tasks.bool().numpy()
    train = ctx.tensors["train"].to(dtype=lam.dtype)
    rows = [{"measurement": f"run's validation pool ({len(ctx.tensors['val'])} tasks)", "scores": kept.scores.double(), "seconds": None}]

    def larger(s):
        return dataclasses.replace(s, data=dataclasses.replace(s.data, val_tasks=args.val_tasks, pool_seed=args.val_seed))
    big, _ = RunContext.from_checkpoint(run / "refined", data_root=args.data_root, splits=("train", "val"), overrides=larger)
    t = time.perf_counter()
    res = task_influence(ctx.problem, lam, train, big.tensors["val"].to(dtype=lam.dtype), settings)
    rows.append({"measurement": f"fresh validation pool ({len(big.tensors['val'])} tasks, seed {args.val_seed})", "scores": res.scores.double(),
                 "seconds": time.perf_counter() - t, "residual": res.diagnostics.get("solver", {}).get("residual")})
    out = []
    for r in rows:
        s = -r.pop("scores")
        out.append({**r, "auc": metrics.detection_auc(s.numpy(), flags), "auc_ci95": metrics.detection_auc_interval(s.numpy(), flags),
                    "recall@1.25rho": metrics.recall_at(torch.argsort(s, descending=True, stable=True).numpy(), flags, min(1.0, 1.25 * flags.mean()))})
    a, b = kept.scores.double(), res.scores.double()
    out.append({"spearman_between_the_two_score_vectors": metrics.spearman(a, b),
                "pearson_between_the_two_score_vectors": float(torch.corrcoef(torch.stack([a, b]))[0, 1])})
    if args.reliability_splits:
        pools = {"run's": (ctx.tensors["val"], kept.extra.get("s")), "fresh": (big.tensors["val"], res.extra["s"])}
        out.append(_reliabilities(ctx, lam, train, pools, settings, args.reliability_splits, out[-1]))
    gt_dir = run / "groundtruth_loo"
    if (gt_dir / "control.safetensors").is_file():
        out.append(_ceilings(ctx, gt_dir, flags, {"run's": (ctx.tensors["val"], kept.scores), "fresh": (big.tensors["val"], res.scores)}))
    print(json.dumps(out, indent=1))


def _reliabilities(ctx, lam, train, pools: dict, settings, splits: int, between: dict) -> dict:
    """Each pool's split-half reliability, the prophecy of the larger pool's from the smaller's, and the
    correlation of the two score vectors that classical test theory predicts, √(r₁r₂) (independent pools)."""
    from metainfluence import measurement_reliability

    # each pool's own solve s = (H + δI)⁻¹∇f: its halves B then follow from A by linearity
    rec = {name: measurement_reliability(ctx.problem, lam, train, val.to(dtype=lam.dtype), settings, splits, s=s) for name, (val, s) in pools.items()}
    r1, r2 = rec["run's"]["reliability"], rec["fresh"]["reliability"]
    c = rec["fresh"]["n_val_tasks"] / rec["run's"]["n_val_tasks"]
    return {"reliability": {k: {x: v[x] for x in ("n_val_tasks", "reliability", "split_half_pearson", "split_half_spearman", "val_tasks_for_target", "seconds")}
                            for k, v in rec.items()},
            "prophecy_of_the_fresh_pool_from_the_runs": c * r1 / (1 + (c - 1) * r1), "measured_on_the_fresh_pool": r2,
            "predicted_pearson_between_the_score_vectors": (r1 * r2) ** 0.5 if r1 > 0 and r2 > 0 else None,
            "measured_pearson_between_the_score_vectors": between["pearson_between_the_two_score_vectors"]}


def _ceilings(ctx, gt_dir: Path, flags, pools: dict) -> dict:
    """The leave-one-out ground truth against each measurement pool. A re-optimisation does not depend on
    the measurement, so the kept λ_ctrl and Δλ_k = λ_{−k} − λ_ctrl of the run's `loo_tasks` units give the
    true Δf of any pool: f(λ_ctrl + Δλ_k) − f(λ_ctrl)."""
    from metainfluence.evaluation.groundtruth import validation_loss
    from metainfluence.io import read_tensors

    lam_ctrl = read_tensors(gt_dir / "control.safetensors")["lam"]
    units = sorted((int(p.stem.split("_")[1]), p) for p in gt_dir.glob("loo_*.safetensors"))
    ids = [k for k, _ in units]
    deltas = [read_tensors(p)["delta_lam"] for _, p in units]
    bad = flags[ids]
    result = {"loo_tasks": len(ids), "loo_corrupted": int(bad.sum())}
    for name, (val, scores) in pools.items():
        val = val.to(dtype=lam_ctrl.dtype)
        f0 = validation_loss(ctx.problem, lam_ctrl, val)
        harm = -torch.tensor([validation_loss(ctx.problem, lam_ctrl + d, val) - f0 for d in deltas], dtype=torch.float64)
        sus = -scores.double()[ids]
        result[name] = {"ceiling_auc": metrics.detection_auc(harm.numpy(), bad), "ceiling_auc_ci95": metrics.detection_auc_interval(harm.numpy(), bad),
                        "task_if_auc_on_sample": metrics.detection_auc(sus.numpy(), bad), "task_if_spearman_with_true_harm": metrics.spearman(sus, harm)}
    return result


if __name__ == "__main__":
    run_with_heartbeat(main)
