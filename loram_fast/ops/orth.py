"""Orthonormal bases of a matrix's columns: CholeskyQR2 with a Householder-QR fallback (``cholesky_qr``), and
``orthonormalize``, which picks CholeskyQR2 on GPUs and LAPACK's Householder QR on the CPU."""
from __future__ import annotations

import torch

from . import dispatch
from .threads import small_op

# squared condition number of a Gram factor above which CholeskyQR is not trusted (fp64 Gram: eps ~ 1e-16)
_MAX_GRAM_COND = 1e12


def cholesky_pass(Yd: torch.Tensor, reduce=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass in fp64 on Yd (..., m, k): ``Yd = Q R`` with ``R = chol(YdᵀYd)ᵀ``; returns (Q fp64, R, ok
    mask over the batch; where not ok, R is the identity). ``reduce``: applied to the Gram matrix before its
    Cholesky factor (a sum over the ranks holding Yd's rows, for a sharded panel)."""
    gram = Yd.transpose(-1, -2) @ Yd
    if reduce is not None:
        gram = reduce(gram)
    L, info = torch.linalg.cholesky_ex(gram)
    diag = torch.diagonal(L, dim1=-2, dim2=-1).abs()
    cond2 = (diag.amax(-1) / diag.amin(-1).clamp_min(1e-300)) ** 2
    ok = (info == 0) & torch.isfinite(cond2) & (cond2 < _MAX_GRAM_COND)
    L = torch.where(ok[..., None, None], L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device))
    Q = torch.linalg.solve_triangular(L.transpose(-1, -2), Yd, upper=True, left=False)
    return Q, L.transpose(-1, -2), ok


def _orth_once(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass: (Q fp32, ok mask over the batch)."""
    Q, _, ok = cholesky_pass(Y.double())
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
        with small_op():
            return torch.linalg.qr(Y.float()).Q
    return cholesky_qr(Y, backend=backend)
