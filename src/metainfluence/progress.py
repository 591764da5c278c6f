"""Progress bars for long stages, off unless a caller asks for them (the CLI does; the library is
quiet by default so that tests and user code stay silent). ``with showing(): ...`` turns them on for
everything the block runs — CG iterations, Neumann terms, passes over the task pool, ground-truth
re-optimisations — each a tqdm bar with an ETA on stderr."""

from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager
from typing import Iterator

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("metainfluence_progress", default=False)


@contextmanager
def showing(enabled: bool = True) -> Iterator[None]:
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    return _ENABLED.get()


def bar(desc: str, total: int | None, unit: str = "it", leave: bool = False, iterable=None):
    """A tqdm bar (disabled unless :func:`showing` is active), over ``iterable`` when given."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True, disable=not _ENABLED.get())
