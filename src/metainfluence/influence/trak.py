"""The TRAK baseline for whole tasks (Park et al. 2023; docs/method.md §8).

    φ_k     = P g_k                          P: k × p, entries N(0, 1/k), seeded
    K       = Σ_k φ_k φ_kᵀ / n               kernel of projected task gradients (Gauss–Newton-like)
    score_k = φ_fᵀ (K + δI)⁻¹ φ_k / n        φ_f = P ∇f(λ*)

The same sign and units as task-IF (predicted change of f when task k is removed), with the total
Hessian replaced by the projected gradient kernel: no Hessian products at all, one pass of total
gradients, and a k × k solve.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .gradients import _total_gradients, _train_pass
from ..errors import DivergenceError
from ..meta.objective import MetaProblem
from ..tasks.tensors import TaskTensors
from .results import InfluenceSettings

# columns of P generated at a time: P is never held whole, so a p = 10⁵ model needs k × 4096 numbers,
# not a dense k × p matrix (regenerated from the seed on every call, which costs k·p draws)
PROJECTION_BLOCK = 4096

Projection = Callable[[torch.Tensor], torch.Tensor]


class GaussianProjection:
    """φ = P g for the rows g of a (c, p) matrix, P (k × p) with entries N(0, 1/k) drawn from ``seed``.

    The columns of P are drawn in blocks of :data:`PROJECTION_BLOCK` from one CPU generator in a fixed
    order, so P depends on (seed, k, p) only — not on the chunking of the tasks or on the device."""

    def __init__(self, dim: int, k: int, seed: int):
        self.dim, self.k, self.seed = dim, k, seed

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        out = torch.zeros(G.shape[0], self.k, dtype=G.dtype, device=G.device)
        scale = self.k ** -0.5
        for start in range(0, self.dim, PROJECTION_BLOCK):
            stop = min(self.dim, start + PROJECTION_BLOCK)
            block = torch.randn(self.k, stop - start, generator=gen, dtype=G.dtype).to(G.device)
            out += G[:, start:stop] @ block.T * scale
        return out


def trak_scores(problem: MetaProblem, lam: torch.Tensor, train_tasks: TaskTensors, grad_f: torch.Tensor,
                settings: InfluenceSettings, projection: Projection | None = None) -> dict[str, Any]:
    """TRAK scores of the training tasks against ∇f. ``projection`` maps (c, p) gradients to (c, k)
    features (default: the seeded Gaussian P with k = min(trak_dim, p)); passing an exactly
    orthogonal p × p one turns TRAK into the closed form ∇fᵀ(GᵀG/n + δI)⁻¹g_k/n (a test checks it).

    Returns ``scores``, ``self_influence`` (φ_kᵀ(K + δI)⁻¹φ_k/n, free once K is factored), ``diag``
    and the pass's ``g_sum`` and ``norms`` for the stationarity check."""

    n = problem.collective.total_count(len(train_tasks))
    if projection is None:
        projection = GaussianProjection(lam.numel(), min(settings.trak_dim, lam.numel()), settings.seed)
    # one pass storing only the n × k features: K and every score come from them
    features, norms, g_sum = _train_pass(problem, lam, train_tasks, projection, _total_gradients)
    Phi = problem.collective.gather_rows(features)  # K needs every task's features
    k = Phi.shape[1]
    K = Phi.T @ Phi / n
    delta = settings.damping if settings.damping_mode == "absolute" else settings.damping * float(K.trace()) / k
    A = K + delta * torch.eye(k, dtype=K.dtype, device=K.device)
    L, failed = torch.linalg.cholesky_ex(A)
    if int(failed):
        raise DivergenceError(f"the TRAK kernel K + δI (k = {k}, n = {n}) is not positive definite at δ = {delta:.3g}: "
                              f"K has rank ≤ n, so raise --damping or lower --trak-dim below the number of tasks")
    phi_f = projection(grad_f.reshape(1, -1))[0]
    x = torch.cholesky_solve(phi_f.reshape(-1, 1), L)[:, 0]
    scores = problem.collective.local_rows(Phi @ x, len(train_tasks)) / n
    self_influence = (Phi * torch.cholesky_solve(Phi.T, L).T).sum(1) / n
    residual = float((A @ x - phi_f).norm() / phi_f.norm().clamp_min(1e-300))
    diag = {"dim": k, "damping": delta, "residual": residual, "kernel_trace": float(K.trace()), "seed": settings.seed}
    return {"scores": scores, "self_influence": problem.collective.local_rows(self_influence, len(train_tasks)),
            "diag": diag, "g_sum": g_sum, "norms": norms}
