"""H = GᵀG + cI from a tall factor G (r × p, r ≪ p), and its exact inverse by the Woodbury identity

    (GᵀG + cI)⁻¹ b = (b − Gᵀ (GGᵀ + cI)⁻¹ G b) / c,

which costs one r × r solve instead of any product with a p × p matrix (the fisher total Hessian).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import SettingsError
from .core import DampedProducts, IHVPResult, SolverSettings, finish, prepare_rhs


class FactorOperator:
    """H = GᵀG + shift·I, with G (r, p) — e.g. rows of scaled total gradients."""

    def __init__(self, factor: Tensor, shift: float = 0.0) -> None:
        if factor.ndim != 2:
            raise SettingsError(f"a factor operator needs a 2-d factor G (rows, dim), got shape {tuple(factor.shape)}")
        self.factor = factor
        self.shift = float(shift)
        self.dim = factor.shape[1]
        self.dtype = factor.dtype
        self.device = factor.device

    def matvec(self, v: Tensor) -> Tensor:
        return self.factor.T @ (self.factor @ v) + self.shift * v

    def matmat(self, V: Tensor) -> Tensor:
        return self.factor.T @ (self.factor @ V) + self.shift * V


def woodbury_solve(op, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """x = (GᵀG + (shift + δ)I)⁻¹ b exactly, for an operator with ``factor`` G and ``shift``
    (a :class:`FactorOperator`, or a total Hessian of kind fisher)."""
    G = getattr(op, "factor", None)
    if G is None:
        raise SettingsError("the woodbury solver inverts a factored operator GᵀG + cI only (the fisher Hessian); use hessian=fisher or another solver")
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    c = float(getattr(op, "shift", 0.0)) + damping
    if c <= 0:
        raise SettingsError("the fisher Hessian is singular without weight decay or damping: set damping > 0")
    small = G @ G.T + c * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    X = (B.T - G.T @ torch.linalg.solve(small, G @ B.T)) / c
    return finish("woodbury", X.T, B, b, DampedProducts(op, damping), 0, {"converged": True, "factor_rows": G.shape[0]}, t0)
