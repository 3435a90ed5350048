"""``matmul_f32(A, B)``: fp32 product of two matrices (or batches) of any float dtype.

A (..., m, k) and B (..., k, n) in fp32/fp16/bf16 → fp32 (..., m, n), accumulated in fp32. Used for the
sketch products of the randomized SVD (``W Ω``, ``Wᵀ Q``): the large operand is read as it is stored,
never copied whole to fp32. ``fp32_if_small`` is a shared first step of the randomized and the exact top-r SVD
(``rsvd.py``, ``topsvd.py``); their Gaussian sketch is ``MatrixOperator.sketch`` (``sharded.py``).
"""
from __future__ import annotations

import torch

from . import dispatch

_CHUNK_ELEMS = 1 << 22
# CPU only: a low-precision A whose fp32 copy fits this budget is converted once instead of chunk by chunk in each
# of the many products with it (cheaper in time, bounded in memory); larger matrices are always streamed
FP32_COPY_BUDGET = 64 << 20


@dispatch.register("matmul_f32", "torch")
def matmul_f32_reference(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Reference: fp32 matmul. The smaller operand is converted whole; the larger one, when not fp32, chunk by
    chunk along its free dimension (rows of A, or columns of B)."""
    if A.dtype == torch.float32 and B.dtype == torch.float32:
        return torch.matmul(A, B)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    out = torch.empty(*batch, m, n, dtype=torch.float32, device=A.device)
    nb = max(1, out.numel() // max(m * n, 1))
    if A.numel() >= B.numel():
        Bf = B.float()
        step = max(1, _CHUNK_ELEMS // max(k * nb, 1))
        for start in range(0, m, step):
            out[..., start:start + step, :] = torch.matmul(A[..., start:start + step, :].float(), Bf)
    else:
        Af = A.float()
        step = max(1, _CHUNK_ELEMS // max(k * nb, 1))
        for start in range(0, n, step):
            out[..., :, start:start + step] = torch.matmul(Af, B[..., :, start:start + step].float())
    return out


dispatch.register("matmul_f32", "triton")(dispatch.lazy("loram_fast.triton_kernels.matmul", "matmul_f32"))


def matmul_f32(A: torch.Tensor, B: torch.Tensor, *, backend=None) -> torch.Tensor:
    """``A.float() @ B.float()`` without a full fp32 copy of a low-precision A. Shapes as torch.matmul."""
    if A.dim() < 2 or B.dim() < 2 or A.shape[-1] != B.shape[-2]:
        raise ValueError(f"loram_fast.matmul_f32: shapes do not chain: {tuple(A.shape)} @ {tuple(B.shape)}")
    _, impl = dispatch.resolve("matmul_f32", A.device, backend)
    return impl(A, B)


def fp32_if_small(A: torch.Tensor) -> torch.Tensor:
    """A as fp32 when it is a low-precision CPU matrix whose fp32 copy fits ``FP32_COPY_BUDGET``, else A."""
    if A.dtype != torch.float32 and A.device.type == "cpu" and 4 * A.numel() <= FP32_COPY_BUDGET:
        return A.float()
    return A
