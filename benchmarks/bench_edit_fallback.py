"""Which closed-form edit comes closest to re-optimisation where the exact reduced Hessian H_R is indefinite at λ*?

On small digits meta-learners (MLP, tanh, μ > 0) trained and refined to a stationary λ* with exact Newton, each of
several task removals is re-optimised from λ* (exact Newton on the reduced objective, the ground truth λ_R) and
edited four ways: the default reduced step (exact H_R, falling back to the Gauss–Newton H_R where H_R + δI is
indefinite), the paper's full-pool step with the exact H, and both steps with the Gauss–Newton kind. Reported per
edit: the share of the true change of the validation loss it recovers, (f(λ_edit) − f(λ*)) / (f(λ_R) − f(λ*)), and
its parameter error ‖λ_edit − λ_R‖ / ‖λ_R − λ*‖, with whether the exact H_R was indefinite.

    python benchmarks/bench_edit_fallback.py [--seeds 0 1 2] [--remove 1 5 15] [--tasks 60] [--hidden 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch

from metainfluence import InfluenceSettings, Removal, RefineSettings, edit_model, refine
from metainfluence.evaluation.groundtruth import validation_loss
from metainfluence.linalg import materialize
from metainfluence.meta.curvature import TotalHessian
from metainfluence.meta.models import ModelSettings
from metainfluence.meta.train import meta_train
from metainfluence.pipeline import DataSettings, ObjectiveSettings, RunContext, RunSettings
from metainfluence.meta import TrainSettings

EDITS = {"reduced (exact, GN fallback)": ("exact", "reduced"), "full (exact)": ("exact", "full"),
         "reduced (gauss-newton)": ("gauss-newton", "reduced"), "full (gauss-newton)": ("gauss-newton", "full")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--remove", type=int, nargs="+", default=[1, 5, 15], help="tasks removed per edit (the first tasks of a seeded shuffle)")
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for seed in args.seeds:
        settings = RunSettings(data=DataSettings(dataset="digits", train_tasks=args.tasks, val_tasks=30, test_tasks=10, pool_seed=seed),
                               model=ModelSettings(hidden=(args.hidden,), activation="tanh"), objective=ObjectiveSettings(weight_decay=1e-2),
                               train=TrainSettings(steps=args.steps, meta_batch=10, lr=3e-3, seed=seed, checkpoint_every=0))
        ctx = RunContext.prepare(settings)
        problem = ctx.problem
        train, val = ctx.tensors["train"].to(dtype=torch.float64), ctx.tensors["val"].to(dtype=torch.float64)
        lam, _ = meta_train(problem, problem.init_params(torch.float32), ctx.tensors["train"], settings.train, progress=False)
        newton = RefineSettings(method="newton", tol=1e-10, max_iter=50)
        lam, rep = refine(problem, lam.double(), train, newton)
        f0 = validation_loss(problem, lam, val)
        order = torch.randperm(args.tasks, generator=torch.Generator().manual_seed(seed)).tolist()
        for k in args.remove:
            removal = Removal(tasks=sorted(order[:k]))
            w, v, u = removal.weights(problem, lam, train)
            lam_r, rep_r = refine(problem, lam, train, newton, w=w)
            true = validation_loss(problem, lam_r, val) - f0
            indefinite = float(torch.linalg.eigvalsh(materialize(TotalHessian(problem, lam, train, "exact", w=w, v=v, u=u))).min()) < 0
            row = {"seed": seed, "removed": k, "stationary": rep.grad_norm_after, "reoptimised": rep_r.grad_norm_after,
                   "exact_H_R_indefinite": indefinite, "true_delta_f": true}
            for name, (hessian, step) in EDITS.items():
                s = InfluenceSettings(hessian=hessian, solver="explicit", damping=1e-3, stationarity_warn=1e9)
                edit = edit_model(problem, lam, train, removal, s, step=step)
                row[name] = {"recovered": (validation_loss(problem, edit.lam, val) - f0) / true,
                             "param_error": float((edit.lam - lam_r).norm() / (lam_r - lam).norm()), "hessian_used": edit.diagnostics["hessian"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for subset, pick in (("exact H_R indefinite", True), ("exact H_R positive definite", False)):
        chosen = [r for r in rows if r["exact_H_R_indefinite"] == pick]
        if chosen:
            print(f"\n{subset}: {len(chosen)} removals; median recovered share / parameter error")
            for name in EDITS:
                print(f"  {name:32s} {statistics.median(r[name]['recovered'] for r in chosen):6.3f} / "
                      f"{statistics.median(r[name]['param_error'] for r in chosen):6.3f}")


if __name__ == "__main__":
    main()
