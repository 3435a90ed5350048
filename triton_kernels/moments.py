"""Triton kernels: one-pass row sums and sums of squares of W (m×n, any strides), fp32 accumulation;
column sums of squares in a second kernel when asked. Totals are combined across rows in fp64 on the host,
exactly as the torch reference combines its per-row results."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loram_fast.ops import dispatch
from loram_fast.ops.moments import Moments, combine_rows


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


@triton.jit
def _col_sq_kernel(w_ptr, out_ptr, m, n, stride_m, stride_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, m, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < m) & col_mask[None, :]
        x = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n,
                    mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=col_mask)


@dispatch.register("weight_moments", "triton")
def weight_moments_triton(W: torch.Tensor, rows: bool = False, cols: bool = False) -> Moments:
    m, n = W.shape
    row_sum = torch.empty(m, dtype=torch.float32, device=W.device)
    row_sq = torch.empty(m, dtype=torch.float32, device=W.device)
    BLOCK_M, BLOCK_N = 16, 128
    _row_moments_kernel[(triton.cdiv(m, BLOCK_M),)](W, row_sum, row_sq, m, n, W.stride(0), W.stride(1),
                                                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    col_sq = None
    if cols:
        col_sq = torch.empty(n, dtype=torch.float32, device=W.device)
        _col_sq_kernel[(triton.cdiv(n, 64),)](W, col_sq, m, n, W.stride(0), W.stride(1), BLOCK_M=32, BLOCK_N=64)
    return combine_rows(W, row_sum, row_sq, rows, col_sq)
