"""Meta-training benchmark (a script, not a test), in one run on one machine:

1. **Vectorised vs loop.** Throughput (tasks/s) of one meta-training step's meta-gradient computed
   by :meth:`MetaProblem.value_and_gradient` (vmapped over the meta-batch) against a plain Python
   loop over the tasks calling ``task_total_gradient`` one task at a time — the same meta-gradient;
   the script asserts they agree (float64, rtol 1e-9) before timing both in float32. Two settings:
   the demo's (digits, MLP) and Omniglot's (Conv4-64, 28×28).
2. **Omniglot 5-way 1-shot accuracy.** MAML (second order) with Conv4 (64 filters, no
   normalisation), inner lr 0.4, 1 inner step, Adam 1e-3, 32 tasks per meta-batch, trained from a
   fixed pool under a wall-clock budget (``--minutes``), then evaluated on 600 held-out test tasks
   (class-disjoint characters, 95% interval) — beside the literature's 98.7% (Finn et al. 2017,
   60k steps on a GPU).

    python benchmarks/bench_training.py --data-root $METAINFLUENCE_DATA --minutes 7 --threads 1 --out bench_training.json

Real data: ``$METAINFLUENCE_DATA/omniglot`` (or ``--data-root``); ``--skip-omniglot`` runs part 1 on
digits only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from metainfluence.allocator import tune_allocator
from metainfluence.data import load_dataset
from metainfluence.io import write_json
from metainfluence.meta import MetaProblem, ModelSettings, TrainSettings, build_model, evaluate, meta_train
from metainfluence.meta.objective import InnerSettings
from metainfluence.tasks import build_pool


def loop_meta_gradient(problem: MetaProblem, lam: torch.Tensor, tasks) -> torch.Tensor:
    """∇F_B by a Python loop over tasks, one ``task_total_gradient`` call each (no vmap)."""
    total = torch.zeros_like(lam)
    v_all, u_all = problem.default_weights(tasks, lam)
    for i in range(len(tasks)):
        total += problem.task_total_gradient(lam, problem.records(lam, tasks, v_all, u_all).row(i))
    return total / len(tasks) + problem.weight_decay * lam


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare(name: str, problem: MetaProblem, tasks, repeats: int) -> dict:
    lam64 = problem.init_params(torch.float64)
    t64 = tasks.to(dtype=torch.float64)
    small = t64.subset(list(range(min(8, len(t64)))))
    vec = problem.meta_gradient(lam64, small)
    loop = loop_meta_gradient(problem, lam64, small)
    torch.testing.assert_close(vec, loop, rtol=1e-9, atol=1e-12)
    vec_vg = problem.value_and_gradient(lam64, small)[1]
    torch.testing.assert_close(vec_vg, loop, rtol=1e-9, atol=1e-12)
    max_rel = float((vec - loop).norm() / loop.norm())

    lam = problem.init_params(torch.float32)
    t32 = tasks.to(dtype=torch.float32)
    s_vec = time_it(lambda: problem.value_and_gradient(lam, t32), repeats)
    s_loop = time_it(lambda: loop_meta_gradient(problem, lam, t32), repeats)
    n = len(tasks)
    row = {
        "setting": name,
        "meta_batch": n,
        "n_params": problem.dim,
        "vectorised_s_per_batch": s_vec,
        "loop_s_per_batch": s_loop,
        "vectorised_tasks_per_s": n / s_vec,
        "loop_tasks_per_s": n / s_loop,
        "speedup": s_loop / s_vec,
        "float64_relative_difference": max_rel,
    }
    print(f"[{name}] meta-batch {n}, {problem.dim} params: vectorised {n / s_vec:.1f} tasks/s, loop {n / s_loop:.1f} tasks/s "
          f"-> {s_loop / s_vec:.2f}x (float64 agreement {max_rel:.1e})", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("METAINFLUENCE_DATA"), help="folder holding omniglot/ (default: $METAINFLUENCE_DATA)")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget of Omniglot meta-training (default 7: the whole script then takes ~9 min)")
    p.add_argument("--max-steps", type=int, default=5000, help="step cap of Omniglot meta-training")
    p.add_argument("--train-tasks", type=int, default=12000, help="size of the fixed Omniglot training pool")
    p.add_argument("--q-train", type=int, default=1, help="query examples per class in training tasks (MAML's Omniglot setting: 1)")
    p.add_argument("--q-test", type=int, default=5, help="query examples per class in the 600 test tasks")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--width", type=int, default=64, help="Conv4 filters")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per throughput measurement (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default). Default 1: on a busy 2-core machine a Conv4 step took 1.0 s with 1 thread and 12 s with 2")
    p.add_argument("--skip-omniglot", action="store_true")
    p.add_argument("--out", default="bench_training.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()

    machine = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(f"machine: {machine}", flush=True)
    results: dict = {"machine": machine, "command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "throughput": []}
    t_all = time.perf_counter()

    # ---- 1a. digits / MLP (the demo's setting)
    digits = load_dataset("digits")
    pool = build_pool(digits, "train", 5, 1, 5, 32, seed=0)
    torch.manual_seed(0)
    mlp = build_model(ModelSettings(hidden=(64, 64), activation="tanh"), digits.image_shape, 5)
    prob = MetaProblem(mlp, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=1e-3)
    results["throughput"].append(compare("digits MLP 64-64, 5-way 1-shot, 5 query", prob, pool.tensors(digits), args.repeats))

    if args.skip_omniglot or not args.data_root:
        write_json(args.out, results)
        return 0

    # ---- 1b + 2. Omniglot / Conv4
    t = time.perf_counter()
    omni = load_dataset("omniglot", root=Path(args.data_root), image_size=28)
    results["omniglot_load_s"] = time.perf_counter() - t
    print(f"omniglot: {omni!r} ({results['omniglot_load_s']:.1f} s)", flush=True)
    torch.manual_seed(0)
    conv = build_model(ModelSettings(kind="conv4", width=args.width, norm="none"), omni.image_shape, 5)
    omni_problem = MetaProblem(conv, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=0.0)
    batch_pool = build_pool(omni, "train", 5, 1, args.q_train, 32, seed=123)
    results["throughput"].append(compare(f"Omniglot Conv4-{args.width}, 5-way 1-shot, {args.q_train} query", omni_problem, batch_pool.tensors(omni), max(2, args.repeats // 2)))

    t = time.perf_counter()
    train_pool = build_pool(omni, "train", 5, 1, args.q_train, args.train_tasks, seed=0)
    test_pool = build_pool(omni, "test", 5, 1, args.q_test, args.test_tasks, seed=0)
    train_tensors, test_tensors = train_pool.tensors(omni), test_pool.tensors(omni)
    results["omniglot_pools_s"] = time.perf_counter() - t
    print(f"train pool: {train_pool.summary()}\ntest pool:  {test_pool.summary()} ({results['omniglot_pools_s']:.1f} s)", flush=True)

    settings = TrainSettings(meta_batch=32, steps=args.max_steps, lr=1e-3, seed=0, checkpoint_every=0, dtype="float32", log_every=25, max_minutes=args.minutes)
    lam0 = omni_problem.init_params(torch.float32)
    before = evaluate(omni_problem, lam0, test_tensors)
    lam, history = meta_train(omni_problem, lam0, train_tensors, settings, progress=True)
    omni_problem.chunk_size = 100
    t = time.perf_counter()
    after = evaluate(omni_problem, lam, test_tensors)
    eval_s = time.perf_counter() - t
    results["omniglot"] = {
        "setting": f"5-way 1-shot, Conv4-{args.width} (no norm), second-order MAML, inner lr 0.4, 1 step (train and test), "
                   f"Adam 1e-3, meta-batch 32, fixed train pool of {args.train_tasks} tasks ({args.q_train} query/class), "
                   f"{args.test_tasks} test tasks ({args.q_test} query/class), seeded 1100/100/423 character split with rotations",
        "budget_minutes": args.minutes,
        "steps_done": history.steps_done,
        "train_wall_s": history.wall_time_s,
        "train_tasks_per_s": history.tasks_per_second,
        "stopped": history.stopped,
        "accuracy_at_init": before.to_json(),
        "accuracy": after.to_json(),
        "eval_wall_s": eval_s,
        "literature_accuracy": 0.987,
        "literature_source": "Finn et al. 2017 (MAML), Omniglot 5-way 1-shot: 98.7 ± 0.4%",
    }
    print(f"Omniglot 5-way 1-shot after {history.steps_done} steps ({history.wall_time_s / 60:.1f} min, {history.tasks_per_second:.1f} tasks/s): "
          f"{after.summary()}  [at init: {100 * before.accuracy:.1f}%; literature 98.7%]", flush=True)
    results["total_s"] = time.perf_counter() - t_all
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_json(args.out, results)
    print(f"wrote {args.out} (total {results['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
