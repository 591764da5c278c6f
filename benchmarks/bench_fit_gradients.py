"""Scoring + fit + edit with the fisher fit's pass serving the scores and edits, against the same work as the removal
table charged it before, timed side by side on a finished detection or removal run.

    python benchmarks/bench_fit_gradients.py --run RUN [--tasks N] [--val-tasks 500] [--fraction 0.4] [--repeats 2] [--data-root DIR]

RUN is a `metainfluence experiment detection` folder (its refined λ*, training and validation pools and task-IF
settings are reused; the first N training tasks with --tasks). Both forms run task-IF with the fisher curvature
file (solver ``curvature``) and the full-H edit removing its top ``--fraction``, as the removal experiment does:

* ``before``: the fit outside a reuse block (a floor pass, then the fisher rows; Gram matrix G Gᵀ as one product),
  a fresh load of the saved file for the score (its Gram formed again), the score's own pass of per-task gradients,
  the edit's own pass over the removed tasks;
* ``now``: fit, score and edit in one reuse block (rows and per-task gradients from one pass, kept; the Gram from its
  upper triangle, formed once).

Charged = what the removal table charges (the floor pass is not); wall = everything. Alternates the forms, prints
medians, their ratios and the largest differences of the scores and edited λ.

With --passes N, times only the passes on the first N training tasks instead: the fisher rows and the per-task
gradients as two passes (``fisher_factor`` then ``problem.total_gradients``) against the one fused pass
(``fisher_factor_and_gradients``), alternating ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _detection_run import load_detection_run
from metainfluence.evaluation.metrics import fraction_to_count
from metainfluence.influence import curvature as curvature_module
from metainfluence.influence.curvature import fit_curvature
from metainfluence.influence.editing import Removal, edit_model
from metainfluence.influence.gradients import reusing_measurement_gradients
from metainfluence.influence.task_if import task_influence
from metainfluence.linalg import woodbury
from metainfluence.meta.curvature import fisher_factor, fisher_factor_and_gradients


def workflow(problem, lam, train, val, settings, fraction: float, folder: Path, before: bool) -> dict:
    """fit → save → score → edit; seconds of each, the scores and the edited λ."""
    t0 = time.perf_counter()
    art = fit_curvature(problem, lam, train, settings, method="fisher", probes=4)
    art.save(folder / "curv")
    t1 = time.perf_counter()
    if before:
        curvature_module._LOADED.clear()  # the score read the file afresh, without the fit's factorisation
    s = dataclasses.replace(settings, solver="curvature", curvature_file=str(folder / "curv"), self_influence=False, removal="first-order")
    res = task_influence(problem, lam, train, val, s)
    t2 = time.perf_counter()
    removal = Removal(tasks=res.ranking(harmful_first=True)[: fraction_to_count(fraction, len(train))].tolist())
    ed = edit_model(problem, lam, train, removal, s, step="full")
    t3 = time.perf_counter()
    floor = art.info["floor_seconds"] or 0.0
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "edit_s": t3 - t2, "floor_s": floor, "wall_s": t3 - t0, "charged_s": t3 - t0 - floor,
            "scores": res.scores, "lam": ed.lam}


def passes(problem, lam, train, settings, args) -> None:
    times: dict[str, list[float]] = {"two_passes": [], "fused": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        rows, grads = fisher_factor(problem, lam, train, settings.fisher_samples, settings.seed), problem.total_gradients(lam, train)
        times["two_passes"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rows2, grads2, own_draws = fisher_factor_and_gradients(problem, lam, train, settings.fisher_samples, settings.seed)
        times["fused"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"run": args.run, "tasks": len(train), "fisher_samples": settings.fisher_samples, "dtype": str(lam.dtype), "threads": args.threads,
                      "seconds": times, "median_s": med, "speedup": med["two_passes"] / med["fused"], "tasks_drawing_own_labels": own_draws,
                      "rows_max_abs_diff": float((rows - rows2).abs().max()), "gradients_max_abs_diff": float((grads - grads2).abs().max())}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder (refined.*, pools/, scores/task-if.*)")
    ap.add_argument("--tasks", type=int, default=0, help="the first N training tasks only (0: all)")
    ap.add_argument("--val-tasks", type=int, default=500, help="the first N validation tasks (the removal table's measurement: 500)")
    ap.add_argument("--fraction", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=0, help="time only the two passes against the fused one, on the first N tasks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx, lam, _, settings = load_detection_run(Path(args.run), args.data_root)
    if args.passes:
        return passes(ctx.problem, lam, ctx.tensors["train"].to(dtype=lam.dtype).subset(slice(0, args.passes)), settings, args)
    settings = dataclasses.replace(settings, hessian="fisher", curvature_file="")
    train = ctx.tensors["train"].to(dtype=lam.dtype)
    if args.tasks:
        train = train.subset(slice(0, args.tasks))
    val = ctx.tensors["val"].to(dtype=lam.dtype).subset(slice(0, args.val_tasks))
    plain_gram, times, out = woodbury.gram, {"before": [], "now": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for form in ("before", "now"):
                folder = Path(tmp) / form
                folder.mkdir(exist_ok=True)
                if form == "before":
                    woodbury.gram = lambda G, block=0: G @ G.T  # the Gram matrix as one product, as before
                    try:
                        out[form] = workflow(ctx.problem, lam, train, val, settings, args.fraction, folder, True)
                    finally:
                        woodbury.gram = plain_gram
                else:
                    with reusing_measurement_gradients():
                        out[form] = workflow(ctx.problem, lam, train, val, settings, args.fraction, folder, False)
                times[form].append({k: v for k, v in out[form].items() if k.endswith("_s")})
    med = {form: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for form, ts in times.items()}
    b, n = out["before"], out["now"]
    report = {"run": args.run, "tasks": len(train), "val_tasks": len(val), "dtype": str(lam.dtype), "threads": args.threads,
              "repeats": args.repeats, "median_s": med,
              "charged_speedup": med["before"]["charged_s"] / med["now"]["charged_s"], "wall_speedup": med["before"]["wall_s"] / med["now"]["wall_s"],
              "scores_max_rel_diff": float((b["scores"] - n["scores"]).abs().max() / b["scores"].abs().max()),
              "edit_max_rel_diff": float((b["lam"] - n["lam"]).abs().max() / (b["lam"] - lam).abs().max())}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
