"""ORL / AT&T faces loader: generated PGM fixtures in the real layout, and the real folder when
METAINFLUENCE_DATA holds orl-faces/."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import make_orl, pgm_bytes
from metainfluence.data import DATASETS, load_dataset, load_orl_faces, read_pgm
from metainfluence.errors import DataError

SPLITS = ("train", "val", "test")


@pytest.fixture
def orl(tmp_path):
    root = tmp_path / "data" / "orl-faces"
    return root, make_orl(root)  # 8 subjects × 3 photos of 14×12


def test_orl_native_pixels_labels_and_layout(orl):
    root, images = orl
    ds = load_orl_faces(root, image_size=0, subjects=8, photos=3)
    assert ds.name == "orl-faces" and ds.split_kind == "class"
    assert ds.num_classes == 8 and ds.num_examples == 24 and ds.image_shape == (1, 14, 12)
    assert ds.class_names[:2] == ["s1", "s2"]
    assert ds.targets.tolist() == [c for c in range(8) for _ in range(3)]  # example id = 3·class + photo
    x = ds.load(torch.arange(24))
    assert x.dtype == torch.float32 and x.shape == (24, 1, 14, 12)
    np.testing.assert_array_equal((x[:, 0] * 255).round().numpy().astype(np.uint8), images.reshape(24, 14, 12))


def test_orl_found_from_each_root_and_resized(orl):
    root, images = orl
    a = load_orl_faces(root, subjects=8, photos=3)
    assert a.image_shape == (1, 84, 84)  # the Mini-ImageNet protocol size by default
    for other in (root / "att_faces", root.parent):  # att_faces itself, or a data root with orl-faces/
        assert load_orl_faces(other, subjects=8, photos=3).fingerprint == a.fingerprint
    small = load_orl_faces(root, image_size=6, subjects=8, photos=3)
    want = np.asarray(Image.fromarray(images[2, 1]).resize((6, 6), Image.BILINEAR)) / 255.0
    np.testing.assert_allclose(small.load([7])[0, 0].numpy(), want, atol=1e-6)
    crop = load_orl_faces(root, image_size=12, crop=True, subjects=8, photos=3)  # central 12×12 of 14×12
    np.testing.assert_allclose(crop.load([0])[0, 0].numpy(), images[0, 0, 1:13] / 255.0, atol=1e-6)
    assert len({a.fingerprint, small.fingerprint, crop.fingerprint}) == 3


def test_orl_split_is_seeded_disjoint_and_complete(orl):
    root, _ = orl
    ds = load_orl_faces(root, subjects=8, photos=3, image_size=8)
    parts = [ds.classes(s) for s in SPLITS]
    assert [len(p) for p in parts] == [4, 2, 2]  # a quarter each for val and test, as 20/10/10 of 40
    assert sorted(sum(parts, [])) == list(range(8))
    assert load_orl_faces(root, subjects=8, photos=3, image_size=8).fingerprint == ds.fingerprint
    other = load_orl_faces(root, subjects=8, photos=3, image_size=8, split_seed=1)
    assert other.fingerprint != ds.fingerprint and [other.classes(s) for s in SPLITS] != parts
    assert "seeded subject shuffle (seed 0): 4/2/2 subjects" in ds.split_description
    custom = load_orl_faces(root, subjects=8, photos=3, image_size=8, split_sizes=(5, 1, 2))
    assert [len(custom.classes(s)) for s in SPLITS] == [5, 1, 2]
    with pytest.raises(DataError, match="split sizes .* do not fit the 8 subjects"):
        load_orl_faces(root, subjects=8, photos=3, split_sizes=(6, 2, 2))


def test_orl_registry_and_pool(orl, monkeypatch):
    from metainfluence.tasks import build_pool

    root, _ = orl
    assert "orl-faces" in DATASETS
    monkeypatch.setenv("METAINFLUENCE_DATA", str(root.parent))
    ds = load_dataset("orl", subjects=8, photos=3, image_size=10, split_seed=2)
    assert ds.name == "orl-faces" and ds.image_shape == (1, 10, 10)
    pool = build_pool(ds, "train", 3, 1, 2, 5, seed=0)
    train = set(ds.classes("train"))
    assert set(pool.classes.reshape(-1).tolist()) <= train


def test_orl_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="ORL faces not found under .*att_faces/.*--data-root"):
        load_orl_faces(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_orl_faces(tmp_path / "nope")
    make_orl(tmp_path, subjects=12, photos=2)
    with pytest.raises(DataError, match=r"expected 40 subject folders s1..s40 under .*att_faces, found 12; missing s13; point --data-root"):
        load_orl_faces(tmp_path)
    faces = tmp_path / "att_faces"
    (faces / "s3" / "2.pgm").unlink()
    with pytest.raises(DataError, match=r"s3/2.pgm is missing \(1 of 2 photos"):
        load_orl_faces(tmp_path, subjects=12, photos=2)
    (faces / "s3" / "2.pgm").write_bytes(pgm_bytes(np.zeros((14, 12), np.uint8))[:-40])
    with pytest.raises(DataError, match=r"s3/2.pgm is truncated or corrupt"):
        load_orl_faces(tmp_path, subjects=12, photos=2)
    (faces / "s3" / "2.pgm").write_bytes(b"GIF89a not a pgm at all")
    with pytest.raises(DataError, match=r"s3/2.pgm has a wrong header \(b'GIF89a n'"):
        read_pgm(faces / "s3" / "2.pgm")
    Image.fromarray(np.zeros((14, 12, 3), np.uint8)).save(faces / "s3" / "2.pgm", format="PPM")  # colour P6
    with pytest.raises(DataError, match="not an 8-bit grey PGM"):
        load_orl_faces(tmp_path, subjects=12, photos=2)
    (faces / "s3" / "2.pgm").write_bytes(pgm_bytes(np.zeros((10, 12), np.uint8)))
    with pytest.raises(DataError, match=r"s3/2.pgm is 12×10 pixels, the others 12×14"):
        load_orl_faces(tmp_path, subjects=12, photos=2)
    with pytest.raises(DataError, match="image_size=2 is invalid"):
        load_orl_faces(tmp_path, image_size=2)


@pytest.mark.realdata
def test_real_orl_faces(shared_data):
    if not (shared_data / "orl-faces" / "att_faces").is_dir():
        pytest.skip("orl-faces/att_faces not in METAINFLUENCE_DATA")
    native = load_dataset("orl-faces", root=shared_data, image_size=0)
    assert native.num_classes == 40 and native.num_examples == 400 and native.image_shape == (1, 112, 92)
    assert all(len(native.examples_of(c, s)) == 10 for s in SPLITS for c in native.classes(s))
    assert [len(native.classes(s)) for s in SPLITS] == [20, 10, 10]
    x = native.load(torch.arange(400))
    raw = read_pgm(shared_data / "orl-faces" / "att_faces" / "s7" / "4.pgm")
    np.testing.assert_array_equal((x[6 * 10 + 3, 0] * 255).round().numpy().astype(np.uint8), raw)
    assert 0.2 < x.mean() < 0.7 and x.std() > 0.1  # natural grey photos, not blank
    ds = load_dataset("orl-faces", root=shared_data)
    assert ds.image_shape == (1, 84, 84) and [ds.classes(s) for s in SPLITS] == [native.classes(s) for s in SPLITS]
