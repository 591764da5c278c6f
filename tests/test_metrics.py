"""Evaluation metrics against closed forms, scipy/sklearn and hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from metainfluence.errors import MetaInfluenceError, SettingsError
from metainfluence.evaluation.metrics import (
    cosine,
    detection_auc,
    detection_auc_interval,
    fraction_to_count,
    harmful_first,
    lds,
    lds_predictions,
    loo_correlation,
    mean_ci,
    pearson,
    recall_at,
    recall_curve,
    spearman,
    top_fraction,
)


# --------------------------------------------------------------------------- correlations

def test_pearson_hand_value():
    # x = (1,2,3), y = (1,3,2): centred (-1,0,1)·(-1,1,0) = 1, norms √2·√2 = 2 → r = 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-15)


def test_pearson_exact_linear_and_sign():
    x = np.linspace(-2, 5, 17)
    assert pearson(x, 3 * x - 7) == pytest.approx(1.0, abs=1e-14)
    assert pearson(x, -0.1 * x + 2) == pytest.approx(-1.0, abs=1e-14)


def test_pearson_and_spearman_match_scipy_on_random_data():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = 0.4 * a + rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)


def test_spearman_perfectly_monotone_is_one():
    x = np.arange(1.0, 11.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0, abs=1e-15)
    assert spearman(x, -(x ** 3)) == pytest.approx(-1.0, abs=1e-15)
    # Pearson of a nonlinear monotone map is below 1; Spearman is not
    assert pearson(x, np.exp(x)) < 0.9


def test_spearman_ties_use_average_ranks():
    # a = (1,2,2,3) ranks (1, 2.5, 2.5, 4); b = (1,2,3,4) ranks (1,2,3,4)
    # centred: (-1.5, 0, 0, 1.5)·(-1.5,-.5,.5,1.5) = 4.5; |a| = √4.5, |b| = √5 → r = √(4.5/5) = √0.9
    a = [1, 2, 2, 3]
    b = [1, 2, 3, 4]
    assert spearman(a, b) == pytest.approx(math.sqrt(0.9), abs=1e-15)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-14)


def test_constant_input_gives_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson([1.0, 1.0, 1.0], [1, 2, 3]))
        assert math.isnan(spearman([1, 2, 3], [0.1, 0.1, 0.1]))
        assert math.isnan(loo_correlation([2, 2], [1, 3])["pearson"])


def test_torch_and_float32_inputs_are_promoted_to_float64():
    a = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float32, requires_grad=True)
    b = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    ref = stats.pearsonr(np.array([1, 2, 4, 8], float), np.array([1, 2, 3, 4], float))[0]
    assert pearson(a, b) == pytest.approx(ref, abs=1e-12)
    assert spearman(a * 2, torch.tensor([1, 2, 3, 4])) == pytest.approx(1.0, abs=1e-15)


def test_loo_correlation_fields():
    out = loo_correlation(np.array([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.2, -0.5, 0.4, 0.1], dtype=torch.float64))
    assert set(out) == {"pearson", "spearman", "n"}
    assert out["n"] == 4
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(stats.pearsonr([0.1, -0.2, 0.3, 0.0], [0.2, -0.5, 0.4, 0.1])[0], abs=1e-12)


def test_cosine_parallel_orthogonal_antiparallel_and_rows():
    v = np.array([1.0, 2.0, -3.0])
    assert cosine(v, 5 * v) == pytest.approx(1.0, abs=1e-15)
    assert cosine(v, -v) == pytest.approx(-1.0, abs=1e-15)
    assert cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert cosine([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    rows = cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), np.array([[3.0, 0.0], [-1.0, 1.0]]))
    assert isinstance(rows, np.ndarray) and rows.shape == (2,)
    np.testing.assert_allclose(rows, [1.0, 0.0], atol=1e-15)


def test_cosine_scale_robust_and_zero_vector_nan():
    tiny = np.array([3e-200, 4e-200])
    assert cosine(tiny, np.array([3.0, 4.0])) == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(cosine([0.0, 0.0], [1.0, 2.0]))


# --------------------------------------------------------------------------- LDS

def test_lds_predictions_hand_example():
    scores = np.array([0.5, -1.0, 2.0])
    mask = np.array([[True, True, True],     # nothing removed → f_full
                     [False, True, True],    # remove item 0 → 10 + 0.5
                     [True, False, False],   # remove 1, 2 → 10 - 1 + 2
                     [False, False, False]])  # remove all → 10 + 1.5
    np.testing.assert_allclose(lds_predictions(scores, 10.0, mask), [10.0, 10.5, 11.0, 11.5], atol=0)
    # torch inputs and 0/1 masks behave the same
    np.testing.assert_allclose(lds_predictions(torch.tensor(scores), torch.tensor(10.0), mask.astype(int)), [10.0, 10.5, 11.0, 11.5])


def test_lds_is_spearman_across_subsets():
    rng = np.random.default_rng(1)
    n, m = 12, 30
    scores = rng.normal(size=n)
    mask = rng.random((m, n)) < 0.5
    pred = lds_predictions(scores, 1.0, mask)
    # ground truth that is an exact additive model of the scores (up to a monotone map) → LDS 1
    assert lds(pred, np.exp(pred)) == pytest.approx(1.0)
    noisy = pred + rng.normal(scale=0.5, size=m)
    assert lds(pred, noisy) == pytest.approx(stats.spearmanr(pred, noisy)[0], abs=1e-12)


def test_lds_prediction_shape_errors():
    with pytest.raises(SettingsError, match="columns"):
        lds_predictions([1.0, 2.0], 0.0, np.ones((3, 3), bool))
    with pytest.raises(SettingsError, match="M subsets"):
        lds_predictions([1.0, 2.0], 0.0, np.ones(2, bool))
    with pytest.raises(SettingsError, match="booleans"):
        lds_predictions([1.0, 2.0], 0.0, np.full((1, 2), 0.5))
    with pytest.raises(SettingsError, match="NaN"):
        lds_predictions([1.0, 2.0], float("nan"), np.ones((1, 2), bool))


# --------------------------------------------------------------------------- mislabeled detection

def _corrupted(n=20, k=5):
    flags = np.zeros(n, bool)
    flags[[3, 7, 11, 12, 19][:k]] = True
    return flags


def test_recall_curve_perfect_ranking_reaches_one_exactly_at_corrupted_fraction():
    flags = _corrupted()
    ranking = np.concatenate([np.flatnonzero(flags), np.flatnonzero(~flags)])
    fr, rec = recall_curve(ranking, flags)
    assert fr.shape == rec.shape == (21,)
    np.testing.assert_allclose(fr, np.arange(21) / 20)
    first_one = fr[np.argmax(rec >= 1.0)]
    assert first_one == pytest.approx(0.25)
    assert rec[4] == pytest.approx(0.8)  # 4 of 5 found after 4 items
    assert recall_at(ranking, flags, 0.25) == 1.0
    assert recall_at(ranking, flags, 0.2) == pytest.approx(0.8)


def test_recall_curve_worst_ranking_reaches_one_only_at_the_end():
    flags = _corrupted()
    ranking = np.concatenate([np.flatnonzero(~flags), np.flatnonzero(flags)])
    fr, rec = recall_curve(ranking, flags)
    assert np.all(rec[:16] == 0.0)
    assert np.all(rec[:-1] < 1.0) and rec[-1] == 1.0
    assert recall_at(ranking, flags, 0.75) == 0.0


def test_recall_curve_custom_fractions_and_monotone():
    flags = _corrupted()
    ranking = np.random.default_rng(0).permutation(20)
    fr, rec = recall_curve(torch.tensor(ranking), flags.astype(int), fractions=[0.0, 0.1, 0.5, 1.0])
    np.testing.assert_allclose(fr, [0.0, 0.1, 0.5, 1.0])
    assert rec[0] == 0.0 and rec[-1] == 1.0
    assert np.all(np.diff(rec) >= 0)
    # hand count: recall after the first 10 items
    assert rec[2] == pytest.approx(flags[ranking[:10]].sum() / 5)


def test_harmful_first_ranking_feeds_recall():
    # corrupted items get the most negative scores (harmful) → harmful-first finds them first
    scores = np.array([0.3, -2.0, 0.1, -1.5, 0.2])
    flags = np.array([0, 1, 0, 1, 0], bool)
    np.testing.assert_array_equal(harmful_first(scores), [1, 3, 2, 4, 0])
    assert recall_at(harmful_first(scores), flags, 0.4) == 1.0


def test_recall_bad_inputs():
    flags = _corrupted()
    with pytest.raises(SettingsError, match="permutation"):
        recall_curve(np.arange(19), flags)
    with pytest.raises(SettingsError, match="permutation"):
        recall_curve(np.r_[np.arange(19), 0], flags)
    with pytest.raises(SettingsError, match="no item"):
        recall_curve(np.arange(20), np.zeros(20, bool))
    with pytest.raises(SettingsError, match="outside"):
        recall_at(np.arange(20), flags, 1.5)
    with pytest.raises(SettingsError, match="0 and 1"):
        recall_curve(np.arange(3), [0, 2, 1])
    with pytest.raises(SettingsError, match="integer"):
        recall_curve(np.array([0.5, 1.0, 2.0]), [0, 1, 1])


def test_detection_auc_perfect_reversed_random():
    flags = _corrupted()
    suspicion = flags.astype(float) + np.linspace(0, 0.1, 20)
    assert detection_auc(suspicion, flags) == 1.0
    assert detection_auc(-suspicion, flags) == 0.0
    rng = np.random.default_rng(1234)
    big = rng.random(4000) < 0.3
    auc = detection_auc(rng.normal(size=4000), big)
    assert abs(auc - 0.5) < 0.03


def test_detection_auc_interval_covers_the_auc_and_narrows_with_more_items():
    flags = _corrupted()
    perfect = flags.astype(float) + np.linspace(0, 0.1, 20)
    assert detection_auc_interval(perfect, flags) == (1.0, 1.0)  # every resample stays perfectly separated
    rng = np.random.default_rng(7)
    true_auc = 0.7602  # scores N(1, 1) against N(0, 1): Φ(1/√2)
    covered, widths = 0, {}
    for rep in range(100):  # coverage of the true AUC over fresh draws of 100 items (20 corrupted)
        y = np.arange(100) < 20
        s = rng.normal(size=100) + 1.0 * y
        lo, hi = detection_auc_interval(s, y, n_boot=400, seed=rep)
        assert lo <= detection_auc(s, y) <= hi
        covered += lo <= true_auc <= hi
        widths.setdefault(100, hi - lo)
    assert 85 <= covered <= 100, covered
    y = np.arange(1000) < 200
    s = rng.normal(size=1000) + 1.0 * y
    lo, hi = detection_auc_interval(s, y, n_boot=400)
    assert hi - lo < 0.5 * widths[100]  # the interval shrinks like 1/√n (10× the items: ≈ 0.32× the width)
    assert detection_auc_interval(s, y) == detection_auc_interval(s, y)  # seeded
    with pytest.raises(SettingsError, match="corrupted and clean"):
        detection_auc_interval(np.zeros(3), [1, 1, 1])


def test_detection_auc_ties_and_sklearn_agreement():
    # all tied → every positive/negative pair counts 1/2
    assert detection_auc(np.zeros(6), [1, 0, 1, 0, 0, 0]) == 0.5
    # hand example: positives score (2, 1), negatives (1, 0): pairs (2>1)(2>0)(1=1)(1>0) → 3.5/4
    assert detection_auc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.875)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    s = np.round(rng.normal(size=200), 1)  # many ties
    y = rng.random(200) < 0.4
    assert detection_auc(s, y) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)


def test_detection_auc_needs_both_classes():
    with pytest.raises(SettingsError, match="corrupted and clean"):
        detection_auc([1.0, 2.0], [True, True])
    with pytest.raises(SettingsError, match="entries"):
        detection_auc([1.0, 2.0, 3.0], [True, False])


# --------------------------------------------------------------------------- tables and selection

def test_mean_ci_hand_computation():
    # values 1,2,3,4: mean 2.5, sd (ddof=1) = √(5/3), half width 1.96·√(5/3)/2
    mean, half = mean_ci([1, 2, 3, 4])
    assert mean == 2.5
    assert half == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, abs=1e-15)
    m1, h1 = mean_ci(torch.tensor([0.7]))
    assert m1 == pytest.approx(0.7) and math.isnan(h1)
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(SettingsError, match="no values"):
        mean_ci([])


def test_harmful_first_ascending_and_stable():
    s = [0.0, -1.0, 2.0, -1.0, 0.5]
    np.testing.assert_array_equal(harmful_first(s), [1, 3, 0, 4, 2])
    assert harmful_first(torch.tensor(s)).dtype == np.int64


def test_top_fraction_counts_and_direction():
    s = np.array([0.0, -1.0, 2.0, -3.0, 0.5, 1.0, -0.5, 4.0, 3.0, -2.0])
    np.testing.assert_array_equal(top_fraction(s, 0.4), [3, 9, 1, 6])
    np.testing.assert_array_equal(top_fraction(s, 0.2, harmful=False), [7, 8])
    assert top_fraction(s, 0.0).size == 0
    assert top_fraction(s, 1.0).size == 10
    # count = fraction·n rounded half up, as the label corruption does
    assert fraction_to_count(0.25, 10) == 3 and fraction_to_count(0.24, 10) == 2
    assert fraction_to_count(0.4, 7) == 3 and fraction_to_count(0.3, 10) == 3
    with pytest.raises(SettingsError, match="outside"):
        top_fraction(s, -0.1)


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("fn", [pearson, spearman, loo_correlation, lds])
def test_correlations_reject_bad_inputs(fn):
    with pytest.raises(SettingsError, match="NaN"):
        fn([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(SettingsError, match="3 entries but"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(SettingsError, match="1-D"):
        fn(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(SettingsError, match="at least 2"):
        fn([1.0], [2.0])
    with pytest.raises(SettingsError, match="dtype"):
        fn(["a", "b"], [1.0, 2.0])


def test_errors_are_one_line_metainfluence_errors():
    with pytest.raises(MetaInfluenceError) as info:
        cosine(np.ones(3), np.ones(4))
    assert "\n" not in str(info.value)
    with pytest.raises(SettingsError, match="inf"):
        cosine([1.0, float("inf")], [1.0, 2.0])
    with pytest.raises(SettingsError, match="NaN"):
        harmful_first([float("nan"), 1.0])
