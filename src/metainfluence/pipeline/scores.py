"""A scores file as the start of another command: the settings an edit of it or a resumed solve inherits, and the
iterate a resumed solve continues from (refused when it answers another question)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch

from ..errors import SettingsError
from .run import RunContext

Log = Callable[[str], None]


# the settings that change what influence scores and edits answer; others (the solver, its tolerance and budget) only
# change how accurately, so a scores file or edit of other answer keys is not replaced without --force
ANSWER_KEYS = ("method", "hessian", "damping", "damping_mode", "fisher_samples", "support_method", "inner_hessian")


def scores_settings(scores: str | os.PathLike | Any, base: Any) -> Any:
    """``base`` (InfluenceSettings) with the Hessian and solver settings a scores file was computed with, so that an edit
    of its top items inverts the same Hessian (its damping without the proximal γ, which the edit adds again). Not its
    time budget ``solve.max_minutes``: a limit chosen for the scores' solve would silently cut the edit's short, so only
    a flag or a config file sets the edit's. ``scores``: the file, or the InfluenceResult already read from it."""
    from ..influence.results import InfluenceResult

    info = scores if isinstance(scores, InfluenceResult) else InfluenceResult.load(scores)
    recorded = dict(info.settings.get("influence", {}))
    given = info.diagnostics.get("proximal", {}).get("damping_given")
    if given is not None:
        recorded["damping"] = given
    keep = ("hessian", "solver", "damping", "damping_mode", "curvature_file", "fisher_samples", "products", "inner_damping", "inner_hessian")
    changes = {k: recorded[k] for k in keep if k in recorded}
    if isinstance(recorded.get("solve"), dict):
        solve = {f.name: recorded["solve"][f.name] for f in dataclasses.fields(base.solve) if f.name in recorded["solve"] and f.name != "max_minutes"}
        changes["solve"] = dataclasses.replace(base.solve, **solve)
    return dataclasses.replace(base, **changes)


def resume_settings(resume: str | os.PathLike | None) -> Any:
    """What ``influence --resume FILE`` continues under before --config and flags: the settings FILE was solved with
    (:func:`scores_settings`, the default iteration cap) and its method; None without a file."""
    from ..influence.results import InfluenceResult, InfluenceSettings

    if resume is None:
        return None
    info = InfluenceResult.load(resume)
    base, method = scores_settings(info, InfluenceSettings()), info.method
    # not its iteration cap either: the cap (or budget) that stopped it is what the resumed solve is to go past
    base = dataclasses.replace(base, solve=dataclasses.replace(base.solve, max_iter=InfluenceSettings().solve.max_iter))
    return dataclasses.replace(base, method=method) if method in ("task-if", "direct-if") else base


def resume_iterate(ctx: RunContext, resume: str | os.PathLike, settings: Any, level: str, log: Log) -> torch.Tensor:
    """The iterate s of an earlier task-level result of this pool and method (refused otherwise)."""
    if level != "task":
        raise SettingsError(f"--resume continues the solve of task-level scores; this run asks for --level {level}, whose scores have no "
                            "solve to continue: drop --resume (or score --level task)")
    prior = ctx.load_scores(resume)  # refuses a file of another pool
    if prior.level != "task" or "s" not in prior.extra:
        raise SettingsError(f"--resume {resume}: only a task-level task-if/direct-if result holds a solve to continue (it has level "
                            f"{prior.level!r}, method {prior.method!r}); drop --resume")
    solver, recorded = prior.diagnostics.get("solver", {}), prior.settings.get("influence", {})
    differ = [f"{k} {recorded.get(k)!r} (asked: {getattr(settings, k)!r})" for k in ANSWER_KEYS if recorded.get(k) != getattr(settings, k)]
    if differ or solver.get("name") not in ("cg", "pcg"):
        raise SettingsError(f"--resume {resume}: " + (f"its solve answers another question: {', '.join(differ)}; a solve continues only "
                            "under its own settings (drop those flags, or drop --resume)" if differ else
                            f"its {solver.get('name')} solve is not an iterative one to continue; drop --resume"))
    log(f"continuing the solve of {resume} (its residual {solver.get('residual', float('nan')):.2g} after {solver.get('iterations', '?')} iterations)")
    return prior.extra["s"].double()
