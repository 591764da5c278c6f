"""task-IF in the regimes the small MLP tests do not reach: the implicit inner solver against finite
differences, a Conv4 on images, and float32 end to end."""

from __future__ import annotations

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.evaluation.metrics import spearman
from metainfluence.influence.results import InfluenceSettings
from metainfluence.influence.task_if import task_influence
from metainfluence.linalg import SolverSettings, materialize
from metainfluence.meta.curvature import TotalHessian
from metainfluence.meta.models import Conv4
from metainfluence.meta.objective import InnerSettings, MetaProblem
from metainfluence.tasks.tensors import TaskTensors


def test_implicit_inner_task_if_equals_finite_differences_of_the_reoptimised_measurement():
    # linear model, squared error, proximal inner problem solved to its optimum: θ*(λ) is affine, F is
    # quadratic and its Gauss–Newton total Hessian is exact, so λ*(w) is one Newton step and
    # d f(λ*(w)) / d w_k = −score_k can be checked by central differences in the task weight
    problem, lam0 = small_problem("implicit", steps=600, lr=0.05, proximal=1.0, hidden=(), n_features=4, n_classes=1, loss="mse",
                                  weight_decay=1e-2)
    tasks = random_tasks(n=8, n_support=5, n_query=6, n_features=4, regression=True, seed=1)
    val = random_tasks(n=4, n_support=5, n_query=6, n_features=4, regression=True, seed=2)

    def optimum(w):
        H = materialize(TotalHessian(problem, lam0, tasks, "gauss-newton", w=w))
        return lam0 - torch.linalg.solve(H, problem.meta_gradient(lam0, tasks, w))

    lam = optimum(None)
    assert float(problem.meta_gradient(lam, tasks).norm()) < 1e-9
    res = task_influence(problem, lam, tasks, val, InfluenceSettings(hessian="gauss-newton", solver="explicit", damping=0.0))
    f = lambda w: float(problem.objective(optimum(w), val) - 0.5 * problem.weight_decay * (optimum(w) ** 2).sum())
    eps = 1e-4
    for k in (0, 3, 6):
        up, down = torch.ones(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
        up[k], down[k] = 1 + eps, 1 - eps
        derivative = (f(up) - f(down)) / (2 * eps)
        assert -derivative == pytest.approx(float(res.scores[k]), rel=1e-5, abs=1e-10)


def _image_tasks(n, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 5, 1, 16, 16, generator=g, dtype=torch.float64)
    xq = torch.randn(n, 10, 1, 16, 16, generator=g, dtype=torch.float64)
    ys = torch.arange(5).repeat(n, 1)
    yq = torch.arange(5).repeat_interleave(2).repeat(n, 1)
    return TaskTensors(xs, ys, xq, yq)


def test_conv4_task_if_by_cg_matches_the_explicit_solve():
    torch.manual_seed(0)
    model = Conv4(1, 16, 5, width=4, norm="group", groups=2).double()
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=1e-2)
    lam = problem.init_params(torch.float64)
    train, val = _image_tasks(6, 0), _image_tasks(3, 1)
    common = dict(hessian="gauss-newton", damping=1e-2, stationarity_warn=1e9)
    cg = task_influence(problem, lam, train, val, InfluenceSettings(solver="cg", solve=SolverSettings(tol=1e-12, max_iter=2000), **common))
    explicit = task_influence(problem, lam, train, val, InfluenceSettings(solver="explicit", **common))
    assert cg.diagnostics["solver"]["residual"] < 1e-10
    torch.testing.assert_close(cg.scores, explicit.scores, rtol=1e-7, atol=1e-12)


def test_float32_end_to_end_tracks_float64():
    problem, lam = small_problem(steps=1, lr=0.3, hidden=(6,), weight_decay=1e-2)
    tasks, val = random_tasks(n=10, seed=3), random_tasks(n=4, seed=4)
    settings = InfluenceSettings(hessian="gauss-newton", damping=1e-2, stationarity_warn=1e9, solve=SolverSettings(tol=1e-5))
    ref = task_influence(problem, lam, tasks, val, settings)
    low = task_influence(problem, lam.float(), tasks.to(dtype=torch.float32), val.to(dtype=torch.float32), settings)
    assert low.scores.dtype == torch.float32
    assert float((low.scores.double() - ref.scores).norm() / ref.scores.norm()) < 1e-3
    assert spearman(low.scores, ref.scores) > 0.99
    # the dtype rule: a float32 pool serves a float64 λ (cast to λ's dtype), a float16 λ is refused
    mixed = task_influence(problem, lam, tasks.to(dtype=torch.float32), val, settings)
    torch.testing.assert_close(mixed.scores, task_influence(problem, lam, tasks.to(dtype=torch.float32).to(dtype=torch.float64), val, settings).scores)
    from metainfluence.errors import SettingsError

    with pytest.raises(SettingsError, match="float32 or float64"):
        task_influence(problem, lam.half(), tasks, val, settings)
