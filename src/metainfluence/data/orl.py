"""The ORL / AT&T "Database of Faces" (Samaria & Harter 1994; Olivetti Research Laboratory, now AT&T
Laboratories Cambridge): 40 subjects × 10 grey photographs, 92 wide × 112 high, 8-bit PGM.

Layout as distributed: ``att_faces/s1 .. s40/1.pgm .. 10.pgm``. ``root`` may be the folder holding
``att_faces/``, the ``att_faces/`` folder itself, or a data root with ``orl-faces/att_faces/``
inside. One class per subject (class id = subject − 1, example id = 10·class + photo − 1).

It is the project's small natural-image stand-in for the Mini-ImageNet protocol (Conv4 on 84×84,
5-way 1-/5-shot): images are resized to ``image_size``² (84 by default) and the subjects get a seeded
class-disjoint 20/10/10 train/val/test split. The images are never copied into the project: the user
supplies the folder (``--data-root`` / ``$METAINFLUENCE_DATA``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .base import ClassDataset, digest, seeded_class_split
from .images import RESAMPLE, check_image_options

SUBJECTS = 40
PHOTOS = 10
NATIVE_HW = (112, 92)
SPLIT_SALT = 0x0A7F  # this dataset's own split stream (see base.seeded_class_split)
_SUBJECT_DIR = re.compile(r"^s(\d+)$")
_REMEDY = "point --data-root (or $METAINFLUENCE_DATA) at the folder holding att_faces/ (see README, 'Datasets')"


def find_att_faces(root: str | os.PathLike) -> Path:
    """The ``att_faces`` folder under ``root`` (the first candidate holding ``sN/`` subject folders)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ORL faces folder {root} does not exist; {_REMEDY}")
    candidates = [root / "att_faces", root / "orl-faces" / "att_faces", root, root / "orl-faces"]
    for d in candidates:
        if d.is_dir() and any(_SUBJECT_DIR.match(p.name) and p.is_dir() for p in d.iterdir()):
            return d
    raise DataError(f"ORL faces not found under {root}: no att_faces/ folder with subject folders s1..s40; {_REMEDY}")


def read_pgm(path: str | os.PathLike) -> np.ndarray:
    """Decode one 8-bit grey PGM with Pillow into a uint8 array (height, width); DataError naming the
    file if it is missing, has no PGM header, is not 8-bit grey, or is truncated."""
    path = Path(path)
    fix = "replace it with the file from the original att_faces distribution"
    try:
        with Image.open(path) as im:
            if im.format != "PPM" or im.mode != "L":
                raise DataError(f"ORL image {path} is a {im.format} image of mode {im.mode}, not an 8-bit grey PGM; {fix}")
            im.load()  # Pillow reads pixels lazily: a truncated file fails here, not at open
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"ORL image {path} is missing; {fix}") from None
    except UnidentifiedImageError:
        with open(path, "rb") as fh:
            head = fh.read(8)
        raise DataError(f"ORL image {path} has a wrong header ({head!r}, expected a PGM starting with b'P5'); {fix}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"ORL image {path} is truncated or corrupt ({exc}); {fix}") from None


def _read_all(folder: Path, subjects: int, photos: int) -> np.ndarray:
    """Every photo as uint8 (subjects, photos, H, W), after checking the folder layout."""
    found = {int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _SUBJECT_DIR.match(p.name))}
    expected = set(range(1, subjects + 1))
    if found != expected:
        missing = sorted(expected - found)
        extra = sorted(found - expected)
        detail = (f"; missing s{missing[0]}" if missing else "") + (f"; unexpected s{extra[0]}" if extra else "")
        raise DataError(f"expected {subjects} subject folders s1..s{subjects} under {folder}, found {len(found)}{detail}; {_REMEDY}")
    images = []
    for s in range(1, subjects + 1):
        sub = folder / f"s{s}"
        have = sum((sub / f"{y}.pgm").is_file() for y in range(1, photos + 1))
        for y in range(1, photos + 1):
            if not (sub / f"{y}.pgm").is_file():
                raise DataError(f"ORL image {sub / f'{y}.pgm'} is missing ({have} of {photos} photos 1.pgm..{photos}.pgm in s{s}/); restore it from the original att_faces distribution")
            img = read_pgm(sub / f"{y}.pgm")
            # one shape for all: a stray photo of another size would otherwise be silently stretched
            if images and img.shape != images[0].shape:
                h, w = images[0].shape
                raise DataError(f"ORL image {sub / f'{y}.pgm'} is {img.shape[1]}×{img.shape[0]} pixels, the others {w}×{h}; replace it with the original file")
            images.append(img)
    return np.stack(images).reshape(subjects, photos, *images[0].shape)


def _resize(img: np.ndarray, image_size: int, crop: bool, resample: str) -> np.ndarray:
    """Native photo -> (image_size, image_size); ``crop`` first cuts the central square (keeps the
    face's aspect ratio, loses forehead and chin), otherwise the whole photo is squeezed."""
    im = Image.fromarray(img)
    if crop:
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), RESAMPLE[resample])
    return np.asarray(im, dtype=np.uint8)


def load_orl_faces(
    root: str | os.PathLike,
    image_size: int = 84,
    split_seed: int = 0,
    *,
    split_sizes: tuple[int, int, int] | None = None,
    crop: bool = False,
    resample: str = "bilinear",
    subjects: int = SUBJECTS,
    photos: int = PHOTOS,
) -> ClassDataset:
    """ORL faces as a class-disjoint :class:`ClassDataset` of shape (1, image_size, image_size).

    ``image_size=0`` keeps the native 112×92 photos (shape (1, 112, 92)). Split: a seeded shuffle of
    the subjects into 20/10/10 train/val/test (``split_sizes`` overrides; other subject counts get a
    quarter each for val and test). ``subjects`` / ``photos`` describe the expected layout (40 / 10;
    smaller values for test fixtures). All 400 photos (4 MB) are decoded up front in well under a
    second, so there is no on-disk cache to go stale.
    """
    check_image_options(image_size, resample, "84 is the Mini-ImageNet protocol", native=True)
    if subjects < 3 or photos < 2:
        raise DataError(f"subjects={subjects}, photos={photos} cannot make a train/val/test split; use at least 3 subjects of 2 photos")
    folder = find_att_faces(root)
    raw = _read_all(folder, subjects, photos)
    flat = raw.reshape(subjects * photos, *raw.shape[2:])
    images = flat if image_size == 0 else np.stack([_resize(im, image_size, crop, resample) for im in flat])
    if split_sizes is None:
        quarter = max(1, int(np.floor(subjects / 4 + 0.5)))  # 40 subjects -> 20/10/10
        split_sizes = (subjects - 2 * quarter, quarter, quarter)
    assign = seeded_class_split(subjects, split_sizes, split_seed, salt=SPLIT_SALT, what="subjects")
    counts = "/".join(str(int((assign == i).sum())) for i in range(3))

    def loader(ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images[ids]).to(torch.float32).div_(255.0).unsqueeze(1)

    return ClassDataset(
        name="orl-faces",
        image_shape=(1, *images.shape[1:]),
        targets=np.repeat(np.arange(subjects, dtype=np.int64), photos),
        split_kind="class",
        assignment=assign,
        loader=loader,
        # the decoded native pixels, not paths: the same photos fingerprint alike wherever they lie
        identity={"images": digest(raw, 32), "image_size": image_size, "crop": bool(crop), "resample": resample},
        num_classes=subjects,
        class_names=[f"s{s}" for s in range(1, subjects + 1)],
        example_names=[f"s{s}/{y}.pgm" for s in range(1, subjects + 1) for y in range(1, photos + 1)],
        split_description=f"seeded subject shuffle (seed {split_seed}): {counts} subjects (train/val/test), one class per subject",
    )
