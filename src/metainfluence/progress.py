"""Progress bars for long stages, off unless a caller asks for them (the CLI does; the library is
quiet by default so that tests and user code stay silent). ``with showing(): ...`` turns them on for
everything the block runs — CG iterations, Neumann terms, passes over the task pool, ground-truth
re-optimisations — each a tqdm bar with an ETA on stderr. ``showing(False, heartbeat=60)`` (the CLI's
``--no-progress``) draws no bars but prints a bar's status as one plain line a minute once it has run
that long, so a long CG solve in a log file is not silent."""

from __future__ import annotations

import contextvars
import math
import re
import sys
from contextlib import contextmanager
from typing import Iterator

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("metainfluence_progress", default=False)
_HEARTBEAT: contextvars.ContextVar[float] = contextvars.ContextVar("metainfluence_heartbeat", default=0.0)
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\r\n]")


@contextmanager
def showing(enabled: bool = True, heartbeat: float = 0.0) -> Iterator[None]:
    """Bars on (``enabled``), or off with a status line every ``heartbeat`` seconds (0: silent)."""
    tokens = (_ENABLED.set(bool(enabled)), _HEARTBEAT.set(max(0.0, float(heartbeat))))
    try:
        yield
    finally:
        _ENABLED.reset(tokens[0])
        _HEARTBEAT.reset(tokens[1])


class _LogLines:
    """A file for tqdm that turns each redraw into one line on stderr (cursor moves and blank redraws dropped)."""

    def write(self, text: str) -> None:
        line = _CONTROL.sub("", text).strip()
        if line:
            print(line, file=sys.stderr, flush=True)

    def flush(self) -> None:
        pass


def enabled() -> bool:
    return _ENABLED.get()


def bar(desc: str, total: int | None, unit: str = "it", leave: bool = False, iterable=None):
    """A tqdm bar (disabled unless :func:`showing` is active), over ``iterable`` when given."""
    from tqdm.auto import tqdm

    every = _HEARTBEAT.get()
    if not _ENABLED.get() and every > 0:
        # first line after `every` seconds (short bars stay silent), then at most one per `every` seconds
        fmt = "{desc}: {n_fmt} {unit} [{elapsed}{postfix}]" if total is None else "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=_LogLines(),
                    bar_format=fmt, delay=every, mininterval=every, maxinterval=every)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True, disable=not _ENABLED.get())


class RateEta:
    """Seconds until a quantity that falls log-linearly in time (a CG residual, refine's ratio) reaches its
    target: a least-squares line through the last ``window`` + 1 points of log(value) against time. An
    iteration cap would be the wrong horizon for an iterative solver, which stops at its tolerance."""

    def __init__(self, window: int = 5):
        self.window = window
        self.points: list[tuple[float, float]] = []  # (time, log value)

    def add(self, when: float, value: float) -> None:
        if value > 0 and math.isfinite(value):
            self.points.append((when, math.log(value)))

    def eta(self, target: float) -> float:
        """Seconds to ``target`` at the recent rate: 0 when reached, nan without a falling trend."""
        pts = self.points[-(self.window + 1):]
        if len(pts) < 2 or not math.isfinite(target) or target <= 0:
            return float("nan")
        gap = pts[-1][1] - math.log(target)
        if gap <= 0:
            return 0.0
        tm = sum(t for t, _ in pts) / len(pts)
        ym = sum(y for _, y in pts) / len(pts)
        var = sum((t - tm) ** 2 for t, _ in pts)
        slope = sum((t - tm) * (y - ym) for t, y in pts) / var if var > 0 else 0.0  # log value per second
        return gap / -slope if slope < 0 else float("nan")


def clock(seconds: float) -> str:
    """h:mm:ss, "?" without an estimate, ">100 h" for a stalled trend (it extrapolates to centuries)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds > 100 * 3600:
        return ">100 h"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
