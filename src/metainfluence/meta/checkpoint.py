"""Checkpoints of the meta-parameters λ: safetensors + JSON, written atomically, never unpickled.

A checkpoint ``STEM`` is the pair ``STEM.safetensors`` (λ under the key ``"lam"``, plus optional
optimiser state under ``"state.*"``) and ``STEM.json`` (a readable copy of the record). The full JSON
record is *also* stored inside the safetensors header, so the ``.safetensors`` file alone is a
complete, self-describing checkpoint written by one atomic rename: a crash while saving leaves the
previous checkpoint loadable. :func:`load_checkpoint` reads the embedded record (the sidecar JSON is
for people and other tools) and checks:

- the file is a readable safetensors file with a metainfluence record (else truncated/corrupt);
- λ's bytes match the SHA-256 in the record;
- with ``expected_problem``: the parameter names and shapes (ParamSpec) are the model's;
- with ``expected_pool``: the recorded training-pool fingerprint is the pool's.

Each refusal is a one-line :class:`~metainfluence.errors.CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from ..io import FORMAT_VERSION as IO_FORMAT_VERSION
from ..io import read_tensors, to_jsonable, write_json, write_tensors
from ..tasks.tensors import TaskTensors
from .objective import MetaProblem
from .params import ParamSpec

FORMAT = "metainfluence-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "metainfluence_record"


# --------------------------------------------------------------------------- fingerprints
def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())


def tensors_fingerprint(tasks: TaskTensors) -> str:
    """SHA-256 (first 16 hex digits) of a pool's tensors. Floating tensors are hashed as float32 and
    integer labels as int64, so a pool cast to float64 for training keeps its fingerprint."""
    h = hashlib.sha256(b"metainfluence-task-tensors:")
    for name in ("support_x", "support_y", "query_x", "query_y"):
        t = getattr(tasks, name)
        t = t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64)
        _hash_tensor(h, name, t)
    return h.hexdigest()[:16]


def pool_fingerprint(pool: Any) -> str:
    """Fingerprint of a task pool: its definition (which includes the dataset fingerprint) and its
    arrays (task ids, example ids, labels) for a :class:`~metainfluence.tasks.TaskPool` or sinusoid
    pool; :func:`tensors_fingerprint` for :class:`TaskTensors`; a string is returned as given."""
    if isinstance(pool, str):
        return pool
    if isinstance(pool, TaskTensors):
        return tensors_fingerprint(pool)
    if hasattr(pool, "definition") and dataclasses.is_dataclass(pool):
        h = hashlib.sha256(b"metainfluence-task-pool:")
        h.update(json.dumps(to_jsonable(pool.definition()), sort_keys=True).encode())
        for f in dataclasses.fields(pool):
            v = getattr(pool, f.name)
            if isinstance(v, torch.Tensor):
                _hash_tensor(h, f.name, v)
        return h.hexdigest()[:16]
    raise CheckpointError(f"cannot fingerprint a {type(pool).__name__}; pass a TaskPool, a sinusoid pool, TaskTensors or a fingerprint string")


def pool_record(pool: Any, tasks: TaskTensors | None = None, file: str | None = None) -> dict:
    """What a checkpoint says about one pool: fingerprint(s), definition, size and summary."""
    rec: dict[str, Any] = {}
    if isinstance(pool, TaskTensors):
        tasks = pool if tasks is None else tasks
        rec["kind"] = "tensors"
    elif pool is not None:
        rec["kind"] = "pool"
        rec["fingerprint"] = pool_fingerprint(pool)
        rec["definition"] = to_jsonable(pool.definition())
        if hasattr(pool, "summary"):
            rec["summary"] = pool.summary()
        ids = getattr(pool, "task_ids", None)
        if ids is not None and len(ids) != getattr(pool, "n_tasks_built", len(ids)):
            rec["task_ids"] = [int(t) for t in ids.tolist()]  # a subset (e.g. leave-one-out) pool
    if tasks is not None:
        rec["tensors_fingerprint"] = tensors_fingerprint(tasks)
        rec["n_tasks"] = len(tasks)
        rec.setdefault("fingerprint", rec["tensors_fingerprint"])
    elif pool is not None:
        rec["n_tasks"] = len(pool)
    if file is not None:
        rec["file"] = file
    return rec


# --------------------------------------------------------------------------- saving
def versions() -> dict[str, str]:
    try:
        from importlib.metadata import version

        pkg = version("metainfluence")
    except Exception:  # pragma: no cover - not installed
        pkg = "unknown"
    return {"metainfluence": pkg, "torch": torch.__version__, "python": platform.python_version()}


def _lam_digest(lam: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, "lam", lam)
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    lam: torch.Tensor,
    *,
    problem: MetaProblem | None = None,
    spec: ParamSpec | None = None,
    kind: str = "trained",
    settings: Mapping[str, Any] | None = None,
    pools: Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Mapping[str, Any] | None = None,
    refine_report: Any = None,
    history: Any = None,
    step: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``path`` (a stem; ``.json``/``.safetensors`` suffixes are dropped) atomically.

    ``settings``: the settings of every stage (model, inner, objective, training, data ...);
    ``pools``: name → :func:`pool_record`; ``state``: extra tensors (e.g. Adam moments, the batch
    sampler's generator state) stored as ``state.<name>`` to resume training exactly.
    Returns the path of the ``.safetensors`` file.
    """
    stem = _stem(path)
    if spec is None:
        if problem is None:
            raise CheckpointError("save_checkpoint needs the problem or its ParamSpec to record the parameter layout")
        spec = problem.spec
    lam = lam.detach().cpu()
    if lam.dim() != 1 or lam.numel() != spec.dim:
        raise CheckpointError(f"λ has shape {tuple(lam.shape)} but the model has {spec.dim} parameters; save the flat meta-parameter vector")
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "io_format_version": IO_FORMAT_VERSION,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "tensors_file": stem.name + ".safetensors",
        "lam": {"dtype": str(lam.dtype).replace("torch.", ""), "numel": lam.numel(), "sha256": _lam_digest(lam)},
        "param_spec": spec.to_json(),
        "step": step,
        "problem": problem.settings_json() if problem is not None else None,
        "settings": to_jsonable(dict(settings or {})),
        "pools": to_jsonable(dict(pools or {})),
        "metrics": to_jsonable(dict(metrics or {})),
        "refine_report": to_jsonable(refine_report) if refine_report is not None else None,
        "history": to_jsonable(history) if history is not None else None,
        "state_keys": sorted(state) if state else [],
    }
    if extra:
        record.update(to_jsonable(dict(extra)))
    record["record_sha256"] = _record_digest(record)
    tensors = {"lam": lam}
    for k, v in (state or {}).items():
        tensors[f"state.{k}"] = v.detach().cpu()
    text = json.dumps(record, allow_nan=False)
    tpath = write_tensors(stem.with_name(stem.name + ".safetensors"), tensors, metadata={_META_KEY: text})
    # The sidecar is a convenience copy; the safetensors file above is already complete.
    write_json(stem.with_name(stem.name + ".json"), record)
    return tpath


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p


# --------------------------------------------------------------------------- loading
@dataclass
class Checkpoint:
    """A loaded checkpoint: λ, the record (settings, pools, metrics, ...) and any saved state."""

    lam: torch.Tensor
    info: dict
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def spec(self) -> ParamSpec:
        ps = self.info["param_spec"]
        return ParamSpec(tuple(ps["names"]), tuple(tuple(s) for s in ps["shapes"]))

    @property
    def settings(self) -> dict:
        return self.info.get("settings") or {}

    @property
    def step(self) -> int | None:
        return self.info.get("step")


# what the numbers of a checkpoint are read by: an edit of these in its header would make λ mean something else
_RECORDED = ("kind", "settings", "problem", "param_spec", "pools", "state_keys")


def _record_digest(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: record.get(k) for k in _RECORDED}, sort_keys=True).encode()).hexdigest()[:16]


def lam_digest(lam: torch.Tensor) -> str:
    """A short fingerprint of λ's values (dtype-independent): ties a scores file to the checkpoint it scored."""
    return hashlib.sha256(lam.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def read_checkpoint_record(path: str | os.PathLike) -> dict:
    """The record embedded in a checkpoint's safetensors header (no tensors are read)."""
    stem = _stem(path)
    tpath = stem.with_name(stem.name + ".safetensors")
    if not tpath.is_file():
        if stem.is_dir():  # a run folder given for a checkpoint: name the checkpoints it holds
            held = sorted(p.stem for p in stem.glob("*.json") if '"param_spec"' in p.read_text(errors="replace"))  # scores files have none
            raise CheckpointError(f"{stem} is a folder, not a checkpoint; give one of its checkpoints"
                                  + (f": {', '.join(str(stem / h) for h in held[:6])}" if held else " (it holds none)"))
        raise CheckpointError(f"checkpoint {tpath} does not exist; check the path (give the stem, .json or .safetensors)")
    try:
        with open(tpath, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000 or n + 8 > tpath.stat().st_size:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
        text = header.get("__metadata__", {}).get(_META_KEY)
        if text is None:
            raise CheckpointError(f"{tpath} is a safetensors file without a metainfluence checkpoint record; pass a checkpoint written by metainfluence")
        record = json.loads(text)
    except CheckpointError:
        raise
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {tpath} is truncated or corrupt ({exc}); use an earlier checkpoint or train again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{tpath} is not a metainfluence checkpoint; pass a checkpoint written by metainfluence")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {tpath} has format version {record.get('format_version')}, newer than this metainfluence reads ({FORMAT_VERSION}); upgrade metainfluence")
    return record


def load_checkpoint(
    path: str | os.PathLike,
    expected_problem: MetaProblem | ParamSpec | None = None,
    expected_pool: Any = None,
    pool_name: str = "train",
) -> Checkpoint:
    """Load and verify a checkpoint (see the module docstring). ``expected_pool``: a TaskPool,
    sinusoid pool, TaskTensors or fingerprint string, compared with the checkpoint's ``pool_name``
    pool. Never unpickles."""
    stem = _stem(path)
    record = read_checkpoint_record(stem)
    tpath = stem.with_name(stem.name + ".safetensors")
    tensors = read_tensors(tpath, what="checkpoint")
    if "lam" not in tensors:
        raise CheckpointError(f"checkpoint {tpath} holds no λ tensor; it is corrupt — use an earlier checkpoint or train again")
    lam = tensors["lam"]
    if _lam_digest(lam) != record.get("lam", {}).get("sha256"):
        raise CheckpointError(f"checkpoint {tpath}: λ does not match the checksum in its record (corrupt file); use an earlier checkpoint or train again")
    if record.get("record_sha256", _record_digest(record)) != _record_digest(record):  # (checkpoints before it have none)
        raise CheckpointError(f"checkpoint {tpath}: its settings, model or pool record do not match the checksum written with them (the header "
                              "was edited after it was written); use an unedited copy, or write the checkpoint again with the settings you want")
    ckpt = Checkpoint(lam=lam, info=record, state={k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}, path=tpath)
    if expected_problem is not None:
        spec = expected_problem if isinstance(expected_problem, ParamSpec) else expected_problem.spec
        check_spec(ckpt, spec)
    if expected_pool is not None:
        check_pool(ckpt, expected_pool, pool_name)
    return ckpt


def check_spec(ckpt: Checkpoint, spec: ParamSpec) -> None:
    """CheckpointError unless the checkpoint's parameter names and shapes are ``spec``'s."""
    saved = ckpt.spec
    if saved == spec:
        return
    if saved.dim != spec.dim:
        detail = f"{saved.dim} parameters in {len(saved.names)} tensors, the expected model has {spec.dim} in {len(spec.names)}"
    else:
        diff = next(
            (f"{a}{list(sa)} vs {b}{list(sb)}" for a, sa, b, sb in zip(saved.names, saved.shapes, spec.names, spec.shapes) if (a, sa) != (b, sb)),
            f"{len(saved.names)} vs {len(spec.names)} tensors",
        )
        detail = f"parameter layout differs ({diff})"
    where = ckpt.path or "checkpoint"
    raise CheckpointError(f"checkpoint {where} belongs to another model: {detail}; use the model settings it was trained with")


def check_pool(ckpt: Checkpoint, pool: Any, pool_name: str = "train") -> None:
    """CheckpointError unless the checkpoint's ``pool_name`` pool has ``pool``'s fingerprint."""
    where = ckpt.path or "checkpoint"
    rec = (ckpt.info.get("pools") or {}).get(pool_name)
    if not rec:
        raise CheckpointError(f"checkpoint {where} records no {pool_name!r} pool, so it cannot be checked against one; pass expected_pool=None")
    if isinstance(pool, str):
        ok = pool in (rec.get("fingerprint"), rec.get("tensors_fingerprint"))
        got = pool
    elif isinstance(pool, TaskTensors):
        got = tensors_fingerprint(pool)
        ok = got == rec.get("tensors_fingerprint")
    else:
        got = pool_fingerprint(pool)
        if rec.get("kind") != "pool":
            raise CheckpointError(f"checkpoint {where} records only the {pool_name} pool's tensors; compare with pool.tensors(dataset) instead")
        ok = got == rec.get("fingerprint")
    if not ok:
        raise CheckpointError(
            f"checkpoint {where} was trained on another {pool_name} pool (fingerprint {rec.get('fingerprint')}, given {got}); use the pool it was trained on or train again"
        )
