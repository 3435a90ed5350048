"""Scaled and rounded: an fp32 matrix times a scalar, rounded to a narrower dtype and held in fp32.

``scale_rounded(src, alpha, dtype)`` = ``(src * alpha).to(dtype).to(torch.float32)`` (src fp32; dtype fp32, bf16 or
fp16; the product rounded once to fp32, then to ``dtype``, nearest even), in fresh memory from
:func:`~loram_fast.ops.memory.empty`: how the fp32 adapters of a bf16 / fp16 weight are stored (rounded through the
weight's dtype, as the references store them). Backends: ``torch`` (this reference, in chunks: no whole-size
temporary), ``cpu-ext`` / ``cuda`` (``scale_rounded_`` of csrc/: one pass, the rounding of
``kmath::round_to_code``). Triton has no kernel of its own: on GPUs the ``cuda`` kernel (or the reference) runs.
"""
from __future__ import annotations

import torch

from . import dispatch, memory

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CHUNK_ELEMS = 1 << 20


@dispatch.register("scale_rounded", "torch")
def scale_rounded_reference_(out: torch.Tensor, src: torch.Tensor, alpha: float, dtype: torch.dtype) -> None:
    torch.mul(src, alpha, out=out)
    if dtype != torch.float32:
        for chunk in out.view(-1).split(_CHUNK_ELEMS):
            chunk.copy_(chunk.to(dtype))


@dispatch.register("scale_rounded", "cpu-ext", "cuda")
def scale_rounded_native_(out: torch.Tensor, src: torch.Tensor, alpha: float, dtype: torch.dtype) -> None:
    torch.ops.loram_fast.scale_rounded_(out, src, float(alpha), _CODES[dtype])


def scale_rounded(src: torch.Tensor, alpha: float, dtype: torch.dtype, *, out: torch.Tensor | None = None,
                  backend=None) -> torch.Tensor:
    """``(src * alpha).to(dtype).to(fp32)`` for a contiguous fp32 ``src`` of any shape, in one fresh tensor (or in
    ``out``, which may be ``src`` itself: in place)."""
    if src.dtype != torch.float32 or not src.is_contiguous():
        raise ValueError(f"loram_fast.scale_rounded: expected a contiguous fp32 tensor, got {src.dtype} "
                         f"with strides {tuple(src.stride())}")
    if dtype not in _CODES:
        raise ValueError(f"loram_fast.scale_rounded: dtype must be fp32, bf16 or fp16, got {dtype}")
    if out is None:
        out = memory.empty(tuple(src.shape), dtype=torch.float32, device=src.device)
    _, impl = dispatch.resolve("scale_rounded", src.device, backend)
    impl(out, src, alpha, dtype)
    return out


@dispatch.on_native_load
def _fake() -> None:
    torch.library.register_fake("loram_fast::scale_rounded_")(lambda out, src, alpha, code: None)
