"""Glue between the stages: one :class:`RunSettings` → dataset, task pools, problem → train, refine,
evaluate. The CLI (:mod:`metainfluence.cli`) is a thin layer over these functions.

A run folder holds::

    settings.json                     the effective RunSettings (usable again with --config)
    pools/{train,val,test}.{json,safetensors}   the task pools (stable task ids)
    trained.{safetensors,json}        λ after meta-training (+ Adam state, history)
    refined.{safetensors,json}        λ* after the refine stage (+ refine report)
    summary.json                      the demo's figures

:func:`run_demo` is the README's main command. Later stages (influence, editing) extend it by
working on the :class:`RunContext` it builds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .config import settings_from_dict, to_dict
from .errors import CheckpointError, PoolError, SettingsError
from .io import write_json
from .meta.checkpoint import Checkpoint, check_pool, load_checkpoint, pool_record, save_checkpoint
from .meta.evaluate import EvalResult, evaluate
from .meta.models import ModelSettings, build_model
from .meta.objective import InnerSettings, MetaProblem
from .meta.refine import RefineReport, RefineSettings, refine
from .meta.train import TrainHistory, TrainSettings, meta_train
from .tasks.tensors import TaskTensors

SPLITS = ("train", "val", "test")


@dataclass
class DataSettings:
    """Which tasks: dataset, task shape and pool sizes."""

    dataset: str = field(default="digits", metadata={"help": "dataset: digits (embedded, no download) | omniglot | mnist | fashion-mnist | mini-imagenet | sinusoid (regression)"})
    data_root: str | None = field(default=None, metadata={"help": "folder holding the dataset files (else $METAINFLUENCE_DATA); not needed for digits and sinusoid"})
    image_size: int = field(default=0, metadata={"help": "image side in pixels (0 = the dataset's default, e.g. 28 for Omniglot)"})
    n_way: int = field(default=5, metadata={"help": "classes per task N"})
    k_shot: int = field(default=1, metadata={"help": "support examples per class K (sinusoid: support points)"})
    q_query: int = field(default=5, metadata={"help": "query examples per class Q (sinusoid: query points)"})
    train_tasks: int = field(default=300, metadata={"help": "tasks in the training pool n (influence is over these)"})
    val_tasks: int = field(default=100, metadata={"help": "tasks in the validation pool (the influence measurement, SPEC §7)"})
    test_tasks: int = field(default=600, metadata={"help": "held-out meta-test tasks (≥ 600 for the usual 95% interval)"})
    standardize: bool = field(default=True, metadata={"help": "standardise image inputs with the training pool's statistics (per-pixel mean, overall sd); a well-conditioned F lets refine reach its tolerance"})
    pool_seed: int = field(default=0, metadata={"help": "seed of the task pools (same seed = same tasks)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the dataset's train/val/test split"})
    corrupt_tasks: float = field(default=0.0, metadata={"help": "fraction ρ_task of TRAINING tasks given wrong labels (mislabeled-task experiments; the truth is recorded in the pool)"})
    corrupt_labels: float = field(default=0.8, metadata={"help": "fraction ρ_label of a corrupted task's labels changed to another class of the task"})
    corrupt_where: str = field(default="both", metadata={"help": "which labels of a corrupted task: support | query | both"})

    def validate(self) -> None:
        for name in ("n_way", "k_shot", "q_query", "train_tasks", "val_tasks", "test_tasks"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.image_size < 0:
            raise SettingsError(f"image_size must be ≥ 0, got {self.image_size}")
        if not (0 <= self.corrupt_tasks <= 1 and 0 <= self.corrupt_labels <= 1):
            raise SettingsError("corrupt_tasks and corrupt_labels are fractions: give values in [0, 1]")
        if self.corrupt_where not in ("support", "query", "both"):
            raise SettingsError(f"corrupt_where must be support, query or both, got {self.corrupt_where!r}")


@dataclass
class ObjectiveSettings:
    """The outer objective's regulariser and how full-pool passes are chunked."""

    weight_decay: float = field(default=1e-2, metadata={"help": "μ in F(λ) = (1/n) Σ L_Q^i + (μ/2)‖λ‖² — gives F a minimiser for refine"})
    pool_chunk: int = field(default=0, metadata={"help": "tasks per vmapped chunk in full-pool passes (refine, evaluation); 0 = all at once"})


@dataclass
class RunSettings:
    """Everything a run needs; the CLI flags and config-file sections are generated from it.

    The defaults are the demo's, chosen so that refine reaches ‖∇F‖ ≤ 1e-6 within the demo's time
    budget (measured on digits, 300 tasks): a smooth network (tanh; with ReLU L-BFGS stalled at
    ‖∇F‖ ≈ 0.26 after 600 iterations), standardised inputs (largest Hessian eigenvalue of F 263 → 0.7)
    and μ = 1e-2 (with μ = 1e-3 refine was at ‖∇F‖ ≈ 0.02 after 1000 iterations).
    """

    data: DataSettings = field(default_factory=DataSettings, metadata={"help": "tasks", "flag_prefix": ""})
    model: ModelSettings = field(default_factory=lambda: ModelSettings(hidden=(64,), activation="tanh"), metadata={"help": "network", "flag_prefix": "model-"})
    inner: InnerSettings = field(default_factory=InnerSettings, metadata={"help": "adaptation (inner problem)", "flag_prefix": "inner-"})
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings, metadata={"help": "outer objective", "flag_prefix": ""})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(meta_batch=16, steps=1500, lr=3e-3, checkpoint_every=500), metadata={"help": "meta-training", "flag_prefix": ""})
    refine: RefineSettings = field(default_factory=RefineSettings, metadata={"help": "refine stage", "flag_prefix": "refine-"})

    def validate(self) -> None:
        self.data.validate()
        self.inner.validate()
        self.train.validate()
        self.refine.validate()
        if self.objective.weight_decay < 0 or not math.isfinite(self.objective.weight_decay):
            raise SettingsError(f"weight_decay must be ≥ 0, got {self.objective.weight_decay}")
        if self.objective.pool_chunk < 0:
            raise SettingsError(f"pool_chunk must be ≥ 0, got {self.objective.pool_chunk}")
        if self.data.dataset == "sinusoid" and self.model.kind != "mlp":
            raise SettingsError("the sinusoid dataset needs the mlp model; pass --model-kind mlp")


def input_statistics(train: TaskTensors) -> tuple[torch.Tensor, float]:
    """Per-pixel mean and overall standard deviation of the inputs of a (training) pool, every
    support and query image counted once per appearance; computed in float64."""
    x = torch.cat([train.support_x.flatten(0, 1), train.query_x.flatten(0, 1)]).to(torch.float64)
    mean = x.mean(0)
    sd = float((x - mean).std())
    if not sd > 0:
        raise PoolError("the training pool's inputs are constant, so they cannot be standardised; pass --no-standardize")
    return mean, sd


def standardize_tensors(tasks: TaskTensors, mean: torch.Tensor, sd: float) -> TaskTensors:
    """(x − mean) / sd for support and query inputs; labels unchanged."""
    m = mean.to(tasks.support_x.dtype)
    return TaskTensors((tasks.support_x - m) / sd, tasks.support_y, (tasks.query_x - m) / sd, tasks.query_y)


def pool_tensors(pools: Mapping[str, Any], dataset, data: DataSettings) -> tuple[dict[str, TaskTensors], dict | None]:
    """Tensors of every pool; with ``data.standardize`` (image datasets only), standardised with the
    training pool's statistics. Returns (tensors, {"mean_abs_max", "sd"} or None)."""
    tensors = {name: pool.tensors(dataset) for name, pool in pools.items()}
    if not data.standardize or dataset is None:
        return tensors, None
    if "train" not in tensors:
        raise SettingsError("standardising inputs needs the training pool (its statistics); build it too")
    mean, sd = input_statistics(tensors["train"])
    info = {"kind": "per-pixel mean, overall sd of the training pool's images", "sd": sd, "mean_range": [float(mean.min()), float(mean.max())]}
    return {name: standardize_tensors(t, mean, sd) for name, t in tensors.items()}, info


@dataclass
class RunContext:
    """What a run is built from: dataset, pools (train/val/test), their tensors and the problem."""

    settings: RunSettings
    dataset: Any
    pools: dict[str, Any]
    tensors: dict[str, TaskTensors]
    problem: MetaProblem
    out: Path | None = None
    standardization: dict | None = None

    def pool_records(self) -> dict[str, dict]:
        recs = {}
        for name, pool in self.pools.items():
            file = f"pools/{name}" if self.out is not None and (self.out / "pools" / f"{name}.json").is_file() else None
            recs[name] = pool_record(pool, self.tensors.get(name), file=file)
        return recs


# --------------------------------------------------------------------------- building
def load_data(data: DataSettings):
    """The dataset of ``data`` (None for sinusoid, whose pools are generated)."""
    if data.dataset == "sinusoid":
        return None
    from .data import load_dataset

    options: dict[str, Any] = {"split_seed": data.split_seed}
    if data.image_size:
        options["image_size"] = data.image_size
    return load_dataset(data.dataset, root=data.data_root, **options)


def build_pools(data: DataSettings, dataset, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """Train/val/test pools of ``data`` (deterministic in the settings)."""
    sizes = {"train": data.train_tasks, "val": data.val_tasks, "test": data.test_tasks}
    pools = {}
    for i, split in enumerate(splits):
        if dataset is None:
            from .tasks import sinusoid_pool

            # Sinusoid tasks have no classes to split: the pools differ by seed.
            pools[split] = sinusoid_pool(sizes[split], data.k_shot, data.q_query, seed=data.pool_seed * 3 + SPLITS.index(split))
        else:
            from .tasks import build_pool

            pools[split] = build_pool(dataset, split, data.n_way, data.k_shot, data.q_query, sizes[split], seed=data.pool_seed)
            if split == "train" and data.corrupt_tasks > 0:
                from .tasks import corrupt_labels

                pools[split] = corrupt_labels(pools[split], data.corrupt_tasks, data.corrupt_labels, where=data.corrupt_where, seed=data.pool_seed)
    return pools


def build_problem(settings: RunSettings, dataset) -> MetaProblem:
    """The model (initialised from ``settings.train.seed``), loss and inner solver."""
    if dataset is None:
        input_shape, out, loss = (1,), 1, "mse"
    else:
        input_shape, out, loss = tuple(dataset.image_shape), settings.data.n_way, "cross_entropy"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        model = build_model(settings.model, input_shape, out)
    inner = dataclasses.replace(settings.inner)
    return MetaProblem(model, loss, inner, weight_decay=settings.objective.weight_decay, chunk_size=settings.objective.pool_chunk or None)


def prepare_run(settings: RunSettings, out: str | os.PathLike | None = None, splits: tuple[str, ...] = SPLITS, save_pools: bool = True, log: Callable[[str], None] | None = None) -> RunContext:
    """Load the dataset, build (and save under ``out/pools``) the pools, build the problem."""
    settings.validate()
    log = log or (lambda s: None)
    dataset = load_data(settings.data)
    if dataset is not None:
        log(f"dataset: {dataset!r}")
    pools = build_pools(settings.data, dataset, splits)
    # build the model before writing anything, so a model that cannot take these inputs leaves no files
    problem = build_problem(settings, dataset)
    out_path = Path(out) if out is not None else None
    if out_path is not None and save_pools:
        for name, pool in pools.items():
            pool.save(out_path / "pools" / name)
    tensors, standardization = pool_tensors(pools, dataset, settings.data)
    for name, pool in pools.items():
        log(f"{name} pool: {pool.summary()}")
    return RunContext(settings, dataset, pools, tensors, problem, out_path, standardization)


def _stage_settings(settings: RunSettings) -> dict[str, Any]:
    d = to_dict(settings)
    d.pop("train", None)
    d.pop("refine", None)
    return d


# --------------------------------------------------------------------------- stages
def train_stage(ctx: RunContext, progress: bool = True, resume: str | os.PathLike | None = None) -> tuple[torch.Tensor, TrainHistory, Path | None]:
    """Meta-train on the train pool; writes ``out/trained`` (checkpoint) when the context has a folder."""
    s = ctx.settings
    lam0 = ctx.problem.init_params(torch.float32)
    ckpt = ctx.out / "trained" if ctx.out is not None else None
    lam, history = meta_train(
        ctx.problem, lam0, ctx.tensors["train"], s.train, checkpoint_path=ckpt, progress=progress,
        pools=ctx.pool_records(), run_settings=_stage_settings(s), resume=resume,
    )
    return lam, history, (ckpt.with_suffix(".safetensors") if ckpt is not None else None)


def evaluate_stage(ctx: RunContext, lam: torch.Tensor, splits: tuple[str, ...] = ("test",)) -> dict[str, EvalResult]:
    return {split: evaluate(ctx.problem, lam, ctx.tensors[split]) for split in splits if split in ctx.tensors}


def refine_stage(ctx: RunContext, lam: torch.Tensor, progress: bool = True, w: torch.Tensor | None = None) -> tuple[torch.Tensor, RefineReport]:
    return refine(ctx.problem, lam, ctx.tensors["train"], ctx.settings.refine, w=w, progress=progress)


def save_stage_checkpoint(
    ctx: RunContext, name: str, lam: torch.Tensor, kind: str, metrics: Mapping[str, Any],
    refine_report: RefineReport | None = None, history: TrainHistory | None = None, step: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out/NAME`` with the run's settings, pool records and the given metrics (and ``state``,
    e.g. the Adam moments kept from the training checkpoint so it can still be resumed)."""
    if ctx.out is None:
        raise SettingsError("this run has no output folder; pass --out")
    return save_checkpoint(
        ctx.out / name, lam, problem=ctx.problem, kind=kind, settings=to_dict(ctx.settings), pools=ctx.pool_records(),
        metrics=metrics, refine_report=refine_report.to_json() if refine_report is not None else None,
        history=history.to_json() if history is not None else None, step=step, state=state,
    )


def _evals_json(results: Mapping[str, EvalResult]) -> dict:
    return {k: v.to_json() for k, v in results.items()}


# --------------------------------------------------------------------------- from a checkpoint
def context_from_checkpoint(path: str | os.PathLike, data_root: str | None = None, splits: tuple[str, ...] = ("train",), test_tasks: int | None = None, overrides: Callable[[RunSettings], RunSettings] | None = None) -> tuple[RunContext, Checkpoint]:
    """Rebuild the run a checkpoint came from (settings, dataset, pools, problem) and load it,
    refusing it if its model or training pool differ from the rebuilt ones.

    Pools are read from the files the checkpoint names (``pools/NAME`` next to it) when present,
    else rebuilt from the recorded settings; either way the training pool must match the recorded
    fingerprint.
    """
    from .meta.checkpoint import read_checkpoint_record

    splits = ("train", *[s for s in splits if s != "train"])
    record = read_checkpoint_record(path)
    try:
        settings = settings_from_dict(RunSettings, record.get("settings") or {}, source=f"checkpoint {path}")
    except SettingsError as exc:
        raise CheckpointError(f"checkpoint {path} has settings this version cannot read ({exc}); use the metainfluence version that wrote it") from None
    if data_root is not None:
        settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, data_root=data_root))
    if test_tasks is not None:
        settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, test_tasks=test_tasks))
    if overrides is not None:
        settings = overrides(settings)
    settings.validate()
    dataset = load_data(settings.data)
    folder = Path(path).expanduser().parent
    recorded = record.get("pools") or {}
    pools: dict[str, Any] = {}
    rebuilt = build_pools(settings.data, dataset, splits)
    for split in splits:
        rec = recorded.get(split) or {}
        file = rec.get("file")
        want = {"train": settings.data.train_tasks, "val": settings.data.val_tasks, "test": settings.data.test_tasks}[split]
        pool = None
        if file and (folder / f"{file}.json").is_file():
            from .tasks import load_pool

            try:
                loaded = load_pool(folder / file, dataset=dataset) if dataset is not None else load_pool(folder / file)
            except PoolError:
                loaded = None
            if loaded is not None and len(loaded) == want:
                pool = loaded
        pools[split] = pool if pool is not None else rebuilt[split]
    tensors, standardization = pool_tensors(pools, dataset, settings.data)
    problem = build_problem(settings, dataset)
    ckpt = load_checkpoint(path, expected_problem=problem, expected_pool=pools["train"] if recorded.get("train", {}).get("kind") == "pool" else tensors["train"])
    if "tensors_fingerprint" in recorded.get("train", {}):
        check_pool(ckpt, tensors["train"])  # the inputs as trained on, standardisation included
    return RunContext(settings, dataset, pools, tensors, problem, folder, standardization), ckpt


# --------------------------------------------------------------------------- influence and editing
def influence_stage(ctx: RunContext, lam: torch.Tensor, settings: Any, level: str = "task"):
    """Scores of the training pool's tasks (level 'task') or examples ('support' / 'query') against the
    validation pool's mean query loss (SPEC §7), with the pool's stable task ids."""
    from .influence import instance_influence, task_influence

    dtype = lam.dtype
    train, val = ctx.tensors["train"].to(dtype=dtype), ctx.tensors["val"].to(dtype=dtype)
    ids = torch.as_tensor(ctx.pools["train"].task_ids)
    if level == "task":
        return task_influence(ctx.problem, lam, train, val, settings, task_ids=ids)
    if level in ("support", "query"):
        return instance_influence(ctx.problem, lam, train, val, level, settings, task_ids=ids)
    raise SettingsError(f"unknown influence level {level!r}; use task, support or query")


def edit_stage(ctx: RunContext, lam: torch.Tensor, removal: Any, settings: Any, newton_steps: int = 0):
    """Closed-form removal (SPEC §5) on the training pool; returns the EditResult."""
    from .influence import edit_model

    return edit_model(ctx.problem, lam, ctx.tensors["train"].to(dtype=lam.dtype), removal, settings, newton_steps=newton_steps)


def removal_from_scores(result: Any, k: int) -> Any:
    """A Removal of the k most harmful items of a scores file (tasks or examples), by local row index."""
    from .influence import Removal

    total = result.scores.numel()
    if not 1 <= k <= total:
        raise SettingsError(f"--top-k {k} is outside 1..{total} (the number of scored items); choose a smaller k")
    order = result.ranking(harmful_first=True)[:k]
    if result.level == "task":
        return Removal(tasks=sorted(order.tolist()))
    mask = torch.zeros(result.scores.numel(), dtype=torch.bool)
    mask[order] = True
    mask = mask.reshape(result.scores.shape)
    return Removal(support=mask) if result.level == "support" else Removal(query=mask)


def demo_settings() -> RunSettings:
    """The demo's defaults: the digits pools with 20% of the training tasks mislabeled."""
    settings = RunSettings()
    settings.data.corrupt_tasks = 0.2
    return settings


def _influence_demo(ctx: RunContext, lam: torch.Tensor, before: Mapping[str, EvalResult], out: Path, log: Callable[[str], None]) -> dict:
    """task-IF on the (partly corrupted) training pool, detection of the corrupted tasks, closed-form edit."""
    from .evaluation.metrics import detection_auc, recall_at
    from .influence import InfluenceSettings

    from .errors import DivergenceError

    settings = InfluenceSettings(hessian="exact", solver="cg", damping=1e-3, tol=1e-6, max_iter=300)
    t = time.perf_counter()
    try:
        result = influence_stage(ctx, lam, settings)
    except DivergenceError as exc:
        # λ is not at a minimum (indefinite total Hessian): say so, and use the PSD Gauss–Newton kind
        log(f"warning: {exc}; falling back to hessian=gauss-newton")
        settings = dataclasses.replace(settings, hessian="gauss-newton")
        result = influence_stage(ctx, lam, settings)
    influence_s = time.perf_counter() - t
    from .meta.checkpoint import pool_fingerprint

    result.save(out / "task_influence", pool_fingerprint=pool_fingerprint(ctx.pools["train"]))
    pool = ctx.pools["train"]
    corrupted = torch.as_tensor(pool.corrupted_tasks).bool()
    n, n_bad = len(corrupted), int(corrupted.sum())
    summary: dict[str, Any] = {"hessian": settings.hessian, "influence_s": influence_s, "solver_residual": result.diagnostics["solver"]["residual"],
                               "stationarity_ratio": result.diagnostics["stationarity"]["ratio"], "n_corrupted": n_bad}
    order = result.ranking(harmful_first=True)
    if n_bad:
        summary["recall_at_corrupted_fraction"] = recall_at(order, corrupted, n_bad / n)
        summary["recall_at_1.25x"] = recall_at(order, corrupted, min(1.0, 1.25 * n_bad / n))
        summary["auc"] = detection_auc(-result.scores, corrupted)
    k = n_bad or max(1, n // 10)
    removal = removal_from_scores(result, k)
    t = time.perf_counter()
    edited = edit_stage(ctx, lam, removal, settings)
    summary["edit_s"] = time.perf_counter() - t
    summary["removed_tasks"] = len(removal.tasks)
    summary["removed_corrupted"] = int(corrupted[removal.tasks].sum())
    after = evaluate_stage(ctx, edited.lam, ("val", "test"))
    summary["eval_before_edit"] = _evals_json(before)
    summary["eval_after_edit"] = _evals_json(after)
    summary["edit_residual"] = edited.diagnostics["solver_residual"]
    save_stage_checkpoint(ctx, "edited", edited.lam, "edited", {"eval": _evals_json(after), "removed_tasks": removal.tasks})
    return summary


# --------------------------------------------------------------------------- the demo
def run_demo(settings: RunSettings | None = None, out: str | os.PathLike = "runs/demo", progress: bool = True, log: Callable[[str], None] = print,
             influence_step: bool = True) -> dict:
    """Build pools on the embedded digits data (by default), meta-train, refine, evaluate, and write
    everything under ``out``. Returns a dict with the context (``"context"``), both λ, the refine
    report, evaluation results and the summary written to ``out/summary.json``."""
    settings = settings or demo_settings()
    t_start = time.perf_counter()
    out = Path(out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    ctx = prepare_run(settings, out, log=log)
    write_json(out / "settings.json", to_dict(settings))
    timings["data_and_pools_s"] = time.perf_counter() - t
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

    train_state = load_checkpoint(out / "trained", expected_problem=ctx.problem).state
    save_stage_checkpoint(ctx, "trained", lam_trained, "trained", {"eval": _evals_json(eval_trained)}, history=history, step=history.steps_done, state=train_state)
    save_stage_checkpoint(ctx, "refined", lam_refined, "refined", {"eval": _evals_json(eval_refined)}, refine_report=report, history=history, step=history.steps_done)

    t = time.perf_counter()
    influence = _influence_demo(ctx, lam_refined, eval_refined, out, log) if influence_step else None
    timings["influence_and_edit_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    summary = {
        "pools": {name: pool.summary() for name, pool in ctx.pools.items()},
        "model": {"kind": type(ctx.problem.model).__name__, "n_params": ctx.problem.dim},
        "standardization": ctx.standardization,
        "train": {"steps": history.steps_done, "tasks_per_second": history.tasks_per_second, "wall_time_s": history.wall_time_s},
        "eval_trained": _evals_json(eval_trained),
        "eval_refined": _evals_json(eval_refined),
        "refine": report.to_json(),
        "influence": influence,
        "timings": timings,
        "files": {"trained": "trained.safetensors", "refined": "refined.safetensors", "pools": "pools/", "settings": "settings.json"},
    }
    write_json(out / "summary.json", summary)
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
    lines = [
        "",
        "== metainfluence demo ==",
        *[f"{name:>5} pool: {text}" for name, text in summary["pools"].items()],
        f"model: {summary['model']['kind']}, {summary['model']['n_params']} parameters; "
        f"meta-training: {summary['train']['steps']} steps, {summary['train']['wall_time_s']:.1f} s",
        *([f"inputs standardised with the training pool's per-pixel mean and sd {summary['standardization']['sd']:.3f}"] if summary.get("standardization") else []),
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
        if inf["n_corrupted"]:
            lines.append(
                f"mislabeled tasks: {inf['n_corrupted']}; among the {inf['removed_tasks']} most harmful by task-IF: {inf['removed_corrupted']} "
                f"(recall {inf['recall_at_corrupted_fraction']:.2f}; at 1.25× that many: {inf['recall_at_1.25x']:.2f}; AUC {inf['auc']:.3f})")
        lines += [
            f"closed-form edit removing them ({inf['edit_s']:.1f} s, no retraining): meta-test {_fmt_eval(b)} → {_fmt_eval(a)}",
        ]
    lines.append(f"total {summary['timings']['total_s']:.1f} s; outputs in {out}/ (checkpoints, pools/, task_influence scores, summary.json)")
    return lines
