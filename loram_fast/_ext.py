"""The compiled extension ``loram_fast._C`` (csrc/): finding and loading it, nothing else.

``status(cuda=False)`` → True, or a one-line string saying why the ``cpu-ext`` (or ``cuda``) backend is
unavailable. The first call loads the extension: the module built at install (``pip install --no-build-isolation
-e .``) when it imports with this torch, else the per-machine build of :mod:`loram_fast.build` (cached; compiled on
first use, once, announced at WARNING level; a failure is remembered). CPU sources only unless
``LORAM_FAST_CUDA=1``. ``LORAM_FAST_NO_EXT=1`` disables native code. Importing loram_fast never compiles.

Loading defines the operators ``torch.ops.loram_fast.*`` (schemas in ``csrc/ops.cpp``). Their Python side (torch
reference, fake kernel, backend registration) lives with each op in ``loram_fast/ops/``.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from . import build

@functools.lru_cache(maxsize=None)
def load():
    """(module, None) or (None, one-line reason)."""
    if os.environ.get("LORAM_FAST_NO_EXT") == "1":
        return None, "disabled by LORAM_FAST_NO_EXT=1"
    try:
        return importlib.import_module("loram_fast._C"), None
    except ImportError:
        pass
    try:
        return build.build(cuda=os.environ.get("LORAM_FAST_CUDA") == "1" and torch.cuda.is_available()), None
    except build.BuildError as exc:
        return None, str(exc)


def status(cuda: bool = False) -> bool | str:
    module, reason = load()
    if module is None:
        return reason
    if not cuda:
        return True
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not getattr(module, "with_cuda", False):
        return "the extension was built without CUDA kernels (CPU-only torch, no nvcc, or LORAM_FAST_CUDA unset)"
    return True
