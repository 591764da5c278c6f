"""Small float64 problems shared by the math tests."""

from __future__ import annotations

import torch

from metainfluence.meta.models import MLP
from metainfluence.meta.objective import InnerSettings, MetaProblem
from metainfluence.tasks.tensors import TaskTensors


def random_tasks(n=6, n_support=6, n_query=5, n_features=4, n_classes=3, seed=0, regression=False) -> TaskTensors:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, n_support, n_features, generator=g, dtype=torch.float64)
    xq = torch.randn(n, n_query, n_features, generator=g, dtype=torch.float64)
    if regression:
        ys = torch.randn(n, n_support, 1, generator=g, dtype=torch.float64)
        yq = torch.randn(n, n_query, 1, generator=g, dtype=torch.float64)
    else:
        ys = torch.randint(0, n_classes, (n, n_support), generator=g)
        yq = torch.randint(0, n_classes, (n, n_query), generator=g)
    return TaskTensors(xs, ys, xq, yq)


def small_problem(kind="unrolled", steps=2, lr=0.3, proximal=0.0, hidden=(8,), n_features=4, n_classes=3,
                  weight_decay=1e-3, chunk_size=None, loss="cross_entropy", seed=0, activation="tanh", **inner):
    torch.manual_seed(seed)
    model = MLP(n_features, n_classes, hidden, activation).double()
    cfg = InnerSettings(kind=kind, steps=steps, lr=lr, proximal=proximal, **inner)
    problem = MetaProblem(model, loss, cfg, weight_decay=weight_decay, chunk_size=chunk_size)
    return problem, problem.init_params(torch.float64)


def central_difference_gradient(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = eps
        out[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return out


def directional_derivatives(fn, x: torch.Tensor, n_directions: int = 3, eps: float = 1e-5, seed: int = 0):
    """Central differences of ``fn`` along random unit directions: returns (directions (m, p), derivatives (m,))."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n_directions, x.numel(), generator=g, dtype=x.dtype)
    d = d / d.norm(dim=1, keepdim=True)
    vals = torch.stack([(fn(x + eps * di) - fn(x - eps * di)) / (2 * eps) for di in d])
    return d, vals


def curvature_problem():
    """(problem, λ, train, val) of the curvature tests: a 1-step tanh MLP, 12 training and 4 validation tasks."""
    problem, lam = small_problem(steps=1, lr=0.3, hidden=(6,), weight_decay=1e-2)
    return problem, lam, random_tasks(n=12, seed=3), random_tasks(n=4, seed=4)


def check_report(out, names):
    """An experiment's report renders: each of ``names`` in report.md, the figures embedded in report.html, the sign stated."""
    from metainfluence.experiments import report_run

    md_path = report_run(out)
    md = md_path.read_text()
    html = (out / "report.html").read_text()
    for name in names:
        assert name in md, name
    assert "data:image/png;base64," in html
    assert "harms" in md  # sign convention stated
    return md
