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
from metainfluence.pipeline.proximal import ANCHOR, proximal_of

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
    # the first refine's report is kept beside the second's (L-BFGS, then Newton from where it stopped)
    (first,) = ckpt.info["metrics"]["earlier_refines"]
    assert first == load_checkpoint(out / "refined_lbfgs").info["refine_report"] and first["method"] != rep["method"]
    assert first["grad_norm_after"] == pytest.approx(rep["grad_norm_before"], rel=1e-6)
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


def test_edits_use_the_proximal_hessian_and_newton_steps_descend_p(run, tmp_path):
    out, ctx, ckpt = run
    s = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-8)
    lines: list[str] = []
    _, removal, edited, _, _ = edit_checkpoint(out / "refined", s, remove_tasks="3", out=tmp_path, log=lines.append)
    # the printed damping is the one used, δ + γ, as influence prints it
    assert f"proximal checkpoint: γ = {GAMMA:g} added to the damping (1e-08 → {1e-8 + GAMMA:g})" in lines
    edit_line = [line for line in lines if line.startswith("edit: ")]
    assert len(edit_line) == 1 and edit_line[0].endswith(f"exact Hessian, solver explicit, damping {1e-8 + GAMMA:g}")
    train = ctx.tensors["train"].to(dtype=torch.float64)
    direct = edit_model(ctx.problem, ckpt.lam.double(), train, Removal(tasks=[3]), dataclasses.replace(s, damping=1e-8 + GAMMA, stationarity_warn=1e9))
    assert torch.allclose(edited.lam, direct.lam, rtol=0, atol=1e-12)
    # Newton steps re-optimise the reduced *proximal* objective P_R = F_R + (γ/2)‖λ − λ₀‖² (not plain F_R)
    _, _, newton, _, _ = edit_checkpoint(out / "refined", s, remove_tasks="3", out=tmp_path, name="e2", newton_steps=5)
    gamma, anchor = proximal_of(ckpt)
    w, v, u = Removal(tasks=[3]).weights(ctx.problem, ckpt.lam.double(), train)

    def grad_p(lam):
        return ctx.problem.meta_gradient(lam, train, w, v, u) + gamma * (lam - anchor.double())

    before, after = float(grad_p(ckpt.lam.double()).norm()), float(grad_p(newton.lam).norm())
    assert after == pytest.approx(newton.diagnostics["newton_final_grad_norm"], rel=1e-6)
    assert after < 1e-6 * before
    # (P_R's curvature is small here — λ_min ≈ 0.01 — so Newton's quadratic phase starts only at the third step)
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
    # the run report shows the check, and labels the proximal stationarity as P's (F's beside it)
    from metainfluence.experiments import report_run

    md = report_run(tmp_path).read_text()
    assert f"Fidelity check: 6 removals of 2 tasks re-optimised from λ*: Spearman {fid['spearman']:.2f}" in md
    assert "‖∇P‖ / mean‖g‖" in md and "F's own ‖∇F‖ / mean‖g‖" in md


# a small digits run refined on the proximal objective (γ = 0.1), for the experiments below
DIGITS_PROXIMAL = """
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
"""


def test_a_detection_experiment_with_a_proximal_refine_scores_the_proximal_objective(tmp_path):
    from metainfluence.experiments import run_experiment
    from metainfluence.influence.results import InfluenceResult

    cfg = tmp_path / "det.toml"
    cfg.write_text(DIGITS_PROXIMAL + """[detection]
methods = ["task-if", "task-if-newton", "random"]
self_influence = false
edit_fractions = []
loo_tasks = 12
loo_tol_ratio = 1e-7
""")
    out = tmp_path / "det"
    res = run_experiment("detection", str(cfg), False, str(out), log=lambda s: None)
    assert res["refine"]["proximal"] == 0.1 and res["refine"]["ratio_after"] <= 1e-6
    assert torch.equal(load_checkpoint(out / "refined").state[ANCHOR], load_checkpoint(out / "trained").lam.double())
    kept = InfluenceResult.load(out / "scores" / "task-if")
    assert kept.settings["influence"]["damping"] == pytest.approx(0.1 + 1e-3)  # P's Hessian is H + γI
    # the scores' diagnostics judge stationarity by P's gradient (as `influence` does), F's kept beside it
    diag = res["influence_diagnostics"]["task-if"]
    assert diag["proximal"] == {"gamma": 0.1, "damping_given": 1e-3, "damping_used": pytest.approx(0.1 + 1e-3), "stationarity_warn_given": 0.05}
    assert diag["stationarity"]["ratio"] == pytest.approx(res["refine"]["ratio_after"]) and diag["stationarity_of_F"]["ratio"] > 1e-4
    # the leave-one-out ground truth re-optimises P (anchored at the trained λ) on a sample stratified by corruption
    gt = res["ground_truth"]
    assert len(gt["tasks"]) == 12 and sum(gt["corrupted"]) == 6 and gt["proximal"] == 0.1 and not gt["warnings"]
    k = gt["tasks"][0]
    ctx = RunContext.from_checkpoint(out / "refined", splits=("train", "val"))[0]
    lam_star, anchor = load_checkpoint(out / "refined").lam, load_checkpoint(out / "refined").state[ANCHOR]
    train, val = (ctx.tensors[s].to(dtype=torch.float64) for s in ("train", "val"))
    rs = RefineSettings(tol=0.0, tol_ratio=5e-8, max_iter=2000)
    w = torch.ones(len(train), dtype=torch.float64)
    w[k] = 0
    f = [validation_loss(ctx.problem, refine(ctx.problem, lam_star, train, rs, w=ww, proximal=(0.1, anchor))[0], val) for ww in (None, w)]
    assert gt["true_delta_f"][0] == pytest.approx(f[1] - f[0], rel=1e-3, abs=1e-9)
    rows = {r["method"]: r for r in gt["table"]}
    assert rows["leave-one-out (re-optimised)"]["spearman_with_loo"] == 1.0
    # first order (Gauss–Newton H) tracks the proximal response: measured 0.73 over the 12 tasks (p < 0.05 from 0.59 up)
    assert rows["task-if"]["spearman_with_loo"] >= 0.6 > rows["random"]["spearman_with_loo"]
    # the Newton-step removal, (H − H_k/n + δI)⁻¹g_k/n on P: its own scores (first order's kept beside them); 0.80 here
    newton = InfluenceResult.load(out / "scores" / "task-if-newton")
    assert newton.diagnostics["newton_step"]["downdate"] == "one solve per task" and newton.settings["influence"]["removal"] == "newton"
    assert torch.equal(newton.extra["first_order_scores"], kept.scores) and not torch.allclose(newton.scores, kept.scores, rtol=1e-3)
    assert rows["task-if-newton"]["spearman_with_loo"] >= 0.6
    lines = []  # the proximal settings survive their JSON round trip: a resumed run reuses the scores and the ground truth
    again = run_experiment("detection", str(cfg), False, str(out), log=lines.append, resume=True)
    assert any("task-if" in ln and "scores resumed" in ln for ln in lines), lines
    assert again["ground_truth"] == gt and again["edits"] == res["edits"]  # both kept as units, reused
    # the measurement's reliability: 4 halvings of the 10 validation tasks (seeded by corruption_seed = 0); the recorded
    # correlation and half-pool AUC are those of task-IF on P scored against each half as its own validation pool
    rel = res["measurement_reliability"]
    assert (rel["splits"], rel["n_val_tasks"], rel["half_size"], len(rel["half_auc"])) == (4, 10, 5, 8) and again["measurement_reliability"] == rel
    from metainfluence.config import settings_from_dict
    from metainfluence.evaluation.metrics import detection_auc
    from metainfluence.influence.reliability import halvings

    used = settings_from_dict(InfluenceSettings, kept.settings["influence"])
    a, b = halvings(len(val), 4, seed=0)[0]
    halves = [task_influence(ctx.problem, lam_star.double(), train, val.subset(part), used).scores.double() for part in (a, b)]
    assert rel["split_half_pearson"][0] == pytest.approx(float(torch.corrcoef(torch.stack(halves))[0, 1]), abs=1e-3)  # CG to 1e-6
    from metainfluence.io import read_tensors

    flags = read_tensors(out / "results.safetensors")["corrupted"].bool().numpy()
    assert rel["half_auc"][:2] == pytest.approx([detection_auc((-h).numpy(), flags) for h in halves], abs=0.02)
    assert bool(rel["warnings"]) == (rel["reliability"] < 0.9) and all("validation tasks" in w for w in rel["warnings"])
    # the oracle edit is P's: its backtracking descends P_R, anchored at the trained λ (as `edit` makes it on this checkpoint)
    assert res["edits"][-1]["method"].startswith("oracle") and res["edits"][-1]["proximal_gamma"] == 0.1
    from metainfluence.experiments import report_run

    md = report_run(out).read_text()
    assert "Against leave-one-out on the corrupted pool" in md and "leave-one-out (re-optimised)" in md
    assert "How much the ranking depends on the validation sample" in md and f"**{rel['reliability']:.2f}**" in md


def test_a_removal_experiment_after_a_proximal_refine_edits_and_re_optimises_p(tmp_path):
    """Every path of the removal table descends the reduced *proximal* objective P_R: the re-optimisation
    from λ* (anchored at the trained λ) reaches its minimiser, the edit points at it, and Newton steps
    after the edit lower ‖∇P_R‖ further."""
    from metainfluence.experiments import run_experiment

    cfg = tmp_path / "rem.toml"
    cfg.write_text(DIGITS_PROXIMAL + """[removal]
methods = ["task-if"]
instance_levels = []
retrain = false
retrain_methods = []
edit_newton_steps = 3
""")
    res = run_experiment("removal", str(cfg), False, str(tmp_path / "rem"), log=lambda s: None)
    rows = {r["path"]: r for r in res["table"] if r["method"] == "task-if"}
    reopt, newton = rows["re-optimise from λ*"], rows["edit + 3 Newton"]
    assert reopt["reduced_objective"] == "P_R"
    assert reopt["reduced_grad_after_reoptimise"] < 1e-3 * reopt["reduced_grad_at_lam_star"]
    # Gauss–Newton steps (the edit's kind) converge linearly, not quadratically: they go on lowering ‖∇P_R‖
    assert reopt["reduced_grad_after_edit"] < reopt["reduced_grad_at_lam_star"] and reopt["edit_cosine_to_reoptimised"] > 0.8
    assert newton["newton_final_grad_norm"] < 0.5 * reopt["reduced_grad_after_edit"]


def test_an_edit_of_proximal_scores_takes_the_damping_the_user_gave(run, tmp_path):
    # the scores record δ + γ as the damping that ran; the edit adds γ itself, so it must start from the δ the user gave
    from metainfluence.pipeline.scores import scores_settings

    out, _, _ = run
    s = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-3)
    result, stem = influence_checkpoint(out / "refined", s, out=tmp_path, name="prox", log=lambda m: None)
    assert result.settings["influence"]["damping"] == pytest.approx(1e-3 + GAMMA)
    again = scores_settings(stem, InfluenceSettings())
    assert (again.hessian, again.solver, again.damping) == ("exact", "explicit", 1e-3)


def test_refine_advice_fits_the_model(run):
    # a small smooth model: exact Newton; a ReLU one of any size: F jumps, so a smooth activation or the proximal objective
    import copy
    import importlib

    from metainfluence.meta.refine import refine_advice

    refine_module = importlib.import_module("metainfluence.meta.refine_monitor")  # refine_advice's home (it reads LARGE_MODEL there)

    _, ctx, _ = run
    assert "--refine-method newton" in refine_advice(RefineSettings(), ctx.problem)
    relu = copy.copy(ctx.problem)  # a shallow copy whose model (only looked at for its activations) is a ReLU one
    relu.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    assert "silu" in refine_advice(RefineSettings(), relu) and "--refine-method newton" not in refine_advice(RefineSettings(), relu)
    # Newton–CG's advice names the Hessian its steps used: auto is exact on a second-order unrolled loop
    assert "--refine-newton-hessian gauss-newton" in refine_advice(RefineSettings(method="newton-cg"), ctx.problem)
    assert "finish with --refine-method newton" in refine_advice(RefineSettings(method="newton-cg", newton_hessian="gauss-newton"), ctx.problem)
    refine_module.LARGE_MODEL, saved = 10, refine_module.LARGE_MODEL
    try:
        advice = refine_advice(RefineSettings(), relu)
        assert "silu" in advice and "--refine-proximal 1" in advice
        # a refine already on the proximal objective is not told to refine the proximal objective
        advice = refine_advice(RefineSettings(proximal=1.0), relu)
        assert "silu" in advice and "--refine-proximal 1" not in advice and "--refine-max-minutes" in advice
        assert "newton-cg" in refine_advice(RefineSettings(), ctx.problem)
        assert "larger --refine-proximal" in refine_advice(RefineSettings(proximal=1.0), ctx.problem)
    finally:
        refine_module.LARGE_MODEL = saved


def test_gamma_joins_a_damping_checked_as_given_and_nothing_else_is_checked_early():
    """proximal_settings refuses a negative damping before γ hides it, and leaves the rest to where it is used: an
    experiment fits its curvature file after this (a full validation here refused `solver = "curvature"` without one)."""
    from metainfluence.errors import SettingsError
    from metainfluence.pipeline.proximal import proximal_settings

    assert proximal_settings(InfluenceSettings(solver="curvature", hessian="fisher", damping=1e-3), 1.0).damping == pytest.approx(1.001)
    with pytest.raises(SettingsError, match="got -0.5"):
        proximal_settings(InfluenceSettings(damping=-0.5), 1.0)


def test_the_distributed_example_scores_the_proximal_objective_as_influence_does(run, tmp_path, monkeypatch):
    # examples/distributed_influence.py without torchrun is one process: its scores of a proximal checkpoint must be
    # `metainfluence influence`'s (γ in the damping, P's stationarity), not plain F's
    import runpy
    import sys
    from pathlib import Path

    from metainfluence.influence.results import InfluenceResult

    out, ctx, ckpt = run
    flags = ["--hessian", "gauss-newton", "--solver", "explicit", "--damping", "1e-3"]
    monkeypatch.setattr(sys, "argv", ["distributed_influence.py", "--checkpoint", str(out / "refined"), "--out", str(tmp_path / "dist"), *flags])
    example = Path(__file__).resolve().parents[1] / "examples" / "distributed_influence.py"
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(example), run_name="__main__")
    assert done.value.code == 0
    dist = InfluenceResult.load(tmp_path / "dist")
    s = InfluenceSettings(hessian="gauss-newton", solver="explicit", damping=1e-3)
    single, _ = influence_checkpoint(out / "refined", s, out=tmp_path, name="single", log=lambda m: None)
    assert dist.diagnostics["proximal"]["damping_used"] == pytest.approx(GAMMA + 1e-3)
    assert not dist.diagnostics.get("warnings")
    torch.testing.assert_close(dist.scores, single.scores, rtol=1e-9, atol=1e-14)
    assert (tmp_path / "dist.csv").read_text().splitlines()[0] == (tmp_path / "single.csv").read_text().splitlines()[0]  # its item table too
    # a negative damping is the user's, said as given (γ added to it would have hidden it), in one line with status 2
    monkeypatch.setattr(sys, "argv", ["distributed_influence.py", "--checkpoint", str(out / "refined"), "--out", str(tmp_path / "bad"),
                                      "--damping", "-0.5"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(example), run_name="__main__")
    assert done.value.code == 2 and not (tmp_path / "bad.json").exists()


def test_scores_compare_the_training_and_validation_losses_and_warn_when_overfit(run, tmp_path, monkeypatch):
    """The refine report's query_loss_after is F without μ and γ terms (the training tasks' mean query loss);
    the scores set it against the validation loss and warn of meta-overfitting above OVERFIT_RATIO."""
    import warnings

    from metainfluence.influence import reliability

    out, ctx, ckpt = run
    train = ctx.tensors["train"].to(dtype=torch.float64)
    rep = ckpt.info["refine_report"]
    assert rep["query_loss_after"] == pytest.approx(validation_loss(ctx.problem, ckpt.lam.double(), train), rel=1e-9)
    assert rep["objective_after"] > rep["query_loss_after"]  # the μ and γ terms were taken off
    s = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-8)
    res, _ = influence_checkpoint(out / "refined", s, out=tmp_path, name="a", log=lambda m: None)
    gen = res.diagnostics["generalisation"]
    val = validation_loss(ctx.problem, ckpt.lam.double(), ctx.tensors["val"].to(dtype=torch.float64))
    assert gen["val_query_loss"] == pytest.approx(val, rel=1e-9) and gen["ratio"] == pytest.approx(val / rep["query_loss_after"])
    overfit = [w for w in res.diagnostics.get("warnings", []) if "overfit" in w]
    assert (gen["ratio"] > reliability.OVERFIT_RATIO and gen["val_query_loss"] - gen["train_query_loss"] > reliability.OVERFIT_GAP) == bool(overfit)
    monkeypatch.setattr(reliability, "OVERFIT_RATIO", 0.5 * gen["ratio"])  # a run this far apart is warned, with its remedy
    monkeypatch.setattr(reliability, "OVERFIT_GAP", 0.5 * (gen["val_query_loss"] - gen["train_query_loss"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res, _ = influence_checkpoint(out / "refined", s, out=tmp_path, name="b", log=lambda m: None)
    said = [str(w.message) for w in caught if "overfit" in str(w.message)]
    assert len(said) == 1 and "--check K" in said[0] and "--removal newton" in said[0] and said[0] in res.diagnostics["warnings"]


def test_a_curvature_fit_of_a_proximal_checkpoint_probes_at_the_damping_its_scores_use(run, tmp_path):
    from metainfluence.pipeline.stages import curvature_checkpoint

    out, _, _ = run
    lines = []
    art, _ = curvature_checkpoint(out / "refined", InfluenceSettings(hessian="gauss-newton", damping=1e-3), tmp_path / "curv", rank=4, oversample=2,
                                  probes=2, log=lines.append)
    assert art.info["probe_damping"] == pytest.approx(1e-3 + GAMMA) and any("γ = 0.1 added to the damping" in line for line in lines)


def test_lbfgs_stops_once_its_steps_fall_below_the_working_precision():
    # a float32 quadratic whose minimiser c (‖c‖ ≈ 3e3) no float32 vector hits: near it the gradient is a few ulps and
    # every L-BFGS step moves λ by less than its round-off, so the loop stops instead of spending iterations on nothing
    from metainfluence.meta.refine import ROUNDOFF, _run_lbfgs
    from metainfluence.meta.refine_monitor import RefineMonitor

    g = torch.Generator().manual_seed(0)
    c = 400.0 + torch.rand(64, generator=g, dtype=torch.float64)
    scale = 1.0 + torch.rand(64, generator=g, dtype=torch.float64)

    def ev(x):
        d = x.double() - c
        return (0.5 * (scale * d * d).sum()).to(x.dtype), (scale * d).to(x.dtype)

    settings = RefineSettings(dtype="float32", tol=0.0, tol_ratio=0.0, max_iter=200)
    monitor = RefineMonitor(settings, 1.0, 0.0, 0.0, False, None)
    x, iterations, failure = _run_lbfgs(ev, torch.zeros(64), settings, 0.0, monitor)
    assert failure.startswith(ROUNDOFF) and "float32" in failure and iterations < 200
    assert float((x.double() - c).norm()) < 1e-2  # it stopped at the minimiser, as far as float32 resolves it


def test_a_refine_stalled_at_round_off_says_to_refine_in_float64_and_does_not_fall_back(monkeypatch, run):
    import importlib

    refine_module = importlib.import_module("metainfluence.meta.refine")  # the module (the package exports a function of its name)
    _, ctx, ckpt = run
    lam = ckpt.lam
    monkeypatch.setattr(refine_module, "_run_lbfgs", lambda ev, x, settings, stop, monitor: (x, 3, refine_module.ROUNDOFF + " (test)"))
    with pytest.warns(Warning, match=r"--refine-dtype float64") as caught:
        _, report = refine(ctx.problem, lam, ctx.tensors["train"], RefineSettings(dtype="float32", tol=0.0, tol_ratio=1e-12, max_iter=50))
    assert report.method == "lbfgs" and report.iterations == 3 and report.stopped_by == "failure"  # no gradient-descent fallback
    assert "raise --refine-max-iter" not in str(caught[0].message)


def test_a_relu_refine_stopped_by_time_is_told_to_change_the_objective_not_to_wait():
    # a jumping F does not get closer to stationarity with more time: the advice is a smooth activation or the proximal refine
    from helpers import random_tasks, small_problem

    problem, lam = small_problem(steps=1, hidden=(8,), activation="relu")
    with pytest.warns(Warning, match="silu") as caught:
        _, report = refine(problem, lam, random_tasks(n=8), RefineSettings(tol=0.0, tol_ratio=1e-12, max_minutes=1e-6))
    assert report.stopped_by == "max_minutes" and "--refine-proximal 1" in str(caught[0].message)
