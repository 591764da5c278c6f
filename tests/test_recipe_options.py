"""Options of the Omniglot Conv4 recipe: stride pooling, first-order warm-up, evaluation-time inner
steps, and the shipped config (float64 wherever numbers are compared)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.config import config_sections, load_settings
from metainfluence.errors import SettingsError
from metainfluence.meta import TrainSettings, evaluate, meta_train
from metainfluence.meta.models import Conv4, ModelSettings, build_model
from metainfluence.meta.objective import InnerSettings
from metainfluence.pipeline import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def _conv_params(c_in: int, width: int) -> int:
    return c_in * width * 9 + width + 3 * (width * width * 9 + width)


# --------------------------------------------------------------------------- stride pooling
@pytest.mark.parametrize("size, side", [(28, 2), (84, 6), (5, 1)])
def test_stride_pool_shrinks_by_ceil_half_and_counts_the_documented_parameters(size, side):
    model = build_model(ModelSettings(kind="conv4", width=8, pool="stride", norm="batch"), (1, size, size), 5)
    x = torch.randn(3, 1, size, size)
    assert tuple(model.features(x).shape) == (3, 8, side, side)  # s → ⌈s/2⌉ four times
    assert tuple(model(x).shape) == (3, 5)
    n_bn = 4 * 2 * 8
    assert sum(p.numel() for p in model.parameters()) == _conv_params(1, 8) + n_bn + 8 * side * side * 5 + 5
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert all(m.stride == (2, 2) for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_max_pool_is_still_the_default_and_unknown_pools_are_refused():
    model = build_model(ModelSettings(kind="conv4", width=8), (1, 28, 28), 5)
    assert tuple(model.features(torch.randn(2, 1, 28, 28)).shape) == (2, 8, 1, 1)  # ⌊s/2⌋: 28 → 1
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 4
    with pytest.raises(SettingsError, match="pool"):
        ModelSettings(kind="conv4", pool="avg").validate()
    with pytest.raises(SettingsError, match="pool"):
        Conv4(1, 28, 5, pool="avg")
    with pytest.raises(SettingsError, match="pool"):
        dataclasses.replace(RunSettings(), model=ModelSettings(pool="avg")).validate()


# --------------------------------------------------------------------------- first-order warm-up
def test_first_order_warmup_switches_to_second_order_at_the_given_step():
    problem, lam0 = small_problem(steps=2, lr=0.5)
    tasks = random_tasks(n=6, seed=5)
    first = dataclasses.replace(problem.inner, first_order=True)
    fo_problem = type(problem)(problem.model, "cross_entropy", first, weight_decay=problem.weight_decay)
    # meta_batch ≥ pool: every step's batch is the whole pool, so each step's gradient is a pool gradient
    settings = TrainSettings(meta_batch=6, steps=5, lr=0.05, dtype="float64", checkpoint_every=0, first_order_steps=2)
    _, history = meta_train(problem, lam0, tasks, settings, progress=False)
    for s in range(5):
        lam_s, _ = meta_train(problem, lam0, tasks, dataclasses.replace(settings, steps=s), progress=False)
        so = float(problem.meta_gradient(lam_s, tasks).norm())
        fo = float(fo_problem.meta_gradient(lam_s, tasks).norm())
        assert abs(so - fo) > 1e-4 * so  # the two orders differ here, so the check can fail
        expected = fo if s < 2 else so
        assert history.grad_norm[s] == pytest.approx(expected, rel=1e-12), (s, history.grad_norm[s], fo, so)
    with pytest.raises(SettingsError, match="first_order_steps"):
        TrainSettings(first_order_steps=-1).validate()


# --------------------------------------------------------------------------- evaluation steps
def test_eval_steps_change_evaluation_only():
    problem, lam = small_problem(steps=1, lr=0.5)
    tasks = random_tasks(n=8, seed=6)
    three, _ = small_problem(steps=3, lr=0.5)
    with_eval = type(problem)(problem.model, "cross_entropy", dataclasses.replace(problem.inner, eval_steps=3), weight_decay=problem.weight_decay)
    assert evaluate(with_eval, lam, tasks).per_task_loss == evaluate(three, lam, tasks).per_task_loss
    assert evaluate(with_eval, lam, tasks).loss != evaluate(problem, lam, tasks).loss
    # training and influence see the training steps
    assert torch.equal(with_eval.meta_gradient(lam, tasks), problem.meta_gradient(lam, tasks))
    assert with_eval.inner.steps == 1
    with pytest.raises(SettingsError, match="eval_steps"):
        InnerSettings(eval_steps=-1).validate()


# --------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("name", ["omniglot_conv4.toml", "mnist_conv4.toml", "fashion_mnist_conv4.toml"])
def test_shipped_training_config_loads_into_valid_settings(name):
    path = ROOT / "configs" / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped")
    sections = config_sections(path, ("data", "model", "inner", "objective", "train"), ("data", "model", "inner", "objective", "train", "refine"))
    settings = load_settings(RunSettings(), sections)
    settings.validate()
    assert settings.model.kind == "conv4" and settings.model.pool == "stride"
    assert settings.train.max_minutes <= 30
    assert settings.inner.eval_steps >= settings.inner.steps


def test_validate_every_records_the_validation_curve_without_changing_training():
    problem, lam0 = small_problem(steps=1, lr=0.5)
    tasks, val = random_tasks(n=6, seed=7), random_tasks(n=4, seed=8)
    settings = TrainSettings(meta_batch=3, steps=7, lr=0.05, dtype="float64", checkpoint_every=0, validate_every=3)
    lam, history = meta_train(problem, lam0, tasks, settings, progress=False, validation=val)
    plain, _ = meta_train(problem, lam0, tasks, dataclasses.replace(settings, validate_every=0), progress=False, validation=val)
    assert torch.equal(lam, plain)
    assert history.val_step == [3, 6] and len(history.val_time_s) == 2
    lam3, _ = meta_train(problem, lam0, tasks, dataclasses.replace(settings, steps=3), progress=False)
    assert history.val_accuracy[0] == evaluate(problem, lam3, val).accuracy


def test_cosine_schedule_matches_adam_with_the_lr_set_per_step():
    problem, lam0 = small_problem(steps=1, lr=0.5)
    tasks = random_tasks(n=5, seed=9)
    settings = TrainSettings(meta_batch=5, steps=4, lr=0.05, dtype="float64", checkpoint_every=0, lr_schedule="cosine")
    lam, _ = meta_train(problem, lam0, tasks, settings, progress=False)
    ref = lam0.clone()
    opt = torch.optim.Adam([ref], lr=0.05)
    for step, lr in enumerate([0.05, 0.05 * (1 + 0.5 ** 0.5) / 2, 0.025, 0.05 * (1 - 0.5 ** 0.5) / 2]):
        assert settings.lr_at(step) == pytest.approx(lr, rel=1e-12)
        opt.param_groups[0]["lr"] = lr
        ref.grad = problem.meta_gradient(ref.detach(), tasks)
        opt.step()
    assert torch.allclose(lam, ref, rtol=0, atol=1e-14)
    constant, _ = meta_train(problem, lam0, tasks, dataclasses.replace(settings, lr_schedule="constant"), progress=False)
    assert not torch.allclose(lam, constant, rtol=0, atol=1e-6)
    with pytest.raises(SettingsError, match="lr_schedule"):
        TrainSettings(lr_schedule="linear").validate()
