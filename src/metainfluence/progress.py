"""Progress bars for long stages, off unless a caller asks for them (the CLI does; the library is
quiet by default so that tests and user code stay silent). ``with showing(): ...`` turns them on for
everything the block runs — CG iterations, Neumann terms, passes over the task pool, ground-truth
re-optimisations — each a tqdm bar with an ETA on stderr. ``showing(False, heartbeat=60)`` (the CLI's
``--no-progress``) draws no bars but prints a bar's status as one plain line a minute once it has run
that long, so a long CG solve in a log file is not silent."""

from __future__ import annotations

import contextvars
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
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=_LogLines(),
                    bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]", delay=every, mininterval=every, maxinterval=every)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True, disable=not _ENABLED.get())
