"""An eigenvalue-corrected Kronecker-factored operator (EK-FAC; George et al. 2018, Grosse et al. 2023).

The operator is block diagonal over parameter groups of a flat vector:

* a **Kronecker block** holds the entries of one layer's [W | b] matrix (out × in₊₁, row-major), with
  eigenbases Q_out (of S = E[s sᵀ]) and Q_in (of A = E[a aᵀ]) and corrected eigenvalues Λ (out × in₊₁):
      block · V = Q_out (Λ ⊙ (Q_outᵀ V Q_in)) Q_inᵀ,
* a **diagonal block** holds every other parameter with its own value,

plus ``shift`` · I (the weight decay of the objective). Because everything is diagonal in a known
basis, any function of the eigenvalues is as cheap as a product: ``solve(B, δ)`` = (K + δI)⁻¹B with
the damping chosen at solve time, so one fit serves a damping sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import CheckpointError, DivergenceError, SettingsError


@dataclass
class KroneckerBlock:
    index: Tensor  # (out · in₊₁,) flat positions of the row-major [W | b] entries
    q_out: Tensor  # (out, out) eigenvectors of S
    q_in: Tensor  # (in₊₁, in₊₁) eigenvectors of A
    scale: Tensor  # (out, in₊₁) corrected eigenvalues Λ


class EKFAC:
    """EK-FAC as a linear operator (``matvec``, ``matmat``, ``dim``, ``dtype``, ``device``) with an
    exact blockwise inverse ``solve``; ``info`` records how it was fitted."""

    def __init__(self, blocks: list[KroneckerBlock], diag_index: Tensor, diag: Tensor, dim: int, shift: float = 0.0,
                 info: dict | None = None):
        self.blocks, self.diag_index, self.diag = blocks, diag_index, diag
        self.dim, self.shift = int(dim), float(shift)
        self.info = dict(info or {})
        self.dtype, self.device = diag.dtype, diag.device
        covered = torch.cat([b.index for b in blocks] + [diag_index])
        if covered.numel() != self.dim or not torch.equal(torch.sort(covered).values.cpu(), torch.arange(self.dim)):
            raise SettingsError("the EK-FAC blocks must cover every parameter exactly once; fit it for this model")
        self.n_matvecs = 0

    method_name = "ekfac"

    @property
    def rank(self) -> int:  # the "rank" of a curvature file: EK-FAC is full rank
        return self.dim

    def min_eigenvalue(self) -> float:
        vals = [b.scale.min() for b in self.blocks] + ([self.diag.min()] if self.diag.numel() else [])
        return float(torch.stack(vals).min()) + self.shift

    def mean_eigenvalue(self) -> float:
        """tr(K)/p, exact (relative damping)."""
        total = sum(float(b.scale.sum()) for b in self.blocks) + float(self.diag.sum())
        return total / self.dim + self.shift

    def apply_function(self, V: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """f(K) V for an elementwise function f of the eigenvalues (shift included), V of shape (dim,)
        or (dim, k): exact, since K is diagonal in its (blockwise Kronecker) eigenbasis."""
        vec = V.ndim == 1
        V = V.to(dtype=self.dtype, device=self.device)
        V = V[:, None] if vec else V
        out = torch.empty_like(V)
        for b in self.blocks:
            M = V[b.index].reshape(*b.scale.shape, V.shape[1])
            C = torch.einsum("po,pik,iq->oqk", b.q_out, M, b.q_in)  # Q_outᵀ M Q_in, per column
            C = C * fn(b.scale + self.shift)[..., None]
            out[b.index] = torch.einsum("op,pqk,iq->oik", b.q_out, C, b.q_in).reshape(-1, V.shape[1])
        if self.diag_index.numel():
            out[self.diag_index] = V[self.diag_index] * fn(self.diag + self.shift)[:, None]
        return out[:, 0] if vec else out

    def matvec(self, v: Tensor) -> Tensor:
        self.n_matvecs += 1
        return self.apply_function(v, lambda x: x)

    def matmat(self, V: Tensor) -> Tensor:
        self.n_matvecs += V.shape[1]
        return self.apply_function(V, lambda x: x)

    def as_preconditioner(self) -> "EKFAC":
        """Itself: its inverse is already one fixed linear map (see ``FactorCurvature.as_preconditioner``)."""
        return self

    def solve(self, B: Tensor, damping: float) -> Tensor:
        """(K + δI)⁻¹ B for B of shape (dim,) or (dim, k) (columns, as ``matmat``)."""
        floor = self.min_eigenvalue() + damping
        if floor <= 0:
            raise DivergenceError(f"EK-FAC + δI is singular (smallest eigenvalue + δ = {floor:.3g}); raise damping")
        return self.apply_function(B, lambda x: 1.0 / (x + damping))

    # ------------------------------------------------------------------ saving
    def tensors(self) -> dict[str, Tensor]:
        out = {"diag_index": self.diag_index, "diag": self.diag}
        for j, b in enumerate(self.blocks):
            out.update({f"block{j}.index": b.index, f"block{j}.q_out": b.q_out, f"block{j}.q_in": b.q_in, f"block{j}.scale": b.scale})
        return out

    def meta(self) -> dict:
        return {"dim": self.dim, "shift": self.shift, "n_blocks": len(self.blocks)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict, info: dict | None = None) -> "EKFAC":
        try:
            blocks = [KroneckerBlock(*(tensors[f"block{j}.{k}"] for k in ("index", "q_out", "q_in", "scale")))
                      for j in range(int(meta["n_blocks"]))]
            return cls(blocks, tensors["diag_index"], tensors["diag"], int(meta["dim"]), float(meta["shift"]), info)
        except (KeyError, TypeError, ValueError, RuntimeError, SettingsError) as err:
            raise CheckpointError(f"the EK-FAC tensors disagree with their JSON ({err}); fit it again") from None

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "EKFAC":
        cast = lambda t: t.to(dtype=dtype, device=device)
        blocks = [KroneckerBlock(b.index.to(device), cast(b.q_out), cast(b.q_in), cast(b.scale)) for b in self.blocks]
        return EKFAC(blocks, self.diag_index.to(device), cast(self.diag), self.dim, self.shift, self.info)
