"""How sums over tasks cross processes: a small collective object that :class:`MetaProblem` holds.

Every quantity the engine needs is either a sum over tasks (gradients, Hessian products, means) or
a per-task row (scores, total gradients). With the pools sharded over processes, sums go through
``all_sum``, pool sizes through ``total_count``, and per-task rows move between a shard and the
full pool with ``gather_rows`` / ``local_rows``. The default is one process, where all four are the
identity; :class:`metainfluence.distributed.TorchCollective` implements them with torch.distributed.
Every call is a collective: all processes must make the same calls in the same order.
"""

from __future__ import annotations

import torch


class Collective:
    """The single-process collective: every operation is the identity."""

    world_size = 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over processes of each process's partial sum ``t``."""
        return t

    def total_count(self, n_local: int) -> int:
        """The pool size over all processes from this process's count."""
        return n_local

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every shard's per-task rows, concatenated in pool order."""
        return rows

    def local_rows(self, full: torch.Tensor, n_local: int) -> torch.Tensor:
        """This shard's rows of a full-pool tensor."""
        return full

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process: a decision every process must take alike (a clock's deadline, read on
        each process at a slightly different moment, would otherwise stop one process's loop of collectives only)."""
        return bool(flag)


SINGLE_PROCESS = Collective()
