"""Triton kernels: DST-I / DCT-II basis matrices with exact integer phase reduction.

``dst_basis(n, r)`` (n×r): entry ``amp · sin(π P / H)`` (dst1: P = (i+1)(k+1) mod 2H, H = n+1, amp = √(2/(n+1)))
or ``amp · c_k · cos(π P / H)`` (dct2: P = (2i+1)k mod 2H, H = 2n, amp = √(2/n), c_0 = 1/√2). The phase is
reduced in int64 and mapped to (−H, H] before the fp32 angle is formed, so no accuracy is lost for large n.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

KIND_IDS = {"dst1": 0, "dct2": 1}


@triton.jit
def basis_value(i, k, n, KIND: tl.constexpr):
    """Basis entry (fp32) for row indices i and column indices k (int64 tensors) of a length-n basis."""
    if KIND == 0:
        half = n + 1
        phase = ((i + 1) * (k + 1)) % (2 * half)
        amp = tl.sqrt(2.0 / half.to(tl.float32))
    else:
        half = 2 * n
        phase = ((2 * i + 1) * k) % (2 * half)
        amp = tl.sqrt(2.0 / n.to(tl.float32))
    phase = tl.where(phase > half, phase - 2 * half, phase)
    angle = phase.to(tl.float32) * (3.141592653589793 / half.to(tl.float32))
    if KIND == 0:
        val = amp * tl.sin(angle)
    else:
        val = amp * tl.cos(angle)
        val = tl.where(k == 0, val * 0.7071067811865476, val)
    return val


@triton.jit
def _basis_kernel(out_ptr, n, r, KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask = (i[:, None] < n) & (k[None, :] < r)
    val = basis_value(i[:, None], k[None, :], n.to(tl.int64), KIND)
    tl.store(out_ptr + i[:, None] * r + k[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


def dst_basis(n: int, r: int, kind: str = "dst1", dtype=torch.float32, device=None) -> torch.Tensor:
    """n×r basis, entries computed in fp32 from exact integer phases and stored in ``dtype``."""
    out = torch.empty(n, r, dtype=dtype, device=device)
    BLOCK_N, BLOCK_R = 64, 16
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(r, BLOCK_R))
    _basis_kernel[grid](out, n, r, KIND=KIND_IDS[kind], BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)
    return out
