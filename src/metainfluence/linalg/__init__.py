"""Linear algebra of the library, independent of meta-learning: operators reached through
products, and solvers of (H + δI) x = b that report their own accuracy.

    operators.py  the operator protocol (matvec, matmat, dim, dtype), dense/function operators
    core.py       SolverSettings, IHVPResult, damped/counted products, the true-residual check
    cg.py         block CG (every rhs at once) and fixed-step CG (inside vmap / autodiff)
    neumann.py    Neumann series and LiSSA, power iteration
    lanczos.py    Lanczos eigenpairs, the low-rank solve
    woodbury.py   GᵀG + cI and its exact Woodbury inverse
    nystrom.py    randomized Nyström sketch: a CG preconditioner (pcg) and an approximate inverse (curvature)
    ekfac.py      eigenvalue-corrected Kronecker-factored operator with an exact blockwise damped inverse
    dense.py      materialise and eigendecompose
    solve.py      SOLVERS and solve_ihvp, the one entry point
"""

from .cg import block_cg, cg_solve, fixed_step_cg
from .core import IHVPResult, SolverSettings
from .dense import explicit_solve
from .ekfac import EKFAC, KroneckerBlock
from .lanczos import LowRank, lanczos_eigenpairs, lowrank_solve
from .neumann import lissa_solve, neumann_solve, power_iteration
from .nystrom import adaptive_nystrom_sketch, nystrom_preconditioner, nystrom_sketch, pcg_solve, sketch_solve
from .operators import FunctionOperator, LinearOperator, MatrixOperator, SubsetOperator, apply_block, materialize
from .solve import SOLVER_NAMES, SOLVERS, STRUCTURED_SOLVERS, solve_ihvp
from .woodbury import FactorCurvature, FactorOperator, GaussNewtonFactor, woodbury_solve

__all__ = [
    "LinearOperator", "SubsetOperator", "MatrixOperator", "FunctionOperator", "FactorOperator", "apply_block", "materialize",
    "SolverSettings", "IHVPResult", "block_cg", "cg_solve", "fixed_step_cg", "neumann_solve", "lissa_solve",
    "power_iteration", "LowRank", "lanczos_eigenpairs", "lowrank_solve", "explicit_solve", "woodbury_solve", "FactorCurvature", "GaussNewtonFactor",
    "SOLVERS", "STRUCTURED_SOLVERS", "SOLVER_NAMES", "solve_ihvp", "nystrom_sketch", "adaptive_nystrom_sketch", "nystrom_preconditioner", "pcg_solve", "sketch_solve",
    "EKFAC", "KroneckerBlock",
]
