"""The compiled extension ``loram_fast._C`` (csrc/): loading, JIT build, fake kernels, backend registration.

- ``status(cuda=False)`` → True, or a string saying why the ``cpu-ext`` (or ``cuda``) backend is unavailable.
  The first call loads the extension: the module built at install (``pip install --no-build-isolation -e .``), or
  else a JIT build of ``csrc/`` with ninja (cached by torch in its extensions directory; CPU sources only unless
  ``LORAM_FAST_CUDA=1``). ``LORAM_FAST_NO_EXT=1`` disables native code. Importing loram_fast never compiles.
- On success the ops are registered with ``torch.library`` (schemas in ``csrc/ops.cpp``, fake kernels below, so
  they work on meta tensors and under ``torch.compile``) and their Python wrappers with ``ops.dispatch``.
"""
from __future__ import annotations

import functools
import glob
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
KIND_IDS = {"dst1": 0, "dct2": 1}


def _clear_stale_lock(name: str, max_age_s: float = 900.0) -> None:
    """torch's JIT build waits forever on the lock file of a build that was killed midway: drop one that is older
    than any real build of this extension."""
    import time

    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > max_age_s:
            logger.warning("loram_fast: removing a stale build lock left by an interrupted build (%s)", lock.name)
            lock.unlink()
    except (OSError, ImportError):  # pragma: no cover - best effort (a private torch helper)
        pass


def _jit_build():
    from torch.utils.cpp_extension import load

    _clear_stale_lock("loram_fast_C")

    sources = sorted(glob.glob(str(_CSRC / "*.cpp")) + glob.glob(str(_CSRC / "cpu" / "*.cpp")))
    if not sources:
        raise RuntimeError(f"no C++ sources found next to the package ({_CSRC.name}/ is not shipped in this install)")
    # at::parallel_for is OpenMP code in torch's headers: without -fopenmp the extension's loops run on one thread
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cflags = ["-O3", "-std=c++17", *omp]
    kwargs = {"extra_ldflags": omp}
    if os.environ.get("LORAM_FAST_CUDA") == "1" and torch.cuda.is_available():
        sources += sorted(glob.glob(str(_CSRC / "cuda" / "*.cu")))
        cflags.append("-DLORAM_FAST_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", "-DLORAM_FAST_WITH_CUDA"]
    return load(name="loram_fast_C", sources=sources, extra_cflags=cflags, verbose=False, **kwargs)


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, reason)."""
    if os.environ.get("LORAM_FAST_NO_EXT") == "1":
        return None, "disabled by LORAM_FAST_NO_EXT=1"
    try:
        module = importlib.import_module("loram_fast._C")
    except ImportError as exc:
        prebuilt_error = str(exc)
        if not (_CSRC / "ops.cpp").exists():
            return None, f"not built at install ({prebuilt_error}) and no C++ sources for a JIT build"
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return None, f"not built at install ({prebuilt_error}) and ninja is missing for a JIT build (pip install ninja)"
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return None, f"not built at install ({prebuilt_error}) and no C++ compiler for a JIT build"
        try:
            logger.info("loram_fast: building the C++ extension (first use only; cached afterwards)")
            module = _jit_build()
        except Exception as exc2:  # a broken toolchain must not break the package: fall back to torch
            logger.warning("loram_fast: building the C++ extension failed; using the torch backend (%s)", exc2)
            return None, f"JIT build failed: {exc2}"
    _register(module)
    return module, None


def status(cuda: bool = False) -> bool | str:
    module, reason = _load()
    if module is None:
        return reason
    if not cuda:
        return True
    if not getattr(module, "with_cuda", False):
        return "the extension was built without CUDA kernels (CPU-only torch, no nvcc, or LORAM_FAST_CUDA unset)"
    if not torch.cuda.is_available():
        return "no CUDA device"
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

    def loram_residual_(W, coef, r, kind="dst1"):
        ops.loram_residual_(W, float(coef), int(r), KIND_IDS[kind])
        return W

    for backend in backends:
        for name, fn in [("dst_basis", dst_basis), ("scaled_basis", scaled_basis),
                         ("dst_basis_batched", dst_basis_batched), ("weight_moments", weight_moments), ("lowrank_update_", lowrank_update_),
                         ("loram_residual_", loram_residual_)]:
            dispatch.register(name, backend)(fn)
