"""Cost of task-IF against its floor and against retraining (a script, not a test), in ONE run.

Problem: digits, 5-way 1-shot 5-query, a pool of ``--tasks`` training tasks (default 100) and 50
validation tasks, tanh MLP (``--hidden``, default 32 → 2,245 parameters), MAML with 1 inner step
(lr 0.4), μ = 1e-2, standardised inputs — the demo's setup with a smaller pool. It is meta-trained
briefly (Adam, ``--train-steps``) and refined (L-BFGS, float64) to near-stationarity. Then:

1. **Floor**: one chunked pass of per-task total gradients, ``problem.total_gradients`` over the
   whole pool (``--chunk`` tasks per vmapped chunk). Every task-IF has to do this pass (plus the
   iHVP), so time / floor is the overhead of the Hessian part.
2. **task-IF for the whole pool** (``task_influence``: measurement gradient, one iHVP, one pass of
   total gradients) for every Hessian kind × solver: exact, gauss-newton, gamma, fisher ×
   explicit, cg, neumann, lissa, lowrank, plus fisher + woodbury. ``explicit`` materialises the
   p × p matrix and is only run where the estimated cost (measured time of one 64-column block of
   HVPs × p / 64) is below ``--explicit-budget`` seconds; the others are reported as skipped with
   the estimate. Neumann and LiSSA stop at ``--depth`` terms (the residual column says how far
   that is from the answer); LiSSA uses ``--lissa-batch`` tasks per HVP.
3. **Retraining**: one leave-one-task-out re-optimisation by the refine stage (warm start at λ*,
   w_k = 0, the same L-BFGS settings), measured on ``--loo-samples`` tasks and multiplied by n —
   EXTRAPOLATED, not measured for all n. Also retraining from scratch (train + refine, measured
   once) × n, again extrapolated.

Timing: the floor is the fastest of ``--repeats`` passes after a warm-up; each task-IF that takes
under ``--repeat-below`` s is run ``--if-repeats`` times and the fastest counts (its first run
includes any one-time warm-up); slower ones run once.

Prints a markdown table (time, ratio to the floor, retraining ÷ task-IF, HVPs, residual) and
writes everything to ``--json``. Timings are wall-clock on whatever machine runs it.

    python benchmarks/bench_influence.py --threads 1 --json bench_influence.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from metainfluence.allocator import tune_allocator
from metainfluence.meta.curvature import TotalHessian
from metainfluence.influence.results import InfluenceSettings
from metainfluence.linalg import SolverSettings
from metainfluence.influence.task_if import task_influence
from metainfluence.io import write_json
from metainfluence.meta.models import ModelSettings
from metainfluence.meta.refine import RefineSettings, RefineWarning, refine
from metainfluence.pipeline import RunContext, RunSettings, train_stage

HESSIANS = ("exact", "gauss-newton", "gamma", "fisher")
SOLVERS = ("explicit", "cg", "neumann", "lissa", "lowrank")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs after a warm-up (on a shared machine the minimum is the least
    disturbed measurement)."""
    fn()  # warm-up
    return min(timed(fn)[1] for _ in range(repeats))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100, help="training tasks n (default 100)")
    p.add_argument("--val-tasks", type=int, default=50, help="validation tasks of the measurement (default 50)")
    p.add_argument("--hidden", type=int, default=32, help="MLP hidden width (default 32)")
    p.add_argument("--train-steps", type=int, default=300, help="Adam meta-training steps (default 300)")
    p.add_argument("--refine-iters", type=int, default=300, help="L-BFGS iterations of refine and of each leave-one-out (default 300)")
    p.add_argument("--chunk", type=int, default=50, help="tasks per vmapped chunk in every pool pass (default 50)")
    p.add_argument("--damping", type=float, default=1e-2, help="damping δ of every solve (default 1e-2)")
    p.add_argument("--tol", type=float, default=1e-6, help="solver tolerance (cg: relative residual; neumann/lissa: relative change)")
    p.add_argument("--depth", type=int, default=200, help="most Neumann/LiSSA terms (default 200)")
    p.add_argument("--lissa-batch", type=int, default=10, help="tasks per LiSSA HVP (default 10)")
    p.add_argument("--rank", type=int, default=20, help="lowrank: eigenpairs kept (default 20; Lanczos runs 2k+10 steps)")
    p.add_argument("--explicit-budget", type=float, default=200.0, help="run explicit only if materialising H is estimated below this many seconds")
    p.add_argument("--loo-samples", type=int, default=3, help="leave-one-out re-optimisations actually timed (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the floor measurement (fastest counts)")
    p.add_argument("--if-repeats", type=int, default=3, help="repeats of each task-IF whose first run took under --repeat-below s (fastest counts)")
    p.add_argument("--repeat-below", type=float, default=10.0, help="repeat only task-IF runs faster than this (default 10 s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default="bench_influence.json", help="where to write all numbers")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_allocator()
    warnings.simplefilter("ignore", RefineWarning)
    t_all = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)

    base = RunSettings()
    settings = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, train_tasks=args.tasks, val_tasks=args.val_tasks, test_tasks=10),
        model=ModelSettings(hidden=(args.hidden,), activation="tanh"),
        train=dataclasses.replace(base.train, steps=args.train_steps, checkpoint_every=0),
        refine=RefineSettings(tol=1e-6, max_iter=args.refine_iters),
    )
    ctx = RunContext.prepare(settings, None, splits=("train", "val"), save_pools=False)
    problem = ctx.problem
    problem.chunk_size = args.chunk
    n, p = args.tasks, problem.dim
    log(f"problem: digits 5-way 1-shot, {n} tasks, MLP hidden {args.hidden} ({p} parameters), chunk {args.chunk}, {args.threads} thread(s)")

    (lam_trained, history, _), t_train = timed(lambda: train_stage(ctx, progress=False))
    train = ctx.tensors["train"].to(dtype=torch.float64)
    val = ctx.tensors["val"].to(dtype=torch.float64)
    (lam, report), t_refine = timed(lambda: refine(problem, lam_trained, train, settings.refine))
    log(f"trained {history.steps_done} steps in {t_train:.1f} s; {report.summary()}")

    # 1. floor
    floor = best_time(lambda: problem.total_gradients(lam, train), args.repeats)
    log(f"floor (one chunked pass of per-task total gradients): {floor:.3f} s")

    # 2. task-IF, every Hessian × solver
    rows = []
    for hessian in HESSIANS:
        combos = SOLVERS + (("woodbury",) if hessian == "fisher" else ())
        for solver in combos:
            s = InfluenceSettings(hessian=hessian, solver=solver, damping=args.damping, stationarity_warn=1.0, solve=SolverSettings(tol=args.tol, max_iter=500, neumann_depth=args.depth, lissa_batch=args.lissa_batch if solver == "lissa" else None, lowrank_rank=args.rank))
            row = {"hessian": hessian, "solver": solver}
            if solver == "explicit" and hessian != "fisher":
                op = TotalHessian(problem, lam, train, hessian)
                block = torch.zeros(p, 64, dtype=torch.float64)
                block[torch.arange(64), torch.arange(64)] = 1
                _, t_block = timed(lambda: op.matmat(block))
                estimate = t_block * math.ceil(p / 64)
                row["explicit_estimate_s"] = estimate
                if estimate > args.explicit_budget:
                    row["skipped"] = f"materialising the {p}×{p} H estimated at {estimate:.0f} s (> --explicit-budget {args.explicit_budget:g})"
                    log(f"{hessian:>12} {solver:>9}: skipped ({row['skipped']})")
                    rows.append(row)
                    continue
            try:
                res, t = timed(lambda: task_influence(problem, lam, train, val, s))
                runs = [t]
                while t < args.repeat_below and len(runs) < args.if_repeats:
                    res_again, t_again = timed(lambda: task_influence(problem, lam, train, val, s))
                    runs.append(t_again)
                    if t_again < min(runs[:-1]):
                        res = res_again
                t = min(runs)
            except Exception as exc:  # a solver that diverges is a result too
                row["error"] = " ".join(str(exc).split())
                log(f"{hessian:>12} {solver:>9}: FAILED {row['error']}")
                rows.append(row)
                continue
            d = res.diagnostics
            row.update(
                seconds=t,
                runs_s=runs,
                ratio_to_floor=t / floor,
                ihvp_seconds=d["timings_s"].get("ihvp"),
                hvps=d["solver"].get("hvps"),
                iterations=d["solver"].get("iterations"),
                residual=d["solver"].get("residual"),
                converged=d["solver"].get("converged"),
                scores_head=res.scores[:3].tolist(),
            )
            rows.append(row)
            log(f"{hessian:>12} {solver:>9}: {t:7.2f} s = {t / floor:7.1f}× floor, {row['hvps']} HVPs, residual {row['residual']:.2g}")

    # 3. retraining (extrapolated)
    loo_times, loo_reports = [], []
    for k in range(args.loo_samples):
        w = torch.ones(n, dtype=torch.float64)
        w[k] = 0
        (_, rep), t = timed(lambda: refine(problem, lam, train, settings.refine, w=w))
        loo_times.append(t)
        loo_reports.append({"task": k, "seconds": t, "iterations": rep.iterations, "grad_norm_after": rep.grad_norm_after, "converged": rep.converged})
        log(f"leave-one-out re-optimisation of task {k}: {t:.1f} s, {rep.iterations} iterations, ‖∇F‖ {rep.grad_norm_after:.2g}")
    loo_mean = statistics.mean(loo_times)
    retrain = {
        "loo_measured_s": loo_times,
        "loo_runs": loo_reports,
        "loo_mean_s": loo_mean,
        "loo_all_tasks_extrapolated_s": loo_mean * n,
        "scratch_train_plus_refine_s": t_train + t_refine,
        "scratch_all_tasks_extrapolated_s": (t_train + t_refine) * n,
    }
    for row in rows:
        if "seconds" in row:
            row["loo_retraining_over_this"] = retrain["loo_all_tasks_extrapolated_s"] / row["seconds"]
            row["scratch_retraining_over_this"] = retrain["scratch_all_tasks_extrapolated_s"] / row["seconds"]

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "problem": {"dataset": "digits", "n_way": 5, "k_shot": 1, "q_query": 5, "train_tasks": n, "val_tasks": args.val_tasks,
                    "model": f"MLP(64 → {args.hidden} → 5, tanh)", "n_params": p, "inner": "1 step, lr 0.4 (second-order MAML)",
                    "weight_decay": settings.objective.weight_decay, "chunk": args.chunk, "damping": args.damping, "tol": args.tol,
                    "neumann_depth": args.depth, "lissa_batch": args.lissa_batch, "lowrank_rank": args.rank},
        "stages": {"train_s": t_train, "train_steps": history.steps_done, "refine_s": t_refine, "refine": report.to_json()},
        "floor_s": floor,
        "task_if": rows,
        "retraining": retrain,
        "machine": machine,
        "total_s": time.perf_counter() - t_all,
    }
    write_json(args.json, out)
    print(format_table(out))
    return 0


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def format_table(out: dict) -> str:
    r = out["retraining"]
    n = out["problem"]["train_tasks"]
    runs = ", ".join(f"{x['iterations']} L-BFGS iterations to ‖∇F‖ {x['grad_norm_after']:.1g}" for x in r["loo_runs"])
    lines = [
        f"floor = one chunked pass of per-task total gradients over the {n} tasks: **{out['floor_s']:.3f} s**",
        "",
        "| Hessian | solver | task-IF time (s) | of which iHVP (s) | ÷ floor | LOO retraining ÷ task-IF | scratch retraining ÷ task-IF | HVPs | iterations | rel. residual |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in out["task_if"]:
        if "seconds" not in row:
            why = row.get("skipped") or f"failed: {row.get('error')}"
            lines.append(f"| {row['hessian']} | {row['solver']} | — | — | — | — | — | — | — | {why} |")
            continue
        lines.append(
            f"| {row['hessian']} | {row['solver']} | {row['seconds']:.2f} | {_fmt(row['ihvp_seconds'], '.2f')} | {row['ratio_to_floor']:.1f} | "
            f"{row['loo_retraining_over_this']:.0f}× | {row['scratch_retraining_over_this']:.0f}× | {_fmt(row['hvps'], 'd')} | {_fmt(row['iterations'], 'd')} | {_fmt(row['residual'], '.1e')} |"
        )
    lines += [
        "",
        f"retraining, leave-one-task-out (refine from λ*, w_k = 0, same L-BFGS settings): measured {len(r['loo_measured_s'])} tasks, "
        f"mean {r['loo_mean_s']:.1f} s each ({runs}) "
        f"→ × {n} tasks = **{r['loo_all_tasks_extrapolated_s']:.0f} s (extrapolated)**",
        f"retraining from scratch (meta-train + refine, measured once: {r['scratch_train_plus_refine_s']:.1f} s) × {n} = "
        f"**{r['scratch_all_tasks_extrapolated_s']:.0f} s (extrapolated)**",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
