"""Triton kernels: DST-I / DCT-II basis matrices with exact integer phase reduction.

``dst_basis(n, r)`` (n×r): entry ``amp · sin(π P / H)`` (dst1: P = (i+1)(k+1) mod 2H, H = n+1, amp = √(2/(n+1)))
or ``amp · c_k · cos(π P / H)`` (dct2: P = (2i+1)k mod 2H, H = 2n, amp = √(2/n), c_0 = 1/√2). The phase is
reduced in int64 and mapped to (−H, H] before the fp32 angle is formed, so no accuracy is lost for large n.
The batched form fills many bases in one launch, in one flat buffer; the scaled form multiplies row i by scale[i].
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from loram_fast.ops import dispatch

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
def _basis_kernel(out_ptr, offsets_ptr, ns_ptr, rs_ptr, scale_ptr, KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_r = tl.program_id(2)
    n = tl.load(ns_ptr + b).to(tl.int64)
    r = tl.load(rs_ptr + b).to(tl.int64)
    base = tl.load(offsets_ptr + b).to(tl.int64)
    i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask = (i[:, None] < n) & (k[None, :] < r)
    val = basis_value(i[:, None], k[None, :], n, KIND)
    if HAS_SCALE:  # row i times scale[i] (one basis per launch)
        val = val * tl.load(scale_ptr + i, mask=i < n, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + base + i[:, None] * r + k[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(shapes, kind, dtype, device, scale=None):
    sizes = [n * r for n, r in shapes]
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    out = torch.empty(sum(sizes), dtype=dtype, device=device)
    meta = torch.tensor([offsets, [n for n, _ in shapes], [r for _, r in shapes]], dtype=torch.int64, device=device)
    BLOCK_N, BLOCK_R = 64, 16
    grid = (len(shapes), triton.cdiv(max(n for n, _ in shapes), BLOCK_N), triton.cdiv(max(r for _, r in shapes), BLOCK_R))
    _basis_kernel[grid](out, meta[0], meta[1], meta[2], scale if scale is not None else out, KIND=KIND_IDS[kind],
                        HAS_SCALE=scale is not None, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)
    return [out[o:o + n * r].view(n, r) for o, (n, r) in zip(offsets, shapes)]


@dispatch.register("dst_basis", "triton")
def dst_basis_triton(n: int, r: int, kind: str = "dst1", dtype=torch.float32, device=None) -> torch.Tensor:
    return dst_basis_batched_triton([(n, r)], kind, dtype, device)[0]


@dispatch.register("scaled_basis", "triton")
def scaled_basis_triton(n: int, r: int, scale: torch.Tensor, kind: str = "dst1", dtype=torch.float32) -> torch.Tensor:
    """fp32 in the kernel (basis entry × scale); other dtypes are that buffer rounded to ``dtype`` by torch."""
    out = _launch([(n, r)], kind, torch.float32, scale.device, scale=scale.contiguous())[0]
    return out if dtype == torch.float32 else out.to(dtype)


@dispatch.register("dst_basis_batched", "triton")
def dst_basis_batched_triton(shapes, kind="dst1", dtype=torch.float32, device=None) -> list[torch.Tensor]:
    """The kernel writes fp32; other dtypes are one rounding (to nearest) of that buffer, done by torch."""
    if not shapes:
        return []
    out = _launch(list(shapes), kind, torch.float32, device)
    if dtype == torch.float32:
        return out
    flat = out[0].untyped_storage()  # all bases share one buffer: convert it once
    whole = torch.empty(0, dtype=torch.float32, device=out[0].device).set_(flat).to(dtype)
    views, offset = [], 0
    for n, r in shapes:
        views.append(whole[offset:offset + n * r].view(n, r))
        offset += n * r
    return views


__all__ = ["basis_value", "dst_basis_triton", "scaled_basis_triton", "dst_basis_batched_triton"]
