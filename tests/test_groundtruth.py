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
