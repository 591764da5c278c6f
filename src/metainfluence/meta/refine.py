"""The refine stage (docs/method.md §2): drive the full-pool meta-gradient ‖∇F(λ; w)‖ below a tolerance.

Influence functions assume ∇_λ F(λ*) = 0, which Adam on random meta-batches does not deliver.
:func:`refine` minimises the deterministic full-pool objective
F(λ; w) = (1/n) Σ_i w_i L_Q^i(λ) + (μ/2)‖λ‖² from the trained λ:

- ``lbfgs`` (default): ``torch.optim.LBFGS`` with a strong-Wolfe line search on a flat parameter
  whose closure calls :meth:`MetaProblem.value_and_gradient` (vmapped over the pool in chunks).
  The optimiser is stepped one iteration at a time so that the stopping rule is exactly
  ‖∇F‖₂ ≤ tol; evaluations are cached by point, so this costs no extra passes. If L-BFGS meets a
  NaN/inf or stops making progress, it falls back to gradient descent from the last good point.
- ``gd``: full-batch gradient descent with Armijo backtracking (the step halves until F decreases
  enough, and grows by 1.2× after each accepted step).
- ``newton``: Levenberg–Marquardt-damped Newton steps with the exact (or Gauss–Newton) total
  Hessian — materialised below ``newton_dense_max`` parameters, matrix-free Newton–CG above — for
  tight tolerances where L-BFGS stalls.
- ``newton-cg`` (meta/newton_cg.py): matrix-free Newton–CG on Gauss–Newton products with a
  Levenberg–Marquardt damping update and forcing tolerance η_k = min(0.5, √(‖∇F‖/‖∇F₀‖)), its CG
  preconditioned by a curvature (Nyström, fisher factor or EK-FAC) fitted at the start — for large models.

Stopping: ‖∇F‖ ≤ ``tol`` or ‖∇F‖ / ḡ₀ ≤ ``tol_ratio`` (whichever comes first; ḡ₀ = mean per-task
total-gradient norm, measured once at the start and again at the end for the report), ``max_iter``
iterations, or ``max_minutes`` of wall time (checked before each iteration, which is not started when the time spent
plus the last iteration's would overrun it; λ so far is returned). The iterations print ‖∇F‖/ḡ₀; the report
also gives ‖∇F‖ over the mean measured again at the end (``ratio_after``), and ``ratio_after_start`` = ‖∇F‖/ḡ₀.

The weights ``w`` refine with tasks removed (w_k = 0) while keeping the 1/n normalisation of the
full pool — the leave-one-out ground truth of docs/method.md §10 is defined this way. The report records
‖∇F‖ and F before/after, and ‖∇F‖ relative to the mean per-task total-gradient norm
(1/|K|) Σ_{k∈K} ‖g_k‖ over the tasks K with w_k ≠ 0 (the stationarity diagnostic every influence
result carries).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch

from ..errors import DivergenceError, SettingsError, caller_level
from ..progress import counted
from ..tasks.tensors import TaskTensors
from .objective import MetaProblem
from .refine_monitor import RefineMonitor, check_start_lambda, has_kinks, mean_task_gradient_norm, refine_advice, refine_target  # noqa: F401 (refine_advice re-exported)
from .train import parse_dtype


class RefineWarning(UserWarning):
    """Refine stopped before ‖∇F‖ reached its tolerance; influence estimates will be less reliable."""


REFINE_METHODS = ("lbfgs", "gd", "newton", "newton-cg")
PRECONDITIONERS = ("none", "nystrom", "ekfac", "fisher", "gn-factor")


@dataclass
class RefineSettings:
    """Settings of the refine stage (deterministic full-pool optimisation of F)."""

    method: str = field(default="lbfgs", metadata={"help": "optimiser: lbfgs (strong-Wolfe line search, falls back to gd on failure) | gd (gradient descent with backtracking) | newton (damped Newton: dense below newton_dense_max parameters, Newton–CG above) | newton-cg (matrix-free Newton–CG, preconditioned, for large models; its Hessian: newton_hessian)", "choices": REFINE_METHODS})
    tol: float = field(default=1e-6, metadata={"help": "stop when the full-pool meta-gradient norm ‖∇F‖₂ is at most this (0: off)"})
    tol_ratio: float = field(default=0.0, metadata={"help": "also stop when ‖∇F‖ / mean_i ‖g_i‖ is at most this (mean per-task gradient norm measured once at the start; 0: off) — the first of tol and tol_ratio met stops"})
    max_iter: int = field(default=1000, metadata={"help": "maximum optimiser iterations (each is one or a few full-pool passes)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop after this many minutes of wall time and return λ so far, with a warning; an iteration is not started when the time spent plus the last iteration's would overrun it (0: no limit); the passes at the start and end (F, ∇F, the task-gradient norms) are outside it"})
    lr: float = field(default=0.1, metadata={"help": "initial step size of gradient descent (method gd, and the L-BFGS fallback)"})
    history_size: int = field(default=20, metadata={"help": "L-BFGS memory (number of curvature pairs)"})
    dtype: str = field(default="float64", metadata={"help": "precision of refine and of the returned λ: float64 (lets ‖∇F‖ go far below float32 round-off) | float32", "choices": ("float32", "float64")})
    fallback: bool = field(default=True, metadata={"help": "fall back to gradient descent when L-BFGS hits NaN/inf or stalls"})
    newton_hessian: str = field(default="auto", metadata={"help": "newton: Hessian of the steps: exact | gauss-newton | auto (exact where the problem has it)", "choices": ("auto", "exact", "gauss-newton")})
    newton_dense_max: int = field(default=3000, metadata={"help": "newton: largest number of parameters whose Hessian is materialised (above it: matrix-free Newton–CG)"})
    newton_cg_iters: int = field(default=100, metadata={"help": "newton, newton-cg: most CG iterations per Newton–CG step (products with the Hessian)"})
    newton_damping: float = field(default=1e-3, metadata={"help": "newton-cg: initial Levenberg–Marquardt damping δ of (H + δI) d = −∇F (adapted every step)"})
    newton_products: str = field(default="working", metadata={"help": "newton-cg: precision of Hessian products: working | float32 (sums over tasks stay in λ's dtype)", "choices": ("working", "float32")})
    precondition: str = field(default="nystrom", metadata={"help": "newton-cg: CG preconditioner, a curvature artifact fitted at the start: nystrom (sketch of the Gauss–Newton H, positive definite whatever the step Hessian) | fisher (sampled-label factor of the total Gauss–Newton H, inverted exactly; 8 draws per task) | gn-factor (the total Gauss–Newton H itself as a factor, one row per task, query example and class: Gauss–Newton steps then need 1–2 CG iterations; softmax cross-entropy only; refit it with precondition_refit) | ekfac | none", "choices": PRECONDITIONERS})
    precondition_rank: int = field(default=0, metadata={"help": "newton-cg: Nyström rank (0: auto, doubled until the sketch reaches the damped bottom of the spectrum)"})
    precondition_max_tasks: int = field(default=0, metadata={"help": "newton-cg: fit the preconditioner on a seeded subsample of this many tasks (0: all)"})
    precondition_refit: int = field(default=0, metadata={"help": "newton-cg: refit the preconditioner every this many Newton steps (0: never; a stale one only costs CG iterations)"})
    proximal: float = field(default=0.0, metadata={"help": "γ > 0: minimise F + (γ/2)‖λ − λ₀‖², anchored at the starting λ₀ (the trained model), instead of F — it has a "
                                                           "stationary point near λ₀ where plain F has none worth reaching (a memorised pool, docs/method.md §2); the refined "
                                                           "checkpoint keeps λ₀, and influence and edits on it add γ to their damping (0: plain F)"})

    def validate(self) -> None:
        if self.method not in REFINE_METHODS:
            raise SettingsError(f"unknown refine method {self.method!r}; use one of {', '.join(REFINE_METHODS)}")
        if self.newton_hessian not in ("auto", "exact", "gauss-newton"):
            raise SettingsError(f"unknown newton_hessian {self.newton_hessian!r}; use auto, exact or gauss-newton")
        if self.newton_dense_max < 0 or self.newton_cg_iters < 1:
            raise SettingsError("newton_dense_max must be ≥ 0 and newton_cg_iters ≥ 1")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise SettingsError(f"refine tol must be ≥ 0, got {self.tol}")
        if not (math.isfinite(self.tol_ratio) and self.tol_ratio >= 0):
            raise SettingsError(f"refine tol_ratio must be ≥ 0 (0: off), got {self.tol_ratio}")
        if not (math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise SettingsError(f"refine max_minutes must be ≥ 0 (0: no limit), got {self.max_minutes}")
        if not (math.isfinite(self.newton_damping) and self.newton_damping >= 0):
            raise SettingsError(f"refine newton_damping must be ≥ 0, got {self.newton_damping}")
        if self.newton_products not in ("working", "float32"):
            raise SettingsError(f"unknown newton_products {self.newton_products!r}; use working or float32")
        if self.precondition not in PRECONDITIONERS:
            raise SettingsError(f"unknown refine precondition {self.precondition!r}; use one of {', '.join(PRECONDITIONERS)}")
        if min(self.precondition_rank, self.precondition_max_tasks, self.precondition_refit) < 0:
            raise SettingsError("precondition_rank, precondition_max_tasks and precondition_refit must be ≥ 0 (0: auto / all / never)")
        if self.max_iter < 0:
            raise SettingsError(f"refine max_iter must be ≥ 0, got {self.max_iter}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"refine lr must be positive, got {self.lr}")
        if self.history_size < 1:
            raise SettingsError(f"refine history_size must be ≥ 1, got {self.history_size}")
        if not (math.isfinite(self.proximal) and self.proximal >= 0):
            raise SettingsError(f"refine proximal γ must be ≥ 0 (0: plain F), got {self.proximal}")
        parse_dtype(self.dtype)


@dataclass
class RefineReport:
    """What refine did, and how stationary λ is before and after (docs/method.md §2)."""

    method: str
    converged: bool
    tol: float
    iterations: int
    evaluations: int
    grad_norm_before: float
    grad_norm_after: float
    task_grad_norm_before: float
    task_grad_norm_after: float
    ratio_before: float
    ratio_after: float
    objective_before: float
    objective_after: float
    wall_time_s: float
    n_tasks: int
    n_active_tasks: int
    message: str = ""
    tol_ratio: float = 0.0
    stopped_by: str = ""  # tol | tol_ratio | max_iter | max_minutes | failure
    cg_iterations: int = 0  # newton-cg: CG iterations (Hessian products) over all steps
    preconditioner: dict = field(default_factory=dict)
    history: list = field(default_factory=list, repr=False)  # per iteration: ratio, step, cg, seconds, eta_s (out of print(report))
    proximal: float = 0.0  # γ of the proximal term the gradient norms include (0: plain F)
    ratio_after_start: float = float("nan")  # ‖∇F‖ at the returned λ / the starting mean‖g_i‖ ḡ₀: what the iterations print and tol_ratio tests
    query_loss_after: float = float("nan")  # F at the returned λ without weight decay and proximal term: the pool's mean query loss

    def summary(self) -> str:
        state = "converged" if self.converged else f"NOT converged: {self.stopped_by or 'stopped'}"
        cg = f", {self.cg_iterations} CG iterations" if self.cg_iterations else ""
        return (
            f"refine ({self.method}, {state}, {counted(self.iterations, 'iteration')}{cg}, "
            f"{counted(self.evaluations, 'full-pool pass', 'full-pool passes')}, {self.wall_time_s:.1f} s): "
            f"‖∇F‖ {self.grad_norm_before:.3g} → {self.grad_norm_after:.3g} (tol {self.tol:.3g}"
            + (f", tol_ratio {self.tol_ratio:.3g}" if self.tol_ratio else "") + "); "
            f"‖∇F‖ / mean‖g_i‖ {self.ratio_before:.3g} → {self.ratio_after:.3g}"
            + (f" (‖∇F‖/ḡ₀ {self.ratio_after_start:.3g} against the starting mean‖g_i‖, as the iterations print it)"
               if isinstance(self.ratio_after_start, float) and math.isfinite(self.ratio_after_start) else "")
            + f"; F {self.objective_before:.6g} → {self.objective_after:.6g}"
        )

    def to_json(self) -> dict:
        out = asdict(self)
        out["ratio_meaning"] = "‖∇F‖ / mean over tasks with w_k ≠ 0 of ‖g_k‖ (per-task total gradients)" + (
            f"; ∇F includes the proximal term γ(λ − λ₀), γ = {self.proximal:g}" if self.proximal else "")
        return out

    @classmethod
    def from_json(cls, data: dict) -> "RefineReport":
        """The report a checkpoint recorded (``to_json``'s explanatory keys dropped)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class _NonFinite(Exception):
    pass


class _Evaluator:
    """F and ∇F at a point, with a small cache keyed by the point's exact value."""

    def __init__(self, problem: MetaProblem, tasks: TaskTensors, w: torch.Tensor | None, size: int = 8, v=None, u=None, proximal=None):
        self.problem, self.tasks, self.w, self.v, self.u = problem, tasks, w, v, u
        self.proximal = proximal  # (γ, centre): adds (γ/2)‖λ − centre‖² to F
        self.cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.size = size
        self.count = 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach()
        for cx, f, g in self.cache:
            if torch.equal(cx, x):
                return f, g
        f, g = self.problem.value_and_gradient(x, self.tasks, self.w, self.v, self.u)
        if self.proximal is not None:
            gamma, centre = self.proximal
            f, g = f + 0.5 * gamma * ((x - centre).double() ** 2).sum(), g + gamma * (x - centre)
        self.count += 1
        self.cache.append((x.clone(), f.detach(), g.detach()))
        if len(self.cache) > self.size:
            self.cache.pop(0)
        return f, g


def _finite(f: torch.Tensor, g: torch.Tensor) -> bool:
    return bool(torch.isfinite(f)) and bool(torch.isfinite(g).all())


def refine(
    problem: MetaProblem,
    lam: torch.Tensor,
    pool_tensors: TaskTensors,
    settings: RefineSettings | None = None,
    w: torch.Tensor | None = None,
    progress: bool = False,
    example_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    proximal: tuple[float, torch.Tensor] | None = None,
    log=None,
) -> tuple[torch.Tensor, RefineReport]:
    """Minimise F(λ; w, v, u) over the full pool from ``lam`` until ‖∇F‖ ≤ ``settings.tol``.

    ``example_weights``: (v, u), per-example weights (n, |S|), (n, |Q|) of the support and query losses.
    ``proximal``: (γ, λ₀) adds (γ/2)‖λ − λ₀‖² to F — the proximal response of Bae et al. (2022), what
    a damped influence function estimates in a non-convex model. Without it, ``settings.proximal`` = γ > 0
    anchors the same term at the starting ``lam``; callers that re-optimise from a proximal λ* pass
    the original anchor explicitly.
    ``log``: called with a line per iteration of a second or more (else one per 30 s) when ``progress`` is off (e.g. ``print`` in a batch job).

    Returns (λ in ``settings.dtype``, :class:`RefineReport`). Deterministic: no sampling anywhere.
    Emits a :class:`RefineWarning` (and ``report.converged = False``) when the tolerance is not met;
    raises :class:`DivergenceError` if F or ∇F is NaN/inf at the starting point.
    """
    check_start_lambda(lam, pool_tensors=pool_tensors)
    settings = settings or RefineSettings()
    settings.validate()
    dtype = parse_dtype(settings.dtype)
    t0 = time.perf_counter()
    x0 = lam.detach().to(dtype=dtype).clone()
    tasks = pool_tensors.to(device=x0.device, dtype=dtype)
    if w is not None:
        w = torch.as_tensor(w).to(device=x0.device, dtype=dtype)
        if w.shape != (len(tasks),):
            raise SettingsError(f"task weights w have shape {tuple(w.shape)}, expected ({len(tasks)},) — one per pool task")
    v, u = problem.example_weights(tasks, example_weights, x0)
    if proximal is None and settings.proximal > 0:
        proximal = (settings.proximal, x0)
    if proximal is not None:
        proximal = (float(proximal[0]), proximal[1].detach().to(x0))
    ev = _Evaluator(problem, tasks, w, v=v, u=u, proximal=proximal)
    f0, g0 = ev(x0)
    if not _finite(f0, g0):
        raise DivergenceError("refine: F or ∇F is NaN/inf at the starting λ; start from a trained, finite λ (lower the training lr if it diverged)")
    task_norm_before = mean_task_gradient_norm(problem, x0, tasks, w, v, u)
    # one absolute threshold for every optimiser: the first of the two rules met stops
    stop = max(settings.tol, settings.tol_ratio * task_norm_before)
    monitor = RefineMonitor(settings, task_norm_before, stop, t0, progress, log, agree=problem.collective.any_true)

    x = x0.clone()
    iterations = 0
    method_used = settings.method
    message = ""
    cg_iterations, precond = 0, {}
    roundoff = False  # L-BFGS stopped by steps below the working precision's resolution of λ
    try:
        if settings.method == "newton" and float(g0.norm()) > stop:
            from .newton import newton_minimise, newton_solver

            solve = newton_solver(problem, tasks, w, v, u, hessian=settings.newton_hessian, dense_max=settings.newton_dense_max,
                                  cg_iters=settings.newton_cg_iters)
            method_used = f"newton ({solve.hessian}, {'dense' if x.numel() <= settings.newton_dense_max else 'CG'})"
            step_solver = solve if proximal is None else (lambda x_, g_, shift, _s=solve: _s(x_, g_, shift + proximal[0]))
            x, iterations, failure = newton_minimise(ev, step_solver, x, stop, settings.max_iter, show=monitor.update,
                                                     out_of_time=monitor.out_of_time)
            if failure:
                message = f"Newton {failure} after {counted(iterations, 'iteration')}"
        if settings.method == "newton-cg" and float(g0.norm()) > stop:
            from .newton_cg import newton_cg_minimise, resolve_hessian

            method_used = f"newton-cg ({resolve_hessian(problem, settings.newton_hessian)}, precondition {settings.precondition})"
            x, iterations, failure, state = newton_cg_minimise(ev, problem, tasks, x, stop, settings, w, v, u,
                                                               shift=0.0 if proximal is None else proximal[0], monitor=monitor)
            cg_iterations, precond = state.cg_iterations, {**state.preconditioner, "final_damping": state.damping, "rejected_steps": state.rejected}
            if failure:
                message = f"Newton–CG {failure} after {counted(iterations, 'iteration')}"
        if settings.method == "lbfgs" and float(g0.norm()) > stop and settings.max_iter > 0:
            x, iterations, failure = _run_lbfgs(ev, x, settings, stop, monitor)
            if failure:
                message = f"L-BFGS {failure} after {counted(iterations, 'iteration')}"
                roundoff = failure.startswith(ROUNDOFF)
                if settings.fallback and not roundoff:  # gradient descent would meet the same round-off
                    method_used = "lbfgs+gd"
                    message += "; continued with gradient descent"
        if (settings.method == "gd" or method_used == "lbfgs+gd") and iterations < settings.max_iter:
            x, done, failure = _run_gd(ev, x, settings, settings.max_iter - iterations, stop, monitor)
            iterations += done
            if failure:
                message = (message + "; " if message else "") + f"gradient descent {failure}"
    finally:
        monitor.close()

    f1, g1 = ev(x)
    gn0, gn1 = float(g0.norm()), float(g1.norm())
    # the training tasks' mean query loss, against which a measurement on held-out tasks shows meta-overfitting
    query_loss = float(f1) - 0.5 * problem.weight_decay * float((x.double() ** 2).sum())
    if proximal is not None:
        query_loss -= 0.5 * proximal[0] * float(((x - proximal[1]).double() ** 2).sum())
    converged = gn1 <= stop
    task_norm_after = mean_task_gradient_norm(problem, x, tasks, w, v, u)
    ratio_after = gn1 / task_norm_after if task_norm_after > 0 else float("nan")
    ratio_start = gn1 / task_norm_before if task_norm_before > 0 else float("nan")  # the scale the iterations print
    if converged:
        stopped_by = "tol" if gn1 <= settings.tol else "tol_ratio"
    elif monitor.timed_out:  # the budget was spent, or the next iteration would have overrun it (refine_monitor.py)
        stopped_by = "max_minutes"
        message = (message + "; " if message else "") + monitor.time_message(iterations, ratio_start)
    elif message:
        stopped_by = "failure"
    else:
        stopped_by = "max_iter"
        message = f"reached max_iter={settings.max_iter}"
    report = RefineReport(
        method=method_used,
        converged=converged,
        tol=settings.tol,
        iterations=iterations,
        evaluations=ev.count,
        grad_norm_before=gn0,
        grad_norm_after=gn1,
        task_grad_norm_before=task_norm_before,
        task_grad_norm_after=task_norm_after,
        ratio_before=gn0 / task_norm_before if task_norm_before > 0 else float("nan"),
        ratio_after=ratio_after,
        objective_before=float(f0),
        objective_after=float(f1),
        query_loss_after=query_loss,
        wall_time_s=time.perf_counter() - t0,
        n_tasks=len(tasks),
        n_active_tasks=len(tasks) if w is None else int((w != 0).sum()),
        message=message,
        tol_ratio=settings.tol_ratio,
        stopped_by=stopped_by,
        cg_iterations=cg_iterations,
        preconditioner=precond,
        history=monitor.history,
        proximal=0.0 if proximal is None else proximal[0],
        ratio_after_start=ratio_start,
    )
    if not converged:
        target = refine_target(settings.tol, settings.tol_ratio, stop)
        if stopped_by == "max_minutes" and not has_kinks(problem):  # time, not iterations, ran out: advice about iterations would mislead
            advice = ("raise --refine-max-minutes, or continue from where it stopped by refining the written checkpoint again "
                      "(`metainfluence refine --checkpoint OUT/refined`)")
        elif roundoff and dtype != torch.float64:
            advice = ("refine in float64, where steps this short are resolved (--refine-dtype float64, or [refine] dtype = \"float64\"), e.g. from "
                      "the written checkpoint: `metainfluence refine --checkpoint OUT/refined --refine-dtype float64`")
        else:
            advice = refine_advice(settings, problem)
        warnings.warn(
            f"refine did not reach {target}: ‖∇F‖ = {gn1:.3g}, ‖∇F‖/ḡ₀ {ratio_start:.3g} ({ratio_after:.3g} against the end's mean‖g_i‖); "
            f"{message}; {advice} — influence estimates assume stationarity (docs/method.md §2)",
            RefineWarning,
            stacklevel=caller_level(),
        )
    return x, report


ROUNDOFF = "stalled at round-off"
ROUNDOFF_STEPS = 8  # a step shorter than this many units of round-off of ‖λ‖ moves λ by a few last digits at most


def _run_lbfgs(ev: _Evaluator, x0: torch.Tensor, settings: RefineSettings, stop: float, monitor: RefineMonitor) -> tuple[torch.Tensor, int, str]:
    """L-BFGS one iteration per ``step`` call; returns (x, iterations, failure reason or '')."""
    x = x0.clone()
    max_ls = 25
    opt = torch.optim.LBFGS(
        [x], lr=1.0, max_iter=1, max_eval=1 + max_ls, tolerance_grad=0.0, tolerance_change=0.0,
        history_size=settings.history_size, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        f, g = ev(x)
        if not _finite(f, g):
            raise _NonFinite()
        x.grad = g.clone()
        return f

    iterations, tiny = 0, 0
    while iterations < settings.max_iter and not monitor.out_of_time():
        before = x.detach().clone()
        try:
            opt.step(closure)
        except _NonFinite:
            with torch.no_grad():
                x.copy_(before)
            return x.detach(), iterations, "met NaN/inf"
        iterations += 1
        f, g = ev(x)
        monitor.update(g, step=float((x.detach() - before).norm()))
        if not _finite(f, g):
            with torch.no_grad():
                x.copy_(before)
            return x.detach(), iterations, "met NaN/inf"
        if float(g.norm()) <= stop:
            return x.detach(), iterations, ""
        if torch.equal(x.detach(), before):
            return x.detach(), iterations, "stalled (no step along its direction decreased F)"
        # steps below the working precision's resolution of λ: the line search can no longer see F decrease (a float32
        # refine of the ANIL MNIST recipe took 4.5e-13 steps for 7 iterations of 40–50 s each, to no effect)
        step, resolution = float((x.detach() - before).norm()), ROUNDOFF_STEPS * torch.finfo(x.dtype).eps * float(before.norm())
        tiny = tiny + 1 if step <= resolution else 0
        if tiny == 2:
            return x.detach(), iterations, f"{ROUNDOFF} (its last 2 steps, {step:.2g}, are below {str(x.dtype).replace('torch.', '')}'s resolution of λ, {resolution:.2g})"
    return x.detach(), iterations, ""


def _run_gd(ev: _Evaluator, x: torch.Tensor, settings: RefineSettings, budget: int, stop: float, monitor: RefineMonitor) -> tuple[torch.Tensor, int, str]:
    """Gradient descent with Armijo backtracking; returns (x, iterations, failure reason or '')."""
    x = x.detach().clone()
    f, g = ev(x)
    step = settings.lr
    done = 0
    while done < budget and float(g.norm()) > stop and not monitor.out_of_time():
        done += 1
        gg = float((g * g).sum())
        trial = x - step * g
        ft, gt = ev(trial)
        taken = 0.0
        if _finite(ft, gt) and float(ft) <= float(f) - 1e-4 * step * gg:
            x, f, g = trial, ft, gt
            taken = step * gg ** 0.5
            step *= 1.2
        else:
            step *= 0.5
            if step < 1e-30:
                return x, done, "could not find a decreasing step"
        monitor.update(g, step=taken)
    return x, done, ""
