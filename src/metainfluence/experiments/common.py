"""What the experiments share: their names, the ranking methods, the results header (settings, seeds,
sign convention, machine), training + refine of a run, scoring every method, and the block CG for
self-influence."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from .. import SIGN_CONVENTION, InfluenceSettings, task_influence
from ..config import to_dict, with_new_defaults
from ..errors import BudgetStop, SettingsError
from ..influence.curvature import fit_curvature
from ..influence.gradients import reusing_measurement_gradients
from ..influence.results import InfluenceResult, settings_dict
from ..io import read_json, write_json
from ..meta.checkpoint import load_checkpoint
from ..meta.refine import RefineReport
from ..pipeline import RunSettings, refine_stage, train_stage
from ..pipeline.proximal import ANCHOR, proximal_of, proximal_settings, record_proximal

EXPERIMENTS = ("detection", "removal", "estimates", "fidelity")
METHODS = ("task-if", "direct-if", "tracin", "trak", "ekfac-if", "loss", "random")
# asked for by name only: task-IF by the fast tier (the curvature's inverse applied directly), beside the exact
# tier; task-IF's Newton-step removal (H − H_k/n + δI)⁻¹g_k/n, a rank-M downdate per task on a gn-factor curvature;
# task-IF by the exact tier whatever the run's own Hessian (the exact kind, (p)cg)
OPTIONAL_METHODS = ("task-if-fast", "task-if-newton", "task-if-exact")


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


# --------------------------------------------------------------------------- resuming in pieces
class StageCache:
    """The stages an experiment keeps in its folder, so that a run stopped part-way (or cut into pieces
    on a laptop) continues with ``resume``: training (``trained``, continued by meta_train itself), the
    refined λ* (``refined``), the curvature file and each method's scores (``scores/METHOD``). The
    settings that define the pool and λ* (the run sections and the experiment's ``pool_keys``) are
    recorded in ``stages.json``, and resuming under others is refused; a curvature file or a method's
    scores are reused only when their own recorded settings equal the current ones (else recomputed).
    Experiments may keep further units (an edit's or a retraining's result) with :meth:`unit`; the tables
    are always recomputed from what is kept."""

    def __init__(self, out: Path, settings: dict[str, Any], resume: bool, pool_keys: tuple[str, ...] = (), log=lambda s: None,
                 deadline: float = math.inf) -> None:
        self.out, self.resume, self.deadline, self.log = Path(out), resume, deadline, log
        name = next((k for k in settings if k not in ("run", "influence")), "experiment")
        run, section = settings.get("run"), settings.get(name) or {}
        now = _jsonable({"run": run, **{k: section.get(k) for k in pool_keys}})
        record = self.out / "stages.json"
        if resume and record.is_file():
            kept = read_json(record, what="experiment stage record")
            other = kept.pop("experiment", name)  # records before the name was kept: the settings below tell them apart
            if other != name:
                raise SettingsError(f"{self.out} holds the stages of a {other} experiment, not {name}: resume it with `metainfluence experiment "
                                    f"{other} --resume`, or give {name} another --out")
            defaults = _jsonable({"run": to_dict(RunSettings())}) if run is not None else {}
            before = with_new_defaults(kept, now, defaults)
            changed = _differing(before, now)
            if changed:
                raise SettingsError(f"{self.out} holds a pool or model of other settings ({', '.join(changed)} differ); "
                                    "resume with the same run and pool settings, or use another --out")
        elif resume:
            # nothing of an experiment here: a folder another command wrote is refused (resuming into it would start
            # afresh and overwrite its files), an empty or new one starts afresh, said aloud
            found = sorted(p.name for p in self.out.iterdir() if not p.name.startswith(".")) if self.out.is_dir() else []
            if found:
                raise SettingsError(f"--resume: {self.out} holds no experiment stages (no stages.json) but {', '.join(found[:4])}"
                                    f"{', …' if len(found) > 4 else ''} (another command's folder?); pass the folder this experiment "
                                    "wrote, or drop --resume and use a new --out")
            log(f"--resume: nothing to resume in {self.out}; starting afresh")
        write_json(record, {"experiment": name, **now})

    def has(self, stem: str) -> bool:
        return self.resume and (self.out / f"{stem}.safetensors").is_file()

    def done(self, stage: str) -> None:
        """Called after each saved stage: past the experiment's ``--max-minutes`` deadline (time.monotonic()),
        stop here — every finished stage is on disk and ``--resume`` continues from the next one."""
        if time.monotonic() >= self.deadline:
            raise BudgetStop(f"experiment stopped by --max-minutes after {stage} (saved; --resume shows its result); the finished stages are kept in {self.out}: "
                             "run the same command with --resume to continue")


    def unit(self, name: str, settings: Any, compute) -> Any:
        """A unit of work whose JSON result is kept as ``units/NAME.json`` with the settings it was
        computed under (an edit's or a retraining's row) and reused on resume when they are equal; after
        computing it, the ``--max-minutes`` deadline is checked like after any stage."""
        path = self.out / "units" / (slug(name) + ".json")
        want = _jsonable(settings)
        if self.resume and path.is_file():
            kept = read_json(path, what="experiment unit")
            if kept.get("settings") == want:
                self.log(f"  resumed: {name} from {path.relative_to(self.out)} (its time is that of the run that computed it)")
                return kept["result"]
        result = _jsonable(compute())
        write_json(path, {"settings": want, "result": result})
        self.done(name)
        return result


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two JSON records (``run.data.train_tasks``), at most 6 named."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix or "(the record)"] if a != b else []
    out = [k for key in sorted(set(a) | set(b)) for k in _differing(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return out[:6] + (["…"] if len(out) > 6 else [])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))  # tuples → lists, as the files hold them


def _train_and_refine(ctx, log, w_train=None, cache: StageCache | None = None) -> tuple[torch.Tensor, Any, dict]:
    if cache is not None and cache.has("refined"):
        ckpt = load_checkpoint(ctx.out / "refined", expected_problem=ctx.problem)
        rep = RefineReport.from_json(ckpt.info["refine_report"])
        times = {k: float(v) for k, v in ckpt.info.get("metrics", {}).get("timings", {}).items()}
        log(f"resumed: refined λ* of {ctx.out / 'refined'} (‖∇F‖ {rep.grad_norm_after:.2g}, ratio {rep.ratio_after:.2g})")
        return ckpt.lam, rep, {**times, "reused": ["train", "refine"]}
    t = time.perf_counter()
    resume = ctx.out / "trained" if cache is not None and cache.has("trained") else None
    lam, history, _ = train_stage(ctx, progress=False, resume=resume)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    lam_star, rep = refine_stage(ctx, lam, progress=False, log=log)
    t_refine = time.perf_counter() - t
    log(f"trained {history.steps_done} steps ({t_train:.1f} s), refined ‖∇F‖ {rep.grad_norm_before:.2g} → {rep.grad_norm_after:.2g} ({t_refine:.1f} s)")
    times = {"train_s": t_train, "refine_s": t_refine}
    if cache is not None:  # a proximal refine ([refine] proximal) keeps its anchor, the trained λ
        ctx.save_checkpoint("refined", lam_star, "refined", {"timings": times}, refine_report=rep,
                            state={ANCHOR: lam.to(lam_star.dtype)} if rep.proximal else None)
        cache.done("training and refine")
    return lam_star, rep, times


def _proximal_infl(infl: InfluenceSettings, rep: RefineReport, log) -> InfluenceSettings:
    """λ* of a proximal refine is stationary for F + (γ/2)‖λ − λ_t‖², whose Hessian is H + γI: its scores
    and edits add γ to the damping (docs/method.md §2, "The proximal objective")."""
    if not rep.proximal:
        return infl
    log(f"proximal refine: γ = {rep.proximal:g} added to the influence damping")
    return proximal_settings(infl, rep.proximal)


def _proximal_term(ctx, rep: RefineReport, dtype: torch.dtype) -> tuple[float, torch.Tensor] | None:
    """(γ, trained λ_t) after a proximal refine, read from the refined checkpoint it saved: edits and
    re-optimisations then descend P_R = F_R + (γ/2)‖λ − λ_t‖², anchored where the refine was. None otherwise."""
    if not rep.proximal:
        return None
    gamma, anchor = proximal_of(load_checkpoint(ctx.out / "refined", expected_problem=ctx.problem))
    return gamma, anchor.to(dtype)


def _mark_proximal(scores: dict[str, InfluenceResult], rep: RefineReport, given: InfluenceSettings) -> None:
    """After a proximal refine, the task-IF scores' diagnostics carry P's stationarity (from the refine
    report; F's is kept as ``stationarity_of_F``) and the damping given and used, warning as the user's
    ``given`` settings ask — as `influence` does on a proximal checkpoint."""
    if not rep.proximal:
        return
    for label, r in scores.items():
        if label.startswith("task-if") and "proximal" not in r.diagnostics:
            record_proximal(r.diagnostics, rep.proximal, given, rep.to_json())


def _with_curvature(problem, lam, train, infl: InfluenceSettings, out: Path, log, timings: dict, methods=(),
                    cache: StageCache | None = None) -> InfluenceSettings:
    """Solvers pcg / curvature (and the method task-if-fast) need a curvature file of this λ*: with
    none given, fit one (kind ``infl.curvature_fit``; Nyström with its rank from the spectrum, or the
    fisher factor) once here, save it in the output folder and let every score and edit of the
    experiment reuse it (edits on a reduced pool are preconditioned by it under pcg)."""
    needed = infl.solver in ("pcg", "curvature") or "task-if-fast" in methods
    if not needed or infl.curvature_file:
        return infl
    stem = out / "curvature"
    if cache is not None and cache.has("curvature"):  # its fingerprint (λ*, pool, Hessian kind) is checked on every use
        info = read_json(stem.with_suffix(".json"), what="curvature file").get("info", {})
        same = info.get("method") == infl.curvature_fit and info.get("hessian") == infl.hessian and \
            (infl.curvature_fit != "fisher" or info.get("fisher_samples") == infl.fisher_samples)
        # a fit whose pass made the per-task gradients is fitted again while scores remain to compute: its gradients
        # were not kept across the restart, and the scores' own pass would then be charged beside the fit's
        lost = info.get("task_gradients_kept") and any(not cache.has("scores/" + slug(m)) for m in methods)
        if same and not lost:
            _fit_timings(timings, info)
            log(f"resumed: curvature {stem}")
            return dataclasses.replace(infl, curvature_file=str(stem))
        if same:
            log("curvature: fitted again — its pass's per-task gradients serve the scores still to compute")
    art = fit_curvature(problem, lam, train, infl, rank="auto", method=infl.curvature_fit)
    art.save(stem)
    _fit_timings(timings, art.info)
    what = f"Nyström rank {art.info['rank']}" if art.method == "nystrom" else art.method
    cost = "with the per-task gradients in its pass, kept for the scores and edits" if art.info.get("task_gradients_kept") \
        else f"{art.info['fit_over_floor']:.1f}× the floor"
    log(f"curvature: {what} fitted at λ* in {timings['curvature_fit_s']:.1f} s ({cost}), probe error {max(art.info['probe_operator_rel_error']):.2g} → {stem}")
    if cache is not None:
        cache.done("the curvature fit")
    return dataclasses.replace(infl, curvature_file=str(stem))


def _fit_timings(timings: dict, info: dict) -> None:
    """The fit's cost as charged to what uses it: the fit and its probe check against the real operator;
    the reference pass of per-task gradients it times itself against (the floor) is recorded apart (None where
    the fit made the per-task gradients in its own pass and kept them: no floor pass then)."""
    timings["curvature_fit_s"] = float(info.get("fit_seconds", 0.0)) + float(info.get("probe_seconds", 0.0))
    timings["curvature_floor_s"] = info.get("floor_seconds")


def _eval_json(res) -> dict[str, float]:
    return {"accuracy": res.accuracy, "accuracy_ci95": res.accuracy_ci95, "loss": res.loss, "loss_ci95": res.loss_ci95, "n_tasks": res.n_tasks}


def _method_settings(infl: InfluenceSettings, method: str, direct_damping: float, **kw) -> InfluenceSettings:
    if method == "task-if-fast":  # the same curvature file, its inverse applied directly
        return dataclasses.replace(infl, method="task-if", solver="curvature", **kw)
    if method == "task-if-newton":
        return dataclasses.replace(infl, method="task-if", removal="newton", **kw)
    if method == "task-if-exact":  # the exact tier: CG on the true total Hessian's products, preconditioned by the run's curvature file
        return dataclasses.replace(infl, method="task-if", hessian="exact", solver="pcg" if infl.curvature_file else "cg", **kw)
    s = dataclasses.replace(infl, method=method, **kw)
    if method == "direct-if":
        # the curvature file approximates the total Hessian, not direct-IF's θ-space one: plain CG there
        solver = "cg" if s.solver in ("pcg", "curvature") else s.solver
        s = dataclasses.replace(s, damping=direct_damping, solver=solver)
    return s


def _score_all(problem, lam, train, val, infl, methods, direct_damping, log, self_influence=False,
               cache: StageCache | None = None) -> dict[str, Any]:
    # one pass over the validation pool for all the methods' ∇f (each still charged it: stand-alone times)
    with reusing_measurement_gradients():
        return {m: _score_cached(problem, lam, train, val, m, _method_settings(infl, m, direct_damping), log, self_influence and m == "task-if", cache)
                for m in methods}


def slug(name: str) -> str:
    """A method or row label as a file name (``instance-if (support)`` → ``instance-if_support``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _score_cached(problem, lam, train, val, label: str, s: InfluenceSettings, log, self_influence=False,
                  cache: StageCache | None = None, compute=None, charged_s: float = 0.0) -> InfluenceResult:
    """One ranking's scores under settings ``s``, kept as ``scores/LABEL`` and reused on resume when
    their recorded settings equal ``s``. ``compute`` replaces task-IF's own computation (instance-IF),
    and ``charged_s`` adds the time of work it reuses to the recorded seconds."""
    stem = "scores/" + slug(label)
    if cache is not None and cache.has(stem):
        kept = InfluenceResult.load(cache.out / stem)
        same = _same_influence(kept.settings.get("influence"), s, cache.out)
        if same and (kept.self_influence is not None or not self_influence) and "seconds" in kept.diagnostics:
            log(f"  {label:<9} scores resumed from {cache.out / stem}")
            return kept
    if compute is not None:
        t = time.perf_counter()
        res = compute()
        res.diagnostics["seconds"] = time.perf_counter() - t + charged_s
        return _keep_scores(res, label, stem, log, cache)
    t = time.perf_counter()
    # when the score's own operator is already the fisher surrogate inverted exactly, one call shares its rows (or
    # curvature file), the measurement's gradient and solve, and the per-task gradients
    shared = self_influence and s.hessian == "fisher" and s.solver in ("woodbury", "curvature")
    res = task_influence(problem, lam, train, val, dataclasses.replace(s, self_influence=True) if shared else s)
    if shared:
        res.settings = {**res.settings, "influence": settings_dict(s)}  # kept under the score's settings
        si, si_s, si_solver = res, res.diagnostics["timings_s"]["self_influence"], s.solver
    elif self_influence:
        # self-influence needs one iHVP per task: with CG (≈ 80 GN products per task) that is
        # ~100 s for 60 tasks here, so it uses the fisher surrogate solved exactly by Woodbury
        ts = time.perf_counter()
        si = task_influence(problem, lam, train, val, dataclasses.replace(s, hessian="fisher", solver="woodbury", products="working", self_influence=True))
        res.self_influence, si_s, si_solver = si.self_influence, time.perf_counter() - ts, "woodbury"
    if self_influence:
        res.diagnostics["self_influence"] = {"hessian": "fisher", "solver": si_solver, "seconds": si_s,
                                             "residual": si.diagnostics.get("self_influence_residual")}
    # a measurement gradient reused from an earlier method (reusing_measurement_gradients) is charged its first computation's time
    # and per-task gradients read from the curvature fit's pass are charged that pass's seconds (stand-alone times)
    res.diagnostics["seconds"] = time.perf_counter() - t + res.diagnostics.get("measurement_gradient_reused_s", 0.0) \
        + res.diagnostics.get("task_gradients_reused_s", 0.0)
    return _keep_scores(res, label, stem, log, cache)


def _same_influence(kept: Any, s: InfluenceSettings, out: Path) -> bool:
    """Kept scores' recorded settings equal ``s``. The run's own curvature file counts as the same file under
    the folder's present path: a run folder moved since keeps its scores (the file is fingerprint-checked
    against λ* and the pool wherever it is used)."""
    now = _jsonable(settings_dict(s))
    own = str(out / "curvature")
    if isinstance(kept, dict) and now.get("curvature_file") == own and Path(kept.get("curvature_file") or "").name == "curvature":
        kept = {**kept, "curvature_file": own}
    return kept == now


def _keep_scores(res: InfluenceResult, label: str, stem: str, log, cache: StageCache | None) -> InfluenceResult:
    log(f"  {label:<9} scores in {res.diagnostics['seconds']:.2f} s")
    if cache is not None:
        res.save(cache.out / stem)
        cache.done(f"the {label} scores")
    return res


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


