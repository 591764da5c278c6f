"""Influence of single support or query examples, through their task (instance-IF, docs/method.md §7).

Query example z of task k:     score_z = sᵀ D_λ ℓ(z; θ_k(λ*)) / (n |Q_k|)       = sᵀ ∂_λ∂_{u_z} L_Q^k / n
Support example z, ``unrolled``: score_z = sᵀ ∂_λ∂_{v_z} L_Q^k / n   (exact for K-step MAML)
Support example z, ``two-stage`` (the paper's):
    δθ_z = R ∇_θ ℓ(z; θ_k) / |S_k|,   ∇_λ P_z = J_kᵀ ∇²_θ L_Q^k δθ_z,   score_z = −sᵀ ∇_λ P_z / n,
  computed per task as  c = R ∇²_θ L_Q^k (J_k s),  score_z = −cᵀ ∇_θ ℓ(z; θ_k) / (|S_k| n),
  where R is the inner problem's response to a change of the support loss (docs/method.md §7, corrected):
    implicit (inner optimum):  R = (H_in + δ_in I)^{-1}, H_in = ∇²_θ L_S + γI, solved by CG;
    unrolled (K steps of α):   R = α Σ_{j<K} (I − α H_in)^j  (0 at K = 0, → H_in^{-1} as K grows),
  with exact products (the paper uses EK-FAC for H_in).
with s = (H + δI)^{-1} ∇f(λ*) shared by every item.
"""

from __future__ import annotations

import time

import torch
from torch.func import jacrev

from ..errors import SettingsError
from ..linalg import fixed_step_cg
from ..meta.objective import MetaProblem, TaskRecord
from ..tasks.tensors import TaskTensors
from .gradients import example_scores, measurement_gradient
from ..meta.curvature import check_hessian_kind, jacobian_vp, query_hvp_theta
from .results import InfluenceResult, InfluenceSettings, check_solve, settings_dict, solver_record
from .task_if import _train_pass, build_hessian, ihvp, inner_solve_check, stationarity


def k_step_response(hvp, b: torch.Tensor, alpha: float, steps: int) -> torch.Tensor:
    """α Σ_{j<K} (I − αA)^j b: how K gradient steps of size α on a quadratic with Hessian A move
    their end point when the linear term changes by b (Horner's rule, K products)."""
    c = torch.zeros_like(b)
    for _ in range(steps):
        c = alpha * b + c - alpha * hvp(c)
    return c


def _two_stage_scores(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, s: torch.Tensor, settings: InfluenceSettings):
    """(n, |S|) two-stage scores (without the 1/n) and the worst relative residual of the inner solves
    (0 for the unrolled K-step response, which is applied exactly)."""
    delta_in = settings.inner_damping
    steps = settings.inner_cg_steps
    implicit = problem.inner.kind == "implicit"
    alpha, K = problem.inner.lr, problem.inner.steps

    def one(lam, task: TaskRecord):
        theta = problem.adapt(lam, task).detach()
        a = jacobian_vp(problem, lam, task, theta, s)
        b = query_hvp_theta(problem, theta, task, a)
        if implicit:
            mv = lambda z: problem.inner_hvp(theta, lam, task, z) + delta_in * z
            c = fixed_step_cg(mv, b, steps)
            residual = (mv(c) - b).norm() / b.norm().clamp_min(1e-300)
        else:
            c = k_step_response(lambda z: problem.inner_hvp(theta, lam, task, z), b, alpha, K)
            residual = torch.zeros((), dtype=b.dtype, device=b.device)
        per_example_grads = jacrev(lambda th: problem.example_losses(th, task.xs, task.ys))(theta)  # (|S|, p)
        scores = -(per_example_grads @ c) * task.v / task.xs.shape[0]
        return torch.cat([scores, residual[None]])

    out = problem.per_task(one, lam.detach(), tasks).detach()
    return out[:, :-1], float(out[:, -1].max())


def instance_influence(
    problem: MetaProblem,
    lam: torch.Tensor,
    train_tasks: TaskTensors,
    val_tasks: TaskTensors,
    which: str = "support",
    settings: InfluenceSettings | None = None,
    task_ids: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
) -> InfluenceResult:
    """Scores (n, |S|) or (n, |Q|): predicted change of f when one example is removed (docs/method.md §5 sign).

    ``s``: the iHVP (H + δI)⁻¹∇f of the same problem, λ, pools and settings — e.g. ``extra["s"]`` of a
    task-IF result — so that both levels and task-IF share one solve; computed here when omitted."""
    settings = settings or InfluenceSettings()
    settings.validate()
    if which not in ("support", "query"):
        raise SettingsError(f"instance level must be support or query, got {which!r}")
    if settings.method != "task-if":
        raise SettingsError("instance-IF uses the total Hessian: method must be task-if (baselines rank whole tasks)")
    check_hessian_kind(problem, settings.hessian)
    lam = lam.detach()
    n = problem.collective.total_count(len(train_tasks))
    t0 = time.perf_counter()
    grad_f, f_value = measurement_gradient(problem, lam, val_tasks)
    if s is None:
        op = build_hessian(problem, lam, train_tasks, settings)
        res = ihvp(op, grad_f, settings)
        s = res.x
        solver = solver_record(res, op.n_matvecs)
    else:
        if tuple(s.shape) != tuple(lam.shape):
            raise SettingsError(f"the given iHVP vector s has shape {tuple(s.shape)}, expected {tuple(lam.shape)} (one entry per meta-parameter)")
        s = s.detach().to(lam)
        solver = {"name": "given", "residual": None, "iterations": 0, "hvps": 0}
    t1 = time.perf_counter()
    diag = {
        "n_tasks": n,
        "n_params": lam.numel(),
        "hessian": settings.hessian,
        "solver": solver,
    }
    if solver["name"] != "given":
        check_solve(diag, res, settings)
    # the same trust checks as task-IF: λ stationary, inner problem solved (one pass of total gradients)
    _, norms, g_sum = _train_pass(problem, lam, train_tasks, None, lambda p, l, t: p.total_gradients(l, t))
    diag["stationarity"] = stationarity(g_sum / n + problem.weight_decay * lam, problem.collective.gather_rows(norms), settings.stationarity_warn, diag)
    inner_solve_check(problem, lam, train_tasks, diag)
    method = which
    if which == "support" and settings.support_method == "two-stage":
        raw, inner_residual = _two_stage_scores(problem, lam, train_tasks, s, settings)
        diag["inner_solve_residual"] = inner_residual
        method = "support/two-stage"
    else:
        raw = example_scores(problem, lam, train_tasks, s, which)
        method = f"{which}/unrolled" if which == "support" else "query"
    scores = raw / n
    diag["timings_s"] = {"ihvp": t1 - t0, "example_scores": time.perf_counter() - t1, "total": time.perf_counter() - t0}
    ids = task_ids if task_ids is not None else torch.arange(len(train_tasks))
    return InfluenceResult(
        level=which, method=method, scores=scores, task_ids=ids, measurement=f_value,
        settings={"influence": settings_dict(settings), "problem": problem.settings_json()},
        diagnostics=diag, extra={"s": s},
    )
