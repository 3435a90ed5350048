"""One-pass moments of a weight: sum, sum of squares, per-row and per-column sums of squares.

``weight_moments(W)`` reads W (m×n, fp32/fp16/bf16, any strides) once and accumulates in fp64 for the
totals and fp32 for the row/column vectors, never holding a full-size fp32 or fp64 copy of W.
``variance(m)`` then gives ``torch.var(W.float())`` (unbiased) from the totals.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import dispatch

# rows per chunk in the torch reference: keeps the fp64 temporary near 8 MiB
_CHUNK_ELEMS = 1 << 20


class Moments(NamedTuple):
    count: int
    sum: torch.Tensor  # 0-d fp64
    sumsq: torch.Tensor  # 0-d fp64
    row_sq: Optional[torch.Tensor]  # (m,) fp32: sum_j W[i, j]^2, or None
    col_sq: Optional[torch.Tensor]  # (n,) fp32: sum_i W[i, j]^2, or None

    def variance(self) -> float:
        return variance(self)

    def row_norms(self) -> torch.Tensor:
        return self.row_sq.sqrt()

    def col_norms(self) -> torch.Tensor:
        return self.col_sq.sqrt()


def variance(m: Moments) -> float:
    """Unbiased variance over all entries (``torch.var``'s default) from the fp64 totals."""
    n = m.count
    if n < 2:
        return float("nan")
    s, ss = float(m.sum), float(m.sumsq)
    return max(ss - s * s / n, 0.0) / (n - 1)


def _check(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"loram_fast.weight_moments: expected a 2-D tensor, got {type(W).__name__} "
                         f"with shape {tuple(getattr(W, 'shape', ()))}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"loram_fast.weight_moments: unsupported dtype {W.dtype}; expected fp32, fp16 or bf16")


@dispatch.register("weight_moments", "torch")
def weight_moments_reference(W: torch.Tensor, rows: bool = False, cols: bool = False) -> Moments:
    """Plain-torch reference: ``torch.var_mean`` (fp32, as ``torch.var(W.float())``) over row chunks, the
    chunks combined in fp64 (``sum = n·mean``, ``sumsq = (n−1)·var + n·mean²``). fp32 weights are read in
    place; fp16/bf16 chunks are converted one at a time."""
    m, n = W.shape
    step = m if W.dtype == torch.float32 else max(1, _CHUNK_ELEMS // max(n, 1))
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=W.device)
    row_sq = torch.empty(m, dtype=torch.float32, device=W.device) if rows else None
    col_sq = torch.zeros(n, dtype=torch.float32, device=W.device) if cols else None
    for start in range(0, m, step):
        c = W[start:start + step].float()
        count = c.numel()
        var, mean = torch.var_mean(c, correction=0)
        mean, var = mean.double(), var.double()
        total += count * mean
        total_sq += count * (var + mean * mean)
        if rows:
            row_sq[start:start + step] = torch.linalg.vector_norm(c, dim=1).square()
        if cols:
            col_sq += c.square().sum(0)
    return Moments(m * n, total, total_sq, row_sq, col_sq)


def weight_moments(W: torch.Tensor, *, rows: bool = False, cols: bool = False, backend=None) -> Moments:
    """Moments of W (m×n) in one pass: ``count``, ``sum``, ``sumsq`` (fp64 0-d tensors) and, when asked,
    ``row_sq`` (m,) and ``col_sq`` (n,) sums of squares in fp32 (``.row_norms()``/``.col_norms()`` for L2 norms).

    >>> mom = weight_moments(W); mom.variance()   # == torch.var(W.float()).item()
    """
    _check(W)
    _, impl = dispatch.resolve("weight_moments", W.device, backend)
    return impl(W, rows, cols)
