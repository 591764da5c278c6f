"""One entry point for every solver: ``solve_ihvp(op, b, solver=..., damping=..., settings=...)``.

``SOLVERS`` work on any operator; ``STRUCTURED_SOLVERS`` need an operator of a special form."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from ..errors import SettingsError
from .cg import cg_solve
from .core import IHVPResult, SolverSettings
from .dense import explicit_solve
from .lanczos import LowRank, lowrank_solve
from .nystrom import pcg_solve, sketch_solve
from .neumann import lissa_solve, neumann_solve
from .operators import LinearOperator
from .woodbury import woodbury_solve

SOLVERS: dict[str, Callable[..., IHVPResult]] = {
    "explicit": explicit_solve,
    "cg": cg_solve,
    "neumann": neumann_solve,
    "lissa": lissa_solve,
    "lowrank": lowrank_solve,
}
# solvers for operators of a special form: woodbury needs H = GᵀG + cI (a factor operator)
STRUCTURED_SOLVERS: dict[str, Callable[..., IHVPResult]] = {"woodbury": woodbury_solve}
# solvers that need a fitted curvature (``sketch=``: a Nyström LowRank or an EKFAC): preconditioned CG and its own inverse
SKETCH_SOLVERS: dict[str, Callable[..., IHVPResult]] = {"pcg": pcg_solve, "curvature": sketch_solve}
SOLVER_NAMES = (*SOLVERS, *STRUCTURED_SOLVERS, *SKETCH_SOLVERS)


def solve_ihvp(
    op: LinearOperator,
    b: Tensor,
    *,
    solver: str,
    damping: float,
    settings: SolverSettings = SolverSettings(),
    lowrank: LowRank | None = None,
    sketch: Any = None,
) -> IHVPResult:
    """x ≈ (H + δI)⁻¹ b with the named solver; ``b`` is (p,) or (m, p) and x has its shape.

    ``lowrank`` (precomputed eigenpairs) is only for ``solver='lowrank'``."""
    if solver not in SOLVER_NAMES:
        raise SettingsError(f"unknown iHVP solver {solver!r}; choose one of {', '.join(SOLVER_NAMES)}")
    if solver in SKETCH_SOLVERS:
        if sketch is None:
            raise SettingsError(f"solver {solver!r} needs a curvature sketch: fit one with `metainfluence curvature` and pass --curvature FILE")
        return SKETCH_SOLVERS[solver](op, b, damping, settings, sketch=sketch)
    if solver == "lowrank":
        return lowrank_solve(op, b, damping, settings, lowrank=lowrank)
    if lowrank is not None:
        raise SettingsError(f"precomputed eigenpairs (lowrank=) are only used by solver='lowrank', not {solver!r}; drop them or switch solver")
    return {**SOLVERS, **STRUCTURED_SOLVERS}[solver](op, b, damping, settings)
