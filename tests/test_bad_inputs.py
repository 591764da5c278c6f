"""Every bad input a user can hand in gives one clear line, of the right error class, and leaves no
partial file behind (issue #6).

Table-driven: each case names the error class (a :class:`MetaInfluenceError` subclass), words the
message must contain, an optional ``prepare`` step that writes the bad input, and the call that must
fail. For every case the test checks

- the exception class (a subclass of MetaInfluenceError, never a raw torch/numpy/zip error),
- a one-line message (no newline) that names the problem,
- that the failed call created or changed no file anywhere under the test's folder (so no partial
  output, no leftover ``*.tmp``).

CLI cases run ``metainfluence`` (in-process through ``cli.main``, and once as a real subprocess) and
check exit status 2 with exactly one ``error: ...`` line on stderr.

A last test parses the source tree and fails if anything could unpickle user data.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from fixtures import make_omniglot, make_zip, write_idx
from helpers import random_tasks, small_problem

import metainfluence
from metainfluence.cli import main as cli_main
from metainfluence.config import load_settings
from metainfluence.data import load_dataset, load_digits, load_omniglot, read_idx, safe_extract_zip
from metainfluence.errors import CheckpointError, DataError, DivergenceError, MetaInfluenceError, PoolError, SettingsError
from metainfluence.evaluation.groundtruth import GroundTruthSettings, leave_one_out
from metainfluence.influence.editing import Removal, edit_model, unlearn
from metainfluence.influence.instance_if import instance_influence
from metainfluence.influence.results import InfluenceResult, InfluenceSettings
from metainfluence.linalg import LowRank, MatrixOperator, SolverSettings, solve_ihvp
from metainfluence.influence.task_if import task_influence
from metainfluence.io import write_json, write_tensors
from metainfluence.meta.checkpoint import load_checkpoint, pool_record, save_checkpoint
from metainfluence.meta.models import MLP, ModelSettings, build_model
from metainfluence.meta.objective import InnerSettings, MetaProblem
from metainfluence.meta.refine import RefineSettings, refine
from metainfluence.pipeline import RunSettings
from metainfluence.tasks import TaskPool, TaskTensors, build_pool, corrupt_labels, load_pool

CLI = "cli"  # error "class" of the command-line cases: exit status 2 and one stderr line


@dataclass
class Case:
    name: str
    error: type[MetaInfluenceError] | str
    mentions: tuple[str, ...]
    run: Callable[[Any, Path, Path], Any]
    prepare: Callable[[Any, Path, Path], None] | None = None


CASES: list[Any] = []


def case(name: str, error, *mentions: str, prepare=None, marks=()):
    def register(fn):
        CASES.append(pytest.param(Case(name, error, mentions, fn, prepare), id=name, marks=marks))
        return fn

    return register


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    digits = load_digits()
    pool = build_pool(digits, "train", 5, 1, 2, 6, seed=0)
    problem, lam = small_problem(steps=1, hidden=(4,))
    trained: dict[str, Path] = {}

    def run_dir() -> Path:
        """A tiny trained CLI run (5 training tasks, 1 step), made on first use."""
        if "dir" not in trained:
            folder = tmp_path_factory.mktemp("cli_run")
            rc, err = _cli("train", "--out", folder, "--model-hidden", "8", *TINY)
            assert rc == 0, err
            trained["dir"] = folder
        return trained["dir"]

    return SimpleNamespace(
        digits=digits,
        pool=pool,
        problem=problem,
        lam=lam,
        tasks=random_tasks(n=6, seed=0),
        val=random_tasks(n=3, seed=1),
        run_dir=run_dir,
    )


def _result() -> InfluenceResult:
    return InfluenceResult(level="task", method="task-if", scores=torch.arange(4.0), task_ids=torch.arange(4), measurement=1.0,
                           settings={}, diagnostics={})


def _blocked(inp: Path) -> Path:
    """A folder path under a regular FILE (written by the test before every case): it cannot be
    created, not even by root (for whom a chmod 0o500 folder is still writable)."""
    assert (inp / "file.txt").is_file()
    return inp / "file.txt" / "sub"


def _flip(path: Path, start: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# =========================================================================== data files
def _omniglot(w, inp, out):
    make_omniglot(inp, drawers=2, size=12)


@case("corrupt_zip_archive", DataError, "zip", prepare=lambda w, inp, out: (_omniglot(w, inp, out), (inp / "images_background.zip").write_bytes(b"PK\x03\x04" + b"not really a zip archive" * 40)))
def _(w, inp, out):
    load_omniglot(inp, cache_dir=out)


@case("truncated_zip_archive", DataError, "zip", prepare=lambda w, inp, out: (_omniglot(w, inp, out), _truncate(inp / "images_evaluation.zip", 0.6)))
def _(w, inp, out):
    load_omniglot(inp, cache_dir=out)


def _corrupt_member(w, inp, out):
    _omniglot(w, inp, out)
    zpath = inp / "images_background.zip"
    _flip(zpath, zpath.stat().st_size // 3, 64)


@case("zip_member_corrupt", DataError, "corrupt", prepare=_corrupt_member)
def _(w, inp, out):
    load_omniglot(inp, cache_dir=out)


@case("extract_zip_member_corrupt_leaves_nothing", DataError, "corrupt", prepare=_corrupt_member)
def _(w, inp, out):
    safe_extract_zip(inp / "images_background.zip", out)


@case("extract_zip_path_escaping_folder", DataError, "outside", prepare=lambda w, inp, out: make_zip(inp / "evil.zip", {"ok.txt": b"fine", "../escaped.txt": b"bad"}))
def _(w, inp, out):
    safe_extract_zip(inp / "evil.zip", out)


@case("extract_zip_absolute_path", DataError, "outside", prepare=lambda w, inp, out: make_zip(inp / "abs.zip", {"/tmp/metainfluence-abs.txt": b"bad"}))
def _(w, inp, out):
    safe_extract_zip(inp / "abs.zip", out)


def _symlink_zip(w, inp, out):
    with zipfile.ZipFile(inp / "link.zip", "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")


@case("extract_zip_symlink", DataError, "outside", prepare=_symlink_zip)
def _(w, inp, out):
    safe_extract_zip(inp / "link.zip", out)


@case("extract_not_a_zip", DataError, "not a readable zip", prepare=lambda w, inp, out: (inp / "x.zip").write_bytes(b"hello"))
def _(w, inp, out):
    safe_extract_zip(inp / "x.zip", out)


@case("extract_into_unwritable_folder", DataError, "cannot extract", prepare=lambda w, inp, out: make_zip(inp / "ok.zip", {"a/b.txt": b"x"}))
def _(w, inp, out):
    safe_extract_zip(inp / "ok.zip", _blocked(inp))


@case("missing_omniglot_archive", DataError, "images_background", prepare=lambda w, inp, out: (inp / "omniglot").mkdir())
def _(w, inp, out):
    load_dataset("omniglot", root=inp / "omniglot", cache_dir=out)


@case("missing_data_root", DataError, "does not exist")
def _(w, inp, out):
    load_dataset("omniglot", root=inp / "no-such-folder")


def _idx(w, inp, out):
    write_idx(inp / "images", torch.zeros(10, 28, 28, dtype=torch.uint8).numpy(), gz=False)
    write_idx(inp / "images", torch.zeros(10, 28, 28, dtype=torch.uint8).numpy(), gz=True)


@case("truncated_idx_file", DataError, "truncated", prepare=lambda w, inp, out: (_idx(w, inp, out), _truncate(inp / "images", 0.7)))
def _(w, inp, out):
    read_idx(inp / "images")


@case("truncated_gzip_idx_file", DataError, "gzip", prepare=lambda w, inp, out: (_idx(w, inp, out), _truncate(inp / "images.gz", 0.5)))
def _(w, inp, out):
    read_idx(inp / "images.gz")


@case("idx_wrong_magic", DataError, "magic", prepare=lambda w, inp, out: (inp / "images").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)))
def _(w, inp, out):
    read_idx(inp / "images")


@case("idx_gzip_wrong_magic", DataError, "magic", prepare=lambda w, inp, out: (inp / "images.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(20))))
def _(w, inp, out):
    read_idx(inp / "images.gz")


@case("mnist_files_missing", DataError, "not found", prepare=lambda w, inp, out: (inp / "mnist").mkdir())
def _(w, inp, out):
    load_dataset("mnist", root=inp)


@case("unknown_dataset_name", DataError, "unknown dataset", "cifar")
def _(w, inp, out):
    load_dataset("cifar-100")


@case("unknown_dataset_option", DataError, "unknown option", "image_size")
def _(w, inp, out):
    load_dataset("digits", image_size=5)


# =========================================================================== task pools
@case("n_way_larger_than_classes", PoolError, "n_way=11", "10 classes")
def _(w, inp, out):
    build_pool(w.digits, "train", 11, 1, 1, 5)


@case("k_plus_q_larger_than_class", PoolError, "k_shot + q_query")
def _(w, inp, out):
    build_pool(w.digits, "train", 5, 100, 50, 5)


@case("zero_tasks", PoolError, "n_tasks=0")
def _(w, inp, out):
    build_pool(w.digits, "train", 5, 1, 1, 0)


@case("unknown_split", PoolError, "split", "dev")
def _(w, inp, out):
    build_pool(w.digits, "dev", 5, 1, 1, 3)


def _saved_pool(w, inp, out):
    w.pool.save(inp / "pool")


def _edit_pool_json(w, inp, out):
    _saved_pool(w, inp, out)
    doc = json.loads((inp / "pool.json").read_text())
    doc["seed"] = 7
    (inp / "pool.json").write_text(json.dumps(doc))


@case("pool_json_edited", PoolError, "edited", prepare=_edit_pool_json)
def _(w, inp, out):
    TaskPool.load(inp / "pool")


def _edit_pool_arrays(w, inp, out):
    from metainfluence.io import read_tensors

    _saved_pool(w, inp, out)
    arrays = read_tensors(inp / "pool.safetensors")
    arrays["support_ids"] = arrays["support_ids"].flip(1).contiguous()
    write_tensors(inp / "pool.safetensors", arrays)


@case("pool_arrays_edited", PoolError, "edited", prepare=_edit_pool_arrays)
def _(w, inp, out):
    load_pool(inp / "pool", dataset=w.digits)


@case("pool_of_another_dataset", PoolError, "fingerprint", prepare=_saved_pool)
def _(w, inp, out):
    load_pool(inp / "pool", dataset=load_digits(split_seed=1))


@case("pool_json_not_json", PoolError, "not valid JSON", prepare=lambda w, inp, out: (_saved_pool(w, inp, out), (inp / "pool.json").write_text('{"format": "metainfluence-task-pool", ')))
def _(w, inp, out):
    load_pool(inp / "pool")


@case("empty_pool", PoolError, "empty")
def _(w, inp, out):
    TaskTensors(torch.zeros(0, 2, 4), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 3, 4), torch.zeros(0, 3, dtype=torch.long))


@case("empty_subset_of_pool", PoolError, "no task ids")
def _(w, inp, out):
    w.pool.subset([])


@case("task_id_not_in_pool", PoolError, "task id 99")
def _(w, inp, out):
    w.pool.subset([0, 99])


@case("nan_in_task_data", PoolError, "NaN")
def _(w, inp, out):
    t = w.tasks
    xs = t.support_x.clone()
    xs[2, 1, 0] = float("nan")
    TaskTensors(xs, t.support_y, t.query_x, t.query_y)


@case("inf_in_task_data", PoolError, "inf")
def _(w, inp, out):
    t = w.tasks
    xq = t.query_x.clone()
    xq[0, 0, 3] = float("-inf")
    TaskTensors(t.support_x, t.support_y, xq, t.query_y)


@case("task_count_mismatch", PoolError, "tasks")
def _(w, inp, out):
    t = w.tasks
    TaskTensors(t.support_x, t.support_y, t.query_x[:-1], t.query_y[:-1])


@case("rho_task_out_of_range", PoolError, "rho_task", "[0, 1]")
def _(w, inp, out):
    corrupt_labels(w.pool, 1.5, 0.5)


@case("rho_label_nan", PoolError, "rho_label")
def _(w, inp, out):
    corrupt_labels(w.pool, 0.5, float("nan"))


@case("corruption_where_unknown", PoolError, "where")
def _(w, inp, out):
    corrupt_labels(w.pool, 0.5, 0.5, where="labels")


# =========================================================================== checkpoints
def _checkpoint(w, inp, out):
    save_checkpoint(inp / "ck", w.lam, problem=w.problem, pools={"train": pool_record(w.tasks)})


@case("checkpoint_of_another_model", CheckpointError, "another model", prepare=_checkpoint)
def _(w, inp, out):
    other, _ = small_problem(steps=1, hidden=(7,))
    load_checkpoint(inp / "ck", expected_problem=other)


@case("checkpoint_of_another_pool", CheckpointError, "another train pool", prepare=_checkpoint)
def _(w, inp, out):
    load_checkpoint(inp / "ck.safetensors", expected_problem=w.problem, expected_pool=w.val)


@case("truncated_safetensors_checkpoint", CheckpointError, "truncated", prepare=lambda w, inp, out: (_checkpoint(w, inp, out), _truncate(inp / "ck.safetensors", 0.5)))
def _(w, inp, out):
    load_checkpoint(inp / "ck")


def _record_not_json(w, inp, out):
    from safetensors.torch import save

    (inp / "ck.safetensors").write_bytes(save({"lam": w.lam}, metadata={"metainfluence_record": '{"format": "metainfluence-checkpoint", '}))
    (inp / "ck.json").write_text("{ not json")


@case("checkpoint_json_not_json", CheckpointError, "corrupt", prepare=_record_not_json)
def _(w, inp, out):
    load_checkpoint(inp / "ck.json")


@case("checkpoint_header_garbage", CheckpointError, "corrupt", prepare=lambda w, inp, out: (inp / "ck.safetensors").write_bytes((40).to_bytes(8, "little") + b"\xff" * 40 + bytes(16)))
def _(w, inp, out):
    load_checkpoint(inp / "ck")


def _checkpoint_settings_edited(w, inp, out):
    from safetensors import safe_open

    _checkpoint(w, inp, out)
    with safe_open(str(inp / "ck.safetensors"), "pt") as fh:
        tensors, meta = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    record = json.loads(meta["metainfluence_record"])
    record["problem"]["inner"]["lr"] = 0.9  # a valid value, a different model: what the λ checksum cannot see
    write_tensors(inp / "ck.safetensors", tensors, metadata={"metainfluence_record": json.dumps(record)})


@case("checkpoint_settings_edited_in_its_header", CheckpointError, "header was edited", "unedited copy", prepare=_checkpoint_settings_edited)
def _(w, inp, out):
    load_checkpoint(inp / "ck")


@case("checkpoint_lambda_edited", CheckpointError, "checksum", prepare=lambda w, inp, out: (_checkpoint(w, inp, out), _flip(inp / "ck.safetensors", (inp / "ck.safetensors").stat().st_size - 8, 4)))
def _(w, inp, out):
    load_checkpoint(inp / "ck")


@case("pool_file_given_as_checkpoint", CheckpointError, "checkpoint record", prepare=_saved_pool)
def _(w, inp, out):
    load_checkpoint(inp / "pool")


@case("missing_checkpoint", CheckpointError, "does not exist")
def _(w, inp, out):
    load_checkpoint(inp / "nothing-here")


@case("checkpoint_lambda_wrong_size_on_save", CheckpointError, "parameters")
def _(w, inp, out):
    save_checkpoint(out / "ck", torch.zeros(3, dtype=torch.float64), problem=w.problem)


# =========================================================================== score files
@case("scores_of_another_pool", CheckpointError, "another task pool", prepare=lambda w, inp, out: _result().save(inp / "scores", pool_fingerprint="a" * 16))
def _(w, inp, out):
    InfluenceResult.load(inp / "scores", pool_fingerprint="b" * 16)


@case("pool_file_given_as_scores", CheckpointError, "not a metainfluence scores file", prepare=_saved_pool)
def _(w, inp, out):
    InfluenceResult.load(inp / "pool")


def _scores_missing(w, inp, out):
    write_tensors(inp / "scores.safetensors", {"x": torch.zeros(2)})
    write_json(inp / "scores.json", {"kind": "metainfluence.influence"})


@case("scores_file_missing_fields", CheckpointError, "lacks", "scores", prepare=_scores_missing)
def _(w, inp, out):
    InfluenceResult.load(inp / "scores")


@case("scores_json_not_json", CheckpointError, "not valid JSON", prepare=lambda w, inp, out: (_result().save(inp / "scores"), (inp / "scores.json").write_text('{"kind": "metainfluence.influence", "lev')))
def _(w, inp, out):
    InfluenceResult.load(inp / "scores.json")


def _scores_level_edited(w, inp, out):
    import json

    _result().save(inp / "scores")
    info = json.loads((inp / "scores.json").read_text())
    (inp / "scores.json").write_text(json.dumps({**info, "level": "query"}))


@case("scores_json_level_edited", CheckpointError, "level 'query' disagrees", "recompute", prepare=_scores_level_edited)
def _(w, inp, out):
    InfluenceResult.load(inp / "scores")


@case("lowrank_file_of_another_model", CheckpointError, "dimension", prepare=lambda w, inp, out: LowRank(torch.ones(2, dtype=torch.float64), torch.eye(5, dtype=torch.float64)[:, :2]).save(inp / "eig"))
def _(w, inp, out):
    LowRank.load(inp / "eig", dim=7)


# =========================================================================== influence settings and solvers
def _task_if(w, **settings):
    task_influence(w.problem, w.lam, w.tasks, w.val, InfluenceSettings(**settings))


@case("negative_damping", SettingsError, "damping", "-0.001")
def _(w, inp, out):
    _task_if(w, damping=-1e-3)


@case("nan_damping", SettingsError, "damping", "nan")
def _(w, inp, out):
    _task_if(w, damping=float("nan"), hessian="fisher", solver="woodbury")


@case("unknown_solver", SettingsError, "solver", "newton-schulz")
def _(w, inp, out):
    _task_if(w, solver="newton-schulz")


@case("unknown_hessian", SettingsError, "hessian", "kfac")
def _(w, inp, out):
    _task_if(w, hessian="kfac")


@case("woodbury_without_fisher", SettingsError, "woodbury", "fisher")
def _(w, inp, out):
    _task_if(w, hessian="exact", solver="woodbury")


@case("exact_hessian_with_implicit_inner", SettingsError, "exact", "implicit")
def _(w, inp, out):
    problem, lam = small_problem(kind="implicit", steps=3, proximal=1.0, hidden=(4,))
    task_influence(problem, lam, w.tasks, w.val, InfluenceSettings(hessian="exact"))


@case("unknown_instance_level", SettingsError, "support or query")
def _(w, inp, out):
    instance_influence(w.problem, w.lam, w.tasks, w.val, which="labels")


@case("removal_task_index_beyond_pool", SettingsError, "task index 6", "6 tasks")
def _(w, inp, out):
    edit_model(w.problem, w.lam, w.tasks, Removal(tasks=[1, 6]))


@case("removal_count_larger_than_pool", SettingsError, "outside the pool")
def _(w, inp, out):
    edit_model(w.problem, w.lam, w.tasks, Removal(tasks=list(range(7))))


@case("removal_negative_task_index", SettingsError, "task index -1")
def _(w, inp, out):
    edit_model(w.problem, w.lam, w.tasks, Removal(tasks=[-1]))


@case("removal_mask_wrong_shape", SettingsError, "support removal mask")
def _(w, inp, out):
    edit_model(w.problem, w.lam, w.tasks, Removal(support=torch.ones(2, 2, dtype=torch.bool)))


@case("unlearn_task_index_beyond_pool", SettingsError, "task index 9")
def _(w, inp, out):
    unlearn(w.problem, w.lam, w.tasks, Removal(tasks=[9]))


def _op():
    return MatrixOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))


@case("rhs_wrong_dtype", SettingsError, "dtype", "float32")
def _(w, inp, out):
    solve_ihvp(_op(), torch.ones(3, dtype=torch.float32), solver="cg", damping=0.0)


@case("rhs_wrong_shape", SettingsError, "shape")
def _(w, inp, out):
    solve_ihvp(_op(), torch.ones(4, dtype=torch.float64), solver="cg", damping=0.0)


@case("rhs_with_nan", DivergenceError, "NaN")
def _(w, inp, out):
    solve_ihvp(_op(), torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64), solver="neumann", damping=0.0)


@case("indefinite_hessian_explicit", DivergenceError, "positive definite", "damping")
def _(w, inp, out):
    op = MatrixOperator(torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64)))
    solve_ihvp(op, torch.ones(2, dtype=torch.float64), solver="explicit", damping=0.0)


@case("lissa_batch_larger_than_pool", SettingsError, "lissa_batch")
def _(w, inp, out):
    op = MatrixOperator(None, torch.eye(2, dtype=torch.float64).repeat(3, 1, 1))
    solve_ihvp(op, torch.ones(2, dtype=torch.float64), solver="lissa", damping=0.0, settings=SolverSettings(lissa_batch=5))


@case("solver_tolerance_not_positive", SettingsError, "tol")
def _(w, inp, out):
    SolverSettings(tol=0.0)


# =========================================================================== model and problem
@case("unknown_inner_solver_kind", SettingsError, "inner solver", "reptile")
def _(w, inp, out):
    MetaProblem(MLP(4, 3, (4,)), inner=InnerSettings(kind="reptile"))


@case("implicit_inner_without_proximal", SettingsError, "proximal")
def _(w, inp, out):
    MetaProblem(MLP(4, 3, (4,)), inner=InnerSettings(kind="implicit", proximal=0.0))


@case("conv4_on_8x8_images", SettingsError, "8px", "too small")
def _(w, inp, out):
    build_model(ModelSettings(kind="conv4"), (1, 8, 8), 5)


@case("unknown_loss", SettingsError, "unknown loss", "hinge")
def _(w, inp, out):
    MetaProblem(MLP(4, 3, (4,)), loss="hinge")


@case("unknown_model_kind", SettingsError, "model kind", "resnet")
def _(w, inp, out):
    build_model(ModelSettings(kind="resnet"), (1, 8, 8), 5)


@case("negative_weight_decay", SettingsError, "weight decay")
def _(w, inp, out):
    MetaProblem(MLP(4, 3, (4,)), weight_decay=-1.0)


@case("refine_unknown_method", SettingsError, "refine method", "adam")
def _(w, inp, out):
    refine(w.problem, w.lam, w.tasks, RefineSettings(method="adam"))


@case("refine_weights_wrong_shape", SettingsError, "weights")
def _(w, inp, out):
    refine(w.problem, w.lam, w.tasks, RefineSettings(max_iter=1), w=torch.ones(3))


# =========================================================================== ground truth store
@case("groundtruth_n_loo_larger_than_pool", SettingsError, "n_loo")
def _(w, inp, out):
    leave_one_out(w.problem, w.lam, w.tasks, w.val, GroundTruthSettings(n_loo=7), out_dir=out)


@case("groundtruth_unknown_method", SettingsError, "ground-truth method")
def _(w, inp, out):
    leave_one_out(w.problem, w.lam, w.tasks, w.val, GroundTruthSettings(n_loo=1, method="adam"), out_dir=out)


@case("groundtruth_store_of_other_settings", CheckpointError, "other settings", prepare=lambda w, inp, out: write_json(out / "manifest.json", {"key": "0" * 16}))
def _(w, inp, out):
    leave_one_out(w.problem, w.lam, w.tasks, w.val, GroundTruthSettings(n_loo=1), out_dir=out)


def _manifest_not_json(w, inp, out):
    out.mkdir()
    (out / "manifest.json").write_text('{"key": ')


@case("groundtruth_manifest_not_json", CheckpointError, "not valid JSON", prepare=_manifest_not_json)
def _(w, inp, out):
    leave_one_out(w.problem, w.lam, w.tasks, w.val, GroundTruthSettings(n_loo=1), out_dir=out)


# =========================================================================== config files
@case("config_unknown_key", SettingsError, "unknown setting", "stepz", prepare=lambda w, inp, out: (inp / "run.toml").write_text("[train]\nstepz = 3\n"))
def _(w, inp, out):
    load_settings(RunSettings(), inp / "run.toml")


@case("config_not_toml", SettingsError, "not valid TOML", prepare=lambda w, inp, out: (inp / "run.toml").write_text("[train\nsteps = 3\n"))
def _(w, inp, out):
    load_settings(RunSettings(), inp / "run.toml")


@case("config_wrong_type", SettingsError, "integer", prepare=lambda w, inp, out: (inp / "run.yaml").write_text("train:\n  steps: many\n"))
def _(w, inp, out):
    load_settings(RunSettings(), inp / "run.yaml")


# =========================================================================== output folders
@case("unwritable_output_scores", SettingsError, "output folder")
def _(w, inp, out):
    _result().save(_blocked(inp) / "scores")


@case("unwritable_output_checkpoint", SettingsError, "output folder")
def _(w, inp, out):
    save_checkpoint(_blocked(inp) / "ck", w.lam, problem=w.problem)


@case("unwritable_output_pool", SettingsError, "output folder")
def _(w, inp, out):
    w.pool.save(_blocked(inp) / "pools" / "train")


@case("unwritable_output_groundtruth", SettingsError, "output folder")
def _(w, inp, out):
    leave_one_out(w.problem, w.lam, w.tasks, w.val, GroundTruthSettings(n_loo=1), out_dir=_blocked(inp))


@case("read_only_output_folder", SettingsError, "not writable", prepare=lambda w, inp, out: (out.mkdir(), out.chmod(0o500)),
      marks=pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into 0o500 folders; the file-path cases cover root"))
def _(w, inp, out):
    _result().save(out / "scores")


# =========================================================================== command line
def _cli(*args: str) -> tuple[int, str]:
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        rc = cli_main([str(a) for a in args])
    return rc, err.getvalue()


TINY = ("--train-tasks", "5", "--val-tasks", "2", "--test-tasks", "2", "--steps", "1", "--meta-batch", "4", "--no-progress")


@case("cli_bad_flag_value_subprocess", CLI, "--steps", "abc")
def _(w, inp, out):
    proc = subprocess.run([sys.executable, "-m", "metainfluence.cli", "train", "--out", str(out), "--steps", "abc"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr


@case("cli_bad_choice", CLI, "invalid choice", "adam")
def _(w, inp, out):
    return _cli("refine", "--checkpoint", inp / "ck", "--refine-method", "adam")


@case("cli_n_way_zero", CLI, "n_way")
def _(w, inp, out):
    return _cli("train", "--out", out, "--n-way", "0", *TINY)


@case("cli_n_way_larger_than_classes", CLI, "n_way=11")
def _(w, inp, out):
    return _cli("train", "--out", out, "--n-way", "11", *TINY)


@case("cli_unknown_inner_kind", CLI, "inner solver", "reptile")
def _(w, inp, out):
    return _cli("train", "--out", out, "--inner-kind", "reptile", *TINY)


@case("cli_unknown_dataset", CLI, "unknown dataset")
def _(w, inp, out):
    return _cli("train", "--out", out, "--dataset", "cifar", *TINY)


@case("cli_negative_threads", CLI, "--threads")
def _(w, inp, out):
    return _cli("train", "--out", out, "--threads", "-1", *TINY)


@case("cli_missing_checkpoint", CLI, "does not exist")
def _(w, inp, out):
    return _cli("evaluate", "--checkpoint", inp / "nope")


@case("cli_config_not_toml", CLI, "not valid TOML", prepare=lambda w, inp, out: (inp / "bad.toml").write_text("[train\n"))
def _(w, inp, out):
    return _cli("train", "--out", out, "--config", inp / "bad.toml", *TINY)


@case("cli_conv4_on_digits_writes_nothing", CLI, "too small")
def _(w, inp, out):
    return _cli("train", "--out", out, "--model-kind", "conv4", *TINY)


def _cli_scores(w, inp, out, fingerprint: str | None = None):
    from metainfluence.meta.checkpoint import pool_fingerprint

    pool = load_pool(w.run_dir() / "pools" / "train")
    result = InfluenceResult(level="task", method="task-if", scores=torch.arange(float(len(pool))), task_ids=pool.task_ids.clone(),
                             measurement=1.0, settings={}, diagnostics={})
    result.save(inp / "scores", pool_fingerprint=fingerprint or pool_fingerprint(pool))


@case("cli_edit_task_id_beyond_pool", CLI, "task id 99")
def _(w, inp, out):
    return _cli("edit", "--checkpoint", w.run_dir() / "trained", "--remove-tasks", "0,99", "--out", out)


@case("cli_edit_task_id_listed_twice", CLI, "task id 3 more than once")
def _(w, inp, out):
    return _cli("edit", "--checkpoint", w.run_dir() / "trained", "--remove-tasks", "3,0,3", "--out", out)


@case("cli_edit_no_task_ids", CLI, "names no task")
def _(w, inp, out):
    return _cli("edit", "--checkpoint", w.run_dir() / "trained", "--remove-tasks=", "--out", out)


@case("cli_edit_task_ids_with_a_gap", CLI, "empty item")
def _(w, inp, out):
    return _cli("edit", "--checkpoint", w.run_dir() / "trained", "--remove-tasks", "3,,5", "--out", out)


@case("cli_edit_top_k_larger_than_pool", CLI, "--top-k 50", prepare=_cli_scores)
def _(w, inp, out):
    return _cli("edit", "--checkpoint", w.run_dir() / "trained", "--scores", inp / "scores", "--top-k", "50", "--out", out)


@case("cli_edit_scores_of_another_pool", CLI, "another task pool", prepare=lambda w, inp, out: _cli_scores(w, inp, out, "a" * 16))
def _(w, inp, out):
    return _cli("edit", "--checkpoint", w.run_dir() / "trained", "--scores", inp / "scores", "--top-k", "2", "--out", out)


@case("cli_edit_file_that_is_not_scores", CLI, "not a metainfluence scores file")
def _(w, inp, out):
    return _cli("edit", "--checkpoint", w.run_dir() / "trained", "--scores", w.run_dir() / "pools" / "train", "--top-k", "2", "--out", out)


@case("cli_influence_unknown_solver", CLI, "solver", "foo")
def _(w, inp, out):
    return _cli("influence", "--checkpoint", inp / "ck", "--solver", "foo", "--out", out)


@case("cli_influence_nan_damping", CLI, "damping", "nan")
def _(w, inp, out):
    return _cli("influence", "--checkpoint", inp / "ck", "--damping", "nan", "--out", out)


@case("cli_influence_missing_checkpoint", CLI, "does not exist")
def _(w, inp, out):
    return _cli("influence", "--checkpoint", inp / "ck", "--out", out)


# =========================================================================== the table test
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("c", CASES)
def test_bad_input_gives_one_clear_line_and_no_partial_file(c: Case, world, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "file.txt").write_text("a file, not a folder")
    if c.prepare is not None:
        c.prepare(world, inp, out)
    before = _files(tmp_path)

    if c.error == CLI:
        rc, stderr = c.run(world, inp, out)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert rc == 2, (rc, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        message = lines[0]
    else:
        assert isinstance(c.error, type) and issubclass(c.error, MetaInfluenceError)
        with pytest.raises(MetaInfluenceError) as info:
            c.run(world, inp, out)
        assert type(info.value) is c.error, f"{type(info.value).__name__}: {info.value}"
        message = str(info.value)
        assert info.value.__cause__ is None or isinstance(info.value.__cause__, MetaInfluenceError)
    assert message.strip() and "\n" not in message and "Traceback" not in message, message
    for word in c.mentions:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"

    after = _files(tmp_path)
    assert after == before, f"the failed call wrote or changed files: {sorted(set(after) ^ set(before)) or 'contents changed'}"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".part"))]


def test_every_case_is_distinct_and_checks_its_message():
    names = [p.id for p in CASES]
    assert len(set(names)) == len(names)
    # a case that names no word of its message would pass on any error of its class
    assert all(p.values[0].mentions for p in CASES), [p.id for p in CASES if not p.values[0].mentions]


# =========================================================================== nothing is unpickled
_UNPICKLERS = {"pickle", "_pickle", "cpickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def unpickling_sites(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that could unpickle data: any use of a pickle-like module or name,
    ``torch.load`` without ``weights_only=True``, ``np.load``/``numpy.load`` without
    ``allow_pickle=False``, and ``allow_pickle=True``. Strings and comments are ignored."""
    tree = ast.parse(source, filename)
    found = []

    def where(node: ast.AST) -> str:
        return f"{filename}:{getattr(node, 'lineno', '?')}"

    def kw(call: ast.Call, name: str):
        for k in call.keywords:
            if k.arg == name:
                return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
        return None

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom):
                mods, names = [node.module or ""], [a.name for a in node.names]
            else:
                mods, names = [a.name for a in node.names], []
            if any(m.split(".")[0].lower() in _UNPICKLERS for m in mods) or any("pickle" in n.lower() for n in names):
                found.append(f"{where(node)} imports {', '.join(mods)}")
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy") and "load" in names:
                found.append(f"{where(node)} imports {node.module}.load directly")
        elif isinstance(node, ast.Name) and "pickle" in node.id.lower():
            found.append(f"{where(node)} uses {node.id}")
        elif isinstance(node, ast.Attribute) and "pickle" in node.attr.lower():
            found.append(f"{where(node)} uses .{node.attr}")
        elif isinstance(node, ast.Call):
            if kw(node, "allow_pickle") not in (None, False):
                found.append(f"{where(node)} passes allow_pickle={kw(node, 'allow_pickle')}")
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name):
                if f.value.id == "torch" and kw(node, "weights_only") is not True:
                    found.append(f"{where(node)} calls torch.load without weights_only=True")
                if f.value.id in ("np", "numpy") and kw(node, "allow_pickle") is not False:
                    found.append(f"{where(node)} calls {f.value.id}.load without allow_pickle=False")
    return found


def test_the_unpickling_check_catches_what_it_should():
    bad = (
        "import pickle\nfrom joblib import load\nimport numpy as np\nimport torch\n"
        "a = torch.load(f)\nb = np.load(f)\nc = np.load(f, allow_pickle=True)\nd = pd.read_pickle(f)\n"
    )
    found = unpickling_sites(bad)
    for what in ("imports pickle", "imports joblib", "torch.load without", "np.load without", "allow_pickle=True", ".read_pickle"):
        assert any(what in f for f in found), (what, found)
    good = '"""pickle-free"""\n# never unpickles\nimport torch, numpy as np\nx = torch.load(f, weights_only=True)\ny = np.load(f, allow_pickle=False)\n'
    assert unpickling_sites(good) == []


def test_nothing_a_user_hands_in_is_unpickled():
    src = Path(metainfluence.__file__).resolve().parent
    files = sorted(src.rglob("*.py"))
    assert len(files) > 20
    found = [f for path in files for f in unpickling_sites(path.read_text(), str(path.relative_to(src.parent)))]
    assert found == [], "\n".join(found)


def test_a_run_folder_given_as_a_checkpoint_names_its_checkpoints(tmp_path):
    from metainfluence.cli import main
    from metainfluence.errors import CheckpointError
    from metainfluence.meta.checkpoint import load_checkpoint

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--train-tasks", "8", "--val-tasks", "4", "--test-tasks", "4", "--steps", "2",
                 "--meta-batch", "2", "--model-hidden", "8", "--no-progress"]) == 0
    with pytest.raises(CheckpointError, match=rf"{out} is a folder, not a checkpoint; give one of its checkpoints: {out / 'trained'}$"):
        load_checkpoint(out)
