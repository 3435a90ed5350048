"""Triton kernel: DoRA's row norms ‖W[i, :] + alpha·(B A)[i, :]‖ (W m×n any strides, B m×r, A r×n fp32), each entry
formed as peft's DoRA layer forms it (``kmath::dora_entry`` of csrc/kernel_math.h: the product and the scaled product
rounded to the adapters' dtype, the sum to the promoted dtype), squares summed in fp32. The op is
``loram_fast.ops.norms.lowrank_row_norms``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, CODE: tl.constexpr):
    if CODE == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif CODE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _row_norms_kernel(w_ptr, b_ptr, a_ptr, out_ptr, m, n, r, stride_m, stride_n, alpha, PRODUCT: tl.constexpr,
                      PROMOTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        mask = row_mask[:, None] & col_mask[None, :]
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, r):
            b = tl.load(b_ptr + rows.to(tl.int64) * r + k, mask=row_mask, other=0.0)
            a = tl.load(a_ptr + k * n + cols.to(tl.int64), mask=col_mask, other=0.0)
            p += b[:, None] * a[None, :]
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n,
                    mask=mask, other=0.0).to(tl.float32)
        v = _round(w + _round(alpha * _round(p, PRODUCT), PRODUCT), PROMOTED)
        v = tl.where(mask, v, 0.0)
        acc += v * v
    tl.store(out_ptr + rows, tl.sqrt(tl.sum(acc, axis=1)), mask=row_mask)


def lowrank_row_norms(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, product: int,
                      promoted: int) -> torch.Tensor:
    """fp32 row norms (length m); dtype codes ``product`` (B A and its scaling) and ``promoted`` (the sum): 0 fp32,
    1 bf16, 2 fp16."""
    m, n = W.shape
    B = B.to(device=W.device, dtype=torch.float32).contiguous()
    A = A.to(device=W.device, dtype=torch.float32).contiguous()
    out = torch.empty(m, dtype=torch.float32, device=W.device)
    BLOCK_M, BLOCK_N = 16, 64
    _row_norms_kernel[(triton.cdiv(m, BLOCK_M),)](W, B, A, out, m, n, B.shape[1], W.stride(0), W.stride(1),
                                                  float(alpha), PRODUCT=product, PROMOTED=promoted, BLOCK_M=BLOCK_M,
                                                  BLOCK_N=BLOCK_N)
    return out
