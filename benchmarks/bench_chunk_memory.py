"""Peak memory of one task of a vmapped pass against the bound that sizes automatic chunks (a script, not a test).

``MetaProblem`` without a ``chunk_size`` vmaps as many tasks at once as fit ``allocator.chunk_budget_bytes`` by the
per-task bound of ``meta.inputs.task_bytes`` (16 × the model's activations on the task's examples + 16 × λ). This
measures, in a fresh subprocess per setting, the resident-memory peak of a pass of exact total-Hessian products
(the heaviest per-task work) over k tasks in one chunk, per task, and prints it beside the bound: the ratio
measured / bound must stay below 1 for automatic chunks to fit their budget.

    python benchmarks/bench_chunk_memory.py            # Conv4 at 28 / 42 / 84 px, grey and RGB, and an MLP
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SETTINGS = [  # (model kind, width, channels, image side, norm, dtype)
    ("conv4", 16, 3, 42, "none", "float64"),
    ("conv4", 32, 1, 28, "batch", "float32"),
    ("conv4", 32, 3, 84, "group", "float32"),
    ("mlp", 64, 3, 42, "none", "float64"),
]


def child(kind: str, width: int, channels: int, side: int, norm: str, dtype_name: str, tasks: int) -> dict:
    import resource

    import torch

    from metainfluence.meta.inputs import check_task_tensors, task_bytes
    from metainfluence.meta.models import ModelSettings, build_model
    from metainfluence.meta.objective import InnerSettings, MetaProblem
    from metainfluence.tasks import TaskTensors

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    settings = ModelSettings(kind=kind, width=width, norm=norm) if kind == "conv4" else ModelSettings(kind="mlp", hidden=(width,))
    model = build_model(settings, (channels, side, side), 5)
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.4), chunk_size=tasks)
    lam = problem.init_params(dtype)
    g = torch.Generator().manual_seed(0)
    pool = TaskTensors(torch.randn(tasks, 5, channels, side, side, generator=g, dtype=dtype), torch.arange(5).repeat(tasks, 1),
                       torch.randn(tasks, 25, channels, side, side, generator=g, dtype=dtype),
                       torch.arange(5).repeat_interleave(5).repeat(tasks, 1))
    bound = task_bytes(problem, lam, pool, check_task_tensors(problem, lam, pool)[0])
    direction = torch.randn(tasks, problem.dim, generator=g, dtype=dtype)
    problem.sum_over_tasks(problem.task_total_hvp, lam, pool.subset([0]), extra=(direction[:1],))  # warm-up, one task
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    problem.sum_over_tasks(problem.task_total_hvp, lam, pool, extra=(direction,))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    measured = (peak - base) * 1024 / tasks
    return {"model": f"{kind}-{width} norm={norm}", "input": f"{channels}×{side}×{side}", "dtype": dtype_name, "params": problem.dim,
            "tasks_in_chunk": tasks, "measured_MB_per_task": round(measured / 2**20, 1), "bound_MB_per_task": round(bound / 2**20, 1),
            "measured_over_bound": round(measured / bound, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8, help="tasks in the measured chunk (default 8)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, width, channels, side, norm, dtype = args.child
        print(json.dumps(child(kind, int(width), int(channels), int(side), norm, dtype, args.tasks)))
        return
    print("one chunk of exact total-Hessian products, 5-way 1-shot with 5 queries a class, fresh process per row")
    for kind, width, channels, side, norm, dtype in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--tasks", str(args.tasks), "--child", kind, str(width), str(channels), str(side), norm, dtype],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
