"""The Newton-step removal prediction (approximate leave-one-out; Beirami et al. 2017, Rad & Maleki 2020).

First-order task-IF predicts removing task k by Δλ_k = (H + δI)⁻¹ g_k / n, the derivative at w_k = 1.
Where removals are far from linear (overfit meta-learners), one Newton step on the *reduced*
objective does better: Δλ_k = (H − H_k/n + δI)⁻¹ g_k / n, H_k task k's own total Hessian, and
score_k = ∇f(λ*)ᵀ Δλ_k (same sign and units as task-IF). Costs:
  fisher     a rank-M Woodbury downdate per task on top of one block solve (no extra products);
  gauss-newton with a gn-factor curvature file (the Gauss–Newton matrix itself, M rows per task):
             the same downdate on its rows — exact, one block solve and no further products;
  otherwise  one solve per task with H − H_k/n (CG or the configured solver).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DivergenceError, SettingsError
from ..linalg import woodbury_solve
from ..meta.curvature import TotalHessian
from .curvature import load_curvature
from .hessian_of import curvature_fingerprint, effective_damping
from ..progress import bar


class _WithoutTask:
    """H − H_k/n as an operator (the total Hessian of the pool without task k, normalisation kept); for the gamma
    kind Γ loses task k's share too (Γ_R = Γ − ‖∇_θ L_Q^k‖₁/n, as TotalHessian(..., w=w_R) has it)."""

    def __init__(self, op: TotalHessian, k: int):
        self.op, self.k = op, k
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.gamma_k = float(op.task_gammas()[k]) if op.kind == "gamma" else 0.0
        self.agree = op.agree

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v) - (self.op.tasks_matvec(v, [self.k]) + self.gamma_k * v.to(self.op.lam)) / self.op.n_total


def newton_step_scores(op: TotalHessian, G: torch.Tensor, grad_f: torch.Tensor, s: torch.Tensor, settings: Any,
                       solve) -> tuple[torch.Tensor, dict[str, Any]]:
    """score_k = ∇fᵀ (H − H_k/n + δI)⁻¹ g_k / n for the rows g_k of G (n, p); ``s`` = (H + δI)⁻¹∇f;
    ``solve(operator, rhs)`` is the configured iHVP. Returns (scores, diagnostics)."""
    n = op.n_total
    if op.problem.collective.world_size > 1:
        raise SettingsError("the Newton-step removal is computed in one process; run it without torchrun")
    if op.kind == "fisher":
        rows = torch.cat([G, op.factor])
        X = woodbury_solve(op, rows, settings.damping).x
        return _downdate(op.factor, n, G, X[: len(G)], X[len(G):], s), \
            {"removal": "newton", "downdate": "woodbury rank-M", "worst_residual": 0.0}
    factor = _gauss_newton_factor(op, settings)
    if factor is not None:
        F = factor.factor.to(G)
        X = factor.to(dtype=G.dtype).solve(torch.cat([G, F]).T, effective_damping(op, settings)).T  # (K + δI)⁻¹ on every row at once
        return _downdate(F, n, G, X[: len(G)], X[len(G):], s), \
            {"removal": "newton", "downdate": "gn-factor rank-M (the Gauss–Newton matrix's own rows)", "worst_residual": 0.0,
             "factor_probe_error": max(factor.info.get("probe_operator_rel_error") or [0.0])}
    scores = torch.empty(len(G), dtype=G.dtype, device=G.device)
    worst, unconverged = 0.0, 0
    for k in bar("Newton-step removals", len(G), "task", iterable=range(len(G))):
        try:
            res = solve(_WithoutTask(op, k), G[k] / n)
        except DivergenceError as exc:  # H − H_k/n can be indefinite where H is not: which removal, and the first-order way out
            raise DivergenceError(f"the Newton-step removal of task row {k}: {exc}; or score to first order (removal='first-order', "
                                  "--removal first-order), which solves with the full pool's H only") from None
        scores[k] = grad_f @ res.x
        worst = max(worst, res.residual)
        unconverged += not bool(res.info.get("converged", True))
    return scores, {"removal": "newton", "downdate": "one solve per task", "worst_residual": worst, "unconverged_solves": unconverged}


def _gauss_newton_factor(op: TotalHessian, settings: Any):
    """The gn-factor curvature file of this very operator (GᵀG + μI = H, its rows in blocks of n, task k's
    at k, k + n, …: the downdate is then exact), or None."""
    if op.kind != "gauss-newton" or not settings.curvature_file or settings.solver not in ("pcg", "curvature"):
        return None
    art = load_curvature(settings.curvature_file)
    return art.sketch if art.method == "gn-factor" and art.fingerprint == curvature_fingerprint(op) else None


def _downdate(F: torch.Tensor, n: int, G: torch.Tensor, AinvG: torch.Tensor, AinvF: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Scores from A = FᵀF + cI = H + δI and A⁻¹ applied to the rows of G and F: task k's own Hessian is
    U_kᵀU_k, U_k = its M rows of F (rows k, k + n, …), so by Woodbury
    (A − UᵀU)⁻¹ = A⁻¹ + A⁻¹Uᵀ (I − U A⁻¹ Uᵀ)⁻¹ U A⁻¹, an M × M solve per task."""
    M = F.shape[0] // n
    eye = torch.eye(M, dtype=G.dtype, device=G.device)
    scores = torch.empty(len(G), dtype=G.dtype, device=G.device)
    for k in range(len(G)):
        idx = torch.arange(k, F.shape[0], n, device=F.device)
        U, AinvU = F[idx], AinvF[idx]
        inner = torch.linalg.solve(eye - U @ AinvU.T, U @ AinvG[k])
        scores[k] = (s @ G[k] + (U @ s) @ inner) / n
    return scores
