"""Fidelity of the scores on a real pool (docs/method.md §10): leave-one-out and group removals of any run
(Conv4 on Omniglot, say) re-optimised for real, against every method's prediction.

On a pool small enough to re-optimise, plain F has no useful minimiser near the trained λ: a Conv4 on 50
tasks memorises, and refine walks away from the trained model (measured: docs/experiments.md). The
ground truth is therefore the *proximal* response anchored at the trained λ_t (Bae et al. 2022):

    λ*     = argmin  F(λ)   + (γ/2)‖λ − λ_t‖²      (refine, started at λ_t)
    λ_{−S} = argmin  F_{−S}(λ) + (γ/2)‖λ − λ_t‖²    (re-optimised from λ*, S one task or a group)

λ* is a true stationary point of its objective, whose Hessian is H + γI, so task-IF with damping γ is
that objective's exact first-order derivative, and the comparison is well posed at any model size.
With ``proximal = 0`` the run's own refine and plain leave-one-out are used instead (small, well-fit
models only)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import GroundTruthSettings, RefineSettings, evaluate, lds_ground_truth, leave_one_out, metrics
from ..errors import BudgetStop, SettingsError
from ..evaluation.groundtruth import validation_loss
from ..meta.checkpoint import load_checkpoint
from ..meta.refine import RefineReport, refine
from ..pipeline import RunContext, train_stage
from ..pipeline.proximal import ANCHOR, proximal_of, proximal_settings
from . import plots
from .common import StageCache, _eval_json, _header, _method_settings, _score_cached, _train_and_refine, _with_curvature


@dataclass
class FidelitySettings:
    proximal: float = field(default=0.1, metadata={"help": "γ of the proximal objective F + (γ/2)‖λ − λ_t‖² anchored at the trained λ_t: λ* is its "
                                                           "minimiser, every removal re-optimises it, and task-IF is damped by γ (0: plain F, the run's refine)"})
    n_loo: int = field(default=20, metadata={"help": "single tasks left out (a seeded sample)"})
    n_groups: int = field(default=20, metadata={"help": "random groups left out (0 = none)"})
    group_fraction: float = field(default=0.1, metadata={"help": "fraction of the pool in each group"})
    seed: int = field(default=0, metadata={"help": "seed of the sample and the groups"})
    tol_ratio: float = field(default=1e-5, metadata={"help": "stationarity ‖∇‖ / mean‖g_i‖ of every re-optimisation (and of λ* when proximal > 0)"})
    max_iter: int = field(default=1000, metadata={"help": "L-BFGS iterations of each re-optimisation"})
    hessians: tuple[str, ...] = field(default=("gauss-newton", "exact"), metadata={"help": "Hessian kinds of the task-IF rows"})
    newton_step: bool = field(default=True, metadata={"help": "also the Newton-step prediction (H − H_k/n + γI)⁻¹g_k/n of each Hessian kind"})
    methods: tuple[str, ...] = field(default=("task-if-fast", "direct-if", "tracin", "trak", "ekfac-if", "loss", "random"),
                                     metadata={"help": "other rankings (task-if rows come from hessians)"})
    direct_damping: float = field(default=1.0, metadata={"help": "damping of direct-IF's (indefinite) θ-space Hessian"})


def _lambda_star(ctx: RunContext, sec: FidelitySettings, cache: StageCache, log) -> tuple[torch.Tensor, torch.Tensor, RefineReport, dict]:
    """(λ*, λ_t, refine report, timings): train, then minimise the proximal objective anchored at λ_t."""
    if ctx.settings.refine.proximal:
        raise SettingsError("the fidelity experiment sets the proximal term itself: use [fidelity] proximal, not [refine] proximal")
    if sec.proximal == 0:
        lam_star, rep, times = _train_and_refine(ctx, log, cache=cache)
        return lam_star, lam_star, rep, times
    if cache.has("refined"):
        ckpt = load_checkpoint(ctx.out / "refined", expected_problem=ctx.problem)
        rep = RefineReport.from_json(ckpt.info["refine_report"])
        log(f"resumed: λ* of the proximal objective, {ctx.out / 'refined'} (ratio {rep.ratio_after:.2g})")
        return ckpt.lam, proximal_of(ckpt)[1].to(ckpt.lam.dtype), rep, {"reused": ["train", "refine"]}
    t = time.perf_counter()
    lam_t, history, _ = train_stage(ctx, progress=False, resume=ctx.out / "trained" if cache.has("trained") else None)
    t_train = time.perf_counter() - t
    rs = dataclasses.replace(ctx.settings.refine, tol=0.0, tol_ratio=sec.tol_ratio)
    anchor = lam_t.to(torch.float64 if rs.dtype == "float64" else torch.float32)
    t = time.perf_counter()
    lam_star, rep = refine(ctx.problem, anchor, ctx.tensors["train"], rs, proximal=(sec.proximal, anchor), log=log)
    t_refine = time.perf_counter() - t
    log(f"trained {history.steps_done} steps ({t_train:.1f} s); proximal objective (γ = {sec.proximal:g}, anchored at λ_t) refined to ratio "
        f"{rep.ratio_after:.2g} in {t_refine:.1f} s, ‖λ* − λ_t‖/‖λ_t‖ = {float((lam_star - anchor).norm() / anchor.norm()):.3g}")
    times = {"train_s": t_train, "refine_s": t_refine}
    ctx.save_checkpoint("refined", lam_star, "refined", {"timings": times}, refine_report=rep, state={ANCHOR: anchor})
    cache.done("training and the proximal refine")
    return lam_star, anchor, rep, times


def run_fidelity(run, infl, sec: FidelitySettings, out: Path, quick: bool, log, resume: bool = False, deadline: float = math.inf) -> dict:
    header = _header("fidelity", run, infl, sec, quick)
    cache = StageCache(out, header["settings"], resume, ("proximal", "tol_ratio"), log, deadline)
    timings: dict = {}
    ctx = RunContext.prepare(run, out, log=log)
    lam_star, anchor, rep, tt = _lambda_star(ctx, sec, cache, log)
    timings.update(tt)
    problem, dt = ctx.problem, lam_star.dtype
    train, val, test = (ctx.tensors[k].to(dtype=dt) for k in ("train", "val", "test"))
    n = len(train)

    # ground truth: re-optimise from λ* without each sampled task / group (resumable unit by unit)
    gts = GroundTruthSettings(n_loo=sec.n_loo, n_subsets=sec.n_groups, subset_fraction=1 - sec.group_fraction, seed=sec.seed,
                              method="lbfgs", proximal=sec.proximal)
    gts.validate(n)
    rs = RefineSettings(method="lbfgs", tol=0.0, tol_ratio=sec.tol_ratio, max_iter=sec.max_iter, dtype=run.refine.dtype)
    anchor_ = anchor if sec.proximal else None
    t = time.perf_counter()
    loo = leave_one_out(problem, lam_star, train, val, gts, rs, out_dir=out / "groundtruth_loo", anchor=anchor_,
                        progress=lambda s: log("  " + s))
    timings["loo_s"] = time.perf_counter() - t
    groups = None
    if sec.n_groups:
        t = time.perf_counter()
        groups = lds_ground_truth(problem, lam_star, train, val, gts, rs, out_dir=out / "groundtruth_groups", anchor=anchor_,
                                  progress=lambda s: log("  " + s))
        timings["groups_s"] = time.perf_counter() - t
    if loo["units_computed"] or (groups is not None and groups["units_computed"]):  # a resumed, finished stage does not stop the run again
        cache.done("the ground truth")
    f_star = validation_loss(problem, lam_star, val)
    # one re-optimisation's time, as each unit recorded it (a resumed run did not re-time them)
    recorded = [x for x in loo["unit_seconds"] + (groups["unit_seconds"] if groups is not None else []) if x is not None]
    unit_s = sum(recorded) / len(recorded) if recorded else (timings["loo_s"] + timings.get("groups_s", 0.0)) / (sec.n_loo + sec.n_groups + 1)

    # every prediction, damped by γ (the proximal objective's Hessian is H + γI)
    base = dataclasses.replace(infl, method="task-if")
    if sec.proximal:  # damping exactly γ, F's stationarity warning off (λ* is stationary for P)
        base = proximal_settings(dataclasses.replace(base, damping=0.0), sec.proximal)
    base = _with_curvature(problem, lam_star, train, base, out, log, timings, sec.methods, cache)  # pcg / the fast tier need it
    variants: dict[str, object] = {}
    for h in sec.hessians:
        s_h = dataclasses.replace(base, hessian=h)
        if h != base.hessian and base.solver in ("pcg", "curvature"):  # the curvature file is of base.hessian only
            s_h = dataclasses.replace(s_h, solver="cg", curvature_file="")
        variants[f"task-if ({h})"] = s_h
        if sec.newton_step:
            variants[f"task-if ({h}, newton-step)"] = dataclasses.replace(s_h, removal="newton")
    for m in sec.methods:
        variants[m] = _method_settings(base, m, sec.direct_damping)
    rows, scores = [], {}
    for label, s in variants.items():
        try:
            res = _score_cached(problem, lam_star, train, val, label, s, log, cache=cache)
        except BudgetStop:
            raise
        except Exception as exc:  # e.g. an indefinite reduced Hessian of the Newton step: recorded, not fatal
            rows.append({"method": label, "error": f"{type(exc).__name__}: {exc}"[:200]})
            log(f"  {label:<28} failed: {rows[-1]['error']}")
            continue
        sc = res.scores.double()
        scores[label] = sc
        c = metrics.loo_correlation(sc[loo["tasks"]], loo["true_delta_f"])
        row = {"method": label, "spearman_loo": c["spearman"], "pearson_loo": c["pearson"],
               "size_ratio": float(sc[loo["tasks"]].abs().sum() / loo["true_delta_f"].abs().sum().clamp_min(1e-300))}
        if groups is not None:
            pred = metrics.lds_predictions(sc, f_star, groups["masks"])
            row["spearman_groups"] = metrics.lds(pred, groups["true_f"])
            row["pearson_groups"] = metrics.pearson(pred, groups["true_f"])
        row["seconds"] = float(res.diagnostics.get("seconds", float("nan")))
        row["reoptimisation_over_score"] = unit_s / row["seconds"] if row["seconds"] > 0 else float("inf")
        residual = res.diagnostics.get("solver", {}).get("residual")
        if residual is not None:
            row["residual"] = residual
        rows.append(row)
        log(f"  {label:<28} Spearman LOO {row['spearman_loo']:+.3f}" + (f", groups {row['spearman_groups']:+.3f}" if groups is not None else ""))

    figs = {}
    best = next((r["method"] for r in rows if r["method"].startswith("task-if (") and "spearman_loo" in r), None)
    if best is not None:
        figs["scatter_task_if"] = plots.scatter_predicted_vs_actual(
            scores[best][loo["tasks"]], loo["true_delta_f"], out / "scatter_task_if.png", title=f"{best} vs leave-one-out",
            xlabel="predicted Δf (score)", ylabel="re-optimised Δf").name
    return {
        **header,
        "n_tasks": n, "n_params": problem.dim, "proximal": sec.proximal, "anchor": "trained λ" if sec.proximal else "λ* (plain refine)",
        "refine": rep.to_json(), "lambda_move": float((lam_star - anchor.to(dt)).norm() / anchor.norm()),
        "f_star": f_star, "train_query_loss": validation_loss(problem, lam_star, train),
        "test_at_anchor": _eval_json(evaluate(problem, anchor.to(dt), test)), "test_at_star": _eval_json(evaluate(problem, lam_star, test)),
        "ground_truth": {"loo_tasks": [int(k) for k in loo["tasks"]], "loo_true_delta_f": loo["true_delta_f"].tolist(),
                         "loo_max_grad_norm": loo["max_grad_norm"], "f_control": loo["f_control"],
                         "groups_true_f": groups["true_f"].tolist() if groups is not None else [],
                         "seconds_per_reoptimisation": unit_s},
        "table": rows, "figures": figs, "timings": timings,
    }

