"""A ground-truth run killed with SIGKILL resumes to bit-identical results (docs/method.md §10, issue #6).

Three interrupted/resumed processes of ``tests/resume_worker.py`` (leave-one-out over 8 tasks, exact
Newton re-optimisation, store in ``out_dir``) against one uninterrupted reference process:

1. run 1, slowed down inside every unit, is killed as soon as the store holds ≥ 2 finished
   leave-one-out units (so it dies in the middle of a unit);
2. run 2 resumes, and is killed inside the atomic write of the first unit it computes (a temporary
   file is on disk at that moment);
3. run 3 resumes to completion.

Checks: each resumed run recomputes exactly the units the store lacked (finished units are neither
recomputed nor rewritten), no temporary file survives, and the final result equals the
uninterrupted run's with ``torch.equal``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from metainfluence.io import read_tensors

WORKER = Path(__file__).resolve().parent / "resume_worker.py"
N_TASKS = 8
ALL_UNITS = {"control", *(f"loo_{k}" for k in range(N_TASKS))}
TIMEOUT = 120.0


class Worker:
    """A worker process whose stdout lines are collected by a thread."""

    def __init__(self, store: Path, result: Path, **env: str):
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(store), str(result)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=environ)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def drain(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def wait_for_line(self, prefix: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        self.kill()
        raise AssertionError(f"worker never printed {prefix!r}; stdout {self.seen}, stderr {self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)

    def finish(self, timeout: float = TIMEOUT) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not finish in {timeout} s; stdout {self.drain()}")
        self._reader.join(timeout=10)
        assert self.proc.returncode == 0, f"worker failed ({self.proc.returncode}): {self.stderr()}"
        assert self.drain()[-1] == "FINISHED"

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""

    def units(self) -> list[str]:
        return [line.split()[1] for line in self.drain() if line.startswith("UNIT ")]


def finished_units(store: Path) -> set[str]:
    """Units whose JSON (written last, so it marks completion) is in the store."""
    return {p.stem for p in store.glob("*.json") if p.stem != "manifest"}


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


def snapshot(store: Path, units: set[str]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for u in units for p in (store / f"{u}.json", store / f"{u}.safetensors")}


def test_killed_ground_truth_run_resumes_bit_identically(tmp_path):
    ref_store, store = tmp_path / "reference", tmp_path / "store"
    reference = Worker(ref_store, tmp_path / "reference_result")  # uninterrupted, runs alongside

    # 1. slow units; kill mid-unit once >= 2 leave-one-out units are finished
    run1 = Worker(store, tmp_path / "result", RESUME_UNIT_SLEEP="0.5")
    deadline = time.monotonic() + TIMEOUT
    while len(finished_units(store) - {"control"}) < 2:
        assert run1.proc.poll() is None, f"run 1 ended early: {run1.drain()} {run1.stderr()}"
        assert time.monotonic() < deadline, "run 1 made no progress"
        time.sleep(0.02)
    run1.kill()
    done1 = finished_units(store)
    assert 3 <= len(done1) < len(ALL_UNITS), done1
    assert not (tmp_path / "result.safetensors").exists()
    kept = snapshot(store, done1)

    # 2. resume; kill inside the atomic write of the first unit it computes
    run2 = Worker(store, tmp_path / "result", RESUME_PAUSE_AT="1")
    paused = run2.wait_for_line("PAUSED")
    run2.kill()
    tmp_left = temp_files(store)
    assert [str(p) for p in tmp_left] == [paused.split(maxsplit=1)[1]], (tmp_left, paused)  # the crash window was hit
    done2 = finished_units(store)
    assert done2 == done1, "run 2 was killed before finishing any unit"
    first_missing = sorted(ALL_UNITS - done1, key=lambda u: (u != "control", int(u[4:]) if u != "control" else -1))[0]
    assert run2.units() == [first_missing], run2.units()  # finished units were skipped, not recomputed

    # 3. resume to the end
    run3 = Worker(store, tmp_path / "result")
    run3.finish()
    assert set(run3.units()) == ALL_UNITS - done2 and len(run3.units()) == len(ALL_UNITS - done2), run3.units()
    assert snapshot(store, done1) == kept, "finished units were rewritten on resume"
    assert temp_files(tmp_path) == [], temp_files(tmp_path)
    assert finished_units(store) == ALL_UNITS

    reference.finish()
    assert set(reference.units()) == ALL_UNITS
    got = read_tensors(tmp_path / "result.safetensors")
    want = read_tensors(tmp_path / "reference_result.safetensors")
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # the stored units themselves are identical too (but for the seconds each took, a timing)
    untimed = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"}
    for u in sorted(ALL_UNITS):
        assert untimed(store / f"{u}.json") == untimed(ref_store / f"{u}.json"), u
        a, b = read_tensors(store / f"{u}.safetensors"), read_tensors(ref_store / f"{u}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), u


@pytest.mark.parametrize("settings_change", ["refine_tol", "proximal"])
def test_resume_refuses_a_store_of_other_settings(tmp_path, settings_change):
    """Resuming into a folder written with settings that change what its units hold (the re-optimisation's
    tolerance, the proximal term) is refused, not silently mixed; a larger sample is not such a change
    (tests/test_groundtruth.py: its finished units are reused)."""
    import dataclasses

    import helpers

    from metainfluence.errors import CheckpointError
    from metainfluence.evaluation.groundtruth import GroundTruthSettings, leave_one_out
    from metainfluence.meta.refine import RefineSettings

    problem, lam = helpers.small_problem(steps=1, hidden=(4,), weight_decay=1e-1)
    train, val = helpers.random_tasks(n=4, seed=0), helpers.random_tasks(n=2, seed=1)
    rs, gts = RefineSettings(tol=1e-6, max_iter=50), GroundTruthSettings(n_loo=1, method="lbfgs")
    leave_one_out(problem, lam, train, val, gts, rs, out_dir=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    if settings_change == "refine_tol":
        rs = dataclasses.replace(rs, tol=1e-7)
    else:
        gts = dataclasses.replace(gts, proximal=0.5)
    with pytest.raises(CheckpointError, match="other settings"):
        leave_one_out(problem, lam, train, val, dataclasses.replace(gts, n_loo=2), rs, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
