"""Checks that a task pool fits a problem's model and loss, before any pass over it (``problem``: a MetaProblem).

A mismatch that torch would otherwise report deep inside ``vmap`` (``mat1 and mat2 shapes cannot be
multiplied``, ``Target 7 is out of bounds``) or, worse, not at all (squared error broadcasting targets of
shape (m,) against outputs (m, 1) into an (m, m) table) is refused here with a one-line error naming the
tensor and the remedy. The check runs the model on one task's support set: cheap next to any pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SettingsError, require
from ..tasks.tensors import TaskTensors


# per-example losses that take class indices (integer targets) rather than values shaped like the output
_CLASS_INDEX_LOSSES = ("cross_entropy",)

WORKING_DTYPES = (torch.float32, torch.float64)


def check_working_dtype(lam: torch.Tensor) -> torch.Tensor:
    """λ sets the dtype of every computation: refuse a non-tensor or anything but float32 / float64 with the remedy."""
    require(isinstance(lam, torch.Tensor), f"λ is a {type(lam).__name__}, not a torch tensor; pass torch.as_tensor(lam, dtype=torch.float64)")
    if lam.dtype not in WORKING_DTYPES:
        raise SettingsError(f"λ has dtype {lam.dtype}; the library computes in float32 or float64 — pass lam.double() (exact tier) or lam.float()")
    return lam


def check_start_lambda(lam: Any, **pools: Any) -> None:
    """Refuse a starting λ that is not a flat tensor before anything reads it (a state_dict gets the way to its flat λ),
    and ``pools`` (argument name → value; None allowed) that are not :class:`TaskTensors`."""
    for name, pool in pools.items():
        if pool is not None and not isinstance(pool, TaskTensors):
            how = (f"{name}.tensors() (of a build_pool pool: {name}.tensors(dataset))" if callable(getattr(pool, "tensors", None))
                   else "metainfluence.TaskTensors(support_x, support_y, query_x, query_y)")
            raise SettingsError(f"{name} is a {type(pool).__name__}, not a TaskTensors (the stacked tasks every stage reads); pass {how}")
    if isinstance(lam, Mapping):
        raise SettingsError(f"got a {type(lam).__name__} (a state_dict?) as λ, not the flat parameter tensor; load it into the model "
                            "(model.load_state_dict(state)) and pass problem.init_params(torch.float64)")
    if not isinstance(lam, torch.Tensor) or not lam.is_floating_point():
        check_working_dtype(lam)  # its one-line refusal of a non-tensor or an integer λ (which a cast would take silently)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_parameters(problem: Any, lam: torch.Tensor) -> None:
    """λ must be the flat vector of this model's parameters."""
    if lam.dim() != 1 or lam.numel() != problem.dim:
        raise SettingsError(
            f"λ has shape {tuple(lam.shape)} but the model {type(problem.model).__name__} has {problem.dim} parameters, "
            f"so λ must have shape ({problem.dim},); start from problem.init_params() or the λ saved with this model")


# bytes one task of a vmapped pass holds, per byte of the model's activations on its examples (support ones once per inner
# step) and per byte of λ: the peaks of exact total-Hessian products, the heaviest per-task work, are measured against
# this bound by benchmarks/bench_chunk_memory.py (up to 11× the activations with batch norm, 12× λ for an MLP)
ACTIVATION_FACTOR, PARAMETER_FACTOR = 16, 16


def task_bytes(problem: Any, lam: torch.Tensor, tasks: TaskTensors, activations_per_example: int) -> int:
    """A bound on the memory one task of a vmapped pass over ``tasks`` takes (see ACTIVATION_FACTOR)."""
    examples = tasks.n_support * max(1, problem.inner.steps) + tasks.n_query
    item = lam.element_size()
    return int(ACTIVATION_FACTOR * activations_per_example * examples * item + PARAMETER_FACTOR * problem.dim * item)


def check_task_tensors(problem: Any, lam: torch.Tensor, tasks: TaskTensors,
                       measured: tuple[int, tuple[int, ...] | None] | None = None) -> tuple[int, tuple[int, ...] | None]:
    """Refuse a pool whose inputs the model cannot take or whose targets the loss cannot read. Returns what running
    the model on one task's support set measured: (activations per example — elements of every leaf module's output,
    which size automatic chunks —, the output shape per example). ``measured``: that pair from an earlier pool of the
    same shapes, so that only the cheap checks (λ, dtypes, label values) run again and not the model."""
    check_parameters(problem, lam)
    check_model_modes(problem.model)
    for name in ("support_x", "query_x"):
        t = getattr(tasks, name)
        if not t.is_floating_point():
            raise SettingsError(f"{name} has dtype {t.dtype}; inputs must be floating point (e.g. images as x.float() / 255)")
    if tasks.support_x.shape[2:] != tasks.query_x.shape[2:]:
        raise SettingsError(f"support inputs are {tuple(tasks.support_x.shape[2:])} per example but query inputs "
                            f"{tuple(tasks.query_x.shape[2:])}; both sets need the same example shape")
    if measured is None:
        measured = _run_model(problem, lam, tasks)
    for name in ("support_y", "query_y"):
        try:
            _check_targets(problem, name, getattr(tasks, name), measured[1])
        except SettingsError as exc:  # which pool: the training and validation pools are checked alike
            raise SettingsError(f"{exc} (in a pool of {len(tasks)} tasks)") from None
    return measured


def check_model(model: nn.Module, dim: int) -> None:
    """A model with something to meta-learn (``dim`` trainable parameters); warns of torch's native batch norm where it
    normalises by batch statistics (its derivatives beyond second order are wrong; in eval mode it is an affine map)."""
    if dim == 0:
        frozen = sum(p.numel() for p in model.parameters())
        raise SettingsError(f"the model {type(model).__name__} has no trainable parameters"
                            + (f" (its {frozen} parameters all have requires_grad=False)" if frozen else "")
                            + "; meta-learning needs some: unfreeze the layers to meta-learn (p.requires_grad_(True))")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats) for m in model.modules()):
        warnings.warn("the model holds torch's native batch norm, whose derivatives beyond second order are wrong "
                      "(benchmarks/batchnorm_derivatives.py): Hessian products through the inner step will be off; "
                      "build the norm with metainfluence.meta.models.TaskBatchNorm (the same function and parameter names)",
                      UserWarning, stacklevel=3)
    if any(type(m) is nn.LayerNorm for m in model.modules()):
        warnings.warn("the model holds torch's native nn.LayerNorm, whose derivatives beyond second order are wrong (as batch norm's): "
                      "exact Hessian products through the inner step will be off (gradients, and the gauss-newton and fisher kinds, are "
                      "not affected); build it with metainfluence.meta.models.PlainLayerNorm (the same function and parameter names)",
                      UserWarning, stacklevel=3)


def check_model_modes(model: nn.Module) -> None:
    """Refuse layers whose training mode cannot run inside the per-task transforms: dropout draws random masks (every
    pass, hence every score, would differ) and batch norm with running statistics updates them in place."""
    for name, m in model.named_modules():
        where = f"{type(model).__name__}.{name}" if name else type(model).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise SettingsError(f"{where} is dropout in training mode: its random masks would make every gradient, Hessian product "
                                "and score differ from pass to pass; call model.eval() before building the MetaProblem (dropout is "
                                "then the identity), or leave dropout out of the meta-learner")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            raise SettingsError(f"{where} is batch norm in training mode with running statistics, which every pass would update "
                                "in place (torch.func refuses it); call model.eval() to normalise with the stored statistics, or "
                                "build it with metainfluence.meta.models.TaskBatchNorm to normalise each task by its own batch "
                                "statistics (the MAML recipe)")


def _run_model(problem: Any, lam: torch.Tensor, tasks: TaskTensors) -> tuple[int, tuple[int, ...] | None]:
    """The model on the first task's support set, under forward hooks: (activations per example, output shape per example)."""
    x = tasks.support_x[0]
    counted = [0]

    def count(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            counted[0] += output.numel()

    leaves = [m for m in problem.model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            out = problem.forward(lam.detach(), x)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        if any(w in str(exc) for w in ("scalar type", "dtype", "Double", "Float")):
            raise SettingsError(
                f"the model {type(problem.model).__name__} fails in λ's dtype {lam.dtype} ({_first_line(exc)}); a tensor it makes "
                f"or holds outside its parameters and buffers has another dtype: create it in the input's dtype (x.dtype), or "
                f"compute in that tensor's dtype (lam.float() for float32)") from None
        raise SettingsError(
            f"the model {type(problem.model).__name__} cannot take inputs of shape {tuple(x.shape[1:])} per example "
            f"(a pool of {len(tasks)} tasks; {_first_line(exc)}); build the model for this input shape, or resize the inputs to the "
            "shape it was built for") from None
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):  # a tuple or dict, which a custom loss unpacks: no output shape to check targets by
        return counted[0] // max(1, x.shape[0]), None
    return max(counted[0], out.numel()) // max(1, x.shape[0]), tuple(out.shape[1:])


def _check_targets(problem: Any, name: str, y: torch.Tensor, per_example_out: tuple[int, ...] | None) -> None:
    """Targets of one set against the model's output shape per example."""
    per_example_y = tuple(y.shape[2:])
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):  # also after the pool was built (edited in place)
        raise SettingsError(f"{name} contains NaN or inf; clean the targets (every gradient and score would be NaN)")
    if per_example_out is None:  # the model returns a tuple or dict: the loss's own per-example check is what remains
        require(problem.loss_name not in ("cross_entropy", "mse"), f"the model {type(problem.model).__name__} returns a tuple or dict, "
                f"which the built-in loss {problem.loss_name!r} cannot read; pass a callable loss that picks the output, e.g. "
                "lambda out, y: F.cross_entropy(out[0], y, reduction='none')")
        return
    if problem.loss_name in _CLASS_INDEX_LOSSES:
        if per_example_out in ((), (1,)):
            raise SettingsError("the model has a single output per example, and cross entropy over one class is always 0 (every score "
                                "would be 0); build the model with one output per class, or use loss='mse' for regression")
        if y.is_floating_point() and per_example_y == per_example_out:
            # class probabilities (soft or one-hot labels), which cross entropy also takes: each row a distribution
            sums = y.sum(-1)
            if y.numel() and (bool((y < 0).any()) or not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-4))):
                bad = float(y.min()) if bool((y < 0).any()) else float(sums[(sums - 1).abs() > 1e-4][0])
                what = f"a negative probability ({bad:g})" if bad < 0 else f"a row summing to {bad:g}"
                raise SettingsError(f"{name} holds soft labels with {what}; cross entropy's soft labels are class probabilities "
                                    "(non-negative, each row summing to 1); for several labels per example pass a callable loss, e.g. "
                                    "lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction='none').sum(-1)")
            return
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise SettingsError(f"{name} holds values that are not whole numbers (e.g. {float(y[y != y.round()][0]):g}); cross entropy needs "
                                f"integer class indices, or soft labels of shape (tasks, examples, {per_example_out[-1]}) summing to 1")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise SettingsError(f"{name} has dtype {y.dtype} and shape {tuple(y.shape)}; cross entropy needs class indices "
                                f"0..{per_example_out[-1] - 1 if per_example_out else 'C-1'} as integers ({name}.long())")
        if per_example_y:
            raise SettingsError(f"{name} has shape {tuple(y.shape)}; cross entropy needs one class index per example, "
                                f"shape (tasks, examples)")
        classes = per_example_out[-1] if per_example_out else 0
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise SettingsError(f"{name} holds class indices {int(y.min())}..{int(y.max())} but the model has {classes} outputs; "
                                f"label each task's classes 0..{classes - 1} (N-way tasks use labels 0..N−1) or build the model with more outputs")
    elif problem.loss_name == "mse" and per_example_y != per_example_out:
        hint = f" ({name}.unsqueeze(-1))" if per_example_y + (1,) == per_example_out else ""
        raise SettingsError(f"{name} has shape {tuple(y.shape)}, i.e. {per_example_y} per example, but the model outputs "
                            f"{per_example_out} per example; squared error needs targets shaped like the outputs{hint}")
