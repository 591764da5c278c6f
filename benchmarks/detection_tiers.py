"""Which approximation of the total Hessian keeps the exact tier's detection? Rescore a finished detection run
with other Hessian kinds and solvers and compare each with its kept rankings.

    python benchmarks/detection_tiers.py --run RUN [--tier fisher:4:woodbury] [--tier gauss-newton::cg] [--tier fisher:1:woodbury:0.01] ... [--threads 1]

RUN is the folder of `metainfluence experiment detection` (its refined λ*, corrupted pool, validation pool and
influence settings are reused; λ*'s dtype is kept). A tier is HESSIAN:FISHER_SAMPLES:SOLVER[:DAMPING] (samples
only for fisher; DAMPING is the total δ, by default the run's, which after a proximal refine includes γ: a smaller
one asks how much the proximal term's γI, not the curvature, shapes the ranking). For each tier this prints task-IF's detection AUC (with its stratified-bootstrap interval), recall at ρ
and 1.25ρ, the solve's residual, the seconds it took, and its Spearman correlation with each kept task-IF
ranking of the run (`scores/task-if*`: the run's own tier, and the exact tier when the run has
`task-if-exact`). Sign: scores are the predicted change of the validation loss when a task is removed.
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
from metainfluence.influence.results import InfluenceResult


def _tier(spec: str) -> dict:
    hessian, samples, solver, damping = (spec.split(":") + ["", "", ""])[:4]
    return {"hessian": hessian, "fisher_samples": int(samples) if samples else None, "solver": solver or "cg",
            "damping": float(damping) if damping else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder")
    ap.add_argument("--tier", action="append", default=[], help="HESSIAN:FISHER_SAMPLES:SOLVER[:DAMPING] (repeatable), e.g. fisher:4:woodbury, gauss-newton::cg, fisher:1:woodbury:0.01")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    ctx, lam, _, settings = load_detection_run(run, args.data_root)
    flags = ctx.pools["train"].corrupted_tasks.bool().numpy()
    rho = float(flags.mean())
    train, val = ctx.tensors["train"].to(dtype=lam.dtype), ctx.tensors["val"].to(dtype=lam.dtype)
    kept = {p.stem: InfluenceResult.load(p.with_suffix("")).scores.double() for p in sorted((run / "scores").glob("task-if*.json"))}

    def row(name: str, scores: torch.Tensor, extra: dict) -> dict:
        s = -scores.double()  # suspicion: removal lowers the validation loss most
        order = torch.argsort(s, descending=True, stable=True).numpy()
        return {"ranking": name, "auc": metrics.detection_auc(s.numpy(), flags), "auc_ci95": metrics.detection_auc_interval(s.numpy(), flags),
                "recall@rho": metrics.recall_at(order, flags, rho), "recall@1.25rho": metrics.recall_at(order, flags, min(1.0, 1.25 * rho)),
                **extra, "spearman_with": {k: metrics.spearman(scores.double(), v) for k, v in kept.items() if k != name}}

    out = [row(k, v, {"kept": True}) for k, v in kept.items()]
    for spec in args.tier:
        t = _tier(spec)
        s = dataclasses.replace(settings, method="task-if", hessian=t["hessian"], solver=t["solver"], curvature_file="", removal="first-order",
                                fisher_samples=t["fisher_samples"] or settings.fisher_samples, self_influence=False,
                                damping=settings.damping if t["damping"] is None else t["damping"])
        t0 = time.perf_counter()
        res = task_influence(ctx.problem, lam, train, val, s)
        diag = res.diagnostics.get("solver", {})
        out.append(row(spec, res.scores, {"damping": s.damping, "seconds": time.perf_counter() - t0, "residual": diag.get("residual"),
                                          "iterations": diag.get("iterations"), "converged": diag.get("converged")}))
        print(json.dumps(out[-1]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    run_with_heartbeat(main)
