"""Matrix-free Newton–CG refine on Gauss–Newton products, preconditioned by a curvature artifact
(docs/method.md §2, method ``newton-cg``).

Each outer step solves (H + δI) d = −∇F by (preconditioned) CG to a relative residual η_k and takes
the step if F agrees with the model; H is the Gauss–Newton total Hessian by default (positive
semi-definite, so CG never meets negative curvature and a Nyström sketch of it exists).

Step control is Levenberg–Marquardt, not a line search: a step d(δ) is accepted when the actual
decrease of F is a fair share of the decrease the quadratic model predicted (ρ ≥ 0.01), δ shrinks
after good agreement and grows after a rejection. On a non-convex meta-objective Gauss–Newton
misjudges F far from λ*; the δ carried over from step to step then sets the step scale once,
instead of a backtracking search rediscovering it every iteration, a larger δ also makes
H + δI better conditioned (fewer CG iterations on exactly the steps that are least trusted), and
near λ* δ falls to its floor so the steps become plain Gauss–Newton steps. The predicted decrease
costs no product: for a CG iterate dᵀ(H + δI)d = −∇Fᵀd (the residual is orthogonal to d).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import DivergenceError
from ..linalg import FactorCurvature, adaptive_nystrom_sketch, block_cg, nystrom_preconditioner, nystrom_sketch
from ..linalg.core import DampedProducts
from ..tasks.tensors import TaskTensors
from .curvature import TotalHessian, fisher_factor, gauss_newton_factor
from .ekfac import fit_ekfac
from .objective import MetaProblem

DAMPING_FLOOR = 1e-10  # below this δ is set to 0 (μI already makes the Gauss–Newton matrix positive definite)
FISHER_DRAWS = 8  # label draws per task of the fisher preconditioner (8: 17 pcg iterations on Conv4 vs 79 for cg, docs/benchmarks.md)


@dataclass
class NewtonCGState:
    """What the outer loop reports: CG iterations in total, the preconditioner fits and the last δ."""

    cg_iterations: int = 0
    products: int = 0
    rejected: int = 0
    damping: float = 0.0
    preconditioner: dict[str, Any] = field(default_factory=dict)


def resolve_hessian(problem: MetaProblem, kind: str) -> str:
    """``auto``: the exact total Hessian where the problem has it (unrolled second-order MAML), else
    Gauss–Newton. Measured on the small MLP fixtures, Gauss–Newton steps converge only linearly and
    slowly (the dropped terms — curvature of the inner step and of the network — are not small at
    λ*), while exact-Hessian Newton–CG with Levenberg–Marquardt damping converges in tens of steps."""
    if kind == "auto":
        return "exact" if problem.inner.kind == "unrolled" and not problem.inner.first_order else "gauss-newton"
    return kind


class _Preconditioner:
    """A curvature artifact of the Hessian (influence/curvature.py), fitted at the first λ and again every
    ``refit`` steps (0: never). PCG converges to the same solution whatever the preconditioner, so a
    sketch fitted at an older λ only costs CG iterations, never accuracy."""

    def __init__(self, problem: MetaProblem, tasks: TaskTensors, settings, kind: str, monitor=None):
        # the sketch is always of the Gauss–Newton H: positive semi-definite, so its damped inverse is an
        # SPD preconditioner even for exact-Hessian steps (PCG needs nothing more)
        self.problem, self.tasks, self.settings, self.kind = problem, tasks, settings, "gauss-newton"
        self.sketch = None
        self.fits: list[dict[str, Any]] = []
        self.fitted_at = -1
        self.monitor = monitor  # the refine's clock: its budget bounds the adaptive sketch, and the fit is said aloud

    def _fit(self, x: torch.Tensor, damping: float, step: int) -> None:
        # fitted here from linalg and meta pieces (no probe report: PCG's answer does not depend on it),
        # so refine stays below the influence stage that saves curvature files
        s = self.settings
        t0 = time.perf_counter()
        tasks = self.tasks
        if s.precondition_max_tasks and s.precondition_max_tasks < len(tasks):
            pick = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(0))[:s.precondition_max_tasks].sort().values
            tasks = tasks.subset(pick.tolist())
        deadline = getattr(self.monitor, "deadline", math.inf)
        if self.monitor is not None:
            self.monitor.note(f"refine: fitting the {s.precondition} preconditioner on {len(tasks)} tasks (passes over them; its time counts "
                              "against the refine's time limit)")
        if s.precondition == "ekfac":
            self.sketch = fit_ekfac(self.problem, x, tasks, adapt=True, fisher_samples=4)
            rank = self.sketch.rank
        elif s.precondition == "fisher":
            # sampled-label total gradients: E[GᵀG] is the total Gauss–Newton H (it keeps dθ/dλ), and the
            # damped inverse is exact by Woodbury — the best preconditioner measured on Conv4 (docs/benchmarks.md)
            rows = fisher_factor(self.problem, x, tasks, FISHER_DRAWS, seed=len(self.fits))  # a subsample's mean is unbiased
            self.sketch = FactorCurvature(rows, self.problem.weight_decay)
            rank = self.sketch.rank
        elif s.precondition == "gn-factor":
            # the Gauss–Newton H at x exactly (rows for every query example and class): its damped inverse
            # is the Gauss–Newton step itself, so PCG on Gauss–Newton products stops after 1–2 iterations
            # until λ has moved far enough from x that a refit pays (precondition_refit)
            # with float32 products the rows are fitted in float32 too (about half the time; PCG's answer
            # does not depend on the preconditioner's precision, only its iteration count)
            fit_x = x.float() if s.newton_products == "float32" and x.dtype != torch.float32 else x
            self.sketch = FactorCurvature(gauss_newton_factor(self.problem, fit_x, tasks.to(dtype=fit_x.dtype)).to(x.dtype),
                                          self.problem.weight_decay)
            rank = self.sketch.rank
        else:
            product_dtype = torch.float32 if s.newton_products == "float32" and x.dtype != torch.float32 else None
            op = TotalHessian(self.problem, x, tasks, self.kind, product_dtype=product_dtype)
            if s.precondition_rank == 0:
                floor = max(damping, DAMPING_FLOOR) + self.problem.weight_decay
                self.sketch = adaptive_nystrom_sketch(op, floor, start=min(20, op.dim), max_rank=min(400, op.dim),
                                                      deadline=deadline if math.isfinite(deadline) else None)
            else:
                self.sketch = nystrom_sketch(op, min(s.precondition_rank, op.dim))
            rank = self.sketch.rank
        self.fitted_at = step
        self.fits.append({"step": step, "seconds": time.perf_counter() - t0, "rank": rank, "n_tasks_fitted": len(tasks)})
        if getattr(self.sketch, "info", {}).get("stopped_by") == "time":  # the adaptive rank stopped growing on the time limit
            self.fits[-1]["stopped_by"] = "time"
        if self.monitor is not None:
            self.monitor.note(f"refine: preconditioner fitted (rank {rank}) in {self.fits[-1]['seconds']:.1f} s"
                              + (", its rank cut short by the time limit" if self.fits[-1].get("stopped_by") else ""))

    def __call__(self, x: torch.Tensor, damping: float, step: int) -> Callable | None:
        s = self.settings
        if s.precondition == "none":
            return None
        if self.sketch is None or (s.precondition_refit > 0 and step - self.fitted_at >= s.precondition_refit):
            self._fit(x, damping, step)
        if s.precondition in ("ekfac", "fisher", "gn-factor"):
            sk = self.sketch.to(x.dtype, x.device).as_preconditioner()
            return lambda R: sk.solve(R, damping)
        # μI is part of H, so λ_ℓ > 0 even at δ = 0 whenever μ > 0; the floor covers μ = δ = 0
        return nystrom_preconditioner(self.sketch, damping if float(self.sketch.eigenvalues[-1]) + damping > 0 else DAMPING_FLOOR)


def newton_cg_minimise(evaluate, problem: MetaProblem, tasks: TaskTensors, x: torch.Tensor, stop: float, settings,
                       w=None, v=None, u=None, shift: float = 0.0, monitor=None) -> tuple[torch.Tensor, int, str, NewtonCGState]:
    """Levenberg–Marquardt Newton–CG on F until ‖∇F‖ ≤ ``stop``, ``settings.max_iter`` outer steps or the
    monitor's time runs out. ``evaluate(x) -> (F, ∇F)`` (cached); ``shift``: a proximal γ added to H.
    Returns (x, outer iterations, failure reason or '', state)."""
    kind = resolve_hessian(problem, settings.newton_hessian)
    product_dtype = torch.float32 if settings.newton_products == "float32" and x.dtype != torch.float32 else None
    precondition = _Preconditioner(problem, tasks, settings, kind, monitor)
    state = NewtonCGState(damping=settings.newton_damping)
    f, g = evaluate(x)
    g0 = float(g.norm())
    delta = settings.newton_damping
    it = 0
    while it < settings.max_iter and float(g.norm()) > stop:
        if monitor is not None and monitor.out_of_time():
            break
        it += 1
        gn = float(g.norm())
        # Eisenstat–Walker / truncated Newton forcing: loose solves far away, tighter ones as ‖∇F‖ falls
        # (superlinear where H is the true Hessian; Gauss–Newton steps are linear at best anyway)
        eta = min(0.5, math.sqrt(gn / g0)) if g0 > 0 else 0.5
        op = TotalHessian(problem, x, tasks, kind, w=w, v=v, u=u, product_dtype=product_dtype)
        cg_used, accepted = 0, False
        for _ in range(30):
            products = DampedProducts(op, delta + shift)
            try:
                M = precondition(x, delta + shift, it)
                # truncated Newton: CG stops at negative curvature of an indefinite (exact) H + δI and the
                # iterate so far is still a descent direction — the ρ test judges it, δ grows if it fails
                d, info = block_cg(products.block, -g[:, None], eta, settings.newton_cg_iters, precondition=M, stop_on_negative=True)
                if info["negative_curvature"] and not bool(d.abs().sum() > 0):
                    raise DivergenceError("negative curvature at the first CG step")
            except DivergenceError:  # NaN, or negative curvature before any progress: more damping
                cg_used += products.count
                state.products += products.count
                delta = max(4 * delta, 1e-6)
                state.rejected += 1
                continue
            d = d[:, 0]
            cg_used += info["iterations_per_rhs"][0]
            state.products += products.count
            slope = float(g @ d)
            # decrease predicted by the undamped model: −(∇Fᵀd + ½dᵀHd) = −½∇Fᵀd + ½δ‖d‖²
            predicted = -0.5 * slope + 0.5 * delta * float(d @ d)
            ft, gt = evaluate(x + d)
            finite = bool(torch.isfinite(ft)) and bool(torch.isfinite(gt).all())
            actual = float(f) - float(ft) if finite else -math.inf
            # at F's rounding floor a decrease of F cannot be seen: accept a step that lowers ‖∇F‖ instead
            floor = 1e3 * torch.finfo(x.dtype).eps * max(abs(float(f)), 1e-300)
            if finite and predicted <= floor:
                accepted = float(gt.norm()) < gn and actual >= -floor
                rho = 1.0 if accepted else 0.0
            else:
                rho = actual / predicted if predicted > 0 else -math.inf
                accepted = finite and rho >= 0.01
            if rho > 0.75:
                delta = delta / 4 if delta / 4 >= DAMPING_FLOOR else 0.0
            elif rho < 0.25:
                delta = max(4 * delta, 1e-6)
            if accepted:
                break
            state.rejected += 1
        state.cg_iterations += cg_used
        state.damping = delta
        if not accepted:
            state.preconditioner = {"method": settings.precondition, "fits": precondition.fits}
            return x, it, "could not find a step that decreases F (damping grew 30 times)", state
        step = float(d.norm())
        x, f, g = x + d, ft, gt
        if monitor is not None:
            monitor.update(g, step=step, cg=cg_used, damping=delta)
    state.preconditioner = {"method": settings.precondition, "fits": precondition.fits}
    return x, it, "", state
