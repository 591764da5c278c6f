"""The small reference problem where exact ground truth is affordable: sinusoid MAML (docs/method.md §1.4).

A tanh MLP (smooth, so Newton and finite differences behave), one inner step, μ large enough for the
total Hessian to be positive definite at the refined point; meta-trained with Adam on the full pool
and refined to ‖∇F‖ ≤ ``refine_tol`` by exact-Hessian Newton. Used by the leave-one-out test, the
estimates experiment and ``benchmarks/loo_sinusoid.py``.
"""

from __future__ import annotations

import torch

from ..meta.models import MLP
from ..meta.newton import newton_refine
from ..meta.objective import InnerSettings, MetaProblem
from ..tasks.sinusoid import sinusoid_pool
from ..tasks.tensors import TaskTensors


def sinusoid_reference(n_tasks: int = 20, n_val: int = 20, hidden: tuple[int, ...] = (8, 8), weight_decay: float = 0.1,
                       inner_lr: float = 0.01, adam_steps: int = 500, seed: int = 0, refine_tol: float = 1e-9,
                       ) -> tuple[MetaProblem, torch.Tensor, TaskTensors, TaskTensors, dict]:
    """(problem, refined λ*, train tasks, validation tasks, Newton report), all float64."""
    torch.manual_seed(seed)
    train = sinusoid_pool(n_tasks, 10, 10, seed=1).tensors(dtype=torch.float64)
    val = sinusoid_pool(n_val, 10, 10, seed=2).tensors(dtype=torch.float64)
    problem = MetaProblem(MLP(1, 1, tuple(hidden), "tanh").double(), "mse", InnerSettings(steps=1, lr=inner_lr), weight_decay=weight_decay)
    lam = problem.init_params(torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=0.01)
    for _ in range(adam_steps):
        _, lam.grad = problem.value_and_gradient(lam.detach(), train)
        opt.step()
    lam, report = newton_refine(problem, lam.detach(), train, tol=refine_tol)
    return problem, lam, train, val, report
