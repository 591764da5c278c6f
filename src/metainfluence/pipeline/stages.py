"""The stages of a run on a :class:`RunContext` — train, evaluate, refine, influence, edit — and the
commands the CLI runs (each a stage on a run built from settings or rebuilt from a checkpoint). They
report through ``log``; the CLI prints what they return."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..config import to_dict
from ..errors import CheckpointError, SettingsError
from ..evaluation.fidelity import CheckSettings, fidelity_check
from ..influence.gradients import reusing_measurement_gradients
from ..influence.reliability import halves_of, measurement_reliability, overfit_notice, record_reliability
from ..influence.results import shortfall
from ..influence import Removal, edit_model, instance_influence, pairwise_influence, task_influence
from ..influence.task_if import inner_solve_check
from ..io import write_json
from ..meta.checkpoint import lam_digest
from ..meta.evaluate import EvalResult, evaluate, interval95
from ..meta.refine import RefineReport, refine
from ..meta.refine_monitor import has_kinks, refine_advice
from ..meta.train import TrainHistory, meta_train, resumable_checkpoint
from .describe import coverage
from .guard import RunLock, check_name, check_not_replacing, check_writable, claim_run_folder, removed_if_left_empty
from .proximal import ANCHOR, proximal_of, proximal_settings, record_proximal
from .run import RunContext
from .scores import ANSWER_KEYS, resume_iterate
from .settings import RunSettings, stage_settings

Log = Callable[[str], None]


# --------------------------------------------------------------------------- stages
def train_stage(ctx: RunContext, progress: bool = True, resume: str | os.PathLike | Any = None) -> tuple[torch.Tensor, TrainHistory, Path | None]:
    """Meta-train on the train pool; writes ``out/trained`` (checkpoint) when the context has a folder."""
    s = ctx.settings
    lam0 = ctx.problem.init_params(torch.float32)
    ckpt = ctx.out / "trained" if ctx.out is not None else None
    lam, history = meta_train(
        ctx.problem, lam0, ctx.tensors["train"], s.train, checkpoint_path=ckpt, progress=progress,
        pools=ctx.pool_records(), run_settings=stage_settings(s), resume=resume, validation=ctx.tensors.get("val"),
    )
    return lam, history, (ckpt.with_suffix(".safetensors") if ckpt is not None else None)


def evaluate_stage(ctx: RunContext, lam: torch.Tensor, splits: tuple[str, ...] = ("test",)) -> dict[str, EvalResult]:
    return {split: evaluate(ctx.problem, lam, ctx.tensors[split]) for split in splits if split in ctx.tensors}


def refine_stage(ctx: RunContext, lam: torch.Tensor, progress: bool = True, w: torch.Tensor | None = None,
                 log: Log | None = None) -> tuple[torch.Tensor, RefineReport]:
    return refine(ctx.problem, lam, ctx.tensors["train"], ctx.settings.refine, w=w, progress=progress, log=log)


def influence_stage(ctx: RunContext, lam: torch.Tensor, settings: Any, level: str = "task", measurement: str | None = None,
                    s0: torch.Tensor | None = None):
    """Scores of the training pool's tasks (level 'task') or examples ('support' / 'query') against the
    validation pool's mean query loss (docs/method.md §5), with the pool's stable task ids; level
    'pairwise' scores every training task on every validation task's own ``measurement`` (None:
    query loss, or 'margin'; docs/method.md §6.2). ``s0``: continue task-IF's solve from this iterate."""
    if s0 is not None and level != "task":
        raise SettingsError(f"--resume continues a task-level solve; level {level} has none to continue")
    dtype = lam.dtype
    train, val = ctx.tensors["train"].to(dtype=dtype), ctx.tensors["val"].to(dtype=dtype)
    ids = torch.as_tensor(ctx.pools["train"].task_ids)
    if level == "task":
        return task_influence(ctx.problem, lam, train, val, settings, task_ids=ids, s0=s0)
    if level == "pairwise":
        return pairwise_influence(ctx.problem, lam, train, val, settings, measurement=measurement, train_task_ids=ids,
                                  test_task_ids=torch.as_tensor(ctx.pools["val"].task_ids))
    if level in ("support", "query"):
        return instance_influence(ctx.problem, lam, train, val, level, settings, task_ids=ids)
    raise SettingsError(f"unknown influence level {level!r}; use task, support, query or pairwise")


def edit_stage(ctx: RunContext, lam: torch.Tensor, removal: Any, settings: Any, newton_steps: int = 0, step: str = "reduced",
               proximal: tuple[float, torch.Tensor] | None = None):
    """Closed-form removal (docs/method.md §6) on the training pool; returns the EditResult."""
    return edit_model(ctx.problem, lam, ctx.tensors["train"].to(dtype=lam.dtype), removal, settings, newton_steps=newton_steps, step=step,
                      proximal=proximal)


def removal_from_scores(result: Any, k: int) -> Any:
    """A Removal of the k most harmful items of a scores file (tasks or examples), by local row index."""
    total = result.scores.numel()
    if not 1 <= k <= total:
        raise SettingsError(f"--top-k {k} is outside 1..{total} (the number of scored items); choose a k from 1 to {total}")
    order = result.ranking(harmful_first=True)[:k]
    if result.level == "task":
        return Removal(tasks=sorted(order.tolist()))
    mask = torch.zeros(result.scores.numel(), dtype=torch.bool)
    mask[order] = True
    mask = mask.reshape(result.scores.shape)
    return Removal(support=mask) if result.level == "support" else Removal(query=mask)


def removal_from_task_ids(ctx: RunContext, remove_tasks: str) -> Removal:
    """A Removal of the training tasks with the given comma-separated stable ids."""
    ids = [int(i) for i in ctx.pools["train"].task_ids.tolist()]
    items = remove_tasks.split(",")
    if not remove_tasks.strip():
        raise SettingsError(f"--remove-tasks names no task; give the ids of the training tasks to remove, e.g. --remove-tasks 3,17 (ids 0..{len(ids) - 1})")
    if any(not x.strip() for x in items):  # '3,,5' or '3,': a typo is likelier than an intended gap
        raise SettingsError(f"--remove-tasks {remove_tasks!r} has an empty item; list the ids separated by single commas, e.g. 3,5")
    try:
        wanted = [int(x) for x in items]
    except ValueError:
        raise SettingsError(f"--remove-tasks takes comma-separated integers, got {remove_tasks!r}") from None
    twice = sorted({t for t in wanted if wanted.count(t) > 1})
    if twice:
        raise SettingsError(f"--remove-tasks lists task id {twice[0]} more than once; list each task once")
    missing = [t for t in wanted if t not in ids]
    if missing:
        raise SettingsError(f"task id {missing[0]} is not in the training pool of {len(ids)} tasks; use ids 0..{len(ids) - 1}")
    return Removal(tasks=sorted(ids.index(t) for t in wanted))


def evals_json(results: Mapping[str, EvalResult]) -> dict:
    return {k: v.to_json() for k, v in results.items()}


# --------------------------------------------------------------------------- commands
def train_run(settings: RunSettings, out: str | os.PathLike, resume: bool = False, progress: bool = True, force: bool = False,
              log: Log = print) -> tuple[RunContext, torch.Tensor, TrainHistory, dict[str, EvalResult]]:
    """Build the pools, meta-train (or continue ``out/trained``), evaluate on val and test, and write
    ``out/settings.json`` and the ``out/trained`` checkpoint (with its Adam state, so it can be resumed)."""
    out = Path(out)
    resume_from = out / "trained" if resume else None
    if resume_from is not None and not (out / "trained.safetensors").is_file():
        if not (out / "settings.json").is_file():
            raise SettingsError(f"--resume: there is no checkpoint {out / 'trained.safetensors'} to continue from; train without --resume first")
        log(f"--resume: the run in {out} was interrupted before its first checkpoint; starting it afresh")
        resume_from = None
    settings.validate()  # sizes and settings are refused before the folder is touched
    with removed_if_left_empty(out), RunLock(claim_run_folder(out, resume=resume, force=force)):
        ctx = RunContext.prepare(settings, out, log=log, save_pools=resume_from is None)
        if resume_from is not None:  # refused (another pool, model or training settings) before the run's files are touched
            try:
                resume_from = resumable_checkpoint(resume_from, ctx.problem, ctx.tensors["train"], settings.train)
            except CheckpointError as exc:  # the usual cause: the flags of the first command not repeated
                raise CheckpointError(f"{exc} (the run's own settings: --config {out / 'settings.json'} with --resume)") from None
            ctx.save_pools()
        ctx.write_settings()
        lam, history, _ = train_stage(ctx, progress=progress, resume=resume_from)
        results = evaluate_stage(ctx, lam, ("val", "test"))
        state = ctx.checkpoint_state("trained")
        ctx.save_checkpoint("trained", lam, "trained", {"eval": evals_json(results)}, history=history, step=history.steps_done, state=state)
    return ctx, lam, history, results


def refine_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, name: str = "refined",
                      overrides: Callable[[RunSettings], RunSettings] | None = None, progress: bool = True,
                      log: Log = print) -> tuple[Path, RefineReport, EvalResult, EvalResult]:
    """Refine a trained checkpoint to stationarity on its training pool; writes ``OUT/NAME``.
    Returns (path, report, test result before, test result after)."""
    check_name(name)
    folder = check_writable(out if out is not None else Path(checkpoint).expanduser().parent)
    ctx, ckpt = RunContext.from_checkpoint(checkpoint, splits=("train", "test"), overrides=overrides)
    ctx.out = folder
    log(f"train pool: {ctx.pools['train'].summary()}")
    with RunLock(folder):
        # a proximal refine keeps its anchor: the trained λ₀, or the one a proximally refined checkpoint holds
        kept = proximal_of(ckpt) if ctx.settings.refine.proximal > 0 else None
        anchor = kept[1] if kept is not None else ckpt.lam
        prox = (ctx.settings.refine.proximal, anchor) if ctx.settings.refine.proximal > 0 else None
        if prox is not None:  # γ may come from the checkpoint's own settings: said, so that it is not inherited unseen
            log(f"proximal refine: γ = {prox[0]:g}, anchored at " + ("the trained λ₀ this checkpoint holds" if kept is not None else
                "this checkpoint's λ") + " (--refine-proximal sets γ; 0 refines plain F)")
        lam, report = refine(ctx.problem, ckpt.lam, ctx.tensors["train"], ctx.settings.refine, progress=progress, log=log, proximal=prox)
        before = evaluate(ctx.problem, ckpt.lam, ctx.tensors["test"])
        after = evaluate(ctx.problem, lam, ctx.tensors["test"])
        _generalisation_notice(before, after, ctx.settings.refine.proximal, log)
        metrics = {"eval": {"test": after.to_json()}, "eval_before_refine": {"test": before.to_json()}}
        inner_solve_check(ctx.problem, lam, ctx.tensors["train"], metrics)  # an unsolved implicit inner loop: ∇F is then inexact
        # refining a refined checkpoint (even into its own name) keeps the earlier refines' reports, oldest first
        earlier = list((ckpt.info.get("metrics") or {}).get("earlier_refines", [])) + ([ckpt.info["refine_report"]] if ckpt.info.get("refine_report") else [])
        if earlier:
            metrics["earlier_refines"] = earlier
        path = ctx.save_checkpoint(name, lam, "refined", metrics, refine_report=report, step=ckpt.step, state={ANCHOR: anchor} if prox else None)
    return path, report, before, after


def _generalisation_notice(before: EvalResult, after: EvalResult, gamma: float, log: Log) -> None:
    """Say when refine lowered test accuracy, or raised the test query loss by more than a tenth, beyond the paired 95%
    interval (the same test tasks before and after): a refine of plain F can meta-overfit while accuracy barely moves."""
    paired = lambda a, b: interval95(torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64))[:2]
    remedy = (f"a larger --refine-proximal than {gamma:g} (e.g. 1) keeps λ nearer the trained model" if gamma > 0 else
              "--refine-proximal 1 refines near the trained model instead")
    worse = "λ moved towards a stationary point that generalises worse"
    n = len(before.per_task_loss)
    if before.is_classification and len(before.per_task_accuracy) == len(after.per_task_accuracy) > 1:
        mean, half = paired(before.per_task_accuracy, after.per_task_accuracy)
        if mean < -max(half, 0.005):
            log(f"warning: refine lowered test accuracy by {-100 * mean:.2f} points ({100 * before.accuracy:.2f}% → {100 * after.accuracy:.2f}%, "
                f"paired over {n} tasks: ± {100 * half:.2f}): {worse}; {remedy}; scores on it answer for that λ")
            return
    if n == len(after.per_task_loss) > 1:
        mean, half = paired(before.per_task_loss, after.per_task_loss)
        if mean > max(half, 0.1 * abs(before.loss)):
            log(f"warning: refine raised the test query loss by {mean:.3g} ({before.loss:.4g} → {after.loss:.4g}, paired over {n} tasks: ± {half:.2g}) "
                f"while it lowered the training objective: {worse} (meta-overfitting); {remedy}; scores on it answer for that λ")


def evaluate_checkpoint(checkpoint: str | os.PathLike, split: str = "test", tasks: int | None = None, json_path: str | os.PathLike | None = None,
                        overrides: Callable[[RunSettings], RunSettings] | None = None, log: Log = print) -> tuple[Any, EvalResult]:
    """Meta-test a checkpoint on its run's ``split`` pool (``tasks`` test tasks); optionally write the
    result with per-task values to ``json_path``. Returns (checkpoint, result)."""
    if tasks is not None and tasks < 1:
        raise SettingsError(f"--tasks must be ≥ 1, got {tasks}")
    splits = ("train",) if split == "train" else ("train", split)
    ctx, ckpt = RunContext.from_checkpoint(checkpoint, splits=splits, test_tasks=tasks, overrides=overrides)
    pool = ctx.pools[split]
    log(f"{split} pool: {pool.summary()}")
    result = evaluate(ctx.problem, ckpt.lam, ctx.tensors[split])
    if json_path:
        write_json(json_path, {"checkpoint": str(ckpt.path), "split": split, "pool": pool.summary(), **result.to_json(per_task=True)})
    return ckpt, result


def influence_checkpoint(checkpoint: str | os.PathLike, settings: Any, level: str = "task", out: str | os.PathLike | None = None,
                         name: str | None = None, overrides: Callable[[RunSettings], RunSettings] | None = None, log: Log = print,
                         check: CheckSettings | None = None, measurement: str | None = None,
                         resume: str | os.PathLike | None = None, force: bool = False) -> tuple[Any, Path]:
    """Score a checkpoint's training tasks or examples (:func:`influence_stage`) and write the scores file
    ``OUT/NAME`` (default: the checkpoint's folder, ``influence_LEVEL_METHOD``). Returns (result, stem).
    ``resume``: a task-level scores file of this pool whose solve stopped early (``max_minutes``): its
    iterate s is where this solve starts. A file of other :data:`ANSWER_KEYS` is refused unless ``force``."""
    if measurement is not None and level != "pairwise":
        raise SettingsError(f"--measurement applies to --level pairwise only (level {level} measures the validation pool's mean query loss)")
    if check is not None and check.measurement_splits and (level != "task" or settings.method != "task-if" or check.measurement_splits < 0):
        # refused before any scoring, so nothing computed is lost
        raise SettingsError(f"--check-measurement K (K ≥ 1 halvings; got {check.measurement_splits}) splits the validation pool of task-level task-if "
                            f"scores; this is {level}-level {settings.method}: run it with --level task --method task-if")
    if check is not None and check.removals and level != "task":  # refused before any scoring too
        raise SettingsError("--check re-optimises groups of tasks; use it with --level task")
    # the default name tells apart what would otherwise overwrite each other: the margin matrix, two-stage support scores
    variant = (f"_{measurement}" if level == "pairwise" and measurement not in (None, "loss") else "") + (
        f"_{settings.support_method}" if level == "support" and settings.support_method != "unrolled" else "")
    name = check_name(name or f"influence_{level}_{settings.method}{variant}")
    folder = check_writable(out if out else Path(checkpoint).expanduser().parent)
    ctx, ckpt = RunContext.from_checkpoint(checkpoint, splits=("train", "val"), overrides=overrides)
    log(f"train pool: {ctx.pools['train'].summary()}")
    _stationarity_notice(ckpt, settings, log, ctx.problem)
    given = settings
    prox, settings = _with_proximal(ckpt, settings, log)  # scores of the proximal objective the checkpoint was refined on
    s0 = resume_iterate(ctx, resume, settings, level, log) if resume is not None else None
    if resume is None or Path(resume).expanduser().resolve() != (folder / name).resolve():  # scores of another question kept
        asked = {"level": level, **{f"settings.influence.{k}": getattr(settings, k) for k in ANSWER_KEYS}}
        check_not_replacing(folder / name, f"{level}-level scores", ("metainfluence.influence", "metainfluence.pairwise"), asked, force)
    lam, halves = ckpt.lam.double(), None
    if check is not None and check.measurement_splits:
        # one validation pool object for both, so that the reliability's halves ride on the scores' ∇f pass
        ctx.tensors["val"] = ctx.tensors["val"].to(dtype=lam.dtype)
        halves = halves_of(ctx.tensors["val"], check.measurement_splits, check.seed)
    log(f"scoring: {level}-level {settings.method}, {settings.hessian} Hessian, solver {settings.solver}, damping {settings.damping:g}, "
        f"{len(ctx.tensors['train'])} training tasks against {len(ctx.tensors['val'])} validation tasks")
    started = time.perf_counter()
    with reusing_measurement_gradients(halves):
        result = influence_stage(ctx, lam, settings, level, measurement, s0=s0)
        if halves is not None:
            _check_measurement(ctx, lam, settings, check, result)
    if prox is not None:
        record_proximal(result.diagnostics, prox[0], given, ckpt.info["refine_report"])
    if resume is not None:
        result.diagnostics["resumed_from"] = str(resume)
    log(f"scored in {time.perf_counter() - started:.0f} s")
    if check is not None and check.removals:
        log(f"fidelity check: the full pool and {check.removals} groups of {max(1, round(check.fraction * len(ctx.tensors['train'])))} tasks "
            f"re-optimised from λ* in float64 (refine: {ctx.settings.refine.method}, at most {check.max_minutes:g} min, --check-minutes)")
        fid = fidelity_check(ctx.problem, lam, ctx.tensors["train"], ctx.tensors["val"], result.scores, check, ctx.settings.refine, proximal=prox)
        result.diagnostics["fidelity_check"] = fid
        if fid["unconverged_reoptimisations"]:
            target = " or ".join(t for t in (f"‖∇F‖ ≤ {fid['refine_tol']:g}" if fid["refine_tol"] > 0 else "",
                                             f"ratio ≤ {fid['refine_tol_ratio']:g}" if fid["refine_tol_ratio"] > 0 else "") if t)
            shortfall(result.diagnostics, f"{fid['unconverged_reoptimisations']} of the fidelity check's re-optimisations stopped short of the "
                                          f"refine target ({target or 'none set'}; ‖∇F‖ up to {fid['max_reoptimised_grad_norm']:.2g}), so its actual "
                                          "changes carry that error; raise --refine-max-iter or use --refine-method newton")
        if fid["removals_done"] < 3:
            remedy = ("ask for --check 3 or more" if fid["removals_done"] == check.removals else
                      f"its {check.max_minutes:g} minutes ran out ({fid['seconds']:.0f} s): raise --check-minutes, or remove fewer tasks a group (--check-fraction)")
            shortfall(result.diagnostics, f"the fidelity check re-optimised {fid['removals_done']} of {check.removals} groups, too few for a "
                                          f"Spearman (it needs 3); {remedy}")
        elif not (fid["spearman"] >= 0.5):
            shortfall(result.diagnostics, f"the fidelity check found the scores track re-optimisation weakly (Spearman {fid['spearman']:.2f} over "
                                          f"{fid['removals_done']} removals of {fid['group_size']} tasks); try --removal newton, a larger --damping, "
                                          "or refine further before trusting the ranking")
        if fid["removals_done"] >= 1 and fid["relative_error"] > 0.5:
            # a good Spearman says the order holds; the sizes can still be far from the change a removal makes
            shortfall(result.diagnostics, f"the fidelity check's predicted changes are {fid['relative_error']:.2f} off the re-optimised ones (relative "
                                          f"error over {fid['removals_done']} group removals): read the scores as a ranking, not as the size of a "
                                          "removal's effect (first-order sums drift for groups; --removal newton predicts single removals better)")
    if level in ("support", "query") or (level == "task" and settings.method in ("task-if", "direct-if", "ekfac-if")):  # predicted changes only
        overfit_notice(ckpt.info.get("refine_report"), result, checked=bool(check is not None and check.removals))
    if level in ("support", "query") and ctx.dataset is not None:
        result.diagnostics["coverage"] = coverage(ctx.pools["train"], ctx.dataset, level)
    with RunLock(folder):
        stem = ctx.save_scores(result, name, folder=folder, scored=(ckpt.path, ckpt.lam))
    return result, stem


def _check_measurement(ctx: RunContext, lam: torch.Tensor, settings: Any, check: CheckSettings, result: Any) -> None:
    """How much the task-IF ranking depends on which validation tasks were drawn (docs/method.md §5.1), from
    the scores' own solve s; a warning with the pool size that would do when its reliability is below 0.9."""
    rel = measurement_reliability(ctx.problem, lam, ctx.tensors["train"].to(dtype=lam.dtype), ctx.tensors["val"].to(dtype=lam.dtype),
                                  settings, check.measurement_splits, seed=check.seed, s=result.extra.get("s"))
    record_reliability(result.diagnostics, rel)


def _with_proximal(ckpt: Any, settings: Any, log: Log) -> tuple[Any, Any]:
    """(γ, λ₀) of a proximally refined checkpoint (else None) and ``settings`` with γ added to the damping, said aloud."""
    prox = proximal_of(ckpt)
    if prox is None:
        return None, settings
    shifted = proximal_settings(settings, prox[0])
    log(f"proximal checkpoint: γ = {prox[0]:g} added to the damping ({settings.damping:g} → {shifted.damping:g})")
    return prox, shifted


def _stationarity_notice(ckpt: Any, settings: Any, log: Log, problem: Any = None) -> None:
    """Before a solve that may be long: what the checkpoint's own refine report says of ∇F (the scores measure it
    again, but only after the solve, and an exact-Hessian CG far from stationarity can run for hours first)."""
    report = ckpt.info.get("refine_report")
    if not report:
        log("note: this checkpoint was not refined (`metainfluence refine`); influence assumes ∇F(λ) = 0 and the scores say how far from it λ is")
        return
    ratio = float(report.get("ratio_after", float("nan")))
    if not ratio <= settings.stationarity_warn:
        refine_further = "refine further (`metainfluence refine --checkpoint …`)" + (
            " with a larger --refine-max-minutes (its last refine stopped on its time limit)" if report.get("stopped_by") == "max_minutes" else "")
        if has_kinks(problem):  # more of the same refine does not help where F jumps
            refine_further = refine_advice(problem=problem)
        if settings.hessian in ("fisher", "gauss-newton"):  # already positive semi-definite: only refining helps
            remedy = (f"the {settings.hessian} Hessian used here is positive semi-definite, so the solve will not stall, but the answer still "
                      f"assumes ∇F = 0: {refine_further}")
        else:
            remedy = (f"away from a stationary λ the {settings.hessian} total Hessian is often indefinite (CG then stalls); {refine_further}, "
                      "or use the positive semi-definite --hessian fisher --solver woodbury")
        grad = "‖∇P‖" if report.get("proximal") else "‖∇F‖"  # a proximal refine minimised P = F + (γ/2)‖λ − λ_t‖²
        log(f"warning: this checkpoint's refine stopped at {grad} / mean‖g_i‖ = {ratio:.2g} (above {settings.stationarity_warn:g}): influence "
            f"assumes a stationary λ; {remedy}")


def edit_checkpoint(checkpoint: str | os.PathLike, settings: Any, remove_tasks: str | None = None, scores: str | os.PathLike | None = None,
                    top_k: int | None = None, newton_steps: int = 0, step: str = "reduced", out: str | os.PathLike | None = None, name: str = "edited",
                    overrides: Callable[[RunSettings], RunSettings] | None = None, log: Log = print,
                    force: bool = False) -> tuple[Path, Removal, Any, EvalResult, EvalResult]:
    """Remove training tasks by id (``remove_tasks``, comma-separated) or the ``top_k`` most harmful
    items of a scores file from a checkpoint in closed form; writes ``OUT/NAME``.
    Returns (path, removal, edit result, test result before, test result after)."""
    if (remove_tasks is None) == (scores is None):
        raise SettingsError("say what to remove: either --remove-tasks IDS or --scores FILE --top-k K")
    if newton_steps < 0:
        raise SettingsError(f"--newton-steps must be ≥ 0, got {newton_steps}")
    check_name(name)
    folder = check_writable(out if out else Path(checkpoint).expanduser().parent)
    ctx, ckpt = RunContext.from_checkpoint(checkpoint, splits=("train", "test"), overrides=overrides)
    ids = [int(i) for i in ctx.pools["train"].task_ids.tolist()]
    if remove_tasks is not None:
        removal = removal_from_task_ids(ctx, remove_tasks)
    else:
        if top_k is None:
            raise SettingsError("--scores needs --top-k K (how many of the most harmful items to remove)")
        removal = removal_from_scores(ctx.load_scores(scores, ckpt), top_k)
    log(f"train pool: {ctx.pools['train'].summary()}")
    _stationarity_notice(ckpt, settings, log, ctx.problem)  # by the threshold given (a proximal checkpoint's report is of P)
    # the edit of the proximal objective: its reduced Hessian is H_R + γI, its Newton steps descend P_R
    prox, settings = _with_proximal(ckpt, settings, log)
    what = {"removed_tasks": [ids[i] for i in removal.tasks], **_removed_examples(removal, ids), "edited_from": lam_digest(ckpt.lam)}
    shown = what["removed_tasks"] or [tuple(p) for k in ("removed_support_examples", "removed_query_examples") for p in what.get(k, [])]
    log(f"edit: {step} step removing {removal.describe()} ({', '.join(map(str, shown[:12]))}{', …' if len(shown) > 12 else ''}), "
        f"{settings.hessian} Hessian, solver {settings.solver}, damping {settings.damping:g}"
        + (f", at most {settings.solve.max_minutes:g} min" if settings.solve.max_minutes else ""))
    check_not_replacing(folder / name, "an edit", ("edited",), {"metrics.edit_settings.step": step, **{f"metrics.{k}": v for k, v in what.items()},
                                                   **{f"metrics.edit_settings.influence.{k}": getattr(settings, k) for k in ANSWER_KEYS}}, force)
    lam = ckpt.lam.double()
    edited = edit_stage(ctx, lam, removal, settings, newton_steps=newton_steps, step=step, proximal=prox)
    before = evaluate_stage(ctx, lam, ("test",))["test"]
    after = evaluate_stage(ctx, edited.lam, ("test",))["test"]
    ctx.out = folder
    with RunLock(folder):
        path = ctx.save_checkpoint(name, edited.lam, "edited", {
            "eval": {"test": after.to_json()}, "eval_before_edit": {"test": before.to_json()},
            "removed": removal.count(), **what,
            "removed_by": {"scores": str(scores), "top_k": top_k} if scores is not None else {"remove_tasks": remove_tasks},
            "edit": edited.diagnostics, "edit_settings": {"influence": to_dict(settings), "step": step, "newton_steps": newton_steps}})
    return path, removal, edited, before, after


def _removed_examples(removal: Any, ids: list[int]) -> dict[str, list[list[int]]]:
    """The removed examples as [task id, example] pairs, per set (so that an edit's record says which, not how many)."""
    out = {}
    for which in ("support", "query"):
        mask = getattr(removal, which)
        if mask is not None:
            out[f"removed_{which}_examples"] = [[ids[int(t)], int(j)] for t, j in torch.nonzero(torch.as_tensor(mask).bool()).tolist()]  # True = removed
    return out


def curvature_checkpoint(checkpoint: str | os.PathLike, settings: Any, out: str | os.PathLike, rank: int = 50, oversample: int = 10,
                         probes: int = 4, overrides: Callable[[RunSettings], RunSettings] | None = None, log: Log = print,
                         method: str = "nystrom", max_tasks: int | None = None, max_rank: int = 400):
    """Fit a curvature (``method``: a Nyström sketch of the checkpoint's total Hessian of kind
    ``settings.hessian``, or an EK-FAC at the adapted parameters measured against it) on its training
    pool and save it to the stem ``out`` (safetensors + JSON). Returns (artifact, stem)."""
    from ..influence.curvature import fit_curvature

    stem = Path(out)
    check_name(stem.name, "--out")
    check_writable(stem.parent if str(stem.parent) else ".")
    ctx, ckpt = RunContext.from_checkpoint(checkpoint, splits=("train",), overrides=overrides)
    log(f"train pool: {ctx.pools['train'].summary()}")
    lam = ckpt.lam.double()
    # a proximal checkpoint's scores and edits solve at δ + γ: the probes' reference damping is that one
    _, settings = _with_proximal(ckpt, settings, log)
    art = fit_curvature(ctx.problem, lam, ctx.tensors["train"].to(dtype=lam.dtype), settings, rank=rank, oversample=oversample, probes=probes,
                        method=method, max_tasks=max_tasks, max_rank=max_rank)
    with RunLock(stem.parent):
        art.save(stem)
    return art, stem
