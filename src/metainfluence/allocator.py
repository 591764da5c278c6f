"""Keep large tensor buffers in the C heap instead of returning them to the kernel after every use.

Per-task products vmapped over a chunk of tasks allocate and free buffers of tens of MB many times a
second. glibc serves such sizes with fresh ``mmap`` calls and unmaps them on free, so every product
pays the kernel to zero new pages (on Conv4 Omniglot a large share of wall time was system time).
Raising the mmap and trim thresholds lets freed buffers be reused. The effect is
process-wide, so the CLI and the benchmarks call this; a library user opts in by calling it (or by
setting MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ before Python starts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_tuned: bool | None = None


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, top_pad: int = 256 << 20) -> bool:
    """Apply the thresholds once per process on glibc (Linux); returns whether they were applied.

    32 MiB is the largest mmap threshold glibc accepts on 64-bit; elsewhere (macOS, Windows, musl)
    this does nothing and returns False."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(k, v) == 1 for k, v in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
                                               (_M_TOP_PAD, top_pad)))
    return _tuned


def memory_bytes(device: "str | object" = "cpu") -> int | None:
    """The memory a tensor of ``device`` can use: the GPU's free memory, or this machine's physical memory (None where
    it cannot be read), for refusing an allocation that cannot fit before the work that would fill it."""
    import os

    import torch

    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


# the most memory one automatically sized chunk of tasks may take: a quarter of the device's memory, and on a CPU
# at most 4 GiB (larger chunks barely speed up a vmapped pass there, and the rest of the run needs the memory)
CHUNK_SHARE, CPU_CHUNK_CAP = 0.25, 4 << 30


def chunk_budget_bytes(device: "str | object" = "cpu") -> int:
    """The memory budget of one automatically sized chunk of per-task work on ``device``."""
    import torch

    total = memory_bytes(device) or (16 << 30)
    budget = int(CHUNK_SHARE * total)
    return budget if torch.device(device).type == "cuda" else min(budget, CPU_CHUNK_CAP)
