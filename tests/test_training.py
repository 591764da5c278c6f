"""Meta-training, refine, evaluation and checkpoints (float64 wherever numbers are compared)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from helpers import random_tasks, small_problem
from metainfluence.tasks import sinusoid_pool
from metainfluence.errors import CheckpointError, DivergenceError, SettingsError
from metainfluence.meta import (
    EvalResult,
    RefineSettings,
    RefineWarning,
    TrainSettings,
    batch_schedule,
    evaluate,
    interval95,
    load_checkpoint,
    meta_train,
    refine,
    save_checkpoint,
)
from metainfluence.meta.checkpoint import pool_record
from metainfluence.meta.objective import MetaProblem


def _train_settings(**kw) -> TrainSettings:
    base = dict(meta_batch=4, steps=30, lr=1e-2, seed=0, dtype="float64", log_every=5, checkpoint_every=0)
    base.update(kw)
    return TrainSettings(**base)


# --------------------------------------------------------------------------- training
def test_training_is_bit_deterministic_under_a_seed_and_differs_with_another():
    problem, lam0 = small_problem(steps=1, lr=0.3)
    tasks = random_tasks(n=12, seed=3)
    a, ha = meta_train(problem, lam0, tasks, _train_settings(seed=0), progress=False)
    b, hb = meta_train(problem, lam0, tasks, _train_settings(seed=0), progress=False)
    c, _ = meta_train(problem, lam0, tasks, _train_settings(seed=1), progress=False)
    assert torch.equal(a, b) and ha.loss == hb.loss
    assert not torch.equal(a, c)
    # meta-batches are distinct tasks, and the recorded schedule is the one a seed implies
    sched = batch_schedule(12, 4, 0, 30)
    assert all(len(set(s.tolist())) == 4 for s in sched)
    assert [b.tolist() for b in sched] != [b.tolist() for b in batch_schedule(12, 4, 1, 30)]


def test_training_lowers_the_pool_objective():
    problem, lam0 = small_problem(steps=1, lr=0.3, weight_decay=1e-3)
    tasks = random_tasks(n=16, seed=4)
    lam, history = meta_train(problem, lam0, tasks, _train_settings(steps=80, lr=2e-2), progress=False)
    before = float(problem.objective(lam0, tasks))
    after = float(problem.objective(lam, tasks))
    assert after < 0.9 * before, (before, after)
    assert history.steps_done == 80 and len(history.accuracy) == 16 and history.tasks_seen == 80 * 4


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    problem, lam0 = small_problem(steps=1, lr=0.3)
    tasks = random_tasks(n=10, seed=5)
    full, _ = meta_train(problem, lam0, tasks, _train_settings(steps=20), progress=False)
    meta_train(problem, lam0, tasks, _train_settings(steps=12), checkpoint_path=tmp_path / "ck", progress=False)
    resumed, hist = meta_train(problem, lam0, tasks, _train_settings(steps=20), checkpoint_path=tmp_path / "ck2", progress=False, resume=tmp_path / "ck")
    assert torch.equal(full, resumed)
    assert hist.steps_done == 20 and len(hist.loss) == 20


def test_huge_lr_stops_training_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    problem, lam0 = small_problem(steps=1, lr=0.3)
    problem.model.float()
    tasks = random_tasks(n=8, seed=6).to(dtype=torch.float32)
    settings = _train_settings(dtype="float32", lr=1e30, steps=20, checkpoint_every=1)
    with pytest.raises(DivergenceError) as err:
        meta_train(problem, lam0.float(), tasks, settings, checkpoint_path=tmp_path / "ck", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "lower the outer lr" in msg and "inner lr" in msg and "intact" in msg
    ck = load_checkpoint(tmp_path / "ck", expected_problem=problem, expected_pool=tasks)
    assert torch.isfinite(ck.lam).all() and ck.step is not None and ck.step >= 1


def test_nan_in_one_task_stops_training_and_the_checkpoint_equals_the_clean_run(tmp_path):
    # Regression targets: NaN data is refused up front, but a finite target of 1e200 makes the squared error inf.
    problem, lam0 = small_problem(steps=1, lr=0.1, loss="mse", n_classes=1)
    tasks = random_tasks(n=10, seed=7, regression=True)
    sched = batch_schedule(10, 3, 0, 40)
    first_seen = {t: next(s for s, b in enumerate(sched, 1) if t in b.tolist()) for t in range(10)}
    bad_task = max(first_seen, key=first_seen.get)
    bad_step = first_seen[bad_task]
    assert bad_step >= 3
    poisoned = random_tasks(n=10, seed=7, regression=True)
    poisoned.query_y[bad_task, 0, 0] = 1e200
    settings = _train_settings(meta_batch=3, steps=40, checkpoint_every=1)
    with pytest.raises(DivergenceError, match=f"diverged at step {bad_step}"):
        meta_train(problem, lam0, poisoned, settings, checkpoint_path=tmp_path / "ck", progress=False)
    clean, _ = meta_train(problem, lam0, tasks, _train_settings(meta_batch=3, steps=bad_step - 1), progress=False)
    ck = load_checkpoint(tmp_path / "ck", expected_problem=problem)
    assert ck.step == bad_step - 1
    assert torch.equal(ck.lam, clean)


# --------------------------------------------------------------------------- what training and long passes print
def test_no_progress_training_prints_a_line_every_log_every_steps(tmp_path, capsys):
    """`train --no-progress --log-every 4` on digits: a line at steps 4 and 8 of 10 (loss, accuracy, tasks/s,
    time) on stderr, before the summary; with bars on, the bar alone (no step lines)."""
    from metainfluence.cli import main

    tiny = ["--train-tasks", "12", "--val-tasks", "4", "--test-tasks", "10", "--model-hidden", "16", "--model-activation", "tanh",
            "--steps", "10", "--meta-batch", "4", "--log-every", "4", "--threads", "1"]
    assert main(["train", "--out", str(tmp_path / "quiet"), *tiny, "--no-progress"]) == 0
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 4/10", "step 8/10"], out.err
    assert all(re.fullmatch(r"step \d+/10: loss \d+\.\d{4}, acc \d+\.\d%, \d+ tasks/s, after \d+\.\d\d min", line) for line in lines), lines
    assert "trained 10 steps" in out.out
    assert main(["train", "--out", str(tmp_path / "bars"), *tiny]) == 0
    out = capsys.readouterr()
    assert "meta-train" in out.err and not any(line.startswith("step ") for line in out.err.splitlines())


@pytest.mark.parametrize("regression", [False, True])
def test_step_lines_report_the_window_and_only_where_lines_are_wanted(regression, capsys):
    """The line's loss is the mean batch loss of its log_every steps and its accuracy that of the step's own
    meta-batch (none for regression); a library call (no heartbeat) prints nothing, and λ does not change."""
    from metainfluence.progress import showing

    if regression:
        problem, lam0 = small_problem(steps=1, lr=0.1, loss="mse", n_classes=1)
    else:
        problem, lam0 = small_problem(steps=1, lr=0.3)
    tasks = random_tasks(n=10, seed=3, regression=regression)
    settings = _train_settings(steps=12, log_every=5)
    quiet, _ = meta_train(problem, lam0, tasks, settings, progress=False)
    assert capsys.readouterr().err == ""
    with showing(False, heartbeat=60):
        lam, history = meta_train(problem, lam0, tasks, settings, progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert torch.equal(lam, quiet)
    assert [line.split(":")[0] for line in lines] == ["step 5/12", "step 10/12"] and history.accuracy_step == [5, 10]
    for line, end, acc in zip(lines, (5, 10), history.accuracy):
        assert f"loss {sum(history.loss[end - 5:end]) / 5:.4f}" in line
        assert ("acc" not in line) if regression else (f"acc {100 * acc:.1f}%" in line)


def test_a_pass_whose_one_chunk_outlasts_the_heartbeat_still_prints_it(capsys):
    """Without bars, a bar that gets no update for longer than the heartbeat (one chunk of minutes) is redrawn by
    the watcher; the fisher fit's passes count tasks, a chunk at a time, and print the same rows as a quiet fit."""
    import time

    from metainfluence.meta.curvature import fisher_factor_and_gradients
    from metainfluence.progress import bar, showing

    with showing(False, heartbeat=0.1):
        for _ in bar("slow pass", 1, "task", iterable=[0]):
            time.sleep(0.6)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("slow pass: 0/1 task [") for line in lines), lines

    problem, lam = small_problem(steps=1, lr=0.3, chunk_size=4)
    tasks = random_tasks(n=10, seed=1)
    quiet = fisher_factor_and_gradients(problem, lam, tasks, 2, 0)
    assert capsys.readouterr().err == ""
    with showing(False, heartbeat=1e-9):
        loud = fisher_factor_and_gradients(problem, lam, tasks, 2, 0)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fisher fit: task gradients + outputs: ")]
    counts = {line.split(": ")[2].split()[0] for line in lines}
    assert counts and counts <= {"0/10", "4/10", "8/10", "10/10"}, lines  # per chunk, never per task
    assert torch.equal(quiet[0], loud[0]) and torch.equal(quiet[1], loud[1])


@pytest.mark.filterwarnings("ignore::metainfluence.meta.RefineWarning")  # 3 refine iterations: not stationary, and not the point
def test_the_demo_says_each_set_up_fact_once_before_its_results(tmp_path):
    from metainfluence.config import apply_overrides
    from metainfluence.pipeline import RunSettings, run_demo

    s = apply_overrides(RunSettings(), {"data.train_tasks": 12, "data.val_tasks": 4, "data.test_tasks": 10, "model.hidden": [8],
                                        "train.steps": 4, "train.meta_batch": 4, "refine.max_iter": 3, "refine.tol": 1e-3})
    lines: list[str] = []
    run_demo(s, out=tmp_path / "demo", progress=False, log=lines.append, influence_step=False)
    head = lines.index("== metainfluence demo ==")
    for fact in ("dataset:", "train pool:", "val pool:", "test pool:", "model:", "trained ", "inputs standardised"):
        where = [i for i, line in enumerate(lines) if line.lstrip().startswith(fact)]
        assert len(where) == 1 and where[0] < head, (fact, lines)
    assert any(line.startswith("meta-test") for line in lines[head:]) and lines[-1].startswith("total ")


# --------------------------------------------------------------------------- refine
def test_refine_reaches_its_tolerance_and_reports_consistent_diagnostics():
    problem, lam0 = small_problem(steps=1, lr=0.3, weight_decay=1e-2)
    tasks = random_tasks(n=12, seed=8)
    lam, _ = meta_train(problem, lam0, tasks, _train_settings(steps=20), progress=False)
    tol = 1e-7
    lam_star, rep = refine(problem, lam, tasks, RefineSettings(tol=tol, max_iter=300))
    g = problem.meta_gradient(lam_star, tasks)
    assert rep.converged and rep.method == "lbfgs"
    assert float(g.norm()) <= tol and rep.grad_norm_after <= tol
    assert rep.grad_norm_before > 1e4 * rep.grad_norm_after
    assert math.isclose(rep.grad_norm_before, float(problem.meta_gradient(lam.double(), tasks).norm()), rel_tol=1e-9)
    mean_task = float(problem.total_gradients(lam_star, tasks).norm(dim=1).mean())
    assert math.isclose(rep.ratio_after, rep.grad_norm_after / mean_task, rel_tol=1e-6)
    assert rep.objective_after < rep.objective_before
    # deterministic: the same call gives the same λ*
    again, _ = refine(problem, lam, tasks, RefineSettings(tol=tol, max_iter=300))
    assert torch.equal(again, lam_star)


def test_refine_with_a_removed_task_keeps_the_full_pool_normalisation():
    problem, lam0 = small_problem(steps=1, lr=0.3, weight_decay=1e-2)
    tasks = random_tasks(n=8, seed=9)
    w = torch.ones(8, dtype=torch.float64)
    w[5] = 0
    lam_w, rep = refine(problem, lam0, tasks, RefineSettings(tol=1e-8, max_iter=300), w=w)
    assert rep.converged and rep.n_active_tasks == 7
    keep = [i for i in range(8) if i != 5]
    g = problem.total_gradients(lam_w, tasks.subset(keep))
    # stationary for (1/n) Σ_{k≠5} g_k + μλ with n = 8 — not for the 7-task pool's own 1/7
    assert float((g.sum(0) / 8 + problem.weight_decay * lam_w).norm()) < 1e-7
    assert float((g.sum(0) / 7 + problem.weight_decay * lam_w).norm()) > 1e-4


def test_example_weights_drive_training_and_refine_to_the_reduced_objective():
    # v, u (docs/method.md §1) zero some examples: all-ones weights are the plain run bit for bit, zeros change
    # the trajectory, and refine becomes stationary for F(λ; v, u) rather than for F(λ)
    problem, lam0 = small_problem(steps=1, lr=0.3, weight_decay=1e-2)
    tasks = random_tasks(n=10, seed=5)
    ones = (torch.ones(10, tasks.n_support, dtype=torch.float64), torch.ones(10, tasks.n_query, dtype=torch.float64))
    v, u = ones[0].clone(), ones[1].clone()
    v[2, 0] = 0
    u[4, :2] = 0
    plain, _ = meta_train(problem, lam0, tasks, _train_settings(), progress=False)
    same, _ = meta_train(problem, lam0, tasks, _train_settings(), progress=False, example_weights=ones)
    reduced, _ = meta_train(problem, lam0, tasks, _train_settings(), progress=False, example_weights=(v, u))
    assert torch.equal(plain, same) and not torch.equal(plain, reduced)
    lam_r, rep = refine(problem, reduced, tasks, RefineSettings(tol=1e-8, max_iter=300), example_weights=(v, u))
    assert rep.converged
    assert float(problem.meta_gradient(lam_r, tasks, v=v, u=u).norm()) <= 1e-8
    assert float(problem.meta_gradient(lam_r, tasks).norm()) > 1e-5
    # the stationarity ratio is taken with the same example weights
    assert rep.task_grad_norm_after == pytest.approx(float(problem.total_gradients(lam_r, tasks, v, u).norm(dim=1).mean()), rel=1e-9)
    assert rep.task_grad_norm_after != pytest.approx(float(problem.total_gradients(lam_r, tasks).norm(dim=1).mean()), rel=1e-6)
    with pytest.raises(SettingsError, match="example weights"):
        meta_train(problem, lam0, tasks, _train_settings(), progress=False, example_weights=(v[:, :1], u))


def test_gradient_descent_refine_decreases_and_warns_when_not_converged():
    problem, lam0 = small_problem(steps=1, lr=0.3, weight_decay=1e-2)
    tasks = random_tasks(n=8, seed=10)
    with pytest.warns(RefineWarning, match="did not reach"):
        lam, rep = refine(problem, lam0, tasks, RefineSettings(method="gd", tol=1e-12, max_iter=30, lr=0.5))
    assert not rep.converged and rep.method == "gd" and rep.iterations == 30
    assert rep.objective_after < rep.objective_before and rep.grad_norm_after < rep.grad_norm_before


class _FlakyProblem(MetaProblem):
    """Returns NaN on its third full-pool evaluation (simulates L-BFGS stepping into a NaN region)."""

    calls = 0

    def value_and_gradient(self, lam, tasks, w=None, v=None, u=None):
        self.calls += 1
        f, g = super().value_and_gradient(lam, tasks, w, v, u)
        if self.calls == 3:
            return f * float("nan"), g
        return f, g


def test_refine_falls_back_to_gradient_descent_when_lbfgs_meets_nan():
    base, lam0 = small_problem(steps=1, lr=0.3, weight_decay=1e-2)
    problem = _FlakyProblem(base.model, "cross_entropy", base.inner, weight_decay=1e-2)
    tasks = random_tasks(n=8, seed=11)
    with pytest.warns(RefineWarning):
        lam, rep = refine(problem, lam0, tasks, RefineSettings(tol=1e-12, max_iter=25))
    assert rep.method == "lbfgs+gd" and "NaN" in rep.message
    assert torch.isfinite(lam).all() and rep.objective_after < rep.objective_before


def test_refine_rejects_bad_settings_and_weights():
    problem, lam0 = small_problem()
    tasks = random_tasks(n=4)
    with pytest.raises(SettingsError):
        refine(problem, lam0, tasks, RefineSettings(method="adam"))
    with pytest.raises(SettingsError):
        refine(problem, lam0, tasks, RefineSettings(), w=torch.ones(3))


# --------------------------------------------------------------------------- evaluation
def test_interval_is_the_closed_form_on_known_accuracies():
    accs = torch.tensor([1.0, 0.6, 0.8, 0.4, 1.0, 0.8])
    res = EvalResult.from_per_task(torch.zeros(6), accs)
    mean = sum(accs.tolist()) / 6
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs.tolist()) / 5)
    assert math.isclose(res.accuracy, mean, rel_tol=1e-12)
    assert math.isclose(res.accuracy_ci95, 1.96 * sd / math.sqrt(6), rel_tol=1e-12)
    assert res.n_tasks == 6 and res.loss_ci95 == 0.0
    assert math.isnan(interval95(torch.tensor([0.5]))[1])


def test_evaluate_matches_a_per_task_loop():
    problem, lam = small_problem(steps=2, lr=0.3)
    tasks = random_tasks(n=7, seed=12)
    res = evaluate(problem, lam, tasks)
    accs, losses = [], []
    for i in range(7):
        xq, yq = tasks.query_x[i], tasks.query_y[i]
        theta = problem.adapt(lam, problem.records(lam, tasks).row(i))
        out = problem.forward(theta, xq)
        accs.append(float((out.argmax(1) == yq).double().mean()))
        losses.append(float(torch.nn.functional.cross_entropy(out, yq)))
    assert res.per_task_accuracy == pytest.approx(accs, abs=1e-12)
    assert res.per_task_loss == pytest.approx(losses, rel=1e-10)
    assert res.accuracy == pytest.approx(sum(accs) / 7, abs=1e-12)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trips_exactly_and_refuses_another_model_or_pool(tmp_path):
    problem, lam = small_problem(hidden=(8,))
    lam = lam + 1e-3 * torch.randn_like(lam)
    tasks = random_tasks(n=6)
    pool = sinusoid_pool(6, 5, 5, seed=0)
    save_checkpoint(tmp_path / "ck", lam, problem=problem, settings={"note": "x"}, pools={"train": pool_record(pool, tasks)}, metrics={"acc": 0.5})
    ck = load_checkpoint(tmp_path / "ck.json", expected_problem=problem, expected_pool=pool)
    assert torch.equal(ck.lam, lam) and ck.lam.dtype == torch.float64
    assert ck.info["metrics"]["acc"] == 0.5 and ck.info["versions"]["torch"] == torch.__version__
    assert ck.info["param_spec"] == problem.spec.to_json()
    load_checkpoint(tmp_path / "ck", expected_pool=tasks)  # the tensors' fingerprint is recorded too

    other, _ = small_problem(hidden=(9,))
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(tmp_path / "ck", expected_problem=other)
    with pytest.raises(CheckpointError, match="another train pool"):
        load_checkpoint(tmp_path / "ck", expected_pool=sinusoid_pool(6, 5, 5, seed=1))
    with pytest.raises(CheckpointError, match="another train pool"):
        load_checkpoint(tmp_path / "ck", expected_pool=random_tasks(n=6, seed=99))


def test_truncated_or_corrupt_checkpoint_is_refused(tmp_path):
    problem, lam = small_problem()
    path = save_checkpoint(tmp_path / "ck", lam, problem=problem)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 16])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "cut")
    assert "\n" not in str(err.value)
    (tmp_path / "head.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "head")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a byte of λ
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "flip")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("dense_max", [10_000, 0])
def test_newton_refine_reaches_tight_tolerances_in_a_few_steps(dense_max):
    # strongly convex (linear model, squared error, one inner step, weight decay): Newton converges in a
    # step or two (dense) and Newton–CG in a handful, where a gradient method needs hundreds of iterations
    problem, lam0 = small_problem("unrolled", steps=1, lr=0.05, hidden=(), n_features=5, n_classes=1, loss="mse", weight_decay=1e-2)
    tasks = random_tasks(n=10, n_support=4, n_query=6, n_features=5, regression=True, seed=0)
    lam, rep = refine(problem, lam0, tasks, RefineSettings(method="newton", tol=1e-12, max_iter=20, newton_dense_max=dense_max))
    assert rep.converged and rep.grad_norm_after <= 1e-12
    assert rep.iterations <= (2 if dense_max else 8)
    assert rep.method.startswith("newton (exact, " + ("dense" if dense_max else "CG"))


def test_newton_refine_on_a_nonlinear_pool():
    # tanh network: exact-Hessian Newton (shifted while the Hessian is indefinite) reaches a tight tolerance;
    # Gauss–Newton steps converge only linearly here (GN ≠ H away from zero residuals), and say so
    problem, lam0 = small_problem(steps=1, lr=0.3, hidden=(6,), weight_decay=1e-2)
    tasks = random_tasks(n=12, seed=2)
    warm, _ = refine(problem, lam0, tasks, RefineSettings(tol=1e-4, max_iter=200))
    start = float(problem.meta_gradient(warm, tasks).norm())
    lam, rep = refine(problem, warm, tasks, RefineSettings(method="newton", tol=1e-10, max_iter=40))
    assert rep.converged and float(problem.meta_gradient(lam, tasks).norm()) <= 1e-10 and rep.method.startswith("newton (exact")
    with pytest.warns(RefineWarning, match="max-iter"):
        lam_gn, rep_gn = refine(problem, warm, tasks, RefineSettings(method="newton", newton_hessian="gauss-newton", tol=1e-12, max_iter=10))
    assert rep_gn.grad_norm_after < 0.2 * start
