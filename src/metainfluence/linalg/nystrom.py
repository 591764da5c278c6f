"""Randomized Nyström approximation of a positive semi-definite operator, and the two ways the
library uses it (Frangella, Tropp & Udell, "Randomized Nyström preconditioning", 2023):

    H ≈ U Λ Uᵀ            from one block of products H Ω with a Gaussian test matrix Ω (p × ℓ)

* as a **preconditioner** for CG on H + δI:  P⁻¹ = (λ_ℓ + δ) U (Λ + δI)⁻¹ Uᵀ + (I − UUᵀ), which maps
  the top of the spectrum to about λ_ℓ + δ, so CG converges as if H had no eigenvalues above λ_ℓ
  (``pcg``: exact to the requested residual);
* as an **approximate inverse** (the fast tier):  x = U (Λ + δI)⁻¹ Uᵀ b + (I − UUᵀ) b / (λ_ℓ + δ),
  whose true residual every result records (``curvature``).

An EK-FAC (linalg/ekfac.py) serves both roles the same way through its exact blockwise inverse
(EK-FAC + δI)⁻¹ (PCG is unchanged by a positive scaling of its preconditioner).

The products are taken ``block`` columns at a time through the operator's ``matmat``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from ..errors import DivergenceError, SettingsError
from ..progress import bar
from .cg import block_cg
from .ekfac import EKFAC
from .core import DampedProducts, IHVPResult, SolverSettings, finish, prepare_rhs
from .lanczos import LowRank
from .operators import LinearOperator, apply_block


def nystrom_sketch(op: LinearOperator, rank: int, oversample: int = 10, seed: int = 0, block: int = 16) -> LowRank:
    """Top-``rank`` eigenpairs of a PSD ``op`` from ``rank + oversample`` products (one sketch)."""
    p = op.dim
    if not isinstance(rank, int) or not 1 <= rank <= p:
        raise SettingsError(f"Nyström rank must be an integer in 1..{p}, got {rank!r}")
    ell = min(p, rank + max(0, oversample))
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    omega = torch.linalg.qr(torch.randn(p, ell, generator=g, dtype=op.dtype))[0].to(op.device)
    Y = _products(op, omega, block)
    vals, U, nu = _nystrom_factor(omega, Y, op.dtype)
    return LowRank(vals[:rank], U[:, :rank], {"method": "nystrom", "sketch_size": ell, "seed": seed, "products": ell,
                                             "shift": nu, "seconds": time.perf_counter() - t0})


def adaptive_nystrom_sketch(op: LinearOperator, floor: float, target: float = 10.0, start: int = 20, max_rank: int = 400,
                            oversample: int = 10, seed: int = 0, block: int = 16, deadline: float | None = None) -> LowRank:
    """A Nyström sketch whose rank is chosen from the spectrum it finds (Frangella, Tropp & Udell, §5.4):
    the sketch is doubled, reusing every product taken so far, until its smallest kept eigenvalue
    λ_ℓ ≤ ``target`` × ``floor`` — with floor = the damped bottom of the spectrum (δ + μ), the
    preconditioned system then has a condition number of about ``target`` — or ``max_rank`` is reached, or (a
    ``time.perf_counter()`` ``deadline``) the time is up: the sketch so far is then kept."""
    p = op.dim
    if not 1 <= start <= p or max_rank < start:
        raise SettingsError(f"adaptive Nyström needs 1 ≤ start ≤ max_rank and start ≤ {p}, got start {start}, max_rank {max_rank}")
    if not floor > 0:
        raise SettingsError(f"adaptive Nyström needs a positive floor (damping + weight decay), got {floor}")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    omega = torch.empty(p, 0, dtype=op.dtype, device=op.device)
    Y = torch.empty(p, 0, dtype=op.dtype, device=op.device)
    rank, history = start, []
    while True:
        ell = min(p, rank + max(0, oversample))
        new = torch.randn(p, ell - omega.shape[1], generator=g, dtype=op.dtype).to(op.device)
        new = new - omega @ (omega.T @ new)  # orthogonal to the columns already sketched, so their products stay valid
        new = torch.linalg.qr(new)[0]
        omega, Y = torch.cat([omega, new], 1), torch.cat([Y, _products(op, new, block)], 1)
        vals, U, nu = _nystrom_factor(omega, Y, op.dtype)
        k = min(rank, p)
        history.append({"rank": k, "eigenvalue_min_kept": float(vals[k - 1])})
        late = deadline is not None and getattr(op, "agree", bool)(time.perf_counter() > deadline)  # every process alike
        if float(vals[k - 1]) <= target * floor or k >= min(max_rank, p) or ell >= p or late:
            break
        rank = min(2 * rank, max_rank)
    stop = "spectrum" if float(vals[k - 1]) <= target * floor else "time" if late else "max_rank"
    return LowRank(vals[:k], U[:, :k], {"method": "nystrom", "adaptive": True, "sketch_size": omega.shape[1], "seed": seed,
                                       "products": omega.shape[1], "shift": nu, "floor": floor, "target": target,
                                       "stopped_by": stop, "history": history, "seconds": time.perf_counter() - t0})


def _products(op: LinearOperator, omega: Tensor, block: int) -> Tensor:
    Y = torch.empty_like(omega)
    ell = omega.shape[1]
    # the bar counts Hessian products (directions), each a pass over every task: a block of them can take minutes
    with bar("Nyström sketch: Hessian products", ell, "product") as b:
        for start in range(0, ell, block):
            cols = slice(start, min(ell, start + block))
            Y[:, cols] = apply_block(op, omega[:, cols]).detach()
            b.update(cols.stop - start)
    if not torch.isfinite(Y).all():
        raise DivergenceError("the Nyström sketch met non-finite products; check the model and loss for NaN")
    return Y


def _nystrom_factor(omega: Tensor, Y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """Eigenvalues (descending) and eigenvectors of the Nyström approximation Y (ΩᵀY)⁺ Yᵀ, stably."""
    # a tiny shift keeps the Cholesky factor well defined (removed from the eigenvalues afterwards)
    nu = torch.finfo(dtype).eps ** 0.5 * float(Y.norm())
    Y_nu = Y + nu * omega
    core = omega.T @ Y_nu
    factor, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
    if int(info) != 0:
        raise DivergenceError("the Nyström core is not positive definite: the operator is not PSD (use --hessian gauss-newton or fisher)")
    Bm = torch.linalg.solve_triangular(factor, Y_nu.T, upper=False).T  # Y_ν C⁻ᵀ
    U, S, _ = torch.linalg.svd(Bm, full_matrices=False)
    return (S ** 2 - nu).clamp_min(0), U, nu


def nystrom_preconditioner(sketch: LowRank, damping: float) -> Callable[[Tensor], Tensor]:
    """R ↦ P⁻¹R with P⁻¹ = (λ_ℓ + δ) U (Λ + δI)⁻¹ Uᵀ + (I − UUᵀ) (columns of R)."""
    U, vals = sketch.eigenvectors, sketch.eigenvalues
    floor = float(vals[-1]) + damping
    if floor <= 0:
        raise DivergenceError("the Nyström preconditioner needs λ_ℓ + δ > 0; raise damping")
    scale = floor / (vals + damping)

    def apply(R: Tensor) -> Tensor:
        C = U.T @ R
        return R + U @ ((scale[:, None] - 1) * C)

    return apply


def pcg_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings(), *,
              sketch: LowRank | EKFAC) -> IHVPResult:
    """Block CG on H + δI preconditioned by a Nyström sketch (or an EK-FAC) of H: the exact tier, to ``tol``."""
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    _check(sketch, op)
    products = DampedProducts(op, damping)
    sk = _on(sketch, op)
    if not isinstance(sk, LowRank):
        # PCG only needs an SPD M ≈ (H + δI)⁻¹: the EK-FAC's (or fisher factor's) own damped inverse
        sk = sk.as_preconditioner()  # one fixed linear map for the outer CG (a factor then solves by its Cholesky factor)
        M = lambda R: sk.solve(R, damping)
    else:
        M = nystrom_preconditioner(sk, damping)
    X = torch.empty_like(B)
    info: dict = {"converged": True, "iterations_per_rhs": [], "recursive_residuals": [], "preconditioner": _method(sketch), "rank": sketch.rank}
    for start in range(0, B.shape[0], settings.cg_block):
        rows = slice(start, start + settings.cg_block)
        Xb, part = block_cg(products.block, B[rows].T.contiguous(), settings.tol, settings.max_iter, precondition=M, deadline=settings.deadline(t0),
                           agree=getattr(op, "agree", None))
        X[rows] = Xb.T
        info["converged"] = info["converged"] and part["converged"]
        if "stopped_by" in part:
            info["stopped_by"] = part["stopped_by"]
        info["iterations_per_rhs"] += part["iterations_per_rhs"]
        info["recursive_residuals"] += part["recursive_residuals"]
    return finish("pcg", X, B, b, products, max(info["iterations_per_rhs"]), info, t0)


def sketch_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings(), *,
                 sketch: LowRank | EKFAC) -> IHVPResult:
    """The fast tier: the sketch's (or EK-FAC's) approximate inverse applied directly (no products but
    the residual check, which says how good the answer is)."""
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    _check(sketch, op)
    sk = _on(sketch, op)
    if not isinstance(sk, LowRank):
        X = sk.solve(B.T, damping).T
        return finish("curvature", X, B, b, DampedProducts(op, damping), 0, {"converged": True, "approximation": _method(sk),
                                                                             "min_eigenvalue": sk.min_eigenvalue(), **getattr(sk, "last_solve", {})},
                      t0, settings.residual_checks)
    floor = float(sk.eigenvalues[-1]) + damping
    if floor <= 0:
        raise DivergenceError("the sketch's inverse needs λ_ℓ + δ > 0; raise damping")
    C = B @ sk.eigenvectors
    X = (C / (sk.eigenvalues + damping)) @ sk.eigenvectors.T + (B - C @ sk.eigenvectors.T) / floor
    return finish("curvature", X, B, b, DampedProducts(op, damping), 0, {"converged": True, "rank": sk.rank, "tail_eigenvalue": floor - damping},
                  t0, settings.residual_checks)


def _check(sketch: LowRank | EKFAC, op: LinearOperator) -> None:
    if sketch.dim != op.dim:
        raise SettingsError(f"the curvature sketch has dimension {sketch.dim} but the operator {op.dim}; fit it for this model")


def _method(sketch) -> str:
    return getattr(sketch, "method_name", "nystrom")


def _on(sketch, op: LinearOperator):
    if not isinstance(sketch, LowRank):  # an EK-FAC or a fisher factor: its own cast
        return sketch.to(op.dtype, op.device)
    return LowRank(sketch.eigenvalues.to(device=op.device, dtype=op.dtype), sketch.eigenvectors.to(device=op.device, dtype=op.dtype), sketch.info)
