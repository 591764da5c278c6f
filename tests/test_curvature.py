"""A fitted curvature sketch (randomized Nyström): its eigenpairs, the preconditioned exact tier, the
fast tier's honest residual, refusal of a sketch of another λ, and damping relative to the spectrum."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import curvature_problem
from metainfluence.errors import CheckpointError, SettingsError
from metainfluence.influence.curvature import CurvatureArtifact, fit_curvature
from metainfluence.influence.gradients import measurement_gradient
from metainfluence.influence.results import InfluenceSettings
from metainfluence.influence.task_if import task_influence
from metainfluence.linalg import MatrixOperator, adaptive_nystrom_sketch, SolverSettings, cg_solve, materialize, nystrom_sketch, pcg_solve, sketch_solve
from metainfluence.meta.curvature import TotalHessian


def _decaying(p=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    vals = 10.0 ** torch.linspace(2, -4, p, dtype=torch.float64)  # condition number 1e6
    return Q @ torch.diag(vals) @ Q.T, vals


def test_nystrom_recovers_the_top_of_a_decaying_spectrum_and_preconditions_cg():
    A, vals = _decaying()
    op = MatrixOperator(A)
    sk = nystrom_sketch(op, 20, oversample=10, seed=1)
    torch.testing.assert_close(sk.eigenvalues[:10], vals[:10], rtol=0.05, atol=0)  # one sketch, no power iterations
    assert bool((sk.eigenvalues <= vals[:20] * (1 + 1e-9)).all())  # Nyström never overestimates
    b = torch.randn(80, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    settings = SolverSettings(tol=1e-10, max_iter=2000)
    plain = cg_solve(op, b, 1e-3, settings)
    pre = pcg_solve(op, b, 1e-3, settings, sketch=sk)
    exact = torch.linalg.solve(A + 1e-3 * torch.eye(80, dtype=torch.float64), b)
    assert pre.residual < 1e-9 and torch.allclose(pre.x, exact, rtol=1e-7, atol=1e-10)
    assert pre.iterations < 0.5 * plain.iterations, (pre.iterations, plain.iterations)
    # the fast tier is approximate and says how much: its recorded residual is the true one
    fast = sketch_solve(op, b, 1e-3, sketch=sk)
    true = float(((A + 1e-3 * torch.eye(80, dtype=torch.float64)) @ fast.x - b).norm() / b.norm())
    assert fast.residual == pytest.approx(true, rel=1e-8)


def test_pcg_with_a_saved_sketch_equals_cg_and_a_sketch_of_another_lambda_is_refused_another_kind_only_preconditions(tmp_path):
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, solve=SolverSettings(tol=1e-11, max_iter=2000))
    art = fit_curvature(problem, lam, train, base, rank=20, probes=3)
    assert art.info["fit_over_floor"] > 0 and len(art.info["probe_operator_rel_error"]) == 3
    art.save(tmp_path / "curv")
    cg = task_influence(problem, lam, train, val, base)
    pcg = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "curv")))
    torch.testing.assert_close(pcg.scores, cg.scores, rtol=1e-7, atol=1e-14)
    assert pcg.diagnostics["curvature"]["rank"] == 20 and pcg.diagnostics["solver"]["name"] == "pcg"
    # the fast tier on a spectrum that is not low-rank: approximate, and said aloud with the remedy
    from metainfluence.influence.results import InfluenceWarning

    with pytest.warns(InfluenceWarning, match="--solver pcg"):
        fast = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "curv")))
    assert fast.diagnostics["solver"]["residual"] > 1e-2 and any("large residual" in w for w in fast.diagnostics["warnings"])
    with pytest.raises(CheckpointError, match="another λ"):
        task_influence(problem, lam + 0.01, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "curv")))
    # another Hessian kind of the same λ and pool: pcg stays exact for its own kind (the file only preconditions),
    # the fast tier, whose answer is the file's inverse, refuses it
    fisher = dataclasses.replace(base, hessian="fisher", fisher_samples=2)
    by_pcg = task_influence(problem, lam, train, val, dataclasses.replace(fisher, solver="pcg", curvature_file=str(tmp_path / "curv")))
    torch.testing.assert_close(by_pcg.scores, task_influence(problem, lam, train, val, fisher).scores, rtol=1e-7, atol=1e-14)
    assert by_pcg.diagnostics["curvature"]["hessian"] == "gauss-newton"
    with pytest.raises(CheckpointError, match="fitted against the gauss-newton total Hessian, not fisher: use --hessian gauss-newton"):
        task_influence(problem, lam, train, val, dataclasses.replace(fisher, solver="curvature", curvature_file=str(tmp_path / "curv")))
    # the exact kind cannot be fitted (not positive semi-definite): the advice is pcg with this file, which then serves it
    with pytest.raises(CheckpointError, match="keep --hessian exact with --solver pcg") as refused:
        task_influence(problem, lam, train, val, dataclasses.replace(base, hessian="exact", solver="curvature", curvature_file=str(tmp_path / "curv")))
    assert "metainfluence curvature ... --hessian exact" not in str(refused.value)
    exact = dataclasses.replace(base, hessian="exact", damping=0.5)  # this λ is no minimum: the exact H needs a larger damping
    torch.testing.assert_close(task_influence(problem, lam, train, val, dataclasses.replace(exact, solver="pcg", curvature_file=str(tmp_path / "curv"))).scores,
                               task_influence(problem, lam, train, val, exact).scores, rtol=1e-6, atol=1e-14)
    loaded = CurvatureArtifact.load(tmp_path / "curv")
    torch.testing.assert_close(loaded.sketch.eigenvectors, art.sketch.eigenvectors)


def test_relative_damping_is_a_multiple_of_the_mean_eigenvalue():
    problem, lam, train, val = curvature_problem()
    H = materialize(TotalHessian(problem, lam, train, "gauss-newton"))
    mean_eig = float(torch.trace(H)) / H.shape[0]
    rel = InfluenceSettings(hessian="gauss-newton", damping=0.5, damping_mode="relative", stationarity_warn=1e9, solve=SolverSettings(tol=1e-12))
    res = task_influence(problem, lam, train, val, rel)
    est = res.diagnostics["solver"]["mean_eigenvalue"]
    assert est == pytest.approx(mean_eig, rel=0.35)  # Hutchinson with 16 probes
    absolute = task_influence(problem, lam, train, val, dataclasses.replace(rel, damping=0.5 * est, damping_mode="absolute"))
    torch.testing.assert_close(res.scores, absolute.scores, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("hessian,damping", [("gauss-newton", 1e-2), ("exact", 1.0)])  # exact: indefinite below δ ≈ 0.2 here
def test_float32_products_agree_with_working_precision_and_report_the_true_residual(hessian, damping):
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian=hessian, damping=damping, stationarity_warn=1e9, solve=SolverSettings(tol=1e-5, max_iter=500))
    ref = task_influence(problem, lam, train, val, base)
    mixed = task_influence(problem, lam, train, val, dataclasses.replace(base, products="float32"))
    assert mixed.diagnostics["solver"]["products"] == "float32"
    assert float((mixed.extra["s"] - ref.extra["s"]).norm() / ref.extra["s"].norm()) < 1e-4
    torch.testing.assert_close(mixed.scores, ref.scores, rtol=1e-3, atol=1e-6 * float(ref.scores.abs().max()))
    # the recorded residual is measured with float64 products, not the float32 ones the solve used
    op = TotalHessian(problem, lam, train, hessian)
    g, _ = measurement_gradient(problem, lam, val)
    true = float((op.matvec(mixed.extra["s"]) + damping * mixed.extra["s"] - g).norm() / g.norm())
    assert mixed.diagnostics["solver"]["residual"] == pytest.approx(true, rel=1e-6)


def test_the_fast_tier_checks_a_sample_of_many_right_hand_sides_and_says_which():
    A, _ = _decaying(p=40)
    op = MatrixOperator(A)
    sk = nystrom_sketch(op, 10, seed=1)
    B = torch.randn(30, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fast = sketch_solve(op, B, 1e-2, sketch=sk)
    rows = fast.info["residual_rows"]
    assert len(rows) == 8 and rows[0] == 0 and rows[-1] == 29 and fast.info["matvecs"] == 8
    D = A + 1e-2 * torch.eye(40, dtype=torch.float64)
    true = ((fast.x[rows] @ D - B[rows]).norm(dim=1) / B[rows].norm(dim=1)).tolist()
    assert fast.info["residuals"] == pytest.approx(true, rel=1e-8) and fast.residual == pytest.approx(max(true), rel=1e-8)
    few = sketch_solve(op, B[:5], 1e-2, sketch=sk)  # up to 8: every one is checked
    assert "residual_rows" not in few.info and len(few.info["residuals"]) == 5
    two = sketch_solve(op, B, 1e-2, SolverSettings(residual_checks=2), sketch=sk)
    assert two.info["residual_rows"] == [0, 29] and two.info["matvecs"] == 2


def test_adaptive_rank_grows_until_the_spectrum_reaches_the_damped_floor_reusing_its_products():
    A, vals = _decaying(p=80)  # eigenvalues 1e2 … 1e-4, log-spaced
    op = MatrixOperator(A)
    floor = 1e-2
    sk = adaptive_nystrom_sketch(op, floor, target=10.0, start=5, max_rank=80, oversample=5, seed=3)
    info = sk.info
    assert info["stopped_by"] == "spectrum" and float(sk.eigenvalues[-1]) <= 10 * floor
    # it stopped at the first doubling that got there, and every earlier one had not
    assert all(h["eigenvalue_min_kept"] > 10 * floor for h in info["history"][:-1])
    assert [h["rank"] for h in info["history"]] == [5 * 2**k for k in range(len(info["history"]))]
    assert info["products"] == info["history"][-1]["rank"] + 5  # products reused, never retaken
    # the true spectrum has about as many eigenvalues above 10·floor as the sketch needed
    needed = int((vals > 10 * floor).sum())
    assert needed <= sk.rank <= 2 * needed + 5
    torch.testing.assert_close(sk.eigenvalues[:10], vals[:10], rtol=1e-2, atol=0)
    capped = adaptive_nystrom_sketch(op, 1e-6, start=5, max_rank=20, oversample=5, seed=3)
    assert capped.info["stopped_by"] == "max_rank" and capped.rank == 20
    # a time limit already spent keeps the first sketch and says why it stopped growing (refine's budget bounds the fit)
    import time

    late = adaptive_nystrom_sketch(op, 1e-6, start=5, max_rank=20, oversample=5, seed=3, deadline=time.perf_counter() - 1)
    assert late.info["stopped_by"] == "time" and late.rank == 5 and len(late.info["history"]) == 1


def test_fit_curvature_auto_rank_on_a_task_subsample_is_recorded_and_pcg_stays_exact(tmp_path):
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, solve=SolverSettings(tol=1e-11, max_iter=2000))
    art = fit_curvature(problem, lam, train, base, rank="auto", max_tasks=6, probes=2)
    assert art.info["rank_setting"] == "auto" and art.info["n_tasks_fitted"] == 6 and art.info["sketch"]["adaptive"]
    art.save(tmp_path / "auto")
    cg = task_influence(problem, lam, train, val, base)
    pcg = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "auto")))
    torch.testing.assert_close(pcg.scores, cg.scores, rtol=1e-7, atol=1e-14)
    with pytest.raises(SettingsError, match="auto"):
        fit_curvature(problem, lam, train, base, rank="many")


def test_fisher_curvature_file_inverts_exactly_preconditions_pcg_to_cg_and_round_trips(tmp_path):
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, fisher_samples=8, stationarity_warn=1e9,
                             solve=SolverSettings(tol=1e-10, max_iter=2000))
    art = fit_curvature(problem, lam, train, base, method="fisher", probes=2)
    assert art.method == "fisher" and art.info["factor_rows"] == 8 * len(train)
    K = art.sketch.factor.T @ art.sketch.factor + problem.weight_decay * torch.eye(problem.dim, dtype=torch.float64)
    B = torch.randn(problem.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(art.sketch.solve(B, 1e-3), torch.linalg.solve(K + 1e-3 * torch.eye(problem.dim, dtype=torch.float64), B),
                               rtol=1e-9, atol=1e-12)
    few = fit_curvature(problem, lam, train, dataclasses.replace(base, fisher_samples=1), method="fisher", probes=1)
    G = few.sketch.factor  # 12 rows < p: the Woodbury side
    assert G.shape[0] < problem.dim
    K1 = G.T @ G + (problem.weight_decay + 1e-3) * torch.eye(problem.dim, dtype=torch.float64)
    torch.testing.assert_close(few.sketch.solve(B, 1e-3), torch.linalg.solve(K1, B), rtol=1e-8, atol=1e-11)
    art.save(tmp_path / "fi")
    again = CurvatureArtifact.load(tmp_path / "fi")
    assert again.method == "fisher" and torch.equal(again.sketch.factor, art.sketch.factor)
    cg = task_influence(problem, lam, train, val, base)
    pcg = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "fi")))
    torch.testing.assert_close(pcg.scores, cg.scores, rtol=1e-7, atol=1e-14)
    assert pcg.diagnostics["solver"]["preconditioner"] == "fisher"
    assert pcg.diagnostics["solver"]["iterations"] < cg.diagnostics["solver"]["iterations"], (pcg.diagnostics["solver"]["iterations"], cg.diagnostics["solver"]["iterations"])


@pytest.mark.parametrize("solver", ["cg", "pcg"])
def test_float32_products_with_refinement_reach_a_float64_tolerance(solver, tmp_path):
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, solve=SolverSettings(tol=1e-9, max_iter=2000))
    if solver == "pcg":
        fit_curvature(problem, lam, train, base, method="fisher", probes=1).save(tmp_path / "fi")
        base = dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "fi"))
    ref = task_influence(problem, lam, train, val, base)
    mixed = task_influence(problem, lam, train, val, dataclasses.replace(base, products="float32"))
    solve = mixed.diagnostics["solver"]
    # the recorded residual is the float64 one, and refinement drove it below the float64 tolerance
    assert solve["residual"] <= 1e-9 and solve["converged"] and solve["refinement"]["rounds"] >= 1
    torch.testing.assert_close(mixed.scores, ref.scores, rtol=1e-7, atol=1e-12 * float(ref.scores.abs().max()))


def test_fast_tier_checks_with_float32_products_stay_in_float32_and_say_so(tmp_path):
    """The fast tier's sampled residual checks only report, so with float32 products they stay in float32
    (no float64 re-measure, half their cost): accurate far above float32 rounding, at its floor below."""
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, products="float32")
    op = TotalHessian(problem, lam, train, "gauss-newton")
    g, _ = measurement_gradient(problem, lam, val)

    def true_residual(s):
        return float((op.matvec(s) + 1e-3 * s - g).norm() / g.norm())

    fit_curvature(problem, lam, train, base, rank=4, probes=1).save(tmp_path / "low")
    with pytest.warns(Warning):
        low = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "low")))
    solve = low.diagnostics["solver"]
    assert solve["residual"] > 1e-3 and "float32" in solve["residuals_measured_in"]
    assert solve["residual"] == pytest.approx(true_residual(low.extra["s"]), rel=1e-3)
    # a sketch of full rank inverts H: its float32-measured residual sits at float32's rounding floor
    fit_curvature(problem, lam, train, base, rank=problem.dim, probes=1).save(tmp_path / "full")
    full = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "full")))
    solve = full.diagnostics["solver"]
    assert "float32" in solve["residuals_measured_in"] and true_residual(full.extra["s"]) < 1e-5
    assert solve["residual"] < 1e-4  # at the rounding floor of float32 products


def test_a_pcg_float32_solve_continued_from_an_early_iterate_reaches_the_answer_of_one_solve(tmp_path):
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, solve=SolverSettings(tol=1e-9, max_iter=2000))
    fit_curvature(problem, lam, train, base, method="fisher", probes=1).save(tmp_path / "fi")
    pcg = dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "fi"), products="float32")
    ref = task_influence(problem, lam, train, val, base)
    with pytest.warns(Warning, match="--resume"):
        early = task_influence(problem, lam, train, val, dataclasses.replace(pcg, solve=dataclasses.replace(pcg.solve, max_iter=1)))
    assert not early.diagnostics["solver"]["converged"]
    resumed = task_influence(problem, lam, train, val, pcg, s0=early.extra["s"])
    solve = resumed.diagnostics["solver"]
    assert solve["residual"] <= 1e-9 and 0 < solve["warm_start"]["residual_before"] < 1
    torch.testing.assert_close(resumed.scores, ref.scores, rtol=1e-7, atol=1e-12 * float(ref.scores.abs().max()))
    with pytest.raises(SettingsError, match="cg or pcg"):
        task_influence(problem, lam, train, val, dataclasses.replace(pcg, solver="curvature"), s0=early.extra["s"])


def test_gn_factor_is_the_gauss_newton_matrix_so_its_fast_tier_is_the_exact_answer(tmp_path):
    """One row per query example and class, weighted by √p: GᵀG + μI equals the materialised total
    Gauss–Newton matrix, the fast tier then gives cg's scores and pcg needs one or two iterations."""
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, solve=SolverSettings(tol=1e-10, max_iter=2000))
    art = fit_curvature(problem, lam, train, base, method="gn-factor", probes=2)
    H = materialize(TotalHessian(problem, lam, train, "gauss-newton"))
    K = art.sketch.factor.T @ art.sketch.factor + problem.weight_decay * torch.eye(problem.dim, dtype=torch.float64)
    torch.testing.assert_close(K, H, rtol=1e-9, atol=1e-12 * float(H.abs().max()))
    assert max(art.info["probe_operator_rel_error"]) < 1e-9
    art.save(tmp_path / "gn")
    assert CurvatureArtifact.load(tmp_path / "gn").method == "gn-factor"
    cg = task_influence(problem, lam, train, val, base)
    fast = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "gn")))
    torch.testing.assert_close(fast.scores, cg.scores, rtol=1e-7, atol=1e-12 * float(cg.scores.abs().max()))
    pcg = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "gn")))
    assert pcg.diagnostics["solver"]["iterations"] <= 2
    with pytest.raises(SettingsError, match="Gauss–Newton"):
        fit_curvature(problem, lam, train, dataclasses.replace(base, hessian="exact"), method="gn-factor")


def test_newton_step_scores_downdate_the_gn_factor_exactly_instead_of_one_solve_per_task(tmp_path):
    """With the gn-factor of λ* the Newton-step removal (H − H_k/n + δI)⁻¹g_k/n is a rank-M downdate of
    the Gauss–Newton matrix's own rows: the scores equal one CG solve per task and a dense solve with
    task k's Gauss–Newton Hessian subtracted; a factor of another pool is not used."""
    problem, lam, train, val = curvature_problem()
    n, delta = len(train), 1e-2
    base = InfluenceSettings(hessian="gauss-newton", damping=delta, removal="newton", stationarity_warn=1e9,
                             solve=SolverSettings(tol=1e-12, max_iter=4000))
    fit_curvature(problem, lam, train, base, method="gn-factor", probes=1).save(tmp_path / "gn")
    down = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "gn")))
    cg = task_influence(problem, lam, train, val, base)
    assert down.diagnostics["newton_step"]["downdate"].startswith("gn-factor")
    assert cg.diagnostics["newton_step"]["downdate"] == "one solve per task"
    torch.testing.assert_close(down.scores, cg.scores, rtol=1e-7, atol=1e-10 * float(cg.scores.abs().max()))
    # against the dense closed form, and away from the first-order scores (the downdate does something)
    H = materialize(TotalHessian(problem, lam, train, "gauss-newton"))
    G = problem.total_gradients(lam, train)
    grad_f, _ = measurement_gradient(problem, lam, val)
    eye = torch.eye(problem.dim, dtype=torch.float64)
    for k in (0, n - 1):
        H_k = materialize(TotalHessian(problem, lam, train.subset([k]), "gauss-newton")) - problem.weight_decay * eye
        dense = grad_f @ torch.linalg.solve(H - H_k / n + delta * eye, G[k] / n)
        assert float(down.scores[k]) == pytest.approx(float(dense), rel=1e-8)
    assert not torch.allclose(down.scores, down.extra["first_order_scores"], rtol=1e-4)
    # the factor serves only the operator it was fitted to: not the same pool with a task weighted out
    from metainfluence.influence.newton_step import _gauss_newton_factor

    with_file = dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "gn"))
    w = torch.ones(n, dtype=torch.float64)
    w[0] = 0
    assert _gauss_newton_factor(TotalHessian(problem, lam, train, "gauss-newton"), with_file) is not None
    assert _gauss_newton_factor(TotalHessian(problem, lam, train, "gauss-newton", w=w), with_file) is None


def test_a_curvature_file_is_loaded_once_per_process_while_unchanged(tmp_path):
    from metainfluence.influence.curvature import load_curvature

    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9)
    fit_curvature(problem, lam, train, base, method="fisher", probes=1).save(tmp_path / "fi")
    first = load_curvature(tmp_path / "fi")
    first.sketch.solve(torch.ones(problem.dim, dtype=torch.float64), 1e-3)  # builds the Cholesky for δ = 1e-3
    again = load_curvature(tmp_path / "fi")
    assert again is first and 1e-3 + problem.weight_decay in again.sketch._chol
    # a refitted file (other contents) is read afresh
    fit_curvature(problem, lam, train, dataclasses.replace(base, fisher_samples=2), method="fisher", probes=1).save(tmp_path / "fi")
    fresh = load_curvature(tmp_path / "fi")
    assert fresh is not first and 2 * fresh.sketch.factor.shape[0] == first.sketch.factor.shape[0]


def test_float32_products_too_inexact_to_refine_against_finish_in_working_precision():
    """Where the float32 operator is far from the working-precision one (seen on a confident MNIST
    Conv4: probe error 0.04, the float32 solve's float64 residual 3.8e3), refinement stops contracting;
    the solve then finishes with working-precision products and still meets the tolerance."""
    from metainfluence.influence.task_if import build_hessian, ihvp

    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, products="float32",
                             solve=SolverSettings(tol=1e-9, max_iter=2000))
    op = build_hessian(problem, lam, train, base)
    P = 0.3 * torch.randn(problem.dim, problem.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    P = P @ P.T / problem.dim  # a PSD error far above float32 rounding: the "float32" operator is another matrix
    true_matvec, true_matmat = op.matvec, op.matmat
    op.matvec = lambda v: true_matvec(v) + P @ v
    op.matmat = lambda V: true_matmat(V) + P @ V
    g, _ = measurement_gradient(problem, lam, val)
    res = ihvp(op, g, base)
    H = materialize(TotalHessian(problem, lam, train, "gauss-newton")) + 1e-3 * torch.eye(problem.dim, dtype=torch.float64)
    exact = torch.linalg.solve(H, g)
    assert res.residual <= 1e-9 and res.info["converged"]
    assert "finished_in_working_precision" in res.info["refinement"]
    torch.testing.assert_close(res.x, exact, rtol=1e-7, atol=1e-9 * float(exact.abs().max()))


def test_an_edit_preconditioned_by_a_curvature_file_takes_newton_steps_away_from_its_lambda(tmp_path):
    """The file belongs to λ*: the closed form is preconditioned by it, the Newton steps (at other λ)
    solve with plain CG, so edit + Newton under pcg equals the same edit under cg."""
    from metainfluence import Removal, edit_model

    problem, lam, train, _ = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12, max_iter=2000))
    fit_curvature(problem, lam, train, base, method="gn-factor", probes=2).save(tmp_path / "gn")
    removal = Removal(tasks=[0, 3])
    with_file = edit_model(problem, lam, train, removal, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "gn")), newton_steps=2)
    plain = edit_model(problem, lam, train, removal, base, newton_steps=2)
    torch.testing.assert_close(with_file.lam, plain.lam, rtol=1e-7, atol=1e-9)
    assert with_file.diagnostics["newton_solver"] == "cg" and with_file.diagnostics["solver_iterations"] < plain.diagnostics["solver_iterations"]
    assert with_file.diagnostics["newton_final_grad_norm"] < with_file.diagnostics["newton"][0]["grad_norm_before"]


def test_a_reduced_edit_under_the_fast_tier_solves_its_own_hessian_exactly_preconditioned_by_the_file(tmp_path):
    """The fast tier's inverse is the full pool's; the reduced step needs H_R, so it is solved by pcg with the
    same file (it used to be refused mid-experiment): the edit equals the plain-CG edit, and the full step
    stays the fast tier's (the file's inverse applied to b_R/n)."""
    from metainfluence import Removal, edit_model
    from metainfluence.influence.editing import removed_gradient

    problem, lam, train, _ = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, fisher_samples=2, stationarity_warn=1e9, solve=SolverSettings(tol=1e-12, max_iter=2000))
    art = fit_curvature(problem, lam, train, base, method="fisher", probes=1)
    art.save(tmp_path / "fi")
    fast = dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "fi"))
    removal = Removal(tasks=[1, 4])
    reduced = edit_model(problem, lam, train, removal, fast, step="reduced")
    plain = edit_model(problem, lam, train, removal, base, step="reduced")
    torch.testing.assert_close(reduced.lam, plain.lam, rtol=1e-7, atol=1e-9)
    assert reduced.diagnostics["reduced_solver"] == "pcg"
    full = edit_model(problem, lam, train, removal, fast, step="full")
    b = removed_gradient(problem, lam, train, removal) / len(train)
    torch.testing.assert_close(full.delta, art.sketch.solve(b[:, None], 1e-3)[:, 0], rtol=1e-8, atol=1e-12)


def test_a_fisher_file_of_the_fisher_operator_lends_it_its_rows_instead_of_drawing_them_again(tmp_path, monkeypatch):
    """hessian = fisher with its own fisher file: the file's rows are the operator's (same λ, pool, draws, seed), so
    scoring draws no rows (the residual check uses the file's); the scores equal Woodbury's on freshly drawn rows;
    a file of other draws is refused, not adopted."""
    import metainfluence.meta.curvature as meta_curvature

    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="fisher", solver="woodbury", damping=1e-3, fisher_samples=2, stationarity_warn=1e9)
    art = fit_curvature(problem, lam, train, base, method="fisher", probes=2)
    assert art.info["operator_rows"] and max(art.info["probe_operator_rel_error"]) == 0.0
    art.save(tmp_path / "fi")
    exact = task_influence(problem, lam, train, val, base)
    drawn = []
    real = meta_curvature.fisher_factor
    monkeypatch.setattr(meta_curvature, "fisher_factor", lambda *a, **k: drawn.append(1) or real(*a, **k))
    fast = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "fi")))
    assert drawn == []
    torch.testing.assert_close(fast.scores, exact.scores, rtol=1e-9, atol=1e-14)
    assert fast.diagnostics["solver"]["residual"] < 1e-10
    # the same λ and pool with other draws: the remedy is the file's draws, not a refit
    with pytest.raises(CheckpointError, match=r"holds 2 fisher draw\(s\) per task with seed 0, not 3 with seed 0: pass --fisher-samples 2 --seed 0"):
        task_influence(problem, lam, train, val, dataclasses.replace(base, fisher_samples=3, solver="curvature", curvature_file=str(tmp_path / "fi")))
    with pytest.raises(CheckpointError, match="fitted to another λ or task pool"):
        task_influence(problem, lam * 1.01, train, val, dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "fi")))


def test_an_experiments_self_influence_under_the_fisher_file_shares_the_scores_call_and_draws_no_rows(tmp_path, monkeypatch):
    """Detection's self-influence ranking (g_kᵀ H_F⁻¹ g_k / n) when the scores already use the fisher operator's own
    file: one call, no rows drawn, and the same values as the separate fisher + Woodbury call it replaces."""
    import metainfluence.meta.curvature as meta_curvature
    from metainfluence.experiments.common import _score_cached

    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="fisher", solver="woodbury", damping=1e-3, fisher_samples=2, stationarity_warn=1e9)
    fit_curvature(problem, lam, train, base, method="fisher", probes=1).save(tmp_path / "fi")
    separate = task_influence(problem, lam, train, val, dataclasses.replace(base, self_influence=True))
    drawn = []
    real = meta_curvature.fisher_factor
    monkeypatch.setattr(meta_curvature, "fisher_factor", lambda *a, **k: drawn.append(1) or real(*a, **k))
    fast = dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "fi"))
    res = _score_cached(problem, lam, train, val, "task-if", fast, lambda s: None, self_influence=True)
    assert drawn == []
    torch.testing.assert_close(res.self_influence, separate.self_influence, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(res.scores, separate.scores, rtol=1e-9, atol=1e-14)
    assert res.diagnostics["self_influence"]["solver"] == "curvature" and res.settings["influence"]["self_influence"] is False


def test_the_exact_tier_method_solves_the_true_total_hessian_whatever_curvature_the_run_scores_with(tmp_path):
    """An experiment's `task-if-exact` ranking: CG on products of the exact total Hessian (here indefinite down to −0.15,
    so the damping 0.25 keeps it positive definite), preconditioned by the fisher curvature file the run's own
    task-IF scores use; equal to the dense exact answer and unlike the fisher scores."""
    from metainfluence.experiments.common import _method_settings, _score_cached

    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="fisher", solver="curvature", damping=0.25, fisher_samples=2, stationarity_warn=1e9,
                             curvature_file=str(tmp_path / "fi"))
    fit_curvature(problem, lam, train, base, method="fisher", probes=1).save(tmp_path / "fi")
    s = _method_settings(base, "task-if-exact", direct_damping=0.1)
    exact = _score_cached(problem, lam, train, val, "task-if-exact", s, lambda m: None)
    dense = task_influence(problem, lam, train, val, dataclasses.replace(base, hessian="exact", solver="explicit", curvature_file=""))
    assert exact.settings["influence"]["hessian"] == "exact" and exact.settings["influence"]["solver"] == "pcg"
    assert exact.diagnostics["curvature"]["method"] == "fisher"  # the run's file preconditions the exact solve
    assert _method_settings(dataclasses.replace(base, curvature_file=""), "task-if-exact", 0.1).solver == "cg"  # no file: plain CG
    assert exact.diagnostics["solver"]["converged"]
    torch.testing.assert_close(exact.scores, dense.scores, rtol=1e-5, atol=1e-10)
    fisher = _score_cached(problem, lam, train, val, "task-if", base, lambda m: None)
    assert (fisher.scores - exact.scores).abs().max() > 1e-3 * exact.scores.abs().max()


def test_a_curvature_file_of_another_lambda_is_refused_before_any_gradient_pass(tmp_path, monkeypatch):
    """The file is checked against the operator first: a wrong one costs no pass over the tasks (on Conv4 minutes)."""
    from metainfluence.influence import gradients, instance_if, task_if
    from metainfluence.influence.instance_if import instance_influence

    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9)
    fit_curvature(problem, lam, train, base, rank=8, probes=1).save(tmp_path / "curv")
    wrong = dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "curv"))

    def no_pass(*a, **k):
        raise AssertionError("a gradient pass ran before the curvature file was checked")

    for module in (gradients, task_if, instance_if):
        for name in ("charged_measurement_gradient", "measurement_gradient", "direct_measurement_gradient"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_pass)
    with pytest.raises(CheckpointError, match="another λ"):
        task_influence(problem, lam + 0.01, train, val, wrong)
    with pytest.raises(CheckpointError, match="another λ"):
        instance_influence(problem, lam + 0.01, train, val, "support", wrong)
