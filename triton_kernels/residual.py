"""Triton kernels: in-place residual updates in the weight's own dtype.

- ``lowrank_update_``: ``W[i, j] += alpha · Σ_k B[i, k] A[k, j]`` tile by tile: W tile read in its dtype, fp32
  product (``tl.dot`` in IEEE fp32), one rounding on store. W may have any strides (e.g. a Conv1D transpose).
- ``loram_residual_``: ``W −= coef · V_r U_rᵀ`` with the basis tiles generated in the kernel from integer phases
  (:func:`bases.basis_value`): reads and writes W once, reads no basis tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loram_fast.ops import dispatch

from .bases import KIND_IDS, basis_value


@triton.jit
def _lowrank_update_kernel(w_ptr, b_ptr, a_ptr, m, n, r, alpha, s_wm, s_wn, s_bm, s_br, s_ar, s_an,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        b = tl.load(b_ptr + rows[:, None] * s_bm + ks[None, :] * s_br,
                    mask=(rows[:, None] < m) & (ks[None, :] < r), other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ks[:, None] * s_ar + cols[None, :] * s_an,
                    mask=(ks[:, None] < r) & (cols[None, :] < n), other=0.0).to(tl.float32)
        acc += tl.dot(b, a, input_precision="ieee")
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    ptrs = w_ptr + rows[:, None].to(tl.int64) * s_wm + cols[None, :].to(tl.int64) * s_wn
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (w + alpha * acc).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _loram_residual_kernel(w_ptr, m, n, r, coef, s_wm, s_wn, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        v = basis_value(rows64[:, None], ks[None, :], m64, KIND)  # V_r tile, BLOCK_M×BLOCK_K
        u = basis_value(cols64[None, :], ks[:, None], n64, KIND)  # U_rᵀ tile, BLOCK_K×BLOCK_N
        v = tl.where(ks[None, :] < r, v, 0.0)
        u = tl.where(ks[:, None] < r, u, 0.0)
        acc += tl.dot(v, u, input_precision="ieee")
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    ptrs = w_ptr + rows64[:, None] * s_wm + cols64[None, :] * s_wn
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (w - coef * acc).to(w_ptr.dtype.element_ty), mask=mask)


BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 16


@dispatch.register("lowrank_update_", "triton")
def lowrank_update_triton_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    m, n = W.shape
    r = B.shape[1]
    B = B.to(device=W.device, dtype=torch.float32)
    A = A.to(device=W.device, dtype=torch.float32)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _lowrank_update_kernel[grid](W, B, A, m, n, r, float(alpha), W.stride(0), W.stride(1), B.stride(0), B.stride(1),
                                 A.stride(0), A.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return W


@dispatch.register("loram_residual_", "triton")
def loram_residual_triton_(W: torch.Tensor, coef: float, r: int, kind: str = "dst1", bases=None) -> torch.Tensor:
    """``bases`` is ignored: the kernel generates the basis tiles itself."""
    m, n = W.shape
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _loram_residual_kernel[grid](W, m, n, r, float(coef), W.stride(0), W.stride(1), KIND=KIND_IDS[kind],
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return W
