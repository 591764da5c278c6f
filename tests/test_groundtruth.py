"""LDS ground truth (docs/method.md §10) on a quadratic bilevel problem, where re-optimisation is one Newton step."""

from __future__ import annotations

import torch

from helpers import random_tasks, small_problem
from metainfluence.evaluation.groundtruth import GroundTruthSettings, lds_ground_truth, validation_loss
from metainfluence.evaluation.metrics import lds, lds_predictions
from metainfluence.influence.results import InfluenceSettings
from metainfluence.influence.task_if import task_influence
from metainfluence.meta.newton import newton_refine
from metainfluence.meta.refine import RefineSettings


def test_lds_of_task_if_is_high_on_a_quadratic_problem_and_random_is_not(tmp_path, monkeypatch):
    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=30, n_support=4, n_query=6, n_features=5, regression=True, seed=0)
    val = random_tasks(n=10, n_support=4, n_query=6, n_features=5, regression=True, seed=1)
    lam, _ = newton_refine(problem, lam0, tasks, tol=1e-10)
    gt_settings = GroundTruthSettings(n_subsets=30, subset_fraction=0.5, method="newton", seed=3)
    gt = lds_ground_truth(problem, lam, tasks, val, gt_settings, RefineSettings(tol=1e-10), out_dir=tmp_path / "lds")
    assert gt["masks"].sum(1).eq(15).all()
    f_full = validation_loss(problem, lam, val)
    ranks = {}
    for method in ("task-if", "random"):
        scores = task_influence(problem, lam, tasks, val, InfluenceSettings(method=method, solver="explicit", damping=0.0)).scores
        ranks[method] = lds(lds_predictions(scores, f_full, gt["masks"]), gt["true_f"])
    assert ranks["task-if"] > 0.7, ranks
    assert ranks["task-if"] > ranks["random"] + 0.3, ranks
    # resumable: a second call reads every subset back instead of re-optimising (re-optimising would fail now)
    import metainfluence.meta.newton as newton_module

    def refuse(*a, **k):
        raise AssertionError("a finished subset was re-optimised instead of read back")

    monkeypatch.setattr(newton_module, "newton_refine", refuse)
    again = lds_ground_truth(problem, lam, tasks, val, gt_settings, RefineSettings(tol=1e-10), out_dir=tmp_path / "lds")
    assert torch.equal(again["true_f"], gt["true_f"])


def test_proximal_response_is_what_the_damped_newton_step_predicts():
    # quadratic F: re-optimising F_R + (γ/2)‖λ − λ*‖² from λ* lands exactly on λ* + (H − H_k/n + γI)⁻¹ g_k / n,
    # the Newton-step prediction with damping γ (plain re-optimisation is the γ = 0 case)
    from metainfluence.evaluation.groundtruth import leave_one_out
    from metainfluence.linalg import SolverSettings

    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=8, n_support=4, n_query=6, n_features=5, regression=True, seed=0)
    val = random_tasks(n=4, n_support=4, n_query=6, n_features=5, regression=True, seed=1)
    lam, _ = newton_refine(problem, lam0, tasks, tol=1e-12)
    gamma = 0.5
    gt = leave_one_out(problem, lam, tasks, val, GroundTruthSettings(n_loo=8, method="newton", proximal=gamma), RefineSettings(tol=1e-12))
    pred = task_influence(problem, lam, tasks, val, InfluenceSettings(hessian="exact", damping=gamma, removal="newton", stationarity_warn=1e9,
                                                                         solve=SolverSettings(tol=1e-13)))
    from metainfluence.influence.gradients import measurement_gradient

    grad_f, _ = measurement_gradient(problem, lam, val)
    order = gt["tasks"].tolist()
    torch.testing.assert_close(gt["true_delta_lam"] @ grad_f, pred.scores[order], rtol=1e-7, atol=1e-13)
    plain = leave_one_out(problem, lam, tasks, val, GroundTruthSettings(n_loo=8, method="newton"), RefineSettings(tol=1e-12))
    assert not torch.allclose(plain["true_delta_lam"], gt["true_delta_lam"], rtol=1e-3)


def test_kept_leave_one_out_units_are_re_measured_on_another_validation_pool_not_re_optimised(tmp_path, monkeypatch):
    """A re-optimisation does not depend on the measurement, its f does: with another validation pool the
    kept λ's are measured again (equal to a fresh run's f), while LDS subsets, which keep only f, are refused."""
    import pytest

    import metainfluence.meta.newton as newton_module
    from metainfluence.errors import CheckpointError
    from metainfluence.evaluation.groundtruth import leave_one_out

    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=20, n_support=4, n_query=6, n_features=5, regression=True, seed=0)
    val_a = random_tasks(n=10, n_support=4, n_query=6, n_features=5, regression=True, seed=1)
    val_b = random_tasks(n=30, n_support=4, n_query=6, n_features=5, regression=True, seed=2)
    lam, _ = newton_refine(problem, lam0, tasks, tol=1e-10)
    gts, rs = GroundTruthSettings(n_loo=5, n_subsets=3, method="newton"), RefineSettings(tol=1e-10)
    kept = leave_one_out(problem, lam, tasks, val_a, gts, rs, out_dir=tmp_path / "loo")
    fresh_b = leave_one_out(problem, lam, tasks, val_b, gts, rs)  # no store: re-optimised and measured on b
    lds_ground_truth(problem, lam, tasks, val_a, gts, rs, out_dir=tmp_path / "lds")

    def refuse(*a, **k):
        raise AssertionError("a kept unit was re-optimised instead of re-measured")

    monkeypatch.setattr(newton_module, "newton_refine", refuse)
    on_b = leave_one_out(problem, lam, tasks, val_b, gts, rs, out_dir=tmp_path / "loo")
    assert on_b["units_computed"] == 0
    assert torch.allclose(on_b["true_delta_f"], fresh_b["true_delta_f"], rtol=1e-8, atol=1e-12)
    assert not torch.allclose(on_b["true_delta_f"], kept["true_delta_f"])  # the two pools measure different changes
    assert torch.equal(leave_one_out(problem, lam, tasks, val_a, gts, rs, out_dir=tmp_path / "loo")["true_delta_f"], kept["true_delta_f"])
    # the f's measured on b are kept beside the units: a further resume on b measures nothing again
    import metainfluence.evaluation.groundtruth as gt_module

    monkeypatch.setattr(gt_module, "validation_loss", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured again")))
    assert torch.equal(leave_one_out(problem, lam, tasks, val_b, gts, rs, out_dir=tmp_path / "loo")["true_delta_f"], on_b["true_delta_f"])
    assert torch.equal(leave_one_out(problem, lam, tasks, val_a, gts, rs, out_dir=tmp_path / "loo")["true_delta_f"], kept["true_delta_f"])
    with pytest.raises(CheckpointError, match="another validation pool"):
        lds_ground_truth(problem, lam, tasks, val_b, gts, rs, out_dir=tmp_path / "lds")


def test_a_grown_sample_reuses_every_finished_unit_and_old_manifests_stay_resumable(tmp_path):
    """A unit (task k left out, or the m-th seeded subset) does not depend on the sample's size: growing
    n_loo / n_subsets, or an explicit sample, computes only the new units, equal to a fresh run's; a store
    whose manifest was keyed by its sample (as before) is accepted, and other settings are still refused."""
    import json

    import pytest

    from metainfluence.errors import CheckpointError
    from metainfluence.evaluation.groundtruth import leave_one_out

    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=20, n_support=4, n_query=6, n_features=5, regression=True, seed=0)
    val = random_tasks(n=10, n_support=4, n_query=6, n_features=5, regression=True, seed=1)
    lam, _ = newton_refine(problem, lam0, tasks, tol=1e-10)
    rs = RefineSettings(tol=1e-10)
    small, big = GroundTruthSettings(n_loo=3, n_subsets=2, method="newton"), GroundTruthSettings(n_loo=6, n_subsets=4, method="newton")
    first = leave_one_out(problem, lam, tasks, val, small, rs, out_dir=tmp_path / "loo")
    grown = leave_one_out(problem, lam, tasks, val, big, rs, out_dir=tmp_path / "loo")
    fresh = leave_one_out(problem, lam, tasks, val, big, rs)
    assert first["units_computed"] == 1 + 3 and grown["units_computed"] == 3  # control + 3, then the 3 new tasks only
    assert set(first["tasks"].tolist()) < set(grown["tasks"].tolist())  # the seeded sample grows by a prefix
    assert torch.allclose(grown["true_delta_f"], fresh["true_delta_f"], rtol=1e-8, atol=1e-12)
    explicit = leave_one_out(problem, lam, tasks, val, small, rs, out_dir=tmp_path / "loo", sample=[*grown["tasks"].tolist()[:2], 19])
    assert explicit["units_computed"] == int(19 not in grown["tasks"].tolist())

    lds_small = lds_ground_truth(problem, lam, tasks, val, small, rs, out_dir=tmp_path / "lds")
    lds_big = lds_ground_truth(problem, lam, tasks, val, big, rs, out_dir=tmp_path / "lds")
    assert lds_small["units_computed"] == 2 and lds_big["units_computed"] == 2
    assert torch.equal(lds_big["true_f"][:2], lds_small["true_f"]) and torch.equal(lds_big["masks"][:2], lds_small["masks"])

    # a manifest written when the key held the sample and its size: still resumed, nothing recomputed
    manifest = tmp_path / "loo" / "manifest.json"
    rec = json.loads(manifest.read_text())
    rec["settings"]["gt"].update(n_loo=6, n_subsets=4, subset_fraction=0.5, seed=0)
    rec["settings"]["sample"] = grown["tasks"].tolist()
    rec["key"] = "written-by-an-older-version"
    manifest.write_text(json.dumps(rec))
    assert leave_one_out(problem, lam, tasks, val, big, rs, out_dir=tmp_path / "loo")["units_computed"] == 0
    with pytest.raises(CheckpointError, match="other settings"):  # what a unit holds still keys the store
        leave_one_out(problem, lam, tasks, val, big, RefineSettings(tol=1e-9), out_dir=tmp_path / "loo")
