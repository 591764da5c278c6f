"""The bilevel objective (docs/method.md §1): meta-gradients are exact, weights mean what SPEC says."""

from __future__ import annotations

import pytest
import torch

from helpers import directional_derivatives, random_tasks, small_problem


def _loop_meta_gradient(problem, lam, tasks):
    """Plain Python loop over tasks, one task at a time (no vmap)."""
    total = torch.zeros_like(lam)
    for i in range(len(tasks)):
        t = tasks.subset([i])
        v, u = problem.default_weights(t, lam)
        total += problem.task_total_gradient(lam, problem.records(lam, t, v, u).row(0))
    return total / len(tasks) + problem.weight_decay * lam


@pytest.mark.parametrize("kind", ["unrolled", "implicit"])
def test_vectorised_meta_gradient_equals_loop_and_finite_differences(kind):
    if kind == "unrolled":
        problem, lam = small_problem("unrolled", steps=2, lr=0.3, chunk_size=4)
    else:
        problem, lam = small_problem("implicit", steps=100, lr=0.5, proximal=1.0, implicit_cg_steps=60, chunk_size=4)
    tasks = random_tasks(n=7)
    g_vec = problem.meta_gradient(lam, tasks)
    g_loop = _loop_meta_gradient(problem, lam, tasks)
    torch.testing.assert_close(g_vec, g_loop, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        d, fd = directional_derivatives(lambda x: problem.objective(x, tasks), lam)
    torch.testing.assert_close(d @ g_vec, fd, rtol=1e-6, atol=1e-9)


def test_unrolled_is_second_order_and_first_order_differs():
    problem, lam = small_problem("unrolled", steps=1, lr=0.5)
    fo, _ = small_problem("unrolled", steps=1, lr=0.5, first_order=True)
    tasks = random_tasks(n=3)
    g2 = problem.meta_gradient(lam, tasks)
    g1 = fo.meta_gradient(lam, tasks)
    # First-order MAML drops the (I − α∇²L_S) factor: the gradients must differ, but not wildly.
    assert (g2 - g1).norm() > 1e-6 * g2.norm()
    assert (g2 - g1).norm() < g2.norm()


def test_task_weight_zero_equals_removing_the_task():
    problem, lam = small_problem(weight_decay=0.0)
    tasks = random_tasks(n=5)
    w = torch.ones(5, dtype=torch.float64)
    w[2] = 0
    keep = [0, 1, 3, 4]
    # F uses 1/n with n fixed, so w_k = 0 equals (n−1)/n × the objective of the reduced pool.
    torch.testing.assert_close(problem.objective(lam, tasks, w), problem.objective(lam, tasks.subset(keep)) * 4 / 5)
    torch.testing.assert_close(problem.meta_gradient(lam, tasks, w), problem.meta_gradient(lam, tasks.subset(keep)) * 4 / 5)


def test_example_weight_zero_equals_removing_the_example():
    problem, lam = small_problem(steps=2, lr=0.3)
    tasks = random_tasks(n=1, n_support=6, n_query=5)
    v, u = problem.default_weights(tasks, lam)
    v[0, 3] = 0
    u[0, 1] = 0
    full = problem.task_losses(lam, tasks, v, u)[0]
    keep_s = [0, 1, 2, 4, 5]
    keep_q = [0, 2, 3, 4]
    # The means keep their denominators |S|, |Q|: removal = reduced sets with lr·(|S|−1)/|S| and loss·(|Q|−1)/|Q|.
    reduced_problem, _ = small_problem(steps=2, lr=0.3 * 5 / 6)
    xs, ys = tasks.support_x[:, keep_s], tasks.support_y[:, keep_s]
    xq, yq = tasks.query_x[:, keep_q], tasks.query_y[:, keep_q]
    from metainfluence.tasks.tensors import TaskTensors

    reduced = reduced_problem.task_losses(lam, TaskTensors(xs, ys, xq, yq))[0] * 4 / 5
    torch.testing.assert_close(full, reduced)


def test_chunking_does_not_change_results():
    p1, lam = small_problem(chunk_size=None)
    p2, _ = small_problem(chunk_size=2)
    tasks = random_tasks(n=5)
    torch.testing.assert_close(p1.total_gradients(lam, tasks), p2.total_gradients(lam, tasks), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["unrolled", "implicit"])
def test_value_and_gradient_agrees_with_separate_calls(kind):
    extra = dict(steps=100, lr=0.5, proximal=1.0) if kind == "implicit" else {}
    problem, lam = small_problem(kind, chunk_size=3, **extra)
    tasks = random_tasks(n=5)
    w = torch.rand(5, dtype=torch.float64)
    value, gradient = problem.value_and_gradient(lam, tasks, w)
    torch.testing.assert_close(value, problem.objective(lam, tasks, w).detach())
    torch.testing.assert_close(gradient, problem.meta_gradient(lam, tasks, w), rtol=1e-10, atol=1e-12)


def test_a_float32_objective_is_added_up_in_float64():
    """F over a float32 λ is the float64 sum of the float32 per-task losses, so a line search can compare values
    closer than float32 rounds a sum over thousands of tasks; ∇F stays in λ's dtype."""
    problem, lam = small_problem(chunk_size=64, weight_decay=1e-2)
    lam = lam.float()
    tasks = random_tasks(n=3000)
    losses = problem.task_losses(lam, tasks)
    assert losses.dtype == torch.float32
    expected = losses.double().sum() / len(tasks) + 0.5 * 1e-2 * (lam.double() ** 2).sum()
    value, gradient = problem.value_and_gradient(lam, tasks)
    assert value.dtype == torch.float64 and gradient.dtype == torch.float32
    # objective()'s chunk dot stays in float32 (≈ 2e-9 here); the old float32 running sum returned a float32 F
    assert abs(float(value) - float(expected)) <= 2e-8
    assert abs(float(problem.objective(lam, tasks)) - float(expected)) <= 2e-8


@pytest.mark.parametrize("kind", ["unrolled", "implicit"])
def test_the_measurement_gradient_is_the_validation_pools_mean_loss_and_its_loop_gradient(kind, capsys):
    """f = mean query loss of the validation tasks (no weight decay): ∇f equals the plain per-task loop and
    central differences of f, f equals the mean of the per-task losses; unrolled reads both in one pass. With
    bars off and a heartbeat on, the chunked pass prints a status line named after ∇f."""
    from metainfluence.influence.gradients import measurement_gradient
    from metainfluence.progress import showing

    if kind == "unrolled":
        problem, lam = small_problem("unrolled", steps=2, lr=0.3, chunk_size=2, weight_decay=5e-2)
    else:
        problem, lam = small_problem("implicit", steps=30, lr=0.5, proximal=1.0, implicit_cg_steps=30, chunk_size=2, weight_decay=5e-2)
    val = random_tasks(n=5, seed=3)
    with showing(False, heartbeat=1e-9):
        grad_f, f = measurement_gradient(problem, lam, val)
    assert "measurement gradient" in capsys.readouterr().err
    loop = _loop_meta_gradient(problem, lam, val) - problem.weight_decay * lam
    assert torch.allclose(grad_f, loop, rtol=1e-12, atol=1e-14)
    assert f == pytest.approx(float(problem.task_losses(lam, val).mean()), rel=1e-13)
    if kind == "unrolled":
        mean_loss = lambda x: problem.task_losses(x, val).mean()
        directions, derivatives = directional_derivatives(mean_loss, lam, n_directions=3)
        assert torch.allclose(directions @ grad_f, derivatives, rtol=1e-6, atol=1e-9)
