"""Pairwise task influence: a training-task × test-task matrix (docs/method.md §6.2).

    M[k, j] = g_kᵀ (H + δI)⁻¹ ∇f_j / n          predicted change of f_j when training task k is removed

f_j is the query loss of test task j after adaptation (the measurement of a one-task pool), the
margin of test task j, or the j-th of the user's measurement functions. Cost: one block solve over
the m right-hand sides ∇f_j (``rhs_chunk`` of them at a time, which bounds the solver's memory) and
one chunked pass over the training total gradients, never holding all n × p of them. By linearity the
mean of the columns of the query-loss matrix is task-IF's score vector with the test pool as the
validation pool.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.func import grad

from ..errors import CheckpointError, SettingsError, caller_level
from ..io import save_result
from ..meta.curvature import check_hessian_kind
from ..meta.inputs import check_start_lambda
from ..meta.objective import MetaProblem, TaskRecord
from ..tasks.tensors import TaskTensors
from .hessian_of import build_hessian
from .results import InfluenceSettings, InfluenceWarning, check_solve, read_scores_file, settings_dict, solver_record
from .gradients import _total_gradients, _train_pass
from .task_if import ihvp, trust_checks

Measurement = Callable[[torch.Tensor], torch.Tensor]

PAIRWISE_SIGN_CONVENTION = (
    "scores[k, j] = predicted change of measurement j (by default the query loss of measured task j, a validation task on the command line, after adaptation, "
    "in its units) when training task k is removed (docs/method.md §6.2): for a loss, scores[k, j] > 0 means training "
    "task k HELPS test task j and < 0 means it HARMS it. For the margin measurement (higher is better) the reading "
    "flips: a positive entry means removing k raises j's margin, i.e. k harms j."
)


@dataclass
class PairwiseResult:
    """Scores (n_train × m) of every training task on every test measurement, with what they mean."""

    scores: torch.Tensor
    train_task_ids: torch.Tensor
    test_task_ids: torch.Tensor
    measurement: str
    measurement_values: torch.Tensor
    settings: dict[str, Any]
    diagnostics: dict[str, Any]

    level = "pairwise"

    def save(self, stem: str | Path, pool_fingerprint: str | None = None) -> tuple[Path, Path]:
        tensors = {"scores": self.scores, "train_task_ids": self.train_task_ids, "test_task_ids": self.test_task_ids,
                   "measurement_values": self.measurement_values}
        info = {"kind": "metainfluence.pairwise", "level": "pairwise", "method": "task-if", "measurement": self.measurement,
                "sign_convention": PAIRWISE_SIGN_CONVENTION, "pool_fingerprint": pool_fingerprint,
                "settings": self.settings, "diagnostics": self.diagnostics}
        return save_result(stem, tensors, info)

    @classmethod
    def load(cls, stem: str | Path, pool_fingerprint: str | None = None) -> "PairwiseResult":
        tensors, info = read_scores_file(stem, "metainfluence.pairwise", "pairwise scores file", ("measurement", "settings", "diagnostics", "sign_convention"),
                                         ("scores", "train_task_ids", "test_task_ids", "measurement_values"), pool_fingerprint)
        if tuple(tensors["scores"].shape) != (tensors["train_task_ids"].numel(), tensors["test_task_ids"].numel()):
            raise CheckpointError(f"pairwise scores file {stem}: scores {tuple(tensors['scores'].shape)} disagree with its task ids; recompute it")
        return cls(scores=tensors["scores"], train_task_ids=tensors["train_task_ids"], test_task_ids=tensors["test_task_ids"],
                   measurement=info["measurement"], measurement_values=tensors["measurement_values"],
                   settings=info["settings"], diagnostics=info["diagnostics"])


def _margin_of(problem: MetaProblem, theta: torch.Tensor, task: TaskRecord) -> torch.Tensor:
    """Mean over the query examples of (correct-class logit − best other logit) at θ."""
    logits = problem.forward(theta, task.xq)
    correct = logits.gather(-1, task.yq.reshape(-1, 1))[:, 0]
    classes = torch.arange(logits.shape[-1], device=logits.device)
    others = torch.where(classes == task.yq.reshape(-1, 1), torch.full_like(logits, float("-inf")), logits)
    return (correct - others.amax(-1)).mean()


def _task_margin(problem: MetaProblem, lam: torch.Tensor, task: TaskRecord) -> torch.Tensor:
    return _margin_of(problem, problem.adapt(lam, task), task)


def _task_margin_gradient(problem: MetaProblem, lam: torch.Tensor, task: TaskRecord) -> torch.Tensor:
    """D_λ margin_j through adaptation, as the total gradient of the query loss is taken (objective.py)."""
    if problem.inner.kind == "unrolled":
        return grad(lambda l: _task_margin(problem, l, task))(lam)
    theta = problem.adapt(lam, task)
    return problem.implicit_jacobian_t(theta, lam.detach(), task, grad(lambda th: _margin_of(problem, th, task))(theta))


def _test_side(problem: MetaProblem, lam: torch.Tensor, test_tasks: TaskTensors | None,
               measurement: str | Measurement | Sequence[Measurement] | None) -> tuple[str, int, Callable[[slice], torch.Tensor], torch.Tensor]:
    """(name, m, rows(c) → the gradients ∇f_j of columns c as a (|c|, p) matrix, the values f_j(λ*))."""
    if measurement is None or measurement == "margin":
        if test_tasks is None:
            raise SettingsError("pairwise scores of test tasks need test_tasks; pass a TaskTensors pool or measurement callables")
        if measurement is None:
            rows = lambda c: _total_gradients(problem, lam, test_tasks.subset(c))
            return "query-loss", len(test_tasks), rows, problem.task_losses(lam, test_tasks)
        if problem.loss_name != "cross_entropy":
            raise SettingsError(f"the margin measurement needs class logits (loss cross_entropy), not {problem.loss_name!r}; use the default query loss")
        rows = lambda c: problem.per_task(lambda l, t: _task_margin_gradient(problem, l, t), lam, test_tasks.subset(c)).detach()
        with torch.no_grad():
            values = problem.per_task(lambda l, t: _task_margin(problem, l, t), lam, test_tasks)
        return "margin", len(test_tasks), rows, values
    functions = [measurement] if callable(measurement) else list(measurement)
    if not functions or not all(callable(f) for f in functions):
        raise SettingsError("measurement must be None (query loss of each test task), 'margin', a callable f(λ) -> scalar tensor or a list of them")
    def rows(c: slice) -> torch.Tensor:
        out = torch.stack([grad(f)(lam) for f in functions[c]]).detach()
        zero = [c.start + j for j in range(len(out)) if not bool(out[j].any())]
        if zero:  # a column of zeros, computed from a gradient that did not reach λ
            hint = (" Under the implicit inner loop problem.adapt's θ is detached from λ, so a callable through adaptation has no "
                    "gradient: measure test tasks with measurement=None or 'margin', which differentiate through the implicit θ_i"
                    if problem.inner.kind == "implicit" else " Check that the callable depends on λ differentiably")
            warnings.warn(f"measurement callable(s) {zero[:5]} have an exactly zero gradient at λ*, so their columns are all 0.{hint}",
                          InfluenceWarning, stacklevel=caller_level())
        return out

    with torch.no_grad():
        values = torch.stack([torch.as_tensor(f(lam)).to(lam).reshape(()) for f in functions])
    return "custom", len(functions), rows, values


def pairwise_influence(
    problem: MetaProblem,
    lam: torch.Tensor,
    train_tasks: TaskTensors,
    test_tasks: TaskTensors | None,
    settings: InfluenceSettings | None = None,
    measurement: str | Measurement | Sequence[Measurement] | None = None,
    train_task_ids: torch.Tensor | None = None,
    test_task_ids: torch.Tensor | None = None,
) -> PairwiseResult:
    """The (n_train × m) matrix of predicted changes of every test measurement when each training task
    is removed. ``measurement``: None (query loss of each test task), ``"margin"`` (its mean query
    margin) or callables f(λ) -> scalar, whose columns replace the test tasks."""
    check_start_lambda(lam, train_tasks=train_tasks, test_tasks=test_tasks)
    settings = settings or InfluenceSettings()
    settings.validate()
    if settings.method != "task-if" or settings.removal != "first-order":
        raise SettingsError(f"pairwise scores are first-order task-IF (method task-if, removal first-order), not {settings.method}/{settings.removal}")
    check_hessian_kind(problem, settings.hessian)
    if problem.collective.total_count(1) != 1:
        # a sharded test pool would give each process other right-hand sides for one collective solve
        raise SettingsError("pairwise scores run in one process; compute them without the distributed launcher")
    lam = lam.detach()
    n = problem.collective.total_count(len(train_tasks))
    diag: dict[str, Any] = {"n_tasks": n, "n_params": lam.numel()}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    name, m, rhs_rows, values = _test_side(problem, lam, test_tasks, measurement)
    diag["n_measurements"] = m

    # one block solve over the m right-hand sides, rhs_chunk at a time: S holds (H + δI)⁻¹∇f_j as rows
    op = build_hessian(problem, lam, train_tasks, settings)
    S = torch.empty(m, lam.numel(), dtype=lam.dtype, device=lam.device)
    residuals: list[float] = []
    converged, iterations = True, 0
    grad_time = 0.0
    res = None
    for start in range(0, m, settings.rhs_chunk):
        c = slice(start, min(m, start + settings.rhs_chunk))
        t1 = time.perf_counter()
        B = rhs_rows(c)
        grad_time += time.perf_counter() - t1
        res = ihvp(op, B, settings)
        S[c] = res.x
        residuals += res.info["residuals"]
        converged = converged and bool(res.info.get("converged", True))
        iterations = max(iterations, res.iterations)
    timings["measurement_gradients"] = grad_time
    timings["ihvp"] = time.perf_counter() - t0 - grad_time
    # the chunks' solves as one record, so a shortfall is said once for the whole matrix
    whole = dataclasses.replace(res, residual=max(residuals), iterations=iterations, info={**res.info, "converged": converged})
    diag["solver"] = {**solver_record(whole, op.n_matvecs), "residuals": residuals}
    diag["hessian"] = op.kind
    check_solve(diag, whole, settings, "pairwise iHVP")

    # one chunked pass over the training tasks: row k of the matrix is Sg_k / n
    t2 = time.perf_counter()
    dots, norms, g_sum = _train_pass(problem, lam, train_tasks, S.T, _total_gradients)
    timings["task_gradients"] = time.perf_counter() - t2
    trust_checks(problem, lam, train_tasks, g_sum, norms, settings, diag)
    timings["total"] = time.perf_counter() - t0
    diag["timings_s"] = timings
    return PairwiseResult(
        scores=(dots / n).detach(),
        train_task_ids=train_task_ids if train_task_ids is not None else torch.arange(len(train_tasks)),
        test_task_ids=test_task_ids if test_task_ids is not None else torch.arange(m),
        measurement=name, measurement_values=values.detach(),
        settings={"influence": settings_dict(settings), "problem": problem.settings_json()}, diagnostics=diag,
    )
