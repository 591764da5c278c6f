"""Scale-out over processes (metainfluence.distributed): 2 CPU processes under torchrun (gloo) give
the single-process numbers.

The workers (tests/dist_worker.py) build the same seeded float64 problem, shard 7 training and 5
validation tasks (uneven shards: 4 + 3 and 3 + 2), and rank 0 writes what they computed; the test
compares it with the same quantities computed here in one process, to a relative error of 1e-8.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dist_worker
from metainfluence.distributed import (
    all_reduce_sum,
    distribute,
    distributed_task_influence,
    gather_rows,
    init_distributed,
    local_rows,
    shard,
    shard_counts,
)
from metainfluence.errors import SettingsError
from metainfluence.meta.curvature import TotalHessian
from metainfluence.influence.results import InfluenceResult
from metainfluence.influence.task_if import task_influence
from metainfluence.io import read_tensors

HERE = Path(__file__).resolve().parent
RTOL = 1e-8


def _gloo_missing() -> str | None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return "torch.distributed cannot be imported"
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _launch(out: Path) -> tuple[int, str]:
    """torchrun with 2 gloo workers writing to ``out``; (return code, log)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on the loopback interface (no hostname lookup)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(HERE / "dist_worker.py"), "--out", str(out),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its two workers: the session this test started
        log, _ = proc.communicate()
        pytest.fail(f"the 2-process run did not finish in 120 s:\n{log[-4000:]}")
    return proc.returncode, log


def _finished(out: Path) -> bool:
    """Both ranks passed the last barrier and rank 0 wrote its results."""
    return (out / "results.safetensors").exists() and all((out / f"done.rank{r}").exists() for r in (0, 1))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Run the 2-process job once; return (rank-0 tensors, output folder).

    A worker killed by SIGABRT inside gloo (seen once on CI: "terminate called without an active
    exception", no Python traceback) is retried once on a fresh port; a crash after both ranks
    passed the last barrier is gloo's teardown and is reported as a warning, since every number
    the test compares was already written.
    """
    reason = _gloo_missing()
    if reason:
        pytest.skip(f"distributed test skipped: {reason}")
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp(f"dist{attempt}")
        rc, log = _launch(out)
        if rc == 0:
            break
        if "gloo" in log.lower() and "connect" in log.lower() and not _finished(out):
            pytest.skip(f"gloo could not connect the processes on this machine:\n{log[-2000:]}")
        if _finished(out):
            warnings.warn(f"torchrun exited {rc} after both ranks finished (gloo teardown):\n{log[-1500:]}")
            break
        aborted = "SIGABRT" in log or "terminate called" in log
        assert aborted and attempt == 1, f"torchrun failed (rc {rc}):\n{log[-6000:]}"
    return read_tensors(out / "results.safetensors"), out


@pytest.fixture(scope="module")
def single():
    return dist_worker.build()


_REFERENCE: dict[str, InfluenceResult] = {}


def _reference(single, case: str) -> InfluenceResult:
    """The single-process result of a case (computed once per module)."""
    if case not in _REFERENCE:
        problem, lam, train, val, _ = single
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # λ is not stationary here: irrelevant to the agreement
            _REFERENCE[case] = task_influence(problem, lam, train, val, dist_worker.CASES[case])
    return _REFERENCE[case]


def test_meta_gradient_objective_and_hvps_match_one_process(two_processes, single):
    got, _ = two_processes
    problem, lam, train, val, direction = single
    assert int(got["n_total"]) == len(train)
    assert int(got["restored_n_total"]) < len(train)  # hooks removed on leaving distribute()
    assert _rel(got["meta_gradient"], problem.meta_gradient(lam, train)) <= RTOL
    value, gradient = problem.value_and_gradient(lam, train)
    assert _rel(got["objective"], value.reshape(1)) <= RTOL
    assert _rel(got["value_and_gradient.gradient"], gradient) <= RTOL
    for kind in dist_worker.HVP_KINDS:
        op = TotalHessian(problem, lam, train, kind)
        assert _rel(got[f"hvp.{kind}"], op.matvec(direction)) <= RTOL, kind
        assert _rel(got[f"hmm.{kind}"], op.matmat(torch.stack([direction, lam], 1))) <= RTOL, kind


def test_a_time_limit_stops_every_process_at_the_same_iteration(two_processes):
    """Rank 1's budget is spent before the first iteration and rank 0's is not: rank 0 stops there too (alone it would
    have gone on into a sum rank 1 never joins, and both would wait for ever)."""
    got, _ = two_processes
    assert got["deadline.iterations"].tolist() == [0, 1]


@pytest.mark.parametrize("case", list(dist_worker.CASES))
def test_task_influence_matches_one_process(two_processes, single, case):
    got, _ = two_processes
    ref = _reference(single, case)
    assert float(got[f"{case}.rank_spread"]) == 0.0, "the processes returned different scores"
    assert _rel(got[f"{case}.scores"], ref.scores) <= RTOL
    assert abs(float(got[f"{case}.measurement"]) - ref.measurement) <= RTOL * abs(ref.measurement)
    if ref.self_influence is not None:
        assert _rel(got[f"{case}.self_influence"], ref.self_influence) <= RTOL
    if "s" in ref.extra:
        assert _rel(got[f"{case}.s"], ref.extra["s"]) <= RTOL


def test_rank0_writes_one_scores_file_in_pool_order(two_processes, single):
    _, out = two_processes
    problem, lam, train, val, _ = single
    res = InfluenceResult.load(out / "exact_cg")
    assert res.task_ids.tolist() == list(range(len(train)))
    d = res.diagnostics["distributed"]
    assert d["world_size"] == 2 and d["train_shard_sizes"] == [4, 3] and d["val_shard_sizes"] == [3, 2]
    assert res.diagnostics["n_tasks"] == len(train)
    ref = _reference(single, "exact_cg")
    assert _rel(res.scores, ref.scores) <= RTOL
    assert not list(out.glob("exact_cg.*.tmp"))


# ---------------------------------------------------------------------- single process, no launcher
def test_shard_is_contiguous_balanced_and_covers_the_pool():
    for n in (1, 7, 10, 13):
        for world in range(1, min(n, 5) + 1):
            parts = [shard(n, r, world) for r in range(world)]
            assert torch.cat(parts).tolist() == list(range(n))
            sizes = [len(p) for p in parts]
            assert sizes == shard_counts(n, world) and max(sizes) - min(sizes) <= 1
            assert all(p.dtype == torch.long for p in parts)
    with pytest.raises(SettingsError):
        shard(5, 2, 2)


@pytest.mark.filterwarnings("ignore:λ is not stationary")
def test_without_a_process_group_everything_is_the_single_process_path(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
    t = torch.arange(6.0).reshape(3, 2)
    assert all_reduce_sum(t) is t and gather_rows(t) is t and torch.equal(local_rows(t, 3), t)
    problem, lam, train, val, _ = dist_worker.build()
    before = problem.collective
    with distribute(problem) as p:
        assert p.collective is before  # nothing to install
    settings = dist_worker.CASES["tracin"]
    got = distributed_task_influence(problem, lam, train, val, settings, task_ids=torch.arange(10, 17))
    ref = task_influence(problem, lam, train, val, settings)
    assert torch.equal(got.scores, ref.scores) and got.task_ids.tolist() == list(range(10, 17))
    assert got.diagnostics["distributed"]["world_size"] == 1
