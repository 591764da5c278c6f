"""Influence of whole training tasks (task-IF, docs/method.md §6, §5) and its baselines (direct-IF,
TracIn, the single-level EK-FAC IF, loss, random; §8).

    s        = (H + δI)^{-1} ∇f(λ*)                 one iHVP for all scores
    score_k  = sᵀ g_k / n                           predicted Δf when task k is removed
    Δλ_k     = (H + δI)^{-1} g_k / n                predicted parameter change
    self_k   = g_kᵀ (H + δI)^{-1} g_k / n

The pass over the training tasks is chunked, one chunk of total gradients at a time (flat memory in n, self-influence aside).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingsError
from ..meta.inputs import check_start_lambda
from ..meta.objective import MetaProblem
from ..tasks.tensors import TaskTensors
from .gradients import _total_gradients, _train_pass, charged_measurement_gradient, direct_gradients, direct_measurement_gradient, reused_measurement_value, total_gradients_of
from ..meta.curvature import TotalHessian, check_hessian_kind
from ..meta.ekfac import fit_ekfac
from ..meta.refine_monitor import refine_advice
from .hessian_of import build_hessian, curvature_fingerprint, effective_damping
from .newton_step import newton_step_scores
from .results import InfluenceResult, InfluenceSettings, check_solve, settings_dict, shortfall, solver_record
from ..linalg import IHVPResult, LowRank, lanczos_eigenpairs, solve_ihvp
from ..linalg.core import DampedProducts, true_residuals
from .precision import FLOAT32_TOL, full_float32, refine_mixed, remeasure_residuals, working_precision


def ihvp(op: TotalHessian, b: torch.Tensor, settings: InfluenceSettings, x0: torch.Tensor | None = None) -> IHVPResult:
    """x ≈ (H + δI)^{-1} b with the configured solver (δ absolute, or relative to H's mean eigenvalue);
    ``x0``: continue from this iterate (cg / pcg; e.g. an earlier solve stopped by ``max_minutes``).
    TF32 is off throughout (:func:`full_float32`)."""
    with full_float32():
        if x0 is not None:
            return _warm_start(op, b, settings, x0)
        return _ihvp(op, b, settings)


def _ihvp(op: TotalHessian, b: torch.Tensor, settings: InfluenceSettings) -> IHVPResult:
    lowrank = sketch = None
    if settings.solver == "lowrank":
        lowrank = _lowrank(op, settings)
    if settings.solver in ("pcg", "curvature"):
        sketch = _sketch(op, settings)
    damping = effective_damping(op, settings)
    mixed = getattr(op, "product_dtype", op.dtype) != op.dtype and settings.solver not in ("explicit", "woodbury")
    solve = settings.solve
    if mixed and settings.solver in ("cg", "pcg"):
        # float32 products cannot drive a residual far below ~1e-5: stop there, then refine (below)
        solve = dataclasses.replace(solve, tol=max(solve.tol, FLOAT32_TOL))
    res = solve_ihvp(op, b, solver=settings.solver, damping=damping, settings=solve, lowrank=lowrank, sketch=sketch)
    if settings.damping_mode == "relative":
        res.info["damping_relative"] = settings.damping
        res.info["mean_eigenvalue"] = op._mean_eigenvalue
    if mixed:
        if settings.solver == "curvature":  # the fast tier's checks only report: float32 measures them to its own rounding
            res.info["products"] = "float32"
            res.info["residuals_measured_in"] = ("float32 (a residual near or below ~1e-5 is at float32's rounding floor; "
                                                 "where softmax outputs saturate the products' error can reach a few percent)")
        else:
            remeasure_residuals(op, b, res)  # the true residual: what refinement and the warnings rest on
        if settings.solver in ("cg", "pcg"):
            refine_mixed(op, b, res, settings, damping, lowrank, sketch)
    return res


def _warm_start(op: TotalHessian, b: torch.Tensor, settings: InfluenceSettings, x0: torch.Tensor) -> IHVPResult:
    """Continue a Krylov solve from ``x0``: solve (H + δI)c = b − (H + δI)x0 to the tolerance that makes
    x0 + c meet the requested one. Any x0 is safe (a poor one only costs iterations): the recorded
    residual is the true one of the answer, measured with working-precision products."""
    if settings.solver not in ("cg", "pcg"):
        raise SettingsError(f"continuing a solve needs an iterative solver (cg or pcg), not {settings.solver!r}")
    if x0.numel() != b.numel():
        raise SettingsError(f"the iterate to continue from has {x0.numel()} entries but the right-hand side {b.numel()}; "
                            "it is from another model or level — start afresh (drop --resume)")
    t0 = time.perf_counter()
    products = DampedProducts(working_precision(op), effective_damping(op, settings))
    B = b.reshape(-1, op.dim).to(op.lam)
    X = x0.reshape(-1, op.dim).to(op.lam).clone()
    R = B - products.block(X.T.contiguous()).T
    before = float((R.norm(dim=1) / B.norm(dim=1).clamp_min(1e-300)).max())
    tol = settings.solve.tol
    if before <= tol:
        res = IHVPResult(x=X.reshape(b.shape), residual=before, iterations=0, solver=settings.solver,
                         info={"converged": True, "damping": products.damping, "residuals": [before]})
    else:
        inner = dataclasses.replace(settings, solve=dataclasses.replace(settings.solve, tol=min(0.5, tol / before)))
        res = ihvp(op, R.reshape(b.shape), inner)
        X += res.x.reshape(-1, op.dim).to(X)
        res.x = X.reshape(b.shape)
        res.info["residuals"] = true_residuals(products, X, B)
        res.residual = max(res.info["residuals"])
    res.info["warm_start"] = {"residual_before": before, "seconds": time.perf_counter() - t0}
    return res


def check_curvature_file(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, settings: InfluenceSettings) -> TotalHessian | None:
    """A curvature file of another λ, pool or Hessian kind refused before the gradient passes, not after them.
    Returns the operator it was checked against (None without a file), for the solve to use."""
    if settings.solver not in ("pcg", "curvature"):
        return None
    op = build_hessian(problem, lam.detach(), tasks, settings)
    _sketch(op, settings)
    return op


def _sketch(op: TotalHessian, settings: InfluenceSettings):
    from .curvature import load_curvature

    if not settings.curvature_file:
        raise SettingsError(f"solver {settings.solver!r} needs --curvature-file FILE (fit one with `metainfluence curvature`)")
    art = load_curvature(settings.curvature_file)
    # pcg is exact whatever its preconditioner: a full-pool sketch, or another kind's, may serve this H
    art.attach(op, preconditioner=settings.solver == "pcg")
    return art.sketch


# the fast tier of a curvature whose probe error of H·x is above this is said aloud (EK-FAC, which drops dθ/dλ)
PROBE_ERROR_WARN = 0.1


def curvature_record(diag: dict[str, Any], info: dict[str, Any], settings: InfluenceSettings) -> None:
    """The curvature file's fit record in the diagnostics and, for the fast tier, a shortfall when its
    probe error against the real operator is large (its inverse then answers another question)."""
    diag["curvature"] = {k: info.get(k) for k in ("method", "hessian", "rank", "probe_operator_rel_error", "probe_solve_residual", "fit_over_floor")}
    err = max(info.get("probe_operator_rel_error") or [0.0])
    if settings.solver == "curvature" and err > PROBE_ERROR_WARN:
        shortfall(diag, f"the {info.get('method', 'nystrom')} curvature misses the {info.get('hessian')} Hessian by up to {err:.2g} "
                        f"(relative error of H·x on its probe vectors), so the fast tier's scores are approximate; "
                        f"use --solver pcg with the same --curvature-file (exact, preconditioned)")


def _lowrank(op: TotalHessian, settings: InfluenceSettings) -> LowRank:
    cached = getattr(op, "_lowrank", None)
    if cached is not None:
        return cached
    fit = {"rank": settings.solve.lowrank_rank, "lanczos_iters": settings.solve.lanczos_iters, "seed": settings.seed}
    fp = curvature_fingerprint(op, **fit)
    path = Path(settings.lowrank_file) if settings.lowrank_file else None
    lr = None
    if path is not None and path.with_name(path.name + ".json").exists():
        lr = LowRank.load(path, dim=op.dim)
        if lr.fingerprint != fp:
            # eigenpairs of another λ, pool, kind or fit would give wrong scores: recompute, never reuse
            warnings.warn(f"the eigenpair file {path} was computed for another λ, pool, Hessian kind or rank; recomputing it", stacklevel=3)
            lr = None
    if lr is None:
        lr = lanczos_eigenpairs(op, settings.solve.lowrank_rank, settings.solve.lanczos_iters, settings.seed)
        lr.info["fingerprint"] = fp
        if path is not None:
            lr.save(path)
    op._lowrank = lr
    return lr


def stationarity(meta_gradient: torch.Tensor, task_gradient_norms: torch.Tensor, warn_ratio: float,
                 diag: dict[str, Any] | None = None, problem: MetaProblem | None = None) -> dict[str, Any]:
    """docs/method.md §2: ‖∇F(λ*)‖ and its ratio to the mean per-task total-gradient norm (a shortfall in
    ``diag`` above ``warn_ratio``)."""
    norm = float(meta_gradient.norm())
    mean_task = float(task_gradient_norms.mean())
    ratio = norm / max(mean_task, 1e-300)
    out = {"grad_norm": norm, "mean_task_grad_norm": mean_task, "ratio": ratio, "warning": None}
    if ratio > warn_ratio:
        out["warning"] = (
            f"λ is not stationary: ‖∇F‖ = {norm:.3g} is {ratio:.2g} of the mean task-gradient norm (warned above "
            f"{warn_ratio:g}); influence assumes ∇F = 0 — {refine_advice(problem=problem)}"
        )
        if diag is not None:
            shortfall(diag, out["warning"])
        else:
            warnings.warn(out["warning"], stacklevel=3)
    return out


def inner_solve_check(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, diag: dict[str, Any], warn_ratio: float = 1e-3) -> None:
    """The implicit inner solver assumes θ_i is the inner optimum: record the worst ‖∇_θ L_in(θ_i)‖
    relative to its value at θ = λ, and say so when it is large."""
    if problem.inner.kind != "implicit":
        return
    at_theta, at_start = problem.inner_gradient_norms(lam, tasks)
    rel = float((at_theta / at_start.clamp_min(1e-300)).max())
    diag["inner_solve"] = {"grad_norm_max": float(at_theta.max()), "relative_max": rel}
    if rel > warn_ratio:
        shortfall(diag, f"the implicit inner problem is not solved: ‖∇_θ L_in(θ_i)‖ is up to {rel:.2g} of its value at θ = λ; "
                        f"the implicit-function derivatives assume an inner optimum — raise --inner-steps (now {problem.inner.steps}) or --inner-lr")
    residuals = problem.implicit_solve_residuals(lam, tasks)
    cg_rel = float(residuals.max())
    diag["inner_solve"]["implicit_cg_residual_max"] = cg_rel
    failed = [int(k) for k in (residuals >= 1).nonzero().flatten()]  # no better than x = 0 (CG met non-positive curvature)
    if failed:
        diag["inner_solve"]["implicit_cg_failed_positions"] = failed
        shortfall(diag, f"for {len(failed)} training task(s) (pool positions {failed[:10]}{' …' if len(failed) > 10 else ''}) the implicit-function CG "
                        "made no progress (residual ≥ 1: the inner Hessian at θ_i has non-positive curvature there), so their dθ_i/dλ and total "
                        f"gradients are 0 or meaningless and so are their scores — raise --inner-proximal (now {problem.inner.proximal:g}; it makes "
                        f"the inner Hessian positive definite) or --inner-steps (now {problem.inner.steps})")
    if cg_rel > 1e-6:
        shortfall(diag, f"the implicit-function CG stops at a relative residual up to {cg_rel:.2g}: dθ_i/dλ is then inexact and not linear, "
                        f"so the total Hessian is not symmetric — raise --inner-implicit-cg-steps (now {problem.inner.implicit_cg_steps})")


def trust_checks(problem: MetaProblem, lam: torch.Tensor, train_tasks: TaskTensors, g_sum: torch.Tensor, norms: torch.Tensor,
                 settings: InfluenceSettings, diag: dict[str, Any]) -> None:
    """What every total-gradient score rests on: λ stationary (from the pass's Σg_k and ‖g_k‖) and,
    for the implicit inner solver, θ_i at the inner optimum."""
    n = problem.collective.total_count(len(train_tasks))
    diag["stationarity"] = stationarity(g_sum / n + problem.weight_decay * lam, problem.collective.gather_rows(norms), settings.stationarity_warn, diag, problem)
    inner_solve_check(problem, lam, train_tasks, diag)


def _mean_task_loss(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors) -> float:
    """Mean query loss over the pool (over every shard when the pool is sharded); read from a reused ∇f pass."""
    kept = reused_measurement_value(problem, lam, tasks)
    if kept is not None:
        return kept
    with torch.no_grad():
        return float(problem.collective.all_sum(problem.task_losses(lam, tasks).sum()) / problem.collective.total_count(len(tasks)))


def task_influence(
    problem: MetaProblem,
    lam: torch.Tensor,
    train_tasks: TaskTensors,
    val_tasks: TaskTensors,
    settings: InfluenceSettings | None = None,
    task_ids: torch.Tensor | None = None,
    s0: torch.Tensor | None = None,
) -> InfluenceResult:
    """Score every training task by the predicted change of the validation loss when it is removed.

    ``s0``: an earlier iterate of s = (H + δI)⁻¹∇f (``extra["s"]`` of an unconverged result, e.g. one
    stopped by ``solve.max_minutes``) to continue the cg / pcg solve from."""
    check_start_lambda(lam, train_tasks=train_tasks, val_tasks=val_tasks)  # a state_dict or list refused with its remedy
    (settings := settings or InfluenceSettings()).validate()
    checked = None  # the operator a curvature file was checked against, before any pass
    if settings.method == "task-if":
        check_hessian_kind(problem, settings.hessian)
        checked = check_curvature_file(problem, lam, train_tasks, settings)
    lam = lam.detach()
    n = problem.collective.total_count(len(train_tasks))
    timings: dict[str, float] = {}
    diag: dict[str, Any] = {"n_tasks": n, "n_params": lam.numel()}
    method = settings.method
    t0 = time.perf_counter()

    if method in ("task-if", "direct-if", "tracin"):
        direct = method == "direct-if"
        if direct:
            grad_f = direct_measurement_gradient(problem, lam, val_tasks)
            f_value = _mean_task_loss(problem, lam, val_tasks)
            timings["measurement_gradient"] = time.perf_counter() - t0
        else:
            grad_f, f_value, timings["measurement_gradient"] = charged_measurement_gradient(problem, lam, val_tasks, diag)

        op = None
        if method == "tracin":
            s = grad_f  # the Hessian replaced by the identity
        else:
            t1 = time.perf_counter()
            op = checked or build_hessian(problem, lam, train_tasks, settings, kind="direct" if direct else None)
            res = ihvp(op, grad_f, settings, x0=s0)
            s = res.x
            timings["ihvp"] = time.perf_counter() - t1
            diag["solver"] = solver_record(res, op.n_matvecs)
            if getattr(op, "_curvature_info", None):
                curvature_record(diag, op._curvature_info, settings)
            check_solve(diag, res, settings)
            diag["hessian"] = op.kind
            if op.kind == "gamma":
                diag["gamma"] = op.gamma

        t2 = time.perf_counter()
        dots, norms, g_sum = _train_pass(problem, lam, train_tasks, s, direct_gradients if direct else _total_gradients, diag)
        scores = dots / n
        timings["task_gradients"] = time.perf_counter() - t2
        if not direct:
            trust_checks(problem, lam, train_tasks, g_sum, norms, settings, diag)
        self_inf = None
        if settings.self_influence:
            if op is None:
                op = build_hessian(problem, lam, train_tasks, settings)
            t3 = time.perf_counter()
            G = direct_gradients(problem, lam, train_tasks) if direct else total_gradients_of(problem, lam, train_tasks)
            G = problem.collective.gather_rows(G)  # sharded: every process solves all rows, since each HVP needs every process
            res_all = ihvp(op, G, settings)
            self_inf = problem.collective.local_rows((G * res_all.x).sum(1), len(train_tasks)) / n
            diag["self_influence_residual"] = res_all.residual
            check_solve(diag, res_all, settings, "self-influence")
            timings["self_influence"] = time.perf_counter() - t3
        extra = {"s": s}
        if settings.removal == "newton":
            t4 = time.perf_counter()
            G = total_gradients_of(problem, lam, train_tasks)
            first_order = scores
            # per-task solves need products only: a saved low-rank basis of the full H does not apply
            per_task = settings if settings.solver not in ("lowrank", "curvature", "pcg") else dataclasses.replace(settings, solver="cg")
            scores, newton_diag = newton_step_scores(op, G, grad_f, s, settings, lambda o, b: ihvp(o, b, per_task))
            diag["newton_step"] = newton_diag
            if newton_diag.get("unconverged_solves"):
                shortfall(diag, f"{newton_diag['unconverged_solves']} of the per-task Newton-step solves stopped before their tolerance "
                                f"(worst residual {newton_diag['worst_residual']:.2g}); raise --max-iter or --damping")
            extra["first_order_scores"] = first_order
            timings["newton_step"] = time.perf_counter() - t4
    elif method == "ekfac-if":
        scores, f_value, diag_part, extra = _ekfac_if(problem, lam, train_tasks, val_tasks, settings, n, timings)
        diag.update(diag_part)
        self_inf = None
    elif method == "trak":
        from .trak import trak_scores  # trak reuses this module's pass over the training gradients

        grad_f, f_value, timings["measurement_gradient"] = charged_measurement_gradient(problem, lam, val_tasks, diag)
        t2 = time.perf_counter()
        out = trak_scores(problem, lam, train_tasks, grad_f, settings)
        timings["trak"] = time.perf_counter() - t2
        scores, diag["trak"] = out["scores"], out["diag"]
        self_inf = out["self_influence"] if settings.self_influence else None
        trust_checks(problem, lam, train_tasks, out["g_sum"], out["norms"], settings, diag)
        extra = {}
    elif method == "loss":
        f_value = _mean_task_loss(problem, lam, val_tasks)
        with torch.no_grad():
            scores = -problem.task_losses(lam, train_tasks)  # high loss = suspicious = ranked harmful first
        self_inf, extra = None, {}
    elif method == "random":
        f_value = _mean_task_loss(problem, lam, val_tasks)
        gen = torch.Generator().manual_seed(settings.seed)
        scores = problem.collective.local_rows(torch.randn(n, generator=gen, dtype=torch.float64), len(train_tasks)).to(lam)
        self_inf, extra = None, {}
    else:  # pragma: no cover - validate() guards
        raise SettingsError(f"unknown method {method!r}")

    if method not in ("loss", "random"):
        beyond_measurement(problem, scores, f_value, diag)
    timings["total"] = time.perf_counter() - t0 + diag.get("measurement_gradient_reused_s", 0.0)
    diag["timings_s"] = timings
    ids = task_ids if task_ids is not None else torch.arange(len(train_tasks))
    return InfluenceResult(
        level="task", method=method, scores=scores.detach(), task_ids=ids, measurement=f_value,
        settings={"influence": settings_dict(settings), "problem": problem.settings_json()},
        diagnostics=diag, self_influence=self_inf, extra=extra,
    )


def beyond_measurement(problem: MetaProblem, scores: torch.Tensor, f_value: float, diag: dict[str, Any]) -> None:
    """A shortfall when some task's predicted change is below −f: its removal would take the mean validation loss, which
    no loss can take below 0, under 0 — a first-order prediction far outside its range (a meta-overfit or unstationary λ)."""
    beyond = int(problem.collective.all_sum(torch.as_tensor(int((scores < -f_value).sum()))))
    diag["scores_beyond_measurement"] = beyond
    if f_value > 0 and beyond:
        shortfall(diag, f"{beyond} task(s) score below −f = −{f_value:.3g}: removing one of them is predicted to take the validation loss below 0, "
                        "which no loss reaches, so the first-order prediction is far outside its range at this λ (see the stationarity and "
                        "overfit notes); the order still ranks the tasks, the sizes are not changes. A proximal refine (--refine-proximal 1) "
                        "keeps λ where the predictions hold; --removal newton predicts large removals better")


def _ekfac_if(problem: MetaProblem, lam: torch.Tensor, train_tasks: TaskTensors, val_tasks: TaskTensors,
              settings: InfluenceSettings, n: int, timings: dict[str, float]):
    """The single-level EK-FAC IF baseline (docs/method.md §8): λ treated as the trained parameters of
    one model, the inner loop ignored — gradients of the query losses at θ = λ and an EK-FAC of the
    Fisher fitted at λ itself. score_k = ∇f_λᵀ (K + δI)⁻¹ ∇L_Q^k(λ) / n."""
    t0 = time.perf_counter()
    grad_f = direct_measurement_gradient(problem, lam, val_tasks, adapt=False)
    with torch.no_grad():  # f at θ = λ, the measurement this baseline differentiates
        f_value = float(problem.collective.all_sum(problem.per_task(lambda l, t: problem.weighted_loss(l, t.xq, t.yq, t.u), lam, val_tasks).sum())
                        / problem.collective.total_count(len(val_tasks)))
    t1 = time.perf_counter()
    ekfac = fit_ekfac(problem, lam, train_tasks, adapt=False, fisher_samples=settings.fisher_samples, seed=settings.seed)
    damping = settings.damping if settings.damping_mode == "absolute" else settings.damping * ekfac.mean_eigenvalue()
    s = ekfac.solve(grad_f, damping)
    timings["ekfac_fit_and_solve"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    dots, _, _ = _train_pass(problem, lam, train_tasks, s, lambda p, l, t: direct_gradients(p, l, t, adapt=False))
    timings["task_gradients"] = time.perf_counter() - t2
    timings["measurement_gradient"] = t1 - t0
    diag = {"solver": {"name": "ekfac", "damping": damping, "residual": 0.0, "iterations": 0, "exact_inverse_of": "EK-FAC + δI"},
            "hessian": "ekfac (Fisher at θ = λ, no adaptation)",
            "ekfac": {k: ekfac.info.get(k) for k in ("fisher_samples", "seed", "n_tasks_fitted", "seconds")}}
    return dots / n, f_value, diag, {"s": s}


def task_parameter_changes(problem: MetaProblem, lam: torch.Tensor, train_tasks: TaskTensors, settings: InfluenceSettings,
                           op: TotalHessian | None = None) -> tuple[torch.Tensor, IHVPResult]:
    """Δλ_k = (H + δI)^{-1} g_k / n for every task k, shape (n, p): one iHVP per task."""
    op = op or build_hessian(problem, lam, train_tasks, settings)
    G = problem.collective.gather_rows(total_gradients_of(problem, lam, train_tasks))  # sharded: all rows, since each HVP needs every process
    res = ihvp(op, G, settings)
    return problem.collective.local_rows(res.x, len(train_tasks)) / problem.collective.total_count(len(train_tasks)), res
