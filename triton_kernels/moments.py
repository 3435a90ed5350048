"""Triton kernel: one-pass per-row sums and sums of squares of W (m×n, any strides), fp32 accumulation. The op
(``loram_fast.ops.moments.weight_moments``) combines them across rows in fp64, as for every backend."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_moments_kernel(w_ptr, sum_ptr, sq_ptr, m, n, stride_m, stride_n, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols[None, :] < n)
        x = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n,
                    mask=mask, other=0.0).to(tl.float32)
        acc += x
        acc_sq += x * x
    tl.store(sum_ptr + rows, tl.sum(acc, axis=1), mask=row_mask)
    tl.store(sq_ptr + rows, tl.sum(acc_sq, axis=1), mask=row_mask)


def row_moments(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row sums, per-row sums of squares) of W, fp32, length m."""
    m, n = W.shape
    row_sum = torch.empty(m, dtype=torch.float32, device=W.device)
    row_sq = torch.empty(m, dtype=torch.float32, device=W.device)
    BLOCK_M, BLOCK_N = 16, 128
    _row_moments_kernel[(triton.cdiv(m, BLOCK_M),)](W, row_sum, row_sq, m, n, W.stride(0), W.stride(1),
                                                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return row_sum, row_sq
