"""Fit the curvature once, reuse it everywhere: a saved randomized Nyström sketch of a total Hessian,
or an EK-FAC of the θ-space Fisher at the adapted parameters (``method='ekfac'``, meta/ekfac.py).

``fit_curvature`` sketches H (Gauss–Newton by default: positive semi-definite) from one block of
products, measures the sketch on held-out probe vectors (relative error of H·x, true residual of the
fast-tier solve at a reference damping) and its cost as a multiple of the floor (one pass of per-task
total gradients; inside a reuse block a fisher fit makes those gradients in its own pass and keeps them for
the block's scores and edits, influence/gradients.py, so no floor is timed), and saves it (safetensors + JSON) with the fingerprint of λ, pool, weights,
Hessian kind and problem it was fitted to. Damping is applied at solve time, so one fit serves a
damping sweep. Solvers ``pcg`` (CG preconditioned by the sketch: exact to the requested residual)
and ``curvature`` (the sketch's inverse: fast, its residual recorded) use it; a sketch of another
λ, pool or kind is refused (for ``pcg`` a full-pool sketch may precondition a reduced-pool H).
EK-FAC drops dθ/dλ: its probe error against the total H is recorded and is large by design, so it is
a preconditioner for ``pcg`` first and a fast tier only where that error says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, SettingsError
from ..io import load_result, save_result
from ..linalg import EKFAC, FactorCurvature, GaussNewtonFactor, LowRank, adaptive_nystrom_sketch, apply_block, nystrom_sketch, sketch_solve
from ..meta.curvature import TotalHessian, fisher_factor, fisher_factor_and_gradients, gauss_newton_factor
from ..meta.ekfac import fit_ekfac
from ..meta.objective import MetaProblem
from ..tasks.tensors import TaskTensors
from .gradients import keep_task_gradients, keeping_task_gradients
from .hessian_of import build_hessian, curvature_fingerprint, effective_damping
from .results import CURVATURE_METHODS

KIND = "metainfluence.curvature"


@dataclass
class CurvatureArtifact:
    """A fitted curvature: ``sketch`` is a Nyström :class:`LowRank` of the total Hessian (method
    ``nystrom``) or an :class:`EKFAC` of the θ-space Fisher at the adapted parameters (method ``ekfac``)."""

    sketch: LowRank | EKFAC
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return getattr(self.sketch, "method_name", "nystrom")

    @property
    def fingerprint(self) -> str | None:
        return self.info.get("fingerprint")

    @property
    def pool_fingerprint(self) -> str | None:
        return self.info.get("full_pool_fingerprint")

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write the file, and let this process's later loads of it return this object (with the factorisations
        its probe check cached: a 5,000-row fisher factor's Gram matrix is not formed a second time)."""
        if self.method in _FACTORED:  # EK-FAC or fisher factor: their own tensors and JSON
            meta = {"kind": KIND, "method": self.method, "dim": self.sketch.dim, self.method: self.sketch.meta(), "info": self.info}
            paths = save_result(stem, self.sketch.tensors(), meta)
        else:
            meta = {"kind": KIND, "dim": self.sketch.dim, "rank": self.sketch.rank, "info": self.info}
            paths = save_result(stem, {"eigenvalues": self.sketch.eigenvalues, "eigenvectors": self.sketch.eigenvectors}, meta)
        _remember(Path(stem).expanduser(), self)
        return paths

    @classmethod
    def load(cls, stem: str | Path) -> "CurvatureArtifact":
        tensors, meta = load_result(stem, what="curvature file")
        if meta.get("kind") != KIND:
            raise CheckpointError(f"{stem} is not a curvature file; fit one with `metainfluence curvature`")
        info = meta.get("info", {})
        if meta.get("method") in _FACTORED:
            return cls(_FACTORED[meta["method"]].from_tensors(tensors, meta.get(meta["method"], {}), info), info)
        if set(tensors) != {"eigenvalues", "eigenvectors"}:
            raise CheckpointError(f"{stem} is not a curvature file; fit one with `metainfluence curvature`")
        vals, vecs = tensors["eigenvalues"], tensors["eigenvectors"]
        if vals.ndim != 1 or vecs.ndim != 2 or vecs.shape != (meta.get("dim"), vals.shape[0]):
            raise CheckpointError(f"{stem}: eigenvalues and eigenvectors disagree with its JSON; fit it again")
        return cls(LowRank(vals, vecs, info.get("sketch", {})), info)

    def check(self, op: TotalHessian, preconditioner: bool = False) -> bool:
        """CheckpointError unless fitted to ``op``; True when fitted to ``op`` itself. A ``preconditioner``
        (pcg, exact whatever it is preconditioned by) may also be fitted to ``op``'s full pool, or to another
        Hessian kind of the same λ and pool (a fisher file preconditions the exact Hessian's CG)."""
        if curvature_fingerprint(op) == self.fingerprint:
            return True
        fitted = {k: self.info.get(k) for k in ("hessian", "fisher_samples", "seed")}
        # each fingerprint hashes λ and the whole pool: the second only when the first does not match
        if preconditioner and any(curvature_fingerprint(op, ignore_weights=True, as_kind=kind) == self.pool_fingerprint for kind in (None, fitted)):
            return False
        if fitted["hessian"] != op.kind:  # the common slip: a file fitted against one kind, scores asked of another
            # only positive semi-definite kinds can be fitted: an exact (or gamma) Hessian is served by --solver pcg
            refit = (f"or fit it again with `metainfluence curvature ... --hessian {op.kind}`" if op.kind in ("gauss-newton", "fisher") else
                     f"or keep --hessian {op.kind} with --solver pcg (exact CG, this file as its preconditioner) — a {op.kind} Hessian "
                     "cannot be fitted, not being positive semi-definite")
            raise CheckpointError(f"the curvature file was fitted against the {fitted['hessian']} total Hessian, not {op.kind}: use "
                                  f"--hessian {fitted['hessian']}, {refit}")
        if op.kind == "fisher" and (fitted["fisher_samples"], fitted["seed"]) != (op.fisher_samples, op.seed):
            # the same λ and pool with other draws is the common slip (the command's default samples differ from a recipe's)
            as_fitted = {"hessian": "fisher", "fisher_samples": fitted["fisher_samples"], "seed": fitted["seed"]}
            if curvature_fingerprint(op, as_kind=as_fitted) == self.fingerprint:
                raise CheckpointError(f"the curvature file holds {fitted['fisher_samples']} fisher draw(s) per task with seed {fitted['seed']}, "
                                      f"not {op.fisher_samples} with seed {op.seed}: pass --fisher-samples {fitted['fisher_samples']} "
                                      f"--seed {fitted['seed']}, or fit it again with these")
        raise CheckpointError("the curvature file was fitted to another λ or task pool; fit it again with "
                              "`metainfluence curvature` for this checkpoint (and --hessian)")

    def attach(self, op: TotalHessian, preconditioner: bool = False) -> None:
        """:meth:`check` ``op``, then record this file's fit on it (its diagnostics report it); a fisher file of
        this very fisher operator (same λ, pool, weights, draws, seed) lends it its rows, so its products need
        not draw them again."""
        itself = self.check(op, preconditioner)
        op._curvature_info = self.info
        if itself and self.method == "fisher" and op.kind == "fisher":
            op.adopt_factor(self.sketch.factor)


_FACTORED = {"ekfac": EKFAC, "fisher": FactorCurvature, "gn-factor": GaussNewtonFactor}

# the last curvature files loaded in this process, keyed by path, size and modification time: a factor's
# Cholesky (cached per damping on the object) then serves every score and edit of a run instead of being
# rebuilt at each load (on Conv4-16 with 12,500 Gauss–Newton rows that rebuild took ≈ 2 minutes)
_LOADED: dict[tuple, "CurvatureArtifact"] = {}
_LOADED_MAX = 2


def _file_key(stem: Path) -> tuple | None:
    tensors = stem.with_name(stem.name + ".safetensors")
    try:
        st = tensors.stat()
    except OSError:
        return None
    return str(tensors.resolve()), st.st_size, st.st_mtime_ns


def _remember(stem: Path, art: "CurvatureArtifact") -> "CurvatureArtifact":
    key = _file_key(stem)
    if key is not None:
        _LOADED.pop(key, None)
        while len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = art
    return art


def load_curvature(stem: str | Path) -> "CurvatureArtifact":
    """:meth:`CurvatureArtifact.load`, remembered for this process while the file is unchanged."""
    stem = Path(stem).expanduser()
    key = _file_key(stem)
    if key is None:
        return CurvatureArtifact.load(stem)  # load() says what is missing
    return _LOADED[key] if key in _LOADED else _remember(stem, CurvatureArtifact.load(stem))


def fit_curvature(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, settings: Any, rank: int | str = 50,
                  oversample: int = 10, probes: int = 4, block: int = 16, method: str = "nystrom",
                  max_tasks: int | None = None, max_rank: int = 400) -> CurvatureArtifact:
    """Fit a curvature of the total Hessian of kind ``settings.hessian`` (fisher samples and seed from
    ``settings``) and measure it against that operator; ``settings.damping`` is the reference damping
    of the probe solves.

    ``nystrom``: a rank-``rank`` sketch of H itself (needs a PSD kind); ``rank="auto"`` doubles the
    sketch until its smallest kept eigenvalue is within 10× of δ + μ (at most ``max_rank``); with
    ``max_tasks`` the products are those of a seeded task subsample, (1/m) Σ_{i∈S} H_i + μI, an
    unbiased estimate of H (the probe report is measured against the full pool). ``ekfac``: EK-FAC of the
    θ-space Fisher at each task's adapted θ_i(λ) (tasks subsampled to ``max_tasks``); it drops
    dθ/dλ, so its probe error against H is large by design — a preconditioner first."""
    if method not in CURVATURE_METHODS:
        raise SettingsError(f"unknown curvature method {method!r}; use one of {', '.join(CURVATURE_METHODS)}")
    if method == "nystrom" and settings.hessian == "exact":
        raise SettingsError("the Nyström sketch needs a positive semi-definite Hessian; use --hessian gauss-newton or fisher "
                            "(or --method ekfac, a positive definite preconditioner of any kind)")
    lam = lam.detach()
    # inside a reuse block the fisher rows and the per-task gradients come from one pass, kept for the block's scores
    # and edits; that pass makes the floor's gradients, so the floor is not timed apart
    fused = method == "fisher" and keeping_task_gradients(problem, lam, tasks)
    floor = None
    if not fused:
        t0 = time.perf_counter()
        # the floor: one pass of per-task total gradients, each chunk dropped once made (all n × p at once need not fit)
        for _ in problem._mapped_chunks(problem.task_total_gradient, lam, tasks, None, None, (), desc="task gradients (timing floor)"):
            pass
        floor = time.perf_counter() - t0
    op = build_hessian(problem, lam, tasks, settings)
    t1 = time.perf_counter()
    if method == "ekfac":
        approx_op = fit_ekfac(problem, lam, tasks, adapt=True, fisher_samples=settings.fisher_samples, seed=settings.seed,
                              max_tasks=max_tasks)
        fit_s = time.perf_counter() - t1
        fit = {"method": "ekfac", "max_tasks": max_tasks, "n_tasks_fitted": approx_op.info["n_tasks_fitted"],
               "n_kronecker_blocks": len(approx_op.blocks), "n_diagonal": int(approx_op.diag_index.numel()),
               "eigenvalue_min": approx_op.min_eigenvalue()}
    elif method == "fisher":
        # the total-gradient factor of sampled-label query losses: E[GᵀG] is the total Gauss–Newton
        # matrix, so unlike EK-FAC it keeps dθ/dλ; its inverse is exact by Woodbury
        own_draws = None  # the share of tasks whose draws equal their labels: their rows are their gradients
        if fused:
            rows, gradients, own_draws = fisher_factor_and_gradients(problem, lam, tasks, settings.fisher_samples, settings.seed)
        else:
            rows = fisher_factor(problem, lam, tasks, settings.fisher_samples, settings.seed)
        approx_op = FactorCurvature(rows, problem.weight_decay)
        fit_s = time.perf_counter() - t1
        if fused:
            keep_task_gradients(problem, lam, tasks, gradients, fit_s)
        # of a fisher operator these are its own rows (the same draws): the probes then confirm the products, not the draws
        same_rows = op.kind == "fisher"
        if same_rows:
            op.adopt_factor(rows)
        fit = {"method": "fisher", "fisher_samples": settings.fisher_samples, "factor_rows": rows.shape[0],
               "eigenvalue_min": approx_op.min_eigenvalue(), "operator_rows": same_rows, "task_gradients_kept": fused,
               "tasks_drawing_own_labels": own_draws}
    elif method == "gn-factor":
        # the Gauss–Newton matrix itself, one row per query example and class: exact, so its inverse is
        # the exact tier's answer for hessian gauss-newton (and a one-iteration preconditioner)
        if settings.hessian not in ("gauss-newton", "fisher"):
            raise SettingsError(f"the gn-factor curvature is the Gauss–Newton matrix; with --hessian {settings.hessian} use it as a "
                                "preconditioner only through --hessian gauss-newton, or fit --method nystrom / ekfac")
        rows = gauss_newton_factor(problem, lam, tasks)
        approx_op = GaussNewtonFactor(rows, problem.weight_decay)
        fit_s = time.perf_counter() - t1
        fit = {"method": "gn-factor", "factor_rows": rows.shape[0], "eigenvalue_min": approx_op.min_eigenvalue()}
    else:
        sketch_op = op
        if max_tasks is not None and max_tasks < len(tasks):
            pick = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(settings.seed))[:max_tasks].sort().values
            sketch_op = build_hessian(problem, lam, tasks.subset(pick.tolist()), settings)
        if rank == "auto":
            floor_eig = effective_damping(op, settings) + problem.weight_decay
            approx_op = adaptive_nystrom_sketch(sketch_op, floor_eig, start=min(20, op.dim), max_rank=min(max_rank, op.dim),
                                                oversample=oversample, seed=settings.seed, block=block)
        elif isinstance(rank, int) and not isinstance(rank, bool):
            approx_op = nystrom_sketch(sketch_op, min(rank, op.dim), oversample, settings.seed, block)
        else:
            raise SettingsError(f"rank must be a positive integer or 'auto', got {rank!r}")
        fit_s = time.perf_counter() - t1
        vals = approx_op.eigenvalues
        fit = {"method": "nystrom", "rank": approx_op.rank, "rank_setting": rank, "oversample": oversample, "sketch": approx_op.info,
               "max_tasks": max_tasks, "n_tasks_fitted": min(len(tasks), max_tasks or len(tasks)),
               "eigenvalue_max": float(vals[0]), "eigenvalue_min_kept": float(vals[-1])}
    t2 = time.perf_counter()
    g = torch.Generator().manual_seed(settings.seed + 1)
    X = torch.randn(op.dim, probes, generator=g, dtype=lam.dtype).to(lam.device)
    X = X / X.norm(dim=0)
    HX = apply_block(op, X)
    approx = approx_op.matmat(X) if method in _FACTORED else _lowrank_product(approx_op, X)
    op_err = ((approx - HX).norm(dim=0) / HX.norm(dim=0)).tolist()
    fast = sketch_solve(op, X.T.contiguous(), settings.damping, sketch=approx_op)
    info = {
        "fingerprint": curvature_fingerprint(op), "full_pool_fingerprint": curvature_fingerprint(op, ignore_weights=True),
        "hessian": op.kind, "seed": settings.seed, "fisher_samples": settings.fisher_samples, **fit,
        "probe_operator_rel_error": op_err, "probe_solve_residual": fast.info["residuals"], "probe_damping": settings.damping,
        "floor_seconds": floor, "fit_seconds": fit_s, "fit_over_floor": None if floor is None else fit_s / max(floor, 1e-12), "probe_seconds": time.perf_counter() - t2,
        "n_tasks": len(tasks), "n_params": op.dim,
    }
    if method in _FACTORED:
        approx_op.info.update(info)
    return CurvatureArtifact(approx_op, info)


def _lowrank_product(sketch: LowRank, X: torch.Tensor) -> torch.Tensor:
    U, vals = sketch.eigenvectors, sketch.eigenvalues
    return U @ (vals[:, None] * (U.T @ X))
