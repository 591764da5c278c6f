"""Generators of small fake dataset files (official-layout Omniglot zips, idx files, Mini-ImageNet
JPEGs) for the loader tests. Everything is deterministic and written under a given folder."""

from __future__ import annotations

import csv
import gzip
import io
import struct
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

# background set: alphabet -> number of characters; evaluation set likewise
OMNI_BACKGROUND = {"Alpha": 3, "Beta_(test)": 2}
OMNI_EVALUATION = {"Gamma": 3}


def omniglot_glyph(rng: np.random.Generator, size: int) -> np.ndarray:
    """A bool image, True = white background, with a few random ink rectangles (never symmetric)."""
    img = np.ones((size, size), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(0, size - 4, size=2)
        h, w = rng.integers(2, max(3, size // 3), size=2)
        img[r : r + h, c : c + w] = False
    img[1, 2] = False  # a fixed off-centre ink pixel makes every glyph rotation-asymmetric
    return img


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # bool array -> mode "1", like the official files
    return buf.getvalue()


def make_omniglot(
    folder: Path,
    drawers: int = 4,
    size: int = 20,
    background: Mapping[str, int] = OMNI_BACKGROUND,
    evaluation: Mapping[str, int] = OMNI_EVALUATION,
    as_zip: bool = True,
    seed: int = 0,
) -> dict:
    """Write ``images_background`` / ``images_evaluation`` (zips or folders) in the official layout.

    Returns ``{"chars": [Alphabet/characterNN in loader order], "images": bool array
    (n_chars, drawers, size, size), "files": {char: [member paths]}}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chars, images = [], []
    char_id = 1
    for set_name, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        members: list[tuple[str, bytes | None]] = [(f"{set_name}/", None)]
        for alphabet in sorted(alphabets):
            members.append((f"{set_name}/{alphabet}/", None))
            for k in range(1, alphabets[alphabet] + 1):
                cname = f"character{k:02d}"
                members.append((f"{set_name}/{alphabet}/{cname}/", None))
                glyphs = []
                for d in range(1, drawers + 1):
                    g = omniglot_glyph(rng, size)
                    glyphs.append(g)
                    members.append((f"{set_name}/{alphabet}/{cname}/{char_id:04d}_{d:02d}.png", png_bytes(g)))
                chars.append(f"{alphabet}/{cname}")
                images.append(np.stack(glyphs))
                char_id += 1
        if as_zip:
            with zipfile.ZipFile(folder / f"{set_name}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, data in members:
                    if data is None:
                        zf.writestr(zipfile.ZipInfo(name), b"")
                    else:
                        zf.writestr(name, data)
        else:
            for name, data in members:
                p = folder / name
                if data is None:
                    p.mkdir(parents=True, exist_ok=True)
                else:
                    p.write_bytes(data)
    return {"chars": chars, "images": np.stack(images)}


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path = Path(str(path) + (".gz" if gz else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def make_idx(folder: Path, n_train: int = 300, n_test: int = 100, gz: bool = True, seed: int = 0, size: int = 28) -> dict:
    """Four MNIST-format idx files with balanced random labels and random pixels."""
    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        out[f"{part}_images"] = images
        out[f"{part}_labels"] = labels
        out[f"{part}_images_path"] = write_idx(Path(folder) / f"{part}-images-idx3-ubyte", images, gz)
        out[f"{part}_labels_path"] = write_idx(Path(folder) / f"{part}-labels-idx1-ubyte", labels, gz)
    return out


def truncated_rows(csv_path: Path, n_classes: int, per_class: int) -> list[tuple[str, str]]:
    """The first ``per_class`` rows of each of the first ``n_classes`` classes of a real CSV."""
    rows: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for fname, label in reader:
            if label not in counts and len(counts) == n_classes:
                continue
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                rows.append((fname, label))
    return rows


def synthetic_rows(prefix: int, n_classes: int, per_class: int) -> list[tuple[str, str]]:
    rows = []
    for c in range(n_classes):
        wnid = f"n{prefix:02d}{c:06d}"
        rows += [(f"{wnid}{i:08d}.jpg", wnid) for i in range(1, per_class + 1)]
    return rows


def make_mini_imagenet(
    root: Path,
    splits: Mapping[str, Sequence[tuple[str, str]]],
    image_hw: tuple[int, int] = (30, 40),
    write_images: bool = True,
) -> dict[str, tuple[int, int, int]]:
    """Write ``root/{train,val,test}.csv`` and one solid-colour JPEG per row under ``root/images``.
    Returns the colour of every file."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    colours = {}
    for s, rows in splits.items():
        with open(root / f"{s}.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["filename", "label"])
            w.writerows(rows)
        for i, (fname, _label) in enumerate(rows):
            colour = (int(37 * i + 11) % 256, int(91 * i + 50) % 256, int(53 * len(s) + 7 * i) % 256)
            colours[fname] = colour
            if write_images:
                Image.new("RGB", (image_hw[1], image_hw[0]), colour).save(root / "images" / fname, quality=95)
    return colours


def make_zip(path: Path, members: Mapping[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def pgm_bytes(img: np.ndarray) -> bytes:
    """Binary (P5) 8-bit PGM of a uint8 (H, W) array, written by hand like the original files."""
    h, w = img.shape
    return f"P5\n{w} {h}\n255\n".encode() + np.ascontiguousarray(img, dtype=np.uint8).tobytes()


def make_orl(root: Path, subjects: int = 8, photos: int = 3, hw: tuple[int, int] = (14, 12), seed: int = 0) -> np.ndarray:
    """Write ``root/att_faces/s1..sN/1..P.pgm`` (the real layout, tiny random photos of shape ``hw``)
    and return them as uint8 (subjects, photos, H, W). Each subject has its own mean brightness."""
    rng = np.random.default_rng(seed)
    images = np.empty((subjects, photos, *hw), dtype=np.uint8)
    for s in range(subjects):
        sub = Path(root) / "att_faces" / f"s{s + 1}"
        sub.mkdir(parents=True, exist_ok=True)
        for y in range(photos):
            images[s, y] = np.clip(rng.normal(20 + 25 * s, 10, size=hw), 0, 255).astype(np.uint8)
            (sub / f"{y + 1}.pgm").write_bytes(pgm_bytes(images[s, y]))
    return images
