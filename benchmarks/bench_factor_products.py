"""Gᵀ Y for a wide factor G (a fisher curvature file's rows) and a few columns Y, the two ways torch can form it, timed
side by side on one thread: ``G.T @ Y`` (the transposed factor against the columns) and ``(Y.T @ G).T``
(``linalg.woodbury.transposed_times``, what the fisher operator's products and Woodbury solves use).

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
        ways = {"G.T @ Y": lambda: G.T @ Y, "transposed_times": lambda: transposed_times(G, Y)}
        times: dict[str, list[float]] = {w: [] for w in ways}
        results = {w: f() for w, f in ways.items()}  # warm-up, and the results compared
        for _ in range(args.repeats):
            for w, f in ways.items():  # alternating, so that drift of the machine's speed hits both
                t = time.perf_counter()
                f()
                times[w].append(time.perf_counter() - t)
        med = {w: statistics.median(t) for w, t in times.items()}
        scale = results["G.T @ Y"].abs().max()
        out.append({"width": k, "median_s": med, "speedup": med["G.T @ Y"] / med["transposed_times"],
                    "max_rel_diff": float((results["G.T @ Y"] - results["transposed_times"]).abs().max() / scale)})
    print(json.dumps({"rows": args.rows, "dim": args.dim, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats, "widths": out}, indent=1))


if __name__ == "__main__":
    main()
