"""Scaled and rounded: an fp32 matrix times a scalar, rounded to a narrower dtype and held in fp32.

``scale_rounded(src, alpha, dtype)`` = ``(src * alpha).to(dtype).to(torch.float32)`` (src fp32; dtype fp32, bf16 or
fp16; the product rounded once to fp32, then to ``dtype``, nearest even), in fresh memory from
:func:`~loram_fast.ops.memory.empty`: how the fp32 adapters of a bf16 / fp16 weight are stored (rounded through the
weight's dtype, as the references store them). Backends: ``torch`` (this reference, in chunks: no whole-size
temporary), ``cpu-ext`` / ``cuda`` (``scale_rounded_`` of csrc/: one pass, the rounding of
``kmath::round_to_code``). Triton has no kernel of its own: on GPUs the ``cuda`` kernel (or the reference) runs.

:class:`ScaledRounded` is the same product not formed yet: LoRAM's adapters are returned that way, and the writer
forms them straight into the adapter parameters' own memory (no fresh tensor: fresh pages cost more than the
product, ``bench/floor.py`` at r = 256), all of a call's adapters at once (:func:`form_all`: on ``cpu-ext`` one
compiled ``scale_rounded_batch_``).
"""
from __future__ import annotations

import bisect

import torch

from . import dispatch, memory
from .layout import byte_span

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


@dispatch.register("scale_rounded_batch", "torch", "cuda")
def scale_rounded_batch_each_(outs: list, srcs: list, alphas: list, dtype: torch.dtype, backend: str) -> None:
    """One ``scale_rounded`` call per pair (on GPUs: one launch each; a batched launch is not measured yet)."""
    _, impl = dispatch.resolve("scale_rounded", outs[0].device, backend)
    for out, src, alpha in zip(outs, srcs, alphas):
        impl(out, src, alpha, dtype)


@dispatch.register("scale_rounded_batch", "cpu-ext")
def scale_rounded_batch_native_(outs: list, srcs: list, alphas: list, dtype: torch.dtype, backend: str) -> None:
    """``scale_rounded_batch_`` of csrc/ (CPU): every pair in one parallel region, the same bits as one call each."""
    torch.ops.loram_fast.scale_rounded_batch_(outs, srcs, [float(a) for a in alphas], _CODES[dtype])


@dispatch.on_native_load
def _fake() -> None:
    torch.library.register_fake("loram_fast::scale_rounded_")(lambda out, src, alpha, code: None)
    torch.library.register_fake("loram_fast::scale_rounded_batch_")(lambda outs, srcs, alphas, code: None)


class ScaledRounded:
    """``scale_rounded(src, alpha, dtype)`` described, not formed (fp32, of ``src``'s shape and device).
    :meth:`tensor` forms it in fresh memory; :meth:`form_into` into a given tensor, where :meth:`forms_in_place`
    says the write can be neither refused nor stopped once it starts (the compiled kernel, after its checks)."""

    __slots__ = ("src", "alpha", "round_to")

    def __init__(self, src: torch.Tensor, alpha: float, round_to: torch.dtype):
        if src.dtype != torch.float32 or not src.is_contiguous() or round_to not in _CODES:
            raise ValueError("loram_fast.ScaledRounded: expected a contiguous fp32 source and a rounding dtype of "
                             f"fp32, bf16 or fp16, got {src.dtype} and {round_to}")
        self.src, self.alpha, self.round_to = src, float(alpha), round_to

    def tensor(self, backend=None) -> torch.Tensor:
        return scale_rounded(self.src, self.alpha, self.round_to, backend=backend)

    def forms_in_place(self, out: torch.Tensor, backend=None) -> bool:
        """Whether :meth:`form_into` ``out`` passes every check of the compiled kernel (same shape, fp32,
        contiguous, same device, no overlap with the source) and runs on it (``cpu-ext`` / ``cuda``)."""
        if (type(out) is not torch.Tensor or out.dtype != torch.float32 or out.shape != self.src.shape
                or not out.is_contiguous() or out.device != self.src.device or out.requires_grad):
            return False
        (a0, a1), (b0, b1) = byte_span(out), byte_span(self.src)
        if a0 < b1 and b0 < a1:
            return False
        name, _ = dispatch.resolve("scale_rounded", out.device, backend)
        return name in dispatch.WRITES_CANNOT_FAIL

    def form_into(self, out: torch.Tensor, backend=None) -> None:
        scale_rounded(self.src, self.alpha, self.round_to, out=out, backend=backend)


def form_all(pairs: list, backend=None) -> None:
    """:meth:`ScaledRounded.form_into` of every ``(out, value)`` pair, the same bits as one call each: on ``cpu-ext``
    one compiled call per rounding dtype (every check before the first store; one parallel region over all the
    entries, no call per adapter). The outs must be pairwise disjoint and overlap no other pair's source."""
    groups: dict = {}
    for out, value in pairs:
        groups.setdefault((value.round_to, out.device), []).append((out, value))
    for (dtype, device), items in groups.items():
        name, impl = dispatch.resolve("scale_rounded_batch", device, backend)
        impl([out for out, _ in items], [v.src for _, v in items], [v.alpha for _, v in items], dtype, name)


def formable_together(pairs: list) -> bool:
    """Whether :func:`form_all` accepts ``pairs`` (each already passing :meth:`ScaledRounded.forms_in_place`): the
    outs pairwise disjoint, and none overlapping any pair's source (what the compiled batch checks first)."""
    outs = sorted(byte_span(out) for out, _ in pairs if out.numel())
    if any(b[0] < a[1] for a, b in zip(outs, outs[1:])):
        return False
    starts = [a for a, _ in outs]
    for lo, hi in {byte_span(v.src) for _, v in pairs if v.src.numel()}:
        k = bisect.bisect_left(starts, hi)  # outs starting before the source ends; the last of them may overlap it
        if k and outs[k - 1][1] > lo:
            return False
    return True
