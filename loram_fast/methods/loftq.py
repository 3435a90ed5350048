"""LoftQ (peft's ``loftq_init``): a quantised base weight Q and adapters with ``B A ≈ W − Q``.

For W (out×in, fp32 math), rank r, ``iters`` alternations (peft's ``loftq_iter``):

    res = W
    repeat iters times:
        Q = dequant(quant(res))              NF4 blocks of 64 (bits=4) or int8 rows (bits=8), bitsandbytes' own
        U S Vᵀ = top-r SVD of (W − Q)        B = U √S (out×r), A = √S Vᵀ (r×in)
        res = W − B A                        (not after the last one)

The base weight becomes Q (rounded once to its dtype), A and B are stored as they are: like peft, the adapter
scaling is not divided out, so the model reproduces W at step 0 only where ``lora_alpha = r`` (scaling 1).
``solver="exact"``: the full SVD, as peft (bit for bit the same A, B and Q on the same LAPACK). An iterative top-r
solver does not pay here: ``W − Q`` is quantisation noise with a flat spectrum (σ_17/σ_16 ≈ 0.999 on 2048² weights),
where subspace iteration converges no faster than the full SVD. ``"randomized"``:
:func:`~loram_fast.ops.rsvd.randomized_svd` with ``niter`` power passes, 7–17× faster for a LoftQ error 0.1–0.3 %
higher (``bench/loftq.py``).
"""
from __future__ import annotations

import torch

from ..ops import quant
from ..ops.rsvd import randomized_svd
from .common import LayerInit

SOLVERS = ("exact", "randomized")


def check_rank(shape: tuple[int, int], r: int, **_) -> str | None:
    if r > min(shape):
        return f"LoftQ needs r <= min(out, in) = {min(shape)}, got r={r}"
    return None


def loftq_factors(W: torch.Tensor, r: int, *, bits: int = 4, iters: int = 1, solver: str = "exact", niter: int = 2,
                  backend=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, A, B)`` for W (out×in): the dequantised weight (fp32, out×in) and the adapters (fp32; module docstring)."""
    weight = W.float()
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("loram_fast.loftq: the weight holds NaN or Inf values")
    res = weight
    for i in range(iters):
        Q = quant.roundtrip(res, bits)
        if not bool(torch.isfinite(Q).all()):  # int8 goes through fp16: |w| > 65504 overflows
            raise ValueError(f"loram_fast.loftq: the {bits}-bit quantisation of the weight is not finite "
                             "(int8 quantises an fp16 copy: |w| must stay below 65504)")
        res = torch.sub(weight, Q, out=res if res is not weight else None)
        if solver == "exact":
            U, S, Vh = torch.linalg.svd(res, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, Vh = randomized_svd(res, r, niter=niter, backend=backend)
        root = S.sqrt()
        B, A = U * root, root.unsqueeze(-1) * Vh
        if i + 1 < iters:
            res = torch.addmm(weight, B, A, beta=1.0, alpha=-1.0, out=res)
    return Q, A.contiguous(), B.contiguous()


def loftq_init(W: torch.Tensor, r: int, scaling: float, *, loftq_bits: int = 4, loftq_iter: int = 1,
               solver: str = "exact", niter: int = 2, backend=None) -> LayerInit:
    Q, A, B = loftq_factors(W, r, bits=loftq_bits, iters=loftq_iter, solver=solver, niter=niter, backend=backend)
    return LayerInit(A=A, B=B, scaling=scaling, new_weight=Q, owned=True)
