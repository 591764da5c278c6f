"""Would influence over the head alone do? Rescore a finished detection run of a head-only inner loop (ANIL,
`--set inner.adapt=head`) with task-IF restricted to the head's parameters, every other parameter held at λ*, and
compare its detection and its cost with the run's own task-IF over all parameters.

    python benchmarks/detection_head_scope.py --run RUN [--timing-tasks 500] [--threads 1] [--data-root DIR]

The restricted problem is the run's model with every parameter but the head frozen at λ* (constants of the model),
so its inner loop adapts the head as the run's does and its scores are exact for the head-only meta-objective;
they are solved like the run's fast tier (the fisher kind, one draw per task, Woodbury, the run's damping, which
after a proximal refine includes γ). Prints, as JSON, the AUC and recall at ρ and 1.25ρ of both rankings, their
Spearman correlation, and the seconds of one pass of per-task total gradients over ``--timing-tasks`` tasks each
way (side by side, medians of 3). Sign: scores are the predicted change of the validation loss when a task is removed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from _detection_run import load_detection_run, recall_cut, run_with_heartbeat
from metainfluence import metrics, task_influence
from metainfluence.meta.inner import adapted_names
from metainfluence.meta.objective import MetaProblem


def head_problem(problem: MetaProblem, lam: torch.Tensor) -> MetaProblem:
    """``problem`` over its head's parameters only: the others loaded from λ and frozen."""
    if problem.adapted is None or set(adapted_names(problem.spec, problem.inner.adapt)) != set(adapted_names(problem.spec, "head")):
        raise SystemExit("this run's inner loop does not adapt the head alone: a head-only influence would change its inner loop "
                         "(run the detection experiment with --set inner.adapt=head)")
    head = set(adapted_names(problem.spec, "head"))
    model = copy.deepcopy(problem.model)
    values = problem.spec.unflatten(lam.to(torch.float32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in values:
                p.copy_(values[name].to(p.dtype))
            p.requires_grad_(name in head)
    inner = dataclasses.replace(problem.inner, adapt="all")  # every trainable parameter is now the head
    return MetaProblem(model, problem.loss_name, inner, weight_decay=problem.weight_decay, chunk_size=problem.chunk_size)


def _pass_seconds(problem: MetaProblem, lam: torch.Tensor, tasks) -> float:
    t = time.perf_counter()
    problem.total_gradients(lam, tasks)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder of a head-only inner loop")
    ap.add_argument("--timing-tasks", type=int, default=500)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx, lam, kept, settings = load_detection_run(Path(args.run), args.data_root)
    problem = head_problem(ctx.problem, lam)
    lam_head = problem.init_params(lam.dtype)
    train, val = ctx.tensors["train"].to(dtype=lam.dtype), ctx.tensors["val"].to(dtype=lam.dtype)
    head_settings = dataclasses.replace(settings, hessian="fisher", solver="woodbury", curvature_file="", fisher_samples=1, stationarity_warn=1e300)
    t = time.perf_counter()
    head = task_influence(problem, lam_head, train, val, head_settings)
    head_seconds = time.perf_counter() - t
    flags = torch.as_tensor(ctx.pools["train"].corrupted_tasks, dtype=torch.bool)
    cut1, cut125 = recall_cut(flags, 1.0), recall_cut(flags, 1.25)

    def detection(scores: torch.Tensor) -> dict:
        order = torch.argsort(scores.double(), stable=True)
        return {"auc": metrics.detection_auc(-scores.double(), flags), "recall_at_rho": float(flags[order[:cut1]].double().sum()) / int(flags.sum()),
                "recall_at_1.25rho": float(flags[order[:cut125]].double().sum()) / int(flags.sum())}

    timing = train.subset(slice(0, min(args.timing_tasks, len(train))))
    seconds: dict[str, list[float]] = {"all_parameters": [], "head_only": []}
    for _ in range(3):
        seconds["all_parameters"].append(_pass_seconds(ctx.problem, lam, timing))
        seconds["head_only"].append(_pass_seconds(problem, lam_head, timing))
    all_s, head_s = statistics.median(seconds["all_parameters"]), statistics.median(seconds["head_only"])
    print(json.dumps({
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)", "run": args.run,
        "params": {"all": ctx.problem.dim, "head": problem.dim}, "damping": head_settings.damping,
        "task_if_all_parameters (the run's)": detection(kept.scores), "task_if_head_only": detection(head.scores),
        "spearman_head_vs_all": metrics.spearman(head.scores.double(), kept.scores.double()), "head_scoring_s": round(head_seconds, 1),
        f"per-task gradient pass over {len(timing)} tasks (s)": {"all_parameters": round(all_s, 2), "head_only": round(head_s, 2),
                                                                  "head_speedup": round(all_s / head_s, 2)},
    }, indent=1))


if __name__ == "__main__":
    run_with_heartbeat(main)
