"""Scores traced back to the data (pipeline/describe.py): every scored item's classes, file and labels."""

from __future__ import annotations

import csv

import numpy as np
import torch
from PIL import Image

from metainfluence.data import load_image_folder
from metainfluence.influence.results import InfluenceResult
from metainfluence.pipeline.describe import (describe_row, file_relabelled, item_rows, join_names, read_table, score_of, split_names,
                                             write_item_table)
from metainfluence.tasks import build_pool, corrupt_labels


def _folder(root, classes=6, per_class=5, names=None):
    for c in range(classes):
        d = root / (names[c] if names else f"kind{c}")
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((6, 6), 10 * c + i, dtype=np.uint8)).save(d / f"{i}.png")
    return load_image_folder(root, image_size=6, split_by="example", split_sizes=(0.6, 0.2, 0.2))


def _result(level, scores):
    return InfluenceResult(level=level, method="task-if", scores=scores, task_ids=torch.arange(scores.shape[0]), measurement=0.0,
                           settings={}, diagnostics={})


def test_task_rows_name_the_classes_and_the_recorded_corruption(tmp_path):
    ds = _folder(tmp_path / "imgs")
    pool = corrupt_labels(build_pool(ds, "train", 3, 1, 1, 10, seed=0), 0.3, 1.0, seed=0)
    scores = torch.linspace(-1, 1, 10, dtype=torch.float64).flip(0)  # task 9 most harmful
    rows = item_rows(_result("task", scores), pool, ds)
    assert [r["task_id"] for r in rows] == list(range(9, -1, -1)) and [r["rank_harmful_first"] for r in rows] == list(range(1, 11))
    for r in rows:
        t = r["task_id"]
        assert r["classes"].split(";") == [ds.class_names[c] for c in pool.classes[t].tolist()]
        assert r["corrupted"] == ("yes" if bool(pool.corrupted_tasks[t]) else "no")
    stem = tmp_path / "scores"
    write_item_table(stem, rows)
    with open(f"{stem}.csv", newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [int(r["task_id"]) for r in back] == list(range(9, -1, -1))
    # the score column says what its number is: the predicted change of the validation loss if removed (> 0: helps)
    assert float(back[0]["val_loss_change_if_removed"]) == float(scores[9]) and "kind" in describe_row(back[0])
    assert "score" not in back[0] and score_of(back[0]) == back[0]["val_loss_change_if_removed"]
    write_item_table(stem, rows, method="loss")  # a baseline predicts no change: its column says what it is instead
    assert next(csv.reader(open(f"{stem}.csv", newline="")))[4] == "minus_query_loss"


def test_class_names_holding_the_separator_split_back_as_they_were(tmp_path):
    names = ["a;b", 'say "hi"', "plain", "x;y;z", "e", "f"]
    ds = _folder(tmp_path / "imgs", names=names)
    pool = build_pool(ds, "train", 3, 1, 1, 10, seed=0)
    rows = item_rows(_result("task", torch.linspace(-1, 1, 10, dtype=torch.float64)), pool, ds)
    for r in rows:
        assert next(csv.reader([r["classes"]], delimiter=";")) == [ds.class_names[c] for c in pool.classes[r["task_id"]].tolist()]
    assert any(";" in n for r in rows for n in next(csv.reader([r["classes"]], delimiter=";")))  # the case was drawn
    # in words: the same names, each once, none cut at its ';' or shown with CSV quotes
    for r in rows:
        words = describe_row(r)
        want = [ds.class_names[c] for c in pool.classes[r["task_id"]].tolist()]
        assert words == "classes " + ", ".join(want) and split_names(r["classes"]) == want
    # a file row: a label list holding a ';' name is that one label, the file's own (no false "trained as")
    row = {"labels": join_names(["a;b"]), "true_label": "a;b"}
    assert file_relabelled(row) == [] and file_relabelled({"labels": join_names(["a;b", "e"]), "true_label": "e"}) == ["a;b"]


def test_example_rows_name_the_file_and_the_label_trained_on(tmp_path):
    ds = _folder(tmp_path / "imgs")
    pool = corrupt_labels(build_pool(ds, "train", 3, 2, 1, 8, seed=1), 0.5, 1.0, where="support", seed=1)
    scores = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = item_rows(_result("support", scores), pool, ds)
    assert len(rows) == 48 and rows[0]["score"] == f"{float(scores.min()):.6e}"
    flips = 0
    for r in rows:
        t, j = r["task_id"], r["example"]
        example = int(pool.support_ids[t, j])
        assert r["file"] == ds.example_names[example] and r["file"].startswith(ds.class_names[int(ds.targets[example])] + "/")
        classes = pool.classes[t].tolist()
        assert r["label"] == ds.class_names[classes[int(pool.support_y[t, j])]]
        assert r["true_label"] == ds.class_names[int(ds.targets[example])]  # the true label is the file's own class
        assert (r["label"] != r["true_label"]) == (r["corrupted"] == "yes")
        flips += r["corrupted"] == "yes"
        assert ("trained as" in describe_row(r)) == (r["corrupted"] == "yes")
    assert flips > 0


def test_files_sum_their_appearances_and_coverage_counts_the_unscored(tmp_path):
    from metainfluence.pipeline.describe import coverage, file_rows

    ds = _folder(tmp_path / "imgs")  # 6 classes × 5 images, every class in every split (3 / 1 / 1 images each)
    pool = build_pool(ds, "train", 3, 1, 1, 12, seed=2)
    scores = torch.randn(12, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = item_rows(_result("query", scores), pool, ds)
    files = file_rows(rows)
    ids = pool.query_ids
    for f in files:
        where = [(t, j) for t in range(12) for j in range(3) if ds.example_names[int(ids[t, j])] == f["file"]]
        assert f["appearances"] == len(where)
        assert abs(float(f["summed_score"]) - sum(float(scores[t, j]) for t, j in where)) < 1e-5 * max(1.0, abs(float(f["summed_score"])))
    assert [float(f["summed_score"]) for f in files] == sorted(float(f["summed_score"]) for f in files)
    assert sum(f["appearances"] for f in files) == 36 and len(files) == len(set(ids.reshape(-1).tolist()))
    text = coverage(pool, ds, "query")
    assert text.startswith(f"{len(files)} of the dataset's 30 examples are scored") and "12 belong to the validation/test splits" in text
    write_item_table(tmp_path / "s", rows, method="task-if")
    back = read_table(tmp_path / "s.files.csv")
    assert [r["file"] for r in back] == [f["file"] for f in files]
    assert [float(r["summed_val_loss_change_if_removed"]) for r in back] == [float(f["summed_score"]) for f in files]
    write_item_table(tmp_path / "t", item_rows(_result("task", scores[:, 0]), pool, ds))
    assert not (tmp_path / "t.files.csv").exists()  # task scores have no files


def test_an_edit_whose_newton_step_was_backtracked_says_how_much_it_kept(capsys):
    from types import SimpleNamespace

    from metainfluence.console import print_edit

    removal = SimpleNamespace(describe=lambda: "2 tasks")
    acc = SimpleNamespace(summary=lambda: "90.0%")
    diag = {"seconds": 1.0, "solver_residual": 1e-7, "solver_converged": True, "step_length": 0.015625}
    print_edit(removal, diag, acc, acc, "out/edited")
    assert "backtracking on the reduced objective kept 0.0156 of the Newton step" in capsys.readouterr().out
    print_edit(removal, {**diag, "step_length": 1.0}, acc, acc, "out/edited")
    assert "backtracking" not in capsys.readouterr().out
