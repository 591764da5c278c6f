"""The run as one object: :class:`RunContext` holds a run's settings, dataset, pools (train/val/test),
their tensors and the problem, and — when the run has a folder ``out`` — the files in it::

    settings.json                     the effective RunSettings (usable again with --config)
    pools/{train,val,test}.{json,safetensors}   the task pools (stable task ids)
    trained.{safetensors,json}        λ after meta-training (+ Adam state, history)
    refined.{safetensors,json}        λ* after the refine stage (+ refine report)
    edited.{safetensors,json}         λ after a closed-form removal
    task_influence.{safetensors,json} / influence_LEVEL_METHOD.*   scores files
    summary.json                      the demo's figures

It is built from settings (:meth:`RunContext.prepare`) or from a checkpoint (:meth:`RunContext.from_checkpoint`,
which rebuilds the run the checkpoint came from and refuses a different model or training pool), and it
reads and writes the run's artifacts, recording the pools' fingerprints with every checkpoint and scores file.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..config import settings_from_dict, to_dict
from ..errors import CheckpointError, PoolError, SettingsError
from ..influence.results import InfluenceResult
from ..io import write_json
from ..meta.checkpoint import Checkpoint, check_pool, lam_digest, load_checkpoint, pool_fingerprint, pool_record, read_checkpoint_record, save_checkpoint
from ..meta.objective import MetaProblem
from ..meta.refine import RefineReport
from ..meta.train import TrainHistory
from ..tasks import load_pool
from ..tasks.tensors import TaskTensors
from .build import SPLITS, build_pools, build_problem, load_data, pool_tensors
from .describe import item_rows, write_item_table
from .settings import RunSettings


def _check_belongs(checkpoint, split: str, record: Mapping[str, Any], pool: Any, file: Path | None) -> None:
    """A validation or test pool must be the one the checkpoint's run recorded (same size, same
    fingerprint): a pool file of another run in the folder would silently change every number."""
    if split == "train" or record.get("kind") != "pool" or record.get("n_tasks") != len(pool):
        return
    if record.get("fingerprint") != pool_fingerprint(pool):
        where = f"the pool file {file}" if file is not None else f"the {split} pool rebuilt from the recorded settings"
        raise CheckpointError(f"{where} does not belong to the run of checkpoint {checkpoint} (its {split} pool fingerprint differs); "
                              "restore that run's pools/ folder, or evaluate a checkpoint of the run that wrote these pools")


@dataclass
class RunContext:
    """What a run is built from: dataset, pools (train/val/test), their tensors and the problem, and the
    run folder ``out`` (None: nothing is written)."""

    settings: RunSettings
    dataset: Any
    pools: dict[str, Any]
    tensors: dict[str, TaskTensors]
    problem: MetaProblem
    out: Path | None = None
    standardization: dict | None = None

    # ----------------------------------------------------------------------- building
    @classmethod
    def prepare(cls, settings: RunSettings, out: str | os.PathLike | None = None, splits: tuple[str, ...] = SPLITS, save_pools: bool = True,
                log: Callable[[str], None] | None = None) -> RunContext:
        """Load the dataset, build (and save under ``out/pools``) the pools, build the problem."""
        settings.validate()
        log = log or (lambda s: None)
        dataset = load_data(settings.data)
        if dataset is not None:
            log(f"dataset: {dataset!r}")
        pools = build_pools(settings.data, dataset, splits)
        # build the model before writing anything, so a model that cannot take these inputs leaves no files
        problem = build_problem(settings, dataset)
        out_path = Path(out) if out is not None else None
        ctx = cls(settings, dataset, pools, {}, problem, out_path)
        # the pools' images are decoded before their files are written: an unreadable image leaves no pools behind
        ctx.tensors, ctx.standardization = pool_tensors(pools, dataset, settings.data)
        if out_path is not None and save_pools:
            ctx.save_pools()
        for name, pool in pools.items():
            log(f"{name} pool: {pool.summary()}")
        return ctx

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, data_root: str | None = None, splits: tuple[str, ...] = ("train",), test_tasks: int | None = None,
                        overrides: Callable[[RunSettings], RunSettings] | None = None) -> tuple[RunContext, Checkpoint]:
        """Rebuild the run a checkpoint came from (settings, dataset, pools, problem) and load it,
        refusing it if its model or training pool differ from the rebuilt ones.

        Pools are read from the files the checkpoint names (``pools/NAME`` next to it) when present,
        else rebuilt from the recorded settings; either way the training pool must match the recorded
        fingerprint.
        """
        splits = ("train", *[s for s in splits if s != "train"])
        record = read_checkpoint_record(path)
        try:
            settings = settings_from_dict(RunSettings, record.get("settings") or {}, source=f"checkpoint {path}")
        except SettingsError as exc:
            raise CheckpointError(f"checkpoint {path} has settings this version cannot read ({exc}): it was edited or damaged, or written by another metainfluence version (use that one)") from None
        if data_root is not None:
            settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, data_root=data_root))
        if test_tasks is not None:
            settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, test_tasks=test_tasks))
        if overrides is not None:
            settings = overrides(settings)
        settings.validate()
        dataset = load_data(settings.data)
        folder = Path(path).expanduser().parent
        recorded = record.get("pools") or {}
        pools: dict[str, Any] = {}
        rebuilt = build_pools(settings.data, dataset, splits)
        for split in splits:
            rec = recorded.get(split) or {}
            file = rec.get("file")
            want = {"train": settings.data.train_tasks, "val": settings.data.val_tasks, "test": settings.data.test_tasks}[split]
            pool = None
            if file and (folder / f"{file}.json").is_file():
                try:
                    loaded = load_pool(folder / file, dataset=dataset) if dataset is not None else load_pool(folder / file)
                except PoolError:
                    loaded = None
                if loaded is not None and len(loaded) == want:
                    pool = loaded
            pools[split] = pool if pool is not None else rebuilt[split]
            _check_belongs(path, split, rec, pools[split], folder / file if pool is not None else None)
        tensors, standardization = pool_tensors(pools, dataset, settings.data)
        problem = build_problem(settings, dataset)
        ckpt = load_checkpoint(path, expected_problem=problem, expected_pool=pools["train"] if recorded.get("train", {}).get("kind") == "pool" else tensors["train"])
        if "tensors_fingerprint" in recorded.get("train", {}):
            check_pool(ckpt, tensors["train"])  # the inputs as trained on, standardisation included
        return cls(settings, dataset, pools, tensors, problem, folder, standardization), ckpt

    def with_pools(self, pools: dict[str, Any]) -> RunContext:
        """The same run on other pools (e.g. a corrupted training pool); tensors recomputed."""
        tensors, standardization = pool_tensors(pools, self.dataset, self.settings.data)
        return RunContext(self.settings, self.dataset, pools, tensors, self.problem, self.out, standardization)

    # ----------------------------------------------------------------------- fingerprints
    def pool_records(self) -> dict[str, dict]:
        """What a checkpoint records of each pool: its fingerprints and, when saved here, its file."""
        recs = {}
        for name, pool in self.pools.items():
            file = f"pools/{name}" if self.out is not None and (self.out / "pools" / f"{name}.json").is_file() else None
            recs[name] = pool_record(pool, self.tensors.get(name), file=file)
        return recs

    def pool_fingerprint(self, split: str = "train") -> str:
        return pool_fingerprint(self.pools[split])

    # ----------------------------------------------------------------------- files
    def path(self, name: str) -> Path:
        """``out/NAME``; a run without a folder cannot write."""
        if self.out is None:
            raise SettingsError("this run has no output folder; pass --out")
        return self.out / name

    def save_pools(self, splits: tuple[str, ...] | None = None) -> None:
        """Write ``out/pools/NAME`` for the given (default: all) pools."""
        for name in splits if splits is not None else tuple(self.pools):
            self.pools[name].save(self.path("pools") / name)

    def write_settings(self) -> Path:
        path = self.path("settings.json")
        write_json(path, to_dict(self.settings))
        return path

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.path("summary.json")
        write_json(path, summary)
        return path

    def save_checkpoint(
        self, name: str, lam: torch.Tensor, kind: str, metrics: Mapping[str, Any],
        refine_report: RefineReport | None = None, history: TrainHistory | None = None, step: int | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write ``out/NAME`` with the run's settings, pool records and the given metrics (and ``state``,
        e.g. the Adam moments kept from the training checkpoint so it can still be resumed)."""
        return save_checkpoint(
            self.path(name), lam, problem=self.problem, kind=kind, settings=to_dict(self.settings), pools=self.pool_records(),
            metrics=metrics, refine_report=refine_report.to_json() if refine_report is not None else None,
            history=history.to_json() if history is not None else None, step=step, state=state,
        )

    def checkpoint_state(self, name: str) -> dict[str, torch.Tensor]:
        """The extra state (e.g. Adam moments) of the checkpoint ``out/NAME`` of this run's model."""
        return load_checkpoint(self.path(name), expected_problem=self.problem).state

    def save_scores(self, result: InfluenceResult, name: str, folder: str | os.PathLike | None = None,
                    scored: tuple[str | os.PathLike, torch.Tensor] | None = None) -> Path:
        """Write a scores file ``FOLDER/NAME`` (default folder: ``out``) tied to the training pool's fingerprint and, with
        ``scored`` = (checkpoint path, its λ), to that λ (edits of another λ are warned: :meth:`load_scores`)."""
        stem = Path(folder) / name if folder is not None else self.path(name)
        if scored is not None:
            result.diagnostics["checkpoint"] = {"path": str(scored[0]), "lam_sha256": lam_digest(scored[1])}
        result.save(stem, pool_fingerprint=self.pool_fingerprint("train"))
        if isinstance(result, InfluenceResult):  # STEM.csv: the items by class and file names (pipeline/describe.py)
            write_item_table(stem, item_rows(result, self.pools["train"], self.dataset), result.method)
        return stem

    def load_scores(self, path: str | os.PathLike, checkpoint: Checkpoint | None = None) -> InfluenceResult:
        """A scores file, refused unless it was computed on this run's training pool (its fingerprint and its task ids,
        row for row: edits take the scores' rows as the pool's) for this run's model, and every score is a number.
        With ``checkpoint``: a warning when the scores were computed at another λ (e.g. before a second refine)."""
        result = InfluenceResult.load(path, pool_fingerprint=self.pool_fingerprint("train"))
        n_params = (result.settings.get("problem") or {}).get("n_params")
        if n_params is not None and n_params != self.problem.dim:
            raise CheckpointError(f"scores file {path} was computed for a model of {n_params} parameters, but this checkpoint's has "
                                  f"{self.problem.dim}: it belongs to another run on the same pool; recompute the scores for this checkpoint")
        scored = (result.diagnostics.get("checkpoint") or {}).get("lam_sha256")
        if checkpoint is not None and scored is not None and scored != lam_digest(checkpoint.lam):
            warnings.warn(f"scores file {path} was computed at another λ ({result.diagnostics['checkpoint'].get('path')}) than "
                          f"{checkpoint.path}'s: its ranking is used as it is; recompute the scores for this checkpoint "
                          "(`metainfluence influence --checkpoint …`) if it was refined or edited since", stacklevel=2)
        ids = self.pools["train"].task_ids
        if not torch.equal(result.task_ids.cpu().long(), torch.as_tensor(ids).long()):
            raise CheckpointError(f"scores file {path}: its task ids are not this pool's {len(ids)} ids in order; it is damaged or of "
                                  "another pool — recompute the scores for this checkpoint")
        if not bool(torch.isfinite(result.scores).all()):
            raise CheckpointError(f"scores file {path} holds NaN or infinite scores; recompute them (`metainfluence influence`)")
        return result
