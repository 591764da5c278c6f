"""Meta-training: Adam on the flat meta-parameters λ with meta-batches from a fixed task pool.

Each step draws ``meta_batch`` distinct tasks of the pool with a seeded ``torch.Generator`` and
takes one Adam step along the meta-gradient of the batch objective
F_B(λ) = (1/|B|) Σ_{i∈B} L_Q^i(λ) + (μ/2)‖λ‖² (docs/method.md §1), computed by
:meth:`MetaProblem.value_and_gradient` — vmapped over the batch's tasks, no Python loop over tasks.
The same seed gives bit-identical λ (on the same machine, torch build and thread count).

Training ends with a λ that is *not* stationary for the full pool (docs/method.md §2); run
:func:`metainfluence.meta.refine.refine` before computing influence.

A NaN/inf loss, gradient or λ stops training with a :class:`DivergenceError` that says what to
change; checkpoints are written atomically every ``checkpoint_every`` steps and only from finite
λ, so the last good checkpoint survives a divergence.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import to_dict
from ..errors import CheckpointError, DivergenceError, SettingsError, require
from ..progress import log_lines, status_line
from ..tasks.tensors import TaskTensors
from .checkpoint import Checkpoint, load_checkpoint, pool_record, save_checkpoint
from .evaluate import evaluate
from .inner import InnerSettings
from .objective import MetaProblem
from .refine_monitor import check_start_lambda

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SettingsError(f"unknown dtype {name!r}; use float32 or float64")
    return DTYPES[name]


@dataclass
class TrainSettings:
    """Settings of meta-training (Adam on λ, meta-batches from a fixed pool)."""

    meta_batch: int = field(default=32, metadata={"help": "tasks per meta-batch, drawn without replacement from the pool each step (at most the pool size)"})
    steps: int = field(default=1000, metadata={"help": "number of Adam steps on λ"})
    lr: float = field(default=1e-3, metadata={"help": "outer (Adam) learning rate on λ"})
    lr_schedule: str = field(default="constant", metadata={"help": "outer lr over the steps: constant | cosine (lr·(1+cos(π·step/steps))/2, decaying to 0 at steps; a function of the step, so resuming is exact)", "choices": ("constant", "cosine")})
    seed: int = field(default=0, metadata={"help": "seed of the model initialisation and of the meta-batch sampler"})
    chunk_size: int = field(default=0, metadata={"help": "tasks per vmapped chunk inside a meta-batch (0 = the problem's own: pool_chunk, or as many as fit the automatic memory budget); lower it to save memory"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    dtype: str = field(default="float32", metadata={"help": "precision of training: float32 | float64", "choices": ("float32", "float64")})
    log_every: int = field(default=10, metadata={"help": "steps between accuracy measurements on the meta-batch (progress bar and history); "
                                                         "with --no-progress also a line every N steps (loss, accuracy, tasks/s, time)"})
    validate_every: int = field(default=0, metadata={"help": "steps between evaluations on the validation pool (recorded in the history with their wall time, to pick a step count on validation tasks; 0 = never)"})
    first_order_steps: int = field(default=0, metadata={"help": "take the first N steps first-order (FOMAML: no gradient through the inner gradients; cheaper), then the inner solver's own order (a warm-up; 0 = never)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop after this many minutes of training (0 = no limit; a time limit makes the step count machine-dependent)"})

    def validate(self) -> None:
        if self.meta_batch < 1:
            raise SettingsError(f"meta_batch must be ≥ 1, got {self.meta_batch}")
        if self.steps < 0:
            raise SettingsError(f"steps must be ≥ 0, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"outer lr must be a positive number, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise SettingsError(f"unknown lr_schedule {self.lr_schedule!r}; use constant or cosine")
        if self.chunk_size < 0 or self.checkpoint_every < 0 or self.log_every < 1:
            raise SettingsError("chunk_size and checkpoint_every must be ≥ 0 and log_every ≥ 1")
        if self.first_order_steps < 0 or self.validate_every < 0:
            raise SettingsError(f"first_order_steps and validate_every must be ≥ 0, got {self.first_order_steps} and {self.validate_every}")
        if not (math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise SettingsError(f"max_minutes must be ≥ 0, got {self.max_minutes}")
        parse_dtype(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def lr_at(self, step: int) -> float:
        """Outer lr of the step that starts after ``step`` steps (0-based)."""
        if self.lr_schedule == "cosine" and self.steps > 0:
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, self.steps) / self.steps))
        return self.lr


@dataclass
class TrainHistory:
    """Per-step batch query loss and meta-gradient norm; batch accuracy every ``log_every`` steps (at steps
    log_every, 2·log_every, …)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    accuracy_step: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    # validation-pool accuracy (mean over tasks) after val_step steps, at val_time_s seconds of training
    val_step: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_time_s: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    tasks_seen: int = 0
    stopped: str = "completed"

    @property
    def steps_done(self) -> int:
        return self.step[-1] if self.step else 0

    @property
    def tasks_per_second(self) -> float:
        return self.tasks_seen / self.wall_time_s if self.wall_time_s > 0 else float("nan")

    def recent_loss(self, k: int = 50) -> float:
        tail = self.loss[-k:]
        return sum(tail) / len(tail) if tail else float("nan")

    def recent_accuracy(self, k: int = 5) -> float:
        tail = [a for a in self.accuracy[-k:] if not math.isnan(a)]
        return sum(tail) / len(tail) if tail else float("nan")

    def to_json(self) -> dict:
        out = asdict(self)
        out["tasks_per_second"] = self.tasks_per_second
        out["loss_meaning"] = "mean query loss of the step's meta-batch after adaptation, before the step"
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainHistory":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def sample_batch(generator: torch.Generator, n_tasks: int, meta_batch: int) -> torch.Tensor:
    """Indices of one meta-batch: ``meta_batch`` distinct tasks (all ``n_tasks`` when the pool is smaller)."""
    if meta_batch >= n_tasks:
        return torch.arange(n_tasks)
    return torch.randperm(n_tasks, generator=generator)[:meta_batch]


def batch_schedule(n_tasks: int, meta_batch: int, seed: int, steps: int) -> list[torch.Tensor]:
    """The task indices every step of :func:`meta_train` uses (for inspection and tests)."""
    g = torch.Generator().manual_seed(int(seed))
    return [sample_batch(g, n_tasks, meta_batch) for _ in range(steps)]


def _not_finite(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


def step_line(history: TrainHistory, total_steps: int, window: int, tasks_per_second: float) -> str:
    """The line printed every ``window`` steps without a bar: mean batch loss over the window, the latest batch
    accuracy (of this step's meta-batch, like the loss after adaptation and before the step; absent for regression),
    throughput over the window, training time (validation excluded)."""
    acc = history.recent_accuracy(1)
    acc_text = "" if math.isnan(acc) else f", acc {100 * acc:.1f}%"
    return (f"step {history.steps_done}/{total_steps}: loss {history.recent_loss(window):.4f}{acc_text}, "
            f"{tasks_per_second:.0f} tasks/s, after {history.wall_time_s / 60:.2f} min")  # the time as the validation lines say it


def _same_problem(ckpt: Checkpoint, problem: MetaProblem) -> None:
    """Resuming continues one objective: the loss, inner loop and weight decay the checkpoint was trained with (steps
    of another objective would be mixed into λ and the record would name only the new one)."""
    saved, now = ckpt.info.get("problem") or {}, json.loads(json.dumps(problem.settings_json()))  # tuples as the record's lists
    pairs = [("loss", saved.get("loss"), now["loss"]), ("weight_decay", saved.get("weight_decay"), now["weight_decay"])]
    inner, defaults = saved.get("inner") or {}, asdict(InnerSettings())
    if inner:  # a setting a record leaves out is at its default (adapt: older runs, and MAML's records, adapt every parameter)
        inner = {**defaults, **inner}
    now_inner = {**defaults, **now["inner"]}
    pairs += [(f"inner.{k}", v, now_inner.get(k)) for k, v in inner.items() if k != "eval_steps"]
    for key, was, new in pairs:
        if was is not None and was != new:
            raise CheckpointError(f"cannot resume: the checkpoint was trained with {key}={was!r}, not {new!r}; resume with the same "
                                  f"settings, or train afresh into another output folder")


def resumable_checkpoint(resume: str | os.PathLike | Checkpoint, problem: MetaProblem, pool_tensors: TaskTensors,
                         settings: TrainSettings) -> Checkpoint:
    """The checkpoint ``resume``, refused unless meta_train can continue it on this problem, pool and training
    settings (callers check before they write anything of the new run)."""
    ckpt = resume if isinstance(resume, Checkpoint) else load_checkpoint(resume, expected_problem=problem, expected_pool=pool_tensors)
    needed = {"adam.exp_avg", "adam.exp_avg_sq", "adam.step", "sampler"}
    if not needed <= set(ckpt.state):
        raise CheckpointError(f"checkpoint {ckpt.path} holds no optimiser state to resume from; resume from a checkpoint written by meta_train")
    saved = (ckpt.settings or {}).get("train", {})
    # a cosine schedule is a function of the step and of its length, so the length must match too
    keys = ("meta_batch", "lr", "lr_schedule", "seed", "dtype") + (("steps",) if settings.lr_schedule == "cosine" else ())
    for key in keys:
        if key in saved and saved[key] != getattr(settings, key):
            raise CheckpointError(f"cannot resume: the checkpoint was trained with {key}={saved[key]!r}, not {getattr(settings, key)!r}; use the same training settings")
    _same_problem(ckpt, problem)
    return ckpt


def meta_train(
    problem: MetaProblem,
    lam0: torch.Tensor,
    pool_tensors: TaskTensors,
    settings: TrainSettings | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    pools: Mapping[str, Any] | None = None,
    run_settings: Mapping[str, Any] | None = None,
    resume: str | os.PathLike | Checkpoint | None = None,
    example_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    validation: TaskTensors | None = None,
) -> tuple[torch.Tensor, TrainHistory]:
    """Meta-train λ from ``lam0`` on ``pool_tensors``; returns (λ, history).

    ``checkpoint_path``: stem of the checkpoint written every ``settings.checkpoint_every`` steps and
    at the end (with Adam moments and the sampler state, so ``resume`` continues bit-identically).
    ``pools``: name → pool object or record (recorded in the checkpoint; the training pool's tensor
    fingerprint is always recorded). ``run_settings``: the other stages' settings to record
    (model, inner, data, ...). ``resume``: a checkpoint written by this function to continue from.
    ``example_weights``: (v, u) of shapes (n, |S|), (n, |Q|) — per-example weights of the support and
    query losses (docs/method.md §1; 0 removes an example), e.g. to retrain without some examples.
    ``validation``: tasks evaluated every ``settings.validate_every`` steps (time spent there is not
    counted as training time).
    """
    check_start_lambda(lam0, pool_tensors=pool_tensors, validation=validation)  # a state_dict or a list is refused with the remedy, not an AttributeError below
    settings = settings or TrainSettings()
    settings.validate()
    dtype = settings.torch_dtype
    device = lam0.device
    tasks = pool_tensors.to(device=device, dtype=dtype)
    n = len(tasks)
    require(settings.meta_batch <= n, f"meta_batch {settings.meta_batch} is larger than the training pool of {n} tasks; set meta_batch ≤ {n} (= {n} for full-batch steps) or build a larger pool")
    v_all, u_all = problem.example_weights(tasks, example_weights, lam0.to(dtype))
    if settings.chunk_size:
        problem = copy.copy(problem)
        problem.chunk_size = settings.chunk_size
    mu = problem.weight_decay
    # the warm-up's problem: the same one with first-order inner steps (a shallow copy shares the model)
    warmup = problem
    if settings.first_order_steps and problem.inner.kind == "unrolled" and not problem.inner.first_order:
        warmup = copy.copy(problem)
        warmup.inner = dataclasses.replace(problem.inner, first_order=True)

    lam = lam0.detach().to(dtype=dtype).clone()
    if _not_finite(lam):
        raise DivergenceError("the initial meta-parameters contain NaN or inf; start from a finite λ (e.g. problem.init_params())")
    optimizer = torch.optim.Adam([lam], lr=settings.lr)
    generator = torch.Generator().manual_seed(int(settings.seed))
    history = TrainHistory()
    start_step = 0

    pool_records: dict[str, Any] = {}
    for name, pool in (pools or {}).items():
        pool_records[name] = dict(pool) if isinstance(pool, Mapping) else pool_record(pool)
    # The training pool's record always carries the fingerprint of the tensors actually trained on.
    train_rec = dict(pool_records.get("train", {}))
    tensors_rec = pool_record(pool_tensors)
    for key in ("kind", "fingerprint"):
        train_rec.setdefault(key, tensors_rec[key])
    train_rec["tensors_fingerprint"] = tensors_rec["tensors_fingerprint"]
    train_rec["n_tasks"] = n
    pool_records["train"] = train_rec
    all_settings = {**to_dict(dict(run_settings or {})), "train": to_dict(settings)}

    if resume is not None:
        ckpt = resumable_checkpoint(resume, problem, pool_tensors, settings)
        with torch.no_grad():
            lam.copy_(ckpt.lam.to(dtype))
        optimizer.state[lam] = {
            "step": ckpt.state["adam.step"].clone(),
            "exp_avg": ckpt.state["adam.exp_avg"].to(dtype).clone(),
            "exp_avg_sq": ckpt.state["adam.exp_avg_sq"].to(dtype).clone(),
        }
        generator.set_state(ckpt.state["sampler"].clone())
        start_step = int(ckpt.step or 0)
        if ckpt.info.get("history"):
            history = TrainHistory.from_json(ckpt.info["history"])
            history.stopped = "completed"  # this run's own stop, if any, is set below
        if log_lines():
            status_line(f"resuming from step {start_step} of {settings.steps} ({ckpt.path})")

    last_saved: dict[str, Any] = {"step": None}

    def save(step: int, kind: str) -> None:
        if checkpoint_path is None:
            return
        st = optimizer.state.get(lam, {})
        state = {"sampler": generator.get_state()}
        if st:
            state.update({"adam.step": st["step"], "adam.exp_avg": st["exp_avg"], "adam.exp_avg_sq": st["exp_avg_sq"]})
        metrics = {"batch_loss_recent": history.recent_loss(), "batch_accuracy_recent": history.recent_accuracy(), "steps_done": step}
        save_checkpoint(
            checkpoint_path, lam, problem=problem, kind=kind, settings=all_settings, pools=pool_records,
            metrics=metrics, history=history.to_json(), step=step, state=state,
        )
        last_saved["step"] = step

    def diverged(step: int, what: str) -> DivergenceError:
        if last_saved["step"] is not None:
            kept = f"the last good checkpoint {Path(checkpoint_path)}.safetensors (step {last_saved['step']}) is intact"
        elif checkpoint_path is not None:
            kept = "no checkpoint was written yet"
        else:
            kept = "no checkpoint path was given"
        return DivergenceError(
            f"meta-training diverged at step {step}: {what} is NaN/inf; lower the outer lr (now {settings.lr:g}) "
            f"or the inner lr (now {problem.inner.lr:g}) and train again; {kept}"
        )

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start_step, desc="meta-train", unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)
    # without a bar, the CLI's --no-progress wants a line every log_every steps; a library call stays quiet
    lines = bar is None and log_lines()
    t0 = time.perf_counter()
    wall_before = history.wall_time_s
    deadline = t0 + 60.0 * settings.max_minutes if settings.max_minutes > 0 else None
    step = start_step
    mark = (history.tasks_seen, history.wall_time_s)  # the line's window starts here: its tasks/s excludes validation time
    try:
        while step < settings.steps:
            idx = sample_batch(generator, n, settings.meta_batch)
            batch = tasks.subset(idx)
            current = warmup if step < settings.first_order_steps else problem
            if v_all is None:
                value, gradient = current.value_and_gradient(lam, batch)
            else:
                value, gradient = current.value_and_gradient(lam, batch, v=v_all[idx], u=u_all[idx])
            query_loss = float(value) - (0.5 * mu * float((lam * lam).sum()) if mu else 0.0)
            if not math.isfinite(float(value)):
                raise diverged(step + 1, "the meta-batch loss")
            if _not_finite(gradient):
                raise diverged(step + 1, "the meta-gradient")
            if (step + 1) % settings.log_every == 0:  # the last step of each log_every window: its line shows it
                _, acc = problem.task_metrics(lam, batch)
                history.accuracy_step.append(step + 1)
                history.accuracy.append(float(acc.mean()))
            lam.grad = gradient.to(dtype)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(step)
            optimizer.step()
            lam.grad = None
            if _not_finite(lam):
                raise diverged(step + 1, "λ after the Adam step")
            step += 1
            history.step.append(step)
            history.loss.append(query_loss)
            history.grad_norm.append(float(gradient.norm()))
            history.tasks_seen += len(idx)
            history.wall_time_s = wall_before + time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                if step % settings.log_every == 0 or step == settings.steps:
                    acc_recent = history.recent_accuracy(1)
                    post = {"loss": f"{history.recent_loss(settings.log_every):.3f}"}
                    if not math.isnan(acc_recent):
                        post["acc"] = f"{acc_recent:.3f}"
                    bar.set_postfix(post, refresh=False)
            elif lines and step % settings.log_every == 0:
                seconds = history.wall_time_s - mark[1]
                rate = (history.tasks_seen - mark[0]) / seconds if seconds > 0 else float("nan")
                status_line(step_line(history, settings.steps, settings.log_every, rate))
                mark = (history.tasks_seen, history.wall_time_s)
            if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < settings.steps:
                save(step, "in-progress")
            if validation is not None and settings.validate_every and step % settings.validate_every == 0:
                t_val = time.perf_counter()
                result = evaluate(problem, lam.detach(), validation)
                history.val_step.append(step)
                history.val_accuracy.append(result.accuracy)
                history.val_time_s.append(history.wall_time_s)
                if bar is None:  # without a progress bar, one line per evaluation shows the curve
                    status_line(f"step {step}: val accuracy {100 * result.accuracy:.2f}% ± {100 * result.accuracy_ci95:.2f}% "
                            f"after {history.wall_time_s / 60:.2f} min")
                else:
                    bar.set_postfix({"val": f"{result.accuracy:.3f}"}, refresh=False)
                # evaluation is not training time, for the time limit either
                paused = time.perf_counter() - t_val
                t0 += paused
                if deadline is not None:
                    deadline += paused
            if deadline is not None and problem.collective.any_true(time.perf_counter() >= deadline):
                history.stopped = f"time limit ({settings.max_minutes:g} min) after {step} steps"
                break
    except DivergenceError:
        history.stopped = "diverged"
        raise
    finally:
        if bar is not None:
            bar.close()
    history.wall_time_s = wall_before + time.perf_counter() - t0
    save(step, "trained")
    return lam.detach(), history
