"""Time to stationarity on a Conv4 pool: meta-train a config, then refine its trained λ on the proximal
objective F + (γ/2)‖λ − λ_t‖² (``refine --refine-proximal γ``), in one process, and print refine time over
training time (issue #14's target: ratio ‖∇‖/mean‖g_i‖ ≤ 1e-4 in at most twice the training time).

    python benchmarks/bench_proximal_refine.py --config configs/detection_omniglot_conv4_silu.toml \
        --out /tmp/prox [--gamma 0.1] [--tol-ratio 1e-4] [--max-minutes 20] [--data-root DIR] [--set data.corrupt_tasks=0.2 ...]

Plain F is refined with the same settings for comparison when --plain-too is given (it has no stationary
point near λ_t on a memorised pool: docs/training.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from metainfluence.config import apply_overrides, read_config_file
from metainfluence.pipeline import RunSettings, refine_checkpoint, train_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--tol-ratio", type=float, default=1e-4)
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a run setting (value parsed as TOML)")
    ap.add_argument("--plain-too", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tomllib

    data = {k: v for k, v in read_config_file(args.config).items() if k in ("data", "model", "inner", "objective", "train", "refine")}
    # dotted keys, values parsed as TOML (as in a config file)
    sets = {key: tomllib.loads(f"v = {value}")["v"] for key, value in (item.split("=", 1) for item in args.set)}
    if args.data_root:
        sets["data.data_root"] = args.data_root
    run = apply_overrides(apply_overrides(RunSettings(), data, source=args.config), sets, source="--set")
    t = time.perf_counter()
    train_run(run, args.out, progress=False, force=True, log=print)
    t_train = time.perf_counter() - t
    variants = [("proximal", args.gamma)] + ([("plain", 0.0)] if args.plain_too else [])
    for name, gamma in variants:
        def over(s, gamma=gamma):
            return dataclasses.replace(s, refine=dataclasses.replace(s.refine, proximal=gamma, tol=0.0, tol_ratio=args.tol_ratio,
                                                                     max_minutes=args.max_minutes, max_iter=100000))
        t = time.perf_counter()
        _, rep, before, after = refine_checkpoint(f"{args.out}/trained", name=f"refined_{name}", overrides=over, progress=False, log=lambda s: None)
        t_ref = time.perf_counter() - t
        print(f"{name} (γ = {gamma:g}): ratio {rep.ratio_before:.3g} → {rep.ratio_after:.3g} ({rep.stopped_by}, {rep.iterations} iterations) in "
              f"{t_ref:.1f} s = {t_ref / t_train:.2f}× the training time ({t_train:.1f} s); test accuracy {before.accuracy:.4f} → {after.accuracy:.4f}")


if __name__ == "__main__":
    main()
