"""What an edit says of itself: a solve that stops short of its tolerance is a warning with the remedy that fits
the solver and Hessian used, and ``print(edit_result)`` is a short summary, not the λ and Δλ tensors."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.influence import Removal, edit_model
from metainfluence.influence.editing import unlearn
from metainfluence.influence.results import InfluenceSettings, InfluenceWarning
from metainfluence.linalg import SolverSettings
from metainfluence.meta import RefineSettings, refine


@pytest.fixture(scope="module")
def refined():
    problem, lam0 = small_problem(steps=1, lr=0.3, hidden=(6,), weight_decay=1e-2)
    tasks = random_tasks(n=10, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lam, _ = refine(problem, lam0, tasks, RefineSettings(method="newton", tol=0, tol_ratio=1e-8, max_iter=30))
    return problem, lam, tasks


def _edit(refined, **settings):
    problem, lam, tasks = refined
    return edit_model(problem, lam, tasks, Removal(tasks=[1, 4]), InfluenceSettings(stationarity_warn=1e9, **settings))


def test_an_edit_whose_solve_stops_at_max_iter_says_so_with_its_remedy(refined):
    with pytest.warns(InfluenceWarning) as caught:
        short = _edit(refined, hessian="gauss-newton", solver="cg", solve=SolverSettings(max_iter=1, tol=1e-10))
    said = [str(w.message) for w in caught if "edit's solve (cg)" in str(w.message)]
    assert len(said) == 1 and said == short.diagnostics["warnings"]
    res = short.diagnostics["solver_residual"]
    assert not short.diagnostics["solver_converged"] and res > 1e-10
    assert said[0].startswith(f"the edit's solve (cg) stopped before its tolerance: relative residual {res:.2g} (tol 1e-10) after 1 iteration, ")
    assert "raise --max-iter (now 1)" in said[0] and "--hessian fisher --solver woodbury" in said[0] and "--max-minutes" not in said[0]
    # the same edit with room to converge: silent, and a different (converged) λ
    with warnings.catch_warnings():
        warnings.simplefilter("error", InfluenceWarning)
        full = _edit(refined, hessian="gauss-newton", solver="cg", solve=SolverSettings(max_iter=500, tol=1e-10))
    assert full.diagnostics["solver_converged"] and "warnings" not in full.diagnostics
    assert not torch.equal(full.lam, short.lam)


def test_an_edit_stopped_by_its_time_budget_names_the_budget(refined):
    with pytest.warns(InfluenceWarning, match=r"ran out: raise --max-minutes or set it to 0"):
        cut = _edit(refined, hessian="gauss-newton", solver="cg", solve=SolverSettings(max_minutes=1e-9, tol=1e-10))
    assert cut.diagnostics["solver_stopped_by"] == "time" and "--max-minutes" in cut.diagnostics["warnings"][0]


def test_a_fisher_woodbury_edit_is_not_told_to_use_fisher_woodbury(refined):
    from metainfluence.influence.editing import check_edit_solve
    from metainfluence.linalg import IHVPResult

    settings = InfluenceSettings(hessian="fisher", solver="woodbury", damping=1e-4)
    fine = _edit(refined, hessian="fisher", solver="woodbury")
    assert fine.diagnostics["solver_converged"] and "warnings" not in fine.diagnostics
    # a woodbury answer with a large residual (ill-conditioned at a tiny damping): the remedy is the damping
    diag: dict = {}
    with pytest.warns(InfluenceWarning) as caught:
        check_edit_solve(diag, IHVPResult(x=torch.zeros(3), residual=0.5, iterations=0, solver="woodbury", info={"converged": True}), settings)
    text = str(caught[0].message)
    assert "left a large residual" in text and "raise --damping (now 0.0001)" in text and "--solver woodbury" not in text


def test_print_of_an_edit_result_is_a_short_summary(refined):
    edited = _edit(refined, hessian="gauss-newton", solver="cg")
    text = repr(edited)
    assert "tensor(" not in text and len(text) < 250
    p = edited.lam.numel()
    assert text.startswith(f"EditResult(p={p}, ‖λ‖={float(edited.lam.norm()):.4g}, ‖Δλ‖={float(edited.delta.norm()):.3g}, removed 2 tasks, ")
    assert f"solve converged (residual {edited.diagnostics['solver_residual']:.2g}, " in text
    assert isinstance(edited.lam, torch.Tensor) and isinstance(edited.delta, torch.Tensor)  # the fields are kept
    with pytest.warns(InfluenceWarning):
        short = _edit(refined, hessian="gauss-newton", solver="cg", solve=SolverSettings(max_iter=1, tol=1e-10))
    assert "solve NOT converged" in repr(short) and "1 warning (diagnostics['warnings'])" in repr(short)
    problem, lam, tasks = refined
    assert "3 unlearning steps" in repr(unlearn(problem, lam, tasks, Removal(tasks=[0]), steps=3))


def test_refine_says_when_it_lowered_test_accuracy_beyond_the_paired_interval():
    from metainfluence.meta.evaluate import EvalResult
    from metainfluence.pipeline.stages import _generalisation_notice

    g = torch.Generator().manual_seed(0)
    before = (torch.rand(200, generator=g, dtype=torch.float64) > 0.3).double()
    flips = torch.rand(200, generator=g, dtype=torch.float64)
    losses = torch.ones(200, dtype=torch.float64)
    for drop, said in ((0.0, False), (0.01, None), (0.3, True)):
        after = torch.where(flips < drop, torch.zeros_like(before), before)  # a fraction of the tasks lose their accuracy
        lines: list[str] = []
        _generalisation_notice(EvalResult.from_per_task(losses, before), EvalResult.from_per_task(losses, after), 0.1, lines.append)
        diff = after - before
        half = 1.96 * float(diff.std()) / 200 ** 0.5
        expected = float(diff.mean()) < -max(half, 0.005)  # the paired interval, computed here from its definition
        assert bool(lines) == expected and (said is None or expected == said)
        if lines:
            assert "a larger --refine-proximal than 0.1" in lines[0] and f"by {-100 * float(diff.mean()):.2f} points" in lines[0]


def test_refine_says_when_it_raised_the_test_loss_though_accuracy_held():
    # plain F refined towards a meta-overfit λ: the same accuracy, the query loss doubled (a new user's Fashion-MNIST run)
    from metainfluence.meta.evaluate import EvalResult
    from metainfluence.pipeline.stages import _generalisation_notice

    g = torch.Generator().manual_seed(1)
    acc = (torch.rand(100, generator=g, dtype=torch.float64) > 0.25).double()
    loss = 0.5 + torch.rand(100, generator=g, dtype=torch.float64)
    for factor, said in ((1.0, False), (1.05, False), (2.0, True)):  # a 5% rise is not a tenth
        lines: list[str] = []
        _generalisation_notice(EvalResult.from_per_task(loss, acc), EvalResult.from_per_task(loss * factor, acc), 0.0, lines.append)
        assert bool(lines) == said
        if said:
            assert "raised the test query loss" in lines[0] and "--refine-proximal 1" in lines[0] and "meta-overfitting" in lines[0]


def test_newton_steps_after_an_edit_on_an_indefinite_reduced_hessian_use_gauss_newton():
    """Removing 3 of 12 tasks at a stationary λ* where the full exact H is positive definite and the reduced H_R is not:
    the edit falls back to H_R's Gauss–Newton part (warned), and so do its Newton steps (they raised before), each
    lowering F_R."""
    from metainfluence.influence.editing import reduced_objective
    from metainfluence.linalg import materialize
    from metainfluence.meta.curvature import TotalHessian

    problem, lam = small_problem(steps=1, lr=0.5, hidden=(8,), weight_decay=0.05, seed=1)
    tasks = random_tasks(n=12, seed=1)
    lam, rep = refine(problem, lam, tasks, RefineSettings(method="newton", tol=1e-11, max_iter=60), progress=False)
    removal = Removal(tasks=[1, 4, 9])
    weights = removal.weights(problem, lam, tasks)
    assert rep.converged and float(torch.linalg.eigvalsh(materialize(TotalHessian(problem, lam, tasks, "exact"))).min()) > 0
    assert float(torch.linalg.eigvalsh(materialize(TotalHessian(problem, lam, tasks, "exact", w=weights[0], v=weights[1], u=weights[2]))).min()) < 0
    with pytest.warns(UserWarning, match="indefinite"):
        edit = edit_model(problem, lam, tasks, removal, InfluenceSettings(hessian="exact", solver="explicit", damping=1e-3), newton_steps=2)
    d = edit.diagnostics
    assert d["hessian"] == "gauss-newton" and d["newton_hessian"] == "gauss-newton" and len(d["newton"]) == 2
    objective, _ = reduced_objective(problem, tasks, weights, None)
    one_step = edit_model(problem, lam, tasks, removal, InfluenceSettings(hessian="exact", solver="explicit", damping=1e-3))
    assert objective(edit.lam) < objective(one_step.lam) < objective(lam)
