"""Orthonormal trigonometric bases: DST-I (LoRAM's) and DCT-II (``loram_dct``).

``dst_basis(n, r)`` is the n×r matrix whose column k is the k-th basis vector of length n:

- ``"dst1"``: ``sqrt(2/(n+1)) · sin(π (i+1)(k+1) / (n+1))``; the columns are the first r columns of the
  symmetric orthogonal n×n DST-I matrix (what LoRAM's ``fast_dst_matrix`` slices).
- ``"dct2"``: ``sqrt(2/n) · c_k · cos(π (2i+1) k / (2n))``, ``c_0 = 1/sqrt(2)``, ``c_k = 1`` otherwise:
  the first r orthonormal DCT-II vectors.

Angles are exact: the integer phase ``(i+1)(k+1)`` (resp. ``(2i+1)k``) is reduced modulo its period in
int64 before the sine, so large n loses no accuracy (the reference's fp32 ``(i+1)(k+1)π/(n+1)`` does).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import dispatch

KINDS = ("dst1", "dct2")


def _check(n: int, r: int, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"loram_fast.dst_basis: unknown kind {kind!r}; valid: {KINDS}")
    if not (isinstance(n, int) and isinstance(r, int)) or n < 1 or r < 1:
        raise ValueError(f"loram_fast.dst_basis: n and r must be positive integers, got n={n!r}, r={r!r}")
    if r > n:
        raise ValueError(f"loram_fast.dst_basis: r={r} > n={n}: only n orthonormal vectors of length n exist")


def basis_phase(n: int, r: int, kind: str, device=None) -> tuple[torch.Tensor, int, float]:
    """Integer phases P (n×r int64), half-period H and amplitude so that the basis is
    ``amp · sinpi(P / H)`` for dst1 and ``amp · cospi(P / H)`` (column scale c_k aside) for dct2,
    with ``0 <= P < 2H``."""
    i = torch.arange(n, device=device, dtype=torch.int64).unsqueeze(1)
    k = torch.arange(r, device=device, dtype=torch.int64).unsqueeze(0)
    if kind == "dst1":
        half = n + 1
        return ((i + 1) * (k + 1)) % (2 * half), half, math.sqrt(2.0 / (n + 1))
    half = 2 * n
    return ((2 * i + 1) * k) % (2 * half), half, math.sqrt(2.0 / n)


def _basis_f64(n: int, r: int, kind: str, device=None) -> torch.Tensor:
    phase, half, amp = basis_phase(n, r, kind, device)
    # map to the symmetric range (-H, H] so the fp64 angle stays small
    phase = torch.where(phase > half, phase - 2 * half, phase).double()
    ang = phase * (math.pi / half)
    if kind == "dst1":
        out = amp * torch.sin(ang)
    else:
        out = amp * torch.cos(ang)
        out[:, 0] *= 1.0 / math.sqrt(2.0)
    return out


def dst_basis_reference(n: int, r: int, kind: str = "dst1", dtype=torch.float32, device=None) -> torch.Tensor:
    """Plain-torch reference of :func:`dst_basis` (computed in fp64, exact angles)."""
    _check(n, r, kind)
    return _basis_f64(n, r, kind, device).to(dtype)


dispatch.register("dst_basis", "torch")(dst_basis_reference)


@dispatch.register("scaled_basis", "torch")
def scaled_basis_reference(n: int, r: int, scale: torch.Tensor, kind: str = "dst1", dtype=torch.float32) -> torch.Tensor:
    """Plain-torch reference of :func:`scaled_basis`: the fp64 basis times ``scale`` per row, rounded once."""
    return (_basis_f64(n, r, kind, scale.device) * scale.double()[:, None]).to(dtype)


@dispatch.register("dst_basis_batched", "torch")
def dst_basis_batched_reference(shapes, kind="dst1", dtype=torch.float32, device=None) -> list[torch.Tensor]:
    """Reference of :func:`dst_basis_batched`: one basis at a time."""
    return [dst_basis_reference(n, r, kind, dtype, device) for n, r in shapes]


def dst_basis(n: int, r: int, *, kind: str = "dst1", dtype=torch.float32, device=None, backend=None) -> torch.Tensor:
    """n×r matrix of orthonormal columns: the first r DST-I (``kind="dst1"``) or DCT-II (``"dct2"``) basis
    vectors of length n. See the module docstring for the entries.

    >>> V = dst_basis(4096, 16)            # 4096×16, V.T @ V == I
    """
    _check(n, r, kind)
    device = torch.device(device) if device is not None else torch.device("cpu")
    _, impl = dispatch.resolve("dst_basis", device, backend)
    return impl(n, r, kind, dtype, device)


def scaled_basis(n: int, r: int, scale: torch.Tensor, *, kind: str = "dst1", dtype=torch.float32,
                 backend=None) -> torch.Tensor:
    """``diag(scale) · dst_basis(n, r)``: the basis with row i scaled by ``scale[i]`` (length n, any float dtype,
    on the output's device), computed in one pass and rounded once. Scales the bases by a weight's norms, e.g.
    ``scaled_basis(out, r, weight_moments(W, rows=True).row_norms())`` for the out×r side and ``col_norms()`` for the
    in×r side.
    """
    _check(n, r, kind)
    if not isinstance(scale, torch.Tensor) or scale.shape != (n,) or not scale.is_floating_point():
        raise ValueError(f"loram_fast.scaled_basis: scale must be a float tensor of shape ({n},), got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
    _, impl = dispatch.resolve("scaled_basis", scale.device, backend)
    return impl(n, r, scale, kind, dtype)


def dst_basis_batched(shapes: Sequence[tuple[int, int]], *, kind: str = "dst1", dtype=torch.float32, device=None,
                      backend=None) -> list[torch.Tensor]:
    """Many bases at once: ``[dst_basis(n, r) for n, r in shapes]``. Compiled backends fill every basis
    in one launch (a flat buffer with offsets); the results are views into it."""
    shapes = [(int(n), int(r)) for n, r in shapes]
    for n, r in shapes:
        _check(n, r, kind)
    device = torch.device(device) if device is not None else torch.device("cpu")
    _, impl = dispatch.resolve("dst_basis_batched", device, backend)
    return impl(shapes, kind, dtype, device)
