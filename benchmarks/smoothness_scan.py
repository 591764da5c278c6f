"""Is the meta-objective smooth at a checkpoint? F along the steepest-descent direction, against its
linear prediction.

    python benchmarks/smoothness_scan.py --checkpoint RUN/trained [--data-root DIR] [--threads 1] [--dtype float32]

For t = 1e-9 … 1e-3 it prints ΔF = F(λ − t·∇F/‖∇F‖) − F(λ) and the ratio ΔF / (−t‖∇F‖). On a twice
differentiable F the ratio is 1 for small t and drifts smoothly as t grows; where it jumps (negative, or
several times 1, at tiny t) F is discontinuous there and no optimiser can drive ‖∇F‖ to a tight
tolerance (docs/training.md, "Refine at Conv4 scale": second-order MAML with ReLU). ``--dtype float32`` scans
in the training precision (F still added up in float64), to see down to which step a float32 refine can
trust its F and ∇F.
"""

from __future__ import annotations

import argparse

import torch

from metainfluence.pipeline.run import RunContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint stem, e.g. runs/x/trained")
    ap.add_argument("--data-root", default=None, help="dataset folder (else the recorded one, else $METAINFLUENCE_DATA)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision of λ, the pool and every product")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx, ckpt = RunContext.from_checkpoint(args.checkpoint, data_root=args.data_root, splits=("train",))
    dtype = getattr(torch, args.dtype)
    problem, tasks = ctx.problem, ctx.tensors["train"].to(dtype=dtype)
    lam = ckpt.lam.to(dtype)
    f0, g = problem.value_and_gradient(lam, tasks)
    gn = float(g.norm())
    print(f"model {ctx.settings.model.kind}, conv activation {ctx.settings.model.conv_activation}, {len(tasks)} tasks, "
          f"p = {lam.numel()}: F = {float(f0):.6g}, ‖∇F‖ = {gn:.4g} ({args.dtype})")
    print(f"{'t':>7} {'ΔF':>11} {'−t‖∇F‖':>11} {'ratio':>8} {'‖∇F(t)‖':>9}")
    for t in (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        ft, gt = problem.value_and_gradient(lam - t * g / gn, tasks)
        df, lin = float(ft - f0), -t * gn
        print(f"{t:7.0e} {df:+11.3e} {lin:+11.3e} {df / lin:8.3f} {float(gt.norm()):9.4f}")


if __name__ == "__main__":
    main()
