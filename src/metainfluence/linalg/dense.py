"""Dense solves: materialise H and eigendecompose (small p only)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import DivergenceError, SettingsError
from .core import DampedProducts, IHVPResult, SolverSettings, finish, prepare_rhs
from .operators import LinearOperator
from .operators import materialize


def explicit_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """Materialise H, symmetrise, eigendecompose: x = V diag(1/(λ_i + δ)) Vᵀ b, all rhs at once.

    Raises DivergenceError if λ_min + δ ≤ 0 (never clips eigenvalues).
    """
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    if op.dim > settings.explicit_max_dim:
        raise SettingsError(
            f"explicit would materialise a {op.dim} × {op.dim} matrix (explicit_max_dim = {settings.explicit_max_dim}); use solver='cg' or 'lowrank', or raise explicit_max_dim"
        )
    hvp = DampedProducts(op, damping)
    M = materialize(op, symmetrize=False)
    hvp.count += op.dim
    if not torch.isfinite(M).all():
        raise DivergenceError("the materialised Hessian contains NaN or inf; check the model and loss before solving")
    scale = M.abs().max().item()
    asymmetry = (M - M.T).abs().max().item() / scale if scale > 0 else 0.0
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    lam_min, lam_max = evals[0].item(), evals[-1].item()
    if lam_min + damping <= 0:
        raise DivergenceError(
            f"H+δI is not positive definite: λ_min(H) = {lam_min:.4g}, so λ_min + δ = {lam_min + damping:.4g} ≤ 0 with damping {damping:g}; "
            f"raise damping above {-lam_min:.4g} (= −λ_min) or use a gauss-newton/fisher Hessian"
        )
    X = ((B @ evecs) / (evals + damping)) @ evecs.T
    info = {
        "lambda_min": lam_min,
        "lambda_max": lam_max,
        "condition_number": (lam_max + damping) / (lam_min + damping),
        "relative_asymmetry": asymmetry,
        "converged": True,
    }
    return finish("explicit", X, B, b, hvp, 0, info, t0)


