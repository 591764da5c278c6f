"""Worker for tests/test_resume.py: one leave-one-out ground-truth run into a resumable store.

    python tests/resume_worker.py STORE_DIR RESULT_STEM

Builds a small float64 MAML problem (8 tasks, tanh MLP), refines it to λ* with exact-Hessian
Newton, then runs ``leave_one_out(..., out_dir=STORE_DIR)`` with Newton re-optimisation and writes
the returned tensors to ``RESULT_STEM.safetensors``. It prints one line per event on stdout:

    UNIT <name>       a re-optimisation starts (name = control | loo_<k>): a unit not found in the store
    PAUSED <path>     (only with the pause hook) the worker is inside an atomic write and waits to be killed
    FINISHED          the run completed and the result file is written

Test hooks (environment variables; the library itself has none):

    RESUME_UNIT_SLEEP=S   sleep S seconds inside every re-optimisation (a slow unit, killable mid-way)
    RESUME_PAUSE_AT=N     during the N-th atomic write of a ``loo_*`` tensor file (counted from 1), stop
                          right after the temporary file was created, print PAUSED and sleep until killed
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import random_tasks, small_problem  # noqa: E402

import metainfluence.evaluation.groundtruth as gt  # noqa: E402
from metainfluence.io import write_tensors  # noqa: E402
from metainfluence.meta.newton import newton_refine  # noqa: E402
from metainfluence.meta.refine import RefineSettings  # noqa: E402

N_TASKS = 8


def say(line: str) -> None:
    print(line, flush=True)


def install_hooks() -> None:
    unit_sleep = float(os.environ.get("RESUME_UNIT_SLEEP", "0") or 0)
    pause_at = int(os.environ.get("RESUME_PAUSE_AT", "0") or 0)

    real_reoptimise = gt.reoptimise

    def reoptimise(problem, lam, tasks, settings, refine_settings, w=None, anchor=None):
        name = "control" if w is None else f"loo_{int(torch.argmin(w))}"
        say(f"UNIT {name}")
        out = real_reoptimise(problem, lam, tasks, settings, refine_settings, w, anchor=anchor)
        if unit_sleep:
            time.sleep(unit_sleep)
        return out

    gt.reoptimise = reoptimise

    if pause_at:
        real_mkstemp = tempfile.mkstemp
        seen = {"n": 0}

        def mkstemp(*args, **kwargs):
            fd, path = real_mkstemp(*args, **kwargs)
            name = os.path.basename(path)
            if name.startswith(".loo_") and ".safetensors." in name:
                seen["n"] += 1
                if seen["n"] == pause_at:
                    say(f"PAUSED {path}")
                    while True:  # wait for SIGKILL
                        time.sleep(60)
            return fd, path

        tempfile.mkstemp = mkstemp  # metainfluence.io calls tempfile.mkstemp


def main() -> int:
    store, result = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)  # identical floating-point reductions in every run
    problem, lam0 = small_problem(steps=1, lr=0.3, hidden=(4,), weight_decay=1e-2)
    train = random_tasks(n=N_TASKS, seed=0)
    val = random_tasks(n=4, seed=1)
    lam_star, rep = newton_refine(problem, lam0, train, tol=1e-10)
    install_hooks()
    out = gt.leave_one_out(problem, lam_star, train, val, gt.GroundTruthSettings(n_loo=N_TASKS, method="newton"),
                           RefineSettings(tol=1e-10), out_dir=store)
    write_tensors(result.with_name(result.name + ".safetensors"), {
        "tasks": out["tasks"],
        "true_delta_f": out["true_delta_f"],
        "true_delta_lam": out["true_delta_lam"],
        "f_control": torch.tensor(out["f_control"], dtype=torch.float64),
        "lam_star": lam_star,
    })
    say("FINISHED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
