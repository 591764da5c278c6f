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

from .. import Removal, edit_model, evaluate, metrics
from ..config import to_dict
from ..io import save_result, write_json
from ..pipeline import RunContext
from ..tasks import corrupt_tasks
from . import plots
from .common import METHODS, StageCache, _diag_json, _eval_json, _header, _image_tensors, _mark_proximal, _proximal_infl, _score_all, _train_and_refine, _with_curvature


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
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "ranking methods"})
    self_influence: bool = field(default=True, metadata={"help": "also rank by task-IF self-influence (one iHVP per task)"})
    edit_fractions: tuple[float, ...] = field(default=(0.1, 0.25, 0.4), metadata={"help": "fractions removed by closed-form edit (0 = the unedited model is added)"})
    direct_damping: float = field(default=1.0, metadata={"help": "damping of direct-IF's (indefinite) θ-space Hessian"})
    edit_max_iter: int = field(default=0, metadata={"help": "solver iterations of each edit (0 = [influence] max_iter)"})
    edit_methods: tuple[str, ...] = field(default=(), metadata={"help": "rankings whose top fractions are removed by edit (() = every ranking; "
                                                                         "the oracle edit is always made)"})


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
        r["timings"]["total_s"] = sum(v for k, v in r["timings"].items() if k != "total_s")
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
    log(f"detection: {int(flags.sum())} of {n} training tasks corrupted, kind {sec.kind} ({describe_kind(sec)})")

    lam_star, rep, tt = _train_and_refine(ctx, log, cache=cache)
    given, infl = infl, _proximal_infl(infl, rep, log)
    timings.update(tt)
    problem = ctx.problem
    dt = lam_star.dtype
    train, val, test = (ctx.tensors[k].to(dtype=dt) for k in ("train", "val", "test"))
    infl = _with_curvature(problem, lam_star, train, infl, out, log, timings, sec.methods, cache)

    t = time.perf_counter()
    scores = _score_all(problem, lam_star, train, val, infl, sec.methods, sec.direct_damping, log, sec.self_influence, cache)
    _mark_proximal(scores, rep, given)
    timings["scoring_s"] = time.perf_counter() - t

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
                     "seconds": (scores[m].diagnostics["seconds"] - scores[m].diagnostics.get("self_influence", {}).get("seconds", 0.0)
                                 if m in scores else scores["task-if"].diagnostics["self_influence"]["seconds"])})
        log(f"  {m:<15} recall@{at:.2f} {rows[-1]['recall@1.25rho']:.3f}  AUC {rows[-1]['auc']:.3f}")

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
    for m, f in plan:
        ids = oracle_ids if m.startswith("oracle") else rankings[m][: metrics.fraction_to_count(f, n)].tolist()
        te = time.perf_counter()
        ed = edit_model(problem, lam_star, train, Removal(tasks=[int(i) for i in ids]), edit_infl)
        secs = time.perf_counter() - te
        ev = evaluate(problem, ed.lam, test)
        edit_rows.append({"method": m, "fraction_removed": f, "removed": len(ids), "corrupted_removed": int(flags[ids].sum()) if ids else 0,
                          "test_acc": (ev.accuracy, ev.accuracy_ci95), "test_loss": ev.loss, "edit_s": secs,
                          "solver_residual": ed.diagnostics["solver_residual"]})
        log(f"  edit {m}, {len(ids)} tasks removed ({edit_rows[-1]['corrupted_removed']} corrupted): test accuracy {ev.accuracy:.3f} ± "
            f"{ev.accuracy_ci95:.3f} ({secs:.1f} s, solver residual {ed.diagnostics['solver_residual']:.1e})")
        if not m.startswith("oracle"):
            c = acc_curves.setdefault(m, ([0.0], [base.accuracy], [base.accuracy_ci95]))
            c[0].append(f); c[1].append(ev.accuracy); c[2].append(ev.accuracy_ci95)
    timings["editing_s"] = time.perf_counter() - t
    log(f"  unedited test accuracy {base.accuracy:.3f} ± {base.accuracy_ci95:.3f}; {len(edit_rows)} edits in {timings['editing_s']:.1f} s")

    # figures
    figs = {}
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
        "edits": edit_rows, "influence_diagnostics": {m: _diag_json(r) for m, r in scores.items()},
        "figures": figs, "timings": timings,
    }
