"""User-facing errors.

Every problem a user can cause (bad file, bad setting, bad data) is raised as a
:class:`MetaInfluenceError` whose message is one line naming the problem and what to do.
The CLI prints that line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys


class MetaInfluenceError(Exception):
    """A problem with the user's input or settings; the message says what to change."""


class DataError(MetaInfluenceError):
    """A dataset file is missing, corrupt or does not fit the request."""


class PoolError(MetaInfluenceError):
    """A task pool cannot be built, or a saved pool does not match its dataset."""


class CheckpointError(MetaInfluenceError):
    """A checkpoint or result file is missing, corrupt, or belongs to another model or pool."""


class SettingsError(MetaInfluenceError):
    """A setting is out of range or inconsistent with another."""


class DivergenceError(MetaInfluenceError):
    """A numerical procedure diverged (NaN, inf, growing residual); the message says what to change."""


class BudgetStop(MetaInfluenceError):
    """A run stopped at its ``--max-minutes`` budget between stages; what it finished is kept on disk and
    the message names the command that continues it. The CLI prints it as ``stopped: …`` (status 3)."""


def require(condition: bool, message: str, kind: type[MetaInfluenceError] = SettingsError) -> None:
    """Raise ``kind(message)`` unless ``condition`` holds."""
    if not condition:
        raise kind(message)


def caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package (the user's line), however
    deep inside it the warning is raised (a fixed level named 'sys:1' or library lines from some entry points)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
