"""The bilevel objective of docs/method.md §1, as pure functions of a flat meta-parameter vector λ.

Inner problem (adaptation) of task i, on the inner objective
    L_in(θ; λ) = L_S(θ; S_i, v) + (γ/2)‖θ − λ‖²,     L_S = Σ_j v_j ℓ(x_j, y_j; θ) / |S_i|
  * ``unrolled`` (MAML): K steps of gradient descent from θ = λ, differentiated through (second order);
    ANIL-style, the steps move only some parameters (``InnerSettings.adapt``, meta/inner.py);
  * ``implicit`` (iMAML): θ_i ≈ argmin L_in, derivatives by the implicit function theorem,
    dθ_i/dλ = γ (∇²_θ L_S + γI)^{-1}.
Outer objective with task weights w:
    F(λ; w) = (1/n) Σ_i w_i L_Q^i(λ) + (μ/2)‖λ‖²,   L_Q^i(λ) = Σ_j u_j ℓ(x_j, y_j; θ_i(λ)) / |Q_i|.

Per-task functions take λ and one task's :class:`TaskRecord` (support/query tensors and example
weights) and are vectorised over tasks with ``torch.func.vmap``; pool-level functions loop over chunks
of ``chunk_size`` tasks to bound memory. Sums over tasks go through the problem's
:class:`~metainfluence.meta.collective.Collective`, so that a task pool sharded over processes gives
the same numbers (see :mod:`metainfluence.distributed`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from ..allocator import chunk_budget_bytes
from ..errors import SettingsError, require
from ..linalg.cg import fixed_step_cg
from ..progress import bar
from ..tasks.tensors import TaskTensors
from .collective import SINGLE_PROCESS, Collective
from .inputs import WORKING_DTYPES, check_model, check_task_tensors, check_working_dtype, task_bytes  # noqa: F401 (λ checks re-exported)
from .inner import AdaptedPart, InnerSettings  # noqa: F401 (InnerSettings re-exported: its home was here)
from .params import ParamSpec


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).flatten(1).sum(1)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": _squared_error,
}


class TaskRecord(NamedTuple):
    """One task as the per-task functions see it (a batch of tasks inside ``vmap``): support set
    (xs, ys) with example weights v, query set (xq, yq) with example weights u."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor

    def row(self, index) -> "TaskRecord":
        """The task(s) at ``index`` (an int, a slice or an index tensor) of a batched record."""
        return TaskRecord(*(t[index] for t in self))


class MetaProblem:
    """A meta-learning problem: a model template, a per-example loss, an inner solver and μ.

    Everything is a function of the flat meta-parameters ``lam`` (λ, shape (p,)); the module's own
    parameters are only used by :meth:`init_params` for the initial value and for shapes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
        inner: InnerSettings | None = None,
        weight_decay: float = 0.0,
        chunk_size: int | None = None,
        collective: Collective | None = None,
    ):
        require(isinstance(model, nn.Module), f"the model is a {type(model).__name__}, not a torch.nn.Module; pass the network itself (e.g. metainfluence.meta.models.MLP)")
        self.model = model
        self.spec = ParamSpec.from_module(model)
        check_model(model, self.spec.dim)
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise SettingsError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or pass a callable (out, y) -> per-example losses")
            self.loss_name = loss
            self.loss_fn = LOSSES[loss]
        else:
            self.loss_name = getattr(loss, "__name__", "custom")
            self.loss_fn = loss
        self.inner = inner or InnerSettings()
        self.inner.validate()
        # ANIL-style: the inner loop moves only these parameters (None: all of them, MAML)
        self.adapted = AdaptedPart.of(self.spec, self.inner.adapt)
        self._masks: dict[tuple, torch.Tensor] = {}
        if weight_decay < 0:
            raise SettingsError(f"weight decay μ must be ≥ 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        if chunk_size is not None and chunk_size < 1:
            raise SettingsError(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.chunk_size = chunk_size
        # sums over tasks and per-task rows cross processes through this (one process by default)
        self.collective: Collective = collective or SINGLE_PROCESS
        self._measured: dict[tuple, tuple] = {}  # the model run on one task, per pool shape and dtype (_checked)
        self._trainable = frozenset(self.spec.names)
        self._cast: tuple[Any, dict[str, torch.Tensor]] = (None, {})  # constants cast to λ's dtype (_constants)

    # ------------------------------------------------------------------ parameters
    @property
    def dim(self) -> int:
        return self.spec.dim

    def init_params(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        params = {n: p.detach() for n, p in self.model.named_parameters() if n in self._trainable}
        return self.spec.flatten(params).to(dtype=dtype, device=device).clone()

    # ------------------------------------------------------------------ one task
    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.spec.unflatten(theta), **self._constants(theta)}, (x,))

    def _constants(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's floating constants (buffers, frozen parameters) in θ's dtype and device where theirs differ, so
        that a float32 model serves a float64 λ; cached while the constants are unchanged (their storage and version)."""
        held = [(n, t) for n, t in (*self.model.named_buffers(), *self.model.named_parameters())
                if t.is_floating_point() and n not in self._trainable and (t.dtype != theta.dtype or t.device != theta.device)]
        if not held:
            return {}
        key = (theta.dtype, theta.device, tuple((n, t.data_ptr(), t._version) for n, t in held))
        if self._cast[0] != key:
            self._cast = (key, {n: t.detach().to(dtype=theta.dtype, device=theta.device) for n, t in held})
        return self._cast[1]

    def example_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_example(self.loss_fn(self.forward(theta, x), y), x)

    def per_example(self, losses: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``losses`` unless the loss gave other than one value per example of ``x`` (a shape check; fine under vmap)."""
        if losses.shape != x.shape[:1]:
            raise SettingsError(f"the loss {self.loss_name!r} returned shape {tuple(losses.shape)} for {x.shape[0]} examples; it must return per-example losses of shape ({x.shape[0]},) (reduction='none')")
        return losses

    def weighted_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_j weight_j ℓ(x_j, y_j; θ) / |set| — L_S with v, or L_Q with u."""
        return (weights * self.example_losses(theta, x, y)).sum() / x.shape[0]

    def inner_objective(self, theta, lam, task: TaskRecord) -> torch.Tensor:
        value = self.weighted_loss(theta, task.xs, task.ys, task.v)
        if self.inner.proximal > 0:
            value = value + 0.5 * self.inner.proximal * ((theta - lam) ** 2).sum()
        return value

    def inner_hvp(self, theta, lam, task: TaskRecord, direction) -> torch.Tensor:
        """(∇²_θ L_S + γI) · direction at θ (the inner Hessian of docs/method.md §7)."""
        g = lambda th: grad(self.inner_objective)(th, lam, task)
        return jvp(g, (theta,), (direction,))[1]

    def adapt(self, lam, task: TaskRecord) -> torch.Tensor:
        """θ_i(λ): differentiable through the unrolled steps; detached for implicit (use the IFT)."""
        cfg = self.inner
        if cfg.kind == "unrolled":
            theta = lam
            if self.adapted is not None:  # ANIL-style: the steps move the adapted entries h only
                h = lam_h = self.adapted.take(lam)
                for _ in range(cfg.steps):
                    g = grad(self._adapted_objective)(h, lam, lam_h, task)
                    h = h - cfg.lr * (g.detach() if cfg.first_order else g)
                return self.adapted.put(lam, h)
            for _ in range(cfg.steps):
                g = grad(self.inner_objective)(theta, lam, task)
                if cfg.first_order:
                    g = g.detach()
                theta = theta - cfg.lr * g
            return theta
        lam_d = lam.detach()
        theta = lam_d
        for _ in range(cfg.steps):
            theta = theta - cfg.lr * grad(self.inner_objective)(theta, lam_d, task).detach()
        return theta.detach()

    def _adapted_objective(self, h, lam, lam_h, task: TaskRecord) -> torch.Tensor:
        """L_in as a function of the adapted entries h, the other parameters at λ's values: the network gets them apart,
        so that the backward pass of a step stops at the adapted layers."""
        params = {**self.spec.unflatten(lam), **self.adapted.params(h), **self._constants(lam)}
        value = (task.v * self.per_example(self.loss_fn(functional_call(self.model, params, (task.xs,)), task.ys), task.xs)).sum() / task.xs.shape[0]
        return value + 0.5 * self.inner.proximal * ((h - lam_h) ** 2).sum() if self.inner.proximal > 0 else value

    def masked(self, g: torch.Tensor) -> torch.Tensor:
        """M g: ``g`` with the entries of parameters the inner loop does not adapt set to 0 (``g`` itself for MAML)."""
        if self.adapted is None:
            return g
        key = (g.dtype, g.device)
        if key not in self._masks:
            self._masks[key] = self.adapted.mask.to(dtype=g.dtype, device=g.device)
        return g * self._masks[key]

    def query_outputs(self, lam, task: TaskRecord) -> torch.Tensor:
        """The model's outputs on the query inputs after adaptation, f(θ_i(λ), x_Q)."""
        return self.forward(self.adapt(lam, task), task.xq)

    def query_loss(self, lam, task: TaskRecord) -> torch.Tensor:
        """L_Q^i(λ). Differentiable in λ for ``unrolled``; for ``implicit`` use :meth:`task_total_gradient`."""
        return self.weighted_loss(self.adapt(lam, task), task.xq, task.yq, task.u)

    def implicit_jacobian_t(self, theta, lam, task: TaskRecord, vec) -> torch.Tensor:
        """(dθ_i/dλ)ᵀ vec = γ (∇²L_S + γI)^{-1} vec (the matrix is symmetric), by fixed-step CG."""
        mv = lambda z: self.inner_hvp(theta, lam, task, z)
        return self.inner.proximal * fixed_step_cg(mv, vec, self.inner.implicit_cg_steps)

    def task_total_gradient(self, lam, task: TaskRecord) -> torch.Tensor:
        """g_i = D_λ L_Q^i(λ), the total gradient through θ_i(λ) (docs/method.md §3)."""
        if self.inner.kind == "unrolled":
            return grad(self.query_loss)(lam, task)
        theta = self.adapt(lam, task)
        gq = grad(self.weighted_loss)(theta, task.xq, task.yq, task.u)
        return self.implicit_jacobian_t(theta, lam.detach(), task, gq)

    def task_total_hvp(self, lam, task: TaskRecord, direction) -> torch.Tensor:
        """H_i · direction, H_i = D²_λ L_Q^i: forward-over-reverse through the unrolled inner loop."""
        return jvp(lambda l: grad(self.query_loss)(l, task), (lam,), (direction,))[1]

    # ------------------------------------------------------------------ pool level
    def default_weights(self, tasks: TaskTensors, like: torch.Tensor):
        n = len(tasks)
        v = torch.ones(n, tasks.n_support, dtype=like.dtype, device=like.device)
        u = torch.ones(n, tasks.n_query, dtype=like.dtype, device=like.device)
        return v, u

    def example_weights(self, tasks: TaskTensors, weights, like: torch.Tensor):
        """(v, u) of a user's ``weights`` = (v, u) cast like ``like`` and shape-checked against
        ``tasks`` ((n, |S|), (n, |Q|)); (None, None) for None (the default all-ones weights)."""
        if weights is None:
            return None, None
        v, u = (torch.as_tensor(t).to(device=like.device, dtype=like.dtype) for t in weights)
        n = len(tasks)
        if tuple(v.shape) != (n, tasks.n_support) or tuple(u.shape) != (n, tasks.n_query):
            raise SettingsError(f"example weights have shapes {tuple(v.shape)}, {tuple(u.shape)}; expected ({n}, {tasks.n_support}) and ({n}, {tasks.n_query})")
        return v, u

    def chunks(self, n: int, lam: torch.Tensor | None = None, tasks: TaskTensors | None = None) -> Iterator[slice]:
        """Slices of ``chunk_size`` tasks; without one, as many tasks of ``tasks`` as fit the memory budget
        (:meth:`auto_chunk`), or all ``n`` at once when no pool is given."""
        step = self.chunk_size or (self.auto_chunk(lam, tasks) if tasks is not None and lam is not None else n)
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))

    def auto_chunk(self, lam: torch.Tensor, tasks: TaskTensors, columns: int = 1) -> int:
        """Tasks per vmapped chunk when ``chunk_size`` is unset: as many as fit ``allocator.chunk_budget_bytes``
        by the bound of :func:`.inputs.task_bytes` (a whole small pool at once; a few 84×84 tasks a chunk), each
        task ``columns`` times over (directions vmapped over a chunk)."""
        per_task = task_bytes(self, lam, tasks, self._checked(lam, tasks)[0]) * columns
        return max(1, min(len(tasks), chunk_budget_bytes(lam.device) // max(1, per_task)))

    def _checked(self, lam: torch.Tensor, tasks: TaskTensors) -> tuple[int, tuple[int, ...] | None]:
        """:func:`.inputs.check_task_tensors` of ``tasks``; the model runs once per pool shape and dtype (its measurement
        is kept), so the passes of a training run or a solve repeat only the cheap checks."""
        key = (tuple(tasks.support_x.shape[1:]), tuple(tasks.query_x.shape[1:]), lam.dtype, lam.device.type)
        self._measured[key] = check_task_tensors(self, lam, tasks, self._measured.get(key))
        return self._measured[key]

    def records(self, lam, tasks: TaskTensors, v=None, u=None) -> TaskRecord:
        """The pool as one batched :class:`TaskRecord` (weights default to ones, cast like λ).

        dtype rule: everything is computed in λ's dtype (float32 or float64); floating task tensors
        (inputs, regression targets) are cast to it, so float32 pools serve a float64 λ and back."""
        check_working_dtype(lam)
        if any(t.is_floating_point() and t.dtype != lam.dtype for t in (tasks.support_x, tasks.query_x, tasks.support_y, tasks.query_y)):
            tasks = tasks.to(dtype=lam.dtype)
        self._checked(lam, tasks)
        dv, du = self.default_weights(tasks, lam)
        v = dv if v is None else v.to(lam)
        u = du if u is None else u.to(lam)
        return TaskRecord(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, v, u)

    def _chunk_slices(self, lam, tasks: TaskTensors, desc: str | None) -> Iterable[slice]:
        """The chunks of a pass over ``tasks``; with ``desc``, under a progress bar (a heartbeat line in logs), so
        that a pass of minutes (a large validation pool, 84×84 tasks in float64) is not silent."""
        n = len(tasks)
        slices = list(self.chunks(n, lam, tasks))
        return slices if desc is None else bar(desc, len(slices), "chunk", iterable=slices)

    def _mapped_chunks(self, fn: Callable, lam, tasks: TaskTensors, v, u, extra: tuple, desc: str | None = None):
        """(chunk slice, fn over the chunk's tasks) pairs: ``fn(lam, task, *extra)`` vmapped over tasks."""
        record = self.records(lam, tasks, v, u)
        mapped = vmap(fn, in_dims=(None, 0) + (0,) * len(extra))
        for c in self._chunk_slices(lam, tasks, desc):
            chunk = record.row(c)
            yield c, mapped(lam, chunk, *[e[c] for e in extra])

    def per_task(self, fn: Callable, lam: torch.Tensor, tasks: TaskTensors, v=None, u=None, extra: tuple = (),
                 desc: str | None = None) -> torch.Tensor:
        """Stack ``fn(lam, task, *extra)`` over tasks (vmapped, chunked). ``extra`` items are per task."""
        return torch.cat([out for _, out in self._mapped_chunks(fn, lam, tasks, v, u, extra, desc)])

    def sum_over_tasks(self, fn: Callable, lam: torch.Tensor, tasks: TaskTensors, w=None, v=None, u=None, extra: tuple = (),
                       reduce: bool = True, accumulate: torch.dtype | None = None, desc: str | None = None) -> torch.Tensor:
        """Σ_i w_i fn(task i), over all shards: chunked so that only one chunk's graph is alive at a time.
        ``accumulate``: the dtype the chunks' sums are added in (e.g. float64 over float32 products)."""
        w = torch.ones(len(tasks), dtype=lam.dtype, device=lam.device) if w is None else w.to(lam)
        total = None
        for c, out in self._mapped_chunks(fn, lam, tasks, v, u, extra, desc):
            part = torch.tensordot(w[c], out, dims=1)
            if accumulate is not None:
                part = part.to(accumulate)
            total = part if total is None else total + part
        return self.collective.all_sum(total) if reduce else total

    def task_losses(self, lam, tasks: TaskTensors, v=None, u=None) -> torch.Tensor:
        """L_Q^i(λ) for every task, shape (n,)."""
        with torch.no_grad():
            return self.per_task(self.query_loss, lam, tasks, v, u)

    def objective(self, lam, tasks: TaskTensors, w=None, v=None, u=None) -> torch.Tensor:
        """F(λ; w). For ``implicit`` the value is exact but not differentiable: use :meth:`meta_gradient`."""
        n = self.collective.total_count(len(tasks))
        total = self.sum_over_tasks(self.query_loss, check_working_dtype(lam), tasks, w, v, u, accumulate=torch.float64)
        return total / n + 0.5 * self.weight_decay * (lam.double() ** 2).sum()

    def meta_gradient(self, lam, tasks: TaskTensors, w=None, v=None, u=None) -> torch.Tensor:
        """∇_λ F(λ; w) = (1/n) Σ_i w_i g_i + μλ."""
        n = self.collective.total_count(len(tasks))
        total = self.sum_over_tasks(self.task_total_gradient, check_working_dtype(lam).detach(), tasks, w, v, u)
        return total / n + self.weight_decay * lam.detach()

    def value_and_gradient(self, lam, tasks: TaskTensors, w=None, v=None, u=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F(λ; w), ∇F(λ; w)) in one pass over the tasks for ``unrolled``; two for ``implicit``."""
        lam = check_working_dtype(lam).detach()
        if self.inner.kind == "implicit":
            with torch.no_grad():
                value = self.objective(lam, tasks, w, v, u)
            return value, self.meta_gradient(lam, tasks, w, v, u)
        n = self.collective.total_count(len(tasks))
        value, gradient = self.summed_loss_and_gradient(lam, tasks, w, v, u)
        value = value / n + 0.5 * self.weight_decay * (lam.double() ** 2).sum()
        return value, gradient / n + self.weight_decay * lam

    def summed_loss_and_gradient(self, lam, tasks: TaskTensors, w=None, v=None, u=None,
                                 desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_i w_i L_Q^i, Σ_i w_i g_i) over all shards in one pass (``unrolled``): the loss in float64."""
        value, gradient, _, _ = self.summed_loss_and_gradient_rows(lam, tasks, None, w, v, u, desc)
        return value, gradient

    def summed_loss_and_gradient_rows(self, lam, tasks: TaskTensors, rows: torch.Tensor | None, w=None, v=None, u=None,
                                      desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`summed_loss_and_gradient` and, in the same pass, the sums under each extra weight row of ``rows``
        (k, n): (k,) losses and (k, p) gradients (None without rows). The w-sum is formed exactly as without rows,
        so asking for rows leaves it bit for bit unchanged; the rows cost one (k × chunk)·(chunk × p) product a chunk."""
        if self.inner.kind != "unrolled":
            raise SettingsError("one pass gives the loss with its gradient only through the unrolled inner loop")
        lam = check_working_dtype(lam).detach()
        record = self.records(lam, tasks, v, u)
        w = torch.ones(len(tasks), dtype=lam.dtype, device=lam.device) if w is None else w.to(lam)
        # Per-task gradients inside the vmap, weighted afterwards: the other order, grad of a vmapped sum, went wrong
        # with torch's native batch norm under MAML's second-order step (7.5% along −∇F on the Omniglot recipe,
        # benchmarks/batchnorm_derivatives.py), and a user's model may still hold that kernel. Cost: up to a fifth of
        # a training step.
        both = vmap(grad_and_value(self.query_loss), in_dims=(None, 0))
        # F is added up in float64 whatever λ's dtype, so that a line search's comparisons near ‖∇F‖/ḡ = 1e-4 are not
        # limited by float32 rounding of a sum over thousands of tasks (a precaution: the stall that prompted it had
        # the cause above)
        value = torch.zeros((), dtype=torch.float64, device=lam.device)
        gradient = torch.zeros_like(lam)
        if rows is not None:
            rows = rows.to(lam)
            row_values = torch.zeros(len(rows), dtype=torch.float64, device=lam.device)
            row_gradients = torch.zeros(len(rows), lam.numel(), dtype=lam.dtype, device=lam.device)
        for c in self._chunk_slices(lam, tasks, desc):
            g, val = both(lam, record.row(c))
            g, val = g.detach(), val.detach().double()
            value = value + torch.dot(w[c].double(), val)
            gradient = gradient + w[c] @ g
            if rows is not None:
                row_values += rows[:, c].double() @ val
                row_gradients += rows[:, c] @ g
        summed = (self.collective.all_sum(value), self.collective.all_sum(gradient))
        return summed + ((self.collective.all_sum(row_values), self.collective.all_sum(row_gradients)) if rows is not None else (None, None))

    def total_gradients(self, lam, tasks: TaskTensors, v=None, u=None, desc: str | None = None) -> torch.Tensor:
        """Per-task total gradients g_i, shape (n, p) (docs/method.md §3)."""
        return self.per_task(self.task_total_gradient, check_working_dtype(lam).detach(), tasks, v, u, desc=desc).detach()

    def inner_gradient_norms(self, lam, tasks: TaskTensors, v=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per task, ‖∇_θ L_in(θ_i; λ)‖ at the adapted θ_i and at θ = λ (how far the inner solve got)."""

        def one(lam, task: TaskRecord):
            theta = self.adapt(lam, task).detach()
            at = lambda th: grad(self.inner_objective)(th, lam, task).norm()
            return torch.stack([at(theta), at(lam)])

        with torch.no_grad():
            out = self.per_task(one, lam.detach(), tasks, v)
        return out[:, 0], out[:, 1]

    def implicit_solve_residuals(self, lam, tasks: TaskTensors, v=None, u=None) -> torch.Tensor:
        """Per task, the relative residual ‖A x − b‖/‖b‖ of the fixed-step CG behind dθ_i/dλ (A = ∇²L_S + γI
        at θ_i, b = the query gradient). CG stopped short is not linear in b, so a large residual makes
        the total gradients inexact and the total Hessian's products non-symmetric."""

        def one(lam, task: TaskRecord):
            theta = self.adapt(lam, task).detach()
            b = grad(self.weighted_loss)(theta, task.xq, task.yq, task.u)
            mv = lambda z: self.inner_hvp(theta, lam, task, z)
            x = fixed_step_cg(mv, b, self.inner.implicit_cg_steps)
            return (mv(x) - b).norm() / b.norm().clamp_min(1e-300)

        with torch.no_grad():
            return self.per_task(one, lam.detach(), tasks, v, u)

    def task_metrics(self, lam, tasks: TaskTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and accuracy after adaptation, per task (accuracy is NaN for regression)."""

        def one(lam, task: TaskRecord):
            theta = self.adapt(lam, task)
            out = self.forward(theta, task.xq)
            loss = (task.u * self.per_example(self.loss_fn(out, task.yq), task.xq)).sum() / task.xq.shape[0]
            if out.dim() == 2 and task.yq.dim() == 1 and not task.yq.is_floating_point():
                acc = (out.argmax(-1) == task.yq).to(out.dtype).mean()
            else:
                acc = torch.full((), float("nan"), dtype=out.dtype)
            return torch.stack([loss, acc])

        with torch.no_grad():
            out = self.per_task(one, check_working_dtype(lam).detach(), tasks)
        return out[:, 0], out[:, 1]

    def settings_json(self) -> dict:
        from dataclasses import asdict

        return {
            "model": type(self.model).__name__,
            "n_params": self.dim,
            "loss": self.loss_name,
            # adapt = "all" (MAML) is left out, as every record from before the setting: the fingerprints of curvature
            # files and ground-truth stores of such problems stay what they were
            "inner": {k: v for k, v in asdict(self.inner).items() if not (k == "adapt" and v == "all")},
            "weight_decay": self.weight_decay,
            "chunk_size": self.chunk_size,
        }
