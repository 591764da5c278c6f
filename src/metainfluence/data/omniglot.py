"""Omniglot (Lake et al. 2015) from the official archives: locating, decoding, caching and splitting.
Downloading and extracting the archives: :mod:`.omniglot_download`.

Source layout (any of these, looked up in ``root``, ``root/official_layout``, ``root/omniglot`` and
``root/omniglot/official_layout``):

- ``images_background.zip`` and ``images_evaluation.zip`` (the official archives), or
- the extracted folders ``images_background/`` and ``images_evaluation/``,

each holding ``images_<set>/<Alphabet>/characterNN/NNNN_DD.png``. Characters are ordered by
(set: background then evaluation, alphabet name, character folder name); drawers by file name.

Images are resized to ``image_size``×``image_size`` and inverted (ink = 1, background = 0). With
``rotations=True`` every character gives four classes, (character, 0°/90°/180°/270°); class id =
4·character + r, example id = 4·image + r, and the rotation is applied lazily in ``load``.
The decoded, resized uint8 images are cached as an ``.npz`` file (no pickle) keyed by the archive
digests, the image size and the resampling filter.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, MetaInfluenceError
from ..io import atomic_write_bytes
from .base import SPLITS, UNASSIGNED, ClassDataset, default_cache_dir, digest, file_sha256, seeded_class_split
from .images import RESAMPLE, check_image_options

SETS = ("images_background", "images_evaluation")
DEFAULT_SPLIT_SIZES = (1100, 100, 423)
CACHE_VERSION = 2  # 2: the file of every image (example_names)
_CHAR_DIR = re.compile(r"^character\d+$")
_ROT_LINE = re.compile(r"^(?P<char>[^/\s]+/[^/\s]+)(?:/rot(?P<rot>\d{3}))?$")


# --------------------------------------------------------------------------- locating the sources
def _candidate_dirs(root: Path) -> list[Path]:
    return [root, root / "official_layout", root / "omniglot", root / "omniglot" / "official_layout"]


def find_sources(root: str | os.PathLike) -> dict[str, Path]:
    """Path of the archive (or extracted folder) of each set; DataError if a set is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Omniglot folder {root} does not exist; pass the folder holding images_background.zip and images_evaluation.zip")
    found: dict[str, Path] = {}
    for s in SETS:
        for d in _candidate_dirs(root):
            if (d / f"{s}.zip").is_file():
                found[s] = d / f"{s}.zip"
                break
            if (d / s).is_dir():
                found[s] = d / s
                break
        if s not in found:
            raise DataError(
                f"Omniglot archive {s}.zip (or folder {s}/) not found under {root}; "
                "download it with metainfluence.data.download_omniglot(root) or point root at the folder that holds it"
            )
    return found


def _source_identity(path: Path) -> dict:
    if path.is_file():
        return {"kind": "zip", "size": path.stat().st_size, "sha256": file_sha256(path)}
    # keyed by every file's name AND content (not sizes): an edited image must not reuse a stale cache
    files = sorted(p for p in path.rglob("*.png"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return {"kind": "folder", "files": len(files), "contents": h.hexdigest()[:32]}


# --------------------------------------------------------------------------- decoding
def _png_entries(path: Path, set_name: str) -> list[tuple[str, str, str, object]]:
    """(alphabet, character, file name, handle) of every PNG of one set, in sorted order."""
    entries = []
    if path.is_file():
        try:
            zf = zipfile.ZipFile(path)
            names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"Omniglot archive {path} is not a readable zip ({exc}); delete it and download it again") from None
        for n in names:
            parts = PurePosixPath(n).parts
            if len(parts) == 4 and parts[0] == set_name and parts[3].lower().endswith(".png") and _CHAR_DIR.match(parts[2]):
                entries.append((parts[1], parts[2], parts[3], (zf, n)))
    else:
        for p in path.glob("*/*/*.png"):
            if _CHAR_DIR.match(p.parent.name):
                entries.append((p.parent.parent.name, p.parent.name, p.name, p))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    if not entries:
        raise DataError(f"Omniglot source {path} holds no images under {set_name}/<Alphabet>/characterNN/*.png; check that it is the official archive")
    return entries


def _read_bytes(handle: object, source: Path) -> bytes:
    try:
        if isinstance(handle, tuple):
            zf, name = handle
            return zf.read(name)
        return Path(handle).read_bytes()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        member = handle[1] if isinstance(handle, tuple) else handle
        raise DataError(f"Omniglot archive {source} is corrupt (cannot read {member}: {exc}); download it again") from None


def resize_ink(img: Image.Image, image_size: int, resample: str = "lanczos") -> np.ndarray:
    """The exact transform applied to every Omniglot PNG: grey, resize, invert (ink = 255)."""
    grey = img.convert("L")
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), RESAMPLE[resample])
    return 255 - np.asarray(grey, dtype=np.uint8)


def _decode(sources: Mapping[str, Path], image_size: int, resample: str) -> dict[str, np.ndarray]:
    images, char_of_image, char_names, files = [], [], [], []
    for s in SETS:
        entries = _png_entries(sources[s], s)
        try:
            for alphabet, character, fname, handle in entries:
                key = f"{alphabet}/{character}"
                if not char_names or char_names[-1] != key:
                    char_names.append(key)
                data = _read_bytes(handle, sources[s])
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        images.append(resize_ink(im, image_size, resample))
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                    raise DataError(f"Omniglot image {alphabet}/{character}/{fname} in {sources[s]} cannot be decoded ({exc}); download the archive again") from None
                char_of_image.append(len(char_names) - 1)
                files.append(f"{s}/{key}/{fname}")
        finally:
            if isinstance(entries[0][3], tuple):
                entries[0][3][0].close()
    if len(set(char_names)) != len(char_names):
        raise DataError("Omniglot background and evaluation archives share a character folder name; check that they are the official archives")
    return {
        "images": np.stack(images).astype(np.uint8),
        "char_of_image": np.asarray(char_of_image, dtype=np.int32),
        "char_names": np.asarray(char_names, dtype=str),
        "files": np.asarray(files, dtype=str),
    }


def _load_cached(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("images", "char_of_image", "char_names", "files")}
        if out["images"].dtype != np.uint8 or not len(out["images"]) == len(out["char_of_image"]) == len(out["files"]):
            raise ValueError("inconsistent arrays")
        return out
    except Exception as exc:  # unreadable cache: rebuild it
        warnings.warn(f"ignoring unreadable Omniglot cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None


def _decoded(sources: Mapping[str, Path], image_size: int, resample: str, cache_dir, cache: bool, identity: dict) -> dict[str, np.ndarray]:
    key = digest({"v": CACHE_VERSION, "sources": identity, "size": image_size, "resample": resample}, 20)
    path = default_cache_dir(cache_dir) / f"omniglot-{image_size}px-{resample}-{key}.npz"
    if cache and path.is_file():
        got = _load_cached(path)
        if got is not None:
            return got
    arrays = _decode(sources, image_size, resample)
    if cache:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except (MetaInfluenceError, OSError) as exc:
            warnings.warn(f"could not write the Omniglot cache {path} ({exc}); continuing without it", stacklevel=3)
    return arrays


# --------------------------------------------------------------------------- splits
def read_split_file(split_file: str | os.PathLike | Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """Read a Vinyals-format split: ``{'Alphabet/characterNN': split}``.

    ``split_file`` is a folder holding ``train.txt``, ``val.txt`` and ``test.txt`` (lines
    ``Alphabet/characterNN/rot000``; rotation suffix optional), or a mapping split -> file.
    Rotations of a character must all be in the same split.
    """
    if isinstance(split_file, Mapping):
        files = {k: Path(v) for k, v in split_file.items()}
        bad = set(files) - set(SPLITS)
        if bad:
            raise DataError(f"split file mapping has unknown split(s) {sorted(bad)}; use train, val, test")
    else:
        folder = Path(split_file).expanduser()
        if folder.is_file():
            raise DataError(f"split_file {folder} is a file; pass the folder holding train.txt, val.txt, test.txt (or a mapping split -> file)")
        if not folder.is_dir():
            raise DataError(f"split folder {folder} does not exist; pass a folder holding train.txt, val.txt, test.txt")
        files = {s: folder / f"{s}.txt" for s in SPLITS if (folder / f"{s}.txt").is_file()}
        if not files:
            raise DataError(f"split folder {folder} holds none of train.txt, val.txt, test.txt; pass the Vinyals split folder")
    out: dict[str, str] = {}
    for split, f in files.items():
        if not f.is_file():
            raise DataError(f"split file {f} does not exist; check the path")
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _ROT_LINE.match(line)
            if not m or (m.group("rot") and int(m.group("rot")) not in (0, 90, 180, 270)):
                raise DataError(f"split file {f} line {lineno} {line!r} is not 'Alphabet/characterNN/rotDDD'; fix the line")
            char = m.group("char")
            if out.get(char, split) != split:
                raise DataError(f"character {char} is in both {out[char]} and {split} split files; a character and its rotations must be in one split")
            out[char] = split
    return out


def _split_characters(char_names: np.ndarray, split_seed: int, split_file, split_sizes) -> tuple[np.ndarray, str]:
    n = len(char_names)
    assign = np.full(n, UNASSIGNED, dtype=np.int8)
    if split_file is not None:
        mapping = read_split_file(split_file)
        index = {str(c): i for i, c in enumerate(char_names)}
        missing = [c for c in mapping if c not in index]
        if missing:
            raise DataError(f"split file names {len(missing)} character(s) absent from the archives (first: {missing[0]}); use a split file for these archives")
        for c, s in mapping.items():
            assign[index[c]] = SPLITS.index(s)
        counts = [int((assign == i).sum()) for i in range(3)]
        return assign, f"user split file: {counts[0]}/{counts[1]}/{counts[2]} characters (train/val/test), {int((assign < 0).sum())} unassigned"
    if split_sizes is None:
        if n == 1623:
            split_sizes = DEFAULT_SPLIT_SIZES
        else:  # proportional to 1100/100/423 (fixtures, subsets)
            n_val = max(1, int(np.floor(n * 100 / 1623 + 0.5)))
            n_test = max(1, int(np.floor(n * 423 / 1623 + 0.5)))
            split_sizes = (n - n_val - n_test, n_val, n_test)
    assign = seeded_class_split(n, split_sizes, split_seed, salt=0x0A11, what="characters")
    a, b, c = (int((assign == i).sum()) for i in range(3))
    return assign, f"seeded character shuffle (seed {split_seed}): {a}/{b}/{c} characters (train/val/test)"


# --------------------------------------------------------------------------- the loader
def load_omniglot(
    root: str | os.PathLike,
    image_size: int = 28,
    rotations: bool = True,
    split_seed: int = 0,
    split_file: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    *,
    split_sizes: tuple[int, int, int] | None = None,
    resample: str = "lanczos",
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> ClassDataset:
    """Omniglot as a class-disjoint :class:`ClassDataset` (see the module docstring).

    Split: a seeded shuffle of the characters into 1100/100/423 train/val/test characters
    (``split_sizes`` overrides; other character counts are split in the same proportions), or the
    Vinyals-format ``split_file`` folder (characters it does not list are in no split). The four
    rotations of a character are always in the same split.
    """
    check_image_options(image_size, resample, "28 is standard")
    sources = find_sources(root)
    identity = {s: _source_identity(p) for s, p in sources.items()}
    arrays = _decoded(sources, image_size, resample, cache_dir, cache, identity)
    images, char_of_image, char_names = arrays["images"], arrays["char_of_image"].astype(np.int64), arrays["char_names"]
    char_assign, description = _split_characters(char_names, split_seed, split_file, split_sizes)

    n_rot = 4 if rotations else 1
    targets = (char_of_image[:, None] * n_rot + np.arange(n_rot)[None, :]).reshape(-1)
    class_assign = np.repeat(char_assign, n_rot)
    rot_names = ["rot000", "rot090", "rot180", "rot270"][:n_rot]
    class_names = [f"{c}/{r}" for c in char_names for r in rot_names]
    # example id = image × rotations + rotation: the archive member it came from, so that score tables name files
    example_names = [f"{f} ({r})" if rotations else str(f) for f in arrays["files"] for r in rot_names]

    def loader(ids: np.ndarray) -> torch.Tensor:
        base = images[ids // n_rot]
        rot = ids % n_rot
        out = np.empty((len(ids), image_size, image_size), dtype=np.uint8)
        for k in range(n_rot):
            sel = rot == k
            if sel.any():
                out[sel] = np.rot90(base[sel], k=k, axes=(1, 2))
        return torch.from_numpy(out).to(torch.float32).div_(255.0).unsqueeze(1)

    return ClassDataset(
        name="omniglot",
        image_shape=(1, image_size, image_size),
        targets=targets,
        split_kind="class",
        assignment=class_assign,
        loader=loader,
        # content, not container: the same images give the same fingerprint from zips or folders
        identity={
            "images": digest(images, 32),
            "characters": digest(char_of_image, 32),
            "names": digest([str(c) for c in char_names], 32),
            "image_size": image_size,
            "resample": resample,
            "rotations": bool(rotations),
        },
        num_classes=len(char_names) * n_rot,
        class_names=class_names,
        example_names=example_names,
        split_description=description + (", each character's 4 rotations in its split" if rotations else ""),
    )
