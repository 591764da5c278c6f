"""Linear operators: a symmetric p × p matrix reached only through products.

The protocol follows scipy's ``LinearOperator``: ``dim``, ``dtype``, ``device``, ``matvec(v)`` for a
vector of shape (dim,) and, optionally, ``matmat(V)`` for a block of columns (dim, k). Operators never
add damping — the solvers add δ themselves — so one operator serves every damping value.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import SettingsError

__all__ = ["LinearOperator", "SubsetOperator", "MatrixOperator", "FunctionOperator", "apply_block", "materialize"]


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric (possibly indefinite) operator H. ``matvec(v)`` takes and returns shape (dim,)
    and must NOT add the damping; operators that can vectorise several products also offer
    ``matmat(V)`` on (dim, k) columns (see :func:`apply_block`)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


@runtime_checkable
class SubsetOperator(LinearOperator, Protocol):
    """An operator whose H is a mean over ``n_tasks`` tasks, as LiSSA needs.

    ``matvec_subset(v, task_index)`` returns an unbiased estimate of H v from the tasks in
    ``task_index`` (distinct indices) — for H = mean_i H_i, the mean of H_i v over the subset."""

    n_tasks: int

    def matvec_subset(self, v: Tensor, task_index: Tensor) -> Tensor: ...


def apply_block(op: LinearOperator, V: Tensor) -> Tensor:
    """H V for the columns of V (dim, k): one ``matmat`` when the operator has it (and k > 1), else
    one ``matvec`` per column."""
    matmat = getattr(op, "matmat", None)
    if V.shape[1] > 1 and callable(matmat):
        return matmat(V)
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


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
    """The dense (p, p) matrix of ``op`` from p products with unit vectors, ``chunk_size`` columns
    at a time. ``symmetrize`` returns (M + Mᵀ)/2 (exact HVPs are symmetric only up to rounding)."""
    p = op.dim
    M = torch.empty(p, p, dtype=op.dtype, device=op.device)
    for start in range(0, p, chunk_size):
        stop = min(start + chunk_size, p)
        E = torch.zeros(p, stop - start, dtype=op.dtype, device=op.device)
        E[torch.arange(start, stop, device=op.device), torch.arange(stop - start, device=op.device)] = 1
        M[:, start:stop] = apply_block(op, E).detach()
    if symmetrize:
        M = 0.5 * (M + M.T)
    return M
