"""Mislabeled- and harmful-task detection (docs/method.md §10): corrupt a fraction of the training tasks
(label flips, near-duplicate tasks or off-distribution inputs, ``kind``), rank them by each method, measure recall and AUC, and the meta-test accuracy after removing the top-ranked tasks by
closed-form edit; optionally swept over ρ_task."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import GroundTruthSettings, RefineSettings, Removal, edit_model, evaluate, leave_one_out, metrics
from ..config import to_dict
from ..evaluation.groundtruth import measurement_sha256
from ..influence.gradients import reusing_measurement_gradients
from ..influence.reliability import halves_of, reliability_and_half_scores, reliability_warning
from ..io import save_result, write_json
from ..pipeline import RunContext
from ..tasks import corrupt_tasks
from . import plots
from .common import METHODS, OPTIONAL_METHODS, StageCache, _diag_json, _eval_json, _header, _image_tensors, _mark_proximal, _proximal_infl, _proximal_term, _score_all, _train_and_refine, _with_curvature


@dataclass
class DetectionSettings:
    kind: str = field(default="labels", metadata={"help": "what makes the corrupted tasks harmful: labels (flipped labels) | duplicate (near-copies of "
                                                         "a few other tasks, labels correct) | off-distribution (inputs moved off the data distribution, labels correct)"})
    rho_task: float = field(default=0.2, metadata={"help": "fraction of training tasks corrupted"})
    rho_tasks: tuple[float, ...] = field(default=(), metadata={"help": "sweep: one full run per value (sub-folders rho_<value>), replaces rho_task"})
    rho_label: float = field(default=0.8, metadata={"help": "fraction of labels flipped inside a corrupted task (kind = labels only)"})
    where: str = field(default="both", metadata={"help": "which labels are flipped: both | support | query (kind = labels only)"})
    duplicate_sources: int = field(default=1, metadata={"help": "number of tasks the duplicates copy (kind = duplicate only)"})
    duplicate_noise: float = field(default=0.05, metadata={"help": "sd of the input noise that makes each copy a near-copy, [0, 1] pixel scale (kind = duplicate only)"})
    offdist_transform: str = field(default="invert", metadata={"help": "invert (contrast x → 1 − x) | noise (strong Gaussian noise) (kind = off-distribution only)"})
    offdist_noise: float = field(default=0.5, metadata={"help": "sd of the noise of offdist_transform = noise, [0, 1] pixel scale (kind = off-distribution only)"})
    corruption_seed: int = field(default=0, metadata={"help": "seed of the corruption"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": f"ranking methods: {', '.join(METHODS)}; by name only: {', '.join(OPTIONAL_METHODS)}"})
    self_influence: bool = field(default=True, metadata={"help": "also rank by task-IF self-influence (one iHVP per task)"})
    edit_fractions: tuple[float, ...] = field(default=(0.1, 0.25, 0.4), metadata={"help": "fractions removed by closed-form edit (0 = the unedited model is added)"})
    direct_damping: float = field(default=1.0, metadata={"help": "damping of direct-IF's (indefinite) θ-space Hessian"})
    edit_max_iter: int = field(default=0, metadata={"help": "solver iterations of each edit (0 = [influence] max_iter)"})
    edit_methods: tuple[str, ...] = field(default=(), metadata={"help": "rankings whose top fractions are removed by edit (() = every ranking; "
                                                                         "the oracle edit is always made)"})
    loo_tasks: int = field(default=0, metadata={"help": "ground truth: leave each of this many tasks out (half corrupted, half clean, seeded) and "
                                                        "re-optimise from λ* (the refine's objective, proximal when it was); the row "
                                                        "'leave-one-out (re-optimised)' is the ranking every influence method estimates (0 = skip)"})
    loo_tol_ratio: float = field(default=1e-5, metadata={"help": "stationarity ‖∇‖ / mean‖g_i‖ of each leave-one-out re-optimisation"})
    loo_max_iter: int = field(default=300, metadata={"help": "L-BFGS iterations of each leave-one-out re-optimisation"})
    loo_dtype: str = field(default="", metadata={"help": "precision of the leave-one-out re-optimisations: float64 | float32 | '' (the refine's); "
                                                        "float32 sums of thousands of task losses cannot resolve F's decrease below ratio ≈ 1e-4"})
    reliability_splits: int = field(default=4, metadata={"help": "the measurement's reliability: score task-IF against both halves of this many random "
                                                                 "halvings of the validation pool, to say how much its ranking depends on which validation "
                                                                 "tasks were drawn and how many would do (0 = skip; docs/method.md §5.1)"})


# the [detection] keys that define the corrupted pool (and so λ*): a resumed run must keep them
POOL_KEYS = ("kind", "rho_task", "rho_label", "where", "duplicate_sources", "duplicate_noise", "offdist_transform", "offdist_noise",
             "corruption_seed")


def describe_kind(sec: DetectionSettings) -> str:
    """One line on what the corrupted tasks are, for the log and the report."""
    if sec.kind == "duplicate":
        return f"near-copies of {sec.duplicate_sources} other training task(s), input noise sd {sec.duplicate_noise}, labels correct"
    if sec.kind == "off-distribution":
        how = "contrast inverted" if sec.offdist_transform == "invert" else f"Gaussian noise sd {sec.offdist_noise}"
        return f"inputs {how}, labels correct"
    return f"{sec.rho_label:.0%} of their labels ({sec.where}) flipped to another class of the task"


# --------------------------------------------------------------------------- detection
def run_detection(run, infl, sec: DetectionSettings, out: Path, quick: bool, log, resume: bool = False, deadline: float = math.inf) -> dict:
    """One run at ``rho_task``, or with ``rho_tasks`` one run per value in ``out/rho_<value>``: the
    first value's result is the main one (its figures are referenced from the sub-folder) and a
    summary row per method × ρ_task is added."""
    if not sec.rho_tasks:
        return _detection_one(run, infl, sec, out, quick, log, resume, deadline)
    results = []
    for rho in sec.rho_tasks:
        sub = out / f"rho_{rho:g}"
        sub.mkdir(parents=True, exist_ok=True)
        log(f"detection sweep: ρ_task = {rho:g} → {sub}")
        r = _detection_one(run, infl, dataclasses.replace(sec, rho_task=float(rho), rho_tasks=()), sub, quick, log, resume, deadline)
        # the timed stages only: a resumed run lists its reused stages, and an untimed floor pass is null
        r["timings"]["total_s"] = sum(v for k, v in r["timings"].items() if k != "total_s" and isinstance(v, (int, float)))
        write_json(sub / "results.json", r)
        results.append(r)
    main = dict(results[0])
    main["settings"] = {**main["settings"], "detection": to_dict(dataclasses.replace(sec, rho_task=float(sec.rho_tasks[0])))}
    main["figures"] = {k: f"rho_{sec.rho_tasks[0]:g}/{v}" for k, v in main["figures"].items()}
    main["sweep"] = [{"rho_task": float(rho), "method": row["method"], "recall@1.25rho": row["recall@1.25rho"], "auc": row["auc"],
                      "n_corrupted": r["n_corrupted"], "refine_ratio": r["refine"]["ratio_after"]}
                     for rho, r in zip(sec.rho_tasks, results) for row in r["detection"]]
    main["timings"] = {f"rho_{rho:g}_s": r["timings"]["total_s"] for rho, r in zip(sec.rho_tasks, results)}
    return main


def _detection_one(run, infl, sec: DetectionSettings, out: Path, quick: bool, log, resume: bool = False, deadline: float = math.inf) -> dict:
    timings: dict[str, float] = {}
    cache = StageCache(out, _header("detection", run, infl, sec, quick)["settings"], resume, POOL_KEYS, log, deadline)
    t = time.perf_counter()
    ctx = RunContext.prepare(run, out, log=log)
    pools = dict(ctx.pools)
    pools["train"] = corrupt_tasks(pools["train"], sec.kind, sec.rho_task, seed=sec.corruption_seed, rho_label=sec.rho_label, where=sec.where,
                                   n_sources=sec.duplicate_sources, duplicate_noise=sec.duplicate_noise,
                                   transform=sec.offdist_transform, offdist_noise=sec.offdist_noise)
    ctx = ctx.with_pools(pools)
    ctx.save_pools(("train",))  # the corrupted pool, with its recorded truth
    flags = pools["train"].corrupted_tasks.bool()
    n = len(flags)
    timings["data_s"] = time.perf_counter() - t
    log(f"detection: {int(flags.sum())} of {n} training tasks corrupted, kind {sec.kind} ({describe_kind(sec)}); train pool now: "
        f"{pools['train'].summary()}")

    lam_star, rep, tt = _train_and_refine(ctx, log, cache=cache)
    given, infl = infl, _proximal_infl(infl, rep, log)
    # a proximal refine minimised P = F + (γ/2)‖λ − λ_t‖²: edits and leave-one-out re-optimise P_R, anchored at the same λ_t
    prox = _proximal_term(ctx, rep, lam_star.dtype)
    timings.update(tt)
    problem = ctx.problem
    dt = lam_star.dtype
    train, val, test = (ctx.tensors[k].to(dtype=dt) for k in ("train", "val", "test"))
    # one reuse block from the fit to the last edit: a fisher fit's per-task gradients serve every score and edit
    with reusing_measurement_gradients():
        infl = _with_curvature(problem, lam_star, train, infl, out, log, timings, sec.methods, cache)

        # the reliability's halves ride on the scores' ∇f pass: one validation pass for the rankings and the halves
        with reusing_measurement_gradients(halves_of(val, sec.reliability_splits, sec.corruption_seed)
                                           if sec.reliability_splits and "task-if" in sec.methods else None):
            t = time.perf_counter()
            scores = _score_all(problem, lam_star, train, val, infl, sec.methods, sec.direct_damping, log, sec.self_influence, cache)
            _mark_proximal(scores, rep, given)
            timings["scoring_s"] = time.perf_counter() - t
            reliability = None
            if sec.reliability_splits and "task-if" in scores:
                t = time.perf_counter()
                reliability = _reliability(problem, lam_star, train, val, infl, flags, sec, log, cache, scores["task-if"].extra.get("s"))
                timings["reliability_s"] = time.perf_counter() - t

        # suspicion (high = inspect first) and rankings
        suspicion: dict[str, torch.Tensor] = {m: -r.scores.double() for m, r in scores.items()}
        if sec.self_influence and "task-if" in scores and scores["task-if"].self_influence is not None:
            suspicion["task-if (self, fisher)"] = scores["task-if"].self_influence.double()
        fractions = np.arange(n + 1) / n
        at = min(1.0, 1.25 * sec.rho_task)
        rows, curves, rankings = [], {}, {}
        for m, s in suspicion.items():
            rank = torch.argsort(s, descending=True, stable=True).numpy()
            rankings[m] = rank
            fr, rec = metrics.recall_curve(rank, flags.numpy())
            curves[m] = (fr, rec)
            rows.append({"method": m, "recall@rho": metrics.recall_at(rank, flags.numpy(), sec.rho_task),
                         "recall@1.25rho": metrics.recall_at(rank, flags.numpy(), at),
                         "recall@0.4": metrics.recall_at(rank, flags.numpy(), 0.4),
                         "auc": metrics.detection_auc(s.numpy(), flags.numpy()),
                         "auc_ci95": metrics.detection_auc_interval(s.numpy(), flags.numpy()),  # stratified bootstrap
                         "seconds": (scores[m].diagnostics["seconds"] - scores[m].diagnostics.get("self_influence", {}).get("seconds", 0.0)
                                     if m in scores else scores["task-if"].diagnostics["self_influence"]["seconds"])})
            log(f"  {m:<15} recall@{at:.2f} {rows[-1]['recall@1.25rho']:.3f}  AUC {rows[-1]['auc']:.3f}")
        ground_truth, figs = None, {}
        if sec.loo_tasks:
            t = time.perf_counter()
            ground_truth = _loo_ground_truth(ctx, lam_star, rep, prox, train, val, flags, suspicion, sec, out, log, cache)
            timings["loo_s"] = time.perf_counter() - t
            if "task-if" in scores:
                on = ground_truth["tasks"]
                figs["scatter_loo"] = plots.scatter_predicted_vs_actual(
                    scores["task-if"].scores.double()[on], torch.tensor(ground_truth["true_delta_f"]), out / "scatter_task_if_loo.png",
                    title="task-IF vs leave-one-out on the corrupted pool", xlabel="task-IF score (predicted Δf)", ylabel="re-optimised Δf").name

        # accuracy after removing the inspected fraction by closed-form edit
        t = time.perf_counter()
        base = evaluate(problem, lam_star, test)
        edit_rows = []
        acc_curves: dict[str, tuple[list, list, list]] = {}
        edit_infl = dataclasses.replace(infl, method="task-if", self_influence=False,
                                        **({"solve": dataclasses.replace(infl.solve, max_iter=sec.edit_max_iter)} if sec.edit_max_iter else {}))
        oracle_ids = torch.nonzero(flags).flatten().tolist()
        edited = [m for m in suspicion if not sec.edit_methods or m in sec.edit_methods]
        plan = [(m, f) for m in edited for f in sec.edit_fractions if f > 0] + [("oracle (true corrupted)", sec.rho_task)]
        edit_set = to_dict(edit_infl)
        for m, f in plan:
            ids = [int(i) for i in (oracle_ids if m.startswith("oracle") else rankings[m][: metrics.fraction_to_count(f, n)].tolist())]
            # each edit is a unit kept in units/ with what it removed, reused by --resume when that and the edit's settings are equal
            r = cache.unit(f"edit {m} {f:g}", {"removed": ids, "influence": edit_set, "proximal": float(rep.proximal or 0.0)},
                           lambda: _edit_unit(problem, lam_star, train, test, ids, edit_infl, prox))
            edit_rows.append({"method": m, "fraction_removed": f, "removed": len(ids), "corrupted_removed": int(flags[ids].sum()) if ids else 0,
                              "test_acc": tuple(r["test_acc"]), "test_loss": r["test_loss"], "edit_s": r["edit_s"], "solver_residual": r["solver_residual"],
                              "step_length": r["step_length"], "proximal_gamma": r["proximal_gamma"]})
            log(f"  edit {m}, {len(ids)} tasks removed ({edit_rows[-1]['corrupted_removed']} corrupted): test accuracy {r['test_acc'][0]:.3f} ± "
                f"{r['test_acc'][1]:.3f} ({r['edit_s']:.1f} s, solver residual {r['solver_residual']:.1e})")
            if not m.startswith("oracle"):
                c = acc_curves.setdefault(m, ([0.0], [base.accuracy], [base.accuracy_ci95]))
                c[0].append(f); c[1].append(r["test_acc"][0]); c[2].append(r["test_acc"][1])
        timings["editing_s"] = time.perf_counter() - t
        log(f"  unedited test accuracy {base.accuracy:.3f} ± {base.accuracy_ci95:.3f}; {len(edit_rows)} edits in {timings['editing_s']:.1f} s")

    # figures
    figs["recall"] = plots.recall_curves({m: c for m, c in curves.items()}, out / "recall_curves.png", corrupted_fraction=sec.rho_task,
                                         title=f"Harmful-task detection ({run.data.dataset}, {sec.kind}, ρ_task={sec.rho_task})").name
    if acc_curves:  # edit_fractions = [] edits only the oracle: no curve to draw
        figs["accuracy"] = plots.accuracy_vs_removed(acc_curves, out / "accuracy_vs_removed.png",
                                                     title="Meta-test accuracy after removing the top-ranked tasks (closed-form edit)").name
    if "task-if" in rankings and ctx.dataset is not None:
        top = rankings["task-if"][:4].tolist()
        x, given, true, ns, ids = _image_tensors(pools["train"], ctx.dataset, top)
        figs["harmful_tasks"] = plots.task_image_grid(x, out / "harmful_tasks.png", given_labels=given, true_labels=true, n_support=ns, task_ids=ids,
                                                      title="Most harmful training tasks by task-IF" + (" (red = flipped label)" if sec.kind == "labels" else "")).name

    tensors = {"corrupted": flags.to(torch.uint8), **{f"suspicion.{m}": s for m, s in suspicion.items()},
               **{f"recall.{m}": torch.from_numpy(c[1]) for m, c in curves.items()}, "fractions": torch.from_numpy(fractions)}
    header = _header("detection", run, infl, sec, quick)
    save_result(out / "results", tensors, {**header, "note": "suspicion = −score (high = inspect first); for 'task-if (self)' the self-influence"})
    return {
        **header,
        "corruption_kind": sec.kind, "kind_description": describe_kind(sec), "corruption": pools["train"].corruption,
        "n_tasks": n, "n_corrupted": int(flags.sum()), "corrupted_task_ids": [int(i) for i in pools["train"].task_ids[flags]],
        "refine": rep.to_json(), "unedited_test": _eval_json(base),
        "detection": rows, "recall_curves": {m: {"fractions": c[0].tolist(), "recall": c[1].tolist()} for m, c in curves.items()},
        "edits": edit_rows, **({"ground_truth": ground_truth} if ground_truth is not None else {}),
        **({"measurement_reliability": reliability} if reliability is not None else {}), "influence_diagnostics": {m: _diag_json(r) for m, r in scores.items()},
        "figures": figs, "timings": timings,
    }


def _reliability(problem, lam_star, train, val, infl, flags, sec: DetectionSettings, log, cache: StageCache, s=None) -> dict:
    """How much task-IF's ranking depends on which validation tasks were drawn (docs/method.md §5.1): the
    split-half reliability of its scores, each half's detection AUC, and — below 0.9 — a warning with the
    pool size that would reach it. A unit, reused on --resume for the same settings and validation pool."""
    task_if = dataclasses.replace(infl, method="task-if", removal="first-order", self_influence=False)

    def compute() -> dict:
        rec, S = reliability_and_half_scores(problem, lam_star, train, val, task_if, sec.reliability_splits, sec.corruption_seed, s=s)
        return {**rec, "half_auc": [metrics.detection_auc((-S[:, j]).numpy(), flags.numpy()) for j in range(S.shape[1])]}

    rec = cache.unit("measurement reliability", {"influence": to_dict(task_if), "splits": sec.reliability_splits, "seed": sec.corruption_seed,
                                                 "val_sha256": measurement_sha256(val)}, compute)
    warning = reliability_warning(rec)
    log(f"measurement reliability: task-IF's split-half reliability {rec['reliability']:.2f} over {rec['splits']} halvings of the "
        f"{rec['n_val_tasks']} validation tasks; detection AUC against one half ({rec['half_size']} tasks) {min(rec['half_auc']):.3f}–{max(rec['half_auc']):.3f}")
    if warning:
        log("warning: " + warning)
    return {**rec, "warnings": [warning] if warning else []}


def _edit_unit(problem, lam_star, train, test, ids: list[int], edit_infl, prox) -> dict:
    te = time.perf_counter()
    ed = edit_model(problem, lam_star, train, Removal(tasks=ids), edit_infl, proximal=prox)
    secs = time.perf_counter() - te
    ev = evaluate(problem, ed.lam, test)
    d = ed.diagnostics
    return {"test_acc": (ev.accuracy, ev.accuracy_ci95), "test_loss": ev.loss, "edit_s": secs, "solver_residual": d["solver_residual"],
            "step_length": d.get("step_length"), "proximal_gamma": d.get("proximal_gamma")}


def _loo_sample(flags: torch.Tensor, k: int, seed: int) -> list[int]:
    """k task positions, half corrupted and half clean where the pool allows (seeded)."""
    g = torch.Generator().manual_seed(seed + 1)
    bad, good = torch.nonzero(flags).flatten(), torch.nonzero(~flags).flatten()
    n_good = min(len(good), k - min(len(bad), k // 2))
    n_bad = min(len(bad), k - n_good)
    pick = torch.cat([bad[torch.randperm(len(bad), generator=g)[:n_bad]], good[torch.randperm(len(good), generator=g)[:n_good]]])
    return sorted(int(i) for i in pick)


def _loo_ground_truth(ctx, lam_star, rep, prox, train, val, flags, suspicion, sec: DetectionSettings, out: Path, log, cache: StageCache) -> dict:
    """Leave-one-out by re-optimisation on a stratified sample: what removing each task really does to the
    validation loss. Its AUC is the ceiling of any method that estimates that effect (task-IF does): a
    low task-IF AUC beside a low ground-truth AUC says the corrupted tasks are not the ones this
    measurement finds harmful (a small validation pool is a noisy measurement: docs/experiments.md §1)."""
    sample = _loo_sample(flags, sec.loo_tasks, sec.corruption_seed)
    gts = GroundTruthSettings(n_loo=len(sample), method="lbfgs", proximal=float(prox[0]) if prox else 0.0)
    dtype = sec.loo_dtype or ctx.settings.refine.dtype
    rs = RefineSettings(method="lbfgs", tol=0.0, tol_ratio=sec.loo_tol_ratio, max_iter=sec.loo_max_iter, dtype=dtype)
    # re-optimisations in another precision than the refine's are other units: their own store, so a resumed run keeps both
    store = "groundtruth_loo" if dtype == ctx.settings.refine.dtype else f"groundtruth_loo_{dtype}"
    warnings = []
    if dtype == "float32" and rep.ratio_after > sec.loo_tol_ratio:
        # said before the re-optimisations start: each would stall (float32 F cannot show the line search a decrease)
        # and fall back to gradient descent for loo_max_iter passes over the pool
        warnings.append(f"the float32 refine stopped at ratio {rep.ratio_after:.2g}, above loo_tol_ratio {sec.loo_tol_ratio:g}: float32 "
                        "re-optimisations are unlikely to get there and may run all their loo_max_iter iterations; set "
                        "[detection] loo_dtype = \"float64\", or loosen loo_tol_ratio")
        log("warning: " + warnings[-1])
    log(f"leave-one-out ground truth: {len(sample)} tasks ({int(flags[sample].sum())} corrupted), re-optimised to ratio {sec.loo_tol_ratio:g} in {dtype}"
        + (f", proximal γ = {rep.proximal:g}" if rep.proximal else ""))
    loo = leave_one_out(ctx.problem, lam_star, train, val, gts, rs, out_dir=out / store, anchor=prox[1] if prox else None, sample=sample,
                        progress=lambda s: log("  " + s))
    if loo["units_computed"]:
        cache.done("the leave-one-out ground truth")
    on, truth, bad = loo["tasks"], loo["true_delta_f"], flags[loo["tasks"]].numpy()
    rankings = {"leave-one-out (re-optimised)": -truth, **{m: s[on] for m, s in suspicion.items()}}
    rows = [{"method": m, "auc": metrics.detection_auc(s.numpy(), bad), "auc_ci95": metrics.detection_auc_interval(s.numpy(), bad),
             "spearman_with_loo": metrics.spearman(s, -truth)}  # suspicion against the true harm −Δf
            for m, s in rankings.items()]
    for r in rows:
        log(f"  on the sample: {r['method']:<28} AUC {r['auc']:.3f} [{r['auc_ci95'][0]:.2f}, {r['auc_ci95'][1]:.2f}], "
            f"Spearman with the true harm {r['spearman_with_loo']:+.3f}")
    recorded = [x for x in loo["unit_seconds"] if x is not None]
    # stationarity reached, against λ*'s mean ‖g_i‖ (the reduced pools' differ by one task in n)
    max_ratio = loo["max_grad_norm"] / max(rep.task_grad_norm_after, 1e-300)
    if max_ratio > 2 * sec.loo_tol_ratio:
        warnings.append(f"leave-one-out re-optimisations stopped above their tolerance (worst ‖∇‖ / mean‖g_i‖ = {max_ratio:.2g} > "
                        f"{sec.loo_tol_ratio:g}): the true Δf carry optimiser error; raise [detection] loo_max_iter, or refine on the proximal "
                        "objective ([refine] proximal), whose re-optimisations converge fast")
        log("warning: " + warnings[-1])
    return {"tasks": on.tolist(), "corrupted": bad.astype(int).tolist(), "true_delta_f": truth.tolist(), "f_control": loo["f_control"],
            "max_grad_norm": loo["max_grad_norm"], "max_ratio": max_ratio, "warnings": warnings, "proximal": float(rep.proximal or 0.0), "tol_ratio": sec.loo_tol_ratio, "dtype": dtype,
            "seconds_per_reoptimisation": sum(recorded) / len(recorded) if recorded else None,
            "mean_delta_f_corrupted": float(truth[torch.from_numpy(bad.astype(bool))].mean()) if bad.any() else None,
            "mean_delta_f_clean": float(truth[torch.from_numpy(~bad.astype(bool))].mean()) if (~bad.astype(bool)).any() else None,
            "table": rows}
