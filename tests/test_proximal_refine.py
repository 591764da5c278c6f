"""Refine on the proximal objective P(λ) = F(λ) + (γ/2)‖λ − λ₀‖² anchored at the trained λ₀
(`refine --refine-proximal γ`, docs/method.md §2, "The proximal objective"), and influence / edits on the checkpoint it writes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metainfluence import InfluenceSettings, Removal, RefineSettings, edit_model, refine, task_influence
from metainfluence.cli import main
from metainfluence.errors import DivergenceError, SettingsError
from metainfluence.evaluation.groundtruth import validation_loss
from metainfluence.meta.checkpoint import load_checkpoint
from metainfluence.pipeline import RunContext, edit_checkpoint, influence_checkpoint
from metainfluence.pipeline.proximal import ANCHOR

GAMMA = 0.1
TINY = ["--train-tasks", "16", "--val-tasks", "8", "--test-tasks", "10", "--model-hidden", "12", "--model-activation", "tanh",
        "--steps", "40", "--meta-batch", "4", "--weight-decay", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("proximal")
    assert main(["train", "--out", str(out), *TINY]) == 0
    # L-BFGS most of the way, then exact Newton from that checkpoint: the second refine keeps the first's anchor
    assert main(["refine", "--checkpoint", str(out / "trained"), "--name", "refined_lbfgs", "--refine-proximal", str(GAMMA), "--refine-tol", "0",
                 "--refine-tol-ratio", "1e-6", "--refine-max-iter", "500", "--no-progress"]) == 0
    assert main(["refine", "--checkpoint", str(out / "refined_lbfgs"), "--refine-proximal", str(GAMMA), "--refine-method", "newton",
                 "--refine-tol", "0", "--refine-tol-ratio", "1e-10", "--refine-max-iter", "10", "--no-progress"]) == 0
    ctx, ckpt = RunContext.from_checkpoint(out / "refined", splits=("train", "val"))
    return out, ctx, ckpt


def _p_gradient(ctx, lam, anchor, w=None):
    train = ctx.tensors["train"].to(dtype=torch.float64)
    return ctx.problem.meta_gradient(lam, train, w) + GAMMA * (lam - anchor)


def test_the_refined_checkpoint_is_stationary_for_p_and_keeps_its_anchor(run):
    out, ctx, ckpt = run
    trained = load_checkpoint(out / "trained").lam
    anchor = ckpt.state[ANCHOR]
    # the anchor is the trained λ itself, kept through the second refine (which started elsewhere)
    assert torch.equal(anchor, trained.to(anchor.dtype)) and torch.equal(load_checkpoint(out / "refined_lbfgs").state[ANCHOR], anchor)
    rep = ckpt.info["refine_report"]
    assert rep["proximal"] == GAMMA and rep["converged"]
    g_p = _p_gradient(ctx, ckpt.lam, anchor)
    g_f = _p_gradient(ctx, ckpt.lam, ckpt.lam)  # plain ∇F
    assert float(g_p.norm()) < 1e-6 * float(g_f.norm())  # stationary for P, not for F
    assert float((ckpt.lam - anchor).norm()) > 0


def test_scores_on_it_are_the_derivative_of_the_proximal_minimiser(run):
    """score_k = d f(λ*(w)) / d(−w_k) of P's minimiser: checked against re-optimising P with task k's
    weight lowered by ε (central difference), which the plain-F scores would not match."""
    out, ctx, ckpt = run
    s = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-8)
    res, _ = influence_checkpoint(out / "refined", s, out=out, name="prox_scores", log=lambda m: None)
    assert res.diagnostics["proximal"]["damping_used"] == pytest.approx(GAMMA + 1e-8)
    assert res.diagnostics["stationarity"]["ratio"] <= 1e-8 and not res.diagnostics.get("warnings")
    train, val = (ctx.tensors[k].to(dtype=torch.float64) for k in ("train", "val"))
    anchor, lam = ckpt.state[ANCHOR].double(), ckpt.lam.double()
    rs = RefineSettings(method="newton", tol=0.0, tol_ratio=1e-11, max_iter=50)
    eps, n = 1e-3, len(train)
    for k in (0, 5):
        f = []
        for sign in (1, -1):
            w = torch.ones(n, dtype=torch.float64)
            w[k] -= sign * eps
            lam_w, _ = refine(ctx.problem, lam, train, rs, w=w, proximal=(GAMMA, anchor))
            f.append(validation_loss(ctx.problem, lam_w, val))
        fd = (f[0] - f[1]) / (2 * eps)  # d f / d(−w_k): the change per unit of removal
        assert float(res.scores[k]) == pytest.approx(fd, rel=2e-3, abs=1e-9)
    # F's own Hessian is indefinite at this λ*: without γ there is no score to compute (H + γI is positive definite)
    with pytest.raises(DivergenceError, match="not positive definite"):
        task_influence(ctx.problem, lam, train, val, dataclasses.replace(s, stationarity_warn=1e9))


def test_edits_use_the_proximal_hessian_and_refuse_plain_newton_steps(run, tmp_path):
    out, ctx, ckpt = run
    s = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-8)
    _, removal, edited, _, _ = edit_checkpoint(out / "refined", s, remove_tasks="3", out=tmp_path)
    train = ctx.tensors["train"].to(dtype=torch.float64)
    direct = edit_model(ctx.problem, ckpt.lam.double(), train, Removal(tasks=[3]), dataclasses.replace(s, damping=1e-8 + GAMMA, stationarity_warn=1e9))
    assert torch.allclose(edited.lam, direct.lam, rtol=0, atol=1e-12)
    with pytest.raises(SettingsError, match="newton-steps 0"):
        edit_checkpoint(out / "refined", s, remove_tasks="3", out=tmp_path, name="e2", newton_steps=1)
    with pytest.raises(SettingsError, match="damping-mode absolute"):
        influence_checkpoint(out / "refined", dataclasses.replace(s, damping_mode="relative"), out=tmp_path, log=lambda m: None)


def test_proximal_gamma_is_validated():
    with pytest.raises(SettingsError, match="proximal"):
        RefineSettings(proximal=-1.0).validate()


def test_the_fidelity_check_re_optimises_p_with_the_checkpoints_anchor(run, tmp_path):
    from metainfluence.evaluation.fidelity import CheckSettings

    out, ctx, ckpt = run
    s = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-8)
    lbfgs = lambda rs: dataclasses.replace(rs, refine=dataclasses.replace(rs.refine, method="lbfgs", tol_ratio=1e-8, max_iter=3000))
    res, _ = influence_checkpoint(out / "refined", s, out=tmp_path, log=lambda m: None, check=CheckSettings(removals=6, fraction=0.125), overrides=lbfgs)
    fid = res.diagnostics["fidelity_check"]
    # groups of 2 tasks re-optimised on P (anchored at λ_t, not at λ*): the summed scores rank them
    assert fid["spearman"] >= 0.8 and fid["sign_agreement"] >= 5 / 6, fid


def test_a_detection_experiment_with_a_proximal_refine_scores_the_proximal_objective(tmp_path):
    from metainfluence.experiments import run_experiment
    from metainfluence.influence.results import InfluenceResult

    cfg = tmp_path / "det.toml"
    cfg.write_text("""
[data]
dataset = "digits"
train_tasks = 30
val_tasks = 10
test_tasks = 20
[model]
hidden = [12]
activation = "tanh"
[objective]
weight_decay = 1e-2
[train]
steps = 60
meta_batch = 5
checkpoint_every = 0
[refine]
proximal = 0.1
tol = 0.0
tol_ratio = 1e-6
[influence]
damping = 1e-3
[detection]
methods = ["task-if", "random"]
self_influence = false
edit_fractions = []
""")
    out = tmp_path / "det"
    res = run_experiment("detection", str(cfg), False, str(out), log=lambda s: None)
    assert res["refine"]["proximal"] == 0.1 and res["refine"]["ratio_after"] <= 1e-6
    assert torch.equal(load_checkpoint(out / "refined").state[ANCHOR], load_checkpoint(out / "trained").lam.double())
    kept = InfluenceResult.load(out / "scores" / "task-if")
    assert kept.settings["influence"]["damping"] == pytest.approx(0.1 + 1e-3)  # P's Hessian is H + γI
    lines = []  # the proximal settings survive their JSON round trip: a resumed run reuses the scores
    run_experiment("detection", str(cfg), False, str(out), log=lines.append, resume=True)
    assert any("task-if" in ln and "scores resumed" in ln for ln in lines), lines
