"""A fidelity check a user can run on their own model: re-optimise K random group removals from λ*
and compare the actual change of the measurement with the scores' prediction (the sum of the
removed tasks' scores). Groups, LDS-style, so that the effects stand above re-optimisation noise; a
control re-optimisation of the full pool from λ* cancels the optimiser's own drift."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SettingsError
from ..meta.objective import MetaProblem
from ..meta.refine import RefineSettings, RefineWarning, refine
from ..progress import bar
from ..tasks.tensors import TaskTensors
from .groundtruth import validation_loss
from .metrics import spearman


@dataclass
class CheckSettings:
    removals: int = field(default=0, metadata={"help": "random group removals re-optimised from λ* to check the scores (0 = no check)"})
    fraction: float = field(default=0.1, metadata={"help": "fraction of the training tasks removed in each group"})
    max_minutes: float = field(default=10.0, metadata={"help": "time budget of the check; it stops after the removal that crosses it"})
    seed: int = field(default=0, metadata={"help": "seed of the groups (and of the validation pool's halvings)"})
    measurement_splits: int = field(default=0, metadata={"help": "the measurement's reliability: task-IF against both halves of this many random "
                                                                 "halvings of the validation pool (0 = no check; docs/method.md §5.1)"})

    def validate(self, n: int) -> None:
        if self.removals < 0 or self.measurement_splits < 0:
            raise SettingsError(f"--check and --check-measurement must be ≥ 0, got {self.removals} and {self.measurement_splits}")
        if not 0 < self.fraction < 1 or round(self.fraction * n) < 1:
            raise SettingsError(f"--check-fraction {self.fraction} removes no task of {n}; use a fraction in (0, 1) with fraction·n ≥ 1")
        if not self.max_minutes > 0:
            raise SettingsError(f"--check-minutes must be positive, got {self.max_minutes}")


def fidelity_check(problem: MetaProblem, lam: torch.Tensor, train: TaskTensors, val: TaskTensors, scores: torch.Tensor,
                   settings: CheckSettings, refine_settings: RefineSettings, proximal: tuple[float, torch.Tensor] | None = None) -> dict[str, Any]:
    """Spearman and relative error between predicted (Σ scores of the group) and actual Δf of
    ``settings.removals`` group removals, each re-optimised from λ* with ``refine_settings``
    (``proximal``: (γ, λ₀) of a proximally refined λ*: every re-optimisation keeps that term and anchor)."""
    n = len(train)
    settings.validate(n)
    t0 = time.perf_counter()
    size = max(1, round(settings.fraction * n))
    gen = torch.Generator().manual_seed(settings.seed)
    lam = lam.detach().double()
    train, val = train.to(dtype=torch.float64), val.to(dtype=torch.float64)
    predicted, actual, grad_norms, groups, unconverged = [], [], [], [], 0
    f_control = math.nan
    # one bar over the control and the groups: the control's re-optimisation alone can take minutes, and
    # without --progress the bar's status line (once a minute) is what says the check is running
    for k in bar("fidelity check (re-optimising from λ*)", settings.removals + 1, "re-optimisation", iterable=range(settings.removals + 1)):
        w = torch.ones(n, dtype=torch.float64)
        if k:
            group = torch.randperm(n, generator=gen)[:size]
            w[group] = 0
        with warnings.catch_warnings():  # unconverged re-optimisations are summarised once, by the caller
            warnings.simplefilter("ignore", RefineWarning)
            lam_m, rep = refine(problem, lam, train, refine_settings, w=w if k else None, proximal=proximal)
        grad_norms.append(rep.grad_norm_after)
        unconverged += not rep.converged
        if not k:  # the control: the full pool re-optimised, which cancels the optimiser's own drift
            f_control = validation_loss(problem, lam_m, val)
            continue
        groups.append(sorted(group.tolist()))
        actual.append(validation_loss(problem, lam_m, val) - f_control)
        predicted.append(float(scores.double()[group].sum()))
        if time.perf_counter() - t0 > 60 * settings.max_minutes:
            break
    p, a = torch.tensor(predicted, dtype=torch.float64), torch.tensor(actual, dtype=torch.float64)
    rel = float((p - a).norm() / a.norm()) if len(a) and float(a.norm()) > 0 else math.nan
    return {
        "removals_done": len(a), "removals_asked": settings.removals, "group_size": size,
        "spearman": spearman(p, a) if len(a) > 2 else math.nan,
        "relative_error": rel,
        "sign_agreement": float((torch.sign(p) == torch.sign(a)).double().mean()) if len(a) else math.nan,
        "predicted": predicted, "actual": actual, "groups": groups, "max_reoptimised_grad_norm": max(grad_norms, default=0.0),
        "refine_tol": refine_settings.tol, "refine_tol_ratio": refine_settings.tol_ratio,
        "unconverged_reoptimisations": unconverged,
        "seconds": time.perf_counter() - t0,
        "meaning": "predicted = Σ of the removed tasks' scores; actual = f after re-optimising without them from λ* − f after re-optimising the full pool from λ*",
    }
