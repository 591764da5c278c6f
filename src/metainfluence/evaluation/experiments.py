"""Evidence experiments (SPEC §8, §9): mislabeled-task detection, the removal table, and the accuracy
of influence estimates against leave-one-out re-optimisation.

    run_experiment(name, config, quick, out, log) -> dict     one experiment, results in ``out``
    report_run(run_dir) -> Path                                 report.md + report.html of a run folder

A config file (TOML/YAML/JSON) holds the run's sections (``[data] [model] [inner] [objective]
[train] [refine]``, as for ``metainfluence train``), an ``[influence]`` section (hessian, solver,
damping, …) and one section named after the experiment (``[detection]``, ``[removal]`` or
``[estimates]``). ``quick`` replaces the run sections by a small embedded-digits run (sinusoid for
``estimates``) that finishes in about a minute on two CPU cores.

Every run folder holds ``results.json`` (settings, seeds, sign convention, timings, all numbers),
``results.safetensors`` (score vectors, rankings, corruption flags), PNG figures, and after
:func:`report_run` ``report.md`` / ``report.html``. Files are written atomically.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import apply_overrides, read_config_file, to_dict
from ..errors import SettingsError
from ..influence.editing import Removal, edit_model
from ..influence.results import SIGN_CONVENTION, InfluenceSettings
from ..influence.task_if import task_influence
from ..io import read_json, save_result, write_json
from ..meta.evaluate import evaluate
from ..meta.models import ModelSettings
from ..meta.refine import RefineSettings, refine
from ..meta.train import TrainSettings, meta_train
from . import metrics, plots
from .report import write_report

EXPERIMENTS = ("detection", "removal", "estimates")
METHODS = ("task-if", "direct-if", "tracin", "loss", "random")

# The paper's Table 1 (ICLR version, SPEC §9): accuracy after removing 40% harmful data, wall time (s).
PAPER_TABLE1 = [
    {"method": "retrain", "omniglot_acc": 0.7908, "omniglot_time_s": 316.74, "miniimagenet_acc": 0.3071, "miniimagenet_time_s": 682.56},
    {"method": "task-IF", "omniglot_acc": 0.7804, "omniglot_time_s": 65.69, "miniimagenet_acc": 0.2668, "miniimagenet_time_s": 74.63},
    {"method": "direct-IF", "omniglot_acc": 0.5422, "omniglot_time_s": 7.46, "miniimagenet_acc": 0.2214, "miniimagenet_time_s": 10.24},
    {"method": "EK-FAC IF", "omniglot_acc": 0.4872, "omniglot_time_s": 631.90, "miniimagenet_acc": 0.1868, "miniimagenet_time_s": 1937.42},
    {"method": "TracIn", "omniglot_acc": 0.7690, "omniglot_time_s": 375.42, "miniimagenet_acc": 0.2592, "miniimagenet_time_s": 1154.16},
    {"method": "instance-IF (train)", "omniglot_acc": 0.7686, "omniglot_time_s": 4.49, "miniimagenet_acc": 0.2854, "miniimagenet_time_s": 7.17},
    {"method": "instance-IF (val)", "omniglot_acc": 0.7790, "omniglot_time_s": 5.53, "miniimagenet_acc": 0.2767, "miniimagenet_time_s": 7.47},
]


# --------------------------------------------------------------------------- settings
@dataclass
class DetectionSettings:
    rho_task: float = field(default=0.2, metadata={"help": "fraction of training tasks corrupted"})
    rho_tasks: tuple[float, ...] = field(default=(), metadata={"help": "sweep: one full run per value (sub-folders rho_<value>), replaces rho_task"})
    rho_label: float = field(default=0.8, metadata={"help": "fraction of labels flipped inside a corrupted task"})
    where: str = field(default="both", metadata={"help": "both | support | query"})
    corruption_seed: int = field(default=0, metadata={"help": "seed of the corruption"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "ranking methods"})
    self_influence: bool = field(default=True, metadata={"help": "also rank by task-IF self-influence (one iHVP per task)"})
    edit_fractions: tuple[float, ...] = field(default=(0.1, 0.25, 0.4), metadata={"help": "fractions removed by closed-form edit (0 = the unedited model is added)"})
    direct_damping: float = field(default=1.0, metadata={"help": "damping of direct-IF's (indefinite) θ-space Hessian"})
    edit_max_iter: int = field(default=0, metadata={"help": "solver iterations of each edit (0 = [influence] max_iter)"})


@dataclass
class RemovalSettings:
    fraction: float = field(default=0.4, metadata={"help": "fraction of tasks removed (top harmful)"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "ranking methods"})
    retrain: bool = field(default=True, metadata={"help": "also retrain from scratch on the remaining tasks"})
    instance_levels: tuple[str, ...] = field(default=("support", "query"), metadata={"help": "also remove the top fraction of examples of these levels by instance-IF"})
    retrain_methods: tuple[str, ...] = field(default=METHODS + ("instance-if (support)", "instance-if (query)"), metadata={"help": "methods whose removal is also retrained from scratch (the paper's 'retrain' row uses task-IF's ranking)"})
    retrain_refine: bool = field(default=True, metadata={"help": "retraining includes the refine stage (as the full model did)"})
    reoptimise_methods: tuple[str, ...] = field(default=("task-if",), metadata={"help": "methods whose removal is also re-optimised from λ* (refine on the kept items: the optimum the edit approximates, without retraining's path noise)"})
    direct_damping: float = field(default=1.0, metadata={"help": "damping of direct-IF's θ-space Hessian"})
    edit_hessian: str = field(default="", metadata={"help": "Hessian of the closed-form edit ('' = [influence] hessian)"})
    edit_solver: str = field(default="", metadata={"help": "iHVP solver of the edit ('' = [influence] solver)"})
    edit_max_iter: int = field(default=0, metadata={"help": "solver iterations of the edit (0 = [influence] max_iter)"})


@dataclass
class EstimatesSettings:
    n_tasks: int = field(default=20, metadata={"help": "training tasks (all are left out)"})
    n_val: int = field(default=20, metadata={"help": "validation tasks (the measurement)"})
    hidden: tuple[int, ...] = field(default=(8, 8), metadata={"help": "tanh MLP widths"})
    weight_decay: float = field(default=0.1, metadata={"help": "μ"})
    inner_lr: float = field(default=0.01, metadata={"help": "inner lr (1 step)"})
    adam_steps: int = field(default=500, metadata={"help": "Adam steps before Newton refine"})
    seed: int = field(default=0, metadata={"help": "model seed"})
    hessians: tuple[str, ...] = field(default=("exact", "gauss-newton", "gamma", "fisher"), metadata={"help": "Hessian kinds for task-IF"})
    solvers: tuple[str, ...] = field(default=("explicit", "cg", "neumann", "lowrank"), metadata={"help": "iHVP solvers"})
    damping: float = field(default=1e-3, metadata={"help": "δ of task-IF solves"})
    direct_damping: float = field(default=1.0, metadata={"help": "δ of direct-IF (its Hessian is indefinite)"})
    lowrank_rank: int = field(default=20, metadata={"help": "eigenpairs for the lowrank solver"})
    neumann_depths: tuple[int, ...] = field(default=(10, 100, 1000), metadata={"help": "Neumann depth ablation"})
    dampings: tuple[float, ...] = field(default=(1e-3, 1e-2, 1e-1, 1.0), metadata={"help": "damping ablation"})
    lds_subsets: int = field(default=20, metadata={"help": "LDS subsets (0 = skip)"})


def _run_settings_cls():
    from ..runs import RunSettings

    return RunSettings


_SECTION_CLS = {"detection": DetectionSettings, "removal": RemovalSettings, "estimates": EstimatesSettings}


def _quick_run(name: str):
    """A small digits run: ≈ 10–20 s of training and refine on two busy cores."""
    from ..runs import DataSettings, ObjectiveSettings, RunSettings

    return RunSettings(
        data=DataSettings(dataset="digits", n_way=5, k_shot=1, q_query=5, train_tasks=60, val_tasks=40, test_tasks=200),
        model=ModelSettings(hidden=(32,), activation="tanh"),
        objective=ObjectiveSettings(weight_decay=1e-2),
        train=TrainSettings(meta_batch=10, steps=250, lr=5e-3, checkpoint_every=0, log_every=50),
        refine=RefineSettings(tol=1e-5, max_iter=600),
    )


def load_experiment_settings(name: str, config: str | None, quick: bool):
    """(RunSettings, InfluenceSettings, section settings) of an experiment from a config file."""
    if name not in EXPERIMENTS:
        raise SettingsError(f"unknown experiment {name!r}; use one of {', '.join(EXPERIMENTS)}")
    RunSettings = _run_settings_cls()
    run = _quick_run(name) if quick else RunSettings()
    # gauss-newton: positive semi-definite, so CG is safe on corrupted pools, where the exact total
    # Hessian of a (locally) refined MAML objective is often indefinite (measured: CG met negative curvature)
    infl = InfluenceSettings(hessian="gauss-newton", solver="cg", damping=1e-3, tol=1e-6, max_iter=300)
    sec = _SECTION_CLS[name]()
    if quick:
        if name == "detection":
            sec = dataclasses.replace(sec, edit_fractions=(0.25,))
        if name == "removal":
            sec = dataclasses.replace(sec, retrain_methods=("task-if", "random", "instance-if (support)"))
            run = dataclasses.replace(run, refine=RefineSettings(tol=1e-5, max_iter=250),
                                      train=dataclasses.replace(run.train, steps=500))
        if name == "estimates":
            sec = dataclasses.replace(sec, lds_subsets=0, neumann_depths=(10, 100), solvers=("explicit", "cg"),
                                      dampings=(1e-3, 1e-1), lowrank_rank=10)
    if config is not None:
        data = read_config_file(config)
        src = f"config {config}"
        own = data.pop(name, None) or {}
        inf = data.pop("influence", None) or {}
        for other in EXPERIMENTS:
            data.pop(other, None)
        if not quick:  # --quick keeps its small run but takes the experiment's own settings
            run = apply_overrides(run, data, source=src)
        sec = apply_overrides(sec, own, source=src)
        infl = apply_overrides(infl, inf, source=src)
    run.validate()
    infl.validate()
    for m in getattr(sec, "methods", ()):
        if m not in METHODS:
            raise SettingsError(f"unknown method {m!r} in [{name}] methods; use some of {', '.join(METHODS)}")
    if name == "removal":
        bad = [lv for lv in sec.instance_levels if lv not in ("support", "query")]
        if bad:
            raise SettingsError(f"unknown instance level {bad[0]!r} in [removal] instance_levels; use support and/or query")
        known = set(sec.methods) | {f"instance-if ({lv})" for lv in sec.instance_levels}
        for key in ("retrain_methods", "reoptimise_methods"):
            bad = [m for m in getattr(sec, key) if m not in known]
            if bad:
                raise SettingsError(f"[removal] {key} names {bad[0]!r}, which is not ranked in this run; use some of {', '.join(sorted(known))}")
    return run, infl, sec


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


def run_experiment(name: str, config: str | None = None, quick: bool = False, out: str = "runs/experiment",
                   log: Callable[[str], None] = print) -> dict:
    """Run experiment ``name`` (detection | removal | estimates); results go to ``out``.

    Returns the results dict that is also written to ``out/results.json``."""
    run, infl, sec = load_experiment_settings(name, config, quick)
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fn = {"detection": _detection, "removal": _removal, "estimates": _estimates}[name]
    result = fn(run, infl, sec, out_p, quick, log)
    result["timings"]["total_s"] = time.perf_counter() - t0
    write_json(out_p / "results.json", result)
    log(f"{name}: finished in {result['timings']['total_s']:.1f} s; results in {out_p}/results.json")
    return result


# --------------------------------------------------------------------------- shared pieces
def _train_and_refine(ctx, log, w_train=None) -> tuple[torch.Tensor, Any, dict]:
    from ..runs import refine_stage, train_stage

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


# --------------------------------------------------------------------------- detection
def _detection(run, infl, sec: DetectionSettings, out: Path, quick: bool, log) -> dict:
    """One run at ``rho_task``, or with ``rho_tasks`` one run per value in ``out/rho_<value>``: the
    first value's result is the main one (its figures are referenced from the sub-folder) and a
    summary row per method × ρ_task is added."""
    if not sec.rho_tasks:
        return _detection_one(run, infl, sec, out, quick, log)
    results = []
    for rho in sec.rho_tasks:
        sub = out / f"rho_{rho:g}"
        sub.mkdir(parents=True, exist_ok=True)
        log(f"detection sweep: ρ_task = {rho:g} → {sub}")
        r = _detection_one(run, infl, dataclasses.replace(sec, rho_task=float(rho), rho_tasks=()), sub, quick, log)
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


def _detection_one(run, infl, sec: DetectionSettings, out: Path, quick: bool, log) -> dict:
    from ..runs import RunContext, pool_tensors, prepare_run
    from ..tasks.corruption import corrupt_labels

    timings: dict[str, float] = {}
    t = time.perf_counter()
    ctx = prepare_run(run, out, log=log)
    pools = dict(ctx.pools)
    pools["train"] = corrupt_labels(pools["train"], sec.rho_task, sec.rho_label, sec.where, seed=sec.corruption_seed)
    pools["train"].save(out / "pools" / "train")  # the corrupted pool, with its recorded truth
    tensors, std = pool_tensors(pools, ctx.dataset, run.data)
    ctx = RunContext(run, ctx.dataset, pools, tensors, ctx.problem, out, std)
    flags = pools["train"].corrupted_tasks.bool()
    n = len(flags)
    timings["data_s"] = time.perf_counter() - t
    log(f"detection: {int(flags.sum())} of {n} training tasks corrupted (ρ_label {sec.rho_label}, {sec.where})")

    lam_star, rep, tt = _train_and_refine(ctx, log)
    timings.update(tt)
    problem = ctx.problem
    dt = lam_star.dtype
    train, val, test = (ctx.tensors[k].to(dtype=dt) for k in ("train", "val", "test"))

    t = time.perf_counter()
    scores = _score_all(problem, lam_star, train, val, infl, sec.methods, sec.direct_damping, log, sec.self_influence)
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
    edit_infl = dataclasses.replace(infl, method="task-if", self_influence=False, **({"max_iter": sec.edit_max_iter} if sec.edit_max_iter else {}))
    oracle_ids = torch.nonzero(flags).flatten().tolist()
    plan = [(m, f) for m in suspicion for f in sec.edit_fractions if f > 0] + [("oracle (true corrupted)", sec.rho_task)]
    for m, f in plan:
        ids = oracle_ids if m.startswith("oracle") else rankings[m][: metrics.fraction_to_count(f, n)].tolist()
        te = time.perf_counter()
        ed = edit_model(problem, lam_star, train, Removal(tasks=[int(i) for i in ids]), edit_infl)
        secs = time.perf_counter() - te
        ev = evaluate(problem, ed.lam, test)
        edit_rows.append({"method": m, "fraction_removed": f, "removed": len(ids), "corrupted_removed": int(flags[ids].sum()) if ids else 0,
                          "test_acc": (ev.accuracy, ev.accuracy_ci95), "test_loss": ev.loss, "edit_s": secs,
                          "solver_residual": ed.diagnostics["solver_residual"]})
        if not m.startswith("oracle"):
            c = acc_curves.setdefault(m, ([0.0], [base.accuracy], [base.accuracy_ci95]))
            c[0].append(f); c[1].append(ev.accuracy); c[2].append(ev.accuracy_ci95)
    timings["editing_s"] = time.perf_counter() - t
    log(f"  unedited test accuracy {base.accuracy:.3f} ± {base.accuracy_ci95:.3f}; {len(edit_rows)} edits in {timings['editing_s']:.1f} s")

    # figures
    figs = {}
    figs["recall"] = plots.recall_curves({m: c for m, c in curves.items()}, out / "recall_curves.png", corrupted_fraction=sec.rho_task,
                                         title=f"Mislabeled-task detection ({run.data.dataset}, ρ_task={sec.rho_task}, ρ_label={sec.rho_label})").name
    figs["accuracy"] = plots.accuracy_vs_removed(acc_curves, out / "accuracy_vs_removed.png",
                                                 title="Meta-test accuracy after removing the top-ranked tasks (closed-form edit)").name
    if "task-if" in rankings and ctx.dataset is not None:
        top = rankings["task-if"][:4].tolist()
        x, given, true, ns, ids = _image_tensors(pools["train"], ctx.dataset, top)
        figs["harmful_tasks"] = plots.task_image_grid(x, out / "harmful_tasks.png", given_labels=given, true_labels=true, n_support=ns, task_ids=ids,
                                                      title="Most harmful training tasks by task-IF (red = flipped label)").name

    tensors = {"corrupted": flags.to(torch.uint8), **{f"suspicion.{m}": s for m, s in suspicion.items()},
               **{f"recall.{m}": torch.from_numpy(c[1]) for m, c in curves.items()}, "fractions": torch.from_numpy(fractions)}
    header = _header("detection", run, infl, sec, quick)
    save_result(out / "results", tensors, {**header, "note": "suspicion = −score (high = inspect first); for 'task-if (self)' the self-influence"})
    return {
        **header,
        "n_tasks": n, "n_corrupted": int(flags.sum()), "corrupted_task_ids": [int(i) for i in pools["train"].task_ids[flags]],
        "refine": rep.to_json(), "unedited_test": _eval_json(base),
        "detection": rows, "recall_curves": {m: {"fractions": c[0].tolist(), "recall": c[1].tolist()} for m, c in curves.items()},
        "edits": edit_rows, "influence_diagnostics": {m: _diag_json(r) for m, r in scores.items()},
        "figures": figs, "timings": timings,
    }


# --------------------------------------------------------------------------- removal
def _instance_removals(problem, lam, train, val, infl, levels, fraction, log, task_if=None) -> list[tuple[str, float, Removal]]:
    """(name, seconds, Removal) removing the top ``fraction`` most harmful examples of each level by instance-IF.

    With ``task_if`` (a task-IF result of the same settings) its iHVP s = (H+δI)⁻¹∇f is reused and its
    solve time is charged to every level, so the seconds stay those of a stand-alone computation."""
    from ..influence.instance_if import instance_influence

    reuse = task_if is not None and "s" in task_if.extra
    out = []
    for level in levels:
        t = time.perf_counter()
        r = instance_influence(problem, lam, train, val, level, dataclasses.replace(infl, method="task-if", self_influence=False),
                               s=task_if.extra["s"] if reuse else None)
        secs = time.perf_counter() - t + (task_if.diagnostics["timings_s"]["ihvp"] if reuse else 0.0)
        m = r.scores.numel()
        mask = torch.zeros(m, dtype=torch.bool)
        mask[r.ranking(harmful_first=True)[: metrics.fraction_to_count(fraction, m)]] = True
        out.append((f"instance-if ({level})", secs, Removal(**{level: mask.reshape(r.scores.shape)})))
        log(f"  instance-if ({level}) scores in {secs:.2f} s" + (" (task-IF's iHVP reused, its time included)" if reuse else ""))
    return out


def _retrain(problem, run, pool, removal: Removal, refine_too: bool):
    """Meta-train from the same initialisation, seed and schedule without the removed items (then refine)."""
    from ..runs import _stage_settings

    keep = torch.ones(len(pool), dtype=torch.bool)
    keep[list(removal.tasks)] = False
    rows = torch.nonzero(keep).flatten()
    sub = pool.subset(rows)
    ew = None
    if removal.support is not None or removal.query is not None:
        like = torch.zeros((), dtype=torch.float64)
        _, v, u = removal.weights(problem, like, pool)
        ew = (v[rows], u[rows])
    lam0 = problem.init_params(torch.float32)
    lam, _ = meta_train(problem, lam0, sub, run.train, progress=False, run_settings=_stage_settings(run), example_weights=ew)
    if refine_too:
        lam, _ = refine(problem, lam, sub, run.refine, example_weights=ew)
    return lam


def _removal(run, infl, sec: RemovalSettings, out: Path, quick: bool, log) -> dict:
    from ..runs import prepare_run

    timings: dict[str, float] = {}
    t = time.perf_counter()
    ctx = prepare_run(run, out, log=log)
    timings["data_s"] = time.perf_counter() - t
    lam_star, rep, tt = _train_and_refine(ctx, log)
    timings.update(tt)
    full_train_s = tt["train_s"] + tt["refine_s"]
    problem = ctx.problem
    dt = lam_star.dtype
    train, val, test = (ctx.tensors[k].to(dtype=dt) for k in ("train", "val", "test"))
    n = len(train)
    k_remove = metrics.fraction_to_count(sec.fraction, n)
    base = evaluate(problem, lam_star, test)
    log(f"removal: full model test accuracy {base.accuracy:.4f} ± {base.accuracy_ci95:.4f}; removing {k_remove} of {n} tasks per method")

    t = time.perf_counter()
    scores = _score_all(problem, lam_star, train, val, infl, sec.methods, sec.direct_damping, log)
    plans = [(m, r.diagnostics["seconds"], Removal(tasks=r.ranking(harmful_first=True)[:k_remove].tolist())) for m, r in scores.items()]
    plans += _instance_removals(problem, lam_star, train, val, infl, sec.instance_levels, sec.fraction, log, task_if=scores.get("task-if"))
    timings["scoring_s"] = time.perf_counter() - t
    edit_infl = dataclasses.replace(infl, method="task-if", self_influence=False,
                                    **{k: v for k, v in (("hessian", sec.edit_hessian), ("solver", sec.edit_solver), ("max_iter", sec.edit_max_iter)) if v})
    rows = [{"method": "none (full pool)", "path": "-", "removed": 0, "test_acc": (base.accuracy, base.accuracy_ci95), "test_loss": base.loss,
             "score_s": 0.0, "path_s": full_train_s, "total_s": full_train_s}]
    removed_ids: dict[str, Any] = {}
    for m, score_s, removal in plans:
        cnt = removal.count()
        size = cnt["tasks"] or cnt["support_examples"] or cnt["query_examples"]
        unit = "tasks" if cnt["tasks"] else "examples"
        if removal.tasks:
            removed_ids[m] = [int(i) for i in ctx.pools["train"].task_ids[list(removal.tasks)]]
        else:
            mask = removal.support if removal.support is not None else removal.query
            removed_ids[m] = [[int(ctx.pools["train"].task_ids[i]), int(j)] for i, j in torch.nonzero(mask).tolist()]
        te = time.perf_counter()
        ed = edit_model(problem, lam_star, train, removal, edit_infl)
        edit_s = time.perf_counter() - te
        ev = evaluate(problem, ed.lam, test)
        rows.append({"method": m, "path": "edit", "removed": size, "unit": unit, "test_acc": (ev.accuracy, ev.accuracy_ci95), "test_loss": ev.loss,
                     "score_s": score_s, "path_s": edit_s, "total_s": score_s + edit_s, "solver_residual": ed.diagnostics.get("solver_residual")})
        log(f"  {m:<9} edit:    acc {ev.accuracy:.4f} ± {ev.accuracy_ci95:.4f}  ({edit_s:.2f} s + scoring {score_s:.2f} s)")
        if m in sec.reoptimise_methods:
            w, v, u = removal.weights(problem, lam_star, train)
            tr = time.perf_counter()
            lam_o, rep_o = refine(problem, lam_star, train, run.refine, w=w, example_weights=(v, u))
            reopt_s = time.perf_counter() - tr
            ev_o = evaluate(problem, lam_o, test)
            g_star = float(problem.meta_gradient(lam_star, train, w, v, u).norm())
            g_edit = float(problem.meta_gradient(ed.lam, train, w, v, u).norm())
            rows.append({"method": m, "path": "re-optimise from λ*", "removed": size, "unit": unit, "test_acc": (ev_o.accuracy, ev_o.accuracy_ci95),
                         "test_loss": ev_o.loss, "score_s": score_s, "path_s": reopt_s, "total_s": score_s + reopt_s,
                         "reduced_grad_at_lam_star": g_star, "reduced_grad_after_edit": g_edit, "reduced_grad_after_reoptimise": rep_o.grad_norm_after,
                         "edit_cosine_to_reoptimised": metrics.cosine((ed.lam - lam_star).double(), (lam_o - lam_star).double()),
                         "edit_norm_ratio": float((ed.lam - lam_star).norm() / (lam_o - lam_star).norm().clamp_min(1e-300))})
            log(f"  {m:<9} re-optimise from λ*: acc {ev_o.accuracy:.4f} ± {ev_o.accuracy_ci95:.4f} ({reopt_s:.2f} s); reduced ‖∇F‖ λ* {g_star:.3g}, "
                f"edit {g_edit:.3g}; cos(edit Δλ, re-optimised Δλ) {rows[-1]['edit_cosine_to_reoptimised']:.3f}")
        if sec.retrain and m in sec.retrain_methods:
            tr = time.perf_counter()
            lam_r = _retrain(problem, run, ctx.tensors["train"], removal, sec.retrain_refine)
            retrain_s = time.perf_counter() - tr
            ev_r = evaluate(problem, lam_r, test)
            rows.append({"method": m, "path": "retrain", "removed": size, "unit": unit, "test_acc": (ev_r.accuracy, ev_r.accuracy_ci95), "test_loss": ev_r.loss,
                         "score_s": score_s, "path_s": retrain_s, "total_s": score_s + retrain_s})
            log(f"  {m:<9} retrain: acc {ev_r.accuracy:.4f} ± {ev_r.accuracy_ci95:.4f}  ({retrain_s:.2f} s)")
    timings["paths_s"] = time.perf_counter() - t - timings["scoring_s"]
    # the paper's headline ratio: retraining time over closed-form edit time (scoring + edit), per method
    # (and the re-optimisation from λ*, the optimum the edit approximates)
    keys = {"retrain": ("retrain_over_edit", "acc_gap_points"), "re-optimise from λ*": ("reoptimise_over_edit", "reoptimise_acc_gap_points")}
    speedups: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["path"] in keys:
            ratio, gap = keys[r["path"]]
            e = next(x for x in rows if x["method"] == r["method"] and x["path"] == "edit")
            speedups.setdefault(r["method"], {}).update({ratio: r["path_s"] / e["total_s"], gap: 100 * (r["test_acc"][0] - e["test_acc"][0])})

    figs = {}
    if ctx.dataset is not None and "task-if" in scores:
        top = scores["task-if"].ranking()[:4].tolist()
        x, given, true, ns, ids = _image_tensors(ctx.pools["train"], ctx.dataset, top)
        figs["harmful_tasks"] = plots.task_image_grid(x, out / "harmful_tasks.png", given_labels=given, n_support=ns, task_ids=ids,
                                                      title="Most harmful training tasks by task-IF").name
    acc = {}
    for r in rows[1:]:
        if r["path"] == "edit":
            acc[r["method"]] = ([0.0, sec.fraction], [base.accuracy, r["test_acc"][0]], [base.accuracy_ci95, r["test_acc"][1]])
    figs["accuracy"] = plots.accuracy_vs_removed(acc, out / "accuracy_vs_removed.png", title=f"Test accuracy after removing the top {sec.fraction:.0%} harmful tasks (edit)").name

    header = _header("removal", run, infl, sec, quick)
    save_result(out / "results", {f"scores.{m}": r.scores for m, r in scores.items()}, {**header, "removed_ids": removed_ids})
    return {**header, "n_tasks": n, "removed_per_method": k_remove, "refine": rep.to_json(), "full_test": _eval_json(base),
            "table": rows, "edit_vs_retrain": speedups, "removed_ids": removed_ids, "paper_table1": PAPER_TABLE1,
            "influence_diagnostics": {m: _diag_json(r) for m, r in scores.items()}, "figures": figs, "timings": timings}


# --------------------------------------------------------------------------- estimates
def _estimates(run, infl, sec: EstimatesSettings, out: Path, quick: bool, log) -> dict:
    from ..meta.curvature import TotalHessian
    from ..influence.solvers import materialize
    from .groundtruth import GroundTruthSettings, lds_ground_truth, leave_one_out, validation_loss

    timings: dict[str, float] = {}
    t = time.perf_counter()
    from .reference import sinusoid_reference

    problem, lam, train, val, nrep = sinusoid_reference(sec.n_tasks, sec.n_val, tuple(sec.hidden), sec.weight_decay, sec.inner_lr,
                                                        sec.adam_steps, seed=sec.seed)
    timings["train_s"] = time.perf_counter() - t
    log(f"estimates: sinusoid MAML, {sec.n_tasks} tasks, {problem.dim} parameters; Newton refine ‖∇F‖ = {nrep['grad_norm']:.2g}")

    t = time.perf_counter()
    gts = GroundTruthSettings(n_loo=sec.n_tasks, method="newton", n_subsets=sec.lds_subsets)
    rs = RefineSettings(tol=1e-9)
    gt = leave_one_out(problem, lam, train, val, gts, rs, out_dir=out / "groundtruth_loo")
    timings["loo_s"] = time.perf_counter() - t
    lds_gt = None
    lds_error = None
    if sec.lds_subsets:
        t = time.perf_counter()
        # half-pool subsets move λ far from λ*: Newton steps from λ* were rejected there (measured), so
        # the LDS re-optimisation uses the refine stage's L-BFGS
        gts_lds = dataclasses.replace(gts, method="lbfgs")
        try:
            lds_gt = lds_ground_truth(problem, lam, train, val, gts_lds, RefineSettings(tol=1e-8, max_iter=1000), out_dir=out / "groundtruth_lds")
        except Exception as exc:  # recorded in the results, the rest of the experiment still runs
            lds_error = f"{type(exc).__name__}: {exc}"
            log(f"LDS failed: {lds_error}")
        timings["lds_s"] = time.perf_counter() - t
    f_full = validation_loss(problem, lam, val)
    true = gt["true_delta_f"]
    idx = gt["tasks"]

    def score(s: InfluenceSettings):
        tt = time.perf_counter()
        r = task_influence(problem, lam, train, val, s)
        return r, time.perf_counter() - tt

    rows = []
    best = {}
    t = time.perf_counter()
    configs: list[tuple[str, str, str, float]] = []
    for h in sec.hessians:
        for sv in sec.solvers:
            configs.append(("task-if", h, sv, sec.damping))
        if h == "fisher":
            configs.append(("task-if", h, "woodbury", sec.damping))
    for sv in sec.solvers:
        configs.append(("direct-if", "direct", sv, sec.direct_damping))
    configs += [("tracin", "-", "-", 0.0), ("loss", "-", "-", 0.0), ("random", "-", "-", 0.0)]
    for m, h, sv, d in configs:
        s = dataclasses.replace(infl, method=m, hessian=h if h not in ("-", "direct") else "exact",
                                solver=sv if sv != "-" else "cg", damping=d, lowrank_rank=min(sec.lowrank_rank, problem.dim),
                                neumann_depth=1000, stationarity_warn=1.0)
        try:
            r, secs = score(s)
        except Exception as exc:  # a solver that cannot handle this operator: recorded, not fatal
            rows.append({"method": m, "hessian": h, "solver": sv, "damping": d, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        sc = r.scores[idx]
        c = metrics.loo_correlation(sc, true)
        row = {"method": m, "hessian": h, "solver": sv, "damping": d, "spearman": c["spearman"], "pearson": c["pearson"], "seconds": secs}
        if lds_gt is not None:
            pred = metrics.lds_predictions(r.scores, f_full, lds_gt["masks"])
            row["lds"] = metrics.lds(pred, lds_gt["true_f"])
        res_ = r.diagnostics.get("solver", {}).get("residual")
        if res_ is not None:
            row["residual"] = res_
        rows.append(row)
        key = m if m != "task-if" else f"task-if/{h}"
        if sv in ("explicit", "-") and key not in best:
            best[key] = sc
    timings["scores_s"] = time.perf_counter() - t
    for r in rows:
        if "spearman" in r:
            log(f"  {r['method']:<9} {r['hessian']:<12} {r['solver']:<9} spearman {r['spearman']:+.3f} pearson {r['pearson']:+.3f}")

    # direction and size of the predicted parameter change Δλ_k = (H+δI)⁻¹g_k/n against λ_{-k} − λ*
    from ..influence.task_if import task_parameter_changes

    t = time.perf_counter()
    true_dl = gt["true_delta_lam"].double()
    dl_rows = []
    for h in sec.hessians:
        s = dataclasses.replace(infl, method="task-if", hessian=h, solver="explicit", damping=sec.damping, stationarity_warn=1.0)
        pred, _ = task_parameter_changes(problem, lam, train, s)
        pred = pred[idx].double()
        cos = metrics.cosine(pred, true_dl)
        rel = (pred - true_dl).norm(dim=1) / true_dl.norm(dim=1).clamp_min(1e-300)
        dl_rows.append({"hessian": h, "cosine_mean": float(np.nanmean(cos)), "cosine_min": float(np.nanmin(cos)),
                        "rel_error_median": float(rel.median()), "norm_ratio_median": float((pred.norm(dim=1) / true_dl.norm(dim=1).clamp_min(1e-300)).median())})
        log(f"  Δλ {h:<12} cosine mean {dl_rows[-1]['cosine_mean']:.3f} min {dl_rows[-1]['cosine_min']:.3f}")
    timings["delta_lambda_s"] = time.perf_counter() - t

    # operator error of the Hessian surrogates against the exact total Hessian
    t = time.perf_counter()
    H = {k: materialize(TotalHessian(problem, lam, train, k, fisher_samples=infl.fisher_samples, seed=infl.seed)) for k in ("exact", "gauss-newton", "gamma", "fisher", "direct")}
    ex = H["exact"]
    op_rows = []
    for k, M in H.items():
        ev = torch.linalg.eigvalsh(M)
        op_rows.append({"hessian": k, "rel_fro_error": float((M - ex).norm() / ex.norm()), "min_eig": float(ev[0]), "max_eig": float(ev[-1]),
                        "negative_eigs": int((ev < 0).sum())})
    op_rows[0]["note"] = f"‖H_exact‖_F = {float(ex.norm()):.4g}"
    timings["operators_s"] = time.perf_counter() - t

    # Neumann depth × damping ablation (exact Hessian)
    t = time.perf_counter()
    abl = []
    for d in sec.dampings:
        sref = dataclasses.replace(infl, method="task-if", hessian="exact", solver="explicit", damping=d, stationarity_warn=1.0)
        r_ex, _ = score(sref)
        c_ex = metrics.loo_correlation(r_ex.scores[idx], true)
        abl.append({"solver": "explicit", "damping": d, "depth": 0, "spearman": c_ex["spearman"], "pearson": c_ex["pearson"], "rel_score_error": 0.0})
        for J in sec.neumann_depths:
            s = dataclasses.replace(sref, solver="neumann", neumann_depth=J, tol=1e-300)  # run all J terms
            r, _ = score(s)
            c = metrics.loo_correlation(r.scores[idx], true)
            err = float((r.scores - r_ex.scores).norm() / r_ex.scores.norm().clamp_min(1e-300))
            abl.append({"solver": "neumann", "damping": d, "depth": J, "spearman": c["spearman"], "pearson": c["pearson"], "rel_score_error": err})
    timings["ablation_s"] = time.perf_counter() - t

    figs = {}
    if "task-if/exact" in best:
        figs["scatter_task_if"] = plots.scatter_predicted_vs_actual(best["task-if/exact"], true, out / "scatter_task_if_exact.png",
                                                                    title="task-IF (exact Hessian, explicit) vs leave-one-out",
                                                                    xlabel="predicted Δf (score)", ylabel="actual Δf (LOO)").name
    if "direct-if" in best:
        figs["scatter_direct_if"] = plots.scatter_predicted_vs_actual(best["direct-if"], true, out / "scatter_direct_if.png",
                                                                      title="direct-IF vs leave-one-out", xlabel="predicted Δf", ylabel="actual Δf (LOO)").name

    header = _header("estimates", None, infl, sec, quick)
    header["settings"]["problem"] = problem.settings_json()
    save_result(out / "results", {"true_delta_f": true, "loo_tasks": idx, **{f"scores.{k}": v for k, v in best.items()}}, header)
    return {**header, "n_params": problem.dim, "refine_grad_norm": nrep["grad_norm"], "loo_max_grad_norm": gt["max_grad_norm"],
            "f_full": f_full, "loo": {"tasks": idx.tolist(), "true_delta_f": true.tolist()},
            "lds_subsets": sec.lds_subsets, "lds_error": lds_error, "lds_reoptimiser": "lbfgs (tol 1e-8)", "correlations": rows,
            "parameter_change": dl_rows, "operator_error": op_rows, "neumann_damping_ablation": abl,
            "figures": figs, "timings": timings}


# --------------------------------------------------------------------------- report
def _acc(v) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def report_run(run_dir) -> Path:
    """Render ``run_dir/results.json`` (tables) and its figures into ``report.md`` and ``report.html``."""
    d = Path(run_dir)
    res = read_json(d / "results.json", what="experiment results")
    name = res.get("experiment")
    if name not in EXPERIMENTS:
        raise SettingsError(f"{d}/results.json is not an experiment result; pass a folder written by `metainfluence experiment`")
    figs = res.get("figures", {})
    img = lambda key, cap: [(figs[key], cap)] if key in figs and (d / figs[key]).is_file() else []
    tm = res.get("timings", {})
    timing_p = "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()) + f". Machine: {res['machine']['platform']}, {res['machine']['cpu_count']} CPUs, torch {res['machine']['torch']} ({res['machine']['torch_threads']} threads)."
    settings_p = f"Settings and seeds are in `results.json` (seeds: {res.get('seeds')}). Quick run: {res.get('quick')}."
    secs: list[dict] = []
    if name == "detection":
        s = res["settings"]["detection"]
        data = res["settings"]["run"]["data"]
        secs.append({"heading": "Setup", "paragraphs": [
            f"{data['dataset']} {data['n_way']}-way {data['k_shot']}-shot, {res['n_tasks']} training tasks of which {res['n_corrupted']} "
            f"(ρ_task = {s['rho_task']}) have {s['rho_label']:.0%} of their labels ({s['where']}) flipped to another class of the task. "
            f"Refine: ‖∇F‖ {res['refine']['grad_norm_before']:.3g} → {res['refine']['grad_norm_after']:.3g}. "
            f"Unedited meta-test accuracy {res['unedited_test']['accuracy']:.4f} ± {res['unedited_test']['accuracy_ci95']:.4f} ({res['unedited_test']['n_tasks']} tasks).",
            "Suspicion = −score (harmful first); `task-if (self, fisher)` ranks by self-influence g_kᵀ(H+δI)⁻¹g_k/n instead, with the fisher surrogate of H solved exactly by Woodbury (CG per task was ≈ 30× slower).", settings_p]})
        secs.append({"heading": "Detection", "tables": [{"rows": res["detection"], "caption": "recall after inspecting a fraction of the tasks, AUC", "floatfmt": ".3f"}],
                     "images": img("recall", "recall of corrupted tasks vs fraction inspected")})
        if res.get("sweep"):
            secs.append({"heading": "Sweep over ρ_task", "paragraphs": [
                f"One full run per ρ_task (sub-folders `rho_<value>`, each with its own results.json and figures); the sections above and below are ρ_task = {s['rho_tasks'][0]:g}. "
                "`refine_ratio` = ‖∇F‖ / mean ‖g_k‖ after refine (stationarity of that run)."],
                "tables": [{"rows": res["sweep"], "floatfmt": ".3f"}]})
        rows = [{**r, "test_acc": _acc(r["test_acc"])} for r in res["edits"]]
        secs.append({"heading": "Accuracy after removal (closed-form edit)", "paragraphs": ["Edits use task-IF's iHVP with the settings of `[influence]`; each row removes the top-ranked fraction of the method's ranking."],
                     "tables": [{"rows": rows, "floatfmt": ".4f"}], "images": img("accuracy", "test accuracy vs fraction removed") + img("harmful_tasks", "most harmful tasks by task-IF")})
    elif name == "removal":
        s = res["settings"]["removal"]
        data = res["settings"]["run"]["data"]
        rows = [{**r, "test_acc": _acc(r["test_acc"])} for r in res["table"]]
        secs.append({"heading": "Setup", "paragraphs": [
            f"{data['dataset']} {data['n_way']}-way {data['k_shot']}-shot, {res['n_tasks']} training tasks; each method removes its top {s['fraction']:.0%} harmful tasks "
            f"({res['removed_per_method']}); `instance-if (support|query)` rows remove the top {s['fraction']:.0%} of all support (query) examples by instance-IF. `edit` = closed-form λ* + (H+δI)⁻¹b_R/n; `retrain` = meta-train from the same initialisation, seed and schedule on the remaining tasks"
            + (" then refine" if s["retrain_refine"] else "") + ". `score_s` is the time to rank, `path_s` the time of the edit or the retraining; the full row's `path_s` is its train+refine time.",
            settings_p]})
        secs.append({"heading": "Removal table (measured)", "tables": [{"rows": rows, "floatfmt": ".4f"}], "images": img("accuracy", "") + img("harmful_tasks", "most harmful tasks by task-IF")})
        sp = [{"method": m, **v} for m, v in res.get("edit_vs_retrain", {}).items()]
        if sp:
            secs.append({"heading": "Edit against retraining", "paragraphs": [
                "`retrain_over_edit` = retraining time / (scoring + edit time), measured in the same run; `acc_gap_points` = retrained − edited accuracy in "
                "percentage points (the target: within 1 point at ≥ 20× less time); `reoptimise_*` the same against re-optimising from λ* on the kept items."], "tables": [{"rows": sp, "floatfmt": ".3g"}]})
        secs.append({"heading": "The paper's numbers (SPEC §9, ICLR version)", "tables": [{"rows": res["paper_table1"], "floatfmt": ".4f"}]})
    else:
        secs.append({"heading": "Setup", "paragraphs": [
            f"Sinusoid MAML, {res['settings']['estimates']['n_tasks']} training tasks, tanh MLP {res['settings']['estimates']['hidden']}, {res['n_params']} parameters, "
            f"μ = {res['settings']['estimates']['weight_decay']}, Newton refine to ‖∇F‖ = {res['refine_grad_norm']:.2g}; every task left out by Newton re-optimisation "
            f"(max ‖∇F‖ {res['loo_max_grad_norm']:.2g}); LDS over {res['lds_subsets']} half-pool subsets.", settings_p]})
        secs.append({"heading": "Correlation with leave-one-out", "tables": [{"rows": res["correlations"], "floatfmt": ".3g"}],
                     "images": img("scatter_task_if", "task-IF vs LOO") + img("scatter_direct_if", "direct-IF vs LOO")})
        secs.append({"heading": "Predicted vs true parameter change", "paragraphs": [
            "Cosine and relative error of Δλ_k = (H+δI)⁻¹g_k/n (explicit solve) against λ_{-k} − λ* from leave-one-out re-optimisation, over the left-out tasks."],
            "tables": [{"rows": res.get("parameter_change", []), "floatfmt": ".3g"}]})
        secs.append({"heading": "Hessian surrogates vs the exact total Hessian", "tables": [{"rows": res["operator_error"], "floatfmt": ".4g"}]})
        secs.append({"heading": "Neumann depth × damping ablation (exact Hessian)", "tables": [{"rows": res["neumann_damping_ablation"], "floatfmt": ".3g"}]})
    secs.append({"heading": "Timings", "paragraphs": [timing_p]})
    return write_report(d, f"metainfluence experiment: {name}" + (" (quick)" if res.get("quick") else ""), secs)
