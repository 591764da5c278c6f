"""Gradients that influence is built from (docs/method.md §3, §7, §5).

* total gradients g_i = D_λ L_Q^i (in :class:`MetaProblem`),
* per-example mixed derivatives ∂_λ ∂_{u_z} L_Q^k (query example z) and ∂_λ ∂_{v_z} L_Q^k (support
  example z, through the unrolled inner loop): the gradient of task k's query loss with respect to λ,
  differentiated by the weight of one example. Contracted with a vector s they give every example's
  score in one reverse pass per task, without materialising (p × examples) matrices,
* the measurement gradient ∇f(λ*) (default f: mean query loss of the validation pool),
* the direct-IF baseline's gradients ∇_θ L_Q^k(θ_k), which ignore dθ/dλ (and those at θ = λ, EK-FAC IF's).
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import time
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch.func import grad, jacfwd, jacrev, jvp

from ..errors import SettingsError
from ..progress import bar
from ..meta.objective import MetaProblem, TaskRecord
from ..tasks.tensors import TaskTensors


def measurement_gradient(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors) -> tuple[torch.Tensor, float]:
    """(∇f(λ), f(λ)) for f = mean query loss over ``val_tasks`` after adaptation (no weight decay).

    Unrolled: one pass gives both (the loss is the gradient pass's forward); implicit: two."""
    grad_f, value, _ = measurement_gradients(problem, lam, val_tasks)
    return grad_f, value


def measurement_gradients(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors,
                          subsets: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """(∇f, f, ∇f_S): :func:`measurement_gradient` and, for each subset S of positions in ``val_tasks``, the mean
    gradient over S, shape (len(subsets), p) (None without subsets; one process only). Unrolled, the subsets ride on
    ∇f's pass (weight rows; ∇f bit for bit as without them), so the reliability's halves cost no pass of their own;
    otherwise each subset makes its own pass."""
    lam = lam.detach()
    n = problem.collective.total_count(len(val_tasks))
    if subsets and problem.collective.world_size > 1:
        raise SettingsError("subsets of the validation pool are positions in one process's pool; run without torchrun")
    if problem.inner.kind == "unrolled":
        rows = None
        if subsets:
            rows = torch.zeros(len(subsets), len(val_tasks), dtype=lam.dtype, device=lam.device)
            for r, S in enumerate(subsets):
                rows[r, list(S)] = 1.0 / len(S)
        value, gradient, _, row_gradients = problem.summed_loss_and_gradient_rows(lam, val_tasks, rows, desc="measurement gradient ∇f")
        return (gradient / n).detach(), float(value / n), row_gradients
    gradient = problem.sum_over_tasks(problem.task_total_gradient, lam, val_tasks, desc="measurement gradient ∇f") / n
    with torch.no_grad():
        value = problem.sum_over_tasks(problem.query_loss, lam, val_tasks) / n
    parts = torch.stack([measurement_gradient(problem, lam, val_tasks.subset(list(S)))[0] for S in subsets]) if subsets else None
    return gradient.detach(), float(value), parts


class _Pass(NamedTuple):
    """One ∇f pass kept in a reuse block; holding problem and pool keeps their ids from being reused."""
    grad_f: torch.Tensor
    value: float
    seconds: float
    problem: MetaProblem
    pool: TaskTensors
    subsets: dict[str, torch.Tensor]  # subsets key → (k, p) mean gradients summed in the same pass


class _KeptGradients(NamedTuple):
    """Per-task total gradients of a training pool made by a fisher fit's pass (kept for its scores and edits)."""
    gradients: torch.Tensor
    seconds: float  # that pass's time (its rows included): what a score reading them is charged
    problem: MetaProblem
    pool: TaskTensors


@dataclasses.dataclass
class _Reuse:
    memo: dict[tuple, _Pass] = dataclasses.field(default_factory=dict)  # (problem, pool, λ) key → its pass
    subsets_for: tuple[TaskTensors, list[list[int]]] | None = None
    task_gradients: dict[tuple, _KeptGradients] = dataclasses.field(default_factory=dict)  # (problem, pool, λ) key → g_i


_REUSE: contextvars.ContextVar[_Reuse | None] = contextvars.ContextVar("metainfluence_measurement_reuse", default=None)


@contextmanager
def reusing_measurement_gradients(subsets_for: tuple[TaskTensors, Sequence[Sequence[int]]] | None = None) -> Iterator[None]:
    """Within this block (f, ∇f) of one (problem, λ, validation pool) is computed once and handed to every score
    that needs it: task-IF's tiers, TracIn, TRAK. On a 9,000-task measurement that is a pass of minutes per
    method. Each reuse is charged the first computation's seconds (:func:`charged_measurement_gradient`), so
    every method's recorded time stays that of a stand-alone computation. ``subsets_for`` = (pool, subsets):
    the first ∇f pass over that pool also sums each subset's mean gradient (the reliability's halves,
    :func:`reused_subset_gradients`). The per-task total gradients a fisher curvature fit makes in its own pass
    (:func:`keep_task_gradients`) are kept too, for the scores and edits of that pool and λ
    (:func:`kept_task_gradients`). A block inside a block shares the outer one's memo."""
    outer = _REUSE.get()
    if outer is not None and subsets_for is None:
        yield
        return
    subsets = (subsets_for[0], [list(S) for S in subsets_for[1]]) if subsets_for is not None else None
    token = _REUSE.set(_Reuse(outer.memo, subsets, outer.task_gradients) if outer is not None else _Reuse({}, subsets))
    try:
        yield
    finally:
        _REUSE.reset(token)


def _reuse_key(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors) -> tuple | None:
    if _REUSE.get() is None:
        return None
    bits = lam.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return id(problem), id(val_tasks), str(lam.dtype), str(lam.device), hashlib.blake2b(bits, digest_size=16).hexdigest()


def _kept_pass(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors) -> _Pass | None:
    key = _reuse_key(problem, lam, val_tasks)
    return _REUSE.get().memo.get(key) if key is not None else None


# the kept per-task gradients are as large as the fisher factor beside them; above this they are not kept
KEEP_TASK_GRADIENTS_GB = 4.0


def keeping_task_gradients(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors) -> bool:
    """Whether per-task gradients of ``tasks`` made now would be kept: inside a reuse block, one process, at most
    :data:`KEEP_TASK_GRADIENTS_GB`."""
    size = len(tasks) * lam.numel() * lam.element_size() / 2**30
    return _REUSE.get() is not None and problem.collective.world_size == 1 and size <= KEEP_TASK_GRADIENTS_GB


def keep_task_gradients(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, gradients: torch.Tensor, seconds: float) -> None:
    """Keep g_i of ``tasks`` at ``lam`` for this reuse block (see :func:`keeping_task_gradients`)."""
    if keeping_task_gradients(problem, lam, tasks):
        _REUSE.get().task_gradients[_reuse_key(problem, lam, tasks)] = _KeptGradients(gradients.detach(), seconds, problem, tasks)


def kept_task_gradients(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors) -> _KeptGradients | None:
    """The per-task total gradients of ``tasks`` at ``lam`` (bit for bit) kept in this block, or None."""
    key = _reuse_key(problem, lam, tasks)
    return _REUSE.get().task_gradients.get(key) if key is not None else None


def _subsets_key(subsets: Sequence[Sequence[int]]) -> str:
    return hashlib.blake2b(repr([list(S) for S in subsets]).encode(), digest_size=16).hexdigest()


def reused_measurement_value(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors) -> float | None:
    """f of an earlier ∇f pass in the same :func:`reusing_measurement_gradients` block (None: there was none),
    so that rankings that only record f (loss, random, direct-IF) make no pass of their own for it."""
    kept = _kept_pass(problem, lam, val_tasks)
    return kept.value if kept is not None else None


def reused_subset_gradients(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors,
                            subsets: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """The (k, p) mean gradients over ``subsets`` that an earlier ∇f pass of this block summed (None: none did)."""
    kept = _kept_pass(problem, lam, val_tasks)
    rows = kept.subsets.get(_subsets_key(subsets)) if kept is not None else None
    return None if rows is None else rows.clone()


def charged_measurement_gradient(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors, diag: dict) -> tuple[torch.Tensor, float, float]:
    """(∇f, f, seconds): :func:`measurement_gradient`, reused inside :func:`reusing_measurement_gradients` when the
    same problem, pool and λ (bit for bit) asked before. A reuse records its first computation's seconds in
    ``diag["measurement_gradient_reused_s"]``, charged to the score's time, and returns them as ``seconds``."""
    reuse, key = _REUSE.get(), _reuse_key(problem, lam, val_tasks)
    if key is not None and key in reuse.memo:
        kept = reuse.memo[key]
        diag["measurement_gradient_reused_s"] = kept.seconds
        return kept.grad_f.clone(), kept.value, kept.seconds
    subsets = reuse.subsets_for[1] if key is not None and reuse.subsets_for is not None and reuse.subsets_for[0] is val_tasks \
        and problem.collective.world_size == 1 else []
    t = time.perf_counter()
    grad_f, value, rows = measurement_gradients(problem, lam, val_tasks, subsets)
    seconds = time.perf_counter() - t
    if key is not None:
        reuse.memo[key] = _Pass(grad_f.clone(), value, seconds, problem, val_tasks, {_subsets_key(subsets): rows} if subsets else {})
    return grad_f, value, seconds


def direct_gradients(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, adapt: bool = True) -> torch.Tensor:
    """∇_θ L_Q^k(θ_k) per task (direct-IF: the adapted parameters treated as if they were λ); with
    ``adapt=False`` the query loss at θ = λ itself (the single-level EK-FAC IF baseline)."""

    def one(lam, task: TaskRecord):
        theta = problem.adapt(lam, task).detach() if adapt else lam
        return grad(problem.weighted_loss)(theta, task.xq, task.yq, task.u)

    return problem.per_task(one, lam.detach(), tasks, desc="direct gradients").detach()


def direct_measurement_gradient(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors, adapt: bool = True) -> torch.Tensor:
    n = problem.collective.total_count(len(val_tasks))
    return problem.collective.all_sum(direct_gradients(problem, lam, val_tasks, adapt).sum(0)) / n


# which example weights of a task record an instance level differentiates: v (support) or u (query)
_WEIGHT_OF = {"support": "v", "query": "u"}


def _require_unrolled(problem: MetaProblem, what: str) -> None:
    if problem.inner.kind != "unrolled":
        raise SettingsError(f"{what} differentiates through the unrolled inner loop; with inner=implicit use the two-stage method "
                            "(--support-method two-stage)")


def example_scores(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, s: torch.Tensor, which: str) -> torch.Tensor:
    """sᵀ ∂_λ ∂_{w_z} L_Q^k for every example z of every task, shape (n, |set|).

    ``which`` = 'query' (w = u) or 'support' (w = v, exact for K-step MAML). One reverse pass of the
    scalar sᵀ g_k(λ, v, u) with respect to the example weights per task."""
    if which == "support":
        _require_unrolled(problem, "support instance-IF (unrolled)")
    field = _WEIGHT_OF[which]
    s = s.detach().to(lam)

    def one(lam, task: TaskRecord):
        contracted = lambda weight: torch.dot(s, problem.task_total_gradient(lam, task._replace(**{field: weight})))
        return jacrev(contracted)(getattr(task, field))

    return problem.per_task(one, lam.detach(), tasks).detach()


def example_mixed_gradients(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, which: str) -> torch.Tensor:
    """The full mixed derivatives ∂_λ ∂_{w_z} L_Q^k, shape (n, |set|, p) (for per-example parameter changes)."""
    if which == "support":
        _require_unrolled(problem, "support instance-IF (unrolled)")
    field = _WEIGHT_OF[which]

    def one(lam, task: TaskRecord):
        # g_k is linear in u and smooth in v: forward mode over the |set| weights is exact and cheap.
        along = lambda weight: problem.task_total_gradient(lam, task._replace(**{field: weight}))
        return jacfwd(along)(getattr(task, field)).T

    return problem.per_task(one, lam.detach(), tasks).detach()


def removed_examples_gradient(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, mask: torch.Tensor, which: str) -> torch.Tensor:
    """Σ_{z removed} ∂_λ ∂_{w_z} L_Q^k summed over tasks: one jvp per task along the removal mask (n, |set|)."""
    if which == "support":
        _require_unrolled(problem, "support instance-IF (unrolled)")
    field = _WEIGHT_OF[which]
    mask = mask.to(lam)

    def one(lam, task: TaskRecord, m):
        along = lambda weight: problem.task_total_gradient(lam, task._replace(**{field: weight}))
        return jvp(along, (getattr(task, field),), (m,))[1]

    return problem.sum_over_tasks(one, lam.detach(), tasks, extra=(mask,)).detach()


def _train_pass(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, s: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None,
                gradient_fn, diag: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunked pass: (sᵀg_k per task, ‖g_k‖ per task, Σ_k g_k) without storing all g_k.

    ``s`` may be a (p,) vector, a (p, m) matrix (m dot products per task: pairwise scores) or a
    function of a chunk's (c, p) gradients (trak's projection), so every pass over the training
    gradients is this one. Total gradients a fisher fit kept in this reuse block are read instead of made
    (``diag["task_gradients_reused_s"]``: the seconds of the pass that made them)."""
    dots, norms = [], []
    total = torch.zeros_like(lam)
    chunks = list(problem.chunks(len(tasks), lam, tasks))
    # total gradients a fisher fit kept in this block: read, not recomputed; charged that pass's seconds
    kept = kept_task_gradients(problem, lam, tasks) if gradient_fn is _total_gradients else None
    if kept is not None and diag is not None:
        diag["task_gradients_reused_s"] = kept.seconds
    for c in chunks if kept is not None else bar("task gradients", len(chunks), "chunk", iterable=chunks):
        G = kept.gradients[c] if kept is not None else gradient_fn(problem, lam, tasks.subset(c))
        total += G.sum(0)
        norms.append(G.norm(dim=1))
        if s is None:
            dots.append(torch.zeros(G.shape[0], dtype=G.dtype, device=G.device))
        else:
            dots.append(s(G) if callable(s) else G @ s)
    return torch.cat(dots), torch.cat(norms), problem.collective.all_sum(total)


def _total_gradients(problem, lam, tasks):
    return problem.total_gradients(lam, tasks)


def total_gradients_of(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, diag: dict | None = None) -> torch.Tensor:
    """``problem.total_gradients``, read from a fisher fit's pass when this reuse block kept them (then ``diag``
    records that pass's seconds, as :func:`_train_pass` does)."""
    kept = kept_task_gradients(problem, lam, tasks)
    if kept is None:
        return problem.total_gradients(lam, tasks)
    if diag is not None:
        diag["task_gradients_reused_s"] = kept.seconds
    return kept.gradients
