"""Are the mislabeled tasks that task-IF misses harmful at all? Re-optimise a finished detection run without
each of a few tasks at the ranking's boundary and compare the true change of the validation loss with the
predictions.

    python benchmarks/detection_loo_boundary.py --run RUN [--ranking task-if-exact] [--missed 3] [--false-alarms 3]
                                                [--dtype float64] [--tol-ratio 1e-5] [--max-iter 300] [--threads 1]

RUN is the folder of `metainfluence experiment detection`. Recall at 1.25ρ counts the corrupted tasks
inside the top 1.25ρ·n of a ranking. This picks the corrupted tasks the ranking puts lowest (its
misses, `--missed`) and the clean tasks it puts highest (its false alarms, `--false-alarms`), and
leaves each out in turn: the proximal objective of the run is re-optimised from λ* (as the run's
`[detection] loo_tasks` ground truth does, in the same store `groundtruth_loo[_DTYPE]/`, so units are
shared and resumable). For each task it prints the true Δf (the change of the validation loss when the
task is removed; positive: the task helps), each kept ranking's predicted Δf, and the removal effect
at the ranking's boundary. Missed corrupted tasks whose true Δf is ≥ 0 help the measurement: no
faithful estimate of the validation loss's change would flag them, so a recall below 1 is then the
measurement's, not the estimate's. One float64 re-optimisation of the 3,000-task MNIST recipe pool
takes about 10 minutes on one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from _detection_run import load_for_reoptimisation, recall_boundary, reoptimisation_arguments, run_with_heartbeat
from metainfluence.evaluation.groundtruth import leave_one_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    reoptimisation_arguments(ap)
    ap.add_argument("--missed", type=int, default=3, help="corrupted tasks ranked lowest by the ranking")
    ap.add_argument("--false-alarms", type=int, default=3, help="clean tasks ranked highest by the ranking")
    args = ap.parse_args()
    run = Path(args.run)
    r = load_for_reoptimisation(args)
    flags, ranking, kept = r.flags, r.ranking, r.kept
    scores = kept[ranking]
    n = len(scores)
    cut, order = recall_boundary(scores, flags)  # order: most harmful first (a negative score: removal lowers the loss)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    missed = [int(k) for k in order.flip(0) if flags[k]][: args.missed]
    alarms = [int(k) for k in order if not flags[k]][: args.false_alarms]
    sample = sorted(missed + alarms)

    t = time.perf_counter()
    gts = dataclasses.replace(r.ground_truth, n_loo=len(sample))
    loo = leave_one_out(r.ctx.problem, r.lam, r.train, r.val, gts, r.refine, out_dir=r.store(run, "loo"), anchor=r.anchor,
                        sample=sample, progress=print)
    mean_g = r.mean_task_grad
    rows = []
    for k, true in zip(loo["tasks"].tolist(), loo["true_delta_f"].tolist()):
        rows.append({"task": k, "corrupted": bool(flags[k]), "role": "missed corrupted" if k in missed else "false alarm (clean)",
                     f"position in {ranking} (0 = most harmful; recall counts < {cut})": int(position[k]),
                     "true_delta_f": true, "predicted_delta_f": {m: float(s[k]) for m, s in kept.items()}})
    ratio = loo["max_grad_norm"] / mean_g if mean_g else None
    warnings = [] if ratio is None or ratio <= 2 * args.tol_ratio else [
        f"re-optimisations stopped above their tolerance (worst ratio {ratio:.2g} > {args.tol_ratio:g}): the true Δf carry optimiser "
        "error; raise --max-iter or refine the run on the proximal objective ([refine] proximal)"]
    out = {"run": str(run), "ranking": ranking, "n_tasks": n, "boundary_position": cut,
           "boundary_score": float(scores[order[cut - 1]]), "measurement": f"mean query loss of {len(r.val)} validation tasks",
           "sign": "Δf = f(λ without the task) − f(λ); positive: the task helps the measurement",
           "dtype": args.dtype, "tol_ratio": args.tol_ratio,
           "max_ratio_reached": ratio, "warnings": warnings,
           "reoptimisations_computed": loo["units_computed"], "seconds": time.perf_counter() - t,
           "tasks": rows}
    print(json.dumps(out, indent=1))
    for w in warnings:
        print("warning: " + w)


if __name__ == "__main__":
    run_with_heartbeat(main)
