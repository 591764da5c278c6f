"""Do the mislabeled tasks a ranking misses help the measurement, all of them together? Re-optimise a finished
detection run without each whole group at the ranking's 1.25ρ boundary and compare the true change of the
validation loss with the ranking's prediction (the sum of its scores over the group). It also counts the corrupted tasks the ranking
predicts to help (a positive score): if those signs are right, no ranking faithful to the measurement recalls them.

    python benchmarks/detection_group_census.py --run RUN [--ranking task-if-exact] [--dtype float64]
                                                [--tol-ratio 1e-5] [--max-iter 300] [--threads 1] [--signs-only]

RUN is the folder of `metainfluence experiment detection`. Recall at 1.25ρ counts the corrupted tasks inside
the top 1.25ρ·n of a ranking (ascending score: most harmful first). The groups:

- ``missed (near)``: the corrupted tasks outside that top, the half ranked nearest the boundary;
- ``missed (far)``: the other half, ranked furthest from it;
- ``false alarms``: the clean tasks inside that top.

`detection_loo_boundary.py` leaves out a few single tasks; this is the census: every miss and every false alarm
of the ranking, in three re-optimisations (plus the control, the full pool re-optimised from λ*) of the run's
proximal objective from λ*. Δf = f(λ without the group) − f(λ); positive: the group helps the measurement. A
missed group whose true Δf is positive is one whose removal would raise the validation loss: no faithful estimate
of that loss's change flags it as a whole. Each unit is kept in RUN/groundtruth_groups[_DTYPE]/ (JSON, one file
per ranking and group; the control is shared) under a key of λ*, the validation pool, the group and the optimiser settings, so an
interrupted census resumes; --kept-only reports the kept groups and computes none. One float64
re-optimisation of the 5,000-task Omniglot recipe pool takes 10-15 minutes on one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from _detection_run import load_for_reoptimisation, recall_boundary, reoptimisation_arguments, run_with_heartbeat
from metainfluence.evaluation.groundtruth import measurement_sha256, reoptimise, validation_loss
from metainfluence.io import read_json, write_json


def boundary_groups(scores: torch.Tensor, corrupted: torch.Tensor, factor: float = 1.25) -> tuple[int, dict[str, list[int]]]:
    """(cut, groups) of a ranking at its ``factor``·ρ·n boundary: the misses split by position into the half nearest
    the boundary and the rest, and the false alarms (clean tasks inside the top ``cut``)."""
    cut, order = recall_boundary(scores, corrupted, factor)
    missed = [int(k) for k in order[cut:] if corrupted[k]]
    half = (len(missed) + 1) // 2
    return cut, {"missed (near)": sorted(missed[:half]), "missed (far)": sorted(missed[half:]),
                 "false alarms": sorted(int(k) for k in order[:cut] if not corrupted[k])}


def sign_census(scores: torch.Tensor, corrupted: torch.Tensor, cut: int) -> dict:
    """How many tasks the ranking predicts to harm (a negative score), how many corrupted ones among them, and the
    best recall in the top ``cut`` of any ranking that agrees with these signs. Such a ranking puts every harmful
    task before every helpful one; where ``cut`` falls inside the harmful tasks, the corrupted tasks predicted to
    help cannot be recalled, whatever the order within each side."""
    harmful = scores < 0
    h, ch, c = int(harmful.sum()), int((harmful & corrupted).sum()), int(corrupted.sum())
    best = min(cut, ch) if cut <= h else ch + min(cut - h, c - ch)
    return {"tasks_predicted_harmful": h, "corrupted_predicted_harmful": ch, "corrupted_predicted_to_help": c - ch,
            "recall_cap_of_a_ranking_with_these_signs": best / max(c, 1)}


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if isinstance(p, torch.Tensor) else json.dumps(p).encode())
    return h.hexdigest()[:20]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    reoptimisation_arguments(ap)
    ap.add_argument("--signs-only", action="store_true", help="print the ranking's sign census and groups' sizes only (no re-optimisation)")
    ap.add_argument("--kept-only", action="store_true", help="report the groups whose re-optimisation is already kept; compute none")
    args = ap.parse_args()
    run = Path(args.run)
    r = load_for_reoptimisation(args)
    flags, ranking, kept = r.flags, r.ranking, r.kept
    cut, groups = boundary_groups(kept[ranking], flags)
    if args.signs_only:
        print(json.dumps({"run": str(run), "ranking": ranking, "boundary_position": cut, "sign_census": sign_census(kept[ranking], flags, cut),
                          "group_sizes": {g: len(v) for g, v in groups.items()}}, indent=1))
        return

    store, n = r.store(run, "groups"), len(r.train)
    base_key = {"lam": _digest(r.lam), "anchor": _digest(r.anchor) if r.anchor is not None else None, "val": measurement_sha256(r.val),
                "gamma": r.ground_truth.proximal, "dtype": args.dtype, "tol_ratio": args.tol_ratio, "max_iter": args.max_iter}

    def unit(name: str, removed: list[int]) -> dict | None:
        key = {**base_key, "removed": _digest(removed)}
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        path = store / (f"{slug}.json" if not removed else f"{ranking}__{slug}.json")  # each ranking has its own groups
        if path.is_file() and (old := read_json(path, "census unit")).get("key") == key:
            print(f"{name}: kept ({path})")
            return old
        if args.kept_only:
            print(f"{name}: not kept, skipped (--kept-only)")
            return None
        w = torch.ones(n, dtype=torch.float64)
        w[removed] = 0
        t = time.perf_counter()
        lam_r, gn = reoptimise(r.ctx.problem, r.lam, r.train, r.ground_truth, r.refine, w, anchor=r.anchor)
        info = {"key": key, "removed": removed, "f": validation_loss(r.ctx.problem, lam_r, r.val.to(dtype=lam_r.dtype)),
                "grad_norm": gn, "seconds": time.perf_counter() - t}
        write_json(path, info)
        print(f"{name}: {len(removed)} tasks removed, f = {info['f']:.6g} ({info['seconds']:.0f} s)")
        return info

    t0 = time.perf_counter()
    control = unit("control", [])
    mean_g = r.mean_task_grad
    rows, worst = [], control["grad_norm"]
    for name, removed in groups.items():
        u = unit(name, removed) if removed else None
        if removed and u is None:
            continue
        worst = max(worst, u["grad_norm"]) if u else worst
        rows.append({"group": name, "tasks": len(removed),
                     "true_delta_f": u["f"] - control["f"] if u else 0.0,
                     "predicted_delta_f": {m: float(s[removed].sum()) for m, s in kept.items()},
                     "tasks_predicted_to_help": {m: int((s[removed] > 0).sum()) for m, s in kept.items()}})
    ratio = worst / mean_g if mean_g else None
    warnings = [] if ratio is None or ratio <= 2 * args.tol_ratio else [
        f"re-optimisations stopped above their tolerance (worst ratio {ratio:.2g} > {args.tol_ratio:g}): the true Δf carry optimiser "
        "error; raise --max-iter"]
    out = {"run": str(run), "ranking": ranking, "n_tasks": n, "corrupted": int(flags.sum()), "boundary_position": cut,
           "recall_at_boundary": 1 - sum(len(groups[g]) for g in ("missed (near)", "missed (far)")) / max(int(flags.sum()), 1),
           "sign_census": sign_census(kept[ranking], flags, cut),
           "measurement": f"mean query loss of {len(r.val)} validation tasks",
           "sign": "Δf = f(λ without the group) − f(λ); positive: the group helps the measurement; predicted: the sum of the group's scores",
           "dtype": args.dtype, "tol_ratio": args.tol_ratio, "max_ratio_reached": ratio, "warnings": warnings,
           "seconds": time.perf_counter() - t0, "groups": rows}
    print(json.dumps(out, indent=1))
    for w in warnings:
        print("warning: " + w)


if __name__ == "__main__":
    run_with_heartbeat(main)
