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


def reduced_angle(phase: torch.Tensor, half: int) -> torch.Tensor:
    """``π·phase/half`` in fp64 with the integer phase (int64) first reduced into (−half, half]: the angle of
    ``sin(π·phase/half)`` and ``cos(π·phase/half)`` with the least rounding (``kmath::reduce_phase`` in
    csrc/kernel_math.h)."""
    t = torch.remainder(phase, 2 * half)
    return torch.where(t > half, t - 2 * half, t).double() * (math.pi / half)


def sinpi_frac(phase: torch.Tensor, half: int) -> torch.Tensor:
    return torch.sin(reduced_angle(phase, half))


def cospi_frac(phase: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cos(reduced_angle(phase, half))


def _basis_f64(n: int, r: int, kind: str, device=None) -> torch.Tensor:
    i = torch.arange(n, device=device, dtype=torch.int64).unsqueeze(1)
    k = torch.arange(r, device=device, dtype=torch.int64).unsqueeze(0)
    if kind == "dst1":
        return math.sqrt(2.0 / (n + 1)) * sinpi_frac((i + 1) * (k + 1), n + 1)
    out = math.sqrt(2.0 / n) * cospi_frac((2 * i + 1) * k, 2 * n)
    out[:, 0] *= 1.0 / math.sqrt(2.0)
    return out


def dst_basis_reference(n: int, r: int, kind: str = "dst1", dtype=torch.float32, device=None,
                        transposed: bool = False) -> torch.Tensor:
    """Plain-torch reference of :func:`dst_basis` (computed in fp64, exact angles)."""
    _check(n, r, kind)
    out = _basis_f64(n, r, kind, device).to(dtype)
    return out.T.contiguous() if transposed else out


def basis_column_sums(n: int, r: int, kind: str = "dst1") -> torch.Tensor:
    """``dst_basis(n, r).sum(0)`` in closed form (fp64, length r): DST-I column k sums to
    ``√(2/(n+1))·cot(π(k+1)/(2(n+1)))`` for even k (odd k+1) and to 0 otherwise (``Σ_i sin(iθ)`` with
    ``θ = π(k+1)/(n+1)``); DCT-II column 0 sums to ``√n``, the others to 0."""
    _check(n, r, kind)
    out = torch.zeros(r, dtype=torch.float64)
    if kind == "dct2":
        out[0] = math.sqrt(n)
        return out
    k1 = torch.arange(1, r + 1, 2, dtype=torch.int64)  # odd k+1
    out[0::2] = math.sqrt(2.0 / (n + 1)) / torch.tan(reduced_angle(k1, 2 * (n + 1)))
    return out


dispatch.register("dst_basis", "torch")(dst_basis_reference)
_dst_basis_triton = dispatch.lazy("loram_fast.triton_kernels.bases", "dst_basis")


@dispatch.register("dst_basis", "triton")
def dst_basis_triton(n: int, r: int, kind: str = "dst1", dtype=torch.float32, device=None,
                     transposed: bool = False) -> torch.Tensor:
    out = _dst_basis_triton(n, r, kind, dtype, device)
    return out.T.contiguous() if transposed else out


@dispatch.register("dst_basis", "cpu-ext", "cuda")
def dst_basis_native(n: int, r: int, kind: str = "dst1", dtype=torch.float32, device=None,
                     transposed: bool = False) -> torch.Tensor:
    """``basis_fill_`` of csrc/: the basis value of every entry from its exact integer phase
    (``kmath::basis_value``; the CPU kernel tabulates the 2H distinct values first), written in the layout asked
    for (``transposed``: into the transpose of an r×n tensor)."""
    # plain torch.empty, not memory.empty: a basis is a few MiB, where a huge-page fault can stall for compaction
    # (5 ms for a 5.6 MiB basis of TinyLlama's, against ~1.3 ms of 4 KiB faults)
    rows = torch.empty((r, n), dtype=dtype, device=device) if transposed else None
    out = rows.T if transposed else torch.empty((n, r), dtype=dtype, device=device)
    torch.ops.loram_fast.basis_fill_(out, KINDS.index(kind))
    return rows if transposed else out


@dispatch.on_native_load
def _fake() -> None:
    torch.library.register_fake("loram_fast::basis_fill_")(lambda out, kind: None)


def dst_basis(n: int, r: int, *, kind: str = "dst1", dtype=torch.float32, device=None, backend=None,
              transposed: bool = False) -> torch.Tensor:
    """n×r matrix of orthonormal columns: the first r DST-I (``kind="dst1"``) or DCT-II (``"dct2"``) basis
    vectors of length n. See the module docstring for the entries. ``transposed``: the r×n transpose instead,
    contiguous (the vectors as rows; the compiled kernels write it directly).

    >>> V = dst_basis(4096, 16)            # 4096×16, V.T @ V == I
    """
    _check(n, r, kind)
    device = torch.device(device) if device is not None else torch.device("cpu")
    _, impl = dispatch.resolve("dst_basis", device, backend)
    return impl(n, r, kind, dtype, device, transposed=transposed)
