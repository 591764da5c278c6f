"""Input validation at the Python API boundary: natural-but-wrong inputs give one-line SettingsErrors."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import random_tasks, small_problem
from metainfluence.errors import PoolError, SettingsError
from metainfluence.influence.editing import Removal, edit_model, removed_gradient
from metainfluence.meta.models import MLP
from metainfluence.meta.objective import InnerSettings, MetaProblem
from metainfluence.meta.train import TrainSettings, meta_train
from metainfluence.tasks import TaskTensors


# --------------------------------------------------------------------------- 1. task indices as tensor / array
@pytest.mark.parametrize("make", [lambda i: torch.tensor(i), lambda i: np.array(i), lambda i: torch.tensor(i, dtype=torch.int32)])
def test_removal_accepts_integer_tensor_or_array_of_task_indices(make):
    problem, lam = small_problem()
    tasks = random_tasks(n=6)
    removal = Removal(tasks=make([4, 1]))
    assert removal.tasks == [4, 1] and all(type(k) is int for k in removal.tasks)
    assert removal.count()["tasks"] == 2
    expected = removed_gradient(problem, lam, tasks, Removal(tasks=[4, 1]))
    torch.testing.assert_close(removed_gradient(problem, lam, tasks, removal), expected)


def test_removal_from_a_ranking_slice():
    problem, lam = small_problem()
    tasks = random_tasks(n=6)
    ranking = torch.argsort(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    w, _, _ = Removal(tasks=ranking[:2]).weights(problem, lam, tasks)
    assert int((w == 0).sum()) == 2 and bool((w[ranking[:2]] == 0).all())


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 2.0]), np.array([0.5]), torch.tensor([True, False])])
def test_removal_refuses_non_integer_tensor_indices(bad):
    problem, lam = small_problem()
    with pytest.raises(SettingsError, match="not all integers"):
        Removal(tasks=bad).validate(random_tasks(n=6))


def test_removal_refuses_multi_dimensional_index_tensor():
    with pytest.raises(SettingsError, match="1-d"):
        Removal(tasks=torch.tensor([[0, 1]]))


# --------------------------------------------------------------------------- 2. whole pool / non-boolean masks
def test_removing_every_task_is_refused():
    problem, lam = small_problem()
    tasks = random_tasks(n=6)
    with pytest.raises(SettingsError, match="all 6 tasks"):
        edit_model(problem, lam, tasks, Removal(tasks=list(range(6))))
    Removal(tasks=list(range(5))).validate(tasks)  # keeping one task is fine


def test_integer_mask_with_other_values_is_refused_and_0_1_masks_count_right():
    tasks = random_tasks(n=6)
    mask = torch.zeros(6, tasks.n_support, dtype=torch.long)
    mask[0, 0] = 3
    with pytest.raises(SettingsError, match="boolean mask"):
        Removal(support=mask).validate(tasks)
    mask[0, 0] = 1
    Removal(support=mask).validate(tasks)
    assert Removal(support=mask).count()["support_examples"] == 1
    assert Removal(query=torch.zeros(6, tasks.n_query, dtype=torch.bool)).count()["query_examples"] == 0


# --------------------------------------------------------------------------- 3. meta_batch larger than the pool
def test_meta_batch_larger_than_pool_is_refused():
    problem, lam = small_problem()
    tasks = random_tasks(n=5)
    settings = TrainSettings(meta_batch=100, steps=1, dtype="float64", checkpoint_every=0)
    with pytest.raises(SettingsError, match=r"meta_batch 100 .* 5 tasks"):
        meta_train(problem, lam, tasks, settings, progress=False)
    meta_train(problem, lam, tasks, TrainSettings(meta_batch=5, steps=1, dtype="float64", checkpoint_every=0), progress=False)


# --------------------------------------------------------------------------- 4. loss must be per-example
def test_scalar_custom_loss_is_refused():
    torch.manual_seed(0)
    model = MLP(4, 3, (8,), "tanh").double()
    problem = MetaProblem(model, loss=lambda o, y: F.cross_entropy(o, y), inner=InnerSettings(steps=1, lr=0.3))
    lam = problem.init_params(torch.float64)
    tasks = random_tasks(n=4)
    for call in (lambda: problem.meta_gradient(lam, tasks), lambda: problem.task_losses(lam, tasks),
                 lambda: problem.task_metrics(lam, tasks), lambda: problem.value_and_gradient(lam, tasks)):
        with pytest.raises(SettingsError, match="per-example losses"):
            call()


def test_per_example_custom_loss_is_accepted():
    torch.manual_seed(0)
    model = MLP(4, 3, (8,), "tanh").double()
    problem = MetaProblem(model, loss=lambda o, y: F.cross_entropy(o, y, reduction="none"), inner=InnerSettings(steps=1, lr=0.3))
    ref, lam = small_problem(steps=1, lr=0.3, weight_decay=0.0)
    tasks = random_tasks(n=4)
    torch.testing.assert_close(problem.meta_gradient(lam, tasks), ref.meta_gradient(lam, tasks))


# --------------------------------------------------------------------------- 5. wrong types at the boundary
def test_model_must_be_a_module():
    with pytest.raises(SettingsError, match="nn.Module"):
        MetaProblem("model")


@pytest.mark.parametrize("convert", [lambda t: t.numpy(), lambda t: t.tolist()])
def test_lam_that_is_not_a_tensor_is_refused(convert):
    problem, lam = small_problem()
    tasks = random_tasks(n=4)
    bad = convert(lam)
    for call in (problem.objective, problem.meta_gradient, problem.value_and_gradient, problem.task_losses,
                 problem.total_gradients, problem.task_metrics):
        with pytest.raises(SettingsError, match="not a torch tensor"):
            call(bad, tasks)


# --------------------------------------------------------------------------- 6. a pool that does not fit the model or loss
def _calls(problem):
    return (problem.objective, problem.meta_gradient, problem.task_losses, problem.total_gradients, problem.task_metrics)


def test_lam_of_another_model_is_refused():
    problem, lam = small_problem()
    tasks = random_tasks(n=4)
    for bad in (lam[:-1], torch.cat([lam, lam[:2]]), lam.reshape(1, -1)):
        for call in _calls(problem):
            with pytest.raises(SettingsError, match=rf"must have shape \({problem.dim},\)"):
                call(bad, tasks)


def test_inputs_the_model_cannot_take_are_refused_with_their_shape():
    problem, lam = small_problem(n_features=4)
    tasks = random_tasks(n=4, n_features=7)
    for call in _calls(problem):
        with pytest.raises(SettingsError, match=r"cannot take inputs of shape \(7,\)"):
            call(lam, tasks)


def test_integer_inputs_are_refused():
    problem, lam = small_problem()
    t = random_tasks(n=4)
    tasks = TaskTensors((t.support_x * 10).to(torch.uint8), t.support_y, (t.query_x * 10).to(torch.uint8), t.query_y)
    with pytest.raises(SettingsError, match="inputs must be floating point"):
        problem.meta_gradient(lam, tasks)


@pytest.mark.parametrize("which", ["support_y", "query_y"])
def test_float_or_out_of_range_class_labels_are_refused(which):
    problem, lam = small_problem(n_classes=3)
    t = random_tasks(n=4, n_classes=3)
    y = getattr(t, which)
    cases = {"long()": y.double(), "3 outputs": y + 1, "0..2": y - 1, "one class index": y[..., None]}
    for message, bad in cases.items():
        parts = {"support_y": t.support_y, "query_y": t.query_y, which: bad}
        tasks = TaskTensors(t.support_x, parts["support_y"], t.query_x, parts["query_y"])
        with pytest.raises(SettingsError, match=rf"{which}.*{re.escape(message)}"):
            problem.meta_gradient(lam, tasks)


def test_soft_labels_shaped_like_the_outputs_are_accepted_and_match_hard_labels():
    problem, lam = small_problem(n_classes=3)
    t = random_tasks(n=4, n_classes=3)
    soft = TaskTensors(t.support_x, F.one_hot(t.support_y, 3).double(), t.query_x, F.one_hot(t.query_y, 3).double())
    torch.testing.assert_close(problem.meta_gradient(lam, soft), problem.meta_gradient(lam, t))


def test_regression_targets_without_their_output_axis_are_refused():
    # (n, m) targets against (m, 1) outputs would broadcast into an (m, m) table of wrong squared errors
    problem, lam = small_problem(n_classes=1, loss="mse")
    t = random_tasks(n=4, regression=True)
    flat = TaskTensors(t.support_x, t.support_y[..., 0], t.query_x, t.query_y[..., 0])
    with pytest.raises(SettingsError, match=r"support_y.*unsqueeze\(-1\)"):
        problem.meta_gradient(lam, flat)
    problem.meta_gradient(lam, t)  # shaped like the outputs: accepted


def test_task_tensors_take_numpy_arrays_and_refuse_missing_task_axis():
    problem, lam = small_problem()
    t = random_tasks(n=4)
    from_numpy = TaskTensors(t.support_x.numpy(), t.support_y.numpy(), t.query_x.numpy(), t.query_y.tolist())
    torch.testing.assert_close(problem.meta_gradient(lam, from_numpy), problem.meta_gradient(lam, t))
    with pytest.raises(PoolError, match=r"support_y has shape \(6,\).*x\[None\]"):
        TaskTensors(t.support_x[0], t.support_y[0], t.query_x[0], t.query_y[0])
    # lists of per-task tensors: stacked when the tasks are of one size, refused with the reason when not
    from_lists = TaskTensors(list(t.support_x), list(t.support_y), list(t.query_x), list(t.query_y))
    torch.testing.assert_close(problem.meta_gradient(lam, from_lists), problem.meta_gradient(lam, t))
    ragged = [t.support_x[0], t.support_x[1, :4]]
    with pytest.raises(PoolError, match="per-task tensors of shapes .*every task needs the same number of support examples"):
        TaskTensors(ragged, list(t.support_y[:2]), list(t.query_x[:2]), list(t.query_y[:2]))
    with pytest.raises(PoolError, match="nested tensor; every task needs"):
        TaskTensors(torch.nested.nested_tensor(ragged), list(t.support_y[:2]), list(t.query_x[:2]), list(t.query_y[:2]))


def test_cross_entropy_over_a_single_output_is_refused():
    problem, lam = small_problem(n_classes=1)
    t = random_tasks(n=4, regression=True)  # float (n, m, 1) targets would pass as "soft labels" and every score be 0
    with pytest.raises(SettingsError, match="single output per example.*loss='mse'"):
        problem.meta_gradient(lam, t)


# --------------------------------------------------------------------------- 7. automatic chunks bound memory
def test_automatic_chunks_follow_the_memory_budget_and_change_no_result(monkeypatch):
    import metainfluence.meta.objective as objective
    from metainfluence.meta.inputs import check_task_tensors, task_bytes

    problem, lam = small_problem()
    tasks = random_tasks(n=7)
    per_task = task_bytes(problem, lam, tasks, check_task_tensors(problem, lam, tasks)[0])
    assert per_task > 16 * problem.dim * 8  # the bound counts λ's copies and the activations
    whole = (problem.meta_gradient(lam, tasks), problem.total_gradients(lam, tasks), problem.task_losses(lam, tasks))
    assert list(problem.chunks(7, lam, tasks)) == [slice(0, 7)]  # a small pool fits at once
    monkeypatch.setattr(objective, "chunk_budget_bytes", lambda device: 3 * per_task)
    assert problem.auto_chunk(lam, tasks) == 3
    assert list(problem.chunks(7, lam, tasks)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    chunked = (problem.meta_gradient(lam, tasks), problem.total_gradients(lam, tasks), problem.task_losses(lam, tasks))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(objective, "chunk_budget_bytes", lambda device: 1)
    assert problem.auto_chunk(lam, tasks) == 1  # never below one task
    problem.chunk_size = 5
    assert list(problem.chunks(7, lam, tasks)) == [slice(0, 5), slice(5, 7)]  # an explicit chunk size wins


# --------------------------------------------------------------------------- 9. a user's own nn.Module
class _TwoLayer(torch.nn.Module):
    def __init__(self, freeze_first=False, extra=None):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.extra = extra if extra is not None else torch.nn.Identity()
        for p in self.a.parameters():
            p.requires_grad_(not freeze_first)

    def forward(self, x):
        return self.b(self.extra(torch.tanh(self.a(x))))


def test_frozen_layers_are_constants_not_meta_parameters():
    torch.manual_seed(0)
    model = _TwoLayer(freeze_first=True)  # float32 module: the frozen layer is cast to λ's float64
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.3))
    lam = problem.init_params(torch.float64)
    assert problem.spec.names == ("b.weight", "b.bias") and lam.numel() == 6 * 3 + 3
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(problem.forward(lam, x), model.double()(x), rtol=0, atol=1e-15)
    # gradient check: the meta-gradient of the trainable head by central differences through the frozen layer
    tasks = random_tasks(n=3)
    g = problem.meta_gradient(lam, tasks)
    e = torch.zeros_like(lam)
    e[2] = 1e-6
    fd = (problem.value_and_gradient(lam + e, tasks)[0] - problem.value_and_gradient(lam - e, tasks)[0]) / 2e-6
    assert float(g[2]) == pytest.approx(float(fd), rel=1e-6)
    frozen_before = model.a.weight.detach().clone()
    meta_train(problem, lam, tasks, TrainSettings(steps=3, meta_batch=3, dtype="float64", checkpoint_every=0), progress=False)
    assert torch.equal(model.a.weight, frozen_before)
    with pytest.raises(SettingsError, match="no trainable parameters .*requires_grad=False"):
        MetaProblem(_TwoLayer(freeze_first=True).requires_grad_(False))


@pytest.mark.parametrize("layer, word", [(torch.nn.Dropout(0.2), "dropout in training mode.*model.eval"),
                                         (torch.nn.BatchNorm1d(6), "batch norm in training mode.*model.eval.*TaskBatchNorm")])
def test_training_mode_layers_that_cannot_run_under_the_transforms_are_refused(layer, word):
    model = _TwoLayer(extra=layer).double()
    with pytest.warns(UserWarning) if isinstance(layer, torch.nn.BatchNorm1d) else contextlib.nullcontext():
        problem = MetaProblem(model)
    lam, tasks = problem.init_params(torch.float64), random_tasks(n=3)
    stats = [b.clone() for b in model.buffers()]
    with pytest.raises(SettingsError, match=word):
        problem.value_and_gradient(lam, tasks)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # the user's running statistics untouched
    model.eval()  # eval mode: dropout is the identity, batch norm an affine map of the stored statistics
    problem = MetaProblem(model)
    value, grad = problem.value_and_gradient(lam, tasks)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_a_model_returning_a_tuple_needs_a_loss_that_unpacks_it():
    class TupleOut(_TwoLayer):
        def forward(self, x):
            return super().forward(x), x.sum(-1)

    torch.manual_seed(0)
    tasks = random_tasks(n=3)
    builtin = MetaProblem(TupleOut().double())
    with pytest.raises(SettingsError, match="returns a tuple or dict.*callable loss"):
        builtin.value_and_gradient(builtin.init_params(torch.float64), tasks)
    torch.manual_seed(0)
    unpack = MetaProblem(TupleOut().double(), lambda out, y: F.cross_entropy(out[0], y, reduction="none"))
    torch.manual_seed(0)
    plain = MetaProblem(_TwoLayer().double())
    lam = plain.init_params(torch.float64)
    torch.testing.assert_close(unpack.value_and_gradient(lam, tasks)[1], plain.value_and_gradient(lam, tasks)[1])


def test_mixed_input_dtypes_small_integer_labels_and_bad_targets():
    problem, lam = small_problem(steps=1)
    t = random_tasks(n=3)
    expected = problem.value_and_gradient(lam, t)[0]
    mixed = TaskTensors(t.support_x, t.support_y.to(torch.uint8), t.query_x.float(), t.query_y.to(torch.int16))
    assert mixed.support_y.dtype == torch.int64
    assert float(problem.value_and_gradient(lam, mixed)[0]) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(PoolError, match="without query examples"):
        TaskTensors(t.support_x, t.support_y, t.query_x[:, :0], t.query_y[:, :0])
    soft = F.one_hot(t.query_y, 3).double()
    with pytest.raises(SettingsError, match="soft labels with a row summing to 2"):
        problem.value_and_gradient(lam, TaskTensors(t.support_x, t.support_y, t.query_x, soft * 2))
    reg_problem, reg_lam = small_problem(steps=1, n_classes=1, loss="mse")
    reg = random_tasks(n=3, regression=True)
    reg.query_y[1, 2] = float("nan")  # edited after the pool was built
    with pytest.raises(SettingsError, match="query_y contains NaN or inf"):
        reg_problem.value_and_gradient(reg_lam, reg)


def test_a_pool_object_in_place_of_its_tensors_is_refused_with_the_way_to_them():
    from metainfluence.influence.task_if import task_influence
    from metainfluence.tasks import sinusoid_pool

    problem, lam = small_problem()
    with pytest.raises(SettingsError, match=r"val_tasks is a SinusoidPool, not a TaskTensors.*val_tasks\.tensors\(\)"):
        task_influence(problem, lam, random_tasks(n=3), sinusoid_pool(3, 2, 2, seed=0))
    with pytest.raises(SettingsError, match="train_tasks is a list"):
        task_influence(problem, lam, [random_tasks(n=3)], random_tasks(n=3))


def test_refine_refuses_an_integer_lambda():
    from metainfluence.meta.refine import refine

    problem, lam = small_problem()
    with pytest.raises(SettingsError, match="λ has dtype torch.int64"):
        refine(problem, lam.round().long(), random_tasks(n=3))


def test_example_scores_on_a_batch_norm_model_say_what_removal_means_and_still_sum_to_the_task_score():
    # with per-task batch statistics an example's weight removes its loss term only (method §1.4): said aloud; the query
    # scores are still the derivative of a loss linear in u, so they sum to the task's score
    from metainfluence import InfluenceSettings, instance_influence, task_influence
    from metainfluence.influence.results import InfluenceWarning
    from metainfluence.meta.models import TaskBatchNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), TaskBatchNorm(2), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(18, 3)).double()
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.3), weight_decay=1e-2)
    lam, g = problem.init_params(torch.float64), torch.Generator().manual_seed(1)
    pool = lambda n: TaskTensors(torch.randn(n, 6, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n, 6), generator=g),
                                 torch.randn(n, 4, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n, 4), generator=g))
    train, val = pool(4), pool(3)
    settings = InfluenceSettings(hessian="gauss-newton", solver="explicit", damping=1e-2, stationarity_warn=1e9)
    with pytest.warns(InfluenceWarning, match="removes the example's loss term only"):
        query = instance_influence(problem, lam, train, val, "query", settings)
    torch.testing.assert_close(query.scores.sum(1), task_influence(problem, lam, train, val, settings).scores, rtol=1e-9, atol=1e-13)
