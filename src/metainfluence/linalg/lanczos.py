"""Lanczos eigenpairs of H (computed once, saved, reused) and the low-rank solve built on them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, DivergenceError, SettingsError
from .core import DampedProducts, IHVPResult, SolverSettings, finish, prepare_rhs, seeded_randn
from .operators import LinearOperator
from ..io import load_result, save_result


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

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of what the eigenpairs were computed from (operator, point, pool, settings)."""
        return self.info.get("fingerprint")

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
    hvp = DampedProducts(op, 0.0)
    g = torch.Generator().manual_seed(seed)
    Q = torch.zeros(p, m, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(m, dtype=op.dtype)
    beta = torch.zeros(max(m - 1, 0), dtype=op.dtype)
    q = seeded_randn(p, op, g)
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
        q = seeded_randn(p, op, g)
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
    B = prepare_rhs(op, b, damping)
    hvp = DampedProducts(op, damping)
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
    return finish("lowrank", X, B, b, hvp, 0, info, t0)


