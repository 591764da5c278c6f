"""A factor's inverse (GᵀG + cI)⁻¹ solves by CG while CG costs less than the Gram matrix, then by Cholesky: both
ways give the dense solution, and the switch happens where the budget says."""

import pytest
import torch

from metainfluence.linalg.woodbury import FactorCurvature, times


def _factor(rows: int, dim: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, dim, generator=g, dtype=torch.float64) / dim ** 0.5


def _dense(G: torch.Tensor, c: float, B: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(G.T @ G + c * torch.eye(G.shape[1], dtype=G.dtype), B)


@pytest.mark.parametrize("rows, dim", [(300, 900), (900, 300)])  # r < p (Woodbury) and r > p
def test_a_well_conditioned_factor_solves_by_cg_to_the_dense_solution(rows, dim):
    G = _factor(rows, dim)
    inverse = FactorCurvature(G, shift=0.5)
    b = torch.randn(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = inverse.solve(b, 0.5)
    assert inverse.last_solve["via"] == "cg" and inverse._gram is None and not inverse._chol
    torch.testing.assert_close(x, _dense(G, 1.0, b), rtol=1e-10, atol=1e-12)


def test_the_gram_matrix_is_formed_once_cg_has_spent_its_cost():
    G = _factor(240, 600)
    inverse = FactorCurvature(G)
    g = torch.Generator().manual_seed(2)
    ways = []
    for _ in range(12):
        B = torch.randn(600, 3, generator=g, dtype=torch.float64)
        X = inverse.solve(B, 5.0)
        ways.append(inverse.last_solve["via"])
        torch.testing.assert_close(X, _dense(G, 5.0, B), rtol=1e-10, atol=1e-12)
    # the Gram matrix costs min(r, p)/2 = 120 units of r·p; each iteration on 3 columns costs 6: CG first, Cholesky after
    assert ways[0] == "cg" and ways[-1] == "cholesky" and ways == sorted(ways, key=lambda w: w == "cholesky")
    assert inverse._cg_work <= 120 and inverse._gram is not None


def test_cg_that_cannot_converge_within_its_budget_falls_back_to_the_exact_inverse():
    # an ill-conditioned factor at tiny damping: κ ≈ 1e8 needs far more iterations than min(r, p)/4
    G = _factor(100, 400, scale=1e4)
    inverse = FactorCurvature(G)
    b = torch.randn(400, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = inverse.solve(b, 1e-1)
    assert inverse.last_solve == {"via": "cholesky"} and inverse._cg_work > 0  # CG tried first, then gave way
    direct = FactorCurvature(G)
    direct._cg_work = float("inf")  # no CG at all: the Cholesky path alone
    assert torch.equal(x, direct.solve(b, 1e-1))
    assert (G.T @ (G @ x) + 1e-1 * x - b).norm() / b.norm() < 1e-5


@pytest.mark.parametrize("width", [None, 1, 4])
def test_factor_times_columns_equals_the_plain_product(width):
    G = _factor(9, 31)
    g = torch.Generator().manual_seed(4)
    P = torch.randn(31, generator=g, dtype=torch.float64) if width is None else torch.randn(31, width, generator=g, dtype=torch.float64)
    torch.testing.assert_close(times(G, P), G @ P, rtol=1e-13, atol=1e-13)


def test_woodbury_solves_keep_one_inverse_on_their_operator_and_say_how_they_solved():
    from metainfluence.linalg import FactorOperator, woodbury_solve

    G = _factor(300, 900)
    op = FactorOperator(G, shift=0.5)
    b = torch.randn(900, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    first = woodbury_solve(op, b, 0.5)
    inverse = op._factor_inverse
    second = woodbury_solve(op, 2 * b, 0.5)
    assert op._factor_inverse is inverse and inverse._cg_work > 0  # the second solve drew on the same budget
    assert first.info["via"] == "cg" and first.info["cg_iterations"] >= 1 and first.residual < 1e-10
    torch.testing.assert_close(first.x, _dense(G, 1.0, b), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second.x, 2 * first.x, rtol=1e-9, atol=1e-12)


def test_as_a_preconditioner_a_factor_solves_by_its_cholesky_factor_only():
    # an outer CG needs one fixed linear map for its preconditioner: no inner CG stopped at a tolerance
    from metainfluence.linalg import FactorOperator, pcg_solve

    G = _factor(300, 900)
    op = FactorOperator(G + 0.1 * _factor(300, 900, seed=7), shift=0.5)  # the H solved, near the factor's K
    sketch = FactorCurvature(G, shift=0.5)
    b = torch.randn(900, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    res = pcg_solve(op, b, 0.5, sketch=sketch)
    assert sketch._cg_work == float("inf") and sketch._gram is not None and sketch.last_solve == {"via": "cholesky"}
    assert res.info["converged"] and res.residual < 1e-6
    torch.testing.assert_close(res.x, torch.linalg.solve(op.factor.T @ op.factor + torch.eye(900, dtype=torch.float64), b), rtol=1e-4, atol=1e-5)
