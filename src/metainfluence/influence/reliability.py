"""How much do task-IF's scores depend on which validation tasks were drawn? (docs/method.md §5.1)

The measurement f is the mean query loss over m validation tasks, a sample of the task distribution.
score_k = ∇fᵀ(H + δI)⁻¹g_k/n is linear in ∇f = (1/m) Σ_j ∇f_j, so the score vector is itself a mean over
validation tasks and carries their sampling noise. Split the pool at random into halves A and B and
score against each (one more right-hand side per halving, as B follows from A and the full pool's
solve by linearity, one pass over the training gradients, and the halves' ∇f summed in the scores' own
∇f pass when it is told of them): the Pearson correlation r_½ of the
two score vectors is the split-half reliability, and
Spearman–Brown, r = 2r_½ / (1 + r_½), estimates the correlation of the full pool's scores with those of
an independent pool of the same size. Its prophecy r(c) = c·r / (1 + (c − 1)·r) gives the pool size for a
target reliability. It assumes independent validation tasks: where they resample a few classes (ORL's
10 validation subjects) it is optimistic about what more tasks would add.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from scipy import stats

from ..errors import SettingsError
from ..meta.objective import MetaProblem
from ..tasks.tensors import TaskTensors
from .gradients import _total_gradients, _train_pass, charged_measurement_gradient, measurement_gradient, reused_subset_gradients
from .hessian_of import build_hessian
from .results import InfluenceSettings, shortfall
from .task_if import ihvp

TARGET = 0.9  # reliability below which the scores' dependence on the validation sample is said aloud


def measurement_reliability(problem: MetaProblem, lam: torch.Tensor, train_tasks: TaskTensors, val_tasks: TaskTensors,
                            settings: InfluenceSettings, splits: int = 4, seed: int = 0, target: float = TARGET,
                            s: torch.Tensor | None = None) -> dict[str, Any]:
    """Split-half reliability of the task-IF scores under the validation sample, ``splits`` random
    halvings averaged (:func:`reliability_record` of :func:`split_half_scores`, with the seed, solve residual and time);
    ``s``: the full pool's (H + δI)⁻¹∇f under ``settings`` where already solved (task-IF's ``extra["s"]``)."""
    m = len(val_tasks)
    if splits < 1 or m < 4:
        raise SettingsError(f"the measurement's reliability needs at least 1 halving of at least 4 validation tasks (got {splits} halvings of a "
                            f"pool of {m} task{'s' if m != 1 else ''}); use more validation tasks or drop the check")
    if settings.method != "task-if":
        raise SettingsError(f"the measurement's reliability is computed for task-if, not {settings.method}")
    if problem.collective.world_size > 1:
        raise SettingsError("the measurement's reliability splits the validation pool in one process; run it without torchrun")
    return reliability_and_half_scores(problem, lam, train_tasks, val_tasks, settings, splits, seed, target, s)[0]


def reliability_and_half_scores(problem: MetaProblem, lam: torch.Tensor, train_tasks: TaskTensors, val_tasks: TaskTensors,
                                settings: InfluenceSettings, splits: int, seed: int, target: float = TARGET,
                                s: torch.Tensor | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """(the record of :func:`measurement_reliability`, without its checks; the half scores (n, 2·splits) it is built
    from, for a caller that measures each half, e.g. its detection AUC)."""
    t0, info = time.perf_counter(), {}
    S, residual = split_half_scores(problem, lam, train_tasks, val_tasks, settings, splits, seed, s=s, info=info)
    # per-task gradients read from a curvature fit's pass are charged that pass (a stand-alone time, as the scores')
    seconds = time.perf_counter() - t0 + info.get("task_gradients_reused_s", 0.0)
    return {**reliability_record(S, len(val_tasks), target), "seed": seed, "solver_residual": residual, "seconds": seconds, **info}, S


def reliability_record(S: torch.Tensor, m: int, target: float = TARGET) -> dict[str, Any]:
    """The split-half correlations of ``S`` (n, 2·splits; columns 2i, 2i + 1 the halves of split i of an
    ``m``-task pool), the Spearman–Brown reliability of the full pool and the pool size for ``target``."""
    splits = S.shape[1] // 2
    pearson = [float(torch.corrcoef(S[:, [2 * i, 2 * i + 1]].T)[0, 1]) for i in range(splits)]
    rank = [float(stats.spearmanr(S[:, 2 * i].numpy(), S[:, 2 * i + 1].numpy())[0]) for i in range(splits)]
    r_half = sum(pearson) / splits
    r = 2 * r_half / (1 + r_half) if r_half > -1 else float("nan")
    # Spearman–Brown prophecy: c·m tasks give c·r / (1 + (c − 1)·r) ≥ target
    scale = target * (1 - r) / (r * (1 - target)) if 0 < r < 1 else (1.0 if r >= 1 else math.inf)
    return {"splits": splits, "n_val_tasks": m, "half_size": m // 2, "split_half_pearson": pearson, "split_half_spearman": rank,
            "reliability": r, "target": target, "val_tasks_for_target": math.ceil(max(scale, 1.0) * m) if math.isfinite(scale) else None}


def halvings(m: int, splits: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``splits`` seeded partitions of m validation positions into halves (A, B), |A| = ⌊m/2⌋."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(splits):
        perm = torch.randperm(m, generator=gen)
        out.append((sorted(perm[: m // 2].tolist()), sorted(perm[m // 2:].tolist())))
    return out


def split_half_scores(problem: MetaProblem, lam: torch.Tensor, train_tasks: TaskTensors, val_tasks: TaskTensors,
                      settings: InfluenceSettings, splits: int, seed: int, s: torch.Tensor | None = None,
                      info: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """(n, 2·splits) task-IF scores against the halves (A, B) of :func:`halvings` (columns 2i, 2i + 1).

    Only the A halves are solved: ∇f = (|A|∇f_A + |B|∇f_B)/m, so by linearity s_B = (m·s − |A|·s_A)/|B|,
    with s = (H + δI)⁻¹∇f the full pool's solve (task-IF's ``extra["s"]``; solved here when not given).
    One block solve of ``splits`` (+1) right-hand sides and one pass over the training gradients. The ∇f_A come
    from the scores' own ∇f pass where a :func:`reusing_measurement_gradients` block was told of these halves
    (``info["halves_from_scoring_pass"]``); otherwise from ``splits`` passes over half the pool. The training gradients
    are read from a curvature fit's pass where the block kept them (``info["task_gradients_reused_s"]``)."""
    lam = lam.detach()
    m = len(val_tasks)
    parts = halves_of(val_tasks, splits, seed)[1]
    shared = reused_subset_gradients(problem, lam, val_tasks, parts)
    rows = list(shared) if shared is not None else [measurement_gradient(problem, lam, val_tasks.subset(a))[0] for a in parts]
    if info is not None:
        info["halves_from_scoring_pass"] = shared is not None
    if s is None:
        rows.append(charged_measurement_gradient(problem, lam, val_tasks, {})[0])
    op = build_hessian(problem, lam, train_tasks, settings)
    res = ihvp(op, torch.stack(rows), settings)
    X = res.x if s is not None else res.x[:-1]
    full = (s if s is not None else res.x[-1]).to(X)
    na, nb = m // 2, m - m // 2
    cols = torch.stack([v for x in X for v in (x, (m * full - na * x) / nb)], 1)  # (p, 2·splits)
    dots, _, _ = _train_pass(problem, lam, train_tasks, cols, _total_gradients, info)
    return dots.double() / problem.collective.total_count(len(train_tasks)), float(res.residual)


def halves_of(val_tasks: TaskTensors, splits: int, seed: int) -> tuple[TaskTensors, list[list[int]]]:
    """``reusing_measurement_gradients(subsets_for=...)`` for :func:`split_half_scores` of this pool, so that the
    scores' ∇f pass also sums the halves' gradients."""
    return val_tasks, [a for a, _ in halvings(len(val_tasks), splits, seed)]


def record_reliability(diagnostics: dict[str, Any], rec: dict[str, Any]) -> None:
    """Keep ``rec`` in a result's diagnostics and, below its target, say the shortfall aloud (a warning there)."""
    diagnostics["measurement_reliability"] = rec
    warning = reliability_warning(rec)
    if warning:
        shortfall(diagnostics, warning)


def reliability_warning(rec: dict[str, Any]) -> str | None:
    """The shortfall to record when the scores depend on the validation sample more than ``target`` allows."""
    r, m, target = rec["reliability"], rec["n_val_tasks"], rec["target"]
    if r >= target:
        return None
    need = rec.get("val_tasks_for_target")
    more = (f"measure on about {need} validation tasks ({need / m:.1f}× these {m}) for a reliability of {target:g}" if need
            else "the two halves' scores do not agree at all — either the tasks' effects on this measurement are below its noise "
                 "(a clean, well-fit pool may have nothing to rank: 600 harmless near-duplicates read −0.06, docs/experiments.md §1), "
                 "or the pool is far too small: measure on far more validation tasks")
    return (f"task-IF's scores depend on which validation tasks were drawn: their split-half reliability is {r:.2f} (the expected "
            f"correlation with the scores against another {m} tasks), below {target:g}; {more} — tasks from more classes, as "
            "more tasks resampling the same few classes help less")


# validation / training query loss above which, with a gap of at least OVERFIT_GAP loss units (near-perfect models have
# tiny losses whose ratio says little), the scores carry a meta-overfitting warning
OVERFIT_RATIO, OVERFIT_GAP = 5.0, 0.1


def overfit_notice(refine_report: dict | None, result: Any, checked: bool = False) -> None:
    """The training tasks' query loss (a refine report's, as JSON) against the validation tasks' (the scores'
    measurement): far apart, the meta-learner is overfit, where first-order scores track leave-one-out poorly
    (docs/experiments.md §3). ``checked``: the scores carry a fidelity check, which the warning points at."""
    train_loss = float((refine_report or {}).get("query_loss_after", float("nan")))
    val_loss = float(result.measurement)
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        return  # not refined, or refined by a version that did not record the loss: nothing to compare
    ratio = val_loss / max(train_loss, 1e-12)
    result.diagnostics["generalisation"] = {"train_query_loss": train_loss, "val_query_loss": val_loss, "ratio": ratio,
                                            "warned_above": {"ratio": OVERFIT_RATIO, "gap": OVERFIT_GAP}}
    if ratio > OVERFIT_RATIO and val_loss - train_loss > OVERFIT_GAP:
        shortfall(result.diagnostics, f"the training tasks' mean query loss at λ* is {train_loss:.3g} against {val_loss:.3g} on the validation tasks "
                                      f"({ratio:.0f}×): the meta-learner is overfit, where first-order scores can track leave-one-out poorly "
                                      "(docs/experiments.md §3) — " + ("weigh the fidelity check" if checked else "measure it with --check K")
                                      + "; --hessian gauss-newton --removal newton on a proximal refine (--refine-proximal) held up best there")
