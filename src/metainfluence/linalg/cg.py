"""Conjugate gradient: the one CG of the library, in two forms.

* :func:`block_cg` — independent CG recursions for every right-hand side, their products taken
  together as one block (``matmat``), each column frozen once its recursive residual reaches
  ``tol``. Used by the ``cg`` solver (influence, self-influence, edits, Newton steps) and by anything
  else that solves with a total Hessian.
* :func:`fixed_step_cg` — a fixed number of steps with no data-dependent branching, so that it can
  run inside ``vmap`` and autodiff (the implicit inner solver's (∇²L_S + γI)⁻¹ and the inner solves
  of two-stage instance-IF).
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch
from torch import Tensor

from ..errors import DivergenceError
from ..progress import RateEta, bar, clock
from .core import DampedProducts, IHVPResult, SolverSettings, finish, prepare_rhs
from .operators import LinearOperator


def block_cg(products: Callable[[Tensor], Tensor], B: Tensor, tol: float, max_iter: int,
             precondition: Callable[[Tensor], Tensor] | None = None, stop_on_negative: bool = False,
             deadline: float | None = None, slow_advice: str | None = None, agree: Callable[[bool], bool] | None = None) -> tuple[Tensor, dict]:
    """Solve A X = B column by column, A symmetric positive definite reached through
    ``products(P) = A P`` on (p, k) blocks. B: (p, m). Returns X (p, m) and diagnostics:
    ``iterations_per_rhs``, ``recursive_residuals`` (‖r‖/‖b‖ when each column stopped) and
    ``converged`` (every column reached ``tol``). Columns with b = 0 get x = 0 without iterating.
    Non-positive curvature pᵀAp ≤ 0 (A indefinite) or NaN raises :class:`DivergenceError`.
    ``precondition(R) ≈ A⁻¹R`` (symmetric positive definite) turns it into preconditioned CG; the
    stopping rule stays the true recursive residual ‖r‖/‖b‖. ``stop_on_negative`` (truncated Newton):
    a column that meets pᵀAp ≤ 0 stops at its current iterate (still a descent direction) instead of
    raising; ``negative_curvature`` lists those columns. ``deadline`` (a ``time.perf_counter()`` value):
    stop between iterations once it has passed (``stopped_by`` = "time"; the iterate so far is returned).
    ``slow_advice``: when an unbounded solve's first iteration says 100 would take over :data:`SLOW_SOLVE_S`,
    a warning with that forecast and this advice (a user otherwise learns it hours later)."""
    p, m = B.shape
    X = torch.zeros_like(B)
    R = B.clone()
    Z = R if precondition is None else precondition(R)
    P = Z.clone()
    bnorm = B.norm(dim=0)
    rr = (R * Z).sum(0)
    iterations = [0] * m
    rel = [0.0 if bnorm[j] == 0 else 1.0 for j in range(m)]
    active = bnorm > 0
    # δ of DampedProducts, given its bound ``block`` method (the products themselves carry no attribute)
    damping = getattr(products, "damping", getattr(getattr(products, "__self__", None), "damping", None))
    # no total: an ETA towards max_iter would read hours where the solve stops at its tolerance in minutes;
    # the postfix carries one from the residual's own rate instead
    progress = bar(f"CG ({m} rhs)" if m > 1 else "CG", None, "it")
    trend = RateEta()
    advice = (f"raise --damping (now {damping:g}), or use a positive semi-definite Hessian (--hessian gauss-newton, or --hessian fisher "
              "--solver woodbury)" if damping is not None else "raise damping")
    negative: list[int] = []
    it = 0
    stopped_by = None
    started = time.perf_counter()
    while bool(active.any()) and it < max_iter:
        # with the pool sharded over processes every process must stop at the same iteration: ``agree`` ORs the clocks
        if deadline is not None and (agree or bool)(time.perf_counter() > deadline):
            stopped_by = "time"
            break
        it += 1
        idx = torch.nonzero(active).flatten()
        Pa = P[:, idx]
        AP = products(Pa)
        curvature = (Pa * AP).sum(0)
        if not bool(torch.isfinite(curvature).all()):
            raise DivergenceError(f"conjugate gradient met NaN/inf at iteration {it} (the HVP is not finite); check the model and loss, or raise damping")
        if bool((curvature <= 0).any()) and stop_on_negative:
            for j in idx[curvature <= 0].tolist():
                active[j] = False
                negative.append(j)
            continue  # the other columns redo this iteration (their P is unchanged)
        if bool((curvature <= 0).any()):
            # the Rayleigh quotient of H + δI along p bounds its lowest eigenvalue from above: δ must exceed this much more
            shortfall = -float((curvature / (Pa * Pa).sum(0)).min())
            need = f" (H has an eigenvalue ≤ {-shortfall - (damping or 0.0):.3g}, so damping must exceed {shortfall + (damping or 0.0):.3g})" if damping is not None else ""
            raise DivergenceError(
                f"conjugate gradient met curvature pᵀ(H+δI)p = {float(curvature.min()):.3g} ≤ 0 at iteration {it}: H+δI is indefinite{need}; {advice}"
            )
        alpha = rr[idx] / curvature
        X[:, idx] += alpha * Pa
        R[:, idx] -= alpha * AP
        Ra = R[:, idx]
        Za = Ra if precondition is None else precondition(Ra)
        rr_new = (Ra * Za).sum(0)
        rel_new = Ra.norm(dim=0) / bnorm[idx]
        if not bool(torch.isfinite(rel_new).all()):
            raise DivergenceError(f"conjugate gradient produced NaN/inf at iteration {it}; raise damping")
        done = rel_new <= tol
        P[:, idx] = Za + (rr_new / rr[idx]) * Pa
        rr[idx] = rr_new
        for j, r, d in zip(idx.tolist(), rel_new.tolist(), done.tolist()):
            iterations[j], rel[j] = it, r
            if d:
                active[j] = False
        worst = max(rel_new.tolist())
        trend.add(time.perf_counter(), worst)
        progress.set_postfix({"residual": f"{worst:.1e}", "tol": f"{tol:.0e}", "eta": clock(trend.eta(tol))}, refresh=False)
        progress.update(1)  # after the postfix, so a redraw shows this iteration's residual
        if it == 1 and slow_advice and deadline is None:
            _forecast(time.perf_counter() - started, max_iter, slow_advice)
    progress.close()
    out = {"converged": not bool(active.any()) and not negative, "iterations_per_rhs": iterations, "recursive_residuals": rel,
           "negative_curvature": negative}
    if stopped_by:
        out["stopped_by"] = stopped_by
    return X, out


SLOW_ADVICE = ("bound it with --max-minutes M (the iterate is kept; --resume SCORES continues it), or use a tier without iterations: "
               "--hessian fisher --solver woodbury (its exact inverse after one pass over the tasks) or a curvature file (docs/method.md §4)")
SLOW_SOLVE_S = 600.0  # a forecast of 100 iterations above this is said aloud


def _forecast(seconds: float, max_iter: int, advice: str) -> None:
    horizon = min(max_iter, 100)
    if seconds * horizon > SLOW_SOLVE_S:
        warnings.warn(f"CG: one iteration took {seconds:.0f} s here, so {horizon} iterations would take {clock(seconds * horizon)} "
                      f"(max_iter {max_iter}: {clock(seconds * max_iter)}); {advice}", stacklevel=3)


def cg_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """Conjugate gradient on H + δI from x = 0 for every right-hand side, ``cg_block`` of them at a
    time (one block of products per iteration). Stops each rhs at relative (recursive) residual ≤ ``tol`` or at ``max_iter``; reaching
    ``max_iter`` is not an error (``converged`` False, the true residual recorded). CG detects
    indefiniteness only when its Krylov space reaches a negative direction of H + δI; if it
    converges first, the answer is still (H + δI)⁻¹ b."""
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    products = DampedProducts(op, damping)
    X = torch.empty_like(B)
    info: dict = {"converged": True, "iterations_per_rhs": [], "recursive_residuals": []}
    blocks = range(0, B.shape[0], settings.cg_block)
    outer = bar("solves", len(blocks), "rhs") if len(blocks) > 1 else None
    for start in blocks:
        rows = slice(start, start + settings.cg_block)
        Xb, part = block_cg(products.block, B[rows].T.contiguous(), settings.tol, settings.max_iter, deadline=settings.deadline(t0),
                            slow_advice=SLOW_ADVICE if start == 0 else None, agree=getattr(op, "agree", None))  # one forecast per solve
        X[rows] = Xb.T
        if outer is not None:
            outer.update(1)  # after the block: "k/K rhs" counts the solves done
        info["converged"] = info["converged"] and part["converged"]
        if "stopped_by" in part:
            info["stopped_by"] = part["stopped_by"]
        info["iterations_per_rhs"] += part["iterations_per_rhs"]
        info["recursive_residuals"] += part["recursive_residuals"]
    if outer is not None:
        outer.close()
    return finish("cg", X, B, b, products, max(info["iterations_per_rhs"]), info, t0)


def fixed_step_cg(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int) -> Tensor:
    """``iters`` CG steps on A x = b from x = 0 without data-dependent branching (vmappable and
    differentiable); a step with pᵀAp ≤ 0 or a zero residual leaves x unchanged."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum()
    for _ in range(iters):
        ap = matvec(p)
        pap = (p * ap).sum()
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum()
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    return x


