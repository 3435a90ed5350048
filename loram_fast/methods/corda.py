"""CorDA (peft's ``preprocess_corda`` + ``corda_init``): adapters from the SVD of W·C, with C the covariance of the
layer's inputs (``data.estimate_covariances``).

For W (out×in, fp32 math), input covariance C (in×in), rank r, scaling s:

    C' = C + d·mean(diag C)·I      d = 0.01, doubled until ‖C' inv(C') − I‖_F < 0.05 (peft's damping loop)
    U S Vᵀ = SVD(W C')             "ipm" (instruction-previewed): the r largest triplets; "kpm" (knowledge-
                                   preserved): the r smallest
    V = (Vᵀ_r inv(C'))ᵀ            in×r
    A = √(S/s) Vᵀ (r×in),  B = U √(S/s) (out×r),  residual s·B A = U_r S_r Vᵀ_r inv(C')  subtracted from W

"ipm" takes the top-r triplets from :func:`~loram_fast.ops.topsvd.top_svd` on ``W C'`` as an operator (products
``W (C' X)`` and ``(Yᵀ W) C'``): no m×n fp32 matrix, iterated to its residual test; only where that would not pay
(flat spectra, small weights) is ``W C'`` formed for the full SVD. "kpm" needs the full SVD (the r smallest), as
peft.
"""
from __future__ import annotations

import torch

from ..ops.matmul import matmul_f32
from ..ops.sharded import RightProductOperator
from ..ops.topsvd import top_svd
from .common import LayerInit, product_residual

MODES = ("ipm", "kpm")


def check_rank(shape: tuple[int, int], r: int, **_) -> str | None:
    if r > min(shape):
        return f"CorDA needs r <= min(out, in) = {min(shape)}, got r={r}"
    return None


def damped_covariance(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C', inv(C'))`` by peft's damping loop (module docstring), the same operations in the same order."""
    C = C.float()
    n = C.shape[0]
    eye = torch.eye(n, device=C.device)
    damp = 0.01
    for _ in range(64):
        fixed = C + torch.diag(torch.ones(n, device=C.device) * torch.mean(torch.diag(C)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            return fixed, inverse
        damp *= 2
    raise ValueError("loram_fast.corda: the input covariance cannot be damped into an invertible matrix (is it 0?)")


def corda_init(W: torch.Tensor, r: int, scaling: float, *, covariance: torch.Tensor, corda_method: str = "ipm",
               backend=None, cache: dict | None = None) -> LayerInit:
    """The module docstring's init for one layer. ``cache``: a dict shared across layers; layers given the same
    covariance tensor (``data.estimate_covariances`` shares equal ones) reuse its damping."""
    if covariance.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"loram_fast.corda: covariance of shape {tuple(covariance.shape)} for a weight with "
                         f"{W.shape[1]} inputs")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("loram_fast.corda: the weight holds NaN or Inf values")
    key = ("corda_damped", id(covariance), W.device)
    if cache is not None and key in cache and cache[key][0] is covariance:
        _, fixed, inverse = cache[key]
    else:
        fixed, inverse = damped_covariance(covariance.to(W.device))
        if cache is not None:
            cache[key] = (covariance, fixed, inverse)  # holds the covariance: its id stays unique
    if corda_method == "ipm":  # W C' through products (never formed unless the full-SVD fallback runs)
        U, S, Vh, _, _ = top_svd(RightProductOperator(W, fixed, backend=backend), r, backend=backend)
    else:
        WC = matmul_f32(W, fixed, backend=backend)
        U, S, Vh = torch.linalg.svd(WC, full_matrices=False)
        U, S, Vh = U[:, -r:], S[-r:], Vh[-r:]
        del WC
    return corda_from_eigens(W, r, scaling, U, S, (Vh @ inverse).T)  # V = (Vᵀ inv(C'))ᵀ: in×r


def corda_from_eigens(W: torch.Tensor, r: int, scaling: float, U: torch.Tensor, S: torch.Tensor,
                      V: torch.Tensor) -> LayerInit:
    """peft's ``corda_init`` split of cropped eigens (U out×r, S r, V in×r, as ``preprocess_corda`` stores them):
    ``A = √(S/s) Vᵀ``, ``B = U √(S/s)``, residual ``s·B A``."""
    out_dim, in_dim = W.shape
    for name, t in (("S", S), ("U", U), ("V", V)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"loram_fast.corda: the eigens' {name} holds NaN or Inf values")
    if tuple(U.shape) != (out_dim, r) or tuple(S.shape) != (r,) or tuple(V.shape) != (in_dim, r):
        raise ValueError(f"loram_fast.corda: eigens of shapes U {tuple(U.shape)}, S {tuple(S.shape)}, V "
                         f"{tuple(V.shape)} for a weight {out_dim}×{in_dim} at r={r} (were they built for this model "
                         "and rank?)")
    U, S, V = (t.to(device=W.device, dtype=torch.float32) for t in (U, S, V))
    root = (S / scaling).sqrt()
    A, B = (V.T * root[:, None]).contiguous(), (U * root).contiguous()
    return LayerInit(A=A, B=B, scaling=scaling, owned=True, residual=product_residual(scaling, B, A))
