"""The demo (the README's main command): pools on the embedded digits data with 20% of the training
tasks mislabeled, meta-train, refine, evaluate, task-IF, detection of the mislabeled tasks and a
closed-form edit removing them, everything written to the run folder."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..config import to_dict
from ..errors import DivergenceError
from ..evaluation.metrics import detection_auc, recall_at
from ..influence import InfluenceSettings
from ..influence.gradients import reusing_measurement_gradients
from ..influence.reliability import halves_of, measurement_reliability, overfit_notice, record_reliability
from ..linalg import SolverSettings
from ..meta.checkpoint import lam_digest
from ..meta.evaluate import EvalResult
from .run import RunContext
from .settings import RunSettings
from .proximal import ANCHOR, proximal_settings
from .stages import edit_stage, evals_json, evaluate_stage, influence_stage, refine_stage, removal_from_scores, train_stage


def demo_settings() -> RunSettings:
    """The demo's defaults: the digits pools with 20% of the training tasks mislabeled; with --no-progress a
    training line every 500 steps (three in all), not 150."""
    settings = RunSettings()
    settings.data.corrupt_tasks = 0.2
    settings.train.log_every = 500
    return settings


def _say(line: str) -> None:
    # flushed, so that in a log file (stdout a pipe) these lines keep their place among the stderr ones
    print(line, flush=True)


def _influence_demo(ctx: RunContext, lam: torch.Tensor, before: Mapping[str, EvalResult], log: Callable[[str], None], proximal: float = 0.0,
                    refine_report: dict | None = None) -> dict:
    """task-IF on the (partly corrupted) training pool, detection of the corrupted tasks, closed-form edit
    (``proximal``: γ of a proximal refine, added to the damping)."""
    settings = InfluenceSettings(hessian="exact", solver="cg", damping=1e-3, solve=SolverSettings(tol=1e-6, max_iter=300))
    if proximal:
        settings = proximal_settings(settings, proximal)
    t = time.perf_counter()
    train, val = (ctx.tensors[k].to(dtype=lam.dtype) for k in ("train", "val"))
    ctx.tensors["val"] = val  # one pool object: the reliability's halves ride on the scores' ∇f pass
    with reusing_measurement_gradients(halves_of(val, 2, 0)):
        try:
            result = influence_stage(ctx, lam, settings)
        except DivergenceError as exc:
            # λ is not at a minimum (indefinite total Hessian): say so, and use the PSD Gauss–Newton kind
            log(f"warning: {exc}; falling back to hessian=gauss-newton")
            settings = dataclasses.replace(settings, hessian="gauss-newton")
            result = influence_stage(ctx, lam, settings)
        influence_s = time.perf_counter() - t
        # how much the ranking depends on which validation tasks were drawn (method §5.1): said aloud when low
        rel = measurement_reliability(ctx.problem, lam, train, val, settings, splits=2, s=result.extra["s"])  # 2 solves: ~2× task-IF's time
    record_reliability(result.diagnostics, rel)
    overfit_notice(refine_report, result)
    ctx.save_scores(result, "task_influence", scored=(ctx.path("refined"), lam))
    pool = ctx.pools["train"]
    corrupted = torch.as_tensor(pool.corrupted_tasks).bool()
    n, n_bad = len(corrupted), int(corrupted.sum())
    summary: dict[str, Any] = {"hessian": settings.hessian, "influence_s": influence_s, "solver_residual": result.diagnostics["solver"]["residual"],
                               "stationarity_ratio": result.diagnostics["stationarity"]["ratio"], "n_corrupted": n_bad,
                               "measurement_reliability": {k: rel[k] for k in ("reliability", "n_val_tasks", "splits", "val_tasks_for_target", "seconds",
                                                                                  "halves_from_scoring_pass")}}
    order = result.ranking(harmful_first=True)
    if n_bad:
        summary["recall_at_corrupted_fraction"] = recall_at(order, corrupted, n_bad / n)
        summary["recall_at_1.25x"] = recall_at(order, corrupted, min(1.0, 1.25 * n_bad / n))
        summary["auc"] = detection_auc(-result.scores, corrupted)
    k = n_bad or max(1, n // 10)
    removal = removal_from_scores(result, k)
    t = time.perf_counter()
    # the edit is a Newton step on the pool without the flagged tasks: its exact Hessian is usually
    # indefinite at λ* (λ* minimises the full pool), so the demo uses the PSD Gauss–Newton one
    gn = dataclasses.replace(settings, hessian="gauss-newton")
    edited = edit_stage(ctx, lam, removal, gn)  # the reduced step
    summary["edit_s"] = time.perf_counter() - t
    summary["removed_tasks"] = len(removal.tasks)
    summary["removed_corrupted"] = int(corrupted[removal.tasks].sum())
    after = evaluate_stage(ctx, edited.lam, ("val", "test"))
    summary["eval_before_edit"] = evals_json(before)
    summary["eval_after_edit"] = evals_json(after)
    summary["edit_residual"] = edited.diagnostics["solver_residual"]
    # the record `edit` writes, so that `report` lists the demo's edit among the run's edits
    ctx.save_checkpoint("edited", edited.lam, "edited", {"eval": evals_json(after), "eval_before_edit": evals_json(before), "removed": removal.count(),
                                                         "removed_tasks": removal.tasks, "edited_from": lam_digest(lam), "edit": edited.diagnostics,
                                                         "edit_settings": {"influence": to_dict(gn), "step": "reduced", "newton_steps": 0}})
    return summary


# --------------------------------------------------------------------------- the demo
def run_demo(settings: RunSettings | None = None, out: str | os.PathLike = "runs/demo", progress: bool = True, log: Callable[[str], None] = _say,
             influence_step: bool = True) -> dict:
    """Build pools on the embedded digits data (by default), meta-train, refine, evaluate, and write
    everything under ``out``. Returns a dict with the context (``"context"``), both λ, the refine
    report, evaluation results and the summary written to ``out/summary.json``."""
    settings = settings or demo_settings()
    t_start = time.perf_counter()
    out = Path(out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    ctx = RunContext.prepare(settings, out, log=log)
    ctx.write_settings()
    timings["data_and_pools_s"] = time.perf_counter() - t
    # the set-up is said once, here, as it happens; the summary at the end holds the results only
    if ctx.standardization:
        log(f"inputs standardised with the training pool's per-pixel mean and sd {ctx.standardization['sd']:.3f}")
    log(f"model: {type(ctx.problem.model).__name__} with {ctx.problem.dim} parameters; inner: {settings.inner.kind}, {settings.inner.steps} step(s) of lr {settings.inner.lr}")

    t = time.perf_counter()
    lam_trained, history, _ = train_stage(ctx, progress=progress)
    timings["train_s"] = time.perf_counter() - t
    log(f"trained {history.steps_done} steps in {history.wall_time_s:.1f} s ({history.tasks_per_second:.0f} tasks/s); recent batch loss {history.recent_loss():.3f}")

    t = time.perf_counter()
    eval_trained = evaluate_stage(ctx, lam_trained, ("val", "test"))
    timings["evaluate_trained_s"] = time.perf_counter() - t

    t = time.perf_counter()
    lam_refined, report = refine_stage(ctx, lam_trained, progress=progress)
    timings["refine_s"] = time.perf_counter() - t

    t = time.perf_counter()
    eval_refined = evaluate_stage(ctx, lam_refined, ("val", "test"))
    timings["evaluate_refined_s"] = time.perf_counter() - t

    train_state = ctx.checkpoint_state("trained")
    ctx.save_checkpoint("trained", lam_trained, "trained", {"eval": evals_json(eval_trained)}, history=history, step=history.steps_done, state=train_state)
    ctx.save_checkpoint("refined", lam_refined, "refined", {"eval": evals_json(eval_refined)}, refine_report=report, history=history, step=history.steps_done,
                        state={ANCHOR: lam_trained.to(lam_refined.dtype)} if report.proximal else None)

    t = time.perf_counter()
    influence = _influence_demo(ctx, lam_refined, eval_refined, log, report.proximal, report.to_json()) if influence_step else None
    timings["influence_and_edit_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    summary = {
        "pools": {name: pool.summary() for name, pool in ctx.pools.items()},
        "model": {"kind": type(ctx.problem.model).__name__, "n_params": ctx.problem.dim},
        "standardization": ctx.standardization,
        "train": {"steps": history.steps_done, "tasks_per_second": history.tasks_per_second, "wall_time_s": history.wall_time_s},
        "eval_trained": evals_json(eval_trained),
        "eval_refined": evals_json(eval_refined),
        "refine": report.to_json(),
        "influence": influence,
        "timings": timings,
        "files": {"trained": "trained.safetensors", "refined": "refined.safetensors", "pools": "pools/", "settings": "settings.json"},
    }
    ctx.write_summary(summary)
    for line in format_demo_summary(summary, out):
        log(line)
    return {
        "context": ctx,
        "lam_trained": lam_trained,
        "lam_refined": lam_refined,
        "history": history,
        "refine_report": report,
        "eval_trained": eval_trained,
        "eval_refined": eval_refined,
        "summary": summary,
        "out": out,
    }


def _fmt_eval(d: Mapping[str, Any]) -> str:
    if isinstance(d.get("accuracy"), float) and not math.isnan(d["accuracy"]):
        return f"{100 * d['accuracy']:.1f}% ± {100 * d['accuracy_ci95']:.1f}%  (loss {d['loss']:.3f})"
    return f"loss {d['loss']:.4f} ± {d['loss_ci95']:.4f}"


def format_demo_summary(summary: Mapping[str, Any], out: Path) -> list[str]:
    r = summary["refine"]
    test_n = summary["eval_trained"].get("test", {}).get("n_tasks", 0)
    # pools, model and training were said as they happened (run_demo): the summary holds the results
    lines = [
        "",
        "== metainfluence demo ==",
        f"meta-test ({test_n} tasks, 95% interval):",
        f"  after training: {_fmt_eval(summary['eval_trained']['test'])}",
        f"  after refine:   {_fmt_eval(summary['eval_refined']['test'])}",
        f"stationarity (full training pool): ‖∇F‖ {r['grad_norm_before']:.3g} → {r['grad_norm_after']:.3g} "
        f"(tol {r['tol']:.1g}, {'converged' if r['converged'] else 'NOT converged'}); "
        f"‖∇F‖ / mean‖g_i‖ {r['ratio_before']:.3g} → {r['ratio_after']:.3g}; refine {r['iterations']} iterations, {r['wall_time_s']:.1f} s",
    ]
    inf = summary.get("influence")
    if inf:
        b, a = inf["eval_before_edit"]["test"], inf["eval_after_edit"]["test"]
        lines += [
            f"task-IF ({inf['hessian']} total Hessian, CG residual {inf['solver_residual']:.1e}) in {inf['influence_s']:.1f} s; "
            f"score = predicted change of the validation loss if the task is removed (> 0 helps, < 0 harms)",
        ]
        m = inf["measurement_reliability"]
        need = m["val_tasks_for_target"]
        lines.append(f"measurement: the ranking's reliability over halves of the {m['n_val_tasks']} validation tasks is {m['reliability']:.2f} "
                     f"in {m['seconds']:.1f} s (0.9 " + ("reached" if need and need <= m["n_val_tasks"] else f"wants about {need} tasks") + "; docs/method.md §5.1)")
        if inf["n_corrupted"]:
            lines.append(
                f"mislabeled tasks: {inf['n_corrupted']}; among the {inf['removed_tasks']} most harmful by task-IF: {inf['removed_corrupted']} "
                f"(recall {inf['recall_at_corrupted_fraction']:.2f}; at 1.25× that many: {inf['recall_at_1.25x']:.2f}; AUC {inf['auc']:.3f})")
        lines += [
            f"closed-form edit removing them (Gauss–Newton step on the reduced pool, {inf['edit_s']:.1f} s, no retraining): meta-test {_fmt_eval(b)} → {_fmt_eval(a)}",
        ]
    lines.append(f"total {summary['timings']['total_s']:.1f} s; outputs in {out}/ (checkpoints, pools/, task_influence scores, summary.json)")
    return lines
