"""Exact and fast tiers of task-IF against the floor, in ONE run (a script, not a test).

Problem: Conv4 (group norm, ``--width`` filters) on Omniglot 5-way 1-shot 5-query (28×28) from
``--data-root`` / $METAINFLUENCE_DATA (required), ``--tasks`` training tasks, 1 inner step,
μ = 1e-2, meta-trained briefly with Adam. Then, with the floor = one pass of per-task total gradients over the pool (float64):

* ``cg``:        Gauss–Newton + CG to ``--tol`` (the exact tier's reference);
* ``pcg``:       the same, preconditioned by a rank-``--rank`` Nyström sketch (fit timed separately);
* ``curvature``: the sketch's inverse applied directly (the fast tier);
* ``fisher``:    fisher + Woodbury (exact inverse of a different surrogate).

For each: time of whole-pool task-IF over the floor, the solver's true relative residual, Spearman
against ``cg``; self-influence of ``--self-tasks`` tasks (time / floor, Spearman against per-task cg
solves); instance-IF of one task's query examples (Spearman). Peak resident memory of the process.

    python benchmarks/bench_curvature.py --tasks 500 --width 32 --threads 2 --json bench_curvature.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import tempfile
import time
import warnings

import torch

from metainfluence.evaluation.metrics import spearman
from metainfluence.influence.curvature import fit_curvature
from metainfluence.influence.instance_if import instance_influence
from metainfluence.influence.results import InfluenceSettings, InfluenceWarning
from metainfluence.influence.task_if import build_hessian, ihvp, task_influence
from metainfluence.io import write_json
from metainfluence.linalg import SolverSettings
from metainfluence.meta.models import ModelSettings
from metainfluence.meta.refine import RefineWarning
from metainfluence.pipeline import RunContext, RunSettings, train_stage


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--val-tasks", type=int, default=100)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=50, help="tasks per vmapped chunk")
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--self-tasks", type=int, default=30)
    ap.add_argument("--data-root", default=os.environ.get("METAINFLUENCE_DATA"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RefineWarning)
    warnings.simplefilter("ignore", InfluenceWarning)  # residuals are reported in the table instead
    log = lambda s: print(s, file=sys.stderr, flush=True)
    base = RunSettings()
    if not (args.data_root and os.path.isdir(args.data_root)):
        raise SystemExit("bench_curvature: needs the Omniglot files; pass --data-root DIR or set METAINFLUENCE_DATA "
                         "(see the README's data section). Evidence on random inputs would not be evidence.")
    data = dataclasses.replace(base.data, dataset="omniglot", data_root=args.data_root,
                               train_tasks=args.tasks, val_tasks=args.val_tasks, test_tasks=10)
    settings = dataclasses.replace(base, data=data, model=ModelSettings(kind="conv4", width=args.width, norm="group", groups=4),
                                   train=dataclasses.replace(base.train, steps=args.train_steps, meta_batch=16, lr=1e-3, checkpoint_every=0))
    ctx = RunContext.prepare(settings, None, splits=("train", "val"), save_pools=False)
    train, val = ctx.tensors["train"], ctx.tensors["val"]
    problem = ctx.problem
    problem.chunk_size = args.chunk
    log(f"Omniglot 5-way 1-shot, {args.tasks} tasks, Conv4-{args.width} "
        f"({problem.dim} parameters), chunk {args.chunk}, {args.threads} thread(s)")
    (lam32, history, _), t_train = timed(lambda: train_stage(ctx, progress=False))
    lam = lam32.double()
    train, val = train.to(dtype=torch.float64), val.to(dtype=torch.float64)
    _, floor = timed(lambda: problem.total_gradients(lam, train))
    log(f"trained {history.steps_done} steps in {t_train:.0f} s; floor (one pass of per-task total gradients): {floor:.2f} s")

    common = dict(hessian="gauss-newton", damping=args.damping, stationarity_warn=1e9, solve=SolverSettings(tol=args.tol, max_iter=args.max_iter))
    ref_s = InfluenceSettings(solver="cg", **common)
    art, fit_s = timed(lambda: fit_curvature(problem, lam, train, ref_s, rank=args.rank, probes=4))
    workdir = tempfile.TemporaryDirectory(prefix="bench_curvature_")  # the sketch file lives only as long as the run
    stem = os.path.join(workdir.name, "curvature")
    art.save(stem)
    log(f"Nyström sketch rank {art.sketch.rank}: fit {fit_s:.1f} s = {fit_s / floor:.1f}× the floor; probe operator error {max(art.info['probe_operator_rel_error']):.2g}")
    tiers = {"cg": ref_s, "pcg": InfluenceSettings(solver="pcg", curvature_file=stem, **common),
             "curvature": InfluenceSettings(solver="curvature", curvature_file=stem, **common),
             "fisher": InfluenceSettings(solver="woodbury", **{**common, "hessian": "fisher"})}
    rows, results = [], {}
    for name, s in tiers.items():
        res, t = timed(lambda: task_influence(problem, lam, train, val, s))
        results[name] = res
        solver = res.diagnostics["solver"]
        rows.append({"tier": name, "task-IF s": round(t, 2), "÷ floor": round(t / floor, 1), "residual": f"{solver['residual']:.1e}",
                     "iterations": solver["iterations"], "Spearman vs cg": round(spearman(res.scores, results["cg"].scores), 4)})
        log(f"  {rows[-1]}")
    # self-influence of a subsample: one solve per task; the reference is per-task cg
    sub = train.subset(list(range(min(args.self_tasks, len(train)))))
    G = problem.total_gradients(lam, sub)
    self_rows = {}
    for name, s in tiers.items():
        op = build_hessian(problem, lam, train, s)
        res, t = timed(lambda: ihvp(op, G, s))
        self_rows[name] = ((G * res.x).sum(1), t)
    for r in rows:
        vals, t = self_rows[r["tier"]]
        r.update({"self-inf s": round(t, 2), "self ÷ floor": round(t / floor, 1), "self Spearman": round(spearman(vals, self_rows["cg"][0]), 4)})
    # instance-IF of one task's query examples, from each tier's s
    one = train.subset([0])
    inst_ref = instance_influence(problem, lam, one, val, "query", ref_s, s=results["cg"].extra["s"]).scores.flatten()
    for r in rows:
        inst = instance_influence(problem, lam, one, val, "query", ref_s, s=results[r["tier"]].extra["s"]).scores.flatten()
        r["instance Spearman"] = round(spearman(inst, inst_ref), 4)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\nfloor {floor:.2f} s; sketch fit {fit_s / floor:.1f}× the floor; peak resident memory {peak_gb:.2f} GB; "
          f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    if args.json:
        write_json(args.json, {"args": vars(args), "floor_s": floor, "fit_s": fit_s, "rows": rows, "peak_gb": peak_gb,
                               "sketch": {k: art.info[k] for k in ("rank", "probe_operator_rel_error", "probe_solve_residual", "eigenvalue_max", "eigenvalue_min_kept")}})
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
