"""The TRAK baseline (docs/method.md §8): its closed form under an orthogonal projection, and its seed."""

from __future__ import annotations

import dataclasses

import torch

from test_task_if import _newton_minimum, _quadratic
from metainfluence.influence.gradients import measurement_gradient
from metainfluence.influence.results import InfluenceSettings
from metainfluence.influence.task_if import task_influence
from metainfluence.influence.trak import GaussianProjection, trak_scores
from metainfluence.linalg import SolverSettings


def _setup():
    problem, lam0, tasks = _quadratic(12)
    lam = _newton_minimum(problem, lam0, tasks)
    from helpers import random_tasks

    val = random_tasks(n=4, n_support=4, n_query=6, n_features=5, regression=True, seed=3)
    return problem, lam, tasks, val


def test_an_orthogonal_full_projection_gives_the_closed_form():
    problem, lam, tasks, val = _setup()
    p, n, delta = lam.numel(), len(tasks), 1e-2
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    settings = InfluenceSettings(method="trak", damping=delta, trak_dim=p)
    grad_f, _ = measurement_gradient(problem, lam, val)
    out = trak_scores(problem, lam, tasks, grad_f, settings, projection=lambda G: G @ Q.T)
    G = problem.total_gradients(lam, tasks)
    A = G.T @ G / n + delta * torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(out["scores"], G @ torch.linalg.solve(A, grad_f) / n, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(out["self_influence"], (G * torch.linalg.solve(A, G.T).T).sum(1) / n, rtol=1e-9, atol=1e-14)
    assert out["diag"]["residual"] < 1e-10


def test_the_gaussian_projection_is_fixed_by_its_seed_not_by_the_chunking():
    # TRAK ranks only loosely like task-IF on a refined digits model (Spearman 0.36–0.52 over k = 64–512
    # and two seeds, measured), too close to any threshold to assert; what must hold is reproducibility
    problem, lam, tasks, val = _setup()
    settings = InfluenceSettings(method="trak", trak_dim=4, stationarity_warn=1e9)
    a = task_influence(problem, lam, tasks, val, settings)
    b = task_influence(problem, lam, tasks, val, settings)
    c = task_influence(problem, lam, tasks, val, dataclasses.replace(settings, solve=SolverSettings(seed=1)))
    assert torch.equal(a.scores, b.scores) and not torch.allclose(a.scores, c.scores, rtol=1e-3)
    assert a.diagnostics["trak"]["dim"] == 4 and "stationarity" in a.diagnostics
    # P depends on (seed, k, p) only: projecting the tasks in chunks gives the same features as at once
    G = torch.randn(5, 50, dtype=torch.float64)
    project = GaussianProjection(50, 6, seed=2)
    torch.testing.assert_close(torch.cat([project(G[:2]), project(G[2:])]), project(G), rtol=0, atol=1e-15)
    # and its entries have variance 1/k (E‖Pg‖² = ‖g‖²)
    big = GaussianProjection(200, 400, seed=0)(torch.eye(200, dtype=torch.float64))
    assert abs(float(big.pow(2).sum(1).mean()) - 1.0) < 0.05
