"""MNIST and Fashion-MNIST from the standard idx files (gzipped or raw).

Files (looked up in ``root``, ``root/idx``, ``root/<mnist|fashion-mnist>`` and
``root/<mnist|fashion-mnist>/idx``; ``NAME`` or ``NAME.gz``):
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import UNASSIGNED, ClassDataset, digest

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# sha256 of the label values (the idx data after its header) of the official files, verified on
# MNIST (decompressed md5s equal LeCun's) and Fashion-MNIST (Zalando, via Debian). MNIST's and
# Fashion-MNIST's files have the same format, so only their content tells a folder mix-up apart;
# the label files are small (70 kB in all), so hashing them costs nothing next to the images.
OFFICIAL_LABELS = {
    "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13": ("mnist", "train"),
    "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5": ("mnist", "t10k"),
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7": ("fashion-mnist", "train"),
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9": ("fashion-mnist", "t10k"),
}
DISPLAY = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _find(root: Path, base: str, sub: str) -> Path:
    dirs = [root, root / "idx", root / sub, root / sub / "idx"]
    for d in dirs:
        for name in (base, base + ".gz"):
            if (d / name).is_file():
                return d / name
    raise DataError(f"idx file {base}[.gz] not found under {root}; point --data-root at the folder holding the four {sub} idx files")


def official_source(labels: np.ndarray) -> tuple[str, str] | None:
    """(dataset, "train" | "t10k") if ``labels`` are those of an official MNIST or Fashion-MNIST
    label file, else None (a user's own idx files)."""
    return OFFICIAL_LABELS.get(hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest())


def _check_not_swapped(name: str, labels: dict[str, np.ndarray], paths: dict[str, Path]) -> None:
    """Refuse the official files of the other dataset (e.g. Fashion-MNIST loaded as MNIST)."""
    for part, lab in labels.items():
        found = official_source(lab)
        if found is not None and found[0] != name:
            other = found[0]
            raise DataError(
                f"the idx files in {paths[part].parent} are {DISPLAY[other]}, not {DISPLAY[name]} ({paths[part].name} holds the official "
                f"{DISPLAY[other]} labels); point --data-root at the {DISPLAY[name]} folder (or, to train on these, train with --dataset {other})")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one idx file (``.gz`` or raw) into a numpy array; DataError naming the file if it is
    truncated, corrupt or not an unsigned-byte idx file."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"idx file {path} is truncated or not valid gzip ({exc}); download it again") from None
    if len(data) < 4:
        raise DataError(f"idx file {path} is truncated ({len(data)} bytes); download it again")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"file {path} is not an unsigned-byte idx file (bad magic number); check that it is the right file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"idx file {path} is truncated inside its header; download it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(f"idx file {path} holds {len(data) - header} data bytes but its header {shape} needs {expected}; it is truncated or corrupt — download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(
    root: str | os.PathLike,
    fashion: bool = False,
    *,
    val_size: int = 10000,
    split_seed: int = 0,
) -> ClassDataset:
    """MNIST (or Fashion-MNIST with ``fashion=True``) as an example-disjoint :class:`ClassDataset`.

    Split (``split_kind='example'``; every split holds all 10 classes):
    example ids 0..59999 are the train file, 60000..69999 the t10k file;
    ``val`` = a seeded random ``val_size`` (default 10,000) of the 60,000 train-file examples,
    ``train`` = the other 50,000, ``test`` = the 10,000 t10k examples.
    Images are 1×28×28 float32 in [0, 1] (pixel / 255). The official files of the other dataset
    (recognised by their labels) are refused; other idx files load as given.
    """
    name = "fashion-mnist" if fashion else "mnist"
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{name} folder {root} does not exist; pass the folder holding the idx files")
    paths = {k: _find(root, v, name) for k, v in FILES.items()}
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for part in ("train", "test"):
        img, lab = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if img.ndim != 3 or lab.ndim != 1:
            raise DataError(f"idx file {paths[part + '_images']} has shape {img.shape}; expected (n, 28, 28) images and (n,) labels")
        if len(img) != len(lab):
            raise DataError(f"{paths[part + '_images']} has {len(img)} images but {paths[part + '_labels']} has {len(lab)} labels; use matching files")
        if lab.max() > 9:
            raise DataError(f"label file {paths[part + '_labels']} has label {int(lab.max())} > 9; check the file")
    _check_not_swapped(name, {p: arrays[f"{p}_labels"] for p in ("train", "test")}, {p: paths[f"{p}_labels"] for p in ("train", "test")})
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError("train and t10k images differ in size; use files of one dataset")
    images = np.concatenate([arrays["train_images"], arrays["test_images"]])
    targets = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
    n_train = len(arrays["train_images"])
    if not 0 <= val_size < n_train:
        raise DataError(f"val_size={val_size} must be between 0 and {n_train - 1}, the train-file size minus one")
    rng = np.random.default_rng(np.random.SeedSequence([int(split_seed), 0x3141]))
    assign = np.full(len(images), UNASSIGNED, dtype=np.int8)
    assign[:n_train] = 0
    assign[rng.permutation(n_train)[:val_size]] = 1
    assign[n_train:] = 2
    h, w = images.shape[1:]

    def loader(ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images[ids]).to(torch.float32).div_(255.0).unsqueeze(1)

    return ClassDataset(
        name=name,
        image_shape=(1, h, w),
        targets=targets,
        split_kind="example",
        assignment=assign,
        loader=loader,
        identity={"images": digest(images, 32), "val_size": val_size, "split_seed": split_seed},  # targets and split enter the fingerprint too
        num_classes=10,
        class_names=FASHION_CLASSES if fashion else [str(d) for d in range(10)],
        # the idx file and the image's index in it, so that score tables point at an image a user can look up
        example_names=[f"{paths['train_images'].name}[{i}]" for i in range(n_train)]
        + [f"{paths['test_images'].name}[{i}]" for i in range(len(images) - n_train)],
        split_description=(
            f"example-disjoint: val = seeded random {val_size} of the {n_train} train-file examples (seed {split_seed}), "
            f"train = the other {n_train - val_size}, test = the {len(images) - n_train} t10k examples"
        ),
    )
