"""Small dense work on one CPU thread.

The factorisations between the big products (the QR of a tall, skinny m×q panel, the q×q SVD or Cholesky) are
short: split over threads they spend more time in the parallel region's start and barrier than in arithmetic, and
when another process keeps a core busy, a region waits for its descheduled thread (measured on 2 cores: the QR of a
2048×32 panel takes 0.3 ms on one thread and 20 ms on two beside a busy process). ``small_op(device)`` runs its
block on one thread when ``device`` is the CPU (no effect on GPU work), then restores the thread count.
"""
from __future__ import annotations

import contextlib
import glob
import os
import time

import torch


@contextlib.contextmanager
def _num_threads(wanted: int):
    """``wanted`` CPU threads inside the block (nothing changes when that is the current count), then the old count."""
    threads = torch.get_num_threads()
    if wanted == threads:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def small_op(device="cpu"):
    """One CPU thread inside the block for work on ``device`` (a no-op for CUDA work)."""
    return _num_threads(1 if torch.device(device).type == "cpu" else torch.get_num_threads())


_LAST_SAMPLE: list = [-1.0, None]  # (time.monotonic() of the reading, the reading)
SAMPLE_TTL_S = 0.25  # a reading this fresh is reused (the hook initialises layer after layer within milliseconds)


def _runnable_elsewhere() -> int | None:
    """Threads of other processes that are runnable right now, or None where that is not known: the least of three
    samples (this process's own OpenMP workers may stop spinning between the two reads of one sample); a reading
    younger than ``SAMPLE_TTL_S`` is reused."""
    now = time.monotonic()
    if now - _LAST_SAMPLE[0] < SAMPLE_TTL_S:
        return _LAST_SAMPLE[1]
    samples = [_sample() for _ in range(3)]
    _LAST_SAMPLE[:] = [now, None if None in samples else min(samples)]
    return _LAST_SAMPLE[1]


def _sample() -> int | None:
    """Linux: /proc/loadavg's machine-wide running count minus this process's running threads."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for stat in glob.glob("/proc/self/task/*/stat"):
            try:
                with open(stat) as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:
                continue
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(own, 1))


def fair_share():
    """Inside the block, at most as many CPU threads as there are idle cores right now (at least one): beside busy
    processes, a parallel region split over more threads than free cores waits at every barrier for a descheduled
    thread (a time slice each time), so fewer threads finish sooner. The thread count is restored afterwards;
    ``LORAM_FAST_FAIR_SHARE=0`` disables this (results are then independent of the machine's load: a different
    thread count changes the order of some floating-point sums, hence the last bits)."""
    threads = torch.get_num_threads()
    busy = _runnable_elsewhere() if os.environ.get("LORAM_FAST_FAIR_SHARE", "1") != "0" else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return _num_threads(threads if busy is None else max(1, min(threads, cores - busy)))
