"""One pass for the fisher fit and the per-task gradients: the fused pass gives the rows and gradients of the two
separate passes, a fisher fit inside a reuse block keeps them for the block's scores and edits (which then make no
gradient pass of their own and score and edit as without it), the Gram matrix of the Woodbury inverse formed from
its upper triangle, the factor's transposed products in the fast order, and a saved curvature file served from memory
with its factorisations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.influence.curvature import fit_curvature, load_curvature
from metainfluence.influence.editing import Removal, edit_model
from metainfluence.influence.gradients import kept_task_gradients, reusing_measurement_gradients
from metainfluence.influence.results import InfluenceSettings
from metainfluence.influence.task_if import task_influence
from metainfluence.linalg import SolverSettings
from metainfluence.linalg.woodbury import gram, transposed_times
from metainfluence.meta.curvature import fisher_factor, fisher_factor_and_gradients, sample_labels
from metainfluence.tasks.tensors import TaskTensors


@pytest.mark.parametrize("loss,kind,chunk", [("cross_entropy", "unrolled", 5), ("mse", "unrolled", None), ("cross_entropy", "implicit", None)])
def test_fused_pass_gives_the_rows_and_gradients_of_the_two_passes(loss, kind, chunk):
    regression = loss == "mse"
    extra = {"proximal": 1.0, "steps": 5, "lr": 0.5} if kind == "implicit" else {}
    problem, lam = small_problem(kind, hidden=(5,), n_classes=1 if regression else 3, loss=loss, chunk_size=chunk, **extra)
    tasks = random_tasks(n=11, seed=5, regression=regression)
    rows, grads, own_draws = fisher_factor_and_gradients(problem, lam, tasks, samples=2, seed=7)
    assert own_draws == (None if kind == "implicit" else 0.0)  # an untrained model: no task draws all its own labels twice
    torch.testing.assert_close(rows, fisher_factor(problem, lam, tasks, 2, 7), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads, problem.total_gradients(lam, tasks), rtol=1e-12, atol=1e-14)
    assert rows.shape == (22, lam.numel()) and grads.shape == (11, lam.numel())


@pytest.mark.parametrize("own", [7, 12])
def test_tasks_whose_draws_equal_their_labels_take_their_rows_from_their_gradients(own):
    """Query labels set to the model's own draw on 7 (or all 12) of 12 tasks: those tasks' fisher rows are their
    gradients; only the others make a pass for their draws; rows and gradients still equal the two separate passes."""
    problem, lam = small_problem(hidden=(5,), chunk_size=4)
    tasks = random_tasks(n=12, seed=6)
    with torch.no_grad():
        out = problem.per_task(lambda l, t: problem.forward(problem.adapt(l, t), t.xq), lam, tasks)
    draw = sample_labels(problem, out, torch.Generator().manual_seed(7))  # the draw fisher_factor makes with seed 7
    yq = tasks.query_y.clone()
    yq[:own] = draw[:own]
    tasks = TaskTensors(tasks.support_x, tasks.support_y, tasks.query_x, yq)
    calls = _counting(problem, "_mapped_chunks")
    rows, grads, own_draws = fisher_factor_and_gradients(problem, lam, tasks, samples=1, seed=7)
    # one pass over all 12 tasks (gradients and outputs), then the draws' rows of exactly the others
    assert calls["sizes"] == [12] + ([12 - own] if own < 12 else []) and own_draws == own / 12
    del problem._mapped_chunks  # the method itself again
    scale = (tasks.n_query / len(tasks)) ** 0.5
    torch.testing.assert_close(rows[:own], grads[:own] * scale, rtol=0, atol=0)
    torch.testing.assert_close(rows, fisher_factor(problem, lam, tasks, 1, 7), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads, problem.total_gradients(lam, tasks), rtol=1e-12, atol=1e-14)


def _counting(problem, method: str = "total_gradients"):
    """Count calls of ``problem.total_gradients`` (the floor's pass and the scores' chunks go through it), or of another
    pool-level method, and the sizes of the pools they were given."""
    calls = {"total_gradients": 0, "sizes": []}
    plain = getattr(problem, method)

    def counted(*a, **k):
        calls["total_gradients"] += 1
        calls["sizes"].append(next(len(x) for x in a if isinstance(x, TaskTensors)))
        return plain(*a, **k)

    setattr(problem, method, counted)
    return calls


def test_a_fisher_fit_in_a_reuse_block_serves_the_scores_and_edits_without_their_own_passes(tmp_path):
    problem, lam = small_problem(steps=1, hidden=(6,), weight_decay=1e-2)
    train, val = random_tasks(n=14, seed=3), random_tasks(n=5, seed=4)
    settings = InfluenceSettings(hessian="fisher", solver="woodbury", damping=1e-2, stationarity_warn=1e9, fisher_samples=2,
                                 solve=SolverSettings(tol=1e-12, max_iter=500))
    removal = Removal(tasks=[1, 4, 9])
    alone = task_influence(problem, lam, train, val, settings)
    edit_alone = edit_model(problem, lam, train, removal, settings, step="full")
    art_alone = fit_curvature(problem, lam, train, settings, method="fisher", probes=2)
    assert art_alone.info["floor_seconds"] > 0 and not art_alone.info["task_gradients_kept"]

    calls = _counting(problem)
    with reusing_measurement_gradients():
        art = fit_curvature(problem, lam, train, settings, method="fisher", probes=2)
        assert calls["total_gradients"] == 0  # no floor pass: the fused pass made the gradients
        assert art.info["task_gradients_kept"] and art.info["floor_seconds"] is None and art.info["fit_over_floor"] is None
        kept = kept_task_gradients(problem, lam, train)
        assert kept is not None and kept.seconds == art.info["fit_seconds"]
        assert kept_task_gradients(problem, lam + 1e-3, train) is None  # another λ: nothing kept
        art.save(tmp_path / "curv")  # as the experiments do: scores and edits solve with the fitted file's rows
        from_file = dataclasses.replace(settings, solver="curvature", curvature_file=str(tmp_path / "curv"))
        inside = task_influence(problem, lam, train, val, from_file)
        edit_inside = edit_model(problem, lam, train, removal, from_file, step="full")
    assert calls["total_gradients"] == 0
    torch.testing.assert_close(art.sketch.factor, art_alone.sketch.factor, rtol=1e-12, atol=1e-14)  # the same draws
    torch.testing.assert_close(inside.scores, alone.scores, rtol=1e-10, atol=1e-14)
    assert inside.diagnostics["task_gradients_reused_s"] == kept.seconds and "task_gradients_reused_s" not in alone.diagnostics
    torch.testing.assert_close(edit_inside.lam, edit_alone.lam, rtol=1e-10, atol=1e-13)
    assert edit_inside.diagnostics["removed_gradient_from_kept_pass"] and not edit_alone.diagnostics["removed_gradient_from_kept_pass"]
    # outside the block the score makes its own pass again
    task_influence(problem, lam, train, val, settings)
    assert calls["total_gradients"] > 0 and kept_task_gradients(problem, lam, train) is None


@pytest.mark.parametrize("rows,cols,block", [(7, 30, 3), (40, 9, 16), (5, 5, 512)])
def test_gram_from_the_upper_triangle_equals_the_full_product(rows, cols, block):
    G = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    K = gram(G, block=block)
    torch.testing.assert_close(K, G @ G.T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("width", [None, 1, 4, 17])
def test_the_factors_transposed_product_equals_the_plain_one(width):
    g = torch.Generator().manual_seed(3)
    G = torch.randn(9, 31, generator=g, dtype=torch.float64)
    Y = torch.randn(9, generator=g, dtype=torch.float64) if width is None else torch.randn(9, width, generator=g, dtype=torch.float64)
    out = transposed_times(G, Y)
    torch.testing.assert_close(out, G.T @ Y, rtol=1e-13, atol=1e-13)
    assert out.shape == (31,) if width is None else out.shape == (31, width) and out.is_contiguous()


def test_a_saved_curvature_file_loads_as_the_fitted_object_with_its_factorisations(tmp_path):
    problem, lam = small_problem(steps=1, hidden=(6,), weight_decay=1e-2)
    train = random_tasks(n=10, seed=3)
    settings = InfluenceSettings(hessian="fisher", damping=1e-2)
    art = fit_curvature(problem, lam, train, settings, method="fisher", probes=2)
    assert art.sketch._chol  # the probe solves factorised K + δI
    art.save(tmp_path / "curv")
    assert load_curvature(tmp_path / "curv") is art
    # a file written again (another fit) is read again, not served stale
    other = fit_curvature(problem, lam + 1e-2, train, settings, method="fisher", probes=2)
    other.save(tmp_path / "curv")
    loaded = load_curvature(tmp_path / "curv")
    assert loaded is other and not torch.equal(loaded.sketch.factor, art.sketch.factor)


def test_a_fisher_factor_larger_than_the_machine_is_refused_before_its_pass(monkeypatch):
    # 11 tasks × 2 draws (+ 11 kept gradients) of p float64 numbers: refused when the machine "has" less than that / 0.8
    from metainfluence.errors import SettingsError
    from metainfluence.meta import curvature as curvature_module

    problem, lam = small_problem(hidden=(5,))
    tasks = random_tasks(n=11, seed=5)
    need = (11 * 2 + 11) * lam.numel() * 8
    calls = []
    with monkeypatch.context() as m:
        m.setattr(problem, "task_total_gradient", lambda *a, **k: calls.append(1))  # the pass must not start
        m.setattr(curvature_module, "memory_bytes", lambda device: int(need / 0.8) - 1)
        with pytest.raises(SettingsError, match=r"fisher factor of 11 tasks × 2 draws .* --max-tasks M"):
            fisher_factor_and_gradients(problem, lam, tasks, samples=2, seed=7)
    assert not calls
    monkeypatch.setattr(curvature_module, "memory_bytes", lambda device: int(need / 0.8) + 8)  # just enough room: it runs
    rows, _, _ = fisher_factor_and_gradients(problem, lam, tasks, samples=2, seed=7)
    assert rows.shape == (22, lam.numel())
