"""Does task-IF detect better against the loss the model is evaluated with? Rescore a finished detection run
with the measurement adapted by the evaluation's inner steps (`[inner] eval_steps`) instead of training's.

    python benchmarks/detection_eval_steps.py --run RUN [--steps K] [--data-root DIR] [--threads 1]

RUN is the folder of `metainfluence experiment detection`. Its task-IF score is the predicted change of the
mean validation query loss *after training's adaptation* (e.g. one inner step), the loss F's tasks are trained
on. Meta-test accuracy adapts with `eval_steps` (e.g. three). The measurement f_K(λ) = mean validation query
loss after K inner steps is just as differentiable; only ∇f changes, not the Hessian of the training
objective or the task gradients. This scores the pool against both measurements with the run's task-IF
settings (its curvature file, its damping) and prints each one's detection AUC, recall at 1.25ρ and the
Spearman correlation of the two score vectors. The validation loss and accuracy after K steps are printed
beside them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from _detection_run import load_detection_run, recall_boundary, run_with_heartbeat
from metainfluence import metrics
from metainfluence.influence.gradients import measurement_gradient
from metainfluence.influence.task_if import ihvp
from metainfluence.influence.hessian_of import build_hessian
from metainfluence.meta.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder")
    ap.add_argument("--steps", type=int, default=0, help="inner steps of the second measurement (0 = the run's eval_steps)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    ctx, lam, kept, settings = load_detection_run(run, args.data_root, "task-if")
    problem = ctx.problem
    flags = ctx.pools["train"].corrupted_tasks.bool()
    train, val = ctx.tensors["train"].to(dtype=lam.dtype), ctx.tensors["val"].to(dtype=lam.dtype)
    n = len(train)
    steps = args.steps or problem.inner.eval_steps or problem.inner.steps

    t = time.perf_counter()
    op = build_hessian(problem, lam, train, settings)
    G = problem.total_gradients(lam, train)
    shared = time.perf_counter() - t
    rows = []
    for k in dict.fromkeys([problem.inner.steps, steps]):
        measured = copy.copy(problem)  # shares the model template; only the measurement's inner loop differs
        measured.inner = dataclasses.replace(problem.inner, steps=k, eval_steps=0)
        t = time.perf_counter()
        grad_f, f = measurement_gradient(measured, lam, val)
        res = ihvp(op, grad_f, settings)
        scores = (G @ res.x) / n
        acc = evaluate(measured, lam, val)
        cut, order = recall_boundary(scores, flags)
        rows.append({"measurement": f"mean validation query loss after {k} inner step(s)", "f": f, "val_accuracy": acc.accuracy,
                     "auc": metrics.detection_auc((-scores).numpy(), flags.numpy()),
                     "auc_ci95": metrics.detection_auc_interval((-scores).numpy(), flags.numpy()),
                     "recall@1.25rho": float(flags[order[:cut]].sum()) / float(flags.sum()),
                     "solver_residual": res.residual, "seconds": time.perf_counter() - t, "scores": scores})
    out = {"run": str(run), "n_tasks": n, "measurement_tasks": len(val), "hessian_and_task_gradients_seconds": shared,
           "sign": "score = predicted change of the measurement when the task is removed; the most negative (harmful) first",
           "kept_task_if_vs_recomputed_spearman": metrics.spearman(kept.scores.double(), rows[0]["scores"].double()),
           "rows": [{k: v for k, v in r.items() if k != "scores"} for r in rows]}
    if len(rows) == 2:
        out["spearman_between_the_measurements"] = metrics.spearman(rows[0]["scores"].double(), rows[1]["scores"].double())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    run_with_heartbeat(main)
