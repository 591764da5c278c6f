"""Mini-ImageNet in the Ravi & Larochelle layout: an image folder plus train/val/test CSV files.

``root/images/<filename>.jpg`` (or ``root/<filename>``) and ``train.csv``, ``val.csv``,
``test.csv`` with header ``filename,label`` (64 / 16 / 20 classes × 600 images). Images are read
lazily in ``load`` (PIL, RGB, resized to ``image_size``×``image_size``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .base import SPLITS, ClassDataset, digest

RESAMPLE = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}


def _csv_dir(root: Path | None, csv_dir: str | os.PathLike | None) -> Path:
    if csv_dir is not None:
        d = Path(csv_dir).expanduser()
        if not all((d / f"{s}.csv").is_file() for s in SPLITS):
            raise DataError(f"csv_dir {d} does not hold train.csv, val.csv and test.csv; pass the Ravi-Larochelle split folder")
        return d
    assert root is not None
    for d in (root, root / "splits" / "ravi", root / "mini-imagenet", root / "mini-imagenet" / "splits" / "ravi"):
        if all((d / f"{s}.csv").is_file() for s in SPLITS):
            return d
    raise DataError(f"train.csv/val.csv/test.csv not found under {root}; pass csv_dir= the Ravi-Larochelle split folder")


def read_split_csvs(csv_dir: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """Rows ``(filename, label)`` of ``train.csv``, ``val.csv``, ``test.csv`` in ``csv_dir``."""
    d = Path(csv_dir).expanduser()
    out: dict[str, list[tuple[str, str]]] = {}
    for s in SPLITS:
        path = d / f"{s}.csv"
        if not path.is_file():
            raise DataError(f"split file {path} does not exist; pass the folder holding train.csv, val.csv, test.csv")
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
            raise DataError(f"split file {path} does not start with the header 'filename,label'; use the Ravi-Larochelle CSV format")
        body = []
        for i, r in enumerate(rows[1:], 2):
            if not r:
                continue
            if len(r) != 2 or not r[0].strip() or not r[1].strip():
                raise DataError(f"split file {path} line {i} is not 'filename,label'; fix or regenerate the file")
            body.append((r[0].strip(), r[1].strip()))
        out[s] = body
    return out


def load_mini_imagenet(
    root: str | os.PathLike,
    csv_dir: str | os.PathLike | None = None,
    image_size: int = 84,
    *,
    resample: str = "bilinear",
    check_images: bool = True,
) -> ClassDataset:
    """Mini-ImageNet as a class-disjoint :class:`ClassDataset`.

    Classes are numbered train first (in order of first appearance in train.csv), then val, then
    test; a class (WordNet id) may appear in one CSV only. Example ids follow the rows of
    train.csv, val.csv, test.csv. Images: ``root/images/<filename>`` (or ``root/<filename>``),
    loaded on demand, RGB, resized to ``image_size``² — shape (3, image_size, image_size).
    With ``check_images=True`` every listed image must exist (checked now, not at the first load).
    """
    if not isinstance(image_size, int) or image_size < 4:
        raise DataError(f"image_size={image_size!r} is invalid; use an integer of at least 4 (84 is standard)")
    if resample not in RESAMPLE:
        raise DataError(f"unknown resample filter {resample!r}; use one of {', '.join(RESAMPLE)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Mini-ImageNet folder {root} does not exist; pass the folder holding images/")
    cdir = _csv_dir(root, csv_dir)
    rows = read_split_csvs(cdir)
    image_dir = root / "images" if (root / "images").is_dir() else root
    class_ids: dict[str, int] = {}
    class_split: list[int] = []
    files: list[str] = []
    targets: list[int] = []
    for s_idx, s in enumerate(SPLITS):
        for fname, label in rows[s]:
            if label not in class_ids:
                class_ids[label] = len(class_ids)
                class_split.append(s_idx)
            elif class_split[class_ids[label]] != s_idx:
                raise DataError(f"class {label} appears in both {SPLITS[class_split[class_ids[label]]]}.csv and {s}.csv; the splits must be class-disjoint")
            files.append(fname)
            targets.append(class_ids[label])
    if not files:
        raise DataError(f"the split files in {cdir} list no images; use the Ravi-Larochelle CSVs")
    if check_images:
        missing = [f for f in files if not (image_dir / f).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(files)} Mini-ImageNet images are missing from {image_dir} (first: {missing[0]}); supply the images or pass check_images=False")
    filt = RESAMPLE[resample]

    def loader(ids: np.ndarray) -> torch.Tensor:
        out = np.empty((len(ids), image_size, image_size, 3), dtype=np.uint8)
        for j, i in enumerate(ids):
            path = image_dir / files[int(i)]
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if im.size != (image_size, image_size):
                        im = im.resize((image_size, image_size), filt)
                    out[j] = np.asarray(im, dtype=np.uint8)
            except FileNotFoundError:
                raise DataError(f"Mini-ImageNet image {path} is missing; supply the images folder") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise DataError(f"Mini-ImageNet image {path} cannot be decoded ({exc}); replace the file") from None
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)

    csv_text = {s: (cdir / f"{s}.csv").read_bytes() for s in SPLITS}
    return ClassDataset(
        name="mini-imagenet",
        image_shape=(3, image_size, image_size),
        targets=np.asarray(targets, dtype=np.int64),
        split_kind="class",
        assignment=np.asarray(class_split, dtype=np.int8),
        loader=loader,
        identity={"csv": {s: digest(np.frombuffer(t, dtype=np.uint8), 32) for s, t in csv_text.items()}, "image_size": image_size, "resample": resample},
        num_classes=len(class_ids),
        class_names=list(class_ids),
        split_description="class-disjoint Ravi-Larochelle CSV split: " + "/".join(str(class_split.count(i)) for i in range(3)) + " classes (train/val/test)",
    )
