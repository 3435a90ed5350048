"""Triton kernel: ``matmul_f32(A, B)``: fp32 product of fp32/fp16/bf16 operands (2-D or batched 3-D, batch
broadcast by stride 0), tiles loaded in their stored dtype and accumulated in fp32 (IEEE, no TF32)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, m, n, k, s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + pid_b * s_ab + rows[:, None].to(tl.int64) * s_am + ks[None, :].to(tl.int64) * s_ak,
                    mask=(rows[:, None] < m) & (ks[None, :] < k), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + pid_b * s_bb + ks[:, None].to(tl.int64) * s_bk + cols[None, :].to(tl.int64) * s_bn,
                    mask=(ks[:, None] < k) & (cols[None, :] < n), other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision="ieee")
    tl.store(c_ptr + pid_b * s_cb + rows[:, None].to(tl.int64) * s_cm + cols[None, :].to(tl.int64) * s_cn, acc,
             mask=(rows[:, None] < m) & (cols[None, :] < n))


def matmul_f32(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    A3 = A.reshape(-1, m, k) if A.dim() > 2 else A.unsqueeze(0)
    B3 = B.reshape(-1, k, n) if B.dim() > 2 else B.unsqueeze(0)
    nb = max(A3.shape[0], B3.shape[0])
    if len(batch) > 1 and (A.shape[:-2] != batch or B.shape[:-2] != batch):
        A3 = A.expand(*batch, m, k).reshape(-1, m, k)
        B3 = B.expand(*batch, k, n).reshape(-1, k, n)
    C = torch.empty(nb, m, n, dtype=torch.float32, device=A.device)
    s_ab = A3.stride(0) if A3.shape[0] > 1 else 0
    s_bb = B3.stride(0) if B3.shape[0] > 1 else 0
    BM, BN, BK = 64, 64, 32
    grid = (triton.cdiv(m, BM), triton.cdiv(n, BN), nb)
    _matmul_kernel[grid](A3, B3, C, m, n, k, s_ab, A3.stride(1), A3.stride(2), s_bb, B3.stride(1), B3.stride(2),
                         C.stride(0), C.stride(1), C.stride(2), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    return C.view(*batch, m, n)
