"""Fresh host memory without a page fault per 4 KiB.

A new CPU tensor's pages are mapped by the kernel on first touch, one fault per 4 KiB page: filling 400 MB of fresh
memory takes ~100 ms on a 2-core VM against ~10 ms into memory already mapped (``bench/floor.py``), more than a whole
LoRAM init. Where the kernel's transparent huge pages are available on request
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` or ``always``), :func:`empty` asks for them
(``madvise(MADV_HUGEPAGE)``) on the 2 MiB-aligned inside of a new tensor of 2 MiB or more before anything touches
it: one fault per 2 MiB. The tensor is an ordinary torch tensor from torch's allocator; the advice changes no value
and no semantics, and is skipped silently where it is not available (other systems, GPU tensors, small tensors).
The advice belongs to the address range: when the allocator reuses it for a later tensor, that tensor gets huge
pages too. ``LORAM_FAST_HUGE_PAGES=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's ``madvise`` where huge pages can be requested, else None."""
    if not sys.platform.startswith("linux") or os.environ.get("LORAM_FAST_HUGE_PAGES", "1") == "0":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        if "[never]" in mode:
            return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape, *, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, with huge pages requested for a large CPU tensor."""
    out = torch.empty(shape, dtype=dtype, device=device)
    madvise = _madvise() if out.device.type == "cpu" else None
    nbytes = out.numel() * out.element_size()
    if madvise is not None and nbytes >= _HUGE:
        start = out.data_ptr()
        first = -(-start // _HUGE) * _HUGE
        last = (start + nbytes) // _HUGE * _HUGE
        if last > first:
            madvise(first, last - first, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out


def clone(t: torch.Tensor, device=None) -> torch.Tensor:
    """A contiguous copy of ``t`` (on ``device``, default t's) in memory from :func:`empty`."""
    out = empty(t.shape, dtype=t.dtype, device=t.device if device is None else device)
    return out.copy_(t)
