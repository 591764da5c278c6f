"""Inverse-Hessian-vector products x ≈ (H + δI)^{-1} b (SPEC.md §4).

Every solver has one signature, ``solver(op, b, damping, settings) -> IHVPResult``, so the influence
code never needs to know which one it got (torchopt's ``solve(matvec, b)`` idea):

- ``explicit``  materialise H, eigendecompose; small p only.
- ``cg``        conjugate gradient on H + δI; stops at a relative-residual tolerance.
- ``neumann``   the paper's truncated Neumann series, scaled by s > λ_max(H + δI).
- ``lissa``     the Neumann recursion with each HVP estimated on a random subset of tasks.
- ``lowrank``   top-k eigenpairs of H from Lanczos (computed once, saved), then any number of solves
                without further HVPs.

H is reached only through a :class:`LinearOperator` (``matvec(v) = H v``, *without* damping). Every
result carries the true relative residual ‖(H + δI)x − b‖ / ‖b‖, computed with one extra HVP per
right-hand side, so an inaccurate solve is visible in every file that records it. A solve that
diverges (indefinite H + δI, scale too small, NaN, inf) raises :class:`DivergenceError` with a
one-line message saying what to change; no NaN ever leaves this module.

The solvers are not differentiable: the right-hand side and every HVP output are detached.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import CheckpointError, DivergenceError, SettingsError
from ..io import load_result, save_result

__all__ = [
    "LinearOperator",
    "SubsetOperator",
    "MatrixOperator",
    "FunctionOperator",
    "materialize",
    "SolverSettings",
    "IHVPResult",
    "LowRank",
    "lanczos_eigenpairs",
    "power_iteration",
    "explicit_solve",
    "cg_solve",
    "neumann_solve",
    "lissa_solve",
    "lowrank_solve",
    "solve_ihvp",
    "SOLVERS",
]


# --------------------------------------------------------------------------------------------------
# Operators


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric (possibly indefinite) p × p operator H, reached only through products.

    ``matvec(v)`` takes and returns a tensor of shape ``(dim,)`` and must NOT add the damping; the
    solvers add δv themselves.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


@runtime_checkable
class SubsetOperator(LinearOperator, Protocol):
    """An operator whose H is a mean over ``n_tasks`` tasks, as LiSSA needs.

    ``matvec_subset(v, task_index)`` returns an unbiased estimate of H v from the tasks in
    ``task_index`` (a LongTensor of distinct task indices) — for H = mean_i H_i, the mean of H_i v
    over the subset.
    """

    n_tasks: int

    def matvec_subset(self, v: Tensor, task_index: Tensor) -> Tensor: ...


class MatrixOperator:
    """A dense matrix as an operator, for tests and small problems.

    ``A``: (p, p). ``task_parts``: optional (n, p, p) per-task matrices with H = their mean; they give
    the operator ``n_tasks`` and ``matvec_subset``. ``A`` may be None when ``task_parts`` is given.
    """

    def __init__(self, A: Tensor | None, task_parts: Tensor | None = None) -> None:
        if A is None:
            if task_parts is None:
                raise SettingsError("MatrixOperator needs a matrix A or per-task matrices task_parts; pass one")
            A = task_parts.mean(dim=0)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise SettingsError(f"MatrixOperator needs a square matrix, got shape {tuple(A.shape)}; pass a (p, p) tensor")
        if task_parts is not None:
            if task_parts.ndim != 3 or task_parts.shape[1:] != A.shape:
                raise SettingsError(
                    f"task_parts has shape {tuple(task_parts.shape)} but A is {tuple(A.shape)}; pass (n, p, p) per-task matrices"
                )
            mean = task_parts.mean(dim=0)
            scale = max(A.abs().max().item(), 1e-300)
            if (mean - A).abs().max().item() > 1e3 * torch.finfo(A.dtype).eps * scale:
                raise SettingsError("A is not the mean of task_parts; pass A=None to use their mean")
        self.A = A
        self.task_parts = task_parts
        self.dim = A.shape[0]
        self.dtype = A.dtype
        self.device = A.device
        self.n_tasks: int | None = None if task_parts is None else task_parts.shape[0]

    def matvec(self, v: Tensor) -> Tensor:
        return self.A @ v

    def matmat(self, V: Tensor) -> Tensor:
        return self.A @ V

    def matvec_subset(self, v: Tensor, task_index: Tensor) -> Tensor:
        if self.task_parts is None:
            raise SettingsError("this MatrixOperator has no per-task matrices; build it with task_parts= to use lissa")
        return (self.task_parts[task_index] @ v).mean(dim=0)


class FunctionOperator:
    """Wrap a plain ``matvec`` callable (e.g. an HVP closure) as a :class:`LinearOperator`."""

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        dim: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        self._matvec = matvec
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)

    def matvec(self, v: Tensor) -> Tensor:
        return self._matvec(v)


def materialize(op: LinearOperator, *, symmetrize: bool = True, chunk_size: int = 64) -> Tensor:
    """The dense (p, p) matrix of ``op`` from p products with unit vectors, column by column.

    An operator with a ``matmat(V)`` method is applied to ``chunk_size`` unit columns at a time.
    ``symmetrize`` returns (M + Mᵀ)/2 (exact HVPs are symmetric only up to rounding).
    """
    p = op.dim
    M = torch.empty(p, p, dtype=op.dtype, device=op.device)
    matmat = getattr(op, "matmat", None)
    if callable(matmat):
        for start in range(0, p, chunk_size):
            stop = min(start + chunk_size, p)
            E = torch.zeros(p, stop - start, dtype=op.dtype, device=op.device)
            E[torch.arange(start, stop, device=op.device), torch.arange(stop - start, device=op.device)] = 1
            M[:, start:stop] = matmat(E).detach()
    else:
        e = torch.zeros(p, dtype=op.dtype, device=op.device)
        for j in range(p):
            e[j] = 1
            M[:, j] = op.matvec(e).detach()
            e[j] = 0
    if symmetrize:
        M = 0.5 * (M + M.T)
    return M


# --------------------------------------------------------------------------------------------------
# Settings and results


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
    max_iter: int = field(default=1000, metadata=_help("cg: most iterations (one HVP each)."))
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
    seed: int = field(default=0, metadata=_help("Seed of power iteration, Lanczos start vectors and lissa task subsets."))
    divergence_patience: int = field(
        default=30,
        metadata=_help("neumann/lissa: declare divergence after the update norm grew this many consecutive steps."),
    )
    explicit_max_dim: int = field(
        default=20000, metadata=_help("explicit: largest p for which the p × p matrix may be materialised.")
    )

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise SettingsError(msg)

        check(math.isfinite(self.tol) and self.tol > 0, f"tol must be a positive number, got {self.tol}; use e.g. 1e-6")
        for name in ("max_iter", "neumann_depth", "power_iters", "lissa_repeats", "lowrank_rank", "explicit_max_dim"):
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


# --------------------------------------------------------------------------------------------------
# Shared pieces

_EPS_FLOOR = 64  # relative changes below this many machine epsilons are rounding noise: stop


class _Hvp:
    """(H + δI)v with the HVP output detached, shape-checked and counted."""

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

    def subset(self, v: Tensor, task_index: Tensor) -> Tensor:
        self.count += 1
        hv = self._check(self.op.matvec_subset(v, task_index), v)  # type: ignore[attr-defined]
        return hv + self.damping * v if self.damping else hv


def _prepare(op: LinearOperator, b: Tensor, damping: float) -> Tensor:
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


def _residuals(hvp: _Hvp, X: Tensor, B: Tensor) -> list[float]:
    """True relative residuals ‖(H + δI)x − b‖/‖b‖, one HVP per row (0-rhs rows: ‖(H+δI)x‖)."""
    out = []
    for x, b in zip(X, B):
        r = (hvp(x) - b).norm().item()
        bn = b.norm().item()
        res = r / bn if bn > 0 else r
        if not math.isfinite(res):
            raise DivergenceError(
                f"the residual check gave {res} (the solution or an HVP is not finite); raise damping or use solver='cg'"
            )
        out.append(res)
    return out


def _finish(
    solver: str, X: Tensor, B: Tensor, b: Tensor, hvp: _Hvp, iterations: int, info: dict[str, Any], t0: float
) -> IHVPResult:
    if not torch.isfinite(X).all():
        raise DivergenceError(f"{solver} produced NaN or inf; raise damping or use solver='cg'")
    residuals = _residuals(hvp, X, B)
    info = {"damping": hvp.damping, **info, "residuals": residuals, "matvecs": hvp.count, "seconds": time.perf_counter() - t0}
    return IHVPResult(x=X.reshape(b.shape), residual=max(residuals), iterations=iterations, solver=solver, info=info)


def _randn(p: int, op: LinearOperator, generator: torch.Generator) -> Tensor:
    # drawn on the CPU so the same seed gives the same vector on every device
    return torch.randn(p, generator=generator, dtype=op.dtype).to(op.device)


def _power(hvp: _Hvp, op: LinearOperator, iters: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    v = _randn(op.dim, op, g)
    v = v / v.norm()
    est = 0.0
    for _ in range(iters):
        w = hvp(v)
        norm = w.norm().item()
        if not math.isfinite(norm):
            raise DivergenceError("power iteration met a non-finite HVP; check the model and loss for NaN before solving")
        if norm == 0:
            break
        est = max(est, norm)
        v = w / norm
    return est


def power_iteration(op: LinearOperator, damping: float = 0.0, iters: int = 50, seed: int = 0) -> float:
    """Estimate of the largest |eigenvalue| of H + δI: ‖(H+δI)v‖ after ``iters`` normalised steps.

    The estimates ‖A^{t+1}v‖/‖A^t v‖ increase with t towards |λ|_max and never exceed it, so callers
    multiply by a safety factor.
    """
    return _power(_Hvp(op, damping), op, iters, seed)


# --------------------------------------------------------------------------------------------------
# explicit


def explicit_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """Materialise H, symmetrise, eigendecompose: x = V diag(1/(λ_i + δ)) Vᵀ b, all rhs at once.

    Raises DivergenceError if λ_min + δ ≤ 0 (never clips eigenvalues).
    """
    t0 = time.perf_counter()
    B = _prepare(op, b, damping)
    if op.dim > settings.explicit_max_dim:
        raise SettingsError(
            f"explicit would materialise a {op.dim} × {op.dim} matrix (explicit_max_dim = {settings.explicit_max_dim}); use solver='cg' or 'lowrank', or raise explicit_max_dim"
        )
    hvp = _Hvp(op, damping)
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
    return _finish("explicit", X, B, b, hvp, 0, info, t0)


# --------------------------------------------------------------------------------------------------
# cg


def _cg_one(hvp: _Hvp, b: Tensor, tol: float, max_iter: int) -> tuple[Tensor, int, bool, float]:
    bnorm = b.norm().item()
    x = torch.zeros_like(b)
    if bnorm == 0:
        return x, 0, True, 0.0
    r = b.clone()
    p = r.clone()
    rr = torch.dot(r, r).item()
    rel = 1.0
    for it in range(1, max_iter + 1):
        Ap = hvp(p)
        curvature = torch.dot(p, Ap).item()
        if not math.isfinite(curvature):
            raise DivergenceError(
                f"conjugate gradient met NaN/inf at iteration {it} (the HVP is not finite); check the model and loss, or raise damping"
            )
        if curvature <= 0:
            raise DivergenceError(
                f"conjugate gradient met curvature pᵀ(H+δI)p = {curvature:.3g} ≤ 0 at iteration {it}: H+δI is indefinite; "
                f"raise damping (now {hvp.damping:g}) or use a gauss-newton/fisher Hessian"
            )
        alpha = rr / curvature
        x.add_(p, alpha=alpha)
        r.sub_(Ap, alpha=alpha)
        rr_new = torch.dot(r, r).item()
        rel = math.sqrt(rr_new) / bnorm
        if not math.isfinite(rel):
            raise DivergenceError(f"conjugate gradient produced NaN/inf at iteration {it}; raise damping")
        if rel <= tol:
            return x, it, True, rel
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, max_iter, False, rel


def cg_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """Conjugate gradient on H + δI from x = 0, one rhs at a time.

    Stops at relative (recursive) residual ≤ ``tol`` or ``max_iter``; reaching ``max_iter`` is not an
    error (info ``converged`` is False and the true residual is recorded). Non-positive curvature
    or NaN raises DivergenceError. CG detects indefiniteness only when its Krylov space reaches a
    negative direction of H + δI; if it converges first, the answer is still (H + δI)^{-1} b.
    """
    t0 = time.perf_counter()
    B = _prepare(op, b, damping)
    hvp = _Hvp(op, damping)
    xs, its, conv, recursive = [], [], [], []
    for row in B:
        x, it, ok, rel = _cg_one(hvp, row, settings.tol, settings.max_iter)
        xs.append(x)
        its.append(it)
        conv.append(ok)
        recursive.append(rel)
    info = {"converged": all(conv), "iterations_per_rhs": its, "recursive_residuals": recursive}
    return _finish("cg", torch.stack(xs), B, b, hvp, max(its), info, t0)


# --------------------------------------------------------------------------------------------------
# neumann and lissa


def _scale(hvp: _Hvp, op: LinearOperator, settings: SolverSettings) -> tuple[float, dict[str, Any]]:
    if settings.neumann_scale is not None:
        return settings.neumann_scale, {"scale": settings.neumann_scale, "scale_from": "settings"}
    est = _power(hvp, op, settings.power_iters, settings.seed)
    if est == 0:
        raise DivergenceError("H+δI is zero on the power-iteration vector, so no Neumann scale exists; raise damping or use solver='cg'")
    s = settings.scale_safety * est
    return s, {"scale": s, "scale_from": "power_iteration", "power_estimate": est}


def _neumann_one(
    b: Tensor,
    apply: Callable[[Tensor], Tensor],
    s: float,
    settings: SolverSettings,
    solver: str,
    damping: float,
) -> tuple[Tensor, int, bool, float]:
    """x_{t+1} = b + (I − A_t/s) x_t from x_0 = b; returns (x_J / s, J, converged, last relative change).

    With a deterministic A the update norms ‖(I − A/s)^t b‖ form a log-convex sequence (a sum of
    exponentials in t), so they decrease monotonically iff the series converges: a run of
    ``divergence_patience`` consecutive increases means an eigenvalue of I − A/s outside (−1, 1).
    """
    bnorm = b.norm().item()
    if bnorm == 0:
        return torch.zeros_like(b), 0, True, 0.0
    floor = max(settings.tol, _EPS_FLOOR * torch.finfo(b.dtype).eps)
    blowup = bnorm / torch.finfo(b.dtype).eps
    x = b.clone()
    prev, grew, rel = math.inf, 0, math.inf
    advice = f"raise damping (now {damping:g}) or neumann_scale (now {s:.4g}), or use solver='cg'"
    for t in range(1, settings.neumann_depth + 1):
        step = b - apply(x) / s
        x = x + step
        change, xnorm = step.norm().item(), x.norm().item()
        if not (math.isfinite(change) and math.isfinite(xnorm)):
            raise DivergenceError(f"{solver} produced NaN/inf after {t} steps; {advice}")
        if xnorm > blowup:
            raise DivergenceError(f"{solver} diverged: ‖x‖/‖b‖ passed 1/eps after {t} steps (H+δI may be indefinite); {advice}")
        grew = grew + 1 if change > prev else 0
        if grew >= settings.divergence_patience:
            raise DivergenceError(
                f"{solver} diverged: the update grew for {grew} consecutive steps (after {t}), so H+δI has a negative eigenvalue "
                f"or the scale is below λ_max; {advice}"
            )
        prev = change
        rel = change / xnorm if xnorm > 0 else math.inf
        if rel <= floor:
            return x / s, t, True, rel
    return x / s, settings.neumann_depth, False, rel


def neumann_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """The paper's truncated Neumann series, scaled to converge (SPEC.md §4).

    x ← b + (I − (H+δI)/s) x, answer x/s, with s = ``neumann_scale`` or scale_safety × |λ|_max from
    power iteration. Stops when ‖Δx‖/‖x‖ ≤ tol (then the error is about κ·tol, κ the condition number
    of H+δI: the residual records it) or at depth J = ``neumann_depth``, which is not an error.
    """
    t0 = time.perf_counter()
    B = _prepare(op, b, damping)
    hvp = _Hvp(op, damping)
    s, info = _scale(hvp, op, settings)
    xs, its, conv, changes = [], [], [], []
    for row in B:
        x, it, ok, rel = _neumann_one(row, hvp, s, settings, "neumann", damping)
        xs.append(x)
        its.append(it)
        conv.append(ok)
        changes.append(rel)
    info.update(converged=all(conv), depth_per_rhs=its, relative_changes=changes)
    return _finish("neumann", torch.stack(xs), B, b, hvp, max(its), info, t0)


def lissa_solve(op: LinearOperator, b: Tensor, damping: float, settings: SolverSettings = SolverSettings()) -> IHVPResult:
    """LiSSA: the Neumann recursion with each HVP estimated on ``lissa_batch`` random tasks.

    Each of ``lissa_repeats`` independent recursions (seeded) runs to depth J (or to the change
    tolerance, which subset noise usually prevents); their answers are averaged. Since the subset
    HVPs are unbiased and independent of the iterate, E[x_J] is the Neumann partial sum. With
    ``lissa_batch`` None or equal to ``n_tasks`` the full HVP is used and the result is exactly
    ``neumann``'s (repeats are then identical and run once). The scale s comes from power iteration
    on the full H; a subset's HVP can have larger eigenvalues, which may make the recursion diverge
    (detected) — then set a larger ``neumann_scale``.
    """
    t0 = time.perf_counter()
    B = _prepare(op, b, damping)
    n = getattr(op, "n_tasks", None)
    if not callable(getattr(op, "matvec_subset", None)) or not isinstance(n, int) or n < 1:
        raise SettingsError("lissa needs an operator with n_tasks and matvec_subset (per-task HVPs); use solver='neumann' or 'cg'")
    batch = n if settings.lissa_batch is None else settings.lissa_batch
    if batch > n:
        raise SettingsError(f"lissa_batch = {batch} exceeds the {n} tasks of the operator; set lissa_batch ≤ {n}")
    hvp = _Hvp(op, damping)
    s, info = _scale(hvp, op, settings)
    full = batch == n
    repeats = 1 if full else settings.lissa_repeats
    g = torch.Generator().manual_seed(settings.seed)

    def subset_hvp(v: Tensor) -> Tensor:
        idx = torch.randperm(n, generator=g)[:batch].to(op.device)
        return hvp.subset(v, idx)

    apply = hvp if full else subset_hvp
    xs, its, conv = [], [], []
    for row in B:
        acc = torch.zeros_like(row)
        row_its, row_conv = 0, True
        for _ in range(repeats):
            x, it, ok, _ = _neumann_one(row, apply, s, settings, "lissa", damping)
            acc += x
            row_its = max(row_its, it)
            row_conv = row_conv and ok
        xs.append(acc / repeats)
        its.append(row_its)
        conv.append(row_conv)
    info.update(converged=all(conv), depth_per_rhs=its, lissa_batch=batch, lissa_repeats=repeats, n_tasks=n)
    return _finish("lissa", torch.stack(xs), B, b, hvp, max(its), info, t0)


# --------------------------------------------------------------------------------------------------
# lowrank

_LOWRANK_KIND = "metainfluence.lowrank_eigenpairs"


@dataclass
class LowRank:
    """Top-k eigenpairs of H, largest first: ``eigenvalues`` (k,), ``eigenvectors`` (p, k) orthonormal.

    ``info``: how they were computed (Lanczos steps, seed, restarts, Ritz residual estimates).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.eigenvectors.shape[0]

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[0]

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write ``stem.safetensors`` (tensors) and ``stem.json`` (dim, rank, info)."""
        meta = {"kind": _LOWRANK_KIND, "dim": self.dim, "rank": self.rank, "info": self.info}
        return save_result(stem, {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}, meta)

    @classmethod
    def load(cls, stem: str | Path, dim: int | None = None) -> "LowRank":
        """Read a saved LowRank; with ``dim``, refuse one computed for an operator of another size."""
        tensors, meta = load_result(stem, what="low-rank eigenpair file")
        if meta.get("kind") != _LOWRANK_KIND or set(tensors) != {"eigenvalues", "eigenvectors"}:
            raise CheckpointError(f"{stem} is not a low-rank eigenpair file; compute one with lanczos_eigenpairs and LowRank.save")
        vals, vecs = tensors["eigenvalues"], tensors["eigenvectors"]
        if vals.ndim != 1 or vecs.ndim != 2 or vecs.shape != (meta.get("dim"), vals.shape[0]):
            raise CheckpointError(f"{stem}: eigenvalues {tuple(vals.shape)} and eigenvectors {tuple(vecs.shape)} disagree with its JSON; regenerate it")
        if dim is not None and vecs.shape[0] != dim:
            raise CheckpointError(
                f"{stem} holds eigenvectors of dimension {vecs.shape[0]} but the operator has dimension {dim}; recompute them for this model"
            )
        return cls(vals, vecs, meta.get("info", {}))


def lanczos_eigenpairs(op: LinearOperator, k: int, iters: int | None = None, seed: int = 0) -> LowRank:
    """Top-k (algebraically largest) eigenpairs of H by Lanczos with full reorthogonalisation.

    ``iters`` Lanczos steps (default 2k + 10, capped at p), one HVP each; the tridiagonal matrix is
    eigendecomposed and the k largest Ritz pairs kept. When the Krylov space becomes invariant
    (β ≈ 0, e.g. H of rank < iters) Lanczos restarts from a fresh random vector orthogonal to the
    basis, so all ``iters`` directions are explored. ``info['ritz_residuals']`` estimates
    ‖H v_i − λ_i v_i‖ per pair.
    """
    p = op.dim
    if not isinstance(k, int) or not 1 <= k <= p:
        raise SettingsError(f"lowrank rank k must be an integer in 1..{p} (the dimension), got {k!r}")
    m = 2 * k + 10 if iters is None else iters
    if m < k:
        raise SettingsError(f"lanczos_iters ({m}) must be ≥ the rank k ({k})")
    m = min(m, p)
    hvp = _Hvp(op, 0.0)
    g = torch.Generator().manual_seed(seed)
    Q = torch.zeros(p, m, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(m, dtype=op.dtype)
    beta = torch.zeros(max(m - 1, 0), dtype=op.dtype)
    q = _randn(p, op, g)
    q = q / q.norm()
    anorm, last_beta, restarts, n = 0.0, 0.0, 0, m
    breakdown = 1e3 * torch.finfo(op.dtype).eps
    for j in range(m):
        Q[:, j] = q
        w = hvp(q)
        if not torch.isfinite(w).all():
            raise DivergenceError("Lanczos met a non-finite HVP; check the model and loss for NaN before computing eigenpairs")
        a = torch.dot(q, w).item()
        w = w - a * q
        if j > 0:
            w = w - beta[j - 1].item() * Q[:, j - 1]
        basis = Q[:, : j + 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            c = basis.T @ w
            w = w - basis @ c
            a += c[j].item()
        alpha[j] = a
        bj = w.norm().item()
        anorm = max(anorm, abs(a), bj)
        if j == m - 1:
            last_beta = bj
            break
        if bj > breakdown * anorm:
            beta[j] = bj
            q = w / bj
            continue
        # invariant subspace found: restart orthogonally (β_j = 0 decouples the blocks)
        restarts += 1
        q = _randn(p, op, g)
        for _ in range(2):
            q = q - basis @ (basis.T @ q)
        if q.norm().item() <= breakdown:  # the whole space is spanned
            n, last_beta = j + 1, bj
            break
        q = q / q.norm()
    T = torch.diag(alpha[:n]) + torch.diag(beta[: n - 1], 1) + torch.diag(beta[: n - 1], -1)
    theta, S = torch.linalg.eigh(T)
    top = torch.arange(n - 1, n - 1 - k, -1)  # eigh is ascending; take the k largest, largest first
    vals = theta[top].to(op.device)
    vecs = Q[:, :n] @ S[:, top].to(op.device)
    info = {
        "lanczos_iters": n,
        "seed": seed,
        "restarts": restarts,
        "ritz_residuals": (abs(last_beta) * S[n - 1, top].abs()).tolist(),
        "dtype": str(op.dtype).replace("torch.", ""),
    }
    return LowRank(vals, vecs, info)


def lowrank_solve(
    op: LinearOperator,
    b: Tensor,
    damping: float,
    settings: SolverSettings = SolverSettings(),
    *,
    lowrank: LowRank | None = None,
) -> IHVPResult:
    """x = V diag(1/(λ_i + δ)) Vᵀ b from the top-k eigenpairs (computed here if ``lowrank`` is None).

    The component of b outside span(V) is DROPPED (x has none there), rather than assumed to see
    H ≈ 0 and divided by δ; the true residual then reports at least the fraction of b outside the
    subspace (``info['rhs_fraction_outside']``), so a spectrum that is not low-rank shows up as a large
    residual. All rhs are solved at once with no HVPs besides the residual check.
    """
    t0 = time.perf_counter()
    B = _prepare(op, b, damping)
    hvp = _Hvp(op, damping)
    info: dict[str, Any] = {}
    if lowrank is None:
        lowrank = lanczos_eigenpairs(op, settings.lowrank_rank, settings.lanczos_iters, settings.seed)
        hvp.count += lowrank.info.get("lanczos_iters", 0)
        info["lanczos"] = lowrank.info
    if lowrank.dim != op.dim:
        raise CheckpointError(
            f"the low-rank eigenpairs have dimension {lowrank.dim} but the operator has dimension {op.dim}; recompute them for this model"
        )
    vals = lowrank.eigenvalues.to(device=op.device, dtype=op.dtype)
    vecs = lowrank.eigenvectors.to(device=op.device, dtype=op.dtype)
    shifted = vals + damping
    if (shifted <= 0).any():
        lam = vals.min().item()
        raise DivergenceError(
            f"H+δI is not positive definite on the low-rank subspace: eigenvalue {lam:.4g} + damping {damping:g} ≤ 0; raise damping above {-lam:.4g}"
        )
    C = B @ vecs
    X = (C / shifted) @ vecs.T
    bn = B.norm(dim=1)
    outside = ((B - C @ vecs.T).norm(dim=1) / torch.where(bn > 0, bn, torch.ones_like(bn))).tolist()
    info.update(
        rank=lowrank.rank,
        lambda_max=vals.max().item(),
        lambda_min_kept=vals.min().item(),
        rhs_fraction_outside=outside,
        converged=True,
    )
    return _finish("lowrank", X, B, b, hvp, 0, info, t0)


# --------------------------------------------------------------------------------------------------
# entry point

SOLVERS: dict[str, Callable[..., IHVPResult]] = {
    "explicit": explicit_solve,
    "cg": cg_solve,
    "neumann": neumann_solve,
    "lissa": lissa_solve,
    "lowrank": lowrank_solve,
}


def solve_ihvp(
    op: LinearOperator,
    b: Tensor,
    *,
    solver: str,
    damping: float,
    settings: SolverSettings = SolverSettings(),
    lowrank: LowRank | None = None,
) -> IHVPResult:
    """x ≈ (H + δI)^{-1} b with the named solver; ``b`` is (p,) or (m, p) and x has its shape.

    ``lowrank`` (precomputed eigenpairs) is only for ``solver='lowrank'``.
    """
    if solver not in SOLVERS:
        raise SettingsError(f"unknown iHVP solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == "lowrank":
        return lowrank_solve(op, b, damping, settings, lowrank=lowrank)
    if lowrank is not None:
        raise SettingsError(f"precomputed eigenpairs (lowrank=) are only used by solver='lowrank', not {solver!r}; drop them or switch solver")
    return SOLVERS[solver](op, b, damping, settings)
