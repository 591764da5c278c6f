"""task-IF (docs/method.md §6, §5) against closed forms on a quadratic bilevel problem.

1-step MAML on linear regression: θ_i(λ) is affine in λ and the query loss is quadratic in θ, so F is
exactly quadratic in λ. Then λ* and every leave-one-task-out λ_{−k} are single Newton steps with the
explicit Hessian — a closed form to compare the influence prediction with."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.meta.curvature import TotalHessian
from metainfluence.influence.results import InfluenceSettings
from metainfluence.linalg import SolverSettings, materialize
from metainfluence.influence.task_if import task_influence, task_parameter_changes


def _quadratic(n, seed=0):
    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=n, n_support=4, n_query=6, n_features=5, regression=True, seed=seed)
    return problem, lam0, tasks


def _newton_minimum(problem, lam, tasks, w=None):
    H = materialize(TotalHessian(problem, lam, tasks, "exact", w=w))
    return lam - torch.linalg.solve(H, problem.meta_gradient(lam, tasks, w))


def test_removal_matches_leave_one_out_to_first_order_with_error_shrinking_like_one_over_n_squared():
    errors = {}
    for n in (20, 40, 80):
        problem, lam0, tasks = _quadratic(n)
        lam = _newton_minimum(problem, lam0, tasks)
        assert problem.meta_gradient(lam, tasks).norm() < 1e-10  # exact stationarity of a quadratic
        settings = InfluenceSettings(hessian="exact", solver="explicit", damping=0.0)
        delta_if, _ = task_parameter_changes(problem, lam, tasks, settings)
        errs = []
        for k in range(10):
            w = torch.ones(n, dtype=torch.float64)
            w[k] = 0
            delta_true = _newton_minimum(problem, lam, tasks, w) - lam
            # first order: prediction and truth agree up to O(‖Δ‖²) = O(1/n²)
            assert torch.nn.functional.cosine_similarity(delta_if[k], delta_true, dim=0) > 0.95
            errs.append(float((delta_if[k] - delta_true).norm()))
        errors[n] = torch.tensor(errs).median().item()
    # doubling n should cut the error by about 4 (1/n²); allow slack for the task sample
    assert errors[40] / errors[20] < 0.4
    assert errors[80] / errors[40] < 0.4
    assert errors[80] / errors[20] < 1 / 8


@pytest.mark.parametrize("solver", ["cg", "neumann", "lissa", "lowrank"])
def test_every_solver_agrees_with_explicit(solver):
    problem, lam0, tasks = _quadratic(12)
    lam = _newton_minimum(problem, lam0, tasks)
    val = random_tasks(n=5, n_support=4, n_query=6, n_features=5, regression=True, seed=9)
    base = dict(hessian="exact", damping=1e-3, solve=SolverSettings(tol=1e-12, max_iter=500, neumann_depth=200000, lowrank_rank=lam.numel()))
    ref = task_influence(problem, lam, tasks, val, InfluenceSettings(solver="explicit", **base))
    got = task_influence(problem, lam, tasks, val, InfluenceSettings(solver=solver, **base))
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-6, atol=1e-12)
    assert got.diagnostics["solver"]["residual"] < 1e-6


def test_scores_equal_measurement_change_of_the_predicted_parameters_and_self_influence():
    problem, lam0, tasks = _quadratic(10)
    lam = _newton_minimum(problem, lam0, tasks)
    val = random_tasks(n=4, n_support=4, n_query=6, n_features=5, regression=True, seed=3)
    settings = InfluenceSettings(solver="explicit", damping=0.0, self_influence=True)
    res = task_influence(problem, lam, tasks, val, settings)
    deltas, _ = task_parameter_changes(problem, lam, tasks, settings)
    grad_f = problem.sum_over_tasks(problem.task_total_gradient, lam, val) / len(val)
    torch.testing.assert_close(res.scores, deltas @ grad_f, rtol=1e-9, atol=1e-14)
    G = problem.total_gradients(lam, tasks)
    torch.testing.assert_close(res.self_influence, (G * deltas).sum(1), rtol=1e-9, atol=1e-14)
    assert (res.self_influence > 0).all()  # H is positive definite here
    assert res.diagnostics["stationarity"]["ratio"] < 1e-8


def test_woodbury_solver_for_fisher_matches_cg():
    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, val = random_tasks(n=6), random_tasks(n=3, seed=4)
    common = dict(hessian="fisher", damping=1e-2, solve=SolverSettings(tol=1e-12), fisher_samples=2, stationarity_warn=1e9)
    a = task_influence(problem, lam, tasks, val, InfluenceSettings(solver="woodbury", **common))
    b = task_influence(problem, lam, tasks, val, InfluenceSettings(solver="cg", **common))
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-7, atol=1e-12)


def test_nonstationary_point_is_flagged():
    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, val = random_tasks(n=6), random_tasks(n=3, seed=4)
    with pytest.warns(UserWarning, match="not stationary"):
        res = task_influence(problem, lam, tasks, val, InfluenceSettings(hessian="gauss-newton", damping=1e-2))
    assert res.diagnostics["stationarity"]["warning"]


def test_result_file_round_trip_and_pool_check(tmp_path):
    from metainfluence.errors import CheckpointError
    from metainfluence.influence.results import InfluenceResult

    problem, lam0, tasks = _quadratic(8)
    lam = _newton_minimum(problem, lam0, tasks)
    val = random_tasks(n=3, n_support=4, n_query=6, n_features=5, regression=True, seed=3)
    res = task_influence(problem, lam, tasks, val, InfluenceSettings(solver="explicit"))
    res.save(tmp_path / "scores", pool_fingerprint="abc")
    back = InfluenceResult.load(tmp_path / "scores", pool_fingerprint="abc")
    assert torch.equal(back.scores, res.scores)
    assert "HELPS" in (tmp_path / "scores.json").read_text()
    with pytest.raises(CheckpointError, match="another task pool"):
        InfluenceResult.load(tmp_path / "scores", pool_fingerprint="xyz")


def test_an_unconverged_solve_is_said_aloud_with_its_remedy():
    from metainfluence.influence.results import InfluenceWarning

    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, val = random_tasks(n=6), random_tasks(n=3, seed=4)
    settings = InfluenceSettings(hessian="gauss-newton", damping=1e-4, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12, max_iter=3))
    with pytest.warns(InfluenceWarning, match="max-iter"):
        res = task_influence(problem, lam, tasks, val, settings)
    assert res.diagnostics["solver"]["converged"] is False
    assert any("stopped before its tolerance" in w for w in res.diagnostics["warnings"])


def test_instance_results_carry_stationarity_and_the_implicit_inner_check():
    from metainfluence.influence.instance_if import instance_influence
    from metainfluence.influence.results import InfluenceWarning

    tasks, val = random_tasks(n=4), random_tasks(n=3, seed=4)
    problem, lam = small_problem("implicit", steps=2, lr=0.1, proximal=1.0, hidden=(5,))  # 2 steps: far from the inner optimum
    settings = InfluenceSettings(hessian="gauss-newton", damping=1e-2, solve=SolverSettings(tol=1e-10))
    with pytest.warns(InfluenceWarning):
        res = instance_influence(problem, lam, tasks, val, "query", settings)
    assert res.diagnostics["stationarity"]["ratio"] > 0
    assert res.diagnostics["inner_solve"]["relative_max"] > 1e-3
    assert any("implicit inner problem is not solved" in w for w in res.diagnostics["warnings"])
    solved, lam2 = small_problem("implicit", steps=300, lr=0.3, proximal=1.0, hidden=(5,))
    res2 = instance_influence(solved, lam2, tasks, val, "query", dataclasses.replace(settings, stationarity_warn=1e9))
    assert res2.diagnostics["inner_solve"]["relative_max"] < 1e-3
    assert not any("inner" in w for w in res2.diagnostics.get("warnings", []))


def test_a_saved_eigenpair_file_of_another_lambda_or_kind_is_recomputed_not_reused(tmp_path):
    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, val = random_tasks(n=6), random_tasks(n=3, seed=4)
    stem = str(tmp_path / "eig")
    settings = InfluenceSettings(hessian="gauss-newton", solver="lowrank", damping=1e-2, stationarity_warn=1e9, lowrank_file=stem,
                                 solve=SolverSettings(lowrank_rank=6))
    first = task_influence(problem, lam, tasks, val, settings)
    again = task_influence(problem, lam, tasks, val, settings)  # same λ, pool, kind: reused
    torch.testing.assert_close(again.scores, first.scores, rtol=0, atol=0)
    lam2 = lam + 0.05 * torch.randn(lam.shape, generator=torch.Generator().manual_seed(1), dtype=lam.dtype)
    fresh = task_influence(problem, lam2, tasks, val, dataclasses.replace(settings, lowrank_file=""))
    with pytest.warns(UserWarning, match="recomputing"):
        moved = task_influence(problem, lam2, tasks, val, settings)
    torch.testing.assert_close(moved.scores, fresh.scores, rtol=1e-10, atol=1e-14)
    with pytest.warns(UserWarning, match="recomputing"):
        task_influence(problem, lam2, tasks, val, dataclasses.replace(settings, hessian="exact", damping=1.0))


def test_newton_step_removal_is_exact_leave_one_out_on_a_quadratic():
    # F quadratic: λ without task k is one Newton step on the reduced objective, so the Newton-step
    # prediction ∇fᵀΔλ_k is exact where first-order task-IF is not
    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=8, n_support=4, n_query=6, n_features=5, regression=True, seed=0)
    val = random_tasks(n=4, n_support=4, n_query=6, n_features=5, regression=True, seed=1)
    H = materialize(TotalHessian(problem, lam0, tasks, "exact"))
    lam = lam0 - torch.linalg.solve(H, problem.meta_gradient(lam0, tasks))
    settings = InfluenceSettings(hessian="exact", damping=0.0, removal="newton", stationarity_warn=1e9, solve=SolverSettings(tol=1e-13))
    res = task_influence(problem, lam, tasks, val, settings)
    from metainfluence.influence.gradients import measurement_gradient

    grad_f, _ = measurement_gradient(problem, lam, val)
    for k in range(8):
        w = torch.ones(8, dtype=torch.float64)
        w[k] = 0
        H_R = materialize(TotalHessian(problem, lam, tasks, "exact", w=w))
        delta = -torch.linalg.solve(H_R, problem.meta_gradient(lam, tasks, w))
        assert float(res.scores[k]) == pytest.approx(float(grad_f @ delta), rel=1e-8, abs=1e-14)
    assert not torch.allclose(res.extra["first_order_scores"], res.scores, rtol=1e-4)


def test_newton_step_with_fisher_downdates_its_factor_exactly():
    from metainfluence.linalg import FactorOperator, woodbury_solve
    from metainfluence.influence.gradients import measurement_gradient

    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, val = random_tasks(n=6), random_tasks(n=3, seed=4)
    settings = InfluenceSettings(hessian="fisher", solver="woodbury", damping=1e-2, fisher_samples=3, removal="newton", stationarity_warn=1e9)
    res = task_influence(problem, lam, tasks, val, settings)
    op = TotalHessian(problem, lam, tasks, "fisher", fisher_samples=3, seed=settings.seed)
    G = problem.total_gradients(lam, tasks)
    grad_f, _ = measurement_gradient(problem, lam, val)
    for k in range(6):
        keep = torch.tensor([r % 6 != k for r in range(op.factor.shape[0])])
        reduced = FactorOperator(op.factor[keep], op.shift)
        x = woodbury_solve(reduced, G[k] / 6, 1e-2).x
        assert float(res.scores[k]) == pytest.approx(float(grad_f @ x), rel=1e-8)


def test_an_implicit_cg_stopped_short_is_said_and_its_total_hessian_is_not_symmetric():
    from metainfluence.meta.curvature import TotalHessian

    tasks, val = random_tasks(n=6, seed=1), random_tasks(n=3, seed=2)
    g = torch.Generator().manual_seed(0)
    for cg_steps, short in ((5, True), (80, False)):
        problem, lam = small_problem(kind="implicit", steps=30, lr=0.3, proximal=1.0, hidden=(4,), implicit_cg_steps=cg_steps)
        u, v = (torch.randn(problem.dim, generator=g, dtype=torch.float64) for _ in range(2))
        op = TotalHessian(problem, lam, tasks, "gauss-newton")
        asym = abs(float(u @ op.matvec(v) - v @ op.matvec(u))) / abs(float(u @ op.matvec(v)))
        res = task_influence(problem, lam, tasks, val, InfluenceSettings(hessian="gauss-newton", solver="explicit", stationarity_warn=1e9))
        said = any("implicit-function CG" in w for w in res.diagnostics.get("warnings", []))
        assert said == short and (asym > 1e-4) == short, (cg_steps, asym)
        assert (res.diagnostics["inner_solve"]["implicit_cg_residual_max"] > 1e-6) == short


def test_scores_in_one_block_share_the_measurement_gradient_and_are_charged_for_it(monkeypatch):
    """Inside reusing_measurement_gradients() task-IF and TracIn read ∇f from one pass over the validation pool
    and score exactly as they do alone; the second is charged the first pass's seconds. Another λ (one entry
    nudged) or another pool is a new pass."""
    from metainfluence.influence.gradients import reusing_measurement_gradients

    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, val = random_tasks(n=6), random_tasks(n=3, seed=4)
    settings = InfluenceSettings(hessian="gauss-newton", solver="cg", damping=1e-2, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12))
    alone = {m: task_influence(problem, lam, tasks, val, dataclasses.replace(settings, method=m)) for m in ("task-if", "tracin")}
    passes = []
    original = problem.summed_loss_and_gradient_rows
    monkeypatch.setattr(problem, "summed_loss_and_gradient_rows", lambda *a, **k: passes.append(1) or original(*a, **k))
    with reusing_measurement_gradients():
        shared = {m: task_influence(problem, lam, tasks, val, dataclasses.replace(settings, method=m)) for m in ("task-if", "tracin")}
        assert len(passes) == 1
        nudged = lam.clone()
        nudged[0] += 1e-12
        task_influence(problem, nudged, tasks, val, dataclasses.replace(settings, method="tracin"))
        task_influence(problem, lam, tasks, random_tasks(n=3, seed=5), dataclasses.replace(settings, method="tracin"))
        assert len(passes) == 3
        # the loss ranking records f: read from the pass above, not from a pass of its own over the validation pool
        sizes = []
        losses = problem.task_losses
        monkeypatch.setattr(problem, "task_losses", lambda lam_, pool, *a: sizes.append(len(pool)) or losses(lam_, pool, *a))
        task_influence(problem, lam, tasks, val, dataclasses.replace(settings, method="loss"))
        assert sizes == [len(tasks)]
    task_influence(problem, lam, tasks, val, dataclasses.replace(settings, method="tracin"))
    assert len(passes) == 4  # outside the block nothing is kept
    for m in ("task-if", "tracin"):
        assert torch.equal(shared[m].scores, alone[m].scores)
    first = shared["task-if"].diagnostics
    second = shared["tracin"].diagnostics
    assert "measurement_gradient_reused_s" not in first
    assert second["measurement_gradient_reused_s"] == first["timings_s"]["measurement_gradient"]
    assert second["timings_s"]["total"] >= second["measurement_gradient_reused_s"]


def test_newton_step_with_gamma_drops_the_removed_tasks_share_of_gamma():
    # the reduced pool's gamma Hessian has Γ_R = Γ − ‖∇_θ L_Q^k‖₁/n (SPEC §3 with w_k = 0), as TotalHessian(w=w_R) builds it
    from metainfluence.influence.gradients import measurement_gradient

    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks, val = random_tasks(n=6), random_tasks(n=3, seed=4)
    delta = 5e-2
    res = task_influence(problem, lam, tasks, val, InfluenceSettings(hessian="gamma", solver="explicit", damping=delta, removal="newton",
                                                                     stationarity_warn=1e9))
    G = problem.total_gradients(lam, tasks)
    grad_f, _ = measurement_gradient(problem, lam, val)
    full = TotalHessian(problem, lam, tasks, "gamma").gamma
    for k in (0, 3):
        w = torch.ones(6, dtype=torch.float64)
        w[k] = 0
        op_R = TotalHessian(problem, lam, tasks, "gamma", w=w)
        assert op_R.gamma < full
        x = torch.linalg.solve(materialize(op_R) + delta * torch.eye(lam.numel(), dtype=torch.float64), G[k] / 6)
        assert float(res.scores[k]) == pytest.approx(float(grad_f @ x), rel=1e-9)


def test_saved_scores_say_what_they_mean_per_method_in_both_files(tmp_path):
    """task-IF's file carries the sign convention of a predicted change; the loss and random baselines say what their
    scores are instead (not a change); the safetensors file holds the same sentence in its metadata."""
    import json

    from safetensors import safe_open

    from metainfluence import SIGN_CONVENTION
    from metainfluence.influence.results import BASELINE_MEANINGS

    problem, lam = small_problem(steps=1, hidden=(5,))
    train, val = random_tasks(n=6), random_tasks(n=4, seed=1)
    for method in ("task-if", "loss", "random"):
        res = task_influence(problem, lam, train, val, InfluenceSettings(method=method, hessian="gauss-newton", solver="explicit", damping=1e-2,
                                                                         stationarity_warn=1e9))
        res.save(tmp_path / method)
        info = json.loads((tmp_path / f"{method}.json").read_text())
        with safe_open(str(tmp_path / f"{method}.safetensors"), "pt") as f:
            meta = f.metadata()
        want = SIGN_CONVENTION if method == "task-if" else BASELINE_MEANINGS[method][0]
        assert info["sign_convention"] == meta["sign_convention"] == want and info["units"] == meta["units"]
        assert want.startswith("score = predicted change") == (method == "task-if")


def test_tasks_whose_implicit_cg_made_no_progress_are_named():
    """Where the inner Hessian has non-positive curvature along a task's query gradient, fixed-step CG leaves x = 0
    (residual exactly 1; that task's total gradient, and so its score, is 0) or wanders off (residual > 1): the
    pool-wide residual alone hid which tasks' scores are no measurement."""
    # a tiny γ and one inner step from the initialisation: the support loss's Hessian is indefinite at θ_i
    problem, lam = small_problem(kind="implicit", steps=1, lr=0.01, proximal=1e-3, hidden=(8,), seed=2, implicit_cg_steps=10)
    tasks, val = random_tasks(n=12, seed=2), random_tasks(n=3, seed=5)
    residuals = problem.implicit_solve_residuals(lam, tasks)
    failed = [k for k in range(12) if residuals[k] >= 1]
    stuck = [k for k in range(12) if residuals[k] == 1]
    assert stuck and len(failed) < 12  # the case is drawn: some tasks stuck at x = 0, others not
    res = task_influence(problem, lam, tasks, val, InfluenceSettings(hessian="fisher", solver="woodbury", damping=1e-2, stationarity_warn=1e9))
    assert res.diagnostics["inner_solve"]["implicit_cg_failed_positions"] == failed
    assert any("made no progress" in w and "--inner-proximal" in w for w in res.diagnostics["warnings"])
    assert all(float(res.scores[k]) == 0.0 for k in stuck)  # what the warning explains


def test_scores_predicting_a_negative_validation_loss_are_said_to_be_out_of_range():
    from metainfluence.influence.task_if import beyond_measurement

    problem, _ = small_problem()
    scores = torch.tensor([0.1, -0.2, -1.5, -0.9], dtype=torch.float64)
    diag: dict = {}
    with pytest.warns(UserWarning, match="far outside its range"):
        beyond_measurement(problem, scores, 1.0, diag)  # f = 1.0: only −1.5 predicts a loss below 0
    assert diag["scores_beyond_measurement"] == 1 and "1 task(s) score below −f = −1" in diag["warnings"][0]
    quiet: dict = {}
    beyond_measurement(problem, scores, 2.0, quiet)
    assert quiet["scores_beyond_measurement"] == 0 and "warnings" not in quiet
