"""Orthogonal init (peft's ``orthogonal_init``): A and B from the two halves of one random r×r orthogonal matrix.

For rank r (even) and W (out×in): ``Q = qr(randn(r, r)).Q``; ``A = (randn(in, r/2) @ Q[0::2]).T / 10`` (r×in),
``B = randn(r/2, out).T @ Q[1::2] / 10`` (out×r): the rows of A and the columns of B span orthogonal halves of one
orthonormal basis, so ``B A = 0`` at step 0 and W is untouched. The draws come from torch's global CPU generator in
peft's order (``randn(r, r)``, ``randn(in, r/2)``, ``randn(r/2, out)`` per layer), so the same seed gives peft's
adapters; ``seed=`` draws from a private generator instead (reproducible whatever else used the global one).
"""
from __future__ import annotations

import torch

from .common import LayerInit


def check_rank(shape: tuple[int, int], r: int, **_) -> str | None:
    if r % 2:
        return f"the orthogonal init needs an even rank, got r={r}"
    return None


def orthogonal_init(W: torch.Tensor, r: int, scaling: float, *, generator: torch.Generator | None = None) -> LayerInit:
    out_features, in_features = W.shape
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
    A = torch.randn(in_features, r // 2, generator=generator).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, out_features, generator=generator).T.mm(Q[1::2, :]) / 10.0
    return LayerInit(A=A.contiguous().to(W.device), B=B.contiguous().to(W.device), scaling=scaling, owned=True)
