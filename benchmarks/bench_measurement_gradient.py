"""The measurement's value and gradient (f, ∇f) in one pass over the validation pool, against the two passes
(gradient, then loss) every score made before, timed side by side on a finished detection run.

    python benchmarks/bench_measurement_gradient.py --run RUN [--val-tasks N] [--repeats 2] [--halvings K] [--data-root DIR] [--threads 1]

RUN is a `metainfluence experiment detection` folder; its refined λ* and validation pool are reused (the first
N tasks of it with --val-tasks). The two forms alternate ``--repeats`` times, so that the machine's load falls
on both alike. Prints the median times, their ratio and the largest differences of ∇f and f.

With --halvings K (the detection's ``reliability_splits``), also ∇f with the reliability's K half-pool gradients
summed in the same pass, against ∇f followed by K passes over half the pool each (the reliability before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _detection_run import load_detection_run
from metainfluence.influence.gradients import measurement_gradient, measurement_gradients
from metainfluence.influence.reliability import halves_of


def two_passes(problem, lam, val):
    """The earlier form: Σ g_i in one pass, Σ L_Q^i in a second, no-grad one."""
    n = len(val)
    gradient = problem.sum_over_tasks(problem.task_total_gradient, lam, val) / n
    with torch.no_grad():
        value = problem.sum_over_tasks(problem.query_loss, lam, val) / n
    return gradient.detach(), float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder (refined.*, pools/, scores/task-if.*)")
    ap.add_argument("--val-tasks", type=int, default=0, help="time the first N validation tasks only (0: all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--halvings", type=int, default=0, help="also time the reliability's K halves: in ∇f's pass against K passes of their own")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx, lam, _, _ = load_detection_run(Path(args.run), args.data_root)
    val = ctx.tensors["val"].to(dtype=lam.dtype)
    if args.val_tasks:
        val = val.subset(slice(0, args.val_tasks))
    forms = [("one_pass", measurement_gradient), ("two_passes", two_passes)]
    if args.halvings:
        parts = halves_of(val, args.halvings, 0)[1]
        forms += [("halves_in_pass", lambda p, l, v: measurement_gradients(p, l, v, parts)[2]),
                  ("halves_apart", lambda p, l, v: [measurement_gradient(p, l, v)] + [measurement_gradient(p, l, v.subset(a))[0] for a in parts])]
    times: dict[str, list[float]] = {name: [] for name, _ in forms}
    out = {}
    for _ in range(args.repeats):
        for name, fn in forms:
            t = time.perf_counter()
            out[name] = fn(ctx.problem, lam, val)
            times[name].append(time.perf_counter() - t)
    (g1, f1), (g2, f2) = out["one_pass"], out["two_passes"]
    med = {name: statistics.median(t) for name, t in times.items()}
    report = {"run": args.run, "val_tasks": len(val), "dtype": str(lam.dtype), "threads": args.threads, "seconds": times,
              "one_pass_s": med["one_pass"], "two_passes_s": med["two_passes"], "speedup": med["two_passes"] / med["one_pass"],
              "grad_max_rel_diff": float((g1 - g2).abs().max() / g2.abs().max()), "f_rel_diff": abs(f1 - f2) / abs(f2)}
    if args.halvings:
        shared, apart = out["halves_in_pass"], torch.stack(out["halves_apart"][1:])
        report.update({"halvings": args.halvings, "halves_in_pass_s": med["halves_in_pass"], "halves_apart_s": med["halves_apart"],
                       "halves_speedup": med["halves_apart"] / med["halves_in_pass"],
                       "halves_max_rel_diff": float((shared - apart).abs().max() / apart.abs().max())})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
