"""Total-Hessian products (docs/method.md §3): exact = finite differences; surrogates symmetric / PSD as stated."""

from __future__ import annotations

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.meta.curvature import TotalHessian
from metainfluence.linalg import materialize, woodbury_solve


def test_exact_hvp_equals_finite_differences_of_the_meta_gradient():
    problem, lam = small_problem("unrolled", steps=2, lr=0.3, chunk_size=3)
    tasks = random_tasks(n=5)
    op = TotalHessian(problem, lam, tasks, "exact")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        d = torch.randn(lam.numel(), generator=g, dtype=torch.float64)
        eps = 1e-5
        fd = (problem.meta_gradient(lam + eps * d, tasks) - problem.meta_gradient(lam - eps * d, tasks)) / (2 * eps)
        torch.testing.assert_close(op.matvec(d), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["exact", "gauss-newton", "gamma", "fisher", "direct"])
def test_operators_are_symmetric_and_psd_where_stated(kind):
    problem, lam = small_problem("unrolled", steps=1, lr=0.3, hidden=(5,))
    tasks = random_tasks(n=4)
    op = TotalHessian(problem, lam, tasks, kind, fisher_samples=3)
    H = materialize(op, symmetrize=False)
    torch.testing.assert_close(H, H.T, rtol=1e-9, atol=1e-11)
    eig = torch.linalg.eigvalsh((H + H.T) / 2)
    if kind in ("gauss-newton", "fisher"):
        # docs/method.md §3: positive semi-definite (plus μI)
        assert eig.min() >= problem.weight_decay - 1e-10
    if kind == "gamma":
        assert op.gamma > 0


def test_implicit_surrogates_are_symmetric():
    problem, lam = small_problem("implicit", steps=60, lr=0.5, proximal=1.0, hidden=(3,), implicit_cg_steps=40)
    tasks = random_tasks(n=3)
    for kind in ("gauss-newton", "gamma"):
        H = materialize(TotalHessian(problem, lam, tasks, kind), symmetrize=False)
        torch.testing.assert_close(H, H.T, rtol=1e-7, atol=1e-9)


def test_quadratic_problem_all_kinds_coincide():
    """1-step MAML on linear regression: F is quadratic, J is constant and the query loss is its own
    Gauss–Newton matrix, so exact = gauss-newton = gamma − ΓI."""
    problem, lam = small_problem("unrolled", steps=1, lr=0.1, hidden=(), n_classes=1, loss="mse")
    tasks = random_tasks(n=6, regression=True)
    ops = {k: TotalHessian(problem, lam, tasks, k) for k in ("exact", "gauss-newton", "gamma")}
    H = {k: materialize(o) for k, o in ops.items()}
    torch.testing.assert_close(H["exact"], H["gauss-newton"], rtol=1e-10, atol=1e-12)
    eye = torch.eye(lam.numel(), dtype=torch.float64)
    torch.testing.assert_close(H["exact"], H["gamma"] - ops["gamma"].gamma * eye, rtol=1e-10, atol=1e-12)


def test_exact_hessian_refuses_implicit_and_first_order():
    from metainfluence.errors import SettingsError

    problem, lam = small_problem("implicit", steps=5, lr=0.5, proximal=1.0)
    with pytest.raises(SettingsError, match="implicit"):
        TotalHessian(problem, lam, random_tasks(n=2), "exact")
    problem, lam = small_problem(first_order=True)
    with pytest.raises(SettingsError, match="first"):
        TotalHessian(problem, lam, random_tasks(n=2), "exact")


def test_fisher_woodbury_equals_dense_solve():
    problem, lam = small_problem("unrolled", steps=1, hidden=(5,))
    tasks = random_tasks(n=4)
    op = TotalHessian(problem, lam, tasks, "fisher", fisher_samples=2)
    H = materialize(op)
    b = torch.randn(lam.numel(), dtype=torch.float64)
    x = woodbury_solve(op, b, 1e-2).x
    ref = torch.linalg.solve(H + 1e-2 * torch.eye(lam.numel(), dtype=torch.float64), b)
    torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-10)


def _gn_and_fisher(samples, **weights):
    problem, lam = small_problem(steps=1, lr=0.3, hidden=(5,), weight_decay=1e-3)
    tasks = random_tasks(n=5, n_support=4, n_query=8, seed=11)
    gn = materialize(TotalHessian(problem, lam, tasks, "gauss-newton", **weights))
    fisher = materialize(TotalHessian(problem, lam, tasks, "fisher", fisher_samples=samples, seed=1, **weights))
    return gn, fisher


def _scale_and_direction(a, b):
    return float(a.norm() / b.norm()), float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_fisher_with_many_samples_matches_gauss_newton_in_scale_and_direction():
    # E[ĝ ĝᵀ] of the mean query loss is the Gauss–Newton term / |Q|: without the √|Q| rows were |Q| = 8× too small
    gn, fisher = _gn_and_fisher(400)
    ratio, cosine = _scale_and_direction(fisher, gn)
    assert abs(ratio - 1) < 0.1 and cosine > 0.95


def test_fisher_of_a_reduced_pool_is_rebuilt_from_its_weights():
    # task 1 removed, two support and one query example of task 3 removed: the rows change, not only drop out
    w = torch.ones(5, dtype=torch.float64)
    w[1] = 0
    v = torch.ones(5, 4, dtype=torch.float64)
    v[3, :2] = 0
    u = torch.ones(5, 8, dtype=torch.float64)
    u[3, 0] = 0
    gn, fisher = _gn_and_fisher(400, w=w, v=v, u=u)
    ratio, cosine = _scale_and_direction(fisher, gn)
    assert abs(ratio - 1) < 0.1 and cosine > 0.95


def test_block_products_are_chunked_over_directions_without_changing_them():
    problem, lam = small_problem(steps=1, hidden=(5,))
    tasks = random_tasks(n=5)
    V = torch.randn(lam.numel(), 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = TotalHessian(problem, lam, tasks, "gauss-newton", column_chunk=0).matmat(V)
    chunked = TotalHessian(problem, lam, tasks, "gauss-newton", column_chunk=4).matmat(V)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_a_block_of_directions_takes_its_share_of_a_task_chunk():
    """k vmapped directions hold k graphs: the tasks per chunk are divided by k (bounded memory), the problem's own
    chunk size is restored after, and the products equal single ones."""
    problem, lam = small_problem(steps=1, hidden=(5,), chunk_size=8)
    tasks = random_tasks(n=9)
    seen = []
    chunks = problem.chunks
    problem.chunks = lambda n, *a: seen.extend(c.stop - c.start for c in chunks(n, *a)) or chunks(n, *a)
    op = TotalHessian(problem, lam, tasks, "gauss-newton", column_chunk=4)  # its pass for the adapted θ_i: chunks of 8
    V = torch.randn(lam.numel(), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen.clear()
    block = op.matmat(V)
    assert max(seen) == 2 and problem.chunk_size == 8  # 8 tasks // 4 directions, for both blocks of directions (4 and 2)
    seen.clear()
    single = torch.stack([op.matvec(V[:, j]) for j in range(6)], 1)
    assert max(seen) == 8
    torch.testing.assert_close(block, single, rtol=1e-12, atol=1e-14)


def test_native_layer_norm_is_warned_and_plain_layer_norm_has_exact_hessians():
    """torch's native layer norm is differentiated wrongly beyond second order: warned, with PlainLayerNorm as the
    remedy — the same function and parameters, whose exact total-Hessian products match central differences; the
    gauss-newton products (second derivatives only) agree between the two, as the warning says."""
    import warnings

    from torch import nn

    from metainfluence import InnerSettings, MetaProblem
    from metainfluence.meta.models import PlainLayerNorm

    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), PlainLayerNorm(8), nn.Linear(8, 3)).double()
    plain.load_state_dict(native.state_dict())  # the same parameter names
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(plain[2](x), native[2](x), rtol=1e-12, atol=1e-12)
    inner = InnerSettings(steps=1, lr=0.5)
    with pytest.warns(UserWarning, match="PlainLayerNorm"):
        pn = MetaProblem(native, "cross_entropy", inner, weight_decay=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain one is not warned
        pp = MetaProblem(plain, "cross_entropy", inner, weight_decay=0.2)
    tasks = random_tasks(n=6)
    lam = pp.init_params(torch.float64) + 0.3 * torch.randn(pp.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = torch.randn(pp.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-5
    fd = (pp.meta_gradient(lam + eps * d, tasks) - pp.meta_gradient(lam - eps * d, tasks)) / (2 * eps)
    assert float((TotalHessian(pp, lam, tasks, "exact").matvec(d) - fd).norm() / fd.norm()) < 1e-6
    torch.testing.assert_close(TotalHessian(pn, lam, tasks, "gauss-newton").matvec(d), TotalHessian(pp, lam, tasks, "gauss-newton").matvec(d),
                               rtol=1e-9, atol=1e-12)
