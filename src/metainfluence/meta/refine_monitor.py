"""The progress and stopping record shared by refine's drivers (meta/refine.py, meta/newton_cg.py):
per-iteration ratio ‖∇F‖/ḡ₀, step, CG iterations and seconds, an ETA to the tolerance, and the
``max_minutes`` clock."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from ..progress import RateEta, clock


class RefineMonitor:
    """Per-iteration record and progress bar: ratio ‖∇F‖/ḡ₀, step length, CG iterations, seconds per
    iteration and an ETA to the tolerance extrapolated from the log-linear decrease of the ratio over
    the last few iterations (a Newton method that speeds up finishes sooner than that); also the
    ``max_minutes`` clock."""

    WINDOW = 5
    # without a bar: a line for every iteration that takes this long (a Conv4 refine), else one per LINE_EVERY_S
    # (600 lines of 0.01 s iterations said nothing a log file needs)
    SLOW_ITERATION_S = 1.0
    LINE_EVERY_S = 30.0

    def __init__(self, settings: Any, task_norm: float, stop: float, t0: float, progress: bool, log=None):
        self.task_norm = task_norm if task_norm > 0 else float("nan")
        self.target = stop / self.task_norm if stop > 0 else float("nan")
        self.deadline = t0 + 60 * settings.max_minutes if settings.max_minutes > 0 else math.inf
        self.history: list[dict] = []
        self.trend = RateEta(self.WINDOW)  # log ratio against time
        self.last = self.last_line = t0
        self.bar = None
        self.log = None if progress else log  # without a bar, lines for a log file (see SLOW_ITERATION_S)
        if progress:
            from tqdm.auto import tqdm

            # no total: tqdm's own ETA would extrapolate max_iter, not the tolerance
            self.bar = tqdm(total=None, desc=f"refine ({settings.method})", unit="it", file=sys.stderr, dynamic_ncols=True, leave=True)

    def out_of_time(self) -> bool:
        return time.perf_counter() >= self.deadline

    def eta(self) -> float:
        """Seconds until the ratio reaches its target at the recent log-linear rate (nan: no estimate)."""
        return self.trend.eta(self.target)

    def update(self, g: torch.Tensor, step: float | None = None, cg: int | None = None, damping: float | None = None) -> None:
        now = time.perf_counter()
        ratio = float(g.norm()) / self.task_norm
        self.trend.add(now, ratio)
        eta = self.eta()
        row = {"ratio": ratio, "step": step, "cg": cg, "seconds": now - self.last, "eta_s": eta}
        if damping is not None:
            row["damping"] = damping
        self.history.append(row)
        self.last = now
        post = {"ratio": f"{ratio:.3g}"}
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

