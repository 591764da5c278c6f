"""Influence of single support or query examples, through their task (instance-IF, docs/method.md §7).

Query example z of task k:     score_z = sᵀ D_λ ℓ(z; θ_k(λ*)) / (n |Q_k|)       = sᵀ ∂_λ∂_{u_z} L_Q^k / n
Support example z, ``unrolled``: score_z = sᵀ ∂_λ∂_{v_z} L_Q^k / n   (exact for K-step MAML)
Support example z, ``two-stage`` (the paper's):
    δθ_z = R ∇_θ ℓ(z; θ_k) / |S_k|,   ∇_λ P_z = J_kᵀ ∇²_θ L_Q^k δθ_z,   score_z = −sᵀ ∇_λ P_z / n,
  computed per task as  c = R ∇²_θ L_Q^k (J_k s),  score_z = −cᵀ ∇_θ ℓ(z; θ_k) / (|S_k| n),
  where R is the inner problem's response to a change of the support loss (docs/method.md §7, corrected):
    implicit (inner optimum):  R = (H_in + δ_in I)^{-1}, H_in = ∇²_θ L_S + γI, solved by CG;
    unrolled (K steps of α):   R = α Σ_{j<K} (I − α H_in)^j  (0 at K = 0, → H_in^{-1} as K grows;
                               steps that move only the masked parameters M, ANIL: R = α Σ_{j<K} (I − α M H_in)^j M),
  with exact products, or (``inner_hessian="ekfac"``, as the paper) with H_in replaced by the EK-FAC
  of the support Gauss–Newton matrix + γI at θ_k, R applied exactly in its eigenbasis.
with s = (H + δI)^{-1} ∇f(λ*) shared by every item.
"""

from __future__ import annotations

import time

import torch
from torch.func import jacrev

from ..errors import SettingsError
from ..linalg import fixed_step_cg
from ..meta.ekfac import check_factorable, fit_support_ekfac
from ..meta.inputs import check_start_lambda
from ..meta.models import TaskBatchNorm
from ..meta.objective import MetaProblem, TaskRecord
from ..tasks.tensors import TaskTensors
from .gradients import example_scores, measurement_gradient
from ..meta.curvature import check_hessian_kind, jacobian_vp, query_hvp_theta
from .results import RESIDUAL_WARN, InfluenceResult, InfluenceSettings, check_solve, settings_dict, shortfall, solver_record
from .gradients import _require_unrolled, _train_pass
from .task_if import build_hessian, check_curvature_file, ihvp, inner_solve_check, stationarity


def k_step_response(hvp, b: torch.Tensor, alpha: float, steps: int, mask=None) -> torch.Tensor:
    """α Σ_{j<K} (I − αA)^j b: how K gradient steps of size α on a quadratic with Hessian A move
    their end point when the linear term changes by b (Horner's rule, K products). With a 0/1 ``mask`` M
    (steps that move only some parameters, ANIL) the transpose of the masked response, α Σ_{j<K} M (I − αAM)^j b,
    by c ← c + αM(b − Ac), the form the support scores take it in (M ↦ identity recovers the above)."""
    c = torch.zeros_like(b)
    masked = (lambda z: z) if mask is None else mask
    for _ in range(steps):
        c = c + alpha * masked(b - hvp(c))
    return c


def k_step_eigen_response(h: torch.Tensor, alpha: float, steps: int) -> torch.Tensor:
    """α Σ_{j<K} (1 − αh)^j elementwise, the K-step response on an eigenvalue h, in closed form
    (1 − (1 − αh)^K)/h; near h = 0, where that cancels, the series αK − α²K(K−1)h/2 + α³K(K−1)(K−2)h²/6."""
    u = alpha * h
    small = u.abs() < 1e-5  # closed form loses ~eps/|u| relative; the series' error is ~K⁴u³/24
    safe = torch.where(small, torch.ones_like(h), h)
    closed = (1 - (1 - alpha * safe) ** steps) / safe
    series = alpha * (steps - steps * (steps - 1) / 2 * u + steps * (steps - 1) * (steps - 2) / 6 * u ** 2)
    return torch.where(small, series, closed)


def _outer_rhs(problem: MetaProblem, lam: torch.Tensor, task: TaskRecord, s: torch.Tensor):
    """(θ_k, ∇²_θ L_Q^k(θ_k) J_k s): the adapted parameters and the vector R_k is applied to."""
    theta = problem.adapt(lam, task).detach()
    return theta, query_hvp_theta(problem, theta, task, jacobian_vp(problem, lam, task, theta, s))


def _support_scores(problem: MetaProblem, theta: torch.Tensor, task: TaskRecord, c: torch.Tensor) -> torch.Tensor:
    """−v_z ∇_θ ℓ(z; θ_k)ᵀ c / |S_k| for every support example z (without the 1/n)."""
    per_example_grads = jacrev(lambda th: problem.example_losses(th, task.xs, task.ys))(theta)  # (|S|, p)
    return -(per_example_grads @ c) * task.v / task.xs.shape[0]


def _two_stage_scores(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, s: torch.Tensor, settings: InfluenceSettings):
    """(n, |S|) two-stage scores (without the 1/n) and what to record: the worst relative residual of
    the inner solves (0 for the K-step response and for EK-FAC, which are applied exactly)."""
    one_step = problem.inner.kind != "implicit" and problem.inner.steps == 1
    if settings.inner_hessian == "ekfac" and not one_step and problem.adapted is not None:
        raise SettingsError(f"an EK-FAC inner Hessian is fitted over every parameter, but this inner loop adapts only some (adapt={problem.inner.adapt!r}); "
                            "use --inner-hessian exact for its two-stage support scores")
    if settings.inner_hessian == "ekfac" and not one_step:
        return _two_stage_scores_ekfac(problem, lam, tasks, s, settings)
    delta_in = settings.inner_damping
    steps = settings.inner_cg_steps
    implicit = problem.inner.kind == "implicit"
    alpha, K = problem.inner.lr, problem.inner.steps

    def one(lam, task: TaskRecord):
        theta, b = _outer_rhs(problem, lam, task, s)
        if implicit:
            mv = lambda z: problem.inner_hvp(theta, lam, task, z) + delta_in * z
            c = fixed_step_cg(mv, b, steps)
            residual = (mv(c) - b).norm() / b.norm().clamp_min(1e-300)
        else:
            c = k_step_response(lambda z: problem.inner_hvp(theta, lam, task, z), b, alpha, K, problem.masked)
            residual = torch.zeros((), dtype=b.dtype, device=b.device)
        return torch.cat([_support_scores(problem, theta, task, c), residual[None]])

    out = problem.per_task(one, lam.detach(), tasks).detach()
    record = {"inner_hessian": "exact", "inner_solve_residual": float(out[:, -1].max())}
    if settings.inner_hessian == "ekfac":  # the response of one step, α·b, holds no inner Hessian to approximate
        record["inner_hessian_note"] = "one unrolled inner step: its response α·b involves no inner Hessian, so no EK-FAC was fitted (exact = ekfac)"
    return out[:, :-1], record


def _two_stage_scores_ekfac(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, s: torch.Tensor, settings: InfluenceSettings):
    """As :func:`_two_stage_scores` with H_in replaced by the EK-FAC of each task's support
    Gauss–Newton matrix + γI at θ_k (meta/ekfac.py ``fit_support_ekfac``); R_k is then a function of
    its eigenvalues, applied exactly in its eigenbasis. The fit runs hooks in eager mode, so it loops
    over tasks between two vmapped passes (θ_k and the right-hand side; the per-example gradients)."""
    lam = lam.detach()
    pairs = problem.per_task(lambda l, t: torch.stack(_outer_rhs(problem, l, t, s)), lam, tasks).detach()  # (n, 2, p)
    record = problem.records(lam, tasks)
    if problem.inner.kind == "implicit":
        respond = lambda op, b: op.solve(b, settings.inner_damping)  # (K̂ + γ + δ_in)⁻¹
    else:
        alpha, K = problem.inner.lr, problem.inner.steps
        respond = lambda op, b: op.apply_function(b, lambda h: k_step_eigen_response(h, alpha, K))
    t0 = time.perf_counter()
    c = torch.stack([respond(fit_support_ekfac(problem, pairs[k, 0], record.xs[k], record.ys[k], record.v[k]), pairs[k, 1])
                     for k in range(len(tasks))])
    fit_s = time.perf_counter() - t0
    scores = problem.per_task(lambda l, t, th, ck: _support_scores(problem, th, t, ck), lam, tasks, extra=(pairs[:, 0], c))
    return scores.detach(), {"inner_hessian": "ekfac", "inner_solve_residual": 0.0, "inner_ekfac_seconds": fit_s}


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
    check_start_lambda(lam, train_tasks=train_tasks, val_tasks=val_tasks)
    settings = settings or InfluenceSettings()
    settings.validate()
    if which not in ("support", "query"):
        raise SettingsError(f"instance level must be support or query, got {which!r}")
    if settings.method != "task-if":
        raise SettingsError("instance-IF uses the total Hessian: method must be task-if (baselines rank whole tasks)")
    check_hessian_kind(problem, settings.hessian)
    if which == "support" and settings.support_method != "two-stage":  # refused before the passes, not after them
        _require_unrolled(problem, "support instance-IF (unrolled)")
    checked = check_curvature_file(problem, lam, train_tasks, settings) if s is None else None
    if which == "support" and settings.support_method == "two-stage" and settings.inner_hessian == "ekfac":
        check_factorable(problem)
    lam = lam.detach()
    n = problem.collective.total_count(len(train_tasks))
    t0 = time.perf_counter()
    grad_f, f_value = measurement_gradient(problem, lam, val_tasks)
    if s is None:
        op = checked or build_hessian(problem, lam, train_tasks, settings)
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
    diag["stationarity"] = stationarity(g_sum / n + problem.weight_decay * lam, problem.collective.gather_rows(norms), settings.stationarity_warn, diag, problem)
    inner_solve_check(problem, lam, train_tasks, diag)
    if any(isinstance(m, TaskBatchNorm) for m in problem.model.modules()):
        shortfall(diag, "the model normalises each task by its own batch statistics, so an example-level score removes the example's "
                        "loss term only: its input still shapes its task's statistics and every other loss of the set (docs/method.md "
                        "§1.4); for example-level tables use group norm (--model-norm group)")
    method = which
    if which == "support" and settings.support_method == "two-stage":
        raw, inner = _two_stage_scores(problem, lam, train_tasks, s, settings)
        diag.update(inner)
        if inner["inner_solve_residual"] > RESIDUAL_WARN:  # the (H_in + δ_in I)⁻¹ solves of the implicit inner problem
            shortfall(diag, f"the two-stage inner solves (H_in + δ_in I)⁻¹ stopped at a relative residual up to {inner['inner_solve_residual']:.2g}, "
                            f"so the support scores are approximate; raise --inner-cg-steps (now {settings.inner_cg_steps}) or --inner-damping "
                            f"(now {settings.inner_damping:g}; larger where H_in is indefinite)")
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
