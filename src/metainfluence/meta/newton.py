"""Damped Newton refinement with the exact total Hessian, for small models (p up to a few thousand).

Near a minimum Newton converges quadratically, which is what leave-one-out ground truth needs:
every reduced run must reach ‖∇F‖ ≈ 0 or the optimiser's leftovers swamp the tiny Δf being measured.
Levenberg–Marquardt damping keeps steps safe where H is indefinite; each step is accepted only if F
decreases.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import DivergenceError
from ..linalg import materialize
from ..tasks.tensors import TaskTensors
from .curvature import TotalHessian
from .objective import MetaProblem


def newton_refine(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, w: torch.Tensor | None = None,
                  tol: float = 1e-9, max_iter: int = 50, damping: float = 1e-4, proximal: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Minimise F(λ; w) by damped Newton steps with the materialised exact Hessian (unrolled inner only)."""
    t0 = time.perf_counter()
    lam = lam.detach().double()
    tasks = tasks.to(dtype=torch.float64)
    eye = torch.eye(lam.numel(), dtype=lam.dtype, device=lam.device)
    centre = lam.clone()

    def value_and_gradient(x):
        # F, plus (γ/2)‖λ − λ₀‖² for the proximal response (λ₀ = the starting point)
        f, grad_ = problem.value_and_gradient(x, tasks, w)
        return f + 0.5 * proximal * ((x - centre) ** 2).sum(), grad_ + proximal * (x - centre)

    value, g = value_and_gradient(lam)
    history = [float(g.norm())]
    mu = damping
    it = 0
    for it in range(1, max_iter + 1):
        if g.norm() <= tol:
            break
        H = materialize(TotalHessian(problem, lam, tasks, "exact", w=w)) + proximal * eye
        lo = float(torch.linalg.eigvalsh(H)[0])
        # Close to a stationary point, solve ∇F = 0 by plain (lightly damped) Newton steps, which converge
        # quadratically to the NEARBY stationary point ("root"); far from it, or when that fails, shift H
        # to positive definite and descend on F ("descent").
        modes = ("root", "descent") if float(g.norm()) < 1e-3 else ("descent",)
        accepted = False
        for mode in modes:
            shift = mu if mode == "root" and lo + mu > 0 else max(mu, -lo + mu)
            for _ in range(12):
                cand = lam - torch.linalg.solve(H + shift * eye, g)
                v2, g2 = value_and_gradient(cand)
                # a root step must halve ‖∇F‖ (Newton's local rate gives far more): accepting any decrease let tiny,
                # heavily shifted steps through, whose shift then carried over until no step could show a decrease
                # (a leave-one-out run near a saddle stopped far from its minimum)
                ok = g2.norm() < 0.5 * g.norm() if mode == "root" else v2 < value
                if torch.isfinite(v2) and ok:
                    accepted = True
                    break
                shift *= 10
            if accepted:
                break
        if not accepted:
            if g.norm() < 1e-6:  # at the rounding floor of F: no step can show a decrease
                break
            raise DivergenceError(f"Newton refinement could not decrease F at iteration {it} (‖∇F‖ {float(g.norm()):.3g}, smallest "
                                  f"Hessian eigenvalue {lo:.3g}); the model is far from a minimum — train or refine longer first, or "
                                  "use method lbfgs")
        lam, value, g = cand, v2, g2
        mu = max(damping, shift / 10) if shift > mu else damping
        history.append(float(g.norm()))
    return lam, {"method": "newton", "iterations": it, "grad_norm": float(g.norm()), "history": history,
                 "converged": float(g.norm()) <= tol, "seconds": time.perf_counter() - t0}



def newton_solver(problem: MetaProblem, tasks: TaskTensors, w=None, v=None, u=None, *, hessian: str = "auto",
                  dense_max: int = 3000, cg_iters: int = 100):
    """``solve(x, g, shift) -> d`` with (H(x) + shift·I) d = g: dense below ``dense_max`` parameters
    (materialised H, Cholesky), matrix-free CG above it. ``hessian``: exact | gauss-newton | auto
    (exact where the problem has it, i.e. unrolled second-order MAML; gauss-newton otherwise).
    Raises :class:`DivergenceError` when H + shift·I is not positive definite."""
    from ..linalg import SolverSettings, cg_solve

    if hessian == "auto":
        hessian = "exact" if problem.inner.kind == "unrolled" and not problem.inner.first_order else "gauss-newton"

    def solve(x: torch.Tensor, g: torch.Tensor, shift: float) -> torch.Tensor:
        op = TotalHessian(problem, x, tasks, hessian, w=w, v=v, u=u)
        if x.numel() <= dense_max:
            H = materialize(op) + shift * torch.eye(x.numel(), dtype=x.dtype, device=x.device)
            factor, info = torch.linalg.cholesky_ex(H)
            if int(info) != 0:
                raise DivergenceError("H + shift·I is not positive definite")
            return torch.cholesky_solve(g[:, None], factor)[:, 0]
        # inexact Newton: a relative residual of min(0.5, √‖g‖) keeps the convergence superlinear
        tol = min(0.5, float(g.norm()) ** 0.5)
        return cg_solve(op, g, shift, SolverSettings(tol=tol, max_iter=cg_iters)).x

    solve.hessian = hessian  # type: ignore[attr-defined]
    return solve


def newton_minimise(evaluate, solve, x: torch.Tensor, tol: float, max_iter: int, shift: float = 1e-8,
                    show=lambda g, **_: None, out_of_time=lambda: False) -> tuple[torch.Tensor, int, str]:
    """Levenberg–Marquardt-damped Newton steps on F until ‖∇F‖ ≤ tol: the shift grows tenfold while
    H + shift·I is indefinite or the step fails, and shrinks after each full step; each step
    backtracks until F decreases (Armijo) or, at F's rounding floor, until ‖∇F‖ does.
    ``evaluate(x) -> (F, ∇F)``; returns (x, iterations, failure reason or '')."""
    f, g = evaluate(x)
    floor = shift
    it = 0
    while it < max_iter and float(g.norm()) > tol and not out_of_time():
        it += 1
        accepted = False
        for _ in range(16):
            try:
                d = solve(x, g, shift)
            except DivergenceError:
                shift = max(shift * 10, 1e-12)
                continue
            slope = float(g @ d)
            if not math.isfinite(slope) or slope <= 0:
                shift = max(shift * 10, 1e-12)
                continue
            t = 1.0
            while t >= 1e-4:
                ft, gt = evaluate(x - t * d)
                finite = bool(torch.isfinite(ft)) and bool(torch.isfinite(gt).all())
                armijo = finite and float(ft) <= float(f) - 1e-4 * t * slope
                flat = finite and float(gt.norm()) < float(g.norm()) and float(ft) <= float(f) + 1e-12 * abs(float(f))
                if armijo or flat:
                    accepted = True
                    break
                t *= 0.5
            if accepted:
                break
            shift = max(shift * 10, 1e-12)
        if not accepted:
            return x, it, "could not find a step that decreases F (H may be far from positive definite: try the gauss-newton Hessian)"
        x, f, g = x - t * d, ft, gt
        shift = max(floor, shift / 10) if t == 1.0 else shift
        show(g, step=t * float(d.norm()))
    return x, it, ""
