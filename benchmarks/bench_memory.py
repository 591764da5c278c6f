"""Peak memory of task-IF scores against the pool size n (a script, not a test).

Each setting runs in a fresh subprocess, which builds the digits pools (5-way 1-shot, 5 query) and
an MLP, then computes task-IF scores with a fixed number of HVPs (CG: ``--cg-iters``
iterations, lowrank: Lanczos for ``--rank`` pairs), so that work per task is the same at every n.
Reported per setting:

* ``base``  resident memory (RSS) after the pools and the model are built and a 2-task warm-up
            run (the pools grow with n: they are data, not the algorithm's working memory),
* ``peak``  the high-water RSS during the influence computation (Linux: VmHWM after resetting it
            through /proc/self/clear_refs; elsewhere ru_maxrss, which includes the setup),
* ``extra`` peak − base: the working memory of the influence computation.

With ``chunk_size`` fixed and the exact Hessian, ``extra`` is flat in n. Two contrasts: the
gauss-newton (also gamma, direct) operator caches the adapted θ_i of every task (n × p floats), and
``none`` puts the whole pool in one vmapped chunk; both grow with n.

    python benchmarks/bench_memory.py                       # n = 50 100 200 400, the four default plans
    python benchmarks/bench_memory.py --sizes 50 100 --plans cg:exact:25 cg:exact:none
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> dict:
    import gc
    import warnings

    import torch

    from metainfluence.allocator import tune_allocator
    from metainfluence.data.digits import load_digits
    from metainfluence.influence.results import InfluenceSettings
    from metainfluence.linalg import SolverSettings
    from metainfluence.influence.task_if import task_influence
    from metainfluence.meta.models import MLP
    from metainfluence.meta.objective import InnerSettings, MetaProblem
    from metainfluence.tasks import build_pool

    warnings.simplefilter("ignore")  # λ is the untrained init: the stationarity warning is expected
    torch.set_num_threads(args.threads)
    tune_allocator()
    ds = load_digits()
    train = build_pool(ds, "train", 5, 1, 5, args.n, seed=0).tensors(ds)
    val = build_pool(ds, "val", 5, 1, 5, args.val_tasks, seed=1).tensors(ds)
    torch.manual_seed(0)
    chunk = args.n if args.chunk == 0 else args.chunk
    problem = MetaProblem(MLP(64, 5, tuple(args.hidden)), "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=1e-3, chunk_size=chunk)
    lam = problem.init_params()
    common = dict(hessian=args.hessian, damping=args.damping, stationarity_warn=1e9)
    if args.solver == "cg":
        settings = InfluenceSettings(solver="cg", **common, solve=SolverSettings(tol=1e-30, max_iter=args.cg_iters))  # always cg_iters iterations
    else:
        settings = InfluenceSettings(solver="lowrank", **common, solve=SolverSettings(lowrank_rank=args.rank))
    # warm-up on 2 tasks, one per chunk: loads lazily imported code and the allocator's first
    # arenas, so that ``extra`` below is working memory rather than a fixed start-up cost
    warm = MetaProblem(problem.model, "cross_entropy", problem.inner, weight_decay=1e-3, chunk_size=1)
    warm_settings = dataclasses.replace(settings, damping=max(settings.damping, 10.0))  # 2 tasks: keep H + δI positive
    task_influence(warm, lam, train.subset(slice(0, 2)), val.subset(slice(0, 2)), warm_settings)
    del warm
    gc.collect()
    base_kb = _status_kb("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    res = task_influence(problem, lam, train, val, settings)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if exact_peak else None
    if peak_kb is None:  # ru_maxrss: KiB on Linux, bytes on macOS
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kb = ru // 1024 if sys.platform == "darwin" else ru
    return {
        "n": args.n, "solver": args.solver, "chunk": chunk, "p": lam.numel(),
        "base_mb": (base_kb or 0) / 1024, "peak_mb": peak_kb / 1024, "extra_mb": (peak_kb - (base_kb or 0)) / 1024,
        "peak_source": "VmHWM" if exact_peak else "ru_maxrss", "seconds": seconds,
        "hvps": res.diagnostics["solver"]["hvps"], "residual": res.diagnostics["solver"]["residual"],
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400], help="training pool sizes n")
    ap.add_argument("--plans", nargs="+", default=["cg:exact:25", "lowrank:exact:25", "cg:gauss-newton:25", "cg:exact:none"],
                    help="settings SOLVER:HESSIAN:CHUNK (CHUNK = tasks per vmapped chunk, 'none' = the whole pool in one chunk)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[32], help="MLP hidden widths")
    ap.add_argument("--val-tasks", type=int, default=50)
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--damping", type=float, default=None, help="default: 0.5 for exact (λ_min ≈ −0.2 at the untrained λ), 1e-2 otherwise")
    ap.add_argument("--hessian", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=25, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--solver", default="cg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0

    plan = [tuple(item.split(":")) for item in args.plans]
    rows = []
    for solver, hessian, chunk_s in plan:
        chunk = 0 if chunk_s == "none" else int(chunk_s)
        damping = args.damping if args.damping is not None else (0.5 if hessian in ("exact", "direct") else 1e-2)
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--solver", solver, "--chunk", str(chunk),
                   "--hidden", *map(str, args.hidden), "--val-tasks", str(args.val_tasks), "--cg-iters", str(args.cg_iters),
                   "--rank", str(args.rank), "--damping", str(damping), "--hessian", hessian, "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"setting n={n} solver={solver} hessian={hessian} failed (rc {out.returncode})")
            row = json.loads(line[len("RESULT "):])
            row.update(hessian=hessian, damping=damping, chunk_label=chunk_s)
            rows.append(row)
            print(f"  done: {solver:7s} {hessian:12s} chunk={chunk_s:<5s} n={n:<5d} extra={row['extra_mb']:8.1f} MB  {row['seconds']:6.1f} s", file=sys.stderr)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}, python {platform.python_version()}, torch {_torch_version()}")
    print(f"model: MLP 64-{'-'.join(map(str, args.hidden))}-5 (p = {rows[0]['p']}, float32), digits 5-way 1-shot 5-query, 1 inner step, "
          f"{args.val_tasks} validation tasks; cg: {args.cg_iters} iterations, lowrank: rank {args.rank}; peak from {rows[0]['peak_source']}")
    print()
    print("| solver | hessian | chunk | n | base RSS MB | peak RSS MB | extra MB (peak − base) | extra − extra(n_min) MB | peak / peak(n_min) | HVPs | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for solver, hessian, chunk_s in plan:
        group = [r for r in rows if (r["solver"], r["hessian"], r["chunk_label"]) == (solver, hessian, chunk_s)]
        first = group[0]
        for r in group:
            label = "n (one chunk)" if chunk_s == "none" else chunk_s
            print(f"| {solver} | {hessian} | {label} | {r['n']} | {r['base_mb']:.1f} | {r['peak_mb']:.1f} | {r['extra_mb']:.1f} | "
                  f"{r['extra_mb'] - first['extra_mb']:+.1f} | {r['peak_mb'] / first['peak_mb']:.3f} | {r['hvps']} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
