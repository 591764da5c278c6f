"""Gᵀ Y and G P for a wide factor G (a fisher curvature file's rows) and a few columns, the two ways torch can form
each, timed side by side on one thread: ``G.T @ Y`` against ``(Y.T @ G).T`` (``linalg.woodbury.transposed_times``), and
``G @ P`` against ``(P.T @ G.T).T`` (``linalg.woodbury.times``): what the fisher operator's products, its Woodbury
solves and its CG iterations use.

    python benchmarks/bench_factor_products.py [--rows 5000] [--dim 28965] [--widths 1 4 5 16] [--repeats 5] [--dtype float32]

The defaults are the Omniglot removal table's factor (5,000 tasks, Conv4-32). Prints the median seconds of each way,
their ratio and the largest difference of the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metainfluence.linalg.woodbury import times as factor_times
from metainfluence.linalg.woodbury import transposed_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=28965)
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 4, 5, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    G = torch.randn(args.rows, args.dim, generator=g, dtype=dtype)
    out = []
    for k in args.widths:
        Y = torch.randn(args.rows, k, generator=g, dtype=dtype)
        P = torch.randn(args.dim, k, generator=g, dtype=dtype)
        row = {"width": k}
        for plain, ours, ways in (("G.T @ Y", "transposed_times", {"G.T @ Y": lambda: G.T @ Y, "transposed_times": lambda: transposed_times(G, Y)}),
                                  ("G @ P", "times", {"G @ P": lambda: G @ P, "times": lambda: factor_times(G, P)})):
            taken: dict[str, list[float]] = {w: [] for w in ways}
            results = {w: f() for w, f in ways.items()}  # warm-up, and the results compared
            for _ in range(args.repeats):
                for w, f in ways.items():  # alternating, so that drift of the machine's speed hits both
                    t = time.perf_counter()
                    f()
                    taken[w].append(time.perf_counter() - t)
            med = {w: statistics.median(t) for w, t in taken.items()}
            scale = results[plain].abs().max()
            row[ours] = {"median_s": med, "speedup": med[plain] / med[ours], "max_rel_diff": float((results[plain] - results[ours]).abs().max() / scale)}
        out.append(row)
    print(json.dumps({"rows": args.rows, "dim": args.dim, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats, "widths": out}, indent=1))


if __name__ == "__main__":
    main()
