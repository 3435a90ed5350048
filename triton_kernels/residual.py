"""Triton kernels: in-place residual updates in the weight's own dtype.

- ``lowrank_update``: ``W[i, j] += alpha · Σ_k B[i, k] A[k, j]`` tile by tile: W tile read in its dtype, fp32
  product (``tl.dot`` in IEEE fp32), one rounding on store. W may have any strides (e.g. a Conv1D transpose).
- ``loram_residual``: ``W[i, j] −= coef · amp · K(i, j)`` with K the closed form of ``csrc/kernel_math.h``
  (``K = (p_i q_j − q_i p_j) / (c_j − c_i)`` from fp64 row and column terms, fp32 division): O(1) work per entry
  for any r, one read and one write of W; each K serves the entry and its mirror (m−1−i, n−1−j) (K is
  centro-symmetric), as in the C++ kernels. Entries where ``|c_j − c_i| < near_tol`` are left alone (masked); the
  caller writes those few (and their mirrors) from exact phases.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lowrank_update_kernel(w_ptr, b_ptr, a_ptr, m, n, r, alpha, s_wm, s_wn, s_bm, s_br, s_ar, s_an,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        b = tl.load(b_ptr + rows[:, None].to(tl.int64) * s_bm + ks[None, :] * s_br,
                    mask=(rows[:, None] < m) & (ks[None, :] < r), other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ks[:, None] * s_ar + cols[None, :].to(tl.int64) * s_an,
                    mask=(ks[:, None] < r) & (cols[None, :] < n), other=0.0).to(tl.float32)
        acc += tl.dot(b, a, input_precision="ieee")
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    ptrs = w_ptr + rows[:, None].to(tl.int64) * s_wm + cols[None, :].to(tl.int64) * s_wn
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (w + alpha * acc).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _loram_residual_kernel(w_ptr, rows_ptr, cols_ptr, m, n, scale, near_tol, s_wm, s_wn, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < (m + 1) // 2  # rows i < ⌈m/2⌉; row m−1−i is written from row i's K
    cmask = cols < n
    rp = tl.load(rows_ptr + rows, mask=rmask, other=0.0)
    rq = tl.load(rows_ptr + m + rows, mask=rmask, other=0.0)
    rc = tl.load(rows_ptr + 2 * m + rows, mask=rmask, other=0.0)
    cp = tl.load(cols_ptr + cols, mask=cmask, other=0.0)
    cq = tl.load(cols_ptr + n + cols, mask=cmask, other=0.0)
    cc = tl.load(cols_ptr + 2 * n + cols, mask=cmask, other=0.0)
    num = rp[:, None] * cq[None, :] - rq[:, None] * cp[None, :]
    den = cc[None, :] - rc[:, None]
    regular = tl.abs(den) >= near_tol
    den = tl.where(regular, den, 1.0)
    k = num.to(tl.float32) / den.to(tl.float32)
    mask = rmask[:, None] & cmask[None, :] & regular
    ptrs = w_ptr + rows[:, None].to(tl.int64) * s_wm + cols[None, :].to(tl.int64) * s_wn
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (w + scale * k).to(w_ptr.dtype.element_ty), mask=mask)
    # K(m−1−i, n−1−j) = K(i, j): the mirrored entry takes the same K (not the middle row of an odd m)
    mirror = mask & ((m - 1 - rows) != rows)[:, None]
    mptrs = w_ptr + (m - 1 - rows)[:, None].to(tl.int64) * s_wm + (n - 1 - cols)[None, :].to(tl.int64) * s_wn
    w = tl.load(mptrs, mask=mirror, other=0.0).to(tl.float32)
    tl.store(mptrs, (w + scale * k).to(w_ptr.dtype.element_ty), mask=mirror)


BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 16


def lowrank_update(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    m, n = W.shape
    r = B.shape[1]
    B = B.to(device=W.device, dtype=torch.float32).contiguous()
    A = A.to(device=W.device, dtype=torch.float32).contiguous()
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _lowrank_update_kernel[grid](W, B, A, m, n, r, float(alpha), W.stride(0), W.stride(1), B.stride(0), B.stride(1),
                                 A.stride(0), A.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return W


def loram_residual(W: torch.Tensor, row_terms: torch.Tensor, col_terms: torch.Tensor, scale: float,
                   near_tol: float) -> torch.Tensor:
    """``W[i, j] += scale · K(i, j)`` and ``W[m−1−i, n−1−j] += scale · K(i, j)`` for rows i < ⌈m/2⌉ where regular
    (by row i's terms); ``row_terms`` (3·m fp64: p, q, c) and ``col_terms`` (3·n)."""
    m, n = W.shape
    grid = (triton.cdiv((m + 1) // 2, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _loram_residual_kernel[grid](W, row_terms, col_terms, m, n, float(scale), float(near_tol), W.stride(0),
                                 W.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return W
