"""The progress and stopping record shared by refine's drivers (meta/refine.py, meta/newton_cg.py):
per-iteration ratio ‖∇F‖/ḡ₀ (ḡ₀: the mean per-task gradient norm at the start), step, CG iterations and
seconds, an ETA to the tolerance, and the ``max_minutes`` clock; also the words of refine's target, its
advice when it stops short, and the check of the λ a caller passes."""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from ..progress import RateEta, clock
from .inputs import check_start_lambda  # noqa: F401 (re-exported: refine and meta_train import it from here)

if TYPE_CHECKING:
    from ..tasks.tensors import TaskTensors
    from .objective import MetaProblem


def refine_target(tol: float, tol_ratio: float, stop: float) -> str:
    """The stopping rule refine was given, in words: the absolute ‖∇F‖ ≤ tol and/or the ratio to ḡ₀, whichever are set."""
    parts = [f"‖∇F‖ ≤ {tol:g}"] if tol > 0 else []
    if tol_ratio > 0:
        parts.append(f"‖∇F‖/ḡ₀ ≤ {tol_ratio:g}")
    if not parts:
        return "‖∇F‖ = 0 (--refine-tol and --refine-tol-ratio are both 0)"
    both = len(parts) == 2
    return " or ".join(parts) + (f" (ḡ₀ the starting mean‖g_i‖; ‖∇F‖ ≤ {stop:.3g}{', the looser' if both else ''})" if tol_ratio > 0 else "")


def mean_task_gradient_norm(problem: "MetaProblem", lam: torch.Tensor, tasks: "TaskTensors", w: torch.Tensor | None = None,
                            v: torch.Tensor | None = None, u: torch.Tensor | None = None) -> float:
    """(1/|K|) Σ_{k∈K} ‖g_k‖ over the tasks with w_k ≠ 0 (with example weights v, u when given), from
    :meth:`MetaProblem.total_gradients` taken chunk by chunk (so the (n × p) matrix is never held at once)."""
    if w is not None:
        active = torch.nonzero(w != 0).reshape(-1)
        if len(active) == 0:
            return float("nan")
        tasks = tasks.subset(active)
        v = None if v is None else v[active]
        u = None if u is None else u[active]
    step = problem.chunk_size or len(tasks)
    total = torch.zeros((), dtype=lam.dtype, device=lam.device)
    for start in range(0, len(tasks), step):
        rows = slice(start, min(len(tasks), start + step))
        part = tasks.subset(rows)
        total = total + problem.total_gradients(lam, part, None if v is None else v[rows], None if u is None else u[rows]).norm(dim=1).sum()
    # through ``reduce`` so that a pool sharded over processes gives the pool-wide mean
    count = problem.collective.all_sum(torch.tensor(float(len(tasks)), dtype=lam.dtype, device=lam.device))
    return float(problem.collective.all_sum(total) / count)


class RefineMonitor:
    """Per-iteration record and progress bar: ratio ‖∇F‖/ḡ₀, step length, CG iterations, seconds per
    iteration and an ETA to the tolerance extrapolated from the log-linear decrease of the ratio over
    the last few iterations (a Newton method that speeds up finishes sooner than that); also the
    ``max_minutes`` clock, which stops before an iteration that would overrun it (see :meth:`out_of_time`)."""

    WINDOW = 5
    # without a bar: a line for every iteration that takes this long (a Conv4 refine), else one per LINE_EVERY_S
    # (600 lines of 0.01 s iterations said nothing a log file needs)
    SLOW_ITERATION_S = 1.0
    LINE_EVERY_S = 30.0

    def __init__(self, settings: Any, task_norm: float, stop: float, t0: float, progress: bool, log=None, agree=bool):
        self.task_norm = task_norm if task_norm > 0 else float("nan")
        self.target = stop / self.task_norm if stop > 0 else float("nan")
        self.t0, self.max_minutes = t0, settings.max_minutes
        self.deadline = t0 + 60 * settings.max_minutes if settings.max_minutes > 0 else math.inf
        self.timed_out = ""  # why out_of_time said stop: "spent" (the budget) or "forecast" (the next iteration would overrun it)
        self.agree = agree  # any process's verdict (Collective.any_true): sharded, every process stops at the same iteration
        self.history: list[dict] = []
        self.trend = RateEta(self.WINDOW)  # log ratio against time
        self.last_line = t0
        self.last = self.clock()  # iteration 1's seconds exclude the starting pass and the ḡ₀ measurement
        self.bar = None
        self.log = None if progress else log  # without a bar, lines for a log file (see SLOW_ITERATION_S)
        if progress:
            from tqdm.auto import tqdm

            # no total: tqdm's own ETA would extrapolate max_iter, not the tolerance
            self.bar = tqdm(total=None, desc=f"refine ({settings.method})", unit="it", file=sys.stderr, dynamic_ncols=True, leave=True)

    clock = staticmethod(time.perf_counter)  # a class attribute, so that a test can run the budget on a fake clock

    def out_of_time(self) -> bool:
        """Whether to stop before the next iteration: the budget is spent, or the time spent plus the last iteration's
        seconds would overrun it (a 130 s iteration started at 3:10 of 4 minutes would end at 5:20). Drivers ask
        once before each iteration; the reason stays in ``timed_out``."""
        if self.deadline == math.inf:
            return False
        now = self.clock()
        last = self.history[-1]["seconds"] if self.history else 0.0
        self.timed_out = "spent" if now >= self.deadline else "forecast" if now + last > self.deadline else ""
        if self.agree(bool(self.timed_out)) and not self.timed_out:
            self.timed_out = "spent"  # another process's clock ran out first
        return bool(self.timed_out)

    def time_message(self, iterations: int, ratio: float) -> str:
        """The report's words for a budget stop (after :meth:`out_of_time` said stop)."""
        said = (f"budget stop: the next iteration would have overrun max_minutes={self.max_minutes:g} ({self.clock() - self.t0:.0f} s spent, "
                f"the last iteration took {self.history[-1]['seconds']:.0f} s)" if self.timed_out == "forecast"
                else f"max_minutes={self.max_minutes:g} reached")
        return f"stopped by time after {iterations} iteration{'s' if iterations != 1 else ''}: {said}; ‖∇F‖/ḡ₀ = {ratio:.3g} remaining"

    def eta(self) -> float:
        """Seconds until the ratio reaches its target at the recent log-linear rate (nan: no estimate)."""
        return self.trend.eta(self.target)

    def update(self, g: torch.Tensor, step: float | None = None, cg: int | None = None, damping: float | None = None) -> None:
        now = self.clock()
        ratio = float(g.norm()) / self.task_norm
        self.trend.add(now, ratio)
        eta = self.eta()
        row = {"ratio": ratio, "step": step, "cg": cg, "seconds": now - self.last, "eta_s": eta}
        if damping is not None:
            row["damping"] = damping
        self.history.append(row)
        self.last = now
        post = {"‖∇F‖/ḡ₀": f"{ratio:.3g}"}  # ḡ₀: the mean‖g_i‖ at the start (the report's ratio_after uses the end's)
        if step is not None:
            post["step"] = f"{step:.2g}"
        if cg is not None:
            post["cg"] = cg
        post["s/it"] = f"{row['seconds']:.2g}"
        post["eta"] = clock(eta)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(post, refresh=False)
        elif self.log is not None and (row["seconds"] >= self.SLOW_ITERATION_S or now - self.last_line >= self.LINE_EVERY_S):
            self.last_line = now  # the bar's fields as one line
            self.log(f"refine iteration {len(self.history)}: " + ", ".join(f"{k} {v}" for k, v in post.items()))

    def note(self, text: str) -> None:
        """A line between iterations (above the bar, or in the log), e.g. a preconditioner fit that takes a while."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.log is not None:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


LARGE_MODEL = 10_000  # parameters above which the advice is Newton–CG / proximal rather than exact Newton


def has_kinks(problem: MetaProblem | None) -> bool:
    """Whether the model has ReLU activations, whose kinks make the second-order meta-objective's gradient jump."""
    return problem is not None and any(isinstance(m, torch.nn.ReLU) for m in problem.model.modules())


def refine_advice(settings: Any = None, problem: MetaProblem | None = None) -> str:
    """What helps a refine that stopped above its tolerance; ``problem`` (the model refined) fits the advice to
    its size (dense Newton only below a few thousand parameters) and activations (ReLU makes F jump)."""
    large = problem is not None and problem.spec.dim > LARGE_MODEL  # Conv4 sizes: an exact Newton step costs minutes
    proximal = settings is not None and settings.proximal > 0  # already on the proximal objective: no use suggesting it
    if has_kinks(problem):
        # no refiner gets far on a jumping F, whatever the model's size (docs/training.md, "Refine at Conv4 scale"): change the objective instead
        return ("with ReLU the second-order meta-objective jumps (docs/training.md, 'Refine at Conv4 scale'), so no refiner reaches a tight "
                "‖∇F‖ here: retrain with a smooth activation (--model-conv-activation silu / --model-activation silu), or "
                + ("raise --refine-max-minutes or --refine-proximal (a larger γ is better conditioned)" if proximal else
                   "refine the proximal objective near the trained λ (--refine-proximal 1 --refine-tol 0 --refine-tol-ratio 1e-4)"))
    if settings is not None and settings.method == "newton":
        return ("raise --refine-max-iter, or try --refine-newton-hessian gauss-newton (PSD) if the exact Hessian is indefinite here")
    if settings is not None and settings.method == "newton-cg":
        from .newton_cg import resolve_hessian  # newton_cg imports this module's settings
        if problem is not None and resolve_hessian(problem, settings.newton_hessian) == "exact":
            return ("raise --refine-max-iter or --refine-newton-cg-iters; where the exact Hessian is indefinite (many rejected steps) try "
                    "--refine-newton-hessian gauss-newton (PSD)")
        return ("raise --refine-max-iter or --refine-newton-cg-iters; where Gauss–Newton steps converge slowly (large residuals) "
                "finish with --refine-method newton (exact Hessian)")
    if large:
        return ("use preconditioned Newton–CG (--refine-method newton-cg --refine-precondition fisher --refine-tol 0 --refine-tol-ratio 1e-4), "
                + ("a larger --refine-proximal, " if proximal else "or refine the proximal objective near the trained λ (--refine-proximal 1), ")
                + "or raise --refine-max-iter (or --refine-max-minutes)")
    return ("refine with the Newton refiner (--refine-method newton: a few exact or Gauss–Newton steps reach tight tolerances "
            "where L-BFGS stalls), or raise --refine-max-iter")
