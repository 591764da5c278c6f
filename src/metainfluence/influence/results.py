"""Influence settings and the score files every influence computation writes."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, SettingsError, caller_level
from ..io import load_result, save_result
from ..linalg import SOLVER_NAMES, SolverSettings
from ..meta.curvature import HESSIANS

SIGN_CONVENTION = (
    "score = predicted change of the measurement f (mean query loss of the validation pool after "
    "adaptation, in loss units) when the item is removed (docs/method.md §5): score > 0 means removing the item "
    "would raise the validation loss, i.e. the item HELPS; score < 0 means removing it would lower the "
    "loss, i.e. the item HARMS. Harmful-first ranking sorts scores ascending."
)

# the two baselines that predict no change: their files say what their scores are instead
BASELINE_MEANINGS = {
    "loss": ("score = minus the item's query loss after adaptation: a suspicion score, not a predicted change (the highest-loss "
             "items score lowest and rank first). Harmful-first ranking sorts scores ascending.", "minus the query loss (loss units)"),
    "random": ("score = a random number (the chance baseline): only its order means anything, and nothing about the item. "
               "Harmful-first ranking sorts scores ascending.", "none (random)"),
}

METHODS = ("task-if", "direct-if", "tracin", "trak", "ekfac-if", "loss", "random")
SUPPORT_METHODS = ("unrolled", "two-stage")
CURVATURE_METHODS = ("nystrom", "ekfac", "fisher", "gn-factor")  # kinds of a fitted curvature file (influence/curvature.py)
INNER_HESSIANS = ("exact", "ekfac")


def _finite_nonnegative(value: Any) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool) and math.isfinite(v) and v >= 0


@dataclass
class InfluenceSettings:
    """What to score and how: the method, the Hessian, the iHVP solver by name and damping, the
    solver's own settings (composed: :class:`~metainfluence.linalg.SolverSettings`, a ``[influence.solve]``
    section in config files, flags without a prefix), and the instance-level options."""

    method: str = field(default="task-if", metadata={"help": "task-if | direct-if | tracin | trak | ekfac-if | loss | random (docs/method.md §5, §8)"})
    hessian: str = field(default="exact", metadata={"help": "total-Hessian products: exact | gauss-newton | gamma | fisher (direct-if always uses direct)"})
    solver: str = field(default="cg", metadata={"help": "iHVP solver: explicit | cg | neumann | lissa | lowrank | woodbury (fisher only) | pcg (CG preconditioned by --curvature-file) | curvature (the fitted sketch's inverse, fast tier)"})
    damping: float = field(default=1e-3, metadata={"help": "damping δ added to every Hessian: solves use H + δI"})
    damping_mode: str = field(default="absolute", metadata={"help": "absolute: δ as given | relative: δ × the Hessian's mean eigenvalue tr(H)/p (Hutchinson), the same meaning for every kind"})
    curvature_file: str = field(default="", metadata={"help": "a fitted curvature sketch (`metainfluence curvature`) for --solver pcg (exact, preconditioned) or curvature (fast tier)"})
    curvature_fit: str = field(default="nystrom", metadata={"help": "experiments: the curvature kind fitted at λ* when solver pcg/curvature (or method task-if-fast) has no file: nystrom | fisher | gn-factor | ekfac (`metainfluence curvature --method`)"})
    solve: SolverSettings = field(default_factory=SolverSettings, metadata={
        "help": "settings of the iHVP solvers (tolerance, iteration limits, Neumann/LiSSA/Lanczos options, seed of random, fisher and lissa)",
        "flag_prefix": ""})
    lowrank_file: str = field(default="", metadata={"help": "saved Lanczos eigenpairs to reuse (lowrank solver); computed and saved there if missing"})
    fisher_samples: int = field(default=4, metadata={"help": "label samples per task for the fisher Hessian"})
    support_method: str = field(default="unrolled", metadata={"help": "support instance-IF: unrolled (exact mixed derivative) | two-stage (paper)"})
    inner_damping: float = field(default=1e-2, metadata={"help": "damping of the inner Hessian in two-stage instance-IF (implicit inner solver; the unrolled K-step response needs none)"})
    inner_cg_steps: int = field(default=50, metadata={"help": "CG steps for the inner Hessian solve in two-stage instance-IF (implicit inner solver)"})
    inner_hessian: str = field(default="exact", metadata={
        "help": "inner Hessian H_in of two-stage instance-IF: exact (products) | ekfac (the paper's: EK-FAC of each task's support "
                "Gauss-Newton matrix + proximal γ at θ_k, applied in its eigenbasis; Linear/Conv2d layers, no batch norm)",
        "choices": INNER_HESSIANS})
    removal: str = field(default="first-order", metadata={"help": "task-if removal prediction: first-order (the derivative, (H+δI)⁻¹g_k/n) | newton "
                                                                  "(one Newton step on the pool without the task, (H − H_k/n + δI)⁻¹g_k/n; survives overfitting better, one solve per task unless fisher)"})
    self_influence: bool = field(default=False, metadata={"help": "also compute self-influence g_kᵀ(H+δI)^{-1}g_k/n (one iHVP per task)"})
    stationarity_warn: float = field(default=0.05, metadata={"help": "warn when ‖∇F‖ / mean‖g_i‖ exceeds this (docs/method.md §2)"})
    products: str = field(default="working", metadata={"help": "precision of Hessian products: working (λ's dtype) | float32 (≈2.5× cheaper on CPU; "
                                                                   "sums over tasks and the solve stay in λ's dtype and the final residual is re-measured "
                                                                   "with working-precision products)"})
    trak_dim: int = field(default=512, metadata={"help": "trak: rows k of the seeded Gaussian projection of the task gradients (min(k, p) is used; docs/method.md §8)"})
    rhs_chunk: int = field(default=32, metadata={"help": "pairwise: test-side right-hand sides solved per block, which bounds the solver's memory (docs/method.md §6.2)"})

    @property
    def seed(self) -> int:
        """The one seed of an influence computation (random scores, fisher labels, solver randomness)."""
        return self.solve.seed

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SettingsError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.hessian not in HESSIANS:
            raise SettingsError(f"unknown hessian {self.hessian!r}; use one of {', '.join(HESSIANS)}")
        if self.method == "task-if" and self.hessian == "direct":
            raise SettingsError("hessian 'direct' ignores dθ/dλ: it is the direct-IF baseline's Hessian — use method=direct-if, "
                                "or a total Hessian (exact, gauss-newton, gamma, fisher) for task-if")
        if self.removal not in ("first-order", "newton"):
            raise SettingsError(f"unknown removal prediction {self.removal!r}; use first-order or newton")
        if self.removal == "newton" and self.method != "task-if":
            raise SettingsError("the newton removal prediction is a task-if option; use method=task-if")
        if self.solver not in SOLVER_NAMES:
            raise SettingsError(f"unknown iHVP solver {self.solver!r}; use one of {', '.join(SOLVER_NAMES)}")
        if self.solver == "woodbury" and self.hessian != "fisher":
            raise SettingsError(f"the woodbury solver inverts the fisher Hessian only, not {self.hessian!r}; use --hessian fisher, or another --solver")
        if self.damping_mode not in ("absolute", "relative"):
            raise SettingsError(f"unknown damping_mode {self.damping_mode!r}; use absolute or relative")
        if self.curvature_fit not in CURVATURE_METHODS:
            raise SettingsError(f"unknown curvature_fit {self.curvature_fit!r}; use one of {', '.join(CURVATURE_METHODS)}")
        if self.solver in ("pcg", "curvature") and not self.curvature_file:
            raise SettingsError(f"solver {self.solver} needs a curvature file: fit one with `metainfluence curvature --checkpoint RUN/refined --out FILE` and pass --curvature-file FILE")
        check_damping(self.damping)
        if not isinstance(self.solve, SolverSettings):
            raise SettingsError(f"solve must be a SolverSettings, got {type(self.solve).__name__}; pass solve=SolverSettings(...)")
        if self.support_method not in SUPPORT_METHODS:
            raise SettingsError(f"unknown support method {self.support_method!r}; use unrolled or two-stage")
        if self.inner_hessian not in INNER_HESSIANS:
            raise SettingsError(f"unknown inner_hessian {self.inner_hessian!r}; use exact or ekfac")
        if self.inner_hessian == "ekfac" and self.support_method != "two-stage":
            raise SettingsError("inner_hessian ekfac approximates the inner Hessian of two-stage instance-IF; "
                                "use support_method=two-stage (--support-method two-stage) or inner_hessian=exact")
        if not _finite_nonnegative(self.inner_damping):
            raise SettingsError(f"inner_damping must be a finite number ≥ 0, got {self.inner_damping}")
        if self.products not in ("working", "float32"):
            raise SettingsError(f"unknown product precision {self.products!r}; use working or float32")
        if self.products == "float32" and self.hessian == "fisher" and self.method == "task-if":
            raise SettingsError("the fisher Hessian is an exact factor, not products: use --products working with --hessian fisher")
        for name in ("trak_dim", "rhs_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be an integer ≥ 1, got {value!r}")


@dataclass
class InfluenceResult:
    """Scores of a set of items (tasks, or examples of tasks) with everything needed to read them.

    ``scores`` is (n,) for tasks, (n, m) for the m support or query examples of each task.
    ``task_ids`` are the pool's stable ids of the rows."""

    level: str
    method: str
    scores: torch.Tensor
    task_ids: torch.Tensor
    measurement: float
    settings: dict[str, Any]
    diagnostics: dict[str, Any]
    self_influence: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def ranking(self, harmful_first: bool = True) -> torch.Tensor:
        """Item indices (flat over rows × examples for instance levels), most harmful first by default."""
        flat = self.scores.reshape(-1)
        return torch.argsort(flat, descending=not harmful_first, stable=True)

    def items(self, flat_index: torch.Tensor) -> list[tuple[int, ...]]:
        """Stable ids of flat item indices: (task_id,) or (task_id, example)."""
        out = []
        for i in flat_index.tolist():
            if self.scores.dim() == 1:
                out.append((int(self.task_ids[i]),))
            else:
                m = self.scores.shape[1]
                out.append((int(self.task_ids[i // m]), i % m))
        return out

    def save(self, stem: str | Path, pool_fingerprint: str | None = None) -> tuple[Path, Path]:
        tensors = {"scores": self.scores, "task_ids": self.task_ids}
        if self.self_influence is not None:
            tensors["self_influence"] = self.self_influence
        tensors.update({f"extra.{k}": v for k, v in self.extra.items()})
        info = {
            "kind": "metainfluence.influence",
            "level": self.level,
            "method": self.method,
            "sign_convention": BASELINE_MEANINGS.get(self.method, (SIGN_CONVENTION,))[0],
            "units": BASELINE_MEANINGS.get(self.method, (None, "change of the measurement (loss units) per removed item"))[1],
            "measurement": self.measurement,
            "pool_fingerprint": pool_fingerprint,
            "settings": self.settings,
            "diagnostics": self.diagnostics,
        }
        return save_result(stem, tensors, info)

    @classmethod
    def load(cls, stem: str | Path, pool_fingerprint: str | None = None) -> "InfluenceResult":
        tensors, info = read_scores_file(stem, "metainfluence.influence", "scores file", ("level", "method", "measurement", "settings", "diagnostics",
                                                                                         "sign_convention"),
                                         ("scores", "task_ids"), pool_fingerprint)
        if tensors["task_ids"].dim() != 1 or tensors["scores"].shape[:1] != tensors["task_ids"].shape:
            raise CheckpointError(f"scores file {stem}: scores {tuple(tensors['scores'].shape)} and task ids {tuple(tensors['task_ids'].shape)} disagree; recompute it")
        if (info["level"] == "task") != (tensors["scores"].dim() == 1):  # one score per task, or a row of examples per task
            raise CheckpointError(f"scores file {stem}: its level {info['level']!r} disagrees with its scores of shape {tuple(tensors['scores'].shape)} "
                                  "(its JSON was edited or damaged); recompute it")
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(
            level=info["level"],
            method=info["method"],
            scores=tensors["scores"],
            task_ids=tensors["task_ids"],
            measurement=info["measurement"],
            settings=info["settings"],
            diagnostics=info["diagnostics"],
            self_influence=tensors.get("self_influence"),
            extra=extra,
        )


def read_scores_file(stem: str | Path, kind: str, what: str, info_keys: tuple[str, ...], tensor_keys: tuple[str, ...],
                     pool_fingerprint: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A scores file's tensors and JSON, refused when it is of another kind, damaged (a key missing) or
    computed on another task pool than ``pool_fingerprint``."""
    tensors, info = load_result(stem, what=what)
    if not isinstance(info, dict) or info.get("kind") != kind:
        if isinstance(info, dict) and info.get("kind") in ("metainfluence.influence", "metainfluence.pairwise"):  # the other scores kind
            remedy = ("at --level task, support or query (a pairwise matrix scores task pairs, not items to remove)" if kind == "metainfluence.influence"
                      else "--level pairwise")
            raise CheckpointError(f"{stem} holds {info['kind'].split('.', 1)[1]} scores, not a metainfluence {what}; pass the output of "
                                  f"`metainfluence influence` {remedy}")
        raise CheckpointError(f"{stem} is not a metainfluence {what}; pass the output of `metainfluence influence`")
    missing = [k for k in info_keys if k not in info] + [k for k in tensor_keys if k not in tensors]
    if missing:
        raise CheckpointError(f"{what} {stem} lacks {', '.join(missing)}; it is damaged or not a {what} — recompute it")
    if pool_fingerprint is not None and info.get("pool_fingerprint") not in (None, pool_fingerprint):
        raise CheckpointError(f"{what} {stem} was computed on another task pool; recompute the scores for this checkpoint's pool")
    return tensors, info


class InfluenceWarning(UserWarning):
    """A number an influence result cannot vouch for (unconverged solve, non-stationary λ, unsolved
    inner problem); the same text is in the result's ``diagnostics["warnings"]``."""


def shortfall(diag: dict[str, Any], message: str) -> None:
    """Say a shortfall aloud: a warning now and a line in the result's diagnostics."""
    diag.setdefault("warnings", []).append(message)
    warnings.warn(message, InfluenceWarning, stacklevel=caller_level())


# a solve whose true relative residual is above this gives scores off by about as much
RESIDUAL_WARN = 1e-2


def check_damping(damping: float) -> None:
    """Refuse a damping δ that is not a finite number ≥ 0."""
    if not _finite_nonnegative(damping):
        raise SettingsError(f"damping must be a finite number ≥ 0, got {damping}; use a small positive value such as 1e-3")


def solver_record(res: Any, hvps: int | None = None) -> dict[str, Any]:
    """What a result records of an iHVP solve (every key except the per-rhs residual list)."""
    out = {"name": res.solver, "residual": res.residual, "iterations": res.iterations}
    if hvps is not None:
        out["hvps"] = hvps
    out.update({k: v for k, v in res.info.items() if k not in ("residuals", "recursive_residuals", "iterations_per_rhs", "relative_changes", "depth_per_rhs")})
    return out


def check_solve(diag: dict[str, Any], res: Any, settings: "InfluenceSettings", what: str = "iHVP", answer: str = "the scores are",
                resumable: bool = True) -> None:
    """A shortfall when the solve stopped before its tolerance or left a large true residual, with the remedy of its
    solver. ``answer``: what the solve gives, as the subject of "… approximate"; ``resumable``: whether ``--resume`` can
    continue it (scores) or not (an edit, which is then also pointed at the exact fisher inverse)."""
    converged = bool(res.info.get("converged", True))
    if converged and res.residual <= RESIDUAL_WARN:
        return
    solve, damping = settings.solve, f"--damping (now {settings.damping:g})"
    resume = ", or continue from this iterate with --resume SCORES" if resumable else ""
    remedy = {
        "cg": f"raise --max-iter (now {solve.max_iter}) or {damping}{resume}",
        "pcg": f"raise --max-iter (now {solve.max_iter}) or {damping}{resume}",
        "neumann": f"raise --neumann-depth (now {solve.neumann_depth}) or {damping}, or use --solver cg",
        "lissa": f"raise --neumann-depth (now {solve.neumann_depth}), --lissa-batch or --lissa-repeats, or use --solver cg",
        "lowrank": f"raise --lowrank-rank (now {solve.lowrank_rank}) or use --solver cg (the spectrum is not low-rank enough)",
        "curvature": "use --solver pcg with the same --curvature-file (exact, preconditioned), or fit a better curvature (a larger --rank of a "
                     "Nyström sketch; for a fisher file, the --hessian it was measured against)",
        "woodbury": f"raise {damping}: the inverse is exact, only its conditioning limits it",
    }.get(res.solver, "use --solver cg with a tighter --tol")
    if res.info.get("stopped_by") == "time":
        remedy = (f"its --max-minutes budget ({solve.max_minutes:g}) ran out: continue from this iterate with "
                  "`metainfluence influence ... --resume SCORES` (SCORES: this result's file), or raise --max-minutes" if resumable else
                  f"its --max-minutes budget ({solve.max_minutes:g}) ran out: raise --max-minutes or set it to 0 (no limit)")
    if not resumable and (settings.hessian, res.solver) != ("fisher", "woodbury"):
        remedy += ", or use --hessian fisher --solver woodbury (an exact inverse, no iterations)"
    state = "stopped before its tolerance" if not converged else "left a large residual"
    # near or above 1 the answer is hardly closer to (H + δI)⁻¹b than 0 is: say so, not "approximate"
    worth = (f"so {answer} not meaningful (the residual is above 1)" if res.residual > 1 else
             f"so {answer} hardly meaningful (the residual is {res.residual:.2g} of the right-hand side)" if res.residual > 0.5 else
             f"so {answer} approximate")
    shortfall(diag, f"the {what} solve ({res.solver}) {state}: relative residual {res.residual:.2g} (tol {solve.tol:g}) after "
                    f"{res.iterations} iteration{'s' if res.iterations != 1 else ''}, {worth}; {remedy}")


def settings_dict(settings: Any) -> dict:
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
