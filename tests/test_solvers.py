"""iHVP solvers (docs/method.md §4), in float64 against dense linear algebra."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from metainfluence.errors import CheckpointError, DivergenceError, SettingsError
from metainfluence.linalg import (
    SOLVERS,
    FunctionOperator,
    LowRank,
    MatrixOperator,
    SolverSettings,
    explicit_solve,
    lanczos_eigenpairs,
    lissa_solve,
    lowrank_solve,
    materialize,
    neumann_solve,
    power_iteration,
    solve_ihvp,
)

F64 = torch.float64
P = 50


def sym_with_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=F64))
    A = Q @ torch.diag(eigenvalues) @ Q.T
    return 0.5 * (A + A.T)


def spd(p: int = P, cond: float = 1e3, seed: int = 0) -> torch.Tensor:
    """Random SPD matrix with eigenvalues log-spaced in [1, cond] (condition number = cond)."""
    return sym_with_spectrum(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p, dtype=F64), seed)


def rhs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def true_residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor, damping: float) -> float:
    return ((A @ x + damping * x - b).norm() / b.norm()).item()


# Settings under which each solver must reach 1e-6 relative accuracy at condition number ~1e3.
PRECISE = {
    "explicit": SolverSettings(),
    "cg": SolverSettings(tol=1e-12),
    # the change criterion leaves an error ≈ κ·tol, hence the tight tol
    "neumann": SolverSettings(tol=1e-11, neumann_depth=60_000),
    "lissa": SolverSettings(tol=1e-11, neumann_depth=60_000),
    "lowrank": SolverSettings(lowrank_rank=P, lanczos_iters=P),
}


@pytest.fixture(scope="module")
def problem():
    A = spd()
    b = rhs(P)
    damping = 0.5
    x_ref = torch.linalg.solve(A + damping * torch.eye(P, dtype=F64), b)
    # per-task parts whose mean is A, so that lissa can run on the same H
    parts = torch.stack([spd(cond=1e3, seed=10 + i) for i in range(3)])
    parts = parts - parts.mean(0) + A
    return A, b, damping, x_ref, parts


def op_for(solver: str, A: torch.Tensor, parts: torch.Tensor) -> MatrixOperator:
    return MatrixOperator(None, parts) if solver == "lissa" else MatrixOperator(A)


def test_explicit_equals_linalg_solve_and_reports_spectrum(problem):
    A, b, damping, x_ref, _ = problem
    res = explicit_solve(MatrixOperator(A), b, damping)
    assert rel(res.x, x_ref) < 1e-12
    evals = torch.linalg.eigvalsh(A)
    assert res.info["lambda_min"] == pytest.approx(evals[0].item(), rel=1e-10)
    assert res.info["lambda_max"] == pytest.approx(evals[-1].item(), rel=1e-10)
    assert res.info["condition_number"] == pytest.approx((evals[-1] + damping).item() / (evals[0] + damping).item(), rel=1e-10)


@pytest.mark.parametrize("solver", ["cg", "neumann", "lissa", "lowrank"])
def test_every_solver_agrees_with_explicit(problem, solver):
    A, b, damping, x_ref, parts = problem
    op = op_for(solver, A, parts)
    explicit = solve_ihvp(op, b, solver="explicit", damping=damping)
    res = solve_ihvp(op, b, solver=solver, damping=damping, settings=PRECISE[solver])
    assert res.solver == solver and res.x.shape == b.shape
    assert res.info["converged"]
    assert rel(res.x, explicit.x) < 1e-6
    assert rel(res.x, x_ref) < 1e-6


@pytest.mark.parametrize(
    "solver, settings",
    [
        ("cg", SolverSettings(max_iter=5)),  # stopped early: an O(1e-1) residual, not an error
        ("neumann", SolverSettings(neumann_depth=20)),
        ("lowrank", SolverSettings(lowrank_rank=5)),  # a spread-out spectrum is not low-rank
        ("explicit", SolverSettings()),
    ],
)
def test_residual_is_the_true_one(problem, solver, settings):
    A, b, damping, _, _ = problem
    res = solve_ihvp(MatrixOperator(A), b, solver=solver, damping=damping, settings=settings)
    independent = true_residual(A, res.x, b, damping)
    if solver == "explicit":
        assert res.residual < 1e-12 and independent < 1e-12
    else:
        assert res.residual > 1e-3  # large enough that the comparison is not rounding noise
        assert res.residual == pytest.approx(independent, rel=1e-10)
    if solver == "cg":
        assert res.iterations == 5 and res.info["converged"] is False
    if solver == "neumann":
        assert res.iterations == 20 and res.info["converged"] is False


def test_neumann_scale_from_power_iteration_bounds_lambda_max():
    # two close top eigenvalues make power iteration converge slowly
    evals = torch.cat([torch.linspace(1, 90, P - 2, dtype=F64), torch.tensor([99.0, 100.0], dtype=F64)])
    A = sym_with_spectrum(evals, seed=3)
    damping = 0.25
    res = neumann_solve(MatrixOperator(A), rhs(P), damping, SolverSettings(neumann_depth=5))
    lam_max = 100.0 + damping
    assert res.info["scale_from"] == "power_iteration"
    assert res.info["power_estimate"] <= lam_max * (1 + 1e-12)  # power iteration never overshoots
    assert res.info["scale"] >= lam_max
    assert res.info["scale"] <= 1.05 * lam_max * (1 + 1e-12)
    assert power_iteration(MatrixOperator(A), damping, iters=50) == pytest.approx(res.info["power_estimate"], rel=0)


def test_neumann_stops_on_change_and_reports_depth(problem):
    A, b, damping, x_ref, _ = problem
    loose = neumann_solve(MatrixOperator(A), b, damping, SolverSettings(tol=1e-4, neumann_depth=60_000))
    tight = neumann_solve(MatrixOperator(A), b, damping, SolverSettings(tol=1e-8, neumann_depth=60_000))
    assert loose.info["converged"] and tight.info["converged"]
    assert 0 < loose.iterations < tight.iterations < 60_000
    assert rel(tight.x, x_ref) < rel(loose.x, x_ref)


INDEFINITE = torch.cat([torch.tensor([-1.0], dtype=F64), torch.linspace(0.5, 10, P - 1, dtype=F64)])


@pytest.mark.parametrize("solver", ["explicit", "cg", "neumann"])
def test_indefinite_needs_damping_above_minus_lambda_min(solver):
    A = sym_with_spectrum(INDEFINITE, seed=5)
    b = rhs(P)
    op = MatrixOperator(A)
    settings = SolverSettings(tol=1e-12, neumann_depth=20_000)
    with pytest.raises(DivergenceError) as err:
        solve_ihvp(op, b, solver=solver, damping=0.5, settings=settings)
    message = str(err.value)
    assert "damping" in message and "\n" not in message
    res = solve_ihvp(op, b, solver=solver, damping=1.5, settings=settings)
    assert rel(res.x, torch.linalg.solve(A + 1.5 * torch.eye(P, dtype=F64), b)) < 1e-8


def test_neumann_detects_slow_divergence_before_overflow():
    # λ_min + δ = −0.05: the series grows only ~0.5% per step, far from NaN or overflow within J,
    # yet must not come back as a finite but meaningless answer
    A = sym_with_spectrum(INDEFINITE, seed=5)
    with pytest.raises(DivergenceError, match="consecutive"):
        neumann_solve(MatrixOperator(A), rhs(P), 0.95, SolverSettings(neumann_depth=2000))


def test_explicit_error_names_lambda_min():
    A = sym_with_spectrum(INDEFINITE, seed=5)
    with pytest.raises(DivergenceError, match=r"raise damping above 1(\.0*)?\b"):
        explicit_solve(MatrixOperator(A), rhs(P), 0.0)


def test_lowrank_indefinite_subspace_raises():
    A = sym_with_spectrum(INDEFINITE, seed=5)
    with pytest.raises(DivergenceError):
        lowrank_solve(MatrixOperator(A), rhs(P), 0.5, SolverSettings(lowrank_rank=P, lanczos_iters=P))


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_nan_hvp_raises_divergence(solver):
    op = FunctionOperator(lambda v: v * float("nan"), P)
    with pytest.raises(DivergenceError):
        solve_ihvp(op, rhs(P), solver=solver, damping=0.1, settings=SolverSettings(neumann_scale=2.0))


def test_lowrank_exact_on_rank_k_psd_for_rhs_in_range():
    k, damping = 5, 0.1
    g = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(P, k, generator=g, dtype=F64))
    d = torch.tensor([50.0, 20.0, 5.0, 2.0, 0.5], dtype=F64)
    A = U @ torch.diag(d) @ U.T
    op = MatrixOperator(A)
    b_in = U @ torch.randn(k, generator=g, dtype=F64)
    x_ref = torch.linalg.solve(A + damping * torch.eye(P, dtype=F64), b_in)
    res = lowrank_solve(op, b_in, damping, SolverSettings(lowrank_rank=k))
    assert rel(res.x, x_ref) < 1e-10
    assert res.residual < 1e-10
    # a component outside the range is dropped, and the residual says so exactly: (H+δI)x − b = −b_⊥
    b_out = torch.randn(P, generator=g, dtype=F64)
    b_out = b_out - U @ (U.T @ b_out)
    b = b_in + b_out
    res = lowrank_solve(op, b, damping, SolverSettings(lowrank_rank=k))
    assert res.residual == pytest.approx((b_out.norm() / b.norm()).item(), rel=1e-8)
    assert res.info["rhs_fraction_outside"][0] == pytest.approx(res.residual, rel=1e-8)


def test_lanczos_matches_eigh_top_k():
    A = sym_with_spectrum(torch.cat([torch.linspace(-3, 1, P - 10, dtype=F64), torch.linspace(10, 30, 10, dtype=F64)]), 11)
    top = torch.linalg.eigvalsh(A).flip(0)
    k = 10
    # default 2k + 10 steps suffice for a separated top-k
    low = lanczos_eigenpairs(MatrixOperator(A), k, seed=2)
    assert low.info["lanczos_iters"] == 2 * k + 10
    assert torch.allclose(low.eigenvalues, top[:k], rtol=0, atol=1e-8 * top[0].item())
    assert torch.allclose(low.eigenvectors.T @ low.eigenvectors, torch.eye(k, dtype=F64), atol=1e-12)
    assert (A @ low.eigenvectors - low.eigenvectors * low.eigenvalues).norm(dim=0).max() < 1e-6
    # a generic spectrum: with p steps Lanczos spans the space and is exact
    B = spd(cond=1e3, seed=12)
    full = lanczos_eigenpairs(MatrixOperator(B), k, iters=P, seed=2)
    top_b = torch.linalg.eigvalsh(B).flip(0)
    assert torch.allclose(full.eigenvalues, top_b[:k], rtol=0, atol=1e-8 * top_b[0].item())


def test_lanczos_restarts_on_invariant_subspace():
    # rank-3 matrix: the Krylov space of any start vector closes after 4 steps
    g = torch.Generator().manual_seed(8)
    U, _ = torch.linalg.qr(torch.randn(P, 3, generator=g, dtype=F64))
    A = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64)) @ U.T
    low = lanczos_eigenpairs(MatrixOperator(A), 5, iters=12)
    assert low.info["restarts"] >= 1
    assert torch.allclose(low.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=F64), atol=1e-12)
    assert torch.allclose(low.eigenvectors.T @ low.eigenvectors, torch.eye(5, dtype=F64), atol=1e-12)


def test_lowrank_save_load_round_trip_and_dim_check(tmp_path):
    low = lanczos_eigenpairs(MatrixOperator(spd(seed=4)), 6)
    low.save(tmp_path / "eig")
    back = LowRank.load(tmp_path / "eig", dim=P)
    assert torch.equal(back.eigenvalues, low.eigenvalues) and back.eigenvalues.dtype == F64
    assert torch.equal(back.eigenvectors, low.eigenvectors)
    assert back.info == low.info
    b = rhs(P)
    assert torch.equal(lowrank_solve(MatrixOperator(spd(seed=4)), b, 0.1, lowrank=back).x,
                       lowrank_solve(MatrixOperator(spd(seed=4)), b, 0.1, lowrank=low).x)
    with pytest.raises(CheckpointError, match="dimension"):
        LowRank.load(tmp_path / "eig", dim=P + 1)
    other = MatrixOperator(spd(p=P + 1))
    with pytest.raises(CheckpointError, match="dimension") as err:
        solve_ihvp(other, rhs(P + 1), solver="lowrank", damping=0.1, lowrank=back)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_batched_rhs_equals_per_column_solves(problem, solver):
    A, _, damping, _, parts = problem
    op = op_for(solver, A, parts)
    B = rhs(3, P, seed=9)
    settings = SolverSettings(tol=1e-8, neumann_depth=3000, lowrank_rank=10)
    low = lanczos_eigenpairs(op, 10) if solver == "lowrank" else None
    batched = solve_ihvp(op, B, solver=solver, damping=damping, settings=settings, lowrank=low)
    singles = [solve_ihvp(op, row, solver=solver, damping=damping, settings=settings, lowrank=low) for row in B]
    assert batched.x.shape == B.shape
    for i, single in enumerate(singles):
        assert torch.allclose(batched.x[i], single.x, rtol=1e-12, atol=0)
    assert batched.residual == pytest.approx(max(s.residual for s in singles), rel=1e-9)
    assert batched.iterations == max(s.iterations for s in singles)


def test_lissa_full_batch_is_exactly_neumann(problem):
    A, b, damping, _, parts = problem
    op = MatrixOperator(None, parts)
    settings = SolverSettings(tol=1e-9, neumann_depth=5000, lissa_batch=len(parts), lissa_repeats=4)
    lissa = lissa_solve(op, b, damping, settings)
    neumann = neumann_solve(op, b, damping, settings)
    assert torch.equal(lissa.x, neumann.x)
    assert lissa.iterations == neumann.iterations


def test_lissa_subsets_are_unbiased():
    # H = mean of 8 task matrices; the subset recursion averaged over many repeats approaches the solve
    parts = torch.stack([spd(p=20, cond=5.0, seed=30 + i) for i in range(8)])
    op = MatrixOperator(None, parts)
    b, damping = rhs(20), 0.5
    x_ref = torch.linalg.solve(op.A + damping * torch.eye(20, dtype=F64), b)
    settings = SolverSettings(neumann_depth=150, lissa_batch=4, lissa_repeats=80, seed=3)
    res = lissa_solve(op, b, damping, settings)
    one = lissa_solve(op, b, damping, dataclasses.replace(settings, lissa_repeats=1))
    assert rel(res.x, x_ref) < 0.02
    assert rel(res.x, x_ref) < rel(one.x, x_ref)  # averaging repeats reduces the subset noise
    assert res.iterations == 150 and res.info["lissa_batch"] == 4


def test_lissa_needs_task_subsets(problem):
    A, b, damping, _, _ = problem
    with pytest.raises(SettingsError, match="matvec_subset"):
        solve_ihvp(FunctionOperator(lambda v: A @ v, P), b, solver="lissa", damping=damping)
    with pytest.raises(SettingsError):
        solve_ihvp(MatrixOperator(A), b, solver="lissa", damping=damping)


def test_negative_damping_and_unknown_solver_raise_settings_error(problem):
    A, b, _, _, _ = problem
    op = MatrixOperator(A)
    for solver in SOLVERS:
        with pytest.raises(SettingsError, match="damping"):
            solve_ihvp(op, b, solver=solver, damping=-1e-3)
    with pytest.raises(SettingsError) as err:
        solve_ihvp(op, b, solver="newton", damping=0.1)
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in SOLVERS)


def test_settings_validate_and_document_every_field():
    with pytest.raises(SettingsError):
        SolverSettings(tol=0.0)
    with pytest.raises(SettingsError):
        SolverSettings(lowrank_rank=10, lanczos_iters=5)
    assert all(text.strip() for text in SolverSettings.help().values())
    assert set(SolverSettings.help()) == {f.name for f in dataclasses.fields(SolverSettings)}


def test_materialize_symmetrises_with_and_without_matmat():
    M = rhs(P, P, seed=13)  # not symmetric
    expected = 0.5 * (M + M.T)
    assert torch.equal(materialize(MatrixOperator(M), chunk_size=7), expected)
    assert torch.allclose(materialize(FunctionOperator(lambda v: M @ v, P)), expected, rtol=0, atol=1e-14)
    assert torch.equal(materialize(MatrixOperator(M), symmetrize=False), M)


def test_zero_rhs_gives_zero_solution(problem):
    A, _, damping, _, _ = problem
    for solver in ("cg", "neumann", "explicit"):
        res = solve_ihvp(MatrixOperator(A), torch.zeros(P, dtype=F64), solver=solver, damping=damping)
        assert torch.equal(res.x, torch.zeros(P, dtype=F64)) and res.residual == 0.0


def test_solves_run_with_tf32_off_and_restore_the_flags():
    """cuDNN convolutions use TF32 by default on NVIDIA GPUs (10-bit mantissa): the exact tier turns it
    off while it solves and puts the user's setting back."""
    import torch

    from metainfluence.influence.precision import full_float32

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with full_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_without_bars_a_long_cg_solve_still_prints_its_iteration_and_residual(problem, capsys):
    """--no-progress (bars off, heartbeat on): a solve that outlasts the heartbeat prints status lines with the
    residual CG reached; one that does not, or bars off without a heartbeat, prints nothing."""
    import time

    from metainfluence.linalg.cg import block_cg
    from metainfluence.progress import showing

    A, b, damping, _, _ = problem
    M = A + damping * torch.eye(P, dtype=F64)

    def slow(X):
        time.sleep(0.02)
        return M @ X

    with showing(False, heartbeat=0.1):
        block_cg(slow, b[:, None], tol=1e-10, max_iter=200)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("CG:")]
    assert len(lines) >= 2, lines
    assert all("\x1b" not in line and "residual=" in line and "eta=" in line for line in lines)
    assert "/200" not in "".join(lines)  # no ETA towards max_iter: CG stops at its tolerance
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    for quiet in (showing(False, heartbeat=30.0), showing(False)):
        with quiet:
            block_cg(slow, b[:, None], tol=1e-10, max_iter=5)
        assert capsys.readouterr().err == ""


def test_the_eta_follows_a_log_linear_trend_to_its_target_and_says_when_it_has_none():
    """RateEta (refine's ratio, CG's residual): value e^(-t/2) reaches e^(-10) at t = 20, so 15 s after t = 5;
    a flat or rising trend has no ETA ("?"), a reached target 0, a near-stalled one ">100 h"."""
    import math

    from metainfluence.progress import RateEta, clock

    falling = RateEta(window=5)
    for t in range(6):
        falling.add(float(t), math.exp(-t / 2))
    assert falling.eta(math.exp(-10)) == pytest.approx(15.0, rel=1e-12)
    assert falling.eta(math.exp(-1)) == 0.0
    assert clock(falling.eta(math.exp(-10))) == "0:00:15"
    flat = RateEta()
    for t in range(4):
        flat.add(float(t), 1e-3 * (1 + 0.1 * t))
    assert math.isnan(flat.eta(1e-6)) and clock(flat.eta(1e-6)) == "?"
    crawling = RateEta()
    for t in range(4):
        crawling.add(float(t), 1e-3 * math.exp(-1e-9 * t))
    assert clock(crawling.eta(1e-6)) == ">100 h"
    assert math.isnan(RateEta().eta(1e-6))  # one point or none: no trend yet


def test_cg_forecasts_a_slow_solve_after_its_first_iteration(monkeypatch):
    # the forecast compares 100 iterations' time with SLOW_SOLVE_S: at 0 any solve is "slow", so the rule shows without timing anything
    import warnings

    from metainfluence.linalg import cg as cg_module

    A = torch.diag(torch.linspace(1.0, 10.0, 20, dtype=torch.float64))
    B = torch.ones(20, 1, dtype=torch.float64)
    monkeypatch.setattr(cg_module, "SLOW_SOLVE_S", 0.0)
    with pytest.warns(UserWarning, match="CG: one iteration took .* so 100 iterations would take .*--max-minutes"):
        X, info = cg_module.block_cg(lambda P: A @ P, B, 1e-10, 500, slow_advice="bound it with --max-minutes")
    assert info["converged"] and torch.allclose(A @ X, B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bounded solve (a deadline) or one without advice says nothing
        cg_module.block_cg(lambda P: A @ P, B, 1e-10, 500, slow_advice="x", deadline=time.perf_counter() + 60)
        cg_module.block_cg(lambda P: A @ P, B, 1e-10, 500)


def test_cg_indefinite_error_bounds_the_damping_it_needs():
    # the Rayleigh quotient CG met is an upper bound on λ_min(H + δI): the damping it names is necessary, not sufficient
    A = sym_with_spectrum(INDEFINITE, seed=5)
    lam_min = float(torch.linalg.eigvalsh(A)[0])
    with pytest.raises(DivergenceError) as err:
        solve_ihvp(MatrixOperator(A), rhs(P), solver="cg", damping=0.5, settings=SolverSettings(tol=1e-12))
    import re
    need = float(re.search(r"damping must exceed ([-0-9.e+]+)", str(err.value)).group(1))
    assert 0.5 < need <= -lam_min + 1e-9 and "--hessian gauss-newton" in str(err.value)


def test_a_solve_leaving_most_of_its_residual_is_not_called_approximate():
    import warnings
    from types import SimpleNamespace

    from metainfluence.influence.results import InfluenceSettings, check_solve

    words = {}
    for residual in (0.05, 0.995, 2.7):
        diag: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_solve(diag, SimpleNamespace(info={"converged": False}, residual=residual, iterations=1, solver="curvature"), InfluenceSettings())
        words[residual] = diag["warnings"][0]
    assert "approximate" in words[0.05] and "hardly meaningful (the residual is 0.99" in words[0.995] and "not meaningful" in words[2.7]
    assert "1 iteration," in words[0.05]
