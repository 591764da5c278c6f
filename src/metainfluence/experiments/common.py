"""What the experiments share: their names, the ranking methods, the results header (settings, seeds,
sign convention, machine), training + refine of a run, scoring every method, and the block CG for
self-influence."""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import SIGN_CONVENTION, InfluenceSettings, task_influence
from ..config import to_dict
from ..influence.curvature import fit_curvature
from ..pipeline import refine_stage, train_stage

EXPERIMENTS = ("detection", "removal", "estimates")
METHODS = ("task-if", "direct-if", "tracin", "trak", "ekfac-if", "loss", "random")


def _machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _header(name: str, run, infl, sec, quick: bool) -> dict[str, Any]:
    return {
        "kind": f"metainfluence.experiment.{name}",
        "experiment": name,
        "quick": quick,
        "sign_convention": SIGN_CONVENTION,
        "settings": {"run": to_dict(run) if run is not None else None, "influence": to_dict(infl), name: to_dict(sec)},
        "seeds": ({"pool_seed": run.data.pool_seed, "split_seed": run.data.split_seed, "train_seed": run.train.seed,
                   "influence_seed": infl.seed} if run is not None else {"influence_seed": infl.seed}),
        "machine": _machine(),
    }


# --------------------------------------------------------------------------- shared pieces
def _train_and_refine(ctx, log, w_train=None) -> tuple[torch.Tensor, Any, dict]:
    t = time.perf_counter()
    lam, history, _ = train_stage(ctx, progress=False)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    lam_star, rep = refine_stage(ctx, lam, progress=False)
    t_refine = time.perf_counter() - t
    log(f"trained {history.steps_done} steps ({t_train:.1f} s), refined ‖∇F‖ {rep.grad_norm_before:.2g} → {rep.grad_norm_after:.2g} ({t_refine:.1f} s)")
    return lam_star, rep, {"train_s": t_train, "refine_s": t_refine}


def _with_curvature(problem, lam, train, infl: InfluenceSettings, out: Path, log, timings: dict) -> InfluenceSettings:
    """Solvers pcg / curvature need a curvature file of this λ*: with none given, fit a Nyström sketch
    (rank from the spectrum) once here, save it in the output folder and let every score and edit
    of the experiment reuse it (edits on a reduced pool are preconditioned by it under pcg)."""
    if infl.solver not in ("pcg", "curvature") or infl.curvature_file:
        return infl
    t = time.perf_counter()
    art = fit_curvature(problem, lam, train, infl, rank="auto")
    stem = out / "curvature"
    art.save(stem)
    timings["curvature_fit_s"] = time.perf_counter() - t
    log(f"curvature: Nyström rank {art.info['rank']} fitted at λ* in {timings['curvature_fit_s']:.1f} s "
        f"({art.info['fit_over_floor']:.1f}× the floor), probe error {max(art.info['probe_operator_rel_error']):.2g} → {stem}")
    return dataclasses.replace(infl, curvature_file=str(stem))


def _eval_json(res) -> dict[str, float]:
    return {"accuracy": res.accuracy, "accuracy_ci95": res.accuracy_ci95, "loss": res.loss, "loss_ci95": res.loss_ci95, "n_tasks": res.n_tasks}


def _method_settings(infl: InfluenceSettings, method: str, direct_damping: float, **kw) -> InfluenceSettings:
    s = dataclasses.replace(infl, method=method, **kw)
    if method == "direct-if":
        s = dataclasses.replace(s, damping=direct_damping)
    return s


def _score_all(problem, lam, train, val, infl, methods, direct_damping, log, self_influence=False) -> dict[str, Any]:
    out = {}
    for m in methods:
        t = time.perf_counter()
        s = _method_settings(infl, m, direct_damping)
        res = task_influence(problem, lam, train, val, s)
        if self_influence and m == "task-if":
            # self-influence needs one iHVP per task: with CG (≈ 80 GN products per task) that is
            # ~100 s for 60 tasks here, so it uses the fisher surrogate solved exactly by Woodbury
            ts = time.perf_counter()
            si = task_influence(problem, lam, train, val, dataclasses.replace(s, hessian="fisher", solver="woodbury", self_influence=True))
            res.self_influence = si.self_influence
            res.diagnostics["self_influence"] = {"hessian": "fisher", "solver": "woodbury", "seconds": time.perf_counter() - ts,
                                                 "residual": si.diagnostics.get("self_influence_residual")}
        res.diagnostics["seconds"] = time.perf_counter() - t
        out[m] = res
        log(f"  {m:<9} scores in {res.diagnostics['seconds']:.2f} s")
    return out


def _diag_json(res) -> dict:
    d = dict(res.diagnostics)
    return {k: v for k, v in d.items() if k != "s"}


def _image_tensors(pool, dataset, ids: list[int]):
    """Raw images of tasks ``ids`` scaled to [0, 1] per image (for the figure), with given/true labels."""
    sub = pool.subset(pool.task_ids[ids])
    t = sub.tensors(dataset)
    x = torch.cat([t.support_x, t.query_x], 1).float()
    flat = x.flatten(2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    x = ((flat - lo) / (hi - lo).clamp_min(1e-8)).reshape(x.shape)
    given = torch.cat([sub.support_y, sub.query_y], 1)
    true = torch.cat([sub.support_true_y, sub.query_true_y], 1)
    return x, given, true, t.support_x.shape[1], [int(i) for i in sub.task_ids]


