"""Float32 Hessian products under a float64 λ: TF32 off while solving, the true residual re-measured
with working-precision products, and mixed-precision iterative refinement up to the requested tolerance."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from ..linalg import IHVPResult, solve_ihvp
from ..linalg.core import DampedProducts, true_residuals
from ..meta.curvature import TotalHessian
from .results import InfluenceSettings


@contextlib.contextmanager
def full_float32():
    """TF32 off for the duration: on NVIDIA GPUs cuDNN convolutions use it by default and round float32
    products to a 10-bit mantissa (~1e-3 relative), which no residual tolerance of the exact tier survives."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


FLOAT32_TOL = 1e-4  # what a float32-product Krylov solve reliably reaches before the rounding floor


def refine_mixed(op: TotalHessian, b: torch.Tensor, res: IHVPResult, settings: InfluenceSettings, damping: float,
                  lowrank, sketch, rounds: int = 3) -> None:
    """Mixed-precision iterative refinement: r = b − (H + δI)x with working-precision products, a
    float32-product solve of (H + δI)c = r only as accurate as the remaining gap needs, x += c — until
    the true residual meets the tolerance (each round gains the inner solve's accuracy, ~1e-4)."""
    tol = settings.solve.tol
    B = b.reshape(-1, op.dim).to(op.lam)
    X = res.x.reshape(-1, op.dim).to(op.lam).clone()
    products = DampedProducts(op._working_twin, damping)
    if not res.residual < 1.0:  # worse than x = 0: the float32 solve went astray; start refinement from 0
        X.zero_()
        res.info["residuals"], res.residual = [1.0] * B.shape[0], 1.0
    done, spent, stalled = 0, 0, False
    while res.residual > tol and done < rounds and not stalled:
        before = res.residual
        R = B - products.block(X.T.contiguous()).T
        inner = dataclasses.replace(settings.solve, tol=min(0.5, max(FLOAT32_TOL, 0.5 * tol / res.residual)))
        corr = solve_ihvp(op, R.reshape(b.shape), solver=settings.solver, damping=damping, settings=inner, lowrank=lowrank, sketch=sketch)
        trial = X + corr.x.reshape(-1, op.dim).to(X)
        spent += corr.iterations
        done += 1
        residuals = true_residuals(products, trial, B)
        # a round that does not halve the float64 residual: the float32 products are too far from the
        # working-precision ones (e.g. saturated softmax probabilities) for refinement to contract
        stalled = max(residuals) > 0.5 * before
        if max(residuals) < before:
            X, res.info["residuals"], res.residual = trial, residuals, max(residuals)
    refinement: dict[str, Any] = {"rounds": done, "iterations": spent}
    if res.residual > tol:
        # finish in working precision from the best iterate: slower, but exact to the tolerance
        R = B - products.block(X.T.contiguous()).T
        inner = dataclasses.replace(settings.solve, tol=min(0.5, tol / res.residual))
        corr = solve_ihvp(op._working_twin, R.reshape(b.shape), solver=settings.solver, damping=damping, settings=inner,
                          lowrank=lowrank, sketch=sketch)
        X = X + corr.x.reshape(-1, op.dim).to(X)
        spent += corr.iterations
        res.info["residuals"] = true_residuals(products, X, B)
        res.residual = max(res.info["residuals"])
        refinement["finished_in_working_precision"] = {"iterations": corr.iterations,
                                                       "why": "float32-product refinement stopped contracting" if stalled else "refinement rounds used up"}
    res.x = X.reshape(b.shape)
    refinement["working_precision_products"] = products.count
    res.info["refinement"] = refinement
    res.iterations += spent
    res.info["converged"] = res.residual <= tol


def working_precision(op: TotalHessian) -> TotalHessian:
    """``op`` with products in λ's precision (itself, or a twin of an operator with float32 products)."""
    if getattr(op, "product_dtype", op.dtype) == op.dtype:
        return op
    twin = getattr(op, "_working_twin", None)
    if twin is None:
        twin = op._working_twin = TotalHessian(op.problem, op.lam, op.tasks, op.kind, seed=op.seed, w=op.w, v=op.v, u=op.u,
                                               column_chunk=op.column_chunk)
    return twin


def remeasure_residuals(op: TotalHessian, b: torch.Tensor, res: IHVPResult) -> None:
    """A solve on float32 products reports a residual measured with those products: re-measure it with
    working-precision products (one product per right-hand side), so the recorded residual, and any
    warning drawn from it, is the true one."""
    twin = working_precision(op)
    B, X = b.reshape(-1, op.dim).to(op.lam), res.x.reshape(-1, op.dim).to(op.lam)
    rows = res.info.get("residual_rows")
    if rows is not None:  # a fast-tier solve checked a sample of its right-hand sides: re-measure the same ones
        B, X = B[rows], X[rows]
    residuals = true_residuals(DampedProducts(twin, res.info["damping"]), X, B)
    res.info["residuals_product_precision"] = res.info.get("residuals")
    res.info["residuals"], res.residual = residuals, max(residuals)
    res.info["products"] = str(op.product_dtype).replace("torch.", "")
