"""The tensor form of a task pool that the meta-learning and influence code consumes.

Every task i holds a support set (S_i) and a query set (Q_i) of equal size across the pool, so the
whole pool stacks into tensors shaped (tasks × examples × ...). This is the only thing the math
needs: a user with their own tasks builds a :class:`TaskTensors` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PoolError


_RAGGED = ("every task needs the same number of support examples and of query examples (a pool is one tensor each): "
           "draw tasks of one size, or put the tasks of each size in a pool of their own")


@dataclass
class TaskTensors:
    """Stacked tasks. ``support_x``: (n, |S|, ...), ``support_y``: (n, |S|) (or (n, |S|, d) for regression),
    ``query_x``: (n, |Q|, ...), ``query_y``: (n, |Q|)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("support_x", "support_y", "query_x", "query_y"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.is_nested:
                raise PoolError(f"{name} is a nested tensor; {_RAGGED}")
            if isinstance(t, (list, tuple)) and t and all(isinstance(x, torch.Tensor) for x in t):
                if len({tuple(x.shape) for x in t}) > 1:  # one task per entry, of different sizes
                    raise PoolError(f"{name} is a list of per-task tensors of shapes {sorted({tuple(x.shape) for x in t})[:3]}; {_RAGGED}")
                t = torch.stack(list(t))
                setattr(self, name, t)
            if not isinstance(t, torch.Tensor):  # numpy arrays and nested lists, as a user's data often comes
                try:
                    setattr(self, name, torch.as_tensor(t))
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise PoolError(f"{name} is a {type(t).__name__} that is not a tensor or an array of numbers ({exc}); pass torch tensors, "
                                    f"one per pool (if its tasks differ in size: {_RAGGED})") from None
        for name in ("support_x", "support_y", "query_x", "query_y"):
            if getattr(self, name).dim() < 2:
                raise PoolError(f"{name} has shape {tuple(getattr(self, name).shape)}; every tensor is (tasks × examples × ...), "
                                "so a single task needs a leading axis of 1 (x[None])")
        n = self.support_x.shape[0]
        if n == 0:
            raise PoolError("the task pool is empty; build a pool with at least one task")
        for name in ("support_y", "query_x", "query_y"):
            t = getattr(self, name)
            if t.shape[0] != n:
                raise PoolError(f"{name} has {t.shape[0]} tasks but support_x has {n}; all four tensors need the same first dimension")
        if self.support_y.shape[:2] != self.support_x.shape[:2] or self.query_y.shape[:2] != self.query_x.shape[:2]:
            raise PoolError("inputs and targets disagree on the number of examples per task; check the (tasks × examples) shapes")
        for name, what in (("support_x", "support"), ("query_x", "query")):
            if getattr(self, name).shape[1] == 0:
                raise PoolError(f"{name} has shape {tuple(getattr(self, name).shape)}: tasks without {what} examples "
                                + ("cannot adapt" if what == "support" else "have no outer loss (every score would be 0)")
                                + f"; give every task at least one {what} example")
        for name in ("support_x", "support_y", "query_x", "query_y"):
            t = getattr(self, name)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise PoolError(f"{name} contains NaN or inf; clean the data before building tasks")
            if not t.is_floating_point() and not t.is_complex() and t.dtype not in (torch.bool, torch.int64) and name.endswith("_y"):
                setattr(self, name, t.long())  # class indices as int64, which every torch loss and gather take (uint8 labels are common)

    def __len__(self) -> int:
        return self.support_x.shape[0]

    @property
    def n_support(self) -> int:
        return self.support_x.shape[1]

    @property
    def n_query(self) -> int:
        return self.query_x.shape[1]

    def subset(self, index: torch.Tensor | list[int] | slice) -> "TaskTensors":
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return TaskTensors(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TaskTensors":
        """Move to ``device``; cast floating inputs (and floating targets) to ``dtype``."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        parts = (self.support_x, self.support_y, self.query_x, self.query_y)
        cast_parts = [cast(t) for t in parts]
        if all(c is t for c, t in zip(cast_parts, parts)):
            return self  # nothing to cast: the same pool (a ∇f pass reused within a block keys on its identity)
        return TaskTensors(*cast_parts)
