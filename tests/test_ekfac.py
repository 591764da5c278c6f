"""EK-FAC: exact factors where K-FAC is exact, the eigenvalue correction, the flat order of
meta/params.py, its damped inverse, the saved curvature kind (pcg preconditioner, fast tier, refusal)
and the single-level EK-FAC IF baseline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.func import grad, vmap

from helpers import curvature_problem, random_tasks, small_problem
from metainfluence.errors import CheckpointError
from metainfluence.influence.curvature import CurvatureArtifact, fit_curvature
from metainfluence.influence.gradients import direct_gradients, direct_measurement_gradient
from metainfluence.influence.results import InfluenceSettings, InfluenceWarning
from metainfluence.influence.task_if import task_influence
from metainfluence.linalg import EKFAC, SolverSettings, materialize
from metainfluence.meta.ekfac import fit_ekfac, fit_ekfac_on
from metainfluence.meta.models import Conv4
from metainfluence.meta.objective import InnerSettings, MetaProblem


def _per_example_grads(problem, theta, x, y):
    one = lambda th, xj, yj: problem.loss_fn(problem.forward(th, xj[None]), yj[None]).sum()
    return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)


def _block_mask(op: EKFAC) -> torch.Tensor:
    mask = torch.zeros(op.dim, op.dim, dtype=torch.bool)
    for b in op.blocks:
        mask[b.index[:, None], b.index[None, :]] = True
    mask[op.diag_index, op.diag_index] = True
    return mask


@pytest.mark.parametrize("hidden", [(), (5,)])
def test_one_example_gives_the_exact_layerwise_fisher_in_the_flat_order(hidden):
    # one example: g = s ⊗ ã per layer, so A = ããᵀ, S = ssᵀ and every layer block is exactly g_l g_lᵀ
    problem, lam = small_problem(hidden=hidden, weight_decay=0.0)
    x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2])
    op = fit_ekfac_on(problem, [(lam, x, y)])
    g = _per_example_grads(problem, lam, x, y)[0]
    fisher = torch.outer(g, g)
    M = materialize(op)
    assert len(op.blocks) == len(hidden) + 1 and op.diag_index.numel() == 0
    torch.testing.assert_close(M, torch.where(_block_mask(op), fisher, torch.zeros_like(fisher)), rtol=0, atol=1e-13)
    if not hidden:  # a single Linear layer: EK-FAC is the whole Fisher
        torch.testing.assert_close(M, fisher, rtol=0, atol=1e-13)


def _tiny_conv4():
    torch.manual_seed(0)
    model = Conv4(1, 16, 3, width=4, norm="group", groups=2).double()
    return MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.1), weight_decay=1e-2)


def test_conv4_eigenvalue_correction_and_diagonal_blocks_match_the_per_example_fisher():
    problem = _tiny_conv4()
    lam = problem.init_params(torch.float64)
    g = torch.Generator().manual_seed(2)
    draws = [(lam, torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    op = fit_ekfac_on(problem, draws, shift=problem.weight_decay)
    G = torch.cat([_per_example_grads(problem, th, x, y) for th, x, y in draws])
    fisher = G.T @ G / G.shape[0]
    assert len(op.blocks) == 5 and op.diag_index.numel() == 4 * 2 * 4  # 4 convs + head; group-norm weight and bias
    for b in op.blocks:  # Λ = diag(Kᵀ F K) in the block's Kronecker eigenbasis: the defining property of EK-FAC
        K = torch.kron(b.q_out, b.q_in)
        F_b = fisher[b.index[:, None], b.index[None, :]]
        torch.testing.assert_close(b.scale.reshape(-1), torch.diagonal(K.T @ F_b @ K), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(op.diag, torch.diagonal(fisher)[op.diag_index], rtol=1e-10, atol=1e-14)
    # the trace is preserved block by block, and the shift is the weight decay
    M = materialize(op)
    assert float(torch.trace(M)) == pytest.approx(float(torch.trace(fisher)) + op.dim * problem.weight_decay, rel=1e-10)


def test_solve_inverts_the_damped_operator_for_vectors_and_blocks():
    problem, lam = small_problem(hidden=(6,), weight_decay=1e-3)
    op = fit_ekfac(problem, lam, random_tasks(n=5, seed=5), fisher_samples=2, seed=3)
    B = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for damping in (1e-3, 0.5):
        X = op.solve(B, damping)
        assert float((op.matmat(X) + damping * X - B).abs().max()) < 1e-10
        torch.testing.assert_close(op.solve(B[:, 0], damping), X[:, 0])
    dense = materialize(op)
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-14)
    assert float(torch.linalg.eigvalsh(dense).min()) >= problem.weight_decay * (1 - 1e-8)
    # seeded: the same fit twice is the same operator
    again = fit_ekfac(problem, lam, random_tasks(n=5, seed=5), fisher_samples=2, seed=3)
    torch.testing.assert_close(materialize(again), dense)


def test_ekfac_curvature_file_preconditions_pcg_to_the_cg_answer_and_is_refused_elsewhere(tmp_path):
    problem, lam, train, val = curvature_problem()
    base = InfluenceSettings(hessian="gauss-newton", damping=1e-3, stationarity_warn=1e9, solve=SolverSettings(tol=1e-11, max_iter=2000))
    art = fit_curvature(problem, lam, train, base, probes=3, method="ekfac")
    i = art.info
    assert i["method"] == "ekfac" and len(i["probe_operator_rel_error"]) == 3 and i["fit_over_floor"] > 0
    assert max(i["probe_operator_rel_error"]) > 1e-3  # EK-FAC drops dθ/dλ: not the total Hessian
    art.save(tmp_path / "ek")
    loaded = CurvatureArtifact.load(tmp_path / "ek")
    assert loaded.method == "ekfac"
    X = torch.randn(art.sketch.dim, 2, dtype=torch.float64)
    torch.testing.assert_close(loaded.sketch.solve(X, 0.1), art.sketch.solve(X, 0.1))
    assert json.loads((tmp_path / "ek.json").read_text())["method"] == "ekfac"
    cg = task_influence(problem, lam, train, val, base)
    pcg = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "ek")))
    torch.testing.assert_close(pcg.scores, cg.scores, rtol=1e-7, atol=1e-14)
    assert pcg.diagnostics["curvature"]["method"] == "ekfac"
    # the fast tier: its inverse applied directly, with the probe error and residual said aloud
    with pytest.warns(InfluenceWarning, match="--solver pcg"):
        fast = task_influence(problem, lam, train, val, dataclasses.replace(base, solver="curvature", curvature_file=str(tmp_path / "ek")))
    assert fast.diagnostics["solver"]["name"] == "curvature" and fast.diagnostics["curvature"]["probe_operator_rel_error"] == i["probe_operator_rel_error"]
    assert any("ekfac curvature misses" in w for w in fast.diagnostics["warnings"])
    with pytest.raises(CheckpointError, match="another λ"):
        task_influence(problem, lam + 0.01, train, val, dataclasses.replace(base, solver="pcg", curvature_file=str(tmp_path / "ek")))
    with pytest.raises(CheckpointError, match=r"fitted against the \S+ total Hessian, not fisher"):  # the fast tier of another Hessian kind
        task_influence(problem, lam, train, val, dataclasses.replace(base, hessian="fisher", solver="curvature", curvature_file=str(tmp_path / "ek")))


def test_ekfac_if_matches_an_explicit_solve_with_the_materialised_ekfac():
    problem, lam, train, val = curvature_problem()
    settings = InfluenceSettings(method="ekfac-if", damping=0.05, fisher_samples=2, stationarity_warn=1e9)
    res = task_influence(problem, lam, train, val, settings)
    K = materialize(fit_ekfac(problem, lam, train, adapt=False, fisher_samples=2, seed=settings.seed))
    grad_f = direct_measurement_gradient(problem, lam, val, adapt=False)
    G = direct_gradients(problem, lam, train, adapt=False)
    # at θ = λ: no adaptation in the gradients either
    torch.testing.assert_close(G[0], grad(problem.weighted_loss)(lam, *(t[0] for t in (train.query_x, train.query_y)), torch.ones(5, dtype=torch.float64)))
    expected = G @ torch.linalg.solve(K + 0.05 * torch.eye(K.shape[0], dtype=K.dtype), grad_f) / len(train)
    torch.testing.assert_close(res.scores, expected, rtol=1e-9, atol=1e-14)
    assert res.method == "ekfac-if" and res.diagnostics["solver"]["name"] == "ekfac"
    rel = task_influence(problem, lam, train, val, dataclasses.replace(settings, damping_mode="relative", damping=0.1))
    assert rel.diagnostics["solver"]["damping"] == pytest.approx(0.1 * float(torch.trace(K)) / K.shape[0], rel=1e-10)


def test_cli_fits_an_ekfac_curvature_and_runs_pcg_and_ekfac_if(tmp_path, capsys):
    from metainfluence.cli import main
    from metainfluence.influence.results import InfluenceResult

    small = ["--train-tasks", "16", "--val-tasks", "8", "--test-tasks", "8", "--steps", "20", "--meta-batch", "8",
             "--weight-decay", "0.05", "--no-progress", "--threads", "1"]
    assert main(["demo", "--out", str(tmp_path), *small]) == 0
    ckpt = str(tmp_path / "refined")
    assert main(["curvature", "--checkpoint", ckpt, "--out", str(tmp_path / "ek"), "--method", "ekfac", "--threads", "1"]) == 0
    assert "EK-FAC" in capsys.readouterr().out
    assert main(["influence", "--checkpoint", ckpt, "--hessian", "gauss-newton", "--solver", "pcg", "--curvature-file", str(tmp_path / "ek"),
                 "--name", "pcg", "--threads", "1"]) == 0
    info = json.loads((tmp_path / "pcg.json").read_text())["diagnostics"]
    assert info["curvature"]["method"] == "ekfac" and info["solver"]["residual"] < 1e-5
    assert main(["influence", "--checkpoint", ckpt, "--method", "ekfac-if", "--damping", "0.1", "--name", "ek_if", "--threads", "1"]) == 0
    res = InfluenceResult.load(tmp_path / "ek_if")
    assert res.method == "ekfac-if" and res.scores.shape == (16,) and bool(torch.isfinite(res.scores).all())
