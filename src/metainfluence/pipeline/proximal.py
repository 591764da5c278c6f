"""Checkpoints refined on the proximal objective P(λ) = F(λ) + (γ/2)‖λ − λ₀‖² (``refine --refine-proximal γ``,
docs/method.md §2, "The proximal objective"), anchored at the trained λ₀.

Such a checkpoint keeps λ₀ (state ``proximal_anchor``) and γ (its refine report). Its λ* is a stationary
point of P, not of F, and P's Hessian is H + γI: so every score and edit on it adds γ to the damping —
then it is P's exact first-order derivative — and judges stationarity by P's gradient, which the refine
report measured at this very λ."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import CheckpointError, SettingsError
from ..influence.results import check_damping, shortfall

ANCHOR = "proximal_anchor"


def proximal_of(ckpt: Any) -> tuple[float, torch.Tensor] | None:
    """(γ, λ₀) of a checkpoint refined on the proximal objective, else None."""
    gamma = float((ckpt.info.get("refine_report") or {}).get("proximal", 0.0) or 0.0)
    if gamma <= 0:
        return None
    if ANCHOR not in ckpt.state:
        raise CheckpointError(f"checkpoint {ckpt.path} was refined with proximal γ = {gamma:g} but does not hold its anchor λ₀ "
                              f"(state.{ANCHOR}); refine the trained checkpoint again with this version")
    return gamma, ckpt.state[ANCHOR]


def proximal_settings(settings: Any, gamma: float) -> Any:
    """``settings`` with γ added to the damping (P's Hessian is H + γI) and F's stationarity warning off
    (λ* is stationary for P; :func:`record_proximal` checks that instead)."""
    # the user's own damping first: γ added to it must not hide a negative one (the rest is validated where it is used:
    # an experiment's curvature file, say, is fitted after this)
    check_damping(settings.damping)
    if settings.damping_mode != "absolute":
        raise SettingsError(f"this checkpoint was refined on the proximal objective (γ = {gamma:g}), whose Hessian is H + γI: "
                            "use --damping-mode absolute (γ is added to the given damping)")
    # a finite "never": it survives the JSON round trip, so experiments' resumed scores match these settings
    return dataclasses.replace(settings, damping=settings.damping + gamma, stationarity_warn=1e300)


def record_proximal(diag: dict[str, Any], gamma: float, given: Any, report: dict) -> None:
    """Write P's stationarity (from the checkpoint's refine report) over F's in ``diag``, and say it aloud
    when it is above the warning threshold the user gave."""
    ratio = float(report.get("ratio_after", float("nan")))
    diag["stationarity_of_F"] = diag.pop("stationarity", None)
    diag["stationarity"] = {"grad_norm": float(report.get("grad_norm_after", float("nan"))), "mean_task_grad_norm": float(report.get("task_grad_norm_after", float("nan"))),
                            "ratio": ratio, "warning": None, "objective": f"F + (γ/2)‖λ − λ₀‖², γ = {gamma:g}", "source": "the checkpoint's refine report"}
    # the settings recorded beside the scores hold stationarity_warn = 1e300 (F's check off); the threshold given applies to P
    diag["proximal"] = {"gamma": gamma, "damping_given": given.damping, "damping_used": given.damping + gamma,
                        "stationarity_warn_given": given.stationarity_warn}
    if not ratio <= given.stationarity_warn:
        shortfall(diag, f"λ is not stationary for the proximal objective: its ‖∇P‖ / mean‖g_i‖ = {ratio:.2g} (warned above "
                        f"{given.stationarity_warn:g}); refine this checkpoint again (`metainfluence refine --checkpoint …`, it keeps the anchor)")
