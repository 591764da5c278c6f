"""Atomic, pickle-free storage: tensors in safetensors, everything else in JSON.

A result is a pair ``NAME.safetensors`` + ``NAME.json``. Both are written to a temporary file in the
same folder and moved into place with ``os.replace``, so a crash never leaves a half-written file
under the final name. Nothing here ever unpickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .errors import CheckpointError, SettingsError

FORMAT_VERSION = 1


def _check_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create output folder {folder}: {exc.strerror or exc}; choose a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise SettingsError(f"output folder {folder} is not writable; choose a writable folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    _check_writable_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise SettingsError(f"cannot write into output folder {path.parent}: {exc.strerror or exc}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise SettingsError(f"cannot write {path}: {exc.strerror or exc}; free disk space or choose a writable folder") from None
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, paths, tensors and numpy scalars into plain JSON values.

    Non-finite floats become strings ("nan", "inf") so the JSON stays standard.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return to_jsonable(obj.item())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({exc}); it may be truncated — regenerate it") from None


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a flat dict of tensors as safetensors, atomically."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(clean, metadata=dict(metadata) if metadata else None)
    return atomic_write_bytes(path, data)


def read_tensors(path: str | os.PathLike, what: str = "tensor file") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    try:
        return load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{what} {path} is not a readable safetensors file ({exc}); it may be truncated — regenerate it") from None


def save_result(stem: str | os.PathLike, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> tuple[Path, Path]:
    """Save ``stem.safetensors`` and ``stem.json`` (the JSON is written last: its presence marks completion)."""
    stem = Path(stem)
    info = dict(info)
    info.setdefault("format_version", FORMAT_VERSION)
    info.setdefault("tensors_file", stem.name + ".safetensors")
    # the tensors file read alone still says what its numbers mean (the JSON beside it says everything)
    meaning = {k: str(info[k]) for k in ("kind", "sign_convention", "units") if info.get(k)}
    tpath = write_tensors(stem.with_name(stem.name + ".safetensors"), tensors, metadata=meaning)
    jpath = write_json(stem.with_name(stem.name + ".json"), info)
    return tpath, jpath


def load_result(stem: str | os.PathLike, what: str = "result") -> tuple[dict[str, torch.Tensor], dict]:
    stem = Path(stem)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    info = read_json(stem.with_name(stem.name + ".json"), what=what)
    tensors = read_tensors(stem.with_name(stem.name + ".safetensors"), what=what)
    return tensors, info


def fingerprint(obj: Any, length: int = 16) -> str:
    """The library's one fingerprint: a short stable hex SHA-256 of a JSON-able object whose leaves may
    be numpy arrays or tensors (hashed by dtype, shape and bytes). Every artifact records the
    fingerprint of what it was computed from, so a mismatch is caught instead of silently reused."""
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            h.update(f"ndarray:{a.dtype.str}:{a.shape}:".encode())
            h.update(a.tobytes())
        elif isinstance(o, torch.Tensor):
            feed(o.detach().cpu().numpy())
        elif isinstance(o, Mapping):
            h.update(b"{")
            for k in sorted(o):
                h.update(json.dumps(str(k)).encode() + b":")
                feed(o[k])
                h.update(b",")
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                feed(v)
                h.update(b",")
            h.update(b"]")
        else:
            h.update(json.dumps(o, sort_keys=True).encode())

    feed(obj)
    return h.hexdigest()[:length]
