"""One process of tests/test_distributed.py, launched by torchrun (gloo, CPU).

Builds the same small float64 problem on every process (seeded), computes the meta-gradient, one
HVP per Hessian kind and task-IF for every case of ``CASES`` on its shards, and rank 0 writes the
full-pool results to ``--out`` (safetensors). ``build`` and ``CASES`` are imported by the test for
the single-process reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import random_tasks, small_problem  # noqa: E402

from metainfluence.influence.results import InfluenceSettings  # noqa: E402
from metainfluence.linalg import SolverSettings  # noqa: E402

N_TRAIN, N_VAL = 7, 5  # odd: the shards are uneven (4 + 3, 3 + 2)
TIGHT = dict(solve=SolverSettings(tol=1e-12, max_iter=2000))
CASES = {
    # the exact and direct Hessians are indefinite here: damping 0.5 keeps CG valid
    "exact_cg": InfluenceSettings(hessian="exact", solver="cg", damping=0.5, **TIGHT),
    "gn_cg": InfluenceSettings(hessian="gauss-newton", solver="cg", damping=5e-2, **TIGHT),
    "exact_lowrank": InfluenceSettings(hessian="exact", solver="lowrank", damping=0.5, solve=SolverSettings(lowrank_rank=3)),
    "fisher_woodbury_self": InfluenceSettings(hessian="fisher", solver="woodbury", damping=1e-2, fisher_samples=2, self_influence=True, solve=SolverSettings(seed=3)),
    "direct_cg": InfluenceSettings(method="direct-if", solver="cg", damping=0.5, **TIGHT),
    "tracin": InfluenceSettings(method="tracin"),
    "loss": InfluenceSettings(method="loss"),
    "random": InfluenceSettings(method="random", solve=SolverSettings(seed=5)),
}
HVP_KINDS = ("exact", "gauss-newton", "gamma")


def build():
    """(problem, λ, train pool, validation pool, direction) — identical in every process."""
    problem, lam = small_problem("unrolled", steps=2, lr=0.3, hidden=(4,), weight_decay=1e-2, chunk_size=3)
    g = torch.Generator().manual_seed(11)
    lam = lam + 0.3 * torch.randn(lam.shape, generator=g, dtype=lam.dtype)
    train = random_tasks(n=N_TRAIN, seed=1)
    val = random_tasks(n=N_VAL, seed=2)
    direction = torch.randn(lam.shape, generator=g, dtype=lam.dtype)
    return problem, lam, train, val, direction


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder for the results (rank 0 writes)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from metainfluence.distributed import distribute, distributed_task_influence, gather_rows, init_distributed, shard
    from metainfluence.meta.curvature import TotalHessian
    from metainfluence.io import write_tensors

    ctx = init_distributed(backend="gloo", timeout_s=60)
    assert ctx.world_size == 2, f"expected 2 processes, got {ctx.world_size}"
    problem, lam, train, val, direction = build()
    out = Path(args.out)
    tensors: dict[str, torch.Tensor] = {}

    local_train = train.subset(shard(len(train), ctx.rank, ctx.world_size))
    with distribute(problem):
        tensors["meta_gradient"] = problem.meta_gradient(lam, local_train)
        value, gradient = problem.value_and_gradient(lam, local_train)
        tensors["objective"] = value.reshape(1)
        tensors["value_and_gradient.gradient"] = gradient
        tensors["n_total"] = torch.tensor([problem.collective.total_count(len(local_train))])
        for kind in HVP_KINDS:
            op = TotalHessian(problem, lam, local_train, kind)
            tensors[f"hvp.{kind}"] = op.matvec(direction)
            tensors[f"hmm.{kind}"] = op.matmat(torch.stack([direction, lam], 1))
        # a time limit read on each process's own clock: rank 1's is spent at once, rank 0's is not. Both must stop at
        # the same iteration (a process that went on alone would wait in its next sum for ever)
        from metainfluence.linalg import SolverSettings, cg_solve

        budget = SolverSettings(tol=1e-30, max_iter=50, max_minutes=1e-9 if ctx.rank == 1 else 30.0)
        res = cg_solve(TotalHessian(problem, lam, local_train, "gauss-newton"), direction, 1e-2, budget)
        tensors["deadline.iterations"] = torch.tensor([res.iterations, int(res.info.get("stopped_by") == "time")])

    for name, settings in CASES.items():
        res = distributed_task_influence(problem, lam, train, val, settings, out=out / name if name == "exact_cg" else None)
        tensors[f"{name}.scores"] = res.scores
        tensors[f"{name}.measurement"] = torch.tensor([res.measurement], dtype=torch.float64)
        if res.self_influence is not None:
            tensors[f"{name}.self_influence"] = res.self_influence
        if "s" in res.extra:
            tensors[f"{name}.s"] = res.extra["s"]
        # every process must hold the same full-pool scores: keep the largest difference to rank 0
        every = gather_rows(res.scores.unsqueeze(0), [1, 1])
        tensors[f"{name}.rank_spread"] = (every - every[0]).abs().max().reshape(1)

    # the hooks are gone after the context: a single-process sum again
    tensors["restored_n_total"] = torch.tensor([problem.collective.total_count(len(local_train))])
    if ctx.is_main:
        write_tensors(out / "results.safetensors", tensors)
    ctx.barrier()
    # every rank got past the last collective: a crash after this is gloo's teardown, not ours
    (out / f"done.rank{ctx.rank}").write_text("ok")
    ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
