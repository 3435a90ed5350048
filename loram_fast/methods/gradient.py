"""Gradient-based inits: LoRA-One and LoRA-GA (peft's). Pure math on a layer's gradient, no peft.

G is the mean gradient of the loss w.r.t. the base weight W (out×in view), with the adapters disabled.

LoRA-One (arXiv 2502.01235; LoRA-One repository ``run_exp.py``, direction "LoRA-One"): SVD of −G,
    B = U_r √S_r / √σ1,  A = √S_r V_rᵀ / √σ1, then the scale:
    "stable" (default): A, B /= √γ (γ = 128), so s·B A = −s·[G]_r / (γ σ1) — one normalised rank-r GD step;
    "gd": A, B /= s;  "unit": unchanged;  "weightS": A, B *= mean(√(S_W[:r] / s)) with S_W the singular values of W.
    The base weight is NOT offset. (An older commit of the reference, directions "OS-LoRA-*", also multiplies the
    stable scale by out^¼; we follow the current one.) The reference calls ``svd_lowrank(q=512, niter=16)``, which
    fails when min(out, in) < 512: we use the exact SVD (default) or our randomized SVD with q clipped.

LoRA-GA (peft ``LoraLayer.lora_ga_init``): top 2r triplets of G (peft: ``svd_lowrank(G, q=min(4r, k), niter=4)``),
    direction ArB2r (default): A = Vh[:r], B = U[:, r:2r] diag(S[r:2r]); ArBr: A = Vh[1:2r:2], B = U[:, 0:2r:2]·S;
    A2rBr: A = Vh[r:2r], B = U[:, :r]·S; random: a random r of the 2r (``torch.randperm``);
    scale "stable" (γ = 16): B *= out^¼ / √γ;  "weight_svd": B *= σ1(W) / S_B[0];  "gd_scale": A, B /= s;  "unit".
    Residual W − s·B A computed from A and B rounded to W's dtype (peft's convention).
"""
from __future__ import annotations

import torch

from ..ops.rsvd import randomized_svd, randomized_svd_sharded, svd_lowrank_sharded
from ..ops.sharded import MatrixOperator
from ..ops.topsvd import top_svd_sharded
from .common import LayerInit, product_residual

SOLVERS = ("exact", "rsvd", "svd_lowrank")
LORA_ONE_SCALES = ("stable", "gd", "unit", "weightS")
LORA_GA_DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def top_svd(M: torch.Tensor, k: int, *, solver: str, niter: int = 4, q: int | None = None, backend=None):
    """Top-k (U, S, Vh) of M (m×n, fp32) with the named solver:
    "exact" (torch.linalg.svd; pairs signed canonically), "rsvd" (loram_fast.randomized_svd), "svd_lowrank" (torch's,
    with q, as the references). M may also be a sketched gradient or a sharded matrix (a ``MatrixOperator``)."""
    if solver not in SOLVERS:
        raise ValueError(f"loram_fast: unknown solver {solver!r}; valid: {SOLVERS}")
    U, S, Vh = _top_svd_any(M, k, solver=solver, niter=niter, q=q, backend=backend)
    return _canonical_signs(U, S, Vh) if solver == "exact" else (U, S, Vh)


def _top_svd_any(M, k: int, *, solver: str, niter: int, q: int | None, backend):
    if hasattr(M, "left"):  # a sketched gradient Q @ R with orthonormal Q: SVD of the small factor
        Ur, S, Vh = torch.linalg.svd(M.right.float(), full_matrices=False)
        k = min(k, S.shape[0])
        return (M.left @ Ur)[:, :k], S[:k], Vh[:k]
    if isinstance(M, MatrixOperator):
        return _top_svd_sharded(M, k, solver=solver, niter=niter, q=q)
    if not bool(torch.isfinite(M).all()):
        raise ValueError("the gradient holds NaN or Inf values")
    kmax = min(M.shape)
    k = min(k, kmax)
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    elif solver == "rsvd":
        U, S, Vh = randomized_svd(M, k, niter=niter, backend=backend)
    else:
        U, S, V = torch.svd_lowrank(M.float(), q=min(q or k, kmax), niter=niter)
        Vh = V.T
    return U[:, :k], S[:k], Vh[:k]


def _top_svd_sharded(M: MatrixOperator, k: int, *, solver: str, niter: int, q: int | None):
    """The top-k SVD of a matrix split across ranks (a sharded gradient or weight), whole on every rank:
    "exact" the sharded subspace iteration, "rsvd" our sharded randomized SVD, "svd_lowrank" torch's algorithm on
    the sharded products (the same Gaussian draw from torch's global generator, on the taller orientation)."""
    k = min(k, *M.shape)
    if solver == "exact":
        U, S, Vh = top_svd_sharded(M, k)
    elif solver == "rsvd":
        U, S, Vh = randomized_svd_sharded(M, k, niter=niter)
    else:
        U, S, Vh = svd_lowrank_sharded(M, min(q or k, *M.shape), niter=niter)
    U, S, Vh = U[..., :k], S[:k], Vh[:k]
    return M.gather(U, "m"), S, M.gather(Vh.mT, "n").mT


def _canonical_signs(U, S, Vh):
    """Each singular pair (u_i, v_i) signed so that v_i's largest-magnitude entry is positive: the exact solver's
    result then does not depend on the SVD routine (one process's LAPACK or the sharded iteration)."""
    idx = Vh.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(Vh, -1, idx)).squeeze(-1)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, S, Vh * signs[:, None]


def negated(G):
    """−G for a dense, a sketched (``left @ right``) or a sharded gradient."""
    if hasattr(G, "left"):
        return type(G)(left=G.left, right=-G.right)
    if isinstance(G, MatrixOperator):
        return MatrixOperator(-G.local.float(), G.shape, G.sharding, G.backend)
    return -G.float()


def _as_float(W):
    """W in fp32 (a sharded weight's operator as it is: its products accumulate in fp32)."""
    return W if isinstance(W, MatrixOperator) else W.float()


def check_rank(shape, r, **_):
    if r > min(shape):
        return f"rank r={r} exceeds min(out, in)={min(shape)} of the {shape[0]}×{shape[1]} weight"
    return None


def check_lora_ga_rank(shape, r, direction="ArB2r", **_):
    if 2 * r > min(shape):
        return (f"LoRA-GA takes 2r={2 * r} gradient components but the {shape[0]}×{shape[1]} weight has only "
                f"{min(shape)}; use r <= {min(shape) // 2}")
    return None


def lora_one_init(W: torch.Tensor, r: int, scaling: float, *, grad: torch.Tensor, scale: str = "stable",
                  gamma: float = 128.0, solver: str = "exact", niter: int = 16, backend=None) -> LayerInit:
    """LoRA-One adapters from the gradient G (out×in) of weight W (out×in); no residual."""
    if scale not in LORA_ONE_SCALES:
        raise ValueError(f"loram_fast.lora_one: unknown scale {scale!r}; valid: stable, gd, unit, weightS")
    U, S, Vh = top_svd(negated(grad), r, solver=solver, niter=niter, q=512, backend=backend)
    if float(S[0]) <= 0.0:
        raise ValueError("loram_fast.lora_one: the gradient is zero, so the init is undefined (check the loss "
                         "and that the layer takes part in it)")
    root = S[:r].sqrt() / S[0].sqrt()
    B = U[:, :r] * root
    A = root[:, None] * Vh[:r]
    if scale == "stable":
        A, B = A / gamma ** 0.5, B / gamma ** 0.5
    elif scale == "gd":
        A, B = A / scaling, B / scaling
    elif scale == "weightS":
        _, S_w, _ = top_svd(_as_float(W), r, solver="exact" if solver == "exact" else "rsvd", niter=4,
                            backend=backend)
        avg = (S_w[:r] / scaling).sqrt().mean()
        A, B = A * avg, B * avg
    return LayerInit(A=A.contiguous(), B=B.contiguous(), scaling=scaling)


def lora_ga_init(W: torch.Tensor, r: int, scaling: float, *, grad: torch.Tensor, direction: str = "ArB2r",
                 scale: str = "stable", stable_gamma: float = 16, solver: str = "svd_lowrank", backend=None,
                 generator: torch.Generator | None = None, stable_dim: str = "stored",
                 stored_rows: int | None = None) -> LayerInit:
    """peft's LoRA-GA adapters from the gradient G (out×in) of W (out×in); residual from dtype-rounded A, B.

    ``scale="stable"`` multiplies B by ``d^¼/√γ`` with ``d`` the first dimension of the weight as stored
    (``stable_dim="stored"``, peft's choice; ``stored_rows``, when the stored layout is in×out as for GPT-2
    ``Conv1D``) or the output dimension (``stable_dim="out"``)."""
    if direction not in LORA_GA_DIRECTIONS:
        raise ValueError(f"loram_fast.lora_ga: unknown direction {direction!r}; valid: ArBr, A2rBr, ArB2r, random")
    if scale not in LORA_GA_SCALES:
        raise ValueError(f"loram_fast.lora_ga: unknown scale {scale!r}; valid: stable, weight_svd, gd_scale, unit")
    U, S, Vh = top_svd(grad, 2 * r, solver=solver, niter=4, q=min(4 * r, min(grad.shape)), backend=backend)
    if direction == "ArBr":
        A, idx_b = Vh[1:2 * r:2], slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        A, idx_b = Vh[r:2 * r], slice(0, r)
    elif direction == "ArB2r":
        A, idx_b = Vh[:r], slice(r, 2 * r)
    else:
        idx_b = torch.randperm(2 * r, generator=generator)[:r]
        A = Vh[idx_b]
    S_B = S[idx_b]
    B = U[:, idx_b] @ torch.diag(S_B)
    if scale == "stable":
        rows = W.shape[0] if stable_dim == "out" or stored_rows is None else stored_rows
        B = B * (rows ** 0.25 / stable_gamma ** 0.5)
    elif scale == "weight_svd":
        _, S_w, _ = top_svd(_as_float(W), r, solver=solver, niter=4, q=r, backend=backend)
        if S_B[0] > 0:
            B = B * (S_w[0] / S_B[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    # peft rounds A and B to the weight's dtype before computing the offset
    A = A.to(W.dtype).float().contiguous()
    B = B.to(W.dtype).float().contiguous()
    return LayerInit(A=A, B=B, scaling=scaling, residual=product_residual(scaling, B, A))
