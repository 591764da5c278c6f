"""Exact and fast tiers of task-IF against the floor, in ONE run (a script, not a test).

Problem: Conv4 (group norm, ``--width`` filters) on Omniglot 5-way 1-shot ``--query``-query (28×28) from
``--data-root`` / $METAINFLUENCE_DATA (required), ``--tasks`` training tasks, 1 inner step,
μ = 1e-2, meta-trained briefly with Adam. Then, with the floor = one pass of per-task total gradients over the pool (float64):

* ``cg``:          Gauss–Newton + CG to ``--tol`` (the exact tier's reference), and with float32 products;
* ``pcg nystrom``: the same, preconditioned by a rank-``--rank`` Nyström sketch (fit timed separately),
                   also with float32 products; ``pcg ekfac``: preconditioned by an EK-FAC;
* ``fast …``:      the sketch's / EK-FAC's inverse applied directly (the fast tier);
* ``fisher woodbury``: fisher + Woodbury (exact inverse of a different surrogate); ``trak``, ``tracin``;
* ``… gn-factor``: the total Gauss–Newton matrix itself as a factor (``--tiers 'fast gn-factor,pcg gn-factor'``).

For each: time of whole-pool task-IF over the floor, the solver's true relative residual (products in
float64), Spearman against ``cg``; self-influence of ``--self-tasks`` tasks (time / floor, Spearman
against the exact tier's block solve) and, for the fast tiers, of every task; instance-IF of the support
and query examples of ``--instance-tasks`` tasks from the tier's s (Spearman). Peak resident memory of the process.

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

from metainfluence.allocator import tune_allocator
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
    ap.add_argument("--query", type=int, default=5, help="query examples per class")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=50, help="tasks per vmapped chunk")
    ap.add_argument("--rank", type=lambda t: t if t == "auto" else int(t), default="auto", help="Nyström rank, or auto (chosen from the spectrum)")
    ap.add_argument("--max-rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--self-tasks", type=int, default=30)
    ap.add_argument("--instance-tasks", type=int, default=10, help="tasks whose support and query examples are scored by instance-IF")
    ap.add_argument("--data-root", default=os.environ.get("METAINFLUENCE_DATA"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the table here after every tier (a long run keeps what it finished)")
    ap.add_argument("--fisher-samples", type=int, default=4, help="label draws per task of the fisher factor (fisher tiers)")
    ap.add_argument("--tiers", default="", help="comma-separated subset of solver tiers, e.g. 'pcg fisher,fast fisher' (cg is always run)")
    ap.add_argument("--max-minutes", type=float, default=float("inf"), help="skip the remaining tiers after this long")
    return ap.parse_args(argv)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_allocator()
    warnings.simplefilter("ignore", RefineWarning)
    warnings.simplefilter("ignore", InfluenceWarning)  # residuals are reported in the table instead
    log = lambda s: print(s, file=sys.stderr, flush=True)
    base = RunSettings()
    if not (args.data_root and os.path.isdir(args.data_root)):
        raise SystemExit("bench_curvature: needs the Omniglot files; pass --data-root DIR or set METAINFLUENCE_DATA "
                         "(see the README's data section). Evidence on random inputs would not be evidence.")
    data = dataclasses.replace(base.data, dataset="omniglot", data_root=args.data_root,
                               train_tasks=args.tasks, val_tasks=args.val_tasks, test_tasks=10, q_query=args.query)
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
    problem.total_gradients(lam, train.subset([0, 1]))  # warm-up, so the floor is not charged for first-call set-up
    _, floor = timed(lambda: problem.total_gradients(lam, train))
    log(f"trained {history.steps_done} steps in {t_train:.0f} s; floor (one pass of per-task total gradients): {floor:.2f} s")

    common = dict(hessian="gauss-newton", damping=args.damping, fisher_samples=args.fisher_samples, stationarity_warn=1e9, solve=SolverSettings(tol=args.tol, max_iter=args.max_iter))
    ref_s = InfluenceSettings(solver="cg", **common)
    workdir = tempfile.TemporaryDirectory(prefix="bench_curvature_")  # the curvature files live only as long as the run
    fits = {}
    wanted = set(args.tiers.split(",")) if args.tiers else None
    methods = [m for m in ("nystrom", "ekfac", "fisher", "gn-factor") if wanted is None or any(m in t for t in wanted)]
    for method in methods:
        # the fit is an approximation anyway: its products are taken in float32 (the probe report is too)
        fit_settings = dataclasses.replace(ref_s, products="float32")
        art, fit_s = timed(lambda: fit_curvature(problem, lam, train, fit_settings, rank=args.rank, probes=4, method=method,
                                                 max_rank=args.max_rank))
        stem = os.path.join(workdir.name, method)
        art.save(stem)
        # fit_curvature times its own floor pass just before fitting: the ratio is side by side
        fits[method] = {"file": stem, "fit_s": fit_s, "fit_over_floor": art.info["fit_over_floor"], "rank": art.info.get("rank"),
                        "probe_operator_rel_error": max(art.info["probe_operator_rel_error"]),
                        "probe_solve_residual": max(art.info["probe_solve_residual"])}
        log(f"{method} curvature: fit {fit_s:.1f} s = {art.info['fit_over_floor']:.1f}× the floor; probe operator error "
            f"{fits[method]['probe_operator_rel_error']:.2g}, fast-tier probe residual {fits[method]['probe_solve_residual']:.2g}")
    f32 = dict(common, products="float32")
    # cheapest first after the reference, so a --max-minutes budget keeps the most tiers
    tiers: dict[str, InfluenceSettings] = {
        "cg": ref_s,
        "pcg nystrom": InfluenceSettings(solver="pcg", curvature_file=fits["nystrom"]["file"], **common),
        "fast nystrom": InfluenceSettings(solver="curvature", curvature_file=fits["nystrom"]["file"], **common),
        "fast ekfac": InfluenceSettings(solver="curvature", curvature_file=fits["ekfac"]["file"], **common),
        "fisher woodbury": InfluenceSettings(solver="woodbury", **{**common, "hessian": "fisher"}),
        "trak": InfluenceSettings(method="trak", **common),
        "tracin": InfluenceSettings(method="tracin", **common),
        "cg float32": InfluenceSettings(solver="cg", **f32),
        "pcg nystrom float32": InfluenceSettings(solver="pcg", curvature_file=fits["nystrom"]["file"], **f32),
        "pcg ekfac": InfluenceSettings(solver="pcg", curvature_file=fits["ekfac"]["file"], **common),
        "pcg fisher": InfluenceSettings(solver="pcg", curvature_file=fits["fisher"]["file"], **common),
        "fast fisher": InfluenceSettings(solver="curvature", curvature_file=fits["fisher"]["file"], **common),
    } if wanted is None else {}
    if wanted is not None:  # only the tiers asked for (cg, the reference, always first)
        for name in ["cg", *[t for t in args.tiers.split(",") if t != "cg"]]:
            method = next((m for m in ("nystrom", "ekfac", "fisher", "gn-factor") if m in name), None)
            f = {"curvature_file": fits[method]["file"]} if method else {}
            solver = "pcg" if name.startswith("pcg") else "curvature" if name.startswith("fast") else "cg"
            tiers[name] = InfluenceSettings(solver=solver, **f, **(f32 if "float32" in name else common))
    deadline = time.perf_counter() + 60 * args.max_minutes
    rows, results = [], {}
    record = {"args": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
              "params": problem.dim, "train_s": t_train, "floor_s": floor, "fits": fits, "rows": rows}

    def save():
        record["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if args.json:
            write_json(args.json, record)

    # instance-IF of the query and support examples of --instance-tasks tasks, from each tier's s
    one = train.subset(list(range(min(args.instance_tasks, len(train)))))
    inst_ref = None
    self_vals: dict[str, torch.Tensor] = {}
    for name, s in tiers.items():
        if time.perf_counter() > deadline:
            log(f"  --max-minutes reached: {name} and later tiers skipped")
            record["skipped_from"] = name
            break
        # the machine is shared: the floor is re-measured beside every tier, and each ratio uses its own
        _, floor = timed(lambda: problem.total_gradients(lam, train))
        res, t = timed(lambda: task_influence(problem, lam, train, val, s))
        results[name] = res
        solver = res.diagnostics.get("solver", {})
        row = {"tier": name, "floor s": round(floor, 2), "task-IF ÷ floor": round(t / floor, 1), "residual": f"{solver['residual']:.1e}" if "residual" in solver else "-",
               "iterations": solver.get("iterations", "-"), "Spearman vs cg": round(spearman(res.scores, results["cg"].scores), 4)}
        # self-influence of EVERY task where a tier makes it cheap (fast tiers, Woodbury, TRAK); the exact
        # reference (cg on the first --self-tasks tasks) is taken after all tiers, time permitting
        if s.method == "task-if" and s.solver in ("curvature", "woodbury"):
            # the fast tier's sampled residual checks (--residual-checks) are its only products: float32 ones
            # measure a residual to float32's own rounding (influence/task_if.py) at half the cost of float64 ones
            s_self = dataclasses.replace(s, products="float32") if s.solver == "curvature" else s
            op = build_hessian(problem, lam, train, s_self)
            G_all = problem.total_gradients(lam, train)
            r_all, t_all = timed(lambda: ihvp(op, G_all, s_self))
            self_vals[name] = (G_all * r_all.x).sum(1)
            row["self-inf all ÷ floor"] = round(t_all / floor + 1, 1)  # + the pass of total gradients it needs
        elif s.method == "trak":  # its self-influence comes from the same projected features
            r_all, t_all = timed(lambda: task_influence(problem, lam, train, val, dataclasses.replace(s, self_influence=True)))
            self_vals[name] = r_all.self_influence
            row["self-inf all ÷ floor"] = round(t_all / floor, 1)
        # instance-IF of the examples of --instance-tasks tasks, from this tier's s (methods without one are skipped)
        if "s" in res.extra:
            inst = torch.cat([instance_influence(problem, lam, one, val, which, ref_s, s=res.extra["s"]).scores.flatten()
                              for which in ("query", "support")])
            inst_ref = inst if name == "cg" else inst_ref
            row["instance Spearman"] = round(spearman(inst, inst_ref), 4)
        rows.append(row)
        log(f"  {row}")
        save()
    # the exact self-influence reference: one block solve over the first --self-tasks tasks, by the exact
    # tier (pcg preconditioned by the gn-factor or fisher file, float32 products refined to --tol in
    # float64) where one was fitted, else cg: each stops at the same true residual, so each is the exact answer
    k = min(args.self_tasks, len(train))
    if k and self_vals and time.perf_counter() < deadline:
        G_sub = problem.total_gradients(lam, train.subset(list(range(k))))
        _, floor = timed(lambda: problem.total_gradients(lam, train))
        pre = next((m for m in ("gn-factor", "fisher") if m in fits), None)  # the best preconditioner fitted
        self_ref_s = InfluenceSettings(solver="pcg", curvature_file=fits[pre]["file"], **f32) if pre else ref_s
        r_ref, t_ref = timed(lambda: ihvp(build_hessian(problem, lam, train, self_ref_s), G_sub, self_ref_s))
        ref = (G_sub * r_ref.x).sum(1)
        record["self_reference"] = {"tasks": k, "solver": r_ref.solver, "products": self_ref_s.products, "seconds_over_floor": t_ref / floor,
                                    "residual": r_ref.residual, "iterations": r_ref.iterations}
        log(f"self-influence reference: {r_ref.solver} ({self_ref_s.products} products) on {k} tasks, {t_ref / floor:.1f}× the floor, "
            f"residual {r_ref.residual:.1e}")
        for r in rows:
            if r["tier"] in self_vals:
                r[f"self Spearman ({k} tasks)"] = round(spearman(self_vals[r["tier"]][:k], ref), 4)
    elif k:
        log("self-influence reference skipped: --max-minutes reached")
    save()
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    print("\nfits " + ", ".join(f"{k} {v['fit_over_floor']:.1f}× the floor" for k, v in fits.items())
          + f"; peak resident memory {record['peak_gb']:.2f} GB; {record['machine']}")
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
