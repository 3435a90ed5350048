"""Row norms of a weight plus a low-rank product: DoRA's magnitude vector after a residual init.

``lowrank_row_norms(W, B, A, alpha)`` = ``‖W[i, :] + alpha · (B @ A)[i, :]‖₂`` for every row i, W m×n (any float
dtype, any strides), B m×r, A r×n: what peft's ``DoraLinearLayer.get_weight_norm`` computes, with the sum formed in
the promoted dtype of ``W`` and ``B @ A`` as peft forms it, over row chunks (never an m×n temporary of the whole
weight). Backends: ``torch`` (this reference; the op has no compiled kernel yet).
"""
from __future__ import annotations

import torch

from . import dispatch

_CHUNK_ELEMS = 1 << 20


@dispatch.register("lowrank_row_norms", "torch")
def lowrank_row_norms_reference(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    m, n = W.shape
    product_dtype = torch.promote_types(B.dtype, A.dtype)
    out_dtype = torch.promote_types(W.dtype, product_dtype)
    out = torch.empty(m, dtype=out_dtype, device=W.device)
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, m, step):
        rows = W[start:start + step] + alpha * (B[start:start + step] @ A)
        out[start:start + step] = torch.linalg.norm(rows, dim=1).to(out_dtype)
    return out


def lowrank_row_norms(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, *, backend=None) -> torch.Tensor:
    """``‖W + alpha·B A‖`` per row (length m), in the promoted dtype of W and B A (see module docstring)."""
    if W.dim() != 2 or B.dim() != 2 or A.dim() != 2 or B.shape[0] != W.shape[0] or A.shape[1] != W.shape[1] \
            or B.shape[1] != A.shape[0]:
        raise ValueError(f"loram_fast.lowrank_row_norms: shapes do not chain: W {tuple(W.shape)}, B {tuple(B.shape)}, "
                         f"A {tuple(A.shape)}")
    _, impl = dispatch.resolve("lowrank_row_norms", W.device, backend)
    return impl(W, B, A, float(alpha))
