"""instance-IF (docs/method.md §7) and closed-form editing (docs/method.md §6)."""

from __future__ import annotations

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.influence.editing import Removal, edit_model, unlearn
from metainfluence.influence.gradients import example_mixed_gradients, example_scores
from metainfluence.meta.curvature import TotalHessian
from metainfluence.influence.instance_if import instance_influence
from metainfluence.influence.results import InfluenceSettings
from metainfluence.linalg import SolverSettings
from metainfluence.linalg import materialize
from metainfluence.influence.task_if import task_influence


def _quadratic(n=10, seed=0, lr=0.05, steps=1, proximal=0.0):
    problem, lam0 = small_problem("unrolled", steps=steps, lr=lr, hidden=(), n_features=5, n_classes=1, loss="mse",
                                  weight_decay=1e-2, proximal=proximal)
    tasks = random_tasks(n=n, n_support=4, n_query=6, n_features=5, regression=True, seed=seed)
    H = materialize(TotalHessian(problem, lam0, tasks, "exact"))
    lam = lam0 - torch.linalg.solve(H, problem.meta_gradient(lam0, tasks))
    return problem, lam, tasks


def test_query_example_scores_sum_to_their_task_score():
    # L_Q = Σ_z u_z ℓ_z / |Q| is linear in u, so the task's gradient is the sum of its examples' parts.
    problem, lam = small_problem(steps=2, hidden=(6,), weight_decay=1e-2)
    tasks, val = random_tasks(n=5), random_tasks(n=3, seed=7)
    settings = InfluenceSettings(hessian="gauss-newton", damping=1e-2, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12))
    t = task_influence(problem, lam, tasks, val, settings)
    q = instance_influence(problem, lam, tasks, val, "query", settings)
    torch.testing.assert_close(q.scores.sum(1), t.scores, rtol=1e-9, atol=1e-14)


def test_instance_scores_from_task_ifs_ihvp_equal_a_fresh_solve():
    problem, lam = small_problem(steps=2, hidden=(6,), weight_decay=1e-2)
    tasks, val = random_tasks(n=5), random_tasks(n=3, seed=7)
    settings = InfluenceSettings(hessian="gauss-newton", damping=1e-2, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12))
    t = task_influence(problem, lam, tasks, val, settings)
    for which in ("support", "query"):
        fresh = instance_influence(problem, lam, tasks, val, which, settings)
        shared = instance_influence(problem, lam, tasks, val, which, settings, s=t.extra["s"])
        torch.testing.assert_close(shared.scores, fresh.scores, rtol=1e-8, atol=1e-14)
        assert shared.diagnostics["solver"]["name"] == "given"


def test_support_mixed_derivative_equals_finite_differences_in_the_weight():
    problem, lam = small_problem(steps=2, hidden=(6,))
    tasks = random_tasks(n=3)
    s = torch.randn(lam.numel(), dtype=torch.float64)
    scores = example_scores(problem, lam, tasks, s, "support")  # sᵀ ∂_λ∂_{v_z} L_Q
    full = example_mixed_gradients(problem, lam, tasks, "support")
    torch.testing.assert_close(full @ s, scores, rtol=1e-10, atol=1e-12)
    v, u = problem.default_weights(tasks, lam)
    k, z, eps = 1, 2, 1e-5
    vp, vm = v.clone(), v.clone()
    vp[k, z] += eps
    vm[k, z] -= eps
    gp = problem.total_gradients(lam, tasks, v=vp)[k]
    gm = problem.total_gradients(lam, tasks, v=vm)[k]
    torch.testing.assert_close(scores[k, z], torch.dot(s, (gp - gm) / (2 * eps)), rtol=1e-6, atol=1e-10)


def test_example_removal_edit_matches_reduced_objective_to_first_order():
    problem, lam, tasks = _quadratic(n=40)
    support = torch.zeros(40, 4, dtype=torch.bool)
    support[3, 1] = True
    query = torch.zeros(40, 6, dtype=torch.bool)
    query[5, 0] = True
    removal = Removal(support=support, query=query)
    settings = InfluenceSettings(solver="explicit", damping=0.0)
    first = edit_model(problem, lam, tasks, removal, settings)
    # F is quadratic in λ for every weight setting: one Newton step on F(λ; w_R) is the exact minimiser.
    exact = edit_model(problem, lam, tasks, removal, settings, newton_steps=1)
    assert exact.diagnostics["newton_final_grad_norm"] < 1e-10
    cos = torch.nn.functional.cosine_similarity(first.delta, exact.delta, dim=0)
    assert cos > 0.99
    assert (first.delta - exact.delta).norm() < 0.1 * exact.delta.norm()


def test_task_edit_with_newton_refinement_is_exact_leave_out_on_a_quadratic():
    problem, lam, tasks = _quadratic(n=10)
    removal = Removal(tasks=[2, 7])
    settings = InfluenceSettings(solver="explicit", damping=0.0)
    res = edit_model(problem, lam, tasks, removal, settings, newton_steps=1)
    w, _, _ = removal.weights(problem, lam, tasks)
    H = materialize(TotalHessian(problem, lam, tasks, "exact", w=w))
    truth = lam - torch.linalg.solve(H, problem.meta_gradient(lam, tasks, w))
    torch.testing.assert_close(res.lam, truth, rtol=1e-9, atol=1e-12)
    # and the closed-form (first-order) edit is the task-IF prediction summed over the set
    first = edit_model(problem, lam, tasks, removal, settings)
    assert torch.nn.functional.cosine_similarity(first.delta, res.delta, dim=0) > 0.98


def test_gauss_newton_newton_steps_descend_a_nonlinear_reduced_objective():
    # a tanh network: F(λ; w_R) is far from quadratic for a third of the pool removed. Full Gauss–Newton
    # steps overshot here (‖∇F‖ grew 6×, before backtracking was added); with backtracking every step lowers F and the
    # gradient left by the closed-form edit shrinks, where the exact Hessian is indefinite
    from metainfluence.meta.refine import RefineSettings, refine

    problem, lam0 = small_problem(steps=1, lr=0.3, hidden=(6,), weight_decay=1e-2)
    tasks = random_tasks(n=12, seed=2)
    lam, _ = refine(problem, lam0, tasks, RefineSettings(tol=1e-9, max_iter=500))
    removal = Removal(tasks=[0, 3, 5, 8])
    w, v, u = removal.weights(problem, lam, tasks)
    settings = InfluenceSettings(hessian="gauss-newton", solver="cg", damping=1e-6, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12, max_iter=500))
    # the paper's full-H step is the conservative one here: the reduced-H Newton step (1.5× longer, with a
    # third of the pool's curvature gone) overshoots on this far-from-quadratic F, which the Newton steps repair
    first = edit_model(problem, lam, tasks, removal, settings, step="full")
    refined = edit_model(problem, lam, tasks, removal, settings, newton_steps=6, step="full")
    g = lambda x: float(problem.meta_gradient(x, tasks, w, v, u).norm())
    f = lambda x: float(problem.objective(x, tasks, w, v, u))
    assert g(first.lam) < g(lam) and f(first.lam) < f(lam)
    assert f(refined.lam) < f(first.lam)
    assert refined.diagnostics["newton_final_grad_norm"] < 0.75 * g(first.lam)
    assert all(0 < s["step"] <= 1 for s in refined.diagnostics["newton"]) and len(refined.diagnostics["newton"]) == 6
    # with the exact Hessian, indefinite here, the edit and its Newton steps fall back to Gauss–Newton, said aloud
    # (the steps raised DivergenceError before, against what edit_model promises)
    with pytest.warns(UserWarning, match="indefinite"):
        exact = edit_model(problem, lam, tasks, removal, InfluenceSettings(hessian="exact", solver="cg", damping=1e-6, stationarity_warn=1e9,
                                                                           solve=SolverSettings(tol=1e-12, max_iter=500)), newton_steps=6)
    assert exact.diagnostics["newton_hessian"] == "gauss-newton" and f(exact.lam) < f(lam) and g(exact.lam) < g(lam)


def test_unlearning_moves_against_the_removed_tasks():
    problem, lam, tasks = _quadratic(n=10)
    removal = Removal(tasks=[1])
    out = unlearn(problem, lam, tasks, removal, steps=3, lr=0.5)
    before = problem.task_losses(lam, tasks)[1]
    after = problem.task_losses(out.lam, tasks)[1]
    assert after > before  # gradient ascent on the removed task's loss


def test_two_stage_agrees_with_unrolled_when_the_inner_loop_reaches_its_optimum():
    """Proximal inner problem run to convergence, query set = support set, small γ: the term two-stage
    drops, (∂_λ δθ_z)ᵀ ∇_θ L_Q, vanishes with ∇_θ L_Q(θ_k) = −γ(θ_k − λ), so the two must agree."""
    problem, lam = small_problem("unrolled", steps=300, lr=0.4, proximal=0.01, hidden=(), n_features=5, n_classes=1,
                                 loss="mse", weight_decay=1e-2)
    base = random_tasks(n=4, n_support=10, n_query=10, n_features=5, regression=True, seed=2)
    from metainfluence.tasks.tensors import TaskTensors

    tasks = TaskTensors(base.support_x, base.support_y, base.support_x.clone(), base.support_y.clone())
    val = random_tasks(n=3, n_support=10, n_query=10, n_features=5, regression=True, seed=5)
    from torch.func import grad

    v, _ = problem.default_weights(tasks, lam)
    task0 = problem.records(lam, tasks, v).row(0)
    theta = problem.adapt(lam, task0)
    assert grad(problem.inner_objective)(theta, lam, task0).norm() < 1e-9
    common = dict(hessian="exact", damping=1e-2, solve=SolverSettings(tol=1e-12), inner_damping=0.0, inner_cg_steps=40, stationarity_warn=1e9)
    unrolled = instance_influence(problem, lam, tasks, val, "support", InfluenceSettings(support_method="unrolled", **common))
    two = instance_influence(problem, lam, tasks, val, "support", InfluenceSettings(support_method="two-stage", **common))
    assert two.diagnostics["inner_solve_residual"] < 1e-8
    a, b = unrolled.scores.flatten(), two.scores.flatten()
    from metainfluence.evaluation.metrics import pearson

    assert pearson(a, b) > 0.99
    assert float((a - b).norm() / a.norm()) < 0.05


def _two_stage_dense(problem, lam, tasks, s, k, response):
    """−sᵀ ∇_λ P_z / n for every support example z of task k, P_z(λ) = ∇_θ L_Q(θ_k(λ))ᵀ δθ_z with
    δθ_z = R ∇ℓ_z / |S| held constant, R = response(H_in) (dense)."""
    from torch.func import grad, hessian, jacrev

    xs, ys, xq, yq = tasks.support_x[k], tasks.support_y[k], tasks.query_x[k], tasks.query_y[k]
    v, u = problem.default_weights(tasks, lam)
    task_k = problem.records(lam, tasks, v, u).row(k)
    theta = problem.adapt(lam, task_k)
    H_in = hessian(lambda th: problem.inner_objective(th, lam, task_k))(theta)
    R = response(H_in)
    per_ex = jacrev(lambda th: problem.example_losses(th, xs, ys))(theta)
    out = []
    for z in range(xs.shape[0]):
        dtheta = R @ per_ex[z] / xs.shape[0]
        P = lambda l: torch.dot(grad(problem.weighted_loss)(problem.adapt(l, task_k), xq, yq, u[k]), dtheta)
        out.append(-torch.dot(s, grad(P)(lam)) / len(tasks))
    return torch.stack(out)


def test_two_stage_equals_its_dense_formula():
    """K unrolled steps of size α: R = α Σ_{j<K} (I − αH_in)^j (docs/method.md §7, corrected), applied exactly."""
    problem, lam = small_problem("unrolled", steps=2, lr=0.3, hidden=(4,))
    tasks, val = random_tasks(n=2), random_tasks(n=2, seed=3)
    settings = InfluenceSettings(hessian="gauss-newton", support_method="two-stage", damping=1e-2, inner_damping=0.5, inner_cg_steps=80, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12))
    res = instance_influence(problem, lam, tasks, val, "support", settings)
    eye = torch.eye(lam.numel(), dtype=torch.float64)
    k_step = lambda H: 0.3 * (eye + (eye - 0.3 * H))  # K = 2
    torch.testing.assert_close(res.scores[1], _two_stage_dense(problem, lam, tasks, res.extra["s"], 1, k_step), rtol=1e-6, atol=1e-12)


def test_two_stage_response_limits():
    """No inner step, no support effect: scores exactly 0 (today's main gave non-zero scores). Many small
    steps: the K-step response reaches H_in⁻¹, the implicit (inner-optimum) formula."""
    tasks, val = random_tasks(n=2), random_tasks(n=2, seed=3)
    settings = InfluenceSettings(hessian="gauss-newton", support_method="two-stage", damping=1e-2, inner_damping=0.0, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12))
    problem, lam = small_problem("unrolled", steps=0, hidden=(4,))
    assert torch.count_nonzero(instance_influence(problem, lam, tasks, val, "support", settings).scores) == 0
    # a proximal term makes H_in = ∇²L_S + γI positive definite, so (I − αH_in)^K → 0
    problem, lam = small_problem("unrolled", steps=80, lr=0.3, proximal=1.0, hidden=(4,))  # (1 − 0.3)^80 ≈ 4e-13
    res = instance_influence(problem, lam, tasks, val, "support", settings)
    limit = _two_stage_dense(problem, lam, tasks, res.extra["s"], 0, torch.linalg.inv)
    torch.testing.assert_close(res.scores[0], limit, rtol=1e-6, atol=1e-12)


def _reoptimised(problem, lam, tasks, removal):
    """argmin F(λ; w_R, v_R, u_R) of a quadratic F: one exact Newton step from anywhere."""
    w, v, u = removal.weights(problem, lam, tasks)
    H = materialize(TotalHessian(problem, lam, tasks, "exact", w=w, v=v, u=u))
    return lam - torch.linalg.solve(H, problem.meta_gradient(lam, tasks, w, v, u))


def _mask(rows, cols, shape):
    m = torch.zeros(shape, dtype=torch.bool)
    m[rows, cols] = True
    return m


@pytest.mark.parametrize("what", ["tasks", "support", "query", "mixture"])
def test_default_edit_is_exact_reoptimisation_on_a_quadratic(what):
    # linear model, squared error, one inner step: F is quadratic, so the reduced-H step lands on the
    # re-optimised λ for 40% of the pool removed (the full-H step covered about half of the way on main)
    problem, lam, tasks = _quadratic(n=10)
    support = _mask([0, 0, 3, 5, 8], [0, 2, 1, 3, 0], (10, 4))
    query = _mask([1, 4, 4, 6, 9], [5, 0, 2, 1, 3], (10, 6))
    removal = {"tasks": Removal(tasks=[0, 2, 5, 7]), "support": Removal(support=support), "query": Removal(query=query),
               "mixture": Removal(tasks=[2, 7], support=support, query=query)}[what]
    settings = InfluenceSettings(hessian="exact", solver="cg", damping=0.0, stationarity_warn=1e9, solve=SolverSettings(tol=1e-13, max_iter=500))
    res = edit_model(problem, lam, tasks, removal, settings)
    truth = _reoptimised(problem, lam, tasks, removal)
    torch.testing.assert_close(res.lam, truth, rtol=0, atol=1e-8)
    full = edit_model(problem, lam, tasks, removal, settings, step="full")
    assert full.diagnostics["step"] == "full" and not torch.allclose(full.lam, truth, atol=1e-6)


def test_newton_steps_fall_back_to_the_gradient_where_the_newton_direction_climbs():
    from metainfluence.influence.editing import descent_direction
    from metainfluence.linalg import MatrixOperator

    H = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))  # indefinite
    g = torch.tensor([0.1, 1.0], dtype=torch.float64)
    newton = torch.linalg.solve(H, g)  # gᵀH⁻¹g = 0.005 − 1 < 0: λ − newton goes uphill
    d, fallback = descent_direction(g, newton, MatrixOperator(H), damping=0.0)
    assert fallback and float(g @ d) > 0
    assert torch.equal(d, g)  # gᵀHg = 0.02 − 1 < 0: no Cauchy scale exists, unit scale
    H_pd = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    d3, fallback3 = descent_direction(g, -g, MatrixOperator(H_pd), 0.0)  # an uphill candidate on a convex F
    assert fallback3 and torch.allclose(d3, g * float(g @ g) / float(g @ H_pd @ g))
    d2, fallback2 = descent_direction(g, torch.linalg.solve(torch.eye(2, dtype=torch.float64), g), MatrixOperator(H), 0.0)
    assert not fallback2 and torch.equal(d2, g)


def test_two_stage_inner_solves_stopped_short_are_said_with_their_remedy():
    problem, lam = small_problem(kind="implicit", steps=30, lr=0.3, proximal=1.0, hidden=(4,))
    tasks, val = random_tasks(n=4, n_support=5, seed=1), random_tasks(n=3, seed=2)
    common = dict(hessian="gauss-newton", support_method="two-stage", damping=1e-2, inner_damping=0.0, stationarity_warn=1e9)
    for steps, short in ((1, True), (60, False)):
        res = instance_influence(problem, lam, tasks, val, "support", InfluenceSettings(inner_cg_steps=steps, **common))
        said = [w for w in res.diagnostics.get("warnings", []) if "two-stage inner solves" in w]
        assert bool(said) == short == (res.diagnostics["inner_solve_residual"] > 1e-2), (steps, res.diagnostics["inner_solve_residual"])
        assert all("--inner-cg-steps (now 1)" in w for w in said)


def test_an_edit_step_that_does_not_descend_is_taken_whole_and_said():
    from metainfluence.influence.editing import _backtrack

    f, g = (lambda x: (x ** 2).sum()), (lambda x: 2 * x)
    lam, diag = torch.ones(3, dtype=torch.float64), {}
    with pytest.warns(UserWarning, match="does not descend the reduced objective"):
        assert _backtrack(f, g, lam, lam.clone(), diag) == 1.0  # an ascent direction: nothing to backtrack on
    assert diag["edit_not_descent"] and "unchecked" in diag["warnings"][0]
    quiet: dict = {}
    assert _backtrack(f, g, lam, -0.5 * lam, quiet) == 1.0 and "warnings" not in quiet  # the Newton step of f: kept whole
    assert _backtrack(f, g, lam, -4 * lam, quiet) == 0.25 and "warnings" not in quiet  # overshoots: halved to the minimiser
    # a gradient that disagrees with the objective (as on a ReLU model's kinks): no fraction of the step lowers it, so none is taken
    lying: dict = {}
    with pytest.warns(UserWarning, match="left unchanged"):
        assert _backtrack(f, lambda x: -2 * x, lam, lam.clone(), lying) == 0.0
    assert "refine the checkpoint first" in lying["warnings"][0]


def test_unrolled_support_scores_of_an_implicit_inner_loop_are_refused_before_any_pass(monkeypatch):
    from metainfluence.errors import SettingsError
    from metainfluence.influence import instance_if

    problem, lam = small_problem(kind="implicit", steps=5, lr=0.3, proximal=1.0, hidden=(4,))
    monkeypatch.setattr(instance_if, "measurement_gradient", lambda *a, **k: pytest.fail("a gradient pass ran before the refusal"))
    with pytest.raises(SettingsError, match="--support-method two-stage"):
        instance_influence(problem, lam, random_tasks(n=3), random_tasks(n=2, seed=3), "support", InfluenceSettings(hessian="gauss-newton"))
