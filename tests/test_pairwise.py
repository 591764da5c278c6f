"""Pairwise task influence (docs/method.md §6.2): linearity against task-IF, custom measurements,
solver agreement, the result file and an unconverged solve."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import random_tasks, small_problem
from test_task_if import _newton_minimum, _quadratic
from metainfluence import PairwiseResult, pairwise_influence
from metainfluence.errors import CheckpointError
from metainfluence.influence.pairwise import _task_margin
from metainfluence.influence.results import InfluenceSettings, InfluenceWarning
from metainfluence.influence.task_if import task_influence
from metainfluence.linalg import SolverSettings

EXPLICIT = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-3, rhs_chunk=2)


def _setup(n=10, m=5):
    problem, lam0, tasks = _quadratic(n)
    lam = _newton_minimum(problem, lam0, tasks)
    test = random_tasks(n=m, n_support=4, n_query=6, n_features=5, regression=True, seed=7)
    return problem, lam, tasks, test


def test_column_mean_is_task_if_on_the_test_pool_and_the_file_round_trips(tmp_path):
    problem, lam, tasks, test = _setup()
    res = pairwise_influence(problem, lam, tasks, test, EXPLICIT)
    assert res.scores.shape == (10, 5) and res.measurement == "query-loss"
    ref = task_influence(problem, lam, tasks, test, EXPLICIT)
    # f of the pool is the mean of the one-task f_j, and the scores are linear in ∇f
    torch.testing.assert_close(res.scores.mean(1), ref.scores, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.measurement_values.mean(), torch.tensor(ref.measurement, dtype=torch.float64), rtol=1e-12, atol=0)
    assert len(res.diagnostics["solver"]["residuals"]) == 5 and res.diagnostics["solver"]["residual"] < 1e-10
    res.save(tmp_path / "pw", pool_fingerprint="abc")
    back = PairwiseResult.load(tmp_path / "pw", pool_fingerprint="abc")
    assert torch.equal(back.scores, res.scores) and torch.equal(back.test_task_ids, torch.arange(5))
    assert "HELPS" in (tmp_path / "pw.json").read_text()
    with pytest.raises(CheckpointError, match="another task pool"):
        PairwiseResult.load(tmp_path / "pw", pool_fingerprint="xyz")
    ref.save(tmp_path / "task")
    with pytest.raises(CheckpointError, match="not a metainfluence pairwise scores file"):
        PairwiseResult.load(tmp_path / "task")


def test_a_callable_measurement_of_the_pool_loss_reproduces_task_if():
    problem, lam, tasks, test = _setup()
    pool_loss = lambda l: problem.per_task(problem.query_loss, l, test).mean()
    res = pairwise_influence(problem, lam, tasks, None, EXPLICIT, measurement=pool_loss)
    ref = task_influence(problem, lam, tasks, test, EXPLICIT)
    assert res.scores.shape == (10, 1) and res.measurement == "custom"
    torch.testing.assert_close(res.scores[:, 0], ref.scores, rtol=1e-9, atol=1e-13)


def test_cg_in_blocks_agrees_with_explicit():
    problem, lam, tasks, test = _setup(m=5)
    ref = pairwise_influence(problem, lam, tasks, test, EXPLICIT)
    cg = dataclasses.replace(EXPLICIT, solver="cg", solve=SolverSettings(tol=1e-12, max_iter=500, cg_block=2))
    got = pairwise_influence(problem, lam, tasks, test, cg)
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-7, atol=1e-12)
    assert max(got.diagnostics["solver"]["residuals"]) < 1e-9


def test_margin_columns_are_the_gradients_of_each_test_task_margin():
    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, test = random_tasks(n=6), random_tasks(n=3, seed=4)
    settings = InfluenceSettings(hessian="gauss-newton", solver="explicit", damping=1e-2, stationarity_warn=1e9)
    res = pairwise_influence(problem, lam, tasks, test, settings, measurement="margin")
    records = problem.records(lam, test)
    per_task = [lambda l, j=j: _task_margin(problem, l, records.row(j)) for j in range(3)]
    ref = pairwise_influence(problem, lam, tasks, None, settings, measurement=per_task)
    assert res.measurement == "margin"
    torch.testing.assert_close(res.scores, ref.scores, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(res.measurement_values, ref.measurement_values, rtol=1e-12, atol=1e-14)


def test_an_unconverged_block_solve_is_said_once_with_its_remedy():
    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, test = random_tasks(n=6), random_tasks(n=4, seed=4)
    settings = InfluenceSettings(hessian="gauss-newton", damping=1e-4, stationarity_warn=1e9, rhs_chunk=2, solve=SolverSettings(tol=1e-12, max_iter=3))
    with pytest.warns(InfluenceWarning, match="max-iter"):
        res = pairwise_influence(problem, lam, tasks, test, settings)
    assert res.diagnostics["solver"]["converged"] is False
    assert sum("stopped before its tolerance" in w for w in res.diagnostics["warnings"]) == 1


def test_a_callable_whose_gradient_never_reaches_lambda_is_said_aloud():
    # under the implicit inner loop adapt's θ is detached from λ: a callable through it has ∇f = 0, a column of zeros
    problem, lam = small_problem("implicit", steps=20, lr=0.1, proximal=1.0)
    tasks, test = random_tasks(n=4), random_tasks(n=2, seed=3)
    through_adapt = lambda l: problem.per_task(problem.query_loss, l, test).mean()
    with pytest.warns(InfluenceWarning, match=r"exactly zero gradient .*implicit inner loop .*measurement=None or 'margin'"):
        res = pairwise_influence(problem, lam, tasks, None, dataclasses.replace(EXPLICIT, hessian="gauss-newton", stationarity_warn=1e9),
                                 measurement=through_adapt)
    assert not bool(res.scores.any())
