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

import datetime
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import SettingsError
from .meta.collective import Collective
from .meta.objective import MetaProblem
from .tasks.tensors import TaskTensors

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

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True when a default process group is initialised (by :func:`init_distributed` or the caller)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------- the process group
@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, the ``backend``.

    ``backend`` is None for a single process that was not launched by torchrun; every collective in
    this module is then the identity. Use as a context manager to destroy the group on exit.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed and is_distributed():
            _barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and is_distributed():
            _dist().destroy_process_group()

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _context_from_group() -> DistContext:
    dist = _dist()
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device, owns_group=False)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Join the process group torchrun set up (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or describe a single process when not launched by torchrun.

    ``backend`` None picks ``nccl`` when CUDA is available (the process then uses
    ``cuda:LOCAL_RANK``) and ``gloo`` (CPU tensors) otherwise. A group that already exists is
    reused, not re-created. ``timeout_s`` bounds how long a collective waits for the others.
    """
    if is_distributed():
        return _context_from_group()
    env = os.environ
    if not all(v in env for v in _TORCHRUN_VARS):
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(device=device)
    dist = _dist()
    if not dist.is_available():
        raise SettingsError("launched by torchrun (RANK/WORLD_SIZE are set) but this torch build has no torch.distributed; run one process or install a torch with distributed support")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            raise SettingsError(f"{name} is not set; launch with torchrun (which sets it) or export {name}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise SettingsError("backend nccl needs CUDA; use backend='gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise SettingsError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; set --nproc_per_node ≤ the number of GPUs")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif backend == "gloo":
        if not dist.is_gloo_available():
            raise SettingsError("this torch build has no gloo backend; use backend='nccl' on GPUs or run one process")
        device = torch.device("cpu")
    else:
        raise SettingsError(f"unknown backend {backend!r}; use gloo (CPU) or nccl (GPU)")
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # a torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    return DistContext(rank, world, local_rank, backend, device, owns_group=True)


# ---------------------------------------------------------------------- sharding
def shard_counts(n_tasks: int, world: int) -> list[int]:
    """Tasks per rank of :func:`shard`: the first ``n_tasks % world`` ranks hold one more."""
    if world < 1:
        raise SettingsError(f"world size must be ≥ 1, got {world}")
    if n_tasks < 0:
        raise SettingsError(f"n_tasks must be ≥ 0, got {n_tasks}")
    base, extra = divmod(int(n_tasks), int(world))
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard(n_tasks: int, rank: int, world: int) -> torch.Tensor:
    """Pool positions of ``rank``'s tasks: a contiguous block, sizes differing by at most one,
    the same on every process (concatenating the shards of ranks 0..world-1 gives 0..n-1)."""
    if not 0 <= rank < world:
        raise SettingsError(f"rank must be in 0..{world - 1}, got {rank}")
    counts = shard_counts(n_tasks, world)
    start = sum(counts[:rank])
    return torch.arange(start, start + counts[rank], dtype=torch.long)


# ---------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    """Where tensors must live for the group's backend: nccl the current GPU, gloo the CPU."""
    if str(_dist().get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier(group=None) -> None:
    dist = _dist()
    if str(dist.get_backend(group)) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over processes of ``t`` (any shape, 0-dim included), on a detached copy; ``t`` is untouched.

    The result does not carry autograd history: distributed sums are values (use
    ``meta_gradient`` / ``value_and_gradient`` for gradients, which reduce the gradients themselves).
    Identity when no process group is initialised."""
    if not is_distributed():
        return t
    dist = _dist()
    dev = _comm_device()
    out = t.detach().to(dev).clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(t.device)


def all_reduce_count(n_local: int, group=None) -> int:
    """Σ over processes of an integer (e.g. the number of local tasks). A collective: call it on every process."""
    if not is_distributed():
        return int(n_local)
    t = torch.tensor(int(n_local), dtype=torch.int64, device=_comm_device())
    _dist().all_reduce(t, group=group)
    return int(t.item())


def all_gather_counts(n_local: int, group=None) -> list[int]:
    """Every process's integer, in rank order. A collective."""
    if not is_distributed():
        return [int(n_local)]
    dist = _dist()
    world = dist.get_world_size(group)
    t = torch.tensor([int(n_local)], dtype=torch.int64, device=_comm_device())
    bufs = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(bufs, t, group=group)
    return [int(b.item()) for b in bufs]


def gather_rows(tensor_local: torch.Tensor, counts: Sequence[int] | None = None, group=None) -> torch.Tensor:
    """Concatenate every process's rows (dim 0) in rank order — for contiguous shards, pool order.

    ``counts``: rows per rank (e.g. :func:`shard_counts`); None asks the processes (one more small
    collective). Shards of uneven size are padded to the largest, all-gathered and trimmed. Every
    process gets the whole result. Identity when no process group is initialised."""
    if tensor_local.dim() == 0:
        raise SettingsError("gather_rows needs per-task rows (a tensor with a first dimension); got a 0-dim tensor — use all_reduce_sum for sums")
    if not is_distributed():
        if counts is not None and sum(counts) != tensor_local.shape[0]:
            raise SettingsError(f"counts {list(counts)} do not add up to the {tensor_local.shape[0]} local rows of a single process")
        return tensor_local
    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    counts = all_gather_counts(tensor_local.shape[0], group) if counts is None else [int(c) for c in counts]
    if len(counts) != world or counts[rank] != tensor_local.shape[0]:
        raise SettingsError(f"counts {counts} do not match {world} processes with {tensor_local.shape[0]} local rows on rank {rank}")
    dev = _comm_device()
    x = tensor_local.detach().to(dev)
    was_bool = x.dtype == torch.bool
    if was_bool:
        x = x.to(torch.uint8)
    m = max(counts)
    if x.shape[0] < m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    x = x.contiguous()
    bufs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(bufs, x, group=group)
    out = torch.cat([b[:c] for b, c in zip(bufs, counts)])
    if was_bool:
        out = out.to(torch.bool)
    return out.to(tensor_local.device)


def local_rows(full: torch.Tensor, n_local: int, group=None) -> torch.Tensor:
    """This process's rows of a full-pool tensor (the inverse of :func:`gather_rows`). A collective."""
    counts = all_gather_counts(n_local, group)
    if sum(counts) != full.shape[0]:
        raise SettingsError(f"the shards hold {sum(counts)} rows in all but the full tensor has {full.shape[0]}")
    rank = _dist().get_rank(group) if is_distributed() else 0
    start = sum(counts[:rank])
    return full[start:start + int(n_local)]


# ---------------------------------------------------------------------- the problem's collective
class TorchCollective(Collective):
    """:class:`~metainfluence.meta.collective.Collective` over a torch.distributed process group:
    ``all_sum`` all-reduces (sums) a copy of its argument, ``total_count`` is the all-reduced sum of
    the local counts, ``gather_rows`` / ``local_rows`` move per-task rows between shards and the full
    pool. Every method is a collective (see the module docstring). ``total_count`` is deliberately
    not cached per local count: two pools can share a rank's local count but not another rank's, and
    a per-rank cache would then skip a collective on one rank only (a hang) or return the wrong total."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = _dist().get_world_size(group)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.group)

    def total_count(self, n_local: int) -> int:
        return all_reduce_count(n_local, self.group)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return gather_rows(rows, None, self.group)

    def local_rows(self, full: torch.Tensor, n_local: int) -> torch.Tensor:
        return local_rows(full, n_local, self.group)


class distribute:
    """Give ``problem`` a :class:`TorchCollective` (see the module docstring).

    Works as a function (the collective stays until :meth:`restore`) or as a context manager::

        with distribute(problem):
            res = task_influence(problem, lam, local_train, local_val, settings)

    Every process must make the same engine calls in the same order (the engine does, since all of
    its control flow depends only on reduced values and settings). Without an initialised process
    group nothing changes (a single process needs no collective).
    """

    def __init__(self, problem: MetaProblem, group=None):
        self.problem = problem
        self.group = group
        self._saved = problem.collective
        self.active = is_distributed()
        if self.active:
            problem.collective = TorchCollective(group)

    def restore(self) -> None:
        self.problem.collective = self._saved
        self.active = False

    def __enter__(self) -> MetaProblem:
        return self.problem

    def __exit__(self, *exc) -> None:
        self.restore()


# ---------------------------------------------------------------------- task-IF over processes
def _agree(flag: bool, group=None) -> tuple[bool, bool]:
    """(all, any) of a boolean over processes."""
    if not is_distributed():
        return flag, flag
    n = all_reduce_count(int(bool(flag)), group)
    world = _dist().get_world_size(group)
    return n == world, n > 0


def distributed_task_influence(
    problem: MetaProblem,
    lam: torch.Tensor,
    train_tasks_full: TaskTensors,
    val_tasks_full: TaskTensors,
    settings=None,
    *,
    task_ids: torch.Tensor | None = None,
    out: str | os.PathLike | None = None,
    pool_fingerprint: str | None = None,
    group=None,
):
    """task-IF (or any ``settings.method``) of the whole training pool, computed by every process
    on its shard of the training AND validation pools; returns the same scores on every process.

    ``train_tasks_full`` / ``val_tasks_full`` are the full pools (identical on every process); this
    process keeps the rows of :func:`shard`. ``task_ids`` are the pool's stable ids (default
    0..n-1). The result holds scores, self-influence (if asked for) and ids in full-pool order;
    ``measurement``, ``extra['s']`` and the solver diagnostics are the full-pool values, identical on
    every process (except lissa with a ``lissa_batch``: see the module docstring). Timings are this
    process's; ``diagnostics['distributed']`` records world size, backend, shard sizes and every
    process's total seconds. With ``out`` the result is written by rank 0 only (``out.safetensors``
    + ``out.json``) and the others wait for it.

    Without a process group this is exactly :func:`~metainfluence.influence.task_if.task_influence`
    on the full pools.
    """
    from .influence.results import InfluenceSettings, settings_dict
    from .influence.task_if import task_influence

    settings = settings or InfluenceSettings()
    settings.validate()
    n_train, n_val = len(train_tasks_full), len(val_tasks_full)
    if is_distributed():
        dist = _dist()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        backend = str(dist.get_backend(group))
    else:
        rank, world, backend = 0, 1, None
    if world > min(n_train, n_val):
        raise SettingsError(f"{world} processes but the training pool has {n_train} tasks and the validation pool {n_val}: every process needs at least one task of each — use fewer processes")
    ids_full = torch.arange(n_train) if task_ids is None else torch.as_tensor(task_ids)
    if ids_full.shape != (n_train,):
        raise SettingsError(f"task_ids has shape {tuple(ids_full.shape)} but the training pool has {n_train} tasks")
    counts_train, counts_val = shard_counts(n_train, world), shard_counts(n_val, world)
    idx_train, idx_val = shard(n_train, rank, world), shard(n_val, rank, world)

    run_settings = settings
    notes: dict[str, Any] = {}
    if settings.solver == "lissa" and settings.lissa_batch and world > 1:
        if settings.lissa_batch > min(counts_train):
            raise SettingsError(f"lissa_batch = {settings.lissa_batch} exceeds the smallest shard ({min(counts_train)} tasks on {world} processes); set lissa_batch ≤ {min(counts_train)}")
        notes["lissa"] = "each process solved with subsets of its own shard: a local estimate, s differs between processes"
        warnings.warn("lissa with lissa_batch over several processes is a per-process estimate (each shard's s differs); use cg or lowrank for one exact solve", stacklevel=2)
    if settings.solver == "lowrank" and settings.lowrank_file:
        stem = Path(settings.lowrank_file)
        every, some = _agree(stem.with_name(stem.name + ".json").exists(), group)
        if some and not every:
            raise SettingsError(f"the eigenpair file {settings.lowrank_file} is visible to some processes only; put it on a filesystem every process sees, or delete it to recompute")
        if not every and rank != 0:
            run_settings = replace(settings, lowrank_file="")  # compute together, rank 0 saves

    local_train = train_tasks_full.subset(idx_train)
    local_val = val_tasks_full.subset(idx_val)
    with distribute(problem, group):
        res = task_influence(problem, lam, local_train, local_val, run_settings, ids_full[idx_train])
        scores = gather_rows(res.scores, counts_train, group)
        self_inf = None if res.self_influence is None else gather_rows(res.self_influence, counts_train, group)
        seconds = gather_rows(torch.tensor([res.diagnostics.get("timings_s", {}).get("total", float("nan"))], dtype=torch.float64), [1] * world, group)

    diag = dict(res.diagnostics)
    diag["distributed"] = {
        "world_size": world,
        "rank": rank,
        "backend": backend,
        "train_shard_sizes": counts_train,
        "val_shard_sizes": counts_val,
        "seconds_per_rank": seconds.tolist(),
        **notes,
    }
    settings_record = dict(res.settings)
    settings_record["influence"] = settings_dict(settings)
    result = replace(res, scores=scores, task_ids=ids_full, self_influence=self_inf, settings=settings_record, diagnostics=diag)
    if out is not None:
        if rank == 0:
            result.save(out, pool_fingerprint=pool_fingerprint)
        if is_distributed():
            _barrier(group)
    return result
