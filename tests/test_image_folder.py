"""The generic image-folder dataset on small synthetic PNG folders: both layouts, the seeded class
split, pixels, colour detection, the errors a user meets, the fingerprint, and one CLI run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metainfluence.cli import main
from metainfluence.data import DATASETS, SPLITS, load_dataset, load_image_folder
from metainfluence.data.registry import dataset_options
from metainfluence.errors import DataError, PoolError, SettingsError
from metainfluence.pipeline import DataSettings, load_data
from metainfluence.pipeline import settings as settings_module
from metainfluence.tasks import build_pool

W, H = 12, 10  # native image size (width × height) of every synthetic image


def pattern(c: int, i: int, rgb: bool = False) -> np.ndarray:
    """A class-dependent stripe pattern (class c, image i) as uint8 (H, W) or (H, W, 3)."""
    y, x = np.mgrid[0:H, 0:W]
    grey = (127 + 120 * np.sin((c + 1) * 0.7 * x + 0.3 * y + 0.5 * i)).astype(np.uint8)
    if not rgb:
        return grey
    return np.stack([grey, (grey.astype(np.int64) * (c + 2) % 256).astype(np.uint8), np.full_like(grey, 17 * c % 256)], axis=-1)


def make_folder(root: Path, classes: int = 8, per_class: int = 4, rgb: bool = False, names: list[str] | None = None) -> list[Path]:
    """``root/<class>/<i>.png``; returns the image files in example-id order (sorted classes, sorted files)."""
    files = []
    for c, name in enumerate(names or [f"class{c:02d}" for c in range(classes)]):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            f = d / f"img{i}.png"
            Image.fromarray(pattern(c, i, rgb)).save(f)
            files.append(f)
    return sorted(files, key=lambda p: (p.parent.name, p.name))


def make_split_folders(root: Path) -> None:
    """``root/{train,val,test}/<class>/`` with 4 / 2 / 2 classes."""
    make_folder(root / "train", names=["a", "b", "c", "d"])
    make_folder(root / "val", names=["e", "f"])
    make_folder(root / "test", names=["g", "h"])


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[Path]]:
    root = tmp_path / "my-images"
    return root, make_folder(root)


def _assignment(ds) -> dict[str, list[str]]:
    return {s: [ds.class_names[c] for c in ds.classes(s)] for s in SPLITS}


def test_class_folders_get_a_seeded_class_disjoint_split(folder):
    root, _files = folder
    ds = load_image_folder(root, image_size=8)
    assert ds.name == "image-folder" and ds.split_kind == "class" and ds.image_shape == (1, 8, 8)
    assert ds.num_classes == 8 and ds.num_examples == 32
    assert ds.class_names == [f"class{c:02d}" for c in range(8)]
    split = _assignment(ds)
    assert [len(split[s]) for s in SPLITS] == [4, 2, 2]  # about 60/20/20
    assert sorted(sum(split.values(), [])) == ds.class_names  # disjoint and complete
    assert ds.split_description == "seeded class shuffle (seed 0): 4/2/2 classes (train/val/test) from class folders"
    again = load_image_folder(root, image_size=8)
    assert _assignment(again) == split and again.fingerprint == ds.fingerprint
    others = [load_image_folder(root, image_size=8, split_seed=s) for s in (1, 2, 3)]
    assert any(_assignment(o) != split for o in others)
    assert all(o.fingerprint != ds.fingerprint for o in others if _assignment(o) != split)
    custom = load_image_folder(root, image_size=8, split_sizes=(5, 2, 1))
    assert [len(custom.classes(s)) for s in SPLITS] == [5, 2, 1]
    with pytest.raises(DataError, match="do not fit the 8 class folders"):
        load_image_folder(root, split_sizes=(6, 2, 2))
    # three classes are enough: one per split
    small = root.parent / "three"
    make_folder(small, classes=3, per_class=2)
    assert [len(load_image_folder(small).classes(s)) for s in SPLITS] == [1, 1, 1]


def test_loaded_pixels_are_the_resized_files(folder):
    root, files = folder
    ds = load_image_folder(root, image_size=8, resample="bicubic")
    ids = np.array([0, 5, 31, 17])
    got = ds.load(ids).to(torch.float64).numpy()
    assert got.shape == (4, 1, 8, 8)
    for j, i in enumerate(ids):
        with Image.open(files[i]) as im:
            want = np.asarray(im.convert("L").resize((8, 8), Image.BICUBIC), dtype=np.float64) / 255.0
        np.testing.assert_allclose(got[j, 0], want, rtol=0, atol=1e-7)
        assert int(ds.targets[i]) == int(i) // 4
    # at the native size nothing is resampled: the file's own pixels (the whole image squeezed, no crop)
    native = load_image_folder(root, image_size=W)
    with Image.open(files[9]) as im:
        want = np.asarray(im.resize((W, W), Image.BILINEAR), dtype=np.float64) / 255.0
    np.testing.assert_allclose(native.load([9]).double().numpy()[0, 0], want, rtol=0, atol=1e-7)


def test_colour_is_detected_from_the_headers(folder):
    root, files = folder
    assert load_image_folder(root, image_size=6).image_shape == (1, 6, 6)
    forced = load_image_folder(root, image_size=6, color="rgb")
    x = forced.load([3]).double()
    assert x.shape == (1, 3, 6, 6) and bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())
    # one colour image makes the whole dataset RGB
    Image.fromarray(pattern(2, 0, rgb=True)).save(files[10])
    with pytest.warns(UserWarning, match="1 of the 32 images are colour"):
        ds = load_image_folder(root, image_size=6)
    assert ds.image_shape == (3, 6, 6) and ds.fingerprint != forced.fingerprint
    with Image.open(files[10]) as im:
        want = np.asarray(im.resize((6, 6), Image.BILINEAR), dtype=np.float64).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(ds.load([10]).double().numpy()[0], want, rtol=0, atol=1e-7)
    assert load_image_folder(root, image_size=6, color="grey").image_shape == (1, 6, 6)
    with pytest.raises(DataError, match="unknown color 'sepia'.*auto.*grey or rgb"):
        load_image_folder(root, color="sepia")


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "deep"
    make_folder(root, classes=3, per_class=1)
    wide = (np.arange(W * H, dtype=np.uint16).reshape(H, W) * 550).astype(np.uint16)
    Image.fromarray(wide).save(root / "class00" / "img0.png")  # a 16-bit PNG (mode I;16)
    ds = load_image_folder(root, image_size=W)
    assert ds.image_shape == (1, W, W)
    with Image.open(root / "class00" / "img0.png") as im:
        assert im.mode.startswith("I")
    x = ds.load([0]).double().numpy()[0, 0]
    assert 0.9 < x.max() <= 1.0 and len(np.unique(x)) > 50  # a range of greys, not a white image


def test_split_folders_fix_the_split(tmp_path):
    root = tmp_path / "split"
    make_split_folders(root)
    ds = load_image_folder(root, image_size=8)
    assert ds.class_names == list("abcdefgh")
    assert _assignment(ds) == {"train": list("abcd"), "val": list("ef"), "test": list("gh")}
    assert ds.split_description == "fixed by the train/, val/, test/ folders: 4/2/2 classes (train/val/test)"
    with pytest.raises(DataError, match="fixes its splits .*split_seed 2.*drop --split-seed") as e:
        load_image_folder(root, split_seed=2)
    assert str(root) in str(e.value)
    with pytest.raises(DataError, match="fixes its splits"):
        load_image_folder(root, split_sizes=(2, 1, 1))
    # through the pipeline: the seed reaches the loader, which refuses it
    with pytest.raises(DataError, match="drop --split-seed"):
        load_data(DataSettings(dataset="image-folder", data_root=str(root), split_seed=1))
    # a class in two split folders
    make_folder(root / "test", names=["a"])
    with pytest.raises(DataError, match="class 'a' has folders in both .*class-disjoint") as e:
        load_image_folder(root)
    assert str(root / "train" / "a") in str(e.value) and str(root / "test" / "a") in str(e.value)


def test_incomplete_split_folders_are_refused(tmp_path):
    root = tmp_path / "partial"
    make_folder(root / "train", names=["a", "b", "c"])
    make_folder(root / "test", names=["d"])
    with pytest.raises(DataError, match=r"split folder\(s\) train/, test/ but no val/"):
        load_image_folder(root)
    (root / "val").mkdir()
    with pytest.raises(DataError, match=f"split folder {root / 'val'} holds no class folders"):
        load_image_folder(root)


def test_other_files_are_ignored(folder):
    root, _ = folder
    before = load_image_folder(root, image_size=8)
    (root / "README.md").write_text("my images")
    (root / "class03" / "notes.txt").write_text("x")
    (root / "class03" / ".DS_Store").write_bytes(b"\0\1")
    (root / "class03" / ".hidden.png").write_bytes(b"not an image")
    (root / ".git").mkdir()
    Image.fromarray(pattern(1, 1)).save(root / "class04" / "UPPER.PNG")  # any case of extension
    ds = load_image_folder(root, image_size=8)
    assert ds.num_classes == 8 and ds.num_examples == 33 and ds.fingerprint != before.fingerprint


def test_user_errors_name_the_file_or_folder(tmp_path, folder):
    root, files = folder
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'nope'} does not exist"):
        load_image_folder(tmp_path / "nope")
    two = tmp_path / "two"
    make_folder(two, classes=2)
    with pytest.raises(DataError, match=f"image folder {two} holds 2 class folders; .* at least 3 class folders"):
        load_image_folder(two)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(pattern(0, 0)).save(loose / "a.png")
    with pytest.raises(DataError, match="0 class folders and 1 loose images"):
        load_image_folder(loose)
    (root / "class99").mkdir()
    with pytest.raises(DataError, match=f"class folder {root / 'class99'} holds no images .*add images or remove the folder"):
        load_image_folder(root)
    (root / "class99" / "deeper").mkdir()
    with pytest.raises(DataError, match=f"class folder {root / 'class99'} holds no images, only subfolders \\(deeper/\\)"):
        load_image_folder(root)
    (root / "class99" / "deeper").rmdir()
    (root / "class99").rmdir()
    for bad in (3, True, 8.0):
        with pytest.raises(DataError, match="image_size=.* is invalid"):
            load_image_folder(root, image_size=bad)
    with pytest.raises(DataError, match="unknown resample filter 'box'"):
        load_image_folder(root, resample="box")
    # a file that is no image: named when the headers are read (colour detection) ...
    files[6].write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=f"image {files[6]} cannot be read as an image .*replace or remove it"):
        load_image_folder(root)
    # ... or when its pixels are loaded
    ds = load_image_folder(root, image_size=8, color="grey")
    ds.load([5, 7])
    with pytest.raises(DataError, match=f"image {files[6]} cannot be decoded .*replace or remove it"):
        ds.load([5, 6])
    # a truncated file has a valid header: found at load time
    data = files[2].read_bytes()
    files[6].write_bytes(data[: len(data) // 2])
    ds = load_image_folder(root, image_size=8)
    with pytest.raises(DataError, match=f"image {files[6]} cannot be decoded"):
        ds.load([6])
    files[6].unlink()
    with pytest.raises(DataError, match=f"image {files[6]} has gone since the folder was read"):
        ds.load([6])


def test_fingerprint_follows_the_folder(folder):
    root, _ = folder
    ds = load_image_folder(root, image_size=8)
    assert load_image_folder(root, image_size=8).fingerprint == ds.fingerprint
    assert load_image_folder(root, image_size=10).fingerprint != ds.fingerprint
    assert load_image_folder(root, image_size=8, resample="lanczos").fingerprint != ds.fingerprint
    Image.fromarray(pattern(0, 9)).save(root / "class00" / "extra.png")
    grown = load_image_folder(root, image_size=8)
    assert grown.num_examples == 33 and grown.fingerprint != ds.fingerprint
    (root / "class00" / "extra.png").unlink()
    assert load_image_folder(root, image_size=8).fingerprint == ds.fingerprint


def test_registry_aliases_and_settings(folder, monkeypatch):
    root, _ = folder
    assert "image-folder" in DATASETS
    assert {"image_size", "split_seed", "split_sizes", "color", "resample", "split_by"} == set(dataset_options("image-folder"))
    want = load_image_folder(root, image_size=8, split_seed=3).fingerprint
    for alias in ("image-folder", "folder", "imagefolder", "image_folder", "Image_Folder"):
        assert load_dataset(alias, root=root, image_size=8, split_seed=3).fingerprint == want
    # --image-size and --split-seed reach the loader unchanged
    ds = load_data(DataSettings(dataset="image-folder", data_root=str(root), image_size=8, split_seed=3))
    assert ds.fingerprint == want and ds.image_shape == (1, 8, 8)
    assert load_data(DataSettings(dataset="image-folder", data_root=str(root))).image_shape == (1, 84, 84)
    # the memory check counts RGB values of --image-size (at most 3 channels)
    monkeypatch.setattr(settings_module, "_memory_bytes", lambda: 2**20)
    with pytest.raises(SettingsError, match="of 768 values"):
        DataSettings(dataset="image-folder", image_size=16, train_tasks=1000).check_pool_sizes()
    with pytest.raises(SettingsError, match="of 256 values"):  # --color grey: one channel
        DataSettings(dataset="image-folder", image_size=16, train_tasks=1000, color="grey").check_pool_sizes()
    with pytest.raises(SettingsError, match=f"of {3 * 84 * 84} values"):
        DataSettings(dataset="image-folder", train_tasks=1000).check_pool_sizes()


def test_train_then_evaluate_an_image_folder_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "pets"
    make_folder(data, classes=15, per_class=4, rgb=True)  # seeded 9/3/3 classes
    out = tmp_path / "run"
    args = ["train", "--dataset", "image-folder", "--data-root", str(data), "--image-size", "16", "--out", str(out),
            "--n-way", "3", "--k-shot", "1", "--q-query", "2", "--train-tasks", "6", "--val-tasks", "3", "--test-tasks", "3",
            "--model-kind", "conv4", "--model-width", "4", "--steps", "3", "--meta-batch", "2", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "'image-folder', 15 classes, 60 examples, image (3, 16, 16)" in printed
    assert "train=9, val=3, test=3 classes" in printed and "test: accuracy" in printed
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "trained"), "--json", str(result), "--threads", "1", "--no-progress"]) == 0
    assert len(json.loads(result.read_text())["per_task_accuracy"]) == 3
    capsys.readouterr()  # the evaluation's own lines (and warnings) are not the point here
    # a too-small folder is one line of command-line advice
    two = tmp_path / "two"
    make_folder(two, classes=2)
    assert main([*args[:4], str(two), *args[5:7], "--out", str(tmp_path / "o2"), *args[9:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"image folder {two} holds 2 class folders" in err[0]
    # every image truncated (valid headers): found when the pools' pixels are decoded, before their files are written
    for f in sorted(data.rglob("*.png")):
        f.write_bytes(f.read_bytes()[:60])
    assert main([*args[:8], str(tmp_path / "o3"), *args[9:]]) == 2
    assert "cannot be decoded" in capsys.readouterr().err and not (tmp_path / "o3" / "pools").exists()


def test_a_data_root_of_other_datasets_is_not_read_as_classes(tmp_path):
    from metainfluence.data import load_image_folder

    for name in ("mnist", "omniglot", "orl-faces"):
        (tmp_path / name / "raw").mkdir(parents=True)
        (tmp_path / name / "files.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"data folder holding other datasets \(mnist/, omniglot/, orl-faces/\)"):
        load_image_folder(tmp_path)


def test_an_alias_sizes_the_pool_check_like_its_dataset():
    from metainfluence.pipeline.settings import DataSettings

    # 3 × 84 × 84 values per example under either name: the same pool is refused by both
    for name in ("image-folder", "folder"):
        with pytest.raises(SettingsError, match="GiB of inputs"):
            DataSettings(dataset=name, train_tasks=10**6).check_pool_sizes()


def test_split_by_example_puts_every_class_in_every_split(folder, tmp_path):
    root, files = folder  # 8 classes × 4 images
    ds = load_image_folder(root, image_size=8, split_by="example", split_sizes=(0.5, 0.25, 0.25))
    assert ds.split_kind == "example"
    seen = {s: set() for s in SPLITS}
    for s in SPLITS:
        assert len(ds.classes(s)) == 8  # every class in every split
        for c in ds.classes(s):
            ids = ds.examples_of(c, s).tolist()
            assert len(ids) == {"train": 2, "val": 1, "test": 1}[s]
            seen[s] |= set(ids)
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert ds.fingerprint != load_image_folder(root, image_size=8).fingerprint
    again = load_image_folder(root, image_size=8, split_by="example", split_sizes=(0.5, 0.25, 0.25), split_seed=1)
    assert any(again.examples_of(c, "val").tolist() != ds.examples_of(c, "val").tolist() for c in range(8))
    make_split_folders(tmp_path / "fixed")
    with pytest.raises(DataError, match="split_by example does not apply"):
        load_image_folder(tmp_path / "fixed", split_by="example")
    with pytest.raises(DataError, match="unknown split_by"):
        load_image_folder(root, split_by="classes")


def test_too_few_classes_for_n_way_points_at_split_by_example(tmp_path, capsys):
    root = tmp_path / "few-classes"
    make_folder(root, classes=8, per_class=10)  # 4/2/2 classes by class, so 3-way validation tasks cannot be drawn
    base = ["train", "--dataset", "image-folder", "--data-root", str(root), "--image-size", "16", "--n-way", "3", "--k-shot", "1",
            "--q-query", "1", "--train-tasks", "4", "--val-tasks", "2", "--test-tasks", "2", "--model-kind", "conv4", "--model-width", "4",
            "--steps", "2", "--meta-batch", "2", "--threads", "1", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "--split-by example" in capsys.readouterr().err
    assert main([*base, "--split-by", "example", "--out", str(tmp_path / "b")]) == 0
    assert "test: accuracy" in capsys.readouterr().out
    assert main(["train", "--dataset", "digits", "--split-by", "example", "--out", str(tmp_path / "c"), "--steps", "1"]) == 2
    assert "applies to image-folder only" in capsys.readouterr().err


def test_a_data_root_one_level_above_the_dataset_names_the_dataset_folder(tmp_path):
    data = tmp_path / "data"
    make_folder(data / "faces", classes=4, names=["person_01", "person_02", "person_03", "person_04"])
    # one dataset folder: 1 would-be class folder, whose subfolders are the classes
    with pytest.raises(DataError, match=f"{data} looks like a folder of datasets .*person_01/.*pass --data-root {data / 'faces'}$") as e:
        load_image_folder(data)
    assert "move the images up" not in str(e.value) and load_image_folder(data / "faces").num_classes == 4  # the advice works
    # several dataset folders (one of them in split folders): the first is named, the others listed
    make_folder(data / "pets", classes=3)
    make_split_folders(data / "cars")
    with pytest.raises(DataError, match=f"\\(train/, val/, test/\\) hold them; pass --data-root {data / 'cars'} \\(or .*: faces/, pets/\\)"):
        load_image_folder(data)
    # a class folder among real ones whose images lie in subfolders: both readings are offered
    make_folder(mixed := tmp_path / "mixed", classes=3)
    make_folder(mixed / "zebra", classes=2, names=["day", "night"])
    with pytest.raises(DataError, match=f"class folder {mixed / 'zebra'} holds no images, only subfolders that do \\(day/, night/\\)") as e:
        load_image_folder(mixed)
    assert f"pass --data-root {mixed / 'zebra'}" in str(e.value) and f"move their images up into {mixed / 'zebra'}" in str(e.value)
    # split folders: a class folder's subfolders are not classes of the split
    make_split_folders(split := tmp_path / "split")
    for f in (split / "val" / "e").glob("*.png"):
        f.rename(f.with_suffix(".txt"))  # its images only in subfolders, after the next line
    make_folder(split / "val" / "e", classes=2, names=["x", "y"])
    with pytest.raises(DataError, match=f"make each of them a class folder directly in {split / 'val'}"):
        load_image_folder(split)


def test_a_few_colour_images_in_a_grey_folder_are_warned_about(folder, tmp_path, capsys):
    root, files = folder  # 32 grey images
    [Image.fromarray(pattern(1, 0, rgb=True)).save(f) for f in (files[3], files[20])]
    with pytest.warns(UserWarning, match=r"2 of the 32 images are colour \(the first: .*class00/img3.png\) and the other 30 grey, "
                      r"so the dataset is RGB .*--color grey") as rec:
        ds = load_image_folder(root, image_size=6)
    assert ds.image_shape == (3, 6, 6) and len(rec) == 1 and len(str(rec[0].message).splitlines()) == 1
    with warnings.catch_warnings():  # forced either way, all grey, or mostly colour: nothing to say
        warnings.simplefilter("error")
        assert load_image_folder(root, image_size=6, color="grey").image_shape == (1, 6, 6)
        assert load_image_folder(root, image_size=6, color="rgb").image_shape == (3, 6, 6)
        rgb_files = make_folder(rgb := tmp_path / "rgb", classes=3, rgb=True)
        Image.fromarray(pattern(0, 0)).save(rgb_files[0])  # one grey photo among colour ones, as in Mini-ImageNet
        assert load_image_folder(rgb, image_size=6).image_shape == (3, 6, 6)
        make_folder(grey := tmp_path / "grey", classes=3)
        assert load_image_folder(grey, image_size=6).image_shape == (1, 6, 6)
        # --color reaches the loader through the settings
        assert load_data(DataSettings(dataset="image-folder", data_root=str(root), image_size=6, color="grey")).image_shape == (1, 6, 6)
    assert load_data(DataSettings(dataset="image-folder", data_root=str(grey), image_size=6, color="rgb")).image_shape == (3, 6, 6)
    big = make_folder(tmp_path / "big", classes=3, per_class=200)  # more than a sample of the headers
    [Image.fromarray(pattern(1, 0, rgb=True)).save(f) for f in (big[7], big[450])]
    with pytest.warns(UserWarning, match=f"2 of the 600 images are colour \\(the first: {big[7]}\\) and the other 598 grey"):
        assert load_image_folder(tmp_path / "big", image_size=6).image_shape == (3, 6, 6)
    with pytest.raises(SettingsError, match="color must be auto, grey or rgb .*got 'sepia'"):
        DataSettings(dataset="image-folder", color="sepia").validate()
    with pytest.raises(SettingsError, match="--color applies to image-folder only"):
        load_data(DataSettings(dataset="digits", color="grey"))
    assert main(["train", "--dataset", "digits", "--color", "grey", "--out", str(tmp_path / "c"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--color applies to image-folder only" in err[0]


def test_every_unreadable_file_of_a_pass_is_named_at_once(folder):
    root, files = folder
    good = files[0].read_bytes()
    for f in (truncated := files[1:8]):
        f.write_bytes(good[: len(good) // 2])  # a valid header: found when the pixels are decoded
    ds = load_image_folder(root, image_size=8)
    with pytest.raises(DataError, match="7 images cannot be decoded: ") as e:
        ds.load(np.arange(32))
    msg = str(e.value)
    assert all(str(f) in msg for f in truncated[:5]) and str(truncated[5]) not in msg
    assert "and 2 more" in msg and msg.endswith("replace or remove them") and len(msg.splitlines()) == 1
    # a load that meets one of them checks the whole folder: every bad file in one message, not one per run
    with pytest.raises(DataError, match="7 images cannot be decoded: "):
        ds.load(np.array([0, 1]))
    # the header pass of color='auto' names every non-image too
    for f in (files[10], files[30]):
        f.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"2 images cannot be read as images: {files[10]}, {files[30]} .*replace or remove them"):
        load_image_folder(root)
    ds = load_image_folder(root, image_size=8, color="grey")
    files[10].unlink(), files[11].unlink()
    with pytest.raises(DataError, match=r"2 images \(.*\) have gone since the folder was read \(1 more cannot be decoded\); put them back"):
        ds.load([9, 10, 11, 30])


def test_too_few_classes_say_how_many_n_way_needs(folder, tmp_path):
    root, _ = folder  # 4/2/2 classes
    with pytest.raises(PoolError, match=r"n_way=3 is larger than the 2 classes in the 'val' split of image-folder; 3-way tasks need 3 "
                       r"classes in each split \(.*about 15 class folders: 5·N\); lower --n-way, add class folders, or --split-by example"):
        build_pool(load_image_folder(root, image_size=8), "val", 3, 1, 1, 4)
    make_split_folders(fixed := tmp_path / "fixed")
    with pytest.raises(PoolError, match=r"\(3 class folders in each of train/, val/, test/\); lower --n-way, or add class folders") as e:
        build_pool(load_image_folder(fixed, image_size=8), "test", 3, 1, 1, 4)
    assert "--split-by" not in str(e.value)  # split folders refuse it


def test_a_split_of_exactly_n_way_classes_is_warned_about(tmp_path):
    make_folder(root := tmp_path / "eight", per_class=10)  # 4/2/2 classes
    ds = load_image_folder(root, image_size=8)
    with pytest.warns(UserWarning, match=r"the 'test' split of image-folder has exactly 2 classes, so all 10 tasks use the same 2 "
                      r"classes .*understate the spread over classes — more class folders, or --split-by example"):
        pool = build_pool(ds, "test", 2, 1, 1, 10)
    assert len({tuple(sorted(c)) for c in pool.classes.tolist()}) == 1  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_pool(ds, "test", 2, 1, 1, 1)  # one task: no interval over tasks
        build_pool(ds, "train", 4, 1, 1, 10)  # training tasks are not an estimate
        pool = build_pool(ds, "train", 2, 1, 1, 10)  # more classes than N: the class sets vary
        assert len({tuple(sorted(c)) for c in pool.classes.tolist()}) > 1
        # every class in every split: the tasks hold all the dataset's classes, as intended
        build_pool(load_image_folder(root, image_size=8, split_by="example"), "test", 8, 1, 1, 3)


def test_a_class_with_too_few_images_for_the_tasks_is_named(tmp_path):
    from metainfluence.data import load_image_folder
    from metainfluence.errors import PoolError
    from metainfluence.tasks import build_pool

    root = tmp_path / "uneven"
    files = make_folder(root, classes=12, per_class=4)
    for f in files[9:12]:  # class02 keeps one image
        f.unlink()
    ds = load_image_folder(root, image_size=8)
    split = next(s for s in SPLITS if ds.class_names.index("class02") in ds.classes(s))
    with pytest.raises(PoolError, match=r"\(1 class too small: class02\)"):
        build_pool(ds, split, 2, 1, 1, 2, seed=0)


def test_grey_palette_images_count_as_grey(tmp_path):
    from metainfluence.data import load_image_folder

    root = tmp_path / "palette"
    files = make_folder(root, classes=8, per_class=4)
    for f in files:  # a palette of greys (as some tools save grey PNGs): still one channel, the same pixels
        Image.open(f).convert("P").save(f)
    assert Image.open(files[0]).mode == "P"
    ds = load_image_folder(root, image_size=8)
    assert ds.image_shape == (1, 8, 8)
    as_l = tmp_path / "as-l"
    for f in files:
        (as_l / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").save(as_l / f.parent.name / f.name)
    torch.testing.assert_close(ds.load(np.arange(8)), load_image_folder(as_l, image_size=8).load(np.arange(8)), rtol=0, atol=0)
