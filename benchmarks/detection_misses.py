"""Which mislabeled tasks does a ranking miss? Group a finished detection run's corrupted tasks by how much of
their task survives the flips, and count each ranking's misses per group.

    python benchmarks/detection_misses.py --run RUN [--ranking task-if-exact] [--ranking task-if] ...

RUN is the folder of `metainfluence experiment detection` (only its saved pools and scores are read: no data,
no model). A flipped label does harm through the adaptation: the inner step fits the support labels and the
query loss is then taken at the query labels. For each query this counts whether its label still equals the
(possibly flipped) label of the support example of the same true class: a *consistent* query is learnable
from its support even though its label is wrong, since labels in an N-way task are arbitrary names. A task
with several consistent queries is partly a valid task, and can help the measurement. Recall at 1.25ρ counts
the corrupted tasks inside the top 1.25ρ·n of a ranking (the most negative scores: removal lowers the
validation loss most); a miss is a corrupted task outside it. Clean tasks have every query consistent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _detection_run import recall_cut
from metainfluence.influence.results import InfluenceResult
from metainfluence.tasks.pool import TaskPool


def consistent_queries(pool: TaskPool) -> torch.Tensor:
    """(n,) number of queries whose label equals the label of the support examples of their true class."""
    same_class = pool.query_true_y[:, :, None] == pool.support_true_y[:, None, :]          # (n, q, s)
    same_label = pool.query_y[:, :, None] == pool.support_y[:, None, :]
    # a query is consistent when every support example of its class carries its label (K = 1: the one)
    has_support = same_class.any(-1)
    agrees = (same_class & ~same_label).sum(-1) == 0
    return (has_support & agrees).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder")
    ap.add_argument("--ranking", action="append", default=[], help="kept scores (scores/NAME), repeatable; default: every task-if* and loss")
    args = ap.parse_args()
    run = Path(args.run)
    pool = TaskPool.load(run / "pools" / "train")
    flags = pool.corrupted_tasks.bool()
    if not bool(flags.any()):
        raise SystemExit(f"error: {run} has no corrupted tasks; run a detection experiment with rho_task > 0")
    cons = consistent_queries(pool)
    names = args.ranking or sorted(p.stem for p in (run / "scores").glob("*.json") if p.stem.startswith("task-if") or p.stem == "loss")
    n = len(flags)
    cut = recall_cut(flags)
    groups = sorted(set(cons[flags].tolist()))
    out = {"run": str(run), "n_tasks": n, "n_corrupted": int(flags.sum()), "cut (1.25ρ·n)": cut,
           "query_size": int(pool.query_y.shape[1]),
           "clean tasks with every query consistent": bool((cons[~flags] == pool.query_y.shape[1]).all()),
           "corrupted tasks by consistent queries": {int(c): int((flags & (cons == c)).sum()) for c in groups}, "rankings": {}}
    for name in names:
        scores = InfluenceResult.load(run / "scores" / name).scores.double()
        top = torch.zeros(n, dtype=torch.bool)
        top[torch.argsort(scores, stable=True)[:cut]] = True  # most harmful first
        missed = flags & ~top
        out["rankings"][name] = {"recall@1.25rho": 1 - float(missed.sum()) / float(flags.sum()),
                                 "missed by consistent queries": {int(c): f"{int((missed & (cons == c)).sum())} of {int((flags & (cons == c)).sum())}" for c in groups}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
