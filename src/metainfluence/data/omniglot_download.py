"""Downloading the official Omniglot archives (checksum-verified) and extracting zip archives safely
(no member written outside the target folder; nothing left behind on failure)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Mapping

from ..errors import DataError
from .base import file_sha256
from .omniglot import SETS

OFFICIAL_URLS = {
    "images_background": "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
    "images_evaluation": "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
}
# md5 of the official downloads (the values every Omniglot downloader checks, e.g. torchvision).
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# sha256 of the archives rebuilt in the official layout (shared/data/omniglot/official_layout):
# same images, different PNG/zip bytes.
KNOWN_SHA256 = {
    "images_background": "ead9910c357b494863112b07d9870e25b07a8da28d70a0843762c342c5c275d6",
    "images_evaluation": "62ee15f5610c25fa95717b97f005fb60cf06967fdfbe20865c1afd77c35d0c2d",
}

# --------------------------------------------------------------------------- download / extract
def safe_extract_zip(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract ``archive`` into ``target``, refusing (before writing anything) any member whose
    path is absolute, contains '..', or otherwise resolves outside ``target``, and any symlink."""
    archive, target = Path(archive), Path(target).expanduser()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"archive {archive} is not a readable zip ({exc}); download it again") from None
    with zf:
        root = target.resolve()
        plan = []
        for info in zf.infolist():
            name = info.filename
            dest = (root / name).resolve()
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in PurePosixPath(name.replace("\\", "/")).parts or is_link or (dest != root and root not in dest.parents):
                raise DataError(f"archive {archive} member {name!r} would be written outside {target}; refusing to extract this archive")
            plan.append((info, dest))
        # Each member goes to a temporary name and is renamed into place once complete; if any member
        # fails, everything this call wrote (files and the folders it created) is removed again.
        written: list[Path] = []
        fresh: list[Path] = []  # written files that did not exist before this call
        created: list[Path] = []
        mask = os.umask(0)
        os.umask(mask)

        def make_dirs(d: Path) -> None:
            missing = []
            while not d.exists():
                missing.append(d)
                d = d.parent
            for m in reversed(missing):
                m.mkdir()
                created.append(m)

        try:
            for info, dest in plan:
                if info.is_dir():
                    make_dirs(dest)
                    continue
                make_dirs(dest.parent)
                existed = dest.exists()
                fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
                try:
                    with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; extract with the usual mode
                    os.replace(tmp, dest)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
                written.append(dest)
                if not existed:
                    fresh.append(dest)
        except BaseException as exc:
            for p in fresh:
                p.unlink(missing_ok=True)
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    pass
            if isinstance(exc, (zipfile.BadZipFile, EOFError, zlib.error, ValueError)):
                raise DataError(f"archive {archive} is corrupt ({exc}); download it again") from None
            if isinstance(exc, OSError):
                raise DataError(f"cannot extract {archive} into {target} ({exc.strerror or exc}); choose a writable folder") from None
            raise
    return written


def _checksum_ok(path: Path, set_name: str, checksums: Mapping[str, str] | None) -> bool:
    if checksums is not None:
        return file_sha256(path) == checksums[set_name]
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return md5 == OFFICIAL_MD5[set_name] or file_sha256(path) == KNOWN_SHA256[set_name]


def download_omniglot(
    root: str | os.PathLike,
    extract: bool = True,
    *,
    urls: Mapping[str, str] | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> dict[str, Path]:
    """Download the two official Omniglot archives into ``root`` (needs network) and verify them.

    An archive is accepted when its md5 equals the official download's (the value torchvision and
    other loaders check) or its sha256 equals the known rebuilt copy; ``checksums`` (set name ->
    sha256) overrides both. Files already present and valid are not downloaded again. With
    ``extract=True`` each archive is also unpacked into ``root`` by :func:`safe_extract_zip`.
    Returns the archive paths.
    """
    import urllib.error
    import urllib.request

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    urls = dict(OFFICIAL_URLS if urls is None else urls)
    out: dict[str, Path] = {}
    for s in SETS:
        dest = root / f"{s}.zip"
        if not (dest.is_file() and _checksum_ok(dest, s, checksums)):
            fd, tmp = tempfile.mkstemp(prefix=f".{s}.", suffix=".part", dir=root)
            try:
                with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(urls[s], timeout=timeout) as resp:
                    shutil.copyfileobj(resp, fh)
                if not _checksum_ok(Path(tmp), s, checksums):
                    raise DataError(f"downloaded {urls[s]} fails its checksum; retry, or download it by hand into {root}")
                os.replace(tmp, dest)
            except (urllib.error.URLError, OSError) as exc:
                raise DataError(f"cannot download {urls[s]} ({exc}); check the network or download it by hand into {root}") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if extract and not (root / s).is_dir():
            safe_extract_zip(dest, root)
        out[s] = dest
    return out

