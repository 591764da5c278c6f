"""The saved form of a task pool (class or sinusoid): ``STEM.safetensors`` (arrays) and ``STEM.json``
(definition, info and a checksum over definition and arrays, written last), read back with the
checksum verified; plus the seed derivation shared by the pool builders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import MetaInfluenceError, PoolError
from ..io import read_json, read_tensors, write_json, write_tensors

FORMAT = "metainfluence-task-pool"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- shared helpers
def _stem(path_stem: str | os.PathLike) -> Path:
    stem = Path(path_stem).expanduser()
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    return stem


def _hash_entropy(*parts: Any) -> int:
    """128-bit integer seed from a stable text rendering of ``parts``."""
    text = repr(parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:16], "little")


def _checksum(definition: dict, arrays: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(definition, sort_keys=True).encode())
    for k in sorted(arrays):
        t = arrays[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def save_pair(stem: str | os.PathLike, definition: dict, info: dict, arrays: dict[str, torch.Tensor]) -> Path:
    """Write ``STEM.safetensors`` then ``STEM.json`` (definition + info + checksum), both atomically.
    If the JSON cannot be written, the new tensor file is removed again, so a failed save leaves no
    partial pool behind. Returns the JSON path."""
    stem = _stem(stem)
    tpath = stem.with_name(stem.name + ".safetensors")
    jpath = stem.with_name(stem.name + ".json")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **definition, **info}
    doc["tensors_file"] = tpath.name
    doc["checksum"] = _checksum(definition, arrays)
    write_tensors(tpath, arrays)
    try:
        write_json(jpath, doc)
    except BaseException:
        try:
            tpath.unlink()
        except OSError:
            pass
        raise
    return jpath


def load_pair(stem: str | os.PathLike, kind: str, definition_keys: Sequence[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a pool pair; PoolError (one line) on any problem."""
    stem = _stem(stem)
    jpath = stem.with_name(stem.name + ".json")
    try:
        doc = read_json(jpath, what="pool definition")
    except MetaInfluenceError as exc:
        raise PoolError(str(exc)) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PoolError(f"{jpath} is not a metainfluence task-pool file; pass the .json written by pool.save")
    if doc.get("kind") != kind:
        raise PoolError(f"{jpath} holds a {doc.get('kind')!r} pool, not a {kind!r} pool; load it with the matching loader (load_pool)")
    missing = [k for k in definition_keys if k not in doc]
    if missing:
        raise PoolError(f"pool definition {jpath} lacks field(s) {', '.join(missing)}; rebuild and save the pool again")
    tname = doc.get("tensors_file") or stem.name + ".safetensors"
    tpath = jpath.with_name(Path(str(tname)).name)
    try:
        arrays = read_tensors(tpath, what="pool tensor file")
    except MetaInfluenceError as exc:
        raise PoolError(str(exc)) from None
    definition = {k: doc[k] for k in definition_keys}
    if _checksum(definition, arrays) != doc.get("checksum"):
        raise PoolError(f"pool {jpath} does not match its tensor file {tpath.name} (edited or mixed up); rebuild the pool instead of editing it")
    return doc, arrays
