"""The truncated Neumann series of the paper and its stochastic form LiSSA, with the power
iteration that picks their scale (one product per term; see :func:`neumann_solve`)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import DivergenceError, SettingsError
from ..progress import bar
from .core import _EPS_FLOOR, DampedProducts, IHVPResult, SolverSettings, finish, prepare_rhs, seeded_randn
from .operators import LinearOperator


def _power(hvp: DampedProducts, op: LinearOperator, iters: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    v = seeded_randn(op.dim, op, g)
    v = v / v.norm()
    est = 0.0
    for _ in range(iters):
        w = hvp(v)
        norm = w.norm().item()
        if not math.isfinite(norm):
            raise DivergenceError("power iteration met a non-finite HVP; check the model and loss for NaN before solving")
        if norm == 0:
            break
        est = max(est, norm)
        v = w / norm
    return est


def power_iteration(op: LinearOperator, damping: float = 0.0, iters: int = 50, seed: int = 0) -> float:
    """Estimate of the largest |eigenvalue| of H + δI: ‖(H+δI)v‖ after ``iters`` normalised steps.

    The estimates ‖A^{t+1}v‖/‖A^t v‖ increase with t towards |λ|_max and never exceed it, so callers
    multiply by a safety factor.
    """
    return _power(DampedProducts(op, damping), op, iters, seed)


def _scale(hvp: DampedProducts, op: LinearOperator, settings: SolverSettings) -> tuple[float, dict[str, Any]]:
    if settings.neumann_scale is not None:
        return settings.neumann_scale, {"scale": settings.neumann_scale, "scale_from": "settings"}
    est = _power(hvp, op, settings.power_iters, settings.seed)
    if est == 0:
        raise DivergenceError("H+δI is zero on the power-iteration vector, so no Neumann scale exists; raise --damping or use --solver cg")
    s = settings.scale_safety * est
    return s, {"scale": s, "scale_from": "power_iteration", "power_estimate": est}


def _neumann_one(
    b: Tensor,
    apply: Callable[[Tensor], Tensor],
    s: float,
    settings: SolverSettings,
    solver: str,
    damping: float,
) -> tuple[Tensor, int, bool, float]:
    """x_{t+1} = b + (I − A_t/s) x_t from x_0 = b; returns (x_J / s, J, converged, last relative change).

    With a deterministic A the update norms ‖(I − A/s)^t b‖ form a log-convex sequence (a sum of
    exponentials in t), so they decrease monotonically iff the series converges: a run of
    ``divergence_patience`` consecutive increases means an eigenvalue of I − A/s outside (−1, 1).
    """
    bnorm = b.norm().item()
    if bnorm == 0:
        return torch.zeros_like(b), 0, True, 0.0
    floor = max(settings.tol, _EPS_FLOOR * torch.finfo(b.dtype).eps)
    blowup = bnorm / torch.finfo(b.dtype).eps
    x = b.clone()
    prev, grew, rel = math.inf, 0, math.inf
    advice = f"raise damping (now {damping:g}) or neumann_scale (now {s:.4g}), or use solver='cg'"
    progress = bar(solver, settings.neumann_depth, "term")
    for t in range(1, settings.neumann_depth + 1):
        progress.update(1)
        step = b - apply(x) / s
        x = x + step
        change, xnorm = step.norm().item(), x.norm().item()
        if not (math.isfinite(change) and math.isfinite(xnorm)):
            raise DivergenceError(f"{solver} produced NaN/inf after {t} steps; {advice}")
        if xnorm > blowup:
            raise DivergenceError(f"{solver} diverged: ‖x‖/‖b‖ passed 1/eps after {t} steps (H+δI may be indefinite); {advice}")
        grew = grew + 1 if change > prev else 0
        if grew >= settings.divergence_patience:
            raise DivergenceError(
                f"{solver} diverged: the update grew for {grew} consecutive steps (after {t}), so H+δI has a negative eigenvalue "
                f"or the scale is below λ_max; {advice}"
            )
        prev = change
        rel = change / xnorm if xnorm > 0 else math.inf
        if rel <= floor:
            progress.close()
            return x / s, t, True, rel
    progress.close()
    return x / s, settings.neumann_depth, False, rel


def neumann_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """The paper's truncated Neumann series, scaled to converge (docs/method.md §4).

    x ← b + (I − (H+δI)/s) x, answer x/s, with s = ``neumann_scale`` or scale_safety × |λ|_max from
    power iteration. Stops when ‖Δx‖/‖x‖ ≤ tol (then the error is about κ·tol, κ the condition number
    of H+δI: the residual records it) or at depth J = ``neumann_depth``, which is not an error.
    """
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    hvp = DampedProducts(op, damping)
    s, info = _scale(hvp, op, settings)
    xs, its, conv, changes = [], [], [], []
    for row in B:
        x, it, ok, rel = _neumann_one(row, hvp, s, settings, "neumann", damping)
        xs.append(x)
        its.append(it)
        conv.append(ok)
        changes.append(rel)
    info.update(converged=all(conv), depth_per_rhs=its, relative_changes=changes)
    return finish("neumann", torch.stack(xs), B, b, hvp, max(its), info, t0)


def lissa_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """LiSSA: the Neumann recursion with each HVP estimated on ``lissa_batch`` random tasks.

    Each of ``lissa_repeats`` independent recursions (seeded) runs to depth J (or to the change
    tolerance, which subset noise usually prevents); their answers are averaged. Since the subset
    HVPs are unbiased and independent of the iterate, E[x_J] is the Neumann partial sum. With
    ``lissa_batch`` None or equal to ``n_tasks`` the full HVP is used and the result is exactly
    ``neumann``'s (repeats are then identical and run once). The scale s comes from power iteration
    on the full H; a subset's HVP can have larger eigenvalues, which may make the recursion diverge
    (detected) — then set a larger ``neumann_scale``.
    """
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    n = getattr(op, "n_tasks", None)
    if not callable(getattr(op, "matvec_subset", None)) or not isinstance(n, int) or n < 1:
        raise SettingsError("lissa needs an operator with n_tasks and matvec_subset (per-task HVPs); use --solver neumann or cg")
    batch = n if settings.lissa_batch is None else settings.lissa_batch
    if batch > n:
        raise SettingsError(f"lissa_batch = {batch} exceeds the {n} tasks of the operator; set lissa_batch ≤ {n}")
    hvp = DampedProducts(op, damping)
    s, info = _scale(hvp, op, settings)
    full = batch == n
    repeats = 1 if full else settings.lissa_repeats
    g = torch.Generator().manual_seed(settings.seed)

    def subset_hvp(v: Tensor) -> Tensor:
        idx = torch.randperm(n, generator=g)[:batch].to(op.device)
        return hvp.subset(v, idx)

    apply = hvp if full else subset_hvp
    xs, its, conv = [], [], []
    for row in B:
        acc = torch.zeros_like(row)
        row_its, row_conv = 0, True
        for _ in range(repeats):
            x, it, ok, _ = _neumann_one(row, apply, s, settings, "lissa", damping)
            acc += x
            row_its = max(row_its, it)
            row_conv = row_conv and ok
        xs.append(acc / repeats)
        its.append(row_its)
        conv.append(row_conv)
    info.update(converged=all(conv), depth_per_rhs=its, lissa_batch=batch, lissa_repeats=repeats, n_tasks=n)
    return finish("lissa", torch.stack(xs), B, b, hvp, max(its), info, t0)


