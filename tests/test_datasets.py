"""Dataset loaders: fake files in the official layouts, and the real data when METAINFLUENCE_DATA is set."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metainfluence.data.mnist as mnist_mod
import metainfluence.data.omniglot as omni_mod
import metainfluence.data.omniglot_download as omni_dl
from fixtures import (
    make_idx,
    make_mini_imagenet,
    make_omniglot,
    make_zip,
    synthetic_rows,
    truncated_rows,
    write_idx,
)
from metainfluence.data import (
    DATASETS,
    download_omniglot,
    load_dataset,
    load_digits,
    load_mini_imagenet,
    load_mnist,
    load_omniglot,
    read_idx,
    read_split_csvs,
    resize_ink,
    safe_extract_zip,
)
from metainfluence.data.registry import dataset_options
from metainfluence.errors import DataError

SPLITS = ("train", "val", "test")


# =========================================================================== Omniglot (fake archives)
@pytest.fixture
def omni(tmp_path):
    info = make_omniglot(tmp_path / "omni")
    return tmp_path / "omni", info, tmp_path / "cache"


def test_omniglot_fake_structure_ink_and_rotations(omni):
    root, info, cache = omni
    ds = load_omniglot(root, image_size=20, cache_dir=cache)  # 20 = source size: no resampling
    n_chars, drawers = info["images"].shape[:2]
    assert ds.num_classes == 4 * n_chars and ds.num_examples == 4 * n_chars * drawers
    assert ds.image_shape == (1, 20, 20) and ds.split_kind == "class"
    # class = (character, rotation): 4c + r; examples of class 4c+r are the drawers of c rotated r·90°
    for c in (0, n_chars - 1):
        for r in range(4):
            split = next(s for s in SPLITS if 4 * c + r in ds.classes(s))
            ids = ds.examples_of(4 * c + r, split)
            assert len(ids) == drawers
            x = ds.load(ids)
            assert x.dtype == torch.float32 and x.shape == (drawers, 1, 20, 20)
            expected = np.rot90((~info["images"][c]).astype(np.float32), k=r, axes=(1, 2))  # ink = 1
            np.testing.assert_array_equal(x[:, 0].numpy(), expected)
    assert ds.class_names[4 * 3 + 1] == info["chars"][3] + "/rot090"
    # each example is named by its archive member and rotation (score tables show them), one name per example
    split = next(s for s in SPLITS if 4 * 3 + 1 in ds.classes(s))
    for e in ds.examples_of(4 * 3 + 1, split):
        name = ds.example_names[e]
        assert name.split("/", 1)[1].startswith(info["chars"][3] + "/") and name.endswith(".png (rot090)"), name
    assert len(set(ds.example_names)) == ds.num_examples


def test_omniglot_fake_resize_matches_pil_and_split_is_by_character(omni):
    root, info, cache = omni
    ds = load_omniglot(root, image_size=8, cache_dir=cache)
    ids = ds.examples_of(ds.classes("train")[0], "train")
    c = ds.classes("train")[0] // 4
    want = resize_ink(Image.fromarray(info["images"][c, 0]), 8, "lanczos") / 255.0
    np.testing.assert_allclose(ds.load(ids[:1])[0, 0].numpy(), want, atol=1e-7)
    # every character's 4 rotations in one split; the splits partition all classes
    seen = set()
    for s in SPLITS:
        cl = set(ds.classes(s))
        assert not (cl & seen)
        seen |= cl
        assert all({4 * (k // 4) + r for r in range(4)} <= cl for k in cl)
    assert seen == set(range(ds.num_classes))
    # 8 characters in 1100/100/423 proportions: 1 val, 2 test, 5 train
    assert [len(ds.classes(s)) // 4 for s in SPLITS] == [5, 1, 2]


def test_omniglot_split_seed_and_rotations_flag(omni):
    root, _info, cache = omni
    a = load_omniglot(root, image_size=8, cache_dir=cache, split_seed=0)
    a2 = load_omniglot(root, image_size=8, cache_dir=cache, split_seed=0)
    assert a.fingerprint == a2.fingerprint and a.classes("train") == a2.classes("train")
    b = [load_omniglot(root, image_size=8, cache_dir=cache, split_seed=s) for s in range(1, 6)]
    assert any(x.classes("test") != a.classes("test") for x in b)
    assert all(x.fingerprint != a.fingerprint for x in b if x.classes("test") != a.classes("test"))
    norot = load_omniglot(root, image_size=8, cache_dir=cache, rotations=False)
    assert norot.num_classes == a.num_classes // 4 and norot.fingerprint != a.fingerprint
    other_size = load_omniglot(root, image_size=10, cache_dir=cache)
    assert other_size.image_shape == (1, 10, 10) and other_size.fingerprint != a.fingerprint


def test_omniglot_extracted_folders_give_same_images(tmp_path):
    make_omniglot(tmp_path / "z", as_zip=True)
    make_omniglot(tmp_path / "f", as_zip=False)
    dz = load_omniglot(tmp_path / "z", image_size=12, cache_dir=tmp_path / "c")
    df = load_omniglot(tmp_path / "f", image_size=12, cache_dir=tmp_path / "c")
    assert dz.class_names == df.class_names
    all_ids = torch.arange(dz.num_examples)
    assert torch.equal(dz.load(all_ids), df.load(all_ids))
    assert torch.equal(dz.targets, df.targets)
    assert dz.fingerprint == df.fingerprint  # same content, same fingerprint, whatever the container


def test_omniglot_found_under_official_layout_subfolder(tmp_path):
    make_omniglot(tmp_path / "data" / "omniglot" / "official_layout")
    ds = load_dataset("omniglot", root=tmp_path / "data", image_size=8, cache_dir=tmp_path / "c")
    assert ds.num_classes == 32


def test_omniglot_cache_is_written_reused_and_rebuilt_when_corrupt(omni, monkeypatch):
    root, _info, cache = omni
    a = load_omniglot(root, image_size=8, cache_dir=cache)
    files = list(cache.glob("omniglot-8px-lanczos-*.npz"))
    assert len(files) == 1 and not list(cache.glob(".*tmp"))
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["images"].dtype == np.uint8 and z["images"].shape[1:] == (8, 8)

    def boom(*args, **kwargs):
        raise AssertionError("decoded again although the cache exists")

    monkeypatch.setattr(omni_mod, "_decode", boom)
    b = load_omniglot(root, image_size=8, cache_dir=cache)
    assert torch.equal(a.load(torch.arange(a.num_examples)), b.load(torch.arange(b.num_examples)))
    monkeypatch.undo()
    files[0].write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        c = load_omniglot(root, image_size=8, cache_dir=cache)
    assert torch.equal(a.load(torch.arange(40)), c.load(torch.arange(40)))
    # the env var chooses the cache folder when no argument is given
    monkeypatch.setenv("METAINFLUENCE_CACHE", str(root.parent / "envcache"))
    load_omniglot(root, image_size=8)
    assert len(list((root.parent / "envcache").glob("*.npz"))) == 1


def test_omniglot_split_file(omni):
    root, info, cache = omni
    chars = info["chars"]
    d = root.parent / "split"
    d.mkdir()
    (d / "train.txt").write_text("".join(f"{c}/rot{r:03d}\n" for c in chars[:4] for r in (0, 90, 180, 270)))
    (d / "val.txt").write_text(f"{chars[4]}/rot000\n")  # rotation suffix names the character
    (d / "test.txt").write_text(f"{chars[5]}\n{chars[6]}/rot270\n")
    ds = load_omniglot(root, image_size=8, cache_dir=cache, split_file=d)
    assert ds.classes("train") == list(range(16))
    assert ds.classes("val") == [16, 17, 18, 19]
    assert ds.classes("test") == list(range(20, 28))
    # character 7 is listed nowhere: in no split
    assert not any(c in ds.classes(s) for s in SPLITS for c in range(28, 32))

    (d / "test.txt").write_text("Nowhere/character01/rot000\n")
    with pytest.raises(DataError, match="absent from the archives"):
        load_omniglot(root, image_size=8, cache_dir=cache, split_file=d)
    (d / "test.txt").write_text(f"{chars[0]}/rot090\n")
    with pytest.raises(DataError, match="in both"):
        load_omniglot(root, image_size=8, cache_dir=cache, split_file=d)
    (d / "test.txt").write_text("not a valid line with spaces\n")
    with pytest.raises(DataError, match="line 1"):
        load_omniglot(root, image_size=8, cache_dir=cache, split_file=d)


def test_omniglot_missing_archive(tmp_path):
    make_omniglot(tmp_path)
    (tmp_path / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match=r"images_evaluation\.zip.*not found.*download_omniglot") as e:
        load_omniglot(tmp_path, cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_omniglot(tmp_path / "nope")


def test_omniglot_corrupt_zip_and_corrupt_png(tmp_path):
    make_omniglot(tmp_path / "a")
    (tmp_path / "a" / "images_background.zip").write_bytes(b"PK\x03\x04 garbage, not a zip")
    with pytest.raises(DataError, match=r"images_background\.zip is not a readable zip") as e:
        load_omniglot(tmp_path / "a", cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value)

    make_omniglot(tmp_path / "b")
    good = zipfile.ZipFile(tmp_path / "b" / "images_evaluation.zip")
    members = {n: good.read(n) for n in good.namelist()}
    good.close()
    victim = sorted(n for n in members if n.endswith(".png"))[3]
    members[victim] = b"\x89PNG\r\n\x1a\n truncated"
    make_zip(tmp_path / "b" / "images_evaluation.zip", members)
    with pytest.raises(DataError, match=r"cannot be decoded"):
        load_omniglot(tmp_path / "b", cache_dir=tmp_path / "c")

    # a flipped byte inside compressed data: the zip CRC / zlib check fails
    make_omniglot(tmp_path / "d")
    raw = bytearray((tmp_path / "d" / "images_background.zip").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".png"))
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    (tmp_path / "d" / "images_background.zip").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt|cannot be decoded"):
        load_omniglot(tmp_path / "d", cache_dir=tmp_path / "c")


def test_omniglot_bad_options(omni):
    root, _info, cache = omni
    with pytest.raises(DataError, match="image_size"):
        load_omniglot(root, image_size=0, cache_dir=cache)
    with pytest.raises(DataError, match="resample"):
        load_omniglot(root, resample="nearest", cache_dir=cache)
    with pytest.raises(DataError, match="split sizes"):
        load_omniglot(root, image_size=8, cache_dir=cache, split_sizes=(6, 2, 2))


# =========================================================================== zip extraction / download
def test_safe_extract_refuses_path_escape(tmp_path):
    target = tmp_path / "target"
    for bad in ("../evil.txt", "ok/../../evil.txt", "/tmp/evil_abs.txt"):
        z = make_zip(tmp_path / "bad.zip", {"fine.txt": b"x", bad: b"pwned"})
        with pytest.raises(DataError, match="outside") as e:
            safe_extract_zip(z, target)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()
        assert not target.exists() or not any(target.rglob("*"))  # nothing written before the refusal
    z = make_zip(tmp_path / "good.zip", {"a/b.txt": b"hello", "c.txt": b"bye"})
    safe_extract_zip(z, target)
    assert (target / "a" / "b.txt").read_bytes() == b"hello" and (target / "c.txt").read_bytes() == b"bye"


def test_download_checks_checksum_and_extracts(tmp_path):
    src = tmp_path / "server"
    make_omniglot(src)
    urls = {s: (src / f"{s}.zip").as_uri() for s in ("images_background", "images_evaluation")}
    dest = tmp_path / "dest"
    # the fake archives are not the official ones: refused, and nothing is left behind
    with pytest.raises(DataError, match="fails its checksum"):
        download_omniglot(dest, urls=urls)
    assert list(dest.iterdir()) == []
    sums = {s: hashlib.sha256((src / f"{s}.zip").read_bytes()).hexdigest() for s in urls}
    paths = download_omniglot(dest, urls=urls, checksums=sums)
    assert all(p.is_file() for p in paths.values())
    assert (dest / "images_background" / "Alpha" / "character01").is_dir()
    ds = load_omniglot(dest, image_size=8, cache_dir=tmp_path / "c")
    assert ds.num_classes == 32
    with pytest.raises(DataError, match="cannot download"):
        download_omniglot(tmp_path / "d2", urls={s: (tmp_path / "missing.zip").as_uri() for s in urls})


@pytest.mark.realdata
def test_official_checksums_match_the_shared_archives(shared_data):
    for s in ("images_background", "images_evaluation"):
        path = shared_data / "omniglot" / "official_layout" / f"{s}.zip"
        assert omni_dl._checksum_ok(path, s, None)


# =========================================================================== MNIST (fake idx)
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_fake_idx(tmp_path, gz):
    arrays = make_idx(tmp_path / "idx", gz=gz)
    ds = load_mnist(tmp_path, val_size=50)
    assert ds.num_examples == 400 and ds.num_classes == 10 and ds.split_kind == "example"
    x = ds.load(torch.tensor([0, 299, 300, 399]))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, 0].numpy(), arrays["train_images"][0] / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(x[2, 0].numpy(), arrays["t10k_images"][0] / 255.0, rtol=0, atol=1e-7)
    # each example is named by its idx file and index there (score tables show these names)
    assert [ds.example_names[i].split("-")[0] + ds.example_names[i][ds.example_names[i].index("["):] for i in (0, 299, 300, 399)] == [
        "train[0]", "train[299]", "t10k[0]", "t10k[99]"]
    assert torch.equal(ds.targets[:300], torch.from_numpy(arrays["train_labels"].astype(np.int64)))
    # example-disjoint split: test = t10k file, val = 50 seeded train-file examples, train = the other 250
    per = {s: torch.cat([ds.examples_of(c, s) for c in ds.classes(s)]) for s in SPLITS}
    assert [len(per[s]) for s in SPLITS] == [250, 50, 100]
    assert sorted(per["test"].tolist()) == list(range(300, 400))
    assert set(per["train"].tolist()).isdisjoint(per["val"].tolist())
    assert set(per["train"].tolist()) | set(per["val"].tolist()) == set(range(300))
    for s in SPLITS:  # labels really are the class the ids are listed under
        for c in ds.classes(s):
            assert (ds.targets[ds.examples_of(c, s)] == c).all()
    assert load_mnist(tmp_path, val_size=50).fingerprint == ds.fingerprint
    other = load_mnist(tmp_path, val_size=50, split_seed=1)
    assert other.fingerprint != ds.fingerprint
    assert not torch.equal(torch.sort(other.examples_of(0, "val")).values, torch.sort(ds.examples_of(0, "val")).values)


def test_fashion_flag_and_registry_subfolder(tmp_path):
    make_idx(tmp_path / "fashion-mnist", gz=True, seed=3)
    ds = load_dataset("fashion-mnist", root=tmp_path, val_size=20)
    assert ds.name == "fashion-mnist" and ds.class_names[9] == "Ankle boot"
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", root=tmp_path)


def test_idx_truncated_corrupt_and_missing(tmp_path):
    arrays = make_idx(tmp_path / "raw", gz=False)
    p = arrays["train_images_path"]
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*truncated") as e:
        load_mnist(tmp_path / "raw")
    assert "\n" not in str(e.value)

    arrays = make_idx(tmp_path / "gz", gz=True)
    p = arrays["t10k_labels_path"]
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*truncated"):
        load_mnist(tmp_path / "gz")

    bad = tmp_path / "magic-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    notgz = tmp_path / "x-idx3-ubyte.gz"
    notgz.write_bytes(b"plain bytes")
    with pytest.raises(DataError, match=r"x-idx3-ubyte\.gz"):
        read_idx(notgz)

    arrays = make_idx(tmp_path / "mis", gz=True)
    arrays["train_labels_path"].unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\[\.gz\] not found"):
        load_mnist(tmp_path / "mis")

    arrays = make_idx(tmp_path / "cnt", gz=True, n_train=100)
    write_idx(tmp_path / "cnt" / "train-labels-idx1-ubyte", np.zeros(99, np.uint8), gz=True)
    with pytest.raises(DataError, match="100 images but"):
        load_mnist(tmp_path / "cnt", val_size=10)


# =========================================================================== Mini-ImageNet (fake images)
def _mini_rows(shared: Path | None) -> dict:
    if shared is not None:
        ravi = shared / "mini-imagenet" / "splits" / "ravi"
        return {"train": truncated_rows(ravi / "train.csv", 3, 4), "val": truncated_rows(ravi / "val.csv", 2, 4), "test": truncated_rows(ravi / "test.csv", 2, 4)}
    return {"train": synthetic_rows(1, 3, 4), "val": synthetic_rows(2, 2, 4), "test": synthetic_rows(3, 2, 4)}


@pytest.fixture
def mini_rows():
    root = os.environ.get("METAINFLUENCE_DATA")
    shared = Path(root) if root and (Path(root) / "mini-imagenet" / "splits" / "ravi" / "train.csv").is_file() else None
    return _mini_rows(shared)


def test_mini_imagenet_fake_images(tmp_path, mini_rows):
    colours = make_mini_imagenet(tmp_path, mini_rows)
    ds = load_mini_imagenet(tmp_path)
    assert ds.num_classes == 7 and ds.num_examples == 28 and ds.split_kind == "class"
    assert [len(ds.classes(s)) for s in SPLITS] == [3, 2, 2]
    assert ds.class_names[0] == mini_rows["train"][0][1]
    ids = ds.examples_of(ds.classes("val")[1], "val")
    x = ds.load(ids)
    assert x.shape == (4, 3, 84, 84) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    for j, i in enumerate(ids.tolist()):
        fname = mini_rows["val"][i - 12][0]
        want = torch.tensor(colours[fname], dtype=torch.float32) / 255
        assert torch.allclose(x[j].mean((1, 2)), want, atol=0.03)  # JPEG is lossy
    assert load_mini_imagenet(tmp_path, image_size=32).load(ids[:1]).shape == (1, 3, 32, 32)


def test_mini_imagenet_missing_images_and_bad_csv(tmp_path, mini_rows):
    make_mini_imagenet(tmp_path, mini_rows)
    victim = mini_rows["test"][2][0]
    (tmp_path / "images" / victim).unlink()
    # the csv file and line of the first missing image, and a remedy the command line can follow
    with pytest.raises(DataError, match=rf"1 of 28 Mini-ImageNet images are missing.*{victim}.*test\.csv line 4\); put the images in .*images or remove their rows") as e:
        load_mini_imagenet(tmp_path)
    assert "\n" not in str(e.value) and "check_images" not in str(e.value)
    ds = load_mini_imagenet(tmp_path, check_images=False)
    with pytest.raises(DataError, match=rf"{victim} is missing \(listed in .*test\.csv line 4\)"):
        ds.load(torch.arange(ds.num_examples))
    (tmp_path / "images" / victim).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot be decoded"):
        ds.load(torch.arange(ds.num_examples))

    leak = dict(mini_rows)
    leak["test"] = list(mini_rows["test"]) + [("x.jpg", mini_rows["train"][0][1])]
    make_mini_imagenet(tmp_path / "leak", leak)
    with pytest.raises(DataError, match="both train.csv and test.csv"):
        load_mini_imagenet(tmp_path / "leak")
    (tmp_path / "leak" / "val.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(DataError, match="header"):
        load_mini_imagenet(tmp_path / "leak")
    with pytest.raises(DataError, match="split files missing .*images: no train.csv, val.csv, test.csv"):
        load_mini_imagenet(tmp_path / "images")


def test_mini_imagenet_missing_split_file_names_it_and_where_to_put_it(tmp_path, mini_rows):
    make_mini_imagenet(tmp_path / "mi", mini_rows)
    (tmp_path / "mi" / "val.csv").unlink()
    with pytest.raises(DataError) as e:
        load_mini_imagenet(tmp_path / "mi")
    msg = str(e.value)
    assert f"({tmp_path / 'mi'}: no val.csv)" in msg  # only the missing file, in the one folder that exists
    assert "no train.csv" not in msg and "\n" not in msg
    assert f"put the Ravi-Larochelle train.csv, val.csv and test.csv together in {tmp_path / 'mi'} or {tmp_path / 'mi' / 'splits' / 'ravi'}" in msg
    assert "pass csv_dir" not in msg and "(Python API: csv_dir=...)" in msg
    # an existing splits/ravi folder is reported too
    (tmp_path / "mi" / "splits" / "ravi").mkdir(parents=True)
    (tmp_path / "mi" / "splits" / "ravi" / "train.csv").write_text("filename,label\n")
    with pytest.raises(DataError, match=r"ravi: no val\.csv, test\.csv\)"):
        load_mini_imagenet(tmp_path / "mi")
    with pytest.raises(DataError, match=r"split folder .*ravi lacks val\.csv, test\.csv"):
        load_mini_imagenet(tmp_path / "mi", csv_dir=tmp_path / "mi" / "splits" / "ravi")


def test_mini_imagenet_from_a_data_folder_holding_several_datasets(tmp_path, mini_rows, monkeypatch):
    # METAINFLUENCE_DATA / --data-root may be the parent folder: CSVs and images/ are under mini-imagenet/
    make_mini_imagenet(tmp_path / "data" / "mini-imagenet", mini_rows)
    make_idx(tmp_path / "data" / "mnist")
    a = load_dataset("mini-imagenet", root=tmp_path / "data", image_size=8)
    b = load_mini_imagenet(tmp_path / "data" / "mini-imagenet", image_size=8)
    assert a.fingerprint == b.fingerprint and torch.equal(a.load(torch.arange(28)), b.load(torch.arange(28)))
    # CSVs in splits/ravi (the shared data's layout) and no images at all: the images/ folder is named
    d = tmp_path / "csvonly"
    make_mini_imagenet(d / "mini-imagenet" / "splits" / "ravi", mini_rows, write_images=False)
    with pytest.raises(DataError, match=rf"28 of 28 .*ravi.train\.csv line 2\); put the images in {d / 'mini-imagenet' / 'images'} "):
        load_dataset("mini-imagenet", root=d)


@pytest.mark.realdata
def test_mini_imagenet_real_csvs(shared_data, tmp_path):
    ravi = shared_data / "mini-imagenet" / "splits" / "ravi"
    rows = read_split_csvs(ravi)
    for s, n_cls in zip(SPLITS, (64, 16, 20)):
        labels = [lab for _f, lab in rows[s]]
        assert len(set(labels)) == n_cls and len(labels) == 600 * n_cls
        assert all(labels.count(lab) == 600 for lab in set(labels[:1200]))
        assert all(f.startswith(lab) and f.endswith(".jpg") for f, lab in rows[s][:2000])
    ds = load_mini_imagenet(tmp_path, csv_dir=ravi, check_images=False)
    assert [len(ds.classes(s)) for s in SPLITS] == [64, 16, 20]
    assert all(len(ds.examples_of(c, s)) == 600 for s in SPLITS for c in ds.classes(s))
    assert ds.image_shape == (3, 84, 84)


# =========================================================================== digits and the registry
def test_digits():
    ds = load_digits()
    assert ds.num_examples == 1797 and ds.num_classes == 10 and ds.image_shape == (1, 8, 8)
    x = ds.load(torch.arange(1797))
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() == 1
    from sklearn.datasets import load_digits as sk

    np.testing.assert_allclose(x[:, 0].numpy() * 16, sk().images, atol=1e-5)
    per = {s: torch.cat([ds.examples_of(c, s) for c in range(10)]) for s in SPLITS}
    assert sum(len(v) for v in per.values()) == 1797
    assert len(set(torch.cat(list(per.values())).tolist())) == 1797  # disjoint and complete
    for s in SPLITS:
        assert ds.classes(s) == list(range(10))
        counts = torch.bincount(ds.targets[per[s]], minlength=10)
        assert counts.min() >= (100 if s == "train" else 35)
    assert load_digits(split_seed=1).fingerprint != ds.fingerprint
    assert load_digits().fingerprint == ds.fingerprint


def test_registry_errors(monkeypatch, tmp_path):
    assert set(DATASETS) == {"digits", "omniglot", "mnist", "fashion-mnist", "mini-imagenet", "orl-faces", "image-folder"}
    assert load_dataset("digits").name == "digits"
    with pytest.raises(DataError, match=r"unknown dataset 'cifar'.*digits, omniglot, mnist, fashion-mnist, mini-imagenet, orl-faces, image-folder \(and, for runs and experiments, sinusoid"):
        load_dataset("cifar")
    monkeypatch.delenv("METAINFLUENCE_DATA", raising=False)
    with pytest.raises(DataError, match="pass --data-root or set METAINFLUENCE_DATA") as e:
        load_dataset("omniglot")
    assert "root=" not in str(e.value)  # command-line advice, not Python
    with pytest.raises(DataError, match="does not exist; pass --data-root or set") as e:
        load_dataset("mnist", root=tmp_path / "nope")
    assert "root=" not in str(e.value)
    assert "split_seed" not in dataset_options("mini-imagenet") and "split_seed" in dataset_options("omniglot")
    assert dataset_options("fashion") == ("val_size", "split_seed")  # aliases resolve; fixed options are not offered
    with pytest.raises(DataError, match="unknown option.*image_sise"):
        load_dataset("digits", image_sise=3)
    monkeypatch.setenv("METAINFLUENCE_DATA", str(tmp_path))
    make_idx(tmp_path / "mnist" / "idx")
    assert load_dataset("mnist", val_size=10).num_examples == 400


def test_dataset_query_errors():
    ds = load_digits()
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ds.classes("dev")
    with pytest.raises(DataError, match="outside"):
        ds.examples_of(10, "train")
    with pytest.raises(DataError, match="example id 5000"):
        ds.load(torch.tensor([0, 5000]))


def test_class_split_examples_of_wrong_split(omni):
    root, _info, cache = omni
    ds = load_omniglot(root, image_size=8, cache_dir=cache)
    c = ds.classes("test")[0]
    with pytest.raises(DataError, match="belongs to test, not 'train'"):
        ds.examples_of(c, "train")


# =========================================================================== real data
@pytest.fixture(scope="session")
def real_omniglot(shared_data, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "omniglot-cache"  # test_pools reuses this cache
    return load_omniglot(shared_data / "omniglot", cache_dir=cache), cache


@pytest.mark.realdata
def test_real_omniglot(real_omniglot, shared_data):
    ds, _cache = real_omniglot
    assert ds.num_classes == 1623 * 4 and ds.num_examples == 1623 * 20 * 4
    assert [len(ds.classes(s)) for s in SPLITS] == [1100 * 4, 100 * 4, 423 * 4]
    x = ds.load(torch.arange(0, ds.num_examples, 97))
    assert x.shape[1:] == (1, 28, 28)
    assert 0.03 < x.mean() < 0.2  # ink = 1 is the minority
    assert (x == 0).float().mean() > 0.6  # mostly-zero background
    assert (x.amax((1, 2, 3)) > 0.25).all() and (x.amax((1, 2, 3)) > 0.9).float().mean() > 0.99  # every image has ink
    # known images, located through character_map.csv (npz row -> Alphabet/characterNN)
    rows = [line.split(",") for line in (shared_data / "omniglot" / "character_map.csv").read_text().splitlines()[1:]]
    for set_name, npz_row, drawer in (("background", 0, 5), ("evaluation", 17, 0), ("background", 963, 19)):
        row = next(r for r in rows if r[1] == set_name and int(r[2]) == npz_row)
        char = ds.class_names.index(f"{row[3]}/{row[4]}/rot000") // 4
        with np.load(shared_data / "omniglot" / "npz" / f"images_{set_name}.npz", allow_pickle=False) as z:
            raw = z["images"][npz_row, drawer]  # True = white background
        want = resize_ink(Image.fromarray(raw), 28, "lanczos") / 255.0
        got = ds.load(torch.tensor([(char * 20 + drawer) * 4]))[0, 0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-7)
        rot = ds.load(torch.tensor([(char * 20 + drawer) * 4 + 3]))[0, 0].numpy()
        np.testing.assert_allclose(rot, np.rot90(want, 3), atol=1e-7)
    assert ds.class_names[0] == "Alphabet_of_the_Magi/character01/rot000"


@pytest.mark.realdata
def test_real_omniglot_vinyals_split(real_omniglot, shared_data):
    _ds, cache = real_omniglot
    ds = load_omniglot(shared_data / "omniglot", cache_dir=cache, split_file=shared_data / "omniglot" / "splits" / "vinyals")
    assert [len(ds.classes(s)) for s in SPLITS] == [1028 * 4, 172 * 4, 423 * 4]
    val_names = {ds.class_names[c] for c in ds.classes("val")}
    assert "Hebrew/character01/rot090" in val_names
    assert ds.fingerprint != _ds.fingerprint


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name,train_counts,test_counts",
    [
        ("mnist", [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949], [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
        ("fashion-mnist", [6000] * 10, [1000] * 10),
    ],
)
def test_real_mnist(shared_data, name, train_counts, test_counts):
    ds = load_dataset(name, root=shared_data)
    assert ds.num_examples == 70000
    assert torch.bincount(ds.targets[:60000], minlength=10).tolist() == train_counts
    assert torch.bincount(ds.targets[60000:], minlength=10).tolist() == test_counts
    sizes = [sum(len(ds.examples_of(c, s)) for c in range(10)) for s in SPLITS]
    assert sizes == [50000, 10000, 10000]
    x = ds.load(torch.arange(0, 60000, 10))
    mean = {"mnist": 33.32, "fashion-mnist": 72.94}[name] / 255
    assert abs(x.mean().item() - mean) < 0.01
    if name == "mnist":  # the official raw-file md5 of the decompressed train images
        raw = gzip.decompress((shared_data / "mnist" / "idx" / "train-images-idx3-ubyte.gz").read_bytes())
        assert hashlib.md5(raw).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"
        np.testing.assert_array_equal((ds.load(torch.tensor([7]))[0, 0] * 255).round().numpy().astype(np.uint8), np.frombuffer(raw, np.uint8, 784, 16 + 7 * 784).reshape(28, 28))


def test_mnist_and_fashion_mnist_folders_are_not_mixed_up(tmp_path, monkeypatch):
    # Both sets share the idx format: their official files are told apart by the label content.
    ours = make_idx(tmp_path / "fashion-mnist", gz=True, seed=4)
    assert mnist_mod.official_source(ours["t10k_labels"]) is None
    assert load_dataset("mnist", root=tmp_path / "fashion-mnist", val_size=10).name == "mnist"  # a user's own files load
    # pretend the fake t10k labels are Fashion-MNIST's official ones
    table = {hashlib.sha256(ours["t10k_labels"].tobytes()).hexdigest(): ("fashion-mnist", "t10k")}
    monkeypatch.setattr(mnist_mod, "OFFICIAL_LABELS", table)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path / "fashion-mnist", val_size=10)
    msg = str(e.value)
    assert "\n" not in msg and "are Fashion-MNIST, not MNIST" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "point --data-root at the MNIST folder (or, to train on these, train with --dataset fashion-mnist)" in msg
    assert load_dataset("fashion-mnist", root=tmp_path, val_size=10).name == "fashion-mnist"
    # the official MNIST labels are refused when Fashion-MNIST is asked for
    table = {hashlib.sha256(ours["train_labels"].tobytes()).hexdigest(): ("mnist", "train")}
    monkeypatch.setattr(mnist_mod, "OFFICIAL_LABELS", table)
    with pytest.raises(DataError, match="are MNIST, not Fashion-MNIST .*train with --dataset mnist"):
        load_mnist(tmp_path / "fashion-mnist", fashion=True, val_size=10)
    assert load_mnist(tmp_path / "fashion-mnist", val_size=10).name == "mnist"


@pytest.mark.realdata
def test_real_mnist_and_fashion_mnist_folders_swapped(shared_data):
    for name, other in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
        with pytest.raises(DataError, match=rf"point --data-root at the .* folder \(or, to train on these, train with --dataset {other}\)"):
            load_dataset(name, root=shared_data / other)
    for name in ("mnist", "fashion-mnist"):  # every official label file is recognised as its own
        folder = shared_data / name / ("idx" if name == "mnist" else "")
        for part in ("train", "t10k"):
            assert mnist_mod.official_source(read_idx(folder / f"{part}-labels-idx1-ubyte.gz")) == (name, part)


def test_mnist_gz_and_raw_give_same_dataset(tmp_path):
    make_idx(tmp_path / "gz", gz=True, seed=5)
    make_idx(tmp_path / "raw", gz=False, seed=5)
    a, b = load_mnist(tmp_path / "gz", val_size=30), load_mnist(tmp_path / "raw", val_size=30)
    assert a.fingerprint == b.fingerprint and torch.equal(a.load(torch.arange(400)), b.load(torch.arange(400)))
    make_idx(tmp_path / "other", gz=True, seed=6)
    assert load_mnist(tmp_path / "other", val_size=30).fingerprint != a.fingerprint
