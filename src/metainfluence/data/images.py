"""Decoding image files into the uint8 arrays every image dataset here hands to its loader.

One place for what Omniglot, Mini-ImageNet, ORL faces and user image folders share: the resample
filters, the check of the image-size and filter options, 8-bit conversion (16-bit grey scaled, not
clipped) and a decode pass that collects every failing file of a call instead of stopping at the
first, so that a user fixes them all in one go. Each dataset words its own errors (where the file
was listed, what to do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

RESAMPLE = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}
# what Pillow raises on a file that is not a readable image (truncated, wrong format, a bomb)
DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


def check_image_options(image_size: object, resample: str, standard: str, *, native: bool = False) -> None:
    """Refuse an image size that is not an integer ≥ 4 (``native``: 0 keeps the files' own size) or an
    unknown resample filter; ``standard`` names the usual size in the message."""
    ok = isinstance(image_size, int) and not isinstance(image_size, bool) and (image_size >= 4 or (native and image_size == 0))
    if not ok:
        native_hint = " or 0 for the native size" if native else ""
        raise DataError(f"image_size={image_size!r} is invalid; use an integer of at least 4 ({standard}){native_hint}")
    if resample not in RESAMPLE:
        raise DataError(f"unknown resample filter {resample!r}; use one of {', '.join(RESAMPLE)}")


def to_8bit(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as an 8-bit ``mode`` ('L' or 'RGB') image. 16-bit grey (PNG, TIFF) is scaled to 8 bits,
    where Pillow's own conversion would clip every value above 255 to white."""
    if im.mode.startswith("I;16"):
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.floor(wide / 257.0 + 0.5).astype(np.uint8))
    return im.convert(mode)


def decode_images(paths: Sequence[Path], image_size: int, mode: str, resample: str
                  ) -> tuple[np.ndarray, list[int], dict[int, BaseException]]:
    """Decode ``paths`` to an (n, image_size, image_size, channels) uint8 array in ``mode`` ('L' or
    'RGB'), squeezed to the square size with ``resample``. Returns the array, the positions of files
    that are gone, and the positions of files that cannot be decoded with their exceptions (their
    rows are left unset): the caller raises one error naming them all."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.uint8)
    filt = RESAMPLE[resample]
    gone: list[int] = []
    failures: dict[int, BaseException] = {}
    for j, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im = to_8bit(im, mode)
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), filt)
                out[j] = np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels)
        except FileNotFoundError:
            gone.append(j)
        except DECODE_ERRORS as exc:
            failures[j] = exc
    return out, gone, failures


def unreadable(failures: dict[Path, BaseException], one: str, many: str, remedy: str = "replace or remove") -> DataError:
    """One error for every file of a pass that failed (``one``/``many``: what is wrong with one file /
    several): the count and up to 5 of them."""
    (first, exc), n = next(iter(failures.items())), len(failures)
    if n == 1:
        return DataError(f"image {first} {one} ({exc}); {remedy} it")
    names = ", ".join(str(p) for p in list(failures)[:5]) + (f" and {n - 5} more" if n > 5 else "")
    return DataError(f"{n} images {many}: {names} (the first: {exc}); {remedy} them")
