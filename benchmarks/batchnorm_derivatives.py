"""Are batch norm's derivatives right under MAML's inner step? torch's native kernel against ``TaskBatchNorm``.

    python benchmarks/batchnorm_derivatives.py [--width 2] [--tasks 3] [--speed]

The meta-gradient of one MAML step is a second derivative of the network and a Hessian product a third. On a
small float64 Conv4 (batch norm, SiLU, one inner step of lr 0.4) this prints, for torch's native batch norm
(``nn.BatchNorm2d(track_running_stats=False)``) and for the plain-operation ``TaskBatchNorm`` the library uses,
the relative error of

- the gradient of a vmapped sum over tasks against the sum of per-task gradients (how training and refine
  took ∇F before the fix);
- per-task Hessian products, forward-over-reverse (``jvp`` of the gradient: the exact tier's products) and
  reverse-over-reverse, against central differences of the per-task gradient (whose own error falls as ε²:
  both ε are printed, so a converged difference is visible).

A right derivative reads at the differences' error (about 1e-6 at ε = 1e-5, 1e-8 at 1e-6); a wrong one stays
put as ε shrinks (docs/training.md, "Batch norm's higher derivatives"). ``--speed`` also times one training
step (16 random 5-way 1-shot 28×28 tasks, the recipe's Conv4-32, float32, one thread) of the old and new ways,
side by side in the same process.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn
from torch.func import grad, grad_and_value, jvp, vmap

import metainfluence.meta.models as models
from metainfluence.meta.objective import InnerSettings, MetaProblem
from metainfluence.tasks.tensors import TaskTensors


def image_tasks(n: int, n_way: int = 3, shot: int = 2, size: int = 16) -> TaskTensors:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, n_way * shot, 1, size, size, generator=g, dtype=torch.float64)
    xq = torch.randn(n, n_way * shot, 1, size, size, generator=g, dtype=torch.float64)
    y = torch.arange(n_way).repeat_interleave(shot).expand(n, -1).clone()
    return TaskTensors(xs, y, xq, y.clone())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def conv4(native: bool, **kw) -> nn.Module:
    """A batch-norm Conv4 built with torch's native kernel (``native``) or the library's TaskBatchNorm; the
    kernel is swapped in for this construction only."""
    ours = models._norm
    if native:
        models._norm = lambda kind, w, groups: nn.BatchNorm2d(w, track_running_stats=False) if kind == "batch" else ours(kind, w, groups)
    try:
        torch.manual_seed(0)
        return models.Conv4(norm="batch", pool="stride", activation="silu", **kw)
    finally:
        models._norm = ours


def measure(native: bool, width: int, n_tasks: int) -> dict:
    model = conv4(native, in_channels=1, image_size=16, out_features=3, width=width).double()
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=0.0)
    lam = problem.init_params(torch.float64)
    tasks = image_tasks(n_tasks)
    record = problem.records(lam, tasks, *problem.default_weights(tasks, lam))
    per_task = vmap(grad(problem.query_loss), in_dims=(None, 0))(lam, record).sum(0)
    of_sum = grad(lambda l: vmap(problem.query_loss, in_dims=(None, 0))(l, record).sum())(lam)
    one = record.row(slice(0, 1))  # the first task, as a batch of one
    gradient = lambda l: vmap(grad(problem.query_loss), in_dims=(None, 0))(l, one)[0]
    d = torch.randn(lam.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {"grad of vmapped sum": rel(of_sum, per_task)}
    fwd = vmap(lambda t: jvp(lambda l: grad(problem.query_loss)(l, t), (lam,), (d,))[1])(one)[0]
    rev = vmap(lambda t: grad(lambda l: torch.dot(grad(problem.query_loss)(l, t), d))(lam))(one)[0]
    for eps in (1e-5, 1e-6):
        fd = (gradient(lam + eps * d) - gradient(lam - eps * d)) / (2 * eps)
        out[f"HVP jvp, ε={eps:g}"] = rel(fwd, fd)
        out[f"HVP rev-rev, ε={eps:g}"] = rel(rev, fd)
    return out


def speed(repeats: int = 41) -> None:
    """Seconds per 16-task training step: native kernel with the gradient of the vmapped sum (before) against
    ``TaskBatchNorm`` with per-task gradients inside the vmap (now), interleaved so both see the same load."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(16, 5, 1, 28, 28, generator=g)
    y = torch.arange(5).expand(16, -1).clone()
    tasks = TaskTensors(x(), y, x(), y.clone())
    steps = {}
    for name, native in (("before", True), ("now", False)):
        model = conv4(native, in_channels=1, image_size=28, out_features=5, width=32)
        problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=0.0)
        lam = problem.init_params(torch.float32)
        rec = problem.records(lam, tasks, *problem.default_weights(tasks, lam))
        if native:
            steps[name] = lambda p=problem, r=rec, l=lam: grad_and_value(lambda a: vmap(p.query_loss, in_dims=(None, 0))(a, r).sum())(l)
        else:
            steps[name] = lambda p=problem, r=rec, l=lam: vmap(grad_and_value(p.query_loss), in_dims=(None, 0))(l, r)
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"one 16-task training step, median of {repeats}: before {1e3 * med['before']:.0f} ms, now {1e3 * med['now']:.0f} ms "
          f"(now / before = {med['now'] / med['before']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=2, help="Conv4 channels")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--speed", action="store_true", help="also time one training step before and after the fix")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="the model holds torch's native batch norm")  # measured on purpose here
    rows = {
        "torch native nn.BatchNorm2d": measure(True, args.width, args.tasks),
        "TaskBatchNorm (the library's)": measure(False, args.width, args.tasks),
    }
    keys = list(next(iter(rows.values())))
    print(f"Conv4 width {args.width}, {args.tasks} tasks, float64, one inner step; relative errors")
    print(f"{'batch norm':32}" + "".join(f"{k:>24}" for k in keys))
    for name, row in rows.items():
        print(f"{name:32}" + "".join(f"{row[k]:24.2e}" for k in keys))
    if args.speed:
        speed()


if __name__ == "__main__":
    main()
