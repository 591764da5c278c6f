"""Mini-ImageNet in the Ravi & Larochelle layout: an image folder plus train/val/test CSV files.

``root/images/<filename>.jpg`` (or ``root/<filename>``) and ``train.csv``, ``val.csv``,
``test.csv`` with header ``filename,label`` (64 / 16 / 20 classes × 600 images), in ``root`` or
``root/splits/ravi``; ``root`` may also be a data folder with ``mini-imagenet/`` inside. Images are
read lazily in ``load`` (PIL, RGB, resized to ``image_size``×``image_size``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import SPLITS, ClassDataset, digest
from .images import check_image_options, decode_images, unreadable

CSV_FILES = tuple(f"{s}.csv" for s in SPLITS)


def _home(root: Path) -> Path:
    """The Mini-ImageNet folder: ``root`` itself, or ``root/mini-imagenet`` when root is a data folder
    holding several datasets (the CSVs and images/ are then looked up there)."""
    own = (root / "images").is_dir() or any((root / f).is_file() for f in CSV_FILES)
    return root / "mini-imagenet" if not own and (root / "mini-imagenet").is_dir() else root


def _missing(d: Path) -> list[str]:
    return [f for f in CSV_FILES if not (d / f).is_file()]


def _csv_dir(home: Path, csv_dir: str | os.PathLike | None) -> Path:
    if csv_dir is not None:
        d = Path(csv_dir).expanduser()
        if _missing(d):
            raise DataError(f"the Mini-ImageNet split folder {d} lacks {', '.join(_missing(d))}; put the Ravi-Larochelle train.csv, val.csv and test.csv there")
        return d
    candidates = [home, home / "splits" / "ravi"]
    for d in candidates:
        if not _missing(d):
            return d
    # Say, per folder looked in, which of the three files are missing: a lone absent val.csv is
    # a different mistake from a folder without any split files.
    looked = "; ".join(f"{d}: no {', '.join(_missing(d))}" for d in candidates if d == home or d.is_dir())
    raise DataError(
        f"Mini-ImageNet split files missing ({looked}); put the Ravi-Larochelle train.csv, val.csv and test.csv "
        f"together in {home} or {home / 'splits' / 'ravi'} (Python API: csv_dir=...)")


def _read_rows(d: Path) -> dict[str, list[tuple[str, str, int]]]:
    """Rows ``(filename, label, line number)`` of each split file in ``d``."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for s in SPLITS:
        path = d / f"{s}.csv"
        if not path.is_file():
            raise DataError(f"split file {path} does not exist; put the Ravi-Larochelle train.csv, val.csv and test.csv in {d}")
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
            body.append((r[0].strip(), r[1].strip(), i))
        out[s] = body
    return out


def read_split_csvs(csv_dir: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """Rows ``(filename, label)`` of ``train.csv``, ``val.csv``, ``test.csv`` in ``csv_dir``."""
    rows = _read_rows(Path(csv_dir).expanduser())
    return {s: [(f, lab) for f, lab, _line in r] for s, r in rows.items()}


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
    check_image_options(image_size, resample, "84 is standard")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Mini-ImageNet folder {root} does not exist; point --data-root at the folder holding images/ and the split csv files")
    home = _home(root)
    cdir = _csv_dir(home, csv_dir)
    rows = _read_rows(cdir)
    image_dir = home / "images" if (home / "images").is_dir() else home
    class_ids: dict[str, int] = {}
    class_split: list[int] = []
    files: list[str] = []
    sources: list[tuple[str, int]] = []  # (csv file, line) of every image, for error messages
    targets: list[int] = []
    for s_idx, s in enumerate(SPLITS):
        for fname, label, line in rows[s]:
            if label not in class_ids:
                class_ids[label] = len(class_ids)
                class_split.append(s_idx)
            elif class_split[class_ids[label]] != s_idx:
                raise DataError(f"class {label} appears in both {SPLITS[class_split[class_ids[label]]]}.csv and {s}.csv; the splits must be class-disjoint, so keep its rows in one file")
            files.append(fname)
            sources.append((s, line))
            targets.append(class_ids[label])
    if not files:
        raise DataError(f"the split files in {cdir} list no images; use the Ravi-Larochelle CSVs")
    if check_images:
        missing = [i for i, f in enumerate(files) if not (image_dir / f).is_file()]
        if missing:
            split, line = sources[missing[0]]
            # with no image found at all, point at the usual images/ folder rather than the dataset folder
            target = home / "images" if len(missing) == len(files) else image_dir
            raise DataError(
                f"{len(missing)} of {len(files)} Mini-ImageNet images are missing from {image_dir} (first: {files[missing[0]]}, "
                f"listed in {cdir / f'{split}.csv'} line {line}); put the images in {target} or remove their rows from the csv files")

    def loader(ids: np.ndarray) -> torch.Tensor:
        out, gone, failed = decode_images([image_dir / files[int(i)] for i in ids], image_size, "RGB", resample)
        if gone:
            split, line = sources[int(ids[gone[0]])]
            more = f" ({len(gone) - 1} more of this load are missing too)" if len(gone) > 1 else ""
            raise DataError(f"Mini-ImageNet image {image_dir / files[int(ids[gone[0]])]} is missing (listed in {cdir / f'{split}.csv'} line {line}){more}; "
                            f"put it there or remove its row")
        if failed:
            raise unreadable({image_dir / files[int(ids[j])]: exc for j, exc in failed.items()},
                             "cannot be decoded", "cannot be decoded", remedy="replace")
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
        example_names=files,
        split_description="class-disjoint Ravi-Larochelle CSV split: " + "/".join(str(class_split.count(i)) for i in range(3)) + " classes (train/val/test)",
    )
