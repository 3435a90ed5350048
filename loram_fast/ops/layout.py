"""Layout normalisation shared by the ops (``stored_transposed`` in csrc/common.h is the compiled twin), and the
bytes a tensor reaches (``byte_span``, also csrc/common.h's)."""
from __future__ import annotations

import torch


def stored_transposed(W: torch.Tensor) -> bool:
    """True for a column-major view (a GPT-2 Conv1D weight seen as out×in): ops then work on ``W.T``, whose rows
    are contiguous in memory."""
    return W.dim() == 2 and W.stride(1) != 1 and W.stride(0) == 1 and W.shape[0] > 1


def row_major(W: torch.Tensor) -> torch.Tensor:
    """W, or ``W.T`` when W is a column-major view: what the row-wise kernels read (for W's totals, or for the LoRAM
    product, whose transpose is the same formula with m and n swapped)."""
    return W.T if stored_transposed(W) else W


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that ``t`` (any strides, none negative) can reach in memory; ``start == end`` when
    it is empty. Two tensors overlap when each span starts before the other ends."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else -1
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()
