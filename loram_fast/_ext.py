"""The compiled extension ``loram_fast._C`` (csrc/): loading, fake kernels, backend registration.

- ``status(cuda=False)`` → True, or a one-line string saying why the ``cpu-ext`` (or ``cuda``) backend is
  unavailable. The first call loads the extension: the module built at install (``pip install
  --no-build-isolation -e .``) when it imports with this torch, else the per-machine build of
  :mod:`loram_fast.build` (cached; compiled on first use, once, announced at WARNING level; a failure is
  remembered). CPU sources only unless ``LORAM_FAST_CUDA=1``. ``LORAM_FAST_NO_EXT=1`` disables native code.
  Importing loram_fast never compiles.
- On success the ops are registered with ``torch.library`` (schemas in ``csrc/ops.cpp``, fake kernels below, so
  they work on meta tensors and under ``torch.compile``) and their Python wrappers with ``ops.dispatch``.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from . import build

logger = logging.getLogger(__name__)

KIND_IDS = {"dst1": 0, "dct2": 1}


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, one-line reason). The module built at install (``loram_fast._C``) if it imports
    with this torch, else the per-machine build of :mod:`loram_fast.build` (cached, or compiled now, once)."""
    if os.environ.get("LORAM_FAST_NO_EXT") == "1":
        return None, "disabled by LORAM_FAST_NO_EXT=1"
    try:
        module = importlib.import_module("loram_fast._C")
    except ImportError:
        try:
            module = build.build(cuda=os.environ.get("LORAM_FAST_CUDA") == "1" and torch.cuda.is_available())
        except build.BuildError as exc:
            return None, str(exc)
    _register(module)
    return module, None


def status(cuda: bool = False) -> bool | str:
    module, reason = _load()
    if module is None:
        return reason
    if not cuda:
        return True
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not getattr(module, "with_cuda", False):
        return "the extension was built without CUDA kernels (CPU-only torch, no nvcc, or LORAM_FAST_CUDA unset)"
    return True


def _register_fakes() -> None:
    lib = "loram_fast::"

    @torch.library.register_fake(lib + "basis_fill_")
    def _(out, kind):
        return None

    @torch.library.register_fake(lib + "basis_fill_scaled_")
    def _(out, scale, kind):
        return None

    @torch.library.register_fake(lib + "basis_fill_batched_")
    def _(out, ns, rs, offsets, kind):
        return None

    @torch.library.register_fake(lib + "row_moments")
    def _(W):
        return W.new_empty(W.shape[0], dtype=torch.float32), W.new_empty(W.shape[0], dtype=torch.float32)

    @torch.library.register_fake(lib + "col_sq")
    def _(W):
        return W.new_empty(W.shape[1], dtype=torch.float32)

    @torch.library.register_fake(lib + "lowrank_update_")
    def _(W, B, A, alpha):
        return None

    @torch.library.register_fake(lib + "loram_residual_")
    def _(W, coef, r, kind):
        return None


def _register(module) -> None:
    from .ops import dispatch
    from .ops.moments import combine_rows

    _register_fakes()
    ops = torch.ops.loram_fast
    backends = ["cpu-ext"] + (["cuda"] if getattr(module, "with_cuda", False) else [])

    def dst_basis(n, r, kind="dst1", dtype=torch.float32, device=None):
        out = torch.empty(n, r, dtype=dtype, device=device)
        ops.basis_fill_(out, KIND_IDS[kind])
        return out

    def scaled_basis(n, r, scale, kind="dst1", dtype=torch.float32):
        out = torch.empty(n, r, dtype=dtype, device=scale.device)
        ops.basis_fill_scaled_(out, scale, KIND_IDS[kind])
        return out

    def dst_basis_batched(shapes, kind="dst1", dtype=torch.float32, device=None):
        sizes = [n * r for n, r in shapes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        ops.basis_fill_batched_(flat, [n for n, _ in shapes], [r for _, r in shapes], offsets, KIND_IDS[kind])
        return [flat[o:o + s].view(n, r) for o, s, (n, r) in zip(offsets, sizes, shapes)]

    def weight_moments(W, rows=False, cols=False):
        row_sum, row_sq = ops.row_moments(W)
        return combine_rows(W, row_sum, row_sq, rows, ops.col_sq(W) if cols else None)

    def lowrank_update_(W, B, A, alpha):
        ops.lowrank_update_(W, B.to(device=W.device, dtype=torch.float32), A.to(device=W.device, dtype=torch.float32),
                            float(alpha))
        return W

    def loram_residual_(W, coef, r, kind="dst1", bases=None):  # the kernel builds its own basis values
        ops.loram_residual_(W, float(coef), int(r), KIND_IDS[kind])
        return W

    for backend in backends:
        for name, fn in [("dst_basis", dst_basis), ("scaled_basis", scaled_basis),
                         ("dst_basis_batched", dst_basis_batched), ("weight_moments", weight_moments), ("lowrank_update_", lowrank_update_),
                         ("loram_residual_", loram_residual_)]:
            dispatch.register(name, backend)(fn)
