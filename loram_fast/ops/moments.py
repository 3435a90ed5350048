"""One-pass moments of a weight: count, sum and sum of squares, for its variance.

``weight_moments(W)`` reads W (m×n, fp32/fp16/bf16, any strides) without a full-size fp32 or fp64 copy: per-row
sums and sums of squares in fp32 (every backend), combined across rows in fp64 (:func:`combine_rows`).
``variance(m)`` then gives ``torch.var(W.float())`` (unbiased) from the totals.

Backends: ``torch`` (the reference below), ``cpu-ext`` / ``cuda`` (``row_moments`` of csrc/: eight fp32 lanes
flushed to fp64 every 4096 entries on the CPU, one block per row on the GPU), ``triton``
(``triton_kernels/moments.py``). ``weights_moments(Ws)`` gives the moments of a list of weights: on ``cpu-ext`` one
compiled call (``weights_moments`` of csrc/: every row of every weight in one parallel region, each weight's fp32 row
partials added in fp64 in row order; the single-weight form on ``cpu-ext`` is that call with one weight), elsewhere
one call per weight.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import dispatch
from .layout import row_major

# rows per chunk in the torch reference: keeps the fp64 temporary near 8 MiB
_CHUNK_ELEMS = 1 << 20


class Moments(NamedTuple):
    count: int
    sum: float  # fp64
    sumsq: float  # fp64

    def variance(self) -> float:
        return variance(self)


def variance(m: Moments) -> float:
    """Unbiased variance over all entries (``torch.var``'s default) from the fp64 totals."""
    n = m.count
    if n < 2:
        return float("nan")
    s, ss = m.sum, m.sumsq
    return max(ss - s * s / n, 0.0) / (n - 1)


def _check(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"loram_fast.weight_moments: expected a 2-D tensor, got {type(W).__name__} "
                         f"with shape {tuple(getattr(W, 'shape', ()))}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"loram_fast.weight_moments: unsupported dtype {W.dtype}; expected fp32, fp16 or bf16")


# mean²/var above which the sum / sum-of-squares form loses digits to cancellation: use var_mean instead
_CANCELLATION_LIMIT = 1e4


def _var_mean_chunked(W: torch.Tensor) -> tuple[float, float]:
    """fp64 (sum, sum of squares) from ``torch.var_mean`` over row chunks (stable for any mean)."""
    m, n = W.shape
    step = m if W.dtype == torch.float32 else max(1, _CHUNK_ELEMS // max(n, 1))
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=W.device)
    for start in range(0, m, step):
        c = W[start:start + step].float()
        var, mean = torch.var_mean(c, correction=0)
        mean, var = mean.double(), var.double()
        total += c.numel() * mean
        total_sq += c.numel() * (var + mean * mean)
    return float(total), float(total_sq)


def _checked_totals(W: torch.Tensor, total: float, total_sq: float) -> Moments:
    """Moments from fp64 totals, with :func:`combine_rows`'s fallback where the sum-of-squares form cancels."""
    m, n = W.shape
    count = m * n
    var = (total_sq - total * total / count) / max(count - 1, 1)
    if count > 1 and math.isfinite(var) and (total * total / (count * count)) > _CANCELLATION_LIMIT * max(var, 0.0):
        return Moments(count, *_var_mean_chunked(W))
    return Moments(count, total, total_sq)


def combine_rows(W: torch.Tensor, row_sum: torch.Tensor, row_sq: torch.Tensor) -> Moments:
    """Moments from per-row sums and sums of squares (fp32, from any backend), combined in fp64. When
    mean² > 1e4·var the sum-of-squares form would cancel digits: ``torch.var_mean`` over row chunks then gives
    the totals instead."""
    return _checked_totals(W, float(row_sum.sum(dtype=torch.float64)), float(row_sq.sum(dtype=torch.float64)))


@dispatch.register("weight_moments", "torch")
def weight_moments_reference(W: torch.Tensor) -> Moments:
    """Plain-torch reference: per-row sums and sums of squares in fp32 (fp32 W read in place; fp16/bf16 converted
    ~4 MiB row chunks at a time), combined across rows in fp64 (relative error ~1e-9 on LLM-sized rows)."""
    W = row_major(W)
    if W.dtype == torch.float32:
        return combine_rows(W, W.sum(dim=1), torch.linalg.vector_norm(W, dim=1).square())
    m, n = W.shape
    step = max(1, (_CHUNK_ELEMS // 4) // max(n, 1))
    row_sum = torch.empty(m, dtype=torch.float32, device=W.device)
    row_sq = torch.empty(m, dtype=torch.float32, device=W.device)
    for start in range(0, m, step):
        c = W[start:start + step].float()
        row_sum[start:start + step] = c.sum(dim=1)
        row_sq[start:start + step] = torch.linalg.vector_norm(c, dim=1).square()
    return combine_rows(W, row_sum, row_sq)


@dispatch.register("weights_moments", "cpu-ext")
def weights_moments_native(Ws: list[torch.Tensor]) -> list[Moments]:
    """``weights_moments`` of csrc/ (CPU): every row of every weight in one parallel region, per-row fp32 partials
    (row_moments's) added in fp64 in row order."""
    Ws = [row_major(W) for W in Ws]
    totals = torch.ops.loram_fast.weights_moments(Ws).tolist()
    return [_checked_totals(W, s, q) for W, (s, q) in zip(Ws, totals)]


@dispatch.register("weight_moments", "cpu-ext")
def weight_moments_cpu_ext(W: torch.Tensor) -> Moments:
    return weights_moments_native([W])[0]


@dispatch.register("weight_moments", "cuda")
def weight_moments_native(W: torch.Tensor) -> Moments:
    W = row_major(W)
    return combine_rows(W, *torch.ops.loram_fast.row_moments(W))


@dispatch.register("weight_moments", "triton")
def weight_moments_triton(W: torch.Tensor) -> Moments:
    from loram_fast.triton_kernels.moments import row_moments

    W = row_major(W)
    return combine_rows(W, *row_moments(W))


@dispatch.on_native_load
def _fake() -> None:
    @torch.library.register_fake("loram_fast::row_moments")
    def _(W):
        return W.new_empty(W.shape[0], dtype=torch.float32), W.new_empty(W.shape[0], dtype=torch.float32)

    torch.library.register_fake("loram_fast::weights_moments")(
        lambda weights: weights[0].new_empty((len(weights), 2), dtype=torch.float64, device="cpu"))


def weight_moments(W: torch.Tensor, *, backend=None) -> Moments:
    """Moments of W (m×n) in one pass: ``count`` and the fp64 totals ``sum``, ``sumsq`` (Python floats).

    >>> mom = weight_moments(W); mom.variance()   # == torch.var(W.float()).item()
    """
    _check(W)
    _, impl = dispatch.resolve("weight_moments", W.device, backend)
    return impl(W)


def _each(backend: str):
    """``weights_moments`` as one ``weight_moments`` call per weight on ``backend`` (through the dispatch, so a GPU
    kernel launches on its weight's device; on GPUs a batched launch is not measured yet)."""
    return lambda Ws: [weight_moments(W, backend=backend) for W in Ws]


for _backend in ("torch", "triton", "cuda"):
    dispatch.register("weights_moments", _backend)(_each(_backend))


def weights_moments(Ws: list[torch.Tensor], *, backend=None) -> list[Moments]:
    """:func:`weight_moments` of each weight of a list (2-D, one dtype and device), the same results: on ``cpu-ext``
    one compiled call for all of them (one parallel region, no per-weight call); elsewhere one call per weight."""
    for W in Ws:
        _check(W)
    if not Ws:
        return []
    if len({(W.dtype, W.device) for W in Ws}) > 1:
        raise ValueError("loram_fast.weights_moments: the weights need one dtype and one device")
    _, impl = dispatch.resolve("weights_moments", Ws[0].device, backend)
    return impl(Ws)
