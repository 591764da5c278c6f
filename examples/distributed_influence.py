"""Task-IF of a trained run's training pool, sharded over processes (torchrun).

    # one machine, 4 GPUs (nccl) — or 4 CPU processes (gloo) when there is no GPU:
    torchrun --standalone --nproc_per_node=4 examples/distributed_influence.py \
        --checkpoint runs/demo/refined --out runs/demo/influence/task_if_dist

    # two machines, 8 GPUs each (run on both; --node_rank 0 on the first):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        examples/distributed_influence.py --checkpoint runs/demo/refined --out runs/demo/influence/task_if_dist

Every process rebuilds the run from the checkpoint (same settings, same pools), keeps its shard of the
training and validation pools, and the scores are gathered into pool order; rank 0 writes
OUT.safetensors + OUT.json and OUT.csv (the same files as a single-process result). Without torchrun the
script runs as one process. A user mistake prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse

import torch

import sys

from metainfluence.distributed import distributed_task_influence, init_distributed
from metainfluence.config import add_settings_arguments, load_settings, namespace_overrides
from metainfluence.errors import MetaInfluenceError
from metainfluence.influence.results import InfluenceSettings
from metainfluence.meta.checkpoint import pool_fingerprint
from metainfluence.pipeline import RunContext
from metainfluence.pipeline.describe import item_rows, write_item_table
from metainfluence.pipeline.proximal import proximal_of, proximal_settings, record_proximal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint stem, e.g. runs/demo/refined")
    ap.add_argument("--out", required=True, help="output stem of the scores (rank 0 writes OUT.safetensors + OUT.json)")
    ap.add_argument("--data-root", default=None, help="dataset folder (not needed for digits and sinusoid)")
    ap.add_argument("--backend", default=None, choices=[None, "gloo", "nccl"], help="default: nccl with CUDA, else gloo")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    dests = add_settings_arguments(ap, InfluenceSettings, dest="influence.", title="influence settings")
    args = ap.parse_args()
    try:
        return run_sharded(args, dests)
    except MetaInfluenceError as exc:  # a user mistake: one line, as the CLI says it (every rank meets it alike)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def run_sharded(args: argparse.Namespace, dests) -> int:
    ctx = init_distributed(args.backend)
    with ctx:
        run, ckpt = RunContext.from_checkpoint(args.checkpoint, data_root=args.data_root, splits=("train", "val"))
        dtype = getattr(torch, args.dtype)
        problem = run.problem
        problem.model.to(device=ctx.device, dtype=dtype)
        lam = ckpt.lam.to(device=ctx.device, dtype=dtype)
        train = run.tensors["train"].to(ctx.device, dtype)
        val = run.tensors["val"].to(ctx.device, dtype)
        typed = {k.removeprefix("influence."): v for k, v in namespace_overrides(args, dests).items()}
        given = load_settings(InfluenceSettings(), overrides=typed)
        # a checkpoint refined on the proximal objective P = F + (γ/2)‖λ − λ₀‖² is scored on P, as `metainfluence
        # influence` does: γ joins the damping and stationarity is P's (from the checkpoint's refine report)
        prox = proximal_of(ckpt)
        settings = given if prox is None else proximal_settings(given, prox[0])
        if prox is not None and ctx.is_main:
            print(f"proximal checkpoint: γ = {prox[0]:g} added to the damping ({given.damping:g} → {settings.damping:g})")
        pool = run.pools["train"]
        ids = getattr(pool, "task_ids", None)
        result = distributed_task_influence(problem, lam, train, val, settings, task_ids=ids)
        if ctx.is_main:
            if prox is not None:
                record_proximal(result.diagnostics, prox[0], given, ckpt.info["refine_report"])
            result.save(args.out, pool_fingerprint=pool_fingerprint(pool))
            write_item_table(args.out, item_rows(result, pool, run.dataset), result.method)  # OUT.csv: the tasks by class name
            d = result.diagnostics
            print(f"{len(result.scores)} task scores on {ctx.world_size} process(es) ({ctx.backend or 'single'}); "
                  f"solver residual {d.get('solver', {}).get('residual')}; wrote {args.out}.safetensors/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
