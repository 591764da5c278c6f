"""Scale-out over processes: shard the task pools, all-reduce the sums over tasks.

Every quantity the influence code needs is either a **sum over tasks** (meta-gradient, measurement
gradient, Hessian-vector products, Γ, means of losses) or a **per-task row** (scores, total gradients,
self-influence). With the pools split into contiguous shards, one per process:

* the problem's collective (:class:`TorchCollective`, installed by :class:`distribute`) sends sums
  through an all-reduce of the local partial sums and pool sizes through the all-reduced sum of the
  local counts, so every process sees the full-pool value — the same vectors, the same solver
  iterations, the same s;
* per-task rows are computed for the local tasks only and gathered back into pool order at the end
  (:func:`gather_rows`); the collective's ``gather_rows`` / ``local_rows`` do the same inside the
  engine where a full-pool row set is needed (fisher factor, self-influence right-hand sides).

Launch with torchrun (one process per GPU, or per group of CPU cores)::

    torchrun --nproc_per_node=4 examples/distributed_influence.py --checkpoint runs/demo/refined.json

and in the script::

    ctx = init_distributed()                  # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    result = distributed_task_influence(problem, lam, train, val, settings, out="scores/task_if")
    ctx.close()

What is exact and what is not (the same numbers as one process, up to the order of floating-point
additions, unless listed):

* ``lissa`` with a ``lissa_batch``: each process draws its subsets from its own shard, so every
  process solves with its own stochastic estimate (of its shard's mean Hessian) and the scores of
  a shard use that shard's s. Use ``cg``, ``neumann``, ``lowrank`` or ``explicit`` for a single,
  exact solve; ``lissa`` without ``lissa_batch`` is ``neumann`` and exact.
* ``fisher``: every process holds the whole (n·M × p) factor — the Woodbury identity needs G Gᵀ
  across shards — so its memory is that of one process, not divided by the number of processes.
* ``self_influence`` and :func:`~metainfluence.influence.task_if.task_parameter_changes`: each HVP
  needs every process, so every process solves for all n right-hand sides (n × p per process).
* The training and validation pools are each held in full by the caller and sliced here; to avoid
  loading a full pool per process, build only ``pool.subset(shard(...))`` and call
  ``task_influence`` inside ``with distribute(problem):`` — then gather the scores with
  :func:`gather_rows`.
"""

from __future__ import annotations

from .influence import distributed_task_influence
from .process import (
    DistContext,
    TorchCollective,
    all_gather_counts,
    all_reduce_count,
    all_reduce_sum,
    distribute,
    gather_rows,
    init_distributed,
    is_distributed,
    local_rows,
    shard,
    shard_counts,
)

__all__ = [
    "DistContext",
    "init_distributed",
    "is_distributed",
    "shard",
    "shard_counts",
    "all_reduce_sum",
    "all_reduce_count",
    "all_gather_counts",
    "gather_rows",
    "local_rows",
    "TorchCollective",
    "distribute",
    "distributed_task_influence",
]
