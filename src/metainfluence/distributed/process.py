"""Process groups, sharding, collectives and the torch.distributed Collective of a MetaProblem."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import SettingsError
from ..meta.collective import Collective
from ..meta.objective import MetaProblem


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

    def any_true(self, flag: bool) -> bool:
        return all_reduce_count(int(bool(flag)), self.group) > 0


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
