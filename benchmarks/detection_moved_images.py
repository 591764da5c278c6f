"""Mislabeled images in a user's own folder: which level of scores finds them, and does re-optimisation agree?
(a script, not a test; needs the Omniglot zips of ../shared/data).

Builds an image folder of ``--characters`` Omniglot characters × 20 drawings (class folders, the seeded class split of
``--dataset image-folder``), moves ``--move`` of the drawings into another character's folder (the moved list is
written beside it), then runs the CLI as a user would: train a Conv4 (group norm, SiLU, stride-2, 5-way ``--k-shot``),
refine the proximal objective (γ = 1), and score the support and the query examples with the fisher Hessian's exact
inverse. Reported per level, over the scored files (``NAME.files.csv``: a file's scores summed over the tasks it
appears in): how many moved files rank among as many most harmful, and the AUC of that ranking. Then the ground
truth of the scores' sign: the proximal objective re-optimised from λ* without every appearance of the moved files,
against a control, beside the predicted change (the sum of those rows' scores).

    python benchmarks/detection_moved_images.py --data-root ../shared/data --out /tmp/moved
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import random
import warnings
import zipfile
from pathlib import Path

from PIL import Image


def build_folder(zip_path: Path, out: Path, characters: int, move: float, seed: int) -> set[str]:
    """The first ``characters`` characters (sorted) as class folders; a seeded ``move`` fraction of the drawings moved to a
    random other class. Returns the moved files' paths relative to the folder (their new place)."""
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        by_class: dict[str, list[str]] = {}
        for n in names:
            _, alphabet, char, _file = n.split("/")
            by_class.setdefault(f"{alphabet}_{char}", []).append(n)
        chosen = sorted(by_class)[:characters]
        rng = random.Random(seed)
        files = [(c, n) for c in chosen for n in by_class[c]]
        moved_idx = set(rng.sample(range(len(files)), round(move * len(files))))
        moved = set()
        for i, (c, n) in enumerate(files):
            target = rng.choice([o for o in chosen if o != c]) if i in moved_idx else c
            (out / target).mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(z.read(n))).save(out / target / Path(n).name)
            if i in moved_idx:
                moved.add(f"{target}/{Path(n).name}")
    return moved


def ranked(path: Path, moved: set[str]) -> dict:
    rows = list(csv.DictReader(open(path, newline="")))
    flags = [r["file"] in moved for r in rows]  # rows are most harmful first
    pos, neg = sum(flags), len(flags) - sum(flags)
    earlier_neg, good = 0, 0
    for f in flags:
        if f:
            good += neg - earlier_neg
        else:
            earlier_neg += 1
    return {"scored_files": len(rows), "moved_scored": pos, "moved_in_top": sum(flags[:pos]), "auc": good / max(1, pos * neg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, help="the shared data folder (holding omniglot/official_layout/images_background.zip)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--characters", type=int, default=60)
    ap.add_argument("--move", type=float, default=0.05)
    ap.add_argument("--k-shot", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from metainfluence.cli import main as cli
    from metainfluence.evaluation.groundtruth import validation_loss
    from metainfluence.influence.results import InfluenceResult
    from metainfluence.meta.refine import refine
    from metainfluence.pipeline import RunContext
    from metainfluence.pipeline.proximal import proximal_of

    out = Path(args.out)
    folder, run = out / "images", out / "run"
    moved = build_folder(Path(args.data_root) / "omniglot/official_layout/images_background.zip", folder, args.characters, args.move, args.seed)
    common = ["--threads", "1", "--no-progress"]
    assert cli(["train", "--dataset", "image-folder", "--data-root", str(folder), "--image-size", "28", "--model-kind", "conv4",
                "--model-width", "16", "--model-norm", "group", "--model-pool", "stride", "--model-conv-activation", "silu",
                "--train-tasks", "200", "--k-shot", str(args.k_shot), "--q-query", "4", "--eval-q-query", "5", "--steps", "300",
                "--out", str(run), *common]) == 0
    assert cli(["refine", "--checkpoint", str(run / "trained"), "--refine-proximal", "1", "--refine-tol", "0", "--refine-tol-ratio", "1e-4",
                "--refine-max-minutes", "4", *common]) == 0
    for level in ("support", "query"):
        assert cli(["influence", "--checkpoint", str(run / "refined"), "--hessian", "fisher", "--solver", "woodbury", "--level", level,
                    "--name", level, "--top", "0", *common]) == 0

    warnings.simplefilter("ignore")
    ctx, ckpt = RunContext.from_checkpoint(run / "refined", splits=("train", "val"))
    pool, names = ctx.pools["train"], ctx.dataset.example_names
    lam, prox = ckpt.lam.double(), proximal_of(ckpt)
    train, val = ctx.tensors["train"].to(dtype=torch.float64), ctx.tensors["val"].to(dtype=torch.float64)
    settings = dataclasses.replace(ctx.settings.refine, tol=0.0, tol_ratio=1e-6, max_iter=300, max_minutes=4)
    control, _ = refine(ctx.problem, lam, train, settings, proximal=prox)
    f_control = validation_loss(ctx.problem, control, val)
    report = {"moved_files": len(moved), "k_shot": args.k_shot}
    for level in ("support", "query"):
        mask = torch.tensor([[names[int(e)] in moved for e in row] for row in getattr(pool, f"{level}_ids").tolist()])
        weights = [torch.ones(len(train), train.n_support, dtype=torch.float64), torch.ones(len(train), train.n_query, dtype=torch.float64)]
        weights[level == "query"][mask] = 0
        removed, rep = refine(ctx.problem, lam, train, settings, example_weights=tuple(weights), proximal=prox)
        report[level] = {**ranked(run / f"{level}.files.csv", moved), "appearances_removed": int(mask.sum()),
                         "predicted_change": float(InfluenceResult.load(run / level).scores[mask].sum()),
                         "reoptimised_change": validation_loss(ctx.problem, removed, val) - f_control, "reoptimisation_converged": rep.converged}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
