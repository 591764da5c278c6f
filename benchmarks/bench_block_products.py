"""Total-Hessian products of a checkpoint's training pool for a block of directions, three ways side by side on one
thread: one product per direction (``matvec``), the block vmapped over directions with the task chunk divided by
the block's width (``matmat``, what Nyström sketches, block CG and Lanczos use), and the same block over the
undivided task chunk (what ``matmat`` did before: a block of 16 Conv4 directions then holds 16 chunks' graphs at once).

    METAINFLUENCE_DATA=DIR python benchmarks/bench_block_products.py --checkpoint RUN/refined [--hessian gauss-newton]
        [--columns 16] [--matvecs 3] [--no-undivided]

Prints seconds per direction of each way, their ratios and the largest relative difference of the products.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.func import vmap

from metainfluence.meta.curvature import TotalHessian
from metainfluence.pipeline import RunContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--hessian", default="gauss-newton", choices=["exact", "gauss-newton"])
    ap.add_argument("--columns", type=int, default=16, help="directions in the block (TotalHessian's column_chunk)")
    ap.add_argument("--matvecs", type=int, default=3, help="single products timed (their mean is the per-direction cost)")
    ap.add_argument("--no-undivided", action="store_true", help="skip the block over undivided task chunks (the slow way)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx, ckpt = RunContext.from_checkpoint(args.checkpoint, splits=("train",))
    lam = ckpt.lam.to(getattr(torch, args.dtype))
    train = ctx.tensors["train"].to(dtype=lam.dtype)
    op = TotalHessian(ctx.problem, lam, train, args.hessian, column_chunk=args.columns)
    V = torch.randn(lam.numel(), args.columns, generator=torch.Generator().manual_seed(0), dtype=lam.dtype)
    chunk = ctx.problem.chunk_size or ctx.problem.auto_chunk(lam, train)
    out: dict = {"checkpoint": args.checkpoint, "hessian": args.hessian, "tasks": len(train), "params": lam.numel(),
                 "columns": args.columns, "task_chunk": chunk,
                 "task_chunk_divided": max(1, chunk // args.columns) if ctx.problem.chunk_size else ctx.problem.auto_chunk(lam, train, args.columns)}

    op.matvec(V[:, 0])  # warm-up
    t = time.perf_counter()
    single = torch.stack([op.matvec(V[:, j]) for j in range(args.matvecs)], 1)
    out["matvec_s_per_direction"] = (time.perf_counter() - t) / args.matvecs
    t = time.perf_counter()
    block = op.matmat(V)
    out["matmat_s_per_direction"] = (time.perf_counter() - t) / args.columns
    rel = lambda a, b: float((a - b).norm() / b.norm())
    out["matmat_vs_matvec_rel_diff"] = rel(block[:, : args.matvecs], single)
    out["matvec_over_matmat"] = out["matvec_s_per_direction"] / out["matmat_s_per_direction"]
    if not args.no_undivided:
        t = time.perf_counter()
        undivided = vmap(op._local_sum, in_dims=1, out_dims=1)(V)  # the block over the undivided chunks
        out["undivided_s_per_direction"] = (time.perf_counter() - t) / args.columns
        out["undivided_over_matmat"] = out["undivided_s_per_direction"] / out["matmat_s_per_direction"]
        local = op.problem.collective.all_sum(undivided) / op.n_total + (op.gamma + op.problem.weight_decay) * V
        out["undivided_vs_matmat_rel_diff"] = rel(local, block)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
