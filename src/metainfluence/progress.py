"""Progress bars for long stages, off unless a caller asks for them (the CLI does; the library is
quiet by default so that tests and user code stay silent). ``with showing(): ...`` turns them on for
everything the block runs — CG iterations, Neumann terms, passes over the task pool, ground-truth
re-optimisations — each a tqdm bar with an ETA on stderr. ``showing(False, heartbeat=60)`` (the CLI's
``--no-progress``) draws no bars but prints a bar's status as one plain line a minute once it has run
that long, so a long CG solve in a log file is not silent; a watcher thread prints it even while one
iteration (a single chunk of a pass over the pool) runs longer than that. :func:`log_lines` says whether
such plain lines are wanted (training prints a line every ``log_every`` steps then)."""

from __future__ import annotations

import contextvars
import functools
import math
import re
import sys
import threading
import time
import weakref
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

    _lock = threading.Lock()  # the watcher thread writes too: one write per line, never two half lines

    def write(self, text: str) -> None:
        line = _CONTROL.sub("", text).strip()
        if line:
            status_line(line)

    def flush(self) -> None:
        pass


def enabled() -> bool:
    return _ENABLED.get()


def status_line(line: str) -> None:
    """One plain status line on stderr, after whatever stdout holds (a pipe buffers it) so that a log file of both
    keeps the order; one locked write, so the heartbeat thread never interleaves half lines."""
    with _LogLines._lock:
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def log_lines() -> bool:
    """Whether plain status lines are wanted: bars off with a heartbeat (the CLI's ``--no-progress``), not a
    quiet library call (bars off, no heartbeat)."""
    return not _ENABLED.get() and _HEARTBEAT.get() > 0


# Heartbeat bars are redrawn by tqdm only when they are updated, so a pass whose one chunk runs for minutes
# printed nothing: a daemon thread redraws any open one that has been silent for its interval (it lives
# while such a bar is open; bars are held weakly, so a bar nobody closed still goes away with its owner).
_OPEN: "weakref.WeakSet" = weakref.WeakSet()
_WATCH = threading.Lock()
_WATCHER: list[threading.Thread] = []


def _watch(bar) -> None:
    with _WATCH:
        _OPEN.add(bar)
        if not (_WATCHER and _WATCHER[0].is_alive()):
            _WATCHER[:] = [threading.Thread(target=_watch_loop, name="metainfluence-heartbeat", daemon=True)]
            _WATCHER[0].start()


def _watch_loop() -> None:
    while (poll := _beat_open_bars()) is not None:
        time.sleep(poll)


def _beat_open_bars() -> float | None:
    """Redraw the open heartbeat bars that are due; the seconds until the next look (None: none open, the thread ends).
    A function, so that no bar stays referenced while the thread sleeps."""
    with _WATCH:
        bars = [b for b in list(_OPEN) if not b.disable]
        if not bars:
            _WATCHER.clear()
            return None
    for b in bars:
        b.beat()
    return min(1.0, max(0.05, min(b.mininterval for b in bars) / 2))


@functools.cache
def _heartbeat_bar():
    """tqdm with :meth:`beat`, the redraw the watcher makes when the bar has been silent for its interval."""
    from tqdm import tqdm

    class HeartbeatBar(tqdm):
        def __iter__(self):
            # tqdm's own loop keeps the count in a local until it prints: a plain update per item keeps
            # ``n`` current for the watcher (items are chunks or solver iterations, so the cost is nil)
            try:
                for obj in self.iterable:
                    yield obj
                    self.update(1)
            finally:
                self.close()

        def beat(self) -> None:
            now = self._time()
            if not self.disable and now - self.start_t >= self.delay and now - self.last_print_t >= self.mininterval:
                self.last_print_t = now  # first, so that an update racing this redraw does not print the same line
                self.refresh()
                self.last_print_n = self.n

    return HeartbeatBar


def bar(desc: str, total: int | None, unit: str = "it", leave: bool = False, iterable=None):
    """A tqdm bar (disabled unless :func:`showing` is active), over ``iterable`` when given."""
    from tqdm.auto import tqdm

    every = _HEARTBEAT.get()
    if not _ENABLED.get() and every > 0:
        # first line after `every` seconds (short bars stay silent), then at most one per `every` seconds
        fmt = "{desc}: {n_fmt} {unit} [{elapsed}{postfix}]" if total is None else "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"
        # miniters=1, maxinterval=0: a fixed interval, no adaptive skipping and no tqdm monitor thread (ours redraws)
        b = _heartbeat_bar()(iterable, total=total, desc=desc, unit=unit, leave=False, file=_LogLines(),
                             bar_format=fmt, delay=every, mininterval=every, miniters=1, maxinterval=0)
        _watch(b)
        return b
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


def counted(n: int, word: str, plural: str | None = None) -> str:
    """"1 iteration", "2 iterations": ``n`` and ``word``, or ``plural`` (default word + "s") unless n is 1."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def clock(seconds: float) -> str:
    """h:mm:ss, "?" without an estimate, ">100 h" for a stalled trend (it extrapolates to centuries)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds > 100 * 3600:
        return ">100 h"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
