"""Evaluation metrics: correlations with ground truth, LDS, mislabeled detection, confidence intervals.

Shape conventions (all functions):

* ``scores``, ``true_delta``, ``suspicion_scores``, ``values``: 1-D, one entry per item (task or
  example), length ``n``. Numpy arrays, torch tensors (any device, detached here) and lists are
  accepted; everything is converted to ``float64`` numpy before computing.
* ``is_corrupted``: 1-D boolean (or 0/1) of length ``n``, True = the item was corrupted.
* ``ranking``: 1-D integer item ids in inspection order (most suspicious first); a permutation of
  ``0..n-1``.
* ``subsets_mask``: 2-D boolean ``(M, n)``, one row per subset, True = the item is **kept**.

Sign convention (docs/method.md §5): a score is the predicted change of the measurement f when the item is
removed. score > 0: the item helps; score < 0: the item harms. Harmful-first ranking sorts ascending.

Fractions of a pool become counts by rounding half up, ``floor(fraction·n + 0.5)``, the same rule
the label corruption uses, so inspecting exactly the corrupted fraction inspects exactly as many
items as were corrupted.

Bad inputs (NaN or inf, mismatched lengths, wrong rank, ids out of range) raise
:class:`~metainfluence.errors.SettingsError` with a one-line message. A correlation of a constant
input is undefined and returned as NaN (no exception, no warning).

Correlations come from :mod:`scipy.stats` (``pearsonr``, ``spearmanr``) and the ROC AUC from
:func:`sklearn.metrics.roc_auc_score`; this module adds the input checks and what is specific to
influence evaluation (LDS predictions, recall after inspecting a fraction of the pool, selection).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import stats

from ..errors import SettingsError

__all__ = [
    "pearson",
    "spearman",
    "cosine",
    "loo_correlation",
    "lds",
    "lds_predictions",
    "recall_curve",
    "recall_at",
    "detection_auc",
    "mean_ci",
    "harmful_first",
    "top_fraction",
    "fraction_to_count",
]

_Z95 = 1.96


# ---------------------------------------------------------------------------------------------
# input conversion
# ---------------------------------------------------------------------------------------------

def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if getattr(x, "dtype", None) is not None and "bfloat16" in str(x.dtype):
            x = x.float()
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} is not array-like; pass a numpy array, a torch tensor or a list of numbers") from None
    return arr


def _as_float(x: Any, name: str, ndim: int | tuple[int, ...] = 1) -> np.ndarray:
    """``x`` as a finite float64 array of the given rank (1 by default)."""
    arr = _to_numpy(x, name)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise SettingsError(f"{name} has shape {tuple(arr.shape)}; pass a {want} array")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise SettingsError(f"{name} has dtype {arr.dtype}; pass numbers")
    if np.iscomplexobj(arr):
        raise SettingsError(f"{name} is complex; pass real numbers")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise SettingsError(f"{name} contains {bad} NaN or inf value(s); remove or recompute them first")
    return arr


def _as_bool(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise SettingsError(f"{name} has shape {tuple(arr.shape)}; pass a 1-D boolean array (True = corrupted)")
    if arr.dtype == np.bool_:
        return arr
    if arr.size and (not np.issubdtype(arr.dtype, np.number) or not np.all(np.isin(arr, (0, 1)))):
        raise SettingsError(f"{name} must hold booleans or 0/1; got values other than 0 and 1")
    return arr.astype(bool)


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise SettingsError(f"{name_a} has {a.shape[0]} entries but {name_b} has {b.shape[0]}; pass one value per item in both")


def _check_fraction(fraction: Any, name: str = "fraction") -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={fraction!r} is not a number; use a fraction in [0, 1]") from None
    if math.isnan(f) or not 0.0 <= f <= 1.0:
        raise SettingsError(f"{name}={fraction!r} is outside [0, 1]; use a fraction in [0, 1]")
    return f


def fraction_to_count(fraction: float, n: int) -> int:
    """Number of items in ``fraction`` of ``n``: ``floor(fraction·n + 0.5)`` (round half up)."""
    f = _check_fraction(fraction)
    return min(n, int(math.floor(f * n + 0.5 + 1e-9)))


def _check_ranking(ranking: Any, n: int) -> np.ndarray:
    arr = _to_numpy(ranking, "ranking")
    if arr.ndim != 1:
        raise SettingsError(f"ranking has shape {tuple(arr.shape)}; pass a 1-D array of item ids, most suspicious first")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise SettingsError("ranking must hold integer item ids; pass e.g. harmful_first(scores)")
    ids = arr.astype(np.int64)
    if ids.shape[0] != n or not np.array_equal(np.sort(ids), np.arange(n)):
        raise SettingsError(f"ranking must be a permutation of the {n} item ids 0..{n - 1}; pass every item exactly once")
    return ids


# ---------------------------------------------------------------------------------------------
# correlations
# ---------------------------------------------------------------------------------------------

def _pair(a: Any, b: Any, name_a: str = "a", name_b: str = "b") -> tuple[np.ndarray, np.ndarray]:
    x = _as_float(a, name_a)
    y = _as_float(b, name_b)
    _same_length(x, y, name_a, name_b)
    if x.shape[0] < 2:
        raise SettingsError(f"a correlation needs at least 2 items, got {x.shape[0]}; pass more items")
    return x, y


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    """``fn`` (scipy's pearsonr or spearmanr) of two checked arrays; NaN for a constant input, without
    scipy's warning (the documented behaviour here)."""
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        return float(fn(x, y).statistic)


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two 1-D arrays of equal length (≥ 2), computed in float64
    (``scipy.stats.pearsonr``).

    Returns NaN when either input is constant (the correlation is undefined there).
    """
    x, y = _pair(a, b)
    return _correlation(stats.pearsonr, x, y)


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties given their average rank
    (``scipy.stats.spearmanr``). Returns NaN when either input is constant.
    """
    x, y = _pair(a, b)
    return _correlation(stats.spearmanr, x, y)


def cosine(a: Any, b: Any) -> float | np.ndarray:
    """Cosine similarity of predicted and true parameter changes Δλ.

    ``a`` and ``b`` are both vectors ``(d,)`` → a float, or both matrices ``(m, d)`` → an array of
    ``m`` row-wise cosines. A zero vector has no direction: its cosine is NaN.
    """
    x = _as_float(a, "a", (1, 2))
    y = _as_float(b, "b", (1, 2))
    if x.shape != y.shape:
        raise SettingsError(f"a has shape {x.shape} but b has shape {y.shape}; pass vectors (d,) or row matrices (m, d) of the same shape")
    if x.shape[-1] == 0:
        raise SettingsError("cosine of empty vectors is undefined; pass vectors with at least one entry")
    x2 = np.atleast_2d(x)
    y2 = np.atleast_2d(y)
    # rescale each row by its largest entry first so the norms neither overflow nor underflow
    sx = np.max(np.abs(x2), axis=1, keepdims=True)
    sy = np.max(np.abs(y2), axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        xs = x2 / np.where(sx == 0, 1.0, sx)
        ys = y2 / np.where(sy == 0, 1.0, sy)
        num = np.sum(xs * ys, axis=1)
        den = np.linalg.norm(xs, axis=1) * np.linalg.norm(ys, axis=1)
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    out = np.clip(out, -1.0, 1.0)
    return float(out[0]) if x.ndim == 1 else out


def loo_correlation(scores: Any, true_delta: Any) -> dict[str, float | int]:
    """Agreement of predicted scores with leave-one-out truth (docs/method.md §10).

    ``scores[k]`` is the predicted change of f when item k is removed and ``true_delta[k]`` the
    measured f(λ_{−k}) − f(λ_ctrl); both share the sign convention, so a good method has positive
    correlations. Returns ``{"pearson", "spearman", "n"}``.
    """
    x, y = _pair(scores, true_delta, "scores", "true_delta")
    return {"pearson": _correlation(stats.pearsonr, x, y),
            "spearman": _correlation(stats.spearmanr, x, y),
            "n": int(x.shape[0])}


def lds_predictions(scores: Any, f_full: float, subsets_mask: Any) -> np.ndarray:
    """Predicted measurement of each subset (docs/method.md §10): f(subset) = f_full + Σ_{k ∉ subset} score_k.

    ``scores``: (n,), ``f_full``: f(λ*) on the full pool, ``subsets_mask``: (M, n) bool with
    True = item kept. Returns (M,) float64.
    """
    s = _as_float(scores, "scores")
    f0 = _as_float(f_full, "f_full", 0)
    mask = _to_numpy(subsets_mask, "subsets_mask")
    if mask.ndim != 2:
        raise SettingsError(f"subsets_mask has shape {tuple(mask.shape)}; pass (M subsets, n items) booleans, True = kept")
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.number) or not np.all(np.isin(mask, (0, 1))):
            raise SettingsError("subsets_mask must hold booleans or 0/1 (True = item kept in the subset)")
        mask = mask.astype(bool)
    if mask.shape[1] != s.shape[0]:
        raise SettingsError(f"subsets_mask has {mask.shape[1]} columns but scores has {s.shape[0]} entries; pass one column per item")
    removed = (~mask).astype(np.float64)
    return float(f0) + removed @ s


def lds(predicted_subset_values: Any, true_subset_values: Any) -> float:
    """Linear datamodeling score (docs/method.md §10): Spearman correlation across subsets between the
    predicted measurements (see :func:`lds_predictions`) and those measured after refining on each
    subset. NaN when either side is constant.
    """
    x, y = _pair(predicted_subset_values, true_subset_values, "predicted_subset_values", "true_subset_values")
    return _correlation(stats.spearmanr, x, y)


# ---------------------------------------------------------------------------------------------
# mislabeled detection
# ---------------------------------------------------------------------------------------------

def recall_curve(ranking: Any, is_corrupted: Any, fractions: Sequence[float] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of corrupted items found after inspecting a fraction of the pool in ``ranking`` order.

    ``fractions`` defaults to every count: 0, 1/n, …, 1. A fraction becomes a count by rounding half
    up (:func:`fraction_to_count`). Returns ``(fractions, recall)``, both float64 of equal length.
    A perfect ranking reaches recall 1 exactly at the corrupted fraction.
    """
    corrupted = _as_bool(is_corrupted, "is_corrupted")
    n = corrupted.shape[0]
    ids = _check_ranking(ranking, n)
    total = int(corrupted.sum())
    if total == 0:
        raise SettingsError("is_corrupted marks no item as corrupted, so recall is undefined; pass the recorded corruption flags")
    if fractions is None:
        fr = np.arange(n + 1, dtype=np.float64) / n
    else:
        fr = _as_float(fractions, "fractions")
        for f in fr:
            _check_fraction(f, "fractions")
    found = np.concatenate([[0], np.cumsum(corrupted[ids])])
    counts = np.array([fraction_to_count(f, n) for f in fr], dtype=np.int64)
    return fr, found[counts] / total


def recall_at(ranking: Any, is_corrupted: Any, fraction: float) -> float:
    """Recall of corrupted items after inspecting ``fraction`` of the pool in ``ranking`` order."""
    _, r = recall_curve(ranking, is_corrupted, [_check_fraction(fraction)])
    return float(r[0])


def detection_auc(suspicion_scores: Any, is_corrupted: Any) -> float:
    """ROC AUC of separating corrupted items by ``suspicion_scores`` (higher = more suspicious),
    ``sklearn.metrics.roc_auc_score``: the probability that a random corrupted item scores above a
    random clean one, ties counting one half. For influence scores, where harmful items are negative,
    pass ``-scores``. Needs at least one corrupted and one clean item.
    """
    from sklearn.metrics import roc_auc_score  # imported here: it adds about a second to `import metainfluence`

    s = _as_float(suspicion_scores, "suspicion_scores")
    corrupted = _as_bool(is_corrupted, "is_corrupted")
    _same_length(s, corrupted, "suspicion_scores", "is_corrupted")
    pos = int(corrupted.sum())
    neg = int(corrupted.shape[0] - pos)
    if pos == 0 or neg == 0:
        raise SettingsError(f"AUC needs corrupted and clean items, got {pos} corrupted and {neg} clean; pass the recorded corruption flags")
    return float(roc_auc_score(corrupted, s))


def detection_auc_interval(suspicion_scores: Any, is_corrupted: Any, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of :func:`detection_auc` under a stratified bootstrap: corrupted and clean items
    are resampled separately (each resample keeps both groups' sizes), so a table of 16 corrupted tasks
    says how far its AUC could move with another draw of them. Seeded: the same input gives the same interval."""
    s = _as_float(suspicion_scores, "suspicion_scores")
    corrupted = _as_bool(is_corrupted, "is_corrupted")
    _same_length(s, corrupted, "suspicion_scores", "is_corrupted")
    pos, neg = s[corrupted], s[~corrupted]
    if len(pos) == 0 or len(neg) == 0:
        raise SettingsError(f"AUC needs corrupted and clean items, got {len(pos)} corrupted and {len(neg)} clean; pass the recorded corruption flags")
    if not 0 < level < 1 or n_boot < 1:
        raise SettingsError(f"need 0 < level < 1 and n_boot ≥ 1, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    aucs = []
    chunk = max(1, 4_000_000 // (len(pos) * len(neg)))  # bounds the comparison array's memory on large pools
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        p = pos[rng.integers(0, len(pos), (b, len(pos)))][:, :, None]
        q = neg[rng.integers(0, len(neg), (b, len(neg)))][:, None, :]
        aucs.append(((p > q) + 0.5 * (p == q)).mean(axis=(1, 2)))
    a = np.concatenate(aucs)
    return float(np.quantile(a, (1 - level) / 2)), float(np.quantile(a, (1 + level) / 2))


# ---------------------------------------------------------------------------------------------
# tables and selection
# ---------------------------------------------------------------------------------------------

def mean_ci(values: Any) -> tuple[float, float]:
    """Mean and 95% half-width ``1.96·sd/√n`` (sd with ddof=1) of e.g. per-task accuracies.

    With a single value the half-width is NaN (the spread is unknown).
    """
    v = _as_float(values, "values")
    n = v.shape[0]
    if n == 0:
        raise SettingsError("mean_ci got no values; pass at least one (e.g. one accuracy per test task)")
    mean = float(v.mean())
    if n == 1:
        return mean, float("nan")
    return mean, float(_Z95 * v.std(ddof=1) / math.sqrt(n))


def harmful_first(scores: Any) -> np.ndarray:
    """Item ids ordered most harmful first: ascending score (docs/method.md §5), ties kept in id order."""
    s = _as_float(scores, "scores")
    return np.argsort(s, kind="stable").astype(np.int64)


def top_fraction(scores: Any, fraction: float, harmful: bool = True) -> np.ndarray:
    """Ids of the ``fraction`` most harmful items (lowest scores), or most helpful with ``harmful=False``.

    The count is ``fraction·n`` rounded half up; order is most extreme first, ties by id.
    """
    s = _as_float(scores, "scores")
    k = fraction_to_count(fraction, s.shape[0])
    order = np.argsort(s if harmful else -s, kind="stable").astype(np.int64)
    return order[:k]
