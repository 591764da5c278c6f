"""H = GᵀG + cI from a tall factor G (r × p, r ≪ p), and its exact inverse by the Woodbury identity

    (GᵀG + cI)⁻¹ b = (b − Gᵀ (GGᵀ + cI)⁻¹ G b) / c,

which costs one r × r solve instead of any product with a p × p matrix (the fisher total Hessian).

Forming GGᵀ costs r²p/2 multiply-adds, more than the pass that made G once a pool has thousands of tasks, while
a conjugate-gradient iteration on GᵀG + cI costs 2rp per right-hand side. So a factor solves by CG first, for as
long as its CG iterations together have cost less than the Gram matrix would, and forms the Gram matrix (then
Cholesky, cached) only when they would cost more: never more than twice the cheaper of the two.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..errors import CheckpointError, DivergenceError, SettingsError
from .cg import block_cg
from .core import DampedProducts, IHVPResult, SolverSettings, finish, prepare_rhs

# relative residual at which a factor's CG solve stands in for its Cholesky solve: a few units of the working
# precision's round-off, as the Cholesky solve leaves (≈ 2e-7 in float32 on the Conv4 recipe's factors)
CG_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def gram(G: Tensor, block: int = 512) -> Tensor:
    """G Gᵀ for a factor G (r, p), each block of rows against the rows from it on: the upper triangle's products
    only, mirrored, so about half the flops of ``G @ G.T`` (a 5,000-task fisher factor's Gram matrix is a large part
    of its Woodbury inverse's cost; benchmarks/bench_fit_gradients.py times the path with one product against this)."""
    r = G.shape[0]
    K = torch.empty(r, r, dtype=G.dtype, device=G.device)
    for i in range(0, r, block):
        j = min(r, i + block)
        rows = G[i:j] @ G[i:].T
        K[i:j, i:] = rows
        K[j:, i:j] = rows[:, j - i:].T
    return K


def transposed_times(G: Tensor, Y: Tensor) -> Tensor:
    """Gᵀ Y for a factor G (r, p) and Y (r,) or (r, k), as (Yᵀ G)ᵀ: the same product, but torch's CPU kernel for a
    transposed G against 2–15 columns is ~15× slower than the other order (benchmarks/bench_factor_products.py), and
    the probe checks and block solves have such widths."""
    return Y @ G if Y.ndim == 1 else (Y.T @ G).T.contiguous()


def times(G: Tensor, P: Tensor) -> Tensor:
    """G P for a factor G (r, p) and P (p, k), as (Pᵀ Gᵀ)ᵀ when k > 1: torch's CPU kernel for a wide G against a few
    columns is slower than that order (2.2× for 5,000 × 28,965 against 4 columns: benchmarks/bench_factor_products.py);
    a factor's CG iterations on a block of probes are such products."""
    return G @ P if P.ndim == 1 or P.shape[1] == 1 else (P.T @ G.T).T


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
        return transposed_times(self.factor, self.factor @ v) + self.shift * v

    def matmat(self, V: Tensor) -> Tensor:
        return transposed_times(self.factor, times(self.factor, V)) + self.shift * V


class FactorCurvature(FactorOperator):
    """A saved curvature K = GᵀG + shift·I (the fisher factor of sampled-label total gradients), used
    like an EK-FAC: its exact damped inverse preconditions CG on the real H (``pcg``) or stands in
    for it (the fast tier). The inverse takes the cheaper side: an r × r system (Woodbury) when
    r < p, else the p × p one; the Gram matrix is formed once and its Cholesky factor cached per damping
    (refine's Levenberg–Marquardt damping changes every step: re-forming GᵀG each time would cost a minute
    per step on a 12,500-row Conv4 factor). Until the Gram matrix exists, solves run CG on GᵀG + cI within
    the budget of the module docstring; ``last_solve`` says which way the latest solve went."""

    method_name = "fisher"

    def __init__(self, factor: Tensor, shift: float = 0.0, info: dict | None = None) -> None:
        super().__init__(factor, shift)
        self.info = dict(info or {})
        self._chol: dict[float, Tensor] = {}
        self._gram: Tensor | None = None
        self._cg_work = 0.0  # CG's products so far, in units of r·p multiply-adds
        self.last_solve: dict = {}

    def as_preconditioner(self) -> "FactorCurvature":
        """Itself, solving by the Cholesky factor from now on: a preconditioner is applied at every iteration of an
        outer CG, which needs one fixed linear map (an inner CG stopped at a tolerance is only nearly one), and that
        many solves repay the Gram matrix at once."""
        self._cg_work = math.inf
        return self

    @property
    def rank(self) -> int:
        return min(self.factor.shape)

    def min_eigenvalue(self) -> float:
        return self.shift if self.factor.shape[0] < self.dim else self.shift + float(torch.linalg.eigvalsh(self.factor.T @ self.factor)[0])

    def mean_eigenvalue(self) -> float:
        return float((self.factor * self.factor).sum()) / self.dim + self.shift

    def solve(self, B: Tensor, damping: float) -> Tensor:
        """(K + δI)⁻¹ B for B of shape (dim,) or (dim, k)."""
        c = self.shift + damping
        if c <= 0:
            raise DivergenceError("the fisher curvature is singular without weight decay or damping: set damping > 0")
        G, vec = self.factor, B.ndim == 1
        B = (B[:, None] if vec else B).to(G)
        r = G.shape[0]
        X = self._by_cg(B, c) if self._gram is None and c not in self._chol else None
        if X is not None:
            return X[:, 0] if vec else X
        if c not in self._chol:
            if self._gram is None:
                self._gram = gram(G) if r < self.dim else gram(G.T)
            if len(self._chol) >= 4:  # a few dampings at a time (refine walks through many)
                self._chol.pop(next(iter(self._chol)))
            small = self._gram
            self._chol[c] = torch.linalg.cholesky(small + c * torch.eye(small.shape[0], dtype=G.dtype, device=G.device))
        L = self._chol[c]
        X = (B - transposed_times(G, torch.cholesky_solve(times(G, B), L))) / c if r < self.dim else torch.cholesky_solve(B, L)
        self.last_solve = {"via": "cholesky"}
        return X[:, 0] if vec else X

    def _by_cg(self, B: Tensor, c: float) -> Tensor | None:
        """(GᵀG + cI)⁻¹ B by CG while the budget lasts: the Gram matrix costs min(r, p)/2 units of r·p multiply-adds
        (GGᵀ, or GᵀG when r > p), one CG iteration 2 units per column. None when the budget is spent or CG stops
        short of ``CG_TOL`` (its work is then lost, at most the Gram matrix's cost)."""
        G, k = self.factor, B.shape[1]
        tol = CG_TOL.get(G.dtype)
        left = min(G.shape) / 2 - self._cg_work
        if tol is None or left < 2 * k:
            return None
        X, info = block_cg(lambda P: transposed_times(G, times(G, P)) + c * P, B, tol, int(left // (2 * k)))
        self._cg_work += 2 * sum(info["iterations_per_rhs"])
        if not info["converged"]:
            return None
        self.last_solve = {"via": "cg", "cg_iterations": max(info["iterations_per_rhs"])}
        return X

    def tensors(self) -> dict[str, Tensor]:
        return {"factor": self.factor}

    def meta(self) -> dict:
        return {"dim": self.dim, "shift": self.shift, "rows": self.factor.shape[0]}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict, info: dict | None = None) -> "FactorCurvature":
        G = tensors.get("factor")
        if set(tensors) != {"factor"} or G is None or G.ndim != 2 or G.shape != (meta.get("rows"), meta.get("dim")):
            raise CheckpointError("the fisher curvature's factor disagrees with its JSON; fit it again")
        return cls(G, float(meta.get("shift", 0.0)), info)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "FactorCurvature":
        if (dtype in (None, self.dtype)) and (device is None or torch.device(device) == self.device):
            return self  # keeps the cached factorisations
        return type(self)(self.factor.to(dtype=dtype, device=device), self.shift, self.info)


class GaussNewtonFactor(FactorCurvature):
    """The total Gauss–Newton matrix itself as a factor (one row per query example and class,
    meta/curvature.py ``gauss_newton_factor``): K = GᵀG + μI is H_GN exactly, so its inverse is the
    exact tier's answer and a preconditioner that leaves CG one iteration."""

    method_name = "gn-factor"


def woodbury_solve(op, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """x = (GᵀG + (shift + δ)I)⁻¹ b exactly, for an operator with ``factor`` G and ``shift``
    (a :class:`FactorOperator`, or a total Hessian of kind fisher)."""
    G = getattr(op, "factor", None)
    if G is None:
        raise SettingsError("the woodbury solver inverts a factored operator GᵀG + cI only (the fisher Hessian); use --hessian fisher, or another --solver")
    t0 = time.perf_counter()
    B = prepare_rhs(op, b, damping)
    shift = float(getattr(op, "shift", 0.0))
    if shift + damping <= 0:
        raise SettingsError("the fisher Hessian is singular without weight decay or damping: set damping > 0")
    # the inverse is kept on the operator, so that later solves with it share the CG budget and the Cholesky factor
    inverse = op if isinstance(op, FactorCurvature) else getattr(op, "_factor_inverse", None)
    if inverse is None or inverse.factor is not G or inverse.shift != shift:
        inverse = op._factor_inverse = FactorCurvature(G, shift)
    X = inverse.solve(B.T, damping)
    return finish("woodbury", X.T, B, b, DampedProducts(op, damping), 0, {"converged": True, "factor_rows": G.shape[0], **inverse.last_solve}, t0)
