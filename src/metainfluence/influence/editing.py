"""Removing tasks or examples from a trained meta-learner without retraining (docs/method.md §6).

    Δλ_R    = (H_R + δI)^{-1} b_R / n,   b_R = Σ_{k∈R} g_k + Σ_{z∈R} ∂_λ∂_{w_z} L_Q^{k(z)}
    λ_edit  = λ* + Δλ_R                                               (one iHVP for the whole set)
H_R is the total Hessian of the *reduced* objective F(·; w_R, v_R, u_R) at λ*, so the edit is one
Newton step on it — exact when F is quadratic (and ∇F(λ*) = 0, since ∇F_R(λ*) = −b_R/n there).
``step="full"`` keeps the paper's step with the full-pool H (the first-order prediction).
Optional Newton refinement on the reduced objective from λ_edit, for large removals, and the
"unlearning" baseline: a few steps of gradient ascent on the removed items.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DivergenceError, SettingsError
from ..meta.curvature import TotalHessian
from ..meta.inputs import check_start_lambda
from ..meta.objective import MetaProblem
from ..progress import counted
from ..tasks.tensors import TaskTensors
from .gradients import kept_task_gradients, removed_examples_gradient
from .results import InfluenceSettings, check_solve, shortfall
from .task_if import build_hessian, ihvp, inner_solve_check


@dataclass
class Removal:
    """What to remove: whole tasks (local row indices) and/or examples (bool masks (n, |S|), (n, |Q|))."""

    tasks: list[int] = field(default_factory=list)
    support: torch.Tensor | None = None
    query: torch.Tensor | None = None

    def __post_init__(self):
        # a 1-d tensor / numpy array of indices (e.g. result.ranking()[:k]) becomes a list of its entries
        if hasattr(self.tasks, "tolist") and hasattr(self.tasks, "ndim"):
            if self.tasks.ndim != 1:
                raise SettingsError(f"task indices have shape {tuple(self.tasks.shape)}; pass a 1-d list, tensor or array of task row indices")
            self.tasks = self.tasks.tolist()
        self.support, self.query = (None if m is None else torch.as_tensor(m) for m in (self.support, self.query))

    def validate(self, pool: TaskTensors, shards: int = 1) -> None:
        """SettingsError unless every task index is in 0..n-1, at least one task is kept (checked when the pool
        is not sharded over ``shards`` processes), and the masks are boolean (or 0/1) of shapes (n, |S|) / (n, |Q|)."""
        n = len(pool)
        try:
            if any(isinstance(k, bool) for k in self.tasks):
                raise TypeError
            idx = [operator.index(k) for k in self.tasks]
        except TypeError:
            raise SettingsError(f"task indices {self.tasks!r} are not all integers; pass task row indices 0..{n - 1}") from None
        bad = [k for k in idx if not 0 <= k < n]
        if bad:
            raise SettingsError(f"task index {bad[0]} is outside the pool of {n} tasks; pass row indices 0..{n - 1} (at most {n} tasks)")
        if len(set(idx)) != len(idx):
            raise SettingsError("a task index is given twice in the removal; pass each task once")
        if shards == 1 and n and len(idx) == n:
            raise SettingsError(f"the removal takes all {n} tasks of the pool, leaving nothing to fit; keep at least one task (retrain from scratch instead)")
        for name, mask, m in (("support", self.support, pool.n_support), ("query", self.query, pool.n_query)):
            if mask is not None and tuple(mask.shape) != (n, m):
                raise SettingsError(f"the {name} removal mask has shape {tuple(mask.shape)}, expected ({n}, {m}) — one entry per {name} example of every task")
            if mask is not None and mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
                raise SettingsError(f"the {name} removal mask holds values other than 0/1 (dtype {mask.dtype}); pass a boolean mask, True = remove the example")

    def weights(self, problem: MetaProblem, lam: torch.Tensor, pool: TaskTensors):
        """(w, v, u) of the reduced objective: zeros on the removed items (docs/method.md §1)."""
        self.validate(pool, problem.collective.world_size)
        n = len(pool)
        w = torch.ones(n, dtype=lam.dtype, device=lam.device)
        w[list(self.tasks)] = 0
        v, u = problem.default_weights(pool, lam)
        if self.support is not None:
            v = v * (~self.support.bool()).to(v)
        if self.query is not None:
            u = u * (~self.query.bool()).to(u)
        return w, v, u

    def count(self) -> dict[str, int]:
        return {
            "tasks": len(self.tasks),
            "support_examples": int(self.support.bool().sum()) if self.support is not None else 0,
            "query_examples": int(self.query.bool().sum()) if self.query is not None else 0,
        }

    def describe(self) -> str:
        """The count in words (:func:`describe_count`)."""
        return describe_count(self.count())


def describe_count(count: dict[str, int]) -> str:
    """A removal's :meth:`Removal.count` in words, e.g. '12 tasks' or '3 support examples and 1 query example'."""
    words = {"tasks": "task", "support_examples": "support example", "query_examples": "query example"}
    parts = [f"{k} {words.get(n, n)}{'s' if k != 1 else ''}" for n, k in count.items() if k]
    return " and ".join(parts) or "nothing"


def removed_gradient(problem: MetaProblem, lam: torch.Tensor, pool: TaskTensors, removal: Removal, linear: bool = True,
                     diag: dict | None = None) -> torch.Tensor:
    """b_R: the sum of total gradients of removed tasks plus the removed examples' share of their
    tasks' gradients. ``linear``: the examples' mixed derivatives ∂_λ∂_{w_z} L_Q (the first-order
    prediction); otherwise the exact difference g_k(v, u) − g_k(v_R, u_R) of every task that loses
    an example, so that b_R / n = ∇F(λ) − ∇F(λ; w_R, v_R, u_R) exactly (g_k is not linear in v). ``diag`` records
    ``removed_gradient_from_kept_pass``: whether the removed tasks' g_k came from a fisher fit's pass."""
    removal.validate(pool, problem.collective.world_size)
    b = torch.zeros_like(lam)
    if removal.tasks:
        # the removed tasks' g_k from a fisher fit's pass when the reuse block kept them (influence/gradients.py)
        kept = kept_task_gradients(problem, lam, pool)
        if diag is not None:
            diag["removed_gradient_from_kept_pass"] = kept is not None
        b = b + (kept.gradients[list(removal.tasks)].sum(0) if kept is not None else
                 problem.sum_over_tasks(problem.task_total_gradient, lam, pool.subset(list(removal.tasks))))
    # examples of removed tasks are already gone with their task
    keep_rows = torch.ones(len(pool), dtype=torch.bool)
    keep_rows[list(removal.tasks)] = False
    masks = {which: (m.bool() & keep_rows[:, None].to(m.device)) for which, m in (("support", removal.support), ("query", removal.query))
             if m is not None and m.any()}
    if linear:
        for which, m in masks.items():
            rows = m.any(1).nonzero().flatten().tolist()
            if rows:  # only the tasks that lose an example
                b = b + removed_examples_gradient(problem, lam, pool.subset(rows), m[rows], which)
        return b.detach()
    if masks:
        touched = torch.zeros(len(pool), dtype=torch.bool)
        for m in masks.values():
            touched |= m.any(1).cpu()
        rows = touched.nonzero().flatten().tolist()
        if rows:
            _, v, u = removal.weights(problem, lam, pool)
            part = pool.subset(rows)
            b = b + problem.sum_over_tasks(problem.task_total_gradient, lam, part)
            b = b - problem.sum_over_tasks(problem.task_total_gradient, lam, part, v=v[rows], u=u[rows])
    return b.detach()


EDIT_STEPS = ("reduced", "full")


def descent_direction(g: torch.Tensor, newton: torch.Tensor, op, damping: float) -> tuple[torch.Tensor, bool]:
    """The Newton direction d (the update is λ − t·d) when it descends, gᵀd > 0; otherwise — an
    indefinite H can turn it uphill — the gradient scaled by the Cauchy step ‖g‖²/gᵀ(H+δI)g (or by 1
    where that curvature is not positive). Returns (direction, whether the gradient was used)."""
    if float(g @ newton) > 0:
        return newton, False
    curvature = float(g @ op.matvec(g)) + damping * float(g @ g)
    scale = float(g @ g) / curvature if curvature > 0 else 1.0
    return scale * g, True


def _reduced_solve(problem, lam, pool, settings, rhs, weights, diag):
    """(H_R + δI)⁻¹ rhs with H_R of the reduced objective. The exact H_R is often indefinite at λ*
    (λ* minimises F, not F_R): then the Gauss–Newton H_R (positive semi-definite) is used, and said."""
    w, v, u = weights
    if settings.solver == "curvature":
        # the fast tier's inverse is the full pool's; for H_R the same file preconditions an exact CG
        settings = dataclasses.replace(settings, solver="pcg")
        diag["reduced_solver"] = "pcg"
    op = build_hessian(problem, lam, pool, settings, w=w, v=v, u=u)
    try:
        return op, ihvp(op, rhs, settings)
    except DivergenceError as exc:
        if op.kind not in ("exact", "gamma") or settings.solver in ("woodbury",):
            raise
        message = (f"the {op.kind} Hessian of the reduced objective is indefinite at λ* ({' '.join(str(exc).split())[:80]}…); "
                   "the edit used its Gauss–Newton Hessian instead (--edit-step full gives the paper's full-pool step)")
        shortfall(diag, message)
        op = build_hessian(problem, lam, pool, settings, kind="gauss-newton", w=w, v=v, u=u)
        solver_settings = settings if settings.solver in ("cg", "explicit", "lowrank", "neumann") else dataclasses.replace(settings, solver="cg")
        return op, ihvp(op, rhs, solver_settings)


BACKTRACK_HALVINGS = 10  # the shortest step tried is 2⁻¹⁰ of the Newton step: one pass over the pool per trial


def _backtrack(objective, gradient, lam, delta, diag) -> float:
    """Largest t in {1, 1/2, …, 2⁻¹⁰} with F_R(λ + tΔ) ≤ F_R(λ) + 10⁻⁴ t ∇F_Rᵀ Δ (Armijo); 1 when Δ is
    not a descent direction of F_R, 0 (λ left as it is) when no t lowers F_R enough (both recorded)."""
    if not bool(delta.any()):  # no step at all (a solve stopped before its first iteration says so itself)
        return 1.0
    slope = float(gradient(lam) @ delta)
    if not slope < 0:
        diag["edit_not_descent"] = True
        shortfall(diag, f"the edit's step does not descend the reduced objective at λ (slope {slope:.2g} ≥ 0), so it was taken whole, "
                        "unchecked: its Hessian and gradients disagree (an unconverged solve, an indefinite Hessian or an unsolved inner "
                        "problem: see the other warnings); use --hessian gauss-newton, or refine the checkpoint first")
        return 1.0
    with torch.no_grad():
        f0 = objective(lam)
        for halvings in range(BACKTRACK_HALVINGS + 1):
            t = 0.5 ** halvings
            if objective(lam + t * delta) <= f0 + 1e-4 * t * slope:
                return t
    # a descent direction of a smooth F_R always has such a t; none means F_R is not smooth at this scale (ReLU kinks)
    # or is far from what the step's Hessian and gradient say: an edit that raised the objective would be worse than none
    shortfall(diag, f"no step along the edit's direction, down to {t:.2g} of it, lowered the reduced objective (slope {slope:.2g}), so λ was "
                    "left unchanged: the objective is far from quadratic here (ReLU kinks, or λ far from stationary); refine the checkpoint "
                    "first (for a ReLU model on the proximal objective, --refine-proximal 1), or use --edit-step full")
    return 0.0


def reduced_objective(problem, pool, weights, proximal):
    """F_R of the kept items as (value, gradient) functions of λ; with ``proximal`` = (γ, λ₀) the proximal P_R = F_R + (γ/2)‖λ − λ₀‖²,
    so the backtracking and Newton steps after a proximal refine descend the objective λ* was stationary for."""
    w, v, u = weights
    gamma, anchor = proximal if proximal is not None else (0.0, None)

    def objective(lam):
        f = float(problem.objective(lam, pool, w, v, u))
        return f + 0.5 * gamma * float((lam - anchor.to(lam)).pow(2).sum()) if gamma else f

    def gradient(lam):
        g = problem.meta_gradient(lam, pool, w, v, u)
        return g + gamma * (lam - anchor.to(lam)) if gamma else g

    return objective, gradient


def check_edit_solve(diag: dict[str, Any], res: Any, settings: InfluenceSettings) -> None:
    """Say aloud (a warning and a line in ``diag["warnings"]``) when the edit's solve stopped short of its tolerance or
    left a large residual: :func:`.results.check_solve` with an edit's remedies (no --resume)."""
    check_solve(diag, res, settings, "edit's", "λ_edit is", resumable=False)


@dataclass
class EditResult:
    """The edited λ, its change Δλ = λ_edit − λ*, and what the edit did (``print`` shows sizes and norms, not the tensors)."""

    lam: torch.Tensor
    delta: torch.Tensor
    diagnostics: dict[str, Any]

    def __repr__(self) -> str:
        d = self.diagnostics
        parts = [f"p={self.lam.numel()}", f"‖λ‖={float(self.lam.norm()):.4g}", f"‖Δλ‖={float(self.delta.norm()):.3g}",
                 f"removed {describe_count(d['removed'])}" if "removed" in d else ""]
        if "solver_converged" in d:
            parts.append(f"solve {'converged' if d['solver_converged'] else 'NOT converged'} (residual {d['solver_residual']:.2g}, "
                         f"{counted(d['solver_iterations'], 'iteration')})")
        if d.get("newton"):
            parts.append(f"{len(d['newton'])} Newton steps")
        if "steps" in d:  # unlearn
            parts.append(f"{d['steps']} unlearning steps")
        if d.get("warnings"):
            parts.append(f"{len(d['warnings'])} warning{'s' if len(d['warnings']) != 1 else ''} (diagnostics['warnings'])")
        return "EditResult(" + ", ".join(x for x in parts if x) + ")"


def edit_model(
    problem: MetaProblem,
    lam: torch.Tensor,
    pool: TaskTensors,
    removal: Removal,
    settings: InfluenceSettings | None = None,
    newton_steps: int = 0,
    step: str = "reduced",
    proximal: tuple[float, torch.Tensor] | None = None,
) -> EditResult:
    """λ_edit = λ* + (H_R + δI)^{-1} b_R / n (``step="reduced"``, the default) or with the full-pool H
    (``step="full"``, the paper's), then ``newton_steps`` Newton steps on F(λ; w_R) (with
    ``settings.hessian`` when it is exact or gauss-newton, else the exact Hessian where available; each
    step backtracks until F(λ; w_R) decreases and falls back to the gradient direction where the
    Newton direction is not a descent direction, so a far-from-quadratic F cannot make it diverge).

    With ``proximal`` = (γ, λ₀) (a checkpoint refined on P = F + (γ/2)‖λ − λ₀‖²) the edit is P's: its
    backtracking and Newton steps descend P_R, and ``settings.damping`` must already hold γ
    (pipeline.proximal.proximal_settings), which makes every Hessian H_R + γI."""
    check_start_lambda(lam, pool=pool)
    settings = settings or InfluenceSettings()
    settings.validate()
    if step not in EDIT_STEPS:
        raise SettingsError(f"unknown edit step {step!r}; use one of {', '.join(EDIT_STEPS)}")
    lam = lam.detach()
    n = problem.collective.total_count(len(pool))
    t0 = time.perf_counter()
    # the reduced step is a Newton step on F(·; w_R, v_R, u_R): it needs the exact change of the gradient
    diag: dict[str, Any] = {"removed": removal.count(), "step": step, "newton": [], "removed_gradient_from_kept_pass": False}
    inner_solve_check(problem, lam, pool, diag)  # an implicit inner loop: its derivatives assume an inner optimum
    b = removed_gradient(problem, lam, pool, removal, linear=step == "full", diag=diag)
    w, v, u = removal.weights(problem, lam, pool)
    objective, gradient = reduced_objective(problem, pool, (w, v, u), proximal)
    if proximal is not None:
        diag["proximal_gamma"] = float(proximal[0])
    if step == "full":
        op = build_hessian(problem, lam, pool, settings)
        res = ihvp(op, b / n, settings)
        lam_edit = lam + res.x
    else:
        op, res = _reduced_solve(problem, lam, pool, settings, b / n, (w, v, u), diag)
        # a Newton step is exact on a quadratic F and may overshoot elsewhere: backtrack on F(·; w_R)
        # (one forward pass per trial; the full step is kept wherever it lowers F enough)
        t = _backtrack(objective, gradient, lam, res.x, diag)
        lam_edit = lam + t * res.x
        diag["step_length"] = t
    diag.update({"solver_residual": res.residual, "solver_iterations": res.iterations,
                 "solver_converged": bool(res.info.get("converged", True)), "hessian": op.kind})
    if res.info.get("stopped_by"):
        diag["solver_stopped_by"] = res.info["stopped_by"]
    check_edit_solve(diag, res, settings)
    if newton_steps:
        # the edit's own curvature when it is exact or Gauss–Newton (GN stays PSD where the exact
        # Hessian of a non-convex reduced objective makes CG fail); exact otherwise, if the problem has it
        kind = settings.hessian if settings.hessian in ("exact", "gauss-newton") else "exact"
        if kind == "exact" and (problem.inner.kind != "unrolled" or problem.inner.first_order or op.kind == "gauss-newton"):
            kind = "gauss-newton"  # (the last: the edit itself fell back, the exact H_R being indefinite at λ*)
        # the structured woodbury solver needs the fisher kind, and a curvature file belongs to λ*, not to the
        # λ the steps move through: those steps use plain CG on their own kind (tried: λ*'s curvature as pcg's
        # preconditioner there saved iterations at large damping but slowed tight solves at small damping)
        newton_settings = dataclasses.replace(settings, solver="cg", curvature_file="") if settings.solver in ("woodbury", "pcg", "curvature") else settings
        diag["newton_solver"] = newton_settings.solver
        for _ in range(newton_steps):
            g = gradient(lam_edit)
            op_r = TotalHessian(problem, lam_edit, pool, kind, w=w, v=v, u=u)
            try:
                solved = ihvp(op_r, g, newton_settings)
            except DivergenceError as exc:
                if kind != "exact":
                    raise
                # the exact H_R is indefinite here too: its positive semi-definite Gauss–Newton part for this and the later steps
                kind = "gauss-newton"
                message = (f"the exact Hessian of the reduced objective is indefinite at a Newton step ({' '.join(str(exc).split())[:80]}…); "
                           "the Newton steps use its Gauss–Newton Hessian from there")
                shortfall(diag, message)
                op_r = TotalHessian(problem, lam_edit, pool, kind, w=w, v=v, u=u)
                solved = ihvp(op_r, g, newton_settings)
            direction, fallback = descent_direction(g, solved.x, op_r, settings.damping)
            # backtracking (Armijo) on F(λ; w_R): a full step can overshoot where F is far from quadratic
            f0 = objective(lam_edit)
            slope = -float(g @ direction)
            t = 1.0
            with torch.no_grad():
                while t > 1e-4 and objective(lam_edit - t * direction) > f0 + 1e-4 * t * slope:
                    t *= 0.5
            lam_edit = lam_edit - t * direction
            diag["newton"].append({"grad_norm_before": float(g.norm()), "residual": solved.residual, "iterations": solved.iterations, "step": t,
                                   "gradient_fallback": fallback})
        diag["newton_final_grad_norm"] = float(gradient(lam_edit).norm())
        diag["newton_hessian"] = kind
    diag["seconds"] = time.perf_counter() - t0
    return EditResult(lam=lam_edit, delta=lam_edit - lam, diagnostics=diag)


def unlearn(problem: MetaProblem, lam: torch.Tensor, pool: TaskTensors, removal: Removal, steps: int = 5, lr: float = 1.0) -> EditResult:
    """Baseline: gradient ascent λ ← λ + lr · b_R(λ)/n on the removed items' losses."""
    if steps < 1 or lr <= 0:
        raise SettingsError("unlearning needs steps ≥ 1 and lr > 0")
    t0 = time.perf_counter()
    n = problem.collective.total_count(len(pool))
    cur = lam.detach()
    for _ in range(steps):
        cur = cur + lr * removed_gradient(problem, cur, pool, removal) / n
    return EditResult(lam=cur, delta=cur - lam, diagnostics={"removed": removal.count(), "steps": steps, "lr": lr, "seconds": time.perf_counter() - t0})
