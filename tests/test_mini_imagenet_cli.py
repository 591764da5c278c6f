"""Mini-ImageNet through the command line: a tiny synthetic folder in the Ravi-Larochelle layout is
trained on and evaluated with `metainfluence train` / `evaluate`, and the data errors a user meets
there are one line of command-line advice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metainfluence.cli import main
from metainfluence.errors import SettingsError
from metainfluence.pipeline import DataSettings, load_data

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "removal_miniimagenet.toml"
SPLIT_CLASSES = {"train": 7, "val": 4, "test": 4}  # class-disjoint, as the real 64/16/20
PER_CLASS = 6

# 3-way 1-shot tasks of 16×16 images, a Conv4 of width 4, a few steps: a few seconds on one thread
TINY = [
    "--dataset", "mini-imagenet", "--image-size", "16", "--n-way", "3", "--k-shot", "1", "--q-query", "2",
    "--train-tasks", "6", "--val-tasks", "3", "--test-tasks", "3", "--model-kind", "conv4", "--model-width", "4",
    "--steps", "3", "--meta-batch", "2", "--threads", "1", "--no-progress",
]


def make_fake_mini_imagenet(root: Path) -> dict[str, list[tuple[str, str]]]:
    """``root/images/*`` (noisy RGB images, one base colour per class; JPEG and PNG) and
    ``root/{train,val,test}.csv`` with 15 WordNet-like classes n00000001..n00000015."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows: dict[str, list[tuple[str, str]]] = {}
    c = 0
    for split, n_classes in SPLIT_CLASSES.items():
        rows[split] = []
        for _ in range(n_classes):
            c += 1
            wnid = f"n{c:08d}"
            base = rng.integers(0, 256, size=3)
            for i in range(PER_CLASS):
                fname = f"{wnid}{i + 1:08d}.{'png' if i % 2 else 'jpg'}"
                pixels = np.clip(base + rng.normal(0, 30, size=(20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(root / "images" / fname)
                rows[split].append((fname, wnid))
        with open(root / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["filename", "label"])
            w.writerows(rows[split])
    return rows


@pytest.fixture
def mini(tmp_path) -> Path:
    root = tmp_path / "mini-imagenet"
    make_fake_mini_imagenet(root)
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_train_then_evaluate_mini_imagenet_from_the_command_line(mini, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(mini), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "mini-imagenet" in printed and "train=7, val=4, test=4 classes" in printed
    assert (out / "trained.safetensors").is_file() and (out / "trained.json").is_file()
    # the checkpoint rebuilds its run (dataset, pools, model) for evaluate
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "trained"), "--json", str(result), "--threads", "1", "--no-progress"]) == 0
    assert "trained λ" in capsys.readouterr().out
    assert len(json.loads(result.read_text())["per_task_accuracy"]) == 3


def test_train_with_the_mini_imagenet_config(mini, tmp_path):
    # configs/removal_miniimagenet.toml (42×42, Conv4 with group norm), shrunk by flags
    out = tmp_path / "cfg"
    args = ["train", "--config", str(CONFIG), "--data-root", str(mini), "--out", str(out), "--n-way", "3", "--train-tasks", "4",
            "--val-tasks", "2", "--test-tasks", "2", "--steps", "1", "--model-width", "4", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    assert (out / "trained.safetensors").is_file()


def test_split_seed_is_refused_for_the_fixed_csv_split(mini, tmp_path, capsys):
    assert main(["train", "--data-root", str(mini), "--out", str(tmp_path / "o"), *TINY, "--split-seed", "3"]) == 2
    line = _error_line(capsys)
    assert "fixed train/val/test splits" in line and "train.csv, val.csv and test.csv" in line and "drop --split-seed" in line
    # the loader itself is only ever given options it takes
    ds = load_data(DataSettings(dataset="mini-imagenet", data_root=str(mini), image_size=16))
    assert ds.image_shape == (3, 16, 16) and ds.num_classes == 15
    with pytest.raises(SettingsError, match="drop --split-seed"):
        load_data(DataSettings(dataset="mini-imagenet", data_root=str(mini), split_seed=1))


def test_image_size_is_refused_for_a_dataset_that_is_not_resized(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--image-size", "16", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "'digits' keeps its native image size" in line and "drop --image-size" in line


def test_missing_split_file_and_images_are_one_line_of_cli_advice(mini, tmp_path, capsys):
    (mini / "val.csv").unlink()
    assert main(["train", "--data-root", str(mini), "--out", str(tmp_path / "o"), *TINY]) == 2
    line = _error_line(capsys)
    assert f"{mini}: no val.csv" in line and f"together in {mini}" in line and "pass csv_dir" not in line

    rows = make_fake_mini_imagenet(tmp_path / "m2")
    (tmp_path / "m2" / "images" / rows["val"][3][0]).unlink()
    assert main(["train", "--data-root", str(tmp_path / "m2"), "--out", str(tmp_path / "o"), *TINY]) == 2
    line = _error_line(capsys)
    assert f"first: {rows['val'][3][0]}, listed in {tmp_path / 'm2' / 'val.csv'} line 5" in line
    assert "remove their rows from the csv files" in line and "check_images" not in line
