"""Your own images: a folder of class folders, read as a class-disjoint :class:`ClassDataset`.

Two layouts of the dataset folder ``root`` (given by ``--data-root``; it is the dataset folder
itself, not a data root holding several datasets):

- **class folders** — ``root/<class name>/<image files>``: one folder per class (at least 3). The
  classes (sorted by folder name) get a seeded class-disjoint split of about 60/20/20 %
  train/val/test, every split at least one class; ``split_seed`` draws another split and
  ``split_sizes`` gives the three class counts explicitly. With ``split_by='example'`` every class is
  in every split instead and each class's images are shared out 60/20/20 (``split_sizes``: the three
  shares) — for folders with too few classes for class-disjoint N-way splits, as MNIST here; the test
  tasks then hold classes seen in training, which is not the few-shot protocol.
- **split folders** — ``root/train/<class>/…``, ``root/val/<class>/…``, ``root/test/<class>/…`` (all
  three present): the folders fix the split, so a seed or sizes are refused. A class name may
  appear in one split folder only (the splits are class-disjoint).

Image files are those ending in .png .jpg .jpeg .bmp .gif .pgm .ppm .pbm .tif .tiff .webp (any
case); hidden files and other files (README, .DS_Store) are skipped, and folders nested inside a
class folder are not read. ``color='auto'`` makes the dataset grey (1 channel) when every image
is a grey one (judged from the file headers, without decoding pixels) and RGB (3 channels)
otherwise (with a warning when a minority of colour images makes it RGB); ``'grey'`` / ``'rgb'``
force it. The images stay in the user's folder and are decoded
on demand in ``load``: converted, squeezed whole (no crop) to ``image_size``² and scaled to [0, 1].
The fingerprint covers every image's path and size, so an edited folder is another dataset.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .base import SPLITS, ClassDataset, digest, seeded_class_split, seeded_example_split
from .images import DECODE_ERRORS, check_image_options, decode_images, unreadable

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp")
COLORS: tuple[str, ...] = ("auto", "grey", "rgb")
SPLIT_BY: tuple[str, ...] = ("class", "example")
# PIL modes of single-channel images (with or without alpha); anything else counts as colour
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
SPLIT_SALT = 0x1F07  # this dataset's own split stream (see base.seeded_class_split)
_REMEDY = "point --data-root at a folder holding one folder of images per class (see README, 'Datasets')"


def is_image_file(path: Path) -> bool:
    """A visible regular file with an image extension (any case)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _holds_images(folder: Path) -> bool:
    """Whether image files lie directly inside ``folder`` (stops at the first one)."""
    return any(is_image_file(p) for p in folder.iterdir())


def _listing(folders: list[Path], most: int = 3) -> str:
    return ", ".join(p.name + "/" for p in folders[:most]) + (", …" if len(folders) > most else "")


def _looks_like_dataset(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that make it a dataset of its own: its class folders (subfolders
    holding images directly) or its train/, val/, test/ split folders; empty when it is neither."""
    nested = _subfolders(folder)
    if all((folder / s).is_dir() for s in SPLITS) and any(_holds_images(c) for c in _subfolders(folder / "train")):
        return [folder / s for s in SPLITS]
    return [d for d in nested if _holds_images(d)]


def _refuse_one_level_up(root: Path, class_dirs: list[Path]) -> None:
    """Refuse a root one level above the dataset (e.g. /data holding faces/person_01/*.png): none of
    its would-be class folders holds images directly, but one of them is a dataset of its own."""
    if any(_holds_images(d) for d in class_dirs):
        return  # a real class folder among them: an odd folder is named by _class_images
    for d in class_dirs:
        inner = _looks_like_dataset(d)
        if inner:
            others = [o for o in class_dirs if o != d]
            raise DataError(
                f"{root} looks like a folder of datasets (or one level above the dataset): {d.name}/ holds no images itself, but "
                f"its subfolders ({_listing(inner)}) hold them; pass --data-root {d}"
                + (f" (or another of {root}'s folders: {_listing(others)})" if others else ""))


def _class_images(folder: Path, split_layout: bool = False) -> list[Path]:
    """The image files directly inside a class folder, sorted by name; DataError naming the folder
    when it holds none (saying so when it holds only subfolders, which are not read)."""
    images = sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)
    if not images:
        nested = _subfolders(folder)
        with_images = _looks_like_dataset(folder) if nested else []
        if with_images and split_layout:
            raise DataError(
                f"class folder {folder} holds no images, only subfolders that do ({_listing(with_images)}); folders inside a class "
                f"folder are not read, so make each of them a class folder directly in {folder.parent}, or move their images up into "
                f"{folder} if they are parts of one class")
        if with_images:
            raise DataError(
                f"class folder {folder} holds no images, only subfolders that do ({_listing(with_images)}); if {folder} is a dataset of "
                f"its own ({folder.parent} one level above it), pass --data-root {folder}; if they are parts of one class, move their "
                f"images up into {folder} (folders inside a class folder are not read)")
        if nested:
            raise DataError(
                f"class folder {folder} holds no images, only subfolders ({_listing(nested)}); folders inside a class folder are not "
                f"read, so move the images up into {folder} or remove the folder")
        raise DataError(f"class folder {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
    return images


def _split_layout(root: Path) -> bool:
    """True when ``root`` holds the train/, val/, test/ split folders. Some of them without the others
    is refused: such a folder would otherwise be read as a class named 'train'."""
    present = [s for s in SPLITS if (root / s).is_dir()]
    if len(present) == len(SPLITS):
        return True
    # a lone 'train' (etc.) folder with images directly inside is just a class of that name
    splitlike = [s for s in present if _subfolders(root / s) and not any(is_image_file(p) for p in (root / s).iterdir())]
    if splitlike:
        missing = [s + "/" for s in SPLITS if s not in present]
        raise DataError(
            f"{root} has the split folder(s) {', '.join(s + '/' for s in present)} but no {', '.join(missing)}; give all three of "
            f"train/, val/, test/ (each holding class folders), or put the class folders directly in {root} for a seeded split")
    return False


# folders of the other datasets: a data root holding them (e.g. $METAINFLUENCE_DATA) is not an image folder
_OTHER_DATASETS = frozenset({"omniglot", "mnist", "fashion-mnist", "mini-imagenet", "orl-faces", "att_faces"})


def _refuse_data_root(root: Path, class_dirs: list[Path]) -> None:
    """Refuse a data root holding other datasets, which would otherwise be read as classes named 'mnist'..."""
    others = [d.name for d in class_dirs if d.name in _OTHER_DATASETS and not any(is_image_file(p) for p in d.iterdir())]
    if others:
        raise DataError(
            f"{root} looks like a data folder holding other datasets ({', '.join(o + '/' for o in others)}), not a folder of "
            f"class folders; pass --data-root with your image folder itself (image-folder does not look for a subfolder)")


def _check_options(image_size: object, color: str, resample: str) -> str:
    check_image_options(image_size, resample, "84 is the Mini-ImageNet protocol")
    key = str(color).lower()
    key = "grey" if key == "gray" else key
    if key not in COLORS:
        raise DataError(f"unknown color {color!r}; use auto (grey when every image is grey, else RGB), grey or rgb")
    return key


def _grey_palette(im: Image.Image) -> bool:
    """A palette image whose every entry is grey (r = g = b): grey, though its mode is not."""
    if im.mode not in ("P", "PA"):
        return False
    pal = im.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def _colour_files(paths: list[Path]) -> list[Path]:
    """The colour (not single-channel) images among ``paths``, from the headers only (Image.open
    decodes no pixels); every unreadable file is named in one DataError."""
    colour: list[Path] = []
    failures: dict[Path, BaseException] = {}
    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode not in GREY_MODES and not _grey_palette(im):
                    colour.append(path)
        except DECODE_ERRORS as exc:
            failures[path] = exc
    if failures:
        raise unreadable(failures, "cannot be read as an image", "cannot be read as images")
    return colour


def _auto_grey(files: list[Path]) -> bool:
    """``color='auto'``: grey when every image is grey. A minority of colour images still makes the
    dataset RGB (3× the memory): warned, with how to force grey. A folder of mostly colour images
    (judged from ~256 headers spread over it) is RGB without reading every header."""
    step = max(1, len(files) // 256)
    colour = _colour_files(files[::step])
    if 2 * len(colour) >= len(files[::step]):
        return False
    if step > 1:
        colour = _colour_files(files)
    if colour and 2 * len(colour) < len(files):
        warnings.warn(
            f"image-folder: {len(colour)} of the {len(files)} images are colour (the first: {colour[0]}) and the other "
            f"{len(files) - len(colour)} grey, so the dataset is RGB (3 channels, 3× the memory) because of them; pass --color grey "
            f"(color='grey' in Python) to read every image as grey, or --color rgb to keep RGB without this warning", stacklevel=3)
    return not colour


def _default_sizes(n: int) -> tuple[int, int, int]:
    """About 60/20/20 % of ``n`` classes, at least one in each split (n ≥ 3)."""
    fifth = max(1, int(np.floor(n / 5 + 0.5)))
    return (n - 2 * fifth, fifth, fifth)


def load_image_folder(
    root: str | os.PathLike,
    image_size: int = 84,
    split_seed: int = 0,
    *,
    split_sizes: tuple[int, int, int] | None = None,
    color: str = "auto",
    resample: str = "bilinear",
    split_by: str = "class",
) -> ClassDataset:
    """The images under ``root`` as a class-disjoint :class:`ClassDataset` named ``'image-folder'`` of
    shape (C, image_size, image_size), C = 1 (grey) or 3 (RGB); see the module docstring for the two
    layouts. Class ids follow the sorted class folders (split folders: train's classes, then val's,
    then test's), example ids the sorted files of each class."""
    color = _check_options(image_size, color, resample)
    if split_by not in SPLIT_BY:
        raise DataError(f"unknown split_by {split_by!r}; use class (class-disjoint splits) or example (every class in every split)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; {_REMEDY}")
    class_dirs: list[Path] = []
    class_split: list[int] = []
    if _split_layout(root):
        if split_by == "example":
            raise DataError(f"the folder {root} splits its classes by train/, val/, test/, so split_by example does not apply; "
                            f"drop --split-by, or put the class folders directly in {root}")
        if split_seed != 0 or split_sizes is not None:
            what = f"split_seed {split_seed}" if split_seed != 0 else f"split_sizes {tuple(split_sizes)}"
            raise DataError(
                f"the folder {root} fixes its splits (train/, val/, test/), so {what} would have no effect; "
                f"drop --split-seed (or split_seed / split_sizes in Python), or put the class folders directly in {root} for a seeded split")
        first_seen: dict[str, str] = {}
        for s_idx, s in enumerate(SPLITS):
            dirs = _subfolders(root / s)
            if not dirs:
                raise DataError(f"split folder {root / s} holds no class folders; put one folder of images per class there")
            for d in dirs:
                if d.name in first_seen:
                    raise DataError(
                        f"class {d.name!r} has folders in both {root / first_seen[d.name] / d.name} and {d}; the splits must be "
                        f"class-disjoint, so merge its images into one split folder (or rename one class)")
                first_seen[d.name] = s
            class_dirs += dirs
            class_split += [s_idx] * len(dirs)
        assign = np.asarray(class_split, dtype=np.int8)
        counts = "/".join(str(class_split.count(i)) for i in range(3))
        description = f"fixed by the train/, val/, test/ folders: {counts} classes (train/val/test)"
        layout = "split-folders"
    else:
        class_dirs = _subfolders(root)
        _refuse_data_root(root, class_dirs)
        _refuse_one_level_up(root, class_dirs)
        if len(class_dirs) < 3:
            loose = sum(is_image_file(p) for p in root.iterdir())
            found = f"{len(class_dirs)} class folder{'s' if len(class_dirs) != 1 else ''}" + (f" and {loose} loose images" if loose else "")
            raise DataError(
                f"image folder {root} holds {found}; a train/val/test split of classes needs at least 3 class folders "
                f"(one folder of images per class, e.g. {root / 'cat'}/1.png), or train/, val/, test/ folders holding them")
        layout = "class-folders"
        if split_by == "class":
            n = len(class_dirs)
            sizes = _default_sizes(n) if split_sizes is None else split_sizes
            assign = seeded_class_split(n, sizes, split_seed, salt=SPLIT_SALT, what="class folders")
            counts = "/".join(str(int((assign == i).sum())) for i in range(3))
            unused = int((assign < 0).sum())
            description = f"seeded class shuffle (seed {split_seed}): {counts} classes (train/val/test) from class folders" + (
                f", {unused} in no split" if unused else "")

    split_layout = layout == "split-folders"
    if split_layout:
        _refuse_data_root(root, class_dirs)
    files: list[Path] = []
    targets: list[int] = []
    for c, d in enumerate(class_dirs):
        images = _class_images(d, split_layout)
        files += images
        targets += [c] * len(images)
    split_kind = "class"
    if split_by == "example":
        # every class in every split, disjoint images (as MNIST here): for folders with too few classes for
        # class-disjoint N-way splits; the test tasks then hold classes seen in training
        fractions = (0.6, 0.2, 0.2) if split_sizes is None else tuple(float(v) for v in split_sizes)  # shares here, not counts
        assign = seeded_example_split(np.asarray(targets), fractions, split_seed)
        split_kind = "example"
        description = (f"seeded example split (seed {split_seed}) within each of the {len(class_dirs)} class folders: "
                       + "/".join(f"{f:g}" for f in fractions) + " of each class's images (train/val/test), every class in every split")
        layout += "/example-split"
    grey = _auto_grey(files) if color == "auto" else color == "grey"
    mode, channels = ("L", 1) if grey else ("RGB", 3)
    names = [p.relative_to(root).as_posix() for p in files]
    listing = sorted((name, p.stat().st_size) for name, p in zip(names, files))

    def loader(ids: np.ndarray) -> torch.Tensor:
        paths = [files[int(i)] for i in ids]
        out, gone_at, failed_at = decode_images(paths, image_size, mode, resample)
        gone = [paths[j] for j in gone_at]
        failures = {paths[j]: exc for j, exc in failed_at.items()}
        if gone:
            what = f"image {gone[0]} has" if len(gone) == 1 else f"{len(gone)} images ({', '.join(map(str, gone[:5]))}{', …' if len(gone) > 5 else ''}) have"
            also = f" ({len(failures)} more cannot be decoded)" if failures else ""
            it = "it" if len(gone) == 1 else "them"
            raise DataError(f"{what} gone since the folder was read{also}; put {it} back, or rerun so that {root} is read again")
        if failures:
            # a file whose header read well but whose pixels do not (e.g. cut short): check every file of the folder now,
            # in batches, so that one message names them all rather than one per run
            for start in range(0, len(files), 512):
                batch = files[start:start + 512]
                failures.update({batch[j]: exc for j, exc in decode_images(batch, image_size, mode, resample)[2].items()})
            raise unreadable(failures, "cannot be decoded", "cannot be decoded")
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)

    return ClassDataset(
        name="image-folder",
        image_shape=(channels, image_size, image_size),
        targets=np.asarray(targets, dtype=np.int64),
        split_kind=split_kind,
        assignment=assign,
        loader=loader,
        identity={"files": digest(listing, 32), "layout": layout, "image_size": image_size, "color": color, "resample": resample},
        num_classes=len(class_dirs),
        example_names=names,
        class_names=[d.name for d in class_dirs],
        split_description=description,
    )
