"""Batched randomized SVD (Halko, Martinsson, Tropp 2011) with CholeskyQR2 orthonormalisation.

``randomized_svd(A, rank)`` for A (..., m, n) in fp32/fp16/bf16 returns fp32 ``U`` (..., m, rank),
``S`` (..., rank), ``Vh`` (..., rank, n):

    q = min(rank + oversample, m, n);  Ω ~ N(0, 1) of shape n×q
    Y = A Ω;  niter times:  Q = orth(Y),  Z = Aᵀ Q,  Q' = orth(Z),  Y = A Q'
    Q = orth(Y);  B = Qᵀ A (q×n);  Ub, S, Vh = svd(B);  U = Q Ub;  keep the first ``rank``

Products with A go through ``matmul_f32`` (a bf16 A is read as stored and accumulated in fp32; on the CPU only, a
matrix whose fp32 copy fits ``FP32_COPY_BUDGET`` (64 MiB) is converted once instead, which is faster there).
``orth`` is :func:`orthonormalize`: on GPUs :func:`cholesky_qr`, CholeskyQR2 (Gram matrix, Cholesky, triangular
solve, twice) with the small q×q Gram work in fp64, so a few GEMMs replace a serial Householder QR; batch members
whose Cholesky fails or whose factor is too ill-conditioned fall back to ``torch.linalg.qr``. On the CPU, LAPACK's
Householder QR of the tall, skinny panel is faster and is used directly. ``rank >= min(m, n)`` returns the exact
SVD (``torch.linalg.svd`` in fp32, min(m, n) components). Ω comes from ``generator`` if given, else from a
generator seeded with 0 on A's device: results are deterministic by default.
"""
from __future__ import annotations

import torch

from . import dispatch
from .matmul import matmul_f32

# CPU only: a low-precision A whose fp32 copy fits this budget is converted once instead of chunk by chunk in each
# of the ~2·niter+2 products (cheaper in time, bounded in memory); larger matrices are always streamed
FP32_COPY_BUDGET = 64 << 20
# squared condition number of a Gram factor above which CholeskyQR is not trusted (fp64 Gram: eps ~ 1e-16)
_MAX_GRAM_COND = 1e12


def _orth_once(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass: ``Y = Q R`` with ``R = chol(YᵀY)ᵀ``; returns (Q fp32, ok mask over the batch)."""
    Yd = Y.double()
    gram = Yd.transpose(-1, -2) @ Yd
    L, info = torch.linalg.cholesky_ex(gram)
    diag = torch.diagonal(L, dim1=-2, dim2=-1).abs()
    cond2 = (diag.amax(-1) / diag.amin(-1).clamp_min(1e-300)) ** 2
    ok = (info == 0) & torch.isfinite(cond2) & (cond2 < _MAX_GRAM_COND)
    L = torch.where(ok[..., None, None], L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device))
    Q = torch.linalg.solve_triangular(L.transpose(-1, -2), Yd, upper=True, left=False)
    return Q.float(), ok


@dispatch.register("cholesky_qr", "torch")
def cholesky_qr_reference(Y: torch.Tensor) -> torch.Tensor:
    """CholeskyQR2 with a Householder-QR fallback per batch member (see module docstring)."""
    Q, ok1 = _orth_once(Y)
    Q, ok2 = _orth_once(Q)
    bad = ~(ok1 & ok2)
    if bool(bad.any()):
        if Y.dim() == 2:
            return torch.linalg.qr(Y.float()).Q
        Q = Q.clone()
        Q[bad] = torch.linalg.qr(Y[bad].float()).Q
    return Q


def cholesky_qr(Y: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Orthonormal basis Q (..., m, k) of the columns of Y (..., m, k), m >= k, in fp32."""
    if Y.dim() < 2 or Y.shape[-2] < Y.shape[-1]:
        raise ValueError(f"loram_fast.cholesky_qr: expected (..., m, k) with m >= k, got {tuple(Y.shape)}")
    _, impl = dispatch.resolve("cholesky_qr", Y.device, backend)
    return impl(Y)


def orthonormalize(Y: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Orthonormal basis of Y's columns: CholeskyQR2 on GPUs (GEMMs instead of a serial Householder QR);
    LAPACK's Householder QR on the CPU, where it is faster for these tall, skinny panels."""
    if Y.device.type == "cpu":
        return torch.linalg.qr(Y.float()).Q
    return cholesky_qr(Y, backend=backend)


def randomized_svd(A: torch.Tensor, rank: int, *, oversample: int = 8, niter: int = 2,
                   generator: torch.Generator | None = None, backend=None):
    """Rank-``rank`` SVD of A (..., m, n): fp32 (U (..., m, rank), S (..., rank), Vh (..., rank, n)).

    >>> U, S, Vh = randomized_svd(W, 16)          # W 4096×11008 bf16 → U 4096×16, S 16, Vh 16×11008
    """
    if not isinstance(A, torch.Tensor) or A.dim() < 2:
        raise ValueError(f"loram_fast.randomized_svd: expected a tensor of shape (..., m, n), got "
                         f"{tuple(getattr(A, 'shape', ()))}")
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"loram_fast.randomized_svd: unsupported dtype {A.dtype}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"loram_fast.randomized_svd: rank must be a positive integer, got {rank!r}")
    if oversample < 0 or niter < 0:
        raise ValueError(f"loram_fast.randomized_svd: oversample and niter must be >= 0, got {oversample}, {niter}")
    m, n = A.shape[-2:]
    k = min(m, n)
    if rank >= k:
        Af = A.float()
        if not bool(torch.isfinite(Af).all()):
            raise ValueError("loram_fast.randomized_svd: the input holds NaN or Inf values")
        return torch.linalg.svd(Af, full_matrices=False)
    q = min(rank + oversample, k)
    if A.dtype != torch.float32 and A.device.type == "cpu" and 4 * A.numel() <= FP32_COPY_BUDGET:
        A = A.float()
    if generator is None:
        generator = torch.Generator(device=A.device).manual_seed(0)
    omega = torch.randn(n, q, generator=generator, device=A.device, dtype=torch.float32)
    Y = matmul_f32(A, omega, backend=backend)
    # A NaN or Inf anywhere in A reaches the sketch (Ω is Gaussian): one cheap check instead of a pass over A
    if not bool(torch.isfinite(Y).all()):
        raise ValueError("loram_fast.randomized_svd: the input holds NaN or Inf values")
    for _ in range(niter):
        Q = orthonormalize(Y, backend=backend)
        # Aᵀ Q computed as (Qᵀ A)ᵀ: row-major friendly, and a bf16 A is read in column chunks
        Z = orthonormalize(matmul_f32(Q.mT, A, backend=backend).mT, backend=backend)
        Y = matmul_f32(A, Z, backend=backend)
    Q = orthonormalize(Y, backend=backend)
    B = matmul_f32(Q.mT, A, backend=backend)  # Qᵀ A, q×n
    # small core SVD: Bᵀ = Q2 R2 (n×q, q×q), svd(R2ᵀ) = Ur S Vrh, so B = Ur S (Vrh Q2ᵀ)
    Q2, R2 = torch.linalg.qr(B.mT)
    Ur, S, Vrh = torch.linalg.svd(R2.mT)
    U = Q @ Ur[..., :rank]
    Vh = Vrh[..., :rank, :] @ Q2.mT
    return U, S[..., :rank], Vh
