"""The measurement's reliability (docs/method.md §5.1): how much task-IF's scores depend on which
validation tasks were drawn, from split halves of the validation pool."""

from __future__ import annotations

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.errors import SettingsError
from metainfluence.influence.reliability import halvings, measurement_reliability, reliability_warning, split_half_scores
from metainfluence.influence.results import InfluenceSettings
from metainfluence.influence.task_if import task_influence
from metainfluence.meta.newton import newton_refine

EXPLICIT = InfluenceSettings(hessian="exact", solver="explicit", damping=1e-6, stationarity_warn=1e9)


@pytest.fixture(scope="module")
def quadratic():
    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=40, n_support=4, n_query=6, n_features=5, regression=True, seed=0)
    lam, _ = newton_refine(problem, lam0, tasks, tol=1e-10)
    return problem, lam, tasks


def _val(m, seed):
    return random_tasks(n=m, n_support=4, n_query=6, n_features=5, regression=True, seed=seed)


def test_each_half_is_scored_as_its_own_validation_pool(quadratic):
    """Only half A is solved; B follows from the full pool's solve by linearity (∇f is the mean of the
    validation tasks' gradients). Both columns equal task-IF against that half as its own pool, for an odd
    pool too, with s solved here or taken from task-IF's result."""
    problem, lam, tasks = quadratic
    for m in (30, 31):
        val = _val(m, 1)
        full = task_influence(problem, lam, tasks, val, EXPLICIT)
        for s in (None, full.extra["s"]):
            S, residual = split_half_scores(problem, lam, tasks, val, EXPLICIT, splits=2, seed=5, s=s)
            assert S.shape == (40, 4) and residual < 1e-10
            for i, (a, b) in enumerate(halvings(m, 2, 5)):
                assert len(a) == m // 2 and sorted(a + b) == list(range(m))
                for col, part in ((2 * i, a), (2 * i + 1, b)):
                    alone = task_influence(problem, lam, tasks, val.subset(part), EXPLICIT).scores.double()
                    torch.testing.assert_close(S[:, col], alone, rtol=1e-8, atol=1e-12 * float(alone.abs().max()))
        assert not torch.allclose(S[:, 0], S[:, 1], rtol=1e-2)  # the halves disagree: the sampling noise measured


def test_the_halves_ride_on_the_scores_own_validation_pass(quadratic, monkeypatch):
    """Told of the halves, a reuse block's first ∇f pass also sums each half's gradient: task-IF then the
    reliability make one pass over the validation pool between them (three without the block), the scores are
    bit for bit those of task-IF alone, and the split-half scores equal those from the halves' own passes.
    A plain block inside shares the outer one's memo."""
    from metainfluence.influence.gradients import measurement_gradients, reusing_measurement_gradients
    from metainfluence.influence.reliability import halves_of

    problem, lam, tasks = quadratic
    val = _val(31, 2)
    alone = task_influence(problem, lam, tasks, val, EXPLICIT)
    S_alone, _ = split_half_scores(problem, lam, tasks, val, EXPLICIT, splits=3, seed=7, s=alone.extra["s"])
    sizes = []
    original = problem.summed_loss_and_gradient_rows
    monkeypatch.setattr(problem, "summed_loss_and_gradient_rows", lambda lam_, pool, *a, **k: sizes.append(len(pool)) or original(lam_, pool, *a, **k))
    info: dict = {}
    with reusing_measurement_gradients(halves_of(val, 3, 7)):
        with reusing_measurement_gradients():
            shared = task_influence(problem, lam, tasks, val, EXPLICIT)
        S, _ = split_half_scores(problem, lam, tasks, val, EXPLICIT, splits=3, seed=7, s=shared.extra["s"], info=info)
    assert sizes == [31] and info["halves_from_scoring_pass"]
    assert torch.equal(shared.scores, alone.scores)
    torch.testing.assert_close(S, S_alone, rtol=1e-9, atol=1e-12 * float(S_alone.abs().max()))
    sizes.clear()
    split_half_scores(problem, lam, tasks, val, EXPLICIT, splits=3, seed=7, s=alone.extra["s"], info=info)
    assert sizes == [15, 15, 15] and not info["halves_from_scoring_pass"]  # outside the block: a pass per half
    # the subsets' mean gradients, one pass (unrolled) or a pass each (implicit), equal each subset's own ∇f
    parts = [[0, 3, 4], list(range(10, 31))]
    for kind in ("unrolled", "implicit"):
        p_kind, lam_kind = small_problem(kind, steps=2, lr=0.05, proximal=1.0, hidden=(3,), n_features=5,
                                         n_classes=1, loss="mse", chunk_size=4)  # rows summed over 8 chunks
        grad_f, _, rows = measurement_gradients(p_kind, lam_kind, val, parts)
        torch.testing.assert_close(grad_f, measurement_gradients(p_kind, lam_kind, val)[0], rtol=0, atol=0)
        for row, part in zip(rows, parts):
            torch.testing.assert_close(row, measurement_gradients(p_kind, lam_kind, val.subset(part))[0], rtol=1e-10, atol=1e-14)


def test_reliability_predicts_the_agreement_with_an_independent_pool_and_rises_with_its_size(quadratic):
    """Spearman–Brown from split halves estimates the correlation of the scores with those against an
    independent pool of the same size (measured directly here over 6 pairs of fresh pools), rises with
    the pool's size, and its prophecy from 128 tasks predicts the reliability at 512."""
    problem, lam, tasks = quadratic
    rec = {m: measurement_reliability(problem, lam, tasks, _val(m, 1), EXPLICIT, splits=8) for m in (8, 128, 512)}
    direct = []
    for j in range(6):
        a, b = (task_influence(problem, lam, tasks, _val(512, 100 + 2 * j + i), EXPLICIT).scores for i in (0, 1))
        direct.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    r8, r128, r512 = (rec[m]["reliability"] for m in (8, 128, 512))
    assert r8 < 0.5 < r128 < r512
    assert r512 == pytest.approx(sum(direct) / len(direct), abs=0.08)
    assert 4 * r128 / (1 + 3 * r128) == pytest.approx(r512, abs=0.08)
    # the record says what it measured and what pool would reach the target
    assert rec[512]["n_val_tasks"] == 512 and rec[512]["half_size"] == 256 and len(rec[512]["split_half_spearman"]) == 8
    need = rec[128]["val_tasks_for_target"]
    assert need > 128 and 0.9 == pytest.approx(need / 128 * r128 / (1 + (need / 128 - 1) * r128), abs=0.01)
    warning = reliability_warning(rec[128])
    assert warning is not None and f"about {need} validation tasks" in warning
    assert reliability_warning({**rec[512], "reliability": 0.95}) is None
    # no agreement at all: no pool size is named, and "nothing to rank" is said beside "more tasks"
    none = reliability_warning({**rec[128], "reliability": -0.06, "val_tasks_for_target": None})
    assert "about" not in none and "below its noise" in none and "far more validation tasks" in none


def test_bad_requests_are_refused(quadratic):
    problem, lam, tasks = quadratic
    with pytest.raises(SettingsError, match="at least 4 validation tasks"):
        measurement_reliability(problem, lam, tasks, _val(3, 1), EXPLICIT)
    with pytest.raises(SettingsError, match="task-if"):
        measurement_reliability(problem, lam, tasks, _val(8, 1), InfluenceSettings(method="tracin"))
