"""Head-only inner loop (ANIL, ``--inner-adapt head``) against MAML's full inner loop, side by side in one process.

    python benchmarks/bench_anil_step.py [--width 32] [--norm batch] [--repeats 7] [--threads 1]

On the Omniglot recipe's network (stride-2 Conv4, batch norm per task, 28×28, 5-way 1-shot, 1 query per class; random
inputs: the time does not depend on the pixels), it times what training and influence repeat: one meta-gradient of
a meta-batch of 16 tasks (``value_and_gradient``: a training step without Adam) and the per-task total gradients of
64 tasks (``total_gradients``: a pass of scoring). The two inner loops alternate, ``--repeats`` times each; the
medians and their ratio are printed as JSON. Before timing, the ANIL gradient is checked against the same step with
the inner gradient masked to the head (float64): the head-only step changes the cost, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.func import grad

from metainfluence.meta.models import Conv4
from metainfluence.meta.objective import InnerSettings, MetaProblem
from metainfluence.tasks.tensors import TaskTensors


def _tasks(n: int, ways: int = 5, size: int = 28, seed: int = 0) -> TaskTensors:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways).repeat(n, 1)
    return TaskTensors(torch.randn(n, ways, 1, size, size, generator=g), labels, torch.randn(n, ways, 1, size, size, generator=g), labels.clone())


def _check(width: int, norm: str) -> float:
    """Largest difference between the head-only step's total gradient and the full step's with a masked inner gradient."""
    torch.manual_seed(0)
    model = Conv4(1, 28, 5, width=width, norm=norm, pool="stride").double()
    anil = MetaProblem(model, "cross_entropy", InnerSettings(lr=0.4, adapt="head"))
    maml = MetaProblem(model, "cross_entropy", InnerSettings(lr=0.4))
    lam = anil.init_params(torch.float64)
    task = anil.records(lam, _tasks(1).to(dtype=torch.float64)).row(0)
    masked = lambda l: maml.weighted_loss(l - 0.4 * anil.adapted.mask * grad(maml.inner_objective)(l, l, task), task.xq, task.yq, task.u)
    return float((anil.task_total_gradient(lam, task) - grad(masked)(lam)).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--norm", default="batch", choices=("batch", "group", "none"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    diff = _check(args.width, args.norm)
    torch.manual_seed(0)
    model = Conv4(1, 28, 5, width=args.width, norm=args.norm, pool="stride")
    problems = {adapt: MetaProblem(model, "cross_entropy", InnerSettings(lr=0.4, adapt=adapt)) for adapt in ("all", "head")}
    lam = problems["all"].init_params(torch.float32)
    batch, pool = _tasks(16, seed=1), _tasks(64, seed=2)
    work = {"training step (16 tasks)": lambda pr: pr.value_and_gradient(lam, batch),
            "per-task gradients (64 tasks)": lambda pr: pr.total_gradients(lam, pool)}
    times = {(w, a): [] for w in work for a in problems}
    for w, fn in work.items():
        for a, pr in problems.items():
            fn(pr)  # warm-up
        for _ in range(args.repeats):
            for a, pr in problems.items():
                t = time.perf_counter()
                fn(pr)
                times[(w, a)].append(time.perf_counter() - t)
    report = {"machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)", "width": args.width, "norm": args.norm,
              "params": problems["all"].dim, "adapted_params_head": int(problems["head"].adapted.mask.sum()),
              "head_vs_masked_max_abs_diff_float64": diff}
    for w in work:
        full, head = statistics.median(times[(w, "all")]), statistics.median(times[(w, "head")])
        report[w] = {"maml_s": round(full, 4), "anil_s": round(head, 4), "anil_speedup": round(full / head, 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
