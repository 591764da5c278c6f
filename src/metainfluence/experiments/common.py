"""What the experiments share: their names, the ranking methods, the results header (settings, seeds,
sign convention, machine), training + refine of a run, scoring every method, and the block CG for
self-influence."""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any, Callable

import torch

from .. import SIGN_CONVENTION, InfluenceSettings, task_influence
from ..config import to_dict
from ..errors import SettingsError
from ..pipeline import refine_stage, train_stage

EXPERIMENTS = ("detection", "removal", "estimates")
METHODS = ("task-if", "direct-if", "tracin", "loss", "random")


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


def block_cg(matmat: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, damping: float, tol: float = 1e-6,
             max_iter: int = 300) -> tuple[torch.Tensor, dict]:
    """Solve (H + δI) X = B for every column of B at once: independent CG recursions per column whose
    products are taken together with ``matmat`` (one vectorised pass per iteration instead of one per
    column). Columns that reached ‖r‖ ≤ tol‖b‖ are frozen. Returns X and {iterations, max residual}."""
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    bn = B.norm(dim=0).clamp_min(1e-300)
    active = torch.ones(B.shape[1], dtype=torch.bool)
    it = 0
    for it in range(1, max_iter + 1):
        idx = torch.nonzero(active).flatten()
        AP = matmat(P[:, idx]) + damping * P[:, idx]
        curv = (P[:, idx] * AP).sum(0)
        if (curv <= 0).any():
            raise SettingsError(f"block CG met non-positive curvature {float(curv.min()):.3g}: H + δI is indefinite; raise damping or use gauss-newton")
        alpha = rs[idx] / curv
        X[:, idx] += alpha * P[:, idx]
        R[:, idx] -= alpha * AP
        rs_new = (R[:, idx] ** 2).sum(0)
        beta = rs_new / rs[idx]
        P[:, idx] = R[:, idx] + beta * P[:, idx]
        rs[idx] = rs_new
        active[idx] = rs_new.sqrt() > tol * bn[idx]
        if not active.any():
            break
    return X, {"iterations": it, "max_rel_residual": float((rs.sqrt() / bn).max()), "converged": bool(not active.any())}


def self_influence_cg(problem, lam, train, infl: InfluenceSettings) -> tuple[torch.Tensor, dict]:
    """g_kᵀ (H + δI)^{-1} g_k / n for every training task by block CG with ``infl``'s Hessian
    (kept for comparison: on 60 digits tasks it took 68 s against 0.14 s for fisher + Woodbury)."""
    from ..influence.task_if import build_hessian

    t = time.perf_counter()
    op = build_hessian(problem, lam, train, infl)
    G = problem.total_gradients(lam, train).detach()
    X, info = block_cg(op.matmat, G.T.contiguous(), infl.damping, tol=max(infl.tol, 1e-5), max_iter=infl.max_iter)
    info["seconds"] = time.perf_counter() - t
    return (G * X.T).sum(1) / len(train), info


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


