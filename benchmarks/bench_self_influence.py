"""Self-influence beside task-IF under a fisher curvature file: the one shared call the experiments make now,
against the separate fisher + Woodbury call they made before, timed side by side on a finished detection run.

    python benchmarks/bench_self_influence.py --run RUN [--data-root DIR] [--threads 1]

RUN is a `metainfluence experiment detection` folder whose [influence] is hessian = "fisher" with solver =
"curvature" (configs/detection_{mnist,omniglot}_conv4_recipe.toml); its refined λ*, pools and curvature file
are reused. Prints both times, their ratio and the largest difference of the two self-influence vectors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from _detection_run import load_detection_run
from metainfluence import task_influence
from metainfluence.experiments.common import _score_cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="detection experiment folder (refined.*, pools/, scores/task-if.*, curvature.*)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    ctx, lam, _, s = load_detection_run(run, args.data_root)
    train, val = (ctx.tensors[k].to(dtype=lam.dtype) for k in ("train", "val"))
    t = time.perf_counter()
    shared = _score_cached(ctx.problem, lam, train, val, "task-if", s, lambda m: None, self_influence=True)
    t_shared = time.perf_counter() - t
    t = time.perf_counter()
    task_influence(ctx.problem, lam, train, val, s)
    separate = task_influence(ctx.problem, lam, train, val, dataclasses.replace(s, hessian="fisher", solver="woodbury", products="working",
                                                                               self_influence=True))
    t_separate = time.perf_counter() - t
    diff = float((shared.self_influence.double() - separate.self_influence.double()).abs().max() / separate.self_influence.double().abs().max())
    print(json.dumps({"run": str(run), "n_tasks": len(train), "threads": args.threads, "shared_call_s": t_shared, "separate_calls_s": t_separate,
                      "speedup": t_separate / t_shared, "self_influence_max_rel_diff": diff}, indent=1))


if __name__ == "__main__":
    main()
