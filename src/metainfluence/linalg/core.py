"""What every solver shares: settings, the result record, the damped and counted product, the
right-hand-side checks and the true-residual check that closes every solve.

Every solver is a function ``solver(op, b, damping, settings) -> IHVPResult`` solving
(H + δI) x = b for b of shape (p,) or (m, p) (torchopt's ``solve(matvec, b)`` idea); the result
carries the true relative residual ‖(H + δI)x − b‖ / ‖b‖, so an inaccurate solve is visible in every
file that records it. Divergence (indefinite H + δI, a scale too small, NaN) raises
:class:`DivergenceError` with the remedy; no NaN leaves this package. Solvers are not differentiable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ..errors import DivergenceError, SettingsError
from .operators import LinearOperator, apply_block

def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SolverSettings:
    """Settings of every iHVP solver; each solver reads only its own fields."""

    tol: float = field(
        default=1e-6,
        metadata=_help(
            "cg: stop when the relative residual ‖(H+δI)x − b‖/‖b‖ ≤ tol. neumann/lissa: stop when the "
            "relative change of the iterate ≤ tol (the residual can then be up to ~κ·tol)."
        ),
    )
    max_iter: int = field(default=500, metadata=_help("cg: most iterations (one HVP each)."))
    cg_block: int = field(default=1, metadata=_help(
        "cg: right-hand sides solved together, their products taken as one block (matmat); 1 = one at a time, "
        "bit-identical to separate solves; larger blocks vectorise the products (rounding-level differences)."))
    neumann_depth: int = field(default=1000, metadata=_help("neumann/lissa: most terms J of the series (one HVP each)."))
    neumann_scale: float | None = field(
        default=None,
        metadata=_help(
            "neumann/lissa: scale s of the series, which must exceed λ_max(H+δI); None = scale_safety × the "
            "largest |eigenvalue| of H+δI from power iteration."
        ),
    )
    scale_safety: float = field(default=1.05, metadata=_help("neumann/lissa: factor (≥ 1) on the power-iteration estimate of λ_max."))
    power_iters: int = field(default=50, metadata=_help("neumann/lissa: power-iteration steps to estimate λ_max (one HVP each)."))
    lissa_batch: int | None = field(
        default=None,
        metadata=_help("lissa: tasks per HVP estimate; None = all tasks (then lissa is exactly neumann)."),
    )
    lissa_repeats: int = field(default=1, metadata=_help("lissa: independent recursions whose answers are averaged."))
    lowrank_rank: int = field(default=20, metadata=_help("lowrank: number k of top eigenpairs of H kept."))
    lanczos_iters: int | None = field(
        default=None, metadata=_help("lowrank: Lanczos steps (HVPs) to find the top-k eigenpairs; None = 2k + 10.")
    )
    seed: int = field(default=0, metadata=_help("Seed of random scores, fisher label draws, power iteration, Lanczos start vectors and lissa task subsets."))
    divergence_patience: int = field(
        default=30,
        metadata=_help("neumann/lissa: declare divergence after the update norm grew this many consecutive steps."),
    )
    residual_checks: int = field(default=8, metadata=_help(
        "curvature (fast tier): right-hand sides whose true residual is measured, evenly spaced; each costs one "
        "product, so they dominate the fast tier's cost for many right-hand sides (≥ 1)."))
    explicit_max_dim: int = field(
        default=20000, metadata=_help("explicit: largest p for which the p × p matrix may be materialised.")
    )
    max_minutes: float = field(default=0.0, metadata=_help(
        "cg, pcg: stop the solve after this many minutes (0: no limit); the answer is then unconverged, said so, and "
        "a later run can continue from it (`metainfluence influence --resume SCORES`). The budget is the solve's: the passes "
        "before it (∇f, the right-hand sides) and after it (per-task gradients, the trust checks) add their own time."))

    def deadline(self, t0: float) -> float | None:
        """The ``time.perf_counter()`` value at which a solve started at ``t0`` stops (None: no limit)."""
        return t0 + 60.0 * self.max_minutes if self.max_minutes > 0 else None

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise SettingsError(msg)

        check(math.isfinite(self.tol) and self.tol > 0, f"tol must be a positive number, got {self.tol}; use e.g. 1e-6")
        check(math.isfinite(self.max_minutes) and self.max_minutes >= 0, f"max_minutes must be ≥ 0 (0: no limit), got {self.max_minutes}")
        for name in ("max_iter", "cg_block", "neumann_depth", "power_iters", "lissa_repeats", "lowrank_rank", "explicit_max_dim", "residual_checks"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} must be an integer ≥ 1, got {value!r}")
        check(
            self.neumann_scale is None or (math.isfinite(self.neumann_scale) and self.neumann_scale > 0),
            f"neumann_scale must be positive or None (automatic), got {self.neumann_scale}",
        )
        check(
            math.isfinite(self.scale_safety) and self.scale_safety >= 1,
            f"scale_safety must be ≥ 1, got {self.scale_safety}; use e.g. 1.05",
        )
        check(
            self.lissa_batch is None or (isinstance(self.lissa_batch, int) and self.lissa_batch >= 1),
            f"lissa_batch must be an integer ≥ 1 or None (all tasks), got {self.lissa_batch!r}",
        )
        check(
            self.lanczos_iters is None or (isinstance(self.lanczos_iters, int) and self.lanczos_iters >= self.lowrank_rank),
            f"lanczos_iters ({self.lanczos_iters}) must be ≥ lowrank_rank ({self.lowrank_rank}) or None (2k + 10)",
        )
        check(
            isinstance(self.divergence_patience, int) and self.divergence_patience >= 2,
            f"divergence_patience must be an integer ≥ 2, got {self.divergence_patience!r}",
        )
        check(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → help text (for the CLI and the docs)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


@dataclass
class IHVPResult:
    """x ≈ (H + δI)^{-1} b, with the true relative residual ‖(H + δI)x − b‖/‖b‖ (max over rhs).

    ``iterations``: CG iterations or Neumann depth J actually used (max over rhs; 0 for explicit and
    lowrank). ``info``: solver diagnostics — always ``damping``, ``converged``, ``residuals`` (one per
    rhs), ``matvecs`` (HVPs spent, residual check included) and ``seconds``.
    """

    x: Tensor
    residual: float
    iterations: int
    solver: str
    info: dict[str, Any]


_EPS_FLOOR = 64  # relative changes below this many machine epsilons are rounding noise: stop


class DampedProducts:
    """(H + δI)v with the product detached, shape-checked and counted (``count`` = products taken)."""

    def __init__(self, op: LinearOperator, damping: float) -> None:
        self.op = op
        self.damping = damping
        self.count = 0

    def _check(self, hv: Tensor, v: Tensor) -> Tensor:
        if hv.shape != v.shape:
            raise SettingsError(f"the operator's matvec returned shape {tuple(hv.shape)} for a vector of shape {tuple(v.shape)}; it must return (dim,)")
        return hv.detach()

    def __call__(self, v: Tensor) -> Tensor:
        self.count += 1
        hv = self._check(self.op.matvec(v), v)
        return hv + self.damping * v if self.damping else hv

    def block(self, V: Tensor) -> Tensor:
        """(H + δI) V for the columns of V (p, k)."""
        self.count += V.shape[1]
        hv = self._check(apply_block(self.op, V), V)
        return hv + self.damping * V if self.damping else hv

    def subset(self, v: Tensor, task_index: Tensor) -> Tensor:
        self.count += 1
        hv = self._check(self.op.matvec_subset(v, task_index), v)  # type: ignore[attr-defined]
        return hv + self.damping * v if self.damping else hv


def prepare_rhs(op: LinearOperator, b: Tensor, damping: float) -> Tensor:
    """Validate damping and b; return b as a detached (m, p) matrix."""
    if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise SettingsError(f"damping must be a finite number ≥ 0, got {damping!r}; set damping ≥ 0")
    if not isinstance(b, Tensor) or b.ndim not in (1, 2) or b.shape[-1] != op.dim:
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise SettingsError(f"right-hand side b must have shape ({op.dim},) or (m, {op.dim}), got {shape}")
    if b.dtype != op.dtype:
        raise SettingsError(f"b has dtype {b.dtype} but the operator works in {op.dtype}; cast b with b.to({op.dtype})")
    B = b.detach().to(op.device)
    if not torch.isfinite(B).all():
        raise DivergenceError("the right-hand side b contains NaN or inf; fix the gradient that produced it before solving")
    return B.reshape(1, -1) if B.ndim == 1 else B



def true_residuals(products: DampedProducts, X: Tensor, B: Tensor) -> list[float]:
    """True relative residuals ‖(H + δI)x − b‖/‖b‖ of the rows of X (0-rhs rows: ‖(H+δI)x‖)."""
    R = products.block(X.T.contiguous()).T - B
    out = []
    for r, b in zip(R, B):
        rn, bn = r.norm().item(), b.norm().item()
        res = rn / bn if bn > 0 else rn
        if not math.isfinite(res):
            raise DivergenceError(
                f"the residual check gave {res} (the solution or an HVP is not finite); raise --damping or use --solver cg"
            )
        out.append(res)
    return out


def check_rows(m: int, limit: int | None) -> list[int] | None:
    """Rows whose residual a solve measures: all (None) up to ``limit``, else ``limit`` evenly spaced
    ones (a solve without products of its own must not pay one product per right-hand side to check)."""
    if limit is None or m <= limit:
        return None
    return torch.linspace(0, m - 1, limit).round().long().unique().tolist()


def finish(
    solver: str, X: Tensor, B: Tensor, b: Tensor, products: DampedProducts, iterations: int, info: dict[str, Any], t0: float,
    check_limit: int | None = None,
) -> IHVPResult:
    """Close a solve: refuse non-finite answers, measure the true residuals (of every right-hand side,
    or of ``check_limit`` evenly spaced ones, recorded as ``residual_rows``), build the result."""
    if not torch.isfinite(X).all():
        raise DivergenceError(f"{solver} produced NaN or inf; raise --damping or use --solver cg")
    rows = check_rows(B.shape[0], check_limit)
    if rows is None:
        residuals = true_residuals(products, X, B)
    else:
        residuals = true_residuals(products, X[rows], B[rows])
        info = {**info, "residual_rows": rows}
    info = {"damping": products.damping, **info, "residuals": residuals, "matvecs": products.count, "seconds": time.perf_counter() - t0}
    return IHVPResult(x=X.reshape(b.shape), residual=max(residuals), iterations=iterations, solver=solver, info=info)


def seeded_randn(p: int, op: LinearOperator, generator: torch.Generator) -> Tensor:
    # drawn on the CPU so the same seed gives the same vector on every device
    return torch.randn(p, generator=generator, dtype=op.dtype).to(op.device)
