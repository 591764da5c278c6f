"""A fisher factor's solves, the two ways ``linalg.woodbury.FactorCurvature`` can make them, timed side by side on one
thread: Gram matrix GGᵀ then Cholesky (the only way before), against CG on GᵀG + cI first (the Gram matrix formed only
once CG's products would cost more).

    python benchmarks/bench_factor_solve.py --file RUN/curvature [--damping 1e-3] [--repeats 3] [--threads 1]
    python benchmarks/bench_factor_solve.py --rows 5000 --dim 28965      # a random factor instead of a fitted one

The sequence timed is what a removal table charges to task-IF after the fit's pass: the probe check (4 random
columns), the score's solve (1 column) and the full-H edit's (1 column), each on a fresh copy of the factor. The
damping added is ``--damping`` plus the file's own shift; a run refined with the proximal term adds its γ, so the
recipe tables' δ = 1e-3 + γ = 1.001 is ``--damping 1.001``. Prints, as JSON, the median seconds of each way, their
ratio, CG's iterations and the largest relative difference of the two ways' solutions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from metainfluence.influence.curvature import load_curvature
from metainfluence.linalg.woodbury import FactorCurvature


def _factor(args) -> tuple[torch.Tensor, float, str]:
    if args.file:
        sketch = load_curvature(args.file).sketch
        if not isinstance(sketch, FactorCurvature):
            raise SystemExit(f"{args.file} holds a {type(sketch).__name__}, not a factor: fit it with --method fisher or gn-factor")
        return sketch.factor, sketch.shift, args.file
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.rows, args.dim, generator=g) / args.rows ** 0.5, 0.0, f"random {args.rows} × {args.dim}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default="", help="a fisher curvature file (RUN/curvature: its .safetensors and .json)")
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=28965)
    ap.add_argument("--damping", type=float, default=1.001)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    G, shift, source = _factor(args)
    g = torch.Generator().manual_seed(1)
    probes = torch.randn(G.shape[1], 4, generator=g, dtype=G.dtype)
    rhs = [probes / probes.norm(dim=0), torch.randn(G.shape[1], generator=g, dtype=G.dtype), torch.randn(G.shape[1], generator=g, dtype=G.dtype)]

    def sequence(cholesky: bool) -> tuple[float, list[torch.Tensor], dict]:
        inverse = FactorCurvature(G, shift)
        if cholesky:
            inverse._cg_work = float("inf")  # no budget: the Gram matrix at the first solve, as before
        t = time.perf_counter()
        out = [inverse.solve(b, args.damping) for b in rhs]
        return time.perf_counter() - t, out, inverse.last_solve

    times: dict[str, list[float]] = {"cholesky": [], "cg_first": []}
    results: dict[str, list[torch.Tensor]] = {}
    last: dict = {}
    for _ in range(args.repeats):
        for way in times:
            seconds, results[way], info = sequence(way == "cholesky")
            times[way].append(seconds)
            if way == "cg_first":
                last = info
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(results["cg_first"], results["cholesky"]))
    chol, cg = statistics.median(times["cholesky"]), statistics.median(times["cg_first"])
    print(json.dumps({"machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)", "factor": source,
                      "rows": G.shape[0], "dim": G.shape[1], "dtype": str(G.dtype).replace("torch.", ""), "damping_added": args.damping + shift,
                      "cholesky_s": round(chol, 3), "cg_first_s": round(cg, 3), "speedup": round(chol / cg, 2),
                      "cg_first_last_solve": last, "max_rel_difference": diff}, indent=1))


if __name__ == "__main__":
    main()
